"""Weakly Supervised Co-training with Swapping Assignments for Semantic Segmentation (CoSA)
Xinyu Yang, Hossein Rahmani, Sue Black, Bryan M. Williams. ECCV 2024. https://arxiv.org/abs/2402.17891
Official code: youshyee/CoSA (a different recipe from the paper; see Deviations and methods/cosa.md §8).

What the paper does. One ViT network gives three outputs: a final-layer CAM M, an earlier-layer CAM M†
and a segmentation map S. An online network (ON, trained by gradient on a strong view) learns from an
assignment network (AN, an EMA of ON, run on the pixel-aligned weak view at several scales + flips).
The AN's assignments are *swapped*: CAM pseudo-labels (CPL, from M') supervise ON's segmentation
(CAM2Seg) and segmentation pseudo-labels (SPL, from S') supervise ON's CAM (Seg2CAM, "guided CAMs").
Three add-ons: RAW (per-pixel CAM2Seg weights from a CAM "perplexity"), DT (a dynamic fg/bg threshold
from a 2-component GMM fitted on a queue of AN confidences) and CSC (contrastive separation of M using
the confident regions of the AN's earlier-layer CAM M†'). Single stage, no CAM refinement.

Reading guide:
    Sec. 3.1  guiding CAMs, classification loss        -> CoSANet, loss_cls()
    Fig. 1, Tab. 4a  GT / noise guidance, detach       -> guidance_target(), train_step() (--gc-source, --gc-detach)
    Tab. 2 "•", Fig. 8  M'+M†' ensemble, ON vs AN      -> evaluate() (cam_ens/*), periodic_eval() (--eval-every)
    Sec. 3.2  ON + AN, swapped assignments, EMA        -> assign(), ema_update(), train_step()
    Sec. 3.3  CPL, perplexity, RAW, dynamic threshold  -> cam_pseudo_label(), perplexity(), loss_c2s(),
                                                          DynamicThreshold
    Sec. 3.4  SPL, Seg2CAM, contrastive separation     -> segmentation_pseudo_label(), loss_s2c(),
                                                          contrastive_regions(), loss_csc()
    Alg. 1    one training iteration                   -> train_step()
    Supp. B   schedule, augmentations (Tab. 12-14)     -> PRESETS, TrainTransform, lr_factor()
    (silent)  input normalisation                      -> input_mean_std(), to_input()
    Card §7   evaluation (multi-scale + flip of AN)     -> evaluate()

Equation map:
    Eq. (1)  L_cls, multi-label soft-margin on Z = W . GMP(F), both heads -> loss_cls()
    Eq. (2)  L_swap = L_c2s(S, M') + L_s2c(M, S')                           -> train_step()
    Eq. (3)  CPL: argmax(M')+1 where nu >= xi, else 0                       -> cam_pseudo_label()
    Eq. (4)  perplexity P from the normalised distance of nu to xi          -> perplexity()
    Eq. (5)  RAW-weighted CAM2Seg cross-entropy                             -> loss_c2s()
    Eq. (6)  dynamic threshold xi* from a 2-component GMM on a queue        -> DynamicThreshold, gmm_threshold()
             (Alg. 1 l.13 with M'; M†' reuses xi*, Deviation 11)             -> train_step()
    Eq. (7)  SPL = softmax(S'/tau) with absent classes masked               -> segmentation_pseudo_label()
    Eq. (8)  L_s2c, BCE between sigmoid(M) and the SPL                      -> loss_s2c()
    Eq. (9)  positive / negative regions from low-perplexity M†' cells      -> contrastive_regions()
    Eq. (10) L_csc, InfoNCE-style contrastive separation of M               -> loss_csc()
    Eq. (11) L_CoSA = L_cls + L_cls† + l_c2s(L_c2s + L_c2s†) + l_s2c L_s2c + l_csc L_csc -> train_step()

Notation: M, M† (B, C, h, w) raw ON CAMs on the token grid; M', M†' (B, C, H, W) AN CAMs after the
multi-scale ensemble, min-max normalisation and label filtering; S (B, C+1, h, w) ON segmentation
logits, S' the AN's; nu = max_c M'; xi the threshold (xi† for M†'). C counts foreground classes only.

Deviations (paper -> this file; the card's open choices are flags with the defaults named here):
    1. Eq. (5)'s printed normaliser is garbled ((P_ij P_xy)^-1 in one sum). We use the card's reading:
       reliability 1/P normalised to mean 1 over the valid pixels R, i.e. sum(P^-1 CE) / sum(P^-1).
    2. Eq. (6) is solved as the crossing point of the two weighted GMM densities between the means
       (grid search on [0.01, 0.99]); the official code takes the largest bg-cluster sample instead (card §5;
       per card §8 item 3 its released configs and logs have DT off, usegmm=False, and its rungmm, when on, fits
       3 components with a low and a high threshold).
       Values <= 0.05 are dropped before fitting (official code, utils/seg_helper.py gmmfilter_thre);
       xi = 0.45 is used until the queue holds Q/10 batches (the card's choice: the official code starts
       from a queue of uniform noise and EMA-smooths xi with decay 0.99). The official code refits scikit-learn's
       GaussianMixture on all queued values (~300K at the paper's Q) twice per iteration (0.4-2.4 s on
       a CPU, longer than a GPU step); we keep the queue as 1000-bin histograms and run EM on the bins
       to convergence, warm-started from the last fit (0.3-30 ms). Against scikit-learn run to
       convergence on the same values the threshold agrees within 0.005 (tests/test_cosa.py); the
       official fit stops at tol 1e-3 after 5-13 EM steps and can differ from the converged one by ~0.03.
    3. Eq. (10) leaves l_d, tau and the pair scope open: cosine similarity (--csc-sim), tau_c = 0.1
       (--tau-csc) and pairs within each image (--csc-scope). Eq. (10) reuses the symbol tau, whose only
       value in the paper is the SPL's 0.01 (Sec. 4.1); read literally, tau_c = 0.01 turns cosine
       similarities in [-1, 1] into logits in [-100, 100], so every anchor's loss is decided by its single
       hardest negative (the card's default 0.1 is the common InfoNCE range). The official code has no CSC
       to settle it; --tau-csc 0.01 gives the literal reading (on toy v3 it costs 7-9 points: README, CoSA).
       It is computed on the token grid (the full-resolution version is O((HW)^2)).
    4. The M† ensemble max-merges the scales like M' (Alg. 1); the official code keeps only the last
       scale for M†, by accident (card §8.8). --ms-cam-merge sum gives the code's scale merge for CAMs.
    5. Head LR x10 and the 1.5K-iteration LR warm-up come from the official code; the paper only says
       "AdamW, 6e-5, polynomial decay". Inputs are normalised with the backbone's own pretrained config
       (timm pretrained_cfg: mean = std = 0.5 for vit_base_patch16_224.orig_in21k_ft_in1k; the paper is
       silent). The official code uses ImageNet mean/std with these 0.5/0.5 weights: --input-norm imagenet,
       which the toy preset keeps (its runs were trained with it; Args, and so checkpoints, record it).
    6. Evaluation uses the AN at the end of training, without checkpoint selection on val. The primary
       seg/val is NOT filtered by ground-truth image labels; seg_gtcls/val is (the protocol of the
       paper's 76.2 / 51.0, evaluation_engine.py "Seg_vd").
    7. seg/val is the multi-scale + flip prediction (the official code's protocol, evaluation_engine.py;
       the paper does not state its test-time scales), although DESIGN.md reserves plain "seg" for
       single-scale predictions; the issue asks for it under this key.
    8. The official code's recipe (band CPL, fg/bg-balanced CE, ReLU in Seg2CAM, CRF-energy loss,
       card §8) is not implemented; only the paper's equations are.
    9. Pseudo-label queues are shared across DDP ranks (all_gather), so every rank uses one xi.
   10. The toy preset departs from card §10 to fit 2 CPU cores: 64 px crops (8 x 8 tokens), AN scales
       {1.0, 0.5}, 1,800 iterations (300 of loss warm-up), CPL quality on the first 200 train ids, and
       evaluation at 128 x 128 (the toy images are 96-128 px): the fully supervised bound (--supervision full,
       toy v4, seed 0, 1 thread) was 79.55 with 1,200 iterations at 96 x 96, 82.24 for the same network
       evaluated at 128 x 128, 85.86 with 1,800 iterations at 128 x 128.
   11. M†' uses the xi* solved from M' (Alg. 1: l.13 solves Eq. (6) "with M'", l.17 repeats l.14-17, after
       the solve, "with M†'") for CPL†, P† and the Eq. (9) regions: --xi-aux shared. The official code keeps
       a second queue for M†' (camaux_queue) and its own threshold xi†: --xi-aux separate.
   12. cam/*.miou is the best background threshold of a sweep scored on the same split's ground truth
       (val included), so it is optimistic; metrics.json says so next to it ("threshold_selection") and
       keeps miou_fixed_threshold (the fixed --cam-threshold 0.5, official bkg_thre) beside it, which is
       the figure to compare with Table 2.
   13. --no-sa is read as m = 0 (the AN is the current ON, run without gradient on the weak view at all
       scales); the paper does not define "w/o SA". Every Table 3 row keeps L_cls† and L_c2s† (card §9).
   14. CoSA* (--crf): the unary is the softmax of the mean of the 10 views' logits; the official code
       sums them (about 10x sharper).
   15. Not implemented: Tab. 4b's C-mIoU (the paper does not list its coexistence classes; cam/*.iou keeps
       the per-class IoU, so the mean over any chosen list follows from it); Fig. 5's M vs M† curves (M's curve
       is eval_online|eval_assign/cam/val of --eval-every, but no key scores M† alone: cam_ens/* is the mean of
       M' and M†', and Fig. 5(b) scores only cells with P <= eps, a partial-map mIoU the paper does not define);
       CoSA-MS (separate R101 / WR38 / Swin segmentation networks trained on the CPL: another pipeline, not
       this single-stage method); the VOC test-server export (no public test masks, nothing here could score it).

Run:
    python cosa.py                                    (toy data, CPU, minutes)
    python cosa.py --data VOC2012                     (CUDA, paper settings: ViT-B/16, 448 crop, 20K it)
    python cosa.py --data COCO2014                    (CUDA, paper settings: batch 8, 40K it)
    python cosa.py --ablation base                    (Table 3a rows: base, gc, gc_sa, ..., full)
    python cosa.py --supervision full                 (upper bound: ground-truth masks replace the CPL of Eq. (5))
    python cosa.py --gc-source gt                     (Fig. 1 / Tab. 4a oracle: ground-truth masks guide the CAMs)
    python cosa.py --gc-detach feat                   (Tab. 4a: F detached in Seg2CAM; "cls" detaches W)
    python cosa.py --eval-every 100                   (Fig. 8: mIoU of ON and AN on val, in log.jsonl)
    torchrun --nproc_per_node=2 cosa.py --data VOC2012
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


METHOD = "cosa"


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
    # --- model (Sec. 4.1, card §3) ---
    backbone: str = "vit_base_patch16_224.orig_in21k_ft_in1k"  # ViT-B/16, official jx_vit_base_p16_224
    backbone_kwargs: str = ""  # extra timm.create_model ints, e.g. "patch_size=8,embed_dim=128"
    aux_block: int = -3  # M† from this block (official aux_layer -3 = block 10 of 12)
    decoder_dim: int = 512  # LargeFOV width (Sec. 4.1, [8])
    decoder_dilation: int = 5  # LargeFOV dilation (official models/decoder)
    # --- data and schedule (Supp. B, card §6) ---
    crop: int = 448  # Sec. 4.1
    scale_min: float = 0.5  # rescale range, Tab. 12
    scale_max: float = 2.0  # rescale range, Tab. 12
    strong_magnitudes: str = "paper"  # appearance-op magnitudes: paper (Tab. 14) | code (randaug.py)
    batch_size: int = 4  # global batch: 2 GPUs x 2 (Supp. B)
    iters: int = 20000  # Supp. B (VOC)
    warmup_iters: int = 1500  # LR warm-up (official utils/torch_helper.py)
    loss_warmup: int = 6000  # iterations with only L_cls + L_cls† (Supp. B)
    lr: float = 6e-5  # Sec. 4.1
    head_lr_mult: float = 10.0  # classifiers + decoder (official --lrscale)
    weight_decay: float = 0.01  # AdamW (official)
    poly_power: float = 0.9  # polynomial decay (official)
    ema_m: float = 0.9994  # Sec. 4.1, Tab. 8d
    # --- pseudo labels and losses (Sec. 4.1) ---
    pseudo_scales: tuple = (1.0, 0.5, 1.5)  # AN input scales (official pseudo_scales)
    ms_cam_merge: str = "max"  # CAM scale merge: max (Alg. 1) | sum (official code)
    lambda_c2s: float = 0.1  # Eq. (11)
    lambda_s2c: float = 0.05  # Eq. (11)
    lambda_csc: float = 0.1  # Eq. (11)
    tau_spl: float = 0.01  # Eq. (7) temperature
    tau_csc: float = 0.1  # Eq. (10) temperature (open choice, card §4)
    csc_sim: str = "cosine"  # Eq. (10) l_d: cosine | dot (open choice)
    csc_scope: str = "image"  # Eq. (9) pairs per image | across the batch (open choice)
    ppl_alpha: float = 0.8  # Eq. (4) lambda_alpha
    ppl_beta: float = 1.0  # Eq. (4) lambda_beta
    ppl_eps: float = 1.0  # Eq. (9) low-pass perplexity filter epsilon
    queue_len: int = 100  # Eq. (6) GMM queue length Q (batches)
    dt_init: float = 0.45  # Eq. (6) threshold before the queue is warm (card §5)
    fixed_thr: float = 0.45  # threshold with --no-dt (Fig. 12 best fixed value)
    gmm_min: float = 0.05  # queue values <= this are dropped before fitting (official gmmfilter_thre)
    xi_aux: str = "shared"  # threshold of M†' (CPL†, P†, Eq. (9)): shared = xi* of M' (Alg. 1) | separate = own DT queue (official)
    gc_source: str = "spl"  # Seg2CAM target (Fig. 1, Tab. 4a): spl (the method) | gt (oracle: GT masks) | noise (random masks)
    gc_detach: str = "none"  # Tab. 4a stop-gradient inside Seg2CAM only: none | feat (F detached: W learns) | cls (W detached)
    # --- component switches (Table 3) ---
    ablation: str = "full"  # Table 3a row: base | gc | gc_sa | gc_sa_raw | gc_sa_csc | gc_sa_raw_csc | full
    # positive names, so that argparse's --no-X form turns a component off (a field named no_X would read
    # --no-X as "no_X = False": BooleanOptionalAction negates every flag that starts with --no-)
    gc: bool = True  # guided CAMs (Seg2CAM); --no-gc: lambda_s2c = 0
    sa: bool = True  # swapping assignments (EMA AN); --no-sa: m = 0, AN = current ON weights
    raw: bool = True  # RAW weights in CAM2Seg; --no-raw: plain CE (w = 1)
    csc: bool = True  # contrastive separation; --no-csc: lambda_csc = 0
    dt: bool = True  # dynamic threshold; --no-dt: the fixed threshold --fixed-thr
    # --- evaluation (card §7) ---
    eval_size: int = 448  # val images are resized to eval_size^2 (official evaluation_engine.py)
    eval_scales: tuple = (1.0, 0.5, 1.5, 0.75, 1.25)  # official evaluation_engine.py
    eval_batch: int = 8  # images per evaluation batch (all resized to eval_size)
    cam_threshold: float = 0.5  # fixed bg threshold for CPL quality (official bkg_thre)
    seed_eval_limit: int = 0  # evaluate CPL on the first N ids of the seed split (0 = all)
    crf: bool = False  # CoSA*: dense CRF on the AN's softmax (preset "cosa", 1 iteration)
    input_norm: str = "backbone"  # input mean/std: backbone = the timm pretrained config's (0.5/0.5 for ViT-B/16) | imagenet
    num_vis: int = 8  # val images drawn into vis/
    eval_every: int = 0  # > 0: every N iterations, ON and AN mIoU on val into log.jsonl (Fig. 8 ON vs AN); 0 = off
    eval_limit: int = 0  # val images for --eval-every (0 = all)


PRESETS = {
    "paper_voc": dict(pretrained=True),  # the Args defaults are the paper's VOC settings
    "paper_coco": dict(pretrained=True, batch_size=8, iters=40000, loss_warmup=10000),  # Supp. B (COCO)
    # card §10: random-init small ViT, 8 px patches; EMA horizon 1/(1-m) = 100 it ~ T/12 as in the paper
    # (pitfall 9). CPU budget: 64 px crops (8x8 tokens) and AN scales {1.0, 0.5} (the 1.5 scale alone
    # costs 2/3 of the AN pass); the paper preset keeps 448 px and {1.0, 0.5, 1.5}.
    "toy": dict(pretrained=False, backbone="vit_tiny_patch16_224",
                backbone_kwargs="img_size=64,patch_size=8,embed_dim=128,depth=6,num_heads=4",
                crop=64, batch_size=8, iters=1800, warmup_iters=100, loss_warmup=300, lr=3e-4,
                ema_m=0.99, queue_len=20, pseudo_scales=(1.0, 0.5), decoder_dim=128, decoder_dilation=2,
                eval_size=128, eval_scales=(1.0, 0.5, 1.5), workers=0, seed_eval_limit=200, ckpt_every=300,
                log_every=100, eval_batch=32, input_norm="imagenet"),
}
# Table 3a rows: which components are OFF
ABLATIONS = {
    "base": ("gc", "sa", "raw", "csc", "dt"),
    "gc": ("sa", "raw", "csc", "dt"),
    "gc_sa": ("raw", "csc", "dt"),
    "gc_sa_raw": ("csc", "dt"),
    "gc_sa_csc": ("raw", "dt"),
    "gc_sa_raw_csc": ("dt",),
    "full": (),
}
CHOICES = {"ms_cam_merge": ("max", "sum"), "strong_magnitudes": ("paper", "code"), "csc_sim": ("cosine", "dot"),
           "csc_scope": ("image", "batch"), "ablation": tuple(ABLATIONS), "xi_aux": ("shared", "separate"),
           "gc_source": ("spl", "gt", "noise"), "gc_detach": ("none", "feat", "cls"),
           "input_norm": ("backbone", "imagenet")}
LIMITS = {"crop": ">=16", "batch_size": ">=1", "iters": ">=1", "warmup_iters": ">=0", "loss_warmup": ">=0", "lr": ">0",
          "head_lr_mult": ">0", "ema_m": "[0,1]", "pseudo_scales": ">0", "eval_scales": ">0", "tau_spl": ">0",
          "tau_csc": ">0", "ppl_alpha": "(0,1)", "ppl_beta": ">0", "ppl_eps": ">0", "queue_len": ">=1", "dt_init": "(0,1)",
          "fixed_thr": "(0,1)", "cam_threshold": "(0,1)", "lambda_c2s": ">=0", "lambda_s2c": ">=0", "lambda_csc": ">=0",
          "eval_size": ">=16", "eval_batch": ">=1", "seed_eval_limit": ">=0", "decoder_dim": ">=1", "decoder_dilation": ">=1",
          "eval_every": ">=0", "eval_limit": ">=0"}


def validate(args):
    """The Table 3a row turns its components off; checks that LIMITS cannot express."""
    for switch in ABLATIONS[args.ablation]:
        setattr(args, switch, False)
    check(args.batch_size % env_world() == 0, f"--batch-size {args.batch_size} (global) is not divisible by the "
          f"{env_world()} processes")
    check(not args.crf or crf.available(), "--crf needs pydensecrf (pip install pydensecrf2); or drop --crf")



# ==================================================================================================
# Model
# ==================================================================================================
# Sec. 3.1, Sec. 4.1 "Implementation Details", card §3
def parse_backbone_kwargs(text):
    kwargs = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip().removeprefix("-").isdigit():
            fail(f"--backbone-kwargs item '{item}' is not name=integer (e.g. 'patch_size=8,embed_dim=128')")
        kwargs[key.strip()] = int(value)
    return kwargs


def create_backbone(args, pretrained):
    """timm ViT whose position embedding is re-interpolated (bicubic) to every input size."""
    kwargs = dict(num_classes=0, dynamic_img_size=True, drop_path_rate=0.0, **parse_backbone_kwargs(args.backbone_kwargs))
    try:
        vit = timm_model(args.backbone, pretrained, **kwargs)
    except TypeError as e:
        fail(f"timm cannot build '{args.backbone}' with {kwargs}: {e}; CoSA needs a plain ViT (vit_*)")
    check(hasattr(vit, "blocks") and hasattr(vit, "_pos_embed"),
          f"backbone '{args.backbone}' is not a timm VisionTransformer; CoSA needs block outputs of a ViT")
    return vit


class LargeFOV(nn.Module):
    """DeepLab-LargeFOV head [8] as in ToCo/CoSA: two dilated 3x3 convs + 1x1 classifier, no bias/BN."""

    def __init__(self, in_dim, dim, num_out, dilation):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, dim, 3, padding=dilation, dilation=dilation, bias=False)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=dilation, dilation=dilation, bias=False)
        self.classifier = nn.Conv2d(dim, num_out, 1, bias=False)

    def forward(self, x):
        return self.classifier(F.relu(self.conv2(F.relu(self.conv1(x)))))


class CoSANet(nn.Module):
    """Backbone + two bias-free FC heads W, W† + LargeFOV decoder. ON and AN share this architecture.

    forward(x (B, 3, H, W)) -> dict with
        cls_logits, cls_logits_aux  Z, Z† (B, C)            Eq. (1), GMP on the features, then W
        cam, cam_aux                M, M† (B, C, h, w)      raw CAMs W * F and W† * F†, h = H / patch
        seg                         S (B, C+1, h, w)        segmentation logits from F
    """

    def __init__(self, backbone, num_classes, aux_block=-3, decoder_dim=512, decoder_dilation=5):
        super().__init__()
        self.backbone = backbone
        dim = backbone.embed_dim
        depth = len(backbone.blocks)
        if not -depth <= aux_block < depth - 1 and aux_block != -1:
            fail(f"--aux-block {aux_block} is outside the {depth} blocks of the backbone (use -{depth}..-2)")
        self.aux_block = aux_block
        self.classifier = nn.Conv2d(dim, num_classes, 1, bias=False)  # W
        self.classifier_aux = nn.Conv2d(dim, num_classes, 1, bias=False)  # W†
        self.decoder = LargeFOV(dim, decoder_dim, num_classes + 1, decoder_dilation)

    def features(self, x):
        """F: final tokens after the last norm; F†: tokens of block `aux_block`, un-normed (card §3)."""
        vit = self.backbone
        B = x.shape[0]
        tokens = vit.patch_embed(x)  # (B, h, w, D) with dynamic_img_size
        h, w = tokens.shape[1:3]
        tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))  # (B, prefix + h*w, D)
        outputs = []
        for block in vit.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        n = vit.num_prefix_tokens  # the class token runs through the blocks, then is discarded

        def to_map(t):  # (B, prefix + h*w, D) -> (B, D, h, w)
            return t[:, n:].transpose(1, 2).reshape(B, -1, h, w)

        return to_map(vit.norm(outputs[-1])), to_map(outputs[self.aux_block])

    def forward(self, x):
        feat, feat_aux = self.features(x)
        # Eq. (1): Z = W . G with G = GMP(F): pool the features, then classify (not GMP of the CAM)
        cls_logits = self.classifier(feat.amax(dim=(2, 3), keepdim=True)).flatten(1)  # (B, C)
        cls_logits_aux = self.classifier_aux(feat_aux.amax(dim=(2, 3), keepdim=True)).flatten(1)
        return {"cls_logits": cls_logits, "cls_logits_aux": cls_logits_aux,
                "cam": self.classifier(feat), "cam_aux": self.classifier_aux(feat_aux),  # (B, C, h, w)
                "seg": self.decoder(feat),  # (B, C+1, h, w); F is not detached
                "feat": feat}  # F (B, D, h, w), for the Tab. 4a detach variants


def build_model(args, num_classes, *, init_weights):
    """ON / AN architecture; init_weights: ImageNet weights (--pretrained) or --weights FILE into the backbone."""
    backbone = create_backbone(args, pretrained=init_weights and args.pretrained and not args.weights)
    if init_weights and args.weights:  # an ImageNet classifier in the file is dropped
        what = f"--weights {args.weights}"
        load_weights(backbone, state_dict_of(load_checkpoint(args.weights, "--weights"), what), what, ignore=("head.",))
    return CoSANet(backbone, num_classes, args.aux_block, args.decoder_dim, args.decoder_dilation)


@torch.no_grad()
def ema_update(assign_net, online_net, m):
    """Sec. 3.2: Theta' <- m Theta' + (1 - m) Theta, after every optimiser step (warm-up included)."""
    for p_a, p_o in zip(assign_net.parameters(), online_net.parameters()):
        p_a.mul_(m).add_(p_o.detach(), alpha=1.0 - m)
    for b_a, b_o in zip(assign_net.buffers(), online_net.buffers()):
        b_a.copy_(b_o)


# ==================================================================================================
# Losses
# ==================================================================================================
# one function per equation
def loss_cls(cls_logits, labels):
    """Eq. (1): L_cls = -1/C sum_c [Y_c log sigma(Z_c) + (1 - Y_c) log(1 - sigma(Z_c))], batch mean."""
    # Eq. (1)
    return F.multilabel_soft_margin_loss(cls_logits, labels)


def perplexity(nu, xi, alpha=0.8, beta=1.0):
    """Eq. (4): P = [-log(lambda_alpha d)]^lambda_beta, d = normalised distance of nu to xi in [0, 1].

    nu: max CAM confidence (any shape) in [0, 1]; xi: threshold in (0, 1)."""
    # Eq. (4)  d = (nu - xi)/(1 - xi) above the threshold, (xi - nu)/xi below it
    d = torch.where(nu >= xi, (nu - xi) / (1 - xi), (xi - nu) / xi)
    d = d.clamp(1e-6, 1.0)  # P -> inf at nu = xi (pitfall 6)
    # Eq. (4)
    return (-torch.log(alpha * d)) ** beta


def loss_c2s(seg_logits, cpl, ppl=None):
    """Eq. (5): CAM2Seg cross-entropy, weighted per pixel by normalised reliability 1/P (RAW).

    seg_logits: S upsampled to the crop (B, C+1, H, W); cpl: (B, H, W) with 255 = not in R;
    ppl: perplexity (B, H, W), or None for plain CE (w = 1, --no-raw)."""
    ce = F.cross_entropy(seg_logits.float(), cpl, ignore_index=data.IGNORE_INDEX, reduction="none")  # (B, H, W)
    valid = cpl != data.IGNORE_INDEX  # R
    if not valid.any():
        return seg_logits.sum() * 0.0
    if ppl is None:
        return ce[valid].mean()
    reliability = 1.0 / ppl[valid]
    # Deviation 1: the printed normaliser is garbled; reliability 1/P is normalised to mean 1 over R
    # Eq. (5)  w_xy = |R| P_xy^-1 / sum_R P_ij^-1
    weight = reliability / reliability.mean()
    # Eq. (5)  L_c2s = 1/|R| sum_R w_xy CE(S_xy, Y^CPL_xy)
    return (weight * ce[valid]).mean()


def loss_s2c(cam, spl):
    """Eq. (8): Seg2CAM, BCE between sigmoid(M) and the foreground SPL channels on the token grid.

    cam: ON's M (B, C, h, w) raw; spl: Y^SPL (B, C+1, H, W) from Eq. (7)."""
    target = F.interpolate(spl[:, 1:], size=cam.shape[-2:], mode="bilinear", align_corners=False)  # (B, C, h, w)
    # Eq. (8)  -1/(C|R|) sum_c sum_R [T_c log sigma(M_c) + (1 - T_c) log(1 - sigma(M_c))]
    return F.binary_cross_entropy_with_logits(cam.float(), target)


