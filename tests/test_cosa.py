"""Tests for cosa.py: the card's invariants (methods/cosa.md §11) on hand-made inputs with hand-computed
values, gradient reach, shapes, one paper-preset iteration, and CLI runs (smoke, determinism, resume,
bad inputs, 2-process torchrun) on a tiny toy set."""
import copy
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
cosa = importlib.import_module("cosa")

TINY_KW = "img_size=32,patch_size=8,embed_dim=32,depth=3,num_heads=2"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def tiny_net(num_classes=3, patch=8, img=32, aux_block=-2, seed=0):
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                            img_size=img, patch_size=patch, embed_dim=32, depth=3, num_heads=2)
    return cosa.CoSANet(vit, num_classes, aux_block=aux_block, decoder_dim=8, decoder_dilation=2)


# ------------------------------------------------------------------------------------------- model
def test_shapes_at_224_448_672_and_heads_by_hand():
    net = tiny_net(num_classes=4, patch=16, img=224).eval()
    for size, grid in ((224, 14), (448, 28), (672, 42)):  # pos-embed interpolation
        out = net(torch.randn(1, 3, size, size))
        assert out["cam"].shape == out["cam_aux"].shape == (1, 4, grid, grid)
        assert out["seg"].shape == (1, 5, grid, grid)
        assert out["cls_logits"].shape == out["cls_logits_aux"].shape == (1, 4)
    x = torch.randn(2, 3, 64, 48)
    out = net(x)
    feat, feat_aux = net.features(x)  # (2, D, 4, 3)
    W = net.classifier.weight[:, :, 0, 0]  # (C, D)
    W_aux = net.classifier_aux.weight[:, :, 0, 0]
    # Z = W . max_p F_p (GMP of the features, then W), not GMP of the CAM
    assert torch.allclose(out["cls_logits"], feat.amax((2, 3)) @ W.t(), atol=1e-5)
    assert torch.allclose(out["cls_logits_aux"], feat_aux.amax((2, 3)) @ W_aux.t(), atol=1e-5)
    # M_p = W . F_p
    assert torch.allclose(out["cam"][:, :, 1, 2], feat[:, :, 1, 2] @ W.t(), atol=1e-5)
    # F is normed (final LayerNorm), F† is the raw block output
    vit = net.backbone
    tokens = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
    outs = []
    for blk in vit.blocks:
        tokens = blk(tokens)
        outs.append(tokens)
    assert torch.allclose(feat_aux.flatten(2).transpose(1, 2), outs[-2][:, 1:], atol=1e-5)
    assert torch.allclose(feat.flatten(2).transpose(1, 2), vit.norm(outs[-1])[:, 1:], atol=1e-5)


