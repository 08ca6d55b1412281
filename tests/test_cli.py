"""The CLI: exit codes, and one clear line (never a traceback) for every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_bugs_lists_every_variant_whole_on_one_line_when_piped(capsys):
    """`moe-harness bugs | grep NAME` finds every name: not a terminal, one line per row."""
    from harness.bugs import VARIANTS

    assert main(["bugs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for v in VARIANTS.values():
        [row] = [line for line in lines if line.split("\t")[0] == v.name]
        assert row.split("\t") == [v.name, v.stage, v.origin, " ".join(v.description.split())]


def test_bugs_json(capsys):
    from harness.bugs import VARIANTS

    assert main(["bugs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in listed] == list(VARIANTS)
    assert {"name", "stage", "origin", "description"} == set(listed[0])


def test_run_json_has_stages_and_findings_and_keeps_the_exit_code(tmp_path, capsys):
    from harness.case import Patch

    case = MoECase(8, 8, 2, patches=(Patch("gating_logits", "row", "nan", row=3),))
    path = corpus.save(case, tmp_path)
    assert main(["run", str(path), "--bug", "topk-nan-argmax", "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["bugs"] == ["topk-nan-argmax"] and doc["target"] == "cpu"
    assert doc["stages"][0]["stage"] == "gating"
    sigs = {f["signature"] for f in doc["findings"]}
    assert "gating:unique-ids" in sigs
    [dup] = [f for f in doc["findings"] if f["signature"] == "gating:unique-ids"]
    assert dup["details"]["rows"] == [3] and "oracle_ids" in dup["details"]
    assert main(["run", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["findings"] == []


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
    (["--workers", "0"], "workers"),
    (["--gpus", "all"], "cuda backend"),
    (["--backend", "cuda", "--gpus", "0,x"], "indices like 0,2"),
    (["--backend", "cuda", "--gpus", "99"], "--gpus 99"),  # no NVML here, no GPU 99 there
    (["--sync-dir", "x"], "--ray"),
    (["--stats-every", "0"], "stats_every"),
])
def test_fuzz_bad_usage_exits_2_with_one_line(extra, expect, tmp_path, capsys):
    assert main(["fuzz", "--findings", str(tmp_path), *extra]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and expect in err[0]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    return lines[0]


def test_fuzz_time_zero_is_rejected_not_the_default(tmp_path, capsys):
    assert main(["fuzz", "--time", "0", "--findings", str(tmp_path)]) == 2
    assert "time budget must be > 0" in _one_error_line(capsys)
    assert main(["fuzz", "--time", "-3", "--findings", str(tmp_path)]) == 2
    _one_error_line(capsys)


@pytest.mark.parametrize("command", ["fuzz-corpus", "fuzz-findings", "minimize", "corpus-add"])
def test_output_paths_that_are_files_or_unwritable_exit_2_with_one_line(command, tmp_path,
                                                                      capsys):
    from harness.case import Patch

    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    finding = corpus.save(MoECase(4, 8, 2, patches=(Patch("gating_logits", "row", "nan",
                                                          row=1),)), tmp_path / "in")
    args = {"fuzz-corpus": ["fuzz", "--runs", "5", "--corpus", str(a_file),
                            "--findings", str(tmp_path / "f")],
            "fuzz-findings": ["fuzz", "--runs", "5", "--findings", "/proc/moe-harness/x"],
            "minimize": ["minimize", str(finding), "--bug", "topk-nan-argmax", "-o",
                         str(a_file)],
            "corpus-add": ["corpus", "add", str(finding), "--corpus-root", str(a_file)],
            }[command]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert ("a-file" in line and "not a directory" in line) or "/proc/moe-harness" in line
    assert a_file.read_text() == "not a directory"


def test_readme_main_job_rerun_says_the_finding_is_known_and_stops(tmp_path, capsys,
                                                                  monkeypatch):
    """The README's main job twice in the same folder: the second run meets the bug again,
    says it is known, and stops (exit 1) instead of running its whole budget."""
    monkeypatch.chdir(tmp_path)
    job = ["fuzz", "--bug", "topk-nan-argmax", "--time", "60", "--stop-on-first"]
    assert main(job) == 1
    first = capsys.readouterr().out
    assert "findings (" in first and "new)" in first
    assert main([*job, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["reason"] == "known finding" and doc["known"]
    assert doc["new_findings"] == [] and doc["seconds"] < 45
    assert all(f["earlier"] for f in doc["findings"])
    assert main(job) == 1
    assert f"{doc['known'][0]} is already known" in capsys.readouterr().out


def test_findings_table_status_and_minimised_file_agree(tmp_path, capsys):
    """One truth: the table's severity is the minimised file's, and status.json names the
    minimised file that exists."""
    findings = tmp_path / "f"
    assert main(["fuzz", "--bug", "topk-nan-argmax", "--time", "60", "--stop-on-first",
                 "--findings", str(findings)]) == 1
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()
            if line.startswith("gating:")]
    assert rows
    (run,) = (findings / ".fuzz-run").iterdir()  # the campaign's own run directory
    status = json.loads((run / "status.json").read_text())
    by_sig = {f["signature"]: f for f in status["findings"]}
    for sig, severity, _s, _execs, _repro, minimized in rows:
        assert minimized and Path(minimized).exists()
        _, meta = corpus.load(minimized)
        assert meta.extra["severity"] == severity
        assert by_sig[sig]["minimized"] == minimized and by_sig[sig]["severity"] == severity


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


def test_fuzz_ray_without_ray_installed_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    assert main(["fuzz", "--ray", "local", "--findings", str(tmp_path), "--runs", "5"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "pip install 'moe-harness[ray]'" in err[0]
