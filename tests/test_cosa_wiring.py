"""Wiring of cosa.py's training step (Alg. 1): which tensor of which network and view feeds each loss, the
thresholds, the Eq. (11) weights, the warm-ups, the EMA and the component switches.

Two kinds of test:
  * stub tests: a stub ON returns hand-made tensors, `assign` is replaced by hand-made AN outputs, and every
    equation function is wrapped to record its inputs; the losses return `probe[k] + const_k`, so the
    gradient that reaches probe[k] at optimizer.step() is exactly the weight of term k in the total loss;
  * an end-to-end test: a real tiny ON and AN, real functions, the ON gradients of train_step compared with
    the gradients of Eq. (11) written out by hand.

COSA_PATH=/some/copy/cosa.py runs these tests against another copy of the script (mutation testing); by
default the repository's cosa.py is imported.
"""
import copy
import dataclasses
import importlib
import importlib.util
import inspect
import json
import os
import sys
import types

import numpy as np
import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F


def load_cosa():
    path = os.environ.get("COSA_PATH")
    if not path:
        return importlib.import_module("cosa")
    spec = importlib.util.spec_from_file_location("cosa_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource (main's argument parser) looks the module up here
    spec.loader.exec_module(module)
    return module


cosa = load_cosa()

B, C, CROP, PATCH = 2, 3, 16, 4
GRID = (CROP // PATCH,) * 2
TERMS = ("cls", "cls_aux", "c2s", "c2s_aux", "s2c", "csc")
CONST = dict(zip(TERMS, (0.11, 0.13, 0.17, 0.19, 0.23, 0.29)))  # the value each stub loss returns
XI, XI_AUX, FIXED = 0.37, 0.61, 0.43  # DT values of M' and M†', and --fixed-thr
STALE = 0.52  # a FakeDT's value before its update() of this iteration
D = 5  # feature channels of the stub ON's F
LAMBDA = dict(c2s=0.3, s2c=0.7, csc=0.2)  # distinct, so that a swapped weight shows


def hand_made(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    keep = labels[:, :, None, None]
    return {
        # AN outputs (assign): M', M†' normalised to [0, 1] and filtered by Y; S' logits
        "cam_a": torch.rand(B, C, CROP, CROP, generator=g) * keep,
        "cam_aux_a": torch.rand(B, C, CROP, CROP, generator=g) * keep,
        "seg_a": torch.randn(B, C + 1, CROP, CROP, generator=g) * 3,
        # ON outputs (strong view)
        "cls_logits": torch.randn(B, C, generator=g), "cls_logits_aux": torch.randn(B, C, generator=g),
        "cam": torch.randn(B, C, *GRID, generator=g), "cam_aux": torch.randn(B, C, *GRID, generator=g),
        "seg": torch.randn(B, C + 1, *GRID, generator=g),
        "labels": labels,
        "weak": torch.randn(B, 3, CROP, CROP, generator=g), "strong": torch.randn(B, 3, CROP, CROP, generator=g),
        "box": torch.tensor([[0, CROP, 0, CROP], [2, CROP, 0, CROP - 4]]),
        "mask": torch.randint(0, C + 1, (B, CROP, CROP), generator=g).index_fill_(2, torch.tensor([0]), 255),
        # ON features F and classifier W, with W * F != the hand-made M (Tab. 4a detach variants)
        "feat": torch.randn(B, D, *GRID, generator=g), "W": torch.randn(C, D, 1, 1, generator=g),
    }


ORIGINAL = {name: getattr(cosa, name) for name in (
    "assign", "ema_update", "loss_cls", "cam_pseudo_label", "perplexity", "loss_c2s", "segmentation_pseudo_label",
    "loss_s2c", "contrastive_regions", "loss_csc")}  # before any test wraps them


class StubOnline(nn.Module):
    """ON: returns the hand-made outputs times theta (= 1), so they carry gradient; probe[k] enters loss k."""

    def __init__(self, t):
        super().__init__()
        self.t = t
        self.theta = nn.Parameter(torch.ones(()))
        self.probe = nn.Parameter(torch.zeros(len(TERMS)))
        self.backbone = types.SimpleNamespace(patch_embed=types.SimpleNamespace(patch_size=(PATCH, PATCH)))
        self.classifier = nn.Conv2d(D, C, 1, bias=False)
        self.classifier.weight.data.copy_(t["W"])
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x)
        return {k: self.t[k] * self.theta for k in ("cls_logits", "cls_logits_aux", "cam", "cam_aux", "seg", "feat")}


class FakeDT:
    """value is STALE until update() is called, then the given value: a threshold read before this iteration's
    update shows. .order records push / update."""

    def __init__(self, value):
        self.target, self.value, self.pushed, self.updates, self.order = value, STALE, [], 0, []

    def push(self, nu):
        self.pushed.append(nu.clone())
        self.order.append("push")

    def update(self):
        self.updates += 1
        self.order.append("update")
        self.value = self.target
        return self.value


class FakeOptimizer:
    """Records the probe / theta gradients at step() and the order of zero_grad / step."""

    def __init__(self, net, events):
        self.net, self.events = net, events

    def zero_grad(self, set_to_none=True):
        self.events.append("zero_grad")

    def step(self):
        self.events.append("step")
        self.probe_grad = self.net.probe.grad.clone() if self.net.probe.grad is not None else torch.zeros(len(TERMS))
        self.theta_grad = None if self.net.theta.grad is None else self.net.theta.grad.clone()


class Run:
    """One train_step on the stubs; .calls[name] = list of bound-argument dicts, .log, .grad (probe grads)."""

    def __init__(self, monkeypatch, it=10, seed=0, **kw):
        self.t = t = hand_made(seed)
        base = dict(crop=CROP, loss_warmup=10, queue_len=4, pseudo_scales=(1.0, 0.5), ms_cam_merge="sum",
                    lambda_c2s=LAMBDA["c2s"], lambda_s2c=LAMBDA["s2c"], lambda_csc=LAMBDA["csc"], tau_spl=0.05,
                    tau_csc=0.2, csc_sim="dot", csc_scope="batch", ppl_alpha=0.7, ppl_beta=1.5, ppl_eps=0.9,
                    fixed_thr=FIXED, ema_m=0.97, xi_aux="separate")
        base.update(kw)
        self.args = args = cosa.Args(**base)
        self.online, self.an = StubOnline(t), nn.Linear(1, 1)
        self.events, self.calls = [], {}
        self.dts = [FakeDT(XI), FakeDT(XI_AUX)]
        self.opt = FakeOptimizer(self.online, self.events)
        loss_terms = {"loss_cls": ["cls", "cls_aux"], "loss_c2s": ["c2s", "c2s_aux"], "loss_s2c": ["s2c"],
                      "loss_csc": ["csc"]}

        def record(name, fn=None):
            original = ORIGINAL[name]
            signature = inspect.signature(original)
            self.calls[name] = []

            def wrapper(*a, **k):
                bound = signature.bind(*a, **k)
                bound.apply_defaults()
                self.calls[name].append(dict(bound.arguments))
                out = (fn or original)(*a, **k)
                if name in loss_terms:  # the loss value is replaced by probe[k] + const_k
                    term = loss_terms[name][len(self.calls[name]) - 1]
                    return self.online.probe[TERMS.index(term)] + CONST[term] + 0.0 * out
                return out
            monkeypatch.setattr(cosa, name, wrapper)

        record("assign", lambda *a, **k: (t["cam_a"].clone(), t["cam_aux_a"].clone(), t["seg_a"].clone()))
        record("ema_update", lambda *a, **k: self.events.append("ema"))
        for name in ("loss_cls", "cam_pseudo_label", "perplexity", "loss_c2s", "segmentation_pseudo_label",
                     "loss_s2c", "contrastive_regions", "loss_csc"):
            record(name)
        batch = {"weak": t["weak"], "strong": t["strong"], "label": t["labels"], "box": t["box"], "mask": t["mask"]}
        autocast = lambda: torch.autocast("cpu", enabled=False)
        Run.last = self  # for tests in which train_step raises
        self.log = cosa.train_step(self.online, self.an, batch, it, args, self.dts, self.opt, autocast)
        self.grad = dict(zip(TERMS, self.opt.probe_grad.tolist()))

    def call(self, name, i=0):
        assert len(self.calls[name]) > i, f"{name} was called {len(self.calls[name])} times"
        return self.calls[name][i]


def same(a, b):
    return a.shape == b.shape and torch.allclose(a.detach().float(), b.detach().float(), atol=1e-6)


def weights(expected):
    """The expected probe gradients {term: weight}, for comparison with Run.grad."""
    return {k: pytest.approx(v, abs=1e-7) for k, v in expected.items()}


FULL = dict(cls=1.0, cls_aux=1.0, c2s=LAMBDA["c2s"], c2s_aux=LAMBDA["c2s"], s2c=LAMBDA["s2c"], csc=LAMBDA["csc"])


# ------------------------------------------------------------------------------------ networks, views
def test_assign_gets_the_an_the_weak_view_the_labels_and_the_flags(monkeypatch):
    """Catches: the AN run on the strong view, the ON passed as the assignment network, the scales or the
    merge flag not passed, the labels not passed (unfiltered M')."""
    run = Run(monkeypatch)
    call = run.call("assign")
    assert len(run.calls["assign"]) == 1
    assert call["assign_net"] is run.an
    assert call["images"] is run.t["weak"]
    assert call["labels"] is run.t["labels"]
    assert tuple(call["scales"]) == (1.0, 0.5) and call["cam_merge"] == "sum"


def test_online_network_sees_the_strong_view_once(monkeypatch):
    """Catches: the ON run on the weak view (or on both)."""
    run = Run(monkeypatch)
    assert len(run.online.inputs) == 1 and run.online.inputs[0] is run.t["strong"]


def test_classification_losses_take_z_and_z_aux_with_the_image_labels(monkeypatch):
    """Catches: Z used twice / Z† used twice / the CAM instead of Z, the wrong labels, Z detached."""
    run = Run(monkeypatch)
    first, second = run.call("loss_cls", 0), run.call("loss_cls", 1)
    assert same(first["cls_logits"], run.t["cls_logits"]) and first["cls_logits"].requires_grad
    assert same(second["cls_logits"], run.t["cls_logits_aux"]) and second["cls_logits"].requires_grad
    assert first["labels"] is run.t["labels"] and second["labels"] is run.t["labels"]


# ------------------------------------------------------------------------------------- thresholds
def test_dt_queues_get_the_token_grid_class_max_of_their_own_cam(monkeypatch):
    """--xi-aux separate. Catches: M†' pushed into xi's queue (or M' into xi†'s), the rows taken at full
    resolution or before the class max, the mean instead of the max, update() not called."""
    run = Run(monkeypatch)
    for dt, key in zip(run.dts, ("cam_a", "cam_aux_a")):
        expected = F.interpolate(run.t[key], size=GRID, mode="bilinear", align_corners=False).amax(1).flatten(1)
        assert len(dt.pushed) == 1 and same(dt.pushed[0], expected), key
        assert dt.updates == 1
    assert run.log["dt/xi"] == XI and run.log["dt/xi_aux"] == XI_AUX


def test_dt_pushes_this_batch_before_the_fit_and_the_losses_read_the_new_value(monkeypatch):
    """Alg. 1 l.12-13: the current batch joins the queue, then Eq. (6) is solved, then the CPL uses it. Catches:
    update() before push() (the fit misses this batch), the threshold read before update() (last iteration's xi)."""
    for xi_aux in ("separate", "shared"):
        run = Run(monkeypatch, xi_aux=xi_aux)
        assert run.dts[0].order == ["push", "update"], xi_aux
        assert run.dts[1].order == (["push", "update"] if xi_aux == "separate" else []), xi_aux
        assert run.call("cam_pseudo_label")["xi"] == XI != STALE and run.log["dt/xi"] == XI, xi_aux


def test_cpl_and_perplexity_use_each_cams_own_threshold_and_the_box(monkeypatch):
    """--xi-aux separate. Catches: xi and xi† swapped or shared, the CPL of M†' built from M', the box not
    passed, P computed from the other CAM's nu or with the other threshold, lambda_alpha / lambda_beta not passed."""
    run = Run(monkeypatch)
    for i, (key, xi) in enumerate((("cam_a", XI), ("cam_aux_a", XI_AUX))):
        call = run.call("cam_pseudo_label", i)
        assert same(call["cam"], run.t[key]) and call["xi"] == xi and call["box"] is run.t["box"], key
        _, nu = cosa.cam_pseudo_label(run.t[key], xi, run.t["box"])
        p = run.call("perplexity", i)
        assert same(p["nu"], nu) and p["xi"] == xi and p["alpha"] == 0.7 and p["beta"] == 1.5, key


def test_shared_xi_is_the_default_and_feeds_m_dagger(monkeypatch):
    """Default --xi-aux shared (Alg. 1 l.13-17). Catches: xi† read from the second queue while shared, the
    second queue still filled, CSC regions with another threshold."""
    assert cosa.Args().xi_aux == "shared"
    run = Run(monkeypatch, xi_aux="shared")
    assert len(run.dts[0].pushed) == 1 and run.dts[1].pushed == []
    assert [c["xi"] for c in run.calls["cam_pseudo_label"][:2]] == [XI, XI]  # [2:]: inside contrastive_regions
    assert [c["xi"] for c in run.calls["perplexity"][:2]] == [XI, XI]
    assert run.call("contrastive_regions")["xi"] == XI
    assert run.log["dt/xi"] == run.log["dt/xi_aux"] == XI


def test_no_dt_uses_the_fixed_threshold_for_both_and_no_queue(monkeypatch):
    """Catches: --no-dt still reading the DT, the fixed value used for one CAM only, the queues filled."""
    run = Run(monkeypatch, dt=False)
    assert run.dts[0].pushed == [] and run.dts[1].pushed == []
    assert [c["xi"] for c in run.calls["cam_pseudo_label"][:2]] == [FIXED, FIXED]
    assert run.call("contrastive_regions")["xi"] == FIXED
    assert run.log["dt/xi"] == run.log["dt/xi_aux"] == FIXED


# ------------------------------------------------------------------------------------------- losses
def test_c2s_gets_on_s_upsampled_and_the_cpl_and_p_of_each_cam(monkeypatch):
    """Catches: S from the AN (S') instead of the ON, S detached, S not upsampled or upsampled by another mode,
    the CPL or P of the other CAM, P replaced by None (RAW off) or by nu."""
    run = Run(monkeypatch)
    seg_up = F.interpolate(run.t["seg"], size=(CROP, CROP), mode="bilinear", align_corners=False)
    for i, (key, xi) in enumerate((("cam_a", XI), ("cam_aux_a", XI_AUX))):
        call = run.call("loss_c2s", i)
        assert same(call["seg_logits"], seg_up) and call["seg_logits"].requires_grad, key
        cpl, nu = cosa.cam_pseudo_label(run.t[key], xi, run.t["box"])
        assert torch.equal(call["cpl"], cpl), key
        assert same(call["ppl"], cosa.perplexity(nu, xi, 0.7, 1.5)), key


def test_s2c_gets_on_m_and_the_label_filtered_spl_of_s_prime(monkeypatch):
    """Catches: M† or S instead of M, M detached, the SPL from the ON's S, the SPL not filtered by Y,
    tau_spl not passed."""
    run = Run(monkeypatch)
    call = run.call("loss_s2c")
    assert same(call["cam"], run.t["cam"]) and call["cam"].requires_grad
    spl = run.call("segmentation_pseudo_label")
    assert same(spl["seg_logits"], run.t["seg_a"]) and spl["labels"] is run.t["labels"] and spl["tau"] == 0.05
    assert same(call["spl"], cosa.segmentation_pseudo_label(run.t["seg_a"], run.t["labels"], 0.05))


def test_csc_regions_from_m_dagger_prime_and_loss_on_on_m(monkeypatch):
    """Catches: CSC regions from M' instead of M†', the box / grid / eps / alpha / beta not passed, the loss on
    M† or a detached M, the region labels and Omega swapped, tau / sim / scope not passed."""
    run = Run(monkeypatch)
    reg = run.call("contrastive_regions")
    assert same(reg["cam_aux"], run.t["cam_aux_a"]) and reg["xi"] == XI_AUX and reg["box"] is run.t["box"]
    assert tuple(reg["grid"]) == GRID and (reg["alpha"], reg["beta"], reg["eps"]) == (0.7, 1.5, 0.9)
    labels, omega = cosa.contrastive_regions(run.t["cam_aux_a"], XI_AUX, run.t["box"], GRID, 0.7, 1.5, 0.9)
    call = run.call("loss_csc")
    assert same(call["cam"], run.t["cam"]) and call["cam"].requires_grad
    assert torch.equal(call["region_labels"], labels) and torch.equal(call["omega"], omega)
    assert (call["tau"], call["sim"], call["scope"]) == (0.2, "dot", "batch")
    assert run.log["csc/omega"] == pytest.approx(omega.float().mean().item())


def test_contrastive_regions_labels_omega_on_the_grid_inside_the_box():
    """Eq. (9) by hand on a 4x4 grid (M†' constant on the pixels the bilinear 16 -> 4 reads, so it is exact), xi† = 0.5.
    Rows: nu = 0.95 (d = 0.9, P = 0.33, in Omega) | nu = xi (P -> inf, out) | nu = 0.3 (d = 0.4, P = 1.14: out for
    eps = 1, in for eps = 1.2) | nu = 0 (background, d = 1, in). The box leaves out the last column. Catches: the
    box not applied to Omega, eps / alpha / xi not used, Omega from nu instead of P, labels at full size,
    nearest instead of bilinear down-sampling."""
    cam = torch.zeros(1, 2, CROP, CROP)
    cam[0, 0, 0:4, 0:8], cam[0, 1, 0:4, 8:] = 0.95, 0.95
    cam[0, 0, 4:8, 0:8], cam[0, 1, 4:8, 8:] = 0.5, 0.5
    cam[0, 0, 8:12, :] = 0.3
    cam[0, :, 0, :] = 0.0  # bilinear 16 -> 4 reads pixel rows 1-2 of each block, nearest would read row 0
    box = torch.tensor([[0, CROP, 0, 12]])  # cell centres at x = 2, 6, 10, 14: the last column is outside
    labels, omega = cosa.contrastive_regions(cam, 0.5, box, GRID)
    assert labels.tolist() == [[[1, 1, 2, 2], [1, 1, 2, 2], [0, 0, 0, 0], [0, 0, 0, 0]]]
    inside = [True, True, True, False]
    assert omega.tolist() == [[inside, [False] * 4, [False] * 4, inside]]
    _, omega_wide = cosa.contrastive_regions(cam, 0.5, box, GRID, eps=1.2)
    assert omega_wide.tolist() == [[inside, [False] * 4, inside, inside]]
    # lambda_alpha = 0.4: P(d = 0.9) = 1.02 > 1 (the first row drops out), P(d = 1) = 0.92 (background stays)
    _, omega_alpha = cosa.contrastive_regions(cam, 0.5, box, GRID, alpha=0.4)
    assert omega_alpha.tolist() == [[[False] * 4, [False] * 4, [False] * 4, inside]]


def test_total_is_eq11_weighted_sum_in_gradient_and_log(monkeypatch):
    """Eq. (11) with summed c2s terms. Catches: any weight missing, swapped (lambda_s2c on c2s, ...), applied
    twice, the c2s terms averaged, a term dropped from the total or the log, a term logged under another key."""
    run = Run(monkeypatch)
    assert run.grad == weights(FULL)
    for k in TERMS:
        assert run.log[f"losses/{k}"] == pytest.approx(CONST[k]), k
    assert run.log["losses/total"] == pytest.approx(sum(FULL[k] * CONST[k] for k in TERMS))


def test_optimizer_order_and_ema_after_the_step(monkeypatch):
    """Catches: zero_grad after backward (no gradient), no step, the EMA before the step, the EMA between the
    wrong networks or with the wrong momentum."""
    run = Run(monkeypatch)
    assert run.events == ["zero_grad", "step", "ema"]
    ema = run.call("ema_update")
    assert ema["assign_net"] is run.an and ema["online_net"] is run.online and ema["m"] == 0.97
    assert run.opt.theta_grad is not None


@pytest.mark.parametrize("term", TERMS)
def test_a_non_finite_loss_stops_before_the_update_and_names_the_term(monkeypatch, term):
    """Catches: check_finite deleted, moved after optimizer.step / the EMA (weights already corrupted), or given
    another key filter (only losses/total, only some terms)."""
    monkeypatch.setitem(CONST, term, float("nan") if term != "csc" else float("inf"))
    with pytest.raises(cosa.NonFinite, match=f"losses/{term} is not finite"):
        Run(monkeypatch)
    assert "step" not in Run.last.events and "ema" not in Run.last.events


# --------------------------------------------------------------------------------------- warm-ups
def test_loss_warmup_only_classification_and_an_runs_for_the_last_q_iterations(monkeypatch):
    """it = loss_warmup - 1 (AN on, losses off) and it = loss_warmup - Q - 1 (AN off). Catches: > instead of >=
    in either condition, the AN-for-the-queue window of the wrong length, losses on during the warm-up."""
    run = Run(monkeypatch, it=9)
    assert run.calls["loss_c2s"] == [] and run.calls["loss_s2c"] == [] and run.calls["loss_csc"] == []
    assert len(run.calls["assign"]) == 1 and len(run.dts[0].pushed) == 1
    assert run.grad == weights(dict(FULL, c2s=0, c2s_aux=0, s2c=0, csc=0))
    assert run.log["losses/total"] == pytest.approx(CONST["cls"] + CONST["cls_aux"])
    assert "losses/c2s" not in run.log
    assert len(Run(monkeypatch, it=6).calls["assign"]) == 1  # it = loss_warmup - Q: first AN iteration
    early = Run(monkeypatch, it=5)
    assert early.calls["assign"] == [] and early.dts[0].pushed == []
    assert early.events == ["zero_grad", "step", "ema"]  # the EMA runs during the warm-up too
    # without DT the AN is not needed before the losses start
    assert Run(monkeypatch, it=9, dt=False).calls["assign"] == []
    assert Run(monkeypatch, it=10, dt=False).grad == weights(FULL)


# ------------------------------------------------------------------------------- component switches
def test_no_gc_removes_only_s2c(monkeypatch):
    """Catches: --no-gc zeroing another weight, or leaving lambda_s2c on."""
    run = Run(monkeypatch, gc=False)
    assert run.grad == weights(dict(FULL, s2c=0.0))
    assert run.log["losses/total"] == pytest.approx(sum(FULL[k] * CONST[k] for k in TERMS if k != "s2c"))


def test_no_csc_removes_only_csc(monkeypatch):
    """Catches: --no-csc ignored, or removing another term."""
    run = Run(monkeypatch, csc=False)
    assert run.calls["loss_csc"] == []
    assert run.grad == weights(dict(FULL, csc=0.0))
    assert run.log["losses/csc"] == 0.0


def test_no_raw_drops_only_the_perplexity_weights(monkeypatch):
    """Catches: --no-raw ignored (P still passed), or changing the CPL / S / other terms."""
    run = Run(monkeypatch, raw=False)
    assert [c["ppl"] for c in run.calls["loss_c2s"]] == [None, None]
    cpl, _ = cosa.cam_pseudo_label(run.t["cam_a"], XI, run.t["box"])
    assert torch.equal(run.call("loss_c2s")["cpl"], cpl)
    assert run.grad == weights(FULL)
    assert run.call("contrastive_regions")["xi"] == XI_AUX  # Omega still uses P (Eq. (9))


def test_no_sa_makes_the_ema_copy_the_online_network(monkeypatch):
    """Catches: --no-sa ignored (m = ema_m) or m = 1 (a frozen AN); the losses unchanged."""
    run = Run(monkeypatch, sa=False)
    assert run.call("ema_update")["m"] == 0.0
    assert run.grad == weights(FULL)


def test_full_supervision_replaces_cpl_by_the_mask_without_raw(monkeypatch):
    """Catches: --supervision full still using the CPL or the RAW weights for one of the two c2s terms."""
    run = Run(monkeypatch, supervision="full")
    for call in run.calls["loss_c2s"]:
        assert call["cpl"] is run.t["mask"] and call["ppl"] is None
    assert run.grad == weights(FULL)


@pytest.mark.parametrize("row", list(cosa.ABLATIONS))
def test_ablation_rows_remove_exactly_their_terms(monkeypatch, row):
    """Table 3a rows through validate(). Catches: a row switching the wrong component off."""
    args = cosa.Args(ablation=row)
    cosa.validate(args)
    off = set(cosa.ABLATIONS[row])
    kw = {s: getattr(args, s) for s in ("gc", "sa", "raw", "csc", "dt")}
    assert {k for k, v in kw.items() if not v} == off
    run = Run(monkeypatch, **kw)
    expected = dict(FULL, s2c=0.0 if "gc" in off else FULL["s2c"], csc=0.0 if "csc" in off else FULL["csc"])
    assert run.grad == weights(expected)
    assert run.call("ema_update")["m"] == (0.0 if "sa" in off else 0.97)
    assert all((c["ppl"] is None) == ("raw" in off) for c in run.calls["loss_c2s"])


@pytest.mark.parametrize("switch", ["gc", "sa", "raw", "csc", "dt"])
def test_no_switch_flags_turn_their_component_off_from_the_command_line(switch):
    """The README's Table 3b commands (--no-gc, --no-sa, --no-raw, --no-csc, --no-dt). Catches: a switch named no_X,
    which argparse's BooleanOptionalAction reads as no_X = False for --no-X, so the flag silently does nothing."""
    args, _ = cosa.parse_args([f"--no-{switch.replace('_', '-')}"])
    cosa.validate(args)
    assert getattr(args, switch) is False
    assert all(getattr(args, s) for s in ("gc", "sa", "raw", "csc", "dt") if s != switch)
    assert getattr(cosa.parse_args([])[0], switch) is True


# ----------------------------------------------------------------------------- stage (train_cosa)
class Wrapped(nn.Module):
    """What ctx.wrap returns (DDP under torchrun)."""

    def __init__(self, module):
        super().__init__()
        self.module = module


def test_train_cosa_builds_two_queues_the_optimizer_and_the_lr_schedule(monkeypatch):
    """Catches: DT queues with the wrong Q / start-up value / filter, the schedule with the wrong total or
    warm-up, the step given the wrong networks (the raw ON instead of ctx.wrap's, the AN), the optimizer over
    the AN, the checkpointed modules incomplete, the training views with the wrong crop / scale range /
    magnitudes / normalisation, built from the wrong split, or carrying the mask when not needed (or not when
    --supervision full / --gc-source gt need it)."""
    seen = {}
    monkeypatch.setattr(cosa.data, "SegDataset", lambda *a, **k: ("dataset", k.get("transform"), a[1], k))
    monkeypatch.setattr(cosa, "train_loop", lambda *a, **k: seen.update(args=a, kw=k))
    monkeypatch.setattr(cosa, "train_step", lambda *a: seen.update(step=a) or {})
    args = cosa.Args(iters=500, max_iters=0, warmup_iters=30, poly_power=0.8, queue_len=7, dt_init=0.41,
                     gmm_min=0.07, batch_size=2, crop=CROP, input_norm="backbone", scale_min=0.7, scale_max=1.3,
                     strong_magnitudes="code")
    online, an = nn.Linear(2, 2), nn.Linear(2, 2)
    online.backbone = nn.Linear(1, 1)
    wrapped = []
    ctx = types.SimpleNamespace(args=args, spec=types.SimpleNamespace(root="r", dataset="voc"),
                                splits={"train": "t", "seed": "s", "val": "v"},
                                wrap=lambda m: wrapped.append(Wrapped(m).eval()) or wrapped[-1], autocast="AC")
    cosa.train_cosa(ctx, online, an)
    stage, train_set, batch_size, total, step, modules = seen["args"][1:7]
    assert (stage, batch_size, total) == ("cosa", 2, 500)
    transform = train_set[1]
    assert train_set[2] == "t" and isinstance(transform, cosa.TrainTransform)
    assert train_set[3]["dataset"] == "voc" and train_set[3]["seed"] == args.seed
    assert (transform.crop, tuple(transform.scale_range), transform.magnitudes) == (CROP, (0.7, 1.3), "code")
    assert transform.strong_op is None and transform.with_mask is False
    assert transform.mean_std == cosa.input_mean_std(args) == ((0.5,) * 3, (0.5,) * 3)
    assert len(wrapped) == 1 and wrapped[0].module is online and wrapped[0].training and online.training  # .train()
    opt_params = {id(q) for g in modules["optimizer"].param_groups for q in g["params"]}
    assert opt_params == {id(q) for q in online.parameters()}
    dts = modules["dt"], modules["dt_aux"]
    assert all(d.queue.maxlen == 7 and d.init == 0.41 and d.min_value == 0.07 for d in dts) and dts[0] is not dts[1]
    assert modules["online"] is online and modules["assign"] is an
    assert isinstance(modules["optimizer"], torch.optim.AdamW)
    lr = seen["kw"]["lr"]
    assert [lr(t) for t in (0, 15, 30, 200)] == pytest.approx([cosa.lr_factor(t, 500, 30, 0.8) for t in (0, 15, 30, 200)])
    step({"b": 1}, 3)
    net, assign_net, batch, it, step_args, thresholds, optimizer, autocast = seen["step"]
    assert net is wrapped[0] and assign_net is an and batch == {"b": 1} and it == 3 and step_args is args
    assert list(thresholds) == list(dts) and optimizer is modules["optimizer"] and autocast == "AC"
    for kw in (dict(supervision="full"), dict(gc_source="gt")):  # the ground truth follows the geometry
        ctx.args = cosa.Args(**dict(dataclasses.asdict(args), **kw))
        cosa.train_cosa(ctx, online, an)
        assert seen["args"][2][1].with_mask is True, kw


# -------------------------------------------------------------------------- end to end, real networks
def tiny_vit_net(seed):
    torch.manual_seed(seed)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                            img_size=CROP, patch_size=PATCH, embed_dim=16, depth=3, num_heads=2)
    return cosa.CoSANet(vit, C, aux_block=-2, decoder_dim=8, decoder_dilation=1)


def reference_total(on, an, t, args, xi, xi_aux):
    """Eq. (11) written out from Alg. 1 with the (separately tested) equation functions."""
    cam_a, cam_aux_a, seg_a = cosa.assign(an, t["weak"], t["labels"], args.pseudo_scales, args.ms_cam_merge)
    out = on(t["strong"])
    total = cosa.loss_cls(out["cls_logits"], t["labels"]) + cosa.loss_cls(out["cls_logits_aux"], t["labels"])
    seg_up = F.interpolate(out["seg"], size=(CROP, CROP), mode="bilinear", align_corners=False)
    for cam, thr in ((cam_a, xi), (cam_aux_a, xi_aux)):
        cpl, nu = cosa.cam_pseudo_label(cam, thr, t["box"])
        total = total + args.lambda_c2s * cosa.loss_c2s(seg_up, cpl, cosa.perplexity(nu, thr, args.ppl_alpha, args.ppl_beta))
    spl = cosa.segmentation_pseudo_label(seg_a, t["labels"], args.tau_spl)
    total = total + args.lambda_s2c * cosa.loss_s2c(out["cam"], spl)
    labels, omega = cosa.contrastive_regions(cam_aux_a, xi_aux, t["box"], GRID, args.ppl_alpha, args.ppl_beta, args.ppl_eps)
    return total + args.lambda_csc * cosa.loss_csc(out["cam"], labels, omega, args.tau_csc, args.csc_sim, args.csc_scope)


@pytest.mark.parametrize("xi_aux", ["separate", "shared"])
def test_end_to_end_gradients_equal_hand_written_eq11(xi_aux):
    """Real tiny ON and AN (different weights). Catches anything in train_step that changes the ON gradient:
    a wrong tensor / view / network / threshold / weight / interpolation / reduction, a missing term."""
    t = hand_made(1)
    t["weak"], t["strong"] = torch.randn(B, 3, CROP, CROP), torch.randn(B, 3, CROP, CROP)
    on, an = tiny_vit_net(0), tiny_vit_net(1)
    an.requires_grad_(False).eval()
    args = cosa.Args(crop=CROP, loss_warmup=0, queue_len=4, pseudo_scales=(1.0, 0.5), lambda_c2s=0.3, lambda_s2c=0.7,
                     lambda_csc=0.2, tau_csc=0.5, ppl_eps=2.0, ema_m=0.9, xi_aux=xi_aux)
    dts = [FakeDT(0.3), FakeDT(0.55)]
    grads = {}

    class Capture:
        def zero_grad(self, set_to_none=True):
            on.zero_grad(set_to_none=True)

        def step(self):
            grads.update({n: p.grad.clone() for n, p in on.named_parameters() if p.grad is not None})

    an_before = copy.deepcopy(an)
    batch = {"weak": t["weak"], "strong": t["strong"], "label": t["labels"], "box": t["box"]}
    log = cosa.train_step(on, an, batch, 0, args, dts, Capture(), lambda: torch.autocast("cpu", enabled=False))
    on.zero_grad(set_to_none=True)
    ref = reference_total(on, an_before, t, args, 0.3, 0.55 if xi_aux == "separate" else 0.3)
    ref.backward()
    assert log["losses/total"] == pytest.approx(ref.item(), rel=1e-5)
    assert log["csc/omega"] > 0 and log["losses/csc"] > 0  # the CSC term is active in this case
    assert set(grads) == {n for n, p in on.named_parameters() if p.grad is not None}
    for n, p in on.named_parameters():
        assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-7), n
    # the EMA moved the AN by (1 - m) towards the (unchanged, lr-free) ON
    for a, b, o in zip(an_before.parameters(), an.parameters(), on.parameters()):
        assert torch.allclose(b, 0.9 * a + 0.1 * o, atol=1e-6)
        assert not b.requires_grad


