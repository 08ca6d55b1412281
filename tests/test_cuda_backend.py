"""Tests of harness.backends.cuda (and cuda_build): the bundled kernels against the CPU model.

Without a GPU: the build spec and cache, the clean `BackendUnavailable`, the bug bitmask
against the kernels' header, and the host side of `CudaTarget` (routing, redzones, poison,
sticky errors) driven by a stand-in extension that computes with the CPU model on CPU tensors.
With a GPU (marked `gpu`): the differential sweep against the cpu backend and the oracle, each
variant's trigger, the redzone self-test, grid-y-overflow at 400,000 tokens, the build cache.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from harness.api import execute
from harness.backends import cuda_build, resolve_target
from harness.backends.cpu import CpuTarget
from harness.backends.cuda import (
    COVERAGE_WORDS,
    CudaTarget,
    _Guarded,
    _Launch,
    bug_mask,
    coverage_counts,
)
from harness.bugs import VARIANTS, BugSet
from harness.case import (
    DISTRIBUTIONS,
    FAULT_KINDS,
    FAULT_TENSORS,
    Fault,
    Generated,
    MoECase,
    Overrides,
    Patch,
)
from harness.chain import StageContext
from harness.chain.dispatch import dispatch_cpu
from harness.chain.experts import (
    ExpertsInput,
    FinalizeInput,
    experts_over_chunks,
    finalize_cpu,
)
from harness.chain.gating import GatingInput, gating_cpu
from harness.chain.lora_align import LoraAlignInput, lora_align_cpu
from harness.chain.result import RunResult
from harness.chain.runner import run_case
from harness.chain.sort_align import SortAlignInput, sort_align_cpu
from harness.demo import demo_cases
from harness.errors import BackendUnavailable, IllegalAccess
from harness.memory import is_poison, poison_bits

REPO = Path(__file__).resolve().parents[1]
HEADER = REPO / "kernels" / "moe_harness.h"


def header_slot_names() -> list[str]:
    """The coverage slot names of the X-macro in kernels/moe_harness.h."""
    text = HEADER.read_text()
    block = text[text.index("#define MOE_COVERAGE_SLOTS(X)"):text.index("enum CoverageSlot")]
    return re.findall(r"X\((\w+)\)", block)


# -- without a GPU: build spec, bitmask, availability ---------------------------------------


def test_bug_mask_matches_header_enum():
    """Bit i of the kernels' BugBit enum is the i-th variant of harness.bugs.VARIANTS."""
    bits = re.findall(r"BUG_(\w+) = 1u << (\d+)", HEADER.read_text())
    assert [int(i) for _, i in bits] == list(range(len(VARIANTS)))
    assert [name.lower().replace("_", "-") for name, _ in bits] == list(VARIANTS)
    for i, name in enumerate(VARIANTS):
        assert bug_mask(BugSet.of([name])) == 1 << i
    assert bug_mask(BugSet()) == 0
    assert bug_mask(BugSet.of(VARIANTS)) == (1 << len(VARIANTS)) - 1


def test_cuda_target_unavailable_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cuda_build.load_kernels.cache_clear()
    try:
        with pytest.raises(BackendUnavailable,
                           match=r"needs a CUDA GPU.*is_available\(\) is False"):
            CudaTarget()
        with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
            resolve_target("cuda")
    finally:
        cuda_build.load_kernels.cache_clear()


def test_build_spec_digest_tracks_sources_flags_and_cache_env(tmp_path, monkeypatch):
    for f in (REPO / "kernels").iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    spec = cuda_build.BuildSpec.default(tmp_path)
    before = spec.digest()
    assert {p.name for p in spec.sources} >= {"experts.cu", "lora_align.cu", "binding.cpp"}
    assert before == cuda_build.BuildSpec.default(tmp_path).digest()  # stable
    assert spec.name == f"moe_harness_kernels_{before}"
    flags = cuda_build.BuildSpec(spec.sources, spec.headers, cuda_cflags=("-O0",))
    assert flags.digest() != before
    (tmp_path / "experts.cu").write_text((tmp_path / "experts.cu").read_text() + "\n// edit\n")
    assert cuda_build.BuildSpec.default(tmp_path).digest() != before
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path / "cache"))
    assert spec.directory() == tmp_path / "cache" / spec.digest()
    monkeypatch.delenv(cuda_build.CACHE_ENV)
    assert spec.directory() == Path.home() / ".cache" / "moe-harness" / spec.digest()
    assert cuda_build._import_built(spec.name, tmp_path) is None  # nothing built there


