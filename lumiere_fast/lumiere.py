"""Lumiere / MPLumiere: inflate a text-to-image U-Net into a space-time U-Net.

Temporal modules run as forward hooks after chosen modules of a frozen copy of the image model. A video
``b c t h w`` is flattened to frames ``(b t) c h w``, the image model runs on the frames, and each temporal
module folds the frames of its input back into videos (the batch size is set on them per forward).

Beyond upstream (lumiere-pytorch 0.0.24):
* with no module names, a ``KarrasUnet`` gets the paper's inflation points (:func:`karras_unet_inflation_points`),
  ``unet_time_kwarg`` defaults to ``'time'``, and the init dry run supplies class labels;
* one shape-discovery dry run instead of four, in eval mode, under no_grad, on the model's device and dtype,
  then a check that a mock video keeps its shape;
* ``ValueError``/``TypeError`` for bad input instead of asserts;
* the conditioning pre-hook sits only on modules whose forward can take more than its input, not on every
  submodule (same results, fewer Python calls per forward);
* no module attribute changes per forward: the hooks read the batch from the video through a per-call state
  object (one compiled graph across batch sizes; :meth:`Lumiere.compile` puts batch 1 in it too);
* per-frame floating-point conditioning is averaged over the frames a temporal downsample merged (upstream
  keeps the first frame of each group);
* ``torch.save`` round-trips a wrapped ``KarrasUnet`` (``SDPBackend`` members pickle by name);
* ``named_parameters()`` temporal only, ``temporal_state_dict()`` / ``load_temporal_state_dict()``;
* ``checkpoint_temporal=True``: temporal modules under non-reentrant activation checkpointing in training;
* ``identity_init=True``: MP blocks start as exact identities (see ``TemporalModule.identity_init_``);
* T=1 (images): the temporal down/upsamples pass a single frame through;
* ``dry_run_input=`` (explicit mock images) and ``check_mock_video=False`` (a single dry-run forward).
"""

from __future__ import annotations

import copyreg
import difflib
import inspect
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from functools import partial

import torch
import torch.utils.checkpoint
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .modules import (AttentionInflationBlock, ConvolutionInflationBlock, MPAttentionInflationBlock,
                      MPConvolutionInflationBlock, MPTemporalDownsample, MPTemporalUpsample, TemporalDownsample,
                      TemporalUpsample)
from . import ops
from .modules.base import TemporalModule
from .modules.mp_layers import _MPWeight

KINDS = ('conv', 'attn', 'downsample', 'upsample')
TEMPORAL_GROUPS = ('convs', 'attns', 'downsamples', 'upsamples')


# ---------------------------------------------------------------------------------------------- hooks
# Module-level classes (not closures), so a wrapped model pickles and deep-copies.

class _CallState:
    """What the hooks need to know about the current call, held outside the modules: the video being run.

    The hooks read the batch size and the frame count from its shape, not from a module attribute set per
    forward (upstream's ``batch_dim``): under ``torch.compile`` (of the wrapper or of the image model alone)
    the batch then stays a symbolic size instead of a constant guarded on, so a new batch size does not
    recompile."""

    def __init__(self):
        self.video = None
        self.image_model_only = False

    @property
    def batch(self):
        return None if self.video is None else self.video.shape[0]

    @property
    def single_frame(self) -> bool:
        return self.video is not None and self.video.shape[2] == 1

    def __getstate__(self):          # per call, never saved
        return {}

    def __setstate__(self, state):
        self.__init__()


