"""Cross-domain Semantic Decoupling for Weakly-Supervised Semantic Segmentation
Zaiquan Yang, Zhanghan Ke, Gerhard Hancke, Rynson Lau. BMVC 2023.
https://papers.bmvc2023.org/0420.pdf  Official code: none released (closest: the first author's
development fork zaiquanyang/PSD_WSSS of xulianuwa/MCTformer, cited below as "dev code").

What the paper does. Localization maps are reliable on images with ONE class (the source domain)
and ambiguous on images with several (the target domain). CSD is a training-time plug-in for a
WSSS classifier (here MCTformer-V2): it copy-pastes the foreground (and, separately, the
background) of a single-label image into a multi-label image, chosen by co-occurrence oriented
resampling (COR), and asks the network's pixel-wise class distribution on the pasted region to
match the one it gives on the single-label image (a FixMatch-style KL consistency). Seeds, masks
and the segmentation network are the baseline's, unchanged.

Pipeline of this file (python csd.py runs all of it):
  stage 1  train the baseline MCTformer-V2 (train_classifier, csd off)          -> stage1_seed/train
  prior    its seeds at the best background threshold (+ optional CRF)        -> pseudo_labels/prior
  stage 2  retrain from the same initialisation with CSD (train_classifier)     -> seed/train (+ subsets)
  masks    seeds of the stage-2 classifier + dense CRF                          -> mask/train
  seg      a segmentation network trained on the masks                          -> seg/val (primary)
With --csd off, stage 1 and the prior are skipped and stage 2 is the plain baseline.

Reading guide:
  Sec. 3.2 "Prior Localization Map Obtaining"   -> run_pipeline() "Stage 1 + prior", write_labels()
  Sec. 3.2 "Co-occurrence Oriented Resampling"  -> split_domains(), cooccurrence_counts(),
                                                   cooccurrence_matrix(), cor_distribution()
  Sec. 3.2 "Augmentation-based SCL"             -> CSDTransform (copy-paste), make_composites(),
                                                   token_mask(), csd_score_map(), loss_fg()
  Sec. 3.2 "Dual Semantic Consistency Learning" -> background_distribution(), loss_bg()
  Sec. 3.2 "Loss Function"                      -> csd_step()
  Baseline (MCTformer-V2, CVPR 2022)           -> MCTformerV2, localization_map(), seed_map()

Equation map:
  Eq. (1) co-occurrence prior P_ij = N_ij / sum_k N_ik and P_j = sum_k P_{c_k, j}
                                             -> cooccurrence_matrix(), cor_distribution()
  Eq. (2) score maps M_s = F(x_s), M_sm^fg = F(x_sm^fg)  (C x H x W)      -> csd_score_map(), csd_step()
  Eq. (3) L_fg = sum_hw 1[(h,w) in M_fg] KL(M_s || M_sm^fg)              -> loss_fg()
  Eq. (4) RECONSTRUCTED (lost in the paper text): dummy channel M' and saliency sigma:
          pi = softmax([M' ; M]), b = (pi_0, sigma(pi) = sum_{c>=1} pi_c) -> background_distribution()
  Eq. (5) L_bg = sum_hw 1[(h,w) in M_bg] KL(b(M_s) || b(M_sm^bg))        -> loss_bg()
  Eq. (6) L_total = L_cls + lambda1 L_fg + lambda2 L_bg                   -> csd_step()

Deviations (also marked `Deviation:` at the code):
  1. Eq. (4) is missing from the paper text; it is reconstructed as the card (methods/csd.md 4.6)
     recommends: a constant dummy channel M' (default 0) before the C class scores, softmax over
     C+1, saliency = 1 - pi_0, and a 2-way KL. Alternatives: --bg-kl {full,bgterm,rawsum}.
  2. Eq. (5) prints M_sm^fg; it must be M_sm^bg (the background composite), as the text says.
  3. The score map M ("the last output feature map") is MCTformer-V2's patch-CAM logits
     (--csd-map patchcam); the dev code used the PAR-refined fused attention map (--csd-map fused_par).
  4. Reduction: sum over masked tokens (as Eqs. 3/5 are sums), mean over the batch; the dev code
     used a per-image weighted mean with lambda = 1 (--reduce mean).
  5. Stage-1 masks: the paper uses "an off-the-shelf WSSS method" without thresholds. Here the
     stage-1 baseline's own seeds at the best background threshold of a sweep against the ground
     truth of the seed split (the card's default; this uses GT to pick ONE scalar, as every WSSS
     seed evaluation does), optionally CRF'd (--prior-crf); --prior dir:PATH loads PSA/IRN output.
  6. Masks are seeds + dense CRF (label unary, MCTformer's PSA pairwise parameters, crf.PRESETS["psa"]),
     not PSA's AffinityNet random walk (out of scope). mask/train is therefore NOT the paper's
     "Mask" column.
  7. Segmentation network: the paper uses MCTformer's DeepLab with a ResNet-38 backbone (not in timm).
     Paper preset: DeepLab-v2 (ASPP, rates 6/12/18/24) on timm ResNet-101 at output stride 8,
     SGD poly schedule (DeepLab-v2 VOC defaults). Toy preset: the same ASPP head on a tiny
     randomly initialised ViT (timm deit_small_patch16_224 with patch 8, dim 96, depth 4).
     Single-scale inference, no CRF.
  8. Baseline: MCTformer-V2 only (V1 and the IRN ResNet-50 CAM baseline are not implemented).
  9. Classification-stream augmentation for the toy preset is the weak CSD augmentation (no
     RandAugment / erasing, card Sec. 9); the paper preset uses the timm ImageNet recipe.
 10. --amp on CPU is ignored (a note is printed); on CUDA it is fp16 autocast with the KLs in fp32.
 11. --max-iters N shortens every training stage to N iterations; warm-ups are not rescaled.
 12. Toy preset only: 64-px crops (card: 96/128) and 6 epochs (card: 20-40) to fit 2 CPU cores in
     minutes; seeds at scale 0.64 (the training scale) and a sweep up to t = 0.95 (MCTformer: 0.59),
     because the best threshold of random-init maps lies above 0.59.
 13. Not implemented: --stage (the pipeline always runs whole; --resume continues it), MCTformer-V1,
     the IRN baseline, paste rescaling, the ignore band and the CDA area filter (card "optional").

Run:
  python csd.py                                            (toy data, CPU, minutes)
  python csd.py --data VOC2012 --pretrained                (CUDA, paper settings)
  python csd.py --data COCO2014 --pretrained               (MCTformer's settings, C = 80)
  python csd.py --csd off | --sampling uniform | --sampling cor   (ablation rows 61.7 / 63.1 / 63.8)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import inspect
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
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

METHOD = "csd"


# =============================================================================================
# Config
# =============================================================================================
@dataclass
class Args:
    # --- common flags (DESIGN.md) ---
    data: str = "toy"  # toy | VOC2012 | COCO2014 | path
    preset: str = "auto"  # auto = toy on the toy dataset, paper otherwise
    out: str | None = None  # run folder; default runs/csd/<data>-<time>
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # MCTformer main.py default
    workers: int | None = None  # DataLoader workers
    amp: bool | None = None  # MCTformer trains with AMP (timm NativeScaler)
    resume: str | None = None  # RUN_DIR to continue
    eval_only: bool = False  # with --ckpt: seeds, masks, seg/val only
    ckpt: str | None = None  # a final checkpoint (classifier + segmentation network)
    pretrained: bool | None = None  # ImageNet weights through timm
    weights: str | None = None  # local backbone state dict instead of --pretrained
    max_iters: int | None = None  # override every stage's length (warm-ups not rescaled)
    stop_after: int | None = None  # testing aid: stop as if interrupted after N training iterations of this invocation
    # --- classifier: MCTformer-V2 on DeiT-S (card Sec. 3) ---
    backbone: str | None = None  # deit_small_patch16_224 (MCTformer models.py)
    patch_size: int | None = None  # 16 (DeiT-S); toy 8 so full-coverage token masks are not empty
    embed_dim: int | None = None  # 384 (DeiT-S)
    depth: int | None = None  # 12 (DeiT-S)
    num_heads: int | None = None  # 6 (DeiT-S)
    drop_path: float | None = None  # 0.1 (MCTformer main.py --drop-path)
    crop_size: int | None = None  # 224 (MCTformer main.py --input-size; CSD card Sec. 2)
    epochs: int | None = None  # 60 (MCTformer run.sh)
    batch_size: int | None = None  # 64 (MCTformer run.sh), global over processes
    lr: float | None = None  # 5e-4 * 64 / 512 (MCTformer main.py lr scaling)
    min_lr: float | None = None  # 1e-5 (MCTformer main.py)
    warmup_epochs: int | None = None  # 5 (MCTformer main.py)
    warmup_lr: float | None = None  # 1e-6 (MCTformer main.py)
    weight_decay: float | None = None  # 0.05 (MCTformer main.py)
    cls_aug: str | None = None  # timm (paper: RandomResizedCrop+RandAugment+erasing) | weak (toy)
    layer_index: int | None = None  # K: class-to-patch attention summed over the last K layers (run.sh: 3)
    seed_scales: str | None = None  # "1.0" (MCTformer run.sh --scales 1.0); toy: the training scale
    sweep_max: float | None = None  # seed sweep t = 0.00..sweep_max step 0.01 (MCTformer evaluation.py --curve)
    # --- CSD (card Sec. 4) ---
    csd: str = "on"  # on | off (ablation row 61.7)
    sampling: str = "cor"  # cor (Eq. 1) | uniform (row 63.1) | uniform_image
    consistency: str = "dual"  # dual | fg (Fig. 4b) | bg: zeroes the other lambda
    lambda_fg: float = 0.01  # lambda1, Sec. 4.1
    lambda_bg: float = 0.1  # lambda2, Sec. 4.1
    csd_map: str = "patchcam"  # M of Eq. (2): patchcam (default) | fused_par (dev code)
    bg_kl: str = "saliency"  # Eq. (4) reconstruction: saliency | full | bgterm (dev code) | rawsum
    bg_dummy: float = 0.0  # M', the dummy background score (dev code: 0.1 on attention maps)
    kl_temp: float = 1.0  # softmax temperature of the KLs
    kl_classes: str = "all"  # all | present (dev code: only the pasted class term)
    token_mask: str = "full"  # full: whole 16x16 patch inside the mask (dev code) | majority
    reduce: str = "sum"  # sum over tokens, mean over batch | mean over tokens (dev code)
    target_pool: str = "multi"  # multi (paper) | all (dev code)
    bg_paste: str = "intersect"  # intersect: R_bg = M_bg(x_s) & bg(x_m) (dev code) | source
    prior: str = "seeds"  # seeds (stage 1) | dir:PATH (VOC-format PNGs) | gt (debug oracle)
    prior_threshold: str = "best"  # best (sweep argmax) | a float background threshold
    prior_crf: bool = False  # dense CRF on the prior masks
    cor_norm: str = "row"  # row (Eq. 1) | softmax (dev code: softmax(0.1 N))
    cor_smoothing: float = 0.0  # add-one smoothing of N (dev code initialises N to ones)
    csd_warmup: int = 0  # epochs without CSD (dev code; not in the paper)
    cls_on_paste: bool = False  # also MLSM on x_sm^fg with y_m | c_s (off: dev code)
    teacher_conf_thr: float | None = None  # dev code gate of L_fg (spatially normalised teacher > thr)
    csd_resize: int | None = None  # short side before the 224 crop in the CSD stream (dev code: 256)
    # --- masks and segmentation (card Sec. 6) ---
    mask_crf: bool = True  # seeds + dense CRF (PSA/IRN are out of scope)
    seg_backbone: str | None = None  # resnet101 (paper: ResNet-38 DeepLab, see Deviation 7)
    seg_crop: int | None = None  # 321 (DeepLab-v2 VOC)
    seg_batch: int | None = None  # 10 (DeepLab-v2 VOC)
    seg_iters: int | None = None  # 20000 (DeepLab-v2 VOC)
    seg_lr: float | None = None  # 2.5e-4 SGD (DeepLab-v2 VOC); toy: AdamW 1e-3
    seg_optimizer: str | None = None  # sgd | adamw
    seg_rates: str | None = None  # ASPP dilation rates "6,12,18,24" (DeepLab-v2)
    ckpt_every: int = 500  # iterations between checkpoints/last.pt


PRESETS = {
    "paper_voc": dict(  # MCTformer-V2 + CSD on VOC (card Sec. 5); segmentation: Deviation 7
        backbone="deit_small_patch16_224", patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path=0.1,
        crop_size=224, epochs=60, batch_size=64, lr=5e-4 * 64 / 512, min_lr=1e-5, warmup_epochs=5,
        warmup_lr=1e-6, weight_decay=0.05, cls_aug="timm", layer_index=3, csd_resize=256, seed_scales="1.0",
        sweep_max=0.59, pretrained=True, amp=True, workers=8, seg_backbone="resnet101", seg_crop=321, seg_batch=10,
        seg_iters=20000, seg_lr=2.5e-4, seg_optimizer="sgd", seg_rates="6,12,18,24"),
    "paper_coco": dict(  # CSD reports VOC only; MCTformer's COCO run uses the same recipe with C = 80
        backbone="deit_small_patch16_224", patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path=0.1,
        crop_size=224, epochs=60, batch_size=64, lr=5e-4 * 64 / 512, min_lr=1e-5, warmup_epochs=5,
        warmup_lr=1e-6, weight_decay=0.05, cls_aug="timm", layer_index=3, csd_resize=256, seed_scales="1.0",
        sweep_max=0.59, pretrained=True, amp=True, workers=8, seg_backbone="resnet101", seg_crop=321, seg_batch=10,
        seg_iters=20000, seg_lr=2.5e-4, seg_optimizer="sgd", seg_rates="6,12,18,24"),  # COCO seg schedule: not in the card
    "toy": dict(  # Deviation 12. card Sec. 9: tiny random-init MCTformer-V2, patch 8, AdamW 1e-3, weak aug; 64 px crops for CPU time
        backbone="deit_small_patch16_224", patch_size=8, embed_dim=96, depth=4, num_heads=3, drop_path=0.0,
        crop_size=64, epochs=6, batch_size=16, lr=1e-3, min_lr=1e-5, warmup_lr=1e-6,
        warmup_epochs=0,  # per-epoch stepped warm-up would spend 1 of the 6 epochs at 1e-6
        weight_decay=0.05, cls_aug="weak", layer_index=4, csd_resize=72,
        seed_scales="0.64",  # ~72/112: the scale the toy classifier is trained at (and 2.4x fewer tokens)
        sweep_max=0.95,  # random-init maps are flat: the best toy threshold lies above MCTformer's 0.59
        pretrained=False, amp=False, workers=0, seg_backbone="deit_small_patch16_224", seg_crop=64, seg_batch=16,
        seg_iters=250, seg_lr=1e-3, seg_optimizer="adamw", seg_rates="1,2"),
}
CHOICES = dict(preset=("auto", "paper", "toy"), device=("auto", "cpu", "cuda"), csd=("on", "off"),
               sampling=("cor", "uniform", "uniform_image"), consistency=("dual", "fg", "bg"),
               csd_map=("patchcam", "fused_par"), bg_kl=("saliency", "full", "bgterm", "rawsum"),
               kl_classes=("all", "present"), token_mask=("full", "majority"), reduce=("sum", "mean"),
               target_pool=("multi", "all"), bg_paste=("intersect", "source"), cor_norm=("row", "softmax"),
               cls_aug=("timm", "weak"), seg_optimizer=("sgd", "adamw"))
# Flags that change nothing in the final results; --resume may take them from the command line.
RUNTIME_FLAGS = ("resume", "stop_after", "workers", "device")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (DESIGN.md "Errors")
        fail(message)


def fail(msg: str, code: int = 2):
    sys.stderr.write(f"{METHOD}.py: error: {msg}\n")
    sys.exit(code)


def build_parser() -> Parser:
    """argparse from Args; each flag's help is the source comment of its field."""
    comments = dict(re.findall(r"^    (\w+): [^=\n]+= [^#\n]+#\s*(.+)$", inspect.getsource(Args), re.M))
    p = Parser(prog=f"{METHOD}.py", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        default = "preset" if f.default is None else f.default
        text = f"{comments.get(f.name, '')} (default: {default})".replace("%", "%%")
        if f.type in ("bool | None", "bool"):
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            continue
        typ = {"int": int, "float": float}.get(f.type.split(" ")[0], str)
        p.add_argument(flag, dest=f.name, type=typ, default=None, choices=CHOICES.get(f.name), help=text)
    return p


def resolve_args(ns: argparse.Namespace, spec) -> Args:
    """Preset values, then every explicitly given flag on top (flags parse with default None)."""
    args = Args()
    given = {k: v for k, v in vars(ns).items() if v is not None}
    preset = given.get("preset", "auto")
    key = "toy" if preset == "toy" or (preset == "auto" and spec.name == "toy") else \
        ("paper_coco" if spec.dataset == "coco" else "paper_voc")
    for k, v in PRESETS[key].items():
        setattr(args, k, v)
    for k, v in given.items():
        setattr(args, k, v)
    args.preset = key
    return args


# =============================================================================================
# Model: MCTformer-V2 (xulianuwa/MCTformer @9606597, models.py `MCTformerV2`)
# =============================================================================================
def block_forward(blk, x):
    """One timm ViT block, returning the head-averaged softmax attention as well.

    timm's fused attention does not expose the weights, so the block is re-run from its own
    modules (norm1, attn.qkv/q_norm/k_norm/proj, ls1, drop_path1, norm2, mlp, ls2, drop_path2).
    x: (B, T, D) -> (B, T, D), attention (B, T, T) with rows = queries summing to 1.
    """
    attn_mod = blk.attn
    B, T, D = x.shape
    h = blk.norm1(x)
    qkv = attn_mod.qkv(h).reshape(B, T, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, heads, T, d)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    attn = ((q * attn_mod.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, T, T)
    o = (attn_mod.attn_drop(attn) @ v).transpose(1, 2).reshape(B, T, attn_mod.attn_dim)
    o = attn_mod.proj_drop(attn_mod.proj(attn_mod.norm(o)))
    x = x + blk.drop_path1(blk.ls1(o))
    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return x, attn.mean(1)  # Impl. (MCTformer, vision_transformer.py): heads averaged


class MCTformerV2(nn.Module):
    """C class tokens + N patch tokens through the DeiT blocks of a timm ViT.

    cls_logits: mean over channels of output class token c (no head, no final LayerNorm);
    patch_cam: conv3x3 on the patch tokens; patch_logits: its global average.
    """

    def __init__(self, args: Args, num_classes: int):
        super().__init__()
        vit = timm.create_model(args.backbone, pretrained=bool(args.pretrained), num_classes=0,
                                img_size=args.crop_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
                                depth=args.depth, num_heads=args.num_heads, drop_path_rate=args.drop_path)
        if args.weights:
            load_weights(vit, args.weights)
        self.num_classes, self.patch_size = num_classes, args.patch_size
        self.patch_embed, self.blocks = vit.patch_embed, vit.blocks
        # Impl. (MCTformer, models.py): the DeiT cls token and its position embedding repeated C times.
        self.cls_token = nn.Parameter(vit.cls_token.detach().repeat(1, num_classes, 1))  # (1, C, D)
        pos = vit.pos_embed.detach()  # (1, 1 + N, D)
        self.pos_embed = nn.Parameter(torch.cat([pos[:, :1].repeat(1, num_classes, 1), pos[:, 1:]], 1))  # (1, C+N, D)
        self.head = nn.Conv2d(args.embed_dim, num_classes, 3, padding=1)  # V2 patch branch
        self.grid = args.crop_size // args.patch_size

    def interpolate_pos(self, h, w):
        """Patch part bicubically resized to (h, w); class part unchanged. -> (1, C + h*w, D)."""
        C = self.num_classes
        cls_pos, patch_pos = self.pos_embed[:, :C], self.pos_embed[:, C:]
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        D = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.flatten(2).transpose(1, 2)], 1)

    def forward(self, x):
        B = x.shape[0]
        C = self.num_classes
        # Impl. (MCTformer, models.py): the patch conv floors H/p, W/p, as for full-size seed images.
        tokens = self.patch_embed.proj(x)  # (B, D, h, w)
        h, w = tokens.shape[-2:]
        tokens = self.patch_embed.norm(tokens.flatten(2).transpose(1, 2))  # (B, N, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), tokens], 1) + self.interpolate_pos(h, w)  # (B, C+N, D)
        attns = []
        for blk in self.blocks:
            x, a = block_forward(blk, x)
            attns.append(a)
        # The final LayerNorm is NOT applied (MCTformer models.py forward_features).
        cls_logits = x[:, :C].mean(-1)  # (B, C)
        patch = x[:, C:].transpose(1, 2).reshape(B, -1, h, w)  # (B, D, h, w)
        patch_cam = self.head(patch)  # (B, C, h, w)
        return {"cls_logits": cls_logits, "patch_cam": patch_cam, "patch_logits": patch_cam.mean((2, 3)),
                "attn": torch.stack(attns, 1)}  # attn (B, L, C+N, C+N)


