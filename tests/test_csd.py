"""Tests for csd.py: the card's invariants (methods/csd.md Sec. 10) on hand-made inputs with
hand-computed values, the paper-preset network for one CSD iteration, and CLI runs (smoke,
resume, determinism, bad inputs and bad files, --supervision full, 2-process torchrun) on a tiny toy set."""
import argparse
import importlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

csd = importlib.import_module("csd")
from common import data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# A tiny configuration: 2 iterations per stage, a 2-layer 32-dim ViT at 32 px (4x4 tokens of 8 px).
TINY = ["--preset", "toy", "--max-iters", "2", "--batch-size", "4", "--seg-batch", "4", "--crop-size", "32",
        "--csd-resize", "36", "--seg-crop", "32", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--layer-index", "2", "--seed-scales", "0.5", "--workers", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def free_port():
    with socket.socket() as s:  # other test files may run torchrun at the same time
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*argv, torchrun=False, timeout=300):
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
           if torchrun else [sys.executable]) + [str(ROOT / "csd.py"), *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def tiny_args(**over):
    args = csd.Args()
    for k, v in csd.PRESETS["toy"].items():
        setattr(args, k, v)
    args.crop_size, args.csd_resize, args.embed_dim, args.depth, args.num_heads, args.layer_index = 32, 36, 32, 2, 2, 2
    for k, v in over.items():
        setattr(args, k, v)
    return args


# ------------------------------------------------------------------------------------------------
# 1-3: domains, co-occurrence (Eq. 1), resampling
# ------------------------------------------------------------------------------------------------
# classes A, B, C; images: {A}, {A}, {B}, {A,B}, {A,B,C}, {B,C}
LABELS = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 1], [0, 1, 1]], np.float32)


def test_split_is_a_partition():
    sources, targets = csd.split_domains(LABELS)
    assert [s.tolist() for s in sources] == [[0, 1], [2], []]
    assert targets.tolist() == [3, 4, 5]
    single = np.concatenate(sources)
    assert set(single) | set(targets) == set(range(len(LABELS))) and not set(single) & set(targets)


def test_cooccurrence_counts_and_eq1_rows():
    N = csd.cooccurrence_counts(LABELS)
    # Off-diagonal: pairs in images (A,B: images 3,4; A,C: 4; B,C: 4,5); diagonal: single-label counts.
    expected = np.array([[2, 2, 1], [2, 1, 2], [1, 2, 0]], float)
    np.testing.assert_array_equal(N, expected)
    assert np.array_equal(N, N.T)
    P = csd.cooccurrence_matrix(N)  # Eq. (1)
    np.testing.assert_allclose(P, expected / expected.sum(1, keepdims=True))
    np.testing.assert_allclose(P.sum(1), 1.0)
    np.testing.assert_allclose(csd.cooccurrence_counts(LABELS, 1.0), expected + 1)
    np.testing.assert_allclose(csd.cooccurrence_matrix(N, "softmax").sum(1), 1.0)


def test_cor_distribution_and_sampling_frequencies():
    N = csd.cooccurrence_counts(LABELS)
    P = csd.cooccurrence_matrix(N)
    sources, _ = csd.split_domains(LABELS)
    eligible = np.array([len(s) > 0 for s in sources])
    y_m = np.array([1, 0, 1], np.float32)  # target with classes A and C
    p = csd.cor_distribution(P, y_m, eligible)
    # rows A = [2,2,1]/5 and C = [1,2,0]/3; sum = [0.4+1/3, 0.4+2/3, 0.2]; C has no source -> 0.
    raw = np.array([0.4 + 1 / 3, 0.4 + 2 / 3, 0.0])
    np.testing.assert_allclose(p, raw / raw.sum())
    assert p[2] == 0 and abs(p.sum() - 1) < 1e-12
    rng = np.random.default_rng(0)
    draws = rng.choice(3, size=10000, p=p)
    np.testing.assert_allclose(np.bincount(draws, minlength=3) / 10000, p, atol=0.015)
    np.testing.assert_allclose(csd.cor_distribution(P, y_m, eligible, "uniform"), [0.5, 0.5, 0.0])
    np.testing.assert_allclose(csd.cor_distribution(P, y_m, eligible, "uniform_image", np.array([2, 1, 0])),
                               [2 / 3, 1 / 3, 0.0])
    assert csd.cor_distribution(P, y_m, np.zeros(3, bool)).sum() == 0  # nothing eligible: no NaN


