// The two hand-written passes of the fused LoRA linear (lora_op.cpp strings them together with cuBLAS).
//
//   prep (forward):   x_aug = [x | u],  u = (mask ⊙ x) Aᵀ,  su = coef · u,  and the B block of the cached [W | coef·B]
//   fix (backward):   dx = dx_aug[:, :K] + mask ⊙ (g A)  and  dA = gᵀ (mask ⊙ x),  g = dx_aug[:, K:K+r] = dy · coef·B
//
// coef = scaling / (1 - p). Neither the dropout mask nor mask ⊙ x is ever stored: fix reads x itself and both passes
// regenerate the mask with Philox4x32-10 from the same (seed, offset), one draw (as curand4) per 8-element vector,
// 16 random bits per element; an element is dropped when its bits are below `threshold` = p·2¹⁶ (the caller rounds
// p to that grid and uses it in coef).
//
// prep gives each block ROWS rows, walked in 8-element (16-byte) vectors by its threads, so that each vector of A
// loaded serves ROWS rows. fix gives each lane one 8-element column vector and 8 of the R ranks (R / 8 lanes share a
// vector), so that the lane's 8×8 blocks of A and of dA stay in registers while its warp walks rows; the 8 warps of
// a block walk different rows of the same columns, and add their dA sums up in shared memory into one fp32 partial
// per block of rows, which launch_fix then sums: a fixed order, so dA comes out the same on every run.
#include <ATen/ATen.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <ATen/cuda/PhiloxUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common.cuh"

#include <algorithm>
#include <mutex>
#include <vector>

