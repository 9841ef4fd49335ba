"""The arrow canvas in a real browser: JupyterLab (offline, token, 127.0.0.1) + Debian's headless
Chromium driven by playwright. Runs a small demo notebook, drags arrows on the canvas, and checks
that Python received them and the flow picture changed; measures drag -> new flow latency.

Artifacts (gitignored): test-artifacts/browser_canvas.png (the page after the first drag),
test-artifacts/browser_widget.png (the widget alone after the first drag, checked to show the red arrow on the
photo and the flow picture beside it; nbs/images/canvas_jupyterlab.png in 06_widgets is a copy of one),
test-artifacts/browser_canvas_final.png, test-artifacts/browser_annotate.png, test-artifacts/latency.json.
The page gets no internet: every request to anything but the local JupyterLab is aborted, and
the test fails if there was any (the widget and JupyterLab must work offline).
Needs /usr/bin/chromium (tools/install_browser.sh), playwright and jupyterlab. When one is missing
the test is skipped, with the reason - except under CI (the CI environment variable set, e.g.
CI=true), where a missing piece is a test failure: CI must never pass by not running this.
Any JavaScript error on the page fails the test (uncaught exceptions and console errors: the
widget's ES module, anywidget and the widget manager report there), except a short allow-list of
browser noise unrelated to the widget (failed network lookups of an offline machine, favicon)."""
import importlib.util
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import numpy as np
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = Path('/usr/bin/chromium')
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / 'test-artifacts'
QUICKSTART = ROOT / 'data_samples' / 'quickstart.pt'
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--no-first-run']

pytestmark = pytest.mark.browser


def _in_ci() -> bool:
    return os.environ.get('CI', '').strip().lower() not in ('', '0', 'false', 'no')


def _missing() -> list:
    "What the browser test needs and this machine lacks."
    out = [] if CHROMIUM.exists() else [f'chromium ({CHROMIUM} is missing: run tools/install_browser.sh)']
    return out + [f'the {m} package (install the dev requirements)' for m in ('playwright', 'jupyterlab')
                  if importlib.util.find_spec(m) is None]


def require_browser_stack():
    "Skip (with the reason) when something is missing - but fail under CI, where skipping would hide it."
    missing = _missing()
    if not missing: return
    msg = 'the browser test needs ' + '; '.join(missing)
    if _in_ci():
        pytest.fail(f"{msg}. CI={os.environ['CI']!r} is set, so this fails instead of skipping.", pytrace=False)
    pytest.skip(msg)


# JS errors that are not the widget's: an offline machine's failed lookups, the missing favicon.
NOISE = [re.compile(r'^Failed to load resource: net::ERR_(NAME_NOT_RESOLVED|INTERNET_DISCONNECTED|'
                   r'CONNECTION_REFUSED|ADDRESS_UNREACHABLE)\b')]
NOISE_URLS = [re.compile(r'/favicon[^/]*$')]


def is_noise(err: dict) -> bool:
    return any(p.search(err['text']) for p in NOISE) or any(p.search(err.get('url') or '') for p in NOISE_URLS)


def test_missing_browser_fails_under_ci(monkeypatch, tmp_path):
    "The gate itself: a missing chromium skips locally, and fails when CI is set."
    monkeypatch.setattr(sys.modules[__name__], 'CHROMIUM', tmp_path / 'no-chromium')
    monkeypatch.delenv('CI', raising=False)
    with pytest.raises(pytest.skip.Exception, match='no-chromium is missing'):
        require_browser_stack()
    for ci in ('true', '1'):
        monkeypatch.setenv('CI', ci)
        with pytest.raises(pytest.fail.Exception, match='fails instead of skipping'):
            require_browser_stack()
    monkeypatch.setenv('CI', 'false')
    with pytest.raises(pytest.skip.Exception):
        require_browser_stack()


def test_noise_allow_list_is_narrow():
    assert is_noise(dict(text='Failed to load resource: net::ERR_NAME_NOT_RESOLVED', url='https://example.org/feed'))
    assert is_noise(dict(text='Failed to load resource: the server responded with a status of 404 (Not Found)',
                         url='http://127.0.0.1:8888/favicon.ico'))
    for text in ('TypeError: ctx.drawImage is not a function', 'Error: Could not create a view for model id 3',
                 '[anywidget] Failed to load ESM', 'Failed to load resource: the server responded with a status of 404'):
        assert not is_noise(dict(text=text, url='http://127.0.0.1:8888/lab/extensions/anywidget/static/main.js')), text

