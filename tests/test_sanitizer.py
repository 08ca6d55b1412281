"""harness.sanitizer: command construction, the replay process's markers, mapping reports to
case and stage, crash isolation, time-outs, unavailability, the replay and triage CLI.

CPU tests drive the real replay process (cpu backend) under a stand-in compute-sanitizer
(tests/sanitizer_fake.py) that prints records at chosen (case, stage) points. GPU tests (marked
`gpu`) run the real tool on the bundled kernels.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest
import torch

from harness import corpus
from harness.case import MoECase
from harness.cli import main
from harness.corpus.format import CaseMeta, Expectation
from harness.errors import HarnessError, SanitizerUnavailable, UnknownVariant
from harness.sanitizer.run import (
    CHILD_ENV,
    SanitizerConfig,
    build_command,
    child_env,
    find_sanitizer,
    replay_under_sanitizer,
    sanitize_in_background,
    small_cases,
)

FAKE = Path(__file__).with_name("sanitizer_fake.py")


@pytest.fixture
def fake_sanitizer(tmp_path, monkeypatch):
    """A `compute-sanitizer` on PATH that runs tests/sanitizer_fake.py."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "compute-sanitizer"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE}" "$@"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    for var in ("FAKE_MODE", "FAKE_CASE", "FAKE_ERROR_AT", "FAKE_ONLY_WITH_BUGS"):
        monkeypatch.delenv(var, raising=False)
    return exe


@pytest.fixture
def three_cases(tmp_path):
    """Three small cases on disk, in replay order."""
    d = tmp_path / "cases"
    return [corpus.save(MoECase(8 + 4 * i, 8, 2, seed=i), d) for i in range(3)]


def test_command_has_tool_xml_save_and_the_replay(fake_sanitizer, tmp_path):
    cfg = SanitizerConfig(tool="initcheck", extra_args=("--racecheck-report", "all"))
    argv = build_command(cfg, tmp_path / "m.json", tmp_path / "out.xml")
    assert argv[0] == str(fake_sanitizer)
    assert argv[argv.index("--tool") + 1] == "initcheck"
    assert "--xml" in argv and argv[argv.index("--xml") + 1] == "--save"  # a flag in 2025.x
    assert argv[argv.index("--save") + 1] == str(tmp_path / "out.xml")
    assert argv[-3:] == ["-m", "harness.sanitizer.child", str(tmp_path / "m.json")]
    assert argv.index("--racecheck-report") < argv.index("-m")
    assert argv[argv.index("--check-exit-code") + 1] == "no"  # exit 3 is protocol
    assert build_command(None, tmp_path / "m.json", None)[1:] == [
        "-m", "harness.sanitizer.child", str(tmp_path / "m.json")]


def test_child_env_disables_the_caching_allocator(monkeypatch):
    monkeypatch.setenv("PYTORCH_NO_CUDA_MEMORY_CACHING", "0")
    env = child_env()
    assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" == CHILD_ENV[
        "PYTORCH_NO_CUDA_MEMORY_CACHING"]
    assert str(Path(__file__).resolve().parents[1]) in env["PYTHONPATH"].split(os.pathsep)


def test_missing_sanitizer_is_one_clear_error(tmp_path, monkeypatch, three_cases):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr("harness.sanitizer.run._DEFAULT_ROOTS", ())
    with pytest.raises(SanitizerUnavailable, match=r"compute-sanitizer not found.*CUDA_HOME"):
        find_sanitizer()
    with pytest.raises(SanitizerUnavailable, match="not found"):
        replay_under_sanitizer(three_cases, "memcheck",
                               config=SanitizerConfig(executable=str(tmp_path / "nope")))


def test_found_under_cuda_home(tmp_path, monkeypatch):
    exe = tmp_path / "cuda" / "bin" / "compute-sanitizer"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert find_sanitizer() == str(exe)


