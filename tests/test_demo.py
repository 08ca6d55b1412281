"""Tests of harness/demo.py: the demo matrix catches every variant, the fixed chain is clean,
the registry's signatures are what the chain produces, and the report fits 80 columns.

The full demo takes ~25 s here (its huge-token-count case, 50,000 tokens, runs under all
nine configurations); the test runs every other case under every configuration and the huge
case under the fixed chain and the one variant it is there for: the same matrix minus seven
runs of the huge case, in a third of the time.
"""

from __future__ import annotations

import pytest

from harness.bugs import VARIANTS
from harness.demo import DemoReport, demo_cases, demo_configs, run_demo

HUGE = "huge-token-count"


@pytest.fixture(scope="module")
def reports() -> tuple[DemoReport, DemoReport]:
    cases = demo_cases()
    huge = {HUGE: cases.pop(HUGE)}
    configs = demo_configs()
    small = run_demo("cpu", cases=cases)
    large = run_demo("cpu", cases=huge, configs={c: configs[c] for c in
                                                 ("fixed", "grid-y-overflow")})
    return small, large


def found(reports: tuple[DemoReport, DemoReport], config: str) -> set[str]:
    return {sig for rep in reports if config in rep.cells
            for sigs in rep.cells[config].values() for sig in sigs}


def test_demo_cases_are_valid_and_named():
    cases = demo_cases()
    assert next(iter(cases)) == "normal" and HUGE in cases
    for case in cases.values():
        case.validate()
    assert set(demo_configs()) == {"fixed", *VARIANTS, "topk-nan-argmax+sort-duplicate-break"}


def test_fixed_chain_is_clean_and_every_variant_is_caught(reports):
    small, large = reports
    assert not small.caught("fixed") and not large.caught("fixed")
    for name in VARIANTS:
        assert found(reports, name), name
    assert large.caught("grid-y-overflow") and not small.caught("grid-y-overflow")


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_registry_signatures_are_what_the_demo_finds(reports, name):
    assert found(reports, name) == set(VARIANTS[name].signatures)


def test_issue_39244_pair_needs_both_variants(reports):
    small, _ = reports
    pair = small.cells["topk-nan-argmax+sort-duplicate-break"]["over-256-duplicates"]
    assert "finalize:illegal-access" in pair and "gating:unique-ids" in pair
    assert "finalize:illegal-access" not in small.cells["topk-nan-argmax"]["over-256-duplicates"]


def test_ok_needs_a_clean_fixed_chain_and_every_variant():
    def report(cells: dict[str, dict[str, list[str]]]) -> DemoReport:
        rep = DemoReport(["a", "b"], list(cells))
        rep.cells = cells
        return rep

    clean = {"a": [], "b": []}
    assert report({"fixed": clean, "v": {"a": [], "b": ["s:x"]}}).ok
    assert not report({"fixed": {"a": ["s:x"], "b": []}, "v": {"a": [], "b": ["s:x"]}}).ok
    assert not report({"fixed": clean, "v": clean}).ok


def test_lines_fit_80_columns_and_show_every_hit(reports):
    small, _ = reports
    lines = small.lines()
    assert max(map(len, lines)) <= 80
    text = "\n".join(lines)
    for i, case in enumerate(small.cases, 1):
        assert f"  {i} {case}" in text
    rows = {line.split()[0]: line for line in lines if line.split() and
            line.split()[0] in small.configs and not line.endswith(":")}
    assert set(rows) == set(small.configs)
    assert rows["fixed"].endswith("clean") and "x" not in rows["fixed"].split()
    for cfg in small.configs:
        marks = rows[cfg].split()[1:1 + len(small.cases)]
        assert marks == ["x" if small.cells[cfg][c] else "·" for c in small.cases]
        for sigs in small.cells[cfg].values():
            for sig in sigs:
                assert sig in text
