// Scalar conversions shared by the kernels: activations may be float32, float16 or bfloat16;
// neuron state and arithmetic are always float32 (as in models/neurons.py).
#pragma once
#ifndef SPIKEFORMERS_HOST  // device build (nvcc, or NVRTC through CuPy)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename scalar_t> __device__ __forceinline__ scalar_t from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
