"""Corpus merge and prune (harness/fuzz/merge.py): the smallest set with the same features."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import corpus
from harness.case import MoECase, Patch
from harness.cli import main
from harness.corpus.format import CaseMeta, Expectation
from harness.fuzz.merge import CaseProfile, cover, merge, profile, prune

NAN = "topk-nan-argmax"
NAN_ROW = (Patch("gating_logits", "row", "nan", row=1),)


def _fake(name: str, feats: set[int], cost: int) -> CaseProfile:
    return CaseProfile(Path(name), MoECase(1, 1, 1), CaseMeta(),
                       frozenset(("", f) for f in feats), {}, cost, cost)


def test_cover_is_a_small_set_with_every_feature_and_prefers_smaller_cases():
    big = _fake("big", {1, 2, 3, 4}, 100)
    small = [_fake(f"s{i}", {i}, 1) for i in (1, 2, 3, 4)]
    twin = _fake("twin", {1, 2, 3, 4}, 50)  # the same features as big, cheaper
    extra = _fake("extra", {5}, 10)
    chosen = cover([big, *small, twin, extra])
    assert {p.path.name for p in chosen} == {"twin", "extra"}
    # what is covered already is not bought again; a case adding nothing is never chosen
    assert [p.path.name for p in cover([big, extra], covered={("", 5)})] == ["big"]
    assert cover([_fake("none", set(), 1)]) == []


def test_cover_drops_a_case_the_others_made_redundant():
    a, b = _fake("a", {1, 2, 3}, 5), _fake("b", {3, 4, 5}, 5)
    ab = _fake("ab", {2, 3, 4}, 1)  # the cheapest of three equal gains: greedy takes it
    # first, then still needs a and b for 1 and 5, which cover it: the last pass drops it
    chosen = cover([a, b, ab])
    assert {p.path.name for p in chosen} == {"a", "b"}


def test_a_variant_reproducer_has_features_a_clean_seed_lacks(tmp_path):
    seed = corpus.save(MoECase(4, 8, 2, seed=1), tmp_path)
    repro = corpus.save(MoECase(4, 8, 2, seed=1, patches=NAN_ROW), tmp_path,
                        CaseMeta(expect=(Expectation(None, (NAN,), "gating:unique-ids"),)))
    p_seed, p_repro = profile(seed), profile(repro)
    assert any(label == NAN for label, _ in p_repro.features)
    assert not p_repro.features <= p_seed.features
    assert "gating" in p_repro.stage_features and p_repro.cost > 0


def test_merge_keeps_what_the_output_had_and_adds_only_new_features(tmp_path):
    src = tmp_path / "src"
    same = [corpus.save(MoECase(16, 8, 2, seed=s), src) for s in (1, 2)]  # one shape
    nan = corpus.save(MoECase(16, 8, 2, seed=3, patches=NAN_ROW), src)
    (src / "broken.json").write_text("{not json")
    out = tmp_path / "out"
    held = corpus.save(MoECase(16, 8, 2, seed=9), out)
    res = merge([src], out)
    assert held in res.kept and len(res.problems) == 1 and "broken.json" in res.problems[0]
    written = {p.name for p in out.glob("*.json")}
    assert nan.name in written and not {s.name for s in same} & written
    assert res.inputs == 4
    # merging again adds nothing
    again = merge([src], out)
    assert {p.name for p in out.glob("*.json")} == written and len(again.dropped) == 3


def test_prune_removes_redundant_cases_and_keeps_unreadable_files(tmp_path, capsys):
    d = tmp_path / "c"
    a = corpus.save(MoECase(16, 8, 2, seed=1), d / "seeds")
    b = corpus.save(MoECase(16, 8, 2, seed=2), d / "more")
    nan = corpus.save(MoECase(16, 8, 2, seed=3, patches=NAN_ROW), d / "seeds")
    bad = d / "bad.json"
    bad.write_text("[]")
    assert main(["corpus", "prune", str(d), "--dry-run"]) == 0
    assert "would remove" in capsys.readouterr().out and a.exists() and b.exists()
    res = prune(d)
    assert bad.exists() and nan.exists() and a.exists() != b.exists()
    assert len(res.dropped) == 1 and res.features > 0
    before = res.features
    assert prune(d).dropped == [] and prune(d).features == before


def test_cli_merge_bad_paths_exit_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["corpus", "merge", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert main(["corpus", "merge", str(tmp_path), "-o", str(f)]) == 2
    assert main(["corpus", "prune", str(f)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 3


@pytest.mark.slow
def test_repo_corpus_merges_to_a_subset_with_the_same_features(tmp_path):
    repo = Path(__file__).resolve().parents[1] / "corpus"
    res = merge([repo], tmp_path / "m")
    full = prune(tmp_path / "m", dry_run=True)
    assert full.dropped == [] and full.features == res.features
    assert 0 < len(res.kept) <= res.inputs
    # every variant's reproducer survives: its finding under the variant is its own feature
    labels = {lab for p in res.kept for lab, _ in profile(p).features}
    for variant_dir in (repo / "bugs").iterdir():
        assert "+".join(sorted(variant_dir.name.split("+"))) in labels
