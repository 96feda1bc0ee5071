"""The three WSSS errors of data/README.md, measured on label maps (seeds, pseudo labels or predictions) of the toy.

    python tests/bench/toy_errors.py LABEL_DIR [--data toy] [--split train]

LABEL_DIR holds <id>.png label maps (VOC palette or plain indices, 255 = ignore) for ids of the split, e.g.
runs/cosa/<run>/pseudo_labels/cpl/train. Printed, in percent:
- context spill: of the visible context pixels (toy context/<id>.png: water, rails, grass) in images that
  contain the context's class, the fraction labelled as that class (the ground truth says background);
- large-object recall: mean recall over (image, class) pairs whose class covers >= 15% of the image
  (partial activation shows as low recall on large objects), beside the recall over all pairs;
- co-occurrence confusion: of the ground-truth foreground pixels, the fraction labelled as ANOTHER class that
  co-occurs with the true one in the toy (TOY_COOCCUR > 0), beside the fraction labelled as a class that never does.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import data  # noqa: E402


def toy_errors(root, split, label_dir):
    ds = data.SegDataset(root, split)
    C = ds.num_classes
    cooccur = (data.TOY_COOCCUR + data.TOY_COOCCUR.T) > 0  # (C-1, C-1) foreground pairs seen together
    conf = np.zeros((C, C), np.int64)
    spill = {k: [0, 0] for k in data.TOY_CONTEXT.values()}
    large, every = [], []
    for i, name in enumerate(ds.ids):
        path = Path(label_dir) / f"{name}.png"
        if not path.is_file():
            continue
        pred, gt = data.read_mask(path), ds.load(i)["mask"]
        context = data.read_mask(Path(root) / "context" / f"{name}.png")
        valid = (gt != 255) & (pred != 255)
        conf += np.bincount(C * gt[valid].astype(np.int64) + pred[valid], minlength=C * C).reshape(C, C)
        for cls, kind in data.TOY_CONTEXT.items():
            where = context == list(data.TOY_CONTEXT.values()).index(kind) + 1
            if where.any() and (gt == cls).any():
                spill[kind][0] += int((pred[where] == cls).sum())
                spill[kind][1] += int(where.sum())
        for cls in np.unique(gt[(gt > 0) & (gt != 255)]):
            region = gt == cls
            recall = float((pred[region] == cls).mean())
            every.append(recall)
            if region.mean() >= 0.15:
                large.append(recall)
    fg = conf[1:].sum()
    off = conf[1:, 1:].astype(float)
    np.fill_diagonal(off, 0)
    return {
        "context_spill": {k: round(100 * a / max(b, 1), 2) for k, (a, b) in spill.items()},
        "context_spill_all": round(100 * sum(a for a, _ in spill.values()) / max(1, sum(b for _, b in spill.values())), 2),
        "large_object_recall": round(100 * float(np.mean(large)), 2) if large else None,
        "object_recall": round(100 * float(np.mean(every)), 2) if every else None,
        "large_objects": len(large),
        "cooccur_confusion": round(100 * off[cooccur].sum() / max(fg, 1), 2),
        "never_cooccur_confusion": round(100 * off[~cooccur & ~np.eye(C - 1, dtype=bool)].sum() / max(fg, 1), 2),
        "images": int(sum(1 for n in ds.ids if (Path(label_dir) / f"{n}.png").is_file())),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("label_dir")
    p.add_argument("--data", default="toy")
    p.add_argument("--split", default="train")
    a = p.parse_args()
    print(json.dumps(toy_errors(data.resolve_data(a.data).root, a.split, a.label_dir), indent=1))


if __name__ == "__main__":
    main()
