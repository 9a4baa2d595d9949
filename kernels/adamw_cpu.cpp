// The op `phift_cpu::adamw_master_`: the CPU twin of adamw_cuda.cu. AdamW over fp16/bf16 weights with fp32 master
// weights and moments, in one pass over each tensor: read the half gradient, update master and both moments, write
// the rounded weight. 28 bytes a parameter, where an fp32 CPU Adam needs its gradient converted to fp32 first and its
// weights converted back after (two more passes). Threads: torch's intra-op pool (torch.set_num_threads). x86 CPUs
// with AVX2, FMA and F16C (-march=native finds them) take 8 elements at a time; others run the scalar loop.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "adamw_args.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define PHIFT_AVX2 1
#endif

namespace {

struct Hyper : phift::AdamWStep {
  float scale;  // the clipping coefficient (× 1 / loss scale), read once on the host
};

inline float adamw(float g, float& p, float& m, float& v, const Hyper& h) {
  p -= h.lr * h.weight_decay * p;
  m = h.beta1 * m + (1.f - h.beta1) * g;
  v = h.beta2 * v + (1.f - h.beta2) * g * g;
  const float denom = std::sqrt(v) / h.bias_correction2_sqrt + h.eps;
  p -= h.step_size * m / denom;
  return p;
}

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }
template <typename T>
inline T from_float(float x) { return static_cast<T>(x); }  // c10's Half and BFloat16 round to nearest even

#ifdef PHIFT_AVX2
// 8 halves <-> 8 floats. bf16 is the top half of an fp32; rounding to it is round-to-nearest-even, NaN kept quiet.
template <typename T> inline __m256 load8(const T* p);
template <> inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <> inline __m256 load8(const c10::BFloat16* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
template <typename T> inline void store8(T* p, __m256 x);
template <> inline void store8(c10::Half* p, __m256 x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}
template <> inline void store8(c10::BFloat16* p, __m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
  // 8 × 32-bit lanes holding 16-bit values → 8 × 16 bits (packus works within 128-bit halves: fix the order after)
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

template <typename T>
void update_avx2(T* w, const T* g, float* p, float* m, float* v, int64_t begin, int64_t end, const Hyper& h) {
  const __m256 lr_wd = _mm256_set1_ps(h.lr * h.weight_decay), b1 = _mm256_set1_ps(h.beta1),
               b2 = _mm256_set1_ps(h.beta2), c1 = _mm256_set1_ps(1.f - h.beta1), c2 = _mm256_set1_ps(1.f - h.beta2),
               eps = _mm256_set1_ps(h.eps), step = _mm256_set1_ps(h.step_size),
               inv_bc2 = _mm256_set1_ps(1.f / h.bias_correction2_sqrt), scale = _mm256_set1_ps(h.scale);
  int64_t i = begin;
  for (; i + 8 <= end; i += 8) {
    const __m256 gi = _mm256_mul_ps(load8(g + i), scale);
    __m256 pi = _mm256_loadu_ps(p + i), mi = _mm256_loadu_ps(m + i), vi = _mm256_loadu_ps(v + i);
    pi = _mm256_sub_ps(pi, _mm256_mul_ps(lr_wd, pi));
    mi = _mm256_add_ps(_mm256_mul_ps(b1, mi), _mm256_mul_ps(c1, gi));
    vi = _mm256_add_ps(_mm256_mul_ps(b2, vi), _mm256_mul_ps(_mm256_mul_ps(c2, gi), gi));
    // × 1/√bc2 rather than ÷ √bc2 (within an ulp; one division a vector fewer keeps one core at the memory rate)
    const __m256 denom = _mm256_fmadd_ps(_mm256_sqrt_ps(vi), inv_bc2, eps);
    pi = _mm256_sub_ps(pi, _mm256_div_ps(_mm256_mul_ps(step, mi), denom));
    _mm256_storeu_ps(p + i, pi);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    store8(w + i, pi);
  }
  for (; i < end; ++i) w[i] = from_float<T>(adamw(to_float(g[i]) * h.scale, p[i], m[i], v[i], h));
}
#endif

template <typename T>
void update(at::Tensor& weight, const at::Tensor& grad, at::Tensor& master, at::Tensor& exp_avg,
            at::Tensor& exp_avg_sq, const Hyper& h) {
  T* w = weight.data_ptr<T>();
  const T* g = grad.data_ptr<T>();
  float *p = master.data_ptr<float>(), *m = exp_avg.data_ptr<float>(), *v = exp_avg_sq.data_ptr<float>();
  at::parallel_for(0, weight.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
#ifdef PHIFT_AVX2
    update_avx2<T>(w, g, p, m, v, begin, end, h);
#else
    for (int64_t i = begin; i < end; ++i) w[i] = from_float<T>(adamw(to_float(g[i]) * h.scale, p[i], m[i], v[i], h));
#endif
  });
}

}  // namespace

void adamw_master_cpu(at::TensorList weights, at::TensorList grads, at::TensorList masters, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, const c10::optional<at::Tensor>& clip_coef, double lr, double beta1,
                      double beta2, double eps, double weight_decay, at::ArrayRef<double> steps) {
  phift::check_adamw_lists(weights, grads, masters, exp_avgs, exp_avg_sqs, steps);
  const size_t n = weights.size();
  float scale = 1.f;
  if (clip_coef.has_value()) {
    TORCH_CHECK(clip_coef->numel() == 1, "adamw_master_: clip_coef must hold one value");
    scale = clip_coef->item<float>();
  }
  if (!std::isfinite(scale)) return;  // the gradients were not finite: the step is skipped
  for (size_t i = 0; i < n; ++i) {
    at::Tensor w = weights[i], g = grads[i], p = masters[i], m = exp_avgs[i], v = exp_avg_sqs[i];
    phift::check_adamw_tensor(w, g, p, m, v, at::kCPU);
    const Hyper h{phift::adamw_step(lr, beta1, beta2, eps, weight_decay, steps[i]), scale};
    if (w.scalar_type() == at::kBFloat16)
      update<c10::BFloat16>(w, g, p, m, v, h);
    else
      update<c10::Half>(w, g, p, m, v, h);
  }
}

bool vectorised() {
#ifdef PHIFT_AVX2
  return true;
#else
  return false;
#endif
}

TORCH_LIBRARY(phift_cpu, m) {
  m.def("adamw_master_(Tensor(a!)[] weights, Tensor[] grads, Tensor(b!)[] masters, Tensor(c!)[] exp_avgs, "
        "Tensor(d!)[] exp_avg_sqs, Tensor? clip_coef, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, float[] steps) -> ()");
}

TORCH_LIBRARY_IMPL(phift_cpu, CPU, m) { m.impl("adamw_master_", &adamw_master_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("vectorised", &vectorised, "whether the AVX2/F16C path was built"); }
