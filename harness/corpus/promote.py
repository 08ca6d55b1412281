"""Promoting a finding into the repository corpus, with the expectation it keeps there.

A finding (a case file the fuzzer or a person wrote, `harness.fuzz.store`) becomes a
regression (`corpus/regressions/`) or a seed (`corpus/seeds/`, legal cases only). In the
corpus its metadata promises what the fixed chain must do from now on: clean, on every
backend. Expectations under bug variants (the variant's finding) are kept, so the case also
keeps proving that the variant is caught. Before writing, the case is replayed against the
new expectations (`harness.corpus.expect`) on one backend, so nothing is promoted that fails on
arrival.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from harness import corpus
from harness.backends import resolve_target
from harness.corpus import expect, explain
from harness.corpus.format import CaseMeta, Expectation
from harness.errors import ConfigError, HarnessError, PromotionRefused

#: where each kind of promoted case goes, under the corpus root
KINDS = {"regression": "regressions", "seed": "seeds"}


@dataclass(frozen=True)
class Promoted:
    path: Path
    meta: CaseMeta
    #: the replay's results on the verifying backend (empty when not verified)
    results: tuple = ()
    #: the case was already in the corpus (at `path`): nothing was written
    already: bool = False


def find_case(root: Path, content_hash: str) -> Path | None:
    """The file under the corpus `root` that holds the case of `content_hash` (files are
    named by it, `corpus check` enforces that), or None."""
    return next((p for p in corpus.iter_corpus(root) if p.stem == content_hash), None)


def promoted_meta(meta: CaseMeta, kind: str, source: str) -> CaseMeta:
    """`meta` with the fixed chain expected clean on every backend (replacing whatever the
    finding recorded for it) and the variant expectations kept."""
    expect = (Expectation(None, (), "clean"), *(e for e in meta.expect if e.bugs))
    return dataclasses.replace(meta, expect=expect,
                               extra={**meta.extra, "promoted_as": kind,
                                      "promoted_from": source})


def promote(finding: str | Path, kind: str = "regression", root: str | Path = "corpus",
            verify: str | None = "cpu") -> Promoted:
    """Write `finding` into `root`/regressions or `root`/seeds with its corpus expectation.

    `verify`: the target ("cpu", "cuda", "module:attr") the case is replayed on first
    (None: not replayed). A case already under `root` (any file with its content hash) is
    not written again: the result names that file, `already` set. Raises `CorpusError` for
    an unreadable file, `HarnessError` for a seed that is not legal, `PromotionRefused` when
    the replay does not meet the expectation.
    """
    if kind not in KINDS:
        raise HarnessError(f"--as {kind}: expected one of {', '.join(KINDS)}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError("corpus root", f"{root} exists and is not a directory")
    case, meta = corpus.load(finding)
    existing = find_case(root, corpus.content_hash(case))
    if existing is not None:  # a second copy would be a duplicate `corpus check` rejects
        return Promoted(existing, corpus.load(existing)[1], already=True)
    if kind == "seed" and case.severity != "legal":
        raise HarnessError(f"{finding}: a seed must be a legal case; this one is "
                           f"{case.severity} ({', '.join(case.contract_violations()) or 'faults'})"
                           "; promote it as a regression")
    new = promoted_meta(meta, kind, Path(finding).name)
    results: tuple = ()
    if verify is not None:
        target = resolve_target(verify)
        results = tuple(expect.run_checks(case, target, expect.checks_for(new, target.name)))
        if not all(r.ok for r in results):
            report = explain.explain(str(finding), verify, case, results)
            raise PromotionRefused(f"{finding} does not meet its corpus expectation on "
                                   f"{verify}; not promoted", report)
    path = corpus.save(case, root / KINDS[kind], new)
    return Promoted(path, new, results)