def load_weights(vit, path):
    state = torch.load(path, map_location="cpu", weights_only=False)
    state = state.get("model", state) if isinstance(state, dict) else state
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if len(missing) > len(vit.state_dict()) // 2:
        raise ValueError(f"{path} does not look like weights of this backbone ({len(missing)} missing keys)")


def localization_map(out, layer_index: int, num_classes: int, par: bool = True):
    """MCTformer-V2 fused map A_cp * ReLU(patch-CAM) (detached CAM), optionally PAR-refined.

    A_cp: class-to-patch attention summed over the last K layers; PAR: m' = A_pp m with
    A_pp = sum over all layers of the patch-to-patch attention. -> (B, C, h, w), >= 0.
    """
    C = num_classes
    attn = out["attn"]  # (B, L, C+N, C+N)
    B, _, h, w = out["patch_cam"].shape
    A_cp = attn[:, -layer_index:, :C, C:].sum(1).reshape(B, C, h, w)  # summed, not averaged (main.py)
    # Impl. (MCTformer, main.py/engine.py): the CAM factor is detached.
    fused = A_cp * F.relu(out["patch_cam"]).detach()
    if not par:
        return fused
    A_pp = attn[:, :, C:, C:].sum(1)  # (B, N, N), rows are queries
    return (A_pp @ fused.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(B, C, h, w)


# =============================================================================================
# CSD: domains, co-occurrence (Eq. 1), copy-paste
# =============================================================================================
def split_domains(labels: np.ndarray):
    """Source pools S_c (single-label images of class c) and the multi-label target pool T.

    labels: (n, K) multi-hot. -> (list of K index arrays, target index array).
    """
    counts = labels.sum(1)
    single = np.flatnonzero(counts == 1)
    cls = labels[single].argmax(1)
    sources = [single[cls == c] for c in range(labels.shape[1])]
    return sources, np.flatnonzero(counts >= 2)


def cooccurrence_counts(labels: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
    """N (K, K): off-diagonal N_ij = images holding both i and j; diagonal N_ii = single-label
    images of class i (the reading under which "more single-label samples are sampled more")."""
    y = (labels > 0).astype(np.float64)
    N = y.T @ y  # (K, K): every pair of an image counts
    np.fill_diagonal(N, (y[y.sum(1) == 1]).sum(0))
    return N + smoothing


def cooccurrence_matrix(N: np.ndarray, norm: str = "row") -> np.ndarray:
    """Eq. (1): P_ij = N_ij / sum_k N_ik (rows sum to 1). --cor-norm softmax: dev code softmax(0.1 N)."""
    if norm == "softmax":
        z = 0.1 * N
        z = np.exp(z - z.max(1, keepdims=True))
        return z / z.sum(1, keepdims=True)
    rows = N.sum(1, keepdims=True)
    # A class absent from the training set gets a uniform row; it is never a target class, so unused.
    return np.where(rows > 0, N / np.maximum(rows, 1e-12), 1.0 / N.shape[1])  # Eq. (1)


def cor_distribution(P: np.ndarray, y_m: np.ndarray, eligible: np.ndarray, mode: str = "cor",
                     source_sizes: np.ndarray | None = None) -> np.ndarray:
    """Which class to paste into a target with classes {c_1..c_n}.

    cor: P_j proportional to sum_k P_{c_k, j} (Eq. 1), zero where S_j is empty, renormalised.
    uniform: uniform over classes with a non-empty S_j; uniform_image: proportional to |S_j|.
    Returns (K,) summing to 1, or all zeros when no class is eligible.
    """
    if mode == "cor":
        p = P[y_m > 0].sum(0)  # Eq. (1)  P_j = sum_k P_{c_k, j}
    elif mode == "uniform":
        p = np.ones(P.shape[1])
    else:
        p = np.asarray(source_sizes, np.float64)
    p = np.where(eligible, p, 0.0)
    total = p.sum()
    return p / total if total > 0 else p


def weak_augment(image, masks, rng, crop: int, resize_short: int):
    """Joint weak augmentation (dev code datasets.py): short side -> resize_short (nearest for masks),
    random crop (masks padded 255), horizontal flip 0.5. The image and all masks move together."""
    ratio = resize_short / min(image.shape[:2])
    if abs(ratio - 1.0) > 1e-6:
        image, masks, _ = augment.rescale(image, ratio, masks=masks)
    image, masks, _, _ = augment.random_crop(image, rng, crop, masks=masks)
    image, masks, _ = augment.random_hflip(image, rng, masks=masks)
    return image, masks


def make_composites(x_s, x_m, M_fg, R_bg):
    """Copy-paste, position-preserving at scale 1 (both crops are the same size).
    x_s, x_m: (3, H, W); M_fg, R_bg: bool (H, W). -> x_sm^fg, x_sm^bg (3, H, W)."""
    x_fg = augment.paste(x_m, x_s, M_fg)  # where(M_fg, x_s, x_m)
    x_bg = augment.paste(x_m, x_s, R_bg)  # where(R_bg, x_s, x_m)
    return x_fg, x_bg


def token_mask(mask: torch.Tensor, patch: int, mode: str = "full") -> torch.Tensor:
    """Pixel mask (..., H, W) -> token mask (..., H/p, W/p): full = the whole patch inside (dev code),
    majority = more than half of it."""
    cover = F.avg_pool2d(mask.float().reshape(-1, 1, *mask.shape[-2:]), patch)  # (n, 1, h, w)
    cover = cover.reshape(*mask.shape[:-2], *cover.shape[-2:])
    return cover >= 1.0 if mode == "full" else cover > 0.5


def random_resized_crop(image, rng, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision RandomResizedCrop (bicubic), drawn from rng; timm's ImageNet train transform."""
    H, W = image.shape[:2]
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            break
    else:  # fallback: central crop of the clamped aspect
        h, w, y0, x0 = H, W, 0, 0
    patch = image[y0:y0 + h, x0:x0 + w]
    return np.asarray(Image.fromarray(patch).resize((size, size), Image.BICUBIC))


def random_erasing(x: torch.Tensor, rng, p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 3.3)):
    """timm RandomErasing, mode 'pixel' (per-pixel normal noise), on a normalised (3, H, W) tensor."""
    if rng.random() >= p:
        return x
    _, H, W = x.shape
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
        if h < H and w < W:
            y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            x = x.clone()
            x[:, y0:y0 + h, x0:x0 + w] = torch.from_numpy(rng.standard_normal((3, h, w)).astype(np.float32))
            return x
    return x


class CSDTransform:
    """Training sample = classification view of image i + (when CSD is on) one CSD triplet.

    The triplet's random draws (x_m from the target pool, class c by COR/uniform, x_s from S_c)
    use the sample's rng, so they depend on (seed, epoch, index) only.
    """

    def __init__(self, args: Args, raw=None, labels=None, P=None, prior_key="prior"):
        self.args, self.raw, self.labels, self.P, self.prior_key = args, raw, labels, P, prior_key
        if raw is not None:
            self.sources, multi = split_domains(labels)
            self.targets = multi if args.target_pool == "multi" else np.arange(len(labels))
            self.sizes = np.array([len(s) for s in self.sources])
            self.eligible = self.sizes > 0

    def classification_view(self, image, rng):
        a = self.args
        if a.cls_aug == "timm":  # Deviation 9: the toy preset uses the weak branch below
            image = random_resized_crop(image, rng, a.crop_size)
            image, _, _ = augment.random_hflip(image, rng)
            image = augment.rand_augment(image, rng)
            return random_erasing(augment.to_tensor(image), rng)
        image, _ = weak_augment(image, (), rng, a.crop_size, a.csd_resize)
        return augment.to_tensor(image)

    def prior_of(self, sample):
        return sample["mask"] if self.prior_key == "mask" else sample[self.prior_key]

    def __call__(self, sample, rng):
        out = {"image": self.classification_view(sample["image"], rng), "label": torch.from_numpy(sample["label"])}
        if self.raw is not None:
            out.update(self.triplet(rng))
        return out

    def triplet(self, rng):
        a, K = self.args, self.labels.shape[1]
        m = int(self.targets[rng.integers(len(self.targets))])
        y_m = self.labels[m]
        probs = cor_distribution(self.P, y_m, self.eligible, a.sampling, self.sizes)
        crop = a.crop_size
        if probs.sum() == 0:  # no class with a source image: an empty triplet (zero CSD loss)
            z = torch.zeros(3, crop, crop)
            zb = torch.zeros(crop, crop, dtype=torch.bool)
            return {"x_s": z, "x_fg": z, "x_bg": z, "M_fg": zb, "M_bg": zb, "R_bg": zb, "bg_m": zb, "c_s": torch.tensor(0),
                    "y_fg": torch.from_numpy(y_m), "y_bg": torch.from_numpy(y_m), "y_s": torch.zeros(K)}
        c = int(rng.choice(K, p=probs))
        s = int(self.sources[c][rng.integers(len(self.sources[c]))])
        src, tgt = self.raw.load(s), self.raw.load(m)
        # Joint weak augmentation of (x_s, its prior) and of (x_m, its prior): masks stay aligned.
        img_s, (pr_s,) = weak_augment(src["image"], (self.prior_of(src),), rng, crop, a.csd_resize)
        img_m, (pr_m,) = weak_augment(tgt["image"], (self.prior_of(tgt),), rng, crop, a.csd_resize)
        pr_s, pr_m = torch.from_numpy(pr_s.astype(np.int64)), torch.from_numpy(pr_m.astype(np.int64))
        M_fg = pr_s == c + 1  # foreground of the source class (label values are class index + 1)
        M_bg = (pr_s != c + 1) & (pr_s != data.IGNORE_INDEX)  # not foreground, not padding/ignore
        R_bg = M_bg & (pr_m == 0) if a.bg_paste == "intersect" else M_bg
        x_s, x_m = augment.to_tensor(img_s), augment.to_tensor(img_m)
        x_fg, x_bg = make_composites(x_s, x_m, M_fg, R_bg)
        y_fg = np.maximum(y_m, np.eye(K, dtype=np.float32)[c])  # y_m | {c_s}
        return {"x_s": x_s, "x_fg": x_fg, "x_bg": x_bg, "M_fg": M_fg, "M_bg": M_bg, "R_bg": R_bg, "bg_m": pr_m == 0,
                "c_s": torch.tensor(c),
                "y_fg": torch.from_numpy(y_fg), "y_bg": torch.from_numpy(y_m.copy()),
                "y_s": torch.from_numpy(self.labels[s].copy())}


# =============================================================================================
# Losses
# =============================================================================================
def loss_cls(out, y):
    """MCTformer-V2: L_cls = MLSM(class-token logits, y) + MLSM(patch logits, y)."""
    return F.multilabel_soft_margin_loss(out["cls_logits"], y) + F.multilabel_soft_margin_loss(out["patch_logits"], y)


def reduce_tokens(kl: torch.Tensor, mask: torch.Tensor, reduce: str) -> torch.Tensor:
    """kl (B, h, w) -> scalar: masked sum per image (mean over masked tokens with 'mean'), mean over B.
    Deviation 4: the paper's lambdas are read as belonging to this sum reduction (dev code: mean, lambda = 1).
    torch.where (not multiplication) so tokens outside the mask get exactly zero gradient."""
    per_token = torch.where(mask, kl, torch.zeros_like(kl))
    per_image = per_token.sum((1, 2))  # (B,)
    if reduce == "mean":
        per_image = per_image / mask.sum((1, 2)).clamp(min=1)
    return per_image.mean()


def loss_fg(M_s, M_sm_fg, T_fg, *, temp=1.0, classes="all", c_s=None, reduce="sum"):
    """Eq. (3): foreground consistency. M_s (teacher, detached), M_sm_fg: (B, C, h, w); T_fg: bool (B, h, w).
    KL(p || q) = sum_c p_c (log p_c - log q_c) per token, p = softmax_C(M_s / T), q = softmax_C(M_sm^fg / T)."""
    log_p = F.log_softmax(M_s.detach().float() / temp, dim=1)  # (B, C, h, w)
    log_q = F.log_softmax(M_sm_fg.float() / temp, dim=1)
    kl_c = log_p.exp() * (log_p - log_q)  # (B, C, h, w)
    if classes == "present":  # dev code: only the pasted class's term
        kl = kl_c.gather(1, c_s.view(-1, 1, 1, 1).expand(-1, 1, *kl_c.shape[-2:])).squeeze(1)
    else:
        kl = kl_c.sum(1)  # (B, h, w)
    # Eq. (3)  L_fg = sum_hw 1[(h,w) in M_fg] KL(M_s || M_sm^fg)
    return reduce_tokens(kl, T_fg, reduce)


def background_distribution(M, *, dummy=0.0, mode="saliency", temp=1.0, scale=1.0):
    """Eq. (4), RECONSTRUCTED (the paper text lost it; card Sec. 4.6). Deviation 1.

    M~ = [M' 1 ; M] (C+1, h, w), pi = softmax_{C+1}(M~ / T), sigma(pi) = sum_{c>=1} pi_c = 1 - pi_0.
    Returns log-probabilities over the channels: saliency/bgterm -> (B, 2, h, w) = log (pi_0, sigma);
    full -> (B, C+1, h, w); rawsum -> log softmax([M', sum_c M_c]) on the raw scores (literal reading).
    Without the dummy channel a softmax over the C classes is shift-invariant and cannot tell
    "all classes low" (background) from "all classes high".
    """
    M = M.float()
    dummy_channel = torch.full_like(M[:, :1], dummy)  # M' 1: (B, 1, h, w)
    if mode == "rawsum":
        return F.log_softmax(torch.cat([dummy_channel, M.sum(1, keepdim=True)], 1) / temp, dim=1)
    # Eq. (4)  pi = softmax([M' ; M])
    log_pi = F.log_softmax(scale * torch.cat([dummy_channel, M], 1) / temp, dim=1)  # (B, C+1, h, w)
    if mode == "full":
        return log_pi
    # Eq. (4)  b = (pi_0, sigma(pi)), sigma = sum_{c>=1} pi_c (in log space: logsumexp)
    return torch.cat([log_pi[:, :1], torch.logsumexp(log_pi[:, 1:], 1, keepdim=True)], 1)  # (B, 2, h, w)


def loss_bg(M_s, M_sm_bg, T_bg, *, dummy=0.0, mode="saliency", temp=1.0, reduce="sum"):
    """Eq. (5): background consistency, KL(b(M_s) || b(M_sm^bg)) on the background tokens T_bg.
    Deviation: the paper prints M_sm^fg in Eq. (5); the background composite M_sm^bg is meant."""
    log_p = background_distribution(M_s.detach(), dummy=dummy, mode=mode, temp=temp)
    # bgterm (dev code): the student's C+1 scores x10, and only the background (pi_0) term of the KL.
    log_q = background_distribution(M_sm_bg, dummy=dummy, mode=mode, temp=temp,
                                    scale=10.0 if mode == "bgterm" else 1.0)
    kl_c = log_p.exp() * (log_p - log_q)  # (B, 2 or C+1, h, w)
    kl = kl_c[:, 0] if mode == "bgterm" else kl_c.sum(1)  # (B, h, w)
    # Eq. (5)  L_bg = sum_hw 1[(h,w) in M_bg] KL(M_s || M_sm^bg)
    return reduce_tokens(kl, T_bg, reduce)


def csd_score_map(out, args: Args, num_classes: int):
    """M of Eq. (2). Deviation 3: patchcam = the raw V2 patch-CAM logits (no min-max, as the paper stresses);
    fused_par = the PAR-refined fused map (dev code; gradient reaches only the attention)."""
    if args.csd_map == "patchcam":
        return out["patch_cam"]
    return localization_map(out, args.layer_index, num_classes, par=True)


def csd_step(model, batch, args: Args, num_classes: int, csd_active: bool):
    """One training step's losses. Eq. (6): L_total = L_cls + lambda1 L_fg + lambda2 L_bg.

    The classification stream and the two composites go through ONE forward (3B images), which
    also keeps DDP to one forward per backward. The teacher M_s = F(x_s) runs in eval mode under
    no_grad (dev code: stop-gradient, no drop-path).
    """
    x, y = batch["image"], batch["label"]
    B = x.shape[0]
    lam_fg = 0.0 if args.consistency == "bg" else args.lambda_fg
    lam_bg = 0.0 if args.consistency == "fg" else args.lambda_bg
    if not csd_active:
        out = model(x)
        l_cls = loss_cls(out, y)
        return {"total": l_cls, "cls": l_cls}
    out = model(torch.cat([x, batch["x_fg"], batch["x_bg"]], 0))  # (3B, ...)
    out_x = {"cls_logits": out["cls_logits"][:B], "patch_logits": out["patch_logits"][:B]}
    l_cls = loss_cls(out_x, y)
    if args.cls_on_paste:
        out_fg = {"cls_logits": out["cls_logits"][B:2 * B], "patch_logits": out["patch_logits"][B:2 * B]}
        l_cls = l_cls + loss_cls(out_fg, batch["y_fg"])
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    with torch.no_grad():
        # Eq. (2)  M_s = F(x_s): the teacher, stop-gradient
        M_s = csd_score_map(net(batch["x_s"]), args, num_classes).float()  # (B, C, h, w)
    net.train(was_training)
    # Eq. (2)  M_sm^fg = F(x_sm^fg), and M_sm^bg = F(x_sm^bg)
    M_sm = csd_score_map(out, args, num_classes)  # (3B, C, h, w)
    M_fg, M_bg = M_sm[B:2 * B], M_sm[2 * B:]
    T_fg = token_mask(batch["M_fg"], net.patch_size, args.token_mask)  # (B, h, w)
    T_bg = token_mask(batch["R_bg"], net.patch_size, args.token_mask)
    if args.teacher_conf_thr is not None:  # dev code gate, off by default
        m = M_s.gather(1, batch["c_s"].view(-1, 1, 1, 1).expand(-1, 1, *M_s.shape[-2:])).squeeze(1)
        lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
        T_fg = T_fg & ((m - lo) / (hi - lo + 1e-5) > args.teacher_conf_thr)
    with torch.autocast(device_type=x.device.type, enabled=False):  # KLs in fp32 under AMP
        l_fg = loss_fg(M_s, M_fg, T_fg, temp=args.kl_temp, classes=args.kl_classes, c_s=batch["c_s"],
                       reduce=args.reduce)
        l_bg = loss_bg(M_s, M_bg, T_bg, dummy=args.bg_dummy, mode=args.bg_kl, temp=args.kl_temp, reduce=args.reduce)
    # Eq. (6)  L_total = L_cls + lambda1 * L_fg + lambda2 * L_bg
    total = l_cls + lam_fg * l_fg + lam_bg * l_bg
    return {"total": total, "cls": l_cls, "fg": l_fg, "bg": l_bg,
            "tokens_fg": T_fg.float().sum((1, 2)).mean(), "tokens_bg": T_bg.float().sum((1, 2)).mean()}


# =============================================================================================
# Pseudo labels: seeds, prior, masks
# =============================================================================================
@torch.no_grad()
def lowres_maps(model, image: np.ndarray, label: np.ndarray, args: Args, device) -> list:
    """Token-resolution MCTformer-V2 maps of the present classes, per scale: fused -> PAR for the
    image and its flip. -> [(2, Kp, h_s, w_s) float16 per scale]; kept small so that the sweep
    pass and the mask pass share one forward per image."""
    keys = torch.as_tensor(np.flatnonzero(label > 0), device=device)
    H, W = image.shape[:2]
    maps = []
    for scale in [float(v) for v in args.seed_scales.split(",")]:
        img = image if scale == 1.0 else augment.rescale(image, scale)[0]
        x = augment.to_tensor(img).to(device)
        x = torch.stack([x, x.flip(-1)])  # (2, 3, H_s, W_s)
        m = localization_map(model(x), args.layer_index, model.num_classes)  # (2, K, h, w)
        maps.append(m[:, keys].half().cpu())
    return maps


def seed_from_lowres(maps: list, label: np.ndarray, size) -> np.ndarray:
    """Bilinear to image size -> sum over scales and {image, un-flipped flip} -> per-class min-max
    to [0, 1] (MCTformer main.py, --scales). -> float32 (K, H, W), zero for absent classes."""
    keys = np.flatnonzero(label > 0)
    cam = torch.zeros(len(label), *size)
    if len(keys) == 0:
        return cam.numpy()
    total = 0
    for m in maps:
        up = F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)  # (2, Kp, H, W)
        total = total + up[0] + up[1].flip(-1)
    lo = total.flatten(1).min(1)[0].view(-1, 1, 1)
    hi = total.flatten(1).max(1)[0].view(-1, 1, 1)
    cam[keys] = (total - lo) / (hi - lo + 1e-5)
    return cam.numpy()


def seed_map(model, image, label, args, device):
    """The seed of one image: (K, H, W) in [0, 1]."""
    return seed_from_lowres(lowres_maps(model, image, label, args, device), label, image.shape[:2])


def seeds_to_label(cam: np.ndarray, label: np.ndarray, t: float) -> np.ndarray:
    """argmax over [t, cams of present classes] -> uint8 (H, W) in 0..C-1 (ties to background)."""
    keys = np.flatnonzero(label > 0)
    if len(keys) == 0:
        return np.zeros(cam.shape[1:], np.uint8)
    scores = np.concatenate([np.full((1,) + cam.shape[1:], t, np.float32), cam[keys]], 0)
    return np.concatenate([[0], keys + 1])[scores.argmax(0)].astype(np.uint8)


def crf_labels(image, seed_label, label, preset):
    """Dense CRF on a hard seed map (label unary, gt_prob 0.7) over the image's present classes.
    Deviation 6: the paper's masks come from PSA (AffinityNet random walk), out of scope here."""
    keys = np.concatenate([[0], np.flatnonzero(label > 0) + 1])
    lut = np.zeros(256, np.int64)
    lut[keys] = np.arange(len(keys))
    # np.array copies: pydensecrf rejects the read-only arrays PIL decoding returns (common/ bug, reported).
    out = crf.refine_labels(np.array(image, np.uint8), lut[seed_label], len(keys), **crf.PRESETS[preset])
    return keys[out].astype(np.uint8)


def _keep_numpy(sample):
    return sample


def _image_loader(ds, workers):
    """One raw sample (numpy arrays) at a time, in order; workers only read and decode files."""
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_keep_numpy)


