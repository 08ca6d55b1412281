"""Tests of harness/case.py: validation, materialisation, patches, contract, expert maps."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from harness.case import (
    MAX_CASE_BYTES,
    MAX_TOKENS,
    Fault,
    Generated,
    MoECase,
    Overrides,
    Patch,
    active_lora_ids,
    draw,
    generator,
    materialize,
)
from harness.errors import CaseError

I32 = torch.int32


def base(**changes) -> MoECase:
    return MoECase(num_tokens=6, num_experts=8, topk=2).replace(**changes)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def ints(*values, shape=None) -> torch.Tensor:
    t = torch.tensor(values, dtype=I32)
    return t.reshape(shape) if shape else t


# -- validate ----------------------------------------------------------------------------------

IMPOSSIBLE = {
    "T = 0": (dict(num_tokens=0), "num_tokens"),
    "T < 0": (dict(num_tokens=-4), "num_tokens"),
    "T too big": (dict(num_tokens=MAX_TOKENS + 1), "num_tokens"),
    "T float": (dict(num_tokens=6.0), "num_tokens"),
    "T bool": (dict(num_tokens=True), "num_tokens"),
    "E = 0": (dict(num_experts=0, topk=1), "num_experts"),
    "E too big": (dict(num_experts=1025), "num_experts"),
    "K > E": (dict(topk=9), "topk"),
    "K = 0": (dict(topk=0), "topk"),
    "K > 32": (dict(num_experts=64, topk=33), "topk"),
    "scoring": (dict(scoring="relu"), "scoring"),
    "dtype": (dict(dtype="fp64"), "dtype"),
    "hidden 0": (dict(hidden_size=0), "hidden_size"),
    "hidden negative": (dict(hidden_size=-8), "hidden_size"),
    "hidden too big": (dict(hidden_size=257), "hidden_size"),
    "block not pow2": (dict(block_size=12), "block_size"),
    "block 0": (dict(block_size=0), "block_size"),
    "block too big": (dict(block_size=512), "block_size"),
    "block negative": (dict(block_size=-16), "block_size"),
    "seed negative": (dict(seed=-1), "seed"),
    "ep > E": (dict(ep_size=9), "ep_size"),
    "ep 0": (dict(ep_size=0), "ep_size"),
    "max_tokens_per_rank < ceil(T/ep)": (dict(ep_size=4, max_tokens_per_rank=1),
                                         "max_tokens_per_rank"),
    "expert_to_rank length": (dict(ep_size=2, expert_to_rank=(0, 1)), "expert_to_rank"),
    "expert_to_rank range": (dict(ep_size=2, expert_to_rank=(0, 1, 2, 0, 0, 0, 0, 0)),
                             "expert_to_rank"),
    "loras negative": (dict(max_loras=-1), "max_loras"),
    "loras too many": (dict(max_loras=65), "max_loras"),
    "adapter_enabled length": (dict(max_loras=2, adapter_enabled=(True,)), "adapter_enabled"),
    "logits shape": (dict(logits=torch.zeros(8, 6)), "logits"),
    "logits int": (dict(logits=torch.zeros(6, 8, dtype=I32)), "logits"),
    "logits list": (dict(logits=[[0.0] * 8] * 6), "logits"),
    "logits none": (dict(logits=None), "logits"),
    "bias shape": (dict(correction_bias=torch.zeros(6)), "correction_bias"),
    "scale inf": (dict(logits=Generated(scale=math.inf)), "logits"),
    "scale nan": (dict(correction_bias=Generated(scale=math.nan)), "correction_bias"),
    "distribution": (dict(logits=Generated(distribution="cauchy")), "logits"),
    "generated seed": (dict(logits=Generated(seed=-2)), "logits"),
    "patch target": (dict(patches=(Patch(), Patch(target="expert_weights"))), "patches[1]"),
    "patch bias missing": (dict(patches=(Patch(target="correction_bias"),)), "patches[0]"),
    "patch kind": (dict(patches=(Patch(kind="diagonal"),)), "patches[0]"),
    "patch value": (dict(patches=(Patch(value="nanana"),)), "patches[0]"),
    "patch row": (dict(patches=(Patch(row=-1),)), "patches[0]"),
    "patch col": (dict(patches=(Patch(col=-1),)), "patches[0]"),
    "override shape": (dict(overrides=Overrides(topk_ids=ints(0, 1))), "overrides.topk_ids"),
    "override int64": (dict(overrides=Overrides(topk_ids=torch.zeros(6, 2, dtype=torch.int64))),
                       "overrides.topk_ids"),
    "override float ids": (dict(overrides=Overrides(topk_ids=torch.zeros(6, 2))),
                           "overrides.topk_ids"),
    "override int weights": (dict(overrides=Overrides(topk_ids=torch.zeros(6, 2, dtype=I32),
                                                      topk_weights=torch.zeros(6, 2, dtype=I32))),
                             "overrides.topk_weights"),
    "weights without ids": (dict(overrides=Overrides(topk_weights=torch.zeros(6, 2))),
                            "overrides.topk_weights"),
    "override logits shape": (dict(overrides=Overrides(gating_logits=torch.zeros(6, 7))),
                              "overrides.gating_logits"),
    "recv_counters shape": (dict(ep_size=2, overrides=Overrides(recv_counters=ints(1, 2))),
                            "overrides.recv_counters"),
    "lora without loras": (dict(overrides=Overrides(lora_ids=ints(-1))), "overrides.lora_ids"),
    "lora_ids shape": (dict(max_loras=2, overrides=Overrides(lora_ids=ints(-1, 0))),
                       "overrides.lora_ids"),
    "fault boundary": (dict(faults=(Fault(boundary="combine"),)), "faults[0]"),
    "fault tensor": (dict(faults=(Fault("gating", "expert_ids"),)), "faults[0]"),
    "fault nan on int": (dict(faults=(Fault(), Fault(kind="nan"))), "faults[1]"),
    "fault inf on int": (dict(faults=(Fault("dispatch", "recv_counters", "inf"),)), "faults[0]"),
    "fault kind": (dict(faults=(Fault(kind="melt"),)), "faults[0]"),
    "fault fraction": (dict(faults=(Fault(fraction=1.5),)), "faults[0]"),
    "fault bit": (dict(faults=(Fault(bit=32),)), "faults[0]"),
    "fault seed": (dict(faults=(Fault(seed=-1),)), "faults[0]"),
    "graph padding": (dict(graph_padding="ones"), "graph_padding"),
    # impossible shapes: a buffer beyond int32 indexing, or more than MAX_CASE_BYTES in all
    "receive buffer > 2**31": (dict(num_experts=64, topk=32, ep_size=64,
                                    max_tokens_per_rank=MAX_TOKENS), "max_tokens_per_rank"),
    "default receive buffers > 8 GiB": (dict(num_tokens=MAX_TOKENS, num_experts=64, topk=32,
                                            ep_size=64), "ep_size"),
    "expert_out > 2**31": (dict(num_tokens=MAX_TOKENS, num_experts=64, topk=32,
                                hidden_size=256), "num_tokens"),
    "lora layout > 8 GiB": (dict(num_tokens=MAX_TOKENS, num_experts=64, topk=32, max_loras=64),
                            "max_loras"),
    "logits > 8 GiB in all": (dict(num_tokens=MAX_TOKENS, num_experts=1024, topk=32),
                              "num_tokens"),
}


@pytest.mark.parametrize("name", list(IMPOSSIBLE))
def test_validate_names_the_impossible_field(name: str) -> None:
    changes, field = IMPOSSIBLE[name]
    with pytest.raises(CaseError) as info:
        base(**changes).validate()
    assert info.value.field == field and f"'{field}'" in str(info.value)


def test_memory_estimate_bounds_the_buffers() -> None:
    """The bench's largest case fits; the estimate grows with what sizes each buffer."""
    big = MoECase(400_000, 512, 22, block_size=128).validate()
    total = sum(b.bytes for b in big.memory_estimate())
    assert 2**30 < total <= MAX_CASE_BYTES
    names = {b.name: b for b in big.memory_estimate()}
    assert names["gating_logits"].shape == (400_000, 512) and "gating_workspace" not in names
    fallback = {b.name for b in big.replace(num_experts=500).memory_estimate()}
    assert "gating_workspace" in fallback
    lora = {b.name: b for b in base(max_loras=3).memory_estimate()}["lora sorted_token_ids"]
    assert lora.shape == (3, 6 * 2 + 8 * 15) and lora.field == "max_loras"
    with pytest.raises(CaseError, match=r"int32 indexing.*"):
        MoECase(MAX_TOKENS, 64, 32, hidden_size=256).validate()
    with pytest.raises(CaseError, match=r"9\.\d GiB, more than 8 GiB \(largest: gating_logits"):
        MoECase(MAX_TOKENS, 1024, 32).validate()


