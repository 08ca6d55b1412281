"""Batched fuzz executions on the CPU model: one fuzz input, B checked cases.

    bytes --decode--> base case --derive_logits / derive_ids--> B entry tensors [B, T, ...]
        --chain.stacked.run_stacked--> one stacked run --invariants.check--> findings?
        clean: B clean cases (features: their union)
        else:  each new signature reduced to the one case that shows it (run alone)

The siblings of a base case share its configuration and every tensor but the one it enters the
chain with (`stacked.entry`): gating logits, derived from the base's by tensor operations on
one generator seeded from the input (fresh draws at the base's scale, perturbations, tie
storms, NaN rows, +-Inf and special cells, CUDA-graph padding tails), or forged topk_ids
(fresh, duplicated, -1, out of range): Python work per batch does not grow with B. Sibling 0
is the base case itself. A case outside the stack's domain (`harness.chain.stacked.unstackable`:
expert parallelism, faults, forged receive counters or LoRA inputs, ...) runs alone, as before.

The corpus and the minimiser stay one case per file: a finding is stored with the case that
shows it alone (the base, or the sibling as `stacked.sibling`: the base with an explicit
entry tensor).
A finding of the stack that no case shows alone, and (sampled: `full_check_rate` of clean
batches) a case the stack called clean that shows a finding alone, are harness defects:
the finding "harness:check-mismatch", never dropped.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass

import torch

from harness.bugs import BugSet
from harness.case import MoECase
from harness.chain import stacked
from harness.chain.target import Target
from harness.findings import Finding
from harness.fuzz.worker import Executor, Outcome, run_one
from harness.invariants.verdicts import Verdicts, stack_verdicts


@dataclass(frozen=True)
class BatchConfig:
    """size: cases per batch (B); max_rows: at most this many stacked tokens (B*T; fewer
    cases for larger T); full_check_rate: fraction of clean batches of which one case is also
    run alone and fully checked; seed: mixes into every batch's generator."""

    size: int = 16
    max_rows: int = 1024
    full_check_rate: float = 0.01
    seed: int = 0


def derive_logits(base: torch.Tensor, batch: int, seed: int) -> torch.Tensor:
    """[batch, T, E] gating logits (base's dtype): the base [T, E] and batch - 1 siblings,
    derived with tensor operations from one generator seeded with `seed`: each sibling takes
    each operation with its own probability (fresh draw at the base's scale, perturbation,
    tie storm, NaN rows, +-Inf cells, special cells, zero or NaN padding tail)."""
    T, E = base.shape
    n = batch - 1
    if n <= 0:
        return base.unsqueeze(0).clone()
    g = torch.Generator().manual_seed(seed)
    x = base.float().expand(n, T, E).clone()
    finite = x[0][torch.isfinite(x[0])]
    scale = float(finite.std()) if finite.numel() > 1 else 1.0
    scale = scale if 0.0 < scale < 1e30 else 1.0
    flags = torch.rand((n, 8), generator=g) < torch.tensor(
        [0.35, 0.3, 0.2, 0.25, 0.15, 0.15, 0.1, 0.1])
    col = (lambda i: flags[:, i].view(n, 1, 1))  # noqa: E731 (sibling i of operation i)
    noise = torch.randn((n, T, E), generator=g) * scale
    x = torch.where(col(0), noise, x + torch.where(col(1), noise * 0.05, 0.0))
    ties = flags[:, 2].nonzero().squeeze(1)  # tie storm: values on a grid of scale / 2
    x[ties] = (x[ties] * (2.0 / scale)).round_() * (scale / 2.0)
    u = torch.rand((n, T, E), generator=g)
    x = x.masked_fill((torch.rand((n, T, 1), generator=g) < 0.25) & col(3), math.nan)
    x = torch.where((u < 1.0 / E) & col(4), torch.where(u < 0.5 / E, -math.inf, math.inf), x)
    specials = torch.tensor([math.nan, 0.0, -0.0, 1e-40, 3e38, -3e38, 65504.0])
    special = (u > 1.0 - 1.0 / E) & col(5)
    pick = ((1.0 - u) * (E * specials.numel())).long().clamp_(0, specials.numel() - 1)
    x = torch.where(special, specials[pick], x)
    tail = T - torch.randint(1, T + 1, (n, 1, 1), generator=g)  # CUDA-graph padding rows
    padded = (torch.arange(T).view(1, T, 1) >= tail) & (col(6) | col(7))
    x = x.masked_fill(padded & col(6), 0.0).masked_fill(padded & col(7) & ~col(6), math.nan)
    return torch.cat([base.unsqueeze(0), x.to(base.dtype)])


