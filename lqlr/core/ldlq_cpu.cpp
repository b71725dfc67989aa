// LDLQ's column loop for the uniform grid on the CPU (lqlr/core/ldlq.py, `ldlq_round`'s torch loop, is the
// reference). Columns i0 .. i0 + n − 1 of one lazy-update block share one group's parameters (scale s, zero z
// per row); each is rounded to q = (clamp(round(x / s) + z, 0, maxq) − z)·s, and its error (x − q) / U_ii is fed
// forward to the block's later columns through row i of U. Rows are independent, so each OpenMP thread runs the
// whole column loop on its own rows; the torch loop issues ~10 small kernels per column instead.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

// W1 (b, rows): the block's columns as rows, updated in place; U1 (b, b) the block of U; Qt (cols, rows) gets the
// rounded columns at col0 ..; Err1 (b, rows) the scaled errors; scale, zero (rows,); inv_d (b,) = 1 / U_ii.
void ldlq_columns(torch::Tensor W1, torch::Tensor U1, torch::Tensor Qt, torch::Tensor Err1, int64_t i0, int64_t n,
                  int64_t col0, torch::Tensor scale, torch::Tensor zero, double maxq, torch::Tensor inv_d) {
  for (const auto& t : {W1, U1, Qt, Err1, scale, zero, inv_d}) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
                "ldlq_columns: every tensor must be a contiguous float32 CPU tensor");
  }
  const int64_t b = W1.size(0), rows = W1.size(1);
  TORCH_CHECK(U1.size(0) == b && U1.size(1) == b && Err1.size(0) == b && Err1.size(1) == rows,
              "ldlq_columns: W1, U1 and Err1 disagree on the block's shape");
  TORCH_CHECK(i0 >= 0 && n >= 0 && i0 + n <= b && col0 >= 0 && col0 + n <= Qt.size(0) && Qt.size(1) == rows,
              "ldlq_columns: the column range is outside the block or Qt");
  TORCH_CHECK(scale.numel() == rows && zero.numel() == rows && inv_d.numel() == b,
              "ldlq_columns: scale and zero need one entry per row, inv_d one per column");
  float* w = W1.data_ptr<float>();
  const float* u = U1.data_ptr<float>();
  float* qt = Qt.data_ptr<float>();
  float* er = Err1.data_ptr<float>();
  const float* s = scale.data_ptr<float>();
  const float* z = zero.data_ptr<float>();
  const float* id = inv_d.data_ptr<float>();
  const float hi = float(maxq);
  constexpr int64_t CHUNK = 64;  // rows per task: enough work per column to amortise the loop
#pragma omp parallel for schedule(static) if (rows >= 2 * CHUNK)
  for (int64_t r0 = 0; r0 < rows; r0 += CHUNK) {
    const int64_t r1 = std::min(rows, r0 + CHUNK);
    for (int64_t i = i0; i < i0 + n; ++i) {
      float* wi = w + i * rows;
      float* ei = er + i * rows;
      float* qi = qt + (col0 + i - i0) * rows;
      const float inv = id[i];
      for (int64_t r = r0; r < r1; ++r) {
        const float c = std::min(std::max(std::nearbyint(wi[r] / s[r]) + z[r], 0.0f), hi);
        const float q = (c - z[r]) * s[r];
        qi[r] = q;
        ei[r] = (wi[r] - q) * inv;
      }
      const float* ui = u + i * b;
      for (int64_t j = i + 1; j < b; ++j) {  // feed the error forward: W1[j] −= U_ij · err
        const float uij = ui[j];
        float* wj = w + j * rows;
        for (int64_t r = r0; r < r1; ++r) wj[r] -= uij * ei[r];
      }
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ldlq_columns", &ldlq_columns, "LDLQ column loop of one group segment on the uniform grid");
}
