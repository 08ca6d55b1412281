"""Batched fuzz executions: siblings, the union of features, reduction, mismatches."""

from __future__ import annotations

import math

import torch

from harness import invariants
from harness.api import execute
from harness.backends.cpu import CpuTarget
from harness.bugs import BugSet
from harness.case import MoECase, Patch
from harness.findings import Finding
from harness.fuzz import codec
from harness.fuzz.batch import BatchConfig, BatchExecutor, derive_ids, derive_logits
from harness.fuzz.worker import InProcessExecutor

CASE = MoECase(16, 8, 2, seed=3, hidden_size=4)  # finite logits: no NaN row in the base


def test_derive_logits_is_deterministic_and_varied():
    base = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    a, b = derive_logits(base, 32, 7), derive_logits(base, 32, 7)
    assert a.shape == (32, 16, 8) and a.dtype == base.dtype
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # NaN payloads included
    assert torch.equal(a[0], base)
    assert not torch.equal(derive_logits(base, 32, 8)[1:], a[1:])
    nan_rows = torch.isnan(a).all(2).any(1)
    assert 0 < int(nan_rows.sum()) < 32  # some siblings route NaN rows, not all
    assert bool(torch.isinf(a).any()) and bool(torch.isfinite(a[1:]).all(2).all(1).any())
    half = derive_logits(base.half(), 8, 1)
    assert half.dtype == torch.float16


def test_derive_ids_forges_duplicates_and_wild_ids():
    base = torch.tensor([[0, 1]] * 16, dtype=torch.int32)
    ids = derive_ids(base, 8, 64, 3)
    assert ids.shape == (64, 16, 2) and ids.dtype == torch.int32
    assert torch.equal(ids[0], base)
    assert bool((ids[:, :, 0] == ids[:, :, 1]).any())  # a duplicate in a row
    assert bool((ids == -1).any()) and bool((ids >= 8).any())


def test_clean_batch_counts_every_case_and_unions_features():
    data = codec.encode(CASE)
    ex = BatchExecutor(CpuTarget(), config=BatchConfig(size=8, full_check_rate=0.0))
    case, out = ex.run_input(data, codec.LIMITS)
    assert out.findings == [] and out.cases_run == 8 and ex.batches == 1
    alone = InProcessExecutor(CpuTarget()).run(case)
    # the siblings add data features (NaN rows, ties, ...) to the base's
    assert len(set(out.features) - set(alone.features)) > 0


def test_finding_is_reduced_to_the_sibling_that_shows_it():
    """topk-nan-argmax needs a NaN row: the finite base cannot show it, a sibling does; the
    finding comes with that sibling, which shows it alone."""
    bugs = BugSet.of(["topk-nan-argmax"])
    assert execute(CASE, CpuTarget(), bugs).findings == []
    ex = BatchExecutor(CpuTarget(), bugs, BatchConfig(size=16, full_check_rate=0.0))
    found = None
    for seed in range(20):
        out = ex.run_batch(CASE, 16, seed)
        if out.findings:
            found = out
            break
    assert found is not None and len(found.findings) == len(found.cases)
    for finding, case in zip(found.findings, found.cases, strict=True):
        assert case.overrides.gating_logits is not None  # a sibling, as a case of its own
        assert math.isnan(case.overrides.gating_logits.float().sum())
        alone = execute(case, CpuTarget(), bugs)
        assert finding.signature in {f.signature for f in alone.findings}
    # a known signature is not reduced again
    again = ex.run_batch(CASE, 16, seed)
    assert again.findings == [] and again.cases_run == 16


def test_stack_finding_no_case_shows_is_a_mismatch(monkeypatch):
    real = invariants.check

    def stack_only(result):
        found = real(result)
        if result.case.num_tokens > CASE.num_tokens:  # the stack, not a case alone
            found.append(Finding("gating", "unique-ids", "planted", "legal", {}))
        return found

    monkeypatch.setattr(invariants, "check", stack_only)
    ex = BatchExecutor(CpuTarget(), config=BatchConfig(size=4, full_check_rate=0.0))
    out = ex.run_batch(CASE, 4, 0)
    assert [f.signature for f in out.findings] == ["harness:check-mismatch"]
    assert ex.mismatches == 1 and "gating:unique-ids" in out.findings[0].message


def test_sampled_full_check_catches_a_stack_that_missed_a_finding(monkeypatch):
    """A stack whose checks see nothing while the cases alone show a finding."""
    real = invariants.check
    monkeypatch.setattr(invariants, "check", lambda r: [] if r.case.num_tokens >
                        CASE.num_tokens else real(r))
    case = MoECase(16, 8, 2, seed=3, hidden_size=4,
                   patches=(Patch("gating_logits", "row", "nan", row=2),))
    bugs = BugSet.of(["topk-nan-argmax"])
    assert execute(case, CpuTarget(), bugs).findings  # alone: found (the base has the row)
    ex = BatchExecutor(CpuTarget(), bugs, BatchConfig(size=4, full_check_rate=1.0))
    ex._rng.randrange = lambda n: 0  # the sampled case: the base
    out = ex.run_batch(case, 4, 0)
    sigs = [f.signature for f in out.findings]
    assert "harness:check-mismatch" in sigs and len(sigs) > 1


def test_unstackable_input_runs_alone():
    data = codec.encode(MoECase(16, 8, 2, ep_size=2, seed=1))
    ex = BatchExecutor(CpuTarget(), config=BatchConfig(size=8))
    case, out = ex.run_input(data, codec.LIMITS)
    assert case.ep_size == 2 and out.cases_run == 1 and ex.alone == 1 and ex.batches == 0


def test_batch_size_follows_tokens_and_budget():
    ex = BatchExecutor(CpuTarget(), config=BatchConfig(size=16, max_rows=1024))
    assert ex.batch_size(MoECase(16, 8, 2)) == 16
    assert ex.batch_size(MoECase(256, 8, 2)) == 4
    assert ex.batch_size(MoECase(4096, 8, 2)) == 1


def test_batched_fuzz_finds_a_variant_and_stores_the_case_that_shows_it(tmp_path):
    """The real search from an empty corpus with --batch 16: each stored reproducer shows its
    finding alone."""
    from harness import corpus
    from harness.bugs import VARIANTS
    from harness.fuzz.engine import FuzzConfig, fuzz

    bug = "topk-nan-argmax"
    report = fuzz(FuzzConfig(bugs=(bug,), seconds=None, runs=4000, seed=2, batch=16,
                             stop_on_first=True, minimize=False,
                             findings_dir=tmp_path / "findings"))
    assert report.findings and report.status.reason == "first finding"
    for f in report.findings:
        assert f.signature in VARIANTS[bug].signatures
        case, _ = corpus.load(f.path)
        assert f.signature in {x.signature for x in execute(case, CpuTarget(),
                                                           (bug,)).findings}


def test_batched_fuzz_of_the_fixed_chain_is_clean(tmp_path):
    from harness.fuzz.engine import FuzzConfig, fuzz

    report = fuzz(FuzzConfig(seconds=None, runs=600, seed=3, batch=16, minimize=False,
                             findings_dir=tmp_path / "findings"))
    assert report.findings == [] and report.status.executions >= 600
