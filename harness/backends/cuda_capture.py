"""A captured chain: its static buffers, its launches and its CUDA graph (graph mode's engine).

`ChainGraph` is one capture of the fixed-size chain for a `GraphKey` (the capture size S and
every scalar its kernels bake in):

    reset the output arena -> gating -> sort_align -> experts (m-block chunks) -> finalize
    -> gather the input guards

`Arena` lays out guarded buffers (as `cuda._Guarded`: bands of the poison word on both
sides, poison or zero data) in one byte tensor, so that a reset is one memcpy of a pristine
image and bringing outputs, guards and coverage counters home is one copy to pinned host
memory. `StaticInputs` are the input buffers every graph of one (E, H, dtype) reads, sized
for the largest capture size: their rows past a batch are its padding (`pad_rows`). Policy
(which cases replay, what a result holds) is `harness.backends.cuda_graph`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from harness import geometry
from harness.backends.cuda import (
    REDZONE_BYTES,
    SCORING_CODES,
    CudaTarget,
    _round_up,
    bug_mask,
    guard_bytes,
    guard_fill,
)
from harness.bugs import BugSet
from harness.case import GRAPH_PADDINGS, Materialized, MoECase
from harness.errors import ConfigError
from harness.memory import bits_view, current_poison, poison_bits

#: stage order of the captured chain; "graph" = the arena's own slots
STAGE_ORDER = ("gating", "sort_align", "experts", "finalize", "graph")


def pad_rows(buffer: torch.Tensor, rows: torch.Tensor, size: int, padding: str) -> torch.Tensor:
    """buffer[:size] with `rows` [T, C] in its first T rows and the padding rows T..size-1
    filled per `padding`: "zero", "nan", or "stale" (left as the buffer holds them)."""
    if padding not in GRAPH_PADDINGS:
        raise ConfigError("padding", f"must be one of {GRAPH_PADDINGS}, got {padding!r}")
    out = buffer[:size]
    out[:rows.shape[0]].copy_(rows)
    if padding == "zero":
        out[rows.shape[0]:].zero_()
    elif padding == "nan":
        out[rows.shape[0]:].fill_(math.nan)
    return out


@dataclass(frozen=True)
class GraphKey:
    """What a captured chain bakes in: its shapes and every scalar argument of its kernels."""

    capture_size: int
    num_experts: int
    topk: int
    hidden_size: int
    dtype: str
    block_size: int
    scoring: str
    renormalize: bool
    has_bias: bool
    bugs: int
    coverage: bool

    @classmethod
    def of(cls, case: MoECase, capture_size: int, bugs: BugSet, coverage: bool) -> GraphKey:
        return cls(capture_size, case.num_experts, case.topk, case.hidden_size, case.dtype,
                   case.block_size, case.scoring, bool(case.renormalize),
                   case.correction_bias is not None, bug_mask(bugs), coverage)


# -- guarded buffers in one arena ------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One buffer of an arena: data at bytes [offset, offset + nbytes), guards around it."""

    name: str
    stage: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    nbytes: int
    itemsize: int

    @property
    def numel(self) -> int:
        return self.nbytes // self.itemsize


