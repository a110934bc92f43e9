// One LIF time step, shared by lif.cu and sdsa.cu (spec: architectures.md §1; models/neurons.py).
// SpikingJelly's operation order, so that results match the torch backend bit for bit.
#pragma once

//   charge  H[t] = V[t-1] + (X[t] - (V[t-1] - v_reset)) / tau
__device__ __forceinline__ float lif_charge(float v, float x, float tau, float v_reset) {
  return v + (x - (v - v_reset)) / tau;
}

// BPTT through one step: dL/dH[t] from dL/dS[t] and dL/dH[t+1] (dL/dX[t] is the result / tau):
//   dL/dH[t] = dL/dS[t] dS/dH[t] + dL/dH[t+1] (1 - 1/tau) dV[t]/dH[t]
//   dS/dH = alpha sig(alpha (H - v_th)) (1 - sig(...));  dV/dH = 1 - S (+ (v_reset - H) dS/dH without detach)
__device__ __forceinline__ float lif_grad_h(float grad_spike, float h, float grad_h_next, float tau, float v_th,
                                            float v_reset, int detach_reset, float alpha) {
  const float sig = 1.0f / (1.0f + expf(-(alpha * (h - v_th))));
  const float surrogate = (1.0f - sig) * sig * alpha;
  float dv_dh = h >= v_th ? 0.0f : 1.0f;
  if (!detach_reset) dv_dh += (v_reset - h) * surrogate;
  const float carried = grad_h_next * dv_dh;  // (g - g/tau): SpikingJelly's rounding, bit-identical for every tau
  return grad_spike * surrogate + (carried - carried / tau);
}
