"""CUDA-graph padding mode: the chain captured once per batch size, replayed on padded batches.

Serving engines capture the MoE layer in CUDA graphs at fixed batch sizes and pad a batch of T
rows up to the next capture size S; rows T..S-1 carry whatever the static input buffers hold
(the root cause of vLLM issue 39244). `GraphTarget` does the same with the bundled kernels:

    copy the case into the static inputs (S rows) -> replay [reset the output arena -> gating
    -> sort_align -> experts (m-block chunks) -> finalize] -> one copy to the host, one sync

Padding rows (`MoECase.graph_padding`, or `GraphConfig.padding` for every case) of the gating
logits and the hidden states hold zeros, NaN, or whatever the previous replay left there
("stale": the static buffers are shared by every graph of one (E, H, dtype) and sized for the
largest capture size, as an engine's are; a fresh buffer holds zeros). The result is a
`GraphRunResult` for a batch of S rows: its `case` is the padded case (the logits as an
explicit [S, E] tensor; the padded hidden states are in `tensors`) and every invariant holds
rows >= T to the contract of real rows: findings in padding rows count.

Scope: ep_size == 1, max_loras == 0, no faults, no topk_ids / recv_counters overrides,
T <= the largest capture size (`eager_reason`). Anything else runs eagerly on the inherited
`CudaTarget` stages, as engines run batches above their largest capture size eagerly: the
expert-parallel all-to-all and LoRA align are orchestrated by the host here, and faults are
injected between stages on the host. Without expert parallelism there is no dispatch:
sort_align reads gating's topk_ids (the result has no dispatch stage).

Graphs are cached per `GraphKey` (`harness.backends.cuda_capture`: the capture, its arena of
guarded outputs and its static inputs). A replay resets the arena (poison, canaries, zero
counters: one memcpy node) and ends with one copy of it to pinned host memory, so outputs,
redzones and coverage cost one synchronisation. A sticky CUDA error during a replay cannot be
pinned on one kernel: it is reported as stage "graph" (run the case eagerly in a fresh process
to name the stage).
"""

from __future__ import annotations

import bisect
import dataclasses
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from harness import geometry
from harness.backends.cuda import CudaTarget, coverage_counts
from harness.backends.cuda_capture import STAGE_ORDER, ChainGraph, GraphKey, StaticInputs
from harness.bugs import FIXED, BugSet
from harness.case import GRAPH_PADDINGS, Materialized, MoECase, Overrides, materialize
from harness.chain import StageContext
from harness.chain.experts import ExpertsInput, ExpertsOutput, FinalizeInput
from harness.chain.gating import GatingInput, GatingOutput
from harness.chain.result import RankRun, RunResult
from harness.chain.runner import _call, _Stop
from harness.chain.sort_align import SortAlignInput, SortAlignOutput
from harness.errors import ConfigError, IllegalAccess

#: 1, 2, 4, ... 512 rows, as an engine's decode capture sizes
DEFAULT_CAPTURE_SIZES = tuple(1 << i for i in range(10))
MAX_CAPTURE_SIZE = 65536
#: captured graphs kept (least recently used dropped first)
MAX_GRAPHS = 64


@dataclass(frozen=True)
class GraphConfig:
    """Capture sizes (sorted, unique, each in 1..MAX_CAPTURE_SIZE) and an optional padding mode
    that overrides every case's `graph_padding`."""

    capture_sizes: tuple[int, ...] = DEFAULT_CAPTURE_SIZES
    padding: str | None = None

    def __post_init__(self) -> None:
        sizes = self.capture_sizes
        if isinstance(sizes, int | str | bytes) or not hasattr(sizes, "__iter__"):
            raise ConfigError("capture_sizes", f"must be a sequence of integers, got {sizes!r}")
        sizes = tuple(sizes)
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in sizes):
            raise ConfigError("capture_sizes", f"must be a sequence of integers, got {sizes!r}")
        if not sizes:
            raise ConfigError("capture_sizes", "needs at least one size")
        bad = [s for s in sizes if not 1 <= s <= MAX_CAPTURE_SIZE]
        if bad:
            raise ConfigError("capture_sizes", f"sizes must be in 1..{MAX_CAPTURE_SIZE}, got {bad}")
        object.__setattr__(self, "capture_sizes", tuple(sorted(set(sizes))))
        if self.padding is not None and self.padding not in GRAPH_PADDINGS:
            raise ConfigError("padding", f"must be one of {GRAPH_PADDINGS}, got {self.padding!r}")

    @property
    def max_size(self) -> int:
        return self.capture_sizes[-1]

    def capture_size(self, num_tokens: int) -> int | None:
        """The smallest capture size >= num_tokens; None above the largest (run eagerly)."""
        i = bisect.bisect_left(self.capture_sizes, num_tokens)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else None


