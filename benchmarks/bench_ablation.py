"""The default model's ablation: what the data recipe, the interactive-style guidance and the budget each bring.

    .venv/bin/python benchmarks/bench_ablation.py [--train] [--scenes 24] [--json out.json] [--markdown out.md]

Variants (all the small CPU encoder, batch 8, 192 px crops, on this 2-core CPU):
  quickstart            the shipped quickstart model: plain decoder, classic scenes, the paper's sampler only
  chairs-sampler-400    plain decoder, CHAIRS scenes, the paper's sampler only (data.options.interactive=0), 400 its
  chairs-mixed-400      plain decoder, CHAIRS scenes, half interactive-style guidance, 400 iterations
  stage1-plain          plain decoder (logits at 1/8), CHAIRS scenes, the mix, 3600 its (configs/stage1.yaml)
  stage2-refine         + the refine decoder (logits at 1/4, guidance at 1/4), 40 px shifts, 2000 its
                        (configs/refine.yaml, started from stage1-plain)
  stage3-attend         + attention over the guided cells, 1600 its (configs/attend.yaml, from stage2-refine)
  stage4-attend         stage3-attend with its local term, 1600 more its (configs/attend2.yaml, from stage3-attend)
  stage5-attend         2400 more its with 70% interactive-style guidance (configs/attend3.yaml, from
                        stage4-attend): the previous default, five stages in all
  single-2400           small-attend from scratch in one config, half interactive-style guidance, 40 px shifts,
                        2400 its (configs/single.yaml; its weights are not shipped: read from runs/scratch/model.pt
                        when present)
  fp32-7000             the previous default network: small-attend from scratch in one config, 60% interactive-style
                        guidance, 40 px shifts, 7000 its in float32 (84 minutes); softmax-mean decoding, no edge snap
  default               the shipped default network: the same config in bfloat16 autocast with channels_last, which
                        this CPU trains 1.75x faster, so 12000 its fit the same budget (configs/base.yaml); softmax-mean
                        decoding, no edge snap
  default, as shipped   the same weights as `load_propagator()` runs them: the mode decoding and edge snapping
                        its registry entry recommends (cmp_nb.losses.logits_to_flow_mode, cmp_nb.propagator.snap_to_edges)
total_min adds up the training minutes of a stage and of the stages it started from.
--train runs the two 400-iteration variants into runs/ablation/ first (about 5 minutes each on one core; a variant whose
run dir already holds model.pt is not trained again). Figures (a), (b), (d), (e) as in bench_shipped.py, on
the same held-out scenes (Sintel is left to bench_shipped.py). Training times come from each run's summary.json.
"""
import argparse, json, subprocess, sys, time
from pathlib import Path

import torch

from cmp_nb.baselines import (drag_iou, guided_epe, magnitude_error, measure_scenes, propagator_method, static_cut,
                              figures_table, MEASURE_SEED)

ROOT = Path(__file__).resolve().parents[1]
def _options(interactive: float) -> str:
    "The data.options override of configs/stage1.yaml with another share of interactive-style guidance (JSON is YAML)."
    from cmp_nb.config import load_config
    return 'data.options=' + json.dumps({**load_config(ROOT / 'configs' / 'stage1.yaml')['data']['options'], 'interactive': interactive})

RUNS = {'chairs-sampler-400': ['train.iters=400', 'train.threads=1', _options(0.0)],
        'chairs-mixed-400': ['train.iters=400', 'train.threads=1', _options(0.5)]}
