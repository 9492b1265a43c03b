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
#ifdef __AVX512F__
#include <immintrin.h>
#endif
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
// AVX2 ones), and 16 bfloat16 bits, loadable from any 2-byte aligned address.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t bf16x16 __attribute__((vector_size(32), aligned(2)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) { return *reinterpret_cast<const v16*>(p); }

// 16 bfloat16 widened to float32 in registers (zero-extend, shift into the high half: exact).
inline v16 load16(const uint16_t* p) {
#ifdef __AVX512F__
  // One vpmovzxwd: the generic conversion below compiles to two half-width ones and a merge.
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m512i wide = _mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16);
  return reinterpret_cast<v16>(_mm512_castsi512_ps(wide));
#else
  const u32x16 wide = __builtin_convertvector(*reinterpret_cast<const bf16x16*>(p), u32x16) << 16;
  v16 f;
  std::memcpy(&f, &wide, sizeof(f));
  return f;
#endif
}

inline float to_float(float x) { return x; }
inline float to_float(uint16_t b) { return bf16_bits_to_float(b); }

inline void store16(float* p, v16 v) { *reinterpret_cast<v16*>(p) = v; }

// 16 floats rounded to bfloat16 as float_to_bf16_bits does, lane by lane (same bits, NaN included).
inline void store16(uint16_t* p, v16 v) {
#ifdef __AVX512F__
  // vcvtneps2bf16 would be one instruction but flushes subnormals to zero; this is c10's rounding exactly.
  const __m512 f = reinterpret_cast<__m512>(v);
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(rounded));
#else
  u32x16 u;
  std::memcpy(&u, &v, sizeof(u));
  u32x16 rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const u32x16 nan = reinterpret_cast<u32x16>(v != v);  // all ones in NaN lanes
  rounded = (rounded & ~nan) | (nan & 0x7FC0u);
  *reinterpret_cast<bf16x16*>(p) = __builtin_convertvector(rounded, bf16x16);
#endif
}

inline void store1(float* p, float v) { *p = v; }
inline void store1(uint16_t* p, float v) { *p = float_to_bf16_bits(v); }

inline float hsum(v16 p) {
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += p[l];
  return s;
}

// acc_k = sum_j x_j w_kj for KB outputs at once (w rows ldw apart). Each 16-wide slice of x is loaded (and, for
// bf16, widened) once for all KB outputs, and every output keeps two vector accumulators for the whole row,
// reduced across lanes once at its end: a reduction per 512-element block (and a bf16 block widened through a
// stack buffer) cost more than the row's FMAs at r = 2 (bf16 256 x 576 -> 2 on one thread: 22.7 us, now 12.1).
template <int KB, typename T>
inline void dots_block(const T* x, int64_t n, const float* w, int64_t ldw, float* acc) {
  v16 a0[KB] = {}, a1[KB] = {};
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const v16 x0 = load16(x + j), x1 = load16(x + j + 16);
    for (int k = 0; k < KB; ++k) {
      a0[k] += x0 * load16(w + k * ldw + j);
      a1[k] += x1 * load16(w + k * ldw + j + 16);
    }
  }
  if (j + 16 <= n) {
    const v16 x0 = load16(x + j);
    for (int k = 0; k < KB; ++k) a0[k] += x0 * load16(w + k * ldw + j);
    j += 16;
  }
  for (int k = 0; k < KB; ++k) {
    float s = hsum(a0[k] + a1[k]);
    for (int64_t i = j; i < n; ++i) s += to_float(x[i]) * w[k * ldw + i];
    acc[k] = s;
  }
}

