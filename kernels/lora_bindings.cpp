// Python bindings of the fused LoRA passes; phift/kernels.py wraps them in the torch.library op.
#include <torch/extension.h>

#include <vector>

std::vector<at::Tensor> lora_prep(const at::Tensor& x, const at::Tensor& a, double coef, int64_t threshold);
at::Tensor lora_fix(const at::Tensor& dx_aug, const at::Tensor& a, double coef, int64_t threshold,
                    const at::Tensor& rng);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prep", &lora_prep, "x_aug = [x | su], su = coef (mask*x) A^T; returns (x_aug, xm, su, rng)");
  m.def("fix", &lora_fix, "dx = dx_aug[:, :K] + coef mask*(g A), g = dx_aug[:, K:]");
}
