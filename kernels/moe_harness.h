// moe-harness kernels: the host-side launchers of every stage of the MoE routing chain.
//
//   gating -> a2a sanitize -> sort_align -> experts -> finalize      (lora_align beside it)
//
// Each launcher enqueues its kernel(s) on `stream` and returns the launch's cudaError_t
// (cudaGetLastError after the launch; no synchronisation). Grid sizes that the Python side
// computes (harness/chain/geometry.py, shared with the CPU model) are passed in explicitly.
// `bugs` is a bitmask of BugBit: one build serves every variant. `coverage` points to
// COV_BUFFER_WORDS uint32 words in global memory, zeroed by the caller (may be nullptr:
// instrumentation off): block b ORs the bits of the slots it took into the 64-bit flag word of
// lane b % COV_WORDS (two uint32 words: slots 0-31, then 32-63).
// No PyTorch headers here or in the kernels: the binding (binding.cpp) is the only C++ that
// knows torch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace moe_harness {

// Bit i = the i-th variant of harness/bugs.py VARIANTS (same order).
enum BugBit : uint32_t {
  BUG_TOPK_NAN_ARGMAX = 1u << 0,
  BUG_A2A_UNSANITIZED_PADDING = 1u << 1,
  BUG_SORT_DUPLICATE_BREAK = 1u << 2,
  BUG_GRID_Y_OVERFLOW = 1u << 3,  // host side only: the launch is not chunked
  BUG_LORA_GRID_OFF_BY_ONE = 1u << 4,  // host side only: grid of max_loras blocks
  BUG_LORA_ID_UNCHECKED = 1u << 5,
  BUG_LORA_DISABLED_ADAPTER = 1u << 6,
};

// Built with -DMOE_HARNESS_NO_COVERAGE, every coverage statement compiles away (the pointer
// is ignored): the build against which the counters' cost is measured (tools/bench_kernels.py).
#ifdef MOE_HARNESS_NO_COVERAGE
constexpr bool kCoverageCompiled = false;
#else
constexpr bool kCoverageCompiled = true;
#endif

enum DType : int { DTYPE_FP32 = 0, DTYPE_FP16 = 1, DTYPE_BF16 = 2 };
enum Scoring : int { SCORING_SOFTMAX = 0, SCORING_SIGMOID = 1 };

// Poison (harness/memory.py): outputs and guard bands are pre-filled by the host with one word
// of a family whose 16-bit halves both lie in 0x7FC1..0x7FFF, chosen per run: as int32 an id far
// outside [-1, E), as float32 a NaN with a payload, each half a NaN as fp16 and bf16. These are
// the family's word for seed 0 (kernels never depend on the value: they only see it in memory).
constexpr uint32_t POISON_HALF_MIN = 0x7FC1u;
constexpr int32_t POISON_I32 = static_cast<int32_t>(0x7FD07FCEu);
constexpr uint32_t POISON_F32_BITS = 0x7FD07FCEu;

// Coverage slots (names exported to Python by the binding, see coverage_slot_names()).
#define MOE_COVERAGE_SLOTS(X)                                                              \
  X(GATING_WARP_PATH) X(GATING_FALLBACK_PATH) X(GATING_CLAMP_HIT) X(GATING_NONFINITE_WINNER) \
  X(GATING_TIE_BREAK) X(GATING_RENORM_ZERO_SUM) X(GATING_BIAS)                               \
  X(SANITIZE_SLOT_CLEARED) X(SANITIZE_COUNTER_CLAMPED) X(SANITIZE_EMPTY_SOURCE)              \
  X(SORT_SINGLE_BLOCK) X(SORT_THREE_STEP) X(SORT_SKIP_INVALID) X(SORT_SKIP_NOT_OWNED)       \
  X(SORT_DUPLICATE_SEEN) X(SORT_DUPLICATE_DROPPED) X(SORT_EMPTY_EXPERT)                     \
  X(EXPERTS_BLOCK_EARLY_EXIT) X(EXPERTS_SENTINEL_ROW) X(EXPERTS_GUARD_SKIP) X(EXPERTS_CHUNK) \
  X(FINALIZE_SKIP_INVALID) X(FINALIZE_GUARD_OUT_OF_RANGE) X(FINALIZE_NONFINITE)            \
  X(LORA_SLOT_PROCESSED) X(LORA_SKIP_BASE) X(LORA_SKIP_OUT_OF_RANGE) X(LORA_SKIP_DISABLED)  \
  X(LORA_SORT_DISABLED_UNCHECKED) X(LORA_EMPTY_ADAPTER)

