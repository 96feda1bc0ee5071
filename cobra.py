"""CoBra: Complementary Branch Fusing Class and Semantic Knowledge for Robust Weakly Supervised Semantic Segmentation
Woojung Han, Seil Kang, Kyobin Choo, Seong Jae Hwang (Yonsei University). arXiv 2024.
https://arxiv.org/abs/2403.08801   Official code: MICV-yonsei/Cobra (built on the IRNet code base).

What the paper does
    Two image-level classifiers are trained together on the same crops: a CNN (the class-aware
    knowledge, CAK, branch: class-precise but partial CAMs) and a DeiT-S ViT (the semantic-aware
    knowledge, SAK, branch: whole-object but class-confused CAMs). Each branch has a per-patch
    projection head (CAP on the CNN, SAP on the ViT). Two patch-level InfoNCE losses pass knowledge one
    way each: the CNN's class scores pick positives/negatives for the ViT's SAP (L_sap), the ViT's
    layer-summed patch attention picks them for the CNN's CAP (L_cap); an L1 loss keeps the CAMs
    consistent (L_cam). Seeds fuse both CAMs (M_fuse), IRNet turns them into masks, and a segmentation
    network is trained on the masks.

Reading guide (paper section -> code)
    Sec. 3.2 CAK branch (CNN CAM, CAP)            -> CAKBranch
    Sec. 3.2 SAK branch (ViT CAM, SAP, attention)  -> SAKBranch (patch affinity P, class-token a_obj)
    Sec. 3.3.1 L_cls, L_cam                        -> loss_cls(), loss_cam()
    Sec. 3.3.2 CAP refinement                      -> select_cap_patches(), loss_cap()
    Sec. 3.3.3 SAP refinement                      -> cnn_pseudo_label(), select_sap_patches(), loss_sap()
    Sec. 3.3 final loss                            -> loss_total(), train_step(), train_cobra()
    Sec. 3.4 / supp. 9.2 seeds, M_fuse             -> infer_cams(), fuse_cams(), seed_label(), evaluate_seeds()
    Supp. 9.1 / 11 attention-derived thresholds    -> attention_bg(), ir_thresholds(), make_ir_label()
    Supp. 10 IRN mask refinement                   -> IRNEdge, loss_irn_affinity(), random_walk(), final_mask()
    Sec. 4.1 Table 1 seed / mask on train GT       -> evaluate_seeds(), sweep_mask_alpha(), evaluate_masks()
    Sec. 4 segmentation network                    -> SegNet, train_seg(), evaluate()

Equation map
    Eq. (1) L_cap, InfoNCE on CAP, positives/negatives from the ViT patch affinity -> loss_cap()
    Eq. (2) L_sap, InfoNCE on SAP, positives/negatives from the CNN CAM            -> loss_sap()
    Eq. (3) L_total = L_cls + lambda1 L_cam + lambda2 (L_sap + L_cap)              -> loss_total()
    Eq. (4) (supplement) the same total loss, with lambda ablation (Table 12)      -> loss_total()
    Unnumbered: L_cls (Sec. 3.3.1)                                                  -> loss_cls()
                L_cam = L_cons (+ L_cons+) (Sec. 3.3.1)                              -> loss_cam()
                pseudo label y_i = argmax over {0} u Y (Sec. 3.3.3)                  -> cnn_pseudo_label()
                warm-up gate 1[epoch >= E_w] (Deviation 2)                           -> aux_losses_on()
                M_tran = M_tran (x) A_obj, multi-scale + flip (Sec. 3.4, supp. 10)   -> infer_cams()
                M_fuse = max((M_cnn + M_tran)/2, M_tran) (Sec. 3.4)                  -> fuse_cams()
                seed bg / IR thresholds from A (supp. 9.1)                           -> attention_bg(), ir_thresholds()
                mask thr_c = alpha max(r_c) + min(r_c) (official)                    -> final_mask(), alpha_mask()
                alpha swept on train GT (card Sec. 7; Deviation 18)                  -> sweep_mask_alpha()

Notation: M_cnn / M_tran (B, C, N, N) CAMs (C = 21 on VOC, channel 0 = background), v (B, N^2, D)
L2-normalised projections, A_bar (B, 1+N^2, 1+N^2) head-averaged layer-summed attention,
P = A_bar[:, 1:, 1:] patch affinity, a_obj = A_bar[:, 0, 1:] class-token (semantic-agnostic) attention.

Deviations (each repeated at the code as `# Deviation:`)
    1. L_cls is a multilabel soft-margin loss on GAP of the foreground channels (official code), not
       the paper's "softmax"; channel 0 gets no classification loss.
    2. The auxiliary losses start at epoch warmup_epochs (5 of 20, official code), not after one epoch.
    3. L_cons+ (paper Sec. 3.3.1) is off by default, as in the official code (computed, never added);
       --cons-plus adds it.
    4. L_sap / L_cap are averaged over anchors (official code) instead of summed (paper); the lambdas
       were tuned for the average.
    5. A_bar sums post-softmax attention over layers (official code) where the paper says "average of
       QK^T"; top-k is unaffected, the attention-percentile thresholds are not.
    6. Paper where the official code looks accidental (card Sec. 8 rows 2, 8, 9, 10): tau on the
       negatives too, absent classes masked with -inf for the CNN pseudo label, the CAP head trains,
       the 10x group = both CAM heads + both projections. --official-quirks restores the code.
    7. The two optimizers of the official code are one SGD with four parameter groups (same update).
       Momentum defaults to 1e-4: the official helper passes the weight decay into SGD's momentum slot.
    8. IRN: only the boundary (edge) branch is trained; the displacement branch shares nothing with it
       beyond the frozen backbone and does not change the semantic masks (card Sec. 5). Pairs whose
       destination falls outside the crop are ignored instead of cropping the source region.
    9. Final masks use RGB for the CRF (the official code feeds BGR by mistake).
   10. Segmentation network: DeepLabV3 (ASPP head from torchvision on a dilated timm ResNet-101,
       output stride 16) - a substitute for the paper's DeepLabV3+ / SegFormer MiT-B2 (not implemented:
       timm has no MiT-B2 with ImageNet weights);
       its DeepLab VOC defaults are not from the paper. seg/val is single scale without CRF; the paper's
       test protocol (multi-scale + flip, then the dense CRF) is seg_ms/val and seg_crf/val, with the
       DeepLab scales 0.5-1.5 and CRF preset (the paper gives neither). Inputs are padded (bottom / right) to a
       multiple of the output stride and the logits cropped after upsampling, so that the predictions stay
       aligned with the image at every input size (DeepLab pads to its crop size); training crops are padded the
       same way (the paper preset's 321 px to 336, a mean-colour border that the ASPP's image pooling averages
       in and the loss never sees). Stretching the ceil(H/s) output cells over H pixels instead shifts the
       prediction by up to s - 1 pixels (toy v4, seed 0, the same trained ResNet-18 oracle network at output
       stride 16: 69.54 stretched, 76.55 padded).
   11. Toy preset only: resnet18 CNN with BN in train mode and zero_init_last=False, a 4-block ViT, fixed (not
       attention-derived) thresholds, one inference scale - random-init attention is flat - SGD momentum 0.9 for the
       CNN, and the ViT in AdamW at lr 1e-3 (--vit-optimizer adamw, lr x 0.02, one lr for its backbone and heads,
       weight decay --weight-decay): from random init, 248 momentum-free steps leave both classifiers near chance,
       and a small ViT trained from scratch by SGD falls far behind the CNN; AdamW narrows the gap (toy v4, 3 seeds,
       ViT-only seed/train: 23.98 with SGD at the CNN's lr x3, 32.75 with AdamW, CNN-only 49.86; the whole pipeline's
       seg/val 55.47 -> 68.91; README, CoBra). The toy's masks are the CRF-refined seeds (--mask-method crf), not
       IRN's: IRN's frozen backbone is ImageNet-pretrained in the paper and random here, and its random walk then
       makes masks BELOW the seeds it starts from (toy v4, the same trained CoBra networks of the SGD preset before
       AdamW, 3 seeds, seed/train 39.37: mask/train 24.32 with IRN, 50.16 with the CRF; seg/val 21.72 vs 49.58 with
       the ResNet-18 segmentation network of the time; README, CoBra). --mask-method irn runs the paper's IRN stage
       on the toy. The segmentation network: Deviation 19.
   12. --max-iters N caps every training stage (CoBra, IRN, seg) at N iterations; the warm-up gate is
       not rescaled.
   13. The random walk starts from the strided M_tran (official step/make_cam.py key `cam`, read by
       step/make_sem_seg_labels_npy.py), not the paper's M_fuse (Sec. 3.4); --rw-source same gives the paper.
   14. Seed theta search (official step/eval_cam.py): theta = 70, 75, ..., stops at the first value that does
       not improve (a tie stops it; official: a tie continues, only a drop stops), keeps the best theta
       (official prints one step past it) and is capped at 95 (official: unbounded).
   15. Inference resampling (official step/make_cam.py, voc12/dataloader.py): the multi-scale inputs are
       resized with torch bilinear on the normalised tensor (official: PIL bicubic on uint8, which
       antialiases when downscaling) and timm resamples the ViT position embedding (bicubic, antialias,
       to the target grid; official: bicubic with scale factor (w0 + 0.1)/14, no antialias). The CAMs
       are stretched to H x W and the strided maps to ceil(H/4) x ceil(W/4) as in the official code.
   16. Positives of L_sap (Sec. 4.2 "positive pseudo-label patches") are the top-k+ patches of the anchor
       class's CNN score over ALL patches (official cll_v1), not only patches whose pseudo label is that
       class; the two readings differ when fewer than k+ patches carry the class.
   17. Training list: the standard 10,582-image train_aug list (paper, common/), not the official
       voc12/train_aug.txt (9,761 ids, 5 VOC-train ids missing).
   18. Mask alpha (thr_c = alpha max(r_c) + min(r_c)): the paper states no value and no search. The masks use the
       official fixed 0.31: step/gen_seg_label.py ignores the value run_sample.py passes it and thresholds at
       0.31. The official step/eval_sem_seg_thres.py sweeps another variable (an attention-percentile background
       padded onto the walk, from 0.20 in steps of 0.01, with the CRF; it does not run as released, card Sec. 8
       row 16). Card Sec. 7's alpha sweep on train GT is run and reported instead (mask_sweep/train, log
       mask_sweep/curve): alpha = 0.20, 0.21, ..., 0.50 on the seed split's walks, scored without the CRF to keep
       the cost at one walk per image (a CRF per alpha would cost 31 CRFs per image), over the full grid (no
       climb that stops at the first drop); a tie keeps the smaller alpha. The sweep walks the seed split once
       more (VOC: +1,464 walks to 10,582); the paper_coco and toy presets turn it off, as their seed split is the
       whole train split. --mask-alpha-sweep use trains on masks at the swept alpha (train GT then shapes the
       training labels); off skips the sweep, as does --mask-method crf (its masks have no alpha).
   19. Toy preset only: the segmentation network is a random-init patch-8 ViT (4 blocks, width 96; the DeepLabV3
       head on its 8 x 8 token grid) trained with AdamW (lr 1e-3, weight decay 0.01) for 500 iterations on 64 px
       crops, instead of a ResNet-18 DeepLabV3 under DeepLab's SGD: in about the same seconds it reaches the
       fully supervised bound the toy asks for (toy v4, --supervision full, seed 0, 1 thread, padded as in
       Deviation 10: ViT 88.67; ResNet-18 with 200 SGD iterations 76.55 at output stride 16, 86.68 at output
       stride 8 in 1.9x the time). The toy's earlier network: --seg-backbone resnet18 --seg-optimizer sgd
       --seg-crop 96 --seg-iters 200 --seg-lr 0.01.

Run
    python cobra.py                                   (toy data, CPU, minutes; masks = CRF-refined seeds, Deviation 11)
    python cobra.py --mask-method irn                 (toy data with the paper's IRN mask stage)
    python cobra.py --data VOC2012 --pretrained       (CUDA, paper settings)
    python cobra.py --data COCO2014 --pretrained
    python cobra.py --branches cnn | --branches vit | --losses cam,sap ...   (Table 3 rows)
    python cobra.py --mask-source cnn|tran|avg|max|fuse                      (Table 5 rows)
    python cobra.py --mask-alpha-sweep use     (masks at the alpha swept on train GT, card Sec. 7; Deviation 18)
    python cobra.py --supervision full     (upper bound: the segmentation network on ground-truth masks;
                                            CoBra, CAMs, seeds, IR labels, IRN and masks are skipped)
    --weights FILE: a torch file holding a dict with any of cnn / vit / irn / seg -> backbone state dict.
    Keys: seed/train, mask/train, mask_nocrf/train (Table 9; threshold = the masks' alpha), mask_sweep/train
    (the best alpha of the sweep, no CRF), seg/val (single scale), seg_ms/val (multi-scale + flip), seg_crf/val
    (then CRF: the paper's test protocol). ImageNet weights: timm resnet152.tv_in1k
    (torchvision v1, as IRN / CoBra load) for the CNN and the IRN, deit_small_patch16_224.fb_in1k, and
    resnet101.tv_in1k for the segmentation network.
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
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from tqdm import tqdm

from common import augment, crf, data, miou

METHOD = "cobra"


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
    # --- stages (Tables 3 / 5 need only part of the pipeline) ---
    until: str = "seg"  # last stage: seed | mask | seg (ablation rows; without seg there is no seg/val)
    cobra_ckpt: str = ""  # checkpoints/last.pt of a finished run with the same model flags: reuse its trained CoBra networks and skip CoBra training (Table 5 rows share one model)
    # --- CoBra model (Sec. 3.2, card Sec. 3) ---
    cnn: str = "resnet152.tv_in1k"  # Sec. 4 "ResNet152 following IRN": torchvision v1 weights, as IRN/CoBra load (timm's untagged resnet152 is a1h_in1k)
    vit: str = "deit_small_patch16_224.fb_in1k"  # Sec. 4 DeiT-S/16 (the official FB DeiT weights)
    vit_dim: int = 0  # >0 overrides the ViT width (toy)
    vit_depth: int = 0  # >0 overrides the ViT depth (toy)
    vit_heads: int = 0  # >0 overrides the ViT heads (toy)
    cnn_bn_train: bool = False  # official: BN frozen (running stats); toy: train mode (card Sec. 10)
    proj_dim: int = 256  # supp. Table 11 (main text: 128)
    branches: str = "both"  # Table 3: cnn | vit | both (one branch: its own CAM for the seed, no L_cam/L_cap/L_sap; CNN only: fixed thresholds)
    losses: str = "cam,cap,sap"  # Table 3: comma list from cam,cap,sap (or 'none')
    # --- losses (Sec. 3.3, Sec. 4.2) ---
    tau: float = 0.1  # official: loss_modules.py
    k_sap_pos: int = 20  # Sec. 4.2 (run.sh --top_bot_k 20 5 5 20)
    k_sap_neg: int = 5  # Sec. 4.2, Table 4
    k_cap_pos: int = 5  # Sec. 4.2, Table 4
    k_cap_neg: int = 20  # Sec. 4.2
    lambda_cam: float = 0.1  # Eq. (3) lambda1
    lambda_sap: float = 0.1  # Eq. (3) lambda2 on L_sap (Table 12 varies it separately)
    lambda_cap: float = 0.1  # Eq. (3) lambda2 on L_cap
    warmup_epochs: int = 5  # official: step/train_cam.py (aux losses from epoch 5)
    cons_plus: bool = False  # add L_cons+ (paper; official computes but does not add it)
    official_quirks: bool = False  # restore the official code's tau / pseudo-label / frozen-CAP / 10x-group behaviour (card Sec. 8 rows 2, 8, 9, 10)
    # --- CoBra training (supp. Sec. 10, card Sec. 6) ---
    crop: int = 224  # Sec. 4 ("244" is a typo)
    resize_long: tuple = (320, 640)  # official: voc12/dataloader.py
    batch_size: int = 32  # supp. Sec. 10
    epochs: int = 20  # supp. Sec. 10
    lr: float = 0.1  # official: run_sample.py cam_learning_rate
    vit_lr_scale: float = 1.0  # multiplies the ViT lr (card Sec. 6: lower it first if the ViT diverges)
    vit_optimizer: str = "sgd"  # sgd: the ViT in the official SGD groups (Deviation 7) | adamw: toy (Deviation 11), one lr = lr x vit_lr_scale
    momentum: float = 1e-4  # official: weight decay lands in SGD's momentum slot (Deviation 7)
    weight_decay: float = 1e-4  # official: run_sample.py
    # --- seeds (Sec. 3.4, supp. Sec. 9, 11) ---
    scales: tuple = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # supp. Sec. 10
    mask_source: str = "fuse"  # Table 5: map for the seed and the IR labels: cnn | tran | avg | max | fuse
    seed_bg: str = "attn-pct"  # attn-pct: percentile of class-token attention (official eval_cam.py) | fixed: threshold sweep
    ir_thresh: str = "attn"  # attn: 93rd attention percentile (official cam_to_ir_label.py) | fixed: IRNet 0.30 / 0.05
    ir_fg: float = 0.30  # IRNet conf_fg_thres (fixed rule)
    ir_bg: float = 0.05  # IRNet conf_bg_thres (fixed rule)
    ir_percentile: float = 93.0  # official: cam_to_ir_label.py
    # --- masks (supp. Sec. 10; official IRNet steps) ---
    mask_method: str = "irn"  # irn | crf (CRF-refined seed, no IRN: not comparable with the paper's Mask column)
    rw_source: str = "tran"  # tran: random walk from the strided ViT CAM (official) | same: from the --mask-source map (paper)
    irn_backbone: str = "resnet152.tv_in1k"  # official: IRN on ResNet-152, torchvision v1 weights (resnet152-b121ed2d.pth)
    irn_crop: int = 512  # supp. Sec. 10
    irn_batch: int = 32  # supp. Sec. 10
    irn_epochs: int = 4  # supp. Sec. 10
    irn_lr: float = 0.1  # official: run_sample.py irn_learning_rate
    irn_radius: int = 10  # IRNet path radius for training pairs
    rw_radius: int = 5  # IRNet: radius of the random-walk affinity
    rw_beta: float = 10.0  # IRNet beta
    rw_exp_times: int = 8  # IRNet: T squared 8 times = 256 steps
    mask_alpha: float = 0.31  # official: step/gen_seg_label.py; the masks' alpha unless --mask-alpha-sweep use
    mask_alpha_sweep: str = "report"  # Deviation 18: report (alpha swept on train GT into mask_sweep/train) | use (masks at it) | off
    mask_crf: bool = True  # final CRF (Table 9: with / without)
    # --- segmentation network (Sec. 4; Deviation 10) ---
    seg_backbone: str = "resnet101.tv_in1k"  # DeepLabV3 R101 substitute for DeepLabV3+ (Sec. 4 R101; torchvision ImageNet weights)
    seg_output_stride: int = 16  # a ResNet backbone's output stride (DeepLabV3(+) training default; not in the paper; a ViT's is its patch)
    seg_backbone_kwargs: str = ""  # extra timm.create_model ints for a vit_* / deit_* backbone, e.g. "patch_size=8,embed_dim=96"
    seg_optimizer: str = "sgd"  # sgd (DeepLab: momentum 0.9, head 10x lr) | adamw (toy ViT: one lr, weight decay 0.01 instead of --weight-decay)
    seg_crop: int = 321  # DeepLab VOC default (not in the paper)
    seg_batch: int = 10  # DeepLab VOC default
    seg_iters: int = 20000  # DeepLab VOC default
    seg_lr: float = 2.5e-4  # DeepLab VOC default; head 10x
    seg_scale_range: tuple = (0.5, 1.5)  # DeepLab VOC default
    seg_test_scales: tuple = (0.5, 0.75, 1.0, 1.25, 1.5)  # Sec. 4 "multi-scale" test (seg_ms/val, + flip); scales not given, DeepLab practice
    seg_crf: bool = True  # Sec. 4: dense CRF after the multi-scale test (seg_crf/val; DeepLab CRF preset)
    num_vis: int = 4  # images drawn into vis/


# card Sec. 6 (VOC): every other Args default is already the paper's value; seed 2022: official run_sample.py
PAPER = dict(seed=2022, log_every=20, ckpt_every=200)
PRESETS = {
    "paper_voc": PAPER,
    # the paper gives no separate COCO schedule for CoBra; the VOC values are used. No alpha sweep: COCO's seed
    # split is its whole train split, which the sweep would walk a second time (Deviation 18)
    "paper_coco": {**PAPER, "mask_alpha_sweep": "off"},
    # card Sec. 10: minutes on 2 CPU cores, random init. Deviation 11: BN train mode, fixed thresholds,
    # momentum 0.9 and the ViT in AdamW at lr 0.05 x 0.02 = 1e-3 are toy-only choices.
    "toy": dict(PAPER, pretrained=False, workers=2, ckpt_every=100, cnn="resnet18", vit="deit_tiny_patch16_224",
                vit_dim=96, vit_depth=4, vit_heads=3, cnn_bn_train=True, proj_dim=64, k_sap_pos=7, k_sap_neg=2,
                k_cap_pos=2, k_cap_neg=7, crop=128, resize_long=(96, 160), batch_size=16, epochs=4, warmup_epochs=1,
                lr=0.05, momentum=0.9, vit_optimizer="adamw", vit_lr_scale=0.02, scales=(1.0,), seed_bg="fixed",
                ir_thresh="fixed", irn_backbone="resnet18", irn_crop=128, irn_batch=16, irn_epochs=2, irn_radius=5,
                rw_exp_times=5,
                # Deviation 19: a patch-8 ViT segmentation network trained with AdamW
                seg_backbone="deit_tiny_patch16_224", seg_backbone_kwargs="patch_size=8,embed_dim=96,depth=4,num_heads=3",
                seg_optimizer="adamw", seg_crop=64, seg_batch=16, seg_iters=500, seg_lr=0.001,
                seg_scale_range=(0.75, 1.25), seg_test_scales=(0.75, 1.0, 1.25),
                mask_method="crf",  # Deviation 11: a random-init IRN's walk makes masks below their seeds
                mask_alpha_sweep="off"),  # the toy's seed split is its train split: a second walk of every image
}
CHOICES = {"branches": ("cnn", "vit", "both"), "vit_optimizer": ("sgd", "adamw"),
           "mask_source": ("cnn", "tran", "avg", "max", "fuse"), "mask_method": ("irn", "crf"),
           "rw_source": ("tran", "same"), "until": ("seed", "mask", "seg"),
           "seed_bg": ("attn-pct", "fixed"), "ir_thresh": ("attn", "fixed"), "mask_alpha_sweep": ("report", "use", "off"),
           "seg_output_stride": (8, 16), "seg_optimizer": ("sgd", "adamw")}
LIMITS = {**{k: ">0" for k in ("batch_size", "epochs", "lr", "tau", "proj_dim", "irn_batch", "irn_epochs", "irn_lr",
                               "irn_crop", "seg_batch", "seg_iters", "seg_lr", "seg_crop", "rw_beta", "scales",
                               "resize_long", "seg_scale_range", "seg_test_scales")},
          **{k: ">=0" for k in ("lambda_cam", "lambda_sap", "lambda_cap", "momentum", "weight_decay", "warmup_epochs",
                                "vit_lr_scale", "vit_dim", "vit_depth", "vit_heads", "rw_exp_times", "num_vis")},
          "mask_alpha": "[0,1]", "ir_percentile": "(0,100)", "irn_radius": ">=2", "rw_radius": ">=2"}


def validate(args):
    """Single-branch runs (Table 3) take the seed from their own CAM, CNN-only runs have no attention; checks
    that LIMITS cannot express."""
    if args.branches == "cnn":
        args.mask_source, args.seed_bg, args.ir_thresh = "cnn", "fixed", "fixed"
    elif args.branches == "vit":
        args.mask_source = "tran"
    if args.branches != "both":
        args.losses = "none"
    for name in ("cnn", "irn_backbone"):
        check(getattr(args, name).startswith(("resnet", "resnext", "wide_resnet", "seresnet")),
              f"--{name.replace('_', '-')} must be a timm ResNet (IRNet-style stride change on layer4)")
    check(args.losses == "none" or set(args.losses.split(",")) <= {"cam", "cap", "sap"},
          f"--losses {args.losses}: use a comma list from cam,cap,sap (or 'none')")
    check(args.crop % 16 == 0, f"--crop {args.crop} must be a multiple of 16 so the CNN and ViT patch grids match")
    parse_backbone_kwargs(args.seg_backbone_kwargs)  # a bad item ends the run here, before its folder exists
    n2 = (args.crop // 16) ** 2
    for k in ("k_sap_pos", "k_sap_neg", "k_cap_pos", "k_cap_neg"):
        check(1 <= getattr(args, k) <= n2, f"--{k.replace('_', '-')} {getattr(args, k)} must be in 1..{n2} "
              f"(patches of a {args.crop} crop)")
    for k in ("resize_long", "seg_scale_range"):
        check(len(getattr(args, k)) == 2 and getattr(args, k)[0] <= getattr(args, k)[1],
              f"--{k.replace('_', '-')} takes two increasing positive values, e.g. 320 640")
    check(args.irn_crop % 16 == 0, f"--irn-crop {args.irn_crop} must be a multiple of 16")
    check(args.irn_radius <= args.irn_crop // 8, f"--irn-radius must be <= irn_crop/8 ({args.irn_crop // 8})")
    for k in ("batch_size", "irn_batch", "seg_batch"):
        check(getattr(args, k) % env_world() == 0, f"--{k.replace('_', '-')} {getattr(args, k)} (global) is not "
              f"divisible by the {env_world()} processes")
    check(args.seg_batch // env_world() >= 2, "--seg-batch must give at least 2 images per process (ASPP's pooled BN)")
    check(args.mask_alpha_sweep != "use" or args.mask_method == "irn", "--mask-alpha-sweep use needs --mask-method "
          "irn: the crf masks have no alpha")
    check(args.supervision == "image" or args.until == "seg", "--supervision full trains only the segmentation "
          "network; drop --until")
    check(not args.eval_only or args.until == "seg", f"--eval-only evaluates the segmentation network, which a "
          f"--until {args.until} run does not train")


# ==================================================================================================
# Model
# ==================================================================================================
def set_layer4_stride1(backbone):
    """IRNet strides (2, 2, 2, 1): layer4 keeps stride 16 WITHOUT dilation (timm's output_stride=16 dilates)."""
    block = backbone.layer4[0]
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck strides its 3x3 conv2
    conv.stride = (1, 1)
    for m in block.downsample or []:
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
        elif isinstance(m, nn.AvgPool2d):
            m.stride, m.kernel_size = 1, 1


def create_resnet(name, pretrained):
    # zero_init_last=False: with random init and frozen/detached early stages, zeroed last-BN gammas
    # would keep every residual branch shut (card Sec. 10); pretrained weights overwrite it anyway.
    m = timm_model(name, pretrained, num_classes=0, global_pool="", zero_init_last=False)
    set_layer4_stride1(m)
    return m


class CAKBranch(nn.Module):
    """Class-aware knowledge branch (Sec. 3.2): IRNet-style ResNet, f_CAM and the CAP head.

    x (B, 3, H, W) -> cam (B, C, H/16, W/16), proj (B, D, H/16, W/16), logits (B, C-1).
    """

    def __init__(self, name, num_classes, proj_dim, pretrained, bn_train):
        super().__init__()
        self.backbone = create_resnet(name, pretrained)
        self.bn_train = bn_train
        width = self.backbone.num_features
        self.cam_head = nn.Conv2d(width, num_classes, 1, bias=False)  # f_CAM, channel 0 = background
        self.proj_head = nn.Conv2d(width, proj_dim, 1, bias=False)  # f_proj -> CAP
        # Impl. (MICV-yonsei/Cobra, net/resnet50_cam.py): conv1/bn1 frozen, layer2 output detached,
        # so only layer3, layer4 and the heads learn.
        b = self.backbone
        for m in (b.conv1, b.bn1, b.layer1, b.layer2):
            m.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        if not self.bn_train:  # Impl. (IRNet): every BN uses its running statistics, even in train mode
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x):
        b = self.backbone
        x = b.maxpool(b.act1(b.bn1(b.conv1(x))))
        x = b.layer2(b.layer1(x)).detach()
        feat = b.layer4(b.layer3(x))  # (B, 2048, H/16, W/16)
        cam = self.cam_head(feat)  # (B, C, N, N), raw (no ReLU at training time)
        return {"cam": cam, "proj": self.proj_head(feat), "logits": cam[:, 1:].mean((2, 3))}