# ------------------------------------------------------------------------------------------------
# 4-6: copy-paste, alignment, token masks
# ------------------------------------------------------------------------------------------------
def test_make_composites_hand_made():
    x_s, x_m = torch.ones(3, 4, 4), torch.zeros(3, 4, 4)
    M_fg = torch.zeros(4, 4, dtype=torch.bool)
    M_fg[:2, :2] = True
    R_bg = torch.zeros(4, 4, dtype=torch.bool)
    R_bg[3, :] = True
    x_fg, x_bg = csd.make_composites(x_s, x_m, M_fg, R_bg)
    assert torch.equal(x_fg, M_fg.float().expand(3, 4, 4))
    assert torch.equal(x_bg, R_bg.float().expand(3, 4, 4))


@pytest.mark.parametrize("bg_paste", ["source", "intersect"])
def test_triplet_invariants(toy_root, bg_paste, monkeypatch):
    """On the toy set with its real augmentation; M_bg and bg(x_m) are derived from the augmented priors (recorded
    from weak_augment), as the triplet does not return them. Catches: composites pasting the wrong region, R_bg
    not M_bg (source) or not M_bg & bg(x_m) (intersect), y_fg not y_m | {c_s}, x_m from the single-label pool."""
    raw = data.SegDataset(toy_root, "train")
    labels = raw.labels()
    P = csd.cooccurrence_matrix(csd.cooccurrence_counts(labels))
    tr = csd.CSDTransform(tiny_args(prior="gt", bg_paste=bg_paste), raw, labels, P, prior_key="mask")
    priors, orig = [], csd.weak_augment

    def recording(*a):
        out = orig(*a)
        priors.append(out[1][0])
        return out

    monkeypatch.setattr(csd, "weak_augment", recording)
    seen = 0
    for k in range(6):
        priors.clear()
        t = tr.triplet(np.random.default_rng(k))
        if t["M_fg"].sum() == 0 and t["R_bg"].sum() == 0:
            continue
        seen += 1
        c = int(t["c_s"])
        pr_s, pr_m = (torch.from_numpy(p.astype(np.int64)) for p in priors)  # x_s's, then x_m's augmented prior
        M_bg, bg_m = (pr_s != c + 1) & (pr_s != 255), pr_m == 0
        assert torch.equal(t["y_s"], F.one_hot(torch.tensor(c), labels.shape[1]).float())  # x_s is single-label c
        M_fg, R_bg = t["M_fg"], t["R_bg"]
        assert torch.equal(M_fg, pr_s == c + 1)
        assert torch.equal(t["x_fg"][:, M_fg], t["x_s"][:, M_fg])
        assert torch.equal(t["x_bg"][:, R_bg], t["x_s"][:, R_bg])
        rest = ~M_fg & ~R_bg  # both composites equal x_m there
        assert torch.equal(t["x_fg"][:, rest], t["x_bg"][:, rest])
        # Eq. (5): R_bg = M_bg(x_s) (paper, default); Deviation 15: within M_bg(x_s) & bg(x_m) (intersect)
        assert torch.equal(R_bg, M_bg & bg_m if bg_paste == "intersect" else M_bg)
        assert torch.equal(t["y_fg"], torch.maximum(t["y_bg"], t["y_s"]))  # y_fg = y_m | {c_s}
        assert t["y_bg"].sum() >= 2  # the target pool holds multi-label images only
    assert seen > 0


def test_joint_augmentation_keeps_alignment():
    h, w = 40, 50
    yy, xx = np.mgrid[:h, :w]
    image = np.stack([xx, yy, (xx + yy) % 256], -1).astype(np.uint8)  # pixels encode their coordinates
    mask = (xx % 200).astype(np.uint8)
    for seed in range(5):
        img, (m,) = csd.weak_augment(image, (mask,), np.random.default_rng(seed), 32, 40)
        valid = m != 255
        assert valid.any() and np.array_equal(img[..., 0][valid], m[valid])
    img, (m,) = csd.weak_augment(image, (mask,), np.random.default_rng(0), 32, 60)  # rescaled: nearest mask
    assert set(np.unique(m)) - {255} <= set(np.unique(mask))


