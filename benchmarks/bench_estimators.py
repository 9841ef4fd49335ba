"""Accuracy and speed of every available flow estimator on real ground truth.

MPI-Sintel alley_1, frame_0002 -> frame_0003, clean and final passes (from ../shared/data/sintel),
end-point error over the pixels the ground truth marks valid, and milliseconds per pair (median of
--repeats timed runs after one warm-up run). RAFT rows say 'weights not available' when the weights
file is neither given (--raft-small-weights / --raft-large-weights) nor in torchvision's cache
(torch.hub.get_dir()/checkpoints); nothing is downloaded.

    .venv/bin/python benchmarks/bench_estimators.py [--device cuda] [--repeats 5]
"""
import argparse, statistics, sys, time
from pathlib import Path

import numpy as np
import torch

from cmp_nb.flow import load_image, read_flo, epe
from cmp_nb.estimate import get_estimator, WeightsNotAvailableError

ROOT = Path(__file__).resolve().parents[1]
SINTEL = ROOT.parent / 'shared' / 'data' / 'sintel'


def load_pair(sintel, render_pass):
    d = sintel / render_pass / 'alley_1'
    return load_image(d / 'frame_0002.png'), load_image(d / 'frame_0003.png')


def time_ms(est, img1, img2, repeats):
    est(img1, img2)                                      # warm-up (allocations, cuDNN autotuning)
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        t0 = time.perf_counter(); flow = est(img1, img2)
        if torch.cuda.is_available(): torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return flow, statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--sintel', type=Path, default=SINTEL)
    ap.add_argument('--device', default=None, help='RAFT device (default: cuda, else mps, else cpu)')
    ap.add_argument('--raft-small-weights', default=None)
    ap.add_argument('--raft-large-weights', default=None)
    ap.add_argument('--repeats', type=int, default=5, help='timed runs per pair (RAFT on a CPU: 1 is plenty)')
    ap.add_argument('--threads', type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import cv2; cv2.setNumThreads(args.threads)
    if not args.sintel.exists(): sys.exit(f'Sintel reference data not found at {args.sintel}')

    gt = read_flo(args.sintel / 'clean' / 'alley_1' / 'gt' / 'frame_0002.flo')
    valid = load_image(args.sintel / 'clean' / 'alley_1' / 'gt' / 'invalid' / 'frame_0002.png')[..., 0] == 0
    pairs = {p: load_pair(args.sintel, p) for p in ('clean', 'final')}
    h, w = gt.shape[:2]
    zero = epe(np.zeros_like(gt), gt, valid)
    print(f'Sintel alley_1 frame_0002 -> frame_0003, {w}x{h}, {int(valid.sum())} valid pixels; '
          f'EPE of zero flow {zero:.3f} px; torch {torch.__version__}, {args.threads} threads\n')

    candidates = [('dis', dict(preset='ultrafast')), ('dis', dict(preset='fast')), ('dis', dict(preset='medium')),
                  ('raft_small', dict(weights=args.raft_small_weights, device=args.device)),
                  ('raft_large', dict(weights=args.raft_large_weights, device=args.device))]
    head = f"{'estimator':<16}{'device':<8}{'EPE clean':>11}{'EPE final':>11}{'ms/pair clean':>15}{'ms/pair final':>15}"
    print(head); print('-' * len(head))
    for name, kw in candidates:
        label = f"{name}-{kw['preset']}" if name == 'dis' else name
        try: est = get_estimator(name, **kw)
        except WeightsNotAvailableError:
            print(f"{label:<16}{'-':<8}{'weights not available':>52}"); continue
        device = str(getattr(est, 'device', 'cpu'))
        repeats = args.repeats if name == 'dis' or device != 'cpu' else 1
        res = {p: time_ms(est, *pairs[p], repeats) for p in pairs}
        e = {p: epe(res[p][0], gt, valid) for p in res}
        print(f"{label:<16}{device:<8}{e['clean']:>11.3f}{e['final']:>11.3f}{res['clean'][1]:>15.1f}{res['final'][1]:>15.1f}")


if __name__ == '__main__':
    main()
