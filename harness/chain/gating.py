"""Stage 1, top-k gating: scoring (softmax | sigmoid) then top-k selection.

Models the two paths of vLLM's `topk_softmax` kernels (csrc/moe/topk_softmax_kernels.cu):

* warp path (`topkGatingSoftmax`), for the expert counts in `geometry.WARP_EXPERTS`: a row is
  spread over `lanes = min(32, E)` lanes, lane l holding the `vpt = E / lanes` contiguous values
  [l*vpt, (l+1)*vpt). Scores are computed in fp32 (softmax: NaN-ignoring row max, exp(x - max),
  sum, multiply by 1/sum; sigmoid: 1 / (1 + exp(-x))). For each of the K rounds every lane
  starts its running max from its own first value and updates it on a strict `>` over its
  values (selection value = score + correction bias); a butterfly shuffle reduction over the
  lanes (xor masks lanes/2 .. 1) takes the other lane's pair when `other > mine` or when equal
  with a lower expert index; lane 0's winner is the round's (id, weight = the unbiased score);
  the lane owning the winner masks it with -10000 before the next round.
* fallback (`moeSoftmax`/`moeSigmoid` + `moeTopK`), for every other E: a scoring pass writes a
  float workspace [T, E]; then a block of 256 threads per row, each thread striding over the
  experts t, t+256, ..., holding a (key, value) pair initialised to (0, -inf) and replaced by an
  expert's when `value > best.value` or equal with a lower key, skipping experts already chosen
  in earlier rounds; a tree reduction over the 256 threads (stride 128 .. 1, same comparison).

Fixed (vLLM PR 39391): scores that are NaN or +-Inf are clamped to 0 right after scoring, on both
paths, so a NaN row yields the unique ids [0, 1, ..., K-1] by index tie-breaking. With
`topk-nan-argmax` the clamp is missing: NaN never wins a strict comparison and the row yields
duplicate ids ([0, 0, ...]).

Renormalisation (optional): weights / (sum > 0 ? sum : 1), summed in fp32.

Contract: any float logits, NaN/Inf included (legal: CUDA-graph padding rows); 1 <= K <= E.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness import geometry
from harness.chain import StageContext
from harness.errors import ContractError
from harness.geometry import uses_warp_path
from harness.memory import CheckedBuffer

_MASKED = -10000.0  # what topkGatingSoftmax writes over a chosen expert's value
#: the high word of an order key (`_order_keys`) of _MASKED: its bits 0xC61C4000, made monotone
_MASKED_KEY = ((0xC61C4000 - (1 << 32)) ^ 0x7FFFFFFF) << 32
_NEG_INF = float("-inf")
_POS_INF = float("inf")
#: NaN-free chunks of at most this many scores select by one max over each row per round
_ROWWISE_ELEMS = 1 << 17
#: NaN-free chunks of at least this many scores select by order keys (`_order_keys`): their
#: preparation costs more than it saves on smaller ones
_KEYS_MIN_ELEMS = 1 << 14
#: rows are independent: the model runs them in chunks of about 8 MiB of fp32 scores, so every
#: temporary stays in cache and out of fresh (page-faulting) allocations at T = 400,000
_CHUNK_ELEMS = 1 << 21


@dataclass(eq=False)
class GatingInput:
    """gating_logits [T, E] (fp32 | fp16 | bf16); correction_bias [E] fp32 or None (added to
    the scores for selection only, as vLLM's fused_topk_bias)."""

    gating_logits: torch.Tensor
    correction_bias: torch.Tensor | None
    topk: int
    scoring: str = "softmax"
    renormalize: bool = False


@dataclass(eq=False)
class GatingOutput:
    """topk_ids [T, K] int32, in selection order; topk_weights [T, K] fp32."""

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


def gating_cpu(inp: GatingInput, ctx: StageContext) -> GatingOutput:
    """CPU model of the gating kernels (warp or fallback path by E).

    Coverage: gating.path.{warp,fallback}, gating.scoring.*, gating.bias, gating.renormalize;
    counts of rows with a NaN score (gating.scores.nonfinite_rows) and of rows the fix clamped
    (gating.clamp.rows); gating.select.nan (a NaN reached the arg-max); per row and round:
    a non-finite winning value (gating.round.nonfinite_winner), a winner tied with the
    previous round's value, decided by the index (gating.tie_break), no expert beating the
    fallback's (0, -inf) pair (gating.fallback.no_candidate); rows renormalised by 1
    (gating.renorm.unit_denominator) and rows with a duplicate id (gating.duplicate_rows).
    """
    E = inp.gating_logits.shape[1]
    if uses_warp_path(E):
        ctx.cover("gating.path.warp")
        return _warp_path(inp, ctx)
    ctx.cover("gating.path.fallback")
    return _fallback_path(inp, ctx)


# -- shared: launch check, scoring, outputs, coverage ---------------------------------------------


def _launch(inp: GatingInput) -> tuple[int, int, int]:
    """Validate the launches (before anything runs) and the contract; return (T, E, K)."""
    T, E = inp.gating_logits.shape
    K = inp.topk
    geometry.validate(geometry.gating_launches(T, E))
    if not 1 <= K <= E:
        raise ContractError("gating", f"topk = {K} outside 1..num_experts = {E}")
    if inp.scoring not in ("softmax", "sigmoid"):
        raise ContractError("gating", f"unknown scoring {inp.scoring!r}")
    return T, E, K


class _Tally:
    """Coverage counts as 0-d tensors, summed into the context with one sync at the end."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.counts: list[torch.Tensor] = []

    def add(self, name: str, count: torch.Tensor) -> None:
        self.names.append(name)
        self.counts.append(count)

    def flush(self, ctx: StageContext) -> None:
        if self.counts:
            for name, n in zip(self.names, torch.stack(self.counts).tolist(), strict=True):
                ctx.cover(name, n)


def _score(inp: GatingInput, ctx: StageContext, rows: slice, out: torch.Tensor) -> bool:
    """Write the fp32 scores of the logits' `rows` into `out` (clamped unless
    `topk-nan-argmax`); return whether a score is still NaN."""
    s = out.copy_(inp.gating_logits[rows])
    if inp.scoring == "softmax":
        # The kernel's row max is NaN-ignoring (fmaxf), but a NaN cell still makes its
        # exp(x - max) NaN, hence the sum, hence 1/sum and every score of the row: the
        # NaN-propagating amax gives the same all-NaN row. A +Inf logit gives exp(Inf - Inf)
        # = NaN the same way, an all -Inf row exp(-Inf + Inf) = NaN. Otherwise sum >= 1.
        s.sub_(s.amax(1, keepdim=True)).exp_()
        total = s.sum(1, keepdim=True)
        s.mul_(total.reciprocal_())
        bad = bad_rows = torch.isnan(total)  # [n, 1]: such a row is NaN in every cell
    else:
        s.neg_().exp_().add_(1.0).reciprocal_()  # 1 / (1 + exp(-x)): NaN only from a NaN logit
        bad = torch.isnan(s)
        bad_rows = bad.any(1)
    n_bad = int(bad_rows.sum())
    ctx.cover("gating.scores.nonfinite_rows", n_bad)
    if n_bad == 0 or ctx.bugs.on("topk-nan-argmax"):  # the variant leaves NaN to the arg-max
        return n_bad > 0
    ctx.cover("gating.clamp.rows", n_bad)  # vLLM PR 39391: NaN / +-Inf scores become 0
    s.masked_fill_(bad, 0.0)
    return False


def _selection(inp: GatingInput, scores: torch.Tensor, out: torch.Tensor,
               score_nan: bool) -> bool:
    """Write score + correction_bias (the values compared) into `out`; return whether one may
    be NaN (a NaN score left by the variant, or a NaN bias)."""
    bias = inp.correction_bias
    if bias is None:
        out.copy_(scores)
        return score_nan
    torch.add(scores, bias.to(torch.float32).view(1, -1), out=out)
    return score_nan or bool(torch.isnan(bias).any())


def _outputs(T: int, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Views [T, K] of the poison-initialised output buffers."""
    return (CheckedBuffer("gating", "topk_ids", T * K, torch.int32).view(T, K),
            CheckedBuffer("gating", "topk_weights", T * K, torch.float32).view(T, K))


