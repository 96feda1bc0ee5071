"""Learning Weakly Supervised Semantic Segmentation Through Cross-Supervision and Contrasting of
Pixel-Level Pseudo-Labels (CSRM).
Lucas David, Helio Pedrini, Zanoni Dias. VISAPP 2025 (the project issue says 2024; SciTePress lists it
under 2025). https://scitepress.org/publishedPapers/2025/132384/pdf/index.html
Official code: lucasdavid/wsss-csrm (method) + lucasdavid/PNOC (networks, CAM utils, dCRF, data).

What the paper does. A CAM classifier (Puzzle-CAM / P-NOC in the paper, a plain CAM net trained
here as stage 0) is fine-tuned into a three-branch network with a mean teacher, using image-level
labels only: the classification branch gives CAMs; the teacher's CAMs, refined by a label dCRF and
split by two thresholds, supervise a DeepLabV3+ segmentation branch (L_s); the teacher's segmentation
supervises the student's CAMs back (L_s2c, "mutual promotion"); a ClassMix weak-to-strong consistency
with an entropy-quantile reliability mask regularises the segmentation branch (L_u); a 256-d
representation branch learns a U2PL InfoNCE whose hard negatives come from *unreliable* pixels kept
in per-class FIFO memory banks (L_m). The final teacher's TTA CAMs -> threshold -> dCRF give the
pseudo labels, and a DeepLabV3+ trained on them is the verification step (seg/val).

Reading guide (paper section -> code):
  Sec. 3.1 architecture            -> CSRMNet, ASPP, DeepLabV3PlusHead, normalize_cam()
  Sec. 3.2.1 classification loss   -> loss_cls()
  Sec. 3.2.2 segmentation loss     -> cam_pseudo_labels(), loss_seg()
  Sec. 3.2.3 activation consistency-> restricted_probs(), loss_s2c()
  Sec. 3.2.4 segmentation consist. -> classmix(), entropy(), loss_unsup()
  Sec. 3.2.5 contrastive learning  -> MemoryBank, loss_contrast()
  Sec. 3.2.6 teacher, total loss   -> ema_update(), csrm_step()
  Sec. 4 setup / schedules         -> PRESETS, aux_weights(), unreliable_ratio(), train_csrm()
  Sec. 4 inference + verification  -> tta_cams(), make_pseudo_labels(), train_verify()

Equation map:
  Eq. (1)  A = C(F(x)), p = sigmoid(GAP(A))               -> CSRMNet.forward()
  Eq. (2)  psi(A) = ReLU(up(A)) / max ReLU(up(A))         -> normalize_cam()
  Eq. (3)  S = S(F(x)), s = softmax(S)  (|C|+1 classes)   -> CSRMNet.forward(), restricted_probs()
  Eq. (4)  R = R(F(x)) (256-d)                            -> CSRMNet.forward()
  Eq. (5)  L_c multi-label soft-margin                    -> loss_cls()
  Eq. (6)  I = dCRF(psi(A)), mask outside (d_bg, d_fg]    -> cam_pseudo_labels()
  Eq. (7)  L_s masked cross-entropy                       -> loss_seg()
  Eq. (8)  M^s = 1[max_c s^t > sigma_s2c]                 -> loss_s2c()
  Eq. (9)  Q = softmax([S_bg | up(A)]), L_s2c             -> loss_s2c()
  Eq. (10) H = -sum_c s log s                             -> entropy()
  Eq. (11) gamma_t = quantile(H, 1 - alpha_t), mask       -> loss_unsup(), loss_contrast() masks
  Eq. (12) L_u reliable cross-entropy                     -> loss_unsup()
  Eq. (13) L_m InfoNCE with prototypes and bank negatives -> loss_contrast()
  Eq. (14) L = L_c + L_s + l_s2c L_s2c + l_u L_u + l_m L_m -> csrm_step()

Symbols: A cam logits (B,C,h,w); z = GAP(A) cls logits; S seg logits (B,C+1,H,W), S4 the same at
stride 4; R representations (B,D,H/4,W/4); PL pseudo labels; P_t label-restricted teacher
probabilities; Yhat_t = argmax P_t; H entropy; C = number of foreground classes, K = C + 1.

Deviations (paper vs this file; "official" = lucasdavid/wsss-csrm + lucasdavid/PNOC):
  1. Start point: a plain CAM classifier trained in stage 0 instead of Puzzle-CAM / P-NOC weights
     (not part of this project); --init-ckpt FILE restores external {backbone, classifier} weights.
  2. P and N follow the code (256 queries x 50 negatives), not the paper's P=50, N=256; the
     negative-confidence bound is 1.0 (no constraint) as in the code, not the paper's 1%; banks hold
     30,000 keys (background 50,000), not N.
  3. delta_fg = 0.30 on VOC and 0.40 on COCO (official runners); the paper writes 0.35.
  4. The paper's "sigma_s2c from 10% to 100%" is the loss weight lambda_s2c (official
     linear_schedule); the confidence threshold sigma_s2c is fixed at 0.5.
  5. LR decay is poly 0.9 (official PolyOptimizer), the paper says "linear".
  6. Augmentation of the l-half follows the code (rescale, reflect-pad, crop, jitter, blur, flip),
     the paper mentions resize + flip; the u-half is pad + crop only.
  7. L_u carries U2PL's N_all/N_kept factor; L_s and L_s2c use label smoothing 0.1 and batch-level
     means (Eqs. (7), (9) average per image).
  8. L_u's target comes from the eval-mode teacher on the un-mixed images (logits ClassMixed, then
     label-restricted); its entropy from a train-mode (dropout) teacher pass on the mixed images.
  9. R stays at stride 4 (the paper writes H x W).
  10. ClassMix pastes half of the partner's classes (paper-era csrm/data_utils.py); the released
      PNOC batch_mixaug_pt pastes nothing (its class count is the background id, 0).
  11. Per-class query/prototype/bank indexing is correct; --u2pl-index-quirk reproduces U2PL's
      loop-position indexing.
  12. Negative keys beyond a bank's capacity are randomly subsampled before enqueueing (the code
      keeps the last ones in batch-then-raster order, biasing banks toward u-half images).
  13. The auxiliary losses are not computed at all during warm-up (their weights are 0 there), so
      the banks start filling at epoch W; the second teacher pass is skipped when L_u and L_m are off.
  14. Fig. 2's "delta_fg" axis is read as the inference background threshold of the pseudo labels;
      the curve is the threshold sweep stored under cam/train (the training delta_fg is a flag).
  15. Verification network: DeepLabV3+ (this file's head, GN) on a timm backbone: resnest269e with
      ImageNet weights for the paper preset (the paper's V3+ row); on toy, resnet18 initialised from
      the stage-0 CAM backbone (--seg-init cam), since no ImageNet weights exist offline. Scored
      single-scale (seg/val) and with TTA (seg_ms/val); the paper's DeepLabV2 RN-101 row is not run.
  16. Toy preset (not in the paper): 96-px crops and short schedules for the CPU budget, and lower
      learning rates than card 10 suggests, chosen from development runs on toy data: with heads at
      10 x 0.02 a toy DeepLabV3+ trained on GROUND TRUTH for 120 steps stayed all-background (11%
      val mIoU) vs 31% at 10 x 0.001; CSRM at lr 0.01 moved the teacher's CAM mIoU (100 train images)
      from 27.3 to 22.6 in 60 steps, at 0.002 to 26.7.
Run:
  python csrm.py                                   (toy data, CPU, minutes)
  python csrm.py --data VOC2012 --pretrained       (paper settings, CUDA)
  python csrm.py --data COCO2014 --pretrained      (paper COCO settings)
  python csrm.py --no-s2c --no-u --no-m            (Table 1 row 1: L_s only)
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import augment, crf, data, miou

METHOD = "csrm"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class Args:
    # -- common flags (DESIGN.md)
    data: str = "toy"  # toy | VOC2012 | COCO2014 | path
    preset: str = "auto"  # auto | paper | toy
    out: str = ""  # run folder; default runs/csrm/<data>-<time>
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    workers: int = 2  # DataLoader workers
    amp: bool = False  # CUDA float16 autocast (official: AMP); ignored on CPU
    resume: str = ""  # RUN_DIR to continue from checkpoints/last.pt
    eval_only: bool = False  # skip training; needs --ckpt
    ckpt: str = ""  # checkpoint with a CSRM teacher (and optionally the verification net)
    pretrained: bool = False  # ImageNet weights through timm for the backbones
    weights: str = ""  # local state dict for the CSRM/CAM backbone
    seg_weights: str = ""  # local state dict for the verification backbone
    max_iters: int = 0  # cap every training stage at N iterations (0 = no cap)
    stop_after: int = 0  # testing aid: stop as if interrupted after N iterations of this process
    deterministic: bool = False  # deterministic cuDNN
    # -- network (Sec. 3.1; card 3)
    backbone: str = "resnest101e"  # Sec. 5: ResNeSt-101 (VOC ablation), timm resnest101e
    width: int = 256  # ASPP / decoder channels (DeepLabV3+)
    low_width: int = 48  # low-level projection (DeepLabV3+)
    rep_dim: int = 256  # Sec. 3.1 Eq. (4): 256-d representations
    frozen_stages: int = 1  # official: VOC freezes the stem (1); COCO trains only layer4 (4)
    init_ckpt: str = ""  # Sec. 3.2.6: external CAM weights {backbone, classifier}; skips stage 0
    # -- stage 0, plain CAM classifier (PNOC scripts/cam/train_vanilla.py)
    cam_epochs: int = 15  # PNOC: 15 epochs
    cam_batch: int = 32  # PNOC: batch 32
    cam_lr: float = 0.1  # PNOC: lr 0.1, classifier x10, biases x2
    # -- CSRM training (Sec. 4; card 6)
    epochs: int = 15  # Sec. 4: 15 epochs
    steps_per_epoch: int = 46  # official runner --max_steps: an "epoch" is 46 steps
    warmup_epochs: int = 1  # Sec. 4 warm-up; official W = 1
    batch_size: int = 32  # Sec. 4: batch 32 per half (32 augmented + 32 plain)
    crop: int = 512  # Sec. 4: 512 x 512
    scale_min: float = 0.625  # official: rescale 320-640 around 512
    scale_max: float = 1.25
    lr: float = 0.007  # Sec. 4: 0.007 pretrained, x10 for new layers
    lr_new_mult: float = 10.0  # Sec. 4: 0.07 for randomly initialised weights
    wd: float = 1e-4  # Sec. 4
    grad_clip: float = 1.0  # official: clip grad norm 1.0
    label_smoothing: float = 0.1  # official: VOC 0.1, COCO 0
    ema: float = 0.99  # official: teacher momentum 0.99
    # -- loss weights and switches (Eq. (14), Table 1)
    s2c: bool = True  # Table 1: L_s2c on/off (--no-s2c)
    u: bool = True  # Table 1: L_u on/off (--no-u)
    m: bool = True  # Table 1: L_m on/off (--no-m)
    w_s2c: float = 1.0  # Eq. (14) lambda_s2c, ramped 0.1 -> 1 (Sec. 4)
    w_u: float = 1.0  # Sec. 4: lambda_u = 1
    w_m: float = 1.0  # Sec. 4: lambda_m = 1
    s2c_sigma: float = 0.5  # Eq. (8) sigma_s2c (official --s2c_sigma)
    s2c_ramp_start: float = 0.1  # Sec. 4: "from 10% to 100%"
    # -- pseudo labels and mixing (Eq. (6); Sec. 4)
    bg_thr: float = 0.05  # Sec. 4: delta_bg
    fg_thr: float = 0.30  # official VOC runner (paper 0.35)
    crf_iters: int = 10  # irn label dCRF
    crf_workers: int = 8  # CPU threads for the per-step dCRFs (official: a CPU pool)
    mix_prob: float = 0.5  # Sec. 4: ClassMix with p 0.5
    unreliable: float = 0.20  # Sec. 4: alpha_0 = 20%, linearly to 0
    # -- contrastive (Sec. 3.2.5, Eq. (13); official cfg_contra)
    queries: int = 256  # official: 256 queries per class (paper P = 50)
    negatives: int = 50  # official: 50 negatives per query (paper N = 256)
    tau: float = 0.5  # Sec. 4
    query_conf: float = 0.3  # Sec. 3.2.5: "segmented with confidence higher than 30%"
    neg_conf: float = 1.0  # official: 1 (no constraint; paper 1%)
    rank_low: int = 3  # Sec. 3.2.5 gamma_l
    rank_high: int = 6  # Sec. 3.2.5 gamma_h (VOC 6, COCO 12)
    bank: int = 30000  # official memobank size
    bank_bg: int = 50000  # official background memobank size
    u2pl_index_quirk: bool = False  # reproduce U2PL's loop-position indexing (card 8.13)
    # -- inference and evaluation (Sec. 4; card 7)
    tta_scales: str = "0.5,1,1.5,2"  # Sec. 4 TTA; PNOC scales
    tta_flip: bool = True
    pl_thr: float = 0.4  # PNOC make_pseudo_masks: background threshold 0.4
    pl_crf: bool = True  # Table 2: dCRF on the pseudo labels (pseudo_crf/...)
    val_images: int = 1464  # per-epoch validation images of the seed split (official: VOC train)
    # -- verification (Sec. 4; PNOC scripts/segmentation/train.py)
    seg_backbone: str = "resnest269e"  # Table 3: DeepLabV3+ RS-269
    seg_epochs: int = 50  # Sec. 4: 50 epochs
    seg_batch: int = 32  # Sec. 4: batch 32
    seg_lr: float = 0.007  # Sec. 4: 0.007 (VOC), 0.004 (COCO)
    seg_wd: float = 4e-5  # PNOC segmentation train: 4e-5
    seg_init: str = "imagenet"  # Sec. 4: ImageNet backbone (timm, --pretrained/--seg-weights); "cam": stage-0 backbone
    vis: int = 4  # number of val images in vis/ grids
    ckpt_every: int = 50  # iterations between checkpoints/last.pt


PRESETS = {
    "paper_voc": dict(pretrained=True),  # otherwise the Args defaults are the official VOC settings
    "paper_coco": dict(
        pretrained=True, backbone="resnest269e", frozen_stages=4, steps_per_epoch=256, batch_size=16, crop=640,
        lr=0.004, label_smoothing=0.0, fg_thr=0.40, rank_high=12, seg_lr=0.004, val_images=5000,
    ),
    "toy": dict(  # card 10, with the learning rates of Deviation 16
        backbone="resnet18", width=64, low_width=16, rep_dim=32, cam_epochs=3, cam_batch=16,
        cam_lr=0.05, epochs=4, steps_per_epoch=15, batch_size=4, crop=96, lr=0.002, queries=32,
        negatives=16, bank=2000, bank_bg=4000, crf_iters=5, crf_workers=0, tta_scales="1",
        workers=0, val_images=100, seg_backbone="resnet18", seg_epochs=3, seg_batch=16, seg_lr=0.001,
        seg_wd=1e-4, seg_init="cam",
    ),
}


class ArgumentParser(argparse.ArgumentParser):
    """Errors are one line on stderr and exit code 2 (DESIGN.md, Errors)."""

    def error(self, message):
        fail(message)


def fail(msg: str, code: int = 2):
    print(f"{METHOD}.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def parse_args(argv=None) -> Args:
    """Argparse built from Args; every flag defaults to None so presets fill what was not given."""
    p = ArgumentParser(prog=f"{METHOD}.py", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    # --help shows each field's source comment from the Args block above
    helps = dict(re.findall(r"^    (\w+): [^=]+=[^#]*#\s*(.+)$", inspect.getsource(Args), re.M))
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        text = helps.get(f.name, "").replace("%", "%%")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            p.add_argument(flag, type=type(f.default), default=None, help=text)
    ns = vars(p.parse_args(argv))
    given = {k: v for k, v in ns.items() if v is not None}
    data_name = given.get("data", Args.data)
    preset = given.get("preset", "auto")
    if preset not in ("auto", "paper", "toy"):
        fail(f"--preset must be auto, paper or toy, got {preset!r}")
    if preset == "auto":
        preset = "toy" if data_name == "toy" else "paper"
    if preset == "paper":
        coco = data_name.upper().startswith("COCO") or (Path(data_name) / "train2014").is_dir()
        preset = "paper_coco" if coco else "paper_voc"
    args = Args(**{**PRESETS[preset], **given})
    args.preset = preset
    return args


def check_args(args: Args) -> None:
    """Everything checkable before the run folder exists (DESIGN.md, Errors)."""
    def check(cond, msg):
        if not cond:
            fail(msg)
    check(args.device in ("auto", "cpu", "cuda"), "--device must be auto, cpu or cuda")
    check(not (args.device == "cuda" and not torch.cuda.is_available()),
          "--device cuda was given but no CUDA device is available; use --device cpu")
    for name in (args.backbone, args.seg_backbone):
        check(timm.is_model(name), f"unknown timm backbone {name!r}; pick one from timm.list_models()")
    for k in ("cam_epochs", "cam_batch", "epochs", "steps_per_epoch", "batch_size", "crop", "width",
              "low_width", "rep_dim", "queries", "negatives", "bank", "bank_bg", "seg_epochs", "seg_batch"):
        check(getattr(args, k) >= 1, f"--{k.replace('_', '-')} must be >= 1")
    check(args.crop % 16 == 0, f"--crop must be a multiple of 16 (output stride), got {args.crop}")
    check(0 <= args.warmup_epochs < args.epochs, "--warmup-epochs must be in [0, --epochs)")
    check(0 < args.scale_min <= args.scale_max, "need 0 < --scale-min <= --scale-max")
    check(0 <= args.bg_thr < args.fg_thr <= 1, "need 0 <= --bg-thr < --fg-thr <= 1 (Eq. (6))")
    for k in ("mix_prob", "unreliable", "s2c_sigma", "s2c_ramp_start", "ema", "label_smoothing",
              "pl_thr", "query_conf", "neg_conf"):
        check(0 <= getattr(args, k) <= 1, f"--{k.replace('_', '-')} must be in [0, 1]")
    for k in ("lr", "cam_lr", "seg_lr", "tau", "lr_new_mult"):
        check(getattr(args, k) > 0, f"--{k.replace('_', '-')} must be > 0")
    for k in ("wd", "seg_wd", "grad_clip", "w_s2c", "w_u", "w_m", "max_iters", "stop_after",
              "workers", "crf_workers", "crf_iters", "frozen_stages", "val_images", "vis"):
        check(getattr(args, k) >= 0, f"--{k.replace('_', '-')} must be >= 0")
    check(1 <= args.rank_low < args.rank_high, "need 1 <= --rank-low < --rank-high")
    check(args.ckpt_every >= 1, "--ckpt-every must be >= 1")
    check(args.seg_init in ("imagenet", "cam"), "--seg-init must be imagenet or cam")
    check(args.seg_init != "cam" or args.seg_backbone == args.backbone,
          "--seg-init cam needs --seg-backbone equal to --backbone (it copies the stage-0 backbone)")
    try:
        scales = tta_scales(args)
    except ValueError:
        scales = []
    check(len(scales) > 0 and all(s > 0 for s in scales), "--tta-scales must be positive numbers, e.g. 0.5,1,1.5,2")
    check(not (args.eval_only and not args.ckpt), "--eval-only needs --ckpt FILE (a csrm checkpoint)")
    check(not (args.eval_only and args.resume), "--eval-only and --resume exclude each other")
    for k in ("ckpt", "init_ckpt", "weights", "seg_weights"):
        path = getattr(args, k)
        check(not path or Path(path).is_file(), f"--{k.replace('_', '-')} {path}: no such file")
    if args.resume:
        check((Path(args.resume) / "checkpoints" / "last.pt").is_file(),
              f"--resume {args.resume}: no checkpoints/last.pt there; pass the folder of an earlier run")


def tta_scales(args: Args) -> list[float]:
    return [float(s) for s in args.tta_scales.split(",") if s.strip()]


# ----------------------------------------------------------------------------------------------
# Model (Sec. 3.1)
# ----------------------------------------------------------------------------------------------
def conv_gn_relu(cin: int, cout: int, k: int, dilation: int = 1) -> nn.Sequential:
    # Impl. (lucasdavid/PNOC, core/deeplab_utils.py): every norm in the heads is GroupNorm(4),
    # so the batch mixing two augmentation regimes and the 1x1 pooled ASPP map are harmless.
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.GroupNorm(4, cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """DeepLabV3+ atrous spatial pyramid pooling on the stride-16 features."""

    def __init__(self, cin: int, width: int, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_gn_relu(cin, width, 1)] + [conv_gn_relu(cin, width, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_gn_relu(cin, width, 1))
        self.fuse = nn.Sequential(conv_gn_relu(5 * width, width, 1), nn.Dropout(0.5))

    def forward(self, x):
        size = x.shape[-2:]
        feats = [b(x) for b in self.branches]
        feats.append(F.interpolate(self.pool(x), size=size, mode="bilinear", align_corners=True))
        return self.fuse(torch.cat(feats, 1))  # (B, width, h, w)


class DeepLabV3PlusHead(nn.Module):
    """ASPP + low-level projection + decoder; also the verification network's head."""

    def __init__(self, c_low: int, c_high: int, num_outputs: int, width: int, low_width: int):
        super().__init__()
        self.aspp = ASPP(c_high, width)
        self.project = conv_gn_relu(c_low, low_width, 1)
        self.decoder = nn.Sequential(conv_gn_relu(width + low_width, width, 3), nn.Dropout(0.1),
                                     conv_gn_relu(width, width, 3), nn.Dropout(0.1),
                                     nn.Conv2d(width, num_outputs, 1))

    def fuse(self, f_low, f_high):
        a = self.aspp(f_high)  # (B, width, h16, w16)
        a = F.interpolate(a, size=f_low.shape[-2:], mode="bilinear", align_corners=True)
        return torch.cat([a, self.project(f_low)], 1)  # (B, width + low_width, h4, w4)