class Arena:
    """Buffers laid out in one byte tensor as [guard][data][guard], each data start 256-byte
    aligned, each guard >= REDZONE_BYTES of the poison word current when it is built (varied
    per arena, not per replay: a replay's reset is one copy of `image`). `image` is the
    pristine state (data poison or zero); `host` a (pinned) host copy of the same layout."""

    def __init__(self, specs: list[tuple[str, str, tuple[int, ...], torch.dtype, str]],
                 device: torch.device) -> None:
        self.slots: dict[str, Slot] = {}
        pos = 0
        for name, stage, shape, dtype, _ in specs:
            itemsize = torch.empty((), dtype=dtype).element_size()
            pos += REDZONE_BYTES
            self.slots[f"{stage}.{name}"] = Slot(name, stage, tuple(shape), dtype, pos,
                                                  math.prod(shape) * itemsize, itemsize)
            pos = _round_up(pos + math.prod(shape) * itemsize) + REDZONE_BYTES
        self.word = current_poison()
        image = guard_fill(torch.empty((pos,), dtype=torch.uint8), self.word)
        for (key, slot), spec in zip(self.slots.items(), specs, strict=True):
            data = self.view(image, key)
            if spec[4] == "poison":
                bits_view(data).fill_(poison_bits(slot.dtype, self.word))
            else:
                data.zero_()
        starts = [s.offset - REDZONE_BYTES for s in self.slots.values()]
        #: byte positions of every guard, slot by slot (lead, then trail up to the next slot)
        self.guard_index = torch.cat([torch.arange(0, dtype=torch.int64)] + [
            torch.arange(a, b) for slot, start, end in zip(self.slots.values(), starts,
                                                           [*starts[1:], pos], strict=True)
            for a, b in ((start, slot.offset), (slot.offset + slot.nbytes, end))])
        self._starts = torch.tensor(starts)
        #: what each guard byte holds untouched (the word's byte at its position)
        self.guard_expect = guard_bytes(self.word)[self.guard_index % 4]
        self.image = image.to(device)
        self.raw = self.image.clone()
        self.host = torch.empty(pos, dtype=torch.uint8,
                                pin_memory=device.type == "cuda").copy_(image)

    def view(self, raw: torch.Tensor, key: str) -> torch.Tensor:
        s = self.slots[key]
        return raw[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)

    def reset(self) -> None:
        """Poison every output, restore every guard, zero the counters (capturable)."""
        self.raw.copy_(self.image)

    def damage(self, got: torch.Tensor) -> tuple[Slot, int] | None:
        """The first slot (in stage order) whose guards changed, given the bytes at
        `guard_index`, and the element index nearest its data (negative: before it)."""
        bad = self.guard_index[got != self.guard_expect]
        if not bad.numel():
            return None
        owner = torch.searchsorted(self._starts, bad, right=True) - 1
        slots = list(self.slots.values())
        k = min(set(owner.tolist()), key=lambda i: (STAGE_ORDER.index(slots[i].stage), i))
        slot, mine = slots[k], bad[owner == k]
        lead = mine[mine < slot.offset]
        if lead.numel():
            return slot, (int(lead.max()) - slot.offset) // slot.itemsize
        return slot, slot.numel + (int(mine.min()) - slot.offset - slot.nbytes) // slot.itemsize


class StaticInputs:
    """The static inputs of every graph of one (E, H, dtype): logits and hidden states for the
    largest capture size (a graph reads the first S rows), expert weights, correction bias and
    expert map; their host mirror (`arena.host`) is what the device buffers hold."""

    def __init__(self, E: int, H: int, dtype: torch.dtype, rows: int,
                 device: torch.device) -> None:
        self.arena = Arena([("gating_logits", "gating", (rows, E), dtype, "zero"),
                             ("hidden_states", "experts", (rows, H), dtype, "zero"),
                             ("expert_weights", "experts", (E, H, H), torch.float32, "zero"),
                             ("correction_bias", "gating", (E,), torch.float32, "zero"),
                             ("expert_map", "sort_align", (E,), torch.int32, "zero")], device)
        self.host("sort_align.expert_map").copy_(torch.arange(E, dtype=torch.int32))
        self.arena.raw.copy_(self.arena.host)
        self.guard_index = self.arena.guard_index.to(device)

    def host(self, key: str) -> torch.Tensor:
        return self.arena.view(self.arena.host, key)

    def dev(self, key: str) -> torch.Tensor:
        return self.arena.view(self.arena.raw, key)

    def upload(self, t: Materialized, size: int, padding: str) -> tuple[torch.Tensor, ...]:
        """Pad the case's logits and hidden states to `size` rows in the mirror, copy what a
        replay reads to the device (asynchronously), return CPU copies of the padded inputs."""
        copies = []
        for key, rows in (("gating.gating_logits", t.gating_logits),
                          ("experts.hidden_states", t.hidden_states)):
            padded = pad_rows(self.host(key), rows, size, padding)
            self.dev(key)[:size].copy_(padded, non_blocking=True)
            copies.append(padded.clone())
        for key, value in (("experts.expert_weights", t.expert_weights),
                           ("gating.correction_bias", t.correction_bias)):
            if value is not None:
                self.dev(key).copy_(self.host(key).copy_(value), non_blocking=True)
        return tuple(copies)


