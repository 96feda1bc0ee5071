"""Cross-domain Semantic Decoupling for Weakly-Supervised Semantic Segmentation
Zaiquan Yang, Zhanghan Ke, Gerhard Hancke, Rynson Lau. BMVC 2023.
https://papers.bmvc2023.org/0420.pdf  Official code: none released (closest: the first author's
development fork zaiquanyang/PSD_WSSS of xulianuwa/MCTformer, cited below as "dev code").

What the paper does. Localization maps are reliable on images with ONE class (the source domain)
and ambiguous on images with several (the target domain). CSD is a training-time plug-in for a
WSSS classifier (here MCTformer-V2, or IRN's ResNet-50 CAM network): it copy-pastes the foreground
(and, separately, the background) of a single-label image into a multi-label image, chosen by co-occurrence oriented
resampling (COR), and asks the network's pixel-wise class distribution on the pasted region to
match the one it gives on the single-label image (a FixMatch-style KL consistency). Seeds, masks
and the segmentation network are the baseline's, unchanged.

Pipeline of this file (python csd.py runs all of it; stages named as in checkpoints/ and --resume):
  stage1      train the baseline classifier (train_classifier, csd off)         -> stage1_seed/train
  prior       its seeds at the best background threshold (+ optional CRF)     -> pseudo_labels/prior
  classifier  retrain from the same initialisation with CSD (train_classifier) -> seed/train (+ subsets)
  seeds       seeds of the stage-2 classifier + dense CRF                      -> mask/train
  seg         a segmentation network trained on the masks (train_seg)          -> seg/val (primary)
With --mask-method irn the masks come from IRNet (Ahn et al., CVPR 2019) instead of the CRF:
  seeds       the same seeds -> IR labels (confident fg / bg / 255)           -> pseudo_labels/ir
  irn         IRNet's boundary branch trained on them (train_irn)
  masks       random walk of the seeds on the IRN's boundary map (irn_masks)  -> mask/train
The classifier is MCTformer-V2 (default) or, with --classifier irn, IRNet's CAM network (ResNet-50, its optimiser,
schedule, augmentation and multi-scale max-normalised CAM seeds: IRN_PRESETS); --classifier irn --mask-method irn is
Table 1's IRN pipeline. With --csd off, stage 1 and the prior are skipped and stage 2 is the plain baseline. With
--supervision full (the fully supervised upper bound) only `seg` runs, on the ground-truth masks: the stages before it
produce nothing the oracle uses.

Reading guide:
  Sec. 3.2 "Prior Localization Map Obtaining"   -> main() "Stage 1 + prior", make_labels()
  Sec. 3.2 "Co-occurrence Oriented Resampling"  -> split_domains(), cooccurrence_counts(),
                                                   cooccurrence_matrix(), cor_distribution()
  Sec. 3.2 "Augmentation-based SCL"             -> CSDTransform (copy-paste), make_composites(),
                                                   token_mask(), csd_score_map(), loss_fg()
  Sec. 3.2 "Dual Semantic Consistency Learning" -> background_distribution(), loss_bg()
  Sec. 3.2 "Loss Function"                      -> csd_losses(), train_step()
  Baseline (MCTformer-V2, CVPR 2022)           -> MCTformerV2, localization_map(), seed_map()
  Table 1 IRN classifier (--classifier irn)     -> IRN_PRESETS, classifier_preset(), IRNCAM, build_irn_cam(),
                                                   loss_cls(), irn_augment(), irn_param_groups(), train_classifier(),
                                                   lowres_maps(), seed_from_lowres()
  Table 1 IRN mask method (IRNet, CVPR 2019)    -> make_ir_label(), IRNEdge, loss_irn_affinity(), train_irn(),
                                                   infer_edge(), random_walk(), final_mask(), irn_masks()

Equation map:
  Eq. (1) co-occurrence prior P_ij = N_ij / sum_k N_ik and P_j = sum_k P_{c_k, j}
          (N_ij: images holding i and j; N_ii: single-label images of i, Deviation 14)
                                             -> cooccurrence_counts(), cooccurrence_matrix(), cor_distribution()
  Eq. (2) score maps M_s = F(x_s), M_sm^fg = F(x_sm^fg)  (C x H x W; MCTformer-V2's patch-CAM, IRN's pre-ReLU CAM)
                                                                           -> csd_score_map(), csd_losses()
  Eq. (3) L_fg = sum_hw 1[(h,w) in M_fg] KL(M_s || M_sm^fg)              -> loss_fg()
  Eq. (4) RECONSTRUCTED (lost in the paper text): dummy channel M' and saliency sigma:
          pi = softmax([M' ; M]), b = (pi_0, sigma(pi) = sum_{c>=1} pi_c) -> background_distribution()
  Eq. (5) L_bg = sum_hw 1[(h,w) in M_bg] KL(b(M_s) || b(M_sm^bg))        -> loss_bg()
          (M_bg = the source background, the paste region of x_sm^bg; --bg-paste intersect: Deviation 15)
  Eq. (6) L_total = L_cls + lambda1 L_fg + lambda2 L_bg                   -> csd_losses()
  Unnumbered (IRNet, --mask-method irn; M: the seeds, B: the IRN's boundary map):
          IR label = argmax [0.30, M] where that is a class; else bg where argmax [0.05, M] is bg; else 255
                                                                           -> make_ir_label()
          a_ij = 1 - max of B on the line i-j; the affinity loss on IR-label pairs
                                                                           -> pair_affinity(), loss_irn_affinity()
          r = (M (1 - B)) T^(2^8), T = column-normalise(a^beta)           -> random_walk()
          mask = argmax [0.25, r / max r]                                  -> final_mask()

Deviations (also marked `Deviation:` at the code):
  1. Eq. (4) is missing from the paper text; it is reconstructed as the card (methods/csd.md 4.6)
     recommends: a constant dummy channel M' (default 0) before the C class scores, softmax over
     C+1, saliency = 1 - pi_0, and a 2-way KL. Alternatives: --bg-kl {full,bgterm,rawsum}.
  2. Eq. (5) prints M_sm^fg; it must be M_sm^bg (the background composite), as the text says.
  3. The score map M ("the last output feature map") is MCTformer-V2's patch-CAM logits
     (--csd-map patchcam); the dev code used the PAR-refined fused attention map (--csd-map fused_par). With
     --classifier irn it is IRN's CAM before ReLU (the classifier conv on the last feature map; fused_par: exit 2).
  4. Reduction: sum over masked tokens (as Eqs. 3/5 are sums), mean over the batch; the dev code
     used a per-image weighted mean with lambda = 1 (--reduce mean).
  5. Stage-1 masks: the paper uses "an off-the-shelf WSSS method" without thresholds. Here the
     stage-1 baseline's own seeds at the best background threshold of a sweep against the ground
     truth of the seed split (the card's default; this uses GT to pick ONE scalar, as every WSSS
     seed evaluation does), optionally CRF'd (--prior-crf); --prior dir:PATH loads PSA/IRN output.
     The final masks (mask/train, the segmentation network's labels) use the same GT-swept threshold t* of
     the stage-2 seeds (seed_results()); the paper's PSA masks use fixed thresholds (bg 0.39).
  6. --mask-method crf (default): masks are seeds + dense CRF (label unary, MCTformer's PSA pairwise parameters,
     crf.PRESETS["psa"]), not PSA's AffinityNet random walk (out of scope). mask/train is therefore NOT the
     paper's "Mask" column. There is no hook for external final masks (PSA; --prior dir: of Deviation 5 replaces
     only the stage-1 prior). --mask-method irn: IRNet's masks (the mask method of Table 1's IRN rows, Deviation 18)
     on the classifier's seeds: with --classifier irn Table 1's IRN rows; on the MCTformer-V2 seeds a combination
     Table 1 does not report.
  7. Segmentation network: the paper uses MCTformer's DeepLab with a ResNet-38 backbone (not in timm).
     Paper preset: DeepLab-v2 (ASPP, rates 6/12/18/24) on timm ResNet-101 at output stride 8,
     SGD poly schedule (DeepLab-v2 VOC defaults). Toy preset: the same ASPP head on a tiny
     randomly initialised ViT (timm deit_small_patch16_224 with patch 8, dim 96, depth 4).
     Single-scale inference, no CRF.
  8. Baselines: MCTformer-V2 (default) and IRN's ResNet-50 CAM network (--classifier irn, Table 1's IRN rows with
     --mask-method irn; Deviations 19-20). MCTformer-V1 is not implemented.
  9. Classification-stream augmentation for the toy preset is the weak CSD augmentation (no
     RandAugment / erasing, card Sec. 9); the paper preset uses the timm ImageNet recipe.
 10. --amp on CPU is ignored (a note is printed); on CUDA it is bf16 autocast (MCTformer: fp16 with
     a GradScaler) with the KLs in fp32.
 11. --max-iters N shortens every training stage to N iterations; warm-ups are not rescaled.
 12. Toy preset only: 64-px crops (card: 96/128) and 6 epochs (card: 20-40) to fit 2 CPU cores in
     minutes (15 epochs gave worse seeds: toy v3, seed 0, --csd off, seed/train 27.57 vs 30.20), batch 8 (the
     paper's 64 would leave 90 steps; toy v4, seeds 0-2, seed/train --csd off / default 36.05 / 46.91 at batch 8,
     36.87 / 44.41 at 16; seed 0 at 4: 31.31 off), and seeds at scale 0.64 (the training scale: toy v4, seed 0,
     batch 16, seed/train --csd off / default 37.88 / 46.80 at 0.64, 39.46 / 42.29 at 0.8, 41.14 / 44.03 at 1.0,
     40.23 / 44.44 at 0.64 + 1.0; README, CSD). No PAR on the seeds (Deviation 17). The segmentation network
     trains 500 iterations (DeepLab-v2 VOC: 20K): on ground truth it reaches 86.06 seg/val at 500, 83.33 at 250,
     88.98 at 1000 (toy v4, seed 0, --supervision full); the whole default run takes 164 s (2 threads, idle; 147 s
     at batch 16).
 13. Not implemented: --stage (the pipeline always runs whole; --resume continues it), MCTformer-V1,
     paste rescaling, the ignore band, the CDA area filter (card "optional"), and Table 1's "Test" column (no VOC
     test-server export). No shortcut for lambda1 = lambda2 = 0: stage 1, the prior and the composite and teacher
     forwards still run. The loss is then L_cls (plus the x_fg term of --cls-on-paste), drop-path draws aside, but
     L_fg / L_bg are still logged and a non-finite one still stops the run (check_finite; 0 * NaN is NaN); --csd
     off is the cheap baseline.
 14. Eq. (1)'s diagonal N_ii is read as the number of SINGLE-label images of class i (the literal reading
     is "images containing i"): the reading under which the paper's remark "classes with more single-label
     samples are sampled more" holds, and the dev code's (cooccurrence_counts()).
 15. --bg-paste intersect (dev code, off by default): the background paste region and L_bg's mask are
     R_bg = M_bg(x_s) & bg_prior(x_m) instead of the source background M_bg of Eq. (5), which keeps the
     target's objects visible in x_sm^bg. The default --bg-paste source is the paper's M_bg.
 16. (A match, listed because an earlier version differed.) The cosine LR schedule reproduces MCTformer's
     lagged per-epoch stepping (lr_scheduler.step(epoch) after each epoch): epoch e trains at f(e - 1),
     epochs 0 and 1 both at f(0) (lr_factor()).
 17. Toy preset only: the seeds skip PAR (--no-seed-par). PAR multiplies the fused map by the summed
     patch-to-patch attention, which in MCTformer's ImageNet-pretrained DeiT is an affinity between similar
     patches; the toy preset's from-scratch 4-block ViT has no such attention after 372 iterations (batch 16)
     or 750 (batch 8), and PAR then spreads every map over the image (seed 0, --csd off, seed/train with / without
     PAR: toy v3, batch 16, 14.26 / 30.20; toy v4, batch 8, 12.54 / 39.50; README, CSD section). The paper preset
     keeps PAR, as MCTformer-V2 does.
 18. --mask-method irn follows IRNet (jiwoon-ahn/irn, run_sample.py defaults) with cobra.py's IRN code: only the
     boundary (edge) branch is trained (the displacement branch shares nothing with it beyond the frozen
     backbone and gives instance masks only); pairs whose destination falls outside the crop are ignored instead
     of cropping the source region; the IR labels and the walk start from the classifier's seeds (present
     classes; the walk's at stride 4, ceil(H/4) x ceil(W/4)): with --classifier irn IRNet's own max-normalised
     CAMs, with MCTformer-V2 its min-max normalised seeds. Toy preset: a random-init frozen resnet18 (cobra.py's
     toy IRN; with --classifier irn a resnet10t, Deviation 20).
 19. --classifier irn follows IRNet's step/train_cam.py and step/make_cam.py (IRN_PRESETS "paper", IRNCAM): timm's
     resnet50.tv_in1k (torchvision's V1 ImageNet weights, as IRN), strides (2, 2, 2, 1), conv1/bn1 frozen, every BN
     on its running statistics, stage 2 detached; MLSM on classifier(GAP(features)); SGD with the backbone at
     0.1 and the classifier at 1.0, weight decay 1e-4, momentum 1e-4 (IRN's effective value: its PolyOptimizer
     passes the weight decay into SGD's momentum slot; the 0.9 there is the poly power), poly 0.9 per
     iteration, batch 16, 5 epochs; resize_long (320, 640) + flip + crop 512; seeds at scales (1.0, 0.5, 1.5,
     2.0) with flips, ReLU(CAM) summed, divided by the per-class max + 1e-5. Differences: (a) the CSD stream's
     x_s / x_m (and their priors) take IRN's training view too (--cls-aug irn; the paper says only that it
     follows IRN's settings; for MCTformer-V2 the dev code's weak view is used, IRN's view is already weak);
     (b) the summed CAM is interpolated straight to the image size (IRN: to the next multiple of 16, then
     cropped: up to half a CAM cell apart at the far border) and kept in float16 between the passes; (c) the
     seed threshold is swept on GT (Deviation 5) where IRN evaluates at cam_eval_thres 0.15 (run_sample.py;
     seed/<split> also records "miou_at_0.15"); (d) IRN's per-epoch validation loss (printed only) is not run.
 20. Toy preset with --classifier irn (IRN_PRESETS "toy"): IRN's optimiser, schedule and freezing (the stages 1-2
     and conv1/bn1 of a random-init net stay random features; BN keeps its initial statistics, the identity) on a
     random-init resnet10t, the smallest timm ResNet (resnet18 made a CSD step 2.2 s against 1.0 s at 1 thread),
     for the CAM network and the IRN; output stride 8 (strides (2, 2, 1, 1): layer3 un-strided too), so the 64-px
     crops give 8 x 8 CAM cells like the toy ViT's patch 8; resize_long (48, 96), IRN's 2x range of long sides
     centred on the toy ViT's training scale 0.64 (~72 px on the ~115-px toy images); seeds at one scale, 1.0
     (IRN's four scales, here x 0.64, cost 3.4x the time of scale 1.0 for 45.03 vs 44.47 seed mIoU: toy, 200
     train images, --csd off).

Run:
  python csd.py                                            (toy data, CPU, minutes)
  python csd.py --data VOC2012                             (CUDA, paper settings, ImageNet DeiT-S)
  python csd.py --data COCO2014                            (MCTformer's settings, C = 80)
  python csd.py --csd off | --sampling uniform | --sampling cor   (ablation rows 61.7 / 63.1 / 63.8)
  python csd.py --supervision full                         (upper bound: ground-truth masks train the seg network)
  python csd.py --mask-method irn                          (masks from IRN's random walk, Table 1 IRN mask method)
  python csd.py --classifier irn --mask-method irn --csd off  (Table 1 "IRN (ResNet-50)": seed 48.3, mask 66.5)
  python csd.py --classifier irn --mask-method irn         (Table 1 "IRN w/ CSD": seed 50.6, mask 68.2)
  torchrun --nproc_per_node=2 csd.py --data VOC2012
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
import types
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


METHOD = "csd"


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
    # --- classifier: MCTformer-V2 on DeiT-S (card Sec. 3), or IRN's ResNet-50 CAM network (--classifier irn) ---
    classifier: str = "mctformer"  # mctformer (MCTformer-V2) | irn: IRN's CAM network on --irn-backbone; IRN_PRESETS then replaces the MCTformer values of the fields not given (Deviations 19-20)
    backbone: str = "deit_small_patch16_224"  # MCTformer models.py
    patch_size: int = 16  # stride of the score-map grid: the DeiT-S patch (toy 8 so full-coverage token masks are not empty); irn: the ResNet's output stride, 16 (IRN) or 8
    embed_dim: int = 384  # DeiT-S
    depth: int = 12  # DeiT-S
    num_heads: int = 6  # DeiT-S
    drop_path: float = 0.1  # MCTformer main.py --drop-path
    crop_size: int = 224  # MCTformer main.py --input-size; CSD card Sec. 2
    epochs: int = 60  # MCTformer run.sh
    batch_size: int = 64  # MCTformer run.sh, global over processes
    lr: float = 5e-4 * 64 / 512  # 5e-4 * batch / 512 (MCTformer main.py lr scaling)
    min_lr: float = 1e-5  # MCTformer main.py
    warmup_epochs: int = 5  # MCTformer main.py
    warmup_lr: float = 1e-6  # MCTformer main.py
    weight_decay: float = 0.05  # MCTformer main.py
    cls_aug: str = "timm"  # timm (paper: RandomResizedCrop+RandAugment+erasing) | weak (toy) | irn: IRN's resize_long + flip + crop, also for the CSD stream
    resize_long: tuple = (320, 640)  # --cls-aug irn: random long side (IRN step/train_cam.py; toy --classifier irn: 48 96)
    cam_momentum: float = 1e-4  # --classifier irn: SGD momentum of the CAM network (IRN: PolyOptimizer passes the weight decay into momentum's slot)
    layer_index: int = 3  # K: class-to-patch attention summed over the last K layers (run.sh: 3)
    seed_par: bool = True  # PAR: refine the seeds with the patch-to-patch attention (MCTformer-V2); toy: off (Deviation 17)
    seed_scales: tuple = (1.0,)  # seed input scales (MCTformer run.sh --scales 1.0); toy: the training scale
    sweep_max: float = 0.59  # seed sweep t = 0.00..sweep_max step 0.01 (MCTformer evaluation.py --curve)
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
    bg_paste: str = "source"  # source: R_bg = M_bg(x_s) (Eq. 5) | intersect: M_bg(x_s) & bg(x_m) (dev code; Deviation 15)
    prior: str = "seeds"  # seeds (stage 1) | dir:PATH (VOC-format PNGs) | gt (debug oracle)
    prior_threshold: str = "best"  # best (sweep argmax) | a float background threshold
    prior_crf: bool = False  # dense CRF on the prior masks
    cor_norm: str = "row"  # row (Eq. 1) | softmax (dev code: softmax(0.1 N))
    cor_smoothing: float = 0.0  # add-one smoothing of N (dev code initialises N to ones)
    csd_warmup: int = 0  # epochs without CSD (dev code; not in the paper)
    cls_on_paste: bool = False  # also MLSM on x_sm^fg with y_m | c_s (off: dev code)
    teacher_conf_thr: float = -1.0  # dev code gate of L_fg (spatially normalised teacher > thr); < 0: off
    csd_resize: int = 256  # short side before the crop in the CSD stream (dev code: 256)
    # --- masks and segmentation (card Sec. 6) ---
    mask_method: str = "crf"  # crf: seeds + dense CRF (Deviation 6) | irn: IRNet (Ahn et al. 2019) boundary branch + random walk from the seeds (the mask method of Table 1's IRN rows; Deviation 18)
    mask_crf: bool = True  # the dense CRF on the seeds (crf) or on the IR labels (irn, as IRNet's cam_to_ir_label.py)
    # --- IRN masks (--mask-method irn): IRNet run_sample.py defaults ---
    ir_fg: float = 0.30  # IRNet conf_fg_thres: confident foreground of the IR labels
    ir_bg: float = 0.05  # IRNet conf_bg_thres: confident background of the IR labels
    irn_backbone: str = "resnet50.tv_in1k"  # Table 1 "IRN (ResNet-50)": IRNet's torchvision ResNet-50 v1 weights (timm's untagged resnet50 is a1_in1k)
    irn_crop: int = 512  # IRNet irn_crop_size
    irn_batch: int = 32  # IRNet README (irn_batch_size), global over processes
    irn_epochs: int = 3  # IRNet irn_num_epoches
    irn_lr: float = 0.1  # IRNet README (irn_learning_rate); poly decay
    irn_momentum: float = 1e-4  # IRNet: PolyOptimizer passes the weight decay into SGD's momentum slot
    irn_weight_decay: float = 1e-4  # IRNet irn_weight_decay
    irn_radius: int = 10  # IRNet path radius for training pairs (step/train_irn.py)
    rw_radius: int = 5  # IRNet: radius of the random-walk affinity (step/make_sem_seg_labels.py)
    rw_beta: float = 10.0  # IRNet beta
    rw_exp_times: int = 8  # IRNet: T squared 8 times = 256 steps
    mask_bg: float = 0.25  # IRNet sem_seg_bg_thres: background score against the max-normalised walk
    seg_backbone: str = "resnet101"  # paper: ResNet-38 DeepLab, see Deviation 7
    seg_crop: int = 321  # DeepLab-v2 VOC
    seg_batch: int = 10  # DeepLab-v2 VOC, global over processes
    seg_iters: int = 20000  # DeepLab-v2 VOC
    seg_lr: float = 2.5e-4  # SGD (DeepLab-v2 VOC); toy: AdamW 1e-3
    seg_optimizer: str = "sgd"  # sgd | adamw
    seg_rates: tuple = (6, 12, 18, 24)  # ASPP dilation rates (DeepLab-v2)
    num_vis: int = 4  # seed-split images drawn into vis/<seed split>.png


PRESETS = {
    # the Args defaults: MCTformer-V2 + CSD on VOC (card Sec. 5; MCTformer trains with AMP); segmentation: Deviation 7
    "paper_voc": dict(pretrained=True, amp=True, workers=8, log_every=20, ckpt_every=500),
    # CSD reports VOC only; MCTformer's COCO run uses the same recipe with C = 80 (COCO seg schedule: not in the card)
    "paper_coco": dict(pretrained=True, amp=True, workers=8, log_every=20, ckpt_every=500),
    "toy": dict(  # Deviation 12. card Sec. 9: tiny random-init MCTformer-V2, patch 8, AdamW 1e-3, weak aug; 64 px crops for CPU time
        pretrained=False, workers=0, log_every=20, ckpt_every=500, patch_size=8, embed_dim=96, depth=4, num_heads=3,
        drop_path=0.0, crop_size=64, epochs=6, lr=1e-3,
        batch_size=8,  # 750 classifier steps in 6 epochs, 372 at batch 16: better seeds with CSD (Deviation 12)
        warmup_epochs=0,  # per-epoch stepped warm-up would spend 1 of the 6 epochs at 1e-6
        cls_aug="weak", layer_index=4, csd_resize=72,
        seed_par=False,  # Deviation 17: a from-scratch ViT's patch attention is no affinity, PAR only blurs the seeds
        seed_scales=(0.64,),  # ~72/112: the scale the toy classifier is trained at (and 2.4x fewer tokens)
        seg_backbone="deit_small_patch16_224", seg_crop=64, seg_batch=16, seg_iters=500, seg_lr=1e-3,
        seg_optimizer="adamw", seg_rates=(1, 2),
        # IRN: cobra.py's toy values (random-init frozen resnet18; momentum 0.9: momentum-free SGD barely moves in 120 steps)
        irn_backbone="resnet18", irn_crop=128, irn_batch=16, irn_epochs=2, irn_momentum=0.9, irn_radius=5, rw_exp_times=5),
}
# --classifier irn: the values of IRN's CAM network (jiwoon-ahn/irn, run_sample.py, step/train_cam.py, step/make_cam.py)
# for the fields whose Args / preset value is MCTformer-V2's; classifier_preset() applies them to the fields the
# command line does not give. The CSD fields (lambda1 = 0.01, lambda2 = 0.1, ...) are the same for both (Sec. 4.1).
IRN_PRESETS = {
    # IRN train_cam: batch 16, 5 epochs, SGD lr 0.1 (classifier x10, irn_param_groups()), weight decay 1e-4, poly 0.9;
    # resize_long (320, 640) + flip + crop 512; seeds: make_cam's scales, no PAR (a ResNet has no attention)
    "paper": dict(crop_size=512, batch_size=16, epochs=5, lr=0.1, weight_decay=1e-4, cls_aug="irn", seed_par=False,
                  seed_scales=(1.0, 0.5, 1.5, 2.0), amp=False),  # IRN trains in fp32 (MCTformer with AMP)
    # Deviation 20: IRN's optimiser and schedule on a random-init resnet10t (CAM network and IRN) at output stride 8
    # (patch_size 8 of the toy preset, 64-px crops); IRN's long-side range scaled to the toy images; one seed scale
    "toy": dict(epochs=5, batch_size=16, lr=0.1, weight_decay=1e-4, cls_aug="irn", resize_long=(48, 96),
                seed_par=False, seed_scales=(1.0,), irn_backbone="resnet10t"),
}
CHOICES = dict(csd=("on", "off"), sampling=("cor", "uniform", "uniform_image"), consistency=("dual", "fg", "bg"),
               csd_map=("patchcam", "fused_par"), bg_kl=("saliency", "full", "bgterm", "rawsum"),
               kl_classes=("all", "present"), token_mask=("full", "majority"), reduce=("sum", "mean"),
               target_pool=("multi", "all"), bg_paste=("source", "intersect"), cor_norm=("row", "softmax"),
               cls_aug=("timm", "weak", "irn"), classifier=("mctformer", "irn"), seg_optimizer=("sgd", "adamw"),
               mask_method=("crf", "irn"))
LIMITS = {"patch_size": ">=1", "embed_dim": ">=1", "depth": ">=1", "num_heads": ">=1", "drop_path": ">=0",
          "crop_size": ">=1", "epochs": ">=1", "batch_size": ">=1", "lr": ">0", "min_lr": ">=0", "warmup_epochs": ">=0",
          "warmup_lr": ">=0", "weight_decay": ">=0", "resize_long": ">=1", "cam_momentum": "[0,1)", "layer_index": ">=1",
          "seed_scales": "(0,4]", "sweep_max": "[0,1)",
          "lambda_fg": ">=0", "lambda_bg": ">=0", "kl_temp": ">0", "cor_smoothing": ">=0", "csd_warmup": ">=0",
          "teacher_conf_thr": "(-inf,1)", "csd_resize": ">=1", "seg_crop": ">=1", "seg_batch": ">=1", "seg_iters": ">=1",
          "seg_lr": ">0", "seg_rates": ">=1", "num_vis": ">=0", "ir_fg": "[0,1]", "ir_bg": "[0,1]", "irn_crop": ">0",
          "irn_batch": ">0", "irn_epochs": ">0", "irn_lr": ">0", "irn_momentum": ">=0", "irn_weight_decay": ">=0",
          "irn_radius": ">=2", "rw_radius": ">=2", "rw_beta": ">0", "rw_exp_times": ">=0", "mask_bg": "[0,1]"}


def validate(args):
    """Checks that LIMITS cannot express: relations between fields, the prior, the CRF, batches per process."""
    check(args.crop_size % args.patch_size == 0, f"--crop-size {args.crop_size} must be a multiple of --patch-size {args.patch_size}")
    check(args.embed_dim % args.num_heads == 0, f"--embed-dim {args.embed_dim} must be divisible by --num-heads {args.num_heads}")
    check(args.layer_index <= args.depth, f"--layer-index must be in 1..--depth ({args.depth}), got {args.layer_index}")
    check(args.cls_aug == "irn" or args.csd_resize >= args.crop_size,  # --cls-aug irn: resize_long, no --csd-resize
          f"--csd-resize {args.csd_resize} must be >= --crop-size {args.crop_size}")
    check(len(args.resize_long) == 2 and args.resize_long[0] <= args.resize_long[1],
          f"--resize-long must be two sides MIN MAX with MIN <= MAX, got {' '.join(map(str, args.resize_long))}")
    if args.classifier == "irn":  # what MCTformer-V2's attention provides, IRN's ResNet does not
        check(args.patch_size in (8, 16), f"--classifier irn: --patch-size is the ResNet's output stride, 16 (IRN's "
              f"strides (2, 2, 2, 1)) or 8 (2, 2, 1, 1); got {args.patch_size}")
        check(args.csd_map == "patchcam", "--csd-map fused_par needs MCTformer-V2's attention; with --classifier irn "
              "the score map is the CAM (--csd-map patchcam)")
        check(not args.seed_par, "--seed-par (PAR) needs MCTformer-V2's attention; drop it with --classifier irn")
    try:
        t = 0.0 if args.prior_threshold == "best" else float(args.prior_threshold)
    except ValueError:
        t = -1.0
    check(0 <= t < 1, f"--prior-threshold must be 'best' or a number in [0, 1), got '{args.prior_threshold}'")
    check(args.prior in ("seeds", "gt") or args.prior.startswith("dir:"), f"--prior must be 'seeds', 'gt' or 'dir:PATH', got '{args.prior}'")
    check(not args.prior.startswith("dir:") or Path(args.prior[4:]).is_dir(),
          f"--prior {args.prior}: folder {args.prior[4:]} does not exist; give a folder of VOC-format <id>.png masks")
    check(not (args.mask_crf or args.prior_crf) or crf.available(),
          "dense CRF needs pydensecrf (pip install pydensecrf2); or pass --no-mask-crf --no-prior-crf")
    check(args.irn_backbone.startswith(("resnet", "resnext", "wide_resnet", "seresnet")),
          "--irn-backbone must be a timm ResNet (IRNet-style stride change on layer4)")
    check(args.irn_crop % 16 == 0, f"--irn-crop {args.irn_crop} must be a multiple of 16")
    check(args.irn_radius <= args.irn_crop // 8, f"--irn-radius must be <= irn_crop/8 ({args.irn_crop // 8})")
    check(args.ir_bg <= args.ir_fg, f"--ir-bg {args.ir_bg} must not exceed --ir-fg {args.ir_fg}")
    for k in ("batch_size", "seg_batch", "irn_batch"):
        check(getattr(args, k) % env_world() == 0, f"--{k.replace('_', '-')} {getattr(args, k)} (global) is not divisible by the "
              f"{env_world()} processes")


def classifier_preset(args, argv=None):
    """--classifier irn: IRN_PRESETS (paper or toy) on every field the command line (argv, default sys.argv) does not
    give, so that a flag always wins. A resumed run and --eval-only keep the configuration they stored."""
    if args.classifier == "mctformer" or args.resume or args.eval_only:
        return args
    given = {k for k, v in vars(build_parser().parse_args(argv)).items() if v is not None}
    values = IRN_PRESETS["toy" if args.preset == "toy" else "paper"]
    return dataclasses.replace(args, **{k: v for k, v in values.items() if k not in given})


# ==================================================================================================
# Model
# ==================================================================================================
# MCTformer-V2 (xulianuwa/MCTformer @9606597, models.py `MCTformerV2`)
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

    def __init__(self, vit, num_classes, crop_size):
        super().__init__()
        self.num_classes, self.patch_size = num_classes, vit.patch_embed.patch_size[0]
        self.patch_embed, self.blocks = vit.patch_embed, vit.blocks
        # Impl. (MCTformer, models.py): the DeiT cls token and its position embedding repeated C times.
        self.cls_token = nn.Parameter(vit.cls_token.detach().repeat(1, num_classes, 1))  # (1, C, D)
        pos = vit.pos_embed.detach()  # (1, 1 + N, D)
        self.pos_embed = nn.Parameter(torch.cat([pos[:, :1].repeat(1, num_classes, 1), pos[:, 1:]], 1))  # (1, C+N, D)
        self.head = nn.Conv2d(vit.embed_dim, num_classes, 3, padding=1)  # V2 patch branch
        self.grid = crop_size // self.patch_size

    def interpolate_pos(self, h, w):
        """Patch part bicubically resized to (h, w); class part unchanged. -> (1, C + h*w, D)."""
        C = self.num_classes
        cls_pos, patch_pos = self.pos_embed[:, :C], self.pos_embed[:, C:]
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        D = patch_pos.shape[-1]
        grid = patch_pos.reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)
        # Impl. (MCTformer, models.py interpolate_pos_encoding): scale factors (h + 0.1) / grid, not a target size
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / self.grid, (w + 0.1) / self.grid), mode="bicubic",
                             align_corners=False)
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


class SegNet(nn.Module):
    """DeepLab-v2 style: a timm feature extractor + ASPP (sum of dilated 3x3 classifiers).
    Deviation 7: not MCTformer's ResNet-38 DeepLab (not in timm)."""

    def __init__(self, backbone, num_classes, rates):
        super().__init__()
        self.backbone = backbone
        channels = backbone.feature_info.channels()[-1]
        self.aspp = nn.ModuleList(nn.Conv2d(channels, num_classes, 3, padding=r, dilation=r) for r in rates)
        self.stride = 32  # a padding multiple for inference (not the output stride, which is 8 for ResNet-101)

    def forward(self, x):
        f = self.backbone(x)[-1]  # (B, D, h, w)
        logits = sum(conv(f) for conv in self.aspp)  # (B, C, h, w)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def create_backbone(name, pretrained, **kwargs):
    try:
        return timm_model(name, pretrained, **kwargs)
    except (TypeError, RuntimeError) as e:
        fail(f"timm cannot build '{name}' with {kwargs}: {str(e).splitlines()[0][:120]}")


