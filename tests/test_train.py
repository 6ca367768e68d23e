"""``python -m lumiere_fast.train`` in one process on CPU: the EDM pieces against denoising-diffusion-pytorch's
``ElucidatedDiffusion``, the data sets, the recipe end to end (loss falls, checkpoint, a GIF with the right frame
count), resume, and deterministic mode (two runs, bitwise-equal gradients and weights) on the reference backend.
The multi-rank tests are in test_distributed.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lumiere_fast import train

UNET = dict(image_size=16, dim=8, channels=3, dim_max=32, num_downsamples=2, num_blocks_per_stage=1, attn_res=(4,))
FAST = ['--frames', '4', '--log-every', '1', '--sample-steps', '2', '--num-samples', '2', '--eval-clips', '4',
        '--no-progress', '--save-every', '1000']


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv('LUMIERE_FAST_BACKEND', 'reference')
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope='module')
def image_model(tmp_path_factory) -> Path:
    """A fixed random KarrasUnet whose output gain is 1 (a fresh one outputs zero: no gradient would reach the
    temporal layers)."""
    from denoising_diffusion_pytorch import KarrasUnet
    torch.manual_seed(0)
    unet = KarrasUnet(**UNET, dropout=0.)
    with torch.no_grad():
        unet.output_block[1].gain.fill_(1.)
    path = tmp_path_factory.mktemp('image') / 'image.pt'
    torch.save(unet.state_dict(), path)
    return path


def _log(out) -> list[dict]:
    return [json.loads(line) for line in Path(out, 'log.jsonl').read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- the command line

def test_help_documents_every_flag(capsys):
    parser = train.build_parser()
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not undocumented
    with pytest.raises(SystemExit) as e:
        train.main(['--help'])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ('--fsdp', '--compile', '--checkpoint-temporal', '--deterministic', '--resume', '--image-model',
                 '--data', '--sample-steps'):
        assert flag in text


# ---------------------------------------------------------------------------------------------- EDM

class _Net(nn.Module):
    """A small deterministic image net taking (x, time) positionally or as ``time=``, as KarrasUnet does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.random_or_learned_sinusoidal_cond = True      # what ElucidatedDiffusion asserts on
        self.self_condition = False

    def forward(self, x, time, self_cond=None):
        return torch.tanh(self.conv(x)) * (1 + time.reshape(-1, 1, 1, 1))


def _elucidated(net):
    from denoising_diffusion_pytorch.elucidated_diffusion import ElucidatedDiffusion
    return ElucidatedDiffusion(net, image_size=8, channels=3, num_sample_steps=5, S_churn=0.)


def test_edm_preconditioning_and_loss_match_elucidated_diffusion():
    net = _Net()
    ref, edm = _elucidated(net), train.EDM()
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.3, 80.])
    for name in ('c_skip', 'c_out', 'c_in', 'c_noise', 'loss_weight'):
        torch.testing.assert_close(getattr(edm, name)(sigma), getattr(ref, name)(sigma), msg=name)
    torch.testing.assert_close(edm.schedule(5), ref.sample_schedule(5))
    images01 = torch.rand(5, 3, 8, 8)
    torch.manual_seed(11)
    expected = ref(images01, sigma=sigma)                  # draws its noise with randn_like
    torch.manual_seed(11)
    noise = torch.randn_like(images01)
    got = edm.loss(net, images01 * 2 - 1, sigma, noise)
    torch.testing.assert_close(got, expected)
    # the noise-level distribution: log-normal(P_mean, P_std)
    log_sigma = edm.sigma_from_normal(torch.randn(20000, generator=torch.Generator().manual_seed(0))).log()
    assert abs(log_sigma.mean() - edm.p_mean) < 0.05 and abs(log_sigma.std() - edm.p_std) < 0.05


