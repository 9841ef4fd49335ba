"""Semi-automatic annotation quality: mean IoU after 1, 3 and 5 simulated clicks.

Synthetic scenes with exact object masks (cmp_nb.synthetic, held-out seeds from
cmp_nb.annotate.ANNOTATION_SEED); for each object the first click goes to its most interior
pixel, each next click to the centre (distance-transform maximum) of the largest connected
false-negative (positive click) or false-positive (negative click) region. Each click set is
turned into a mask by cmp_nb.annotate.click_mask: dummy motions in `--directions` directions,
one batched Propagator.predict_many, fused by projection votes.

Defaults (dummy motion 6% of the image side, threshold 0.5, 8 directions) were picked by trying a
few values on the first five scenes from ANNOTATION_SEED; this script reports on other scenes,
from ANNOTATION_SEED + 100, at 192x192 (the quickstart model's training size, fed unresized).

Uses the quickstart checkpoint (data_samples/quickstart.pt), or an untrained `small` model
(clearly labelled) if it has not been trained yet. CPU, 2 threads.

Run: .venv/bin/python benchmarks/bench_annotate.py [--scenes 10] [--size 192] [--per-scene 2]
     [--directions 8] [--fraction 0.06] [--threshold 0.5] [--json out.json]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cmp_nb.annotate import annotation_benchmark, synthetic_tasks, ANNOTATION_SEED
from quickstart_cpu import QUICKSTART, quickstart_propagator



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--scenes', type=int, default=10)
    p.add_argument('--size', type=int, default=192, help='square scene size; the model sees it unresized')
    p.add_argument('--per-scene', type=int, default=2)
    p.add_argument('--seed', type=int, default=ANNOTATION_SEED + 100)
    p.add_argument('--directions', type=int, default=8)
    p.add_argument('--fraction', type=float, default=0.06, help='dummy motion length / longer image side')
    p.add_argument('--threshold', type=float, default=0.5)
    p.add_argument('--no-connected', action='store_true', help='keep mask parts away from positive clicks too')
    p.add_argument('--checkpoint', default=str(QUICKSTART))
    p.add_argument('--json', default=None)
    a = p.parse_args(argv)
    prop, label = quickstart_propagator(a.checkpoint, a.size)
    tasks = synthetic_tasks(a.scenes, (a.size, a.size), a.seed, per_scene=a.per_scene)
    t0 = time.perf_counter()
    res = annotation_benchmark(prop, tasks, n_clicks=5, n_directions=a.directions,
                               magnitude=a.fraction * a.size, threshold=a.threshold, connected=not a.no_connected)
    dt = time.perf_counter() - t0
    per = np.array(list(res['per_task'].values()))
    print(f'model: {label}; {len(tasks)} objects in {a.scenes} synthetic scenes {a.size}x{a.size} (seeds {a.seed}..); '
          f'{a.directions} directions, dummy motion {a.fraction * a.size:.1f} px, threshold {a.threshold}; {dt:.0f} s '
          f'({1e3 * dt / (5 * len(tasks)):.0f} ms per click)')
    print('| clicks | mean IoU | median IoU | objects with IoU >= 0.5 |')
    print('|---|---|---|---|')
    for k, v in res['mean_iou'].items():
        col = per[:, k - 1]
        print(f'| {k} | {v:.3f} | {np.median(col):.3f} | {(col >= 0.5).mean():.0%} |')
    if a.json:
        Path(a.json).write_text(json.dumps(dict(model=label, args=vars(a), seconds=round(dt, 1), mean_iou=res['mean_iou'],
                                                per_task={k: [round(x, 4) for x in v] for k, v in res['per_task'].items()}),
                                           indent=1))


if __name__ == '__main__':
    main()