class SAKBranch(nn.Module):
    """Semantic-aware knowledge branch (Sec. 3.2): DeiT with explicit attention probabilities,
    3x3 conv CAM head on the patch grid (TS-CAM style) and the SAP head.

    x (B, 3, H, W) -> cam (B, C, h, w), proj (B, D, h, w), logits (B, C-1), attn A_bar (B, 1+hw, 1+hw),
    with h, w = floor(H/16), floor(W/16).
    """

    def __init__(self, name, num_classes, proj_dim, pretrained, img_size, dim=0, depth=0, heads=0):
        super().__init__()
        over = {k: v for k, v in (("embed_dim", dim), ("depth", depth), ("num_heads", heads)) if v}
        self.backbone = timm_model(name, pretrained, num_classes=0, dynamic_img_size=True, img_size=img_size,
                                   drop_rate=0.0, drop_path_rate=0.0, **over)
        self.patch = self.backbone.patch_embed.patch_size[0]
        # A_bar[:, 0, 1:] / A_bar[:, 1:, 1:] assume exactly one prefix (class) token
        check(self.backbone.num_prefix_tokens == 1, f"--vit {name}: CoBra needs a ViT with exactly one class token "
              f"(this one has {self.backbone.num_prefix_tokens} prefix tokens: distillation / register tokens)")
        width = self.backbone.embed_dim
        self.cam_head = nn.Conv2d(width, num_classes, 3, padding=1, bias=True)  # Impl. (net/deit_cam.py)
        self.proj_head = nn.Conv2d(width, proj_dim, 1, bias=False)  # f_proj -> SAP
        # Fused SDPA never materialises the probabilities: switch it off and read the input of
        # attn_drop, i.e. softmax(QK^T * scale) before dropout, in every block.
        self._attn = []
        for blk in self.backbone.blocks:
            blk.attn.fused_attn = False
            blk.attn.attn_drop.register_forward_pre_hook(self._keep_attention)

    def _keep_attention(self, module, inputs):
        # Head mean (B, heads, T, T) -> (B, T, T); indices and a_obj are only ever used without gradient.
        self._attn.append(inputs[0].detach().mean(1))

    def forward(self, x):
        h, w = x.shape[2] // self.patch, x.shape[3] // self.patch
        x = x[:, :, : h * self.patch, : w * self.patch]  # the ViT floors the patch grid (card Sec. 2)
        self._attn = []
        tokens = self.backbone.forward_features(x)  # (B, 1+hw, dim), final LayerNorm applied
        patches = tokens[:, self.backbone.num_prefix_tokens:].transpose(1, 2).reshape(x.shape[0], -1, h, w)
        cam = self.cam_head(patches)  # (B, C, h, w): raw M_tran during training (no a_obj, no ReLU)
        # Deviation 5 / Impl. (net/deit_cam.py): head mean, SUM over layers (the paper: "average" of QK^T).
        attn = torch.stack(self._attn).sum(0)  # (B, 1+hw, 1+hw)
        self._attn = []
        return {"cam": cam, "proj": self.proj_head(patches), "logits": cam[:, 1:].mean((2, 3)), "attn": attn}


