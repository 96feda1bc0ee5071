"""Tests for csd.py --classifier irn: IRNet's ResNet CAM network as CSD's classifier (Table 1 rows "IRN (ResNet-50)" and
"IRN w/ CSD"; jiwoon-ahn/irn net/resnet50_cam.py, step/train_cam.py, step/make_cam.py). The network (pre-ReLU CAM,
cls logits, frozen / detached parts, output stride, the paper backbone), L_cls with one term, the CSD losses on the
IRN CAM, the SGD groups and poly schedule, IRN's view for both streams, the seeds (scales, flip, ReLU, max
normalisation by hand), the IRN presets and their precedence, the bad flag combinations, and a CLI smoke run.

Each test's docstring names the planted one-line bugs it catches. CSD_UNDER_TEST=/path/to/csd.py runs the same tests
against another copy (mutation testing); by default the repository's csd.py is imported.
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import under_test

ROOT = Path(__file__).resolve().parents[1]


csd = under_test.load("csd")
CPU = torch.device("cpu")


def irn_args(preset="toy", **kw):
    """Args of a preset with --classifier irn and IRN_PRESETS applied, as main() builds them (no flag given)."""
    args = csd.Args()
    for k, v in csd.PRESETS["toy" if preset == "toy" else "paper_voc"].items():
        setattr(args, k, v)
    args.preset, args.classifier = ("toy" if preset == "toy" else "paper_voc"), "irn"
    args = csd.classifier_preset(args, ["--classifier", "irn"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def toy_irn(num_classes=3, **kw):
    torch.manual_seed(0)
    return csd.build_model(irn_args(**kw), num_classes, init_weights=False)


def mlsm(z, y):
    return -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).mean()


# ------------------------------------------------------------------------------------------------
# The network: IRN's Net / CAM
# ------------------------------------------------------------------------------------------------
def test_cam_is_pre_relu_and_cls_logits_are_the_classifier_on_gap():
    """cls_logits = classifier(GAP(features)) and patch_cam = the classifier conv on the features BEFORE ReLU (the
    score map M of Eq. 2; the seeds take its ReLU). Catches: a ReLU inside forward's CAM (`cam = F.relu(F.conv2d(..))`:
    the CSD score map loses its negative logits), cls logits from GAP(ReLU(CAM)), a classifier with a bias."""
    model = toy_irn().eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = model(x)
    assert set(out) == {"cls_logits", "patch_cam"}  # no patch_logits: L_cls has one term for IRN
    b = model.backbone
    with torch.no_grad():
        feats = b.layer4(b.layer3(b.layer2(b.layer1(b.maxpool(b.act1(b.bn1(b.conv1(x))))))))
        want_cam = torch.einsum("nchw,kc->nkhw", feats, model.classifier.weight[:, :, 0, 0])
    assert model.classifier.bias is None
    torch.testing.assert_close(out["patch_cam"], want_cam, rtol=1e-4, atol=1e-4)
    assert (out["patch_cam"] < 0).any() and (out["patch_cam"] > 0).any()  # pre-ReLU: both signs
    # linear, bias-free classifier: classifier(GAP(f)) = GAP(classifier(f)) = GAP of the PRE-ReLU CAM
    torch.testing.assert_close(out["cls_logits"], want_cam.mean((2, 3)), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out["cls_logits"], F.relu(want_cam).mean((2, 3)), atol=1e-3)


def test_frozen_conv1_bn1_fixed_batchnorm_and_detached_stage2():
    """IRN: conv1/bn1 never train, every BN uses its running statistics (FixedBatchNorm) even in train mode, stage 2's
    output is detached so a backward leaves layer1-2 without gradients. Catches: the `.detach()` dropped, the train()
    override dropped (BN in train mode: batch statistics, running stats updated), conv1 or bn1 left trainable."""
    model = toy_irn()
    b = model.backbone
    assert not any(p.requires_grad for p in [*b.conv1.parameters(), *b.bn1.parameters()])
    model.train()
    assert model.training and b.layer3.training
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 3 + 1
    out = model(x)
    assert all(torch.equal(m.running_mean, r) for m, r in zip(bns, before))
    (out["cls_logits"].sum() + out["patch_cam"].mean()).backward()
    for layer in (b.layer1, b.layer2):
        assert all(p.grad is None for p in layer.parameters())
    for module in (b.layer3, b.layer4, model.classifier):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in [*b.conv1.parameters(), *b.bn1.parameters()])


@pytest.mark.parametrize("stride", [16, 8])
def test_output_stride_without_dilation(stride):
    """--patch-size is the ResNet's output stride: 16 = IRN's strides (2, 2, 2, 1), 8 = (2, 2, 1, 1) (toy); no
    dilation (IRN changes strides, it does not dilate), model.patch_size = the stride (token masks of csd_losses).
    Catches: layer3 not un-strided for 8 (stride 16 on the toy), layer4 left at stride 2 (32), timm's output_stride
    (dilated convs), a patch_size attribute that is not the stride."""
    model = toy_irn(patch_size=stride).eval()
    with torch.no_grad():
        cam = model(torch.zeros(1, 3, 64, 96))["patch_cam"]
    assert cam.shape[-2:] == (64 // stride, 96 // stride) and model.patch_size == stride
    assert all(m.dilation == (1, 1) for m in model.modules() if isinstance(m, nn.Conv2d))


def test_paper_preset_asks_timm_for_resnet50_tv_in1k_with_irn_strides(monkeypatch):
    """The paper preset with --classifier irn builds timm's resnet50.tv_in1k (torchvision's V1 weights, as IRN) with
    ImageNet weights requested, strides (2, 2, 2, 1), a 2048 -> C bias-free classifier, and takes IRN_PRESETS
    "paper" (batch 16, 5 epochs, SGD lr 0.1, wd 1e-4, momentum 1e-4, crop 512, resize_long 320-640, make_cam's
    scales). Catches: timm's untagged resnet50 (a1_in1k), pretrained weights not requested, layer4 left at stride 2
    or layer2/3 un-strided, a classifier with a bias or on the wrong width, an IRN paper value drifting."""
    calls, create = [], csd.timm.create_model

    def record(name, pretrained=False, **kw):
        calls.append((name, pretrained, kw))
        return create(name, pretrained=False, **kw)  # the architecture only: no download in tests

    monkeypatch.setattr(csd.timm, "create_model", record)
    monkeypatch.setattr(csd.socket, "create_connection", lambda *a, **k: SimpleNamespace(close=lambda: None))
    args = irn_args("paper")
    assert (args.irn_backbone, args.patch_size, args.crop_size, args.batch_size, args.epochs) == \
        ("resnet50.tv_in1k", 16, 512, 16, 5)
    assert (args.lr, args.weight_decay, args.cam_momentum, args.cls_aug, args.resize_long, args.seed_par) == \
        (0.1, 1e-4, 1e-4, "irn", (320, 640), False)
    assert args.seed_scales == (1.0, 0.5, 1.5, 2.0) and (args.lambda_fg, args.lambda_bg) == (0.01, 0.1)
    assert args.amp is False  # IRN trains in fp32; MCTformer's paper preset has AMP on
    model = csd.build_model(args, 20, init_weights=True)
    assert [(n, p) for n, p, _ in calls] == [("resnet50.tv_in1k", True)]
    b = model.backbone
    strides = [b.conv1.stride, b.layer2[0].conv2.stride, b.layer3[0].conv2.stride, b.layer4[0].conv2.stride]
    assert strides == [(2, 2), (2, 2), (2, 2), (1, 1)] and b.layer4[0].downsample[0].stride == (1, 1)
    assert model.classifier.weight.shape == (20, 2048, 1, 1) and model.classifier.bias is None
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, 64, 64))["patch_cam"].shape == (1, 20, 4, 4)


# ------------------------------------------------------------------------------------------------
# Losses: L_cls with one term, the CSD stream on the IRN CAM
# ------------------------------------------------------------------------------------------------
def test_loss_cls_has_one_mlsm_term_for_irn():
    """IRN's train_cam: L_cls = MLSM(cls_logits) only; MCTformer-V2's output (both logits) keeps its two terms.
    Catches: a second term for IRN (e.g. MLSM of the CAM's GAP added), the MCTformer patch term dropped, a
    KeyError on an output without patch_logits."""
    g = torch.Generator().manual_seed(3)
    z, zp = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    cam = torch.randn(2, 4, 3, 3, generator=g)
    y = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0]])
    torch.testing.assert_close(csd.loss_cls({"cls_logits": z, "patch_cam": cam}, y), mlsm(z, y))
    torch.testing.assert_close(csd.loss_cls({"cls_logits": z, "patch_logits": zp, "patch_cam": cam}, y),
                               mlsm(z, y) + mlsm(zp, y))


def test_csd_losses_feed_the_irn_cam_with_masks_at_its_stride(monkeypatch):
    """csd_losses with an IRNCAM: one student forward on [x, x_fg, x_bg] in train mode with grad, the teacher on x_s
    in eval mode without grad; loss_fg / loss_bg get the PRE-ReLU CAMs (teacher detached) and token masks at the
    IRN output stride; L_cls = MLSM(cls_logits of the clean slice). Catches: the teacher in train mode or with grad,
    token masks at another stride than the network's, ReLU'd CAMs as the score map, L_cls on the composites."""
    args = irn_args(crop_size=32, lambda_fg=0.3, lambda_bg=0.7)
    model = toy_irn(crop_size=32).train()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append((m.training, torch.is_grad_enabled(), a[0].clone())))
    rec = {}
    for name in ("loss_fg", "loss_bg"):
        orig = getattr(csd, name)
        monkeypatch.setattr(csd, name, lambda *a, _o=orig, _n=name, **k: rec.setdefault(_n, (a, k)) and _o(*a, **k))
    g = torch.Generator().manual_seed(4)
    B = 2
    M_fg = torch.zeros(B, 32, 32, dtype=torch.bool)
    M_fg[0, :16, :12] = True  # 8-px tokens: (0-1, 0) whole, column 1 half
    M_fg[1, 8:32, 16:32] = True
    R_bg = ~M_fg
    R_bg[:, :4] = False
    batch = {"image": torch.randn(B, 3, 32, 32, generator=g), "label": torch.tensor([[1.0, 0, 1], [0, 1, 1]]),
             "x_s": torch.randn(B, 3, 32, 32, generator=g), "x_fg": torch.randn(B, 3, 32, 32, generator=g),
             "x_bg": torch.randn(B, 3, 32, 32, generator=g), "M_fg": M_fg, "R_bg": R_bg, "c_s": torch.tensor([2, 0]),
             "y_fg": torch.ones(B, 3)}
    out = csd.csd_losses(model, batch, args, 3, True)
    (s_train, s_grad, s_x), (t_train, t_grad, t_x) = calls
    assert s_train and s_grad and torch.equal(s_x, torch.cat([batch["image"], batch["x_fg"], batch["x_bg"]]))
    assert not t_train and not t_grad and torch.equal(t_x, batch["x_s"]) and model.training
    with torch.no_grad():
        want = model(torch.cat([batch["image"], batch["x_fg"], batch["x_bg"], batch["x_s"]]))
    cam = want["patch_cam"]
    (a_fg, _), (a_bg, _) = rec["loss_fg"], rec["loss_bg"]
    torch.testing.assert_close(a_fg[0], cam[3 * B:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a_fg[1], cam[B:2 * B], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a_bg[1], cam[2 * B:3 * B], rtol=1e-4, atol=1e-4)
    assert (a_fg[0] < 0).any() and not a_fg[0].requires_grad and a_fg[1].requires_grad
    cover = lambda m: m.float().reshape(B, 4, 8, 4, 8).mean((2, 4)) >= 1.0  # whole 8-px tokens
    assert torch.equal(a_fg[2], cover(M_fg)) and torch.equal(a_bg[2], cover(R_bg)) and a_fg[2].shape == (B, 4, 4)
    torch.testing.assert_close(out["cls"], mlsm(want["cls_logits"][:B], batch["label"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["total"], out["cls"] + 0.3 * out["fg"] + 0.7 * out["bg"])
    # --cls-on-paste: + MLSM(cls_logits of the x_fg slice, y_fg); catches the clean or the x_bg slice used there
    args.cls_on_paste = True
    batch["y_fg"] = torch.tensor([[0.0, 0, 1], [1, 0, 0]])
    out = csd.csd_losses(model, batch, args, 3, True)
    torch.testing.assert_close(out["cls"], mlsm(want["cls_logits"][:B], batch["label"])
                               + mlsm(want["cls_logits"][B:2 * B], batch["y_fg"]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Training: SGD groups, poly schedule, IRN's view in both streams
# ------------------------------------------------------------------------------------------------
def test_train_classifier_sgd_groups_momentum_and_poly_schedule(monkeypatch, toy_root):
    """IRN's PolyOptimizer: SGD, backbone at lr and the classifier at 10 lr, weight decay on both groups, momentum
    = --cam-momentum (IRN: 1e-4, its weight decay in momentum's slot), no Nesterov, lr x (1 - it / total) ** 0.9 every
    iteration. Catches: the classifier at 1x lr, weight decay missing from a group, a hard-coded momentum 0.9 (or
    0), AdamW or MCTformer's per-epoch cosine for IRN, conv1/bn1 (frozen) in the optimiser."""
    args = irn_args(lr=0.03, weight_decay=0.002, cam_momentum=0.25, batch_size=4, epochs=3, max_iters=0, crop_size=32)
    got = {}
    monkeypatch.setattr(csd, "train_loop", lambda ctx, stage, ds, bs, total, step, modules, lr=None, salt=0, indices=None:
                        got.update(total=total, modules=modules, lr=lr, bs=bs))
    ctx = SimpleNamespace(args=args, spec=SimpleNamespace(root=toy_root, dataset="voc"), splits={"train": "train"},
                          device=CPU, reseed=lambda salt: None, wrap=lambda m: m, log=lambda r: None,
                          autocast=contextlib.nullcontext)
    labels = csd.data.SegDataset(toy_root, "train").labels()
    model = csd.train_classifier(ctx, "classifier", labels.shape[1] + 1, labels, False)
    opt = got["modules"]["optimizer"]
    assert type(opt) is torch.optim.SGD and got["bs"] == 4
    backbone, head = opt.param_groups
    assert (backbone["lr"], head["lr"]) == (0.03, pytest.approx(0.3))
    assert backbone["weight_decay"] == head["weight_decay"] == 0.002
    assert all(g["momentum"] == 0.25 and not g["nesterov"] and g["dampening"] == 0 for g in opt.param_groups)
    assert head["params"] == [model.classifier.weight]
    want = [p for p in model.backbone.parameters() if p.requires_grad]
    assert len(backbone["params"]) == len(want) and all(a is b for a, b in zip(backbone["params"], want))
    assert not any(p is q for p in backbone["params"] for q in model.backbone.conv1.parameters())
    total = 3 * (len(labels) // 4)
    assert got["total"] == total
    for it in (0, 1, total // 2, total - 1):
        assert got["lr"](it) == pytest.approx((1 - it / total) ** 0.9)


def test_irn_view_in_the_classification_and_csd_streams(monkeypatch):
    """--cls-aug irn: IRN's train_cam view (random long side in --resize-long, bicubic -> flip -> crop --crop-size) for
    the classification stream, and the same joint view of image + prior for x_s / x_m of the CSD stream. Catches: the
    weak (short side) or timm view under irn, the crop before the flip, --resize-long not passed, bilinear resizing,
    the prior not moved with its image."""
    calls = []

    def resize_long(image, rng, masks=(), maps=(), long_range=None, interp=None):
        calls.append(("resize", long_range, interp, len(masks)))
        return image + 1, tuple(m + 1 for m in masks), ()

    def flip(image, rng, masks=()):
        calls.append(("flip", len(masks)))
        return image + 2, tuple(m + 2 for m in masks), True

    def crop(image, rng, size, masks=()):
        calls.append(("crop", size, len(masks)))
        return image + 4, tuple(m + 4 for m in masks), None, None

    monkeypatch.setattr(csd.augment, "random_resize_long", resize_long)
    monkeypatch.setattr(csd.augment, "random_hflip", flip)
    monkeypatch.setattr(csd.augment, "random_crop", crop)
    monkeypatch.setattr(csd, "weak_augment", lambda *a, **k: pytest.fail("weak_augment under --cls-aug irn"))
    tr = csd.CSDTransform(irn_args(crop_size=32, resize_long=(40, 72)))
    image, prior = np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)
    x = tr.classification_view(image, np.random.default_rng(0))
    assert calls == [("resize", (40, 72), "bicubic", 0), ("flip", 0), ("crop", 32, 0)]
    assert torch.equal(x, csd.augment.to_tensor(np.full((8, 8, 3), 7, np.uint8)))
    calls.clear()
    img, (pr,) = tr.geometry(image, (prior,), np.random.default_rng(0))
    assert calls == [("resize", (40, 72), "bicubic", 1), ("flip", 1), ("crop", 32, 1)]
    assert (img == 7).all() and (pr == 7).all()


# ------------------------------------------------------------------------------------------------
# Seeds: make_cam.py
# ------------------------------------------------------------------------------------------------
class StubCAM(nn.Module):
    """IRN-shaped outputs with negative CAM values: patch_cam = per-channel scaled 4x4 average pool - 0.5."""

    def __init__(self):
        super().__init__()
        self.num_classes, self.patch_size, self.calls = 3, 4, []

    def forward(self, x):
        self.calls.append(x.clone())
        cam = F.avg_pool2d(x, 4).mean(1, keepdim=True) * torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1) - 0.5
        return {"cls_logits": cam.mean((2, 3)), "patch_cam": cam}


def test_lowres_maps_irn_scales_flip_relu_and_max_norm():
    """make_cam.py: every scale of --seed-scales (bicubic, as pil_rescale order 3), the image and its flip, ReLU of the
    CAM, present classes only; the maps carry IRN's max normalisation for seed_from_lowres. Catches: a scale dropped,
    the flip missing, no ReLU (negative CAM values summed), MCTformer's localization_map on an IRN output, the
    min-max norm tag, absent classes kept, bilinear rescaling."""
    net = StubCAM().eval()
    args = irn_args(seed_scales=(1.0, 0.5))
    yy, xx = np.mgrid[:16, :24]
    image = np.stack([xx * 10, yy * 15, (xx + yy) * 5], -1).astype(np.uint8)
    label = np.array([1, 0, 1], np.float32)
    maps = csd.lowres_maps(net, image, label, args, CPU)
    assert maps.norm == "max" and len(maps) == 2 and len(net.calls) == 2
    for m, x, (h, w) in zip(maps, net.calls, [(16, 24), (8, 12)]):
        assert x.shape == (2, 3, h, w) and torch.equal(x[1], x[0].flip(-1))
        want = F.relu(net(x)["patch_cam"])[:, [0, 2]]
        torch.testing.assert_close(m.float(), want, rtol=1e-2, atol=1e-3)  # float16 storage
    small = csd.augment.to_tensor(csd.augment.rescale(image, 0.5, interp="bicubic")[0])
    assert torch.equal(net.calls[1][0], small)


def test_seed_from_lowres_irn_max_normalisation_by_hand():
    """IRN make_cam.py: sum over scales of the upsampled maps, the flip view un-flipped, then cam / (max + 1e-5) per
    class, NO min subtracted; a plain list keeps MCTformer's min-max. Hand values, one class, one 2x2 scale plus one
    1x1 scale (a constant after upsampling). Catches: the min subtracted for IRN (min-max), the flip view not
    un-flipped, a scale dropped, IRN's rule applied to MCTformer's maps."""
    m = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 2.0], [1.0, 1.0]]]])  # (2 views, 1 class, 2, 2)
    c = torch.full((2, 1, 1, 1), 0.5)  # a second scale: adds 0.5 + 0.5 everywhere
    label = np.array([0, 1], np.float32)
    # total = m0 + flip(m1) + 1 = [[1 + 2, 2 + 0], [3 + 1, 4 + 1]] + 1 = [[4, 3], [5, 6]]
    got = csd.seed_from_lowres(csd.LowresMaps([m, c], norm="max"), label, (2, 2))
    np.testing.assert_allclose(got[1], np.array([[4, 3], [5, 6]]) / (6 + 1e-5), rtol=1e-6)
    assert (got[0] == 0).all()
    mct = csd.seed_from_lowres(csd.LowresMaps([m, c], "minmax"), label, (2, 2))  # MCTformer: (t - 3) / (6 - 3 + 1e-5)
    np.testing.assert_allclose(mct[1], (np.array([[4, 3], [5, 6]]) - 3) / (3 + 1e-5), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Presets, flags, CLI
# ------------------------------------------------------------------------------------------------
def test_irn_presets_apply_only_to_flags_not_given():
    """classifier_preset(): IRN_PRESETS on every field the command line leaves unset, a given flag wins, MCTformer and
    resumed / --eval-only runs untouched. Catches: the preset overwriting a user flag, IRN values applied to
    --classifier mctformer, the toy / paper presets swapped, the toy IRN classifier taking MCTformer's toy batch 8
    instead of IRN's 16 (the batch_size of IRN_PRESETS["toy"] dropped)."""
    argv = ["--classifier", "irn", "--lr", "0.5", "--seed-scales", "1.0", "0.75"]
    args, _ = csd.parse_args(argv)
    args = csd.classifier_preset(args, argv)
    toy = csd.IRN_PRESETS["toy"]
    assert args.preset == "toy" and args.lr == 0.5 and args.seed_scales == (1.0, 0.75)
    assert (args.cls_aug, args.resize_long, args.irn_backbone, args.epochs) == \
        (toy["cls_aug"], toy["resize_long"], toy["irn_backbone"], toy["epochs"])
    assert args.batch_size == 16 and csd.PRESETS["toy"]["batch_size"] == 8
    assert toy != csd.IRN_PRESETS["paper"] and args.crop_size == csd.PRESETS["toy"]["crop_size"]
    mct, _ = csd.parse_args([])
    assert csd.classifier_preset(mct, []) == mct and mct.cls_aug == "weak"
    resumed = csd.Args(classifier="irn", resume="/some/run")
    assert csd.classifier_preset(resumed, ["--resume", "/some/run"]) == resumed
    evaluated = csd.Args(classifier="irn", eval_only=True, ckpt="/some/run/checkpoints/last.pt")
    assert csd.classifier_preset(evaluated, ["--eval-only", "--ckpt", evaluated.ckpt]) == evaluated


@pytest.mark.parametrize("argv, needle", [
    (["--csd-map", "fused_par"], "fused_par"),
    (["--seed-par"], "--seed-par"),
    (["--patch-size", "32"], "output stride"),
    (["--resize-long", "96", "48"], "--resize-long"),
])
def test_bad_irn_combinations_exit_2_in_one_line(argv, needle, toy_root, tmp_path, capsys):
    """MCTformer-only options with --classifier irn fail before anything is written: one line, exit 2. Catches: the
    check dropped (a KeyError 'attn' traceback mid-run for fused_par / PAR, a stride the ResNet surgery cannot give,
    an inverted long-side range reaching numpy)."""
    with pytest.raises(SystemExit) as e:
        csd.main(["--data", str(toy_root), "--out", str(tmp_path / "r"), "--classifier", "irn", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and needle in err[0] and err[0].startswith("csd.py: error:")
    assert not (tmp_path / "r").exists()


IRN_CLS_TINY = ["--preset", "toy", "--classifier", "irn", "--mask-method", "irn", "--max-iters", "2", "--batch-size",
                "4", "--seg-batch", "4", "--crop-size", "32", "--seg-crop", "32", "--embed-dim", "32", "--depth", "2",
                "--num-heads", "2", "--layer-index", "2", "--seed-scales", "0.5", "1.0", "--irn-batch", "4",
                "--irn-crop", "64", "--workers", "0", "--num-vis", "1"]


def test_cli_smoke_irn_classifier(toy_root, tmp_path):
    """python csd.py --classifier irn --mask-method irn (2 iterations a stage) on the tiny toy set: every stage runs,
    metrics.json records the classifier and the seed / mask / seg results (IRN's t = 0.15 next to the sweep),
    args.json the IRN toy values. Catches: the IRN pipeline crashing anywhere (CAM grid vs token masks, the seed
    cache, the IRN masks on IRN seeds), metrics.json without the classifier, IRN_PRESETS not applied by main()."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, csd.__file__, "--data", str(toy_root), "--out", str(out), *IRN_CLS_TINY],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("RESULT csd seg/val mIoU=")
    m = json.loads((out / "metrics.json").read_text())
    assert m["classifier"] == "irn" and m["method"] == "csd"
    res = m["results"]
    for key in ("stage1_seed/train", "seed/train", "mask/train", "seg/val"):
        assert key in res and 0 <= res[key]["miou"] <= 100, key
    assert res["mask/train"]["method"] == "IRN random walk" and "miou_at_0.15" in res["seed/train"]
    assert {"stage1", "prior", "classifier", "seeds", "irn", "masks", "seg"} <= set(m["stage_seconds"])
    a = json.loads((out / "args.json").read_text())
    assert a["classifier"] == "irn" and a["cls_aug"] == "irn" and a["irn_backbone"] == csd.IRN_PRESETS["toy"]["irn_backbone"]
    assert a["crop_size"] == 32 and a["seed_scales"] == [0.5, 1.0]  # the flags given win over IRN_PRESETS


def test_make_labels_records_irn_threshold_015(monkeypatch, tmp_path):
    """With --classifier irn, seed/<split> also carries the sweep's value at IRN's cam_eval_thres 0.15 (run_sample.py)
    next to the best threshold's. Catches: another threshold read (0.16, the best one), the key on MCTformer runs."""
    curve = [(round(0.01 * i, 2), 0.3 + 0.01 * i) for i in range(30)]  # 0.15 -> 0.45, best at 0.29 -> 0.59
    best = {"miou": 0.59, "iou": [0.59] * 3}
    sweep = {g: {"curve": curve, "best": best, "best_threshold": 0.29} for g in ("all", "single", "multi")}
    monkeypatch.setattr(csd, "compute_maps", lambda *a, **k: {})
    monkeypatch.setattr(csd, "evaluate_seeds", lambda *a, **k: sweep)
    monkeypatch.setattr(csd, "each_sample", lambda *a, **k: iter(()))
    monkeypatch.setattr(csd, "write_labels", lambda *a, **k: None)
    seed_set = SimpleNamespace(class_names=["bg", "a", "b"], num_classes=3, ids=[])
    for classifier, want in (("irn", 45.0), ("mctformer", None)):
        ctx = SimpleNamespace(args=irn_args(classifier=classifier, sweep_max=0.29), splits={"seed": "train"})
        res, t = csd.make_labels(ctx, None, seed_set, seed_set, "labels", "best", False, tmp_path)
        assert t == 0.29 and res["seed/train"]["miou"] == 59.0
        assert res["seed/train"].get("miou_at_0.15") == want, classifier
