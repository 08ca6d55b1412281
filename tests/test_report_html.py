"""The campaign report (harness/report/rundir.py, html.py): read, render, open in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.cli import main
from harness.errors import HarnessError
from harness.report.html import write_report
from harness.report.rundir import read_run

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    """A real campaign from an empty corpus that finds the planted variant."""
    root = tmp_path_factory.mktemp("campaign")
    assert main(["fuzz", "--bug", "topk-nan-argmax", "--time", "60", "--stop-on-first",
                 "--findings", str(root / "findings")]) == 1
    return root / "findings"


def test_reader_takes_a_findings_dir_or_its_run_dir(campaign):
    camp = read_run(campaign)
    (run,) = (campaign / ".fuzz-run").iterdir()  # the campaign's own run directory
    assert camp.path == run and read_run(camp.path).path == camp.path
    assert camp.samples and camp.samples[-1].executions >= camp.samples[0].executions
    assert camp.timed  # its stats.jsonl: samples with a clock
    assert camp.log == run / "w0" / "libfuzzer.log"
    this = [f for f in camp.findings if not f["earlier"]]
    assert this and all(f["signature"].startswith("gating:") for f in this)
    assert camp.corpus_dir == campaign / "corpus"


def test_reader_reads_the_older_single_run_directory(tmp_path):
    """Before campaigns had their own directories: `.fuzz-run/` itself, no stats.jsonl, the
    samples from libFuzzer's log (indexed by executions)."""
    run = tmp_path / "findings" / ".fuzz-run"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"findings_dir": str(tmp_path / "findings"),
                                                 "corpus_dir": str(tmp_path / "c")}))
    (run / "status.json").write_text(json.dumps({"executions": 9, "findings": []}))
    (run / "libfuzzer.log").write_text(
        "#2\tINITED cov: 10 ft: 12 corp: 1/1b exec/s: 0 rss: 300Mb\n"
        "#9\tNEW    cov: 14 ft: 20 corp: 3/9b lim: 4 exec/s: 4 rss: 300Mb L: 3/3 MS: 1 Custom-\n")
    camp = read_run(tmp_path / "findings")
    assert camp.path == run and not camp.timed and camp.log == run / "libfuzzer.log"
    assert [(x.executions, x.coverage, x.features) for x in camp.samples] == [(2, 10, 12),
                                                                           (9, 14, 20)]


def test_reader_prefers_the_stats_samples_of_a_per_campaign_run_dir(tmp_path):
    run = tmp_path / "findings" / ".fuzz-run" / "host-1"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"backend": "cpu", "bugs": [],
                                                 "findings_dir": str(tmp_path / "findings"),
                                                 "corpus_dir": str(tmp_path / "c")}))
    (run / "status.json").write_text(json.dumps({"seconds": 3.0, "executions": 30,
                                                 "findings": []}))
    (run / "stats.jsonl").write_text(
        "\n".join(json.dumps({"seconds": t, "executions": 10 * t, "edges": 100 + t,
                              "features": 200 + t, "exec_per_s": 10.0}) for t in (1, 2, 3))
        + "\n{\"cut")  # a line cut by a killed run
    older = tmp_path / "findings" / ".fuzz-run" / "host-0"
    older.mkdir()
    (older / "config.json").write_text("{}")
    os.utime(older / "config.json", (0, 0))
    camp = read_run(tmp_path / "findings")
    assert camp.path == run and camp.timed
    assert [(s.seconds, s.coverage, s.features) for s in camp.samples] == [
        (1, 101, 201), (2, 102, 202), (3, 103, 203)]
    with pytest.raises(HarnessError, match="no fuzz run"):
        read_run(tmp_path)


def test_page_is_self_contained_with_links_to_reproducers(campaign, tmp_path, capsys):
    page = tmp_path / "out" / "report.html"
    assert main(["report", str(campaign), "-o", str(page), "--max-inputs", "50"]) == 0
    assert "wrote" in capsys.readouterr().out
    text = page.read_text()
    assert not re.search(r"<script[^>]+src=", text)  # plotly.js inlined, nothing fetched
    assert text.count('class="plotly-graph-div"') == 4
    hrefs = re.findall(r'<a href="([^"]+\.json)"', text)
    assert hrefs and all((page.parent / h).resolve().exists() for h in hrefs)
    assert "minimized" in hrefs[0]
    assert "gating" in text and "Per-stage coverage" in text and "moe-harness run" in text


def test_report_bad_input_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none"), "-o", str(tmp_path / "r.html")]) == 2
    assert main(["report", str(tmp_path), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2 and "Traceback" not in err


def _browser() -> str | None:
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


def render(page: Path) -> tuple[str, list[str]]:
    """The DOM after the page's scripts ran, and every console message it printed."""
    proc = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
                           "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return proc.stdout, console


@pytest.mark.skipif(_browser() is None, reason="no chromium here (.ci/run installs it)")
def test_page_renders_in_headless_chromium_without_console_errors(campaign, tmp_path):
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    assert render(broken)[1], "the check must see a page's errors"
    page, _ = write_report(campaign, tmp_path / "report.html", max_inputs=20)
    dom, console = render(page)
    assert console == []
    assert dom.count('class="main-svg"') >= 4  # every figure drawn by plotly.js
    assert "gating:" in dom