def test_assign_is_no_grad_and_filtered_even_with_a_trainable_network():
    """Catches: the AN pass building a graph (no torch.no_grad), M' / M†' not filtered by Y, S' filtered here."""
    net = tiny_vit_net(0)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    cam, cam_aux, seg = cosa.assign(net, torch.randn(B, 3, CROP, CROP), labels, (1.0, 0.5))
    assert not (cam.requires_grad or cam_aux.requires_grad or seg.requires_grad)
    for m in (cam, cam_aux):
        assert m.shape == (B, C, CROP, CROP) and torch.all(m[labels == 0] == 0)
        assert m.min() >= 0 and m.max() <= 1
    assert seg.shape == (B, C + 1, CROP, CROP) and seg[:, 1:][labels == 0].abs().sum() > 0


class FlipProbe(nn.Module):
    """A stand-in network that is NOT mirror-equivariant: outputs on the token grid = a fixed linear map of the
    patch-averaged image plus a left-to-right ramp, so the un-flip of the mirrored view is visible."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.maps = {k: torch.randn(n, 3, generator=g) for k, n in (("cam", C), ("cam_aux", C), ("seg", C + 1))}
        self.ramps = {k: torch.randn(n, generator=g) for k, n in (("cam", C), ("cam_aux", C), ("seg", C + 1))}

    def forward(self, x):
        pooled = F.avg_pool2d(x, PATCH)  # (N, 3, h, w)
        ramp = torch.linspace(-1.0, 1.0, pooled.shape[-1])
        return {k: torch.einsum("kc,nchw->nkhw", self.maps[k], pooled) + self.ramps[k][:, None, None] * ramp
                for k in self.maps}


def reference_multiscale(net, x, scales, merge, unflip=True):
    """Alg. 1 l.7-9 by hand: every scale and its mirror, back to the crop size, un-flipped; CAMs ReLU'd, max over
    the pair, then max / sum over scales; S mean over all views. unflip=False: the mirror's maps left mirrored (the
    bug the test below must be able to see)."""
    H, W = x.shape[-2:]
    up = lambda t: F.interpolate(t, size=(H, W), mode="bilinear", align_corners=False)
    back = (lambda t: t.flip(-1)) if unflip else (lambda t: t)
    cams, auxs, segs = [], [], []
    for s in scales:
        xs = F.interpolate(x, size=(int(s * H), int(s * W)), mode="bilinear", align_corners=False)
        o, m = net(xs), net(xs.flip(-1))
        cams.append(torch.maximum(up(o["cam"]).relu(), back(up(m["cam"])).relu()))
        auxs.append(torch.maximum(up(o["cam_aux"]).relu(), back(up(m["cam_aux"])).relu()))
        segs += [up(o["seg"]), back(up(m["seg"]))]
    pool = (lambda t: torch.stack(t).amax(0)) if merge == "max" else (lambda t: torch.stack(t).sum(0))
    return pool(cams), pool(auxs), torch.stack(segs).mean(0)


@pytest.mark.parametrize("merge", ["max", "sum"])
def test_multiscale_predict_unflips_the_mirror_and_merges_the_scales(merge):
    """Alg. 1 l.7-9, the AN ensemble behind M', M†', S' (the stub tests replace `assign`). Catches: the mirrored
    view's M / M† / S not flipped back (or the input not mirrored), S summed instead of averaged over the views
    (S' 2x / 4x sharper in the SPL), the CAM scale merge ignoring --ms-cam-merge, the ReLU dropped; and assign()
    not min-max normalising / filtering this ensemble."""
    net = FlipProbe()
    x = torch.randn(B, 3, CROP, CROP, generator=torch.Generator().manual_seed(4))
    scales = (1.0, 0.5)
    cam, cam_aux, seg = cosa.multiscale_predict(net, x, scales, (CROP, CROP), merge)
    ref_cam, ref_aux, ref_seg = reference_multiscale(net, x, scales, merge)
    # the test can fail: without the un-flip the reference differs in all three maps
    assert not any(map(same, reference_multiscale(net, x, scales, merge, unflip=False), (ref_cam, ref_aux, ref_seg)))
    assert same(cam, ref_cam) and same(cam_aux, ref_aux) and same(seg, ref_seg)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    a_cam, a_aux, a_seg = cosa.assign(net, x, labels, scales, merge)
    keep = labels[:, :, None, None]
    assert same(a_cam, cosa.normalise_cam(ref_cam) * keep) and same(a_aux, cosa.normalise_cam(ref_aux) * keep)
    assert same(a_seg, ref_seg)


# ------------------------------------------------------------------- input normalisation, evaluation
def test_input_normalisation_follows_the_backbone_config_and_the_toy_keeps_imagenet():
    """Deviation 5. Catches: ImageNet mean/std with the 0.5/0.5 checkpoint, the toy preset silently changed,
    the training views or the evaluation images normalised another way."""
    paper = cosa.Args(**cosa.PRESETS["paper_voc"])
    toy = cosa.Args(**cosa.PRESETS["toy"])
    assert cosa.Args(**cosa.PRESETS["paper_coco"]).input_norm == "backbone"
    assert paper.input_norm == "backbone" and toy.input_norm == "imagenet"
    assert cosa.input_mean_std(paper) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # vit_base_patch16_224.orig_in21k_ft_in1k
    assert cosa.input_mean_std(toy) == (cosa.data.IMAGENET_MEAN, cosa.data.IMAGENET_STD)
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0] = 255
    image[1, 1] = (51, 102, 204)
    x = cosa.to_input(image, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    assert torch.allclose(x[:, 0, 0], torch.ones(3)) and torch.allclose(x[:, 0, 1], -torch.ones(3))
    assert torch.allclose(x[:, 1, 1], torch.tensor([-0.6, -0.2, 0.6]), atol=1e-6)  # 2 * v / 255 - 1
    assert torch.equal(cosa.to_input(image, cosa.input_mean_std(toy)), cosa.augment.to_tensor(image))
    # the training views: black padding is (0 - 0.5) / 0.5 = -1
    sample = {"name": "x", "image": np.full((10, 12, 3), 200, np.uint8), "label": np.array([1, 0], np.float32)}
    out = cosa.TrainTransform(32, (1.0, 1.0), strong_op="identity", mean_std=cosa.input_mean_std(paper))(
        sample, np.random.default_rng(0))
    y0, y1, x0, x1 = out["box"].tolist()
    far = torch.ones(32, 32, dtype=torch.bool)  # more than the blur radius away from the image
    far[max(0, y0 - 8):y1 + 8, max(0, x0 - 8):x1 + 8] = False
    assert far.any() and torch.allclose(out["weak"][:, far], -torch.ones(()), atol=1e-6), out["weak"][:, far].max()


def test_evaluate_uses_the_input_normalisation_and_labels_the_cam_threshold(monkeypatch):
    """Deviation 12 and 5. Catches: evaluate feeding ImageNet-normalised images to a 0.5/0.5 backbone, the
    threshold-selection note missing from cam/*, the fixed-threshold figure dropped."""
    rng = np.random.default_rng(0)
    samples = [{"name": f"s{i}", "image": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
                "mask": rng.integers(0, 3, (8, 8)).astype(np.uint8), "label": np.array([1.0, 1.0])} for i in range(2)]
    dataset = type("DS", (), {"num_classes": 3, "class_names": ["bg", "a", "b"], "__len__": lambda self: 2,
                              "__getitem__": lambda self, i: samples[i]})()
    seen = {}

    def fake_predict(net, x, scales, size, merge):
        seen["x"] = x
        return torch.rand(2, 2, *size), torch.rand(2, 2, *size), torch.randn(2, 3, *size)

    monkeypatch.setattr(cosa, "multiscale_predict", fake_predict)
    args = cosa.Args(eval_size=8, eval_scales=(1.0,), eval_batch=2, num_vis=0, input_norm="backbone")
    res = cosa.evaluate(nn.Identity(), dataset, args, torch.device("cpu"))
    expected = torch.stack([torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 127.5 - 1 for s in samples])
    assert torch.allclose(seen["x"], expected, atol=1e-5)
    assert "optimistic" in res["cam"]["threshold_selection"]
    assert {"miou", "threshold", "miou_fixed_threshold", "fixed_threshold"} <= set(res["cam"])
    assert {"seg", "seg_gtcls"} <= set(res)


def one_class_dataset():
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 1  # left half: class 1
    sample = {"name": "s0", "image": np.zeros((8, 8, 3), np.uint8), "mask": mask, "label": np.array([1.0])}
    return type("DS", (), {"num_classes": 2, "class_names": ["bg", "a"], "__len__": lambda self: 1,
                           "__getitem__": lambda self, i: sample})()


def test_cam_ens_is_the_mean_of_m_and_m_dagger(monkeypatch):
    """Table 2 "•" (cam_ens). M' is right (1 on the object, 0 elsewhere), M†' is its inverse: their mean is
    0.5 everywhere, so at the fixed threshold (nu > 0.5) all is background: bg IoU 1/2, fg IoU 0 -> 25.0,
    while cam alone scores 100. Catches: cam_ens built from M' alone, from M†' alone, or a max instead of the mean."""
    good = torch.zeros(1, 1, 8, 8)
    good[..., :4] = 1
    monkeypatch.setattr(cosa, "multiscale_predict", lambda net, x, scales, size, merge: (good, 1 - good, torch.zeros(1, 2, 8, 8)))
    args = cosa.Args(eval_size=8, eval_scales=(1.0,), eval_batch=1, num_vis=0, input_norm="imagenet")
    res = cosa.evaluate(nn.Identity(), one_class_dataset(), args, torch.device("cpu"), seg=False)
    assert res["cam"]["miou_fixed_threshold"] == 100.0
    assert res["cam_ens"]["miou_fixed_threshold"] == 25.0
    assert "optimistic" in res["cam_ens"]["threshold_selection"]


def test_evaluate_seg_gtcls_masks_only_the_absent_classes(monkeypatch):
    """Deviation 6 ("Seg_vd"). Left half: class 1 (present); S scores the absent class 2 highest there, class 1
    second, and background highest on the right. Unfiltered: class 2 predicted on the left -> mIoU (1 + 0 + 0) / 3;
    filtered: class 2 at -1e5 -> 100. Catches: the present classes masked instead of the absent ones, the
    background masked, seg and seg_gtcls swapped."""
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 1
    sample = {"name": "s0", "image": np.zeros((8, 8, 3), np.uint8), "mask": mask, "label": np.array([1.0, 0.0])}
    dataset = type("DS", (), {"num_classes": 3, "class_names": ["bg", "a", "b"], "__len__": lambda self: 1,
                              "__getitem__": lambda self, i: sample})()
    seg = torch.zeros(1, 3, 8, 8)
    seg[0, 0, :, 4:] = 5.0  # background on the right
    seg[0, 2, :, :4], seg[0, 1, :, :4] = 5.0, 3.0  # absent class 2 first, present class 1 second on the left
    monkeypatch.setattr(cosa, "multiscale_predict",
                        lambda net, x, scales, size, merge: (torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8), seg))
    args = cosa.Args(eval_size=8, eval_scales=(1.0,), eval_batch=1, num_vis=0, input_norm="imagenet")
    res = cosa.evaluate(nn.Identity(), dataset, args, torch.device("cpu"))
    assert res["seg_gtcls"]["miou"] == pytest.approx(100.0)
    assert res["seg"]["miou"] == pytest.approx(100.0 / 3, abs=0.01)


def test_eval_every_logs_both_networks_and_restores_train_mode(monkeypatch):
    """Fig. 8 (--eval-every). Catches: only one network evaluated, the ON left in eval mode, the wrong
    iterations, --eval-limit not passed."""
    calls = []

    def fake_evaluate(net, dataset, args, device, limit=0, autocast=None, **kw):
        calls.append((net, limit))
        net.eval()
        return {k: {"miou": 10.0 * len(calls)} for k in ("seg", "seg_gtcls", "cam")}

    monkeypatch.setattr(cosa, "evaluate", fake_evaluate)
    online, an = nn.Linear(1, 1), nn.Linear(1, 1)
    an.eval()
    ctx = types.SimpleNamespace(main=True, args=cosa.Args(eval_limit=5), device="cpu", autocast=lambda: None)
    out = cosa.periodic_eval(ctx, online, an, "val")
    assert calls == [(online, 5), (an, 5)] and online.training and not an.training
    assert out == {"eval_online/seg/val": 10.0, "eval_online/seg_gtcls/val": 10.0, "eval_online/cam/val": 10.0,
                   "eval_assign/seg/val": 20.0, "eval_assign/seg_gtcls/val": 20.0, "eval_assign/cam/val": 20.0}
    # inside train_cosa: after iterations 2, 4, ... (it + 1 divisible by --eval-every)
    seen, evaluated = {}, []
    monkeypatch.setattr(cosa.data, "SegDataset", lambda *a, **k: "dataset")
    monkeypatch.setattr(cosa, "train_loop", lambda *a, **k: seen.update(step=a[5]))
    monkeypatch.setattr(cosa, "train_step", lambda *a: {"losses/total": 1.0})
    monkeypatch.setattr(cosa, "periodic_eval", lambda c, o, a, v: evaluated.append(v) or {"eval_online/seg/val": 1.0})
    online.backbone = nn.Linear(1, 1)
    ctx = types.SimpleNamespace(args=cosa.Args(eval_every=2, input_norm="imagenet"), spec=types.SimpleNamespace(root="r", dataset="voc"),
                                splits={"train": "t"}, wrap=lambda m: m, autocast="AC")
    cosa.train_cosa(ctx, online, an, "val")
    logs = [seen["step"]({}, it) for it in range(4)]
    assert evaluated == ["val", "val"] and "eval_online/seg/val" in logs[1] and "eval_online/seg/val" not in logs[0]


# ----------------------------------------------------------------------- Fig. 1 / Tab. 4a guidance
def test_gt_guidance_replaces_the_spl_by_the_one_hot_mask(monkeypatch):
    """--gc-source gt. Catches: the SPL still used, the mask not one-hot, 255 not mapped to background."""
    run = Run(monkeypatch, gc_source="gt")
    mask = run.t["mask"].clone()
    assert run.calls["segmentation_pseudo_label"] == []
    target = run.call("loss_s2c")["spl"]
    expected = F.one_hot(mask.masked_fill(mask == 255, 0), C + 1).permute(0, 3, 1, 2).float()
    assert torch.equal(target, expected)
    # 255 -> background, by hand
    m = torch.tensor([[[2, 255], [0, 1]]])
    assert cosa.guidance_target("gt", m, torch.ones(1, 2), (2, 2))[0].argmax(0).tolist() == [[2, 0], [0, 1]]
    assert run.grad == weights(FULL)


def test_noise_guidance_is_one_hot_over_background_and_present_classes():
    """--gc-source noise. Catches: absent classes drawn, a non-one-hot target, the background never drawn."""
    torch.manual_seed(0)
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    target = cosa.guidance_target("noise", None, labels, (20, 20))
    assert target.shape == (1, 4, 20, 20) and torch.equal(target.sum(1), torch.ones(1, 20, 20))
    drawn = set(target.argmax(1).unique().tolist())
    assert drawn == {0, 1, 3}


def s2c_grads(gc_detach, lambda_s2c):
    t = hand_made(1)
    on = tiny_vit_net(0)
    an = copy.deepcopy(on).requires_grad_(False)
    args = cosa.Args(crop=CROP, loss_warmup=0, pseudo_scales=(1.0,), lambda_c2s=0.0, lambda_s2c=lambda_s2c,
                     lambda_csc=0.0, csc=False, dt=False, gc_detach=gc_detach)
    grads = {}

    class Capture:
        def zero_grad(self, set_to_none=True):
            on.zero_grad(set_to_none=True)

        def step(self):
            grads.update({n: p.grad.clone() for n, p in on.named_parameters() if p.grad is not None})

    batch = {"weak": t["weak"], "strong": t["strong"], "label": t["labels"], "box": t["box"]}
    log = cosa.train_step(on, an, batch, 0, args, None, Capture(), lambda: torch.autocast("cpu", enabled=False))
    return grads, log


def test_detach_variants_stop_the_seg2cam_gradient_of_f_or_w_only():
    """Tab. 4a. With only L_cls + L_cls† + L_s2c: --gc-detach feat leaves the backbone gradient at its
    classification-only value and changes W's; --gc-detach cls the opposite; L_s2c's value is the same.
    Catches: the detach on the wrong factor, on both, on W† / the aux head, or in the other losses too."""
    base, _ = s2c_grads("none", 0.0)
    full, log_full = s2c_grads("none", 1.0)
    feat, log_feat = s2c_grads("feat", 1.0)
    cls, log_cls = s2c_grads("cls", 1.0)
    assert log_feat["losses/s2c"] == pytest.approx(log_full["losses/s2c"]) == pytest.approx(log_cls["losses/s2c"])
    backbone = [n for n in base if n.startswith("backbone.")]
    w = "classifier.weight"
    assert not torch.allclose(full[w], base[w]) and any(not torch.allclose(full[n], base[n]) for n in backbone)
    assert torch.allclose(feat[w], full[w], atol=1e-7)  # W gets all of the s2c gradient
    assert all(torch.allclose(feat[n], base[n], atol=1e-7) for n in backbone)  # F gets none
    assert torch.allclose(cls[w], base[w], atol=1e-7)  # W gets none
    assert all(torch.allclose(cls[n], full[n], atol=1e-6) for n in backbone)  # F gets all
    assert torch.allclose(feat["classifier_aux.weight"], base["classifier_aux.weight"])


@pytest.mark.parametrize("gc_detach", ["feat", "cls"])
def test_detach_changes_only_the_seg2cam_input_not_csc(monkeypatch, gc_detach):
    """Tab. 4a detach variants on the stubs (W * F differs from the hand-made M). Catches: L_csc fed the
    detached W * F instead of the ON's M, Seg2CAM still fed M (detach ignored), the wrong classifier (W†) or
    features, the variant leaking into the other terms' weights."""
    run = Run(monkeypatch, gc_detach=gc_detach)
    w_f = F.conv2d(run.t["feat"], run.t["W"])
    assert not same(w_f, run.t["cam"])
    s2c = run.call("loss_s2c")["cam"]
    assert same(s2c, w_f) and s2c.requires_grad
    csc = run.call("loss_csc")["cam"]
    assert same(csc, run.t["cam"]) and csc.requires_grad
    assert run.grad == weights(FULL)
    # which factor is detached: W gets no gradient path under "cls", a (zero) gradient under "feat"
    assert (run.online.classifier.weight.grad is None) == (gc_detach == "cls")


def test_noise_guidance_through_train_step(monkeypatch):
    """--gc-source noise in train_step. Catches: noise falling through to the SPL or to the ground-truth mask,
    a target at the wrong size / not one-hot / with absent classes, the s2c weight changed."""
    torch.manual_seed(0)
    run = Run(monkeypatch, gc_source="noise")
    assert run.calls["segmentation_pseudo_label"] == []
    spl = run.call("loss_s2c")["spl"]
    assert spl.shape == (B, C + 1, CROP, CROP)
    assert set(spl.unique().tolist()) == {0.0, 1.0} and torch.equal(spl.sum(1), torch.ones(B, CROP, CROP))
    for b in range(B):  # every pixel a random label among background and the image's classes: all of them drawn
        present = {0} | {c + 1 for c in range(C) if run.t["labels"][b, c] > 0}
        assert set(spl[b].argmax(0).unique().tolist()) == present, b
    assert same(run.call("loss_s2c")["cam"], run.t["cam"])
    assert run.grad == weights(FULL)


# ------------------------------------------------------------------------------------------- main()
def test_main_trains_an_eval_copy_of_on_and_evaluates_the_final_an(monkeypatch, toy_root, tmp_path):
    """main() with train_cosa and evaluate stubbed. Catches: the AN not a copy of the ON at the start (no
    load_state_dict), the AN left in train mode or with gradients, the ON's weights (not the AN's) saved as the
    final weights or evaluated, the wrong split / seg flag / --seed-eval-limit per evaluation, a result key taken
    from the wrong evaluation or missing (cam_ens/* included)."""
    seen, calls = {}, []

    def fake_train_cosa(ctx, online, assign_net, val_set=None):
        seen.update(online=online, an=assign_net, val_split=val_set.split)
        seen["an_is_copy"] = all(torch.equal(v, assign_net.state_dict()[k]) for k, v in online.state_dict().items())
        seen["an_frozen"] = not assign_net.training and not any(p.requires_grad for p in assign_net.parameters())
        seen["on_trainable"] = all(p.requires_grad for p in online.parameters())
        with torch.no_grad():  # training moves both networks, differently
            for p in online.parameters():
                p.add_(1.0)
            for p in assign_net.parameters():
                p.add_(2.0)
        seen["final"] = copy.deepcopy(assign_net.state_dict())

    def fake_evaluate(net, dataset, args, device, *, seg=True, limit=0, label_dir=None, vis_path=None, autocast=None):
        calls.append(dict(net=net, split=dataset.split, seg=seg, limit=limit,
                          weights={k: v.clone() for k, v in net.state_dict().items()}))
        i = len(calls)
        keys = ("cam", "cam_ens") + (("seg", "seg_gtcls") if seg else ())
        return {k: {"miou": 10.0 * i + j, "iou": {n: 1.0 for n in dataset.class_names}} for j, k in enumerate(keys)}

    monkeypatch.setattr(cosa, "train_cosa", fake_train_cosa)
    monkeypatch.setattr(cosa, "evaluate", fake_evaluate)
    out = tmp_path / "run"
    cosa.main(["--data", str(toy_root), "--preset", "toy", "--backbone-kwargs", "img_size=32,patch_size=8,embed_dim=32,"
               "depth=3,num_heads=2", "--aux-block", "-2", "--decoder-dim", "8", "--crop", "32", "--workers", "0",
               "--seed-eval-limit", "3", "--max-iters", "1", "--out", str(out)])
    assert seen["an_is_copy"] and seen["an_frozen"] and seen["on_trainable"] and seen["val_split"] == "val"
    assert [(c["net"] is seen["an"], c["split"], c["seg"], c["limit"]) for c in calls] == [
        (True, "train", False, 3), (True, "val", True, 0)]
    for c in calls:  # the AN's final weights, not the ON's
        assert all(torch.equal(v, c["weights"][k]) for k, v in seen["final"].items())
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert {k: v["miou"] for k, v in results.items()} == {
        "cam/train": 10.0, "cam_ens/train": 11.0, "cam/val": 20.0, "cam_ens/val": 21.0, "seg/val": 22.0,
        "seg_gtcls/val": 23.0}
