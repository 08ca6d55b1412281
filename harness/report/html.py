"""One self-contained HTML page per fuzz campaign (`moe-harness report RUN_DIR -o FILE`).

The page holds: the verdict and the run's numbers; coverage (edges) and features over time;
executions per second over time; the findings on the same time axis, each linked to its
reproducer, and as a table with the command that reproduces it; the coverage of each stage
(the CPU model's branch counters "stage.branch" reached by the campaign's corpus, replayed on
the cpu backend); the configuration. Plots are plotly figures with plotly.js inlined once:
the file opens anywhere, offline. Links to reproducers are relative to the page.
"""

from __future__ import annotations

import html
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.paths import write_text_atomic
from harness.report.rundir import Campaign, read_run

#: corpus inputs replayed for the per-stage coverage, and the seconds that may take
MAX_INPUTS = 300
MAX_SECONDS = 60.0
_STAGE_ORDER = ("gating", "dispatch", "sort_align", "experts", "finalize", "combine",
                "lora_align")


@dataclass
class StageCoverage:
    """Distinct branch counters of one stage the corpus reached, and their total hits."""

    stage: str
    branches: list[str]
    hits: int


def stage_coverage(camp: Campaign, max_inputs: int = MAX_INPUTS,
                   max_seconds: float = MAX_SECONDS) -> tuple[list[StageCoverage], int]:
    """Replay (up to `max_inputs` of) the campaign's corpus on the cpu backend with its
    variants: per stage, the branch counters reached. Returns them and the inputs replayed."""
    from harness import corpus
    from harness.api import execute
    from harness.backends import resolve_target
    from harness.fuzz import codec
    from harness.fuzz.engine import codec_limits

    d = camp.corpus_dir
    if d is None or not d.is_dir():
        return [], 0
    files = sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith("."))
    files = files[:max_inputs]
    limits = codec_limits("cpu")
    bugs = tuple(camp.config.get("bugs", ()))
    target = resolve_target("cpu")
    hits: Counter[str] = Counter()
    start, done = time.monotonic(), 0
    try:
        for f in files:
            if time.monotonic() - start > max_seconds:
                break
            try:
                case = (corpus.load(f)[0] if f.suffix == ".json"
                        else codec.decode(f.read_bytes(), limits))
                hits.update(execute(case, target, bugs).coverage)
            except (HarnessError, OSError):
                continue
            done += 1
    finally:
        target.close()
    by_stage: dict[str, list[str]] = {}
    for name in hits:
        by_stage.setdefault(name.split(".", 1)[0], []).append(name)
    order = {s: i for i, s in enumerate(_STAGE_ORDER)}
    return [StageCoverage(s, sorted(names), sum(hits[n] for n in names))
            for s, names in sorted(by_stage.items(), key=lambda kv: order.get(kv[0], 99))], done


def _rel(target: str | None, page_dir: Path, camp: Campaign) -> str | None:
    """A link from the page to a file the run names (relative to where the run ran)."""
    if not target:
        return None
    return Path(os.path.relpath(camp.resolve(target).resolve(), page_dir.resolve())).as_posix()


