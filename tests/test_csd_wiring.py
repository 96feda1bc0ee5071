"""Wiring tests for csd.py: which tensor of which network and view feeds each loss of Eq. (6), teacher mode and
stop-gradient, the loss weights and thresholds, each component switch, the triplet (x_m, c_s, x_s, M_fg, R_bg),
train_step, the two training stages' closures (CSD gate, LR schedule, seeds) and the stage order in main().

Hand-made inputs, a small deterministic stub network whose maps depend on train/eval mode (a stand-in for
drop-path), recording wrappers around the loss functions, and independent reference formulas.
Each test's docstring names the planted bugs it catches. CSD_UNDER_TEST=/path/to/csd.py runs the same tests
against another copy (mutation testing); by default the repository's csd.py is imported.
"""
import contextlib
import importlib
import importlib.util
import math
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


def _load():
    path = os.environ.get("CSD_UNDER_TEST")
    if not path:
        return importlib.import_module("csd")
    spec = importlib.util.spec_from_file_location("csd_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["csd_under_test"] = mod
    spec.loader.exec_module(mod)
    return mod


csd = _load()

C, P, CROP, B = 3, 4, 16, 2  # classes, patch size, crop, batch: 4 x 4 tokens


def args_for(**kw):
    """Toy preset with distinct, non-default lambdas / temperature / dummy so a swap or a dropped kwarg shows."""
    args = csd.Args()
    for k, v in csd.PRESETS["toy"].items():
        setattr(args, k, v)
    args.crop_size, args.csd_resize, args.patch_size = CROP, CROP, P
    args.lambda_fg, args.lambda_bg, args.kl_temp, args.bg_dummy = 0.3, 0.7, 1.7, 0.25
    for k, v in kw.items():
        setattr(args, k, v)
    return args


class StubNet(nn.Module):
    """Per-image deterministic MCTformer-shaped outputs. Train mode multiplies the maps by 1.6 (the drop-path
    stand-in: a teacher left in train mode changes M_s). Records every call's input, mode and grad mode."""

    def __init__(self):
        super().__init__()
        self.num_classes, self.patch_size = C, P
        self.w = nn.Parameter(torch.tensor([0.9, 1.3, 0.6]).view(1, C, 1, 1))
        g = torch.Generator().manual_seed(5)
        N = (CROP // P) ** 2
        self.register_buffer("attn_base", torch.softmax(torch.randn(2, C + N, C + N, generator=g), -1))
        self.calls = []

    def forward(self, x):
        self.calls.append({"x": x.detach().clone(), "training": self.training, "grad": torch.is_grad_enabled()})
        pooled = F.avg_pool2d(x, P)  # (n, 3, h, w)
        cam = self.w * pooled * torch.tensor([1.0, 2.0, 3.0]).view(1, C, 1, 1)  # (n, C, h, w)
        if self.training:
            cam = cam * 1.6
        n = x.shape[0]
        attn = self.attn_base.expand(n, -1, -1, -1) * (1 + pooled.mean((1, 2, 3)).abs().view(n, 1, 1, 1))
        return {"cls_logits": cam.amax((2, 3)), "patch_cam": cam, "patch_logits": cam.mean((2, 3)), "attn": attn}


def stub_maps(net, x, train):
    """The stub's patch-CAM on x in the given mode, without recording."""
    calls = list(net.calls)
    was = net.training
    net.train(train)
    with torch.no_grad():
        out = net(x)
    net.train(was)
    net.calls = calls
    return out


def hand_batch(seed=0):
    """B = 2 images; M_fg, M_bg and R_bg all different (and R_bg != ~M_fg) so a swapped mask shows."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    M_fg = torch.zeros(B, CROP, CROP, dtype=torch.bool)
    M_fg[0, :8, :11] = True  # tokens (0-1, 0-1) full, column 2 three quarters (majority, not full)
    M_fg[1, 4:16, 8:16] = True
    M_bg = ~M_fg
    M_bg[:, 0, :] = False  # a padded row in neither mask
    R_bg = M_bg.clone()
    R_bg[:, 8:12, :] = False  # intersect-like: part of M_bg is the target's objects
    return {"image": r(B, 3, CROP, CROP), "label": torch.tensor([[1.0, 0, 1], [0, 1, 1]]),
            "x_s": r(B, 3, CROP, CROP), "x_fg": r(B, 3, CROP, CROP), "x_bg": r(B, 3, CROP, CROP),
            "M_fg": M_fg, "M_bg": M_bg, "R_bg": R_bg, "c_s": torch.tensor([2, 0]),
            "y_fg": torch.tensor([[1.0, 1, 1], [1, 1, 0]])}


def ref_token_mask(m, mode="full"):
    cover = m.float().reshape(m.shape[0], CROP // P, P, CROP // P, P).mean((2, 4))
    return cover >= 1.0 if mode == "full" else cover > 0.5


def ref_reduce(kl, mask, reduce):
    per = (kl * mask).sum((1, 2))
    if reduce == "mean":
        per = per / mask.sum((1, 2)).clamp(min=1)
    return per.mean()


def ref_fg(M_s, M_q, mask, temp, reduce="sum"):
    log_p, log_q = F.log_softmax(M_s / temp, 1), F.log_softmax(M_q / temp, 1)
    return ref_reduce((log_p.exp() * (log_p - log_q)).sum(1), mask, reduce)


def ref_bg(M_s, M_q, mask, temp, dummy, reduce="sum"):
    """Eq. (4)/(5) saliency reconstruction as a Bernoulli KL on pi_0 = sigmoid(M'/T - logsumexp(M/T))."""
    a = torch.sigmoid(dummy / temp - torch.logsumexp(M_s / temp, 1))
    b = torch.sigmoid(dummy / temp - torch.logsumexp(M_q / temp, 1))
    return ref_reduce(a * torch.log(a / b) + (1 - a) * torch.log((1 - a) / (1 - b)), mask, reduce)


def ref_cls(out, y):
    mlsm = lambda z: -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).mean()
    return mlsm(out["cls_logits"]) + mlsm(out["patch_logits"])


def recorder(monkeypatch, name):
    calls, orig = [], getattr(csd, name)

    def wrapped(*a, **k):
        out = orig(*a, **k)
        calls.append((a, k, out))
        return out

    monkeypatch.setattr(csd, name, wrapped)
    return calls


def run_losses(args, batch=None, active=True):
    torch.manual_seed(0)
    net = StubNet().train()
    batch = batch or hand_batch()
    out = csd.csd_losses(net, batch, args, C, active)
    return net, batch, out


# ------------------------------------------------------------------------------------------------
# csd_losses: forwards, teacher, views, masks, kwargs, Eq. (6)
# ------------------------------------------------------------------------------------------------
def test_forwards_student_views_then_teacher_in_eval_no_grad():
    """Catches: teacher in train mode / with grad / on the wrong view (x_fg, image); students on a wrong or
    reordered concatenation; the network left in eval mode after the teacher."""
    net, batch, _ = run_losses(args_for())
    assert len(net.calls) == 2
    student, teacher = net.calls
    assert student["training"] and student["grad"]
    assert torch.equal(student["x"], torch.cat([batch["image"], batch["x_fg"], batch["x_bg"]]))
    assert not teacher["training"] and not teacher["grad"]
    assert torch.equal(teacher["x"], batch["x_s"])
    assert net.training  # restored


def test_loss_fg_and_loss_bg_inputs(monkeypatch):
    """Catches: M_sm^fg / M_sm^bg slices swapped or off by B (the Eq. 5 typo: F(x_fg) in L_bg); the teacher
    from train mode or not detached; T_fg from R_bg, T_bg from M_fg or M_bg; the patch size; --token-mask,
    --kl-temp, --kl-classes, --bg-dummy, --bg-kl, --reduce not passed (or passed to the other loss)."""
    fg, bg = recorder(monkeypatch, "loss_fg"), recorder(monkeypatch, "loss_bg")
    for token_mode, reduce, kl_classes, bg_kl in (("full", "sum", "all", "saliency"), ("majority", "mean", "present", "full")):
        fg.clear(), bg.clear()
        args = args_for(token_mask=token_mode, reduce=reduce, kl_classes=kl_classes, bg_kl=bg_kl)
        net, batch, _ = run_losses(args)
        (a_fg, k_fg, _), = fg
        (a_bg, k_bg, _), = bg
        M_s = stub_maps(net, batch["x_s"], train=False)["patch_cam"]
        M_f = stub_maps(net, batch["x_fg"], train=True)["patch_cam"]
        M_b = stub_maps(net, batch["x_bg"], train=True)["patch_cam"]
        for a in (a_fg, a_bg):
            assert torch.allclose(a[0], M_s) and not a[0].requires_grad
        assert torch.allclose(a_fg[1], M_f) and a_fg[1].requires_grad
        assert torch.allclose(a_bg[1], M_b) and a_bg[1].requires_grad
        assert torch.equal(a_fg[2], ref_token_mask(batch["M_fg"], token_mode))
        assert torch.equal(a_bg[2], ref_token_mask(batch["R_bg"], token_mode))
        assert k_fg["temp"] == 1.7 and k_fg["classes"] == kl_classes and k_fg["reduce"] == reduce
        assert torch.equal(k_fg["c_s"], batch["c_s"])
        assert k_bg == {"dummy": 0.25, "mode": bg_kl, "temp": 1.7, "reduce": reduce}


def test_loss_cls_on_the_clean_stream_and_cls_on_paste(monkeypatch):
    """Catches: L_cls on the composites or the whole 3B batch, cls/patch logits of the wrong slice, the label
    of x_sm^fg (y_fg) swapped, --cls-on-paste ignored or always on."""
    calls = recorder(monkeypatch, "loss_cls")
    for paste in (False, True):
        calls.clear()
        net, batch, out = run_losses(args_for(cls_on_paste=paste))
        x_out = stub_maps(net, batch["image"], train=True)
        fg_out = stub_maps(net, batch["x_fg"], train=True)
        assert len(calls) == 1 + paste
        a, _, l0 = calls[0]
        assert set(a[0]) >= {"cls_logits", "patch_logits"}
        for key in ("cls_logits", "patch_logits"):
            assert torch.allclose(a[0][key], x_out[key])
        assert torch.equal(a[1], batch["label"])
        expected = ref_cls(x_out, batch["label"])
        if paste:
            a2, _, _ = calls[1]
            for key in ("cls_logits", "patch_logits"):
                assert torch.allclose(a2[0][key], fg_out[key])
            assert torch.equal(a2[1], batch["y_fg"])
            expected = expected + ref_cls(fg_out, batch["y_fg"])
        assert torch.allclose(out["cls"], expected, atol=1e-6)


def test_loss_cls_formula():
    """Catches: loss_cls dropping a term, using cls logits twice, or a sum reduction."""
    g = torch.Generator().manual_seed(3)
    out = {"cls_logits": torch.randn(2, 3, generator=g), "patch_logits": torch.randn(2, 3, generator=g)}
    y = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    assert torch.allclose(csd.loss_cls(out, y), ref_cls(out, y), atol=1e-6)


@pytest.mark.parametrize("consistency", ["dual", "fg", "bg"])
def test_eq6_values_weights_and_consistency_switch(consistency):
    """Eq. (6) with lambda1 != lambda2 against independent formulas. Catches: lambdas swapped or dropped,
    --consistency removing the wrong term (or both), L_fg / L_bg value wiring, the logged entries mislabelled,
    the token counts from the wrong mask."""
    args = args_for(consistency=consistency)
    net, batch, out = run_losses(args)
    M_s = stub_maps(net, batch["x_s"], train=False)["patch_cam"]
    M_f = stub_maps(net, batch["x_fg"], train=True)["patch_cam"]
    M_b = stub_maps(net, batch["x_bg"], train=True)["patch_cam"]
    T_fg, T_bg = ref_token_mask(batch["M_fg"]), ref_token_mask(batch["R_bg"])
    l_fg, l_bg = ref_fg(M_s, M_f, T_fg, 1.7), ref_bg(M_s, M_b, T_bg, 1.7, 0.25)
    l_cls = ref_cls(stub_maps(net, batch["image"], train=True), batch["label"])
    assert torch.allclose(out["fg"], l_fg, atol=1e-5) and torch.allclose(out["bg"], l_bg, atol=1e-5)
    assert torch.allclose(out["cls"], l_cls, atol=1e-6)
    lam_fg = 0.0 if consistency == "bg" else 0.3
    lam_bg = 0.0 if consistency == "fg" else 0.7
    assert torch.allclose(out["total"], l_cls + lam_fg * l_fg + lam_bg * l_bg, atol=1e-5)
    assert l_fg > 1e-3 and l_bg > 1e-3  # both terms matter
    assert out["tokens_fg"].item() == T_fg.float().sum((1, 2)).mean().item()
    assert out["tokens_bg"].item() == T_bg.float().sum((1, 2)).mean().item()


def test_csd_off_is_the_plain_baseline():
    """--csd off / warm-up: one train-mode forward on the clean batch, L_cls only. Catches: CSD terms or
    composites left in, the wrong view."""
    net, batch, out = run_losses(args_for(), active=False)
    assert set(out) == {"total", "cls"} and len(net.calls) == 1
    assert torch.equal(net.calls[0]["x"], batch["image"]) and net.calls[0]["training"]
    l_cls = ref_cls(stub_maps(net, batch["image"], train=True), batch["label"])
    assert torch.allclose(out["total"], l_cls, atol=1e-6) and torch.allclose(out["cls"], l_cls, atol=1e-6)


def test_gradients_reach_students_only():
    """Catches: a teacher that is not a stop-gradient (a gradient through F(x_s)), a student detached."""
    net = StubNet().train()
    batch = hand_batch()
    batch["x_s"].requires_grad_(True)
    batch["x_fg"].requires_grad_(True)
    batch["x_bg"].requires_grad_(True)
    out = csd.csd_losses(net, batch, args_for(), C, True)
    (out["fg"] + out["bg"]).backward()
    assert batch["x_s"].grad is None or batch["x_s"].grad.abs().max() == 0
    assert batch["x_fg"].grad.abs().max() > 0 and batch["x_bg"].grad.abs().max() > 0


def test_teacher_confidence_gate(monkeypatch):
    """dev-code gate of L_fg: min-max over space of the teacher's c_s channel > thr. Catches: the gate on the
    student, the wrong class channel, > vs <, the gate applied to T_bg, the gate on when thr < 0."""
    fg, bg = recorder(monkeypatch, "loss_fg"), recorder(monkeypatch, "loss_bg")
    for thr in (-1.0, 0.4):
        fg.clear(), bg.clear()
        net, batch, _ = run_losses(args_for(teacher_conf_thr=thr))
        M_s = stub_maps(net, batch["x_s"], train=False)["patch_cam"]
        m = M_s[torch.arange(B), batch["c_s"]]  # (B, h, w)
        lo, hi = m.amin((1, 2), keepdim=True), m.amax((1, 2), keepdim=True)
        gate = (m - lo) / (hi - lo + 1e-5) > thr
        T_fg = ref_token_mask(batch["M_fg"]) & (gate if thr >= 0 else True)
        assert torch.equal(fg[0][0][2], T_fg)
        assert torch.equal(bg[0][0][2], ref_token_mask(batch["R_bg"]))
        if thr >= 0:
            assert not torch.equal(T_fg, ref_token_mask(batch["M_fg"]))  # the gate removes something


def test_csd_score_map_choices():
    """Catches: patchcam returning another map, fused_par without PAR / with the wrong K."""
    net = StubNet().eval()
    out = net(torch.randn(2, 3, CROP, CROP))
    assert csd.csd_score_map(out, args_for(csd_map="patchcam"), C) is out["patch_cam"]
    args = args_for(csd_map="fused_par", layer_index=1)
    got = csd.csd_score_map(out, args, C)
    assert torch.allclose(got, ref_localization(out, 1, par=True), atol=1e-6)


def ref_localization(out, K, par=True):
    attn, cam = out["attn"], out["patch_cam"]
    n, _, h, w = cam.shape
    A_cp = attn[:, -K:, :C, C:].sum(1).reshape(n, C, h, w)
    fused = A_cp * cam.clamp(min=0)
    if not par:
        return fused
    A_pp = attn[:, :, C:, C:].sum(1)  # (n, N, N)
    return torch.einsum("nij,ncj->nci", A_pp, fused.flatten(2)).reshape(n, C, h, w)


def test_localization_map_layers_par_and_detached_cam():
    """MCTformer-V2 seeds: A_cp summed over the LAST K layers, x ReLU(CAM) (detached), PAR over all layers with
    query rows. Catches: first K layers, mean over layers, transposed A_pp, CAM not detached, no ReLU."""
    g = torch.Generator().manual_seed(1)
    N = 4
    attn = torch.rand(1, 3, C + N, C + N, generator=g).requires_grad_(True)
    cam = torch.randn(1, C, 2, 2, generator=g).requires_grad_(True)
    out = {"attn": attn, "patch_cam": cam}
    for K in (1, 2):
        for par in (False, True):
            assert torch.allclose(csd.localization_map(out, K, C, par=par), ref_localization(out, K, par), atol=1e-6)
    csd.localization_map(out, 2, C).sum().backward()
    assert cam.grad is None and attn.grad.abs().sum() > 0


@pytest.mark.parametrize("seed_par", [True, False])
def test_lowres_maps_follow_seed_par(seed_par):
    """The seeds are the fused map with PAR under --seed-par and without it under --no-seed-par, for the present
    classes, from the image and its flip, in eval mode. Catches: the flag ignored (PAR always / never), the flag
    inverted, absent classes kept, the flip view dropped."""
    net = StubNet().eval()
    args = args_for(seed_par=seed_par, layer_index=1, seed_scales=(1.0,))
    image = (np.arange(CROP * CROP * 3).reshape(CROP, CROP, 3) % 251).astype(np.uint8)
    label = np.array([1, 0, 1], np.float32)
    (got,) = csd.lowres_maps(net, image, label, args, torch.device("cpu"))
    with torch.no_grad():
        out = net(net.calls[0]["x"])  # the stub again on the input lowres_maps gave it
    want = ref_localization(out, 1, par=seed_par)[:, [0, 2]]
    assert got.shape == want.shape == (2, 2, CROP // P, CROP // P)
    assert torch.allclose(got.float(), want, rtol=1e-2, atol=1e-3)  # float16 storage
    assert not torch.allclose(want, ref_localization(out, 1, par=not seed_par)[:, [0, 2]], rtol=1e-2, atol=1e-3)
    assert torch.equal(net.calls[0]["x"][1], net.calls[0]["x"][0].flip(-1)) and not net.calls[0]["training"]


# ------------------------------------------------------------------------------------------------
# train_step
# ------------------------------------------------------------------------------------------------
def test_train_step_autocast_log_zero_grad_and_update(monkeypatch):
    """Catches: stale gradients (no zero_grad), backward of a part of the loss, no optimizer step, losses outside
    autocast, log keys renamed, csd_active not forwarded."""
    args = args_for()
    net = StubNet().train()
    batch = hand_batch()
    ref = StubNet().train()
    out_ref = csd.csd_losses(ref, batch, args, C, True)
    out_ref["total"].backward()
    expected = net.w.detach() - 0.5 * ref.w.grad
    net.w.grad = torch.full_like(net.w, 100.0)  # stale
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    state = {"inside": False, "seen": []}

    @contextlib.contextmanager
    def autocast():
        state["inside"] = True
        yield
        state["inside"] = False

    orig = csd.csd_losses

    def spy(*a, **k):
        state["seen"].append((state["inside"], a[4]))
        return orig(*a, **k)

    monkeypatch.setattr(csd, "csd_losses", spy)
    log = csd.train_step(net, batch, 7, args, C, True, opt, autocast)
    assert state["seen"] == [(True, True)]
    assert torch.allclose(net.w.detach(), expected, atol=1e-6)
    assert set(log) == {"losses/total", "losses/cls", "losses/fg", "losses/bg", "csd/tokens_fg", "csd/tokens_bg"}
    assert abs(log["losses/total"] - out_ref["total"].item()) < 1e-5 and abs(log["losses/fg"] - out_ref["fg"].item()) < 1e-5
    assert log["csd/tokens_fg"] == out_ref["tokens_fg"].item()
    state["seen"].clear()
    csd.train_step(net, batch, 8, args, C, False, opt, autocast)
    assert state["seen"] == [(True, False)]


def test_train_step_non_finite_stops_before_the_update():
    """Catches: the finite check after optimizer.step (weights already corrupted) or dropped."""
    net = StubNet().train()
    batch = hand_batch()
    batch["image"][0, 0, 0, 0] = float("nan")
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    w0 = net.w.detach().clone()
    with pytest.raises(csd.NonFinite):
        csd.train_step(net, batch, 3, args_for(), C, True, opt, contextlib.nullcontext)
    assert torch.equal(net.w.detach(), w0)


# ------------------------------------------------------------------------------------------------
# The triplet: x_m from the target pool, c_s by COR, x_s from S_c, masks from the source prior
# ------------------------------------------------------------------------------------------------
# classes 0, 1, 2; images 0-2 single-label (0, 0, 2), 3-5 multi-label
TRIPLET_LABELS = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]], np.float32)