def loss_csc(cam, region_labels, omega, tau=0.1, sim="cosine", scope="image"):
    """Eq. (10): contrastive separation of ON's CAM vectors M_i over the low-perplexity cells Omega.

    cam: M (B, C, h, w) with gradient; region_labels: CPL of M†' on the grid (B, h, w); omega: (B, h, w)
    bool (Eq. (9)). For anchor i, positives R+_i share its label, negatives R-_i do not:
        L = -1/|Omega'| sum_i 1/|R+_i| sum_{p in R+_i} log L_ip / (L_ip + sum_{n in R-_i} L_in),
    L_ip = exp(l_d(M_i, M_p) / tau); anchors without positives are skipped (Omega' of the card)."""
    C = cam.shape[1]
    vectors = cam.float().flatten(2).transpose(1, 2)  # (B, h*w, C)
    labels, keep = region_labels.flatten(1), omega.flatten(1)  # (B, h*w)
    if scope == "batch":
        vectors, labels, keep = vectors.reshape(1, -1, C), labels.reshape(1, -1), keep.reshape(1, -1)
    losses = []
    for v, y, k in zip(vectors, labels, keep):
        v, y = v[k], y[k]  # (n, C), (n,)
        if v.shape[0] < 2:
            continue
        if sim == "cosine":
            v = F.normalize(v, dim=1, eps=1e-6)
        logits = v @ v.t() / tau  # (n, n) = l_d(M_i, M_p) / tau
        same = y[:, None] == y[None, :]
        positive = same & ~torch.eye(len(y), dtype=torch.bool, device=y.device)  # Eq. (9) R+
        negative = ~same  # Eq. (9) R-
        # log K_i = log sum_{n in R-_i} L_in; a finite fill keeps rows without negatives NaN-free (K_i = 0)
        log_k = logits.masked_fill(~negative, -1e9).logsumexp(dim=1, keepdim=True)  # (n, 1)
        # Eq. (10)  log L_ip / (L_ip + K_i), via log-sum-exp
        log_prob = logits - torch.logaddexp(logits, log_k)
        n_pos = positive.sum(1)
        anchors = n_pos > 0  # Omega'
        if not anchors.any():
            continue
        # Eq. (10)
        losses.append(-((log_prob * positive).sum(1)[anchors] / n_pos[anchors]).mean())
    if not losses:
        return cam.sum() * 0.0
    return torch.stack(losses).mean()


