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
    card §4 losses                 -> loss_cls(), loss_sal(), loss_seg(), total_loss(), stage_losses()
    card §5 pseudo labels          -> normalize_cam(), propagate_cam(), saliency_crf(), fuse_cam_saliency(),
                                      make_pseudo_labels()
    card §2 stages, §6 schedule    -> train_cls(), train_stage(), train_step(), main()
    card §7 inference              -> predict_probs(), evaluate()
    supplementary Table 3 ablation -> --variant {baseline, mt, mt_ct, full}; paper Tables 4-5 rows ->
                                      --tasks, --affinity, --ct-constraint (Deviation 16)

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
    Eq. (C13) SAL^{s+1} = CRF_sal( (up(sigmoid(R_sal)) + SAL_0) / 2 ), sigmoid first (gen_pgt.py), unary
              U_fg = -log(a+eps) / (tau sigmoid(a)), U_bg = -log(1-a+eps) / (tau sigmoid(1-a))
                                                                              -> saliency_crf(), update_maps()
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
       noise, missed objects, false blobs): cleaner than a saliency model's, so toy mIoU overstates what saliency
       gives and compares the method only with its own ablations on the same maps. Their quality is set by the toy
       knobs sal_miss, sal_blobs, sal_noise and sal_blur (common.data.TOY_KNOBS, data/README.md).
   11. Data-parallel runs split --batch-size across processes (global batch unchanged); label updates
       and evaluation run on rank 0 only.
   12. Toy preset vs card §10: resnet10t instead of resnet18, crop 96 instead of 112, classification
       pre-training 2 epochs and 3 stages x 1 epoch (the card's 8 and 3 x 4 were sized for ~200 images;
       the toy set has 1000), stage lr 0.002 instead of 0.01 (0.01 diverged to NaN on the toy data). The
       stage schedule bounds the toy's fully supervised row: toy v4, seed 0, --supervision full reaches 80.64
       seg/val with 3 x 1 epoch and 85.89 with 3 x 2 (--epochs-per-stage 2, ~1.45x the run's seconds, over the
       toy's 300 s); 82.56 with 3 x 2 at batch 4, 75.20 with 3 x 1 at batch 4; AdamW (lr 1e-3 / 2e-3)
       80.96 / 77.37; SGD lr 0.003 79.87, 0.004 (heads x5) 80.60, 0.005 60.74.
   13. Images smaller than the crop are placed at a random offset inside it (common.augment.random_crop, shared by
       the five scripts); the official tool/exutils.py crop puts them at the top-left corner.
   14. Test-time CRF (--eval-crf): the official code's crf_inference_inf parameters (10 iterations, Gaussian 4/3,
       bilateral 83/5/3; common.crf preset aux_mct), not "DeepLab's parameters" that the paper names.
   15. Pseudo-label quality: pseudo_s<s>/train is the mIoU on the pixels the labels do not ignore (plus their
       coverage); pseudo_pr_s<s>/train adds the paper's form (main-paper table: 85.6 / 42.9 / 40.6 at stage 0):
       per-class precision and recall, and IoU, with every ignored pixel counted as a miss of its ground-truth
       class, averaged over classes (the paper does not say whether it averages over classes or pixels).
   16. Finer ablation rows (paper Tables 4-5, card §3 "Variants"), single stage: --variant mt --tasks seg+cls /
       seg+sal (57.6 / 59.8) drop one auxiliary branch and its loss; --variant mt_ct --affinity seg (61.5) keeps
       the non-local module of the segmentation branch only, whose A_seg refines S_seg alone (no A_sal, no SA
       module, no R_sal, no L_sal2); --variant mt_ct --ct-constraint seg (62.6) computes A_CT as usual but
       refines and constrains S_seg only (no L_sal2). The card's reading; the official code has no such switches.
   17. Minor, against the official code: updated saliency maps are stored as rint(255 a) (official: truncated);
       a stage runs epochs x floor(n / batch) iterations (official loop: max_step + 1).
   18. Evaluation pads each view (bottom / right) to a multiple of the output stride 8 and crops the upsampled
       logits, so that every output cell covers the 8 x 8 pixels it was computed from (official: the logits of
       the unpadded image are stretched to H x W, which shifts a ~110 px toy image's prediction by up to 7 px
       towards the top-left; toy v4, the same nine trained networks: +0.5 to +3.8 seg/val, oracle 77.43 ->
       80.86). The toy's 96 px training crops are multiples of 8; the paper preset's 321 px crops are not, and
       the losses stretch their 41 cells over 321 px as the official code does. The label updates
       (stage0_cams, update_maps) keep the official stretch too; the padded border is mean colour, which the
       affinity of the padded view also sees.

