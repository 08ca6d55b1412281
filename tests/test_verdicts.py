"""Verdict bits of a stack agree, case by case, with the full checks of each case alone."""

from __future__ import annotations

import pytest
import torch

from harness.api import execute
from harness.backends.cpu import CpuTarget
from harness.bugs import BugSet
from harness.case import MoECase, Overrides, materialize
from harness.chain import stacked
from harness.chain.runner import chain_mode
from harness.fuzz.batch import derive_ids, derive_logits
from harness.invariants.verdicts import VERDICT_CHECKS, stack_verdicts

CASES = [MoECase(16, 8, 4, seed=1, hidden_size=4),
         MoECase(24, 320, 6, seed=2, hidden_size=2, renormalize=True),
         MoECase(12, 8, 3, seed=3, hidden_size=2, dtype="bf16"),
         MoECase(8, 8, 2, seed=4, hidden_size=2, overrides=Overrides(
             topk_ids=torch.zeros((8, 2), dtype=torch.int32)))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c.num_tokens}E{c.num_experts}")
@pytest.mark.parametrize("bugs", [(), ("topk-nan-argmax",)], ids=["fixed", "nan-argmax"])
def test_bits_match_each_case_alone(case, bugs):
    bugset, B = BugSet.of(bugs), 12
    with chain_mode():
        varied = derive_ids(case.overrides.topk_ids, case.num_experts, B, 5) \
            if stacked.entry(case) == "topk_ids" else \
            derive_logits(materialize(case).gating_logits, B, 5)
    res = stacked.run_stacked(case, varied, bugset)
    v = stack_verdicts(res, B)
    assert v.bits.shape == (B, len(VERDICT_CHECKS))
    alone = [{f.signature for f in execute(stacked.sibling(case, varied[b]) if b else case,
                                           CpuTarget(), bugset).findings} for b in range(B)]
    failing = v.failing()
    for j, check in enumerate(VERDICT_CHECKS):
        if not bool(v.judged[j]):
            assert all(check not in sigs for sigs in alone)
            continue
        assert failing.get(check, []) == [b for b in range(B) if check in alone[b]], check
    assert v.flagged().tolist() == [any(c in sigs for c in VERDICT_CHECKS) for sigs in alone]


def test_nan_argmax_is_flagged_on_the_nonfinite_siblings():
    case, B = MoECase(16, 8, 4, seed=1, hidden_size=4), 16
    with chain_mode():
        varied = derive_logits(materialize(case).gating_logits, B, 1)
    res = stacked.run_stacked(case, varied, BugSet.of(["topk-nan-argmax"]))
    flagged = stack_verdicts(res, B).failing().get("gating:unique-ids", [])
    # NaN, or +-Inf (Inf - Inf is NaN in the softmax) logits
    nonfinite = (~torch.isfinite(varied)).flatten(1).any(1).nonzero().flatten().tolist()
    assert flagged and set(flagged) <= set(nonfinite)
