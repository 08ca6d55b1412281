"""Semantic coverage features of one run: what the data looked like, not which lines ran.

Python edge coverage sees that the sort took its three-step path; it does not see that it did so
with a duplicate id in a row, or that the receive buffer had padding slots, or that T sat one
past a launch threshold. Each feature here is a (name, bucket) pair, counts bucketed by log2
(libFuzzer's own idea for hit counts), hashed to a stable 16-bit id (`feature_id`: crc32, the
same in every process); the engine bumps one reserved libFuzzer counter per id, so an input
that reaches a new pair is kept in the corpus.

Features: the paths the sizes select (warp / fallback top-k, single-block / three-step sort,
chunked experts launches, EP > 1, LoRA on), where T sits relative to 256, the CUDA-graph
capture sizes and each solved launch threshold; bucketed counts of non-finite logit rows,
duplicate and out-of-range ids per token, receive padding slots, tokens of the busiest expert,
active and disabled LoRA slots; each path crossed with each anomaly; every entry of the run's
coverage counter (`RunResult.coverage`, including the cuda backend's "cuda.<slot>" device
counters); the case's severity, a clean rejection, and each finding's signature. Nothing here
knows which bug variant is on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable, Mapping

import torch

from harness import geometry
from harness.case import MoECase
from harness.chain.runner import chain_mode
from harness.fuzz.codec import CAPTURE_SIZES, launch_thresholds

FEATURE_BITS = 16
_CAPTURE = frozenset(CAPTURE_SIZES)


def bucket(n: int) -> int:
    """log2 bucket of a count: 0 for 0, k for 2**(k-1) <= n < 2**k, negative for negatives."""
    n = int(n)
    if n < 0:
        return -bucket(-n)
    return min(n.bit_length(), 32)


def feature_id(name: str, value: object) -> int:
    """The stable small integer of one (name, value) feature."""
    return zlib.crc32(f"{name}={value}".encode()) & ((1 << FEATURE_BITS) - 1)


def _vs(T: int, at: int) -> str:
    """Where T sits relative to a threshold: exactly at it, one either side, or the log2 of
    the ratio (clipped), so approaching a large threshold is rewarded step by step."""
    if -1 <= T - at <= 1:
        return {-1: "below", 0: "at", 1: "above"}[T - at]
    return f"log2={max(-8, min(4, math.floor(math.log2(T / at))))}"


def _size_features(case: MoECase) -> list[tuple[str, object]]:
    T, E, K, ep, bs = (case.num_tokens, case.num_experts, case.topk, case.ep_size,
                       case.block_size)
    rows = ep * case.recv_slots
    local = math.ceil(E / ep)
    chunks = geometry.experts_chunks(rows, K, local, bs)
    out: list[tuple[str, object]] = [
        ("path.gating", "warp" if geometry.uses_warp_path(E) else "fallback"),
        ("path.sort", "three_step" if geometry.sort_uses_three_step(rows) else "single_block"),
        ("path.experts_launches", bucket(len(chunks))),
        ("path.ep", bucket(ep)), ("path.lora", bucket(case.max_loras)),
        ("dtype", case.dtype), ("scoring", case.scoring), ("renormalize", case.renormalize),
        ("bias", case.correction_bias is not None), ("graph_padding", case.graph_padding),
        ("E", bucket(E)), ("K", bucket(K)), ("T", bucket(T)), ("block_size", bs),
        ("T.vs.256", _vs(T, 256)),
        ("T.capture", "at" if T in _CAPTURE else "after" if T - 1 in _CAPTURE else "between"),
        ("severity", case.severity),
        ("entry", "topk_ids" if case.overrides.topk_ids is not None else "logits"),
        ("patches", bucket(len(case.patches))), ("faults", bucket(len(case.faults))),
    ]
    out += [(f"fault.{f.boundary}.{f.tensor}", f.kind) for f in case.faults]
    out += [(f"T.vs.{name}", _vs(T, at)) for name, at in launch_thresholds(E, K, bs, ep)]
    return out


def _ids_features(ids: torch.Tensor, num_experts: int) -> dict[str, int]:
    """Duplicates and out-of-range entries of routed ids [T, K]."""
    ids = ids.long()
    bad = (ids < 0) | (ids >= num_experts)
    s = ids.sort(dim=1).values
    dup = (s[:, 1:] == s[:, :-1]).sum(1) if ids.shape[1] > 1 else torch.zeros(ids.shape[0])
    return {"dup_ids_max_per_token": int(dup.max()) if dup.numel() else 0,
            "dup_rows": int((dup > 0).sum()), "bad_ids": int(bad.sum()),
            "negative_ids": int((ids < 0).sum())}


def _data_features(result: object) -> dict[str, int]:
    """Counts from the run's tensors (each 0 where the stage did not run)."""
    case: MoECase = result.case
    counts: dict[str, int] = {}
    tensors = getattr(result, "tensors", None)
    if tensors is not None and tensors.gating_logits is not None:
        logits = tensors.gating_logits
        counts["nonfinite_rows"] = int((~torch.isfinite(logits)).any(1).sum())
        counts["nan_rows"] = int(torch.isnan(logits).any(1).sum())
        if tensors.hidden_states is not None:
            counts["nonfinite_hidden_rows"] = int(
                (~torch.isfinite(tensors.hidden_states)).any(1).sum())
    # the ids the chain routed (after gating's faults), else gating's, else the override
    routed = case.overrides.topk_ids
    for stage in ("gating_out", "dispatch_in"):
        if getattr(result, stage, None) is not None:
            routed = getattr(result, stage).topk_ids
    if routed is not None and routed.dim() == 2 and routed.numel():
        counts.update(_ids_features(routed, case.num_experts))
    dispatch_out = getattr(result, "dispatch_out", None)
    if dispatch_out is not None:
        rc = dispatch_out.recv_counters.long()
        M = case.recv_slots
        counts["padding_slots"] = rc.numel() * M - int(rc.clamp(0, M).sum())
        counts["counters_out_of_range"] = int(((rc < 0) | (rc > M)).sum())
    per_expert = [int(r.sort_out.expert_counts.max()) for r in getattr(result, "ranks", [])
                  if r.sort_out is not None and r.sort_out.expert_counts.numel()]
    if per_expert:
        counts["tokens_per_expert_max"] = max(per_expert)
    lora_in = getattr(result, "lora_in", None)
    if lora_in is not None:
        L = case.max_loras
        slots = lora_in.lora_ids.long()
        active = slots[(slots >= 0) & (slots < L)]
        counts["lora_active"] = int(active.unique().numel())
        counts["lora_all_active"] = int(counts["lora_active"] == L and bool((slots == -1).any())
                                        and bool((lora_in.token_lora_mapping == -1).any()))
        counts["lora_bad_ids"] = int(((slots < -1) | (slots >= L)).sum())
        counts["lora_disabled"] = int((lora_in.adapter_enabled[:L] == 0).sum())
    return counts


