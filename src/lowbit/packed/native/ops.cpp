// The torch operators over gemv.c: lowbit_native::qgemv, ::fgemv, ::dequant (CPU, fp32).
// Registered in C++ so that eager calls and torch.compile'd graphs reach the kernels through the
// dispatcher in a few microseconds (a Python custom op costs ~15 us a call, ~3 ms a decode step).
// Shapes and layouts are checked by the Python caller (lowbit.packed.kernels.native_layout).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

extern "C" {
void lowbit_qgemv(const float *x, int64_t M, int64_t K, const uint8_t *w, int bits, const float *scale,
                  const int8_t *zero, int64_t N, int64_t G, const float *bias, float *y, int threads);
void lowbit_fgemv(const float *x, int64_t M, int64_t K, const float *w, int64_t N, const float *bias, float *y,
                  int threads);
void lowbit_dequant(const uint8_t *w, int bits, const float *scale, const int8_t *zero, int64_t N, int64_t K,
                    int64_t G, float *out, int threads);
int lowbit_native_avx512(void);
}

namespace {

const float *opt_float(const std::optional<at::Tensor> &t) { return t ? t->data_ptr<float>() : nullptr; }

at::Tensor out_like(const at::Tensor &x, int64_t n) {
  auto sizes = x.sizes().vec();
  sizes.back() = n;
  return at::empty(sizes, x.options());
}

at::Tensor qgemv(const at::Tensor &x, const at::Tensor &packed, const at::Tensor &scale,
                 const std::optional<at::Tensor> &zero, const std::optional<at::Tensor> &bias, int64_t bits,
                 int64_t group_size, int64_t out_features) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && packed.is_contiguous() && scale.is_contiguous(),
              "lowbit_native::qgemv takes fp32 inputs and contiguous packed weights");
  auto xc = x.contiguous();
  const int64_t k = xc.size(-1), m = xc.numel() / k;
  auto y = out_like(xc, out_features);
  lowbit_qgemv(xc.data_ptr<float>(), m, k, static_cast<const uint8_t *>(packed.data_ptr()), static_cast<int>(bits),
               scale.data_ptr<float>(), zero ? static_cast<const int8_t *>(zero->data_ptr()) : nullptr,
               out_features, group_size, opt_float(bias), y.data_ptr<float>(), at::get_num_threads());
  return y;
}

at::Tensor fgemv(const at::Tensor &x, const at::Tensor &weight, const std::optional<at::Tensor> &bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat && weight.is_contiguous(),
              "lowbit_native::fgemv takes fp32 inputs and a contiguous fp32 weight");
  auto xc = x.contiguous();
  const int64_t k = xc.size(-1), m = xc.numel() / k, n = weight.size(0);
  auto y = out_like(xc, n);
  lowbit_fgemv(xc.data_ptr<float>(), m, k, weight.data_ptr<float>(), n, opt_float(bias), y.data_ptr<float>(),
               at::get_num_threads());
  return y;
}

at::Tensor dequant(const at::Tensor &packed, const at::Tensor &scale, const std::optional<at::Tensor> &zero,
                   int64_t bits, int64_t group_size, int64_t rows, int64_t cols) {
  auto out = at::empty({rows, cols}, scale.options());
  lowbit_dequant(static_cast<const uint8_t *>(packed.data_ptr()), static_cast<int>(bits), scale.data_ptr<float>(),
                 zero ? static_cast<const int8_t *>(zero->data_ptr()) : nullptr, rows, cols, group_size,
                 out.data_ptr<float>(), at::get_num_threads());
  return out;
}

bool avx512() { return lowbit_native_avx512() != 0; }

}  // namespace

TORCH_LIBRARY(lowbit_native, m) {
  m.def("qgemv(Tensor x, Tensor packed, Tensor scale, Tensor? zero, Tensor? bias, int bits, int group_size, "
        "int out_features) -> Tensor");
  m.def("fgemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("dequant(Tensor packed, Tensor scale, Tensor? zero, int bits, int group_size, int rows, int cols) -> Tensor");
  m.def("avx512() -> bool", avx512);
}

TORCH_LIBRARY_IMPL(lowbit_native, CPU, m) {
  m.impl("qgemv", qgemv);
  m.impl("fgemv", fgemv);
  m.impl("dequant", dequant);
}
