"""`moe-harness gate` (harness/gate.py, harness/cli_ci.py): replay, focus, fuzz, reports."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET

import pytest

from harness import corpus
from harness.case import MoECase, Patch
from harness.changes import STAGES
from harness.cli import main
from harness.corpus.format import CaseMeta, Expectation
from harness.gate import GateConfig, plan_segments, run_gate

NAN = "topk-nan-argmax"


@pytest.fixture
def seeds(tmp_path):
    """Clean seeds (no NaN anywhere): what the fuzzer starts from, a finding is its own."""
    d = tmp_path / "corpus"
    for i, shape in enumerate([(16, 8, 2), (40, 6, 3), (8, 64, 4)]):
        corpus.save(MoECase(*shape, seed=i), d / "seeds",
                    CaseMeta(origin="hand", expect=(Expectation(None, (), "clean"),)))
    return d


def test_plan_segments_spreads_the_stages_over_the_budget():
    assert plan_segments(STAGES, 600, 20) == [(s,) for s in STAGES]
    two = plan_segments(STAGES, 45, 20)
    assert len(two) == 2 and sorted(s for g in two for s in g) == sorted(STAGES)
    assert plan_segments(("gating",), 5, 20) == [("gating",)]
    assert plan_segments((), 600, 20) == []


def test_gate_finds_a_planted_variant_from_clean_seeds_and_writes_every_report(
        seeds, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["gate", "--corpus", str(seeds), "--time", "90", "--bug", NAN,
            "--junit", "out/junit.xml", "--sarif", "out/gate.sarif", "--summary", "out/s.md"]
    assert main(args) == 1
    text = capsys.readouterr().out
    assert "gate FAILED" in text and "ready to commit" in text
    sarif = json.loads((tmp_path / "out" / "gate.sarif").read_text())
    results = sarif["runs"][0]["results"]
    assert results and all(r["ruleId"].startswith("gating:") for r in results)
    r = results[0]
    assert r["properties"]["command"].startswith("moe-harness run ")
    assert r["properties"]["command"].endswith(f"--bug {NAN}")
    assert r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"].endswith(
        "kernels/gating.cu")
    ready = tmp_path / r["properties"]["corpusFile"]
    _, meta = corpus.load(ready)
    assert meta.expected("cpu", ()) == "clean" and meta.expected("cpu", (NAN,)) == r["ruleId"]
    # the reproducer runs as the command says, and finds what the result says
    repro = tmp_path / r["properties"]["reproducer"]
    assert main(["run", str(repro), "--bug", NAN, "--json"]) == 1
    assert r["ruleId"] in {f["signature"] for f in json.loads(capsys.readouterr().out)[
        "findings"]}
    suites = ET.parse(tmp_path / "out" / "junit.xml").getroot()
    assert suites.get("failures") == "1" and int(suites.get("tests")) >= 4
    assert "❌" in (tmp_path / "out" / "s.md").read_text()


def test_gate_on_the_fixed_chain_passes(seeds, tmp_path, capsys):
    out = tmp_path / "g.json"
    assert main(["gate", "--corpus", str(seeds), "--time", "25", "--findings",
                 str(tmp_path / "f"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    out.write_text(json.dumps(doc))
    assert doc["exit_code"] == 0 and doc["corpus"]["cases"] == 3 and doc["findings"] == []
    ran = [s for s in doc["segments"] if s["executions"]]
    assert ran and doc["seconds"] < 25 + 30


def test_a_failed_corpus_expectation_fails_the_gate_and_skips_fuzzing(seeds, tmp_path):
    bad = corpus.save(MoECase(4, 8, 2, patches=(Patch("gating_logits", "row", "nan", row=1),)),
                      seeds / "regressions",
                      CaseMeta(expect=(Expectation(None, (NAN,), "clean"),)))
    result = run_gate(GateConfig(corpus_dirs=(seeds,), seconds=60,
                                 findings_dir=tmp_path / "f"))
    assert result.exit_code == 1 and not result.segments
    [failed] = result.corpus_failed
    assert failed.path == bad and "oracle_ids" in failed.report
    assert {f.signature for f in result.findings} >= {"gating:unique-ids"}
    assert all(f.origin == "corpus" and f.reproducer == bad for f in result.findings)
    assert any("fuzzing skipped" in n for n in result.notes)


def test_since_a_ref_with_no_stage_changed_replays_but_does_not_fuzz(seeds, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("v1\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q", "-b", "main"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "init"], check=True)
    (repo / "README.md").write_text("v2\n")
    result = run_gate(GateConfig(corpus_dirs=(seeds,), seconds=60, since="main", repo=repo,
                                 findings_dir=tmp_path / "f"))
    assert result.exit_code == 0 and result.changed == ["README.md"] and result.focus == ()
    assert len(result.corpus) == 3 and not result.segments
    assert any("no file of a chain stage changed" in n for n in result.notes)


@pytest.mark.parametrize("extra, expect", [
    (["--time", "0"], "time budget"),
    (["--corpus", "no-such-dir"], "no such corpus"),
    (["--since", "no-such-ref-xyz"], "--since"),
    (["--sarif", "."], "is a directory"),
    (["--target", "nomodule:Thing"], "nomodule"),
    (["--bug", "no-such-bug"], "no-such-bug"),
])
def test_gate_bad_usage_exits_2_with_one_line(extra, expect, seeds, tmp_path, capsys,
                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["gate", "--corpus", str(seeds), "--time", "5", *extra]) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.strip()]
    assert len(err) == 1 and expect in err[0] and "Traceback" not in captured.err
