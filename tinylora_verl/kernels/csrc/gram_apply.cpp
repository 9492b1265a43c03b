// The products with a weight's Gram in the block Lanczos of tinylora_verl/factors.py (see cpu_kernel.py):
//
//   gram_apply(a, x, tall) -> w     w = x aᵀa (tall) or x a aᵀ (wide), for each weight of the batch
//
// a (B, out, in) and x (B, b, s) float32 with unit inner strides, s the smaller side (in if tall, out if wide),
// b <= kMaxBlock. Two batched GEMMs read a twice per step, and at a block of b = 2 rows they are bound by that
// reading, not by FLOPs (~0.4 ms a step for two of SmolLM2's MLP weights). Tall, each row aᵢ of a is read once:
// yᵢ = x aᵢᵀ and w += yᵢ aᵢ while aᵢ is in L1. Wide needs all of y = x a before w = y aᵀ, so it makes two passes
// of row dots and axpys instead. The rows are cut into fixed chunks whose partial sums are added in order, so
// the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

namespace tinylora_verl {
namespace {

// Rows of a block per parallel work unit: fixed, so the order of every sum is the same on any thread count.
constexpr int64_t kChunkRows = 512;
// The block's rows' dots live on the stack.
constexpr int64_t kMaxBlock = 8;

inline float dot(const float* p, const float* q, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < n; ++j) acc += p[j] * q[j];
  return acc;
}

inline void axpy(float* y, float alpha, const float* p, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] += alpha * p[j];
}

struct Batch {
  const float* a;
  int64_t a_batch, a_row, rows, cols;  // strides of a's weights and rows; a weight is (rows, cols)
  const float* x;
  int64_t x_batch, x_row, b;  // strides of x's weights and rows; b rows per weight
};

// out[c] += sum over rows i in [r0, r1) of (x_c . a_i) a_i, out (b, cols) contiguous: x Aᵀ A over those rows.
void tall_chunk(const Batch& t, int64_t w, int64_t r0, int64_t r1, float* out) {
  const float* a = t.a + w * t.a_batch;
  const float* x = t.x + w * t.x_batch;
  float y[kMaxBlock];
  for (int64_t i = r0; i < r1; ++i) {
    const float* ai = a + i * t.a_row;
    for (int64_t c = 0; c < t.b; ++c) y[c] = dot(x + c * t.x_row, ai, t.cols);
    for (int64_t c = 0; c < t.b; ++c) axpy(out + c * t.cols, y[c], ai, t.cols);
  }
}

// out[c] += sum over rows i in [r0, r1) of x[c, i] a_i, out (b, cols) contiguous: x A over those rows.
void wide_chunk(const Batch& t, int64_t w, int64_t r0, int64_t r1, float* out) {
  const float* a = t.a + w * t.a_batch;
  const float* x = t.x + w * t.x_batch;
  for (int64_t i = r0; i < r1; ++i) {
    const float* ai = a + i * t.a_row;
    for (int64_t c = 0; c < t.b; ++c) axpy(out + c * t.cols, x[c * t.x_row + i], ai, t.cols);
  }
}

// Sum the per-chunk partials (B, chunks, b, len) over chunks, in order, into (B, b, len).
at::Tensor sum_chunks(const at::Tensor& partial) {
  const int64_t nb = partial.size(0), chunks = partial.size(1), len = partial.size(2) * partial.size(3);
  auto out = at::empty({nb, partial.size(2), partial.size(3)}, partial.options());
  const float* p = partial.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, nb, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      std::copy_n(p + w * chunks * len, len, o + w * len);
      for (int64_t c = 1; c < chunks; ++c) axpy(o + w * len, 1.f, p + (w * chunks + c) * len, len);
    }
  });
  return out;
}

// Run f(weight, first row, end row, partial output) over every (weight, chunk of rows) and sum the partials.
template <typename F>
at::Tensor over_chunks(const Batch& t, int64_t nb, F f) {
  const int64_t chunks = (t.rows + kChunkRows - 1) / kChunkRows;
  auto partial = at::zeros({nb, chunks, t.b, t.cols}, at::kFloat);
  float* p = partial.data_ptr<float>();
  at::parallel_for(0, nb * chunks, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t w = u / chunks, r0 = (u % chunks) * kChunkRows;
      f(t, w, r0, std::min(r0 + kChunkRows, t.rows), p + u * t.b * t.cols);
    }
  });
  return sum_chunks(partial);
}

at::Tensor gram_apply(const at::Tensor& a, const at::Tensor& x, bool tall) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat,
              "gram_apply: a and x must be float32, got ", a.scalar_type(), " and ", x.scalar_type());
  TORCH_CHECK(a.dim() == 3 && x.dim() == 3, "gram_apply: a (B, out, in) and x (B, b, s) must be 3-D, got ",
              a.sizes(), " and ", x.sizes());
  const int64_t nb = a.size(0), out_f = a.size(1), in_f = a.size(2), b = x.size(1);
  const int64_t s = tall ? in_f : out_f;
  TORCH_CHECK(x.size(0) == nb && x.size(2) == s, "gram_apply: x must be (", nb, ", b, ", s, ") for a of shape ",
              a.sizes(), " (tall=", tall, "), got ", x.sizes());
  TORCH_CHECK(b >= 1 && b <= kMaxBlock, "gram_apply: a block of ", b, " rows; allowed: 1 to ", kMaxBlock);
  TORCH_CHECK(a.stride(2) == 1 && x.stride(2) == 1, "gram_apply: a and x need unit inner strides, got ",
              a.strides(), " and ", x.strides());
  Batch t{a.data_ptr<float>(), a.stride(0), a.stride(1), out_f, in_f, x.data_ptr<float>(), x.stride(0),
          x.stride(1), b};
  if (nb == 0) return at::zeros({nb, b, s}, a.options());
  if (tall) return over_chunks(t, nb, tall_chunk);  // (B, b, in)
  const at::Tensor y = over_chunks(t, nb, wide_chunk);  // (B, b, in) = x a
  auto w = at::empty({nb, b, out_f}, a.options());  // (B, b, out) = y aᵀ
  const float* yp = y.data_ptr<float>();
  float* wp = w.data_ptr<float>();
  const int64_t chunks = (out_f + kChunkRows - 1) / kChunkRows;
  at::parallel_for(0, nb * chunks, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t wi = u / chunks, r0 = (u % chunks) * kChunkRows, r1 = std::min(r0 + kChunkRows, out_f);
      const float* aw = t.a + wi * t.a_batch;
      for (int64_t i = r0; i < r1; ++i)
        for (int64_t c = 0; c < b; ++c)
          wp[(wi * b + c) * out_f + i] = dot(yp + (wi * b + c) * in_f, aw + i * t.a_row, in_f);
    }
  });
  return w;
}

}  // namespace
}  // namespace tinylora_verl

TORCH_LIBRARY_FRAGMENT(tinylora_verl, m) { m.def("gram_apply(Tensor a, Tensor x, bool tall) -> Tensor"); }

// CPU key only: the dispatcher rejects tensors of any other device before gram_apply runs.
TORCH_LIBRARY_IMPL(tinylora_verl, CPU, m) { m.impl("gram_apply", &tinylora_verl::gram_apply); }
