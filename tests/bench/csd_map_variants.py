"""Seed mIoU of the MCTformer-V2 map variants of one trained csd.py classifier: which part of the seed works.

    python tests/bench/csd_map_variants.py RUN_DIR [N]      (RUN_DIR: a csd.py run; N train images, default 300)

Loads RUN_DIR/checkpoints/classifier.pt and scores, on the first N train images at the first seed scale of the run, the
fused map with PAR (the MCTformer-V2 seed), without PAR, the patch-CAM alone, the class-to-patch attention alone and
with PAR, each min-max normalised per class and swept over 41 background thresholds (best printed). The README's
CSD section quotes it for Deviation 17 (a from-scratch ViT's patch attention is no affinity).

It also prints where each normalised map sits for the toy's three context classes (boat / water, train / rails,
cow / grass): over the images that hold the class, the mean map value of that class on its own pixels, on its context
(which the masks call background) and on the rest of the background, and the % of context pixels above the run's
seed threshold (its metrics.json seed/train threshold; meaningful for the map the run's seeds use, which on the toy
is "fused, no PAR", Deviation 17). The README's CSD paragraph "Which map carries the spill" quotes it: it tells
whether a spill comes from the patch-CAM or from the attention, and whether the class map rises on its context only
or on all background.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import csd  # noqa: E402
from common import augment, data, miou  # noqa: E402


def main():
    run, n = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 300
    torch.set_num_threads(1)
    args = csd.args_from(json.loads((run / "args.json").read_text()))
    spec = data.resolve_data(args.data)
    ds = data.SegDataset(spec.root, "train", dataset=spec.dataset)
    C = ds.num_classes - 1  # foreground classes
    model = csd.build_model(args, C, init_weights=False)
    state = torch.load(run / "checkpoints" / "classifier.pt", map_location="cpu", weights_only=True)
    csd.load_weights(model, state["classifier"], "the stage-2 classifier")
    model.eval()
    variants = ("fused + PAR (V2 seed)", "fused, no PAR", "patch-CAM", "A_cp", "A_cp + PAR")
    sweeps = {v: miou.ThresholdSweep(ds.num_classes, thresholds=np.linspace(0, 1, 41)) for v in variants}
    # where[variant][class] = sums of the map on the object, its context, other background; context pixels > thr;
    # then the three pixel counts
    contexts = list(data.TOY_CONTEXT.values())  # context map value k + 1 belongs to class id list(TOY_CONTEXT)[k]
    where = {v: {c: np.zeros(7) for c in data.TOY_CONTEXT} for v in variants}
    context_dir = Path(spec.root) / "context"
    metrics = run / "metrics.json"  # the threshold the run cut its seeds at (its sweep's best on seed/train)
    thr = json.loads(metrics.read_text())["results"]["seed/train"]["threshold"] if metrics.exists() else 0.1
    with torch.no_grad():
        for i in range(min(n, len(ds))):
            s = ds.load(i)
            keys = np.flatnonzero(s["label"] > 0)  # present foreground classes, 0-based
            x = augment.to_tensor(augment.rescale(s["image"], args.seed_scales[0])[0])[None]
            out = model(x)
            attn, cam = out["attn"], out["patch_cam"]  # (1, L, C+N, C+N), (1, C, h, w)
            h, w = cam.shape[-2:]
            A_cp = attn[:, -args.layer_index:, :C, C:].sum(1).reshape(1, C, h, w)
            A_pp = attn[:, :, C:, C:].sum(1)  # (1, N, N), rows are queries

            def par(m):
                return (A_pp @ m.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(1, C, h, w)

            fused = [csd.localization_map(out, args.layer_index, C, par=p) for p in (True, False)]  # the seeds' code
            maps = dict(zip(variants, (*fused, F.relu(cam), A_cp, par(A_cp))))
            context = data.read_mask(context_dir / f"{ds.ids[i]}.png") if context_dir.is_dir() else None
            for v, m in maps.items():
                m = F.interpolate(m[:, keys], size=s["mask"].shape, mode="bilinear", align_corners=False)[0]
                lo, hi = m.flatten(1).min(1)[0].view(-1, 1, 1), m.flatten(1).max(1)[0].view(-1, 1, 1)
                m = ((m - lo) / (hi - lo + 1e-5)).numpy()  # (K, H, W) in [0, 1], one map per present class
                sweeps[v].update(m, keys + 1, s["mask"])
                for k, c in enumerate(keys + 1):
                    if context is None or c not in data.TOY_CONTEXT:
                        continue
                    own = s["mask"] == c
                    ctx = context == contexts.index(data.TOY_CONTEXT[c]) + 1
                    rest = (s["mask"] == 0) & (context == 0)
                    where[v][c] += [m[k][own].sum(), m[k][ctx].sum(), m[k][rest].sum(), (m[k][ctx] > thr).sum(),
                                    own.sum(), ctx.sum(), rest.sum()]
    print(f"{run}: first {min(n, len(ds))} train images, seed scale {args.seed_scales[0]}")
    for v, sweep in sweeps.items():
        r = sweep.compute()
        print(f"{v:22s} seed mIoU {100 * r['best']['miou']:.2f} at t = {r['best_threshold']:.3f}")
    if context_dir.is_dir():
        print(f"mean normalised map of the class on its object / its context / other background; "
              f"% of context above the seed threshold {thr}")
        for v in variants:
            cells = []
            for c, kind in data.TOY_CONTEXT.items():
                a = where[v][c]
                mean = [a[j] / max(a[j + 4], 1) for j in range(3)]
                cells.append(f"{ds.class_names[c]} {mean[0]:.3f} / {kind} {mean[1]:.3f} / bg {mean[2]:.3f} "
                             f"({100 * a[3] / max(a[5], 1):.1f} %)")
            print(f"{v:22s} " + "; ".join(cells))


if __name__ == "__main__":
    main()