Run:    python auxsegnet.py --data VOC2012                      (CUDA, paper settings; needs saliency maps)
        python auxsegnet.py --data COCO2014 --max-iters 40000    (COCO: the paper gives no schedule)
        python auxsegnet.py                                      (toy data, CPU, minutes)
        python auxsegnet.py --variant baseline|mt|mt_ct|full     (supplementary Table 3 rows)
        python auxsegnet.py --variant mt --tasks seg+cls|seg+sal (branch ablation rows; Deviation 16)
        python auxsegnet.py --variant mt_ct --affinity seg       (segmentation-only affinity row; Deviation 16)
        python auxsegnet.py --variant mt_ct --ct-constraint seg  (segmentation-constraint-only row; Deviation 16)
        python auxsegnet.py --supervision full                   (upper bound: ground-truth masks replace the seg
                                                                  branch's labels; no stage-0 fusion labels)
        torchrun --nproc_per_node=2 auxsegnet.py --data VOC2012
"""
import argparse
import collections
import contextlib
import dataclasses
import datetime
import inspect
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import time
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from common import augment, crf, data, miou

METHOD = "auxsegnet"


# ==================================================================================================
# Config
# ==================================================================================================
@dataclass
class Args:
    # --- common interface (DESIGN.md): the same fields in all five scripts ---
    data: str = "toy"  # toy | VOC2012 | COCO2014 | a dataset folder (VOC or COCO layout)
    preset: str = "auto"  # auto = toy on the toy data, paper otherwise; every flag overrides its preset value
    out: str = ""  # run folder (default runs/<method>/<data>-<time>); an existing non-empty one is never used
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # python, numpy and torch RNGs, the data order and the augmentations
    workers: int = 4  # DataLoader worker processes
    amp: bool = False  # bf16 autocast on CUDA; ignored (with a note) on CPU
    deterministic: bool = False  # deterministic cuDNN kernels (off: cudnn.benchmark autotuning)
    resume: str = ""  # RUN_DIR: continue an interrupted run from its checkpoints/last.pt
    eval_only: bool = False  # skip training and evaluate --ckpt
    ckpt: str = ""  # checkpoints/last.pt of a finished run, for --eval-only
    pretrained: bool = True  # ImageNet weights through timm (internet once, or a populated cache)
    weights: str = ""  # a local backbone state dict instead of timm's download
    supervision: str = "image"  # image: the method (WSSS) | full: ground-truth masks replace its pseudo labels
    max_iters: int = 0  # > 0: cap every training stage at N iterations (warm-ups are not rescaled)
    stop_after: int = 0  # > 0: stop as if interrupted after N iterations of this process (testing aid)
    log_every: int = 50  # iterations between log lines
    ckpt_every: int = 2000  # iterations between checkpoints/last.pt writes
    # --- variants and saliency input (card §3 variants, §9) ---
    variant: str = "full"  # supplementary Table 3 row: baseline (seg branch only) | mt (+cls +sal branches) | mt_ct (+cross-task affinity) | full (MT+CT+IL: --num-stages stages with label updates)
    num_stages: int = 0  # training stages of --variant full, each followed by a label update except the last; 0 = auto: 4 (card §6), 3 on the toy preset (Deviation 12); the other variants train stage 0 only
    saliency_dir: str = ""  # off-the-shelf saliency maps DIR/<id>.png (card §9; default <data root>/saliency); required
    tasks: str = "auto"  # auxiliary branches (paper Table 4 rows, with --variant mt): auto = the variant's | seg+cls (57.6) | seg+sal (59.8) (Deviation 16)
    affinity: str = "auto"  # auto = the variant's | seg: segmentation-only affinity A_seg refining S_seg only, with --variant mt_ct (61.5; Deviation 16)
    ct_constraint: str = "seg+sal"  # predictions A_CT refines and constrains (L_seg2, L_sal2): seg+sal | seg: no R_sal, no L_sal2 (62.6; Deviation 16)
    # --- model (card §3) ---
    backbone: str = "wide_resnet50_2"  # timm CNN at output stride 8 (Deviation 1; paper: ResNet38d)
    freeze_bn: bool = True  # frozen backbone BatchNorm (official network/resnet38d.py)
    head_dim: int = 128  # branch width (official network/AuxSegNet.py: 128-ch branches)
    dilations: tuple = (6, 12, 18)  # branch conv dilations (official: dil 6/12, +18 after the non-local module)
    # --- segmentation stages (card §6) ---
    epochs_per_stage: int = 10  # paper: 10 (official code: 15)
    crop_size: int = 321  # paper/code: 321
    batch_size: int = 4  # global batch (paper/code: 4)
    lr: float = 7e-4  # official main.py (paper: 1e-3), Deviation 4
    head_lr_mult: float = 10.0  # seg/sal/fc8 parameters (official get_10x_lr_params)
    momentum: float = 0.0  # official effective value (Deviation 4)
    weight_decay: float = 0.0  # official effective value (Deviation 4)
    poly_power: float = 0.9  # paper/code
    scale_range: tuple = (0.7, 1.3)  # random rescale MIN MAX (official tool/exutils.py)
    pad_as_background: bool = False  # pad crop labels with 0 and keep padded pixels in L_sal, as the official code does (Deviation 5)
    lambda_cls: float = 1.0  # Eq. (C10) l1 (official train_AuxAff.py)
    lambda_sal: float = 1.0  # Eq. (C10) l2
    lambda_seg: float = 1.0  # Eq. (C10) l3
    # --- classification pre-training (card §6, Deviation 6) ---
    epochs_cls: int = 15  # paper
    cls_lr: float = 0.01  # card suggestion
    cls_momentum: float = 0.9  # card suggestion
    cls_weight_decay: float = 5e-4  # card suggestion
    cls_batch_size: int = 8  # card suggestion (global batch)
    cls_crop_size: int = 448  # card suggestion
    # --- pseudo labels (card §5) ---
    cam_thresh: float = 0.2  # Eq. (C14) CAM threshold (official tool/imutils.py fusion_cam)
    sal_fuse_thresh: float = 0.06  # Eq. (C14) saliency threshold (official fusion_cam)
    sal_bin_thresh: float = 0.5  # Eq. (C8) saliency target binarised at this value (official exutils)
    sal_crf: bool = True  # Eq. (C13) 1-iteration CRF on the updated saliency maps (official step/gen_pgt.py crf_for_sal)
    cam_scales: tuple = (1.0,)  # scales of the stage-0 CAMs, averaged (Deviation 7)
    cam_flip: bool = False  # add h-flipped stage-0 CAMs (Deviation 7)
    # --- inference (card §7) ---
    eval_scales: tuple = (1.0,)  # test scales (official infer_AuxAff.py: 1.0); with more than one (or --eval-flip) seg_ms/val is reported too
    eval_flip: bool = False  # add h-flipped test views
    eval_crf: bool = False  # dense CRF on the test probabilities (official crf_inference_inf, common.crf preset aux_mct): seg_crf/val
    num_vis: int = 8  # images drawn into each vis/ grid


PRESETS = {
    # the Args defaults are the VOC paper setting (card §6)
    "paper_voc": dict(log_every=20, ckpt_every=500),
    # card §6: COCO uses the same recipe; 10 epochs on 82k images is ~205k iterations per stage, so pass --max-iters
    "paper_coco": dict(log_every=20, ckpt_every=500),
    # card §10: small random-init backbone, trainable BN, short schedule, 2 CPU cores in minutes.
    # Deviation 12: resnet10t, crop 96 and 2 + 3 x 1 epochs on the 1000-image toy set (card §10 assumed ~200
    # images) keep the run within minutes on 2 cores; stage lr 0.002 because 0.01 (heads 0.1, momentum 0.9)
    # diverged (NaN in stage 0 of a measured toy run).
    "toy": dict(backbone="resnet10t", pretrained=False, freeze_bn=False, head_dim=64, dilations=(1, 2, 3),
                crop_size=96, batch_size=8, lr=0.002, momentum=0.9, weight_decay=1e-4, epochs_cls=2, cls_lr=0.01,
                cls_batch_size=8, cls_crop_size=96, epochs_per_stage=1, workers=0, log_every=25, ckpt_every=500),
}
CHOICES = {"variant": ("baseline", "mt", "mt_ct", "full"), "tasks": ("auto", "seg+cls", "seg+sal"),
           "affinity": ("auto", "seg"), "ct_constraint": ("seg+sal", "seg")}
LIMITS = {"num_stages": ">=0", "head_dim": ">=1", "dilations": ">=1", "epochs_per_stage": ">=0", "crop_size": ">=1",
          "batch_size": ">=1", "lr": ">0", "head_lr_mult": ">=0", "momentum": ">=0", "weight_decay": ">=0",
          "poly_power": ">=0", "scale_range": ">0", "lambda_cls": ">=0", "lambda_sal": ">=0", "lambda_seg": ">=0",
          "epochs_cls": ">=0", "cls_lr": ">0", "cls_momentum": ">=0", "cls_weight_decay": ">=0", "cls_batch_size": ">=1",
          "cls_crop_size": ">=1", "cam_thresh": "[0,1]", "sal_fuse_thresh": "[0,1]", "sal_bin_thresh": "[0,1]",
          "cam_scales": ">0", "eval_scales": ">0", "num_vis": ">=0"}


def validate(args):
    """--num-stages 0 becomes the variant's number of stages; checks that LIMITS cannot express."""
    if not args.num_stages:  # card §6: stages 0..3; Deviation 12 (toy: 3); baseline / mt / mt_ct: stage 0 only
        args.num_stages = 1 if args.variant != "full" else 3 if args.preset == "toy" else 4
    check(args.num_stages == 1 or args.variant == "full", f"--num-stages {args.num_stages} needs --variant full: label "
          f"updates use the cross-task affinity and the classifier (variant '{args.variant}' trains stage 0 only)")
    # Deviation 16: the finer ablation rows of paper Tables 4-5 are single-stage rows next to MT (60.8) / MT+CT (64.1)
    check(args.tasks == "auto" or args.variant == "mt", f"--tasks {args.tasks} is a row of the multi-task ablation "
          f"(paper 57.6 / 59.8): use it with --variant mt (got '{args.variant}')")
    check(args.affinity == "auto" or args.variant == "mt_ct", f"--affinity {args.affinity} is a row of the affinity "
          f"ablation (paper 61.5): use it with --variant mt_ct (got '{args.variant}')")
    check(args.ct_constraint == "seg+sal" or (args.variant == "mt_ct" and args.affinity == "auto"),
          f"--ct-constraint {args.ct_constraint} is a row of the affinity ablation (paper 62.6): use it with "
          f"--variant mt_ct and the cross-task affinity (got '{args.variant}', --affinity {args.affinity})")
    check(len(args.dilations) == 3, f"--dilations takes three positive integers (got {args.dilations})")
    check(len(args.scale_range) == 2 and args.scale_range[0] <= args.scale_range[1],
          f"--scale-range takes MIN MAX with 0 < MIN <= MAX (got {args.scale_range})")
    for flag in ("batch_size", "cls_batch_size"):
        check(getattr(args, flag) % env_world() == 0, f"--{flag.replace('_', '-')} {getattr(args, flag)} (global) is "
              f"not divisible by the {env_world()} processes")
    check(not (args.sal_crf or args.eval_crf) or crf.available(),
          "pydensecrf is not installed (pip install pydensecrf2); or pass --no-sal-crf and drop --eval-crf")


# ==================================================================================================
# Model
# ==================================================================================================
# card §3
# heads and affinity of each supplementary Table 3 row (card §9 variant mapping)
VARIANT_TASKS = {"baseline": (("seg",), "none"), "mt": (("cls", "sal", "seg"), "none"),
                 "mt_ct": (("cls", "sal", "seg"), "ct"), "full": (("cls", "sal", "seg"), "ct")}


def variant_config(args):
    """(tasks, affinity, refine) of the stage network: the --variant row, narrowed by the finer ablation flags
    (Deviation 16): --tasks seg+cls / seg+sal drops one auxiliary branch (paper 57.6 / 59.8); --affinity seg
    keeps only the segmentation affinity, which refines S_seg only (61.5); --ct-constraint seg lets A_CT refine
    S_seg only (62.6)."""
    tasks, affinity = VARIANT_TASKS[args.variant]
    if args.tasks != "auto":
        tasks = tuple(args.tasks.split("+"))
    if args.affinity != "auto":
        affinity = args.affinity
    refine = ("seg",) if affinity == "seg" or args.ct_constraint == "seg" else ("seg", "sal")
    return tasks, affinity, refine


def task_affinity(theta_x, phi_x):
    """Eq. (C3): embedded-Gaussian non-local affinity, row-softmaxed, no 1/sqrt(d) scaling.
    theta_x, phi_x: (B, D, N) -> A: (B, N, N), A[b, i, :] sums to 1."""
    # Eq. (C3)  A_t[i, j] = exp(<theta_i, phi_j>) / sum_j' exp(<theta_i, phi_j'>)
    logits = torch.bmm(theta_x.transpose(1, 2).float(), phi_x.float())  # (B, N, N), fp32: fp16 overflows
    return torch.softmax(logits, dim=-1)


def refine_by_affinity(A, S):
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

    def __init__(self, in_ch, dim, out_ch, dilations, non_local):
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

    def features(self, feats):
        """X_t = ReLU(conv_d2(ReLU(conv_d1(F)))): (B, K, h, w) -> (B, dim, h, w)."""
        return F.relu(self.conv2(F.relu(self.conv1(feats))))

    def affinity(self, X):
        """Eq. (C3) on the features before enhancement: (B, dim, h, w) -> (B, N, N)."""
        return task_affinity(self.theta(X).flatten(2), self.phi(X).flatten(2))

    def enhance(self, X, A):
        """Eq. (C4): Y_t = X_t + W_t(A_t G_t(X_t)); the attended features are gathered with A_t rows."""
        # Eq. (C4)  Y_t = X_t + W_t(A_t . G_t(X_t))
        attended = refine_by_affinity(A, self.g(X)).to(X.dtype)  # (B, dim, h, w)
        return X + self.W(attended)

    def predict(self, Y):
        """S_t = conv1x1(ReLU(conv_d3(Y))): (B, dim, h, w) -> (B, out_ch, h, w) logits."""
        return self.conv4(F.relu(self.conv3(Y)))


class CrossTaskAttention(nn.Module):
    """Eq. (C5)-(C6): the two affinities as a 2-channel N x N "image"; convs slide over the (i, j) grid."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 2, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(2, 2, 1)

    def forward(self, A_seg, A_sal):
        """A_seg, A_sal: (B, N, N) -> A_CT (B, N, N), Omega (B, 2, N, N)."""
        stacked = torch.stack([A_seg, A_sal], dim=1).float()  # (B, 2, N, N)
        # Eq. (C5)  Omega = softmax over the 2 channels of conv1x1(ReLU(conv3x3([A_seg, A_sal])))
        omega = torch.softmax(self.conv2(F.relu(self.conv1(stacked))), dim=1)
        # Eq. (C6)  A_CT = Omega_seg * A_seg + Omega_sal * A_sal (rows need not sum to 1; not renormalised)
        A_ct = omega[:, 0] * stacked[:, 0] + omega[:, 1] * stacked[:, 1]
        return A_ct, omega


OUTPUT_STRIDE = 8  # of the backbone and so of every head's map


class AuxSegNet(nn.Module):
    """Shared stride-8 backbone + classification / saliency / segmentation heads (card §3).

    tasks ("cls", "sal", "seg") picks the heads; affinity "ct" adds the non-local modules, the
    self-attention fusion and the refinement (MT+CT), "none" leaves them out (baseline, MT), "seg" keeps the
    segmentation branch's non-local module only, whose A_seg refines S_seg (ablation, Deviation 16).
    refine: the predictions the affinity refines (ct only; "seg" always refines S_seg alone)."""

    def __init__(self, backbone, num_classes, tasks=("cls", "sal", "seg"), affinity="ct", head_dim=128,
                 dilations=(6, 12, 18), pretrained=False, freeze_bn=False, refine=("seg", "sal")):
        super().__init__()
        self.tasks, self.affinity_kind, self.freeze_bn = tuple(tasks), affinity, freeze_bn
        self.refine = ("seg",) if affinity == "seg" else tuple(refine)
        # Deviation 1: timm backbone at output stride 8 instead of ResNet38d.
        try:
            self.backbone = timm_model(backbone, pretrained, features_only=True, output_stride=OUTPUT_STRIDE,
                                       out_indices=(-1,))
        except (TypeError, RuntimeError) as e:
            fail(f"timm cannot build '{backbone}' as a stride-8 feature extractor ({type(e).__name__}: "
                 f"{str(e)[:80]}); AuxSegNet needs a CNN such as resnet18 or wide_resnet50_2")
        K = self.backbone.feature_info.channels()[-1]
        if "cls" in tasks:
            self.dropout7 = nn.Dropout2d(0.5)
            self.fc8 = nn.Conv2d(K, num_classes - 1, 1, bias=False)  # C foreground classes, no bias
            nn.init.xavier_uniform_(self.fc8.weight)  # Impl. (xulianuwa/AuxSegNet, network/AuxSegNet.py)
        if "seg" in tasks:
            self.seg = DenseBranch(K, head_dim, num_classes, dilations, affinity in ("ct", "seg"))
        if "sal" in tasks:
            self.sal = DenseBranch(K, head_dim, 1, dilations, affinity == "ct")
        if affinity == "ct":
            self.cross_att = CrossTaskAttention()
        for m in self.frozen_bn():
            m.requires_grad_(False)

    def frozen_bn(self):
        return [m for m in self.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] * self.freeze_bn

    def train(self, mode=True):
        """Frozen BN stays in eval mode (official network/resnet38d.py `train`)."""
        super().train(mode)
        for m in self.frozen_bn():
            m.eval()
        return self

    def param_groups(self):
        """(1x params, 10x params). Impl. (xulianuwa/AuxSegNet, network/AuxSegNet.py get_10x_lr_params):
        names containing seg/sal/fc8 get 10x; the SA module ("cross_att") and the backbone stay at 1x."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        heads = [p for n, p in named if n.split(".")[0] in ("fc8", "seg", "sal")]
        base = [p for n, p in named if n.split(".")[0] not in ("fc8", "seg", "sal")]
        return base, heads

    def forward(self, x):
        """x: (B, 3, H, W) -> dict with, where the heads exist: cls_logits (B, C), cam (B, C, h, w),
        seg_init / seg_ref (B, C+1, h, w), sal_init / sal_ref (B, 1, h, w), A_seg / A_sal / A_ct (B, N, N),
        omega (B, 2, N, N). seg_ref is seg_init when there is no affinity (baseline, MT), sal_ref is sal_init when
        the affinity does not refine it (--affinity seg: only A_seg; --ct-constraint seg)."""
        feats = self.backbone(x)[-1]  # (B, K, h, w), h = ceil(H / 8)
        out = {}
        if "cls" in self.tasks:
            pooled = F.adaptive_avg_pool2d(self.dropout7(feats), 1)  # (B, K, 1, 1)
            out["cls_logits"] = self.fc8(pooled).flatten(1)  # (B, C)
            # Eq. (C1)  CAM_c(p) = w_c^T F(p), on the un-dropped features
            out["cam"] = F.conv2d(feats, self.fc8.weight)  # (B, C, h, w)
        X = {t: getattr(self, t).features(feats) for t in ("seg", "sal") if t in self.tasks}
        if self.affinity_kind in ("ct", "seg"):
            with torch.autocast(device_type=x.device.type, enabled=False):
                nl = [t for t in X if getattr(self, t).non_local]  # ct: seg and sal; seg: seg only
                A = {t: getattr(self, t).affinity(X[t].float()) for t in nl}  # Eq. (C3), (B, N, N)
                Y = {t: getattr(self, t).enhance(X[t].float(), A[t]) if t in nl else X[t].float() for t in X}  # Eq. (C4)
                S = {t: getattr(self, t).predict(Y[t]) for t in X}
                if self.affinity_kind == "ct":
                    A_ref, omega = self.cross_att(A["seg"], A["sal"])  # Eq. (C5)-(C6)
                    out.update(A_sal=A["sal"], A_ct=A_ref, omega=omega)
                else:  # Deviation 16: segmentation-only affinity (ablation row 61.5)
                    A_ref = A["seg"]
                # Eq. (C7) on logits (Deviation 3), for the predictions in self.refine
                R = {t: refine_by_affinity(A_ref, S[t]) if t in self.refine else S[t] for t in S}
            out.update(A_seg=A["seg"])
        else:
            S = {t: getattr(self, t).predict(X[t]) for t in X}
            R = S
        for t in S:
            out[f"{t}_init"], out[f"{t}_ref"] = S[t], R[t]
        return out


def build_model(args, num_classes, kind="stage", init_weights=False):
    """kind "cls": backbone + classifier for pre-training; "stage": the --variant network. init_weights: ImageNet
    weights (--pretrained) or --weights FILE into the backbone (an ImageNet classifier in the file is dropped)."""
    tasks, affinity, refine = (("cls",), "none", ()) if kind == "cls" else variant_config(args)
    model = AuxSegNet(args.backbone, num_classes, tasks, affinity, args.head_dim, args.dilations,
                      pretrained=init_weights and args.pretrained and not args.weights, freeze_bn=args.freeze_bn,
                      refine=refine)
    if init_weights and args.weights:
        what = f"--weights {args.weights}"
        load_weights(model.backbone, state_dict_of(load_checkpoint(args.weights, "--weights"), what), what,
                     ignore=("fc.", "head.", "classifier."))
    return model


# ==================================================================================================
# Losses
# ==================================================================================================
# card §4
def loss_cls(cls_logits, label):
    """Eq. (C2): multi-label soft margin = BCE-with-logits averaged over classes and batch. (B, C), (B, C)."""
    # Eq. (C2)  L_cls = -1/C sum_c [y_c log sig(z_c) + (1 - y_c) log(1 - sig(z_c))], mean over the batch
    return F.multilabel_soft_margin_loss(cls_logits.float(), label.float())


def saliency_target(sal, thresh=0.5):
    """Eq. (C8): B = 1[sal > thresh], exactly {0, 1}. sal in [0, 1]."""
    return (sal > thresh).float()


def loss_sal(sal_logits, target, valid):
    """One term of Eq. (C8): BCE-with-logits of the upsampled saliency logits against B, averaged over
    valid (non-padded) pixels. sal_logits (B, 1, h, w); target, valid (B, H, W)."""
    up = F.interpolate(sal_logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    bce = F.binary_cross_entropy_with_logits(up, target, reduction="none")  # (B, H, W)
    # A batch of pure padding gives 0, not NaN (the sum keeps the graph).
    return (bce * valid).sum() / valid.sum().clamp_min(1.0)


def loss_seg(seg_logits, target):
    """One term of Eq. (C9): CE of the upsampled logits, ignore 255. seg_logits (B, C+1, h, w); target (B, H, W).
    An all-255 target returns 0 (PyTorch's mean over zero pixels is NaN)."""
    up = F.interpolate(seg_logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    if not (target != data.IGNORE_INDEX).any():
        return up.sum() * 0.0
    return F.cross_entropy(up, target, ignore_index=data.IGNORE_INDEX)


def total_loss(parts, args):
    """Eq. (C10): L = l1 L_cls + l2 (L_sal1 + L_sal2) + l3 (L_seg1 + L_seg2); missing terms (variants) drop out."""
    weights = {"cls": args.lambda_cls, "sal1": args.lambda_sal, "sal2": args.lambda_sal,
               "seg1": args.lambda_seg, "seg2": args.lambda_seg}
    # Eq. (C10)
    return sum(weights[k] * v for k, v in parts.items())


def stage_losses(out, batch, args):
    """The loss parts of one stage iteration for the model's variant (card §4, "Variants drop terms"): the
    heads present give L_cls / L_sal1 / L_seg1; an affinity (A_seg in out) gives L_seg2 on R_seg; the cross-task
    affinity gives L_sal2 on R_sal unless --ct-constraint seg (Deviation 16)."""
    parts = {}
    if "cls_logits" in out:
        parts["cls"] = loss_cls(out["cls_logits"], batch["label"])  # Eq. (C2)
    if "sal_init" in out:
        B = saliency_target(batch["sal"], args.sal_bin_thresh)  # Eq. (C8)
        parts["sal1"] = loss_sal(out["sal_init"], B, batch["sal_valid"])
        if "A_ct" in out and args.ct_constraint == "seg+sal":
            parts["sal2"] = loss_sal(out["sal_ref"], B, batch["sal_valid"])
    parts["seg1"] = loss_seg(out["seg_init"], batch["seg"])  # Eq. (C9)
    if "A_seg" in out:
        parts["seg2"] = loss_seg(out["seg_ref"], batch["seg"])
    return parts


# ==================================================================================================
# Pseudo labels
# ==================================================================================================
# card §5
def normalize_cam(cam):
    """Eq. (C11): per image and class, ReLU then divide by the spatial max + 1e-5. (B, C, h, w)."""
    cam = F.relu(cam)
    # Eq. (C11)  M_c = ReLU(CAM_c) / (max_p ReLU(CAM_c)(p) + 1e-5)
    return cam / (cam.flatten(2).max(dim=-1).values[..., None, None] + 1e-5)


def propagate_cam(A_ct, M):
    """Eq. (C12): exactly one gather step with A_CT, no power, no renormalisation (may slightly exceed 1)."""
    # Eq. (C12)  M~_c(i) = sum_j A_CT[i, j] M_c(j)
    return refine_by_affinity(A_ct, M)


def saliency_crf(image, a, eps=1e-8, tau=1.05):
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
    Q = crf.refine_unary(np.array(image), unary, n_iters=1, pos_xy_std=3, pos_w=3, bi_xy_std=60, bi_rgb_std=5, bi_w=5)
    return np.asarray(Q[1], dtype=np.float32)


def fuse_cam_saliency(cams, sal, label, cam_thresh=0.2, sal_thresh=0.06):
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


def read_saliency(path, size):
    """8-bit saliency PNG -> float32 (H, W) in [0, 1]; resized bilinearly (warn once) to size=(H, W)."""
    im = Image.open(path).convert("L")
    if im.size != (size[1], size[0]):  # the same text every time: Python's warning filter prints it once
        warnings.warn("saliency maps differ in size from their images: resizing them bilinearly")
        im = im.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(im, dtype=np.float32) / 255.0


def check_saliency(sal_dir, ids):
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


def image_tensor(image, device):
    """uint8 (H, W, 3) -> normalised (1, 3, H, W) on device."""
    return augment.to_tensor(image)[None].to(device)


@torch.no_grad()
def stage0_cams(model, image, args, device):
    """Normalised CAMs of the classification network at image size (Deviation 7). -> (C, H, W)."""
    H, W = image.shape[:2]
    acc = None
    for s in args.cam_scales:
        x = image_tensor(image if s == 1.0 else augment.rescale(image, s)[0], device)
        xs = torch.cat([x, x.flip(-1)]) if args.cam_flip else x
        cam = F.relu(model(xs)["cam"].float())  # (1 or 2, C, h, w)
        if args.cam_flip:
            cam = cam[:1] + cam[1:].flip(-1)
        cam = F.interpolate(cam, size=(H, W), mode="bilinear", align_corners=False)
        acc = cam if acc is None else acc + cam
    return normalize_cam(acc)[0].cpu().numpy()  # Eq. (C11)


@torch.no_grad()
def update_maps(model, image, sal0, args, device):
    """Label update after a stage (card §2, §8.12): eval mode, full image, single scale.
    -> propagated CAMs (C, H, W), updated soft saliency (H, W)."""
    H, W = image.shape[:2]
    out = model(image_tensor(image, device))
    M = normalize_cam(out["cam"].float())  # Eq. (C11), normalised before propagation
    M_prop = propagate_cam(out["A_ct"], M)  # Eq. (C12)
    M_prop = F.interpolate(M_prop, size=(H, W), mode="bilinear", align_corners=False)[0].cpu().numpy()
    # Impl. (xulianuwa/AuxSegNet, step/gen_pgt.py): sigmoid at feature resolution, then bilinear upsampling
    # (the two do not commute: upsampling the logits first sharpens object edges)
    sal_ref = F.interpolate(torch.sigmoid(out["sal_ref"].float()), size=(H, W), mode="bilinear",
                            align_corners=False)[0, 0].cpu().numpy()
    # Eq. (C13)  a = (up(sigmoid(R_sal)) + SAL_0) / 2, SAL_0 = the original off-the-shelf map, always
    avg = 0.5 * (sal_ref + sal0)
    sal_new = saliency_crf(image, avg) if args.sal_crf else avg.astype(np.float32)
    return M_prop, sal_new


@torch.no_grad()
def pseudo_label_maps(model, image, sal0, label, s, args, device):
    """One training image's update (card §2): s = 0 the classifier's CAMs and SAL_0; s > 0 the stage s - 1 network's
    propagated CAMs and updated saliency (Eq. (C11)-(C13)); then Eq. (C14). -> cams (C, H, W), sal (H, W), pgt."""
    if s == 0:
        cams, sal = stage0_cams(model, image, args, device), sal0
    else:
        cams, sal = update_maps(model, image, sal0, args, device)
    pgt = fuse_cam_saliency(cams, sal, label, args.cam_thresh, args.sal_fuse_thresh)  # Eq. (C14)
    return cams, sal, pgt


def label_quality_update(matrix, pgt, gt, ignore_index=data.IGNORE_INDEX):
    """Accumulate a (K, K + 1) ground truth x pseudo label count matrix whose last column holds the pseudo label's
    ignored (255) pixels; ground-truth 255 pixels are left out. matrix int64; pgt, gt (H, W) integer labels."""
    K = matrix.shape[0]
    valid = gt != ignore_index
    pred = np.where(pgt == ignore_index, K, pgt)[valid].astype(np.int64)
    matrix += np.bincount(gt[valid].astype(np.int64) * (K + 1) + pred, minlength=K * (K + 1)).reshape(K, K + 1)
    return matrix


def label_quality(matrix):
    """Pseudo-label precision / recall / IoU per class with ignored pixels counted (Deviation 15): a pixel the
    pseudo label ignores is a miss of its ground-truth class (recall, IoU) and no prediction (precision).
    -> {"precision", "recall", "iou": (K,) fractions, NaN where undefined; "miou": nanmean of iou}."""
    m = matrix.astype(np.float64)
    K = m.shape[0]
    tp, gt_count, pred_count = np.diag(m[:, :K]), m.sum(1), m[:, :K].sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(pred_count > 0, tp / pred_count, np.nan)
        recall = np.where(gt_count > 0, tp / gt_count, np.nan)
        union = gt_count + pred_count - tp
        iou = np.where(union > 0, tp / union, np.nan)
    nanmean = lambda v: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")  # noqa: E731
    return {"precision": precision, "recall": recall, "iou": iou, "miou": nanmean(iou),
            "mean_precision": nanmean(precision), "mean_recall": nanmean(recall)}


@torch.no_grad()
def make_pseudo_labels(ctx, s, sal0_dir):
    """The labels stage s trains on: s = 0 fuses the pre-trained classifier's CAMs with SAL_0; s > 0 uses the stage
    s - 1 network (Eq. (C12)-(C14)). Writes pseudo_labels/<s>/train/<id>.png (palette) and, for s > 0,
    pseudo_labels/<s>/train_saliency/<id>.png (soft saliency x 255) and vis/train_s<s>.png; scores the labels
    (and, at s = 0, the CAMs) on the seed split: pseudo_s<s>/train = mIoU on the pixels the labels do not ignore,
    with their coverage; pseudo_pr_s<s>/train = the paper's precision / recall / mIoU with the ignored pixels
    counted (Deviation 15). Rank 0 works, the others wait (Deviation 11)."""
    args, stage = ctx.args, f"labels{s}"
    ctx.reseed(20 + s)
    results = None
    if ctx.main:
        ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, seed=args.seed)
        model = build_model(args, ds.num_classes, "cls" if s == 0 else "stage").to(ctx.device)
        load_weights(model, ctx.stage_weights("cls" if s == 0 else f"stage{s - 1}")["model"], "the stage weights")
        model.eval()
        seg_dir, sal_dir = (ctx.run_dir / "pseudo_labels" / str(s) / d for d in ("train", "train_saliency"))
        if s > 0:  # data.save_mask makes seg_dir
            sal_dir.mkdir(parents=True, exist_ok=True)
        seed_ids = set(data.split_ids(ctx.spec.root, ctx.splits["seed"], ctx.spec.dataset))
        conf, sweep = miou.ConfusionMatrix(ds.num_classes), miou.ThresholdSweep(ds.num_classes)
        quality = np.zeros((ds.num_classes, ds.num_classes + 1), np.int64)  # Deviation 15
        ignored, total, rows = 0, 0, []
        for sample in each_sample(ctx, ds, f"pseudo labels {s}"):
            name, image, label = sample["name"], sample["image"], sample["label"]
            sal0 = read_saliency(sal0_dir / f"{name}.png", image.shape[:2])
            cams, sal, pgt = pseudo_label_maps(model, image, sal0, label, s, args, ctx.device)
            if s > 0:  # Deviation 17: rounded to 8 bits (official save_as_png truncates)
                Image.fromarray(np.clip(np.rint(sal * 255), 0, 255).astype(np.uint8)).save(sal_dir / f"{name}.png")
            data.save_mask(seg_dir / f"{name}.png", pgt)
            ignored, total = ignored + int((pgt == data.IGNORE_INDEX).sum()), total + pgt.size
            if name in seed_ids:
                keys = np.flatnonzero(label > 0)
                conf.update(pgt, sample["mask"], pred_ignore="exclude")
                label_quality_update(quality, pgt, sample["mask"])
                if s == 0:
                    sweep.update(np.clip(cams[keys], 0, 1), keys + 1, sample["mask"])
                if len(rows) < args.num_vis:
                    heat = (cams * (label > 0)[:, None, None]).max(0)
                    grey = np.repeat(np.clip(255 * sal, 0, 255).astype(np.uint8)[..., None], 3, -1)
                    rows.append([image, colour_cam(heat), grey, colour_labels(pgt), colour_labels(sample["mask"])])
        if rows:
            save_grid(ctx.run_dir / "vis" / f"train_s{s}.png", rows,
                      ["image", "CAM" if s == 0 else "propagated CAM", "saliency", "pseudo label", "ground truth"])
        p, names = conf.compute(), ds.class_names
        entry = miou_entry(p, names, coverage=100 * float(p["coverage"]))
        q = label_quality(quality)  # Deviation 15: the paper's numbers (85.6 / 42.9 / 40.6 at stage 0 on VOC)
        pr = miou_entry(q, names, precision=round(100 * q["mean_precision"], 2), recall=round(100 * q["mean_recall"], 2))
        results = {f"pseudo_s{s}/train": entry, "pseudo/train": entry,  # pseudo/train: the latest labels
                   f"pseudo_pr_s{s}/train": pr, "pseudo_pr/train": pr}
        record = {"stage": stage, "pseudo/train/miou": entry["miou"], "pseudo/train/coverage": entry["coverage"],
                  "pseudo/train/ignore_fraction": 100 * ignored / max(total, 1), "pseudo_pr/train/miou": pr["miou"],
                  "pseudo_pr/train/precision": pr["precision"], "pseudo_pr/train/recall": pr["recall"]}
        if s == 0:
            sw = sweep.compute()
            results["cam/train"] = miou_entry(sw["best"], names, threshold=sw["best_threshold"])
            record.update({"cam/train/miou": results["cam/train"]["miou"], "cam/train/threshold": sw["best_threshold"]})
        ctx.log(record, echo=True)
    ctx.finish_stage(stage, results=results)


# ==================================================================================================
# Train
# ==================================================================================================
# card §2, §6
def make_train_transform(args, crop, sal_dir=None, target="seg"):
    """Card §6: random rescale, h-flip, crop (labels pad 255, or 0 with --pad-as-background); with a saliency
    folder the sample's `target` labels (nearest: the pseudo labels "seg", or the ground truth "mask" under
    --supervision full) and saliency map (a float map: bilinear, pad 0; read here so that any size or mode is
    accepted) go through the same geometry, and padded pixels are marked invalid for L_sal."""
    def transform(sample, rng):
        image, masks, maps = sample["image"], (), ()
        if sal_dir is not None:
            masks, maps = (sample[target],), (read_saliency(sal_dir / f"{sample['name']}.png", image.shape[:2]),)
        image, masks, maps = augment.random_rescale(image, rng, masks=masks, maps=maps, ratio_range=tuple(args.scale_range))
        image, masks, maps = augment.random_hflip(image, rng, masks=masks, maps=maps)
        fill = 0 if args.pad_as_background else data.IGNORE_INDEX  # Deviation 5
        # Deviation 13: an image smaller than the crop lands at a random offset (official: top-left)
        image, masks, maps, box = augment.random_crop(image, rng, masks=masks, maps=maps, size=crop, mask_fill=fill)
        out = {"image": augment.to_tensor(image), "label": torch.as_tensor(sample["label"])}
        if sal_dir is not None:
            valid = np.full((crop, crop), float(args.pad_as_background), np.float32)  # Deviation 5
            valid[box[0]:box[1], box[2]:box[3]] = 1
            out.update(seg=augment.mask_to_tensor(masks[0]), sal=torch.as_tensor(np.ascontiguousarray(maps[0]),
                       dtype=torch.float32), sal_valid=torch.from_numpy(valid))
        return out

    return transform


def build_optimizer(model, lr, mult, momentum, wd):
    """SGD with the 1x / 10x groups (card §6). Deviation 4: momentum and wd default to the code's 0."""
    base, heads = model.param_groups()
    groups = [{"params": base, "lr": lr}, {"params": heads, "lr": lr * mult}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=momentum, weight_decay=wd)


def stage_iters(args, n_images, batch_size, epochs):
    """Iterations of a training stage: epochs x full batches, capped by --max-iters (Deviation 9)."""
    total = epochs * (n_images // batch_size)
    return min(total, args.max_iters) if args.max_iters else total


def train_step(net, batch, it, args, optimizer, autocast):
    """One iteration of a stage (card §4, §6): the variant's loss parts, Eq. (C10), one SGD step."""
    with autocast():
        parts = stage_losses(net(batch["image"]), batch, args)
    loss = total_loss(parts, args)  # Eq. (C10)
    log = {f"losses/{k}": v.item() for k, v in {**parts, "total": loss}.items()}
    check_finite(log, it)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return log


# --- Step P: classification pre-training (card §2, Deviation 6) ---
def train_cls(ctx, model):
    """Backbone + GAP + fc8 on the image labels with L_cls alone; the weights go to checkpoints/cls.pt."""
    args = ctx.args
    ctx.reseed(1)
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, seed=args.seed * 1000 + 1,
                         transform=make_train_transform(args, args.cls_crop_size))
    optimizer = build_optimizer(model, args.cls_lr, args.head_lr_mult, args.cls_momentum, args.cls_weight_decay)
    total = stage_iters(args, len(ds), args.cls_batch_size, args.epochs_cls)
    net = ctx.wrap(model).train()

    def step(batch, it):
        with ctx.autocast():
            loss = loss_cls(net(batch["image"])["cls_logits"], batch["label"])  # Eq. (C2)
        check_finite({"losses/cls": loss.item()}, it)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"losses/cls": loss.item(), "losses/total": loss.item()}

    train_loop(ctx, "cls", ds, args.cls_batch_size, total, step, {"model": model, "optimizer": optimizer},
               lr=lambda it: poly_lr(it, total, args.poly_power), salt=1)
    ctx.finish_stage("cls", weights={"model": model.state_dict()})


# --- Stages 0..S-1: the full network on the current pseudo labels (card §2) ---
def make_stage_dataset(ctx, s, sal0_dir):
    """Stage s reads the labels written for it (stage 0: the initial fusion labels; --supervision full: the ground
    truth) and the saliency pseudo labels of the same update (stage 0: the off-the-shelf maps, SAL_PGT^0 = SAL_0)."""
    args, root, full = ctx.args, ctx.run_dir / "pseudo_labels" / str(s), ctx.args.supervision == "full"
    sal_dir = sal0_dir if s == 0 else root / "train_saliency"
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, seed=args.seed * 1000 + 10 + s,
                         extra_dirs=None if full else {"seg": root / "train"},
                         transform=make_train_transform(args, args.crop_size, sal_dir, "mask" if full else "seg"))
    ds.saliency_dir = sal_dir  # bookkeeping, checked by the tests
    return ds