# ==================================================================================================
# Pseudo labels
# ==================================================================================================
# Sec. 3.3-3.4, Alg. 1 lines 7-10, card §5
def normalise_cam(cam):
    """ReLU, then per-(image, class) min-max over space: values in [0, 1], max ~1 for active classes."""
    cam = F.relu(cam)
    lo = cam.amin(dim=(2, 3), keepdim=True)
    hi = cam.amax(dim=(2, 3), keepdim=True)
    return (cam - lo) / (hi - lo + 1e-5)


@torch.no_grad()
def multiscale_predict(net, images, scales, out_size, cam_merge="max"):
    """Alg. 1 lines 7-9: run `net` on every scale (and, from [53] and the official code, not Alg. 1, on its
    h-flip), resize to out_size, ensemble.

    images (B, 3, H, W) -> cam, cam_aux (B, C, *out_size) ReLU'd (not normalised), seg (B, C+1, *out_size).
    CAMs: max over the flip pair, then max (Alg. 1) or sum (code) over scales; S: mean over the views."""
    B, _, H, W = images.shape
    cams, cams_aux, segs = [], [], []

    def resize(t):
        return F.interpolate(t.float(), size=out_size, mode="bilinear", align_corners=False)

    for s in scales:
        # Impl. (youshyee/CoSA, utils/seg_helper.py multi_scale_camseg): size floor(s * H), bilinear
        size = (int(s * H), int(s * W))
        x = images if size == (H, W) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        out = net(torch.cat([x, x.flip(-1)]))  # (2B, ...): the image and its mirror in one pass
        for key, store in (("cam", cams), ("cam_aux", cams_aux)):
            # Impl. (youshyee/CoSA, utils/seg_helper.py): ReLU per view before merging (same as after for max)
            m = F.relu(resize(out[key]))
            store.append(torch.maximum(m[:B], m[B:].flip(-1)))  # un-flip, max over the pair
        seg = resize(out["seg"])
        segs.append((seg[:B] + seg[B:].flip(-1)) / 2)
    # Alg. 1 line 9: Maxpool over scales for M' and M†' (Deviation 4: the code sums, and keeps only the
    # last scale for M†), Avgpool for S'
    merge = (lambda t: torch.stack(t).amax(0)) if cam_merge == "max" else (lambda t: torch.stack(t).sum(0))
    return merge(cams), merge(cams_aux), torch.stack(segs).mean(0)


