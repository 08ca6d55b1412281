// Stage 4: experts (a grouped linear map over the block-aligned layout) and finalize
// (unpermute + weighted reduce). Spec: harness/chain/experts.py; geometry:
// harness/chain/geometry.py experts_launches / finalize_launches.
//
// experts_grouped_linear models the fused-MoE grouped GEMM of vLLM's fused_moe kernel: one CTA
// per m-block of `block_size` aligned positions (grid.y, launched in chunks of at most 65535
// blocks by the host), the block's expert from `expert_ids`, each position's token from
// `sorted_token_ids`. finalize_unpermute_reduce models TRT-LLM's finalizeMoeRoutingKernel.
// Both are the fixed, defensive kernels: every index they dereference is range-checked first.

#include "instrument.cuh"
#include "moe_harness.h"

#include <algorithm>

namespace moe_harness {
namespace {

constexpr int kMaxExpertsThreads = 256;
constexpr int kFinalizeThreads = 128;  // geometry.FINALIZE_THREADS

// One CTA = one m-block b = block_first + blockIdx.y. Thread i of the CTA computes the
// (position, column) pairs i, i + blockDim, ... of the block's block_size x H outputs:
// expert_out[p, j] = sum_h hidden[n, h] * W[e, h, j] with n = sorted_token_ids[p] / K.
template <typename scalar_t>
__global__ void __launch_bounds__(kMaxExpertsThreads)
experts_grouped_linear(const scalar_t* __restrict__ hidden, const float* __restrict__ W, int N,
                       int H, int E_l, const int32_t* __restrict__ sorted_token_ids, int64_t P,
                       const int32_t* __restrict__ expert_ids, int64_t num_m_blocks,
                       const int32_t* __restrict__ num_tokens_post_pad, int K, int block_size,
                       int block_first, float* __restrict__ expert_out, uint32_t* coverage) {
  MOE_BLOCK_COVERAGE(cov, coverage);
  const int64_t b = static_cast<int64_t>(block_first) + blockIdx.y;
  cov.once(COV_EXPERTS_CHUNK);  // this stage launched (chunks OR together)

  // A CTA exits when its first position is at or past num_tokens_post_pad; the fixed guard
  // also never runs a block whose positions or expert id lie outside the buffers.
  const int64_t post_pad = num_tokens_post_pad[0];
  int64_t active = post_pad > 0 ? (post_pad + block_size - 1) / block_size : 0;
  const int64_t in_buffers = min(num_m_blocks, P / block_size);
  if (active > in_buffers) active = in_buffers;
  const bool runs = b < active;
  const int32_t e = runs ? expert_ids[b] : -1;
  const bool expert_ok = runs && e >= 0 && e < E_l;
  if (threadIdx.x == 0) {
    if (!runs) cov.add(COV_EXPERTS_BLOCK_EARLY_EXIT);
    else if (!expert_ok) cov.add(COV_EXPERTS_GUARD_SKIP);
  }

  const int64_t sentinel = static_cast<int64_t>(N) * K;
  const float* w_e = W + static_cast<int64_t>(expert_ok ? e : 0) * H * H;
  const int work = expert_ok ? block_size * H : 0;
  for (int i = threadIdx.x; i < work; i += blockDim.x) {
    const int pos = i / H;
    const int j = i - pos * H;
    const int64_t p = b * block_size + pos;
    const int64_t x = sorted_token_ids[p];
    const bool is_sentinel = x == sentinel;
    const bool token_ok = x >= 0 && x < sentinel;
    if (j == 0) {
      if (is_sentinel) cov.add(COV_EXPERTS_SENTINEL_ROW);
      else if (!token_ok) cov.add(COV_EXPERTS_GUARD_SKIP);
    }
    if (!token_ok) continue;
    const scalar_t* row = hidden + (x / K) * H;
    float acc = 0.0f;
    for (int h = 0; h < H; ++h) {
      acc = fmaf(load_float(row, h), w_e[static_cast<int64_t>(h) * H + j], acc);
    }
    expert_out[p * H + j] = acc;
  }
  cov.flush();
}

// One CTA per row n: out[n, h] = sum over k (in order) of w[n, k] * expert_out[r, h] with
// r = permuted_row[n*K + k], skipping r == -1 (unrouted) and r outside [0, P) (the fixed
// guard; an unguarded kernel would dereference a wild pointer). Multiply and add are rounded
// separately, as the CPU model's torch ops are, so the result is bit-identical.
__global__ void __launch_bounds__(kFinalizeThreads)
finalize_unpermute_reduce(const float* __restrict__ expert_out, int64_t P, int H,
                          const int32_t* __restrict__ permuted_row,
                          const float* __restrict__ topk_weights, int N, int K,
                          float* __restrict__ out, bool trust_rows, uint32_t* coverage) {
  MOE_BLOCK_COVERAGE(cov, coverage);
  const int64_t n = blockIdx.x;
  const bool row_ok = n < N;
  const int32_t* rows = permuted_row + (row_ok ? n : 0) * K;
  const float* weights = topk_weights + (row_ok ? n : 0) * K;
  if (row_ok && threadIdx.x == 0) {
    for (int k = 0; k < K; ++k) {
      const int32_t r = rows[k];
      if (r == -1) cov.add(COV_FINALIZE_SKIP_INVALID);
      else if (r < 0 || r >= P) cov.add(COV_FINALIZE_GUARD_OUT_OF_RANGE);
    }
  }
  bool nonfinite = false;
  for (int h = threadIdx.x; row_ok && h < H; h += blockDim.x) {
    float acc = 0.0f;
    for (int k = 0; k < K; ++k) {
      const int64_t r = rows[k];
      if (r == -1 || (!trust_rows && (r < 0 || r >= P))) continue;
      acc = __fadd_rn(acc, __fmul_rn(weights[k], expert_out[r * H + h]));
    }
    out[n * H + h] = acc;
    nonfinite |= !isfinite(acc);
  }
  if (__syncthreads_or(nonfinite) && threadIdx.x == 0) cov.add(COV_FINALIZE_NONFINITE);
  cov.flush();
}

}  // namespace

cudaError_t launch_experts(const void* hidden, int dtype, const float* W, int N, int H, int E_l,
                           const int32_t* sorted_token_ids, int P, const int32_t* expert_ids,
                           const int32_t* num_tokens_post_pad, int K, int block_size,
                           int block_first, int block_last, float* expert_out, uint32_t bugs,
                           uint32_t* coverage, cudaStream_t stream) {
  (void)bugs;  // grid-y-overflow lives on the host: it only changes [block_first, block_last)
  if (H <= 0 || block_size <= 0 || K <= 0 || N < 0 || E_l < 0 || P < 0) {
    return cudaErrorInvalidValue;
  }
  // the static size of expert_ids: geometry.max_num_m_blocks(N, K, E_l, block_size)
  const int64_t padded =
      static_cast<int64_t>(N) * K + static_cast<int64_t>(E_l) * (block_size - 1);
  const int64_t num_m_blocks = (padded + block_size - 1) / block_size;
  const dim3 grid(1, static_cast<unsigned>(std::max(block_last - block_first, 1)), 1);
  const dim3 block(static_cast<unsigned>(std::min(block_size * H, kMaxExpertsThreads)), 1, 1);
  const bool known = dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    experts_grouped_linear<T><<<grid, block, 0, stream>>>(
        static_cast<const T*>(hidden), W, N, H, E_l, sorted_token_ids, P, expert_ids,
        num_m_blocks, num_tokens_post_pad, K, block_size, block_first, expert_out, coverage);
  });
  return known ? launch_status() : cudaErrorInvalidValue;
}

cudaError_t launch_finalize(const float* expert_out, int P, int H, const int32_t* permuted_row,
                            const float* topk_weights, int N, int K, float* out, uint32_t bugs,
                            uint32_t* coverage, cudaStream_t stream) {
  const bool trust_rows = (bugs & BUG_SORT_DUPLICATE_BREAK) != 0;
  if (H <= 0 || K <= 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(std::max(N, 1)), 1, 1);
  finalize_unpermute_reduce<<<grid, kFinalizeThreads, 0, stream>>>(
      expert_out, P, H, permuted_row, topk_weights, N, K, out, trust_rows, coverage);
  return launch_status();
}

}  // namespace moe_harness
