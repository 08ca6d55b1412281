"""The `cuda` backend: the bundled kernels of `kernels/` on the GPU, instrumented.

Each stage materialises its inputs on the device, allocates every output and workspace
pre-filled with poison (the run's word of `harness.memory`'s family) inside guard bands filled
with the same word (redzones, both sides: a stray read sees an id far out of range or a NaN),
validates the launches with the same `harness.geometry` functions as the CPU model *before*
launching (`LaunchConfigError`), launches with the bug
variants as a bitmask (bit i = the i-th name of `harness.bugs.VARIANTS`), synchronises, and
then checks:

* a sticky CUDA error (an illegal address, ...) -> `IllegalAccess(stage, "<device>", -1, -1,
  "illegal-address")`; the CUDA context is gone, so the target is marked unusable and every
  later call raises `BackendUnavailable` (the process must restart);
* a redzone whose bytes changed -> `IllegalAccess(stage, buffer, index, size, "redzone")`,
  index = the first overwritten element relative to the buffer (negative: before it).

The device coverage (one flag bit per slot per block, ORed into COVERAGE_WORDS words) is added
to `ctx.coverage` as "cuda.<slot>": the number of block lanes that took the branch. Outputs are
returned on the CPU, as the CPU model returns them. Dispatch routing and combine are data
movement done with torch ops on the device (the sanitize kernel follows the routing).
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from harness import geometry
from harness.bugs import VARIANTS, BugSet
from harness.chain import StageContext
from harness.chain.dispatch import CombineInput, DispatchInput, DispatchOutput
from harness.chain.experts import ExpertsInput, ExpertsOutput, FinalizeInput
from harness.chain.gating import GatingInput, GatingOutput
from harness.chain.lora_align import LoraAlignInput, LoraAlignOutput
from harness.chain.sort_align import SortAlignInput, SortAlignOutput
from harness.chain.target import Target
from harness.errors import BackendUnavailable, ContractError, IllegalAccess, LaunchConfigError
from harness.memory import bits_view, current_poison, poison_bits

#: guard band on each side of every device buffer, in bytes (a multiple of 256: alignment),
#: filled with the run's poison word (`harness.memory`)
REDZONE_BYTES = 256
#: largest guard band sized to a LoRA row range (see `CudaTarget.lora_align`)
MAX_GUARD_BYTES = 256 << 20
SCORING_CODES = {"softmax": 0, "sigmoid": 1}
#: substrings of CUDA errors after which the context cannot be used again
_STICKY = ("illegal memory access", "illegal address", "misaligned address",
           "illegal instruction", "unspecified launch failure", "device-side assert")


#: block lanes of a device coverage buffer (kernels/moe_harness.h COV_WORDS): block b ORs the
#: bits of the slots it took into the 64-bit flag word of lane b % COVERAGE_WORDS
COVERAGE_WORDS = 32
#: the buffer's uint32 words: each lane's flag word as two halves, low first (COV_BUFFER_WORDS)
COVERAGE_BUFFER_WORDS = 2 * COVERAGE_WORDS


def coverage_counts(words: torch.Tensor, num_slots: int) -> list[int]:
    """Per coverage slot, how many lanes' flag words hold its bit: the number of block lanes
    (blocks mod COVERAGE_WORDS) that took the branch, 0..COVERAGE_WORDS (`words`: the int32
    buffer, on the host, two words a lane)."""
    w = (words.long() & 0xFFFFFFFF).view(-1, 2)
    flags = w[:, 0] | (w[:, 1] << 32)
    return ((flags[:, None] >> torch.arange(num_slots)) & 1).sum(0).tolist()


def bug_mask(bugs: BugSet) -> int:
    """The kernels' bitmask of `bugs`: bit i = the i-th variant of `harness.bugs.VARIANTS`."""
    return sum(1 << i for i, name in enumerate(VARIANTS) if name in bugs.names)