@torch.no_grad()
def assign(assign_net, images, labels, scales, cam_merge="max"):
    """The AN's assignments on the weak view: M', M†' (B, C, H, W) normalised and filtered by Y,
    and S' (B, C+1, H, W) logits (Eq. (7) masks its absent classes)."""
    cam, cam_aux, seg = multiscale_predict(assign_net, images, scales, images.shape[-2:], cam_merge)
    keep = labels[:, :, None, None]  # absent classes -> 0
    return normalise_cam(cam) * keep, normalise_cam(cam_aux) * keep, seg


def cam_pseudo_label(cam, xi, box=None):
    """Eq. (3): Y^CPL = argmax_c M' + 1 where nu = max_c M' >= xi, else 0 (background).

    cam: filtered, normalised M' (B, C, H, W); box: (B, 4) valid (y0, y1, x0, x1), 255 outside.
    Returns (cpl (B, H, W) int64, nu (B, H, W))."""
    nu, idx = cam.max(dim=1)
    # Eq. (3)
    cpl = torch.where(nu >= xi, idx + 1, torch.zeros_like(idx))
    if box is not None:
        cpl = cpl.masked_fill(~box_mask(box, cam.shape[-2:], cam.shape[-2:]), data.IGNORE_INDEX)
    return cpl, nu


