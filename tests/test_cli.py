"""The CLI: exit codes, and one clear line (never a traceback) for every kind of bad input."""

from __future__ import annotations

import json

import pytest

from harness import corpus
from harness.case import MoECase
from harness.cli import main


@pytest.fixture
def case_file(tmp_path):
    return corpus.save(MoECase(16, 8, 2, seed=1), tmp_path)


def _edit(path, **case_changes):
    obj = json.loads(path.read_text())
    obj["case"].update(case_changes)
    path.write_text(json.dumps(obj))
    return path


def test_run_clean_case_exits_0(case_file, capsys):
    assert main(["run", str(case_file)]) == 0
    assert "clean" in capsys.readouterr().out


def test_run_with_variant_finding_exits_1(tmp_path, capsys):
    from harness.case import Patch

    case = MoECase(8, 8, 2, patches=(Patch("gating_logits", "row", "nan", row=3),))
    path = corpus.save(case, tmp_path)
    assert main(["run", str(path), "--bug", "topk-nan-argmax"]) == 1
    assert "gating:unique-ids" in capsys.readouterr().out
    assert main(["run", str(path)]) == 0


def test_bugs_lists_every_variant(capsys):
    assert main(["bugs"]) == 0
    text = capsys.readouterr().out
    for name in ("topk-nan-argmax", "grid-y-overflow", "lora-disabled-adapter"):
        assert name[:12] in text


@pytest.mark.parametrize("problem", [
    "missing", "corrupt-json", "schema", "unknown-variant", "k-gt-e", "t-zero", "negative",
    "bad-backend",
])
def test_bad_input_exits_2_with_one_line(problem, case_file, tmp_path, capsys):
    args = ["run", str(case_file)]
    expect = {"missing": "nope.json", "corrupt-json": "JSON", "schema": "schema",
              "unknown-variant": "no-such-bug", "k-gt-e": "topk", "t-zero": "num_tokens",
              "negative": "hidden_size", "bad-backend": "backend"}[problem]
    if problem == "missing":
        args = ["run", str(tmp_path / "nope.json")]
    elif problem == "corrupt-json":
        case_file.write_text("{not json")
    elif problem == "schema":
        obj = json.loads(case_file.read_text())
        obj["schema"] = 999
        case_file.write_text(json.dumps(obj))
    elif problem == "unknown-variant":
        args += ["--bug", "no-such-bug"]
    elif problem == "k-gt-e":
        _edit(case_file, topk=9)
    elif problem == "t-zero":
        _edit(case_file, num_tokens=0)
    elif problem == "negative":
        _edit(case_file, hidden_size=-4)
    elif problem == "bad-backend":
        args += ["--backend", "tpu"]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert expect.lower() in lines[0].lower()


def test_usage_error_exits_2(capsys):
    assert main(["no-such-command"]) == 2
    assert main(["run"]) == 2
