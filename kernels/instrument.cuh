// moe-harness device helpers shared by every kernel file: coverage counters, dtype loads,
// poison values. Device-only, header-only (everything inline), no PyTorch headers.
//
// API
// ---
// Coverage (slots: CoverageSlot in moe_harness.h; `coverage` may be nullptr = off). `coverage`
// points to COV_WORDS 64-bit flag words, each stored as two uint32 (low half first: slots
// 0-31, then 32-63); bit i of a lane's word = slot i was taken. Each thread keeps
// its own flag word in a register; at the end the block ORs them into one word (a warp
// reduction, one shared atomicOr per warp) and ORs that into coverage[block % COV_WORDS] with
// ONE global atomicOr per block. The host counts, per slot, the words with its bit: how many
// of the COV_WORDS block lanes took the branch (exact up to COV_WORDS blocks; launches of one
// stage OR together). The counters are zeroed by the host (graph mode: inside the graph).
//
//   MOE_BLOCK_COVERAGE(cov, coverage);   // in a kernel body, every thread: declares the block's
//                                        // shared word (thread 0 zeroes it; no barrier here)
//   cov.add(COV_X, n);                   // any thread, any time: slot taken if n != 0
//                                        // (a register OR, no atomic)
//   cov.count(COV_X, pred);              // any thread: slot taken if pred (a register OR)
//   cov.once(COV_X);                     // slot taken, from block (0,0,0) thread 0 only (e.g.
//                                        // "this path was launched")
//   cov.flush();                         // every thread, at the very end of the kernel: warp
//                                        // OR-reduce, two __syncthreads (none for a one-warp
//                                        // block), one global atomicOr per block
//
//   Every thread of the block must reach MOE_BLOCK_COVERAGE and flush() (no early `return`
//   before flush: guard the work instead). With coverage == nullptr all of it compiles to
//   uniform branches that skip the shared and global work (the pointer is kernel-uniform, so
//   the conditional __syncthreads are legal). Built with -DMOE_HARNESS_NO_COVERAGE
//   (kCoverageCompiled false), on() is constant false: no shared word, no branches.
//
// Dtype loads: load_float<T>(ptr, i) / to_float<T>(v) for T in {float, __half, __nv_bfloat16};
//   host side, DTYPE_* -> element type via dispatch_dtype(dtype, [&](auto tag) {...}).
// Poison: poison_f32() (the float with bits POISON_F32_BITS), POISON_I32 from moe_harness.h.
// Launch result: launch_status() = cudaGetLastError() after a launch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "moe_harness.h"

namespace moe_harness {

// ---- coverage ------------------------------------------------------------------------------

class BlockCoverage {
 public:
  __device__ BlockCoverage(uint32_t* global, unsigned long long* shared)
      : global_(kCoverageCompiled ? global : nullptr), s_(shared), flags_(0ull) {
    // made visible to every warp by flush()'s first barrier
    if (on() && linear_tid() == 0) *s_ = 0ull;
  }

  __device__ __forceinline__ bool on() const { return kCoverageCompiled && global_ != nullptr; }

  __device__ __forceinline__ void add(int slot, uint32_t n = 1u) {
    if (on()) flags_ |= static_cast<unsigned long long>(n != 0u) << slot;
  }

  __device__ __forceinline__ void count(int slot, bool pred) {
    if (on()) flags_ |= static_cast<unsigned long long>(pred) << slot;
  }

  __device__ __forceinline__ void once(int slot) {
    if (on() && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 &&
        linear_tid() == 0) {
      flags_ |= 1ull << slot;
    }
  }

  __device__ __forceinline__ void flush() {
    if (!on()) return;
    const int tid = linear_tid();
    const int nthreads = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
    // the lanes converged here OR their words (a group that arrives apart ORs its own)
    const unsigned active = __activemask();
    const uint32_t lo = static_cast<uint32_t>(flags_);
    const uint32_t hi = static_cast<uint32_t>(flags_ >> 32);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    const unsigned long long warp_flags =
        (static_cast<unsigned long long>(__reduce_or_sync(active, hi)) << 32) |
        __reduce_or_sync(active, lo);
#else
    uint32_t warp_lo = lo, warp_hi = hi;
    for (int lane = 0; lane < 32; ++lane) {
      if ((active >> lane) & 1u) {
        warp_lo |= __shfl_sync(active, lo, lane);
        warp_hi |= __shfl_sync(active, hi, lane);
      }
    }
    const unsigned long long warp_flags = (static_cast<unsigned long long>(warp_hi) << 32) | warp_lo;
#endif
    const bool leader = (tid & 31) == __ffs(active) - 1;
    if (nthreads <= 32) {  // one warp (uniform per block): straight to global
      if (leader) publish(warp_flags);
      return;
    }
    __syncthreads();  // thread 0's zero is visible
    if (leader && warp_flags != 0ull) atomicOr(s_, warp_flags);
    __syncthreads();
    if (tid == 0) publish(*s_);
  }

 private:
  __device__ __forceinline__ static int linear_tid() {
    return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  }

  __device__ __forceinline__ static int block_lane() {
    return static_cast<int>((blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)) %
                            static_cast<unsigned>(COV_WORDS));
  }

  // the block's word into its lane: one global atomicOr per non-empty half (slots 32-63 are
  // the rarer paths: most blocks send one)
  __device__ __forceinline__ void publish(unsigned long long flags) const {
    uint32_t* lane = &global_[COV_HALVES * block_lane()];
    if (static_cast<uint32_t>(flags) != 0u) atomicOr(lane, static_cast<uint32_t>(flags));
    if ((flags >> 32) != 0ull) atomicOr(lane + 1, static_cast<uint32_t>(flags >> 32));
  }

  uint32_t* global_;
  unsigned long long* s_;
  unsigned long long flags_;
};

// Declares `name`, a BlockCoverage over a fresh __shared__ flag word, in a kernel body (no
// shared word, and a coverage that is always off, in a MOE_HARNESS_NO_COVERAGE build).
#ifdef MOE_HARNESS_NO_COVERAGE
#define MOE_BLOCK_COVERAGE(name, coverage_ptr) \
  ::moe_harness::BlockCoverage name((coverage_ptr), nullptr)
#else
#define MOE_BLOCK_COVERAGE(name, coverage_ptr)  \
  __shared__ unsigned long long name##_word_;    \
  ::moe_harness::BlockCoverage name((coverage_ptr), &name##_word_)
#endif

// ---- dtype loads ---------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ float load_float(const T* p, size_t i) {
  return to_float<T>(p[i]);
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Host side: call f(TypeTag<T>{}) with T the element type of `dtype` (in f:
// `using T = typename decltype(tag)::type;`); false for an unknown dtype.
template <typename F>
inline bool dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case DTYPE_FP32: f(TypeTag<float>{}); return true;
    case DTYPE_FP16: f(TypeTag<__half>{}); return true;
    case DTYPE_BF16: f(TypeTag<__nv_bfloat16>{}); return true;
    default: return false;
  }
}

// ---- poison, launch status ------------------------------------------------------------------

__device__ __forceinline__ float poison_f32() {
  return __uint_as_float(POISON_F32_BITS);
}

inline cudaError_t launch_status() { return cudaGetLastError(); }

}  // namespace moe_harness
