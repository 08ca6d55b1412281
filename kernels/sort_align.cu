// Stage 3, sort/align: group the (row, slot) pairs of one rank by local expert, both ways,
// block-aligned. CPU model (the spec): harness/chain/sort_align.py; launch geometry:
// geometry.sort_launches.
//
// Expanded row x = n*K + k. A global id maps to a local expert through expert_map with a range
// guard first: ids of -1 or outside [0, E) are skipped (never used as an index), so are ids whose
// map entry is outside [0, E_l) (-1 = not owned). Outputs (callers pre-fill them with poison):
//   expert_counts [E_l], expert_offsets [E_l + 1] (exclusive prefix), aligned_offsets [E_l + 1]
//   (each expert padded to a multiple of block_size; last = num_tokens_post_pad),
//   permuted_row [N*K] (x -> aligned position, -1 where skipped), sorted_token_ids
//   [P = N*K + E_l*(block_size-1)] (aligned position -> x, sentinel N*K everywhere else),
//   expert_ids [ceil(P / block_size)] (expert of each block of positions, -1 past the padded
//   total), num_tokens_post_pad [1].
// Within an expert, pairs are ordered by x (stable) on both paths; no atomics decide an order.
//
// Paths:
// * N <= 256: sort_single_block (models vLLM's moe_align_block_size single-CTA kernel): one
//   block of 256 threads counts into shared memory, scans, writes the offsets and expert_ids,
//   then scatters the pairs chunk by chunk (256 pairs at a time, the 8 warps in order, ranks
//   inside a warp by __match_any_sync), so equal experts keep x order.
// * N > 256: the three-step path of FlashInfer / TRT-LLM's routing (cutlass MoE
//   `blockExpertPrefixSumKernel`, `globalExpertPrefixSumKernel`, `mergeExpertPrefixSumKernel`):
//   1. sort_block_expert_prefix, grid (ceil(N/256), max(E_l, 1)): block (b, e) scans over its
//      256 rows the multiplicity of e in each row (block-local exclusive scan), writes each
//      matching slot's block-local rank into permuted_row (encoded as -2 - rank, see below) and
//      the block's count into workspace[e * blocks + b]; all blocks also fill sorted_token_ids
//      with the sentinel;
//   2. sort_global_prefix, one block: per-expert totals, counts / offsets / aligned offsets,
//      num_tokens_post_pad, then per expert an exclusive scan over the blocks turning
//      workspace[e * blocks + b] into the aligned position where block b's run of e starts;
//   3. sort_merge, grid (ceil(N/256)): thread n resolves its row's K slots: skipped -> -1;
//      positioned -> aligned position = workspace[e * blocks + b] + rank (both outputs); it
//      also writes expert_ids.
//   BUG_SORT_DUPLICATE_BREAK (three-step only, as in the CPU model): the per-row search of step
//   1 `break`s at the first slot matching e, so a duplicate slot is neither counted nor ranked;
//   the merge finds no rank for it and leaves its permuted_row entry as it was (the caller's
//   poison), and no position of sorted_token_ids names it.
//   The encoding -2 - rank (rank < 256*K) keeps "ranked by step 1" apart from anything the
//   entry held before: poison (a word above 0x7FC10000), -1, positions >= 0.
//
// Workspace: sort_align_workspace_elems(N, E_l) int32 = E_l * ceil(N / 256) on the three-step
// path, 0 on the single-block path.
//
// Coverage: SORT_SINGLE_BLOCK / SORT_THREE_STEP (once per launch), SORT_SKIP_INVALID (pairs
// with id -1 or outside [0, E)), SORT_SKIP_NOT_OWNED (pairs whose map entry is outside
// [0, E_l)), SORT_DUPLICATE_SEEN (valid pairs whose row has an earlier slot with the same local
// expert), SORT_DUPLICATE_DROPPED (pairs left unranked by the break), SORT_EMPTY_EXPERT (local
// experts with no pair).
#include "instrument.cuh"
#include "moe_harness.h"

