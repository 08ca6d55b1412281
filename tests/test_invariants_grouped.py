"""Tests of harness/invariants/grouped.py through `invariants.check`: grouped routing and EP
windows get the plain router's checks and oracle agreement, tie-aware."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import invariants, oracle
from harness.backends.cpu import CpuTarget
from harness.case import Generated, MoECase
from harness.chain.runner import run_case

GROUPED = MoECase(24, 16, 3, scoring="sigmoid", renormalize=True, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5, correction_bias=Generated(5, scale=0.1), seed=5)


def run(case: MoECase):
    return run_case(case, CpuTarget())


def sigs(res) -> set[str]:
    return {f.signature for f in invariants.check(res)}


def with_gating(res, ids=None, weights=None):
    out = dataclasses.replace(res.gating_out,
                              topk_ids=res.gating_out.topk_ids if ids is None else ids,
                              topk_weights=(res.gating_out.topk_weights if weights is None
                                            else weights))
    fresh = dataclasses.replace(res, findings=[], ranks=[], output=None, dispatch_out=None)
    fresh.gating_out = out
    return fresh


@pytest.mark.parametrize("case", [
    GROUPED,
    GROUPED.replace(logits=Generated(1, "quantized"), renormalize=False),  # ties
    GROUPED.replace(n_group=16, topk_group=3),  # one expert per group: plain top-k
    MoECase(40, 256, 8, n_group=8, topk_group=4, scoring="sigmoid", seed=2),
    MoECase(32, 16, 4, ep_size=4, local_expert_offset=(0, 3, 8, 12),
            local_num_experts=(3, 5, 4, 4), seed=3),
])
def test_clean_runs_are_clean(case):
    assert sigs(run(case)) == set()


def test_plain_topk_in_a_grouped_layer_is_caught():
    """The ids a plain top-k gives (ignoring the groups) differ from the grouped selection."""
    res = run(GROUPED)
    plain = run(GROUPED.replace(n_group=0, topk_group=0, routed_scaling_factor=1.0))
    assert not torch.equal(plain.gating_out.topk_ids, res.gating_out.topk_ids)
    weights = plain.gating_out.topk_weights * 2.5
    assert "gating:matches-oracle" in sigs(with_gating(res, plain.gating_out.topk_ids, weights))


def test_missing_scaling_factor_is_caught():
    res = run(GROUPED)
    found = sigs(with_gating(res, weights=res.gating_out.topk_weights / 2.5))
    assert "gating:renormalized" in found


def test_tied_selection_in_another_order_is_accepted():
    case = GROUPED.replace(logits=Generated(0, "zeros"), correction_bias=None)
    res = run(case)
    ids = res.gating_out.topk_ids.flip(1)  # all scores equal: any kept experts, any order
    assert sigs(with_gating(res, ids, res.gating_out.topk_weights)) == set()


def test_an_expert_of_a_dropped_group_is_caught():
    """Weights consistent with the forged ids: only the group restriction is violated."""
    case = GROUPED.replace(renormalize=False, routed_scaling_factor=1.0)
    res = run(case)
    ids = res.gating_out.topk_ids.clone()
    size = 16 // 4
    kept = set((ids[0] // size).tolist())
    dropped = next(g for g in range(4) if g not in kept)
    ids[0, -1] = dropped * size
    scores = oracle.scores(res.gating_in.gating_logits, "sigmoid")
    weights = scores.gather(1, ids.long())
    assert sigs(with_gating(res, ids, weights)) == {"gating:matches-oracle"}
