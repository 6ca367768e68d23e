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
//
// Memory order (issue 14.3):
// * Staging is double-buffered with cp.async (sm_80+): the copies of channel chunk i + 1 are in flight while the
//   tensor cores work on chunk i, one __syncthreads per chunk. Where the double buffer does not fit the device's
//   shared memory (large k) the kernel runs single-buffered (the host picks; same code).
// * 16-byte copies: a staged row is a run of pixels of one (b, t, c), contiguous in (b t) c h w. The host checks
//   that every row start is 16-byte aligned (unit pixel stride, the other strides and the data pointer multiples
//   of 16 bytes) and otherwise the kernel takes a scalar path (2/4-byte loads, any strides: channels-last views,
//   the (n, c, t) layout, h*w not a multiple of 8). Pixel tails (a partial last 16-byte chunk) are copied
//   element-wise, chunks wholly outside the tensor zero-filled. The weight is packed once per call to
//   (K, Co, Ci) so its staged rows (BK input channels of one (k, co)) are 16-byte runs too.
// * Shared rows are padded by 16 bytes (a row stride of 144 instead of 128 bytes for fp16 pixels): the 8 rows a
//   WMMA / ldmatrix phase reads then start 4 banks apart and hit all 32 banks once, instead of one bank 8 times.
//   Leading dimensions stay multiples of 16 bytes (WMMA's ldm rule) and fragment pointers 32-byte aligned.
// * The output-channel tile is the fastest block index: the ceil(Co / BM) blocks that read one input tile run
//   side by side, so the input is read from DRAM about once (L2 serves the rest) instead of ceil(Co / BM) times.
//
// Grad input is this kernel run on grad_out with the flipped, transposed weight (done by the Python wrapper).
// Grad weight: a GEMM reducing over all (b, t, s): one block per (co tile, ci tile, tap k, frame split), fp32
// partial sums atomically added into an fp32 buffer (so its summation order is not deterministic); its tiles
// are staged with the same 16-byte copies into padded rows (single-buffered).
//
// Every global load and store is bounds-checked (zero-filled loads), so no size needs to be a multiple of a
// tile; offsets are 64-bit; the block index of the big axis is grid x (up to 2^31 - 1 blocks).
#include <Python.h>

#include <atomic>
#include <cstdint>

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
constexpr int kMaxK = 15;      // shared memory grows with K (fwd_smem_bytes); the host checks the device's limit
constexpr int GK = 32;         // grad weight: pixels per shared-memory stage (two WMMA k-steps)

// at:: dtypes -> the CUDA types WMMA knows
template <typename T> struct Native { using type = T; };
template <> struct Native<at::Half> { using type = __half; };
template <> struct Native<at::BFloat16> { using type = __nv_bfloat16; };

template <typename NT> struct IsMma { static constexpr bool value = false; };
template <> struct IsMma<__half> { static constexpr bool value = true; };
template <> struct IsMma<__nv_bfloat16> { static constexpr bool value = true; };

// Shared-memory row strides (elements): each row padded by one 16-byte chunk (V elements), see the header.
template <typename NT> struct Smem {
  static constexpr int V = 16 / static_cast<int>(sizeof(NT));  // elements per 16-byte copy
  static constexpr int SX = BN + V;                            // staged input row (BN pixels)
  static constexpr int SW = BK + V;                            // staged weight row (BK input channels)
  static constexpr int SG = GK + V;                            // grad weight: staged row (GK pixels)
  static_assert(BN % V == 0 && BK % V == 0 && GK % V == 0, "rows are whole 16-byte chunks");
  static_assert((SX * sizeof(NT)) % 16 == 0 && (SW * sizeof(NT)) % 16 == 0 && (SG * sizeof(NT)) % 16 == 0,
                "WMMA ldm and cp.async destinations: row strides in multiples of 16 bytes");
};

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

// ------------------------------------------------------------------------------------ staging (cp.async)