def init_new_layers(module: nn.Module) -> None:
    # Sec. 3.2.6: new branches "randomly drawn from a Kaiming normal distribution"; GN 1 / 0.
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.GroupNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


def create_backbone(name: str, pretrained: bool, weights: str = "") -> nn.Module:
    """timm feature extractor F: stride-4 (layer1) and stride-16 (layer4, dilated) features."""
    try:
        net = timm.create_model(name, pretrained=pretrained, features_only=True, out_indices=(1, 4),
                                output_stride=16)
    except Exception as exc:  # no internet / no cache
        raise WeightsError(f"could not load ImageNet weights for {name} through timm ({exc.__class__.__name__}); "
                           "populate the timm cache, pass --weights FILE, or use --no-pretrained") from None
    if weights:
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            missing, _ = net.load_state_dict(state, strict=False)
            if len(missing) == len(net.state_dict()):
                raise ValueError("no parameter name matched")
        except Exception as exc:
            raise WeightsError(f"could not load --weights {weights} into {name} ({exc}); pass a timm state dict "
                               "for this backbone, or use --pretrained (timm) instead") from None
    return net


class WeightsError(Exception):
    pass


class CAMNet(nn.Module):
    """Stage 0: backbone + bias-free 1x1 classifier (a plain CAM network)."""

    def __init__(self, backbone: str, num_classes: int, pretrained=False, weights=""):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, weights)
        self.classifier = nn.Conv2d(self.backbone.feature_info.channels()[-1], num_classes, 1, bias=False)
        init_new_layers(self.classifier)

    def forward(self, x, seg: bool = False, rep: bool = False) -> dict:
        # Eq. (1)  A = C(F(x)), z = GAP(A)
        A = self.classifier(self.backbone(x)[-1])  # (B, C, h, w)
        return {"cam": A, "cls_logits": A.mean((2, 3))}