def compute_maps(model, datasets, args, device, desc):
    """Low-resolution maps of every image of the given datasets (ids shared by several computed once)."""
    model.eval()
    cache = {}
    for ds in datasets:
        todo = [i for i, name in enumerate(ds.ids) if name not in cache]
        sub = torch.utils.data.Subset(ds, todo)
        for sample in tqdm(_image_loader(sub, args.workers), desc=desc, total=len(todo), disable=not is_main(),
                           mininterval=5):
            cache[sample["name"]] = lowres_maps(model, sample["image"], sample["label"], args, device)
    return cache


def evaluate_seeds(cache, ds, args):
    """Full background-threshold sweep (t = 0.00..sweep_max, step 0.01) on a split with GT, per
    subset. Returns {"all", "single", "multi"}: ThresholdSweep.compute() results.

    The prediction at threshold t_i is arg = argmax_c cam_c where best = max_c cam_c > t_i, else
    background. One histogram over (k, gt, arg), k = #{thresholds < best}, holds every threshold's
    confusion matrix: pixels with k > i are foreground at t_i. This fills common.miou.ThresholdSweep's
    matrices with exactly the counts its per-image update() would give, in one pass per image."""
    thresholds = np.round(np.arange(0.0, args.sweep_max + 1e-9, 0.01), 2)
    T, C = len(thresholds), ds.num_classes
    hist = {g: np.zeros((T + 1, C, C), np.int64) for g in ("single", "multi", "none")}
    for i in range(len(ds)):
        sample = ds.load(i)
        label, gt = sample["label"], sample["mask"].astype(np.int64)
        cam = seed_from_lowres(cache[sample["name"]], label, gt.shape)  # (C-1, H, W); absent classes are 0
        n = int((label > 0).sum())
        # Absent classes are 0 and never exceed t >= 0, so the argmax over all channels is the present-class one.
        best, arg = cam.max(0), cam.argmax(0) + 1
        k = np.searchsorted(thresholds, best, side="left")  # thresholds strictly below best
        valid = gt != data.IGNORE_INDEX
        idx = (k[valid] * C + gt[valid]) * C + arg[valid]
        hist["single" if n == 1 else ("multi" if n > 1 else "none")] += \
            np.bincount(idx, minlength=(T + 1) * C * C).reshape(T + 1, C, C)
    hist["all"] = sum(hist.values())
    out = {}
    for g in ("all", "single", "multi"):
        h = hist[g]
        fg = h[::-1].cumsum(0)[::-1]  # fg[j] = sum_{k >= j} h[k]
        sweep = miou.ThresholdSweep(C, thresholds)
        for ti, cm in enumerate(sweep.matrices):
            m = fg[ti + 1].copy()  # foreground at t_i: k > i, predicted arg
            m[:, 0] += (h.sum(0) - fg[ti + 1]).sum(1)  # the rest is predicted background
            cm.matrix += m
            cm.labelled += int(h.sum())
        out[g] = sweep.compute()
    return out