def test_unknown_tool_and_variant_fail_before_running(fake_sanitizer, three_cases):
    with pytest.raises(SanitizerUnavailable, match="unknown compute-sanitizer tool 'leakcheck'"):
        replay_under_sanitizer(three_cases, "leakcheck")
    with pytest.raises(UnknownVariant):
        replay_under_sanitizer(three_cases, "memcheck", bugs=["no-such-bug"])
    with pytest.raises(HarnessError, match="no such case"):
        replay_under_sanitizer([three_cases[0].parent / "missing.json"], "memcheck")


def test_unsupported_device_is_one_clear_error(fake_sanitizer, three_cases, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "unsupported")
    with pytest.raises(SanitizerUnavailable, match="Device not supported"):
        replay_under_sanitizer(three_cases, "memcheck", backend="cpu")


def test_reports_map_to_case_and_stage(fake_sanitizer, three_cases, monkeypatch):
    """Records printed while case 1's sort_align and case 2's gating and dispatch ran land
    there; a torch kernel (not in the kernel table) takes the stage from the markers, a kernel
    of ours keeps the table's stage (case 0's record names finalize's kernel). A `MoECase` is
    replayed like a file."""
    monkeypatch.setenv("FAKE_ERROR_AT", "0:combine,1:sort_align,2:gating,2:dispatch")
    monkeypatch.setenv("FAKE_KERNEL_COMBINE", "finalize_unpermute_reduce(const float *)")
    run = replay_under_sanitizer([*three_cases[:2], MoECase(16, 8, 2, seed=2)], "memcheck",
                                 backend="cpu")
    assert run.processes == 1 and not run.truncated and not run.problems
    placed = [(r.case, r.stage, r.kernel, r.mapped_by) for r in run.reports]
    assert placed == [(0, "finalize", "finalize_unpermute_reduce", "markers"),
                      (1, "sort_align", "sort_merge", "markers"),
                      (2, "gating", "topk_gating_warp", "markers"),
                      (2, "dispatch", "index_elementwise_kernel", "markers")]
    assert [len(c.reports) for c in run.cases] == [1, 1, 2]
    assert [c.status for c in run.cases] == ["clean"] * 3
    rep = run.cases[1].reports[0]
    assert (rep.kind, rep.access_size, rep.block, rep.thread) == (
        "invalid-global-write-out-of-bounds", 4, (1, 0, 0), (3, 0, 0))
    assert rep.signature == "memcheck:invalid-global-write-out-of-bounds:sort_merge@sort_align"
    assert (rep.nearest.distance, rep.nearest.side, rep.nearest.size) == (4, "after", 1024)
    assert run.bad and all(c.bad for c in run.cases)


def test_truncated_xml_from_the_background(fake_sanitizer, three_cases, monkeypatch):
    """The fuzzer's entry point: a Future of the run; a cut XML file keeps its complete
    records and the run says it was cut."""
    monkeypatch.setenv("FAKE_MODE", "truncate")
    monkeypatch.setenv("FAKE_ERROR_AT", "0:gating,1:gating")
    fut = sanitize_in_background(three_cases[:2], "memcheck", backend="cpu")
    run = fut.result(timeout=300)
    assert run.truncated and any("cut short" in p for p in run.problems)
    assert [(r.case, r.stage) for r in run.reports] == [(0, "gating")]


def test_crash_and_hang_are_isolated_and_the_rest_run(fake_sanitizer, three_cases, tmp_path,
                                                      monkeypatch):
    """Case 1 crashes its process, case 2 hangs past the time-out: each costs its own case;
    a new process runs what is left."""
    cases = [*three_cases, corpus.save(MoECase(8, 4, 1, seed=7), tmp_path / "more")]
    monkeypatch.setenv("FAKE_KILL_CASE", "1")
    monkeypatch.setenv("FAKE_HANG_CASE", "2")
    run = replay_under_sanitizer(cases, "memcheck", backend="cpu",
                                 config=SanitizerConfig(case_timeout_s=1.5))
    assert [c.status for c in run.cases] == ["clean", "crashed", "timeout", "clean"]
    assert run.processes == 3
    assert "died" in run.cases[1].message and "hang" in run.cases[2].message
    assert run.bad and not run.cases[3].bad