class CoBra(nn.Module):
    """Both branches on the same input; `branches` builds one of them only (Table 3 single-branch rows).
    pretrained: the branches ("cnn", "vit") that start from timm's ImageNet weights."""

    def __init__(self, args, num_classes, pretrained=()):
        super().__init__()
        self.cnn = self.vit = None
        if args.branches in ("cnn", "both"):
            self.cnn = CAKBranch(args.cnn, num_classes, args.proj_dim, "cnn" in pretrained, args.cnn_bn_train)
        if args.branches in ("vit", "both"):
            self.vit = SAKBranch(args.vit, num_classes, args.proj_dim, "vit" in pretrained, args.crop,
                                 args.vit_dim, args.vit_depth, args.vit_heads)

    def forward(self, x):
        out = {}
        if self.cnn is not None:
            out.update({f"cnn_{k}": v for k, v in self.cnn(x).items()})
        if self.vit is not None:
            out.update({f"vit_{k}": v for k, v in self.vit(x).items()})
        return out


class IRNEdge(nn.Module):
    """IRN (Ahn et al., CVPR 2019; supp. Sec. 10): frozen ImageNet ResNet + IRNet's boundary branch.
    x (B, 3, H, W) -> edge logits (B, 1, H/4, W/4).

    Deviation 8: no displacement branch - it shares only the frozen backbone with the edge branch and does
    not change the semantic masks (instance masks are out of scope).
    """

    def __init__(self, name, pretrained):
        super().__init__()
        self.backbone = create_resnet(name, pretrained).eval().requires_grad_(False)
        chans = [f["num_chs"] for f in self.backbone.feature_info]  # 64/256/512/1024/2048 for R50/152
        self.edge = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, 32, 1, bias=False), nn.GroupNorm(4, 32)) for c in chans)
        self.fuse = nn.Conv2d(32 * len(chans), 1, 1, bias=True)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()  # fully frozen, BN included (card Sec. 5)
        return self

    def forward(self, x):
        b = self.backbone
        with torch.no_grad():
            x1 = b.maxpool(b.act1(b.bn1(b.conv1(x))))  # stride 4
            feats = [x1]
            for layer in (b.layer1, b.layer2, b.layer3, b.layer4):
                feats.append(layer(feats[-1]))  # strides 4, 8, 16, 16
        size = feats[1].shape[2:]
        outs = []
        for f, head in zip(feats, self.edge):
            e = head(f)
            if e.shape[2:] != size:  # Impl. (IRNet net/resnet50_irn.py): upsample x2 / x4, crop, then ReLU
                e = F.interpolate(e, scale_factor=math.ceil(size[0] / e.shape[2]), mode="bilinear", align_corners=False)
                e = e[:, :, : size[0], : size[1]]
            outs.append(F.relu(e))
        return self.fuse(torch.cat(outs, 1))


