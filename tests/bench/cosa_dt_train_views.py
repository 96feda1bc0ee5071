"""CoSA's dynamic threshold (Eq. (6)) as train_step meets it: the trained AN of a finished run on the weak views of
the run's own TrainTransform (rescale, flip, crop, blur), nu = max_c M' on the token grid exactly as train_step
queues it, fitted by DynamicThreshold over 50 batches of 8 train images; printed: the GMM, xi, the CPL's
foreground recall / background kept / fg-vs-bg IoU at a few thresholds, and where the raw M of each labelled class
sits on its foreground and background tokens, before normalise_cam's ReLU and min-max. That M is the assignment
network's on the weak view: without SA (--ablation base, gc) the online network's current weights, whose M Eq. (8)
trains on the strong view; with SA, their EMA. cosa_dt_tokens.py does the same on whole
images resized to the crop (no augmentation), which is not what the queue holds.

    python tests/bench/cosa_dt_train_views.py runs/cosa/<run> [--scale-min 0.5 --scale-max 2.0]

One thread; the README's CoSA section quotes its output.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cosa  # noqa: E402
from common import data  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("run")
ap.add_argument("--scale-min", type=float, default=None, help="default: the run's own")
ap.add_argument("--scale-max", type=float, default=None)
opt = ap.parse_args()
torch.set_num_threads(1)
args = cosa.args_from(json.load(open(f"{opt.run}/args.json")))
ck = cosa.load_run_checkpoint(f"{opt.run}/checkpoints/last.pt", "the run")
spec = data.resolve_data(args.data)
net = cosa.build_model(args, len(data.read_class_names(spec.root)) - 1, init_weights=False)
cosa.load_weights(net, ck["weights"]["assign"], "the run's assignment network")
net.eval()
ds = data.SegDataset(spec.root, data.default_splits(spec)["seed"], dataset=spec.dataset)  # a split with GT masks
scales = (opt.scale_min or args.scale_min, opt.scale_max or args.scale_max)
tf = cosa.TrainTransform(args.crop, scales, args.strong_magnitudes, with_mask=True, mean_std=cosa.input_mean_std(args))
grid = (args.crop // net.backbone.patch_embed.patch_size[0],) * 2
rng, dt = np.random.default_rng(0), cosa.DynamicThreshold(50, args.dt_init, args.gmm_min)
fg, bg, absent, pairs = [], [], 0, 0
raw_fg, raw_bg = [], []  # raw M of the labelled classes at scale 1 (Eq. (8) trains sigmoid(M) towards the SPL)
with torch.no_grad():
    for i in range(0, 400, 8):
        batch = [tf(ds.load(j), rng) for j in range(i, i + 8)]
        x, y = torch.stack([b["weak"] for b in batch]), torch.stack([b["label"] for b in batch])
        cam, _, _ = cosa.assign(net, x, y, args.pseudo_scales, args.ms_cam_merge)
        nu = cosa.queue_rows(cam, grid).view(len(batch), *grid)  # (B, g, g): the queue rows
        dt.push(nu.flatten(1))
        m = F.interpolate(torch.stack([b["mask"] for b in batch]).float()[:, None], size=grid, mode="nearest")[:, 0]
        fg.append(nu[(m > 0) & (m < 255)])
        bg.append(nu[m == 0])
        raw = net(x)["cam"]  # (B, C, g, g): M of the AN on the weak view, before ReLU and min-max
        # every labelled class, also one whose object lies outside the crop (then bg tokens only), as Eq. (8) sees it
        for b in range(len(batch)):
            for c in np.flatnonzero(batch[b]["label"].numpy()):
                raw_fg.append(raw[b, c][m[b] == c + 1])
                raw_bg.append(raw[b, c][m[b] == 0])
        for b in batch:  # labelled classes with no pixel in the crop: min-max stretches their noise to 1
            inside = set(np.unique(b["mask"].numpy()).tolist())
            for c in np.flatnonzero(b["label"].numpy()):
                pairs, absent = pairs + 1, absent + (c + 1 not in inside)
xi = dt.update()
fg, bg = torch.cat(fg).numpy(), torch.cat(bg).numpy()
if dt.gmm is None:
    sys.exit("no GMM fitted: too few values above --gmm-min in the 50 batches")
mu, var, pi = dt.gmm
print(f"rescale {scales}: labelled classes absent from the crop {absent}/{pairs}; tokens fg {fg.size}, bg {bg.size}")
print(f"GMM on nu > {args.gmm_min}: mu {mu.round(3)} sd {np.sqrt(var).round(3)} pi {pi.round(3)} -> xi {xi:.3f}")
for t in (0.1, 0.2, 0.3, 0.45, 0.6, xi):
    kept_fg, kept_bg = (fg >= t).sum(), (bg >= t).sum()
    print(f"thr {t:.3f}: fg recall {kept_fg / fg.size:.3f}, bg above {kept_bg / bg.size:.3f}, "
          f"fg-vs-bg IoU {kept_fg / (fg.size + kept_bg):.3f}")
print("hist fg (10 bins):", np.histogram(fg, bins=10, range=(0, 1))[0].tolist())
print("hist bg (10 bins):", np.histogram(bg, bins=10, range=(0, 1))[0].tolist())
# where the labelled class's raw M sits: ReLU + min-max (normalise_cam) read every M <= 0 as nu = 0
raw_fg, raw_bg = torch.cat(raw_fg).numpy(), torch.cat(raw_bg).numpy()
pct = lambda v: np.percentile(v, [10, 25, 50, 75, 90]).round(2).tolist()
print(f"raw M of the labelled class at scale 1: fg tokens M > 0 {(raw_fg > 0).mean():.3f}, percentiles 10/25/50/75/90 "
      f"{pct(raw_fg)}; bg tokens M > 0 {(raw_bg > 0).mean():.3f}, percentiles {pct(raw_bg)}")