def test_token_masks_full_and_majority():
    m = torch.zeros(1, 16, 16, dtype=torch.bool)
    m[0, :8, :8] = True  # one whole patch of 8x8
    m[0, 8:16, 8:13] = True  # 5/8 of a patch
    full = csd.token_mask(m, 8, "full")
    maj = csd.token_mask(m, 8, "majority")
    assert full.tolist() == [[[True, False], [False, False]]]
    assert maj.tolist() == [[[True, False], [False, True]]]
    bg = ~m
    assert not (csd.token_mask(m, 8) & csd.token_mask(bg, 8)).any()
    assert not (csd.token_mask(m, 8, "majority") & csd.token_mask(bg, 8, "majority")).any()


# ------------------------------------------------------------------------------------------------
# 7-10: losses (Eqs. 3-6)
# ------------------------------------------------------------------------------------------------
def one_token(vals):
    return torch.tensor(vals, dtype=torch.float32).view(1, -1, 1, 1)


def test_eq3_hand_value_and_reduction():
    M_s = one_token([0.0, 0.0])  # p = (1/2, 1/2)
    M_sm = one_token([math.log(3.0), 0.0])  # q = (3/4, 1/4)
    T = torch.ones(1, 1, 1, dtype=torch.bool)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # = 0.5 ln(4/3)
    assert abs(csd.loss_fg(M_s, M_sm, T).item() - expected) < 1e-6
    # Two masked tokens: "sum" doubles, "mean" does not; an unmasked token adds nothing.
    M_s2, M_sm2 = M_s.expand(1, 2, 1, 3).clone(), M_sm.expand(1, 2, 1, 3).clone()
    T2 = torch.tensor([[[True, True, False]]])
    assert abs(csd.loss_fg(M_s2, M_sm2, T2).item() - 2 * expected) < 1e-6
    assert abs(csd.loss_fg(M_s2, M_sm2, T2, reduce="mean").item() - expected) < 1e-6
    # present-only (dev code): the c_s = 0 term alone.
    got = csd.loss_fg(M_s, M_sm, T, classes="present", c_s=torch.tensor([0])).item()
    assert abs(got - 0.5 * math.log(0.5 / 0.75)) < 1e-6


def test_reduction_batch_of_two_hand_values():
    """Sum over each image's masked tokens, then the MEAN over the batch (Deviation 4); 'mean': per-image mean."""
    M_s = torch.zeros(2, 2, 1, 3)  # p = (1/2, 1/2) everywhere
    M_sm = torch.zeros(2, 2, 1, 3)
    M_sm[:, 0] = math.log(3.0)  # q = (3/4, 1/4) everywhere
    T = torch.tensor([[[True, True, True]], [[True, False, False]]])  # 3 tokens and 1 token
    kl = 0.5 * math.log(4 / 3)
    assert abs(csd.loss_fg(M_s, M_sm, T).item() - (3 * kl + kl) / 2) < 1e-6
    assert abs(csd.loss_fg(M_s, M_sm, T, reduce="mean").item() - kl) < 1e-6
    kl_bg = csd.loss_bg(M_s[:1, :, :, :1], M_sm[:1, :, :, :1], T[:1, :, :1]).item()  # one token's value
    assert abs(csd.loss_bg(M_s, M_sm, T).item() - (3 * kl_bg + kl_bg) / 2) < 1e-6
    assert abs(csd.loss_bg(M_s, M_sm, T, reduce="mean").item() - kl_bg) < 1e-6
    empty = torch.zeros_like(T)
    assert csd.loss_fg(M_s, M_sm, empty).item() == 0 and csd.loss_fg(M_s, M_sm, empty, reduce="mean").item() == 0