class SegNet(nn.Module):
    """DeepLabV3: torchvision's ASPP head on a dilated timm ResNet (--seg-output-stride) or on the patch tokens of a
    timm ViT (toy, Deviation 19). (B,3,H,W) -> (B,C,H,W).

    Deviation 10: a DeepLabV3 substitute for the paper's DeepLabV3+ (R101) / SegFormer (MiT-B2); the official
    repository has no segmentation stage.
    """

    def __init__(self, name, num_classes, pretrained, output_stride=16, vit_kwargs=None, crop=224):
        super().__init__()
        if name.startswith(("vit", "deit")):  # position embedding at the crop's grid, resampled for other sizes
            try:
                self.backbone = timm_model(name, pretrained, features_only=True, out_indices=(-1,), img_size=crop,
                                           dynamic_img_size=True, **(vit_kwargs or {}))
            except TypeError as e:  # a --seg-backbone-kwargs name that the ViT does not take
                fail(f"timm cannot build '{name}' with --seg-backbone-kwargs {vit_kwargs}: {str(e).splitlines()[0][:120]}")
        else:
            self.backbone = timm_model(name, pretrained, features_only=True, output_stride=output_stride, out_indices=(-1,))
        self.stride = self.backbone.feature_info.reduction()[-1]
        self.head = DeepLabHead(self.backbone.feature_info.channels()[-1], num_classes)

    def forward(self, x):
        # Deviation 10: pad to a multiple of the stride (bottom / right), so that each output cell covers exactly
        # stride x stride input pixels, and crop after upsampling. Stretching ceil(H/s) cells over H pixels instead
        # shifts the prediction by up to s - 1 pixels towards the top-left
        H, W = x.shape[2:]
        x = F.pad(x, (0, -W % self.stride, 0, -H % self.stride))  # (B, 3, H', W'), H' and W' multiples of the stride
        logits = self.head(self.backbone(x)[-1])  # (B, C, H'/s, W'/s)
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)[:, :, :H, :W]


def build_model(args, num_classes, *, init_weights):
    """The CoBra networks, the IRN (--mask-method irn) and the segmentation network. init_weights: ImageNet
    weights (--pretrained) or the cnn / vit / irn / seg entries of --weights FILE into the backbones."""
    files = init_weights and args.weights
    blob = load_checkpoint(args.weights, "--weights") if files else {}
    check(not files or isinstance(blob, dict) and blob and set(blob) <= {"cnn", "vit", "irn", "seg"},
          f"--weights {args.weights} holds no cnn / vit / irn / seg entries; give a dict of backbone state dicts")
    needed = ("seg",) if args.supervision == "full" else ("cnn", "vit", "irn", "seg")  # no downloads for skipped stages
    timm_init = {k for k in needed if init_weights and args.pretrained and k not in blob}
    model = CoBra(args, num_classes, timm_init)
    irn = IRNEdge(args.irn_backbone, "irn" in timm_init) if args.mask_method == "irn" else None
    seg = SegNet(args.seg_backbone, num_classes, "seg" in timm_init, args.seg_output_stride,
                 parse_backbone_kwargs(args.seg_backbone_kwargs), args.seg_crop)
    for key, net in (("cnn", model.cnn), ("vit", model.vit), ("irn", irn), ("seg", seg)):
        if key in blob and net is not None:  # an ImageNet classifier in the file is dropped
            what = f"--weights {args.weights} entry '{key}'"
            check(key != "seg" or not hasattr(net.backbone, "model"), f"{what}: a ViT segmentation backbone takes "
                  "timm's ImageNet weights (--pretrained), not a state dict; --weights 'seg' fills ResNet backbones")
            load_weights(net.backbone, state_dict_of(blob[key], what), what, ignore=("fc.", "head."))
    return model, irn, seg


def parse_backbone_kwargs(text):
    """--seg-backbone-kwargs "patch_size=8,embed_dim=96" -> {"patch_size": 8, "embed_dim": 96}."""
    kwargs = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip().removeprefix("-").isdigit():
            fail(f"--seg-backbone-kwargs item '{item}' is not name=integer (e.g. 'patch_size=8,embed_dim=96')")
        kwargs[key.strip()] = int(value)
    return kwargs


# ==================================================================================================
# Losses
# ==================================================================================================
def loss_cls(logits, label):
    """Sec. 3.3.1 L_cls-cnn / L_cls-tran. logits (B, C-1) = GAP of the foreground CAM channels, label (B, C-1).

    Deviation 1: multilabel soft-margin (official step/train_cam.py), not the paper's "softmax".
    """
    # Deviation 1: sigmoid BCE averaged over the C-1 classes (official), where the paper says "softmax losses".
    return F.multilabel_soft_margin_loss(logits, label)


def loss_cam(cam_cnn, cam_vit, label, size, plus=False):
    """Sec. 3.3.1 L_cam (lambda1 term of Eq. (3)): L1 between the CAMs upsampled to the crop.

    cam_cnn, cam_vit (B, C, N, N); label (B, C-1). L_cons = mean over B, all C channels and pixels;
    L_cons+ = (1/B) sum_b mean over c in Y_b and pixels (Deviation 3: only with plus=True).
    """
    up = lambda m: F.interpolate(m, size=size, mode="bilinear", align_corners=True)
    diff = (up(cam_cnn) - up(cam_vit)).abs()  # (B, C, S, S)
    loss = diff.mean()
    if plus:  # Deviation 3: the official code computes L_cons+ but never adds it; the paper adds it
        present = F.pad(label, (1, 0))  # (B, C), background excluded
        per_class = diff.mean((2, 3))  # (B, C)
        loss = loss + ((per_class * present).sum(1) / present.sum(1).clamp(min=1)).mean()
    return loss


@torch.no_grad()
def cnn_pseudo_label(cam_cnn, label, quirk=False):
    """Sec. 3.3.3 pseudo label y_i = argmax_{c in {0} u Y_b} M_cnn[c, i]. (B, C, N, N) -> (B, N^2).

    Absent classes are masked with -inf (paper); quirk = the official CAM * [1, y], where an absent
    class scores 0 and can win wherever every allowed score is negative.
    """
    allowed = F.pad(label, (1, 0), value=1.0)[:, :, None]  # (B, C, 1)
    scores = cam_cnn.flatten(2)  # (B, C, N^2)
    # Deviation 6: the paper's argmax over {0} u Y_b (-inf for absent classes) unless --official-quirks.
    scores = scores * allowed if quirk else scores.masked_fill(allowed == 0, float("-inf"))
    return scores.argmax(1)


@torch.no_grad()
def select_sap_patches(cam_cnn, pseudo, k_pos, k_neg):
    """P+_i / P-_i for Eq. (2): the top-k_pos / bottom-k_neg patches of the raw row M_cnn[y_i, :].

    cam_cnn (B, C, N, N), pseudo (B, N^2) -> pos (B, N^2, k_pos), neg (B, N^2, k_neg) patch indices.
    The sets depend only on the anchor's class, so they are computed once per class and gathered.
    Deviation 16: the top-k+ run over all patches (official cll_v1), not only the patches labelled y_i.
    """
    scores = cam_cnn.flatten(2)  # (B, C, N^2)
    # Deviation 16: top-k over all patches of the class row (official), labelled y_i or not
    top = scores.topk(k_pos, dim=2).indices  # (B, C, k_pos)
    bottom = scores.topk(k_neg, dim=2, largest=False).indices  # (B, C, k_neg)
    pos = top.gather(1, pseudo[:, :, None].expand(-1, -1, k_pos))  # (B, N^2, k_pos)
    neg = bottom.gather(1, pseudo[:, :, None].expand(-1, -1, k_neg))
    return pos, neg


@torch.no_grad()
def select_cap_patches(affinity, k_pos, k_neg):
    """P+_i / P-_i for Eq. (1): top-k_pos / bottom-k_neg entries of row i of the patch affinity P.

    affinity P (B, N^2, N^2) (row i = query patch i) -> pos (B, N^2, k_pos), neg (B, N^2, k_neg).
    """
    return affinity.topk(k_pos, dim=2).indices, affinity.topk(k_neg, dim=2, largest=False).indices


def info_nce(proj, pos, neg, tau, quirk_neg_tau=False):
    """The patch InfoNCE of Eq. (1) / Eq. (2), averaged over anchors i and positives j (Deviation 4).

    proj (B, D, N, N) raw projections; pos (B, N^2, k+), neg (B, N^2, k-) indices (no gradient).
    l_ij = -log( e^{s_ij/tau} / (e^{s_ij/tau} + sum_{k in P-_i} e^{s_ik/tau}) )
         = softplus( logsumexp_k(s_ik/tau) - s_ij/tau )      (stable form)
    quirk_neg_tau: the official cll_v1 uses e^{s_ik}/tau for the negatives.
    """
    v = F.normalize(proj.flatten(2).transpose(1, 2), dim=-1)  # (B, N^2, D), L2-normalised
    sim = v @ v.transpose(1, 2)  # (B, N^2, N^2): s_ij = <v_i, v_j>
    s_pos = sim.gather(2, pos)  # (B, N^2, k+)
    s_neg = sim.gather(2, neg)  # (B, N^2, k-)
    if quirk_neg_tau:
        log_neg = torch.logsumexp(s_neg, dim=2, keepdim=True) - math.log(tau)
    else:
        log_neg = torch.logsumexp(s_neg / tau, dim=2, keepdim=True)
    # Deviation 4: mean over anchors and positives (official); the paper sums L^i over the N^2 anchors.
    return F.softplus(log_neg - s_pos / tau).mean()


def loss_cap(cnn_proj, affinity, k_pos, k_neg, tau):
    """Eq. (1) L_cap: ViT -> CNN. Indices from the ViT patch affinity P, embeddings from CAP (CNN)."""
    pos, neg = select_cap_patches(affinity, k_pos, k_neg)
    # Eq. (1)  L_cap^i = 1/|P+_i| sum_{j in P+_i} -log e^{v_i.v_j/tau} / (e^{v_i.v_j/tau} + sum_{k in P-_i} e^{v_i.v_k/tau})
    return info_nce(cnn_proj, pos, neg, tau)


def loss_sap(vit_proj, cam_cnn, label, k_pos, k_neg, tau, quirks=False):
    """Eq. (2) L_sap: CNN -> ViT. Indices from the CNN CAM (by pseudo label), embeddings from SAP (ViT)."""
    pseudo = cnn_pseudo_label(cam_cnn.detach(), label, quirk=quirks)  # (B, N^2)
    pos, neg = select_sap_patches(cam_cnn.detach(), pseudo, k_pos, k_neg)
    # Eq. (2)  L_sap^i = 1/|P+_i| sum_{j in P+_i} -log e^{v_i.v_j/tau} / (e^{v_i.v_j/tau} + sum_{k in P-_i} e^{v_i.v_k/tau})
    return info_nce(vit_proj, pos, neg, tau, quirk_neg_tau=quirks)


