// The op `phift::lora_linear_fused`: its schema, CUDA implementation (cuBLAS + the two passes in lora_cuda.cu)
// and autograd, all in C++ so that a call costs one dispatch. phift/kernels.py registers the fake (shape-only)
// implementations that torch.compile traces with.
//
// With u = dropout(x) Aᵀ and coef = scaling / (1 - p):
//   forward    prep: [x | u] and coef·u                         one pass over x
//              y = [x | u] · [W | coef·B]ᵀ + b                  one GEMM over K + R
//   backward   [dx_base | g] = dy · [W | coef·B]                one GEMM; g = coef · dy B comes as R more columns
//              fix: dx = dx_base + mask ⊙ (g A), dA = gᵀ (mask ⊙ x)     one pass over dx_base and x
//              dB = dyᵀ (coef · u)                              one GEMM
// The kernels run at R, the rank rounded up to 8, 16, 32 or 64; [x | u] and [W | coef·B] carry kWidth columns
// beyond K whatever the rank, the unused ones zero. Autograd keeps x itself (no copy, and often held by the caller
// anyway), coef·u and the mask's Philox (seed, offset): [x | u] is freed after the forward GEMM.
#include <torch/extension.h>

#include <c10/core/DeviceGuard.h>

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

std::vector<at::Tensor> lora_prep(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, at::Tensor& w_aug,
                                  int64_t padded_rank, double coef, int64_t threshold);
std::vector<at::Tensor> lora_fix(const at::Tensor& g, const at::Tensor& dx_base, const at::Tensor& x,
                                 const at::Tensor& a, int64_t padded_rank, int64_t threshold, const at::Tensor& rng);

