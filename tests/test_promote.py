"""Promoting findings into the corpus (harness/promote.py)."""

from __future__ import annotations

import pytest

from harness import corpus
from harness.case import Fault, MoECase, Patch
from harness.corpus.format import CaseMeta, Expectation
from harness.corpus.promote import promote, promoted_meta
from harness.errors import HarnessError, PromotionRefused

NAN = "topk-nan-argmax"


def fuzz_finding(directory, case: MoECase, backend: str = "cpu", bugs=(NAN,),
                 signature: str = "gating:unique-ids"):
    """A finding as `harness.fuzz.store` writes it."""
    meta = CaseMeta(origin="fuzz", signature=signature,
                    expect=(Expectation(backend, bugs, signature),),
                    extra={"backend": backend, "variants": list(bugs), "seconds_to_find": 1.5})
    return corpus.save(case, directory, meta)


def nan_case(rows: int = 4) -> MoECase:
    return MoECase(rows, 8, 2, patches=(Patch("gating_logits", "row", "nan", row=1),))


def test_a_finding_becomes_a_regression_expected_clean_on_the_fixed_chain(tmp_path):
    src = fuzz_finding(tmp_path / "findings", nan_case())
    done = promote(src, root=tmp_path / "corpus")
    assert done.path.parent == tmp_path / "corpus" / "regressions"
    assert done.path.name == src.name  # same case, same content hash
    _, meta = corpus.load(done.path)
    assert meta.expected("cpu") == "clean" and meta.expected("cuda") == "clean"
    assert meta.expected("cpu", [NAN]) == "gating:unique-ids"  # the variant's finding kept
    assert meta.origin == "fuzz" and meta.signature == "gating:unique-ids"
    assert meta.extra["promoted_as"] == "regression" and meta.extra["seconds_to_find"] == 1.5
    assert [r.ok for r in done.results] == [True, True]


def test_a_finding_on_the_fixed_chain_is_now_expected_clean():
    m = CaseMeta(expect=(Expectation("cuda", (), "experts:illegal-access"),))
    assert promoted_meta(m, "regression", "x.json").expect == (Expectation(None, (), "clean"),)


def test_a_case_that_does_not_meet_the_expectation_is_refused(tmp_path):
    src = fuzz_finding(tmp_path, MoECase(4, 8, 2))  # no NaN: the variant finds nothing
    with pytest.raises(PromotionRefused) as info:
        promote(src, root=tmp_path / "corpus")
    assert "expected gating:unique-ids, got clean" in info.value.report
    assert not (tmp_path / "corpus").exists()
    assert promote(src, root=tmp_path / "corpus", verify=None).path.exists()


def test_seeds_must_be_legal(tmp_path):
    faulty = MoECase(4, 8, 2, faults=(Fault("gating", "topk_ids", "duplicate", rows=(0,)),))
    src = corpus.save(faulty, tmp_path)
    with pytest.raises(HarnessError, match="a seed must be a legal case"):
        promote(src, "seed", tmp_path / "corpus")
    assert promote(src, "regression", tmp_path / "corpus").path.parent.name == "regressions"
    legal = corpus.save(MoECase(4, 8, 2), tmp_path)
    assert promote(legal, "seed", tmp_path / "corpus").path.parent.name == "seeds"


def test_unknown_kind(tmp_path):
    src = corpus.save(MoECase(4, 8, 2), tmp_path)
    with pytest.raises(HarnessError, match="--as fixture"):
        promote(src, "fixture", tmp_path)