def loss_total(out, label, args: Args, aux_on: bool) -> dict:
    """Eq. (3) (= supp. Eq. (4)): L = L_cls + 1[epoch >= E_w] (lambda1 L_cam + lambda_sap L_sap + lambda_cap L_cap).

    Deviation 2: the gate is the official epoch >= warmup_epochs. Returns every term (for logging).
    """
    terms = {}
    cls = []
    if "cnn_logits" in out:
        terms["cls_cnn"] = loss_cls(out["cnn_logits"], label)
        cls.append(terms["cls_cnn"])
    if "vit_logits" in out:
        terms["cls_vit"] = loss_cls(out["vit_logits"], label)
        cls.append(terms["cls_vit"])
    total = sum(cls)
    losses = set(args.losses.split(",")) if args.losses != "none" else set()
    if aux_on and "cnn_cam" in out and "vit_cam" in out:
        if "cam" in losses:
            terms["cam"] = loss_cam(out["cnn_cam"], out["vit_cam"], label, (args.crop, args.crop), args.cons_plus)
            total = total + args.lambda_cam * terms["cam"]  # Eq. (3) lambda1 L_cam
        if "sap" in losses:
            terms["sap"] = loss_sap(out["vit_proj"], out["cnn_cam"], label, args.k_sap_pos, args.k_sap_neg,
                                    args.tau, args.official_quirks)
            total = total + args.lambda_sap * terms["sap"]  # Eq. (3) lambda2 L_sap
        if "cap" in losses:
            affinity = out["vit_attn"][:, 1:, 1:]  # P = A_bar[1:, 1:] (B, N^2, N^2)
            terms["cap"] = loss_cap(out["cnn_proj"], affinity, args.k_cap_pos, args.k_cap_neg, args.tau)
            total = total + args.lambda_cap * terms["cap"]  # Eq. (3) lambda2 L_cap
    terms["total"] = total
    return terms


# --- IRN (Ahn et al., CVPR 2019): pair affinities from the boundary map (supp. Sec. 10) ---
def path_offsets(radius: int):
    """IRNet's forward half-disk of displacements d and, per d, the line pixels from 0 to d:
    pixels in the bounding box whose squared perpendicular distance to the segment is < 1."""
    dirs = [(0, dx) for dx in range(1, radius)]
    dirs += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dx * dx + dy * dy < radius * radius]
    paths = []
    for dy, dx in dirs:
        n2 = dx * dx + dy * dy
        paths.append([(oy, ox) for oy in range(0, dy + 1) for ox in range(min(0, dx), max(0, dx) + 1)
                      if (oy * dx - ox * dy) ** 2 < n2])
    return dirs, paths


def pair_affinity(edge, radius, pad_value):
    """a_ij = 1 - max of the edge probability on the line from i to j, for every i and displacement d.

    edge (B, h, w) in [0, 1] -> aff (B, D, h, w), D = number of displacements; destinations outside the
    map read `pad_value` (1.0 for the random walk: no affinity leaves the image).
    """
    dirs, paths = path_offsets(radius)
    h, w = edge.shape[1:]
    ep = F.pad(edge, (radius, radius, 0, radius), value=pad_value)
    affs = []
    for path in paths:
        m = torch.stack([ep[:, oy: oy + h, radius + ox: radius + ox + w] for oy, ox in path]).amax(0)
        affs.append(1 - m)
    return torch.stack(affs, 1)


def pair_labels(label, radius):
    """bg-positive, fg-positive and negative pairs (B, D, h, w) from a label map (B, h, w) (255 = ignore)."""
    dirs, _ = path_offsets(radius)
    h, w = label.shape[1:]
    lp = F.pad(label, (radius, radius, 0, radius), value=255)
    src = label[:, None]
    # Deviation 8: destinations outside the map read 255 and are ignored (IRNet crops the source region instead).
    dst = torch.stack([lp[:, dy: dy + h, radius + dx: radius + dx + w] for dy, dx in dirs], 1)
    valid = (src != 255) & (dst != 255)
    bg_pos = valid & (src == 0) & (dst == 0)
    fg_pos = valid & (src == dst) & (src != 0)
    neg = valid & (src != dst)
    return bg_pos, fg_pos, neg


def loss_irn_affinity(edge_logits, label, radius):
    """IRNet's inter-pixel affinity loss: 1/2 (1/2 L_bg+ + 1/2 L_fg+) + 1/2 L_neg (IRNet step/train_irn.py)."""
    aff = pair_affinity(torch.sigmoid(edge_logits[:, 0]), radius, pad_value=0.0)  # (B, D, h, w)
    bg_pos, fg_pos, neg = pair_labels(label, radius)
    mean = lambda l, m: (l * m).sum() / (m.sum() + 1e-5)
    pos_loss = -torch.log(aff + 1e-5)
    neg_loss = -torch.log(1.0 + 1e-5 - aff)
    return (mean(pos_loss, bg_pos) / 2 + mean(pos_loss, fg_pos) / 2) / 2 + mean(neg_loss, neg) / 2


# ==================================================================================================
# Pseudo labels
# ==================================================================================================
@torch.no_grad()
def infer_cams(model: CoBra, image: np.ndarray, label: np.ndarray, scales, device) -> dict:
    """Multi-scale + flip CAMs of one full-resolution image. Impl. (MICV-yonsei/Cobra, step/make_cam.py): every
    map is stretched to H x W (high_res_*) or ceil(H/4) x ceil(W/4) (strided `cam`); Deviation 15 for the input resize.

    Returns keys (K,) class ids of the GT classes, and for the branches present: cnn, tran (K, H, W)
    max-normalised; cnn_s4, tran_s4 (K, ceil(H/4), ceil(W/4)) for the random walk; attn A (H, W),
    the class-token attention summed over layers, flips and scales (unnormalised).
    """
    H, W = image.shape[:2]
    keys = np.nonzero(label)[0] + 1
    x0 = augment.to_tensor(image).to(device)[None]  # (1, 3, H, W)
    size_s4 = ((H - 1) // 4 + 1, (W - 1) // 4 + 1)
    acc = {}

    def add(name, m, size):
        acc[name] = acc.get(name, 0) + F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0]

    for s in scales:
        # Deviation 15: torch bilinear on the normalised image (official: PIL bicubic on uint8)
        x = F.interpolate(x0, size=(max(round(H * s), 16), max(round(W * s), 16)), mode="bilinear", align_corners=False)
        x = torch.cat([x, x.flip(-1)])  # (2, 3, h, w): the image and its mirror
        out = {k: v.float() for k, v in model(x).items()}
        if "cnn_cam" in out:
            cam = F.relu(out["cnn_cam"])  # (2, C, h16, w16)
            cam = cam[0] + cam[1].flip(-1)
            # Impl. (MICV-yonsei/Cobra, step/make_cam.py high_res_cnn): stretched to H x W like the ViT map
            # (IRNet's make_cam upsamples to the stride-16 cover and crops instead).
            add("cnn", cam, (H, W))
            add("cnn_s4", cam, size_s4)
        if "vit_cam" in out:
            h, w = out["vit_cam"].shape[2:]
            a_obj = out["vit_attn"][:, 0, 1:].reshape(-1, 1, h, w)  # (2, 1, h, w) semantic-agnostic attention
            cam = F.relu(out["vit_cam"] * a_obj)  # Sec. 3.4: M_tran = M_tran (x) A_obj at inference
            cam = cam[0] + cam[1].flip(-1)
            add("tran", cam, (H, W))  # Impl. (make_cam.py high_res_seed): the floored grid is stretched to H x W
            add("tran_s4", cam, size_s4)
            add("attn", a_obj[0] + a_obj[1].flip(-1), (H, W))
    result = {"keys": keys}
    for name, m in acc.items():
        if name == "attn":
            result[name] = m[0].cpu().numpy()  # A stays unnormalised
            continue
        m = m[torch.as_tensor(keys, device=m.device, dtype=torch.long)]  # GT classes only (drops channel 0)
        m = m / (m.flatten(1).amax(1)[:, None, None] + 1e-5)  # per-class max-normalisation
        result[name] = m.cpu().numpy()
    return result


def fuse_cams(m_cnn, m_tran, source: str):
    """Sec. 3.4 / supp. Sec. 9.2 and Table 5 sources. M_fuse = max{(M_cnn + M_tran)/2, M_tran}."""
    if source == "cnn":
        return m_cnn
    if source == "tran":
        return m_tran
    if source == "avg":
        return (m_cnn + m_tran) / 2
    if source == "max":
        return np.maximum(m_cnn, m_tran)
    return np.maximum((m_cnn + m_tran) / 2, m_tran)  # M_fuse


def source_map(cams: dict, source: str, strided=False):
    suffix = "_s4" if strided else ""
    return fuse_cams(cams.get("cnn" + suffix), cams.get("tran" + suffix), source)


def seed_label(cam: np.ndarray, keys: np.ndarray, bg: float) -> np.ndarray:
    """argmax over [bg, M] mapped to class ids. cam (K, H, W), keys (K,), bg a scalar -> uint8 (H, W)."""
    scores = np.concatenate([np.full((1, *cam.shape[1:]), bg, cam.dtype), cam])
    return np.concatenate([[0], keys]).astype(np.uint8)[scores.argmax(0)]


def attention_bg(attn: np.ndarray, theta: float) -> float:
    """Supp. Sec. 9.1 / 11: background score = the theta-th percentile of the accumulated class-token attention."""
    return float(np.percentile(attn, theta))  # Impl. (MICV-yonsei/Cobra, step/eval_cam.py)


def ir_thresholds(attn: np.ndarray, percentile: float = 93.0) -> tuple[float, float]:
    """Supp. Sec. 9.1: (tau_fg, tau_bg) with a gap of 0.5. Impl. (MICV-yonsei/Cobra, step/cam_to_ir_label.py):
    tau_bg = the largest multiple of 0.05 strictly below the 93rd attention percentile."""
    t = float(np.percentile(attn, percentile))
    tau_bg = (math.ceil(round(t / 0.05, 6)) - 1) * 0.05  # 0.37 -> 0.35, 0.40 -> 0.35
    return round(tau_bg + 0.5, 6), round(tau_bg, 6)


def make_ir_label(image, cam, keys, tau_fg, tau_bg, use_crf=True) -> np.ndarray:
    """IRNet's confident labels: fg from the high threshold, bg where both maps say bg, 255 in between.

    cam (K, H, W) -> uint8 (H, W) in {0, 255} u keys. CRF: IRN preset on the label maps (common.crf).
    """
    keys_all = np.concatenate([[0], keys]).astype(np.uint8)
    maps = []
    for tau in (tau_fg, tau_bg):
        idx = np.concatenate([np.full((1, *cam.shape[1:]), tau, cam.dtype), cam]).argmax(0)
        if use_crf and len(keys):
            idx = crf.refine_labels(np.array(image), idx, len(keys_all), gt_prob=0.7, **crf.PRESETS["irn"])
        maps.append(keys_all[idx])
    fg_conf, bg_conf = maps
    label = fg_conf.copy()
    label[fg_conf == 0] = 255
    label[(fg_conf == 0) & (bg_conf == 0)] = 0
    return label