def test_record_before_a_lost_context_stays_with_its_case(fake_sanitizer, three_cases,
                                                         tmp_path, monkeypatch):
    """memcheck on lora-disabled-adapter as in tests/fixtures/sanitizer/disabled_memcheck.xml:
    an invalid write in case 1's lora_align, the CUDA context lost after that case (exit 3),
    case 2 in a second process with its own XML file. The first process's record is kept,
    placed at case 1 by the Python frames of its host backtrace; no problem is reported."""
    from harness.demo import demo_cases

    lora = corpus.save(demo_cases()["lora-all-slots"], tmp_path / "lora")
    monkeypatch.setenv("FAKE_ERROR_AT", "1:lora_align")
    monkeypatch.setenv("FAKE_LOSE_CONTEXT_CASE", "1")
    monkeypatch.setenv("FAKE_PY_FRAMES", "1")
    run = replay_under_sanitizer([three_cases[0], lora, three_cases[2]], "memcheck",
                                 backend="cpu", bugs=("lora-disabled-adapter",),
                                 redzones=False)
    errs = [r for r in run.reports if r.kind.startswith("invalid")]
    assert [(r.case, r.stage, r.kernel, r.mapped_by) for r in errs] == [
        (1, "lora_align", "lora_count_and_sort", "host-frames")]
    assert run.processes == 2 and not run.problems and not run.truncated
    assert [c.status for c in run.cases] == ["clean", "findings", "clean"]
    assert run.cases[1].errors == errs and not run.cases[2].reports


def test_cases_with_their_own_variants_share_one_process(fake_sanitizer, three_cases,
                                                          monkeypatch):
    """(case, variants) pairs: each case runs with its own variants, all in one process (the
    stand-in prints records only for cases with variants on); a bad name fails first."""
    monkeypatch.setenv("FAKE_ERROR_AT", "0:gating,1:gating,2:gating")
    monkeypatch.setenv("FAKE_ONLY_WITH_BUGS", "1")
    run = replay_under_sanitizer([three_cases[0], (three_cases[1], ["topk-nan-argmax"]),
                                  (three_cases[2], ())], "memcheck", backend="cpu")
    assert run.processes == 1
    assert [c.bugs for c in run.cases] == [(), ("topk-nan-argmax",), ()]
    assert [(r.case, r.stage) for r in run.reports] == [(1, "gating")]
    with pytest.raises(UnknownVariant):
        replay_under_sanitizer([(three_cases[0], ["no-such-bug"])], "memcheck", backend="cpu")


def _unpoisoned_cpu_target(backend: str, *, coverage: bool = True, checks: bool = True):
    """The cpu backend standing in for the cuda backend: with `checks` off, lora_align's
    never-written entries read as zeros (fresh device memory), not poison."""
    from harness.backends.cpu import CpuTarget
    from harness.chain.lora_align import LoraAlignOutput
    from harness.memory import is_poison

    class Unpoisoned(CpuTarget):
        def lora_align(self, inp, ctx):
            out = super().lora_align(inp, ctx)
            if self.checks:
                return out
            return LoraAlignOutput(*(torch.where(is_poison(t), 0, t) for t in (
                out.sorted_token_ids, out.expert_ids, out.num_tokens_post_pad)))

    target = Unpoisoned()
    target.checks = checks
    return target


