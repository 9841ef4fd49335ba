"""cmp_train end to end, in subprocesses: crash (SIGKILL) and resume, SIGTERM, DDP equivalence,
config errors, encoder export, and the shipped quickstart model.

Everything runs on the CPU with the small model on 64x64 synthetic scenes, so the whole file takes a
few minutes on 2 cores."""
import json, os, random, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

from cmp_nb.demo import PHOTO_DRAGS
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
    from cmp_nb.config import StepSchedule
    o = cfg['optim']
    sched = StepSchedule(24, o['milestones'], o['gamma'], o['warmup_iters'], o['warmup_factor'])
    lrs = {m['iter']: m['train/lr'] for m in map(json.loads, open(reference / 'metrics.jsonl')) if 'train/lr' in m}
    assert lrs == pytest.approx({i: o['lr'] * sched(i - 1) for i in range(1, 25)}, rel=1e-12)   # the lr step i used
    assert lrs[1] == pytest.approx(o['lr'] * o['warmup_factor'])
    ck = sorted((reference / 'checkpoints').glob('ckpt_*.pt'))
    assert [p.name for p in ck] == ['ckpt_00000021.pt', 'ckpt_00000024.pt']        # keep = 2


def _checkpoint_iterations(run_dir):
    return sorted(int(p.stem.split('_')[1]) for p in (Path(run_dir) / 'checkpoints').glob('ckpt_*.pt'))


def _resumed_from(stdout):
    "The iteration a run says it resumed from (`cmp_train: resuming from ... (iteration N)`), or None."
    for line in stdout.splitlines():
        if line.startswith('cmp_train: resuming from'): return int(line.rsplit('(iteration ', 1)[1].rstrip(')'))
    return None


@pytest.mark.parametrize('workers', [0, 2])
def test_sigkill_then_resume_is_exact(reference, tmp_path, workers):
    """Kill the run at a random iteration after its first checkpoint (SIGKILL: no chance to clean up), resume,
    compare with the uninterrupted run. Reproduce a failure with CMP_TEST_SEED=<seed from the message>."""
    seed = int(os.environ.get('CMP_TEST_SEED', workers * 1000003 + time.time_ns() % 1000003))
    every = 3                                                   # ckpt.every in TINY
    k = random.Random(seed).randint(every + 1, 20)              # the iteration-3 checkpoint is written before step 4
    why = f'(seed {seed}: SIGKILL after iteration {k}, data.num_workers={workers})'
    print('test_sigkill_then_resume_is_exact', why)
    proc = _start(tmp_path, f'data.num_workers={workers}')
    try:
        _wait_for_iteration(proc, k)
        saved = _checkpoint_iterations(tmp_path)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, why
    assert saved and saved[-1] >= every, f'no checkpoint before the kill {why}: {saved}'
    assert not (tmp_path / 'model.pt').exists(), why
    p = _run(tmp_path, f'data.num_workers={workers}', '--resume', 'auto')
    start = _resumed_from(p.stdout)
    assert start is not None and start > 0 and start % every == 0 and start >= saved[-1], f'{why}\n{p.stdout[-2000:]}'
    assert f'iterations {start}->24' in p.stdout, why
    _assert_same_weights(reference, tmp_path)
    ref = _losses(reference)
    got = _losses(tmp_path)      # iterations logged twice (after the last checkpoint, before the kill) agree too
    assert all(got[i] == ref[i] for i in ref), f'loss curves differ {why}'


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


# Float32 unit roundoff: the relative error of one rounding.
U32 = 2.0 ** -24


