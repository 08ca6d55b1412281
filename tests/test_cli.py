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


# -- fuzz and minimize -------------------------------------------------------------------------


def test_fuzz_finds_a_variant_exits_1_and_a_clean_run_exits_0(tmp_path, capsys):
    args = ["fuzz", "--runs", "150", "--seed", "2", "--no-minimize"]
    assert main([*args, "--bug", "lora-grid-off-by-one", "--stop-on-first",
                 "--findings", str(tmp_path / "buggy")]) == 1
    text = capsys.readouterr().out
    assert "finding lora_align:" in text and "seed 2" in text
    assert main([*args, "--runs", "40", "--findings", str(tmp_path / "fixed")]) == 0
    assert "no findings" in capsys.readouterr().out


@pytest.mark.parametrize("extra, expect", [
    (["--time", "5", "--runs", "5"], "not both"),
    (["--seed", "0"], "seed"),
    (["--graph"], "graph"),
    (["--bug", "no-such-bug"], "no-such-bug"),
])
def test_fuzz_bad_usage_exits_2_with_one_line(extra, expect, tmp_path, capsys):
    assert main(["fuzz", "--findings", str(tmp_path), *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and expect in err[0]


def test_minimize_writes_a_smaller_case(tmp_path, capsys):
    from harness.case import Patch

    rows = tuple(Patch("gating_logits", "row", "nan", row=r) for r in range(8, 16))
    path = corpus.save(MoECase(16, 64, 4, seed=2, patches=rows), tmp_path / "in")
    out_dir = tmp_path / "out"
    assert main(["minimize", str(path), "--bug", "topk-nan-argmax", "-o", str(out_dir)]) == 0
    assert "gating:unique-ids" in capsys.readouterr().out
    [written] = list(out_dir.glob("*.json"))
    small, meta = corpus.load(written)
    assert small.num_tokens < 16 and len(small.patches) == 1
    assert meta.signature == "gating:unique-ids"
    assert meta.expected("cpu", ["topk-nan-argmax"]) == "gating:unique-ids"
    # without the variant the case has no finding to keep: bad input, one line
    assert main(["minimize", str(path)]) == 2
    assert "no finding" in capsys.readouterr().err