def _round_up(n: int, to: int = 256) -> int:
    return -(-n // to) * to


def guard_fill(raw: torch.Tensor, word: int) -> torch.Tensor:
    """Fill `raw` (uint8, length a multiple of 4, 4-byte aligned) with the 32-bit poison word
    `word` (little-endian), as every guard band is filled."""
    raw.view(torch.int32).fill_(word - (1 << 32) if word >= 1 << 31 else word)
    return raw


def guard_bytes(word: int) -> torch.Tensor:
    """The 4 bytes of `word` as laid out in memory (little-endian), uint8."""
    return torch.tensor(list(word.to_bytes(4, "little")), dtype=torch.uint8)


class _Guarded:
    """A device buffer inside guard bands: `data` is the buffer the kernel sees.

    The guards hold the run's poison word (`harness.memory.current_poison`): a kernel reading
    past its buffer reads an id far out of range or a NaN, which the checks trip on; a write
    into a guard changes its bytes, which `guard_damage` sees. The trail band ends on a 4-byte
    boundary so the whole allocation is one 32-bit fill."""

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, lead: int = REDZONE_BYTES,
                 trail: int = REDZONE_BYTES) -> None:
        self.name = name
        self.itemsize = torch.empty((), dtype=dtype).element_size()
        self.numel = 1
        for s in shape:
            self.numel *= s
        self.nbytes = self.numel * self.itemsize
        self.lead = _round_up(lead)
        self.trail = _round_up(trail) + (-self.nbytes) % 4
        self.word = current_poison()
        self.raw = guard_fill(torch.empty((self.lead + self.nbytes + self.trail,),
                                          dtype=torch.uint8, device=device), self.word)
        self.data = self.raw[self.lead:self.lead + self.nbytes].view(dtype).view(shape)

    def poison(self) -> torch.Tensor:
        bits_view(self.data).fill_(poison_bits(self.data.dtype, self.word))
        return self.data

    def _signed(self) -> int:
        return self.word - (1 << 32) if self.word >= 1 << 31 else self.word

    def _trail_bad(self) -> torch.Tensor:
        """Bool per byte of the trail band: changed from the poison word's byte there (the
        0-3 bytes up to the next 4-byte boundary against the word's tail, then whole words)."""
        start = self.lead + self.nbytes
        cut = start + (-start) % 4
        tile = guard_fill(torch.empty(4, dtype=torch.uint8, device=self.raw.device), self.word)
        head = self.raw[start:cut] != tile[start % 4:] if cut > start else None
        words = (self.raw[cut:].view(torch.int32) != self._signed()).repeat_interleave(4)
        return words if head is None else torch.cat([head, words])

    def guard_damage(self) -> torch.Tensor:
        """A device bool: is any byte of either guard band changed?"""
        start = self.lead + self.nbytes
        cut = start + (-start) % 4
        bad = (self.raw[:self.lead].view(torch.int32) != self._signed()).any() \
            | (self.raw[cut:].view(torch.int32) != self._signed()).any()
        if cut > start:
            tile = guard_fill(torch.empty(4, dtype=torch.uint8, device=self.raw.device),
                              self.word)
            bad = bad | (self.raw[start:cut] != tile[start % 4:]).any()
        return bad

    def first_damage(self) -> int:
        """Element index (relative to `data`) of the overwritten guard word nearest the
        buffer."""
        lead_bad = torch.nonzero(self.raw[:self.lead].view(torch.int32)
                                 != self._signed()).flatten()
        if lead_bad.numel():
            return (4 * int(lead_bad[-1]) + 3 - self.lead) // self.itemsize
        trail_bad = torch.nonzero(self._trail_bad()).flatten()
        return self.numel + int(trail_bad[0]) // self.itemsize


