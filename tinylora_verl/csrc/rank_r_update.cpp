// The TinyLoRA update's passes over activations on the CPU, one pass each (see tinylora_verl/cpu_kernel.py):
//
//   add_rank_r_(y, a, core, bt)            y <- y + (a core) bt
//   project(x, vt) -> h                    h = x vt^T, (rows, k) float32
//   rank_r_backward_(gx?, g, h, ut, ct, vt) gU = g ut^T; gx <- gx + (gU ct^T) vt; returns h^T gU (r, r)
//
// y, x, g, gx (rows, n) float32 or bfloat16; a, h (rows, r) and the factors bt, ut, vt (r, n), core, ct (r, r)
// float32, all contiguous except that a, h and x may have strided rows (a column slice of the (rows, k r)
// projection shared by q/k/v or gate/up, a view of a wider input). Every sum is accumulated in float32 (the
// r x r gradient in float64) and rounded once into the output's dtype. Torch's ops need, per pass, a cast of a
// bf16 activation into a fresh float32 copy, a thin GEMM and for the add a K = r GEMM into a fresh (rows, n)
// tensor and an add: several passes and fresh pages where these make one (the cast of one gate_proj output
// gradient alone is 1.5 MB of new float32 at 256 tokens).
#include "rank_r_kernels.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace tinylora_verl {
namespace {

inline float bf16_bits_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even, as c10::BFloat16's constructor does; NaN stays a quiet NaN.
inline uint16_t float_to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? static_cast<uint16_t>(0x7FC0u) : static_cast<uint16_t>(rounded);
}

// ~16k elements per task: below that, waking the second thread costs more than the pass.
inline int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// 16 floats, loadable from any 4-byte aligned address (GCC/Clang vector extension: one AVX-512 register or two
// AVX2 ones).
typedef float v16 __attribute__((vector_size(64), aligned(4)));
inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }

// acc_k = sum_j x_j w_kj over one row of n elements, for k < kk (w (kk, n) row-major). bf16 rows are widened a
// block at a time, so each element is converted once however many outputs read it.
template <typename T>
void row_dots(const T* x, int64_t n, const float* w, int64_t kk, float* acc) {
  constexpr int64_t kBlock = 512;
  float buf[kBlock];
  for (int64_t k = 0; k < kk; ++k) acc[k] = 0.f;
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n - j0);
    const float* xs;
    if constexpr (std::is_same_v<T, float>) {
      xs = x + j0;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < len; ++j) buf[j] = bf16_bits_to_float(x[j0 + j]);
      xs = buf;
    }
    for (int64_t k = 0; k < kk; ++k) {
      const float* wk = w + k * n + j0;
      // Four independent accumulators: with one, each add waits on the last (serial 256 x 576: 36 vs 17 us).
      v16 p0 = {}, p1 = {}, p2 = {}, p3 = {};
      int64_t j = 0;
      for (; j + 64 <= len; j += 64) {
        p0 += load16(xs + j) * load16(wk + j);
        p1 += load16(xs + j + 16) * load16(wk + j + 16);
        p2 += load16(xs + j + 32) * load16(wk + j + 32);
        p3 += load16(xs + j + 48) * load16(wk + j + 48);
      }
      for (; j + 16 <= len; j += 16) p0 += load16(xs + j) * load16(wk + j);
      const v16 p = (p0 + p1) + (p2 + p3);
      float s = 0.f;
      for (int l = 0; l < 16; ++l) s += p[l];
      for (; j < len; ++j) s += xs[j] * wk[j];
      acc[k] += s;
    }
  }
}

// c_k = sum_j a_j m_jk for the r x r mixing matrix m, stored row-major or (transposed) as its transpose.
inline void mix_row(const float* a, const float* m, int64_t r, bool transposed, float* c) {
  for (int64_t k = 0; k < r; ++k) {
    float s = 0.f;
    for (int64_t j = 0; j < r; ++j) s += a[j] * (transposed ? m[k * r + j] : m[j * r + k]);
    c[k] = s;
  }
}

// y_row <- y_row + sum_k c_k bt_k, accumulated in float32 and rounded once.
template <typename Load, typename Store>
inline void add_row(int64_t row, int64_t n, int64_t r, const float* c, const float* bt, Load load, Store store) {
  if (r == 2) {
    const float c0 = c[0], c1 = c[1];
    const float* b0 = bt;
    const float* b1 = bt + n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) store(row + j, load(row + j) + c0 * b0[j] + c1 * b1[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) {
      float acc = load(row + j);
      for (int64_t k = 0; k < r; ++k) acc += c[k] * bt[k * n + j];
      store(row + j, acc);
    }
  }
}

