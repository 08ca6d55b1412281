"""Minimisation: the smallest case that still produces a finding's signature.

Greedy reduction to a fixpoint, as delta debugging does it: propose smaller variants of the
current case (drop faults, patches and overrides, in halves then one by one; shrink T, E, K,
H, ep_size, max_loras and the block size; simplify values to their defaults), keep the first
that still yields the signature, and start again from it, until no proposal is accepted or the
budget (executions, seconds) is spent. A proposal is kept only if it is strictly smaller
(`cost`), so the search always ends. Tensors given explicitly (overrides, logits) are cut to
the new shape, keeping their leading rows and columns.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from harness.case import Generated, MoECase
from harness.errors import CaseError, ConfigError, HarnessError
from harness.fuzz.resize import shrink

Predicate = Callable[[MoECase], bool]


@dataclass(frozen=True)
class MinimizeConfig:
    """Budget of one minimisation: at most `max_runs` executions and `max_seconds`."""

    max_runs: int = 400
    max_seconds: float = 60.0

    def __post_init__(self) -> None:
        if self.max_runs < 1:
            raise ConfigError("max_runs", f"must be >= 1, got {self.max_runs}")
        if not self.max_seconds > 0:
            raise ConfigError("max_seconds", f"must be > 0, got {self.max_seconds}")


@dataclass
class MinimizeResult:
    """The smallest case found, the original, and what it took (`steps`: accepted moves)."""

    case: MoECase
    original: MoECase
    runs: int = 0
    seconds: float = 0.0
    steps: list[str] = field(default_factory=list)
    exhausted: bool = False  # the budget ran out before a fixpoint


# -- size ------------------------------------------------------------------------------------


_DEFAULTS = MoECase(1, 1, 1)
_SIMPLE_FIELDS = ("scoring", "renormalize", "dtype", "seed", "logits", "correction_bias",
                  "expert_to_rank", "adapter_enabled", "graph_padding")
_PATCH_KIND_RANK = {"cell": 0, "row": 1, "column": 2, "all": 3}


def _differs(a: object, b: object) -> bool:
    """`a != b` for case fields, where a tensor always differs from a default."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return True
    return a != b


def cost(case: MoECase) -> tuple[int, int]:
    """(structure, simplicity): what the minimiser drives down, lexicographically. Structure
    counts tokens x slots, experts, sizes, patches, faults and overrides; simplicity counts the
    fields that differ from their defaults."""
    structure = (case.num_tokens * case.topk + case.num_experts + case.hidden_size
                 + case.block_size + case.ep_size + case.max_loras
                 + 8 * len(case.patches) + 8 * len(case.faults)
                 + 8 * len(case.overrides.fields())
                 + (case.max_tokens_per_rank or 0))
    simple = sum(_differs(getattr(case, f), getattr(_DEFAULTS, f)) for f in _SIMPLE_FIELDS)
    simple += sum((p.row != 0) + (p.col != 0) + _PATCH_KIND_RANK.get(p.kind, 0)
                  for p in case.patches)
    simple += sum(bool(f.rows != (0,) or f.fraction or f.seed) for f in case.faults)
    return structure, simple


