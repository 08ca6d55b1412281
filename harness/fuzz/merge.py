"""Corpus merge and prune: the smallest set of JSON cases with the same coverage features.

libFuzzer's `-merge=1` keeps, of many inputs, a subset that reaches every feature the whole
set reaches. Here the inputs are corpus JSON files and a case's features are what the fuzzer's
feedback sees of it (`harness.fuzz.features`: the chain's branch counters, the data's
anomalies, the paths crossed with them, the findings), measured by running the case on the cpu
backend once per variant set its expectations name (and the fixed chain): a bug reproducer
kept in the corpus to prove a variant is caught has a feature ("finding" under that variant)
no clean seed has, so merging never drops it.

    profile(path)          -> CaseProfile (features tagged by variant set, buffer bytes)
    cover(profiles)        -> the greedy set cover: most new features first, ties to the
                              smaller case; then every kept case another set covers dropped
    merge(sources, out)    -> `out` keeps what it had; the cases of `sources` that add features
                              are written into it (atomically, content-hashed, `corpus.save`)
    prune(directory)       -> the files of `directory` outside its own cover removed

Files that cannot be loaded or run are reported and left alone (never deleted by `prune`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import corpus
from harness.case import MoECase
from harness.corpus.format import CaseMeta
from harness.errors import HarnessError
from harness.paths import output_dir

#: a feature: (variant set it was seen under, "+"-joined or "" for the fixed chain, feature id)
Feature = tuple[str, int]


@dataclass(frozen=True)
class CaseProfile:
    """One case file as the merge sees it. `stage_features[stage]`: the features named after
    the stage's own branch counters ("cov.<stage>.*"), for picking seeds per stage."""

    path: Path
    case: MoECase
    meta: CaseMeta
    features: frozenset[Feature]
    stage_features: dict[str, frozenset[Feature]]
    #: bytes of the chain's buffers for one run (`MoECase.memory_estimate`): the case's cost
    cost: int
    file_bytes: int

    @property
    def hash(self) -> str:
        return corpus.content_hash(self.case)


def variant_sets(meta: CaseMeta) -> list[tuple[str, ...]]:
    """The fixed chain and every variant set the metadata's expectations name."""
    return sorted({(), *(tuple(sorted(e.bugs)) for e in meta.expect)}, key=lambda s: (len(s), s))


def profile(path: str | os.PathLike, target=None) -> CaseProfile:
    """Load `path` and run it on the cpu backend (or `target`) under each of its variant sets;
    `HarnessError` (a `CorpusError`, a `CaseError`) when it cannot be loaded or run."""
    from harness.api import execute
    from harness.backends import resolve_target
    from harness.chain.runner import chain_mode
    from harness.fuzz.features import feature_id, named_features

    case, meta = corpus.load(path)
    target = target if target is not None else resolve_target("cpu")
    feats: set[Feature] = set()
    by_stage: dict[str, set[Feature]] = {}
    for bugs in variant_sets(meta):
        result = execute(case, target, bugs)
        label = "+".join(bugs)
        with chain_mode(result.case):
            named = named_features(result)
        for name, value in named:
            f = (label, feature_id(name, value))
            feats.add(f)
            if name.startswith("cov."):
                by_stage.setdefault(name[4:].split(".", 1)[0], set()).add(f)
    p = Path(path)
    return CaseProfile(p, case, meta, frozenset(feats),
                       {s: frozenset(v) for s, v in by_stage.items()},
                       sum(b.bytes for b in case.memory_estimate()), p.stat().st_size)


def profile_all(paths: Iterable[Path], progress: Callable[[Path], None] | None = None
                ) -> tuple[list[CaseProfile], dict[Path, str]]:
    """Profiles of the loadable, runnable files (one per distinct case: the same case in two
    files is one profile, its metadata merged), and one line per file left out."""
    from harness.backends import resolve_target

    target = resolve_target("cpu")
    out: dict[str, CaseProfile] = {}
    problems: dict[Path, str] = {}
    for path in paths:
        if progress is not None:
            progress(path)
        try:
            prof = profile(path, target)
        except HarnessError as exc:
            problems[path] = str(exc)
            continue
        h = prof.hash
        if h in out:  # the same case twice: one profile, both files' metadata
            old = out[h]
            out[h] = CaseProfile(old.path, old.case, old.meta.merged(prof.meta), old.features,
                                 old.stage_features, old.cost, old.file_bytes)
        else:
            out[h] = prof
    return list(out.values()), problems


def _smaller(p: CaseProfile) -> tuple:
    return (p.cost, p.file_bytes, str(p.path))