template <typename Load, typename Store>
void add_rows(int64_t rows, int64_t n, int64_t r, const float* a, int64_t lda, const float* core, const float* bt,
              Load load, Store store) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    float c[kMaxRank];
    for (int64_t t = begin; t < end; ++t) {
      mix_row(a + t * lda, core, r, false, c);
      add_row(t * n, n, r, c, bt, load, store);
    }
  });
}

void check_float32(const char* op, const at::Tensor& t, const char* name, bool strided_rows = false) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(strided_rows ? rows_contiguous(t) : t.is_contiguous(), op, ": ", name,
              strided_rows ? " must have contiguous rows" : " must be contiguous", ", got strides ", t.strides());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
}

// An activation: float32 or bfloat16 on the CPU, contiguous (or with contiguous rows, for an input).
void check_activation(const char* op, const at::Tensor& t, const char* name, bool strided_rows = false) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK((strided_rows ? rows_contiguous(t) : t.is_contiguous()) && t.device().is_cpu(), op, ": ", name,
              strided_rows ? " must be a CPU tensor with contiguous rows" : " must be a contiguous CPU tensor",
              ", got ", t.device(), " with strides ", t.strides());
}

void check_2d(const char* op, std::initializer_list<const at::Tensor*> ts, const char* names) {
  for (const at::Tensor* t : ts) {
    if (t->dim() != 2) {
      std::vector<at::IntArrayRef> shapes;
      for (const at::Tensor* u : ts) shapes.push_back(u->sizes());
      TORCH_CHECK(false, op, ": ", names, " must be 2-D, got shapes ", c10::Join(", ", shapes));
    }
  }
}

void check_rank(const char* op, int64_t r) {
  TORCH_CHECK(r >= 1 && r <= kMaxRank, op, ": rank must be in [1, ", kMaxRank, "], got ", r);
}

// Calls f(load, store) with element accessors for a float32 or bfloat16 tensor.
template <typename F>
void with_accessors(at::Tensor& y, F f) {
  if (y.scalar_type() == at::kFloat) {
    float* Y = y.data_ptr<float>();
    f([Y](int64_t i) { return Y[i]; }, [Y](int64_t i, float v) { Y[i] = v; });
  } else {
    uint16_t* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    f([Y](int64_t i) { return bf16_bits_to_float(Y[i]); }, [Y](int64_t i, float v) { Y[i] = float_to_bf16_bits(v); });
  }
}

// Calls f(ptr) with x's data as const float* or const uint16_t* (bfloat16 bits).
template <typename F>
void with_rows(const at::Tensor& x, F f) {
  if (x.scalar_type() == at::kFloat) {
    f(x.data_ptr<float>());
  } else {
    f(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()));
  }
}

}  // namespace

void add_rank_r_(at::Tensor y, const at::Tensor& a, const at::Tensor& core, const at::Tensor& bt) {
  constexpr const char* op = "add_rank_r_";
  check_2d(op, {&y, &a, &core, &bt}, "y, a, core, bt");
  const int64_t rows = y.size(0), n = y.size(1), r = a.size(1);
  TORCH_CHECK(a.size(0) == rows && core.size(0) == r && core.size(1) == r && bt.size(0) == r && bt.size(1) == n,
              op, ": shapes do not chain as y (rows, n) += a (rows, r) core (r, r) bt (r, n): got y ", y.sizes(),
              ", a ", a.sizes(), ", core ", core.sizes(), ", bt ", bt.sizes());
  check_rank(op, r);
  check_activation(op, y, "y");
  check_float32(op, a, "a", true);
  check_float32(op, core, "core");
  check_float32(op, bt, "bt");
  const float* A = a.data_ptr<float>();
  const float* C = core.data_ptr<float>();
  const float* B = bt.data_ptr<float>();
  with_accessors(y, [&](auto load, auto store) { add_rows(rows, n, r, A, a.stride(0), C, B, load, store); });
}

at::Tensor project(const at::Tensor& x, const at::Tensor& vt) {
  constexpr const char* op = "project";
  check_2d(op, {&x, &vt}, "x, vt");
  const int64_t rows = x.size(0), n = x.size(1), k = vt.size(0);
  TORCH_CHECK(vt.size(1) == n, op, ": shapes do not chain as h (rows, k) = x (rows, n) vt (k, n)^T: got x ",
              x.sizes(), ", vt ", vt.sizes());
  check_rank(op, k);
  check_activation(op, x, "x", true);
  check_float32(op, vt, "vt");
  at::Tensor h = at::empty({rows, k}, vt.options());
  float* H = h.data_ptr<float>();
  const float* W = vt.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  with_rows(x, [&](auto X) {
    at::parallel_for(0, rows, grain_rows(n * k), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) row_dots(X + t * ldx, n, W, k, H + t * k);
    });
  });
  return h;
}

