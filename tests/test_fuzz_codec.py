"""The fuzzer's byte codec: total decoding, exact round trips, the size distribution."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness import geometry
from harness.case import Generated, MoECase, Overrides, Patch, difference
from harness.corpus.format import iter_corpus, load
from harness.demo import demo_cases
from harness.errors import CaseError, CodecError, LaunchConfigError
from harness.fuzz import codec
from harness.fuzz.codec import (
    LARGE_LIMITS,
    CodecLimits,
    decode,
    encode,
    launch_thresholds,
)

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
#: bytes biased to the selectors' escapes and table ends, to reach the raw branches
_EDGY = st.lists(st.one_of(st.integers(0, 255), st.sampled_from([0, 0xC0, 0xE0, 0xF0, 0xFE,
                                                                  0xFF])), max_size=600)


def _in_limits(case: MoECase, limits: CodecLimits = codec.LIMITS) -> None:
    T, E, K, H, ep = (case.num_tokens, case.num_experts, case.topk, case.hidden_size,
                      case.ep_size)
    assert T * E <= limits.logits_elements
    assert ep * ep * case.recv_slots * K <= max(limits.recv_elements, ep * ep * K *
                                                case.tokens_per_rank)
    assert T * K * H * H <= max(limits.expert_work, T * K)
    for t in [*case.overrides.fields().values(), case.logits, case.correction_bias]:
        if isinstance(t, torch.Tensor):
            assert t.numel() <= limits.explicit_elements


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x01", b"\xff", b"\xff" * 64, b"\x80" * 300,
                                  bytes(range(256)), bytes(range(255, -1, -1)) * 4])
def test_fixed_inputs_decode_to_valid_cases(data):
    case = decode(data)
    assert case.validate() is case
    assert case.severity in ("legal", "out-of-contract", "fault")
    _in_limits(case)


def test_empty_input_is_a_small_legal_case():
    case = decode(b"")
    assert case.severity == "legal"
    assert case.num_tokens * case.num_experts <= 256
    assert isinstance(case.logits, Generated)


@given(st.binary(max_size=400))
def test_decode_is_total_and_round_trips(data):
    case = decode(data)
    case.validate()
    _in_limits(case)
    out = encode(case)
    assert difference(decode(out), case) is None
    assert encode(decode(out)) == out  # a fixed point: one spelling per case
    assert not out.endswith(b"\x00")


@given(_EDGY)
def test_escapes_round_trip(values):
    case = decode(bytes(values))
    case.validate()
    _in_limits(case)
    assert difference(decode(encode(case)), case) is None


@given(st.binary(max_size=200), st.integers(1, 50))
def test_trailing_zeros_do_not_matter(data, zeros):
    assert difference(decode(data), decode(data + b"\x00" * zeros)) is None


def test_decode_is_deterministic():
    rng = random.Random(7)
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
        assert difference(decode(data), decode(data)) is None


def test_demo_and_bundled_corpus_cases_round_trip():
    cases = list(demo_cases().values()) + [load(p)[0] for p in iter_corpus(CORPUS)]
    assert len(cases) > len(demo_cases())
    for case in cases:
        assert difference(decode(encode(case, limits=LARGE_LIMITS), LARGE_LIMITS), case) is None
        if codec.fits(case):
            assert difference(decode(encode(case)), case) is None
    assert sum(map(codec.fits, cases)) >= len(cases) - 2  # the production-size ones


def test_round_trip_keeps_tensors_bit_for_bit():
    logits = torch.tensor([[0.0, -0.0, float("nan"), float("inf")],
                           [1e-45, 65504.0, 3.14159, -float("inf")]], dtype=torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ids = torch.tensor([[0, -1], [3, 2**31 - 1]], dtype=torch.int32)
        case = MoECase(2, 4, 2, logits=logits.to(dtype), correction_bias=torch.tensor(
            [0.5, -2**-140, 1e30, -1.0]), patches=(Patch(value=-0.0), Patch(value=float("nan")),
                                                    Patch(value=1e-300)),
            overrides=Overrides(topk_ids=ids, topk_weights=torch.tensor([[0.5, -0.0]] * 2)))
        back = decode(encode(case))
        assert difference(back, case) is None
        assert back.logits.dtype == dtype and bool(torch.signbit(back.logits[0, 1]))
        assert back.patches[0].value == 0.0 and math.copysign(1, back.patches[0].value) < 0


def test_difference_names_the_field():
    a = MoECase(8, 8, 2, patches=(Patch(value=0.0),))
    assert difference(a, a.replace(patches=(Patch(value=-0.0),))) == "patches[0].value"
    assert difference(a, a.replace(num_tokens=9)) == "num_tokens"
    assert difference(a, a.replace(overrides=Overrides(
        lora_ids=None, recv_counters=torch.zeros((1, 1), dtype=torch.int32)))) == (
        "overrides.recv_counters")


def test_strict_encode_refuses_cases_outside_the_domain():
    big = MoECase(100, 64, 2, logits=torch.zeros(100, 64))  # 6,400 > 4,096 explicit elements
    with pytest.raises(CodecError) as err:
        encode(big)
    assert err.value.field == "logits"
    with pytest.raises(CodecError, match="num_tokens"):
        encode(MoECase(100, 64, 2), limits=CodecLimits(logits_elements=1000))
    with pytest.raises(CodecError, match="hidden_size"):
        encode(MoECase(4096, 64, 8, hidden_size=256))
    with pytest.raises(CodecError, match="patches"):
        encode(MoECase(8, 8, 2, patches=(Patch(),) * 256))
    with pytest.raises(CaseError):
        encode(MoECase(8, 4, 8))  # K > E: invalid, not merely outside the domain
    assert codec.fits(MoECase(8, 8, 2)) and not codec.fits(big)


def test_lenient_encode_repairs_into_a_valid_case():
    broken = MoECase(10, 4, 8, ep_size=9, max_tokens_per_rank=1, hidden_size=999,
                     block_size=3, expert_to_rank=(5, 5), max_loras=2,
                     adapter_enabled=(False,), patches=(Patch("correction_bias"),),
                     overrides=Overrides(topk_ids=torch.zeros(3, 3, dtype=torch.int32),
                                         gating_logits=torch.ones(2, 2, dtype=torch.float64)))
    case = decode(encode(broken, strict=False))
    case.validate()
    assert (case.topk, case.ep_size, case.hidden_size, case.block_size) == (4, 4, 256, 2)
    assert case.patches[0].target == "gating_logits"
    assert case.overrides.topk_ids.shape == (10, 4)
    assert case.adapter_enabled == (False, True)


def _launch_fails(T: int, E: int, K: int, bs: int, ep: int) -> bool:
    rows = ep * math.ceil(T / ep)
    try:
        geometry.validate(geometry.experts_launches(rows, K, math.ceil(E / ep), bs, 8,
                                                    chunked=False))
    except LaunchConfigError:
        return True
    return False


@pytest.mark.parametrize("E,K,bs,ep", [(512, 22, 128, 1), (32, 32, 1, 1), (60, 4, 16, 3),
                                       (8, 2, 2, 8), (1, 1, 1, 1)])
def test_launch_thresholds_are_where_the_launch_changes(E, K, bs, ep):
    found = dict(launch_thresholds(E, K, bs, ep))
    T = found["experts.grid_y"]
    assert _launch_fails(T, E, K, bs, ep) and not _launch_fails(T - 1, E, K, bs, ep)
    T = found["sort_align.three_step"]
    assert geometry.sort_uses_three_step(ep * math.ceil(T / ep))
    assert not geometry.sort_uses_three_step(ep * math.ceil((T - 1) / ep))


def test_large_token_counts_are_reachable_through_thresholds_with_generated_tensors():
    # selector 253: the experts grid.y threshold of the decoded sizes, offset zigzag(1) = -1
    E, K, bs = 32, 32, 1
    w = codec._Writer()
    w.u8(1)
    codec._write_experts(w, E)
    codec._write_topk(w, K, E)
    codec._write_block(w, bs)
    codec._write_ep(w, 1, E)
    prefix = bytes(w.buf)
    at = dict(launch_thresholds(E, K, bs))["experts.grid_y"]
    for offset, want in ((0, at), (1, at - 1), (2, at + 1)):
        # then dtype, scoring, renormalize, H, seed, and 7: "explicit logits, if they fit"
        case = decode(prefix + bytes([253, offset, 0, 0, 0, 0, 0, 7]))
        assert case.num_tokens == want
        assert isinstance(case.logits, Generated)  # too large for an explicit tensor
    assert _launch_fails(at, E, K, bs, 1)


def test_random_inputs_are_mostly_small_but_reach_every_region():
    rng = random.Random(0)
    cases = [decode(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 120))))
             for _ in range(3000)]
    T = [c.num_tokens for c in cases]
    share = {
        "T <= 64": sum(t <= 64 for t in T) / len(T),
        "T > 256": sum(t > 256 for t in T) / len(T),
        "T > 1024": sum(t > 1024 for t in T) / len(T),
        "fallback E": sum(not geometry.uses_warp_path(c.num_experts) for c in cases) / len(T),
        "ep > 1": sum(c.ep_size > 1 for c in cases) / len(T),
        "lora": sum(c.max_loras > 0 for c in cases) / len(T),
    }
    print("random-decode shares:", {k: round(v, 3) for k, v in share.items()})
    assert share["T <= 64"] > 0.4
    assert 0 < share["T > 1024"] < 0.05
    assert all(share[k] > 0.1 for k in ("T > 256", "fallback E", "ep > 1", "lora"))
    assert {c.severity for c in cases} == {"legal", "out-of-contract", "fault"}
