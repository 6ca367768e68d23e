"""The main command: the lumiere-pytorch README model, ours against upstream lumiere-pytorch on the same weights.

    python -m lumiere_fast                      # or: lumiere-fast
    python -m lumiere_fast --image-size 256 --batch 2 --frames 8      # the README example's size

The model is the README's ``KarrasUnet(image_size, dim=8, channels=3, dim_max=768, num_classes=1000)`` (dropout off,
so the two implementations' numbers are comparable in train mode; its output gain and the temporal weights moved
off their zero init, so outputs and gradients are not trivially zero), wrapped as ``MPLumiere(karras_unet,
image_size=...)`` (the paper's inflation points) and called as ``lumiere(video, time=time, class_labels=labels)``.
Upstream (``lumiere_pytorch.MPLumiere``) is built at the same inflation points (its init dry run is handed class
labels, which it cannot pass itself) and loads our state dict strictly. Rows:

* ``lumiere_fast``: ours, default backend (kernels on CUDA, the reference elsewhere);
* ``lumiere-pytorch``: upstream eager; ``lumiere-pytorch compiled``: ``torch.compile(upstream)`` (CUDA only);
* on CUDA a second table: ours on each backend (``auto`` vs ``reference``), where they differ.

Per row: forward (eval, ``no_grad``) and forward+backward (train mode, loss = mean square of the output, backward
into the temporal parameters) seconds per step (median of ``--steps`` after ``--warmup``), peak memory on CUDA
(``torch.cuda.max_memory_allocated``, reset per phase; on the CPU the process's peak RSS is printed once, see
:class:`PeakMemory`), and the largest difference of outputs and temporal gradients from upstream eager.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from . import backend

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}
DEVICES = ('auto', 'cpu', 'cuda')
BACKENDS = (('auto', 'auto'), ('reference', 'reference'))      # (row label, use_backend name)
# KarrasUnet's default: three spatial downsamples, and MPLumiere pairs each with a temporal one, so both the frame
# size and the number of frames must be multiples of 2 ** 3
NUM_DOWNSAMPLES = 3
FACTOR = 2 ** NUM_DOWNSAMPLES
NUM_CLASSES = 1000
INSTALL_HINT = "pip install 'lumiere-fast[karras]'"


# ---------------------------------------------------------------------------------------------- options

def _int_at_least(lowest: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {what}, got {text!r}') from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f'expected {what}, got {value}')
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    positive = _int_at_least(1, 'a positive integer')
    parser = argparse.ArgumentParser(
        prog='lumiere-fast',
        description='Run the lumiere-pytorch README model (KarrasUnet inflated with MPLumiere) with lumiere_fast and '
                    'with upstream lumiere-pytorch on the same weights and inputs; print seconds per step (forward, '
                    'forward+backward), peak memory and the largest difference of outputs and gradients from upstream.',
        epilog='The README example as written: --image-size 256 --batch 2 --frames 8 (slow on a CPU).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument('--image-size', type=positive, default=64,
                        help=f'frame height and width; a multiple of {FACTOR} (the KarrasUnet downsamples 2x '
                             f'{NUM_DOWNSAMPLES} times)')
    parser.add_argument('--frames', type=positive, default=8,
                        help=f'frames per video; a multiple of {FACTOR} ({NUM_DOWNSAMPLES} temporal downsamples)')
    parser.add_argument('--batch', type=positive, default=1, help='videos per batch')
    parser.add_argument('--dim', type=positive, default=8, help='KarrasUnet base width')
    parser.add_argument('--steps', type=positive, default=5, help='timed steps per phase (the median is reported)')
    parser.add_argument('--warmup', type=_int_at_least(0, 'a non-negative integer'), default=1,
                        help='untimed steps before the timed ones, per phase')
    parser.add_argument('--dtype', choices=tuple(DTYPES), default='float32',
                        help='bfloat16/float16 run under torch.autocast (weights stay float32); float16 needs CUDA')
    parser.add_argument('--device', choices=DEVICES, default='auto', help='auto = cuda if available, else cpu')
    parser.add_argument('--threads', type=positive, default=None,
                        help=f"CPU threads for torch; None = torch's choice ({torch.get_num_threads()} here). 1 is steadier "
                             f'on a machine other work keeps busy')
    parser.add_argument('--seed', type=int, default=0, help='seed for the model weights, the inputs and dropout')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')
    return parser


def _check_args(parser: argparse.ArgumentParser, args) -> torch.device:
    """Cross-option checks argparse cannot express; returns the resolved device."""
    if args.image_size % FACTOR:
        parser.error(f'--image-size: expected a multiple of {FACTOR} (2 ** {NUM_DOWNSAMPLES} spatial downsamples '
                     f'of the KarrasUnet), got {args.image_size}')
    if args.frames % FACTOR:
        parser.error(f'--frames: expected a multiple of {FACTOR} (2 ** {NUM_DOWNSAMPLES} temporal downsamples), '
                     f'got {args.frames}')
    cuda = torch.cuda.is_available()
    if args.device == 'cuda' and not cuda:
        parser.error(f'--device cuda: expected a CUDA device, got none (torch {torch.__version__}, '
                     f'torch.cuda.is_available() is False); use --device cpu or auto')
    device = torch.device('cuda' if args.device == 'cuda' or (args.device == 'auto' and cuda) else 'cpu')
    if device.type == 'cpu' and args.dtype == 'float16':
        parser.error('--dtype float16: expected float32 or bfloat16 on the CPU (float16 autocast needs CUDA), '
                     f'got float16 on device {device.type} (--device {args.device})')
    return device


# ---------------------------------------------------------------------------------------------- measuring

def _sync(device: torch.device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one phase, as text: ``torch.cuda.max_memory_allocated`` after a reset on CUDA (absolute,
    the model included). On the CPU there is no honest per-phase number: the process keeps memory the allocator
    freed, so whichever backend runs second would look nearly free (measured: +218 MiB vs +7 MiB peak-RSS growth
    for the same code); the whole run's peak RSS is printed once instead (:func:`_process_peak_rss`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.text = 'n/a (CPU)'

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        if self.device.type == 'cuda':
            self.text = f'{torch.cuda.max_memory_allocated(self.device) / 2 ** 20:.1f} MiB'
        return False


def _process_peak_rss() -> str:
    try:
        import resource
    except ImportError:                         # not on Windows
        return 'n/a'
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == 'darwin' else peak * 1024       # bytes on macOS, KiB on Linux
    return f'{peak_bytes / 2 ** 20:.0f} MiB'


def _kernel_summary(tally: dict) -> str:
    on_kernels = sum('triton' in used for used in tally.values())
    return f'{on_kernels}/{len(tally)}'


# ---------------------------------------------------------------------------------------------- running

def _build(args):
    """The README model, wrapped by us and by upstream on the same weights; built on the CPU from the seed, so the
    weights do not depend on the device. Returns ``(ours, upstream)``."""
    from denoising_diffusion_pytorch import KarrasUnet

    from .lumiere import MPLumiere, karras_unet_inflation_points

    torch.manual_seed(args.seed)
    unet = KarrasUnet(image_size=args.image_size, dim=args.dim, channels=3, dim_max=768, num_classes=NUM_CLASSES,
                      num_downsamples=NUM_DOWNSAMPLES, dropout=0.)
    ours = MPLumiere(unet, image_size=args.image_size)
    # a fresh model's output Gain and the temporal blocks' gains are zero: its output would be zero and every
    # gradient but the gains' too, so the comparison would prove nothing. Move them off their init (seeded).
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.add_(torch.randn_like(p) * 0.1 * (p.std() if p.numel() > 1 and p.std() > 0 else 1.))
        for name, p in ours.model.named_parameters():
            if name.endswith('gain'):
                p.fill_(0.7)
    return ours, _upstream_twin(unet, ours, karras_unet_inflation_points(unet), args.image_size)


def _upstream_twin(unet, ours, points, image_size):
    """Upstream's MPLumiere at the same inflation points, with our state dict. Its init dry runs call the unet
    without class labels, which a class-conditional KarrasUnet refuses: a pre-hook hands them in during init."""
    import lumiere_pytorch

    def add_labels(module, args, kwargs):
        if 'class_labels' not in kwargs:
            kwargs = dict(kwargs, class_labels=torch.zeros(args[0].shape[0], dtype=torch.long, device=args[0].device))
        return args, kwargs

    handle = unet.register_forward_pre_hook(add_labels, with_kwargs=True)
    try:
        up = lumiere_pytorch.MPLumiere(unet, image_size=image_size, unet_time_kwarg='time',
                                       conv_module_names=points['conv'], attn_module_names=points['attn'],
                                       downsample_module_names=points['downsample'],
                                       upsample_module_names=points['upsample'])
    finally:
        handle.remove()
    for m in up.model.modules():                 # the deep copy took the init-only hook along
        for key, fn in list(m._forward_pre_hooks.items()):
            if fn is add_labels:
                del m._forward_pre_hooks[key]
    up.load_state_dict(ours.state_dict(), strict=True)
    return up


def _inputs(args, device):
    """video b c t h w, time b, class_labels b, from their own generator so they do not depend on the model."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    video = torch.randn(args.batch, 3, args.frames, args.image_size, args.image_size, generator=gen)
    time_ = torch.ones(args.batch)                        # the README's time
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), generator=gen)
    return video.to(device), time_.to(device), labels.to(device)


