"""FlowCanvas / AnnotationCanvas driven exactly as the browser drives them: update messages
carrying the edit list and a sequence number go through ipywidgets' own `_handle_msg`."""
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cmp_nb.model import build_model
from cmp_nb.propagator import Propagator, load_propagator
from cmp_nb.widgets import CANVAS_JS, FlowCanvas, split_edits, from_data_url

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / 'data_samples' / 'quickstart.pt'


def browser_update(widget, **state):
    "What arrives when the front end calls model.set(...); model.save_changes()."
    widget._handle_msg({'content': {'data': {'method': 'update', 'state': state, 'buffer_paths': []}},
                        'buffers': []})


def drag(widget, x0, y0, x1, y1):
    "The front end's pointerup after a drag: the previous edits plus one arrow, seq + 1."
    browser_update(widget, edits=list(widget.edits) + [['arrow', x0, y0, x1, y1]], seq=widget.seq + 1)


def click(widget, x, y, kind='static'):
    browser_update(widget, edits=list(widget.edits) + [[kind, x, y, x, y]], seq=widget.seq + 1)


@pytest.fixture(scope='module')
def image():
    rng = np.random.default_rng(0)
    img = np.zeros((200, 300, 3), np.uint8)
    img[...] = (rng.random((200, 300, 1)) * 60).astype(np.uint8)
    img[50:120, 100:200] = (200, 80, 40)
    return img


@pytest.fixture()
def prop():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    return Propagator(build_model('small'), device='cpu')


class Recorder:
    "Wraps model.propagate to keep every sparse input the model actually receives."
    def __init__(self, model):
        self.sparse, self._orig = [], model.propagate
        model.propagate = self

    def __call__(self, features, sparse):
        self.sparse.append(sparse.detach().cpu().clone())
        return self._orig(features, sparse)


def test_widget_without_front_end(prop, image):
    c = FlowCanvas(prop, image, threaded=False)
    assert type(c.comm).__name__ == 'DummyComm'           # no kernel, no browser: still works
    assert (c.img_width, c.img_height) == (300, 200)
    assert c.shown_seq == c.seq == 1 and c.flow.shape == (200, 300, 2)
    assert from_data_url(c.result_url).shape[:2] == c.disp_size
    assert from_data_url(c.legend_url).shape == (96, 96, 3)


# Node's own ES-module parser (vm.SourceTextModule) reads the file: its static imports are the module's requests
# (`moduleRequests`, or `dependencySpecifiers` on older Node); then the module is linked with a linker that refuses
# everything and evaluated in an empty context (no DOM, no fetch), and its exports are listed.
MODULE_CHECK = r"""
import vm from 'node:vm';
import fs from 'node:fs';
const src = fs.readFileSync(process.argv[1], 'utf8');
const m = new vm.SourceTextModule(src, { identifier: 'canvas.js', context: vm.createContext({}) });
const requests = m.moduleRequests ? m.moduleRequests.map((r) => r.specifier) : m.dependencySpecifiers;
let linked = 'yes';
try {
  await m.link((spec) => { throw new Error(`refused import ${spec}`); });
  await m.evaluate();
} catch (e) { linked = String(e.message); }
const ns = linked === 'yes' ? m.namespace : {};
console.log(JSON.stringify({ requests: [...requests], linked, exports: Object.keys(ns),
                             render: typeof (ns.default && ns.default.render) }));
"""