namespace {

using namespace phift;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// E consecutive 16-bit elements, read or written as one access.
template <int E> struct Elems;
template <> struct Elems<8> { using type = uint4; };
template <> struct Elems<4> { using type = uint2; };
template <> struct Elems<2> { using type = uint32_t; };
template <> struct Elems<1> { using type = uint16_t; };

template <int E, typename P>
__device__ __forceinline__ typename Elems<E>::type load(const P* p) {
  return *reinterpret_cast<const typename Elems<E>::type*>(p);
}
template <int E, typename P>  // __stwb is a plain store, but one the compiler cannot split into narrower ones
__device__ __forceinline__ void store(P* p, typename Elems<E>::type v) {
  __stwb(reinterpret_cast<typename Elems<E>::type*>(p), v);
}

template <typename T, int E>
__device__ __forceinline__ void unpack(typename Elems<E>::type raw, float (&out)[E]) {
  if constexpr (E == 1) {
    T h;
    memcpy(&h, &raw, sizeof(h));
    out[0] = Conv<T>::to_float(h);
  } else {
    typename Conv<T>::T2 h[E / 2];
    memcpy(h, &raw, sizeof(h));
#pragma unroll
    for (int i = 0; i < E / 2; ++i) {
      const float2 f = Conv<T>::to_float2(h[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
}

// Built from 32-bit words (a memcpy into the vector type would make the compiler split its store).
template <typename T, int E>
__device__ __forceinline__ typename Elems<E>::type pack(const float (&in)[E]) {
  if constexpr (E == 1) {
    const T h = Conv<T>::from_float(in[0]);
    uint16_t raw;
    memcpy(&raw, &h, sizeof(raw));
    return raw;
  } else {
    uint32_t w[E / 2];
#pragma unroll
    for (int i = 0; i < E / 2; ++i) {
      const typename Conv<T>::T2 h = Conv<T>::from_float2(in[2 * i], in[2 * i + 1]);
      memcpy(&w[i], &h, sizeof(h));
    }
    if constexpr (E == 8) return make_uint4(w[0], w[1], w[2], w[3]);
    else if constexpr (E == 4) return make_uint2(w[0], w[1]);
    else return w[0];
  }
}

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

// One step of a butterfly reduce-scatter between lanes that differ in bit W: of its first N values a lane keeps
// the half that bit selects (lanes with it set, the upper half), adds its partner's copy, and stores it in a[0, N/2).
template <int W, int N, int L>
__device__ __forceinline__ void halve(float (&a)[L], int lane) {
  const bool upper = lane & W;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const float send = upper ? a[i] : a[i + N / 2];
    const float keep = upper ? a[i + N / 2] : a[i];
    a[i] = keep + __shfl_xor_sync(0xffffffffu, send, W);
  }
}

// Sum 32 per-lane values over the warp in 31 shuffles: afterwards lane l holds the warp-wide sum of a[l].
__device__ __forceinline__ float transpose_reduce(float (&a)[32], int lane) {
  halve<16, 32>(a, lane);
  halve<8, 16>(a, lane);
  halve<4, 8>(a, lane);
  halve<2, 4>(a, lane);
  halve<1, 2>(a, lane);
  return a[0];
}

struct PrepArgs {
  const void* x;      // [rows, k]
  const void* a;      // [rank, k], x's dtype
  const float* b;     // [n, rank]
  void* x_aug;        // [rows, k + width], width >= R
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
  __shared__ float partial[kWarps][kSums];
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  T* x_aug = static_cast<T*>(p.x_aug);
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
        raw = load<kVec>(x + row * p.k + v * kVec);
        store<kVec>(x_aug + row * ld_aug + v * kVec, raw);
        if (p.threshold)
          raw = apply_mask(raw, keep_bits(seed, offset, static_cast<uint64_t>(row * nvec + v), p.threshold));
      }
      unpack<T, kVec>(raw, xf[r]);
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      if (j >= p.rank) break;
      float af[kVec];
      unpack<T, kVec>(load<kVec>(a + j * p.k + v * kVec), af);
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
    for (int w = 0; w < kWarps; ++w) u += partial[w][i];
    x_aug[row * ld_aug + p.k + i % R] = Conv<T>::from_float(u);
    su[row * R + i % R] = Conv<T>::from_float(p.coef * u);
  }
  // padding columns: zero, never left uninitialized (NaN · 0 = NaN in the GEMM)
  const int64_t pad_vecs = (p.width - R) / kVec;
  for (int64_t i = threadIdx.x; i < ROWS * pad_vecs; i += kThreads) {
    const int64_t row = row0 + i / pad_vecs;
    if (row < p.rows) store<kVec>(x_aug + row * ld_aug + p.k + R + (i % pad_vecs) * kVec, make_uint4(0, 0, 0, 0));
  }
}

struct FixArgs {
  const void* g;        // [rows, >= R], row stride ld_g: coef · dy B (its columns from rank on are ignored)
  const void* dx_base;  // [rows, k], row stride ld_base: dy W; null when dx is not wanted
  const void* x;        // [rows, k]
  const void* a;        // [rank, k], x's dtype
  void* dx;             // [rows, k]; null when not wanted
  float* da_partial;    // [gridDim.y, rank, k]: dA summed over each block row's rows
  const int64_t* rng;   // the (seed, offset) prep drew the mask with
  int64_t rows, k, rank, ld_g, ld_base, rows_per_block;
  uint32_t threshold;
};

// Rows each warp of fix has loads in flight for: a block (one per SM: its A and dA take 128 registers a thread)
// keeps 256 threads × 4 rows × 32 bytes of x and dy W in flight, about what an H100 needs to reach full bandwidth.
constexpr int kInFlight = 4;

template <typename T, int R>
__global__ void __launch_bounds__(kThreads, 1) fix_kernel(FixArgs p) {
  constexpr int kLanes = R / kVec;        // lanes per column vector, each holding 8 of the R ranks
  constexpr int kElems = kVec / kLanes;   // elements of the vector whose dx each of them writes
  constexpr int kSteps = kInFlight > kLanes ? kInFlight : kLanes;  // rows per unrolled iteration
  using Part = typename Elems<kElems>::type;
  struct Row {
    uint4 x, g;  // the vector of x, the lane's 8 values of g
    Part base;   // the lane's elements of dy W
  };
  __shared__ float exchange[kWarps / 2][kVec * kVec][32];

  const T* g = static_cast<const T*>(p.g);
  const T* dx_base = static_cast<const T*>(p.dx_base);
  const T* x = static_cast<const T*>(p.x);
  const T* a = static_cast<const T*>(p.a);
  T* dx = static_cast<T*>(p.dx);
  const bool want_dx = dx != nullptr;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, sub = lane % kLanes;
  const int64_t nvec = p.k / kVec;
  const int64_t vec = static_cast<int64_t>(blockIdx.x) * (32 / kLanes) + lane / kLanes;
  const bool valid = vec < nvec;  // the same for the kLanes lanes of a vector, which alone trade values
  const int64_t col = vec * kVec;
  const int j0 = sub * kVec;  // the lane's first rank

  float a_blk[kVec][kVec], acc[kVec][kVec];  // A[j0 + i][col + e] and dA[j0 + i][col + e]
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    if (valid && j0 + i < p.rank) {
      unpack<T, kVec>(load<kVec>(a + (j0 + i) * p.k + col), a_blk[i]);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) a_blk[i][e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) acc[i][e] = 0.f;
  }
  uint64_t seed = 0, offset = 0;
  if (p.threshold) {
    seed = static_cast<uint64_t>(p.rng[0]);
    offset = static_cast<uint64_t>(p.rng[1]);
  }

  // The warp's rows: row0, row0 + 8, ... below `end`; step n is row row0 + 8n.
  const int64_t first = static_cast<int64_t>(blockIdx.y) * p.rows_per_block;
  const int64_t end = std::min(first + p.rows_per_block, p.rows), row0 = first + warp;
  const int64_t steps = row0 < end ? (end - row0 + kWarps - 1) / kWarps : 0;
  auto fetch = [&](int64_t n) {
    const int64_t row = row0 + n * kWarps;
    Row r{make_uint4(0, 0, 0, 0), load<kVec>(g + row * p.ld_g + j0), Part{}};
    if (valid) {
      r.x = load<kVec>(x + row * p.k + col);
      if (want_dx) r.base = load<kElems>(dx_base + row * p.ld_base + col + sub * kElems);
    }
    return r;
  };

  Row ring[kInFlight];
#pragma unroll
  for (int s = 0; s < kInFlight; ++s) ring[s] = s < steps ? fetch(s) : Row{};
  uint32_t drawn = 0xffu;  // keep bits of row (n + sub) at the last step n that drew
  for (int64_t n0 = 0; n0 < steps; n0 += kSteps) {
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
      const int64_t n = n0 + s;  // warp-uniform, as is every branch on it: the shuffles see all lanes
      if (n >= steps) break;
      // The kLanes lanes of a vector draw the bits of kLanes consecutive rows at once and pass them round.
      if (p.threshold && s % kLanes == 0)
        drawn = keep_bits(seed, offset, static_cast<uint64_t>((row0 + (n + sub) * kWarps) * nvec + vec), p.threshold);
      const uint32_t bits = kLanes == 1 ? drawn : __shfl_sync(0xffffffffu, drawn, s % kLanes, kLanes);
      const Row cur = ring[s % kInFlight];
      if (n + kInFlight < steps) ring[s % kInFlight] = fetch(n + kInFlight);

      float xm[kVec], gf[kVec];
      unpack<T, kVec>(apply_mask(cur.x, bits), xm);
      unpack<T, kVec>(cur.g, gf);
#pragma unroll
      for (int i = 0; i < kVec; ++i)
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[i][e] = fmaf(gf[i], xm[e], acc[i][e]);
      if (!want_dx) continue;

      float d[kVec];  // (g A)[row, col + e] over the lane's 8 ranks, then over all R for its kElems elements
#pragma unroll
      for (int e = 0; e < kVec; ++e) d[e] = 0.f;
#pragma unroll
      for (int i = 0; i < kVec; ++i)
#pragma unroll
        for (int e = 0; e < kVec; ++e) d[e] = fmaf(gf[i], a_blk[i][e], d[e]);
      if constexpr (kLanes >= 2) halve<kLanes / 2, kVec>(d, lane);
      if constexpr (kLanes >= 4) halve<kLanes / 4, kVec / 2>(d, lane);
      if constexpr (kLanes >= 8) halve<kLanes / 8, kVec / 4>(d, lane);
      float out[kElems];
      unpack<T, kElems>(cur.base, out);
      const uint32_t mine = bits >> (sub * kElems);
#pragma unroll
      for (int e = 0; e < kElems; ++e)
        if ((mine >> e) & 1u) out[e] += d[e];
      if (valid) store<kElems>(dx + (row0 + n * kWarps) * p.k + col + sub * kElems, pack<T, kElems>(out));
    }
  }

