"""Magnitude-preserving layers (Karras et al. 2023), same parameters and state-dict keys as upstream.

Each weight layer keeps its raw ``weight``; forward uses ``ops.mp_weight(weight)`` and, in train mode,
first renormalises the stored weight in place (no grad), exactly as upstream; under FSDP2 the sharded parameter
too (see ``_fsdp_sharded_weight``).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops


_FSDP_PARAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()     # layer -> (states seen, FSDPParam ref)


def _fsdp_sharded_weight(layer: nn.Module) -> Tensor | None:
    """The local shard of the FSDP2 parameter behind ``layer.weight`` (None where FSDP2 does not manage it).

    Under ``fully_shard`` a layer's forward sees the all-gathered unsharded copy, which FSDP frees after forward:
    a renormalisation written into it alone is lost, and the sharded parameter (the one the optimizer updates)
    would never be renormalised. FSDP2 shards dim 0 and the renormalisation is per row, so each rank renormalises
    its own rows in place, with no communication: exactly one process's update. Found through FSDP2's module
    states (torch internals, looked up defensively and cached per layer; a torch whose FSDP2 has moved them
    finds nothing, and then only the copy is renormalised, as before)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    try:
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState
    except ImportError:
        return None
    cached = _FSDP_PARAMS.get(layer)
    if cached is not None and cached[0] == len(_module_state_mapping):
        param = cached[1]() if cached[1] is not None else None
    else:
        param = None
        for state in list(_module_state_mapping.values()):
            state = state() if isinstance(state, weakref.ref) else state        # (a weak reference on newer torch)
            group = getattr(state, '_fsdp_param_group', None) if isinstance(state, FSDPState) else None
            for fsdp_param in getattr(group, 'fsdp_params', ()):
                info = getattr(fsdp_param, '_module_info', None)
                if getattr(info, 'module', None) is layer and getattr(info, 'param_name', None) == 'weight':
                    param = fsdp_param
        _FSDP_PARAMS[layer] = (len(_module_state_mapping), weakref.ref(param) if param is not None else None)
    sharded = getattr(param, 'sharded_param', None)
    return sharded.to_local() if sharded is not None and hasattr(sharded, 'to_local') else None


class _MPWeight(nn.Module):
    def __init__(self, shape, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape))
        self.eps = eps
        self.fan_in = int(torch.Size(shape[1:]).numel())

    def effective_weight(self) -> Tensor:
        """The weight the layer applies; renormalises the stored one first in train mode.

        The train-mode renormalisation writes the stored weight in place, so a later forward (a second
        micro-batch before one backward, a ``no_grad`` forward in between) would invalidate what this forward's
        normalisation saved for backward. Upstream's ``pack`` happens to copy the weight first; here the copy is
        explicit, and only taken when autograd will save it (a few KiB: temporal weights only)."""
        if self.training:
            ops.renormalize_(self.weight, self.eps)
            shard = _fsdp_sharded_weight(self)
            if shard is not None and shard.numel() and shard.data_ptr() != self.weight.data_ptr():
                ops.renormalize_(shard, self.eps)
        weight = self.weight
        if weight.requires_grad and torch.is_grad_enabled():
            weight = weight.clone()
        return ops.mp_weight(weight, self.eps)


class MPLinear(_MPWeight):
    def __init__(self, dim_in: int, dim_out: int, eps: float = 1e-4):
        super().__init__((dim_out, dim_in), eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.effective_weight())


class MPConv2d(_MPWeight):
    def __init__(self, dim_in: int, dim_out: int, kernel_size: int, eps: float = 1e-4):
        super().__init__((dim_out, dim_in, kernel_size, kernel_size), eps)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.effective_weight(), padding='same')


class MPConv1d(_MPWeight):
    def __init__(self, dim_in: int, dim_out: int, kernel_size: int, eps: float = 1e-4, init_dirac: bool = False):
        super().__init__((dim_out, dim_in, kernel_size), eps)
        if init_dirac:
            nn.init.dirac_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv1d(x, self.effective_weight(), padding='same')


class MPSiLU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.mp_silu(x)


class Gain(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(0.))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


class MPAdd(nn.Module):
    def __init__(self, t: float):
        super().__init__()
        self.t = t

    def forward(self, x: Tensor, res: Tensor) -> Tensor:
        return ops.mp_add(x, res, self.t)
