"""`moe-harness corpus add` and `corpus check` (the corpus sub-app of harness/cli.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from harness import corpus
from harness.case import MoECase, Patch
from harness.cli import main
from harness.corpus.format import CaseMeta, Expectation

NAN = "topk-nan-argmax"


@pytest.fixture
def finding(tmp_path):
    case = MoECase(4, 8, 2, patches=(Patch("gating_logits", "row", "nan", row=1),))
    meta = CaseMeta(origin="fuzz", signature="gating:unique-ids",
                    expect=(Expectation("cpu", (NAN,), "gating:unique-ids"),))
    return corpus.save(case, tmp_path / "findings", meta)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_add_writes_a_regression_by_default(finding, tmp_path, capsys):
    root = tmp_path / "corpus"
    assert main(["corpus", "add", str(finding), "--corpus-root", str(root)]) == 0
    written = root / "regressions" / finding.name
    assert written.exists()
    assert f"fixed -> clean; {NAN} -> gating:unique-ids" in capsys.readouterr().out
    assert main(["corpus", "check", str(root)]) == 0


def test_add_as_seed(finding, tmp_path):
    root = tmp_path / "corpus"
    assert main(["corpus", "add", str(finding), "--as", "seed", "--corpus-root", str(root)]) == 0
    assert (root / "seeds" / finding.name).exists()


def test_add_refuses_a_case_that_fails_its_expectation(tmp_path, capsys):
    meta = CaseMeta(expect=(Expectation(None, (NAN,), "gating:unique-ids"),))
    src = corpus.save(MoECase(4, 8, 2), tmp_path, meta)  # nothing for the variant to break
    root = tmp_path / "corpus"
    assert main(["corpus", "add", str(src), "--corpus-root", str(root)]) == 1
    captured = capsys.readouterr()
    assert "expected gating:unique-ids, got clean" in captured.out
    assert "not promoted" in captured.err
    assert not root.exists()
    assert main(["corpus", "add", str(src), "--corpus-root", str(root), "--no-verify"]) == 0


@pytest.mark.parametrize("args, expect", [
    (["corpus", "add", "nope.json"], "no such file"),
    (["corpus", "add", "{file}", "--as", "fixture"], "--as fixture"),
    (["corpus", "add", "{file}", "--backend", "tpu"], "tpu"),
    (["corpus", "check", "no-such-dir"], "no such directory"),
])
def test_bad_input_exits_2_with_one_line(args, expect, finding, capsys):
    args = [a.replace("{file}", str(finding)) for a in args]
    assert main(args) == 2
    assert expect in one_error_line(capsys)


def test_check_reports_every_problem_and_exits_1(finding, tmp_path, capsys):
    root = tmp_path / "corpus"
    good = corpus.save(MoECase(4, 8, 2), root)
    shutil.copy(good, root / "renamed.json")                       # name != content hash
    (root / "sub").mkdir()
    shutil.copy(good, root / "sub" / good.name)                    # the same case twice
    (root / "broken.json").write_text("{not json")
    doc = json.loads(good.read_text())
    doc["case"]["topk"] = 99
    (root / "bad-field.json").write_text(json.dumps(doc))          # schema: K > E
    capsys.readouterr()
    assert main(["corpus", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "renamed.json: file name does not match the content hash" in out
    assert f"duplicate of {good}" in out
    assert "broken.json: not valid JSON" in out
    assert "field 'case.topk'" in out
    assert out.strip().endswith("5 case file(s), 5 problem(s)")


def test_check_of_a_good_corpus_exits_0(finding, capsys):
    assert main(["corpus", "check", str(finding.parent)]) == 0
    assert "1 case file(s), 0 problem(s)" in capsys.readouterr().out


def test_add_of_a_case_already_in_the_corpus_writes_no_duplicate(finding, tmp_path, capsys):
    root = tmp_path / "corpus"
    held = corpus.save(corpus.load(finding)[0], root / "bugs" / NAN,
                       CaseMeta(origin="hand", expect=(Expectation(None, (), "clean"),)))
    before = held.read_text()
    assert main(["corpus", "add", str(held), "--corpus-root", str(root)]) == 0
    assert "already in the corpus" in capsys.readouterr().out
    assert main(["corpus", "add", str(finding), "--corpus-root", str(root), "--as",
                 "seed"]) == 0
    assert f"already in the corpus as {held}" in capsys.readouterr().out
    assert sorted(root.rglob("*.json")) == [held] and held.read_text() == before
    assert main(["corpus", "check", str(root)]) == 0
