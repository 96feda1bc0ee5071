"""Confusion-matrix mIoU and the background-threshold sweep used to score CAM seeds.

Conventions (../shared/methods/common.md §3.3): ground-truth 255 is skipped; a class absent from
both the prediction and the ground truth has IoU NaN and is left out of the mean (never counted as
0, which would punish small evaluation sets where some classes never occur). Rows of the matrix
are ground truth, columns prediction. Values are fractions in [0, 1]; scripts report percent.
"""
from __future__ import annotations

import numpy as np

__all__ = ["ConfusionMatrix", "ThresholdSweep", "format_table", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)


def _as_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x)


class ConfusionMatrix:
    """Accumulates a (C, C) int64 confusion matrix over images of any size."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes, self.ignore_index = int(num_classes), ignore_index
        self.reset()

    def reset(self) -> None:
        self.matrix = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)
        self.labelled = 0  # GT pixels seen (not ignored), for `coverage`
        self.excluded = 0  # of those, pixels whose prediction was 255 and excluded

    def update(self, pred, gt, *, pred_ignore: str = "error") -> None:
        """Add one prediction/ground-truth pair of equal shape (numpy or torch integers).

        `pred_ignore` says what a prediction of 255 means: "error" (not allowed), "exclude" (an
        uncertain pseudo-label pixel: left out, and counted against `coverage`) or "background".
        """
        pred, gt = _as_numpy(pred).astype(np.int64), _as_numpy(gt).astype(np.int64)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
        valid = gt != self.ignore_index
        if np.any(gt[valid] >= self.num_classes) or np.any(gt[valid] < 0):
            raise ValueError(f"ground truth holds values outside 0..{self.num_classes - 1} and {self.ignore_index}")
        self.labelled += int(valid.sum())
        unsure = pred == self.ignore_index
        if unsure.any():
            if pred_ignore == "error":
                raise ValueError("prediction holds the ignore value; pass pred_ignore='exclude' or 'background'")
            if pred_ignore == "background":
                pred = np.where(unsure, 0, pred)
            elif pred_ignore == "exclude":
                self.excluded += int((valid & unsure).sum())
                valid &= ~unsure
            else:
                raise ValueError(f"unknown pred_ignore {pred_ignore!r}")
        if np.any(pred[valid] >= self.num_classes) or np.any(pred[valid] < 0):
            raise ValueError(f"prediction holds values outside 0..{self.num_classes - 1}")
        # One bincount over C * gt + pred fills the whole matrix.
        index = self.num_classes * gt[valid] + pred[valid]
        self.matrix += np.bincount(index, minlength=self.num_classes ** 2).reshape(self.num_classes, self.num_classes)

    def __iadd__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        if other.num_classes != self.num_classes:
            raise ValueError("cannot add confusion matrices of different sizes")
        self.matrix += other.matrix
        self.labelled += other.labelled
        self.excluded += other.excluded
        return self

    def compute(self) -> dict:
        """IoU per class (NaN where GT ∪ prediction is empty), their nanmean, accuracies and coverage."""
        m = self.matrix.astype(np.float64)
        tp, gt_count, pred_count = np.diag(m), m.sum(1), m.sum(0)
        union = gt_count + pred_count - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            class_acc = np.where(gt_count > 0, tp / gt_count, np.nan)
        total = m.sum()
        nanmean = lambda v: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")
        return {
            "iou": iou,
            "miou": nanmean(iou),
            "miou_fg": nanmean(iou[1:]),
            "pixel_acc": float(tp.sum() / total) if total else float("nan"),
            "mean_acc": nanmean(class_acc),
            # Share of labelled pixels that received a (non-255) label: 1.0 for dense predictions.
            "coverage": 1.0 - self.excluded / self.labelled if self.labelled else float("nan"),
        }


def format_table(result: dict, class_names) -> str:
    """Per-class IoU in percent, one class per line, then mIoU; '-' marks NaN classes."""
    lines = []
    for name, value in zip(class_names, result["iou"]):
        lines.append(f"{name:>16s} {'-' if np.isnan(value) else f'{100 * value:6.2f}'}")
    lines.append(f"{'mIoU':>16s} {100 * result['miou']:6.2f}")
    return "\n".join(lines)


class ThresholdSweep:
    """Seed mIoU for every constant background score t, as in the WSSS seed evaluations.

    Per threshold t the prediction is `[0, *keys][argmax([t, *cams])]`: background wins wherever
    no foreground CAM of the image's present classes exceeds t. Every threshold is evaluated (no
    early stop at the first drop, unlike MCTformer's `--curve`).
    """

    def __init__(self, num_classes: int, thresholds=DEFAULT_THRESHOLDS, ignore_index: int = 255):
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.matrices = [ConfusionMatrix(num_classes, ignore_index) for _ in self.thresholds]

    def update(self, cams, keys, gt) -> None:
        """cams float (K, H, W) in [0, 1] for the K present foreground classes; keys int (K,) in 1..C-1."""
        cams, keys, gt = _as_numpy(cams).astype(np.float32), _as_numpy(keys).astype(np.int64), _as_numpy(gt)
        if cams.ndim != 3 or cams.shape[0] != keys.shape[0] or cams.shape[1:] != gt.shape:
            raise ValueError(f"cams {cams.shape}, keys {keys.shape} and gt {gt.shape} do not fit together")
        lookup = np.concatenate([[0], keys])
        if len(keys):
            best, arg = cams.max(0), cams.argmax(0) + 1  # (H, W): strongest foreground score and its slot
        else:
            best, arg = np.full(gt.shape, -np.inf, np.float32), np.zeros(gt.shape, np.int64)
        for t, matrix in zip(self.thresholds, self.matrices):
            # argmax([t, *cams]) returns the first maximum, so ties go to background.
            matrix.update(lookup[np.where(best > t, arg, 0)], gt)

    def compute(self) -> dict:
        results = [m.compute() for m in self.matrices]
        curve = [(float(t), r["miou"]) for t, r in zip(self.thresholds, results)]
        scores = np.array([r["miou"] for r in results], dtype=np.float64)
        best = int(np.nanargmax(scores)) if np.any(~np.isnan(scores)) else 0
        return {"best_threshold": float(self.thresholds[best]), "best": results[best], "curve": curve}
