"""The library entry points the CLI and the pytest plugin are thin over."""

from __future__ import annotations

from collections.abc import Iterable

from harness.backends import resolve_target
from harness.bugs import BugSet
from harness.case import MoECase
from harness.chain.result import RunResult
from harness.chain.runner import chain_mode, run_case
from harness.chain.target import Target
from harness.memory import is_poison


def execute(case: MoECase, target: Target | str = "cpu",
            bugs: BugSet | Iterable[str] = ()) -> RunResult:
    """Run `case` on `target` with `bugs` on and check every invariant.

    Returns the `RunResult` with `findings` holding every finding (errors raised by stages and
    violated invariants), one per signature. Raises `CaseError` for an invalid case,
    `UnknownVariant` for a bad variant name, `BackendUnavailable` for a backend that cannot run.
    """
    from harness import invariants

    bugs = bugs if isinstance(bugs, BugSet) else BugSet.of(bugs)
    case.validate()
    target = resolve_target(target) if isinstance(target, str) else target
    result = run_case(case, target, bugs)
    with chain_mode():
        result.findings = invariants.check(result)
    return result


def stage_summary(result: RunResult) -> list[tuple[str, str, float]]:
    """(stage, what it produced, seconds) per stage that ran, for a human-readable summary."""
    rows: list[tuple[str, str, float]] = []
    s = result.seconds
    if result.gating_out is not None:
        ids = result.gating_out.topk_ids
        rows.append(("gating", f"topk_ids {list(ids.shape)}", s.get("gating", 0.0)))
    if result.lora_out is not None:
        done = int((~is_poison(result.lora_out.num_tokens_post_pad)).sum())
        rows.append(("lora_align", f"{done} adapter rows written", s.get("lora_align", 0.0)))
    if result.dispatch_out is not None:
        rc = result.dispatch_out.recv_counters
        rows.append(("dispatch", f"{int(rc.sum())} slots received on {rc.shape[0]} ranks",
                     s.get("dispatch", 0.0)))
    sorted_ranks = [r for r in result.ranks if r.sort_out is not None]
    if sorted_ranks:
        post = sum(r.sort_out.num_tokens_post_pad for r in sorted_ranks)
        rows.append(("sort_align", f"{post} aligned positions", s.get("sort_align", 0.0)))
    expert_ranks = [r for r in result.ranks if r.experts_out is not None]
    if expert_ranks:
        launches = sum(r.experts_out.num_launches for r in expert_ranks)
        rows.append(("experts", f"{launches} launch(es)", s.get("experts", 0.0)))
    if any(r.finalize_out is not None for r in result.ranks):
        rows.append(("finalize", "unpermute + weighted reduce", s.get("finalize", 0.0)))
    if result.output is not None:
        rows.append(("combine", f"output {list(result.output.shape)}", s.get("combine", 0.0)))
    return rows
