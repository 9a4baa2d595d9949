// The two hand-written passes of the fused LoRA linear; cuBLAS does every matrix product.
//
//   forward   prep:  x_aug = [x | su],  su = coef · (mask ⊙ x) Aᵀ,  xm = mask ⊙ x (only with dropout)
//             then   y = x_aug · [W | B]ᵀ + b          (one GEMM over K + R: the LoRA term rides along)
//   backward         dx_aug = dy · [W | B]             (one GEMM; its last R columns are g = dy B)
//             fix:   dx = dx_aug[:, :K] + coef · mask ⊙ (g A)
//
// coef = scaling / (1 - p). The dropout mask is never stored: both passes regenerate it from Philox with the
// same (seed, offset), one Philox4x32-10 draw (as curand4) per 8-element vector, 16 random bits per element (p is rounded to a
// multiple of 1/65536 by the caller, which also uses that rounded p in coef).
#include <ATen/ATen.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <tuple>

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per 16-byte access

template <typename T> struct Pair;
template <> struct Pair<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ T2 from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Pair<__half> {
  using T2 = __half2;
  static __device__ float2 to_float2(T2 v) { return __half22float2(v); }
  static __device__ T2 from_float2(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ float to_float(__half v) { return __half2float(v); }
  static __device__ __half from_float(float v) { return __float2half_rn(v); }
};

template <typename T>
__device__ __forceinline__ void unpack8(uint4 raw, float (&out)[kVec]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    typename Pair<T>::T2 h;
    memcpy(&h, &words[i], sizeof(h));
    const float2 f = Pair<T>::to_float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&in)[kVec]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const typename Pair<T>::T2 h = Pair<T>::from_float2(in[2 * i], in[2 * i + 1]);
    memcpy(&words[i], &h, sizeof(h));
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// Bit e set <=> element e of vector `vec` is kept. Draw 16 bits per element, keep when >= threshold.
__device__ __forceinline__ uint32_t keep_bits(uint64_t seed, uint64_t offset, uint64_t vec, uint32_t threshold) {
  at::Philox4_32 engine(seed, vec, offset / 4);  // the stream of curand_init(seed, vec, offset); curand4()
  const uint32_t words[4] = {engine(), engine(), engine(), engine()};
  uint32_t bits = 0;
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    const uint32_t draw = (words[e / 2] >> (16 * (e % 2))) & 0xffffu;
    bits |= static_cast<uint32_t>(draw >= threshold) << e;
  }
  return bits;
}

// Zero the 16-bit elements of a raw vector whose keep bit is clear (+0 in both fp16 and bf16).
__device__ __forceinline__ uint4 apply_mask(uint4 raw, uint32_t bits) {
  uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t lo = (bits >> (2 * i)) & 1u ? 0x0000ffffu : 0u;
    const uint32_t hi = (bits >> (2 * i + 1)) & 1u ? 0xffff0000u : 0u;
    words[i] &= lo | hi;
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

// Sum 32 per-lane values over the warp in 31 shuffles: afterwards lane l holds the warp-wide sum of a[l].
// Each stage trades half of the live values with the partner lane, so the work halves as the stride does.
template <int W>
__device__ __forceinline__ void transpose_reduce_stage(float (&a)[32], int lane) {
  const bool upper = lane & W;
#pragma unroll
  for (int i = 0; i < W; ++i) {
    const float send = upper ? a[i] : a[i + W];
    const float keep = upper ? a[i + W] : a[i];
    a[i] = keep + __shfl_xor_sync(0xffffffffu, send, W);
  }
}

__device__ __forceinline__ float transpose_reduce(float (&a)[32], int lane) {
  transpose_reduce_stage<16>(a, lane);
  transpose_reduce_stage<8>(a, lane);
  transpose_reduce_stage<4>(a, lane);
  transpose_reduce_stage<2>(a, lane);
  transpose_reduce_stage<1>(a, lane);
  return a[0];
}

// One block per ROWS rows; each thread walks the row in 8-element vectors, reusing every vector of A it loads
// for all ROWS rows. ROWS * R is a multiple of 32 so the per-thread partial sums reduce in whole warps.
template <typename T, int R, int ROWS>
__global__ void __launch_bounds__(kThreads) prep_kernel(
    const T* __restrict__ x, const T* __restrict__ a, T* __restrict__ x_aug, T* __restrict__ xm,
    T* __restrict__ su, int64_t rows, int64_t k, float coef, uint32_t threshold, at::PhiloxCudaState philox,
    int64_t* __restrict__ rng_out) {
  static_assert((ROWS * R) % 32 == 0, "partial sums must fill whole warps");
  constexpr int kSums = ROWS * R;
  __shared__ float partial[kThreads / 32][kSums];

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int64_t nvec = k / kVec;
  const int64_t ld_aug = k + R;
  uint64_t seed = 0, offset = 0;
  if (threshold) {
    const auto seed_offset = at::cuda::philox::unpack(philox);
    seed = std::get<0>(seed_offset);
    offset = std::get<1>(seed_offset);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
      rng_out[0] = static_cast<int64_t>(seed);
      rng_out[1] = static_cast<int64_t>(offset);
    }
  }

  float acc[kSums];
#pragma unroll
  for (int i = 0; i < kSums; ++i) acc[i] = 0.f;

  for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
    float xf[ROWS][kVec];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = row0 + r;
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (row < rows) {
        raw = *reinterpret_cast<const uint4*>(x + row * k + v * kVec);
        *reinterpret_cast<uint4*>(x_aug + row * ld_aug + v * kVec) = raw;
        if (threshold) {
          raw = apply_mask(raw, keep_bits(seed, offset, static_cast<uint64_t>(row * nvec + v), threshold));
          *reinterpret_cast<uint4*>(xm + row * k + v * kVec) = raw;
        }
      }
      unpack8<T>(raw, xf[r]);
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      float af[kVec];
      unpack8<T>(*reinterpret_cast<const uint4*>(a + j * k + v * kVec), af);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[r * R + j] = fmaf(xf[r][e], af[e], acc[r * R + j]);
      }
    }
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int g = 0; g < kSums / 32; ++g) {
    float chunk[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) chunk[i] = acc[g * 32 + i];
    partial[warp][g * 32 + lane] = transpose_reduce(chunk, lane);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kSums; i += kThreads) {
    const int64_t row = row0 + i / R;
    if (row >= rows) continue;
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) sum += partial[w][i];
    const T value = Pair<T>::from_float(coef * sum);
    x_aug[row * ld_aug + k + i % R] = value;
    su[row * R + i % R] = value;
  }
}

