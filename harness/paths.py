"""Output paths checked before any work is spent on them: one clear error, never a traceback.

A user who gives `--corpus FILE`, `--findings /proc/x` or `-o` on a read-only mount should hear
about it in one line (exit 2) before a fuzz budget runs, not from an `OSError` deep inside a
write. Every command that writes a directory or a file resolves it through here first.
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.errors import ConfigError


def output_dir(path: str | os.PathLike, option: str) -> Path:
    """`path` as an existing, writable directory (made with its parents if missing);
    `ConfigError` naming `option` and the path when it is a file, cannot be made or is not
    writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(option, f"{p} exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(option, f"cannot create the directory {p}: "
                                  f"{exc.strerror or exc}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ConfigError(option, f"the directory {p} is not writable")
    return p


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """`output_dir`'s checks without making anything: `path` is a directory or can be made
    under its nearest existing ancestor (a directory we may write into). What only the
    attempt can tell (a read-only mount, /proc) `output_dir` reports when it makes it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(option, f"{p} exists and is not a directory")
    ancestor = p
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not p.exists() and (not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK)):
        raise ConfigError(option, f"cannot create the directory {p}: {ancestor} is not a "
                                  "writable directory")
    return p


def output_file(path: str | os.PathLike, option: str) -> Path:
    """`path` as a file we can (over)write: not a directory, its parent made if missing and
    writable; `ConfigError` naming `option` otherwise. Nothing is written here."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(option, f"{p} is a directory, expected a file name")
    output_dir(p.parent if str(p.parent) else Path("."), option)
    if p.exists() and not os.access(p, os.W_OK):
        raise ConfigError(option, f"{p} is not writable")
    return p


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same directory and a rename: a reader
    (or a CI step uploading it) sees the old file or the whole new one."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p
