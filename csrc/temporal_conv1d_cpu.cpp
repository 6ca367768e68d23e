// CPU kernels of lumiere_fast_ext::temporal_conv1d and its weight gradient, and the op schemas
// (TORCH_LIBRARY). Built as the extension module lumiere_fast._C; importing it registers the ops.
//
// The conv is a GEMM per output frame: out[b, t] (Co x S) = bias + sum_k W[:, :, k] (Co x Ci) @ x[b, t+k-K/2]
// (Ci x S). Work is split with at::parallel_for over (b, t, spatial tile) tasks; each task walks all output
// channels with the register-tiled micro-kernel of cpu_kernels.h, so the x rows of its tile stay in L1/L2 for
// every channel block. The frames layout (b t) c h w is read in place (no fold copy): S = h*w is contiguous.
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "temporal_conv1d.h"

namespace lumiere_fast_ext {

namespace generic {
#include "cpu_kernels.h"
}  // namespace generic

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define LUMIERE_FAST_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "cpu_kernels.h"
}  // namespace avx2
#pragma GCC pop_options
// 512-bit lanes need prefer-vector-width=512, else GCC keeps 256-bit vectors even with AVX-512 enabled
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,prefer-vector-width=512")
namespace avx512 {
#include "cpu_kernels.h"
}  // namespace avx512
#pragma GCC pop_options
#endif

enum class Isa { generic, avx2, avx512 };

static Isa cpu_isa() {
#ifdef LUMIERE_FAST_X86_VARIANTS
  static const Isa isa = (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma"))  ? Isa::avx512
                         : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? Isa::avx2
                                                                                                : Isa::generic;
  return isa;
#else
  return Isa::generic;
#endif
}

constexpr int kCB = 6;  // output channels per register tile (see conv_tile)

// Lanes per tile row: one cache line (generic, AVX2: 16 fp32 = two 256-bit registers) or two 512-bit
// registers (AVX-512), so a 6-row tile holds 12 vector accumulators either way.
template <typename T>
static int tile_lanes(Isa isa) {
  return static_cast<int>((isa == Isa::avx512 ? 128 : 64) / sizeof(T));
}

#ifdef LUMIERE_FAST_X86_VARIANTS
#define LUMIERE_FAST_BY_ISA(isa, SB_GENERIC, SB_WIDE, ...)                            \
  switch (isa) {                                                                      \
    case Isa::avx512: { constexpr int SB = SB_WIDE; avx512::__VA_ARGS__; break; }     \
    case Isa::avx2: { constexpr int SB = SB_GENERIC; avx2::__VA_ARGS__; break; }      \
    default: { constexpr int SB = SB_GENERIC; generic::__VA_ARGS__; break; }          \
  }
#else
#define LUMIERE_FAST_BY_ISA(isa, SB_GENERIC, SB_WIDE, ...) \
  { constexpr int SB = SB_GENERIC; generic::__VA_ARGS__; }
#endif

template <typename T>
static void conv_forward(const at::Tensor& x4, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         at::Tensor& o4) {
  const Isa isa = cpu_isa();
  const int64_t SB = tile_lanes<T>(isa);
  const int64_t B = x4.size(0), T_ = x4.size(1), Ci = x4.size(2), S = x4.size(3);
  const int64_t Co = weight.size(0);
  const int K = static_cast<int>(weight.size(2));
  const int64_t Co_pad = (Co + kCB - 1) / kCB * kCB;
  // packed (Co_pad / kCB, K, Ci, kCB): see conv_tile
  at::Tensor wt = at::zeros({Co_pad, Ci, K}, weight.options());
  wt.narrow(0, 0, Co).copy_(weight);
  wt = wt.view({Co_pad / kCB, kCB, Ci, K}).permute({0, 3, 2, 1}).contiguous();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const T* wt_p = wt.data_ptr<T>();
  const T* b_p = b.defined() ? b.data_ptr<T>() : nullptr;
  const T* x_p = x4.data_ptr<T>();
  T* o_p = o4.data_ptr<T>();
  const int64_t sB = x4.stride(0), sT = x4.stride(1), sC = x4.stride(2);
  const int64_t oB = o4.stride(0), oT = o4.stride(1), oC = o4.stride(2);
  const bool narrow = S < SB;
  const int64_t n_s = narrow ? 1 : (S + SB - 1) / SB;
  // grain: about 64k MACs per chunk, so tiny calls do not pay for waking the thread pool
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, Co_pad * Ci * K * std::min(S, SB)));
  at::parallel_for(0, B * T_ * n_s, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t si = task % n_s, bt = task / n_s, t = bt % T_, bi = bt / T_;
      const T* x_b = x_p + bi * sB;
      T* out_t = o_p + bi * oB + t * oT;
      if (narrow) {
        generic::conv_narrow<T, kCB>(x_b, sT, sC, T_, Ci, S, t, wt_p, Co, K, b_p, out_t, oC);
        continue;
      }
      // the last tile of a row ends at S and overlaps its neighbour instead of running a masked tail
      const int64_t s_store = si * SB, s0 = std::min(s_store, S - SB);
      for (int64_t co0 = 0; co0 < Co_pad; co0 += kCB) {
        const int64_t co_n = std::min<int64_t>(kCB, Co - co0);
        LUMIERE_FAST_BY_ISA(isa, 64 / sizeof(T), 128 / sizeof(T),
                            conv_tile<T, kCB, SB>(x_b, sT, sC, T_, Ci, t, s0, s_store, wt_p + co0 * K * Ci, co0,
                                                  co_n, K, b_p, out_t, oC))
      }
    }
  });
}

