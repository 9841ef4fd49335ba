"""Interactive latency of the quickstart model: what one arrow edit costs on the CPU.

With the quickstart checkpoint (data_samples/quickstart.pt; an untrained `small` model, clearly
labelled, if it has not been trained yet) on a 512x512 photo that the Propagator feeds to the
model at 384x384, 2 threads, eval mode, no grad. Median over interleaved runs of:
  full forward      model(image, sparse): image encoder + motion encoder + decoder (what a
                    naive tool would run per edit)
  propagate only    model.propagate(cached features, sparse): what the canvas runs per edit
  Propagator.predict  propagate + bin decoding + resize to the photo's size (numpy flow)
  canvas edit       FlowCanvas handling one browser update: predict + Middlebury colours (at
                    display size) + JPEG data URL (quality 92) of the flow picture
The browser-side number (drag -> new flow picture on screen) comes from tests/test_browser.py
(test-artifacts/latency.json).

Run: .venv/bin/python benchmarks/bench_latency.py [--runs 9] [--checkpoint PATH] [--json out.json]
"""
import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from skimage import data as skdata

from cmp_nb.flow import image_to_tensor
from quickstart_cpu import QUICKSTART, quickstart_propagator
from cmp_nb.widgets import FlowCanvas

ARROWS = [[200, 150, 230, 140], [300, 330, 290, 360]]
STATIC = [[40, 470], [480, 40]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', type=int, default=9)
    p.add_argument('--checkpoint', default=str(QUICKSTART))
    p.add_argument('--max-side', type=int, default=384)
    p.add_argument('--json', default=None, help='also write the numbers here')
    a = p.parse_args(argv)
    prop, label = quickstart_propagator(a.checkpoint, a.max_side)
    model = prop.model
    img = skdata.astronaut()
    prop.set_image(img)
    sparse = prop.sparse(arrows=ARROWS, static=STATIC)
    image_t = torch.nn.functional.interpolate(image_to_tensor(img), size=prop.in_size, mode='bilinear', align_corners=False)
    canvas = FlowCanvas(prop, img, threaded=False)
    edits = [['arrow', *map(float, r)] for r in ARROWS] + [['static', x, y, x, y] for x, y in STATIC]

    def canvas_edit():
        canvas._handle_msg({'content': {'data': {'method': 'update', 'state': {'edits': edits, 'seq': canvas.seq + 1},
                                                 'buffer_paths': []}}, 'buffers': []})
    jobs = {
        'full forward': lambda: model(image_t, sparse),
        'propagate only': lambda: model.propagate(prop.features, sparse),
        'Propagator.predict': lambda: prop.predict(arrows=ARROWS, static=STATIC),
        'canvas edit': canvas_edit,
    }
    times = {k: [] for k in jobs}
    with torch.inference_mode():
        for f in jobs.values(): f()                      # warm-up
        for _ in range(a.runs):                          # interleaved: background load hits all alike
            for k, f in jobs.items():
                t = time.perf_counter(); f(); times[k].append(1e3 * (time.perf_counter() - t))
    assert canvas.error is None, canvas.status
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f'model: {label}; photo 512x512 -> model input {prop.in_size[1]}x{prop.in_size[0]}; CPU, '
          f'{torch.get_num_threads()} threads; median of {a.runs} interleaved runs (torch {torch.__version__})')
    print(f'{"step":20s} {"median ms":>10s} {"vs full":>8s}')
    for k, v in med.items():
        print(f'{k:20s} {v:10.1f} {med["full forward"] / v:7.1f}x')
    if a.json:
        Path(a.json).write_text(json.dumps(dict(model=label, model_input=list(prop.in_size), runs=a.runs,
                                                median_ms={k: round(v, 2) for k, v in med.items()},
                                                all_ms={k: [round(x, 2) for x in v] for k, v in times.items()}), indent=1))
    canvas.close()


if __name__ == '__main__':
    main()