def test_loss_cls_is_log2_at_zero_logits():
    for labels in (torch.tensor([[1.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(2, 3)):
        z = torch.zeros_like(labels)
        assert cosa.loss_cls(z, labels).item() == pytest.approx(math.log(2), abs=1e-6)
    # hand value: Z = (2, -1), Y = (1, 0): -(log s(2) + log(1 - s(-1))) / 2
    z, y = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    expected = -(math.log(1 / (1 + math.exp(-2))) + math.log(1 - 1 / (1 + math.exp(1)))) / 2
    assert cosa.loss_cls(z, y).item() == pytest.approx(expected, abs=1e-6)


def test_ema_update_and_no_grad_in_assignment_network():
    on, an = tiny_net(seed=0), tiny_net(seed=1)
    before = copy.deepcopy(an.state_dict())
    cosa.ema_update(an, on, 1.0)
    assert all(torch.equal(before[k], v) for k, v in an.state_dict().items())
    cosa.ema_update(an, on, 0.0)
    assert all(torch.equal(on.state_dict()[k], v) for k, v in an.state_dict().items())
    an2 = tiny_net(seed=2)
    theta_a = copy.deepcopy(an2.state_dict())
    cosa.ema_update(an2, on, 0.9)
    for k, v in an2.state_dict().items():
        assert torch.allclose(v, 0.9 * theta_a[k] + 0.1 * on.state_dict()[k], atol=1e-6)
    for p in an2.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, 32, 32)
    cam, cam_aux, seg = cosa.assign(an2, x, torch.tensor([[1.0, 0.0, 1.0]]), (1.0, 0.5))
    out = on(x)
    (out["cam"].sum() + (seg * out["seg"].mean()).sum() + cam.sum()).backward()
    assert all(p.grad is None for p in an2.parameters())


# ------------------------------------------------------------------------------------- pseudo labels
def test_ensemble_normalised_filtered_and_flip_equivariant():
    net = tiny_net(num_classes=3).eval()
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cam, cam_aux, seg = cosa.assign(net, x, labels, (1.0, 0.5, 1.5))
    assert cam.shape == cam_aux.shape == (2, 3, 32, 32) and seg.shape == (2, 4, 32, 32)
    for m in (cam, cam_aux):
        assert m.min() >= 0 and m.max() <= 1
        for b in range(2):
            for c in range(3):
                if labels[b, c]:
                    assert m[b, c].max().item() == pytest.approx(1.0, abs=1e-3)
                    assert m[b, c].min().item() == pytest.approx(0.0, abs=1e-6)
                else:
                    assert m[b, c].abs().max() == 0
    cam_f, cam_aux_f, seg_f = cosa.assign(net, x.flip(-1), labels, (1.0, 0.5, 1.5))
    assert torch.allclose(cam_f, cam.flip(-1), atol=1e-5)
    assert torch.allclose(cam_aux_f, cam_aux.flip(-1), atol=1e-5)
    assert torch.allclose(seg_f, seg.flip(-1), atol=1e-4)


def test_cam_pseudo_label_hand_made():
    # 2 classes, both present; 1 x 4 image
    cam = torch.tensor([[[[0.9, 0.2, 0.1, 0.6]], [[0.3, 0.7, 0.2, 0.65]]]])  # (1, 2, 1, 4)
    cpl, nu = cosa.cam_pseudo_label(cam, 0.5)
    assert cpl.tolist() == [[[1, 2, 0, 2]]]
    assert torch.allclose(nu, torch.tensor([[[0.9, 0.7, 0.2, 0.65]]]))
    # nu == xi is foreground (>=)
    cpl, _ = cosa.cam_pseudo_label(cam, 0.65)
    assert cpl.tolist() == [[[1, 2, 0, 2]]]
    # outside the box -> 255; box = rows 0..1, cols 1..3
    cpl, _ = cosa.cam_pseudo_label(cam, 0.5, torch.tensor([[0, 1, 1, 3]]))
    assert cpl.tolist() == [[[255, 2, 0, 255]]]
    # values only in {0, 255} U {c+1 : Y_c = 1} for a filtered random CAM
    labels = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    rnd = torch.rand(1, 4, 8, 8) * labels[:, :, None, None]
    cpl, _ = cosa.cam_pseudo_label(rnd, 0.3, torch.tensor([[0, 6, 2, 8]]))
    assert set(cpl.unique().tolist()) <= {0, 2, 4, 255}


def test_perplexity_hand_values():
    P = lambda nu, xi, beta=1.0: cosa.perplexity(torch.tensor(nu), xi, 0.8, beta).item()
    assert P(1.0, 0.5) == pytest.approx(0.22314, abs=1e-5)
    assert P(0.0, 0.5) == pytest.approx(0.22314, abs=1e-5)
    assert P(0.75, 0.5) == pytest.approx(0.91629, abs=1e-5)
    assert P(0.25, 0.5) == pytest.approx(0.91629, abs=1e-5)
    assert P(0.65, 0.3) == pytest.approx(0.91629, abs=1e-5)
    assert P(0.15, 0.3) == pytest.approx(0.91629, abs=1e-5)
    assert P(0.6, 0.5) == pytest.approx(1.8326, abs=1e-4)
    assert P(0.75, 0.5, 2.0) == pytest.approx(0.91629 ** 2, abs=1e-5)
    assert math.isfinite(P(0.5, 0.5))  # clamped at nu = xi
    up = cosa.perplexity(torch.linspace(0.5, 1.0, 50), 0.5)
    down = cosa.perplexity(torch.linspace(0.5, 0.0, 50), 0.5)
    assert (up.diff() < 0).all() and (down.diff() < 0).all()
    # Omega boundary (P <= 1) for xi = 0.5: nu >= 0.7299 or nu <= 0.2701
    assert P(0.7300, 0.5) <= 1.0 < P(0.7298, 0.5)
    assert P(0.2700, 0.5) <= 1.0 < P(0.2702, 0.5)


def test_segmentation_pseudo_label():
    torch.manual_seed(0)
    s = torch.randn(2, 4, 3, 3) * 3
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    spl = cosa.segmentation_pseudo_label(s, labels, 0.01)
    assert torch.allclose(spl.sum(1), torch.ones(2, 3, 3))
    assert spl[0, 2].max() < 1e-6 and spl[1, 1:].max() < 1e-6  # absent classes ~ 0
    assert torch.allclose(spl[1, 0], torch.ones(3, 3))  # background is never masked
    assert torch.allclose(cosa.segmentation_pseudo_label(s + 7.0, labels, 0.5), cosa.segmentation_pseudo_label(s, labels, 0.5), atol=1e-6)
    sharp = cosa.segmentation_pseudo_label(s, labels, 1e-3)
    onehot = F.one_hot(s.masked_fill(torch.tensor([[0, 0, 1, 0], [0, 1, 1, 1]]).bool()[:, :, None, None], -1e9).argmax(1), 4)
    assert torch.allclose(sharp, onehot.permute(0, 3, 1, 2).float(), atol=1e-4)
    soft = cosa.segmentation_pseudo_label(torch.tensor([[[[0.0]], [[0.01]]]]), torch.tensor([[1.0]]), 0.01)
    assert soft[0, :, 0, 0].tolist() == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)], abs=1e-6)