template <typename T>
static at::Tensor conv_grad_weight(const at::Tensor& g4, const at::Tensor& x4, int K) {
  const Isa isa = cpu_isa();
  const int64_t SB = tile_lanes<T>(isa);
  const int64_t B = x4.size(0), T_ = x4.size(1), Ci = x4.size(2), S = x4.size(3), Co = g4.size(2);
  const int64_t Co_pad = (Co + kCB - 1) / kCB * kCB, Ci_pad = (Ci + SB - 1) / SB * SB;
  const int64_t gB = g4.stride(0), gT = g4.stride(1), gC = g4.stride(2);
  const int64_t sB = x4.stride(0), sT = x4.stride(1), sC = x4.stride(2);
  const T* g_p = g4.data_ptr<T>();
  const T* x_p = x4.data_ptr<T>();
  const size_t acc_size = static_cast<size_t>(K) * Co_pad * Ci_pad;
  std::vector<T> total(acc_size, T(0));
  std::mutex mu;
  const int half = K / 2;
  // A reduction over frames: each chunk of input frames sums into its own (K, Co_pad, Ci_pad) buffer (no
  // atomics, no false sharing), added into the total once per chunk. Each input frame is transposed once to
  // (S, Ci_pad) and serves the K output frames that read it.
  at::parallel_for(0, B * T_, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> acc(acc_size, T(0));
    std::vector<T> xT(static_cast<size_t>(S) * Ci_pad, T(0));
    for (int64_t f = begin; f < end; ++f) {
      const int64_t bi = f / T_, tt = f % T_;
      const T* xf = x_p + bi * sB + tt * sT;
      for (int64_t ci = 0; ci < Ci; ++ci)
        for (int64_t s = 0; s < S; ++s) xT[s * Ci_pad + ci] = xf[ci * sC + s];
      for (int k = 0; k < K; ++k) {
        const int64_t t = tt - k + half;   // the output frame whose tap k reads input frame tt
        if (t < 0 || t >= T_) continue;
        const T* gy = g_p + bi * gB + t * gT;
        T* acc_k = acc.data() + static_cast<size_t>(k) * Co_pad * Ci_pad;
        for (int64_t ci0 = 0; ci0 < Ci_pad; ci0 += SB)
          for (int64_t co0 = 0; co0 < Co_pad; co0 += kCB) {
            LUMIERE_FAST_BY_ISA(isa, 64 / sizeof(T), 128 / sizeof(T),
                                grad_weight_tile<T, kCB, SB>(gy, gC, Co, co0, xT.data(), Ci_pad, ci0, S, acc_k))
          }
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (size_t i = 0; i < acc_size; ++i) total[i] += acc[i];
  });
  at::Tensor out = at::empty({K, Co_pad, Ci_pad}, x4.options());
  std::copy(total.begin(), total.end(), out.data_ptr<T>());
  return out.narrow(1, 0, Co).narrow(2, 0, Ci).permute({1, 2, 0}).contiguous();
}

// The micro-kernels need a unit stride on S (the vectorised axis); S == 1 (the (n, c, t) form) has none to need.
static at::Tensor unit_s(at::Tensor v) {
  return (v.size(3) > 1 && v.stride(3) != 1) ? v.contiguous() : v;
}

at::Tensor temporal_conv1d_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               int64_t batch) {
  check_conv_args(x, weight, bias, batch);
  at::Tensor out = new_output(x, weight.size(0), x.scalar_type());
  at::Tensor x4 = unit_s(canonical_view(x, batch));
  at::Tensor o4 = canonical_view(out, batch);
  const at::Tensor w = weight.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "temporal_conv1d_cpu", [&] { conv_forward<scalar_t>(x4, w, bias, o4); });
  return out;
}

at::Tensor temporal_conv1d_grad_weight_cpu(const at::Tensor& grad_out, const at::Tensor& x, int64_t kernel_size,
                                           int64_t batch) {
  check_grad_weight_args(grad_out, x, kernel_size, batch);
  at::Tensor g4 = unit_s(canonical_view(grad_out, batch));
  at::Tensor x4 = unit_s(canonical_view(x, batch));
  at::Tensor gw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "temporal_conv1d_grad_weight_cpu",
                             [&] { gw = conv_grad_weight<scalar_t>(g4, x4, static_cast<int>(kernel_size)); });
  return gw;
}

}  // namespace lumiere_fast_ext

// A namespace of its own: the Python custom ops (torch.library.custom_op) already own 'lumiere_fast'.
TORCH_LIBRARY(lumiere_fast_ext, m) {
  // x (n, c_in, t) [batch ignored] or (b t) c_in h w with batch = b; weight (c_out, c_in, k odd); 'same' padding
  m.def("temporal_conv1d(Tensor x, Tensor weight, Tensor? bias, int batch) -> Tensor");
  // d loss / d weight: (c_out, c_in, k) from grad_out (shaped like the conv output) and x
  m.def("temporal_conv1d_grad_weight(Tensor grad_out, Tensor x, int kernel_size, int batch) -> Tensor");
}

TORCH_LIBRARY_IMPL(lumiere_fast_ext, CPU, m) {
  m.impl("temporal_conv1d", &lumiere_fast_ext::temporal_conv1d_cpu);
  m.impl("temporal_conv1d_grad_weight", &lumiere_fast_ext::temporal_conv1d_grad_weight_cpu);
}

// `import lumiere_fast._C` loads this library (which runs the registrations above); it has no Python API.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
