"""Short diagnostic runs for the S3 toy (`s3_toy.py`): the same network (S3AffineTask's model) and loss, trained
by a plain Adam loop on clips made once and kept, and scored every `--every` CPU seconds by the best-match IoU
on 32 held-out clips. Settings are compared at equal CPU time (one thread), so that runs on a shared machine
are comparable. The table of `data_samples/s3_toy/results.json` ('diagnostics') comes from runs such as

    python benchmarks/s3_toy_sweep.py --name gain5 --init-gain 5 --cpu 150     # one line per --every CPU s

`--residual expected`: the mask-weighted residual of each segment's own fit, `sum_l m_l rho(A_l x - f)`,
instead of the residual of the recombined flow (a variant, not S3's loss): blending two fits no longer helps."""
import argparse, json, sys, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from s3_toy import ClipDataset, best_match_iou                                           # noqa: E402
from cmp_nb.config import DEFAULTS, merge_config, as_config                              # noqa: E402
from cmp_nb.pretext import affine_loss, affine_fit, affine_basis                         # noqa: E402
from cmp_nb.synthetic import make_clip, make_cube_clip                                   # noqa: E402
from cmp_nb.tasks import S3AffineTask                                                    # noqa: E402


def expected_residual_loss(masks, flow, eps=1e-2):
    "Mask-weighted Charbonnier residual of each segment's own affine fit."
    A = affine_fit(masks, flow)
    B, L, H, W = masks.shape
    pred = torch.einsum('pi,blic->blcp', affine_basis(H, W, A.dtype, A.device), A)      # (B,L,2,P)
    r = torch.sqrt(((pred - flow.flatten(2)[:, None]) ** 2).sum(2) + eps ** 2) - eps
    return (masks.flatten(2) * r).sum(1).mean()


def stack(ds):
    items = [ds[i] for i in range(len(ds))]
    return {k: torch.stack([it[k] for it in items]) for k in ('image', 'flow', 'regions')}


def mean_iou(model, val, size):
    model.eval()
    with torch.no_grad(): seg = model(val['image'], size).argmax(1).numpy()
    model.train()
    return float(np.mean([v for s, r in zip(seg, val['regions'].numpy()) for v in best_match_iou(s, r)]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--name', required=True)
    p.add_argument('--scene', choices=['cube', 'parts'], default='cube')
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--init-gain', type=float, default=30.0)
    p.add_argument('--train-clips', type=int, default=512)
    p.add_argument('--size', type=int, default=64)
    p.add_argument('--residual', choices=['recombined', 'expected'], default='recombined')
    p.add_argument('--cpu', type=float, default=150, help='CPU seconds of training')
    p.add_argument('--every', type=float, default=30)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default=None, help='a JSON file for the log')
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    size = (a.size, a.size)
    make = ((lambda s: make_cube_clip(s, size)) if a.scene == 'cube' else
            (lambda s: make_clip(s, size, 2, n_objects=(0, 1), n_articulated=(1, 2))))
    train, val = stack(ClipDataset(make, range(a.train_clips))), stack(ClipDataset(make, range(10**6, 10**6 + 32)))
    cfg = as_config(merge_config(DEFAULTS, {'task': {'name': 's3-affine'}}))
    torch.manual_seed(a.seed)
    model = S3AffineTask(cfg, n_segments=5, init_gain=a.init_gain).build_model()
    opt = torch.optim.Adam(model.parameters(), a.lr)
    crit = affine_loss if a.residual == 'recombined' else expected_residual_loss
    g, log, it, nxt, t0 = torch.Generator().manual_seed(a.seed), [], 0, 0.0, time.process_time()
    while True:
        el = time.process_time() - t0
        if el >= nxt:
            log.append({'cpu_s': round(el, 1), 'iters': it, 'mean_best_match_iou': round(mean_iou(model, val, size), 3)})
            print(a.name, log[-1], flush=True); nxt += a.every
            if el >= a.cpu: break
        idx = torch.randint(0, a.train_clips, (a.batch,), generator=g)
        loss = crit(model(train['image'][idx], size), train['flow'][idx])
        opt.zero_grad(); loss.backward(); opt.step(); it += 1
    if a.out: Path(a.out).write_text(json.dumps({'args': vars(a), 'log': log}, indent=1))


if __name__ == '__main__':
    main()