def test_heun_sampler_matches_elucidated_diffusion():
    net = _Net()
    ref, edm = _elucidated(net), train.EDM()
    torch.manual_seed(5)
    expected = ref.sample(batch_size=2, num_sample_steps=5, clamp=False)      # in [0, 1]
    got = edm.sample(net, (2, 3, 8, 8), 5, torch.Generator().manual_seed(5), 'cpu')
    torch.testing.assert_close((got + 1) / 2, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- data

def test_moving_shapes_are_deterministic_and_move():
    ds = train.MovingShapes(16, frames=8, image_size=16, seed=3)
    a, la = ds[5]
    b, lb = train.MovingShapes(16, frames=8, image_size=16, seed=3)[5]
    assert torch.equal(a, b) and la == lb
    assert a.shape == (3, 8, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, ds[6][0])
    assert not torch.equal(a, train.MovingShapes(16, frames=8, image_size=16, seed=4)[5][0])
    moving = [(c[:, 1:] - c[:, :-1]).abs().sum() > 0 for c, _ in (ds[i] for i in range(8))]
    assert sum(moving) >= 6


def test_training_positions_do_not_depend_on_world_size():
    """Rank r of world w trains on the same global positions as one process with the whole batch."""
    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]
    whole = take(train.StepSampler(4, 0, 1, start_step=3), 8)          # steps 3 and 4
    r0 = take(train.StepSampler(2, 0, 2, start_step=3), 4)
    r1 = take(train.StepSampler(2, 1, 2, start_step=3), 4)
    assert whole == r0[:2] + r1[:2] + r0[2:] + r1[2:]
    ds = train.StepDataset(train.MovingShapes(5, 4, 16), train.EDM(), seed=0)
    first = ds[7]
    again = train.StepDataset(train.MovingShapes(5, 4, 16), train.EDM(), seed=0)[7]
    assert all(torch.equal(torch.as_tensor(first[k]), torch.as_tensor(again[k])) for k in first)
    epoch = sorted(ds.index(p) for p in range(5))
    assert epoch == list(range(5))                                  # each clip once per epoch


def _png_frames(folder: Path, n: int, size=(20, 12)):
    from PIL import Image
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new('RGB', size, (10 * i, 255 - 10 * i, 0)).save(folder / f'{i:03d}.png')


def test_video_folder_reads_frame_folders_and_gifs(tmp_path):
    from PIL import Image
    _png_frames(tmp_path / 'clip_a', 6)
    _png_frames(tmp_path / 'too_short', 2)
    gif = [Image.new('RGB', (16, 16), (0, 0, 40 * i)) for i in range(5)]
    gif[0].save(tmp_path / 'b.gif', save_all=True, append_images=gif[1:], duration=100, loop=0)
    ds = train.VideoFolder(tmp_path, frames=4, image_size=8)
    assert len(ds) == 2                                             # the 2-frame folder is skipped
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        clip, label = ds.clip(i, g)
        assert clip.shape == (3, 4, 8, 8) and label == 0
        assert clip.min() >= -1 and clip.max() <= 1
        assert not torch.equal(clip[:, 0], clip[:, -1])             # frames in order, not one repeated
    with pytest.raises(ValueError, match='no clips'):
        train.VideoFolder(tmp_path / 'too_short', frames=4, image_size=8)


def test_image_model_checkpoint_formats(tmp_path, image_model):
    sd = torch.load(image_model)
    formats = {'plain': sd, 'elucidated': {f'net.{k}': v for k, v in sd.items()},
               'trainer': {'model': {f'net.{k}': v for k, v in sd.items()}, 'step': 3},
               'ddp': {f'module.{k}': v for k, v in sd.items()}}
    for name, obj in formats.items():
        torch.save(obj, tmp_path / f'{name}.pt')
        got = train.image_state_dict_from_file(tmp_path / f'{name}.pt')
        assert got.keys() == sd.keys(), name


# ---------------------------------------------------------------------------------------------- the recipe

def test_cpu_recipe_trains_writes_checkpoint_and_gif(tmp_path):
    """No image model given: a short image stage, then the temporal layers; the held-out loss falls, a DCP
    checkpoint, temporal.pt and a sample GIF (frame count = --frames) and PNG strip are written."""
    from PIL import Image
    out = tmp_path / 'run'
    summary = train.main(['--out', str(out), '--image-pretrain-steps', '6', '--steps', '8', '--batch-size', '2',
                          '--lr', '5e-3', *FAST])
    assert summary['eval_loss_end'] < summary['eval_loss_start']
    stages = {r['stage'] for r in _log(out)}
    assert stages == {'image', 'temporal', 'eval'}
    assert (out / 'checkpoint' / '.metadata').is_file() and (out / 'image_model.pt').is_file()
    with Image.open(out / 'sample.gif') as gif:
        assert gif.n_frames == 4 and gif.size == (2 * 16, 16)            # 2 samples side by side
    with Image.open(out / 'sample.png') as strip:
        assert strip.size == (4 * 16, 2 * 16)                           # frames across, samples down
    # temporal.pt is lumiere.temporal_state_dict(): it loads strictly into a fresh wrapper of the same image model
    args = train.build_parser().parse_args(['--frames', '4'])
    unet = train.build_image_model(args)
    unet.load_state_dict(torch.load(out / 'image_model.pt'))
    fresh = train.build_lumiere(args, unet)
    fresh.load_temporal_state_dict(torch.load(out / 'temporal.pt'))
    trained = summary['temporal_state']
    assert all(torch.equal(fresh.temporal_state_dict()[k], trained[k]) for k in trained)