  // Add the warps' dA sums, in a fixed order: the upper half of the warps hands its sums to the lower, and again.
#pragma unroll
  for (int half = kWarps / 2; half > 0; half /= 2) {
    if (warp >= half && warp < 2 * half)
#pragma unroll
      for (int i = 0; i < kVec * kVec; ++i) exchange[warp - half][i][lane] = acc[i / kVec][i % kVec];
    __syncthreads();
    if (warp < half)
#pragma unroll
      for (int i = 0; i < kVec * kVec; ++i) acc[i / kVec][i % kVec] += exchange[warp][i][lane];
    __syncthreads();
  }
  if (warp != 0 || !valid) return;
#pragma unroll
  for (int i = 0; i < kVec; ++i) {
    if (j0 + i >= p.rank) break;
    float4* out = reinterpret_cast<float4*>(p.da_partial + (blockIdx.y * p.rank + j0 + i) * p.k + col);
    __stwb(out, make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    __stwb(out + 1, make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]));
  }
}

// Rows per block: enough to reuse each loaded vector of A a few times, few enough to keep the sums in registers.
template <int R> constexpr int prep_rows() { return R >= 32 ? 1 : 32 / R; }

template <typename T, int R>
void launch_prep(const PrepArgs& args) {
  constexpr int rows_per_block = prep_rows<R>();
  const int64_t blocks = std::max<int64_t>(1, (args.rows + rows_per_block - 1) / rows_per_block);
  prep_kernel<T, R, rows_per_block><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// One wave of blocks: each column strip is split into as many blocks of rows as fill the GPU, and no more, as every
// block of rows costs an [r, K] fp32 partial of dA to write and read back.
template <typename T, int R>
void launch_fix(FixArgs args, at::Tensor& d_a) {
  static const int blocks_per_sm = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fix_kernel<T, R>, kThreads, 0));
    return std::max(n, 1);
  }();
  const int sms = phift::multiprocessors();
  const int64_t vecs_per_block = 32 / (R / kVec), rows = args.rows;
  const int64_t col_blocks = (args.k / kVec + vecs_per_block - 1) / vecs_per_block;
  const int64_t resident = static_cast<int64_t>(sms) * blocks_per_sm;
  const int64_t most = std::max<int64_t>(1, (rows + kWarps - 1) / kWarps);  // a row for each warp
  int64_t row_blocks = std::clamp<int64_t>(resident / col_blocks, 1, most);
  args.rows_per_block = std::max<int64_t>(1, (rows + row_blocks - 1) / row_blocks);
  row_blocks = std::max<int64_t>(1, (rows + args.rows_per_block - 1) / args.rows_per_block);
  at::Tensor partial = at::empty({row_blocks, args.rank, args.k}, at::TensorOptions(at::kFloat).device(at::kCUDA));
  args.da_partial = partial.data_ptr<float>();
  fix_kernel<T, R><<<dim3(col_blocks, row_blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  d_a = partial.sum(0);
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

// Rows of `cols` elements that the kernels read 16 bytes at a time: unit column stride, row starts 16-byte aligned.
void check_rows(const at::Tensor& t, const char* name, int64_t cols, at::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.size(1) == cols && t.stride(1) == 1 && t.stride(0) % kVec == 0 &&
                  t.scalar_type() == dtype,
              "phift_lora_cuda: ", name, " must be 2-D CUDA ", dtype, " rows of ", cols,
              " unit-stride elements, a multiple of 8 apart");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "phift_lora_cuda: ", name,
              " must be 16-byte aligned");
}

