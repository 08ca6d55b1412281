"""Minimisation: the smallest case that keeps a signature, within a budget."""

from __future__ import annotations

import pytest
import torch

from harness.api import execute
from harness.case import Fault, MoECase, Overrides, Patch
from harness.errors import ConfigError, HarnessError
from harness.fuzz.minimize import (
    MinimizeConfig,
    cost,
    minimize,
    minimize_case,
    proposals,
)


def _nan_rows(case: MoECase) -> int:
    return sum(p.value == "nan" and p.kind in ("row", "all") for p in case.patches)


def test_synthetic_predicate_shrinks_everything_else():
    case = MoECase(200, 64, 8, hidden_size=32, block_size=64, ep_size=4, max_loras=6,
                   seed=9, renormalize=True, scoring="sigmoid",
                   patches=(Patch("gating_logits", "row", "nan", row=5),
                            Patch("gating_logits", "cell", 3.0, row=7, col=2),
                            Patch("hidden_states", "row", "inf", row=1)),
                   faults=(Fault("gating", "topk_ids", "garbage", rows=(1, 2)),))

    def keeps(c: MoECase) -> bool:  # "needs a NaN row and at least 3 tokens"
        return c.num_tokens >= 3 and _nan_rows(c) >= 1

    res = minimize(case, keeps)
    m = res.case
    assert keeps(m) and not res.exhausted
    assert (m.num_tokens, m.num_experts, m.topk, m.hidden_size, m.ep_size, m.max_loras) == \
        (3, 1, 1, 1, 1, 0)
    assert m.block_size == 1 and m.faults == () and len(m.patches) == 1
    assert (m.seed, m.renormalize, m.scoring) == (0, False, "softmax")
    assert cost(m) < cost(case) and res.steps and res.runs >= len(res.steps)


def test_budget_is_respected():
    case = MoECase(64, 16, 4, patches=(Patch("gating_logits", "row", "nan", row=5),))
    res = minimize(case, lambda c: True, MinimizeConfig(max_runs=3))
    assert res.runs == 3 and res.exhausted
    with pytest.raises(ConfigError):
        MinimizeConfig(max_runs=0)


def test_proposals_are_valid_and_cut_explicit_tensors():
    ids = torch.randint(0, 8, (12, 2), dtype=torch.int32)
    case = MoECase(12, 8, 2, ep_size=2, max_loras=3,
                   overrides=Overrides(topk_ids=ids,
                                       recv_counters=torch.ones((2, 2), dtype=torch.int32),
                                       lora_ids=torch.tensor([-1, 0, 1, 2], dtype=torch.int32)),
                   logits=torch.randn(12, 8), expert_to_rank=(0, 1) * 4,
                   adapter_enabled=(True, False, True))
    seen = 0
    for _what, cand in proposals(case):
        cand.validate()  # every proposal is a valid case (the search skips invalid ones anyway)
        o = cand.overrides
        if o.topk_ids is not None:
            assert o.topk_ids.shape == (cand.num_tokens, cand.topk)
        seen += 1
    assert seen > 20


def test_real_finding_is_minimised_keeping_its_signature():
    rows = tuple(Patch("gating_logits", "row", "nan", row=r) for r in range(24, 32))
    case = MoECase(32, 64, 4, seed=2, patches=rows)
    bugs = ("topk-nan-argmax",)
    assert "gating:unique-ids" in {f.signature for f in execute(case, "cpu", bugs).findings}
    signature, res = minimize_case(case, "cpu", bugs)
    assert signature == "gating:unique-ids"
    m = res.case
    assert signature in {f.signature for f in execute(m, "cpu", bugs).findings}
    assert m.num_tokens == 1 and len(m.patches) == 1 and m.topk == 2  # K = 1 cannot duplicate
    assert not execute(m, "cpu").findings  # the fixed chain is clean on it


def test_minimize_case_refuses_a_case_without_the_finding():
    with pytest.raises(HarnessError, match="no finding"):
        minimize_case(MoECase(8, 8, 2), "cpu")
    rows = (Patch("gating_logits", "row", "nan", row=0),)
    with pytest.raises(HarnessError, match="does not give"):
        minimize_case(MoECase(8, 8, 2, patches=rows), "cpu", ["topk-nan-argmax"],
                      signature="sort_align:no-poison")