// 16 bytes global -> shared without passing through registers (cp.async.cg: L2 only, the tile is used from
// shared memory). Before sm_80 (only reachable through LUMIERE_FAST_CUDA_ARCHS) a plain copy.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
#else
  *reinterpret_cast<int4*>(smem) = *reinterpret_cast<const int4*>(gmem);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until this thread's copies have landed (all committed groups); a __syncthreads must follow before other
// threads read them.
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
#endif
}

// One staged row's source: its first element, how many of the row's elements exist (<= 0: none, zeros staged;
// may exceed the row length) and the element stride (1 whenever the row is copied in 16-byte chunks).
template <typename NT> struct RowSrc {
  const NT* p;
  int64_t n;
  int64_t stride;
};

// dst[r * ld + c] = row(r).p[c * stride] for c < row(r).n, else 0; rows x COLS elements, all threads of the block.
// vec (the host checked: unit stride, every row start 16-byte aligned): consecutive threads take consecutive
// 16-byte chunks of a row (coalesced), whole chunks by cp.async, the partial chunk of a pixel tail element-wise,
// chunks past the end as zeros. Otherwise consecutive threads take consecutive elements (coalesced wherever the
// stride is 1). Plain stores and cp.async copies are all visible after cp_async_wait_all + __syncthreads.
template <typename NT, int COLS, typename RowFn>
__device__ __forceinline__ void stage_rows(NT* dst, int ld, int rows, bool vec, RowFn row) {
  constexpr int V = Smem<NT>::V;
  const NT zero = from_float<NT>(0.f);
  if (vec) {
    constexpr int CH = COLS / V;
    for (int e = threadIdx.x; e < rows * CH; e += kThreads) {
      const int r = e / CH, c = (e % CH) * V;
      const RowSrc<NT> src = row(r);
      NT* d = dst + r * ld + c;
      const int64_t n = src.n - c;
      if (n >= V) {
        cp_async16(d, src.p + c);
      } else if (n <= 0) {
        *reinterpret_cast<int4*>(d) = make_int4(0, 0, 0, 0);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) d[j] = j < n ? src.p[c + j] : zero;
      }
    }
  } else {
    for (int e = threadIdx.x; e < rows * COLS; e += kThreads) {
      const int r = e / COLS, c = e % COLS;
      const RowSrc<NT> src = row(r);
      dst[r * ld + c] = c < src.n ? src.p[c * src.stride] : zero;
    }
  }
}

// ------------------------------------------------------------------------------------------------ forward

template <typename NT>
__host__ __device__ constexpr size_t fwd_stage_elems(int K) {
  // staged input frames [TT + K - 1][BK][SX] + weight slices [K][BM][SW]
  return static_cast<size_t>(TT + K - 1) * BK * Smem<NT>::SX + static_cast<size_t>(K) * BM * Smem<NT>::SW;
}

template <typename NT>
__host__ __device__ constexpr size_t fwd_smem_bytes(int K, int nbuf) {
  // nbuf stages (+ the MMA epilogue's per-warp 16 x 16 fp32 scratch). Every part is a multiple of 32 bytes, so
  // every WMMA pointer stays 256-bit aligned.
  return nbuf * fwd_stage_elems<NT>(K) * sizeof(NT) +
         (IsMma<NT>::value ? static_cast<size_t>(kWarps) * 256 * sizeof(float) : 0);
}

