"""Tests for csd.py --mask-method irn (IRNet masks from the MCTformer-V2 seeds): the IRN functions copied from
cobra.py (same logic as there, and the unit tests of tests/test_cobra.py on csd's copies), IRNet's background rule
of final_mask(), the wiring of the IR labels / IRN training / random walk into csd's seeds, and CLI runs (smoke,
resume inside the IRN stage, --eval-only, --supervision full) on the tiny toy set. Each test's docstring names
the planted bug it catches."""
import ast
import copy
import functools
import importlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from test_csd import ROOT, TINY, results_of, run_cli, tiny_args

csd = importlib.import_module("csd")
from common import data  # noqa: E402

IRN_TINY = [*TINY, "--mask-method", "irn", "--irn-batch", "4", "--irn-crop", "64"]


# ------------------------------------------------------------------------------------------------
# The copy of cobra.py's IRN code
# ------------------------------------------------------------------------------------------------
COPIED = ("set_layer4_stride1", "create_resnet", "IRNEdge", "path_offsets", "pair_affinity", "pair_labels",
          "loss_irn_affinity", "make_ir_label", "transition_weights", "random_walk", "infer_edge", "irn_transform")


@functools.lru_cache
def parsed(source_file):
    return ast.parse(Path(source_file).read_text())


def logic_of(source_file, name):
    """The AST of a top-level function / class without docstrings (comments are not in the AST)."""
    node = copy.deepcopy(next(n for n in parsed(source_file).body if getattr(n, "name", None) == name))
    for n in ast.walk(node):
        body = getattr(n, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            n.body = body[1:] or [ast.Pass()]
    return ast.dump(node)


@pytest.mark.parametrize("name", COPIED)
def test_irn_code_is_cobras(name):
    """Catches: a fix or edit made in one copy of the IRN code only (csd.py and cobra.py must diff clean here)."""
    assert logic_of(ROOT / "csd.py", name) == logic_of(ROOT / "cobra.py", name), \
        f"{name}: csd.py and cobra.py differ; edit both copies"


# ------------------------------------------------------------------------------------------------
# Unit tests of the copied functions (tests/test_cobra.py, on csd's module)
# ------------------------------------------------------------------------------------------------
def test_path_offsets_radius_3():
    """Catches: a changed half-disk of displacements or a wrong line rasterisation (pairs of the wrong pixels)."""
    dirs, paths = csd.path_offsets(3)
    assert dirs == [(0, 1), (0, 2), (1, -2), (1, -1), (1, 0), (1, 1), (1, 2), (2, -2), (2, -1), (2, 0), (2, 1), (2, 2)]
    assert paths[dirs.index((0, 2))] == [(0, 0), (0, 1), (0, 2)]
    assert paths[dirs.index((1, 1))] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert paths[dirs.index((2, 2))] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 1), (2, 2)]


def test_irn_affinity_loss_hand_computed():
    """Catches: the negative term's weight (1/2) or its log(1 - a) form changed, 255 pairs not ignored."""
    label = torch.tensor([[[0, 0], [1, 255]]])
    edge_logits = torch.full((1, 1, 2, 2), -1e4)  # no edges anywhere -> a = 1 on every path
    loss = csd.loss_irn_affinity(edge_logits, label, radius=2)
    # bg+ = {(0,0)-(0,1)}, fg+ = {}, neg = {(0,0)-(1,0), (0,1)-(1,0)}: (0/2 + 0/2)/2 + (-log 1e-5)/2
    assert loss.item() == pytest.approx(-math.log(1e-5) / 2, rel=1e-3)