def box_mask(box, grid, crop):
    """(B, 4) crop boxes -> (B, *grid) bool, True where the cell centre lies inside the real image."""
    gh, gw = grid
    ys = (torch.arange(gh, device=box.device) + 0.5) * crop[0] / gh  # cell centres in crop pixels
    xs = (torch.arange(gw, device=box.device) + 0.5) * crop[1] / gw
    y0, y1, x0, x1 = (box[:, i, None] for i in range(4))
    inside_y = (ys[None] >= y0) & (ys[None] < y1)  # (B, gh)
    inside_x = (xs[None] >= x0) & (xs[None] < x1)  # (B, gw)
    return inside_y[:, :, None] & inside_x[:, None, :]


def segmentation_pseudo_label(seg_logits, labels, tau=0.01):
    """Eq. (7): S' with absent classes at a large negative value, then softmax(S'/tau) over C+1 channels.

    seg_logits: S' (B, C+1, H, W); labels: Y (B, C). The background channel is never masked."""
    present = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1) > 0  # (B, C+1)
    # Eq. (7): -1e5 instead of -inf keeps the softmax NaN-free (pitfall 5)
    masked = seg_logits.float().masked_fill(~present[:, :, None, None], -1e5)
    # Eq. (7)
    return torch.softmax(masked / tau, dim=1)


def guidance_target(source, mask, labels, size):
    """Fig. 1 / Tab. 4a guidance other than the SPL, one-hot (B, C+1, *size) like Y^SPL: "gt" = the ground-truth
    mask (oracle; 255 -> background), "noise" = every pixel a random label among background and the image's classes."""
    C1 = labels.shape[1] + 1
    if source == "gt":
        target = mask.masked_fill(mask == data.IGNORE_INDEX, 0)
    else:
        present = torch.cat([torch.ones_like(labels[:, :1]), labels], dim=1)  # (B, C+1)
        target = (torch.rand(labels.shape[0], C1, *size, device=labels.device) * present[:, :, None, None]).argmax(1)
    return F.one_hot(target.long(), C1).permute(0, 3, 1, 2).float()


def contrastive_regions(cam_aux, xi, box, grid, alpha=0.8, beta=1.0, eps=1.0):
    """Eq. (9): labels and the low-perplexity set Omega of M†' on the token grid.

    cam_aux: M†' (B, C, H, W) -> bilinear to `grid`; returns (labels (B, h, w), omega (B, h, w) bool)."""
    small = F.interpolate(cam_aux, size=grid, mode="bilinear", align_corners=False)  # (B, C, h, w)
    labels, nu = cam_pseudo_label(small, xi)  # Eq. (3) on the grid, with xi†
    # Eq. (9)  Omega = {P <= eps}, cells inside the crop's real image only
    omega = (perplexity(nu, xi, alpha, beta) <= eps) & box_mask(box, grid, cam_aux.shape[-2:])
    return labels, omega


def fit_gmm(counts, centres, init=None, iters=300, tol=1e-8):
    """EM for a 2-component 1-D Gaussian mixture on a histogram (bin centres weighted by their counts).

    init: (mu, var, pi) of an earlier fit to warm-start from; else the means start at the extreme occupied
    bins with equal weights and the sample variance (scikit-learn's GaussianMixture with means_init at the
    min / max). Returns (mu, var, pi), each of shape (2,)."""
    w = counts / counts.sum()
    occupied = centres[counts > 0]
    if init is None or not np.all(np.isfinite(np.concatenate(init))) or min(init[2]) < 1e-3:
        var0 = float((w * (centres - (w * centres).sum()) ** 2).sum()) + 1e-6
        mu, var, pi = np.array([occupied[0], occupied[-1]]), np.full(2, var0), np.full(2, 0.5)
    else:
        mu, var, pi = (np.array(v, dtype=np.float64) for v in init)
    prev = -np.inf
    for _ in range(iters):
        log_p = np.log(pi) - 0.5 * np.log(2 * np.pi * var) - (centres[:, None] - mu) ** 2 / (2 * var)  # (bins, 2)
        log_norm = np.logaddexp(log_p[:, 0], log_p[:, 1])
        resp = np.exp(log_p - log_norm[:, None]) * w[:, None]  # responsibilities, weighted by the bin mass
        nk = resp.sum(0) + 1e-12
        mu = (resp * centres[:, None]).sum(0) / nk
        var = (resp * (centres[:, None] - mu) ** 2).sum(0) / nk + 1e-6  # + scikit-learn's reg_covar
        pi = nk / nk.sum()
        ll = float((w * log_norm).sum())
        if ll - prev < tol:
            break
        prev = ll
    return mu, var, pi