def test_random_resized_crop_fallback_is_torchvisions_centre_crop():
    """After 10 failed draws torchvision centre-crops with the aspect ratio clamped (not the whole image)."""
    from PIL import Image

    H, W = 10, 200  # every draw of scale >= 0.08 within ratio [3/4, 4/3] is too tall: the fallback runs
    image = np.stack([np.tile(np.arange(W, dtype=np.uint8), (H, 1))] * 3, -1)
    got = csd.random_resized_crop(image, np.random.default_rng(0), 16)
    h, w = 10, round(10 * 4 / 3)  # in_ratio 20 > 4/3: full height, width = H * max(ratio)
    x0 = (W - w) // 2
    expected = np.asarray(Image.fromarray(image[:h, x0:x0 + w]).resize((16, 16), Image.BICUBIC))
    np.testing.assert_array_equal(got, expected)


def test_interpolate_pos_matches_mctformer():
    """MCTformer models.py interpolate_pos_encoding: bicubic with scale_factor (h0 + 0.1) / sqrt(N)."""
    model = csd.build_model(tiny_args(), 3, init_weights=False)
    g = model.grid
    assert model.interpolate_pos(g, g) is model.pos_embed
    for h, w in ((3, 5), (7, 2)):
        got = model.interpolate_pos(h, w)
        D = model.pos_embed.shape[-1]
        patch = model.pos_embed[:, 3:].reshape(1, g, g, D).permute(0, 3, 1, 2)
        ref = F.interpolate(patch, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic")
        assert got.shape == (1, 3 + h * w, D)
        torch.testing.assert_close(got[:, :3], model.pos_embed[:, :3])
        torch.testing.assert_close(got[:, 3:], ref.flatten(2).transpose(1, 2))


def test_eq4_eq5_hand_value():
    # teacher (0, 0) with dummy 0 -> pi = (1/3, 1/3, 1/3), b = (1/3, 2/3);
    # student (ln 2, ln 2) -> exp = (1, 2, 2), pi_0 = 1/5, b = (1/5, 4/5).
    M_s, M_sm = one_token([0.0, 0.0]), one_token([math.log(2.0), math.log(2.0)])
    T = torch.ones(1, 1, 1, dtype=torch.bool)
    expected = (1 / 3) * math.log((1 / 3) / (1 / 5)) + (2 / 3) * math.log((2 / 3) / (4 / 5))
    assert abs(csd.loss_bg(M_s, M_sm, T).item() - expected) < 1e-6
    full = (1 / 3) * math.log((1 / 3) / (1 / 5)) + 2 * (1 / 3) * math.log((1 / 3) / (2 / 5))
    assert abs(csd.loss_bg(M_s, M_sm, T, mode="full").item() - full) < 1e-6
    # rawsum: softmax([0, sum M]) -> teacher (1/2, 1/2), student (1/5, 4/5)
    raw = 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8)
    assert abs(csd.loss_bg(M_s, M_sm, T, mode="rawsum").item() - raw) < 1e-6


def test_losses_zero_nonnegative_masked_and_teacher_detached():
    torch.manual_seed(0)
    M_s = torch.randn(2, 4, 3, 3, requires_grad=True)
    M_sm = torch.randn(2, 4, 3, 3, requires_grad=True)
    T = torch.rand(2, 3, 3) > 0.5
    for loss in (csd.loss_fg, csd.loss_bg):
        assert abs(loss(M_s, M_s.detach().clone(), T).item()) < 1e-6
        assert loss(M_s, M_sm, T).item() >= 0
        assert loss(M_s, M_sm, torch.zeros_like(T)).item() == 0
        changed = M_sm.detach().clone()
        changed.permute(0, 2, 3, 1)[~T] += 5.0  # change the student outside the mask only
        assert not torch.equal(changed, M_sm.detach())
        assert abs(loss(M_s, changed, T).item() - loss(M_s, M_sm.detach(), T).item()) < 1e-5
        M_sm.grad = None
        loss(M_s, M_sm, T).backward()
        assert M_sm.grad.permute(0, 2, 3, 1)[~T].abs().max() == 0
        assert M_sm.grad.permute(0, 2, 3, 1)[T].abs().max() > 0
        assert M_s.grad is None  # the teacher is a stop-gradient target


def test_shift_invariance_fg_not_bg():
    torch.manual_seed(1)
    M_s, M_sm = torch.randn(1, 5, 2, 2), torch.randn(1, 5, 2, 2)
    T = torch.ones(1, 2, 2, dtype=torch.bool)
    assert abs(csd.loss_fg(M_s, M_sm + 3.0, T).item() - csd.loss_fg(M_s, M_sm, T).item()) < 1e-5
    # From student = teacher, raising every student logit by delta > 0 on T_bg raises L_bg.
    assert csd.loss_bg(M_s, M_s + 0.5, T).item() > csd.loss_bg(M_s, M_s, T).item() + 1e-4
    # Without the dummy channel (all-class softmax) the shift would be invisible: that is L_fg.