# ---------------------------------------------------------------------------------------------- deterministic mode

def _step_grads(image_model, checkpoint_temporal: bool, device='cpu'):
    """One deterministic-mode EDM step of MPLumiere on fixed data: the temporal gradients and updated weights."""
    extra = ['--deterministic'] + (['--checkpoint-temporal'] if checkpoint_temporal else [])
    args = train.build_parser().parse_args(['--frames', '4', '--batch-size', '2', *extra])
    train.set_determinism(args)
    assert torch.are_deterministic_algorithms_enabled()
    unet = train.build_image_model(args)
    unet.load_state_dict(torch.load(image_model))
    lumiere = train.build_lumiere(args, unet.to(device))
    train.set_train_mode(lumiere)
    ds = train.StepDataset(train.make_dataset(args), train.EDM(), args.seed)
    items = [ds[p] for p in range(2)]
    batch = {k: torch.stack([i[k] for i in items]).to(device) for k in ('clip', 'sigma', 'noise')}
    opt = torch.optim.AdamW(lumiere.parameters(), lr=1e-3)
    loss = train.EDM().loss(lumiere, batch['clip'], batch['sigma'], batch['noise'])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in lumiere.named_parameters()}
    opt.step()
    return grads, {k: v.clone() for k, v in lumiere.temporal_state_dict().items()}


_CUDA_DETERMINISM = pytest.mark.xfail(
    raises=RuntimeError, strict=False,
    reason="expected to pass, not yet run on a GPU (so not strict): the bilinear resizes no longer raise in backward "
           "- the fast image model's take ops.karras.resize2x's deterministic formulation (avg_pool2d; slices and "
           "sums), and F.interpolate itself (torch 2.11 and 2.14) routes deterministic CUDA calls to a decomposition; "
           "a RuntimeError left would be another op without a deterministic CUDA implementation")


@pytest.mark.parametrize('device', ['cpu', pytest.param('cuda', marks=[_CUDA_DETERMINISM, pytest.mark.skipif(
    not torch.cuda.is_available(), reason='needs a CUDA GPU')])])
def test_deterministic_mode_gives_bitwise_equal_gradients(image_model, device, monkeypatch):
    """Deterministic mode on the default backend (the reference on CPU; the kernels on CUDA)."""
    if device == 'cuda':
        monkeypatch.delenv('LUMIERE_FAST_BACKEND')
        monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    g1, w1 = _step_grads(image_model, checkpoint_temporal=False, device=device)
    g2, w2 = _step_grads(image_model, checkpoint_temporal=False, device=device)
    assert any(g.abs().sum() > 0 for g in g1.values())
    for k in g1:
        assert torch.equal(g1[k], g2[k]), f'gradient of {k} differs between runs'
    for k in w1:
        assert torch.equal(w1[k], w2[k]), f'{k} differs between runs'


def test_deterministic_runs_and_resume_are_bitwise_equal(tmp_path, image_model):
    """--deterministic (with --checkpoint-temporal): a 3-step run, and a 2-step run resumed for its third step,
    give the same losses and weights bit for bit."""
    common = ['--image-model', str(image_model), '--batch-size', '2', '--deterministic', '--checkpoint-temporal',
              *FAST, '--num-samples', '0', '--eval-clips', '0']
    straight = train.main(['--out', str(tmp_path / 'a'), '--steps', '3', *common])
    first = train.main(['--out', str(tmp_path / 'b'), '--steps', '2', *common])
    assert first['losses'] == straight['losses'][:2]                # two runs, same bits
    resumed = train.main(['--out', str(tmp_path / 'b'), '--steps', '3', *common])
    assert resumed['start_step'] == 2
    assert resumed['losses'] == straight['losses'][2:]              # resume == uninterrupted
    for k, v in straight['temporal_state'].items():
        assert torch.equal(v, resumed['temporal_state'][k]), k
