// The fused linears of the modules that read one x (q/k/v, gate/up) as one C++ autograd node; each module's
// arithmetic is fused_linear.cpp's with a shared h:
//
//   group_linear(x, weights[k], biases[k or 0], vs[k], uts[k], vt (k r, in), psts[k], cast_dtype?) -> ys[k]
//
//   h = x vt^T (tokens, k r) once,   y_m = x W_m^T + b_m + h_m (Sigma_m M_m)^T U_m^T   (h_m: h's m-th r columns)
//
// backward, with gU = [g_1 U_1 ... g_k U_k] (tokens, k r):
//
//   dL/dx = sum_m g_m W_m + gU blockdiag(Sigma_m M_m) vt,   dL/dv_m = pst_m^T vec(h_m^T gU_m)
//
// Why: as k nodes, each module paid the node's own cost (~25 us of autograd and dispatch a linear) and autograd
// summed k input gradients, each after its own read-modify-write pass for the update. Here the k updates are one
// rank-k r pass over dL/dx, and the k outputs one node: 4 nodes a decoder layer instead of 7.
#include "fused_linear.h"

#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace tinylora_verl {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kGroupOp = "group_linear";

struct GroupForward {
  std::vector<at::Tensor> ys, core_ts, wbs;
  at::Tensor h, xb;
};

GroupForward run_group_forward(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                               at::TensorList vs, at::TensorList uts, const at::Tensor& vt, at::TensorList psts,
                               std::optional<at::ScalarType> cast_dtype) {
  const int64_t k = static_cast<int64_t>(weights.size());
  TORCH_CHECK(k >= 1 && vs.size() == weights.size() && uts.size() == weights.size() &&
                  psts.size() == weights.size() && (biases.empty() || biases.size() == weights.size()),
              kGroupOp, ": weights, vs, uts and psts need one entry per module and biases one or none, got ",
              weights.size(), ", ", vs.size(), ", ", uts.size(), ", ", psts.size(), " and ", biases.size());
  const int64_t r = uts[0].dim() == 2 ? uts[0].size(0) : 0;
  TORCH_CHECK(vt.dim() == 2 && vt.size(0) == k * r, kGroupOp, ": vt must stack the modules' (r, in) factors as (",
              k * r, ", in), got ", vt.sizes());
  for (int64_t m = 0; m < k; ++m)
    check_factors(kGroupOp, x, weights[m], vs[m], std::nullopt, uts[m], vt.narrow(0, m * r, r), psts[m]);
  GroupForward f;
  f.xb = autocast_cast(x, cast_dtype);
  f.h = project_any(x.reshape({-1, x.size(-1)}), vt);  // (tokens, k r)
  for (int64_t m = 0; m < k; ++m) {
    f.wbs.push_back(autocast_cast(weights[m], cast_dtype));
    std::optional<at::Tensor> bb;
    if (!biases.empty()) bb = autocast_cast(biases[m], cast_dtype);
    at::Tensor y = at::linear(f.xb, f.wbs[m], bb);  // (..., out_m)
    f.core_ts.push_back(mixed_core(psts[m], vs[m], r));  // (r, r)
    at::Tensor y2d = y.view({-1, y.size(-1)});  // (tokens, out_m)
    add_any(y2d, f.h.narrow(1, m * r, r), f.core_ts[m], uts[m]);
    f.ys.push_back(std::move(y));
  }
  return f;
}

// h[:, c:c+r]^T gu[:, c:c+r] (r, r), summed in float64 and rounded once.
at::Tensor block_gram(const at::Tensor& h, const at::Tensor& gu, int64_t c, int64_t r) {
  const int64_t rows = h.size(0), ldh = h.stride(0), ldg = gu.stride(0);
  const float* H = h.data_ptr<float>() + c;
  const float* G = gu.data_ptr<float>() + c;
  std::vector<double> acc(r * r, 0.0);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = 0; i < r; ++i)
      for (int64_t j = 0; j < r; ++j) acc[i * r + j] += static_cast<double>(H[t * ldh + i]) * G[t * ldg + j];
  at::Tensor out = at::empty({r, r}, h.options());  // (r, r)
  float* O = out.data_ptr<float>();
  for (int64_t i = 0; i < r * r; ++i) O[i] = static_cast<float>(acc[i]);
  return out;
}

