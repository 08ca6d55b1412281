// Stage 1, top-k gating: scoring (softmax | sigmoid) then top-k selection.
// CPU model (the spec): harness/chain/gating.py; launch geometry: geometry.gating_launches.
//
// Two paths, as vLLM's csrc/moe/topk_softmax_kernels.cu:
// * topk_gating_warp (models `topkGatingSoftmax`), for E in geometry.WARP_EXPERTS: block
//   (32, 4) = 4 warps, a row spread over LANES = min(32, E) lanes (32 / LANES rows per warp),
//   lane g of a row holding the VPT = E / LANES contiguous values [g*VPT, (g+1)*VPT) in
//   registers. Per round: a lane's running max from its first value with strict '>', then a
//   butterfly __shfl_xor_sync reduction (masks LANES/2 .. 1) taking the other pair when
//   other > mine or equal with a lower index; lane 0's pair is the round's winner (broadcast,
//   so the lane owning it masks it with -10000 before the next round).
// * gating_scores + gating_block_topk (model `moeSoftmax`/`moeSigmoid` + `moeTopK`), for every
//   other E: one 256-thread block per row writes the fp32 scores into `workspace` [T, E]; then
//   one 256-thread block per row, per round: each thread's (key, value) pair starts at
//   (0, -inf), strides over experts t, t+256, ... skipping those chosen in earlier rounds and
//   takes an expert when value > best or equal with a lower key; a shared-memory tree
//   reduction (stride 128 .. 1, the same comparison; a tree in this order, not cub, so NaN
//   behaves exactly as in the CPU model).
//
// Scores: softmax = NaN-ignoring row max (fmaxf), exp(x - max), sum, multiply by 1/sum;
// sigmoid = 1 / (1 + exp(-x)); fp32, expf and IEEE division (no fast-math intrinsics).
// Fixed (vLLM PR 39391): NaN/+-Inf scores are clamped to 0 right after scoring (both paths).
// BUG_TOPK_NAN_ARGMAX removes the clamp: a NaN never wins a strict '>' and an all-NaN row
// yields [0, 0, ...].
// Selection value = score + correction bias (bias may be nullptr); weight = the unbiased score.
// Renormalisation: w / (sum > 0 ? sum : 1), sum in fp32 in selection order (lane 0 / thread 0).
//
// Coverage: GATING_WARP_PATH / GATING_FALLBACK_PATH (once per launch), GATING_BIAS (once per
// launch with a bias), GATING_CLAMP_HIT (rows with a clamped score), GATING_TIE_BREAK (equal
// values resolved by the lower index, per comparison that took it), GATING_NONFINITE_WINNER
// (rounds whose winning value is not finite; the fallback's "no candidate" (0, -inf) counts
// here), GATING_RENORM_ZERO_SUM (rows renormalised with denominator 1).
#include <cmath>

#include "instrument.cuh"
#include "moe_harness.h"

namespace moe_harness {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kWarpsPerCta = 4;     // geometry.GATING_WARPS_PER_CTA
constexpr int kFallbackThreads = 256;  // geometry.FALLBACK_THREADS
constexpr float kMasked = -10000.f;    // what topkGatingSoftmax writes over a chosen value

__device__ __forceinline__ float sigmoid_score(float x) { return 1.f / (1.f + expf(-x)); }

// ---- warp path -------------------------------------------------------------------------------

template <typename T, int LANES, int VPT>
__global__ void __launch_bounds__(kWarpSize* kWarpsPerCta)
topk_gating_warp(const T* __restrict__ logits, const float* __restrict__ bias, int num_rows,
                 int K, int scoring, bool renormalize, int32_t* __restrict__ topk_ids,
                 float* __restrict__ topk_weights, uint32_t bugs, uint32_t* coverage) {
  static_assert(LANES >= 1 && LANES <= kWarpSize && (kWarpSize % LANES) == 0, "lanes");
  constexpr int E = LANES * VPT;
  constexpr int kRowsPerWarp = kWarpSize / LANES;
  constexpr int kRowsPerCta = kWarpsPerCta * kRowsPerWarp;
  MOE_BLOCK_COVERAGE(cov, coverage);
  cov.once(COV_GATING_WARP_PATH);
  if (bias != nullptr) cov.once(COV_GATING_BIAS);

  const int lane = static_cast<int>(threadIdx.x);  // block (32, 4): x is the lane
  const int g = lane % LANES;                      // lane within the row's group
  const int group_base = lane - g;
  const unsigned group_mask =
      LANES == kWarpSize ? kFullMask : (((1u << (LANES % kWarpSize)) - 1u) << group_base);
  const int row = static_cast<int>(blockIdx.x) * kRowsPerCta +
                  static_cast<int>(threadIdx.y) * kRowsPerWarp + lane / LANES;
  // Rows past the end compute on zeros and write nothing: every lane stays in the shuffles.
  const bool valid = row < num_rows;
  const int first_col = g * VPT;

  float score[VPT];
  if (valid) {
    const T* src = logits + static_cast<size_t>(row) * E + first_col;
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] = to_float<T>(src[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] = 0.f;
  }

  if (scoring == SCORING_SOFTMAX) {
    float mx = score[0];
#pragma unroll
    for (int i = 1; i < VPT; ++i) mx = fmaxf(mx, score[i]);  // NaN-ignoring
#pragma unroll
    for (int mask = LANES / 2; mask > 0; mask /= 2) {
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, mask, LANES));
    }
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      score[i] = expf(score[i] - mx);
      sum += score[i];
    }