_ANOMALIES = ("nonfinite_rows", "dup_rows", "bad_ids", "padding_slots", "counters_out_of_range",
              "lora_bad_ids", "lora_disabled", "lora_all_active")


def named_features(result: object) -> list[tuple[str, object]]:
    """The run's features as (name, value) pairs (see the module docstring)."""
    return union_features(result.case, [_data_features(result)],
                          getattr(result, "coverage", {}), getattr(result, "rejected", None),
                          getattr(result, "findings", ()))


def union_features(case: MoECase, counts: list[dict[str, int]], coverage: Mapping[str, int],
                   rejected: object = None, findings: Iterable = ()) -> list[tuple[str, object]]:
    """The features of runs of `case`'s shape whose data counts (as `_data_features` makes
    them) are `counts`, one dict per run: the union of each run's data features (a batch of
    same-shape cases, `harness.fuzz.batch`), with one coverage counter, rejection and set of
    findings for them all."""
    out = _size_features(case)
    paths = [p for p in out if p[0] in ("path.gating", "path.sort", "path.ep", "path.lora")]
    seen: set[tuple[str, object]] = set()
    anomalies: set[str] = set()
    for one in counts:
        seen.update((f"data.{name}", bucket(n)) for name, n in one.items())
        anomalies.update(name for name in _ANOMALIES if one.get(name, 0) > 0)
    out += sorted(seen, key=str)
    for name in _ANOMALIES:
        if name in anomalies:
            out += [(f"{p}={v}&{name}", 1) for p, v in paths]
    out += [(f"cov.{name}", bucket(n)) for name, n in coverage.items()]
    if rejected is not None:
        out.append(("rejected", getattr(rejected, "stage", "?")))
    out += [("finding", f.signature) for f in findings]
    return out


def ids_of(named: Iterable[tuple[str, object]]) -> list[int]:
    return sorted({feature_id(name, value) for name, value in named})


def features(result: object) -> list[int]:
    """The run's features as sorted unique ids in 0..2**16 - 1 (`RunResult`, or any result
    with its fields; stages that did not run contribute nothing). Computed in the run's own
    torch mode (`chain_mode`: one thread for a small case, where more only add overhead)."""
    with chain_mode(result.case):
        return ids_of(named_features(result))
