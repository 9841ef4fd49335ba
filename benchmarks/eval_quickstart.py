"""Regenerate the numbers of data_samples/quickstart.md: EPE of the shipped quickstart model, of zero flow
and of nearest-guidance flow, on held-out synthetic scenes and on the real Sintel alley_1 pair.

    .venv/bin/python benchmarks/eval_quickstart.py [--checkpoint data_samples/quickstart.pt] [--json out.json]

Sintel (read from ../shared/data/sintel, never copied into the project): clean pass, frame_0002 with its
ground-truth forward flow gt/frame_0002.flo (invalid pixels from gt/invalid excluded). The 1024x436 frame and
flow are resized so the short side is 416 (bilinear; flow vectors scaled by the same factor) and
centre-cropped to 384x384. Guidance is sampled from the ground truth with cmp_nb.guidance.sample_guidance,
with the quickstart's sampler settings and with the paper's (K=81, G=200), each for 10 sampler seeds; the
EPEs are averaged over the seeds.
"""
import argparse, json, sys, time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def sintel_samples(root: Path, nms_ks: int, grid_stride: int, seeds=range(10)) -> list:
    "One sample dict per guidance seed (a list is a dataset for cmp_nb.train.evaluate)."
    from cmp_nb.flow import image_to_tensor
    from cmp_nb.baselines import sintel_pair
    from cmp_nb.guidance import sample_guidance
    img, flow, valid = sintel_pair(root)
    out = []
    for s in seeds:
        _, sparse = sample_guidance(flow, nms_ks=nms_ks, grid_stride=grid_stride, seed=s)
        out.append(dict(image=image_to_tensor(img)[0], sparse=sparse * torch.from_numpy(valid).float(),
                        flow=torch.from_numpy(flow.transpose(2, 0, 1).copy()), valid=torch.from_numpy(valid)))
    return out


def main(argv=None) -> int:
    from cmp_nb.config import load_config
    from cmp_nb.propagator import load_model
    from cmp_nb.train import build_datasets, evaluate
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--checkpoint', default=str(ROOT / 'data_samples' / 'quickstart.pt'))
    p.add_argument('--config', default=str(ROOT / 'configs' / 'quickstart.yaml'))
    p.add_argument('--sintel', default=str(ROOT.parent / 'shared' / 'data' / 'sintel'))
    p.add_argument('--json', help='also write the results here')
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    model = load_model(a.checkpoint)
    cfg = load_config(a.config)
    D = cfg['data']
    results, t0 = {}, time.time()
    _, val = build_datasets(cfg)
    results[f'synthetic held-out ({len(val)} scenes {D["crop"]}x{D["crop"]}, K={D["nms_ks"]} G={D["grid_stride"]})'] = \
        evaluate(model, val, device='cpu', batch_size=8)
    root = Path(a.sintel)
    if (root / 'clean' / 'alley_1' / 'frame_0002.png').exists():
        for K, G in ((D['nms_ks'], D['grid_stride']), (81, 200)):
            ds = sintel_samples(root, K, G)
            r = evaluate(model, ds, device='cpu', batch_size=2)
            npts = np.mean([int((s['sparse'][2] > 0).sum()) for s in ds])
            results[f'Sintel alley_1 clean f2, 384x384, K={K} G={G} ({npts:.1f} points, 10 seeds)'] = r
    else: print(f'Sintel not found at {root}; skipped', file=sys.stderr)
    w = max(len(k) for k in results)
    print(f"{'data':{w}s} {'model':>7s} {'zero flow':>10s} {'nearest guidance':>17s}")
    for k, r in results.items(): print(f"{k:{w}s} {r['epe']:7.3f} {r['epe_zero']:10.3f} {r['epe_nearest']:17.3f}")
    print(f'({time.time() - t0:.0f} s)')
    if a.json: Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