enum CoverageSlot : int {
#define MOE_COV_ENUM(name) COV_##name,
  MOE_COVERAGE_SLOTS(MOE_COV_ENUM)
#undef MOE_COV_ENUM
  COV_NUM_SLOTS
};
static_assert(COV_NUM_SLOTS <= 64, "one bit per coverage slot in a 64-bit flag word");

// Flag words of the coverage buffer: block lanes (block index mod COV_WORDS), each a 64-bit
// flag word stored as COV_HALVES uint32 words (low half first).
constexpr int COV_WORDS = 32;
constexpr int COV_HALVES = 2;
constexpr int COV_BUFFER_WORDS = COV_WORDS * COV_HALVES;

// ---- launchers ---------------------------------------------------------------------------

// Stage 1 (gating.cu). logits [T, E] of `dtype`; bias [E] fp32 or nullptr; outputs topk_ids
// [T, K] int32, topk_weights [T, K] fp32; workspace [T, E] fp32 (fallback path only).
cudaError_t launch_gating(const void* logits, int dtype, const float* bias, int T, int E, int K,
                          int scoring, bool renormalize, int32_t* topk_ids, float* topk_weights,
                          float* workspace, uint32_t bugs, uint32_t* coverage,
                          cudaStream_t stream);

// Stage 2 (a2a_sanitize.cu). recv_topk_ids [ep, ep, M, K] int32 (dst, src, slot, k), sanitized
// in place; recv_counters [ep, ep] int32.
cudaError_t launch_a2a_sanitize(int32_t* recv_topk_ids, const int32_t* recv_counters, int ep,
                                int M, int K, uint32_t bugs, uint32_t* coverage,
                                cudaStream_t stream);

// Stage 3 (sort_align.cu). topk_ids [N, K] global ids; expert_map [E] (global -> local, -1 not
// owned). Outputs as harness/chain/sort_align.py: expert_counts [E_l], expert_offsets
// [E_l + 1], aligned_offsets [E_l + 1], permuted_row [N*K], sorted_token_ids
// [max_num_tokens_padded], expert_ids [max_num_m_blocks], num_tokens_post_pad [1].
// workspace: sort_align_workspace_elems(N, E_l) int32.
size_t sort_align_workspace_elems(int N, int E_local);
cudaError_t launch_sort_align(const int32_t* topk_ids, const int32_t* expert_map, int E, int N,
                              int K, int E_local, int block_size, int32_t* expert_counts,
                              int32_t* expert_offsets, int32_t* aligned_offsets,
                              int32_t* permuted_row, int32_t* sorted_token_ids,
                              int32_t* expert_ids, int32_t* num_tokens_post_pad,
                              int32_t* workspace, uint32_t bugs, uint32_t* coverage,
                              cudaStream_t stream);

// Stage 4a (experts.cu): one launch over m-blocks [block_first, block_last) (grid.y = their
// count). hidden [N, H] of `dtype`; W [E_l, H, H] fp32; expert_out [P, H] fp32.
cudaError_t launch_experts(const void* hidden, int dtype, const float* W, int N, int H, int E_l,
                           const int32_t* sorted_token_ids, int P, const int32_t* expert_ids,
                           const int32_t* num_tokens_post_pad, int K, int block_size,
                           int block_first, int block_last, float* expert_out, uint32_t bugs,
                           uint32_t* coverage, cudaStream_t stream);

// Stage 4b (experts.cu): out [N, H] fp32 = sum_k w[n,k] * expert_out[permuted_row[n*K+k]].
// Fixed: a permuted_row outside [0, P) is skipped. BUG_SORT_DUPLICATE_BREAK restores the
// original pairing of that sort with a finalize that trusted it: only -1 is skipped.
cudaError_t launch_finalize(const float* expert_out, int P, int H, const int32_t* permuted_row,
                            const float* topk_weights, int N, int K, float* out, uint32_t bugs,
                            uint32_t* coverage, cudaStream_t stream);

// Stage 5 (lora_align.cu): `num_slots` blocks (max_loras + 1 fixed, max_loras with the
// off-by-one variant) over lora_ids [max_loras + 1]. Outputs: sorted_token_ids
// [max_loras, P], expert_ids [max_loras, B], num_tokens_post_pad [max_loras]; cumsum
// workspace [max_loras, E + 1] (left poison for skipped adapters).
cudaError_t launch_lora_align(const int32_t* topk_ids, int T, int K,
                              const int32_t* token_lora_mapping, const int32_t* lora_ids,
                              const int32_t* adapter_enabled, int max_loras, int E,
                              int block_size, int num_slots, int32_t* sorted_token_ids, int P,
                              int32_t* expert_ids, int B, int32_t* num_tokens_post_pad,
                              int32_t* cumsum, uint32_t bugs, uint32_t* coverage,
                              cudaStream_t stream);

}  // namespace moe_harness