def derive_ids(base: torch.Tensor, num_experts: int, batch: int, seed: int) -> torch.Tensor:
    """[batch, T, K] int32 forged topk_ids: the base [T, K] and batch - 1 siblings (fresh
    distinct ids, duplicates in a row, -1 entries, ids out of range), one generator."""
    T, K = base.shape
    n, E = batch - 1, num_experts
    if n <= 0:
        return base.unsqueeze(0).clone()
    g = torch.Generator().manual_seed(seed)
    x = base.long().expand(n, T, K).clone()
    flags = torch.rand((n, 4), generator=g) < torch.tensor([0.5, 0.3, 0.2, 0.15])
    col = (lambda i: flags[:, i].view(n, 1, 1))  # noqa: E731
    fresh = torch.rand((n, T, E), generator=g).argsort(2)[..., :K]  # distinct ids per row
    x = torch.where(col(0), fresh, x)
    dup = (torch.rand((n, T, K), generator=g) < 0.2) & col(1)
    x = torch.where(dup, x[..., :1].expand(n, T, K), x)  # duplicates of slot 0
    x = x.masked_fill((torch.rand((n, T, K), generator=g) < 0.2) & col(2), -1)
    wild = torch.tensor([E, E + 1, 2 * E, -2, 2**31 - 1, -2**31])
    pick = wild[torch.randint(0, wild.numel(), (n, T, K), generator=g)]
    x = torch.where((torch.rand((n, T, K), generator=g) < 0.1) & col(3), pick, x)
    return torch.cat([base.unsqueeze(0).long(), x]).to(torch.int32)


def _counts(result, case: MoECase, batch: int) -> list[dict[str, int]]:
    """Each case's data counts (`features._data_features`'s) from the stack, vectorised."""
    T, E, M = case.num_tokens, case.num_experts, case.recv_slots
    logits = result.tensors.gating_logits.view(batch, T, -1)
    per: dict[str, torch.Tensor] = {
        "nonfinite_rows": (~torch.isfinite(logits)).any(2).sum(1),
        "nan_rows": torch.isnan(logits).any(2).sum(1)}
    hidden_bad = int((~torch.isfinite(result.tensors.hidden_states[:T])).any(1).sum())
    per["nonfinite_hidden_rows"] = torch.full((batch,), hidden_bad)
    if result.dispatch_in is not None:
        ids = result.dispatch_in.topk_ids.long().view(batch, T, -1)
        s = ids.sort(dim=2).values
        dup = (s[..., 1:] == s[..., :-1]).sum(2) if ids.shape[2] > 1 else \
            torch.zeros((batch, T), dtype=torch.long)
        per.update(dup_ids_max_per_token=dup.amax(1), dup_rows=(dup > 0).sum(1),
                   bad_ids=((ids < 0) | (ids >= E)).sum((1, 2)),
                   negative_ids=(ids < 0).sum((1, 2)))
    if result.dispatch_out is not None:
        if result.case.ep_size == 1:  # one rank, no padding slot (`stacked.stack_case`)
            rc = torch.full((batch,), M, dtype=torch.long)
        else:
            rc = result.dispatch_out.recv_counters[0].long()  # [source = case]
        per["padding_slots"] = M - rc.clamp(0, M)
        per["counters_out_of_range"] = ((rc < 0) | (rc > M)).long()
    rank = result.ranks[0] if result.ranks else None
    if rank is not None and rank.sort_out is not None and E:
        per["tokens_per_expert_max"] = rank.sort_out.expert_counts.view(batch, E).amax(1)
    names = list(per)
    rows = torch.stack([per[k].long() for k in names], 1).tolist()
    shared: dict[str, int] = {}
    if result.lora_in is not None:  # the same LoRA slots in every case
        L, slots = case.max_loras, result.lora_in.lora_ids.long()
        mapping = result.lora_in.token_lora_mapping[:T]
        active = int(slots[(slots >= 0) & (slots < L)].unique().numel())
        shared = {"lora_active": active,
                  "lora_all_active": int(active == L and bool((slots == -1).any())
                                         and bool((mapping == -1).any())),
                  "lora_bad_ids": int(((slots < -1) | (slots >= L)).sum()),
                  "lora_disabled": int((result.lora_in.adapter_enabled[:L] == 0).sum())}
    return [dict(zip(names, row, strict=True)) | shared for row in rows]


