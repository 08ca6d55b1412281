"""Semantic coverage features: stable ids, and the distinctions they are there to make."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import torch

from harness.api import execute
from harness.case import Fault, MoECase, Overrides, Patch
from harness.demo import demo_cases
from harness.findings import Finding
from harness.fuzz.codec import launch_thresholds
from harness.fuzz.features import bucket, feature_id, features, named_features


def _named(case: MoECase, bugs=()) -> dict[str, object]:
    return dict(named_features(execute(case, bugs=bugs)))


def test_bucket_is_log2():
    assert [bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 1000)] == [0, 1, 2, 2, 3, 3, 4, 10]
    assert bucket(-5) == -bucket(5) != 0
    assert bucket(2**80) == 32


def test_feature_ids_are_small_stable_and_distinct():
    ids = {feature_id("data.nan_rows", b) for b in range(20)}
    assert len(ids) == 20 and all(0 <= i < 2**16 for i in ids)
    assert feature_id("x", 1) == feature_id("x", 1) != feature_id("x", 2)


def test_features_are_sorted_unique_and_deterministic():
    result = execute(MoECase(32, 64, 4, seed=2, patches=(Patch(kind="row", row=3),)))
    f = features(result)
    assert f == sorted(set(f)) and f == features(result)
    assert all(0 <= i < 2**16 for i in f)


def test_paths_are_told_apart():
    warp, fallback = _named(MoECase(16, 64, 4)), _named(MoECase(16, 60, 4))
    assert warp["path.gating"] == "warp" and fallback["path.gating"] == "fallback"
    assert _named(MoECase(300, 8, 2))["path.sort"] == "three_step"
    assert _named(MoECase(200, 8, 2))["path.sort"] == "single_block"
    assert _named(MoECase(16, 8, 2, ep_size=4))["path.ep"] == bucket(4)
    assert _named(MoECase(16, 8, 2, max_loras=3))["path.lora"] == bucket(3)


def test_token_count_relative_to_thresholds():
    at = {T: _named(MoECase(T, 8, 2))["T.vs.256"] for T in (255, 256, 257, 64)}
    assert len(set(at.values())) == 4
    assert _named(MoECase(64, 8, 2))["T.capture"] == "at"
    assert _named(MoECase(65, 8, 2))["T.capture"] == "after"
    case = MoECase(16, 32, 32, block_size=1, hidden_size=1)
    near = dict(launch_thresholds(32, 32, 1))["experts.grid_y"]
    values = [_named(case.replace(num_tokens=T))["T.vs.experts.grid_y"]
              for T in (near // 4, near // 2, near - 1)]
    assert len(set(values)) == 3  # a step nearer the threshold is a new feature


def test_data_anomalies_are_counted():
    plain = _named(MoECase(32, 64, 4, seed=1))
    nan = _named(MoECase(32, 64, 4, seed=1, patches=tuple(
        Patch(kind="row", row=r) for r in range(24, 32))))
    assert plain["data.nonfinite_rows"] == 0 and nan["data.nonfinite_rows"] == bucket(8)
    assert "path.gating=warp&nonfinite_rows" in nan
    assert "path.gating=warp&nonfinite_rows" not in plain
    dup = _named(MoECase(4, 8, 2, overrides=Overrides(
        topk_ids=torch.tensor([[1, 1], [0, 2], [3, 3], [9, -1]], dtype=torch.int32))))
    assert dup["data.dup_rows"] == bucket(2) and dup["data.bad_ids"] == bucket(2)
    faulted = _named(MoECase(8, 8, 2, faults=(Fault("gating", "topk_ids", "duplicate",
                                                    rows=(1, 2)),)))
    assert faulted["data.dup_rows"] == bucket(2)  # the ids as routed, after the fault
    ep = _named(MoECase(64, 32, 2, ep_size=4, max_tokens_per_rank=24))
    assert ep["data.padding_slots"] > 0


def test_lora_slots():
    all_slots = _named(demo_cases()["lora-all-slots"])
    assert all_slots["data.lora_all_active"] == 1 and all_slots["data.lora_disabled"] == 1
    forged = _named(demo_cases()["lora-forged-ids"])
    assert forged["data.lora_bad_ids"] == bucket(2)


def test_findings_and_rejections_are_features():
    case = demo_cases()["graph-padding-nan"]
    fixed, buggy = execute(case), execute(case, bugs=["topk-nan-argmax"])
    sig = buggy.findings[0].signature
    assert feature_id("finding", sig) in features(buggy)
    assert feature_id("finding", sig) not in features(fixed)


def test_run_coverage_including_device_counters_becomes_features():
    result = execute(MoECase(16, 8, 2))
    assert result.coverage
    f = set(features(result))
    assert all(feature_id(f"cov.{n}", bucket(c)) in f for n, c in result.coverage.items())
    # a result as the cuda backend fills it: "cuda.<slot>" counters, stages that never ran
    fake = SimpleNamespace(case=MoECase(16, 8, 2), coverage=Counter({"cuda.gating_warp": 5}),
                           findings=[Finding("experts", "launch-config", "x")])
    f = features(fake)
    assert feature_id("cov.cuda.gating_warp", bucket(5)) in f
    assert feature_id("finding", "experts:launch-config") in f
