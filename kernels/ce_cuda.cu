// The fused cross-entropy gradient `phift::cross_entropy_grad_` (ce_op.cpp registers it). For each row x of the
// fp16/bf16 logits [rows, V], with label y:
//   loss = lse(x) − x[y]        g = softmax(x) − onehot(y) = exp(x − lse) − [i == y]
// in fp32; g overwrites x in place, in x's dtype. A row labelled ignore_index gets loss 0 and g = 0.
//
// One block per row. Each thread loads its share of the row once, in 16-byte vectors, and keeps it in registers
// (kSlots vectors at most: hence kMaxVocab), so that the row is read once and written once, 2 bytes each way per
// element. On the values it holds, a thread finds their max m and s = Σ exp(x − m); one block reduction merges the
// (m, s) pairs into lse; the thread then writes g over the same vectors. The exps (two per element) run while
// the other blocks of the GPU stream their rows.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

#include <cmath>
#include <limits>

namespace {

using namespace phift;

constexpr int kSlots = 8;   // vectors a thread keeps in registers (32 registers)
constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxVocab = int64_t{kMaxThreads} * kSlots * kVec;  // 65536, MAX_KERNEL_VOCAB in phift/kernels.py

// Merges the partial softmax sum (m2, s2) into (m, s), where s = Σ exp(x − m) over the elements seen so far.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  if (mx == -INFINITY) return;  // no finite element on either side: exp(−inf − (−inf)) would be NaN
  s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
  m = mx;
}

// Afterwards every lane holds the merge of all 32 lanes' pairs (the same bits in each: + is commutative).
__device__ __forceinline__ void warp_merge(float& m, float& s) {
#pragma unroll
  for (int lanes = 16; lanes > 0; lanes /= 2)
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, lanes), __shfl_xor_sync(0xffffffffu, s, lanes));
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
cross_entropy_grad_kernel(T* __restrict__ logits, const int64_t* __restrict__ labels, float* __restrict__ loss,
                          int vocab, int64_t ignore_index, bool write_grad) {
  const int t = threadIdx.x, threads = blockDim.x;
  T* x = logits + static_cast<int64_t>(blockIdx.x) * vocab;
  const int64_t label = labels[blockIdx.x];
  // Unless V is a multiple of 8 rows start off the 16-byte grid: the row is `head` elements up to the first
  // 16-byte boundary, `nvec` aligned vectors, then fewer than 8 tail elements. Threads 0..7 take one head element
  // each and threads 8..15 one tail element each (`extra`, -1 for none).
  const int head = min(static_cast<int>((16 - reinterpret_cast<uintptr_t>(x) % 16) % 16 / sizeof(T)), vocab);
  const int nvec = (vocab - head) / kVec;
  const int tail = head + nvec * kVec;
  const int extra = t < head ? t : (t >= kVec && t - kVec < vocab - tail) ? tail + t - kVec : -1;
  T* vecs = x + head;

  if (label == ignore_index) {
    if (t == 0) loss[blockIdx.x] = 0.f;
    if (write_grad) {
      for (int v = t; v < nvec; v += threads) *reinterpret_cast<uint4*>(vecs + v * kVec) = make_uint4(0, 0, 0, 0);
      if (extra >= 0) x[extra] = Conv<T>::from_float(0.f);
    }
    return;
  }
  CUDA_KERNEL_ASSERT_MSG(label >= 0 && label < vocab, "phift::cross_entropy_grad_: label out of range");

  // Thread 0 reads x[y] now: the barrier below orders this read before any thread overwrites x with g.
  const float x_label = t == 0 ? Conv<T>::to_float(x[label]) : 0.f;
  uint4 cached[kSlots];
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int v = t + i * threads;
    cached[i] = v < nvec ? *reinterpret_cast<const uint4*>(vecs + v * kVec) : make_uint4(0, 0, 0, 0);
  }
  const float x_extra = extra >= 0 ? Conv<T>::to_float(x[extra]) : -INFINITY;

  float m = x_extra;
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    if (t + i * threads >= nvec) break;
    float f[kVec];
    unpack8<T>(cached[i], f);
