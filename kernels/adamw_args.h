// Shared by the two builds of `adamw_master_` (adamw_cuda.cu, adamw_cpu.cpp): the checks of its arguments and the
// constants of one AdamW step, as torch's fused AdamW computes them (bias corrections in double, then fp32).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace phift {

struct AdamWStep {
  float lr, beta1, beta2, eps, weight_decay, step_size, bias_correction2_sqrt;
};

inline AdamWStep adamw_step(double lr, double beta1, double beta2, double eps, double weight_decay, double step) {
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  return {static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
          static_cast<float>(weight_decay), static_cast<float>(lr / bias_correction1),
          static_cast<float>(std::sqrt(bias_correction2))};
}

inline void check_adamw_lists(at::TensorList weights, at::TensorList grads, at::TensorList masters,
                              at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::ArrayRef<double> steps) {
  const size_t n = weights.size();
  TORCH_CHECK(grads.size() == n && masters.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n &&
                  steps.size() == n,
              "adamw_master_: the tensor lists and steps must be equally long");
}

// One tensor's weight w and gradient g (a shared half dtype) and fp32 master p and moments m, v, on `device`.
inline void check_adamw_tensor(const at::Tensor& w, const at::Tensor& g, const at::Tensor& p, const at::Tensor& m,
                               const at::Tensor& v, at::DeviceType device) {
  TORCH_CHECK(w.device().type() == device && w.is_contiguous() && g.is_contiguous() && p.is_contiguous() &&
                  m.is_contiguous() && v.is_contiguous(),
              "adamw_master_: tensors must be contiguous and on the op's device");
  TORCH_CHECK((w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf) && g.scalar_type() == w.scalar_type() &&
                  p.scalar_type() == at::kFloat && m.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "adamw_master_: weight and gradient share a half dtype; master and moments are fp32");
  TORCH_CHECK(g.numel() == w.numel() && p.numel() == w.numel() && m.numel() == w.numel() && v.numel() == w.numel(),
              "adamw_master_: sizes differ");
}

}  // namespace phift
