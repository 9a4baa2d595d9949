// The two hand-written passes of the fused LoRA linear (lora_op.cpp strings them together with cuBLAS).
//
//   prep (forward):   x_aug = [x | u],  u = (mask ⊙ x) Aᵀ,  su = coef · u,  xm = mask ⊙ x (only with dropout),
//                     and the B block of the cached [W | coef·B]
//   fix (backward):   dx = dx_aug[:, :K] + mask ⊙ (g A),  g = dx_aug[:, K:K+r] = dy · coef·B
//
// coef = scaling / (1 - p). The dropout mask is never stored: both passes regenerate it with Philox4x32-10 from
// the same (seed, offset), one draw (as curand4) per 8-element vector, 16 random bits per element; an element is
// dropped when its bits are below `threshold` = p·2¹⁶ (the caller rounds p to that grid and uses it in coef).
//
// Both kernels give each block ROWS rows, walked in 8-element (16-byte) vectors by its threads, so that each
// vector of A loaded serves ROWS rows.
#include <ATen/ATen.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <vector>

namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per 16-byte access

template <typename T> struct Conv;
template <> struct Conv<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static __device__ float2 to_float2(T2 v) { return __bfloat1622float2(v); }
  static __device__ T2 from_float2(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <> struct Conv<__half> {
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
    typename Conv<T>::T2 h;
    memcpy(&h, &words[i], sizeof(h));
    const float2 f = Conv<T>::to_float2(h);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}

template <typename T>
__device__ __forceinline__ uint4 pack8(const float (&in)[kVec]) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const typename Conv<T>::T2 h = Conv<T>::from_float2(in[2 * i], in[2 * i + 1]);
    memcpy(&words[i], &h, sizeof(h));
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

template <typename P>
__device__ __forceinline__ uint4 load16(const P* p) { return *reinterpret_cast<const uint4*>(p); }
template <typename P>
__device__ __forceinline__ void store16(P* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// Bit e set <=> element e of vector `vec` is kept.
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

// Zero the 16-bit elements whose keep bit is clear (+0 in both fp16 and bf16).
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

struct PrepArgs {
  const void* x;      // [rows, k]
  const void* a;      // [rank, k], x's dtype
  const float* b;     // [n, rank]
  void* x_aug;        // [rows, k + width], width >= R
  void* xm;           // [rows, k], or null without dropout
  void* su;           // [rows, R]
  void* w_aug;        // [n, k + width]: its columns k.. receive coef·B
  int64_t* rng_out;   // [2]: the (seed, offset) the mask came from
  int64_t rows, k, n, rank, width;
  float coef;
  uint32_t threshold;
  at::PhiloxCudaState philox;
};

template <typename T, int R, int ROWS>
__global__ void __launch_bounds__(kThreads) prep_kernel(PrepArgs p) {
  static_assert((ROWS * R) % 32 == 0, "the per-row sums must fill whole warps");
  constexpr int kSums = ROWS * R;
  __shared__ float partial[kThreads / 32][kSums];
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  T* x_aug = static_cast<T*>(p.x_aug);
  T* xm = static_cast<T*>(p.xm);
  T* su = static_cast<T*>(p.su);
  T* w_aug = static_cast<T*>(p.w_aug);
  const int64_t ld_aug = p.k + p.width, nvec = p.k / kVec;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;

  uint64_t seed = 0, offset = 0;
  if (p.threshold) {
    const auto seed_offset = at::cuda::philox::unpack(p.philox);
    seed = std::get<0>(seed_offset);
    offset = std::get<1>(seed_offset);
  }
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (tid == 0) {
    p.rng_out[0] = static_cast<int64_t>(seed);
    p.rng_out[1] = static_cast<int64_t>(offset);
  }
  for (int64_t i = tid; i < p.n * p.rank; i += static_cast<int64_t>(gridDim.x) * kThreads)
    w_aug[(i / p.rank) * ld_aug + p.k + i % p.rank] = Conv<T>::from_float(p.coef * p.b[i]);

  float acc[kSums];
#pragma unroll
  for (int i = 0; i < kSums; ++i) acc[i] = 0.f;

  for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
    float xf[ROWS][kVec];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const int64_t row = row0 + r;
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (row < p.rows) {
        raw = load16(x + row * p.k + v * kVec);
        store16(x_aug + row * ld_aug + v * kVec, raw);
        if (p.threshold) {
          raw = apply_mask(raw, keep_bits(seed, offset, static_cast<uint64_t>(row * nvec + v), p.threshold));
          store16(xm + row * p.k + v * kVec, raw);
        }
      }
      unpack8<T>(raw, xf[r]);
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (j >= p.rank) break;
      float af[kVec];
      unpack8<T>(load16(a + j * p.k + v * kVec), af);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[r * R + j] = fmaf(xf[r][e], af[e], acc[r * R + j]);
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
    if (row >= p.rows) continue;
    float u = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) u += partial[w][i];
    x_aug[row * ld_aug + p.k + i % R] = Conv<T>::from_float(u);
    su[row * R + i % R] = Conv<T>::from_float(p.coef * u);
  }
  // padding columns: zero, never left uninitialized (NaN · 0 = NaN in the GEMM)
  const int64_t pad_vecs = (p.width - R) / kVec;
  for (int64_t i = threadIdx.x; i < ROWS * pad_vecs; i += kThreads) {
    const int64_t row = row0 + i / pad_vecs;
    if (row < p.rows) store16(x_aug + row * ld_aug + p.k + R + (i % pad_vecs) * kVec, make_uint4(0, 0, 0, 0));
  }
}