class TinyLoRAGroupFn : public torch::autograd::Function<TinyLoRAGroupFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::TensorList vs, at::TensorList uts, const at::Tensor& vt,
                               at::TensorList psts, std::optional<at::ScalarType> cast_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    // An output nothing used gets no gradient (not zeros): its module's work is skipped, its W and b get none.
    ctx->set_materialize_grads(false);
    GroupForward f = run_group_forward(x, weights, biases, vs, uts, vt, psts, cast_dtype);
    const int64_t k = static_cast<int64_t>(weights.size());
    bool need_xb = false;
    std::vector<int64_t> dtypes{static_cast<int64_t>(x.scalar_type())}, first_v;
    for (int64_t m = 0; m < k; ++m) {
      need_xb = need_xb || weights[m].requires_grad();
      dtypes.push_back(static_cast<int64_t>(weights[m].scalar_type()));
      dtypes.push_back(static_cast<int64_t>(biases.empty() ? x.scalar_type() : biases[m].scalar_type()));
      dtypes.push_back(static_cast<int64_t>(vs[m].scalar_type()));
      // Modules tied to one v: their gradients are summed here and returned once (one edge fewer to accumulate).
      int64_t j = 0;
      while (!vs[j].is_same(vs[m])) ++j;
      first_v.push_back(j);
    }
    variable_list saved{f.h, need_xb ? f.xb : at::Tensor()};
    saved.insert(saved.end(), f.wbs.begin(), f.wbs.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["core_ts"] = f.core_ts;
    ctx->saved_data["uts"] = uts.vec();
    ctx->saved_data["vt"] = vt;
    ctx->saved_data["psts"] = psts.vec();
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["dtypes"] = dtypes;
    ctx->saved_data["first_v"] = first_v;
    ctx->saved_data["has_bias"] = !biases.empty();
    return f.ys;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &xb = saved[1];
    const std::vector<at::Tensor> core_ts = ctx->saved_data["core_ts"].toTensorVector(),
                                  uts = ctx->saved_data["uts"].toTensorVector(),
                                  psts = ctx->saved_data["psts"].toTensorVector();
    const at::Tensor vt = ctx->saved_data["vt"].toTensor();
    const std::vector<int64_t> x_sizes = ctx->saved_data["x_sizes"].toIntVector(),
                               dtypes = ctx->saved_data["dtypes"].toIntVector(),
                               first_v = ctx->saved_data["first_v"].toIntVector();
    const int64_t k = static_cast<int64_t>(uts.size()), r = uts[0].size(0);
    const int64_t nb = ctx->saved_data["has_bias"].toBool() ? k : 0;
    // Inputs in order: x, weights, biases, vs, uts, vt, psts, cast_dtype; a gradient slot for each.
    const int64_t w0 = 1, b0 = 1 + k, v0 = 1 + k + nb;
    variable_list out(v0 + 3 * k + 2);
    auto dtype = [&](int64_t m, int64_t which) { return static_cast<at::ScalarType>(dtypes[1 + 3 * m + which]); };
    std::vector<at::Tensor> g2d(k);
    for (int64_t m = 0; m < k; ++m)
      if (grads[m].defined()) g2d[m] = grads[m].reshape({-1, grads[m].size(-1)});  // (tokens, out_m)
    const bool need_x = ctx->needs_input_grad(0);
    at::Tensor gx;  // (tokens, in)
    for (int64_t m = 0; need_x && m < k; ++m) {
      if (!g2d[m].defined()) continue;
      at::Tensor t = at::mm(g2d[m], saved[2 + m]).to(static_cast<at::ScalarType>(dtypes[0]));
      gx = gx.defined() ? gx.add_(t) : t;
    }
    std::vector<bool> need_v(k);
    bool any_v = false;
    for (int64_t m = 0; m < k; ++m) {
      need_v[m] = g2d[m].defined() && ctx->needs_input_grad(v0 + m);
      any_v = any_v || need_v[m];
    }
    std::vector<at::Tensor> grad_cores(k);  // (r, r) = dL/d(Sigma_m M_m)^T
    bool joint = gx.defined() && k * r <= kMaxRank && reads_activation(gx);
    for (int64_t m = 0; m < k; ++m) joint = joint && (!g2d[m].defined() || reads_activation(g2d[m]));
    if (joint) {
      // gU of every module (zeros for an output without a gradient), then all k updates in one pass over gx.
      std::vector<at::Tensor> gus;
      for (int64_t m = 0; m < k; ++m)
        gus.push_back(g2d[m].defined() ? project(g2d[m], uts[m]) : at::zeros({h.size(0), r}, h.options()));
      const at::Tensor gu = at::cat(gus, 1);  // (tokens, k r)
      at::Tensor core = at::zeros({k * r, k * r}, h.options());  // blockdiag(Sigma_m M_m)
      float* C = core.data_ptr<float>();
      for (int64_t m = 0; m < k; ++m) {
        const float* Ct = core_ts[m].data_ptr<float>();
        for (int64_t i = 0; i < r; ++i)
          for (int64_t j = 0; j < r; ++j) C[(m * r + i) * k * r + m * r + j] = Ct[j * r + i];
      }
      add_rank_r_(gx, gu, core, vt);
      for (int64_t m = 0; m < k; ++m)
        if (need_v[m]) grad_cores[m] = block_gram(h, gu, m * r, r);
    } else if (need_x || any_v) {
      for (int64_t m = 0; m < k; ++m) {
        if (!g2d[m].defined()) continue;
        grad_cores[m] = update_backward(gx.defined() ? &gx : nullptr, g2d[m], h.narrow(1, m * r, r), uts[m],
                                        core_ts[m], vt.narrow(0, m * r, r), need_v[m]);
      }
    }
    if (gx.defined()) out[0] = gx.view(x_sizes);
    const at::Tensor xb2d = xb.defined() ? xb.reshape({-1, xb.size(-1)}) : xb;
    for (int64_t m = 0; m < k; ++m) {
      if (!g2d[m].defined()) continue;
      if (ctx->needs_input_grad(w0 + m)) out[w0 + m] = at::mm(g2d[m].t(), xb2d).to(dtype(m, 0));  // (out_m, in)
      if (nb && ctx->needs_input_grad(b0 + m)) out[b0 + m] = g2d[m].sum(0).to(dtype(m, 1));        // (out_m,)
      if (need_v[m]) {
        at::Tensor gv = grad_v(psts[m], grad_cores[m].contiguous(), dtype(m, 2));  // (u,)
        at::Tensor& slot = out[v0 + first_v[m]];
        slot = slot.defined() ? slot + gv : gv;
      }
    }
    return out;
  }
};

