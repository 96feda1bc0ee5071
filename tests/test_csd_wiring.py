"""Wiring tests for csd.py: which tensor of which network and view feeds each loss of Eq. (6), teacher mode and
stop-gradient, the loss weights and thresholds, each component switch, the triplet (x_m, c_s, x_s, M_fg, R_bg),
the classification view, train_step / optimizer_step, the training stages' optimisers and closures (CSD gate, LR
schedule, seeds; the --classifier irn optimiser), the seeds (flip, scales, min-max / max norm, IRN's ReLU CAM, eval
mode), the seed sweep against a brute force, the label stages (threshold, CRF preset, result keys), the
--mask-method irn stages (IR labels, IRN training view and loss, edge inference, random walk wiring, IRNet's
background rule) and the stage order in main() (crf / irn masks, --prior seeds / gt / dir:).

Hand-made inputs, a small deterministic stub network whose maps depend on train/eval mode (a stand-in for
drop-path), recording wrappers around the loss functions, and independent reference formulas.
Each test's docstring names the planted bugs it catches. CSD_UNDER_TEST=/path/to/csd.py runs the same tests
against another copy (mutation testing); by default the repository's csd.py is imported.
"""
import contextlib
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import under_test


csd = under_test.load("csd")

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
        self.attn_scale = nn.Parameter(torch.tensor(1.0))  # so a fused_par map carries a gradient (the CAM is detached)
        self.calls = []

    def forward(self, x):
        self.calls.append({"x": x.detach().clone(), "training": self.training, "grad": torch.is_grad_enabled()})
        pooled = F.avg_pool2d(x, P)  # (n, 3, h, w)
        cam = self.w * pooled * torch.tensor([1.0, 2.0, 3.0]).view(1, C, 1, 1)  # (n, C, h, w)
        if self.training:
            cam = cam * 1.6
        n = x.shape[0]
        attn = self.attn_scale * self.attn_base.expand(n, -1, -1, -1) * (1 + pooled.mean((1, 2, 3)).abs().view(n, 1, 1, 1))
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
    # "M_bg" is a decoy: real triplets no longer return it (not in TRIPLET_KEYS); it catches T_bg built from M_bg.
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


def test_teacher_forward_restores_the_mode_it_found():
    """csd_losses switches the network to eval for the teacher and back to the mode it found (train in training;
    here eval, the only way to tell them apart). Catches: net.train() / net.train(True) instead of
    net.train(was_training) after the teacher forward."""
    net = StubNet().eval()
    csd.csd_losses(net, hand_batch(), args_for(), C, True)
    assert not net.training
    net.train()
    csd.csd_losses(net, hand_batch(), args_for(), C, True)
    assert net.training


def test_loss_fg_and_loss_bg_inputs(monkeypatch):
    """Catches: M_sm^fg / M_sm^bg slices swapped or off by B (the Eq. 5 typo: F(x_fg) in L_bg); the teacher
    from train mode or not detached; T_fg from R_bg, T_bg from M_fg or M_bg; the patch size; --token-mask,
    --kl-temp, --kl-classes, --bg-dummy, --bg-kl, --reduce not passed (or passed to the other loss); under
    --csd-map fused_par a teacher (or student) that bypasses csd_score_map (net(x_s)["patch_cam"])."""
    fg, bg = recorder(monkeypatch, "loss_fg"), recorder(monkeypatch, "loss_bg")
    for token_mode, reduce, kl_classes, bg_kl, csd_map in (("full", "sum", "all", "saliency", "patchcam"),
                                                           ("majority", "mean", "present", "full", "patchcam"),
                                                           ("full", "sum", "all", "saliency", "fused_par")):
        fg.clear(), bg.clear()
        args = args_for(token_mask=token_mode, reduce=reduce, kl_classes=kl_classes, bg_kl=bg_kl, csd_map=csd_map,
                        layer_index=1)
        net, batch, _ = run_losses(args)
        (a_fg, k_fg, _), = fg
        (a_bg, k_bg, _), = bg
        # --csd-map fused_par: teacher AND students are the PAR-refined fused map (dev code), not the patch-CAM
        score = (lambda o: o["patch_cam"]) if csd_map == "patchcam" else (lambda o: ref_localization(o, 1, par=True))
        M_s = score(stub_maps(net, batch["x_s"], train=False))
        M_f = score(stub_maps(net, batch["x_fg"], train=True))
        M_b = score(stub_maps(net, batch["x_bg"], train=True))
        for a in (a_fg, a_bg):
            assert torch.allclose(a[0], M_s, atol=1e-6) and not a[0].requires_grad
        assert torch.allclose(a_fg[1], M_f, atol=1e-6) and torch.allclose(a_bg[1], M_b, atol=1e-6)
        # the students carry a gradient (patch-CAM, or under fused_par the attention: its CAM factor is detached)
        assert a_fg[1].requires_grad and a_bg[1].requires_grad
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
    maps = csd.lowres_maps(net, image, label, args, torch.device("cpu"))
    (got,) = maps
    assert maps.norm == "minmax"  # MCTformer main.py's normalisation of the summed maps (IRN's is "max")
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
TRIPLET_KEYS = {"x_s", "x_fg", "x_bg", "M_fg", "R_bg", "c_s", "y_fg", "y_bg", "y_s"}
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
    """weak_augment is the identity here (so the priors stay readable), recording its arguments in tr.aug_calls."""
    aug_calls = []
    monkeypatch.setattr(csd, "weak_augment", lambda image, masks, rng, crop, resize:
                        aug_calls.append((image, masks, crop, resize)) or (image, masks))
    args = args_for(**{"csd_resize": 21, **kw})
    Pm = csd.cooccurrence_matrix(csd.cooccurrence_counts(TRIPLET_LABELS))
    tr = csd.CSDTransform(args, FakeRaw(), TRIPLET_LABELS, Pm, "prior")
    tr.aug_calls = aug_calls
    return tr, Pm


