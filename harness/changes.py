"""Which stages of the chain a change touches: changed files (`git diff --name-only`) -> stages.

ClusterFuzzLite's code-change mode fuzzes what a pull request changed. Our one fuzz target is
the whole chain, so `moe-harness gate --since REF` spends its time on the stages whose files
changed: a kernel (`kernels/<stage>.cu`), the stage's CPU model (`harness/chain/<stage>.py`),
its checks (`harness/invariants/*.py`). A file the table does not name is matched by the stage
words in its name (a user's `my_topk_gating.cu` -> gating, `moe_align_block_size.cu` ->
sort_align, `lora_*.py` -> lora_align); other source files (C++, CUDA, Python) may reach any
stage (all of them); anything else (docs, workflows, the corpus) none.
"""

from __future__ import annotations

import fnmatch
import subprocess
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from harness.chain import STAGES
from harness.errors import ConfigError

#: repository paths (fnmatch patterns, first match wins) -> the stages they implement
PATH_STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernels/gating.cu", ("gating",)),
    ("kernels/a2a_sanitize.cu", ("dispatch",)),
    ("kernels/sort_align.cu", ("sort_align",)),
    ("kernels/experts.cu", ("experts", "finalize")),
    ("kernels/lora_align.cu", ("lora_align",)),
    ("kernels/redzone_selftest.cu", ()),
    ("harness/chain/gating.py", ("gating",)),
    ("harness/chain/dispatch.py", ("dispatch",)),
    ("harness/chain/sort_align.py", ("sort_align",)),
    ("harness/chain/experts.py", ("experts", "finalize")),
    ("harness/chain/lora_align.py", ("lora_align",)),
    ("harness/invariants/routing.py", ("gating", "dispatch")),
    ("harness/invariants/layout.py", ("sort_align", "lora_align")),
    ("harness/invariants/compute.py", ("experts", "finalize")),
    # the harness's own tooling: changing it changes no kernel's behaviour
    ("harness/cli.py", ()), ("harness/output.py", ()), ("harness/gate.py", ()),
    ("harness/changes.py", ()), ("harness/report/*", ()), ("harness/pytest_plugin.py", ()),
    ("harness/fuzz/*", ()), ("harness/sanitizer/*", ()), ("harness/corpus/*", ()),
    ("tests/*", ()), ("tools/*", ()), ("corpus/*", ()), (".github/*", ()), (".ci/*", ()),
)
#: words in a file name that name a stage (checked in this order: "lora_align" before "align")
NAME_WORDS: tuple[tuple[str, str], ...] = (
    ("lora", "lora_align"), ("gating", "gating"), ("topk", "gating"), ("router", "gating"),
    ("dispatch", "dispatch"), ("a2a", "dispatch"), ("all_to_all", "dispatch"),
    ("sort", "sort_align"), ("align", "sort_align"), ("finalize", "finalize"),
    ("unpermute", "finalize"), ("combine", "combine"), ("expert", "experts"),
    ("gemm", "experts"),
)
SOURCE_SUFFIXES = (".cu", ".cuh", ".h", ".hpp", ".cc", ".cpp", ".c", ".py")


def stages_of(path: str) -> tuple[str, ...]:
    """The stages a change to `path` (relative to the repository root) may affect."""
    posix = str(PurePosixPath(path))
    for pattern, stages in PATH_STAGES:
        if fnmatch.fnmatch(posix, pattern):
            return stages
    name = PurePosixPath(posix).name.lower()
    named = [stage for word, stage in NAME_WORDS if word in name]
    if named:
        return (named[0],)
    if name.endswith(SOURCE_SUFFIXES):
        return STAGES
    return ()


def changed_stages(paths: Iterable[str]) -> tuple[str, ...]:
    """The stages any of `paths` touches, in the chain's run order (`harness.chain.STAGES`)."""
    touched = {s for p in paths for s in stages_of(p)}
    return tuple(s for s in STAGES if s in touched)


def _git(repo: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError("--since", f"cannot run git: {exc}") from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["git failed"])[-1]
        raise ConfigError("--since", f"git {' '.join(args)}: {why}")
    return proc.stdout


def changed_files(since: str, repo: str | Path = ".") -> list[str]:
    """The files that differ between the merge base of `since` and HEAD and the working tree
    (a pull request's changes, committed or not), relative to the repository root.
    `ConfigError` for a path that is not in a git repository or a ref git does not know."""
    repo = Path(repo)
    _git(repo, "rev-parse", "--verify", "--quiet", f"{since}^{{commit}}")
    try:
        base = _git(repo, "merge-base", since, "HEAD").strip()
    except ConfigError:  # unrelated histories: the ref itself
        base = since
    return [line for line in _git(repo, "diff", "--name-only", base).splitlines() if line]
