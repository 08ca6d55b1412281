"""Tests of harness.backends.cuda_graph and cuda_capture: the CUDA-graph padding mode.

Without a GPU: capture-size selection, configuration errors, padding materialisation, the
graph cache and its keys, the eager fallback, and the whole host side of a replay (arena,
static inputs, padded result, redzones, coverage) over the stand-in extension of
test_cuda_backend (on a CPU device a "replay" launches the stand-in eagerly). With a GPU
(marked `gpu`): graph replay against eager runs on random cases, NaN padding caught in padding
rows, stale rows from the previous replay, and the per-execution cost of both.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from test_cuda_backend import E_CHOICES, FakeExtension, _close, header_slot_names

from harness import corpus
from harness.api import execute
from harness.backends import resolve_target
from harness.backends.cuda import CudaTarget
from harness.backends.cuda_capture import Arena, GraphKey, pad_rows
from harness.backends.cuda_graph import (
    DEFAULT_CAPTURE_SIZES,
    GraphConfig,
    GraphRunResult,
    GraphTarget,
    eager_reason,
)
from harness.bugs import BugSet
from harness.case import DISTRIBUTIONS, Fault, Generated, MoECase, Overrides, Patch
from harness.chain.result import RunResult
from harness.chain.runner import run_case
from harness.cli import main
from harness.errors import BackendUnavailable, ConfigError
from harness.memory import is_poison

REPO = Path(__file__).resolve().parents[1]
SIZES = (1, 2, 4, 8, 16, 32)


@pytest.fixture
def host_graph() -> GraphTarget:
    return GraphTarget(SIZES, device="cpu", ext=FakeExtension())


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(("T", "size"), [(1, 1), (3, 4), (4, 4), (5, 8), (17, 32), (32, 32),
                                         (33, None)])
def test_capture_size_is_the_next_size_up(T, size):
    assert GraphConfig(SIZES).capture_size(T) == size


def test_default_capture_sizes_and_normalisation():
    assert DEFAULT_CAPTURE_SIZES == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
    config = GraphConfig([48, 8, 8, 24])
    assert config.capture_sizes == (8, 24, 48) and config.max_size == 48
    assert config.capture_size(9) == 24


@pytest.mark.parametrize(("sizes", "padding", "option", "fragment"), [
    ((), None, "capture_sizes", "at least one"),
    ((0, 4), None, "capture_sizes", "1..65536"),
    ((4, 70000), None, "capture_sizes", "[70000]"),
    ((4, 2.5), None, "capture_sizes", "integers"),
    ((True,), None, "capture_sizes", "integers"),
    (8, None, "capture_sizes", "sequence"),
    ("8", None, "capture_sizes", "sequence"),
    ((8,), "ones", "padding", "stale"),
])
def test_bad_config_is_one_config_error(sizes, padding, option, fragment):
    with pytest.raises(ConfigError) as info:
        GraphConfig(sizes, padding)
    assert info.value.option == option and fragment in str(info.value)


def test_bad_config_fails_before_any_build(monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("built")

    from harness.backends import cuda_build
    monkeypatch.setattr(cuda_build, "load_kernels", no_build)
    with pytest.raises(ConfigError, match="capture_sizes"):
        GraphTarget(())


def test_resolve_target_graph_needs_the_cuda_backend(monkeypatch):
    with pytest.raises(ConfigError, match="needs the cuda backend"):
        resolve_target("cpu", graph=True)
    with pytest.raises(ConfigError, match="needs the cuda backend"):
        resolve_target("cpu", capture_sizes=(1, 2))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from harness.backends import cuda_build
    cuda_build.load_kernels.cache_clear()
    try:
        with pytest.raises(BackendUnavailable, match="needs a CUDA GPU"):
            resolve_target("cuda", graph=True)
    finally:
        cuda_build.load_kernels.cache_clear()


@pytest.mark.parametrize(("changes", "fragment"), [
    (dict(num_tokens=33), "largest capture size 32"),
    (dict(ep_size=2), "all-to-all"),
    (dict(max_loras=2), "LoRA"),
    (dict(faults=(Fault(),)), "faults"),
    (dict(overrides=Overrides(topk_ids=torch.zeros(8, 2, dtype=torch.int32))), "past gating"),
])
def test_cases_outside_graph_scope_run_eagerly(host_graph, changes, fragment):
    case = MoECase(8, 8, 2, seed=1).replace(**changes)
    assert fragment in eager_reason(case, host_graph.config)
    res = run_case(case, host_graph)
    assert type(res) is RunResult and res.ranks  # the inherited eager stages ran
    assert host_graph.stats["eager"] == 1 and host_graph.stats["replays"] == 0
    assert fragment in host_graph.last_eager_reason
    want = run_case(case, CudaTarget(device="cpu", ext=FakeExtension()))
    assert [f.signature for f in res.findings] == [f.signature for f in want.findings]
    if want.output is not None:
        torch.testing.assert_close(res.output, want.output, equal_nan=True)


def test_in_scope_overridden_logits_replay(host_graph):
    case = MoECase(5, 8, 2, overrides=Overrides(gating_logits=torch.randn(5, 8)))
    assert eager_reason(case, host_graph.config) is None
    res = execute(case, host_graph)
    assert isinstance(res, GraphRunResult) and res.findings == []
    assert torch.equal(res.gating_in.gating_logits[:5], case.overrides.gating_logits)


# -- padding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pad_rows_zero_nan_stale(dtype):
    buf = torch.full((8, 3), 7.0, dtype=dtype)
    rows = torch.arange(6, dtype=dtype).view(2, 3)
    stale = pad_rows(buf, rows, 4, "stale")
    assert torch.equal(stale[:2], rows) and bool((stale[2:] == 7).all())
    assert bool((buf[4:] == 7).all())  # past the capture size: untouched
    nan = pad_rows(buf, rows, 4, "nan")
    assert nan.shape == (4, 3) and bool(nan[2:].isnan().all()) and torch.equal(nan[:2], rows)
    zero = pad_rows(buf, rows[:1], 4, "zero")
    assert torch.equal(zero[0], rows[0]) and bool((zero[1:] == 0).all())
    with pytest.raises(ConfigError, match="padding"):
        pad_rows(buf, rows, 4, "ones")


@pytest.mark.parametrize("padding", ["zero", "nan", "stale"])
def test_padded_result_is_a_batch_of_the_capture_size(host_graph, padding):
    case = MoECase(11, 8, 2, seed=4, hidden_size=4, graph_padding=padding)
    res = execute(case, host_graph)
    assert isinstance(res, GraphRunResult) and res.findings == []
    assert (res.capture_size, res.padding, res.source_case) == (16, padding, case)
    assert res.case.num_tokens == 16 and res.case.validate() is res.case
    assert res.output.shape == (16, 4) and res.gating_out.topk_ids.shape == (16, 2)
    assert res.ranks[0].sort_in.topk_ids.shape == (16, 2) and res.dispatch_out is None
    logits, hidden = res.gating_in.gating_logits, res.tensors.hidden_states
    assert torch.equal(logits[:11], res.tensors.gating_logits[:11])
    assert res.case.logits is logits  # the padded case states what gating saw
    if padding == "nan":
        assert bool(logits[11:].isnan().all()) and bool(hidden[11:].isnan().all())
    elif padding == "zero":
        assert bool((logits[11:] == 0).all()) and bool((hidden[11:] == 0).all())


def test_stale_padding_holds_the_previous_replays_rows(host_graph):
    first = execute(MoECase(16, 8, 2, seed=1, hidden_size=4, logits=Generated(1)), host_graph)
    second = execute(MoECase(10, 8, 2, seed=2, hidden_size=4, logits=Generated(2),
                             renormalize=True,
                             graph_padding="stale"), host_graph, ["topk-nan-argmax"])
    assert second.capture_size == 16
    for got, old in ((second.gating_in.gating_logits, first.gating_in.gating_logits),
                     (second.tensors.hidden_states, first.tensors.hidden_states)):
        assert torch.equal(got[10:], old[10:]) and not torch.equal(got[:10], old[:10])
    # the kernels saw those rows: a stale row routes as it did in the previous replay
    assert torch.equal(second.gating_out.topk_ids[10:], first.gating_out.topk_ids[10:])
    # a larger earlier batch leaves its rows for a smaller capture size too
    third = execute(MoECase(3, 8, 2, seed=3, hidden_size=4, graph_padding="stale"), host_graph)
    assert third.capture_size == 4
    assert torch.equal(third.gating_in.gating_logits[3:], second.gating_in.gating_logits[3:4])


def test_nan_padding_with_topk_nan_argmax_is_found_in_padding_rows(host_graph):
    case = MoECase(24, 64, 4, seed=2, graph_padding="nan")
    assert execute(case, host_graph).findings == []
    bad = execute(case, host_graph, ["topk-nan-argmax"])
    found = {f.signature: f for f in bad.findings}
    assert "gating:unique-ids" in found
    assert min(found["gating:unique-ids"].details["rows"]) >= 24  # only padding rows
    assert execute(case, CudaTarget(device="cpu", ext=FakeExtension()),
                   ["topk-nan-argmax"]).findings == []  # eagerly: no padding, nothing found
    assert execute(case.replace(graph_padding="zero"), host_graph,
                   ["topk-nan-argmax"]).findings == []


def test_target_padding_overrides_the_case():
    target = GraphTarget(SIZES, padding="nan", device="cpu", ext=FakeExtension())
    res = execute(MoECase(5, 8, 2, graph_padding="zero"), target)
    assert res.padding == "nan" and bool(res.gating_in.gating_logits[5:].isnan().all())


# -- the graph cache ---------------------------------------------------------------------------


def test_graph_cache_keys(host_graph):
    base = MoECase(5, 8, 2, seed=1)
    key = GraphKey.of(base, 8, BugSet(), True)
    assert (key.capture_size, key.num_experts, key.topk, key.bugs, key.has_bias) == (
        8, 8, 2, 0, False)
    assert GraphKey.of(base.replace(num_tokens=7, seed=9, graph_padding="nan"), 8, BugSet(),
                       True) == key  # batch contents and padding are not baked in
    for other in (GraphKey.of(base, 8, BugSet.of(["topk-nan-argmax"]), True),
                  GraphKey.of(base.replace(topk=3), 8, BugSet(), True),
                  GraphKey.of(base.replace(correction_bias=Generated()), 8, BugSet(), True),
                  GraphKey.of(base, 8, BugSet(), False), GraphKey.of(base, 4, BugSet(), True)):
        assert other != key

    runs = [base, base.replace(num_tokens=7, seed=3), base.replace(num_tokens=6,
                                                                    graph_padding="stale")]
    for case in runs:
        execute(case, host_graph)
    assert (host_graph.stats["captures"], host_graph.stats["replays"]) == (1, 3)
    execute(base, host_graph, ["topk-nan-argmax"])
    execute(base.replace(num_tokens=9), host_graph)
    execute(base.replace(renormalize=True), host_graph)
    assert (host_graph.stats["captures"], host_graph.stats["replays"]) == (4, 6)


def test_graph_cache_is_bounded(monkeypatch, host_graph):
    from harness.backends import cuda_graph

    monkeypatch.setattr(cuda_graph, "MAX_GRAPHS", 2)
    for T in (1, 2, 3, 1):  # sizes 1, 2, 4, then 1 again: evicted, captured again
        execute(MoECase(T, 8, 2), host_graph)
    assert host_graph.stats["captures"] == 4 and len(host_graph._graphs) == 2


# -- the host side of a replay (stand-in extension) --------------------------------------------


def host_cases() -> list[MoECase]:
    rng = random.Random(7)
    cases = []
    for i in range(12):
        E = rng.choice((6, 8, 16, 60, 64))
        T = rng.randint(1, 32)
        cases.append(MoECase(
            T, E, rng.randint(1, min(4, E)), scoring=rng.choice(("softmax", "sigmoid")),
            renormalize=rng.random() < 0.5, dtype=rng.choice(("fp32", "fp16", "bf16")),
            hidden_size=rng.choice((1, 4, 8)), block_size=rng.choice((1, 4, 16)), seed=i,
            correction_bias=Generated(i) if rng.random() < 0.3 else None,
            patches=(Patch("gating_logits", "row", "nan", row=rng.randrange(T)),)
            if rng.random() < 0.3 else (),
            graph_padding=rng.choice(("zero", "nan", "stale"))))
    return cases


def test_host_replay_matches_eager_runs(host_graph):
    eager = CudaTarget(device="cpu", ext=FakeExtension())
    for case in host_cases():
        got, want = execute(case, host_graph), execute(case, eager)
        assert isinstance(got, GraphRunResult), case
        assert got.findings == [] and want.findings == [], (case, got.findings)
        T = case.num_tokens
        assert torch.equal(got.gating_out.topk_ids[:T], want.gating_out.topk_ids)
        torch.testing.assert_close(got.output[:T], want.output, equal_nan=True)
        assert got.coverage["cuda.gating_warp_path"] == 1  # reset before every replay


class WritesPastEnd(FakeExtension):
    """finalize writes one element past `out`; gating (when asked) one element before the
    logits, as a kernel with an off-by-one would."""

    def __init__(self) -> None:
        super().__init__()
        self.past_out = self.before_logits = False

    def gating(self, logits, *args):
        super().gating(logits, *args)
        if self.before_logits:
            logits.as_strided((1,), (1,), logits.storage_offset() - 1).fill_(1.0)

    def finalize(self, expert_out, permuted, weights, out, bugs, coverage):
        super().finalize(expert_out, permuted, weights, out, bugs, coverage)
        if self.past_out:
            out.as_strided((1,), (1,), out.storage_offset() + out.numel()).fill_(1.0)


def test_redzones_in_graph_mode():
    ext = WritesPastEnd()
    target = GraphTarget(SIZES, device="cpu", ext=ext)
    case = MoECase(6, 8, 2, hidden_size=4)
    ext.past_out = True
    res = execute(case, target)
    assert [f.signature for f in res.findings] == ["finalize:illegal-access"]
    assert res.findings[0].details == {"buffer": "out", "index": 32, "size": 32,
                                       "kind": "redzone"}
    rr = res.ranks[0]
    assert rr.experts_out is not None and rr.finalize_out is None and res.output is None
    ext.past_out = False
    assert execute(case, target).findings == []  # the reset restored the canaries

    ext.before_logits = True
    res = execute(case, target)
    assert [f.signature for f in res.findings] == ["gating:illegal-access"]
    assert res.findings[0].details["buffer"] == "gating_logits"
    assert res.findings[0].details["index"] == -1 and res.gating_out is None


def test_arena_layout_and_damage():
    arena = Arena([("a", "gating", (3,), torch.int32, "poison"),
                   ("b", "experts", (2, 2), torch.float16, "zero")], torch.device("cpu"))
    a, b = arena.view(arena.raw, "gating.a"), arena.view(arena.raw, "experts.b")
    base = arena.raw.data_ptr()
    assert (a.data_ptr() - base) % 256 == 0 and (b.data_ptr() - base) % 256 == 0
    assert bool(is_poison(a).all()) and b.tolist() == [[0, 0], [0, 0]]
    assert arena.damage(arena.raw[arena.guard_index]) is None
    raw = arena.raw.clone()
    s = arena.slots["experts.b"]
    raw[s.offset + s.nbytes + 5] = 0  # in b's trail: element 4 + 5 // 2
    raw[arena.slots["gating.a"].offset - 3] = 0  # in a's lead: element -1
    slot, index = arena.damage(raw[arena.guard_index])
    assert (slot.name, index) == ("a", -1)  # the earlier stage first
    raw[arena.slots["gating.a"].offset - 3] = arena.raw[arena.slots["gating.a"].offset - 3]
    slot, index = arena.damage(raw[arena.guard_index])
    assert (slot.name, index) == ("b", 6)
    arena.raw.fill_(0)
    arena.reset()
    assert torch.equal(arena.raw, arena.image)


def test_sticky_error_in_a_replay_is_stage_graph(host_graph):
    host_graph.ext.fail_with = "CUDA error: an illegal memory access was encountered"
    res = execute(MoECase(6, 8, 2), host_graph)
    assert [f.signature for f in res.findings] == ["graph:illegal-access"]
    assert res.findings[0].details["kind"] == "illegal-address"
    with pytest.raises(BackendUnavailable, match="restart the process"):
        execute(MoECase(6, 8, 2), host_graph)


def test_coverage_off_in_graph_mode():
    target = GraphTarget(SIZES, device="cpu", ext=FakeExtension(), coverage=False)
    res = execute(MoECase(6, 8, 2), target)
    assert res.findings == [] and not any(k.startswith("cuda.") for k in res.coverage)
    assert target.slot_names == [f"cuda.{n.lower()}" for n in header_slot_names()]


def test_graph_padding_survives_the_corpus(tmp_path, host_graph):
    path = corpus.save(MoECase(5, 8, 2, graph_padding="nan"), tmp_path)
    case, _ = corpus.load(path)
    assert case.graph_padding == "nan"
    assert execute(case, host_graph).padding == "nan"


def test_the_build_without_coverage_is_its_own_build():
    """The instrumentation-cost baseline: same sources, NO_COVERAGE_FLAG on the C++ and CUDA
    flags, another name and cache directory; the header switches on that define."""
    from harness.backends import cuda_build

    on, off = cuda_build.BuildSpec.default(), cuda_build.BuildSpec.default(coverage=False)
    assert on.sources == off.sources and on.headers == off.headers
    assert cuda_build.NO_COVERAGE_FLAG not in on.cflags + on.cuda_cflags
    assert cuda_build.NO_COVERAGE_FLAG in off.cflags and cuda_build.NO_COVERAGE_FLAG in \
        off.cuda_cflags
    assert off.name != on.name and off.directory() != on.directory()
    define = cuda_build.NO_COVERAGE_FLAG.removeprefix("-D")
    header = (REPO / "kernels" / "moe_harness.h").read_text()
    assert f"#ifdef {define}\nconstexpr bool kCoverageCompiled = false;" in header
    assert f"#ifdef {define}" in (REPO / "kernels" / "instrument.cuh").read_text()


# -- the CLI -----------------------------------------------------------------------------------


def test_cli_graph_needs_the_cuda_backend(tmp_path, capsys, monkeypatch):
    path = corpus.save(MoECase(8, 8, 2), tmp_path)
    assert main(["run", str(path), "--graph"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs the cuda backend" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from harness.backends import cuda_build
    cuda_build.load_kernels.cache_clear()
    try:
        assert main(["run", str(path), "--graph", "--backend", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
    finally:
        cuda_build.load_kernels.cache_clear()


def test_cli_graph_run_reports_the_capture(tmp_path, capsys, monkeypatch):
    import harness.backends as backends

    monkeypatch.setattr(backends, "resolve_target", lambda name, graph=False: GraphTarget(
        SIZES, device="cpu", ext=FakeExtension()))
    path = corpus.save(MoECase(24, 64, 4, seed=2, graph_padding="nan"), tmp_path)
    assert main(["run", str(path), "--graph", "--backend", "cuda",
                 "--bug", "topk-nan-argmax"]) == 1
    text = capsys.readouterr().out
    assert "capture size 32" in text and "nan padding" in text and "gating:unique-ids" in text
    path = corpus.save(MoECase(40, 8, 2), tmp_path)
    assert main(["run", str(path), "--graph", "--backend", "cuda"]) == 0
    assert "ran eagerly: num_tokens = 40" in capsys.readouterr().out


# -- on the GPU --------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def graph_target() -> GraphTarget:
    return GraphTarget()


@pytest.fixture(scope="module")
def eager_target() -> CudaTarget:
    return CudaTarget()


def random_graph_case(rng: random.Random) -> MoECase:
    """A random legal case in graph scope: ep_size 1, no LoRA, no faults, T <= 512."""
    E = rng.choice(E_CHOICES)
    K = 22 if E == 512 and rng.random() < 0.25 else rng.randint(1, min(8, E))
    T = rng.randint(1, 512) if rng.random() < 0.3 else rng.randint(1, 64)
    patches = tuple(Patch("gating_logits", rng.choice(("cell", "row")),
                          rng.choice(("nan", "inf", "-inf", "huge", "tie")),
                          row=rng.randrange(T), col=rng.randrange(E))
                    for _ in range(rng.choice((0, 0, 1, 3))))
    return MoECase(
        T, E, K, scoring=rng.choice(("softmax", "sigmoid")), renormalize=rng.random() < 0.5,
        dtype=rng.choice(("fp32", "fp16", "bf16")), hidden_size=rng.choice((1, 4, 8, 32)),
        block_size=rng.choice((1, 8, 16, 64)), seed=rng.randrange(1 << 20),
        logits=Generated(rng.randrange(1 << 20), rng.choice(DISTRIBUTIONS), 1.0),
        correction_bias=Generated(rng.randrange(1 << 20)) if rng.random() < 0.2 else None,
        patches=patches, graph_padding=rng.choice(("zero", "nan", "stale")))


@gpu
@pytest.mark.parametrize("chunk", range(4))
def test_graph_replay_agrees_with_eager_runs(graph_target, eager_target, chunk):
    """50 random in-scope cases per chunk: the same findings (the fixed chain: none, padding
    rows included), the same routing of the real rows (same kernels, same rows), outputs of
    the real rows close."""
    rng = random.Random(0x6A4 + chunk)
    for i in range(50):
        case = random_graph_case(rng)
        got, want = execute(case, graph_target), execute(case, eager_target)
        try:
            assert isinstance(got, GraphRunResult)
            assert sorted(f.signature for f in got.findings) == sorted(
                f.signature for f in want.findings), (got.findings, want.findings)
            T = case.num_tokens
            assert torch.equal(got.gating_out.topk_ids[:T], want.gating_out.topk_ids)
            _close(got.output[:T], want.output, "output")
            assert got.coverage["cuda.gating_warp_path"] + \
                got.coverage["cuda.gating_fallback_path"] == 1
        except AssertionError as exc:
            raise AssertionError(f"case {chunk}/{i}: {case}\n{exc}") from None


@gpu
@pytest.mark.parametrize(("E", "scoring"), [(64, "softmax"), (60, "sigmoid")])
def test_nan_padding_with_topk_nan_argmax_caught_in_graph_mode(graph_target, eager_target, E,
                                                               scoring):
    """Warp (E = 64) and fallback (E = 60) paths: a case with no NaN of its own, NaN in its
    padding rows."""
    case = MoECase(24, E, 4, scoring=scoring, seed=2, graph_padding="nan")
    bad = execute(case, graph_target, ["topk-nan-argmax"])
    found = {f.signature: f for f in bad.findings}
    assert "gating:unique-ids" in found, bad.findings
    assert min(found["gating:unique-ids"].details["rows"]) >= 24
    assert execute(case, eager_target, ["topk-nan-argmax"]).findings == []
    assert execute(case, graph_target).findings == []


@gpu
@pytest.mark.parametrize("padding", ["zero", "nan", "stale"])
@pytest.mark.parametrize("case", [
    MoECase(24, 64, 4, seed=2),
    MoECase(13, 60, 4, scoring="sigmoid", renormalize=True, dtype="bf16", seed=3),
    MoECase(300, 128, 8, seed=5, block_size=64, correction_bias=Generated(1)),  # three-step sort
    MoECase(100, 512, 22, seed=6, dtype="fp16", hidden_size=16),
], ids=["warp", "fallback-sigmoid", "three-step-sort", "e512-k22"])
def test_fixed_chain_is_clean_with_every_padding(graph_target, case, padding):
    res = execute(case.replace(graph_padding=padding), graph_target)
    assert isinstance(res, GraphRunResult) and res.findings == [], res.findings
    assert res.completed and res.output.shape[0] == res.capture_size


@gpu
def test_stale_padding_reproduces_the_previous_replay(graph_target):
    first = execute(MoECase(16, 64, 4, seed=11, logits=Generated(1)), graph_target)
    second = execute(MoECase(10, 64, 4, seed=11, logits=Generated(2), graph_padding="stale"),
                     graph_target)
    assert not torch.equal(second.gating_in.gating_logits[:10], first.gating_in.gating_logits[:10])
    assert second.capture_size == 16
    assert torch.equal(second.gating_in.gating_logits[10:], first.gating_in.gating_logits[10:])
    # the device read them: the padding rows route exactly as those rows did before
    assert torch.equal(second.gating_out.topk_ids[10:], first.gating_out.topk_ids[10:])
    torch.testing.assert_close(second.output[10:], first.output[10:])


@gpu
def test_coverage_resets_between_replays(graph_target):
    case = MoECase(300, 64, 8, seed=5)
    one, two = execute(case, graph_target), execute(case, graph_target)
    cuda = {k: v for k, v in one.coverage.items() if k.startswith("cuda.")}
    assert cuda["cuda.sort_three_step"] == 1 and cuda["cuda.gating_warp_path"] == 1
    assert cuda == {k: v for k, v in two.coverage.items() if k.startswith("cuda.")}


@gpu
def test_replay_is_cheaper_than_an_eager_run(graph_target, eager_target):
    """Per execution, without the invariant checks (printed; no timing assertion)."""
    case = MoECase(64, 128, 8, seed=1)
    seconds = {}
    for name, target in (("eager", eager_target), ("graph", graph_target)):
        run_case(case, target)  # warm-up (and capture)
        start = time.perf_counter()
        for _ in range(20):
            res = run_case(case, target)
        seconds[name] = (time.perf_counter() - start) / 20
        assert res.output is not None and not res.findings
    print(f"per execution: eager {seconds['eager'] * 1e3:.2f} ms, "
          f"graph {seconds['graph'] * 1e3:.2f} ms")


ISOLATED = textwrap.dedent("""
    import json, os, sys
    from harness.api import execute
    from harness.backends.cuda_graph import GraphTarget
    from harness.case import MoECase
    case = MoECase(300, 64, 8, seed=5, graph_padding="nan")
    res = execute(case, GraphTarget(), ["topk-nan-argmax", "sort-duplicate-break"])
    print(json.dumps([f.to_json() for f in res.findings]), flush=True)
    os._exit(0)
""")


@gpu
def test_nan_padding_alone_reproduces_vllm_39244_in_a_fresh_process(graph_target):
    """300 clean rows padded to 512 with NaN: the padding rows' duplicate ids reach the
    three-step sort; with both variants on, an illegal access or its redzone/poison trace."""
    proc = subprocess.run([sys.executable, "-c", ISOLATED], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
    sigs = {f["signature"] for f in json.loads(proc.stdout.strip().splitlines()[-1])}
    assert sigs & {"graph:illegal-access", "finalize:illegal-access",
                   "sort_align:permutation-bijection", "sort_align:no-poison"}, sigs
    assert execute(MoECase(300, 64, 8, seed=5, graph_padding="nan"), graph_target).findings == []
