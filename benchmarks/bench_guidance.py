"""Guidance sampler speed: cmp_nb.guidance against a straightforward SciPy version of the same steps.

Run from the project root:  .venv/bin/python benchmarks/bench_guidance.py [--repeat N] [--batch B]

Inputs are the Sintel alley_1 ground-truth flow from the shared reference data: a 384x384 crop (short
side resized to 416, centre crop, as in training) and the full 1024x436 frame (which both samplers
subsample by 2 first). Each sampler runs K=81, G=200. The SciPy reference, written here, is the
obvious translation of the released algorithm:
  scipy.signal.convolve2d Sobel (symmetric border) -> magnitude sum -> / max(max, 0.01) > 0.1
  -> scipy.ndimage.distance_transform_edt -> scipy.ndimage.maximum_filter KxK, equal & > 0
  -> outermost rows/columns zeroed -> pairwise Python loop dropping one of any two points closer than (K-1)/2
  in both axes (coin flip) -> grid points -> dense (4,H,W) [u, v, mask, mask] array.
Timings alternate between the implementations (so that machine load hits both alike) and report the
median over repeats. The SciPy steps are single-threaded; cmp_nb is timed both with OpenCV/torch held to
one thread (the algorithms alone) and with their default thread count (what a user gets).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage, signal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cmp_nb.flow import read_flo, resize_flow                      # noqa: E402
from cmp_nb.guidance import sample_guidance, sample_guidance_batch  # noqa: E402

SINTEL_FLO = ROOT.parent / 'shared' / 'data' / 'sintel' / 'clean' / 'alley_1' / 'gt' / 'frame_0002.flo'
SOBEL = np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32)


def scipy_sample_guidance(flow, nms_ks=81, grid_stride=200, seed=0, return_peaks=False):
    """Reference: the released sampler's steps with plain SciPy/NumPy. Returns (points (N,2) x,y, sparse (4,H,W)),
    and with `return_peaks` also the NMS peaks (before close pairs are dropped) as a set of full-resolution (x, y)."""
    rng = np.random.default_rng(seed)
    H, W = flow.shape[:2]
    s = max(1, max(H, W) // 400)
    f = flow[::s, ::s]
    mag = 0
    for c in range(2):
        gx = signal.convolve2d(f[..., c], SOBEL, boundary='symm', mode='same')
        gy = signal.convolve2d(f[..., c], SOBEL.T, boundary='symm', mode='same')
        mag = mag + np.sqrt(gx ** 2 + gy ** 2)
    edges = mag / max(mag.max(), 0.01) > 0.1
    ys = xs = np.zeros(0, np.int64)
    if edges.any():
        dist = ndimage.distance_transform_edt(~edges)
        peaks = (dist == ndimage.maximum_filter(dist, size=nms_ks)) & (dist > 0)
        peaks[0] = peaks[-1] = False; peaks[:, 0] = peaks[:, -1] = False     # the release's remove_border
        ys, xs = np.nonzero(peaks)
    d = (nms_ks - 1) / 2
    alive = [True] * len(ys)
    for i in range(len(ys)):
        for j in range(i + 1, len(ys)):
            if alive[i] and alive[j] and abs(ys[i] - ys[j]) < d and abs(xs[i] - xs[j]) < d:
                if rng.random() < 0.5: alive[i] = False
                else: alive[j] = False
    pts = {(int(x) * s, int(y) * s) for x, y, a in zip(xs, ys, alive) if a}
    for y in range((H % grid_stride) // 2, H, grid_stride):       # grid from (side mod G) // 2, G apart
        for x in range((W % grid_stride) // 2, W, grid_stride):
            pts.add((x, y))
    points = np.array(sorted(pts, key=lambda p: (p[1], p[0])), np.int64).reshape(-1, 2)
    sparse = np.zeros((4, H, W), np.float32)
    sparse[:2, points[:, 1], points[:, 0]] = flow[points[:, 1], points[:, 0]].T
    sparse[2:, points[:, 1], points[:, 0]] = 1
    if return_peaks: return points, sparse, {(int(x) * s, int(y) * s) for x, y in zip(xs, ys)}
    return points, sparse


def agreement(flow, nms_ks=81, grid_stride=200, seed=0):
    """Does cmp_nb compute what the reference computes? The NMS peaks and the grid must be identical; the close-pair
    step is random in both (a coin flip per conflicting pair here, a seeded random visiting order in cmp_nb), so
    there we check that each result keeps only peaks and grid points and no two kept peaks conflict, and for
    cmp_nb also that every dropped peak conflicts with a kept one (the release's pass over pairs does not promise
    that: of a chain a-b-c it may drop a, then b, keeping c alone). Returns a dict of named booleans."""
    ref_pts, ref_sparse, peaks = scipy_sample_guidance(flow, nms_ks, grid_stride, seed, return_peaks=True)
    pts, sparse = sample_guidance(flow, nms_ks=nms_ks, grid_stride=grid_stride, seed=seed)
    H, W = flow.shape[:2]
    s = max(1, max(H, W) // 400)
    grid = {(x, y) for y in range((H % grid_stride) // 2, H, grid_stride) for x in range((W % grid_stride) // 2, W, grid_stride)}
    d = (nms_ks - 1) / 2 * s                                  # conflict distance in full-resolution pixels
    def valid(points, maximal):
        kept = {tuple(p) for p in points.tolist()} - grid
        conflict = lambda a, b: a != b and abs(a[0] - b[0]) < d and abs(a[1] - b[1]) < d
        return (kept <= peaks and grid <= {tuple(p) for p in points.tolist()}
                and not any(conflict(a, b) for a in kept for b in kept)
                and (not maximal or all(any(conflict(p, k) for k in kept) for p in peaks - kept)))
    ours = {tuple(p) for p in pts.tolist()}
    from cmp_nb.guidance import nms_peaks, edge_distance2, flow_edges
    f = np.ascontiguousarray(flow[::s, ::s])
    py, px = nms_peaks(edge_distance2(flow_edges(f)), nms_ks).nonzero()
    return {'same NMS peaks': {(int(x) * s, int(y) * s) for x, y in zip(px, py)} == peaks,
            'reference valid': valid(ref_pts, False), 'cmp_nb valid': valid(pts, True),
            'sparse holds the flow at the points': bool(np.array_equal(sparse.numpy()[:2, pts[:, 1], pts[:, 0]], flow[pts[:, 1], pts[:, 0]].T)
                                                        and sparse.numpy()[2].sum() == len(ours) == len(pts)),
            'same points': ours == {tuple(p) for p in ref_pts.tolist()}}


def timed(fn, repeat):
    "Median and minimum wall time of fn() in ms (after one warm-up call)."
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts)), 1e3 * float(np.min(ts))


def set_threads(n):
    cv2.setNumThreads(n); torch.set_num_threads(n)


def bench_case(name, flow, repeat, batch, threads, devices):
    "Print one size's figures; return the speed-ups of sample_guidance per thread setting."
    pts, _ = sample_guidance(flow, seed=0)
    checks = agreement(flow)
    same = all(v for k, v in checks.items() if k != 'same points')
    ref_ms, fast_ms = [], {t: [] for t in threads}
    for _ in range(5):                              # interleave, so slow phases of a busy machine hit all alike
        set_threads(1)
        ref_ms.append(timed(lambda: scipy_sample_guidance(flow, seed=0), max(1, repeat // 20))[0])
        for t in threads:
            set_threads(t)
            fast_ms[t].append(timed(lambda: sample_guidance(flow, seed=0), max(1, repeat // 5))[0])
    ref = float(np.median(ref_ms))
    print(f'\n{name}: {flow.shape[1]}x{flow.shape[0]}, {len(pts)} points; ' + ', '.join(f'{k}: {v}' for k, v in checks.items()))
    print(f'  scipy reference (1 thread)                        {ref:8.2f} ms/image')
    ratios = {}
    for t in threads:
        ms = float(np.median(fast_ms[t]))
        ratios[t] = ref / ms
        print(f'  cmp_nb sample_guidance ({t} thread{"s" if t > 1 else ""})                  {ms:8.2f} ms/image  {ratios[t]:5.1f}x faster')
    flows = torch.from_numpy(np.ascontiguousarray(flow)).permute(2, 0, 1)[None].repeat(batch, 1, 1, 1)
    for dev in devices:
        fl = flows.to(dev)
        sync = torch.cuda.synchronize if dev.startswith('cuda') else (lambda: None)
        for t in (threads if dev == 'cpu' else threads[-1:]):
            set_threads(t)
            ms = timed(lambda: (sample_guidance_batch(fl, seeds=list(range(batch))), sync()), max(1, repeat // 20))[0] / batch
            print(f'  cmp_nb sample_guidance_batch ({dev}, B={batch}, {t} thr)   {ms:8.2f} ms/image  {ref / ms:5.1f}x')
    return ratios, same


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--repeat', type=int, default=100, help='timed calls of the fast sampler per size and setting')
    ap.add_argument('--batch', type=int, default=8, help='batch size for the torch path')
    args = ap.parse_args()
    if not SINTEL_FLO.exists(): sys.exit(f'reference data not found: {SINTEL_FLO}')
    default_threads = max(cv2.getNumThreads(), 1)
    threads = sorted({1, default_threads})
    flow = read_flo(SINTEL_FLO)
    H, W = flow.shape[:2]
    h, w = 416, round(W * 416 / H)
    y0, x0 = (h - 384) // 2, (w - 384) // 2
    crop = np.ascontiguousarray(resize_flow(flow, (h, w))[y0:y0 + 384, x0:x0 + 384])
    devices = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
    load = ' '.join(f'{x:.1f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'
    print(f'guidance sampler benchmark (K=81, G=200): {os.cpu_count()} CPUs, load average {load}, '
          f'OpenCV {cv2.__version__}, torch {torch.__version__}; median of {args.repeat} calls per setting')
    results = [bench_case('Sintel crop', crop, args.repeat, args.batch, threads, devices),
               bench_case('Sintel full frame', flow, args.repeat, args.batch, threads, devices)]
    for t in threads:
        r = [res[0][t] for res in results]
        print(f'\ntarget >= 10x at both sizes with {t} thread(s): {"met" if min(r) >= 10 else "NOT met"} '
              f'({", ".join(f"{x:.1f}x" for x in r)})')
    set_threads(default_threads)


if __name__ == '__main__':
    main()
