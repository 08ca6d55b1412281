"""Tests of harness/api.py: `execute` (a run plus every invariant) and `stage_summary`."""

from __future__ import annotations

import pytest
import torch

from harness.api import execute, stage_summary
from harness.backends.cpu import CpuTarget
from harness.bugs import BugSet
from harness.case import Fault, MoECase, Overrides, Patch
from harness.errors import BackendUnavailable, CaseError, UnknownVariant

CASE = MoECase(24, 8, 2, hidden_size=4, block_size=4, seed=7, ep_size=2, max_loras=2)
NAN_ROW = MoECase(8, 8, 2, patches=(Patch("gating_logits", "row", "nan", 1),))


def test_execute_runs_and_checks():
    res = execute(CASE)
    assert res.completed and res.findings == [] and res.target == "cpu"
    assert res.output.shape == (24, 4) and res.lora_out is not None


def test_execute_accepts_names_sets_and_targets():
    by_name = execute(NAN_ROW, "cpu", ["topk-nan-argmax"])
    by_set = execute(NAN_ROW, CpuTarget(), BugSet.of(["topk-nan-argmax"]))
    assert by_name.bugs == by_set.bugs == BugSet.of(["topk-nan-argmax"])
    assert [f.signature for f in by_name.findings] == [f.signature for f in by_set.findings]
    assert {"gating:unique-ids", "gating:weights-finite"} == {f.signature
                                                               for f in by_name.findings}
    assert execute(NAN_ROW).findings == []


def test_execute_reports_one_finding_per_signature_with_the_case_severity():
    many = MoECase(64, 8, 2, patches=tuple(Patch("gating_logits", "row", "nan", r)
                                           for r in range(0, 64, 3)))
    sigs = [f.signature for f in execute(many, bugs=["topk-nan-argmax"]).findings]
    assert len(sigs) == len(set(sigs))
    faulted = CASE.replace(faults=(Fault("sort_align", "permuted_row", "garbage", rows=(0,)),))
    found = execute(faulted).findings
    assert all(f.severity == "fault" for f in found)
    # a stage error (the run's own finding) comes first, invariant findings after it
    res = execute(MoECase(300, 8, 2, overrides=Overrides(
        topk_ids=torch.tensor([[1, 1]] * 300, dtype=torch.int32))),
        bugs=["sort-duplicate-break"])
    assert res.findings[0].check == "illegal-access"
    assert all(f.severity == "out-of-contract" for f in res.findings)


def test_execute_rejects_bad_input_cleanly():
    with pytest.raises(CaseError, match="topk"):
        execute(CASE.replace(topk=9))
    with pytest.raises(UnknownVariant, match="no-such-bug"):
        execute(CASE, bugs=["no-such-bug"])
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        execute(CASE, "tpu")


def test_stage_summary_names_every_stage_that_ran():
    res = execute(CASE)
    rows = stage_summary(res)
    assert [r[0] for r in rows] == ["gating", "lora_align", "dispatch", "sort_align", "experts",
                                    "finalize", "combine"]
    what = dict((stage, text) for stage, text, _ in rows)
    assert what["gating"] == "topk_ids [24, 2]"
    assert what["dispatch"] == (f"{int(res.dispatch_out.recv_counters.sum())} slots received "
                                "on 2 ranks")
    post = sum(rr.sort_out.num_tokens_post_pad for rr in res.ranks)
    assert what["sort_align"] == f"{post} aligned positions"
    assert what["experts"] == "2 launch(es)"  # one per rank
    assert what["combine"] == "output [24, 4]"
    assert all(seconds >= 0.0 for _, _, seconds in rows)


def test_stage_summary_stops_where_the_run_stopped():
    res = execute(MoECase(65536, 1, 1, block_size=1, hidden_size=1), bugs=["grid-y-overflow"])
    assert [f.signature for f in res.findings] == ["experts:launch-config"]
    assert [r[0] for r in stage_summary(res)] == ["gating", "dispatch", "sort_align"]
    entered = execute(MoECase(4, 8, 2, overrides=Overrides(
        topk_ids=torch.tensor([[0, 1]] * 4, dtype=torch.int32))))
    assert stage_summary(entered)[0][0] == "dispatch"  # gating skipped
