"""moe-harness: fuzzing and fault injection for Mixture-of-Experts routing pipelines."""

from harness.bugs import VARIANTS, BugSet
from harness.case import Fault, Generated, MoECase, Overrides, Patch
from harness.errors import HarnessError

__all__ = ["VARIANTS", "BugSet", "Fault", "Generated", "HarnessError", "MoECase", "Overrides",
           "Patch"]
__version__ = "0.1.0"