namespace {

// 64 extra columns rather than R: rows of K + 64 elements keep the GEMMs' rows 128-byte aligned, and cuBLAS ran
// both products faster so on an H100 (bench_lora_kernel.py --details) than with K + 8.
constexpr int64_t kWidth = 64;

using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

int64_t padded_rank(int64_t rank) {
  for (int64_t padded : {8, 16, 32, 64})
    if (rank <= padded) return padded;
  TORCH_CHECK(false, "phift::lora_linear_fused: rank ", rank, " is above 64");
}

// The kernels draw 16 random bits per element and drop it when they are below this: p rounded to 2⁻¹⁶.
int64_t dropout_threshold(double p) {
  return std::min<int64_t>(static_cast<int64_t>(std::floor(p * 65536.0 + 0.5)), 65535);
}

double dropout_coef(double scaling, int64_t threshold) { return scaling / (1.0 - threshold / 65536.0); }

// [W | coef·B] as one [N, K + R] matrix, kept for each frozen W. Copying W into it on every call would cost about
// as much as all the LoRA math, so W's part is copied once (the price: one more copy of each adapted weight in
// memory), unless W already lives in such a matrix (lives_in_augmented_matrix: phift.lora puts LoRA base weights
// there); the forward pass rewrites the B columns every call, inside the prep kernel. A W changed in place
// (merge, unmerge) has a new version and is copied again; entries of freed weights are dropped.
using WeakTensorRef = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Augmented {
  WeakTensorRef weight;
  int64_t version;
  bool in_place;  // matrix is W's own storage (lives_in_augmented_matrix), not a copy
  at::Tensor matrix;
  const void* written_b;  // the B (data pointer) and coef that the B columns hold now
  double written_coef;
};
std::mutex augmented_mutex;
std::map<const c10::TensorImpl*, Augmented> augmented_weights;

// Whether W already is the first K columns of a [N, K + kWidth] matrix of its own, as phift.kernels.
// home_for_fused_lora leaves a LoRA base weight: a storage holding exactly that matrix, W at its start, rows
// K + kWidth apart. Then that matrix is the augmented one, and W is never copied.
bool lives_in_augmented_matrix(const at::Tensor& weight) {
  if (weight.dim() != 2 || weight.stride(1) != 1) return false;
  const int64_t n = weight.size(0), k = weight.size(1);
  const size_t bytes = static_cast<size_t>(n * (k + kWidth) * weight.element_size());
  return weight.stride(0) == k + kWidth && weight.storage_offset() == 0 && weight.storage().nbytes() == bytes;
}

Augmented& augmented_weight(const at::Tensor& weight) {
  const bool in_place = lives_in_augmented_matrix(weight);
  // a copy must follow W's in-place changes (merge, unmerge); W's own matrix changes with it
  const int64_t version = in_place || weight.is_inference() ? 0 : weight._version();
  const c10::TensorImpl* key = weight.unsafeGetTensorImpl();
  auto it = augmented_weights.find(key);
  if (it == augmented_weights.end() || it->second.weight.expired() || it->second.version != version ||
      it->second.in_place != in_place) {
    for (auto i = augmented_weights.begin(); i != augmented_weights.end();)
      i = i->second.weight.expired() ? augmented_weights.erase(i) : std::next(i);
    const c10::InferenceMode normal_tensors(false);  // a cache made under inference mode must serve training
    const int64_t n = weight.size(0), k = weight.size(1);
    at::Tensor matrix;
    if (in_place) {  // a tensor of its own over W's storage, not a view of W: writing B must not count as changing W
      matrix = at::empty({0}, weight.options()).set_(weight.storage(), 0, {n, k + kWidth}, {k + kWidth, 1});
    } else {
      matrix = at::zeros({n, k + kWidth}, weight.options());
      matrix.narrow(1, 0, k).copy_(weight);
    }
    const Augmented entry{WeakTensorRef(weight.getIntrusivePtr()), version, in_place, matrix, nullptr, 0};
    it = augmented_weights.insert_or_assign(key, entry).first;
  }
  return it->second;
}

// x as the [M, K] matrix the kernels read, 16 bytes at a time: contiguous and 16-byte aligned.
at::Tensor as_rows(const at::Tensor& x) {
  at::Tensor x2 = x.reshape({-1, x.size(-1)});
  if (!x2.is_contiguous() || reinterpret_cast<uintptr_t>(x2.data_ptr()) % 16)
    x2 = x2.clone(at::MemoryFormat::Contiguous);
  return x2;
}

Tensors3 forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout) {
  const c10::OptionalDeviceGuard guard(x.device());
  const int64_t n = weight.size(0), padded = padded_rank(lora_A.size(0));
  const at::Tensor x2 = as_rows(x);
  const int64_t threshold = dropout_threshold(dropout);
  const double coef = dropout_coef(scaling, threshold);
  const at::Tensor b = lora_B.to(at::kFloat).contiguous();
  at::Tensor su, rng, y;
  {
    const std::lock_guard<std::mutex> lock(augmented_mutex);
    Augmented& w_aug = augmented_weight(weight);
    auto outs = lora_prep(x2, lora_A.to(x.scalar_type()).contiguous(), b, w_aug.matrix, padded, coef, threshold);
    const at::Tensor& x_aug = outs[0];
    su = outs[1], rng = outs[2];
    w_aug.written_b = lora_B.data_ptr();
    w_aug.written_coef = coef;
    y = bias ? at::addmm(*bias, x_aug, w_aug.matrix.t()) : at::mm(x_aug, w_aug.matrix.t());
  }
  std::vector<int64_t> y_shape = x.sizes().vec();
  y_shape.back() = n;
  return {y.view(y_shape), su, rng};
}

