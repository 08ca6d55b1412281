"""Tests of harness.chain.lora_align: lora_align_cpu against an explicit per-adapter loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import geometry
from harness.bugs import BugSet
from harness.chain import StageContext
from harness.chain.lora_align import LoraAlignInput, LoraAlignOutput, lora_align_cpu
from harness.errors import IllegalAccess
from harness.memory import is_poison

OFF_BY_ONE = BugSet.of(["lora-grid-off-by-one"])
UNCHECKED = BugSet.of(["lora-id-unchecked"])
DISABLED = BugSet.of(["lora-disabled-adapter"])
I32 = torch.int32


def reference_row(ids: list[list[int]], mapping: list[int], lora: int, E: int, bs: int):
    """One adapter's (sorted_token_ids, expert_ids, num_tokens_post_pad) by plain loops."""
    T, K = len(ids), len(ids[0])
    width = geometry.max_num_tokens_padded(T, K, E, bs)
    blocks = geometry.max_num_m_blocks(T, K, E, bs)
    sorted_ids, expert_ids, pos = [T * K] * width, [-1] * blocks, 0
    for e in range(E):
        rows = [t * K + k for t in range(T) for k in range(K)
                if mapping[t] == lora and ids[t][k] == e]
        sorted_ids[pos:pos + len(rows)] = rows
        size = -(-len(rows) // bs) * bs
        expert_ids[pos // bs:(pos + size) // bs] = [e] * (size // bs)
        pos += size
    return sorted_ids, expert_ids, pos


def check(inp: LoraAlignInput, out: LoraAlignOutput, processed: set[int]) -> None:
    """Rows of `processed` adapters equal the reference; every other row is all poison."""
    T, K = inp.topk_ids.shape
    E, bs, L = inp.num_experts, inp.block_size, inp.max_loras
    assert out.sorted_token_ids.shape == (L, geometry.max_num_tokens_padded(T, K, E, bs))
    assert out.expert_ids.shape == (L, geometry.max_num_m_blocks(T, K, E, bs))
    assert out.num_tokens_post_pad.shape == (L,)
    for t in (out.sorted_token_ids, out.expert_ids, out.num_tokens_post_pad):
        assert t.dtype == I32
    ids, mapping = inp.topk_ids.tolist(), inp.token_lora_mapping.tolist()
    for lora in range(L):
        if lora in processed:
            s, e, n = reference_row(ids, mapping, lora, E, bs)
            assert out.sorted_token_ids[lora].tolist() == s
            assert out.expert_ids[lora].tolist() == e
            assert int(out.num_tokens_post_pad[lora]) == n
        else:
            assert bool(is_poison(out.sorted_token_ids[lora]).all())
            assert bool(is_poison(out.expert_ids[lora]).all())
            assert bool(is_poison(out.num_tokens_post_pad[lora]))


def make_input(T, E, K, L, bs, seed, lora_ids=None, enabled=None, garbage=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).to(I32)
    mapping = torch.randint(-1, L, (T,), generator=g, dtype=I32)
    if garbage:  # ids and mappings outside their ranges: skipped / matching nothing
        ids[torch.rand((T, K), generator=g) < 0.2] = E + 3
        ids[torch.rand((T, K), generator=g) < 0.1] = -1
        mapping[torch.rand(T, generator=g) < 0.2] = L + 7
    if lora_ids is None:  # the active adapters, base model first, padded with -1
        present = sorted(set(mapping.tolist()) & set(range(-1, L)))
        lora_ids = present + [-1] * (L + 1 - len(present))
    if enabled is None:
        enabled = [1] * L + [0]
    return LoraAlignInput(ids, mapping, torch.tensor(lora_ids, dtype=I32),
                          torch.tensor(enabled, dtype=I32), E, bs, L)


def processed_fixed(inp: LoraAlignInput) -> set[int]:
    L = inp.max_loras
    return {i for i in inp.lora_ids.tolist() if 0 <= i < L and inp.adapter_enabled[i] != 0}


@given(T=st.integers(1, 30), E=st.integers(1, 8), K=st.integers(1, 3), L=st.integers(1, 4),
       bs=st.sampled_from([1, 2, 4, 8]), seed=st.integers(0, 10_000), garbage=st.booleans(),
       shuffle=st.booleans(), disable=st.integers(-1, 3))
def test_matches_reference(T, E, K, L, bs, seed, garbage, shuffle, disable):
    K = min(K, E)
    inp = make_input(T, E, K, L, bs, seed, garbage=garbage)
    if disable >= 0:
        inp.adapter_enabled[disable % L] = 0
    if shuffle:
        inp.lora_ids = inp.lora_ids[torch.randperm(L + 1, generator=torch.Generator()
                                                   .manual_seed(seed))]
    ctx = StageContext()
    out = lora_align_cpu(inp, ctx)
    check(inp, out, processed_fixed(inp))
    assert ctx.coverage["lora_align.grid.slots"] == L + 1
    assert ctx.coverage["lora_align.slot.processed"] == len(processed_fixed(inp))


def test_mixed_batch_layout_by_hand():
    ids = torch.tensor([[0, 1], [1, 0], [1, 1], [0, 2]], dtype=I32)  # token 2: duplicate
    inp = LoraAlignInput(ids, torch.tensor([0, -1, 0, 1], dtype=I32),
                         torch.tensor([-1, 0, 1], dtype=I32), torch.tensor([1, 1, 0], dtype=I32),
                         num_experts=3, block_size=2, max_loras=2)
    out = lora_align_cpu(inp, StageContext())
    s = 8  # sentinel T*K
    assert out.sorted_token_ids[0, :6].tolist() == [0, s, 1, 4, 5, s]
    assert out.expert_ids[0, :4].tolist() == [0, 1, 1, -1]
    assert out.sorted_token_ids[1, :6].tolist() == [6, s, 7, s, s, s]
    assert out.expert_ids[1, :4].tolist() == [0, 2, -1, -1]
    assert out.num_tokens_post_pad.tolist() == [6, 4]


def every_adapter_active(L: int = 3) -> LoraAlignInput:
    inp = make_input(20, 4, 2, L, 2, seed=1, lora_ids=[-1, *range(L)])
    inp.token_lora_mapping[: L + 1] = torch.arange(-1, L, dtype=I32)  # all present
    return inp


def test_grid_off_by_one_leaves_last_adapter_poison():
    inp = every_adapter_active()
    ctx = StageContext(bugs=OFF_BY_ONE)
    check(inp, lora_align_cpu(inp, ctx), {0, 1})
    assert ctx.coverage["lora_align.slot.beyond_grid"] == 1
    ctx = StageContext()
    check(inp, lora_align_cpu(inp, ctx), {0, 1, 2})
    assert ctx.coverage["lora_align.slot.beyond_grid"] == 0


def test_grid_off_by_one_harmless_without_base_slot():
    inp = every_adapter_active()
    inp.lora_ids = torch.tensor([0, 1, 2, -1], dtype=I32)  # the base model last: never read
    check(inp, lora_align_cpu(inp, StageContext(bugs=OFF_BY_ONE)), {0, 1, 2})


@pytest.mark.parametrize("bad, enabled_pad", [(4, 0), (3, 1), (-2, 0), (1000, 0)])
def test_unchecked_lora_id_is_an_illegal_access(bad, enabled_pad):
    L = 3
    inp = every_adapter_active(L)
    inp.lora_ids[2] = bad  # replaces adapter 1
    inp.adapter_enabled[L] = enabled_pad
    with pytest.raises(IllegalAccess) as err:
        lora_align_cpu(inp, StageContext(bugs=UNCHECKED))
    assert err.value.stage == "lora_align"
    # adapter_enabled has max_loras + 1 entries: ids >= L + 1 (or < -1) fault on it, id L on
    # the output rows
    assert err.value.buffer == ("adapter_enabled" if enabled_pad == 0 else "cumsum")
    ctx = StageContext()
    check(inp, lora_align_cpu(inp, ctx), {0, 2})
    assert ctx.coverage["lora_align.slot.out_of_range"] == 1


def test_unchecked_lora_id_max_loras_with_padding_flag_off_is_skipped():
    L = 3
    inp = every_adapter_active(L)
    inp.lora_ids[2] = L  # adapter_enabled[L] is the zero padding entry: skipped as disabled
    check(inp, lora_align_cpu(inp, StageContext(bugs=UNCHECKED)), {0, 2})


def test_disabled_adapter_sorted_is_an_illegal_access():
    inp = every_adapter_active()
    inp.adapter_enabled[1] = 0
    with pytest.raises(IllegalAccess) as err:
        lora_align_cpu(inp, StageContext(bugs=DISABLED))
    assert err.value.buffer == "sorted_token_ids"
    assert not 0 <= err.value.index < err.value.size  # poison offsets: far outside
    assert err.value.kind == "out-of-bounds write"
    ctx = StageContext()
    check(inp, lora_align_cpu(inp, ctx), {0, 2})  # fixed: row 1 untouched (poison)
    assert ctx.coverage["lora_align.slot.disabled"] == 1


def test_disabled_adapter_without_tokens_scatters_nothing():
    inp = every_adapter_active()
    inp.adapter_enabled[1] = 0
    inp.token_lora_mapping[inp.token_lora_mapping == 1] = 0
    check(inp, lora_align_cpu(inp, StageContext(bugs=DISABLED)), {0, 2})


def test_duplicate_and_absent_slots():
    inp = every_adapter_active()
    inp.lora_ids = torch.tensor([1, 1, -1, -1], dtype=I32)
    ctx = StageContext()
    check(inp, lora_align_cpu(inp, ctx), {1})
    assert ctx.coverage["lora_align.slot.duplicate"] == 1
    inp.lora_ids = torch.full((4,), -1, dtype=I32)
    check(inp, lora_align_cpu(inp, StageContext()), set())
