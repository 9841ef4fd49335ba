"""Checks behind the transfer table: does the fine-tuning budget, not the pre-training, decide the ranking?

Fine-tunes the encoders that `cmp_transfer` pre-trained (in --run, default runs/transfer) at the table's main N
with other fine-tuning settings: the table's own, twice the steps, a 10x higher learning rate, and the encoder
at the head's rate. Same labelled frames, same evaluation frames, one fine-tuning seed per row (the
table's seed-to-seed spread is the yardstick). Prints a markdown table of mIoU (%) and per-class IoU.

Run (after `cmp_transfer --out runs/transfer`, from the repository root):
    .venv/bin/python benchmarks/transfer_checks.py [--run runs/transfer] [--methods random,cmp] [--threads 2]
"""
import argparse
import time
from pathlib import Path

import torch

from cmp_nb.core import pick_device
from cmp_nb.transfer import (SEG_CLASSES, configs_dir, evaluate_segmentation, finetune, labelled_data,
                             load_settings, pretrain)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--run', default='runs/transfer', help="a cmp_transfer output folder (its encoders are reused)")
    p.add_argument('--config', default=None, help='transfer settings (default: configs/transfer/full.yaml)')
    p.add_argument('--methods', default='random,cmp')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    s = load_settings(a.config or configs_dir() / 'transfer' / 'full.yaml')
    run = Path(a.run)
    for m in a.methods.split(','):
        if m != 'random' and not (run / 'pretrain' / m / 'model.pt').is_file():
            p.error(f'no pre-trained {m!r} encoder in {run}/pretrain/{m}/model.pt: run cmp_transfer --out {run} first')
    F_, dev = s['finetune'], pick_device(s['device'])
    n = max(F_['n_train'])
    data = labelled_data(s, run)
    train = {k: v[:n] for k, v in data['train'].items()}
    it, lr, mult = F_['iters'], F_['lr'], F_['encoder_lr_mult']
    variants = [('the table', it, lr, mult), ('twice the steps', 2 * it, lr, mult),
                ('10x learning rate', it, 10 * lr, mult), ('encoder at the head rate', it, lr, 1.0)]
    print(f'main N = {n}, {len(data["eval"]["images"])} evaluation frames, fine-tuning seed {a.seed}, device {dev}')
    print('| method | fine-tuning | steps | lr | encoder lr | mIoU (%) | ' + ' | '.join(SEG_CLASSES) + ' | s |')
    print('|' + '---|' * (7 + len(SEG_CLASSES)))
    for m in a.methods.split(','):
        enc = pretrain(m, s, run)[1]
        for name, steps, lr_, mult_ in variants:
            t0 = time.perf_counter()
            net = finetune(enc, train, steps, F_['batch_size'], lr_, a.seed, dev, False, mult_, F_['hidden'])
            r = evaluate_segmentation(net, data['eval'], dev)
            cls = ' | '.join('-' if v is None else f'{100 * v:.1f}' for v in r['iou'])
            print(f'| {m} | {name} | {steps} | {lr_:g} | {lr_ * mult_:g} | {100 * r["miou"]:.1f} | {cls} | '
                  f'{time.perf_counter() - t0:.0f} |', flush=True)


if __name__ == '__main__':
    main()