def test_random_walk_properties():
    """Catches: a non-symmetric or non-stochastic transition matrix, the sparse walk taking another number of
    steps than IRNet's dense T^(2^exp_times), the seeds not damped by (1 - edge)."""
    torch.manual_seed(0)
    h, w = 5, 6
    edge = torch.rand(h, w)
    W, colsum = csd.transition_weights(edge, 3, 2.0)
    Wd = W.to_dense()
    torch.testing.assert_close(Wd, Wd.t())
    torch.testing.assert_close(torch.diagonal(Wd), torch.ones(h * w))
    torch.testing.assert_close((Wd / colsum[None]).sum(0), torch.ones(h * w))
    x = torch.rand(2, h, w)
    dense = csd.random_walk(x, edge, 3, 2.0, 3, dense=True)
    sparse = csd.random_walk(x, edge, 3, 2.0, 3)
    torch.testing.assert_close(dense, sparse, atol=1e-5, rtol=1e-4)
    v = x * (1 - edge)
    for k in range(2):
        assert sparse[k].min() >= v[k].min() - 1e-6 and sparse[k].max() <= v[k].max() + 1e-6


def test_ir_label_values():
    """Catches: the fg / bg thresholds swapped, the 255 band lost, class ids taken from the channel index."""
    cam = np.zeros((2, 4, 4), np.float32)
    cam[0, :2, :2] = 0.9  # confident class 3
    cam[1, 2:, 2:] = 0.2  # between the thresholds -> 255
    lab = csd.make_ir_label(np.zeros((4, 4, 3), np.uint8), cam, np.array([3, 5]), 0.5, 0.1, use_crf=False)
    assert (lab[:2, :2] == 3).all() and (lab[2:, 2:] == 255).all() and lab[0, 3] == 0
    assert set(np.unique(lab)) <= {0, 255, 3, 5}


# ------------------------------------------------------------------------------------------------
# final_mask: IRNet's rule (not CoBra's alpha rule)
# ------------------------------------------------------------------------------------------------
def test_final_mask_irnet_rule_hand_values():
    """rw (K=2, 1, 2): class 3 = [0.8, 0.1], class 5 = 0.24 everywhere; x4 bilinear -> class 3 = 0.8, 0.8, 0.7125,
    0.5375, 0.3625, 0.1875, 0.1, 0.1; divided by the global max 0.8 -> 1, 1, .89, .67, .45, .23, .125, .125 and
    class 5 -> 0.3 > bg 0.25. Catches: a per-class max (class 5 -> 1 everywhere), no normalisation (class 3 wins
    everywhere), a straight resize to (H, W) instead of x4 + crop (pixel 4 turns to class 5 at W = 6)."""
    rw = torch.tensor([[[0.8, 0.1]], [[0.24, 0.24]]])
    keys = np.array([3, 5])
    assert csd.final_mask(rw, keys, 1, 8, 0.25).tolist() == [[3, 3, 3, 3, 3, 5, 5, 5]]
    assert csd.final_mask(rw, keys, 1, 6, 0.25).tolist() == [[3, 3, 3, 3, 3, 5]]
    assert csd.final_mask(rw, keys, 1, 8, 0.5).tolist() == [[3, 3, 3, 3, 0, 0, 0, 0]]  # 0.45 < 0.5 and 0.3 < 0.5


def test_final_mask_degenerate_walks():
    """Catches: an all-zero walk divided by 0 (NaN -> argmax picks a class), no-class images not all background."""
    assert csd.final_mask(torch.zeros(2, 2, 2), np.array([1, 2]), 6, 7, 0.25).tolist() == np.zeros((6, 7)).tolist()
    assert csd.final_mask(torch.zeros(0, 2, 2), np.array([], np.int64), 5, 5, 0.25).tolist() == np.zeros((5, 5)).tolist()


# ------------------------------------------------------------------------------------------------
# Wiring: IR labels, IRN training, random walk from csd's seeds
# ------------------------------------------------------------------------------------------------
class FakeSet:
    """A dataset of two images (8 x 12) with classes {1, 3} and {2} of C - 1 = 3."""

    ids = ["a", "b"]
    class_names = ["background", "x", "y", "z"]
    num_classes = 4

    def __len__(self):
        return 2

    def __getitem__(self, i):
        label = np.array([[1, 0, 1], [0, 1, 0]][i], np.float32)
        return {"name": self.ids[i], "image": np.full((8, 12, 3), 40 * i, np.uint8), "label": label,
                "mask": np.zeros((8, 12), np.uint8)}


