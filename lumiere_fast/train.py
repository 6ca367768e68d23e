"""``python -m lumiere_fast.train``: train the temporal layers of a Lumiere video model on a frozen ``KarrasUnet``.

The objective is EDM's (Karras et al. 2022, "Elucidating the design space of diffusion-based generative
models"), as denoising-diffusion-pytorch's ``ElucidatedDiffusion`` uses it for images: preconditioning
``D(x; s) = c_skip(s) x + c_out(s) F(c_in(s) x; c_noise(s))`` with sigma_data 0.5, log-normal noise levels
(P_mean -1.2, P_std 1.2), loss weight ``(s^2 + sd^2) / (s sd)^2``, one noise level per clip. Sampling is EDM's
deterministic Heun sampler (algorithm 1 of the paper, few steps).

Runs as one process, or under ``torchrun`` with DDP (default) or FSDP2 (``--fsdp``: ``fully_shard`` on each
temporal module, optionally on the frozen image model's blocks). Checkpoints are written with
``torch.distributed.checkpoint`` (temporal weights, optimizer, step), so a run resumes on any world size; a
plain ``temporal.pt`` (``lumiere.temporal_state_dict()``) sits beside it for inference.

Every random draw of a training step is keyed by the sample's global position in the run (``seed``, step,
index in the global batch), not by a process's RNG: the data order, the clip crop, the noise level and the
noise of a sample are the same whatever the world size, so N ranks of batch b compute what one process of
batch N*b computes (the tests hold DDP and FSDP2 to that).

Without ``--image-model``, a first stage fits the image model itself to single frames of the data with the same
EDM loss (``--image-pretrain-steps``; a fresh ``KarrasUnet`` has a zero output gain, so its output would not
depend on any temporal layer), saves it as ``image_model.pt`` and freezes it. The frozen image model runs in
eval mode (no dropout, no in-place weight renormalisation of its MP layers: it stays bit-for-bit frozen).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------- arguments

IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')
GIF_EXTS = ('.gif',)
VIDEO_EXTS = ('.mp4', '.webm', '.mkv', '.avi', '.mov', '.m4v')


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m lumiere_fast.train',
        description='Train the temporal layers of MPLumiere/Lumiere around a frozen KarrasUnet with the EDM objective '
                    '(one process, or torchrun: DDP by default, FSDP2 with --fsdp).',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('data')
    g.add_argument('--data', default='synthetic',
                   help="'synthetic' (moving squares and circles, generated from --seed, no download) or a folder: "
                        'each sub-folder of frames (png/jpg/...) is a clip, each .gif is a clip, other video files '
                        '(.mp4, .webm, ...) need torchcodec or PyAV installed')
    g.add_argument('--num-clips', type=int, default=4096, help='size of the synthetic data set')
    g.add_argument('--frames', type=int, default=8, help='frames per training clip (divisible by 2**num-downsamples)')
    g.add_argument('--frame-stride', type=int, default=1, help='take every n-th frame of a folder clip')
    g.add_argument('--num-workers', type=int, default=0, help='DataLoader workers per process')
    g = p.add_argument_group('image model (KarrasUnet, frozen)')
    g.add_argument('--image-model', default=None,
                   help='pretrained image model: a KarrasUnet state dict, an ElucidatedDiffusion state dict (net.*), '
                        "a denoising-diffusion-pytorch Trainer checkpoint ({'model': ...}) or a previous run's "
                        'image_model.pt; its architecture flags must match')
    g.add_argument('--image-pretrain-steps', type=int, default=200,
                   help='without --image-model: steps fitting the image model to single frames first (EDM loss)')
    g.add_argument('--image-lr', type=float, default=2e-3, help='learning rate of the image pretraining stage')
    g.add_argument('--image-size', type=int, default=16, help='frame height and width (KarrasUnet image_size)')
    g.add_argument('--channels', type=int, default=3, help='image channels (1: grayscale, 3: RGB)')
    g.add_argument('--dim', type=int, default=8, help='KarrasUnet dim')
    g.add_argument('--dim-max', type=int, default=32, help='KarrasUnet dim_max')
    g.add_argument('--num-downsamples', type=int, default=2, help='KarrasUnet num_downsamples')
    g.add_argument('--num-blocks-per-stage', type=int, default=1, help='KarrasUnet num_blocks_per_stage')
    g.add_argument('--attn-res', type=int, nargs='*', default=[4], help='KarrasUnet attn_res')
    g.add_argument('--attn-dim-head', type=int, default=64, help='KarrasUnet attn_dim_head')
    g.add_argument('--num-classes', type=int, default=None,
                   help='class-conditional KarrasUnet: synthetic clips are labelled by their first shape '
                        '(square 0, circle 1, modulo this), folder clips get --class-label')
    g.add_argument('--class-label', type=int, default=0, help='label of folder clips and of samples')
    g = p.add_argument_group('video model (the temporal layers that train)')
    g.add_argument('--arch', choices=('mp', 'plain'), default='mp', help='MPLumiere or Lumiere')
    g.add_argument('--identity-init', action=argparse.BooleanOptionalAction, default=True,
                   help='MP conv/attention blocks start as exact identities (MPLumiere identity_init)')
    g.add_argument('--heads', type=int, default=4, help='temporal attention heads')
    g.add_argument('--dim-head', type=int, default=8, help='temporal attention head size')
    g.add_argument('--checkpoint-temporal', action='store_true',
                   help='activation checkpointing of every temporal module (Lumiere checkpoint_temporal)')
    g.add_argument('--compile', action='store_true',
                   help='lumiere.compile() (torch.compile, one graph for all batch sizes)')
    g.add_argument('--compile-backend', default='inductor',
                   help="torch.compile backend for --compile ('aot_eager' traces without code generation)")
    g = p.add_argument_group('optimisation')
    g.add_argument('--steps', type=int, default=300, help='temporal training steps (total, resume included)')
    g.add_argument('--batch-size', type=int, default=4, help='clips per process and step (global: times world size)')
    g.add_argument('--lr', type=float, default=1e-3, help='AdamW learning rate of the temporal layers')
    g.add_argument('--weight-decay', type=float, default=0.0, help='AdamW weight decay')
    g.add_argument('--betas', type=float, nargs=2, default=(0.9, 0.99), help='AdamW betas')
    g.add_argument('--warmup-steps', type=int, default=0, help='linear learning-rate warm-up')
    g.add_argument('--grad-clip', type=float, default=0.0, help='clip the global gradient norm (0: off)')
    g.add_argument('--precision', choices=('auto', 'fp32', 'bf16'), default='auto',
                   help='auto: bf16 autocast on CUDA, fp32 on CPU')
    g.add_argument('--seed', type=int, default=0, help='seeds the data, the noise, the initialisation and the samples')
    g.add_argument('--deterministic', action='store_true',
                   help='torch.use_deterministic_algorithms(True), no cuDNN autotuning, seeded everything: a rerun '
                        'gives bit-identical weights (ops without a deterministic version raise)')
    g = p.add_argument_group('EDM')
    g.add_argument('--sigma-data', type=float, default=0.5, help='EDM sigma_data (standard deviation of the data)')
    g.add_argument('--p-mean', type=float, default=-1.2, help='mean of log(sigma) of the training noise levels')
    g.add_argument('--p-std', type=float, default=1.2,
                   help='standard deviation of log(sigma) of the training noise levels')
    g.add_argument('--sigma-min', type=float, default=0.002, help='smallest noise level of the sampler')
    g.add_argument('--sigma-max', type=float, default=80.0, help='noise level the sampler starts from')
    g.add_argument('--rho', type=float, default=7.0, help='spacing exponent of the sampler\'s noise levels (EDM rho)')
    g = p.add_argument_group('distributed')
    g.add_argument('--fsdp', action='store_true', help='FSDP2 fully_shard of the temporal modules instead of DDP')
    g.add_argument('--fsdp-image-model', action='store_true',
                   help='with --fsdp: also shard the frozen image model (per encoder/decoder block)')
    g.add_argument('--device', default=None, help='default: cuda (this rank\'s GPU) if available, else cpu')
    g = p.add_argument_group('output')
    g.add_argument('--out', default='lumiere_run', help='output folder: checkpoint/, temporal.pt, samples, log.jsonl')
    g.add_argument('--resume', default='auto',
                   help="'auto' (the out folder's checkpoint/ if there is one), 'none', or a checkpoint folder")
    g.add_argument('--save-every', type=int, default=100, help='checkpoint every n steps (and at the end)')
    g.add_argument('--sample-every', type=int, default=100, help='write samples every n steps (0: only at the end)')
    g.add_argument('--sample-steps', type=int, default=8, help='Heun sampler steps')
    g.add_argument('--num-samples', type=int, default=4, help='videos per sample GIF (0: no samples)')
    g.add_argument('--fps', type=float, default=8.0, help='GIF frame rate')
    g.add_argument('--log-every', type=int, default=10, help='log the rank-averaged loss every n steps')
    g.add_argument('--eval-clips', type=int, default=8,
                   help='a fixed held-out batch whose EDM loss (fixed noise levels) is logged at the start and at '
                        'the end (0: none)')
    g.add_argument('--no-progress', action='store_true', help='no tqdm bar')
    return p


# ---------------------------------------------------------------------------------------------- randomness

def _key(seed: int, *parts: int) -> int:
    """A 63-bit generator seed from (seed, parts...), so each sample's draws depend on its position only."""
    h = (seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) % (1 << 64)
    for x in parts:
        h = ((h ^ (x + 0x9E3779B9)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % (1 << 64)
        h ^= h >> 31
    return h % (1 << 63)


def generator(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(_key(seed, *parts))


# ---------------------------------------------------------------------------------------------- data

class MovingShapes(torch.utils.data.Dataset):
    """Synthetic clips: 1-3 squares or circles of random colour moving at constant velocity, bouncing off the
    borders, on a dark background. Clip ``i`` is a pure function of (seed, i). Item: (clip c t h w in [-1, 1],
    label = kind of its first shape, 0 square / 1 circle)."""

    def __init__(self, num_clips: int, frames: int, image_size: int, channels: int = 3, seed: int = 0):
        self.num_clips, self.frames, self.size, self.channels, self.seed = num_clips, frames, image_size, channels, seed

    def __len__(self):
        return self.num_clips

    def clip(self, index: int, g: torch.Generator | None = None):
        """Clip ``index``; ``g`` (the per-position generator of a folder clip's crop) is not needed here."""
        g = generator(self.seed, 1, index)
        s, t = self.size, self.frames
        n = int(torch.randint(1, 4, (), generator=g))
        kind = torch.randint(0, 2, (n,), generator=g)
        radius = (0.12 + 0.13 * torch.rand(n, generator=g)) * s
        pos = radius[:, None] + torch.rand(n, 2, generator=g) * (s - 2 * radius[:, None])
        vel = (torch.rand(n, 2, generator=g) * 2 - 1) * s * 0.08
        color = torch.rand(n, self.channels, generator=g) * 1.6 - 0.6
        # positions over time, reflected at the borders: a triangle wave over [r, s - r]
        steps = torch.arange(t, dtype=torch.float32)[:, None, None]
        lo, span = radius[None, :, None], (s - 2 * radius)[None, :, None]
        raw = pos[None] - lo + vel[None] * steps                                  # t n 2
        period = 2 * span
        m = torch.remainder(raw, period)
        centre = lo + torch.where(m > span, period - m, m)                         # t n 2 (y, x)
        coords = torch.arange(s, dtype=torch.float32) + 0.5
        dy = coords[None, None, :, None] - centre[..., 0, None, None]             # t n h 1
        dx = coords[None, None, None, :] - centre[..., 1, None, None]             # t n 1 w
        r = radius[None, :, None, None]
        square = torch.maximum(dy.abs(), dx.abs()) <= r * 0.85
        circle = dy ** 2 + dx ** 2 <= r ** 2
        masks = torch.where(kind[None, :, None, None].bool(), circle, square).float()   # t n h w
        video = torch.full((self.channels, t, s, s), -0.8)
        for j in range(n):                                                        # later shapes on top
            mj = masks[:, j][None]                                                # 1 t h w
            video = video * (1 - mj) + color[j][:, None, None, None] * mj
        return video.clamp(-1, 1), int(kind[0])

    def __getitem__(self, index):
        return self.clip(index)


def _list_clips(root: Path, frames_needed: int):
    clips = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        d = Path(dirpath)
        images = sorted(f for f in filenames if f.lower().endswith(IMAGE_EXTS))
        if len(images) >= frames_needed:
            clips.append(('frames', [d / f for f in images]))
        for f in sorted(filenames):
            if f.lower().endswith(GIF_EXTS):
                clips.append(('gif', d / f))
            elif f.lower().endswith(VIDEO_EXTS):
                clips.append(('video', d / f))
    return clips


def _decode_video(path: Path) -> Tensor:
    """t c h w uint8 of a video file, with whichever decoder is installed (torchcodec, then PyAV)."""
    try:
        from torchcodec.decoders import VideoDecoder
        return VideoDecoder(str(path))[:]
    except ImportError:
        pass
    try:
        import av
    except ImportError:
        raise RuntimeError(f'lumiere_fast.train: cannot decode {path}: install torchcodec or PyAV (pip install av), '
                           f'or convert it to a folder of frames or a .gif') from None
    import numpy as np
    with av.open(str(path)) as container:
        frames = [torch.from_numpy(np.asarray(f.to_ndarray(format='rgb24'))) for f in container.decode(video=0)]
    return torch.stack(frames).permute(0, 3, 1, 2)


class VideoFolder(torch.utils.data.Dataset):
    """Clips from a folder: each sub-folder holding at least ``frames`` images (sorted by name) is one clip, each
    .gif is one, and other video files are decoded with torchcodec or PyAV when installed. A random window of
    ``frames`` frames (every ``stride``-th) is taken per item, frames resized (shorter side) and centre-cropped to
    ``image_size``; values in [-1, 1]."""

    def __init__(self, root, frames: int, image_size: int, channels: int = 3, stride: int = 1, label: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"lumiere_fast.train: --data expected 'synthetic' or a folder, got {str(root)!r}")
        self.frames, self.size, self.channels, self.stride, self.label = frames, image_size, channels, stride, label
        self.clips = _list_clips(self.root, (frames - 1) * stride + 1)
        if not self.clips:
            raise ValueError(f'lumiere_fast.train: no clips under {self.root} (folders of >= '
                             f'{(frames - 1) * stride + 1} images, .gif or video files)')

    def __len__(self):
        return len(self.clips)

    def _to_tensor(self, img) -> Tensor:
        from PIL import Image
        img = img.convert('L' if self.channels == 1 else 'RGB')
        w, h = img.size
        scale = self.size / min(w, h)
        img = img.resize((max(self.size, round(w * scale)), max(self.size, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(self.size, self.size, -1)
        return x.permute(2, 0, 1)

    def _window(self, count: int, g: torch.Generator) -> list[int]:
        span = (self.frames - 1) * self.stride + 1
        if count < span:
            raise ValueError(f'lumiere_fast.train: a clip of {count} frames is shorter than --frames {self.frames} '
                             f'x --frame-stride {self.stride}')
        start = int(torch.randint(0, count - span + 1, (), generator=g))
        return list(range(start, start + span, self.stride))

    def clip(self, index: int, g: torch.Generator):
        from PIL import Image
        kind, src = self.clips[index]
        if kind == 'frames':
            frames = [self._to_tensor(Image.open(src[i])) for i in self._window(len(src), g)]
        elif kind == 'gif':
            with Image.open(src) as im:
                idx = self._window(getattr(im, 'n_frames', 1), g)
                frames = []
                for i in idx:
                    im.seek(i)
                    frames.append(self._to_tensor(im))
        else:
            video = _decode_video(src)
            idx = self._window(video.shape[0], g)
            from PIL import Image as _I
            frames = [self._to_tensor(_I.fromarray(video[i].permute(1, 2, 0).numpy())) for i in idx]
        video = torch.stack(frames, dim=1).float() / 127.5 - 1                      # c t h w
        return video, self.label


@dataclass
class EDM:
    """EDM preconditioning, noise distribution, loss weight and Heun sampler (Karras et al. 2022, table 1)."""
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def c_skip(self, s):
        return self.sigma_data ** 2 / (s ** 2 + self.sigma_data ** 2)

    def c_out(self, s):
        return s * self.sigma_data * (s ** 2 + self.sigma_data ** 2) ** -0.5

    def c_in(self, s):
        return (s ** 2 + self.sigma_data ** 2) ** -0.5

    def c_noise(self, s):
        return s.clamp(min=1e-20).log() * 0.25

    def loss_weight(self, s):
        return (s ** 2 + self.sigma_data ** 2) * (s * self.sigma_data) ** -2

    def sigma_from_normal(self, z: Tensor) -> Tensor:
        """Log-normal noise levels from standard normal draws ``z``."""
        return (self.p_mean + self.p_std * z).exp()

    def denoise(self, net, x: Tensor, sigma: Tensor, **cond) -> Tensor:
        """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise); ``x`` b ..., ``sigma`` b."""
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        out = net(self.c_in(s) * x, time=self.c_noise(sigma), **cond)
        return self.c_skip(s) * x + self.c_out(s) * out.to(x.dtype)

    def loss(self, net, clean: Tensor, sigma: Tensor, noise: Tensor, **cond) -> Tensor:
        """Mean over the batch of the weighted per-sample MSE (``ElucidatedDiffusion.forward``)."""
        s = sigma.reshape(-1, *([1] * (clean.ndim - 1)))
        denoised = self.denoise(net, clean + s * noise, sigma, **cond)
        per_sample = (denoised.float() - clean.float()).pow(2).flatten(1).mean(1)
        return (per_sample * self.loss_weight(sigma.float())).mean()

    def schedule(self, steps: int, device=None) -> Tensor:
        """sigma_max ... sigma_min (``steps`` levels, rho spacing), then 0."""
        i = torch.arange(steps, dtype=torch.float64)
        inv = 1 / self.rho
        denom = max(steps - 1, 1)
        sig = (self.sigma_max ** inv + i / denom * (self.sigma_min ** inv - self.sigma_max ** inv)) ** self.rho
        return torch.cat([sig, sig.new_zeros(1)]).to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def sample(self, net, shape, steps: int, g: torch.Generator, device, **cond) -> Tensor:
        """Deterministic Heun sampler (EDM algorithm 1, S_churn 0) from sigma_max noise; values clamped to [-1, 1]."""
        sigmas = self.schedule(steps, device)
        x = torch.randn(shape, generator=g).to(device) * sigmas[0]
        b = shape[0]
        for i in range(steps):
            s, s_next = sigmas[i], sigmas[i + 1]
            d = (x - self.denoise(net, x, s.expand(b), **cond)) / s
            x_next = x + (s_next - s) * d
            if s_next > 0:                                           # second-order correction
                d2 = (x_next - self.denoise(net, x_next, s_next.expand(b), **cond)) / s_next
                x_next = x + (s_next - s) * 0.5 * (d + d2)
            x = x_next
        return x.clamp(-1, 1)


class StepDataset(torch.utils.data.Dataset):
    """Training items by global position ``p`` (step * global batch + rank * batch + j): the clip
    ``perm_epoch[p mod N]`` (epoch = p // N, a seeded permutation), its random crop, its noise level and noise, all
    keyed by ``p``: world-size independent."""

    def __init__(self, base, edm: EDM, seed: int, per_frame_sigma: bool = False):
        self.base, self.edm, self.seed, self.per_frame_sigma = base, edm, seed, per_frame_sigma
        self._perm = {}

    def __len__(self):
        return 1 << 62

    def index(self, p: int) -> int:
        n = len(self.base)
        epoch = p // n
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(n, generator=generator(self.seed, 2, epoch))}
        return int(self._perm[epoch][p % n])

    def __getitem__(self, p: int):
        g = generator(self.seed, 3, p)
        clip, label = self.base.clip(self.index(p), g)
        z = torch.randn(clip.shape[1] if self.per_frame_sigma else (), generator=g)
        noise = torch.randn(clip.shape, generator=g)
        return dict(clip=clip, label=label, sigma=self.edm.sigma_from_normal(z), noise=noise)


class StepSampler(torch.utils.data.Sampler):
    """The positions this rank trains on, step after step from ``start_step``."""

    def __init__(self, batch: int, rank: int, world: int, start_step: int = 0):
        self.batch, self.rank, self.world, self.start = batch, rank, world, start_step

    def __iter__(self):
        step = self.start
        while True:
            base = step * self.batch * self.world + self.rank * self.batch
            yield from range(base, base + self.batch)
            step += 1


def make_dataset(args):
    if args.data == 'synthetic':
        return MovingShapes(args.num_clips, args.frames, args.image_size, args.channels, args.seed)
    return VideoFolder(args.data, args.frames, args.image_size, args.channels, args.frame_stride, args.class_label)


def _loader(ds, batch, rank, world, start_step, workers):
    return iter(torch.utils.data.DataLoader(ds, batch_size=batch, sampler=StepSampler(batch, rank, world, start_step),
                                            num_workers=workers, persistent_workers=workers > 0))


# ---------------------------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device('cpu')

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None, need_group: bool = False) -> DistInfo:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) -> a process group: nccl on CUDA, gloo on CPU.
    ``need_group``: a group of one even in a single process (FSDP2's device mesh needs one)."""
    import torch.distributed as dist
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda':
        dev = torch.device('cuda', local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    backend = 'nccl' if dev.type == 'cuda' else 'gloo'
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if dev.type == 'cuda' else None)
    elif need_group and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(rank, world, local, dev)


def _all_mean(x: float, info: DistInfo) -> float:
    if not info.distributed:
        return x
    import torch.distributed as dist
    t = torch.tensor([x], dtype=torch.float64, device=info.device if info.device.type == 'cuda' else 'cpu')
    dist.all_reduce(t)
    return t.item() / info.world


def _barrier(info: DistInfo):
    if info.distributed:
        import torch.distributed as dist
        dist.barrier()


# ---------------------------------------------------------------------------------------------- models

def build_image_model(args) -> nn.Module:
    from denoising_diffusion_pytorch import KarrasUnet
    return KarrasUnet(image_size=args.image_size, dim=args.dim, dim_max=args.dim_max, channels=args.channels,
                      num_downsamples=args.num_downsamples, num_blocks_per_stage=args.num_blocks_per_stage,
                      attn_res=tuple(args.attn_res), attn_dim_head=args.attn_dim_head, num_classes=args.num_classes,
                      dropout=0.)


def image_state_dict_from_file(path) -> dict:
    """A KarrasUnet state dict from the checkpoint formats listed in ``--image-model``'s help."""
    sd = torch.load(path, map_location='cpu', weights_only=False)
    if isinstance(sd, nn.Module):
        sd = sd.state_dict()
    if isinstance(sd, dict) and 'model' in sd and isinstance(sd['model'], dict):
        sd = sd['model']
    if not isinstance(sd, dict):
        raise ValueError(f'lumiere_fast.train: {path}: expected a state dict, got {type(sd).__name__}')
    if any(k.startswith('net.') for k in sd):                      # ElucidatedDiffusion: the net's weights
        sd = {k[4:]: v for k, v in sd.items() if k.startswith('net.')}
    for prefix in ('module.', '_orig_mod.'):                       # DDP / torch.compile wrappers
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def build_lumiere(args, image_model: nn.Module) -> nn.Module:
    from . import Lumiere, MPLumiere
    if args.arch == 'mp':
        kw = dict(attn_inflation_kwargs=dict(heads=args.heads, dim_head=args.dim_head),
                  identity_init=args.identity_init)
        klass = MPLumiere
    else:
        kw = dict(attn_inflation_kwargs=dict(heads=args.heads, dim_head=args.dim_head))
        klass = Lumiere
    # no mock-video check at init: the first training step runs a real video through the same shapes
    return klass(image_model, image_size=args.image_size, channels=args.channels,
                 checkpoint_temporal=args.checkpoint_temporal, check_mock_video=False, **kw)


def mp_weight_layers(module: nn.Module) -> list[nn.Module]:
    """The MP weight layers (those that renormalise their stored weight in train mode) under ``module``."""
    return [m for m in module.modules() if callable(getattr(m, 'effective_weight', None))
            and isinstance(getattr(m, 'weight', None), Tensor) and hasattr(m, 'eps')]


def apply_fsdp(lumiere: nn.Module, info: DistInfo, shard_image_model: bool) -> list[nn.Parameter]:
    """FSDP2: one ``fully_shard`` group per temporal module, optionally one per image-model block, the root
    last. The frozen image model, when not sharded, is left out of FSDP (``ignored_params``): replicated.

    ``fully_shard`` rejects 0-dim parameters (the MP blocks' ``Gain``, kept 0-dim for upstream's state dicts):
    those stay replicated too. Returns the trainable ones, whose gradients the caller averages
    (:func:`average_replicated_grads`) since FSDP does not."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(info.device.type, (info.world,))
    scalars = {p for p in lumiere.model.parameters() if p.ndim == 0}
    scalars |= {p for p in lumiere.parameters() if p.ndim == 0}
    for m in lumiere.temporal_modules():
        fully_shard(m, mesh=mesh, ignored_params=scalars)
    ignored = set(scalars)
    if shard_image_model:
        unet = lumiere.model
        for name in ('downs', 'mids', 'ups'):
            for block in getattr(unet, name, []):
                fully_shard(block, mesh=mesh, ignored_params=scalars)
    else:
        ignored |= set(lumiere.model.parameters())
    fully_shard(lumiere, mesh=mesh, ignored_params=ignored)
    return [p for p in lumiere.parameters() if p in scalars]


def average_replicated_grads(params: list[nn.Parameter], info: DistInfo):
    """All-reduce (mean) the gradients of trainable parameters FSDP leaves replicated."""
    if not info.distributed or not params:
        return
    import torch.distributed as dist
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.stack([g.reshape(()) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world
    for p, g in zip(params, flat):
        p.grad = g.reshape(p.shape).clone()


def set_train_mode(lumiere: nn.Module):
    """Train mode for the temporal modules, eval mode for the frozen image model (no dropout, no in-place
    renormalisation of its MP weights)."""
    lumiere.train()
    lumiere.model.eval()


# ---------------------------------------------------------------------------------------------- checkpoints

def _temporal_only(sd: dict) -> dict:
    """Drop the frozen image model's ``model.*`` entries. (``StateDictOptions(ignore_frozen_params=True)`` cannot
    see them: it looks frozen parameters up in ``named_parameters()``, which a Lumiere limits to the temporal ones.)"""
    return {k: v for k, v in sd.items() if not k.startswith('model.')}


def _dcp_state(model: nn.Module, optim):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return dict(model=_temporal_only(get_model_state_dict(model)), optim=get_optimizer_state_dict(model, optim))


def save_checkpoint(folder: Path, model: nn.Module, optim, step: int, info: DistInfo):
    """DCP checkpoint of the temporal weights, the optimizer and the step; any world size can load it."""
    import torch.distributed.checkpoint as dcp
    state = _dcp_state(model, optim)
    state['step'] = torch.tensor(step)
    tmp = folder.with_name(folder.name + '.tmp')
    if info.main and tmp.exists():
        _rmtree(tmp)
    _barrier(info)
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp))
    _barrier(info)
    if info.main:
        if folder.exists():
            _rmtree(folder)
        tmp.rename(folder)
    _barrier(info)


def load_checkpoint(folder: Path, model: nn.Module, optim) -> int:
    """Load a :func:`save_checkpoint` folder (written by any world size) into this run's model and optimizer;
    returns its step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict
    state = _dcp_state(model, optim)
    state['step'] = torch.tensor(0)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(folder))
    result = set_model_state_dict(model, state['model'], options=StateDictOptions(strict=False))
    missing = [k for k in result.missing_keys if not k.startswith('model.')]
    if missing or result.unexpected_keys:
        raise ValueError(f'lumiere_fast.train: checkpoint {folder}: missing {missing}, unexpected '
                         f'{list(result.unexpected_keys)}')
    set_optimizer_state_dict(model, optim, state['optim'])
    return int(state['step'])


@contextmanager
def _single_process_quiet():
    """DCP warns that it assumes a single process when there is no process group: that is the intent here."""
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        yield


def full_temporal_state_dict(model: nn.Module) -> dict:
    """``temporal_state_dict()`` as full CPU tensors (gathered from the shards under FSDP2; every rank calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in _temporal_only(sd).items()}


def _rmtree(path: Path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- visuals

def _to_uint8(x: Tensor) -> Tensor:
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def save_videos(videos: Tensor, gif_path: Path, png_path: Path, fps: float = 8.0):
    """``videos`` b c t h w in [-1, 1] -> an animated GIF (the b videos side by side, t frames) and a PNG strip
    (one row per video, one column per frame)."""
    from PIL import Image
    v = _to_uint8(videos.detach().cpu())
    b, c, t, h, w = v.shape
    if c == 1:
        v = v.expand(b, 3, t, h, w)
    frames = v.permute(2, 3, 0, 4, 1).reshape(t, h, b * w, 3)                    # t h (b w) c
    images = [Image.fromarray(f.numpy()) for f in frames]
    images[0].save(gif_path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0,
                   optimize=False, disposal=1)
    strip = v.permute(0, 3, 2, 4, 1).reshape(b * h, t * w, 3)                     # (b h) (t w) c
    Image.fromarray(strip.numpy()).save(png_path)


# ---------------------------------------------------------------------------------------------- training

def _autocast(info: DistInfo, precision: str):
    if precision == 'bf16' or (precision == 'auto' and info.device.type == 'cuda'):
        return torch.autocast(info.device.type, dtype=torch.bfloat16)
    return nullcontext()


def _cond(batch_labels, args, device) -> dict:
    if args.num_classes is None:
        return {}
    return dict(class_labels=torch.as_tensor(batch_labels, device=device).long() % args.num_classes)


def set_determinism(args):
    torch.manual_seed(args.seed)
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def pretrain_image_model(unet: nn.Module, args, info: DistInfo, edm: EDM, log) -> None:
    """Fit the image model to single frames (EDM loss, per-frame noise levels), DDP across ranks."""
    ds = StepDataset(make_dataset(args), edm, args.seed + 7919, per_frame_sigma=True)
    it = _loader(ds, max(1, args.batch_size), info.rank, info.world, 0, args.num_workers)
    unet.train()
    net = unet
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(unet, device_ids=[info.device.index] if info.device.type == 'cuda' else None)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.image_lr, betas=tuple(args.betas))
    bar = _progress(args, info, args.image_pretrain_steps, 'image model')
    for step in range(args.image_pretrain_steps):
        b = next(it)
        clip = b['clip'].to(info.device)
        bsz, c, t, h, w = clip.shape
        images = clip.transpose(1, 2).reshape(bsz * t, c, h, w)
        noise = b['noise'].to(info.device).transpose(1, 2).reshape(bsz * t, c, h, w)
        sigma = b['sigma'].to(info.device).reshape(bsz * t)
        cond = _cond(torch.as_tensor(b['label']).repeat_interleave(t), args, info.device)
        with _autocast(info, args.precision):
            loss = edm.loss(net, images, sigma, noise, **cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f'{loss.item():.4f}')
        if (step + 1) % args.log_every == 0 or step + 1 == args.image_pretrain_steps:
            log(dict(stage='image', step=step + 1, loss=_all_mean(loss.item(), info)))
    if bar is not None:
        bar.close()
    unet.eval()


def _progress(args, info: DistInfo, total: int, desc: str, initial: int = 0):
    if args.no_progress or not info.main:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit='step', dynamic_ncols=True, file=sys.stderr)


def _lr_at(step: int, args) -> float:
    if args.warmup_steps > 0 and step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    return args.lr


def eval_loss(net, lumiere, ds_base, args, info: DistInfo, edm: EDM) -> float:
    """EDM loss of a fixed batch: clips past the training ones' seeds, noise levels at fixed quantiles of the
    training distribution, fixed noise; every rank computes the same number."""
    n = args.eval_clips
    if n <= 0:
        return float('nan')
    g = generator(args.seed, 4)
    clips, labels = [], []
    for i in range(n):
        if isinstance(ds_base, MovingShapes):
            c, l = MovingShapes(1 << 30, ds_base.frames, ds_base.size, ds_base.channels, args.seed + 1).clip(i)
        else:
            c, l = ds_base.clip(i % len(ds_base), generator(args.seed, 5, i))
        clips.append(c)
        labels.append(l)
    clean = torch.stack(clips).to(info.device)
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    sigma = edm.sigma_from_normal(torch.distributions.Normal(0., 1.).icdf(q).float()).to(info.device)
    noise = torch.randn(clean.shape, generator=g).to(info.device)
    was = lumiere.training
    lumiere.eval()
    try:
        with torch.no_grad(), _autocast(info, args.precision):
            loss = edm.loss(net, clean, sigma, noise, **_cond(labels, args, info.device))
    finally:
        if was:
            set_train_mode(lumiere)
    return float(loss)


def write_samples(net, lumiere, args, info: DistInfo, edm: EDM, out: Path, tag: str):
    """Heun-sample ``--num-samples`` videos (every rank runs the sampler: FSDP2 needs all of them in a forward;
    same noise everywhere), rank 0 writes ``<tag>.gif`` and ``<tag>.png``."""
    if args.num_samples <= 0:
        return None
    shape = (args.num_samples, args.channels, args.frames, args.image_size, args.image_size)
    cond = _cond([args.class_label] * args.num_samples, args, info.device)
    was = lumiere.training
    lumiere.eval()
    try:
        with _autocast(info, args.precision):
            videos = edm.sample(net, shape, args.sample_steps, generator(args.seed, 6), info.device, **cond)
    finally:
        if was:
            set_train_mode(lumiere)
    if info.main:
        save_videos(videos.float(), out / f'{tag}.gif', out / f'{tag}.png', args.fps)
    return videos


def train(args) -> dict:
    """The whole recipe; returns a summary (losses, paths). Called by ``main``; tests call it in-process."""
    info = init_distributed(args.device, need_group=args.fsdp)
    set_determinism(args)
    edm = EDM(args.sigma_data, args.p_mean, args.p_std, args.sigma_min, args.sigma_max, args.rho)
    out = Path(args.out)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
    _barrier(info)
    log_path = out / 'log.jsonl'

    began = time.perf_counter()

    def log(record: dict):
        if info.main:
            with open(log_path, 'a') as f:
                f.write(json.dumps(dict(record, seconds=round(time.perf_counter() - began, 3))) + '\n')

    if args.frames % (2 ** args.num_downsamples) and args.frames != 1:
        raise ValueError(f'lumiere_fast.train: --frames {args.frames} must divide by 2**--num-downsamples '
                         f'({2 ** args.num_downsamples})')
    if args.fsdp and not info.distributed and info.main:
        print('lumiere_fast.train: --fsdp in a single process: fully_shard over a world of 1', file=sys.stderr)

    # -- the frozen image model
    torch.manual_seed(args.seed)
    unet = build_image_model(args)
    own_image = out / 'image_model.pt'
    if args.image_model:
        unet.load_state_dict(image_state_dict_from_file(args.image_model))
    elif own_image.exists() and args.resume != 'none':
        unet.load_state_dict(image_state_dict_from_file(own_image))
    else:
        unet.to(info.device)
        if args.image_pretrain_steps > 0:
            pretrain_image_model(unet, args, info, edm, log)
        if info.main:
            torch.save(unet.state_dict(), own_image)
        _barrier(info)
    unet.to(info.device)

    # -- the video model (same seed on every rank: identical temporal init, which FSDP2 relies on)
    torch.manual_seed(args.seed + 1)
    lumiere = build_lumiere(args, unet).to(info.device)
    set_train_mode(lumiere)
    replicated = []
    if args.fsdp:
        # (the MP layers renormalise the sharded weights themselves: modules/mp_layers._fsdp_sharded_weight)
        replicated = apply_fsdp(lumiere, info, args.fsdp_image_model)
        net = lumiere
    elif info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        net = DDP(lumiere, device_ids=[info.device.index] if info.device.type == 'cuda' else None)
    else:
        net = lumiere
    if args.compile:
        lumiere.compile(backend=args.compile_backend)
    optim = torch.optim.AdamW(lumiere.parameters(), lr=args.lr, betas=tuple(args.betas),
                              weight_decay=args.weight_decay)

    # -- resume
    start = 0
    ckpt = out / 'checkpoint'
    if args.resume not in ('auto', 'none'):
        ckpt = Path(args.resume)
        if not ckpt.exists():
            raise ValueError(f'lumiere_fast.train: --resume {args.resume}: no such checkpoint folder')
    if args.resume != 'none' and ckpt.exists():
        start = load_checkpoint(ckpt, net, optim)
        if info.main:
            print(f'lumiere_fast.train: resumed from {ckpt} at step {start}', file=sys.stderr)

    ds_base = make_dataset(args)
    ds = StepDataset(ds_base, edm, args.seed)
    it = _loader(ds, args.batch_size, info.rank, info.world, start, args.num_workers)

    summary = dict(out=str(out), start_step=start, losses=[], world=info.world)
    summary['eval_loss_start'] = eval_loss(net, lumiere, ds_base, args, info, edm)
    log(dict(stage='eval', step=start, eval_loss=summary['eval_loss_start']))
    bar = _progress(args, info, args.steps, 'temporal layers', initial=start)
    smoothed, t0, step = None, time.perf_counter(), start
    for step in range(start, args.steps):
        batch = next(it)
        clip = batch['clip'].to(info.device, non_blocking=True)
        noise = batch['noise'].to(info.device, non_blocking=True)
        sigma = batch['sigma'].to(info.device, non_blocking=True)
        cond = _cond(batch['label'], args, info.device)
        for group in optim.param_groups:
            group['lr'] = _lr_at(step, args)
        with _autocast(info, args.precision):
            loss = edm.loss(net, clip, sigma, noise, **cond)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        average_replicated_grads(replicated, info)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(lumiere.parameters(), args.grad_clip)
        optim.step()
        value = loss.item()
        summary['losses'].append(value)
        smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f'{smoothed:.4f}')
        if done % args.log_every == 0 or done == args.steps:
            log(dict(stage='temporal', step=done, loss=_all_mean(value, info),
                     steps_per_s=(done - start) / (time.perf_counter() - t0)))
        if done % args.save_every == 0 and done != args.steps:
            save_checkpoint(ckpt, net, optim, done, info)
        if args.sample_every and done % args.sample_every == 0 and done != args.steps:
            write_samples(net, lumiere, args, info, edm, out, f'sample_{done:06d}')
    if bar is not None:
        bar.close()

    done = max(start, args.steps)
    save_checkpoint(ckpt, net, optim, done, info)
    temporal = full_temporal_state_dict(net)
    if info.main:
        torch.save(temporal, out / 'temporal.pt')
    summary['eval_loss_end'] = eval_loss(net, lumiere, ds_base, args, info, edm)
    log(dict(stage='eval', step=done, eval_loss=summary['eval_loss_end']))
    write_samples(net, lumiere, args, info, edm, out, 'sample')
    summary.update(step=done, checkpoint=str(ckpt), temporal=str(out / 'temporal.pt'), gif=str(out / 'sample.gif'),
                   png=str(out / 'sample.png'), temporal_state=temporal)
    if info.main:
        wrote = [ckpt, out / 'temporal.pt'] + ([out / 'sample.gif', out / 'sample.png'] if args.num_samples > 0 else [])
        held_out = (f"held-out loss {summary['eval_loss_start']:.4f} -> {summary['eval_loss_end']:.4f}; "
                    if args.eval_clips > 0 else '')
        print(f"lumiere_fast.train: step {done}: {held_out}wrote {', '.join(map(str, wrote))}", file=sys.stderr)
    return summary


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return train(args)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
