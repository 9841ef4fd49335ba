"""Data stage: manifest / synthetic / shard datasets, augmentation, reproducibility, cmp_synth."""
import hashlib, json, subprocess, sys, tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from cmp_nb.flow import read_flow_png, write_flow_png, write_flo, load_image, decode_flow_png
from cmp_nb.synthetic import make_clip, checkable_mask, photometric_error, write_synthetic_set
from cmp_nb.dataset import (load_manifest, sample_rng, PairTransform, ManifestDataset, SyntheticDataset, VALIDATION_SEED,
                            write_shards, iter_tar_samples, ShardDataset, make_dataset)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / 'data_samples' / 'synthetic'
KEYS = ('image', 'sparse', 'flow', 'valid')
SMALL = dict(crop=128, short_side=160, nms_ks=31, grid_stride=64)  # fast settings for most tests



def assert_same_rendering(new, old, what):
    """Equal, up to one unit on a few pixels: rendered values are floats rounded to integers, and where another
    CPU (or thread split) differs in the last bits of a value on a .5 boundary, it lands one unit away."""
    assert new.shape == old.shape, (what, new.shape, old.shape)
    d = np.abs(new.astype(np.int64) - old.astype(np.int64))
    assert d.max() <= 1 and (d > 0).mean() < 1e-3, (what, int(d.max()), float((d > 0).mean()))

def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in KEYS) and int(a['index']) == int(b['index'])


def write_pair(folder, name, img, flow, valid=None, flow_ext='.png'):
    cv2.imwrite(str(folder / f'{name}.png'), img[..., ::-1])
    if flow_ext == '.png': write_flow_png(folder / f'{name}.flow.png', flow, valid)
    else: write_flo(folder / f'{name}.flo', flow)
    return dict(image=f'{name}.png', flow=f'{name}.flow{flow_ext}' if flow_ext == '.png' else f'{name}.flo')


def test_default_sample_format():
    ds = ManifestDataset(SAMPLES)  # defaults: short side 416, crop 384, flip 0.5, K=81, G=200
    s = ds[0]
    assert set(s) == {'image', 'sparse', 'flow', 'valid', 'index'}
    assert s['image'].shape == (3, 384, 384) and s['image'].dtype == torch.float32
    assert s['sparse'].shape == (4, 384, 384) and s['flow'].shape == (2, 384, 384) and s['valid'].shape == (384, 384)
    assert -3 < float(s['image'].mean()) < 3 and float(s['image'].std()) > 0.1  # normalised, not 0..255
    m = s['sparse'][2] > 0
    assert m.any() and torch.equal(s['sparse'][3], s['sparse'][2])
    assert torch.allclose(s['sparse'][:2][:, m], s['flow'][:, m])


def test_flip_negates_u_and_resize_scales_vectors():
    rec = load_manifest(SAMPLES)[5]
    img, (flow, valid) = load_image(rec['image']), read_flow_png(rec['flow'])
    a = PairTransform(crop=None, short_side=512, flip=0.0)(img, flow, valid, sample_rng(0, 0, 0))
    b = PairTransform(crop=None, short_side=512, flip=1.0)(img, flow, valid, sample_rng(0, 0, 0))
    assert torch.equal(b['image'], a['image'].flip(-1))
    assert torch.allclose(b['flow'][0], -a['flow'][0].flip(-1)) and torch.allclose(b['flow'][1], a['flow'][1].flip(-1))
    # 256 -> 512: vectors doubled (bilinear resize, compare robust statistics)
    assert np.isclose(float(a['flow'].abs().mean()), 2 * np.abs(flow).mean(), rtol=0.03)


def test_same_batches_with_any_number_of_workers():
    ds = ManifestDataset(SAMPLES, color_jitter=0.2, **SMALL)
    runs = []
    for nw in (0, 2):
        runs.append([b for b in DataLoader(ds, batch_size=4, num_workers=nw)])
    for b0, b2 in zip(*runs):
        assert all(torch.equal(b0[k], b2[k]) for k in KEYS)
    ds.set_epoch(1)
    b1 = next(iter(DataLoader(ds, batch_size=4)))
    assert not torch.equal(b1['image'], runs[0][0]['image'])  # new epoch, new augmentation