def test_validate_accepts_the_edges_and_returns_self() -> None:
    for case in (MoECase(num_tokens=1, num_experts=1, topk=1, block_size=1),
                 MoECase(num_tokens=MAX_TOKENS, num_experts=512, topk=8, block_size=256),
                 MoECase(num_tokens=64, num_experts=1024, topk=32, hidden_size=256,
                         block_size=256, ep_size=64, max_loras=64),
                 base(ep_size=4, max_tokens_per_rank=2, expert_to_rank=(3,) * 8, max_loras=1,
                      adapter_enabled=(False,), correction_bias=torch.zeros(8),
                      patches=(Patch("correction_bias", "all", "nan", 99, 99),),
                      logits=torch.zeros(6, 8, dtype=torch.float16),
                      overrides=Overrides(topk_ids=ints(-5, 99, shape=(1, 2)).expand(6, 2),
                                          recv_counters=ints(-1, 2**31 - 1, 0, 7, shape=(4, 1))
                                          .expand(4, 4).contiguous(),
                                          lora_ids=ints(3, 3)),
                      faults=(Fault("experts", "expert_out", "nan", rows=(-7,)),))):
        assert case.validate() is case


# -- materialize -------------------------------------------------------------------------------


def rich() -> MoECase:
    return base(num_tokens=40, dtype="bf16", hidden_size=4, seed=11, max_loras=3,
                correction_bias=Generated(5, "uniform", 2.0),
                adapter_enabled=(True, False, True),
                patches=(Patch(value="inf"), Patch("hidden_states", "row", "nan", row=3)))


