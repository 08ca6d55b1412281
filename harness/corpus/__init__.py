"""The corpus: one JSON file per case, and what is done with those files.

    format.py   the file format: the only code that reads or writes case files
    expect.py   a case's stored expectations, checked by replaying it
    explain.py  the report of a replay that did not meet them
    promote.py  a finding made a committed corpus case

The file format's API (`load`, `save`, `CaseMeta`, ...) is importable from here, on first use
(PEP 562): the pytest plugin imports `harness.corpus.expect` without paying for torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_FORMAT = ("SCHEMA_VERSION", "CaseMeta", "Expectation", "case_from_json", "case_to_json",
           "check_corpus", "content_hash", "dumps", "iter_corpus", "load", "loads",
           "meta_from_json", "meta_to_json", "save", "tensor_from_json", "tensor_to_json")

__all__ = list(_FORMAT)


def __getattr__(name: str) -> Any:
    if name in _FORMAT:
        value = getattr(importlib.import_module("harness.corpus.format"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harness.corpus' has no attribute {name!r}")