def train_stage(ctx, s, sal0_dir):
    """Stage s: fresh SGD and restarted poly schedule; stage 0 starts from the pre-trained backbone + classifier
    (new heads random), later stages from stage s - 1. Intermediate stages report seg_s<s>/val; the last one's
    weights are what --eval-only reads."""
    args, last = ctx.args, s == ctx.args.num_stages - 1
    ctx.reseed(10 + s)
    ds = make_stage_dataset(ctx, s, sal0_dir)
    model = build_model(args, ds.num_classes, "stage").to(ctx.device)
    init = ctx.stage_weights("cls" if s == 0 else f"stage{s - 1}")["model"]
    for name in ("backbone", "fc8") if s == 0 else ():  # card §2: the dense heads of stage 0 stay random
        if hasattr(model, name):
            part = {k.removeprefix(name + "."): v for k, v in init.items() if k.startswith(name + ".")}
            load_weights(getattr(model, name), part, "the pre-trained classification network")
    if s > 0:
        load_weights(model, init, f"the stage {s - 1} network")
    optimizer = build_optimizer(model, args.lr, args.head_lr_mult, args.momentum, args.weight_decay)
    total = stage_iters(args, len(ds), args.batch_size, args.epochs_per_stage)
    net = ctx.wrap(model).train()
    train_loop(ctx, f"stage{s}", ds, args.batch_size, total,
               lambda batch, it: train_step(net, batch, it, args, optimizer, ctx.autocast),
               {"model": model, "optimizer": optimizer}, lr=lambda it: poly_lr(it, total, args.poly_power), salt=10 + s)
    results = None
    if ctx.main and not last:  # the last stage's seg/val comes from the final evaluation
        val_set = data.SegDataset(ctx.spec.root, ctx.splits["val"], dataset=ctx.spec.dataset, seed=args.seed)
        results = {f"seg_s{s}/val": evaluate(ctx, model, val_set, post=False)["seg/val"]}
        ctx.log({"stage": f"stage{s}", "val/miou": results[f"seg_s{s}/val"]["miou"]}, echo=True)
    ctx.finish_stage(f"stage{s}", results=results, weights={"model": model.state_dict()}, final=last)


