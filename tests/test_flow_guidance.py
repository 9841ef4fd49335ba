"""cmp_nb.flow and cmp_nb.guidance: checks that need more room than a notebook cell.

Both Sintel render passes, an independent PNG decoder for the KITTI channel order, the torch
guidance sampler against the NumPy one on many crops/kernels/seeds and on adversarial flows, the
benchmark's SciPy reference against the library, and the bad-input paths.
"""
import struct
import sys
import zlib
from pathlib import Path

import cv2
import flow_vis
import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from cmp_nb import guidance as G
from cmp_nb.flow import (check_flow, color_wheel, epe, flip_flow_lr, flow_to_color, image_to_tensor, load_image,
                         read_flo, read_flow, read_flow_png, resize_flow, tensor_to_image, warp, write_flo,
                         write_flow, write_flow_png)
from cmp_nb.guidance import (arrows_to_sparse, points_to_sparse, sample_guidance, sample_guidance_batch,
                             sparse_to_points)

ROOT = Path(__file__).resolve().parents[1]


def flow_t(f: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1)


def expect(exc, fn, *words):
    with pytest.raises(exc) as info:
        fn()
    for w in words:
        assert w in str(info.value), (w, str(info.value))


@pytest.fixture(scope='module')
def alley(sintel):
    return sintel / 'clean' / 'alley_1'


@pytest.fixture(scope='module')
def gt(alley):
    return read_flo(alley / 'gt' / 'frame_0002.flo')


def training_crop(flow, size=384, short=416, y=None, x=None):
    H, W = flow.shape[:2]
    h, w = (short, round(W * short / H)) if H <= W else (round(H * short / W), short)
    r = resize_flow(flow, (h, w))
    y = (h - size) // 2 if y is None else y
    x = (w - size) // 2 if x is None else x
    return np.ascontiguousarray(r[y:y + size, x:x + size])


# ----------------------------------------------------------------------------------------------- flow files
@pytest.mark.parametrize('render', ['clean', 'final'])
def test_flo_read_matches_bytes_and_writes_identically(sintel, tmp_path, render):
    path = sintel / render / 'alley_1' / 'gt' / 'frame_0002.flo'
    raw = path.read_bytes()
    tag, w, h = struct.unpack('<fii', raw[:12])
    f = read_flo(path)
    assert (tag, f.shape) == (202021.25, (h, w, 2))
    assert np.array_equal(f, np.frombuffer(raw, '<f4', offset=12).reshape(h, w, 2))
    write_flo(tmp_path / 'x.flo', f)
    assert (tmp_path / 'x.flo').read_bytes() == raw
    write_flo(tmp_path / 't.flo', flow_t(f)[None])                       # torch (1,2,H,W) too
    assert (tmp_path / 't.flo').read_bytes() == raw


def test_flo_rejects_damaged_files(tmp_path, gt):
    write_flo(tmp_path / 'ok.flo', gt[:4, :5])
    raw = (tmp_path / 'ok.flo').read_bytes()
    (tmp_path / 'long.flo').write_bytes(raw + b'\0\0\0\0')
    expect(ValueError, lambda: read_flo(tmp_path / 'long.flo'), 'long.flo', '5x4', '172 bytes', '176 bytes')
    (tmp_path / 'empty.flo').write_bytes(b'')
    expect(ValueError, lambda: read_flo(tmp_path / 'empty.flo'), 'empty.flo', 'too short')
    (tmp_path / 'neg.flo').write_bytes(raw[:4] + struct.pack('<ii', -5, 4) + raw[12:])
    expect(ValueError, lambda: read_flo(tmp_path / 'neg.flo'), 'neg.flo', '-5x4')
    expect(FileNotFoundError, lambda: read_flo(tmp_path), str(tmp_path))
    expect(ValueError, lambda: write_flo(tmp_path / 'b.flo', np.zeros((2, 4, 5), np.float32)), '(2, 4, 5)')
    expect(TypeError, lambda: write_flo(tmp_path / 'b.flo', np.zeros((4, 5, 2), np.int16)), 'int16')