#: a chunk's rounds: winners [n, K], their weights [n, K], the winning values [K, n]
_Rounds = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
_RoundLists = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def _stacked(rounds: _RoundLists) -> _Rounds:
    """Per-round lists (winners, weights, winning values) as a chunk's `_Rounds`."""
    return torch.stack(rounds[0], 1), torch.stack(rounds[1], 1), torch.stack(rounds[2])


def _record(inp: GatingInput, tally: _Tally, ids: torch.Tensor, weights: torch.Tensor,
            rounds: _Rounds, total: torch.Tensor) -> None:
    """Write a chunk's rounds (winners, weights, winning values) into its output rows and
    renormalise: weights / (sum > 0 ? sum : 1), the sum accumulated in fp32 in selection
    order as lane 0 does."""
    ids.copy_(rounds[0])
    weights.copy_(rounds[1])
    best = rounds[2]  # [K, n]
    nonfinite = (best * 0).isnan()  # x * 0 is NaN exactly for NaN and +-Inf
    tally.add("gating.round.nonfinite_winner", nonfinite.sum())
    # a round won with the previous round's (finite) value: the two tied, the index decided
    tally.add("gating.tie_break", ((best[1:] == best[:-1]) & ~nonfinite[1:]).sum())
    if inp.renormalize:
        positive = total > 0  # a NaN sum is not > 0: divided by 1, the NaN weights stay
        weights.div_(torch.where(positive, total, 1.0).view(-1, 1))
        tally.add("gating.renorm.unit_denominator", (~positive).sum())
    if ids.shape[1] > 1:
        s = ids.sort(1).values
        tally.add("gating.duplicate_rows", (s[:, 1:] == s[:, :-1]).any(1).sum())