@pytest.mark.parametrize("checks", [False, True])
def test_poison_checks_are_set_aside_without_poison(checks, tmp_path, monkeypatch, capsys):
    """The seed with a disabled adapter (as corpus/seeds/d4e8b2cc42afb535.json), replayed
    with poison off: lora_align:disabled-untouched fires on the untouched row, which holds
    fresh memory, not poison. The replay sets it aside; the parent reads a clean case that
    carries it. With poison on the case is clean and nothing is set aside."""
    from harness.sanitizer import child
    from harness.sanitizer.run import CaseResult, SanitizerRun, _interpret, _line_event, _ProcessLog

    path = corpus.save(MoECase(16, 8, 2, seed=9, max_loras=3,
                               adapter_enabled=(True, False, True)), tmp_path)
    monkeypatch.setattr(child, "resolve_target", _unpoisoned_cpu_target)
    assert child.replay({"backend": "cuda", "bugs": [], "checks": checks,
                                    "cases": [{"index": 0, "path": str(path)}]}) == 0
    log = _ProcessLog(returncode=0)
    for line in capsys.readouterr().out.splitlines():
        _line_event(line, log)
    cases = {0: CaseResult(0, str(path))}
    _interpret(log, None, None, cases, SanitizerRun(None, list(cases.values())))
    assert cases[0].status == "clean" and cases[0].findings == []
    assert [f["signature"] for f in cases[0].set_aside] == (
        [] if checks else ["lora_align:disabled-untouched"])
    assert {f["check"] for f in cases[0].set_aside} <= child.POISON_CHECKS


def test_poison_checks_are_invariant_names():
    """Every name set aside without poison is a check the invariants report."""
    from harness import invariants
    from harness.sanitizer.child import POISON_CHECKS

    source = "".join(Path(m.__file__).read_text() for m in (
        invariants.layout, invariants.routing, invariants.compute))
    assert all(f'rep.add("{name}"' in source for name in POISON_CHECKS)


def test_small_cases_leave_out_large_buffers(tmp_path):
    """The chunked-launch shape (2,048 rows x K = 32 per rank) is left out, a 16-token case
    kept; the bound is the buffers' estimated bytes."""
    small = corpus.save(MoECase(16, 8, 2, seed=1), tmp_path / "c")
    large = corpus.save(MoECase(2, 32, 32, ep_size=2, max_tokens_per_rank=1024, block_size=1,
                                hidden_size=1), tmp_path / "c")
    assert small_cases([tmp_path / "c"]) == ([small], [large])
    kept, left = small_cases([small, large], max_bytes=1 << 30)
    assert kept == [small, large] and left == []


def test_startup_hang_times_out_every_case(fake_sanitizer, three_cases, monkeypatch):
    monkeypatch.setenv("FAKE_MODE", "hang-startup")
    cfg = SanitizerConfig(startup_timeout_s=0.5)
    run = replay_under_sanitizer(three_cases, "memcheck", backend="cpu", config=cfg)
    assert [c.status for c in run.cases] == ["timeout"] * 3 and run.processes == 1


def test_cuda_target_without_checks_allocates_bare_buffers():
    """checks=False (sanitizer-only runs): outputs are plain allocations (no guard bands, no
    poison, nothing checked after the launch), inputs plain device copies."""
    from harness.backends.cuda import CudaTarget, _Launch
    from harness.chain import StageContext

    class Ext:
        def coverage_slot_names(self) -> list[str]:
            return []

    bare = _Launch(CudaTarget("cpu", coverage=False, ext=Ext(), checks=False), "gating",
                   StageContext())
    out = bare.output("topk_ids", (3, 4), torch.int32)
    assert out.shape == (3, 4) and out.untyped_storage().nbytes() == 48 and not bare.buffers
    src = torch.arange(5, dtype=torch.int32)
    copy = bare.input("lora_ids", src)
    assert torch.equal(copy, src) and copy.data_ptr() != src.data_ptr()
    guarded = _Launch(CudaTarget("cpu", coverage=False, ext=Ext()), "gating", StageContext())
    assert guarded.output("topk_ids", (3, 4), torch.int32).untyped_storage().nbytes() > 48


