// The fused TinyLoRA linear as one C++ autograd node (the Python reference is tinylora_verl/ops.py's
// TinyLoRALinear; this is the same arithmetic):
//
//   linear(x, weight, bias?, v, h?, ut, vt, pst, cast_dtype?) -> y
//
//   y  = x W^T + b + h (Sigma M)^T U^T,   h = x V (or the given h),   vec((Sigma M)^T) = pst v
//
// backward, with g = dL/dy and gU = g U:
//
//   dL/dx = g W + gU (Sigma M) V^T (added in place into g W),   dL/dv = pst^T vec(h^T gU),
//   dL/dW = g^T x,   dL/db = sum g
//
// Why C++: with the passes over activations in one-pass kernels, what was left of the adapter's cost on the
// CPU was Python: a torch.autograd.Function's apply, its ctx, the layout and dtype checks and one dispatch per
// small op, ~100 us per adapted linear and step (157 vs 60 us forward+backward against F.linear on tiny
// tensors), ~4% of a bf16 SmolLM2 step at 256 tokens. Here forward and backward are one dispatch each.
//
// ut (r, out), vt (r, in), pst (r r, u) float32 contiguous; x, weight, bias as F.linear takes them, cast to
// cast_dtype first when given (what autocast would hand the linear; the caller turns autocast off); v (u,) of
// any floating dtype, its gradient in that dtype; h (tokens, r) float32, taken as a constant.
#include "fused_linear.h"

#include <ATen/Dispatch.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace tinylora_verl {

// What autocast hands a linear: floating tensors other than float64 cast to its dtype.
at::Tensor autocast_cast(const at::Tensor& t, std::optional<at::ScalarType> dtype) {
  if (!dtype || !t.defined() || !t.is_floating_point() || t.scalar_type() == *dtype ||
      t.scalar_type() == at::kDouble)
    return t;
  return t.to(*dtype);
}

// t wt^T (rows, k) float32: the kernel where it reads t, else a float32 GEMM (an fp16 or column-strided t).
at::Tensor project_any(const at::Tensor& t2d, const at::Tensor& wt) {
  if (reads_activation(t2d) && wt.size(0) <= kMaxRank) return project(t2d, wt);
  return at::linear(t2d.to(at::kFloat), wt);
}

// y <- y + (a core) bt: the kernel where it writes y, else the float32 product cast once and added.
void add_any(at::Tensor& y2d, const at::Tensor& a, const at::Tensor& core, const at::Tensor& bt) {
  if (reads_activation(y2d) && y2d.is_contiguous()) {
    add_rank_r_(y2d, a, core, bt);
  } else {
    y2d.add_(at::mm(at::mm(a, core), bt).to(y2d.scalar_type()));
  }
}

// Reads element i of a 1-D floating tensor (any dtype and stride) as a double.
static double element(const at::Tensor& t, int64_t i) {
  double out = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "tinylora_verl::element", [&] {
    out = static_cast<double>(t.data_ptr<scalar_t>()[i * t.stride(0)]);
  });
  return out;
}

// (Sigma M)^T (r, r) float32 with vec((Sigma M)^T) = pst v: summed in float64 and rounded once, as ops._core_t
// does. A loop, since u and r are tiny: at::mv and the casts and views around it were ~3 us of dispatch a linear.
at::Tensor mixed_core(const at::Tensor& pst, const at::Tensor& v, int64_t r) {
  const int64_t u = v.size(0);
  std::vector<double> vd(u);
  for (int64_t i = 0; i < u; ++i) vd[i] = element(v, i);
  at::Tensor core = at::empty({r, r}, pst.options());  // (r, r)
  const float* P = pst.data_ptr<float>();
  float* C = core.data_ptr<float>();
  for (int64_t kj = 0; kj < r * r; ++kj) {
    double acc = 0.0;
    for (int64_t i = 0; i < u; ++i) acc += static_cast<double>(P[kj * u + i]) * vd[i];
    C[kj] = static_cast<float>(acc);
  }
  return core;
}