def _run_chunks(inp: GatingInput, ctx: StageContext, T: int, E: int,
                select: Callable[[slice, _Tally], tuple[_Rounds, torch.Tensor]]
                ) -> GatingOutput:
    """Run `select` (score and select a chunk of rows: its rounds (winners, weights, winning
    values) and renormalisation sum) chunk by chunk into the outputs; cover what is common
    to both paths."""
    K = inp.topk
    ids, weights = _outputs(T, K)
    tally = _Tally()
    ctx.cover(f"gating.scoring.{inp.scoring}")
    ctx.cover("gating.bias", inp.correction_bias is not None)
    ctx.cover("gating.renormalize", inp.renormalize)
    step = max(1, min(T, _CHUNK_ELEMS // E))
    for r0 in range(0, T, step):
        rows = slice(r0, min(r0 + step, T))
        rounds, total = select(rows, tally)
        _record(inp, tally, ids[rows], weights[rows], rounds, total)
    tally.flush(ctx)
    return GatingOutput(ids, weights)


# -- warp path (topkGatingSoftmax) ---------------------------------------------------------------


def _key_buffer(rows: int, E: int) -> torch.Tensor:
    """A buffer for `_order_keys` [rows, E, 2] int32 whose low words hold E - 1 - index: they
    never change (the -10000 mask keeps them), so they are written once."""
    buf = torch.empty((rows, E, 2), dtype=torch.int32)
    buf[..., 0] = torch.arange(E - 1, -1, -1, dtype=torch.int32)
    return buf


def _order_keys(values: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """int64 keys [n, E] of a NaN-free `values` [n, E] (written into `buf` from `_key_buffer`)
    whose order is the rounds' comparison: value descending, then index ascending.

    High word: the value's bits made monotone (negative floats' magnitude bits flipped), after
    `+ 0.0` turns -0.0 into +0.0, which `>` and `==` cannot tell apart; low word: E - 1 - index.
    One integer max then finds a row's first maximum (torch's max with indices costs ~8x more
    per element), and the transform is its own inverse, so a key gives back its value."""
    n = values.shape[0]
    keys = buf[:n]
    bits = (values + 0.0).view(torch.int32)
    keys[..., 1] = bits ^ (bits >> 31).bitwise_and_(0x7FFFFFFF)  # contiguous, then copied
    return keys.view(torch.int64).view(n, values.shape[1])


def _key_rounds(keys: torch.Tensor, scores: torch.Tensor, K: int) -> tuple[_Rounds, torch.Tensor]:
    """The K rounds on order keys (`_order_keys`): a round's winner is the max key, masked
    with the -10000 key (same index) before the next round. Identical to K rounds of the
    first maximum over the values, masked ones included (the mask value ties like any other)."""
    n, E = keys.shape
    won, winners = [], []
    for k in range(K):
        m = keys.amax(1)
        low = m & 0xFFFFFFFF  # E - 1 - winner
        winner = (E - 1) - low
        won.append(m)
        winners.append(winner)
        if k + 1 < K:
            keys.scatter_(1, winner.view(n, 1), (low + _MASKED_KEY).view(n, 1))
    hi = torch.stack(won).view(torch.int32).view(K, n, 2)[..., 1].contiguous()
    best = (hi ^ (hi >> 31).bitwise_and_(0x7FFFFFFF)).view(torch.float32)  # [K, n]
    return _weighed(scores, torch.stack(winners, 1), best)


def _weighed(scores: torch.Tensor, winners: torch.Tensor, best: torch.Tensor
             ) -> tuple[_Rounds, torch.Tensor]:
    """The rounds (winners [n, K], winning values [K, n]) with their weights, the unbiased
    scores of the winners, and the renormalisation sum lane 0 accumulates in selection
    order."""
    weights = scores.gather(1, winners)
    total = torch.zeros(winners.shape[0], dtype=torch.float32)
    for k in range(winners.shape[1]):
        total += weights[:, k]
    return (winners, weights, best), total


def _first_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, int64 position of its first occurrence) along the last dim of a NaN-free `x`:
    what a loop that starts from the first value and replaces on a strict `>` finds.
    torch.max(dim) returns the first maximal index (documented), in one pass."""
    best, pos = x.max(-1)
    return best, pos


def _lane_max(seg: torch.Tensor, has_nan: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A lane's running max over its values [..., vpt]: starts from the first value, replaced
    on a strict `>`; returns (value, position in the lane). A NaN never replaces; a NaN first
    value is never replaced."""
    if not has_nan:
        return _first_max(seg)
    first = seg[..., 0]
    val, pos = _first_max(seg.nan_to_num(nan=_NEG_INF, posinf=_POS_INF, neginf=_NEG_INF))
    first_nan = torch.isnan(first)
    return torch.where(first_nan, first, val), pos.masked_fill(first_nan, 0)


def _butterfly(val: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Lane 0's pair after the xor-shuffle reduction over the lanes [n, lanes], step by step.

    At the step of mask m, lane l < m combines with lane l + m (= l ^ m), taking the other's
    pair when `other > mine` or equal with a lower index; only lanes [0, m) feed lane 0 later.
    Needed literally when a pair may be NaN (the comparison is then not an order).
    """
    m = val.shape[1] // 2
    while m >= 1:
        av, bv, ai, bi = val[:, :m], val[:, m:2 * m], idx[:, :m], idx[:, m:2 * m]
        tie = (bv == av) & (bi < ai)
        take = (bv > av) | tie
        val, idx = torch.where(take, bv, av), torch.where(take, bi, ai)
        m //= 2
    return val[:, 0], idx[:, 0]


def _lane_argmax(val: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The butterfly's result when no pair is NaN: the comparison is then a total order on
    (value desc, index asc), so any reduction tree yields its maximum. Lanes hold increasing
    index ranges, so among equal values the first lane holds the lowest index."""
    best, lane = val.max(1)
    return best, idx.gather(1, lane.view(-1, 1)).view(-1)


def _warp_path(inp: GatingInput, ctx: StageContext) -> GatingOutput:
    """Lane l holds experts [l*vpt, (l+1)*vpt); per round each lane's running max, the
    butterfly to lane 0, and the owner lane's -10000 mask. Only the winner's lane changes
    between rounds, so only its running max is recomputed. A NaN-free chunk is an order, where
    lanes and butterfly yield the row's first maximum: small ones take it as one integer max
    of order keys per round (`_order_keys`; the lanes are kept where a NaN makes the reduction
    order matter, and on large chunks)."""
    T, E, K = _launch(inp)
    lanes, vpt = geometry.warp_layout(E)
    lane_base = torch.arange(0, lanes * vpt, vpt)
    step = max(1, min(T, _CHUNK_ELEMS // E))
    scores_buf = torch.empty((step, E), dtype=torch.float32)
    values_buf = torch.empty((step, E), dtype=torch.float32)  # what the arg-max compares
    keys_buf: list[torch.Tensor] = []  # the order keys' buffer, made on first use
    nan_seen = False

    def select(rows: slice, tally: _Tally) -> tuple[_Rounds, torch.Tensor]:
        nonlocal nan_seen
        n = rows.stop - rows.start
        scores, values = scores_buf[:n], values_buf[:n]
        has_nan = _selection(inp, scores, values, _score(inp, ctx, rows, scores))
        nan_seen |= has_nan
        # NaN-free, the lanes' running maxima and the butterfly find the row's first maximum
        # (see _lane_argmax): on small chunks one max over the row per round costs less, as
        # one integer max of order keys from _KEYS_MIN_ELEMS scores on
        rowwise = not has_nan and (vpt == 1 or n * E <= _ROWWISE_ELEMS)
        if rowwise and n * E >= _KEYS_MIN_ELEMS:
            if not keys_buf:
                keys_buf.append(_key_buffer(step, E))
            return _key_rounds(_order_keys(values, keys_buf[0]), scores, K)
        if not rowwise and vpt == 1:  # a lane's max is its one value: a view, masked in place
            lane_val, lane_idx = values, lane_base.expand(n, E)
        elif not rowwise:
            lane_val, pos = _lane_max(values.view(n, lanes, vpt), has_nan)
            lane_idx = pos.add_(lane_base)
            lane_rows = values.view(n * lanes, vpt)  # lane r*lanes + l of row r
            first_lane = torch.arange(0, n * lanes, lanes).view(n, 1)
        won: list[torch.Tensor] = []
        bests: list[torch.Tensor] = []
        for k in range(K):
            if rowwise:  # torch's max returns the first maximal index
                best, winner = values.max(1)
            elif has_nan:
                best, winner = _butterfly(lane_val, lane_idx)
            else:
                best, winner = _lane_argmax(lane_val, lane_idx)
            col = winner.view(n, 1)
            won.append(col)
            bests.append(best)
            if k + 1 == K:
                break
            # the lane owning the winner masks it; only that lane's running max changes
            values.scatter_(1, col, _MASKED)
            if vpt > 1 and not rowwise:
                lane = col.div(vpt, rounding_mode="floor")
                v, p = _lane_max(lane_rows.index_select(0, (first_lane + lane).view(n)),
                                 has_nan)
                lane_val.scatter_(1, lane, v.view(n, 1))
                lane_idx.scatter_(1, lane, p.view(n, 1).add_(lane_base[lane]))
        return _weighed(scores, torch.cat(won, 1), torch.stack(bests))

    out = _run_chunks(inp, ctx, T, E, select)
    ctx.cover("gating.select.nan", nan_seen)
    return out


# -- fallback path (moeSoftmax / moeSigmoid + moeTopK) -------------------------------------------


def _fallback_path(inp: GatingInput, ctx: StageContext) -> GatingOutput:
    """The scoring pass writes the workspace; moeTopK's threads then hold (key, value) pairs.

    A pair starts at (0, -inf) and takes an expert only on `value > best` (or equal with a
    lower key, which a thread's increasing keys never offer), so a NaN value, a -Inf value and
    an expert already chosen (skipped) are alike: never taken. Modelled as -Inf selection
    values. Every pair is then NaN-free, the comparison a total order on (value desc, key asc),
    and the 256-thread tree reduction yields its maximum whatever the order: the winner is the
    max over the threads' pairs, the lowest key among equals, and (0, -inf) when no expert
    beats -inf (the key-0 duplicates of an all-NaN row under `topk-nan-argmax`). Threads
    beyond E hold (0, -inf) throughout and are left out.
    """
    T, E, K = _launch(inp)
    ws_buf = CheckedBuffer("gating", "workspace", T * E, torch.float32)
    workspace = ws_buf.view(T, E)
    threads = min(E, geometry.FALLBACK_THREADS)
    strides = -(-E // threads)
    thread_ids = torch.arange(threads, dtype=torch.int32)
    step = max(1, min(T, _CHUNK_ELEMS // E))
    padded_buf = torch.full((step, strides * threads), _NEG_INF)  # the padding stays -inf
    nan_seen = False

    def select(rows: slice, tally: _Tally) -> tuple[_Rounds, torch.Tensor]:
        nonlocal nan_seen
        n = rows.stop - rows.start
        scores, padded = workspace[rows], padded_buf[:n]
        values = padded[:, :E]
        if _selection(inp, scores, values, _score(inp, ctx, rows, scores)):
            nan_seen = True
            values.nan_to_num_(nan=_NEG_INF, posinf=_POS_INF, neginf=_NEG_INF)
        by_thread = padded.view(n, strides, threads).transpose(1, 2)  # t: t, t + 256, ...
        if strides == 1:  # a thread's pair is its one expert's value: a view, masked in place
            thr_val, thr_key = padded, thread_ids.expand(n, threads)
        else:
            thr_val, s = _first_max(by_thread)  # the lowest stride of equal maxima
            thr_key = s.mul_(threads).add_(thread_ids)
        row_start = torch.arange(rows.start, rows.stop).mul_(E)
        total = torch.zeros(n, dtype=torch.float32)
        rounds: _RoundLists = ([], [], [])
        for k in range(K):
            if strides == 1:  # thread t holds key t: the first maximal thread has the lowest
                best, key = thr_val.max(1)  # key, and (0, -inf) when nothing beats -inf
                found = best > _NEG_INF
            else:
                best = thr_val.amax(1)
                tied = thr_val == best.view(n, 1)
                found = best > _NEG_INF
                key = torch.where(tied, thr_key, E).amin(1).masked_fill_(~found, 0).long()
            weight = ws_buf.read(row_start + key)
            for acc, x in zip(rounds, (key, weight, best), strict=True):
                acc.append(x)
            total += weight
            tally.add("gating.fallback.no_candidate", (~found).sum())
            if k + 1 == K:
                break
            values.scatter_(1, key.view(n, 1), _NEG_INF)  # chosen: skipped from now on
            if strides > 1:
                t = (key % threads).view(n, 1)
                v, s = _first_max(by_thread.gather(1, t.view(n, 1, 1).expand(n, 1, strides)))
                thr_val.scatter_(1, t, v)
                thr_key.scatter_(1, t, s.mul_(threads).add_(t.int()))
        return _stacked(rounds), total

    out = _run_chunks(inp, ctx, T, E, select)
    ctx.cover("gating.select.nan", nan_seen)
    return out