#pragma unroll
    for (int mask = LANES / 2; mask > 0; mask /= 2) {
      sum += __shfl_xor_sync(kFullMask, sum, mask, LANES);
    }
    const float inv = 1.f / sum;
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] *= inv;
  } else {
#pragma unroll
    for (int i = 0; i < VPT; ++i) score[i] = sigmoid_score(score[i]);
  }

  if ((bugs & BUG_TOPK_NAN_ARGMAX) == 0u) {  // vLLM PR 39391: clamp right after scoring
    bool clamped = false;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (!isfinite(score[i])) {
        score[i] = 0.f;
        clamped = true;
      }
    }
    if (cov.on()) {
      const bool row_hit = (__ballot_sync(kFullMask, clamped) & group_mask) != 0u;
      cov.count(COV_GATING_CLAMP_HIT, valid && g == 0 && row_hit);
    }
  }

  float sel[VPT];  // the values the arg-max compares (masked as rounds go)
#pragma unroll
  for (int i = 0; i < VPT; ++i) sel[i] = bias != nullptr ? score[i] + bias[first_col + i] : score[i];

  const size_t out_base = static_cast<size_t>(row) * K;
  float total = 0.f;
  uint32_t ties = 0u;
  uint32_t nonfinite = 0u;
  for (int k = 0; k < K; ++k) {
    float best = sel[0];
    int best_idx = first_col;
    float best_score = score[0];
#pragma unroll
    for (int i = 1; i < VPT; ++i) {
      if (sel[i] > best) {
        best = sel[i];
        best_idx = first_col + i;
        best_score = score[i];
      }
    }
#pragma unroll
    for (int mask = LANES / 2; mask > 0; mask /= 2) {
      const float other = __shfl_xor_sync(kFullMask, best, mask, LANES);
      const int other_idx = __shfl_xor_sync(kFullMask, best_idx, mask, LANES);
      const float other_score = __shfl_xor_sync(kFullMask, best_score, mask, LANES);
      const bool tie = other == best && other_idx < best_idx;
      if (other > best || tie) {
        best = other;
        best_idx = other_idx;
        best_score = other_score;
      }
      if (tie && g < mask) ++ties;  // the lanes [0, mask) that feed lane 0 later
    }
    if (valid && g == 0) {
      topk_ids[out_base + k] = best_idx;
      topk_weights[out_base + k] = best_score;
      total += best_score;
      if (!isfinite(best)) ++nonfinite;
    }
    if (k + 1 < K) {
      // lane 0's winner is the round's; the lane owning it masks it
      const int winner = __shfl_sync(kFullMask, best_idx, 0, LANES);
#pragma unroll
      for (int i = 0; i < VPT; ++i) {
        if (first_col + i == winner) sel[i] = kMasked;
      }
    }
  }

  if (valid && g == 0 && renormalize) {
    const bool positive = total > 0.f;  // a NaN sum is not > 0: divided by 1
    const float denom = positive ? total : 1.f;
    for (int k = 0; k < K; ++k) topk_weights[out_base + k] = topk_weights[out_base + k] / denom;
    if (!positive) cov.add(COV_GATING_RENORM_ZERO_SUM);
  }
  if (valid) {
    cov.add(COV_GATING_TIE_BREAK, ties);
    cov.add(COV_GATING_NONFINITE_WINNER, nonfinite);
  }
  cov.flush();
}

template <typename T, int LANES, int VPT>
cudaError_t launch_warp(const void* logits, const float* bias, int T_rows, int K, int scoring,
                        bool renormalize, int32_t* topk_ids, float* topk_weights, uint32_t bugs,
                        uint32_t* coverage, cudaStream_t stream) {
  constexpr int kRowsPerCta = kWarpsPerCta * (kWarpSize / LANES);
  const dim3 grid((T_rows + kRowsPerCta - 1) / kRowsPerCta);
  const dim3 block(kWarpSize, kWarpsPerCta);
  topk_gating_warp<T, LANES, VPT><<<grid, block, 0, stream>>>(
      static_cast<const T*>(logits), bias, T_rows, K, scoring, renormalize, topk_ids,
      topk_weights, bugs, coverage);
  return launch_status();
}

