"""Dataset loaders returning lists of `probing.Query`."""

from .jsonl import load_jsonl, save_jsonl

__all__ = ["load_jsonl", "save_jsonl"]
