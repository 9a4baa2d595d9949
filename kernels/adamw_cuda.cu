// AdamW for a model held in fp16/bf16 with fp32 master weights (the op `phift::adamw_master_`, declared in
// adamw_op.cpp): one pass per parameter reads its half gradient, updates the fp32 master weight and both fp32
// moments, and writes the rounded weight back into the model. 28 bytes a parameter (bf16: read g 2, p/m/v 12;
// write p/m/v 12, weight 2), where fp32 weights under autocast also cast every weight to half in each forward and
// every half gradient to fp32. The math is torch's fused AdamW (adamw mode), gradient first multiplied by the
// clipping coefficient (a device scalar: no host sync); a coefficient that is not finite skips the update.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "adamw_args.h"
#include "common.cuh"

#include <algorithm>
#include <cmath>

namespace {

using phift::Conv;

constexpr int kThreads = 256;
constexpr int kPer = 4;  // elements per thread and iteration: one 16-byte fp32 access, one 8-byte half access

using Hyper = phift::AdamWStep;

__device__ __forceinline__ float adamw(float g, float& p, float& m, float& v, const Hyper& h) {
  p -= h.lr * h.weight_decay * p;
  m = h.beta1 * m + (1.f - h.beta1) * g;
  v = h.beta2 * v + (1.f - h.beta2) * g * g;
  const float denom = sqrtf(v) / h.bias_correction2_sqrt + h.eps;
  p -= h.step_size * m / denom;
  return p;
}

template <typename T, bool kVectorised>
__global__ void __launch_bounds__(kThreads) adamw_master_kernel(T* __restrict__ weight, const T* __restrict__ grad,
                                                                float* __restrict__ master, float* __restrict__ m,
                                                                float* __restrict__ v, int64_t n,
                                                                const float* __restrict__ clip, Hyper h) {
  const float scale = clip ? *clip : 1.f;
  if (!isfinite(scale)) return;  // the gradients were not finite: the step is skipped, every tensor stays as it was
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads * kPer;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kPer; i < n; i += stride) {
    if (kVectorised && i + kPer <= n) {
      float4 p4 = *reinterpret_cast<const float4*>(master + i);
      float4 m4 = *reinterpret_cast<const float4*>(m + i);
      float4 v4 = *reinterpret_cast<const float4*>(v + i);
      const uint2 graw = *reinterpret_cast<const uint2*>(grad + i);
      typename Conv<T>::T2 g01, g23;
      memcpy(&g01, &graw.x, 4);
      memcpy(&g23, &graw.y, 4);
      const float2 ga = Conv<T>::to_float2(g01), gb = Conv<T>::to_float2(g23);
      adamw(ga.x * scale, p4.x, m4.x, v4.x, h);
      adamw(ga.y * scale, p4.y, m4.y, v4.y, h);
      adamw(gb.x * scale, p4.z, m4.z, v4.z, h);
      adamw(gb.y * scale, p4.w, m4.w, v4.w, h);
      *reinterpret_cast<float4*>(master + i) = p4;
      *reinterpret_cast<float4*>(m + i) = m4;
      *reinterpret_cast<float4*>(v + i) = v4;
      const typename Conv<T>::T2 w01 = Conv<T>::from_float2(p4.x, p4.y), w23 = Conv<T>::from_float2(p4.z, p4.w);
      uint2 wraw;
      memcpy(&wraw.x, &w01, 4);
      memcpy(&wraw.y, &w23, 4);
      *reinterpret_cast<uint2*>(weight + i) = wraw;
    } else {
      for (int64_t j = i; j < min(i + kPer, n); ++j) {
        float p = master[j], mj = m[j], vj = v[j];
        weight[j] = Conv<T>::from_float(adamw(Conv<T>::to_float(grad[j]) * scale, p, mj, vj, h));
        master[j] = p;
        m[j] = mj;
        v[j] = vj;
      }
    }
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T>
void launch(at::Tensor& weight, const at::Tensor& grad, at::Tensor& master, at::Tensor& m, at::Tensor& v,
            const float* clip, const Hyper& h) {
  const int64_t n = weight.numel();
  if (n == 0) return;
  auto* w = reinterpret_cast<T*>(weight.data_ptr());
  const auto* g = reinterpret_cast<const T*>(grad.data_ptr());
  float *pm = master.data_ptr<float>(), *pmom = m.data_ptr<float>(), *pv = v.data_ptr<float>();
  const int64_t wanted = (n + kThreads * kPer - 1) / (kThreads * kPer);
  const int blocks = static_cast<int>(std::min<int64_t>(wanted, static_cast<int64_t>(phift::multiprocessors()) * 8));
  const bool vec = aligned(w, 8) && aligned(g, 8) && aligned(pm, 16) && aligned(pmom, 16) && aligned(pv, 16);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec)
    adamw_master_kernel<T, true><<<blocks, kThreads, 0, stream>>>(w, g, pm, pmom, pv, n, clip, h);
  else
    adamw_master_kernel<T, false><<<blocks, kThreads, 0, stream>>>(w, g, pm, pmom, pv, n, clip, h);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void adamw_master_cuda(at::TensorList weights, at::TensorList grads, at::TensorList masters, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, const c10::optional<at::Tensor>& clip_coef, double lr, double beta1,
                       double beta2, double eps, double weight_decay, at::ArrayRef<double> steps) {
  phift::check_adamw_lists(weights, grads, masters, exp_avgs, exp_avg_sqs, steps);
  const size_t n = weights.size();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(weights[0].device());
  const float* clip = nullptr;
  if (clip_coef.has_value()) {
    TORCH_CHECK(clip_coef->is_cuda() && clip_coef->scalar_type() == at::kFloat && clip_coef->numel() == 1,
                "adamw_master_: clip_coef must be one fp32 CUDA value");
    clip = clip_coef->data_ptr<float>();
  }
  for (size_t i = 0; i < n; ++i) {
    at::Tensor w = weights[i], g = grads[i], p = masters[i], m = exp_avgs[i], v = exp_avg_sqs[i];
    phift::check_adamw_tensor(w, g, p, m, v, at::kCUDA);
    const Hyper h = phift::adamw_step(lr, beta1, beta2, eps, weight_decay, steps[i]);
    if (w.scalar_type() == at::kBFloat16)
      launch<__nv_bfloat16>(w, g, p, m, v, clip, h);
    else
      launch<__half>(w, g, p, m, v, clip, h);
  }
}