# ------------------------------------------------------------------------------------------- losses
def test_raw_weights_hand_values_and_plain_ce_reduction():
    logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    cpl = torch.tensor([[[0, 0]]])
    ppl = torch.tensor([[[0.22314, 0.91629]]])
    ce = F.cross_entropy(logits, cpl, reduction="none")[0, 0]
    w = torch.tensor([1.6083, 0.3917])  # card §11: |R| P^-1 / sum P^-1
    assert (1.0 / ppl / (1.0 / ppl).mean()).flatten().tolist() == pytest.approx(w.tolist(), abs=1e-4)
    assert cosa.loss_c2s(logits, cpl, ppl).item() == pytest.approx((w * ce).mean().item(), abs=1e-4)
    # constant P -> plain CE; ignored pixels are outside R
    cpl2 = torch.tensor([[[1, 255]]])
    plain = cosa.loss_c2s(logits, cpl2, None).item()
    assert plain == pytest.approx(F.cross_entropy(logits, cpl2, ignore_index=255).item(), abs=1e-6)
    assert cosa.loss_c2s(logits, cpl2, torch.full((1, 1, 2), 3.7)).item() == pytest.approx(plain, abs=1e-6)
    assert cosa.loss_c2s(logits, torch.full((1, 1, 2), 255), None).item() == 0.0


def test_raw_weights_normalise_over_the_valid_pixels_only():
    """Eq. (5) with non-constant P and an ignored pixel. Pixels (CPL, P): (1, 1), (0, 2), (255, 0.25); logits of
    classes (0, 1) = (0, ln 3), (ln 3, 0), (0, 0): CE = ln(4/3) at both valid pixels. Over R the reliabilities
    1/P = (1, 1/2) have mean 3/4, so w = (4/3, 2/3) and L = (4/3 + 2/3) ln(4/3) / 2 = ln(4/3). Normalising over
    all three pixels (1/P = 1, 1/2, 4: mean 11/6) would give w = (6/11, 3/11) and (9/22) ln(4/3).
    Catches: the normaliser or the mean over all pixels instead of R, the ignored pixel's weight kept."""
    l3 = math.log(3)
    logits = torch.tensor([[0.0, l3, 0.0], [l3, 0.0, 0.0]])[None, :, None, :]  # (1, 2, 1, 3)
    cpl = torch.tensor([[[1, 0, 255]]])
    ppl = torch.tensor([[[1.0, 2.0, 0.25]]])
    assert cosa.loss_c2s(logits, cpl, ppl).item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    # another P at the ignored pixel: no change
    other = torch.tensor([[[1.0, 2.0, 100.0]]])
    assert cosa.loss_c2s(logits, cpl, other).item() == pytest.approx(math.log(4 / 3), abs=1e-6)
    # unequal CE: CPL (1, 1) gives CE (ln 4/3, ln 4) with w = (4/3, 2/3)
    cpl2 = torch.tensor([[[1, 1, 255]]])
    expected = (4 / 3 * math.log(4 / 3) + 2 / 3 * math.log(4)) / 2
    assert cosa.loss_c2s(logits, cpl2, ppl).item() == pytest.approx(expected, abs=1e-6)


def test_s2c_values():
    spl = torch.zeros(1, 3, 4, 4)
    spl[:, 1] = 1.0  # foreground class 1 (channel 1) everywhere
    assert cosa.loss_s2c(torch.zeros(1, 2, 2, 2), spl).item() == pytest.approx(math.log(2), abs=1e-6)
    cam = torch.tensor([20.0, -20.0])[None, :, None, None].expand(1, 2, 2, 2)
    assert cosa.loss_s2c(cam, spl).item() < 1e-8


