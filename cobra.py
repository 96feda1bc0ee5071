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
    Sec. 3.3 final loss                            -> loss_total(), train_cobra()
    Sec. 3.4 / supp. 9.2 seeds, M_fuse             -> infer_cams(), fuse_cams(), seed_label(), evaluate_seeds()
    Supp. 9.1 / 11 attention-derived thresholds    -> attention_bg(), ir_thresholds(), make_ir_label()
    Supp. 10 IRN mask refinement                   -> IRNEdge, loss_irn_affinity(), random_walk(), final_mask()
    Sec. 4 segmentation network                    -> SegNet, train_seg(), evaluate_seg()

Equation map
    Eq. (1) L_cap, InfoNCE on CAP, positives/negatives from the ViT patch affinity -> loss_cap()
    Eq. (2) L_sap, InfoNCE on SAP, positives/negatives from the CNN CAM            -> loss_sap()
    Eq. (3) L_total = L_cls + lambda1 L_cam + lambda2 (L_sap + L_cap)              -> loss_total()
    Eq. (4) (supplement) the same total loss, with lambda ablation (Table 12)      -> loss_total()
    Unnumbered: L_cls, L_cam (Sec. 3.3.1); M_fuse = max((M_cnn + M_tran)/2, M_tran) (Sec. 3.4).

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
       output stride 16), single-scale, no CRF at test - a substitute for the paper's DeepLabV3+ /
       SegFormer (multi-scale + CRF); its DeepLab VOC defaults are not from the paper.
   11. Toy preset only: resnet18 CNN with BN in train mode and zero_init_last=False, a 4-block ViT,
       fixed (not attention-derived) thresholds, one inference scale - random-init attention is flat -
       and SGD momentum 0.9 with the ViT lr x3: from random init, 248 momentum-free steps leave both
       classifiers near chance, and the small ViT learns slower than the CNN under SGD (a ViT-only check
       on toy train seeds: 15.0 at x1 vs 18.2 at x3).
   12. --max-iters N caps every training stage (CoBra, IRN, seg) at N iterations; the warm-up gate is
       not rescaled.

Run
    python cobra.py                                   (toy data, CPU, minutes)
    python cobra.py --data VOC2012 --pretrained       (CUDA, paper settings)
    python cobra.py --data COCO2014 --pretrained
    python cobra.py --branches cnn | --branches vit | --losses cam,sap ...   (Table 3 rows)
    python cobra.py --mask-source cnn|tran|avg|max|fuse                      (Table 5 rows)
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torchvision.models.segmentation.deeplabv3 import DeepLabHead
from tqdm import tqdm

from common import augment, crf, data, miou

METHOD = "cobra"
STAGES = ("cobra", "cams", "seeds", "ir_labels", "irn", "masks", "seg", "done")


# =============================================================================================
# Config
# =============================================================================================
@dataclass
class Args:
    # -- common flags (DESIGN.md)
    data: str = "toy"  # toy | VOC2012 | COCO2014 | a path
    preset: str = "auto"  # auto = toy on the toy dataset, paper otherwise
    out: str = ""  # run folder; default runs/cobra/<data>-<time>
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 2022  # official: run_sample.py
    workers: int = 4  # DataLoader workers
    amp: bool = False  # bf16 autocast on CUDA; ignored (with a note) on CPU
    resume: str = ""  # RUN_DIR to continue from its checkpoints/last.pt
    eval_only: bool = False  # evaluate --ckpt without training
    ckpt: str = ""  # checkpoint file for --eval-only
    pretrained: bool = True  # ImageNet weights through timm (paper Sec. 4)
    weights: str = ""  # local file: dict with any of cnn/vit/irn/seg -> timm state dict
    until: str = "seg"  # last stage: seed | mask | seg (ablation rows of Tables 3/5 need only seed / mask)
    cobra_ckpt: str = ""  # checkpoints/last.pt of a finished run: reuse its CoBra networks, skip stage A (Table 5 rows)
    max_iters: int = 0  # >0: every training stage runs this many iterations (testing aid)
    stop_after: int = 0  # >0: stop as if interrupted after N iterations (resume test)
    deterministic: bool = False  # deterministic cuDNN
    # -- CoBra model (Sec. 3.2, card Sec. 3)
    cnn: str = "resnet152"  # Sec. 4 "ResNet152 following IRN"
    vit: str = "deit_small_patch16_224"  # Sec. 4 DeiT-S/16
    vit_dim: int = 0  # >0 overrides the ViT width (toy)
    vit_depth: int = 0  # >0 overrides the ViT depth (toy)
    vit_heads: int = 0  # >0 overrides the ViT heads (toy)
    cnn_bn_train: bool = False  # official: BN frozen (running stats); toy: train mode (card Sec. 10)
    proj_dim: int = 256  # supp. Table 11 (main text: 128)
    branches: str = "both"  # Table 3: cnn | vit | both
    losses: str = "cam,cap,sap"  # Table 3: subset of {cam, cap, sap}
    # -- losses (Sec. 3.3, Sec. 4.2)
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
    official_quirks: bool = False  # restore card Sec. 8 rows 2, 8, 9, 10
    # -- CoBra training (supp. Sec. 10, card Sec. 6)
    crop: int = 224  # Sec. 4 ("244" is a typo)
    resize_long: tuple = (320, 640)  # official: voc12/dataloader.py
    batch_size: int = 32  # supp. Sec. 10
    epochs: int = 20  # supp. Sec. 10
    lr: float = 0.1  # official: run_sample.py cam_learning_rate
    vit_lr_scale: float = 1.0  # multiplies the ViT lr (card Sec. 6: lower it first if the ViT diverges)
    momentum: float = 1e-4  # official: weight decay lands in SGD's momentum slot (Deviation 7)
    weight_decay: float = 1e-4  # official: run_sample.py
    # -- seeds (Sec. 3.4, supp. Sec. 9, 11)
    scales: tuple = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)  # supp. Sec. 10
    mask_source: str = "fuse"  # Table 5: cnn | tran | avg | max | fuse
    seed_bg: str = "attn-pct"  # attn-pct (official eval_cam.py) | fixed (threshold sweep)
    ir_thresh: str = "attn"  # attn (official cam_to_ir_label.py) | fixed (IRNet 0.30 / 0.05)
    ir_fg: float = 0.30  # IRNet conf_fg_thres (fixed rule)
    ir_bg: float = 0.05  # IRNet conf_bg_thres (fixed rule)
    ir_percentile: float = 93.0  # official: cam_to_ir_label.py
    # -- masks (supp. Sec. 10; official IRNet steps)
    mask_method: str = "irn"  # irn | crf ("CRF-refined seed (no IRN)")
    rw_source: str = "tran"  # tran: strided ViT CAM (official) | same: the --mask-source map (paper)
    irn_backbone: str = "resnet152"  # official: IRN on ResNet-152
    irn_crop: int = 512  # supp. Sec. 10
    irn_batch: int = 32  # supp. Sec. 10
    irn_epochs: int = 4  # supp. Sec. 10
    irn_lr: float = 0.1  # official: run_sample.py irn_learning_rate
    irn_radius: int = 10  # IRNet path radius for training pairs
    rw_radius: int = 5  # IRNet: radius of the random-walk affinity
    rw_beta: float = 10.0  # IRNet beta
    rw_exp_times: int = 8  # IRNet: T squared 8 times = 256 steps
    mask_alpha: float = 0.31  # official: step/gen_seg_label.py
    mask_crf: bool = True  # final CRF (Table 9: with / without)
    # -- segmentation network (Sec. 4; Deviation 10)
    seg_backbone: str = "resnet101"  # DeepLabV3 R101 substitute for DeepLabV3+
    seg_crop: int = 321  # DeepLab VOC default (not in the paper)
    seg_batch: int = 10  # DeepLab VOC default
    seg_iters: int = 20000  # DeepLab VOC default
    seg_lr: float = 2.5e-4  # DeepLab VOC default; head 10x
    seg_scale_range: tuple = (0.5, 1.5)  # DeepLab VOC default
    # -- bookkeeping
    log_every: int = 20  # iterations between log lines
    ckpt_every: int = 200  # iterations between checkpoints/last.pt
    num_vis: int = 4  # images in vis/
    toy_train: int = 1000  # size of the generated toy dataset
    toy_val: int = 200