// x, su and rng as the forward saw and returned them. dx is empty unless need_dx.
Tensors3 backward_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& su, const at::Tensor& rng,
                       const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                       double dropout, bool need_dx) {
  const c10::OptionalDeviceGuard guard(dy.device());
  const int64_t rank = lora_A.size(0), k = lora_A.size(1), padded = padded_rank(rank);
  const at::Tensor dy2 = dy.reshape({-1, dy.size(-1)});
  const int64_t threshold = dropout_threshold(dropout);
  const double coef = dropout_coef(scaling, threshold);
  at::Tensor g, dx_base;  // g: [M, R] coef · dy B; dx_base: dy W, only with need_dx
  {
    const std::lock_guard<std::mutex> lock(augmented_mutex);
    Augmented& w_aug = augmented_weight(weight);
    if (w_aug.written_b != lora_B.data_ptr() || w_aug.written_coef != coef) {  // another adapter on this W ran
      w_aug.matrix.narrow(1, k, rank).copy_(lora_B.mul(coef));
      w_aug.written_b = lora_B.data_ptr();
      w_aug.written_coef = coef;
    }
    if (need_dx) {
      const at::Tensor dx_aug = at::mm(dy2, w_aug.matrix);  // [M, K + kWidth]: dy W, then g
      dx_base = dx_aug.narrow(1, 0, k);
      g = dx_aug.narrow(1, k, padded);
    } else {
      g = at::mm(dy2, w_aug.matrix.narrow(1, k, padded));
    }
  }
  auto outs = lora_fix(g, dx_base, as_rows(x), lora_A.to(dy.scalar_type()).contiguous(), padded, threshold, rng);
  at::Tensor dx = at::empty({0}, dy.options());
  if (need_dx) {
    std::vector<int64_t> dx_shape = dy.sizes().vec();
    dx_shape.back() = k;
    dx = outs[0].view(dx_shape);
  }
  at::Tensor d_B = at::mm(dy2.t(), su.narrow(1, 0, rank), at::kFloat);
  return {dx, outs[1].to(lora_A.scalar_type()), d_B.to(lora_B.scalar_type())};
}

class LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling,
                                                double dropout) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("phift::lora_linear_fused", "")
                         .typed<decltype(forward_cuda)>();
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, su, rng] = op.call(x, weight, bias, lora_A, lora_B, scaling, dropout);
    ctx->save_for_backward({x, su, rng, weight, lora_A, lora_B});
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout"] = dropout;
    ctx->mark_non_differentiable({su, rng});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for su, rng
    return {y, su, rng};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("phift::lora_linear_fused_backward", "")
                         .typed<decltype(backward_cuda)>();
    if (!grads[0].defined()) return torch::autograd::variable_list(7);
    const auto saved = ctx->get_saved_variables();
    const bool need_dx = ctx->needs_input_grad(0);
    auto [dx, d_A, d_B] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4], saved[5],
                                  ctx->saved_data["scaling"].toDouble(), ctx->saved_data["dropout"].toDouble(),
                                  need_dx);
    return {need_dx ? dx : at::Tensor(), at::Tensor(), at::Tensor(), d_A, d_B, at::Tensor(), at::Tensor()};
  }
};

Tensors3 forward_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling, double dropout) {
  auto outs = LoraLinearFunction::apply(x, weight, bias, lora_A, lora_B, scaling, dropout);
  return {outs[0], outs[1], outs[2]};
}

}  // namespace

TORCH_LIBRARY(phift, m) {
  m.def("lora_linear_fused(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout) -> (Tensor, Tensor, Tensor)");
  m.def("lora_linear_fused_backward(Tensor dy, Tensor x, Tensor su, Tensor rng, Tensor weight, "
        "Tensor lora_A, Tensor lora_B, float scaling, float dropout, bool need_dx) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(phift, CUDA, m) {
  m.impl("lora_linear_fused", &forward_cuda);
  m.impl("lora_linear_fused_backward", &backward_cuda);
}

TORCH_LIBRARY_IMPL(phift, Autograd, m) { m.impl("lora_linear_fused", &forward_autograd); }

// Importing the module registers the ops above; it has no Python functions of its own.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.doc() = "phift::lora_linear_fused (see torch.ops.phift)"; }