def test_csc_hand_values():
    label = torch.tensor([[[1, 1, 2]]])  # (1, 1, 3)
    omega = torch.ones(1, 1, 3, dtype=torch.bool)
    a, n = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    cam = torch.stack([a, a, n], 1)[None, :, None, :]  # (1, C=2, 1, 3)
    assert cosa.loss_csc(cam, label, omega, tau=1.0).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert cosa.loss_csc(cam, label, omega, tau=1.0).item() == pytest.approx(0.313262, abs=1e-6)
    assert cosa.loss_csc(cam * 7.5, label, omega, tau=1.0).item() == pytest.approx(0.313262, abs=1e-5)  # scale-invariant
    same = torch.stack([a, a, a], 1)[None, :, None, :]  # the negative is a copy of the anchor
    assert cosa.loss_csc(same, label, omega, tau=1.0).item() == pytest.approx(math.log(2), abs=1e-6)
    assert cosa.loss_csc(cam, torch.tensor([[[1, 1, 1]]]), omega, tau=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # anchors without positives are skipped; cells outside Omega are ignored
    assert cosa.loss_csc(cam, torch.tensor([[[1, 2, 3]]]), omega, tau=1.0).item() == 0.0
    omega2 = torch.tensor([[[True, True, False]]])
    assert cosa.loss_csc(cam, label, omega2, tau=1.0).item() == pytest.approx(0.0, abs=1e-6)
    # batch scope pools pairs over images: two single-cell images form a positive pair
    two = torch.stack([cam[:, :, :, :1], cam[:, :, :, 1:2]])[:, 0]  # (2, 2, 1, 1)
    lab2, om2 = torch.tensor([[[1]], [[1]]]), torch.ones(2, 1, 1, dtype=torch.bool)
    assert cosa.loss_csc(two, lab2, om2, tau=1.0, scope="image").item() == 0.0
    assert cosa.loss_csc(two, lab2, om2, tau=1.0, scope="batch").item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_reach_of_each_loss():
    net = tiny_net(num_classes=3)
    an = tiny_net(num_classes=3, seed=5)
    for p in an.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cam_a, cam_aux_a, seg_a = cosa.assign(an, x, labels, (1.0,))
    box = torch.tensor([[0, 32, 0, 32], [0, 32, 4, 28]])

    def grads(loss):
        net.zero_grad(set_to_none=True)
        loss.backward()
        g = lambda mod: [p.grad for p in mod.parameters()]
        nz = lambda gs: any(t is not None and t.abs().sum() > 0 for t in gs)
        return {"W": nz(g(net.classifier)), "W_aux": nz(g(net.classifier_aux)), "decoder": nz(g(net.decoder)),
                "backbone": nz(g(net.backbone))}

    out = net(x)
    cpl, nu = cosa.cam_pseudo_label(cam_a, 0.5, box)
    seg_up = F.interpolate(out["seg"], size=(32, 32), mode="bilinear", align_corners=False)
    assert grads(cosa.loss_c2s(seg_up, cpl, cosa.perplexity(nu, 0.5))) == {"W": False, "W_aux": False, "decoder": True, "backbone": True}
    out = net(x)
    spl = cosa.segmentation_pseudo_label(seg_a, labels)
    assert grads(cosa.loss_s2c(out["cam"], spl)) == {"W": True, "W_aux": False, "decoder": False, "backbone": True}
    out = net(x)
    lab, omega = cosa.contrastive_regions(cam_aux_a, 0.5, box, (4, 4), eps=1e9)
    assert omega.any()
    assert grads(cosa.loss_csc(out["cam"], lab, omega, 0.1)) == {"W": True, "W_aux": False, "decoder": False, "backbone": True}
    out = net(x)
    assert grads(cosa.loss_cls(out["cls_logits_aux"], labels)) == {"W": False, "W_aux": True, "decoder": False, "backbone": True}
    assert all(p.grad is None for p in an.parameters())


def test_contrastive_regions_drop_cells_outside_box():
    cam = torch.zeros(1, 2, 8, 8)
    cam[0, 0, :, :4] = 1.0  # confident class 1 on the left, confident background on the right
    lab, omega = cosa.contrastive_regions(cam, 0.5, torch.tensor([[0, 8, 0, 6]]), (4, 4))
    assert lab[0].tolist() == [[1, 1, 0, 0]] * 4
    assert omega[0].tolist() == [[True, True, True, False]] * 4  # column 3's centre (7) is padding


# --------------------------------------------------------------------------------- dynamic threshold
def sklearn_gmm(values):
    """The reference Eq. (6) fit: scikit-learn's GaussianMixture on every value, run to convergence."""
    from sklearn.mixture import GaussianMixture
    x = values.reshape(-1, 1).astype(np.float64)
    g = GaussianMixture(2, means_init=[[x.min()], [x.max()]], weights_init=[0.5, 0.5], tol=1e-10, max_iter=5000,
                        random_state=0).fit(x)
    return g.means_.ravel(), g.covariances_.ravel(), g.weights_


def mixtures():
    rng = np.random.default_rng(0)
    yield "80/20, sd 0.15", np.concatenate([rng.normal(0.3, 0.15, 24000), rng.normal(0.75, 0.15, 6000)])
    yield "beta CAM-like", np.concatenate([rng.beta(2, 8, 20000), rng.beta(8, 2, 10000)])
    yield "wide foreground", np.concatenate([rng.beta(1.5, 10, 25000), rng.uniform(0.3, 1, 5000)])
    yield "70/30 unequal sd", np.concatenate([rng.normal(0.35, 0.12, 21000), rng.normal(0.6, 0.08, 9000)])


def test_gmm_threshold_is_the_crossing_point_not_the_midpoint():
    # 80 % background N(0.3, 0.15), 20 % foreground N(0.75, 0.15): the weighted densities cross at
    # 0.525 + 0.15^2 ln(4) / 0.45 = 0.594, while the midpoint of the means is 0.525
    mu, var, pi = np.array([0.3, 0.75]), np.array([0.15 ** 2] * 2), np.array([0.8, 0.2])
    xi = cosa.gmm_threshold(mu, var, pi)
    assert xi == pytest.approx(0.525 + 0.15 ** 2 * np.log(4) / 0.45, abs=0.0015)
    assert abs(xi - 0.525) > 0.05
    assert cosa.gmm_threshold(mu[::-1], var, pi[::-1]) == pytest.approx(xi, abs=1e-9)  # component order
    # equal weights and spreads: the crossing is the midpoint
    assert cosa.gmm_threshold(np.array([0.2, 0.8]), np.array([0.01, 0.01]), np.array([0.5, 0.5])) == pytest.approx(0.5, abs=0.0015)


@pytest.mark.parametrize("name, values", list(mixtures()))
def test_histogram_em_matches_sklearn(name, values):
    """Eq. (6) on 1000-bin histograms (Deviation 2) gives scikit-learn's converged threshold within 0.005,
    cold-started and warm-started from another mixture's fit, and the threshold is not the midpoint."""
    values = np.clip(values, 0, 1)
    values = values[values > 0.05]
    ref = cosa.gmm_threshold(*sklearn_gmm(values))
    counts = np.histogram(values, bins=1000, range=(0, 1))[0].astype(np.float64)
    centres = (np.arange(1000) + 0.5) / 1000
    fit = cosa.fit_gmm(counts, centres)
    assert cosa.gmm_threshold(*fit) == pytest.approx(ref, abs=0.005), name
    other = cosa.fit_gmm(np.histogram(np.random.default_rng(1).normal(0.5, 0.2, 5000).clip(0.06, 1), bins=1000,
                                      range=(0, 1))[0].astype(np.float64), centres)
    assert cosa.gmm_threshold(*cosa.fit_gmm(counts, centres, init=other)) == pytest.approx(ref, abs=0.005), name
    mu = fit[0]
    if name.startswith("80/20"):
        assert abs(ref - mu.mean()) > 0.02  # the case tells crossing from midpoint


def test_dynamic_threshold_queue():
    """Eq. (6) through the class: 90 % background N(0.3, 0.1), 10 % foreground N(0.7, 0.1) pushed batch by
    batch. The weighted densities cross at 0.5 + 0.1^2 ln(9) / 0.4 = 0.555, the midpoint of the means is 0.5:
    update() must give the crossing. Catches: a midpoint (of the true or the fitted means) or an unweighted
    crossing in DynamicThreshold, the queue not capped, the histogram of other values than the last Q batches."""
    dt = cosa.DynamicThreshold(queue_len=20, init=0.45)
    rng = np.random.default_rng(2)
    batch = lambda: torch.tensor(np.concatenate([rng.normal(0.3, 0.1, 900), rng.normal(0.7, 0.1, 100)]),
                                 dtype=torch.float32)[None]
    dt.push(batch())
    assert dt.update() == 0.45  # fewer than Q/10 = 2 batches: start-up value
    pushed = []
    for _ in range(30):
        pushed.append(batch())
        dt.push(pushed[-1])
    assert len(dt.queue) == 20  # capped at Q batches
    xi = dt.update()
    crossing = 0.5 + 0.1 ** 2 * math.log(9) / 0.4
    assert xi == pytest.approx(crossing, abs=0.01)
    assert abs(xi - 0.5) > 0.04 and abs(xi - float(np.mean(dt.gmm[0]))) > 0.04  # not a midpoint
    # the queue is the last 20 batches: its histogram holds exactly their values in (gmm_min, 1]
    last = torch.cat(pushed[-20:], 1)
    assert dt.total.sum() == int(((last > 0.05) & (last <= 1.0)).sum()) and len(dt.total) == dt.bins
    state = torch.load(save_and_reload(dt.state_dict()), weights_only=True)
    dt2 = cosa.DynamicThreshold(queue_len=20)
    dt2.load_state_dict(state)
    assert np.array_equal(dt2.total, dt.total)
    assert dt2.update() == pytest.approx(xi, abs=1e-9)  # warm start restored too
    # values <= gmm_min are dropped before fitting (official gmmfilter_thre)
    dt3 = cosa.DynamicThreshold(queue_len=1, min_value=0.05)
    dt3.push(torch.tensor([[0.0, 0.01, 0.05, 0.5, 0.9]]))
    assert dt3.total.sum() == 2


def test_queue_rows_downsample_then_class_max():
    """The DT queue rows of one batch, hand-computed: a 4x4 map on a 2x2 token grid. Bilinear 4 -> 2
    (align_corners=False) samples the centre of each 2x2 block, i.e. its mean. Class 0 is 1 at (0, 0) and
    class 1 at (0, 1): each top-left block mean is 0.25, so the row starts with max(0.25, 0.25) = 0.25;
    taking the class max first would give a block mean of 0.5. Catches: the max before the downsampling,
    min or mean over classes, nearest instead of bilinear (0 or 1, not 0.25), a row per class."""
    cam = torch.zeros(1, 2, 4, 4)
    cam[0, 0, 0, 0] = cam[0, 1, 0, 1] = 1.0
    cam[0, 1, 3, 3] = 0.8  # bottom-right block: class 1 only -> 0.2
    rows = cosa.queue_rows(cam, (2, 2))
    assert rows.shape == (1, 4)
    assert torch.allclose(rows, torch.tensor([[0.25, 0.0, 0.0, 0.2]]))


def save_and_reload(obj):
    import io
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------------------ schedule, augment
def test_lr_schedule_and_head_multiplier():
    assert cosa.lr_factor(0, 20000, 1500) == pytest.approx(1e-6)
    assert cosa.lr_factor(750, 20000, 1500) == pytest.approx(0.5, abs=1e-6)
    for t in (1500, 5000, 19999):
        assert cosa.lr_factor(t, 20000, 1500) == pytest.approx((1 - t / 20000) ** 0.9)
    args = cosa.Args(lr=6e-5, head_lr_mult=10)
    opt = cosa.build_optimizer(tiny_net(), args)
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["weight_decay"] == opt.param_groups[1]["weight_decay"] == 0.01


def small_args(**kw):
    base = dict(crop=32, loss_warmup=2, queue_len=2, pseudo_scales=(1.0, 0.5), batch_size=2, iters=10,
                warmup_iters=0, lr=1e-3)
    base.update(kw)
    return cosa.Args(**base)


def make_batch(size=32):
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    return {"weak": x, "strong": x + 0.1, "label": torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]),
            "box": torch.tensor([[0, size, 0, size], [2, size, 0, size - 4]])}


