"""Seed mIoU of the MCTformer-V2 map variants of one trained csd.py classifier: which part of the seed works.

    python tests/bench/csd_map_variants.py RUN_DIR [N]      (RUN_DIR: a csd.py run; N train images, default 300)

Loads RUN_DIR/checkpoints/classifier.pt and scores, on the first N train images at the first seed scale of the run, the
fused map with PAR (the MCTformer-V2 seed), without PAR, the patch-CAM alone, the class-to-patch attention alone and
with PAR, each min-max normalised per class and swept over 41 background thresholds (best printed). The README's
CSD section quotes it for Deviation 17 (a from-scratch ViT's patch attention is no affinity).
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
    variants = ("fused + PAR (seed)", "fused, no PAR", "patch-CAM", "A_cp", "A_cp + PAR")
    sweeps = {v: miou.ThresholdSweep(ds.num_classes, thresholds=np.linspace(0, 1, 41)) for v in variants}
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
            for v, m in maps.items():
                m = F.interpolate(m[:, keys], size=s["mask"].shape, mode="bilinear", align_corners=False)[0]
                lo, hi = m.flatten(1).min(1)[0].view(-1, 1, 1), m.flatten(1).max(1)[0].view(-1, 1, 1)
                sweeps[v].update(((m - lo) / (hi - lo + 1e-5)).numpy(), keys + 1, s["mask"])
    print(f"{run}: first {min(n, len(ds))} train images, seed scale {args.seed_scales[0]}")
    for v, sweep in sweeps.items():
        r = sweep.compute()
        print(f"{v:20s} seed mIoU {100 * r['best']['miou']:.2f} at t = {r['best_threshold']:.3f}")


if __name__ == "__main__":
    main()
