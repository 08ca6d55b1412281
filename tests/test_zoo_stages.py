"""The stage mechanisms of the six variants of issue 14 and the features they live in: EP
windows, the three-step histogram and the sign-only map guard (sort_align), 32-bit store
offsets at a logical row stride (experts), (row, slot) pairs on grid.z (finalize), with the
geometry that states their thresholds."""

from __future__ import annotations

import pytest
import torch

from harness import geometry
from harness.bugs import BugSet
from harness.case import MoECase
from harness.chain import StageContext
from harness.chain.experts import ExpertsInput, FinalizeInput, experts_cpu, finalize_cpu
from harness.chain.sort_align import SortAlignInput, sort_align_cpu
from harness.errors import ContractError, IllegalAccess, LaunchConfigError

I32 = torch.int32


def ctx(*bugs: str) -> StageContext:
    return StageContext(bugs=BugSet.of(bugs))


def ids(N: int, K: int, E: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)]).to(I32)


# -- sort_align: EP windows --------------------------------------------------------------------


@pytest.mark.parametrize("N", [20, 300])
def test_window_form_equals_the_expert_map_form(N):
    E, offset, E_l = 16, 5, 6
    case = MoECase(1, E, 1, ep_size=2, local_expert_offset=(0, offset),
                   local_num_experts=(offset, E_l))
    emap = case.expert_map()[1]
    assert emap[offset:offset + E_l].tolist() == list(range(E_l))
    topk = ids(N, 3, E)
    by_map = sort_align_cpu(SortAlignInput(topk, emap, E_l, 4), ctx())
    c = ctx()
    by_window = sort_align_cpu(SortAlignInput(topk, emap, E_l, 4, offset), c)
    for field in ("expert_counts", "aligned_offsets", "permuted_row", "sorted_token_ids",
                  "expert_ids"):
        assert torch.equal(getattr(by_map, field), getattr(by_window, field)), field
    assert c.coverage["sort_align.form.window"] == 1


def test_window_past_e_is_rejected_and_overruns_without_the_check():
    emap = torch.full((8,), -1, dtype=I32)
    inp = SortAlignInput(ids(4, 2, 8), emap, 4, 4, 6)  # [6, 10) over 8 experts
    with pytest.raises(ContractError, match="local_expert_offset 6"):
        sort_align_cpu(inp, ctx())
    with pytest.raises(IllegalAccess) as info:
        sort_align_cpu(inp, ctx("ep-window-unchecked"))
    assert (info.value.buffer, info.value.index, info.value.size) == ("expert_histogram", 8, 8)
    inside = SortAlignInput(ids(4, 2, 8), emap, 2, 4, 6)  # [6, 8): fine either way
    sort_align_cpu(inside, ctx("ep-window-unchecked"))


def test_window_cases_are_out_of_contract_unless_a_partition():
    ok = MoECase(8, 8, 2, ep_size=2, local_expert_offset=(0, 4), local_num_experts=(4, 4))
    assert ok.severity == "legal"
    for offsets, counts in (((0, 5), (4, 4)), ((0, 3), (4, 4)), ((0, 4), (4, 3))):
        bad = ok.replace(local_expert_offset=offsets, local_num_experts=counts)
        assert bad.severity == "out-of-contract", (offsets, counts)
    assert any("> num_experts" in v for v in ok.replace(
        local_expert_offset=(0, 5)).contract_violations())


# -- sort_align: the histogram and the stale-id guard -------------------------------------------


@pytest.mark.parametrize(("E_l", "N", "overruns"), [(1, 257, True), (128, 300, True),
                                                     (129, 300, False), (64, 256, False)])
def test_histogram_undersized_overruns_for_small_e_on_the_three_step_path(E_l, N, overruns):
    inp = SortAlignInput(ids(N, 1, E_l), torch.arange(E_l, dtype=I32), E_l, 16)
    sort_align_cpu(inp, ctx())
    if overruns:
        with pytest.raises(IllegalAccess) as info:
            sort_align_cpu(inp, ctx("histogram-undersized"))
        assert info.value.buffer == "expert_count_histogram"
        assert info.value.size == geometry.sort_histogram_elems(E_l, undersized=True)
    else:
        sort_align_cpu(inp, ctx("histogram-undersized"))


