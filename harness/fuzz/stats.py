"""Live statistics of a campaign: the memory of its processes, its GPUs, one sample every
`stats_every` seconds appended to the run's `stats.jsonl`, and the progress line.

A sample (one JSON object per line, so `tail -f`, `jq` and pandas read the file as it grows):

    {"time": unix seconds, "seconds": since the start, "executions", "exec_per_s" (since
     the start), "exec_per_s_recent" (since the previous sample), "edges", "features",
     "semantic", "corpus_size", "findings", "restarts", "fuzzer_restarts", "workers",
     "synced_inputs" (inputs handed between Ray workers),
     "rss_mb": {"parent": MB, "w0": MB, "w0/case-worker": MB, ...},
     "gpus": {"0": {"util_pct", "mem_used_mb", "mem_total_mb"}}}       (cuda, from NVML)

Memory is read from /proc (Linux): every process of the campaign, by its role.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's list; empty where /proc cannot tell)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents first."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop(0)
        seen.append(p)
        todo += children(p)
    return seen


def rss_mb(pid: int) -> float | None:
    """Resident memory of `pid` in MB; None when it is gone (0 for a zombie)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * PAGE / 2**20
    except (OSError, IndexError, ValueError):
        return None


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def role(cmdline: str) -> str:
    """What a process of a campaign is, from its command line."""
    for needle, name in (("child_main", "fuzzer"), ("harness.isolation", "case-worker"),
                         ("compute-sanitizer", "sanitizer"), ("sanitizer.child", "sanitizer")):
        if needle in cmdline:
            return name
    return cmdline.split(" ")[0].rsplit("/", 1)[-1] or "process"


def tree_rss(pid: int, label: str) -> dict[str, float]:
    """RSS (MB) of `pid` (as `label`) and of each of its descendants ("label/role", numbered
    when a role repeats)."""
    out: dict[str, float] = {}
    for p in process_tree(pid):
        mb = rss_mb(p)
        if not mb:
            continue
        name = label if p == pid else f"{label}/{role(command_line(p))}"
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}#{n}"
        out[key] = round(mb, 1)
    return out


class StatsLog:
    """Appends one sample per call to a JSON-lines file (line-buffered, append-only: a killed
    campaign leaves whole lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "a", buffering=1, encoding="utf-8")
        self._last: tuple[float, int] | None = None

    def sample(self, status, rss: dict[str, float],
               gpus: dict[int, dict[str, float]] | None = None) -> dict:
        """Build the sample of `status` (a `FuzzStatus`), append it, return it."""
        now = time.time()
        recent = status.exec_per_s
        if self._last is not None and status.seconds > self._last[0]:
            recent = (status.executions - self._last[1]) / (status.seconds - self._last[0])
        self._last = (status.seconds, status.executions)
        obj = {"time": round(now, 3), "seconds": round(status.seconds, 2),
               "executions": status.executions, "exec_per_s": round(status.exec_per_s, 2),
               "exec_per_s_recent": round(recent, 2), "edges": status.coverage,
               "features": status.features, "semantic": status.semantic,
               "corpus_size": status.corpus_size, "findings": len(status.findings),
               "restarts": status.restarts, "fuzzer_restarts": status.fuzzer_restarts,
               "workers": status.workers, "synced_inputs": status.synced_inputs,
               "rss_mb": rss}
        if gpus is not None:
            obj["gpus"] = {str(k): v for k, v in gpus.items()}
        self._file.write(json.dumps(obj) + "\n")
        return obj

    def close(self) -> None:
        self._file.close()


def progress_line(status) -> str:
    """The one-line summary of a `FuzzStatus` (the CLI's progress line)."""
    s = status
    line = (f"{s.seconds:7.1f} s  {s.executions:>9,} execs  {s.exec_per_s:7,.0f}/s  "
            f"cov {s.coverage}  ft {s.features}  semantic {s.semantic}  "
            f"corpus {s.corpus_size}  findings {len(s.findings)}")
    if s.workers > 1:
        line += f"  workers {s.workers}"
    if s.restarts or s.fuzzer_restarts:
        line += f"  restarts {s.restarts}+{s.fuzzer_restarts}"
    rss = s.stats.get("rss_mb") if s.stats else None
    if rss:
        line += f"  rss {sum(rss.values()):,.0f} MB"
    gpus = s.stats.get("gpus") if s.stats else None
    if gpus:
        line += "  " + " ".join(f"gpu{k} {v['util_pct']:.0f}% {v['mem_used_mb']:,.0f} MB"
                                for k, v in gpus.items())
    return line
