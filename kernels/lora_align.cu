// Stage 5 (beside the chain), LoRA align. Spec: harness/chain/lora_align.py; geometry:
// harness/chain/geometry.py lora_launches (both kernels: one block of 256 threads per slot of
// `lora_ids`, `num_slots` = max_loras + 1, max_loras with the off-by-one variant, chosen by the
// host).
//
// Models vLLM's moe_lora_align_block_size (csrc/moe/moe_align_sum_kernels.cu):
//   lora_align_block_size  ~ moe_lora_align_block_size_kernel: count the adapter's (token, k)
//                            pairs per expert, write its aligned offsets (`cumsum` row),
//                            `expert_ids` row, `num_tokens_post_pad` entry, sentinel fill;
//   lora_count_and_sort    ~ lora_count_and_sort_expert_tokens_kernel: scatter every pair to
//                            sorted_token_ids[lora_id, cumsum[lora_id, e] + rank].
// The real scatter takes its rank from an atomicAdd on the cumsum row (an arbitrary order within
// an expert); here a pair's rank is its stable rank among the adapter's pairs of that expert
// (the CPU model's order), computed with warp matches, so the output is deterministic.
//
// Fixed (vLLM PR 40131): the `lora_id >= max_loras` guard in both kernels; the sort kernel
// checks adapter_enabled. Variants, by their original mechanism:
//   BUG_LORA_ID_UNCHECKED     no range guard: adapter_enabled[lora_id] and the output rows of
//                             lora_id are indexed wherever lora_id points;
//   BUG_LORA_DISABLED_ADAPTER the sort kernel does not check adapter_enabled: a disabled
//                             adapter's never-written (poison) cumsum row gives the positions.
//   (lora-grid-off-by-one is host side: num_slots = max_loras.)
// Both kernels take 4 * (E + 1) bytes of dynamic shared memory (per-expert offsets / ranks).
#include "instrument.cuh"
#include "moe_harness.h"

