// The SDSA operator of the Spike-driven Transformer, fused (spec: architectures.md, SDSA;
// torch reference: models/sdsa.py). For every row r = (sample, channel) and time step t:
//
//   S[t, r]    = sum_n K[t, r, n] V[t, r, n]     token sum of K ⊙ V (spikes, so an exact count)
//   M[t, r]    = LIF(S[., r])[t]                 multi-step LIF over t, hard reset (v_th 0.5 in SDT)
//   O[t, r, n] = Q[t, r, n] M[t, r]              the channel mask applied to Q
//
// Tensors are [T, R, N] and contiguous (R = B·C rows, N tokens); one thread per row loops over t
// and n. The forward saves only H [T, R] (float32); the backward reads Q, K, V, H and recomputes
// the mask from H, so no [T, R, N] intermediate (K ⊙ V, the broadcast mask) is ever stored.
#include "spike_types.cuh"
#include "lif_math.cuh"

template <typename scalar_t>
__device__ __forceinline__ void sdsa_forward(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                             const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                             float* __restrict__ h_seq, long long T, long long R, long long N,
                                             float tau, float v_th, float v_reset) {
  const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= R) return;
  float membrane = 0.0f;
  for (long long t = 0; t < T; ++t) {
    const long long row = (t * R + r) * N;
    float token_sum = 0.0f;
    for (long long n = 0; n < N; ++n) token_sum += to_float(k[row + n]) * to_float(v[row + n]);
    const float h = lif_charge(membrane, token_sum, tau, v_reset);
    const bool fired = h >= v_th;
    h_seq[t * R + r] = h;
    membrane = fired ? v_reset : h;
    const float mask = fired ? 1.0f : 0.0f;
    for (long long n = 0; n < N; ++n) out[row + n] = from_float<scalar_t>(to_float(q[row + n]) * mask);
  }
}

// dL/dQ = dL/dO M;  dL/dM[t] = sum_n dL/dO Q;  dL/dS = LIF BPTT of dL/dM;  dL/dK = dL/dS V,  dL/dV = dL/dS K.
template <typename scalar_t>
__device__ __forceinline__ void sdsa_backward(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
                                              const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
                                              const float* __restrict__ h_seq, scalar_t* __restrict__ grad_q,
                                              scalar_t* __restrict__ grad_k, scalar_t* __restrict__ grad_v,
                                              long long T, long long R, long long N, float tau, float v_th,
                                              float v_reset, int detach_reset, float alpha) {
  const long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= R) return;
  float grad_h_next = 0.0f;
  for (long long t = T - 1; t >= 0; --t) {
    const long long row = (t * R + r) * N;
    const float h = h_seq[t * R + r];
    const float mask = h >= v_th ? 1.0f : 0.0f;
    float grad_mask = 0.0f;
    for (long long n = 0; n < N; ++n) {
      const float g = to_float(grad_out[row + n]);
      grad_mask += g * to_float(q[row + n]);
      grad_q[row + n] = from_float<scalar_t>(g * mask);
    }
    const float grad_h = lif_grad_h(grad_mask, h, grad_h_next, tau, v_th, v_reset, detach_reset, alpha);
    const float grad_sum = grad_h / tau;
    grad_h_next = grad_h;
    for (long long n = 0; n < N; ++n) {
      grad_k[row + n] = from_float<scalar_t>(grad_sum * to_float(v[row + n]));
      grad_v[row + n] = from_float<scalar_t>(grad_sum * to_float(k[row + n]));
    }
  }
}

#define SPIKEFORMERS_SDSA_KERNELS(SUFFIX, TYPE)                                                              \
  extern "C" __global__ void sdsa_forward_##SUFFIX(const TYPE* q, const TYPE* k, const TYPE* v, TYPE* out,    \
                                                   float* h_seq, long long T, long long R, long long N,       \
                                                   float tau, float v_th, float v_reset) {                    \
    sdsa_forward<TYPE>(q, k, v, out, h_seq, T, R, N, tau, v_th, v_reset);                                     \
  }                                                                                                           \
  extern "C" __global__ void sdsa_backward_##SUFFIX(const TYPE* grad_out, const TYPE* q, const TYPE* k,       \
                                                    const TYPE* v, const float* h_seq, TYPE* grad_q,          \
                                                    TYPE* grad_k, TYPE* grad_v, long long T, long long R,     \
                                                    long long N, float tau, float v_th, float v_reset,        \
                                                    int detach_reset, float alpha) {                          \
    sdsa_backward<TYPE>(grad_out, q, k, v, h_seq, grad_q, grad_k, grad_v, T, R, N, tau, v_th, v_reset,        \
                        detach_reset, alpha);                                                                 \
  }

SPIKEFORMERS_SDSA_KERNELS(f32, float)
SPIKEFORMERS_SDSA_KERNELS(f16, __half)
SPIKEFORMERS_SDSA_KERNELS(bf16, __nv_bfloat16)