def gmm_threshold(mu, var, pi):
    """Eq. (6) from a fitted 2-component GMM: xi* = crossing point of the weighted densities
    pi_bg N(x | mu_bg, s_bg) and pi_fg N(x | mu_fg, s_fg) between the two means (Deviation 2).
    A split of the samples at xi* maximises the Eq. (6) likelihood whenever the GMM assignment switches
    once between the means."""
    bg, fg = np.argsort(mu)

    def log_density(t, k):
        return np.log(pi[k]) - 0.5 * np.log(2 * np.pi * var[k]) - (t - mu[k]) ** 2 / (2 * var[k])

    # Deviation 2: crossing point of the weighted densities (the code: the largest bg-cluster sample)
    grid = np.round(np.arange(0.01, 0.99 + 1e-9, 0.001), 3)
    between = grid[(grid > mu[bg]) & (grid < mu[fg])]
    fg_wins = between[log_density(between, fg) >= log_density(between, bg)]
    if len(fg_wins):
        return float(fg_wins[0])
    return float(np.clip((mu[bg] + mu[fg]) / 2, 0.01, 0.99))  # no switch between the means: the midpoint


def queue_rows(cam, grid):
    """The nu values that one batch adds to the DT queue: the C normalised maps downsampled to the token grid,
    then the max over classes (the official code's order; taking the max first would smooth a different map).
    (B, C, H, W) -> (B, h*w)."""
    # Impl. (youshyee/CoSA; methods/cosa.md, DT "Queue"): F.interpolate to the token grid, then the class max
    return F.interpolate(cam, size=grid, mode="bilinear", align_corners=False).amax(1).flatten(1)


class DynamicThreshold:
    """Eq. (6) on a FIFO queue of the nu maps of the last Q batches (one instance per CAM).

    The queue is kept as one 1000-bin histogram per batch (Deviation 2), so that push() costs one histogram on
    the device and update() one EM on 1000 bins, warm-started from the previous fit: neither grows with Q.
    Before Q/10 batches are queued, `value` is the start-up threshold (card §5)."""

    bins = 1000

    def __init__(self, queue_len, init=0.45, min_value=0.05):
        self.queue = collections.deque(maxlen=queue_len)
        self.init, self.min_value, self.value = init, min_value, init
        self.total, self.gmm = np.zeros(self.bins, np.int64), None
        self.centres = (np.arange(self.bins) + 0.5) / self.bins

    def push(self, nu):
        """nu: (B, h*w) confidences in [0, 1] of one batch, on any device."""
        nu = nu.detach().float().flatten()
        # Impl. (youshyee/CoSA, utils/seg_helper.py rungmm, gmmfilter_thre 0.05): drop the spike of zeros
        hist = torch.histc(nu[nu > self.min_value], bins=self.bins, min=0.0, max=1.0)
        if dist.is_initialized():  # every rank's rows: one xi for all ranks (Deviation 9)
            dist.all_reduce(hist)
        hist = hist.round().long().cpu().numpy()
        if len(self.queue) == self.queue.maxlen:
            self.total -= self.queue[0]
        self.queue.append(hist)
        self.total += hist

    def update(self):
        if len(self.queue) < max(1, math.ceil(self.queue.maxlen / 10)):  # Deviation 2: start-up value
            return self.value
        occupied = self.centres[self.total > 0]
        if self.total.sum() >= 10 and occupied[-1] - occupied[0] > 1e-3:
            # Eq. (6)
            self.gmm = fit_gmm(self.total.astype(np.float64), self.centres, self.gmm)
            self.value = gmm_threshold(*self.gmm)
        return self.value

    def state_dict(self):
        gmm = [torch.from_numpy(np.asarray(v)) for v in self.gmm] if self.gmm is not None else []
        return {"queue": [torch.from_numpy(q) for q in self.queue], "value": self.value, "gmm": gmm}

    def load_state_dict(self, state):
        self.queue.clear()
        self.queue.extend(q.numpy() for q in state["queue"])
        self.total = np.sum(list(self.queue), axis=0) if self.queue else np.zeros(self.bins, np.int64)
        self.value = state["value"]
        self.gmm = tuple(v.numpy() for v in state["gmm"]) if state["gmm"] else None


# ==================================================================================================
# Train
# ==================================================================================================
class TrainTransform:
    """Tab. 12-14: ONE geometric transform (rescale, h-flip, crop with black padding and its `box`),
    then weak = GaussianBlur(p 0.5) of the crop and strong = OneOf(appearance ops) of the weak view,
    so the two views are pixel-aligned (pitfall 7)."""

    def __init__(self, crop, scale_range=(0.5, 2.0), magnitudes="paper", strong_op=None, with_mask=False, mean_std=None):
        self.crop, self.scale_range, self.magnitudes, self.strong_op = crop, scale_range, magnitudes, strong_op
        self.mean_std = mean_std  # input_mean_std(args); None = ImageNet
        self.with_mask = with_mask  # --supervision full: the ground truth follows the same geometry

    def __call__(self, sample, rng):
        masks = (sample["mask"],) if self.with_mask else ()
        image, masks, _ = augment.random_rescale(sample["image"], rng, masks=masks, ratio_range=self.scale_range)
        image, masks, _ = augment.random_hflip(image, rng, masks=masks, p=0.5)
        # Impl. (youshyee/CoSA, dataloaders/transforms.py): black padding = pixel 0 before normalisation
        image, masks, _, box = augment.random_crop(image, rng, self.crop, masks=masks, image_fill=(0, 0, 0))
        weak = augment.gaussian_blur(image, rng, p=0.5, radius=(0.1, 2.0))
        strong = augment.appearance_oneof(weak, rng, magnitudes=self.magnitudes, op=self.strong_op)
        out = {"weak": to_input(weak, self.mean_std), "strong": to_input(strong, self.mean_std),
               "label": torch.as_tensor(sample["label"], dtype=torch.float32), "box": torch.as_tensor(box, dtype=torch.int64)}
        if masks:
            out["mask"] = augment.mask_to_tensor(masks[0])  # (H, W) int64, 255 outside the image
        return out


def input_mean_std(args):
    """Input normalisation (Deviation 5): the backbone's own pretrained config (timm pretrained_cfg; mean = std
    = 0.5 for vit_base_patch16_224.orig_in21k_ft_in1k), or ImageNet mean/std (--input-norm imagenet: the
    official code, and the toy preset, whose runs were trained with it). Args (and so checkpoints) keep it."""
    if args.input_norm == "imagenet":
        return tuple(data.IMAGENET_MEAN), tuple(data.IMAGENET_STD)
    cfg = timm.get_pretrained_cfg(args.backbone)
    check(cfg is not None and cfg.mean is not None, f"timm has no pretrained config (mean/std) for '{args.backbone}'; "
          f"use --input-norm imagenet")
    return tuple(float(v) for v in cfg.mean), tuple(float(v) for v in cfg.std)


def to_input(image, mean_std=None):
    """uint8 (H, W, 3) -> float32 (3, H, W) normalised by mean_std = (mean, std); None = ImageNet (common.augment)."""
    if mean_std is None or mean_std == (tuple(data.IMAGENET_MEAN), tuple(data.IMAGENET_STD)):
        return augment.to_tensor(image)
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in mean_std)
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))).float() / 255.0
    return (x - mean) / std


def lr_factor(t, total, warmup, power=0.9, warmup_ratio=1e-6):
    """Linear warm-up from 1e-6 x lr, then lr (1 - t/T)^0.9, t counted from 0 (Deviation 5)."""
    # Impl. (youshyee/CoSA, utils/torch_helper.py): PolyWarmupAdamW's multiplier
    if t < warmup:
        return 1.0 - (1.0 - warmup_ratio) * (1.0 - t / warmup)
    return max(0.0, 1.0 - t / total) ** power


def build_optimizer(net, args):
    """AdamW; classifiers W, W† and the decoder at head_lr_mult x lr (Deviation 5)."""
    # Impl. (youshyee/CoSA, args.py --lrscale 10): heads at 10 x lr, weight decay 0.01 in every group
    backbone = list(net.backbone.parameters())
    heads = [p for n, p in net.named_parameters() if not n.startswith("backbone.")]
    return torch.optim.AdamW([{"params": backbone, "lr": args.lr}, {"params": heads, "lr": args.lr * args.head_lr_mult}],
                             lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)