HELP = {
    "data": "toy | VOC2012 | COCO2014 | a dataset folder", "preset": "auto | paper | toy",
    "branches": "Table 3: cnn | vit | both", "losses": "Table 3: comma list from cam,cap,sap (or 'none')",
    "mask_source": "Table 5: map for the seed and the IR labels: cnn | tran | avg | max | fuse",
    "mask_method": "irn | crf (CRF-refined seed, no IRN: not comparable with the paper's Mask column)",
    "rw_source": "tran: random walk from the strided ViT CAM (official) | same: from the --mask-source map",
    "seed_bg": "attn-pct: percentile of class-token attention (official) | fixed: threshold sweep",
    "ir_thresh": "attn: 93rd attention percentile (official) | fixed: IRNet 0.30/0.05",
    "weights": "torch file holding a dict with any of cnn/vit/irn/seg -> timm state dict",
    "official_quirks": "restore the official code's tau/pseudo-label/frozen-CAP/10x-group behaviour",
    "max_iters": "every training stage runs N iterations (testing aid)",
    "until": "stop after this stage: seed | mask | seg (ablation rows; without seg there is no seg/val)",
    "cobra_ckpt": "checkpoints/last.pt of an earlier run with the same model flags: reuse its trained CoBra "
                  "networks and skip CoBra training (Table 5 rows share one model)",
    "stop_after": "stop as if interrupted after N training iterations (resume test)",
}
CHOICES = {"preset": ("auto", "paper", "toy"), "device": ("auto", "cpu", "cuda"), "branches": ("cnn", "vit", "both"),
           "mask_source": ("cnn", "tran", "avg", "max", "fuse"), "mask_method": ("irn", "crf"),
           "rw_source": ("tran", "same"), "until": ("seed", "mask", "seg"), "seed_bg": ("attn-pct", "fixed"),
           "ir_thresh": ("attn", "fixed")}

PAPER = dict(pretrained=True)
PRESETS = {
    # card Sec. 6 (VOC): every Args default is already the paper's value.
    "paper_voc": dict(PAPER),
    # The paper gives no separate COCO schedule for CoBra; the VOC values are used.
    "paper_coco": dict(PAPER),
    # card Sec. 10: minutes on 2 CPU cores, random init. Deviation 11: BN train mode, fixed thresholds,
    # momentum 0.9 and ViT lr x3 are toy-only choices.
    "toy": dict(pretrained=False, workers=2, cnn="resnet18", vit="deit_tiny_patch16_224", vit_dim=96, vit_depth=4,
                vit_heads=3, cnn_bn_train=True, proj_dim=64, k_sap_pos=7, k_sap_neg=2, k_cap_pos=2, k_cap_neg=7,
                crop=128, resize_long=(96, 160), batch_size=16, epochs=4, warmup_epochs=1, lr=0.05, momentum=0.9, vit_lr_scale=3.0,
                scales=(1.0,), seed_bg="fixed", ir_thresh="fixed", irn_backbone="resnet18", irn_crop=128,
                irn_batch=16, irn_epochs=2, irn_radius=5, rw_exp_times=5, seg_backbone="resnet18", seg_crop=96,
                seg_batch=16, seg_iters=200, seg_lr=0.01, seg_scale_range=(0.75, 1.25), ckpt_every=100),
}


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (DESIGN.md "Errors")
        fail(message)


def fail(msg: str, code: int = 2):
    """Bad input: one line on stderr, exit 2, no traceback."""
    print(f"{METHOD}.py: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=f"{METHOD}.py", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        help_ = HELP.get(f.name, f"default: {f.default}")
        if f.type == "bool" or isinstance(f.default, bool):
            p.add_argument(flag, default=None, action=argparse.BooleanOptionalAction, help=help_)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, default=None, type=float, nargs="+", help=help_)
        else:
            p.add_argument(flag, default=None, type=type(f.default), choices=CHOICES.get(f.name), help=help_)
    return p


def parse_args(argv=None) -> tuple[Args, set]:
    """Dataclass defaults (paper) <- preset <- explicit flags. Returns the args and the explicit names."""
    ns = vars(build_parser().parse_args(argv))
    given = {k for k, v in ns.items() if v is not None}
    args = Args()
    if ns.get("data") is not None:
        args.data = ns["data"]
    if ns.get("preset") is not None:
        args.preset = ns["preset"]
    preset = args.preset
    if preset == "auto":
        preset = "toy" if args.data == "toy" else "paper"
    if preset == "paper":
        is_coco = args.data.upper().startswith("COCO") or (Path(args.data) / "train2014").is_dir()
        preset = "paper_coco" if is_coco else "paper_voc"
    for k, v in PRESETS[preset].items():
        setattr(args, k, v)
    for k in given:
        v = ns[k]
        setattr(args, k, tuple(int(x) if k == "resize_long" else x for x in v) if isinstance(v, list) else v)
    args.preset = preset
    return args, given


# =============================================================================================
# Model
# =============================================================================================
def set_layer4_stride1(backbone: nn.Module):
    """IRNet strides (2, 2, 2, 1): layer4 keeps stride 16 WITHOUT dilation (timm's output_stride=16 dilates)."""
    block = backbone.layer4[0]
    conv = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck strides its 3x3 conv2
    conv.stride = (1, 1)
    for m in block.downsample or []:
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
        elif isinstance(m, nn.AvgPool2d):
            m.stride, m.kernel_size = 1, 1


