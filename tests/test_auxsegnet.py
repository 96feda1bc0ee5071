"""Tests for auxsegnet.py: the card's §11 invariants on hand-made inputs, gradient reach per variant,
the paper-preset network for one iteration, and CLI runs (smoke, resume, determinism, bad inputs, torchrun)."""
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

aux = importlib.import_module("auxsegnet")
from common import crf, data  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "auxsegnet.py"
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
# Tiny schedule: 24 train images, batch 8 -> 3 iterations per phase; 2 stages exercise one label update.
TINY = ["--epochs-cls", "1", "--epochs-per-stage", "1", "--num-stages", "2", "--crop-size", "64",
        "--cls-crop-size", "64", "--ckpt-every", "1000"]


def run_cli(args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def toy_model(variant="mt_ct", num_classes=7):
    torch.manual_seed(0)
    tasks, affinity = aux.VARIANT_TASKS[variant]
    return aux.AuxSegNet("resnet18", num_classes, tasks, affinity, head_dim=16, dilations=(1, 2, 3))


# ----------------------------------------------------------------------------------------------------------
# Invariants 1-5: shapes, affinities, Omega, A_CT
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def forward_out():
    model = toy_model().eval()
    with torch.no_grad():
        return model(torch.randn(2, 3, 112, 112))


def test_shapes(forward_out):
    o = forward_out
    assert o["cls_logits"].shape == (2, 6)
    assert o["cam"].shape == (2, 6, 14, 14)
    assert o["sal_init"].shape == o["sal_ref"].shape == (2, 1, 14, 14)
    assert o["seg_init"].shape == o["seg_ref"].shape == (2, 7, 14, 14)
    for k in ("A_seg", "A_sal", "A_ct"):
        assert o[k].shape == (2, 196, 196)


def test_task_affinity_rows_sum_to_one(forward_out):
    for k in ("A_seg", "A_sal"):
        A = forward_out[k]
        assert (A >= 0).all()
        torch.testing.assert_close(A.sum(-1), torch.ones(2, 196), atol=1e-5, rtol=0)


def test_task_affinity_hand_computed():
    # Eq. (C3): theta = [[1, 0]], phi = [[1, 0]] at N = 2 positions, D = 1 -> logits [[1, 0], [0, 0]].
    theta = torch.tensor([[[1.0, 0.0]]])
    phi = torch.tensor([[[1.0, 0.0]]])
    A = aux.task_affinity(theta, phi)
    e = np.e
    expected = torch.tensor([[[e / (e + 1), 1 / (e + 1)], [0.5, 0.5]]])
    torch.testing.assert_close(A, expected)


def test_omega_sums_to_one(forward_out):
    om = forward_out["omega"]
    torch.testing.assert_close(om.sum(1), torch.ones_like(om[:, 0]), atol=1e-6, rtol=0)
    assert (om > 0).all() and (om < 1).all()


def test_cross_task_affinity_bounds(forward_out):
    o = forward_out
    lo, hi = torch.minimum(o["A_seg"], o["A_sal"]), torch.maximum(o["A_seg"], o["A_sal"])
    assert (o["A_ct"] >= 0).all()
    assert (o["A_ct"] >= lo - 1e-7).all() and (o["A_ct"] <= hi + 1e-7).all()
    rows = o["A_ct"].sum(-1)
    assert (rows > 0).all() and (rows < 2).all()


def test_zeroed_sa_gives_mean_affinity():
    sa = aux.CrossTaskAttention()
    for p in sa.parameters():
        torch.nn.init.zeros_(p)
    A1 = torch.softmax(torch.randn(1, 9, 9), -1)
    A2 = torch.softmax(torch.randn(1, 9, 9), -1)
    A_ct, omega = sa(A1, A2)
    assert torch.equal(omega, torch.full_like(omega, 0.5))
    torch.testing.assert_close(A_ct, 0.5 * (A1 + A2), atol=0, rtol=0)
    torch.testing.assert_close(A_ct.sum(-1), torch.ones(1, 9))


def test_cross_task_hand_computed():
    # Eq. (C5)-(C6) with conv1 = identity (centre tap), conv2 weight 0 and bias (1, 0): Omega = softmax([1, 0]).
    sa = aux.CrossTaskAttention()
    with torch.no_grad():
        sa.conv1.weight.zero_()
        sa.conv2.weight.zero_()
        sa.conv2.bias.copy_(torch.tensor([1.0, 0.0]))
    A1, A2 = torch.eye(2)[None], torch.full((1, 2, 2), 0.5)
    A_ct, _ = sa(A1, A2)
    w = np.e / (np.e + 1)
    expected = torch.tensor([[[w + 0.5 * (1 - w), 0.5 * (1 - w)], [0.5 * (1 - w), w + 0.5 * (1 - w)]]])
    torch.testing.assert_close(A_ct, expected.float())


def test_cam_is_classifier_applied_per_position():
    # Eq. (C1): CAM_c(p) = w_c^T F(p) with the fc8 weights, on the un-dropped backbone features.
    model = toy_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(x)[-1]  # (1, K, 8, 8)
        cam = model(x)["cam"]
        expected = torch.einsum("ck,bkhw->bchw", model.fc8.weight[:, :, 0, 0], feats)
        # and global pooling of the CAM gives the (eval-mode) class logits: GAP and fc8 commute
        torch.testing.assert_close(cam.mean((2, 3)), model(x)["cls_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cam, expected, atol=1e-4, rtol=1e-4)


def test_enhance_hand_computed():
    # Eq. (C4): Y = X + W(A G(X)); with G = W = identity 1x1 convs and A = uniform rows, Y = X + mean_j X_j.
    branch = aux.DenseBranch(4, 2, 3, (1, 1, 1), non_local=True)
    with torch.no_grad():
        for conv in (branch.g, branch.W):
            conv.weight.copy_(torch.eye(2)[:, :, None, None])
            conv.bias.zero_()
    X = torch.tensor([[[[1.0, 3.0]], [[2.0, 6.0]]]])  # (1, 2, 1, 2): N = 2 positions
    A = torch.full((1, 2, 2), 0.5)
    Y = branch.enhance(X, A)
    torch.testing.assert_close(Y, torch.tensor([[[[3.0, 5.0]], [[6.0, 10.0]]]]))


# ----------------------------------------------------------------------------------------------------------
# Invariant 6: refinement
# ----------------------------------------------------------------------------------------------------------
def test_refinement_identity_and_constant():
    S = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(aux.refine_by_affinity(torch.eye(20).expand(2, 20, 20), S), S)
    A = torch.softmax(torch.randn(2, 20, 20), -1)
    const = torch.full((2, 3, 4, 5), 2.5)
    R = aux.refine_by_affinity(A, const)
    assert R.shape == const.shape
    torch.testing.assert_close(R, const)


def test_refinement_gathers_rows():
    A = torch.rand(1, 6, 6)
    S = torch.randn(1, 2, 2, 3)
    R = aux.refine_by_affinity(A, S)
    Sf = S.flatten(2)[0]  # (K, N)
    for i in range(6):
        for k in range(2):
            expected = sum(A[0, i, j] * Sf[k, j] for j in range(6))  # gather: R(i) = sum_j A[i, j] S(j)
            assert abs(R.flatten(2)[0, k, i].item() - expected.item()) < 1e-5
    # the transpose (scatter) is a different operator for a non-symmetric A
    assert not torch.allclose(R, aux.refine_by_affinity(A.transpose(1, 2), S))


# ----------------------------------------------------------------------------------------------------------
# Invariant 7: CAM normalisation and propagation
# ----------------------------------------------------------------------------------------------------------
def test_normalize_cam_hand_computed():
    cam = torch.tensor([[[[2.0, 4.0], [-1.0, 0.0]], [[-3.0, -1.0], [-2.0, -5.0]]]])  # (1, 2, 2, 2)
    M = aux.normalize_cam(cam)
    d = 4.0 + 1e-5
    torch.testing.assert_close(M[0, 0], torch.tensor([[2 / d, 4 / d], [0.0, 0.0]]))
    assert torch.equal(M[0, 1], torch.zeros(2, 2))  # all-negative channel -> zeros, no NaN
    assert M.max() <= 1 and M.min() >= 0


def test_propagation_keeps_unit_interval():
    M = aux.normalize_cam(torch.randn(1, 3, 5, 5))
    A = torch.softmax(torch.randn(1, 25, 25), -1)
    P = aux.propagate_cam(A, M)
    assert P.shape == M.shape and P.min() >= 0 and P.max() <= 1 + 1e-6


# ----------------------------------------------------------------------------------------------------------
# Invariant 8: fusion rule
# ----------------------------------------------------------------------------------------------------------
def test_fusion_four_cases_and_thresholds():
    # 1 x 6 map, C = 3 classes, image label = {class 1 (index 0), class 3 (index 2)}.
    cams = np.zeros((3, 1, 6), np.float32)
    cams[0, 0] = [0.9, 0.9, 0.1, 0.1, 0.2, 0.5]
    cams[1, 0] = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]  # absent class: must never appear
    cams[2, 0] = [0.3, 0.95, 0.0, 0.0, 0.0, 0.0]
    sal = np.array([[0.9, 0.9, 0.9, 0.0, 0.9, 0.06]], np.float32)
    label = np.array([1, 0, 1], np.float32)
    out = aux.fuse_cam_saliency(cams, sal, label, 0.2, 0.06)
    # obj&fg -> k+1; obj&fg -> class 3; fg only -> 255; neither -> 0; cam == 0.2 is not obj -> 255 (fg only);
    # sal == 0.06 is not fg while obj -> 255
    assert out.tolist() == [[1, 3, 255, 0, 255, 255]]
    assert out.dtype == np.uint8
    assert set(np.unique(out)) <= {0, 1, 3, 255}


def test_fusion_without_present_classes():
    out = aux.fuse_cam_saliency(np.ones((2, 2, 2), np.float32), np.array([[0.9, 0.0], [0.0, 0.9]]),
                                np.zeros(2), 0.2, 0.06)
    assert out.tolist() == [[255, 0], [0, 255]]


# ----------------------------------------------------------------------------------------------------------
# Invariant 9: saliency CRF
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not crf.available(), reason="pydensecrf not installed")
def test_saliency_crf_limits():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    hi = aux.saliency_crf(image, np.full((20, 30), 0.99))
    lo = aux.saliency_crf(image, np.full((20, 30), 0.01))
    mixed = aux.saliency_crf(image, rng.uniform(0, 1, (20, 30)))
    for q in (hi, lo, mixed):
        assert q.shape == (20, 30) and q.min() >= 0 and q.max() <= 1
    assert (hi > 0.5).all() and (lo < 0.5).all()


# ----------------------------------------------------------------------------------------------------------
# Invariant 10: losses
# ----------------------------------------------------------------------------------------------------------
def test_loss_seg_ignores_255_and_guards_empty():
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    target = torch.tensor([[[0, 255], [2, 255]]])
    # hand-made: mean CE over the two labelled pixels only
    lp = F.log_softmax(logits, 1)
    expected = -(lp[0, 0, 0, 0] + lp[0, 2, 1, 0]) / 2
    torch.testing.assert_close(aux.loss_seg(logits, target), expected)
    empty = aux.loss_seg(logits, torch.full((1, 2, 2), 255))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(logits.grad).all()


def test_loss_seg_upsamples_logits_to_label_size():
    logits = torch.randn(1, 3, 2, 2)
    target = torch.randint(0, 3, (1, 8, 8))
    up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(aux.loss_seg(logits, target), F.cross_entropy(up, target))


def test_loss_cls_is_mean_bce():
    z = torch.tensor([[2.0, -1.0, 0.5]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    sig = torch.sigmoid(z)
    expected = -(torch.log(sig[0, 0]) + torch.log(1 - sig[0, 1]) + torch.log(sig[0, 2])) / 3
    torch.testing.assert_close(aux.loss_cls(z, y), expected)


def test_saliency_target_and_loss():
    sal = torch.tensor([[[0.5, 0.51], [0.0, 1.0]]])
    B = aux.saliency_target(sal, 0.5)
    assert B.tolist() == [[[0.0, 1.0], [0.0, 1.0]]]
    logits = torch.zeros(1, 1, 2, 2)  # BCE(0, y) = log 2 for any y
    valid = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    torch.testing.assert_close(aux.loss_sal(logits, B, valid), torch.tensor(np.log(2.0), dtype=torch.float32))
    assert aux.loss_sal(logits, B, torch.zeros(1, 2, 2)).item() == 0.0  # only padding -> 0, not NaN


def test_total_loss_weighted_sum():
    a = aux.Args(lambda_cls=0.5, lambda_sal=2.0, lambda_seg=3.0)
    parts = {k: torch.tensor(v) for k, v in dict(cls=1.0, sal1=2.0, sal2=3.0, seg1=4.0, seg2=5.0).items()}
    assert aux.total_loss(parts, a).item() == pytest.approx(0.5 * 1 + 2 * (2 + 3) + 3 * (4 + 5))


# ----------------------------------------------------------------------------------------------------------
# Invariant 11: gradient reach per variant
# ----------------------------------------------------------------------------------------------------------
def test_gradients_mt_ct_seg2_reaches_sa_and_both_affinities():
    model = toy_model("mt_ct").train()
    out = model(torch.randn(2, 3, 64, 64))
    aux.loss_seg(out["seg_ref"], torch.randint(0, 7, (2, 64, 64))).backward()
    for mod in (model.cross_att.conv1, model.cross_att.conv2, model.seg.theta, model.seg.phi,
                model.sal.theta, model.sal.phi):
        assert mod.weight.grad is not None and mod.weight.grad.abs().sum() > 0
    assert model.fc8.weight.grad is None  # L_seg2 never touches the classifier
    assert model.sal.conv4.weight.grad is None  # nor the saliency classifier


def test_variant_modules():
    mt = toy_model("mt")
    assert not hasattr(mt, "cross_att") and not hasattr(mt.seg, "theta") and not hasattr(mt.sal, "theta")
    out = mt(torch.randn(1, 3, 64, 64))
    assert torch.equal(out["seg_ref"], out["seg_init"]) and "A_ct" not in out
    base = toy_model("baseline")
    assert not hasattr(base, "fc8") and not hasattr(base, "sal") and not hasattr(base, "cross_att")
    out = base(torch.randn(1, 3, 64, 64))
    assert set(out) == {"seg_init", "seg_ref"}
    assert set(aux.stage_losses(out, {"seg": torch.zeros(1, 64, 64, dtype=torch.long)}, aux.Args())) == {"seg1"}


def test_stage_losses_terms_per_variant():
    batch = {"seg": torch.randint(0, 7, (1, 64, 64)), "sal": torch.rand(1, 64, 64),
             "sal_valid": torch.ones(1, 64, 64), "label": torch.ones(1, 6)}
    for variant, keys in (("mt", {"cls", "sal1", "seg1"}), ("mt_ct", {"cls", "sal1", "sal2", "seg1", "seg2"})):
        out = toy_model(variant)(torch.randn(1, 3, 64, 64))
        assert set(aux.stage_losses(out, batch, aux.Args())) == keys


# ----------------------------------------------------------------------------------------------------------
# Invariant 12: optimiser groups and poly schedule
# ----------------------------------------------------------------------------------------------------------
def test_poly_lr_and_groups():
    total = 50
    lrs = [7e-4 * aux.poly_lr(it, total, 0.9) for it in range(total + 1)]  # train_loop: initial_lr x factor
    assert lrs[0] == 7e-4
    assert all(b < a for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    model = toy_model("mt_ct")
    opt = aux.build_optimizer(model, 7e-4, 10.0, 0.0, 0.0)
    base, heads = opt.param_groups
    assert heads["lr"] == pytest.approx(10 * base["lr"])
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert {id(p) for p in model.cross_att.parameters()} <= ids(base)
    assert {id(p) for p in model.fc8.parameters()} | {id(p) for p in model.seg.theta.parameters()} <= ids(heads)
    assert {id(p) for p in model.backbone.parameters()} <= ids(base)


def test_freeze_bn_keeps_bn_in_eval():
    model = aux.AuxSegNet("resnet18", 7, ("seg",), "none", 16, (1, 2, 3), freeze_bn=True).train()
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())


# ----------------------------------------------------------------------------------------------------------
# Invariants 13-14: stage bookkeeping, saliency input
# ----------------------------------------------------------------------------------------------------------
def test_stage_bookkeeping(tmp_path, toy_root):
    run = tmp_path / "run"
    ctx = SimpleNamespace(args=aux.Args(crop_size=32), run_dir=run, spec=SimpleNamespace(root=toy_root, dataset="voc"),
                          splits={"train": "train_aug"})
    ids = data.split_ids(toy_root, "train_aug")
    for s in (0, 1):
        for name in ids:
            mask = data.read_mask(toy_root / "SegmentationClass" / f"{name}.png")
            data.save_mask(run / "pseudo_labels" / str(s) / "train" / f"{name}.png", np.where(mask == 255, 255, s))
        (run / "pseudo_labels" / str(s) / "train_saliency").mkdir(exist_ok=True)
        for name in ids:
            shutil.copy(toy_root / "saliency" / f"{name}.png", run / "pseudo_labels" / str(s) / "train_saliency")
    sal0 = toy_root / "saliency"
    ds0 = aux.make_stage_dataset(ctx, 0, sal0)
    ds1 = aux.make_stage_dataset(ctx, 1, sal0)
    assert ds0.saliency_dir == sal0  # stage 0: SAL_PGT^0 = SAL_0
    assert ds1.saliency_dir == run / "pseudo_labels" / "1" / "train_saliency"
    assert ds0.extra_dirs["seg"] == run / "pseudo_labels" / "0" / "train"
    assert ds1.extra_dirs["seg"] == run / "pseudo_labels" / "1" / "train"
    # stage s reads exactly the labels written for it (values 0 / 1 here), PNG round trip included
    assert set(np.unique(ds0.load(0)["seg"])) <= {0, 255} and 1 in np.unique(ds1.load(0)["seg"])
    sample = ds1[0]
    assert sample["image"].shape == (3, 32, 32) and sample["seg"].dtype == torch.int64
    assert set(torch.unique(sample["sal_valid"]).tolist()) <= {0.0, 1.0}
    # --supervision full: the segmentation branch reads the ground truth, with the same geometry as the image
    ctx.args = aux.Args(crop_size=32, supervision="full")
    full = aux.make_stage_dataset(ctx, 1, sal0)
    assert "seg" not in full.extra_dirs and full.saliency_dir == ds1.saliency_dir
    raw = full.load(0)
    seg = full[0]["seg"]  # epoch 0, index 0
    tf = aux.make_train_transform(ctx.args, 32, sal0, "mask")
    assert torch.equal(seg, tf(raw, np.random.default_rng((full.seed, 0, 0)))["seg"])
    assert set(seg.unique().tolist()) <= set(np.unique(raw["mask"]).tolist()) | {255}
    # the ground truth takes exactly the geometry the pseudo labels would take
    as_pseudo = aux.make_train_transform(ctx.args, 32, sal0, "seg")({**raw, "seg": raw["mask"]}, np.random.default_rng(0))
    as_gt = tf(raw, np.random.default_rng(0))
    assert all(torch.equal(as_gt[k], as_pseudo[k]) for k in ("image", "seg", "sal", "sal_valid"))


def test_png_round_trip(tmp_path):
    mask = np.array([[0, 1, 20], [255, 7, 0]], np.uint8)
    data.save_mask(tmp_path / "m.png", mask)
    assert np.array_equal(data.read_mask(tmp_path / "m.png"), mask)


def test_missing_saliency_error(tmp_path, toy_root):
    with pytest.raises(data.DataError, match=re.escape(str(tmp_path / "nowhere"))):
        aux.check_saliency(tmp_path / "nowhere", ["a"])
    partial = tmp_path / "sal"
    partial.mkdir()
    shutil.copy(toy_root / "saliency" / "train_00000.png", partial)
    with pytest.raises(data.DataError, match=r"1 of 2 saliency maps missing in .*sal.*train_00001.*DSS"):
        aux.check_saliency(partial, ["train_00000", "train_00001"])


def test_equation_map_is_cited_in_code():
    text = SCRIPT.read_text()
    tags = set(re.findall(r"Eq\. \((C\d+)\)", text))
    assert tags == {f"C{i}" for i in range(1, 15)}
    for t in tags:
        assert text.count(f"Eq. ({t})") >= 2, t


# ----------------------------------------------------------------------------------------------------------
# Paper preset: the paper network at 321 for one training iteration on CPU (batch 1, random weights)
# ----------------------------------------------------------------------------------------------------------
def test_paper_preset_one_iteration(toy_root):
    a, _ = aux.parse_args(["--data", str(toy_root), "--preset", "paper", "--no-pretrained"])
    aux.validate(a)
    assert (a.preset, a.backbone, a.crop_size, a.batch_size, a.lr, a.head_lr_mult, a.num_stages) == (
        "paper_voc", "wide_resnet50_2", 321, 4, 7e-4, 10.0, 4)
    assert (a.dilations, a.head_dim, a.momentum, a.weight_decay, a.freeze_bn) == ((6, 12, 18), 128, 0.0, 0.0, True)
    assert (a.epochs_per_stage, a.epochs_cls, a.cls_lr, a.cls_batch_size, a.cls_crop_size) == (10, 15, 0.01, 8, 448)
    torch.manual_seed(0)
    model = aux.build_model(a, 21, "stage").train()
    opt = aux.build_optimizer(model, a.lr, a.head_lr_mult, a.momentum, a.weight_decay)
    batch = {"image": torch.randn(1, 3, 321, 321), "label": torch.tensor([[1.0] + [0.0] * 19]),
             "seg": torch.randint(0, 2, (1, 321, 321)), "sal": torch.rand(1, 321, 321),
             "sal_valid": torch.ones(1, 321, 321)}
    out = model(batch["image"])
    assert out["seg_ref"].shape == (1, 21, 41, 41) and out["A_ct"].shape == (1, 1681, 1681)
    parts = aux.stage_losses(out, batch, a)
    assert set(parts) == {"cls", "sal1", "sal2", "seg1", "seg2"} and torch.isfinite(aux.total_loss(parts, a))
    before = model.seg.conv4.weight.detach().clone()
    log = aux.train_step(model, batch, 0, a, opt, lambda: torch.autocast("cpu", enabled=False))
    assert {"losses/cls", "losses/sal1", "losses/sal2", "losses/seg1", "losses/seg2", "losses/total"} == set(log)
    assert log["losses/total"] == pytest.approx(sum(v for k, v in log.items() if k != "losses/total"), rel=1e-5)
    assert not torch.equal(before, model.seg.conv4.weight)


# ----------------------------------------------------------------------------------------------------------
# CLI: smoke, resume, determinism, bad inputs, torchrun
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("aux") / "smoke"
    r = run_cli(["--data", str(toy_root), "--out", str(out), *TINY])
    assert r.returncode == 0, r.stderr[-2000:]
    return out, r


def results_of(run_dir: Path):
    return json.loads((run_dir / "metrics.json").read_text())["results"]


def test_smoke_run(smoke, toy_root):
    out, r = smoke
    lines = r.stdout.strip().splitlines()
    assert re.fullmatch(r"RESULT auxsegnet seg/val mIoU=\d+\.\d\d", lines[-1])
    assert "GT-derived" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["primary"] == "seg/val" and m["method"] == "auxsegnet" and m["preset"] == "toy"
    assert 0 <= m["results"]["seg/val"]["miou"] <= 100
    assert {"pseudo/train", "pseudo_s0/train", "pseudo_s1/train", "cam/train", "seg_s0/val", "seg_s1/val"} <= set(
        m["results"])
    assert m["results"]["pseudo/train"] == m["results"]["pseudo_s1/train"]  # the labels of the last stage
    assert m["results"]["pseudo_pr/train"] == m["results"]["pseudo_pr_s1/train"]
    for s in (0, 1):  # Deviation 15: the paper's precision / recall / mIoU with ignored pixels counted
        pr, conf = m["results"][f"pseudo_pr_s{s}/train"], m["results"][f"pseudo_s{s}/train"]
        assert 0 <= pr["precision"] <= 100 and 0 <= pr["recall"] <= 100 and pr["miou"] <= conf["miou"] + 1e-6
    assert m["results"]["seg_s1/val"] == m["results"]["seg/val"] and m["supervision"] == "image"
    for s in (0, 1):
        assert len(list((out / "pseudo_labels" / str(s) / "train").glob("*.png"))) == 24
        assert (out / "vis" / f"train_s{s}.png").is_file()
    assert len(list((out / "pseudo_labels" / "1" / "train_saliency").glob("*.png"))) == 24
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "vis" / "val.png").is_file()
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"last.pt", "cls.pt", "stage0.pt"}
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("pseudo/train/miou" in rec and rec["stage"] == "labels1" for rec in logs)
    assert any("losses/seg2" in rec for rec in logs) and any("losses/cls" in rec and rec["stage"] == "cls" for rec in logs)
    args = json.loads((out / "args.json").read_text())
    assert args["variant"] == "full" and args["num_stages"] == 2


@pytest.mark.parametrize("stop", [4, 7])
def test_resume_matches_uninterrupted(smoke, toy_root, tmp_path, stop):
    out = tmp_path / "resumed"
    # 3 iterations of pre-training + 1 of stage 0 (after the stage-0 labels), or 3 + 3 + 1 of stage 1 (after the
    # label update), then an "interruption"
    r = run_cli(["--data", str(toy_root), "--out", str(out), *TINY, "--stop-after", str(stop)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / "metrics.json").exists()
    # args.json keeps --stop-after N, so the resumed process would stop again after N iterations: lift it
    r = run_cli(["--resume", str(out), "--stop-after", "0"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert results_of(out) == results_of(smoke[0])


def test_determinism(smoke, toy_root, tmp_path):
    r = run_cli(["--data", str(toy_root), "--out", str(tmp_path / "again"), *TINY])
    assert r.returncode == 0, r.stderr[-2000:]
    assert results_of(tmp_path / "again") == results_of(smoke[0])


def test_supervision_full(toy_root, tmp_path):
    """The upper bound: ground truth for the segmentation branch, no stage-0 fusion labels, saliency updates kept."""
    out = tmp_path / "full"
    r = run_cli(["--data", str(toy_root), "--out", str(out), *TINY, "--supervision", "full"])
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["supervision"] == "full" and "seg/val" in m["results"] and "cam/train" not in m["results"]
    assert not (out / "pseudo_labels" / "0").exists()
    assert len(list((out / "pseudo_labels" / "1" / "train_saliency").glob("*.png"))) == 24


def test_eval_only(smoke, toy_root, tmp_path):
    out = tmp_path / "eval"
    r = run_cli(["--eval-only", "--ckpt", str(smoke[0] / "checkpoints" / "last.pt"), "--data", str(toy_root),
                 "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert results_of(out)["seg/val"] == results_of(smoke[0])["seg/val"]


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr[-1500:])
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("auxsegnet.py: error:") and "Traceback" not in r.stderr
    return err[0]


def test_bad_inputs_subprocess(smoke, toy_root, tmp_path):
    out, _ = smoke
    before = (out / "metrics.json").read_text()
    msg = one_line_error(run_cli(["--data", str(toy_root), "--out", str(out)]))
    assert "not empty" in msg
    assert (out / "metrics.json").read_text() == before
    msg = one_line_error(run_cli(["--data", str(toy_root), "--saliency-dir", str(tmp_path / "nosal"),
                                  "--out", str(tmp_path / "x")]))
    assert str(tmp_path / "nosal") in msg and "DSS" in msg
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--backbone", "no_such_net"], "unknown timm model"),
    (["--backbone", "vit_tiny_patch16_224"], "stride-8 feature extractor"),
    (["--dilations", "1", "2"], "--dilations"),
    (["--scale-range", "1.3", "0.7"], "--scale-range"),
    (["--lr", "-1"], "--lr"),
    (["--variant", "mt", "--num-stages", "3"], "--variant full"),
    (["--cam-thresh", "1.5"], "--cam-thresh"),
    (["--data", "/nonexistent/voc"], "does not exist"),
    (["--resume", "/nonexistent/run"], "--resume"),
    (["--eval-only"], "--ckpt"),
    (["--variant", "bogus"], "invalid choice"),
])
def test_bad_inputs_in_process(argv, needle, toy_root, tmp_path, capsys):
    argv = argv if "--data" in argv else ["--data", str(toy_root), *argv]
    with pytest.raises(SystemExit) as e:
        aux.main([*argv, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()


class Evil:  # a pickled object: loading it could run code
    pass


@pytest.fixture(scope="module")
def bad_files(smoke, toy_root, tmp_path_factory):
    """A file of each kind that --weights / --ckpt / --resume must refuse in one line."""
    d, last = tmp_path_factory.mktemp("bad"), smoke[0] / "checkpoints" / "last.pt"
    (d / "text.pt").write_text("not a checkpoint")
    (d / "truncated.pt").write_bytes(last.read_bytes()[:4096])
    torch.save({"model": Evil()}, d / "code.pt")
    ckpt = torch.load(last, weights_only=True)
    torch.save({**ckpt, "method": "cosa"}, d / "cosa.pt")
    model = ckpt["weights"]["model"]
    torch.save({**ckpt, "weights": {"model": {**model, "seg.conv4.weight": model["seg.conv4.weight"][:5]}}}, d / "classes.pt")
    torch.save(aux.timm_model("resnet18", False).state_dict(), d / "resnet18.pt")
    for name in ("truncated", "cosa"):  # run folders whose last.pt is broken / foreign
        shutil.copytree(smoke[0], d / f"run_{name}")
        shutil.copy(d / f"{name}.pt", d / f"run_{name}" / "checkpoints" / "last.pt")
    return d


@pytest.mark.parametrize("flag, name, needle", [
    ("--weights", "missing.pt", "no such file"), ("--weights", "text.pt", "not a readable torch checkpoint"),
    ("--weights", "truncated.pt", "not a readable torch checkpoint"), ("--weights", "code.pt", "refused"),
    ("--weights", "cosa.pt", "holds no state dict"), ("--weights", "resnet18.pt", "does not fit"),
    ("--ckpt", "missing.pt", "no such file"), ("--ckpt", "text.pt", "not a readable torch checkpoint"),
    ("--ckpt", "truncated.pt", "not a readable torch checkpoint"), ("--ckpt", "code.pt", "refused"),
    ("--ckpt", "cosa.pt", "written by cosa.py"), ("--ckpt", "resnet18.pt", "not a run checkpoint"),
    ("--ckpt", "classes.pt", "another number of classes"), ("--ckpt+backbone", "../smoke", "does not fit"),
    ("--resume", "run_truncated", "not a readable torch checkpoint"), ("--resume", "run_cosa", "written by cosa.py"),
    ("--resume", "missing", "no args.json"),
])
def test_bad_files_exit_2_one_line(flag, name, needle, bad_files, smoke, toy_root, tmp_path, capsys):
    path = bad_files / name
    if flag == "--ckpt+backbone":  # a good checkpoint, evaluated with another backbone
        argv = ["--eval-only", "--ckpt", str(smoke[0] / "checkpoints" / "last.pt"), "--backbone", "resnet18"]
    elif flag == "--ckpt":
        argv = ["--eval-only", "--ckpt", str(path)]
    elif flag == "--resume":
        argv = ["--resume", str(path)]
    else:
        argv = ["--weights", str(path), "--no-pretrained", "--epochs-cls", "0"]
    argv = argv if flag == "--resume" else ["--data", str(toy_root), *argv, "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        aux.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("auxsegnet.py: error:") and needle in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(toy_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        aux.main(["--data", str(toy_root), "--device", "cuda", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "no CUDA" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as sock:  # other test files may run torchrun at the same time: no fixed port
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_processes(toy_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(SCRIPT), "--data", str(toy_root), "--out", str(out), *TINY, "--device", "cpu"]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "RESULT auxsegnet seg/val mIoU=" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["stages"] == 2 and "pseudo_s1/train" in m["results"]