class ChainGraph:
    """One captured chain (`key`): its output arena, its launches, its CUDA graph. On a CPU
    device (host-side tests with a stand-in extension) `replay` launches eagerly."""

    def __init__(self, target: CudaTarget, key: GraphKey, inputs: StaticInputs) -> None:
        S, E, K, H, bs = (key.capture_size, key.num_experts, key.topk, key.hidden_size,
                          key.block_size)
        self.target, self.key, self.inputs = target, key, inputs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.chunked = not (key.bugs & bug_mask(BugSet.of(["grid-y-overflow"])))
        self.chunks = geometry.experts_chunks(S, K, E, bs, chunked=self.chunked)
        i32, f32 = torch.int32, torch.float32
        P, B = geometry.max_num_tokens_padded(S, K, E, bs), geometry.max_num_m_blocks(S, K, E, bs)
        specs = [("topk_ids", "gating", (S, K), i32, "poison"),
                 ("topk_weights", "gating", (S, K), f32, "poison")]
        if not geometry.uses_warp_path(E):
            specs.append(("workspace", "gating", (S, E), f32, "poison"))
        specs += [(name, "sort_align", shape, i32, "poison") for name, shape in (
            ("expert_counts", (E,)), ("expert_offsets", (E + 1,)), ("aligned_offsets", (E + 1,)),
            ("permuted_row", (S * K,)), ("sorted_token_ids", (P,)), ("expert_ids", (B,)),
            ("num_tokens_post_pad", (1,)),
            ("workspace", (int(target.ext.sort_align_workspace_elems(S, E)),)))]
        specs += [("expert_out", "experts", (P, H), f32, "poison"),
                  ("out", "finalize", (S, H), f32, "poison"),
                  ("coverage", "graph", (target.coverage_words,), i32, "zero"),
                  ("input_guards", "graph", (inputs.guard_index.numel(),), torch.uint8, "zero")]
        self.arena = Arena(specs, target.device)
        self.out = {k: self.arena.view(self.arena.raw, k) for k in self.arena.slots}
        self._stages = self.stages()

    def stages(self) -> dict[str, Callable[[], None]]:
        """Each stage's kernels alone, on the graph's buffers (what `launch` chains)."""
        k, o, ext, inp = self.key, self.out, self.target.ext, self.inputs
        S, mask = k.capture_size, k.bugs
        cov = o["graph.coverage"] if k.coverage else None

        def gating() -> None:
            ext.gating(inp.dev("gating.gating_logits")[:S],
                       inp.dev("gating.correction_bias") if k.has_bias else None, k.topk,
                       SCORING_CODES[k.scoring], k.renormalize, o["gating.topk_ids"],
                       o["gating.topk_weights"], o.get("gating.workspace"), mask, cov)

        def sort_align() -> None:
            ext.sort_align(o["gating.topk_ids"], inp.dev("sort_align.expert_map"),
                           k.num_experts, k.block_size, *(o[f"sort_align.{n}"] for n in (
                               "expert_counts", "expert_offsets", "aligned_offsets",
                               "permuted_row", "sorted_token_ids", "expert_ids",
                               "num_tokens_post_pad", "workspace")), mask, cov)

        def experts() -> None:
            for first, last in self.chunks:
                ext.experts(inp.dev("experts.hidden_states")[:S],
                            inp.dev("experts.expert_weights"), o["sort_align.sorted_token_ids"],
                            o["sort_align.expert_ids"], o["sort_align.num_tokens_post_pad"],
                            k.topk, k.block_size, first, last, o["experts.expert_out"], mask,
                            cov)

        def finalize() -> None:
            ext.finalize(o["experts.expert_out"], o["sort_align.permuted_row"],
                         o["gating.topk_weights"], o["finalize.out"], mask, cov)

        return {"gating": gating, "sort_align": sort_align, "experts": experts,
                "finalize": finalize}

    def launch(self, reset: bool = True) -> None:
        """Enqueue what the graph captures: the reset (`reset`), the kernels of every stage,
        the gather of the input buffers' guards into the arena."""
        if reset:
            self.arena.reset()
        for stage in self._stages.values():
            stage()
        torch.index_select(self.inputs.arena.raw, 0, self.inputs.guard_index,
                           out=self.out["graph.input_guards"])

    def capture(self) -> None:
        """Warm up on a side stream, then capture `launch` (CPU device: nothing to capture)."""
        if self.target.device.type != "cuda":
            return
        main = torch.cuda.current_stream(self.target.device)
        side = torch.cuda.Stream(self.target.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self.launch()
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.launch()
        self.graph = graph

    def replay(self, to_host: bool = True) -> None:
        """Enqueue one replay and (`to_host`) the copy of the arena to the host; no sync."""
        if self.graph is None:
            self.launch()
        else:
            self.graph.replay()
        if to_host:
            self.arena.host.copy_(self.arena.raw, non_blocking=True)

    def host(self, key: str) -> torch.Tensor:
        return self.arena.view(self.arena.host, key).clone()

    def damage(self) -> tuple[Slot, int] | None:
        """The first damaged guard after a replay (outputs, then inputs), from the host copy."""
        found = [d for d in (self.arena.damage(self.arena.host[self.arena.guard_index]),
                             self.inputs.arena.damage(self.arena.view(
                                 self.arena.host, "graph.input_guards"))) if d is not None]
        return min(found, key=lambda d: STAGE_ORDER.index(d[0].stage)) if found else None