class _TemporalHook:
    """Forward hook: run the temporal module on the output of the image-model module it follows.

    ``resample``: a temporal down/upsample, which passes a one-frame video through unchanged (T=1: images
    through the video model). ``checkpoint``: in training, run the module under ``torch.utils.checkpoint``
    (its activations are recomputed in backward instead of held).

    Two calling contracts: ours (``module(x, batch_size=b)``, no attribute changes per call) for our temporal
    modules, and upstream's (``module.batch_dim = b`` set before the call) for every other class: user classes
    written to upstream's contract, and upstream's own temporal classes passed as ``conv_klass`` etc. (some of
    which read ``self.batch_dim`` even when given ``batch_size``). Those also get ``batch_size=`` when their
    forward takes it."""

    def __init__(self, temporal_module: nn.Module, state: _CallState, resample: bool = False):
        self.temporal_module = temporal_module
        self.state = state
        self.resample = resample
        self.checkpoint = False
        self.sets_batch_dim = not isinstance(temporal_module, TemporalModule)
        self.takes_batch_size = _takes_batch_size(type(temporal_module))
        # the MP weight layers renormalise their stored weight in train mode; under checkpointing that happens
        # once, before the checkpointed call, so the recomputation in backward sees the very same weights
        self.mp_weights = [m for m in temporal_module.modules() if isinstance(m, _MPWeight)]

    def __call__(self, module, args, output):
        state = self.state
        if state.video is None:
            if state.image_model_only:
                return output
            raise RuntimeError(
                'Lumiere: the wrapped image model was called on its own (lumiere.model(frames, ...)); its temporal '
                'modules need to know which frames form which video. Call the wrapper on a video '
                '(lumiere(video, ...), video b c t h w), or run the image model without its temporal modules under '
                '`with lumiere.image_model_only(): lumiere.model(frames, ...)`')
        if self.resample and state.single_frame:
            return output
        m = self.temporal_module
        if self.checkpoint and m.training and torch.is_grad_enabled():
            return self._checkpointed(output, state.batch)
        return self._run(output, state.batch)

    def _run(self, x, batch):
        m = self.temporal_module
        if self.sets_batch_dim:
            m.batch_dim = batch                       # upstream's contract
        return m(x, batch_size=batch) if self.takes_batch_size else m(x)

    def _checkpointed(self, output, batch):
        for w in self.mp_weights:
            if w.training:
                ops.renormalize_(w.weight, w.eps)
        return torch.utils.checkpoint.checkpoint(self._run_prenormalised, output, batch, use_reentrant=False)

    def _run_prenormalised(self, x, batch):
        modes = [w.training for w in self.mp_weights]
        for w in self.mp_weights:
            w.training = False
        try:
            return self._run(x, batch)
        finally:
            for w, mode in zip(self.mp_weights, modes):
                w.training = mode


