"""Leveraging Auxiliary Tasks with Affinity Learning for Weakly Supervised Semantic Segmentation (AuxSegNet)
Lian Xu, Wanli Ouyang, Mohammed Bennamoun, Farid Boussaid, Ferdous Sohel, Dan Xu. ICCV 2021.
https://arxiv.org/abs/2107.11787    Official code: xulianuwa/AuxSegNet (PyTorch, VOC only).

What the paper does.  One shared backbone feeds three heads: multi-label classification (auxiliary;
it also gives the CAMs), saliency detection (auxiliary; trained on off-the-shelf saliency maps) and
semantic segmentation (primary; trained on pseudo labels made by fusing CAMs with saliency). The
saliency and segmentation branches each learn a non-local N x N affinity; a small self-attention
module mixes the two, entry by entry, into a cross-task affinity A_CT that refines both dense
predictions. Training runs in stages: after each stage A_CT propagates the CAMs and refines the
saliency map, and the fused result becomes the next stage's pseudo labels (iterative learning).

Reading guide (the project's paper file is the supplementary only; the method is in the card
../shared/methods/auxsegnet.md, cited as "card §n"):
    card §3 architecture           -> AuxSegNet, DenseBranch, CrossTaskAttention
    card §4 losses                 -> loss_cls(), loss_sal(), loss_seg(), total_loss()
    card §5 pseudo labels          -> normalize_cam(), propagate_cam(), saliency_crf(), fuse_cam_saliency(),
                                      make_pseudo_labels()
    card §2 stages, §6 schedule    -> run_training(), train_phase()
    card §7 inference              -> predict_probs(), evaluate_seg()
    supplementary Table 3 ablation -> --variant {baseline, mt, mt_ct, full}

Equation map.  The main paper's text (and so its equation numbers) is not in the project's paper
file, so the equations are numbered here in the card's order as Eq. (C1)...(C14) ("C" = card); the
numbers are ours, the formulas are the card's.
    Eq. (C1)  CAM_c(p) = w_c^T F(p) with the classifier's fc8 weights        -> AuxSegNet.forward()
    Eq. (C2)  L_cls = multi-label soft margin = mean BCE-with-logits           -> loss_cls()
    Eq. (C3)  A_t[i,j] = softmax_j( theta_t(X_t)_i . phi_t(X_t)_j )           -> task_affinity()
    Eq. (C4)  Y_t = X_t + W_t( A_t G_t(X_t) )                                 -> DenseBranch.enhance()
    Eq. (C5)  [Omega_seg, Omega_sal] = softmax_ch( conv1x1( ReLU( conv3x3([A_seg, A_sal]) ) ) )
                                                                              -> CrossTaskAttention.forward()
    Eq. (C6)  A_CT = Omega_seg * A_seg + Omega_sal * A_sal                     -> CrossTaskAttention.forward()
    Eq. (C7)  R_t(i) = sum_j A_CT[i,j] S_t(j)        (gather, on logits)       -> refine_by_affinity()
    Eq. (C8)  L_sal = BCE(up S_sal, B) + BCE(up R_sal, B),  B = 1[sal > 0.5]   -> loss_sal(), saliency_target()
    Eq. (C9)  L_seg = CE(up S_seg, Y) + CE(up R_seg, Y),  ignore 255           -> loss_seg()
    Eq. (C10) L = l1 L_cls + l2 L_sal + l3 L_seg                               -> total_loss()
    Eq. (C11) M_c = ReLU(CAM_c) / (max_p ReLU(CAM_c) + 1e-5)                   -> normalize_cam()
    Eq. (C12) M~ = A_CT M        (exactly one propagation step)                -> propagate_cam()
    Eq. (C13) SAL^{s+1} = CRF_sal( (sigmoid(R_sal)^ + SAL_0) / 2 ), unary
              U_fg = -log(a+eps) / (tau sigmoid(a)), U_bg = -log(1-a+eps) / (tau sigmoid(1-a))
                                                                              -> saliency_crf(), make_pseudo_labels()
    Eq. (C14) label = k+1 if (m > 0.2 and sal > 0.06); 0 if neither; 255 if exactly one
              (m, k = max / argmax over present classes)                       -> fuse_cam_saliency()

Deviations (each repeated at the code):
    1. Backbone: ResNet38d (MXNet ImageNet weights, not in timm) -> a timm ResNet with
       features_only=True, output_stride=8 (paper preset: wide_resnet50_2, 2048 ch; toy: resnet10t).
       --freeze-bn freezes BatchNorm as the official code does; its frozen stem conv is not reproduced.
    2. Decoder depth follows the official code (an extra 3x3 dil-18 conv + ReLU after the non-local
       enhancement, and the W_t projection of Eq. (C4)); the paper describes dil-6/12 convs, the module,
       then a 1x1 classifier (card §8.1-8.2).
    3. Refinement Eq. (C7) is applied to logits, as in the official code; the paper refines
       sigmoid/softmax outputs (card §8.3).
    4. Optimiser: the official code's effective setting (lr 7e-4, heads x10, SA module x1, momentum 0,
       weight decay 0: its PolyOptimizer passes weight decay into the momentum slot) instead of the
       paper's lr 1e-3 (card §6, §8.4-8.5); both flags are exposed.
    5. Labels of padded crop pixels are 255 and padded pixels are excluded from L_sal; the official code
       pads with background (0) -- reproduce it with --pad-as-background (card §8.7). The random rescale
       is drawn per image (the official code draws one per batch); no colour jitter, as in the code.
    6. Classification pre-training (15 epochs) is not in the official repo, which ships weights; its
       optimiser settings are the card's suggestion (lr 0.01, fc x10, batch 8, wd 5e-4, crop 448).
    7. Stage-0 CAMs: single scale by default (the paper/code do not say; --cam-scales/--cam-flip add
       multi-scale + flip); ReLU CAMs are upsampled to the image, averaged, then normalised (Eq. (C11)).
    8. Epochs per stage: 10 (paper) rather than 15 (official code); stages 0..3 as in the code. The
       label update after the last stage (run by the official driver) is skipped: it is never used.
    9. --max-iters caps every training phase (classification pre-training and each stage); warm-ups do
       not exist here, and the poly schedule is stretched over the capped length.
   10. Toy data: the saliency maps of the toy dataset are derived from its ground-truth masks (blur,
       noise, missed objects, false blobs), so toy mIoU says nothing about the method's merit.
   11. Data-parallel runs split --batch-size across processes (global batch unchanged); label updates
       and evaluation run on rank 0 only.
   12. Toy preset vs card §10: resnet10t instead of resnet18, crop 96 instead of 112, classification
       pre-training 2 epochs and 3 stages x 1 epoch (the card's 8 and 3 x 4 were sized for ~200 images;
       the toy set has 1000), stage lr 0.002 instead of 0.01 (0.01 diverged to NaN on the toy data).

Run:    python auxsegnet.py --data VOC2012                      (CUDA, paper settings; needs saliency maps)
        python auxsegnet.py --data COCO2014 --max-iters 40000    (COCO: the paper gives no schedule)
        python auxsegnet.py                                      (toy data, CPU, minutes)
        python auxsegnet.py --variant baseline|mt|mt_ct|full     (supplementary Table 3 rows)
"""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from common import augment, crf, data, miou

