// The thin torch binding of the kernel chain: the only C++ that includes torch.
//
// Every function takes device tensors (inputs and pre-allocated outputs: the Python side owns
// allocation, poison and redzones), checks their device, dtype, shape and contiguity, calls
// the launcher of moe_harness.h on the current CUDA stream and raises on a launch error. No
// synchronisation here: the caller synchronises and turns a sticky error into a finding.
// Built by harness/backends/cuda_build.py (torch.utils.cpp_extension).
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <optional>
#include <string>
#include <vector>

#include "moe_harness.h"

namespace moe_harness {
// Test-only launcher (redzone_selftest.cu): writes out[0..n], one element past the end.
cudaError_t launch_redzone_selftest(float* out, int64_t n, cudaStream_t stream);
}  // namespace moe_harness

namespace {

using at::Tensor;
namespace mh = moe_harness;

void check_tensor(const Tensor& t, const char* name, at::ScalarType dtype,
                  const c10::Device& device) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == device, name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", c10::toString(dtype), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_shape(const Tensor& t, const char* name, std::vector<int64_t> shape) {
  TORCH_CHECK(t.sizes() == c10::IntArrayRef(shape), name, " has shape ", t.sizes(),
              ", expected ", c10::IntArrayRef(shape));
}

void check_numel(const Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " elements, expected ", numel);
}

int dtype_code(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return mh::DTYPE_FP32;
    case at::kHalf: return mh::DTYPE_FP16;
    case at::kBFloat16: return mh::DTYPE_BF16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ",
                         t.scalar_type());
  }
  return -1;
}

int to_int(int64_t v, const char* name) {
  TORCH_CHECK(v >= 0 && v <= INT32_MAX, name, " = ", v, " does not fit the kernels' int");
  return static_cast<int>(v);
}

template <typename T>
T* ptr(const Tensor& t) {
  return t.numel() == 0 ? nullptr : static_cast<T*>(t.data_ptr());
}

uint32_t* coverage_ptr(const std::optional<Tensor>& coverage, const c10::Device& device) {
  if (!coverage.has_value()) return nullptr;
  check_tensor(*coverage, "coverage", at::kInt, device);
  check_numel(*coverage, "coverage", mh::COV_BUFFER_WORDS);
  return static_cast<uint32_t*>(coverage->data_ptr());  // int32 storage, uint32 flag words
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void gating(const Tensor& logits, const std::optional<Tensor>& bias, int64_t topk,
            int64_t scoring, bool renormalize, const Tensor& topk_ids, const Tensor& topk_weights,
            const std::optional<Tensor>& workspace, int64_t bugs,
            const std::optional<Tensor>& coverage) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto dev = logits.device();
  const int dtype = dtype_code(logits, "logits");
  check_tensor(logits, "logits", logits.scalar_type(), dev);
  TORCH_CHECK(logits.dim() == 2, "logits must be [T, E]");
  const int64_t T = logits.size(0), E = logits.size(1);
  if (bias.has_value()) {
    check_tensor(*bias, "bias", at::kFloat, dev);
    check_shape(*bias, "bias", {E});
  }
  check_tensor(topk_ids, "topk_ids", at::kInt, dev);
  check_shape(topk_ids, "topk_ids", {T, topk});
  check_tensor(topk_weights, "topk_weights", at::kFloat, dev);
  check_shape(topk_weights, "topk_weights", {T, topk});
  float* ws = nullptr;
  if (workspace.has_value()) {
    check_tensor(*workspace, "workspace", at::kFloat, dev);
    check_shape(*workspace, "workspace", {T, E});
    ws = ptr<float>(*workspace);
  }
  check_launch(mh::launch_gating(ptr<const void>(logits), dtype,
                                 bias.has_value() ? ptr<const float>(*bias) : nullptr,
                                 to_int(T, "T"), to_int(E, "E"), to_int(topk, "topk"),
                                 static_cast<int>(scoring), renormalize, ptr<int32_t>(topk_ids),
                                 ptr<float>(topk_weights), ws, static_cast<uint32_t>(bugs),
                                 coverage_ptr(coverage, dev), stream()),
               "gating");
}