class FakeRaw:
    """load(i): image i (a constant-ish picture encoding i) and its prior: class value c + 1 of each label in
    its own region, 0 background, a 255 strip; a target's prior has its own foreground."""

    def load(self, i):
        S = CROP
        image = np.full((S, S, 3), 10 * i + 5, np.uint8)
        image[:, :, 1] = np.arange(S, dtype=np.uint8)[None] * 7  # not flip-symmetric
        prior = np.zeros((S, S), np.uint8)
        for j, c in enumerate(np.flatnonzero(TRIPLET_LABELS[i])):
            prior[4 * j:4 * j + 6, 2 + 3 * j:12] = c + 1
        prior[S - 1, :] = 255
        prior[10:12, :4] = 2 if i < 3 else 0  # a source also holds another value (class 1) in its prior
        return {"image": image, "prior": prior}


def make_transform(monkeypatch, **kw):
    monkeypatch.setattr(csd, "weak_augment", lambda image, masks, rng, crop, resize: (image, masks))
    args = args_for(**kw)
    Pm = csd.cooccurrence_matrix(csd.cooccurrence_counts(TRIPLET_LABELS))
    return csd.CSDTransform(args, FakeRaw(), TRIPLET_LABELS, Pm, "prior"), Pm


@pytest.mark.parametrize("forced", [0, 2])
@pytest.mark.parametrize("bg_paste", ["source", "intersect"])
def test_triplet_masks_views_and_labels(monkeypatch, forced, bg_paste):
    """Pins M_fg = (source prior == c_s + 1), non-empty, for c_s = 0 and c_s > 0; M_bg = the rest minus 255;
    R_bg = M_bg (source) or M_bg & bg(x_m) (intersect); x_s from S_{c_s}; x_fg / x_bg pasted from x_s into
    x_m; y_fg = y_m | c_s. Catches: an off-by-one class index, masks of the target, swapped composites,
    --bg-paste inverted, x_s not from the drawn class."""
    tr, Pm = make_transform(monkeypatch, bg_paste=bg_paste)
    seen = []

    def forced_dist(P_, y_m, eligible, mode, sizes):
        seen.append(y_m.copy())
        return np.eye(C)[forced]

    monkeypatch.setattr(csd, "cor_distribution", forced_dist)
    raw = FakeRaw()
    for k in range(6):
        t = tr.triplet(np.random.default_rng(k))
        assert int(t["c_s"]) == forced
        y_m = seen[-1]
        m = int(np.flatnonzero((TRIPLET_LABELS == y_m).all(1))[0])
        assert y_m.sum() >= 2  # target pool: multi-label images only
        s_index = [i for i in range(3) if torch.equal(t["x_s"], csd.augment.to_tensor(raw.load(i)["image"]))]
        assert len(s_index) == 1 and TRIPLET_LABELS[s_index[0]].argmax() == forced
        pr_s, pr_m = torch.from_numpy(raw.load(s_index[0])["prior"]), torch.from_numpy(raw.load(m)["prior"])
        assert t["M_fg"].any() and torch.equal(t["M_fg"], pr_s == forced + 1)
        assert torch.equal(t["M_bg"], (pr_s != forced + 1) & (pr_s != 255))
        R_bg = t["M_bg"] & (pr_m == 0) if bg_paste == "intersect" else t["M_bg"]
        assert torch.equal(t["R_bg"], R_bg)
        x_s, x_m = t["x_s"], csd.augment.to_tensor(raw.load(m)["image"])
        assert torch.equal(t["x_fg"], torch.where(t["M_fg"], x_s, x_m))
        assert torch.equal(t["x_bg"], torch.where(R_bg, x_s, x_m))
        assert torch.equal(t["y_fg"], torch.from_numpy(np.maximum(y_m, np.eye(C, dtype=np.float32)[forced])))
    if bg_paste == "intersect":
        assert any(not torch.equal(t["R_bg"], t["M_bg"]) for t in [tr.triplet(np.random.default_rng(0))])


