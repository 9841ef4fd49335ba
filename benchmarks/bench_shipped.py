"""Figures (a)-(e) for every shipped model next to the four baselines, on the same guidance.

    .venv/bin/python benchmarks/bench_shipped.py [--scenes 48] [--models default quickstart] [--json out.json]
                                                 [--markdown out.md]

(a) drag IoU: one arrow at a rigid part's deepest point with its true flow, plus static background points,
    held-out still-camera scenes; the moved region (flow projected on the arrow >= half its length) vs the part.
(b) EPE with every part and the background grid guided by their true flow, held-out moving-camera scenes.
(c) EPE on Sintel alley_1 frame_0002 (clean, final), 384x384 crop of the short-side-416 frame, guidance
    sampled from the ground truth with K=81 G=200 (the paper) and K=31 G=80, 10 sampler seeds.
(d) error at the dragged pixel as a fraction of the arrow, arrows of 5, 10, 20 and 40 px.
(e) static cut: 1 - |flow with a static click on the dragged part| / |flow without it| at the click.
References from the true flow: (a) of the true flow itself (truth_drag_iou); (b) of the true flow averaged over each
part (part mean: one translation per part, the background too) and of each target moved rigidly by its arrow (arrow
per target). (b) is also split by where the error is (cmp_nb.baselines.epe_split): on the guided targets, on the
parts no arrow is on, on the background; the three add up to (b).
A model whose registry entry sets another decoding (cmp_nb.losses.DECODINGS) or edge snapping
(cmp_nb.propagator.snap_to_edges) gets a second row: the network alone (softmax mean, no snapping). With --reading,
a model that sets neither (a bare checkpoint) gets a second row read the way the default model's entry says.

--tune instead measures the first model under each decoding (softmax mean; mode with a window of 1, 3, 6
bins; argmax) and edge-snap strength (0, 30, 100, 300) on tuning scenes: other seeds than the held-out ones, so
that the settings a registry entry recommends are not chosen on the scenes the card reports.
All definitions are in nbs/03c_baselines.ipynb (cmp_nb.baselines). Each model runs through its Propagator
at its training scale; scenes are 192x192 with seeds from cmp_nb.baselines.MEASURE_SEED. CPU, 2 threads.
"""
import argparse, json, sys, time
from pathlib import Path

import torch

from cmp_nb.baselines import (BASELINES, MEASURE_SEED, baseline_method, drag_figures, figures_table, guided_epe,
                              measure_all, measure_scenes, propagator_method, reference_epe_split, split_table,
                              truth_drag_iou)

ROOT = Path(__file__).resolve().parents[1]
TUNE_SEED = MEASURE_SEED + 200_000     # tuning scenes: still camera from here, moving camera from here + 50_000
TARGETS = {'drag_iou': ('>=', 0.8), 'mag_err_5px': ('<=', 0.2), 'mag_err_10px': ('<=', 0.2), 'mag_err_20px': ('<=', 0.2),
           'mag_err_40px': ('<=', 0.2), 'static_cut': ('>=', 0.8)}