def seed_results(res, class_names):
    """metrics.json entries: the subsets are scored at the all-images best threshold t* (the one
    the masks use) and also at their own best threshold."""
    t = res["all"]["best_threshold"]
    out = {"": result_entry(res["all"]["best"], class_names, threshold=t)}
    for g in ("single", "multi"):
        curve = dict(res[g]["curve"])
        if not np.isnan(curve[t]):
            out["_" + g] = {"miou": pct(curve[t]), "iou": {}, "threshold": t,
                            "best_miou": pct(res[g]["best"]["miou"]), "best_threshold": res[g]["best_threshold"]}
    return out


def write_labels(cache, ds, t, out_dir: Path, use_crf, desc, score_ids=(), cm=None, indices=None):
    """Seeds at threshold t (+ dense CRF) for the images of ds (all, or `indices`) -> out_dir/<id>.png;
    the labels of images in score_ids are scored against their GT in cm."""
    out_dir.mkdir(parents=True, exist_ok=True)
    score_ids = set(score_ids)
    for i in tqdm(range(len(ds)) if indices is None else indices, desc=desc, disable=not is_main(), mininterval=5):
        sample = ds.load(i)
        cam = seed_from_lowres(cache[sample["name"]], sample["label"], sample["image"].shape[:2])
        lab = seeds_to_label(cam, sample["label"], t)
        if use_crf:
            lab = crf_labels(sample["image"], lab, sample["label"], "psa")
        data.save_mask(out_dir / f"{sample['name']}.png", lab)
        if sample["name"] in score_ids:
            cm.update(lab, sample["mask"])