def test_saliency_equals_bernoulli_kl_and_pi0_monotone():
    torch.manual_seed(2)
    M_s, M_sm = torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)
    T = torch.ones(1, 3, 3, dtype=torch.bool)
    dummy = 0.3
    a = torch.sigmoid(dummy - torch.logsumexp(M_s, 1))  # teacher pi_0
    b = torch.sigmoid(dummy - torch.logsumexp(M_sm, 1))
    bern = (a * torch.log(a / b) + (1 - a) * torch.log((1 - a) / (1 - b))).sum()
    assert abs(csd.loss_bg(M_s, M_sm, T, dummy=dummy).item() - bern.item()) < 1e-5
    pi0 = [csd.background_distribution(M_sm + d * F.one_hot(torch.tensor(1), 4).view(1, 4, 1, 1), dummy=dummy)[0, 0]
           .exp().mean().item() for d in (0.0, 0.5, 1.0)]
    assert pi0[0] > pi0[1] > pi0[2]


def fake_batch(B, K, crop, seed=0):
    g = torch.Generator().manual_seed(seed)
    M_fg = torch.zeros(B, crop, crop, dtype=torch.bool)
    M_fg[:, : crop // 2, : crop // 2] = True
    return {"image": torch.randn(B, 3, crop, crop, generator=g), "label": (torch.rand(B, K, generator=g) > 0.5).float(),
            "x_s": torch.randn(B, 3, crop, crop, generator=g), "x_fg": torch.randn(B, 3, crop, crop, generator=g),
            "x_bg": torch.randn(B, 3, crop, crop, generator=g), "M_fg": M_fg, "R_bg": ~M_fg,
            "c_s": torch.zeros(B, dtype=torch.long), "y_fg": torch.ones(B, K)}


def test_eq6_lambda_zero_is_baseline_and_gradient_reach():
    args = tiny_args(lambda_fg=0.0, lambda_bg=0.0)
    torch.manual_seed(0)
    model = csd.build_model(args, 6, init_weights=False).eval()  # eval: no drop-path randomness
    batch = fake_batch(2, 6, 32)
    with torch.no_grad():
        base = csd.loss_cls(model(batch["image"]), batch["label"])
        full = csd.csd_losses(model, batch, args, 6, csd_active=True)
    assert torch.allclose(full["total"], base, atol=1e-5) and full["fg"] > 0 and full["bg"] > 0
    # lambda1 = lambda2 = 1: Eq. (6) is the plain sum.
    args1 = tiny_args(lambda_fg=1.0, lambda_bg=1.0)
    with torch.no_grad():
        l1 = csd.csd_losses(model, batch, args1, 6, csd_active=True)
    assert torch.allclose(l1["total"], l1["cls"] + l1["fg"] + l1["bg"], atol=1e-5)
    # Gradient reach of the CSD terms: patchcam reaches the head and the blocks; fused_par not the head.
    for csd_map, head_grad in (("patchcam", True), ("fused_par", False)):
        model.zero_grad()
        a = tiny_args(csd_map=csd_map)
        out = csd.csd_losses(model, batch, a, 6, csd_active=True)
        (out["fg"] + out["bg"]).backward()
        hg = model.head.weight.grad
        assert (hg is not None and hg.abs().sum() > 0) == head_grad
        assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# 11-12: model, seeds
# ------------------------------------------------------------------------------------------------
def test_model_shapes_attention_rows_non_square():
    args = tiny_args()
    model = csd.build_model(args, 5, init_weights=False).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 40, 56))  # non-square, not the training size
    assert out["cls_logits"].shape == (2, 5) and out["patch_logits"].shape == (2, 5)
    assert out["patch_cam"].shape == (2, 5, 5, 7)
    assert out["attn"].shape == (2, 2, 5 + 35, 5 + 35)
    torch.testing.assert_close(out["attn"].sum(-1), torch.ones(2, 2, 40))
    assert (out["attn"][:, :, 5:, 5:].sum(-1) < 1).all()
    fused = csd.localization_map(out, 2, 5)
    assert fused.shape == (2, 5, 5, 7) and (fused >= 0).all()
    # Seeds: image size, [0, 1], zero for absent classes.
    label = np.array([1, 0, 0, 1, 0], np.float32)
    cam = csd.seed_map(model, np.zeros((41, 57, 3), np.uint8) + 100, label, args, torch.device("cpu"))
    assert cam.shape == (5, 41, 57) and cam.min() >= 0 and cam.max() <= 1 and cam[[1, 2, 4]].max() == 0