def create_resnet(name: str, pretrained: bool) -> nn.Module:
    # zero_init_last=False: with random init and frozen/detached early stages, zeroed last-BN gammas
    # would keep every residual branch shut (card Sec. 10); pretrained weights overwrite it anyway.
    m = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="", zero_init_last=False)
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
        self.backbone = timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True,
                                          img_size=img_size, drop_rate=0.0, drop_path_rate=0.0, **over)
        self.patch = self.backbone.patch_embed.patch_size[0]
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
    """Both branches on the same input; `branches` builds one of them only (Table 3 single-branch rows)."""

    def __init__(self, args: Args, num_classes: int):
        super().__init__()
        self.cnn = self.vit = None
        if args.branches in ("cnn", "both"):
            self.cnn = CAKBranch(args.cnn, num_classes, args.proj_dim, args.pretrained, args.cnn_bn_train)
        if args.branches in ("vit", "both"):
            self.vit = SAKBranch(args.vit, num_classes, args.proj_dim, args.pretrained, args.crop,
                                 args.vit_dim, args.vit_depth, args.vit_heads)

    def forward(self, x):
        out = {}
        if self.cnn is not None:
            out.update({f"cnn_{k}": v for k, v in self.cnn(x).items()})
        if self.vit is not None:
            out.update({f"vit_{k}": v for k, v in self.vit(x).items()})
        return out


def param_groups(model: CoBra, args: Args) -> list[dict]:
    """Backbones at lr, the 'new' layers at 10x lr (official IRNet/Cobra convention)."""
    # Deviation 6: the 10x group holds both CAM heads and both projections (the paper's intent); the official
    # code leaves CAP out of every group and puts only the ViT head bias + SAP weight at 10x (--official-quirks).
    groups = []
    if model.cnn is not None:
        new = [model.cnn.cam_head.weight, model.cnn.proj_head.weight]
        if args.official_quirks:  # Impl. (net/resnet50_cam.py): `embed` (CAP) is in no optimizer group
            new = [model.cnn.cam_head.weight]
        backbone = [p for p in model.cnn.backbone.parameters() if p.requires_grad]
        groups += [dict(params=backbone, lr0=args.lr), dict(params=new, lr0=10 * args.lr)]
    if model.vit is not None:
        lr = args.lr * args.vit_lr_scale
        head = model.vit.cam_head
        new = [head.weight, head.bias, model.vit.proj_head.weight]
        old = list(model.vit.backbone.parameters())
        if args.official_quirks:  # Impl. (net/deit_cam.py): the last two tensors = head bias + SAP weight
            new, old = [head.bias, model.vit.proj_head.weight], old + [head.weight]
        groups += [dict(params=old, lr0=lr), dict(params=new, lr0=10 * lr)]
    return groups


# =============================================================================================
# Losses (Sec. 3.3)
# =============================================================================================
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
    """
    scores = cam_cnn.flatten(2)  # (B, C, N^2)
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


# =============================================================================================
# Seeds: multi-scale CAMs, fusion, background rules (Sec. 3.4, supp. Sec. 9, 11)
# =============================================================================================
@torch.no_grad()
def infer_cams(model: CoBra, image: np.ndarray, label: np.ndarray, scales, device) -> dict:
    """Multi-scale + flip CAMs of one full-resolution image (official step/make_cam.py).

    Returns keys (K,) class ids of the GT classes, and for the branches present: cnn, tran (K, H, W)
    max-normalised; cnn_s4, tran_s4 (K, ceil(H/4), ceil(W/4)) for the random walk; attn A (H, W),
    the class-token attention summed over layers, flips and scales (unnormalised).
    """
    H, W = image.shape[:2]
    keys = np.nonzero(label)[0] + 1
    x0 = augment.to_tensor(image).to(device)[None]  # (1, 3, H, W)
    size_s4 = ((H - 1) // 4 + 1, (W - 1) // 4 + 1)
    up16 = (math.ceil(H / 16) * 16, math.ceil(W / 16) * 16)
    acc = {}

    def add(name, m, size, crop=None):
        m = F.interpolate(m[None], size=size, mode="bilinear", align_corners=False)[0]
        if crop is not None:
            m = m[:, : crop[0], : crop[1]]
        acc[name] = acc.get(name, 0) + m

    for s in scales:
        x = F.interpolate(x0, size=(max(round(H * s), 16), max(round(W * s), 16)), mode="bilinear", align_corners=False)
        x = torch.cat([x, x.flip(-1)])  # (2, 3, h, w): the image and its mirror
        out = {k: v.float() for k, v in model(x).items()}
        if "cnn_cam" in out:
            cam = F.relu(out["cnn_cam"])  # (2, C, h16, w16)
            cam = cam[0] + cam[1].flip(-1)
            # Impl. (IRNet step/make_cam.py): upsample to the stride-16 cover of the image, then crop.
            add("cnn", cam, up16, crop=(H, W))
            add("cnn_s4", cam, size_s4)
        if "vit_cam" in out:
            h, w = out["vit_cam"].shape[2:]
            a_obj = out["vit_attn"][:, 0, 1:].reshape(-1, 1, h, w)  # (2, 1, h, w) semantic-agnostic attention
            cam = F.relu(out["vit_cam"] * a_obj)  # Sec. 3.4: M_tran = M_tran (x) A_obj at inference
            cam = cam[0] + cam[1].flip(-1)
            add("tran", cam, (H, W))  # the floored grid is stretched to H x W (card Sec. 12)
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
            # np.array: a writable copy, pydensecrf rejects read-only buffers (noted in /tmp/common_bugs.txt)
            idx = crf.refine_labels(np.array(image), idx, len(keys_all), gt_prob=0.7, **crf.PRESETS["irn"])
        maps.append(keys_all[idx])
    fg_conf, bg_conf = maps
    label = fg_conf.copy()
    label[fg_conf == 0] = 255
    label[(fg_conf == 0) & (bg_conf == 0)] = 0
    return label


# =============================================================================================
# IRN (Ahn et al., CVPR 2019): boundary branch, pair affinities, random walk (supp. Sec. 10)
# =============================================================================================
class IRNEdge(nn.Module):
    """Frozen ImageNet ResNet + IRNet's boundary branch. x (B, 3, H, W) -> edge logits (B, 1, H/4, W/4).

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


def final_mask(rw, keys, H, W, alpha):
    """Impl. (MICV-yonsei/Cobra, step/gen_seg_label.py): per class thr_c = alpha max(r_c) + min(r_c).

    rw (K, h4, w4) -> uint8 (H, W): values below thr_c become 0, bg where every class is 0.
    """
    if len(keys) == 0:
        return np.zeros((H, W), np.uint8)
    up = F.interpolate(rw[None], scale_factor=4, mode="bilinear", align_corners=False)[0, :, :H, :W]  # (K, H, W)
    thr = alpha * up.flatten(1).amax(1) + up.flatten(1).amin(1)
    up = torch.where(up < thr[:, None, None], torch.zeros_like(up), up)
    label = torch.as_tensor(keys, dtype=torch.long)[up.argmax(0)]
    return torch.where(up.amax(0) > 0, label, torch.zeros_like(label)).numpy().astype(np.uint8)


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


# =============================================================================================
# Segmentation network (Sec. 4; Deviation 10)
# =============================================================================================
class SegNet(nn.Module):
    """DeepLabV3: dilated timm ResNet (output stride 16) + torchvision's ASPP head. (B,3,H,W) -> (B,C,H,W).

    Deviation 10: a DeepLabV3 substitute for the paper's DeepLabV3+ (R101) / SegFormer (MiT-B2); the official
    repository has no segmentation stage.
    """

    def __init__(self, name, num_classes, pretrained):
        super().__init__()
        self.backbone = timm.create_model(name, pretrained=pretrained, features_only=True, output_stride=16,
                                          out_indices=(-1,))
        self.head = DeepLabHead(self.backbone.feature_info.channels()[-1], num_classes)

    def forward(self, x):
        logits = self.head(self.backbone(x)[-1])
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=False)