def eager_reason(case: MoECase, config: GraphConfig) -> str | None:
    """Why `case` runs eagerly rather than as a graph replay (None: it replays)."""
    if case.ep_size != 1:
        return f"ep_size = {case.ep_size}: the all-to-all is not captured"
    if case.max_loras:
        return "max_loras > 0: LoRA align is not captured"
    if case.faults:
        return "faults are injected between stages, on the host"
    if case.overrides.topk_ids is not None or case.overrides.recv_counters is not None:
        return "the case overrides a stage input past gating"
    if case.num_tokens > config.max_size:
        return f"num_tokens = {case.num_tokens} > the largest capture size {config.max_size}"
    return None


@dataclass(eq=False)
class GraphRunResult(RunResult):
    """A replay's `RunResult` for a batch of `capture_size` rows; `source_case` is the case as
    given (`case` is the padded one), its rows >= source_case.num_tokens are padding."""

    source_case: MoECase | None = None
    capture_size: int = 0
    padding: str = "zero"


class GraphTarget(CudaTarget):
    """The bundled kernels replayed as CUDA graphs per capture size (see the module)."""

    name = "cuda-graph"

    def __init__(self, capture_sizes: Sequence[int] = DEFAULT_CAPTURE_SIZES,
                 padding: str | None = None, **kwargs) -> None:
        """`capture_sizes`, `padding`: a `GraphConfig`; `kwargs`: those of `CudaTarget`."""
        self.config = GraphConfig(capture_sizes, padding)  # bad options fail before a build
        super().__init__(**kwargs)
        self._graphs: OrderedDict[GraphKey, ChainGraph] = OrderedDict()
        self._inputs: dict[tuple[int, int, str], StaticInputs] = {}
        #: "captures", "replays", "eager" (cases outside graph scope) so far
        self.stats: Counter = Counter()
        self.last_eager_reason: str | None = None

    def run_chain(self, case: MoECase, bugs: BugSet) -> GraphRunResult | None:
        """Replay `case` padded to its capture size (capturing it first if needed); None for a
        case outside graph scope (the runner then runs the eager stages)."""
        case.validate()
        self.check_usable()
        reason = eager_reason(case, self.config)
        if reason is not None:
            self.stats["eager"] += 1
            self.last_eager_reason = reason
            return None  # the runner runs the inherited eager stages
        size = self.config.capture_size(case.num_tokens)
        padding = self.config.padding or case.graph_padding
        t = materialize(case)
        start = time.perf_counter()
        inputs = self._static_inputs(case)
        logits, hidden = inputs.upload(t, size, padding)
        padded = dataclasses.replace(
            case, num_tokens=size, logits=logits, overrides=Overrides(), max_tokens_per_rank=None,
            patches=tuple(p for p in case.patches if p.target == "correction_bias"),
            graph_padding=padding)
        tensors = Materialized(logits, t.correction_bias, hidden, t.expert_weights, None, None,
                               None)
        res = GraphRunResult(padded, bugs, self.name, tensors, source_case=case,
                             capture_size=size, padding=padding)
        res.seconds["copy_in"] = time.perf_counter() - start
        try:
            graph = self._graph(res, GraphKey.of(case, size, bugs, self.coverage), inputs)
            _call(res, "graph", self._replay, graph)
            _call(res, "graph", self._collect, res, graph, StageContext(bugs, res.coverage))
        except _Stop:
            pass
        return res

    def prepared(self, case: MoECase, bugs: BugSet = FIXED) -> ChainGraph:
        """The captured graph of `case` with its inputs uploaded (for benchmarks)."""
        reason = eager_reason(case, self.config)
        if reason is not None:
            raise ConfigError("graph", f"case outside graph scope: {reason}")
        res = self.run_chain(case, bugs)
        key = GraphKey.of(case, res.capture_size, bugs, self.coverage)
        if key not in self._graphs:
            raise ConfigError("graph", f"the case was not captured: {res.findings}")
        return self._graphs[key]

    def _static_inputs(self, case: MoECase) -> StaticInputs:
        k = (case.num_experts, case.hidden_size, case.dtype)
        if k not in self._inputs:
            self._inputs[k] = StaticInputs(*k[:2], case.torch_dtype, self.config.max_size,
                                            self.device)
        return self._inputs[k]

    def _graph(self, res: RunResult, key: GraphKey, inputs: StaticInputs) -> ChainGraph:
        """The cached graph of `key`, else validate its launches (as the eager stages do) and
        capture it; launch and capture errors become findings (`_call`)."""
        if key in self._graphs:
            self._graphs.move_to_end(key)
            return self._graphs[key]
        S, E, K, bs = key.capture_size, key.num_experts, key.topk, key.block_size
        graph = ChainGraph(self, key, inputs)
        for stage, launches in (
                ("gating", geometry.gating_launches(S, E)),
                ("sort_align", geometry.sort_launches(S, E)),
                ("experts", geometry.experts_launches(S, K, E, bs, key.hidden_size,
                                                      chunked=graph.chunked)),
                ("finalize", geometry.finalize_launches(S))):
            _call(res, stage, geometry.validate, launches, self.limits)
        _call(res, "graph", self._guarded, graph.capture)
        self.stats["captures"] += 1
        self._graphs[key] = graph
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        return graph

    def _guarded(self, fn) -> None:
        try:
            fn()
        except RuntimeError as exc:
            self.fail("graph", exc)

    def _replay(self, graph: ChainGraph) -> None:
        self.stats["replays"] += 1

        def run() -> None:
            graph.replay()
            self.synchronize()

        self._guarded(run)

    def _collect(self, res: GraphRunResult, graph: ChainGraph, ctx: StageContext) -> None:
        """Stage inputs and outputs from the host copy of the arena, as the runner keeps them;
        a damaged redzone ends the run at the stage that owns the buffer."""
        k, h, t = graph.key, graph.host, res.tensors
        counts = coverage_counts(h("graph.coverage"), len(self.slot_names))
        for name, n in zip(self.slot_names, counts, strict=True):
            ctx.cover(name, n)
        damage = graph.damage()
        reached = STAGE_ORDER.index(damage[0].stage) if damage else len(STAGE_ORDER)
        ids, weights = h("gating.topk_ids"), h("gating.topk_weights")
        if reached > 0:
            res.gating_in = GatingInput(t.gating_logits, t.correction_bias, k.topk, k.scoring,
                                        k.renormalize)
            res.gating_out = GatingOutput(ids, weights)
        rr = RankRun(0)
        if reached > 1:
            res.ranks.append(rr)
            rr.sort_in = SortAlignInput(ids, graph.inputs.host("sort_align.expert_map").clone(),
                                        k.num_experts, k.block_size)
            rr.sort_out = SortAlignOutput(*(h(f"sort_align.{n}") for n in (
                "expert_counts", "expert_offsets", "aligned_offsets", "permuted_row",
                "sorted_token_ids", "expert_ids")), int(h("sort_align.num_tokens_post_pad")[0]))
        if reached > 2:
            s = rr.sort_out
            rr.experts_in = ExpertsInput(t.hidden_states, t.expert_weights, s.sorted_token_ids,
                                         s.expert_ids, s.num_tokens_post_pad, k.topk,
                                         k.block_size)
            rr.experts_out = ExpertsOutput(h("experts.expert_out"), len(graph.chunks))
        if reached > 3:
            rr.finalize_in = FinalizeInput(rr.experts_out.expert_out, s.permuted_row, weights)
            rr.finalize_out = res.output = h("finalize.out")
        if damage:
            slot, index = damage
            raise IllegalAccess(slot.stage, slot.name, index, slot.numel, "redzone")

    def close(self) -> None:
        self._graphs.clear()
        self._inputs.clear()
        super().close()
