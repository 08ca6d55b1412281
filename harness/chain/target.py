"""`Target`: the interface a backend implements, one method per stage of the chain.

The CPU model (`cpu.CpuTarget`), the bundled CUDA kernels and a user's own kernels all
implement it; the runner composes the stages and applies faults between them, so a target only
ever computes. Every method takes the stage's input dataclass and a `StageContext` (bug
variants, coverage) and returns the stage's output dataclass, on the CPU. A method may raise
`IllegalAccess`, `LaunchConfigError` or `ContractError`; the runner turns them into findings.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from harness import geometry
from harness.chain import StageContext
from harness.chain.dispatch import CombineInput, DispatchInput, DispatchOutput
from harness.chain.experts import ExpertsInput, ExpertsOutput, FinalizeInput
from harness.chain.gating import GatingInput, GatingOutput
from harness.chain.lora_align import LoraAlignInput, LoraAlignOutput
from harness.chain.sort_align import SortAlignInput, SortAlignOutput

if TYPE_CHECKING:
    from harness.bugs import BugSet
    from harness.case import MoECase
    from harness.chain.result import RunResult


class Target(ABC):
    """One implementation of the MoE routing chain."""

    name: str = "target"

    @abstractmethod
    def gating(self, inp: GatingInput, ctx: StageContext) -> GatingOutput: ...

    @abstractmethod
    def dispatch(self, inp: DispatchInput, ctx: StageContext) -> DispatchOutput: ...

    @abstractmethod
    def sort_align(self, inp: SortAlignInput, ctx: StageContext) -> SortAlignOutput: ...

    @abstractmethod
    def experts(self, inp: ExpertsInput, ctx: StageContext) -> ExpertsOutput: ...

    @abstractmethod
    def finalize(self, inp: FinalizeInput, ctx: StageContext) -> torch.Tensor: ...

    @abstractmethod
    def combine(self, inp: CombineInput, ctx: StageContext) -> torch.Tensor: ...

    @abstractmethod
    def lora_align(self, inp: LoraAlignInput, ctx: StageContext) -> LoraAlignOutput: ...

    #: launch geometry per stage; a target with kernels of another shape overrides these
    limits = geometry.DeviceLimits()

    def run_chain(self, case: MoECase, bugs: BugSet) -> RunResult | None:
        """Run the whole chain at once and return its result, or None (the default): the
        runner calls the stages one by one. A target that replays a captured CUDA graph
        (`cuda_graph.GraphTarget`) runs its cases here."""
        return None

    def close(self) -> None:
        """Release whatever the target holds (a worker process, device memory)."""
        return None