@pytest.mark.parametrize("sampling", ["cor", "uniform", "uniform_image"])
@pytest.mark.parametrize("pool", ["multi", "all"])
def test_triplet_sampling_arguments(monkeypatch, sampling, pool):
    """Catches: --sampling not forwarded, the COR matrix or the eligibility / source sizes wrong, --target-pool
    ignored (x_m from the single-label images under multi)."""
    tr, Pm = make_transform(monkeypatch, sampling=sampling, target_pool=pool)
    calls = []
    orig = csd.cor_distribution

    def spy(P_, y_m, eligible, mode, sizes):
        calls.append((P_, y_m.copy(), eligible.copy(), mode, np.asarray(sizes).copy()))
        return orig(P_, y_m, eligible, mode, sizes)

    monkeypatch.setattr(csd, "cor_distribution", spy)
    for k in range(30):
        tr.triplet(np.random.default_rng(k))
    for P_, y_m, eligible, mode, sizes in calls:
        assert P_ is Pm and mode == sampling
        assert eligible.tolist() == [True, False, True] and sizes.tolist() == [2, 0, 1]
    n_labels = {int(c[1].sum()) for c in calls}
    assert n_labels == ({2, 3} if pool == "multi" else {1, 2, 3})


def test_cor_distribution_hand_values():
    """Eq. (1) P_j = sum_k P_{c_k, j} over the target's classes, zero where S_j is empty. Catches: a column
    instead of a row sum, the eligibility mask ignored, no renormalisation."""
    Pm = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6]])
    p = csd.cor_distribution(Pm, np.array([1.0, 0, 1]), np.array([True, False, True]))
    raw = np.array([0.7, 0.0, 0.8])
    np.testing.assert_allclose(p, raw / raw.sum())