namespace moe_harness {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kSortThreads = 256;  // geometry.SORT_THREADS
constexpr int kSortWarps = kSortThreads / kWarpSize;
constexpr int kSingleBlockMaxRows = 256;  // geometry.SORT_SINGLE_BLOCK_MAX_ROWS

constexpr int kSkipInvalid = -1;   // id -1 or outside [0, E)
constexpr int kSkipNotOwned = -2;  // map entry outside [0, E_l)

// Local expert of a global id, or kSkipInvalid / kSkipNotOwned. The range guard comes before
// expert_map is dereferenced.
__device__ __forceinline__ int local_expert(int32_t id, const int32_t* __restrict__ expert_map,
                                            int E, int E_local) {
  if (id < 0 || id >= E) return kSkipInvalid;
  const int32_t m = expert_map[id];
  return (m >= 0 && m < E_local) ? m : kSkipNotOwned;
}

__device__ __forceinline__ int32_t encode_rank(int rank) { return -2 - rank; }
__device__ __forceinline__ bool is_encoded_rank(int32_t v, int max_rank) {
  return v <= -2 && v > -2 - max_rank;
}
__device__ __forceinline__ int decode_rank(int32_t v) { return -2 - v; }

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % kWarpSize; }

// Exclusive scan of one int per thread over the 256 threads (all must call); `*total` gets
// the sum. s_warp: kSortWarps ints of shared memory.
__device__ __forceinline__ int block_exclusive_scan(int v, int* total, int* s_warp) {
  const int lane = lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  int incl = v;
#pragma unroll
  for (int d = 1; d < kWarpSize; d *= 2) {
    const int t = __shfl_up_sync(kFullMask, incl, d);
    if (lane >= d) incl += t;
  }
  if (lane == kWarpSize - 1) s_warp[warp] = incl;
  __syncthreads();
  int before = 0;
  int sum = 0;
#pragma unroll
  for (int w = 0; w < kSortWarps; ++w) {
    const int s = s_warp[w];
    if (w < warp) before += s;
    sum += s;
  }
  __syncthreads();  // s_warp free for the next scan
  *total = sum;
  return before + incl - v;
}

__device__ __forceinline__ int padded_count(int count, int block_size) {
  return (count + block_size - 1) / block_size * block_size;
}

// Counts -> expert_counts / expert_offsets / aligned_offsets (global), and the aligned offsets
// into `s_aligned` [E_local + 1] when given; returns num_tokens_post_pad. `count_of(e)` gives
// expert e's count. All threads must call. Each thread owns a chunk of consecutive experts.
template <typename CountOf>
__device__ int scan_expert_counts(CountOf count_of, int E_local, int block_size,
                                  int32_t* expert_counts, int32_t* expert_offsets,
                                  int32_t* aligned_offsets, int* s_aligned, int* s_warp,
                                  BlockCoverage& cov) {
  const int tid = static_cast<int>(threadIdx.x);
  const int chunk = (E_local + kSortThreads - 1) / kSortThreads;
  const int lo = min(tid * chunk, E_local);
  const int hi = min(lo + chunk, E_local);
  int sum_c = 0;
  int sum_p = 0;
  for (int e = lo; e < hi; ++e) {
    const int c = count_of(e);
    sum_c += c;
    sum_p += padded_count(c, block_size);
  }
  int total_c = 0;
  int total_p = 0;
  int run_c = block_exclusive_scan(sum_c, &total_c, s_warp);
  int run_p = block_exclusive_scan(sum_p, &total_p, s_warp);
  int empty = 0;
  for (int e = lo; e < hi; ++e) {
    const int c = count_of(e);
    expert_counts[e] = c;
    expert_offsets[e] = run_c;
    aligned_offsets[e] = run_p;
    if (s_aligned != nullptr) s_aligned[e] = run_p;
    run_c += c;
    run_p += padded_count(c, block_size);
    empty += c == 0;
  }
  cov.add(COV_SORT_EMPTY_EXPERT, static_cast<uint32_t>(empty));
  if (tid == 0) {
    expert_offsets[E_local] = total_c;
    aligned_offsets[E_local] = total_p;
    if (s_aligned != nullptr) s_aligned[E_local] = total_p;
  }
  return total_p;
}