METHOD = "auxsegnet"
VARIANTS = ("baseline", "mt", "mt_ct", "full")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class Args:
    # -- common flags (DESIGN.md)
    data: str = "toy"  # DESIGN.md: toy | VOC2012 | COCO2014 | a path
    preset: str = field(default="auto", metadata={"choices": ("auto", "paper", "toy")})  # DESIGN.md
    out: Optional[str] = None  # DESIGN.md: default runs/auxsegnet/<data>-<time>
    device: str = field(default="auto", metadata={"choices": ("auto", "cpu", "cuda")})
    seed: int = 0
    workers: int = 4
    amp: bool = False  # torch.autocast fp16 on CUDA; ignored on CPU (with a note)
    deterministic: bool = False  # deterministic cuDNN kernels
    resume: Optional[str] = None  # RUN_DIR of an interrupted run
    eval_only: bool = False  # evaluate --ckpt and exit
    ckpt: Optional[str] = None  # checkpoint for --eval-only
    pretrained: bool = True  # ImageNet weights through timm (card §2: ImageNet-pretrained backbone)
    weights: Optional[str] = None  # local backbone state dict instead of timm's download
    max_iters: Optional[int] = None  # cap on the iterations of every training phase (Deviation 9)
    stop_after: Optional[int] = None  # testing aid: stop as if interrupted after N iterations
    log_every: int = 20
    ckpt_every: int = 500
    # -- method: variants and saliency input (card §3 variants, §9)
    variant: str = field(default="full", metadata={"choices": VARIANTS})  # supplementary Table 3 rows
    num_stages: Optional[int] = None  # card §6: 4 (stages 0..3) for full, 1 for the other variants
    saliency_dir: Optional[str] = None  # card §9: default <data root>/saliency
    # -- model (card §3)
    backbone: str = "wide_resnet50_2"  # Deviation 1 (paper: ResNet38d)
    freeze_bn: bool = True  # official network/resnet38d.py freezes all BN
    head_dim: int = 128  # official network/AuxSegNet.py: 128-ch branches
    dilations: list[int] = field(default_factory=lambda: [6, 12, 18])  # official: dil 6/12 (+18 after NL)
    # -- segmentation stages (card §6)
    epochs_per_stage: int = 10  # paper: 10 (official code: 15)
    crop_size: int = 321  # paper/code: 321
    batch_size: int = 4  # paper/code: 4
    lr: float = 7e-4  # official main.py (paper: 1e-3), Deviation 4
    head_lr_mult: float = 10.0  # official get_10x_lr_params
    momentum: float = 0.0  # official effective value (Deviation 4)
    weight_decay: float = 0.0  # official effective value (Deviation 4)
    poly_power: float = 0.9  # paper/code
    scale_range: list[float] = field(default_factory=lambda: [0.7, 1.3])  # official tool/exutils.py
    pad_as_background: bool = False  # official tool/exutils.py pads labels with 0 (Deviation 5)
    lambda_cls: float = 1.0  # official train_AuxAff.py loss weights
    lambda_sal: float = 1.0
    lambda_seg: float = 1.0
    # -- classification pre-training (card §6, Deviation 6)
    epochs_cls: int = 15  # paper
    cls_lr: float = 0.01  # card suggestion
    cls_momentum: float = 0.9  # card suggestion
    cls_weight_decay: float = 5e-4  # card suggestion
    cls_batch_size: int = 8  # card suggestion
    cls_crop_size: int = 448  # card suggestion
    # -- pseudo labels (card §5)
    cam_thresh: float = 0.2  # official tool/imutils.py fusion_cam
    sal_fuse_thresh: float = 0.06  # official fusion_cam
    sal_bin_thresh: float = 0.5  # official exutils: saliency target binarised at 0.5
    sal_crf: bool = True  # official step/gen_pgt.py crf_for_sal
    cam_scales: list[float] = field(default_factory=lambda: [1.0])  # Deviation 7
    cam_flip: bool = False  # Deviation 7
    # -- inference (card §7)
    eval_scales: list[float] = field(default_factory=lambda: [1.0])  # official infer_AuxAff.py: 1.0
    eval_flip: bool = False
    eval_crf: bool = False  # official crf_inference_inf (common.crf preset aux_mct)


PRESETS = {
    # Args' defaults are the VOC paper setting (card §6).
    "paper_voc": {},
    # Card §6: COCO uses the same recipe; 10 epochs on 82k images is ~205k iterations per stage,
    # so pass --max-iters.
    "paper_coco": {},
    # Card §10: small random-init backbone, trainable BN, short schedule, 2 CPU cores in minutes.
    # Deviation 12: resnet10t, crop 96 and 2 + 3 x 1 epochs on the 1000-image toy set (card §10 assumed ~200
    # images) keep the run within minutes on 2 cores; stage lr 0.002 because 0.01 (heads 0.1, momentum 0.9)
    # diverged (NaN in stage 0 of a measured toy run).
    "toy": dict(backbone="resnet10t", pretrained=False, freeze_bn=False, head_dim=64, dilations=[1, 2, 3],
                crop_size=96, batch_size=8, lr=0.002, momentum=0.9, weight_decay=1e-4,
                epochs_cls=2, cls_lr=0.01, cls_batch_size=8, cls_crop_size=96, epochs_per_stage=1,
                num_stages=3, workers=0, log_every=25),
}


