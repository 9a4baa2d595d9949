// The fused rotary ops' schemas and CUDA registrations; the kernels are in rotary_cuda.cu. phift/kernels.py holds
// their autograd Function and the fake (shape-only) versions that torch.compile traces with. lora_op.cpp owns the
// `phift` library (TORCH_LIBRARY) and the Python module: this file only adds to them.
#include <ATen/ATen.h>
#include <torch/library.h>

at::Tensor rotary_qkv_fused_cuda(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                                 int64_t num_heads);
at::Tensor rotary_qkv_fused_backward_cuda(const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                          const at::Tensor& cos, const at::Tensor& sin);

TORCH_LIBRARY_FRAGMENT(phift, m) {
  m.def("rotary_qkv_fused(Tensor qkv, Tensor cos, Tensor sin, int num_heads) -> Tensor");
  m.def("rotary_qkv_fused_backward(Tensor dq, Tensor dk, Tensor dv, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(phift, CUDA, m) {
  m.impl("rotary_qkv_fused", &rotary_qkv_fused_cuda);
  m.impl("rotary_qkv_fused_backward", &rotary_qkv_fused_backward_cuda);
}