def build_model(args, num_classes, *, init_weights):
    """The classifier (C foreground classes): MCTformer-V2, or IRN's CAM network with --classifier irn; init_weights:
    ImageNet weights (--pretrained) or --weights FILE into the DeiT / ResNet backbone."""
    if args.classifier == "irn":
        return build_irn_cam(args, num_classes, init_weights=init_weights)
    vit = create_backbone(args.backbone, init_weights and args.pretrained and not args.weights, num_classes=0,
                          img_size=args.crop_size, patch_size=args.patch_size, embed_dim=args.embed_dim, depth=args.depth,
                          num_heads=args.num_heads, drop_path_rate=args.drop_path)
    check(hasattr(vit, "blocks") and hasattr(vit, "cls_token"), f"backbone '{args.backbone}' is not a timm ViT with a class token")
    if init_weights and args.weights:  # an ImageNet classifier in the file is dropped
        what = f"--weights {args.weights}"
        load_weights(vit, state_dict_of(load_checkpoint(args.weights, "--weights"), what), what, ignore=("head.",))
    return MCTformerV2(vit, num_classes, args.crop_size)


def build_segnet(args, num_classes, *, init_weights):
    """The segmentation network (C + 1 outputs); ImageNet weights with --pretrained and init_weights."""
    name = args.seg_backbone
    if name.startswith(("vit", "deit")):
        kw = dict(img_size=args.seg_crop, patch_size=args.patch_size, embed_dim=args.embed_dim,
                  depth=args.depth, num_heads=args.num_heads, dynamic_img_size=True)
    else:
        kw = dict(output_stride=8)
    backbone = create_backbone(name, init_weights and args.pretrained, features_only=True, out_indices=(-1,), **kw)
    return SegNet(backbone, num_classes, args.seg_rates)


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
    # would keep every residual branch shut (methods/cobra.md Sec. 10); pretrained weights overwrite it anyway.
    m = timm_model(name, pretrained, num_classes=0, global_pool="", zero_init_last=False)
    set_layer4_stride1(m)
    return m


