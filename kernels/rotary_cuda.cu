// The fused rotary embedding of phi's attention (rotary_op.cpp registers the two ops):
//
//   phift::rotary_qkv_fused(qkv, cos, sin, num_heads) -> [3, B, T, H, D]
//       qkv is the Wqkv output [B, T, 3·H·D] (rows q;k;v); out[0] and out[1] are q and k rotated, out[2] is v.
//   phift::rotary_qkv_fused_backward(dq, dk, dv, cos, sin) -> dqkv [B, T, 3·H·D]
//       dq, dk, dv: [B, H, T, D], any strides (copied first only when D is not unit-stride or a start is off the
//       16-byte grid).
//
// Why [3, B, T, H, D]: out[i].transpose(1, 2) is the [B, H, T, D] view SDPA takes without a copy, D contiguous (all
// flash attention asks); each token's H·D elements of q, k or v are contiguous, so a block writes whole rows.
// SDPA's CUDA backends allocate dq, dk, dv like q, k, v, so the backward reads whole rows too.
//
// Rotate-half on the first rd dims of each q and k head, as phift.kernels.apply_rotary computes it. With h = rd/2,
//     y_i  = x_i cos_i − x_{i+h} sin_i             y_{i+h}  = x_{i+h} cos_{i+h} + x_i sin_{i+h}        (i < h)
// and backward its transpose,
//     dx_i = dy_i cos_i + dy_{i+h} sin_{i+h}       dx_{i+h} = dy_{i+h} cos_{i+h} − dy_i sin_i
// Each product and the sum are rounded to fp32 on their own (__fmul_rn: no FMA contraction), then the result once
// to the input dtype: the operations PyTorch's eager path runs, so the two give the same bits.
//
// One thread per 8-element (16-byte) vector of a head. A rotated vector also needs its partner, rd/2 elements
// away: one more aligned vector when rd is a multiple of 16, else read element by element. The partner is
// another thread's vector, so that second read hits in L1/L2: DRAM sees every element read once and written once.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

#include <algorithm>
#include <limits>

namespace {

using namespace phift;

constexpr int kThreads = 256;

__device__ __forceinline__ void load8(const float* p, float (&out)[kVec]) {
  const float4 lo = *reinterpret_cast<const float4*>(p), hi = *reinterpret_cast<const float4*>(p + 4);
  const float all[kVec] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
#pragma unroll
  for (int e = 0; e < kVec; ++e) out[e] = all[e];
}

// q, k, v (or their gradients) as [B, H, T, D] views: unit stride along D; the other strides, and the starts,
// multiples of 8 elements (16 bytes).
struct Views {
  const void* data[3];
  int64_t stride_b[3], stride_h[3], stride_t[3];
};

// One rotated element from its two products: forward subtracts on the first half, backward on the second.
__device__ __forceinline__ float combine(float a, float b, bool subtract) {
  return subtract ? __fsub_rn(a, b) : __fadd_rn(a, b);
}

// Elements d0..d0+7 (d0 < rd) of one head, rotated (kBackward: the gradient rotated back); those from rd on pass
// through. `head` is the head's first element; cos and sin are its token's rows.
template <typename T, bool kBackward, bool kWholePartners>
__device__ __forceinline__ uint4 rotate(uint4 raw, const T* head, int d0, const float* cos, const float* sin,
                                        int rd) {
  const int half = rd / 2;
  float x[kVec], y[kVec];
  unpack8<T>(raw, x);
  if constexpr (kWholePartners) {  // rd/2 is a multiple of 8: the vector lies in one half, its partner is aligned
    const bool first = d0 < half;
    const int p0 = first ? d0 + half : d0 - half;
    float partner[kVec], c[kVec], s[kVec];
    unpack8<T>(load16(head + p0), partner);
    load8(cos + d0, c);
    load8(sin + (kBackward ? p0 : d0), s);  // backward multiplies by the transpose: the partner's sin
#pragma unroll
    for (int e = 0; e < kVec; ++e)
      y[e] = combine(__fmul_rn(x[e], c[e]), __fmul_rn(partner[e], s[e]), first != kBackward);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const int i = d0 + e, p = i < half ? i + half : i - half;
      y[e] = i >= rd ? x[e]
                     : combine(__fmul_rn(x[e], cos[i]), __fmul_rn(Conv<T>::to_float(head[p]), sin[kBackward ? p : i]),
                               (i < half) != kBackward);
    }
  }
  return pack8<T>(y);
}