def png_rgb16(path) -> np.ndarray:
    "Decode an 8-bit-free, non-interlaced 16-bit RGB PNG with zlib only (independent of OpenCV): (H,W,3) uint16, R,G,B."
    data = Path(path).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    pos, idat = 8, b''
    while pos < len(data):
        n, typ = struct.unpack('>I4s', data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if typ == b'IHDR': w, h, depth, ctype, _, _, interlace = struct.unpack('>IIBBBBB', body)
        elif typ == b'IDAT': idat += body
    assert (depth, ctype, interlace) == (16, 2, 0)
    raw, bpp, stride = zlib.decompress(idat), 6, w * 6
    prev, rows = [0] * stride, []
    for y in range(h):
        ft, line = raw[y * (stride + 1)], raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)]
        cur = [0] * stride
        for i in range(stride):
            a = cur[i - bpp] if i >= bpp else 0
            b, c = prev[i], (prev[i - bpp] if i >= bpp else 0)
            if ft == 0: p = 0
            elif ft == 1: p = a
            elif ft == 2: p = b
            elif ft == 3: p = (a + b) // 2
            else:
                pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            cur[i] = (line[i] + p) & 255
        rows.append(cur)
        prev = cur
    return np.array(rows, np.uint8).view('>u2').reshape(h, w, 3).astype(np.uint16)


def test_flow_png_is_kitti_rgb(tmp_path, gt):
    f = gt[100:124, 500:540].copy()
    f[0, 0] = (-3.25, 7.5)
    valid = np.ones(f.shape[:2], bool); valid[1, 2] = False
    write_flow_png(tmp_path / 'k.png', f, valid=valid)
    rgb = png_rgb16(tmp_path / 'k.png')
    f64 = np.where(valid[..., None], f.astype(np.float64), 0)
    assert np.array_equal(rgb[..., 0], np.round(f64[..., 0] * 64 + 2 ** 15))                    # R = u
    assert np.array_equal(rgb[..., 1], np.round(f64[..., 1] * 64 + 2 ** 15))                    # G = v
    assert np.array_equal(rgb[..., 2], valid.astype(np.uint16))                                  # B = valid
    assert tuple(rgb[0, 0]) == (32768 - 208, 32768 + 480, 1)


@pytest.mark.parametrize('render', ['clean', 'final'])
def test_flow_png_roundtrip_precision(sintel, tmp_path, render):
    f = read_flo(sintel / render / 'alley_1' / 'gt' / 'frame_0002.flo')
    write_flow(tmp_path / 'f.png', f)
    back, valid = read_flow_png(tmp_path / 'f.png')
    assert valid.all() and np.abs(back - f).max() <= 1 / 128 + 1e-6
    assert np.array_equal(read_flow(tmp_path / 'f.png'), back)


def test_flow_png_range_edges_and_policy(tmp_path):
    rng = np.random.default_rng(0)
    f = rng.uniform(-512, 511.984375, (30, 40, 2)).astype(np.float32)
    f[0, 0], f[0, 1] = (-512, 511.984375), (0.0078125, -0.0078125)
    write_flow_png(tmp_path / 'r.png', f)
    back, valid = read_flow_png(tmp_path / 'r.png')
    assert valid.all() and np.abs(back - f).max() <= 1 / 128 + 1e-6
    assert tuple(back[0, 0]) == (-512, 511.984375)
    f[3, 4] = (512, 0); f[5, 6] = (0, -600)
    expect(ValueError, lambda: write_flow_png(tmp_path / 'r.png', f), 'r.png', '2 pixels', '600')
    write_flow_png(tmp_path / 'r.png', f, clip=True)
    back, valid = read_flow_png(tmp_path / 'r.png')
    assert (~valid).sum() == 2 and not valid[3, 4] and not valid[5, 6] and back[5, 6, 1] == -512
    write_flow_png(tmp_path / 't.png', flow_t(f[:3, :3])[None])                 # torch input
    expect(ValueError, lambda: write_flow_png(tmp_path / 'x.jpg', f), 'x.jpg', '.png')
    expect(ValueError, lambda: write_flow_png(tmp_path / 'v.png', f, valid=np.ones((3, 3))), '(3, 3)')


def test_read_flow_png_rejects_other_pngs(tmp_path):
    cv2.imwrite(str(tmp_path / 'g16.png'), np.zeros((4, 5), np.uint16))
    expect(ValueError, lambda: read_flow_png(tmp_path / 'g16.png'), 'g16.png', 'shape (4, 5)')
    cv2.imwrite(str(tmp_path / 'c8.png'), np.zeros((4, 5, 3), np.uint8))
    expect(ValueError, lambda: read_flow_png(tmp_path / 'c8.png'), 'c8.png', 'uint8')
    expect(FileNotFoundError, lambda: read_flow_png(tmp_path / 'none.png'), 'none.png')
    expect(ValueError, lambda: write_flow(tmp_path / 'a.txt', np.zeros((2, 2, 2), np.float32)), '.txt')