def test_materialize_is_bit_identical_and_typed() -> None:
    a, b = materialize(rich()), materialize(rich())
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert x.dtype == y.dtype and torch.equal(bits(x), bits(y)), f.name
    T, E, H, L = 40, 8, 4, 3
    assert a.gating_logits.shape == (T, E) and a.gating_logits.dtype == torch.bfloat16
    assert a.correction_bias.shape == (E,) and a.correction_bias.dtype == torch.float32
    assert a.hidden_states.shape == (T, H) and a.hidden_states.dtype == torch.bfloat16
    assert a.expert_weights.shape == (E, H, H) and a.expert_weights.dtype == torch.float32
    assert a.token_lora_mapping.dtype == I32 and a.token_lora_mapping.shape == (T,)
    assert bool(((a.token_lora_mapping >= -1) & (a.token_lora_mapping < L)).all())
    assert a.adapter_enabled.tolist() == [1, 0, 1, 0]
    assert torch.equal(a.lora_ids, active_lora_ids(a.token_lora_mapping, L))
    # the seed matters; an explicit logits tensor is used as given
    c = materialize(rich().replace(seed=12))
    assert not torch.equal(c.hidden_states, a.hidden_states)
    assert torch.equal(c.gating_logits, a.gating_logits)  # logits have their own Generated
    no_lora = materialize(base())
    assert no_lora.token_lora_mapping is None and no_lora.lora_ids is None
    assert no_lora.adapter_enabled is None and no_lora.correction_bias is None


def test_active_lora_ids_is_sorted_with_base_first() -> None:
    got = active_lora_ids(ints(2, -1, 2, 0, 7, -3), 3)
    assert got.tolist() == [-1, 0, 2, -1] and got.dtype == I32