# ==================================================================================================
# Evaluate
# ==================================================================================================
# card §7
@torch.no_grad()
def predict_probs(model, image, device, scales=(1.0,), flip=False):
    """Softmax of the refined prediction R_seg (S_seg when the variant has no affinity), upsampled to the
    image, averaged over scales and flips (card §7 assumption). -> (C+1, H, W)."""
    H, W = image.shape[:2]
    acc = 0.0
    for s in scales:
        x = image_tensor(image if s == 1.0 else augment.rescale(image, s)[0], device)
        h, w = x.shape[2:]
        xs = torch.cat([x, x.flip(-1)]) if flip else x  # flipped before padding: both pads at the right
        # Deviation 18: padded to a multiple of the output stride, upsampled x8, cropped back to (h, w)
        xs = F.pad(xs, (0, -w % OUTPUT_STRIDE, 0, -h % OUTPUT_STRIDE))  # (1 or 2, 3, h', w'), multiples of 8
        seg_ref = model(xs)["seg_ref"].float()  # (1 or 2, C+1, h'/8, w'/8)
        logits = F.interpolate(seg_ref, scale_factor=OUTPUT_STRIDE, mode="bilinear", align_corners=False)[:, :, :h, :w]
        logits = F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)  # (1 or 2, C+1, H, W)
        probs = torch.softmax(logits, dim=1)
        if flip:
            probs = probs[:1] + probs[1:].flip(-1)
        acc = acc + probs[0]
    return (acc / (len(scales) * (2 if flip else 1))).cpu().numpy()


