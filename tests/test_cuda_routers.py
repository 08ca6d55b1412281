"""GPU tests of the production-router features: grouped top-k (DeepSeek-V3 / Kimi-K2), EP
windows and a logical hidden size, against the cpu model and (through the invariants) the
oracle. Marked `gpu`: they skip without a CUDA device."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from harness.api import execute
from harness.backends.cpu import CpuTarget
from harness.case import Generated, MoECase
from harness.chain.runner import run_case

gpu = pytest.mark.gpu


def grouped_case(rng: random.Random) -> MoECase:
    """A random legal grouped-routing case: production shapes and small ones, one expert per
    group included (routed by plain top-k), ties from coarse logits."""
    E, G = rng.choice([(256, 8), (384, 1), (64, 8), (160, 8), (8, 8), (12, 3), (60, 6), (16, 4)])
    size = E // G
    K = rng.randint(1, min(8, E))
    TG = rng.randint(max(1, -(-K // size)), G)
    T = rng.choice([1, 7, 64, 257, 1000])
    return MoECase(
        T, E, K, scoring=rng.choice(("softmax", "sigmoid")), renormalize=rng.random() < 0.5,
        dtype=rng.choice(("fp32", "fp16", "bf16")), hidden_size=rng.choice((1, 4, 8)),
        seed=rng.randrange(1 << 20),
        logits=Generated(rng.randrange(1 << 20), rng.choice(("normal", "quantized"))),
        correction_bias=Generated(rng.randrange(1 << 20), scale=0.1) if rng.random() < 0.6
        else None, n_group=G, topk_group=TG,
        routed_scaling_factor=rng.choice((1.0, 2.5, 2.827)))


def window_case(rng: random.Random) -> MoECase:
    """A random legal case with EP windows (a partition of [0, E)) and, sometimes, a
    production row stride below the int32 limit."""
    E = rng.choice((8, 16, 60, 64))
    ep = rng.choice((1, 2, 4))
    cuts = sorted(rng.sample(range(1, E), ep - 1))
    bounds = [0, *cuts, E]
    T = rng.choice((16, 100, 300))
    return MoECase(
        T, E, rng.randint(1, 4), seed=rng.randrange(1 << 20), ep_size=ep, hidden_size=4,
        local_expert_offset=tuple(bounds[:-1]),
        local_num_experts=tuple(b - a for a, b in itertools.pairwise(bounds)),
        logical_hidden_size=rng.choice((0, 7168, 131072)))


@pytest.fixture(scope="module")
def cuda_target():
    from harness.backends.cuda import CudaTarget

    return CudaTarget()


def _selection_values(res) -> torch.Tensor:
    from harness import oracle

    inp = res.gating_in
    return oracle.selection_values(oracle.scores(inp.gating_logits, inp.scoring),
                                   inp.correction_bias)


@gpu
@pytest.mark.parametrize("chunk", range(4))
def test_grouped_router_matches_cpu_model(cuda_target, chunk):
    """Both clean; ids equal (or equal selection values where a tie was decided by
    rounding), weights close."""
    rng = random.Random(0x6E0 + chunk)
    for i in range(40):
        case = grouped_case(rng)
        got, want = execute(case, cuda_target), run_case(case, CpuTarget())
        assert got.findings == [], (i, case, got.findings)
        gi, wi = got.gating_out.topk_ids, want.gating_out.topk_ids
        if torch.equal(gi, wi):
            torch.testing.assert_close(got.gating_out.topk_weights,
                                       want.gating_out.topk_weights, rtol=1e-4, atol=1e-5)
        else:
            rows = torch.nonzero((gi != wi).any(1)).flatten()
            values = _selection_values(want)[rows]
            torch.testing.assert_close(values.gather(1, gi[rows].long()).sort(1).values,
                                       values.gather(1, wi[rows].long()).sort(1).values,
                                       rtol=1e-5, atol=1e-6)
        assert got.coverage["cuda.gating_grouped_path"] >= 1


@gpu
def test_windows_and_row_stride_match_cpu_model(cuda_target):
    rng = random.Random(0xE9)
    for i in range(40):
        case = window_case(rng)
        got, want = execute(case, cuda_target), run_case(case, CpuTarget())
        assert got.findings == [], (i, case, got.findings)
        for g, w in zip(got.ranks, want.ranks, strict=True):
            assert torch.equal(g.sort_out.sorted_token_ids, w.sort_out.sorted_token_ids)
            torch.testing.assert_close(g.experts_out.expert_out, w.experts_out.expert_out,
                                       rtol=1e-4, atol=1e-4, equal_nan=True)
        torch.testing.assert_close(got.output, want.output, rtol=1e-4, atol=1e-4)


@gpu
def test_offsets_past_int32_are_fine_when_64_bit(cuda_target):
    """The fixed store's 64-bit offsets past INT32_MAX: clean, and the device counts them."""
    case = MoECase(4100, 8, 8, hidden_size=2, logical_hidden_size=65536, seed=3)
    got = execute(case, cuda_target)
    assert got.findings == []
    assert got.coverage["cuda.experts_offset_past_int32"] > 0