// Expert of the m-block starting at `pos` < post_pad: the last e with aligned[e] <= pos (an
// empty expert shares its offset with the next one, so the last such e is not empty).
template <typename Aligned>
__device__ __forceinline__ int block_expert(Aligned aligned, int E_local, long long pos) {
  int lo = 0;
  int hi = E_local;  // upper_bound over aligned[0, E_local)
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (static_cast<long long>(aligned(mid)) <= pos) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo - 1;
}

// Counts the skip class of a pair and (coverage on) whether its row has an earlier slot of the
// same local expert.
__device__ __forceinline__ void cover_pair(BlockCoverage& cov, int le, const int32_t* row_ids,
                                           int k, const int32_t* __restrict__ expert_map, int E,
                                           int E_local) {
  if (!cov.on()) return;
  if (le == kSkipInvalid) {
    cov.add(COV_SORT_SKIP_INVALID);
  } else if (le == kSkipNotOwned) {
    cov.add(COV_SORT_SKIP_NOT_OWNED);
  } else {
    for (int j = 0; j < k; ++j) {
      if (local_expert(row_ids[j], expert_map, E, E_local) == le) {
        cov.add(COV_SORT_DUPLICATE_SEEN);
        break;
      }
    }
  }
}

// ---- single-block path (N <= 256) -----------------------------------------------------------

__global__ void __launch_bounds__(kSortThreads)
sort_single_block(const int32_t* __restrict__ topk_ids, const int32_t* __restrict__ expert_map,
                  int E, int N, int K, int E_local, int block_size,
                  int32_t* __restrict__ expert_counts, int32_t* __restrict__ expert_offsets,
                  int32_t* __restrict__ aligned_offsets, int32_t* __restrict__ permuted_row,
                  int32_t* __restrict__ sorted_token_ids, int32_t* __restrict__ expert_ids,
                  int32_t* __restrict__ num_tokens_post_pad, uint32_t* coverage) {
  extern __shared__ int s_dyn[];  // geometry: 4 * (2 * E_l + 2) bytes
  int* s_count = s_dyn;             // [E_l]: counts, then scatter cursors
  int* s_aligned = s_dyn + E_local;  // [E_l + 1]
  __shared__ int s_warp[kSortWarps];
  MOE_BLOCK_COVERAGE(cov, coverage);
  cov.once(COV_SORT_SINGLE_BLOCK);
  const int tid = static_cast<int>(threadIdx.x);
  const int NK = N * K;
  const int P = NK + E_local * (block_size - 1);

  for (int e = tid; e < E_local; e += kSortThreads) s_count[e] = 0;
  for (int i = tid; i < P; i += kSortThreads) sorted_token_ids[i] = NK;  // sentinel
  __syncthreads();

  // count
  for (int x = tid; x < NK; x += kSortThreads) {
    const int le = local_expert(topk_ids[x], expert_map, E, E_local);
    if (le >= 0) atomicAdd(&s_count[le], 1);
    cover_pair(cov, le, topk_ids + (x - x % K), x % K, expert_map, E, E_local);
  }
  __syncthreads();

  // scan (a thread's chunk of experts: only it reads and rewrites those s_count entries)
  const int post_pad = scan_expert_counts([&](int e) { return s_count[e]; }, E_local,
                                          block_size, expert_counts, expert_offsets,
                                          aligned_offsets, s_aligned, s_warp, cov);
  if (tid == 0) num_tokens_post_pad[0] = post_pad;
  __syncthreads();
  for (int e = tid; e < E_local; e += kSortThreads) s_count[e] = s_aligned[e];  // cursors

  // expert_ids
  const int m_blocks = (P + block_size - 1) / block_size;
  for (int i = tid; i < m_blocks; i += kSortThreads) {
    const long long pos = static_cast<long long>(i) * block_size;
    expert_ids[i] = pos < post_pad
                        ? block_expert([&](int e) { return s_aligned[e]; }, E_local, pos)
                        : -1;
  }
  __syncthreads();

  // scatter, in x order: chunks of 256 pairs, the warps of a chunk one after the other
  const int warp = tid / kWarpSize;
  const unsigned lanes_below = (1u << lane_id()) - 1u;
  for (int base = 0; base < NK; base += kSortThreads) {
    const int x = base + tid;
    const int le = x < NK ? local_expert(topk_ids[x], expert_map, E, E_local) : kSkipInvalid;
    const unsigned peers = __match_any_sync(kFullMask, le);
    const int rank = __popc(peers & lanes_below);
    for (int w = 0; w < kSortWarps; ++w) {
      if (warp == w) {
        if (le >= 0) {
          const int pos = s_count[le] + rank;
          sorted_token_ids[pos] = x;
          permuted_row[x] = pos;
        } else if (x < NK) {
          permuted_row[x] = -1;
        }
        __syncwarp();
        if (le >= 0 && rank == 0) s_count[le] += __popc(peers);
      }
      __syncthreads();
    }
  }
  cov.flush();
}