// The expert counts geometry.WARP_EXPERTS specialises: (LANES, VPT) = (min(32, E), E / LANES).
template <typename T>
bool launch_warp_for(int E, const void* logits, const float* bias, int T_rows, int K,
                     int scoring, bool renormalize, int32_t* topk_ids, float* topk_weights,
                     uint32_t bugs, uint32_t* coverage, cudaStream_t stream, cudaError_t* err) {
#define MOE_WARP_CASE(E_, LANES_, VPT_)                                                       \
  case E_:                                                                                    \
    *err = launch_warp<T, LANES_, VPT_>(logits, bias, T_rows, K, scoring, renormalize,        \
                                        topk_ids, topk_weights, bugs, coverage, stream);      \
    return true;
  switch (E) {
    MOE_WARP_CASE(1, 1, 1)
    MOE_WARP_CASE(2, 2, 1)
    MOE_WARP_CASE(4, 4, 1)
    MOE_WARP_CASE(8, 8, 1)
    MOE_WARP_CASE(16, 16, 1)
    MOE_WARP_CASE(32, 32, 1)
    MOE_WARP_CASE(64, 32, 2)
    MOE_WARP_CASE(128, 32, 4)
    MOE_WARP_CASE(192, 32, 6)
    MOE_WARP_CASE(256, 32, 8)
    MOE_WARP_CASE(320, 32, 10)
    MOE_WARP_CASE(384, 32, 12)
    MOE_WARP_CASE(448, 32, 14)
    MOE_WARP_CASE(512, 32, 16)
    MOE_WARP_CASE(576, 32, 18)
    default:
      return false;
  }
#undef MOE_WARP_CASE
}

// ---- fallback path ---------------------------------------------------------------------------

// Block-wide reduction over the 256 threads (all must call); `op` is fmaxf or +.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, float* s_warp, Op op) {
  constexpr int kWarps = kFallbackThreads / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
#pragma unroll
  for (int mask = kWarpSize / 2; mask > 0; mask /= 2) {
    v = op(v, __shfl_xor_sync(kFullMask, v, mask));
  }
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  float r = s_warp[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) r = op(r, s_warp[w]);
  __syncthreads();  // s_warp may be reused by the next call
  return r;
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Models vLLM's moeSoftmax / moeSigmoid: one block per row, scores into the workspace.
template <typename T>
__global__ void __launch_bounds__(kFallbackThreads)
gating_scores(const T* __restrict__ logits, int E, int scoring, float* __restrict__ workspace,
              uint32_t bugs, uint32_t* coverage) {
  __shared__ float s_warp[kFallbackThreads / kWarpSize];
  MOE_BLOCK_COVERAGE(cov, coverage);
  cov.once(COV_GATING_FALLBACK_PATH);
  const int tid = static_cast<int>(threadIdx.x);
  const size_t base = static_cast<size_t>(blockIdx.x) * E;
  const T* src = logits + base;
  float* dst = workspace + base;
  const bool clamp = (bugs & BUG_TOPK_NAN_ARGMAX) == 0u;
  bool clamped = false;
  if (scoring == SCORING_SOFTMAX) {
    float mx = -INFINITY;
    for (int e = tid; e < E; e += kFallbackThreads) mx = fmaxf(mx, to_float<T>(src[e]));
    mx = block_reduce(mx, s_warp, MaxOp{});
    float sum = 0.f;
    for (int e = tid; e < E; e += kFallbackThreads) sum += expf(to_float<T>(src[e]) - mx);
    sum = block_reduce(sum, s_warp, SumOp{});
    const float inv = 1.f / sum;
    for (int e = tid; e < E; e += kFallbackThreads) {
      float s = expf(to_float<T>(src[e]) - mx) * inv;
      if (clamp && !isfinite(s)) {
        s = 0.f;
        clamped = true;
      }
      dst[e] = s;
    }
  } else {
    for (int e = tid; e < E; e += kFallbackThreads) {
      float s = sigmoid_score(to_float<T>(src[e]));
      if (clamp && !isfinite(s)) {
        s = 0.f;
        clamped = true;
      }
      dst[e] = s;
    }
  }
  if (cov.on() && clamp) {  // uniform condition: every thread reaches the barrier
    if (__syncthreads_or(clamped) && tid == 0) cov.add(COV_GATING_CLAMP_HIT);
  }
  cov.flush();
}