def transition_weights(edge, radius, beta):
    """Symmetric sparse affinity W (diagonal 1) of the random walk and its column sums.

    edge (h, w) -> W sparse (hw, hw) with entries a_ij^beta, colsum (hw,). T = W / colsum (column-stochastic).
    """
    h, w = edge.shape
    dirs, _ = path_offsets(radius)
    aff = pair_affinity(edge[None], radius, pad_value=1.0)[0].pow(beta)  # (D, h, w)
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols, vals = [torch.arange(h * w)], [torch.arange(h * w)], [torch.ones(h * w)]
    for d, (dy, dx) in enumerate(dirs):
        ok = (ys + dy < h) & (xs + dx >= 0) & (xs + dx < w)
        src = (ys * w + xs)[ok]
        dst = ((ys + dy) * w + xs + dx)[ok]
        a = aff[d][ok].float().cpu()
        rows += [src, dst]
        cols += [dst, src]
        vals += [a, a]
    W = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(cols)]), torch.cat(vals), (h * w, h * w),
                                check_invariants=False).coalesce()
    colsum = torch.sparse.sum(W, 0).to_dense()
    return W, colsum


def random_walk(x, edge, radius=5, beta=10.0, exp_times=8, dense=False):
    """IRNet's propagation r = (x (1 - e)) T^(2^exp_times), T = column-normalise(W).

    x (K, h, w) seed maps, edge (h, w) boundary probability -> (K, h, w). The sparse form applies T
    2^exp_times times (x T = (W x^T)^T / colsum, W symmetric) instead of squaring a dense (hw)^2 matrix.
    """
    K, h, w = x.shape
    W, colsum = transition_weights(edge.cpu(), radius, beta)
    v = (x.cpu().float() * (1 - edge.cpu().float())).reshape(K, h * w)  # (K, hw)
    if dense:  # IRNet's form: square T exp_times times, then one product
        T = W.to_dense() / colsum[None]
        for _ in range(exp_times):
            T = T @ T
        return (v @ T).reshape(K, h, w)
    # Small maps (toy): a dense T with 2^exp_times mat-vec steps is faster than sparse kernels; same steps.
    step = W.to_dense() if h * w <= 4096 else W
    vt = v.t().contiguous()  # (hw, K)
    for _ in range(2 ** exp_times):
        vt = (step @ vt) / colsum[:, None]
    return vt.t().reshape(K, h, w)


def upsample_walk(rw, H, W):
    """rw (K, h4, w4) -> (K, H, W). Impl. (MICV-yonsei/Cobra, step/make_sem_seg_labels_npy.py): the walk is
    resized straight to (H, W) (IRNet's make_sem_seg_labels upsamples x4 and crops instead)."""
    if not len(rw):  # an image without GT classes: torch cannot resize zero channels
        return rw.new_zeros((0, H, W))
    return F.interpolate(rw[None], size=(H, W), mode="bilinear", align_corners=False)[0]


def alpha_mask(up, keys, alpha):
    """Impl. (MICV-yonsei/Cobra, step/gen_seg_label.py): per class thr_c = alpha max(r_c) + min(r_c).

    up (K, H, W) upsampled walk -> uint8 (H, W): values below thr_c become 0, bg where every class is 0.
    Separate from the resize so that the alpha sweep (sweep_mask_alpha) resizes each walk once.
    """
    thr = alpha * up.flatten(1).amax(1) + up.flatten(1).amin(1)
    up = torch.where(up < thr[:, None, None], torch.zeros_like(up), up)
    # a zero background channel in front: the first maximum is bg where every class is 0
    scores = F.pad(up, (0, 0, 0, 0, 1, 0))  # (1 + K, H, W)
    keys_all = torch.as_tensor(np.concatenate([[0], keys]), dtype=torch.long)
    # max(0).indices = argmax(0) (both the first maximum), several times faster on CPU; the sweep calls this 31x
    return keys_all[scores.max(0).indices].numpy().astype(np.uint8)


def final_mask(rw, keys, H, W, alpha):
    """The mask of one image at one alpha: rw (K, h4, w4) -> uint8 (H, W)."""
    return alpha_mask(upsample_walk(rw, H, W), keys, alpha)


@torch.no_grad()
def infer_edge(irn: IRNEdge, image, crop, device):
    """Edge probability at stride 4 (ceil(H/4), ceil(W/4)): flip-averaged logits, then sigmoid.
    Impl. (card Sec. 5): the normalised image is zero-padded to (at least) the training crop."""
    H, W = image.shape[:2]
    x = augment.to_tensor(image).to(device)
    Hp, Wp = max(crop, math.ceil(H / 16) * 16), max(crop, math.ceil(W / 16) * 16)
    pad = lambda t: F.pad(t, (0, Wp - W, 0, Hp - H))
    logits = irn(torch.stack([pad(x), pad(x.flip(-1))]))  # (2, 1, Hp/4, Wp/4)
    h4, w4 = (H - 1) // 4 + 1, (W - 1) // 4 + 1
    logits = logits[:, 0, :h4, :w4]
    return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)


# ==================================================================================================
# Train
# ==================================================================================================
def param_groups(model, args):
    """Backbones at lr, the 'new' layers at 10x lr (official IRNet/Cobra convention)."""
    # Deviation 6: the 10x group holds both CAM heads and both projections (the paper's intent); the official
    # code leaves CAP out of every group and puts only the ViT head bias + SAP weight at 10x (--official-quirks).
    groups = []
    if model.cnn is not None:
        new = [model.cnn.cam_head.weight, model.cnn.proj_head.weight]
        if args.official_quirks:  # Impl. (net/resnet50_cam.py): `embed` (CAP) is in no optimizer group
            new = [model.cnn.cam_head.weight]
        backbone = [p for p in model.cnn.backbone.parameters() if p.requires_grad]
        groups += [dict(params=backbone, lr=args.lr), dict(params=new, lr=10 * args.lr)]
    if model.vit is not None:
        lr = args.lr * args.vit_lr_scale
        head = model.vit.cam_head
        new = [head.weight, head.bias, model.vit.proj_head.weight]
        old = list(model.vit.backbone.parameters())
        if args.official_quirks:  # Impl. (net/deit_cam.py): the last two tensors = head bias + SAP weight
            new, old = [head.bias, model.vit.proj_head.weight], old + [head.weight]
        groups += [dict(params=old, lr=lr), dict(params=new, lr=10 * lr)]
    return groups


def build_optimizers(model, args):
    """Deviation 7: one SGD with the four groups of the official two optimizers (identical update); its momentum
    default 1e-4 is the official effective value (the weight decay passed into the momentum slot). Deviation 11 (toy):
    --vit-optimizer adamw moves the ViT's two groups into an AdamW at one lr (lr x vit_lr_scale; AdamW's per-weight
    step sizes replace the 10x head).
    Returns {"optimizer": SGD, "optimizer_vit": AdamW}, without the entries that hold no parameters."""
    groups = param_groups(model, args)
    sgd_groups, vit_groups = groups, []
    if args.vit_optimizer == "adamw" and model.vit is not None:
        sgd_groups, vit_groups = groups[:-2], groups[-2:]  # param_groups lists the ViT's two groups last
    optimizers = {}
    if sgd_groups:
        optimizers["optimizer"] = torch.optim.SGD(sgd_groups, lr=args.lr, momentum=args.momentum,
                                                  weight_decay=args.weight_decay)
    if vit_groups:
        optimizers["optimizer_vit"] = torch.optim.AdamW([dict(params=g["params"]) for g in vit_groups],
                                                        lr=args.lr * args.vit_lr_scale, weight_decay=args.weight_decay)
    return optimizers


def update(optimizers, losses, it):
    """One step of every optimiser on losses["total"]; returns the losses as floats for the log."""
    log = {f"losses/{k}": v.item() for k, v in losses.items()}
    check_finite(log, it)
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    for optimizer in optimizers:
        optimizer.step()
    return log


# --- Stage 1: CoBra training (Sec. 3.3, supp. Sec. 10) ---
def cobra_transform(args):
    def transform(sample, rng):
        image = sample["image"]
        image, _, _ = augment.random_resize_long(image, rng, long_range=tuple(args.resize_long), interp="bicubic")
        image, _, _ = augment.random_hflip(image, rng)
        image, _, _, _ = augment.random_crop(image, rng, args.crop)  # mean fill = 0 after normalising
        return {"image": augment.to_tensor(image), "label": torch.from_numpy(sample["label"])}
    return transform


def aux_losses_on(it, n_batches, warmup_epochs):
    """The Eq. (3) gate 1[epoch >= E_w] at iteration `it` (0-based), n_batches iterations per epoch.
    Deviation 2: E_w = warmup_epochs (official: 5 of 20), where the paper starts L_cam after one epoch."""
    return it // max(n_batches, 1) >= warmup_epochs  # Deviation 2: official epoch >= 5, paper: after one epoch


def train_step(net, batch, it, args, optimizers, autocast, aux_on):
    """One CoBra iteration: both branches on the same crops, L_total of Eq. (3), one step of each optimiser."""
    with autocast():
        out = net(batch["image"])
    out = {k: v.float() for k, v in out.items()}
    return update(optimizers, loss_total(out, batch["label"], args, aux_on), it)  # Eq. (3)


def train_cobra(ctx, model):
    """CoBra training (Sec. 3.3, supp. Sec. 10), losses by Eq. (3)."""
    args = ctx.args
    # Deviation 17: the standard train_aug list of common/ (10,582 on VOC; official list: 9,761 ids)
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset,
                         transform=cobra_transform(args), seed=args.seed)
    n_batches = len(ds) // args.batch_size
    total = args.max_iters or args.epochs * max(n_batches, 1)  # Deviation 12: --max-iters caps the schedule
    optimizers = build_optimizers(model, args)  # Deviation 7 (one SGD, official groups); toy: Deviation 11
    net = ctx.wrap(model).train()

    def step(batch, it):
        return train_step(net, batch, it, args, list(optimizers.values()), ctx.autocast,
                          aux_on=aux_losses_on(it, n_batches, args.warmup_epochs))

    train_loop(ctx, "cobra", ds, args.batch_size, total, step, {"model": model, **optimizers},
               lr=lambda it: poly_lr(it, total), salt=1)
    model.eval()


# --- Stage 2: multi-scale CAMs of every training image -> cams/<id>.npz (float16) ---
def stage_cams(ctx, model, ds):
    (ctx.run_dir / "cams").mkdir(exist_ok=True)
    model.eval()
    for s in each_sample(ctx, ds, "cams", shard=True):
        with ctx.autocast():
            cams = infer_cams(model, s["image"], s["label"], ctx.args.scales, ctx.device)
        np.savez(ctx.run_dir / "cams" / f"{s['name']}.npz",
                 **{k: (v.astype(np.float16) if k != "keys" else v) for k, v in cams.items()})


def load_cams(ctx, name):
    with np.load(ctx.run_dir / "cams" / f"{name}.npz") as z:
        return {k: z[k].astype(np.float32) if k != "keys" else z[k] for k in z.files}


def seed_bg_value(ctx, cams):
    """The background score of the seed rule: --seed-bg's parameter, chosen in stage 3 (evaluate_seeds)."""
    p = ctx.state["done"]["seeds"]["seed_bg"]
    return attention_bg(cams["attn"], p) if ctx.args.seed_bg == "attn-pct" else p