// ---- three-step path (N > 256) --------------------------------------------------------------

// Step 1, models blockExpertPrefixSumKernel: block (b = blockIdx.x, e = blockIdx.y).
__global__ void __launch_bounds__(kSortThreads)
sort_block_expert_prefix(const int32_t* __restrict__ topk_ids,
                         const int32_t* __restrict__ expert_map, int E, int N, int K,
                         int E_local, int block_size, int32_t* __restrict__ permuted_row,
                         int32_t* __restrict__ sorted_token_ids, int32_t* __restrict__ workspace,
                         uint32_t bugs, uint32_t* coverage) {
  __shared__ int s_warp[kSortWarps];
  MOE_BLOCK_COVERAGE(cov, coverage);
  cov.once(COV_SORT_THREE_STEP);
  const int tid = static_cast<int>(threadIdx.x);
  const int b = static_cast<int>(blockIdx.x);
  const int e = static_cast<int>(blockIdx.y);
  const int blocks = static_cast<int>(gridDim.x);
  const int NK = N * K;

  // the sentinel fill of sorted_token_ids, spread over every block of this launch
  {
    const long long P = static_cast<long long>(NK) + static_cast<long long>(E_local) *
                                                         (block_size - 1);
    const long long cta = static_cast<long long>(blockIdx.y) * gridDim.x + blockIdx.x;
    const long long stride = static_cast<long long>(gridDim.x) * gridDim.y * kSortThreads;
    for (long long i = cta * kSortThreads + tid; i < P; i += stride) sorted_token_ids[i] = NK;
  }

  const bool dup_break = (bugs & BUG_SORT_DUPLICATE_BREAK) != 0u;
  const int n = b * kSortThreads + tid;
  const bool active = n < N && e < E_local;
  const int32_t* row_ids = topk_ids + static_cast<size_t>(n) * K;
  int multiplicity = 0;  // slots of row n holding e (fixed); 0/1 with the break
  if (active) {
    for (int k = 0; k < K; ++k) {
      if (local_expert(row_ids[k], expert_map, E, E_local) == e) {
        ++multiplicity;
        if (dup_break) break;
      }
    }
  }
  int count = 0;
  const int offset = block_exclusive_scan(multiplicity, &count, s_warp);
  if (multiplicity > 0) {
    int j = 0;
    for (int k = 0; k < K && j < multiplicity; ++k) {
      if (local_expert(row_ids[k], expert_map, E, E_local) == e) {
        permuted_row[static_cast<size_t>(n) * K + k] = encode_rank(offset + j);
        ++j;
      }
    }
  }
  if (tid == 0 && e < E_local) workspace[static_cast<size_t>(e) * blocks + b] = count;
  cov.flush();
}