def _ddp_divergence(one, two, w0, tol):
    """Per tensor, max |two - one| / what the float32 arithmetic allows (<= 1: within tolerance).

    Rounding errors of a float32 sum computed in another order are bounded by a multiple of the sum of the
    *magnitudes* of its terms, not of its result: an element that is small because large terms cancel
    (a BatchNorm mean near zero, a weight that moved little) carries the absolute error of the whole sum.
    So a difference is measured against the scale of what was summed, per tensor, times `tol`:
    - weights: the size of the 6 updates, max |w_6 - w_0| (both runs start from the same w_0 and differ only in
      how their gradients were summed);
    - BatchNorm running_mean: the activations' RMS, max sqrt(running_var + running_mean^2) (each step adds
      0.1 x a batch mean whose error scales with the activations, not with the mean);
    - running_var: max running_var (a mean of squares);
    plus, for every float tensor, the rounding of the stored value: each of the 6 steps rounds it to float32
    (at most U32 x |w| each, in either run), so 12 U32 max |w|. Integers (num_batches_tracked) must be equal.
    The last term matters for the bias of a conv followed by BatchNorm: its true gradient is 0 (BatchNorm removes
    any constant), so its whole "update" is rounding noise and weight decay."""
    out = {}
    for k, a in one.items():
        b = two[k]
        if not a.is_floating_point():
            out[k] = 0.0 if torch.equal(a, b) else float('inf'); continue
        a, b = a.double(), b.double()
        if k.endswith('running_mean'): scale = (one[k[:-4] + 'var'].double() + a * a).sqrt().max()
        elif k.endswith('running_var'): scale = a.abs().max()
        else: scale = (a - w0[k].double()).abs().max()
        allowed = tol * scale + 12 * U32 * a.abs().max()
        out[k] = float((b - a).abs().max() / allowed.clamp_min(1e-30))
    return out


def test_ddp_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    """2 gloo processes x batch 2 with synchronised BatchNorm take the same steps as 1 process x batch 4.

    Same seed, same samples (each process takes its half of the global batch), gradients averaged by DDP,
    BatchNorm statistics over the global batch: the two runs compute the same sums in a different order
    (two half-batch sums all-reduced, instead of one), so they differ only by float32 rounding. As a control,
    the same 2-process run with per-process BatchNorm does NOT agree: the check can tell the difference.

    The tolerances follow from that arithmetic. One sum of n float32 terms in another order changes by at most
    about n x U32 x (sum of |terms|), typically sqrt(n) x U32 x ...; the largest sums here (BatchNorm over
    4 x 64 x 64 = 16384 pixels, the loss over 16384 pixels x 2 axes) give 128 x 6e-8 ~ 1e-5 relative, typically.
    A freshly initialised CMP amplifies such differences in its first steps (at lr 0.05 a 1e-6 relative change
    of the initial weights moves the first gradients by ~0.2%, mostly through BatchNorm over the nearly empty
    sparse-motion maps), which is why lr is lowered to 0.005 here; over 6 steps, allow 10x that 1e-5: the loss
    curves agree to 1e-4 relative. A weight is w_0 minus the (momentum-weighted) sum of 6 gradient steps, so its
    difference is a fraction of the update w_6 - w_0: gradients are derivatives of the loss, more sensitive to
    the same perturbation than the loss is (the 0.2% above): 1e-2 of the update size is the unit of the weight
    check, and BatchNorm running stats (averages of batch statistics, which move with the activations) use 1e-2
    of their scale. That unit comes from the *typical* rounding (sqrt(n) x U32); the worst case (n x U32, 1e-3
    for the 16384-term sums) is 100x more, and which one a machine sees depends on its kernels: where this test
    was written the weights stayed within 1 unit, on an Intel Xeon with AVX-512 (another conv blocking for a
    batch of 2 than of 4) image_encoder.conv5.weight reached 5.9 units. So the synchronised run may differ by up
    to 10 units (1e-1 of the update), and the check must still tell the difference: per-process BatchNorm (the
    control) changes the loss by > 1e-3 and the weights by more than 10x what the synchronised run does."""
    from cmp_nb.model import build_model
    from cmp_nb.checkpoint import seed_everything
    short = ['train.iters=6', 'ckpt.every=100', 'optim.lr=0.005']
    _run(tmp_path / 'one', *short, 'train.batch_size=4')
    p = _torchrun(tmp_path / 'two', *short, 'train.batch_size=2', 'train.sync_bn=true')
    assert 'x 2 process(es)' in p.stdout
    one, two = _losses(tmp_path / 'one'), _losses(tmp_path / 'two')
    assert sorted(one) == sorted(two) == list(range(1, 7))
    rel = [abs(one[i] - two[i]) / abs(one[i]) for i in one]
    seed_everything(0)                                   # train.seed of quickstart.yaml: the initial weights of both runs
    w0 = build_model('small').state_dict()
    w1, w2 = _weights(tmp_path / 'one'), _weights(tmp_path / 'two')
    div = _ddp_divergence(w1, w2, w0, tol=1e-2)
    worst = sorted(div.items(), key=lambda kv: -kv[1])[:3]
    print('DDP vs one process: loss rel', max(rel), 'worst tensors (difference / allowed)', worst)
    assert max(rel) < 1e-4, rel
    assert worst[0][1] <= 10, worst
    _torchrun(tmp_path / 'nosync', *short, 'train.batch_size=2', 'train.sync_bn=false')
    rel_nosync = [abs(one[i] - v) / abs(one[i]) for i, v in _losses(tmp_path / 'nosync').items()]
    div_nosync = _ddp_divergence(w1, _weights(tmp_path / 'nosync'), w0, tol=1e-2)
    print('per-process BN: loss rel', max(rel_nosync), 'worst (difference / allowed)', max(div_nosync.values()))
    assert max(rel_nosync) > 1e-3 > 10 * max(rel), (rel_nosync, rel)
    assert max(div_nosync.values()) > 10 * max(1.0, worst[0][1]), \
        ('the weight check cannot tell per-process BatchNorm from synchronised', max(div_nosync.values()), worst)


