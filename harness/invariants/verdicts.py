"""Verdict bits: one bit per (case, check) of a batch, the form a device check path returns.

    Verdicts.bits [B, len(checks)] bool    True: the check holds for case b
    Verdicts.failing() -> {signature: [case, ...]}

The issue's device path (issue 10, item 4) has every invariant write such bits for a batch of
cases stacked on the GPU, brought home in one copy; only a flagged case is re-run alone
through the full checks (`harness.invariants.check`), which give the `Finding` and its
details, and a sampled fraction of clean batches is fully checked too: a disagreement is the
finding "harness:check-mismatch". Here the bits are computed on the CPU model's stacked run
(`harness.chain.stacked`) for the checks of `VERDICT_CHECKS`, vectorised over the stack's rows
and reduced per case with one view: the same statements as the full checks', without their
details. `harness.fuzz.batch` uses them to run the flagged cases first when it reduces a
stack's finding (and reports a flagged case the full checks call clean as a mismatch).

Bits exist for gating's range, uniqueness and finiteness checks so far; the other checks
(the oracle comparisons with their tolerances, the layouts, dispatch, LoRA) have none yet:
their cases are found by the full check of the stack and the reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.chain.result import RunResult
from harness.invariants.common import MASK_VALUE

#: the checks with a verdict bit, in bit order (the statements of `routing.gating`'s checks)
VERDICT_CHECKS = ("gating:ids-in-range", "gating:unique-ids", "gating:weights-finite")


@dataclass(frozen=True)
class Verdicts:
    """bits [B, len(checks)] bool, True where check j holds for case b; `judged` [len(checks)]
    bool: False where a check did not apply to the batch (its stage did not run)."""

    checks: tuple[str, ...]
    bits: torch.Tensor
    judged: torch.Tensor

    def failing(self) -> dict[str, list[int]]:
        """{signature: cases that fail it} for the judged checks that some case fails."""
        bad = ~self.bits & self.judged
        cols = bad.any(0).nonzero().flatten().tolist()
        return {self.checks[j]: bad[:, j].nonzero().flatten().tolist() for j in cols}

    def flagged(self) -> torch.Tensor:
        """[B] bool: the cases some judged check fails."""
        return (~self.bits & self.judged).any(1)


def stack_verdicts(result: RunResult, batch: int) -> Verdicts:
    """The verdict bits of the B cases of a stacked run (`chain.stacked.run_stacked`)."""
    bits = torch.ones((batch, len(VERDICT_CHECKS)), dtype=torch.bool)
    judged = torch.zeros(len(VERDICT_CHECKS), dtype=torch.bool)
    T = result.case.num_tokens // batch
    if result.gating_out is not None and result.gating_in is not None:
        E = result.gating_in.gating_logits.shape[1]
        ids = result.gating_out.topk_ids.long().view(batch, T, -1)
        w = result.gating_out.topk_weights.float().view(batch, T, -1)
        bits[:, 0] = ((ids >= 0) & (ids < E)).flatten(1).all(1)
        bias = result.gating_in.correction_bias
        if bias is None or bool((bias.float() > MASK_VALUE).all()):  # selection defined
            s = ids.sort(2).values
            bits[:, 1] = ~(s[..., 1:] == s[..., :-1]).flatten(1).any(1)
            judged[1] = True
        bits[:, 2] = ((w >= 0) & (w < math.inf)).flatten(1).all(1)
        judged[0] = judged[2] = True
    return Verdicts(VERDICT_CHECKS, bits, judged)