def test_draw_distributions() -> None:
    assert not draw(Generated(distribution="zeros"), (4, 4), "x").any()
    u = draw(Generated(1, "uniform", 3.0), (1000,), "x")
    assert u.abs().max() <= 3.0 and u.min() < -2 and u.max() > 2
    q = draw(Generated(1, "quantized"), (1000,), "x")
    assert torch.equal(q * 2, torch.round(q * 2))
    n = draw(Generated(1, "normal", 0.5), (4000,), "x")
    assert 0.45 < float(n.std()) < 0.55
    # independent streams per name, reproducible per seed
    assert not torch.equal(draw(Generated(1), (8,), "a"), draw(Generated(1), (8,), "b"))
    assert torch.equal(torch.randn(8, generator=generator(1, "a")), draw(Generated(1), (8,), "a"))


PATCHED = [
    (Patch(value="nan", row=1, col=2), lambda x, ref: ref.__setitem__((1, 2), math.nan)),
    (Patch(kind="row", value="inf", row=9), lambda x, ref: ref.__setitem__(3, math.inf)),
    (Patch(kind="column", value="-inf", col=13), lambda x, ref: ref.__setitem__(
        (slice(None), 5), -math.inf)),
    (Patch(kind="all", value=2.5), lambda x, ref: ref.fill_(2.5)),
    (Patch(value=-7.0, row=6, col=8), lambda x, ref: ref.__setitem__((0, 0), -7.0)),
]


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("index", range(len(PATCHED)))
def test_patches_overwrite_cells_modulo_shape(dtype: str, index: int) -> None:
    patch, expect = PATCHED[index]
    plain = materialize(base(dtype=dtype)).gating_logits
    got = materialize(base(dtype=dtype, patches=(patch,))).gating_logits
    ref = plain.clone()
    expect(plain, ref)
    assert torch.equal(bits(got), bits(ref))


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_special_values(dtype: str) -> None:
    td = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    info = torch.finfo(td)
    specials = ("huge", "denormal", "-0.0", "nan", 1e39)
    x = materialize(base(dtype=dtype, patches=tuple(Patch(value=v, row=0, col=i)
                                                    for i, v in enumerate(specials))))
    row = x.gating_logits[0].double()
    assert row[0] == info.max
    assert 0 < row[1] < info.tiny  # a subnormal of the case's dtype
    assert row[2] == 0 and math.copysign(1, row[2]) == -1
    assert math.isnan(row[3])
    assert row[4] == math.inf  # beyond the dtype's range: rounds to inf, as a cast does


def test_a_nan_patch_is_the_quiet_nan_whatever_its_bits() -> None:
    """A case file stores a NaN patch value as "nan": materialising must not depend on the
    sign or payload of the float the case was built with."""
    negative_nan = -math.nan
    assert math.copysign(1, negative_nan) == -1
    for dtype in ("fp32", "fp16", "bf16"):
        ref = materialize(base(dtype=dtype, patches=(Patch(value="nan"),))).gating_logits
        got = materialize(base(dtype=dtype, patches=(Patch(value=negative_nan),))).gating_logits
        assert torch.equal(bits(got), bits(ref))


def test_tie_copies_column_zero_of_the_same_row() -> None:
    plain = materialize(base()).gating_logits
    cases = {
        Patch(kind="cell", value="tie", row=2, col=5): [(2, 5)],
        Patch(kind="row", value="tie", row=4): [(4, c) for c in range(8)],
        Patch(kind="column", value="tie", col=3): [(r, 3) for r in range(6)],
        Patch(kind="all", value="tie"): [(r, c) for r in range(6) for c in range(8)],
    }
    for patch, cells in cases.items():
        got = materialize(base(patches=(patch,))).gating_logits
        ref = plain.clone()
        for r, c in cells:  # explicit loop: the independent statement of 'tie'
            ref[r, c] = plain[r, 0]
        assert torch.equal(got, ref), patch
        r, c = cells[-1]
        if c:  # a real tie: top-k must break it towards the lower index (column 0)
            assert got[r, c] == got[r, 0]