# cmp_train with a fault injected, for the tests below: CMP_TEST_FAULT=nan_on_rank1 makes rank 1's loss nan from
# its 3rd step on; sigterm_at_startup sends SIGTERM to itself while the datasets are being built. '@RANK' in an
# argument becomes the process's rank (a per-node run dir, as on nodes without a shared filesystem). Each
# process writes the exception it ends with to CMP_TEST_OUT/rank<r>.err.
FAULTY = """
import os, signal, sys
import cmp_nb.train as T
fault, rank = os.environ['CMP_TEST_FAULT'], int(os.environ.get('RANK', '0'))
if fault == 'nan_on_rank1' and rank == 1:
    class NanLoss(T.DiscreteFlowLoss):
        calls = 0
        def forward(self, *a, **kw):
            NanLoss.calls += 1
            loss = super().forward(*a, **kw)
            return loss * float('nan') if NanLoss.calls >= 3 else loss
    T.DiscreteFlowLoss = NanLoss
if fault == 'sigterm_at_startup':
    build = T.build_datasets
    def build_datasets(cfg):
        os.kill(os.getpid(), signal.SIGTERM)
        return build(cfg)
    T.build_datasets = build_datasets
try: sys.exit(T.main([a.replace('@RANK', str(rank)) for a in sys.argv[1:]]))
except Exception as e:
    with open(os.path.join(os.environ['CMP_TEST_OUT'], f'rank{rank}.err'), 'w') as f: f.write(f'{type(e).__name__}: {e}')
    raise
"""


def _descendants(pid):
    "The pids of all living descendants of process `pid` (Linux /proc)."
    children = {}
    for d in Path('/proc').iterdir():
        if not d.name.isdigit(): continue
        try: ppid = int((d / 'stat').read_text().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError): continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids; todo += kids
    return out


def _faulty(tmp_path, fault, run_dir, *extra, nproc=2, timeout=300):
    "Run FAULTY (under torchrun if nproc > 1); returns (returncode, stdout, stderr, {rank: error text})."
    script = tmp_path / 'faulty_train.py'
    script.write_text(FAULTY)
    out = tmp_path / 'errors'; out.mkdir(exist_ok=True)
    launch = [str(BIN / 'torchrun'), '--standalone', f'--nproc_per_node={nproc}'] if nproc > 1 else [sys.executable]
    cmd = [*launch, str(script), '--config', str(QUICKSTART), '--run-dir', str(run_dir), *TINY, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(_env(), CMP_TEST_FAULT=fault, CMP_TEST_OUT=str(out)))
    try: stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:    # torchrun starts its workers in sessions of their own
            try: os.kill(pid, signal.SIGKILL)
            except ProcessLookupError: pass
        stdout, stderr = proc.communicate()
        raise AssertionError(f'{fault}: still running after {timeout} s (a process hung?)\n{stdout[-2000:]}\n{stderr[-3000:]}')
    errors = {int(p.stem[4:]): p.read_text() for p in out.glob('rank*.err')}
    return proc.returncode, stdout, stderr, errors


