// The op `phift::adamw_master_`: AdamW over fp16/bf16 weights with fp32 master weights and moments, one kernel pass
// a tensor (adamw_cuda.cu). phift/optim.py's MasterAdamW calls it through phift/kernels.py, outside any compiled
// graph, so it needs neither autograd nor a fake implementation.
#include <torch/extension.h>

void adamw_master_cuda(at::TensorList weights, at::TensorList grads, at::TensorList masters, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, const c10::optional<at::Tensor>& clip_coef, double lr, double beta1,
                       double beta2, double eps, double weight_decay, at::ArrayRef<double> steps);

TORCH_LIBRARY_FRAGMENT(phift, m) {
  m.def("adamw_master_(Tensor(a!)[] weights, Tensor[] grads, Tensor(b!)[] masters, Tensor(c!)[] exp_avgs, "
        "Tensor(d!)[] exp_avg_sqs, Tensor? clip_coef, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, float[] steps) -> ()");
}

TORCH_LIBRARY_IMPL(phift, CUDA, m) { m.impl("adamw_master_", &adamw_master_cuda); }
