// Compile the CUDA kernel sources as plain C++ for CPU tests (tests/test_kernels.py): every
// CUDA thread becomes one iteration of a host loop. Only what the kernels use is provided.
#pragma once
#define SPIKEFORMERS_HOST 1
#include <math.h>  // expf (global, as on the device)
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline

struct shim_dim3 { unsigned int x = 0, y = 0, z = 0; };
static shim_dim3 threadIdx, blockIdx, blockDim, gridDim;

// float16: GCC's _Float16 converts with round-to-nearest-even, like __float2half_rn.
typedef _Float16 __half;
inline float __half2float(__half v) { return (float)v; }
inline __half __float2half_rn(float v) { return (__half)v; }

// bfloat16: the top 16 bits of a float32, rounded to nearest even (like __float2bfloat16_rn).
struct __nv_bfloat16 { uint16_t bits; };
inline float __bfloat162float(__nv_bfloat16 v) {
  uint32_t u = (uint32_t)v.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40u)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return {(uint16_t)(u >> 16)};
}

// launch(grid, block, kernel, args...): run every (block, thread) in order.
template <typename Kernel, typename... Args>
inline void shim_launch(unsigned int grid, unsigned int block, Kernel kernel, Args... args) {
  gridDim.x = grid;
  blockDim.x = block;
  for (unsigned int b = 0; b < grid; ++b) {
    blockIdx.x = b;
    for (unsigned int t = 0; t < block; ++t) {
      threadIdx.x = t;
      kernel(args...);
    }
  }
}