def test_build_spec_without_sources_is_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match=r"binding\.cpp not found"):
        cuda_build.BuildSpec.default(tmp_path)


def test_failed_build_reports_compiler_tail(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension 'x':\nline 1\nkernels/experts.cu(3): "
                           "error: identifier \"oops\" is undefined\nninja: build stopped")

    monkeypatch.setattr(cuda_build, "_require_toolchain", lambda: None)
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    monkeypatch.setenv(cuda_build.CACHE_ENV, str(tmp_path))
    spec = cuda_build.BuildSpec.default()
    with pytest.raises(BackendUnavailable) as info:
        cuda_build.build(spec)
    msg = str(info.value)
    assert "building the CUDA kernels failed" in msg and "oops" in msg
    assert "\n" not in msg


# -- without a GPU: the host side of CudaTarget over a stand-in extension -------------------


def _ctx(bugs: int) -> StageContext:
    return StageContext(bugs=BugSet.of(n for i, n in enumerate(VARIANTS) if bugs >> i & 1))


class FakeExtension:
    """The binding's functions computed by the CPU model into the given (CPU) tensors."""

    def __init__(self) -> None:
        self.fail_with: str | None = None

    def coverage_slot_names(self) -> list[str]:
        return header_slot_names()

    def _maybe_fail(self) -> None:
        if self.fail_with:
            raise RuntimeError(self.fail_with)

    def gating(self, logits, bias, topk, scoring, renormalize, ids, weights, workspace, bugs,
               coverage):
        self._maybe_fail()
        out = gating_cpu(GatingInput(logits, bias, topk, ("softmax", "sigmoid")[scoring],
                                     renormalize), _ctx(bugs))
        ids.copy_(out.topk_ids)
        weights.copy_(out.topk_weights)
        if coverage is not None:  # block 0's flag word: bit = slot
            coverage[0] |= 1 << header_slot_names().index("GATING_WARP_PATH")

    def a2a_sanitize(self, ids, counters, bugs, coverage):
        if bugs & bug_mask(BugSet.of(["a2a-unsanitized-padding"])):
            return
        M = ids.shape[2]
        padding = torch.arange(M) >= counters.long().clamp(0, M)[..., None]
        ids[padding] = -1

    def sort_align_workspace_elems(self, N, E_l):
        return 0 if N <= 256 or E_l <= 0 else -(-N // 256) * E_l

    def sort_align(self, ids, expert_map, E_l, bs, counts, offsets, aligned, permuted,
                   sorted_ids, expert_ids, post_pad, workspace, bugs, coverage):
        out = sort_align_cpu(SortAlignInput(ids, expert_map, E_l, bs), _ctx(bugs))
        for dst, src in ((counts, out.expert_counts), (offsets, out.expert_offsets),
                         (aligned, out.aligned_offsets), (permuted, out.permuted_row),
                         (sorted_ids, out.sorted_token_ids), (expert_ids, out.expert_ids)):
            dst.copy_(src)
        post_pad[0] = out.num_tokens_post_pad

    def experts(self, hidden, weights, sorted_ids, expert_ids, post_pad, topk, bs, first, last,
                out, bugs, coverage):
        inp = ExpertsInput(hidden, weights, sorted_ids, expert_ids, int(post_pad[0]), topk, bs)
        res = experts_over_chunks(inp, _ctx(bugs), [(first, last)]).expert_out
        out.copy_(torch.where(is_poison(res), out, res))

    def finalize(self, expert_out, permuted, weights, out, bugs, coverage):
        out.copy_(finalize_cpu(FinalizeInput(expert_out, permuted, weights), _ctx(bugs)))

    def lora_align(self, ids, mapping, lora_ids, enabled, L, E, bs, num_slots, sorted_ids,
                   expert_ids, post_pad, cumsum, bugs, coverage):
        if num_slots == L:
            bugs |= bug_mask(BugSet.of(["lora-grid-off-by-one"]))
        res = lora_align_cpu(LoraAlignInput(ids, mapping, lora_ids, enabled, E, bs, L),
                             _ctx(bugs))
        sorted_ids.copy_(res.sorted_token_ids)
        expert_ids.copy_(res.expert_ids)
        post_pad.copy_(res.num_tokens_post_pad)

    def redzone_selftest(self, out):
        out.as_strided((out.numel() + 1,), (1,)).fill_(1.0)  # one element past the end


@pytest.fixture
def fake_target() -> CudaTarget:
    return CudaTarget(device="cpu", ext=FakeExtension())


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        view = torch.int32 if a.element_size() == 4 else torch.int16
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


HOST_CASES = {
    **{k: v for k, v in demo_cases().items() if k != "huge-token-count"},
    "ep-uneven": MoECase(37, 16, 3, seed=11, ep_size=3, max_tokens_per_rank=20, hidden_size=4,
                         dtype="bf16", max_loras=3),
    "ep-counters": MoECase(
        20, 8, 2, seed=12, ep_size=2,
        faults=(Fault("dispatch", "recv_counters", "garbage", rows=(0, 1)),)),
}


@pytest.mark.parametrize("name", sorted(HOST_CASES))
@pytest.mark.parametrize("bugs", [(), ("a2a-unsanitized-padding",), ("lora-grid-off-by-one",),
                                  ("lora-id-unchecked",)])
def test_host_side_matches_cpu_backend(fake_target, name, bugs):
    """Routing, guards, expert_ids sizing and output plumbing reproduce the cpu backend."""
    case = HOST_CASES[name]
    got = run_case(case, fake_target, BugSet.of(bugs))
    want = run_case(case, CpuTarget(), BugSet.of(bugs))
    assert [f.signature for f in got.findings] == [f.signature for f in want.findings]
    if want.dispatch_out is None:  # stopped before dispatch (lora_align ran first)
        return
    for field in ("recv_topk_ids", "recv_topk_weights", "recv_hidden", "recv_token_index",
                  "recv_counters"):
        assert _bits_equal(getattr(got.dispatch_out, field), getattr(want.dispatch_out, field))
    for g, w in zip(got.ranks, want.ranks, strict=True):
        assert _bits_equal(g.sort_out.sorted_token_ids, w.sort_out.sorted_token_ids)
        assert _bits_equal(g.experts_out.expert_out, w.experts_out.expert_out)
        assert _bits_equal(g.finalize_out, w.finalize_out)
    if want.output is not None:
        torch.testing.assert_close(got.output, want.output)
    if want.lora_out is not None:
        assert _bits_equal(got.lora_out.sorted_token_ids, want.lora_out.sorted_token_ids)
        assert _bits_equal(got.lora_out.num_tokens_post_pad, want.lora_out.num_tokens_post_pad)
    assert got.coverage["cuda.gating_warp_path"] >= 1


def test_dispatch_routing_matches_cpu_model(fake_target):
    g = torch.Generator().manual_seed(3)
    T, K, E, ep, M, H = 50, 3, 12, 4, 16, 2
    ids = torch.randint(-2, E + 3, (T, K), generator=g, dtype=torch.int32)  # some unowned
    inp_args = (ids, torch.rand((T, K), generator=g), torch.randn((T, H), generator=g),
                torch.arange(E, dtype=torch.int32) % ep, ep, M,
                torch.randint(0, 2 * E, (ep, ep, M, K), generator=g, dtype=torch.int32))
    from harness.chain.dispatch import DispatchInput

    got = fake_target.dispatch(DispatchInput(*inp_args), StageContext())
    want = dispatch_cpu(DispatchInput(*inp_args), StageContext())
    for field in ("recv_topk_ids", "recv_topk_weights", "recv_hidden", "recv_token_index",
                  "recv_counters"):
        assert _bits_equal(getattr(got, field), getattr(want, field)), field


def test_redzone_write_past_end_is_caught(fake_target):
    with pytest.raises(IllegalAccess) as info:
        fake_target.redzone_selftest(numel=10)
    err = info.value
    assert (err.stage, err.buffer, err.index, err.size, err.kind) == (
        "selftest", "selftest", 10, 10, "redzone")


def test_redzone_write_before_start_and_far_rows(fake_target):
    run = _Launch(fake_target, "lora_align", StageContext())
    out = run.output("expert_ids", (2, 5), torch.int32, trail=256 + 2 * 4 * 5)
    assert bool(is_poison(out).all())

    def write_row_three():  # a wild row (lora_id = max_loras + 1) lands in the sized guard
        out.as_strided((5,), (1,), out.storage_offset() + 3 * 5).fill_(7)

    with pytest.raises(IllegalAccess, match="redzone") as info:
        run.run(write_row_three)
    assert (info.value.buffer, info.value.index, info.value.size) == ("expert_ids", 15, 10)

    buf = _Guarded("x", (4,), torch.float32, torch.device("cpu"))
    buf.raw[buf.lead - 4] = 0  # element -1
    assert bool(buf.guard_damage()) and buf.first_damage() == -1


class WildRowExtension(FakeExtension):
    """lora_align as the unchecked kernel behaves for an id past max_loras: it reads
    adapter_enabled[lora_id] and writes that adapter's rows, wherever they are."""

    def lora_align(self, ids, mapping, lora_ids, enabled, L, E, bs, num_slots, sorted_ids,
                   expert_ids, post_pad, cumsum, bugs, coverage):
        def at(t: torch.Tensor, index: int, n: int = 1) -> torch.Tensor:
            return t.as_strided((n,), (1,), t.storage_offset() + index)  # no bounds check

        for lid in lora_ids[:num_slots].tolist():
            if 0 <= lid < L or lid == -1 or int(at(enabled, lid)) == 0:
                continue
            self.canary_seen = int(at(enabled, lid))
            at(post_pad, lid).fill_(0)
            at(cumsum, lid * (E + 1), E + 1).fill_(0)
            at(expert_ids, lid * expert_ids.shape[1], expert_ids.shape[1]).fill_(-1)
            at(sorted_ids, lid * sorted_ids.shape[1], sorted_ids.shape[1]).fill_(0)


@pytest.mark.parametrize("lora_id", [5, 7, -3])
def test_unchecked_lora_rows_land_in_sized_redzones(lora_id):
    target = CudaTarget(device="cpu", ext=WildRowExtension())
    L, E, T, K = 4, 8, 16, 2
    inp = LoraAlignInput(torch.zeros((T, K), dtype=torch.int32),
                         torch.zeros(T, dtype=torch.int32),
                         torch.tensor([-1, 0, 1, 2, lora_id], dtype=torch.int32),
                         torch.tensor([1, 1, 1, 1, 0], dtype=torch.int32), E, 16, L)
    ctx = StageContext(bugs=BugSet.of(["lora-id-unchecked"]))
    with pytest.raises(IllegalAccess, match="redzone") as info:
        target.lora_align(inp, ctx)
    width = T * K + E * 15
    assert info.value.buffer == "sorted_token_ids"
    assert (info.value.index, info.value.size) == (
        (lora_id * width if lora_id > 0 else lora_id * width + width - 1), L * width)
    assert target.ext.canary_seen == poison_bits(torch.int32)  # the guard's poison word


def test_coverage_counts_are_block_lanes_per_slot():
    words = torch.zeros(2 * COVERAGE_WORDS, dtype=torch.int32)  # a lane: low half, high half
    words[0] = 0b101
    words[2 * 7] = 0b100
    words[2 * 31] = -2**31  # bit 31 (the word is uint32 on the device)
    words[2 * 3 + 1] = 0b10  # slot 33, in lane 3's high half
    counts = coverage_counts(words, 40)
    assert counts[0] == 1 and counts[1] == 0 and counts[2] == 2 and counts[31] == 1
    assert counts[33] == 1 and sum(counts) == 5


def test_sticky_error_marks_target_unusable(fake_target):
    fake_target.ext.fail_with = "CUDA error: an illegal memory access was encountered"
    case = MoECase(8, 8, 2)
    res = run_case(case, fake_target)
    assert [f.signature for f in res.findings] == ["gating:illegal-access"]
    assert res.findings[0].details == {"buffer": "<device>", "index": -1, "size": -1,
                                       "kind": "illegal-address"}
    with pytest.raises(BackendUnavailable, match="restart the process"):
        run_case(case, fake_target)


def test_other_runtime_errors_propagate(fake_target):
    fake_target.ext.fail_with = "topk_ids has shape [1], expected [8, 2]"
    with pytest.raises(RuntimeError, match="expected"):
        run_case(MoECase(8, 8, 2), fake_target)
    fake_target.ext.fail_with = None
    assert run_case(MoECase(8, 8, 2), fake_target).completed  # still usable


# -- on the GPU ------------------------------------------------------------------------------

gpu = pytest.mark.gpu

E_CHOICES = (6, 8, 16, 60, 64, 72, 128, 256, 512)
SWEEP_CHUNKS = 20
SWEEP_PER_CHUNK = 100  # 2,000 cases in all


def random_case(rng: random.Random) -> MoECase:
    """A random legal case (with a fault in a quarter of them) over the issue's ranges."""
    E = rng.choice(E_CHOICES)
    K = 22 if E == 512 and rng.random() < 0.25 else rng.randint(1, min(8, E))
    T = max(1, min(8192, round(2 ** (13 * rng.random() ** 3))))  # mostly small; 15% > 256
    ep = rng.randint(1, min(8, E))
    per_rank = -(-T // ep)
    max_loras = rng.choice((0, 1, 2, 3, 4, 5, 6, 7, 8))
    patches = tuple(
        Patch("gating_logits", rng.choice(("cell", "row")),
              rng.choice(("nan", "inf", "-inf", "huge", "tie", "-0.0")),
              row=rng.randrange(T), col=rng.randrange(E))
        for _ in range(rng.choice((0, 0, 0, 1, 3))))
    faults: tuple[Fault, ...] = ()
    if rng.random() < 0.25:
        boundary = rng.choice(sorted(FAULT_TENSORS))
        tensor = rng.choice(sorted(FAULT_TENSORS[boundary]))
        kinds = [k for k in FAULT_KINDS
                 if not (k in ("nan", "inf") and FAULT_TENSORS[boundary][tensor] == "int")]
        faults = (Fault(boundary, tensor, rng.choice(kinds), fraction=rng.choice((0.0, 0.1)),
                        rows=(rng.randrange(1 << 16),) if rng.random() < 0.5 else (),
                        seed=rng.randrange(1 << 16), bit=rng.randrange(32)),)
    return MoECase(
        T, E, K, scoring=rng.choice(("softmax", "sigmoid")), renormalize=rng.random() < 0.5,
        dtype=rng.choice(("fp32", "fp16", "bf16")), hidden_size=rng.choice((1, 4, 8, 16, 32)),
        block_size=rng.choice((1, 8, 16, 64, 128)), seed=rng.randrange(1 << 20),
        logits=Generated(rng.randrange(1 << 20), rng.choice(DISTRIBUTIONS),
                         rng.choice((1.0, 4.0))),
        correction_bias=Generated(rng.randrange(1 << 20)) if rng.random() < 0.2 else None,
        patches=patches, ep_size=ep,
        max_tokens_per_rank=per_rank + rng.choice((0, 0, 3)),
        max_loras=max_loras,
        adapter_enabled=tuple(rng.random() < 0.8 for _ in range(max_loras)) or None,
        faults=faults)


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Float outputs: NaN where the other has NaN (poison included: a NaN computed from poison
    keeps its payload on the CPU, not on the GPU), values within 1e-4 of the scale."""
    assert a.shape == b.shape, what
    a, b = a.float(), b.float()
    finite = torch.isfinite(a) & torch.isfinite(b)
    scale = float(torch.maximum(a.abs(), b.abs())[finite].max()) if bool(finite.any()) else 0.0
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * (1.0 + scale), equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.equal(a, b), f"{what}: differs at {torch.nonzero(a != b)[:4].tolist()}"


def compare_runs(got: RunResult, want: RunResult) -> None:
    """cuda vs cpu on one case: the same findings; integer outputs equal, floats close;
    gating tie-aware (where the selections differ, downstream stages legitimately differ)."""
    sig = sorted(f.signature for f in got.findings)
    assert sig == sorted(f.signature for f in want.findings), (sig, want.findings)
    assert not any(f.check == "illegal-access" for f in got.findings), got.findings
    if want.lora_out is not None:
        for field in ("sorted_token_ids", "expert_ids", "num_tokens_post_pad"):
            _same(getattr(got.lora_out, field), getattr(want.lora_out, field), field)
    if want.gating_out is not None:
        gi, wi = got.gating_out.topk_ids, want.gating_out.topk_ids
        if not torch.equal(gi, wi):
            from harness import oracle

            values = oracle.selection_values(oracle.scores(want.gating_in.gating_logits,
                                                           want.case.scoring),
                                             want.gating_in.correction_bias)
            rows = torch.nonzero((gi != wi).any(1)).flatten()
            vg = values[rows].gather(1, gi[rows].long()).sort(1).values
            vw = values[rows].gather(1, wi[rows].long()).sort(1).values
            torch.testing.assert_close(vg, vw, rtol=1e-5, atol=1e-6, equal_nan=True)
            return  # a tie decided by rounding: the routing differs from here on
        _close(got.gating_out.topk_weights, want.gating_out.topk_weights, "topk_weights")
    if want.dispatch_out is None:
        return
    for field in ("recv_topk_ids", "recv_token_index", "recv_counters"):
        _same(getattr(got.dispatch_out, field), getattr(want.dispatch_out, field), field)
    _close(got.dispatch_out.recv_hidden, want.dispatch_out.recv_hidden, "recv_hidden")
    _close(got.dispatch_out.recv_topk_weights, want.dispatch_out.recv_topk_weights,
           "recv_topk_weights")
    for g, w in zip(got.ranks, want.ranks, strict=False):
        if w.sort_out is None:
            break
        for field in ("expert_counts", "expert_offsets", "aligned_offsets", "permuted_row",
                      "sorted_token_ids", "expert_ids"):
            _same(getattr(g.sort_out, field), getattr(w.sort_out, field), f"r{g.rank} {field}")
        assert g.sort_out.num_tokens_post_pad == w.sort_out.num_tokens_post_pad
        if w.experts_out is not None:
            _close(g.experts_out.expert_out, w.experts_out.expert_out, f"r{g.rank} expert_out")
            assert g.experts_out.num_launches == w.experts_out.num_launches
        if w.finalize_out is not None:
            _close(g.finalize_out, w.finalize_out, f"r{g.rank} finalize")
    if want.output is not None:
        _close(got.output, want.output, "output")


@pytest.fixture(scope="module")
def cuda_target() -> CudaTarget:
    return CudaTarget()


@gpu
@pytest.mark.slow
@pytest.mark.parametrize("chunk", range(SWEEP_CHUNKS))
def test_differential_sweep(cuda_target, chunk):
    """2,000 random cases: cuda == cpu model, and (through the invariants) the oracle.

    Slow on the CPU side (the model runs every case too): run it with -n 8 on the device."""
    from harness import invariants

    rng = random.Random(0xC0DA + chunk)
    for i in range(SWEEP_PER_CHUNK):
        case = random_case(rng)
        got = execute(case, cuda_target)
        want = run_case(case, CpuTarget())
        if case.faults:  # a legal case must be clean on both (checked on the cuda side)
            want.findings = invariants.check(want)
        try:
            compare_runs(got, want)
            assert any(k.startswith("cuda.") for k in got.coverage)
        except AssertionError as exc:
            raise AssertionError(f"case {chunk}/{i}: {case}\n{exc}") from None


#: (variant(s), demo case, signatures one of which must be found on the GPU)
TRIGGERS = [
    (("topk-nan-argmax",), "graph-padding-nan", {"gating:unique-ids"}),
    (("topk-nan-argmax",), "graph-padding-fallback", {"gating:unique-ids"}),
    (("a2a-unsanitized-padding",), "ep-padding-slots", {"dispatch:padding-sanitized"}),
    (("grid-y-overflow",), "huge-token-count", {"experts:launch-config"}),
    (("lora-grid-off-by-one",), "lora-all-slots",
     {"lora_align:adapter-tokens", "lora_align:no-poison"}),
    (("lora-id-unchecked",), "lora-forged-ids", {"lora_align:illegal-access"}),
]


@gpu
@pytest.mark.parametrize(("bugs", "case_name", "expected"), TRIGGERS,
                         ids=[f"{'+'.join(b)}-{c}" for b, c, _ in TRIGGERS])
def test_variant_trigger_found_on_gpu(cuda_target, bugs, case_name, expected):
    case = demo_cases()[case_name]
    with_bug = {f.signature for f in execute(case, cuda_target, bugs).findings}
    assert with_bug & expected, with_bug
    assert execute(case, cuda_target).findings == []


ISOLATED = textwrap.dedent("""
    import json, os, sys
    from harness.api import execute
    from harness.backends.cuda import CudaTarget
    from harness.demo import demo_cases
    from harness.errors import BackendUnavailable
    target = CudaTarget()
    case = demo_cases()[sys.argv[1]]
    found = [f.to_json() for f in execute(case, target, sys.argv[2:]).findings]
    try:
        execute(case, target)
        after = "usable"
    except BackendUnavailable as exc:
        after = str(exc)
    print(json.dumps({"findings": found, "after": after}), flush=True)
    os._exit(0)  # no teardown of a CUDA context that a sticky error has broken
""")


def run_isolated(case_name: str, bugs: tuple[str, ...]) -> dict:
    """Run a demo case in a fresh process (a sticky CUDA error ends that process's context)
    and, after it, the fixed chain on the same target."""
    proc = subprocess.run([sys.executable, "-c", ISOLATED, case_name, *bugs], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@gpu
def test_disabled_adapter_is_an_illegal_access_in_a_fresh_process(cuda_target):
    """lora-disabled-adapter scatters with a never-written (poison) cumsum row: a wild write,
    an illegal address on the GPU; the target then refuses to go on."""
    out = run_isolated("lora-all-slots", ("lora-disabled-adapter",))
    sigs = {f["signature"] for f in out["findings"]}
    assert "lora_align:illegal-access" in sigs, out
    if any(f["details"].get("kind") == "illegal-address" for f in out["findings"]):
        assert "restart the process" in out["after"]
    assert execute(demo_cases()["lora-all-slots"], cuda_target).findings == []


@gpu
def test_duplicate_break_is_an_illegal_access_in_finalize(cuda_target):
    """Duplicate ids into the three-step sort leave permutation entries unset; the trusting
    finalize dereferences them (a sticky error: run in a fresh process)."""
    out = run_isolated("over-256-duplicates", ("sort-duplicate-break",))
    sigs = {f["signature"] for f in out["findings"]}
    assert {"finalize:illegal-access", "sort_align:no-poison"} <= sigs, out
    assert execute(demo_cases()["over-256-duplicates"], cuda_target).findings == []


@gpu
def test_nan_padding_with_three_step_sort_is_an_illegal_access_in_finalize(cuda_target):
    """vLLM issue 39244 end to end: NaN padding rows -> duplicate ids -> the three-step sort
    leaves permutation entries unset -> finalize dereferences them."""
    out = run_isolated("over-256-duplicates", ("topk-nan-argmax", "sort-duplicate-break"))
    sigs = {f["signature"] for f in out["findings"]}
    assert "finalize:illegal-access" in sigs, out
    assert "restart the process" in out["after"]
    assert execute(demo_cases()["over-256-duplicates"], cuda_target).findings == []


@gpu
def test_redzone_selftest_catches_one_past_end(cuda_target):
    with pytest.raises(IllegalAccess) as info:
        cuda_target.redzone_selftest(numel=1000)
    assert (info.value.buffer, info.value.index, info.value.size, info.value.kind) == (
        "selftest", 1000, 1000, "redzone")
    assert execute(MoECase(16, 8, 2), cuda_target).findings == []  # target still usable


@gpu
@pytest.mark.slow
def test_grid_y_overflow_at_400k_tokens(cuda_target):
    case = MoECase(400_000, 512, 22, block_size=128, seed=9)
    bad = execute(case, cuda_target, ["grid-y-overflow"])
    assert [f.signature for f in bad.findings] == ["experts:launch-config"]
    assert bad.findings[0].details["grid"][1] > 65535
    good = execute(case, cuda_target)
    assert good.findings == [] and good.completed
    assert good.ranks[0].experts_out.num_launches == 2
    assert good.coverage["cuda.experts_chunk"] == 1  # flags: the two launches OR together


@gpu
def test_coverage_slots_named_from_the_header(cuda_target):
    assert cuda_target.slot_names == [f"cuda.{n.lower()}" for n in header_slot_names()]
    res = execute(demo_cases()["over-256-duplicates"], cuda_target)
    assert res.coverage["cuda.sort_three_step"] >= 1
    assert res.coverage["cuda.gating_warp_path"] >= 1


@gpu
def test_second_process_reuses_the_build(cuda_target):
    spec = cuda_build.BuildSpec.default()
    assert list(spec.directory().glob(f"{spec.name}*.so")), "first use left no library"
    code = ("import torch, time; from harness.backends import cuda_build as b; "
            "s = b.BuildSpec.default(); t = time.perf_counter(); "
            "m = b._import_built(s.name, s.directory()); "
            "print(m is not None, time.perf_counter() - t)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    found, seconds = proc.stdout.split()
    assert found == "True" and float(seconds) < 10.0, proc.stderr[-2000:]


# -- concurrent loads: one build under the cache directory's lock --------------------------------

_LOADER = textwrap.dedent("""
    import os, sys, time, types
    from pathlib import Path
    from harness.backends.cuda_build import BuildSpec, load_or_build

    out = Path(sys.argv[1])

    def fake_import(name, directory):
        return types.ModuleType(name) if (directory / "built").exists() else None

    def fake_build(spec):
        d = spec.directory()
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / "building", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # nobody else now
        time.sleep(0.5)
        (d / "built").write_text("ok")
        os.close(fd)
        os.unlink(d / "building")
        with open(out / "builds", "a") as f:
            f.write(f"{os.getpid()}\\n")
        return types.ModuleType(spec.name)

    (out / f"ready-{os.getpid()}").write_text("")
    while not (out / "go").exists():  # every process imported torch: start together
        time.sleep(0.01)
    module = load_or_build(BuildSpec.default(), fake_build, fake_import)
    (out / f"loaded-{os.getpid()}").write_text(module.__name__)
""")


def test_processes_loading_at_once_build_once(tmp_path):
    """Four processes start together on an empty cache: one builds, three wait for its lock
    and import what it built (without the lock, each would find nothing and build)."""
    env = {**os.environ, "MOE_HARNESS_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", _LOADER, str(tmp_path)], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").write_text("")
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert len((tmp_path / "builds").read_text().split()) == 1
    assert len(list(tmp_path.glob("loaded-*"))) == 4


@gpu
def test_device_coverage_is_one_flag_word_per_block(cuda_target):
    """A many-block launch: each slot counts at most COVERAGE_WORDS lanes; a path flag set
    once per launch counts 1."""
    logits = torch.randn((4096, 64), generator=torch.Generator().manual_seed(2))
    logits[::2] = math.nan  # NaN rows in every block: the clamp is taken everywhere
    case = MoECase(4096, 64, 8, seed=2, overrides=Overrides(gating_logits=logits))
    res = execute(case, cuda_target)
    cuda = {k: v for k, v in res.coverage.items() if k.startswith("cuda.")}
    assert cuda["cuda.gating_warp_path"] == 1
    assert 1 < cuda["cuda.gating_clamp_hit"] <= COVERAGE_WORDS
    assert all(0 <= v <= COVERAGE_WORDS for v in cuda.values())