# ----------------------------------------------------------------------------------------------- images
@pytest.mark.parametrize('mode', ['L', 'LA', 'P', 'RGB', 'RGBA', '1', 'I;16', 'I', 'CMYK'])
def test_load_image_file_modes(tmp_path, alley, mode):
    rgb = np.asarray(Image.open(alley / 'frame_0002.png'))[:20, :30]
    im = Image.fromarray(rgb)
    if mode == 'I;16': im = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    elif mode == 'I': im = Image.fromarray(rgb[..., 0].astype(np.int32) * 257)
    else: im = im.convert(mode)
    ext = 'jpg' if mode == 'CMYK' else ('tif' if mode == 'I' else 'png')
    im.save(tmp_path / f'x.{ext}')
    out = load_image(tmp_path / f'x.{ext}')
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8 and out.flags.writeable
    if mode in ('RGB', 'RGBA'): assert np.array_equal(out, rgb)
    if mode in ('L', 'LA', 'I;16', 'I', '1'): assert (out == out[..., :1]).all()
    if mode in ('I;16', 'I'): assert np.array_equal(out[..., 0], rgb[..., 0])


def test_load_image_arrays_and_errors(tmp_path):
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(load_image(g[..., None]), np.repeat(g[..., None], 3, 2))
    assert np.array_equal(load_image(np.dstack([g, g])), np.repeat(g[..., None], 3, 2))    # gray + alpha
    expect(ValueError, lambda: load_image(np.zeros((2, 3, 4, 3), np.uint8)), '(2, 3, 4, 3)')
    expect(ValueError, lambda: load_image(np.zeros((0, 3, 3), np.uint8)), 'empty')
    expect(TypeError, lambda: load_image(np.zeros((3, 3), bool)), 'bool')
    expect(TypeError, lambda: load_image([[1, 2]]), 'list')
    expect(FileNotFoundError, lambda: load_image(tmp_path), str(tmp_path))
    expect(TypeError, lambda: image_to_tensor(np.zeros((2, 2, 3), np.float32)), 'float32')
    expect(TypeError, lambda: tensor_to_image(np.zeros((3, 2, 2))), 'ndarray')


def test_image_tensor_roundtrip_device(alley):
    img = load_image(alley / 'frame_0003.png')
    t = image_to_tensor(img, device='cpu')
    assert t.device.type == 'cpu' and np.array_equal(tensor_to_image(t[0]), img)


# ----------------------------------------------------------------------------------------------- resize/flip/warp
@pytest.mark.parametrize('size', [(218, 512), (416, 977), (100, 37), (600, 1500)])
def test_resize_numpy_and_torch_agree(gt, size):
    a = resize_flow(gt, size)
    b = resize_flow(flow_t(gt)[None], size)[0].permute(1, 2, 0).numpy()
    assert a.shape == (*size, 2) and np.abs(a - b).max() < 2e-3
    c = resize_flow(flow_t(gt), size, mode='nearest').permute(1, 2, 0).numpy()
    assert np.array_equal(c, resize_flow(gt, size, mode='nearest'))
    const = np.tile(np.float32([2, -3]), (gt.shape[0], gt.shape[1], 1))
    assert np.allclose(resize_flow(const, size), [2 * size[1] / gt.shape[1], -3 * size[0] / gt.shape[0]], atol=1e-5)


def test_resize_rejects_bad_args(gt):
    expect(ValueError, lambda: resize_flow(gt, (10,)), 'size')
    expect(ValueError, lambda: resize_flow(gt, (10, 10), mode='cubic'), 'cubic')
    nan = gt.copy(); nan[0, 0, 0] = np.nan
    expect(ValueError, lambda: resize_flow(nan, (10, 10)), '1 of', 'not finite')
    expect(ValueError, lambda: flip_flow_lr(nan), 'not finite')


def test_flip_commutes_with_warp(alley, gt):
    img = load_image(alley / 'frame_0003.png').astype(np.float32)
    a = warp(img[:, ::-1], flip_flow_lr(gt))
    b = warp(img, gt)[:, ::-1]
    assert np.abs(a - b).max() < 0.05                                          # float32 grid rounding only