def test_patches_apply_in_order_and_to_every_target() -> None:
    case = base(correction_bias=Generated(2), patches=(
        Patch(value=1.0, row=0, col=0), Patch(value="tie", row=0, col=1),
        Patch(value=3.0, row=0, col=0), Patch("hidden_states", "column", "nan", col=1),
        Patch("correction_bias", "cell", -2.0, col=10)))
    m = materialize(case)
    assert m.gating_logits[0, :2].tolist() == [3.0, 1.0]  # tie saw the first patch's value
    assert m.hidden_states[:, 1].isnan().all() and not m.hidden_states[:, 0].isnan().any()
    assert m.correction_bias[2] == -2.0  # col 10 modulo E = 8


def test_overridden_logits_are_used_and_patched() -> None:
    given = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    m = materialize(base(dtype="fp16", overrides=Overrides(gating_logits=given),
                         patches=(Patch(value="nan", row=1, col=1),)))
    ref = given.half()
    ref[1, 1] = math.nan
    assert torch.equal(bits(m.gating_logits), bits(ref))


def test_explicit_logits_keep_their_bits() -> None:
    x = torch.randn(6, 8).to(torch.bfloat16)
    x[0, 0] = math.nan
    m = materialize(base(dtype="bf16", logits=x))
    assert torch.equal(bits(m.gating_logits), bits(x))


# -- contract and severity ---------------------------------------------------------------------


def test_legal_cases_have_no_violations() -> None:
    nan_logits = base(patches=(Patch(kind="all", value="nan"),))
    given = base(max_loras=2, overrides=Overrides(
        topk_ids=ints(0, 7, shape=(1, 2)).repeat(6, 1), topk_weights=torch.full((6, 2), 0.5),
        token_lora_mapping=ints(-1, 0, 1, 1, 0, -1), lora_ids=ints(-1, 1, 0)))
    for case in (base(), nan_logits, given):
        assert case.contract_violations() == [] and case.severity == "legal"


VIOLATIONS = {
    "ids >= E": (dict(overrides=Overrides(topk_ids=ints(0, 8, shape=(1, 2)).repeat(6, 1))),
                 "topk_ids outside"),
    "ids -1": (dict(overrides=Overrides(topk_ids=ints(-1, 3, shape=(1, 2)).repeat(6, 1))),
               "topk_ids outside"),
    "duplicate ids": (dict(overrides=Overrides(topk_ids=ints(*[0, 1] * 5, 4, 4, shape=(6, 2)))),
                      "duplicate expert ids"),
    "nan weights": (dict(overrides=Overrides(topk_ids=ints(*[0, 1] * 6, shape=(6, 2)),
                                             topk_weights=torch.tensor([[0.5, math.nan]] * 6))),
                    "non-finite topk_weights"),
    "recv_counters beyond": (dict(ep_size=2, overrides=Overrides(
        recv_counters=ints(0, 4, 0, 0, shape=(2, 2)))), "recv_counters outside"),
    "recv_counters negative": (dict(ep_size=2, overrides=Overrides(
        recv_counters=ints(0, -1, 0, 0, shape=(2, 2)))), "recv_counters outside"),
    "recv_counters given": (dict(ep_size=2, overrides=Overrides(
        recv_counters=ints(3, 0, 0, 3, shape=(2, 2)))), "recv_counters given directly"),
    "mapping >= L": (dict(max_loras=2, overrides=Overrides(
        token_lora_mapping=ints(0, 1, 2, 0, 0, 0))), "token_lora_mapping outside"),
    "mapping < -1": (dict(max_loras=2, overrides=Overrides(
        token_lora_mapping=ints(0, -2, 1, 0, 0, 0))), "token_lora_mapping outside"),
    "lora_ids >= L": (dict(max_loras=2, overrides=Overrides(lora_ids=ints(-1, 0, 2))),
                      "lora_ids outside"),
    "duplicate lora_ids": (dict(max_loras=2, overrides=Overrides(lora_ids=ints(1, 1, -1))),
                           "duplicate lora_ids"),
    "bias at the mask": (dict(correction_bias=torch.tensor([0.0] * 7 + [-10000.0])),
                         "correction_bias entry"),
    "bias -inf patched": (dict(correction_bias=Generated(seed=3),
                               patches=(Patch("correction_bias", "cell", "-inf", col=5),)),
                          "correction_bias entry"),
    "bias nan": (dict(correction_bias=torch.tensor([math.nan] + [0.0] * 7)),
                 "correction_bias entry"),
    "bias huge negative": (dict(correction_bias=Generated(scale=1e6)), "correction_bias entry"),
}


