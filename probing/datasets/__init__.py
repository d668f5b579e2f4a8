"""Dataset loaders returning lists of `probing.Query`: JSONL, MOSSBench, MM-SafetyBench, the toy set.

Every loader takes ``skip_missing`` (leave out records whose image file is absent, instead of one
`MissingDataError` listing them) and ``report`` (a `LoadReport` of what was loaded and skipped,
and why). A file or record that cannot be used raises one `DataError` naming the file and the
record or line.
"""

from ._common import LoadReport
from .jsonl import JsonlError, load_jsonl, save_jsonl
from .mmsafetybench import load_mmsafetybench, load_tiny_subset
from .mossbench import load_mossbench

__all__ = ["JsonlError", "load_jsonl", "save_jsonl", "load_mmsafetybench", "load_tiny_subset", "LoadReport",
           "load_mossbench"]