HELP = {
    "data": "toy (default) | VOC2012 | COCO2014 | a dataset folder (VOC or COCO layout)",
    "preset": "auto = toy on the toy dataset, paper otherwise; every flag overrides its preset value",
    "variant": "supplementary Table 3 row: baseline (seg branch only) | mt (+cls +sal branches) | "
               "mt_ct (+cross-task affinity) | full (MT+CT+IL: --num-stages stages with label updates)",
    "num_stages": "training stages, each followed by a label update except the last (full only; paper 4)",
    "saliency_dir": "off-the-shelf saliency maps <DIR>/<id>.png (default <data root>/saliency); required",
    "max_iters": "cap on the iterations of every training phase (cls pre-training and each stage)",
    "stop_after": "testing aid: stop as if interrupted after N iterations (checkpoint written)",
    "pad_as_background": "pad crop labels with 0 and keep padded pixels in L_sal, as the official code does",
    "sal_crf": "1-iteration CRF on the updated saliency maps (official crf_for_sal)",
    "cam_scales": "scales of the stage-0 CAMs (averaged)",
    "eval_scales": "test scales; with more than one (or --eval-flip) seg_ms/val is reported too",
    "eval_crf": "dense CRF on the test probabilities (preset aux_mct): seg_crf/val",
    "amp": "fp16 autocast on CUDA (affinities stay fp32); ignored on CPU",
    "weights": "local backbone state dict (instead of --pretrained, which downloads through timm)",
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit 2), as every script of the project does."""

    def error(self, message):
        fail(message)


def fail(msg: str, code: int = 2):
    """One clear line on stderr and exit (2 = bad input); never a traceback."""
    print(f"{METHOD}.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def build_parser() -> ArgumentParser:
    """One flag per Args field; every default is None so that preset values can be told from flags."""
    p = ArgumentParser(prog=f"{METHOD}.py", description=__doc__.split("\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Args):
        name = "--" + f.name.replace("_", "-")
        kw = dict(default=None, dest=f.name, help=HELP.get(f.name))
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if f.type is bool:
            p.add_argument(name, action=argparse.BooleanOptionalAction, **kw)
        elif str(f.type).startswith("list"):
            p.add_argument(name, nargs="+", type=float if "float" in str(f.type) else int, **kw)
        else:
            base = {int: int, float: float, str: str}.get(f.type)
            if base is None:  # Optional[...]
                base = int if "int" in str(f.type) else str
            p.add_argument(name, type=base, **kw)
    return p


def resolve_args(ns: argparse.Namespace, spec) -> Args:
    """Args defaults <- preset <- explicit flags."""
    preset = ns.preset or "auto"
    if preset == "auto":
        preset = "toy" if is_toy(spec) else "paper"
    values = dataclasses.asdict(Args())
    if preset == "toy":
        values.update(PRESETS["toy"])
    else:
        values.update(PRESETS["paper_coco" if spec.dataset == "coco" else "paper_voc"])
    values.update({k: v for k, v in vars(ns).items() if v is not None})
    values["preset"] = preset
    if values["num_stages"] is None or values["variant"] != "full" and ns.num_stages is None:
        values["num_stages"] = 4 if values["variant"] == "full" else 1
    return Args(**values)


def validate_args(a: Args):
    """Nonsense hyper-parameters end with exit 2 before anything is written."""
    positive = ["batch_size", "crop_size", "cls_batch_size", "cls_crop_size", "head_dim", "num_stages",
                "log_every", "ckpt_every"]
    for k in positive:
        if getattr(a, k) < 1:
            fail(f"--{k.replace('_', '-')} must be >= 1 (got {getattr(a, k)})")
    for k in ["epochs_per_stage", "epochs_cls"]:
        if getattr(a, k) < 0:
            fail(f"--{k.replace('_', '-')} must be >= 0 (got {getattr(a, k)})")
    for k in ["lr", "cls_lr"]:
        if not getattr(a, k) > 0 or not math.isfinite(getattr(a, k)):
            fail(f"--{k.replace('_', '-')} must be a positive number (got {getattr(a, k)})")
    for k in ["momentum", "weight_decay", "cls_momentum", "cls_weight_decay", "head_lr_mult", "poly_power",
              "lambda_cls", "lambda_sal", "lambda_seg"]:
        if getattr(a, k) < 0:
            fail(f"--{k.replace('_', '-')} must be >= 0 (got {getattr(a, k)})")
    for k in ["cam_thresh", "sal_fuse_thresh", "sal_bin_thresh"]:
        if not 0.0 <= getattr(a, k) <= 1.0:
            fail(f"--{k.replace('_', '-')} must lie in [0, 1] (got {getattr(a, k)})")
    if len(a.dilations) != 3 or min(a.dilations) < 1:
        fail(f"--dilations takes three positive integers (got {a.dilations})")
    if len(a.scale_range) != 2 or not 0 < a.scale_range[0] <= a.scale_range[1]:
        fail(f"--scale-range takes MIN MAX with 0 < MIN <= MAX (got {a.scale_range})")
    for k in ["cam_scales", "eval_scales"]:
        if not getattr(a, k) or min(getattr(a, k)) <= 0:
            fail(f"--{k.replace('_', '-')} takes positive scales (got {getattr(a, k)})")
    if a.max_iters is not None and a.max_iters < 1:
        fail(f"--max-iters must be >= 1 (got {a.max_iters})")
    if a.stop_after is not None and a.stop_after < 1:
        fail(f"--stop-after must be >= 1 (got {a.stop_after})")
    if a.num_stages > 1 and a.variant != "full":
        fail(f"--num-stages {a.num_stages} needs --variant full: label updates use the cross-task affinity "
             f"and the classifier (variant '{a.variant}' trains stage 0 only)")
    if a.workers < 0:
        fail(f"--workers must be >= 0 (got {a.workers})")
    if (a.sal_crf or a.eval_crf) and not crf.available():
        fail("pydensecrf is not installed (pip install pydensecrf2); or pass --no-sal-crf and drop --eval-crf")


# ----------------------------------------------------------------------------------------------
# Model (card §3)
# ----------------------------------------------------------------------------------------------
def variant_tasks(variant: str):
    """Heads and affinity of each supplementary Table 3 row (card §9 variant mapping)."""
    if variant == "baseline":
        return ("seg",), "none"
    if variant == "mt":
        return ("cls", "sal", "seg"), "none"
    return ("cls", "sal", "seg"), "ct"


def task_affinity(theta_x: torch.Tensor, phi_x: torch.Tensor) -> torch.Tensor:
    """Eq. (C3): embedded-Gaussian non-local affinity, row-softmaxed, no 1/sqrt(d) scaling.
    theta_x, phi_x: (B, D, N) -> A: (B, N, N), A[b, i, :] sums to 1."""
    # Eq. (C3)  A_t[i, j] = exp(<theta_i, phi_j>) / sum_j' exp(<theta_i, phi_j'>)
    logits = torch.bmm(theta_x.transpose(1, 2).float(), phi_x.float())  # (B, N, N), fp32: fp16 overflows
    return torch.softmax(logits, dim=-1)


def refine_by_affinity(A: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """Eq. (C7): gather R(i) = sum_j A[i, j] S(j). A: (B, N, N); S: (B, K, h, w) -> (B, K, h, w).
    (The paper's "transpose" comes from writing predictions as K x N; A^T would scatter instead.)"""
    B, K, h, w = S.shape
    S_flat = S.float().flatten(2).transpose(1, 2)  # (B, N, K)
    # Eq. (C7)  R_t = A_CT S_t
    R = torch.bmm(A.float(), S_flat)  # (B, N, K)
    return R.transpose(1, 2).reshape(B, K, h, w)


class DenseBranch(nn.Module):
    """Saliency or segmentation branch (card §3): dil-d1/d2 convs -> non-local enhancement -> dil-d3 conv
    -> 1x1 classifier. Weights are not shared between the two tasks."""

    def __init__(self, in_ch: int, dim: int, out_ch: int, dilations, non_local: bool):
        super().__init__()
        d1, d2, d3 = dilations
        self.conv1 = nn.Conv2d(in_ch, dim, 3, padding=d1, dilation=d1)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=d2, dilation=d2)
        # Impl. (xulianuwa/AuxSegNet, network/AuxSegNet.py): extra dil-18 conv after the module (Deviation 2).
        self.conv3 = nn.Conv2d(dim, dim, 3, padding=d3, dilation=d3)
        self.conv4 = nn.Conv2d(dim, out_ch, 1, bias=False)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            nn.init.xavier_uniform_(conv.weight)  # Impl. (xulianuwa/AuxSegNet, network/AuxSegNet.py)
        self.non_local = non_local
        if non_local:  # theta/phi/G/W keep PyTorch's default init, as in the official code
            self.theta = nn.Conv2d(dim, dim, 1)
            self.phi = nn.Conv2d(dim, dim, 1)
            self.g = nn.Conv2d(dim, dim, 1)
            self.W = nn.Conv2d(dim, dim, 1)

    def features(self, feats: torch.Tensor) -> torch.Tensor:
        """X_t = ReLU(conv_d2(ReLU(conv_d1(F)))): (B, K, h, w) -> (B, dim, h, w)."""
        return F.relu(self.conv2(F.relu(self.conv1(feats))))

    def affinity(self, X: torch.Tensor) -> torch.Tensor:
        """Eq. (C3) on the features before enhancement: (B, dim, h, w) -> (B, N, N)."""
        return task_affinity(self.theta(X).flatten(2), self.phi(X).flatten(2))

    def enhance(self, X: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
        """Eq. (C4): Y_t = X_t + W_t(A_t G_t(X_t)); the attended features are gathered with A_t rows."""
        # Eq. (C4)  Y_t = X_t + W_t(A_t . G_t(X_t))
        attended = refine_by_affinity(A, self.g(X)).to(X.dtype)  # (B, dim, h, w)
        return X + self.W(attended)

    def predict(self, Y: torch.Tensor) -> torch.Tensor:
        """S_t = conv1x1(ReLU(conv_d3(Y))): (B, dim, h, w) -> (B, out_ch, h, w) logits."""
        return self.conv4(F.relu(self.conv3(Y)))


class CrossTaskAttention(nn.Module):
    """Eq. (C5)-(C6): the two affinities as a 2-channel N x N "image"; convs slide over the (i, j) grid."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2, 2, 1)

    def forward(self, A_seg: torch.Tensor, A_sal: torch.Tensor):
        """A_seg, A_sal: (B, N, N) -> A_CT (B, N, N), Omega (B, 2, N, N)."""
        stacked = torch.stack([A_seg, A_sal], dim=1).float()  # (B, 2, N, N)
        # Eq. (C5)  Omega = softmax over the 2 channels of conv1x1(ReLU(conv3x3([A_seg, A_sal])))
        omega = torch.softmax(self.conv2(F.relu(self.conv1(stacked))), dim=1)
        # Eq. (C6)  A_CT = Omega_seg * A_seg + Omega_sal * A_sal (rows need not sum to 1; not renormalised)
        A_ct = omega[:, 0] * stacked[:, 0] + omega[:, 1] * stacked[:, 1]
        return A_ct, omega


class AuxSegNet(nn.Module):
    """Shared stride-8 backbone + classification / saliency / segmentation heads (card §3).

    tasks ("cls", "sal", "seg") picks the heads; affinity "ct" adds the non-local modules, the
    self-attention fusion and the refinement (MT+CT), "none" leaves them out (baseline, MT)."""

    def __init__(self, backbone: str, num_classes: int, tasks=("cls", "sal", "seg"), affinity: str = "ct",
                 head_dim: int = 128, dilations=(6, 12, 18), pretrained: bool = False, freeze_bn: bool = False):
        super().__init__()
        self.tasks, self.affinity_kind, self.freeze_bn = tuple(tasks), affinity, freeze_bn
        # Deviation 1: timm backbone at output stride 8 instead of ResNet38d.
        self.backbone = timm.create_model(backbone, pretrained=pretrained, features_only=True,
                                          output_stride=8, out_indices=(-1,))
        K = self.backbone.feature_info.channels()[-1]
        if "cls" in tasks:
            self.dropout7 = nn.Dropout2d(0.5)
            self.fc8 = nn.Conv2d(K, num_classes - 1, 1, bias=False)  # C foreground classes, no bias
            nn.init.xavier_uniform_(self.fc8.weight)  # Impl. (xulianuwa/AuxSegNet, network/AuxSegNet.py)
        non_local = affinity == "ct"
        if "seg" in tasks:
            self.seg = DenseBranch(K, head_dim, num_classes, dilations, non_local)
        if "sal" in tasks:
            self.sal = DenseBranch(K, head_dim, 1, dilations, non_local)
        if non_local:
            self.cross_att = CrossTaskAttention()
        if freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def train(self, mode: bool = True):
        """Frozen BN stays in eval mode (official network/resnet38d.py `train`)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def param_groups(self):
        """(1x params, 10x params). Impl. (xulianuwa/AuxSegNet, network/AuxSegNet.py get_10x_lr_params):
        names containing seg/sal/fc8 get 10x; the SA module ("cross_att") and the backbone stay at 1x."""
        heads = [p for n, p in self.named_parameters()
                 if p.requires_grad and n.split(".")[0] in ("fc8", "seg", "sal")]
        base = [p for n, p in self.named_parameters()
                if p.requires_grad and n.split(".")[0] not in ("fc8", "seg", "sal")]
        return base, heads

    def forward(self, x: torch.Tensor) -> dict:
        """x: (B, 3, H, W) -> dict with, where the heads exist: cls_logits (B, C), cam (B, C, h, w),
        seg_init / seg_ref (B, C+1, h, w), sal_init / sal_ref (B, 1, h, w), A_seg / A_sal / A_ct (B, N, N),
        omega (B, 2, N, N). seg_ref is seg_init when there is no affinity (baseline, MT)."""
        feats = self.backbone(x)[-1]  # (B, K, h, w), h = ceil(H / 8)
        out = {}
        if "cls" in self.tasks:
            pooled = F.adaptive_avg_pool2d(self.dropout7(feats), 1)  # (B, K, 1, 1)
            out["cls_logits"] = self.fc8(pooled).flatten(1)  # (B, C)
            # Eq. (C1)  CAM_c(p) = w_c^T F(p), on the un-dropped features
            out["cam"] = F.conv2d(feats, self.fc8.weight)  # (B, C, h, w)
        X = {t: getattr(self, t).features(feats) for t in ("seg", "sal") if t in self.tasks}
        if self.affinity_kind == "ct":
            with torch.autocast(device_type=x.device.type, enabled=False):
                A = {t: getattr(self, t).affinity(X[t].float()) for t in X}  # Eq. (C3), (B, N, N)
                Y = {t: getattr(self, t).enhance(X[t].float(), A[t]) for t in X}  # Eq. (C4)
                S = {t: getattr(self, t).predict(Y[t]) for t in X}
                A_ct, omega = self.cross_att(A["seg"], A["sal"])  # Eq. (C5)-(C6)
                R = {t: refine_by_affinity(A_ct, S[t]) for t in S}  # Eq. (C7) on logits (Deviation 3)
            out.update(A_seg=A["seg"], A_sal=A["sal"], A_ct=A_ct, omega=omega)
        else:
            S = {t: getattr(self, t).predict(X[t]) for t in X}
            R = S
        for t in S:
            out[f"{t}_init"], out[f"{t}_ref"] = S[t], R[t]
        return out


def build_model(a: Args, num_classes: int, kind: str) -> AuxSegNet:
    """kind "cls": backbone + classifier for pre-training; "stage": the variant's network."""
    if kind == "cls":
        tasks, affinity = ("cls",), "none"
    else:
        tasks, affinity = variant_tasks(a.variant)
    return AuxSegNet(a.backbone, num_classes, tasks, affinity, a.head_dim, a.dilations,
                     pretrained=a.pretrained and a.weights is None, freeze_bn=a.freeze_bn)


def load_backbone_weights(model: AuxSegNet, path: str):
    """--weights FILE: a timm/torchvision-style state dict of the backbone (keys may carry a prefix)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.backbone.state_dict()
    matched = {}
    for k, v in state.items():
        for prefix in ("", "backbone.", "module.", "model."):
            kk = k[len(prefix):] if k.startswith(prefix) else None
            if kk is not None and kk in own and own[kk].shape == v.shape:
                matched[kk] = v
                break
    if not matched:
        raise ValueError("no tensor in the file matches the backbone")
    model.backbone.load_state_dict(matched, strict=False)
    return len(matched), len(own)


# ----------------------------------------------------------------------------------------------
# Losses (card §4)
# ----------------------------------------------------------------------------------------------
def loss_cls(cls_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Eq. (C2): multi-label soft margin = BCE-with-logits averaged over classes and batch. (B, C), (B, C)."""
    # Eq. (C2)  L_cls = -1/C sum_c [y_c log sig(z_c) + (1 - y_c) log(1 - sig(z_c))], mean over the batch
    return F.multilabel_soft_margin_loss(cls_logits.float(), label.float())


def saliency_target(sal: torch.Tensor, thresh: float = 0.5) -> torch.Tensor:
    """Eq. (C8): B = 1[sal > thresh], exactly {0, 1}. sal in [0, 1]."""
    return (sal > thresh).float()


def loss_sal(sal_logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """One term of Eq. (C8): BCE-with-logits of the upsampled saliency logits against B, averaged over
    valid (non-padded) pixels. sal_logits (B, 1, h, w); target, valid (B, H, W)."""
    up = F.interpolate(sal_logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    bce = F.binary_cross_entropy_with_logits(up, target, reduction="none")  # (B, H, W)
    # A batch of pure padding gives 0, not NaN (the sum keeps the graph).
    return (bce * valid).sum() / valid.sum().clamp_min(1.0)


def loss_seg(seg_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One term of Eq. (C9): CE of the upsampled logits, ignore 255. seg_logits (B, C+1, h, w); target (B, H, W).
    An all-255 target returns 0 (PyTorch's mean over zero pixels is NaN)."""
    up = F.interpolate(seg_logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    if not (target != data.IGNORE_INDEX).any():
        return up.sum() * 0.0
    return F.cross_entropy(up, target, ignore_index=data.IGNORE_INDEX)


def total_loss(parts: dict, a: Args) -> torch.Tensor:
    """Eq. (C10): L = l1 L_cls + l2 (L_sal1 + L_sal2) + l3 (L_seg1 + L_seg2); missing terms (variants) drop out."""
    weights = {"cls": a.lambda_cls, "sal1": a.lambda_sal, "sal2": a.lambda_sal,
               "seg1": a.lambda_seg, "seg2": a.lambda_seg}
    # Eq. (C10)
    return sum(weights[k] * v for k, v in parts.items())


def stage_losses(out: dict, batch: dict, a: Args) -> dict:
    """The loss parts of one stage iteration for the model's variant (card §4, "Variants drop terms")."""
    parts = {}
    if "cls_logits" in out:
        parts["cls"] = loss_cls(out["cls_logits"], batch["label"])  # Eq. (C2)
    if "sal_init" in out:
        B = saliency_target(batch["sal"], a.sal_bin_thresh)  # Eq. (C8)
        parts["sal1"] = loss_sal(out["sal_init"], B, batch["sal_valid"])
        if "A_ct" in out:
            parts["sal2"] = loss_sal(out["sal_ref"], B, batch["sal_valid"])
    parts["seg1"] = loss_seg(out["seg_init"], batch["seg"])  # Eq. (C9)
    if "A_ct" in out:
        parts["seg2"] = loss_seg(out["seg_ref"], batch["seg"])
    return parts


# ----------------------------------------------------------------------------------------------
# Pseudo labels (card §5)
# ----------------------------------------------------------------------------------------------
def normalize_cam(cam: torch.Tensor) -> torch.Tensor:
    """Eq. (C11): per image and class, ReLU then divide by the spatial max + 1e-5. (B, C, h, w)."""
    cam = F.relu(cam)
    # Eq. (C11)  M_c = ReLU(CAM_c) / (max_p ReLU(CAM_c)(p) + 1e-5)
    return cam / (cam.flatten(2).max(dim=-1).values[..., None, None] + 1e-5)


def propagate_cam(A_ct: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """Eq. (C12): exactly one gather step with A_CT, no power, no renormalisation (may slightly exceed 1)."""
    # Eq. (C12)  M~_c(i) = sum_j A_CT[i, j] M_c(j)
    return refine_by_affinity(A_ct, M)


def saliency_crf(image: np.ndarray, a: np.ndarray, eps: float = 1e-8, tau: float = 1.05) -> np.ndarray:
    """Eq. (C13): 2-label dense CRF with the method's own unary, one mean-field iteration.
    image uint8 (H, W, 3); a float (H, W) in [0, 1] -> foreground marginal float32 (H, W) in [0, 1]."""
    a = a.astype(np.float64)
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    # Eq. (C13)  U_fg = -log(a + eps) / (tau sig(a)),  U_bg = -log(1 - a + eps) / (tau sig(1 - a))
    U_bg = -np.log(1.0 - a + eps) / (tau * sig(1.0 - a))
    U_fg = -np.log(a + eps) / (tau * sig(a))
    unary = np.stack([U_bg, U_fg]).astype(np.float32)  # (2, H, W)
    # Impl. (xulianuwa/AuxSegNet, tool/imutils.py crf_for_sal): Gaussian 3/3, bilateral 60/5/5, 1 iteration.
    # np.array copies: pydensecrf rejects read-only buffers, and images decoded by PIL are read-only.
    Q = crf.refine_unary(np.array(image), unary, n_iters=1, pos_xy_std=3, pos_w=3,
                         bi_xy_std=60, bi_rgb_std=5, bi_w=5)
    return np.asarray(Q[1], dtype=np.float32)


def fuse_cam_saliency(cams: np.ndarray, sal: np.ndarray, label: np.ndarray, cam_thresh: float = 0.2,
                      sal_thresh: float = 0.06) -> np.ndarray:
    """Eq. (C14), official tool/imutils.py fusion_cam. cams float (C, H, W); sal float (H, W) in [0, 1];
    label (C,) multi-hot -> uint8 (H, W) in {0} U {present classes + 1} U {255}."""
    cams = cams * (np.asarray(label) > 0)[:, None, None]  # absent classes can never win
    m, k = cams.max(axis=0), cams.argmax(axis=0)
    # Eq. (C14)  strict inequalities: exactly 0.2 / 0.06 is not positive
    obj, fg = m > cam_thresh, sal > sal_thresh
    out = np.zeros(sal.shape, dtype=np.uint8)
    out[obj & fg] = (k[obj & fg] + 1).astype(np.uint8)
    out[obj ^ fg] = data.IGNORE_INDEX  # the two cues disagree -> ignore
    return out


_warned_sal_size = [False]


def read_saliency(path: Path, size) -> np.ndarray:
    """8-bit saliency PNG -> float32 (H, W) in [0, 1]; resized bilinearly (warn once) to size=(H, W)."""
    im = Image.open(path).convert("L")
    if im.size != (size[1], size[0]):
        if not _warned_sal_size[0]:
            warnings.warn(f"saliency map {path} is {im.size[0]}x{im.size[1]}, image is {size[1]}x{size[0]}: "
                          f"resizing saliency maps bilinearly")
            _warned_sal_size[0] = True
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


def check_saliency(sal_dir: Path, ids):
    """Card §9: every training id needs <sal_dir>/<id>.png; there is no fallback."""
    how = ("AuxSegNet needs off-the-shelf saliency maps (8-bit PNG, 255 = salient) for every training image: "
           "produce them with a saliency detector (the paper used DSS; PoolNet or MINet also work) and put "
           "them there or pass --saliency-dir DIR; there is no fallback")
    if not sal_dir.is_dir():
        raise data.DataError(f"saliency folder {sal_dir} does not exist. {how}")
    missing = [i for i in ids if not (sal_dir / f"{i}.png").is_file()]
    if missing:
        raise data.DataError(f"{len(missing)} of {len(ids)} saliency maps missing in {sal_dir} "
                             f"(first: {', '.join(missing[:3])}). {how}")


def image_tensor(image: np.ndarray, device) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised (1, 3, H, W) on device."""
    return augment.to_tensor(image)[None].to(device)


@torch.no_grad()
def stage0_cams(model: AuxSegNet, image: np.ndarray, a: Args, device) -> np.ndarray:
    """Normalised CAMs of the classification network at image size (Deviation 7). -> (C, H, W)."""
    H, W = image.shape[:2]
    acc = None
    for s in a.cam_scales:
        im_s = image if s == 1.0 else augment.rescale(image, s)[0]
        x = image_tensor(im_s, device)
        xs = torch.cat([x, x.flip(-1)]) if a.cam_flip else x
        cam = F.relu(model(xs)["cam"].float())  # (1 or 2, C, h, w)
        if a.cam_flip:
            cam = cam[:1] + cam[1:].flip(-1)
        cam = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)
        acc = cam if acc is None else acc + cam
    return normalize_cam(acc)[0].cpu().numpy()  # Eq. (C11)


@torch.no_grad()
def update_maps(model: AuxSegNet, image: np.ndarray, sal0: np.ndarray, a: Args, device):
    """Label update after a stage (card §2, §8.12): eval mode, full image, single scale.
    -> propagated CAMs (C, H, W), updated soft saliency (H, W)."""
    H, W = image.shape[:2]
    out = model(image_tensor(image, device))
    M = normalize_cam(out["cam"].float())  # Eq. (C11), normalised before propagation
    M_prop = propagate_cam(out["A_ct"], M)  # Eq. (C12)
    M_prop = F.interpolate(M_prop, size=(H, W), mode="bilinear", align_corners=False)[0].cpu().numpy()
    sal_ref = torch.sigmoid(F.interpolate(out["sal_ref"].float(), size=(H, W), mode="bilinear",
                                          align_corners=False))[0, 0].cpu().numpy()
    # Eq. (C13)  a = (sigmoid(R_sal) + SAL_0) / 2, SAL_0 = the original off-the-shelf map, always
    avg = 0.5 * (sal_ref + sal0)
    sal_new = saliency_crf(image, avg) if a.sal_crf else avg.astype(np.float32)
    return M_prop, sal_new


def make_pseudo_labels(model: AuxSegNet, stage: int, train_ds, seed_ds, sal0_dir: Path, run_dir: Path,
                       a: Args, device) -> dict:
    """Write pseudo_labels/<stage>/train/<id>.png (segmentation, palette) and, for stage > 0,
    pseudo_labels/<stage>/train_saliency/<id>.png (soft saliency x 255). Stage 0 fuses the pre-trained
    classifier's CAMs with SAL_0; later stages use the current network (Eq. (C12)-(C14)).
    Returns pseudo/train (and, at stage 0, cam/train) quality on the seed split."""
    seg_dir = run_dir / "pseudo_labels" / str(stage) / "train"
    sal_dir = run_dir / "pseudo_labels" / str(stage) / "train_saliency"
    seg_dir.mkdir(parents=True, exist_ok=True)
    if stage > 0:
        sal_dir.mkdir(parents=True, exist_ok=True)
    seed_index = {n: i for i, n in enumerate(seed_ds.ids)}
    num_classes = train_ds.num_classes
    conf = miou.ConfusionMatrix(num_classes)
    sweep = miou.ThresholdSweep(num_classes) if stage == 0 else None
    ignored, total = 0, 0
    model.eval()
    for idx in tqdm(range(len(train_ds)), desc=f"pseudo labels s{stage}", leave=False, mininterval=5):
        sample = train_ds[idx]
        name, image, label = sample["name"], sample["image"], sample["label"]
        sal0 = read_saliency(sal0_dir / f"{name}.png", image.shape[:2])
        if stage == 0:
            cams, sal = stage0_cams(model, image, a, device), sal0
        else:
            cams, sal = update_maps(model, image, sal0, a, device)
            Image.fromarray(np.clip(np.rint(sal * 255), 0, 255).astype(np.uint8), mode="L").save(
                sal_dir / f"{name}.png")
        pgt = fuse_cam_saliency(cams, sal, label, a.cam_thresh, a.sal_fuse_thresh)  # Eq. (C14)
        data.save_mask(seg_dir / f"{name}.png", pgt)
        ignored += int((pgt == data.IGNORE_INDEX).sum())
        total += pgt.size
        if name in seed_index:
            gt = seed_ds[seed_index[name]]["mask"]
            conf.update(pgt, gt, pred_ignore="exclude")
            if sweep is not None:
                keys = np.flatnonzero(label > 0)
                sweep.update(np.clip(cams[keys], 0, 1), keys + 1, gt)
    res = {"pseudo/train": conf.compute(), "ignore_fraction": ignored / max(total, 1)}
    if sweep is not None:
        res["cam/train"] = sweep.compute()
    return res


# ----------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------
class StopRun(Exception):
    """Raised by --stop-after once checkpoints/last.pt is written."""


class Context:
    """Run-wide state: arguments, device, distributed info, run folder, log file."""

    def __init__(self, a: Args, device, rank: int, world: int, run_dir: Path, spec):
        self.a, self.device, self.rank, self.world, self.run_dir, self.spec = a, device, rank, world, run_dir, spec
        self.iters_this_run = 0
        self.t0 = time.time()
        self.elapsed_before = 0.0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, record: dict, echo: bool = True):
        if not self.main:
            return
        record = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            print(" ".join(f"{k}={v}" for k, v in record.items()), flush=True)

    def seconds(self) -> float:
        return self.elapsed_before + time.time() - self.t0


def seed_everything(seed: int, deterministic: bool):
    """Seeding block shared by the five scripts."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def worker_init(worker_id: int):
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def make_train_transform(a: Args, crop: int, sal_dir: Optional[Path] = None):
    """Card §6: random rescale, h-flip, crop (labels pad 255, or 0 with --pad-as-background); with a
    saliency folder the sample's pseudo label "seg" (nearest) and saliency map (a float map: bilinear,
    pad 0; read here so that any size or mode is accepted) go through the same geometry, and padded
    pixels are marked invalid for L_sal."""
    with_pgt = sal_dir is not None

    def transform(sample, rng):
        image = sample["image"]
        masks, maps = (), ()
        if with_pgt:
            sal = read_saliency(sal_dir / f"{sample['name']}.png", image.shape[:2])
            masks, maps = (sample["seg"],), (sal,)
        image, masks, maps = augment.random_rescale(image, rng, masks=masks, maps=maps,
                                                    ratio_range=tuple(a.scale_range))
        image, masks, maps = augment.random_hflip(image, rng, masks=masks, maps=maps)
        fill = 0 if a.pad_as_background else data.IGNORE_INDEX  # Deviation 5
        image, masks, maps, box = augment.random_crop(image, rng, masks=masks, maps=maps, size=crop,
                                                      mask_fill=fill)
        out = {"image": augment.to_tensor(image), "label": torch.as_tensor(sample["label"])}
        if with_pgt:
            valid = np.ones((crop, crop), np.float32)
            if not a.pad_as_background:
                valid[:] = 0
                y0, y1, x0, x1 = box
                valid[y0:y1, x0:x1] = 1
            out.update(seg=augment.mask_to_tensor(masks[0]),
                       sal=torch.as_tensor(np.ascontiguousarray(maps[0]), dtype=torch.float32),
                       sal_valid=torch.from_numpy(valid))
        return out

    return transform


def poly_lr(base: float, it: int, total: int, power: float) -> float:
    """Poly schedule, per iteration (paper/code): base * (1 - it / total) ** power."""
    return base * (1.0 - it / max(total, 1)) ** power


def make_optimizer(model: AuxSegNet, lr: float, mult: float, momentum: float, wd: float):
    """SGD with the 1x / 10x groups (card §6). Deviation 4: momentum and wd default to the code's 0."""
    base, heads = model.param_groups()
    groups = [{"params": base, "lr": lr, "base_lr": lr}, {"params": heads, "lr": lr * mult, "base_lr": lr * mult}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, weight_decay=wd)


def phase_length(n_train: int, batch: int, epochs: int, a: Args, world: int) -> int:
    per_rank = max(batch // world, 1)
    per_epoch = max((n_train // world) // per_rank, 1)
    total = per_epoch * epochs
    return min(total, a.max_iters) if a.max_iters is not None else total


def save_checkpoint(ctx: Context, state: dict):
    """checkpoints/last.pt, atomically (temp file + rename)."""
    if not ctx.main:
        return
    path = ctx.run_dir / "checkpoints" / "last.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(state, args=dataclasses.asdict(ctx.a), elapsed=ctx.seconds(),
                 rng=dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def restore_rng(rng: dict):
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def train_phase(ctx: Context, phase: int, model: AuxSegNet, dataset, batch_size: int, total: int,
                optimizer, start_it: int, compute_losses, ckpt_extra: dict):
    """One training phase (phase 0 = classification pre-training, phase s + 1 = stage s): poly LR per
    iteration, non-finite guard, periodic and --stop-after checkpoints. Resumes at start_it exactly
    (same data order, same augmentation: the rng of a sample depends on (seed, epoch, index) only)."""
    a, world = ctx.a, ctx.world
    net = DistributedDataParallel(model) if world > 1 else model
    per_rank = max(batch_size // world, 1)  # Deviation 11: the global batch stays --batch-size
    sampler = DistributedSampler(dataset, num_replicas=world, rank=ctx.rank, shuffle=True, seed=a.seed,
                                 drop_last=True)
    per_epoch = max(len(sampler) // per_rank, 1)
    use_amp = a.amp and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    model.train()
    it, meter = start_it, {}
    bar = tqdm(total=total, initial=it, desc=f"phase {phase}", disable=not ctx.main, leave=False, mininterval=5)
    while it < total:
        epoch = it // per_epoch
        epoch_key = phase * 1000 + epoch  # a different augmentation draw per phase and epoch
        sampler.set_epoch(epoch_key)
        dataset.set_epoch(epoch_key)
        order = list(iter(sampler))
        batches = [order[i:i + per_rank] for i in range(0, per_epoch * per_rank, per_rank)]
        batches = batches[it - epoch * per_epoch:]
        gen = torch.Generator().manual_seed(a.seed * 100003 + epoch_key)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=a.workers, generator=gen,
                            worker_init_fn=worker_init, persistent_workers=False)
        for batch in loader:
            for g in optimizer.param_groups:
                g["lr"] = poly_lr(g["base_lr"], it, total, a.poly_power)
            batch = {k: (v.to(ctx.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=use_amp):
                parts = compute_losses(net, batch)
            for k, v in parts.items():
                if not torch.isfinite(v):
                    print(f"{METHOD}.py: error: loss '{k}' is {v.item()} at phase {phase} iteration {it}; "
                          f"lower --lr", file=sys.stderr, flush=True)
                    sys.exit(1)
            loss = total_loss(parts, a)  # Eq. (C10)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            it += 1
            ctx.iters_this_run += 1
            bar.update(1)
            for k, v in dict(parts, total=loss).items():  # running means between two log lines
                meter[k] = meter.get(k, 0.0) + v.item()
            meter["n"] = meter.get("n", 0) + 1
            if it % a.log_every == 0 or it == total:
                n = meter.pop("n")
                ctx.log({"phase": phase, "iter": it, "lr": optimizer.param_groups[0]["lr"],
                         **{f"losses/{k}": v / n for k, v in meter.items()}})
                meter = {}
            stop = a.stop_after is not None and ctx.iters_this_run >= a.stop_after
            if it % a.ckpt_every == 0 or stop:
                save_checkpoint(ctx, dict(ckpt_extra, phase=phase, iteration=it, model=model.state_dict(),
                                          optimizer=optimizer.state_dict(), scaler=scaler.state_dict()))
            if stop:
                bar.close()
                raise StopRun
            if it >= total:
                break
    bar.close()


def cls_step(net, batch, a):
    return {"cls": loss_cls(net(batch["image"])["cls_logits"], batch["label"])}  # Eq. (C2)


def run_training(ctx: Context, ds: dict, sal0_dir: Path, resume_state: Optional[dict]) -> AuxSegNet:
    """Card §2: classification pre-training -> stage-0 labels -> S stages, each followed by a label
    update (except the last, Deviation 8). Returns the final stage's network."""
    a, device = ctx.a, ctx.device
    num_classes = ds["label"].num_classes
    phase, it = (resume_state["phase"], resume_state["iteration"]) if resume_state else (0, 0)
    results = resume_state.get("results", {}) if resume_state else {}
    model = None
    # -- phase 0: classification pre-training (L_cls alone)
    if phase == 0:
        if resume_state is None or it == 0:
            seed_everything(a.seed, a.deterministic)
        model = build_model(a, num_classes, "cls").to(device)
        if a.weights:
            load_backbone_weights(model, a.weights)
        optimizer = make_optimizer(model, a.cls_lr, a.head_lr_mult, a.cls_momentum, a.cls_weight_decay)
        if resume_state is not None and "optimizer" in resume_state:
            model.load_state_dict(resume_state["model"])
            optimizer.load_state_dict(resume_state["optimizer"])
            restore_rng(resume_state["rng"])
        total = phase_length(len(ds["cls"]), a.cls_batch_size, a.epochs_cls, a, ctx.world)
        train_phase(ctx, 0, model, ds["cls"], a.cls_batch_size, total, optimizer, it,
                    lambda net, b: cls_step(net, b, a), dict(model_kind="cls", results=results))
        if ctx.main:
            res = make_pseudo_labels(model, 0, ds["label"], ds["seed"], sal0_dir, ctx.run_dir, a, device)
            results.update(log_pseudo(ctx, 0, res))
        barrier(ctx)
        save_checkpoint(ctx, dict(phase=1, iteration=0, model_kind="cls", model=model.state_dict(),
                                  results=results))
        phase, it = 1, 0
        resume_state = None
    # -- stages 0..S-1
    for s in range(phase - 1, a.num_stages):
        fresh = resume_state is None or it == 0
        if fresh:
            seed_everything(a.seed + 1 + s, a.deterministic)
        stage_model = build_model(a, num_classes, "stage").to(device)
        if model is not None:
            # Stage 0 loads only backbone + classifier (new heads stay random); later stages continue.
            stage_model.load_state_dict(model.state_dict(), strict=(s > 0))
        elif resume_state is not None:
            stage_model.load_state_dict(resume_state["model"], strict=resume_state["model_kind"] == "stage")
        model = stage_model
        optimizer = make_optimizer(model, a.lr, a.head_lr_mult, a.momentum, a.weight_decay)  # fresh per stage
        if resume_state is not None and "optimizer" in resume_state:
            optimizer.load_state_dict(resume_state["optimizer"])
        if resume_state is not None and not fresh:
            restore_rng(resume_state["rng"])
        resume_state = None
        stage_root = ctx.run_dir / "pseudo_labels" / str(s)
        train_ds = make_stage_dataset(ctx, s, sal0_dir, stage_root)
        total = phase_length(len(train_ds), a.batch_size, a.epochs_per_stage, a, ctx.world)
        train_phase(ctx, s + 1, model, train_ds, a.batch_size, total, optimizer, it,
                    lambda net, b: stage_losses(net(b["image"]), b, a),
                    dict(model_kind="stage", results=results))
        it = 0
        if ctx.main and s < a.num_stages - 1:  # the last stage's seg/val comes from final_evaluation()
            val = evaluate_seg(model, ds["val"], a, device, scales=(1.0,), flip=False, use_crf=False)
            ctx.log({"stage": s, "val/miou": 100 * val["miou"]})
            results[f"seg_s{s}/val"] = metric_entry(val, ds["val"].class_names)
        if s < a.num_stages - 1:
            if ctx.main:
                res = make_pseudo_labels(model, s + 1, ds["label"], ds["seed"], sal0_dir, ctx.run_dir, a, device)
                results.update(log_pseudo(ctx, s + 1, res))
            barrier(ctx)
        save_checkpoint(ctx, dict(phase=s + 2, iteration=0, model_kind="stage", model=model.state_dict(),
                                  results=results))
    if model is None:  # resumed after the last stage had finished: only the evaluation is left
        model = build_model(a, num_classes, "stage").to(device)
        model.load_state_dict(resume_state["model"])
    ctx.results = results
    return model


def make_stage_dataset(ctx: Context, s: int, sal0_dir: Path, stage_root: Path):
    """Stage s reads the labels written after stage s - 1 (stage 0: the initial fusion labels) and the
    saliency pseudo labels of the same update (stage 0: the off-the-shelf maps, SAL_PGT^0 = SAL_0)."""
    a = ctx.a
    sal_dir = sal0_dir if s == 0 else stage_root / "train_saliency"
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset,
                         extra_dirs={"seg": stage_root / "train"},
                         transform=make_train_transform(a, a.crop_size, sal_dir), seed=a.seed)
    ds.saliency_dir = sal_dir  # bookkeeping, checked by the tests
    return ds


def log_pseudo(ctx: Context, stage: int, res: dict) -> dict:
    """Per-stage pseudo-label quality to log.jsonl; returns the metrics.json entries."""
    names = ctx.class_names
    p = res["pseudo/train"]
    rec = {"stage": stage, "pseudo/train/miou": 100 * p["miou"], "pseudo/train/coverage": 100 * p["coverage"],
           "pseudo/train/ignore_fraction": 100 * res["ignore_fraction"]}
    out = {f"pseudo_s{stage}/train": dict(metric_entry(p, names), coverage=100 * p["coverage"])}
    if "cam/train" in res:
        rec["cam/train/miou"] = 100 * res["cam/train"]["best"]["miou"]
        rec["cam/train/threshold"] = res["cam/train"]["best_threshold"]
        out["cam/train"] = dict(metric_entry(res["cam/train"]["best"], names),
                                threshold=res["cam/train"]["best_threshold"])
    ctx.log(rec)
    return out


def barrier(ctx: Context):
    if ctx.world > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Evaluate (card §7)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def predict_probs(model: AuxSegNet, image: np.ndarray, device, scales=(1.0,), flip=False) -> np.ndarray:
    """Softmax of the refined prediction R_seg (S_seg when the variant has no affinity), upsampled to the
    image, averaged over scales and flips (card §7 assumption). -> (C+1, H, W)."""
    H, W = image.shape[:2]
    acc = 0.0
    for s in scales:
        im_s = image if s == 1.0 else augment.rescale(image, s)[0]
        x = image_tensor(im_s, device)
        xs = torch.cat([x, x.flip(-1)]) if flip else x
        logits = model(xs)["seg_ref"].float()
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)
        probs = torch.softmax(logits, dim=1)
        if flip:
            probs = probs[:1] + probs[1:].flip(-1)
        acc = acc + probs[0]
    return (acc / (len(scales) * (2 if flip else 1))).cpu().numpy()


def evaluate_seg(model: AuxSegNet, val_ds, a: Args, device, scales, flip, use_crf) -> dict:
    """mIoU of argmax predictions on a split with masks (common.miou)."""
    model.eval()
    conf = miou.ConfusionMatrix(val_ds.num_classes)
    for idx in tqdm(range(len(val_ds)), desc="eval", leave=False, mininterval=5):
        sample = val_ds[idx]
        probs = predict_probs(model, sample["image"], device, scales, flip)
        if use_crf:
            # Impl. (xulianuwa/AuxSegNet, tool/imutils.py crf_inference_inf) = common.crf preset aux_mct.
            probs = crf.refine_probs(np.array(sample["image"]), probs, **crf.PRESETS["aux_mct"])
        conf.update(probs.argmax(0), sample["mask"])
    return conf.compute()


def metric_entry(res: dict, class_names) -> dict:
    """common.miou fractions -> metrics.json percentages; NaN (class absent from GT and prediction) -> null."""
    iou = {n: (None if not np.isfinite(v) else round(100 * float(v), 2)) for n, v in zip(class_names, res["iou"])}
    return {"miou": round(100 * float(res["miou"]), 2), "iou": iou}


def final_evaluation(ctx: Context, model: AuxSegNet, ds: dict) -> dict:
    """seg/val (single scale, primary) plus seg_ms/val and seg_crf/val when asked."""
    a, names = ctx.a, ds["val"].class_names
    res = {"seg/val": metric_entry(evaluate_seg(model, ds["val"], a, ctx.device, (1.0,), False, False), names)}
    multi = list(a.eval_scales) != [1.0] or a.eval_flip
    if multi:
        r = evaluate_seg(model, ds["val"], a, ctx.device, a.eval_scales, a.eval_flip, False)
        res["seg_ms/val"] = metric_entry(r, names)
    if a.eval_crf:
        r = evaluate_seg(model, ds["val"], a, ctx.device, a.eval_scales, a.eval_flip, True)
        res["seg_ms_crf/val" if multi else "seg_crf/val"] = metric_entry(r, names)
    return res


def save_vis(ctx: Context, model: AuxSegNet, ds: dict, stage: int, count: int = 4):
    """vis/seed.png: image | CAM heat-map (max over present classes) | pseudo label | prediction | GT."""
    palette = data.voc_palette()
    seed_ds = ds["seed"]
    rows = []
    model.eval()
    label_dir = ctx.run_dir / "pseudo_labels" / str(stage) / "train"
    for idx in range(min(count, len(seed_ds))):
        sample = seed_ds[idx]
        image, label = sample["image"], sample["label"]
        H, W = image.shape[:2]
        with torch.no_grad():
            out = model(image_tensor(image, ctx.device))
        if "cam" in out:
            cam = F.interpolate(normalize_cam(out["cam"].float()), size=(H, W), mode="bilinear",
                                align_corners=False)[0].cpu().numpy()
            heat = (cam * (label > 0)[:, None, None]).max(0)
        else:
            heat = np.zeros((H, W), np.float32)
        heat_rgb = (0.5 * image + 0.5 * np.stack([255 * heat, 64 * heat, 255 * (1 - heat)], -1)).astype(np.uint8)
        pred = predict_probs(model, image, ctx.device).argmax(0)
        pl_path = label_dir / f"{sample['name']}.png"
        pl = data.read_mask(pl_path) if pl_path.exists() else np.full((H, W), 255, np.uint8)
        tiles = [image, heat_rgb, palette[pl], palette[pred.astype(np.uint8)], palette[sample["mask"]]]
        rows.append(np.concatenate(tiles, axis=1))
    if rows:
        width = max(r.shape[1] for r in rows)
        rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
        (ctx.run_dir / "vis").mkdir(exist_ok=True)
        Image.fromarray(np.concatenate(rows, axis=0)).save(ctx.run_dir / "vis" / "seed.png")


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def pick_device(a: Args, local_rank: int):
    if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            fail("--device cuda but no CUDA GPU is available; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def is_toy(spec) -> bool:
    """Folders written by common.data.make_toy carry a toy_version.txt stamp."""
    return (Path(spec.root) / "toy_version.txt").is_file()


def main(argv=None):
    ns = build_parser().parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))

    # -- resolve configuration (resume: the run's own args.json; device/workers/stop-after from the CLI)
    resume_state = None
    if ns.resume:
        run_dir = Path(ns.resume)
        ckpt_path = run_dir / "checkpoints" / "last.pt"
        if not (run_dir / "args.json").is_file() or not ckpt_path.is_file():
            fail(f"--resume {run_dir}: no args.json / checkpoints/last.pt there; pass the folder of an "
                 f"interrupted {METHOD} run")
        saved = json.loads((run_dir / "args.json").read_text())
        for k in ("device", "workers", "stop_after"):
            saved[k] = getattr(ns, k) if getattr(ns, k) is not None else (saved[k] if k != "stop_after" else None)
        saved["resume"] = str(run_dir)
        a = Args(**saved)
    elif ns.eval_only:
        if not ns.ckpt or not Path(ns.ckpt).is_file():
            fail(f"--eval-only needs --ckpt FILE (an existing checkpoint); got {ns.ckpt!r}")
    try:
        if ns.eval_only:
            ck = torch.load(ns.ckpt, map_location="cpu", weights_only=False)
            if not isinstance(ck, dict) or ck.get("model_kind") != "stage" or "args" not in ck:
                fail(f"--ckpt {ns.ckpt} is not an {METHOD} segmentation checkpoint (checkpoints/last.pt of a "
                     f"run that reached stage 0)")
            values = dict(ck["args"])
            values.update({k: v for k, v in vars(ns).items() if v is not None and k in (
                "data", "device", "workers", "eval_scales", "eval_flip", "eval_crf", "out", "seed")})
            values.update(eval_only=True, ckpt=ns.ckpt, pretrained=False, weights=None)
            a = Args(**values)
        spec = data.resolve_data(a.data if (ns.resume or ns.eval_only) else (ns.data or Args.data))
        if not (ns.resume or ns.eval_only):
            a = resolve_args(ns, spec)
        validate_args(a)
        splits = data.default_splits(spec)
        device = pick_device(a, local_rank)
        if not timm.is_model(a.backbone):
            fail(f"unknown timm backbone '{a.backbone}'; pick one of timm.list_models(), e.g. resnet18 or "
                 f"wide_resnet50_2")
        if a.weights and not Path(a.weights).is_file():
            fail(f"--weights {a.weights}: file not found (or use --pretrained for timm's ImageNet weights)")
        train_ds_plain = data.SegDataset(spec.root, splits["train"], dataset=spec.dataset, seed=a.seed)
        val_ds = data.SegDataset(spec.root, splits["val"], dataset=spec.dataset, seed=a.seed)
        seed_ds = data.SegDataset(spec.root, splits["seed"], dataset=spec.dataset, seed=a.seed)
        sal0_dir = Path(a.saliency_dir) if a.saliency_dir else Path(spec.root) / "saliency"
        if not a.eval_only:
            check_saliency(sal0_dir, train_ds_plain.ids)
    except data.DataError as e:
        fail(str(e))
    # -- the backbone must build (and weights load) before the run folder exists
    try:
        probe = build_model(a, train_ds_plain.num_classes, "stage" if a.eval_only else "cls")
        if a.weights:
            load_backbone_weights(probe, a.weights)
    except Exception as e:  # noqa: BLE001 -- any failure here is a user-facing setup problem
        how = ("use --pretrained with internet access once (or a populated timm cache), or --weights FILE "
               "with a local state dict, or --no-pretrained")
        first = str(e).splitlines()[0] if str(e) else ""
        fail(f"could not build backbone '{a.backbone}' ({type(e).__name__}: {first}); {how}")
    if a.eval_only:
        probe.load_state_dict(ck["model"])

    if ns.resume:
        resume_state = torch.load(Path(ns.resume) / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    else:
        run_dir = Path(a.out) if a.out else Path("runs") / METHOD / f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"
        if run_dir.exists() and any(run_dir.iterdir()):
            fail(f"output folder {run_dir} is not empty; pick another --out (or --resume {run_dir})")

    # -- from here on we write
    if world > 1:
        # Label updates run on rank 0 while the others wait: allow hours, not the default minutes.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=4))
        if device.type == "cuda":
            torch.cuda.set_device(device)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not ns.resume:
            (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(a), indent=2))
    if world > 1:
        dist.barrier()
    ctx = Context(a, device, rank, world, run_dir, spec)
    ctx.splits, ctx.class_names = splits, train_ds_plain.class_names
    if resume_state is not None:
        ctx.elapsed_before = resume_state.get("elapsed", 0.0)
    if ctx.main:
        print(f"{METHOD}: data={spec.name} ({spec.root}) preset={a.preset} variant={a.variant} "
              f"stages={a.num_stages} backbone={a.backbone} device={device} world={world} run={run_dir}", flush=True)
        if a.amp and device.type != "cuda":
            print(f"{METHOD}: --amp is ignored on CPU (fp16 autocast is CUDA-only here); running fp32", flush=True)
        if is_toy(spec) and not a.eval_only:  # Deviation 10: say loudly that toy saliency leaks the GT
            print(f"{METHOD}: NOTE saliency maps in {sal0_dir} are GT-derived stand-ins (toy dataset): they leak "
                  f"pixel-level ground truth; toy mIoU exercises the pipeline only", flush=True)
            ctx.log({"note": "toy saliency maps are derived from ground-truth masks"}, echo=False)

    ds = {"val": val_ds, "seed": seed_ds, "label": train_ds_plain}
    if a.eval_only:
        model = probe.to(device)
        ctx.results = {}
    else:
        ds["cls"] = data.SegDataset(spec.root, splits["train"], dataset=spec.dataset, seed=a.seed,
                                    transform=make_train_transform(a, a.cls_crop_size))
        try:
            model = run_training(ctx, ds, sal0_dir, resume_state)
        except StopRun:
            if ctx.main:
                print(f"{METHOD}: stopped after {ctx.iters_this_run} iterations (--stop-after); "
                      f"continue with --resume {run_dir}", flush=True)
            if world > 1:
                dist.destroy_process_group()
            return
        except data.DataError as e:
            fail(str(e))
    if ctx.main:
        results = dict(ctx.results)
        results.update(final_evaluation(ctx, model, ds))
        if not a.eval_only:
            results[f"seg_s{a.num_stages - 1}/val"] = results["seg/val"]
            ctx.log({"stage": a.num_stages - 1, "val/miou": results["seg/val"]["miou"]})
        last = max((int(k.split("_s")[1].split("/")[0]) for k in results if k.startswith("pseudo_s")), default=None)
        if last is not None:
            results["pseudo/train"] = results[f"pseudo_s{last}/train"]
        if not a.eval_only:
            save_vis(ctx, model, ds, a.num_stages - 1)
        metrics = {"method": METHOD, "dataset": spec.name, "preset": a.preset, "device": str(device),
                   "seconds": round(ctx.seconds(), 1), "primary": "seg/val", "variant": a.variant,
                   "results": results}
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        ctx.log({"val/miou": results["seg/val"]["miou"], "seconds": metrics["seconds"]}, echo=False)
        for k in sorted(results):
            if "miou" in results[k]:
                print(f"{k}: mIoU={results[k]['miou']:.2f}", flush=True)
        print(f"seconds={metrics['seconds']}", flush=True)
        print(f"RESULT {METHOD} seg/val mIoU={results['seg/val']['miou']:.2f}", flush=True)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