def test_histogram_sizes():
    for E_l in (1, 100, 128, 129, 256, 300):
        assert geometry.sort_histogram_elems(E_l) == geometry.sort_histogram_clear_elems(E_l)
        assert geometry.sort_histogram_clear_elems(E_l) == 2 * max(E_l, 256)
        small = geometry.sort_histogram_elems(E_l, undersized=True)
        assert (small < geometry.sort_histogram_clear_elems(E_l)) == (E_l <= 128)


@pytest.mark.parametrize("N", [4, 300])
def test_stale_ids_read_past_the_map_only_with_the_variant(N):
    topk = ids(N, 2, 8)
    topk[N - 1, 1] = 1 << 30
    topk[0, 0] = -5  # negative ids pass the sign check either way
    inp = SortAlignInput(topk, torch.arange(8, dtype=I32), 8, 4)
    fixed = sort_align_cpu(inp, ctx())
    assert int(fixed.permuted_row[(N - 1) * 2 + 1]) == -1
    with pytest.raises(IllegalAccess) as info:
        sort_align_cpu(inp, ctx("expert-map-stale-ids"))
    assert (info.value.buffer, info.value.index, info.value.size) == ("expert_map", 1 << 30, 8)
    topk[N - 1, 1] = 3  # no stale id: the variant is the fixed stage
    same = sort_align_cpu(inp, ctx("expert-map-stale-ids"))
    assert torch.equal(same.sorted_token_ids, sort_align_cpu(inp, ctx()).sorted_token_ids)


# -- experts: 32-bit offsets at a logical row stride -------------------------------------------


def _experts_input(P_rows: int, stride: int, H: int = 1) -> ExpertsInput:
    """One expert, block size 1, P_rows positions each holding its own token (K = 1)."""
    return ExpertsInput(torch.ones(P_rows, H), torch.ones(1, H, H),
                        torch.arange(P_rows, dtype=I32), torch.zeros(P_rows, dtype=I32),
                        P_rows, 1, 1, stride)


def test_int32_offsets_wrap_exactly_past_int32_max():
    S = 65536
    rows = (2**31 - 1) // S + 1  # positions 0..rows-1: the last offset is (rows-1)*S < 2**31
    experts_cpu(_experts_input(rows, S), ctx("int32-offset-overflow"))
    with pytest.raises(IllegalAccess) as info:
        experts_cpu(_experts_input(rows + 1, S), ctx("int32-offset-overflow"))
    assert info.value.buffer == "expert_out" and info.value.index == -2**31
    c = ctx()
    experts_cpu(_experts_input(rows + 1, S), c)  # fixed: 64-bit
    assert c.coverage["experts.offset.past_int32"] == 1


def test_int32_offset_threshold_solver():
    for K, S, H in ((8, 7168, 1), (8, 7168, 64), (1, 65536, 1), (22, 4096, 8)):
        T = geometry.int32_offset_num_tokens(K, S, H)
        assert geometry.experts_max_offset(T * K, S, H) > geometry.INT32_MAX
        assert geometry.experts_max_offset((T - 1) * K, S, H) <= geometry.INT32_MAX
    assert 37_000 < geometry.int32_offset_num_tokens(8, 7168, 7168) < 38_000  # SGLang PR 4727


# -- finalize: pairs on grid.z -----------------------------------------------------------------


def test_grid_z_overflow_at_65536_pairs():
    def inp(N: int, K: int) -> FinalizeInput:
        return FinalizeInput(torch.zeros(1, 1), torch.full((N * K,), -1, dtype=I32),
                             torch.ones(N, K))

    finalize_cpu(inp(8191, 8), ctx("grid-z-overflow"))  # 65,528 pairs
    with pytest.raises(LaunchConfigError, match=r"grid\.z = 65536"):
        finalize_cpu(inp(8192, 8), ctx("grid-z-overflow"))
    finalize_cpu(inp(8192, 8), ctx())
    assert geometry.pairs_overflow_rows(8) == 8192

