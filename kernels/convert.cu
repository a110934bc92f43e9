// Neurons of the converted (ANN→SNN) models, for inference (spec: conversion.md §1.3, §2.4).
// One thread per neuron; float32 and float64 (conversion numerics are tested in float64, §3.3).
//
// IF neuron (QCFS), multi-step over T, T folded in front of M neurons:
//   v(0) = θ/2;  v ← v + z_t;  s_t = θ·[v ≥ θ];  v ← v − s_t
// Multi-threshold neuron (ECMT), one step per call with the membrane kept in `v` (v(0) = 0):
//   v ← v + x;  emit the largest level ±θ·2^k (k = n−1 … 0) whose threshold θ·2^k − θ/2 the
//   membrane reaches on its side (a side with θ ≤ 0 stays silent);  v ← v − emitted.
// The thresholds are computed in double and rounded once to the tensor type, as the torch
// reference does (Python floats, then a tensor of the input's dtype).

template <typename scalar_t>
__device__ __forceinline__ void if_forward(const scalar_t* __restrict__ z, scalar_t* __restrict__ s, long long T,
                                           long long M, double theta_d) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M) return;
  const scalar_t theta = (scalar_t)theta_d;
  scalar_t v = (scalar_t)0.5 * theta;
  for (long long t = 0; t < T; ++t) {
    const long long k = t * M + i;
    v = v + z[k];
    const scalar_t spike = v >= theta ? theta : (scalar_t)0;
    v = v - spike;
    s[k] = spike;
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t multi_threshold_level(scalar_t u, double theta, int levels) {
  // the largest k with u ≥ θ·2^k − θ/2, as θ·2^k (0 when none or θ ≤ 0)
  if (theta <= 0.0) return (scalar_t)0;
  for (int k = levels - 1; k >= 0; --k) {
    const double level = theta * (double)(1LL << k);
    if (u >= (scalar_t)(level - theta / 2.0)) return (scalar_t)level;
  }
  return (scalar_t)0;
}

template <typename scalar_t>
__device__ __forceinline__ void multi_threshold_step(const scalar_t* __restrict__ x, scalar_t* __restrict__ v,
                                                     scalar_t* __restrict__ s, long long M, double theta_p,
                                                     double theta_n, int levels) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M) return;
  const scalar_t membrane = v[i] + x[i];
  // at most one side can fire: with θ_p, θ_n > 0 they need v ≥ θ_p/2 and v ≤ −θ_n/2
  const scalar_t spike = multi_threshold_level(membrane, theta_p, levels) - multi_threshold_level(-membrane, theta_n, levels);
  v[i] = membrane - spike;
  s[i] = spike;
}

#define SPIKEFORMERS_CONVERT_KERNELS(SUFFIX, TYPE)                                                              \
  extern "C" __global__ void if_forward_##SUFFIX(const TYPE* z, TYPE* s, long long T, long long M, double theta) { \
    if_forward<TYPE>(z, s, T, M, theta);                                                                       \
  }                                                                                                            \
  extern "C" __global__ void multi_threshold_step_##SUFFIX(const TYPE* x, TYPE* v, TYPE* s, long long M,        \
                                                           double theta_p, double theta_n, int levels) {       \
    multi_threshold_step<TYPE>(x, v, s, M, theta_p, theta_n, levels);                                          \
  }

SPIKEFORMERS_CONVERT_KERNELS(f32, float)
SPIKEFORMERS_CONVERT_KERNELS(f64, double)