// grid.x = ceil(Co / BM) * B * ceil(T / TT) * ceil(S / BN): output-channel tile fastest, then pixel tile, frame
// tile, clip. wp: the weight packed as (K, Co, Ci), contiguous. NBUF: 2 (double-buffered) or 1. vec_x / vec_w:
// x's pixel rows / wp's channel rows may be copied in 16-byte chunks (see stage_rows). Two blocks per SM (the
// register cap that implies, 128, is what the 8 fp32 accumulator fragments and the staging need).
template <typename NT, int NBUF>
__global__ void __launch_bounds__(kThreads, 2) conv_fwd_kernel(const NT* __restrict__ x, const NT* __restrict__ wp,
                                                               const NT* __restrict__ bias, NT* __restrict__ out,
                                                               Geometry g, int K, bool vec_x, bool vec_w) {
  using L = Smem<NT>;
  extern __shared__ __align__(128) unsigned char smem[];
  NT* const stages = reinterpret_cast<NT*>(smem);
  const int frames = TT + K - 1;
  const size_t x_elems = static_cast<size_t>(frames) * BK * L::SX;
  const size_t stage_elems = fwd_stage_elems<NT>(K);

  const int64_t n_co = (g.Co + BM - 1) / BM, n_s = (g.S + BN - 1) / BN, n_t = (g.T + TT - 1) / TT;
  int64_t tile = blockIdx.x;
  const int64_t co0 = (tile % n_co) * BM;
  tile /= n_co;
  const int64_t s0 = (tile % n_s) * BN;
  tile /= n_s;
  const int64_t t0 = (tile % n_t) * TT;
  const int64_t b = tile / n_t;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // Stage input channels [ci0, ci0 + BK) of frames t0 - K/2 ... t0 + TT - 1 + K/2 (zero outside the clip or the
  // channel/pixel range) as Xs[f][i][s], and the weight slices as Ws[k][m][i] (a WMMA A fragment, 16 channels x
  // 16 inputs, is then a row-major block with leading dimension SW), into buffer buf; one cp.async group.
  const NT* const x_tile = x + b * g.xb + s0 * g.xs;   // pixel s0 of clip b, frame 0, channel 0
  const NT* const w_tile = wp + co0 * g.Ci;             // tap 0, channel co0, input 0
  const int64_t t_lo = t0 - K / 2, s_left = g.S - s0, co_left = g.Co - co0;
  auto stage = [&](int buf, int64_t ci0) {
    NT* Xs = stages + buf * stage_elems;
    NT* Ws = Xs + x_elems;
    stage_rows<NT, BN>(Xs, L::SX, frames * BK, vec_x, [&](int r) {
      const int64_t t = t_lo + r / BK, ci = ci0 + r % BK;
      if (t < 0 || t >= g.T || ci >= g.Ci) return RowSrc<NT>{x, 0, 1};
      return RowSrc<NT>{x_tile + t * g.xt + ci * g.xc, s_left, g.xs};
    });
    stage_rows<NT, BK>(Ws, L::SW, K * BM, vec_w, [&](int r) {
      const int k = r / BM, m = r % BM;
      if (m >= co_left) return RowSrc<NT>{wp, 0, 1};
      return RowSrc<NT>{w_tile + (k * g.Co + m) * g.Ci + ci0, g.Ci - ci0, 1};
    });
    cp_async_commit();
  };

  // The pipeline, one channel chunk per step. Double-buffered: at the top of step i, wait for chunk i's copies
  // and __syncthreads (everyone's copies landed, and everyone finished step i - 1, whose buffer chunk i + 1 now
  // overwrites), issue chunk i + 1, compute chunk i while it lands. Single-buffered: wait, sync, compute, sync,
  // issue the next.
  const int64_t steps = (g.Ci + BK - 1) / BK;
  auto step_begin = [&](int64_t it) -> int {
    cp_async_wait_all();
    __syncthreads();
    if constexpr (NBUF == 2) {
      if (it + 1 < steps) stage(static_cast<int>((it + 1) & 1), (it + 1) * BK);
      return static_cast<int>(it & 1);
    }
    return 0;
  };
  auto step_end = [&](int64_t it) {
    if (NBUF == 1 && it + 1 < steps) {
      __syncthreads();
      stage(0, (it + 1) * BK);
    }
  };
  stage(0, 0);

  if constexpr (IsMma<NT>::value) {
    // 8 warps as 2 (channels, 32 each = two fragments) x 4 (pixels, 16 each), TT frames: 8 accumulators
    const int wm = warp / 4, wn = warp % 4;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[TT][2];
#pragma unroll
    for (int f = 0; f < TT; ++f)
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::fill_fragment(acc[f][i], 0.f);

    for (int64_t it = 0; it < steps; ++it) {
      const int buf = step_begin(it);
      const NT* Xs = stages + buf * stage_elems;
      const NT* Ws = Xs + x_elems;
      for (int k = 0; k < K; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, wmma::row_major> a[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], Ws + (k * BM + wm * 32 + i * 16) * L::SW, L::SW);
#pragma unroll
        for (int f = 0; f < TT; ++f) {
          // output frame t0 + f reads staged frame f + k (staged frame 0 is t0 - K/2)
          wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::row_major> bf;
          wmma::load_matrix_sync(bf, Xs + (static_cast<size_t>(f + k) * BK) * L::SX + wn * 16, L::SX);
#pragma unroll
          for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[f][i], a[i], bf, acc[f][i]);
        }
      }
      step_end(it);
    }
    // epilogue: fragments -> this warp's fp32 scratch (after the stages: no hazard with the last chunk) -> bias,
    // cast once, bounds-checked store
    float* scratch = reinterpret_cast<float*>(smem + NBUF * stage_elems * sizeof(NT)) + warp * 256;
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
    // of 16 so a warp's shared-memory reads of one staged row hit distinct banks; the two ty of a warp read
    // weight rows 4 * SW = 80 words apart: distinct banks too), for TT frames
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    float acc[TT][4][4];
#pragma unroll
    for (int f = 0; f < TT; ++f)
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[f][r][c] = 0.f;
    for (int64_t it = 0; it < steps; ++it) {
      const int buf = step_begin(it);
      const NT* Xs = stages + buf * stage_elems;
      const NT* Ws = Xs + x_elems;
      for (int k = 0; k < K; ++k)
#pragma unroll 4
        for (int i = 0; i < BK; ++i) {
          float a[4];
#pragma unroll
          for (int r = 0; r < 4; ++r) a[r] = to_float(Ws[(k * BM + ty * 4 + r) * L::SW + i]);
#pragma unroll
          for (int f = 0; f < TT; ++f) {
            const NT* row = Xs + (static_cast<size_t>(f + k) * BK + i) * L::SX;
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const float xv = to_float(row[tx + 16 * c]);
#pragma unroll
              for (int r = 0; r < 4; ++r) acc[f][r][c] = fmaf(a[r], xv, acc[f][r][c]);
            }
          }
        }
      step_end(it);
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
  // grad_out tile [BM][SG] + input tile [BM][SG] (+ MMA scratch)
  return static_cast<size_t>(2) * BM * Smem<NT>::SG * sizeof(NT) +
         (IsMma<NT>::value ? static_cast<size_t>(kWarps) * 256 * sizeof(float) : 0);
}