# =============================================================================================
# Infrastructure: seeding, distributed, checkpoints, logging
# =============================================================================================
def seed_everything(seed: int, deterministic: bool):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def worker_init(worker_id):
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


class Ctx:
    """Run state shared by the stages: device, rank, run folder, logger, stop counter."""

    def __init__(self, args, spec, splits, device, rank, world):
        self.args, self.spec, self.splits, self.device, self.rank, self.world = args, spec, splits, device, rank, world
        self.run_dir = Path(args.out)
        self.iters_this_process = 0
        self.state = {"stage": STAGES[0], "iteration": 0, "results": {}, "models": {}, "optim": None,
                      "ir_thresholds": None, "seed_bg_param": None}

    @property
    def main(self):
        return self.rank == 0

    def log(self, record: dict, echo=True):
        if not self.main:
            return
        with open(self.run_dir / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def save(self):
        """checkpoints/last.pt, atomically (tmp + os.replace)."""
        if not self.main:
            return
        state = dict(self.state, args=dataclasses.asdict(self.args), rng=dict(
            python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state()))
        path = self.run_dir / "checkpoints" / "last.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)


class StopRun(Exception):
    pass


class NonFinite(Exception):
    pass


def poly_lr(optimizer, it, total, power=0.9):
    for g in optimizer.param_groups:
        g["lr"] = g["lr0"] * (1 - it / total) ** power


def batches_for_epoch(n, batch, seed, epoch, rank, world, stage_salt):
    """Deterministic per-rank batches of one epoch (drop_last), independent of workers: resumable."""
    g = torch.Generator().manual_seed(seed * 1000 + stage_salt * 100_000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    per_rank = batch // world
    n_batches = n // (per_rank * world)
    order = order[: n_batches * per_rank * world][rank::world]
    return [order[i * per_rank: (i + 1) * per_rank] for i in range(n_batches)]


def run_training(ctx: Ctx, stage: str, model: nn.Module, optimizer, dataset, batch, total_iters, step_fn, salt):
    """Generic loop: poly lr, per-epoch deterministic batches, logging, checkpoints, --stop-after."""
    args = ctx.args
    n_batches = len(batches_for_epoch(len(dataset), batch, args.seed, 0, ctx.rank, ctx.world, salt))
    if n_batches == 0:
        fail(f"{stage}: {len(dataset)} images are fewer than one batch of {batch}; lower the batch size")
    it = ctx.state["iteration"]
    bar = tqdm(total=total_iters, initial=it, desc=stage, disable=not ctx.main, dynamic_ncols=True, leave=False)
    gen = torch.Generator().manual_seed(args.seed)
    while it < total_iters:
        epoch, skip = divmod(it, n_batches)
        dataset.set_epoch(epoch)
        sched = batches_for_epoch(len(dataset), batch, args.seed, epoch, ctx.rank, ctx.world, salt)[skip:]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=sched, num_workers=args.workers,
                                             worker_init_fn=worker_init, generator=gen)
        for sample in loader:
            if it >= total_iters:
                break
            poly_lr(optimizer, it, total_iters)
            terms = step_fn(sample, it, epoch)
            for k, v in terms.items():
                if not torch.isfinite(v):
                    raise NonFinite(f"{stage}: non-finite losses/{k} at iteration {it}")
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            it += 1
            ctx.iters_this_process += 1
            bar.update(1)
            ctx.state["iteration"] = it
            if it % args.log_every == 0 or it == total_iters:
                ctx.log({"stage": stage, "iteration": it, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                         **{f"losses/{k}": float(v.detach()) for k, v in terms.items()}}, echo=False)
                bar.set_postfix(loss=f"{float(terms['total'].detach()):.3f}")
            last = it == total_iters
            stop = args.stop_after and ctx.iters_this_process >= args.stop_after and not last
            if it % args.ckpt_every == 0 or stop:
                ctx.state["models"][stage] = unwrap(model).state_dict()
                ctx.state["optim"] = optimizer.state_dict()
                ctx.save()
            if stop:
                bar.close()
                raise StopRun(f"stopped after {ctx.iters_this_process} iterations of stage {stage} (--stop-after); "
                              f"continue with --resume {ctx.run_dir}")
    bar.close()


def unwrap(m):
    return m.module if isinstance(m, DDP) else m


def wrap(ctx, model):
    if ctx.world > 1:
        return DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                   find_unused_parameters=True)  # CAP/SAP heads sit out the warm-up epochs
    return model


def autocast(ctx):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.args.amp and ctx.device.type == "cuda")


def load_weights(model: nn.Module, key: str, args: Args):
    """--weights FILE: a dict {cnn|vit|irn|seg: timm state dict}; loads the entry for this backbone."""
    if not args.weights:
        return
    try:
        blob = torch.load(args.weights, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read --weights {args.weights} ({type(e).__name__}); give a torch file with a dict of "
             "cnn/vit/irn/seg state dicts, or use --pretrained to download ImageNet weights through timm")
    if key in blob:
        missing, unexpected = model.load_state_dict(blob[key], strict=False)
        if len(unexpected) == len(blob[key]):
            fail(f"--weights {args.weights}: entry '{key}' matches none of that backbone's parameters; "
                 "save a timm state dict of the same model, or use --pretrained")


# =============================================================================================
# Stages
# =============================================================================================
def build_cobra(args, num_classes):
    model = CoBra(args, num_classes)
    if model.cnn is not None:
        load_weights(model.cnn.backbone, "cnn", args)
    if model.vit is not None:
        load_weights(model.vit.backbone, "vit", args)
    return model


def cobra_transform(args):
    def transform(sample, rng):
        image = sample["image"]
        image, _, _ = augment.random_resize_long(image, rng, long_range=tuple(args.resize_long), interp="bicubic")
        image, _, _ = augment.random_hflip(image, rng)
        image, _, _, _ = augment.random_crop(image, rng, args.crop)  # mean fill = 0 after normalising
        return {"image": augment.to_tensor(image), "label": torch.from_numpy(sample["label"])}
    return transform


