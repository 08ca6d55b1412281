"""Named checks over a `RunResult`: each stage against the oracle applied to its actual input.

The runner keeps every stage's input as the stage received it (after upstream faults) and its
output before faults, so every check here is stage-local: a fault injected between two stages
changes what the next stage is held to, never makes a correct stage look wrong. Only "chain"
compares end to end, and only on legal cases (no faults, no out-of-contract overrides).

Checks (signature "stage:check"; the bug registry refers to these names):

* gating: ids-in-range, unique-ids, weights-finite, renormalized, matches-oracle
* dispatch: padding-sanitized, counters-match, slots-match
* sort_align: no-poison, permutation-bijection, prefix-sums, alignment, matches-oracle
* experts: matches-oracle;  finalize: finite, matches-oracle
* chain: matches-oracle, finite
* lora_align: adapter-tokens, no-poison, disabled-untouched
* any stage: output-shape (an output of the wrong shape), check-error (a check that could not
  evaluate its tensors; never raised on garbage values, which are findings of their own)

A catch-all `matches-oracle` of gating or sort_align is reported only when the stage's
specific checks found nothing, so one defect yields its most telling signature(s).

Modules: `routing` (gating, dispatch), `layout` (sort_align, lora_align), `compute` (experts,
finalize, chain), `common` (the per-stage report, details, shape guards). Every check is
vectorised torch, with a cheap exact path for the common clean output (an equality with the
oracle, a range check by min/max) before the per-entry analysis; `execute` minus the chain in
tools/bench_cpu_chain.py is their cost (a few hundred microseconds per stage on small cases).
"""

from __future__ import annotations

from collections.abc import Callable

from harness.chain.result import RunResult
from harness.findings import Finding
from harness.invariants import compute, layout, routing
from harness.invariants.common import Malformed, Report

__all__ = ["check"]


# -- driver ------------------------------------------------------------------------------------


def _run(stage: str, severity: str, fn: Callable[..., None], *args,
         extra: dict | None = None) -> Report:
    """Run one stage's checks; a malformed output or a failing check becomes a finding."""
    rep = Report(stage, severity, extra)
    try:
        fn(*args, rep)
    except Malformed as exc:
        rep.add("output-shape", str(exc))
    except Exception as exc:  # a check must report, never raise
        rep.add("check-error", f"the check could not evaluate: {type(exc).__name__}: {exc}")
    return rep


def check(result: RunResult) -> list[Finding]:
    """The run's own findings (errors raised by stages) plus every violated invariant of the
    stages that ran, one Finding per signature (the first offence's details)."""
    sev = result.case.severity
    dtype = result.case.torch_dtype
    reports: list[Report] = []
    if result.gating_out is not None and result.gating_in is not None:
        reports.append(_run("gating", sev, routing.gating, result))
    if result.dispatch_out is not None and result.dispatch_in is not None:
        reports.append(_run("dispatch", sev, routing.dispatch, result))
    for rr in result.ranks:
        extra = {"rank": rr.rank}
        if rr.sort_out is not None:
            reports.append(_run("sort_align", sev, layout.sort_align, rr, extra=extra))
        if rr.experts_out is not None:
            reports.append(_run("experts", sev, compute.experts, rr, dtype, extra=extra))
        if rr.finalize_out is not None:
            reports.append(_run("finalize", sev, compute.finalize, rr, dtype, extra=extra))
    # end to end only where the chain's contract promises the oracle's result: no faults, no
    # out-of-contract overrides (severity "legal")
    if result.output is not None and sev == "legal" and result.tensors is not None:
        reports.append(_run("chain", sev, compute.chain, result))
    if result.lora_out is not None and result.lora_in is not None:
        reports.append(_run("lora_align", sev, layout.lora_align, result))

    seen: dict[str, Finding] = {}
    for f in result.findings:
        seen.setdefault(f.signature, f)
    for rep in reports:
        for f in rep.found.values():
            seen.setdefault(f.signature, f)
    return list(seen.values())
