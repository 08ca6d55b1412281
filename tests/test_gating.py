"""Tests of the gating stage's CPU model (harness/chain/gating.py).

Three independent statements of what the stage must compute:
- `reference`: plain torch (softmax / sigmoid, nan_to_num, + bias, stable descending sort);
  right for the fixed stage whenever the selection values stay above the -10000 mask;
- `warp_loop` / `fallback_loop`: the kernels' loops written out per row, lane and thread in
  Python (every lane of the butterfly, every thread of the tree), right for any input,
  NaN / Inf / huge biases included, with or without `topk-nan-argmax`;
- hand-written expectations for the NaN rows of vLLM PR 39391.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.bugs import BugSet
from harness.chain import StageContext, gating
from harness.chain.gating import GatingInput, _butterfly, _lane_argmax, gating_cpu
from harness.errors import ContractError, LaunchConfigError
from harness.geometry import WARP_EXPERTS, uses_warp_path, warp_layout

NAN, INF = math.nan, math.inf
VARIANT = BugSet.of(["topk-nan-argmax"])
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WARP_E = (8, 64, 128, 192, 256, 512)
FALLBACK_E = (6, 60, 72, 100, 1000)


def run(logits: torch.Tensor, k: int, scoring: str = "softmax", renormalize: bool = False,
        bias: torch.Tensor | None = None, bugs: BugSet = BugSet()
        ) -> tuple[torch.Tensor, torch.Tensor, StageContext]:
    ctx = StageContext(bugs=bugs)
    out = gating_cpu(GatingInput(logits, bias, k, scoring, renormalize), ctx)
    assert out.topk_ids.dtype == torch.int32 and out.topk_weights.dtype == torch.float32
    assert out.topk_ids.shape == out.topk_weights.shape == (logits.shape[0], k)
    return out.topk_ids, out.topk_weights, ctx


def reference(logits: torch.Tensor, k: int, scoring: str, renormalize: bool,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.float()
    s = torch.softmax(x, dim=1) if scoring == "softmax" else torch.sigmoid(x)
    s = torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0)
    sel = s if bias is None else s + bias
    ids = torch.sort(sel, dim=1, descending=True, stable=True).indices[:, :k]
    w = s.gather(1, ids)
    if renormalize:
        total = w.sum(1, keepdim=True)
        w = w / torch.where(total > 0, total, torch.ones_like(total))
    return ids.int(), w


def make_logits(T: int, E: int, dtype: torch.dtype, quantized: bool, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((T, E), generator=g) * 2
    if quantized:  # coarse values: many ties, decided by the lowest index
        x = torch.round(x * 2) / 2
    return x.to(dtype)


# -- agreement with the torch reference ---------------------------------------------------------


CASES = [(E, min(E, 8)) for E in WARP_E + FALLBACK_E] + [(512, 22), (64, 1), (100, 3)]


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(("E", "K"), CASES)
def test_matches_reference(E: int, K: int, dtype: str, scoring: str) -> None:
    T = 48
    for i, (quantized, with_bias, renorm) in enumerate(
            [(q, b, r) for q in (False, True) for b in (False, True) for r in (False, True)]):
        logits = make_logits(T, E, DTYPES[dtype], quantized, seed=E * 31 + i)
        bias = None
        if with_bias:
            bias = torch.randn(E, generator=torch.Generator().manual_seed(i)) * 0.1
            if quantized:
                bias = torch.round(bias * 8) / 8
        ids, w, ctx = run(logits, K, scoring, renorm, bias)
        ref_ids, ref_w = reference(logits, K, scoring, renorm, bias)
        where = f"quantized={quantized} bias={with_bias} renormalize={renorm}"
        assert torch.equal(ids, ref_ids), where
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6, msg=where)
        path = "warp" if uses_warp_path(E) else "fallback"
        assert ctx.coverage[f"gating.path.{path}"] == 1
        assert ctx.coverage["gating.duplicate_rows"] == 0


@pytest.mark.parametrize("E", [8, 100])
def test_all_equal_rows_take_the_lowest_indices(E: int) -> None:
    ids, w, ctx = run(torch.zeros(5, E), 4)
    assert ids.tolist() == [[0, 1, 2, 3]] * 5
    assert torch.allclose(w, torch.full((5, 4), 1.0 / E))
    assert ctx.coverage["gating.tie_break"] > 0


def test_non_contiguous_logits() -> None:
    logits = make_logits(64, 40, torch.float32, False, seed=3).t()  # [40, 64], transposed
    ids, w, _ = run(logits, 6, renormalize=True)
    ref_ids, ref_w = reference(logits.contiguous(), 6, "softmax", True, None)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)


# -- NaN / Inf rows (vLLM PR 39391, variant topk-nan-argmax) --------------------------------------


BAD_ROWS = {"nan": [NAN], "inf": [INF], "-inf": [-INF], "nan+inf": [NAN, INF, -INF]}


def bad_logits(E: int, fill: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = make_logits(4, E, torch.float32, False, seed=E)
    x[1] = torch.tensor(fill * E)[:E]  # row 1: every cell bad
    x[3, E // 2] = NAN  # row 3: one NaN cell
    return x.to(dtype)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E", [8, 64, 512, 6, 100, 1000])
@pytest.mark.parametrize("bad", list(BAD_ROWS))
def test_fixed_bad_rows_unique_and_finite(E: int, bad: str, scoring: str) -> None:
    K = min(E, 8)
    logits = bad_logits(E, BAD_ROWS[bad])
    ids, w, ctx = run(logits, K, scoring)
    ref_ids, ref_w = reference(logits, K, scoring, False, None)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w)
    assert torch.isfinite(w).all()
    for row in ids:
        assert row.unique().numel() == K
    if bad == "nan" or scoring == "softmax":  # such rows are clamped to 0 entirely
        assert ids[1].tolist() == list(range(K))
    clamped = 2 if scoring == "softmax" else 1 + (bad != "inf" and bad != "-inf")
    assert ctx.coverage["gating.clamp.rows"] == clamped


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("E", [8, 64, 512, 6, 100, 1000])
def test_variant_nan_row_duplicates(E: int, scoring: str) -> None:
    K = min(E, 8)
    logits = bad_logits(E, [NAN])
    fixed_ids, _, _ = run(logits, K, scoring)
    ids, w, ctx = run(logits, K, scoring, bugs=VARIANT)
    assert fixed_ids[1].unique().numel() == K
    assert ids[1].tolist() == [0] * K  # NaN never wins a strict '>': expert 0 every round
    assert torch.isnan(w[1]).all()
    assert ctx.coverage["gating.clamp.rows"] == 0
    assert ctx.coverage["gating.duplicate_rows"] >= 1
    assert torch.equal(ids[[0, 2]], fixed_ids[[0, 2]])  # healthy rows are untouched
    if scoring == "softmax":  # one NaN cell makes the whole row NaN
        assert ids[3].tolist() == [0] * K


def test_variant_all_bad_rows_on_both_paths() -> None:
    for E in (512, 1000):
        logits = torch.full((3, E), NAN)
        logits[2] = INF  # softmax of an all +Inf row: exp(Inf - Inf) = NaN
        ids, _, _ = run(logits, 22, bugs=VARIANT)
        assert (ids == 0).all()
        ids, w, _ = run(logits, 22, renormalize=True)
        assert ids.tolist() == [list(range(22))] * 3
        assert (w == 0).all()  # all-zero scores: sum 0, divided by 1


def test_variant_without_nan_is_the_fixed_stage() -> None:
    logits = make_logits(32, 64, torch.float32, True, seed=7)
    a = run(logits, 8, bugs=VARIANT)
    b = run(logits, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- the kernels' loops, written out ---------------------------------------------------------------


def loop_scores(logits: torch.Tensor, scoring: str, clamp: bool) -> torch.Tensor:
    """fp32 scores as the kernels compute them: NaN-ignoring max (fmaxf), exp, * (1 / sum)."""
    x = logits.float()
    if scoring == "softmax":
        mx = torch.where(torch.isnan(x), -INF, x).amax(1, keepdim=True)
        mx = torch.where(torch.isnan(x).all(1, keepdim=True), NAN, mx)
        e = torch.exp(x - mx)
        s = e * (1.0 / e.sum(1, keepdim=True))
    else:
        s = 1.0 / (1.0 + torch.exp(-x))
    return torch.nan_to_num(s, nan=0.0, posinf=0.0, neginf=0.0) if clamp else s


def warp_loop(sel: list[float], K: int) -> list[int]:
    E = len(sel)
    lanes, vpt = warp_layout(E)
    vals, ids = list(sel), []
    for _ in range(K):
        pairs = []
        for lane in range(lanes):
            base = lane * vpt
            best, idx = vals[base], base
            for j in range(base + 1, base + vpt):
                if vals[j] > best:
                    best, idx = vals[j], j
            pairs.append((best, idx))
        mask = lanes // 2
        while mask >= 1:  # every lane shuffles with lane ^ mask
            new = []
            for lane in range(lanes):
                (mv, mi), (ov, oi) = pairs[lane], pairs[lane ^ mask]
                new.append((ov, oi) if ov > mv or (ov == mv and oi < mi) else (mv, mi))
            pairs, mask = new, mask // 2
        winner = pairs[0][1]
        ids.append(winner)
        vals[winner] = -10000.0
    return ids


def fallback_loop(sel: list[float], K: int, threads: int = 256) -> list[int]:
    E, ids = len(sel), []
    for _ in range(K):
        pairs = []
        for t in range(threads):
            key, val = 0, -INF
            for e in range(t, E, threads):
                if e in ids:
                    continue
                if sel[e] > val or (sel[e] == val and e < key):
                    key, val = e, sel[e]
            pairs.append((key, val))
        stride = threads // 2
        while stride >= 1:
            for t in range(stride):
                (ak, av), (bk, bv) = pairs[t], pairs[t + stride]
                if bv > av or (bv == av and bk < ak):
                    pairs[t] = (bk, bv)
            stride //= 2
        ids.append(pairs[0][0])
    return ids


def check_against_loops(logits: torch.Tensor, K: int, scoring: str, bias: torch.Tensor | None,
                        bugs: BugSet) -> None:
    E = logits.shape[1]
    s = loop_scores(logits, scoring, clamp=not bugs)
    sel = s if bias is None else s + bias
    loop = warp_loop if uses_warp_path(E) else fallback_loop
    expect = torch.tensor([loop(row, K) for row in sel.tolist()], dtype=torch.int32)
    ids, w, _ = run(logits, K, scoring, bias=bias, bugs=bugs)
    assert torch.equal(ids, expect), (ids.tolist(), expect.tolist())
    torch.testing.assert_close(w, s.gather(1, expect.long()), equal_nan=True, rtol=0, atol=0)


SPECIAL = [NAN, INF, -INF, 0.0, 0.5, -0.5, 1.0, 2.0, -3.0, 40.0]


@pytest.mark.parametrize("keys", [False, True], ids=["max", "keys"])
@pytest.mark.parametrize("bugs", [BugSet(), VARIANT], ids=["fixed", "variant"])
@pytest.mark.parametrize("E", [1, 2, 4, 8, 32, 64, 192, 512, 3, 6, 60, 300, 1000])
def test_matches_kernel_loops(monkeypatch, E: int, bugs: BugSet, keys: bool) -> None:
    """Small NaN-free chunks take torch's max per row, or (forced) order keys."""
    monkeypatch.setattr(gating, "_KEYS_MIN_ELEMS", 0 if keys else 1 << 30)
    g = torch.Generator().manual_seed(E)
    T = 6
    pick = torch.randint(0, len(SPECIAL), (T, E), generator=g)
    logits = torch.tensor(SPECIAL)[pick]
    logits[0] = torch.randn(E, generator=g)
    logits[1] = NAN
    biases = [None, torch.round(torch.randn(E, generator=g) * 4) / 4]
    for scoring in ("softmax", "sigmoid"):
        for bias in biases:
            check_against_loops(logits, min(E, 5), scoring, bias, bugs)