def test_no_decoder_gradient_during_loss_warmup_and_all_losses_after():
    net, an = tiny_net(), tiny_net()
    an.load_state_dict(net.state_dict())
    for p in an.parameters():
        p.requires_grad_(False)
    args = small_args()
    opt = cosa.build_optimizer(net, args)
    dts = [cosa.DynamicThreshold(args.queue_len, args.dt_init) for _ in range(2)]
    autocast = lambda: torch.autocast("cpu", enabled=False)
    dec_before = copy.deepcopy(net.decoder.state_dict())
    log = cosa.train_step(net, an, make_batch(), 0, args, dts, opt, autocast)
    assert "losses/c2s" not in log
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.decoder.parameters())
    assert all(torch.equal(v, net.decoder.state_dict()[k]) for k, v in dec_before.items())
    log = cosa.train_step(net, an, make_batch(), 2, args, dts, opt, autocast)
    assert {"losses/c2s", "losses/c2s_aux", "losses/s2c", "losses/csc"} <= set(log)
    assert any(p.grad.abs().sum() > 0 for p in net.decoder.parameters())
    assert len(dts[0].queue) == 2  # AN ran during the last Q warm-up iterations too
    # the AN moved towards the ON by the EMA
    assert not all(torch.equal(a, b) for a, b in zip(an.parameters(), net.parameters()))