def train_cobra(ctx: Ctx, model: CoBra):
    """Stage A: CoBra training (Sec. 3.3, supp. Sec. 10), losses by Eq. (3)."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset,
                         transform=cobra_transform(args), seed=args.seed)
    n_batches = len(ds) // args.batch_size
    total = args.max_iters or args.epochs * max(n_batches, 1)  # Deviation 12: --max-iters caps the schedule
    # Deviation 2: auxiliary losses from epoch warmup_epochs (official: 5 of 20); the paper says after one epoch.
    warmup_iters = args.warmup_epochs * n_batches
    # Deviation 7: one SGD with the four groups of the official two optimizers (identical update);
    # momentum = 1e-4 is the official effective value (weight decay passed into the momentum slot).
    optimizer = torch.optim.SGD(param_groups(model, args), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    if ctx.state["optim"] is not None and ctx.state["stage"] == "cobra":
        optimizer.load_state_dict(ctx.state["optim"])
    net = wrap(ctx, model)
    net.train()

    def step(sample, it, epoch):
        image = sample["image"].to(ctx.device)
        label = sample["label"].to(ctx.device)
        with autocast(ctx):
            out = net(image)
        out = {k: v.float() for k, v in out.items()}
        return loss_total(out, label, args, aux_on=it >= warmup_iters)  # Eq. (3)

    run_training(ctx, "cobra", net, optimizer, ds, args.batch_size, total, step, salt=1)
    model.eval()


def cam_path(ctx, name):
    return ctx.run_dir / "cams" / f"{name}.npz"


class _PerImage(torch.utils.data.Dataset):
    """Runs fn(sample) inside DataLoader workers: the per-image stages (CRF, random walk) are CPU-bound."""

    def __init__(self, ds, fn):
        self.ds, self.fn = ds, fn

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.fn(self.ds[i]) or {}


def _one_thread(worker_id):
    torch.set_num_threads(1)


def map_images(ctx: Ctx, ds, fn, desc, uses_model):
    """fn over this rank's share of ds; results are independent of the number of workers.
    CUDA models stay in the main process (a forked worker cannot use CUDA)."""
    workers = ctx.args.workers if not (uses_model and ctx.device.type == "cuda") else 0
    idx = list(range(ctx.rank, len(ds), ctx.world))
    loader = torch.utils.data.DataLoader(_PerImage(ds, fn), batch_size=None, sampler=idx, num_workers=workers,
                                         worker_init_fn=_one_thread)
    return list(tqdm(loader, total=len(idx), desc=desc, disable=not ctx.main, leave=False))


def stage_cams(ctx: Ctx, model: CoBra):
    """Stage B: multi-scale CAMs of every training image, written to cams/<id>.npz (float16)."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset)
    (ctx.run_dir / "cams").mkdir(exist_ok=True)
    model.eval()

    def one(s):
        with autocast(ctx):
            cams = infer_cams(model, s["image"], s["label"], args.scales, ctx.device)
        np.savez(cam_path(ctx, s["name"]), **{k: (v.astype(np.float16) if k != "keys" else v) for k, v in cams.items()})

    map_images(ctx, ds, one, "cams", uses_model=True)


def load_cams(ctx, name):
    with np.load(cam_path(ctx, name)) as z:
        return {k: z[k].astype(np.float32) if k != "keys" else z[k] for k in z.files}


def result_entry(res: dict, class_names, **extra) -> dict:
    iou = {n: (None if np.isnan(v) else round(100 * float(v), 2)) for n, v in zip(class_names, res["iou"])}
    return {"miou": round(100 * float(res["miou"]), 2), "iou": iou, **extra}


def evaluate_seeds(ctx: Ctx):
    """Stage C: seed mIoU on the seed split. attn-pct: greedy theta = 70, 75, ... (official eval_cam.py);
    fixed: full threshold sweep (common.miou.ThresholdSweep). Both chosen on train GT (card Sec. 7)."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["seed"], dataset=ctx.spec.dataset)
    C = ds.num_classes
    thetas = (70, 75, 80, 85, 90, 95)
    attn_cms = [miou.ConfusionMatrix(C) for _ in thetas]
    sweep = miou.ThresholdSweep(C)
    has_attn = args.branches != "cnn"
    for i in tqdm(range(len(ds)), desc="seed eval", disable=not ctx.main, leave=False):
        s = ds[i]
        cams = load_cams(ctx, s["name"])
        m = source_map(cams, args.mask_source)
        sweep.update(m, cams["keys"], s["mask"])
        if has_attn:
            for cm, th in zip(attn_cms, thetas):
                cm.update(seed_label(m, cams["keys"], attention_bg(cams["attn"], th)), s["mask"])
    fixed = sweep.compute()
    ctx.log({"stage": "seeds", "seed_fixed/curve": [[t, round(100 * v, 2)] for t, v in fixed["curve"]]}, echo=False)
    if has_attn:  # both rules are logged; --seed-bg picks the reported one
        curve = [cm.compute() for cm in attn_cms]
        best = 0
        while best + 1 < len(thetas) and curve[best + 1]["miou"] > curve[best]["miou"]:
            best += 1  # stop at the first drop (official); we keep the best, not one step past it (card Sec. 8 row 13)
        ctx.log({"stage": "seeds", "seed_attn/curve": [[t, round(100 * c["miou"], 2)] for t, c in zip(thetas, curve)]},
                echo=False)
    if args.seed_bg == "attn-pct":
        param, res = thetas[best], curve[best]
        entry = result_entry(res, ds.class_names, threshold=f"attention percentile {param}")
    else:
        param, res = float(fixed["best_threshold"]), fixed["best"]
        entry = result_entry(res, ds.class_names, threshold=param)
    ctx.state["seed_bg_param"] = param
    ctx.state["results"]["seed/train"] = entry
    print(f"seed/train ({args.mask_source}, bg {args.seed_bg} {param}): mIoU={entry['miou']:.2f}")
    out = ctx.run_dir / "pseudo_labels" / "seed" / ctx.splits["seed"]
    for i in range(len(ds)):
        name = ds.ids[i]
        cams = load_cams(ctx, name)
        data.save_mask(out / f"{name}.png", seed_label(source_map(cams, args.mask_source), cams["keys"],
                                                      seed_bg_value(ctx, cams)))


def seed_bg_value(ctx, cams):
    p = ctx.state["seed_bg_param"]
    return attention_bg(cams["attn"], p) if ctx.args.seed_bg == "attn-pct" else p


def stage_ir_labels(ctx: Ctx):
    """Stage D: IR labels (confident fg / bg / 255) for the training split (official cam_to_ir_label.py)."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset)
    out = ctx.run_dir / "pseudo_labels" / "ir" / ctx.splits["train"]
    use_crf = crf.available()
    if not use_crf and ctx.main:
        print("warning: pydensecrf is not installed; IR labels and masks are made WITHOUT the dense CRF")

    def one(s):
        cams = load_cams(ctx, s["name"])
        if args.ir_thresh == "attn":
            tau_fg, tau_bg = ir_thresholds(cams["attn"], args.ir_percentile)
        else:
            tau_fg, tau_bg = args.ir_fg, args.ir_bg
        label = make_ir_label(s["image"], source_map(cams, args.mask_source), cams["keys"], tau_fg, tau_bg, use_crf)
        data.save_mask(out / f"{s['name']}.png", label)
        return {"tau_fg": tau_fg}

    thresholds = map_images(ctx, ds, one, "ir labels", uses_model=False)
    if args.ir_thresh == "attn" and thresholds:
        fg = np.array([float(t["tau_fg"]) for t in thresholds])
        ctx.log({"stage": "ir_labels", "rank": ctx.rank, "ir/tau_fg_mean": float(fg.mean()),
                 "ir/no_confident_fg": int((fg >= 1).sum())})