@pytest.mark.parametrize("E", [64, 192, 512])
def test_lane_path_matches_kernel_loops(monkeypatch, E: int) -> None:
    """Large NaN-free chunks keep every lane's running max instead of one max per row: the
    same selection, ties included (small chunks take the per-row max)."""
    monkeypatch.setattr(gating, "_ROWWISE_ELEMS", 0)
    g = torch.Generator().manual_seed(E)
    logits = torch.tensor(SPECIAL)[torch.randint(0, len(SPECIAL), (6, E), generator=g)]
    logits[0] = torch.randn(E, generator=g)
    bias = torch.round(torch.randn(E, generator=g) * 4) / 4
    for scoring in ("softmax", "sigmoid"):
        for b in (None, bias):
            check_against_loops(logits, 5, scoring, b, BugSet())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), E=st.sampled_from([1, 2, 4, 8, 16, 64, 3, 5, 12, 257]),
       scoring=st.sampled_from(["softmax", "sigmoid"]), variant=st.booleans())
def test_loops_on_special_values(data, E: int, scoring: str, variant: bool) -> None:
    keys = data.draw(st.booleans())  # NaN-free chunks by torch's max or by order keys
    values = st.sampled_from([*SPECIAL, -20000.0, -10000.0])
    T = data.draw(st.integers(1, 3))
    K = data.draw(st.integers(1, min(E, 10)))
    logits = torch.tensor(data.draw(st.lists(st.lists(values, min_size=E, max_size=E),
                                             min_size=T, max_size=T)))
    bias = None
    if data.draw(st.booleans()):  # NaN, Inf and below-the-mask biases too
        bias = torch.tensor(data.draw(st.lists(values, min_size=E, max_size=E)))
    saved = gating._KEYS_MIN_ELEMS
    gating._KEYS_MIN_ELEMS = 0 if keys else 1 << 30
    try:
        check_against_loops(logits, K, scoring, bias, VARIANT if variant else BugSet())
    finally:
        gating._KEYS_MIN_ELEMS = saved


