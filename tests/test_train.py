"""cmp_train end to end, in subprocesses: crash (SIGKILL) and resume, SIGTERM, DDP equivalence,
config errors, encoder export, and the shipped quickstart model.

Everything runs on the CPU with the small model on 64x64 synthetic scenes, so the whole file takes a
few minutes on 2 cores."""
import json, os, random, signal, subprocess, sys, time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART = ROOT / 'configs' / 'quickstart.yaml'

# A tiny deterministic run: 20 scenes -> 10 iterations per epoch, so 24 iterations cross two epoch boundaries.
TINY = ['data.crop=64', 'data.nms_ks=15', 'data.grid_stride=32', 'data.train_size=20', 'data.val_size=0',
        'train.iters=24', 'train.batch_size=2', 'train.device=cpu', 'train.threads=1', 'train.deterministic=true',
        'ckpt.every=3', 'ckpt.keep=2', 'log.every=1', 'log.progress=false', 'log.tensorboard=false',
        'log.image_every=0', 'log.val_every=0']


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    env.pop('WORLD_SIZE', None); env.pop('RANK', None); env.pop('LOCAL_RANK', None)
    return env


def _cmd(run_dir, *extra):
    return [str(BIN / 'cmp_train'), '--config', str(QUICKSTART), '--run-dir', str(run_dir), *TINY, *extra]


def _run(run_dir, *extra, timeout=300):
    p = subprocess.run(_cmd(run_dir, *extra), capture_output=True, text=True, env=_env(), timeout=timeout, cwd=ROOT)
    assert p.returncode == 0, f'cmp_train failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p


def _weights(run_dir):
    return torch.load(Path(run_dir) / 'model.pt', weights_only=True)['model']


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f'{len(diff)} tensors differ, e.g. {diff[:3]}'


def _start(run_dir, *extra):
    return subprocess.Popen(_cmd(run_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), cwd=ROOT)


def _wait_for_iteration(proc, k, timeout=240):
    "Read the run's stdout until it reports iteration >= k; returns the lines read."
    lines, t0 = [], time.time()
    for line in proc.stdout:
        lines.append(line)
        if line.startswith('it ') and int(line.split()[1].split('/')[0]) >= k: return lines
        assert time.time() - t0 < timeout, 'run too slow'
    raise AssertionError(f'run ended before iteration {k}:\n{"".join(lines)}\n{proc.stderr.read()}')


def _losses(run_dir):
    out = {}
    for line in open(Path(run_dir) / 'metrics.jsonl'):
        m = json.loads(line)
        if 'train/loss' in m: out[m['iter']] = m['train/loss']
    return out


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "An uninterrupted tiny run (num_workers=0)."
    d = tmp_path_factory.mktemp('ref')
    _run(d)
    return d


def test_config_error_lists_valid_keys(tmp_path):
    p = subprocess.run([str(BIN / 'cmp_train'), '--config', str(QUICKSTART), 'train.itres=5'], capture_output=True,
                       text=True, env=_env(), cwd=ROOT, timeout=120)
    assert p.returncode == 2
    assert "unknown config key 'train.itres'" in p.stderr and "did you mean 'train.iters'" in p.stderr
    assert 'optim.scale_lr' in p.stderr and 'data.crop' in p.stderr


def test_resolved_config_and_outputs(reference):
    import yaml
    cfg = yaml.safe_load((reference / 'config.yaml').read_text())
    assert cfg['train']['iters'] == 24 and cfg['data']['crop'] == 64 and cfg['ckpt']['run_dir'] == str(reference)
    assert cfg['model']['preset'] == 'small' and cfg['train']['deterministic'] is True
    assert sorted(_losses(reference)) == list(range(1, 25))
    ck = sorted((reference / 'checkpoints').glob('ckpt_*.pt'))
    assert [p.name for p in ck] == ['ckpt_00000021.pt', 'ckpt_00000024.pt']        # keep = 2


@pytest.mark.parametrize('workers', [0, 2])
def test_sigkill_then_resume_is_exact(reference, tmp_path, workers):
    "Kill the run at a random iteration (SIGKILL: no chance to clean up), resume, compare with the uninterrupted run."
    k = random.Random(workers + int(time.time())).randint(2, 20)
    proc = _start(tmp_path, f'data.num_workers={workers}')
    try:
        _wait_for_iteration(proc, k)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / 'model.pt').exists()
    p = _run(tmp_path, f'data.num_workers={workers}', '--resume', 'auto')
    assert 'resuming from' in p.stdout or 'starting from iteration 0' in p.stdout
    _assert_same_weights(reference, tmp_path)
    ref = _losses(reference)
    got = _losses(tmp_path)      # iterations logged twice (after the last checkpoint, before the kill) agree too
    assert all(got[i] == ref[i] for i in ref), 'loss curves differ'