def train_step(online, assign_net, batch, it, args, thresholds, optimizer, autocast):
    """Alg. 1, one iteration. Returns a dict of floats (losses, thresholds) for logging."""
    model = unwrap(online)
    x_w, x_s, labels, box = batch["weak"], batch["strong"], batch["label"], batch["box"]
    # loss warm-up: only the two classification losses before; the decoder gets no gradient (grad None,
    # so AdamW's weight decay leaves it alone too)
    losses_on = it >= args.loss_warmup
    # the AN also runs for the last Q warm-up iterations so that the DT queue is warm when losses start
    run_assign = losses_on or (args.dt and it >= args.loss_warmup - args.queue_len)
    log = {}
    grid = (args.crop // model.backbone.patch_embed.patch_size[0],) * 2
    if run_assign:
        with autocast():
            cam_a, cam_aux_a, seg_a = assign(assign_net, x_w, labels, args.pseudo_scales, args.ms_cam_merge)
        if args.dt:
            # Deviation 11: xi† has its own queue only with --xi-aux separate (official camaux_queue)
            queued = ((cam_a, thresholds[0]),) + (((cam_aux_a, thresholds[1]),) if args.xi_aux == "separate" else ())
            for cam, threshold in queued:  # threshold: a DynamicThreshold (args.dt is the on/off switch)
                threshold.push(queue_rows(cam, grid))
                threshold.update()
    if not args.dt:
        xi = xi_aux = args.fixed_thr
    else:  # Alg. 1 l.13 solves Eq. (6) with M' only; l.17 repeats l.14-17 for M†' with that xi* (Deviation 11)
        xi = thresholds[0].value
        xi_aux = thresholds[1].value if args.xi_aux == "separate" else xi
    log["dt/xi"], log["dt/xi_aux"] = xi, xi_aux

    with autocast():
        out = online(x_s)
    # Eq. (1) for both heads
    l_cls = loss_cls(out["cls_logits"].float(), labels)
    l_cls_aux = loss_cls(out["cls_logits_aux"].float(), labels)
    total = l_cls + l_cls_aux
    log.update({"losses/cls": l_cls.item(), "losses/cls_aux": l_cls_aux.item()})
    if losses_on:
        crop = x_s.shape[-2:]
        seg_up = F.interpolate(out["seg"].float(), size=crop, mode="bilinear", align_corners=False)  # (B, C+1, H, W)
        l_c2s_terms = []
        for cam, thr in ((cam_a, xi), (cam_aux_a, xi_aux)):  # CPL from M' and from M†'; both supervise S
            cpl, nu = cam_pseudo_label(cam, thr, box)  # Eq. (3)
            ppl = perplexity(nu, thr, args.ppl_alpha, args.ppl_beta) if args.raw else None  # Eq. (4)
            if args.supervision == "full":  # the fully supervised upper bound: ground truth instead of the CPL
                cpl, ppl = batch["mask"], None
            l_c2s_terms.append(loss_c2s(seg_up, cpl, ppl))  # Eq. (5)
        l_c2s, l_c2s_aux = l_c2s_terms
        if args.gc_source == "spl":
            spl = segmentation_pseudo_label(seg_a, labels, args.tau_spl)  # Eq. (7)
        else:  # Fig. 1 / Tab. 4a: ground-truth (oracle) or random-noise guidance instead of the SPL
            spl = guidance_target(args.gc_source, batch.get("mask"), labels, crop)
        cam_s2c = out["cam"]
        if args.gc_detach != "none":  # Tab. 4a: M = W * F with F or W detached, in Seg2CAM only
            feat, weight = out["feat"], model.classifier.weight
            cam_s2c = F.conv2d(feat.detach(), weight) if args.gc_detach == "feat" else F.conv2d(feat, weight.detach())
        l_s2c = loss_s2c(cam_s2c, spl)  # Eq. (8)
        # Eq. (2)  the swapped assignments: CPL (from M') -> S and SPL (from S') -> M
        l_swap = args.lambda_c2s * (l_c2s + l_c2s_aux) + (args.lambda_s2c if args.gc else 0.0) * l_s2c
        if not args.csc:
            l_csc = torch.zeros((), device=x_s.device)  # Table 3 rows without CSC
        else:  # Deviation 3: on the token grid, cosine l_d, tau_c = 0.1, pairs per image (flags)
            region_labels, omega = contrastive_regions(cam_aux_a, xi_aux, box, out["cam"].shape[-2:],
                                                       args.ppl_alpha, args.ppl_beta, args.ppl_eps)  # Eq. (9)
            l_csc = loss_csc(out["cam"], region_labels, omega, args.tau_csc, args.csc_sim, args.csc_scope)  # Eq. (10)
            log["csc/omega"] = omega.float().mean().item()
        # Eq. (11)  L = L_cls + L_cls† + l_c2s (L_c2s + L_c2s†) + l_s2c L_s2c + l_csc L_csc
        total = total + l_swap + args.lambda_csc * l_csc
        log.update({"losses/c2s": l_c2s.item(), "losses/c2s_aux": l_c2s_aux.item(),
                    "losses/s2c": l_s2c.item(), "losses/csc": l_csc.item()})
    log["losses/total"] = total.item()
    check_finite({k: v for k, v in log.items() if k.startswith("losses/")}, it)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    # Sec. 3.2: EMA after every step; --no-sa (m = 0) makes the AN the current ON
    ema_update(assign_net, model, args.ema_m if args.sa else 0.0)
    return log


def periodic_eval(ctx, online, assign_net, val_set):
    """Fig. 8: mIoU of the ON and of the AN on val during training (--eval-every; rank 0 evaluates)."""
    out = {}
    if ctx.main:
        for name, net in (("online", online), ("assign", assign_net)):
            res = evaluate(net, val_set, ctx.args, ctx.device, limit=ctx.args.eval_limit, autocast=ctx.autocast())
            out.update({f"eval_{name}/{k}/val": res[k]["miou"] for k in ("seg", "seg_gtcls", "cam")})
        online.train()  # evaluate() put it in eval mode; the AN stays in eval mode
    return out


def train_cosa(ctx, online, assign_net, val_set=None):
    """Alg. 1 for the whole schedule: ON trained on the strong view, AN = EMA of ON, two DT queues (M', M†').
    val_set: for --eval-every (Fig. 8)."""
    args = ctx.args
    transform = TrainTransform(args.crop, (args.scale_min, args.scale_max), args.strong_magnitudes,
                               with_mask=args.supervision == "full" or args.gc_source == "gt", mean_std=input_mean_std(args))
    train_set = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, seed=args.seed,
                                transform=transform)
    optimizer = build_optimizer(online, args)
    thresholds = [DynamicThreshold(args.queue_len, args.dt_init, args.gmm_min) for _ in range(2)]
    net = ctx.wrap(online).train()
    total = args.max_iters or args.iters

    def step(batch, it):
        log = train_step(net, assign_net, batch, it, args, thresholds, optimizer, ctx.autocast)
        if args.eval_every and val_set is not None and (it + 1) % args.eval_every == 0:
            log.update(periodic_eval(ctx, online, assign_net, val_set))
        return log

    modules = {"online": online, "assign": assign_net, "optimizer": optimizer, "dt": thresholds[0],
               "dt_aux": thresholds[1]}
    train_loop(ctx, "cosa", train_set, args.batch_size, total, step, modules,
               lr=lambda it: lr_factor(it, total, args.warmup_iters, args.poly_power))


# ==================================================================================================
# Evaluate
# ==================================================================================================
# card §7: the AN, multi-scale + flip
CAM_THRESHOLD_NOTE = ("miou: best bg threshold of a sweep on this split's own ground truth (optimistic); "
                      "miou_fixed_threshold: the fixed --cam-threshold")