SHIPPED = {'quickstart': ('data_samples/quickstart.pt', 'data_samples/quickstart_run/summary.json'),
           'stage1-plain': ('data_samples/default_run/stage1/model.pt', 'data_samples/default_run/stage1/summary.json'),
           'stage2-refine': ('data_samples/default_run/stage2/model.pt', 'data_samples/default_run/stage2/summary.json'),
           'stage3-attend': ('data_samples/default_run/stage3/model.pt', 'data_samples/default_run/stage3/summary.json'),
           'stage4-attend': ('data_samples/default_run/stage4/model.pt', 'data_samples/default_run/stage4/summary.json'),
           'stage5-attend': ('data_samples/default_run/stage5/model.pt', 'data_samples/default_run/stage5/summary.json'),
           'single-2400': ('runs/scratch/model.pt', 'data_samples/default_run/single/summary.json'),
           'fp32-7000': ('data_samples/default_run/fp32-7000/model.pt', 'data_samples/default_run/fp32-7000/summary.json'),
           'default': ('data_samples/default.pt', 'data_samples/default_run/summary.json'),
           'default, as shipped': ('data_samples/default.pt', 'data_samples/default_run/summary.json')}
AS_SHIPPED = {'default, as shipped'}     # read as the default entry says (decode, edge_snap); the rest: the network alone
HOW = {'single-2400': 'train it: cmp_train --config configs/single.yaml ckpt.run_dir=runs/scratch'}
PARENT = {'stage2-refine': 'stage1-plain', 'stage3-attend': 'stage2-refine', 'stage4-attend': 'stage3-attend',
          'stage5-attend': 'stage4-attend'}


def main(argv=None) -> int:
    from cmp_nb.propagator import load_propagator
    from cmp_nb.weights import get_weights
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--train', action='store_true', help='train the 400-iteration variants first')
    p.add_argument('--scenes', type=int, default=24)
    p.add_argument('--json'); p.add_argument('--markdown')
    a = p.parse_args(argv)
    files = {k: (ROOT / f, ROOT / s) for k, (f, s) in SHIPPED.items()}
    for name, overrides in RUNS.items():
        run = ROOT / 'runs' / 'ablation' / name
        if a.train and not (run / 'model.pt').exists():
            cmd = [sys.executable, '-m', 'cmp_nb.train', '--config', str(ROOT / 'configs' / 'stage1.yaml'), *overrides,
                   f'ckpt.run_dir={run}', 'log.progress=false', 'log.val_every=0', 'log.image_every=0']
            print('training', name, flush=True); subprocess.run(cmd, check=True)
        files[name] = (run / 'model.pt', run / 'summary.json')
    torch.set_num_threads(2)
    drag, moving = measure_scenes(a.scenes), measure_scenes(a.scenes, seed=MEASURE_SEED + 50_000, still=False)
    rows, t0 = {}, time.time()
    for name, (ck, summ) in files.items():
        if not ck.exists():
            how = HOW.get(name, 'run with --train')
            print(f'{name}: {ck} missing, skipped ({how})', file=sys.stderr); continue
        entry = get_weights('default') if name in AS_SHIPPED else None
        prop = load_propagator(str(ck), device='cpu', decode=entry.decode if entry else 'softmax',
                               edge_snap=entry.edge_snap if entry else 0)
        m = propagator_method(prop)
        s = json.loads(summ.read_text()) if summ.exists() else {}
        rows[name] = {'params_M': sum(q.numel() for q in prop.model.parameters()) / 1e6,
                      'iterations': s.get('iteration', float('nan')), 'train_min': s.get('wall_time_s', float('nan')) / 60,
                      'total_min': s.get('wall_time_s', float('nan')) / 60 + (rows.get(PARENT[name], {}).get('total_min', float('nan')) if name in PARENT else 0),
                      'drag_iou': drag_iou(m, drag), 'guided_epe': guided_epe(m, moving),
                      **{f'mag_err_{L}px': v for L, v in magnitude_error(m, drag, (5, 20, 40)).items()},
                      'static_cut': static_cut(m, drag)}
        print(name, {k: round(v, 3) for k, v in rows[name].items()}, flush=True)
    table = figures_table(rows)
    print(table, f'\n({time.time() - t0:.0f} s, {a.scenes} scenes per set)')
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.markdown: Path(a.markdown).write_text(table)
    return 0


if __name__ == '__main__':
    sys.exit(main())
