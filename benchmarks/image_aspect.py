"""What the model sees of the benchmarks' images under "pad" (the default) and "crop".

    python benchmarks/image_aspect.py [--mmsafetybench DIR] [--mossbench DIR]

For each image set: how many images are not square, the share of each image's area that reaches
the vision tower under llava-hf's centre crop (under "pad" it is all of it), for MM-SafetyBench's
TYPO and SD_TYPO the share of the typed phrase's ink (dark pixels of the typography strip) inside
the crop window, and the time to process one image either way (`probing.pipeline.process_image`,
one thread). Data: ../shared/data (MM-SafetyBench's tiny subset, its images that are present;
MOSSBench's benign and contrast splits).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def crop_window(size: tuple[int, int], side: int) -> tuple[float, float, float, float]:
    """The part of a ``size`` (width, height) image the shortest-edge resize + centre crop keeps,
    in source pixels: (x0, y0, x1, y1)."""
    w, h = size
    scale = side / min(w, h)
    keep_w, keep_h = side / scale, side / scale
    x0, y0 = (w - keep_w) / 2, (h - keep_h) / 2
    return x0, y0, x0 + keep_w, y0 + keep_h


def ink_kept(image, kind: str, window) -> float:
    """Share of the typography strip's dark pixels inside ``window`` (SD_TYPO: the strip under
    the 1024 px picture)."""
    grey = np.asarray(image.convert("L"), dtype=np.float32) / 255
    ink = grey < 0.3
    if kind == "SD_TYPO":
        ink[:image.size[0]] = False  # the picture above the strip is as tall as the image is wide
    x0, y0, x1, y1 = window
    inside = np.zeros_like(ink)
    inside[int(y0):int(round(y1)), int(x0):int(round(x1))] = True
    return float((ink & inside).sum() / max(int(ink.sum()), 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mmsafetybench", default=str(ROOT.parent / "shared" / "data" / "mm-safetybench"))
    p.add_argument("--mossbench", default=str(ROOT.parent / "shared" / "data" / "mossbench"))
    p.add_argument("--timed", type=int, default=40, help="images per set timed in each mode")
    args = p.parse_args()
    torch.set_num_threads(1)

    from probing import load_model
    from probing.datasets import load_mmsafetybench, load_mossbench
    from probing.pipeline import process_image

    pad = load_model("tiny-random", seed=0, n_layers=1)
    crop = load_model("tiny-random", seed=0, n_layers=1, image_aspect_ratio="crop")
    side = crop.processor.image_processor.crop_size["height"]
    sets = {}
    for kind in ("TYPO", "SD_TYPO", "SD"):
        sets[f"MM-SafetyBench {kind} (tiny subset, present)"] = (
            kind, load_mmsafetybench(args.mmsafetybench, kinds=(kind,), subset="tiny", skip_missing=True))
    sets["MOSSBench (both splits)"] = (None, load_mossbench(args.mossbench, skip_missing=True))

    print(f"# image_aspect: {platform.node()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| images | n | not square | area seen under crop (mean, min) | typed phrase's ink seen under crop "
          "(mean, min) | ms per image: pad | crop |")
    print("|---|---|---|---|---|---|---|")
    for name, (kind, queries) in sets.items():
        images = [q.load_image() for q in queries if q.image is not None]
        sizes = [im.size for im in images]
        not_square = sum(w != h for w, h in sizes)
        areas = []
        for w, h in sizes:
            x0, y0, x1, y1 = crop_window((w, h), side)
            areas.append((x1 - x0) * (y1 - y0) / (w * h))
        ink = "" if kind not in ("TYPO", "SD_TYPO") else (
            "{:.0%}, {:.0%}".format(*(lambda v: (np.mean(v), np.min(v)))(
                [ink_kept(im, kind, crop_window(im.size, side)) for im in images])))
        timed = images[:args.timed]
        ms = {}
        for mode, bundle in (("pad", pad), ("crop", crop)):
            process_image(bundle, timed[0])  # warm-up
            t0 = time.perf_counter()
            for im in timed:
                process_image(bundle, im)
            ms[mode] = 1e3 * (time.perf_counter() - t0) / len(timed)
        print(f"| {name} | {len(images)} | {not_square} | {np.mean(areas):.0%}, {np.min(areas):.0%} | {ink or '-'} "
              f"| {ms['pad']:.1f} | {ms['crop']:.1f} |")


if __name__ == "__main__":
    main()
