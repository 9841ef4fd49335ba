"""The `cmp_prepare` command on real data, run as a user would: in subprocesses.

Covers: an mp4 made from the Sintel alley_1 frames (the 2 -> 3 pair is checked against the ground
truth), resuming after a kill, corrupt videos, frame-folder input, rank sharding, input errors,
an output folder inside the input folder, dangling and looping symlinks.
"""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest

from cmp_nb.flow import load_image, read_flo, read_flow_png, epe, resize_flow
from cmp_nb.estimate import get_estimator
from cmp_nb.prepare import write_video

CLI = Path(sys.executable).parent / 'cmp_prepare'
pytestmark = pytest.mark.skipif(not CLI.exists(), reason=f'{CLI} not installed (pip install -e .)')


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(*args, env=None, timeout=600):
    r = subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env or _env(), timeout=timeout)
    print(f'$ cmp_prepare {" ".join(map(str, args))}  -> exit {r.returncode}\n{r.stdout}{r.stderr[-2000:]}')
    return r


def read_rows(path):
    "Every line of a manifest, parsed (the test wants to see duplicates and torn lines, so no cleaning)."
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def keys(rows):
    return {(r['source_id'], r['frame1'], r['frame2']) for r in rows}


def temp_files(root):
    return [p for p in Path(root).rglob('*') if '.tmp-' in p.name]


@pytest.fixture(scope='module')
def alley(sintel):
    d = sintel / 'clean' / 'alley_1'
    frames = [load_image(d / f'frame_000{i}.png') for i in range(1, 5)]
    gt = read_flo(d / 'gt' / 'frame_0002.flo')
    valid = load_image(d / 'gt' / 'invalid' / 'frame_0002.png')[..., 0] == 0
    return dict(dir=d, frames=frames, gt=gt, valid=valid)


def frame_folder(path, frames, n=None):
    "A folder of PNG frames (cycling through `frames` up to `n`)."
    import cv2
    path.mkdir(parents=True, exist_ok=True)
    for k in range(n or len(frames)):
        cv2.imwrite(str(path / f'frame_{k + 1:04d}.png'), frames[k % len(frames)][..., ::-1])
    return path


def test_mp4_pair_against_ground_truth(alley, tmp_path):
    video = write_video(tmp_path / 'alley_1.mp4', alley['frames'])
    r = run_cli(video, '--out', tmp_path / 'out', '--frame-gap', '1', '--no-progress')
    assert r.returncode == 0, r.stderr
    rows = read_rows(tmp_path / 'out' / 'manifest.jsonl')
    assert [(x['frame1'], x['frame2']) for x in rows] == [(0, 1), (1, 2), (2, 3)]
    row = rows[1]                                      # frames are 0-based: frame_0002 -> frame_0003
    assert row['source'] == str(video) and row['kind'] == 'video' and (row['height'], row['width']) == (436, 1024)
    flow, ok = read_flow_png(tmp_path / 'out' / row['flow'])
    img = load_image(tmp_path / 'out' / row['image'])
    assert ok.all() and flow.shape == (436, 1024, 2) and img.shape == (436, 1024, 3)
    assert np.abs(img.astype(int) - alley['frames'][1]).mean() < 2    # the first image is frame_0002, decoded
    via_video = epe(flow, alley['gt'], alley['valid'])
    direct = epe(get_estimator('dis')(alley['frames'][1], alley['frames'][2]), alley['gt'], alley['valid'])
    print(f'EPE frame 2 -> 3: DIS on the PNG frames {direct:.3f} px, through mp4 + cmp_prepare {via_video:.3f} px')
    assert via_video <= direct + 0.5
    assert 'pairs written 3' in r.stdout and not temp_files(tmp_path / 'out')


CONTAINERS = [('alley.avi', 'mpeg4', None), ('alley.webm', 'libvpx-vp9', None), ('alley.mov', 'libx264', None),
              ('alley.mkv', 'ffv1', 'yuv444p')]