@pytest.mark.parametrize("forced", [0, 2])
@pytest.mark.parametrize("bg_paste", ["source", "intersect"])
def test_triplet_masks_views_and_labels(monkeypatch, forced, bg_paste):
    """Pins M_fg = (source prior == c_s + 1), non-empty, for c_s = 0 and c_s > 0; M_bg = the rest minus 255;
    R_bg = M_bg (source) or M_bg & bg(x_m) (intersect); x_s from S_{c_s}; x_fg / x_bg pasted from x_s into
    x_m; y_fg = y_m | c_s; each image augmented jointly with its own prior at (--crop-size, --csd-resize).
    Catches: an off-by-one class index, masks of the target, swapped composites, --bg-paste inverted, x_s not
    from the drawn class, the crop and the resize swapped in weak_augment, x_s augmented with x_m's prior."""
    tr, Pm = make_transform(monkeypatch, bg_paste=bg_paste)
    seen = []

    def forced_dist(P_, y_m, eligible, mode, sizes):
        seen.append(y_m.copy())
        return np.eye(C)[forced]

    monkeypatch.setattr(csd, "cor_distribution", forced_dist)
    raw = FakeRaw()
    differs = 0  # triplets whose R_bg is not M_bg (the target's objects cut out under intersect)
    for k in range(6):
        tr.aug_calls.clear()
        t = tr.triplet(np.random.default_rng(k))
        assert int(t["c_s"]) == forced
        y_m = seen[-1]
        m = int(np.flatnonzero((TRIPLET_LABELS == y_m).all(1))[0])
        assert y_m.sum() >= 2  # target pool: multi-label images only
        s_index = [i for i in range(3) if torch.equal(t["x_s"], csd.augment.to_tensor(raw.load(i)["image"]))]
        assert len(s_index) == 1 and TRIPLET_LABELS[s_index[0]].argmax() == forced
        pr_s, pr_m = torch.from_numpy(raw.load(s_index[0])["prior"]), torch.from_numpy(raw.load(m)["prior"])
        (img_s, (prior_s,), *crop_s), (img_m, (prior_m,), *crop_m) = tr.aug_calls
        assert crop_s == crop_m == [CROP, 21]
        assert np.array_equal(img_s, raw.load(s_index[0])["image"]) and np.array_equal(prior_s, pr_s.numpy())
        assert np.array_equal(img_m, raw.load(m)["image"]) and np.array_equal(prior_m, pr_m.numpy())
        assert t["M_fg"].any() and torch.equal(t["M_fg"], pr_s == forced + 1)
        M_bg = (pr_s != forced + 1) & (pr_s != 255)  # Eq. (5)'s M_bg, from the source prior
        R_bg = M_bg & (pr_m == 0) if bg_paste == "intersect" else M_bg
        assert torch.equal(t["R_bg"], R_bg) and set(t) == TRIPLET_KEYS
        differs += not torch.equal(R_bg, M_bg)
        x_s, x_m = t["x_s"], csd.augment.to_tensor(raw.load(m)["image"])
        assert torch.equal(t["x_fg"], torch.where(t["M_fg"], x_s, x_m))
        assert torch.equal(t["x_bg"], torch.where(R_bg, x_s, x_m))
        assert torch.equal(t["y_fg"], torch.from_numpy(np.maximum(y_m, np.eye(C, dtype=np.float32)[forced])))
    assert (differs > 0) == (bg_paste == "intersect")  # the intersect check above was not vacuous


def test_triplet_empty_branch_keys_and_masks(monkeypatch):
    """No class with a source image (cor_distribution all zeros): the empty triplet has the normal key set,
    zero images, all-False masks and y_fg = y_bg = y_m, and collates with a normal triplet.
    Catches: a key (R_bg, y_s, ...) missing from or added to the empty branch (default_collate fails only on a
    batch that mixes both branches), non-zero images or masks."""
    tr, _ = make_transform(monkeypatch)
    orig, seen = csd.cor_distribution, []
    monkeypatch.setattr(csd, "cor_distribution", lambda P_, y_m, *a: seen.append(y_m.copy()) or np.zeros(C))
    t = tr.triplet(np.random.default_rng(0))
    assert set(t) == TRIPLET_KEYS
    for k in ("x_s", "x_fg", "x_bg"):
        assert t[k].shape == (3, CROP, CROP) and not t[k].any()
    for k in ("M_fg", "R_bg"):
        assert t[k].dtype == torch.bool and t[k].shape == (CROP, CROP) and not t[k].any()
    assert torch.equal(t["y_fg"], torch.from_numpy(seen[-1])) and torch.equal(t["y_bg"], t["y_fg"])
    assert not t["y_s"].any() and t["y_s"].shape == (C,)
    monkeypatch.setattr(csd, "cor_distribution", orig)
    normal = tr.triplet(np.random.default_rng(0))
    batch = torch.utils.data.default_collate([normal, t])
    assert set(batch) == TRIPLET_KEYS


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


def test_classification_view_timm_and_weak_branches(monkeypatch):
    """--cls-aug timm: RandomResizedCrop(--crop-size) -> flip -> RandAugment -> to_tensor -> RandomErasing, in timm's
    order, each on the previous output and the sample's rng; --cls-aug weak: weak_augment(--crop-size, --csd-resize).
    Catches: a step dropped or reordered, erasing before normalisation, --csd-resize passed as the crop (or
    swapped), the timm branch under weak (the --cls-aug switch inverted)."""
    calls = []
    image = np.zeros((24, 30, 3), np.uint8)

    def rrc(img, rng, size, *a, **k):
        calls.append(("rrc", img, rng, size, a, k))
        return np.full((size, size, 3), 10, np.uint8)

    def flip(img, rng, masks=()):
        calls.append(("flip", img.copy(), rng))
        return img + 1, masks, True

    def rand_aug(img, rng):
        calls.append(("ra", img.copy(), rng))
        return img + 2

    def erase(x, rng, *a, **k):
        calls.append(("erase", x.clone(), rng, a, k))
        return x + 100

    def weak(img, masks, rng, crop, resize):
        calls.append(("weak", img, masks, rng, crop, resize))
        return np.full((crop, crop, 3), 50, np.uint8), masks

    monkeypatch.setattr(csd, "random_resized_crop", rrc)
    monkeypatch.setattr(csd.augment, "random_hflip", flip)
    monkeypatch.setattr(csd.augment, "rand_augment", rand_aug)
    monkeypatch.setattr(csd, "random_erasing", erase)
    monkeypatch.setattr(csd, "weak_augment", weak)
    rng = np.random.default_rng(0)
    out = csd.CSDTransform(args_for(cls_aug="timm", csd_resize=21)).classification_view(image, rng)
    assert [c[0] for c in calls] == ["rrc", "flip", "ra", "erase"] and all(c[2] is rng for c in calls[1:])
    assert calls[0][1] is image and calls[0][2] is rng and calls[0][3:] == (CROP, (), {})  # timm's scale / ratio
    assert (calls[1][1] == 10).all() and (calls[2][1] == 11).all() and calls[3][3:] == ((), {})  # p = 0.25
    want = csd.augment.to_tensor(np.full((CROP, CROP, 3), 13, np.uint8))
    assert torch.equal(calls[3][1], want) and torch.equal(out, want + 100)
    calls.clear()
    out = csd.CSDTransform(args_for(cls_aug="weak", csd_resize=21)).classification_view(image, rng)
    assert [c[0] for c in calls] == ["weak"] and calls[0][1] is image and calls[0][2:] == ((), rng, CROP, 21)
    assert torch.equal(out, csd.augment.to_tensor(np.full((CROP, CROP, 3), 50, np.uint8)))


def test_csd_transform_call_adds_the_triplet_only_with_raw(monkeypatch):
    """Catches: the triplet drawn without a prior dataset (or never drawn with one), the view of another image than
    the sample's, the label not passed through, another rng than the sample's for the triplet."""
    seen = []
    monkeypatch.setattr(csd.CSDTransform, "classification_view", lambda self, image, rng: torch.tensor(float(image)))
    monkeypatch.setattr(csd.CSDTransform, "triplet", lambda self, rng: seen.append(rng) or {"x_s": "triplet"})
    sample, rng = {"image": 7, "label": np.array([1.0, 0, 1], np.float32)}, np.random.default_rng(0)
    out = csd.CSDTransform(args_for())(sample, rng)
    assert set(out) == {"image", "label"} and out["image"].item() == 7 and out["label"].tolist() == [1, 0, 1]
    tr, _ = make_transform(monkeypatch)
    out = tr(sample, rng)
    assert set(out) == {"image", "label", "x_s"} and out["image"].item() == 7 and seen == [rng]