def fake_cache():
    g = torch.Generator().manual_seed(0)
    return {"a": csd.LowresMaps([torch.rand(2, 2, 2, 3, generator=g).half()], "minmax"),
            "b": csd.LowresMaps([torch.rand(2, 1, 2, 3, generator=g).half()], "minmax")}


def fake_ctx(args, tmp_path):
    return SimpleNamespace(args=args, splits={"train": "train_aug", "seed": "train"}, run_dir=tmp_path,
                           device=torch.device("cpu"), main=True)


def fake_each_sample(ctx, dataset, desc, fn=None, shard=False, limit=0):
    for i in range(len(dataset)):
        yield fn(dataset[i]) if fn else dataset[i]


def test_ir_labels_from_the_present_class_seeds(monkeypatch, tmp_path):
    """Catches: the IR labels fed all C - 1 seed channels (absent classes too) or 0-based keys, --ir-fg / --ir-bg
    swapped or not passed, --mask-crf not reaching the IR labels' CRF, the seeds' threshold t used instead."""
    seen = []
    monkeypatch.setattr(csd, "each_sample", fake_each_sample)
    monkeypatch.setattr(csd, "make_ir_label", lambda image, cam, keys, fg, bg, use_crf=True:
                        seen.append((cam, keys, fg, bg, use_crf)) or np.zeros(image.shape[:2], np.uint8))
    args = tiny_args(ir_fg=0.4, ir_bg=0.1)
    cache = fake_cache()
    csd.write_labels(fake_ctx(args, tmp_path), cache, FakeSet(), 0.9, tmp_path / "ir", True, "ir", ir=True)
    for (cam, keys, fg, bg, use_crf), s in zip(seen, (FakeSet()[0], FakeSet()[1])):
        full = csd.seed_from_lowres(cache[s["name"]], s["label"], (8, 12))
        want_keys = np.flatnonzero(s["label"]) + 1
        assert keys.tolist() == want_keys.tolist() and (fg, bg, use_crf) == (0.4, 0.1, True)
        np.testing.assert_array_equal(cam, full[want_keys - 1])
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["a.png", "b.png"]


def test_random_walk_from_the_strided_seeds(monkeypatch, tmp_path):
    """Catches: the walk started from the full-resolution seed or from absent classes, --irn-radius (training pairs)
    passed instead of --rw-radius, --rw-beta / --rw-exp-times / --mask-bg not passed, the masks not written to
    the folder train_seg reads, the score under another key than mask/<seed split>."""
    args = tiny_args(rw_radius=4, rw_beta=7.0, rw_exp_times=3, irn_radius=6, mask_bg=0.35, irn_crop=64)
    cache, walks, finals = fake_cache(), [], []
    monkeypatch.setattr(csd, "each_sample", fake_each_sample)
    monkeypatch.setattr(csd, "compute_maps", lambda ctx, model, datasets, desc: cache)
    monkeypatch.setattr(csd, "infer_edge", lambda irn, image, crop, device: torch.full((2, 3), 0.25))
    monkeypatch.setattr(csd, "random_walk", lambda x, edge, radius, beta, exp_times:
                        walks.append((x, edge, radius, beta, exp_times)) or 2 * x)
    monkeypatch.setattr(csd, "final_mask", lambda rw, keys, H, W, bg:
                        finals.append((rw, keys, H, W, bg)) or np.full((H, W), keys[0], np.uint8))
    out = tmp_path / "pseudo_labels" / "mask" / "train_aug"
    res = csd.irn_masks(fake_ctx(args, tmp_path), None, nn.Identity(), FakeSet(), FakeSet(), out)
    for i, ((x, edge, radius, beta, times), (rw, keys, H, W, bg)) in enumerate(zip(walks, finals)):
        s = FakeSet()[i]
        want_keys = np.flatnonzero(s["label"]) + 1
        want = csd.seed_from_lowres(cache[s["name"]], s["label"], (2, 3))[want_keys - 1]  # ceil(8/4), ceil(12/4)
        np.testing.assert_array_equal(x.numpy(), want)
        assert (radius, beta, times) == (4, 7.0, 3) and (H, W, bg) == (8, 12, 0.35)
        assert keys.tolist() == want_keys.tolist() and torch.equal(rw, 2 * x)
    assert len(walks) == 2 and list(res) == ["mask/train"]
    assert data.read_mask(out / "a.png").tolist() == np.full((8, 12), 1).tolist()
    assert data.read_mask(out / "b.png").tolist() == np.full((8, 12), 2).tolist()