// Step 2, models globalExpertPrefixSumKernel: one block.
__global__ void __launch_bounds__(kSortThreads)
sort_global_prefix(int E_local, int blocks, int block_size, int32_t* __restrict__ workspace,
                   int32_t* __restrict__ expert_counts, int32_t* __restrict__ expert_offsets,
                   int32_t* __restrict__ aligned_offsets,
                   int32_t* __restrict__ num_tokens_post_pad, uint32_t* coverage) {
  __shared__ int s_warp[kSortWarps];
  MOE_BLOCK_COVERAGE(cov, coverage);
  const int lane = lane_id();
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;

  // per-expert totals over the blocks (a warp per expert) into expert_counts
  for (int e = warp; e < E_local; e += kSortWarps) {
    const int32_t* row = workspace + static_cast<size_t>(e) * blocks;
    int s = 0;
    for (int b = lane; b < blocks; b += kWarpSize) s += row[b];
#pragma unroll
    for (int mask = kWarpSize / 2; mask > 0; mask /= 2) s += __shfl_xor_sync(kFullMask, s, mask);
    if (lane == 0) expert_counts[e] = s;
  }
  __syncthreads();  // expert_counts (global) visible to the whole block

  const int post_pad = scan_expert_counts([&](int e) { return expert_counts[e]; }, E_local,
                                          block_size, expert_counts, expert_offsets,
                                          aligned_offsets, nullptr, s_warp, cov);
  if (threadIdx.x == 0) num_tokens_post_pad[0] = post_pad;
  __syncthreads();  // aligned_offsets visible

  // per expert, the blocks' counts -> aligned start of each block's run (in place)
  for (int e = warp; e < E_local; e += kSortWarps) {
    int32_t* row = workspace + static_cast<size_t>(e) * blocks;
    int carry = aligned_offsets[e];
    for (int b0 = 0; b0 < blocks; b0 += kWarpSize) {
      const int b = b0 + lane;
      const int v = b < blocks ? row[b] : 0;
      int incl = v;
#pragma unroll
      for (int d = 1; d < kWarpSize; d *= 2) {
        const int t = __shfl_up_sync(kFullMask, incl, d);
        if (lane >= d) incl += t;
      }
      if (b < blocks) row[b] = carry + incl - v;
      carry += __shfl_sync(kFullMask, incl, kWarpSize - 1);
    }
  }
  cov.flush();
}

