"""Program-id decoding shared by the kernels.

Every launch puts all its work on grid axis 0 (axes 1 and 2 stop at 65,535, and the batch can pass that), so a
kernel first splits its program id into tile indices, fastest-varying first:
``pid = ((i2 * n1) + i1) * n0 + i0``. Keeping that arithmetic here keeps the orderings of all kernels alike.
"""

import triton
import triton.language as tl


@triton.jit
def unravel3(pid, n0, n1):
    """pid -> (i0, i1, i2) with i0 < n0 fastest, then i1 < n1, then i2 (unbounded)."""
    return pid % n0, (pid // n0) % n1, pid // (n0 * n1)


@triton.jit
def unravel4(pid, n0, n1, n2):
    """pid -> (i0, i1, i2, i3) with i0 < n0 fastest, then i1 < n1, i2 < n2, then i3 (unbounded)."""
    rest = pid // (n0 * n1)
    return pid % n0, (pid // n0) % n1, rest % n2, rest // n2