def test_seed_sweep_perfect_maps(toy_root):
    ds = data.SegDataset(toy_root, "train")
    cache = {}
    for i in range(len(ds)):
        s = ds.load(i)
        keys = np.flatnonzero(s["label"] > 0)
        onehot = torch.from_numpy(np.stack([(s["mask"] == k + 1) for k in keys]).astype(np.float32))  # (Kp, H, W)
        cache[s["name"]] = csd.LowresMaps([torch.stack([onehot, onehot.flip(-1)]).half()], "minmax")
    res = csd.evaluate_seeds(cache, map(ds.load, range(len(ds))), ds.num_classes, 0.5)
    assert res["all"]["best"]["miou"] == pytest.approx(1.0)
    curve = res["all"]["curve"]
    assert res["all"]["best_threshold"] == curve[int(np.nanargmax([m for _, m in curve]))][0]
    assert len(curve) == 51 and curve[0][0] == 0.0


def test_histogram_sweep_equals_per_image_sweep(toy_root):
    from common import miou
    ds = data.SegDataset(toy_root, "train")
    g = torch.Generator().manual_seed(0)
    cache, ref = {}, miou.ThresholdSweep(ds.num_classes, np.round(np.arange(0.0, 0.3 + 1e-9, 0.01), 2))
    for i in range(len(ds)):
        s = ds.load(i)
        keys = np.flatnonzero(s["label"] > 0)
        low = torch.rand(2, len(keys), 5, 6, generator=g).half()
        cache[s["name"]] = csd.LowresMaps([low], "minmax")
        cam = csd.seed_from_lowres(cache[s["name"]], s["label"], s["mask"].shape)
        ref.update(cam[keys], keys + 1, s["mask"])
    got = csd.evaluate_seeds(cache, map(ds.load, range(len(ds))), ds.num_classes, 0.3)["all"]
    want = ref.compute()
    assert got["curve"] == want["curve"] and got["best_threshold"] == want["best_threshold"]


def test_paper_preset_one_csd_iteration_at_224():
    """The paper network (DeiT-S/16, C = 20, random weights) at the paper crop: one CSD step, batch 1."""
    args = csd.Args()
    for k, v in csd.PRESETS["paper_voc"].items():
        setattr(args, k, v)
    args.pretrained = False
    torch.manual_seed(0)
    model = csd.build_model(args, 20, init_weights=False)
    assert sum(p.numel() for p in model.blocks.parameters()) > 21e6  # DeiT-S blocks
    batch = fake_batch(1, 20, 224)
    opt = torch.optim.AdamW(csd.param_groups(model, args.weight_decay), lr=args.lr)
    model.train()
    losses = csd.csd_losses(model, batch, args, 20, csd_active=True)
    losses["total"].backward()
    opt.step()
    assert torch.isfinite(losses["total"]) and losses["tokens_fg"] == 49  # 7x7 whole 16-px patches
    with torch.no_grad():
        out = model.eval()(batch["image"])
    assert out["patch_cam"].shape == (1, 20, 14, 14) and out["attn"].shape == (1, 12, 216, 216)