def test_warp_matches_map_coordinates(alley, gt):
    img = load_image(alley / 'frame_0003.png').astype(np.float32)
    out, inside = warp(img, gt, return_mask=True)
    yy, xx = np.mgrid[0:gt.shape[0], 0:gt.shape[1]].astype(np.float64)
    coords = [yy + gt[..., 1], xx + gt[..., 0]]
    ref = np.stack([ndimage.map_coordinates(img[..., c], coords, order=1, mode='nearest') for c in range(3)], -1)
    assert np.abs(out - ref)[inside].max() < 1e-2
    assert inside.mean() > 0.95


def test_warp_batches_dtypes_and_padding():
    img = torch.rand(3, 2, 6, 7, dtype=torch.float64)
    fl = torch.zeros(1, 2, 6, 7); fl[:, 0] = 10
    out, inside = warp(img, fl, return_mask=True)
    assert out.dtype == torch.float64 and out.shape == (3, 2, 6, 7) and inside.shape == (3, 1, 6, 7) and not inside.any()
    assert torch.equal(out, img[..., -1:].expand_as(img))                      # border: the last column
    assert warp(img, fl, padding_mode='zeros').abs().max() == 0
    u8 = (torch.arange(42) % 256).to(torch.uint8).view(1, 1, 6, 7)
    assert torch.allclose(warp(u8, torch.zeros(1, 2, 6, 7)), u8.float(), atol=1e-4)
    expect(ValueError, lambda: warp(img, torch.zeros(2, 2, 6, 7)), 'batch 2', 'batch 3')
    expect(ValueError, lambda: warp(img[0, 0], fl), '(6, 7)')
    expect(TypeError, lambda: warp([[1.0]], fl), 'list')


@pytest.mark.parametrize('render', ['clean', 'final'])
def test_warp_reduces_photometric_error(sintel, render):
    d = sintel / render / 'alley_1'
    f2, f3 = load_image(d / 'frame_0002.png').astype(np.float32), load_image(d / 'frame_0003.png').astype(np.float32)
    flow = read_flo(d / 'gt' / 'frame_0002.flo')
    vis = ~(load_image(d / 'gt' / 'occlusions' / 'frame_0002.png')[..., 0] > 127)
    vis &= ~(load_image(d / 'gt' / 'invalid' / 'frame_0002.png')[..., 0] > 127)
    w, inside = warp(f3, flow, return_mask=True)
    vis &= inside
    assert np.abs(w - f2).mean(-1)[vis].mean() < 0.5 * np.abs(f3 - f2).mean(-1)[vis].mean()


def test_epe_shapes_and_masks(gt):
    b = torch.stack([flow_t(gt), flow_t(gt) + 1])
    ref = torch.stack([flow_t(gt), flow_t(gt)])
    assert abs(epe(b, ref) - np.sqrt(2) / 2) < 1e-6
    m = torch.zeros(2, 1, *gt.shape[:2], dtype=torch.bool); m[1] = True
    assert abs(epe(b, ref, valid=m) - np.sqrt(2)) < 1e-6
    assert abs(epe(b, ref, valid=m[:, 0]) - np.sqrt(2)) < 1e-6
    expect(ValueError, lambda: epe(b, ref, valid=torch.ones(3, *gt.shape[:2])), 'valid mask shape')
    expect(TypeError, lambda: epe(b.int(), ref), 'int32')


# ----------------------------------------------------------------------------------------------- colours
def test_flow_to_color_matches_flow_vis_unclipped(gt):
    ours = flow_to_color(gt).astype(int)
    theirs = flow_vis.flow_to_color(gt).astype(int)                          # no clip_flow: same normalisation
    assert np.abs(ours - theirs).max() <= 1


def test_flow_to_color_keeps_negative_directions():
    f = np.float32([[[3, 0], [-3, 0], [0, 3], [0, -3]]])
    ours = flow_to_color(f, max_mag=3)
    assert len({tuple(c) for c in ours[0]}) == 4
    clipped = flow_vis.flow_to_color(f, clip_flow=3)                          # the flow_vis 0.1 pitfall
    assert (clipped[0, 1] == clipped[0, 3]).all()                             # left and up both became "no motion"
    expect(ValueError, lambda: flow_to_color(f, max_mag=0), 'max_mag')
    assert color_wheel(2).shape == (2, 2, 3)
    expect(ValueError, lambda: color_wheel(1), 'size')