def _match_batch(arg, inferred: int, average: bool = False):
    """A conditioning tensor next to frames of leading size ``inferred``.

    Fewer rows are repeated per frame ('b ... -> (b t) ...'), as upstream. More rows means per-frame
    conditioning at a temporally downsampled level, where each frame stands for a group of input frames: as
    upstream, the first frame of each group is kept. With ``average`` (a keyword named in the wrapper's
    ``average_conditioning``), floating-point conditioning gets the mean of its group instead; integer
    conditioning (labels) cannot be averaged and keeps the first of each group."""
    if not isinstance(arg, Tensor) or arg.ndim == 0:
        return arg
    cond = arg.shape[0]
    if cond < inferred:
        return arg.repeat_interleave(inferred // cond, dim=0)
    if cond > inferred:
        groups = arg.reshape(inferred, cond // inferred, *arg.shape[1:])
        if average and arg.is_floating_point():
            return _group_mean(groups)
        return groups[:, 0]
    return arg


def _group_mean(groups: Tensor) -> Tensor:
    """Mean over dim 1 by pairwise halving while the group size is even (it is 2**levels here): conditioning that
    is the same for every frame of a group (per-video conditioning repeated per frame) comes out bit-identical
    to upstream's first-of-group rule."""
    while groups.shape[1] > 1 and groups.shape[1] % 2 == 0:
        groups = 0.5 * (groups[:, 0::2] + groups[:, 1::2])
    return groups.mean(1) if groups.shape[1] > 1 else groups[:, 0]


class _ConditioningHook:
    """Forward pre-hook: make the conditioning tensors follow the frames' (temporally resampled) batch.

    ``average``: keyword names whose per-frame floating-point values are averaged over the frames a temporal
    downsample merged (opt-in; upstream keeps the first frame of each group for every tensor)."""

    def __init__(self, average=frozenset()):
        self.average = frozenset(average)

    def __call__(self, module, args, kwargs):
        if not args or not isinstance(args[0], Tensor) or (len(args) == 1 and not kwargs):
            return None
        first = args[0]
        inferred = first.shape[0]
        flat, spec = tree_flatten(args[1:])
        rest_args = tree_unflatten([_match_batch(a, inferred) for a in flat], spec)
        rest_kwargs = {}
        for key, value in kwargs.items():
            flat, spec = tree_flatten(value)
            avg = key in self.average
            rest_kwargs[key] = tree_unflatten([_match_batch(a, inferred, avg) for a in flat], spec)
        return (first, *rest_args), rest_kwargs


# ---------------------------------------------------------------------------------------------- pickling

def _sdp_backend(name: str):
    from torch.nn.attention import SDPBackend
    return getattr(SDPBackend, name)


def _register_sdp_backend_pickling():
    """Make ``torch.nn.attention.SDPBackend`` members picklable (by name).

    denoising-diffusion-pytorch's ``Attend`` (inside every ``KarrasUnet``) holds a list of these pybind enum
    members, which pickle cannot find by their class name (``torch.nn.attention._SDPBackend``), so
    ``torch.save`` of a KarrasUnet, wrapped or not, fails on current torch. Registering a reducer that
    rebuilds a member from its name only turns that error into a round trip; nothing that pickled before
    changes."""
    try:
        from torch.nn.attention import SDPBackend
    except ImportError:          # torch without the enum: nothing holds one
        return
    klass = type(SDPBackend.MATH)
    if klass not in copyreg.dispatch_table:
        copyreg.pickle(klass, lambda member: (_sdp_backend, (member.name,)))


_register_sdp_backend_pickling()


# ---------------------------------------------------------------------------------------------- compile

def _torch_at_least(major: int, minor: int) -> bool:
    return tuple(int(v) for v in torch.__version__.split('+')[0].split('.')[:2]) >= (major, minor)


def _size_oblivious_tracing():
    """Tracing where a size that happens to be 1 is not specialised to the constant 1, on torch >= 2.14. Older
    torch has the switch (since 2.6), but measured on 2.11 inductor then fails to lower the KarrasUnet
    (``cannot determine truth value of Relational``) and batch 1 got a second graph anyway: there batch 1 simply
    gets its own graph."""
    try:
        import torch.fx.experimental._config as fx_config
    except ImportError:
        return nullcontext()
    if not hasattr(fx_config, 'backed_size_oblivious'):
        return nullcontext()
    return fx_config.patch(backed_size_oblivious=True)


class _AnyBatchCompiledCall:
    """What :meth:`Lumiere.compile` installs as the module's compiled call: marks the leading (batch) dim of the
    video and of every tensor argument dynamic, and traces size-obliviously, so batch sizes 1, 2, 3, ... share
    one graph."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __call__(self, *args, **kwargs):
        import torch._dynamo
        for arg in tree_flatten((args, kwargs))[0]:
            if isinstance(arg, Tensor) and arg.ndim > 0:
                torch._dynamo.maybe_mark_dynamic(arg, 0)
        with _size_oblivious_tracing():
            return self.compiled(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- helpers

_EXTRA_ARGS_CACHE: dict[type, bool] = {}


def _takes_conditioning(module: nn.Module) -> bool:
    """Whether ``module.forward`` can receive anything besides its input (a second parameter, *args or
    **kwargs). A module that cannot is never handed a conditioning tensor, so it needs no pre-hook; this
    skips the per-call hook on the bulk of a U-Net's modules (convs, norms, activations)."""
    klass = type(module)
    if klass not in _EXTRA_ARGS_CACHE:
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            _EXTRA_ARGS_CACHE[klass] = True
        else:
            variadic = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)
            _EXTRA_ARGS_CACHE[klass] = variadic or len(params) > 1
    return _EXTRA_ARGS_CACHE[klass]


def _takes_batch_size(klass: type) -> bool:
    """Whether a temporal class's ``forward`` takes ``batch_size=`` (ours; also any forward with ``**kwargs``).
    Classes that do not are called upstream's way: ``batch_dim`` set on the module, then ``module(x)``."""
    try:
        params = inspect.signature(klass.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == 'batch_size' or p.kind == p.VAR_KEYWORD for p in params)


def _check_keyword_names(names) -> tuple:
    if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)) or \
            not all(isinstance(k, str) for k in names):
        raise TypeError(f'Lumiere: expected average_conditioning as a list of keyword names (str), got {names!r}')
    return tuple(names)


def _is_karras_unet(model: nn.Module) -> bool:
    return (type(model).__name__ == 'KarrasUnet' and all(isinstance(getattr(model, n, None), nn.ModuleList)
                                                         for n in ('downs', 'mids', 'ups')))


def karras_unet_inflation_points(unet: nn.Module) -> dict:
    """The paper's inflation points for a ``KarrasUnet`` (Bar-Tal et al. 2024, sec. 3.1, fig. 4).

    * ``downsample``: after every spatially downsampling encoder (``downsample=True``);
    * ``upsample``: after every spatially upsampling decoder (``upsample=True``);
    * ``conv``: at every level but the coarsest, after the last encoder and after the last non-upsampling
      decoder of that level (one temporal conv block per level on each path);
    * ``attn``: at the coarsest level, after its last encoder, after each of the two middle decoders, and
      after its last non-upsampling decoder.
    """
    if not _is_karras_unet(unet):
        raise TypeError(f'karras_unet_inflation_points: expected a KarrasUnet, got {type(unet).__name__}')
    enc, dec = [], []            # (name, output level, resizes)
    level = 0
    for i, block in enumerate(unet.downs):
        resizes = bool(getattr(block, 'downsample', False))
        level += resizes
        enc.append((f'downs.{i}', level, resizes))
    coarsest = level
    for i, block in enumerate(unet.ups):
        resizes = bool(getattr(block, 'upsample', False))
        level -= resizes
        dec.append((f'ups.{i}', level, resizes))

    def last(blocks, lvl):
        names = [n for n, l, r in blocks if l == lvl and not r]
        return names[-1:] if names else []

    conv = [n for lvl in range(coarsest) for n in last(enc, lvl)] + \
           [n for lvl in reversed(range(coarsest)) for n in last(dec, lvl)]
    attn = last(enc, coarsest) + [f'mids.{i}' for i in range(len(unet.mids))] + last(dec, coarsest)
    return dict(conv=conv, attn=attn,
                downsample=[n for n, _, r in enc if r], upsample=[n for n, _, r in dec if r])


