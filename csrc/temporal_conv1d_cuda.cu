// CUDA kernels of lumiere_fast_ext::temporal_conv1d and its weight gradient (the op schemas are defined by the
// CPU build, temporal_conv1d_cpu.cpp). Built as the extension module lumiere_fast._C_cuda; importing it after
// lumiere_fast._C registers the CUDA implementations.
//
// The conv is a GEMM whose columns are the (b, t, s) positions of the activation, read in place through the
// (b t) c h w strides (no fold copy):
//     out[b, t, co, s] = bias[co] + sum_{k, ci} W[co, ci, k] * x[b, t + k - K/2, ci, s]
// Forward: one block computes a BM x BN (channels x pixels) tile for TT consecutive frames. Per chunk of BK
// input channels it stages the TT + K - 1 input frames the tile needs (the time halo: each staged frame feeds
// up to K output frames) and the K weight slices in shared memory, then runs the TT * K small GEMMs from there.
// fp16/bf16: WMMA 16x16x16 tensor-core fragments, fp32 accumulation. fp32: the same tiles on CUDA cores (FMA,
// exact fp32: TF32 would break the fp32 tolerance the tests hold every backend to).
// Grad input is this kernel run on grad_out with the flipped, transposed weight (done by the Python wrapper).
// Grad weight: a GEMM reducing over all (b, t, s): one block per (co tile, ci tile, tap k, frame split), fp32
// partial sums atomically added into an fp32 buffer (so its summation order is not deterministic).
//
// Every global load and store is bounds-checked (zero-filled loads), so no size needs to be a multiple of a
// tile; offsets are 64-bit; the block index of the big axis is grid x (up to 2^31 - 1 blocks).
#include <Python.h>

// Only c10's CUDA headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a bare nvcc toolkit
// (as on CI) does not ship.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include "temporal_conv1d.h"