# --- Stage 4: IR labels (confident fg / bg / 255) for the training split (official cam_to_ir_label.py) ---
def stage_ir_labels(ctx, ds):
    args = ctx.args
    out = ctx.run_dir / "pseudo_labels" / "ir" / ctx.splits["train"]
    use_crf = crf.available()
    if not use_crf and ctx.main:
        print("warning: pydensecrf is not installed; IR labels and masks are made WITHOUT the dense CRF")

    def one(s):  # in the DataLoader workers
        cams = load_cams(ctx, s["name"])
        if args.ir_thresh == "attn":
            tau_fg, tau_bg = ir_thresholds(cams["attn"], args.ir_percentile)
        else:
            tau_fg, tau_bg = args.ir_fg, args.ir_bg
        label = make_ir_label(s["image"], source_map(cams, args.mask_source), cams["keys"], tau_fg, tau_bg, use_crf)
        data.save_mask(out / f"{s['name']}.png", label)
        return tau_fg

    fg = np.array(list(each_sample(ctx, ds, "ir labels", fn=one, shard=True)), dtype=np.float64)
    if args.ir_thresh == "attn" and len(fg):
        ctx.log({"stage": "ir_labels", "rank": ctx.rank, "ir/tau_fg_mean": float(fg.mean()),
                 "ir/no_confident_fg": int((fg >= 1).sum())})


# --- Stage 5: IRN boundary branch on the IR labels ---
def irn_transform(args):
    def transform(sample, rng):
        # Impl. (IRNet misc/imutils.py random_scale): bicubic (order 3) image, nearest label
        image, masks, _ = augment.random_rescale(sample["image"], rng, masks=(sample["ir"],), ratio_range=(0.5, 1.5),
                                                 interp="bicubic")
        image, masks, _ = augment.random_hflip(image, rng, masks=masks)
        image, masks, _, _ = augment.random_crop(image, rng, args.irn_crop, masks=masks)
        # Impl. (IRNet): label reduced x0.25 with nearest neighbour (PIL picks the centre pixel 4i+2).
        return {"image": augment.to_tensor(image), "ir": augment.mask_to_tensor(masks[0][2::4, 2::4])}
    return transform