def test_small_images_pad_or_upscale_and_invalid_pixels(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    flow = np.stack(np.meshgrid(np.linspace(-3, 3, 50), np.linspace(-2, 2, 40)), -1).astype(np.float32)
    valid = np.ones((40, 50), bool); valid[:, :10] = False
    rec = write_pair(tmp_path, 'a', img, flow, valid)
    (tmp_path / 'manifest.jsonl').write_text(json.dumps(rec) + '\n')
    pad = ManifestDataset(tmp_path, crop=64, short_side=None, small='pad', train=False, nms_ks=9, grid_stride=8)[0]
    assert pad['image'].shape == (3, 64, 64)
    assert pad['valid'][:40, 10:50].all() and pad['valid'][:, :10].sum() == 0 and pad['valid'][40:].sum() == 0
    assert float(pad['sparse'][2][pad['valid'] == 0].sum()) == 0 and float(pad['sparse'][2].sum()) > 0  # no guidance on invalid
    up = ManifestDataset(tmp_path, crop=64, short_side=None, small='upscale', train=False, nms_ks=9, grid_stride=8)[0]
    assert up['image'].shape == (3, 64, 64)
    # 40x50 -> 64x80 (vectors x1.6), centre crop 64x64 keeps all rows: v spans +-2 * 1.6
    assert np.isclose(float(up['flow'][1].max()), 2 * 1.6, rtol=0.05) and np.isclose(float(up['flow'][1].min()), -2 * 1.6, rtol=0.05)
    # the invalid left band grows with the image (10 -> 16 px), the crop removes 8 columns: about 8 invalid columns left
    assert up['valid'][:, :6].sum() == 0 and up['valid'][:, 10:].all()


def test_flo_files_and_clear_errors(tmp_path):
    img = np.full((32, 32, 3), 100, np.uint8)
    rec = write_pair(tmp_path, 'a', img, np.ones((32, 32, 2), np.float32), flow_ext='.flo')
    (tmp_path / 'manifest.jsonl').write_text(json.dumps(rec) + '\n')
    s = ManifestDataset(tmp_path, crop=None, short_side=None, nms_ks=9, grid_stride=8)[0]
    assert torch.allclose(s['flow'], torch.ones(2, 32, 32)) and s['valid'].all()
    # a missing file is named
    (tmp_path / 'manifest.jsonl').write_text(json.dumps(dict(image='missing.png', flow=rec['flow'])) + '\n')
    with pytest.raises(FileNotFoundError, match='missing.png'):
        ManifestDataset(tmp_path)[0]
    # image and flow of different sizes
    write_pair(tmp_path, 'b', np.zeros((20, 20, 3), np.uint8), np.zeros((20, 20, 2), np.float32))
    (tmp_path / 'manifest.jsonl').write_text(json.dumps(dict(image='a.png', flow='b.flow.png')) + '\n')
    with pytest.raises(ValueError, match='b.flow.png'):
        ManifestDataset(tmp_path)[0]
    with pytest.raises(IndexError):
        ManifestDataset(tmp_path)[5]
    (tmp_path / 'manifest.jsonl').write_text('')
    with pytest.raises(ValueError, match='no pairs'):
        ManifestDataset(tmp_path)


def test_shards_are_webdataset_tars_and_deterministic(tmp_path):
    p1 = write_shards(SAMPLES / 'manifest.jsonl', tmp_path / 'a', pairs_per_shard=10)
    p2 = write_shards(ManifestDataset(SAMPLES), tmp_path / 'b', pairs_per_shard=10)
    assert [p.name for p in p1] == ['shard-000000.tar', 'shard-000001.tar', 'shard-000002.tar']
    assert [hashlib.sha1(p.read_bytes()).hexdigest() for p in p1] == [hashlib.sha1(p.read_bytes()).hexdigest() for p in p2]
    with tarfile.open(p1[0]) as tf:
        names = tf.getnames()
        assert all(m.isfile() and m.mtime == 0 for m in tf.getmembers())
    assert names[:3] == ['000000000.png', '000000000.flow.png', '000000000.json'] and len(names) == 30
    first = next(iter_tar_samples(p1[0]))
    meta = json.loads(first['json'])
    assert meta['index'] == 0 and meta['image'] == 'frames/000000_00.png'
    assert first['png'] == (SAMPLES / 'frames' / '000000_00.png').read_bytes()  # image bytes copied as they are
    idx = json.loads((tmp_path / 'a' / 'shards.json').read_text())
    assert idx['total'] == 24 and [s['count'] for s in idx['shards']] == [10, 10, 4]
    with pytest.raises(ValueError, match='pairs_per_shard'):
        write_shards(SAMPLES, tmp_path / 'c', pairs_per_shard=0)


def test_shards_read_by_plain_webdataset_and_no_temp_dirs(tmp_path, monkeypatch):
    "Any WebDataset reader reads the shards; writing and reading them never makes a temporary directory."
    import tempfile, webdataset as wds
    def no_temp_dirs(*a, **k): raise AssertionError('a temporary directory was made')
    monkeypatch.setattr(tempfile, 'TemporaryDirectory', no_temp_dirs)
    monkeypatch.setattr(tempfile, 'mkdtemp', no_temp_dirs)
    paths = write_shards(SyntheticDataset(3), tmp_path, pairs_per_shard=2)      # flow encoded in memory
    got = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert [s['__key__'] for s in got] == ['000000000', '000000001', '000000002']
    assert all({'png', 'flow.png', 'json'} <= set(s) for s in got)
    assert [json.loads(s['json'])['index'] for s in got] == [0, 1, 2]
    flow, valid = decode_flow_png(got[1]['flow.png'])
    assert valid.all() and np.abs(flow - SyntheticDataset(3).raw(1)['flow']).max() <= 1 / 128
    sd = ShardDataset(tmp_path, shuffle=False, crop=32, short_side=32, nms_ks=9, grid_stride=16)
    assert [int(s['index']) for s in sd] == [0, 1, 2]                              # decoded in memory too


def test_shard_dataset_equals_manifest_dataset(tmp_path):
    write_shards(SAMPLES, tmp_path, pairs_per_shard=7)
    ref = ManifestDataset(SAMPLES, color_jitter=0.1, **SMALL)
    sh = ShardDataset(tmp_path, shuffle=False, color_jitter=0.1, **SMALL)
    got = {int(s['index']): s for s in DataLoader(sh, batch_size=None, num_workers=2)}
    assert sorted(got) == list(range(24)) and len(sh) == 24
    assert all(same(got[i], ref[i]) for i in range(24))
    # shuffled: another order, same samples (they only depend on seed, epoch and index)
    order = [int(s['index']) for s in ShardDataset(tmp_path, shuffle=True, buffer=8, **SMALL)]
    assert sorted(order) == list(range(24)) and order != list(range(24))
    sh.set_epoch(3); ref.set_epoch(3)
    s5 = next(s for s in sh if int(s['index']) == 5)
    assert same(s5, ref[5])


@pytest.mark.parametrize('n_shards', [12, 3])  # more shards than readers, and fewer
def test_shards_split_over_ranks_and_workers(tmp_path, n_shards):
    write_shards(SAMPLES, tmp_path, pairs_per_shard=24 // n_shards)
    seen = []
    for rank in range(3):
        sd = ShardDataset(tmp_path, rank=rank, world_size=3, crop=32, short_side=32, nms_ks=9, grid_stride=16)
        seen += [int(s['index']) for s in DataLoader(sd, batch_size=None, num_workers=2)]
    assert sorted(seen) == list(range(24))  # every pair exactly once over 3 ranks x 2 workers


def test_samples_per_epoch_gives_equal_counts(tmp_path):
    write_shards(SAMPLES, tmp_path, pairs_per_shard=5)  # 5 shards of 5,5,5,5,4 pairs over 2 ranks
    counts = []
    for rank in range(2):
        sd = ShardDataset(tmp_path, rank=rank, world_size=2, samples_per_epoch=30, crop=32, short_side=32, nms_ks=9, grid_stride=16)
        counts.append(sum(1 for _ in DataLoader(sd, batch_size=None, num_workers=2)))
        assert len(sd) == 15
    assert counts == [15, 15]


def test_synthetic_dataset_is_seed_indexed_and_matches_sample_set():
    ds = SyntheticDataset(10)
    r = ds.raw(0)
    rec = load_manifest(SAMPLES)[0]  # data_samples pair 0 is scene seed 0, frames 0 -> 1
    assert_same_rendering(r['image'], load_image(rec['image']), rec['image'])
    assert np.abs(r['flow'] - read_flow_png(rec['flow'])[0]).max() <= 1 / 64
    s = ds[3]
    assert set(s) == {'image', 'sparse', 'flow', 'valid', 'index'} and s['image'].shape == (3, 256, 256)
    assert same(s, SyntheticDataset(10)[3])
    val = SyntheticDataset.validation(4)
    assert val.scene_seed == VALIDATION_SEED and not val.transform.train
    assert not np.array_equal(val.raw(0)['image'], r['image'])
    with pytest.raises(ValueError, match='validation range'):
        SyntheticDataset(100, scene_seed=VALIDATION_SEED - 1)
    b = next(iter(DataLoader(SyntheticDataset(4, crop=128), batch_size=4, num_workers=1)))
    assert b['image'].shape == (4, 3, 128, 128)


@pytest.mark.parametrize('seed', range(8))
def test_synthetic_flow_is_exact(seed):
    c = make_clip(seed, size=(160, 224), n_frames=3)
    for t in range(2):
        ok = checkable_mask(c, t)
        assert ok.mean() > 0.5
        e = photometric_error(c['frames'][t], c['frames'][t + 1], c['flows'][t], ok)
        wrong = photometric_error(c['frames'][t], c['frames'][t + 1], c['flows'][t] * 0.9, ok)
        assert e < 1.5 and wrong > e


def test_make_dataset(tmp_path):
    assert isinstance(make_dataset('synthetic:3'), SyntheticDataset)
    assert isinstance(make_dataset(SAMPLES), ManifestDataset)
    write_shards(SAMPLES, tmp_path, pairs_per_shard=12)
    assert isinstance(make_dataset(tmp_path), ShardDataset)
    assert isinstance(make_dataset(str(tmp_path / '*.tar')), ShardDataset)
    assert isinstance(make_dataset(tmp_path / 'shard-000000.tar'), ShardDataset)
    with pytest.raises(FileNotFoundError, match='nowhere'):
        make_dataset(tmp_path / 'nowhere')


def _cmp_synth():
    exe = Path(sys.executable).parent / 'cmp_synth'
    return [str(exe)] if exe.exists() else [sys.executable, '-c', 'import sys; from cmp_nb.synthetic import main; sys.exit(main())']


def test_cmp_synth_cli(tmp_path):
    r = subprocess.run(_cmp_synth() + ['--out', str(tmp_path / 's'), '--clips', '2', '--frames', '2', '--size', '48', '64', '--seed', '5'],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'wrote 2 pairs' in r.stdout
    recs = load_manifest(tmp_path / 's')
    assert [x['seed'] for x in recs] == [5, 6] and recs[0]['height'] == 48
    assert read_flow_png(recs[0]['flow'])[0].shape == (48, 64, 2)
    bad = subprocess.run(_cmp_synth() + ['--out', str(tmp_path / 'x'), '--frames', '1'], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and '--frames >= 2' in bad.stderr


def test_data_samples_are_what_the_command_makes(tmp_path):
    "data_samples/synthetic is regenerated by the command in data_samples/README.md: same manifest, same pixels."
    readme = (ROOT / 'data_samples' / 'README.md').read_text()
    cmd = 'cmp_synth --out data_samples/synthetic --clips 8 --frames 4 --size 256 256 --seed 0'
    assert cmd in readme
    write_synthetic_set(tmp_path, clips=8, frames=4, size=(256, 256), seed=0)
    assert (tmp_path / 'manifest.jsonl').read_text() == (SAMPLES / 'manifest.jsonl').read_text()
    for rec in load_manifest(tmp_path):
        for k in ('image', 'flow', 'instances', 'parts', 'occlusion'):
            new = cv2.imread(rec[k], cv2.IMREAD_UNCHANGED)
            old = cv2.imread(str(SAMPLES / Path(rec[k]).relative_to(tmp_path)), cv2.IMREAD_UNCHANGED)
            assert_same_rendering(new, old, rec[k])


def test_rank_from_torchrun_environment(tmp_path, monkeypatch):
    write_shards(SAMPLES, tmp_path, pairs_per_shard=4)
    seen = []
    for rank in range(2):
        monkeypatch.setenv('RANK', str(rank)); monkeypatch.setenv('WORLD_SIZE', '2')
        seen.append({int(s['index']) for s in ShardDataset(tmp_path, crop=32, short_side=32, nms_ks=9, grid_stride=16)})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(24))


def _ddp_rank(rank, world, shard_dir, init_file, out_dir):
    torch.distributed.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        sd = ShardDataset(shard_dir, crop=32, short_side=32, nms_ks=9, grid_stride=16)  # rank taken from the process group
        dl = DataLoader(sd, batch_size=None, num_workers=1, multiprocessing_context='spawn')  # workers do not see the group
        idx = sorted(int(s['index']) for s in dl)
        (Path(out_dir) / f'{rank}.json').write_text(json.dumps(idx))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_with_spawned_workers_split_the_shards(tmp_path):
    write_shards(SAMPLES, tmp_path / 'shards', pairs_per_shard=4)
    torch.multiprocessing.spawn(_ddp_rank, args=(2, str(tmp_path / 'shards'), str(tmp_path / 'init'), str(tmp_path)), nprocs=2)
    got = [set(json.loads((tmp_path / f'{r}.json').read_text())) for r in range(2)]
    assert not got[0] & got[1] and got[0] | got[1] == set(range(24))


@pytest.mark.benchmark
def test_bench_loader_quick():
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'bench_loader.py'), '--quick'],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert 'pairs/s' in r.stdout and 'verdict' in r.stdout