def test_check_flow_torch_batches_and_messages():
    assert check_flow(torch.zeros(4, 2, 3, 3)) is not None
    t = torch.zeros(2, 2, 3, 3); t[1, 0, 0, 0] = float('inf')
    expect(ValueError, lambda: check_flow(t, 'target'), 'target', '1 of 36')
    expect(ValueError, lambda: check_flow(np.zeros((0, 3, 2), np.float32)), 'empty')
    expect(TypeError, lambda: check_flow(torch.zeros(2, 3, 3, dtype=torch.int64)), 'int64')


# ----------------------------------------------------------------------------------------------- guidance sampler
def batch_points(flows, **kw):
    return sample_guidance_batch(torch.from_numpy(np.stack(flows)).permute(0, 3, 1, 2), return_points=True, **kw)[1]


@pytest.mark.parametrize('K,Gs', [(81, 200), (41, 100), (15, 80), (1, None), (3, 50)])
def test_batch_equals_numpy_on_sintel_crops(gt, K, Gs):
    crops = [training_crop(gt, x=x) for x in (0, 296, 593)] + [flip_flow_lr(training_crop(gt))]
    for seed in (0, 7):
        pts = batch_points(crops, nms_ks=K, grid_stride=Gs, seeds=[seed] * len(crops))
        for c, p in zip(crops, pts):
            ref = sample_guidance(c, nms_ks=K, grid_stride=Gs, seed=seed)[0]
            assert np.array_equal(p.numpy(), ref)


@pytest.mark.parametrize('K', [81, 31, 15])
def test_batch_equals_numpy_on_full_frames(sintel, K):
    flows = [read_flo(sintel / r / 'alley_1' / 'gt' / 'frame_0002.flo') for r in ('clean', 'final')]
    flows.append(flip_flow_lr(flows[0]))
    pts = batch_points(flows, nms_ks=K, seeds=[3, 4, 5])
    for f, p, s in zip(flows, pts, [3, 4, 5]):
        assert np.array_equal(p.numpy(), sample_guidance(f, nms_ks=K, seed=s)[0])


