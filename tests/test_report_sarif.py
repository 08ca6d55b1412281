"""SARIF 2.1.0 of the gate (harness/report/sarif.py), validated against the OASIS schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from harness import corpus
from harness.case import MoECase, Patch
from harness.chain.target import Target
from harness.corpus.format import CaseMeta, Expectation
from harness.gate import GateConfig, GateFinding, GateResult, run_gate
from harness.report import sarif

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "tests" / "fixtures" / "sarif-schema-2.1.0.json").read_text())


def validate(log: dict) -> None:
    validator = jsonschema.Draft4Validator(SCHEMA,
                                           format_checker=jsonschema.Draft4Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(log), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])


def test_the_schema_rejects_what_is_not_sarif():
    """The check can fail: a level SARIF does not know, a result without a message."""
    good = {"version": "2.1.0", "runs": [{"tool": {"driver": {"name": "x"}}, "results": [
        {"ruleId": "a:b", "level": "error", "message": {"text": "m"}}]}]}
    validate(good)
    for broken in ({"level": "fatal"}, {"message": None}):
        log = json.loads(json.dumps(good))
        log["runs"][0]["results"][0].update(broken)
        with pytest.raises(AssertionError):
            validate(log)


def _finding(tmp_path, **kw) -> GateFinding:
    path = corpus.save(MoECase(4, 8, 2), tmp_path / "f")
    base = dict(kind="finding", signature="sort_align:no-poison", stage="sort_align",
                severity="out-of-contract", message="poison", reproducer=path,
                command=f"moe-harness run {path} --backend cpu")
    return GateFinding(**{**base, **kw})


def test_every_kind_of_result_is_valid_sarif_with_a_location(tmp_path):
    result = GateResult(GateConfig(), findings=[
        _finding(tmp_path, ready=tmp_path / "ready.json", bugs=("sort-duplicate-break",)),
        _finding(tmp_path, kind="expectation", signature="gating:unique-ids", stage="gating",
                 severity="legal", origin="corpus"),
        _finding(tmp_path, kind="error", signature="corpus:unreadable", stage="corpus",
                 severity="legal", origin="corpus"),
        _finding(tmp_path, signature="finalize:finite", stage="finalize", severity="fault"),
    ])
    log = sarif.to_sarif(result, ROOT)
    validate(log)
    run = log["runs"][0]
    levels = [r["level"] for r in run["results"]]
    assert levels == ["warning", "error", "error", "note"]
    assert {r["id"] for r in run["tool"]["driver"]["rules"]} == {
        "sort_align:no-poison", "gating:unique-ids", "corpus:unreadable", "finalize:finite"}
    uris = [r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
            for r in run["results"]]
    assert uris[0] == "kernels/sort_align.cu" and uris[1] == "kernels/gating.cu"
    assert uris[3] == "kernels/experts.cu"  # finalize's kernel lives there
    assert uris[2].startswith("file:")  # no kernel for a corpus file: the reproducer
    line = run["results"][0]["locations"][0]["physicalLocation"]["region"]["startLine"]
    assert "sort_" in (ROOT / "kernels" / "sort_align.cu").read_text().splitlines()[line - 1]
    first = run["results"][0]
    assert first["attachments"][0]["artifactLocation"]["uri"] == \
        run["artifacts"][0]["location"]["uri"]
    assert first["properties"]["variants"] == ["sort-duplicate-break"]


class MyKernels(Target):
    """A user's target: its gating method is where a gating finding points."""

    name = "mine"

    def gating(self, inp, ctx):
        raise NotImplementedError


def test_a_user_targets_finding_points_at_its_stage_method(tmp_path):
    result = GateResult(GateConfig(target=f"{__name__}:MyKernels"), findings=[
        _finding(tmp_path, signature="gating:unique-ids", stage="gating")])
    log = sarif.to_sarif(result, ROOT)
    validate(log)
    loc = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"]["uri"] == "tests/test_report_sarif.py"
    src = Path(__file__).read_text().splitlines()
    assert "def gating" in src[loc["region"]["startLine"] - 1]


def test_a_real_gate_run_writes_valid_sarif(tmp_path):
    seeds = tmp_path / "corpus"
    corpus.save(MoECase(4, 8, 2, patches=(Patch("gating_logits", "row", "nan", row=1),)),
                seeds, CaseMeta(expect=(Expectation(None, ("topk-nan-argmax",), "clean"),)))
    result = run_gate(GateConfig(corpus_dirs=(seeds,), seconds=30,
                                 findings_dir=tmp_path / "f"))
    assert result.exit_code == 1
    path = sarif.write(result, tmp_path / "out.sarif", ROOT)
    log = json.loads(path.read_text())
    validate(log)
    assert log["runs"][0]["results"]
    empty = GateResult(GateConfig())
    validate(sarif.to_sarif(empty, ROOT))