at::Tensor rank_r_backward_(const std::optional<at::Tensor>& gx, const at::Tensor& g, const at::Tensor& h,
                            const at::Tensor& ut, const at::Tensor& ct, const at::Tensor& vt) {
  constexpr const char* op = "rank_r_backward_";
  check_2d(op, {&g, &h, &ut, &ct, &vt}, "g, h, ut, ct, vt");
  const int64_t rows = g.size(0), m = g.size(1), r = h.size(1), n = vt.size(1);
  TORCH_CHECK(h.size(0) == rows && ut.size(0) == r && ut.size(1) == m && ct.size(0) == r && ct.size(1) == r &&
                  vt.size(0) == r,
              op, ": shapes do not chain as g (rows, m), h (rows, r), ut (r, m), ct (r, r), vt (r, n): got g ",
              g.sizes(), ", h ", h.sizes(), ", ut ", ut.sizes(), ", ct ", ct.sizes(), ", vt ", vt.sizes());
  check_rank(op, r);
  check_activation(op, g, "g", true);
  check_float32(op, h, "h", true);
  check_float32(op, ut, "ut");
  check_float32(op, ct, "ct");
  check_float32(op, vt, "vt");
  at::Tensor grad_x;
  if (gx.has_value() && gx->defined()) {
    grad_x = *gx;
    TORCH_CHECK(grad_x.dim() == 2 && grad_x.size(0) == rows && grad_x.size(1) == n, op,
                ": gx must be (rows, n) = (", rows, ", ", n, "), got ", grad_x.sizes());
    check_activation(op, grad_x, "gx");
  }
  const float* H = h.data_ptr<float>();
  const float* Ut = ut.data_ptr<float>();
  const float* Ct = ct.data_ptr<float>();
  const float* Vt = vt.data_ptr<float>();
  const int64_t ldg = g.stride(0), ldh = h.stride(0);
  // h^T gU is summed per chunk of rows in float64, then the chunks in order: the same result for a given
  // thread count whichever thread runs which chunk.
  const int64_t grain = grain_rows(std::max(m, n));
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + grain - 1) / grain));
  const int64_t per = (rows + chunks - 1) / chunks;
  std::vector<double> partial(chunks * r * r, 0.0);
  auto run = [&](auto G, auto load, auto store, bool add) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      float gu[kMaxRank], c[kMaxRank];
      for (int64_t ch = c0; ch < c1; ++ch) {
        double* acc = partial.data() + ch * r * r;
        for (int64_t t = ch * per; t < std::min(rows, (ch + 1) * per); ++t) {
          row_dots(G + t * ldg, m, Ut, r, gu);
          const float* ht = H + t * ldh;
          for (int64_t j = 0; j < r; ++j)
            for (int64_t k = 0; k < r; ++k) acc[j * r + k] += static_cast<double>(ht[j]) * gu[k];
          if (add) {
            mix_row(gu, Ct, r, true, c);  // c = gU ct^T = gU (Sigma M)
            add_row(t * n, n, r, c, Vt, load, store);
          }
        }
      }
    });
  };
  with_rows(g, [&](auto G) {
    if (grad_x.defined()) {
      with_accessors(grad_x, [&](auto load, auto store) { run(G, load, store, true); });
    } else {
      run(G, [](int64_t) { return 0.f; }, [](int64_t, float) {}, false);
    }
  });
  at::Tensor grad_core = at::empty({r, r}, h.options());
  float* out = grad_core.data_ptr<float>();
  for (int64_t i = 0; i < r * r; ++i) {
    double sum = 0.0;
    for (int64_t ch = 0; ch < chunks; ++ch) sum += partial[ch * r * r + i];
    out[i] = static_cast<float>(sum);
  }
  return grad_core;
}

}  // namespace tinylora_verl

TORCH_LIBRARY(tinylora_verl, m) {
  m.def("add_rank_r_(Tensor(a!) y, Tensor a, Tensor core, Tensor bt) -> ()");
  m.def("project(Tensor x, Tensor vt) -> Tensor");
  m.def("rank_r_backward_(Tensor(a!)? gx, Tensor g, Tensor h, Tensor ut, Tensor ct, Tensor vt) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinylora_verl, CPU, m) {
  m.impl("add_rank_r_", &tinylora_verl::add_rank_r_);
  m.impl("project", &tinylora_verl::project);
  m.impl("rank_r_backward_", &tinylora_verl::rank_r_backward_);
}