def irn_transform(args):
    def transform(sample, rng):
        image, masks, _ = augment.random_rescale(sample["image"], rng, masks=(sample["ir"],), ratio_range=(0.5, 1.5))
        image, masks, _ = augment.random_hflip(image, rng, masks=masks)
        image, masks, _, _ = augment.random_crop(image, rng, args.irn_crop, masks=masks)
        # Impl. (IRNet): label reduced x0.25 with nearest neighbour (PIL picks the centre pixel 4i+2).
        return {"image": augment.to_tensor(image), "ir": augment.mask_to_tensor(masks[0][2::4, 2::4])}
    return transform


def train_irn(ctx: Ctx, irn: IRNEdge):
    """Stage E: IRN boundary branch on the IR labels."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, transform=irn_transform(args),
                         extra_dirs={"ir": ctx.run_dir / "pseudo_labels" / "ir" / ctx.splits["train"]}, seed=args.seed)
    total = args.max_iters or args.irn_epochs * max(len(ds) // args.irn_batch, 1)
    params = [p for p in irn.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([dict(params=params, lr0=args.irn_lr)], lr=args.irn_lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    if ctx.state["optim"] is not None and ctx.state["stage"] == "irn":
        optimizer.load_state_dict(ctx.state["optim"])
    net = wrap(ctx, irn)
    net.train()

    def step(sample, it, epoch):
        with autocast(ctx):
            logits = net(sample["image"].to(ctx.device))
        return {"total": loss_irn_affinity(logits.float(), sample["ir"].to(ctx.device), args.irn_radius)}

    run_training(ctx, "irn", net, optimizer, ds, args.irn_batch, total, step, salt=2)
    irn.eval()


def mask_dirs(ctx):
    base = ctx.run_dir / "pseudo_labels"
    return base / "mask" / ctx.splits["train"], base / "mask_nocrf" / ctx.splits["train"]


def stage_masks(ctx: Ctx, irn: IRNEdge | None):
    """Stage F: final masks for the training split: IRN edge + random walk + alpha rule (+ CRF),
    or --mask-method crf: the seed rule + dense CRF on the seed map (no IRN)."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset)
    out_crf, out_raw = mask_dirs(ctx)
    use_crf = crf.available()
    rw_src = "tran" if args.rw_source == "tran" and args.branches != "cnn" else args.mask_source

    def one(s):
        cams = load_cams(ctx, s["name"])
        keys = cams["keys"]
        H, W = s["image"].shape[:2]
        if args.mask_method == "irn":
            edge = infer_edge(irn, s["image"], args.irn_crop, ctx.device).float().cpu()
            seed = torch.from_numpy(source_map(cams, rw_src, strided=True))
            rw = random_walk(seed, edge, args.rw_radius, args.rw_beta, args.rw_exp_times) if len(keys) else seed
            raw = final_mask(rw, keys, H, W, args.mask_alpha)
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

    map_images(ctx, ds, one, "masks", uses_model=args.mask_method == "irn")


def evaluate_masks(ctx: Ctx):
    """Stage G: mask mIoU on the seed split, with and without the final CRF (Table 9)."""
    args = ctx.args
    ds = data.SegDataset(ctx.spec.root, ctx.splits["seed"], dataset=ctx.spec.dataset)
    out_crf, out_raw = mask_dirs(ctx)
    cms = {"mask/train": miou.ConfusionMatrix(ds.num_classes), "mask_nocrf/train": miou.ConfusionMatrix(ds.num_classes)}
    for i in range(len(ds)):
        s = ds[i]
        cms["mask/train"].update(data.read_mask(out_crf / f"{s['name']}.png"), s["mask"], pred_ignore="exclude")
        cms["mask_nocrf/train"].update(data.read_mask(out_raw / f"{s['name']}.png"), s["mask"], pred_ignore="exclude")
    note = ("IRN random walk + alpha rule" if args.mask_method == "irn"
            else "CRF-refined seed (no IRN) - not comparable with the paper's Mask column")
    for key, cm in cms.items():
        if key == "mask/train" and not (args.mask_crf or args.mask_method == "crf"):
            continue
        ctx.state["results"][key] = result_entry(cm.compute(), ds.class_names, note=note)
        print(f"{key} ({note}{'' if 'nocrf' in key else ', CRF'}): mIoU={ctx.state['results'][key]['miou']:.2f}")
    if "mask/train" not in ctx.state["results"]:
        ctx.state["results"]["mask/train"] = ctx.state["results"]["mask_nocrf/train"]


def seg_transform(args):
    def transform(sample, rng):
        image, masks, _ = augment.random_rescale(sample["image"], rng, masks=(sample["pseudo"],),
                                                 ratio_range=tuple(args.seg_scale_range))
        image, masks, _ = augment.random_hflip(image, rng, masks=masks)
        image, masks, _, _ = augment.random_crop(image, rng, args.seg_crop, masks=masks)
        return {"image": augment.to_tensor(image), "pseudo": augment.mask_to_tensor(masks[0])}
    return transform


def build_seg(args, num_classes):
    seg = SegNet(args.seg_backbone, num_classes, args.pretrained)
    load_weights(seg.backbone, "seg", args)
    return seg


def train_seg(ctx: Ctx, seg: SegNet):
    """Stage H: the segmentation network on the final masks (DeepLab VOC recipe; Deviation 10)."""
    args = ctx.args
    mask_dir = mask_dirs(ctx)[0 if (args.mask_crf or args.mask_method == "crf") else 1]
    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset, transform=seg_transform(args),
                         extra_dirs={"pseudo": mask_dir}, seed=args.seed)
    total = args.max_iters or args.seg_iters
    optimizer = torch.optim.SGD([dict(params=seg.backbone.parameters(), lr0=args.seg_lr),
                                 dict(params=seg.head.parameters(), lr0=10 * args.seg_lr)],
                                lr=args.seg_lr, momentum=0.9, weight_decay=args.weight_decay)
    if ctx.state["optim"] is not None and ctx.state["stage"] == "seg":
        optimizer.load_state_dict(ctx.state["optim"])
    net = wrap(ctx, seg)
    net.train()

    def step(sample, it, epoch):
        with autocast(ctx):
            logits = net(sample["image"].to(ctx.device))
        return {"total": F.cross_entropy(logits.float(), sample["pseudo"].to(ctx.device), ignore_index=data.IGNORE_INDEX)}

    run_training(ctx, "seg", net, optimizer, ds, args.seg_batch, total, step, salt=3)
    seg.eval()


@torch.no_grad()
def predict_seg(seg, image, ctx):
    x = augment.to_tensor(image).to(ctx.device)[None]
    with autocast(ctx):
        return seg(x)[0].float().argmax(0).cpu().numpy().astype(np.uint8)


def evaluate_seg(ctx: Ctx, seg: SegNet):
    """seg/val: single scale, no CRF (Deviation 10)."""
    ds = data.SegDataset(ctx.spec.root, ctx.splits["val"], dataset=ctx.spec.dataset)
    cm = miou.ConfusionMatrix(ds.num_classes)
    seg.eval()
    for i in tqdm(range(len(ds)), desc="seg eval", disable=not ctx.main, leave=False):
        s = ds[i]
        cm.update(predict_seg(seg, s["image"], ctx), s["mask"])
    res = cm.compute()
    ctx.state["results"]["seg/val"] = result_entry(res, ds.class_names, network=f"DeepLabV3 ({ctx.args.seg_backbone}) "
                                                   "substitute for DeepLabV3+, single scale, no CRF")
    print(miou.format_table(res, ds.class_names))
    print(f"seg/val: mIoU={100 * res['miou']:.2f}")