# ------------------------------------------------------------------------------------------------
# Stages: train_classifier and train_seg closures
# ------------------------------------------------------------------------------------------------
def fake_ctx(args, toy_root, log=None):
    reseeds = []
    return SimpleNamespace(args=args, spec=SimpleNamespace(root=toy_root, dataset="voc"), splits={"train": "train"},
                           device=torch.device("cpu"), reseed=reseeds.append, wrap=lambda m: m,
                           log=(log if log is not None else []).append, autocast=contextlib.nullcontext,
                           reseeds=reseeds)


def capture_loop(monkeypatch):
    got = {}

    def fake_loop(ctx, stage, datasets, batch_size, total, step, modules, lr=None, salt=0, indices=None):
        got.update(stage=stage, ds=datasets, batch_size=batch_size, total=total, step=step, modules=modules, lr=lr,
                   salt=salt)

    monkeypatch.setattr(csd, "train_loop", fake_loop)
    return got


@pytest.mark.parametrize("csd_on,prior", [(True, "seeds"), (True, "gt"), (False, "seeds")])
def test_train_classifier_wiring(monkeypatch, toy_root, csd_on, prior):
    """Catches: the CSD gate (--csd-warmup compared in iterations, or csd_on ignored), the LR closure (iteration
    instead of epoch), the COR matrix without --cor-smoothing / --cor-norm, the prior key under --prior gt,
    the reseed salt, the batch size, a transform without triplets under CSD."""
    args = args_for(prior=prior, csd_warmup=1, cor_smoothing=0.5, cor_norm="softmax", batch_size=4, epochs=3,
                    max_iters=0, embed_dim=32, depth=2, num_heads=2, layer_index=2, warmup_epochs=1)
    ctx = fake_ctx(args, toy_root)
    got = capture_loop(monkeypatch)
    steps = []
    monkeypatch.setattr(csd, "train_step", lambda net, batch, it, a, K, active, opt, ac: steps.append((it, active, K)) or {})
    labels = csd.data.SegDataset(toy_root, "train").labels()
    prior_dir = toy_root / "SegmentationClass"
    model = csd.train_classifier(ctx, "classifier", labels.shape[1] + 1, labels, csd_on, prior_dir)
    assert ctx.reseeds == [1] and got["salt"] == 1 and got["batch_size"] == 4
    ipe = len(labels) // 4
    assert got["total"] == 3 * ipe and got["modules"]["model"] is model
    for it in (0, ipe - 1, ipe, 2 * ipe + 1):
        got["step"]({}, it)
    assert steps == [(it, csd_on and it >= ipe, labels.shape[1]) for it in (0, ipe - 1, ipe, 2 * ipe + 1)]
    for it in range(3 * ipe):
        assert got["lr"](it) == csd.lr_factor(it // ipe, 3, args)
    tr = got["ds"].transform
    if csd_on:
        N = csd.cooccurrence_counts(labels, 0.5)
        np.testing.assert_allclose(tr.P, csd.cooccurrence_matrix(N, "softmax"))
        assert tr.prior_key == ("mask" if prior == "gt" else "prior")
        assert ("prior" in tr.raw.extra_dirs) == (prior != "gt")
    else:
        assert tr.raw is None


def test_lr_factor_matches_mctformer_lagged_timm_schedule():
    """MCTformer: timm CosineLRScheduler(t_initial=epochs, warmup) stepped with step(epoch) AFTER each epoch.
    Catches: the schedule one epoch ahead (the review's E21), min-lr / warm-up wiring."""
    from timm.scheduler import CosineLRScheduler

    for warmup in (0, 3):
        args = args_for(lr=6.25e-5, min_lr=1e-5, warmup_lr=1e-6, warmup_epochs=warmup)
        epochs = 12
        opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=args.lr)
        sched = CosineLRScheduler(opt, t_initial=epochs, lr_min=args.min_lr, warmup_lr_init=args.warmup_lr,
                                  warmup_t=warmup, cycle_limit=1, t_in_epochs=True)
        for e in range(epochs):
            assert math.isclose(csd.lr_factor(e, epochs, args) * args.lr, opt.param_groups[0]["lr"], rel_tol=1e-9), (warmup, e)
            sched.step(e)