def test_other_containers_and_codecs(alley, tmp_path):
    "avi (MPEG-4), webm (VP9), mov (H.264) and mkv (FFV1, lossless) in one run: every one decodes into 3 good pairs."
    import av
    inp = tmp_path / 'in'; inp.mkdir()
    made = [write_video(inp / name, alley['frames'], codec=codec, pix_fmt=fmt, bit_rate=40_000_000)
            for name, codec, fmt in CONTAINERS if codec in av.codecs_available]
    assert len(made) >= 3, f'PyAV here encodes only {[p.name for p in made]}'
    r = run_cli(inp, '--out', tmp_path / 'out', '--frame-gap', '1', '--no-progress', '--workers', '2')
    assert r.returncode == 0 and 'failed files 0' in r.stdout, r.stdout
    rows = read_rows(tmp_path / 'out' / 'manifest.jsonl')
    direct = epe(get_estimator('dis')(alley['frames'][1], alley['frames'][2]), alley['gt'], alley['valid'])
    for video in made:
        mine = sorted((x for x in rows if x['source'] == str(video)), key=lambda x: x['frame1'])
        assert [(x['frame1'], x['frame2']) for x in mine] == [(0, 1), (1, 2), (2, 3)], (video.name, mine)
        flow, _ = read_flow_png(tmp_path / 'out' / mine[1]['flow'])
        e = epe(flow, alley['gt'], alley['valid'])
        print(f'{video.name}: EPE frame 2 -> 3 {e:.3f} px (DIS on the PNG frames {direct:.3f} px)')
        assert e <= direct + 0.5, video.name


