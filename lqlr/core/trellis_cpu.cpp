// Viterbi search of bitshift trellises on the CPU (lqlr/core/trellis.py, `viterbi`, is the reference).
// A state s < 2^L moves to ((s << k) | d) mod 2^L; min over paths of sum_t (x_t - code[s_t])^2.
// One sequence per OpenMP task: its two cost vectors (2^L floats) and back-pointers (T x 2^(L-k) bytes)
// stay in the thread's cache, where torch's batched version streams (B, 2^L) tensors through memory.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

torch::Tensor viterbi(torch::Tensor x, torch::Tensor code, int64_t k, torch::Tensor overlap) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "viterbi: x must be a (B, T) float32 CPU tensor");
  TORCH_CHECK(code.dim() == 1 && code.scalar_type() == torch::kFloat32, "viterbi: code must be (2^L,) float32");
  const int64_t S = code.numel();
  TORCH_CHECK(S >= 2 && (S & (S - 1)) == 0, "viterbi: the code length must be a power of two");
  const int L = 63 - __builtin_clzll((unsigned long long)S);
  TORCH_CHECK(k >= 1 && k < L && k <= 8, "viterbi: need 1 <= k < L and k <= 8");
  x = x.contiguous();
  code = code.contiguous();
  const int64_t B = x.size(0), T = x.size(1);
  const int64_t K = int64_t(1) << k, low = S >> k;
  const bool constrained = overlap.numel() > 0;
  torch::Tensor ov;
  if (constrained) {
    TORCH_CHECK(overlap.numel() == B, "viterbi: overlap must have one entry per sequence");
    ov = overlap.to(torch::kInt64).contiguous();
  }
  auto states = torch::empty({B, T}, torch::kInt64);
  const float* xp = x.data_ptr<float>();
  const float* cd = code.data_ptr<float>();
  const int64_t* op = constrained ? ov.data_ptr<int64_t>() : nullptr;
  int64_t* sp = states.data_ptr<int64_t>();
  const float inf = std::numeric_limits<float>::infinity();
#pragma omp parallel
  {
    std::vector<float> cost(S), next(S), best(low);
    std::vector<uint8_t> back(size_t(T) * size_t(low));
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < B; ++i) {
      const float* xi = xp + i * T;
      const int64_t seam = constrained ? op[i] : -1;
      for (int64_t s = 0; s < S; ++s) {
        const float d = xi[0] - cd[s];
        cost[s] = (constrained && (s >> k) != seam) ? inf : d * d;
      }
      for (int64_t t = 1; t < T; ++t) {
        // predecessors of s' are (p << (L - k)) | (s' >> k): the best p for each j = s' >> k
        uint8_t* bt = back.data() + size_t(t) * size_t(low);
        for (int64_t j = 0; j < low; ++j) {
          best[j] = cost[j];
          bt[j] = 0;
        }
        for (int64_t p = 1; p < K; ++p) {
          const float* cp = cost.data() + p * low;
          for (int64_t j = 0; j < low; ++j) {
            const bool lower = cp[j] < best[j];
            best[j] = lower ? cp[j] : best[j];
            bt[j] = lower ? uint8_t(p) : bt[j];
          }
        }
        const float xt = xi[t];
        for (int64_t j = 0; j < low; ++j) {
          const float bj = best[j];
          float* nx = next.data() + j * K;
          const float* cj = cd + j * K;
          for (int64_t b = 0; b < K; ++b) {
            const float d = xt - cj[b];
            nx[b] = bj + d * d;
          }
        }
        cost.swap(next);
      }
      int64_t s = -1;
      float m = inf;
      for (int64_t q = 0; q < S; ++q) {
        if ((!constrained || (q & (low - 1)) == seam) && (s < 0 || cost[q] < m)) {
          m = cost[q];
          s = q;
        }
      }
      int64_t* si = sp + i * T;
      si[T - 1] = s;
      for (int64_t t = T - 1; t > 0; --t) {  // walk the back-pointers
        const int64_t j = s >> k;
        s = (int64_t(back[size_t(t) * size_t(low) + size_t(j)]) << (L - k)) | j;
        si[t - 1] = s;
      }
    }
  }
  return states;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("viterbi", &viterbi, "states of the best bitshift-trellis paths", py::arg("x"), py::arg("code"), py::arg("k"),
        py::arg("overlap"));
}
