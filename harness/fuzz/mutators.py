"""MoE-aware structured mutation: decode -> change the case with a named operator -> encode.

libFuzzer's byte mutations rarely turn a random case into one that routes NaN rows, forges a
receive counter or activates every LoRA slot; these operators do it in one step. Each takes a
case and a `random.Random` and returns a case; the encoder writes it leniently and the decoder
repairs whatever the change broke (K <= E, override shapes, limits), so an operator only has to
express its intent. The operators are generic MoE edge cases (special values, CUDA-graph
padding, ties, forged stage inputs, launch thresholds solved from the geometry): none knows
which bug variant is on.

`mutate(data, max_size, seed, config)` has atheris' custom-mutator signature and
`crossover(data1, data2, max_size, seed, config)` its custom-crossover one plus the config; the
engine binds the config. With probability `config.byte_probability` (always, with
`enabled=False`, the `--no-moe-mutators` ablation) they fall back to byte-level mutation:
libFuzzer's own (`atheris.Mutate`, which only works inside `atheris.Fuzz`, so the engine sets
`libfuzzer_bytes`) or a small built-in one.

(Long for one module: one short function per operator, each the statement of one edge case.)
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from harness.case import (
    FAULT_KINDS,
    FAULT_TENSORS,
    GRAPH_PADDINGS,
    MAX_EXPERTS,
    MAX_TOPK,
    SPECIAL_VALUES,
    Fault,
    Generated,
    MoECase,
    Overrides,
    Patch,
)
from harness.errors import ConfigError
from harness.fuzz.codec import CAPTURE_SIZES, decode, encode, launch_thresholds
from harness.fuzz.resize import LIMITS, CodecLimits, reshape, token_cap
from harness.geometry import WARP_EXPERTS

#: appended patches and faults beyond these replace a random one instead
MAX_PATCHES = 64
MAX_FAULTS = 8
INT32_MAX = 2**31 - 1
INT32_MIN = -2**31

Operator = Callable[[MoECase, random.Random, CodecLimits], MoECase]


# -- helpers -----------------------------------------------------------------------------------


def _with_overrides(case: MoECase, **changes: torch.Tensor | None) -> MoECase:
    o = case.overrides.fields()
    o.update(changes)
    return replace(case, overrides=Overrides(**{k: v for k, v in o.items() if v is not None}))


def _add(items: tuple, item: object, cap: int, rng: random.Random) -> tuple:
    if len(items) < cap:
        return (*items, item)
    i = rng.randrange(len(items))
    return (*items[:i], item, *items[i + 1:])


def _row(T: int, rng: random.Random) -> int:
    """A token row worth corrupting: the first, the last (CUDA-graph padding sits at the end),
    one at a sort block boundary, or any."""
    return rng.choice([0, T - 1, T - 1, 255 % T, 256 % T, rng.randrange(T), rng.randrange(T)])


def _routes(T: int, E: int, K: int, rng: random.Random) -> torch.Tensor:
    """[T, K] int32 valid routes: K distinct experts per token."""
    g = torch.Generator().manual_seed(rng.randrange(2**32))
    if T * E <= 1 << 18:
        return torch.rand((T, E), generator=g).topk(K, dim=1).indices.to(torch.int32)
    return torch.tensor([rng.sample(range(E), K) for _ in range(T)], dtype=torch.int32)


def _some_rows(T: int, rng: random.Random) -> list[int]:
    n = rng.choice([1, 1, 2, 4, max(1, T // 8), T])
    if n >= T:
        return list(range(T))
    if rng.random() < 0.4:  # a contiguous tail, as padded rows are
        return list(range(T - n, T))
    return sorted(rng.sample(range(T), n))


# -- operators ---------------------------------------------------------------------------------


def special_values(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """NaN, +-Inf, huge, denormal, -0.0 or a tie into a cell, row, column or all of a tensor."""
    targets = ["gating_logits", "hidden_states"] + (["correction_bias"] if case.correction_bias
                                                     is not None else [])
    target = rng.choices(targets, [6, 2, 1][:len(targets)])[0]
    kind = rng.choices(["cell", "row", "column", "all"], [4, 4, 1, 1])[0]
    value = rng.choices(SPECIAL_VALUES, [4, 2, 2, 2, 1, 1, 1])[0]
    patch = Patch(target, kind, value, _row(case.num_tokens, rng),
                  rng.randrange(case.num_experts))
    return replace(case, patches=_add(case.patches, patch, MAX_PATCHES, rng))


def nan_rows(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Whole gating-logit rows of NaN / +-Inf / huge (-Inf rows: softmax of all -Inf is NaN)."""
    value = rng.choices(["nan", "inf", "-inf", "huge"], [4, 2, 2, 1])[0]
    rows = _some_rows(case.num_tokens, rng)[:32]
    if len(rows) == case.num_tokens and rng.random() < 0.5:
        new = (Patch("gating_logits", "all", value),)
    else:
        new = tuple(Patch("gating_logits", "row", value, row=r) for r in rows)
    patches = (case.patches + new)[-MAX_PATCHES:]
    return replace(case, patches=patches)