def heat(m):
    """(H, W) in [0, 1] -> uint8 (H, W, 3), a simple blue-red ramp."""
    m = np.clip(m, 0, 1)
    return (np.stack([m, 1 - np.abs(2 * m - 1), 1 - m], -1) * 255).astype(np.uint8)


def write_vis(ctx: Ctx, seg: SegNet | None):
    """vis/<id>.png: image | seed map (max over classes) | pseudo label | prediction | ground truth."""
    ds = data.SegDataset(ctx.spec.root, ctx.splits["seed"], dataset=ctx.spec.dataset)
    pal = data.voc_palette()
    mask_dir = mask_dirs(ctx)[0]
    for i in range(min(ctx.args.num_vis, len(ds))):
        s = ds[i]
        cams = load_cams(ctx, s["name"])
        m = source_map(cams, ctx.args.mask_source)
        cam = m.max(0) if len(m) else np.zeros(s["image"].shape[:2], np.float32)
        pred = predict_seg(seg, s["image"], ctx) if seg is not None else np.zeros_like(s["mask"])
        tiles = [s["image"], heat(cam), pal[data.read_mask(mask_dir / f"{s['name']}.png")], pal[pred], pal[s["mask"]]]
        Image.fromarray(np.concatenate(tiles, 1)).save(ctx.run_dir / "vis" / f"{s['name']}.png")


