"""Does data loading keep up with training?

Prints loader throughput (pairs/s with 0/1/2 DataLoader workers) for the manifest dataset, the same pairs
read from tar shards, and synthetic scenes rendered on the fly - next to the time of one training step
(forward + backward + SGD step) of the small and the ResNet-50 models at the same batch and crop.

    .venv/bin/python benchmarks/bench_loader.py                      # batch 4, crop 320, CPU
    .venv/bin/python benchmarks/bench_loader.py --crop 384 --device cuda
    .venv/bin/python benchmarks/bench_loader.py --quick              # seconds: tiny settings, small model only
"""
import argparse, os, sys, tempfile, time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cmp_nb.dataset import ManifestDataset, ShardDataset, SyntheticDataset, write_shards  # noqa: E402
from cmp_nb.model import build_model  # noqa: E402
from cmp_nb.losses import DiscreteFlowLoss  # noqa: E402


def loader_rate(ds, batch, workers, batches):
    "Steady pairs/s over `batches` batches (the first batch, which pays for worker start-up, is timed apart)."
    dl = DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True,
                    shuffle=not isinstance(ds, torch.utils.data.IterableDataset))
    t0 = time.perf_counter(); it = iter(dl); next(it); first = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for _, b in zip(range(batches), it): n += len(b['index'])
    dt = time.perf_counter() - t1
    del it
    return (n / dt if n else float('nan')), first


def step_time(name, batch, crop, device, steps):
    "Seconds per training step (forward + loss + backward + SGD step), after one warm-up step."
    model = build_model(name).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loss_fn = DiscreteFlowLoss(model.nbins, model.fmax)
    ds = SyntheticDataset(batch, size=(crop, crop))
    b = torch.utils.data.default_collate([ds[i] for i in range(batch)])
    img, sparse, flow, valid = (b[k].to(device) for k in ('image', 'sparse', 'flow', 'valid'))
    times = []
    for s in range(steps + 1):
        if device.type == 'cuda': torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = loss_fn(model(img, sparse), flow, valid)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        if device.type == 'cuda': torch.cuda.synchronize()
        if s: times.append(time.perf_counter() - t0)
    return sum(times) / len(times), float(loss.detach())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default=str(ROOT / 'data_samples' / 'synthetic'), help='manifest (file or folder)')
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--crop', type=int, default=320, help='crop side; images are resized to short side crop*416/384 first')
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--batches', type=int, default=8, help='timed batches per loader setting')
    p.add_argument('--models', nargs='+', default=['small', 'resnet50-plain'])
    p.add_argument('--steps', type=int, default=2, help='timed training steps per model (after a warm-up step)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--threads', type=int, default=2, help='torch threads of the main process')
    p.add_argument('--quick', action='store_true', help='tiny settings (crop 128, 2 batches, small model, 1 step)')
    a = p.parse_args(argv)
    if a.quick: a.crop, a.batches, a.models, a.steps, a.workers = 128, 2, ['small'], 1, [0, 1]
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    kw = dict(crop=a.crop, short_side=round(a.crop * 416 / 384))
    print(f'== loader: batch {a.batch}, resize short side {kw["short_side"]} + crop {a.crop}, guidance K=81 G=200; '
          f'{os.cpu_count()} CPU cores, torch {torch.__version__}, device {device}')
    rates = {}
    with tempfile.TemporaryDirectory() as shards:
        write_shards(a.data, shards, pairs_per_shard=8)
        sources = {'manifest': lambda: ManifestDataset(a.data, **kw),
                   'shards': lambda: ShardDataset(shards, **kw),
                   'synthetic': lambda: SyntheticDataset(10 ** 6, size=(a.crop, a.crop), crop=a.crop, nms_ks=81, grid_stride=200)}
        print(f'{"source":<11}{"workers":>8}{"pairs/s":>10}{"first batch s":>15}')
        for name, make in sources.items():
            for w in a.workers:
                r, first = loader_rate(make(), a.batch, w, a.batches)
                rates[name, w] = r
                print(f'{name:<11}{w:>8}{r:>10.1f}{first:>15.2f}')
    print(f'\n== train step: batch {a.batch} at {a.crop}x{a.crop} (forward + backward + SGD), device {device}, {a.threads} threads')
    print(f'{"model":<16}{"s/step":>8}{"pairs/s consumed":>18}')
    need = {}
    for m in a.models:
        t, loss = step_time(m, a.batch, a.crop, device, a.steps)
        need[m] = a.batch / t
        print(f'{m:<16}{t:>8.2f}{need[m]:>18.1f}')
    wmax = max(a.workers)
    print(f'\n== verdict (loader with {wmax} workers vs training):')
    for m, n in need.items():
        for src in sources:
            r = rates[src, wmax]
            print(f'{m:<16}{src:<11}{"keeps up" if r >= n else "TOO SLOW":>10}  ({r:.1f} pairs/s loaded vs {n:.1f} consumed)')
    print('(on a shared CPU the loader workers and the training step compete for the same cores; on a GPU box each '
          'rank needs about batch/step_time pairs/s from its workers)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
