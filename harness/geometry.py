"""Launch geometry of every kernel of the chain, shared by the CPU model and the CUDA launcher.

One function per stage gives the launches (grid, block, shared memory) the real kernel would
make for a given problem; `validate` checks them against the device's limits and raises
`LaunchConfigError` before anything runs. The experts stage is chunked so that grid.y stays
within 65535 (vLLM PR 43599 derives its chunk size the same way); `chunked=False` reproduces
the unchunked launch of the `grid-y-overflow` variant.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from harness.errors import LaunchConfigError

#: the expert counts the warp top-k kernel specialises (as vLLM's topk_softmax does)
WARP_EXPERTS = frozenset({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 192, 320, 384, 448, 576})
WARP_SIZE = 32
GATING_WARPS_PER_CTA = 4
FALLBACK_THREADS = 256
SORT_THREADS = 256
#: above this many rows the sort uses the three-step path (as FlashInfer's routing does)
SORT_SINGLE_BLOCK_MAX_ROWS = 256
FINALIZE_THREADS = 128
LORA_THREADS = 256


@dataclass(frozen=True)
class DeviceLimits:
    """CUDA launch limits; the defaults are those of every device since compute capability 3.0,
    with the 48 KiB of static shared memory every kernel may use without opting in."""

    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)
    max_threads_per_block: int = 1024
    max_block: tuple[int, int, int] = (1024, 1024, 64)
    max_shared_bytes: int = 48 * 1024


@dataclass(frozen=True)
class Launch:
    """One kernel launch: which kernel, its grid and block, its dynamic shared memory."""

    stage: str
    kernel: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int = 0


def validate(launches: list[Launch], limits: DeviceLimits = DeviceLimits()) -> list[Launch]:
    """Raise `LaunchConfigError` for the first launch outside `limits`; return the launches.

    Valid launch lists are remembered (per problem shape they repeat on every run)."""
    _validate(tuple(launches), limits)
    return launches


@functools.lru_cache(maxsize=1024)
def _validate(launches: tuple[Launch, ...], limits: DeviceLimits) -> None:
    for ln in launches:
        for axis, (g, cap) in enumerate(zip(ln.grid, limits.max_grid, strict=True)):
            if not 1 <= g <= cap:
                raise LaunchConfigError(ln.stage, f"{ln.kernel}: grid.{'xyz'[axis]} = {g} "
                                        f"outside 1..{cap}", ln.grid, ln.block)
        threads = ln.block[0] * ln.block[1] * ln.block[2]
        if threads > limits.max_threads_per_block or any(
                not 1 <= b <= cap for b, cap in zip(ln.block, limits.max_block, strict=True)):
            raise LaunchConfigError(ln.stage, f"{ln.kernel}: block of {threads} threads "
                                    f"exceeds the device's limits", ln.grid, ln.block)
        if ln.shared_bytes > limits.max_shared_bytes:
            raise LaunchConfigError(ln.stage, f"{ln.kernel}: {ln.shared_bytes} bytes of shared "
                                    f"memory > {limits.max_shared_bytes}", ln.grid, ln.block)


# -- per-stage geometry ------------------------------------------------------------------------


def warp_layout(num_experts: int) -> tuple[int, int]:
    """(threads per row, values per thread) of the warp top-k path: a row spread over
    min(32, E) lanes, each holding E / lanes contiguous values."""
    lanes = min(WARP_SIZE, num_experts)
    return lanes, num_experts // lanes


def uses_warp_path(num_experts: int) -> bool:
    return num_experts in WARP_EXPERTS


def gating_launches(num_tokens: int, num_experts: int) -> list[Launch]:
    if uses_warp_path(num_experts):
        lanes, _ = warp_layout(num_experts)
        rows_per_cta = GATING_WARPS_PER_CTA * (WARP_SIZE // lanes)
        return [Launch("gating", "topk_gating_warp", (math.ceil(num_tokens / rows_per_cta), 1, 1),
                       (WARP_SIZE, GATING_WARPS_PER_CTA, 1))]
    return [
        Launch("gating", "gating_scores", (num_tokens, 1, 1), (FALLBACK_THREADS, 1, 1)),
        Launch("gating", "gating_block_topk", (num_tokens, 1, 1), (FALLBACK_THREADS, 1, 1)),
    ]


def dispatch_launches(ep_size: int, max_tokens_per_rank: int) -> list[Launch]:
    blocks = math.ceil(max_tokens_per_rank / 256)
    return [Launch("dispatch", "a2a_sanitize", (blocks, ep_size, ep_size), (256, 1, 1))]


def sort_uses_three_step(num_rows: int) -> bool:
    return num_rows > SORT_SINGLE_BLOCK_MAX_ROWS


def max_num_tokens_padded(num_rows: int, topk: int, num_experts: int, block_size: int) -> int:
    """Static size of `sorted_token_ids`: every expert may add up to block_size - 1 pad slots."""
    return num_rows * topk + num_experts * (block_size - 1)


def max_num_m_blocks(num_rows: int, topk: int, num_experts: int, block_size: int) -> int:
    return math.ceil(max_num_tokens_padded(num_rows, topk, num_experts, block_size) / block_size)


def sort_launches(num_rows: int, num_experts: int) -> list[Launch]:
    if not sort_uses_three_step(num_rows):
        return [Launch("sort_align", "sort_single_block", (1, 1, 1), (SORT_THREADS, 1, 1),
                       shared_bytes=4 * (2 * num_experts + 2))]
    blocks = math.ceil(num_rows / SORT_THREADS)
    return [
        Launch("sort_align", "sort_block_expert_prefix", (blocks, max(num_experts, 1), 1),
               (SORT_THREADS, 1, 1)),
        Launch("sort_align", "sort_global_prefix", (1, 1, 1), (SORT_THREADS, 1, 1)),
        Launch("sort_align", "sort_merge", (blocks, 1, 1), (SORT_THREADS, 1, 1)),
    ]


def experts_chunks(num_rows: int, topk: int, num_experts: int, block_size: int,
                   chunked: bool = True, max_grid_y: int = 65535) -> list[tuple[int, int]]:
    """The [first, last) m-block ranges the experts kernel is launched over, one per launch.

    The kernel runs one CTA (grid.y) per block of `block_size` rows of the block-aligned
    layout, sized statically by `max_num_m_blocks`. Chunked, each launch covers at most
    `max_grid_y` blocks; unchunked, one launch covers them all.
    """
    total = max_num_m_blocks(num_rows, topk, num_experts, block_size)
    step = max_grid_y if chunked else max(total, 1)
    return [(s, min(s + step, total)) for s in range(0, total, step)] or [(0, 0)]


def experts_launches(num_rows: int, topk: int, num_experts: int, block_size: int,
                     hidden_size: int, chunked: bool = True) -> list[Launch]:
    return [Launch("experts", "experts_grouped_linear", (1, max(last - first, 1), 1),
                   (min(block_size * hidden_size, 256), 1, 1))
            for first, last in experts_chunks(num_rows, topk, num_experts, block_size, chunked)]


def overflow_num_tokens(topk: int, num_experts: int, block_size: int,
                        max_grid_y: int = 65535) -> int:
    """The smallest T at which an unchunked experts launch exceeds `max_grid_y` blocks.

    Solves ceil((T*K + E*(bs-1)) / bs) > max_grid_y for T, as vLLM PR 43599 solves its own
    kernel's grid formula for the largest safe chunk. The fuzzer aims sizes around it.
    """
    limit = max_grid_y * block_size - num_experts * (block_size - 1)  # T*K must exceed this
    return max(1, limit // topk + 1)


def finalize_launches(num_rows: int) -> list[Launch]:
    return [Launch("finalize", "finalize_unpermute_reduce", (max(num_rows, 1), 1, 1),
                   (FINALIZE_THREADS, 1, 1))]


def lora_launches(max_loras: int, num_experts: int, off_by_one: bool = False) -> list[Launch]:
    """Both LoRA align kernels are launched over the max_loras + 1 slots of `lora_ids`
    (`off_by_one` reproduces the max_loras blocks of vLLM before PR 40131)."""
    slots = max_loras if off_by_one else max_loras + 1
    return [
        Launch("lora_align", "lora_align_block_size", (max(slots, 1), 1, 1), (LORA_THREADS, 1, 1),
               shared_bytes=4 * (num_experts + 1)),
        Launch("lora_align", "lora_count_and_sort", (max(slots, 1), 1, 1), (LORA_THREADS, 1, 1)),
    ]
