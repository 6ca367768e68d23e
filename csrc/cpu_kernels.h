// Plain C++ micro-kernels of the CPU temporal conv1d. No includes on purpose: temporal_conv1d_cpu.cpp includes
// this file several times, inside `namespace generic` and inside `namespace avx2` / `namespace avx512` under
// `#pragma GCC target(...)`, and picks one at run time (the build must run on CPUs without AVX2, and a global
// -mavx2 would let the compiler put AVX2 instructions anywhere). The hot loops have compile-time trip counts
// and the accumulator tile is an array of GCC vector types (vector_size), so the tile lives in registers of
// the width the variant targets.
//
// Layout (see temporal_conv1d_cpu.cpp): x and out are (B, T, C, S) with S the contiguous spatial axis.

// out[co0 : co0+CB, s0 : s0+SB] of one output frame, S - s0 >= SB. The accumulator tile is CB x SB (6 x 16 fp32
// = twelve AVX2 registers, the shape of the classic Haswell GEMM kernel): per (k, ci) step it loads one x row
// segment, broadcasts CB weights and issues CB x SB FMAs, so it is compute-bound, not load-bound.
// wt is this channel block's weight packed as (K, Ci, CB): the CB weights of one (k, ci) step are adjacent and
// the steps follow each other, so the weights stream through one cache line per 16 / CB steps (with a
// (K, Ci, Co) layout every step touched a new line and the tile ran from L2: measured 2x slower at c = 128).
// Zero rows past Co let every tile run all CB rows (computed, never stored). Columns below s_store
// were already written by the previous tile (the last tile of a row overlaps it instead of running a tail).
template <typename T, int CB, int SB>
static inline void conv_tile(const T* __restrict__ x_b, long sT, long sC, long T_, long Ci, long t, long s0,
                             long s_store, const T* __restrict__ wt, long co0, long co_n, int K,
                             const T* __restrict__ bias, T* __restrict__ out_t, long oC) {
  // A tile row is two GCC vectors of one register each (zmm for the AVX-512 variant, ymm for AVX2);
  // aligned(sizeof(T)) allows unaligned loads, may_alias the casts from T*. The tile is never indexed at run
  // time or address-taken, so all 2 * CB vectors stay in registers (plain arrays + auto-vectorisation, or one
  // vector wider than a register, spilled the tile to the stack: ~3x slower).
  constexpr int L = SB / 2;
  typedef T V __attribute__((vector_size(L * sizeof(T)), aligned(sizeof(T)), may_alias));
  V acc[CB][2];
#pragma GCC unroll 16
  for (int r = 0; r < CB; ++r) {
    const T b = (bias != nullptr && r < co_n) ? bias[co0 + r] : T(0);
    acc[r][0] = V{} + b;
    acc[r][1] = V{} + b;
  }
  const int half = K / 2;
  for (int k = 0; k < K; ++k) {
    const long tt = t + k - half;
    if (tt < 0 || tt >= T_) continue;                  // 'same' zero padding: the tap reads nothing
    const T* xr = x_b + tt * sT + s0;
    const T* wk = wt + (long)k * Ci * CB;
    for (long ci = 0; ci < Ci; ++ci) {
      const V x0 = *reinterpret_cast<const V*>(xr + ci * sC);
      const V x1 = *reinterpret_cast<const V*>(xr + ci * sC + L);
      const T* __restrict__ w = wk + ci * CB;
#pragma GCC unroll 16
      for (int r = 0; r < CB; ++r) {
        const T wv = w[r];
        acc[r][0] += wv * x0;
        acc[r][1] += wv * x1;
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < CB; ++r) {
    if (r >= co_n) break;
    T* o = out_t + (co0 + r) * oC + s0;
    if (s_store == s0) {
      *reinterpret_cast<V*>(o) = acc[r][0];
      *reinterpret_cast<V*>(o + L) = acc[r][1];
    } else {                                           // the overlapping last tile: skip the columns done
      T tmp[SB];
      *reinterpret_cast<V*>(tmp) = acc[r][0];
      *reinterpret_cast<V*>(tmp + L) = acc[r][1];
      for (int v = 0; v < SB; ++v)
        if (s0 + v >= s_store) o[v] = tmp[v];
    }
  }
}

// The same sums for frames narrower than one tile (S < SB, e.g. the (n, c, t) form where S = 1): scalar.
template <typename T, int CB>
static inline void conv_narrow(const T* x_b, long sT, long sC, long T_, long Ci, long S, long t,
                               const T* wt, long Co, int K, const T* bias, T* out_t, long oC) {
  const int half = K / 2;
  for (long co = 0; co < Co; ++co)
    for (long s = 0; s < S; ++s) {
      T acc = bias != nullptr ? bias[co] : T(0);
      const T* wb = wt + (co / CB) * K * Ci * CB + co % CB;   // packed as in conv_tile
      for (int k = 0; k < K; ++k) {
        const long tt = t + k - half;
        if (tt < 0 || tt >= T_) continue;
        for (long ci = 0; ci < Ci; ++ci) acc += wb[((long)k * Ci + ci) * CB] * x_b[tt * sT + ci * sC + s];
      }
      out_t[co * oC + s] = acc;
    }
}

// Weight gradient, one (output frame, tap) pair: acc[co, ci] += sum_s gy[co, s] * xT[s, ci]. The same register
// tile as conv_tile with the roles swapped: CB gy values broadcast per s, SB lanes over ci of the input frame,
// which the caller transposed once to xT (S, Ci_pad), zero columns up to Ci_pad. Rows co >= Co (the last
// tile) read row Co - 1 instead, a valid address; their sums land in the padding rows of acc, never read.
template <typename T, int CB, int SB>
static inline void grad_weight_tile(const T* __restrict__ gy, long gC, long Co, long co0,
                                    const T* __restrict__ xT, long Ci_pad, long ci0, long S,
                                    T* __restrict__ acc /* (Co_pad, Ci_pad) */) {
  constexpr int L = SB / 2;                            // two one-register vectors per row, as in conv_tile
  typedef T V __attribute__((vector_size(L * sizeof(T)), aligned(sizeof(T)), may_alias));
  const T* __restrict__ rows[CB];
#pragma GCC unroll 16
  for (int r = 0; r < CB; ++r) rows[r] = gy + (co0 + r < Co ? co0 + r : Co - 1) * gC;
  V a[CB][2];
#pragma GCC unroll 16
  for (int r = 0; r < CB; ++r) {
    a[r][0] = *reinterpret_cast<const V*>(acc + (co0 + r) * Ci_pad + ci0);
    a[r][1] = *reinterpret_cast<const V*>(acc + (co0 + r) * Ci_pad + ci0 + L);
  }
  for (long s = 0; s < S; ++s) {
    const V x0 = *reinterpret_cast<const V*>(xT + s * Ci_pad + ci0);
    const V x1 = *reinterpret_cast<const V*>(xT + s * Ci_pad + ci0 + L);
#pragma GCC unroll 16
    for (int r = 0; r < CB; ++r) {
      const T g = rows[r][s];
      a[r][0] += g * x0;
      a[r][1] += g * x1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < CB; ++r) {
    *reinterpret_cast<V*>(acc + (co0 + r) * Ci_pad + ci0) = a[r][0];
    *reinterpret_cast<V*>(acc + (co0 + r) * Ci_pad + ci0 + L) = a[r][1];
  }
}