def test_train_seg_wiring(monkeypatch, toy_root, tmp_path):
    """Catches: the ASPP 10x lr group swapped, SGD momentum / decay, the loss on the wrong key, a missing
    ignore_index, the poly schedule's total, --supervision full still reading the pseudo labels."""

    class TinySeg(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.aspp = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return self.aspp(self.backbone(x))

    for supervision in ("image", "full"):
        args = args_for(supervision=supervision, seg_optimizer="sgd", seg_lr=0.02, seg_iters=40, max_iters=0)
        ctx = fake_ctx(args, toy_root)
        got = capture_loop(monkeypatch)
        monkeypatch.setattr(csd, "build_segnet", lambda a, n, init_weights: TinySeg())
        model = csd.train_seg(ctx, 4, toy_root / "SegmentationClass")
        assert ctx.reseeds == [3] and got["salt"] == 3 and got["total"] == 40
        opt = got["modules"]["optimizer"]
        g0, g1 = opt.param_groups
        assert [p is q for p, q in zip(g0["params"], model.backbone.parameters())] == [True, True] and g0["lr"] == 0.02
        assert [p is q for p, q in zip(g1["params"], model.aspp.parameters())] == [True, True] and g1["lr"] == 0.2
        assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4
        assert got["lr"](10) == csd.poly_lr(10, 40)
        ds = got["ds"]
        assert ds.transform.key == ("mask" if supervision == "full" else "pseudo")
        assert ("pseudo" in ds.extra_dirs) == (supervision == "image")
        g = torch.Generator().manual_seed(0)
        batch = {"image": torch.randn(2, 3, 8, 8, generator=g), "target": torch.randint(0, 4, (2, 8, 8), generator=g)}
        batch["target"][0, :3] = 255
        with torch.no_grad():
            expected = F.cross_entropy(model(batch["image"]), batch["target"], ignore_index=255).item()
        log = got["step"](batch, 0)
        assert abs(log["losses/seg"] - expected) < 1e-6


# ------------------------------------------------------------------------------------------------
# main(): which stages run, with which thresholds and CRF switches
# ------------------------------------------------------------------------------------------------
TINY = ["--preset", "toy", "--max-iters", "1", "--batch-size", "4", "--seg-batch", "4", "--crop-size", "32",
        "--csd-resize", "36", "--seg-crop", "32", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--layer-index", "2", "--seed-scales", "0.5", "--workers", "0"]


@pytest.mark.parametrize("extra", [[], ["--csd", "off"], ["--prior", "gt"],
                                   ["--prior-threshold", "0.3", "--prior-crf", "--no-mask-crf"]])
def test_main_stage_order_thresholds_and_crf(monkeypatch, toy_root, tmp_path, extra):
    """Catches: stage 1 / prior run under --csd off or --prior gt, stage 2 with CSD off (or on under --csd off),
    the prior's --prior-threshold / --prior-crf and the masks' 'best' / --mask-crf swapped, the segmentation
    network not on the mask folder, the classifier of the wrong stage used for the masks."""
    calls = []

    def fake_train_classifier(ctx, stage, num_classes, labels, csd_on, prior_dir=None):
        calls.append(("train", stage, csd_on, prior_dir))
        m = csd.build_model(ctx.args, num_classes - 1, init_weights=False)
        with torch.no_grad():
            m.head.bias.fill_(1.0 if stage == "stage1" else 2.0)  # which classifier is which
        return m

    def fake_make_labels(ctx, model, train_set, seed_set, stage, t, use_crf, out_dir):
        calls.append(("labels", stage, t, use_crf, out_dir, float(model.head.bias[0].detach())))
        out_dir.mkdir(parents=True, exist_ok=True)
        return {}, 0.5

    def fake_train_seg(ctx, num_classes, mask_dir):
        calls.append(("seg", mask_dir))
        return csd.build_segnet(ctx.args, num_classes, init_weights=False)

    monkeypatch.setattr(csd, "train_classifier", fake_train_classifier)
    monkeypatch.setattr(csd, "make_labels", fake_make_labels)
    monkeypatch.setattr(csd, "train_seg", fake_train_seg)
    monkeypatch.setattr(csd, "evaluate", lambda ctx, segnet, ds: {"miou": 1.0, "iou": {}})
    monkeypatch.setattr(csd, "save_vis", lambda *a, **k: None)
    out = tmp_path / "run"
    csd.main(["--data", str(toy_root), *TINY, "--out", str(out), *extra])
    split = csd.data.default_splits(csd.data.resolve_data(str(toy_root)))["train"]
    prior_dir = out / "pseudo_labels" / "prior" / split
    mask_dir = out / "pseudo_labels" / "mask" / split
    off, gt = "--csd" in extra, "gt" in extra
    thr = "0.3" if "0.3" in extra else "best"
    prior_crf, mask_crf = "--prior-crf" in extra, "--no-mask-crf" not in extra
    expected = []
    if not (off or gt):
        expected += [("train", "stage1", False, None), ("labels", "prior", thr, prior_crf, prior_dir, 1.0)]
    expected += [("train", "classifier", not off, prior_dir), ("labels", "mask", "best", mask_crf, mask_dir, 2.0),
                 ("seg", mask_dir)]
    assert calls == expected