void check_matrix(const at::Tensor& t, const char* name, int64_t cols, at::ScalarType dtype) {
  check_rows(t, name, cols, dtype);
  TORCH_CHECK(t.is_contiguous(), "phift_lora_cuda: ", name, " must be contiguous");
}

}  // namespace

// x: [M, K]; a: A in x's dtype, [r, K]; b: B in fp32, [N, r]; w_aug: [N, K + width], whose columns K.. this fills
// with coef·B. Returns x_aug [M, K + width], su [M, R] and the Philox (seed, offset) of the mask. R (8, 16, 32 or
// 64) is the rank the kernels run at; width >= R pads the GEMMs' extra columns.
std::vector<at::Tensor> lora_prep(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, at::Tensor& w_aug,
                                  int64_t padded_rank, double coef, int64_t threshold) {
  const int64_t rows = x.size(0), k = x.size(1), n = b.size(0), rank = a.size(0), width = w_aug.size(1) - k;
  TORCH_CHECK(k % kVec == 0 && width % kVec == 0, "phift_lora_cuda: in_features and width must be multiples of 8");
  TORCH_CHECK(threshold >= 0 && threshold < 65536, "phift_lora_cuda: bad dropout threshold ", threshold);
  TORCH_CHECK(rank <= padded_rank && padded_rank <= width && b.size(1) == rank && w_aug.size(0) == n,
              "phift_lora_cuda: shapes disagree");
  check_matrix(x, "x", k, x.scalar_type());
  check_matrix(a, "lora_A", k, x.scalar_type());
  TORCH_CHECK(b.is_cuda() && b.dim() == 2 && b.is_contiguous() && b.scalar_type() == at::kFloat,
              "phift_lora_cuda: lora_B must be a contiguous 2-D CUDA float32 tensor");  // read one element at a time
  check_matrix(w_aug, "[W | B]", k + width, x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_aug = at::empty({rows, k + width}, x.options());
  at::Tensor su = at::empty({rows, padded_rank}, x.options());
  at::Tensor rng = at::empty({2}, x.options().dtype(at::kLong));
  PrepArgs args{x.data_ptr(), a.data_ptr(), b.data_ptr<float>(), x_aug.data_ptr(), su.data_ptr(), w_aug.data_ptr(),
                rng.data_ptr<int64_t>(), rows, k, n, rank, width, static_cast<float>(coef),
                static_cast<uint32_t>(threshold), {}};
  if (threshold) {
    auto gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(std::nullopt,
                                                                  at::cuda::detail::getDefaultCUDAGenerator());
    std::lock_guard<std::mutex> lock(gen->mutex_);
    args.philox = gen->philox_cuda_state(4);  // one Philox draw per subsequence
  }
  PHIFT_DISPATCH(x.scalar_type(), padded_rank, launch_prep, args);
  return {x_aug, su, rng};
}

// g: [M, R] rows holding coef · dy B (columns from r on are ignored); dx_base: dy W, [M, K], or undefined when dx is
// not wanted (both may be column slices of dy · [W | coef·B]); x: [M, K]; a: A in x's dtype, [r, K]; rng: prep's
// (seed, offset). Returns dx [M, K] (no rows when not wanted) and dA [r, K] in fp32.
std::vector<at::Tensor> lora_fix(const at::Tensor& g, const at::Tensor& dx_base, const at::Tensor& x,
                                 const at::Tensor& a, int64_t padded_rank, int64_t threshold, const at::Tensor& rng) {
  const int64_t rows = x.size(0), k = x.size(1), rank = a.size(0);
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(k % kVec == 0 && rank <= padded_rank && g.size(0) == rows &&
                  (!dx_base.defined() || dx_base.size(0) == rows),
              "phift_lora_cuda: shapes disagree");
  TORCH_CHECK(threshold >= 0 && threshold < 65536, "phift_lora_cuda: bad dropout threshold ", threshold);
  check_rows(g, "g", padded_rank, dtype);
  if (dx_base.defined()) check_rows(dx_base, "dy W", k, dtype);
  check_matrix(x, "x", k, dtype);
  check_matrix(a, "lora_A", k, dtype);
  TORCH_CHECK(rng.is_cuda() && rng.scalar_type() == at::kLong && rng.numel() == 2, "phift_lora_cuda: bad rng state");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({dx_base.defined() ? rows : 0, k}, x.options());
  at::Tensor d_a;
  FixArgs args{g.data_ptr(), dx_base.defined() ? dx_base.data_ptr() : nullptr, x.data_ptr(), a.data_ptr(),
               dx_base.defined() ? dx.data_ptr() : nullptr, nullptr, rng.data_ptr<int64_t>(), rows, k, rank,
               g.stride(0), dx_base.defined() ? dx_base.stride(0) : 0, 0, static_cast<uint32_t>(threshold)};
  PHIFT_DISPATCH(dtype, padded_rank, launch_fix, args, d_a);
  return {dx, d_a};
}