def test_weak_and_strong_views_are_aligned():
    rng_image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    sample = {"name": "x", "image": rng_image, "label": np.array([1, 0], np.float32)}
    identity = cosa.TrainTransform(32, (0.5, 2.0), strong_op="identity")
    out = identity(sample, np.random.default_rng(3))
    assert torch.equal(out["weak"], out["strong"])
    y0, y1, x0, x1 = out["box"].tolist()
    assert out["weak"].shape == (3, 32, 32) and 0 <= y0 < y1 <= 32 and 0 <= x0 < x1 <= 32
    # another op on the same rng stream keeps the geometry: same box, same padding (zeros -> -mean/std)
    solar = cosa.TrainTransform(32, (0.5, 2.0), strong_op="brightness")(sample, np.random.default_rng(3))
    assert solar["box"].tolist() == [y0, y1, x0, x1]
    assert torch.equal(solar["weak"], out["weak"])
    pad = torch.ones(32, 32, dtype=torch.bool)
    pad[y0:y1, x0:x1] = False
    if pad.any():
        black = (torch.zeros(3) - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
        assert torch.allclose(out["weak"][:, pad], black[:, None].expand(3, int(pad.sum())), atol=1e-5)


# -------------------------------------------------------------------------------- paper preset
def test_paper_preset_one_iteration_vit_b16_448(toy_root):
    args, spec = cosa.parse_args(["--data", str(toy_root), "--preset", "paper", "--no-pretrained",
                                  "--batch-size", "1", "--loss-warmup", "0"])
    assert args.preset == "paper_voc" and args.crop == 448 and args.backbone.startswith("vit_base_patch16_224")
    assert (args.iters, args.loss_warmup, args.warmup_iters, args.ema_m, args.queue_len) == (20000, 0, 1500, 0.9994, 100)
    assert cosa.PRESETS["paper_coco"]["batch_size"] == 8 and cosa.PRESETS["paper_coco"]["iters"] == 40000
    assert cosa.PRESETS["paper_coco"]["loss_warmup"] == 10000
    torch.manual_seed(0)
    net = cosa.build_model(args, 20, init_weights=True)
    assert len(net.backbone.blocks) == 12 and net.backbone.embed_dim == 768
    an = copy.deepcopy(net)
    for p in an.parameters():
        p.requires_grad_(False)
    opt = cosa.build_optimizer(net, args)
    labels = torch.zeros(1, 20)
    labels[0, [4, 14]] = 1
    x = torch.randn(1, 3, 448, 448)
    batch = {"weak": x, "strong": x, "label": labels, "box": torch.tensor([[0, 448, 16, 400]])}
    dts = [cosa.DynamicThreshold(args.queue_len, args.dt_init) for _ in range(2)]
    shapes = {}
    net.register_forward_hook(lambda mod, inp, out: shapes.update({k: tuple(v.shape) for k, v in out.items()}))
    log = cosa.train_step(net, an, batch, 0, args, dts, opt, lambda: torch.autocast("cpu", enabled=False))
    assert shapes["cam"] == shapes["cam_aux"] == (1, 20, 28, 28) and shapes["seg"] == (1, 21, 28, 28)
    assert shapes["cls_logits"] == (1, 20)
    assert {"losses/cls", "losses/cls_aux", "losses/c2s", "losses/c2s_aux", "losses/s2c", "losses/csc"} <= set(log)
    assert all(math.isfinite(v) for v in log.values())


# --------------------------------------------------------------------------------------- CLI runs
def cli_args(toy_root, out, *extra):
    return ["--data", str(toy_root), "--preset", "toy", "--backbone-kwargs", TINY_KW, "--crop", "32",
            "--eval-size", "32", "--batch-size", "4", "--max-iters", "8", "--loss-warmup", "2", "--warmup-iters", "2",
            "--queue-len", "2", "--decoder-dim", "16", "--log-every", "2", "--ckpt-every", "3", "--num-vis", "2",
            "--aux-block", "-2", "--workers", "0", "--out", str(out), *map(str, extra)]


def run_cli(args, launcher=None, timeout=120):
    cmd = (launcher or [sys.executable]) + [str(ROOT / "cosa.py")] + [str(a) for a in args]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def smoke_run(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cosa") / "smoke"
    proc = run_cli(cli_args(toy_root, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, proc


def test_cli_smoke_outputs(smoke_run):
    out, proc = smoke_run
    assert proc.stdout.strip().splitlines()[-1].startswith("RESULT cosa seg/val mIoU=")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["primary"] == "seg/val" and metrics["method"] == "cosa" and metrics["preset"] == "toy"
    assert {"seg/val", "seg_gtcls/val", "cam/train", "cam/val"} <= set(metrics["results"])
    for v in metrics["results"].values():
        assert 0.0 <= v["miou"] <= 100.0
    value = float(proc.stdout.strip().splitlines()[-1].split("=")[-1])
    assert value == pytest.approx(metrics["results"]["seg/val"]["miou"], abs=0.006)
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "args.json").is_file()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("losses/c2s" in r for r in records) and any("losses/cls" in r for r in records)
    assert (out / "vis" / "val.png").is_file()
    labels = list((out / "pseudo_labels" / "cpl" / "train").glob("*.png"))
    assert len(labels) == 24


def test_cli_same_seed_same_metrics(smoke_run, toy_root, tmp_path):
    out, _ = smoke_run
    proc = run_cli(cli_args(toy_root, tmp_path / "again"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((out / "metrics.json").read_text())["results"]
    b = json.loads((tmp_path / "again" / "metrics.json").read_text())["results"]
    assert a == b


def test_cli_resume_equals_uninterrupted(smoke_run, toy_root, tmp_path):
    out, _ = smoke_run
    run_dir = tmp_path / "resumed"
    proc = run_cli(cli_args(toy_root, run_dir, "--stop-after", "5"))  # 6 iterations per epoch: crosses an epoch
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoints" / "last.pt").is_file()
    proc = run_cli(["--resume", run_dir])
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((out / "metrics.json").read_text())["results"]
    b = json.loads((run_dir / "metrics.json").read_text())["results"]
    assert a == b


def test_eval_only_reproduces_final_metrics_and_crf(smoke_run, toy_root, tmp_path):
    out, _ = smoke_run
    from common import crf
    extra = ["--crf"] if crf.available() else []
    cosa.main(cli_args(toy_root, tmp_path / "eval", "--eval-only", "--ckpt", out / "checkpoints" / "last.pt", *extra))
    a = json.loads((out / "metrics.json").read_text())["results"]
    b = json.loads((tmp_path / "eval" / "metrics.json").read_text())["results"]
    assert a["seg/val"]["miou"] == pytest.approx(b["seg/val"]["miou"], abs=0.05)
    assert a["cam/val"]["miou"] == pytest.approx(b["cam/val"]["miou"], abs=0.05)
    if extra:
        assert 0.0 <= b["seg_crf/val"]["miou"] <= 100.0 and "seg_crf_gtcls/val" in b


@pytest.mark.parametrize("extra, needle", [
    (["--data", "/nonexistent/VOC"], "does not exist"),
    (["--backbone", "vit_nonexistent_xx"], "unknown timm model"),
    (["--ema-m", "2"], "--ema-m"),
    (["--ppl-alpha", "1.5"], "--ppl-alpha"),
    (["--ablation", "nope"], "invalid choice"),
    (["--eval-only"], "--ckpt"),
    (["--resume", "/nonexistent/run"], "--resume"),
    (["--backbone-kwargs", "patch_size=x"], "backbone-kwargs"),
    pytest.param(["--device", "cuda"], "CUDA", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_bad_inputs_exit_2_one_line(toy_root, tmp_path, capsys, extra, needle):
    argv = cli_args(toy_root, tmp_path / "run") + extra
    with pytest.raises(SystemExit) as exc:
        cosa.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cosa.py: error:") and needle in err[0]
    assert not (tmp_path / "run").exists()


def test_bad_input_subprocess_keeps_earlier_outputs(smoke_run, toy_root):
    out, _ = smoke_run
    before = (out / "metrics.json").read_bytes()
    proc = run_cli(cli_args(toy_root, out))  # non-empty --out
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "not empty" in proc.stderr
    assert (out / "metrics.json").read_bytes() == before


def test_torchrun_two_processes(toy_root, tmp_path):
    out = tmp_path / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531"]
    proc = run_cli(cli_args(toy_root, out, "--max-iters", "4"), launcher=launcher, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT cosa seg/val mIoU=" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 4 and "seg/val" in metrics["results"]
