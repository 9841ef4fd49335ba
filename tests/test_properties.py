"""Property-based tests (hypothesis) for every parser and entry point a user feeds: the .flo and flow-PNG
readers, the config parser, `Propagator.set_image` / `predict`, and the widget's front-end messages.

Each example either gets a clear error of the documented type (ValueError / TypeError / FileNotFoundError, or
traitlets' TraitError for a message traitlets itself refuses), naming what is wrong, or a valid result. The number
of examples is bounded so the file runs in well under a minute on 2 cores."""
import math, os, struct, tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings, strategies as st, HealthCheck

from cmp_nb.flow import read_flo, write_flo, read_flow_png, write_flow_png, FLO_MAGIC
from cmp_nb.config import DEFAULTS, FREE_FORM, valid_keys, load_config, check_config, merge_config
from cmp_nb.model import build_model
from cmp_nb.propagator import Propagator

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TMP = Path(tempfile.mkdtemp(prefix='cmp_props_'))


def _file(name: str, data: bytes) -> Path:
    p = TMP / name
    p.write_bytes(data)
    return p


# ---------------------------------------------------------------- .flo

@settings(max_examples=60, **SETTINGS)
@given(st.one_of(
    st.binary(max_size=200),                                                                # anything at all
    st.tuples(st.integers(-5, 2**31 - 1), st.integers(-5, 2**31 - 1), st.binary(max_size=300)).map(
        lambda t: struct.pack('<fii', FLO_MAGIC, t[0], t[1]) + t[2]),                      # a real tag, any size
    st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(0, 400)).map(              # a valid file, truncated
        lambda t: (struct.pack('<fii', FLO_MAGIC, t[0], t[1]) + np.arange(2 * t[0] * t[1], dtype='<f4').tobytes())[:t[2]]),
))
def test_read_flo_any_bytes(data):
    p = _file('x.flo', data)
    try: f = read_flo(p)
    except ValueError as e:
        assert str(p) in str(e)
        return
    w, h = struct.unpack('<ii', data[4:12])
    assert f.shape == (h, w, 2) and f.dtype == np.float32 and len(data) == 12 + 8 * w * h


@settings(max_examples=15, **SETTINGS)
@given(st.integers(1, 5), st.integers(1, 5))
def test_flo_round_trip(h, w):
    f = np.random.default_rng(h * 7 + w).normal(0, 30, (h, w, 2)).astype(np.float32)
    write_flo(TMP / 'r.flo', f)
    np.testing.assert_array_equal(read_flo(TMP / 'r.flo'), f)


# ---------------------------------------------------------------- flow PNG

def _valid_png(h=4, w=5) -> bytes:
    f = np.random.default_rng(0).normal(0, 20, (h, w, 2)).astype(np.float32)
    write_flow_png(TMP / 'v.png', f)
    return (TMP / 'v.png').read_bytes()

VALID_PNG = None


@settings(max_examples=60, **SETTINGS)
@given(st.one_of(
    st.binary(max_size=300).map(lambda b: ('random', b)),
    st.integers(0, 400).map(lambda n: ('cut', n)),
    st.tuples(st.integers(0, 400), st.integers(0, 255)).map(lambda t: ('flip', t)),
    st.tuples(st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)).map(lambda t: ('header', t)),
))
def test_read_flow_png_any_bytes(case):
    global VALID_PNG
    VALID_PNG = VALID_PNG or _valid_png()
    kind, arg = case
    good = VALID_PNG
    if kind == 'random': data = arg
    elif kind == 'cut': data = good[:arg]
    elif kind == 'flip': i = arg[0] % len(good); data = good[:i] + bytes([arg[1]]) + good[i + 1:]
    else: data = good[:16] + struct.pack('>II', *arg) + good[24:]                           # IHDR width, height
    p = _file('x.png', data)
    try: flow, valid = read_flow_png(p)
    except ValueError as e:
        assert str(p) in str(e)
        return
    assert flow.dtype == np.float32 and flow.ndim == 3 and flow.shape[2] == 2 and valid.shape == flow.shape[:2]
    assert np.isfinite(flow).all()