def train_irn(ctx, irn):
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, transform=irn_transform(args),
                         extra_dirs={"ir": ctx.run_dir / "pseudo_labels" / "ir" / ctx.splits["train"]}, seed=args.seed)
    total = args.max_iters or args.irn_epochs * max(len(ds) // args.irn_batch, 1)
    params = [p for p in irn.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.irn_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    net = ctx.wrap(irn).train()

    def step(batch, it):
        with ctx.autocast():
            logits = net(batch["image"])
        return update([optimizer], {"total": loss_irn_affinity(logits.float(), batch["ir"], args.irn_radius)}, it)

    train_loop(ctx, "irn", ds, args.irn_batch, total, step, {"irn": irn, "optimizer": optimizer},
               lr=lambda it: poly_lr(it, total), salt=2)
    irn.eval()


# --- Stage 6: final masks: IRN edge + random walk + alpha rule (+ CRF), or --mask-method crf (no IRN) ---
def mask_dirs(ctx):
    base = ctx.run_dir / "pseudo_labels"
    return base / "mask" / ctx.splits["train"], base / "mask_nocrf" / ctx.splits["train"]


def image_walk(ctx, irn, s, cams):
    """The random walk of one image: rw (K, ceil(H/4), ceil(W/4)) from the IRN edge and the strided seed map."""
    args = ctx.args
    # Deviation 13: the walk starts from the strided M_tran (official), --rw-source same from the seed map (paper)
    rw_src = "tran" if args.rw_source == "tran" and args.branches != "cnn" else args.mask_source
    seed = torch.from_numpy(source_map(cams, rw_src, strided=True))
    if not len(cams["keys"]):
        return seed
    edge = infer_edge(irn, s["image"], args.irn_crop, ctx.device).float().cpu()
    return random_walk(seed, edge, args.rw_radius, args.rw_beta, args.rw_exp_times)


# Deviation 18: the grid starts where the official step/eval_sem_seg_thres.py starts (0.20, steps of 0.01). That
# script climbs until the mIoU drops; a full grid cannot stop in a dip of a small split. The cap 0.50 lies well
# past the official 0.31 (a best at either end is flagged: then the grid was too short).
MASK_ALPHAS = tuple(round(0.20 + 0.01 * i, 2) for i in range(31))  # 0.20, 0.21, ..., 0.50


def sweep_mask_alpha(ctx, irn, ds):
    """Card Sec. 7: the alpha of the mask rule chosen on the seed split (train GT). Walks this rank's share of
    the split and scores every alpha of MASK_ALPHAS. The walks are not kept (stage_masks walks these images
    again): on COCO the seed split is the whole train split, whose walks would take ~19 GB.

    Scored without the CRF: a CRF per alpha would cost 31 CRFs per image. A tie keeps the smaller alpha (the
    first maximum). Returns {"mask_sweep/train": entry, threshold = best alpha}, on every rank.
    """
    cms = [miou.ConfusionMatrix(ds.num_classes) for _ in MASK_ALPHAS]
    for s in each_sample(ctx, ds, "alpha sweep", shard=True):
        cams = load_cams(ctx, s["name"])
        rw = image_walk(ctx, irn, s, cams)
        up = upsample_walk(rw, *s["image"].shape[:2])  # (K, H, W) as stage_masks resizes it; once, then per alpha
        for cm, alpha in zip(cms, MASK_ALPHAS):
            cm.update(alpha_mask(up, cams["keys"], alpha), s["mask"])
    if dist.is_initialized():  # sum every rank's share: every rank then picks the same alpha
        total = torch.from_numpy(np.stack([cm.matrix for cm in cms]))  # (len(MASK_ALPHAS), C, C)
        total = total.to(ctx.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(total)
        for cm, matrix in zip(cms, total.cpu().numpy()):
            cm.matrix = matrix
    curve = [cm.compute() for cm in cms]
    best = int(np.argmax([c["miou"] for c in curve]))
    ctx.log({"stage": "masks", "mask_sweep/curve": [[a, round(100 * c["miou"], 2)] for a, c in zip(MASK_ALPHAS, curve)]})
    entry = miou_entry(curve[best], ds.class_names, threshold=MASK_ALPHAS[best],
                       note="best alpha of thr_c = alpha max(r_c) + min(r_c) on train GT, no CRF")
    if ctx.main:
        print(f"mask_sweep/train (best alpha {MASK_ALPHAS[best]}, no CRF): mIoU={entry['miou']:.2f}")
        if best in (0, len(MASK_ALPHAS) - 1):
            print(f"note: the best alpha {MASK_ALPHAS[best]} is an end of MASK_ALPHAS; extend the grid in cobra.py")
    return {"mask_sweep/train": entry}


def stage_masks(ctx, irn, ds, seed_ds):
    """The masks of `ds` (pseudo_labels/mask and mask_nocrf) at the alpha of --mask-alpha-sweep (Deviation 18).
    Returns (that alpha, the sweep's results: {} without a sweep)."""
    args = ctx.args
    alpha, sweep = args.mask_alpha, {}
    if args.mask_method == "irn" and args.mask_alpha_sweep != "off":
        # The seed split first: under "use" every label depends on the sweep. This walks the seed split twice
        # (VOC: 1,464 of the 10,582 images again; the paper_coco and toy presets turn the sweep off for that reason).
        sweep = sweep_mask_alpha(ctx, irn, seed_ds)
        if args.mask_alpha_sweep == "use":  # Deviation 18: by default the masks keep the official fixed alpha
            alpha = sweep["mask_sweep/train"]["threshold"]
    out_crf, out_raw = mask_dirs(ctx)
    use_crf = crf.available()
    for s in each_sample(ctx, ds, "masks", shard=True):
        cams = load_cams(ctx, s["name"])
        keys = cams["keys"]
        H, W = s["image"].shape[:2]
        if args.mask_method == "irn":
            rw = image_walk(ctx, irn, s, cams)
            raw = final_mask(rw, keys, H, W, alpha)
        else:
            raw = seed_label(source_map(cams, args.mask_source), keys, seed_bg_value(ctx, cams))
        final = raw
        if (args.mask_crf or args.mask_method == "crf") and use_crf and len(keys):
            keys_all = np.concatenate([[0], keys]).astype(np.uint8)
            idx = np.searchsorted(keys_all, raw)  # class id -> label index (keys are sorted)
            # Deviation 9: RGB image (the official step/eval_sem_seg_thres.py passes OpenCV's BGR).
            params = crf.PRESETS["cobra_seg"] if args.mask_method == "irn" else crf.PRESETS["irn"]
            final = keys_all[crf.refine_labels(np.array(s["image"]), idx, len(keys_all), gt_prob=0.7, **params)]
        data.save_mask(out_crf / f"{s['name']}.png", final)
        data.save_mask(out_raw / f"{s['name']}.png", raw)
    return alpha, sweep


# --- Stage 7: the segmentation network on the final masks (DeepLab VOC recipe; Deviation 10) ---
def seg_transform(args, key):
    def transform(sample, rng):
        image, masks, _ = augment.random_rescale(sample["image"], rng, masks=(sample[key],),
                                                 ratio_range=tuple(args.seg_scale_range))
        image, masks, _ = augment.random_hflip(image, rng, masks=masks)
        image, masks, _, _ = augment.random_crop(image, rng, args.seg_crop, masks=masks)
        return {"image": augment.to_tensor(image), "target": augment.mask_to_tensor(masks[0])}
    return transform


def train_seg(ctx, seg):
    """On the final masks, or on the ground truth under --supervision full (the upper bound)."""
    args = ctx.args
    full = args.supervision == "full"
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, seed=args.seed,
                         transform=seg_transform(args, "mask" if full else "pseudo"),
                         extra_dirs={} if full else {"pseudo": seg_label_dir(ctx)})
    total = args.max_iters or args.seg_iters
    if args.seg_optimizer == "sgd":  # DeepLab: 10x lr for the new head
        optimizer = torch.optim.SGD([dict(params=seg.backbone.parameters(), lr=args.seg_lr),
                                     dict(params=seg.head.parameters(), lr=10 * args.seg_lr)],
                                    lr=args.seg_lr, momentum=0.9, weight_decay=args.weight_decay)
    else:  # Deviation 19 (toy): a ViT from random init
        optimizer = torch.optim.AdamW(seg.parameters(), lr=args.seg_lr, weight_decay=0.01)
    net = ctx.wrap(seg).train()

    def step(batch, it):
        with ctx.autocast():
            logits = net(batch["image"])
        loss = F.cross_entropy(logits.float(), batch["target"], ignore_index=data.IGNORE_INDEX)
        return update([optimizer], {"total": loss}, it)

    train_loop(ctx, "seg", ds, args.seg_batch, total, step, {"seg": seg, "optimizer": optimizer},
               lr=lambda it: poly_lr(it, total), salt=3)
    seg.eval()


def seg_label_dir(ctx):
    return mask_dirs(ctx)[0 if (ctx.args.mask_crf or ctx.args.mask_method == "crf") else 1]


# ==================================================================================================
# Evaluate
# ==================================================================================================
# --- Stage 3: seeds (card Sec. 7: chosen on train GT, as the official code) ---
def evaluate_seeds(ctx, ds):
    """seed/train on the seed split. attn-pct: greedy theta = 70, 75, ... (official eval_cam.py); fixed: full
    threshold sweep (common.miou.ThresholdSweep). Writes the seed labels; returns (result, bg parameter)."""
    args, C = ctx.args, ds.num_classes
    thetas = (70, 75, 80, 85, 90, 95)
    attn_cms = [miou.ConfusionMatrix(C) for _ in thetas]
    sweep = miou.ThresholdSweep(C)
    has_attn = args.branches != "cnn"
    for s in each_sample(ctx, ds, "seed eval"):
        cams = load_cams(ctx, s["name"])
        m = source_map(cams, args.mask_source)
        sweep.update(m, cams["keys"], s["mask"])
        if has_attn:
            for cm, th in zip(attn_cms, thetas):
                cm.update(seed_label(m, cams["keys"], attention_bg(cams["attn"], th)), s["mask"])
    fixed = sweep.compute()
    ctx.log({"stage": "seeds", "seed_fixed/curve": [[t, round(100 * v, 2)] for t, v in fixed["curve"]]})
    if has_attn:  # both rules are logged; --seed-bg picks the reported one
        curve = [cm.compute() for cm in attn_cms]
        best = 0
        while best + 1 < len(thetas) and curve[best + 1]["miou"] > curve[best]["miou"]:
            best += 1  # Deviation 14: stop at the first non-improvement, keep the best (card Sec. 8 row 13), cap 95
        ctx.log({"stage": "seeds", "seed_attn/curve": [[t, round(100 * c["miou"], 2)] for t, c in zip(thetas, curve)]})
    if args.seed_bg == "attn-pct":
        param, res = thetas[best], curve[best]
        entry = miou_entry(res, ds.class_names, threshold=f"attention percentile {param}")
    else:
        param, res = float(fixed["best_threshold"]), fixed["best"]
        entry = miou_entry(res, ds.class_names, threshold=param)
    print(f"seed/train ({args.mask_source}, bg {args.seed_bg} {param}): mIoU={entry['miou']:.2f}")
    out = ctx.run_dir / "pseudo_labels" / "seed" / ctx.splits["seed"]
    for name in ds.ids:
        cams = load_cams(ctx, name)
        bg = attention_bg(cams["attn"], param) if args.seed_bg == "attn-pct" else param
        data.save_mask(out / f"{name}.png", seed_label(source_map(cams, args.mask_source), cams["keys"], bg))
    return entry, param


# --- Stage 6: masks, with and without the final CRF (Table 9) ---
def evaluate_masks(ctx, ds, alpha):
    """mask/train and mask_nocrf/train of the written masks; `alpha`: the one stage_masks used (IRN masks)."""
    args = ctx.args
    is_irn = args.mask_method == "irn"
    note = "IRN random walk + alpha rule" if is_irn else "CRF-refined seed (no IRN) - not comparable with the paper's Mask column"
    extra = {"threshold": alpha} if is_irn else {}
    cms = {key: miou.ConfusionMatrix(ds.num_classes) for key in ("mask/train", "mask_nocrf/train")}
    for s in each_sample(ctx, ds, "mask eval"):
        for (key, cm), folder in zip(cms.items(), mask_dirs(ctx)):
            cm.update(data.read_mask(folder / f"{s['name']}.png"), s["mask"], pred_ignore="exclude")
    results = {}
    for key, cm in cms.items():
        if key == "mask/train" and not (args.mask_crf or args.mask_method == "crf"):
            continue
        results[key] = miou_entry(cm.compute(), ds.class_names, note=note, **extra)
        print(f"{key} ({note}{'' if 'nocrf' in key else ', CRF'}): mIoU={results[key]['miou']:.2f}")
    results.setdefault("mask/train", results["mask_nocrf/train"])
    return results


# --- Stage 7: the segmentation network ---
@torch.no_grad()
def predict_seg(seg, image, ctx):
    x = augment.to_tensor(image).to(ctx.device)[None]
    with ctx.autocast():
        return seg(x)[0].float().argmax(0).cpu().numpy().astype(np.uint8)


@torch.no_grad()
def predict_seg_ms(seg, image, ctx, scales):
    """Sec. 4 multi-scale test: softmax averaged over the scales and the flip, at full size -> (C, H, W)."""
    H, W = image.shape[:2]
    x0 = augment.to_tensor(image).to(ctx.device)[None]
    prob = 0
    for s in scales:
        x = F.interpolate(x0, size=(max(round(H * s), 16), max(round(W * s), 16)), mode="bilinear", align_corners=False)
        with ctx.autocast():
            p = seg(torch.cat([x, x.flip(-1)])).float().softmax(1)  # (2, C, h, w): the image and its mirror
        p = p[0] + p[1].flip(-1)
        prob = prob + F.interpolate(p[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    return (prob / (2 * len(scales))).cpu().numpy()


def evaluate(seg, dataset, ctx, vis_path=None):
    """seg/val: single scale, no CRF; seg_ms/val: multi-scale + flip; seg_crf/val: then the dense CRF (Sec. 4
    protocol; Deviation 10). vis_path: a grid of the first --num-vis images. Returns {key: entry}."""
    args = ctx.args
    seg.eval()
    use_crf = args.seg_crf and crf.available()
    keys = ["seg/val", "seg_ms/val"] + ["seg_crf/val"] * use_crf
    cms, rows = {k: miou.ConfusionMatrix(dataset.num_classes) for k in keys}, []
    for s in each_sample(ctx, dataset, "seg eval"):
        pred = predict_seg(seg, s["image"], ctx)
        cms["seg/val"].update(pred, s["mask"])
        prob = predict_seg_ms(seg, s["image"], ctx, args.seg_test_scales)  # (C, H, W)
        cms["seg_ms/val"].update(prob.argmax(0).astype(np.uint8), s["mask"])
        if use_crf:
            post = crf.refine_probs(np.array(s["image"]), prob, **crf.PRESETS["deeplab_v2"])
            cms["seg_crf/val"].update(post.argmax(0).astype(np.uint8), s["mask"])
        if len(rows) < args.num_vis:
            rows.append([s["image"], colour_labels(pred), colour_labels(s["mask"])])
    if vis_path is not None and rows:
        save_grid(vis_path, rows, ["image", "prediction", "ground truth"])
    if args.seg_crf and not use_crf and ctx.main:
        print("warning: pydensecrf is not installed; seg_crf/val is not reported")
    net = f"DeepLabV3 ({args.seg_backbone}) substitute for DeepLabV3+"
    notes = {"seg/val": "single scale, no CRF", "seg_ms/val": f"scales {list(args.seg_test_scales)} + flip, no CRF",
             "seg_crf/val": f"scales {list(args.seg_test_scales)} + flip, dense CRF (deeplab_v2 preset)"}
    out = {}
    for k, cm in cms.items():
        res = cm.compute()
        if k == "seg/val":
            print(miou.format_table(res, dataset.class_names))
        else:
            print(f"{k} ({notes[k]}): mIoU={100 * res['miou']:.2f}")
        out[k] = miou_entry(res, dataset.class_names, network=f"{net}, {notes[k]}")
    return out


def visualise(ctx, ds, seg):
    """vis/train.png: image | seed map (max over classes) | seed label | final mask | prediction | ground truth
    (the columns of the stages this run has)."""
    args = ctx.args
    folders = [ctx.run_dir / "pseudo_labels" / "seed" / ctx.splits["seed"]] + ([seg_label_dir(ctx)] if args.until != "seed" else [])
    rows = []
    for i in range(min(args.num_vis, len(ds))):
        s = ds[i]
        m = source_map(load_cams(ctx, s["name"]), args.mask_source)
        row = [s["image"], colour_cam(m.max(0) if len(m) else np.zeros(s["mask"].shape, np.float32))]
        row += [colour_labels(data.read_mask(folder / f"{s['name']}.png")) for folder in folders]
        row += [colour_labels(predict_seg(seg, s["image"], ctx))] if seg is not None else []
        rows.append(row + [colour_labels(s["mask"])])
    captions = ["image", f"CAM ({args.mask_source})", "seed", "mask"][:2 + len(folders)]
    save_grid(ctx.run_dir / "vis" / "train.png", rows, captions + ["prediction"] * (seg is not None) + ["ground truth"])


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
    """The pipeline of the docstring, stage by stage (a resumed run skips the finished ones), then seg/val."""
    with run_guard():
        args, spec = parse_args(argv)
        validate(args)
        ctx = Context(args, spec)
        # data and networks are built (and validated) before anything is written
        sets = {k: data.SegDataset(spec.root, split, dataset=spec.dataset) for k, split in ctx.splits.items()}
        model, irn, seg = build_model(args, sets["val"].num_classes, init_weights=not args.eval_only)
        if args.cobra_ckpt and not args.eval_only:
            reused = load_run_checkpoint(args.cobra_ckpt, "--cobra-ckpt")["weights"]
            check("cobra" in reused, f"--cobra-ckpt {args.cobra_ckpt} holds no trained CoBra networks; give "
                  "checkpoints/last.pt of a finished image-supervised run")
            load_weights(model, reused["cobra"], f"--cobra-ckpt {args.cobra_ckpt}")
        if args.eval_only:  # the trained network must fit before anything is written
            load_weights(seg, ctx.final_weights().get("seg", {}), f"--ckpt {args.ckpt}")
        for net in (model, irn, seg):
            if net is not None:
                net.to(ctx.device)
        ctx.start()
        full = args.supervision == "full"  # the upper bound trains only the segmentation network
        plan = [] if full else ["cobra", "cams", "seeds"]
        if not full and args.until != "seed":
            plan += (["ir_labels", "irn"] if irn is not None else []) + ["masks"]
        plan += ["seg"] if args.until == "seg" else []

        def todo(stage):  # a stage of this run that has not finished yet; it starts from its own seed
            if args.eval_only or stage not in plan or ctx.done(stage):
                return False
            ctx.reseed(plan.index(stage) + 1)
            return True

        def finish(stage, weights=None, **kw):  # the last stage leaves the networks --eval-only / --cobra-ckpt read
            last = stage == plan[-1]
            ctx.finish_stage(stage, weights={**ctx.stage_weights("cobra"), **(weights or {})} if last else weights,
                             final=last, **kw)

        if todo("cobra"):
            if not args.cobra_ckpt:
                train_cobra(ctx, model)
            finish("cobra", weights={"cobra": model.state_dict()}, reused=args.cobra_ckpt)
        if todo("cams"):
            load_weights(model, ctx.stage_weights("cobra")["cobra"], "the CoBra networks")
            stage_cams(ctx, model, sets["train"])
            finish("cams")
        if todo("seeds"):
            entry, param = evaluate_seeds(ctx, sets["seed"]) if ctx.main else ({}, None)
            finish("seeds", results={"seed/train": entry}, seed_bg=param)
        if todo("ir_labels"):
            stage_ir_labels(ctx, sets["train"])
            finish("ir_labels")
        if todo("irn"):
            train_irn(ctx, irn)
            finish("irn", weights={"irn": irn.state_dict()})
        if todo("masks"):
            if irn is not None:
                load_weights(irn, ctx.stage_weights("irn")["irn"], "the IRN")
            alpha, sweep = stage_masks(ctx, irn, sets["train"], sets["seed"])
            barrier()  # every rank's masks are written
            finish("masks", results={**sweep, **evaluate_masks(ctx, sets["seed"], alpha)} if ctx.main else {})
        if todo("seg"):
            train_seg(ctx, seg)
            finish("seg", weights={"seg": seg.state_dict()})
        if args.until == "seg" and not args.eval_only:
            load_weights(seg, ctx.final_weights()["seg"], "the segmentation network")
        if ctx.main:
            if args.until == "seg":
                ctx.results.update(evaluate(seg, sets["val"], ctx, ctx.run_dir / "vis" / "val.png"))
            if not (full or args.eval_only):
                visualise(ctx, sets["seed"], seg if args.until == "seg" else None)
        write_metrics(ctx)


if __name__ == "__main__":
    main()
