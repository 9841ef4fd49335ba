"""Semi-automatic annotation with the standard click protocol: CMP against two baselines that need no learning.

Protocol (RITM, SimpleClick; `cmp_nb.annotate.standard_click`): one object at a time from an empty mask, up to
`--clicks` (20) clicks, each at the pixel deepest inside the error region that reaches deeper (image border counted
as boundary), positive on a false negative, negative on a false positive. Metrics: NoC@80/85/90 (clicks to reach
that IoU, `--clicks` if never), NoF@85/90 (objects that never do), mIoU after 1, 3, 5 clicks, the mIoU curve.

Test sets (`cmp_nb.annotate.annotation_sets`, held-out seeds from ANNOTATION_SEED + 100), reported separately: whole
objects and articulated parts of synthetic scenes, and objects pasted onto real photographs; exact masks.
Methods on the same clicks: CMP (`load_propagator()`, the default model, at its training scale; or --weights;
`CMPClicks`, with anchors: static points it adds from its own previous mask, or on the image's frame at the first
click; focus: each click changes the mask only near itself; and zoom: a later click is answered from a magnified
window around it), CMP (no zoom), CMP (no focus) (anchors only), CMP (no anchors or focus) (the paper's tool: only
the user's clicks are guidance; leave the three out with --no-ablation), CMP + GrabCut
(GrabCut started from CMP's mask: `click_mask(refine='grabcut')`, not in the paper), scikit-image random_walker,
OpenCV GrabCut. s/click is the time per click of each method on this CPU (CMP: all directions in one batch against
cached image features; the image encoding is not counted).

Run: .venv/bin/python benchmarks/bench_annotate.py [--scenes 6] [--clicks 20] [--rule standard] [--json out.json]
     [--plot curve.png] [--weights NAME_OR_PATH] [--no-baselines] [--no-refine] [--no-ablation]
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cmp_nb.annotate import (annotation_benchmark, baselines, results_table, annotation_sets, CLICK_RULES, MAX_CLICKS,
                             CMPClicks)
from cmp_nb.propagator import load_propagator


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--scenes', type=int, default=6, help='scenes per test set')
    p.add_argument('--per-scene', type=int, default=2)
    p.add_argument('--size', type=int, default=192)
    p.add_argument('--clicks', type=int, default=MAX_CLICKS)
    p.add_argument('--rule', default='standard', choices=list(CLICK_RULES))
    p.add_argument('--weights', default=None, help='registry name or file (default: the default model)')
    p.add_argument('--no-baselines', action='store_true')
    p.add_argument('--no-refine', action='store_true', help="leave out CMP + GrabCut (click_mask's refine='grabcut')")
    p.add_argument('--no-ablation', action='store_true',
                   help='leave out CMP without zoom, without focus, and without anchors or focus')
    p.add_argument('--sets', default='objects,parts,photos')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', default=None)
    p.add_argument('--plot', default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads); torch.manual_seed(0)
    prop = load_propagator(a.weights, device='cpu')
    rec = prop.model.record
    label = f"{getattr(rec.weights, 'name', None) or rec.source} (preset {rec.preset}, run at {prop.max_side} px)"
    ablation = {} if a.no_ablation else {'CMP (no zoom)': CMPClicks(prop, zoom=False),
                                         'CMP (no focus)': CMPClicks(prop, focus=False),
                                         'CMP (no anchors or focus)': CMPClicks(prop, anchors=False, focus=False)}
    segs = {'CMP': prop, **ablation,
            **({} if a.no_refine else {'CMP + GrabCut': CMPClicks(prop, refine='grabcut')}),
            **({} if a.no_baselines else baselines())}
    sets = annotation_sets(a.scenes, (a.size, a.size), a.per_scene)
    t0 = time.perf_counter()
    results = {k: annotation_benchmark(segs, sets[k], n_clicks=a.clicks, rule=a.rule) for k in a.sets.split(',')}
    print(f'model: {label}; rule {a.rule}; up to {a.clicks} clicks; {a.scenes} scenes per set at {a.size} px; '
          f'{time.perf_counter() - t0:.0f} s on {a.threads} threads')
    print(results_table(results))
    print('\nmIoU after k clicks:')
    for ts, res in results.items():
        for name, r in res.items(): print(f'{ts:8s} {name:14s}', ' '.join(f'{v:.2f}' for v in r['mIoU']))
    if a.plot:
        import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, len(results), figsize=(4 * len(results), 3), sharey=True)
        for ax_, (ts, res) in zip(np.atleast_1d(ax), results.items()):
            for name, r in res.items(): ax_.plot(range(1, len(r['mIoU']) + 1), r['mIoU'], 'o-', ms=3, label=name)
            ax_.set_title(f'{ts} ({len(r["per_task"])} objects)'); ax_.set_xlabel('clicks'); ax_.grid(alpha=.3)
        np.atleast_1d(ax)[0].set_ylabel('mIoU'); np.atleast_1d(ax)[0].legend(); fig.tight_layout(); fig.savefig(a.plot, dpi=90)
    if a.json:
        Path(a.json).write_text(json.dumps(dict(model=label, args=vars(a), results={
            ts: {n: {k: v for k, v in r.items()} for n, r in res.items()} for ts, res in results.items()}), indent=1))


if __name__ == '__main__':
    main()
