"""cmp_transfer end to end in --quick mode: every stage runs, the results file has every method, two runs give
the same file, and a rerun skips what is done, resumes a cut-off pre-training and remakes what changed."""
import json, os, subprocess, sys
from pathlib import Path

import pytest

from cmp_nb.transfer import METHODS, load_settings, main, run_transfer

ROOT = Path(__file__).resolve().parents[1]


def test_settings_errors():
    with pytest.raises(SystemExit):                      # argparse error: the unknown key is named on stderr
        main(['--quick', 'finetune.itres=3'])
    with pytest.raises(ValueError, match='2 only with --quick'):
        load_settings(overrides=['finetune.seeds=[0,1]'])


def _check(results: dict, s: dict):
    assert set(results['results']) == set(METHODS)
    k = len(s['finetune']['seeds'])
    for m, r in results['results'].items():
        assert len(r['miou']) == k and len(r['linear_miou']) == k, m
        assert list(r['few_shot']) == [str(n) for n in sorted(s['finetune']['n_train'])], m
        assert r['few_shot'][str(max(s['finetune']['n_train']))] == r['miou'], m
        for v in r['miou'] + r['linear_miou']: assert 0 <= v <= 1, (m, v)
    A = results['analyses']                              # CMP Fig. 4 and 5 in miniature (QUICK has one of each)
    dens = {r['run']: r for r in A['density']}
    assert set(dens) == {'flow', 'cmp', 'cmp@K15-G24'}, list(dens)
    assert dens['flow']['points'] == 0 and dens['cmp@K15-G24']['points'] > dens['cmp']['points'] > 0, dens
    assert [r['points'] for r in A['density']] == sorted(r['points'] for r in A['density'])
    assert dens['cmp']['miou'] == results['results']['cmp']['miou']   # the table's own cmp runs, not new ones
    assert A['density_peak']['run'] in dens
    nets = {r['run']: r['combo'] for r in A['propagation']}
    assert nets == {'cmp@nets1': [1], 'cmp': [1, 2, 4]}, nets
    for r in A['density'] + A['propagation']: assert len(r['miou']) == k and all(0 <= v <= 1 for v in r['miou'])


@pytest.mark.slow
def test_quick_end_to_end(tmp_path):
    s = load_settings(quick=True)
    a, b = tmp_path / 'a', tmp_path / 'b'
    results = run_transfer(s, a, progress=False)
    _check(results, s)
    env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    subprocess.run([sys.executable, '-m', 'cmp_nb.transfer', '--quick', '--out', str(b), '--no-progress'],
                   check=True, cwd=tmp_path, env=env, capture_output=True, timeout=900)
    assert (a / 'results.json').read_bytes() == (b / 'results.json').read_bytes(), 'two runs, two files'
    assert '| cmp@nets1 | {1} |' in (b / 'results.md').read_text()                 # the command's report
    from PIL import Image
    assert Image.open(b / 'results.png').size[0] > 3 * Image.open(b / 'results.png').size[1]   # three charts

    # a rerun: a pre-training cut off after its first checkpoint resumes, a deleted job is remade, the rest
    # is skipped, and the file comes out the same
    run = a / 'pretrain' / 's3-affine'
    ckpts = sorted((run / 'checkpoints').glob('ckpt_*.pt'))
    assert len(ckpts) == 2, ckpts
    ckpts[-1].unlink(); (run / 'model.pt').unlink()
    (a / 'finetune' / 'cmp' / 'full_n4_s1.json').unlink()
    kept = a / 'finetune' / 'flow' / 'linear_n16_s0.json'
    before = {p: p.stat().st_mtime_ns for p in (kept, a / 'pretrain' / 'cpfs' / 'model.pt', a / 'labelled.pt')}
    assert run_transfer(s, a, progress=False) == results
    assert (a / 'results.json').read_bytes() == (b / 'results.json').read_bytes()
    assert {p: p.stat().st_mtime_ns for p in before} == before, 'done stages are skipped'
    assert json.loads((run / 'summary.json').read_text())['iteration'] == s['iters']

    # other fine-tuning settings: the fine-tuning jobs are remade, the pre-training is not
    s2 = load_settings(quick=True, overrides=['finetune.iters=6'])
    r2 = run_transfer(s2, a, progress=False)
    _check(r2, s2)
    assert r2['task']['finetune']['iters'] == 6
    assert json.loads(kept.read_text())['settings']['iters'] == 12        # the linear probe's own linear_iters
    assert json.loads((a / 'finetune' / 'flow' / 'full_n16_s0.json').read_text())['settings']['iters'] == 6
    assert (a / 'pretrain' / 'cpfs' / 'model.pt').stat().st_mtime_ns == before[a / 'pretrain' / 'cpfs' / 'model.pt']


def test_shipped_results_match_full_settings():
    """data_samples/transfer/results.json is the table of configs/transfer/full.yaml: its setup is the one those
    settings describe now (a changed config must be rerun and the file replaced), with every method, >= 3 seeds,
    the few-shot curve and both analyses."""
    from cmp_nb.transfer import configs_dir, task_summary
    got = json.loads((ROOT / 'data_samples' / 'transfer' / 'results.json').read_text())
    s = load_settings(configs_dir() / 'transfer' / 'full.yaml')
    want = task_summary(s)
    assert {k: v for k, v in got['task'].items() if k != 'device'} == {k: v for k, v in want.items() if k != 'device'}
    assert got['task']['quick'] is False
    assert set(got['results']) == set(METHODS)
    k, ns = len(s['finetune']['seeds']), [str(n) for n in sorted(s['finetune']['n_train'])]
    assert k >= 3
    for m, r in got['results'].items():
        assert len(r['miou']) == k and len(r['linear_miou']) == k, m
        assert list(r['few_shot']) == ns and r['few_shot'][ns[-1]] == r['miou'], m
        for v in r['miou'] + r['linear_miou'] + sum(r['few_shot'].values(), []): assert 0 <= v <= 1, (m, v)
    A = got['analyses']
    pts = [r['points'] for r in A['density']]
    assert pts == sorted(pts) and pts[0] == 0 and len(pts) == len(s['analyses']['density']) + 2, pts
    assert A['density_peak']['run'] in {r['run'] for r in A['density']}
    assert sorted(r['combo'] for r in A['propagation']) == sorted(s['analyses']['propagation'] + [[1, 2, 4]])


def test_readme_and_report_show_the_shipped_table():
    """The README's transfer table, data_samples/transfer/results.md and the gap table are what the code makes of
    results.json now (nothing typed in by hand)."""
    from cmp_nb.transfer import results_table, gap_table, analysis_table
    got = json.loads((ROOT / 'data_samples' / 'transfer' / 'results.json').read_text())
    readme = (ROOT / 'README.md').read_text()
    assert results_table(got) in readme, 'README.md does not show the table of data_samples/transfer/results.json'
    assert gap_table(got) in readme, 'README.md does not show the gap table of data_samples/transfer/results.json'
    md = (ROOT / 'data_samples' / 'transfer' / 'results.md').read_text()
    for part in (results_table(got), gap_table(got), analysis_table(got)): assert part in md
    assert (ROOT / 'data_samples' / 'transfer' / 'results.png').stat().st_size > 10_000