def test_cli_replay_exit_codes(tmp_path, capsys):
    from harness.case import Patch

    clean = corpus.save(MoECase(16, 8, 2, seed=1), tmp_path / "c")
    nan = corpus.save(MoECase(8, 8, 2, patches=(Patch("gating_logits", "row", "nan", row=3),)),
                      tmp_path / "c")
    assert main(["replay", str(tmp_path / "c"), "--bug", "topk-nan-argmax"]) == 1
    text = capsys.readouterr().out
    assert "gating:unique-ids" in text and f"{clean}: clean" in text and str(nan) in text
    assert main(["replay", str(tmp_path / "nothing")]) == 2
    assert "no such case" in capsys.readouterr().err


def test_cli_replay_of_a_dir_reports_an_unreadable_file_and_replays_the_rest(tmp_path, capsys):
    cases = [corpus.save(MoECase(8 + i, 8, 2, seed=i), tmp_path / "c") for i in range(2)]
    bad = tmp_path / "c" / "0000000000000000.json"
    bad.write_text("{not json")
    assert main(["replay", str(tmp_path / "c")]) == 1  # the bad file counts: a failed replay
    lines = capsys.readouterr().out.splitlines()
    for c in cases:
        assert any(f"{c}: clean" in line for line in lines)
    [line] = [ln for ln in lines if str(bad) in ln]
    assert "unreadable" in line and "JSON" in line
    # named on its own, a bad file is bad input
    assert main(["replay", str(bad)]) == 2