namespace lumiere_fast_ext {
namespace {

using namespace nvcuda;

constexpr int kThreads = 256;  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int BM = 64;         // output channels per block
constexpr int BN = 64;         // pixels (s) per block
constexpr int BK = 16;         // input channels per shared-memory stage (one WMMA k-step)
constexpr int TT = 4;          // output frames per block: the halo costs (K - 1) / TT extra frame loads
constexpr int kMaxK = 15;      // shared memory grows with K: (2K + 3) * 4 KiB for fp32, 132 KiB at 15 (sm_80: 163)
constexpr int GK = 32;         // grad weight: pixels per shared-memory stage (two WMMA k-steps)

// at:: dtypes -> the CUDA types WMMA knows
template <typename T> struct Native { using type = T; };
template <> struct Native<at::Half> { using type = __half; };
template <> struct Native<at::BFloat16> { using type = __nv_bfloat16; };

template <typename NT> struct IsMma { static constexpr bool value = false; };
template <> struct IsMma<__half> { static constexpr bool value = true; };
template <> struct IsMma<__nv_bfloat16> { static constexpr bool value = true; };

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename NT> __device__ __forceinline__ NT from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct Geometry {  // sizes of the canonical (B, T, C, S) views and the strides of x / out, in elements
  int64_t B, T, Ci, Co, S;
  int64_t xb, xt, xc, xs;
  int64_t ob, ot, oc, os;
};

// ------------------------------------------------------------------------------------------------ forward

template <typename NT>
__host__ __device__ constexpr size_t fwd_smem_bytes(int K) {
  // staged input frames [TT + K - 1][BK][BN] + weight slices [K][BM][BK] (+ the MMA epilogue's per-warp
  // 16 x 16 fp32 scratch)
  return (static_cast<size_t>(TT + K - 1) * BK * BN + static_cast<size_t>(K) * BM * BK) * sizeof(NT) +
         (IsMma<NT>::value ? static_cast<size_t>(kWarps) * 256 * sizeof(float) : 0);
}

// Stage input channels [ci0, ci0 + BK) of frames t0 - K/2 ... t0 + TT - 1 + K/2 (zero outside the clip or the
// channel/pixel range) and the matching weight slices. Consecutive threads take consecutive pixels, so the
// loads coalesce on the (b t) c h w layout where s is the unit-stride axis.
template <typename NT>
__device__ __forceinline__ void stage_fwd(NT* Xs, NT* Ws, const NT* __restrict__ x, const NT* __restrict__ w,
                                          const Geometry& g, int K, int64_t b, int64_t t0, int64_t s0, int64_t co0,
                                          int64_t ci0) {
  const int frames = TT + K - 1;
  const NT zero = from_float<NT>(0.f);
  for (int e = threadIdx.x; e < frames * BK * BN; e += kThreads) {
    const int j = e % BN, i = (e / BN) % BK, f = e / (BN * BK);
    const int64_t t = t0 - K / 2 + f, ci = ci0 + i, s = s0 + j;
    NT v = zero;
    if (t >= 0 && t < g.T && ci < g.Ci && s < g.S) v = x[b * g.xb + t * g.xt + ci * g.xc + s * g.xs];
    Xs[e] = v;
  }
  // weight (Co, Ci, K) contiguous; staged as [k][m][i] so a WMMA A fragment (16 channels x 16 inputs) is a
  // row-major block with leading dimension BK
  for (int e = threadIdx.x; e < BM * BK * K; e += kThreads) {
    const int k = e % K, i = (e / K) % BK, m = e / (K * BK);
    const int64_t co = co0 + m, ci = ci0 + i;
    NT v = zero;
    if (co < g.Co && ci < g.Ci) v = w[(co * g.Ci + ci) * K + k];
    Ws[(k * BM + m) * BK + i] = v;
  }
}

// grid.x = B * ceil(T / TT) * ceil(S / BN) (pixel tile fastest), grid.y = ceil(Co / BM)
template <typename NT>
__global__ void __launch_bounds__(kThreads) conv_fwd_kernel(const NT* __restrict__ x, const NT* __restrict__ w,
                                                            const NT* __restrict__ bias, NT* __restrict__ out,
                                                            Geometry g, int K) {
  extern __shared__ __align__(128) unsigned char smem[];
  NT* Xs = reinterpret_cast<NT*>(smem);
  NT* Ws = Xs + static_cast<size_t>(TT + K - 1) * BK * BN;

  const int64_t n_s = (g.S + BN - 1) / BN, n_t = (g.T + TT - 1) / TT;
  int64_t tile = blockIdx.x;
  const int64_t s0 = (tile % n_s) * BN;
  tile /= n_s;
  const int64_t t0 = (tile % n_t) * TT;
  const int64_t b = tile / n_t;
  const int64_t co0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  if constexpr (IsMma<NT>::value) {
    // 8 warps as 2 (channels, 32 each = two fragments) x 4 (pixels, 16 each), TT frames: 8 accumulators
    const int wm = warp / 4, wn = warp % 4;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[TT][2];
#pragma unroll
    for (int f = 0; f < TT; ++f)
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::fill_fragment(acc[f][i], 0.f);

    for (int64_t ci0 = 0; ci0 < g.Ci; ci0 += BK) {
      __syncthreads();  // the previous stage is consumed
      stage_fwd<NT>(Xs, Ws, x, w, g, K, b, t0, s0, co0, ci0);
      __syncthreads();
      for (int k = 0; k < K; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, wmma::row_major> a[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], Ws + (k * BM + wm * 32 + i * 16) * BK, BK);
#pragma unroll
        for (int f = 0; f < TT; ++f) {
          // output frame t0 + f reads staged frame f + k (staged frame 0 is t0 - K/2)
          wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::row_major> bf;
          wmma::load_matrix_sync(bf, Xs + (static_cast<size_t>(f + k) * BK) * BN + wn * 16, BN);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[f][i], a[i], bf, acc[f][i]);
        }
      }
    }
    // epilogue: fragments -> this warp's fp32 scratch -> bias, cast once, bounds-checked store
    float* scratch = reinterpret_cast<float*>(smem + fwd_smem_bytes<NT>(K) - kWarps * 256 * sizeof(float)) +
                     warp * 256;
#pragma unroll
    for (int f = 0; f < TT; ++f) {
      const int64_t t = t0 + f;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::store_matrix_sync(scratch, acc[f][i], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t co = co0 + wm * 32 + i * 16 + e / 16, s = s0 + wn * 16 + e % 16;
          if (t < g.T && co < g.Co && s < g.S) {
            const float v = scratch[e] + (bias != nullptr ? to_float(bias[co]) : 0.f);
            out[b * g.ob + t * g.ot + co * g.oc + s * g.os] = from_float<NT>(v);
          }
        }
        __syncwarp();
      }
    }
  } else {
    // CUDA cores: thread (ty, tx) owns channels ty*4 .. ty*4+3 and pixels tx, tx+16, tx+32, tx+48 (a stride
    // of 16 so a warp's shared-memory reads of one staged row hit distinct banks), for TT frames
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float acc[TT][4][4];
#pragma unroll
    for (int f = 0; f < TT; ++f)
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[f][r][c] = 0.f;
    for (int64_t ci0 = 0; ci0 < g.Ci; ci0 += BK) {
      __syncthreads();
      stage_fwd<NT>(Xs, Ws, x, w, g, K, b, t0, s0, co0, ci0);
      __syncthreads();
      for (int k = 0; k < K; ++k)
#pragma unroll 4
        for (int i = 0; i < BK; ++i) {
          float a[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) a[r] = to_float(Ws[(k * BM + ty * 4 + r) * BK + i]);
#pragma unroll
          for (int f = 0; f < TT; ++f) {
            const NT* row = Xs + (static_cast<size_t>(f + k) * BK + i) * BN;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const float xv = to_float(row[tx + 16 * c]);
#pragma unroll
              for (int r = 0; r < 4; ++r) acc[f][r][c] = fmaf(a[r], xv, acc[f][r][c]);
            }
          }
        }
    }
