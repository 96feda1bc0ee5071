"""CoSA's dynamic threshold (Eq. (6)) on a finished toy run: nu = max_c M' of the trained AN per token, split by
the ground truth, the GMM threshold fitted on those values, and the CPL's foreground recall at a few thresholds.

    python tests/bench/cosa_dt_tokens.py runs/toy_v3/cosa/default-s1

Images: the first 400 train images resized to the run's crop (no augmentation), one thread; the README's CoSA
section quotes its output for seed 1.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import cosa  # noqa: E402
from common import augment, data  # noqa: E402
torch.set_num_threads(1)
run = sys.argv[1]
args = cosa.args_from(json.load(open(f"{run}/args.json")))
ck = torch.load(f"{run}/checkpoints/last.pt", weights_only=True)
spec = data.resolve_data(args.data)
C = len(data.read_class_names(spec.root)) - 1
net = cosa.build_model(args, C, init_weights=False)
net.load_state_dict(ck["weights"]["assign"]); net.eval()
ds = data.SegDataset(spec.root, "train")
nus, fgs = [], []
g = args.crop // net.backbone.patch_embed.patch_size[0]  # the token grid of the queue
with torch.no_grad():
    for i in range(0, 400):
        s = ds.load(i)
        img, (m,) = augment.resize(s["image"], args.crop, masks=(s["mask"],))[:2]
        x = torch.as_tensor(cosa.to_input(img, cosa.input_mean_std(args)))[None]
        y = torch.as_tensor(s["label"], dtype=torch.float32)[None]
        cam, _, _ = cosa.assign(net, x, y, args.pseudo_scales, args.ms_cam_merge)
        nu = cosa.queue_rows(cam, (g, g)).flatten()
        mm = torch.as_tensor(m.astype(np.int64))[None, None].float()
        mt = F.interpolate(mm, size=(g, g), mode="nearest").flatten().long()
        keep = mt != 255
        nus.append(nu[keep]); fgs.append(mt[keep] > 0)
nu, fg = torch.cat(nus).numpy(), torch.cat(fgs).numpy()
print("tokens", len(nu), "fg share", fg.mean().round(3))
for name, sel in (("fg", fg), ("bg", ~fg)):
    print(name, "nu quantiles 10/25/50/75/90:", np.quantile(nu[sel], [.1, .25, .5, .75, .9]).round(3))
dt = cosa.DynamicThreshold(1, 0.45, args.gmm_min)
dt.push(torch.as_tensor(nu)[None]); xi = dt.update()
mu, var, pi = dt.gmm
print("GMM on nu > %.2f: mu %s sd %s pi %s -> xi %.3f" % (args.gmm_min, mu.round(3), np.sqrt(var).round(3), pi.round(3), xi))
print("share of nu <= gmm_min: fg %.3f bg %.3f" % ((nu[fg] <= args.gmm_min).mean(), (nu[~fg] <= args.gmm_min).mean()))
for t in (0.1, 0.2, 0.3, 0.45, xi):
    tp = (nu[fg] >= t).mean(); fp = (nu[~fg] >= t).mean()
    iou = ((nu >= t) & fg).sum() / (((nu >= t) | fg).sum())
    print(f"thr {t:.3f}: fg recall {tp:.3f}, bg above {fp:.3f}, fg IoU {iou:.3f}")
hist = np.histogram(nu[nu > args.gmm_min], bins=20, range=(0, 1))[0]
print("hist nu>gmm_min (20 bins):", hist.tolist())
print("hist fg:", np.histogram(nu[fg & (nu > args.gmm_min)], bins=20, range=(0, 1))[0].tolist())