def _run(template, name, args, device, inputs, bar, compile_=False):
    """Both phases for one model (a fresh copy of ``template``) on backend ``name``. Returns times, memory, output,
    gradients."""
    video, time_, labels = inputs
    model = copy.deepcopy(template).to(device)
    params = list(model.parameters())
    call = torch.compile(model) if compile_ else model
    autocast = (torch.autocast(device.type, dtype=DTYPES[args.dtype]) if args.dtype != 'float32'
                else nullcontext())
    result = dict(fwd=[], fwdbwd=[])
    with backend.use_backend(name), backend.record_choices() as tally:
        model.eval()
        with torch.no_grad(), PeakMemory(device) as mem:
            for i in range(args.warmup + args.steps):
                _sync(device)
                start = time.perf_counter()
                with autocast:
                    out = call(video, time=time_, class_labels=labels)
                _sync(device)
                if i >= args.warmup:
                    result['fwd'].append(time.perf_counter() - start)
                if i == 0:
                    result['output'] = out.float().cpu()
                del out
                bar.update(1)
        result['fwd_mem'] = mem.text

        model.train()
        torch.manual_seed(args.seed + 2)                # the same dropout masks for both backends
        with PeakMemory(device) as mem:
            for i in range(args.warmup + args.steps):
                for p in params:
                    p.grad = None
                _sync(device)
                start = time.perf_counter()
                with autocast:
                    out = call(video, time=time_, class_labels=labels)
                loss = out.float().pow(2).mean()
                loss.backward()
                _sync(device)
                if i >= args.warmup:
                    result['fwdbwd'].append(time.perf_counter() - start)
                if i == 0:
                    result['grads'] = [p.grad.float().cpu() if p.grad is not None else torch.zeros(p.shape)
                                       for p in params]
                del out, loss
                bar.update(1)
        result['fwdbwd_mem'] = mem.text
    result['kernels'] = _kernel_summary(tally)
    del model, call
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return result


