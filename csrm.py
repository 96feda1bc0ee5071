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
  Sec. 3.2.6 teacher, total loss   -> build_model(), ema_update(), train_step()
  Sec. 4 setup / schedules         -> PRESETS, aux_weights(), unreliable_ratio(), train_csrm()
  Sec. 4 inference + verification  -> tta_cams(), make_pseudo_labels(), train_verify(), evaluate()
  Table 2 SEPL (Chen et al. 2023)  -> load_sam(), sam_mask_generator(), sepl_merge() (Deviation 28)

Equation map:
  Eq. (1)  A = C(F(x)), p = sigmoid(GAP(A))               -> CSRMNet.forward()
  Eq. (2)  psi(A) = ReLU(up(A)) / max ReLU(up(A))         -> normalize_cam() (max taken before up: Dev. 20)
  Eq. (3)  S = S(F(x)), s = softmax(S)  (|C|+1 classes)   -> CSRMNet.forward(); s^t label-restricted by
                                                             restricted_probs() (Deviation 17)
  Eq. (4)  R = R(F(x)) (256-d)                            -> CSRMNet.forward()
  Eq. (5)  L_c multi-label soft-margin                    -> loss_cls()
  Eq. (6)  I = dCRF(psi(A)), mask outside (d_bg, d_fg]    -> cam_pseudo_labels() (threshold, then two label
                                                             dCRFs: Deviation 18; on the device: Dev. 27)
  Eq. (7)  L_s masked cross-entropy                       -> loss_seg()
  Eq. (8)  M^s = 1[max_c s^t > sigma_s2c]                 -> loss_s2c()
  Eq. (9)  Q = softmax([S_bg | up(A)]), L_s2c             -> loss_s2c()
  Eq. (10) H = -sum_c s log s                             -> entropy()
  Eq. (11) gamma_t = quantile(H, 1 - alpha_t), mask       -> loss_unsup(), train_step() L_m masks (alpha_t per
                                                             epoch: Deviation 21)
  Eq. (12) L_u reliable cross-entropy                     -> loss_unsup()
  Eq. (13) L_m InfoNCE with prototypes and bank negatives -> loss_contrast(), negative_rank_mask() (query /
                                                             negative rules per half: Deviation 19)
  Eq. (14) L = L_c + L_s + l_s2c L_s2c + l_u L_u + l_m L_m -> train_step()

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
     means (Eqs. (7), (9) average per image). L_s is computed on the l-half only, as in the official runner
     (scripts/ss/train_csrm.py: loss_c2s on logit_seg_large_l, pseudo_masks_l); the paper names no half. The
     u-half's segmentation logits learn only from L_u (L_s2c detaches S_bg).
  8. L_u's target comes from the eval-mode teacher on the un-mixed images (logits ClassMixed, then
     label-restricted); its entropy from a train-mode (dropout) teacher pass on the mixed images.
  9. R stays at stride 4 (the paper writes H x W).
  10. ClassMix pastes half of the partner's classes (paper-era csrm/data_utils.py); the released
      PNOC batch_mixaug_pt pastes nothing (its class count is the background id, 0).
  11. Per-class query/prototype/bank indexing is correct; --u2pl-index-quirk reproduces U2PL's
      loop-position indexing.
  12. Negative keys beyond a bank's capacity are randomly subsampled before enqueueing (the code
      keeps the last ones in batch-then-raster order, biasing banks toward u-half images).
  13. Not a deviation from the official code, which also leaves the banks empty during warm-up: the
      auxiliary losses are not computed at all while their weights are 0, so the banks start filling at
      epoch W; the second teacher pass is skipped when L_u and L_m are off (the paper says nothing).
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
      from 27.3 to 22.6 in 60 steps, at 0.002 to 26.7. The toy preset's thresholds are the toy CAMs', not
      VOC's: on toy v3 the stage-0 CAM's mIoU on the TRAIN split peaks at the lowest swept threshold (35.64 at
      0.05; 31.3 at PNOC's 0.40), so --pl-thr is 0.05 and --fg-thr 0.10, the next value above --bg-thr 0.05
      (3-seed means, L_s-only row: pseudo_crf/train 32.41 -> 46.20, seg/val 24.38 -> 39.69; README, CSRM). On
      toy v4 (the default since) it peaks at 0.10 (seed 0: cam_init/train 45.76); the preset was not re-tuned.
      The toy verification network trains with AdamW (lr 2e-3, weight decay 0.01, one lr for all layers) instead
      of PNOC's SGD: on toy v4 under --supervision full (seed 0, 1 thread) SGD reached 73.97
      seg/val at lr 1e-3, 73.63 at 3e-3, 64.96 at 1e-2 and 79.78 with 6 epochs; AdamW 84.77 in the same 3 epochs
      at lr 1e-3 and 85.72 at 2e-3 (seeds 0-2: 84.61 +- 0.19 -> 85.87 +- 0.34, the same stage-0 CAMs).
      The CSRM stage keeps Nesterov SGD on the toy: --optimizer adamw --lr 2e-4 (new layers 2e-3) made the
      segmentation branch learn faster but pulled the CAM down further (seed 0: pseudo_crf/train 53.69 against
      61.15 with SGD; its baseline row 58.69; README, CSRM), so it stays a flag.
  17. s^t (the teacher probabilities of Eqs. (8), (9), (12) and the L_m labels of the u-half) is the softmax
      renormalised over background + the image's labels after mixing (official product-and-renormalise
      form), not Eq. (3)'s plain softmax: absent classes can never be targets, and the Eq. (8) confidences
      rise. The entropies (Eq. (10)) and the L_m ranks use the unrestricted train-mode softmax (official).
  18. Eq. (6) is applied as in the official code: psi is thresholded FIRST into two argmax maps (background
      score delta_fg and delta_bg), each map is refined by a label dCRF (unary gt_prob 0.7), and a pixel is a
      class where the delta_fg map says so, background where both say background, 255 otherwise. The paper
      writes I = dCRF(psi) followed by the threshold; the two operators differ near the thresholds.
  19. L_m query / negative rules per half (official U2PL split): on the l-half, queries and prototypes come
      from reliable pseudo-label pixels (PL != 255, no entropy test), negatives test the pixel's PL != c
      instead of c not in y, and rule (b) is not applied; on the u-half, queries are low-entropy pixels with
      the teacher's Yhat label (not CAM pseudo labels), both plus p > delta_p. Rule (b) is the 0-based window
      [gamma_l, gamma_h), i.e. 1-based ranks 4..6 for (3, 6); the paper's text gives ranks 4-5.
  20. psi (Eq. (2)) is ReLU + max-normalised at stride 16 and then bilinearly upsampled (official order), so the
      per-class max after upsampling can be < 1; the paper normalises after up(A).
  21. alpha_t (Eq. (11)) is a per-epoch step 0.2 (1 - e / E), ending at 1.33% on VOC, not a per-step linear
      decay to 0.
  22. Schedule and batch follow the official runner: an "epoch" is 46 steps (--max_steps; the paper's 15.7
      min per epoch agrees), and the batch is 32 augmented l-half + 32 plain u-half images (COCO 16 + 16; the
      paper gives one batch of 32).
  23. The official csrm/u2pl.py label_onehot calls scatter_ on dim 0 of a (K, B, h, w) tensor with a (B, 1, h, w)
      index, so only image 0 of each half gets a one-hot (the union of all images' labels) and the others get
      zeros: official L_m queries and prototypes come from the first image of each half only, and the l-half
      rule "PL != c" holds for every other image. This file uses correct per-pixel masks (the paper's
      intent); there is no flag that reproduces the bug (--u2pl-index-quirk reproduces only the loop index).
  24. New layers use Kaiming normal with fan_out / relu and zero biases; official PNOC uses the kaiming_normal_
      default (fan_in). The paper says only "Kaiming normal".
  25. DDP: the ClassMix coin and the L_u / L_m entropy quantiles are per rank (the official code uses
      DataParallel, with quantiles over the whole batch); one process reproduces the official behaviour.
  26. Metrics vs the paper (the GT-swept thresholds are oracles: chosen on the same split's ground truth,
      val included, as in the official evaluate.py sweep 0.05-0.81; metrics.json says so under
      "threshold_selection"):
        Table 1 / Table 2 "CSRM" (71.8 train / 69.8 val)  -> cam/train, cam/val      (GT-swept threshold)
        Table 2 "CSRM + dCRF" (72.6 / 70.2)               -> pseudo_crf/train, pseudo_crf/val (t = --pl-thr + dCRF)
        Table 2 row 1, the start point (59.9 / 59.8)      -> cam_init/train, cam_init/val (GT-swept threshold; the
                                                             stage-0 CAM here, not Puzzle-CAM: Deviation 1)
        Table 2 row 5 "CSRM + dCRF + SEPL" (77.6 / 76.2)  -> pseudo_sepl/train, pseudo_sepl/val (--sepl; Deviation 28)
        Table 2 rows 3-4 (start + dCRF, start + SEPL)     -> not run (they refine the Puzzle-CAM start point)
        Fig. 2 (delta_fg curve)                           -> cam/train "curve" (Deviation 14)
        Tables 3-4 DeepLabV3+ val                         -> seg/val (single scale, no CRF), seg_ms/val (TTA);
                                                             trained on SEPL labels (as the paper's) only with
                                                             --sepl, no test-time CRF; the 69.8 of Table 3 is
                                                             DeepLabV2, not comparable.
      pseudo/{train,val} (t = --pl-thr, no CRF) has no number in the paper; log.jsonl val/cam_miou is swept on GT too.
      --no-pl-crf or --crf-iters 0: no pseudo_crf/* (one --crf-iters serves the per-step and the inference dCRF, so
      0 turns both off; without --sepl the verification network then trains on pseudo/).
  27. The per-step label dCRFs of Eq. (6) run in torch on the training device with --train-crf torch, or
      auto on CUDA (common/crf.py refine_labels_torch: pydensecrf's energy and mean-field updates, the
      bilateral kernel on a sparse bilateral grid instead of the permutohedral lattice). On the host they cost
      ~24 s per paper-size step (tests/bench/paper_step.py, 2 CPU threads) while the GPU waits. Measured
      (tests/test_crf.py): 99.8-100% of pixels as pydensecrf on noisy toy labels, and at least as close as
      pydensecrf to the exact (N^2) CRF on labels that ignore the image (99.15% vs 97.76% on the hard crop). --train-crf pydensecrf is the official host CRF;
      auto keeps it on CPU, where it is ~3x faster than the torch version. Pseudo-label PNGs and the
      inference CRF always use pydensecrf.
  28. SEPL (--sepl; Chen et al. 2023, arXiv 2305.05803) is the merge that the official CSRM runner ran
      (cskyl/SAM_WSSS, merge/max_iou_imp2.py MaxIoU_IMP2.merge, its main.py default, on the dCRF labels),
      written from that code: the SEPL paper's own text was not available to this project, so where it words
      the rule differently, the code is what CSRM's Table 2 numbers were made with. Two properties of that
      loop a reader may not expect: a mask goes to the LOWEST class id that passes a test (a small class inside
      a large segment of another class claims it), and masks taken by lower ids no longer count as "SAM has a
      mask here" for the higher ones. The masks come from SAM's automatic generator with the defaults of
      segment-anything scripts/amg.py (the official runner: ViT-H).
Run:
  python csrm.py                                   (toy data, CPU, minutes)
  python csrm.py --data VOC2012                    (paper settings, CUDA)
  python csrm.py --data COCO2014                   (paper COCO settings)
  python csrm.py --no-s2c --no-u --no-m            (Table 1 row 1: L_s only)
  python csrm.py --data VOC2012 --sepl --sam-ckpt sam_vit_h_4b8939.pth   (Table 2 row 5: + SEPL, pseudo_sepl/...)
  python csrm.py --supervision full                (upper bound: the verification DeepLabV3+ on ground-truth masks;
                                                    CSRM and its pseudo labels are skipped, stage 0 only for --seg-init cam)
  torchrun --nproc_per_node=4 csrm.py --data VOC2012 --amp
"""
import argparse
import collections
import contextlib
import copy
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
from multiprocessing.pool import ThreadPool
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

METHOD = "csrm"


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
    # --- network (Sec. 3.1; card 3) ---
    backbone: str = "resnest101e"  # Sec. 5: ResNeSt-101 (VOC ablation), timm resnest101e (--weights: its local state dict)
    width: int = 256  # ASPP / decoder channels (DeepLabV3+)
    low_width: int = 48  # low-level projection (DeepLabV3+)
    rep_dim: int = 256  # Sec. 3.1 Eq. (4): 256-d representations
    frozen_stages: int = 1  # official: VOC freezes the stem (1); COCO trains only layer4 (4)
    init_ckpt: str = ""  # Sec. 3.2.6: external CAM weights {backbone, classifier}; skips stage-0 training
    # --- stage 0, plain CAM classifier (PNOC scripts/cam/train_vanilla.py) ---
    cam_epochs: int = 15  # PNOC: 15 epochs
    cam_batch: int = 32  # PNOC: batch 32
    cam_lr: float = 0.1  # PNOC: lr 0.1, classifier x10, biases x2
    # --- CSRM training (Sec. 4; card 6) ---
    epochs: int = 15  # Sec. 4: 15 epochs
    steps_per_epoch: int = 46  # official runner --max_steps: an "epoch" is 46 steps (Deviation 22)
    warmup_epochs: int = 1  # Sec. 4 warm-up; official W = 1
    batch_size: int = 32  # official runner: 32 per half (32 augmented + 32 plain); the paper: batch 32 (Deviation 22)
    crop: int = 512  # Sec. 4: 512 x 512
    scale_min: float = 0.625  # official: rescale 320-640 around 512
    scale_max: float = 1.25  # official: rescale 320-640 around 512
    lr: float = 0.007  # Sec. 4: 0.007 pretrained, x10 for new layers
    lr_new_mult: float = 10.0  # Sec. 4: 0.07 for randomly initialised weights
    wd: float = 1e-4  # Sec. 4
    grad_clip: float = 1.0  # official: clip grad norm 1.0
    optimizer: str = "sgd"  # CSRM stage: sgd (official, Nesterov) | adamw (tried on the toy, Deviation 16)
    label_smoothing: float = 0.1  # official: VOC 0.1, COCO 0
    ema: float = 0.99  # official: teacher momentum 0.99
    # --- loss weights and switches (Eq. (14), Table 1) ---
    s2c: bool = True  # Table 1: L_s2c on/off (--no-s2c)
    u: bool = True  # Table 1: L_u on/off (--no-u)
    m: bool = True  # Table 1: L_m on/off (--no-m)
    w_s2c: float = 1.0  # Eq. (14) lambda_s2c, ramped 0.1 -> 1 (Sec. 4)
    w_u: float = 1.0  # Sec. 4: lambda_u = 1
    w_m: float = 1.0  # Sec. 4: lambda_m = 1
    s2c_sigma: float = 0.5  # Eq. (8) sigma_s2c (official --s2c_sigma)
    s2c_ramp_start: float = 0.1  # Sec. 4: "from 10% to 100%"
    # --- pseudo labels and mixing (Eq. (6); Sec. 4) ---
    bg_thr: float = 0.05  # Sec. 4: delta_bg
    fg_thr: float = 0.30  # official VOC runner (paper 0.35)
    crf_iters: int = 10  # irn label dCRF iterations, per step (Eq. (6)) and for pseudo_crf (Deviation 26)
    crf_workers: int = 8  # CPU threads for the per-step dCRFs on the host (official: a CPU pool)
    train_crf: str = "auto"  # per-step dCRFs: torch (training device; Deviation 27) | pydensecrf (host) | auto: torch on CUDA
    mix_prob: float = 0.5  # Sec. 4: ClassMix with p 0.5
    unreliable: float = 0.20  # Sec. 4: alpha_0 = 20%, linearly to 0
    # --- contrastive (Sec. 3.2.5, Eq. (13); official cfg_contra) ---
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
    # --- inference and evaluation (Sec. 4; card 7) ---
    tta_scales: tuple = (0.5, 1.0, 1.5, 2.0)  # Sec. 4 TTA; PNOC scales
    tta_flip: bool = True  # Sec. 4 TTA: horizontal flip too
    pl_thr: float = 0.4  # PNOC make_pseudo_masks: background threshold 0.4
    pl_crf: bool = True  # Table 2: dCRF on the pseudo labels (pseudo_crf/...)
    val_images: int = 1464  # per-epoch validation images of the seed split (official: VOC train)
    # --- SEPL, Table 2 rows 4-5 (Chen et al. 2023, arXiv 2305.05803; official cskyl/SAM_WSSS; Deviation 28) ---
    sepl: bool = False  # Table 2 SEPL: SAM masks refine the (dCRF) pseudo labels (pseudo_sepl/...); needs --sam-ckpt
    sam_ckpt: str = ""  # SAM weights for --sepl, e.g. sam_vit_h_4b8939.pth of the segment-anything release
    sam_model: str = "vit_h"  # SAM architecture of --sam-ckpt; official runner: scripts/amg.py --model-type vit_h
    sam_points: int = 32  # SAM point prompts per image side; official runner: scripts/amg.py default (32 x 32)
    sepl_sam_ratio: float = 0.5  # official max_iou_imp2: keep a SAM mask if its class fills more than half of it ...
    sepl_label_ratio: float = 0.85  # official max_iou_imp2: ... or it holds at least 85% of that class's pseudo label
    # --- verification (Sec. 4; PNOC scripts/segmentation/train.py) ---
    seg_backbone: str = "resnest269e"  # Table 3: DeepLabV3+ RS-269
    seg_weights: str = ""  # local state dict for the verification backbone (--seg-init imagenet)
    seg_epochs: int = 50  # Sec. 4: 50 epochs
    seg_batch: int = 32  # Sec. 4: batch 32
    seg_lr: float = 0.007  # Sec. 4: 0.007 (VOC), 0.004 (COCO)
    seg_wd: float = 4e-5  # PNOC segmentation train: 4e-5
    seg_init: str = "imagenet"  # Sec. 4: imagenet = timm backbone (--pretrained / --seg-weights) | cam = stage-0 backbone
    seg_optimizer: str = "sgd"  # sgd (PNOC: Nesterov, new layers x lr_new_mult) | adamw (toy, Deviation 16: one lr, weight decay 0.01 instead of --seg-wd)
    vis: int = 4  # number of val images in vis/val.png


PRESETS = {
    # the Args defaults are the official VOC settings
    "paper_voc": dict(workers=2, log_every=10, ckpt_every=50),
    "paper_coco": dict(workers=2, log_every=10, ckpt_every=50, backbone="resnest269e", frozen_stages=4,
                       steps_per_epoch=256, batch_size=16, crop=640, lr=0.004, label_smoothing=0.0, fg_thr=0.40,
                       rank_high=12, seg_lr=0.004, val_images=5000),
    "toy": dict(  # card 10, with the learning rates of Deviation 16
        pretrained=False, workers=0, log_every=10, ckpt_every=50, backbone="resnet18", width=64, low_width=16,
        rep_dim=32, cam_epochs=3, cam_batch=16, cam_lr=0.05, epochs=4, steps_per_epoch=15, batch_size=4, crop=96,
        lr=0.002, queries=32, negatives=16, bank=2000, bank_bg=4000, crf_iters=5, crf_workers=0, tta_scales=(1.0,),
        val_images=100, seg_backbone="resnet18", seg_epochs=3, seg_batch=16, seg_lr=0.002, seg_wd=1e-4, seg_init="cam",
        seg_optimizer="adamw", fg_thr=0.10, pl_thr=0.05),
}
CHOICES = {"seg_init": ("imagenet", "cam"), "seg_optimizer": ("sgd", "adamw"), "optimizer": ("sgd", "adamw"),
           "train_crf": ("auto", "torch", "pydensecrf"), "sam_model": ("vit_h", "vit_l", "vit_b")}
LIMITS = {**dict.fromkeys(("cam_epochs", "cam_batch", "epochs", "steps_per_epoch", "batch_size", "crop", "width",
                           "low_width", "rep_dim", "queries", "negatives", "bank", "bank_bg", "seg_epochs", "seg_batch",
                           "rank_low", "sam_points"), ">=1"),
          **dict.fromkeys(("mix_prob", "unreliable", "s2c_sigma", "s2c_ramp_start", "ema", "label_smoothing", "pl_thr",
                           "query_conf", "neg_conf", "bg_thr", "fg_thr", "sepl_sam_ratio"), "[0,1]"),
          "sepl_label_ratio": "(0,1]",  # 0 would keep masks that miss their class entirely
          **dict.fromkeys(("lr", "cam_lr", "seg_lr", "tau", "lr_new_mult", "scale_min", "tta_scales"), ">0"),
          **dict.fromkeys(("wd", "seg_wd", "grad_clip", "w_s2c", "w_u", "w_m", "crf_workers", "crf_iters",
                           "frozen_stages", "val_images", "vis", "warmup_epochs"), ">=0")}


def validate(args):
    """The relations that LIMITS cannot express."""
    check(args.crop % 16 == 0, f"--crop must be a multiple of 16 (output stride), got {args.crop}")
    check(args.warmup_epochs < args.epochs, "--warmup-epochs must be in [0, --epochs)")
    check(args.scale_min <= args.scale_max, "need 0 < --scale-min <= --scale-max")
    check(args.bg_thr < args.fg_thr, "need 0 <= --bg-thr < --fg-thr <= 1 (Eq. (6))")
    check(args.rank_low < args.rank_high, "need 1 <= --rank-low < --rank-high")
    check(args.seg_init != "cam" or args.seg_backbone == args.backbone,
          "--seg-init cam needs --seg-backbone equal to --backbone (it copies the stage-0 backbone)")
    check(not args.sepl or args.sam_ckpt,
          "--sepl needs --sam-ckpt FILE, SAM weights of --sam-model (e.g. sam_vit_h_4b8939.pth)")
    check(not args.sam_ckpt or Path(args.sam_ckpt).is_file(), f"--sam-ckpt {args.sam_ckpt}: no such file")
    check(not args.sepl or args.supervision == "image",
          "--sepl refines the pseudo labels; --supervision full makes none")
    for k in ("batch_size", "cam_batch", "seg_batch"):
        check(getattr(args, k) % env_world() == 0,
              f"--{k.replace('_', '-')} {getattr(args, k)} (global) is not divisible by the {env_world()} processes")


# ==================================================================================================
# Model
# ==================================================================================================
# Sec. 3.1, card 3
def conv_gn_relu(cin, cout, k, dilation=1):
    # Impl. (lucasdavid/PNOC, core/deeplab_utils.py): every norm in the heads is GroupNorm(4),
    # so the batch mixing two augmentation regimes and the 1x1 pooled ASPP map are harmless.
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.GroupNorm(4, cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """DeepLabV3+ atrous spatial pyramid pooling on the stride-16 features."""

    def __init__(self, cin, width, rates=(6, 12, 18)):
        super().__init__()
        self.branches = nn.ModuleList([conv_gn_relu(cin, width, 1)] + [conv_gn_relu(cin, width, 3, r) for r in rates])
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_gn_relu(cin, width, 1))
        self.fuse = nn.Sequential(conv_gn_relu(5 * width, width, 1), nn.Dropout(0.5))

    def forward(self, x):
        feats = [b(x) for b in self.branches]
        feats.append(F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear", align_corners=True))
        return self.fuse(torch.cat(feats, 1))  # (B, width, h, w)


class DeepLabV3PlusHead(nn.Module):
    """ASPP + low-level projection + decoder; also the verification network's head."""

    def __init__(self, c_low, c_high, num_outputs, width, low_width):
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


def init_new_layers(module):
    # Sec. 3.2.6: new branches "randomly drawn from a Kaiming normal distribution"; GN 1 / 0. fan_out / relu
    # and zero biases are this file's choice (official PNOC: the fan_in default; Deviation 24).
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            if mod.bias is not None:
                nn.init.zeros_(mod.bias)
        elif isinstance(mod, nn.GroupNorm):
            nn.init.ones_(mod.weight)
            nn.init.zeros_(mod.bias)


def create_backbone(name, pretrained=False, weights="", flag="--weights"):
    """timm feature extractor F: stride-4 (layer1) and stride-16 (layer4, dilated) features. ImageNet weights
    through timm, or `weights`: a local timm state dict of that backbone (its classifier is dropped)."""
    try:
        net = timm_model(name, pretrained and not weights, features_only=True, out_indices=(1, 4), output_stride=16)
    except (RuntimeError, TypeError, ValueError, AttributeError) as e:
        fail(f"timm cannot build '{name}' as a stride-16 feature extractor ({type(e).__name__}: {e})")
    if weights:
        what = f"{flag} {weights}"
        load_weights(net, state_dict_of(load_checkpoint(weights, flag), what), what, ignore=("fc.", "head.", "classifier."))
    return net


class CAMNet(nn.Module):
    """Stage 0: backbone + bias-free 1x1 classifier (a plain CAM network)."""

    def __init__(self, backbone, num_classes, pretrained=False, weights=""):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, weights)
        self.classifier = nn.Conv2d(self.backbone.feature_info.channels()[-1], num_classes, 1, bias=False)
        init_new_layers(self.classifier)

    def forward(self, x, seg=False, rep=False):  # seg / rep: CSRMNet's signature, so tta_cams takes either net
        # Eq. (1)  A = C(F(x)), z = GAP(A)
        A = self.classifier(self.backbone(x)[-1])  # (B, C, h, w)
        return {"cam": A, "cls_logits": A.mean((2, 3))}


class CSRMNet(nn.Module):
    """Feature extractor F + classification C, segmentation S and representation R branches."""

    def __init__(self, backbone, num_classes, width, low_width, rep_dim):
        super().__init__()
        self.backbone = create_backbone(backbone)  # random: the CAM weights replace it (build_model)
        c_low, c_high = self.backbone.feature_info.channels()
        self.classifier = nn.Conv2d(c_high, num_classes, 1, bias=False)
        self.head = DeepLabV3PlusHead(c_low, c_high, num_classes + 1, width, low_width)
        # Eq. (4): the R branch shares ASPP + projection; no dropout, no L2 normalisation.
        self.rep_head = nn.Sequential(conv_gn_relu(width + low_width, width, 3), nn.Conv2d(width, rep_dim, 1))
        for module in (self.classifier, self.head, self.rep_head):
            init_new_layers(module)

    def freeze(self, frozen_stages):
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

    def forward(self, x, seg=True, rep=True):
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

    def __init__(self, backbone, num_outputs, width, low_width, pretrained=False, weights=""):
        super().__init__()
        self.backbone = create_backbone(backbone, pretrained, weights, "--seg-weights")
        c_low, c_high = self.backbone.feature_info.channels()
        self.head = DeepLabV3PlusHead(c_low, c_high, num_outputs, width, low_width)
        init_new_layers(self.head)

    def forward(self, x):
        f_low, f_high = self.backbone(x)
        logits = self.head.decoder(self.head.fuse(f_low, f_high))  # (B, K, H/4, W/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)


def build_model(args, num_classes, cam_weights=None):
    """Sec. 3.2.6: the student, restored from the CAM weights {backbone, classifier} (new heads keep their
    Kaiming init), backbone BN and early stages frozen; the teacher is its copy, without gradients."""
    student = CSRMNet(args.backbone, num_classes, args.width, args.low_width, args.rep_dim)
    if cam_weights is not None:
        load_weights(student.backbone, cam_weights["backbone"], "the CAM backbone")
        load_weights(student.classifier, cam_weights["classifier"], "the CAM classifier")
    student.freeze(args.frozen_stages)
    teacher = copy.deepcopy(student).requires_grad_(False)
    return student, teacher


@torch.no_grad()
def ema_update(teacher, student, step, args):
    """Sec. 3.2.6 mean teacher; step = optimiser steps taken. Copy while epoch <= W, then EMA."""
    epoch = (step - 1) // args.steps_per_epoch
    if epoch <= args.warmup_epochs:
        d = 0.0
    else:
        # Impl. (lucasdavid/wsss-csrm, scripts/ss/train_csrm.py): momentum ramp capped at 0.99
        d = min(1 - 1 / (1 + step - args.warmup_epochs * args.steps_per_epoch), args.ema)
    for p_t, p_s in zip(teacher.parameters(), student.parameters()):
        p_t.mul_(d).add_(p_s.detach(), alpha=1 - d)


# ==================================================================================================
# Losses
# ==================================================================================================
# Sec. 3.2, one function per equation
def loss_cls(cls_logits, y, eps):
    """Eq. (5): multi-label soft-margin on logits z (B, C) with smoothed labels y (B, C)."""
    # Impl. (lucasdavid/wsss-csrm, scripts/ss/train_csrm.py): y~ = (1 - eps) y + eps / 2; Eq. (5)
    # as printed applies the sigmoid twice, the code feeds logits.
    y_s = (1 - eps) * y + eps / 2
    # Eq. (5)  L_c = -1/|C| sum_c [y~ log sigmoid(z) + (1 - y~) log(1 - sigmoid(z))], mean over images
    return F.multilabel_soft_margin_loss(cls_logits.float(), y_s)


def loss_seg(S, PL, eps):
    """Eq. (7): cross-entropy of the student's S (B, C+1, H, W) on reliable PL (B, H, W) pixels."""
    # Impl. (wsss-csrm): only images whose PL holds a foreground pixel count.
    has_fg = ((PL > 0) & (PL != 255)).flatten(1).any(1)
    if not has_fg.any():
        return S.sum() * 0
    # Eq. (7)  L_s = -1/|M^p| sum_hw M^p sum_c I log s  (batch-level mean, smoothing eps; Deviation 7)
    return F.cross_entropy(S[has_fg].float(), PL[has_fg], ignore_index=255, label_smoothing=eps)


def loss_s2c(S, A, P_t, sigma, eps):
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


def entropy(prob):
    """Eq. (10): H = -sum_c s log s over all classes, float32; prob (B, K, ...) -> (B, ...)."""
    prob = prob.float()
    # Eq. (10)  H_hw = -sum_c s_c log s_c  (log(p + 1e-10) as in U2PL)
    return -(prob * torch.log(prob + 1e-10)).sum(1)


def quantile(t, q):
    """np.percentile-style linear quantile via kthvalue (torch.quantile fails above 16M elements)."""
    flat = t.detach().flatten().float()
    pos = q * (flat.numel() - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def loss_unsup(S_u, Yhat_u, H_u, rho):
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
    """Per-class FIFO queues of negative keys (U2PL memobank): the oldest keys leave first.

    Each queue is a ring buffer on the keys' device, so a push costs its own keys only: U2PL's CPU queues
    (torch.cat of the whole queue each push, then a copy to the GPU to sample) move ~0.7 GB per step at the
    paper's bank sizes (tests/bench/paper_step.py). The contents and the FIFO order are U2PL's."""

    def __init__(self, num_classes, dim, cap, cap_bg):
        self.caps, self.dim = [cap_bg] + [cap] * (num_classes - 1), dim
        self.buffers = [None] * num_classes  # (cap, dim), allocated at the first push
        self.heads = [0] * num_classes  # next row to overwrite = the oldest key once full
        self.sizes = [0] * num_classes

    def push(self, c, keys):
        keys = keys.detach().float()[-self.caps[c]:]  # (n, dim); only the newest cap keys can stay
        if self.buffers[c] is None or self.buffers[c].device != keys.device:
            old = self._ordered(c)
            self.buffers[c] = keys.new_zeros(self.caps[c], self.dim)
            self.heads[c] = self.sizes[c] = 0
            if len(old):
                self.push(c, old.to(keys.device))
        first = min(len(keys), self.caps[c] - self.heads[c])  # up to the end of the buffer, then from row 0
        self.buffers[c][self.heads[c]:self.heads[c] + first] = keys[:first]
        self.buffers[c][:len(keys) - first] = keys[first:]
        self.heads[c] = (self.heads[c] + len(keys)) % self.caps[c]
        self.sizes[c] = min(self.sizes[c] + len(keys), self.caps[c])

    def keys(self, c):
        """The queue's keys in storage order (n, dim), without a copy: what L_m samples from."""
        return self.buffers[c][: self.sizes[c]] if self.sizes[c] else torch.zeros(0, self.dim)

    def _ordered(self, c):
        return torch.roll(self.keys(c), -self.heads[c] if self.sizes[c] == self.caps[c] else 0, 0)

    @property
    def queues(self):
        """Oldest first, one (n, dim) tensor per class (a copy)."""
        return [self._ordered(c) for c in range(len(self.caps))]

    def state_dict(self):
        return {"queues": [q.cpu() for q in self.queues]}

    def load_state_dict(self, state):
        self.buffers, self.heads, self.sizes = [None] * len(self.caps), [0] * len(self.caps), [0] * len(self.caps)
        for c, q in enumerate(state["queues"]):
            if len(q):
                self.push(c, q)


def gather_rows(t, mask, index=None):
    """Rows t[b, :, y, x] (n, D) at mask pixels (optionally the index-th of them) without permuting t."""
    b, yy, xx = mask.nonzero(as_tuple=True)
    if index is not None:
        b, yy, xx = b[index], yy[index], xx[index]
    return t[b, :, yy, xx]


def negative_rank_mask(rank_c, labels4, present_c, c, n_l, rank_low, rank_high):
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


def loss_contrast(rep, rep_t, prob4, labels4, low, high, present_u, n_l, bank, args):
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
        # banks stay identical across DDP ranks (U2PL's gather_together); every rank calls, even with no keys
        keys = all_gather_cat(gather_rows(rep_t, neg, pick))
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
        keys = bank.keys(c)
        if n_q == 0 or len(keys) == 0:
            continue
        anchor = gather_rows(rep, query_pools[qi], torch.randint(n_q, (args.queries,), device=rep.device))  # (P, D)
        negs = keys[torch.randint(len(keys), (args.queries * args.negatives,), device=keys.device)].to(rep.device)
        negs = negs.view(args.queries, args.negatives, -1)  # (P, N, D)
        keys_all = torch.cat([protos[qi].view(1, 1, -1).expand(args.queries, 1, -1), negs], 1)  # (P, 1+N, D)
        # Eq. (13)  -log e^{<r, r+>/tau} / (e^{<r, r+>/tau} + sum_j e^{<r, r-_j>/tau}), cosine <.,.>
        logits = F.cosine_similarity(anchor.float().unsqueeze(1), keys_all, dim=2) / args.tau  # (P, 1+N)
        loss = loss + F.cross_entropy(logits, torch.zeros(args.queries, dtype=torch.long, device=rep.device))
    # Eq. (13)  mean over classes (valid classes without queries or keys count as 0, as in U2PL)
    return loss / len(valid_classes)


# ==================================================================================================
# Pseudo labels
# ==================================================================================================
# Sec. 3.2.2-3.2.4 (training pseudo labels, mixing, schedules), Sec. 4 (inference CAMs)
def normalize_cam(A):
    """Eq. (2) without the upsampling: psi(A) = ReLU(A) / max_hw ReLU(A), per image and class; A (B, C, h, w).
    Callers upsample afterwards (official order; Deviation 20)."""
    A = F.relu(A.float())
    # Eq. (2)  divide by the per-class spatial max (+1e-5 so absent classes stay exactly 0)
    return A / (A.amax((2, 3), keepdim=True) + 1e-5)


def _crf_pair(job):
    rgb, maps, n_labels, params = job
    return np.stack([crf.refine_labels(rgb, m, n_labels, gt_prob=0.7, **params) for m in maps])


def cam_pseudo_labels(rgb, y, A_t, bg_thr, fg_thr, crf_params, pool=None, on_device=False):
    """Eq. (6) in the official order (Deviation 18): teacher CAMs -> psi -> two thresholds -> two label dCRFs ->
    {class, background, 255} pseudo labels.

    rgb: the augmented crops, uint8 (B, H, W, 3); y: image labels (B, C); A_t: teacher CAM logits
    (B, C, h, w); crf_params None runs Eq. (6) without the CRF; on_device runs the CRFs in torch on A_t's
    device (Deviation 27), else pydensecrf on the host (official), through `pool` when given. An image without
    labels gets all background. Returns int64 (B, H, W) on A_t's device."""
    H, W = rgb.shape[1:3]
    psi = normalize_cam(A_t * y[:, :, None, None])  # Eq. (2) at stride 16 on the label-masked CAMs
    # the present classes: one copy to the host and one back per batch, not a nonzero + copy per image
    present = torch.nonzero(y.cpu() > 0.5)  # (n, 2) rows (image, class), image-major
    keys_dev = present[:, 1].to(psi.device)
    ends = torch.bincount(present[:, 0], minlength=len(psi)).cumsum(0).tolist()
    maps, keys_all = [], []
    for i in range(len(psi)):
        start = ends[i - 1] if i else 0
        keys = keys_dev[start:ends[i]]  # present classes (m,) on the device
        m = torch.zeros(2, H, W, dtype=torch.uint8, device=psi.device)  # (fg, bg): 0 = background, j = keys[j - 1]
        if len(keys):
            # bilinear (align_corners) to the crop, the present classes only: (m, H, W)
            s = F.interpolate(psi[i:i + 1, keys], size=(H, W), mode="bilinear", align_corners=True)[0]
            # Eq. (6)  argmax[delta, psi_k1..psi_km]: ties go to index 0, so "> delta" is foreground, labelled with
            # the first most active class (torch.max returns the first maximum; 10x faster than argmax on CPU).
            # Label indices in uint8: a quarter of the memory traffic of int64.
            if len(keys) == 1:  # most images: no max over classes needed
                torch.gt(s[0], fg_thr, out=m[0]), torch.gt(s[0], bg_thr, out=m[1])
            else:
                best, top = s.max(0)
                top = (top + 1).to(torch.uint8)
                m = torch.stack([torch.where(best > thr, top, 0) for thr in (fg_thr, bg_thr)])
        maps.append(m)
        keys_all.append([0] + (present[start:ends[i], 1] + 1).tolist())  # label index -> class id (host, no sync)
    if crf_params is not None and on_device:
        rgb = torch.as_tensor(rgb).to(A_t.device)
        maps = [crf.refine_labels_torch(rgb[i], m, len(ids), gt_prob=0.7, **crf_params)
                for i, (m, ids) in enumerate(zip(maps, keys_all))]
    elif crf_params is not None:
        rgb = np.asarray(rgb)
        jobs = [(np.array(rgb[i]), m.cpu().numpy(), len(ids), crf_params) for i, (m, ids) in enumerate(zip(maps, keys_all))]
        maps = [torch.from_numpy(r).to(A_t.device) for r in (pool.map if pool is not None else map)(_crf_pair, jobs)]
    # uint8 holds every class id: ids stay below 255, the ignore index of the whole project
    PL = torch.empty(len(psi), H, W, dtype=torch.uint8, device=A_t.device)
    for i, ((fg, bg), ids) in enumerate(zip(maps, keys_all)):
        # Eq. (6)  M^p: class where the fg map says so; background where both say background;
        # the uncertainty band (delta_bg, delta_fg] is 255
        torch.ne(bg, 0, out=PL[i]).mul_(255)
        for j in range(1, len(ids)):
            PL[i].masked_fill_(fg == j, ids[j])
    return PL.long()  # (B, H, W)


def crf_on_device(args, device):
    """--train-crf: where the per-step label dCRFs run (Deviation 27); auto = torch on CUDA, pydensecrf on CPU."""
    return args.train_crf == "torch" or (args.train_crf == "auto" and torch.device(device).type == "cuda")


def classmix(x, y, PL, S_t):
    """ClassMix (Olsson et al. 2021, paper-era csrm/data_utils.py; Deviation 10).

    For each image a, a partner b != a; half of b's foreground PL classes (at least one) are pasted
    from the UN-MIXED b into a through one mask shared by the image, PL and S_t; y_a gains them."""
    n = x.shape[0]
    partner = (torch.arange(n) + torch.randint(1, n, (n,))) % n if n > 1 else torch.zeros(1, dtype=torch.long)
    x_m, y_m, PL_m, S_m = x.clone(), y.clone(), PL.clone(), S_t.clone()
    for a in range(n):
        b = int(partner[a])
        if b == a:
            continue
        counts = torch.bincount(PL[b].flatten(), minlength=256)  # cheaper than sorting for torch.unique
        classes = counts[1:255].nonzero()[:, 0].add(1).tolist()  # b's foreground PL classes
        if not classes:
            continue
        order = torch.randperm(len(classes))[: max(len(classes) // 2, 1)]
        selected = torch.tensor([classes[int(k)] for k in order], device=PL.device)
        M = torch.isin(PL[b], selected)  # (H, W) the one shared mask
        x_m[a] = torch.where(M, x[b], x[a])
        PL_m[a] = torch.where(M, PL[b], PL[a])
        S_m[a] = torch.where(M, S_t[b], S_t[a])
        y_m[a, selected - 1] = 1  # labels are only ever added
    return x_m, y_m, PL_m, S_m


def restricted_probs(S_t, y):
    """s^t: Eq. (3)'s softmax restricted to background + image classes and renormalised (official; Deviation
    17; Eq. (3) itself has no restriction); (B, C+1, H, W)."""
    keep = torch.cat([torch.ones_like(y[:, :1]), y], 1)[:, :, None, None] > 0.5  # (B, C+1, 1, 1)
    # Impl. (wsss-csrm): s = softmax_c(S) * [1 | y] / sum, computed as a softmax over the kept logits only,
    # which stays exact when an absent class dominates (the product form underflows to 0 / 0)
    return torch.softmax(S_t.float().masked_fill(~keep, float("-inf")), 1)


def aux_weights(args, epoch):
    """Eq. (14) lambdas: 0 during warm-up; lambda_s2c ramps 0.1 -> 1 (Sec. 4, official linear_schedule)."""
    if epoch < args.warmup_epochs:
        return 0.0, 0.0, 0.0
    span = max(args.epochs - args.warmup_epochs, 1)
    ramp = args.s2c_ramp_start + (1 - args.s2c_ramp_start) * (epoch - args.warmup_epochs) / span
    return (args.w_s2c * ramp * args.s2c, args.w_u * args.u, args.w_m * args.m)


def unreliable_ratio(args, epoch):
    """Sec. 4: alpha_t = rho_t = 20% at epoch 0, decreasing linearly towards 0, one step per epoch (Deviation 21)."""
    return args.unreliable * (1 - epoch / args.epochs)


@torch.no_grad()
def tta_cams(model, x, scales, flip):
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
def tta_seg(model, x, scales, flip):
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


# --- SEPL (Table 2 rows 4-5): SAM Enhanced Pseudo-Labels, Chen et al. 2023, arXiv 2305.05803 ---
def load_sam(args):
    """The SAM of --sam-ckpt with the --sam-model architecture, on the CPU until the pseudo labels need it. A missing
    package, a foreign file or another architecture ends in one line, before anything is written."""
    what = f"--sam-ckpt {args.sam_ckpt}"
    state = state_dict_of(load_checkpoint(args.sam_ckpt, "--sam-ckpt"), what)
    check(any(k.startswith("image_encoder.") for k in state),
          f"{what} holds no SAM weights (no image_encoder.* keys); give e.g. sam_vit_h_4b8939.pth")
    try:
        import segment_anything  # only --sepl needs the package
    except ImportError:
        fail("--sepl needs the segment-anything package: pip install segment-anything")
    # checkpoint=None: the registry's own torch.load would unpickle the file without weights_only
    sam = segment_anything.sam_model_registry[args.sam_model](checkpoint=None)
    load_weights(sam, state, f"{what} (--sam-model {args.sam_model})")
    return sam.eval()


def sam_mask_generator(sam, args, device):
    """SAM's automatic mask generator as the official runner used it (segment-anything scripts/amg.py: the
    generator's defaults, binary masks), with --sam-points prompts per side; .generate(rgb (H, W, 3) uint8)."""
    from segment_anything import SamAutomaticMaskGenerator
    return SamAutomaticMaskGenerator(sam.to(device), points_per_side=args.sam_points)


def sepl_merge(label, sam_masks, sam_ratio, label_ratio):
    """SEPL: the pseudo labels choose and name class-agnostic SAM masks; label (H, W) uint8 class ids, sam_masks
    a list of (H, W) bool masks of one image -> (H, W) uint8.

    For each foreground class c in ascending id order, m_c = its pixels, over the SAM masks s not yet taken:
      keep s for c if |s & m_c| > sam_ratio |s|  or  |s & m_c| >= label_ratio |m_c|   (then s is taken);
      class c = union of its kept masks + the pixels of m_c that none of these masks covers.
    Everything else is background (255 and class pixels under a mask that was not kept included)."""
    S = np.asarray(sam_masks, bool).reshape(-1, *label.shape)  # (N, H, W)
    area_s = S.sum((1, 2))  # |s|  (N,)
    free = np.ones(len(S), bool)  # masks not taken by a lower class id
    out = np.zeros_like(label)
    # Impl. (cskyl/SAM_WSSS, merge/max_iou_imp2.py MaxIoU_IMP2.merge, the default of main.py); classes are
    # painted in ascending id order, so where kept masks of two classes overlap the higher id wins
    for c in (int(c) for c in np.unique(label) if c not in (0, 255)):  # 255 is no class: it claims no mask
        m = label == c
        inter = (S & m).sum((1, 2))  # |s & m_c|  (N,)
        # Impl. (SAM_WSSS): 2 |s & m| - |s| > 0 (the class fills more than half of the mask), or
        # improve_pred_thresh = |s & m| / |m| >= 0.85 (the mask holds most of the class)
        keep = free & ((inter > sam_ratio * area_s) | (inter >= label_ratio * m.sum()))
        # Impl. (SAM_WSSS): "Trust CAM if SAM has no prediction on that pixel", among the masks still free
        uncovered = ~S[free].any(0)  # (H, W)
        out[S[keep].any(0) | (m & uncovered)] = c
        free &= ~keep
    return out


# ==================================================================================================
# Train
# ==================================================================================================
def make_transform(args, kind, target=None):
    """kind: 'strong' (CSRM l-half), 'weak' (u-half: pad + crop), 'cam' / 'seg' (rescale, crop, flip);
    target: the sample's map that follows the geometry into out["mask"] ("pseudo", or the ground truth "mask")."""
    def transform(sample, rng):
        image, masks = sample["image"], ((sample[target],) if target else ())
        if kind != "weak":
            image, masks, _ = augment.random_rescale(image, rng, masks=masks, ratio_range=(args.scale_min, args.scale_max))
        # Impl. (lucasdavid/PNOC, batch_transform): images are reflect-padded to the crop, labels 255
        image, masks, _, _ = augment.random_crop(image, rng, size=args.crop, masks=masks, image_fill="reflect")
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


def augmented_split(ctx, kind, target=None, seed=0, **kw):
    return data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, seed=ctx.args.seed + seed,
                           transform=make_transform(ctx.args, kind, target), **kw)


def foreground_indices(ds):
    """Images without foreground labels are skipped (official: ignore_bg_images)."""
    return [int(i) for i in np.nonzero(ds.labels().sum(1) > 0)[0]]


def build_optimizer(model, pretrained_params, lr, wd, new_mult, kind="sgd"):
    """Sec. 4: pretrained parts at lr, new layers at new_mult x lr; Nesterov SGD, weight decay on weights only
    (official). kind="adamw": the same groups in AdamW (--optimizer, tried on the toy: Deviation 16)."""
    pre = {id(p) for p in pretrained_params}
    groups = {(a, b): [] for a in (True, False) for b in (True, False)}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups[(id(p) in pre, n.endswith("bias"))].append(p)
    param_groups = [{"params": ps, "lr": lr * (1 if is_pre else new_mult), "weight_decay": 0.0 if is_bias else wd}
                    for (is_pre, is_bias), ps in groups.items() if ps]
    if kind == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr)
    return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, nesterov=True)


def stage_iters(args, nominal):
    return min(nominal, args.max_iters or nominal)


# --- Stage 0: plain CAM classifier (card 9) ---
def train_cam(ctx, cam_net):
    """Backbone + 1x1 classifier with the multi-label soft-margin loss; BN trains normally here. With
    --init-ckpt nothing is trained; the start point's CAMs are scored either way (Table 2 row 1)."""
    args = ctx.args
    ctx.reseed(1)
    if not args.init_ckpt:
        ds = augmented_split(ctx, "cam")
        idx = foreground_indices(ds)
        total = stage_iters(args, args.cam_epochs * max(len(idx) // args.cam_batch, 1))
        # Impl. (lucasdavid/PNOC, scripts/cam/train_vanilla.py): classifier x10, backbone biases x2, no decay
        named = list(cam_net.backbone.named_parameters())
        opt = torch.optim.SGD([
            {"params": [p for n, p in named if not n.endswith("bias")], "lr": args.cam_lr, "weight_decay": args.wd},
            {"params": [p for n, p in named if n.endswith("bias")], "lr": 2 * args.cam_lr, "weight_decay": 0.0},
            {"params": list(cam_net.classifier.parameters()), "lr": 10 * args.cam_lr, "weight_decay": args.wd},
        ], lr=args.cam_lr, momentum=0.9, weight_decay=args.wd)
        net = ctx.wrap(cam_net).train()

        def step(batch, it):
            with ctx.autocast():
                z = net(batch["image"])["cls_logits"]
            # Eq. (5) without smoothing: the plain CAM pretraining loss
            loss = loss_cls(z, batch["label"], 0.0)
            check_finite({"losses/cls": loss.item()}, it + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"losses/cls": loss.item()}
        train_loop(ctx, "cam", ds, args.cam_batch, total, step, {"model": cam_net, "optimizer": opt},
                   lr=lambda it: poly_lr(it, total), salt=1, indices=idx)
    # Table 2 row 1 reports the start point on train and val (Deviation 26)
    results = {"cam_init/train": cam_miou(ctx, cam_net, ctx.splits["seed"]),
               "cam_init/val": cam_miou(ctx, cam_net, ctx.splits["val"])} if ctx.main else None
    # checkpoints/cam.pt, a reusable start point: --init-ckpt <run>/checkpoints/cam.pt
    ctx.finish_stage("cam", results=results, trained=not args.init_ckpt,
                     weights={"backbone": cam_net.backbone.state_dict(), "classifier": cam_net.classifier.state_dict()})


# --- Stage 1: CSRM training (Sec. 3.2, Sec. 4) ---
def train_step(args, student, teacher, optimizer, bank, batch_l, batch_u, step, autocast=contextlib.nullcontext,
               pool=None):
    """One CSRM iteration (card 2): two teacher passes, ClassMix, Eq. (14), SGD step, EMA.

    step: 0-based iteration. Returns the logged scalars."""
    B = batch_l["image"].shape[0]
    x = torch.cat([batch_l["image"], batch_u["image"]])  # (2B, 3, H, W)
    y = torch.cat([batch_l["label"], batch_u["label"]]).float()  # (2B, C)
    rgb = torch.cat([batch_l["rgb"], batch_u["rgb"]])  # (2B, H, W, 3) uint8 crops for the dCRF
    epoch = step // args.steps_per_epoch
    w_s2c, w_u, w_m = aux_weights(args, epoch)
    crf_params = {**crf.PRESETS["irn"], "n_iters": args.crf_iters} if args.crf_iters > 0 else None

    # Teacher pass 1 (eval mode, un-mixed input): pseudo labels and the logits that get mixed
    teacher.eval()
    with torch.no_grad(), autocast():
        out_t = teacher(x, seg=True, rep=False)
    A_t, S_t = out_t["cam"].float(), out_t["seg"].float()
    PL = cam_pseudo_labels(rgb, y, A_t, args.bg_thr, args.fg_thr, crf_params, pool,
                           crf_on_device(args, A_t.device))  # (2B, H, W)
    present_u = torch.cat([torch.ones_like(y[B:, :1]), y[B:]], 1) > 0.5  # un-mixed loader labels (B, K)
    mixed = bool(torch.rand(()) < args.mix_prob)  # one draw per step for the whole batch
    if mixed:
        x, y, PL, S_t = classmix(x, y, PL, S_t)
    P_t = restricted_probs(S_t, y)  # (2B, K, H, W)
    Yhat_t = P_t.argmax(1)  # (2B, H, W), never an absent class

    use_rep = w_m > 0
    student.train()
    with autocast():
        out = student(x, seg=True, rep=use_rep)
    S, A = out["seg"], out["cam"]

    losses = {"losses/cls": loss_cls(out["cls_logits"], y, args.label_smoothing),
              # Deviation 7: L_s on the l-half only (official runner); the u-half's S learns from L_u alone
              "losses/seg": loss_seg(S[:B], PL[:B], args.label_smoothing)}
    if w_s2c > 0:
        losses["losses/s2c"] = loss_s2c(S, A, P_t, args.s2c_sigma, args.label_smoothing)
    if w_u > 0 or w_m > 0:
        # Teacher pass 2 (train mode, dropout on, mixed input): entropies, ranks and keys
        teacher.train()
        with torch.no_grad(), autocast():
            out_t2 = teacher(x, seg=True, rep=use_rep)
        rho = unreliable_ratio(args, epoch)
        if w_u > 0:
            # Eq. (10) on the full-resolution u-half
            H_u = entropy(torch.softmax(out_t2["seg"][B:].float(), 1))  # (B, H, W)
            losses["losses/u"] = loss_unsup(S[B:], Yhat_t[B:], H_u, rho)
        if w_m > 0:
            prob4 = torch.softmax(out_t2["seg4"].float(), 1)  # (2B, K, h4, w4), unrestricted
            h4 = prob4.shape[-2:]
            down = lambda t: F.interpolate(t[:, None].float(), size=h4, mode="nearest")[:, 0].long()  # noqa: E731
            labels4 = torch.cat([down(PL[:B]), down(Yhat_t[B:])])  # (2B, h4, w4)
            # Eq. (10) at stride 4; Eq. (11) quantiles over the u-half's pixels
            H4_u = entropy(prob4[B:])
            low_u, high_u = H4_u < quantile(H4_u, rho), H4_u >= quantile(H4_u, 1 - rho)
            # Deviation 19 (official U2PL split): on the l-half every reliable PL pixel is both low and high
            sure_l = labels4[:B] != 255
            low, high = torch.cat([sure_l, low_u]), torch.cat([sure_l, high_u])
            losses["losses/m"] = loss_contrast(out["rep"], out_t2["rep"], prob4, labels4, low, high, present_u, B, bank, args)
    # Eq. (14)  L = L_c + L_s + l_s2c L_s2c + l_u L_u + l_m L_m
    weights = {"losses/cls": 1.0, "losses/seg": 1.0, "losses/s2c": w_s2c, "losses/u": w_u, "losses/m": w_m}
    total = sum(weights[k] * v for k, v in losses.items())
    losses["losses/total"] = total
    stats = {k: v.item() for k, v in losses.items()}
    check_finite(stats, step + 1)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], args.grad_clip)
    optimizer.step()
    ema_update(teacher, unwrap(student), step + 1, args)

    reliable = (PL[:B] != 255).float().mean().item()
    return {**stats, "pl/reliable": reliable, "mixed": int(mixed),
            "w/s2c": w_s2c, "w/u": w_u, "w/m": w_m}


def train_csrm(ctx, num_classes):
    """Sec. 4: E "epochs" of S_e steps, two loaders (augmented l-half, plain u-half), poly SGD; the final
    teacher goes to checkpoints/csrm.pt."""
    args = ctx.args
    ds_l, ds_u = augmented_split(ctx, "strong"), augmented_split(ctx, "weak", seed=1)
    val_set = data.SegDataset(ctx.spec.root, ctx.splits["seed"], dataset=ctx.spec.dataset, seed=args.seed)
    ctx.reseed(3)
    student, teacher = (m.to(ctx.device) for m in build_model(args, num_classes, ctx.stage_weights("cam")))
    optimizer = build_optimizer(student, student.pretrained_parameters(), args.lr, args.wd, args.lr_new_mult,
                                args.optimizer)
    bank = MemoryBank(num_classes + 1, args.rep_dim, args.bank, args.bank_bg)
    total = stage_iters(args, args.epochs * args.steps_per_epoch)
    net = ctx.wrap(student)
    host_crf = args.crf_workers > 0 and args.crf_iters > 0 and not crf_on_device(args, ctx.device)
    pool = ThreadPool(args.crf_workers) if host_crf else None  # the host dCRFs' threads, only when they run

    def step(batch, it):
        if it == 0 and ctx.main:  # the start point, then per-epoch validation of the teacher (official: VOC train)
            ctx.log({"stage": "csrm", "epoch": 0, **validate_teacher(args, teacher, val_set, ctx.device)})
        stats = train_step(args, net, teacher, optimizer, bank, batch["l"], batch["u"], it, ctx.autocast, pool)
        if (it + 1) % args.steps_per_epoch == 0 or it + 1 == total:
            if ctx.main:
                ctx.log({"stage": "csrm", "epoch": (it + 1) / args.steps_per_epoch,
                         **validate_teacher(args, teacher, val_set, ctx.device)})
            barrier()
        return stats
    try:
        train_loop(ctx, "csrm", {"l": ds_l, "u": ds_u}, args.batch_size, total, step,
                   {"student": student, "teacher": teacher, "optimizer": optimizer, "bank": bank},
                   lr=lambda it: poly_lr(it, total), salt=3, indices=foreground_indices(ds_l))
    finally:
        if pool is not None:
            pool.close()
    ctx.finish_stage("csrm", weights={"teacher": teacher.state_dict()})


# --- Stage 3: verification (Sec. 4), a segmentation network trained on the pseudo labels ---
def train_verify(ctx, seg_net, pl_dir, keep):
    """DeepLabV3+ on the train pseudo labels (PNOC scripts/segmentation/train.py settings); --supervision full:
    on the ground-truth masks. The last stage: its weights (and `keep`) are what --eval-only reads."""
    args = ctx.args
    full = args.supervision == "full"
    ds = augmented_split(ctx, "seg", "mask" if full else "pseudo", extra_dirs=None if full else {"pseudo": pl_dir})
    ctx.reseed(5)
    if args.seg_init == "cam":
        # Deviation 15 (toy): no ImageNet weights exist there, so the stage-0 backbone stands in for them
        load_weights(seg_net.backbone, ctx.stage_weights("cam")["backbone"], "the stage-0 backbone")
    if args.seg_optimizer == "sgd":
        opt = build_optimizer(seg_net, seg_net.backbone.parameters(), args.seg_lr, args.seg_wd, args.lr_new_mult)
    else:  # Deviation 16 (toy)
        opt = torch.optim.AdamW(seg_net.parameters(), lr=args.seg_lr, weight_decay=0.01)
    total = stage_iters(args, args.seg_epochs * max(len(ds) // args.seg_batch, 1))
    net = ctx.wrap(seg_net).train()

    def step(batch, it):
        with ctx.autocast():
            logits = net(batch["image"])
        # PNOC scripts/segmentation/train.py: cross-entropy, ignore 255, label smoothing
        loss = F.cross_entropy(logits.float(), batch["mask"], ignore_index=255, label_smoothing=args.label_smoothing)
        check_finite({"losses/seg": loss.item()}, it + 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"losses/seg": loss.item()}
    train_loop(ctx, "verify", ds, args.seg_batch, total, step, {"model": seg_net, "optimizer": opt},
               lr=lambda it: poly_lr(it, total), salt=5)
    ctx.finish_stage("verify", weights={**keep, "seg": seg_net.state_dict()}, final=True)


# ==================================================================================================
# Evaluate
# ==================================================================================================
# Sec. 4, card 7
def image_tensor(image, device):
    return torch.as_tensor(augment.to_tensor(np.ascontiguousarray(image)))[None].to(device)  # (1, 3, H, W)


# Deviation 26: the swept CAM scores are oracles; metrics.json carries this note next to them
CAM_THRESHOLD_NOTE = ("miou: best background threshold of a sweep scored on this split's own ground truth "
                      "(val included; optimistic)")


def sweep_0_80(num_classes):
    return miou.ThresholdSweep(num_classes, thresholds=np.round(np.arange(0.05, 0.801, 0.05), 2))


@torch.no_grad()
def validate_teacher(args, teacher, ds, device):
    """Per-epoch validation (official): CAM mIoU at the best threshold of 0.10-0.45 (swept on the ground truth,
    an oracle; logged only, never used for selection), seg-branch mIoU. Not official: the seg branch's mIoU with
    the argmax restricted to background + the image's labels (s^t, what L_s2c copies into the CAM), which is the
    one to set against the CAM's, since the CAM is scored knowing the labels too."""
    teacher.eval()
    sweep = miou.ThresholdSweep(ds.num_classes, thresholds=np.round(np.arange(0.10, 0.451, 0.05), 2))
    cm, cm_restricted = miou.ConfusionMatrix(ds.num_classes), miou.ConfusionMatrix(ds.num_classes)
    for i in range(min(args.val_images, len(ds))):
        sample = ds[i]
        x = image_tensor(sample["image"], device)
        out = teacher(x, seg=True, rep=False)
        keys = np.nonzero(sample["label"] > 0.5)[0]
        cams = normalize_cam(out["cam"])[0, keys]
        cams = F.interpolate(cams[None], size=x.shape[-2:], mode="bilinear", align_corners=False)[0]
        sweep.update(cams.cpu().numpy(), keys + 1, sample["mask"])
        cm.update(out["seg"][0].argmax(0).cpu().numpy(), sample["mask"])
        y = torch.as_tensor(sample["label"], device=device)[None]  # (1, C)
        cm_restricted.update(restricted_probs(out["seg"], y)[0].argmax(0).cpu().numpy(), sample["mask"])
    res = sweep.compute()
    return {"val/cam_miou": 100 * float(res["best"]["miou"]), "val/cam_thr": res["best_threshold"],
            "val/seg_miou": 100 * float(cm.compute()["miou"]),
            "val/seg_restricted_miou": 100 * float(cm_restricted.compute()["miou"])}


@torch.no_grad()
def cam_miou(ctx, model, split):
    """Threshold-swept CAM mIoU of a stage-0 CAMNet (Table 2 row 1: the start point)."""
    ds = data.SegDataset(ctx.spec.root, split, dataset=ctx.spec.dataset, seed=ctx.args.seed)
    sweep = sweep_0_80(ds.num_classes)
    model.eval()
    for sample in each_sample(ctx, ds, "stage-0 CAMs"):
        keys = np.nonzero(sample["label"] > 0.5)[0]
        cams = tta_cams(model, image_tensor(sample["image"], ctx.device), ctx.args.tta_scales, ctx.args.tta_flip)[keys]
        cams = cams / (cams.amax((1, 2), keepdim=True) + 1e-5)
        sweep.update(cams.cpu().numpy(), keys + 1, sample["mask"])
    sw = sweep.compute()
    return miou_entry(sw["best"], ds.class_names, threshold=sw["best_threshold"], threshold_selection=CAM_THRESHOLD_NOTE)


# --- Stage 2: pseudo labels of the final teacher (Sec. 4 inference) and their scores ---
@torch.no_grad()
def make_pseudo_labels(ctx, teacher, out_dir, sam=None):
    """TTA CAMs of the teacher -> present classes / max -> threshold -> dCRF -> PNG (-> SEPL with --sepl; sam:
    the network of load_sam()).

    Writes pseudo_labels/{pseudo,pseudo_crf,pseudo_sepl}/<split>/<id>.png; returns cam/, pseudo/, pseudo_crf/,
    pseudo_sepl/ metrics on the seed split and val (GT never used for anything but scoring)."""
    args = ctx.args
    teacher.eval()
    crf_params = {**crf.PRESETS["irn"], "n_iters": args.crf_iters} if args.pl_crf and args.crf_iters > 0 else None
    generator = sam_mask_generator(sam, args, ctx.device) if args.sepl else None
    seed_ids = set(data.split_ids(ctx.spec.root, ctx.splits["seed"], dataset=ctx.spec.dataset))
    results = {}
    for split, key in ((ctx.splits["train"], "train"), (ctx.splits["val"], "val")):
        ds = data.SegDataset(ctx.spec.root, split, dataset=ctx.spec.dataset, seed=args.seed)
        K, names = ds.num_classes, ds.class_names
        sweep, (cm, cm_crf, cm_sepl) = sweep_0_80(K), (miou.ConfusionMatrix(K) for _ in range(3))
        for sample in each_sample(ctx, ds, f"pseudo labels {split}"):
            name, image = sample["name"], sample["image"]
            keys = np.nonzero(sample["label"] > 0.5)[0]
            cams = tta_cams(teacher, image_tensor(image, ctx.device), args.tta_scales, args.tta_flip)[keys]  # (m, H, W)
            cams = (cams / (cams.amax((1, 2), keepdim=True) + 1e-5)).cpu().numpy()
            # background score pl_thr, argmax over [bg, present classes]; index -> class id
            idx = np.concatenate([np.full((1,) + image.shape[:2], args.pl_thr, np.float32), cams]).argmax(0)
            ids = np.concatenate([[0], keys + 1]).astype(np.uint8)
            label = ids[idx]
            data.save_mask(out_dir / "pseudo" / split / f"{name}.png", label)
            if crf_params is not None:
                # np.array copy: pydensecrf rejects read-only buffers
                label_crf = ids[crf.refine_labels(np.array(image), idx, len(ids), gt_prob=0.7, **crf_params)]
                data.save_mask(out_dir / "pseudo_crf" / split / f"{name}.png", label_crf)
            if generator is not None:
                # Table 2 row 5 "CSRM + dCRF + SEPL": SAM refines the dCRF label when the CRF runs (the official
                # runner fed SAM_WSSS the pseudos-t0.4-c10 folder), else the plain one
                masks = [r["segmentation"] for r in generator.generate(np.ascontiguousarray(image))]
                label_sepl = sepl_merge(label_crf if crf_params is not None else label, masks, args.sepl_sam_ratio,
                                        args.sepl_label_ratio)
                data.save_mask(out_dir / "pseudo_sepl" / split / f"{name}.png", label_sepl)
            if "mask" in sample and (key == "val" or name in seed_ids):
                sweep.update(cams, keys + 1, sample["mask"])
                cm.update(label, sample["mask"])
                if crf_params is not None:
                    cm_crf.update(label_crf, sample["mask"])
                if generator is not None:
                    cm_sepl.update(label_sepl, sample["mask"])
        if key == "train" or split != ctx.splits["train"]:
            sw = sweep.compute()
            results[f"cam/{key}"] = miou_entry(sw["best"], names, threshold=sw["best_threshold"],
                                               threshold_selection=CAM_THRESHOLD_NOTE,
                                               curve=[[float(t), round(100 * float(m), 2)] for t, m in sw["curve"]])
            results[f"pseudo/{key}"] = miou_entry(cm.compute(), names, threshold=args.pl_thr)
            if crf_params is not None:
                results[f"pseudo_crf/{key}"] = miou_entry(cm_crf.compute(), names, threshold=args.pl_thr)
            if generator is not None:
                results[f"pseudo_sepl/{key}"] = miou_entry(cm_sepl.compute(), names, threshold=args.pl_thr)
    return results


@torch.no_grad()
def evaluate(ctx, seg_net, teacher, ds, pl_dir):
    """seg/val (single scale) and seg_ms/val (TTA scales + flip) of the verification network, and vis/val.png:
    image | teacher CAM | pseudo label | prediction | ground truth (no CAM / pseudo label without a teacher)."""
    args = ctx.args
    seg_net.eval()
    cm, cm_ms = miou.ConfusionMatrix(ds.num_classes), miou.ConfusionMatrix(ds.num_classes)
    rows = []
    for sample in each_sample(ctx, ds, "seg/val"):
        x = image_tensor(sample["image"], ctx.device)
        pred = tta_seg(seg_net, x, [1.0], False).argmax(0).cpu().numpy()
        cm.update(pred, sample["mask"])
        cm_ms.update(tta_seg(seg_net, x, args.tta_scales, args.tta_flip).argmax(0).cpu().numpy(), sample["mask"])
        if len(rows) < args.vis:
            row = [sample["image"]]
            if teacher is not None:
                keys = np.nonzero(sample["label"] > 0.5)[0]
                cams = tta_cams(teacher, x, [1.0], False)[keys]
                heat = (cams / (cams.amax((1, 2), keepdim=True) + 1e-5)).amax(0).cpu().numpy() if len(keys) \
                    else np.zeros(pred.shape, np.float32)
                row += [colour_cam(heat), colour_labels(data.read_mask(pl_dir / f"{sample['name']}.png"))]
            rows.append(row + [colour_labels(pred), colour_labels(sample["mask"])])
    if rows:
        captions = (["image", "teacher CAM", "pseudo label"] if teacher is not None else ["image"])
        save_grid(ctx.run_dir / "vis" / "val.png", rows, captions + ["prediction", "ground truth"])
    return {"seg/val": miou_entry(cm.compute(), ds.class_names), "seg_ms/val": miou_entry(cm_ms.compute(), ds.class_names)}


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
    """Stage 0 (CAM classifier) -> stage 1 (CSRM) -> stage 2 (pseudo labels) -> stage 3 (verification
    DeepLabV3+) -> seg/val. --supervision full: stage 3 on ground-truth masks only (stage 0 for --seg-init cam)."""
    with run_guard():
        args, spec = parse_args(argv)
        validate(args)
        ctx = Context(args, spec)
        # data, networks and weight files are checked before anything is written
        val_set = data.SegDataset(spec.root, ctx.splits["val"], dataset=spec.dataset, seed=args.seed)
        num_classes, full = val_set.num_classes - 1, args.supervision == "full"
        cam_net = None
        if not args.eval_only and (not full or args.seg_init == "cam"):
            cam_net = CAMNet(args.backbone, num_classes, args.pretrained and not args.init_ckpt,
                             "" if args.init_ckpt else args.weights).to(ctx.device)
        if cam_net is not None and args.init_ckpt:  # Deviation 1: external CAM weights {backbone, classifier}
            init, what = load_checkpoint(args.init_ckpt, "--init-ckpt"), f"--init-ckpt {args.init_ckpt}"
            check(isinstance(init, dict) and {"backbone", "classifier"} <= set(init),
                  f"{what} holds no 'backbone' and 'classifier' state dicts (e.g. checkpoints/cam.pt of a csrm run)")
            for part in ("backbone", "classifier"):
                load_weights(getattr(cam_net, part), state_dict_of(init[part], what), f"{what} ({part})")
        teacher = None if full else build_model(args, num_classes)[1].to(ctx.device)
        # --sepl: rank 0 makes the pseudo labels, so it alone loads SAM (torchrun stops the others if it fails)
        sam = load_sam(args) if args.sepl and ctx.main else None
        imagenet = args.seg_init == "imagenet" and not args.eval_only
        seg_net = SegNet(args.seg_backbone, num_classes + 1, args.width, args.low_width, args.pretrained and imagenet,
                         args.seg_weights if imagenet else "").to(ctx.device)

        def load_final():  # the trained networks: --ckpt under --eval-only, else this run's last stage
            weights = ctx.final_weights()
            load_weights(seg_net, weights["seg"], "the verification network")
            if teacher is not None:
                load_weights(teacher, weights["teacher"], "the CSRM teacher")
        if args.eval_only:
            load_final()
        ctx.start()
        pl_root = ctx.run_dir / "pseudo_labels"
        # the verification network trains on the last refinement that runs: SEPL, else the dCRF, else none
        pl_dir = pl_root / ("pseudo_sepl" if args.sepl else
                            "pseudo_crf" if args.pl_crf and args.crf_iters > 0 else "pseudo")
        if cam_net is not None and not ctx.done("cam"):
            train_cam(ctx, cam_net)
        if teacher is not None and not args.eval_only:
            if not ctx.done("csrm"):
                train_csrm(ctx, num_classes)
            load_weights(teacher, ctx.stage_weights("csrm")["teacher"], "the CSRM teacher")
        if teacher is not None and not ctx.done("infer"):
            ctx.reseed(4)
            ctx.finish_stage("infer", results=make_pseudo_labels(ctx, teacher, pl_root, sam) if ctx.main else None)
        del sam  # SAM (2.5 GB for ViT-H) leaves the device before the verification network trains
        if not args.eval_only:
            if not ctx.done("verify"):
                train_verify(ctx, seg_net, pl_dir / ctx.splits["train"],
                             {} if teacher is None else {"teacher": teacher.state_dict()})
            load_final()
        if ctx.main:
            ctx.results.update(evaluate(ctx, seg_net, teacher, val_set, pl_dir / ctx.splits["val"]))
        write_metrics(ctx)


if __name__ == "__main__":
    main()