void a2a_sanitize(const Tensor& recv_topk_ids, const Tensor& recv_counters, int64_t bugs,
                  const std::optional<Tensor>& coverage) {
  const c10::cuda::CUDAGuard guard(recv_topk_ids.device());
  const auto dev = recv_topk_ids.device();
  check_tensor(recv_topk_ids, "recv_topk_ids", at::kInt, dev);
  TORCH_CHECK(recv_topk_ids.dim() == 4, "recv_topk_ids must be [ep, ep, M, K]");
  const int64_t ep = recv_topk_ids.size(0), M = recv_topk_ids.size(2);
  const int64_t K = recv_topk_ids.size(3);
  check_shape(recv_topk_ids, "recv_topk_ids", {ep, ep, M, K});
  check_tensor(recv_counters, "recv_counters", at::kInt, dev);
  check_shape(recv_counters, "recv_counters", {ep, ep});
  check_launch(mh::launch_a2a_sanitize(ptr<int32_t>(recv_topk_ids),
                                       ptr<const int32_t>(recv_counters), to_int(ep, "ep"),
                                       to_int(M, "M"), to_int(K, "K"),
                                       static_cast<uint32_t>(bugs), coverage_ptr(coverage, dev),
                                       stream()),
               "a2a_sanitize");
}

int64_t sort_align_workspace_elems(int64_t N, int64_t E_local) {
  return static_cast<int64_t>(
      mh::sort_align_workspace_elems(to_int(N, "N"), to_int(E_local, "E_local")));
}

void sort_align(const Tensor& topk_ids, const Tensor& expert_map, int64_t num_local_experts,
                int64_t block_size, const Tensor& expert_counts, const Tensor& expert_offsets,
                const Tensor& aligned_offsets, const Tensor& permuted_row,
                const Tensor& sorted_token_ids, const Tensor& expert_ids,
                const Tensor& num_tokens_post_pad, const Tensor& workspace, int64_t bugs,
                const std::optional<Tensor>& coverage) {
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const auto dev = topk_ids.device();
  check_tensor(topk_ids, "topk_ids", at::kInt, dev);
  TORCH_CHECK(topk_ids.dim() == 2, "topk_ids must be [N, K]");
  const int64_t N = topk_ids.size(0), K = topk_ids.size(1), E_l = num_local_experts;
  check_tensor(expert_map, "expert_map", at::kInt, dev);
  TORCH_CHECK(expert_map.dim() == 1, "expert_map must be [E]");
  TORCH_CHECK(block_size >= 1, "block_size must be >= 1");
  const int64_t padded = N * K + E_l * (block_size - 1);
  const int64_t m_blocks = (padded + block_size - 1) / block_size;
  const std::pair<const Tensor*, const char*> outs[] = {
      {&expert_counts, "expert_counts"}, {&expert_offsets, "expert_offsets"},
      {&aligned_offsets, "aligned_offsets"}, {&permuted_row, "permuted_row"},
      {&sorted_token_ids, "sorted_token_ids"}, {&expert_ids, "expert_ids"},
      {&num_tokens_post_pad, "num_tokens_post_pad"}, {&workspace, "workspace"}};
  for (const auto& [t, name] : outs) check_tensor(*t, name, at::kInt, dev);
  check_numel(expert_counts, "expert_counts", E_l);
  check_numel(expert_offsets, "expert_offsets", E_l + 1);
  check_numel(aligned_offsets, "aligned_offsets", E_l + 1);
  check_numel(permuted_row, "permuted_row", N * K);
  check_numel(sorted_token_ids, "sorted_token_ids", padded);
  check_numel(expert_ids, "expert_ids", m_blocks);
  check_numel(num_tokens_post_pad, "num_tokens_post_pad", 1);
  check_numel(workspace, "workspace",
              static_cast<int64_t>(mh::sort_align_workspace_elems(to_int(N, "N"),
                                                                   to_int(E_l, "E_local"))));
  check_launch(
      mh::launch_sort_align(ptr<const int32_t>(topk_ids), ptr<const int32_t>(expert_map),
                            to_int(expert_map.numel(), "E"), to_int(N, "N"), to_int(K, "K"),
                            to_int(E_l, "E_local"), to_int(block_size, "block_size"),
                            ptr<int32_t>(expert_counts), ptr<int32_t>(expert_offsets),
                            ptr<int32_t>(aligned_offsets), ptr<int32_t>(permuted_row),
                            ptr<int32_t>(sorted_token_ids), ptr<int32_t>(expert_ids),
                            ptr<int32_t>(num_tokens_post_pad), ptr<int32_t>(workspace),
                            static_cast<uint32_t>(bugs), coverage_ptr(coverage, dev), stream()),
      "sort_align");
}