@torch.no_grad()
def evaluate(ctx, model, ds, post=True, vis_path=None):
    """mIoU of argmax predictions: seg/val (single scale, no post-processing: the ablation protocol) and, with
    post, seg_ms/val (--eval-scales / --eval-flip, when not the plain single scale) and seg_crf/val or
    seg_ms_crf/val (--eval-crf). vis_path: a grid image | CAM | prediction | ground truth of --num-vis images."""
    args = ctx.args
    model.eval()
    multi = post and (tuple(args.eval_scales) != (1.0,) or args.eval_flip)
    keys = ["seg"] + ["seg_ms"] * multi + ["seg_ms_crf" if multi else "seg_crf"] * (post and args.eval_crf)
    cm = {k: miou.ConfusionMatrix(ds.num_classes) for k in keys}
    rows = []
    for sample in each_sample(ctx, ds, "eval"):
        image, gt = sample["image"], sample["mask"]
        probs = {"seg": predict_probs(model, image, ctx.device)}
        if multi:
            probs["seg_ms"] = predict_probs(model, image, ctx.device, args.eval_scales, args.eval_flip)
        if keys[-1].endswith("crf"):
            # Impl. (xulianuwa/AuxSegNet, tool/imutils.py crf_inference_inf) = common.crf preset aux_mct; the paper
            # says "DeepLab's parameters" (Deviation 14).
            probs[keys[-1]] = crf.refine_probs(np.array(image), probs[keys[-2]], **crf.PRESETS["aux_mct"])
        for k in keys:
            cm[k].update(probs[k].argmax(0), gt)
        if vis_path is not None and len(rows) < args.num_vis:
            out = model(image_tensor(image, ctx.device))
            heat = np.zeros(gt.shape, np.float32)
            if "cam" in out:
                cam = F.interpolate(normalize_cam(out["cam"].float()), size=gt.shape, mode="bilinear", align_corners=False)
                heat = (cam[0].cpu().numpy() * (sample["label"] > 0)[:, None, None]).max(0)
            rows.append([image, colour_cam(heat), colour_labels(probs["seg"].argmax(0).astype(np.uint8)), colour_labels(gt)])
    if rows:
        save_grid(vis_path, rows, ["image", "CAM (present classes)", "prediction R_seg", "ground truth"])
    return {f"{k}/val": miou_entry(cm[k].compute(), ds.class_names) for k in keys}