def graph_padding(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """CUDA-graph padding: grow T to the next capture size, the new rows zero, NaN or stale
    (generated values, as a previous batch left them); also sets `graph_padding` for the graph
    backend, sometimes with T just past a power of two (the most padding rows)."""
    T = case.num_tokens
    mode = rng.choice(GRAPH_PADDINGS)
    if rng.random() < 0.3:
        return reshape(replace(case, graph_padding=mode), limits,
                       T=(1 << rng.randrange(10)) + rng.choice([1, 1, 2, 3]))
    S = next((c for c in CAPTURE_SIZES if c > T), T + rng.choice([1, 8, 16]))
    grown = reshape(replace(case, graph_padding=mode), limits, T=S)
    if mode == "stale":
        return grown
    value: float | str = 0.0 if mode == "zero" else "nan"
    pad = [Patch("gating_logits", "row", value, row=r) for r in range(T, grown.num_tokens)]
    if mode == "nan" and rng.random() < 0.3:
        pad += [Patch("hidden_states", "row", "nan", row=r) for r in range(T, grown.num_tokens)]
    return replace(grown, patches=(grown.patches + tuple(pad))[-MAX_PATCHES:])


def tie_storm(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Logits with many exact ties: coarse values, all zeros, rows equal to their column 0."""
    choice = rng.randrange(4)
    seed = case.logits.seed if isinstance(case.logits, Generated) else case.seed
    if choice == 0:
        return replace(case, logits=Generated(seed, "quantized", rng.choice([0.25, 0.5, 1.0])))
    if choice == 1:
        return replace(case, logits=Generated(seed, "zeros"))
    if choice == 2:
        patch = Patch("gating_logits", rng.choice(["row", "all"]), "tie",
                      row=_row(case.num_tokens, rng))
        return replace(case, patches=_add(case.patches, patch, MAX_PATCHES, rng))
    T, E = case.num_tokens, case.num_experts
    if T * E > limits.explicit_elements:
        return replace(case, logits=Generated(seed, "zeros"))
    g = torch.Generator().manual_seed(rng.randrange(2**32))
    levels = torch.tensor(rng.sample([0.0, 1.0, -1.0, 0.5, 2.0, -0.0], rng.randint(1, 3)))
    picks = torch.randint(0, levels.numel(), (T, E), generator=g)
    return replace(case, logits=levels[picks].to(case.torch_dtype))


def topk_ids(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Enter the chain at topk_ids: valid routes with duplicate, out-of-range or negative ids
    in some rows (or none), sometimes with T past the sort's single-block limit."""
    mode = rng.choices(["duplicate", "zeros", "out_of_range", "negative", "valid"],
                       [4, 2, 2, 2, 1])[0]
    K = case.topk
    if mode in ("duplicate", "zeros") and K == 1 and case.num_experts >= 2:
        K = 2
    T = case.num_tokens
    if rng.random() < 0.3:
        T = rng.choice([257, 258, 300, 384, 512, 513])
    T = max(1, min(T, limits.explicit_elements // K))
    case = reshape(case, limits, T=T, K=K)
    T, E, K = case.num_tokens, case.num_experts, case.topk
    ids = _routes(T, E, K, rng)
    for r in (_some_rows(T, rng) if mode != "valid" else []):
        if mode == "zeros":
            ids[r] = 0
        elif mode == "duplicate" and K > 1:
            i, j = rng.sample(range(K), 2)
            ids[r, j] = ids[r, i]
        elif mode == "out_of_range":
            ids[r, rng.randrange(K)] = rng.choice(
                [E, E + 1, 2 * E - 1, INT32_MAX, rng.randrange(E, INT32_MAX)])
        elif mode == "negative":
            ids[r, rng.randrange(K)] = rng.choice([-1, -1, -2, INT32_MIN])
    weights = None
    if rng.random() < 0.3:
        weights = torch.rand((T, K), generator=torch.Generator().manual_seed(rng.randrange(2**16)))
        if rng.random() < 0.5:
            weights[rng.randrange(T), rng.randrange(K)] = rng.choice(
                [math.nan, math.inf, -1.0, 0.0, 1e30])
    return _with_overrides(case, topk_ids=ids, topk_weights=weights)


def recv_counters(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Receive counters as a sender might misreport them: 0, the buffer size M, M + 1,
    negative, or anything in [0, M] (inconsistent with the routing)."""
    if case.ep_size == 1 and case.num_experts >= 2:
        case = reshape(case, limits, ep=rng.choice([2, 2, 4, 8]))
    ep, M = case.ep_size, case.recv_slots
    values = [[rng.randrange(M + 1) for _ in range(ep)] for _ in range(ep)]
    for _ in range(rng.randint(1, ep * ep)):
        values[rng.randrange(ep)][rng.randrange(ep)] = rng.choice(
            [0, M, M + 1, M + rng.randrange(1, 1000), -1, INT32_MIN, INT32_MAX, M // 2])
    return _with_overrides(case, recv_counters=torch.tensor(values, dtype=torch.int32))


def _loras(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    return case if case.max_loras else reshape(case, limits, L=rng.choice([1, 2, 3, 4, 8]))


def lora_ids(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Forged lora_ids: every slot active, then some at -1, = max_loras, > max_loras, below
    -1 or duplicated."""
    case = _loras(case, rng, limits)
    L = case.max_loras
    ids = [-1, *range(L)]
    if rng.random() < 0.3:
        rng.shuffle(ids)
    for _ in range(rng.randint(1, 2)):
        ids[rng.randrange(L + 1)] = rng.choice(
            [-1, L, L, L + 1, L + rng.randrange(1, 100), INT32_MAX, -2, INT32_MIN,
             ids[rng.randrange(L + 1)]])
    return _with_overrides(case, lora_ids=torch.tensor(ids, dtype=torch.int32))


def lora_all_active(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Every LoRA slot in use: all max_loras adapters and base-model tokens (-1) present."""
    case = _loras(case, rng, limits)
    L = case.max_loras
    if case.num_tokens < L + 1:
        case = reshape(case, limits, T=L + 1 + rng.randrange(8))
    T = case.num_tokens
    mapping = None
    if T <= limits.explicit_elements:
        order = [(i % (L + 1)) - 1 for i in range(T)]
        rng.shuffle(order)
        mapping = torch.tensor(order, dtype=torch.int32)
    enabled = None if rng.random() < 0.6 else case.adapter_enabled
    return _with_overrides(replace(case, adapter_enabled=enabled), token_lora_mapping=mapping,
                           lora_ids=None)


def disable_adapter(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Switch off one or more adapters (adapter_enabled False)."""
    case = _loras(case, rng, limits)
    L = case.max_loras
    flags = list(case.adapter_enabled or (True,) * L)
    for i in rng.sample(range(L), rng.randint(1, L)):
        flags[i] = False
    return replace(case, adapter_enabled=tuple(flags))


def fault(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """A fault at a stage boundary: a tensor a stage produced, corrupted before the next."""
    boundary = rng.choice(list(FAULT_TENSORS))
    tensor = rng.choice(list(FAULT_TENSORS[boundary]))
    is_int = FAULT_TENSORS[boundary][tensor] == "int"
    kind = rng.choice([k for k in FAULT_KINDS if not (is_int and k in ("nan", "inf"))])
    T = case.num_tokens
    rows: tuple[int, ...] = ()
    fraction = 0.0
    if rng.random() < 0.6:
        rows = tuple(sorted({_row(T, rng) for _ in range(rng.randint(1, 3))}))
    else:
        fraction = rng.choice([0.01, 0.1, 0.5, 1.0])
    f = Fault(boundary, tensor, kind, rows, fraction, rng.randrange(2**16), rng.randrange(32))
    return replace(case, faults=_add(case.faults, f, MAX_FAULTS, rng))


_FALLBACK_EXPERTS = (3, 5, 6, 7, 12, 24, 40, 60, 72, 96, 100, 160, 200, 1000)


def switch_experts_path(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """E off the warp-specialised counts (the fallback top-k path), or back onto them."""
    if case.num_experts in WARP_EXPERTS:
        E = rng.choice(_FALLBACK_EXPERTS) if rng.random() < 0.7 else rng.randint(1, MAX_EXPERTS)
        while E in WARP_EXPERTS:
            E += 1
    else:
        E = rng.choice(sorted(WARP_EXPERTS))
    return reshape(case, limits, E=E)


def token_threshold(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """T at a boundary: 256/257 (the sort's single-block limit), around a capture size, or at
    a cheap launch threshold of these sizes plus or minus one."""
    T = case.num_tokens
    thresholds = [t for _, t in launch_thresholds(case.num_experts, case.topk,
                                                  case.block_size, case.ep_size) if t <= 4096]
    capture = next((c for c in CAPTURE_SIZES if c >= T), 512)
    base = rng.choice([256, 257, 512, capture, *thresholds])
    return reshape(case, limits, T=max(1, base + rng.choice([-1, 0, 0, 1])))


def launch_limit(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """T at a launch limit solved from the geometry (where an unchunked grid.y passes 65535),
    after making the sizes cheap enough for the threshold to fit the codec's limits."""
    for _ in range(6):
        E, K, bs, ep = case.num_experts, case.topk, case.block_size, case.ep_size
        _, T = rng.choice([t for t in launch_thresholds(E, K, bs, ep)
                              if t[0].startswith("experts")])
        if T <= token_cap(E, K, ep, limits) and rng.random() < 0.8:
            break
        change = rng.choice(["bs", "K", "E"])
        if change == "bs":
            case = reshape(case, limits, bs=max(1, bs // rng.choice([2, 4, 16])))
        elif change == "K":
            case = reshape(case, limits, K=min(E, MAX_TOPK))
        else:
            case = reshape(case, limits, E=max(K, E // 2))
    return reshape(case, limits, T=T + rng.choice([-1, 0, 0, 1, 2]), H=rng.choice([1, 2, 4]))


def switch_dtype(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Another logits/hidden dtype (fp16 and bf16 round huge values to Inf differently)."""
    return replace(case, dtype=rng.choice([d for d in ("fp32", "fp16", "bf16")
                                           if d != case.dtype]))


def resize(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Shrink or grow one size (T, E, K, H, ep, max_loras, block_size)."""
    dim = rng.choice(["T", "T", "E", "K", "H", "ep", "L", "bs"])
    now = {"T": case.num_tokens, "E": case.num_experts, "K": case.topk, "H": case.hidden_size,
           "ep": case.ep_size, "L": case.max_loras, "bs": case.block_size}[dim]
    how = rng.choice(["half", "double", "dec", "inc", "one"])
    new = {"half": now // 2, "double": now * 2, "dec": now - 1, "inc": now + 1, "one": 1}[how]
    if dim == "bs":
        new = 1 << max(0, min(8, (now.bit_length() - 1) + rng.choice([-1, 1])))
    return reshape(case, limits, **{dim: max(new, 0 if dim == "L" else 1)})


def routing(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Scoring, renormalisation, the correction bias (none, generated, explicit with special
    values) or the logits' distribution and scale."""
    what = rng.randrange(4)
    if what == 0:
        return replace(case, scoring="sigmoid" if case.scoring == "softmax" else "softmax")
    if what == 1:
        return replace(case, renormalize=not case.renormalize)
    if what == 2:
        E = case.num_experts
        choice = rng.randrange(3)
        if choice == 0:
            return reshape(replace(case, correction_bias=None), limits)
        if choice == 1 or E > limits.explicit_elements:
            return replace(case, correction_bias=Generated(rng.randrange(2**16),
                                                           rng.choice(["normal", "uniform"]),
                                                           rng.choice([0.1, 1.0, 1e30])))
        bias = torch.randn(E, generator=torch.Generator().manual_seed(rng.randrange(2**16)))
        if rng.random() < 0.5:
            bias[rng.randrange(E)] = rng.choice([math.nan, math.inf, -math.inf, 3e38])
        return replace(case, correction_bias=bias)
    return replace(case, logits=Generated(rng.randrange(2**16),
                                          rng.choice(["normal", "uniform", "quantized"]),
                                          rng.choice([1.0, 0.01, 10.0, 1e4, 1e30, 0.0])))


def ep_layout(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Expert parallelism: ep_size, receive buffers larger than the tokens (padding slots),
    and expert placements where some ranks own no expert."""
    case = reshape(case, limits, ep=rng.choice([1, 2, 2, 3, 4, 8]))
    ep, E = case.ep_size, case.num_experts
    per_rank = math.ceil(case.num_tokens / ep)
    M = rng.choice([None, per_rank, per_rank + 1, per_rank + 7, 2 * per_rank])
    e2r = None
    if rng.random() < 0.4:
        owners = rng.sample(range(ep), rng.randint(1, ep))
        e2r = tuple(rng.choice(owners) for _ in range(E))
    return replace(case, max_tokens_per_rank=M, expert_to_rank=e2r)


def simplify(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Drop one thing: a patch, a fault, an override, an explicit tensor, an optional field."""
    options: list[Callable[[], MoECase]] = []
    if case.patches:
        i = rng.randrange(len(case.patches))
        options.append(lambda: replace(case, patches=case.patches[:i] + case.patches[i + 1:]))
    if case.faults:
        j = rng.randrange(len(case.faults))
        options.append(lambda: replace(case, faults=case.faults[:j] + case.faults[j + 1:]))
    present = list(case.overrides.fields())
    if present:
        name = rng.choice(present)
        drop = {name: None, **({"topk_weights": None} if name == "topk_ids" else {})}
        options.append(lambda: _with_overrides(case, **drop))
    if isinstance(case.logits, torch.Tensor):
        options.append(lambda: replace(case, logits=Generated(case.seed)))
    for name, default in (("adapter_enabled", None), ("expert_to_rank", None),
                          ("max_tokens_per_rank", None), ("graph_padding", "zero")):
        if getattr(case, name) != default:
            options.append(lambda name=name, default=default: replace(case, **{name: default}))
    return rng.choice(options)() if options else case


def reseed(case: MoECase, rng: random.Random, limits: CodecLimits) -> MoECase:
    """Other random tensors for the same configuration."""
    case = replace(case, seed=rng.randrange(2**32))
    if isinstance(case.logits, Generated):
        case = replace(case, logits=replace(case.logits, seed=rng.randrange(2**32)))
    return case


OPERATORS: dict[str, Operator] = {op.__name__: op for op in (
    special_values, nan_rows, graph_padding, tie_storm, topk_ids, recv_counters, lora_ids,
    lora_all_active, disable_adapter, fault, switch_experts_path, token_threshold,
    launch_limit, switch_dtype, resize, routing, ep_layout, simplify, reseed)}

DEFAULT_WEIGHTS: dict[str, float] = {
    "special_values": 3.0, "nan_rows": 3.0, "graph_padding": 2.0, "tie_storm": 1.5,
    "topk_ids": 2.0, "recv_counters": 1.5, "lora_ids": 1.5, "lora_all_active": 1.5,
    "disable_adapter": 1.0, "fault": 2.0, "switch_experts_path": 1.5, "token_threshold": 2.0,
    "launch_limit": 0.5, "switch_dtype": 1.0, "resize": 2.0, "routing": 1.0, "ep_layout": 1.5,
    "simplify": 2.0, "reseed": 1.0,
}


# -- configuration and entry points ------------------------------------------------------------


@dataclass(frozen=True)
class MutatorConfig:
    """How `mutate` and `crossover` work.

    enabled: False = byte-level mutation only (the `--no-moe-mutators` ablation).
    weights: per-operator weights over `DEFAULT_WEIGHTS` (0 switches one off).
    byte_probability: chance of a byte-level mutation instead of a structured one.
    max_stack: structured operators applied per mutation, 1..max_stack.
    libfuzzer_bytes: byte-level mutation through `atheris.Mutate` (only inside atheris.Fuzz).
    """

    enabled: bool = True
    weights: Mapping[str, float] = field(default_factory=dict)
    byte_probability: float = 0.2
    max_stack: int = 2
    libfuzzer_bytes: bool = False
    limits: CodecLimits = LIMITS

    def __post_init__(self) -> None:
        for name, w in self.weights.items():
            if name not in OPERATORS:
                raise ConfigError("weights", f"unknown mutation operator {name!r} "
                                             f"(known: {', '.join(OPERATORS)})")
            if not (isinstance(w, int | float) and w >= 0 and math.isfinite(w)):
                raise ConfigError("weights", f"weight of {name!r} must be a finite number "
                                             f">= 0, got {w!r}")
        if not 0.0 <= self.byte_probability <= 1.0:
            raise ConfigError("byte_probability", f"must be in [0, 1], got "
                                                  f"{self.byte_probability!r}")
        if self.max_stack < 1:
            raise ConfigError("max_stack", f"must be >= 1, got {self.max_stack!r}")

    @classmethod
    def only(cls, *names: str, **kwargs) -> MutatorConfig:
        """Only the named operators, no byte-level mutation, one operator per mutation."""
        weights = {name: 0.0 for name in OPERATORS} | {name: 1.0 for name in names}
        kwargs = {"byte_probability": 0.0, "max_stack": 1} | kwargs
        return cls(weights=weights, **kwargs)

    def operator_weights(self) -> dict[str, float]:
        return {**DEFAULT_WEIGHTS, **self.weights}


DEFAULT_CONFIG = MutatorConfig()


def _byte_mutate(data: bytes, max_size: int, rng: random.Random,
                 config: MutatorConfig) -> bytes:
    """libFuzzer's byte mutation inside atheris.Fuzz, else a small one of its kinds: flip a
    bit, set a byte (to an interesting value), insert or erase one."""
    if config.libfuzzer_bytes:
        import atheris

        return atheris.Mutate(data, max_size)
    out = bytearray(data)
    op = rng.randrange(4) if out else 2
    if op == 0:
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif op == 1:
        out[rng.randrange(len(out))] = rng.choice([0, 1, 0x7F, 0x80, 0xFE, 0xFF,
                                                   rng.randrange(256)])
    elif op == 2:
        out.insert(rng.randint(0, len(out)), rng.randrange(256))
    else:
        del out[rng.randrange(len(out))]
    return bytes(out[:max_size])


def apply(case: MoECase, name: str, rng: random.Random,
          limits: CodecLimits = LIMITS) -> MoECase:
    """The case operator `name` makes of `case`, as the decoder repairs it."""
    return decode(encode(OPERATORS[name](case, rng, limits), strict=False, limits=limits),
                  limits)


def mutate(data: bytes, max_size: int, seed: int,
           config: MutatorConfig = DEFAULT_CONFIG) -> bytes:
    """A mutation of `data` of at most `max_size` bytes, determined by `seed`."""
    rng = random.Random(seed)
    if not config.enabled or rng.random() < config.byte_probability:
        return _byte_mutate(data, max_size, rng, config)
    weights = config.operator_weights()
    names = [n for n, w in weights.items() if w > 0]
    if not names:
        return _byte_mutate(data, max_size, rng, config)
    chances = [weights[n] for n in names]
    case = decode(data, config.limits)
    for _ in range(3):  # a mutation that changed nothing or grew too large: another one
        mutated = case
        for _ in range(rng.randint(1, config.max_stack)):
            mutated = OPERATORS[rng.choices(names, chances)[0]](mutated, rng, config.limits)
        out = encode(mutated, strict=False, limits=config.limits)
        if len(out) <= max_size and out != data:
            return out
    return _byte_mutate(data, max_size, rng, config)


def crossover(data1: bytes, data2: bytes, max_size: int, seed: int,
              config: MutatorConfig = DEFAULT_CONFIG) -> bytes:
    """A case with each group of fields (sizes, routing, tensors, expert parallelism, LoRA,
    overrides, patches, faults) from one of two cases."""
    rng = random.Random(seed)
    if not config.enabled:
        cut1, cut2 = rng.randint(0, len(data1)), rng.randint(0, len(data2))
        return (data1[:cut1] + data2[cut2:])[:max_size]
    a, b = decode(data1, config.limits), decode(data2, config.limits)
    groups = {
        "sizes": ("num_tokens", "num_experts", "topk", "hidden_size", "block_size"),
        "routing": ("scoring", "renormalize", "dtype", "correction_bias"),
        "tensors": ("seed", "logits", "graph_padding"),
        "ep": ("ep_size", "max_tokens_per_rank", "expert_to_rank"),
        "lora": ("max_loras", "adapter_enabled"),
        "overrides": ("overrides",),
    }
    changes = {}
    for names in groups.values():
        src = a if rng.random() < 0.5 else b
        changes.update({n: getattr(src, n) for n in names})
    both = a.patches + b.patches
    patches = tuple(p for p in both if rng.random() < 0.5)[:MAX_PATCHES]
    faults = tuple(f for f in a.faults + b.faults if rng.random() < 0.5)[:MAX_FAULTS]
    child = replace(a, patches=patches, faults=faults, **changes)
    out = encode(child, strict=False, limits=config.limits)
    return out if len(out) <= max_size else data1[:max_size]