#pragma unroll
    for (int f = 0; f < TT; ++f) {
      const int64_t t = t0 + f;
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int64_t co = co0 + ty * 4 + r;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int64_t s = s0 + tx + 16 * c;
          if (t < g.T && co < g.Co && s < g.S)
            out[b * g.ob + t * g.ot + co * g.oc + s * g.os] =
                from_float<NT>(acc[f][r][c] + (bias != nullptr ? to_float(bias[co]) : 0.f));
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------- grad weight

template <typename NT>
__host__ __device__ constexpr size_t gw_smem_bytes() {
  // grad_out tile [BM][GK] + input tile [BM][GK] (+ MMA scratch)
  return static_cast<size_t>(2) * BM * GK * sizeof(NT) +
         (IsMma<NT>::value ? static_cast<size_t>(kWarps) * 256 * sizeof(float) : 0);
}

// grid.x = ceil(Co / BM) * ceil(Ci / BM) (channel tiles), grid.y = K, grid.z = frame splits.
// gw32[co, ci, k] += sum over this split's frames (b, t) and all pixels s of gy[b, t, co, s] * x[b, t + k - K/2, ci, s]
// g describes x (xb.. strides) and gy (ob.. strides, Co its channels).
template <typename NT>
__global__ void __launch_bounds__(kThreads) conv_grad_weight_kernel(const NT* __restrict__ gy,
                                                                    const NT* __restrict__ x,
                                                                    float* __restrict__ gw32, Geometry g, int K,
                                                                    int64_t frames_per_split) {
  extern __shared__ __align__(128) unsigned char smem[];
  NT* Gs = reinterpret_cast<NT*>(smem);  // [BM channels out][GK pixels]
  NT* Xs = Gs + BM * GK;                 // [BM channels in][GK pixels]
  const int64_t n_ci = (g.Ci + BM - 1) / BM;
  const int64_t co0 = (blockIdx.x / n_ci) * BM, ci0 = (blockIdx.x % n_ci) * BM;
  const int k = blockIdx.y;
  const int64_t f_begin = blockIdx.z * frames_per_split;
  const int64_t f_end = min(f_begin + frames_per_split, g.B * g.T);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const NT zero = from_float<NT>(0.f);

  auto stage = [&](int64_t b, int64_t t, int64_t tx, int64_t s0) {
    for (int e = threadIdx.x; e < BM * GK; e += kThreads) {
      const int j = e % GK, m = e / GK;
      const int64_t s = s0 + j, co = co0 + m, ci = ci0 + m;
      Gs[e] = (co < g.Co && s < g.S) ? gy[b * g.ob + t * g.ot + co * g.oc + s * g.os] : zero;
      Xs[e] = (ci < g.Ci && s < g.S) ? x[b * g.xb + tx * g.xt + ci * g.xc + s * g.xs] : zero;
    }
  };

  if constexpr (IsMma<NT>::value) {
    // 8 warps as 4 (out channels, 16 each) x 2 (in channels, 32 each = two fragments)
    const int wm = warp / 2, wn = warp % 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int64_t f = f_begin; f < f_end; ++f) {
      const int64_t b = f / g.T, t = f % g.T, tx = t + k - K / 2;
      if (tx < 0 || tx >= g.T) continue;  // a padding tap: contributes nothing
      for (int64_t s0 = 0; s0 < g.S; s0 += GK) {
        __syncthreads();
        stage(b, t, tx, s0);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GK; kk += 16) {
          // A = gy tile (channels x pixels, row-major); B = x tile^T (pixels x channels): Xs stored
          // [channel][pixel] is exactly B in column-major with leading dimension GK
          wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, wmma::row_major> a;
          wmma::load_matrix_sync(a, Gs + (wm * 16) * GK + kk, GK);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::col_major> bf;
            wmma::load_matrix_sync(bf, Xs + (wn * 32 + i * 16) * GK + kk, GK);
            wmma::mma_sync(acc[i], a, bf, acc[i]);
          }
        }
      }
    }
    float* scratch = reinterpret_cast<float*>(smem + 2 * BM * GK * sizeof(NT)) + warp * 256;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      wmma::store_matrix_sync(scratch, acc[i], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < 256; e += 32) {
        const int64_t co = co0 + wm * 16 + e / 16, ci = ci0 + wn * 32 + i * 16 + e % 16;
        if (co < g.Co && ci < g.Ci) atomicAdd(gw32 + (co * g.Ci + ci) * K + k, scratch[e]);
      }
      __syncwarp();
    }
  } else {
    // thread (ty, tx) owns out channels ty*4 .. ty*4+3 and in channels tx + 16 c
    const int ty = threadIdx.x / 16, tx16 = threadIdx.x % 16;
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
    for (int64_t f = f_begin; f < f_end; ++f) {
      const int64_t b = f / g.T, t = f % g.T, tx = t + k - K / 2;
      if (tx < 0 || tx >= g.T) continue;
      for (int64_t s0 = 0; s0 < g.S; s0 += GK) {
        __syncthreads();
        stage(b, t, tx, s0);
        __syncthreads();
#pragma unroll 4
        for (int j = 0; j < GK; ++j) {
          float a[4], xv[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) a[r] = to_float(Gs[(ty * 4 + r) * GK + j]);
#pragma unroll
          for (int c = 0; c < 4; ++c) xv[c] = to_float(Xs[(tx16 + 16 * c) * GK + j]);
#pragma unroll
          for (int r = 0; r < 4; ++r)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[r][c] = fmaf(a[r], xv[c], acc[r][c]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int64_t co = co0 + ty * 4 + r, ci = ci0 + tx16 + 16 * c;
        if (co < g.Co && ci < g.Ci) atomicAdd(gw32 + (co * g.Ci + ci) * K + k, acc[r][c]);
      }
  }
}

// ------------------------------------------------------------------------------------------------- host

Geometry geometry(const at::Tensor& x4, const at::Tensor& o4) {
  return Geometry{x4.size(0),   x4.size(1),   x4.size(2),   o4.size(2),   x4.size(3),   x4.stride(0),
                  x4.stride(1), x4.stride(2), x4.stride(3), o4.stride(0), o4.stride(1), o4.stride(2),
                  o4.stride(3)};
}

template <typename NT>
void set_smem(const void* kernel, size_t bytes) {
  // above 48 KiB a kernel must opt in to dynamic shared memory
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename T>
void launch_fwd(const at::Tensor& x4, const at::Tensor& w, const at::Tensor& bias, at::Tensor& o4) {
  using NT = typename Native<T>::type;
  const Geometry g = geometry(x4, o4);
  const int K = static_cast<int>(w.size(2));
  const int64_t blocks = g.B * ((g.T + TT - 1) / TT) * ((g.S + BN - 1) / BN);
  const int64_t co_tiles = (g.Co + BM - 1) / BM;
  TORCH_CHECK(blocks < (int64_t{1} << 31) && co_tiles < 65536, "temporal_conv1d (CUDA): too large a launch");
  const size_t smem = fwd_smem_bytes<NT>(K);
  set_smem<NT>(reinterpret_cast<const void*>(&conv_fwd_kernel<NT>), smem);
  conv_fwd_kernel<NT><<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(co_tiles)), kThreads, smem,
                        c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const NT*>(x4.data_ptr<T>()), reinterpret_cast<const NT*>(w.data_ptr<T>()),
      bias.defined() ? reinterpret_cast<const NT*>(bias.data_ptr<T>()) : nullptr,
      reinterpret_cast<NT*>(o4.data_ptr<T>()), g, K);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_grad_weight(const at::Tensor& g4, const at::Tensor& x4, at::Tensor& gw32, int K) {
  using NT = typename Native<T>::type;
  const Geometry g = geometry(x4, g4);
  const int64_t tiles = ((g.Co + BM - 1) / BM) * ((g.Ci + BM - 1) / BM);
  const int64_t frames = g.B * g.T;
  // split the frame reduction until there are ~4 blocks per SM (each split adds one atomic per weight entry)
  int device = 0, sm_count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
  const int64_t sms = std::max(sm_count, 1);
  const int64_t want = std::max<int64_t>(1, (4 * sms + tiles * K - 1) / (tiles * K));
  const int64_t splits = std::min<int64_t>(std::min<int64_t>(want, frames), 65535);
  const int64_t per_split = (frames + splits - 1) / splits;
  const int64_t used = (frames + per_split - 1) / per_split;
  TORCH_CHECK(tiles < (int64_t{1} << 31), "temporal_conv1d_grad_weight (CUDA): too large a launch");
  const size_t smem = gw_smem_bytes<NT>();
  set_smem<NT>(reinterpret_cast<const void*>(&conv_grad_weight_kernel<NT>), smem);
  conv_grad_weight_kernel<NT><<<dim3(static_cast<unsigned>(tiles), K, static_cast<unsigned>(used)), kThreads, smem,
                                c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const NT*>(g4.data_ptr<T>()), reinterpret_cast<const NT*>(x4.data_ptr<T>()),
      gw32.data_ptr<float>(), g, K, per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The (n, c, t) form as one clip whose "pixels" are the n sequences, (1, t, c, n), instead of the CPU's
// (n, t, c, 1): a 64-wide pixel tile is then full instead of 1/64 used (the loads along n are strided).
at::Tensor cuda_view(const at::Tensor& x, int64_t batch) {
  if (x.dim() == 3) return x.permute({2, 1, 0}).unsqueeze(0);
  return canonical_view(x, batch);
}

void check_cuda(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda() && a.device() == b.device(), what, ": tensors must be on one CUDA device");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16,
              what, " (CUDA): expected float32, float16 or bfloat16, got ", a.scalar_type());
}

}  // namespace