def test_fast_lane_reduction_equals_butterfly() -> None:
    """Without NaN the lane reduction is an order, so the shortcut must agree step for step."""
    g = torch.Generator().manual_seed(0)
    for lanes, vpt in ((32, 16), (32, 1), (8, 1), (2, 1), (1, 1)):
        val = torch.randint(-2, 3, (500, lanes), generator=g).float()
        val[:50] = -INF
        idx = (torch.arange(lanes) * vpt + torch.randint(0, vpt, (500, lanes), generator=g)).int()
        a, b = _butterfly(val, idx), _lane_argmax(val, idx)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# -- contract and launches ------------------------------------------------------------------


def test_every_warp_expert_count_runs() -> None:
    for E in sorted(WARP_EXPERTS):
        ids, _, _ = run(make_logits(3, E, torch.float32, True, seed=E), min(E, 4))
        ref_ids, _ = reference(make_logits(3, E, torch.float32, True, seed=E), min(E, 4),
                               "softmax", False, None)
        assert torch.equal(ids, ref_ids), E


def test_rejections() -> None:
    with pytest.raises(ContractError):
        run(torch.zeros(2, 8), 9)
    with pytest.raises(ContractError):
        run(torch.zeros(2, 8), 2, scoring="relu")
    with pytest.raises(LaunchConfigError):  # no rows: a grid of 0 blocks
        run(torch.zeros(0, 8), 2)


