"""How much cheaper is an arrow edit than a full forward pass?

For each preset: `model(image, sparse)` (image encoder + everything) against
`model.propagate(features, sparse)` with the features of `model.encode(image)` cached, at 384x384
on the CPU with 2 threads, eval mode, no grad. Runs of the two are interleaved (so that load from
other processes hits both alike); we report the median of several runs after a warm-up, and the
ratio of the fastest runs too (less sensitive to other processes on a shared machine).

Run: .venv/bin/python benchmarks/bench_propagate.py [--size 384] [--runs 7] [--presets a b ...]
"""
import argparse
import statistics
import time

import torch

from cmp_nb.model import build_model

TARGETS = {'resnet50-skip-official': 5.0, 'resnet50-plain': 15.0}  # required speed-ups


def bench(name: str, size: int, runs: int) -> tuple[list, list]:
    "Run times in ms of (full forward, propagate with cached features)."
    torch.manual_seed(0)
    model = build_model(name).eval()
    image = torch.randn(1, 3, size, size)
    sparse = torch.zeros(1, 4, size, size)
    for x, y, u, v in [(60, 40, 5, -2), (size // 2, size // 2, -3, 4), (size - 60, 90, 0, 0)]:
        sparse[0, :, y, x] = torch.tensor([u, v, 1., 1.])
    full, prop = [], []
    with torch.inference_mode():
        features = model.encode(image)
        model(image, sparse); model.propagate(features, sparse)  # warm-up
        for _ in range(runs):
            t = time.perf_counter(); model(image, sparse); full.append(time.perf_counter() - t)
            t = time.perf_counter(); model.propagate(features, sparse); prop.append(time.perf_counter() - t)
    return [1e3 * t for t in full], [1e3 * t for t in prop]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', type=int, default=384)
    p.add_argument('--runs', type=int, default=7)
    p.add_argument('--presets', nargs='+', default=['resnet50-skip-official', 'resnet50-plain', 'small'])
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    print(f'CPU, {torch.get_num_threads()} threads, {a.size}x{a.size}, median of {a.runs} runs (torch {torch.__version__})')
    print(f'{"preset":24s} {"full ms":>9s} {"propagate ms":>13s} {"ratio":>7s} {"best-run ratio":>15s}  target (on the median)')
    for name in a.presets:
        fulls, props = bench(name, a.size, a.runs)
        full, prop = statistics.median(fulls), statistics.median(props)
        target = TARGETS.get(name)
        verdict = '' if target is None else f'>= {target:.0f}x ' + ('ok' if full / prop >= target else 'MISSED')
        print(f'{name:24s} {full:9.1f} {prop:13.1f} {full / prop:6.1f}x {min(fulls) / min(props):14.1f}x  {verdict}',
              flush=True)


if __name__ == '__main__':
    main()
