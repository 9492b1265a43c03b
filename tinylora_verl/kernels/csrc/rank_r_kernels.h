// The one-pass CPU kernels of rank_r_update.cpp, shared with the fused linear of fused_linear.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace tinylora_verl {

// The largest rank (or number of stacked projection rows) the kernels take: their per-row sums live on the stack.
constexpr int64_t kMaxRank = 16;

// Contiguous rows, possibly strided between them (a column slice of a wider matrix, a view of a wider input).
inline bool rows_contiguous(const at::Tensor& t) { return t.stride(1) == 1 && t.stride(0) >= t.size(1); }

// What the kernels read as an activation (Python's cpu_kernel.reads): a 2-D float32 or bfloat16 CPU tensor
// with contiguous rows.
inline bool reads_activation(const at::Tensor& t) {
  return t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16) &&
         t.dim() == 2 && rows_contiguous(t);
}

// y <- y + (a core) bt in place.
void add_rank_r_(at::Tensor y, const at::Tensor& a, const at::Tensor& core, const at::Tensor& bt);

// h = x vt^T, (rows, k) float32, x read in its own dtype.
at::Tensor project(const at::Tensor& x, const at::Tensor& vt);

// gU = g ut^T; gx <- gx + (gU ct^T) vt in place (gx may be None); returns h^T gU (r, r).
at::Tensor rank_r_backward_(const std::optional<at::Tensor>& gx, const at::Tensor& g, const at::Tensor& h,
                            const at::Tensor& ut, const at::Tensor& ct, const at::Tensor& vt);

}  // namespace tinylora_verl
