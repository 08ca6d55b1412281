"""Tests of stage 3, sort/align: both paths against a stable-argsort reference, the layout's
invariants, defensive skipping, and the `sort-duplicate-break` variant."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import geometry
from harness.bugs import BugSet
from harness.chain import StageContext, sort_align
from harness.chain.sort_align import SortAlignInput, sort_align_cpu
from harness.memory import is_poison, poison_bits

DUP_BREAK = BugSet.of(["sort-duplicate-break"])


def run(ids: torch.Tensor, expert_map: torch.Tensor, num_local: int, block_size: int,
        bugs: BugSet = BugSet()):
    ctx = StageContext(bugs=bugs)
    out = sort_align_cpu(SortAlignInput(ids, expert_map, num_local, block_size), ctx)
    return out, ctx


def reference(ids: torch.Tensor, expert_map: torch.Tensor, num_local: int, block_size: int,
              drop_duplicates: bool = False):
    """(counts, aligned_offsets, permuted_row) from a stable argsort by local id; with
    `drop_duplicates` a row's repeated local ids are removed first (their entries poison)."""
    N, K = ids.shape
    E = expert_map.numel()
    flat = ids.reshape(-1).long()
    in_range = (flat >= 0) & (flat < E)
    local = torch.full_like(flat, -1)
    local[in_range] = expert_map.long()[flat[in_range]]
    local[(local < 0) | (local >= num_local)] = -1
    permuted = torch.full((N * K,), -1, dtype=torch.long)
    if drop_duplicates:
        rows = local.view(N, K)
        for k in range(1, K):
            repeat = (rows[:, :k] == rows[:, k:k + 1]).any(1) & (rows[:, k] >= 0)
            permuted.view(N, K)[repeat, k] = poison_bits(torch.int32)  # the current word
            rows[repeat, k] = -1
    valid = local >= 0
    counts = torch.bincount(local[valid], minlength=num_local)
    padded = (counts + block_size - 1) // block_size * block_size
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    aligned = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])
    order = torch.argsort(torch.where(valid, local, num_local), stable=True)[: int(valid.sum())]
    e = local[order]
    permuted[order] = aligned[e] + torch.arange(order.numel()) - starts[e]
    return counts, aligned, permuted


