"""Train the pretext family on the quickstart data (equal terms: same encoder, scenes, iterations, batch) and
show what each learned, on held-out synthetic scenes and on Sintel alley_1:

- `flow` (flow prediction without guidance): predicted flow against the truth, EPE against zero flow;
- `cpfs`: embeddings randomly projected to RGB (CPFS Fig. 4) and rows of the flow and embedding kernels
  (CPFS Fig. 2); the held-out loss against its floor and a constant embedding;
- `s3-entropy`: soft segments as colour maps (S3 Fig. 2); the held-out loss against one segment.

    python benchmarks/pretext_runs.py --iters 400 --out data_samples/pretext_runs

Each run is an ordinary `cmp_train` run directory under --runs (resumable with the same command)."""
import argparse, json, time
from pathlib import Path

import numpy as np
import torch

from cmp_nb.baselines import sintel_pair
from cmp_nb.config import load_config, as_config
from cmp_nb.flow import image_to_tensor, flow_to_color
from cmp_nb.pretext import flow_kernel, embedding_kernel, column_softmax, log_normalise_flow, pixel_grid, pixel_values
from cmp_nb.train import train, get_task, build_datasets, collate
from cmp_nb.checkpoint import SeededSamples, sample_seed

ROOT = Path(__file__).resolve().parents[1]
SINTEL = ROOT.parent / 'shared' / 'data' / 'sintel'


def trained(name, args):
    cfg = load_config(ROOT / 'configs' / f'{name}.yaml', ['train.threads=1'] +
                      [f'train.iters={args.iters}', f'ckpt.run_dir={Path(args.runs) / name}', 'ckpt.resume=auto',
                       'log.val_every=0', 'log.image_every=0', f'data.crop={args.crop}', 'log.progress=false'])
    t0 = time.time()
    summary = train(cfg)
    task = get_task(cfg)
    model = task.build_model(); task.setup(model)
    model.load_state_dict(torch.load(Path(cfg['ckpt']['run_dir']) / 'model.pt', weights_only=True)['model'])
    return cfg, task, model.eval(), summary, (time.time() - t0) / 60


def held_out(cfg, n):
    _, val = build_datasets(cfg)
    ds = SeededSamples(val)
    return [ds[(i, sample_seed(12345, 0, i))] for i in range(n)]


def sintel_sample(crop):
    img, flow, valid = sintel_pair(SINTEL, crop=crop, short_side=int(crop * 416 / 384))
    return dict(image=image_to_tensor(img)[0], flow=torch.from_numpy(flow).permute(2, 0, 1).float(),
                valid=torch.from_numpy(valid), sparse=torch.zeros(4, crop, crop), raw=img)


def show(ax, img, title):
    ax.imshow(img); ax.axis('off'); ax.set_title(title, fontsize=8)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='data_samples/pretext_runs')
    p.add_argument('--runs', default='runs/pretext')
    p.add_argument('--iters', type=int, default=400)
    p.add_argument('--crop', type=int, default=192)
    p.add_argument('--scenes', type=int, default=3)
    a = p.parse_args(argv)
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    from cmp_nb.flow import tensor_to_image
    from cmp_nb.tasks import segment_colours
    results = {}
    for name in ('flow', 'cpfs', 's3-entropy'):
        cfg, task, model, summary, minutes = trained(name, a)
        samples = held_out(cfg, a.scenes) + [sintel_sample(a.crop)]
        labels = [f'held-out scene {i}' for i in range(a.scenes)] + ['Sintel alley_1']
        val = task.evaluate(model, [{k: v for k, v in s.items() if k != 'raw'} for s in samples[:-1]], 'cpu', 4, 99)
        sin = task.evaluate(model, [{k: v for k, v in samples[-1].items() if k != 'raw'}], 'cpu', 1, 1)
        results[name] = {'iters': a.iters, 'train_minutes': round(minutes, 2), 'held_out': val, 'sintel_alley_1': sin,
                         'validation_at_end': summary.get('val')}
        print(name, json.dumps(results[name]), flush=True)
        cols = 4 if name == 'cpfs' else 3
        fig, ax = plt.subplots(len(samples), cols, figsize=(3 * cols, 3 * len(samples)))
        for r, (s, lab) in enumerate(zip(samples, labels)):
            b = collate([{k: v for k, v in s.items() if k != 'raw'}])
            img = tensor_to_image(b['image'][0])
            show(ax[r, 0], img, lab)
            with torch.no_grad():
                if name == 'flow':
                    fl = task.panel(model, b, task.predict(model, b))
                    W = img.shape[1]
                    show(ax[r, 1], fl[:, W:2 * W], 'predicted flow (no guidance)')
                    show(ax[r, 2], fl[:, 2 * W:], 'true flow')
                elif name == 's3-entropy':
                    masks = task.predict(model, b)[0]
                    show(ax[r, 1], segment_colours(masks), f'{masks.shape[0]} soft segments')
                    show(ax[r, 2], flow_to_color(b['flow'][0].permute(1, 2, 0).numpy()), 'true flow')
                else:
                    show(ax[r, 1], task.embedding_image(model, b['image']), 'embeddings -> RGB')
                    H, W = img.shape[:2]
                    step = 4
                    pts = pixel_grid(H // step, W // step) * step
                    f = pixel_values(log_normalise_flow(b['flow']), pts)
                    emb = model(b['image'], pts, (H, W))
                    q = int(np.argmax(np.linalg.norm(f[0].numpy(), axis=1)))      # the fastest pixel: a row to show
                    Sf = column_softmax(flow_kernel(f, model.head.sigma))[0, :, q].reshape(H // step, W // step)
                    Se = column_softmax(embedding_kernel(emb))[0, :, q].reshape(H // step, W // step)
                    show(ax[r, 2], Sf.numpy(), 'flow kernel column (fastest pixel)')
                    show(ax[r, 3], Se.numpy(), 'embedding kernel column')
        fig.suptitle(f'{name} after {a.iters} iterations ({minutes:.1f} min)')
        fig.tight_layout(); fig.savefig(out / f'{name}.png', dpi=60); plt.close(fig)
    (out / 'results.json').write_text(json.dumps({'args': vars(a), 'results': results}, indent=1))


if __name__ == '__main__':
    main()
