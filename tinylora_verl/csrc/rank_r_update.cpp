// y <- y + (a core) bt in one pass over y, for the TinyLoRA update on the CPU (see tinylora_verl/cpu_kernel.py).
//
// y (rows, n) float32 or bfloat16, a (rows, r), core (r, r), bt (r, n) float32, all contiguous except that a's
// rows may be strided (a column slice of the (rows, k r) projection shared by q/k/v or gate/up). Per row the r
// mixed coefficients c = a_t core are formed in float32, then y_tj + sum_k c_k bt_kj is accumulated in float32
// and rounded once into y's dtype. Torch's ops need a (rows, r) x (r, r) GEMM, a K = r GEMM into a fresh
// (rows, n) tensor, a cast and an add: three passes over an activation-sized tensor where this makes one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t kMaxRank = 16;

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

template <typename Load, typename Store>
void add_rows(int64_t rows, int64_t n, int64_t r, const float* a, int64_t lda, const float* core, const float* bt,
              Load load, Store store) {
  // ~16k elements of y per task: below that, waking the second thread costs more than the pass.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    float c[kMaxRank];
    for (int64_t t = begin; t < end; ++t) {
      const float* at_ = a + t * lda;
      for (int64_t k = 0; k < r; ++k) {
        float s = 0.f;
        for (int64_t j = 0; j < r; ++j) s += at_[j] * core[j * r + k];
        c[k] = s;
      }
      const int64_t row = t * n;
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
  });
}

void check_float32(const at::Tensor& t, const char* name, bool strided_rows = false) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "add_rank_r_: ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(strided_rows ? t.stride(1) == 1 && t.stride(0) >= t.size(1) : t.is_contiguous(), "add_rank_r_: ",
              name, strided_rows ? " must have contiguous rows" : " must be contiguous", ", got strides ", t.strides());
  TORCH_CHECK(t.device().is_cpu(), "add_rank_r_: ", name, " must be on the CPU, got ", t.device());
}

void add_rank_r_(at::Tensor y, const at::Tensor& a, const at::Tensor& core, const at::Tensor& bt) {
  TORCH_CHECK(y.dim() == 2 && a.dim() == 2 && core.dim() == 2 && bt.dim() == 2,
              "add_rank_r_: y, a, core, bt must be 2-D, got shapes ", y.sizes(), ", ", a.sizes(), ", ",
              core.sizes(), ", ", bt.sizes());
  const int64_t rows = y.size(0), n = y.size(1), r = a.size(1);
  TORCH_CHECK(a.size(0) == rows && core.size(0) == r && core.size(1) == r && bt.size(0) == r && bt.size(1) == n,
              "add_rank_r_: shapes do not chain as y (rows, n) += a (rows, r) core (r, r) bt (r, n): got y ",
              y.sizes(), ", a ", a.sizes(), ", core ", core.sizes(), ", bt ", bt.sizes());
  TORCH_CHECK(r >= 1 && r <= kMaxRank, "add_rank_r_: rank must be in [1, ", kMaxRank, "], got ", r);
  TORCH_CHECK(y.scalar_type() == at::kFloat || y.scalar_type() == at::kBFloat16,
              "add_rank_r_: y must be float32 or bfloat16, got ", y.scalar_type());
  TORCH_CHECK(y.is_contiguous() && y.device().is_cpu(), "add_rank_r_: y must be a contiguous CPU tensor, got ",
              y.device(), " with strides ", y.strides());
  check_float32(a, "a", true);
  check_float32(core, "core");
  check_float32(bt, "bt");
  const float* A = a.data_ptr<float>();
  const float* C = core.data_ptr<float>();
  const float* B = bt.data_ptr<float>();
  if (y.scalar_type() == at::kFloat) {
    float* Y = y.data_ptr<float>();
    add_rows(rows, n, r, A, a.stride(0), C, B, [Y](int64_t i) { return Y[i]; }, [Y](int64_t i, float v) { Y[i] = v; });
  } else {
    uint16_t* Y = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    add_rows(rows, n, r, A, a.stride(0), C, B, [Y](int64_t i) { return bf16_bits_to_float(Y[i]); },
             [Y](int64_t i, float v) { Y[i] = float_to_bf16_bits(v); });
  }
}

}  // namespace

TORCH_LIBRARY(tinylora_verl, m) {
  m.def("add_rank_r_(Tensor(a!) y, Tensor a, Tensor core, Tensor bt) -> ()");
}

TORCH_LIBRARY_IMPL(tinylora_verl, CPU, m) {
  m.impl("add_rank_r_", &add_rank_r_);
}