def cover(profiles: Sequence[CaseProfile], covered: Iterable[Feature] = (),
          key: Callable[[CaseProfile], frozenset[Feature]] = lambda p: p.features
          ) -> list[CaseProfile]:
    """A small subset of `profiles` reaching every feature they reach beyond `covered`: greedy
    set cover (the case adding the most new features first, ties to the smaller case), then a
    pass that drops, largest first, every chosen case the others already cover."""
    remaining = set().union(*(key(p) for p in profiles)) - set(covered) if profiles else set()
    pool = sorted(profiles, key=_smaller)
    chosen: list[CaseProfile] = []
    while remaining:
        best = max(pool, key=lambda p: (len(key(p) & remaining), [-x for x in _smaller(p)[:2]]))
        gain = key(best) & remaining
        if not gain:
            break
        chosen.append(best)
        remaining -= gain
        pool.remove(best)
    for p in sorted(chosen, key=_smaller, reverse=True):
        others = set(covered).union(*(key(q) for q in chosen if q is not p))
        if key(p) <= others:
            chosen.remove(p)
    return sorted(chosen, key=_smaller)


@dataclass
class MergeResult:
    """What a merge or prune did: files written (or kept), files dropped, files left out
    (with why), and the features the result reaches."""

    kept: list[Path] = field(default_factory=list)
    dropped: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    features: int = 0
    inputs: int = 0

    def to_json(self) -> dict:
        return {"kept": [str(p) for p in self.kept], "dropped": [str(p) for p in self.dropped],
                "problems": self.problems, "features": self.features, "inputs": self.inputs}


def _lines(problems: dict[Path, str]) -> list[str]:
    return [f"{path}: left out: {why}" for path, why in problems.items()]


def _files(sources: Iterable[str | os.PathLike]) -> list[Path]:
    out: list[Path] = []
    for src in sources:
        p = Path(src)
        if not p.exists():
            raise HarnessError(f"{p}: no such corpus directory or case file")
        out += list(corpus.iter_corpus(p))
    return out


def merge(sources: Sequence[str | os.PathLike], out: str | os.PathLike,
          progress: Callable[[Path], None] | None = None) -> MergeResult:
    """Add to the corpus directory `out` the fewest cases of `sources` that reach the features
    `out` does not reach yet (what `out` holds is kept, as libFuzzer's first corpus is).
    Written as `<hash>.json` under `out` with their metadata (merged where `out` has the
    case already)."""
    files = _files(sources)
    out_dir = output_dir(out, "-o")
    files = [f for f in files if not f.resolve().is_relative_to(out_dir.resolve())]
    existing, problems = profile_all(list(corpus.iter_corpus(out_dir)), progress)
    have = {p.hash for p in existing}
    incoming, more = profile_all(files, progress)
    problems.update(more)
    covered = set().union(*(p.features for p in existing)) if existing else set()
    chosen = cover([p for p in incoming if p.hash not in have], covered)
    result = MergeResult(problems=_lines(problems), inputs=len(files))
    result.kept = [p.path for p in existing]
    for p in chosen:
        result.kept.append(corpus.save(p.case, out_dir, p.meta))
    chosen_ids = {id(p) for p in chosen}
    result.dropped = [p.path for p in incoming if id(p) not in chosen_ids]
    result.features = len(covered.union(*(p.features for p in chosen)))
    return result


def prune(directory: str | os.PathLike, dry_run: bool = False,
          progress: Callable[[Path], None] | None = None) -> MergeResult:
    """Remove from `directory` every case file outside the smallest set with the same
    features (duplicates of one case included); unreadable files stay. `dry_run`: say what
    would go, remove nothing."""
    root = Path(directory)
    if not root.is_dir():
        raise HarnessError(f"{root}: not a corpus directory")
    files = list(corpus.iter_corpus(root))
    profiles, problems = profile_all(files, progress)
    chosen = cover(profiles)
    keep = {p.path for p in chosen}
    result = MergeResult(problems=_lines(problems), inputs=len(files), kept=sorted(keep))
    result.dropped = [f for f in files if f not in keep and f not in problems]
    if not dry_run:  # the same case in two files: the kept one takes both files' metadata
        for p in chosen:
            if p.path.stem == p.hash and p.meta != corpus.load(p.path)[1]:
                corpus.save(p.case, p.path.parent, p.meta)
    if not dry_run:
        for f in result.dropped:
            f.unlink(missing_ok=True)
    result.features = len(set().union(*(p.features for p in chosen))) if chosen else 0
    return result
