"""The MoE routing chain, one module per stage, explicit tensors between stages.

    gating -> dispatch/sanitize -> sort_align -> experts -> finalize (-> combine)
          \\-> lora_align (beside the chain: per-adapter block-aligned layout)

Each stage module defines its `...Input` / `...Output` dataclasses (every tensor with its shape
and dtype in the docstring) and the CPU model of its kernels (`..._cpu`), a faithful
re-statement of the kernels' algorithms: the loops, comparisons and grid coverage where the
historical bugs live are there, so each bug variant reproduces by its own mechanism. Backends
(`harness.backends`) implement one method per stage; `harness.chain.runner` composes them and
applies a case's faults between stages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from harness.bugs import FIXED, BugSet

#: every stage, in the order a run executes them (lora_align right after gating, on its ids)
STAGES = ("gating", "lora_align", "dispatch", "sort_align", "experts", "finalize", "combine")


@dataclass
class StageContext:
    """What a stage needs besides its tensors: the enabled bug variants and a coverage sink.

    `cover(name)` counts a named branch (path chosen, guard taken, loop exit...); the fuzzer
    turns these counts into coverage features. Names are "stage.branch".
    """

    bugs: BugSet = FIXED
    coverage: Counter = field(default_factory=Counter)

    def cover(self, name: str, count: int = 1) -> None:
        if count:
            self.coverage[name] += int(count)