def _candidate_names(model: nn.Module, limit: int = 40) -> list[str]:
    """Module names worth inflating: blocks held in containers, and top-level children."""
    names = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            continue
        parent = model.get_submodule(name.rpartition('.')[0]) if '.' in name else model
        if '.' not in name or isinstance(parent, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
            names.append(name)
    return names[:limit]


def _first_param(model: nn.Module):
    for p in model.parameters():
        return p
    for b in model.buffers():
        return b
    return None


def _check_names(kind: str, names, modules: dict) -> list[str]:
    if names is None:
        return []
    if isinstance(names, str) or not isinstance(names, (list, tuple)):
        raise TypeError(f'{kind}_module_names: expected a list of module names, got {type(names).__name__}')
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f'{kind}_module_names: expected module names as str, got {type(name).__name__}')
        if name not in modules:
            close = difflib.get_close_matches(name, list(modules), n=3)
            hint = f'; did you mean {close}?' if close else ''
            raise ValueError(f'{kind}_module_names: module {name!r} not found in the model{hint}')
    return list(names)        # a name listed twice gets two temporal modules, run in turn (as upstream)


# ---------------------------------------------------------------------------------------------- wrapper

class Lumiere(nn.Module):
    """Wrap a text-to-image model; see the module docstring. Upstream's constructor, plus:

    ``conv_module_names`` etc. may all be left out for a ``KarrasUnet`` (the paper's points are used);
    ``channels`` defaults to the model's ``channels`` attribute (else 3); ``dry_run_kwargs`` adds keyword
    arguments the model needs for the init dry run (class labels are supplied for a class-conditional
    KarrasUnet); ``dry_run_input`` replaces the mock image batch ``n c h w`` of the dry run (``dry_run_kwargs``
    then sized for ``n``); ``check_mock_video=False`` skips the mock-video output-shape check after it;
    ``checkpoint_temporal`` and ``identity_init``: see the module docstring. ``average_conditioning``: keyword
    names (e.g. ``['emb']``, the embedding a ``KarrasUnet`` hands its blocks) whose per-frame floating-point values
    are averaged over the frames each temporal downsample merges, instead of upstream's first frame of each group.

    ``fast_image_model`` (default on): a wrapped ``KarrasUnet``'s frozen magnitude-preserving layers run with
    weights normalised once and cached, fused pixel-norm/SiLU/MPCat ops and SDPA attention (same state dict, names
    and hooks; other models run unchanged); ``checkpoint_image_model``: recompute its blocks' activations in
    backward (same gradients, less memory; needs ``fast_image_model``).

    A module may be named in several lists (upstream's README names ``downs.1`` as a conv and a downsample point):
    it then carries one temporal module per list, run in upstream's order conv, attn, downsample, upsample; a name
    listed twice in one list gets two temporal modules, run in turn, as upstream.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        image_size: int,
        unet_time_kwarg: str = 'time',
        conv_module_names: list[str] | None = None,
        attn_module_names: list[str] | None = None,
        downsample_module_names: list[str] | None = None,
        upsample_module_names: list[str] | None = None,
        channels: int | None = None,
        conv_inflation_kwargs: dict | None = None,
        attn_inflation_kwargs: dict | None = None,
        downsample_kwargs: dict | None = None,
        upsample_kwargs: dict | None = None,
        conv_klass=ConvolutionInflationBlock,
        attn_klass=AttentionInflationBlock,
        downsample_klass=TemporalDownsample,
        upsample_klass=TemporalUpsample,
        average_conditioning=(),
        dry_run_kwargs: dict | None = None,
        dry_run_input: Tensor | None = None,
        check_mock_video: bool = True,
        checkpoint_temporal: bool = False,
        identity_init: bool = False,
        fast_image_model: bool = True,
        checkpoint_image_model: bool = False,
    ):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f'Lumiere: expected the image model as an nn.Module, got {type(model).__name__}')
        if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
            raise ValueError(f'Lumiere: expected image_size as a positive int, got {image_size!r}')
        if not isinstance(unet_time_kwarg, str) or not unet_time_kwarg:
            raise TypeError(f'Lumiere: expected unet_time_kwarg as a keyword name (str), got {unet_time_kwarg!r}')
        if channels is None:
            channels = getattr(model, 'channels', 3)
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ValueError(f'Lumiere: expected channels as a positive int, got {channels!r}')
        for label, kw in (('conv_inflation_kwargs', conv_inflation_kwargs), ('attn_inflation_kwargs',
                          attn_inflation_kwargs), ('downsample_kwargs', downsample_kwargs),
                          ('upsample_kwargs', upsample_kwargs), ('dry_run_kwargs', dry_run_kwargs)):
            if kw is not None and not isinstance(kw, dict):
                raise TypeError(f'Lumiere: expected {label} as a dict, got {type(kw).__name__}')

        _check_keyword_names(average_conditioning)
        if dry_run_input is not None and (not isinstance(dry_run_input, Tensor) or dry_run_input.ndim != 4):
            raise ValueError(f'Lumiere: expected dry_run_input as a (batch, channels, height, width) tensor of '
                             f'images, got {type(dry_run_input).__name__} of shape '
                             f'{tuple(getattr(dry_run_input, "shape", ()))}')

        model = deepcopy(model)
        model.requires_grad_(False)
        self._fast_image_model = bool(fast_image_model)
        if fast_image_model:        # a KarrasUnet's frozen MP layers run cached/fused; other models are left as they are
            from .modules.karras import accelerate_karras_unet, is_karras_unet
            if checkpoint_image_model and not is_karras_unet(model):
                raise ValueError(f'Lumiere: checkpoint_image_model works on a KarrasUnet only, got '
                                 f'{type(model).__name__}')
            accelerate_karras_unet(model, checkpoint=checkpoint_image_model)
        elif checkpoint_image_model:
            raise ValueError('Lumiere: checkpoint_image_model needs fast_image_model=True')
        self.model = model
        self.channels = channels
        self.image_size = image_size
        self.unet_time_kwarg = unet_time_kwarg
        self.temporal_klasses = (conv_klass, attn_klass, downsample_klass, upsample_klass)

        modules = {name: m for name, m in model.named_modules() if not isinstance(m, nn.ModuleList)}
        given = dict(conv=conv_module_names, attn=attn_module_names, downsample=downsample_module_names,
                     upsample=upsample_module_names)
        if all(v is None for v in given.values()):
            if not _is_karras_unet(model):
                raise ValueError(
                    f'Lumiere: no module names given, and automatic inflation points exist only for a KarrasUnet '
                    f'(got {type(model).__name__}); pass conv_module_names (and attn/downsample/upsample_module_names)'
                    f' out of candidates such as {_candidate_names(model)}')
            given = karras_unet_inflation_points(model)
        names = {kind: _check_names(kind, given[kind], modules) for kind in KINDS}
        if len(names['downsample']) != len(names['upsample']):
            raise ValueError(f'Lumiere: expected as many temporal upsamples as downsamples, got '
                             f'{len(names["downsample"])} downsample and {len(names["upsample"])} upsample modules')
        # a module named in several lists (upstream's README: conv and down/upsample at the same block) carries
        # one temporal module per list, run in upstream's hook order: conv, attn, downsample, upsample
        used = {n for kind in KINDS for n in names[kind]}

        order, shapes = self._dry_run(modules, used, dry_run_kwargs or {}, dry_run_input)

        for kind in KINDS:
            missing = [n for n in names[kind] if n not in shapes]
            if missing:
                raise ValueError(f'Lumiere: {kind} module(s) {missing} did not run in the dry run')
            names[kind].sort(key=order.index)       # execution order fixes the index N of convs.N etc.
        klass = dict(zip(KINDS, self.temporal_klasses))
        kwargs = dict(conv=conv_inflation_kwargs, attn=attn_inflation_kwargs, downsample=downsample_kwargs,
                      upsample=upsample_kwargs)
        built = {}
        for kind in KINDS:
            temporal = []
            for name in names[kind]:
                shape = shapes[name]
                if len(shape) != 4:
                    raise ValueError(f'Lumiere: module {name!r} outputs shape {tuple(shape)}; a temporal module '
                                     f'needs a 4-dim (b t) c h w output')
                m = klass[kind](dim=shape[1], **(kwargs[kind] or {}))
                if identity_init:
                    if not callable(getattr(m, 'identity_init_', None)):
                        raise TypeError(f'Lumiere: identity_init=True needs temporal modules with an identity_init_() '
                                        f'method; {type(m).__name__} (the {kind} class) has none')
                    m.identity_init_()
                temporal.append(m)
            built[kind] = nn.ModuleList(temporal)
        p = _first_param(model)
        if p is not None and p.is_floating_point():     # temporal modules live where the image model lives
            for group in built.values():
                group.to(device=p.device, dtype=p.dtype)
        self.convs, self.attns = built['conv'], built['attn']
        self.downsamples, self.upsamples = built['downsample'], built['upsample']
        self.module_names = {kind: list(names[kind]) for kind in KINDS}

        self._call_state = _CallState()
        self._temporal_hooks = []
        for kind in KINDS:
            for name, temporal in zip(names[kind], built[kind]):
                hook = _TemporalHook(temporal, self._call_state, resample=kind in ('downsample', 'upsample'))
                modules[name].register_forward_hook(hook)
                self._temporal_hooks.append(hook)
        self.checkpoint_temporal = checkpoint_temporal
        self.identity_init = bool(identity_init)

        # conditioning follows the frames (upstream's pre-hook), on every module that can be handed any
        hook = self._conditioning_hook = _ConditioningHook()
        self.average_conditioning = average_conditioning
        for m in self.model.modules():
            if m is self.model or _takes_conditioning(m):
                m.register_forward_pre_hook(hook, with_kwargs=True)

        if len(self.parameters()) == 0:
            raise ValueError('Lumiere: no temporal parameters to be learned (all module name lists are empty)')

        if check_mock_video:
            self._check_mock_video(dry_run_kwargs or {}, dry_run_input)

    # -- init helpers -------------------------------------------------------------------------------------

    def _mock_kwargs(self, batch: int, device, dtype, extra: dict) -> dict:
        kwargs = {self.unet_time_kwarg: torch.ones((batch,), device=device, dtype=dtype)}
        if getattr(self.model, 'needs_class_labels', False):
            kwargs['class_labels'] = torch.zeros((batch,), dtype=torch.long, device=device)
        kwargs.update(extra)
        return kwargs

    def _mock_images(self, n: int):
        p = _first_param(self.model)
        device = p.device if p is not None else torch.device('cpu')
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        return torch.randn(n, self.channels, self.image_size, self.image_size, device=device, dtype=dtype)

    def _dry_run(self, modules: dict, wanted: set, extra: dict, images: Tensor | None):
        """One forward of a mock image (or of ``images``): execution order and output shape of every module."""
        order, shapes, handles, reused = [], {}, [], []

        def post(name):
            def fn(module, args, output):
                if name in shapes and name in wanted:
                    reused.append(name)
                order.append(name)
                shapes[name] = tuple(output.shape) if isinstance(output, Tensor) else ()
            return fn

        for name, m in modules.items():
            if name:
                handles.append(m.register_forward_hook(post(name)))
        was_training = {m: m.training for m in self.model.modules()}
        if images is None:
            images = self._mock_images(1)
        try:
            self.model.eval()
            with torch.no_grad():
                self.model(images, **self._mock_kwargs(images.shape[0], images.device, images.dtype, extra))
        except Exception as err:
            # the model rejected the mock call: the wrapper's settings do not fit it
            klass = TypeError if isinstance(err, TypeError) else ValueError
            raise klass(f'Lumiere: the init dry run {type(self.model).__name__}(mock image {tuple(images.shape)}, '
                        f'{self.unet_time_kwarg}=...) failed with {type(err).__name__}: {err}. Check channels, '
                        f'image_size and unet_time_kwarg, and pass what else the model needs with dry_run_kwargs=') \
                from err
        finally:
            for h in handles:
                h.remove()
            for m, mode in was_training.items():
                m.train(mode)
        if reused:
            raise ValueError(f'Lumiere: module(s) {sorted(set(reused))} run more than once per forward; a temporal '
                             f'module can only follow a module that runs once')
        return order, shapes

    def _check_mock_video(self, extra: dict, images: Tensor | None):
        """The Todo item of the original README: a mock video must come out with its own shape.

        Skipped when a temporal module has a fixed ``time_dim``: the frame count it needs at its level is the
        user's choice, not one a mock video can guess."""
        if any(getattr(m, 'time_dim', None) is not None for m in self.temporal_modules()):
            return
        if images is None:
            images = self._mock_images(self.downsample_factor)
        elif images.shape[0] % self.downsample_factor:
            return        # the user's kwargs are sized for their images: no other frame count fits them
        video = images.unsqueeze(0).transpose(1, 2)                  # n c h w -> 1 c n h w
        was_training = {m: m.training for m in self.modules()}
        try:
            self.eval()
            with torch.no_grad():
                out = self(video, **self._mock_kwargs(1, images.device, images.dtype, extra))
        finally:
            for m, mode in was_training.items():
                m.train(mode)
        if tuple(out.shape) != tuple(video.shape):
            raise ValueError(f'Lumiere: the inflated model maps a mock video of shape {tuple(video.shape)} to '
                             f'{tuple(out.shape)}; check the module names (down/upsamples must pair up)')

    # -- public -------------------------------------------------------------------------------------------

    @property
    def downsample_factor(self) -> int:
        return 2 ** len(self.downsamples)

    def temporal_modules(self):
        """The temporal modules, in the order conv, attn, downsample, upsample."""
        for group in (self.convs, self.attns, self.downsamples, self.upsamples):
            yield from group

    def parameters(self, recurse: bool = True) -> list:
        """Only the temporal parameters (the image model is frozen); a list, as upstream, so ``len()`` works."""
        return [p for _, p in self.named_parameters(recurse=recurse)]

    def named_parameters(self, prefix: str = '', recurse: bool = True, remove_duplicate: bool = True):
        """Only the temporal parameters, named as in ``state_dict()`` (``convs.0.proj_out.weight``, ...).

        ``state_dict()`` stays full (the frozen image model included) so upstream checkpoints load strictly;
        :meth:`temporal_state_dict` holds only what trains."""
        memo = set()
        for attr in TEMPORAL_GROUPS:
            for name, p in getattr(self, attr).named_parameters(prefix=f'{prefix}.{attr}' if prefix else attr,
                                                                 recurse=recurse, remove_duplicate=False):
                if remove_duplicate:
                    if p in memo:
                        continue
                    memo.add(p)
                yield name, p

    def temporal_state_dict(self) -> dict:
        """The trained weights only: ``state_dict()`` without the image model's ``model.`` entries."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith('model.')}

    def load_temporal_state_dict(self, state_dict: dict, strict: bool = True):
        """Load what :meth:`temporal_state_dict` saved; the image model is left as it is.

        With ``strict``, missing or unexpected keys (``model.`` ones included) raise ``ValueError``. Returns
        ``(missing_keys, unexpected_keys)`` as ``load_state_dict`` does."""
        if not isinstance(state_dict, dict):
            raise TypeError(f'Lumiere: expected a dict of tensors, got {type(state_dict).__name__}')
        expected = set(self.temporal_state_dict())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected)
        if strict and (missing or unexpected):
            raise ValueError(f'Lumiere.load_temporal_state_dict: missing keys {missing}, unexpected keys {unexpected}'
                             f' (expected the keys of temporal_state_dict())')
        for attr in TEMPORAL_GROUPS:
            head = attr + '.'
            sub = {k[len(head):]: v for k, v in state_dict.items() if k.startswith(head)}
            getattr(self, attr).load_state_dict(sub, strict=False)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    @property
    def average_conditioning(self) -> tuple:
        """Keyword names whose per-frame floating-point conditioning is averaged over the frames a temporal
        downsample merged (default empty: upstream's first frame of each group); settable."""
        return tuple(sorted(self._conditioning_hook.average))

    @average_conditioning.setter
    def average_conditioning(self, names):
        self._conditioning_hook.average = frozenset(_check_keyword_names(names))

    @contextmanager
    def image_model_only(self):
        """``with lumiere.image_model_only(): lumiere.model(frames, time=...)`` runs the wrapped image model on
        frames ``n c h w`` without its temporal modules (outside the block, a direct call of ``lumiere.model``
        raises: its temporal modules cannot tell which frames form a video). The image model you passed to the
        constructor is a separate copy and never carries temporal modules."""
        state = self._call_state
        previous = state.image_model_only
        state.image_model_only = True
        try:
            yield self.model
        finally:
            state.image_model_only = previous

    def compile(self, *args, **kwargs):
        """``nn.Module.compile`` (compile this module's call in place; arguments go to ``torch.compile``), with one
        graph for every batch size, batch 1 included.

        Plain ``torch.compile(lumiere)`` already keeps one graph for batch sizes 2, 3, 4, ... (no module attribute
        changes per forward), but dynamo specialises any size that is 1 when it traces, so batch 1 gets a graph of
        its own. Here the leading dim of the video and of each tensor argument is marked dynamic before every
        call and tracing treats sizes size-obliviously (``torch.fx.experimental._config.backed_size_oblivious``,
        torch >= 2.14; on older torch it is plain ``torch.compile``), so batch 1 runs the same graph. That graph assumes nothing in the image model branches on
        a batch of exactly 1 (e.g. ``squeeze(0)``); the tests hold its output to the eager one for batch 1, 2, 3."""
        compiled = torch.compile(self._call_impl, *args, **kwargs)
        # measured on torch 2.11: with the batch dims marked dynamic up front, inductor fails to lower the KarrasUnet
        # (`cannot determine truth value of Relational`); there this is plain torch.compile (batch 1 gets its own
        # graph, 2, 3, ... share one)
        self._compiled_call_impl = _AnyBatchCompiledCall(compiled) if _torch_at_least(2, 14) else compiled

    @property
    def checkpoint_image_model(self) -> bool:
        """In training, recompute the frozen image model's block activations in backward (``fast_image_model``
        on a ``KarrasUnet`` only)."""
        return any(getattr(m, '_lf_checkpoint', False) for m in self.model.modules())

    @checkpoint_image_model.setter
    def checkpoint_image_model(self, value: bool):
        from .modules.karras import accelerate_karras_unet, is_karras_unet
        if not (self._fast_image_model and is_karras_unet(self.model)):
            raise ValueError('Lumiere: checkpoint_image_model needs fast_image_model=True and a KarrasUnet')
        accelerate_karras_unet(self.model, checkpoint=bool(value))

    @property
    def checkpoint_temporal(self) -> bool:
        """In training, run each temporal module under ``torch.utils.checkpoint`` (non-reentrant): its
        activations are recomputed in backward instead of held; same outputs and gradients."""
        return self._checkpoint_temporal

    @checkpoint_temporal.setter
    def checkpoint_temporal(self, value: bool):
        self._checkpoint_temporal = bool(value)
        for hook in self._temporal_hooks:
            hook.checkpoint = self._checkpoint_temporal

    def _check_video(self, video, args, kwargs):
        if not isinstance(video, Tensor):
            raise TypeError(f'Lumiere: expected the video as a tensor, got {type(video).__name__}')
        if video.ndim != 5:
            raise ValueError(f'Lumiere: expected a video of shape (batch, channels, frames, height, width), got '
                             f'shape {tuple(video.shape)}')
        b, c, t, h, w = video.shape
        if c != self.channels:
            raise ValueError(f'Lumiere: expected {self.channels} channels, got {c} (video shape {tuple(video.shape)})')
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f'Lumiere: expected frames of {self.image_size}x{self.image_size}, got {h}x{w}')
        if t < 1 or (t > 1 and t % self.downsample_factor):
            raise ValueError(f'Lumiere: expected the number of frames divisible by {self.downsample_factor} '
                             f'(2 ** {len(self.downsamples)} temporal downsamples), or 1 (images), got {t}')
        p = _first_param(self.model)
        if p is not None:
            if video.device != p.device:
                raise ValueError(f'Lumiere: video is on {video.device} but the model is on {p.device}')
            if not video.is_floating_point():
                raise TypeError(f'Lumiere: expected a floating-point video, got {video.dtype}')
            if video.dtype != p.dtype and not torch.is_autocast_enabled(video.device.type):
                raise TypeError(f'Lumiere: video dtype {video.dtype} does not match the model dtype {p.dtype} '
                                f'(cast one of them, or run under torch.autocast)')
        flat, _ = tree_flatten((args, kwargs))
        for arg in flat:
            if isinstance(arg, Tensor) and arg.ndim > 0 and (arg.shape[0] == 0 or (b * t) % arg.shape[0]):
                raise ValueError(f'Lumiere: a conditioning tensor has leading size {arg.shape[0]}; expected the '
                                 f'batch size {b} (one per video), batch*frames {b * t} (one per frame), or another '
                                 f'divisor of {b * t} (repeated, as upstream does)')

    def forward(self, video: Tensor, *args, **kwargs) -> Tensor:
        """b c t h w -> b c t h w; extra arguments (time, class labels, ...) go to the image model."""
        self._check_video(video, args, kwargs)
        b, c, t, h, w = video.shape
        images = video.transpose(1, 2).reshape(b * t, c, h, w)     # b c t h w -> (b t) c h w
        # the hooks read the batch from here (not from module attributes): it stays a symbolic size under
        # torch.compile; one frame (T=1) passes the temporal down/upsamples through
        state = self._call_state
        state.video = video
        try:
            images = self.model(images, *args, **kwargs)
        finally:
            state.video = None
        return images.reshape(b, t, *images.shape[1:]).transpose(1, 2)   # (b t) c h w -> b c t h w


MPLumiere = partial(
    Lumiere,
    conv_klass=MPConvolutionInflationBlock,
    attn_klass=MPAttentionInflationBlock,
    downsample_klass=MPTemporalDownsample,
    upsample_klass=MPTemporalUpsample,
)