def test_coverage_counts() -> None:
    logits = torch.zeros(4, 8)
    logits[1] = NAN
    _, _, ctx = run(logits, 2, "sigmoid", renormalize=True, bias=torch.zeros(8))
    assert ctx.coverage["gating.scoring.sigmoid"] == 1
    assert ctx.coverage["gating.bias"] == 1
    assert ctx.coverage["gating.clamp.rows"] == 1
    assert ctx.coverage["gating.renormalize"] == 1
    assert ctx.coverage["gating.renorm.unit_denominator"] == 1  # the clamped row sums to 0
    _, _, ctx = run(logits, 2, bugs=VARIANT)
    assert ctx.coverage["gating.scores.nonfinite_rows"] == 1
    assert ctx.coverage["gating.select.nan"] == 1
    assert ctx.coverage["gating.round.nonfinite_winner"] == 1  # then the -10000 mask wins
    _, _, ctx = run(torch.full((2, 6), NAN), 3, bugs=VARIANT)
    assert ctx.coverage["gating.fallback.no_candidate"] == 6


@pytest.mark.parametrize("bugs", [BugSet(), VARIANT], ids=["fixed", "variant"])
@pytest.mark.parametrize("E", [64, 512, 100, 300])
def test_chunked_rows_agree(monkeypatch, E: int, bugs: BugSet) -> None:
    """Rows run in chunks (a few rows each here): chunk edges change nothing."""
    logits = make_logits(50, E, torch.float32, True, seed=E)
    logits[[3, 31, 49]] = NAN
    bias = torch.round(torch.randn(E, generator=torch.Generator().manual_seed(1)) * 4) / 4
    whole = run(logits, 7, "softmax", True, bias, bugs)
    monkeypatch.setattr(gating, "_CHUNK_ELEMS", 7 * E)  # chunks of 7 rows
    chunked = run(logits, 7, "softmax", True, bias, bugs)
    assert torch.equal(whole[0], chunked[0])
    torch.testing.assert_close(whole[1], chunked[1], equal_nan=True, rtol=0, atol=0)
    assert whole[2].coverage == chunked[2].coverage
    if not bugs:
        ref_ids, ref_w = reference(logits, 7, "softmax", True, bias)
        assert torch.equal(chunked[0], ref_ids)
        torch.testing.assert_close(chunked[1], ref_w)