# ------------------------------------------------------------------------------------------------
# CLI: smoke, resume, determinism, bad inputs, torchrun
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke_run(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("csd") / "run"
    r = run_cli("--data", toy_root, "--out", out, *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def results_of(run_dir):
    return json.loads((Path(run_dir) / "metrics.json").read_text())["results"]


def test_smoke_outputs(smoke_run, toy_root):
    out, r = smoke_run
    assert r.stdout.strip().splitlines()[-1].startswith("RESULT csd seg/val mIoU=")
    m = json.loads((out / "metrics.json").read_text())
    assert m["primary"] == "seg/val" and m["method"] == "csd"
    for key in ("seg/val", "seed/train", "seed/train_multi", "mask/train", "stage1_seed/train"):
        assert key in m["results"], key
    assert 0 <= m["results"]["seg/val"]["miou"] <= 100
    n_train = len(data.split_ids(toy_root, "train_aug"))
    assert len(list((out / "pseudo_labels" / "mask" / "train_aug").glob("*.png"))) == n_train
    assert len(list((out / "pseudo_labels" / "prior" / "train_aug").glob("*.png"))) == n_train
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "vis" / "train.png").is_file()
    assert json.loads((out / "args.json").read_text())["csd"] == "on"
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("losses/fg" in rec for rec in log)


def test_resume_equals_uninterrupted(smoke_run, toy_root, tmp_path):
    """Stopped inside each training stage in turn (2 iterations each), then resumed: the same results."""
    out = tmp_path / "run"
    r = run_cli("--data", toy_root, "--out", out, *TINY, "--stop-after", "1")  # stops inside stage 1
    assert r.returncode == 0 and not (out / "metrics.json").exists(), r.stderr[-2000:]
    for stage in ("classifier", "seg"):  # the last iteration of one stage, the first of the next
        r = run_cli("--resume", out, "--stop-after", "2")
        assert r.returncode == 0 and not (out / "metrics.json").exists(), r.stderr[-2000:]
        assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["state"]["stage"] == stage
    # explicit --stop-after 0: a resumed run would otherwise keep the --stop-after 1 of its args.json
    r = run_cli("--resume", out, "--stop-after", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert results_of(out) == results_of(smoke_run[0])


def test_eval_only_reproduces_final_results(smoke_run, toy_root, tmp_path):
    out = tmp_path / "eval"
    r = run_cli("--data", toy_root, "--out", out, *TINY, "--eval-only", "--ckpt", smoke_run[0] / "checkpoints" / "last.pt")
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = results_of(out), results_of(smoke_run[0])
    for key in ("seed/train", "seed/train_multi", "mask/train", "seg/val"):
        assert got[key] == want[key], key
    assert not (out / "pseudo_labels" / "prior").exists()  # no training, no stage 1


def test_determinism(smoke_run, toy_root, tmp_path):
    r = run_cli("--data", toy_root, "--out", tmp_path / "again", *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert results_of(tmp_path / "again") == results_of(smoke_run[0])


@pytest.mark.parametrize("argv, needle", [
    (["--data", "/nonexistent/voc"], "does not exist"),
    (["--backbone", "not_a_model"], "unknown timm model"),
    (["--lambda-fg", "-1"], "lambda-fg"),
    (["--sampling", "sometimes"], "invalid choice"),
    (["--crop-size", "30"], "multiple of"),
    (["--prior", "dir:/nonexistent"], "does not exist"),
    (["--resume", "/nonexistent/run"], "no args.json"),
    (["--eval-only"], "--ckpt"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no CUDA")]))
def test_bad_inputs_in_process(argv, needle, toy_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        csd.main(["--data", str(toy_root), "--out", str(tmp_path / "r"), *TINY, *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0] and err[0].startswith("csd.py: error:")
    assert not (tmp_path / "r").exists()


def test_bad_input_subprocess_keeps_earlier_outputs(smoke_run, toy_root):
    out = smoke_run[0]
    before = (out / "metrics.json").read_bytes()
    r = run_cli("--data", toy_root, "--out", out, *TINY)  # non-empty run folder
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "not empty" in r.stderr
    assert (out / "metrics.json").read_bytes() == before
    broken = out.parent / "broken_toy"
    shutil.copytree(toy_root, broken)
    (broken / "JPEGImages" / f"{data.split_ids(broken, 'val')[0]}.jpg").unlink()
    r = run_cli("--data", broken, "--out", out.parent / "never", *TINY)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (out.parent / "never").exists()


@pytest.fixture(scope="module")
def bad_files(smoke_run, tmp_path_factory):
    """Files that every loading flag must refuse in one line: not a checkpoint, truncated, a pickle holding
    code, another method's run, another backbone's keys, another number of classes."""
    d = tmp_path_factory.mktemp("bad")
    last = smoke_run[0] / "checkpoints" / "last.pt"
    good = torch.load(last, weights_only=True)
    (d / "text.pt").write_text("not a checkpoint")
    (d / "truncated.pt").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    torch.save({"args": argparse.Namespace(lr=1.0)}, d / "code.pt")
    torch.save({**good, "method": "cosa"}, d / "cosa.pt")
    torch.save(timm.create_model("resnet18").state_dict(), d / "resnet.pt")
    seg = good["weights"]["seg"]
    torch.save({**good, "weights": {**good["weights"], "seg": {"x." + k: v for k, v in seg.items()}}}, d / "keys.pt")
    fewer = {k: v[:3] if k.startswith("aspp") else v for k, v in seg.items()}  # 3 classes, not 7
    torch.save({**good, "weights": {**good["weights"], "seg": fewer}}, d / "classes.pt")
    for name in ("truncated", "cosa"):  # run folders whose checkpoints/last.pt is bad
        (d / f"run_{name}" / "checkpoints").mkdir(parents=True)
        shutil.copy(smoke_run[0] / "args.json", d / f"run_{name}" / "args.json")
        shutil.copy(d / f"{name}.pt", d / f"run_{name}" / "checkpoints" / "last.pt")
    return d


@pytest.mark.parametrize("flag, name, needle", [
    ("--weights", "missing.pt", "no such file"), ("--weights", "text.pt", "not a readable torch checkpoint"),
    ("--weights", "truncated.pt", "not a readable torch checkpoint"), ("--weights", "code.pt", "refused"),
    ("--weights", "cosa.pt", "holds no state dict"), ("--weights", "resnet.pt", "does not fit"),
    ("--ckpt", "missing.pt", "no such file"), ("--ckpt", "text.pt", "not a readable torch checkpoint"),
    ("--ckpt", "truncated.pt", "not a readable torch checkpoint"), ("--ckpt", "code.pt", "refused"),
    ("--ckpt", "cosa.pt", "written by cosa.py"), ("--ckpt", "resnet.pt", "not a run checkpoint"),
    ("--ckpt", "keys.pt", "missing keys"), ("--ckpt", "classes.pt", "another number of classes"),
    ("--resume", "run_truncated", "not a readable torch checkpoint"), ("--resume", "run_cosa", "written by cosa.py"),
])
def test_bad_files_one_line(flag, name, needle, bad_files, toy_root, tmp_path, capsys):
    path = bad_files / name
    before = {p: p.read_bytes() for p in bad_files.rglob("*") if p.is_file()}
    argv = {"--weights": ["--data", toy_root, "--out", tmp_path / "r", *TINY, "--weights", path],
            "--ckpt": ["--data", toy_root, "--out", tmp_path / "r", *TINY, "--eval-only", "--ckpt", path],
            "--resume": ["--resume", path]}[flag]
    with pytest.raises(SystemExit) as e:
        csd.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0] and err[0].startswith("csd.py: error:"), err
    assert not (tmp_path / "r").exists() and before == {p: p.read_bytes() for p in bad_files.rglob("*") if p.is_file()}


def test_supervision_full_trains_seg_on_ground_truth(toy_root, tmp_path):
    """The upper bound: only the segmentation stage runs, on the ground-truth masks."""
    out = tmp_path / "full"
    r = run_cli("--data", toy_root, "--out", out, *TINY, "--supervision", "full")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["supervision"] == "full" and set(m["results"]) == {"seg/val"} and set(m["stage_seconds"]) == {"seg"}
    assert not any((out / "pseudo_labels").iterdir()) and (out / "vis" / "train.png").is_file()
    sample = data.SegDataset(toy_root, "train_aug").load(0)
    target = csd.SegTransform(32, "mask")(sample, np.random.default_rng(0))["target"]
    assert set(target.unique().tolist()) <= set(np.unique(sample["mask"]).tolist()) | {255}


def test_torchrun_two_processes(toy_root, tmp_path):
    out = tmp_path / "ddp"
    r = run_cli("--data", toy_root, "--out", out, *TINY, torchrun=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RESULT csd seg/val mIoU=" in r.stdout
    assert "seg/val" in results_of(out)