// dL/dv = pst^T vec(grad_core) (u,): summed in float64, rounded once to float32 and then to v's dtype, as
// ops._grad_v does (a loop for the same reason as mixed_core's: ~5 us of transposes, views and mv a linear).
at::Tensor grad_v(const at::Tensor& pst, const at::Tensor& grad_core, at::ScalarType v_dtype) {
  const int64_t rr = pst.size(0), u = pst.size(1);
  const float* P = pst.data_ptr<float>();
  const float* G = grad_core.data_ptr<float>();
  at::Tensor out = at::empty({u}, pst.options());  // (u,)
  float* O = out.data_ptr<float>();
  for (int64_t i = 0; i < u; ++i) {
    double acc = 0.0;
    for (int64_t kj = 0; kj < rr; ++kj) acc += static_cast<double>(P[kj * u + i]) * G[kj];
    O[i] = static_cast<float>(acc);
  }
  return v_dtype == at::kFloat ? out : out.to(v_dtype);
}

void check_factors(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& v,
                   const std::optional<at::Tensor>& h, const at::Tensor& ut, const at::Tensor& vt,
                   const at::Tensor& pst) {
  for (const auto& [t, name] : {std::pair{&ut, "ut"}, {&vt, "vt"}, {&pst, "pst"}}) {
    TORCH_CHECK(t->dim() == 2 && t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                op, ": ", name, " must be a contiguous 2-D float32 CPU tensor, got ", t->scalar_type(), " ",
                t->sizes(), " on ", t->device(), " with strides ", t->strides());
  }
  const int64_t r = ut.size(0);
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 2 && v.dim() == 1 && vt.size(0) == r && r >= 1 && r <= kMaxRank &&
                  ut.size(1) == weight.size(0) && vt.size(1) == weight.size(1) && x.size(-1) == weight.size(1) &&
                  pst.size(0) == r * r && pst.size(1) == v.size(0),
              op, ": shapes do not chain as x (..., in), weight (out, in), v (u,), ut (r, out), vt (r, in), ",
              "pst (r r, u) with 1 <= r <= ", kMaxRank, ": got x ", x.sizes(), ", weight ", weight.sizes(), ", v ",
              v.sizes(), ", ut ", ut.sizes(), ", vt ", vt.sizes(), ", pst ", pst.sizes());
  if (h.has_value() && h->defined()) {
    const int64_t tokens = x.size(-1) > 0 ? x.numel() / x.size(-1) : 0;
    TORCH_CHECK(h->dim() == 2 && h->size(0) == tokens && h->size(1) == r && h->scalar_type() == at::kFloat, op,
                ": h must be (tokens, r) = (", tokens, ", ", r, ") float32, got ", h->scalar_type(), " ",
                h->sizes());
  }
}

// The update's share of one module's backward: gx <- gx + gU (Sigma M) V^T in place when gx is given, and
// dL/d(Sigma M)^T = h^T gU (r, r) when need_v, with gU = g U.
at::Tensor update_backward(at::Tensor* gx, const at::Tensor& g2d, const at::Tensor& h, const at::Tensor& ut,
                           const at::Tensor& core_t, const at::Tensor& vt, bool need_v) {
  if (reads_activation(g2d) && (gx == nullptr || reads_activation(*gx))) {
    // One pass over g (and gx): gU stays in registers, no float32 copy of a bf16 g.
    return rank_r_backward_(gx ? std::optional<at::Tensor>(*gx) : std::nullopt, g2d, h, ut, core_t, vt);
  }
  const at::Tensor gU = project_any(g2d, ut);  // (tokens, r)
  if (gx != nullptr) add_any(*gx, gU, core_t.t().contiguous(), vt);
  return need_v ? at::mm(h.t(), gU) : at::Tensor();
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOp = "linear";

struct Forward {
  at::Tensor y, h, core_t, xb, wb;
};

Forward run_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                    const at::Tensor& v, const std::optional<at::Tensor>& h, const at::Tensor& ut,
                    const at::Tensor& vt, const at::Tensor& pst, std::optional<at::ScalarType> cast_dtype) {
  check_factors(kOp, x, weight, v, h, ut, vt, pst);
  const int64_t r = ut.size(0);
  Forward f;
  f.xb = autocast_cast(x, cast_dtype);
  f.wb = autocast_cast(weight, cast_dtype);
  std::optional<at::Tensor> bb;
  if (bias.has_value() && bias->defined()) bb = autocast_cast(*bias, cast_dtype);
  f.y = at::linear(f.xb, f.wb, bb);                         // (..., out)
  f.core_t = mixed_core(pst, v, r);                          // (r, r)
  f.h = h.has_value() && h->defined() ? *h : project_any(x.reshape({-1, x.size(-1)}), vt);  // (tokens, r)
  at::Tensor y2d = f.y.view({-1, f.y.size(-1)});            // (tokens, out)
  add_any(y2d, f.h, f.core_t, ut);
  return f;
}