def test_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    "Rank 1 alone gets a nan loss at step 3: both processes raise the same FloatingPointError (none hangs)."
    code, out, err, errors = _faulty(tmp_path, 'nan_on_rank1', tmp_path / 'run', 'ckpt.every=100')
    assert code != 0, out[-2000:]
    msg = 'FloatingPointError: training loss became non-finite on rank 1 of 2; every process stops.'
    assert sorted(errors) == [0, 1] and all(e.startswith(msg) for e in errors.values()), (errors, err[-3000:])
    assert errors[0] == errors[1]
    assert sorted(_losses(tmp_path / 'run')) == [1, 2]              # steps 1-2 ran; no step with the nan loss
    assert not (tmp_path / 'run' / 'checkpoints').exists() or not _checkpoint_iterations(tmp_path / 'run')


def test_resume_without_shared_filesystem_fails_on_every_rank(reference, tmp_path):
    "Rank 0 finds a checkpoint, rank 1 (another 'node', its own run dir) does not: both stop with a clear error."
    (tmp_path / 'node0' / 'checkpoints').mkdir(parents=True)
    shutil.copy(reference / 'checkpoints' / 'ckpt_00000021.pt', tmp_path / 'node0' / 'checkpoints')
    code, out, err, errors = _faulty(tmp_path, 'none', tmp_path / 'node@RANK', '--resume', 'auto')
    assert code != 0, out[-2000:]
    assert sorted(errors) == [0, 1], err[-3000:]
    for rank, e in errors.items():
        assert e.startswith('RuntimeError: processes resumed from different iterations (from 0 to 21;'), e
        assert f'this is rank {rank}, at {21 if rank == 0 else 0}' in e and 'filesystem shared by all nodes' in e, e
    assert not (tmp_path / 'node0' / 'model.pt').exists()


def test_sigterm_during_startup_exits_cleanly(tmp_path):
    "A SIGTERM while the data is being set up: status 143, no step, no checkpoint, no weights."
    code, out, err, errors = _faulty(tmp_path, 'sigterm_at_startup', tmp_path / 'run', nproc=1)
    assert code == 128 + signal.SIGTERM, (code, out[-2000:], err[-3000:])
    assert 'received during start-up; no step taken' in out and not errors
    assert not _checkpoint_iterations(tmp_path / 'run') and not (tmp_path / 'run' / 'model.pt').exists()
    assert not [l for l in out.splitlines() if l.startswith('it ')]


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
    assert 'nearest guidance' in p.stdout and 'short run (3 iterations)' in p.stdout and 'shipped default (' in p.stdout
    summary = json.loads((out / 'summary.json').read_text())
    assert len(summary['results']) == 2
    assert all({'epe', 'epe_zero', 'epe_nearest'} <= set(r) for r in summary['results'].values())
    shipped = next(r for k, r in summary['results'].items() if k.startswith('shipped default'))
    assert shipped['epe'] < 0.75 * shipped['epe_zero'], shipped     # 64 px scenes, 1/3 of its training crop
    pngs = sorted(out.glob('*.png'))
    assert len(pngs) == 12, [q.name for q in pngs]                               # 2 models x 4 arrow sets + 4 photos
    from PIL import Image
    synthetic = [q for q in pngs if 'photo' not in q.name]
    assert {Image.open(q).size for q in synthetic} == {(880, 320)}, {q.name: Image.open(q).size for q in synthetic}
    for q in pngs:                                    # a picture, not a blank page: many colours in every one
        assert len(np.unique(np.asarray(Image.open(q).convert('RGB')).reshape(-1, 3), axis=0)) > 100, q.name
    assert sorted(q.name for q in pngs if 'photo' in q.name) == [f'shipped_photo_{n}.png' for n in sorted(PHOTO_DRAGS)]
    assert (out / 'run' / 'model.pt').exists()


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    """The speed options run on a CPU too (bf16 autocast, channels_last), and train like float32.

    bfloat16 keeps 8 significant bits (unit roundoff u = 2**-8 = 0.0039). The first loss is the cross-entropy
    of logits computed in bf16 (float32 accumulation), so it may differ from float32 by a few u relative:
    allowed 2e-2 (about 5u). Later steps start from weights that already differ by one bf16-gradient step:
    5e-2. And bf16 must really be used: the first loss cannot be bit-identical to float32's."""
    p = _run(tmp_path / 'bf16', 'train.iters=3', 'train.amp=bf16', 'train.channels_last=true')
    _run(tmp_path / 'fp32', 'train.iters=3')
    lb, lf = _losses(tmp_path / 'bf16'), _losses(tmp_path / 'fp32')
    assert sorted(lb) == sorted(lf) == [1, 2, 3], p.stdout
    rel = {i: abs(lb[i] - lf[i]) / abs(lf[i]) for i in lf}
    print('bf16 vs float32 loss, relative difference per step:', rel)
    assert rel[1] <= 2e-2 and rel[2] <= 5e-2 and rel[3] <= 5e-2, (lb, lf)
    assert lb[1] != lf[1], 'bf16 autocast gave exactly the float32 loss: was it applied?'
    assert all(v.dtype != torch.bfloat16 for v in _weights(tmp_path / 'bf16').values())   # weights stay float32


