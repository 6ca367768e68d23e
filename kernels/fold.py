"""Frame fold / unfold as tiled transposes (launchers: ``lumiere_fast/ops/fold.py``).

    frames  (b t) c h w, p = h * W + w the fast axis of a contiguous tensor
    folded  (b h w) c t   (layout 'c t': t fast)   or   (b h w) t c   (layout 't c': c fast)

Both directions and both layouts are the same 2-d transpose: for each (b, r) a [Q, P] block with
q = t, r = c (layout 'c t') or q = c, r = t (layout 't c'). The two layouts differ only in the folded
tensor's (c, t) strides, so one kernel serves all four cases; ``TO_FOLDED`` picks the direction.

A program owns one [BLOCK_Q, BLOCK_P] tile. Load and store use the same tile but different offset formulas;
Triton's coalescing pass gives the load a layout contiguous along p and the store one contiguous along q (or
whatever axis has stride 1, e.g. c for a channels_last input), and converts between them through shared
memory: that conversion is the transpose, and both global accesses stay coalesced.
"""

import triton
import triton.language as tl

from .grid import configs, pixel_offsets, unravel4

# (BLOCK_Q, BLOCK_P, num_warps). Q is T (<= 64 in practice, 16 for the shapes) for layout 'c t' and C
# (up to 768) for 't c'; small Q wants a narrow, long tile, large Q a squarer one. 16-32 KiB of bf16 per
# tile keeps enough bytes in flight per SM without spilling the layout conversion's shared memory.
_GPU_CONFIGS = [
    triton.Config({'BLOCK_Q': 16, 'BLOCK_P': 128}, num_warps=4),
    triton.Config({'BLOCK_Q': 16, 'BLOCK_P': 256}, num_warps=4),
    triton.Config({'BLOCK_Q': 32, 'BLOCK_P': 64}, num_warps=4),
    triton.Config({'BLOCK_Q': 32, 'BLOCK_P': 128}, num_warps=4),
    triton.Config({'BLOCK_Q': 64, 'BLOCK_P': 64}, num_warps=4),
    triton.Config({'BLOCK_Q': 64, 'BLOCK_P': 128}, num_warps=8),
]
CONFIGS = configs(_GPU_CONFIGS, [triton.Config({'BLOCK_Q': 16, 'BLOCK_P': 16}, num_warps=1)])


@triton.jit
def _folded_offset(b, t, c, p, P, s_n, s_c, s_t):
    """Element offset in (b h w) c t, or in (b h w) t c when s_c/s_t are that tensor's c/t strides."""
    return (b * P + p.to(tl.int64)) * s_n + c * s_c + t * s_t


@triton.autotune(configs=CONFIGS, key=['Q', 'R', 'P', 'TILE_T', 'TO_FOLDED', 'HW_MERGED'])
@triton.jit
def _fold_frames_kernel(src, dst, T, W, P, Q, R,
                       f_bt, f_c, f_h, f_w,     # frames strides (source or destination)
                       g_n, g_c, g_t,           # folded strides: of (b h w), c and t whatever the layout
                       TILE_T: tl.constexpr,    # q is t (layout 'c t'); else q is c (layout 't c')
                       TO_FOLDED: tl.constexpr, HW_MERGED: tl.constexpr,
                       BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr):
    # Grid axis 0 only (axes 1/2 stop at 65,535): pid = ((b * R + r) * n_q_tiles + q_tile) * n_p_tiles + p_tile,
    # p tiles fastest so neighbouring programs read neighbouring memory of the frames tensor.
    pid = tl.program_id(0).to(tl.int64)
    n_p_tiles = tl.cdiv(P, BLOCK_P)       # here, not in the launcher: the tile sizes are autotuned
    n_q_tiles = tl.cdiv(Q, BLOCK_Q)
    p_tile, q_tile, r, b = unravel4(pid, n_p_tiles, n_q_tiles, R)

    q = q_tile * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]                    # int64 [BLOCK_Q, 1]
    p = (p_tile * BLOCK_P).to(tl.int32) + tl.arange(0, BLOCK_P)[None, :]     # int32 [1, BLOCK_P]
    mask = (q < Q) & (p < P)
    if TILE_T:
        t = q
        c = r
    else:
        t = r
        c = q
    # b, t, c are int64; p is int32 (p < H*W < 2**31)
    frames = (b * T + t) * f_bt + c * f_c + pixel_offsets(p, W, f_h, f_w, HW_MERGED)
    folded = _folded_offset(b, t, c, p, P, g_n, g_c, g_t)
    if TO_FOLDED:
        tl.store(dst + folded, tl.load(src + frames, mask=mask), mask=mask)
    else:
        tl.store(dst + frames, tl.load(src + folded, mask=mask), mask=mask)