void experts(const Tensor& hidden, const Tensor& expert_weights, const Tensor& sorted_token_ids,
             const Tensor& expert_ids, const Tensor& num_tokens_post_pad, int64_t topk,
             int64_t block_size, int64_t block_first, int64_t block_last,
             const Tensor& expert_out, int64_t bugs, const std::optional<Tensor>& coverage) {
  const c10::cuda::CUDAGuard guard(hidden.device());
  const auto dev = hidden.device();
  const int dtype = dtype_code(hidden, "hidden_states");
  check_tensor(hidden, "hidden_states", hidden.scalar_type(), dev);
  TORCH_CHECK(hidden.dim() == 2, "hidden_states must be [N, H]");
  const int64_t N = hidden.size(0), H = hidden.size(1);
  check_tensor(expert_weights, "expert_weights", at::kFloat, dev);
  TORCH_CHECK(expert_weights.dim() == 3, "expert_weights must be [E_l, H, H]");
  const int64_t E_l = expert_weights.size(0);
  check_shape(expert_weights, "expert_weights", {E_l, H, H});
  TORCH_CHECK(topk >= 1 && block_size >= 1, "topk and block_size must be >= 1");
  const int64_t padded = N * topk + E_l * (block_size - 1);
  const int64_t m_blocks = (padded + block_size - 1) / block_size;
  check_tensor(sorted_token_ids, "sorted_token_ids", at::kInt, dev);
  TORCH_CHECK(sorted_token_ids.dim() == 1, "sorted_token_ids must be 1-D");
  const int64_t P = sorted_token_ids.numel();
  check_tensor(expert_ids, "expert_ids", at::kInt, dev);
  check_numel(expert_ids, "expert_ids", m_blocks);
  check_tensor(num_tokens_post_pad, "num_tokens_post_pad", at::kInt, dev);
  check_numel(num_tokens_post_pad, "num_tokens_post_pad", 1);
  check_tensor(expert_out, "expert_out", at::kFloat, dev);
  check_shape(expert_out, "expert_out", {P, H});
  TORCH_CHECK(0 <= block_first && block_first <= block_last && block_last <= m_blocks,
              "m-block range [", block_first, ", ", block_last, ") outside [0, ", m_blocks, "]");
  check_launch(mh::launch_experts(ptr<const void>(hidden), dtype, ptr<const float>(expert_weights),
                                  to_int(N, "N"), to_int(H, "H"), to_int(E_l, "E_l"),
                                  ptr<const int32_t>(sorted_token_ids), to_int(P, "P"),
                                  ptr<const int32_t>(expert_ids),
                                  ptr<const int32_t>(num_tokens_post_pad), to_int(topk, "topk"),
                                  to_int(block_size, "block_size"),
                                  to_int(block_first, "block_first"),
                                  to_int(block_last, "block_last"), ptr<float>(expert_out),
                                  static_cast<uint32_t>(bugs), coverage_ptr(coverage, dev),
                                  stream()),
               "experts");
}

void finalize(const Tensor& expert_out, const Tensor& permuted_row, const Tensor& topk_weights,
              const Tensor& out, int64_t bugs, const std::optional<Tensor>& coverage) {
  const c10::cuda::CUDAGuard guard(expert_out.device());
  const auto dev = expert_out.device();
  check_tensor(expert_out, "expert_out", at::kFloat, dev);
  TORCH_CHECK(expert_out.dim() == 2, "expert_out must be [P, H]");
  const int64_t P = expert_out.size(0), H = expert_out.size(1);
  check_tensor(topk_weights, "topk_weights", at::kFloat, dev);
  TORCH_CHECK(topk_weights.dim() == 2, "topk_weights must be [N, K]");
  const int64_t N = topk_weights.size(0), K = topk_weights.size(1);
  check_tensor(permuted_row, "permuted_row", at::kInt, dev);
  check_numel(permuted_row, "permuted_row", N * K);
  check_tensor(out, "out", at::kFloat, dev);
  check_shape(out, "out", {N, H});
  check_launch(mh::launch_finalize(ptr<const float>(expert_out), to_int(P, "P"), to_int(H, "H"),
                                   ptr<const int32_t>(permuted_row),
                                   ptr<const float>(topk_weights), to_int(N, "N"),
                                   to_int(K, "K"), ptr<float>(out), static_cast<uint32_t>(bugs),
                                   coverage_ptr(coverage, dev), stream()),
               "finalize");
}