at::Tensor temporal_conv1d_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                int64_t batch) {
  check_conv_args(x, weight, bias, batch);
  check_cuda(x, weight, "temporal_conv1d");
  TORCH_CHECK(weight.size(2) <= kMaxK, "temporal_conv1d (CUDA): kernel size up to ", kMaxK, ", got ", weight.size(2));
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = new_output(x, weight.size(0), x.scalar_type());
  if (out.numel() == 0) return out;
  at::Tensor x4 = cuda_view(x, batch);
  at::Tensor o4 = cuda_view(out, batch);
  const at::Tensor w = weight.contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  switch (x.scalar_type()) {  // check_cuda allowed these three
    case at::kFloat: launch_fwd<float>(x4, w, b, o4); break;
    case at::kHalf: launch_fwd<at::Half>(x4, w, b, o4); break;
    default: launch_fwd<at::BFloat16>(x4, w, b, o4); break;
  }
  return out;
}

at::Tensor temporal_conv1d_grad_weight_cuda(const at::Tensor& grad_out, const at::Tensor& x, int64_t kernel_size,
                                            int64_t batch) {
  check_grad_weight_args(grad_out, x, kernel_size, batch);
  check_cuda(x, grad_out, "temporal_conv1d_grad_weight");
  TORCH_CHECK(kernel_size <= kMaxK, "temporal_conv1d_grad_weight (CUDA): kernel size up to ", kMaxK);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor gw32 = at::zeros({grad_out.size(1), x.size(1), kernel_size}, x.options().dtype(at::kFloat));
  if (x.numel() == 0 || grad_out.numel() == 0) return gw32.to(x.scalar_type());
  at::Tensor g4 = cuda_view(grad_out, batch);
  at::Tensor x4 = cuda_view(x, batch);
  const int K = static_cast<int>(kernel_size);
  switch (x.scalar_type()) {
    case at::kFloat: launch_grad_weight<float>(g4, x4, gw32, K); break;
    case at::kHalf: launch_grad_weight<at::Half>(g4, x4, gw32, K); break;
    default: launch_grad_weight<at::BFloat16>(g4, x4, gw32, K); break;
  }
  return gw32.to(x.scalar_type());
}

}  // namespace lumiere_fast_ext

TORCH_LIBRARY_IMPL(lumiere_fast_ext, CUDA, m) {
  m.impl("temporal_conv1d", &lumiere_fast_ext::temporal_conv1d_cuda);
  m.impl("temporal_conv1d_grad_weight", &lumiere_fast_ext::temporal_conv1d_grad_weight_cuda);
}

// `import lumiere_fast._C_cuda` loads this library (which runs the registration above); no Python API.
PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