class CSRMNet(nn.Module):
    """Feature extractor F + classification C, segmentation S and representation R branches."""

    def __init__(self, backbone: str, num_classes: int, width: int, low_width: int, rep_dim: int,
                 pretrained=False, weights=""):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, weights)
        c_low, c_high = self.backbone.feature_info.channels()
        self.classifier = nn.Conv2d(c_high, num_classes, 1, bias=False)
        self.head = DeepLabV3PlusHead(c_low, c_high, num_classes + 1, width, low_width)
        # Eq. (4): the R branch shares ASPP + projection; no dropout, no L2 normalisation.
        self.rep_head = nn.Sequential(conv_gn_relu(width + low_width, width, 3), nn.Conv2d(width, rep_dim, 1))
        init_new_layers(self.classifier)
        init_new_layers(self.head)
        init_new_layers(self.rep_head)

    def freeze(self, frozen_stages: int) -> "CSRMNet":
        """Frozen backbone BN (eval statistics, no affine training); stem and early stages frozen."""
        self.backbone = timm.layers.freeze_batch_norm_2d(self.backbone)
        names = ["conv1", "bn1"] + [f"layer{i}" for i in range(1, 4)]
        frozen = names[: 2 + max(frozen_stages - 1, 0)] if frozen_stages >= 1 else []
        for name, p in self.backbone.named_parameters():
            if name.split(".")[0] in frozen:
                p.requires_grad_(False)
        return self

    def pretrained_parameters(self):
        return list(self.backbone.parameters()) + list(self.classifier.parameters())

    def forward(self, x, seg: bool = True, rep: bool = True) -> dict:
        f_low, f_high = self.backbone(x)  # (B, c_low, H/4, W/4), (B, c_high, H/16, W/16)
        # Eq. (1)  A_c = C_c(F(x));  p_c = sigmoid(GAP(A_c))  (the sigmoid lives in the loss)
        A = self.classifier(f_high)  # (B, C, H/16, W/16)
        out = {"cam": A, "cls_logits": A.mean((2, 3))}
        if seg or rep:
            fused = self.head.fuse(f_low, f_high)  # (B, width + low_width, H/4, W/4)
        if seg:
            # Eq. (3)  S = S(F(x)) with |C|+1 outputs; softmax taken where it is used
            S4 = self.head.decoder(fused)  # (B, C+1, H/4, W/4)
            out["seg4"] = S4
            out["seg"] = F.interpolate(S4, size=x.shape[-2:], mode="bilinear", align_corners=True)
        if rep:
            # Eq. (4)  R = R(F(x)), kept at stride 4 (Deviation 9)
            out["rep"] = self.rep_head(fused)  # (B, D, H/4, W/4)
        return out


class SegNet(nn.Module):
    """Verification network: DeepLabV3+ on a timm backbone (Deviation 15)."""

    def __init__(self, backbone: str, num_outputs: int, width: int, low_width: int, pretrained=False, weights=""):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, weights)
        c_low, c_high = self.backbone.feature_info.channels()
        self.head = DeepLabV3PlusHead(c_low, c_high, num_outputs, width, low_width)
        init_new_layers(self.head)

    def forward(self, x):
        f_low, f_high = self.backbone(x)
        logits = self.head.decoder(self.head.fuse(f_low, f_high))  # (B, K, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


