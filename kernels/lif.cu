// Multi-step LIF neuron, fused over time (spec: architectures.md §1; math as models/neurons.py).
//
//   charge  H[t] = V[t-1] + (X[t] - (V[t-1] - v_reset)) / tau     (SpikingJelly's operation order)
//   fire    S[t] = H[t] >= v_th
//   reset   V[t] = S[t] ? v_reset : H[t]                          (hard reset, V[-1] = 0)
//
// Tensors are [T, M] and contiguous (M neurons per time step); one thread per neuron loops over T.
// The forward saves only H (float32); the backward recomputes spikes and the Sigmoid surrogate
// from it. pack_spikes/unpack_spikes store spikes as bits (32 per word) for activation memory.
#include "spike_types.cuh"
#include "lif_math.cuh"

template <typename scalar_t>
__device__ __forceinline__ void lif_forward(const scalar_t* __restrict__ x, scalar_t* __restrict__ spikes,
                                            float* __restrict__ h_seq, long long T, long long M, float tau,
                                            float v_th, float v_reset) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M) return;
  float v = 0.0f;
  for (long long t = 0; t < T; ++t) {
    const long long k = t * M + i;
    const float h = lif_charge(v, to_float(x[k]), tau, v_reset);
    const bool fired = h >= v_th;
    h_seq[k] = h;
    spikes[k] = from_float<scalar_t>(fired ? 1.0f : 0.0f);
    v = fired ? v_reset : h;
  }
}

// BPTT from the saved H alone (lif_grad_h in lif_math.cuh); dL/dX[t] = dL/dH[t] / tau.
template <typename scalar_t>
__device__ __forceinline__ void lif_backward(const scalar_t* __restrict__ grad_spikes, const float* __restrict__ h_seq,
                                             scalar_t* __restrict__ grad_x, long long T, long long M, float tau,
                                             float v_th, float v_reset, int detach_reset, float alpha) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= M) return;
  float grad_h_next = 0.0f;
  for (long long t = T - 1; t >= 0; --t) {
    const long long k = t * M + i;
    const float grad_h = lif_grad_h(to_float(grad_spikes[k]), h_seq[k], grad_h_next, tau, v_th, v_reset,
                                    detach_reset, alpha);
    grad_x[k] = from_float<scalar_t>(grad_h / tau);
    grad_h_next = grad_h;
  }
}

#define SPIKEFORMERS_LIF_KERNELS(SUFFIX, TYPE)                                                          \
  extern "C" __global__ void lif_forward_##SUFFIX(const TYPE* x, TYPE* spikes, float* h_seq, long long T, \
                                                  long long M, float tau, float v_th, float v_reset) {     \
    lif_forward<TYPE>(x, spikes, h_seq, T, M, tau, v_th, v_reset);                                        \
  }                                                                                                       \
  extern "C" __global__ void lif_backward_##SUFFIX(const TYPE* grad_spikes, const float* h_seq,           \
                                                   TYPE* grad_x, long long T, long long M, float tau,     \
                                                   float v_th, float v_reset, int detach_reset,           \
                                                   float alpha) {                                        \
    lif_backward<TYPE>(grad_spikes, h_seq, grad_x, T, M, tau, v_th, v_reset, detach_reset, alpha);         \
  }

SPIKEFORMERS_LIF_KERNELS(f32, float)
SPIKEFORMERS_LIF_KERNELS(f16, __half)
SPIKEFORMERS_LIF_KERNELS(bf16, __nv_bfloat16)

// Spikes (any non-zero value) -> bits: word w holds elements 32w .. 32w+31, bit j = element 32w+j.
extern "C" __global__ void pack_spikes_f32(const float* __restrict__ spikes, unsigned int* __restrict__ words,
                                           long long n) {
  const long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long start = w * 32;
  if (start >= n) return;
  unsigned int bits = 0u;
  for (int j = 0; j < 32 && start + j < n; ++j) bits |= (spikes[start + j] != 0.0f ? 1u : 0u) << j;
  words[w] = bits;
}

extern "C" __global__ void unpack_spikes_f32(const unsigned int* __restrict__ words, float* __restrict__ spikes,
                                             long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  spikes[i] = (float)((words[i >> 5] >> (i & 31)) & 1u);
}