class _Launch:
    """One stage's device buffers, coverage counters and the checks after its kernels ran."""

    def __init__(self, target: CudaTarget, stage: str, ctx: StageContext) -> None:
        target.check_usable()
        self.target, self.stage, self.ctx = target, stage, ctx
        self.buffers: list[_Guarded] = []
        self.bugs = bug_mask(ctx.bugs)
        self.coverage = (torch.zeros(target.coverage_words, dtype=torch.int32,
                                     device=target.device) if target.coverage else None)

    def output(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
               lead: int = REDZONE_BYTES, trail: int = REDZONE_BYTES) -> torch.Tensor:
        """A poison-filled buffer in redzones (an output or workspace)."""
        if not self.target.checks:  # sanitizer-only runs: a bare, never-written allocation
            return torch.empty(shape, dtype=dtype, device=self.target.device)
        buf = _Guarded(name, shape, dtype, self.target.device, lead, trail)
        self.buffers.append(buf)
        return buf.poison()

    def input(self, name: str, t: torch.Tensor, lead: int = REDZONE_BYTES,
              trail: int = REDZONE_BYTES) -> torch.Tensor:
        """A device copy of `t` in redzones (an out-of-bounds read sees the poison word)."""
        if not self.target.checks:
            return torch.empty(t.shape, dtype=t.dtype, device=self.target.device).copy_(t)
        buf = _Guarded(name, tuple(t.shape), t.dtype, self.target.device, lead, trail)
        self.buffers.append(buf)
        return buf.data.copy_(t)

    def run(self, launch: Callable[[], None]) -> None:
        """Launch, synchronise, then check for a sticky error, redzones and coverage."""
        try:
            launch()
            self.target.synchronize()
        except RuntimeError as exc:
            self.target.fail(self.stage, exc)
        self._check_redzones()
        if self.coverage is not None:
            counts = coverage_counts(self.coverage.cpu(), len(self.target.slot_names))
            for name, n in zip(self.target.slot_names, counts, strict=True):
                self.ctx.cover(name, n)

    def _check_redzones(self) -> None:
        if not self.buffers:
            return
        damaged = torch.stack([b.guard_damage() for b in self.buffers]).cpu()
        for buf, bad in zip(self.buffers, damaged.tolist(), strict=True):
            if bad:
                raise IllegalAccess(self.stage, buf.name, buf.first_damage(), buf.numel,
                                    "redzone")