// acc_k = sum_j x_j w_kj over one row of n elements, for k < kk (w (kk, n) row-major), outputs four at a time.
template <typename T>
void row_dots(const T* x, int64_t n, const float* w, int64_t kk, float* acc) {
  int64_t k = 0;
  for (; k + 4 <= kk; k += 4) dots_block<4>(x, n, w + k * n, n, acc + k);
  switch (kk - k) {
    case 3: dots_block<3>(x, n, w + k * n, n, acc + k); break;
    case 2: dots_block<2>(x, n, w + k * n, n, acc + k); break;
    case 1: dots_block<1>(x, n, w + k * n, n, acc + k); break;
    default: break;
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

// y_row <- y_row + sum_k c_k bt_k for a rank R known at compile time, accumulated in float32 and rounded once:
// the c_k are broadcast once per row and two 16-lane slices are in flight (independent FMA chains).
template <int R, typename T>
inline void add_row_r(T* y, int64_t n, const float* c, const float* bt) {
  v16 cv[R];
  for (int k = 0; k < R; ++k) cv[k] = v16{} + c[k];
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    v16 a0 = load16(y + j), a1 = load16(y + j + 16);
    for (int k = 0; k < R; ++k) {
      a0 += load16(bt + k * n + j) * cv[k];
      a1 += load16(bt + k * n + j + 16) * cv[k];
    }
    store16(y + j, a0);
    store16(y + j + 16, a1);
  }
  for (; j + 16 <= n; j += 16) {
    v16 a0 = load16(y + j);
    for (int k = 0; k < R; ++k) a0 += load16(bt + k * n + j) * cv[k];
    store16(y + j, a0);
  }
  for (; j < n; ++j) {
    float acc = to_float(y[j]);
    for (int k = 0; k < R; ++k) acc += bt[k * n + j] * c[k];
    store1(y + j, acc);
  }
}

// y_row <- y_row + sum_k c_k bt_k, accumulated in float32 and rounded once (any rank up to kMaxRank).
template <typename T>
inline void add_row(T* y, int64_t n, int64_t r, const float* c, const float* bt) {
  switch (r) {
    case 1: return add_row_r<1>(y, n, c, bt);
    case 2: return add_row_r<2>(y, n, c, bt);
    case 3: return add_row_r<3>(y, n, c, bt);
    case 4: return add_row_r<4>(y, n, c, bt);
    // A group's joint update (group_linear's backward): q/k/v at r = 2, gate/up at r = 3 or 4.
    case 6: return add_row_r<6>(y, n, c, bt);
    case 8: return add_row_r<8>(y, n, c, bt);
    default: break;
  }
  for (int64_t j = 0; j < n; ++j) {
    float acc = to_float(y[j]);
    for (int64_t k = 0; k < r; ++k) acc += bt[k * n + j] * c[k];
    store1(y + j, acc);
  }
}

template <typename T>
void add_rows(T* y, int64_t rows, int64_t n, int64_t r, const float* a, int64_t lda, const float* core,
              const float* bt) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    float c[kMaxRank];
    for (int64_t t = begin; t < end; ++t) {
      mix_row(a + t * lda, core, r, false, c);
      add_row(y + t * n, n, r, c, bt);
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

// Calls f(ptr) with y's data as float* or uint16_t* (bfloat16 bits).
template <typename F>
void with_data(at::Tensor& y, F f) {
  if (y.scalar_type() == at::kFloat) {
    f(y.data_ptr<float>());
  } else {
    f(reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
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
  with_data(y, [&](auto Y) { add_rows(Y, rows, n, r, A, a.stride(0), C, B); });
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
  // GX is null when there is no gx to add into.
  auto run = [&](auto G, auto GX) {
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      float gu[kMaxRank], c[kMaxRank];
      for (int64_t ch = c0; ch < c1; ++ch) {
        double* acc = partial.data() + ch * r * r;
        for (int64_t t = ch * per; t < std::min(rows, (ch + 1) * per); ++t) {
          row_dots(G + t * ldg, m, Ut, r, gu);
          const float* ht = H + t * ldh;
          for (int64_t j = 0; j < r; ++j)
            for (int64_t k = 0; k < r; ++k) acc[j * r + k] += static_cast<double>(ht[j]) * gu[k];
          if (GX != nullptr) {
            mix_row(gu, Ct, r, true, c);  // c = gU ct^T = gU (Sigma M)
            add_row(GX + t * n, n, r, c, Vt);
          }
        }
      }
    });
  };
  with_rows(g, [&](auto G) {
    if (grad_x.defined()) {
      with_data(grad_x, [&](auto GX) { run(G, GX); });
    } else {
      run(G, static_cast<float*>(nullptr));
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