// One block per ROWS rows: dx = dx_aug[:, :K] + coef · mask ⊙ (g A), g = dx_aug[:, K:K+R].
template <typename T, int R, int ROWS>
__global__ void __launch_bounds__(kThreads) fix_kernel(
    const T* __restrict__ dx_aug, const T* __restrict__ a, T* __restrict__ dx, int64_t rows, int64_t k,
    float coef, uint32_t threshold, const int64_t* __restrict__ rng) {
  __shared__ float g[ROWS][R];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int64_t nvec = k / kVec;
  const int64_t ld_aug = k + R;
  for (int i = threadIdx.x; i < ROWS * R; i += kThreads) {
    const int64_t row = row0 + i / R;
    g[i / R][i % R] = row < rows ? coef * Pair<T>::to_float(dx_aug[row * ld_aug + k + i % R]) : 0.f;
  }
  uint64_t seed = 0, offset = 0;
  if (threshold) {
    seed = static_cast<uint64_t>(rng[0]);
    offset = static_cast<uint64_t>(rng[1]);
  }
  __syncthreads();

  for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
    float d[ROWS][kVec];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int e = 0; e < kVec; ++e) d[r][e] = 0.f;
#pragma unroll 8  // full unrolling would hoist all R vectors of A into registers
    for (int j = 0; j < R; ++j) {
      float af[kVec];
      unpack8<T>(*reinterpret_cast<const uint4*>(a + j * k + v * kVec), af);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float gj = g[r][j];
#pragma unroll
        for (int e = 0; e < kVec; ++e) d[r][e] = fmaf(gj, af[e], d[r][e]);
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = row0 + r;
      if (row >= rows) continue;
      float out[kVec];
      unpack8<T>(*reinterpret_cast<const uint4*>(dx_aug + row * ld_aug + v * kVec), out);
      const uint32_t bits =
          threshold ? keep_bits(seed, offset, static_cast<uint64_t>(row * nvec + v), threshold) : 0xffu;
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if ((bits >> e) & 1u) out[e] += d[r][e];
      *reinterpret_cast<uint4*>(dx + row * k + v * kVec) = pack8<T>(out);
    }
  }
}

// Rows per block: enough to reuse each loaded vector of A a few times, few enough to keep the sums in registers.
template <int R> constexpr int prep_rows() { return R >= 32 ? 1 : 32 / R; }
constexpr int kFixRows = 4;