def stripes(h=160, w=200, period=6, seed=0):
    "Flow with many parallel motion boundaries: flat EDT ridges, hundreds of tied peaks."
    f = np.zeros((h, w, 2), np.float32)
    f[..., 0] = 4.0 * ((np.arange(w) // period) % 2)
    f[..., 1] = np.random.default_rng(seed).normal(0, 0.001, (h, w))
    return f


def blobs(h=200, w=260, n=12, seed=0):
    rng = np.random.default_rng(seed)
    f = np.zeros((h, w, 2), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, 50)
        f[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.normal(0, 5, 2)
    return f


@pytest.mark.parametrize('make', [stripes, blobs])
@pytest.mark.parametrize('K', [5, 15, 81])
def test_batch_equals_numpy_on_adversarial_flows(make, K):
    flows = [make(seed=s) for s in range(3)]
    pts = batch_points(flows, nms_ks=K, grid_stride=None, seeds=[11, 12, 13])
    for f, p, s in zip(flows, pts, [11, 12, 13]):
        assert np.array_equal(p.numpy(), sample_guidance(f, nms_ks=K, grid_stride=None, seed=s)[0])


def test_subsampled_sizes_agree():
    f = blobs(h=450, w=1250, n=30, seed=5)                                     # s = 3
    assert G.subsample_factor(f.shape[:2]) == 3
    p, _ = sample_guidance(f, grid_stride=None, seed=1)
    assert len(p) and (p % 3 == 0).all()
    assert np.array_equal(batch_points([f], grid_stride=None, seeds=[1])[0].numpy(), p)


def greedy_reference(xs, ys, r, order):
    keep = []
    for i in order:
        if all(abs(xs[i] - xs[j]) > r or abs(ys[i] - ys[j]) > r for j in keep): keep.append(i)
    return sorted(keep)


@pytest.mark.parametrize('n', [2, 50, 256, 257, 2000])
def test_drop_close_points_is_the_seeded_greedy(n):
    rng = np.random.default_rng(n)
    h, w = 120, 150
    ids = rng.choice(h * w, n, replace=False)
    ys, xs = ids // w, ids % w
    for seed in (0, 1):
        keep = G.drop_close_points(xs, ys, 8, (h, w), seed)
        order = np.argsort(G._hash(ids.astype(np.int64), seed, 1) * (h * w) + ids)
        assert np.flatnonzero(keep).tolist() == greedy_reference(xs, ys, 7, order)
        k = np.flatnonzero(keep)                                                # no close pair survives ...
        assert not ((np.abs(xs[k, None] - xs[k]) < 8) & (np.abs(ys[k, None] - ys[k]) < 8) & ~np.eye(len(k), dtype=bool)).any()
        d = np.flatnonzero(~keep)                                               # ... and every drop had a reason
        assert all(((np.abs(xs[k] - xs[i]) < 8) & (np.abs(ys[k] - ys[i]) < 8)).any() for i in d)


def test_sampler_points_respect_spacing_and_border(gt):
    for K in (15, 41):
        p, _ = sample_guidance(training_crop(gt), nms_ks=K, grid_stride=None, seed=0)
        assert len(p) > 3 and (p >= 1).all() and (p < 383).all()                 # off the outermost rows/columns
        close = (np.abs(p[:, None, 0] - p[:, 0]) < (K - 1) / 2) & (np.abs(p[:, None, 1] - p[:, 1]) < (K - 1) / 2)
        assert close.sum() == len(p)                                            # only each point with itself


def test_torch_edt_and_filters_are_exact():
    rng = np.random.default_rng(0)
    for shape, density in [((1, 1), 1.0), ((1, 40), 0.05), ((40, 1), 0.05), ((37, 53), 0.002), ((64, 64), 0.3), ((90, 31), 0.01)]:
        e = rng.random((3, *shape)) < density
        e[0].flat[0] = True
        d = G._edt2_t(torch.from_numpy(e))
        for i in range(3):
            if e[i].any(): assert np.array_equal(d[i].numpy(), np.rint(ndimage.distance_transform_edt(~e[i]) ** 2))
            else: assert torch.isinf(d[i]).all()
    x = torch.randn(2, 23, 17)
    for k in (1, 3, 5, 25, 61):
        ref = torch.nn.functional.max_pool2d(x[:, None], k, stride=1, padding=k // 2)[:, 0]
        assert torch.equal(G._max_pool_sep(x, k), ref)
    assert torch.equal(G._cummax_t(x, 1), x.cummax(1).values)


def test_hash_same_in_numpy_and_torch():
    ids = np.random.default_rng(0).integers(0, 2 ** 31 - 2, 1000)
    for seed in (0, 1, 2 ** 31 - 2):
        a = G._hash(ids, seed, 1)
        b = G._hash(torch.from_numpy(ids), torch.full((1000,), seed), 1)
        assert np.array_equal(a, b.numpy()) and a.min() >= 0 and a.max() < 2 ** 31


def test_mean_point_count_on_alley_crop(gt):
    crop = training_crop(gt)
    counts = [len(sample_guidance(crop, nms_ks=81, grid_stride=200, seed=s)[0]) for s in range(50)]
    assert 6 <= np.mean(counts) <= 10


def test_seeds_generators_and_max_points(gt):
    crop = training_crop(gt)
    runs = {sample_guidance(crop, nms_ks=15, grid_stride=80)[0].tobytes() for _ in range(5)}
    assert len(runs) > 1                                                        # seed=None: fresh choices
    rng = np.random.default_rng(0)
    assert sample_guidance(crop, seed=rng)[0].shape[1] == 2
    p, s = sample_guidance(crop, nms_ks=15, grid_stride=80, max_points=10, seed=3)
    assert len(p) == 10 and s[2].sum() == 10
    assert len(sample_guidance(crop, max_points=0, seed=0)[0]) == 0
    batch = torch.from_numpy(np.stack([crop, crop])).permute(0, 3, 1, 2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_guidance_batch(batch, nms_ks=15, generator=g1), sample_guidance_batch(batch, nms_ks=15, generator=g2))
    torch.manual_seed(0); a = sample_guidance_batch(batch, nms_ks=15, max_points=6)
    torch.manual_seed(0); b = sample_guidance_batch(batch, nms_ks=15, max_points=6)
    assert torch.equal(a, b) and (a[:, 2].flatten(1).sum(1) == 6).all()


def test_sampler_rejects_bad_input(gt):
    expect(ValueError, lambda: sample_guidance(np.zeros((5, 5, 3), np.float32)), '(5, 5, 3)')
    expect(ValueError, lambda: sample_guidance(torch.zeros(2, 2, 5, 5)), 'batch')
    expect(TypeError, lambda: sample_guidance(np.zeros((5, 5, 2), np.uint8)), 'uint8')
    bad = gt.copy(); bad[10:12, 10:12] = np.inf
    expect(ValueError, lambda: sample_guidance(bad), '8 of', 'not finite')
    expect(ValueError, lambda: sample_guidance_batch(flow_t(bad)[None]), '8 of', 'not finite')
    for k in (0, 2, -3, 4.0, True):
        expect(ValueError, lambda: sample_guidance(gt, nms_ks=k), 'nms_ks')
    expect(ValueError, lambda: sample_guidance(gt, max_points=-1), 'max_points')
    expect(ValueError, lambda: sample_guidance(gt, grid_stride=2.5), 'grid_stride')
    expect(TypeError, lambda: sample_guidance(gt, seed=1.5), 'seed')
    expect(ValueError, lambda: sample_guidance_batch(np.zeros((1, 2, 5, 5), np.float32)), 'ndarray')


@pytest.mark.parametrize('K,Gs', [(81, 200), (31, 80), (15, 80)])
def test_reference_sampler_in_benchmark_agrees(gt, K, Gs):
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from bench_guidance import agreement
    for f in (training_crop(gt), gt):
        for seed in range(3):
            checks = agreement(f, nms_ks=K, grid_stride=Gs, seed=seed)
            assert all(v for k, v in checks.items() if k != 'same points'), checks


ACCELERATORS = [d for d, ok in [('cuda', torch.cuda.is_available()),
                                 ('mps', getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available())] if ok]


@pytest.mark.skipif(not ACCELERATORS, reason='needs a CUDA or MPS device')
@pytest.mark.parametrize('device', ACCELERATORS or ['none'])
def test_batch_on_accelerator_matches_cpu(gt, device):
    crop = training_crop(gt)
    batch = torch.from_numpy(np.stack([crop, flip_flow_lr(crop)])).permute(0, 3, 1, 2)
    a = sample_guidance_batch(batch, nms_ks=15, seeds=[1, 2])
    b = sample_guidance_batch(batch.to(device), nms_ks=15, seeds=[1, 2])
    assert b.device.type == device and torch.equal(a, b.cpu())


# ----------------------------------------------------------------------------------------------- points <-> sparse
def test_points_to_sparse_rounding_clipping_and_order():
    sp = points_to_sparse(np.array([[-0.4, 0.4, 1, 2], [6.49, 4.5, 3, 4]]), (5, 7))
    assert sp[:, 0, 0].tolist() == [1, 2, 1, 1] and sp[:, 4, 6].tolist() == [3, 4, 1, 1]
    expect(ValueError, lambda: points_to_sparse([[6.6, 0, 0, 0]], (5, 7)), 'x=6.6', '7x5')
    expect(ValueError, lambda: points_to_sparse([[0, 0, 0, 0], [1, -0.7, 0, 0]], (5, 7)), 'point 1', 'y=-0.7')
    sp = points_to_sparse([[100, -100, 1, 1], [6, 0, 2, 2]], (5, 7), clip=True)
    assert sp[:, 0, 6].tolist() == [2, 2, 1, 1]                                 # clipped onto (6,0), the later wins
    dup = points_to_sparse(torch.tensor([[1, 1, 5, 5], [1, 1, 0, 0], [2, 2, 1, 1]]), (5, 7))
    assert dup[:, 1, 1].tolist() == [0, 0, 1, 1] and dup[2].sum() == 2
    expect(ValueError, lambda: points_to_sparse([[0, 0, 0, 0]], (5,)), 'size')
    assert points_to_sparse([], (5, 7), device='cpu').abs().sum() == 0


def test_sparse_roundtrip_random():
    rng = np.random.default_rng(0)
    ids = rng.choice(30 * 40, 25, replace=False)
    pts = np.c_[ids % 40, ids // 40, rng.normal(0, 3, (25, 2))].astype(np.float32)
    back = sparse_to_points(points_to_sparse(pts, (30, 40))[None])
    order = np.lexsort((pts[:, 0], pts[:, 1]))
    assert np.allclose(back, pts[order])
    arrows = np.c_[pts[:, :2], pts[:, :2] + pts[:, 2:]]
    assert np.allclose(sparse_to_points(arrows_to_sparse(arrows, (30, 40))), pts[order], atol=1e-5)
    expect(ValueError, lambda: arrows_to_sparse([[0, 0, 1]], (5, 5)), '(N,4)')
    expect(ValueError, lambda: arrows_to_sparse([], (5, 5), static=[[1, 2, 3]]), 'static points', '(N,2)')
    expect(ValueError, lambda: sparse_to_points(np.zeros((2, 4, 5, 5))), '(2, 4, 5, 5)')


# ----------------------------------------------------------------------------------------------- drawing guidance
def _guidance_picture_case():
    "A textured picture and a sparse tensor with arrows of every direction and length, static points and border points."
    rng = np.random.default_rng(3)
    img = (rng.random((60, 80, 3)) * 255).astype(np.uint8)
    ids = rng.choice(60 * 80, 30, replace=False)
    pts = np.c_[ids % 80, ids // 80, rng.normal(0, 8, (30, 2))].astype(np.float32)
    pts[::4, 2:] = 0                                                          # static points
    pts = np.r_[pts, [[0, 0, 5, 5], [79, 59, -30, 2.5], [40, 0, 0, 0], [10, 10, 0.2, -0.4]]].astype(np.float32)
    return img, points_to_sparse(pts, (60, 80))


def test_training_picture_draws_guidance_with_draw_guidance():
    """The training logs' picture (train.flow_panel) draws the guidance of a (4,H,W) sparse tensor with
    draw_guidance on sparse_to_points: its left panel is exactly that drawing, tensor or array input alike."""
    import torch
    from cmp_nb.train import flow_panel
    from cmp_nb.flow import image_to_tensor, tensor_to_image
    img, sp = _guidance_picture_case()
    t = image_to_tensor(img)[0]                                              # (3,H,W)
    zero = torch.zeros(2, 60, 80)
    left = flow_panel(t, sp, zero, zero)[:, :80]
    ours = G.draw_guidance(tensor_to_image(t), sparse_to_points(sp))
    assert np.array_equal(left, ours)
    assert np.array_equal(ours, G.draw_guidance(tensor_to_image(t), sparse_to_points(sp.numpy())))   # array input
    assert (ours != tensor_to_image(t)).any(axis=2).sum() > 200                                       # it did draw


def test_draw_guidance_colours_and_axes():
    img = np.full((50, 70, 3), 90, np.uint8)
    pts = [[10, 25, 40, 0], [60, 8, 0, 0]]
    out = G.draw_guidance(img, pts)
    assert (img == 90).all()                                                 # a copy: the input is untouched
    assert out[25, 10].tolist() == [255, 0, 0] and out[8, 60].tolist() == [0, 255, 255]
    assert out[25, 30, 0] > 200 and out[25, 30, 1:].max() < 60               # the shaft, anti-aliased red
    assert out[45, 5].tolist() == [90, 90, 90]
    black = G.draw_guidance(img, pts, color=(0, 0, 0), thickness=2)
    assert black[25, 10].tolist() == [0, 0, 0] and black[27, 10].tolist() == [0, 0, 0]   # dot radius 3
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.imshow(img)
    assert G.draw_guidance(ax, pts) is ax                                    # an Axes: drawn on its picture
    assert np.array_equal(np.asarray(ax.get_images()[-1].get_array()), out)
    plt.close(fig)
    fig, ax = plt.subplots()
    expect(ValueError, lambda: G.draw_guidance(ax, pts), 'no image')
    plt.close(fig)
    expect(ValueError, lambda: G.draw_guidance(img[..., 0], pts), 'uint8 (H,W,3)')
    expect(ValueError, lambda: G.draw_guidance(img, [[1, 2, 3]]), 'points must be an (N,4)')


def test_check_points_is_the_one_validator():
    "guidance and propagator take points through the same check: same errors from every entry point."
    from cmp_nb.propagator import as_points as prop_as_points
    assert prop_as_points is G.as_points
    for fn in (lambda p: G.points_to_sparse(p, (5, 5)), lambda p: G.as_points(points=p), G.check_points):
        expect(ValueError, lambda: fn([[0, 0, float('nan'), 0]]), 'points contain 1 non-finite values (NaN or inf)')
        expect(ValueError, lambda: fn([[0, 0, 0]]), 'points must be an (N,4) array, got shape (1, 3)')
        expect(ValueError, lambda: fn([['a', 0, 0, 0]]), 'array of numbers')
    expect(ValueError, lambda: G.arrows_to_sparse([[0, 0, 1, float('inf')]], (5, 5)), 'arrows contain 1 non-finite')
    got = G.check_points(torch.tensor([[1.5, 2, 3, 4]], dtype=torch.float64))
    assert got.dtype == np.float32 and got.tolist() == [[1.5, 2, 3, 4]]