// Shared memory per block that sm_80 / sm_90 allow (opt-in maximum): every k up to kMaxK runs single-buffered
// on both, k = 3 double-buffered on both (the host picks the double buffer wherever the device has room), and
// the grad-weight tiles need no opt-in.
constexpr size_t kSmemSm80 = 166912, kSmemSm90 = 232448;
template <typename NT>
constexpr bool smem_fits() {
  return fwd_smem_bytes<NT>(kMaxK, 1) <= kSmemSm80 && fwd_smem_bytes<NT>(3, 2) <= kSmemSm80 &&
         gw_smem_bytes<NT>() <= 48 * 1024 && fwd_smem_bytes<NT>(kMaxK, 1) <= kSmemSm90;
}
static_assert(smem_fits<float>() && smem_fits<__half>() && smem_fits<__nv_bfloat16>(),
              "shared memory: a variant no longer fits an A100 / H100 block");

// grid.x = ceil(Co / BM) * ceil(Ci / BM) (channel tiles), grid.y = K, grid.z = frame splits.
// gw32[co, ci, k] += sum over this split's frames (b, t) and all pixels s of gy[b, t, co, s] * x[b, t + k - K/2, ci, s]
// g describes x (xb.. strides) and gy (ob.. strides, Co its channels). vec_g / vec_x: gy's / x's pixel rows may
// be copied in 16-byte chunks.
template <typename NT>
__global__ void __launch_bounds__(kThreads) conv_grad_weight_kernel(const NT* __restrict__ gy,
                                                                    const NT* __restrict__ x,
                                                                    float* __restrict__ gw32, Geometry g, int K,
                                                                    int64_t frames_per_split, bool vec_g,
                                                                    bool vec_x) {
  using L = Smem<NT>;
  extern __shared__ __align__(128) unsigned char smem[];
  NT* Gs = reinterpret_cast<NT*>(smem);  // [BM channels out][SG: GK pixels + pad]
  NT* Xs = Gs + BM * L::SG;              // [BM channels in][SG]
  const int64_t n_ci = (g.Ci + BM - 1) / BM;
  const int64_t co0 = (blockIdx.x / n_ci) * BM, ci0 = (blockIdx.x % n_ci) * BM;
  const int k = blockIdx.y;
  const int64_t f_begin = blockIdx.z * frames_per_split;
  const int64_t f_end = min(f_begin + frames_per_split, g.B * g.T);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // stage (wait included): gy rows of output frame (b, t) and x rows of input frame (b, tx), pixels s0 + [0, GK)
  auto stage = [&](int64_t b, int64_t t, int64_t tx, int64_t s0) {
    stage_rows<NT, GK>(Gs, L::SG, BM, vec_g, [&](int r) {
      const int64_t co = co0 + r;
      if (co >= g.Co) return RowSrc<NT>{gy, 0, 1};
      return RowSrc<NT>{gy + b * g.ob + t * g.ot + co * g.oc + s0 * g.os, g.S - s0, g.os};
    });
    stage_rows<NT, GK>(Xs, L::SG, BM, vec_x, [&](int r) {
      const int64_t ci = ci0 + r;
      if (ci >= g.Ci) return RowSrc<NT>{x, 0, 1};
      return RowSrc<NT>{x + b * g.xb + tx * g.xt + ci * g.xc + s0 * g.xs, g.S - s0, g.xs};
    });
    cp_async_commit();
    cp_async_wait_all();
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
          // [channel][pixel] is exactly B in column-major with leading dimension SG
          wmma::fragment<wmma::matrix_a, 16, 16, 16, NT, wmma::row_major> a;
          wmma::load_matrix_sync(a, Gs + (wm * 16) * L::SG + kk, L::SG);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, NT, wmma::col_major> bf;
            wmma::load_matrix_sync(bf, Xs + (wn * 32 + i * 16) * L::SG + kk, L::SG);
            wmma::mma_sync(acc[i], a, bf, acc[i]);
          }
        }
      }
    }
    float* scratch = reinterpret_cast<float*>(smem + 2 * BM * L::SG * sizeof(NT)) + warp * 256;
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
    // thread (ty, tx) owns out channels ty*4 .. ty*4+3 and in channels tx + 16 c (rows SG = 36 words apart: at
    // most 2-way bank conflicts, where the unpadded 32 were 16-way)
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
          for (int r = 0; r < 4; ++r) a[r] = to_float(Gs[(ty * 4 + r) * L::SG + j]);
