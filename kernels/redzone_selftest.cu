// Test only: a kernel that writes one element past the end of its output, so the tests can
// prove the cuda backend's redzone check catches an out-of-bounds write without a sanitizer.
// Called by binding.cpp `redzone_selftest`; not part of the chain.
#include <cstdint>

#include <cuda_runtime.h>

namespace moe_harness {
namespace {

__global__ void write_one_past_end(float* out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i <= n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<float>(i);  // i == n is the deliberate out-of-bounds write
  }
}

}  // namespace

cudaError_t launch_redzone_selftest(float* out, int64_t n, cudaStream_t stream) {
  write_one_past_end<<<1, 128, 0, stream>>>(out, n);
  return cudaGetLastError();
}

}  // namespace moe_harness