// Models vLLM's moeTopK: one block per row over the workspace scores.
__global__ void __launch_bounds__(kFallbackThreads)
gating_block_topk(const float* __restrict__ workspace, const float* __restrict__ bias, int E,
                  int K, bool renormalize, int32_t* __restrict__ topk_ids,
                  float* __restrict__ topk_weights, uint32_t* coverage) {
  __shared__ float s_val[kFallbackThreads];
  __shared__ int s_key[kFallbackThreads];
  constexpr int kChosenCache = 32;  // the first rounds' ids, also kept in shared memory
  __shared__ int s_chosen[kChosenCache];
  MOE_BLOCK_COVERAGE(cov, coverage);
  if (bias != nullptr) cov.once(COV_GATING_BIAS);
  const int tid = static_cast<int>(threadIdx.x);
  const float* scores = workspace + static_cast<size_t>(blockIdx.x) * E;
  int32_t* ids = topk_ids + static_cast<size_t>(blockIdx.x) * K;
  float* weights = topk_weights + static_cast<size_t>(blockIdx.x) * K;
  float total = 0.f;  // thread 0's
  uint32_t ties = 0u;
  for (int k = 0; k < K; ++k) {
    float best = -INFINITY;
    int best_key = 0;
    for (int e = tid; e < E; e += kFallbackThreads) {
      bool chosen = false;  // ids of earlier rounds (written by thread 0, then a barrier)
      for (int p = 0; p < k; ++p) chosen |= (p < kChosenCache ? s_chosen[p] : ids[p]) == e;
      if (chosen) continue;
      const float v = bias != nullptr ? scores[e] + bias[e] : scores[e];
      if (v > best || (v == best && e < best_key)) {
        best = v;
        best_key = e;
      }
    }
    s_val[tid] = best;
    s_key[tid] = best_key;
    __syncthreads();
    for (int stride = kFallbackThreads / 2; stride > 0; stride /= 2) {
      if (tid < stride) {
        const float other = s_val[tid + stride];
        const int other_key = s_key[tid + stride];
        const float mine = s_val[tid];
        const int mine_key = s_key[tid];
        const bool tie = other == mine && other_key < mine_key;
        if (other > mine || tie) {
          s_val[tid] = other;
          s_key[tid] = other_key;
        }
        if (tie) ++ties;
      }
      __syncthreads();
    }
    if (tid == 0) {
      const int key = s_key[0];
      const float w = scores[key];
      ids[k] = key;
      if (k < kChosenCache) s_chosen[k] = key;
      weights[k] = w;
      total += w;
      if (!isfinite(s_val[0])) cov.add(COV_GATING_NONFINITE_WINNER);
    }
    __syncthreads();  // ids[k], s_chosen[k] visible to every thread; s_val / s_key reusable
  }
  if (tid == 0 && renormalize) {
    const bool positive = total > 0.f;
    const float denom = positive ? total : 1.f;
    for (int k = 0; k < K; ++k) weights[k] = weights[k] / denom;
    if (!positive) cov.add(COV_GATING_RENORM_ZERO_SUM);
  }
  cov.add(COV_GATING_TIE_BREAK, ties);
  cov.flush();
}

}  // namespace

cudaError_t launch_gating(const void* logits, int dtype, const float* bias, int T, int E, int K,
                          int scoring, bool renormalize, int32_t* topk_ids, float* topk_weights,
                          float* workspace, uint32_t bugs, uint32_t* coverage,
                          cudaStream_t stream) {
  if (E < 1 || K < 1 || K > E || T < 0) return cudaErrorInvalidValue;
  if (scoring != SCORING_SOFTMAX && scoring != SCORING_SIGMOID) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;  // no rows: nothing to launch
  cudaError_t err = cudaErrorInvalidValue;
  bool warp = false;
  const bool known = dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    warp = launch_warp_for<Elem>(E, logits, bias, T, K, scoring, renormalize, topk_ids,
                                 topk_weights, bugs, coverage, stream, &err);
  });
  if (!known) return cudaErrorInvalidValue;
  if (warp) return err;
  if (workspace == nullptr) return cudaErrorInvalidValue;
  dispatch_dtype(dtype, [&](auto tag) {
    using Elem = typename decltype(tag)::type;
    gating_scores<Elem><<<T, kFallbackThreads, 0, stream>>>(
        static_cast<const Elem*>(logits), E, scoring, workspace, bugs, coverage);
  });
  err = launch_status();
  if (err != cudaSuccess) return err;
  gating_block_topk<<<T, kFallbackThreads, 0, stream>>>(workspace, bias, E, K, renormalize,
                                                        topk_ids, topk_weights, coverage);
  return launch_status();
}

}  // namespace moe_harness