#pragma unroll
          for (int c = 0; c < 4; ++c) xv[c] = to_float(Xs[(tx16 + 16 * c) * L::SG + j]);
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

int current_device() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

// Per-device attributes, read once (a cudaDeviceGetAttribute per launch is host time for nothing).
int device_attribute(cudaDeviceAttr attr, int slot, int device) {
  constexpr int kDevices = 64;
  static std::atomic<int> cache[2][kDevices];  // static storage: zero-initialised
  if (device >= 0 && device < kDevices) {
    const int v = cache[slot][device].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
  if (device >= 0 && device < kDevices) cache[slot][device].store(v, std::memory_order_relaxed);
  return v;
}
int sm_count(int device) { return device_attribute(cudaDevAttrMultiProcessorCount, 0, device); }
int smem_optin(int device) { return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, 1, device); }

// Whether the pixel rows of a (B, T, C, S) view can be staged in 16-byte copies: unit pixel stride and every row
// start (b, t, c, s0 with s0 a multiple of the 16-byte chunk) 16-byte aligned. A size-1 axis's stride is never
// used, so it does not count.
template <typename NT>
bool rows_16b(const at::Tensor& t4) {
  constexpr int64_t V = Smem<NT>::V;
  if (t4.stride(3) != 1 || reinterpret_cast<uintptr_t>(t4.data_ptr()) % 16 != 0) return false;
  for (int d = 0; d < 3; ++d)
    if (t4.size(d) > 1 && t4.stride(d) % V != 0) return false;
  return true;
}