# === Infrastructure: identical in all five scripts (edit one, copy to all) ===
# Plumbing, not the paper: command line, errors, device and DDP, seeding, run folder and log, checkpoints
# (loaded with weights_only=True), Ctrl-C / SIGTERM, the training loop, LR factors, metrics.json, pictures.
# tests/test_skeleton.py fails when the copies differ; `python tests/test_skeleton.py --sync cosa.py` copies one.
COMMON_CHOICES = {"preset": ("auto", "paper", "toy"), "device": ("auto", "cpu", "cuda"), "supervision": ("image", "full")}
COMMON_LIMITS = {"seed": ">=0", "workers": ">=0", "max_iters": ">=0", "stop_after": ">=0", "log_every": ">=1",
                 "ckpt_every": ">=1"}
RUNTIME_FLAGS = ("resume", "device", "workers", "stop_after")  # all that --resume may change
CKPT_FORMAT = "wsss-reference/1"
CKPT_KEYS = ("method", "args", "state", "payload", "rng", "weights")  # what Run.save() writes


def fail(msg, code=2):
    """Bad input: one line on stderr, exit code 2, no traceback (DESIGN.md, Errors)."""
    print(f"{METHOD}.py: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def check(ok, msg):
    if not ok:
        fail(msg)


class StopRun(Exception):
    """Stopped with a resumable checkpoint: --stop-after (exit code 0), SIGINT (130), SIGTERM (143)."""

    def __init__(self, msg, code=0):
        super().__init__(msg)
        self.code = code


class NonFinite(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def build_parser():
    """One flag per Args field, help = its comment; defaults are None so that the preset fills the rest."""
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(Args), flags=re.M))
    parser = ArgumentParser(prog=f"{METHOD}.py", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        paper, toy = (PRESETS[p].get(f.name, f.default) for p in ("paper_voc", "toy"))
        kw = dict(default=None, help=f"{comments.get(f.name, '')} [paper: {paper}; toy: {toy}]".replace("%", "%%"))
        if isinstance(f.default, bool):
            kw.update(action=argparse.BooleanOptionalAction)
        else:
            kw.update(type=type(f.default[0] if isinstance(f.default, tuple) else f.default),
                      choices={**COMMON_CHOICES, **CHOICES}.get(f.name), nargs="+" if isinstance(f.default, tuple) else None)
        parser.add_argument("--" + f.name.replace("_", "-"), **kw)
    return parser


def args_from(values):
    """Args from a dict (args.json, a checkpoint): unknown keys dropped, lists made tuples."""
    names = {f.name for f in dataclasses.fields(Args)}
    return Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})


def parse_args(argv=None):
    """Command line > preset > Args default -> (args, spec). --resume continues with the run's own args.json
    (only RUNTIME_FLAGS may change); --eval-only starts from the configuration stored in --ckpt."""
    given = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(build_parser().parse_args(argv)).items()
             if v is not None}
    if given.get("resume"):
        run_dir = Path(given["resume"])
        check((run_dir / "args.json").is_file() and (run_dir / "checkpoints" / "last.pt").is_file(),
              f"--resume {run_dir}: no args.json and checkpoints/last.pt there; give the folder of an earlier run")
        values = dataclasses.asdict(args_from(json.loads((run_dir / "args.json").read_text())))
        for k, v in given.items():
            check(k in RUNTIME_FLAGS or values[k] == v, f"--resume keeps the run's configuration; drop --{k.replace('_', '-')}")
        values.update(given, stop_after=given.get("stop_after", 0))  # a stop is for one process, not the run
    else:
        spec = data.resolve_data(given.get("data", Args.data))
        auto_toy = given.get("preset", "auto") == "auto" and spec.name == "toy"
        preset = "toy" if given.get("preset") == "toy" or auto_toy else f"paper_{spec.dataset}"
        values = {**dataclasses.asdict(Args()), **PRESETS[preset]}
        if given.get("eval_only") and given.get("ckpt"):  # the trained networks' configuration
            values.update(load_run_checkpoint(given["ckpt"], "--ckpt")["args"], out="", resume="", stop_after=0)
            preset = values["preset"]
        values.update(given, preset=preset)
    args = args_from(values)
    validate_common(args)
    return args, data.resolve_data(args.data)


def in_range(x, spec):
    """spec: '>0', '>=1', '[0,1]', '(0,1]', '[0,1)', '(0,1)'; any other spec is a bug in LIMITS."""
    if spec[0] in "[(" and spec[-1] in "])":
        lo, hi = (float(v) for v in spec[1:-1].split(","))
        return (x >= lo if spec[0] == "[" else x > lo) and (x <= hi if spec[-1] == "]" else x < hi)
    if spec.startswith(">="):
        return x >= float(spec[2:])
    if spec.startswith(">"):
        return x > float(spec[1:])
    raise ValueError(f"LIMITS spec {spec!r}: use '>a', '>=a' or an interval")


def validate_common(args):
    """The checks that every script needs, before anything is written: LIMITS (one per script), files, modes."""
    for name, spec in {**COMMON_LIMITS, **LIMITS}.items():
        value = getattr(args, name)
        check(all(math.isfinite(v) and in_range(v, spec) for v in (value if isinstance(value, tuple) else (value,))),
              f"--{name.replace('_', '-')} must be {spec}, got {value}")
    check(args.device != "cuda" or torch.cuda.is_available(), "--device cuda but no CUDA device is visible; use --device cpu")
    check(not (args.eval_only and args.resume), "--eval-only and --resume cannot be combined")
    check(args.ckpt or not args.eval_only, "--eval-only needs --ckpt FILE (checkpoints/last.pt of a finished run)")
    for flag in ("ckpt", "weights"):
        check(not getattr(args, flag) or Path(getattr(args, flag)).is_file(), f"--{flag} {getattr(args, flag)}: no such file")


def env_world():
    return int(os.environ.get("WORLD_SIZE", "1"))  # processes (torchrun), also before the process group exists


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast(obj):
    """Rank 0's (picklable) object on every rank."""
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_cat(t):
    """Concatenate (n_rank, ...) tensors over the ranks (n_rank may differ); identity without DDP."""
    if not dist.is_initialized():
        return t
    sizes = [None] * dist.get_world_size()
    dist.all_gather_object(sizes, t.shape[0])
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def unwrap(model):
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_everything(seed, deterministic=False):
    """Python, numpy and torch RNGs; cuDNN autotuning for the fixed-size crops unless --deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = deterministic, not deterministic


def seed_worker(worker_id):
    random.seed(torch.initial_seed() % 2**32)  # DataLoader's per-worker seed
    np.random.seed(torch.initial_seed() % 2**32)


def rng_state():
    """Every global RNG as tensors, strings and numbers, so that checkpoints load with weights_only=True."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, torch.tensor(mt), gauss], "torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate((state["python"][0], tuple(state["python"][1].tolist()), state["python"][2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, obj):
    """torch.save to a temporary file, then rename: a crash or SIGKILL mid-write leaves the previous file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, what):
    """torch.load(weights_only=True): tensors, numbers, strings, lists and dicts, never code; errors in one line."""
    check(Path(path).is_file(), f"{what} {path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # refused objects, truncated or foreign files
        if "GLOBAL" in str(e):
            fail(f"{what} {path} refused: it holds Python objects that could run code when loaded; give a plain state dict")
        fail(f"{what} {path} is not a readable torch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:80]})")


def load_run_checkpoint(path, what):
    """checkpoints/last.pt of a run of this script."""
    ckpt = load_checkpoint(path, what)
    check(isinstance(ckpt, dict) and ckpt.get("format") == CKPT_FORMAT,
          f"{what} {path} is not a run checkpoint; give checkpoints/last.pt of a {METHOD}.py run")
    check(ckpt.get("method", METHOD) == METHOD, f"{what} {path} was written by {ckpt.get('method')}.py, not by {METHOD}.py")
    missing = [k for k in CKPT_KEYS if k not in ckpt]  # a hand-made or cut-down dict: one line, not a KeyError
    check(not missing, f"{what} {path} is not a complete run checkpoint (no {', '.join(missing)}); give checkpoints/last.pt")
    check(isinstance(ckpt["args"], dict), f"{what} {path} is not a complete run checkpoint (args is not a dict)")
    return ckpt


def state_dict_of(obj, what):
    """The tensors of a weights file: a state dict, maybe under 'state_dict' / 'model', without DDP's 'module.'."""
    while isinstance(obj, dict) and isinstance(obj.get("state_dict", obj.get("model")), dict):
        obj = obj.get("state_dict", obj.get("model"))
    check(isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()), f"{what} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(module, state, what, ignore=()):
    """load_state_dict, failing in one line when keys or shapes do not fit (another method, backbone or number
    of classes); keys starting with one of `ignore` (an ImageNet classifier) are dropped first."""
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore))} if ignore else state
    own = module.state_dict()
    # BatchNorm's num_batches_tracked (PyTorch >= 0.4.1) is absent from older files such as torchvision's first
    # ResNet weights; load_state_dict fills it in, so it does not count as missing
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    check(not missing and not unexpected, f"{what} does not fit {type(module).__name__}: {len(missing)} missing keys "
          f"{missing[:1]}, {len(unexpected)} unexpected {unexpected[:1]}; saved for another method or backbone?")
    for k in (k for k in own if k in state):
        check(own[k].shape == state[k].shape,
              f"{what} does not fit: {k} is {tuple(state[k].shape)}, needs {tuple(own[k].shape)} (another number of classes?)")
    module.load_state_dict(state)


