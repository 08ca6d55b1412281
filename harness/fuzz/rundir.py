"""Each campaign's own directory under the findings directory, so that campaigns sharing a
corpus and a findings directory never read each other's state.

    <findings>/.fuzz-run/<run-id>/
        lock            held (flock) by the campaign's parent while it runs: pid, host
        config.json     the campaign's configuration, start time, what it resumed from
        stats.jsonl     one statistics sample per line (`harness.fuzz.stats`)
        summary.json    the report, written at the end
        w<i>/           worker i: config.json (its fuzzing process'), status.json,
                        libfuzzer.log (appended across restarts), libFuzzer's crash artifacts
        sanitize/       the background sanitizer's scratch

A run id is the start time, the host and the parent's pid: unique on one host and readable
(`ls` sorts them by time). The lock tells a live campaign from a dead one (`running_runs`);
a killed campaign's directory stays for post-mortems.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.fuzz.campaign import RUN_DIR


def new_run_id() -> str:
    host = "".join(c for c in socket.gethostname().split(".")[0] if c.isalnum() or c == "-")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{host or 'host'}-{os.getpid()}"


@dataclass
class RunDir:
    """The directory of one campaign, locked while it runs (`open`, `close`)."""

    root: Path
    run_id: str
    _lock_fd: int | None = None

    @classmethod
    def create(cls, findings_dir: Path, run_id: str | None = None) -> RunDir:
        """A new, locked run directory under `findings_dir`; `HarnessError` if it cannot be
        made (an unwritable findings directory)."""
        run_id = run_id or new_run_id()
        root = Path(findings_dir) / RUN_DIR / run_id
        try:
            root.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            raise HarnessError(f"{root}: a campaign with this run id exists") from None
        except OSError as exc:
            raise HarnessError(f"cannot create the run directory {root}: {exc}") from None
        run = cls(root, run_id)
        run._lock()
        return run

    def _lock(self) -> None:
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        self._lock_fd = fd

    def worker(self, index: int) -> Path:
        """Worker `index`'s directory (made on first use)."""
        d = self.root / f"w{index}"
        d.mkdir(exist_ok=True)
        return d

    @property
    def stats_path(self) -> Path:
        return self.root / "stats.jsonl"

    def close(self) -> None:
        """Release the lock (the directory stays)."""
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
            self._lock_fd = None


def is_running(run_root: Path) -> bool:
    """True while some process holds `run_root`'s lock (a campaign of any host sharing the
    file system, where flock is shared)."""
    try:
        fd = os.open(run_root / "lock", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def running_runs(findings_dir: Path, exclude: str | None = None) -> list[str]:
    """Ids of the campaigns running now on `findings_dir` (but `exclude`)."""
    base = Path(findings_dir) / RUN_DIR
    try:
        roots = sorted(p for p in base.iterdir() if p.is_dir() and p.name != exclude)
    except OSError:
        return []
    return [p.name for p in roots if is_running(p)]
