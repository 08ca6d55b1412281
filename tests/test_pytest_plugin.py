"""The pytest plugin, from the outside (pytester): collection, expectations, failure messages,
isolation of crashes and hangs, xdist, junitxml, GPU skip and pinning."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
import torch

import harness.pytest_plugin
from harness import corpus
from harness.case import MoECase, Patch
from harness.corpus.format import CaseMeta, Expectation

pytest_plugins = ["pytester"]

NAN_ROW = (Patch("gating_logits", "row", "nan", row=0),)
VARIANT = "topk-nan-argmax"


def save(directory, case: MoECase, *expect: tuple[tuple[str, ...], str]):
    """Save `case` with expectations ((variants), outcome) for any backend."""
    meta = CaseMeta(expect=tuple(Expectation(None, bugs, outcome) for bugs, outcome in expect))
    return corpus.save(case, directory, meta)


def rel(path, pytester) -> str:
    return str(path.relative_to(pytester.path))


def clean(seed: int = 1, tokens: int = 4) -> MoECase:
    return MoECase(tokens, 4, 2, seed=seed)


def nan_case(seed: int = 1) -> MoECase:
    return MoECase(2, 4, 2, seed=seed, patches=NAN_ROW)


# -- collection --------------------------------------------------------------------------------


def test_without_a_corpus_option_nothing_extra_is_collected(pytester):
    save(pytester.path / "cases", clean())
    pytester.makepyfile(test_plain="def test_ok():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "moe-harness: corpus" not in result.stdout.str()


def test_items_are_the_case_files_and_their_ids_are_paths(pytester):
    a = save(pytester.path / "cases", clean(1))
    b = save(pytester.path / "cases" / "sub", clean(2))
    (pytester.path / "cases" / "notes.txt").write_text("not a case")
    result = pytester.runpytest("--moe-corpus", "cases", "--collect-only", "-q")
    result.stdout.fnmatch_lines([rel(a, pytester), rel(b, pytester), "2 tests collected*"])


def test_a_case_file_named_on_the_command_line_is_replayed(pytester):
    path = save(pytester.path / "elsewhere", clean())
    result = pytester.runpytest(rel(path, pytester), "-v")
    result.stdout.fnmatch_lines([f"{rel(path, pytester)} PASSED*"])
    result.assert_outcomes(passed=1)


def test_ini_option_adds_the_corpus_to_the_default_selection_only(pytester):
    save(pytester.path / "cases", clean())
    pytester.makeini("[pytest]\nmoe_corpus = cases\n")
    pytester.makepyfile(test_plain="def test_ok():\n    pass\n")
    pytester.runpytest().assert_outcomes(passed=2)
    pytester.runpytest("test_plain.py").assert_outcomes(passed=1)
    pytester.runpytest("cases").assert_outcomes(passed=1)  # a path inside the corpus


def test_bad_options_are_usage_errors(pytester):
    save(pytester.path / "cases", clean())
    result = pytester.runpytest("--moe-corpus", "cases", "--moe-bug", "no-such-bug")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--moe-bug no-such-bug: unknown bug variant*"])
    result = pytester.runpytest("--moe-corpus", "missing")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result = pytester.runpytest("--moe-corpus", "cases", "--moe-target", "nowhere:Target")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*cannot import nowhere*"])


# -- expectations and failure messages ---------------------------------------------------------


def test_stored_expectations_pass_and_fail(pytester):
    cases = pytester.path / "cases"
    save(cases, clean())                                           # implied: clean, fixed chain
    save(cases, nan_case(1), ((), "clean"), ((VARIANT,), "gating:unique-ids"))
    missing = save(cases, clean(3), ((), "gating:unique-ids"))     # expects a finding: none
    result = pytester.runpytest("--moe-corpus", "cases")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines([
        "moe-harness: corpus cases on cpu, bugs: every stored expectation",
        f"*{rel(missing, pytester)}: 1 of 1 expectation(s) not met on cpu",
        "FAIL on the fixed chain: expected gating:unique-ids, got clean",
        f"  moe-harness run {rel(missing, pytester)} --backend cpu",
    ])


def test_failure_shows_stage_invariant_rows_and_the_command(pytester):
    wrong = save(pytester.path / "cases", nan_case(2), ((), "clean"), ((VARIANT,), "clean"))
    result = pytester.runpytest("--moe-corpus", "cases")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*case: T=2 E=4 K=2 softmax fp32*",
        "  ok   on the fixed chain: clean",
        f"FAIL with bugs {VARIANT}: expected clean, got gating:unique-ids*",
        "*stage gating, invariant unique-ids: an expert id repeats within a token",
        "*rows | ids    | oracle_ids*",  # the offending rows beside the oracle's
        "*-----+--------+-----------*",
        "*0    | [[]0, 0] | [[]0, 1]*",  # fnmatch: [[] is a literal [
        f"  moe-harness run {rel(wrong, pytester)} --backend cpu --bug {VARIANT}",
    ])
    assert "Traceback" not in result.stdout.str()


def test_moe_bug_checks_that_variant_set_only(pytester):
    cases = pytester.path / "cases"
    with_variant = save(cases, nan_case(1), ((VARIANT,), "gating:unique-ids"))
    save(cases, clean())
    result = pytester.runpytest("--moe-corpus", "cases", "--moe-bug", VARIANT, "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines([f"*no stored expectation for cpu with bugs {VARIANT}*"])
    # the same variant expected clean: now it fails, and only that check ran
    save(cases, nan_case(1), ((VARIANT,), "clean"))  # merges: the newer expectation wins
    result = pytester.runpytest(rel(with_variant, pytester), "--moe-bug", VARIANT)
    result.assert_outcomes(failed=1)
    assert "on the fixed chain" not in result.stdout.str()
    pytester.runpytest("--moe-corpus", "cases", "--moe-bug", "fixed").assert_outcomes(passed=2)


def test_a_corrupt_file_fails_alone_with_the_field_named(pytester):
    cases = pytester.path / "cases"
    save(cases, clean())
    (cases / "broken.json").write_text('{"schema": 1, "case": {"num_tokens": 4, '
                                       '"num_experts": 4, "topk": 9}}')
    result = pytester.runpytest("--moe-corpus", "cases")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*broken.json: CorpusError: *field 'case.topk'*"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_items_skip_without_a_gpu(pytester):
    save(pytester.path / "cases", clean())
    result = pytester.runpytest("--moe-corpus", "cases", "--moe-backend", "cuda", "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs a CUDA GPU (--moe-backend cuda*"])


# -- isolation ---------------------------------------------------------------------------------

TARGET = """
import os
import time

