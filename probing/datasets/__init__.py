"""Dataset loaders returning lists of `probing.Query`: JSONL, MOSSBench, MM-SafetyBench, the toy set."""

from ._common import LoadReport
from .jsonl import load_jsonl, save_jsonl
from .mmsafetybench import load_mmsafetybench, load_tiny_subset
from .mossbench import load_mossbench

__all__ = ["load_jsonl", "save_jsonl", "load_mmsafetybench", "load_tiny_subset", "LoadReport", "load_mossbench"]