# =============================================================================================
# Main
# =============================================================================================
def validate(args: Args):
    """Every check that can fail on user input, BEFORE the run folder is touched."""
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda was given but no CUDA device is available; use --device cpu")
    for name in ("cnn", "irn_backbone", "seg_backbone", "vit"):
        if not timm.is_model(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} is not a timm model name; see timm.list_models()")
    for name in ("cnn", "irn_backbone"):
        if not getattr(args, name).startswith(("resnet", "resnext", "wide_resnet", "seresnet")):
            fail(f"--{name.replace('_', '-')} must be a timm ResNet (IRNet-style stride change on layer4)")
    losses = args.losses.split(",") if args.losses != "none" else []
    if any(l not in ("cam", "cap", "sap") for l in losses):
        fail(f"--losses {args.losses}: use a comma list from cam,cap,sap (or 'none')")
    if args.crop % 16:
        fail(f"--crop {args.crop} must be a multiple of 16 so the CNN and ViT patch grids match")
    n2 = (args.crop // 16) ** 2
    for k in ("k_sap_pos", "k_sap_neg", "k_cap_pos", "k_cap_neg"):
        if not 1 <= getattr(args, k) <= n2:
            fail(f"--{k.replace('_', '-')} {getattr(args, k)} must be in 1..{n2} (patches of a {args.crop} crop)")
    positive = ("batch_size", "epochs", "lr", "tau", "proj_dim", "irn_batch", "irn_epochs", "irn_lr", "irn_crop",
                "seg_batch", "seg_iters", "seg_lr", "seg_crop", "rw_beta", "log_every", "ckpt_every")
    for k in positive:
        if not getattr(args, k) > 0:
            fail(f"--{k.replace('_', '-')} must be > 0, got {getattr(args, k)}")
    for k in ("lambda_cam", "lambda_sap", "lambda_cap", "momentum", "weight_decay", "warmup_epochs", "max_iters",
              "stop_after", "workers", "vit_lr_scale"):
        if getattr(args, k) < 0 or not math.isfinite(getattr(args, k)):
            fail(f"--{k.replace('_', '-')} must be >= 0, got {getattr(args, k)}")
    if not args.scales or any(s <= 0 for s in args.scales):
        fail("--scales must be positive numbers")
    if len(args.resize_long) != 2 or not 0 < args.resize_long[0] <= args.resize_long[1]:
        fail("--resize-long takes two increasing positive sizes, e.g. 320 640")
    if not 0 <= args.mask_alpha <= 1 or not 0 < args.ir_percentile < 100:
        fail("--mask-alpha must be in [0, 1] and --ir-percentile in (0, 100)")
    if args.irn_crop % 16:
        fail(f"--irn-crop {args.irn_crop} must be a multiple of 16")
    if args.irn_radius < 2 or args.rw_radius < 2 or args.irn_radius > args.irn_crop // 8:
        fail(f"--irn-radius/--rw-radius must be >= 2 and --irn-radius <= irn_crop/8 ({args.irn_crop // 8})")
    world = int(os.environ.get("WORLD_SIZE", 1))
    for k in ("batch_size", "irn_batch", "seg_batch"):
        if getattr(args, k) % world:
            fail(f"--{k.replace('_', '-')} {getattr(args, k)} must be divisible by the {world} processes")
    if args.seg_batch // world < 2:
        fail("--seg-batch must give at least 2 images per process (ASPP's pooled BatchNorm)")
    if args.eval_only and not args.ckpt:
        fail("--eval-only needs --ckpt FILE (a checkpoints/last.pt of a finished run)")
    if args.ckpt and not Path(args.ckpt).is_file():
        fail(f"--ckpt {args.ckpt} does not exist")
    if args.cobra_ckpt and not Path(args.cobra_ckpt).is_file():
        fail(f"--cobra-ckpt {args.cobra_ckpt} does not exist; give checkpoints/last.pt of a run past CoBra training")
    if args.weights and not Path(args.weights).is_file():
        fail(f"--weights {args.weights} does not exist; give a local file or use --pretrained")


def resolve_branch_settings(args: Args):
    """Single-branch runs (Table 3) take the seed from their own CAM; CNN-only runs have no attention."""
    notes = []
    if args.branches == "cnn":
        for k, v in (("mask_source", "cnn"), ("seed_bg", "fixed"), ("ir_thresh", "fixed")):
            if getattr(args, k) != v:
                notes.append(f"{k}={v}")
                setattr(args, k, v)
    elif args.branches == "vit" and args.mask_source != "tran":
        notes.append("mask_source=tran")
        args.mask_source = "tran"
    if args.branches != "both" and args.losses != "none":
        args.losses = "none"
    return notes


def run(args: Args):
    t0 = time.time()
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    if args.resume:
        rd = Path(args.resume)
        if not (rd / "args.json").is_file() or not (rd / "checkpoints" / "last.pt").is_file():
            fail(f"--resume {rd}: no args.json / checkpoints/last.pt there; give the folder of an interrupted run")
        saved = json.loads((rd / "args.json").read_text())
        keep = {"stop_after": args.stop_after, "workers": args.workers, "resume": args.resume}
        args = Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in Args.__annotations__})
        for k, v in keep.items():
            setattr(args, k, v)
        args.out = str(rd)
    validate(args)
    notes = resolve_branch_settings(args)
    spec = data.resolve_data(args.data, toy_train=args.toy_train, toy_val=args.toy_val)
    splits = data.default_splits(spec)
    for split in set(splits.values()):
        data.SegDataset(spec.root, split, dataset=spec.dataset)  # layout checks before anything is written
    num_classes = len(data.read_class_names(spec.root, spec.dataset))

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    if args.amp and device.type != "cuda" and rank == 0:
        print("note: --amp is ignored on CPU (bf16 autocast is used on CUDA only)")
    seed_everything(args.seed, args.deterministic)

    # Build every network now: weight-loading failures end before the run folder exists.
    try:
        model = build_cobra(args, num_classes)
        irn = IRNEdge(args.irn_backbone, args.pretrained) if args.mask_method == "irn" else None
        if irn is not None:
            load_weights(irn.backbone, "irn", args)
        seg = build_seg(args, num_classes)
    except Exception as e:
        if args.pretrained:
            fail(f"could not load pretrained weights ({type(e).__name__}: {str(e).splitlines()[0][:100]}); connect "
                 "once so timm can download them (or pre-populate its cache), pass --weights FILE, or use --no-pretrained")
        raise

    if args.cobra_ckpt and not args.resume:
        other = torch.load(args.cobra_ckpt, map_location="cpu", weights_only=False)
        if STAGES.index(other.get("stage", "cobra")) <= STAGES.index("cobra") or "cobra" not in other.get("models", {}):
            fail(f"--cobra-ckpt {args.cobra_ckpt} was saved before CoBra training finished; give a later checkpoint")
        try:
            model.load_state_dict(other["models"]["cobra"])
        except RuntimeError:
            fail(f"--cobra-ckpt {args.cobra_ckpt} does not fit the model flags (--cnn/--vit/--branches/--proj-dim ...)")

    if not args.out:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = str(Path("runs") / METHOD / f"{spec.name}-{stamp}")
    ctx = Ctx(args, spec, splits, device, rank, world)
    args.out = broadcast(ctx, args.out)  # one folder for all ranks (their clocks may differ by a second)
    ctx.run_dir = run_dir = Path(args.out)
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        fail(f"--out {run_dir} exists and is not empty; choose another folder or --resume it")
    ctx.barrier()  # every rank has checked the folder before rank 0 writes into it
    if args.resume:
        state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
        ctx.state.update({k: state[k] for k in ctx.state if k in state})
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
    if ctx.main:
        for sub in ("checkpoints", "vis", "cams"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
        if not args.resume:
            (run_dir / "args.json").write_text(json.dumps(dataclasses.asdict(args), indent=1))
        print(f"{METHOD}: data={spec.name} ({spec.root}) preset={args.preset} device={device} world={world} "
              f"run={run_dir}" + (f" [single branch: {', '.join(notes)}]" if notes else ""))
        if args.mask_method == "crf":
            print("mask method: CRF-refined seed (no IRN) - not comparable with the paper's Mask column")
    ctx.barrier()
    model.to(device)
    if irn is not None:
        irn.to(device)
    seg.to(device)
    models = {"cobra": model, "irn": irn, "seg": seg}
    if args.cobra_ckpt and not args.resume:
        ctx.state["stage"] = "cams"
        ctx.log({"stage": "cobra", "loaded_from": str(args.cobra_ckpt)})
    for name, net in models.items():
        if net is not None and name in ctx.state["models"]:
            net.load_state_dict(ctx.state["models"][name])

    clock = [time.time()]

    def advance(stage):
        ctx.log({"stage": ctx.state["stage"], "time/stage_seconds": round(time.time() - clock[0], 1)}, echo=False)
        clock[0] = time.time()
        ctx.state["stage"], ctx.state["iteration"], ctx.state["optim"] = stage, 0, None
        for name, net in models.items():
            if net is not None:
                ctx.state["models"][name] = net.state_dict()
        ctx.save()
        ctx.barrier()

    def at(stage):
        return STAGES.index(ctx.state["stage"]) <= STAGES.index(stage)

    if args.eval_only:
        return eval_only(ctx, models, t0)
    if at("cobra"):
        train_cobra(ctx, model)
        advance("cams")
    model.eval()
    if at("cams"):
        stage_cams(ctx, model)
        advance("seeds")
    if at("seeds"):
        if ctx.main:
            evaluate_seeds(ctx)
        advance("ir_labels")
        ctx.state["seed_bg_param"] = broadcast(ctx, ctx.state["seed_bg_param"])
    if args.until == "seed":
        return finish(ctx, None, t0)
    if at("ir_labels"):
        if args.mask_method == "irn":
            stage_ir_labels(ctx)
        advance("irn")
    if at("irn"):
        if args.mask_method == "irn":
            train_irn(ctx, irn)
        advance("masks")
    if at("masks"):
        stage_masks(ctx, irn)
        ctx.barrier()
        if ctx.main:
            evaluate_masks(ctx)
        advance("seg")
    if args.until == "mask":
        return finish(ctx, None, t0)
    if at("seg"):
        train_seg(ctx, seg)
        advance("done")
    finish(ctx, seg, t0)


def broadcast(ctx, value):
    if ctx.world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish(ctx, seg, t0):
    if ctx.main:
        if seg is not None:
            evaluate_seg(ctx, seg)
        if ctx.args.until != "seed":
            write_vis(ctx, seg)
        ctx.save()
        write_metrics(ctx, time.time() - t0)
    ctx.barrier()


def eval_only(ctx, models, t0):
    """--eval-only --ckpt FILE: seg/val from the checkpoint's segmentation network."""
    state = torch.load(ctx.args.ckpt, map_location="cpu", weights_only=False)
    if "seg" not in state.get("models", {}) or state.get("stage") != "done":
        fail(f"--ckpt {ctx.args.ckpt} holds no trained segmentation network; give checkpoints/last.pt of a finished run")
    models["seg"].load_state_dict(state["models"]["seg"])
    ctx.state["results"] = {k: v for k, v in state.get("results", {}).items() if k != "seg/val"}
    if ctx.main:
        evaluate_seg(ctx, models["seg"])
        write_metrics(ctx, time.time() - t0)


def write_metrics(ctx, seconds):
    args = ctx.args
    metrics = {"method": METHOD, "dataset": ctx.spec.name, "preset": args.preset, "device": str(ctx.device.type),
               "seconds": round(seconds, 1), "primary": "seg/val", "results": ctx.state["results"]}
    tmp = ctx.run_dir / "metrics.json.tmp"
    tmp.write_text(json.dumps(metrics, indent=1))
    os.replace(tmp, ctx.run_dir / "metrics.json")
    r = ctx.state["results"]
    print(" ".join(f"{k}={v['miou']:.2f}" for k, v in r.items()) + f" seconds={seconds:.1f}")
    if "seg/val" in r:
        print(f"RESULT {METHOD} seg/val mIoU={r['seg/val']['miou']:.2f}")
    else:
        print(f"RESULT {METHOD} seg/val mIoU=n/a (--until {args.until}: no segmentation stage)")


def main(argv=None):
    args, _ = parse_args(argv)
    try:
        run(args)
    except data.DataError as e:
        fail(str(e))
    except StopRun as e:
        print(str(e))
    except NonFinite as e:
        print(f"{METHOD}.py: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
