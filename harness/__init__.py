"""moe-harness: fuzzing and fault injection for Mixture-of-Experts routing pipelines.

The names below are imported on first use (PEP 562), so importing a light submodule (the
pytest plugin, which pytest loads in every run of an environment that has moe-harness
installed) does not pay for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.bugs import VARIANTS, BugSet
    from harness.case import Fault, Generated, MoECase, Overrides, Patch
    from harness.errors import HarnessError

_LAZY = {"VARIANTS": "harness.bugs", "BugSet": "harness.bugs", "Fault": "harness.case",
         "Generated": "harness.case", "MoECase": "harness.case", "Overrides": "harness.case",
         "Patch": "harness.case", "HarnessError": "harness.errors"}

__all__ = ["VARIANTS", "BugSet", "Fault", "Generated", "HarnessError", "MoECase", "Overrides",
           "Patch"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
