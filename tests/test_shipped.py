"""The shipped default model does CMP's job on held-out scenes: one arrow moves its whole rigid part and
stops at the part's boundary, and a static click on the dragged part holds it; and `cmp_demo`'s pictures of it
show what it predicts.

Thresholds sit well below the measured figures (benchmarks/bench_shipped.py, data_samples/default.md) and
well above what the baselines that ignore rigidity reach on the same scenes, so a regression to the old
blob-shaped propagation fails here while CPU-to-CPU numerical noise cannot.
"""
import json

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from PIL import Image

from cmp_nb.baselines import (drag_figures, drag_iou, measure_scenes, nearest_flow, baseline_method,
                              propagator_method)
from cmp_nb.config import load_config
from cmp_nb.dataset import VALIDATION_SEED
from cmp_nb.demo import PHOTO_DRAGS, QUICKSTART_CONFIG, arrow_sets, drag_photo, main as cmp_demo, picture_flow
from cmp_nb.propagator import Propagator, load_model, load_propagator, show_prediction

# Measured on these 8 scenes with the default model as load_propagator() runs it (configs/base.yaml, mode decoding,
# edge snapping): drag IoU 0.753 (the network alone 0.702, nearest guidance 0.249, the true flow itself 0.754, the
# quickstart model about 0.24), static cut 0.872 (the network alone 0.749, quickstart -0.05), error at the dragged
# pixel under 0.1% of a 10 px and a 30 px arrow. On 48 scenes: the card.
DRAG_IOU_MIN = 0.6
STATIC_CUT_MIN = 0.65
MAG_ERR_MAX = 0.2      # the model issue's target for figure (d)


@pytest.fixture(scope='module')
def scenes():
    return measure_scenes(8)


@pytest.fixture(scope='module')
def default_method():
    torch.set_num_threads(2)
    return propagator_method(load_propagator(device='cpu'))


@pytest.fixture(scope='module')
def figures(scenes, default_method):
    "Figures (a), (d) at 10 and 30 px, and (e) of the default model, each image encoded once."
    return drag_figures(default_method, scenes, (10, 30))


def test_one_arrow_moves_its_whole_part(scenes, figures):
    iou = figures['drag_iou']
    nearest = drag_iou(baseline_method(nearest_flow), scenes)
    assert iou >= DRAG_IOU_MIN, f'drag IoU {iou:.3f} < {DRAG_IOU_MIN} (nearest guidance: {nearest:.3f})'
    assert iou > nearest + 0.15, f'drag IoU {iou:.3f} is not clearly above nearest guidance {nearest:.3f}'


def test_static_click_on_the_dragged_part_holds(figures):
    cut = figures['static_cut']
    assert cut >= STATIC_CUT_MIN, f'a static click cuts the motion at its pixel by only {cut:.0%}'


def test_the_entrys_reading_holds_static_clicks_better(scenes, figures):
    "The mode decoding the default entry asks for makes a static click hold better than the softmax mean does."
    raw = drag_figures(propagator_method(load_propagator(device='cpu', decode='softmax', edge_snap=0)), scenes, (10,))
    assert figures['static_cut'] > raw['static_cut'] + 0.05, (figures['static_cut'], raw['static_cut'])


def test_the_arrow_keeps_its_length(figures):
    err = {L: figures[f'mag_err_{L}px'] for L in (10, 30)}
    assert max(err.values()) < MAG_ERR_MAX, f'error at the dragged pixel as a fraction of the arrow: {err}'


def _shows_the_drag(shown, asked, what):
    "The vector read from a picture points the way of `asked` (within 26 degrees) and has 40% of its length."
    n_shown, n_asked = np.hypot(*shown), np.hypot(*asked)
    cos = float(np.dot(shown, asked)) / (n_shown * n_asked + 1e-9)
    assert cos > 0.9, f'{what}: the picture shows {shown}, not the direction of {asked}'
    assert n_shown >= 0.4 * n_asked, f'{what}: the picture shows only {shown} for {asked}'


def test_demo_pictures_show_the_drags(tmp_path):
    "cmp_demo with the shipped default model only: every picture, read back, shows the motion it was asked for."
    out = tmp_path / 'demo'
    assert cmp_demo(['--out', str(out), '--iters', '0', '--val-size', '8', '--scenes', '1']) == 0
    summary = json.loads((out / 'summary.json').read_text())
    (name, r), = summary['results'].items()
    assert name == 'shipped default (default.pt)', name
    # measured on these 8 scenes: EPE 0.64 px, nearest guidance 1.25, zero flow 3.25 (the five-stage default: 0.63)
    assert r['epe'] < 0.85 * r['epe_nearest'], f"EPE {r['epe']:.3f} is not clearly below nearest guidance's: {r}"
    assert r['epe'] < 0.5 * r['epe_zero'], f"EPE {r['epe']:.3f} is not clearly below zero flow's: {r}"
    pics = [out / f'shipped_0_{k}.png' for k in ('sampled', 'drag_right', 'drag_up_left', 'all_static')]
    pics += [out / f'shipped_photo_{n}.png' for n in PHOTO_DRAGS]
    assert sorted(summary['pictures']) == sorted(map(str, pics))
    for p in pics: assert Image.open(p).size == (880, 320), (p.name, Image.open(p).size)   # 11 x 4 in at 80 dpi

    D = load_config(QUICKSTART_CONFIG)['data']
    sc = arrow_sets(VALIDATION_SEED, D['crop'], D['nms_ks'], D['grid_stride'])     # the scene the demo drew
    mm = max(float(np.abs(sc['flow']).max()), 8.0)
    for k in ('drag_right', 'drag_up_left', 'all_static'):
        pts = sc['sets'][k]
        fig = show_prediction(sc['image'], pts, np.zeros(sc['flow'].shape, np.float32), title=f'shipped: {k}',
                              max_mag=mm, fig=plt.figure(figsize=(11, 4)))          # the demo's layout
        i = -1 if k == 'all_static' else 0                    # the dragged point
        shown = picture_flow(out / f'shipped_0_{k}.png', fig, pts[i, :2], mm)
        plt.close(fig)
        if k == 'all_static': assert np.hypot(*shown) < 1, f'all static, yet the picture shows {shown}'
        else: _shows_the_drag(shown, pts[i, 2:], k)

    torch.set_num_threads(2)
    prop = Propagator(load_model(), device='cpu')
    for n, (arrow, static, _) in PHOTO_DRAGS.items():
        fig = drag_photo(prop, n)[3]                          # the figure the demo saved, laid out the same
        asked = np.subtract(arrow[2:], arrow[:2])
        png = out / f'shipped_photo_{n}.png'
        _shows_the_drag(picture_flow(png, fig, arrow[:2], float(np.hypot(*asked))), asked, n)
        for s in static:                                      # ... and the static clicks hold
            held = picture_flow(png, fig, s, float(np.hypot(*asked)))
            assert np.hypot(*held) < 0.15 * np.hypot(*asked), f'{n}: the static click at {s} shows {held}'
        plt.close(fig)
