// moe-harness device helpers shared by every kernel file: coverage counters, dtype loads,
// poison values. Device-only, header-only (everything inline), no PyTorch headers.
//
// API
// ---
// Coverage (slots: CoverageSlot in moe_harness.h; `coverage` may be nullptr = off):
//
//   MOE_BLOCK_COVERAGE(cov, coverage);   // in a kernel body, every thread: declares the block's
//                                        // shared counters and zeroes them (one __syncthreads
//                                        // when coverage is on, none when off)
//   cov.add(COV_X, n);                   // any thread, any time: slot += n (shared atomic)
//   cov.count(COV_X, pred);              // lanes of a warp together: slot += #lanes with pred
//                                        // (ballot + one shared atomic per warp)
//   cov.once(COV_X);                     // slot += 1 from block (0,0,0) thread 0 only (e.g.
//                                        // "this path was launched": counts launches)
//   cov.flush();                         // every thread, at the very end of the kernel: one
//                                        // __syncthreads, then one global atomicAdd per touched
//                                        // slot of this block
//
//   Every thread of the block must reach MOE_BLOCK_COVERAGE and flush() (no early `return`
//   before flush: guard the work instead). With coverage == nullptr all of it compiles to
//   uniform branches that skip the shared and global work (the pointer is kernel-uniform, so
//   the conditional __syncthreads are legal). Built with -DMOE_HARNESS_NO_COVERAGE
//   (kCoverageCompiled false), on() is constant false: no shared array, no branches.
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
  __device__ BlockCoverage(uint32_t* global, uint32_t* shared)
      : global_(kCoverageCompiled ? global : nullptr), s_(shared) {
    if (on()) {
      const int tid = linear_tid();
      const int nthreads = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
      for (int i = tid; i < COV_NUM_SLOTS; i += nthreads) s_[i] = 0u;
      __syncthreads();
    }
  }

  __device__ __forceinline__ bool on() const { return kCoverageCompiled && global_ != nullptr; }

  __device__ __forceinline__ void add(int slot, uint32_t n = 1u) {
    if (on() && n != 0u) atomicAdd(&s_[slot], n);
  }

  // Warp-aggregated count over the lanes converged at this call.
  __device__ __forceinline__ void count(int slot, bool pred) {
    if (!on()) return;
    const unsigned mask = __activemask();
    const unsigned hits = __ballot_sync(mask, pred);
    const int leader = __ffs(mask) - 1;
    if (hits != 0u && (linear_tid() & 31) == leader) {
      atomicAdd(&s_[slot], static_cast<uint32_t>(__popc(hits)));
    }
  }

  __device__ __forceinline__ void once(int slot) {
    if (on() && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 &&
        linear_tid() == 0) {
      atomicAdd(&s_[slot], 1u);
    }
  }

  __device__ __forceinline__ void flush() {
    if (!on()) return;
    __syncthreads();
    const int tid = linear_tid();
    const int nthreads = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
    for (int i = tid; i < COV_NUM_SLOTS; i += nthreads) {
      const uint32_t v = s_[i];
      if (v != 0u) atomicAdd(&global_[i], v);
    }
  }

 private:
  __device__ __forceinline__ static int linear_tid() {
    return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  }

  uint32_t* global_;
  uint32_t* s_;
};

// Declares `name`, a BlockCoverage over a fresh __shared__ counter array, in a kernel body
// (no array, and a coverage that is always off, in a MOE_HARNESS_NO_COVERAGE build).
#ifdef MOE_HARNESS_NO_COVERAGE
#define MOE_BLOCK_COVERAGE(name, coverage_ptr) \
  ::moe_harness::BlockCoverage name((coverage_ptr), nullptr)
#else
#define MOE_BLOCK_COVERAGE(name, coverage_ptr)                          \
  __shared__ uint32_t name##_slots_[::moe_harness::COV_NUM_SLOTS];      \
  ::moe_harness::BlockCoverage name((coverage_ptr), name##_slots_)
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