class CudaTarget(Target):
    """The bundled CUDA kernel chain (`kernels/`), built on first use (`cuda_build`)."""

    name = "cuda"
    #: a kernel fault (an illegal address) poisons the CUDA context of the process it ran in
    isolate = True

    def __init__(self, device: int | str | torch.device | None = None, coverage: bool = True,
                 ext: ModuleType | None = None, checks: bool = True) -> None:
        """`device`: the GPU (default: the current one); `coverage`: count device coverage;
        `ext`: a stand-in for the built extension (tests of the host side, on any device)."""
        if ext is None:
            from harness.backends import cuda_build

            ext = cuda_build.load_kernels()  # BackendUnavailable without a GPU or toolkit
        self.ext = ext
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None \
            else torch.device(device)
        self.coverage = coverage
        #: redzones and poison (False: plain allocations, so compute-sanitizer alone checks)
        self.checks = checks
        self.slot_names = [f"cuda.{n.lower()}" for n in self.ext.coverage_slot_names()]
        self.coverage_words = int(getattr(self.ext, "coverage_words", COVERAGE_BUFFER_WORDS))
        self.limits = geometry.DeviceLimits()
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            self.limits = geometry.DeviceLimits(
                max_threads_per_block=int(getattr(props, "max_threads_per_block", 1024)),
                max_shared_bytes=int(getattr(props, "shared_memory_per_block", 48 * 1024)))
        self._dead: str | None = None

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- error handling ------------------------------------------------------------------------

    def check_usable(self) -> None:
        if self._dead is not None:
            raise BackendUnavailable(self._dead)

    def fail(self, stage: str, exc: RuntimeError) -> None:
        """Turn an error raised while `stage` ran into the harness's exception, and raise it."""
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        low = str(exc).lower()
        if any(s in low for s in _STICKY):
            self._dead = (f"the cuda backend hit a sticky CUDA error in stage '{stage}' ({msg}); "
                          "the CUDA context is unusable: restart the process")
            kind = "illegal-address" if ("illegal" in low or "misaligned" in low) \
                else "device-fault"
            raise IllegalAccess(stage, "<device>", -1, -1, kind) from None
        if "invalid configuration" in low:
            raise LaunchConfigError(stage, msg) from None
        raise exc

    # -- stages --------------------------------------------------------------------------------

    def gating(self, inp: GatingInput, ctx: StageContext) -> GatingOutput:
        T, E = inp.gating_logits.shape
        K = inp.topk
        geometry.validate(geometry.gating_launches(T, E), self.limits)
        if not 1 <= K <= E:
            raise ContractError("gating", f"topk = {K} outside 1..num_experts = {E}")
        if inp.scoring not in SCORING_CODES:
            raise ContractError("gating", f"unknown scoring {inp.scoring!r}")
        run = _Launch(self, "gating", ctx)
        logits = run.input("gating_logits", inp.gating_logits.contiguous())
        bias = None if inp.correction_bias is None else run.input(
            "correction_bias", inp.correction_bias.to(torch.float32).contiguous())
        ids = run.output("topk_ids", (T, K), torch.int32)
        weights = run.output("topk_weights", (T, K), torch.float32)
        workspace = None if geometry.uses_warp_path(E) else run.output(
            "workspace", (T, E), torch.float32)
        run.run(lambda: self.ext.gating(logits, bias, K, SCORING_CODES[inp.scoring],
                                        bool(inp.renormalize), ids, weights, workspace,
                                        run.bugs, run.coverage))
        return GatingOutput(ids.cpu(), weights.cpu())

    def dispatch(self, inp: DispatchInput, ctx: StageContext) -> DispatchOutput:
        K = inp.topk_ids.shape[1]
        H = inp.hidden_states.shape[1]
        ep, M = inp.ep_size, inp.max_tokens_per_rank
        geometry.validate(geometry.dispatch_launches(ep, M), self.limits)
        run = _Launch(self, "dispatch", ctx)
        dev = self.device
        topk_ids = inp.topk_ids.to(dev, torch.int32)
        row, token, counts = _route(topk_ids, inp.rank_of_expert.to(dev), ep, M)

        garbage = inp.recv_garbage.to(torch.int32)
        ids = run.input("recv_topk_ids", garbage)
        # padding weights: an earlier step's, as dispatch_cpu models them
        weights = run.input("recv_topk_weights", garbage.to(torch.float32) * 2**-10)
        hidden = run.output("recv_hidden", (ep, ep, M, H), inp.hidden_states.dtype)
        token_index = run.output("recv_token_index", (ep, ep, M), torch.int32)
        counters = counts.cpu() if inp.recv_counters_override is None else \
            inp.recv_counters_override.to(torch.int32).reshape(ep, ep).clone()
        counters_dev = run.input("recv_counters", counters.contiguous())

        def launch() -> None:
            ids.view(-1, K)[row] = topk_ids[token]
            weights.view(-1, K)[row] = inp.topk_weights.to(dev, torch.float32)[token]
            hidden.view(-1, H)[row] = inp.hidden_states.to(dev)[token]
            token_index.view(-1)[row] = token.to(torch.int32)
            self.ext.a2a_sanitize(ids, counters_dev, run.bugs, run.coverage)

        run.run(launch)
        return DispatchOutput(ids.cpu(), weights.cpu(), hidden.cpu(), token_index.cpu(),
                              counters)

    def sort_align(self, inp: SortAlignInput, ctx: StageContext) -> SortAlignOutput:
        N, K = inp.topk_ids.shape
        E_l, bs = inp.num_local_experts, inp.block_size
        if E_l > 0:
            geometry.validate(geometry.sort_launches(N, E_l), self.limits)
        run = _Launch(self, "sort_align", ctx)
        topk_ids = run.input("topk_ids", inp.topk_ids.to(torch.int32).contiguous())
        expert_map = run.input("expert_map", inp.expert_map.to(torch.int32).reshape(-1))
        i32 = torch.int32
        counts = run.output("expert_counts", (E_l,), i32)
        offsets = run.output("expert_offsets", (E_l + 1,), i32)
        aligned = run.output("aligned_offsets", (E_l + 1,), i32)
        permuted = run.output("permuted_row", (N * K,), i32)
        sorted_ids = run.output("sorted_token_ids",
                                (geometry.max_num_tokens_padded(N, K, E_l, bs),), i32)
        expert_ids = run.output("expert_ids", (geometry.max_num_m_blocks(N, K, E_l, bs),), i32)
        post_pad = run.output("num_tokens_post_pad", (1,), i32)
        workspace = run.output("workspace", (self.ext.sort_align_workspace_elems(N, E_l),), i32)
        run.run(lambda: self.ext.sort_align(topk_ids, expert_map, E_l, bs, counts, offsets,
                                            aligned, permuted, sorted_ids, expert_ids, post_pad,
                                            workspace, run.bugs, run.coverage))
        return SortAlignOutput(counts.cpu(), offsets.cpu(), aligned.cpu(), permuted.cpu(),
                               sorted_ids.cpu(), expert_ids.cpu(), int(post_pad.cpu()[0]))

    def experts(self, inp: ExpertsInput, ctx: StageContext) -> ExpertsOutput:
        N, H = inp.hidden_states.shape
        K, bs, E_l = inp.topk, inp.block_size, inp.expert_weights.shape[0]
        chunked = not ctx.bugs.on("grid-y-overflow")
        geometry.validate(geometry.experts_launches(N, K, E_l, bs, H, chunked=chunked),
                          self.limits)
        chunks = geometry.experts_chunks(N, K, E_l, bs, chunked=chunked)
        B = geometry.max_num_m_blocks(N, K, E_l, bs)
        # expert_ids as the kernel's static size: blocks past it are never launched, blocks
        # missing from a shorter tensor read -1 (skipped), as the CPU model's clamp skips them
        given = inp.expert_ids.to(torch.int32).reshape(-1)
        expert_ids_host = torch.full((B,), -1, dtype=torch.int32)
        expert_ids_host[:min(B, given.numel())] = given[:B]
        post_pad_value = max(min(int(inp.num_tokens_post_pad), 2**31 - 1), -2**31)

        run = _Launch(self, "experts", ctx)
        hidden = run.input("hidden_states", inp.hidden_states.contiguous())
        weights = run.input("expert_weights", inp.expert_weights.to(torch.float32).contiguous())
        sorted_ids = run.input("sorted_token_ids",
                               inp.sorted_token_ids.to(torch.int32).reshape(-1))
        expert_ids = run.input("expert_ids", expert_ids_host)
        post_pad = run.input("num_tokens_post_pad",
                             torch.tensor([post_pad_value], dtype=torch.int32))
        out = run.output("expert_out", (sorted_ids.numel(), H), torch.float32)

        def launch() -> None:
            for first, last in chunks:
                self.ext.experts(hidden, weights, sorted_ids, expert_ids, post_pad, K, bs,
                                 first, last, out, run.bugs, run.coverage)

        run.run(launch)
        return ExpertsOutput(out.cpu(), len(chunks))

    def finalize(self, inp: FinalizeInput, ctx: StageContext) -> torch.Tensor:
        N, H = inp.topk_weights.shape[0], inp.expert_out.shape[1]
        geometry.validate(geometry.finalize_launches(N), self.limits)
        run = _Launch(self, "finalize", ctx)
        expert_out = run.input("expert_out", inp.expert_out.to(torch.float32).contiguous())
        permuted = run.input("permuted_row", inp.permuted_row.to(torch.int32).reshape(-1))
        weights = run.input("topk_weights", inp.topk_weights.to(torch.float32).contiguous())
        out = run.output("out", (N, H), torch.float32)
        run.run(lambda: self.ext.finalize(expert_out, permuted, weights, out, run.bugs,
                                           run.coverage))
        return out.cpu()

    def combine(self, inp: CombineInput, ctx: StageContext) -> torch.Tensor:
        ep, _, M = inp.recv_token_index.shape
        H, T = inp.rank_outputs.shape[-1], inp.num_tokens
        run = _Launch(self, "combine", ctx)
        dev = self.device
        out = torch.zeros((T, H), dtype=torch.float32, device=dev)

        def launch() -> None:
            limit = inp.recv_counters.to(dev).long().reshape(ep, ep).clamp(0, M)
            real = torch.arange(M, device=dev) < limit[..., None]
            token = inp.recv_token_index.to(dev).long()
            ok = real & (token >= 0) & (token < T)  # as combine_cpu: bad token index skipped
            rows = ok.view(-1).nonzero().squeeze(1)
            values = inp.rank_outputs.to(dev).reshape(ep * ep * M, H)[rows].to(torch.float32)
            out.index_add_(0, token.view(-1)[rows], values)

        run.run(launch)
        return out.cpu()

    def lora_align(self, inp: LoraAlignInput, ctx: StageContext) -> LoraAlignOutput:
        T, K = inp.topk_ids.shape
        E, bs, L = inp.num_experts, inp.block_size, inp.max_loras
        launches = geometry.validate(geometry.lora_launches(
            L, E, off_by_one=ctx.bugs.on("lora-grid-off-by-one")), self.limits)
        num_slots = min(launches[0].grid[0], L + 1)
        width = geometry.max_num_tokens_padded(T, K, E, bs)
        blocks = geometry.max_num_m_blocks(T, K, E, bs)
        # With lora-id-unchecked a lora_id outside [0, max_loras) indexes the per-adapter
        # buffers at its row: their guard bands are sized to the rows the given ids reach (up
        # to MAX_GUARD_BYTES), so such a write lands in a redzone, not in another allocation,
        # and adapter_enabled[lora_id] reads the (non-zero) poison word. Fixed kernels never go
        # there.
        lora_ids = inp.lora_ids.to(torch.int32).reshape(-1)
        rows_after = rows_before = 0
        if ctx.bugs.on("lora-id-unchecked") and lora_ids.numel():
            hi, lo = int(lora_ids.max()), int(lora_ids.min())
            rows_after, rows_before = max(0, hi + 1 - L), (-lo if lo < -1 else 0)

        def guards(row_bytes: int) -> dict[str, int]:
            lead = REDZONE_BYTES + rows_before * row_bytes
            trail = REDZONE_BYTES + rows_after * row_bytes
            return {"lead": lead if lead <= MAX_GUARD_BYTES else REDZONE_BYTES,
                    "trail": trail if trail <= MAX_GUARD_BYTES else REDZONE_BYTES}

        run = _Launch(self, "lora_align", ctx)
        i32 = torch.int32
        topk_ids = run.input("topk_ids", inp.topk_ids.to(i32).contiguous())
        mapping = run.input("token_lora_mapping", inp.token_lora_mapping.to(i32).reshape(-1))
        ids_dev = run.input("lora_ids", lora_ids)
        enabled = run.input("adapter_enabled", inp.adapter_enabled.to(i32).reshape(-1),
                            **guards(4))
        sorted_ids = run.output("sorted_token_ids", (L, width), i32, **guards(4 * width))
        expert_ids = run.output("expert_ids", (L, blocks), i32, **guards(4 * blocks))
        post_pad = run.output("num_tokens_post_pad", (L,), i32, **guards(4))
        cumsum = run.output("cumsum", (L, E + 1), i32, **guards(4 * (E + 1)))
        run.run(lambda: self.ext.lora_align(topk_ids, mapping, ids_dev, enabled, L, E, bs,
                                            num_slots, sorted_ids, expert_ids, post_pad, cumsum,
                                            run.bugs, run.coverage))
        return LoraAlignOutput(sorted_ids.cpu(), expert_ids.cpu(), post_pad.cpu())

    def redzone_selftest(self, ctx: StageContext | None = None, numel: int = 100) -> None:
        """Test only: run a kernel that writes one element past its output; the redzone check
        must raise `IllegalAccess(kind="redzone")` naming the buffer "selftest"."""
        run = _Launch(self, "selftest", ctx or StageContext())
        out = run.output("selftest", (numel,), torch.float32)
        run.run(lambda: self.ext.redzone_selftest(out))

    def close(self) -> None:
        if self._dead is None and self.device.type == "cuda":
            torch.cuda.empty_cache()