@pytest.mark.slow
def test_torch_compile_on_cpu(tmp_path):
    "train.compile=true (TorchInductor, here generating CPU code) trains like eager: same losses up to float rounding."
    eager = _run(tmp_path / 'eager', 'train.iters=4')
    _run(tmp_path / 'compiled', 'train.iters=4', 'train.compile=true', timeout=900)
    le, lc = _losses(tmp_path / 'eager'), _losses(tmp_path / 'compiled')
    assert sorted(le) == sorted(lc) == [1, 2, 3, 4], eager.stdout
    assert all(abs(le[i] - lc[i]) <= 1e-3 * abs(le[i]) for i in le), (le, lc)
    wc = _weights(tmp_path / 'compiled')
    assert not any(k.startswith('_orig_mod.') for k in wc), 'the compiled wrapper leaked into the saved weights'


def test_used_run_dir_refused_then_overwrite(tmp_path):
    "A fresh run in a run dir that holds a run exits 2 naming --resume and --overwrite, changing nothing; --overwrite starts over."
    _run(tmp_path, 'train.iters=2')
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
    p = subprocess.run(_cmd(tmp_path, 'train.iters=3'), capture_output=True, text=True, env=_env(), timeout=300, cwd=ROOT)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert 'already holds a run' in p.stderr and '--resume auto' in p.stderr and '--overwrite' in p.stderr, p.stderr
    assert 'Traceback' not in p.stderr
    assert {q: q.stat().st_mtime_ns for q in tmp_path.rglob('*') if q.is_file()} == before
    p = _run(tmp_path, 'train.iters=3', '--overwrite')
    assert 'removed the earlier run' in p.stdout
    assert sorted(_losses(tmp_path)) == [1, 2, 3] and _checkpoint_iterations(tmp_path) == [3]   # the old run's ckpt 2 is gone
    assert torch.load(tmp_path / 'model.pt', weights_only=True)['iteration'] == 3


@pytest.mark.parametrize('bad,key', [('optim.lr=nan', 'optim.lr'), ('train.batch_size=0', 'train.batch_size')])
def test_out_of_range_values_refused_before_running(tmp_path, bad, key):
    "Overrides anywhere on the line (here after --run-dir); an impossible value exits 2 before a run dir exists."
    p = subprocess.run(_cmd(tmp_path / 'run', bad), capture_output=True, text=True, env=_env(), timeout=120, cwd=ROOT)
    assert p.returncode == 2 and repr(key) in p.stderr and 'out of range' in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / 'run').exists()


def test_export_encoder_names_a_bad_file(reference, tmp_path):
    (tmp_path / 'empty.pt').write_bytes(b'')
    (tmp_path / 'cut.pt').write_bytes((reference / 'model.pt').read_bytes()[:20000])
    for name in ('empty.pt', 'cut.pt'):
        p = subprocess.run([str(BIN / 'cmp_export_encoder'), str(tmp_path / name)], capture_output=True, text=True,
                           env=_env(), cwd=ROOT, timeout=120)
        assert p.returncode == 2, p.stderr
        assert f'model file {tmp_path / name} is ' in p.stderr and 'Traceback' not in p.stderr, p.stderr