def _figures(camp: Campaign, page_dir: Path, coverage: list[StageCoverage]) -> list[str]:
    import plotly.graph_objects as go

    timed = camp.timed
    axis = "seconds" if timed else "executions (the log has no clock)"
    xs = [s.seconds if timed else s.executions for s in camp.samples]
    figs = []
    cov = go.Figure()
    cov.add_scatter(x=xs, y=[s.coverage for s in camp.samples], name="coverage (edges)",
                    mode="lines+markers")
    cov.add_scatter(x=xs, y=[s.features for s in camp.samples], name="features",
                    mode="lines+markers")
    cov.update_layout(title="Coverage and features", xaxis_title=axis, yaxis_title="count")
    figs.append(cov)
    eps = go.Figure()
    eps.add_scatter(x=xs, y=[s.exec_per_s for s in camp.samples], name="executions/s",
                    mode="lines+markers")
    eps.update_layout(title="Executions per second", xaxis_title=axis,
                      yaxis_title="executions/s")
    figs.append(eps)
    found = [f for f in camp.findings if not f.get("earlier")
             and f.get("seconds" if timed else "executions") is not None]
    tl = go.Figure()
    links = []
    for f in found:
        href = _rel(f.get("minimized") or f.get("path"), page_dir, camp)
        links.append(f'<a href="{html.escape(href or "", quote=True)}">'
                     f'{html.escape(f["signature"])}</a>')
    tl.add_scatter(x=[f["seconds"] if timed else f["executions"] for f in found],
                   y=[f["signature"] for f in found], mode="markers+text", text=links,
                   textposition="top center", marker={"size": 12, "symbol": "x"},
                   name="findings",
                   hovertext=[f"{f['signature']} [{f.get('severity')}]: {f.get('message')}"
                              for f in found])
    tl.update_layout(title=f"Findings ({len(found)} in this run)", xaxis_title=axis,
                     xaxis_range=[0, max(xs + [f["seconds"] if timed else f["executions"]
                                                   for f in found] + [1])])
    figs.append(tl)
    st = go.Figure()
    st.add_bar(x=[c.stage for c in coverage], y=[len(c.branches) for c in coverage],
               text=[f"{c.hits:,} hits" for c in coverage], name="branches reached",
               hovertext=[", ".join(c.branches) for c in coverage])
    st.update_layout(title="Per-stage coverage (CPU model branch counters the corpus reaches)",
                     xaxis_title="stage", yaxis_title="distinct branches")
    figs.append(st)
    return [fig.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"fig{i}",
                        config={"responsive": True})
            for i, fig in enumerate(figs)]


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(camp: Campaign, page: Path, coverage: list[StageCoverage], replayed: int) -> str:
    """The page's HTML (`page`: where it will be written, for relative links)."""
    from harness.corpus.explain import reproduce_command

    c, s = camp.config, camp.status
    esc = html.escape
    page_dir = page.parent
    this = [f for f in camp.findings if not f.get("earlier")]
    verdict = f"{len(this)} finding(s)" if this else "no new findings"
    numbers = (f"backend <b>{esc(str(c.get('backend', '?')))}</b>, variants "
               f"<b>{esc(', '.join(c.get('bugs', [])) or 'none (fixed chain)')}</b>, seed "
               f"{esc(str(c.get('seed')))}; {float(s.get('seconds', 0)):.1f} s, "
               f"{int(s.get('executions', 0)):,} executions, stopped: "
               f"{esc(str(s.get('reason', '?')))}")
    rows = []
    for f in camp.findings:
        repro = f.get("minimized") or f.get("path")
        href = _rel(repro, page_dir, camp)
        when = ("earlier run" if f.get("earlier") else
                f"{float(f['seconds']):.1f} s, {int(f.get('executions') or 0):,} execs"
                if f.get("seconds") is not None else "?")
        cmd = reproduce_command(str(repro), str(c.get("backend", "cpu")), c.get("bugs", []))
        rows.append([f"<code>{esc(f['signature'])}</code>", esc(str(f.get("severity"))), when,
                     f'<a href="{esc(href or "", quote=True)}">{esc(str(repro))}</a>',
                     f"<code>{esc(cmd)}</code>", esc(str(f.get("message", "")))])
    figs = _figures(camp, page_dir, coverage)
    config_rows = [[f"<code>{esc(k)}</code>", f"<code>{esc(str(v))}</code>"]
                   for k, v in sorted(c.items())]
    stage_rows = [[esc(x.stage), str(len(x.branches)), f"{x.hits:,}",
                   esc(", ".join(b.split(".", 1)[1] for b in x.branches))] for x in coverage]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>moe-harness campaign {esc(camp.path.name)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
td, th {{ border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }}
code {{ font-size: 0.95em; }} .verdict {{ font-size: 1.2em; }}
</style></head><body>
<h1>moe-harness campaign</h1>
<p><code>{esc(str(camp.path))}</code></p>
<p class="verdict"><b>{esc(verdict)}</b></p>
<p>{numbers}</p>
<h2>Coverage and speed</h2>
{figs[0]}
{figs[1]}
<h2>Findings</h2>
{figs[2]}
{_table(["signature", "severity", "found", "reproducer", "reproduce", "message"], rows)
 if rows else "<p>none</p>"}
<h2>Per-stage coverage</h2>
<p>{replayed} corpus input(s) replayed on the cpu backend.</p>
{figs[3]}
{_table(["stage", "branches", "hits", "which"], stage_rows) if stage_rows else ""}
<h2>Configuration</h2>
{_table(["option", "value"], config_rows)}
</body></html>
"""


def write_report(run: str | os.PathLike, output: str | os.PathLike,
                 max_inputs: int = MAX_INPUTS) -> tuple[Path, Campaign]:
    """Read the campaign at `run` (a run or findings directory) and write its page to
    `output`; `HarnessError` for a path without a run."""
    camp = read_run(run)
    page = Path(output)
    coverage, replayed = stage_coverage(camp, max_inputs)
    return write_text_atomic(page, render(camp, page, coverage, replayed)), camp