def test_cli_triage_groups_and_attaches(fake_sanitizer, tmp_path, capsys, monkeypatch):
    """Two findings with one root cause, one with none (another variant set: another
    process); the reports go into the metadata, which keeps what it had."""
    d = tmp_path / "findings"
    meta = CaseMeta(origin="fuzz", signature="gating:unique-ids",
                    expect=(Expectation("cpu", ("topk-nan-argmax",), "gating:unique-ids"),))
    paths = [corpus.save(MoECase(8 + i, 8, 2, seed=i), d / "gating__unique-ids", meta)
             for i in range(2)]
    other = corpus.save(MoECase(32, 8, 2, seed=9), d / "other",
                        CaseMeta(origin="fuzz", signature="sort_align:no-poison"))
    # records in the gating stage of cases 0 and 1 of the replay with topk-nan-argmax on
    monkeypatch.setenv("FAKE_ERROR_AT", "0:gating,1:gating")
    monkeypatch.setenv("FAKE_ONLY_WITH_BUGS", "1")
    monkeypatch.setattr("harness.sanitizer.triage.BASE_TOOLS", ("memcheck",))  # one process per set
    assert main(["triage", str(d), "--backend", "cpu"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 2, lines
    assert lines[0].split()[0] == "2" and "memcheck:invalid-global-write-out-of-bounds:" \
        "topk_gating_warp@gating" in lines[0] and "[gating:unique-ids]" in lines[0]
    assert lines[1].split()[0] == "1" and "no sanitizer error (sort_align:no-poison)" in lines[1]
    _, m = corpus.load(paths[0])
    assert m.extra["sanitizer"]["memcheck"]["errors"] == 1
    assert m.extra["sanitizer"]["memcheck"]["reports"][0]["kernel"] == "topk_gating_warp"
    assert m.signature == "gating:unique-ids" and m.expect == meta.expect
    _, m_other = corpus.load(other)
    assert m_other.extra["sanitizer"]["memcheck"] == {"status": "clean", "errors": 0,
                                                      "reports": []}
    assert main(["triage", str(d), "--backend", "cpu", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tools"] == ["memcheck"] and [g["count"] for g in doc["groups"]] == [2, 1]
    assert doc["groups"][0]["findings"][0]["reports"][0]["kernel"] == "topk_gating_warp"


def test_cli_triage_empty_dir_is_bad_input(tmp_path, capsys):
    assert main(["triage", str(tmp_path)]) == 2
    assert "no finding files" in capsys.readouterr().err


# -- GPU: the real tool on the bundled kernels ---------------------------------------------------

gpu = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
#: variants whose effect is a memory error, and the stages a sanitizer report must name
MEMORY_VARIANTS = {
    ("sort-duplicate-break",): {"sort_align", "finalize"},
    ("lora-grid-off-by-one",): {"lora_align"},
    ("lora-id-unchecked",): {"lora_align"},
    ("lora-disabled-adapter",): {"lora_align"},
    ("sort-duplicate-break", "topk-nan-argmax"): {"sort_align", "finalize"},
}
#: variants named a memory error in issue 5 that make none on our chain, and the invariant that
#: catches them: a2a-unsanitized-padding leaves an earlier step's expert ids, in [0, 2E), in
#: the receive buffer's padding slots; the fixed sort skips the ids outside the rank's experts
#: (as vLLM's moe_align_block_size skips ids outside [0, E)), and an id inside routes a padding
#: row, which lies inside the receive buffer: nothing out of bounds for memcheck, and the
#: experts stage reads an initialised host round-trip of that buffer, nothing for initcheck
#: (measured on an H200: neither tool reported anything the fixed chain does not)
INVARIANT_ONLY = {("a2a-unsanitized-padding",): "dispatch:padding-sanitized"}


def _trigger_cases(bugs: tuple[str, ...], tmp_path: Path) -> list[Path]:
    """corpus/bugs/<variant>[+<variant>]/ for exactly this variant set where present, else
    every demo case (the harness does not know which case triggers which variant)."""
    found = [p for d in sorted((REPO / "corpus" / "bugs").glob("*"))
             if d.is_dir() and set(d.name.split("+")) == set(bugs)
             for p in corpus.iter_corpus(d)]
    if found:
        return found
    from harness.demo import demo_cases

    return [corpus.save(c, tmp_path / "demo") for name, c in demo_cases().items()
            if name != "huge-token-count"]


def _sanitizer_here() -> bool:
    try:
        find_sanitizer()
    except SanitizerUnavailable:
        return False
    return torch.cuda.is_available()


needs_sanitizer = pytest.mark.skipif(not _sanitizer_here(),
                                     reason="needs compute-sanitizer and a GPU")


def _error_signatures(run) -> set[str]:
    return {r.signature for r in run.reports if r.level == "error"}


@gpu
@needs_sanitizer
@pytest.mark.slow
@pytest.mark.parametrize("bugs", sorted(MEMORY_VARIANTS), ids="+".join)
def test_memory_variant_caught_by_the_sanitizer_alone(bugs, tmp_path):
    """Redzones and poison off: memcheck or initcheck reports, on the variant's trigger cases,
    an error the fixed chain does not have on the same cases, in an expected stage."""
    cases = _trigger_cases(bugs, tmp_path)
    new: set[tuple[str | None, str]] = set()
    for tool in ("memcheck", "initcheck"):
        fixed = _error_signatures(replay_under_sanitizer(cases, tool, redzones=False))
        run = replay_under_sanitizer(cases, tool, bugs=bugs, redzones=False)
        new |= {(r.stage, r.signature) for r in run.reports
                if r.level == "error" and r.signature not in fixed}
    assert {stage for stage, _ in new} & MEMORY_VARIANTS[bugs], (bugs, sorted(new, key=str))


@gpu
@needs_sanitizer
@pytest.mark.slow
@pytest.mark.parametrize("bugs", sorted(INVARIANT_ONLY), ids="+".join)
def test_variant_without_memory_error_is_caught_by_its_invariant(bugs, tmp_path):
    """Redzones and poison off: memcheck and initcheck report nothing the fixed chain does not
    on the variant's trigger cases (see INVARIANT_ONLY for why); the replay under each tool
    still finds the variant through its invariant."""
    cases = _trigger_cases(bugs, tmp_path)
    for tool in ("memcheck", "initcheck"):
        fixed = _error_signatures(replay_under_sanitizer(cases, tool, redzones=False))
        run = replay_under_sanitizer(cases, tool, bugs=bugs, redzones=False)
        new = sorted(str(r) for r in run.reports
                     if r.level == "error" and r.signature not in fixed)
        found = {f["signature"] for c in run.cases for f in c.findings}
        assert not new and INVARIANT_ONLY[bugs] in found, (tool, new, sorted(found))


@gpu
@needs_sanitizer
@pytest.mark.slow
@pytest.mark.parametrize("tool,redzones", [("memcheck", False), ("racecheck", False),
                                           ("synccheck", False), ("initcheck", True),
                                           ("initcheck", False)])
def test_fixed_chain_is_clean_under_every_tool(tool, redzones, tmp_path):
    """The seed corpus on the fixed chain: no error under any tool, every case clean.

    initcheck without poison may only report the harness's own copies of never-written
    padding back to the host (no kernel): a kernel never reads uninitialized memory; it runs
    the seeds up to SMALL_CASE_BYTES (the chunked-launch seed took over 150 s on an H200; it
    runs under initcheck with poison, and under the other tools). Without poison the checks
    that read poison are set aside, not findings (lora_align:disabled-untouched would fire on
    the seed with a disabled adapter: its untouched row is not poison but never-written
    memory); with poison nothing is set aside."""
    seeds = REPO / "corpus" / "seeds"
    cases = list(corpus.iter_corpus(seeds)) or _trigger_cases((), tmp_path)
    if tool == "initcheck" and not redzones:
        cases, left_out = small_cases(cases)
        assert cases, left_out
    run = replay_under_sanitizer(cases, tool, redzones=redzones)
    errors = [r for r in run.reports if r.level == "error"]
    if tool == "initcheck" and not redzones:
        errors = [r for r in errors if r.kernel is not None]
    assert not errors, [str(r) for r in errors[:10]]
    assert not run.truncated and all(c.status in ("clean", "rejected") for c in run.cases), [
        (c.path, c.status, c.message) for c in run.cases if c.status not in ("clean",
                                                                            "rejected")]
    assert not redzones or not any(c.set_aside for c in run.cases)


@gpu
@needs_sanitizer
def test_planted_write_is_mapped_to_its_case(tmp_path):
    """lora-disabled-adapter's wild write, between two clean cases: memcheck names
    lora_count_and_sort in case 1's lora_align, and the replay goes on after it.

    With poison on: the write's offsets come from the disabled adapter's never-written cumsum
    row, so poison (a word above 0x7FC10000 elements) sends it about 8.5 GB past
    sorted_token_ids, outside every allocation (the fixture
    tests/fixtures/sanitizer/disabled_memcheck.xml was recorded with the earlier poison
    0xCDCDCDCD, 3.4 GB before it). Without poison the row holds
    whatever the allocator returns (zeros, or an earlier case's data), and the write mostly
    lands inside sorted_token_ids: memcheck then has nothing to report (measured on an H200:
    no record), and initcheck's uninitialized read is what catches the variant alone."""
    from harness.demo import demo_cases

    cs = demo_cases()
    paths = [corpus.save(cs[n], tmp_path / n) for n in ("normal", "lora-all-slots", "normal")]
    run = replay_under_sanitizer(paths, "memcheck", bugs=("lora-disabled-adapter",),
                                 redzones=True)
    errs = [r for r in run.reports if r.kind.startswith("invalid")]
    assert errs and {(r.case, r.stage) for r in errs} == {(1, "lora_align")}, errs
    assert {r.mapped_by for r in errs} == {"host-frames"}  # its Python frames name the case
    assert run.cases[2].status == "clean" and run.processes == 2  # the context was lost
    json.dumps([r.to_json() for r in run.reports])