# ----------------------------------------------------------------------------------------------
# Losses (Sec. 3.2)
# ----------------------------------------------------------------------------------------------
def loss_cls(cls_logits: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. (5): multi-label soft-margin on logits z (B, C) with smoothed labels y (B, C)."""
    # Impl. (lucasdavid/wsss-csrm, scripts/ss/train_csrm.py): y~ = (1 - eps) y + eps / 2; Eq. (5)
    # as printed applies the sigmoid twice, the code feeds logits.
    y_s = (1 - eps) * y + eps / 2
    # Eq. (5)  L_c = -1/|C| sum_c [y~ log sigmoid(z) + (1 - y~) log(1 - sigmoid(z))], mean over images
    return F.multilabel_soft_margin_loss(cls_logits.float(), y_s)


def loss_seg(S: torch.Tensor, PL: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. (7): cross-entropy of the student's S (B, C+1, H, W) on reliable PL (B, H, W) pixels."""
    # Impl. (wsss-csrm): only images whose PL holds a foreground pixel count.
    has_fg = ((PL > 0) & (PL != 255)).flatten(1).any(1)
    if not has_fg.any():
        return S.sum() * 0
    # Eq. (7)  L_s = -1/|M^p| sum_hw M^p sum_c I log s  (batch-level mean, smoothing eps; Deviation 7)
    return F.cross_entropy(S[has_fg].float(), PL[has_fg], ignore_index=255, label_smoothing=eps)


def loss_s2c(S: torch.Tensor, A: torch.Tensor, P_t: torch.Tensor, sigma: float, eps: float) -> torch.Tensor:
    """Eqs. (8)-(9): the teacher's segmentation supervises the student's raw CAM logits.

    S: student seg logits (B, C+1, H, W); A: student CAM logits (B, C, h, w); P_t: teacher
    probabilities restricted to the image labels (B, C+1, H, W)."""
    A_up = F.interpolate(A.float(), size=S.shape[-2:], mode="bilinear", align_corners=True)  # (B, C, H, W)
    # Eq. (9)  Q = softmax([stopgrad(S_bg) | up(A)]): the background logit is a constant here
    Q_logits = torch.cat([S[:, :1].detach().float(), A_up], 1)  # (B, C+1, H, W)
    conf, target = P_t.max(1)  # c* = argmax_c s^t
    # Eq. (8)  M^s = 1[max_c s^t > sigma_s2c]; the rest is ignored
    target = target.masked_fill(conf <= sigma, 255)
    if not (target != 255).any():
        return Q_logits.sum() * 0
    # Eq. (9)  L_s2c = -1/|M^s| sum_hw M^s log Q_{c*}
    return F.cross_entropy(Q_logits, target, ignore_index=255, label_smoothing=eps)


def entropy(prob: torch.Tensor) -> torch.Tensor:
    """Eq. (10): H = -sum_c s log s over all classes, float32; prob (B, K, ...) -> (B, ...)."""
    prob = prob.float()
    # Eq. (10)  H_hw = -sum_c s_c log s_c  (log(p + 1e-10) as in U2PL)
    return -(prob * torch.log(prob + 1e-10)).sum(1)


def quantile(t: torch.Tensor, q: float) -> torch.Tensor:
    """np.percentile-style linear quantile via kthvalue (torch.quantile fails above 16M elements)."""
    flat = t.detach().flatten().float()
    pos = q * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def loss_unsup(S_u: torch.Tensor, Yhat_u: torch.Tensor, H_u: torch.Tensor, rho: float) -> torch.Tensor:
    """Eqs. (11)-(12): weak-to-strong consistency on the u-half's reliable pixels.

    S_u: student logits on the mixed images (B, C+1, H, W); Yhat_u: teacher labels (B, H, W);
    H_u: entropy of the train-mode teacher on the mixed images (B, H, W); rho: drop ratio."""
    # Eq. (11)  gamma_t = quantile(H, 1 - alpha_t); pixels at or above it are unreliable
    gamma = quantile(H_u, 1 - rho)
    target = Yhat_u.masked_fill(H_u >= gamma, 255)
    n_kept = (target != 255).sum()
    if n_kept == 0:
        return S_u.sum() * 0
    # Eq. (12)  L_u = -1/|M| sum_hw M log s_{c*}, times U2PL's N_all / N_kept (Deviation 7)
    return target.numel() / n_kept * F.cross_entropy(S_u.float(), target, ignore_index=255)


class MemoryBank:
    """Per-class FIFO queues of negative keys (U2PL memobank), on CPU: the oldest keys leave first."""

    def __init__(self, num_classes: int, dim: int, cap: int, cap_bg: int):
        self.caps = [cap_bg] + [cap] * (num_classes - 1)
        self.queues = [torch.zeros(0, dim) for _ in range(num_classes)]

    def push(self, c: int, keys: torch.Tensor) -> None:
        queue = torch.cat([self.queues[c], keys.detach().float().cpu()])  # newest at the end
        self.queues[c] = queue[-self.caps[c]:]

    def state_dict(self):
        return {"queues": [q.clone() for q in self.queues]}

    def load_state_dict(self, state):
        self.queues = [q.clone() for q in state["queues"]]


def gather_rows(t: torch.Tensor, mask: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Rows t[b, :, y, x] (n, D) at mask pixels (optionally the index-th of them) without permuting t."""
    b, yy, xx = mask.nonzero(as_tuple=True)
    if index is not None:
        b, yy, xx = b[index], yy[index], xx[index]
    return t[b, :, yy, xx]


def all_gather_cpu(keys: torch.Tensor) -> torch.Tensor:
    """Keys from every rank (banks stay identical across DDP ranks, as U2PL's gather_together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return keys
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, keys.detach().cpu())
    return torch.cat(parts)


def negative_rank_mask(rank_c: torch.Tensor, labels4: torch.Tensor, present_c: torch.Tensor, c: int,
                       n_l: int, rank_low: int, rank_high: int) -> torch.Tensor:
    """Sec. 3.2.5 rules (a)/(b) for class c, (2B, h, w) bool.

    rank_c: 0-based rank of class c in the unrestricted train-mode teacher probabilities (2B, h, w);
    labels4: PL on the l-half, Yhat_t on the u-half (2B, h, w); present_c: whether c is in the
    u-half's un-mixed loader labels (B,) bool (background always counts as present)."""
    top = rank_c < rank_low
    # l-half: among the gamma_l most likely classes, and not the pixel's pseudo label
    neg_l = top[:n_l] & (labels4[:n_l] != c)
    # u-half: (a) among the top gamma_l but absent from y, or (b) rank in [gamma_l, gamma_h)
    absent = ~present_c.view(-1, 1, 1)
    neg_u = (top[n_l:] & absent) | ((rank_c[n_l:] >= rank_low) & (rank_c[n_l:] < rank_high))
    return torch.cat([neg_l, neg_u])


def loss_contrast(rep: torch.Tensor, rep_t: torch.Tensor, prob4: torch.Tensor, labels4: torch.Tensor,
                  low: torch.Tensor, high: torch.Tensor, present_u: torch.Tensor, n_l: int, bank: MemoryBank,
                  args: Args) -> torch.Tensor:
    """Eq. (13): U2PL InfoNCE with class prototypes and hard negatives from the memory banks.

    rep: student R (2B, D, h, w); rep_t: train-mode teacher R (2B, D, h, w); low/high: reliable /
    unreliable pixels (2B, h, w) from Eq. (11) on the u-half (PL != 255 on the l-half)."""
    K = prob4.shape[1]
    rep_t = rep_t.detach().float()
    rank = prob4.argsort(1, descending=True).argsort(1)  # (2B, K, h, w) 0-based class ranks
    query_pools, protos, valid_classes = [], [], []
    for c in range(K):
        valid = (labels4 == c) & low  # pixels confidently labelled c
        # Queries: reliable pixels of c that the teacher segments as c with confidence > delta_p
        query_pools.append(valid & (prob4[:, c] > args.query_conf))
        n_valid = valid.sum()
        # Positive: prototype = mean teacher representation of c's reliable pixels (detached)
        protos.append(torch.einsum("bdhw,bhw->d", rep_t, valid.float()) / n_valid.clamp(min=1))
        # Negatives: unreliable pixels with the rank rules, enqueued before the loss is computed
        neg = high & (prob4[:, c] < args.neg_conf) & negative_rank_mask(
            rank[:, c], labels4, present_u[:, c], c, n_l, args.rank_low, args.rank_high)
        # Deviation 12: subsample an overfull enqueue instead of keeping its raster tail
        pick = torch.randperm(int(neg.sum()), device=neg.device)[: bank.caps[c]].sort().values
        keys = all_gather_cpu(gather_rows(rep_t, neg, pick))  # every rank calls, even with no keys
        if len(keys):
            bank.push(c, keys)
        if n_valid > 0:
            valid_classes.append(c)
    if len(valid_classes) <= 1:
        return rep.sum() * 0
    loss = rep.sum() * 0
    for i, c in enumerate(valid_classes):
        # Impl. (lucasdavid/wsss-csrm, csrm/u2pl.py): U2PL indexes queries/prototypes by loop position
        qi = i if args.u2pl_index_quirk else c
        n_q = int(query_pools[qi].sum())
        keys = bank.queues[c]
        if n_q == 0 or len(keys) == 0:
            continue
        anchor = gather_rows(rep, query_pools[qi], torch.randint(n_q, (args.queries,), device=rep.device))  # (P, D)
        negs = keys[torch.randint(len(keys), (args.queries * args.negatives,))].to(rep.device)
        negs = negs.view(args.queries, args.negatives, -1)  # (P, N, D)
        keys_all = torch.cat([protos[qi].view(1, 1, -1).expand(args.queries, 1, -1), negs], 1)  # (P, 1+N, D)
        # Eq. (13)  -log e^{<r, r+>/tau} / (e^{<r, r+>/tau} + sum_j e^{<r, r-_j>/tau}), cosine <.,.>
        logits = F.cosine_similarity(anchor.float().unsqueeze(1), keys_all, dim=2) / args.tau  # (P, 1+N)
        loss = loss + F.cross_entropy(logits, torch.zeros(args.queries, dtype=torch.long, device=rep.device))
    # Eq. (13)  mean over classes (valid classes without queries or keys count as 0, as in U2PL)
    return loss / len(valid_classes)


# ----------------------------------------------------------------------------------------------
# Pseudo labels, mixing, schedules (Sec. 3.2.2-3.2.4, Sec. 4)
# ----------------------------------------------------------------------------------------------
def normalize_cam(A: torch.Tensor) -> torch.Tensor:
    """Eq. (2): psi(A) = ReLU(A) / max_hw ReLU(A), per image and class; A (B, C, h, w)."""
    A = F.relu(A.float())
    # Eq. (2)  divide by the per-class spatial max (+1e-5 so absent classes stay exactly 0)
    return A / (A.amax((2, 3), keepdim=True) + 1e-5)


def _crf_pair(job):
    rgb, fg, bg, n_labels, params = job
    return (crf.refine_labels(rgb, fg, n_labels, gt_prob=0.7, **params),
            crf.refine_labels(rgb, bg, n_labels, gt_prob=0.7, **params))


def cam_pseudo_labels(rgb: np.ndarray, y: torch.Tensor, A_t: torch.Tensor, bg_thr: float, fg_thr: float,
                      crf_params: dict | None, pool: ThreadPool | None = None) -> torch.Tensor:
    """Eq. (6): teacher CAMs -> psi -> label dCRF -> {class, background, 255} pseudo labels.

    rgb: the augmented crops, uint8 (B, H, W, 3); y: image labels (B, C); A_t: teacher CAM logits
    (B, C, h, w); crf_params None runs Eq. (6) without the CRF. Returns int64 (B, H, W)."""
    H, W = rgb.shape[1:3]
    # Eq. (2) at stride 16 on the label-masked CAMs, then bilinear (align_corners) to the crop
    psi = normalize_cam(A_t * y[:, :, None, None])
    psi = F.interpolate(psi, size=(H, W), mode="bilinear", align_corners=True).cpu().numpy()  # (B, C, H, W)
    jobs, keys_all = [], []
    for i in range(len(rgb)):
        keys = np.nonzero(y[i].cpu().numpy() > 0.5)[0]
        s = psi[i, keys]  # (m, H, W) present classes only
        # Eq. (6)  argmax[delta, psi_k1..psi_km]: ties go to index 0, so "> delta_fg" is foreground
        fg = np.concatenate([np.full((1, H, W), fg_thr, np.float32), s]).argmax(0)
        bg = np.concatenate([np.full((1, H, W), bg_thr, np.float32), s]).argmax(0)
        jobs.append((np.array(rgb[i]), fg, bg, len(keys) + 1, crf_params))
        keys_all.append(np.concatenate([[0], keys + 1]))
    if crf_params is not None:
        results = pool.map(_crf_pair, jobs) if pool is not None else [_crf_pair(j) for j in jobs]
    else:
        results = [(j[1], j[2]) for j in jobs]
    PL = np.empty((len(rgb), H, W), np.int64)
    for i, ((fg, bg), ids) in enumerate(zip(results, keys_all)):
        # Eq. (6)  M^p: class where the fg map says so; background where both say background;
        # the uncertainty band (delta_bg, delta_fg] is 255
        PL[i] = np.where(fg == 0, np.where(bg == 0, 0, 255), ids[fg])
    return torch.from_numpy(PL).to(A_t.device)


def classmix(x, y, PL, S_t, rgb=None):
    """ClassMix (Olsson et al. 2021, paper-era csrm/data_utils.py; Deviation 10).

    For each image a, a partner b != a; half of b's foreground PL classes (at least one) are pasted
    from the UN-MIXED b into a through one mask shared by the image, PL and S_t; y_a gains them."""
    n = x.shape[0]
    partner = (torch.arange(n) + torch.randint(1, n, (n,))) % n if n > 1 else torch.zeros(1, dtype=torch.long)
    x_m, y_m, PL_m, S_m = x.clone(), y.clone(), PL.clone(), S_t.clone()
    rgb_m = rgb.copy() if rgb is not None else None
    for a in range(n):
        b = int(partner[a])
        if b == a:
            continue
        classes = [int(c) for c in torch.unique(PL[b]) if 0 < int(c) < 255]
        if not classes:
            continue
        order = torch.randperm(len(classes))[: max(len(classes) // 2, 1)]
        selected = torch.tensor([classes[int(k)] for k in order], device=PL.device)
        M = torch.isin(PL[b], selected)  # (H, W) the one shared mask
        x_m[a] = torch.where(M, x[b], x[a])
        PL_m[a] = torch.where(M, PL[b], PL[a])
        S_m[a] = torch.where(M, S_t[b], S_t[a])
        if rgb_m is not None:
            rgb_m[a][M.cpu().numpy()] = rgb[b][M.cpu().numpy()]
        y_m[a, selected - 1] = 1  # labels are only ever added
    return x_m, y_m, PL_m, S_m, rgb_m


def restricted_probs(S_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (3) softmax restricted to background + image classes, renormalised; (B, C+1, H, W)."""
    keep = torch.cat([torch.ones_like(y[:, :1]), y], 1)[:, :, None, None] > 0.5  # (B, C+1, 1, 1)
    # Eq. (3)  s = softmax_c(S) * [1 | y] / sum: the same as a softmax over the kept logits only,
    # which stays exact when an absent class dominates (the product form underflows to 0 / 0)
    return torch.softmax(S_t.float().masked_fill(~keep, float("-inf")), 1)


def aux_weights(args: Args, epoch: int) -> tuple[float, float, float]:
    """Eq. (14) lambdas: 0 during warm-up; lambda_s2c ramps 0.1 -> 1 (Sec. 4, official linear_schedule)."""
    if epoch < args.warmup_epochs:
        return 0.0, 0.0, 0.0
    span = max(args.epochs - args.warmup_epochs, 1)
    ramp = args.s2c_ramp_start + (1 - args.s2c_ramp_start) * (epoch - args.warmup_epochs) / span
    return (args.w_s2c * ramp * args.s2c, args.w_u * args.u, args.w_m * args.m)


def unreliable_ratio(args: Args, epoch: int) -> float:
    """Sec. 4: alpha_t = rho_t = 20% at epoch 0, decreasing linearly towards 0."""
    return args.unreliable * (1 - epoch / args.epochs)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, step: int, args: Args) -> None:
    """Sec. 3.2.6 mean teacher; step = optimiser steps taken. Copy while epoch <= W, then EMA."""
    epoch = (step - 1) // args.steps_per_epoch
    if epoch <= args.warmup_epochs:
        d = 0.0
    else:
        # Impl. (lucasdavid/wsss-csrm, scripts/ss/train_csrm.py): momentum ramp capped at 0.99
        d = min(1 - 1 / (1 + step - args.warmup_epochs * args.steps_per_epoch), args.ema)
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        p_t.mul_(d).add_(p_s.detach(), alpha=1 - d)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def make_transform(args: Args, kind: str, crop: int):
    """kind: 'strong' (CSRM l-half), 'weak' (u-half: pad + crop), 'cam' / 'seg' (rescale, crop, flip)."""
    def transform(sample, rng):
        image = sample["image"]
        masks = (sample["pseudo"],) if "pseudo" in sample else ()
        if kind != "weak":
            image, masks, _ = augment.random_rescale(image, rng, masks=masks, ratio_range=(args.scale_min, args.scale_max))
        # Impl. (lucasdavid/PNOC, batch_transform): images are reflect-padded to the crop, labels 255
        image, masks, _, _ = augment.random_crop(image, rng, size=crop, masks=masks, image_fill="reflect")
        if kind == "strong":
            # Impl. (lucasdavid/PNOC, tools/ai/augment_utils.py batch_transform): jitter p 0.8, blur p 0.5
            image = augment.color_jitter(image, rng, brightness=0.25, contrast=0.25, saturation=0.25, hue=0.25, p=0.8)
            image = augment.gaussian_blur(image, rng, p=0.5, radius=(0.15, 1.15))
        if kind != "weak":
            image, masks, _ = augment.random_hflip(image, rng, masks=masks)
        image = np.array(image)  # writable, contiguous copy
        out = {"image": torch.as_tensor(augment.to_tensor(image)), "rgb": torch.from_numpy(image),
               "label": torch.as_tensor(sample["label"])}
        if masks:
            out["mask"] = torch.as_tensor(augment.mask_to_tensor(masks[0]))
        return out
    return transform


def foreground_indices(ds) -> list[int]:
    """Images without foreground labels are skipped (official: ignore_bg_images)."""
    return [int(i) for i in np.nonzero(ds.labels().sum(1) > 0)[0]]


class BatchStream:
    """Endless shuffled batches; batch k is a pure function of (seed, k), so a resumed run restarts
    at the same batch. Each pass over the data is a new DataLoader with set_epoch(pass)."""

    def __init__(self, ds, indices, batch_size, seed, start, ctx, workers):
        self.ds, self.indices, self.bs, self.seed, self.ctx, self.workers = ds, np.asarray(indices), batch_size, seed, ctx, workers
        per_rank = len(self.indices) // ctx.world
        self.nb = per_rank // batch_size
        if self.nb == 0:
            raise data.DataError(f"only {len(self.indices)} usable images for batches of {batch_size} x {ctx.world} "
                                 "process(es); lower the batch size or use more images")
        self.k = start

    def __iter__(self):
        while True:
            p, b = divmod(self.k, self.nb)
            perm = self.indices[np.random.default_rng((self.seed, p)).permutation(len(self.indices))]
            mine = perm[self.ctx.rank:: self.ctx.world][: self.nb * self.bs][b * self.bs:]
            self.ds.set_epoch(p)
            g = torch.Generator().manual_seed(self.seed * 1000 + p)
            loader = torch.utils.data.DataLoader(self.ds, batch_size=self.bs, sampler=mine.tolist(), num_workers=self.workers,
                                                 generator=g, worker_init_fn=seed_worker, drop_last=True)
            for batch in loader:
                self.k += 1
                yield batch


def seed_worker(worker_id):
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


# ----------------------------------------------------------------------------------------------
# Run context, logging, checkpoints
# ----------------------------------------------------------------------------------------------
class Ctx:
    """Per-process facts: device, DDP rank/world, run folder, logging, stop-after counter."""

    def __init__(self, args: Args, spec, splits, run_dir: Path | None):
        self.args, self.spec, self.splits, self.run_dir = args, spec, splits, run_dir
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            self.device = torch.device("cuda", local)
        else:
            self.device = torch.device("cpu")
        self.amp = args.amp and self.device.type == "cuda"
        self.main = self.rank == 0
        self.iters_done = 0
        self.results: dict = {}  # metrics so far, carried through checkpoints
        self.done: list = []  # finished stages
        self.t0, self.prior_seconds = time.time(), 0.0
        self.cam_weights: dict | None = None  # stage-0 (or --init-ckpt) {backbone, classifier}

    def seconds(self) -> float:
        return self.prior_seconds + time.time() - self.t0

    def reseed(self, salt: int, per_rank: bool) -> None:
        """Same seed on every rank for model construction; per-rank seeds for data-dependent draws."""
        seed_everything(self.args.seed * 1000 + salt + (self.rank if per_rank else 0), self.args.deterministic)

    def log(self, record: dict, echo: bool = True):
        if not self.main:
            return
        record = {**record, "time": round(self.seconds(), 1)}
        if echo:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
        if self.run_dir is not None:
            with open(self.run_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def barrier(self):
        if self.world > 1:
            dist.barrier()


class StopRun(Exception):
    pass


class NonFinite(Exception):
    pass


def save_checkpoint(ctx: Ctx, payload: dict) -> None:
    """checkpoints/last.pt, written atomically (temp file + rename)."""
    if not ctx.main or ctx.run_dir is None:
        return
    path = ctx.run_dir / "checkpoints" / "last.pt"
    path.parent.mkdir(exist_ok=True)
    payload = {**payload, "args": dataclasses.asdict(ctx.args), "results": ctx.results, "done": ctx.done,
               "seconds": ctx.seconds(), "cam_weights": ctx.cam_weights,
               "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                       "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tick(ctx: Ctx, save_fn) -> None:
    """Count one training iteration; honour --stop-after (save, then stop as if interrupted)."""
    ctx.iters_done += 1
    if ctx.args.stop_after and ctx.iters_done >= ctx.args.stop_after:
        save_fn()
        raise StopRun


def stage_length(args: Args, nominal: int) -> int:
    return min(nominal, args.max_iters) if args.max_iters else nominal


def poly(total: int):
    return lambda g: (1 - min(g, total) / total) ** 0.9  # official PolyOptimizer, power 0.9


def wrap_ddp(model: nn.Module, ctx: Ctx) -> nn.Module:
    if ctx.world == 1:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)


def check_finite(losses: dict, step: int) -> None:
    for name, v in losses.items():
        v = v.detach() if torch.is_tensor(v) else v
        if not math.isfinite(float(v)):
            raise NonFinite(f"non-finite loss {name}={float(v)} at iteration {step}; lower the learning rate or disable --amp")


# ----------------------------------------------------------------------------------------------
# Stage 0: plain CAM classifier (card 9)
# ----------------------------------------------------------------------------------------------
def train_cam(ctx: Ctx, state: dict) -> dict:
    """Backbone + 1x1 classifier with the multi-label soft-margin loss; BN trains normally here."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset,
                         transform=make_transform(args, "cam", args.crop), seed=args.seed)
    idx = foreground_indices(ds)
    bs = args.cam_batch // ctx.world
    total = stage_length(args, args.cam_epochs * max(len(idx) // args.cam_batch, 1))
    ctx.reseed(1, per_rank=False)
    model = CAMNet(args.backbone, ds.num_classes - 1, args.pretrained, args.weights).to(ctx.device)
    # Impl. (lucasdavid/PNOC, scripts/cam/train_vanilla.py): classifier x10, backbone biases x2, no decay
    groups = [
        {"params": [p for n, p in model.backbone.named_parameters() if not n.endswith("bias")], "lr": args.cam_lr, "weight_decay": args.wd},
        {"params": [p for n, p in model.backbone.named_parameters() if n.endswith("bias")], "lr": 2 * args.cam_lr, "weight_decay": 0.0},
        {"params": list(model.classifier.parameters()), "lr": 10 * args.cam_lr, "weight_decay": args.wd},
    ]
    opt = torch.optim.SGD(groups, lr=args.cam_lr, momentum=0.9, weight_decay=args.wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly(total))
    start = 0
    ctx.reseed(2, per_rank=True)
    if state:
        model.load_state_dict(state["cam_model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["iter"]
        restore_rng(state["rng"])
    net = wrap_ddp(model, ctx)
    stream = iter(BatchStream(ds, idx, bs, args.seed, start, ctx, args.workers))
    bar = tqdm(range(start, total), desc="stage 0 (CAM)", disable=not ctx.main, leave=False)

    def save(it):
        save_checkpoint(ctx, {"stage": "cam", "iter": it, "cam_model": model.state_dict(),
                              "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    for it in bar:
        batch = next(stream)
        x, y = batch["image"].to(ctx.device), batch["label"].to(ctx.device)
        net.train()
        with torch.autocast("cuda", enabled=ctx.amp):
            z = net(x)["cls_logits"]
        # Eq. (5) without smoothing: the plain CAM pretraining loss
        loss = loss_cls(z, y, 0.0)
        check_finite({"losses/cam_cls": loss}, it + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ctx.main and ((it + 1) % 10 == 0 or it + 1 == total):
            ctx.log({"stage": "cam", "iter": it + 1, "losses/cls": loss.item(), "lr": sched.get_last_lr()[0]}, echo=False)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (it + 1) % args.ckpt_every == 0:
            save(it + 1)
        tick(ctx, lambda: save(it + 1))
    return {"backbone": model.backbone.state_dict(), "classifier": model.classifier.state_dict()}


# ----------------------------------------------------------------------------------------------
# Stage 1: CSRM training (Sec. 3.2, Sec. 4)
# ----------------------------------------------------------------------------------------------
def build_csrm(args: Args, num_classes: int, cam_weights: dict | None, device) -> tuple[CSRMNet, CSRMNet]:
    """Student restored from the CAM weights (backbone + classifier); new heads keep Kaiming init."""
    student = CSRMNet(args.backbone, num_classes, args.width, args.low_width, args.rep_dim,
                      args.pretrained and cam_weights is None, args.weights if cam_weights is None else "")
    if cam_weights is not None:
        student.backbone.load_state_dict(cam_weights["backbone"], strict=False)
        student.classifier.load_state_dict(cam_weights["classifier"])
    student.freeze(args.frozen_stages).to(device)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return student, teacher


def csrm_optimizer(args: Args, student: CSRMNet) -> torch.optim.SGD:
    """Sec. 4: pretrained parts at lr, new heads at 10x; weight decay on weights only (official)."""
    pre = {id(p) for p in student.pretrained_parameters()}
    groups = {(a, b): [] for a in (True, False) for b in (True, False)}
    for n, p in student.named_parameters():
        if p.requires_grad:
            groups[(id(p) in pre, n.endswith("bias"))].append(p)
    return torch.optim.SGD(
        [{"params": ps, "lr": args.lr * (1 if is_pre else args.lr_new_mult), "weight_decay": 0.0 if is_bias else args.wd}
         for (is_pre, is_bias), ps in groups.items() if ps],
        lr=args.lr, momentum=0.9, nesterov=True)


def csrm_step(args: Args, ctx: Ctx, student, teacher: CSRMNet, optimizer, scaler, bank: MemoryBank,
              batch_l: dict, batch_u: dict, step: int, pool=None) -> dict:
    """One CSRM iteration (card 2): two teacher passes, ClassMix, Eq. (14), SGD step, EMA.

    step: 0-based iteration. Returns the logged scalars."""
    dev = ctx.device
    B = batch_l["image"].shape[0]
    x = torch.cat([batch_l["image"], batch_u["image"]]).to(dev)  # (2B, 3, H, W)
    y = torch.cat([batch_l["label"], batch_u["label"]]).to(dev).float()  # (2B, C)
    rgb = torch.cat([batch_l["rgb"], batch_u["rgb"]]).numpy()  # (2B, H, W, 3) uint8 crops for the dCRF
    epoch = step // args.steps_per_epoch
    w_s2c, w_u, w_m = aux_weights(args, epoch)
    crf_params = {**crf.PRESETS["irn"], "n_iters": args.crf_iters} if args.crf_iters > 0 else None

    # Teacher pass 1 (eval mode, un-mixed input): pseudo labels and the logits that get mixed
    teacher.eval()
    with torch.no_grad(), torch.autocast("cuda", enabled=ctx.amp):
        out_t = teacher(x, seg=True, rep=False)
    A_t, S_t = out_t["cam"].float(), out_t["seg"].float()
    PL = cam_pseudo_labels(rgb, y, A_t, args.bg_thr, args.fg_thr, crf_params, pool)  # (2B, H, W)
    present_u = torch.cat([torch.ones_like(y[B:, :1]), y[B:]], 1) > 0.5  # un-mixed loader labels (B, K)
    mixed = bool(torch.rand(()) < args.mix_prob)  # one draw per step for the whole batch
    if mixed:
        x, y, PL, S_t, _ = classmix(x, y, PL, S_t)
    P_t = restricted_probs(S_t, y)  # (2B, K, H, W)
    Yhat_t = P_t.argmax(1)  # (2B, H, W), never an absent class

    use_rep = w_m > 0
    student.train()
    with torch.autocast("cuda", enabled=ctx.amp):
        out = student(x, seg=True, rep=use_rep)
    S, A = out["seg"], out["cam"]

    losses = {"losses/cls": loss_cls(out["cls_logits"], y, args.label_smoothing),
              "losses/seg": loss_seg(S[:B], PL[:B], args.label_smoothing)}
    if w_s2c > 0:
        losses["losses/s2c"] = loss_s2c(S, A, P_t, args.s2c_sigma, args.label_smoothing)
    if w_u > 0 or w_m > 0:
        # Teacher pass 2 (train mode, dropout on, mixed input): entropies, ranks and keys
        teacher.train()
        with torch.no_grad(), torch.autocast("cuda", enabled=ctx.amp):
            out_t2 = teacher(x, seg=True, rep=use_rep)
        rho = unreliable_ratio(args, epoch)
        if w_u > 0:
            # Eq. (10) on the full-resolution u-half
            H_u = entropy(torch.softmax(out_t2["seg"][B:].float(), 1))  # (B, H, W)
            losses["losses/u"] = loss_unsup(S[B:], Yhat_t[B:], H_u, rho)
        if w_m > 0:
            prob4 = torch.softmax(out_t2["seg4"].float(), 1)  # (2B, K, h4, w4), unrestricted
            h4 = prob4.shape[-2:]
            down = lambda t: F.interpolate(t[:, None].float(), size=h4, mode="nearest")[:, 0].long()
            labels4 = torch.cat([down(PL[:B]), down(Yhat_t[B:])])  # (2B, h4, w4)
            # Eq. (10) at stride 4; Eq. (11) quantiles over the u-half's pixels
            H4_u = entropy(prob4[B:])
            low_u, high_u = H4_u < quantile(H4_u, rho), H4_u >= quantile(H4_u, 1 - rho)
            sure_l = labels4[:B] != 255
            low, high = torch.cat([sure_l, low_u]), torch.cat([sure_l, high_u])
            losses["losses/m"] = loss_contrast(out["rep"], out_t2["rep"], prob4, labels4, low, high, present_u, B, bank, args)
    # Eq. (14)  L = L_c + L_s + l_s2c L_s2c + l_u L_u + l_m L_m
    weights = {"losses/cls": 1.0, "losses/seg": 1.0, "losses/s2c": w_s2c, "losses/u": w_u, "losses/m": w_m}
    total = sum(weights[k] * v for k, v in losses.items())
    losses["losses/total"] = total
    check_finite(losses, step + 1)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    ema_update(teacher, student.module if hasattr(student, "module") else student, step + 1, args)

    reliable = (PL[:B] != 255).float().mean().item()
    return {**{k: float(v.detach()) for k, v in losses.items()}, "pl/reliable": reliable, "mixed": int(mixed),
            "w/s2c": w_s2c, "w/u": w_u, "w/m": w_m}


def train_csrm(ctx: Ctx, state: dict, cam_weights: dict) -> dict:
    """Sec. 4: E "epochs" of S_e steps, two loaders (augmented l-half, plain u-half), poly SGD."""
    args = ctx.args
    root, split = ctx.spec.root, ctx.splits["train"]
    ds_l = data.SegDataset(root, split, dataset=ctx.spec.dataset, transform=make_transform(args, "strong", args.crop), seed=args.seed)
    ds_u = data.SegDataset(root, split, dataset=ctx.spec.dataset, transform=make_transform(args, "weak", args.crop), seed=args.seed + 1)
    idx = foreground_indices(ds_l)
    C = ds_l.num_classes - 1
    ctx.reseed(3, per_rank=False)
    student, teacher = build_csrm(args, C, cam_weights, ctx.device)
    optimizer = csrm_optimizer(args, student)
    total = stage_length(args, args.epochs * args.steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, poly(total))
    scaler = torch.amp.GradScaler("cuda", enabled=ctx.amp)
    bank = MemoryBank(C + 1, args.rep_dim, args.bank, args.bank_bg)
    start = 0
    ctx.reseed(4, per_rank=True)
    if state:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        bank.load_state_dict(state["bank"])
        start = state["iter"]
        restore_rng(state["rng"])
    net = wrap_ddp(student, ctx)
    bs = args.batch_size // ctx.world
    stream_l = iter(BatchStream(ds_l, idx, bs, args.seed, start, ctx, args.workers))
    stream_u = iter(BatchStream(ds_u, idx, bs, args.seed + 7919, start, ctx, args.workers))
    val_ds = data.SegDataset(root, ctx.splits["seed"], dataset=ctx.spec.dataset, seed=args.seed)
    pool = ThreadPool(args.crf_workers) if args.crf_workers > 0 else None

    def save(it):
        save_checkpoint(ctx, {"stage": "csrm", "iter": it, "student": student.state_dict(),
                              "teacher": teacher.state_dict(), "optimizer": optimizer.state_dict(),
                              "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                              "bank": bank.state_dict()})
    if start == 0 and ctx.main:
        ctx.log({"stage": "csrm", "epoch": 0, **validate_teacher(args, ctx, teacher, val_ds)})
    bar = tqdm(range(start, total), desc="stage 1 (CSRM)", disable=not ctx.main, leave=False)
    for it in bar:
        stats = csrm_step(args, ctx, net, teacher, optimizer, scaler, bank, next(stream_l), next(stream_u), it, pool)
        sched.step()
        if ctx.main:
            ctx.log({"stage": "csrm", "iter": it + 1, "lr": sched.get_last_lr()[0], **stats}, echo=False)
            bar.set_postfix(ls=f"{stats['losses/seg']:.3f}", rel=f"{stats['pl/reliable']:.2f}")
        if (it + 1) % args.steps_per_epoch == 0 or it + 1 == total:
            if ctx.main:  # per-epoch validation of the teacher (official: VOC train)
                ctx.log({"stage": "csrm", "epoch": (it + 1) / args.steps_per_epoch, **validate_teacher(args, ctx, teacher, val_ds)})
            ctx.barrier()
        if (it + 1) % args.ckpt_every == 0:
            save(it + 1)
        tick(ctx, lambda: save(it + 1))
    if pool is not None:
        pool.close()
    return teacher.state_dict()


# ----------------------------------------------------------------------------------------------
# Inference and evaluation (Sec. 4; card 7)
# ----------------------------------------------------------------------------------------------
def image_tensor(image: np.ndarray, device) -> torch.Tensor:
    return torch.as_tensor(augment.to_tensor(np.ascontiguousarray(image)))[None].to(device)  # (1, 3, H, W)


@torch.no_grad()
def tta_cams(model: CSRMNet, x: torch.Tensor, scales, flip: bool) -> torch.Tensor:
    """Sum over scales (and flips) of ReLU CAMs at (H, W); x (1, 3, H, W) -> (C, H, W)."""
    H, W = x.shape[-2:]
    Hp, Wp = math.ceil(H / 16) * 16, math.ceil(W / 16) * 16
    acc = 0
    for s in scales:
        xs = F.interpolate(x, size=(round(H * s), round(W * s)), mode="bicubic", align_corners=False) if s != 1 else x
        inp = torch.cat([xs, xs.flip(-1)]) if flip else xs
        A = F.relu(model(inp, seg=False, rep=False)["cam"].float())  # (1|2, C, h, w)
        A = A[0] + A[1].flip(-1) if flip else A[0]
        # Impl. (lucasdavid/PNOC, scripts/cam/inference.py): upsample to (H, W) rounded up to 16, crop
        acc = acc + F.interpolate(A[None], size=(Hp, Wp), mode="bilinear", align_corners=False)[0, :, :H, :W]
    return acc


@torch.no_grad()
def tta_seg(model: nn.Module, x: torch.Tensor, scales, flip: bool) -> torch.Tensor:
    """Seg logits averaged over scales and flips; x (1, 3, H, W) -> (K, H, W)."""
    H, W = x.shape[-2:]
    acc = 0
    for s in scales:
        xs = F.interpolate(x, size=(round(H * s), round(W * s)), mode="bicubic", align_corners=False) if s != 1 else x
        inp = torch.cat([xs, xs.flip(-1)]) if flip else xs
        logits = model(inp).float()
        logits = logits[0] + logits[1].flip(-1) if flip else logits[0]
        acc = acc + F.interpolate(logits[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return acc / len(scales)


@torch.no_grad()
def validate_teacher(args: Args, ctx: Ctx, teacher: CSRMNet, ds) -> dict:
    """Per-epoch validation (official): CAM mIoU at the best threshold of 0.10-0.45, seg-branch mIoU."""
    teacher.eval()
    K = ds.num_classes
    sweep = miou.ThresholdSweep(K, thresholds=np.round(np.arange(0.10, 0.451, 0.05), 2))
    cm = miou.ConfusionMatrix(K)
    for i in range(min(args.val_images, len(ds))):
        sample = ds[i]
        x = image_tensor(sample["image"], ctx.device)
        out = teacher(x, seg=True, rep=False)
        keys = np.nonzero(sample["label"] > 0.5)[0]
        cams = normalize_cam(out["cam"])[0, keys]
        cams = F.interpolate(cams[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
        sweep.update(cams.cpu().numpy(), keys + 1, sample["mask"])
        cm.update(out["seg"][0].argmax(0).cpu().numpy(), sample["mask"])
    res = sweep.compute()
    return {"val/cam_miou": 100 * res["best"]["miou"], "val/cam_thr": res["best_threshold"],
            "val/seg_miou": 100 * cm.compute()["miou"]}


def percent(result: dict, class_names, **extra) -> dict:
    iou = {n: (None if np.isnan(v) else round(100 * float(v), 2)) for n, v in zip(class_names, result["iou"])}
    return {"miou": round(100 * float(result["miou"]), 2), "iou": iou, **extra}


@torch.no_grad()
def make_pseudo_labels(ctx: Ctx, teacher: CSRMNet, out_dir: Path) -> dict:
    """Sec. 4 inference: TTA CAMs of the teacher -> present classes / max -> threshold -> dCRF -> PNG.

    Writes pseudo_labels/{pseudo,pseudo_crf}/<split>/<id>.png; returns cam/, pseudo/, pseudo_crf/
    metrics on the seed split and val (GT never used for anything but scoring)."""
    args = ctx.args
    teacher.eval()
    scales = tta_scales(args)
    crf_params = {**crf.PRESETS["irn"], "n_iters": args.crf_iters} if args.pl_crf and args.crf_iters > 0 else None
    seed_ids = set(data.split_ids(ctx.spec.root, ctx.splits["seed"], dataset=ctx.spec.dataset))
    results = {}
    for split, key in ((ctx.splits["train"], "train"), (ctx.splits["val"], "val")):
        ds = data.SegDataset(ctx.spec.root, split, dataset=ctx.spec.dataset, seed=args.seed)
        K, names = ds.num_classes, ds.class_names
        sweep = miou.ThresholdSweep(K, thresholds=np.round(np.arange(0.05, 0.801, 0.05), 2))
        cm, cm_crf = miou.ConfusionMatrix(K), miou.ConfusionMatrix(K)
        for i in tqdm(range(len(ds)), desc=f"pseudo labels {split}", disable=not ctx.main, leave=False):
            sample = ds[i]
            name, image = sample["name"], sample["image"]
            keys = np.nonzero(sample["label"] > 0.5)[0]
            cams = tta_cams(teacher, image_tensor(image, ctx.device), scales, args.tta_flip)[keys]  # (m, H, W)
            cams = (cams / (cams.amax((1, 2), keepdim=True) + 1e-5)).cpu().numpy()
            # background score pl_thr, argmax over [bg, present classes]; index -> class id
            idx = np.concatenate([np.full((1,) + image.shape[:2], args.pl_thr, np.float32), cams]).argmax(0)
            ids = np.concatenate([[0], keys + 1]).astype(np.uint8)
            label = ids[idx]
            data.save_mask(out_dir / "pseudo" / split / f"{name}.png", label)
            if crf_params is not None:
                # np.array copy: pydensecrf rejects read-only buffers (read_image; see /tmp/common_bugs.txt)
                label_crf = ids[crf.refine_labels(np.array(image), idx, len(ids), gt_prob=0.7, **crf_params)]
                data.save_mask(out_dir / "pseudo_crf" / split / f"{name}.png", label_crf)
            scored = "mask" in sample and (key == "val" or name in seed_ids)
            if scored:
                sweep.update(cams, keys + 1, sample["mask"])
                cm.update(label, sample["mask"])
                if crf_params is not None:
                    cm_crf.update(label_crf, sample["mask"])
        if key == "train" or split != ctx.splits["train"]:
            sw = sweep.compute()
            results[f"cam/{key}"] = percent(sw["best"], names, threshold=sw["best_threshold"],
                                            curve=[[t, round(100 * m, 2)] for t, m in sw["curve"]])
            results[f"pseudo/{key}"] = percent(cm.compute(), names, threshold=args.pl_thr)
            if crf_params is not None:
                results[f"pseudo_crf/{key}"] = percent(cm_crf.compute(), names, threshold=args.pl_thr)
    return results


@torch.no_grad()
def cam_miou(ctx: Ctx, model: nn.Module, split: str) -> dict:
    """Threshold-swept CAM mIoU of a stage-0 CAMNet (Table 2 row 1: the start point)."""
    ds = data.SegDataset(ctx.spec.root, split, dataset=ctx.spec.dataset, seed=ctx.args.seed)
    sweep = miou.ThresholdSweep(ds.num_classes, thresholds=np.round(np.arange(0.05, 0.801, 0.05), 2))
    model.eval()
    for i in tqdm(range(len(ds)), desc="stage-0 CAMs", disable=not ctx.main, leave=False):
        sample = ds[i]
        keys = np.nonzero(sample["label"] > 0.5)[0]
        x = image_tensor(sample["image"], ctx.device)
        cams = tta_cams(model, x, tta_scales(ctx.args), ctx.args.tta_flip)[keys]
        cams = cams / (cams.amax((1, 2), keepdim=True) + 1e-5)
        sweep.update(cams.cpu().numpy(), keys + 1, sample["mask"])
    sw = sweep.compute()
    return percent(sw["best"], ds.class_names, threshold=sw["best_threshold"])


# ----------------------------------------------------------------------------------------------
# Verification (Sec. 4): a segmentation network trained on the pseudo labels
# ----------------------------------------------------------------------------------------------
def train_verify(ctx: Ctx, state: dict, pl_dir: Path, teacher_state: dict) -> SegNet:
    """DeepLabV3+ on the train pseudo labels (PNOC scripts/segmentation/train.py settings)."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, extra_dirs={"pseudo": pl_dir},
                         transform=make_transform(args, "seg", args.crop), seed=args.seed)
    ctx.reseed(5, per_rank=False)
    imagenet = args.seg_init == "imagenet"
    model = SegNet(args.seg_backbone, ds.num_classes, args.width, args.low_width, args.pretrained and imagenet,
                   args.seg_weights if imagenet else "")
    if not imagenet:
        # Deviation 15 (toy): no ImageNet weights exist there, so the stage-0 backbone stands in for them
        model.backbone.load_state_dict(ctx.cam_weights["backbone"])
    model.to(ctx.device)
    pre = {id(p) for p in model.backbone.parameters()}
    groups = {(a, b): [] for a in (True, False) for b in (True, False)}
    for n, p in model.named_parameters():
        groups[(id(p) in pre, n.endswith("bias"))].append(p)
    opt = torch.optim.SGD([{"params": ps, "lr": args.seg_lr * (1 if a else args.lr_new_mult), "weight_decay": 0.0 if b else args.seg_wd}
                           for (a, b), ps in groups.items() if ps], lr=args.seg_lr, momentum=0.9, nesterov=True)
    total = stage_length(args, args.seg_epochs * max(len(ds) // args.seg_batch, 1))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, poly(total))
    start = 0
    ctx.reseed(6, per_rank=True)
    if state:
        model.load_state_dict(state["seg_model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["iter"]
        restore_rng(state["rng"])
    net = wrap_ddp(model, ctx)
    stream = iter(BatchStream(ds, range(len(ds)), args.seg_batch // ctx.world, args.seed + 31, start, ctx, args.workers))
    bar = tqdm(range(start, total), desc="verification (DeepLabV3+)", disable=not ctx.main, leave=False)

    def save(it):
        save_checkpoint(ctx, {"stage": "verify", "iter": it, "seg_model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "teacher": teacher_state})
    for it in bar:
        batch = next(stream)
        net.train()
        with torch.autocast("cuda", enabled=ctx.amp):
            logits = net(batch["image"].to(ctx.device))
        # PNOC scripts/segmentation/train.py: cross-entropy, ignore 255, label smoothing
        loss = F.cross_entropy(logits.float(), batch["mask"].to(ctx.device), ignore_index=255, label_smoothing=args.label_smoothing)
        check_finite({"losses/verify_seg": loss}, it + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if ctx.main and ((it + 1) % 10 == 0 or it + 1 == total):
            ctx.log({"stage": "verify", "iter": it + 1, "losses/seg": loss.item(), "lr": sched.get_last_lr()[0]}, echo=False)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if (it + 1) % args.ckpt_every == 0:
            save(it + 1)
        tick(ctx, lambda: save(it + 1))
    return model


@torch.no_grad()
def evaluate_seg(ctx: Ctx, model: nn.Module) -> tuple[dict, list]:
    """seg/val (single scale) and seg_ms/val (TTA scales + flip) of the verification network."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["val"], dataset=ctx.spec.dataset, seed=args.seed)
    model.eval()
    cm, cm_ms = miou.ConfusionMatrix(ds.num_classes), miou.ConfusionMatrix(ds.num_classes)
    preds = []
    for i in tqdm(range(len(ds)), desc="seg/val", disable=not ctx.main, leave=False):
        sample = ds[i]
        x = image_tensor(sample["image"], ctx.device)
        pred = tta_seg(model, x, [1.0], False).argmax(0).cpu().numpy()
        cm.update(pred, sample["mask"])
        cm_ms.update(tta_seg(model, x, tta_scales(args), args.tta_flip).argmax(0).cpu().numpy(), sample["mask"])
        if i < args.vis:
            preds.append(pred)
    return {"seg/val": percent(cm.compute(), ds.class_names), "seg_ms/val": percent(cm_ms.compute(), ds.class_names)}, preds


def write_vis(ctx: Ctx, teacher: CSRMNet, preds: list, pl_dir: Path) -> None:
    """vis/val.png: image | CAM heat-map | pseudo label | prediction | ground truth, one row per image."""
    ds = data.SegDataset(ctx.spec.root, ctx.splits["val"], dataset=ctx.spec.dataset)
    palette = data.voc_palette()
    rows = []
    for i, pred in enumerate(preds):
        sample = ds[i]
        image = sample["image"]
        keys = np.nonzero(sample["label"] > 0.5)[0]
        cams = tta_cams(teacher, image_tensor(image, ctx.device), [1.0], False)[keys]
        heat = (cams / (cams.amax((1, 2), keepdim=True) + 1e-5)).amax(0).cpu().numpy() if len(keys) else np.zeros(image.shape[:2])
        heat = np.stack([255 * heat, 64 * np.ones_like(heat), 255 * (1 - heat)], -1).astype(np.uint8)
        pl = np.asarray(Image.open(pl_dir / f"{sample['name']}.png"))
        rows.append(np.concatenate([image, heat, palette[pl], palette[pred], palette[sample["mask"]]], 1))
    if rows:
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        (ctx.run_dir / "vis").mkdir(exist_ok=True)
        Image.fromarray(np.concatenate(rows, 0)).save(ctx.run_dir / "vis" / "val.png")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def prepare(args: Args):
    """Validate flags and data, resolve the run folder; nothing is written yet."""
    check_args(args)
    spec = data.resolve_data(args.data)
    splits = data.default_splits(spec)
    for s in set(splits.values()):
        if not data.split_ids(spec.root, s, dataset=spec.dataset):
            raise data.DataError(f"split {s!r} of {spec.root} is empty; check ImageSets/Segmentation/{s}.txt")
    if args.resume:
        run_dir = Path(args.resume)
    elif args.out:
        run_dir = Path(args.out)
        if run_dir.exists() and any(run_dir.iterdir()):
            fail(f"--out {run_dir} exists and is not empty; pick a new folder or --resume {run_dir}")
    else:
        run_dir = Path("runs") / METHOD / f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"
    return spec, splits, run_dir


def run(args: Args) -> None:
    state = {}
    if args.resume:  # a resumed run continues with the configuration (and data) it was started with
        last = Path(args.resume) / "checkpoints" / "last.pt"
        if not last.is_file():
            fail(f"--resume {args.resume}: no checkpoints/last.pt there; pass the folder of an earlier run")
        state = torch.load(last, map_location="cpu", weights_only=False)
        args = Args(**{**state["args"], "resume": args.resume, "stop_after": args.stop_after, "workers": args.workers})
    spec, splits, run_dir = prepare(args)
    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False) if args.eval_only else None
    if ckpt is not None and "teacher" not in ckpt:
        fail(f"--ckpt {args.ckpt} holds no CSRM teacher; pass checkpoints/last.pt of a csrm run past stage 1")
    cam_weights = torch.load(args.init_ckpt, map_location="cpu", weights_only=False) if args.init_ckpt else None
    if cam_weights is not None and not (isinstance(cam_weights, dict) and {"backbone", "classifier"} <= set(cam_weights)):
        fail(f"--init-ckpt {args.init_ckpt} must be a dict with 'backbone' and 'classifier' state dicts")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for k in ("batch_size", "cam_batch", "seg_batch"):
        if getattr(args, k) % world:
            fail(f"--{k.replace('_', '-')} {getattr(args, k)} is not divisible by {world} processes")
    ctx = Ctx(args, spec, splits, run_dir)
    if world > 1:
        dist.init_process_group("nccl" if ctx.device.type == "cuda" else "gloo")
    ctx.reseed(0, per_rank=False)
    ctx.results, ctx.done = dict(state.get("results", {})), list(state.get("done", []))
    ctx.prior_seconds = float(state.get("seconds", 0.0))
    ctx.cam_weights = state.get("cam_weights", cam_weights)
    # the state of a stage interrupted mid-way (iter > 0) resumes that stage
    mid = state if state.get("iter", 0) > 0 else {}
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        if args.amp and not ctx.amp:
            print("note: --amp is ignored on CPU (float32 throughout)", flush=True)
    try:
        C = data.SegDataset(spec.root, splits["val"], dataset=spec.dataset).num_classes - 1
        pl_root = run_dir / "pseudo_labels"
        # -- stage 0 (CAM classifier) and stage 1 (CSRM), unless a teacher already exists
        if ckpt is not None:
            teacher_state = ckpt["teacher"]
        elif "csrm" in ctx.done:
            teacher_state = state["teacher"]
        else:
            if "cam" in ctx.done:
                cam_weights = state["cam_weights"]
            else:
                if cam_weights is None:
                    cam_weights = train_cam(ctx, mid if mid.get("stage") == "cam" else {})
                    if ctx.main:  # reusable start point: --init-ckpt <run>/checkpoints/cam.pt
                        tmp = run_dir / "checkpoints" / "cam.pt.tmp"
                        tmp.parent.mkdir(exist_ok=True)
                        torch.save(cam_weights, tmp)
                        os.replace(tmp, run_dir / "checkpoints" / "cam.pt")
                if ctx.main:  # Table 2 row 1: the start point's CAMs
                    cam_net = CAMNet(args.backbone, C).to(ctx.device)
                    cam_net.backbone.load_state_dict(cam_weights["backbone"])
                    cam_net.classifier.load_state_dict(cam_weights["classifier"])
                    ctx.results["cam_init/train"] = cam_miou(ctx, cam_net, splits["seed"])
                    ctx.log({"stage": "cam", "cam_init/train": ctx.results["cam_init/train"]["miou"]})
            ctx.done, ctx.cam_weights = ["cam"], cam_weights
            save_checkpoint(ctx, {"stage": "csrm", "iter": 0})
            teacher_state = train_csrm(ctx, mid if mid.get("stage") == "csrm" else {}, cam_weights)
            ctx.done = ["cam", "csrm"]
            save_checkpoint(ctx, {"stage": "infer", "iter": 0, "teacher": teacher_state})
        teacher = CSRMNet(args.backbone, C, args.width, args.low_width, args.rep_dim).freeze(args.frozen_stages)
        teacher.load_state_dict(teacher_state)
        teacher.to(ctx.device).eval()
        # -- pseudo labels (Sec. 4 inference) and their evaluation
        if "infer" not in ctx.done:
            if ctx.main:
                ctx.results.update(make_pseudo_labels(ctx, teacher, pl_root))
                for k in ("cam/train", "pseudo/train", "pseudo_crf/train", "pseudo/val", "pseudo_crf/val"):
                    if k in ctx.results:
                        ctx.log({"stage": "infer", k: ctx.results[k]["miou"]})
            ctx.barrier()
            ctx.done = ctx.done + ["infer"]
            save_checkpoint(ctx, {"stage": "verify", "iter": 0, "teacher": teacher_state})
        # -- verification: a segmentation network trained on the train pseudo labels
        pl_dir = pl_root / ("pseudo_crf" if args.pl_crf and args.crf_iters > 0 else "pseudo") / splits["train"]
        seg_state = ckpt.get("seg_model") if ckpt is not None else state.get("seg_model") if "verify" in ctx.done else None
        if ckpt is None and "verify" not in ctx.done:
            seg_state = train_verify(ctx, mid if mid.get("stage") == "verify" else {}, pl_dir, teacher_state).state_dict()
            ctx.done = ctx.done + ["verify"]
            save_checkpoint(ctx, {"stage": "done", "iter": 0, "teacher": teacher_state, "seg_model": seg_state})
        if ctx.main:
            if seg_state is not None:
                seg_model = SegNet(args.seg_backbone, C + 1, args.width, args.low_width)
                seg_model.load_state_dict(seg_state)
                seg_results, preds = evaluate_seg(ctx, seg_model.to(ctx.device))
                ctx.results.update(seg_results)
                write_vis(ctx, teacher, preds, pl_dir.parent / splits["val"])
            seconds = round(ctx.seconds(), 1)
            metrics = {"method": METHOD, "dataset": spec.name, "preset": args.preset, "device": ctx.device.type,
                       "seconds": seconds, "primary": "seg/val", "results": ctx.results}
            (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
            for k, v in ctx.results.items():
                print(f"{k}: mIoU={v['miou']:.2f}", flush=True)
            print(f"seconds: {seconds}", flush=True)
            primary = ctx.results.get("seg/val", {}).get("miou", float("nan"))
            print(f"RESULT {METHOD} seg/val mIoU={primary:.2f}", flush=True)
    except StopRun:
        if ctx.main:
            print(f"stopped after {ctx.iters_done} iterations (--stop-after); continue with --resume {run_dir}", flush=True)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except data.DataError as exc:
        fail(str(exc))
    except WeightsError as exc:
        fail(str(exc))
    except NonFinite as exc:
        fail(str(exc), code=1)


if __name__ == "__main__":
    main()