def test_sigterm_saves_checkpoint_and_exits(reference, tmp_path):
    proc = _start(tmp_path)
    try:
        _wait_for_iteration(proc, 5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert 'received; saved' in out
    its = sorted(int(p.stem.split('_')[1]) for p in (tmp_path / 'checkpoints').glob('ckpt_*.pt'))
    stopped_at = int(out.split('at iteration ')[-1].split(';')[0])
    assert its[-1] == stopped_at and 5 <= stopped_at < 24
    _run(tmp_path, '--resume', 'auto')
    _assert_same_weights(reference, tmp_path)


def _torchrun(run_dir, *extra, nproc=2):
    cmd = [str(BIN / 'torchrun'), '--standalone', f'--nproc_per_node={nproc}', '-m', 'cmp_nb.train',
           '--config', str(QUICKSTART), '--run-dir', str(run_dir), *TINY, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=400)
    assert p.returncode == 0, f'torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}'
    return p


def test_ddp_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    """2 gloo processes x batch 2 with synchronised BatchNorm take the same steps as 1 process x batch 4.

    Same seed, same samples (each process takes its half of the global batch), gradients averaged by DDP,
    BatchNorm statistics over the global batch: the losses must agree to float rounding. As a control, the
    same 2-process run with per-process BatchNorm does NOT agree: the check can tell the difference.

    The learning rate is lowered to 0.005 for this check: a freshly initialised CMP is extremely sensitive in its
    first steps at lr 0.05 (a 1e-6 relative change of the initial weights moves the first gradients by ~0.2%,
    mostly through BatchNorm over the nearly empty sparse-motion maps), so float rounding differences between
    any two ways of summing the same batch grow to ~1e-4 within 3 steps there, DDP or not."""
    short = ['train.iters=6', 'ckpt.every=100', 'optim.lr=0.005']
    _run(tmp_path / 'one', *short, 'train.batch_size=4')
    p = _torchrun(tmp_path / 'two', *short, 'train.batch_size=2', 'train.sync_bn=true')
    assert 'x 2 process(es)' in p.stdout
    one, two = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
    assert sorted(one) == sorted(two) == list(range(1, 7))
    rel = [abs(one[i] - two[i]) / abs(one[i]) for i in one]
    assert max(rel) < 1e-4, rel
    w1, w2 = _weights(tmp_path / 'one'), _weights(tmp_path / 'two')
    for k in w1:
        if w1[k].is_floating_point(): torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4, msg=k)
    _torchrun(tmp_path / 'nosync', *short, 'train.batch_size=2', 'train.sync_bn=false')
    rel_nosync = [abs(one[i] - v) / abs(one[i]) for i, v in _losses(tmp_path / 'nosync').items()]
    assert max(rel_nosync) > 1e-3 > 10 * max(rel), (rel_nosync, rel)


def test_export_encoder_loads_into_torchvision(tmp_path):
    import torchvision
    from cmp_nb.model import build_model
    m = build_model('resnet50-plain')
    torch.save({'preset': 'resnet50-plain', 'model': m.state_dict(), 'iteration': 0}, tmp_path / 'model.pt')
    p = subprocess.run([str(BIN / 'cmp_export_encoder'), str(tmp_path), '--out', str(tmp_path / 'enc.pt')],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    enc = torch.load(tmp_path / 'enc.pt', weights_only=True)
    assert enc['preset'] == 'resnet50-plain' and enc['stride'] == 8 and 'conv5.weight' in enc['image_encoder']
    sd = torch.load(tmp_path / 'enc_torchvision_resnet50.pt', weights_only=True)
    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    net.load_state_dict(sd, strict=True)
    assert torch.equal(net.layer4[2].conv2.weight, m.image_encoder.layer4[2].conv2.weight)
    assert net.layer4[2].conv2.dilation == (1, 1) and m.image_encoder.layer4[2].conv2.dilation == (4, 4)


def test_shipped_quickstart_model_beats_baselines():
    "data_samples/quickstart.pt: small enough to ship, loads with load_propagator, beats both baselines on held-out scenes."
    from cmp_nb.config import load_config
    from cmp_nb.propagator import load_model, load_propagator
    from cmp_nb.train import build_datasets, evaluate
    path = ROOT / 'data_samples' / 'quickstart.pt'
    assert path.exists() and path.stat().st_size <= 10 * 2 ** 20
    torch.set_num_threads(2)
    model = load_model(path)
    assert load_propagator(path, device='cpu').model is not None
    cfg = load_config(QUICKSTART, ['data.val_size=24'])
    _, val = build_datasets(cfg)
    r = evaluate(model, val, device='cpu', batch_size=8)
    assert r['epe'] < 0.9 * r['epe_nearest'] and r['epe'] < 0.5 * r['epe_zero'], r


def test_cmp_demo_short_run(tmp_path):
    "cmp_demo end to end, shortened: 3 training iterations on 64x64 scenes, then the shipped model too."
    out = tmp_path / 'demo'
    p = subprocess.run([str(BIN / 'cmp_demo'), '--out', str(out), '--iters', '3', '--val-size', '8', '--scenes', '1',
                        'data.crop=64', 'data.nms_ks=15', 'data.grid_stride=32', 'train.batch_size=2',
                        'data.num_workers=0', 'log.progress=false'],
                       capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=400)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    assert 'nearest guidance' in p.stdout and 'short run (3 iterations)' in p.stdout and 'shipped quickstart.pt' in p.stdout
    summary = json.loads((out / 'summary.json').read_text())
    assert len(summary['results']) == 2
    assert all({'epe', 'epe_zero', 'epe_nearest'} <= set(r) for r in summary['results'].values())
    pngs = sorted(out.glob('*.png'))
    assert len(pngs) == 8 and all(q.stat().st_size > 1000 for q in pngs)
    assert (out / 'run' / 'model.pt').exists()


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    "The speed options run on a CPU too (bf16 autocast, channels_last): a few iterations, finite loss, weights written."
    p = _run(tmp_path, 'train.iters=3', 'train.amp=bf16', 'train.channels_last=true')
    losses = _losses(tmp_path)
    assert sorted(losses) == [1, 2, 3] and all(0 < v < 20 for v in losses.values()), p.stdout
    assert all(v.dtype != torch.bfloat16 for v in _weights(tmp_path).values())      # weights stay float32