def test_read_flow_png_refuses_an_8_bit_picture():
    import cv2
    cv2.imwrite(str(TMP / 'rgb.png'), np.zeros((3, 4, 3), np.uint8))
    with pytest.raises(ValueError, match='not a KITTI flow PNG'): read_flow_png(TMP / 'rgb.png')


# ---------------------------------------------------------------- config parser

KEYS = valid_keys()
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.sampled_from(['1e-4', '.nan', '-.inf', '0x10', '[1', '{a: 1}', 'null', '', 'auto']))
values = st.one_of(scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2))


def _default(key):
    d = DEFAULTS
    for part in key.split('.'): d = d[part]
    return d


def _render(v) -> str:
    if isinstance(v, str): return v
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()


@settings(max_examples=150, **SETTINGS)
@given(st.one_of(st.sampled_from(KEYS), st.text(max_size=12), st.sampled_from(KEYS).map(lambda k: k + 'x')), values,
       st.booleans())
def test_config_override_any_key_and_value(key, value, as_text):
    item = f'{key}={_render(value)}' if as_text else f'{key}{_render(value)}'
    try: cfg = load_config(None, [item])
    except ValueError as e:
        msg = str(e)
        assert repr(key.strip()) in msg or repr(item) in msg or 'config key' in msg, msg
        return
    assert check_config(cfg) == cfg                     # what was accepted is in range, of the right types
    for k in KEYS:
        d, v = _default(k), cfg
        for part in k.split('.'): v = v[part]
        if d is not None and v is not None and tuple(k.split('.')) not in FREE_FORM:
            assert type(v) is type(d) or (isinstance(d, float) and isinstance(v, float)), (k, v)
        if isinstance(v, float): assert math.isfinite(v), (k, v)


@settings(max_examples=60, **SETTINGS)
@given(st.dictionaries(st.sampled_from(['train', 'optim', 'data', 'ckpt', 'log', 'model', 'nope']),
                       st.one_of(values, st.dictionaries(st.sampled_from([k.split('.', 1)[1] for k in KEYS] + ['zzz']),
                                                         values, max_size=3)), max_size=3))
def test_config_file_any_mapping(data):
    p = TMP / 'c.yaml'
    p.write_text(yaml.safe_dump(data))
    try: cfg = load_config(p)
    except ValueError as e:
        assert str(p) in str(e) or 'config key' in str(e), str(e)
        return
    assert check_config(cfg) == cfg


def test_config_file_not_yaml():
    p = _file('bad.yaml', b'\xff\xfe train: [')
    with pytest.raises(ValueError, match='bad.yaml'): load_config(p)


# ---------------------------------------------------------------- Propagator

@pytest.fixture(scope='module')
def prop():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    return Propagator(build_model('small'), device='cpu')


sizes = st.one_of(st.tuples(st.integers(1, 8000), st.integers(1, 8)), st.tuples(st.integers(1, 8), st.integers(1, 8000)),
                  st.tuples(st.integers(1, 300), st.integers(1, 300)), st.sampled_from([(1, 1), (8000, 8), (8, 8000), (250, 4000)]))
dtypes = st.sampled_from(['uint8', 'uint8', 'uint16', 'float32', 'float64', 'bool', 'int32'])
shapes = st.sampled_from(['rgb', 'gray', 'gray1', 'rgba', 'two', 'five'])
coord = st.one_of(st.floats(-20, 8020), st.sampled_from([float('nan'), float('inf'), -float('inf'), -0.5, 0.0]))
motion = st.one_of(st.floats(-1e4, 1e4), st.sampled_from([float('nan'), 1e7, -1e30]))


