"""pytest plugin: every moe-harness corpus file is a test item (entry point `pytest11`:
`moe_harness`).

    pytest --moe-corpus corpus/                  # or, in the ini file: moe_corpus = corpus
    pytest corpus/bugs/grid-y-overflow/x.json    # one case; its test id is its path
    pytest -n auto --moe-backend cuda            # one GPU per worker, each case isolated

Each item replays its case and checks the expectations stored in its metadata
(`harness.corpus.expect.checks_for`): the fixed chain clean, and each listed variant set giving its
finding signature; `--moe-bug NAME` (repeatable) checks that variant set only ("fixed": the
fixed chain only). A failure shows the stage, the invariant, the offending entries beside the
oracle's, and the `moe-harness run ...` command that reproduces it.

With `--moe-backend cuda` (or a `--moe-target` whose `isolate` is true, or `--moe-isolate`, or
an explicit `--moe-timeout`) each check runs in a child process (`harness.isolation`): a
sticky CUDA error or a crash fails that item only, and a hang is cut after `--moe-timeout`
seconds (per replay: the fixed chain and each variant set of an item). Without a GPU, cuda
items skip. Under pytest-xdist each worker pins itself to one GPU (`harness.gpus`: most free
memory first; `--moe-gpus 0,1` restricts).

Without a corpus option, the plugin collects nothing (a .json file named on the command line
is replayed if it is a case file). The ini option `moe_corpus` (paths relative to the ini
file) adds its directories when pytest runs its default selection (no paths given), as
`testpaths` does; `--moe-corpus` always adds. Thin: the work is in `harness.corpus.expect`,
`harness.isolation`, `harness.gpus` and `harness.corpus`; nothing here imports torch until
an item runs.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.errors import HarnessError

DEFAULT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Settings:
    """The plugin's options, resolved once per pytest process."""

    #: every .json file under these is a corpus case
    roots: tuple[Path, ...] = ()
    #: .json case files named on the command line, outside the roots
    explicit: frozenset[Path] = frozenset()
    #: roots added to the paths pytest collects
    added: tuple[Path, ...] = ()
    target: str = "cpu"
    backend: str = "cpu"
    bugs: tuple[str, ...] | None = None
    timeout: float | None = None
    isolate: bool = False
    gpu: int | None = None

    @property
    def active(self) -> bool:
        return bool(self.roots or self.explicit)


@dataclass
class _State:
    """What items share within one pytest process: the in-process target, the isolated
    child, whether a GPU is present."""

    target: Any = None
    target_error: HarnessError | None = None
    runner: Any = None
    gpu_present: bool | None = None


SETTINGS = pytest.StashKey[Settings]()
STATE = pytest.StashKey[_State]()


class CorpusMismatch(Exception):
    """An item's replay did not meet its expectations (the message is the whole report)."""


# -- options -----------------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("moe-harness", "replay moe-harness corpus files as test items")
    group.addoption("--moe-corpus", action="append", default=[], metavar="DIR",
                    help="collect every case file under DIR (repeatable)")
    group.addoption("--moe-backend", choices=("cpu", "cuda"), default="cpu",
                    help="backend the corpus replays on (default cpu)")
    group.addoption("--moe-target", default=None, metavar="MODULE:ATTR",
                    help="replay on your own harness.backends.Target (an instance, a class or "
                         "a factory) instead of --moe-backend")
    group.addoption("--moe-bug", action="append", default=None, metavar="NAME",
                    help="check the expectations with this bug variant on (repeatable; "
                         "'fixed': the fixed chain only); default: every stored expectation")
    group.addoption("--moe-timeout", type=float, default=None, metavar="SECONDS",
                    help=f"time-out of each isolated replay (default {DEFAULT_TIMEOUT:g} s; "
                         "giving it isolates the items)")
    group.addoption("--moe-gpus", default=None, metavar="0,1",
                    help="GPUs (NVML indices) the xdist workers may be pinned to")
    group.addoption("--moe-isolate", action="store_true", default=False,
                    help="replay every item in a child process (a crash fails one item)")
    parser.addini("moe_corpus", type="paths", default=[],
                  help="corpus directories replayed when pytest runs its default selection")