def test_random_erasing_timm_pixel_mode():
    """timm RandomErasing(p=0.25, mode='pixel'): one rectangle of 2-33 % of the area, aspect 0.3-3.3, filled with
    N(0, 1) noise; the input tensor untouched. Catches: p inverted (erasing 75 %), in-place erasing, a constant
    fill, the rectangle's area or aspect from another range."""
    x = torch.full((3, 40, 40), 5.0)
    erased = 0
    for k in range(200):
        y = csd.random_erasing(x, np.random.default_rng(k))
        assert torch.equal(x, torch.full((3, 40, 40), 5.0))  # not in place
        hit = (y != 5.0).any(0)
        if not hit.any():
            continue
        erased += 1
        rows, cols = hit.any(1).nonzero()[:, 0], hit.any(0).nonzero()[:, 0]
        h, w = int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
        assert hit.sum() == h * w  # one rectangle
        assert 0.02 * 1600 * 0.8 <= h * w <= 1600 / 3 * 1.2 and 0.3 / 1.5 <= h / w <= 3.3 * 1.5
        # exactly timm's draw: area ~ U(0.02, 1/3) of the image, log-aspect ~ U(log 0.3, log 3.3), replayed
        # from the same generator (the bounds above alone let a slightly wrong range pass on most seeds)
        r = np.random.default_rng(k)
        assert r.random() < 0.25
        while True:
            area, aspect = 1600 * r.uniform(0.02, 1 / 3), math.exp(r.uniform(math.log(0.3), math.log(3.3)))
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if eh < 40 and ew < 40:
                break
        assert (int(rows[0]), int(cols[0]), h, w) == (int(r.integers(0, 41 - eh)), int(r.integers(0, 41 - ew)), eh, ew)
        # N(0, 1) noise per pixel and channel (timm's 'rand' mode, one value per channel, has a per-channel std of 0)
        assert all(y[c][hit].std() > 0.5 for c in range(3)) and abs(float(y[:, hit].mean())) < 1.0
    assert 30 <= erased <= 70  # p = 0.25 of 200


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


class TinySeg(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.aspp = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.aspp(self.backbone(x))


def test_train_seg_wiring(monkeypatch, toy_root, tmp_path):
    """Catches: the ASPP 10x lr group swapped, SGD momentum / decay, the loss on the wrong key, a missing
    ignore_index, the poly schedule's total, --supervision full still reading the pseudo labels."""

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


def test_optimizer_step_zero_grad_backward_update():
    """optimizer_step (the IRN and segmentation stages' update): w <- w - lr dL/dw from a clean gradient, the log
    entry losses/<name>, and a non-finite loss stopping before the update. Catches: no optimizer.step(), no (or a
    late) zero_grad (the stale gradient 100 leaks in), the finite check after the step, the log key misnamed."""
    w = nn.Parameter(torch.tensor([1.0, -2.0]))
    w.grad = torch.full_like(w, 100.0)  # stale
    opt = torch.optim.SGD([w], lr=0.5)
    x = torch.tensor([3.0, 0.5])
    loss = (w * x).sum() + (w ** 2).sum()  # L = 2 + 5, dL/dw = x + 2 w = (5, -3.5)
    log = csd.optimizer_step(opt, loss, 4, "seg")
    assert log == {"losses/seg": pytest.approx(2.0 + 5.0)}
    assert torch.allclose(w.detach(), torch.tensor([1.0 - 0.5 * 5.0, -2.0 + 0.5 * 3.5]))
    w0 = w.detach().clone()
    with pytest.raises(csd.NonFinite, match="losses/irn"):
        csd.optimizer_step(opt, (w * float("nan")).sum(), 5, "irn")
    assert torch.equal(w.detach(), w0)


def test_train_seg_adamw_toy_optimizer(monkeypatch, toy_root):
    """--seg-optimizer adamw (the toy preset's): one AdamW group over all parameters at --seg-lr, weight decay 0.01,
    no 10x head group. Catches: --seg-lr not passed (AdamW's 1e-3 default: 2e-3 is used here), the decay dropped
    or the SGD 5e-4 taken, the SGD branch under adamw (the switch inverted)."""
    args = args_for(seg_optimizer="adamw", seg_lr=2e-3, seg_iters=40, max_iters=0)
    got = capture_loop(monkeypatch)
    monkeypatch.setattr(csd, "build_segnet", lambda a, n, init_weights: TinySeg())
    model = csd.train_seg(fake_ctx(args, toy_root), 4, toy_root / "SegmentationClass")
    opt = got["modules"]["optimizer"]
    (group,) = opt.param_groups
    assert type(opt) is torch.optim.AdamW and [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]
    assert group["lr"] == 2e-3 and group["weight_decay"] == 0.01 and got["total"] == 40


def test_param_groups_no_decay_for_1d_pos_embed_cls_token():
    """timm's add_weight_decay (MCTformer): no decay for 1-D parameters (biases, norms), pos_embed and cls_token;
    frozen parameters left out. Catches: a bias or norm decayed (ndim < 1), pos_embed / cls_token decayed, the two
    groups' decays swapped, frozen parameters in the optimizer."""
    m = nn.Module()
    m.pos_embed, m.cls_token = nn.Parameter(torch.zeros(1, 5, 4)), nn.Parameter(torch.zeros(1, 2, 4))
    m.fc, m.norm = nn.Linear(4, 4), nn.LayerNorm(4)
    m.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)
    decay, no_decay = csd.param_groups(m, 0.05)
    ids = lambda ps: {id(p) for p in ps}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert ids(decay["params"]) == {id(m.fc.weight)}
    assert ids(no_decay["params"]) == ids([m.pos_embed, m.cls_token, m.fc.bias, m.norm.weight, m.norm.bias])


