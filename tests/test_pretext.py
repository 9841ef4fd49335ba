"""Issue 12, item 3: the pretext losses against their equations (CPU, float64, seconds).

The notebook nbs/10_pretexts.ipynb teaches the same checks; these run under plain pytest, on more seeds and
shapes, so that a change to cmp_nb.pretext that breaks an equation fails here without a notebook runner.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmp_nb.pretext import (HypercolumnHead, LogFlowClassLoss, SegmentHead, affine_basis, affine_fit, affine_loss,
                            cross_pixel_floor, cross_pixel_loss, entropy_loss, log_flow_bins, log_logits_to_flow,
                            log_normalise_flow, pixel_values, sample_pixels)

D64 = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- CPFS
def cross_pixel_loss_loops(emb, flow, sigma):
    "Eqs. 2-5 of the CPFS paper, one pixel pair at a time, in Python floats (no vectorisation)."
    B, N, D = emb.shape
    total = 0.
    for b in range(B):
        e = [[float(v) for v in emb[b, p]] for p in range(N)]
        f = [[float(v) for v in flow[b, p]] for p in range(N)]
        norm = [math.sqrt(sum(v * v for v in e[p])) for p in range(N)]
        for q in range(N):
            # eq. 2: the kernels
            K_f = [math.exp(-((f[p][0] - f[q][0]) ** 2 + (f[p][1] - f[q][1]) ** 2) / (2 * sigma ** 2))
                   for p in range(N)]
            K_phi = [sum(e[p][d] * e[q][d] for d in range(D)) / (norm[p] * norm[q]) / 4 for p in range(N)]
            # eqs. 4-5: column softmax over p, the diagonal logit lowered by 1
            z_f = sum(math.exp(K_f[p] - (p == q)) for p in range(N))
            z_phi = sum(math.exp(K_phi[p] - (p == q)) for p in range(N))
            # eq. 3: cross-entropy of column q
            for p in range(N):
                S_f = math.exp(K_f[p] - (p == q)) / z_f
                S_phi = math.exp(K_phi[p] - (p == q)) / z_phi
                total -= S_f * math.log(S_phi)
    return total / (B * N)


@pytest.mark.parametrize('sigma', [0.0819, 0.5])      # sqrt(0.0067) (the paper's learned value) and a wide one
@pytest.mark.parametrize('seed', [0, 1])
def test_cross_pixel_loss_equals_dense_equations(seed, sigma):
    g = _gen(seed)
    emb = torch.randn(2, 8, 5, dtype=D64, generator=g) * 3          # raw: the loss normalises them
    flow = torch.rand(2, 8, 2, dtype=D64, generator=g) * 2 - 1
    ours, ref = cross_pixel_loss(emb, flow, sigma).item(), cross_pixel_loss_loops(emb, flow, sigma)
    assert abs(ours - ref) <= 1e-10 * abs(ref)
    assert ours >= cross_pixel_floor(flow, sigma).item() - 1e-12    # cross-entropy >= entropy


def test_cross_pixel_loss_diagonal_reading():
    "Identical pixels: every logit equals the diagonal one before the reduction, so S(q,q) = 1 / (1 + (N-1) e)."
    N = 6
    emb, flow = torch.ones(1, N, 3, dtype=D64), torch.zeros(1, N, 2, dtype=D64)
    # flow kernel: all K_f = 1, diagonal lowered to 0; embedding kernel: all 1/4, diagonal -3/4 -> same shape
    expected_S = torch.full((N,), math.e, dtype=D64); expected_S[0] = 1; expected_S /= expected_S.sum()
    ce = -(expected_S * expected_S.log()).sum().item()
    assert abs(cross_pixel_loss(emb, flow, 0.3).item() - ce) < 1e-12


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_cross_pixel_loss_is_pixel_permutation_invariant(seed):
    g = _gen(seed)
    emb, flow = torch.randn(3, 11, 4, dtype=D64, generator=g), torch.randn(3, 11, 2, dtype=D64, generator=g) * .3
    perm = torch.randperm(11, generator=g)
    a, b = cross_pixel_loss(emb, flow, 0.2), cross_pixel_loss(emb[:, perm], flow[:, perm], 0.2)
    assert abs(a.item() - b.item()) <= 1e-12


def test_cross_pixel_loss_gradcheck_with_sigma():
    g = _gen(3)
    emb = torch.randn(2, 5, 3, dtype=D64, generator=g).requires_grad_()
    flow = (torch.rand(2, 5, 2, dtype=D64, generator=g) - .5).requires_grad_()
    sigma = torch.tensor(0.3, dtype=D64, requires_grad=True)
    assert torch.autograd.gradcheck(cross_pixel_loss, (emb, flow, sigma))


def test_cross_pixel_loss_errors():
    emb, flow = torch.randn(2, 6, 4), torch.randn(2, 6, 2)
    for args, msg in [((emb[0], flow, .1), 'emb must have shape (B,N,D)'),
                      ((emb, flow[..., :1], .1), 'flow must have shape (B,N,2)'),
                      ((emb[:, :4], flow, .1), 'must share B and N'),
                      ((emb[:, :1], flow[:, :1], .1), 'N >= 2'),
                      ((emb, flow, -1.), 'sigma must be positive')]:
        with pytest.raises(ValueError, match=None) as e: cross_pixel_loss(*args)
        assert msg in str(e.value)
    with pytest.raises(TypeError, match='float tensor'): cross_pixel_loss(emb.long(), flow, .1)


def test_hypercolumn_head_learns_sigma_and_reads_pixels():
    head = HypercolumnHead([4, 6])
    feats = [torch.randn(2, 4, 16, 16), torch.randn(2, 6, 4, 4)]
    pts = sample_pixels(2, 16, 16, n=40, generator=_gen(0))
    emb = head(feats, pts, (16, 16))
    assert emb.shape == (2, 40, 16) and torch.allclose(emb.norm(dim=-1), torch.ones(2, 40), atol=1e-5)
    flow = log_normalise_flow(pixel_values(torch.randn(2, 2, 16, 16) * 4, pts))
    head.loss(feats, pts, (16, 16), flow).backward()
    assert head.log_sigma.grad is not None and head.log_sigma.grad != 0
    with pytest.raises(ValueError, match=r'with C = \[4, 6\]'): head(feats[::-1], pts, (16, 16))


# ---------------------------------------------------------------- flow-prediction baseline
def test_log_flow_classes_round_trip():
    f = torch.randn(2, 2, 6, 6, dtype=D64, generator=_gen(0)) * 15
    b = log_flow_bins(f)
    assert b.min() >= 0 and b.max() <= 15
    logits = torch.cat([F.one_hot(b[:, i], 16).permute(0, 3, 1, 2) * 60. for i in (0, 1)], 1).to(D64)
    assert (log_normalise_flow(log_logits_to_flow(logits)) - log_normalise_flow(f)).abs().max() <= 1 / 16 + 1e-9
    crit = LogFlowClassLoss()
    assert crit(logits, f).item() < 1e-6
    assert abs(crit(torch.zeros_like(logits), f).item() - 2 * math.log(16)) < 1e-9


# ---------------------------------------------------------------- S3 affine loss
def _piecewise_affine(H=40, W=56, seed=0):
    "Three hard segments, flow exactly affine on each: (true masks, flow, per-segment A, basis)."
    X = affine_basis(H, W, D64)
    lab = torch.zeros(H, W, dtype=torch.long); lab[:, W // 2:] = 1; lab[H // 2:, 3 * W // 4:] = 2
    A = torch.randn(3, 3, 2, dtype=D64, generator=_gen(seed)) * 3
    flow = torch.einsum('pi,pic->cp', X, A[lab.flatten()]).reshape(1, 2, H, W)
    return F.one_hot(lab, 3).permute(2, 0, 1)[None].to(D64), flow, A, X


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_affine_loss_zero_up_to_ridge_bias_for_true_masks(seed):
    masks, flow, A, X = _piecewise_affine(seed=seed)
    lam = 1e-5
    # bias of the ridge alone: per pixel |r| <= sqrt(3) * lam / (mu_l + lam) * ||A_l||_2, weighted by area
    bound = 0.
    for l in range(3):
        G = torch.einsum('p,pi,pj->ij', masks[0, l].flatten(), X, X) / X.shape[0]
        mu = torch.linalg.eigvalsh(G)[0]
        bound += masks[0, l].mean() * math.sqrt(3) * lam / (mu + lam) * torch.linalg.matrix_norm(A[l], 2)
    loss = affine_loss(masks, flow, ridge=lam).item()
    assert loss <= bound.item() and loss < 1e-3
    merged = masks.clone(); merged[:, 1] += merged[:, 2]; merged[:, 2] = 0
    noise = torch.rand(masks.shape, dtype=D64, generator=_gen(seed + 10)).mul(4).softmax(1)
    assert affine_loss(merged, flow, ridge=lam).item() > 100 * loss + 0.05
    assert affine_loss(noise, flow, ridge=lam).item() > 100 * loss + 0.05
    assert torch.allclose(affine_fit(masks, flow, ridge=1e-12)[0], A, atol=1e-6)


def test_affine_loss_on_synthetic_parts():
    "make_clip's parts move by image-plane affine maps: their flow is exactly affine on the part masks."
    from cmp_nb.synthetic import make_clip
    clip = make_clip(3, (48, 64), n_objects=(2, 2), n_articulated=(1, 1))
    flow = torch.from_numpy(clip['flows'][0]).permute(2, 0, 1)[None].to(D64)
    ids = np.unique(clip['parts'][0])
    true = F.one_hot(torch.from_numpy(np.searchsorted(ids, clip['parts'][0])), len(ids)).permute(2, 0, 1)[None]
    true = true.to(D64)
    one = torch.zeros_like(true); one[:, 0] = 1
    assert affine_loss(true, flow).item() < 0.02 < affine_loss(one, flow).item()


def test_affine_loss_gradcheck():
    g = _gen(4)
    m = torch.rand(1, 3, 4, 5, dtype=D64, generator=g).softmax(1).requires_grad_()
    f = torch.randn(1, 2, 4, 5, dtype=D64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(affine_loss, (m, f))


# ---------------------------------------------------------------- S3 entropy loss
def test_entropy_loss_pure_lower_than_merged():
    H, W = 24, 32
    lab = torch.zeros(H, W, dtype=torch.long); lab[6:18, 8:24] = 1
    speed = torch.where(lab == 0, 1.0, 4.0).to(D64)
    flow = torch.stack([speed * .6, speed * .8])[None]
    pure = F.one_hot(lab, 2).permute(2, 0, 1)[None].to(D64)
    merged = torch.zeros_like(pure); merged[:, 0] = 1
    half = torch.full_like(pure, .5)
    e_pure, e_merged, e_half = (entropy_loss(m, flow).item() for m in (pure, merged, half))
    assert e_pure < e_merged - 0.3 and abs(e_half - e_merged) < 1e-9   # two copies of the mix = the mix


def test_entropy_loss_gradcheck():
    g = _gen(5)
    m = torch.rand(1, 3, 4, 5, dtype=D64, generator=g).softmax(1).requires_grad_()
    f = torch.randn(1, 2, 4, 5, dtype=D64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, f: entropy_loss(m, f, vmax=3.0), (m, f))
    assert torch.autograd.gradcheck(lambda m: entropy_loss(m, f.detach()), (m,))


@pytest.mark.parametrize('loss', [affine_loss, entropy_loss])
def test_s3_losses_shape_errors(loss):
    m, f = torch.rand(2, 3, 8, 8).softmax(1), torch.randn(2, 2, 8, 8)
    for args, msg in [((m[0], f), 'masks must be a tensor (B,L,H,W), got (3, 8, 8)'),
                      ((m, f[:, :1]), 'flow must be a tensor (B,2,H,W), got (2, 1, 8, 8)'),
                      ((m[:1], f), 'must share B, H and W'),
                      ((m[..., :6], f), 'must share B, H and W'),
                      ((m.numpy(), f), 'masks must be a tensor (B,L,H,W), got ndarray')]:
        with pytest.raises(ValueError) as e: loss(*args)
        assert msg in str(e.value)


def test_segment_head_gives_soft_segments_at_input_size():
    seg = SegmentHead([4, 8], n_segments=5)
    masks = seg([torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)], size=(32, 32))
    assert masks.shape == (2, 5, 32, 32) and torch.allclose(masks.sum(1), torch.ones(2, 32, 32), atol=1e-5)
    affine_loss(masks, torch.randn(2, 2, 32, 32)).backward()
    assert seg.body[0].weight.grad.abs().sum() > 0