template <typename T, int R>
void launch_prep(const at::Tensor& x, const at::Tensor& a, at::Tensor& x_aug, at::Tensor& xm, at::Tensor& su,
                 at::Tensor& rng, double coef, int64_t threshold, const at::PhiloxCudaState& philox) {
  constexpr int rows_per_block = prep_rows<R>();
  const int64_t rows = x.size(0), k = x.size(1);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  prep_kernel<T, R, rows_per_block><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(x.data_ptr()), reinterpret_cast<const T*>(a.data_ptr()),
      reinterpret_cast<T*>(x_aug.data_ptr()), threshold ? reinterpret_cast<T*>(xm.data_ptr()) : nullptr,
      reinterpret_cast<T*>(su.data_ptr()), rows, k, static_cast<float>(coef), static_cast<uint32_t>(threshold),
      philox, rng.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int R>
void launch_fix(const at::Tensor& dx_aug, const at::Tensor& a, at::Tensor& dx, double coef, int64_t threshold,
                const at::Tensor& rng) {
  const int64_t rows = dx.size(0), k = dx.size(1);
  const int64_t blocks = (rows + kFixRows - 1) / kFixRows;
  fix_kernel<T, R, kFixRows><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(dx_aug.data_ptr()), reinterpret_cast<const T*>(a.data_ptr()),
      reinterpret_cast<T*>(dx.data_ptr()), rows, k, static_cast<float>(coef), static_cast<uint32_t>(threshold),
      rng.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs FN<T, R>(args...) for the tensor's dtype and the padded rank R.
#define PHIFT_DISPATCH(DTYPE, RANK, FN, ...)                                                              \
  do {                                                                                                    \
    const bool bf16 = (DTYPE) == at::kBFloat16;                                                           \
    TORCH_CHECK(bf16 || (DTYPE) == at::kHalf, "phift_lora_cuda: expected float16 or bfloat16");          \
    switch (RANK) {                                                                                       \
      case 8: bf16 ? FN<__nv_bfloat16, 8>(__VA_ARGS__) : FN<__half, 8>(__VA_ARGS__); break;              \
      case 16: bf16 ? FN<__nv_bfloat16, 16>(__VA_ARGS__) : FN<__half, 16>(__VA_ARGS__); break;           \
      case 32: bf16 ? FN<__nv_bfloat16, 32>(__VA_ARGS__) : FN<__half, 32>(__VA_ARGS__); break;           \
      case 64: bf16 ? FN<__nv_bfloat16, 64>(__VA_ARGS__) : FN<__half, 64>(__VA_ARGS__); break;           \
      default: TORCH_CHECK(false, "phift_lora_cuda: padded rank must be 8, 16, 32 or 64, got ", RANK);   \
    }                                                                                                     \
  } while (0)

void check_rows(const at::Tensor& t, const char* name, int64_t cols) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.size(1) == cols && t.is_contiguous(), "phift_lora_cuda: ", name,
              " must be a contiguous 2-D CUDA tensor with ", cols, " columns");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "phift_lora_cuda: ", name,
              " must be 16-byte aligned");
}

}  // namespace

// x: [M, K], a: [R, K] (A padded with zero rows, in x's dtype). Returns x_aug [M, K+R], xm [M, K] (empty without
// dropout), su [M, R] and the Philox (seed, offset) the mask came from.
std::vector<at::Tensor> lora_prep(const at::Tensor& x, const at::Tensor& a, double coef, int64_t threshold) {
  const int64_t rows = x.size(0), k = x.size(1), rank = a.size(0);
  TORCH_CHECK(k % kVec == 0, "phift_lora_cuda: in_features must be a multiple of 8");
  TORCH_CHECK(threshold >= 0 && threshold < 65536, "phift_lora_cuda: bad dropout threshold");
  check_rows(x, "x", k);
  check_rows(a, "lora_A", k);
  TORCH_CHECK(a.scalar_type() == x.scalar_type(), "phift_lora_cuda: lora_A must be cast to x's dtype");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_aug = at::empty({rows, k + rank}, x.options());
  at::Tensor xm = at::empty({threshold ? rows : 0, k}, x.options());
  at::Tensor su = at::empty({rows, rank}, x.options());
  at::Tensor rng = at::zeros({2}, x.options().dtype(at::kLong));
  at::PhiloxCudaState philox;
  if (threshold) {
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(std::nullopt,
                                                                  at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    philox = gen->philox_cuda_state(4);  // one curand4 draw per subsequence
  }
  if (rows > 0)
    PHIFT_DISPATCH(x.scalar_type(), rank, launch_prep, x, a, x_aug, xm, su, rng, coef, threshold, philox);
  return {x_aug, xm, su, rng};
}

// dx_aug: [M, K+R] = dy · [W | B]; a: [R, K]. Returns dx [M, K].
at::Tensor lora_fix(const at::Tensor& dx_aug, const at::Tensor& a, double coef, int64_t threshold,
                    const at::Tensor& rng) {
  const int64_t rank = a.size(0), k = a.size(1), rows = dx_aug.size(0);
  TORCH_CHECK(k % kVec == 0, "phift_lora_cuda: in_features must be a multiple of 8");
  check_rows(dx_aug, "dx_aug", k + rank);
  check_rows(a, "lora_A", k);
  TORCH_CHECK(a.scalar_type() == dx_aug.scalar_type(), "phift_lora_cuda: lora_A must be cast to dy's dtype");
  TORCH_CHECK(rng.is_cuda() && rng.scalar_type() == at::kLong && rng.numel() == 2, "phift_lora_cuda: bad rng state");
  const c10::cuda::CUDAGuard guard(dx_aug.device());
  at::Tensor dx = at::empty({rows, k}, dx_aug.options());
  if (rows > 0)
    PHIFT_DISPATCH(dx_aug.scalar_type(), rank, launch_fix, dx_aug, a, dx, coef, threshold, rng);
  return dx;
}