def test_train_classifier_optimizer_and_epochs_under_max_iters(monkeypatch, toy_root):
    """AdamW(param_groups(model, --weight-decay), lr=--lr, eps=1e-8); under --max-iters the cosine runs over
    ceil(total / ipe) epochs, not --epochs. Catches: the groups or --weight-decay not passed, AdamW's default lr /
    eps, epochs from --epochs (or floored) under --max-iters, total not --max-iters."""
    args = args_for(batch_size=4, epochs=5, max_iters=0, warmup_epochs=0, lr=3e-4, min_lr=1e-5, weight_decay=0.07,
                    embed_dim=32, depth=2, num_heads=2, layer_index=2)
    labels = csd.data.SegDataset(toy_root, "train").labels()
    ipe = len(labels) // 4
    args.max_iters = 2 * ipe + 1  # 3 epochs (ceil), 2 when floored, 5 by --epochs
    got = capture_loop(monkeypatch)
    model = csd.train_classifier(fake_ctx(args, toy_root), "stage1", labels.shape[1] + 1, labels, False)
    opt = got["modules"]["optimizer"]
    assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 3e-4 and opt.defaults["eps"] == 1e-8
    want = csd.param_groups(model, 0.07)
    assert len(opt.param_groups) == 2
    for g, w in zip(opt.param_groups, want):
        assert g["weight_decay"] == w["weight_decay"] and [id(p) for p in g["params"]] == [id(p) for p in w["params"]]
    assert {id(model.pos_embed), id(model.cls_token)} <= {id(p) for p in opt.param_groups[1]["params"]}
    assert got["total"] == 2 * ipe + 1
    lrs = [got["lr"](it) for it in range(got["total"])]
    assert lrs == [csd.lr_factor(it // ipe, 3, args) for it in range(got["total"])]
    assert lrs[-1] != csd.lr_factor(2, 5, args) and lrs[-1] != csd.lr_factor(2, 2, args)  # the cases differ


@pytest.mark.parametrize("H,W", [(13, 21), (16, 16)])
def test_seg_predict_pads_bottom_right_and_crops_back(H, W):
    """Catches: padding on the top / left (predictions shifted), no crop back to (H, W), a stride not respected."""
    seen = []

    def model(x):
        seen.append(x)
        h, w = x.shape[2:]
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([(xx == 0).float(), (yy == 0).float(), x[0].abs().sum(0)])[None]  # (1, 3, h, w)

    image = np.full((H, W, 3), 200, np.uint8)
    pred = csd.seg_predict(model, image, torch.device("cpu"), 8)
    (x,) = seen
    assert x.shape[2:] == (math.ceil(H / 8) * 8, math.ceil(W / 8) * 8) and pred.shape == (H, W)
    assert (x[0, :, :H, :W] != 0).all() and (x[0, :, H:] == 0).all() and (x[0, :, :, W:] == 0).all()
    assert (pred == 2).all()  # the image's own pixels win class 2 everywhere; padding (class 0 / 1 rows) cropped


# ------------------------------------------------------------------------------------------------
# Label stages: seeds -> labels (threshold, CRF preset), make_labels (sweep, keys, scored ids)
# ------------------------------------------------------------------------------------------------
def test_seeds_to_label_hand_values():
    """argmax over [t, cams of the present classes] -> class index + 1. Catches: ties at t going to the class
    (> vs >=), an absent class winning, 0-based ids, t ignored, an image without classes not all background."""
    cam = np.array([[[0.4, 0.5, 0.2, 0.1, 0.45]],
                    [[0.9, 0.9, 0.9, 0.9, 0.9]],  # class 1: absent, never wins
                    [[0.1, 0.6, 0.3, 0.4, 0.45]]], np.float32)  # (3, 1, 5)
    label = np.array([1, 0, 1], np.float32)
    assert csd.seeds_to_label(cam, label, 0.4).tolist() == [[0, 3, 0, 0, 1]]
    assert csd.seeds_to_label(cam, label, 0.3).tolist() == [[1, 3, 0, 3, 1]]  # 0.3 tie -> background
    assert csd.seeds_to_label(cam, label, 0.05).tolist() == [[1, 3, 3, 3, 1]]
    assert csd.seeds_to_label(cam, np.zeros(3, np.float32), 0.0).tolist() == [[0, 0, 0, 0, 0]]
    assert csd.seeds_to_label(cam, label, 0.4).dtype == np.uint8


class LabelSet:
    """Two images (4 x 6) with classes {0, 2} and {1} of C = 3; ids given."""

    class_names, num_classes = ["background", "a", "b", "c"], 4

    def __init__(self, ids=("a", "b")):
        self.ids = list(ids)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        label = np.array([[1, 0, 1], [0, 1, 0]][i % 2], np.float32)
        return {"name": self.ids[i], "image": np.full((4, 6, 3), 30 * i, np.uint8), "label": label,
                "mask": np.full((4, 6), i % 2 + 1, np.uint8)}


def each_sample_stub(ctx, dataset, desc, fn=None, shard=False, limit=0):
    for i in range(len(dataset)):
        yield fn(dataset[i]) if fn else dataset[i]


def label_cache(ids):
    g = torch.Generator().manual_seed(0)
    return {n: csd.LowresMaps([torch.rand(2, 2 if i % 2 == 0 else 1, 2, 3, generator=g).half()], "minmax")
            for i, n in enumerate(ids)}


@pytest.mark.parametrize("use_crf", [False, True])
def test_write_labels_threshold_psa_crf_and_scoring(monkeypatch, tmp_path, use_crf):
    """Seeds at t (+ the dense CRF with MCTformer's PSA preset over the present classes, 0..n-1 in, class ids out),
    the PNGs in out_dir, only score_ids scored. Catches: another CRF preset ('irn'), the CRF on all classes or on
    the raw class ids, the CRF applied under --no-mask-crf, t not passed, every image scored."""
    crf_calls, scored = [], []
    monkeypatch.setattr(csd, "each_sample", each_sample_stub)

    def refine(image, labels, n, **kw):
        crf_calls.append((labels.copy(), n, kw))
        return np.full(labels.shape, n - 1)  # the last present class everywhere

    monkeypatch.setattr(csd.crf, "refine_labels", refine)
    ds, cache = LabelSet(), label_cache(["a", "b"])
    cm = SimpleNamespace(update=lambda lab, gt: scored.append((lab.copy(), gt)))
    csd.write_labels(SimpleNamespace(), cache, ds, 0.35, tmp_path / "out", use_crf, "x", score_ids=["b"], cm=cm)
    for i, name in enumerate(ds.ids):
        s = ds[i]
        seed = csd.seeds_to_label(csd.seed_from_lowres(cache[name], s["label"], (4, 6)), s["label"], 0.35)
        keys = np.concatenate([[0], np.flatnonzero(s["label"]) + 1])
        got = csd.data.read_mask(tmp_path / "out" / f"{name}.png")
        if use_crf:
            labels, n, kw = crf_calls[i]
            assert kw == csd.crf.PRESETS["psa"] and n == len(keys)
            assert np.array_equal(keys[labels], seed)  # the CRF sees indices into [bg, present classes]
            assert (got == keys[-1]).all()
        else:
            assert np.array_equal(got, seed) and not crf_calls
    assert len(scored) == 1 and np.array_equal(scored[0][1], ds[1]["mask"])
    assert len({tuple(np.unique(csd.data.read_mask(tmp_path / "out" / f"{n}.png"))) for n in ds.ids}) == 2


@pytest.mark.parametrize("stage", ["prior", "mask", "ir"])
def test_make_labels_best_threshold_keys_and_scored_ids(monkeypatch, tmp_path, stage):
    """t = 'best': the sweep on the seed split (its cache included, --sweep-max passed) gives t* to write_labels
    and the result keys stage1_seed/<split> (prior) or seed/<split> (mask, ir); the masks are scored on the seed
    split's ids and seed-split images outside the training split are written next to them; a float t skips the
    sweep. Catches: the default threshold instead of t*, the prefixes swapped, the masks scored on no image or
    on the training ids, the IR labels written as masks, --sweep-max not passed, a float t still sweeping."""
    rec = {"writes": [], "sweeps": []}
    args = args_for(sweep_max=0.47)
    ctx = SimpleNamespace(args=args, splits={"seed": "trainS"}, run_dir=tmp_path)
    train_set, seed_set = LabelSet(("a", "b")), LabelSet(("b", "c"))
    monkeypatch.setattr(csd, "each_sample", each_sample_stub)
    monkeypatch.setattr(csd, "compute_maps", lambda ctx, model, datasets, desc:
                        rec.update(datasets=datasets, model=model) or "CACHE")
    monkeypatch.setattr(csd, "evaluate_seeds", lambda cache, samples, n, sweep_max:
                        rec["sweeps"].append((cache, n, sweep_max)) or {"all": {"best_threshold": 0.37}})
    monkeypatch.setattr(csd, "seed_results", lambda res, names: {"": "R", "_single": "S"})
    monkeypatch.setattr(csd, "miou_entry", lambda result, names, **kw: kw)

    def write(ctx, cache, ds, t, out_dir, use_crf, desc, score_ids=(), cm=None, indices=None, ir=False):
        rec["writes"].append(dict(cache=cache, ds=ds, t=t, out=out_dir, crf=use_crf, scored=tuple(score_ids),
                                  indices=indices, ir=ir))

    monkeypatch.setattr(csd, "write_labels", write)
    out = tmp_path / stage
    res, t = csd.make_labels(ctx, "MODEL", train_set, seed_set, stage, "best", True, out)
    assert t == 0.37 and rec["datasets"] == [train_set, seed_set] and rec["model"] == "MODEL"
    assert rec["sweeps"] == [("CACHE", 4, 0.47)]
    prefix = "stage1_seed" if stage == "prior" else "seed"
    keys = {f"{prefix}/trainS", f"{prefix}/trainS_single"} | ({"mask/trainS"} if stage == "mask" else set())
    assert set(res) == keys
    first = rec["writes"][0]
    assert (first["ds"], first["t"], first["out"], first["crf"]) == (train_set, 0.37, out, True)
    assert first["ir"] == (stage == "ir")
    assert first["indices"] is None and first["cache"] == "CACHE"
    if stage == "mask":
        assert first["scored"] == ("b", "c") and res["mask/trainS"] == {"threshold": 0.37, "crf": True}
        (rest,) = rec["writes"][1:]
        assert rest["ds"] is seed_set and rest["indices"] == [1]
        assert rest["out"] == tmp_path / "pseudo_labels" / "mask" / "trainS"
    else:
        assert first["scored"] == () and len(rec["writes"]) == 1
    rec["writes"].clear(), rec["sweeps"].clear()
    res, t = csd.make_labels(ctx, "MODEL", train_set, seed_set, stage, "0.3", False, out)
    assert t == 0.3 and rec["sweeps"] == [] and rec["datasets"] == [train_set]
    assert rec["writes"][0]["t"] == 0.3 and rec["writes"][0]["crf"] is False
    assert set(res) == ({"mask/trainS"} if stage == "mask" else set())


# ------------------------------------------------------------------------------------------------
# main(): which stages run, with which thresholds and CRF switches
# ------------------------------------------------------------------------------------------------
TINY = ["--preset", "toy", "--max-iters", "1", "--batch-size", "4", "--seg-batch", "4", "--crop-size", "32",
        "--csd-resize", "36", "--seg-crop", "32", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
        "--layer-index", "2", "--seed-scales", "0.5", "--workers", "0"]


@pytest.mark.parametrize("extra", [[], ["--csd", "off"], ["--prior", "gt"],
                                   ["--prior-threshold", "0.3", "--prior-crf", "--no-mask-crf"],
                                   ["--mask-method", "irn", "--irn-batch", "4", "--irn-crop", "64", "--no-mask-crf"],
                                   ["--prior", "dir:"]],
                         ids=["default", "csd-off", "prior-gt", "thresholds", "irn", "dir"])
def test_main_stage_order_thresholds_and_crf(monkeypatch, toy_root, tmp_path, extra):
    """Catches: stage 1 / prior run under --csd off, --prior gt or --prior dir:, stage 2 with CSD off (or on under
    --csd off), the prior's --prior-threshold / --prior-crf and the masks' 'best' / --mask-crf swapped, the
    segmentation network not on the mask folder, the classifier of the wrong stage used for the masks, --prior
    dir:PATH not reaching stage 2; under --mask-method irn: the seeds written as masks instead of IR labels (or
    to the mask folder), the IRN not trained or an untrained IRN / the stage-1 classifier in the random walk,
    the masks written elsewhere than the folder the segmentation network reads."""
    if extra == ["--prior", "dir:"]:
        (tmp_path / "ext").mkdir()
        extra = ["--prior", f"dir:{tmp_path / 'ext'}"]
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

    def fake_train_irn(ctx):
        calls.append(("irn",))
        irn = csd.build_irn(ctx.args, init_weights=False)
        with torch.no_grad():
            irn.fuse.bias.fill_(3.0)  # the trained IRN
        return irn

    def fake_irn_masks(ctx, model, irn, train_set, seed_set, out_dir):
        calls.append(("masks", out_dir, float(model.head.bias[0].detach()), float(irn.fuse.bias[0].detach())))
        out_dir.mkdir(parents=True, exist_ok=True)
        return {}

    monkeypatch.setattr(csd, "train_classifier", fake_train_classifier)
    monkeypatch.setattr(csd, "make_labels", fake_make_labels)
    monkeypatch.setattr(csd, "train_seg", fake_train_seg)
    monkeypatch.setattr(csd, "train_irn", fake_train_irn)
    monkeypatch.setattr(csd, "irn_masks", fake_irn_masks)
    monkeypatch.setattr(csd, "evaluate", lambda ctx, segnet, ds: {"miou": 1.0, "iou": {}})
    monkeypatch.setattr(csd, "save_vis", lambda *a, **k: None)
    out = tmp_path / "run"
    csd.main(["--data", str(toy_root), *TINY, "--out", str(out), *extra])
    split = csd.data.default_splits(csd.data.resolve_data(str(toy_root)))["train"]
    prior_dir = out / "pseudo_labels" / "prior" / split
    mask_dir = out / "pseudo_labels" / "mask" / split
    off, gt, irn = "--csd" in extra, "gt" in extra, "irn" in extra
    ext = next((Path(e[4:]) for e in extra if e.startswith("dir:")), None)
    prior_dir = ext or prior_dir
    thr = "0.3" if "0.3" in extra else "best"
    prior_crf, mask_crf = "--prior-crf" in extra, "--no-mask-crf" not in extra
    expected = []
    if not (off or gt or ext):
        expected += [("train", "stage1", False, None), ("labels", "prior", thr, prior_crf, prior_dir, 1.0)]
    expected += [("train", "classifier", not off, prior_dir)]
    if irn:
        ir_dir = out / "pseudo_labels" / "ir" / split
        expected += [("labels", "ir", "best", mask_crf, ir_dir, 2.0), ("irn",), ("masks", mask_dir, 2.0, 3.0)]
    else:
        expected += [("labels", "mask", "best", mask_crf, mask_dir, 2.0)]
    expected += [("seg", mask_dir)]
    assert calls == expected


# ------------------------------------------------------------------------------------------------
# Seeds: seed_from_lowres (flip, scales, normalisation), lowres_maps under --classifier irn, compute_maps
# ------------------------------------------------------------------------------------------------
def ref_seed(maps, label, size, norm):
    """Independent seed: each scale's (image, flip) pair upsampled, the flip un-flipped, all summed, then min-max
    (MCTformer) or max + 1e-5 (IRN) per present class; absent classes 0."""
    keys = np.flatnonzero(label > 0)
    total = sum(F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)[0]
                + F.interpolate(m.float(), size=size, mode="bilinear", align_corners=False)[1].flip(-1) for m in maps)
    out = np.zeros((len(label), *size), np.float32)
    for j, k in enumerate(keys):
        t = total[j].numpy()
        out[k] = (t - t.min()) / (t.max() - t.min() + 1e-5) if norm == "minmax" else t / (t.max() + 1e-5)
    return out


@pytest.mark.parametrize("norm", ["minmax", "max"])
def test_seed_from_lowres_unflips_sums_scales_and_normalises_per_class(norm):
    """Two scales of (image, flip) maps, two present classes of three, each class on its own range. Catches: the
    flipped view added without un-flipping (or dropped), a scale dropped, the maps' own norm ignored (IRN's max
    norm as min-max or the reverse), one max over all classes instead of per class, maps written to the wrong
    class channel."""
    g = torch.Generator().manual_seed(4)
    m1 = torch.rand(2, 2, 2, 3, generator=g)
    m1[:, 1] *= 5.0  # class 2 on another range: a global max would change class 0
    m2 = torch.rand(2, 2, 4, 6, generator=g) + 0.3
    maps = csd.LowresMaps([m1.half(), m2.half()], norm)
    label = np.array([1, 0, 1], np.float32)
    got = csd.seed_from_lowres(maps, label, (8, 12))
    want = ref_seed([m1.half(), m2.half()], label, (8, 12), norm)
    assert got.shape == (3, 8, 12) and not got[1].any()
    np.testing.assert_allclose(got, want, atol=1e-5)
    unflipped = ref_seed([torch.stack([m[0], m[1].flip(-1)]).half() for m in (m1, m2)], label, (8, 12), norm)
    assert np.abs(unflipped - want).max() > 1e-2  # the flip check is not vacuous


def test_lowres_maps_irn_relu_cam_bicubic_scales_and_max_norm():
    """--classifier irn: the seeds are ReLU(CAM) (IRN's `CAM`; the CAM itself is the pre-ReLU CSD map) of the
    present classes, from the image and its flip per scale, a rescaled input bicubic, normalised by the max.
    Catches: the pre-ReLU CAM (negative seeds), the fused attention map, a bilinear rescale, the min-max norm."""
    net = StubNet().eval()
    args = args_for(classifier="irn", seed_scales=(1.0, 0.5))
    image = (np.arange(32 * 32 * 3).reshape(32, 32, 3) * 37 % 251).astype(np.uint8)
    label = np.array([1, 0, 1], np.float32)
    maps = csd.lowres_maps(net, image, label, args, torch.device("cpu"))
    assert maps.norm == "max" and len(maps) == 2 and len(net.calls) == 2
    bicubic = csd.augment.to_tensor(csd.augment.rescale(image, 0.5, interp="bicubic")[0])
    bilinear = csd.augment.to_tensor(csd.augment.rescale(image, 0.5, interp="bilinear")[0])
    assert torch.equal(net.calls[1]["x"][0], bicubic) and not torch.equal(bicubic, bilinear)
    for call, got in zip(list(net.calls), maps):  # a copy: net(...) below appends to net.calls
        assert torch.equal(call["x"][1], call["x"][0].flip(-1)) and not call["training"]
        with torch.no_grad():
            cam = net(call["x"])["patch_cam"][:, [0, 2]]
        assert (cam < 0).any()  # the ReLU matters
        assert torch.allclose(got.float(), F.relu(cam), rtol=1e-2, atol=1e-3)


def test_compute_maps_eval_mode_and_shared_ids_once(monkeypatch):
    """Catches: the seeds computed with the classifier in train mode (drop-path / dropout on, BN batch statistics),
    an id shared by the train and seed splits computed twice or skipped, another args / device passed."""
    seen = []
    monkeypatch.setattr(csd, "each_sample", each_sample_stub)
    monkeypatch.setattr(csd, "lowres_maps", lambda model, image, label, args, device:
                        seen.append((model.training, args, device)) or ("maps", float(image[0, 0, 0])))
    net = StubNet().train()
    ctx = SimpleNamespace(args=args_for(), device=torch.device("cpu"))
    cache = csd.compute_maps(ctx, net, [LabelSet(("a", "b")), LabelSet(("b", "c"))], "x")
    assert list(cache) == ["a", "b", "c"] and cache["c"] == ("maps", 30.0)  # "c" is the 2nd seed image
    assert [s[0] for s in seen] == [False, False, False]
    assert all(s[1] is ctx.args and s[2] == ctx.device for s in seen)


# ------------------------------------------------------------------------------------------------
# --mask-method irn stages: IR labels, train_irn, irn_masks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_crf", [False, True])
def test_write_labels_ir_branch_thresholds_and_present_classes(monkeypatch, tmp_path, use_crf):
    """ir=True: make_ir_label(image, seeds of the present classes, their class ids, --ir-fg, --ir-bg, CRF switch),
    t unused. Catches: --ir-fg and --ir-bg swapped (or the seed threshold t passed), all C channels instead of the
    present ones, 0-based keys, the CRF switch not passed, the seed label written instead of the IR label."""
    calls = []
    monkeypatch.setattr(csd, "each_sample", each_sample_stub)

    def ir_label(image, cam, keys, tau_fg, tau_bg, crf_on=True):
        calls.append((cam.copy(), keys.copy(), tau_fg, tau_bg, crf_on))
        return np.full(image.shape[:2], 255, np.uint8)

    monkeypatch.setattr(csd, "make_ir_label", ir_label)
    ds, cache = LabelSet(), label_cache(["a", "b"])
    ctx = SimpleNamespace(args=args_for(ir_fg=0.35, ir_bg=0.1))
    csd.write_labels(ctx, cache, ds, 0.5, tmp_path / "ir", use_crf, "x", ir=True)
    assert len(calls) == 2
    for i, (cam, keys, fg, bg, crf_on) in enumerate(calls):
        s = ds[i]
        want_keys = np.flatnonzero(s["label"]) + 1
        assert np.array_equal(keys, want_keys) and (fg, bg, crf_on) == (0.35, 0.1, use_crf)
        np.testing.assert_array_equal(cam, csd.seed_from_lowres(cache[ds.ids[i]], s["label"], (4, 6))[want_keys - 1])
        assert (csd.data.read_mask(tmp_path / "ir" / f"{ds.ids[i]}.png") == 255).all()


class TinyEdge(nn.Module):
    """A stand-in IRN: (B, 3, H, W) -> edge logits (B, 1, H/4, W/4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 4, stride=4)
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, x):
        return self.conv(x)


def test_train_irn_wiring(monkeypatch, toy_root, tmp_path):
    """IRNet step/train_irn.py: the affinity loss on the IR labels at --irn-radius (not the walk's --rw-radius),
    SGD(--irn-lr, --irn-momentum, --irn-weight-decay) on the trainable parameters, poly over --irn-epochs x
    (n // --irn-batch) iterations, the IR-label folder, reseed / salt 2, the IRN returned in eval mode.
    Catches: --rw-radius in the loss, a swapped optimiser setting, frozen parameters in SGD, the schedule's total."""
    args = args_for(irn_radius=4, rw_radius=3, irn_lr=0.03, irn_momentum=0.8, irn_weight_decay=2e-4, irn_epochs=2,
                    irn_batch=4, max_iters=0)
    (tmp_path / "pseudo_labels" / "ir" / "train").mkdir(parents=True)
    ctx = fake_ctx(args, toy_root)
    ctx.run_dir = tmp_path
    got = capture_loop(monkeypatch)
    monkeypatch.setattr(csd, "build_irn", lambda a, init_weights: TinyEdge())
    irn = csd.train_irn(ctx)
    assert ctx.reseeds == [2] and got["salt"] == 2 and got["batch_size"] == 4 and got["stage"] == "irn"
    total = 2 * (len(got["ds"]) // 4)
    assert got["total"] == total and [got["lr"](it) for it in (0, 5)] == [csd.poly_lr(0, total), csd.poly_lr(5, total)]
    assert got["ds"].extra_dirs["ir"] == tmp_path / "pseudo_labels" / "ir" / "train"
    opt = got["modules"]["optimizer"]
    assert got["modules"]["irn"] is irn and type(opt) is torch.optim.SGD
    (group,) = opt.param_groups
    assert [id(p) for p in group["params"]] == [id(irn.conv.weight), id(irn.conv.bias)]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.03, 0.8, 2e-4)
    g = torch.Generator().manual_seed(0)
    ir = torch.zeros(2, 6, 6, dtype=torch.long)
    ir[:, :, 3:] = 1
    ir[0, :2, :2] = 255
    batch = {"image": torch.randn(2, 3, 24, 24, generator=g), "ir": ir}
    irn.train()
    with torch.no_grad():
        logits = irn(batch["image"])
        want = csd.loss_irn_affinity(logits, ir, 4).item()
        other = csd.loss_irn_affinity(logits, ir, 3).item()
    assert abs(want - other) > 1e-4  # the radius matters on this batch
    log = got["step"](batch, 0)
    assert abs(log["losses/irn"] - want) < 1e-5


def test_irn_masks_walk_wiring(monkeypatch, tmp_path):
    """irn_masks: per image the seeds of the present classes at the edge map's size walk on the IRN's edge map
    (infer_edge in eval mode, --irn-crop) with --rw-radius / --rw-beta / --rw-exp-times, and final_mask gets the
    WALK with the class ids, the image size and --mask-bg; masks go to out_dir (seed-split images outside the
    training split next to them) and are scored on the seed split. Catches: all C seed channels (no [keys - 1]),
    the un-walked seeds to final_mask, --irn-radius as the walk radius, beta / exp swapped, the IRN in train mode,
    the masks written elsewhere or scored on the training ids."""
    args = args_for(rw_radius=3, irn_radius=4, rw_beta=7.0, rw_exp_times=2, mask_bg=0.3, irn_crop=24)
    ctx = SimpleNamespace(args=args, splits={"seed": "trainS"}, run_dir=tmp_path, device=torch.device("cpu"))
    train_set, seed_set = LabelSet(("a", "b")), LabelSet(("b", "c"))
    cache = {**label_cache(["a", "b"]), "c": label_cache(["x", "c"])["c"]}  # c: the seed split's 2nd image, one class
    rec = {"edge": [], "walk": [], "final": [], "cm": []}
    monkeypatch.setattr(csd, "each_sample", each_sample_stub)
    monkeypatch.setattr(csd, "compute_maps", lambda ctx_, model, datasets, desc:
                        rec.update(datasets=datasets, model=model) or cache)
    edge = torch.tensor([[0.2, 0.7]])  # ceil(4 / 4) x ceil(6 / 4)

    def infer_edge(irn, image, crop, device):
        rec["edge"].append((irn.training, crop))
        return edge

    def walk(x, e, radius, beta, exp_times):
        rec["walk"].append((x.clone(), e, radius, beta, exp_times))
        return 2 * x + 1

    def final(rw, keys, H, W, bg):
        rec["final"].append((rw.clone(), keys.copy(), H, W, bg))
        return np.full((H, W), keys[-1], np.uint8)

    monkeypatch.setattr(csd, "infer_edge", infer_edge)
    monkeypatch.setattr(csd, "random_walk", walk)
    monkeypatch.setattr(csd, "final_mask", final)
    monkeypatch.setattr(csd.miou.ConfusionMatrix, "update", lambda self, lab, gt, **k: rec["cm"].append(gt.copy()))
    monkeypatch.setattr(csd, "miou_entry", lambda result, names, **kw: kw)
    irn = TinyEdge().train()
    out = tmp_path / "masks"
    res = csd.irn_masks(ctx, "MODEL", irn, train_set, seed_set, out)
    assert rec["model"] == "MODEL" and rec["datasets"] == [train_set, seed_set]
    assert rec["edge"] == [(False, 24)] * 3
    assert len(rec["walk"]) == len(rec["final"]) == 3
    samples = [(train_set, 0), (train_set, 1), (seed_set, 1)]  # a, b, then the seed-only image c
    for (ds, i), (x, e, radius, beta, exp_times), (rw, keys, H, W, bg) in zip(samples, rec["walk"], rec["final"]):
        s = ds[i]
        want_keys = np.flatnonzero(s["label"]) + 1
        seed = csd.seed_from_lowres(cache[s["name"]], s["label"], (1, 2))[want_keys - 1]
        assert torch.allclose(x, torch.from_numpy(seed)) and e is edge and (radius, beta, exp_times) == (3, 7.0, 2)
        assert torch.allclose(rw, 2 * x + 1) and np.array_equal(keys, want_keys) and (H, W, bg) == (4, 6, 0.3)
    for name, folder in (("a", out), ("b", out), ("c", tmp_path / "pseudo_labels" / "mask" / "trainS")):
        assert (folder / f"{name}.png").is_file()
    assert len(rec["cm"]) == 2  # b and c: the seed split's ids
    assert set(res) == {"mask/trainS"} and res["mask/trainS"]["bg"] == 0.3


def test_train_classifier_irn_branch_sgd_groups_and_poly(monkeypatch, toy_root):
    """--classifier irn (IRN step/train_cam.py): SGD over irn_param_groups (backbone at --lr, classifier at 10 x --lr,
    both with --weight-decay) with --cam-momentum, and a per-iteration poly schedule over the whole run. Catches:
    AdamW / MCTformer's groups under irn, the momentum not passed (0) or 0.9, the 10x classifier group dropped,
    the cosine per-epoch schedule or poly over the epochs."""
    class TinyCAM(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone, self.classifier = nn.Conv2d(3, 4, 1), nn.Conv2d(4, C, 1, bias=False)
            self.frozen = nn.Conv2d(1, 1, 1).requires_grad_(False)
            self.backbone.register_module("frozen", self.frozen)

    args = args_for(classifier="irn", lr=0.05, weight_decay=3e-4, cam_momentum=2e-4, batch_size=4, epochs=2,
                    max_iters=0)
    monkeypatch.setattr(csd, "build_model", lambda a, k, init_weights: TinyCAM())
    got = capture_loop(monkeypatch)
    labels = csd.data.SegDataset(toy_root, "train").labels()
    model = csd.train_classifier(fake_ctx(args, toy_root), "stage1", labels.shape[1] + 1, labels, False)
    opt = got["modules"]["optimizer"]
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 2e-4
    g0, g1 = opt.param_groups
    assert [id(p) for p in g0["params"]] == [id(model.backbone.weight), id(model.backbone.bias)]
    assert [id(p) for p in g1["params"]] == [id(model.classifier.weight)]
    assert (g0["lr"], g1["lr"], g0["weight_decay"], g1["weight_decay"]) == (0.05, 0.5, 3e-4, 3e-4)
    total = 2 * (len(labels) // 4)
    assert got["total"] == total
    assert [got["lr"](it) for it in range(total)] == [csd.poly_lr(it, total) for it in range(total)]


def test_irn_transform_steps_and_label_subsampling(monkeypatch):
    """IRNet's IRN training view: random rescale U(0.5, 1.5) (bicubic image, the IR label as a mask), flip, crop
    --irn-crop, all on the sample's rng, then the label reduced x 0.25 by the centre pixel 4i + 2. Catches: the
    label taken at 4i (or pooled), another ratio range / interpolation, --irn-crop not the crop, the IR label not
    moved with the image, the rng replaced."""
    calls = []

    def rescale(image, rng, masks=(), maps=(), ratio_range=None, interp=None):
        calls.append(("rescale", rng, ratio_range, interp, masks[0] is ir))
        return image, masks, 1.0

    def flip(image, rng, masks=(), maps=()):
        calls.append(("flip", rng))
        return image, masks, False

    def crop(image, rng, size, masks=(), maps=()):
        calls.append(("crop", rng, size))
        return image, masks, None, None

    monkeypatch.setattr(csd.augment, "random_rescale", rescale)
    monkeypatch.setattr(csd.augment, "random_hflip", flip)
    monkeypatch.setattr(csd.augment, "random_crop", crop)
    image = np.full((16, 16, 3), 90, np.uint8)
    ir = (np.arange(256).reshape(16, 16) % 7).astype(np.uint8)
    rng = np.random.default_rng(0)
    out = csd.irn_transform(args_for(irn_crop=16))({"image": image, "ir": ir}, rng)
    assert calls == [("rescale", rng, (0.5, 1.5), "bicubic", True), ("flip", rng), ("crop", rng, 16)]
    assert torch.equal(out["ir"], torch.from_numpy(ir[2::4, 2::4].astype(np.int64)))
    assert not torch.equal(out["ir"], torch.from_numpy(ir[::4, ::4].astype(np.int64)))
    assert torch.equal(out["image"], csd.augment.to_tensor(image))


def test_infer_edge_pads_flips_averages_and_crops():
    """The IRN edge map of one image: the normalised image and its mirror, zero-padded bottom / right to at least
    the training crop (and a multiple of 16), the two logit maps averaged after un-flipping the mirror's, cropped
    to (ceil(H/4), ceil(W/4)), then the sigmoid. Catches: the mirror's logits not un-flipped, a probability average
    instead of a logit average, padding on the top / left, the crop not reaching the training size."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 1, 6, 6, generator=g)
    seen = []

    def irn(x):
        seen.append(x)
        return logits

    image = (np.arange(10 * 13 * 3).reshape(10, 13, 3) * 11 % 251).astype(np.uint8)
    got = csd.infer_edge(irn, image, 24, torch.device("cpu"))
    (x,) = seen
    img = csd.augment.to_tensor(image)
    assert x.shape == (2, 3, 24, 24)
    assert torch.equal(x[0, :, :10, :13], img) and torch.equal(x[1, :, :10, :13], img.flip(-1))
    assert not x[:, :, 10:].any() and not x[:, :, :, 13:].any()
    a, b = logits[0, 0, :3, :4], logits[1, 0, :3, :4]
    assert got.shape == (3, 4) and torch.allclose(got, torch.sigmoid(a / 2 + b.flip(-1) / 2))
    assert not torch.allclose(got, torch.sigmoid(a / 2 + b / 2))


def test_make_ir_label_rule_and_crf_per_threshold(monkeypatch):
    """IRNet's IR labels: confident fg = argmax [--ir-fg, cams] where that is a class, confident bg where argmax
    [--ir-bg, cams] is background, 255 between; the IRN CRF preset (gt_prob 0.7, n = 1 + K labels) on each
    threshold's index map separately. Without the CRF bg at --ir-bg implies bg at --ir-fg, so the CRF stub (which
    turns the --ir-bg map to all background) is what tells 'bg in BOTH maps' from 'bg in the low map'.
    Catches: the thresholds swapped, ties going to the class, the bg rule ignoring the fg map, the psa preset,
    the CRF not applied under use_crf (or applied without it)."""
    cam = np.array([[[0.5, 0.2, 0.01, 0.1, 0.3]], [[0.1, 0.1, 0.02, 0.6, 0.0]]], np.float32)  # (K=2, 1, 5)
    keys = np.array([1, 3])
    assert csd.make_ir_label(None, cam, keys, 0.3, 0.05, use_crf=False).tolist() == [[1, 255, 0, 3, 255]]
    crf_calls = []

    def refine(image, idx, n, **kw):
        crf_calls.append((idx.copy(), n, kw))
        return idx if len(crf_calls) == 1 else np.zeros_like(idx)  # the --ir-bg map: all background

    monkeypatch.setattr(csd.crf, "refine_labels", refine)
    got = csd.make_ir_label(np.zeros((1, 5, 3), np.uint8), cam, keys, 0.3, 0.05, use_crf=True)
    assert got.tolist() == [[1, 0, 0, 3, 0]]  # the fg map's classes survive; bg wherever both maps say bg
    (fg_idx, n0, kw0), (bg_idx, n1, kw1) = crf_calls
    assert fg_idx.tolist() == [[1, 0, 0, 2, 0]] and bg_idx.tolist() == [[1, 1, 0, 2, 1]]
    assert n0 == n1 == 3 and kw0 == kw1 == {"gt_prob": 0.7, **csd.crf.PRESETS["irn"]}


def test_final_mask_global_max_and_background_score():
    """IRNet's sem_seg rule: the walk x4 (bilinear) cropped to (H, W), divided by its maximum over ALL classes and
    pixels, argmax over [--mask-bg, r] mapped to the class ids. Catches: a per-class max (a weak class then
    reaches 1 and beats the background), the background score ignored, 0-based ids, no crop."""
    rw = torch.tensor([[[1.0, 0.0]], [[0.0, 0.2]]])  # (K=2, 1, 2): class 2 strong on the left, class 5 weak on the right
    got = csd.final_mask(rw, np.array([2, 5]), 3, 7, 0.25)
    assert got.shape == (3, 7) and got.dtype == np.uint8
    assert (got[:, :2] == 2).all() and (got[:, -2:] == 0).all() and set(np.unique(got)) <= {0, 2}
    got = csd.final_mask(rw, np.array([2, 5]), 3, 7, 0.1)
    assert (got[:, -2:] == 5).all()  # below 0.2 / 1 the weak class wins
    assert not csd.final_mask(torch.zeros(1, 1, 2), np.array([4]), 4, 8, 0.25).any()


def test_evaluate_seeds_matches_brute_force_per_threshold_and_subset():
    """The one-pass seed sweep against a brute force: at every threshold t, seeds_to_label(seed, label, t) scored
    with a ConfusionMatrix, for all images and the single- / multi-label subsets. Min-max seeds hold exact zeros,
    so a tie at t = 0.00 is tested. Catches: ties at t counted as foreground (searchsorted side), an image in the
    wrong subset (a single-label image counted as multi or the reverse, a class-free image as single), the last
    threshold dropped, the background column not receiving the pixels below t."""
    g = torch.Generator().manual_seed(7)
    labels = [np.array([0, 1, 0], np.float32), np.array([1, 0, 1], np.float32), np.array([1, 1, 1], np.float32),
              np.array([0, 0, 1], np.float32), np.zeros(3, np.float32)]  # the last: no class, in no subset
    samples, cache = [], {}
    for i, label in enumerate(labels):
        keys = np.flatnonzero(label) + 1
        mask = torch.randint(0, len(keys) + 1, (6, 8), generator=g).numpy()
        mask = np.concatenate([[0], keys])[mask].astype(np.uint8)
        mask[0, :2] = 255
        mask[1, :3] = 0  # background in every image (the class-free one is all background)
        samples.append({"name": f"i{i}", "label": label, "mask": mask})
        cache[f"i{i}"] = csd.LowresMaps([torch.rand(2, len(keys), 2, 3, generator=g).half()], "minmax")
    out = csd.evaluate_seeds(cache, iter(samples), 4, 0.2)
    thresholds = np.round(np.arange(0.0, 0.2 + 1e-9, 0.01), 2)
    for group, members in (("all", samples), ("single", [samples[0], samples[3]]), ("multi", samples[1:3])):
        curve = out[group]["curve"]
        assert [t for t, _ in curve] == thresholds.tolist()
        for t, got in curve:
            cm = csd.miou.ConfusionMatrix(4)
            for s in members:
                seed = csd.seed_from_lowres(cache[s["name"]], s["label"], (6, 8))
                cm.update(csd.seeds_to_label(seed, s["label"], t), s["mask"])
            assert got == pytest.approx(cm.compute()["miou"], abs=1e-12), (group, t)
