"""What one run of the chain produced: every stage's input and output, findings, coverage."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from harness.bugs import BugSet
from harness.case import Materialized, MoECase
from harness.chain.dispatch import DispatchInput, DispatchOutput
from harness.chain.experts import ExpertsInput, ExpertsOutput, FinalizeInput
from harness.chain.gating import GatingInput, GatingOutput
from harness.chain.lora_align import LoraAlignInput, LoraAlignOutput
from harness.chain.sort_align import SortAlignInput, SortAlignOutput
from harness.errors import ContractError
from harness.findings import Finding


@dataclass(eq=False)
class RankRun:
    """The per-rank part of the chain (sort_align -> experts -> finalize) on one destination."""

    rank: int
    sort_in: SortAlignInput | None = None
    sort_out: SortAlignOutput | None = None
    experts_in: ExpertsInput | None = None
    experts_out: ExpertsOutput | None = None
    finalize_in: FinalizeInput | None = None
    finalize_out: torch.Tensor | None = None


@dataclass(eq=False)
class RunResult:
    """Everything one run produced; `findings` holds the errors raised by stages (invariant
    findings are added by `harness.invariants.check`)."""

    case: MoECase
    bugs: BugSet
    target: str
    tensors: Materialized | None = None
    gating_in: GatingInput | None = None
    gating_out: GatingOutput | None = None
    dispatch_in: DispatchInput | None = None
    dispatch_out: DispatchOutput | None = None
    ranks: list[RankRun] = field(default_factory=list)
    output: torch.Tensor | None = None
    lora_in: LoraAlignInput | None = None
    lora_out: LoraAlignOutput | None = None
    findings: list[Finding] = field(default_factory=list)
    rejected: ContractError | None = None
    coverage: Counter = field(default_factory=Counter)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return not self.findings and self.rejected is None and self.output is not None