// wp: the weight packed as (K, Co, Ci), contiguous
template <typename T>
void launch_fwd(const at::Tensor& x4, const at::Tensor& wp, const at::Tensor& bias, at::Tensor& o4) {
  using NT = typename Native<T>::type;
  const Geometry g = geometry(x4, o4);
  const int K = static_cast<int>(wp.size(0));
  const int64_t blocks =
      ((g.Co + BM - 1) / BM) * g.B * ((g.T + TT - 1) / TT) * ((g.S + BN - 1) / BN);
  TORCH_CHECK(blocks < (int64_t{1} << 31), "temporal_conv1d (CUDA): too large a launch (", blocks, " blocks)");
  const int device = current_device();
  const int64_t limit = smem_optin(device);
  const bool two = static_cast<int64_t>(fwd_smem_bytes<NT>(K, 2)) <= limit;
  const size_t smem = fwd_smem_bytes<NT>(K, two ? 2 : 1);
  TORCH_CHECK(static_cast<int64_t>(smem) <= limit, "temporal_conv1d (CUDA): kernel size ", K, " needs ", smem,
              " bytes of shared memory per block, this device allows ", limit);
  const bool vec_x = rows_16b<NT>(x4);
  const bool vec_w = wp.size(2) % Smem<NT>::V == 0 && reinterpret_cast<uintptr_t>(wp.data_ptr()) % 16 == 0;
  auto kernel = two ? &conv_fwd_kernel<NT, 2> : &conv_fwd_kernel<NT, 1>;
  set_smem<NT>(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<dim3(static_cast<unsigned>(blocks)), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const NT*>(x4.data_ptr<T>()), reinterpret_cast<const NT*>(wp.data_ptr<T>()),
      bias.defined() ? reinterpret_cast<const NT*>(bias.data_ptr<T>()) : nullptr,
      reinterpret_cast<NT*>(o4.data_ptr<T>()), g, K, vec_x, vec_w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_grad_weight(const at::Tensor& g4, const at::Tensor& x4, at::Tensor& gw32, int K) {
  using NT = typename Native<T>::type;
  const Geometry g = geometry(x4, g4);
  const int64_t tiles = ((g.Co + BM - 1) / BM) * ((g.Ci + BM - 1) / BM);
  const int64_t frames = g.B * g.T;
  // split the frame reduction until there are ~4 blocks per SM (each split adds one atomic per weight entry)
  const int64_t sms = std::max(sm_count(current_device()), 1);
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
      gw32.data_ptr<float>(), g, K, per_split, rows_16b<NT>(g4), rows_16b<NT>(x4));
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
  // (Co, Ci, K) -> (K, Co, Ci): the staged weight rows become contiguous 16-byte runs (one small copy per call,
  // which also materialises the flipped, transposed view the backward passes)
  const at::Tensor wp = weight.permute({2, 0, 1}).contiguous();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  switch (x.scalar_type()) {  // check_cuda allowed these three
    case at::kFloat: launch_fwd<float>(x4, wp, b, o4); break;
    case at::kHalf: launch_fwd<at::Half>(x4, wp, b, o4); break;
    default: launch_fwd<at::BFloat16>(x4, wp, b, o4); break;
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