template <typename T, int R, int ROWS>
__global__ void __launch_bounds__(kThreads) fix_kernel(const T* __restrict__ dx_aug, const T* __restrict__ a,
                                                     T* __restrict__ dx, int64_t rows, int64_t k, int64_t width,
                                                     int64_t rank, uint32_t threshold,
                                                     const int64_t* __restrict__ rng) {
  __shared__ float g[ROWS][R];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int64_t ld_aug = k + width, nvec = k / kVec;
  for (int i = threadIdx.x; i < ROWS * R; i += kThreads) {
    const int64_t row = row0 + i / R;
    g[i / R][i % R] = row < rows ? Conv<T>::to_float(dx_aug[row * ld_aug + k + i % R]) : 0.f;
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
      if (j >= rank) break;
      float af[kVec];
      unpack8<T>(load16(a + j * k + v * kVec), af);
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
      unpack8<T>(load16(dx_aug + row * ld_aug + v * kVec), out);
      const uint32_t bits =
          threshold ? keep_bits(seed, offset, static_cast<uint64_t>(row * nvec + v), threshold) : 0xffu;
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if ((bits >> e) & 1u) out[e] += d[r][e];
      store16(dx + row * k + v * kVec, pack8<T>(out));
    }
  }
}

// Rows per block: enough to reuse each loaded vector of A a few times, few enough to keep the sums in registers.
template <int R> constexpr int prep_rows() { return R >= 32 ? 1 : 32 / R; }
constexpr int kFixRows = 4;

template <typename T, int R>
void launch_prep(const PrepArgs& args) {
  constexpr int rows_per_block = prep_rows<R>();
  const int64_t blocks = std::max<int64_t>(1, (args.rows + rows_per_block - 1) / rows_per_block);
  prep_kernel<T, R, rows_per_block><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int R>
void launch_fix(const at::Tensor& dx_aug, const at::Tensor& a, at::Tensor& dx, int64_t threshold,
                const at::Tensor& rng) {
  const int64_t rows = dx.size(0);
  fix_kernel<T, R, kFixRows><<<(rows + kFixRows - 1) / kFixRows, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      static_cast<const T*>(dx_aug.data_ptr()), static_cast<const T*>(a.data_ptr()), static_cast<T*>(dx.data_ptr()),
      rows, dx.size(1), dx_aug.size(1) - dx.size(1), a.size(0), static_cast<uint32_t>(threshold),
      rng.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs FN<T, R>(args...) for the dtype and the padded rank R.
#define PHIFT_DISPATCH(DTYPE, RANK, FN, ...)                                                            \
  do {                                                                                                  \
    const bool bf16 = (DTYPE) == at::kBFloat16;                                                         \
    TORCH_CHECK(bf16 || (DTYPE) == at::kHalf, "phift_lora_cuda: expected float16 or bfloat16");        \
    switch (RANK) {                                                                                     \
      case 8: bf16 ? FN<__nv_bfloat16, 8>(__VA_ARGS__) : FN<__half, 8>(__VA_ARGS__); break;            \
      case 16: bf16 ? FN<__nv_bfloat16, 16>(__VA_ARGS__) : FN<__half, 16>(__VA_ARGS__); break;         \
      case 32: bf16 ? FN<__nv_bfloat16, 32>(__VA_ARGS__) : FN<__half, 32>(__VA_ARGS__); break;         \
      case 64: bf16 ? FN<__nv_bfloat16, 64>(__VA_ARGS__) : FN<__half, 64>(__VA_ARGS__); break;         \
      default: TORCH_CHECK(false, "phift_lora_cuda: padded rank must be 8, 16, 32 or 64, got ", RANK); \
    }                                                                                                   \
  } while (0)

void check_matrix(const at::Tensor& t, const char* name, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.size(1) == cols && t.is_contiguous() && t.scalar_type() == dtype,
              "phift_lora_cuda: ", name, " must be a contiguous 2-D CUDA ", dtype, " tensor with ", cols, " columns");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "phift_lora_cuda: ", name,
              " must be 16-byte aligned");
}

}  // namespace

