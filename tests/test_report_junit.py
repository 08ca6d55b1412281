"""JUnit XML and the Markdown summary of a gate run (harness/report/junit.py, summary.py)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from harness import corpus
from harness.case import MoECase, Patch
from harness.corpus.format import CaseMeta, Expectation
from harness.gate import GateConfig, GateFinding, GateResult, Segment, run_gate
from harness.report import junit, summary


def _failing_corpus(tmp_path):
    d = tmp_path / "corpus"
    corpus.save(MoECase(16, 8, 2, seed=1), d)
    bad = corpus.save(MoECase(4, 8, 2, patches=(Patch("gating_logits", "row", "nan", row=1),)),
                      d, CaseMeta(expect=(Expectation(None, ("topk-nan-argmax",), "clean"),)))
    (d / "broken.json").write_text("{")
    return d, bad


def test_junit_has_a_test_per_corpus_case_with_the_replays_report(tmp_path):
    d, bad = _failing_corpus(tmp_path)
    result = run_gate(GateConfig(corpus_dirs=(d,), seconds=30, findings_dir=tmp_path / "f"))
    root = ET.parse(junit.write(result, tmp_path / "j.xml")).getroot()
    suite = root.find("testsuite[@name='corpus']")
    assert suite.get("tests") == "3" and suite.get("failures") == "1"
    assert suite.get("errors") == "1"
    [failed] = [tc for tc in suite if tc.find("failure") is not None]
    assert failed.get("name") == str(bad)
    text = failed.find("failure").text
    assert "oracle_ids" in text and "moe-harness run" in text
    assert suite.find("testcase/error").get("type") == "unreadable"
    fuzz = root.find("testsuite[@name='fuzz']")
    assert fuzz.find("testcase/skipped") is not None  # fuzzing was skipped: said why
    assert root.get("failures") == "1" and root.get("errors") == "1"


def _fuzzed(tmp_path) -> GateResult:
    path = corpus.save(MoECase(4, 8, 2), tmp_path / "f")
    f = GateFinding("finding", "gating:unique-ids", "gating", "legal", "dup ids", path,
                    f"moe-harness run {path} --backend cpu", ready=tmp_path / "ready.json")
    return GateResult(GateConfig(since="origin/main", corpus_dirs=(tmp_path,)),
                      focus=("gating", "sort_align"), changed=["kernels/gating.cu"],
                      segments=[Segment(("gating",), 30.0, seeds=3, seconds=12.5,
                                        executions=400, coverage=10, features=20,
                                        reason="first finding", found=["gating:unique-ids"]),
                                Segment(("sort_align",), 0.0)],
                      findings=[f], seconds=20.0)


def test_junit_fuzz_segments_failed_run_and_skipped(tmp_path):
    root = junit.to_xml(_fuzzed(tmp_path))
    cases = root.findall("testsuite[@name='fuzz']/testcase")
    assert [c.get("name") for c in cases] == ["fuzz gating", "fuzz sort_align"]
    assert cases[0].find("failure").get("type") == "gating:unique-ids"
    assert cases[1].find("skipped") is not None
    assert "400 executions" in cases[0].find("system-out").text


def test_markdown_summary_gives_verdict_focus_findings_and_files_to_commit(tmp_path,
                                                                          monkeypatch):
    result = _fuzzed(tmp_path)
    text = summary.to_markdown(result)
    assert text.startswith("## moe-harness gate ❌")
    assert "`origin/main`" in text and "stages fuzzed: gating, sort_align" in text
    assert "| gating | 30 | 3 | 400 |" in text and "`gating:unique-ids`" in text
    assert f"cp {tmp_path / 'ready.json'} corpus/regressions/" in text
    # $GITHUB_STEP_SUMMARY is appended to (other steps write there too)
    step = tmp_path / "step.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    summary.write(result, step)
    assert step.read_text().startswith("earlier step\n## moe-harness gate")
    clean = summary.to_markdown(GateResult(GateConfig()))
    assert clean.startswith("## moe-harness gate ✅")