// Block: blockDim.y tokens of one sequence, blockDim.x threads walking each token's H·D/8 vectors of q, of k and
// of v. Token (b, t) reads part p of `in` and writes it to out + p·out_part_stride + (b·seq + t)·out_row_stride,
// H·D contiguous elements.
template <typename T, bool kBackward, bool kWholePartners>
__global__ void __launch_bounds__(kThreads)
rotary_kernel(Views in, const float* __restrict__ cos, const float* __restrict__ sin, T* __restrict__ out,
              int64_t out_part_stride, int64_t out_row_stride, int64_t seq, unsigned blocks_per_seq, int heads,
              int head_dim, int rd) {
  const int64_t b = blockIdx.x / blocks_per_seq;
  const int64_t t = static_cast<int64_t>(blockIdx.x % blocks_per_seq) * blockDim.y + threadIdx.y;
  if (t >= seq) return;
  const int64_t row = b * seq + t;
  const float* cos_row = cos + row * rd;
  const float* sin_row = sin + row * rd;
  const int head_vecs = head_dim / kVec;
#pragma unroll
  for (int part = 0; part < 3; ++part) {  // q, k, v
    const T* src = static_cast<const T*>(in.data[part]) + b * in.stride_b[part] + t * in.stride_t[part];
    T* dst = out + part * out_part_stride + row * out_row_stride;
    for (int v = threadIdx.x; v < heads * head_vecs; v += blockDim.x) {
      const int h = v / head_vecs, d0 = (v - h * head_vecs) * kVec;
      const T* head = src + h * in.stride_h[part];
      uint4 raw = load16(head + d0);
      if (part < 2 && d0 < rd) raw = rotate<T, kBackward, kWholePartners>(raw, head, d0, cos_row, sin_row, rd);
      store16(dst + v * kVec, raw);  // v·8 = h·D + d0
    }
  }
}

template <typename T, bool kBackward>
void launch(const Views& in, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out, int64_t out_part_stride,
            int64_t out_row_stride, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim) {
  const int64_t rd = cos.size(2), vecs = heads * head_dim / kVec;
  // whole warps along a token's vectors; short rows (small models) share the block among several tokens
  const int lanes = static_cast<int>(std::min<int64_t>(kThreads, (vecs + 31) / 32 * 32));
  const dim3 block(lanes, kThreads / lanes);
  const int64_t blocks_per_seq = (seq + block.y - 1) / block.y;
  TORCH_CHECK(batch * blocks_per_seq <= std::numeric_limits<int>::max(), "phift rotary: too many tokens");
  auto kernel = rd % (2 * kVec) == 0 ? rotary_kernel<T, kBackward, true> : rotary_kernel<T, kBackward, false>;
  kernel<<<static_cast<unsigned>(batch * blocks_per_seq), block, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in, cos.data_ptr<float>(), sin.data_ptr<float>(), static_cast<T*>(out.data_ptr()), out_part_stride,
      out_row_stride, seq, static_cast<unsigned>(blocks_per_seq), static_cast<int>(heads),
      static_cast<int>(head_dim), static_cast<int>(rd));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// t as the kernel reads it (see Views); copied only when it is not so already.
at::Tensor vector_friendly(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && aligned16(t);
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.size(d) == 1 || t.stride(d) % kVec == 0);
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

Views views_of(const at::Tensor (&parts)[3]) {
  Views views;
  for (int p = 0; p < 3; ++p) {
    views.data[p] = parts[p].data_ptr();
    views.stride_b[p] = parts[p].stride(0);
    views.stride_h[p] = parts[p].stride(1);
    views.stride_t[p] = parts[p].stride(2);
  }
  return views;
}

bool half_or_bf16(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

// cos, sin as dense fp32 [B, T, rd] rows that the kernel reads 16 bytes at a time.
at::Tensor checked_cos_sin(const at::Tensor& t, const at::Tensor& like, int64_t batch, int64_t seq,
                           int64_t head_dim, const char* op) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == at::kFloat && t.dim() == 3 && t.size(0) == batch &&
                  t.size(1) == seq && t.size(2) % 2 == 0 && t.size(2) <= head_dim,
              op, ": cos and sin must be float32 [", batch, ", ", seq, ", rotary_dim] tensors on ", like.device(),
              ", rotary_dim even and at most head_dim (", head_dim, "); got ", t.scalar_type(), " of shape ",
              t.sizes(), " on ", t.device());
  return t.is_contiguous() && aligned16(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

}  // namespace

