// Shared by the phift CUDA kernels: fp16/bf16 <-> fp32 conversion and 16-byte (8-element) vector access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

namespace phift {

constexpr int kVec = 8;  // 16-bit elements per 16-byte access

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

// SMs of the current device, asked of the driver once per device (not on every call of an op).
inline int multiprocessors() {
  static std::mutex lock;
  static std::vector<int> counts;
  const int device = c10::cuda::current_device();
  std::lock_guard<std::mutex> guard(lock);
  if (counts.size() <= static_cast<size_t>(device)) counts.resize(device + 1, 0);
  if (counts[device] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&counts[device], cudaDevAttrMultiProcessorCount, device));
  return counts[device];
}

}  // namespace phift
