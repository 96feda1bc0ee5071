"""common/miou.py on hand-computed cases."""
import numpy as np
import pytest
import torch

from common.miou import ConfusionMatrix, ThresholdSweep, format_table

GT = np.array([[0, 0, 1], [1, 2, 255]])
PRED = np.array([[0, 1, 1], [1, 0, 2]])


def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(3)
    cm.update(PRED, GT)
    # (gt, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel is skipped.
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    r = cm.compute()
    np.testing.assert_allclose(r["iou"], [1 / 3, 2 / 3, 0.0])  # tp / (gt + pred - tp)
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["miou_fg"] == pytest.approx(1 / 3)
    assert r["pixel_acc"] == pytest.approx(3 / 5)
    assert r["mean_acc"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert r["coverage"] == 1.0


def test_absent_class_is_nan_not_zero():
    cm = ConfusionMatrix(4)  # class 3 occurs in neither prediction nor ground truth
    cm.update(torch.tensor(PRED), torch.tensor(GT))
    r = cm.compute()
    assert np.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx(1 / 3)  # a 0 for class 3 would give 1/4
    assert "-" in format_table(r, ["bg", "a", "b", "c"]).splitlines()[3]


def test_predicted_only_class_counts_as_zero():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[2, 0]]), np.array([[0, 0]]))
    r = cm.compute()
    assert r["iou"][2] == 0.0 and np.isnan(r["iou"][1])
    assert r["miou"] == pytest.approx((0.5 + 0.0) / 2)


def test_pred_ignore_modes_and_coverage():
    gt = np.array([[0, 1, 1, 255]])
    pred = np.array([[0, 255, 1, 255]])
    with pytest.raises(ValueError, match="ignore"):
        ConfusionMatrix(2).update(pred, gt)
    cm = ConfusionMatrix(2)
    cm.update(pred, gt, pred_ignore="exclude")
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    assert cm.compute()["coverage"] == pytest.approx(2 / 3)  # 3 labelled pixels, 1 left unlabelled
    cm = ConfusionMatrix(2)
    cm.update(pred, gt, pred_ignore="background")
    assert cm.matrix.tolist() == [[1, 0], [1, 1]]


def test_accumulation_and_iadd():
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(PRED, GT)
    b.update(PRED, GT)
    a += b
    assert a.matrix.sum() == 10
    np.testing.assert_allclose(a.compute()["iou"], [1 / 3, 2 / 3, 0.0])  # ratios unchanged by doubling


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        ConfusionMatrix(3).update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match="ground truth"):
        ConfusionMatrix(3).update(np.zeros((1, 1), int), np.array([[5]]))


def test_threshold_sweep_full_curve_by_hand():
    gt = np.array([[0, 1], [2, 0]])
    cams = np.array([[[0.2, 0.7], [0.1, 0.4]],   # class 1
                     [[0.1, 0.3], [0.6, 0.5]]])  # class 2
    sweep = ThresholdSweep(3, thresholds=[0.05, 0.3, 0.55, 0.65])
    sweep.update(cams, np.array([1, 2]), gt)
    out = sweep.compute()
    # t=0.05: pred [[1,1],[2,2]] -> IoU (0, 1/2, 1/2); t=0.3: [[0,1],[2,2]] -> (1/2, 1, 1/2);
    # t=0.55: [[0,1],[2,0]] -> perfect; t=0.65: [[0,1],[0,0]] -> (2/3, 1, 0).
    np.testing.assert_allclose([m for _, m in out["curve"]], [1 / 3, 2 / 3, 1.0, 5 / 9])
    assert out["best_threshold"] == 0.55
    assert out["best"]["miou"] == pytest.approx(1.0)


def test_threshold_sweep_ties_go_to_background_and_no_classes():
    sweep = ThresholdSweep(2, thresholds=[0.5])
    sweep.update(np.array([[[0.5, 0.6]]]), np.array([1]), np.array([[0, 1]]))
    assert sweep.matrices[0].matrix.tolist() == [[1, 0], [0, 1]]
    sweep.update(np.zeros((0, 1, 2)), np.zeros(0, int), np.array([[0, 0]]))  # image without foreground classes
    assert sweep.matrices[0].matrix.tolist() == [[3, 0], [0, 1]]