def test_resume_after_kill(alley, tmp_path):
    src = [frame_folder(tmp_path / 'in' / name, alley['frames'], 16) for name in ('a', 'b')]
    out = tmp_path / 'out'
    args = [tmp_path / 'in', '--out', out, '--frame-gap', '1', '--max-side', '512', '--workers', '2', '--no-progress']
    proc = subprocess.Popen([str(CLI), *map(str, args)], env=_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    manifest, t0 = out / 'manifest.jsonl', time.time()
    while time.time() - t0 < 300 and proc.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 4: break
        time.sleep(0.05)
    assert proc.poll() is None, 'the run finished before it could be killed'
    os.killpg(proc.pid, signal.SIGKILL)                # the main process and its workers, mid-run
    proc.wait()
    before = len([line for line in manifest.read_text().splitlines() if line.endswith('}')])
    print(f'killed with {before} manifest rows and {len(temp_files(out))} temporary files on disk')
    assert 4 <= before < 30
    # a write in progress at the moment of the kill, and a torn manifest line
    sid = read_rows(manifest)[0]['source_id']
    (out / 'flows' / sid / '.000012_000013.tmp-r0-p4242.png').write_bytes(b'\x89PNG half')
    with open(manifest, 'a') as f: f.write('{"image": "images/')

    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    rows = read_rows(manifest)
    assert len(rows) == len(keys(rows)) == 30                # 2 folders x 15 pairs, no duplicates, no torn line
    assert not temp_files(out)
    for x in rows:
        flow, ok = read_flow_png(out / x['flow'])
        assert flow.shape == (218, 512, 2) and ok.all() and load_image(out / x['image']).shape == (218, 512, 3)
    n_files = sum(1 for p in (out / 'flows').rglob('*.png')) + sum(1 for p in (out / 'images').rglob('*.png'))
    assert n_files == 2 * 30
    summary = r.stdout
    written = int(summary.split('pairs written ')[1].split(',')[0])
    assert written <= 30 - before, summary                # what was in the manifest was not recomputed

    r = run_cli(*args)                                     # and a third run has nothing to do
    assert 'pairs written 0' in r.stdout and '(2 already complete)' in r.stdout


def test_corrupt_video_is_counted_not_fatal(alley, tmp_path):
    d = tmp_path / 'videos'; d.mkdir()
    small = [f[::4, ::4].copy() for f in alley['frames']]
    good = write_video(d / 'good.mp4', small)
    (d / 'broken.mp4').write_bytes(os.urandom(20000))
    (d / 'truncated.mov').write_bytes(good.read_bytes()[:len(good.read_bytes()) // 3])
    (d / 'readme.txt').write_text('not a video')
    r = run_cli(d, '--out', tmp_path / 'out', '--frame-gap', '1', '--no-progress')
    assert r.returncode == 0
    assert 'broken.mp4' in r.stdout and 'broken.mp4' in r.stderr       # summary and the moment it failed
    n_failed = int(r.stdout.split('failed files ')[1].split()[0])
    assert n_failed in (1, 2)                                         # a truncated file may still decode partly
    rows = read_rows(tmp_path / 'out' / 'manifest.jsonl')
    assert {(x['frame1'], x['frame2']) for x in rows if x['source'].endswith('good.mp4')} == {(0, 1), (1, 2), (2, 3)}
    assert 'ignored (neither video nor image): 1' in r.stdout
    # an unsupported file named directly is tried, reported and counted too; --strict turns failures into exit 1
    r = run_cli(d / 'readme.txt', good, '--out', tmp_path / 'out2', '--frame-gap', '1', '--no-progress', '--strict')
    assert r.returncode == 1 and 'readme.txt' in r.stdout and 'failed files 1' in r.stdout


def test_frame_folder_input(alley, tmp_path):
    d = frame_folder(tmp_path / 'alley_1', alley['frames'])
    r = run_cli(d, '--out', tmp_path / 'out', '--frame-gap', '1', '--max-side', '512', '--image-format', 'jpg',
                '--workers', '2', '--no-progress')
    assert r.returncode == 0, r.stderr
    rows = read_rows(tmp_path / 'out' / 'manifest.jsonl')
    assert [(x['frame1_file'], x['frame2_file']) for x in rows] == [
        ('frame_0001.png', 'frame_0002.png'), ('frame_0002.png', 'frame_0003.png'), ('frame_0003.png', 'frame_0004.png')]
    assert all(x['kind'] == 'frames' and x['image'].endswith('.jpg') and (x['height'], x['width']) == (218, 512) for x in rows)
    flow, _ = read_flow_png(tmp_path / 'out' / rows[1]['flow'])
    gt = resize_flow(alley['gt'], (218, 512))                          # vectors halve with the image
    valid = alley['valid'][::2, ::2]
    e = epe(flow, gt, valid)
    print(f'EPE at 512 px wide: {e:.3f} px (true flow resized)')
    assert flow.shape == (218, 512, 2) and e < 0.5 * epe(np.zeros_like(gt), gt, valid)


def test_rank_sharding(alley, sintel, tmp_path):
    final = [load_image(sintel / 'final' / 'alley_1' / f'frame_000{i}.png') for i in range(1, 5)]
    inp = tmp_path / 'in'
    frame_folder(inp / 'clean', alley['frames'])
    frame_folder(inp / 'final', final)
    write_video(inp / 'alley.mp4', alley['frames'])
    common = [inp, '--frame-gap', '1', '--no-progress']
    ranks = []
    for rank in (0, 1):
        r = run_cli(*common, '--out', tmp_path / 'ranked', env=_env(RANK=rank, WORLD_SIZE=2))
        assert r.returncode == 0, r.stderr
        ranks.append(keys(read_rows(tmp_path / 'ranked' / f'manifest.rank{rank:05d}-of-00002.jsonl')))
    r = run_cli(*common, '--out', tmp_path / 'single')
    full = keys(read_rows(tmp_path / 'single' / 'manifest.jsonl'))
    print('rank shards:', [sorted({k[0] for k in s}) for s in ranks])
    assert len(full) == 9 and ranks[0] and ranks[1]
    assert not ranks[0] & ranks[1] and ranks[0] | ranks[1] == full
    assert keys(read_rows(tmp_path / 'ranked' / 'manifest.jsonl')) == full      # the last rank merged
    (tmp_path / 'ranked' / 'manifest.jsonl').unlink()
    r = run_cli('--merge', '--out', tmp_path / 'ranked')
    assert r.returncode == 0 and keys(read_rows(tmp_path / 'ranked' / 'manifest.jsonl')) == full


def test_input_errors(tmp_path):
    r = run_cli(tmp_path / 'no_such_dir', '--out', tmp_path / 'out')
    assert r.returncode == 2 and 'no_such_dir' in r.stderr and 'does not exist' in r.stderr
    (tmp_path / 'empty').mkdir()
    r = run_cli(tmp_path / 'empty', '--out', tmp_path / 'out')
    assert r.returncode == 2 and 'empty' in r.stderr and 'no videos' in r.stderr
    r = run_cli(tmp_path / 'empty', '--out', tmp_path / 'out', '--frame-gap', '10')
    assert r.returncode == 2 and 'frame_gap' in r.stderr
    r = run_cli('--out', tmp_path / 'out')
    assert r.returncode == 2 and 'no inputs' in r.stderr


def test_out_inside_input_is_not_a_source(alley, tmp_path):
    small = [f[::4, ::4].copy() for f in alley['frames']]
    inputs = {}
    for name in ('single', 'ranked'):
        inp = inputs[name] = tmp_path / name
        frame_folder(inp / 'seq', small)
        write_video(inp / 'clip.mp4', small)
    inp, out = inputs['single'], inputs['single'] / 'pairs'
    args = [inp, '--out', out, '--frame-gap', '1', '--no-progress']
    first = run_cli(*args)
    assert first.returncode == 0 and 'cmp_prepare: 2 sources (0 already complete), pairs written 6,' in first.stdout
    files = sorted(p for p in out.rglob('*') if p.is_file() and p.suffix == '.png')
    second = run_cli(*args)                        # out/images/* and out/flows/* are frame folders now
    assert second.returncode == 0
    assert 'cmp_prepare: 2 sources (2 already complete), pairs written 0, skipped (done before) 6,' in second.stdout
    assert 'ignored' not in second.stdout            # nor are the manifest and the json files of out listed
    assert sorted(p for p in out.rglob('*') if p.is_file() and p.suffix == '.png') == files
    rows = read_rows(out / 'manifest.jsonl')
    assert len(rows) == 6 and {Path(x['source']).name for x in rows} == {'seq', 'clip.mp4'}

    # ranks listing one after the other (rank 1 sees rank 0's outputs) still split the same 2 sources
    inp = inputs['ranked']
    got = []
    for rank in (0, 1):
        r = run_cli(inp, '--out', inp / 'pairs', '--frame-gap', '1', '--no-progress', env=_env(RANK=rank, WORLD_SIZE=2))
        assert r.returncode == 0, r.stderr
        got.append(int(r.stdout.split(f'rank {rank}/2: ')[1].split(' sources')[0]))
    assert got == [1, 1]
    by_name = lambda rows: {(Path(x['source']).name, x['frame1'], x['frame2']) for x in rows}
    assert by_name(read_rows(inp / 'pairs' / 'manifest.jsonl')) == by_name(rows)

    # the output folder itself (or its images/flows) as an input is refused
    r = run_cli(out, '--out', out, '--frame-gap', '1')
    assert r.returncode == 2 and 'is the output folder' in r.stderr
    r = run_cli(out / 'images', '--out', out, '--frame-gap', '1')
    assert r.returncode == 2 and 'is the output folder' in r.stderr


def test_dangling_symlink_is_counted_not_fatal(alley, tmp_path):
    d = tmp_path / 'videos'; d.mkdir()
    write_video(d / 'good.mp4', [f[::4, ::4].copy() for f in alley['frames']])
    (d / 'gone.mp4').symlink_to(tmp_path / 'deleted.mp4')      # dangling
    (d / 'loop.mp4').symlink_to(d / 'loop.mp4')                # points at itself
    for extra, code in [((), 0), (('--workers', '2', '--strict'), 1)]:
        out = tmp_path / f'out{len(extra)}'
        r = run_cli(d, '--out', out, '--frame-gap', '1', '--no-progress', *extra)
        assert r.returncode == code, r.stderr
        assert 'failed files 2' in r.stdout
        assert f'failed: {d / "gone.mp4"}: ' in r.stdout and f'failed: {d / "loop.mp4"}: ' in r.stdout
        assert 'gone.mp4' in r.stderr                                     # named when it failed, too
        rows = read_rows(out / 'manifest.jsonl')
        assert [(x['frame1'], x['frame2']) for x in rows] == [(0, 1), (1, 2), (2, 3)]
        assert all(x['source'] == str(d / 'good.mp4') for x in rows)


def test_cut_off_replaced_and_single_frame_videos(alley, tmp_path):
    """A video cut in half still decodes, only shorter: cmp_prepare names it as incomplete with the gap, counts it,
    does not mark it complete (--strict: exit 1); replaced by the whole video it is redone; one frame is reported."""
    small = [f[::4, ::4].copy() for f in alley['frames']]
    frames = [np.roll(small[k % 4], 2 * k, axis=1) for k in range(24)]
    whole = tmp_path / 'whole'; whole.mkdir()
    full = {'clip.mkv': write_video(whole / 'clip.mkv', frames, codec='ffv1', pix_fmt='yuv444p'),      # duration in the header
            'front.mp4': write_video(whole / 'front.mp4', frames, options={'movflags': 'faststart'})}  # index at the front
    d = tmp_path / 'videos'; d.mkdir()
    for name, p in full.items(): (d / name).write_bytes(p.read_bytes()[:p.stat().st_size // 2])
    write_video(d / 'one.mp4', frames[:1])
    args = [d, '--out', tmp_path / 'out', '--frame-gap', '1', '--no-progress']
    r = run_cli(*args, '--strict')
    assert r.returncode == 1, r.stdout + r.stderr
    assert 'incomplete files 2, failed files 0' in r.stdout, r.stdout
    for name in full:
        line = next(l for l in r.stdout.splitlines() if l.startswith(f'  incomplete: {d / name}: decoded '))
        n = int(line.split('decoded ')[1].split()[0])
        assert 0 < n < 24 and 'of 24 frames' in line and f'{24 - n} missing' in line, line
        assert name in r.stderr                                         # named when it happened, too
    assert f'  too short: {d / "one.mp4"}: 1 frame: no pair' in r.stdout
    cut_rows = len(read_rows(tmp_path / 'out' / 'manifest.jsonl'))
    assert 0 < cut_rows < 2 * 23
    r = run_cli(*args)                                                  # same files: still incomplete, nothing redone
    assert r.returncode == 0 and '(1 already complete)' in r.stdout and 'incomplete files 2' in r.stdout, r.stdout
    assert 'pairs written 0' in r.stdout
    for name, p in full.items(): shutil.copy(p, d / name)              # the whole videos replace the cut ones
    r = run_cli(*args, '--strict')
    assert r.returncode == 0 and 'incomplete files 0' in r.stdout, r.stdout
    assert all(f'redone: {d / name}' in r.stdout for name in full), r.stdout
    rows = read_rows(tmp_path / 'out' / 'manifest.jsonl')
    for name in full:
        assert sorted(x['frame1'] for x in rows if x['source'] == str(d / name)) == list(range(23)), name
    assert len(rows) == len(keys(rows)) == 2 * 23
    r = run_cli(*args)
    assert '(3 already complete), pairs written 0' in r.stdout, r.stdout