def test_train_irn_optimizer_and_loss(monkeypatch, toy_root):
    """Catches: the IRN SGD taking csd's classifier --weight-decay (AdamW 0.05) or no momentum setting instead of
    --irn-momentum / --irn-weight-decay, frozen backbone parameters in the optimizer, the loss on the wrong label
    or with --rw-radius, the reseed salt, the epoch count or batch of the schedule."""
    args = tiny_args(irn_batch=4, irn_epochs=3, irn_lr=0.3, irn_momentum=0.25, irn_weight_decay=0.003, irn_radius=3,
                     rw_radius=5, max_iters=0)
    got, reseeds, rec = {}, [], {}

    class Irn(nn.Module):
        def __init__(self):
            super().__init__()
            self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)
            self.edge = nn.Parameter(torch.ones(1, 1, 2, 2))

        def forward(self, x):
            self.seen = x
            return self.edge.to(torch.bfloat16)

    irn = Irn()
    monkeypatch.setattr(csd, "build_irn", lambda a, init_weights: irn)
    monkeypatch.setattr(csd.data, "SegDataset", lambda *a, **kw: list(range(10)))
    monkeypatch.setattr(csd, "train_loop", lambda ctx, stage, ds, bs, total, step, modules, lr=None, salt=0:
                        got.update(stage=stage, bs=bs, total=total, step=step, modules=modules, lr=lr, salt=salt))
    monkeypatch.setattr(csd, "loss_irn_affinity", lambda logits, label, radius:
                        rec.update(logits=logits, label=label, radius=radius) or logits.sum())
    ctx = SimpleNamespace(args=args, spec=SimpleNamespace(root=toy_root, dataset="voc"), splits={"train": "train_aug"},
                          device=torch.device("cpu"), reseed=reseeds.append, wrap=lambda m: m, run_dir=Path("/nonexistent"),
                          autocast=lambda: torch.autocast("cpu", enabled=False))
    assert csd.train_irn(ctx) is irn and reseeds == [2]
    assert (got["stage"], got["bs"], got["total"], got["salt"]) == ("irn", 4, 3 * (10 // 4), 2)
    (group,) = got["modules"]["optimizer"].param_groups
    assert group["params"] == [irn.edge] and (group["lr"], group["momentum"], group["weight_decay"]) == (0.3, 0.25, 0.003)
    assert got["lr"](3) == pytest.approx(csd.poly_lr(3, 6))
    got["step"]({"image": "img", "ir": "ir-label"}, 0)
    assert irn.seen == "img" and rec["label"] == "ir-label" and rec["radius"] == 3
    assert rec["logits"].dtype == torch.float32


def test_irn_backbone_presets():
    """Catches: the paper preset's IRN built from timm's untagged resnet50 (a1_in1k, the RSB recipe) instead of
    IRNet's torchvision weights, or IRNet's defaults (0.30 / 0.05 / 0.25, 3 epochs, radius 10 / 5) drifting."""
    a = csd.Args()
    assert a.mask_method == "crf" and a.irn_backbone == "resnet50.tv_in1k"
    assert (a.ir_fg, a.ir_bg, a.mask_bg, a.irn_epochs, a.irn_radius, a.rw_radius) == (0.30, 0.05, 0.25, 3, 10, 5)
    assert csd.PRESETS["toy"]["irn_backbone"] == "resnet18"


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def irn_run(toy_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("csd_irn") / "run"
    r = run_cli("--data", toy_root, "--out", out, *IRN_TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_irn_smoke(irn_run, toy_root, tmp_path):
    """Catches: the IRN stages skipped or the CRF masks written under --mask-method irn (masks equal to the crf run's
    with the same seeds), mask/train missing or scored from another method, masks that are no label maps of the
    image size, IR labels without the 255 band, no checkpoint for the IRN stage (--resume would retrain it)."""
    m = json.loads((irn_run / "metrics.json").read_text())
    res = m["results"]
    assert res["mask/train"]["method"] == "IRN random walk" and 0 <= res["mask/train"]["miou"] <= 100
    assert {"seeds", "irn", "masks", "seg"} <= set(m["stage_seconds"]) and "seg/val" in res
    assert (irn_run / "checkpoints" / "irn.pt").is_file()
    crf_out = tmp_path / "crf"
    r = run_cli("--data", toy_root, "--out", crf_out, *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    assert results_of(crf_out)["seed/train"] == res["seed/train"]  # the same seeds feed both mask methods
    ds = data.SegDataset(toy_root, "train_aug")
    ir_values, differ = set(), 0
    for i, name in enumerate(ds.ids):
        mask = data.read_mask(irn_run / "pseudo_labels" / "mask" / "train_aug" / f"{name}.png")
        assert mask.shape == ds.load(i)["mask"].shape and mask.max() < ds.num_classes
        differ += not np.array_equal(mask, data.read_mask(crf_out / "pseudo_labels" / "mask" / "train_aug" / f"{name}.png"))
        ir_values |= set(np.unique(data.read_mask(irn_run / "pseudo_labels" / "ir" / "train_aug" / f"{name}.png")).tolist())
    assert differ > 0 and 255 in ir_values


def test_irn_resume_inside_the_irn_stage(irn_run, toy_root, tmp_path):
    """Stopped inside the IRN stage (iteration 5 = 2 stage-1 + 2 classifier + 1 IRN), then resumed: the same results.
    Catches: the IRN stage without its own checkpoint / reseed, the IRN weights not reloaded for the masks."""
    out = tmp_path / "run"
    r = run_cli("--data", toy_root, "--out", out, *IRN_TINY, "--stop-after", "5")
    assert r.returncode == 0 and not (out / "metrics.json").exists(), r.stderr[-2000:]
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["state"]["stage"] == "irn"
    r = run_cli("--resume", out, "--stop-after", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert results_of(out) == results_of(irn_run)


def test_irn_eval_only_reproduces_masks(irn_run, toy_root, tmp_path):
    """Catches: the IRN left out of the final checkpoint (--eval-only would rebuild the masks with a random IRN)."""
    out = tmp_path / "eval"
    r = run_cli("--data", toy_root, "--out", out, *IRN_TINY, "--eval-only", "--ckpt", irn_run / "checkpoints" / "last.pt")
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = results_of(out), results_of(irn_run)
    for key in ("seed/train", "mask/train", "seg/val"):
        assert got[key] == want[key], key


def test_irn_with_full_supervision_runs_no_irn(toy_root, tmp_path):
    """Catches: --mask-method irn building IR labels / training the IRN / writing masks under --supervision full."""
    out = tmp_path / "full"
    r = run_cli("--data", toy_root, "--out", out, *IRN_TINY, "--supervision", "full")
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["stage_seconds"]) == {"seg"} and set(m["results"]) == {"seg/val"}
    assert not any((out / "pseudo_labels").iterdir()) and not (out / "checkpoints" / "irn.pt").exists()
