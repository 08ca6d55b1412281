"""Replaying a case against its stored expectations (harness/expect.py)."""

from __future__ import annotations

import pytest

from harness.backends import resolve_target
from harness.case import MoECase, Patch
from harness.corpus import expect, explain
from harness.corpus.expect import Check, CheckResult
from harness.corpus.format import CaseMeta, Expectation
from harness.errors import IsolationError
from harness.findings import Finding

NAN = "topk-nan-argmax"
SORT = "sort-duplicate-break"


def meta(*expect: Expectation) -> CaseMeta:
    return CaseMeta(expect=expect)


# -- which checks ------------------------------------------------------------------------------


def test_default_checks_are_the_fixed_chain_and_every_stored_variant_set():
    m = meta(Expectation(None, (NAN,), "gating:unique-ids"),
             Expectation(None, (SORT, NAN), "sort_align:permutation-bijection"),
             Expectation("cuda", (SORT,), "clean"))
    assert expect.checks_for(m, "cpu") == [
        Check((), "clean", stored=False), Check((NAN,), "gating:unique-ids"),
        Check((SORT, NAN), "sort_align:permutation-bijection")]  # sorted names
    assert Check((SORT,), "clean") in expect.checks_for(m, "cuda")


def test_a_backend_specific_expectation_wins():
    m = meta(Expectation(None, (), "clean"), Expectation("cuda", (), "experts:illegal-access"))
    assert expect.checks_for(m, "cpu") == [Check((), "clean")]
    assert expect.checks_for(m, "cuda") == [Check((), "experts:illegal-access")]


def test_an_explicit_variant_set_checks_that_set_only():
    m = meta(Expectation(None, (NAN,), "gating:unique-ids"))
    assert expect.checks_for(m, "cpu", [NAN]) == [Check((NAN,), "gating:unique-ids")]
    assert expect.checks_for(m, "cpu", [SORT]) == []  # nothing stored: nothing to check
    assert expect.checks_for(m, "cpu", []) == [Check((), "clean", stored=False)]


# -- outcomes ----------------------------------------------------------------------------------


def finding(sig: str, **details) -> Finding:
    stage, check = sig.split(":")
    return Finding(stage, check, "something is off", "legal", details)


@pytest.mark.parametrize("outcome, found, ok", [
    ("clean", [], True), ("clean", ["gating:unique-ids"], False),
    ("gating:unique-ids", ["gating:weights-finite", "gating:unique-ids"], True),
    ("gating:unique-ids", [], False), ("gating:unique-ids", ["gating:ids-in-range"], False),
])
def test_clean_means_no_finding_and_a_signature_must_be_among_them(outcome, found, ok):
    assert CheckResult(Check((), outcome), [finding(s) for s in found]).ok is ok


def test_an_error_never_meets_an_expectation():
    assert not CheckResult(Check((), "clean"), error="the child died").ok


def test_results_round_trip_through_json():
    r = CheckResult(Check((NAN,), "gating:unique-ids"), [finding("gating:unique-ids", rows=[1])],
                    rejected=None, error=None, output="", seconds=0.5)
    back = CheckResult.from_json(r.to_json())
    assert back.check == r.check and back.signatures == r.signatures
    assert back.findings[0].details == {"rows": [1]}


def test_run_checks_on_the_cpu_model():
    case = MoECase(2, 4, 2, patches=(Patch("gating_logits", "row", "nan", row=1),))
    fixed, variant = expect.run_checks(case, resolve_target("cpu"),
                                       [Check((), "clean"), Check((NAN,), "gating:unique-ids")])
    assert fixed.ok and fixed.findings == []
    assert variant.ok and "gating:unique-ids" in variant.signatures


class FakeRunner:
    """Stands in for `isolation.Isolated`: the second call crashes."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def call(self, fn, args, timeout=None):
        self.timeouts.append(timeout)
        if len(self.timeouts) == 2:
            raise IsolationError("crash", "the child died (exit code 3)", "last words")
        return CheckResult(Check.from_json(args["check"])).to_json()


def test_an_isolated_crash_fails_its_check_only():
    runner = FakeRunner()
    checks = [Check((), "clean"), Check((NAN,), "clean"), Check((SORT,), "clean")]
    results = expect.run_checks_in(runner, "x.json", "cuda", checks, timeout=30)
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error == "the child died (exit code 3)"
    assert results[1].output == "last words"
    assert runner.timeouts == [30, 30, 30]  # each replay gets the whole time-out


# -- reporting ---------------------------------------------------------------------------------


def test_details_put_the_offending_rows_beside_the_oracle():
    lines = explain.format_details({
        "rank": 0, "rows": [24, 25], "ids": [[0, 0], [0, 0]], "oracle_ids": [[3, 1], [2, 0]],
        "positions": [], "sorted_token_ids": [], "weights_sum": 1.0000001})
    assert lines[0].split(" | ") == ["rows", "ids   ", "oracle_ids"]
    assert lines[2] == "24   | [0, 0] | [3, 1]"
    assert lines[3] == "25   | [0, 0] | [2, 0]"
    assert "positions: none, sorted_token_ids: none" in lines
    assert "rank = 0" in lines and "weights_sum = 1" in lines


def test_long_cells_are_cut():
    (line,) = [x for x in explain.format_details({"rows": [0], "output": [list(range(100))]})
               if x.startswith("0 ")]
    assert line.endswith("…") and len(line) < 80


def test_reproduce_commands():
    assert explain.reproduce_command("corpus/bugs/a+b/x.json", "cpu", (NAN, SORT)) == (
        f"moe-harness run corpus/bugs/a+b/x.json --backend cpu --bug {NAN} --bug {SORT}")
    assert explain.reproduce_command("my cases/x.json", "mine:Target", ()) == (
        "pytest 'my cases/x.json' --moe-target mine:Target")


def test_explain_lists_what_was_expected_and_what_came():
    case = MoECase(2, 4, 2)
    results = [CheckResult(Check((), "clean")),
               CheckResult(Check((NAN,), "clean"), [finding("gating:unique-ids", rows=[1],
                                                            ids=[[0, 0]])])]
    text = explain.explain("c.json", "cpu", case, results)
    assert text.splitlines()[0] == "c.json: 1 of 2 expectation(s) not met on cpu"
    assert f"FAIL with bugs {NAN}: expected clean, got gating:unique-ids" in text
    assert "stage gating, invariant unique-ids: something is off" in text
    assert text.rstrip().endswith(f"moe-harness run c.json --backend cpu --bug {NAN}")