DEMO_SOURCE = '''\
import json, time
from pathlib import Path
import torch
torch.set_num_threads(2)
from skimage import data as skdata
from cmp_nb.model import build_model
from cmp_nb.propagator import Propagator, load_propagator
from cmp_nb.widgets import FlowCanvas

QUICKSTART = Path({quickstart!r})
torch.manual_seed(0)
if QUICKSTART.exists():
    prop, MODEL = load_propagator(QUICKSTART, device='cpu', max_side=384), 'quickstart'
else:
    prop, MODEL = Propagator(build_model('small'), device='cpu', max_side=384), 'untrained small'
canvas = FlowCanvas(prop, skdata.astronaut(), display_width=384)   # 512x512 photo, model sees 384x384

def record(change):   # proof, outside the browser, that Python got the edits
    Path('received.json').write_text(json.dumps(dict(model=MODEL, in_size=list(prop.in_size), seq=canvas.shown_seq,
                                                     edits=canvas.edits, status=canvas.status)))
canvas.observe(record, names='shown_seq')
canvas
'''

ANNOTATE_SOURCE = '''\
from cmp_nb.annotate import AnnotationCanvas, ANNOTATION_SEED
from cmp_nb.synthetic import make_clip
scene = make_clip(ANNOTATION_SEED, size=(256, 256))['frames'][0]
aprop = Propagator(prop.model, device='cpu', max_side=256)          # same model, scene at its own size
annot = AnnotationCanvas(aprop, scene, display_width=256)
annot.observe(lambda change: annot.save_mask('mask.png'), names='shown_seq')
annot
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _write_demo(path: Path):
    import nbformat
    nb = nbformat.v4.new_notebook()
    nb.metadata = {'kernelspec': {'display_name': 'Python 3 (ipykernel)', 'language': 'python', 'name': 'python3'}}
    nb.cells = [nbformat.v4.new_markdown_cell('# cmp_nb arrow canvas (browser test)'),
                nbformat.v4.new_code_cell(DEMO_SOURCE.format(quickstart=str(QUICKSTART))),
                nbformat.v4.new_code_cell(ANNOTATE_SOURCE)]
    nbformat.write(nb, str(path))


@pytest.fixture()
def lab(tmp_path):
    "A JupyterLab server on a free 127.0.0.1 port with a token, rooted in a temp dir with the demo notebook."
    import jupyterlab  # noqa: F401  - fail loudly if the dev requirements are missing
    root = tmp_path / 'root'
    root.mkdir()
    _write_demo(root / 'demo_canvas.ipynb')
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, OMP_NUM_THREADS='2', PYTHONUNBUFFERED='1')
    for var, sub in [('JUPYTER_CONFIG_DIR', 'cfg'), ('JUPYTER_DATA_DIR', 'data'), ('JUPYTER_RUNTIME_DIR', 'run'),
                     ('JUPYTERLAB_SETTINGS_DIR', 'settings'), ('JUPYTERLAB_WORKSPACES_DIR', 'ws'), ('IPYTHONDIR', 'ipy')]:
        (tmp_path / sub).mkdir()
        env[var] = str(tmp_path / sub)
    log = open(tmp_path / 'lab.log', 'w')
    proc = subprocess.Popen(
        [sys.executable, '-m', 'jupyterlab', '--no-browser', '--ip=127.0.0.1', f'--port={port}',
         '--ServerApp.port_retries=0', f'--IdentityProvider.token={token}', f'--ServerApp.root_dir={root}',
         '--LabApp.extension_manager=readonly'] + (['--allow-root'] if os.geteuid() == 0 else []),
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f'http://127.0.0.1:{port}'
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f'JupyterLab exited with {proc.returncode}:\n' + (tmp_path / 'lab.log').read_text()[-3000:])
            try:
                with urllib.request.urlopen(f'{base}/api/status?token={token}', timeout=5) as r:
                    if r.status == 200: break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail('JupyterLab did not answer within 120 s:\n' + (tmp_path / 'lab.log').read_text()[-3000:])
            time.sleep(0.5)
        yield dict(base=base, token=token, root=root, log=tmp_path / 'lab.log')
    finally:
        try:   # ask the server to stop (it shuts its kernels down), then make sure
            req = urllib.request.Request(f'{base}/api/shutdown?token={token}', method='POST')
            urllib.request.urlopen(req, timeout=10).close()
        except OSError:
            pass
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


IDLE = "() => [...document.querySelectorAll('.jp-StatusBar-TextItem')].some(e => /\\| Idle/.test(e.textContent))"
STARTED = """(i) => { const p = document.querySelectorAll('.jp-Notebook .jp-CodeCell .jp-InputPrompt')[i];
                     return !!p && /\\[(\\*|\\d+)\\]/.test(p.textContent); }"""
WIDGET = '.cmp-canvas'
SHOWN = f"""(want) => {{ const e = document.querySelector('{WIDGET}');
                         return !!e && +(e.dataset.shownSeq || -1) >= want; }}"""
SHOWN2 = f"""(want) => {{ const e = document.querySelectorAll('{WIDGET}')[1];
                          return !!e && +(e.dataset.shownSeq || -1) >= want; }}"""


def _run_cell(page, i):
    "Run code cell i (Ctrl+Enter in its editor); retried, since a key press can land before the kernel is wired."
    for attempt in range(3):
        page.click(f'.jp-Notebook .jp-CodeCell >> nth={i} >> .jp-InputArea-editor')
        page.keyboard.press('Control+Enter')
        try:
            page.wait_for_function(STARTED, arg=i, timeout=20_000)
            return
        except Exception:
            if attempt == 2: raise


def _drag(page, box, fx0, fy0, dx, dy):
    x0, y0 = box['x'] + fx0 * box['width'], box['y'] + fy0 * box['height']
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move(x0 + dx, y0 + dy, steps=8)
    page.mouse.up()
    return x0, y0


def _sent(page) -> int:
    return int(page.eval_on_selector(WIDGET, 'e => e.dataset.sentSeq'))


def check_widget_screenshot(png: Path, widget: dict, canvas: dict, result: dict):
    """The widget's screenshot after one drag shows what a user sees: the arrow in red (#ff2020) on the photo,
    and beside it the flow picture (many colours), with the arrow over it in black. Boxes are page CSS pixels
    (the screenshot is at device scale 1)."""
    from PIL import Image
    shot = np.asarray(Image.open(png).convert('RGB')).astype(int)
    assert abs(shot.shape[1] - widget['width']) <= 2 and abs(shot.shape[0] - widget['height']) <= 2, shot.shape
    def crop(b):
        x, y = round(b['x'] - widget['x']), round(b['y'] - widget['y'])
        return shot[y:y + round(b['height']), x:x + round(b['width'])]
    photo, flow = crop(canvas), crop(result)
    red = (np.abs(photo - [255, 32, 32]).max(-1) < 40).sum()
    assert red > 60, f'no red arrow on the photo in {png} ({red} red pixels)'
    colours = len(np.unique(flow // 32 @ [64, 8, 1]))            # distinct colours, 8 levels a channel
    assert colours >= 6, f'the flow picture in {png} has only {colours} colours'
    assert (flow.max(-1) < 40).sum() > 30, f'no black arrow over the flow picture in {png}'


def _on_console(errors, msg):
    if msg.type == 'error':
        errors.append(dict(kind='console', text=msg.text, url=(msg.location or {}).get('url')))


def test_canvas_in_jupyterlab(request):
    require_browser_stack()
    lab = request.getfixturevalue('lab')
    from playwright.sync_api import sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    errors = []
    t_start = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={'width': 1300, 'height': 900})
            page.set_default_timeout(60_000)
            page.on('pageerror', lambda e: errors.append(dict(kind='pageerror', text=f'{e.name}: {e.message}',
                                                              stack=e.stack, url=None)))
            page.on('console', lambda m: _on_console(errors, m))
            external = []                                           # no internet: anything off 127.0.0.1 is cut
            def offline(route):
                url = route.request.url
                if url.startswith((lab['base'] + '/', 'data:', 'blob:')): return route.continue_()
                external.append(url)
                route.abort('internetdisconnected')
            page.route('**/*', offline)
            page.goto(f"{lab['base']}/lab/tree/demo_canvas.ipynb?token={lab['token']}", wait_until='domcontentloaded')
            page.wait_for_selector('.jp-Notebook .jp-CodeCell .jp-InputArea-editor', timeout=120_000)
            page.wait_for_function(IDLE, timeout=120_000)           # kernel started and connected
            _run_cell(page, 0)                                      # the flow canvas
            page.wait_for_selector(f'{WIDGET} canvas.cmp-input', state='visible', timeout=240_000)
            page.wait_for_function(SHOWN, arg=1, timeout=120_000)   # the unguided prediction is up
            try:                                                    # JupyterLab's news toast would cover the picture
                page.get_by_role('button', name='No', exact=True).click(timeout=3_000)
            except Exception:
                pass
            canvas = page.locator(f'{WIDGET} canvas.cmp-input')
            canvas.scroll_into_view_if_needed()
            box = canvas.bounding_box()
            assert abs(box['width'] - 384) < 1 and abs(box['height'] - 384) < 1, box   # display_width x display_height
            src0 = page.get_attribute(f'{WIDGET} img.cmp-result', 'src')

            # 1. one drag: Python must receive it and the flow picture must change
            x0, y0 = _drag(page, box, 0.45, 0.55, 40, -25)
            seq = _sent(page)
            page.wait_for_function(SHOWN, arg=seq, timeout=120_000)
            status = page.inner_text(f'{WIDGET} .cmp-status')
            assert status.startswith(f'#{seq}: 1 arrow, 0 static'), status
            assert page.get_attribute(f'{WIDGET} img.cmp-result', 'src') != src0, 'the flow picture did not change'
            got = json.loads((lab['root'] / 'received.json').read_text())
            assert got['seq'] == seq and len(got['edits']) == 1 and got['edits'][0][0] == 'arrow', got
            s = 512 / box['width']                                   # display px -> image px
            exp = [(x0 - box['x']) * s, (y0 - box['y']) * s, (x0 + 40 - box['x']) * s, (y0 - 25 - box['y']) * s]
            assert max(abs(a - b) for a, b in zip(got['edits'][0][1:], exp)) < 3, (got['edits'], exp)
            page.screenshot(path=str(ARTIFACTS / 'browser_canvas.png'))
            page.locator(WIDGET).screenshot(path=str(ARTIFACTS / 'browser_widget.png'))
            check_widget_screenshot(ARTIFACTS / 'browser_widget.png', page.locator(WIDGET).bounding_box(), box,
                                    page.locator(f'{WIDGET} img.cmp-result').bounding_box())

            # 2. latency over 10 drags, one at a time
            seqs = []
            for i in range(10):
                _drag(page, box, 0.2 + 0.06 * i, 0.3 + 0.04 * (i % 5), 25 + 3 * i, 15 - 4 * i)
                seqs.append(_sent(page))
                page.wait_for_function(SHOWN, arg=seqs[-1], timeout=120_000)
            times = page.eval_on_selector(WIDGET, 'e => e.cmpTimes')
            lat = [times[str(q)]['shown'] - times[str(q)]['sent'] for q in seqs]
            assert page.inner_text(f'{WIDGET} .cmp-status').startswith(f'#{seqs[-1]}: 11 arrows')

            # 3. click = static point, Undo, Clear - all from the browser's buttons
            page.mouse.click(box['x'] + 0.8 * box['width'], box['y'] + 0.9 * box['height'])
            page.wait_for_function(SHOWN, arg=_sent(page), timeout=120_000)
            assert ', 1 static' in page.inner_text(f'{WIDGET} .cmp-status')
            page.click(f'{WIDGET} button.cmp-undo')
            page.wait_for_function(SHOWN, arg=_sent(page), timeout=120_000)
            assert ': 11 arrows, 0 static' in page.inner_text(f'{WIDGET} .cmp-status')
            page.screenshot(path=str(ARTIFACTS / 'browser_canvas_final.png'))
            page.click(f'{WIDGET} button.cmp-clear')
            page.wait_for_function(SHOWN, arg=_sent(page), timeout=120_000)
            assert ': 0 arrows, 0 static' in page.inner_text(f'{WIDGET} .cmp-status')
            got = json.loads((lab['root'] / 'received.json').read_text())
            assert got['edits'] == []

            # 4. the same front end in annotation mode: click = positive, shift-click = negative
            _run_cell(page, 1)
            page.wait_for_function(SHOWN2, arg=1, timeout=240_000)
            ann = page.locator(f'{WIDGET} >> nth=1')
            ann.scroll_into_view_if_needed()
            abox = ann.locator('canvas.cmp-input').bounding_box()
            page.mouse.click(abox['x'] + 0.5 * abox['width'], abox['y'] + 0.5 * abox['height'])
            page.wait_for_function(SHOWN2, arg=int(ann.get_attribute('data-sent-seq')), timeout=120_000)
            assert ': 1 positive, 0 negative' in ann.locator('.cmp-status').inner_text()
            from cmp_nb.annotate import load_mask
            def read_mask(differs_from=None, timeout=20.0):       # the kernel writes mask.png as it publishes a result
                t_end = time.time() + timeout
                while True:
                    try: m = load_mask(lab['root'] / 'mask.png')
                    except (FileNotFoundError, OSError, ValueError): m = None
                    if m is not None and (differs_from is None or (m != differs_from).any()) or time.time() > t_end: return m
                    time.sleep(0.25)
            m1 = read_mask(np.zeros((256, 256), bool))
            assert m1 is not None, 'no mask.png after the positive click'
            assert m1.any(), 'a positive click gave an empty mask'                 # changed from the empty mask
            ys, xs = np.nonzero(m1)                                                 # negative click: the mask pixel
            far = int(np.argmax((xs - m1.shape[1] / 2) ** 2 + (ys - m1.shape[0] / 2) ** 2))   # farthest from the positive one
            page.keyboard.down('Shift')
            page.mouse.click(abox['x'] + (xs[far] + 0.5) / m1.shape[1] * abox['width'],
                             abox['y'] + (ys[far] + 0.5) / m1.shape[0] * abox['height'])
            page.keyboard.up('Shift')
            page.wait_for_function(SHOWN2, arg=int(ann.get_attribute('data-sent-seq')), timeout=120_000)
            assert ': 1 positive, 1 negative' in ann.locator('.cmp-status').inner_text()
            m2 = read_mask(m1)
            assert (m2 != m1).any() and m2.sum() < m1.sum(), 'the negative click did not cut the mask'
            ann.screenshot(path=str(ARTIFACTS / 'browser_annotate.png'))
            assert not external, f'the page asked for resources off this machine: {external}'
            probe = page.evaluate("() => fetch('https://cdn.jsdelivr.net/npm/probe.js').then(() => 'loaded', () => 'blocked')")
            assert probe == 'blocked' and external == ['https://cdn.jsdelivr.net/npm/probe.js'], (probe, external)  # the cut works
        except Exception:
            page.screenshot(path=str(ARTIFACTS / 'browser_failure.png'))
            outputs = page.eval_on_selector_all('.jp-OutputArea-output', 'els => els.map(e => e.innerText)')
            print('\nnotebook outputs:', outputs, '\npage errors:', errors,
                  '\nJupyterLab log tail:\n', lab['log'].read_text()[-3000:])
            raise
        finally:
            browser.close()
    report = dict(model=got['model'], image='skimage astronaut 512x512', model_input=got['in_size'],
                  edits=len(lat), latency_ms=[round(v, 1) for v in lat], median_ms=round(statistics.median(lat), 1),
                  min_ms=round(min(lat), 1), max_ms=round(max(lat), 1),
                  measured='browser: pointerup -> new flow <img> loaded (performance.now())',
                  test_seconds=round(time.monotonic() - t_start, 1))
    (ARTIFACTS / 'latency.json').write_text(json.dumps(report, indent=1))
    print(f"\ndrag -> updated flow image, {report['model']} model at {got['in_size']}: median {report['median_ms']} ms "
          f"over {len(lat)} edits (min {report['min_ms']}, max {report['max_ms']}); screenshot {ARTIFACTS / 'browser_canvas.png'}")
    problems = [e for e in errors if not is_noise(e)]
    assert not problems, 'JavaScript errors on the page:\n' + '\n'.join(
        f"[{e['kind']}] {e['text']} ({e.get('url') or ''})\n{e.get('stack') or ''}" for e in problems)
    print('allow-listed browser noise:', [e['text'] for e in errors if is_noise(e)])