# -- order keys: one integer max per round instead of torch's max with indices -----------------

KEY_POOL = [0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 3e38, -3e38, INF, -INF, 1.0, -1.0, 0.5,
            -10000.0, -20000.0, 1e-30, -1e-30]


def max_rounds(values: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rounds as torch's first maximum finds them: winners [n, K], winning values [K, n]."""
    values, won, best = values.clone(), [], []
    for _ in range(K):
        b, w = values.max(1)
        won.append(w)
        best.append(b)
        values.scatter_(1, w.view(-1, 1), -10000.0)
    return torch.stack(won, 1), torch.stack(best)


@pytest.mark.parametrize("E", [1, 2, 7, 32, 64, 128, 300])
def test_order_key_rounds_equal_first_max_rounds(E: int) -> None:
    """Ties, +-0, denormals, huge, infinite and below-the-mask values: same winners, same
    winning values (+0 for -0: equal under `==`), weights gathered from the scores."""
    g = torch.Generator().manual_seed(E)
    T, K = 200, min(E, 9)
    values = torch.tensor(KEY_POOL)[torch.randint(0, len(KEY_POOL), (T, E), generator=g)]
    values[:50] = torch.randn((50, E), generator=g)
    values[50:60] = -0.0
    values[60:70] = torch.round(torch.randn((10, E), generator=g))
    scores = torch.rand((T, E), generator=g)
    buf = gating._key_buffer(T + 3, E)
    for _ in range(2):  # a buffer is reused from chunk to chunk
        keys = gating._order_keys(values, buf)
        (won, weights, best), total = gating._key_rounds(keys, scores, K)
    ref_won, ref_best = max_rounds(values, K)
    assert torch.equal(won, ref_won)
    assert torch.equal(best, ref_best)  # -0.0 == 0.0
    assert torch.equal(weights, scores.gather(1, ref_won))
    ref_total = torch.zeros(T)
    for k in range(K):
        ref_total += weights[:, k]
    assert torch.equal(total, ref_total)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("E", [64, 128, 512])
def test_order_keys_and_lanes_agree(monkeypatch, dtype: str, E: int) -> None:
    """The whole stage with order keys, with torch's max per row and with the lanes (each
    forced): ids, weights bitwise and coverage identical, on special values and below-the-mask
    biases."""
    g = torch.Generator().manual_seed(E)
    pool = torch.tensor([*SPECIAL, -0.0, 1e-40, 3e38, -3e38, 60000.0])
    logits = pool[torch.randint(0, len(pool), (40, E), generator=g)].to(DTYPES[dtype])
    bias = torch.tensor([0.0, -20000.0, -10000.0, 1e-40, -0.0])[
        torch.randint(0, 5, (E,), generator=g)]
    for scoring in ("softmax", "sigmoid"):
        for b in (None, bias):
            outs = []
            for rowwise, keys in ((1 << 30, 0), (1 << 30, 1 << 30), (0, 0)):
                with monkeypatch.context() as m:
                    m.setattr(gating, "_ROWWISE_ELEMS", rowwise)
                    m.setattr(gating, "_KEYS_MIN_ELEMS", keys)
                    outs.append(run(logits, 8, scoring, True, b))
            for other in outs[1:]:
                assert torch.equal(outs[0][0], other[0])
                assert torch.equal(outs[0][1].view(torch.int32), other[1].view(torch.int32))
                assert outs[0][2].coverage == other[2].coverage
