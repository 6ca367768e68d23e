"""The training recipe on torch.distributed: 2 gloo ranks on CPU, started by the tests.

The FSDP2 run goes through ``torchrun`` as a user would start it; the other multi-rank runs fork 2 ranks from the
test process (``torch.multiprocessing`` with the fork start method: no second import of torch and
denoising-diffusion-pytorch per rank, which dominates a tiny run on a loaded CPU).

* DDP: the averaged gradients of 2 ranks x 2 clips equal one process's gradients on the 4 clips;
* FSDP2 (``fully_shard`` of the temporal modules): after two steps, the same losses and temporal weights as one
  process on the whole batch;
* DCP: a checkpoint saved by 2 FSDP2 ranks resumes in one process and back on 2 ranks (the frozen image model
  sharded too), with the next-step loss of the single-process run;
* the MP layers' in-place train-mode renormalisation reaches the FSDP2-sharded weight (each rank renormalises its
  own rows of the shard: modules/mp_layers._fsdp_sharded_weight).

"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(image_size=16, dim=8, channels=3, dim_max=32, num_downsamples=2, num_blocks_per_stage=1, attn_res=(4,))
COMMON = ['--frames', '4', '--log-every', '1', '--sample-steps', '2', '--num-samples', '1', '--eval-clips', '2',
          '--no-progress', '--save-every', '1000']


def _env():
    env = dict(os.environ, LUMIERE_FAST_BACKEND='reference', OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    env['PYTHONPATH'] = os.pathsep.join([str(ROOT), env.get('PYTHONPATH', '')])
    return env


def torchrun(*args, nproc=2, timeout=300):
    """``python -m torch.distributed.run --standalone`` (a free rendezvous port) with ``nproc`` gloo ranks."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}', *map(str, args)]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f'{" ".join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}'
    return proc


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rank_entry(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port), LUMIERE_FAST_BACKEND='reference')
    torch.set_num_threads(1)
    fn(*args)


def fork_ranks(fn, *args, world=2):
    """``fn(*args)`` on ``world`` forked gloo ranks (torchrun's environment variables, a free port)."""
    import torch.multiprocessing as mp
    mp.start_processes(_rank_entry, args=(world, _free_port(), fn, args), nprocs=world, start_method='fork')


def train_1(out, *args):
    """The recipe in this process (no process group: the single-process path)."""
    from lumiere_fast import train
    old = os.environ.get('LUMIERE_FAST_BACKEND')
    os.environ['LUMIERE_FAST_BACKEND'] = 'reference'
    try:
        return train.main(['--out', str(out), *map(str, args)])
    finally:
        if old is None:
            os.environ.pop('LUMIERE_FAST_BACKEND')
        else:
            os.environ['LUMIERE_FAST_BACKEND'] = old


def train_ranks(*argv):
    from lumiere_fast import train
    train.main([str(a) for a in argv])


def losses(out) -> dict[int, float]:
    rows = [json.loads(line) for line in Path(out, 'log.jsonl').read_text().splitlines()]
    return {r['step']: r['loss'] for r in rows if r['stage'] == 'temporal'}


def image_model_file(path) -> Path:
    """A fixed random KarrasUnet with its output gain at 1 (a fresh one outputs zero, so temporal layers would get
    no gradient and every comparison would pass trivially)."""
    from denoising_diffusion_pytorch import KarrasUnet
    torch.manual_seed(0)
    unet = KarrasUnet(**RUN, dropout=0.)
    with torch.no_grad():
        unet.output_block[1].gain.fill_(1.)
    torch.save(unet.state_dict(), path)
    return Path(path)


def assert_state_close(a: dict, b: dict, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m: f'{k}: {m}')


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp('dist')
    image_model_file(d / 'image.pt')
    return d


@pytest.fixture(scope='module')
def reference_run(workdir):
    """One process, global batch 2: 2 steps (weights kept), then resumed to 4 steps (resume == uninterrupted is
    tested bitwise in test_train.py)."""
    out = workdir / 'one'
    args = ['--image-model', workdir / 'image.pt', '--batch-size', '2', *COMMON, '--num-samples', '0',
            '--eval-clips', '0']
    train_1(out, *args, '--steps', '2')
    w2 = torch.load(out / 'temporal.pt')
    train_1(out, *args, '--steps', '4')
    return dict(losses=losses(out), w2=w2)


@pytest.fixture(scope='module')
def fsdp_run(workdir):
    out = workdir / 'fsdp'
    torchrun('-m', 'lumiere_fast.train', '--out', out, '--image-model', workdir / 'image.pt', '--batch-size', '1',
             '--fsdp', '--steps', '2', *COMMON)
    return out


# ---------------------------------------------------------------------------------------------- worker modes