def main(argv=None) -> int:
    from cmp_nb.propagator import load_propagator
    from cmp_nb.weights import get_weights
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--scenes', type=int, default=48, help='held-out scenes per scene set (default 48)')
    p.add_argument('--models', nargs='*', default=['default', 'quickstart'], help='weights names or checkpoint paths')
    p.add_argument('--sintel', default=str(ROOT.parent / 'shared' / 'data' / 'sintel'))
    p.add_argument('--json', help='also write the rows here')
    p.add_argument('--markdown', help='also write the markdown table here')
    p.add_argument('--reading', action='store_true',
                   help="also read each model the way the default entry recommends (its decode and edge_snap)")
    p.add_argument('--tune', action='store_true', help='grid of decodings and edge-snap strengths on tuning scenes')
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    if a.tune: return tune(a)
    methods = {}
    for m in a.models:
        prop = load_propagator(m, device='cpu')
        methods[f'model: {m}'] = propagator_method(prop)
        if prop.edge_snap or prop.decode != 'softmax':     # also the network alone: softmax mean, no edge snapping
            methods[f'model: {m} (softmax, no snap)'] = propagator_method(
                load_propagator(m, device='cpu', decode='softmax', edge_snap=0))
        elif a.reading:                                   # and a bare file read as the default model is read
            d = get_weights('default')
            methods[f'model: {m} ({d.decode}, snap {d.edge_snap:g})'] = propagator_method(
                load_propagator(m, device='cpu', decode=d.decode, edge_snap=d.edge_snap))
    methods.update({k: baseline_method(f) for k, f in BASELINES.items()})
    sintel = Path(a.sintel) if (Path(a.sintel) / 'clean' / 'alley_1').is_dir() else None
    if sintel is None: print(f'Sintel not found at {a.sintel}: figure (c) skipped', file=sys.stderr)
    t0 = time.time()
    rows = measure_all(methods, a.scenes, sintel, progress=True)
    table = figures_table(rows)
    print(table)
    truth = truth_drag_iou(measure_scenes(a.scenes))
    print(f'(a) of the true flow itself on the same scenes (a perfect flow predictor): {truth:.3f}')
    refs = reference_epe_split(measure_scenes(a.scenes, seed=MEASURE_SEED + 50_000, still=False))
    parts = refs['part mean']['all']
    print(f'(b) of the true flow averaged over each part (one translation per part): {parts:.3f}')
    splits = {**{k: r['guided_epe_split'] for k, r in rows.items()},
              **{f'reference: {k}': v for k, v in refs.items()}}
    split = split_table(splits)
    print('\n(b) by region (each region\'s error over all pixels; the regions add up to (b)):\n' + split)
    for name, r in rows.items():
        if not name.startswith('model:'): continue
        base = [rows[k] for k in BASELINES]
        checks = [f'{k} {r[k]:.3f} {op} {v}: {"met" if (r[k] >= v if op == ">=" else r[k] <= v) else "NOT met"}'
                  for k, (op, v) in TARGETS.items()]
        half = 0.5 * min(rows['zero flow']['guided_epe'], rows['nearest guidance']['guided_epe'])
        checks.append(f'guided_epe {r["guided_epe"]:.3f} < {half:.3f} (half the better of zero flow and nearest): '
                      f'{"met" if r["guided_epe"] < half else "NOT met"} (one translation per part: {parts:.3f}; on the targets '
                      f'{r["guided_epe_split"]["targets"]:.3f} against {refs["arrow per target"]["targets"]:.3f} '
                      f'for each target moved by its arrow)')
        for k in [k for k in r if k.startswith('sintel_')]:
            best = min(b[k] for b in base[1:])
            checks.append(f'{k} {r[k]:.3f} < {best:.3f} (best of nearest, EPIC, FGS): {"met" if r[k] < best else "NOT met"}')
        print(f'\n{name} against the targets:\n  ' + '\n  '.join(checks))
    print(f'\n({time.time() - t0:.0f} s, {a.scenes} scenes per set)')
    if a.json: Path(a.json).write_text(json.dumps({**rows, 'true flow': {'drag_iou': truth},
                                                   'true flow, mean per part': {'guided_epe': parts},
                                                   'references, (b) by region': refs}, indent=1))
    if a.markdown: Path(a.markdown).write_text(table + f'\n(a) of the true flow itself: {truth:.3f}\n'
                                               f'(b) of the true flow averaged over each part: {parts:.3f}\n\n'
                                               f'(b) by region (the regions add up to (b)):\n\n{split}')
    return 0


def tune(a) -> int:
    "The --tune grid: figures (a), (b), (d), (e) of the first model per decoding and edge-snap strength."
    from functools import partial
    from cmp_nb.losses import logits_to_flow_mode
    from cmp_nb.propagator import load_propagator
    still, moving = measure_scenes(a.scenes, seed=TUNE_SEED), measure_scenes(a.scenes, seed=TUNE_SEED + 50_000, still=False)
    decodings = {'softmax': 'softmax', **{f'mode{w}': partial(logits_to_flow_mode, window=w) for w in (1, 3, 6)},
                 'argmax': 'argmax'}
    rows, t0 = {}, time.time()
    for name, decode in decodings.items():
        for snap in (0, 30, 100, 300):
            m = propagator_method(load_propagator(a.models[0], device='cpu', decode=decode, edge_snap=snap))
            d = drag_figures(m, still, (10,))
            row = rows[f'{name}, snap {snap}'] = {'drag_iou': d['drag_iou'], 'guided_epe': guided_epe(m, moving),
                                                 'mag_err_10px': d['mag_err_10px'], 'static_cut': d['static_cut']}
            print(f'{name}, snap {snap}', {k: round(v, 3) for k, v in row.items()}, flush=True)
    print(figures_table(rows), f'\n({time.time() - t0:.0f} s, {a.scenes} tuning scenes per set, model {a.models[0]})')
    if a.json: Path(a.json).write_text(json.dumps(rows, indent=1))
    if a.markdown: Path(a.markdown).write_text(figures_table(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