class TinyLoRALinearFn : public torch::autograd::Function<TinyLoRALinearFn> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& v,
                            const std::optional<at::Tensor>& h, const at::Tensor& ut, const at::Tensor& vt,
                            const at::Tensor& pst, std::optional<at::ScalarType> cast_dtype) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Forward f = run_forward(x, weight, bias, v, h, ut, vt, pst, cast_dtype);
    const bool has_bias = bias.has_value() && bias->defined();
    // Only activations (and the weight, as F.linear's node keeps it) are saved as variables, so saved-tensor
    // hooks (offloading, checkpointing) see them; the factors and the r x r core are never written in place.
    ctx->save_for_backward({f.h, f.wb, weight.requires_grad() ? f.xb : at::Tensor()});
    ctx->saved_data["core_t"] = f.core_t;
    ctx->saved_data["ut"] = ut;
    ctx->saved_data["vt"] = vt;
    ctx->saved_data["pst"] = pst;
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    ctx->saved_data["dtypes"] = std::vector<int64_t>{
        static_cast<int64_t>(x.scalar_type()), static_cast<int64_t>(weight.scalar_type()),
        static_cast<int64_t>(has_bias ? bias->scalar_type() : x.scalar_type()),
        static_cast<int64_t>(v.scalar_type())};
    // needs_input_grad counts tensor inputs only, and an absent optional is none: v's index moves with bias.
    ctx->saved_data["has_bias"] = has_bias;
    return f.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &h = saved[0], &wb = saved[1], &xb = saved[2];
    const at::Tensor core_t = ctx->saved_data["core_t"].toTensor(), ut = ctx->saved_data["ut"].toTensor(),
                     vt = ctx->saved_data["vt"].toTensor(), pst = ctx->saved_data["pst"].toTensor();
    const std::vector<int64_t> x_sizes = ctx->saved_data["x_sizes"].toIntVector();
    const std::vector<int64_t> dtypes = ctx->saved_data["dtypes"].toIntVector();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2), need_v = ctx->needs_input_grad(has_bias ? 3 : 2);
    const at::Tensor& g = grads[0];
    const at::Tensor g2d = g.reshape({-1, g.size(-1)});  // (tokens, out)
    at::Tensor gx, gw, gb, gv;
    if (need_x) gx = at::mm(g2d, wb).to(static_cast<at::ScalarType>(dtypes[0]));  // (tokens, in)
    if (need_x || need_v) {
      const at::Tensor grad_core = update_backward(need_x ? &gx : nullptr, g2d, h, ut, core_t, vt, need_v);
      if (need_v) gv = grad_v(pst, grad_core.contiguous(), static_cast<at::ScalarType>(dtypes[3]));  // (u,)
    }
    if (need_x) gx = gx.view(x_sizes);
    if (need_w) gw = at::mm(g2d.t(), xb.reshape({-1, xb.size(-1)})).to(static_cast<at::ScalarType>(dtypes[1]));
    if (need_b) gb = g2d.sum(0).to(static_cast<at::ScalarType>(dtypes[2]));  // (out,)
    return {gx, gw, gb, gv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& v, const std::optional<at::Tensor>& h, const at::Tensor& ut,
                           const at::Tensor& vt, const at::Tensor& pst, std::optional<at::ScalarType> cast_dtype) {
  return TinyLoRALinearFn::apply(x, weight, bias, v, h, ut, vt, pst, cast_dtype);
}

// Below autograd (inference mode): the forward alone.
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& v, const std::optional<at::Tensor>& h, const at::Tensor& ut,
                      const at::Tensor& vt, const at::Tensor& pst, std::optional<at::ScalarType> cast_dtype) {
  return run_forward(x, weight, bias, v, h, ut, vt, pst, cast_dtype).y;
}

}  // namespace
}  // namespace tinylora_verl

TORCH_LIBRARY_FRAGMENT(tinylora_verl, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor v, Tensor? h, Tensor ut, Tensor vt, Tensor pst, "
        "ScalarType? cast_dtype=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinylora_verl, Autograd, m) { m.impl("linear", &tinylora_verl::linear_autograd); }

TORCH_LIBRARY_IMPL(tinylora_verl, CPU, m) { m.impl("linear", &tinylora_verl::linear_cpu); }
