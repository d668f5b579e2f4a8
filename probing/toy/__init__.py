"""The embedded default model: a small LLaVA-class model trained by `probing.toy.train`.

``load_model("toy")`` loads the shipped weights from ``probing/toy/weights/``.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