class BatchExecutor(Executor):
    """Runs each fuzz input as a batch of same-shape cases on the CPU model (see the module
    docstring); `run` (one given case) runs it alone. `reduced`: signatures already reduced
    to a case by this executor (a known one is not reduced again: the store keeps one case
    per signature). `mismatches`, `batches`, `alone` count what happened."""

    def __init__(self, target: Target, bugs: BugSet | tuple[str, ...] = (),
                 config: BatchConfig = BatchConfig()) -> None:
        self.target = target
        self.bugs = bugs if isinstance(bugs, BugSet) else BugSet.of(bugs)
        self.config = config
        self.reduced: set[str] = set()
        self.batches = self.alone = self.mismatches = 0
        self._rng = random.Random(config.seed)

    def run(self, case: MoECase) -> Outcome:
        return run_one(case, self.target, self.bugs)

    def batch_size(self, case: MoECase) -> int:
        """B for `case`: `config.size`, fewer for large T and where the stack's buffers
        would not fit (`stacked.max_batch`)."""
        c = self.config
        return max(1, min(c.size, c.max_rows // max(case.num_tokens, 1),
                          stacked.max_batch(case)))

    def run_input(self, data: bytes, limits) -> tuple[MoECase, Outcome]:
        from harness.fuzz import codec

        case = codec.decode(data, limits)
        B = self.batch_size(case)
        if B < 2 or stacked.unstackable(case, self.bugs, B) is not None:
            self.alone += 1
            return case, self.run(case)
        seed = zlib.crc32(data) ^ self.config.seed
        return case, self.run_batch(case, B, seed)

    def run_batch(self, case: MoECase, batch: int, seed: int) -> Outcome:
        """The batch of `case` and its siblings drawn with `seed` (`case` must stack)."""
        from harness import invariants
        from harness.case import materialize
        from harness.chain.runner import chain_mode
        from harness.fuzz.features import ids_of, union_features

        self.batches += 1
        with chain_mode():
            tensors = materialize(case)
        if stacked.entry(case) == "topk_ids":
            varied = derive_ids(case.overrides.topk_ids, case.num_experts, batch, seed)
        else:
            varied = derive_logits(tensors.gating_logits, batch, seed)
        try:
            result = stacked.run_stacked(case, varied, self.bugs, self.target.name, tensors)
            with chain_mode():
                result.findings = invariants.check(result)
                feats = ids_of(union_features(case, _counts(result, case, batch),
                                              result.coverage, result.rejected,
                                              result.findings))
        except Exception as exc:  # a defect the stack hit: the cases alone say what it is
            return self._reduce(case, varied, None, f"{type(exc).__name__}: {exc}")
        if result.findings:
            verdicts = stack_verdicts(result, batch)
            outcome = self._reduce(case, varied, result.findings, verdicts=verdicts)
            outcome.features = sorted(set(outcome.features) | set(feats))
            return outcome
        outcome = Outcome([], feats, rejected=result.rejected is not None)
        outcome.cases_run = batch
        if self._rng.random() < self.config.full_check_rate:
            self._sample(case, varied, outcome)
        return outcome

    def _single(self, case: MoECase, varied: torch.Tensor, b: int) -> tuple[MoECase, Outcome]:
        one = case if b == 0 else stacked.sibling(case, varied[b])
        return one, run_one(one, self.target, self.bugs)

    def _reduce(self, case: MoECase, varied: torch.Tensor, findings: list[Finding] | None,
                failure: str = "", verdicts: Verdicts | None = None) -> Outcome:
        """Each new signature of the stack's `findings` reduced to the first case that shows
        it alone, the cases its verdict bits flag (`verdicts`) tried first. None: the stack
        failed (`failure`): every case runs alone, and unless one fails the same way alone
        (an "internal" finding) the failure is a mismatch. A flagged case that does not show
        the flagged check alone is a mismatch too."""
        batch = varied.shape[0]
        wanted = None if findings is None else \
            [f.signature for f in findings if f.signature not in self.reduced]
        flagged = {} if verdicts is None or wanted is None else \
            {sig: cases for sig, cases in verdicts.failing().items() if sig in wanted}
        order = list(dict.fromkeys([b for cases in flagged.values() for b in cases]
                                   + list(range(batch))))
        out = Outcome(cases_run=batch)
        shown: dict[int, set[str]] = {}
        for b in order:
            if wanted is not None and not wanted:
                break
            one, alone = self._single(case, varied, b)
            shown[b] = {f.signature for f in alone.findings}
            out.features = sorted(set(out.features) | set(alone.features))
            for f in alone.findings:
                if f.signature in self.reduced or (wanted is not None and
                                                   f.signature not in wanted):
                    continue
                self.reduced.add(f.signature)
                out.findings.append(f)
                out.cases.append(one)
                if wanted is not None:
                    wanted.remove(f.signature)
        for sig in wanted or ():
            self._mismatch(out, case, f"the stack of {batch} cases found {sig}, which no "
                           "case shows alone", sig)
        for sig, cases in flagged.items():
            wrong = [b for b in cases if b in shown and sig not in shown[b]]
            if wrong:
                self._mismatch(out, case, f"the verdict bit of {sig} flagged case(s) {wrong} "
                               "of the stack; alone they do not show it", sig)
        if findings is None and not any(f.stage == "internal" for f in out.findings):
            self._mismatch(out, case, f"the stack of {batch} cases failed ({failure}); no "
                           "case fails alone", "internal")
        return out

    def _sample(self, case: MoECase, varied: torch.Tensor, outcome: Outcome) -> None:
        """Full check of one case of a clean batch, alone: any finding is a mismatch."""
        b = self._rng.randrange(varied.shape[0])
        one, alone = self._single(case, varied, b)
        if alone.findings:
            sigs = ", ".join(f.signature for f in alone.findings)
            self._mismatch(outcome, one, f"the stack called case {b} of {varied.shape[0]} "
                           f"clean; alone it shows {sigs}", sigs)
            for f in alone.findings:
                if f.signature not in self.reduced:
                    self.reduced.add(f.signature)
                    outcome.findings.append(f)
                    outcome.cases.append(one)

    def _mismatch(self, outcome: Outcome, case: MoECase, message: str, which: str) -> None:
        self.mismatches += 1
        if "harness:check-mismatch" in self.reduced:
            return
        self.reduced.add("harness:check-mismatch")
        outcome.findings.append(Finding("harness", "check-mismatch", message, case.severity,
                                        {"signatures": which}))
        outcome.cases.append(case)

    def close(self) -> None:
        self.target.close()
