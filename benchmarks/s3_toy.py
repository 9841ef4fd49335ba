"""The S3 toy (S3-CNN paper, Fig. 2a), through cmp_train's Learner: S3-affine with L soft segments learns to
group a textured cube (translating and rotating, orthographic camera) into its faces from exact flow alone.
Then the same on the articulated synthetic scenes against their part masks.

    python benchmarks/s3_toy.py --iters 2000 --threads 1 --out data_samples/s3_toy

Time: 2000 iterations of batch 8 are 6.3 CPU minutes per scene type (one thread; 6.4 min wall on an idle
core); each clip is made once and kept, so the 512 training clips cost about 15 s of CPU once.

Reports, on held-out clips never trained on, the best-match IoU of every ground-truth region (each cube face,
the background; or each rigid part) with the predicted segments (hard: argmax over L), averaged over regions,
for the trained model and for the same network untrained (the baseline), plus pictures."""
import argparse, json, time
from pathlib import Path

import numpy as np
import torch

from cmp_nb.core import atomic_write_text
from cmp_nb.config import DEFAULTS, merge_config, as_config
from cmp_nb.checkpoint import seed_everything
from cmp_nb.flow import image_to_tensor, flow_to_color
from cmp_nb.synthetic import make_clip, make_cube_clip
from cmp_nb.tasks import S3AffineTask, segment_colours
from cmp_nb.train import Learner


class ClipDataset(torch.utils.data.Dataset):
    """Sample dicts (image, flow, valid, zero guidance, regions) of clips made by `make(seed)`. Each clip is
    made once and kept (a 64 px cube clip costs about as much CPU as a training step on it)."""
    def __init__(self, make, seeds):
        self.make, self.seeds, self.cache = make, list(seeds), {}
    def __len__(self): return len(self.seeds)
    def clip(self, i): return self.make(self.seeds[i])
    def __getitem__(self, i):
        i = i[0] if isinstance(i, tuple) else i                     # SeededSamples hands (index, seed)
        if i not in self.cache: self.cache[i] = self.sample(self.clip(i))
        return self.cache[i]
    @staticmethod
    def sample(c) -> dict:
        H, W = c['frames'].shape[1:3]
        return dict(image=image_to_tensor(c['frames'][0])[0], flow=torch.from_numpy(c['flows'][0]).permute(2, 0, 1),
                    valid=torch.ones(H, W, dtype=torch.bool), sparse=torch.zeros(4, H, W),
                    regions=torch.from_numpy(c['parts'][0].astype(np.int64)))


def best_match_iou(seg: np.ndarray, regions: np.ndarray, min_area: int = 30) -> list:
    "For each region id (area >= min_area px) of `regions`, the best IoU with any label of `seg`."
    out = []
    for r in np.unique(regions):
        g = regions == r
        if g.sum() < min_area: continue
        out.append(max(float((g & (seg == s)).sum() / (g | (seg == s)).sum()) for s in np.unique(seg)))
    return out


@torch.no_grad()
def measure(model, ds) -> dict:
    model.eval()
    ious = []
    for i in range(len(ds)):
        s = ds[i]
        masks = model(s['image'][None], s['image'].shape[-2:])[0]
        ious += best_match_iou(masks.argmax(0).numpy(), s['regions'].numpy())
    return {'mean_best_match_iou': float(np.mean(ious)), 'regions': len(ious)}


def run(name, make, args, out):
    cfg = merge_config(DEFAULTS, {
        'task': {'name': 's3-affine', 'kwargs': {'n_segments': args.segments, 'init_gain': args.init_gain}},
        'data': {'crop': args.size}, 'train': {'iters': args.iters, 'batch_size': args.batch, 'device': 'cpu',
                                              'threads': args.threads, 'seed': 0},
        'optim': {'name': 'adam', 'lr': args.lr, 'weight_decay': 0.0, 'warmup_iters': 0},
        'ckpt': {'run_dir': str(Path(args.runs) / name), 'every': max(100, args.iters // 5), 'resume': 'auto'},
        'log': {'every': 50, 'val_every': args.iters, 'val_batches': 2, 'image_every': 0, 'tensorboard': False}})
    train_ds, val_ds = ClipDataset(make, range(args.train_clips)), ClipDataset(make, range(10**6, 10**6 + args.val_clips))

    class Task(S3AffineTask):
        def build_datasets(self): return train_ds, val_ds

    cfg = as_config(cfg)
    task = Task(cfg, n_segments=args.segments, init_gain=args.init_gain)
    seed_everything(cfg.train.seed)                     # the initial weights the Learner will start from
    base = measure(task.build_model(), val_ds)
    learn = Learner(cfg, task=task)
    t0, c0 = time.time(), time.process_time()
    summary = learn.fit()
    model = learn.core
    res = {'trained': measure(model, val_ds), 'untrained': base, 'val_loss': summary['val'],
           'iters': args.iters, 'train_minutes': (time.time() - t0) / 60,
           'train_cpu_minutes': (time.process_time() - c0) / 60}
    # pictures: frame, flow, predicted segments, true regions for 4 held-out clips
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, ax = plt.subplots(4, 4, figsize=(10, 10))
    model.eval()
    for k in range(4):
        c, s = val_ds.clip(k), val_ds[k]
        with torch.no_grad(): masks = model(s['image'][None], s['image'].shape[-2:])[0]
        for j, (img, title) in enumerate([(c['frames'][0], 'frame'), (flow_to_color(c['flows'][0]), 'flow'),
                                          (segment_colours(masks), f'{args.segments} segments'),
                                          (c['parts'][0], 'true regions')]):
            ax[k, j].imshow(img, cmap='tab10' if j == 3 else None); ax[k, j].axis('off')
            if k == 0: ax[k, j].set_title(title)
    fig.suptitle(f"S3-affine, {name}: best-match IoU {res['trained']['mean_best_match_iou']:.2f} "
                 f"(untrained {res['untrained']['mean_best_match_iou']:.2f})")
    fig.tight_layout(); fig.savefig(out / f'{name}.png', dpi=72); plt.close(fig)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='data_samples/s3_toy')
    p.add_argument('--runs', default='runs/s3_toy', help='run directories (checkpoints; resumable)')
    p.add_argument('--iters', type=int, default=2000)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--segments', type=int, default=5)
    p.add_argument('--init-gain', type=float, default=5.0)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--train-clips', type=int, default=512)
    p.add_argument('--val-clips', type=int, default=32)
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--tag', default='', help='suffix of the result names (e.g. _1000its); other entries kept')
    p.add_argument('--only', choices=['cube', 'parts'], default=None)
    a = p.parse_args(argv)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    size = (a.size, a.size)
    scenes = {'cube': lambda s: make_cube_clip(s, size),
              'parts': lambda s: make_clip(s, size, 2, n_objects=(0, 1), n_articulated=(1, 2))}
    path = out / 'results.json'
    rec = json.loads(path.read_text()) if path.exists() else {}
    for name, make in scenes.items():
        if a.only and name != a.only: continue
        key = name + a.tag
        res = run(name, make, a, out)
        rec.setdefault('args', {})[key] = vars(a)
        rec.setdefault('results', {})[key] = res
        print(key, json.dumps(res), flush=True)
        atomic_write_text(path, json.dumps(rec, indent=1))      # each scene's result kept as soon as it is in


if __name__ == '__main__':
    main()