class IRNCAM(nn.Module):
    """IRN's CAM network (Ahn et al., CVPR 2019; jiwoon-ahn/irn, net/resnet50_cam.py `Net` / `CAM`): a ResNet at output
    stride 16 and a bias-free 1x1 conv classifier. x (B, 3, H, W) ->
    cls_logits (B, C) = classifier(GAP(features)), the only logits of L_cls (no patch logits: loss_cls());
    patch_cam (B, C, H/16, W/16) = the classifier conv on the features, BEFORE ReLU: the "last output feature map",
    CSD's score map M of Eq. (2) (csd_score_map()); the seeds take its ReLU (lowres_maps()).
    patch_size = the output stride: the grid of csd_losses()'s token masks, as MCTformer-V2's patch.
    """

    def __init__(self, backbone, num_classes, stride):
        super().__init__()
        self.backbone, self.num_classes, self.patch_size = backbone, num_classes, stride
        self.classifier = nn.Conv2d(backbone.num_features, num_classes, 1, bias=False)  # 2048 -> C for ResNet-50
        # Impl. (jiwoon-ahn/irn, net/resnet50_cam.py Net.train): conv1 and bn1 never train
        backbone.conv1.requires_grad_(False)
        backbone.bn1.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        for m in self.backbone.modules():  # Impl. (jiwoon-ahn/irn, net/resnet50.py FixedBatchNorm): running statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):  # always (the affine weights still train)
                m.eval()
        return self

    def forward(self, x):
        b = self.backbone
        x = b.layer1(b.maxpool(b.act1(b.bn1(b.conv1(x)))))  # stage 1: (B, 256, H/4, W/4) for ResNet-50
        # Impl. (jiwoon-ahn/irn, net/resnet50_cam.py Net.forward): stage 2 detached, so stages 1-2 do not train
        x = b.layer2(x).detach()  # (B, 512, H/8, W/8)
        x = b.layer4(b.layer3(x))  # (B, 2048, H/16, W/16)
        cam = F.conv2d(x, self.classifier.weight)  # (B, C, H/16, W/16), pre-ReLU (IRN `CAM` applies ReLU after it)
        cls_logits = self.classifier(x.mean((2, 3), keepdim=True)).flatten(1)  # (B, C): conv(GAP(x)), IRN's order
        return {"cls_logits": cls_logits, "patch_cam": cam}