def _max_abs_diff(a, b) -> float:
    if isinstance(a, list):
        return max((_max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _table(headers, rows) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = lambda cells: ' | '.join(str(c).ljust(w) if i == 0 else str(c).rjust(w)   # noqa: E731
                                    for i, (c, w) in enumerate(zip(cells, widths)))
    return '\n'.join([line(headers), '-+-'.join('-' * w for w in widths), *map(line, rows)])


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    device = _check_args(parser, args)
    try:
        import denoising_diffusion_pytorch  # noqa: F401
    except ImportError as err:
        parser.exit(2, f'{parser.prog}: error: the README model needs denoising-diffusion-pytorch ({err}); '
                       f'install it with: {INSTALL_HINT}\n')
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        return _main(parser, args, device)
    finally:
        torch.set_num_threads(threads)        # main() may run in-process (tests, notebooks): leave torch as found


def _main(parser: argparse.ArgumentParser, args, device: torch.device) -> int:
    from tqdm.auto import tqdm

    try:
        ours, upstream = _build(args)
    except ImportError as err:
        parser.exit(2, f'{parser.prog}: error: the comparison needs lumiere-pytorch ({err}); install it with: '
                       f'{INSTALL_HINT}\n')
    except (AssertionError, ValueError, TypeError, RuntimeError) as err:
        parser.error(f'could not build KarrasUnet(image_size={args.image_size}, dim={args.dim}) inflated with '
                     f'MPLumiere: {type(err).__name__}: {err}')
    inputs = _inputs(args, device)

    where = (f'{device.type} ({torch.cuda.get_device_name(device)})' if device.type == 'cuda'
             else f'cpu ({torch.get_num_threads()} threads)')
    precision = 'float32' if args.dtype == 'float32' else f'{args.dtype} (torch.autocast, float32 weights)'
    n_temporal = sum(p.numel() for p in ours.parameters())
    print(f'device {where} | dtype {precision} | torch {torch.__version__} | video {tuple(inputs[0].shape)} '
          f'| time {tuple(inputs[1].shape)} | class_labels {tuple(inputs[2].shape)}')
    print(f'model: MPLumiere(KarrasUnet(image_size={args.image_size}, dim={args.dim}, channels=3, dim_max=768, '
          f'num_classes={NUM_CLASSES}, dropout=0)), {n_temporal:,} temporal parameters; lumiere_fast vs '
          f'lumiere-pytorch on the same state dict and inputs')
    sys.stdout.flush()

    cuda = device.type == 'cuda'
    runs = [('lumiere_fast', ours, 'auto', False), ('lumiere-pytorch', upstream, 'reference', False)]
    if cuda:
        runs.append(('lumiere-pytorch compiled', upstream, 'reference', True))
        runs.append(('lumiere_fast reference', ours, 'reference', False))
    results = {}
    with tqdm(total=len(runs) * 2 * (args.warmup + args.steps), desc='lumiere-fast', unit='step',
              disable=args.no_progress, file=sys.stderr) as bar:
        for label, template, name, compile_ in runs:
            bar.set_postfix_str(label)
            results[label] = _run(template, name, args, device, inputs, bar, compile_)

    ref = results['lumiere-pytorch']
    headers = ('implementation', 'forward s/step', 'fwd+bwd s/step', 'fwd peak mem', 'fwd+bwd peak mem',
               'max abs diff output', 'max abs diff grads', 'ops on kernels')

    def row(label):
        r = results[label]
        kernels = r['kernels'] if label.startswith('lumiere_fast') else '-'
        return (label, f'{statistics.median(r["fwd"]):.4f}', f'{statistics.median(r["fwdbwd"]):.4f}', r['fwd_mem'],
                r['fwdbwd_mem'], f'{_max_abs_diff(r["output"], ref["output"]):.3e}',
                f'{_max_abs_diff(r["grads"], ref["grads"]):.3e}', kernels)

    print()
    print(_table(headers, [row(label) for label, *_ in runs if label != 'lumiere_fast reference']))
    if cuda:
        print('\nlumiere_fast on each backend (auto: a Triton kernel for each op that has one; reference: PyTorch):')
        print(_table(headers, [row('lumiere_fast'), row('lumiere_fast reference')]))
    print()
    fast = results['lumiere_fast']
    for what, key in (('forward output (eval, no_grad)', 'output'),
                      ('temporal-parameter gradients (first fwd+bwd step)', 'grads')):
        print(f'max abs diff lumiere_fast vs lumiere-pytorch, {what}: {_max_abs_diff(fast[key], ref[key]):.3e}')
    print('speed-up vs lumiere-pytorch eager: forward '
          f'{statistics.median(ref["fwd"]) / statistics.median(fast["fwd"]):.2f}x, fwd+bwd '
          f'{statistics.median(ref["fwdbwd"]) / statistics.median(fast["fwdbwd"]):.2f}x')
    if not cuda:
        print('lumiere-pytorch compiled: CUDA only (not run on the CPU)')
    memory_note = ('torch.cuda.max_memory_allocated, reset per phase (model and inputs included)' if cuda else
                   f'n/a on the CPU (the process keeps memory it freed, so per-row peaks in one process are not '
                   f'comparable); peak RSS of the whole run: {_process_peak_rss()} (getrusage)')
    print(f's/step: median of {args.steps} timed step(s) after {args.warmup} warm-up step(s), per phase; forward = '
          f'eval + no_grad, fwd+bwd = train mode, loss = mean(output ** 2)')
    print(f'peak mem: {memory_note}')
    print('ops on kernels: lumiere_fast ops that ran a Triton kernel / ops called (lumiere_fast.backend.choose)')
    diffs = [_max_abs_diff(fast[k], ref[k]) for k in ('output', 'grads')]
    if not all(math.isfinite(d) for d in diffs):
        print('warning: a difference is not finite (nan/inf in an output or gradient)', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