void lora_align(const Tensor& topk_ids, const Tensor& token_lora_mapping, const Tensor& lora_ids,
                const Tensor& adapter_enabled, int64_t max_loras, int64_t num_experts,
                int64_t block_size, int64_t num_slots, const Tensor& sorted_token_ids,
                const Tensor& expert_ids, const Tensor& num_tokens_post_pad,
                const Tensor& cumsum, int64_t bugs, const std::optional<Tensor>& coverage) {
  const c10::cuda::CUDAGuard guard(topk_ids.device());
  const auto dev = topk_ids.device();
  check_tensor(topk_ids, "topk_ids", at::kInt, dev);
  TORCH_CHECK(topk_ids.dim() == 2, "topk_ids must be [T, K]");
  const int64_t T = topk_ids.size(0), K = topk_ids.size(1), L = max_loras;
  const int64_t E = num_experts;
  check_tensor(token_lora_mapping, "token_lora_mapping", at::kInt, dev);
  check_shape(token_lora_mapping, "token_lora_mapping", {T});
  check_tensor(lora_ids, "lora_ids", at::kInt, dev);
  check_shape(lora_ids, "lora_ids", {L + 1});
  check_tensor(adapter_enabled, "adapter_enabled", at::kInt, dev);
  check_shape(adapter_enabled, "adapter_enabled", {L + 1});
  TORCH_CHECK(0 <= num_slots && num_slots <= L + 1, "num_slots = ", num_slots,
              " outside 0..max_loras + 1");
  TORCH_CHECK(block_size >= 1 && E >= 1, "block_size and num_experts must be >= 1");
  const int64_t P = T * K + E * (block_size - 1);
  const int64_t B = (P + block_size - 1) / block_size;
  check_tensor(sorted_token_ids, "sorted_token_ids", at::kInt, dev);
  check_shape(sorted_token_ids, "sorted_token_ids", {L, P});
  check_tensor(expert_ids, "expert_ids", at::kInt, dev);
  check_shape(expert_ids, "expert_ids", {L, B});
  check_tensor(num_tokens_post_pad, "num_tokens_post_pad", at::kInt, dev);
  check_shape(num_tokens_post_pad, "num_tokens_post_pad", {L});
  check_tensor(cumsum, "cumsum", at::kInt, dev);
  check_shape(cumsum, "cumsum", {L, E + 1});
  check_launch(mh::launch_lora_align(
                   ptr<const int32_t>(topk_ids), to_int(T, "T"), to_int(K, "K"),
                   ptr<const int32_t>(token_lora_mapping), ptr<const int32_t>(lora_ids),
                   ptr<const int32_t>(adapter_enabled), to_int(L, "max_loras"),
                   to_int(E, "num_experts"), to_int(block_size, "block_size"),
                   to_int(num_slots, "num_slots"), ptr<int32_t>(sorted_token_ids),
                   to_int(P, "P"), ptr<int32_t>(expert_ids), to_int(B, "B"),
                   ptr<int32_t>(num_tokens_post_pad), ptr<int32_t>(cumsum),
                   static_cast<uint32_t>(bugs), coverage_ptr(coverage, dev), stream()),
               "lora_align");
}

std::vector<std::string> coverage_slot_names() {
  return {
#define MOE_COV_NAME(name) #name,
      MOE_COVERAGE_SLOTS(MOE_COV_NAME)
#undef MOE_COV_NAME
  };
}

void redzone_selftest(const Tensor& out) {
  const c10::cuda::CUDAGuard guard(out.device());
  check_tensor(out, "out", at::kFloat, out.device());
  check_launch(mh::launch_redzone_selftest(static_cast<float*>(out.data_ptr()), out.numel(),
                                           stream()),
               "redzone_selftest");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe-harness CUDA kernel chain (see kernels/moe_harness.h)";
  m.def("gating", &gating, "top-k gating (warp or fallback path)");
  m.def("a2a_sanitize", &a2a_sanitize, "A2A receive-buffer sanitize, in place");
  m.def("sort_align_workspace_elems", &sort_align_workspace_elems,
        "int32 elements of the sort_align workspace");
  m.def("sort_align", &sort_align, "sort/align (single-block or three-step path)");
  m.def("experts", &experts, "experts grouped linear over m-blocks [block_first, block_last)");
  m.def("finalize", &finalize, "unpermute + weighted reduce");
  m.def("lora_align", &lora_align, "LoRA align (both kernels) over num_slots blocks");
  m.def("coverage_slot_names", &coverage_slot_names, "names of the device coverage slots");
  m.attr("num_coverage_slots") = static_cast<int>(mh::COV_NUM_SLOTS);
  m.attr("coverage_words") = static_cast<int>(mh::COV_BUFFER_WORDS);  // uint32 words of a buffer
  m.attr("coverage_compiled") = mh::kCoverageCompiled;  // false: -DMOE_HARNESS_NO_COVERAGE
  m.def("redzone_selftest", &redzone_selftest,
        "test only: a kernel writing out[0..numel], one element past the end");
}
