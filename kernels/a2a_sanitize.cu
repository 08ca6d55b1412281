// Stage 2, A2A sanitize (models SGLang PR 24850's sanitize of FlashInfer/TRT-LLM MoeAlltoAll
// receive buffers). CPU model: harness/chain/dispatch.py (the sanitize part of dispatch_cpu).
//
// recv_topk_ids [ep (dst), ep (src), M (slot), K] int32; recv_counters [ep (dst), ep (src)].
// Slots [clamp(recv_counters[dst, src], 0, M), M) are padding: their K ids become -1. The clamp
// is the fixed kernel's defence against a counter reported out of range.
// BUG_A2A_UNSANITIZED_PADDING: the sanitize is skipped (padding keeps an earlier step's ids).
//
// Geometry (geometry.dispatch_launches): grid (ceil(M / 256), ep, ep), block 256; block x of
// (dst = blockIdx.z, src = blockIdx.y) covers slots [256 x, 256 x + 256).
// Coverage: SANITIZE_SLOT_CLEARED (slots set to -1), SANITIZE_COUNTER_CLAMPED and
// SANITIZE_EMPTY_SOURCE (once per (dst, src) pair whose counter is outside [0, M] / clamps to 0).
#include "instrument.cuh"
#include "moe_harness.h"

namespace moe_harness {
namespace {

constexpr int kSanitizeThreads = 256;

__global__ void __launch_bounds__(kSanitizeThreads)
a2a_sanitize(int32_t* __restrict__ recv_topk_ids, const int32_t* __restrict__ recv_counters,
             int ep, int M, int K, uint32_t bugs, uint32_t* coverage) {
  MOE_BLOCK_COVERAGE(cov, coverage);
  const int src = static_cast<int>(blockIdx.y);
  const int dst = static_cast<int>(blockIdx.z);
  const int32_t counter = recv_counters[dst * ep + src];
  const int limit = counter < 0 ? 0 : (counter > M ? M : counter);
  // This block's slots [first, last); its padding slots [max(first, limit), last). The block
  // writes their ids cooperatively (consecutive threads, consecutive ints: coalesced); thread
  // `slot - first` of the one-thread-per-slot formulation would write the same K ids.
  const int first = static_cast<int>(blockIdx.x) * kSanitizeThreads;
  const int last = min(first + kSanitizeThreads, M);
  const int pad_first = max(first, limit);
  const bool sanitize = (bugs & BUG_A2A_UNSANITIZED_PADDING) == 0u;
  if (sanitize && pad_first < last) {
    int32_t* ids = recv_topk_ids + (static_cast<size_t>(dst) * ep + src) * M * K;
    const size_t end = static_cast<size_t>(last) * K;
    for (size_t i = static_cast<size_t>(pad_first) * K + threadIdx.x; i < end;
         i += kSanitizeThreads) {
      ids[i] = -1;
    }
  }
  if (threadIdx.x == 0) {
    if (sanitize && pad_first < last) cov.add(COV_SANITIZE_SLOT_CLEARED, last - pad_first);
    if (blockIdx.x == 0) {  // once per (dst, src) pair
      if (counter != limit) cov.add(COV_SANITIZE_COUNTER_CLAMPED);
      if (limit == 0) cov.add(COV_SANITIZE_EMPTY_SOURCE);
    }
  }
  cov.flush();
}

}  // namespace

cudaError_t launch_a2a_sanitize(int32_t* recv_topk_ids, const int32_t* recv_counters, int ep,
                                int M, int K, uint32_t bugs, uint32_t* coverage,
                                cudaStream_t stream) {
  if (ep <= 0 || M <= 0 || K <= 0) return cudaSuccess;  // nothing to sanitize (no launch)
  const dim3 grid((M + kSanitizeThreads - 1) / kSanitizeThreads, ep, ep);
  a2a_sanitize<<<grid, kSanitizeThreads, 0, stream>>>(recv_topk_ids, recv_counters, ep, M, K,
                                                      bugs, coverage);
  return launch_status();
}

}  // namespace moe_harness
