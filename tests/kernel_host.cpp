// Host build of kernels/*.cu for tests/test_kernels.py: the CUDA sources, unchanged, compiled
// as C++ through kernels/host_shim.cuh; each entry point launches a kernel as host loops.
#include "host_shim.cuh"
#include "lif.cu"
#include "convert.cu"
#include "sdsa.cu"

static unsigned int blocks(long long n, unsigned int block) { return (unsigned int)((n + block - 1) / block); }

#define HOST_LIF(SUFFIX, TYPE)                                                                              \
  extern "C" void host_lif_forward_##SUFFIX(const void* x, void* s, float* h, long long T, long long M,     \
                                            float tau, float v_th, float v_reset, unsigned int block) {     \
    shim_launch(blocks(M, block), block, lif_forward_##SUFFIX, (const TYPE*)x, (TYPE*)s, h, T, M, tau, v_th, \
                v_reset);                                                                                   \
  }                                                                                                         \
  extern "C" void host_lif_backward_##SUFFIX(const void* g, const float* h, void* gx, long long T,          \
                                             long long M, float tau, float v_th, float v_reset, int detach, \
                                             float alpha, unsigned int block) {                             \
    shim_launch(blocks(M, block), block, lif_backward_##SUFFIX, (const TYPE*)g, h, (TYPE*)gx, T, M, tau,    \
                v_th, v_reset, detach, alpha);                                                              \
  }

HOST_LIF(f32, float)
HOST_LIF(f16, __half)
HOST_LIF(bf16, __nv_bfloat16)

extern "C" void host_pack_spikes(const float* s, unsigned int* words, long long n, unsigned int block) {
  shim_launch(blocks((n + 31) / 32, block), block, pack_spikes_f32, s, words, n);
}
extern "C" void host_unpack_spikes(const unsigned int* words, float* s, long long n, unsigned int block) {
  shim_launch(blocks(n, block), block, unpack_spikes_f32, words, s, n);
}

#define HOST_CONVERT(SUFFIX, TYPE)                                                                          \
  extern "C" void host_if_forward_##SUFFIX(const void* z, void* s, long long T, long long M, double theta,  \
                                           unsigned int block) {                                          \
    shim_launch(blocks(M, block), block, if_forward_##SUFFIX, (const TYPE*)z, (TYPE*)s, T, M, theta);      \
  }                                                                                                       \
  extern "C" void host_multi_threshold_step_##SUFFIX(const void* x, void* v, void* s, long long M,         \
                                                     double theta_p, double theta_n, int levels,          \
                                                     unsigned int block) {                                \
    shim_launch(blocks(M, block), block, multi_threshold_step_##SUFFIX, (const TYPE*)x, (TYPE*)v, (TYPE*)s, \
                M, theta_p, theta_n, levels);                                                             \
  }

HOST_CONVERT(f32, float)
HOST_CONVERT(f64, double)

#define HOST_SDSA(SUFFIX, TYPE)                                                                             \
  extern "C" void host_sdsa_forward_##SUFFIX(const void* q, const void* k, const void* v, void* out, float* h, \
                                             long long T, long long R, long long N, float tau, float v_th,   \
                                             float v_reset, unsigned int block) {                            \
    shim_launch(blocks(R, block), block, sdsa_forward_##SUFFIX, (const TYPE*)q, (const TYPE*)k, (const TYPE*)v, \
                (TYPE*)out, h, T, R, N, tau, v_th, v_reset);                                                 \
  }                                                                                                         \
  extern "C" void host_sdsa_backward_##SUFFIX(const void* g, const void* q, const void* k, const void* v,    \
                                              const float* h, void* gq, void* gk, void* gv, long long T,     \
                                              long long R, long long N, float tau, float v_th, float v_reset, \
                                              int detach, float alpha, unsigned int block) {                 \
    shim_launch(blocks(R, block), block, sdsa_backward_##SUFFIX, (const TYPE*)g, (const TYPE*)q, (const TYPE*)k, \
                (const TYPE*)v, h, (TYPE*)gq, (TYPE*)gk, (TYPE*)gv, T, R, N, tau, v_th, v_reset, detach, alpha); \
  }

HOST_SDSA(f32, float)
HOST_SDSA(f16, __half)
HOST_SDSA(bf16, __nv_bfloat16)