def timm_model(name, pretrained, **kwargs):
    """timm.create_model; without internet or cache --pretrained fails in one line that names the alternatives."""
    check(timm.is_model(name), f"unknown timm model '{name}'; pick one from timm.list_models()")
    if not pretrained:
        return timm.create_model(name, pretrained=False, **kwargs)
    import huggingface_hub
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no retry chatter before our one line
    try:  # an unreachable hub: read the cache at once instead of after a minute of retries
        socket.create_connection((urllib.parse.urlparse(huggingface_hub.constants.ENDPOINT).hostname, 443), 3).close()
    except OSError:
        huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        fail(f"no ImageNet weights for '{name}' ({type(e).__name__}): the hub is unreachable and they are not in the "
             f"cache {huggingface_hub.constants.HF_HUB_CACHE}; pass --weights FILE --no-pretrained, or connect once")


@contextlib.contextmanager
def run_guard():
    """How every run ends: bad data -> one line, exit 2; a stop -> the --resume command, exit 0 / 130 / 143;
    a non-finite loss -> exit 1; signal handlers and the process group restored in every case."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except data.DataError as e:
        fail(str(e))
    except NonFinite as e:
        fail(str(e), code=1)
    except StopRun as e:
        if is_main():
            print(e, flush=True)
        if e.code:
            raise SystemExit(e.code)
    except KeyboardInterrupt:  # a second Ctrl-C: no new checkpoint, the last complete one still resumes
        fail("interrupted at once; checkpoints/last.pt (if any) still resumes the run with --resume RUN_DIR", 130)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if dist.is_initialized():
            dist.destroy_process_group()


class Context:
    """One process of a run: args, data, device, DDP rank, run folder, log, stages, checkpoints and clock.
    state (saved in checkpoints/last.pt): the stage in progress and its iteration, the finished stages with
    their facts, all results so far, the seconds spent over resumes."""

    def __init__(self, args, spec):
        self.args, self.spec, self.splits = args, spec, data.default_splits(spec)
        self.world, self.rank = env_world(), int(os.environ.get("RANK", "0"))
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():  # rank-0-only stages may keep the others waiting for hours
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
        self.main, self.amp = self.rank == 0, args.amp and cuda
        if args.amp and not cuda and self.main:
            print("note: --amp is ignored on CPU (bf16 autocast is CUDA-only)")
        seed_everything(args.seed, args.deterministic)
        self.state = {"stage": "", "iteration": 0, "done": {}, "results": {}, "seconds": 0.0, "stage_start": 0.0,
                      "stage_seconds": {}}
        self.payload, self.weights, self.rng, self.signal, self.iters_this_process = {}, {}, None, 0, 0
        self.run_dir, self.t0 = None, time.time()

    def start(self):
        """The run folder (never an existing non-empty one) or, with --resume, the state of the stopped run; from
        here on SIGINT / SIGTERM stop at the next step with a checkpoint. Call it once the inputs are validated."""
        args = self.args
        if args.resume:
            self.run_dir = Path(args.resume)
            ckpt = load_run_checkpoint(self.run_dir / "checkpoints" / "last.pt", "--resume")
            self.state, self.payload, self.weights, self.rng = ckpt["state"], ckpt["payload"], ckpt["weights"], ckpt["rng"]
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path(args.out) if args.out else data.REPO_ROOT / "runs" / METHOD / f"{self.spec.name}-{stamp}"
            check(not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())),
                  f"--out {run_dir} exists and is not empty; choose a new folder or --resume it")
            self.run_dir = Path(broadcast(str(run_dir)))  # rank 0's clock names the folder
            barrier()  # every rank has checked the folder before rank 0 creates it
            if self.main:
                for sub in ("checkpoints", "vis", "pseudo_labels"):
                    (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
                (self.run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        self.t0 = time.time()
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self.on_signal)
        return self

    def on_signal(self, signum, frame):
        if self.signal:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum
        if self.main:
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (again: at once)",
                  file=sys.stderr, flush=True)

    def reseed(self, salt):
        """Each stage starts from its own seed: a run resumed at a stage boundary matches an uninterrupted one."""
        seed_everything(self.args.seed * 1000 + salt, self.args.deterministic)

    def seconds(self):
        return self.state["seconds"] + time.time() - self.t0

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp) if self.device.type == "cuda" \
            else torch.autocast("cpu", enabled=False)

    def wrap(self, model):
        """DistributedDataParallel under torchrun (unused parameters allowed: switches turn heads off)."""
        ids = [self.device.index] if self.device.type == "cuda" else None
        return model if self.world == 1 else nn.parallel.DistributedDataParallel(model, ids, find_unused_parameters=True)

    @property
    def results(self):
        return self.state["results"]

    def log(self, record, echo=False):
        if self.main:
            record = {**record, "time": round(self.seconds(), 1)}
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record, default=float) + "\n")
            if echo:
                tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def save(self, stage="", iteration=0, payload=None):
        """checkpoints/last.pt (rank 0): run state, the modules of the stage in progress, RNGs, final weights."""
        self.state.update(stage=stage, iteration=iteration, seconds=self.seconds())
        self.t0 = time.time()
        if self.main:
            save_checkpoint(self.run_dir / "checkpoints" / "last.pt", {
                "format": CKPT_FORMAT, "method": METHOD, "args": dataclasses.asdict(self.args), "state": self.state,
                "payload": payload or {}, "rng": rng_state(), "weights": self.weights})

    def done(self, stage):
        return stage in self.state["done"]

    def finish_stage(self, stage, results=None, weights=None, final=False, **facts):
        """A finished stage: rank 0's results (broadcast) join metrics.json, its weights go to checkpoints/<stage>.pt
        (final=True: into last.pt, which --eval-only reads), and a resumed run skips the stage."""
        results, facts = broadcast((results or {}, facts))
        self.state["results"].update(results)
        self.state["done"][stage] = facts
        self.state["stage_seconds"][stage] = round(self.seconds() - self.state["stage_start"], 1)
        self.state["stage_start"] = self.seconds()
        if weights is not None and final:
            self.weights = weights
        elif weights is not None and self.main:
            save_checkpoint(self.run_dir / "checkpoints" / f"{stage}.pt", weights)
        self.save()
        barrier()
        self.check_signal(f"after stage {stage}")

    def stage_weights(self, stage):
        """The weights a finished stage left (for a resumed run, a later stage or --eval-only)."""
        path = self.run_dir / "checkpoints" / f"{stage}.pt"
        return load_checkpoint(path, f"stage '{stage}' weights") if path.is_file() else self.weights

    def final_weights(self):
        """The trained networks: from --ckpt under --eval-only, else from this run's final stage."""
        weights = load_run_checkpoint(self.args.ckpt, "--ckpt")["weights"] if self.args.eval_only else self.weights
        check(weights, f"--ckpt {self.args.ckpt} holds no trained networks: that run had not finished")
        return weights

    def check_signal(self, where):
        """Outside a training loop a Ctrl-C stops here; the last checkpoint (the stage's start) resumes."""
        if self.signal:
            raise StopRun(self.stop_message(f"{signal.Signals(self.signal).name} {where}"), 128 + self.signal)

    def stop_message(self, why):
        return f"stopped ({why}); continue with: python {METHOD}.py --resume {self.run_dir}"

    def stop_code(self):
        """0 = go on, 1 = --stop-after reached, 130 / 143 = SIGINT / SIGTERM; the same on every rank."""
        code = 128 + self.signal if self.signal else int(0 < self.args.stop_after <= self.iters_this_process)
        if self.world > 1:
            t = torch.tensor([code], device=self.device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            code = int(t.item())
        return code


class EpochData(torch.utils.data.Dataset):
    """Index k = epoch * len + i -> dataset[i] at that epoch (then fn(sample) if given): augmentations depend on
    (seed, epoch, i) only (common.data.SegDataset), in persistent DataLoader workers too."""

    def __init__(self, dataset, fn=None):
        self.dataset, self.fn = dataset, fn

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, k):
        epoch, i = divmod(k, len(self.dataset))
        getattr(self.dataset, "set_epoch", int)(epoch)
        return self.dataset[i] if self.fn is None else self.fn(self.dataset[i])

    @staticmethod
    def keep(sample):  # no collation: samples stay numpy arrays
        return sample


class EpochSampler(torch.utils.data.Sampler):
    """DistributedSampler's per-epoch shuffle (drop_last), seeded by (seed, epoch) only, able to start at batch
    `skip`: a resumed run reads exactly the batches the uninterrupted run would have read."""

    def __init__(self, n, indices, per_rank, rank, world, seed):
        self.n, self.indices, self.per_rank, self.rank, self.world, self.seed = n, indices, per_rank, rank, world, seed
        self.per_epoch, self.epoch, self.skip = len(indices) // (per_rank * world), 0, 0

    def __len__(self):
        return (self.per_epoch - self.skip) * self.per_rank

    def __iter__(self):
        order = np.random.default_rng((*self.seed, self.epoch)).permutation(len(self.indices))
        mine = order[:self.per_epoch * self.per_rank * self.world][self.rank::self.world][self.skip * self.per_rank:]
        return iter([self.epoch * self.n + int(self.indices[j]) for j in mine])