// x: [M, K]; a: A in x's dtype, [r, K]; b: B in fp32, [N, r]; w_aug: [N, K + width], whose columns K.. this
// fills with coef·B. Returns x_aug [M, K + width], xm [M, K] (no rows without dropout), su [M, R] and the Philox
// (seed, offset). R (8, 16, 32 or 64) is the rank the kernels run at; width >= R pads the GEMMs' extra columns.
std::vector<at::Tensor> lora_prep(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, at::Tensor& w_aug,
                                  int64_t padded_rank, double coef, int64_t threshold) {
  const int64_t rows = x.size(0), k = x.size(1), n = b.size(0), rank = a.size(0), width = w_aug.size(1) - k;
  TORCH_CHECK(k % kVec == 0 && width % kVec == 0, "phift_lora_cuda: in_features and width must be multiples of 8");
  TORCH_CHECK(threshold >= 0 && threshold < 65536, "phift_lora_cuda: bad dropout threshold ", threshold);
  TORCH_CHECK(rank <= padded_rank && padded_rank <= width && b.size(1) == rank && w_aug.size(0) == n,
              "phift_lora_cuda: shapes disagree");
  check_matrix(x, "x", k, x.scalar_type());
  check_matrix(a, "lora_A", k, x.scalar_type());
  check_matrix(b, "lora_B", rank, at::kFloat);
  check_matrix(w_aug, "[W | B]", k + width, x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_aug = at::empty({rows, k + width}, x.options());
  at::Tensor xm = at::empty({threshold ? rows : 0, k}, x.options());
  at::Tensor su = at::empty({rows, padded_rank}, x.options());
  at::Tensor rng = at::empty({2}, x.options().dtype(at::kLong));
  PrepArgs args{x.data_ptr(), a.data_ptr(), b.data_ptr<float>(), x_aug.data_ptr(), xm.data_ptr(), su.data_ptr(),
                w_aug.data_ptr(), rng.data_ptr<int64_t>(), rows, k, n, rank, width, static_cast<float>(coef),
                static_cast<uint32_t>(threshold), {}};
  if (threshold) {
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(std::nullopt,
                                                                  at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    args.philox = gen->philox_cuda_state(4);  // one Philox draw per subsequence
  }
  PHIFT_DISPATCH(x.scalar_type(), padded_rank, launch_prep, args);
  return {x_aug, xm, su, rng};
}

// dx_aug: [M, K + width] = dy · [W | coef·B]; a: [r, K] in dy's dtype. Returns dx [M, K].
at::Tensor lora_fix(const at::Tensor& dx_aug, const at::Tensor& a, int64_t padded_rank, int64_t threshold,
                    const at::Tensor& rng) {
  const int64_t k = a.size(1), width = dx_aug.size(1) - k;
  TORCH_CHECK(k % kVec == 0 && a.size(0) <= padded_rank && padded_rank <= width, "phift_lora_cuda: shapes disagree");
  check_matrix(dx_aug, "dx_aug", k + width, dx_aug.scalar_type());
  check_matrix(a, "lora_A", k, dx_aug.scalar_type());
  TORCH_CHECK(rng.is_cuda() && rng.scalar_type() == at::kLong && rng.numel() == 2, "phift_lora_cuda: bad rng state");
  const c10::cuda::CUDAGuard guard(dx_aug.device());
  at::Tensor dx = at::empty({dx_aug.size(0), k}, dx_aug.options());
  if (dx.size(0) > 0) PHIFT_DISPATCH(dx_aug.scalar_type(), padded_rank, launch_fix, dx_aug, a, dx, threshold, rng);
  return dx;
}