def _dist_bn_worker(rank, world, port, x, out_dir):
    "One of two gloo processes: DistBatchNorm2d on its half of the batch; writes output, input grad, stats."
    import torch.distributed as dist
    from cmp_nb.train import DistBatchNorm2d
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        bn = DistBatchNorm2d(3)
        with torch.no_grad(): bn.weight.copy_(torch.tensor([1., 2., .5])); bn.bias.copy_(torch.tensor([0., 1., -1.]))
        xs = x.chunk(world)[rank].clone().requires_grad_(True)
        y = bn(xs)
        (y * torch.arange(y.numel(), dtype=y.dtype).view_as(y).cos()).sum().backward()
        torch.save({'y': y.detach(), 'gx': xs.grad, 'mean': bn.running_mean, 'var': bn.running_var,
                    'gw': bn.weight.grad}, Path(out_dir) / f'rank{rank}.pt')
    finally: dist.destroy_process_group()


def test_dist_batchnorm_two_processes_equal_one_big_batch(tmp_path):
    """DistBatchNorm2d over 2 gloo processes with half a batch each computes what nn.BatchNorm2d computes on the
    whole batch: outputs, input gradients, running statistics and, summed over processes as DDP does, the
    weight gradient. DistBatchNorm2d computes in float32, summing each channel's 4*5*6 = 120 values in another
    order than BatchNorm2d: each sum may differ by up to n*u = 120 * 2**-24 relative, twice over (mean, then
    variance), which sets the tolerance."""
    import socket
    import torch.multiprocessing as tmp_mp
    x = torch.randn(4, 3, 5, 6) * 3 + 1
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    tmp_mp.start_processes(_dist_bn_worker, args=(2, port, x, str(tmp_path)), nprocs=2, start_method='fork')
    r = [torch.load(tmp_path / f'rank{k}.pt', weights_only=True) for k in range(2)]
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad(): bn.weight.copy_(torch.tensor([1., 2., .5])); bn.bias.copy_(torch.tensor([0., 1., -1.]))
    xf = x.clone().requires_grad_(True)
    y = bn(xf)
    halves = [torch.arange(y[:2].numel(), dtype=y.dtype).view_as(y[:2]).cos()] * 2
    (y * torch.cat(halves)).sum().backward()
    tol = 2 * 120 * 2**-24
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))
    close(torch.cat([r[0]['y'], r[1]['y']]), y.detach())
    close(torch.cat([r[0]['gx'], r[1]['gx']]), xf.grad)
    for k in range(2):
        close(r[k]['mean'], bn.running_mean); close(r[k]['var'], bn.running_var)
    close(r[0]['gw'] + r[1]['gw'], bn.weight.grad)


PRETEXTS = ['flow', 'flow-log16', 'cpfs', 's3-affine', 's3-entropy']


@pytest.mark.parametrize('task', PRETEXTS)
def test_pretext_task_sigkill_then_resume_is_exact(tmp_path, task):
    """Every pretext task trains through the same cmp_train: 12 iterations uninterrupted, and again killed
    (SIGKILL) after iteration 7 and resumed from its iteration-6 checkpoint: the same weights, bit for bit, and
    the same loss curve. Then its image encoder exports like CMP's."""
    extra = ['train.iters=12', f'task.name={task}'] + (['optim.name=adam', 'optim.lr=1e-4'] if task == 'cpfs' else [])
    _run(tmp_path / 'ref', *extra)
    proc = _start(tmp_path / 'cut', *extra)
    try:
        _wait_for_iteration(proc, 7)
        proc.kill()
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert _checkpoint_iterations(tmp_path / 'cut')[-1] >= 6
    p = _run(tmp_path / 'cut', *extra, '--resume', 'auto')
    assert _resumed_from(p.stdout) >= 6, p.stdout[-2000:]
    assert f'task {task},' in p.stdout
    _assert_same_weights(tmp_path / 'ref', tmp_path / 'cut')
    ref, got = _losses(tmp_path / 'ref'), _losses(tmp_path / 'cut')
    assert sorted(ref) == list(range(1, 13)) and all(got[i] == ref[i] for i in ref), (ref, got)
    from cmp_nb.train import export_encoder
    from cmp_nb.model import build_model
    enc = torch.load(export_encoder(tmp_path / 'ref' / 'model.pt', tmp_path / 'enc.pt')['encoder'], weights_only=True)
    w = _weights(tmp_path / 'ref')
    assert enc['image_encoder'].keys() == build_model('small').image_encoder.state_dict().keys()
    assert all(torch.equal(v, w[f'image_encoder.{k}']) for k, v in enc['image_encoder'].items())