std::vector<at::Tensor> group_linear_autograd(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                              at::TensorList vs, at::TensorList uts, const at::Tensor& vt,
                                              at::TensorList psts, std::optional<at::ScalarType> cast_dtype) {
  return TinyLoRAGroupFn::apply(x, weights, biases, vs, uts, vt, psts, cast_dtype);
}

std::vector<at::Tensor> group_linear_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                                         at::TensorList vs, at::TensorList uts, const at::Tensor& vt,
                                         at::TensorList psts, std::optional<at::ScalarType> cast_dtype) {
  return run_group_forward(x, weights, biases, vs, uts, vt, psts, cast_dtype).ys;
}

}  // namespace
}  // namespace tinylora_verl

TORCH_LIBRARY_FRAGMENT(tinylora_verl, m) {
  m.def("group_linear(Tensor x, Tensor[] weights, Tensor[] biases, Tensor[] vs, Tensor[] uts, Tensor vt, "
        "Tensor[] psts, ScalarType? cast_dtype=None) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(tinylora_verl, Autograd, m) { m.impl("group_linear", &tinylora_verl::group_linear_autograd); }

TORCH_LIBRARY_IMPL(tinylora_verl, CPU, m) { m.impl("group_linear", &tinylora_verl::group_linear_cpu); }
