// The CPU provider's convolution (dvpvae/cpu_conv.py): a stride-1 1x1 or 3x3 (zero-padding 1)
// convolution on channels-last tensors, one op per pass. Python's rule picks each pass's
// kernel from the shapes, dtype and ISA and passes the choice in (`tile`, `extension`), so a
// compiled graph calls these ops directly, with no Python between it and the kernels.
#include "ops.h"

#include <ATen/Functions.h>

#include <array>

namespace dvpvae {
namespace {

constexpr auto kCL = at::MemoryFormat::ChannelsLast;

void check_weight(const at::Tensor& weight, const char* op) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == weight.size(3) && (weight.size(2) == 1 || weight.size(2) == 3),
              op, ": weight must be (out, in, 1, 1) or (out, in, 3, 3), got ", weight.sizes());
}

void check_tile(int64_t tile, const char* op) {
  TORCH_CHECK(tile == 0 || tile == 2 || tile == 4, op,
              ": tile must be 0 (oneDNN), 2 (Winograd F(2x2, 3x3)) or 4 (F(4x4, 3x3)), got ", tile);
}

// ATen's (oneDNN's) convolution_backward of conv2d(x, weight, padding = k / 2) for the passes in `mask`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> onednn_backward(const at::Tensor& grad, const at::Tensor& x,
                                                               const at::Tensor& weight, std::array<bool, 3> mask) {
  const int64_t p = weight.size(3) / 2, bias_size = weight.size(0);
  return at::convolution_backward(grad, x, weight, at::IntArrayRef(bias_size), {1, 1}, {p, p}, {1, 1}, false,
                                  {0, 0}, 1, mask);
}

}  // namespace

at::Tensor conv_cl_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t tile) {
  check_weight(weight, "dvpvae.conv_cl");
  check_tile(tile, "dvpvae.conv_cl");
  if (tile != 0) return conv3x3_winograd_cpu(x, weight, bias, tile);
  return at::conv2d(x, weight, bias, 1, weight.size(3) / 2).contiguous(kCL);
}

at::Tensor conv_cl_input_grad_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                  int64_t tile) {
  check_weight(weight, "dvpvae.conv_cl_input_grad");
  check_tile(tile, "dvpvae.conv_cl_input_grad");
  // A stride-1 'same' 3x3 convolution's input gradient is grad convolved with the flipped
  // kernel, in and out channels swapped.
  if (tile != 0) return conv3x3_winograd_cpu(grad, weight.flip({2, 3}).transpose(0, 1), c10::nullopt, tile);
  return std::get<0>(onednn_backward(grad, x, weight, {true, false, false})).contiguous(kCL);
}

std::tuple<at::Tensor, at::Tensor> conv_cl_weight_grad_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                           const at::Tensor& weight, bool extension) {
  check_weight(weight, "dvpvae.conv_cl_weight_grad");
  if (extension) return conv_weight_grad_cpu(grad, x, weight.size(3));
  const auto [unused, grad_w, grad_b] = onednn_backward(grad, x, weight, {false, true, true});
  return {grad_w.contiguous(), grad_b};
}

at::Tensor conv_cl_meta(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t tile) {
  return at::empty({x.size(0), weight.size(0), x.size(2), x.size(3)}, x.options().memory_format(kCL));
}

at::Tensor conv_cl_input_grad_meta(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                                   int64_t tile) {
  return at::empty(x.sizes(), x.options().memory_format(kCL));
}

std::tuple<at::Tensor, at::Tensor> conv_cl_weight_grad_meta(const at::Tensor& grad, const at::Tensor& x,
                                                            const at::Tensor& weight, bool extension) {
  return {at::empty(weight.sizes(), weight.options()), at::empty({weight.size(0)}, weight.options())};
}

}  // namespace dvpvae