def random_case(seed: int, N: int, K: int, E: int, owned_fraction: float = 0.7,
                wild: bool = True):
    """ids with -1, out-of-range and duplicate entries; a map owning some of the experts."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-3, E + 3) if wild else (0, E)
    ids = torch.randint(lo, hi, (N, K), generator=g, dtype=torch.int32)
    owned = torch.rand(E, generator=g) < owned_fraction
    expert_map = torch.full((E,), -1, dtype=torch.int32)
    expert_map[owned] = torch.randperm(int(owned.sum()), generator=g).to(torch.int32)
    return ids, expert_map, int(owned.sum())


def check_layout(out, ids: torch.Tensor, num_local: int, block_size: int) -> None:
    """Invariants every fixed output satisfies, independent of any reference."""
    N, K = ids.shape
    NK = N * K
    ntpp = out.num_tokens_post_pad
    assert out.sorted_token_ids.numel() == geometry.max_num_tokens_padded(N, K, num_local,
                                                                          block_size)
    assert out.expert_ids.numel() == geometry.max_num_m_blocks(N, K, num_local, block_size)
    assert int(out.aligned_offsets[-1]) == ntpp and ntpp % block_size == 0
    assert bool((out.aligned_offsets % block_size == 0).all())
    assert torch.equal(out.expert_offsets[1:] - out.expert_offsets[:-1], out.expert_counts)
    # bijection between the kept expanded rows and the non-sentinel positions
    perm = out.permuted_row.long()
    kept = perm >= 0
    assert bool((perm[~kept] == -1).all())
    assert torch.equal(out.sorted_token_ids.long()[perm[kept]], torch.arange(NK)[kept])
    real = out.sorted_token_ids != NK
    assert int(real.sum()) == int(kept.sum()) == int(out.expert_counts.sum())
    assert not bool(real[ntpp:].any())
    # every block of the aligned layout holds one expert's rows, -1 past num_tokens_post_pad
    used = ntpp // block_size
    assert bool((out.expert_ids[used:] == -1).all())
    block_of = torch.arange(ntpp) // block_size
    for e in range(num_local):
        lo, hi = int(out.aligned_offsets[e]), int(out.aligned_offsets[e + 1])
        assert bool((out.expert_ids[lo // block_size: hi // block_size] == e).all())
        assert int(real[lo:hi].sum()) == int(out.expert_counts[e])
        assert bool(real[lo:lo + int(out.expert_counts[e])].all())  # rows first, then pad
    assert bool((out.expert_ids[block_of] >= 0).all())


@pytest.mark.parametrize("N", [1, 7, 256, 257, 600, 1500])
@pytest.mark.parametrize("K,E,bs", [(1, 4, 1), (2, 8, 4), (4, 16, 16), (3, 5, 128)])
def test_matches_stable_argsort(N, K, E, bs):
    ids, expert_map, E_l = random_case(N * 131 + K, N, K, E)
    out, ctx = run(ids, expert_map, E_l, bs)
    counts, aligned, permuted = reference(ids, expert_map, E_l, bs)
    assert torch.equal(out.expert_counts.long(), counts)
    assert torch.equal(out.aligned_offsets.long(), aligned)
    assert torch.equal(out.permuted_row.long(), permuted)
    assert out.permuted_row.dtype == out.sorted_token_ids.dtype == torch.int32
    check_layout(out, ids, E_l, bs)
    path = "three_step" if N > geometry.SORT_SINGLE_BLOCK_MAX_ROWS else "single_block"
    assert ctx.coverage[f"sort_align.path.{path}"] == 1


def test_skip_reasons_are_covered():
    ids = torch.tensor([[0, -1], [5, 1], [-7, 2], [3, 3]], dtype=torch.int32)
    expert_map = torch.tensor([0, -1, 1, 2, 9], dtype=torch.int32)  # 9: a wild map entry
    out, ctx = run(ids, expert_map, 3, 2)
    assert out.permuted_row.tolist() == [0, -1, -1, -1, -1, 2, 4, 5]
    assert out.expert_counts.tolist() == [1, 1, 2]
    assert ctx.coverage["sort_align.skip.invalid_id"] == 1
    assert ctx.coverage["sort_align.skip.out_of_range"] == 2  # 5 and -7
    assert ctx.coverage["sort_align.skip.not_owned"] == 1  # expert 1 (map -1)
    assert ctx.coverage["sort_align.duplicates"] == 1  # row 3: (3, 3)


@pytest.mark.parametrize("N", [5, 300])
def test_wild_ids_never_index_out_of_bounds(N):
    g = torch.Generator().manual_seed(N)
    ids = torch.randint(-2**31, 2**31 - 1, (N, 4), generator=g, dtype=torch.int64)
    ids[::3, 0] = 2**31 - 1
    ids[1::3, 1] = -2**31
    ids = ids.to(torch.int32)
    ids[::2, 2] = 3  # some in range
    out, ctx = run(ids, torch.arange(8, dtype=torch.int32), 8, 4)
    check_layout(out, ids, 8, 4)
    assert ctx.coverage["sort_align.skip.out_of_range"] > 0
    assert int((out.permuted_row >= 0).sum()) == int((ids.long() == 3).sum())


@pytest.mark.parametrize("N", [10, 400])
def test_rank_owning_no_experts(N):
    ids, _, _ = random_case(3, N, 3, 8)
    out, ctx = run(ids, torch.full((8,), -1, dtype=torch.int32), 0, 16)
    assert out.num_tokens_post_pad == 0
    assert bool((out.permuted_row == -1).all())
    assert bool((out.sorted_token_ids == N * 3).all())
    assert bool((out.expert_ids == -1).all())
    assert out.expert_counts.numel() == 0 and out.aligned_offsets.tolist() == [0]
    assert ctx.coverage["sort_align.no_local_experts"] == 1


def test_duplicates_get_consecutive_positions():
    ids = torch.tensor([[2, 2, 2], [1, 2, 1]] * 200, dtype=torch.int32)  # N = 400
    out, _ = run(ids, torch.arange(4, dtype=torch.int32), 4, 8)
    perm = out.permuted_row.view(400, 3).long()
    assert bool((perm[0] == torch.tensor([0, 1, 2]) + int(out.aligned_offsets[2])).all())
    check_layout(out, ids, 4, 8)
    assert torch.equal(out.permuted_row.long(), reference(ids, torch.arange(4), 4, 8)[2])


def test_empty_experts_own_no_blocks():
    ids = torch.tensor([[0, 3], [3, 0], [3, 3]], dtype=torch.int32)
    out, ctx = run(ids, torch.arange(5, dtype=torch.int32), 5, 4)
    assert out.expert_counts.tolist() == [2, 0, 0, 4, 0]
    assert out.aligned_offsets.tolist() == [0, 4, 4, 4, 8, 8]
    assert out.expert_ids[:3].tolist() == [0, 3, -1]
    assert ctx.coverage["sort_align.empty_experts"] == 3


@pytest.mark.parametrize("N", [3, 256, 257, 700])
def test_duplicate_break_variant(N):
    ids, expert_map, E_l = random_case(N, N, 4, 6, owned_fraction=1.0, wild=False)
    ids[0] = torch.tensor([1, 1, 4, 1])  # duplicates for sure, in the first block
    fixed, _ = run(ids, expert_map, E_l, 4)
    buggy, ctx = run(ids, expert_map, E_l, 4, DUP_BREAK)
    if N <= geometry.SORT_SINGLE_BLOCK_MAX_ROWS:  # the single-block path has no such search
        for name in ("permuted_row", "sorted_token_ids", "expert_ids", "expert_counts"):
            assert torch.equal(getattr(fixed, name), getattr(buggy, name))
        assert not bool(is_poison(buggy.permuted_row).any())
        return
    counts, aligned, permuted = reference(ids, expert_map, E_l, 4, drop_duplicates=True)
    assert torch.equal(buggy.permuted_row.long(), permuted)
    assert torch.equal(buggy.expert_counts.long(), counts)
    assert torch.equal(buggy.aligned_offsets.long(), aligned)
    assert int(is_poison(buggy.permuted_row).sum()) == ctx.coverage[
        "sort_align.duplicates_dropped"] > 0
    assert bool(is_poison(buggy.permuted_row.view(N, 4)[0, 1]))
    assert not bool(is_poison(fixed.permuted_row).any())


def test_duplicate_break_without_duplicates_is_fixed():
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(16, generator=g)[:4] for _ in range(600)]).int()
    fixed, _ = run(ids, torch.arange(16, dtype=torch.int32), 16, 8)
    buggy, _ = run(ids, torch.arange(16, dtype=torch.int32), 16, 8, DUP_BREAK)
    assert torch.equal(fixed.permuted_row, buggy.permuted_row)
    assert torch.equal(fixed.sorted_token_ids, buggy.sorted_token_ids)


@given(st.integers(1, 600), st.integers(1, 4), st.integers(1, 12), st.integers(0, 5),
       st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_property_fixed_path(N, K, E, log_bs, owned_fraction, seed):
    ids, expert_map, E_l = random_case(seed, N, K, E, owned_fraction)
    bs = 2**log_bs
    out, _ = run(ids, expert_map, E_l, bs)
    counts, aligned, permuted = reference(ids, expert_map, E_l, bs)
    assert torch.equal(out.permuted_row.long(), permuted)
    assert torch.equal(out.expert_counts.long(), counts)
    assert torch.equal(out.aligned_offsets.long(), aligned)
    check_layout(out, ids, E_l, bs)


@pytest.mark.parametrize("N", [257, 600, 1500])
@pytest.mark.parametrize("K,E", [(1, 4), (4, 6), (8, 16)])
def test_fixed_three_step_model_is_the_single_block(N, K, E):
    """The stage runs the three-step model only to drop duplicates; fixed, it must give the
    single block's layout on anything (duplicates, skipped and wild ids included)."""
    ids, expert_map, E_l = random_case(N * K + E, N, K, E)
    local = sort_align._local_ids(SortAlignInput(ids, expert_map, E_l, 4))
    totals = torch.bincount(local, minlength=E_l + 1)
    ctx = StageContext()
    three = sort_align._three_step(local, totals, 4, K, False, ctx)
    single = sort_align._single_block(local, totals, 4, K)
    assert three[-1] == single[-1] and (K == 1 or single[-1] > 0)
    for a, b in zip(three[:3], single[:3], strict=True):  # counts and offsets
        assert torch.equal(a, b)
    maps = []
    for out in (three, single):  # the kept rows come in each path's order: compare the maps
        position = torch.full((N * K,), -1)
        position[out[3]] = out[4]
        maps.append((position, out[5].sort().values))
    assert torch.equal(maps[0][0], maps[1][0]) and torch.equal(maps[0][1], maps[1][1])
    assert not ctx.coverage
