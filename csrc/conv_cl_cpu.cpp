// The CPU provider's convolution (dvpvae/cpu_conv.py): a stride-1 1x1 or 3x3 (zero-padding 1)
// convolution on channels-last tensors, one op for the forward and one for the backward.
// Python's rule picks each pass's kernel from the shapes, dtype and ISA and passes the choice
// in (`tile`, `extension`), so a compiled graph calls these ops directly, with no Python
// between it and the kernels.
#include "ops.h"

#include <ATen/Functions.h>

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

// The input gradient by Winograd: a stride-1 'same' 3x3 convolution's input gradient is grad
// convolved with the flipped kernel, in and out channels swapped.
at::Tensor winograd_input_grad(const at::Tensor& grad, const at::Tensor& weight, int64_t tile) {
  return conv3x3_winograd_cpu(grad, weight.flip({2, 3}).transpose(0, 1), c10::nullopt, tile);
}

}  // namespace

at::Tensor conv_cl_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                       int64_t tile) {
  check_weight(weight, "dvpvae.conv_cl");
  check_tile(tile, "dvpvae.conv_cl");
  if (tile != 0) return conv3x3_winograd_cpu(x, weight, bias, tile);
  return at::conv2d(x, weight, bias, 1, weight.size(3) / 2).contiguous(kCL);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_cl_backward_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                    const at::Tensor& weight, int64_t tile,
                                                                    bool extension, std::array<bool, 2> mask) {
  check_weight(weight, "dvpvae.conv_cl_backward");
  check_tile(tile, "dvpvae.conv_cl_backward");
  const bool want_x = mask[0], want_w = mask[1];
  // The passes oneDNN serves go in one call; a pass not asked for is an empty tensor.
  const bool onednn_x = want_x && tile == 0, onednn_w = want_w && !extension;
  at::Tensor grad_x, grad_w, grad_b;
  if (onednn_x || onednn_w)
    std::tie(grad_x, grad_w, grad_b) = onednn_backward(grad, x, weight, {onednn_x, onednn_w, onednn_w});
  if (want_x && tile != 0) grad_x = winograd_input_grad(grad, weight, tile);
  if (want_w && extension) std::tie(grad_w, grad_b) = conv_weight_grad_cpu(grad, x, weight.size(3), tile);
  const auto none = [&] { return at::empty({0}, x.options()); };  // a new one each: outputs must not alias
  return {want_x ? grad_x.contiguous(kCL) : none(), want_w ? grad_w.contiguous() : none(), want_w ? grad_b : none()};
}

at::Tensor conv_cl_meta(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t tile) {
  return at::empty({x.size(0), weight.size(0), x.size(2), x.size(3)}, x.options().memory_format(kCL));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_cl_backward_meta(const at::Tensor& grad, const at::Tensor& x,
                                                                     const at::Tensor& weight, int64_t tile,
                                                                     bool extension, std::array<bool, 2> mask) {
  const auto none = [&] { return at::empty({0}, x.options()); };
  return {mask[0] ? at::empty(x.sizes(), x.options().memory_format(kCL)) : none(),
          mask[1] ? at::empty(weight.sizes(), weight.options()) : none(),
          mask[1] ? at::empty({weight.size(0)}, weight.options()) : none()};
}

}  // namespace dvpvae