@settings(max_examples=30, **SETTINGS)
@given(sizes, dtypes, shapes, st.booleans(), st.lists(st.tuples(coord, coord, motion, motion), max_size=4))
def test_propagator_any_image_and_points(prop, size, dtype, shape, nan, points):
    H, W = size
    C = {'rgb': 3, 'gray': None, 'gray1': 1, 'rgba': 4, 'two': 2, 'five': 5}[shape]
    rng = np.random.default_rng(H * 31 + W)
    img = (rng.random((H, W) if C is None else (H, W, C)) * 255).astype(dtype)
    if nan and img.dtype.kind == 'f': img.flat[0] = np.nan
    try: prop.set_image(img)
    except (TypeError, ValueError) as e:
        assert dtype not in ('uint8', 'uint16') or shape == 'five', (dtype, shape, e)   # only what is documented as refused
        assert 'dtype' in str(e) or 'shape' in str(e), str(e)
        return
    assert dtype in ('uint8', 'uint16') and shape != 'five'
    assert min(prop.in_size) >= prop.model.min_size and all(s % prop.model.input_multiple == 0 for s in prop.in_size)
    p = np.array(points, np.float64).reshape(-1, 4)
    inside = np.isfinite(p).all(1) & (p[:, 0] >= 0) & (p[:, 0] <= W - 1) & (p[:, 1] >= 0) & (p[:, 1] <= H - 1) \
        & (np.abs(np.nan_to_num(p[:, 2:], nan=np.inf)) <= 1e6).all(1)
    try: flow = prop.predict(points=p)
    except ValueError as e:
        assert not inside.all(), (p, e)
        assert 'outside' in str(e) or 'NaN or inf' in str(e) or 'longer than' in str(e), str(e)
        return
    assert inside.all(), p
    assert flow.shape == (H, W, 2) and flow.dtype == np.float32 and np.isfinite(flow).all()


# ---------------------------------------------------------------- widget messages

@pytest.fixture(scope='module')
def canvas(prop):
    from cmp_nb.widgets import FlowCanvas
    img = (np.random.default_rng(1).random((40, 60, 3)) * 255).astype(np.uint8)
    return FlowCanvas(prop, img, threaded=False)


def _update(widget, **state):
    widget._handle_msg({'content': {'data': {'method': 'update', 'state': state, 'buffer_paths': []}}, 'buffers': []})


num = st.one_of(st.floats(-10, 70), st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-3, 80),
                st.sampled_from(['3', None, [], True]))
item = st.one_of(st.tuples(st.sampled_from(['arrow', 'static', 'pos', 'neg', 'wiggle', 7]), num, num, num, num).map(list),
                 st.lists(num, max_size=6), st.integers(), st.none(), st.text(max_size=5), st.dictionaries(st.text(max_size=2), num, max_size=1))
message = st.tuples(st.one_of(st.lists(item, max_size=4), st.sampled_from([None, 5, 'edits', {'a': 1}])),
                    st.one_of(st.integers(-5, 5), st.just('next'), st.sampled_from([1.5, 'x', None, 10**6])))


@settings(max_examples=60, **SETTINGS)
@given(st.lists(message, min_size=1, max_size=4))
def test_widget_messages(canvas, messages):
    for edits, seq in messages:
        seq = canvas.seq + 1 if seq == 'next' else seq
        before = (canvas.seq, canvas.shown_seq, list(canvas.edits), canvas.status)
        _update(canvas, edits=edits, seq=seq)
        now = (canvas.seq, canvas.shown_seq, list(canvas.edits), canvas.status)
        if now == before:
            # traitlets refused the whole message (ipywidgets logs its TraitError), or it changed nothing
            assert not (isinstance(edits, list) and isinstance(seq, int)) or (seq == before[0] and edits == before[2]), (edits, seq)
            continue
        if canvas.seq == before[0]:                          # the same seq: no request (traitlets reports no change)
            assert canvas.shown_seq == canvas.seq
            continue
        assert canvas.shown_seq == canvas.seq > before[1], (canvas.seq, canvas.shown_seq, before)   # never falls behind
        assert canvas.status.startswith(f'#{canvas.seq}: '), canvas.status
        if canvas.error is None: assert 'error' not in canvas.status and canvas.flow.shape == (40, 60, 2)
        else:
            assert isinstance(canvas.error, ValueError), repr(canvas.error)
            assert canvas.status.startswith(f'#{canvas.seq}: error: ValueError: '), canvas.status