#pragma unroll
    for (int e = 0; e < kVec; ++e) m = fmaxf(m, f[e]);
  }
  const float shift = m == -INFINITY ? 0.f : m;  // all −inf (or no elements): each exp is 0, never NaN
  float s = __expf(x_extra - shift);
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    if (t + i * threads >= nvec) break;
    float f[kVec];
    unpack8<T>(cached[i], f);
#pragma unroll
    for (int e = 0; e < kVec; ++e) s += __expf(f[e] - shift);
  }

  // Each warp merges its lanes, then every warp merges the per-warp pairs itself: one barrier in all.
  __shared__ float warp_m[kMaxThreads / 32], warp_s[kMaxThreads / 32];
  warp_merge(m, s);
  const int lane = t % 32, warps = threads / 32;
  if (lane == 0) {
    warp_m[t / 32] = m;
    warp_s[t / 32] = s;
  }
  __syncthreads();
  m = lane < warps ? warp_m[lane] : -INFINITY;
  s = lane < warps ? warp_s[lane] : 0.f;
  warp_merge(m, s);
  const float lse = m + logf(s);
  if (t == 0) loss[blockIdx.x] = lse - x_label;
  if (!write_grad) return;

  const int y = static_cast<int>(label) - head;  // the label's index from `vecs`: may be outside them
#pragma unroll
  for (int i = 0; i < kSlots; ++i) {
    const int v = t + i * threads;
    if (v >= nvec) break;
    float f[kVec];
    unpack8<T>(cached[i], f);
#pragma unroll
    for (int e = 0; e < kVec; ++e) f[e] = __expf(f[e] - lse) - (v * kVec + e == y ? 1.f : 0.f);
    *reinterpret_cast<uint4*>(vecs + v * kVec) = pack8<T>(f);
  }
  if (extra >= 0) x[extra] = Conv<T>::from_float(__expf(x_extra - lse) - (extra == label ? 1.f : 0.f));
}

template <typename T>
void launch(at::Tensor& logits, const at::Tensor& labels, at::Tensor& loss, int64_t ignore_index, bool write_grad) {
  const int vocab = static_cast<int>(logits.size(1));
  int threads = 32;  // the fewest (a power of two, for whole warps) whose registers hold the row
  while (threads < kMaxThreads && int64_t{threads} * kSlots * kVec < vocab) threads *= 2;
  cross_entropy_grad_kernel<T><<<static_cast<unsigned>(logits.size(0)), threads, 0,
                                 c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<T*>(logits.data_ptr()), labels.data_ptr<int64_t>(), loss.data_ptr<float>(), vocab, ignore_index,
      write_grad);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// logits: [rows, V] fp16/bf16, contiguous, V <= 65536; labels: int64 [rows]. Returns the fp32 loss per row and,
// when write_grad, leaves softmax − onehot in logits.
at::Tensor cross_entropy_grad_cuda(at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                                   bool write_grad) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous() &&
                  (logits.scalar_type() == at::kHalf || logits.scalar_type() == at::kBFloat16),
              "phift::cross_entropy_grad_: logits must be a contiguous 2-D CUDA float16 or bfloat16 tensor, got ",
              logits.scalar_type(), " of shape ", logits.sizes());
  TORCH_CHECK(logits.size(1) > 0 && logits.size(1) <= kMaxVocab, "phift::cross_entropy_grad_: the vocabulary (",
              logits.size(1), ") must be between 1 and ", kMaxVocab);
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int>::max(), "phift::cross_entropy_grad_: too many rows");
  TORCH_CHECK(labels.device() == logits.device() && labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  labels.size(0) == logits.size(0),
              "phift::cross_entropy_grad_: labels must be an int64 vector of ", logits.size(0),
              " entries on the logits' device, got ", labels.scalar_type(), " of shape ", labels.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor labels_c = labels.contiguous();
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  if (logits.size(0) == 0) return loss;
  if (logits.scalar_type() == at::kBFloat16)
    launch<__nv_bfloat16>(logits, labels_c, loss, ignore_index, write_grad);
  else
    launch<__half>(logits, labels_c, loss, ignore_index, write_grad);
  return loss;
}