def _smaller(n: int, low: int) -> list[int]:
    """Candidate values below `n` (>= `low`), smallest first: low, n/8, n/4, n/2, 3n/4, n-1."""
    out = {low, n // 8, n // 4, n // 2, n - n // 4, n - 1}
    return sorted(v for v in out if low <= v < n)


def _halves(items: tuple) -> Iterator[tuple]:
    """Subsequences of `items` without one chunk: halves first, then quarters, ... singles."""
    n = len(items)
    chunk = n
    while chunk >= 1:
        for start in range(0, n, chunk):
            yield items[:start] + items[start + chunk:]
        if chunk == 1:
            break
        chunk //= 2


# -- proposals -------------------------------------------------------------------------------


def proposals(case: MoECase) -> Iterator[tuple[str, MoECase]]:
    """Smaller variants of `case`, most reducing first, each with a description."""
    c = case
    for name, items in (("faults", c.faults), ("patches", c.patches)):
        if items:
            for rest in _halves(items):
                yield f"drop {len(items) - len(rest)} of {len(items)} {name}", \
                    dataclasses.replace(c, **{name: rest})
    for name in c.overrides.fields():
        yield f"drop override {name}", dataclasses.replace(
            c, overrides=dataclasses.replace(c.overrides, **{name: None}))
    if c.max_loras:
        for L in _smaller(c.max_loras, 0):
            yield f"max_loras {c.max_loras} -> {L}", shrink(c, L=L)
    if c.ep_size > 1:
        for ep in _smaller(c.ep_size, 1):
            yield f"ep_size {c.ep_size} -> {ep}", shrink(c, ep=ep)
    for T in _smaller(c.num_tokens, 1):
        yield f"T {c.num_tokens} -> {T}", shrink(c, T=T)
    for E in _smaller(c.num_experts, max(c.topk, c.ep_size)):
        yield f"E {c.num_experts} -> {E}", shrink(c, E=E)
    for K in _smaller(c.topk, 1):
        yield f"K {c.topk} -> {K}", shrink(c, K=K)
    for H in _smaller(c.hidden_size, 1):
        yield f"H {c.hidden_size} -> {H}", dataclasses.replace(c, hidden_size=H)
    bs = c.block_size
    for b in sorted({1, bs // 4, bs // 2} - {0}):
        if b < bs:
            yield f"block_size {bs} -> {b}", dataclasses.replace(c, block_size=b)
    if c.max_tokens_per_rank is not None:
        yield "max_tokens_per_rank -> default", dataclasses.replace(c, max_tokens_per_rank=None)
    yield from _simplifications(c)


def _simplifications(c: MoECase) -> Iterator[tuple[str, MoECase]]:
    d = _DEFAULTS
    for name in ("correction_bias", "expert_to_rank", "adapter_enabled", "renormalize",
                 "scoring", "dtype", "seed", "logits", "graph_padding"):
        if _differs(getattr(c, name), getattr(d, name)):
            yield f"{name} -> default", dataclasses.replace(c, **{name: getattr(d, name)})
    if isinstance(c.logits, Generated) and c.logits != Generated():
        for simpler in (Generated(), dataclasses.replace(c.logits, seed=0),
                        dataclasses.replace(c.logits, scale=1.0)):
            if simpler != c.logits:
                yield "logits -> simpler generator", dataclasses.replace(c, logits=simpler)
    for i, p in enumerate(c.patches):
        for simpler in (dataclasses.replace(p, kind="cell"), dataclasses.replace(p, kind="row"),
                        dataclasses.replace(p, row=0), dataclasses.replace(p, col=0)):
            if simpler != p:
                yield f"patch {i} simpler", dataclasses.replace(
                    c, patches=(*c.patches[:i], simpler, *c.patches[i + 1:]))
    for i, f in enumerate(c.faults):
        for simpler in (dataclasses.replace(f, rows=(0,), fraction=0.0),
                        dataclasses.replace(f, seed=0)):
            if simpler != f:
                yield f"fault {i} simpler", dataclasses.replace(
                    c, faults=(*c.faults[:i], simpler, *c.faults[i + 1:]))


# -- the search ------------------------------------------------------------------------------


def minimize(case: MoECase, keeps: Predicate,
             config: MinimizeConfig = MinimizeConfig()) -> MinimizeResult:
    """Reduce `case` while `keeps(candidate)` holds (it must hold for `case` itself; it is not
    re-checked). Returns the smallest case reached within the budget."""
    from harness.corpus.format import content_hash

    start = time.perf_counter()
    res = MinimizeResult(case, case)
    seen: set[str] = set()

    def spent() -> bool:
        return res.runs >= config.max_runs or time.perf_counter() - start > config.max_seconds

    progress = True
    while progress and not spent():
        progress = False
        current_cost = cost(res.case)
        for what, cand in proposals(res.case):
            if spent():
                res.exhausted = True
                break
            try:
                cand.validate()
                key = content_hash(cand)
            except (CaseError, HarnessError):
                continue
            if key in seen or cost(cand) >= current_cost:
                continue
            seen.add(key)
            res.runs += 1
            if keeps(cand):
                res.case = cand
                res.steps.append(what)
                progress = True
                break
    res.exhausted = res.exhausted or (progress and spent())
    res.seconds = time.perf_counter() - start
    return res


def minimize_finding(case: MoECase, signature: str, executor,
                     config: MinimizeConfig = MinimizeConfig()) -> MinimizeResult:
    """Minimise `case` keeping a finding with `signature` when run by `executor`
    (`harness.fuzz.worker.Executor`)."""
    def keeps(c: MoECase) -> bool:
        return any(f.signature == signature for f in executor.run(c).findings)

    return minimize(case, keeps, config)


def minimize_case(case: MoECase, target: str = "cpu", bugs: tuple[str, ...] | list[str] = (),
                  signature: str | None = None,
                  config: MinimizeConfig = MinimizeConfig()) -> tuple[str, MinimizeResult]:
    """Minimise `case` on `target` with `bugs` on, keeping `signature` (default: the case's
    first finding); returns (signature, result). `HarnessError` if the case does not produce
    the signature (or any finding) there."""
    from harness.fuzz.worker import make_executor

    with make_executor(target, tuple(bugs), features=lambda result: []) as executor:
        found = [f.signature for f in executor.run(case).findings]
        variants = ",".join(sorted(bugs)) or "none"
        if not found:
            raise HarnessError(f"the case gives no finding on {target} with variants {variants}"
                               ": nothing to minimise")
        if signature is None:
            signature = found[0]
        elif signature not in found:
            raise HarnessError(f"the case does not give {signature} on {target} with variants "
                               f"{variants} (it gives {', '.join(found)})")
        return signature, minimize_finding(case, signature, executor, config)
