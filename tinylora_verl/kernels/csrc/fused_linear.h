// The pieces of the fused linear (fused_linear.cpp) that the group node (group_linear.cpp) reuses: autocast's
// casts, the kernels with their torch fallbacks, the r x r core and the v gradient.
#pragma once

#include "rank_r_kernels.h"

#include <optional>

namespace tinylora_verl {

// What autocast hands a linear: floating tensors other than float64 cast to its dtype.
at::Tensor autocast_cast(const at::Tensor& t, std::optional<at::ScalarType> dtype);

// t wt^T (rows, k) float32: the kernel where it reads t, else a float32 GEMM.
at::Tensor project_any(const at::Tensor& t2d, const at::Tensor& wt);

// y <- y + (a core) bt: the kernel where it writes y, else the float32 product cast once and added.
void add_any(at::Tensor& y2d, const at::Tensor& a, const at::Tensor& core, const at::Tensor& bt);

// (Sigma M)^T (r, r) float32 with vec((Sigma M)^T) = pst v, summed in float64 and rounded once.
at::Tensor mixed_core(const at::Tensor& pst, const at::Tensor& v, int64_t r);

// dL/dv = pst^T vec(grad_core) (u,), summed in float64, rounded once to float32 and then to v's dtype.
at::Tensor grad_v(const at::Tensor& pst, const at::Tensor& grad_core, at::ScalarType v_dtype);

// Checks one module's operands (x, weight, v, h?, ut, vt, pst) as `op` takes them, naming what is wrong.
void check_factors(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& v,
                   const std::optional<at::Tensor>& h, const at::Tensor& ut, const at::Tensor& vt,
                   const at::Tensor& pst);

// One module's update in backward: gx <- gx + gU (Sigma M) V^T in place when gx is given, and returns
// dL/d(Sigma M)^T = h^T gU (r, r) when need_v, with gU = g U.
at::Tensor update_backward(at::Tensor* gx, const at::Tensor& g2d, const at::Tensor& h, const at::Tensor& ut,
                           const at::Tensor& core_t, const at::Tensor& vt, bool need_v);

}  // namespace tinylora_verl
