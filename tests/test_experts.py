"""Tests of harness.chain.experts: experts_cpu / finalize_cpu against plain torch loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import geometry
from harness.bugs import BugSet
from harness.chain import StageContext
from harness.chain.experts import (
    ExpertsInput,
    FinalizeInput,
    experts_cpu,
    experts_over_chunks,
    finalize_cpu,
)
from harness.errors import LaunchConfigError
from harness.memory import POISON_I32, is_poison

OVERFLOW = BugSet.of(["grid-y-overflow"])


def aligned_layout(ids: torch.Tensor, num_experts: int, bs: int):
    """An independent block-aligned layout by explicit Python loops (tiny inputs only).

    ids [N, K] local expert ids, anything outside [0, E) skipped. Returns sorted_token_ids,
    expert_ids, num_tokens_post_pad, permuted_row with the sort stage's documented sizes.
    """
    N, K = ids.shape
    flat = ids.flatten().tolist()
    P = geometry.max_num_tokens_padded(N, K, num_experts, bs)
    blocks = geometry.max_num_m_blocks(N, K, num_experts, bs)
    sorted_ids = [N * K] * P
    expert_ids = [-1] * blocks
    permuted = [-1] * (N * K)
    pos = 0
    for e in range(num_experts):
        rows = [x for x in range(N * K) if flat[x] == e]
        for i, x in enumerate(rows):
            sorted_ids[pos + i] = x
            permuted[x] = pos + i
        size = -(-len(rows) // bs) * bs
        for b in range(pos // bs, (pos + size) // bs):
            expert_ids[b] = e
        pos += size
    i32 = torch.int32
    return (torch.tensor(sorted_ids, dtype=i32), torch.tensor(expert_ids, dtype=i32), pos,
            torch.tensor(permuted, dtype=i32))


def reference_output(hidden, weights, ids, topk_weights):
    """out[n] = sum_k w[n, k] * hidden[n] @ W[ids[n, k]] by explicit loops."""
    N, K = ids.shape
    out = torch.zeros((N, weights.shape[-1]))
    for n in range(N):
        for k in range(K):
            e = int(ids[n, k])
            if 0 <= e < weights.shape[0]:
                out[n] += topk_weights[n, k] * (hidden[n].float() @ weights[e])
    return out


def make_problem(N, E, K, H, bs, seed, skip_fraction=0.2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).to(torch.int32)
    ids[torch.rand((N, K), generator=g) < skip_fraction] = -1
    hidden = torch.randn((N, H), generator=g)
    weights = torch.randn((E, H, H), generator=g)
    topk_weights = torch.rand((N, K), generator=g)
    sorted_ids, expert_ids, post_pad, permuted = aligned_layout(ids, E, bs)
    inp = ExpertsInput(hidden, weights, sorted_ids, expert_ids, post_pad, K, bs)
    return inp, ids, topk_weights, permuted


def check_expert_out(inp: ExpertsInput, out: torch.Tensor) -> None:
    """Every position: hidden[x // K] @ W[e] where the kernel computes, poison elsewhere."""
    N, K, bs = inp.hidden_states.shape[0], inp.topk, inp.block_size
    E = inp.expert_weights.shape[0]
    assert out.shape == (inp.sorted_token_ids.numel(), inp.expert_weights.shape[-1])
    assert out.dtype == torch.float32
    for p in range(out.shape[0]):
        b, x = p // bs, int(inp.sorted_token_ids[p])
        live = b * bs < inp.num_tokens_post_pad and b < inp.expert_ids.numel()
        e = int(inp.expert_ids[b]) if live else -1
        if live and 0 <= e < E and 0 <= x < N * K:
            want = inp.hidden_states[x // K].float() @ inp.expert_weights[e]
            torch.testing.assert_close(out[p], want)
        else:
            assert bool(is_poison(out[p]).all()), p


@given(N=st.integers(1, 24), E=st.integers(1, 9), K=st.integers(1, 4),
       H=st.integers(1, 8), bs=st.sampled_from([1, 2, 4, 16]), seed=st.integers(0, 1000))
def test_matches_reference(N, E, K, H, bs, seed):
    K = min(K, E)
    inp, ids, topk_weights, permuted = make_problem(N, E, K, H, bs, seed)
    ctx = StageContext()
    res = experts_cpu(inp, ctx)
    assert res.num_launches == 1
    check_expert_out(inp, res.expert_out)
    out = finalize_cpu(FinalizeInput(res.expert_out, permuted, topk_weights), ctx)
    assert out.shape == (N, H) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_output(inp.hidden_states, inp.expert_weights, ids,
                                                     topk_weights))
    assert ctx.coverage["finalize.skip.unrouted"] == int((ids == -1).sum())
    assert ctx.coverage["finalize.guard.out_of_range"] == 0


@pytest.mark.parametrize("max_grid_y", [1, 2, 3, 7])
def test_chunks_compute_the_same(max_grid_y):
    inp, *_ = make_problem(30, 6, 3, 5, 4, seed=max_grid_y)
    whole = experts_cpu(inp, StageContext()).expert_out
    chunks = geometry.experts_chunks(30, 3, 6, 4, max_grid_y=max_grid_y)
    assert len(chunks) > 1
    ctx = StageContext()
    res = experts_over_chunks(inp, ctx, chunks)
    assert res.num_launches == len(chunks)
    assert ctx.coverage["experts.launch.chunks"] == len(chunks)
    assert torch.equal(res.expert_out.view(torch.int32), whole.view(torch.int32))
    check_expert_out(inp, res.expert_out)


def huge_input(N: int, K: int = 22, E: int = 512, bs: int = 128) -> ExpertsInput:
    """The benchmark problem's geometry with empty index buffers: any read of them would be an
    IllegalAccess, so a LaunchConfigError proves the geometry was checked first."""
    empty = torch.empty(0, dtype=torch.int32)
    return ExpertsInput(torch.zeros(1, 8).expand(N, 8), torch.zeros(E, 8, 8), empty, empty, 0,
                        K, bs)


def test_grid_y_overflow_variant_raises_before_any_work():
    with pytest.raises(LaunchConfigError) as err:
        experts_cpu(huge_input(400_000), StageContext(bugs=OVERFLOW))
    assert err.value.stage == "experts" and err.value.grid[1] > 65535
    ctx = StageContext()  # fixed: two chunks, nothing to compute in the empty layout
    assert experts_cpu(huge_input(400_000), ctx).num_launches == 2
    assert ctx.coverage["experts.launch.multi_chunk"] == 1


def test_grid_y_overflow_threshold():
    limit = geometry.overflow_num_tokens(22, 512, 128)
    assert experts_cpu(huge_input(limit - 1), StageContext(bugs=OVERFLOW)).num_launches == 1
    with pytest.raises(LaunchConfigError):
        experts_cpu(huge_input(limit), StageContext(bugs=OVERFLOW))
    assert experts_cpu(huge_input(limit), StageContext()).num_launches == 2


def test_blocks_past_post_pad_exit():
    inp, *_ = make_problem(20, 4, 2, 3, 4, seed=1, skip_fraction=0.0)
    inp.num_tokens_post_pad = 8  # only the first two blocks run
    ctx = StageContext()
    out = experts_cpu(inp, ctx).expert_out
    assert not bool(is_poison(out[:8]).any())
    assert bool(is_poison(out[8:]).all())
    blocks = geometry.max_num_m_blocks(20, 2, 4, 4)
    assert ctx.coverage["experts.block.early_exit"] == blocks - 2


def test_half_precision_hidden_is_widened():
    inp, ids, w, permuted = make_problem(10, 4, 2, 6, 2, seed=3)
    inp.hidden_states = inp.hidden_states.to(torch.bfloat16)
    res = experts_cpu(inp, StageContext())
    check_expert_out(inp, res.expert_out)
    out = finalize_cpu(FinalizeInput(res.expert_out, permuted, w), StageContext())
    torch.testing.assert_close(out, reference_output(inp.hidden_states, inp.expert_weights,
                                                     ids, w))


garbage = st.lists(st.sampled_from([-1, 0, 1, 2, 3, 5, 40, 41, 2**31 - 1, -2**31, POISON_I32]),
                   min_size=1, max_size=80)


@given(sorted_ids=garbage, expert_ids=garbage, permuted=garbage,
       post_pad=st.sampled_from([-5, 0, 3, 16, 10**9]), nan_weight=st.booleans())
def test_fixed_never_raises_on_garbage(sorted_ids, expert_ids, permuted, post_pad, nan_weight):
    N, K, H, E, bs = 10, 4, 3, 4, 2  # sentinel 40
    g = torch.Generator().manual_seed(len(sorted_ids))
    i32 = torch.int32
    inp = ExpertsInput(torch.randn((N, H), generator=g), torch.randn((E, H, H), generator=g),
                       torch.tensor(sorted_ids, dtype=i32), torch.tensor(expert_ids, dtype=i32),
                       post_pad, K, bs)
    ctx = StageContext()
    res = experts_cpu(inp, ctx)
    check_expert_out(inp, res.expert_out)
    rows = (permuted * N * K)[: N * K]
    weights = torch.rand((N, K), generator=g)
    if nan_weight:
        weights[0, 0] = float("nan")
    out = finalize_cpu(FinalizeInput(res.expert_out, torch.tensor(rows, dtype=i32), weights),
                       ctx)
    P = res.expert_out.shape[0]
    want = torch.zeros((N, H))
    for n in range(N):
        for k in range(K):
            r = rows[n * K + k]
            if 0 <= r < P:
                want[n] += weights[n, k] * res.expert_out[r]
    torch.testing.assert_close(out, want, equal_nan=True)


def test_skipped_entry_with_nan_weight_contributes_nothing():
    expert_out = torch.arange(12, dtype=torch.float32).view(4, 3)
    rows = torch.tensor([2, -1, 7, 0], dtype=torch.int32)  # N=2, K=2; 7 is out of range
    weights = torch.tensor([[0.5, float("nan")], [float("nan"), 2.0]])
    ctx = StageContext()
    out = finalize_cpu(FinalizeInput(expert_out, rows, weights), ctx)
    torch.testing.assert_close(out, torch.stack([0.5 * expert_out[2], 2.0 * expert_out[0]]))
    assert ctx.coverage["finalize.skip.unrouted"] == 1
    assert ctx.coverage["finalize.guard.out_of_range"] == 1
    rows[1] = 1  # a NaN weight on a routed entry is NaN, as on the device
    out = finalize_cpu(FinalizeInput(expert_out, rows, weights), StageContext())
    assert bool(out[0].isnan().all()) and not bool(out[1].isnan().any())


def test_guards_are_counted():
    inp, *_ = make_problem(8, 4, 2, 3, 2, seed=5, skip_fraction=0.0)
    inp.expert_ids[0] = 9  # block 0 not run
    inp.sorted_token_ids[2] = -7  # garbage token, skipped
    ctx = StageContext()
    out = experts_cpu(inp, ctx).expert_out
    assert bool(is_poison(out[:3]).all())
    assert ctx.coverage["experts.guard.expert_out_of_range"] >= 1
    assert ctx.coverage["experts.guard.token_out_of_range"] == 1


def test_sub_chunks(monkeypatch):
    """Tiny memory bounds: experts in sub-chunks of one block, finalize one row at a time."""
    from harness.chain import experts
    monkeypatch.setattr(experts, "SUB_CHUNK_FLOATS", 1)
    monkeypatch.setattr(experts, "FINALIZE_CHUNK_FLOATS", 1)
    inp, ids, topk_weights, permuted = make_problem(25, 7, 3, 6, 4, seed=11)
    res = experts_cpu(inp, StageContext())
    check_expert_out(inp, res.expert_out)
    out = finalize_cpu(FinalizeInput(res.expert_out, permuted, topk_weights), StageContext())
    torch.testing.assert_close(out, reference_output(inp.hidden_states, inp.expert_weights, ids,
                                                     topk_weights))