def _tiny_args(extra=()):
    from lumiere_fast import train
    return train.build_parser().parse_args(['--frames', '4', *extra])


def worker_ddp_grads(out):
    """Each rank: 2 clips of the 4-clip global batch through DDP; rank 0 saves the (averaged) gradients."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from lumiere_fast import train
    info = train.init_distributed('cpu')
    grads = _grads(out_image=Path(out) / 'image.pt', rank=info.rank, world=info.world, batch=2,
                   wrap=lambda m: DDP(m))
    if info.main:
        torch.save(grads, Path(out) / 'ddp_grads.pt')
    dist.barrier()
    dist.destroy_process_group()


def _grads(out_image, rank, world, batch, wrap=lambda m: m) -> dict:
    """Gradients of the EDM loss on this rank's share of step 0's global batch."""
    from lumiere_fast import train
    args = _tiny_args(['--batch-size', str(batch)])
    edm = train.EDM()
    unet = train.build_image_model(args)
    unet.load_state_dict(torch.load(out_image))
    torch.manual_seed(1)
    lumiere = train.build_lumiere(args, unet)
    train.set_train_mode(lumiere)
    net = wrap(lumiere)
    ds = train.StepDataset(train.make_dataset(args), edm, args.seed)
    items = [ds[p] for p in range(rank * batch, (rank + 1) * batch)]
    stack = {k: torch.stack([torch.as_tensor(i[k]) for i in items]) for k in ('clip', 'sigma', 'noise')}
    loss = edm.loss(net, stack['clip'], stack['sigma'], stack['noise'])
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in lumiere.named_parameters()}


def worker_renormalise(out):
    """fully_shard an MP conv block; a train-mode forward should leave its sharded weights renormalised."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from lumiere_fast import MPConvolutionInflationBlock, train
    info = train.init_distributed('cpu')
    torch.manual_seed(0)
    block = MPConvolutionInflationBlock(dim=8)
    mesh = init_device_mesh('cpu', (info.world,))
    scalars = {p for p in block.parameters() if p.ndim == 0}
    fully_shard(block, mesh=mesh, ignored_params=scalars)
    block.train()
    block(torch.randn(1, 8, 4, 4, 4)).sum().backward()
    rows = {}
    for m in train.mp_weight_layers(block):
        w = m.weight.full_tensor().detach()
        rows[type(m).__name__ + str(len(rows))] = (w.reshape(w.shape[0], -1).norm(dim=1), m.fan_in)
    if info.main:
        torch.save(rows, Path(out) / 'rows.pt')
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- tests

def test_ddp_gradients_equal_one_process_on_the_whole_batch(workdir):
    fork_ranks(worker_ddp_grads, workdir)
    ddp = torch.load(workdir / 'ddp_grads.pt')
    whole = _grads(workdir / 'image.pt', rank=0, world=1, batch=4)
    assert any(g.abs().sum() > 0 for g in whole.values()), 'no gradient reached the temporal layers'
    assert_state_close(ddp, whole, rtol=1e-5, atol=1e-7)


def test_fsdp2_two_steps_match_one_process(reference_run, fsdp_run):
    ref, got = reference_run['losses'], losses(fsdp_run)
    for step in (1, 2):
        assert got[step] == pytest.approx(ref[step], rel=1e-5)
    assert ref[1] != ref[2]
    w2 = torch.load(fsdp_run / 'temporal.pt')
    assert not any(k.startswith('model.') for k in w2)                 # temporal weights only
    assert_state_close(w2, reference_run['w2'])
    assert (fsdp_run / 'sample.gif').is_file()                          # the sampler ran on the sharded model


def test_dcp_saved_on_2_ranks_resumes_on_1_and_back(workdir, reference_run, fsdp_run):
    out = workdir / 'moved'
    shutil.copytree(fsdp_run, out)
    args = ['--image-model', workdir / 'image.pt', *COMMON, '--num-samples', '0', '--eval-clips', '0']
    train_1(out, *args, '--batch-size', '2', '--steps', '3')              # 2 FSDP ranks -> 1 process
    fork_ranks(train_ranks, '--out', out, *args, '--batch-size', '1', '--fsdp', '--fsdp-image-model', '--steps', '4')
    got, ref = losses(out), reference_run['losses']
    assert got[3] == pytest.approx(ref[3], rel=1e-5)
    assert got[4] == pytest.approx(ref[4], rel=1e-5)                      # 1 process -> 2 FSDP ranks, image
                                                                          # model sharded too


def test_mp_renormalisation_survives_fsdp2_sharding(workdir):
    fork_ranks(worker_renormalise, workdir)
    rows = torch.load(workdir / 'rows.pt')
    for name, (norms, fan_in) in rows.items():
        torch.testing.assert_close(norms, torch.full_like(norms, fan_in ** 0.5), msg=lambda m: f'{name}: {m}')