@pytest.mark.parametrize("name", list(VIOLATIONS))
def test_contract_violations(name: str) -> None:
    changes, fragment = VIOLATIONS[name]
    case = base(**changes).validate()
    violations = case.contract_violations()
    assert len(violations) == 1 and fragment in violations[0], violations
    assert case.severity == "out-of-contract"
    assert case.replace(faults=(Fault(),)).severity == "fault"  # faults dominate


def test_bias_above_the_mask_is_legal() -> None:
    for bias in (torch.tensor([-9999.0, 1e30, math.inf, 0.0, -0.0, 3.0, -5.0, 1e-40]),
                 Generated(seed=3, scale=100.0)):
        assert base(correction_bias=bias).contract_violations() == []


def test_out_of_contract_bias_duplicates_ids_the_invariants_do_not_judge() -> None:
    """Why a bias at the mask is out of contract: even the fixed warp top-k repeats an
    expert; the gating checks do not call it a bug, and the severity says out-of-contract."""
    from harness.api import execute

    case = MoECase(4, 8, 3, correction_bias=torch.tensor([-20000.0] * 7 + [0.0]))
    result = execute(case)
    ids = result.gating_out.topk_ids
    assert (ids.sort(1).values[:, 1:] == ids.sort(1).values[:, :-1]).any()  # a repeat
    assert case.severity == "out-of-contract"
    assert not [f for f in result.findings if f.stage == "gating"]


def test_duplicate_minus_one_lora_ids_are_legal() -> None:
    case = base(max_loras=3, overrides=Overrides(lora_ids=ints(0, -1, -1, -1)))
    assert case.contract_violations() == []


def test_fault_severity_without_violations() -> None:
    assert base(faults=(Fault("experts", "expert_out", "nan"),)).severity == "fault"


# -- expert maps -------------------------------------------------------------------------------


@pytest.mark.parametrize(("E", "ep"), [(8, 1), (8, 3), (8, 8), (10, 4), (512, 64), (5, 5)])
def test_contiguous_expert_map(E: int, ep: int) -> None:
    case = MoECase(num_tokens=4, num_experts=E, topk=1, ep_size=ep)
    per = math.ceil(E / ep)
    owner = [e // per for e in range(E)]
    assert case.rank_of_expert().tolist() == owner
    expect = [[-1] * E for _ in range(ep)]
    count = [0] * ep
    for e in range(E):  # explicit loop: local ids in global order per rank
        expect[owner[e]][e] = count[owner[e]]
        count[owner[e]] += 1
    m = case.expert_map()
    assert m.dtype == I32 and m.tolist() == expect
    assert case.local_experts() == count and sum(count) == E


def test_custom_expert_map() -> None:
    case = MoECase(num_tokens=4, num_experts=6, topk=1, ep_size=3,
                   expert_to_rank=(2, 0, 2, 2, 0, 0)).validate()
    assert case.expert_map().tolist() == [[-1, 0, -1, -1, 1, 2], [-1] * 6, [0, -1, 1, 2, -1, -1]]
    assert case.local_experts() == [3, 0, 3]
    assert case.rank_of_expert().dtype == I32


def test_derived_sizes() -> None:
    case = MoECase(num_tokens=10, num_experts=8, topk=2, ep_size=3)
    assert case.tokens_per_rank == 4 and case.recv_slots == 4
    assert case.replace(max_tokens_per_rank=9).recv_slots == 9
    assert case.replace(dtype="bf16").torch_dtype == torch.bfloat16
