"""The repository corpus (corpus/): well-formed, seeds that reach every path of every stage, a
reproducer per bug variant. (The plugin replays every file against its expectations in the
same test run; these tests check what the corpus is made of.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import corpus
from harness.api import execute
from harness.bugs import VARIANTS

ROOT = Path(__file__).resolve().parent.parent / "corpus"
PAIR = ("sort-duplicate-break", "topk-nan-argmax")


def load_dir(path: Path):
    return [(p, *corpus.load(p)) for p in corpus.iter_corpus(path)]


def test_the_corpus_is_well_formed():
    assert corpus.check_corpus(ROOT) == []
    assert (ROOT / "regressions").is_dir()


def test_the_pytest_configuration_replays_it():
    import tomllib

    ini = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["pytest"]
    assert ini["ini_options"]["moe_corpus"] == ["corpus"]


def test_seeds_are_legal_and_clean_on_the_fixed_chain():
    seeds = load_dir(ROOT / "seeds")
    assert seeds
    for path, case, meta in seeds:
        assert case.severity == "legal", path
        assert meta.expected("cpu") in ("clean", None), path
        assert all(e.outcome == "clean" for e in meta.expect), path


def test_seeds_reach_every_path_of_every_stage():
    runs = [(case, execute(case, "cpu")) for _, case, _ in load_dir(ROOT / "seeds")]
    covered = set().union(*(r.coverage for _, r in runs))
    for path in ("gating.path.warp", "gating.path.fallback", "sort_align.path.single_block",
                 "sort_align.path.three_step", "experts.launch.multi_chunk",
                 "gating.scoring.softmax", "gating.scoring.sigmoid", "gating.clamp.rows"):
        assert path in covered, path
    assert any("experts.launch.multi_chunk" not in r.coverage for _, r in runs)  # unchunked
    assert {c.ep_size > 1 for c, _ in runs} == {False, True}
    assert {c.max_loras > 0 for c, _ in runs} == {False, True}
    assert {c.dtype for c, _ in runs} == {"fp32", "fp16", "bf16"}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_has_a_reproducer(variant):
    cases = load_dir(ROOT / "bugs" / variant)
    assert cases, f"corpus/bugs/{variant}/ is empty"
    for path, _, meta in cases:
        assert meta.expected("cpu") == "clean", path
        outcome = meta.expected("cpu", [variant])
        assert outcome is not None and outcome != "clean", path
        assert outcome.startswith(VARIANTS[variant].signatures), path


def test_the_pair_of_vllm_issue_39244_needs_both_variants():
    ((_, _, meta),) = load_dir(ROOT / "bugs" / "+".join(reversed(PAIR)))
    assert meta.expected("cpu") == "clean"
    assert meta.expected("cpu", ["sort-duplicate-break"]) == "clean"
    assert meta.expected("cpu", ["topk-nan-argmax"]) == "gating:unique-ids"
    assert meta.expected("cpu", PAIR).startswith("sort_align:")
