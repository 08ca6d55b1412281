"""The sizes of a fuzzed case and editing a case to new ones, in one place.

`CodecLimits` bound what one decoded case may cost (`token_cap`, `hidden_cap`); `reshape`
gives a case new sizes within them, keeping every size-dependent field consistent (the
mutators grow and shrink cases with it); `shrink` cuts a case's explicit tensors to smaller
sizes and leaves validity to the caller (the minimiser tries each candidate); `fit_rows`,
`fit_flat` and `cut` are the tensor edits both are made of, and the codec's encoder fits
tensors to their declared shapes with `fit_flat`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from harness.case import (
    MAX_EP,
    MAX_EXPERTS,
    MAX_HIDDEN,
    MAX_LORAS,
    MAX_TOKENS,
    MAX_TOPK,
    Generated,
    MoECase,
    Overrides,
)


@dataclass(frozen=True)
class CodecLimits:
    """The codec's domain: what one decoded case may cost. The decoder clamps into it; the
    encoder (strict) refuses cases outside it. Bytes decode to different cases under different
    limits: a corpus of bytes goes with its limits."""

    #: elements of one explicit tensor (logits, correction_bias, an override)
    explicit_elements: int = 4096
    #: T * E: the [T, E] logits every backend materialises
    logits_elements: int = 2**19
    #: ep * ep * max_tokens_per_rank * K: the receive buffers of dispatch
    recv_elements: int = 2**19
    #: H * H * max(T * K, E): the experts' multiply-adds and weights
    expert_work: int = 2**24


#: sized for the CPU model's fuzz loop: the largest decoded case runs in seconds, not minutes
LIMITS = CodecLimits()
#: for GPU backends: production token counts (vLLM PR 43599's 378k tokens at E=512, K=22)
LARGE_LIMITS = CodecLimits(logits_elements=2**28, recv_elements=2**28, expert_work=2**31)


def token_cap(num_experts: int, topk: int, ep_size: int, limits: CodecLimits = LIMITS) -> int:
    """The largest T the codec holds for these sizes."""
    ep = ep_size
    return max(1, min(MAX_TOKENS, limits.logits_elements // num_experts,
                      ep * (limits.recv_elements // (ep * ep * topk))))


def hidden_cap(num_tokens: int, topk: int, num_experts: int,
               limits: CodecLimits = LIMITS) -> int:
    """The largest H the codec holds for these sizes."""
    work = max(num_tokens * topk, num_experts)
    return min(max(math.isqrt(limits.expert_work // work), 1), MAX_HIDDEN)


# -- tensors ---------------------------------------------------------------------------------------


def fit_flat(t: torch.Tensor, shape: tuple[int, ...], fill: float | int = 0) -> torch.Tensor:
    """`t` flattened, truncated or padded with `fill` to `shape`."""
    flat = t.reshape(-1)
    n = math.prod(shape)
    if flat.numel() < n:
        flat = torch.cat([flat, torch.full((n - flat.numel(),), fill, dtype=flat.dtype)])
    return flat[:n].reshape(shape)


def fit_rows(t: torch.Tensor, rows: int, fill: torch.Tensor | float | int) -> torch.Tensor:
    """`t` cut or padded (with rows of `fill`) to `rows` rows along dimension 0."""
    if t.shape[0] >= rows:
        return t[:rows].clone()
    pad = torch.empty((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    pad[:] = fill
    return torch.cat([t, pad])


def cut(t: torch.Tensor | None, rows: int | None = None,
         cols: int | None = None) -> torch.Tensor | None:
    if t is None:
        return None
    if rows is not None:
        t = t[:rows]
    if cols is not None and t.dim() == 2:
        t = t[:, :cols]
    return t.clone()


# -- cases -----------------------------------------------------------------------------------------


def reshape(case: MoECase, limits: CodecLimits = LIMITS, *, T: int | None = None,
            E: int | None = None, K: int | None = None, ep: int | None = None,
            L: int | None = None, H: int | None = None, bs: int | None = None) -> MoECase:
    """`case` with new sizes and every field that depends on them kept consistent: explicit
    tensors cut or padded (ids rows padded with valid routes, LoRA mappings with the base
    model), or dropped where the shape changed meaning."""
    T0, E0, K0, ep0, L0 = (case.num_tokens, case.num_experts, case.topk, case.ep_size,
                           case.max_loras)
    E = min(max(E or E0, 1), MAX_EXPERTS)
    K = min(max(K or K0, 1), E, MAX_TOPK)
    ep = min(max(ep or ep0, 1), E, MAX_EP)
    T = min(max(T or T0, 1), token_cap(E, K, ep, limits))
    L = min(max(L0 if L is None else L, 0), MAX_LORAS)
    cap = limits.explicit_elements
    logits = case.logits
    if isinstance(logits, torch.Tensor):
        logits = (fit_rows(logits, T, 0.0) if E == E0 and T * E <= cap
                  else Generated(case.seed))
    bias = case.correction_bias
    if isinstance(bias, torch.Tensor) and E != E0:
        bias = Generated(case.seed)
    o = case.overrides.fields()
    if "gating_logits" in o:
        if E != E0 or T * E > cap:
            del o["gating_logits"]
        else:
            o["gating_logits"] = fit_rows(o["gating_logits"], T, 0.0)
    if "topk_ids" in o:
        if K != K0 or T * K > cap:
            o.pop("topk_ids")
            o.pop("topk_weights", None)
        else:
            o["topk_ids"] = fit_rows(o["topk_ids"], T, torch.arange(K, dtype=torch.int32) % E)
            if "topk_weights" in o:
                o["topk_weights"] = fit_rows(o["topk_weights"], T, 1.0 / K)
    if "recv_counters" in o and ep != ep0:
        del o["recv_counters"]
    if L == 0 or T > cap:
        o.pop("token_lora_mapping", None)
    elif "token_lora_mapping" in o:
        o["token_lora_mapping"] = fit_rows(o["token_lora_mapping"], T, -1)
    if L == 0:
        o.pop("lora_ids", None)
    elif "lora_ids" in o:
        o["lora_ids"] = fit_rows(o["lora_ids"], L + 1, -1)
    enabled = case.adapter_enabled
    if enabled is not None and L != L0:
        enabled = (tuple(enabled[:L]) + (True,) * max(0, L - len(enabled))) if L else None
    e2r = case.expert_to_rank
    if e2r is not None and (E != E0 or ep != ep0):
        e2r = tuple(r % ep for r in e2r[:E]) + (0,) * max(0, E - len(e2r))
    M = case.max_tokens_per_rank
    if M is not None and M < math.ceil(T / ep):
        M = None
    patches = case.patches if bias is not None else tuple(
        p for p in case.patches if p.target != "correction_bias")
    return replace(case, num_tokens=T, num_experts=E, topk=K, ep_size=ep, max_loras=L,
                   hidden_size=min(max(H or case.hidden_size, 1), MAX_HIDDEN),
                   block_size=bs or case.block_size, logits=logits, correction_bias=bias,
                   overrides=Overrides(**o), adapter_enabled=enabled, expert_to_rank=e2r,
                   max_tokens_per_rank=M, patches=patches)


def shrink(case: MoECase, T: int | None = None, E: int | None = None, K: int | None = None,
            ep: int | None = None, L: int | None = None) -> MoECase:
    """`case` with new sizes, its explicit tensors cut to match (validity is checked later)."""
    T = case.num_tokens if T is None else T
    E = case.num_experts if E is None else E
    K = case.topk if K is None else K
    ep = case.ep_size if ep is None else ep
    L = case.max_loras if L is None else L
    o = case.overrides
    lora = L > 0
    overrides = Overrides(
        gating_logits=cut(o.gating_logits, T, E), topk_ids=cut(o.topk_ids, T, K),
        topk_weights=cut(o.topk_weights, T, K),
        recv_counters=None if o.recv_counters is None or ep != case.ep_size
        else o.recv_counters.clone(),
        token_lora_mapping=cut(o.token_lora_mapping, T) if lora else None,
        lora_ids=cut(o.lora_ids, L + 1) if lora and o.lora_ids is not None
        and o.lora_ids.numel() >= L + 1 else None)
    logits = cut(case.logits, T, E) if isinstance(case.logits, torch.Tensor) else case.logits
    bias = case.correction_bias
    if isinstance(bias, torch.Tensor):
        bias = bias[:E].clone()
    e2r = case.expert_to_rank
    if e2r is not None:
        e2r = tuple(r % ep for r in e2r[:E]) if len(e2r) >= E else None
    enabled = case.adapter_enabled
    if enabled is not None:
        enabled = tuple(enabled[:L]) if len(enabled) >= L else None
    mtpr = case.max_tokens_per_rank
    if mtpr is not None and mtpr < -(-T // ep):
        mtpr = None
    return replace(case, num_tokens=T, num_experts=E, topk=K, ep_size=ep,
                               max_loras=L, overrides=overrides, logits=logits,
                               correction_bias=bias, expert_to_rank=e2r,
                               adapter_enabled=enabled, max_tokens_per_rank=mtpr)