@torch.no_grad()
def evaluate(net, dataset, args, device, *, seg=True, limit=0, label_dir=None, vis_path=None, autocast=None):
    """AN multi-scale + flip evaluation on one split (card §7).

    Images are resized to eval_size^2; S is summed (here: averaged) over views, upsampled to the GT size,
    argmax -> `seg` (unfiltered) and `seg_gtcls` (absent GT classes at -1e5). The CAM pseudo-labels use the
    same views: normalised M', GT-size, filtered by Y -> `cam` (best bg threshold of a sweep; also at the
    fixed --cam-threshold, whose labels are saved as pseudo labels); `cam_ens` is the same for the mean of
    M' and M†' (Table 2 "•"). vis_path: a captioned grid of the first --num-vis images."""
    net.eval()
    C1 = dataset.num_classes
    names = dataset.class_names
    n = len(dataset) if not limit else min(limit, len(dataset))
    sweep, sweep_ens = miou.ThresholdSweep(C1), miou.ThresholdSweep(C1)
    cm = {k: miou.ConfusionMatrix(C1) for k in ("cam_fixed", "cam_ens_fixed", "seg", "seg_gtcls", "seg_crf", "seg_crf_gtcls")}
    autocast = autocast or torch.autocast("cpu", enabled=False)
    size = (args.eval_size, args.eval_size)
    mean_std = input_mean_std(args)
    rows = []
    for start in tqdm(range(0, n, args.eval_batch), desc="eval", leave=False, disable=not sys.stderr.isatty()):
        samples = [dataset[i] for i in range(start, min(n, start + args.eval_batch))]
        x = torch.stack([F.interpolate(to_input(s["image"], mean_std)[None], size=size, mode="bilinear",
                                       align_corners=False)[0] for s in samples]).to(device)  # (b, 3, E, E)
        labels = torch.stack([torch.as_tensor(s["label"]) for s in samples]).to(device)
        with autocast:
            cam, cam_aux, seg_logits = multiscale_predict(net, x, args.eval_scales, size, args.ms_cam_merge)
        cam = normalise_cam(cam) * labels[:, :, None, None]  # (b, C, E, E)
        # Table 2 "•": CPL from the ensemble (mean) of M' and M†'
        cam_ens = (cam + normalise_cam(cam_aux) * labels[:, :, None, None]) / 2
        for j, s in enumerate(samples):
            gt = s["mask"]
            hw = gt.shape
            keys = np.flatnonzero(s["label"]) + 1
            cam_j = F.interpolate(cam[j:j + 1], size=hw, mode="bilinear", align_corners=False)[0]  # (C, H, W)
            present = cam_j[keys - 1].cpu().numpy()
            sweep.update(present, keys, gt)
            nu = present.max(0) if len(keys) else np.zeros(hw, np.float32)
            cpl = np.where(nu > args.cam_threshold, keys[present.argmax(0)] if len(keys) else 0, 0).astype(np.uint8)
            cm["cam_fixed"].update(cpl, gt)
            present_ens = F.interpolate(cam_ens[j:j + 1], size=hw, mode="bilinear", align_corners=False)[0][keys - 1].cpu().numpy()
            sweep_ens.update(present_ens, keys, gt)
            nu_ens = present_ens.max(0) if len(keys) else np.zeros(hw, np.float32)
            cm["cam_ens_fixed"].update(np.where(nu_ens > args.cam_threshold, keys[present_ens.argmax(0)] if len(keys) else 0,
                                                0).astype(np.uint8), gt)
            if label_dir is not None:
                data.save_mask(label_dir / f"{s['name']}.png", cpl)
            if not seg:
                continue
            logits = F.interpolate(seg_logits[j:j + 1], size=hw, mode="bilinear", align_corners=False)[0]  # (C+1, H, W)
            absent = torch.cat([torch.zeros(1, device=device), 1 - labels[j]]) > 0
            # Impl. (youshyee/CoSA, evaluation_engine.py "Seg_vd"): absent GT classes at -1e5 (Deviation 6)
            logits_gtcls = logits.masked_fill(absent[:, None, None], -1e5)
            pred, pred_gtcls = logits.argmax(0).cpu().numpy(), logits_gtcls.argmax(0).cpu().numpy()
            cm["seg"].update(pred, gt)
            cm["seg_gtcls"].update(pred_gtcls, gt)
            if args.crf:
                for key, lg in (("seg_crf", logits), ("seg_crf_gtcls", logits_gtcls)):
                    probs = torch.softmax(lg, 0).cpu().numpy()
                    cm[key].update(crf.refine_probs(np.ascontiguousarray(s["image"]), probs, **crf.PRESETS["cosa"]).argmax(0), gt)
            if vis_path is not None and len(rows) < args.num_vis:
                rows.append([s["image"], colour_cam(nu), colour_labels(cpl), colour_labels(pred), colour_labels(gt)])
    if rows:
        save_grid(vis_path, rows, ["image", "CAM M' (AN)", f"CPL (xi={args.cam_threshold})", "AN prediction", "ground truth"])
    results = {}
    for key, sw in (("cam", sweep), ("cam_ens", sweep_ens)):
        best, fixed = sw.compute(), cm[f"{key}_fixed"].compute()
        # Deviation 12: miou / threshold are the best of a sweep scored on this split (optimistic)
        results[key] = miou_entry(best["best"], names, threshold=float(best["best_threshold"]),
                                  threshold_selection=CAM_THRESHOLD_NOTE,
                                  miou_fixed_threshold=round(100 * float(fixed["miou"]), 2),
                                  fixed_threshold=args.cam_threshold)
    for key in ("seg", "seg_gtcls") + (("seg_crf", "seg_crf_gtcls") if args.crf else ()):
        if seg:
            results[key] = miou_entry(cm[key].compute(), names)
    return results


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
    """Alg. 1 for the whole schedule, then the AN's evaluation (card §7) into metrics.json."""
    with run_guard():
        args, spec = parse_args(argv)
        validate(args)
        ctx = Context(args, spec)
        splits = ctx.splits
        # data and networks are built (and validated) before anything is written
        seed_set = data.SegDataset(spec.root, splits["seed"], dataset=spec.dataset, seed=args.seed)
        val_set = data.SegDataset(spec.root, splits["val"], dataset=spec.dataset, seed=args.seed)
        num_classes = val_set.num_classes - 1  # C: foreground classes
        fresh = not (args.resume or args.eval_only)
        online = build_model(args, num_classes, init_weights=fresh).to(ctx.device)
        assign_net = build_model(args, num_classes, init_weights=False).to(ctx.device)
        assign_net.load_state_dict(online.state_dict())  # AN = deepcopy(ON) (card §3)
        assign_net.requires_grad_(False).eval()
        ctx.start()
        if not args.eval_only and not ctx.done("cosa"):
            train_cosa(ctx, online, assign_net, val_set)
            ctx.finish_stage("cosa", weights={"assign": assign_net.state_dict()}, final=True)
        load_weights(assign_net, ctx.final_weights()["assign"], "the assignment network")
        if ctx.main:  # the AN at the end of training, no checkpoint selection on val (Deviation 6)
            label_dir = ctx.run_dir / "pseudo_labels" / "cpl" / splits["seed"]
            label_dir.mkdir(parents=True, exist_ok=True)
            train_res = evaluate(assign_net, seed_set, args, ctx.device, seg=False, limit=args.seed_eval_limit,
                                 label_dir=label_dir, autocast=ctx.autocast())
            val_res = evaluate(assign_net, val_set, args, ctx.device, seg=True, vis_path=ctx.run_dir / "vis" / "val.png",
                               autocast=ctx.autocast())
            ctx.results.update({f"{k}/val": v for k, v in val_res.items() if not k.startswith("cam")})
            ctx.results.update({"cam/train": train_res["cam"], "cam/val": val_res["cam"],
                                "cam_ens/train": train_res["cam_ens"], "cam_ens/val": val_res["cam_ens"]})
            print(miou.format_table({"iou": [np.nan if v is None else v / 100 for v in val_res["seg"]["iou"].values()],
                                     "miou": val_res["seg"]["miou"] / 100}, val_set.class_names))
        write_metrics(ctx, iterations=args.max_iters or args.iters)


if __name__ == "__main__":
    main()