def to_device(batch, device):
    """Tensors (in dicts) to the device; from pinned memory the copy is asynchronous."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch.to(device, non_blocking=True) if torch.is_tensor(batch) else batch


def train_loop(ctx, stage, datasets, batch_size, total_iters, step, modules, lr=None, salt=0, indices=None):
    """The loop of every training stage. datasets: one dataset, or {name: dataset} read in lockstep (batch =
    {name: batch}); batch_size is global; step(batch, it) is the paper's update and returns {name: float} for the
    log; modules {name: object with state_dict()} go into checkpoints/last.pt every --ckpt-every and come back
    on --resume; lr(it) scales each optimizer group's initial lr. --stop-after, SIGINT and SIGTERM end the
    current step, write the checkpoint and raise StopRun."""
    args, named = ctx.args, datasets if isinstance(datasets, dict) else {"": datasets}
    per_rank = batch_size // ctx.world
    samplers = [EpochSampler(len(ds), range(len(ds)) if indices is None else indices, per_rank, ctx.rank, ctx.world,
                             (args.seed, salt, j)) for j, ds in enumerate(named.values())]
    per_epoch = min(s.per_epoch for s in samplers)
    check(per_epoch > 0, f"{stage}: fewer training images than one batch of {batch_size}; lower the batch size")
    loaders = [torch.utils.data.DataLoader(EpochData(ds), per_rank, sampler=s, num_workers=args.workers, drop_last=True,
                                           pin_memory=ctx.device.type == "cuda", persistent_workers=args.workers > 0,
                                           worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(args.seed))
               for s, ds in zip(samplers, named.values())]  # own generator: iter() draws no global random number
    optimizers = [m for m in modules.values() if isinstance(m, torch.optim.Optimizer)]
    for g in (g for opt in optimizers for g in opt.param_groups):
        g.setdefault("initial_lr", g["lr"])
    it = 0
    if ctx.state["stage"] == stage and ctx.payload:  # --resume inside this stage
        for name, module in modules.items():
            module.load_state_dict(ctx.payload[name])
        it, ctx.payload = ctx.state["iteration"], {}
        set_rng_state(ctx.rng)
    groups = [g for opt in optimizers for g in opt.param_groups]  # after load_state_dict, which replaces them
    running = collections.defaultdict(list)
    bar = tqdm(total=total_iters, initial=it, desc=stage, disable=not ctx.main, mininterval=5, leave=False)
    while it < total_iters:
        epoch, skip = divmod(it, per_epoch)
        for s in samplers:
            s.epoch, s.skip = epoch, skip
        streams = [iter(loader) for loader in loaders]
        for _ in range(min(per_epoch - skip, total_iters - it)):
            t0 = time.perf_counter()
            batch = [to_device(next(s), ctx.device) for s in streams]
            batch, t1 = dict(zip(named, batch)) if isinstance(datasets, dict) else batch[0], time.perf_counter()
            for g in groups:
                g["lr"] = g["initial_lr"] * (lr(it) if lr else 1.0)
            for key, value in step(batch, it).items():
                running[key].append(value)
            running["time/data"].append(t1 - t0)
            running["time/step"].append(time.perf_counter() - t1)
            it, ctx.iters_this_process = it + 1, ctx.iters_this_process + 1
            bar.update(1)
            if it % args.log_every == 0 or it == total_iters:
                ctx.log({"stage": stage, "iteration": it, "epoch": epoch, "lr": groups[0]["lr"] if groups else 0.0,
                         **{k: float(np.mean(v)) for k, v in running.items()}}, echo=True)
                running.clear()
            code = ctx.stop_code()
            if it % args.ckpt_every == 0 or code:
                ctx.save(stage, it, {name: module.state_dict() for name, module in modules.items()})
            if code:
                bar.close()
                why = "--stop-after" if code == 1 else signal.Signals(code - 128).name
                raise StopRun(ctx.stop_message(f"{why} at iteration {it} of stage {stage}"), 0 if code == 1 else code)
    bar.close()


def check_finite(losses, it):
    """A non-finite loss stops training with its name and iteration (exit code 1)."""
    for key, value in losses.items():
        if not math.isfinite(float(value)):
            raise NonFinite(f"{key} is not finite ({float(value)}) at iteration {it}; lower --lr or check the data")


def each_sample(ctx, dataset, desc, fn=None, shard=False, limit=0):
    """Every sample of `dataset` (the first `limit`), read by --workers DataLoader workers; fn(sample) runs in
    the workers (CPU work such as CRFs; no CUDA there) and its result is yielded. shard: this rank's share only."""
    order = list(range(min(limit or len(dataset), len(dataset))))
    order = order[ctx.rank::ctx.world] if shard else order
    loader = torch.utils.data.DataLoader(EpochData(dataset, fn), batch_size=None, sampler=order,
                                         num_workers=ctx.args.workers, collate_fn=EpochData.keep, worker_init_fn=seed_worker,
                                         generator=torch.Generator().manual_seed(ctx.args.seed))
    for out in tqdm(loader, total=len(order), desc=desc, disable=not ctx.main, mininterval=5, leave=False):
        ctx.check_signal(f"during {desc}")
        yield out


def poly_lr(it, total, power=0.9):
    return max(0.0, 1.0 - it / total) ** power  # polynomial decay factor


def warmup_lr(it, warmup, start=0.0):
    return 1.0 if it >= warmup else start + (1.0 - start) * it / warmup  # linear warm-up factor, start -> 1


def cosine_lr(it, total, final=0.0):
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))  # 1 -> final


def miou_entry(result, class_names, **extra):
    """common.miou fractions -> metrics.json percentages; NaN (class absent from GT and prediction) -> null."""
    iou = {n: None if not np.isfinite(v) else round(100 * float(v), 2) for n, v in zip(class_names, result["iou"])}
    return {"miou": round(100 * float(result["miou"]), 2), "iou": iou, **extra}


def write_metrics(ctx, **extra):
    """metrics.json (written atomically) and the summary; the last line printed is the RESULT line."""
    if not ctx.main:
        return
    metrics = {"method": METHOD, "dataset": ctx.spec.name, "preset": ctx.args.preset, "supervision": ctx.args.supervision,
               "device": ctx.device.type, "seconds": round(ctx.seconds(), 1), "stage_seconds": ctx.state["stage_seconds"],
               "primary": "seg/val", **extra, "results": ctx.results}
    (ctx.run_dir / "metrics.json.tmp").write_text(json.dumps(metrics, indent=1, default=float))
    os.replace(ctx.run_dir / "metrics.json.tmp", ctx.run_dir / "metrics.json")
    for key, value in ctx.results.items():
        print(f"{key}: mIoU={value['miou']:.2f}" + (f" (threshold {value['threshold']})" if "threshold" in value else ""))
    print(f"run folder: {ctx.run_dir}  ({metrics['seconds']:.1f} s)")
    seg = ctx.results.get("seg/val")
    print(f"RESULT {METHOD} seg/val mIoU=" + (f"{seg['miou']:.2f}" if seg else "n/a (this run has no segmentation stage)"))


def colour_labels(mask):
    return data.voc_palette()[mask]  # (H, W) labels -> (H, W, 3) VOC colours, 255 = ignore in its own colour


def colour_cam(cam):
    """(H, W) in [0, 1] -> (H, W, 3) uint8 blue-to-red heat map."""
    c = np.clip(np.nan_to_num(cam), 0, 1)[..., None]
    return (255 * np.clip(1.5 - np.abs(4 * c - np.array([3, 2, 1])), 0, 1)).astype(np.uint8)


def save_grid(path, rows, captions, cell=128):
    """A picture that explains itself: one row per image, one captioned column per panel (image | CAM | ...);
    each (H, W, 3) uint8 tile is scaled to fit a cell x cell square."""
    grid = Image.new("RGB", (cell * len(captions), 16 + cell * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, caption in enumerate(captions):
        draw.text((c * cell + 3, 2), caption, fill=(0, 0, 0), font=ImageFont.load_default())
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            im = Image.fromarray(np.ascontiguousarray(tile))
            scale = cell / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            grid.paste(im.resize(size, Image.NEAREST if scale >= 1 else Image.BOX), (c * cell, 16 + r * cell))
    Path(path).parent.mkdir(parents=True, exist_ok=True)  # a resumed run whose vis/ was deleted
    grid.save(path)
# === End of infrastructure ===


# ==================================================================================================
# Main
# ==================================================================================================
def main(argv=None):
    """Card §2: classification pre-training, then per stage s its pseudo labels and its training; card §7's
    evaluation of the last stage's network into metrics.json."""
    with run_guard():
        args, spec = parse_args(argv)
        validate(args)
        ctx = Context(args, spec)
        # data and networks are built (and validated) before anything is written
        train_set = data.SegDataset(spec.root, ctx.splits["train"], dataset=spec.dataset, seed=args.seed)
        val_set = data.SegDataset(spec.root, ctx.splits["val"], dataset=spec.dataset, seed=args.seed)
        sal0_dir = Path(args.saliency_dir) if args.saliency_dir else Path(spec.root) / "saliency"
        if not args.eval_only:
            check_saliency(sal0_dir, train_set.ids)  # stage-0 labels of every variant need SAL_0 (card §1)
        fresh = not (args.resume or args.eval_only)
        model = build_model(args, val_set.num_classes, "stage" if args.eval_only else "cls", init_weights=fresh)
        model.to(ctx.device)
        if args.eval_only:  # the trained network, checked before anything is written
            load_weights(model, ctx.final_weights()["model"], f"--ckpt {args.ckpt}")
        ctx.start()
        if ctx.main and (spec.root / "toy_version.txt").is_file() and not args.eval_only:  # Deviation 10: toy saliency
            ctx.log({"note": f"saliency maps in {sal0_dir} are GT-derived stand-ins (toy dataset): they leak "
                             f"pixel-level ground truth; toy mIoU exercises the pipeline only"}, echo=True)
        if not args.eval_only:
            if not ctx.done("cls"):
                train_cls(ctx, model)
            for s in range(args.num_stages):
                # --supervision full trains the segmentation branch on the ground truth: no stage-0 fusion labels
                if not ctx.done(f"labels{s}") and (s > 0 or args.supervision == "image"):
                    make_pseudo_labels(ctx, s, sal0_dir)
                if not ctx.done(f"stage{s}"):
                    train_stage(ctx, s, sal0_dir)
            model = build_model(args, val_set.num_classes, "stage").to(ctx.device)
            load_weights(model, ctx.final_weights()["model"], "the trained network")
        if ctx.main:
            ctx.results.update(evaluate(ctx, model, val_set, vis_path=ctx.run_dir / "vis" / "val.png"))
            if not args.eval_only:
                ctx.results[f"seg_s{args.num_stages - 1}/val"] = ctx.results["seg/val"]
        write_metrics(ctx, variant=args.variant, stages=args.num_stages)


if __name__ == "__main__":
    main()
