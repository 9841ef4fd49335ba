"""What the quickstart benchmarks share: the CPU setting and the model they measure."""
from pathlib import Path

import torch

from cmp_nb.model import build_model
from cmp_nb.propagator import Propagator, load_model

QUICKSTART = Path(__file__).resolve().parents[1] / 'data_samples' / 'quickstart.pt'


def quickstart_propagator(checkpoint, max_side: int, threads: int = 2):
    """(Propagator on the CPU, label) for the quickstart checkpoint - or for an untrained `small` model, labelled
    as such, when the file is missing. Sets `threads` torch threads and seed 0."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    ck = Path(checkpoint)
    model, label = (load_model(ck), f'quickstart ({ck.name})') if ck.exists() else (build_model('small'), 'UNTRAINED small (no checkpoint)')
    return Propagator(model, device='cpu', max_side=max_side), label