// Step 3, models mergeExpertPrefixSumKernel: thread n resolves row n's slots.
__global__ void __launch_bounds__(kSortThreads)
sort_merge(const int32_t* __restrict__ topk_ids, const int32_t* __restrict__ expert_map, int E,
           int N, int K, int E_local, int block_size, const int32_t* __restrict__ workspace,
           const int32_t* __restrict__ aligned_offsets,
           const int32_t* __restrict__ num_tokens_post_pad, int32_t* __restrict__ permuted_row,
           int32_t* __restrict__ sorted_token_ids, int32_t* __restrict__ expert_ids,
           uint32_t* coverage) {
  MOE_BLOCK_COVERAGE(cov, coverage);
  const int tid = static_cast<int>(threadIdx.x);
  const int b = static_cast<int>(blockIdx.x);
  const int blocks = static_cast<int>(gridDim.x);
  const int NK = N * K;

  // expert_ids, spread over the launch
  {
    const int post_pad = num_tokens_post_pad[0];
    const long long P = static_cast<long long>(NK) + static_cast<long long>(E_local) *
                                                         (block_size - 1);
    const long long m_blocks = (P + block_size - 1) / block_size;
    for (long long i = static_cast<long long>(b) * kSortThreads + tid; i < m_blocks;
         i += static_cast<long long>(blocks) * kSortThreads) {
      const long long pos = i * block_size;
      expert_ids[i] = pos < post_pad
                          ? block_expert([&](int e) { return aligned_offsets[e]; }, E_local, pos)
                          : -1;
    }
  }

  const int n = b * kSortThreads + tid;
  if (n < N) {
    const int32_t* row_ids = topk_ids + static_cast<size_t>(n) * K;
    const int max_rank = kSortThreads * K;
    for (int k = 0; k < K; ++k) {
      const size_t x = static_cast<size_t>(n) * K + k;
      const int le = local_expert(row_ids[k], expert_map, E, E_local);
      cover_pair(cov, le, row_ids, k, expert_map, E, E_local);
      if (le < 0) {
        permuted_row[x] = -1;
        continue;
      }
      const int32_t v = permuted_row[x];
      if (!is_encoded_rank(v, max_rank)) {  // not ranked by step 1: the break dropped it
        cov.add(COV_SORT_DUPLICATE_DROPPED);
        continue;
      }
      const int pos = workspace[static_cast<size_t>(le) * blocks + b] + decode_rank(v);
      permuted_row[x] = pos;
      sorted_token_ids[pos] = static_cast<int32_t>(x);
    }
  }
  cov.flush();
}

}  // namespace

size_t sort_align_workspace_elems(int N, int E_local) {
  if (N <= kSingleBlockMaxRows || E_local <= 0) return 0;
  const size_t blocks = (static_cast<size_t>(N) + kSortThreads - 1) / kSortThreads;
  return blocks * static_cast<size_t>(E_local);
}

cudaError_t launch_sort_align(const int32_t* topk_ids, const int32_t* expert_map, int E, int N,
                              int K, int E_local, int block_size, int32_t* expert_counts,
                              int32_t* expert_offsets, int32_t* aligned_offsets,
                              int32_t* permuted_row, int32_t* sorted_token_ids,
                              int32_t* expert_ids, int32_t* num_tokens_post_pad,
                              int32_t* workspace, uint32_t bugs, uint32_t* coverage,
                              cudaStream_t stream) {
  if (N < 0 || K < 0 || E < 0 || E_local < 0 || block_size < 1) return cudaErrorInvalidValue;
  if (N <= kSingleBlockMaxRows) {
    const size_t shared = sizeof(int) * (2 * static_cast<size_t>(E_local) + 2);
    sort_single_block<<<1, kSortThreads, shared, stream>>>(
        topk_ids, expert_map, E, N, K, E_local, block_size, expert_counts, expert_offsets,
        aligned_offsets, permuted_row, sorted_token_ids, expert_ids, num_tokens_post_pad,
        coverage);
    return launch_status();
  }
  if (E_local > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  const int blocks = (N + kSortThreads - 1) / kSortThreads;
  const dim3 prefix_grid(blocks, E_local > 0 ? E_local : 1);
  sort_block_expert_prefix<<<prefix_grid, kSortThreads, 0, stream>>>(
      topk_ids, expert_map, E, N, K, E_local, block_size, permuted_row, sorted_token_ids,
      workspace, bugs, coverage);
  cudaError_t err = launch_status();
  if (err != cudaSuccess) return err;
  sort_global_prefix<<<1, kSortThreads, 0, stream>>>(E_local, blocks, block_size, workspace,
                                                     expert_counts, expert_offsets,
                                                     aligned_offsets, num_tokens_post_pad,
                                                     coverage);
  err = launch_status();
  if (err != cudaSuccess) return err;
  sort_merge<<<blocks, kSortThreads, 0, stream>>>(topk_ids, expert_map, E, N, K, E_local,
                                                  block_size, workspace, aligned_offsets,
                                                  num_tokens_post_pad, permuted_row,
                                                  sorted_token_ids, expert_ids, coverage);
  return launch_status();
}

}  // namespace moe_harness