// qkv: the Wqkv output [B, T, 3·H·D], fp16/bf16, D a multiple of 8; cos, sin: fp32 [B, T, rd]. Returns
// [3, B, T, H, D]: q and k rotated, v copied.
at::Tensor rotary_qkv_fused_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                 int64_t num_heads) {
  constexpr const char* op = "phift::rotary_qkv_fused";
  TORCH_CHECK(qkv.is_cuda() && qkv.dim() == 3 && half_or_bf16(qkv), op,
              ": qkv must be a [B, T, 3·heads·head_dim] CUDA float16 or bfloat16 tensor, got ", qkv.scalar_type(),
              " of shape ", qkv.sizes(), " on ", qkv.device());
  TORCH_CHECK(num_heads > 0 && qkv.size(2) % (3 * num_heads * kVec) == 0 &&
                  qkv.size(2) <= std::numeric_limits<int>::max(),
              op, ": qkv's last dim (", qkv.size(2), ") must be 3 · num_heads (", num_heads,
              ") · head_dim, with head_dim a multiple of 8");
  const int64_t batch = qkv.size(0), seq = qkv.size(1), head_dim = qkv.size(2) / (3 * num_heads);
  const c10::cuda::CUDAGuard guard(qkv.device());
  const at::Tensor c = checked_cos_sin(cos, qkv, batch, seq, head_dim, op);
  const at::Tensor s = checked_cos_sin(sin, qkv, batch, seq, head_dim, op);
  TORCH_CHECK(c.sizes() == s.sizes(), op, ": cos and sin differ in shape");
  at::Tensor out = at::empty({3, batch, seq, num_heads, head_dim}, qkv.options());
  if (out.numel() == 0) return out;
  const at::Tensor parts = qkv.reshape({batch, seq, 3, num_heads, head_dim}).permute({2, 0, 3, 1, 4});
  const at::Tensor in[3] = {vector_friendly(parts[0]), vector_friendly(parts[1]), vector_friendly(parts[2])};
  const int64_t row = num_heads * head_dim;
  if (qkv.scalar_type() == at::kBFloat16)
    launch<__nv_bfloat16, false>(views_of(in), c, s, out, batch * seq * row, row, batch, seq, num_heads, head_dim);
  else
    launch<__half, false>(views_of(in), c, s, out, batch * seq * row, row, batch, seq, num_heads, head_dim);
  return out;
}

// dq, dk, dv: [B, H, T, D], any strides; cos, sin as in the forward. Returns dqkv [B, T, 3·H·D].
at::Tensor rotary_qkv_fused_backward_cuda(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                          const at::Tensor& cos, const at::Tensor& sin) {
  constexpr const char* op = "phift::rotary_qkv_fused_backward";
  TORCH_CHECK(dq.is_cuda() && dq.dim() == 4 && half_or_bf16(dq) && dq.size(3) % kVec == 0 &&
                  3 * dq.size(1) * dq.size(3) <= std::numeric_limits<int>::max(),
              op, ": dq must be a [B, H, T, head_dim] CUDA float16 or bfloat16 tensor, head_dim a multiple of 8; got ",
              dq.scalar_type(), " of shape ", dq.sizes(), " on ", dq.device());
  for (const at::Tensor* g : {&dk, &dv})
    TORCH_CHECK(g->sizes() == dq.sizes() && g->scalar_type() == dq.scalar_type() && g->device() == dq.device(), op,
                ": dk and dv must match dq (", dq.scalar_type(), " ", dq.sizes(), " on ", dq.device(), "), got ",
                g->scalar_type(), " ", g->sizes(), " on ", g->device());
  const int64_t batch = dq.size(0), heads = dq.size(1), seq = dq.size(2), head_dim = dq.size(3);
  const c10::cuda::CUDAGuard guard(dq.device());
  const at::Tensor c = checked_cos_sin(cos, dq, batch, seq, head_dim, op);
  const at::Tensor s = checked_cos_sin(sin, dq, batch, seq, head_dim, op);
  TORCH_CHECK(c.sizes() == s.sizes(), op, ": cos and sin differ in shape");
  at::Tensor dqkv = at::empty({batch, seq, 3 * heads * head_dim}, dq.options());
  if (dqkv.numel() == 0) return dqkv;
  const at::Tensor in[3] = {vector_friendly(dq), vector_friendly(dk), vector_friendly(dv)};
  const int64_t row = heads * head_dim;
  if (dq.scalar_type() == at::kBFloat16)
    launch<__nv_bfloat16, true>(views_of(in), c, s, dqkv, row, 3 * row, batch, seq, heads, head_dim);
  else
    launch<__half, true>(views_of(in), c, s, dqkv, row, 3 * row, batch, seq, heads, head_dim);
  return dqkv;
}