def _settings(config: pytest.Config) -> Settings:
    opt = config.getoption
    invocation = config.invocation_params.dir
    roots = [Path(invocation, p) for p in opt("moe_corpus")]
    for p in roots:
        if not p.exists():
            raise pytest.UsageError(f"--moe-corpus {p}: no such file or directory")
    default_selection = config.args_source != pytest.Config.ArgsSource.ARGS
    for p in config.getini("moe_corpus"):
        if Path(p).exists():
            roots.append(Path(p))
        elif default_selection:
            raise pytest.UsageError(f"ini option moe_corpus: {p}: no such directory")
    explicit = set()
    if not default_selection:
        for arg in config.args:
            path = Path(invocation, arg.split("::")[0])
            if path.suffix == ".json" and path.is_file() and _looks_like_case(path):
                explicit.add(path.resolve())
    roots = tuple(dict.fromkeys(p.resolve() for p in roots))
    if not roots and not explicit:
        return Settings()

    bugs = opt("moe_bug")
    if bugs is not None:
        from harness.bugs import VARIANTS

        bugs = tuple(sorted({b for b in bugs if b != "fixed"}))
        for b in bugs:
            if b not in VARIANTS:
                raise pytest.UsageError(f"--moe-bug {b}: unknown bug variant (known: "
                                        f"{', '.join(sorted(VARIANTS))})")
    target = opt("moe_target") or opt("moe_backend")
    gpu = _pin_gpu(config, target)
    from harness.backends import target_traits

    if str(invocation) not in sys.path:  # `--moe-target mykernels:Target` from the project
        sys.path.append(str(invocation))
    try:
        backend, wants_isolation = target_traits(target)
        isolate = opt("moe_isolate") or wants_isolation or opt("moe_timeout") is not None
    except HarnessError as exc:
        raise pytest.UsageError(f"--moe-target: {exc}") from None
    timeout = opt("moe_timeout")
    if timeout is not None and timeout <= 0:
        raise pytest.UsageError(f"--moe-timeout {timeout:g}: must be > 0")
    # what is added to the paths pytest collects: --moe-corpus always, the ini's directories
    # only for the default selection (as testpaths)
    added = tuple(dict.fromkeys(Path(invocation, p).resolve() for p in opt("moe_corpus")))
    if default_selection:
        added = roots
    return Settings(roots, frozenset(explicit), added, target, backend, bugs,
                    timeout if timeout is not None else DEFAULT_TIMEOUT, isolate, gpu)