def parse_module(path: Path) -> dict:
    "What Node's module parser says of an ES module file (a missing node skips, except under CI)."
    node = shutil.which('node')
    if node is None:
        if os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no'):
            pytest.fail('node is needed to parse the widget module (CI is set, so this fails instead of skipping)')
        pytest.skip('node is not installed')
    out = subprocess.run([node, '--experimental-vm-modules', '--no-warnings', '--input-type=module', '-e', MODULE_CHECK,
                          str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr            # a syntax error in the module ends here
    return json.loads(out.stdout)


def test_front_end_module_is_self_contained(prop):
    """The widget's ES module, as Node parses it: no static imports at all (so nothing for the page to fetch, and
    a relative import could not resolve either: anywidget loads the module from a blob URL), it evaluates with
    nothing from outside, and it exports `default.render`. Runtime requests are the browser test's part: it
    refuses every request off the machine and asserts that the page made none."""
    assert parse_module(CANVAS_JS) == {'requests': [], 'linked': 'yes', 'exports': ['default'], 'render': 'function'}
    src = CANVAS_JS.read_text()
    code = re.sub(r'//[^\n]*|/\*.*?\*/', '', src, flags=re.S)   # comments out: they load nothing
    for token in ('import(', 'fetch(', 'XMLHttpRequest', 'WebSocket', 'EventSource', 'sendBeacon', 'http:', 'https:'):
        assert token not in code, f'canvas.js uses {token!r}: a way to load something at run time'
    c = FlowCanvas(prop, np.zeros((8, 8, 3), np.uint8), threaded=False)
    assert c._esm == src                                       # the module the browser receives is this file


def test_module_check_sees_imports(tmp_path):
    "The parse above can fail: a module importing from a CDN or a sibling file is reported, and refused."
    bad = tmp_path / 'bad.js'
    bad.write_text("import confetti from 'https://cdn.example/confetti.js';\nimport { x } from './x.js';\n"
                   "export default { render() { confetti(x); } };\n")
    got = parse_module(bad)
    assert got['requests'] == ['https://cdn.example/confetti.js', './x.js'], got
    assert got['linked'].startswith('refused import'), got
    bad.write_text('export default { render( };')
    with pytest.raises(AssertionError, match='SyntaxError'):
        parse_module(bad)


def test_arrow_reaches_model_as_sparse_input(prop, image):
    c = FlowCanvas(prop, image, threaded=False)
    rec = Recorder(prop.model)
    feats = prop.features
    drag(c, 150, 60, 170, 55)
    click(c, 30, 180)
    assert c.shown_seq == c.seq == 3 and c.status.startswith('#3: 1 arrow, 1 static'), c.status
    assert prop.features is feats                           # edits never re-encode
    s = rec.sparse[-1]
    h, w = prop.in_size
    assert s.shape == (1, 4, h, w)
    sx, sy = w / 300, h / 200
    ys, xs = torch.nonzero(s[0, 2], as_tuple=True)
    got = sorted(zip(xs.tolist(), ys.tolist()))
    assert got == sorted([(round(150 * sx), round(60 * sy)), (round(30 * sx), round(180 * sy))])
    ax, ay = round(150 * sx), round(60 * sy)
    np.testing.assert_allclose(s[0, :2, ay, ax].numpy(), [20 * sx, -5 * sy], rtol=1e-5)
    np.testing.assert_allclose(s[0, :2, round(180 * sy), round(30 * sx)].numpy(), [0, 0])
    assert torch.equal(s[0, 2], s[0, 3])                    # the mask, twice
    expected = prop.predict(arrows=[[150, 60, 170, 55]], static=[[30, 180]])
    np.testing.assert_allclose(c.flow, expected, atol=1e-5)
    np.testing.assert_array_equal(c.guidance(), [[150, 60, 20, -5], [30, 180, 0, 0]])


def test_undo_and_clear_messages(prop, image):
    c = FlowCanvas(prop, image, threaded=False)
    drag(c, 150, 60, 170, 55)
    drag(c, 50, 50, 40, 70)
    browser_update(c, edits=c.edits[:-1], seq=c.seq + 1)    # Undo: the list minus its last edit
    np.testing.assert_allclose(c.flow, prop.predict(arrows=[[150, 60, 170, 55]]), atol=1e-5)
    browser_update(c, edits=[], seq=c.seq + 1)              # Clear
    np.testing.assert_allclose(c.flow, prop.predict(), atol=1e-5)
    assert c.status.startswith(f'#{c.seq}: 0 arrows, 0 static')


@pytest.mark.parametrize('size', [(37, 91), (600, 220), (384, 384)])
def test_any_image_size(prop, size):
    img = np.full(size + (3,), 128, np.uint8)
    H, W = size
    c = FlowCanvas(prop, img, threaded=False)
    drag(c, W - 1, H - 1, W - 10, H - 5)                    # the corner pixel maps inside the model frame
    assert c.error is None, c.status
    assert c.flow.shape == (H, W, 2)
    dh, dw = c.disp_size
    assert from_data_url(c.result_url).shape == (dh, dw, 3) and abs(dh / dw - H / W) < 0.05


def test_rewound_and_bad_messages(prop, image):
    c = FlowCanvas(prop, image, threaded=False)
    drag(c, 150, 60, 170, 55)
    shown = c.shown_seq
    browser_update(c, edits=[['static', 1, 1, 1, 1]], seq=shown - 1)   # seq went backwards (another view, a reload)
    assert c.stats['rewound'] == 1 and c.seq == c.shown_seq == shown + 1 and c.status.startswith(f'#{shown + 1}: 0 arrows, 1 static')
    for k in range(3):                                                # and the edits after it are not dropped either
        click(c, 10 + k, 10)
        assert c.shown_seq == c.seq and f'{k + 2} static' in c.status, c.status
    browser_update(c, edits=[['arrow', 400, 10, 410, 10]], seq=c.seq + 1)
    assert 'error' in c.status and 'outside' in c.status and c.shown_seq == c.seq
    browser_update(c, edits=[['wiggle', 1, 1, 1, 1]], seq=c.seq + 1)
    assert "unknown kind 'wiggle'" in c.status and c.shown_seq == c.seq
    for bad in (5, None, 2.5, 'arrow', {'kind': 'arrow'}):              # an edit item that is not a list
        n_err = c.stats['errors']
        browser_update(c, edits=[bad], seq=c.seq + 1)
        assert c.status.startswith(f'#{c.seq}: error: ValueError: edit 0 must be [kind, x0, y0, x1, y1]'), c.status
        assert c.shown_seq == c.seq and c.stats['errors'] == n_err + 1
    browser_update(c, edits=[['arrow', 10, 10, 20, 20]], seq=c.seq + 1)   # still alive
    assert c.error is None and c.shown_seq == c.seq


class HeldPropagator:
    "Propagator wrapper: predictions wait at `gate` (an Event the test opens); records what was computed, in order."
    def __init__(self, prop):
        self.prop, self.calls, self.threads, self.finished = prop, [], set(), 0
        self.cond, self.gate = threading.Condition(), threading.Event()
        self.gate.set()

    def set_image(self, img): return self.prop.set_image(img)

    @property
    def image(self): return self.prop.image

    def wait_calls(self, n, timeout=30):
        "Block until `n` predictions have started."
        with self.cond:
            return self.cond.wait_for(lambda: len(self.calls) >= n, timeout)

    def predict(self, **kw):
        with self.cond:
            self.threads.add(threading.current_thread().name)
            self.calls.append(kw)
            self.cond.notify_all()
        assert self.gate.wait(60), 'the test never opened the gate'   # a safety net, not a timing
        out = self.prop.predict(**kw)
        with self.cond:
            self.finished += 1
        return out


def held_canvas(prop, image):
    "A threaded canvas whose first (unguided) prediction is done, with the gate closed afterwards."
    held = HeldPropagator(prop)
    c = FlowCanvas(held, image)
    assert c.wait(30)
    held.gate.clear()
    return held, c


def test_latest_edit_wins(prop, image):
    held, c = held_canvas(prop, image)
    n0, done0 = len(held.calls), held.finished
    browser_update(c, edits=[['arrow', 150, 60, 152, 60]], seq=c.seq + 1)
    assert held.wait_calls(n0 + 1)                          # the worker is inside the model call ...
    assert held.finished == done0                           # ... which cannot finish: the handler returned first
    for i in range(1, 6):                                   # five more edits while it is held
        browser_update(c, edits=[['arrow', 150, 60, 152 + 3 * i, 60]], seq=c.seq + 1)
    assert len(held.calls) == n0 + 1 and held.finished == done0   # none of the handlers ran or waited for the model
    assert c._pending[0] == c.seq and c.stats['skipped'] == 4     # one pending slot, holding the newest edit
    held.gate.set()
    assert c.wait(30)
    assert c.shown_seq == c.seq
    assert len(held.calls) - n0 == 2                        # the held edit and the newest one: nothing in between
    np.testing.assert_allclose(held.calls[-1]['arrows'], [[150, 60, 167, 60]])   # the last edit was computed last
    np.testing.assert_allclose(c.flow, prop.predict(arrows=[[150, 60, 167, 60]]), atol=1e-5)   # and is shown
    assert c.stats['dropped'] == 1                          # the held edit finished outdated
    assert held.threads == {'FlowCanvas-worker'}
    c.close()
    c._worker.join(10)
    assert not c._worker.is_alive()


def test_result_superseded_while_computing_is_dropped(prop, image):
    held, c = held_canvas(prop, image)
    n0 = len(held.calls)
    shown = []
    c.observe(lambda ch: shown.append(ch['new']), names='shown_seq')
    drag(c, 150, 60, 160, 60)
    assert held.wait_calls(n0 + 1)       # its prediction is running (held at the gate)
    drag(c, 150, 60, 170, 60)            # arrives while the first is running
    held.gate.set()
    assert c.wait(30)
    assert len(held.calls) == n0 + 2     # both were computed ...
    assert shown == [c.seq], shown       # ... but the superseded result was never shown
    assert c.stats['dropped'] == 1
    np.testing.assert_allclose(c.flow, prop.predict(arrows=[[150, 60, 170, 60]]), atol=1e-5)
    c.close()


def test_superseded_error_is_never_shown(prop, image):
    held, c = held_canvas(prop, image)
    n0 = len(held.calls)
    statuses = []
    c.observe(lambda ch: statuses.append(ch['new']), names='status')
    drag(c, 400, 10, 410, 10)            # outside the 300x200 image: this prediction will fail ...
    assert held.wait_calls(n0 + 1)
    browser_update(c, edits=[['arrow', 150, 60, 170, 60]], seq=c.seq + 1)   # ... but is replaced first
    held.gate.set()
    assert c.wait(30)
    assert c.stats['errors'] == 1 and c.stats['dropped'] == 1   # the error happened, and was dropped
    assert c.error is None and statuses == [c.status], statuses
    assert c.status.startswith(f'#{c.seq}: 1 arrow'), c.status
    drag(c, 400, 10, 410, 10)            # an error that is the latest edit is shown, as before
    assert c.wait(30) and 'outside' in c.status and isinstance(c.error, ValueError)
    c.close()


class WatchedLock:
    "Wraps the canvas's publish lock; `contended` is set when `thread` is about to wait for it."
    def __init__(self, lock):
        self.lock, self.thread, self.contended = lock, None, threading.Event()

    def __enter__(self):
        if threading.current_thread() is self.thread: self.contended.set()
        self.lock.acquire()
        return self

    def __exit__(self, *exc):
        self.lock.release()


def test_publish_is_atomic_with_new_edits(prop, image):
    "A new edit arriving in the middle of publishing a result waits until the result is out, then supersedes it."
    c = FlowCanvas(prop, image)
    assert c.wait(30)
    lock = c._publish_lock = WatchedLock(c._publish_lock)
    first = c.seq + 1
    seen = []                                           # (shown_seq, newest edit seq) at each publication

    def newer_edit():
        browser_update(c, edits=[['arrow', 150, 60, 170, 60]], seq=first + 1)

    def mid_publish(ch):                                # runs on the worker, inside the publication
        if lock.thread is None and ch['new'].startswith(f'#{first}:'):
            lock.thread = threading.Thread(target=newer_edit)
            lock.thread.start()
            seen.append(('mid', lock.contended.wait(20), c._latest))   # the new edit reached the lock, not past it
    c.observe(mid_publish, names='status')
    c.observe(lambda ch: seen.append((ch['new'], c._latest)), names='shown_seq')
    browser_update(c, edits=[['arrow', 150, 60, 160, 60]], seq=first)
    assert c.wait(30) and lock.thread is not None
    lock.thread.join(30)
    assert c.wait(30) and c.shown_seq == first + 1
    assert seen == [('mid', True, first), (first, first), (first + 1, first + 1)], seen
    np.testing.assert_allclose(c.flow, prop.predict(arrows=[[150, 60, 170, 60]]), atol=1e-5)
    c.close()


@pytest.mark.parametrize('size, want', [((900, 200), (448, 100)), ((1000, 1000), (448, 448)), ((200, 300), (200, 300))])
def test_display_height_is_capped(prop, size, want):
    img = np.full(size + (3,), 128, np.uint8)
    H, W = size
    c = FlowCanvas(prop, img, threaded=False)
    dh, dw = c.disp_size
    assert (dh, dw) == want and (c.display_height, c.display_width) == want
    assert abs(dw / dh - W / H) < 1 / dh + 1 / dw       # the aspect ratio, up to rounding one side
    assert from_data_url(c.image_url).shape == from_data_url(c.result_url).shape == (dh, dw, 3)
    # the front end's pointer -> image mapping: x * img_width / display_width, y * img_height / display_height
    to_img = lambda px, py: (px * c.img_width / c.display_width, py * c.img_height / c.display_height)
    assert to_img(dw, dh) == (W, H) and to_img(0, 0) == (0, 0)        # the canvas edges are the image edges
    x0, y0 = to_img(0.75 * dw, 0.5 * dh)
    drag(c, x0, y0, x0 + 10, y0)
    assert c.error is None, c.status
    np.testing.assert_allclose(c.guidance(), [[0.75 * W, 0.5 * H, 10, 0]], rtol=1e-6)
    c.close()


def test_display_height_options(prop):
    img = np.full((900, 200, 3), 128, np.uint8)
    assert FlowCanvas(prop, img, max_display_height=None, threaded=False).disp_size == (1152, 256)   # no cap
    assert FlowCanvas(prop, img, display_width=150, threaded=False).disp_size == (448, 100)         # cap wins
    assert FlowCanvas(prop, img, display_width=50, threaded=False).disp_size == (225, 50)           # fits


def test_official_checkpoint(official_fixtures, image):
    from cmp_nb.model import load_official_checkpoint
    ck = official_fixtures / 'official_resnet50_skiplayer_random_fp16.pth.tar'
    model = load_official_checkpoint(ck)
    c = FlowCanvas(Propagator(model, device='cpu', max_side=256), image, threaded=False)
    drag(c, 150, 60, 170, 55)
    click(c, 30, 180)
    assert c.error is None, c.status
    assert c.flow.shape == (200, 300, 2) and np.isfinite(c.flow).all()
    np.testing.assert_allclose(c.flow, c.prop.predict(arrows=[[150, 60, 170, 55]], static=[[30, 180]]), atol=1e-4)
    c2 = FlowCanvas.from_checkpoint(ck, image, device='cpu', max_side=256, threaded=False)   # the one-liner
    c2.edit(arrows=[[150, 60, 170, 55]], static=[[30, 180]])
    np.testing.assert_allclose(c2.flow, c.flow, atol=1e-4)


@pytest.mark.skipif(not QUICKSTART.exists(), reason=f'{QUICKSTART} not trained yet')
def test_quickstart_checkpoint(image):
    c = FlowCanvas.from_checkpoint(QUICKSTART, image, device='cpu', threaded=False)
    drag(c, 150, 85, 175, 85)
    assert c.error is None and np.isfinite(c.flow).all()
    # a trained model moves the dragged pixel roughly as told
    u, v = c.flow[85, 150]
    assert u > 5 and abs(v) < 10, (u, v)


def test_annotation_canvas_messages(prop, image, tmp_path):
    from cmp_nb.annotate import AnnotationCanvas, CMPClicks, load_mask
    rec = Recorder(prop.model)
    c = AnnotationCanvas(prop, image, threaded=False, n_directions=4)
    assert c.mode == 'annotate' and not c.mask.any() and rec.sparse == []   # no clicks: no prediction
    click(c, 150, 85, 'pos')
    click(c, 20, 20, 'neg')
    assert c.status.startswith('#3: 1 positive, 1 negative'), c.status
    s = rec.sparse[-1]
    assert s.shape[0] == 4                                   # one batch, one guidance set per direction
    assert len(c.anchors) > 0, 'no anchors after two clicks'
    # each set: the positive click, the negative click and the tool's anchors (static points from its first mask)
    assert (s[:, 2].flatten(1).sum(1) == 2 + len(c.anchors)).all(), (s[:, 2].flatten(1).sum(1), len(c.anchors))
    np.testing.assert_array_equal(c.mask, CMPClicks(prop, n_directions=4)([[150, 85]], [[20, 20]]))
    np.testing.assert_array_equal(load_mask(c.save_mask(tmp_path / 'm.png')), c.mask)
    browser_update(c, edits=[['arrow', 1, 1, 5, 5]], seq=c.seq + 1)
    assert 'pos/neg clicks only' in c.status


def test_split_edits_errors():
    with pytest.raises(ValueError, match='edit 1'):
        split_edits([['static', 1, 1, 1, 1], ['arrow', 1, 2]])
    with pytest.raises(TypeError, match='Propagator'):
        FlowCanvas(object(), np.zeros((8, 8, 3), np.uint8))