def build_irn_cam(args, num_classes, *, init_weights):
    """IRN's CAM network on --irn-backbone (IRN: the torchvision ResNet-50 of the boundary branch, resnet50.tv_in1k),
    strides (2, 2, 2, 1) from create_resnet(); --patch-size 8 (toy, Deviation 20) un-strides layer3 too."""
    backbone = create_resnet(args.irn_backbone, init_weights and args.pretrained and not args.weights)
    if args.patch_size == 8:  # strides (2, 2, 1, 1): set_layer4_stride1 applied to layer3, the same surgery
        set_layer4_stride1(types.SimpleNamespace(layer4=backbone.layer3))
    if init_weights and args.weights:  # an ImageNet classifier in the file is dropped
        what = f"--weights {args.weights}"
        load_weights(backbone, state_dict_of(load_checkpoint(args.weights, "--weights"), what), what, ignore=("fc.",))
    return IRNCAM(backbone, num_classes, args.patch_size)


class IRNEdge(nn.Module):
    """IRN (Ahn et al., CVPR 2019): frozen ImageNet ResNet + IRNet's boundary branch.
    x (B, 3, H, W) -> edge logits (B, 1, H/4, W/4).

    Deviation 18: no displacement branch - it shares only the frozen backbone with the edge branch and does
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
        self.backbone.eval()  # fully frozen, BN included (methods/cobra.md Sec. 5)
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


def build_irn(args, *, init_weights):
    """The IRN of --mask-method irn: ImageNet weights for its frozen ResNet with --pretrained and init_weights."""
    return IRNEdge(args.irn_backbone, init_weights and args.pretrained)


# ==================================================================================================
# Losses
# ==================================================================================================
LOGIT_KEYS = ("cls_logits", "patch_logits")  # the image-level logits a classifier's output may hold


def loss_cls(out, y):
    """L_cls = sum of MLSM(logits, y) over the image-level logits the classifier outputs. MCTformer-V2:
    MLSM(class-token logits) + MLSM(patch logits); IRN (step/train_cam.py): MLSM(cls_logits) alone."""
    return sum(F.multilabel_soft_margin_loss(out[k], y) for k in LOGIT_KEYS if k in out)


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
    # Eq. (5)  L_bg = sum_hw 1[(h,w) in T_bg] KL(b(M_s) || b(M_sm^bg)), T_bg = the tokens of the paste region R_bg:
    # R_bg = M_bg, the source background (paper, --bg-paste source), or M_bg & bg(x_m) (Deviation 15, intersect)
    return reduce_tokens(kl, T_bg, reduce)


def csd_score_map(out, args, num_classes: int):
    """M of Eq. (2). Deviation 3: patchcam = the raw V2 patch-CAM logits (no min-max, as the paper stresses), with
    --classifier irn IRN's pre-ReLU CAM; fused_par = the PAR-refined fused map (dev code; gradient reaches only the
    attention; MCTformer-V2 only)."""
    if args.csd_map == "patchcam":
        return out["patch_cam"]
    return localization_map(out, args.layer_index, num_classes, par=True)


def csd_losses(model, batch, args, num_classes: int, csd_active: bool):
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
    l_cls = loss_cls({k: out[k][:B] for k in LOGIT_KEYS if k in out}, y)
    if args.cls_on_paste:
        l_cls = l_cls + loss_cls({k: out[k][B:2 * B] for k in LOGIT_KEYS if k in out}, batch["y_fg"])
    net = unwrap(model)
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
    if args.teacher_conf_thr >= 0:  # dev code gate, off by default
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


# --- IRN (Ahn et al., CVPR 2019): pair affinities from the boundary map (--mask-method irn) ---
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
    # Deviation 18: destinations outside the map read 255 and are ignored (IRNet crops the source region instead).
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
# Seeds (MCTformer-V2 fused + PAR maps, or IRN's ReLU CAMs), the stage-1 prior and the masks
class LowresMaps(list):
    """lowres_maps()'s result: one (2, Kp, h_s, w_s) map per scale, and `norm`, the per-class normalisation that
    seed_from_lowres() gives their sum: "minmax" (MCTformer main.py) or "max" (IRN make_cam.py). The maps travel
    with their normalisation (the seed sweep, the labels, the IR labels and the walk all read the same cache), so
    every consumer normalises as the classifier that made them; a plain list has no `norm` and is refused."""

    def __init__(self, maps, norm):
        super().__init__(maps)
        assert norm in ("minmax", "max"), norm
        self.norm = norm


@torch.no_grad()
def lowres_maps(model, image: np.ndarray, label: np.ndarray, args, device) -> LowresMaps:
    """Token-resolution maps of the present classes, per scale, for the image and its flip: MCTformer-V2's fused map
    (-> PAR), or with --classifier irn IRN's ReLU(CAM) (Impl. jiwoon-ahn/irn, net/resnet50_cam.py `CAM`; the scales
    bicubic, as make_cam's pil_rescale order 3). -> [(2, Kp, h_s, w_s) float16 per scale]; kept small so that the
    sweep pass and the mask pass share one forward per image."""
    irn = args.classifier == "irn"
    keys = torch.as_tensor(np.flatnonzero(label > 0), device=device)
    maps = LowresMaps([], "max" if irn else "minmax")
    for scale in args.seed_scales:
        img = image if scale == 1.0 else augment.rescale(image, scale, interp="bicubic" if irn else "bilinear")[0]
        x = augment.to_tensor(img).to(device)
        x = torch.stack([x, x.flip(-1)])  # (2, 3, H_s, W_s)
        out = model(x)
        m = F.relu(out["patch_cam"]) if irn else \
            localization_map(out, args.layer_index, model.num_classes, par=args.seed_par)  # (2, K, h, w)
        maps.append(m[:, keys].half().cpu())
    return maps


def seed_from_lowres(maps: list, label: np.ndarray, size) -> np.ndarray:
    """Bilinear to image size -> sum over scales and {image, un-flipped flip} -> per-class min-max
    to [0, 1] (MCTformer main.py, --scales), or for IRN's maps (norm "max") division by the max + 1e-5
    (IRN make_cam.py, no min subtracted). -> float32 (K, H, W), zero for absent classes."""
    keys = np.flatnonzero(label > 0)
    cam = torch.zeros(len(label), *size)
    if len(keys) == 0:
        return cam.numpy()
    total = 0
    for m in maps:
        up = F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)  # (2, Kp, H, W)
        total = total + up[0] + up[1].flip(-1)
    if maps.norm == "max":
        # Impl. (jiwoon-ahn/irn, step/make_cam.py): cam /= adaptive_max_pool2d(cam, (1, 1)) + 1e-5
        cam[keys] = total / (total.flatten(1).max(1)[0].view(-1, 1, 1) + 1e-5)
        return cam.numpy()
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
    out = crf.refine_labels(np.array(image, np.uint8), lut[seed_label], len(keys), **crf.PRESETS[preset])
    return keys[out].astype(np.uint8)


def compute_maps(ctx, model, datasets, desc):
    """Low-resolution maps of every image of the given datasets (ids shared by several computed once)."""
    model.eval()
    cache = {}
    for ds in datasets:
        todo = [i for i, name in enumerate(ds.ids) if name not in cache]
        for sample in each_sample(ctx, torch.utils.data.Subset(ds, todo), desc):
            cache[sample["name"]] = lowres_maps(model, sample["image"], sample["label"], ctx.args, ctx.device)
    return cache


def write_labels(ctx, cache, ds, t, out_dir: Path, use_crf, desc, score_ids=(), cm=None, indices=None, ir=False):
    """Seeds at threshold t (+ dense CRF, in the loader workers) for the images of ds (all, or `indices`)
    -> out_dir/<id>.png; the labels of images in score_ids are scored against their GT in cm. ir: IRNet's
    IR labels (--ir-fg / --ir-bg, + CRF) from the same seeds instead; t is not used."""
    out_dir.mkdir(parents=True, exist_ok=True)
    score_ids = set(score_ids)

    def to_label(sample):
        cam = seed_from_lowres(cache[sample["name"]], sample["label"], sample["image"].shape[:2])  # (C-1, H, W)
        if ir:
            keys = np.flatnonzero(sample["label"] > 0) + 1  # class ids of the present classes
            return sample, make_ir_label(sample["image"], cam[keys - 1], keys, ctx.args.ir_fg, ctx.args.ir_bg, use_crf)
        lab = seeds_to_label(cam, sample["label"], t)
        return sample, crf_labels(sample["image"], lab, sample["label"], "psa") if use_crf else lab

    for sample, lab in each_sample(ctx, ds if indices is None else torch.utils.data.Subset(ds, indices), desc, fn=to_label):
        data.save_mask(out_dir / f"{sample['name']}.png", lab)
        if sample["name"] in score_ids:
            cm.update(lab, sample["mask"])


def make_labels(ctx, model, train_set, seed_set, stage, t, use_crf, out_dir):
    """Seeds of `model` -> labels at background threshold t (+ dense CRF) for every training image, in out_dir.
    t = "best": the argmax of the full seed sweep on the seed split (Deviation 5). stage "prior": the stage-1
    prior (Sec. 3.2); "mask": the final masks, scored on the seed split; "ir": the IR labels of --mask-method irn
    (IRNet's fixed thresholds; the sweep still gives seed/train). Rank 0 only. -> (results, t)."""
    split, names = ctx.splits["seed"], seed_set.class_names
    cache = compute_maps(ctx, model, [train_set] + ([seed_set] if t == "best" else []), f"{stage} maps")
    res = {}
    if t == "best":  # Deviation 5: the threshold is the sweep argmax against GT
        sweep = evaluate_seeds(cache, each_sample(ctx, seed_set, "seed sweep"), seed_set.num_classes, ctx.args.sweep_max)
        key = f"{'stage1_seed' if stage == 'prior' else 'seed'}/{split}"
        res = {f"{key}{k}": v for k, v in seed_results(sweep, names).items()}
        t = sweep["all"]["best_threshold"]
        if ctx.args.classifier == "irn" and ctx.args.sweep_max >= 0.15:  # IRN's seed threshold (cam_eval_thres)
            res[key]["miou_at_0.15"] = round(100 * float(dict(sweep["all"]["curve"])[0.15]), 2)
    t, cm = float(t), miou.ConfusionMatrix(seed_set.num_classes)
    scored = seed_set.ids if stage == "mask" else ()
    write_labels(ctx, cache, train_set, t, out_dir, use_crf, f"{stage} labels", scored, cm, ir=stage == "ir")
    if stage == "mask":
        rest = [i for i, name in enumerate(seed_set.ids) if name not in set(train_set.ids)]
        if rest:  # seed-split images outside the training split (not the case for VOC train / train_aug)
            write_labels(ctx, cache, seed_set, t, ctx.run_dir / "pseudo_labels" / "mask" / split, use_crf,
                         "masks (seed split)", scored, cm, indices=rest)
        res[f"mask/{split}"] = miou_entry(cm.compute(), names, threshold=t, crf=bool(use_crf))
    return res, t


# --- --mask-method irn: IRNet's IR labels, random walk and masks (Ahn et al., CVPR 2019) ---
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


def final_mask(rw, keys, H, W, bg):
    """Impl. (jiwoon-ahn/irn, step/make_sem_seg_labels.py): the walk upsampled x4 and cropped to (H, W), divided by
    its maximum over all classes and pixels, then argmax over [bg, r] (sem_seg_bg_thres; CoBra's alpha rule differs).

    rw (K, h4, w4) -> uint8 (H, W) in {0} u keys.
    """
    if len(keys) == 0:
        return np.zeros((H, W), np.uint8)
    up = F.interpolate(rw[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :H, :W]  # (K, H, W)
    up = up / up.max().clamp_min(1e-5)  # an all-zero walk stays background (IRNet would divide by 0)
    scores = torch.cat([torch.full((1, H, W), float(bg)), up.float().cpu()])  # (1 + K, H, W)
    return np.concatenate([[0], keys]).astype(np.uint8)[scores.argmax(0).numpy()]


@torch.no_grad()
def infer_edge(irn: IRNEdge, image, crop, device):
    """Edge probability at stride 4 (ceil(H/4), ceil(W/4)): flip-averaged logits, then sigmoid.
    Impl. (methods/cobra.md Sec. 5): the normalised image is zero-padded to (at least) the training crop."""
    H, W = image.shape[:2]
    x = augment.to_tensor(image).to(device)
    Hp, Wp = max(crop, math.ceil(H / 16) * 16), max(crop, math.ceil(W / 16) * 16)
    pad = lambda t: F.pad(t, (0, Wp - W, 0, Hp - H))
    logits = irn(torch.stack([pad(x), pad(x.flip(-1))]))  # (2, 1, Hp/4, Wp/4)
    h4, w4 = (H - 1) // 4 + 1, (W - 1) // 4 + 1
    logits = logits[:, 0, :h4, :w4]
    return torch.sigmoid(logits[0] / 2 + logits[1].flip(-1) / 2)


def irn_masks(ctx, model, irn, train_set, seed_set, out_dir):
    """--mask-method irn: IRNet's masks for every training image -> out_dir, scored on the seed split. The seeds of
    `model` at stride 4 (IRNet's strided `cam`: present classes, normalised as seed_map(): min-max for MCTformer-V2,
    max for --classifier irn) walk on the IRN's
    boundary map (random_walk()), then IRNet's background rule (final_mask()). Rank 0 only. -> results."""
    args, split, names = ctx.args, ctx.splits["seed"], seed_set.class_names
    rest = [i for i, name in enumerate(seed_set.ids) if name not in set(train_set.ids)]
    cache = compute_maps(ctx, model, [train_set] + ([seed_set] if rest else []), "mask maps")
    cm, scored = miou.ConfusionMatrix(seed_set.num_classes), set(seed_set.ids)
    # seed-split images outside the training split (not the case for VOC train / train_aug) go next to them
    jobs = [(train_set, range(len(train_set)), out_dir)]
    jobs += [(seed_set, rest, ctx.run_dir / "pseudo_labels" / "mask" / split)] if rest else []
    irn.eval()
    for ds, indices, folder in jobs:
        folder.mkdir(parents=True, exist_ok=True)
        for s in each_sample(ctx, torch.utils.data.Subset(ds, indices), "irn masks"):
            H, W = s["image"].shape[:2]
            keys = np.flatnonzero(s["label"] > 0) + 1  # class ids of the present classes
            edge = infer_edge(irn, s["image"], args.irn_crop, ctx.device).float().cpu()  # (ceil(H/4), ceil(W/4))
            seed = torch.from_numpy(seed_from_lowres(cache[s["name"]], s["label"], tuple(edge.shape))[keys - 1])  # (K, h4, w4)
            rw = random_walk(seed, edge, args.rw_radius, args.rw_beta, args.rw_exp_times) if len(keys) else seed
            lab = final_mask(rw, keys, H, W, args.mask_bg)
            data.save_mask(folder / f"{s['name']}.png", lab)
            if s["name"] in scored:
                cm.update(lab, s["mask"])
    return {f"mask/{split}": miou_entry(cm.compute(), names, method="IRN random walk", bg=args.mask_bg)}


# ==================================================================================================
# Train
# ==================================================================================================
# --- CSD: domains, co-occurrence oriented resampling (Eq. (1)), copy-paste (Sec. 3.2) ---
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


def cor_distribution(P: np.ndarray, y_m: np.ndarray, eligible: np.ndarray, mode: str = "cor", source_sizes=None):
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


def irn_augment(image, masks, rng, crop: int, long_range):
    """IRN's train_cam view (Impl. jiwoon-ahn/irn, voc12/dataloader.py VOC12ImageDataset): long side ~ U{long_range}
    (bicubic image, nearest masks), horizontal flip 0.5, random crop, a short side padded (image: the mean, 0 after
    normalising, as IRN pads the normalised image with 0; masks: 255). The image and all masks move together."""
    image, masks, _ = augment.random_resize_long(image, rng, masks=masks, long_range=tuple(long_range), interp="bicubic")
    image, masks, _ = augment.random_hflip(image, rng, masks=masks)
    image, masks, _, _ = augment.random_crop(image, rng, crop, masks=masks)
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
    else:  # Impl. (torchvision RandomResizedCrop.get_params): after 10 tries, a centre crop, aspect clamped to ratio
        in_ratio = W / H
        if in_ratio < min(ratio):
            w, h = W, int(round(W / min(ratio)))
        elif in_ratio > max(ratio):
            h, w = H, int(round(H * max(ratio)))
        else:
            w, h = W, H
        y0, x0 = (H - h) // 2, (W - w) // 2
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

    def __init__(self, args, raw=None, labels=None, P=None, prior_key="prior"):
        self.args, self.raw, self.labels, self.P, self.prior_key = args, raw, labels, P, prior_key
        if raw is not None:
            self.sources, multi = split_domains(labels)
            self.targets = multi if args.target_pool == "multi" else np.arange(len(labels))
            self.sizes = np.array([len(s) for s in self.sources])
            self.eligible = self.sizes > 0

    def geometry(self, image, masks, rng):
        """The CSD stream's joint augmentation of an image and its prior: the dev code's weak one, or under --cls-aug
        irn IRN's own training view (Deviation 19: IRN's augmentation is already weak)."""
        a = self.args
        if a.cls_aug == "irn":
            return irn_augment(image, masks, rng, a.crop_size, a.resize_long)
        return weak_augment(image, masks, rng, a.crop_size, a.csd_resize)

    def classification_view(self, image, rng):
        a = self.args
        if a.cls_aug == "irn":  # IRN step/train_cam.py: resize_long, flip, crop; no colour augmentation
            return augment.to_tensor(irn_augment(image, (), rng, a.crop_size, a.resize_long)[0])
        if a.cls_aug == "timm":  # Deviation 9: the toy preset uses the weak branch below
            image = random_resized_crop(image, rng, a.crop_size)
            image, _, _ = augment.random_hflip(image, rng)
            image = augment.rand_augment(image, rng)
            return random_erasing(augment.to_tensor(image), rng)
        image, _ = weak_augment(image, (), rng, a.crop_size, a.csd_resize)
        return augment.to_tensor(image)

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
            return {"x_s": z, "x_fg": z, "x_bg": z, "M_fg": zb, "R_bg": zb, "c_s": torch.tensor(0),
                    "y_fg": torch.from_numpy(y_m), "y_bg": torch.from_numpy(y_m), "y_s": torch.zeros(K)}
        c = int(rng.choice(K, p=probs))
        s = int(self.sources[c][rng.integers(len(self.sources[c]))])
        src, tgt = self.raw.load(s), self.raw.load(m)
        # Joint weak augmentation of (x_s, its prior) and of (x_m, its prior): masks stay aligned.
        img_s, (pr_s,) = self.geometry(src["image"], (src[self.prior_key],), rng)
        img_m, (pr_m,) = self.geometry(tgt["image"], (tgt[self.prior_key],), rng)
        pr_s, pr_m = torch.from_numpy(pr_s.astype(np.int64)), torch.from_numpy(pr_m.astype(np.int64))
        M_fg = pr_s == c + 1  # foreground of the source class (label values are class index + 1)
        M_bg = (pr_s != c + 1) & (pr_s != data.IGNORE_INDEX)  # not foreground, not padding/ignore
        # Eq. (5): the paste region and L_bg's mask are the source background M_bg (paper). Deviation 15:
        # --bg-paste intersect (dev code) keeps only M_bg & bg(x_m), so the target's objects stay visible.
        R_bg = M_bg & (pr_m == 0) if a.bg_paste == "intersect" else M_bg
        x_s, x_m = augment.to_tensor(img_s), augment.to_tensor(img_m)
        x_fg, x_bg = make_composites(x_s, x_m, M_fg, R_bg)
        y_fg = np.maximum(y_m, np.eye(K, dtype=np.float32)[c])  # y_m | {c_s}
        return {"x_s": x_s, "x_fg": x_fg, "x_bg": x_bg, "M_fg": M_fg, "R_bg": R_bg, "c_s": torch.tensor(c),
                "y_fg": torch.from_numpy(y_fg), "y_bg": torch.from_numpy(y_m.copy()),
                "y_s": torch.from_numpy(self.labels[s].copy())}


# --- Stages 1 and 2: the classifier (MCTformer-V2's or IRN's optimiser and schedule) ---
def param_groups(model, weight_decay):
    """AdamW groups: no decay for 1-D parameters, position embeddings and class tokens (timm)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "pos_embed" in name or "cls_token" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def irn_param_groups(model, lr, weight_decay):
    """Impl. (jiwoon-ahn/irn, step/train_cam.py): SGD groups, the backbone at lr and the new classifier at 10 lr, both
    with the weight decay. conv1 / bn1 are left out (frozen); layer1-2 stay in, as in IRN, but get no gradient."""
    backbone = [p for p in model.backbone.parameters() if p.requires_grad]
    return [{"params": backbone, "lr": lr, "weight_decay": weight_decay},
            {"params": list(model.classifier.parameters()), "lr": 10 * lr, "weight_decay": weight_decay}]


def lr_factor(epoch, epochs, args):
    """f(e) = timm CosineLRScheduler(t_initial=epochs, warmup_t, warmup_lr_init, lr_min) as a factor of --lr:
    linear warm-up from --warmup-lr, then cosine to --min-lr. Deviation 16 (a match, not a difference):
    MCTformer (main.py) calls lr_scheduler.step(epoch) AFTER epoch e, so epoch e trains at f(e - 1) and
    epochs 0 and 1 both at f(0); this lag is reproduced here."""
    # Impl. (MCTformer, main.py): the scheduler is stepped with the epoch just finished
    epoch = max(epoch - 1, 0)
    if epoch < args.warmup_epochs:
        return warmup_lr(epoch, args.warmup_epochs, args.warmup_lr / args.lr)
    return cosine_lr(epoch, epochs, args.min_lr / args.lr)


def train_step(net, batch, it, args, num_classes, csd_active, optimizer, autocast):
    """One iteration of the classifier + CSD: Eq. (6) on the batch and its triplets, then one AdamW (SGD) step.
    Returns a dict of floats (losses, masked token counts) for the log."""
    with autocast():
        losses = csd_losses(net, batch, args, num_classes, csd_active)
    log = {(f"csd/{k}" if k.startswith("tokens") else f"losses/{k}"): v.item() for k, v in losses.items()}
    check_finite(log, it)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    optimizer.step()
    return log


def train_classifier(ctx, stage, num_classes, train_labels, csd_on, prior_dir=None):
    """Stage 1 (csd_on=False: the baseline classifier) or stage 2 (CSD), from the (ImageNet or random) init."""
    args, spec, K = ctx.args, ctx.spec, num_classes - 1
    ctx.reseed(1)  # one salt for both stages: the same initialisation and data order, a paired comparison
    model = build_model(args, K, init_weights=True).to(ctx.device)
    transform = CSDTransform(args)
    if csd_on:
        prior_key = "mask" if args.prior == "gt" else "prior"
        raw = data.SegDataset(spec.root, ctx.splits["train"], dataset=spec.dataset,
                              extra_dirs=None if prior_key == "mask" else {"prior": prior_dir})
        P = cooccurrence_matrix(cooccurrence_counts(train_labels, args.cor_smoothing), args.cor_norm)  # Eq. (1)
        transform = CSDTransform(args, raw, train_labels, P, prior_key)
        ctx.log({"stage": stage, "cooccurrence_P": np.round(P, 4).tolist()})
    train_set = data.SegDataset(spec.root, ctx.splits["train"], dataset=spec.dataset, transform=transform, seed=args.seed)
    ipe = len(train_set) // args.batch_size  # iterations per epoch
    total = args.max_iters or args.epochs * ipe  # Deviation 11
    epochs = math.ceil(total / ipe)
    if args.classifier == "irn":  # Impl. (jiwoon-ahn/irn, step/train_cam.py, misc/torchutils.py PolyOptimizer)
        # SGD(params, lr, weight_decay) there puts the weight decay in momentum's slot: --cam-momentum 1e-4 (Deviation 19)
        optimizer = torch.optim.SGD(irn_param_groups(model, args.lr, args.weight_decay), lr=args.lr, momentum=args.cam_momentum)
        schedule = lambda it: poly_lr(it, total)  # PolyOptimizer: (1 - step / max_step) ** 0.9, every iteration
    else:  # MCTformer-V2: AdamW, timm's per-epoch cosine schedule
        optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, eps=1e-8)
        schedule = lambda it: lr_factor(it // ipe, epochs, args)
    net = ctx.wrap(model).train()

    def step(batch, it):
        return train_step(net, batch, it, args, K, csd_on and it // ipe >= args.csd_warmup, optimizer, ctx.autocast)

    train_loop(ctx, stage, train_set, args.batch_size, total, step, {"model": model, "optimizer": optimizer},
               lr=schedule, salt=1)
    return model


def optimizer_step(optimizer, loss, it, name):
    """One update on a single-loss stage (IRN, segmentation network), after the non-finite guard. -> its log entry."""
    log = {f"losses/{name}": loss.item()}
    check_finite(log, it)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return log


# --- --mask-method irn: the IRN boundary branch on the IR labels (IRNet step/train_irn.py) ---
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


def train_irn(ctx):
    """The IRN's boundary branch on the IR labels (IRNet's affinity loss; SGD, poly schedule)."""
    args, spec = ctx.args, ctx.spec
    ctx.reseed(2)
    irn = build_irn(args, init_weights=True).to(ctx.device)
    ds = data.SegDataset(spec.root, ctx.splits["train"], dataset=spec.dataset, transform=irn_transform(args),
                         extra_dirs={"ir": ctx.run_dir / "pseudo_labels" / "ir" / ctx.splits["train"]}, seed=args.seed)
    total = args.max_iters or args.irn_epochs * max(len(ds) // args.irn_batch, 1)
    params = [p for p in irn.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=args.irn_lr, momentum=args.irn_momentum, weight_decay=args.irn_weight_decay)
    net = ctx.wrap(irn).train()

    def step(batch, it):
        with ctx.autocast():
            logits = net(batch["image"])
        return optimizer_step(optimizer, loss_irn_affinity(logits.float(), batch["ir"], args.irn_radius), it, "irn")

    train_loop(ctx, "irn", ds, args.irn_batch, total, step, {"irn": irn, "optimizer": optimizer},
               lr=lambda it: poly_lr(it, total), salt=2)
    return irn.eval()


# --- Segmentation network (Deviation 7) ---
class SegTransform:
    """Segmentation training: random rescale 0.7-1.3, crop (labels padded 255), flip; labels = sample[key]."""

    def __init__(self, crop, key="pseudo"):
        self.crop, self.key = crop, key

    def __call__(self, sample, rng):
        image, (lab,), _ = augment.random_rescale(sample["image"], rng, masks=(sample[self.key],), ratio_range=(0.7, 1.3))
        image, (lab,), _, _ = augment.random_crop(image, rng, self.crop, masks=(lab,))
        image, (lab,), _ = augment.random_hflip(image, rng, masks=(lab,))
        return {"image": augment.to_tensor(image), "target": augment.mask_to_tensor(lab)}


def train_seg(ctx, num_classes, mask_dir):
    """The segmentation network on the masks (--supervision full: on the ground-truth masks)."""
    args, spec, full = ctx.args, ctx.spec, ctx.args.supervision == "full"
    ctx.reseed(3)
    model = build_segnet(args, num_classes, init_weights=True).to(ctx.device)
    train_set = data.SegDataset(spec.root, ctx.splits["train"], dataset=spec.dataset, seed=args.seed + 2,
                                extra_dirs=None if full else {"pseudo": mask_dir},
                                transform=SegTransform(args.seg_crop, "mask" if full else "pseudo"))
    total = args.max_iters or args.seg_iters
    if args.seg_optimizer == "sgd":  # DeepLab-v2: 10x lr for the classifier
        groups = [{"params": model.backbone.parameters(), "lr": args.seg_lr},
                  {"params": model.aspp.parameters(), "lr": 10 * args.seg_lr}]
        optimizer = torch.optim.SGD(groups, lr=args.seg_lr, momentum=0.9, weight_decay=5e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.seg_lr, weight_decay=0.01)
    net = ctx.wrap(model).train()

    def step(batch, it):
        with ctx.autocast():
            loss = F.cross_entropy(net(batch["image"]).float(), batch["target"], ignore_index=data.IGNORE_INDEX)
        return optimizer_step(optimizer, loss, it, "seg")

    train_loop(ctx, "seg", train_set, args.seg_batch, total, step, {"model": model, "optimizer": optimizer},
               lr=lambda it: poly_lr(it, total), salt=3)
    return model


# ==================================================================================================
# Evaluate
# ==================================================================================================
def evaluate_seeds(cache, samples, num_classes, sweep_max):
    """Full background-threshold sweep (t = 0.00..sweep_max, step 0.01) on the samples of a split with GT,
    per subset. Returns {"all", "single", "multi"}: ThresholdSweep.compute() results.

    The prediction at threshold t_i is arg = argmax_c cam_c where best = max_c cam_c > t_i, else
    background. One histogram over (k, gt, arg), k = #{thresholds < best}, holds every threshold's
    confusion matrix: pixels with k > i are foreground at t_i. This fills common.miou.ThresholdSweep's
    matrices with exactly the counts its per-image update() would give, in one pass per image."""
    thresholds = np.round(np.arange(0.0, sweep_max + 1e-9, 0.01), 2)
    T, C = len(thresholds), num_classes
    hist = {g: np.zeros((T + 1, C, C), np.int64) for g in ("single", "multi", "none")}
    for sample in samples:
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
    out = {"": miou_entry(res["all"]["best"], class_names, threshold=t)}
    for g in ("single", "multi"):
        curve = dict(res[g]["curve"])
        if not np.isnan(curve[t]):
            out["_" + g] = {"miou": round(100 * float(curve[t]), 2), "iou": {}, "threshold": t,
                            "best_miou": round(100 * float(res[g]["best"]["miou"]), 2),
                            "best_threshold": res[g]["best_threshold"]}
    return out


@torch.no_grad()
def seg_predict(model, image, device, stride):
    """Single-scale prediction; the image is padded to a multiple of the stride, logits cropped back."""
    H, W = image.shape[:2]
    x = augment.to_tensor(image).to(device)[None]
    ph, pw = (-H) % stride, (-W) % stride
    x = F.pad(x, (0, pw, 0, ph))
    return model(x)[0, :, :H, :W].argmax(0).cpu().numpy()


def evaluate(ctx, segnet, ds):
    """seg/<split>: single-scale predictions of the segmentation network, no CRF (Deviation 7)."""
    cm = miou.ConfusionMatrix(ds.num_classes)
    segnet.eval()
    for sample in each_sample(ctx, ds, f"seg/{ds.split}"):
        cm.update(seg_predict(segnet, sample["image"], ctx.device, segnet.stride), sample["mask"])
    return miou_entry(cm.compute(), ds.class_names)


def save_vis(ctx, classifier, segnet, ds, mask_dir):
    """vis/<split>.png rows: image | CAM (seed) | mask | prediction | ground truth (without a classifier,
    under --supervision full: image | prediction | ground truth)."""
    rows = []
    for i in range(min(ctx.args.num_vis, len(ds))):
        s = ds.load(i)
        pred, gt = colour_labels(seg_predict(segnet.eval(), s["image"], ctx.device, segnet.stride)), colour_labels(s["mask"])
        if classifier is None:
            rows.append([s["image"], pred, gt])
            continue
        cam = seed_map(classifier.eval(), s["image"], s["label"], ctx.args, ctx.device).max(0)
        path = mask_dir / f"{s['name']}.png"
        mask = colour_labels(data.read_mask(path)) if path.is_file() else np.zeros_like(s["image"])
        rows.append([s["image"], colour_cam(cam), mask, pred, gt])
    captions = ["image", "prediction", "ground truth"] if classifier is None else \
        ["image", "CAM (seed)", "mask", "prediction", "ground truth"]
    if rows:
        save_grid(ctx.run_dir / "vis" / f"{ds.split}.png", rows, captions)


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
    """stage1 -> prior -> classifier (stage 2) -> seeds and masks (irn: seeds and IR labels -> irn -> masks) -> seg
    -> seg/val, into metrics.json."""
    with run_guard():
        args, spec = parse_args(argv)
        args = classifier_preset(args, argv)
        validate(args)
        ctx = Context(args, spec)
        splits, full = ctx.splits, args.supervision == "full"
        irn_on = args.mask_method == "irn" and not full  # the upper bound needs no masks
        # data and networks are built (and validated) before anything is written
        train_set, seed_set, val_set = (data.SegDataset(spec.root, splits[k], dataset=spec.dataset) for k in ("train", "seed", "val"))
        for k, ds in (("train", train_set), ("seed", seed_set), ("val", val_set)):
            check(len(ds) > 0, f"split '{splits[k]}' of {spec.root} is empty; list image ids in ImageSets/Segmentation/{splits[k]}.txt")
        check(len(train_set) >= max(args.batch_size, args.seg_batch, args.irn_batch if irn_on else 1), f"the training "
              f"split has {len(train_set)} images, fewer than one batch (--batch-size {args.batch_size}, --seg-batch "
              f"{args.seg_batch}{f', --irn-batch {args.irn_batch}' if irn_on else ''})")
        num_classes, train_labels = val_set.num_classes, train_set.labels()
        if args.csd == "on" and not (args.eval_only or full):
            sources, targets = split_domains(train_labels)
            check(sum(len(s) for s in sources) > 0, "CSD needs single-label training images (the source domain) and there "
                  "are none; use --csd off")
            check(args.target_pool != "multi" or len(targets) > 0, "CSD needs multi-label training images (the target "
                  "domain); use --target-pool all or --csd off")
        fresh = not (args.resume or args.eval_only)
        classifier = None if full else build_model(args, num_classes - 1, init_weights=fresh).to(ctx.device)
        segnet = build_segnet(args, num_classes, init_weights=fresh).to(ctx.device)
        irn = build_irn(args, init_weights=fresh).to(ctx.device) if irn_on else None
        if args.eval_only:  # the trained networks of --ckpt
            weights = ctx.final_weights()
            check(full or "classifier" in weights, f"--ckpt {args.ckpt} holds no classifier (a --supervision full run)")
            load_weights(segnet, weights["seg"], f"--ckpt {args.ckpt} (segmentation network)")
            if not full:
                load_weights(classifier, weights["classifier"], f"--ckpt {args.ckpt} (classifier)")
            if irn_on:
                check("irn" in weights, f"--ckpt {args.ckpt} holds no IRN (a --mask-method crf run); drop --mask-method irn")
                load_weights(irn, weights["irn"], f"--ckpt {args.ckpt} (IRN)")
        ctx.start()
        mask_dir = ctx.run_dir / "pseudo_labels" / "mask" / splits["train"]
        if not (args.eval_only or full):
            # --- Stage 1 + prior (Sec. 3.2 "Prior Localization Map Obtaining") ---
            prior_dir = Path(args.prior[4:]) if args.prior.startswith("dir:") else \
                ctx.run_dir / "pseudo_labels" / "prior" / splits["train"]
            if args.csd == "on" and args.prior == "seeds" and not ctx.done("prior"):
                if not ctx.done("stage1"):
                    base = train_classifier(ctx, "stage1", num_classes, train_labels, csd_on=False)
                    ctx.finish_stage("stage1", weights={"classifier": base.state_dict()})
                load_weights(classifier, ctx.stage_weights("stage1")["classifier"], "the stage-1 classifier")
                res, t = make_labels(ctx, classifier, train_set, seed_set, "prior", args.prior_threshold, args.prior_crf,
                                     prior_dir) if ctx.main else ({}, 0.0)
                ctx.finish_stage("prior", results=res, threshold=t)
            # --- Stage 2: the classifier with CSD (or the plain baseline with --csd off) ---
            if not ctx.done("classifier"):
                model = train_classifier(ctx, "classifier", num_classes, train_labels, args.csd == "on", prior_dir)
                ctx.finish_stage("classifier", weights={"classifier": model.state_dict()})
            load_weights(classifier, ctx.stage_weights("classifier")["classifier"], "the stage-2 classifier")
        if not full and (args.eval_only or not ctx.done("seeds")):  # --- seeds (full sweep), masks (+ dense CRF) ---
            # irn: the same seeds give IRNet's IR labels instead; the masks come from the random walk below
            stage, out_dir = ("ir", ctx.run_dir / "pseudo_labels" / "ir" / splits["train"]) if irn_on else ("mask", mask_dir)
            res = make_labels(ctx, classifier, train_set, seed_set, stage, "best", args.mask_crf, out_dir)[0] if ctx.main else {}
            ctx.finish_stage("seeds", results=res)
        if irn_on and not args.eval_only:  # --- the IRN on the IR labels ---
            if not ctx.done("irn"):
                ctx.finish_stage("irn", weights={"irn": train_irn(ctx).state_dict()})
            load_weights(irn, ctx.stage_weights("irn")["irn"], "the IRN")
        if irn_on and (args.eval_only or not ctx.done("masks")):  # --- masks: IRN boundary map + random walk ---
            res = irn_masks(ctx, classifier, irn, train_set, seed_set, mask_dir) if ctx.main else {}
            ctx.finish_stage("masks", results=res)
        if not args.eval_only:  # --- the segmentation network on the masks (or the ground truth) ---
            if not ctx.done("seg"):
                weights = {"seg": train_seg(ctx, num_classes, mask_dir).state_dict()}
                if not full:  # the networks --eval-only needs to rebuild the masks
                    weights.update(classifier=classifier.state_dict(), **({"irn": irn.state_dict()} if irn_on else {}))
                ctx.finish_stage("seg", weights=weights, final=True)
            load_weights(segnet, ctx.final_weights()["seg"], "the segmentation network")
        if ctx.main:
            ctx.results["seg/val"] = evaluate(ctx, segnet, val_set)
            save_vis(ctx, classifier, segnet, seed_set, mask_dir)
        write_metrics(ctx, classifier=args.classifier)


if __name__ == "__main__":
    main()
