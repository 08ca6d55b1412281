"""Tests of harness.oracle: hand-computed examples, the NaN / tie policy, explicit-loop twins."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import geometry, oracle
from harness.case import MoECase, materialize
from harness.chain.gating import GatingInput
from harness.chain.lora_align import LoraAlignInput
from harness.chain.sort_align import SortAlignInput

NAN, INF = math.nan, math.inf
I32 = torch.int32


def gate(logits, k, scoring="softmax", renormalize=False, bias=None, dtype=torch.float32):
    inp = GatingInput(torch.tensor(logits, dtype=dtype), None if bias is None else
                      torch.tensor(bias), k, scoring, renormalize)
    out = oracle.gating(inp)
    return out.topk_ids.tolist(), out.topk_weights


# -- tolerance, judged, mismatches -------------------------------------------------------------


def test_tolerance_per_dtype():
    assert oracle.tolerance("fp32") == oracle.tolerance(torch.float32) == (1e-4, 1e-4)
    assert oracle.tolerance("fp16") == (1e-2, 1e-2)
    assert oracle.tolerance(torch.bfloat16) == (3e-2, 3e-2)


def test_mismatches_against_scale():
    expected = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    actual = torch.tensor([1.00005, 1.01, NAN, INF, 5.0, NAN])
    scale = torch.tensor([1.0, 1.0, 1.0, 1.0, INF, NAN])
    # within 1e-4 + 1e-4 * 1; off; NaN; Inf; not judged (infinite scale); not judged (NaN)
    assert oracle.mismatches(actual, expected, scale, "fp32").tolist() == [
        False, True, True, True, False, False]
    # the scale, not the value, sets the tolerance: cancellation does not make it flaky
    assert not oracle.mismatches(torch.tensor([0.5]), torch.tensor([0.0]), torch.tensor([1e4]),
                                 "fp32").any()
    assert oracle.judged(torch.tensor([3e38, 1e30])).tolist() == [False, True]


# -- gating ------------------------------------------------------------------------------------


def test_softmax_topk_hand_computed():
    ids, w = gate([[1.0, 3.0, 2.0, 3.0]], 2)
    z = math.e + 2 * math.e ** 3 + math.e ** 2
    assert ids == [[1, 3]]  # the tie between experts 1 and 3 goes to the lower index
    assert torch.allclose(w, torch.tensor([[math.e ** 3 / z, math.e ** 3 / z]]))
    ids, w = gate([[1.0, 3.0, 2.0, 3.0]], 3, renormalize=True)
    s = math.e ** 3 * 2 + math.e ** 2
    assert ids == [[1, 3, 2]]
    assert torch.allclose(w, torch.tensor([[math.e ** 3 / s, math.e ** 3 / s, math.e ** 2 / s]]))


def test_sigmoid_hand_computed():
    ids, w = gate([[0.0, 2.0, -1.0]], 2, scoring="sigmoid")
    assert ids == [[1, 0]]
    assert torch.allclose(w, torch.tensor([[1 / (1 + math.exp(-2)), 0.5]]))


def test_nan_and_inf_scores_clamp_to_zero():
    # softmax: a NaN or +Inf logit, or an all -Inf row, makes the whole row 0 -> ids 0..K-1
    for row in ([NAN, 1.0, 2.0], [1.0, INF, 0.0], [-INF, -INF, -INF]):
        ids, w = gate([row], 2, renormalize=True)
        assert ids == [[0, 1]] and w.tolist() == [[0.0, 0.0]]
    # a -Inf logit alone is a score of 0, the others are a normal softmax
    ids, w = gate([[-INF, 0.0, 0.0]], 2)
    assert ids == [[1, 2]] and torch.allclose(w, torch.tensor([[0.5, 0.5]]))
    # sigmoid: per cell; NaN -> 0, +Inf -> 1, -Inf -> 0
    ids, w = gate([[NAN, INF, -INF, 0.0]], 4, scoring="sigmoid")
    assert ids == [[1, 3, 0, 2]] and w.tolist() == [[1.0, 0.5, 0.0, 0.0]]


def test_bias_selects_but_weights_are_unbiased():
    ids, w = gate([[0.0, 0.0, 0.0, 0.0]], 2, bias=[0.0, 0.0, 1.0, 0.5])
    assert ids == [[2, 3]] and w.tolist() == [[0.25, 0.25]]


def test_nan_selection_value_ranks_last():
    ids, _ = gate([[0.0, 0.0, 0.0, 0.0]], 4, scoring="sigmoid", bias=[NAN, -INF, 0.0, 0.0])
    assert ids == [[2, 3, 1, 0]]


def test_negative_zero_ties_with_zero():
    keys = oracle._order_keys(torch.tensor([[-0.0, 0.0, -1.0, NAN, -INF]]))
    assert keys.topk(5).indices.tolist() == [[0, 1, 2, 4, 3]]


def test_scores_fp32_from_input_dtype():
    half = torch.tensor([[0.1, 0.7, 0.3]], dtype=torch.float16)
    _, w16 = gate(half.tolist(), 3, dtype=torch.float16)
    want = torch.softmax(half.float(), -1).sort(descending=True).values
    assert torch.allclose(w16, want, rtol=1e-6, atol=0)
    assert not torch.equal(w16, w16.half().float())  # not rounded to the input's precision


def test_gating_matches_explicit_sort_on_ties():
    g = torch.Generator().manual_seed(1)
    logits = torch.round(torch.randn(64, 12, generator=g))  # many exact ties
    out = oracle.gating(GatingInput(logits, None, 4, "softmax", False))
    s = torch.softmax(logits, -1)
    for t in range(64):
        order = sorted(range(12), key=lambda e: (-float(s[t, e]), e))[:4]
        assert out.topk_ids[t].tolist() == order


# -- route_local, sort_align -------------------------------------------------------------------


def test_route_local_skips():
    expert_map = torch.tensor([0, -1, 1, 2, 5], dtype=I32)  # 5: a bad entry (E_l = 3)
    ids = torch.tensor([[0, 1, 2, 3, 4, -1, 7, -9]], dtype=I32)
    assert oracle.route_local(ids, expert_map, 3).tolist() == [[0, -1, 1, 2, -1, -1, -1, -1]]


def test_sort_align_hand_computed():
    ids = torch.tensor([[0, 1], [1, 1], [-1, 5], [2, 0]], dtype=I32)
    expert_map = torch.tensor([0, 1, -1, 2, 3, 4], dtype=I32)  # E_l = 2: 3 -> 2 is skipped
    out = oracle.sort_align(SortAlignInput(ids, expert_map, 2, 4))
    # valid pairs: x=0 (e0), 1, 2, 3 (e1, duplicates included), 7 (e0)
    assert out.expert_counts.tolist() == [2, 3]
    assert out.expert_offsets.tolist() == [0, 2, 5]
    assert out.aligned_offsets.tolist() == [0, 4, 8]
    assert out.num_tokens_post_pad == 8
    assert out.permuted_row.tolist() == [0, 4, 5, 6, -1, -1, -1, 1]
    assert out.sorted_token_ids.tolist() == [0, 7, 8, 8, 1, 2, 3, 8] + [8] * 6
    assert out.expert_ids.tolist() == [0, 1, -1, -1]
    assert out.sorted_token_ids.numel() == geometry.max_num_tokens_padded(4, 2, 2, 4)


def test_sort_align_no_local_experts():
    out = oracle.sort_align(SortAlignInput(torch.tensor([[0, 1]], dtype=I32),
                                           torch.tensor([-1, -1], dtype=I32), 0, 4))
    assert out.num_tokens_post_pad == 0 and out.permuted_row.tolist() == [-1, -1]
    assert out.expert_counts.numel() == 0 and out.aligned_offsets.tolist() == [0]


def loop_layout(ids, expert_map, num_local, bs):
    """The block-aligned layout by explicit loops (tiny inputs)."""
    N, K = ids.shape
    local = []
    for g in ids.flatten().tolist():
        m = int(expert_map[g]) if 0 <= g < expert_map.numel() else -1
        local.append(m if 0 <= m < num_local else -1)
    sorted_ids = [N * K] * geometry.max_num_tokens_padded(N, K, num_local, bs)
    expert_ids = [-1] * geometry.max_num_m_blocks(N, K, num_local, bs)
    permuted, pos = [-1] * (N * K), 0
    for e in range(num_local):
        rows = [x for x in range(N * K) if local[x] == e]
        for i, x in enumerate(rows):
            sorted_ids[pos + i], permuted[x] = x, pos + i
        size = -(-len(rows) // bs) * bs
        expert_ids[pos // bs:(pos + size) // bs] = [e] * (size // bs)
        pos += size
    return sorted_ids, expert_ids, permuted, pos


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 4), st.integers(1, 9), st.integers(0, 9),
       st.sampled_from([1, 2, 4, 8]), st.integers(0, 2**16))
def test_sort_align_matches_loops(N, K, E, E_l, bs, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-2, E + 2, (N, K), generator=g, dtype=I32)
    expert_map = torch.randint(-1, E_l + 1, (E,), generator=g, dtype=I32)
    out = oracle.sort_align(SortAlignInput(ids, expert_map, E_l, bs))
    sorted_ids, expert_ids, permuted, post_pad = loop_layout(ids, expert_map, E_l, bs)
    assert out.num_tokens_post_pad == post_pad
    assert out.sorted_token_ids.tolist() == sorted_ids
    assert out.expert_ids.tolist() == expert_ids
    assert out.permuted_row.tolist() == permuted


# -- experts, finalize, chain ------------------------------------------------------------------


def test_experts_finalize_hand_computed():
    W = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 0.0], [0.0, 1.0]]])
    hidden = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    ids = torch.tensor([[0, 1], [-1, 7]])
    w = torch.tensor([[0.5, 2.0], [NAN, NAN]])  # skipped slots: their weight is never used
    out = oracle.experts_finalize(hidden, W, ids, w)
    assert out.tolist() == [[0.5 * 4 + 2, 0.5 * 6 + 2], [0.0, 0.0]]


@pytest.mark.parametrize("H", [3, 20])  # the mixed-weights path and the per-pair path
def test_experts_finalize_matches_loops(H):
    g = torch.Generator().manual_seed(H)
    N, K, E = 40, 3, 5
    hidden = torch.randn(N, H, generator=g).to(torch.bfloat16)
    W = torch.randn(E, H, H, generator=g)
    ids = torch.randint(-1, E + 1, (N, K), generator=g)
    w = torch.rand(N, K, generator=g)
    want = torch.zeros(N, H)
    for n in range(N):
        for k in range(K):
            if 0 <= ids[n, k] < E:
                want[n] += w[n, k] * (hidden[n].float() @ W[ids[n, k]])
    assert torch.allclose(oracle.experts_finalize(hidden, W, ids, w), want, atol=1e-5)


def test_expert_products_grouped_path(monkeypatch):
    g = torch.Generator().manual_seed(0)
    hidden, W = torch.randn(10, 4, generator=g), torch.randn(3, 4, 4, generator=g)
    rows = torch.randint(0, 10, (50,), generator=g)
    experts = torch.randint(0, 3, (50,), generator=g)
    small = oracle.expert_products(hidden, W, rows, experts)
    monkeypatch.setattr(oracle, "GATHER_LIMIT", 0)
    grouped = oracle.expert_products(hidden, W, rows, experts)
    assert torch.allclose(small, grouped, atol=1e-6)
    assert torch.allclose(small[7], hidden[rows[7]] @ W[experts[7]], atol=1e-6)


def test_chain_output_skips_out_of_range_ids():
    case = MoECase(num_tokens=3, num_experts=4, topk=2, hidden_size=2)
    t = materialize(case)
    ids = torch.tensor([[0, 3], [4, -1], [2, 2]], dtype=I32)
    w = torch.tensor([[0.25, 0.75], [1.0, 1.0], [0.5, 0.5]])
    out = oracle.chain_output(case, t, ids, w)
    h, W = t.hidden_states, t.expert_weights
    assert torch.allclose(out[0], 0.25 * h[0] @ W[0] + 0.75 * h[0] @ W[3], atol=1e-6)
    assert out[1].tolist() == [0.0, 0.0]
    assert torch.allclose(out[2], h[2] @ W[2], atol=1e-6)  # a duplicate id counts twice


# -- lora_align --------------------------------------------------------------------------------


def test_lora_align_hand_computed():
    inp = LoraAlignInput(topk_ids=torch.tensor([[0], [1], [0], [1]], dtype=I32),
                         token_lora_mapping=torch.tensor([0, 1, 0, 0], dtype=I32),
                         lora_ids=torch.tensor([-1, 0, 1], dtype=I32),
                         adapter_enabled=torch.tensor([1, 0, 0], dtype=I32),
                         num_experts=2, block_size=2, max_loras=2)
    want = oracle.lora_align(inp)
    assert want.written.tolist() == [True, False]  # adapter 1 is disabled
    assert want.untouched.tolist() == [False, True]
    assert want.num_tokens_post_pad.tolist() == [4, 0]
    # adapter 0: expert 0 <- rows 0, 2; expert 1 <- row 3 (+ one sentinel 4 of padding)
    assert want.sorted_token_ids[0, :4].tolist() == [0, 2, 3, 4]
    assert want.expert_ids[0, :3].tolist() == [0, 1, -1]


def test_lora_written_needs_presence_range_and_enabled():
    inp = LoraAlignInput(torch.zeros((2, 1), dtype=I32), torch.zeros(2, dtype=I32),
                         torch.tensor([3, 1, 7, -1], dtype=I32),  # 3 and 7 out of range
                         torch.tensor([1, 1, 1, 0], dtype=I32), 1, 1, 3)
    assert oracle.lora_written(inp).tolist() == [False, True, False]