def _owner(topk_ids: torch.Tensor, rank_of_expert: torch.Tensor, ep: int) -> torch.Tensor:
    """[T, K] int64 rank each id is sent to, `ep` for ids nobody owns (as dispatch_cpu: ids
    outside [0, E) never index rank_of_expert)."""
    ids = topk_ids.long()
    E = rank_of_expert.numel()
    in_range = (ids >= 0) & (ids < E)
    owners = torch.cat([rank_of_expert.long(), rank_of_expert.new_full((1,), -1).long()])
    owner = owners[torch.where(in_range, ids, E)]
    return torch.where((owner >= 0) & (owner < ep), owner, ep)


def _route(topk_ids: torch.Tensor, rank_of_expert: torch.Tensor, ep: int,
           M: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dispatch routing on the device, as dispatch_cpu: (receive row (dst * ep + src) * M +
    slot, source token) of every (token, destination) pair sent, slots in token order per
    (src, dst), pairs beyond M slots dropped; and the true counts [dst, src] int32."""
    T = topk_ids.shape[0]
    P = -(-T // ep)  # tokens per source rank
    sent = torch.zeros((ep * P, ep + 1), dtype=torch.bool, device=topk_ids.device)
    sent[:T].scatter_(1, _owner(topk_ids, rank_of_expert, ep), True)
    sent = sent[:, :ep].contiguous()
    slots = sent.view(ep, P, ep).cumsum(1, dtype=torch.int32)
    counts = slots[:, -1, :].t().contiguous()
    pairs = sent.view(-1).nonzero().squeeze(1)
    token, dst = pairs // ep, pairs % ep
    src = token // P
    slot = slots.view(-1)[pairs].long() - 1
    fits = slot < M
    token, dst, src, slot = token[fits], dst[fits], src[fits], slot[fits]
    return (dst * ep + src) * M + slot, token, counts