from harness.backends.cpu import CpuTarget


class Flaky(CpuTarget):
    '''The cpu model, except that a case of 13 tokens kills its process and one of 14 hangs.'''

    isolate = True

    def gating(self, inp, ctx):
        tokens = inp.gating_logits.shape[0]
        if tokens == 13:
            print("about to crash", flush=True)
            os._exit(3)
        if tokens == 14:
            time.sleep(600)
        return super().gating(inp, ctx)
"""


def three_cases(pytester):
    for tokens in (12, 13, 14):
        save(pytester.path / "cases", clean(tokens=tokens))


def test_a_crash_or_a_hang_fails_its_item_alone(pytester):
    pytester.syspathinsert()
    pytester.makepyfile(flaky=TARGET)
    # in this order: fine, crash, hang, fine (each failure is followed by an item that needs
    # a fresh child)
    names = {t: rel(save(pytester.path / "cases" / d, clean(tokens=t)), pytester)
             for d, t in (("a", 12), ("b", 13), ("c", 14), ("d", 15))}
    result = pytester.runpytest("--moe-corpus", "cases", "--moe-target", "flaky:Flaky",
                                "--moe-timeout", "3", "-v")
    result.assert_outcomes(passed=2, failed=2)
    result.stdout.fnmatch_lines([
        f"{names[12]} PASSED*", f"{names[13]} FAILED*",
        f"{names[14]} FAILED*", f"{names[15]} PASSED*",
        "FAIL on the fixed chain: expected clean (the default), got the child process running "
        "harness.corpus.expect:run_check_isolated died (exit code 3)",
        "*about to crash",
        f"  pytest {names[13]} --moe-target flaky:Flaky",
        "FAIL on the fixed chain: expected clean (the default), got "
        "harness.corpus.expect:run_check_isolated did not return within 3 s; the child process was "
        "killed",
    ])
    assert result.duration < 120


@pytest.mark.parametrize("args, isolated", [
    ((), False), (("--moe-isolate",), True), (("--moe-timeout", "9"), True),
    (("--moe-target", "harness.backends.cpu:CpuTarget"), False),
])
def test_what_isolates_the_items(pytester, args, isolated):
    save(pytester.path / "cases", clean())
    result = pytester.runpytest("--moe-corpus", "cases", "--collect-only", *args)
    assert ("isolated (time-out" in result.stdout.str()) == isolated


# -- xdist, junitxml, GPU pinning --------------------------------------------------------------


def test_parallel_run_with_xdist(pytester):
    three_cases(pytester)
    wrong = save(pytester.path / "cases", nan_case(2), ((VARIANT,), "clean"))
    result = pytester.runpytest_subprocess("-n", "2", "--moe-corpus", "cases")
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(["2 workers [[]4 items]",
                                 f"*moe-harness run {rel(wrong, pytester)} --backend cpu *"])


def test_junitxml_has_one_testcase_per_case_file(pytester):
    three_cases(pytester)
    wrong = save(pytester.path / "cases", nan_case(2), ((VARIANT,), "clean"))
    pytester.runpytest("--moe-corpus", "cases", "--junitxml", "out.xml")
    cases = ET.parse(pytester.path / "out.xml").getroot().findall(".//testcase")
    files = sorted((pytester.path / "cases").glob("*.json"))
    assert len(cases) == len(files) == 4
    # pytest's junit names: the test id with "/" as "."
    assert sorted(c.get("name") for c in cases) == sorted(f"cases.{p.name}" for p in files)
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == [f"cases.{wrong.name}"]
    assert f"--bug {VARIANT}" in failed[0].find("failure").text
    props = {p.get("name"): p.get("value") for p in cases[0].iter("property")}
    assert props["moe_target"] == "cpu"


def test_gpu_pinning_uses_the_most_free_gpu_among_moe_gpus(pytester, monkeypatch):
    from harness import gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "unchanged")  # restored after the test
    monkeypatch.setattr(gpus, "free_memory", lambda nvml=None: {0: 5, 1: 9, 2: 7, 3: 1})
    pytester.syspathinsert()
    pytester.makepyfile(plain="from harness.backends.cpu import CpuTarget as Target\n")
    save(pytester.path / "cases", clean())
    pytester.runpytest("--moe-corpus", "cases", "--moe-target", "plain:Target",
                       "--moe-gpus", "0,2", "--junitxml", "out.xml")
    case = ET.parse(pytester.path / "out.xml").getroot().find(".//testcase")
    props = {p.get("name"): p.get("value") for p in case.iter("property")}
    assert props["moe_gpu"] == "2"
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"


# -- registration ------------------------------------------------------------------------------


def test_the_plugin_is_registered_once(pytestconfig):
    pm = pytestconfig.pluginmanager
    assert pm.get_plugin("moe_harness") is harness.pytest_plugin
    assert [p for p in pm.get_plugins() if p is harness.pytest_plugin] == [harness.pytest_plugin]