namespace moe_harness {
namespace {

constexpr int kLoraThreads = 256;  // geometry.LORA_THREADS
constexpr int kLoraWarps = kLoraThreads / 32;

// The per-block slot test both kernels start with (before adapter_enabled is read).
enum SlotState { SLOT_BASE, SLOT_OUT_OF_RANGE, SLOT_CANDIDATE };

__device__ __forceinline__ SlotState slot_state(int32_t lora_id, int max_loras, uint32_t bugs) {
  if (lora_id == -1) return SLOT_BASE;
  const bool in_range = lora_id >= 0 && lora_id < max_loras;
  if (!in_range && (bugs & BUG_LORA_ID_UNCHECKED) == 0u) return SLOT_OUT_OF_RANGE;
  return SLOT_CANDIDATE;
}

// Exclusive block scan of the block-aligned counts: s[e] (counts, e < E) becomes the aligned
// offset of expert e, s[E] the total. Each thread owns a contiguous run of experts.
__device__ void aligned_exclusive_scan(int32_t* s, int E, int block_size) {
  __shared__ int32_t warp_totals[kLoraWarps];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int per = (E + kLoraThreads - 1) / kLoraThreads;
  const int first = min(tid * per, E);
  const int last = min(first + per, E);
  int32_t mine = 0;
  for (int e = first; e < last; ++e) mine += (s[e] + block_size - 1) / block_size * block_size;
  int32_t incl = mine;  // inclusive scan over the warp
  for (int d = 1; d < 32; d <<= 1) {
    const int32_t other = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += other;
  }
  if (lane == 31) warp_totals[warp] = incl;
  __syncthreads();
  int32_t before = incl - mine;
  for (int w = 0; w < warp; ++w) before += warp_totals[w];
  for (int e = first; e < last; ++e) {
    const int32_t c = s[e];
    s[e] = before;
    before += (c + block_size - 1) / block_size * block_size;
  }
  if (tid == kLoraThreads - 1) s[E] = before;  // the last thread's running total: everything
  __syncthreads();
}

__global__ void __launch_bounds__(kLoraThreads)
lora_align_block_size(const int32_t* __restrict__ topk_ids, int T, int K,
                      const int32_t* __restrict__ token_lora_mapping,
                      const int32_t* __restrict__ lora_ids,
                      const int32_t* __restrict__ adapter_enabled, int max_loras, int E,
                      int block_size, int32_t* __restrict__ sorted_token_ids, int64_t P,
                      int32_t* __restrict__ expert_ids, int64_t B,
                      int32_t* __restrict__ num_tokens_post_pad, int32_t* __restrict__ cumsum,
                      uint32_t bugs, uint32_t* coverage) {
  MOE_BLOCK_COVERAGE(cov, coverage);
  extern __shared__ int32_t s_offsets[];  // [E + 1]
  const int tid = static_cast<int>(threadIdx.x);
  const int32_t lora_id = lora_ids[blockIdx.x];
  const SlotState state = slot_state(lora_id, max_loras, bugs);
  // unchecked, an id outside [0, max_loras) reads adapter_enabled out of bounds (the bug)
  const bool enabled = state == SLOT_CANDIDATE && adapter_enabled[lora_id] != 0;
  if (tid == 0) {
    if (state == SLOT_BASE) cov.add(COV_LORA_SKIP_BASE);
    else if (state == SLOT_OUT_OF_RANGE) cov.add(COV_LORA_SKIP_OUT_OF_RANGE);
    else if (!enabled) cov.add(COV_LORA_SKIP_DISABLED);
    else cov.add(COV_LORA_SLOT_PROCESSED);
  }
  if (enabled) {  // block-uniform
    const int64_t numel = static_cast<int64_t>(T) * K;
    for (int e = tid; e <= E; e += kLoraThreads) s_offsets[e] = 0;
    __syncthreads();
    for (int64_t i = tid; i < numel; i += kLoraThreads) {
      if (token_lora_mapping[i / K] != lora_id) continue;
      const int32_t e = topk_ids[i];
      if (e >= 0 && e < E) atomicAdd(&s_offsets[e], 1);
    }
    __syncthreads();
    aligned_exclusive_scan(s_offsets, E, block_size);
    const int64_t row = lora_id;
    const int32_t total = s_offsets[E];
    if (tid == 0) {
      num_tokens_post_pad[row] = total;
      if (total == 0) cov.add(COV_LORA_EMPTY_ADAPTER);
    }
    for (int e = tid; e <= E; e += kLoraThreads) cumsum[row * (E + 1) + e] = s_offsets[e];
    for (int64_t b = tid; b < B; b += kLoraThreads) {
      const int64_t start = b * block_size;
      int32_t owner = -1;
      if (start < total) {  // the first expert whose aligned end lies past `start`
        int lo = 0, hi = E - 1;
        while (lo < hi) {
          const int mid = (lo + hi) >> 1;
          if (s_offsets[mid + 1] > start) hi = mid;
          else lo = mid + 1;
        }
        owner = lo;
      }
      expert_ids[row * B + b] = owner;
    }
    for (int64_t p = tid; p < P; p += kLoraThreads) {
      sorted_token_ids[row * P + p] = static_cast<int32_t>(numel);
    }
  }
  cov.flush();
}

__global__ void __launch_bounds__(kLoraThreads)
lora_count_and_sort(const int32_t* __restrict__ topk_ids, int T, int K,
                    const int32_t* __restrict__ token_lora_mapping,
                    const int32_t* __restrict__ lora_ids,
                    const int32_t* __restrict__ adapter_enabled, int max_loras, int E,
                    int32_t* __restrict__ sorted_token_ids, int64_t P,
                    const int32_t* __restrict__ cumsum, uint32_t bugs, uint32_t* coverage) {
  MOE_BLOCK_COVERAGE(cov, coverage);
  extern __shared__ int32_t s_count[];  // [E]: pairs of each expert placed so far
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int32_t lora_id = lora_ids[blockIdx.x];
  bool sorts = slot_state(lora_id, max_loras, bugs) == SLOT_CANDIDATE;
  if ((bugs & BUG_LORA_DISABLED_ADAPTER) == 0u) {
    sorts = sorts && adapter_enabled[lora_id] != 0;
  } else if (sorts && tid == 0 && cov.on() && adapter_enabled[lora_id] == 0) {
    // coverage only (the variant's kernel itself never reads adapter_enabled)
    cov.add(COV_LORA_SORT_DISABLED_UNCHECKED);
  }
  if (sorts) {  // block-uniform
    const int64_t numel = static_cast<int64_t>(T) * K;
    const int64_t row = lora_id;
    const int32_t* offsets = cumsum + row * (E + 1);  // never written for a skipped adapter
    for (int e = tid; e < E; e += kLoraThreads) s_count[e] = 0;
    __syncthreads();
    for (int64_t first = 0; first < numel; first += kLoraThreads) {
      const int64_t i = first + tid;
      int32_t key = -1;  // this pair's expert, -1 where the pair is not the adapter's
      if (i < numel && token_lora_mapping[i / K] == lora_id) {
        const int32_t e = topk_ids[i];
        if (e >= 0 && e < E) key = e;
      }
      const unsigned peers = __match_any_sync(0xffffffffu, key);
      const int rank = __popc(peers & ((1u << lane) - 1u));  // earlier lanes, same expert
      // warps in order, so a pair's rank counts every earlier pair of its expert (stable)
      for (int w = 0; w < kLoraWarps; ++w) {
        if (warp == w && key >= 0) {
          const int64_t pos = row * P + static_cast<int64_t>(offsets[key]) + s_count[key] + rank;
          sorted_token_ids[pos] = static_cast<int32_t>(i);
        }
        __syncwarp();
        if (warp == w && key >= 0 && rank == 0) s_count[key] += __popc(peers);
        __syncthreads();
      }
    }
  }
  cov.flush();
}

}  // namespace

cudaError_t launch_lora_align(const int32_t* topk_ids, int T, int K,
                              const int32_t* token_lora_mapping, const int32_t* lora_ids,
                              const int32_t* adapter_enabled, int max_loras, int E,
                              int block_size, int num_slots, int32_t* sorted_token_ids, int P,
                              int32_t* expert_ids, int B, int32_t* num_tokens_post_pad,
                              int32_t* cumsum, uint32_t bugs, uint32_t* coverage,
                              cudaStream_t stream) {
  if (num_slots <= 0) return cudaSuccess;  // nothing to process (no launch)
  if (T < 0 || K <= 0 || E <= 0 || block_size <= 0 || P < 0 || B < 0) {
    return cudaErrorInvalidValue;
  }
  const size_t shared = sizeof(int32_t) * (static_cast<size_t>(E) + 1);
  lora_align_block_size<<<num_slots, kLoraThreads, shared, stream>>>(
      topk_ids, T, K, token_lora_mapping, lora_ids, adapter_enabled, max_loras, E, block_size,
      sorted_token_ids, P, expert_ids, B, num_tokens_post_pad, cumsum, bugs, coverage);
  const cudaError_t err = launch_status();
  if (err != cudaSuccess) return err;
  lora_count_and_sort<<<num_slots, kLoraThreads, shared, stream>>>(
      topk_ids, T, K, token_lora_mapping, lora_ids, adapter_enabled, max_loras, E,
      sorted_token_ids, P, cumsum, bugs, coverage);
  return launch_status();
}

}  // namespace moe_harness
