// Shared between the CPU (temporal_conv1d_cpu.cpp, which also defines the op schemas) and the CUDA
// (temporal_conv1d_cuda.cu) builds of the lumiere_fast_ext::temporal_conv1d* ops.
//
// Both kernels work on one canonical 4-d strided view of the activation, (B, T, C, S):
//   x (n, c, t)              -> (n, t, c, 1)        batch = 0 (ignored)
//   x (b t) c h w, batch = b -> (b, t, c, h*w)      a view: no fold copy
// and write their output into the same view of a contiguous (n, c_out, t) or (b t) c_out h w tensor, so the
// op returns exactly F.conv1d's (resp. the frames reference's) shape and contiguous layout.
#pragma once

#include <ATen/ATen.h>
#include <optional>

namespace lumiere_fast_ext {

inline at::Tensor canonical_view(const at::Tensor& x, int64_t batch) {
  if (x.dim() == 3) return x.permute({0, 2, 1}).unsqueeze(3);
  // unflatten is always a view; flatten(3) is one unless h and w do not merge (then it copies, once)
  return x.unflatten(0, {batch, x.size(0) / batch}).flatten(3);
}

inline at::Tensor new_output(const at::Tensor& x, int64_t c_out, at::ScalarType dtype) {
  auto sizes = x.sizes().vec();
  sizes[1] = c_out;
  return at::empty(sizes, x.options().dtype(dtype));
}

// Internal invariants: the Python wrapper (lumiere_fast/ops/temporal_conv1d.py) raises the user-facing
// ValueError/TypeError first; these guard direct torch.ops calls.
inline void check_conv_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            int64_t batch) {
  TORCH_CHECK(weight.dim() == 3 && weight.size(2) % 2 == 1,
              "temporal_conv1d: expected weight (c_out, c_in, odd k), got ", weight.sizes());
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, "temporal_conv1d: expected x (n, c, t) or (b t) c h w, got ", x.sizes());
  TORCH_CHECK(x.size(1) == weight.size(1), "temporal_conv1d: x has ", x.size(1), " channels, weight expects ",
              weight.size(1));
  TORCH_CHECK(x.dim() == 3 || (batch >= 1 && x.size(0) % batch == 0),
              "temporal_conv1d: leading dim ", x.size(0), " is not batch (", batch, ") x frames");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "temporal_conv1d: x dtype ", x.scalar_type(),
              " != weight dtype ", weight.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "temporal_conv1d: expected bias (",
                weight.size(0), ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "temporal_conv1d: bias dtype ", bias->scalar_type(),
                " != x dtype ", x.scalar_type());
  }
}

inline void check_grad_weight_args(const at::Tensor& grad_out, const at::Tensor& x, int64_t kernel_size,
                                   int64_t batch) {
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "temporal_conv1d_grad_weight: expected an odd kernel size, got ",
              kernel_size);
  TORCH_CHECK(grad_out.dim() == x.dim() && grad_out.size(0) == x.size(0) &&
                  (x.dim() == 3 ? grad_out.size(2) == x.size(2)
                                : grad_out.size(2) == x.size(2) && grad_out.size(3) == x.size(3)),
              "temporal_conv1d_grad_weight: grad_out ", grad_out.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(x.dim() == 3 || (batch >= 1 && x.size(0) % batch == 0),
              "temporal_conv1d_grad_weight: leading dim ", x.size(0), " is not batch (", batch, ") x frames");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), "temporal_conv1d_grad_weight: dtypes differ");
}

}  // namespace lumiere_fast_ext
