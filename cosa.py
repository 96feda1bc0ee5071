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
    Sec. 3.2  ON + AN, swapped assignments, EMA        -> assign(), ema_update(), train_step()
    Sec. 3.3  CPL, perplexity, RAW, dynamic threshold  -> cam_pseudo_label(), perplexity(), loss_c2s(),
                                                          DynamicThreshold
    Sec. 3.4  SPL, Seg2CAM, contrastive separation     -> segmentation_pseudo_label(), loss_s2c(),
                                                          contrastive_regions(), loss_csc()
    Alg. 1    one training iteration                   -> train_step()
    Supp. B   schedule, augmentations (Tab. 12-14)     -> PRESETS, TrainTransform, lr_factor()
    Card §7   evaluation (multi-scale + flip of AN)     -> evaluate()

Equation map:
    Eq. (1)  L_cls, multi-label soft-margin on Z = W . GMP(F), both heads -> loss_cls()
    Eq. (2)  L_swap = L_c2s(S, M') + L_s2c(M, S')                           -> train_step()
    Eq. (3)  CPL: argmax(M')+1 where nu >= xi, else 0                       -> cam_pseudo_label()
    Eq. (4)  perplexity P from the normalised distance of nu to xi          -> perplexity()
    Eq. (5)  RAW-weighted CAM2Seg cross-entropy                             -> loss_c2s()
    Eq. (6)  dynamic threshold xi* from a 2-component GMM on a queue        -> DynamicThreshold, gmm_threshold()
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
       (grid search on [0.01, 0.99]); the official code takes the largest bg-cluster sample instead.
       Values <= 0.05 are dropped before fitting and xi = 0.45 is used until the queue holds Q/10
       batches (official code, utils/seg_helper.py).
    3. Eq. (10) leaves l_d, tau and the pair scope open: cosine similarity (--csc-sim), tau_c = 0.1
       (--tau-csc; the paper's only "tau" is the SPL's 0.01) and pairs within each image (--csc-scope).
       It is computed on the token grid (the full-resolution version is O((HW)^2)).
    4. The M† ensemble max-merges the scales like M' (Alg. 1); the official code keeps only the last
       scale for M†, by accident (card §8.8). --ms-cam-merge sum gives the code's scale merge for CAMs.
    5. Head LR x10, the 1.5K-iteration LR warm-up and ImageNet mean/std come from the official code;
       the paper only says "AdamW, 6e-5, polynomial decay".
    6. Evaluation uses the AN at the end of training, without checkpoint selection on val. The primary
       seg/val is NOT filtered by ground-truth image labels; seg_gtcls/val is (the protocol of the
       paper's 76.2 / 51.0, evaluation_engine.py "Seg_vd").
    7. seg/val is the multi-scale + flip prediction (the paper's protocol), although DESIGN.md reserves
       plain "seg" for single-scale predictions; the issue asks for it under this key.
    8. The official code's recipe (band CPL, fg/bg-balanced CE, ReLU in Seg2CAM, CRF-energy loss,
       card §8) is not implemented; only the paper's equations are.
    9. Pseudo-label queues are shared across DDP ranks (all_gather), so every rank uses one xi.
   10. The toy preset departs from card §10 to fit 2 CPU cores: 64 px crops (8 x 8 tokens), AN scales
       {1.0, 0.5}, 1,200 iterations (300 of loss warm-up), CPL quality on the first 200 train ids.

Run:
    python cosa.py                                    (toy data, CPU, minutes)
    python cosa.py --data VOC2012                     (CUDA, paper settings: ViT-B/16, 448 crop, 20K it)
    python cosa.py --data COCO2014                    (CUDA, paper settings: batch 8, 40K it)
    python cosa.py --ablation base                    (Table 3a rows: base, gc, gc_sa, ..., full)
    torchrun --nproc_per_node=2 cosa.py --data VOC2012
"""
import argparse
import collections
import dataclasses
import datetime
import inspect
import json
import math
import os
import random
import re
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from common import augment, crf, data, miou

METHOD = "cosa"
REPO = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------
@dataclass
class Args:
    # --- common interface (DESIGN.md) ---
    data: str = "toy"  # toy | VOC2012 | COCO2014 | a path
    preset: str = "auto"  # auto = toy on the toy dataset, paper otherwise
    out: Optional[str] = None  # run folder; default runs/cosa/<data>-<time>
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # seeds python, numpy, torch and the data order/augmentations
    workers: int = 4  # DataLoader workers
    amp: bool = False  # bf16 autocast on CUDA; ignored (with a note) on CPU
    resume: Optional[str] = None  # RUN_DIR to continue from its checkpoints/last.pt
    eval_only: bool = False  # skip training, evaluate --ckpt
    ckpt: Optional[str] = None  # checkpoint for --eval-only
    pretrained: bool = True  # ImageNet weights through timm (paper); toy preset: False
    weights: Optional[str] = None  # local backbone state dict instead of timm's download
    max_iters: Optional[int] = None  # override the schedule length (warm-ups are not rescaled)
    stop_after: Optional[int] = None  # testing aid: stop as if interrupted after N iterations
    # --- model (Sec. 4.1, card §3) ---
    backbone: str = "vit_base_patch16_224.orig_in21k_ft_in1k"  # ViT-B/16, official jx_vit_base_p16_224
    backbone_kwargs: str = ""  # extra timm.create_model ints, e.g. "patch_size=8,embed_dim=128"
    aux_block: int = -3  # M† from this block (official aux_layer -3 = block 10 of 12)
    decoder_dim: int = 512  # LargeFOV width (Sec. 4.1, [8])
    decoder_dilation: int = 5  # LargeFOV dilation (official models/decoder)
    # --- data and schedule (Supp. B, card §6) ---
    crop: int = 448  # Sec. 4.1
    scale_min: float = 0.5  # rescale range, Tab. 12
    scale_max: float = 2.0
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
    # --- component switches (Table 3) ---
    ablation: Optional[str] = None  # base | gc | gc_sa | gc_sa_raw | gc_sa_csc | gc_sa_raw_csc | full
    no_gc: bool = False  # no guided CAMs: lambda_s2c = 0
    no_sa: bool = False  # no swapping assignments: m = 0, AN = current ON weights
    no_raw: bool = False  # plain CE in CAM2Seg (w = 1)
    no_csc: bool = False  # lambda_csc = 0
    no_dt: bool = False  # fixed threshold --fixed-thr
    # --- evaluation (card §7) ---
    eval_size: int = 448  # val images are resized to eval_size^2 (official evaluation_engine.py)
    eval_scales: tuple = (1.0, 0.5, 1.5, 0.75, 1.25)  # official evaluation_engine.py
    eval_batch: int = 8  # images per evaluation batch (all resized to eval_size)
    cam_threshold: float = 0.5  # fixed bg threshold for CPL quality (official bkg_thre)
    seed_eval_limit: int = 0  # evaluate CPL on the first N ids of the seed split (0 = all)
    crf: bool = False  # CoSA*: dense CRF on the AN's softmax (preset "cosa", 1 iteration)
    num_vis: int = 8  # val images drawn into vis/
    # --- bookkeeping ---
    log_every: int = 50  # iterations between log lines
    ckpt_every: int = 2000  # iterations between checkpoints/last.pt writes


PRESETS = {
    "paper_voc": dict(pretrained=True, backbone="vit_base_patch16_224.orig_in21k_ft_in1k", crop=448,
                      batch_size=4, iters=20000, warmup_iters=1500, loss_warmup=6000, lr=6e-5,
                      ema_m=0.9994, queue_len=100, decoder_dim=512, decoder_dilation=5, eval_size=448,
                      eval_scales=(1.0, 0.5, 1.5, 0.75, 1.25), workers=4, ckpt_every=2000, log_every=50),
    "paper_coco": dict(pretrained=True, backbone="vit_base_patch16_224.orig_in21k_ft_in1k", crop=448,
                       batch_size=8, iters=40000, warmup_iters=1500, loss_warmup=10000, lr=6e-5,
                       ema_m=0.9994, queue_len=100, decoder_dim=512, decoder_dilation=5, eval_size=448,
                       eval_scales=(1.0, 0.5, 1.5, 0.75, 1.25), workers=4, ckpt_every=2000, log_every=50),
    # card §10: random-init small ViT, 8 px patches; EMA horizon 1/(1-m) = 100 it ~ T/12 as in the paper
    # (pitfall 9). CPU budget: 64 px crops (8x8 tokens) and AN scales {1.0, 0.5} (the 1.5 scale alone
    # costs 2/3 of the AN pass); the paper preset keeps 448 px and {1.0, 0.5, 1.5}.
    "toy": dict(pretrained=False, backbone="vit_tiny_patch16_224",
                backbone_kwargs="img_size=64,patch_size=8,embed_dim=128,depth=6,num_heads=4",
                crop=64, batch_size=8, iters=1200, warmup_iters=100, loss_warmup=300, lr=3e-4,
                ema_m=0.99, queue_len=20, pseudo_scales=(1.0, 0.5), decoder_dim=128, decoder_dilation=2,
                eval_size=96, eval_scales=(1.0, 0.5, 1.5), workers=0, seed_eval_limit=200, ckpt_every=300,
                log_every=100, eval_batch=32),
}

# Table 3a rows: which components are OFF
ABLATIONS = {
    "base": ("no_gc", "no_sa", "no_raw", "no_csc", "no_dt"),
    "gc": ("no_sa", "no_raw", "no_csc", "no_dt"),
    "gc_sa": ("no_raw", "no_csc", "no_dt"),
    "gc_sa_raw": ("no_csc", "no_dt"),
    "gc_sa_csc": ("no_raw", "no_dt"),
    "gc_sa_raw_csc": ("no_dt",),
    "full": (),
}
CHOICES = {"preset": ("auto", "paper", "toy"), "device": ("auto", "cpu", "cuda"),
           "ms_cam_merge": ("max", "sum"), "strong_magnitudes": ("paper", "code"), "csc_sim": ("cosine", "dot"), "csc_scope": ("image", "batch"),
           "ablation": tuple(ABLATIONS)}
ARCH_FIELDS = ("backbone", "backbone_kwargs", "aux_block", "decoder_dim", "decoder_dilation")


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        fail(message)


def fail(msg, code=2):
    """One line on stderr, exit 2 (bad input), no traceback."""
    print(f"{METHOD}.py: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def build_parser():
    """argparse from Args; each flag's help is the field's source comment, plus its paper default."""
    comments = dict(re.findall(r"^    (\w+): .*?  # (.*)$", inspect.getsource(Args), flags=re.M))
    parser = ArgumentParser(prog=f"{METHOD}.py", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        text = f"{comments.get(f.name, '')} [default: {f.default}; --preset may change it]".replace("%", "%%")
        if f.name == "pretrained":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif f.type is bool:
            parser.add_argument(flag, action="store_true", default=None, help=comments.get(f.name))
        elif f.type is tuple:
            parser.add_argument(flag, type=float, nargs="+", default=None, help=text)
        else:
            kind = int if f.type in (int, Optional[int]) else float if f.type is float else str
            parser.add_argument(flag, type=kind, default=None, choices=CHOICES.get(f.name), help=text)
    return parser


def parse_args(argv=None):
    """CLI > preset > dataclass default. Returns (Args, DataSpec, preset name)."""
    ns = vars(build_parser().parse_args(argv))
    spec = data.resolve_data(ns["data"] or Args.data)
    preset = ns["preset"] or "auto"
    if preset == "auto":
        preset = "toy" if spec.name == "toy" else "paper"
    preset_name = "toy" if preset == "toy" else f"paper_{spec.dataset}"
    values = dict(PRESETS[preset_name])
    values.update({k: v for k, v in ns.items() if v is not None})
    for key in ("pseudo_scales", "eval_scales"):
        if key in values:
            values[key] = tuple(float(s) for s in values[key])
    args = Args(**values)
    args.preset = preset
    for switch in ABLATIONS.get(args.ablation or "full", ()):
        setattr(args, switch, True)
    return args, spec, preset_name


def validate(args):
    """Hyper-parameter sanity, before anything is written."""
    checks = [
        (args.crop >= 16, "--crop must be >= 16"),
        (args.batch_size >= 1, "--batch-size must be >= 1"),
        (args.iters >= 1, "--iters must be >= 1"),
        (args.max_iters is None or args.max_iters >= 1, "--max-iters must be >= 1"),
        (args.stop_after is None or args.stop_after >= 1, "--stop-after must be >= 1"),
        (args.warmup_iters >= 0 and args.loss_warmup >= 0, "--warmup-iters/--loss-warmup must be >= 0"),
        (args.lr > 0 and args.head_lr_mult > 0, "--lr and --head-lr-mult must be > 0"),
        (0.0 <= args.ema_m <= 1.0, "--ema-m must be in [0, 1]"),
        (all(s > 0 for s in args.pseudo_scales) and len(args.pseudo_scales) > 0, "--pseudo-scales must be > 0"),
        (all(s > 0 for s in args.eval_scales) and len(args.eval_scales) > 0, "--eval-scales must be > 0"),
        (args.tau_spl > 0 and args.tau_csc > 0, "--tau-spl and --tau-csc must be > 0"),
        (0 < args.ppl_alpha < 1, "--ppl-alpha must be in (0, 1) so that the perplexity stays positive"),
        (args.ppl_beta > 0 and args.ppl_eps > 0, "--ppl-beta and --ppl-eps must be > 0"),
        (args.queue_len >= 1, "--queue-len must be >= 1"),
        (0 < args.dt_init < 1 and 0 < args.fixed_thr < 1, "--dt-init and --fixed-thr must be in (0, 1)"),
        (0 < args.cam_threshold < 1, "--cam-threshold must be in (0, 1)"),
        (min(args.lambda_c2s, args.lambda_s2c, args.lambda_csc) >= 0, "loss weights must be >= 0"),
        (args.eval_size >= 16 and args.eval_batch >= 1, "--eval-size must be >= 16, --eval-batch >= 1"),
        (args.workers >= 0 and args.seed_eval_limit >= 0, "--workers and --seed-eval-limit must be >= 0"),
        (args.log_every >= 1 and args.ckpt_every >= 1, "--log-every and --ckpt-every must be >= 1"),
        (args.decoder_dim >= 1 and args.decoder_dilation >= 1, "--decoder-dim/--decoder-dilation must be >= 1"),
        (not (args.eval_only and args.resume), "--eval-only and --resume cannot be combined"),
        (not args.eval_only or args.ckpt, "--eval-only needs --ckpt FILE (a checkpoints/last.pt of a run)"),
        (not args.crf or crf.available(), "--crf needs pydensecrf (pip install pydensecrf2); or drop --crf"),
    ]
    for ok, msg in checks:
        if not ok:
            fail(msg)


# ---------------------------------------------------------------------------------------------------
# Model (Sec. 3.1, Sec. 4.1 "Implementation Details", card §3)
# ---------------------------------------------------------------------------------------------------
def parse_backbone_kwargs(text):
    kwargs = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            fail(f"--backbone-kwargs item '{item}' is not name=integer (e.g. 'patch_size=8,embed_dim=128')")
        kwargs[key.strip()] = int(value)
    return kwargs


def create_backbone(args, pretrained):
    """timm ViT whose position embedding is re-interpolated (bicubic) to every input size."""
    if not timm.is_model(args.backbone):
        fail(f"unknown timm backbone '{args.backbone}'; pick one from timm.list_models('vit_*')")
    kwargs = dict(num_classes=0, dynamic_img_size=True, drop_path_rate=0.0, **parse_backbone_kwargs(args.backbone_kwargs))
    try:
        vit = timm.create_model(args.backbone, pretrained=pretrained, **kwargs)
    except TypeError as e:
        fail(f"timm cannot build '{args.backbone}' with {kwargs}: {e}; CoSA needs a plain ViT (vit_*)")
    except Exception as e:  # network / cache failures of pretrained=True
        fail(f"could not load ImageNet weights for '{args.backbone}' through timm ({type(e).__name__}); "
             "connect to the internet once or populate the timm/HF cache, or pass --weights FILE "
             "(a local state dict) with --no-pretrained")
    if not hasattr(vit, "blocks") or not hasattr(vit, "_pos_embed"):
        fail(f"backbone '{args.backbone}' is not a timm VisionTransformer; CoSA needs block outputs of a ViT")
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
                "seg": self.decoder(feat)}  # (B, C+1, h, w); F is not detached


def build_model(args, num_classes, *, load_weights):
    backbone = create_backbone(args, pretrained=load_weights and args.pretrained and not args.weights)
    if load_weights and args.weights:
        try:
            state = torch.load(args.weights, map_location="cpu", weights_only=True)
        except Exception as e:
            fail(f"cannot read --weights {args.weights} ({type(e).__name__}); give a torch state dict of "
                 "the backbone, or use --pretrained to load ImageNet weights through timm")
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if len(missing) == len(backbone.state_dict()):
            fail(f"--weights {args.weights} matches no parameter of '{args.backbone}'; give a timm state dict "
                 "of that backbone, or use --pretrained to load ImageNet weights through timm")
    return CoSANet(backbone, num_classes, args.aux_block, args.decoder_dim, args.decoder_dilation)


@torch.no_grad()
def ema_update(assign_net, online_net, m):
    """Sec. 3.2: Theta' <- m Theta' + (1 - m) Theta, after every optimiser step (warm-up included)."""
    for p_a, p_o in zip(assign_net.parameters(), online_net.parameters()):
        p_a.mul_(m).add_(p_o.detach(), alpha=1.0 - m)
    for b_a, b_o in zip(assign_net.buffers(), online_net.buffers()):
        b_a.copy_(b_o)


# ---------------------------------------------------------------------------------------------------
# Losses (one function per equation)
# ---------------------------------------------------------------------------------------------------
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
    B, C = cam.shape[:2]
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


# ---------------------------------------------------------------------------------------------------
# Pseudo labels (Sec. 3.3-3.4, Alg. 1 lines 7-10, card §5)
# ---------------------------------------------------------------------------------------------------
def normalise_cam(cam):
    """ReLU, then per-(image, class) min-max over space: values in [0, 1], max ~1 for active classes."""
    cam = F.relu(cam)
    lo = cam.amin(dim=(2, 3), keepdim=True)
    hi = cam.amax(dim=(2, 3), keepdim=True)
    return (cam - lo) / (hi - lo + 1e-5)


@torch.no_grad()
def multiscale_predict(net, images, scales, out_size, cam_merge="max"):
    """Alg. 1 lines 7-9: run `net` on every scale and its h-flip, resize to out_size, ensemble.

    images (B, 3, H, W) -> cam, cam_aux (B, C, *out_size) ReLU'd (not normalised), seg (B, C+1, *out_size).
    CAMs: max over the flip pair, then max (paper) or sum (code) over scales; S: mean over the views."""
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


def contrastive_regions(cam_aux, xi, box, grid, alpha=0.8, beta=1.0, eps=1.0):
    """Eq. (9): labels and the low-perplexity set Omega of M†' on the token grid.

    cam_aux: M†' (B, C, H, W) -> bilinear to `grid`; returns (labels (B, h, w), omega (B, h, w) bool)."""
    small = F.interpolate(cam_aux, size=grid, mode="bilinear", align_corners=False)  # (B, C, h, w)
    labels, nu = cam_pseudo_label(small, xi)  # Eq. (3) on the grid, with xi†
    # Eq. (9)  Omega = {P <= eps}, cells inside the crop's real image only
    omega = (perplexity(nu, xi, alpha, beta) <= eps) & box_mask(box, grid, cam_aux.shape[-2:])
    return labels, omega


def gmm_threshold(values):
    """Eq. (6) for a 1-D sample: fit a 2-component GMM; xi* = crossing point of the weighted densities
    pi_bg N(x | mu_bg, s_bg) and pi_fg N(x | mu_fg, s_fg) between the two means (Deviation 2).
    A split of the samples at xi* maximises the Eq. (6) likelihood whenever the GMM assignment switches
    once between the means."""
    from sklearn.mixture import GaussianMixture

    x = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    gmm = GaussianMixture(2, covariance_type="full", means_init=[[x.min()], [x.max()]], weights_init=[0.5, 0.5],
                          random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gmm.fit(x)
    mu, var, pi = gmm.means_.ravel(), gmm.covariances_.ravel(), gmm.weights_
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


class DynamicThreshold:
    """Eq. (6) with a FIFO queue of the nu maps of the last Q batches (one instance per CAM).

    Before Q/10 batches are queued, `value` is the start-up threshold (card §5)."""

    def __init__(self, queue_len, init=0.45, min_value=0.05):
        self.queue = collections.deque(maxlen=queue_len)
        self.init, self.min_value, self.value = init, min_value, init

    def push(self, nu):
        """nu: (B, h*w) confidences of one batch (all ranks' rows under DDP)."""
        self.queue.append(nu.detach().float().cpu().numpy().ravel())

    def update(self):
        if len(self.queue) < max(1, math.ceil(self.queue.maxlen / 10)):  # Deviation 2: start-up value
            return self.value
        values = np.concatenate(self.queue)
        # Impl. (youshyee/CoSA, utils/seg_helper.py rungmm, gmmfilter_thre 0.05): drop the spike of zeros
        values = values[values > self.min_value]
        if len(values) >= 10 and values.max() - values.min() > 1e-3:
            # Eq. (6)
            self.value = gmm_threshold(values)
        return self.value

    def state_dict(self):
        return {"queue": list(self.queue), "value": self.value}

    def load_state_dict(self, state):
        self.queue.clear()
        self.queue.extend(state["queue"])
        self.value = state["value"]


# ---------------------------------------------------------------------------------------------------
# Train
# ---------------------------------------------------------------------------------------------------
class TrainTransform:
    """Tab. 12-14: ONE geometric transform (rescale, h-flip, crop with black padding and its `box`),
    then weak = GaussianBlur(p 0.5) of the crop and strong = OneOf(appearance ops) of the weak view,
    so the two views are pixel-aligned (pitfall 7)."""

    def __init__(self, crop, scale_range=(0.5, 2.0), magnitudes="paper", strong_op=None):
        self.crop, self.scale_range, self.magnitudes, self.strong_op = crop, scale_range, magnitudes, strong_op

    def __call__(self, sample, rng):
        image, _, _ = augment.random_rescale(sample["image"], rng, ratio_range=self.scale_range)
        image, _, _ = augment.random_hflip(image, rng, p=0.5)
        # Impl. (youshyee/CoSA, dataloaders/transforms.py): black padding = pixel 0 before normalisation
        image, _, _, box = augment.random_crop(image, rng, self.crop, image_fill=(0, 0, 0))
        weak = augment.gaussian_blur(image, rng, p=0.5, radius=(0.1, 2.0))
        strong = augment.appearance_oneof(weak, rng, magnitudes=self.magnitudes, op=self.strong_op)
        return {"weak": augment.to_tensor(weak), "strong": augment.to_tensor(strong),
                "label": torch.as_tensor(sample["label"], dtype=torch.float32),
                "box": torch.as_tensor(box, dtype=torch.int64)}


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
    return torch.optim.AdamW([{"params": backbone, "lr": args.lr, "base_lr": args.lr},
                              {"params": heads, "lr": args.lr * args.head_lr_mult,
                               "base_lr": args.lr * args.head_lr_mult}],
                             lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)


def gather_rows(t):
    """Concatenate a (b, ...) tensor over DDP ranks (identity without DDP)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def train_step(online, assign_net, batch, it, args, thresholds, optimizer, autocast):
    """Alg. 1, one iteration. Returns a dict of floats (losses, thresholds) for logging."""
    model = online.module if hasattr(online, "module") else online
    x_w, x_s, labels, box = batch["weak"], batch["strong"], batch["label"], batch["box"]
    # loss warm-up: only the two classification losses before; the decoder gets no gradient (grad None,
    # so AdamW's weight decay leaves it alone too)
    losses_on = it >= args.loss_warmup
    # the AN also runs for the last Q warm-up iterations so that the DT queue is warm when losses start
    run_assign = losses_on or (not args.no_dt and it >= args.loss_warmup - args.queue_len)
    log = {}
    grid = (args.crop // model.backbone.patch_embed.patch_size[0],) * 2
    if run_assign:
        with autocast():
            cam_a, cam_aux_a, seg_a = assign(assign_net, x_w, labels, args.pseudo_scales, args.ms_cam_merge)
        if not args.no_dt:
            for cam, dt in ((cam_a, thresholds[0]), (cam_aux_a, thresholds[1])):
                # queue rows: downsample the C maps to the token grid, then take the class max (code order)
                nu_rows = F.interpolate(cam, size=grid, mode="bilinear", align_corners=False).amax(1).flatten(1)
                dt.push(gather_rows(nu_rows))
                dt.update()
    xi, xi_aux = (args.fixed_thr, args.fixed_thr) if args.no_dt else (thresholds[0].value, thresholds[1].value)
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
            ppl = None if args.no_raw else perplexity(nu, thr, args.ppl_alpha, args.ppl_beta)  # Eq. (4)
            l_c2s_terms.append(loss_c2s(seg_up, cpl, ppl))  # Eq. (5)
        l_c2s, l_c2s_aux = l_c2s_terms
        spl = segmentation_pseudo_label(seg_a, labels, args.tau_spl)  # Eq. (7)
        l_s2c = loss_s2c(out["cam"], spl)  # Eq. (8)
        # Eq. (2)  the swapped assignments: CPL (from M') -> S and SPL (from S') -> M
        l_swap = args.lambda_c2s * (l_c2s + l_c2s_aux) + (0.0 if args.no_gc else args.lambda_s2c) * l_s2c
        if args.no_csc:
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
    for key, value in log.items():
        if key.startswith("losses/") and not math.isfinite(value):
            print(f"{METHOD}.py: error: {key} is not finite ({value}) at iteration {it}; lower --lr or "
                  "check the data", file=sys.stderr, flush=True)
            raise SystemExit(1)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    # Sec. 3.2: EMA after every step; --no-sa (m = 0) makes the AN the current ON
    ema_update(assign_net, model, 0.0 if args.no_sa else args.ema_m)
    return log


# ---------------------------------------------------------------------------------------------------
# Evaluate (card §7)
# ---------------------------------------------------------------------------------------------------
def percent(result, class_names):
    iou = {name: (None if np.isnan(v) else round(100 * float(v), 2)) for name, v in zip(class_names, result["iou"])}
    return {"miou": round(100 * float(result["miou"]), 2), "iou": iou}


def colorize_cam(cam):
    """(H, W) in [0, 1] -> uint8 (H, W, 3) blue-to-red heat map."""
    c = np.clip(cam, 0, 1)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * c - 3), 0, 1), np.clip(1.5 - np.abs(4 * c - 2), 0, 1),
                    np.clip(1.5 - np.abs(4 * c - 1), 0, 1)], -1)
    return (255 * rgb).astype(np.uint8)


def save_vis(path, image, cam, cpl, pred, gt):
    """vis grid: image | M' heat map (max over present classes) | CPL | prediction | ground truth."""
    palette = data.voc_palette()
    panels = [image, colorize_cam(cam), palette[cpl], palette[pred], palette[gt]]
    Image.fromarray(np.concatenate(panels, axis=1)).save(path)


@torch.no_grad()
def evaluate(net, dataset, args, device, *, seg=True, limit=0, label_dir=None, vis_dir=None, autocast=None):
    """AN multi-scale + flip evaluation on one split (card §7).

    Images are resized to eval_size^2; S is summed (here: averaged) over views, upsampled to the GT size,
    argmax -> `seg` (unfiltered) and `seg_gtcls` (absent GT classes at -1e5). The CAM pseudo-labels use the
    same views: normalised M', GT-size, filtered by Y -> `cam` (best bg threshold of a sweep; also at the
    fixed --cam-threshold, whose labels are saved as pseudo labels)."""
    net.eval()
    C1 = dataset.num_classes
    names = dataset.class_names
    n = len(dataset) if not limit else min(limit, len(dataset))
    sweep = miou.ThresholdSweep(C1)
    cm = {k: miou.ConfusionMatrix(C1) for k in ("cam_fixed", "seg", "seg_gtcls", "seg_crf", "seg_crf_gtcls")}
    autocast = autocast or torch.autocast("cpu", enabled=False)
    size = (args.eval_size, args.eval_size)
    drawn = 0
    for start in tqdm(range(0, n, args.eval_batch), desc="eval", leave=False, disable=not sys.stderr.isatty()):
        samples = [dataset[i] for i in range(start, min(n, start + args.eval_batch))]
        x = torch.stack([F.interpolate(augment.to_tensor(s["image"])[None], size=size, mode="bilinear",
                                       align_corners=False)[0] for s in samples]).to(device)  # (b, 3, E, E)
        labels = torch.stack([torch.as_tensor(s["label"]) for s in samples]).to(device)
        with autocast:
            cam, _, seg_logits = multiscale_predict(net, x, args.eval_scales, size, args.ms_cam_merge)
        cam = normalise_cam(cam) * labels[:, :, None, None]  # (b, C, E, E)
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
            if vis_dir is not None and drawn < args.num_vis:
                save_vis(vis_dir / f"{s['name']}.png", s["image"], nu, cpl, pred.astype(np.uint8), gt)
                drawn += 1
    best = sweep.compute()
    fixed = cm["cam_fixed"].compute()
    results = {"cam": {**percent(best["best"], names), "threshold": float(best["best_threshold"]),
                       "miou_fixed_threshold": round(100 * float(fixed["miou"]), 2),
                       "fixed_threshold": args.cam_threshold}}
    if seg:
        results["seg"] = percent(cm["seg"].compute(), names)
        results["seg_gtcls"] = percent(cm["seg_gtcls"].compute(), names)
        if args.crf:
            results["seg_crf"] = percent(cm["seg_crf"].compute(), names)
            results["seg_crf_gtcls"] = percent(cm["seg_crf_gtcls"].compute(), names)
    return results


# ---------------------------------------------------------------------------------------------------
# Main: validation, run folder, seeding, DDP, loop, checkpoints, evaluation
# ---------------------------------------------------------------------------------------------------
def seed_everything(seed, deterministic=True):
    """Seeding block shared by the five scripts."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def seed_worker(worker_id):
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def setup_distributed(args):
    """torchrun: WORLD_SIZE/RANK/LOCAL_RANK in the environment; NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is visible; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1:
        if args.batch_size % world:
            fail(f"--batch-size {args.batch_size} (global) is not divisible by the {world} processes")
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def make_run_dir(args, spec, rank, world):
    if args.resume:
        run_dir = Path(args.resume)
    elif args.out:
        run_dir = Path(args.out)
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            fail(f"--out {run_dir} exists and is not empty; choose a new folder or --resume it")
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = REPO / "runs" / METHOD / f"{spec.name}-{stamp}"
    if world > 1:  # rank 0's timestamp wins
        holder = [str(run_dir)]
        dist.broadcast_object_list(holder, src=0)
        run_dir = Path(holder[0])
    return run_dir


class JsonlLogger:
    def __init__(self, path, enabled):
        self.path, self.enabled = path, enabled

    def __call__(self, record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def save_checkpoint(path, state):
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: an interrupted save never leaves a half-written last.pt


def load_resume(args):
    run_dir = Path(args.resume)
    ckpt_path, args_path = run_dir / "checkpoints" / "last.pt", run_dir / "args.json"
    if not ckpt_path.is_file() or not args_path.is_file():
        fail(f"--resume {run_dir}: no checkpoints/last.pt and args.json there; give the folder of an earlier run")
    saved = json.loads(args_path.read_text())
    keep = {k: getattr(args, k) for k in ("resume", "device", "workers", "stop_after")}
    args = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    for k, v in keep.items():
        setattr(args, k, v)
    try:
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as e:
        fail(f"--resume {run_dir}: checkpoints/last.pt is unreadable ({type(e).__name__}); rerun without --resume")
    return args, ckpt


def run(argv=None):
    args, spec, preset_name = parse_args(argv)
    ckpt = None
    if args.resume:
        args, ckpt = load_resume(args)
        spec = data.resolve_data(args.data)
        preset_name = "toy" if args.preset == "toy" else f"paper_{spec.dataset}"
    validate(args)
    if args.eval_only:
        if not Path(args.ckpt).is_file():
            fail(f"--ckpt {args.ckpt} does not exist; give checkpoints/last.pt of a finished run")
        try:
            ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=False)
            for k in ARCH_FIELDS:  # the architecture comes from the checkpoint
                setattr(args, k, ckpt["args"][k])
        except Exception as e:
            fail(f"--ckpt {args.ckpt} is not a cosa.py checkpoint ({type(e).__name__}); give checkpoints/last.pt")
    rank, world, device = setup_distributed(args)
    main_rank = rank == 0
    seed_everything(args.seed)
    total_iters = args.max_iters or args.iters

    # --- data (validated before the run folder exists) ---
    splits = data.default_splits(spec)
    train_set = data.SegDataset(spec.root, splits["train"], dataset=spec.dataset, seed=args.seed,
                                transform=TrainTransform(args.crop, (args.scale_min, args.scale_max), args.strong_magnitudes))
    seed_set = data.SegDataset(spec.root, splits["seed"], dataset=spec.dataset, seed=args.seed)
    val_set = data.SegDataset(spec.root, splits["val"], dataset=spec.dataset, seed=args.seed)
    num_classes = train_set.num_classes - 1  # C: foreground classes
    if args.batch_size > len(train_set) - len(train_set) % world:
        fail(f"--batch-size {args.batch_size} exceeds the {len(train_set)} training images")

    # --- model (validated before the run folder exists) ---
    online = build_model(args, num_classes, load_weights=ckpt is None).to(device)
    assign_net = build_model(args, num_classes, load_weights=False).to(device)
    assign_net.load_state_dict(online.state_dict())  # AN = deepcopy(ON) (card §3)
    for p in assign_net.parameters():
        p.requires_grad_(False)
    assign_net.eval()
    if args.eval_only:
        assign_net.load_state_dict(ckpt["assign"])

    run_dir = make_run_dir(args, spec, rank, world)
    if main_rank:
        for sub in ("checkpoints", "vis", "pseudo_labels"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
    log = JsonlLogger(run_dir / "log.jsonl", main_rank)
    if device.type == "cuda" and args.amp:
        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        if args.amp and main_rank:
            print("note: --amp is ignored on CPU (bf16 autocast is used on CUDA only)")
        def autocast():
            return torch.autocast("cpu", enabled=False)
    t0 = time.time()

    # --- train ---
    it = 0
    if not args.eval_only:
        optimizer = build_optimizer(online, args)
        thresholds = [DynamicThreshold(args.queue_len, args.dt_init, args.gmm_min) for _ in range(2)]
        if ckpt is not None:
            online.load_state_dict(ckpt["model"])
            assign_net.load_state_dict(ckpt["assign"])
            optimizer.load_state_dict(ckpt["optimizer"])
            for dt, state in zip(thresholds, ckpt["thresholds"]):
                dt.load_state_dict(state)
            it = ckpt["iteration"]
            t0 -= ckpt.get("seconds", 0.0)
            random.setstate(ckpt["rng"]["python"])
            np.random.set_state(ckpt["rng"]["numpy"])
            torch.set_rng_state(ckpt["rng"]["torch"])
        ddp = nn.parallel.DistributedDataParallel(online, find_unused_parameters=True) if world > 1 else online
        ddp.train()
        per_rank = args.batch_size // world
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed, drop_last=True)
        per_epoch = len(sampler) // per_rank
        stop_at = min(total_iters, it + args.stop_after) if args.stop_after else total_iters
        running = collections.defaultdict(list)
        bar = tqdm(total=total_iters, initial=it, desc="train", disable=not main_rank, mininterval=5)
        while it < stop_at:
            epoch, offset = divmod(it, per_epoch)
            sampler.set_epoch(epoch)
            train_set.set_epoch(epoch)
            indices = list(sampler)[offset * per_rank:per_epoch * per_rank]  # resume mid-epoch exactly
            loader = torch.utils.data.DataLoader(
                train_set, batch_size=per_rank, sampler=indices, num_workers=args.workers, drop_last=True,
                worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(args.seed + epoch),
                pin_memory=device.type == "cuda")
            for batch in loader:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor(it, total_iters, args.warmup_iters, args.poly_power)
                for key, value in train_step(ddp, assign_net, batch, it, args, thresholds, optimizer, autocast).items():
                    running[key].append(value)
                it += 1
                bar.update(1)
                if main_rank and (it % args.log_every == 0 or it == stop_at):
                    # means over the iterations since the last log line (thresholds: the latest value)
                    record = {k: (v[-1] if k.startswith("dt/") else float(np.mean(v))) for k, v in running.items()}
                    record.update({"iteration": it, "lr": optimizer.param_groups[0]["lr"],
                                   "time": round(time.time() - t0, 1)})
                    running.clear()
                    log(record)
                    tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
                if main_rank and (it % args.ckpt_every == 0 or it == stop_at):
                    save_checkpoint(run_dir / "checkpoints" / "last.pt", {
                        "args": dataclasses.asdict(args), "model": online.state_dict(),
                        "assign": assign_net.state_dict(), "optimizer": optimizer.state_dict(),
                        "thresholds": [dt.state_dict() for dt in thresholds], "iteration": it, "stage": "cosa",
                        "seconds": time.time() - t0,
                        "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                "torch": torch.get_rng_state()}})
                if it >= stop_at:
                    break
        bar.close()
        if it < total_iters:
            if main_rank:
                print(f"stopped after iteration {it} (--stop-after); continue with --resume {run_dir}")
            if world > 1:
                dist.barrier()
                dist.destroy_process_group()
            return None

    # --- evaluate the AN (rank 0) ---
    results = {}
    if main_rank:
        label_dir = run_dir / "pseudo_labels" / "cpl" / splits["seed"]
        label_dir.mkdir(parents=True, exist_ok=True)
        train_res = evaluate(assign_net, seed_set, args, device, seg=False, limit=args.seed_eval_limit,
                             label_dir=label_dir, autocast=autocast())
        val_res = evaluate(assign_net, val_set, args, device, seg=True, vis_dir=run_dir / "vis", autocast=autocast())
        results = {"seg/val": val_res["seg"], "seg_gtcls/val": val_res["seg_gtcls"],
                   "cam/train": train_res["cam"], "cam/val": val_res["cam"]}
        if args.crf:
            results["seg_crf/val"] = val_res["seg_crf"]
            results["seg_crf_gtcls/val"] = val_res["seg_crf_gtcls"]
        seconds = round(time.time() - t0, 1)
        metrics = {"method": METHOD, "dataset": spec.name, "preset": preset_name,
                   "device": device.type, "seconds": seconds, "iterations": it, "primary": "seg/val",
                   "results": results}
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        log({"iteration": it, **{f"{k}/miou": v["miou"] for k, v in results.items()}})
        print(miou.format_table({"iou": [np.nan if v is None else v / 100 for v in val_res["seg"]["iou"].values()],
                                 "miou": val_res["seg"]["miou"] / 100}, val_set.class_names))
        for key, value in results.items():
            extra = f" (threshold {value['threshold']:.2f})" if "threshold" in value else ""
            print(f"{key}: mIoU={value['miou']:.2f}{extra}")
        print(f"run folder: {run_dir}  ({seconds:.1f} s)")
        print(f"RESULT {METHOD} seg/val mIoU={results['seg/val']['miou']:.2f}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return results


def main(argv=None):
    try:
        return run(argv)
    except data.DataError as e:
        fail(str(e))


if __name__ == "__main__":
    main()