def _looks_like_case(path: Path) -> bool:
    """A cheap sniff: a .json named on the command line is ours if it has a schema and a case."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return '"schema"' in head and '"case"' in head


def _pin_gpu(config: pytest.Config, target: str) -> int | None:
    """Pin this process (an xdist worker, or any process with --moe-gpus) to one GPU."""
    from harness import gpus

    worker = getattr(config, "workerinput", None)
    spec = config.getoption("moe_gpus")
    if target == "cpu" or (worker is None and spec is None):
        return None
    try:
        candidates = gpus.parse_gpu_list(spec) if spec else gpus.visible_candidates()
    except HarnessError as exc:
        raise pytest.UsageError(f"--moe-gpus: {exc}") from None
    index = int(worker["workerid"].removeprefix("gw")) if worker else 0
    gpu = gpus.choose_gpu(index, candidates)
    if gpu is not None:
        gpus.pin(gpu)
    return gpu


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    settings = _settings(config)
    config.stash[SETTINGS] = settings
    config.stash[STATE] = _State()
    for root in settings.added:  # collected as if named on the command line
        config.args.append(str(root))


def pytest_unconfigure(config: pytest.Config) -> None:
    state = config.stash.get(STATE, None)
    if state is not None and state.runner is not None:
        state.runner.close()
        state.runner = None


def pytest_report_header(config: pytest.Config) -> list[str]:
    s = config.stash.get(SETTINGS, Settings())
    if not s.active:
        return []
    bugs = "every stored expectation" if s.bugs is None else ("+".join(s.bugs) or "fixed")
    where = ", ".join(os.path.relpath(p, config.invocation_params.dir) for p in s.roots)
    line = f"moe-harness: corpus {where or '(files given)'} on {s.target}, bugs: {bugs}"
    if s.isolate:
        line += f", isolated (time-out {s.timeout:g} s)"
    return [line]


# -- collection --------------------------------------------------------------------------------


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Item | None:
    if file_path.suffix != ".json":
        return None
    s = parent.config.stash.get(SETTINGS, Settings())
    if not s.active:
        return None
    path = file_path.resolve()
    if path not in s.explicit and not any(path.is_relative_to(r) for r in s.roots):
        return None
    # the item is the file: its test id is the file's path (as a File collector's would be)
    name = file_path.name
    nodeid = f"{parent.nodeid}/{name}" if parent.nodeid else name
    return CorpusItem.from_parent(parent, path=file_path, name=name, nodeid=nodeid)


class CorpusItem(pytest.Item):
    """One corpus case file: replayed against every expectation it stores."""

    @property
    def display_path(self) -> str:
        return os.path.relpath(self.path, self.config.invocation_params.dir)

    def setup(self) -> None:
        s = self.config.stash[SETTINGS]
        self.user_properties.append(("moe_target", s.target))
        if s.gpu is not None:
            self.user_properties.append(("moe_gpu", s.gpu))
        if s.target == "cuda" and not _gpu_present(self.config):
            _skip_here("needs a CUDA GPU (--moe-backend cuda; torch.cuda.is_available() is "
                       "False)")

    def runtest(self) -> None:
        from harness import corpus
        from harness.corpus import expect, explain

        s = self.config.stash[SETTINGS]
        case, meta = corpus.load(self.path)
        checks = expect.checks_for(meta, s.backend, s.bugs)
        if not checks:
            _skip_here(f"no stored expectation for {s.backend} with bugs "
                       f"{'+'.join(s.bugs or ())}")
        if s.isolate:
            results = expect.run_checks_in(_runner(self.config), str(self.path), s.target,
                                           checks, s.timeout)
        else:
            results = expect.run_checks(case, _target(self.config), checks)
        for r in results:
            self.user_properties.append((f"moe {r.check.label}", r.got()))
        if not all(r.ok for r in results):
            raise CorpusMismatch(explain.explain(self.display_path, s.target, case, results))

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style=None):
        if isinstance(excinfo.value, CorpusMismatch):
            return str(excinfo.value)
        if isinstance(excinfo.value, HarnessError):
            return f"{self.display_path}: {type(excinfo.value).__name__}: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, 0, f"moe-harness case {self.display_path}"


def _skip_here(reason: str) -> None:
    """Skip, reported at the case file (as a skip mark would be), not at this module."""
    try:
        exc = pytest.skip.Exception(reason, _use_item_location=True)
    except TypeError:  # a pytest without the (private) argument: reported here instead
        exc = pytest.skip.Exception(reason)
    raise exc


def _gpu_present(config: pytest.Config) -> bool:
    state = config.stash[STATE]
    if state.gpu_present is None:
        import torch

        state.gpu_present = bool(torch.cuda.is_available())
    return state.gpu_present


def _target(config: pytest.Config):
    """The in-process target, built once (a failure to build fails every item alike)."""
    state = config.stash[STATE]
    if state.target is None and state.target_error is None:
        from harness.backends import resolve_target

        try:
            state.target = resolve_target(config.stash[SETTINGS].target)
        except HarnessError as exc:
            state.target_error = exc
    if state.target_error is not None:
        raise state.target_error
    return state.target


def _runner(config: pytest.Config):
    state = config.stash[STATE]
    if state.runner is None:
        from harness.isolation import Isolated

        target = config.stash[SETTINGS].target
        state.runner = Isolated(cwd=str(config.invocation_params.dir),
                                setup=[("harness.corpus.expect:prepare_target",
                                        {"target": target})])
    return state.runner
