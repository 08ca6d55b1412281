"""`Target`: the interface a backend implements, one method per stage of the chain.

The CPU model (`harness.backends.cpu.CpuTarget`), the bundled CUDA kernels and a user's own
kernels all implement it; the runner (`harness.chain.runner`) composes the stages and applies
faults between them, so a target only ever computes. Every method takes the stage's input
dataclass and a `StageContext` (bug variants, coverage) and returns the stage's output
dataclass, on the CPU. A method may raise `IllegalAccess`, `LaunchConfigError` or
`ContractError`; the runner turns them into findings.

`StageHooks` wraps a target with a hook around every stage (the fuzz worker marks the stage it
is in, the sanitizer's child prints a marker line): one forwarder instead of one per caller.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
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
    """One implementation of the MoE routing chain.

    Besides the stages, a target declares how it must be run: `isolate` (True: run its cases
    in a child process, as a kernel that can poison the CUDA context must be), `checks` (its
    buffers carry redzones and poison, so the invariants that read poison give verdicts) and
    `last_eager_reason` (a whole-chain target: why the last case ran stage by stage)."""

    name: str = "target"
    isolate: bool = False
    checks: bool = True
    last_eager_reason: str | None = None

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

    def check_usable(self) -> None:
        """Raise `BackendUnavailable` once the target cannot run another case in this process
        (a sticky CUDA error poisoned its context); the default target always can."""
        return None

    def close(self) -> None:
        """Release whatever the target holds (a worker process, device memory)."""
        return None


class StageHooks(Target):
    """`inner`, with `around(stage)` entered around each stage it runs ("chain" around a
    whole-chain run). Subclasses override `around`; everything else forwards to `inner`."""

    def __init__(self, inner: Target) -> None:
        self.inner = inner
        self.name, self.limits = inner.name, inner.limits
        self.isolate, self.checks = inner.isolate, inner.checks

    @contextlib.contextmanager
    def around(self, stage: str) -> Iterator[None]:
        """Entered before `stage` runs and left after it returns or raises."""
        yield

    def _stage(self, stage: str, inp, ctx):
        with self.around(stage):
            return getattr(self.inner, stage)(inp, ctx)

    def gating(self, inp: GatingInput, ctx: StageContext) -> GatingOutput:
        return self._stage("gating", inp, ctx)

    def dispatch(self, inp: DispatchInput, ctx: StageContext) -> DispatchOutput:
        return self._stage("dispatch", inp, ctx)

    def sort_align(self, inp: SortAlignInput, ctx: StageContext) -> SortAlignOutput:
        return self._stage("sort_align", inp, ctx)

    def experts(self, inp: ExpertsInput, ctx: StageContext) -> ExpertsOutput:
        return self._stage("experts", inp, ctx)

    def finalize(self, inp: FinalizeInput, ctx: StageContext) -> torch.Tensor:
        return self._stage("finalize", inp, ctx)

    def combine(self, inp: CombineInput, ctx: StageContext) -> torch.Tensor:
        return self._stage("combine", inp, ctx)

    def lora_align(self, inp: LoraAlignInput, ctx: StageContext) -> LoraAlignOutput:
        return self._stage("lora_align", inp, ctx)

    def run_chain(self, case: MoECase, bugs: BugSet) -> RunResult | None:
        with self.around("chain"):
            whole = self.inner.run_chain(case, bugs)
        self.last_eager_reason = self.inner.last_eager_reason
        return whole

    def check_usable(self) -> None:
        self.inner.check_usable()

    def close(self) -> None:
        self.inner.close()