# =============================================================================================
# Segmentation network (Deviation 7)
# =============================================================================================
class SegNet(nn.Module):
    """DeepLab-v2 style: a timm feature extractor + ASPP (sum of dilated 3x3 classifiers).
    Deviation 7: not MCTformer's ResNet-38 DeepLab (not in timm)."""

    def __init__(self, args: Args, num_classes: int):
        super().__init__()
        name = args.seg_backbone
        if name.startswith(("vit", "deit")):
            kw = dict(img_size=args.seg_crop, patch_size=args.patch_size, embed_dim=args.embed_dim,
                      depth=args.depth, num_heads=args.num_heads, dynamic_img_size=True)
        else:
            kw = dict(output_stride=8)
        self.backbone = timm.create_model(name, pretrained=bool(args.pretrained), features_only=True,
                                          out_indices=(-1,), **kw)
        channels = self.backbone.feature_info.channels()[-1]
        rates = [int(r) for r in args.seg_rates.split(",")]
        self.aspp = nn.ModuleList(nn.Conv2d(channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        self.stride = 32

    def forward(self, x):
        f = self.backbone(x)[-1]  # (B, D, h, w)
        logits = sum(conv(f) for conv in self.aspp)  # (B, C, h, w)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class SegTransform:
    """Segmentation training: random rescale 0.7-1.3, crop (labels padded 255), flip."""

    def __init__(self, crop):
        self.crop = crop

    def __call__(self, sample, rng):
        image, (lab,), _ = augment.random_rescale(sample["image"], rng, masks=(sample["pseudo"],), ratio_range=(0.7, 1.3))
        image, (lab,), _, _ = augment.random_crop(image, rng, self.crop, masks=(lab,))
        image, (lab,), _ = augment.random_hflip(image, rng, masks=(lab,))
        return {"image": augment.to_tensor(image), "target": augment.mask_to_tensor(lab)}


@torch.no_grad()
def seg_predict(model, image, device, stride):
    """Single-scale prediction; the image is padded to a multiple of the stride, logits cropped back."""
    H, W = image.shape[:2]
    x = augment.to_tensor(image).to(device)[None]
    ph, pw = (-H) % stride, (-W) % stride
    x = F.pad(x, (0, pw, 0, ph))
    return model(x)[0, :, :H, :W].argmax(0).cpu().numpy()


def evaluate_seg(model, ds, args, device):
    cm = miou.ConfusionMatrix(ds.num_classes)
    model.eval()
    for sample in tqdm(_image_loader(ds, args.workers), desc="seg/val", disable=not is_main(), mininterval=5):
        cm.update(seg_predict(model, sample["image"], device, model.stride), sample["mask"])
    return cm.compute()


# =============================================================================================
# Training (shared loop for the classifier stages and the segmentation network)
# =============================================================================================
def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def world():
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed):
    # TRY NOT TO MODIFY: seeding (identical in all scripts)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["random"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def atomic_save(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Logger:
    def __init__(self, run_dir: Path | None):
        self.path = run_dir / "log.jsonl" if run_dir is not None and is_main() else None

    def log(self, record: dict, echo: str | None = None):
        if not is_main():
            return
        if echo:
            print(echo, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def param_groups(model, weight_decay):
    """AdamW groups: no decay for 1-D parameters, position embeddings and class tokens (timm)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "pos_embed" in name or "cls_token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(it, ipe, total, args):
    """timm CosineLRScheduler stepped per epoch: linear warm-up from warmup_lr, then cosine to min_lr."""
    epoch, epochs = it // ipe, max(1, math.ceil(total / ipe))
    if epoch < args.warmup_epochs:
        return args.warmup_lr + epoch * (args.lr - args.warmup_lr) / args.warmup_epochs
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * epoch / epochs))


def poly_lr(it, total, base, power=0.9):
    return base * (1 - it / total) ** power


class Interrupted(Exception):
    pass


def train_loop(ctx, stage, model, optimizer, dataset, batch_size, total, lr_fn, step_fn):
    """Epoch loop with DistributedSampler, resumable at any iteration: the sampler order depends on
    (seed, epoch) only and the batches already done in the current epoch are skipped."""
    args, device, run_dir = ctx["args"], ctx["device"], ctx["run_dir"]
    ws, rank = world()
    per_rank = batch_size // ws
    ipe = len(dataset) // batch_size
    if ipe == 0:
        fail(f"the training split has {len(dataset)} images, fewer than --batch-size {batch_size}")
    start = 0
    ck = ctx.get("resume_ckpt")
    if ck is not None and ck["stage"] == stage:
        model_to_load = model.module if hasattr(model, "module") else model
        model_to_load.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        start = ck["iteration"]
        ctx["resume_ckpt"] = None
    scaler = torch.amp.GradScaler("cuda", enabled=ctx["amp"])
    net = model.module if hasattr(model, "module") else model
    it = start
    bar = tqdm(total=total, initial=start, desc=stage, disable=not is_main(), mininterval=5)
    while it < total:
        epoch = it // ipe
        dataset.set_epoch(epoch)
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=ws, rank=rank, shuffle=True,
                                                      seed=args.seed, drop_last=True)
        sampler.set_epoch(epoch)
        order = list(sampler)[(it - epoch * ipe) * per_rank:ipe * per_rank]
        gen = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, sampler=order, drop_last=True,
                                             num_workers=args.workers, generator=gen,
                                             worker_init_fn=lambda w: seed_everything(args.seed + 1000 * epoch + w))
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            lr = lr_fn(it, ipe, epoch)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_mult", 1.0)
            model.train()
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=ctx["amp"]):
                losses = step_fn(model, batch, epoch)
            for name, value in losses.items():
                if not torch.isfinite(value):
                    sys.stderr.write(f"{METHOD}.py: non-finite loss losses/{name} = {value.item()} at {stage} "
                                     f"iteration {it}; lower the learning rate or check the inputs\n")
                    sys.exit(1)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses["total"]).backward()
            scaler.step(optimizer)
            scaler.update()
            it += 1
            bar.update(1)
            if it % 20 == 0 or it == total:
                rec = {"stage": stage, "iteration": it, "epoch": epoch, "lr": lr,
                       **{f"losses/{k}": round(float(v.detach()), 6) for k, v in losses.items()}}
                ctx["logger"].log(rec)
                bar.set_postfix({k: f"{float(v.detach()):.3f}" for k, v in losses.items()}, refresh=False)
            ctx["iters_this_run"] = ctx.get("iters_this_run", 0) + 1
            stop = args.stop_after is not None and ctx["iters_this_run"] >= args.stop_after
            if it % args.ckpt_every == 0 or stop or it == total:
                save_progress(ctx, stage, it, net, optimizer)
            if stop:
                raise Interrupted(f"{stage} iteration {it}")
            if it >= total:
                break
    bar.close()


def save_progress(ctx, stage, it, net, optimizer):
    if not is_main() or ctx["run_dir"] is None:
        return
    atomic_save({"stage": stage, "iteration": it, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                 "rng": rng_state(), "done": ctx["done"], "args": dataclasses.asdict(ctx["args"])},
                ctx["run_dir"] / "checkpoints" / "last.pt")


def finish_stage(ctx, stage, results=None, weights=None):
    """Record a completed stage (its results and, for trained networks, a weights file)."""
    ctx["done"][stage] = results or {}
    if is_main() and ctx["run_dir"] is not None:
        if weights is not None:
            atomic_save(weights, ctx["run_dir"] / "checkpoints" / f"{stage}.pt")
        atomic_save({"stage": stage, "iteration": 0, "done": ctx["done"], "args": dataclasses.asdict(ctx["args"])},
                    ctx["run_dir"] / "checkpoints" / "last.pt")
    barrier()


def wrap_ddp(model, device):
    if dist.is_initialized():
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def train_classifier(ctx, stage, csd_on, prior_dir=None):
    """Stage 1 (csd_on=False) or stage 2: MCTformer-V2 from its (ImageNet or random) initialisation."""
    args, spec, device = ctx["args"], ctx["spec"], ctx["device"]
    seed_everything(args.seed)  # the same initialisation in both stages: a paired comparison
    model = MCTformerV2(args, ctx["num_classes"] - 1).to(device)
    K = ctx["num_classes"] - 1
    transform = CSDTransform(args)
    if csd_on:
        prior_key = "mask" if args.prior == "gt" else "prior"
        raw = data.SegDataset(spec.root, ctx["splits"]["train"], dataset=spec.dataset,
                              extra_dirs=None if prior_key == "mask" else {"prior": prior_dir})
        labels = ctx["train_labels"]
        P = cooccurrence_matrix(cooccurrence_counts(labels, args.cor_smoothing), args.cor_norm)  # Eq. (1)
        transform = CSDTransform(args, raw, labels, P, prior_key)
        ctx["logger"].log({"stage": stage, "cooccurrence_P": np.round(P, 4).tolist()})
    ds = data.SegDataset(spec.root, ctx["splits"]["train"], dataset=spec.dataset, transform=transform, seed=args.seed)
    ipe = len(ds) // args.batch_size
    total = args.max_iters if args.max_iters is not None else args.epochs * max(ipe, 1)  # Deviation 11
    ddp_model = wrap_ddp(model, device)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, eps=1e-8)

    def step(m, batch, epoch):
        return csd_step(m, batch, args, K, csd_active=csd_on and epoch >= args.csd_warmup)

    train_loop(ctx, stage, ddp_model, optimizer, ds, args.batch_size, total,
               lambda it, ipe_, ep: cosine_lr(it, ipe_, total, args), step)
    return model


def train_segmentation(ctx, mask_dir):
    args, spec, device = ctx["args"], ctx["spec"], ctx["device"]
    seed_everything(args.seed + 2)
    model = SegNet(args, ctx["num_classes"]).to(device)
    ds = data.SegDataset(spec.root, ctx["splits"]["train"], dataset=spec.dataset, extra_dirs={"pseudo": mask_dir},
                         transform=SegTransform(args.seg_crop), seed=args.seed + 2)
    total = args.max_iters if args.max_iters is not None else args.seg_iters
    if args.seg_optimizer == "sgd":  # DeepLab-v2: 10x lr for the classifier
        groups = [{"params": model.backbone.parameters(), "lr_mult": 1.0},
                  {"params": model.aspp.parameters(), "lr_mult": 10.0}]
        optimizer = torch.optim.SGD(groups, lr=args.seg_lr, momentum=0.9, weight_decay=5e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.seg_lr, weight_decay=0.01)
    ddp_model = wrap_ddp(model, device)

    def step(m, batch, epoch):
        loss = F.cross_entropy(m(batch["image"]), batch["target"], ignore_index=data.IGNORE_INDEX)
        return {"total": loss, "seg": loss}

    train_loop(ctx, "seg", ddp_model, optimizer, ds, args.seg_batch, total,
               lambda it, ipe, ep: poly_lr(it, total, args.seg_lr), step)
    return model


# =============================================================================================
# Evaluation helpers, visualisation
# =============================================================================================
def pct(x):
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(100.0 * float(x), 2)


def result_entry(res, class_names, **extra):
    iou = {n: pct(v) for n, v in zip(class_names, res["iou"]) if not np.isnan(v)}
    return {"miou": pct(res["miou"]), "iou": iou, **extra}


def save_vis(ctx, classifier, segnet, ds, mask_dir, n=4):
    """vis/seed_split.png rows: image | CAM heat-map | pseudo label | prediction | ground truth."""
    args, device = ctx["args"], ctx["device"]
    pal = data.voc_palette()
    rows = []
    for i in range(min(n, len(ds))):
        s = ds.load(i)
        cam = seed_map(classifier, s["image"], s["label"], args, device).max(0)
        heat = (np.stack([cam, cam * 0.5, 1 - cam], -1) * 255).astype(np.uint8)
        mask_path = mask_dir / f"{s['name']}.png"
        pseudo = pal[data.read_mask(mask_path)] if mask_path.is_file() else np.zeros_like(s["image"])
        pred = pal[seg_predict(segnet, s["image"], device, segnet.stride)]
        tiles = [s["image"], heat, pseudo, pred, pal[s["mask"]]]
        tiles = [np.asarray(Image.fromarray(t).resize((128, 128), Image.NEAREST)) for t in tiles]
        rows.append(np.concatenate(tiles, 1))
    if rows:
        (ctx["run_dir"] / "vis").mkdir(exist_ok=True)
        Image.fromarray(np.concatenate(rows, 0)).save(ctx["run_dir"] / "vis" / "seed_split.png")


# =============================================================================================
# Main
# =============================================================================================
def validate(args: Args, spec):
    """Everything that can be wrong with the command line, checked before any file is written."""
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was given but no CUDA GPU is available; use --device cpu")
    for name in (args.backbone, args.seg_backbone):
        if not timm.is_model(name):
            fail(f"unknown timm model '{name}'; pick one from timm.list_models() (e.g. deit_small_patch16_224)")
    positive = dict(patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth, num_heads=args.num_heads,
                    crop_size=args.crop_size, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    seg_crop=args.seg_crop, seg_batch=args.seg_batch, seg_iters=args.seg_iters, seg_lr=args.seg_lr,
                    kl_temp=args.kl_temp, ckpt_every=args.ckpt_every)
    for k, v in positive.items():
        if not v > 0:
            fail(f"--{k.replace('_', '-')} must be > 0, got {v}")
    for k in ("lambda_fg", "lambda_bg", "weight_decay", "min_lr", "warmup_lr", "drop_path", "cor_smoothing"):
        v = getattr(args, k)
        if not (v >= 0 and math.isfinite(v)):
            fail(f"--{k.replace('_', '-')} must be a finite number >= 0, got {v}")
    for k in ("max_iters", "stop_after"):
        v = getattr(args, k)
        if v is not None and v < 1:
            fail(f"--{k.replace('_', '-')} must be >= 1, got {v}")
    if args.crop_size % args.patch_size:
        fail(f"--crop-size {args.crop_size} must be a multiple of --patch-size {args.patch_size}")
    if args.embed_dim % args.num_heads:
        fail(f"--embed-dim {args.embed_dim} must be divisible by --num-heads {args.num_heads}")
    if not 1 <= args.layer_index <= args.depth:
        fail(f"--layer-index must be in 1..--depth ({args.depth}), got {args.layer_index}")
    if not 0.0 <= args.sweep_max < 1.0:
        fail(f"--sweep-max must be in [0, 1), got {args.sweep_max}")
    if args.csd_resize < args.crop_size:
        fail(f"--csd-resize {args.csd_resize} must be >= --crop-size {args.crop_size}")
    if args.teacher_conf_thr is not None and not 0 <= args.teacher_conf_thr < 1:
        fail(f"--teacher-conf-thr must be in [0, 1), got {args.teacher_conf_thr}")
    if args.prior_threshold != "best":
        try:
            t = float(args.prior_threshold)
        except ValueError:
            fail(f"--prior-threshold must be 'best' or a number in [0, 1), got '{args.prior_threshold}'")
        if not 0 <= t < 1:
            fail(f"--prior-threshold must be in [0, 1), got {t}")
    if not (args.prior in ("seeds", "gt") or args.prior.startswith("dir:")):
        fail(f"--prior must be 'seeds', 'gt' or 'dir:PATH', got '{args.prior}'")
    if args.prior.startswith("dir:") and not Path(args.prior[4:]).is_dir():
        fail(f"--prior {args.prior}: folder {args.prior[4:]} does not exist; give a folder of VOC-format <id>.png masks")
    try:
        if not all(0 < float(v) <= 4 for v in args.seed_scales.split(",")):
            raise ValueError
    except ValueError:
        fail(f"--seed-scales must be comma-separated numbers in (0, 4], got '{args.seed_scales}'")
    try:
        [int(r) for r in args.seg_rates.split(",")]
    except ValueError:
        fail(f"--seg-rates must be comma-separated integers, got '{args.seg_rates}'")
    if args.weights and not Path(args.weights).is_file():
        fail(f"--weights {args.weights} is not a file; pass a local state dict or use --pretrained (timm download)")
    if args.eval_only and not args.ckpt:
        fail("--eval-only needs --ckpt FILE (a final checkpoints/last.pt of a finished run)")
    if args.ckpt and not Path(args.ckpt).is_file():
        fail(f"--ckpt {args.ckpt} is not a file")
    if (args.mask_crf or args.prior_crf) and not crf.available():
        fail("dense CRF needs pydensecrf (pip install pydensecrf2); or pass --no-mask-crf --no-prior-crf")
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    for k in ("batch_size", "seg_batch"):
        if getattr(args, k) % ws:
            fail(f"--{k.replace('_', '-')} {getattr(args, k)} must be divisible by the number of processes ({ws})")


def load_resume(run_dir: Path, ns):
    if not run_dir.is_dir() or not (run_dir / "args.json").is_file():
        fail(f"--resume {run_dir}: not a run folder (no args.json); give the folder of an interrupted run")
    path = run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        fail(f"--resume {run_dir}: no checkpoints/last.pt to continue from; start a new run instead")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        fail(f"--resume {run_dir}: checkpoints/last.pt cannot be read ({type(e).__name__}); start a new run")
    saved = json.loads((run_dir / "args.json").read_text())
    args = Args(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(Args)}})
    for k in RUNTIME_FLAGS:
        v = getattr(ns, k)
        if v is not None:
            setattr(args, k, v)
    args.resume = str(run_dir)
    if ns.stop_after is None:
        args.stop_after = None
    return args, ck


def setup_device(args):
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if ws > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=timedelta(hours=3))
        if want_cuda:
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")
    return torch.device("cuda", 0) if want_cuda else torch.device("cpu")


def main(argv=None):
    t0 = time.time()
    ns = build_parser().parse_args(argv)
    try:
        if ns.resume:
            args, resume_ckpt = load_resume(Path(ns.resume), ns)
            spec = data.resolve_data(args.data)
        else:
            resume_ckpt = None
            spec = data.resolve_data(ns.data or "toy")
            args = resolve_args(ns, spec)
        validate(args, spec)
        splits = data.default_splits(spec)
        train_ds = data.SegDataset(spec.root, splits["train"], dataset=spec.dataset)
        seed_ds = data.SegDataset(spec.root, splits["seed"], dataset=spec.dataset)
        val_ds = data.SegDataset(spec.root, splits["val"], dataset=spec.dataset)
        for name, ds in (("train", train_ds), ("seed", seed_ds), ("val", val_ds)):
            if len(ds) == 0:
                fail(f"split '{splits[name]}' of {spec.root} is empty; list image ids in ImageSets/Segmentation/{splits[name]}.txt")
        train_labels = train_ds.labels()
        if args.csd == "on" and not args.eval_only:
            sources, targets = split_domains(train_labels)
            if sum(len(s) for s in sources) == 0:
                fail("CSD needs single-label training images (the source domain) and there are none; use --csd off")
            if args.target_pool == "multi" and len(targets) == 0:
                fail("CSD needs multi-label training images (the target domain); use --target-pool all or --csd off")
    except data.DataError as e:
        fail(str(e))

    # Run folder: checked by every process BEFORE the process group forms (so no rank sees the folder
    # rank 0 is about to create), created only after everything above passed.
    if args.resume:
        run_dir = Path(args.resume)
    else:
        run_dir = Path(args.out) if args.out else data.REPO_ROOT / "runs" / METHOD / f"{spec.name}-{datetime.now():%Y%m%d-%H%M%S}"
        if run_dir.exists() and any(run_dir.iterdir()):
            fail(f"output folder {run_dir} is not empty; pass another --out or --resume {run_dir}")
    device = setup_device(args)
    amp = bool(args.amp) and device.type == "cuda"
    if args.amp and not amp and is_main():
        print("note: --amp is ignored on CPU (training runs in fp32)", flush=True)  # Deviation 10
    if dist.is_initialized() and not args.out and not args.resume:  # one timestamped folder for all ranks
        obj = [str(run_dir)]
        dist.broadcast_object_list(obj, src=0)
        run_dir = Path(obj[0])
    if is_main():
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
    barrier()
    ctx = {"args": args, "spec": spec, "splits": splits, "device": device, "amp": amp, "run_dir": run_dir,
           "num_classes": train_ds.num_classes, "class_names": list(train_ds.class_names),
           "train_labels": train_labels, "logger": Logger(run_dir), "resume_ckpt": resume_ckpt,
           "done": dict(resume_ckpt["done"]) if resume_ckpt else {}}
    if is_main():
        print(f"csd: {spec.name} ({spec.dataset}) preset={args.preset} device={device} csd={args.csd} "
              f"sampling={args.sampling} consistency={args.consistency} run={run_dir}", flush=True)
    try:
        results = run_pipeline(ctx, train_ds, seed_ds, val_ds)
    except Interrupted as e:
        if is_main():
            print(f"stopped after {args.stop_after} iterations ({e}); continue with --resume {run_dir}", flush=True)
        barrier()
        return
    except data.DataError as e:
        fail(str(e))
    if is_main():
        metrics = {"method": METHOD, "dataset": spec.name, "preset": args.preset, "device": device.type,
                   "seconds": round(time.time() - t0, 1),
                   "primary": "seg/val", "results": results}
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        for k, v in results.items():
            extra = f" (t={v['threshold']})" if "threshold" in v else ""
            print(f"{k}: mIoU={v['miou']}{extra}", flush=True)
        print(f"seconds: {metrics['seconds']}")
        print(f"RESULT {METHOD} seg/val mIoU={results['seg/val']['miou']}", flush=True)
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_pipeline(ctx, train_ds, seed_ds, val_ds):
    """stage1 -> prior -> classifier (stage 2) -> seeds/masks -> seg -> eval; completed stages are
    taken from the checkpoint on --resume."""
    args, run_dir, device, names = ctx["args"], ctx["run_dir"], ctx["device"], ctx["class_names"]
    done, results = ctx["done"], {}
    split_train, split_seed = ctx["splits"]["train"], ctx["splits"]["seed"]
    ckpt_dir = run_dir / "checkpoints"

    def load_net(net, stage):
        net.load_state_dict(torch.load(ckpt_dir / f"{stage}.pt", map_location="cpu", weights_only=False))
        return net.to(device)

    if args.eval_only:
        ck = torch.load(args.ckpt, map_location="cpu", weights_only=False)
        if "model" not in ck or "seg_model" not in ck:
            fail(f"--ckpt {args.ckpt} is not a final checkpoint (needs the classifier and the segmentation network)")
        classifier, segnet = MCTformerV2(args, ctx["num_classes"] - 1), SegNet(args, ctx["num_classes"])
        try:
            classifier.load_state_dict(ck["model"])
            segnet.load_state_dict(ck["seg_model"])
        except RuntimeError:
            fail(f"--ckpt {args.ckpt} does not match the configured networks; pass the flags/preset of its training run")
        classifier, segnet = classifier.to(device), segnet.to(device)
    else:
        classifier = segnet = None

    # ---- Stage 1 + prior (Sec. 3.2 "Prior Localization Map Obtaining") ----
    prior_dir = run_dir / "pseudo_labels" / "prior" / split_train
    if args.prior.startswith("dir:"):
        prior_dir = Path(args.prior[4:])
    need_prior = args.csd == "on" and args.prior == "seeds" and not args.eval_only
    if need_prior and "prior" not in done:
        if "stage1" in done:
            base = load_net(MCTformerV2(args, ctx["num_classes"] - 1), "stage1")
        else:
            base = train_classifier(ctx, "stage1", csd_on=False)
            finish_stage(ctx, "stage1", weights=base.state_dict())
        res = {}
        if is_main():
            t = args.prior_threshold
            cache = compute_maps(base, [train_ds] + ([seed_ds] if t == "best" else []), args, device, "stage-1 maps")
            if t == "best":  # Deviation 5: the stage-1 threshold is the sweep argmax against GT
                sweep = evaluate_seeds(cache, seed_ds, args)
                res = {f"stage1_seed/{split_seed}{k}": v for k, v in seed_results(sweep, names).items()}
                t = sweep["all"]["best_threshold"]
            write_labels(cache, train_ds, float(t), prior_dir, args.prior_crf, "prior masks")
            res["_prior_threshold"] = float(t)
        finish_stage(ctx, "prior", res)
        if dist.is_initialized():  # the other ranks need the results recorded by rank 0
            obj = [done]
            dist.broadcast_object_list(obj, src=0)
            ctx["done"] = done = obj[0]
    for k, v in done.get("prior", {}).items():
        if not k.startswith("_"):
            results[k] = v

    # ---- Stage 2: the classifier with CSD (or the plain baseline with --csd off) ----
    if classifier is None:
        if "classifier" in done:
            classifier = load_net(MCTformerV2(args, ctx["num_classes"] - 1), "classifier")
        else:
            classifier = train_classifier(ctx, "classifier", csd_on=args.csd == "on", prior_dir=prior_dir)
            finish_stage(ctx, "classifier", weights=classifier.state_dict())

    # ---- Seeds (full sweep) and masks (seeds + dense CRF) ----
    mask_dir = run_dir / "pseudo_labels" / "mask" / split_train
    if "seeds" not in done or args.eval_only:
        res = {}
        if is_main():
            cache = compute_maps(classifier, [train_ds, seed_ds], args, device, "maps")
            sweep = evaluate_seeds(cache, seed_ds, args)
            res = {f"seed/{split_seed}{k}": v for k, v in seed_results(sweep, names).items()}
            t = sweep["all"]["best_threshold"]
            cm = miou.ConfusionMatrix(ctx["num_classes"])
            write_labels(cache, train_ds, t, mask_dir, args.mask_crf, "masks", seed_ds.ids, cm)
            rest = [i for i, name in enumerate(seed_ds.ids) if name not in set(train_ds.ids)]
            if rest:  # seed-split images outside the training split (not the case for VOC train / train_aug)
                write_labels(cache, seed_ds, t, run_dir / "pseudo_labels" / "mask" / split_seed, args.mask_crf,
                             "masks (seed split)", seed_ds.ids, cm, indices=rest)
            res[f"mask/{split_seed}"] = result_entry(cm.compute(), names, threshold=t, crf=bool(args.mask_crf))
        finish_stage(ctx, "seeds", res)
        if dist.is_initialized():
            obj = [ctx["done"]]
            dist.broadcast_object_list(obj, src=0)
            ctx["done"] = done = obj[0]
    results.update(ctx["done"]["seeds"])

    # ---- Segmentation network on the masks, evaluated on val ----
    if segnet is None:
        if "seg" in ctx["done"]:
            segnet = load_net(SegNet(args, ctx["num_classes"]), "seg")
        else:
            segnet = train_segmentation(ctx, mask_dir)
            finish_stage(ctx, "seg", weights=segnet.state_dict())
    if is_main():
        results["seg/val"] = result_entry(evaluate_seg(segnet, val_ds, args, device), names)
        save_vis(ctx, classifier, segnet, seed_ds, mask_dir)
        atomic_save({"stage": "done", "iteration": 0, "model": classifier.state_dict(),
                     "seg_model": segnet.state_dict(), "done": ctx["done"], "args": dataclasses.asdict(args)},
                    ckpt_dir / "last.pt")
    return results


if __name__ == "__main__":
    main()
