// The op `phift::cross_entropy_grad_`: per-row cross-entropy of fp16/bf16 logits and, when write_grad, its
// gradient softmax − onehot written over the logits (the kernel is in ce_cuda.cu). The chunked LM-head loss calls
// it inside its own autograd.Function, so the op needs no autograd. phift/kernels.py registers its fake
// (shape-only) implementation for torch.compile.
#include <torch/extension.h>

at::Tensor cross_entropy_grad_cuda(at::Tensor& logits, const at::Tensor& labels, int64_t ignore_index,
                                   bool write_grad);

// lora_op.cpp holds the library's TORCH_LIBRARY block (there can be only one) and the module's PYBIND11_MODULE.
TORCH_LIBRARY_FRAGMENT(phift, m) {
  m.def("cross_entropy_grad_(Tensor(a!) logits, Tensor labels, int ignore_index, bool write_grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(phift, CUDA, m) { m.impl("cross_entropy_grad_", &cross_entropy_grad_cuda); }
