"""Tests of harness/chain/grouped_topk.py: the grouped router (DeepSeek-V3 / Kimi-K2) against
an explicit loop statement of its kernel and against the oracle; one expert per group, fixed
and with `grouped-topk-tiny-groups`."""

from __future__ import annotations

import math
import random

import pytest
import torch

from harness import oracle
from harness.bugs import BugSet
from harness.case import Generated, MoECase, materialize
from harness.chain import StageContext
from harness.chain.gating import GatingInput, gating_cpu
from harness.errors import ContractError, IllegalAccess


def kernel_loops(inp: GatingInput) -> tuple[list[list[int]], list[list[float]]]:
    """The grouped kernel, row by row, in plain Python floats rounded to fp32 where the kernel
    rounds: scores, the in-place top-2 per group, strict '>' scans, K masked rounds."""
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    logits = inp.gating_logits.float()
    T, E = logits.shape
    G, TG, K = inp.n_group, inp.topk_group, inp.topk
    size = E // G
    bias = [0.0] * E if inp.correction_bias is None else inp.correction_bias.float().tolist()
    all_ids, all_w = [], []
    for t in range(T):
        s = oracle.scores(logits[t:t + 1], inp.scoring)[0].tolist()
        v = [f32(s[e] + bias[e]) for e in range(E)]
        keep = [True] * G
        if size >= 2:
            score = []
            for g in range(G):
                slots = v[g * size:(g + 1) * size]
                for j in range(2):  # partial selection sort
                    at = max(range(j, size), key=lambda i: (slots[i], -i))
                    slots[j], slots[at] = slots[at], slots[j]
                score.append(f32(slots[0] + slots[1]))
            keep = [False] * G
            for _ in range(TG):
                best = max((g for g in range(G) if not keep[g]), key=lambda g: (score[g], -g))
                keep[best] = True
        cand = [v[e] if keep[e // size] else -math.inf for e in range(E)]
        ids = []
        for _ in range(K):
            e = max(range(E), key=lambda i: (cand[i], -i))
            ids.append(e)
            cand[e] = -math.inf
        w = [s[e] for e in ids]
        if inp.renormalize:
            total = 0.0
            for x in w:
                total = f32(total + x)
            w = [f32(x / (total if total > 0 else 1.0)) for x in w]
        w = [f32(x * f32(inp.routed_scaling_factor)) for x in w]
        all_ids.append(ids)
        all_w.append(w)
    return all_ids, all_w


def _input(case: MoECase) -> GatingInput:
    t = materialize(case)
    return GatingInput(t.gating_logits, t.correction_bias, case.topk, case.scoring,
                       case.renormalize, case.n_group, case.topk_group,
                       case.routed_scaling_factor)


SHAPES = [(8, 4, 2, 2), (16, 4, 2, 4), (64, 8, 4, 8), (12, 3, 1, 4), (60, 6, 3, 5),
          (8, 8, 4, 3), (256, 8, 4, 8), (10, 1, 1, 3)]


@pytest.mark.parametrize(("E", "G", "TG", "K"), SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_matches_kernel_loops_and_oracle(E, G, TG, K, seed):
    rng = random.Random(seed * 100 + E)
    case = MoECase(rng.choice([1, 5, 17]), E, K, scoring=rng.choice(["softmax", "sigmoid"]),
                   renormalize=rng.random() < 0.5, dtype=rng.choice(["fp32", "bf16"]),
                   logits=Generated(seed, rng.choice(["normal", "quantized", "zeros"])),
                   correction_bias=Generated(seed, scale=0.1) if seed % 2 else None,
                   n_group=G, topk_group=TG, routed_scaling_factor=rng.choice([1.0, 2.5]),
                   seed=seed)
    inp = _input(case)
    out = gating_cpu(inp, StageContext())
    ids, w = kernel_loops(inp)
    assert out.topk_ids.tolist() == ids
    torch.testing.assert_close(out.topk_weights, torch.tensor(w), rtol=1e-6, atol=1e-7)
    want = oracle.gating(inp)
    assert torch.equal(out.topk_ids, want.topk_ids)
    torch.testing.assert_close(out.topk_weights, want.topk_weights, rtol=1e-5, atol=1e-6)


def test_selection_is_restricted_to_the_best_groups():
    """Expert 0 has the best single score, but its group's top-2 sum loses: not selected."""
    logits = torch.tensor([[5.0, -9.0, 3.0, 3.0, 0.0, 0.0, 0.0, 0.0]])
    inp = GatingInput(logits, None, 2, "sigmoid", False, 4, 1, 1.0)
    out = gating_cpu(inp, StageContext())
    assert out.topk_ids.tolist() == [[2, 3]]
    plain = gating_cpu(GatingInput(logits, None, 2, "sigmoid"), StageContext())
    assert plain.topk_ids.tolist() == [[0, 2]]


def test_weights_are_unbiased_renormalised_then_scaled():
    logits = torch.tensor([[1.0, 0.0, -1.0, 2.0]])
    bias = torch.tensor([0.0, 10.0, 0.0, 0.0])
    inp = GatingInput(logits, bias, 2, "sigmoid", True, 2, 2, 2.5)
    out = gating_cpu(inp, StageContext())
    assert out.topk_ids.tolist() == [[1, 3]]  # selected by the biased value
    s = torch.sigmoid(logits[0, [1, 3]])
    torch.testing.assert_close(out.topk_weights[0], s / s.sum() * 2.5)


def test_one_expert_per_group_routes_by_plain_topk():
    case = MoECase(9, 8, 3, n_group=8, topk_group=4, seed=3)
    inp = _input(case)
    grouped = gating_cpu(inp, ctx := StageContext())
    plain = gating_cpu(GatingInput(inp.gating_logits, None, 3), StageContext())
    assert torch.equal(grouped.topk_ids, plain.topk_ids)
    assert ctx.coverage["gating.grouped.tiny_group_rows"] == 9


def test_tiny_groups_variant_writes_past_the_scratch():
    inp = _input(MoECase(3, 4, 2, n_group=4, topk_group=2))
    with pytest.raises(IllegalAccess) as info:
        gating_cpu(inp, StageContext(bugs=BugSet.of(["grouped-topk-tiny-groups"])))
    assert (info.value.stage, info.value.buffer) == ("gating", "group_scratch")
    assert info.value.index == info.value.size == 3 * 4
    # groups of two or more: the variant changes nothing
    inp = _input(MoECase(3, 4, 2, n_group=2, topk_group=2))
    on = gating_cpu(inp, StageContext(bugs=BugSet.of(["grouped-topk-tiny-groups"])))
    assert torch.equal(on.topk_ids, gating_cpu(inp, StageContext()).topk_ids)


def test_contract_rejections():
    logits = torch.zeros(2, 8)
    for G, TG, K in ((3, 1, 1), (4, 5, 1), (4, 1, 3)):
        with pytest.raises(ContractError):
            gating_cpu(GatingInput(logits, None, K, "softmax", False, G, TG), StageContext())
