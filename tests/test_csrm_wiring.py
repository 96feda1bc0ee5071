"""Wiring of csrm.py's training step (card 2, Eq. (14)) and of its stages: which tensor of which network, pass
and half feeds each loss, what is detached / from the teacher in eval or train mode, the thresholds, the Eq. (14)
weights, the warm-up, the optimiser / EMA order and the Table 1 component switches.

  * stub tests: a stub student returns hand-made tensors times a parameter theta (so they carry gradient); a
    stub teacher returns one hand-made set in eval mode and another in train mode (and, through a parameter
    that requires grad, would leak gradient if it ran outside no_grad); cam_pseudo_labels and classmix return
    hand-made maps; every loss is wrapped to record its inputs and to return probe[k] + const_k, so the
    gradient that reaches probe[k] at optimizer.step() is exactly the weight of term k in the total;
  * stage tests: train_csrm / train_cam / train_verify with train_loop replaced by a recorder.

CSRM_PATH=/some/copy/csrm.py runs these tests against another copy of the script (mutation testing); by default
the repository's csrm.py is imported.
"""
import contextlib
import importlib
import importlib.util
import inspect
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F


def load_csrm():
    path = os.environ.get("CSRM_PATH")
    if not path:
        return importlib.import_module("csrm")
    spec = importlib.util.spec_from_file_location("csrm_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # main() reads Args' source through its module (inspect.getsource)
    spec.loader.exec_module(module)
    return module


csrm = load_csrm()

B, C, CROP, D = 2, 3, 32, 5
K, H16, H4 = C + 1, CROP // 16, CROP // 4
TERMS = ("cls", "seg", "s2c", "u", "m")
CONST = dict(zip(TERMS, (0.11, 0.13, 0.17, 0.19, 0.23)))  # the value each stub loss returns
LOSS_FN = {"loss_cls": "cls", "loss_seg": "seg", "loss_s2c": "s2c", "loss_unsup": "u", "loss_contrast": "m"}
# distinct values everywhere, so that a swapped weight / threshold / ratio shows
ARGS = dict(epochs=5, steps_per_epoch=10, warmup_epochs=1, w_s2c=0.3, w_u=0.7, w_m=0.2, s2c_ramp_start=0.1,
            s2c_sigma=0.45, label_smoothing=0.15, bg_thr=0.07, fg_thr=0.33, crf_iters=3, mix_prob=1.0,
            unreliable=0.25, rank_low=2, rank_high=3, queries=4, negatives=3, rep_dim=D, bank=50, bank_bg=70,
            grad_clip=0.77, tau=0.5, query_conf=0.3, neg_conf=1.0)
STEP = 25  # epoch 2 (after the warm-up): lambda_s2c = 0.3 (0.1 + 0.9 (2 - 1) / 4), rho = 0.25 (1 - 2 / 5)
W_S2C, RHO = 0.3 * (0.1 + 0.9 * 1 / 4), 0.25 * (1 - 2 / 5)

CAST = {"depth": 0}  # > 0 inside the autocast context that a test passes to train_step

ORIGINAL = {name: getattr(csrm, name) for name in (
    "loss_cls", "loss_seg", "loss_s2c", "loss_unsup", "loss_contrast", "cam_pseudo_labels", "classmix",
    "restricted_probs", "ema_update", "entropy", "quantile", "negative_rank_mask", "tta_cams", "tta_seg",
    "validate_teacher")}  # before any test wraps them


def hand_made(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    labels_l = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    labels_u = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    t = {"x_l": r(B, 3, CROP, CROP), "x_u": r(B, 3, CROP, CROP), "labels_l": labels_l, "labels_u": labels_u,
         "rgb_l": torch.randint(0, 255, (B, CROP, CROP, 3), generator=g, dtype=torch.uint8),
         "rgb_u": torch.randint(0, 255, (B, CROP, CROP, 3), generator=g, dtype=torch.uint8)}
    # student outputs
    t.update(cam=r(2 * B, C, H16, H16), cls_logits=r(2 * B, C), seg=r(2 * B, K, CROP, CROP) * 2,
             seg4=r(2 * B, K, H4, H4), rep=r(2 * B, D, H4, H4))
    # teacher, eval mode (pass 1) and train mode (pass 2)
    for mode in ("te", "tt"):
        t.update({f"cam_{mode}": r(2 * B, C, H16, H16), f"cls_{mode}": r(2 * B, C),
                  f"seg_{mode}": r(2 * B, K, CROP, CROP) * 3,
                  f"seg4_{mode}": r(2 * B, K, H4, H4) * 3, f"rep_{mode}": r(2 * B, D, H4, H4)})
    # the pseudo labels cam_pseudo_labels returns: foreground, background and 255 in every image
    PL = torch.randint(0, K, (2 * B, CROP, CROP), generator=g)
    PL[:, :4] = 255
    PL[:, -4:, :] = 1
    t["PL"] = PL
    # what classmix returns: other images, labels with an added class, other PL and teacher logits
    PL_m = torch.randint(0, K, (2 * B, CROP, CROP), generator=g)
    PL_m[:, :, :3] = 255
    PL_m[:, :, -3:] = 2
    PL_m[B:, -5:] = 255  # the u-half has fewer reliable pixels than the l-half
    t.update(x_m=r(2 * B, 3, CROP, CROP), y_m=torch.cat([labels_l, labels_u]).clone(), PL_m=PL_m,
             S_m=r(2 * B, K, CROP, CROP) * 3)
    t["y_m"][0, 2] = 1
    t["y_m"][B + 1, 1] = 1  # the u-half gains a class by mixing: present_u must not see it
    return t


class StubStudent(nn.Module):
    def __init__(self, t):
        super().__init__()
        self.t = t
        self.theta = nn.Parameter(torch.ones(()))
        self.probe = nn.Parameter(torch.zeros(len(TERMS)))
        self.calls = []

    def forward(self, x, seg=True, rep=True):
        self.calls.append(dict(x=x, seg=seg, rep=rep, training=self.training, cast=CAST["depth"] > 0))
        out = {"cam": self.t["cam"] * self.theta, "cls_logits": self.t["cls_logits"] * self.theta}
        if seg:
            out.update(seg=self.t["seg"] * self.theta, seg4=self.t["seg4"] * self.theta)
        if rep:
            out["rep"] = self.t["rep"] * self.theta
        return out


class StubTeacher(nn.Module):
    """Eval mode: the *_te tensors, train mode: the *_tt tensors. phi requires grad on purpose: outputs computed
    outside torch.no_grad() would carry gradient into the losses."""

    def __init__(self, t):
        super().__init__()
        self.t = t
        self.phi = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x, seg=True, rep=True):
        self.calls.append(dict(x=x, seg=seg, rep=rep, training=self.training, grad=torch.is_grad_enabled(),
                               cast=CAST["depth"] > 0))
        m = "tt" if self.training else "te"
        out = {"cam": self.t[f"cam_{m}"] * self.phi, "cls_logits": self.t[f"cls_{m}"] * self.phi}
        if seg:
            out.update(seg=self.t[f"seg_{m}"] * self.phi, seg4=self.t[f"seg4_{m}"] * self.phi)
        if rep:
            out["rep"] = self.t[f"rep_{m}"] * self.phi
        return out


class FakeOptimizer:
    def __init__(self, net, events):
        self.net, self.events = net, events
        self.param_groups = [{"params": [net.theta, net.probe]}]

    def zero_grad(self, set_to_none=True):
        self.events.append("zero_grad")

    def step(self):
        self.events.append("step")
        g = self.net.probe.grad
        self.probe_grad = torch.zeros(len(TERMS)) if g is None else g.clone()
        self.theta_grad = None if self.net.theta.grad is None else self.net.theta.grad.clone()


class Run:
    """One train_step on the stubs; .calls[name] = bound-argument dicts, .log, .grad (probe grads = weights).
    nan_term: that loss returns nan, and .error holds the NonFinite raised; autocast: the context factory."""

    def __init__(self, monkeypatch, step=STEP, seed=0, pool="POOL", nan_term=None, autocast=None, **kw):
        self.t = t = hand_made(seed)
        self.args = args = csrm.Args(**{**csrm.PRESETS["toy"], **ARGS, **kw})
        self.student, self.teacher = StubStudent(t), StubTeacher(t)
        self.events, self.calls = [], {}
        self.opt = FakeOptimizer(self.student, self.events)
        self.bank = csrm.MemoryBank(K, D, args.bank, args.bank_bg)

        def record(name, fn=None):
            original = ORIGINAL[name]
            signature = inspect.signature(original)
            self.calls[name] = []

            def wrapper(*a, **k):
                bound = signature.bind(*a, **k)
                bound.apply_defaults()
                self.calls[name].append(dict(bound.arguments))
                out = (fn or original)(*a, **k)
                if name in LOSS_FN:  # the loss value is replaced by probe[k] + const_k
                    term = LOSS_FN[name]
                    nan = float("nan") if term == nan_term else 0.0
                    return self.student.probe[TERMS.index(term)] + CONST[term] + nan + 0.0 * out
                return out
            monkeypatch.setattr(csrm, name, wrapper)

        record("cam_pseudo_labels", lambda *a, **k: t["PL"].clone())
        record("classmix", lambda *a, **k: (t["x_m"], t["y_m"].clone(), t["PL_m"].clone(), t["S_m"]))
        record("ema_update", lambda *a, **k: self.events.append("ema"))
        for name in ("loss_cls", "loss_seg", "loss_s2c", "loss_unsup", "loss_contrast", "restricted_probs", "entropy",
                     "quantile"):
            record(name)
        self.clip = []

        def clip(params, max_norm, *a, **k):
            self.events.append("clip")
            self.clip.append((list(params), max_norm))
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
        batch_l = {"image": t["x_l"], "label": t["labels_l"], "rgb": t["rgb_l"]}
        batch_u = {"image": t["x_u"], "label": t["labels_u"], "rgb": t["rgb_u"]}
        self.error = None
        try:
            self.log = csrm.train_step(args, self.student, self.teacher, self.opt, self.bank, batch_l, batch_u, step,
                                       autocast or contextlib.nullcontext, pool)
        except csrm.NonFinite as e:
            if nan_term is None:
                raise
            self.error = e
            return
        self.grad = dict(zip(TERMS, self.opt.probe_grad.tolist()))

    def call(self, name, i=0):
        assert len(self.calls[name]) > i, f"{name} was called {len(self.calls[name])} times"
        return self.calls[name][i]

    # the quantities train_step must derive, written out from the paper / card
    def y(self, mixed=True):
        return self.t["y_m"] if mixed else torch.cat([self.t["labels_l"], self.t["labels_u"]])

    def P_t(self):
        return ORIGINAL["restricted_probs"](self.t["S_m"], self.t["y_m"])


def same(a, b):
    return a.shape == b.shape and torch.allclose(a.detach().float(), b.detach().float(), atol=1e-6)


def weights(expected):
    return {k: pytest.approx(v, abs=1e-7) for k, v in expected.items()}


FULL = dict(cls=1.0, seg=1.0, s2c=W_S2C, u=0.7, m=0.2)


def down(t):
    return F.interpolate(t[:, None].float(), size=(H4, H4), mode="nearest")[:, 0].long()


# ------------------------------------------------------------------------------- networks and passes
def test_teacher_pass_1_eval_mode_unmixed_input_no_grad_no_rep(monkeypatch):
    """Catches: the first teacher pass in train mode, on the mixed images, with the R head on, outside no_grad,
    or the student used for the pseudo labels."""
    run = Run(monkeypatch)
    first = run.teacher.calls[0]
    assert first["training"] is False and first["grad"] is False
    assert same(first["x"], torch.cat([run.t["x_l"], run.t["x_u"]]))
    assert first["seg"] is True and first["rep"] is False


def test_teacher_pass_2_train_mode_mixed_input_no_grad(monkeypatch):
    """Catches: the second pass in eval mode (no dropout), on the un-mixed images, outside no_grad, without R."""
    run = Run(monkeypatch)
    assert len(run.teacher.calls) == 2
    second = run.teacher.calls[1]
    assert second["training"] is True and second["grad"] is False
    assert second["x"] is run.t["x_m"] and second["seg"] is True and second["rep"] is True


def test_student_once_train_mode_on_the_mixed_images(monkeypatch):
    """Catches: the student on the un-mixed images, in eval mode, twice, without seg or R."""
    run = Run(monkeypatch)
    assert len(run.student.calls) == 1
    call = run.student.calls[0]
    assert call["x"] is run.t["x_m"] and call["training"] is True and call["seg"] is True and call["rep"] is True


def test_pseudo_labels_from_the_eval_teacher_cams_unmixed_labels_and_thresholds(monkeypatch):
    """Eq. (6) inputs. Catches: the student's or the train-mode teacher's CAMs, mixed or half labels, the two
    thresholds swapped, the CRF iterations or the pool not passed, the crops of one half only."""
    run = Run(monkeypatch)
    call = run.call("cam_pseudo_labels")
    assert len(run.calls["cam_pseudo_labels"]) == 1
    assert same(call["A_t"], run.t["cam_te"]) and not call["A_t"].requires_grad
    assert same(call["y"], run.y(mixed=False))
    assert (call["bg_thr"], call["fg_thr"]) == (0.07, 0.33)
    assert call["crf_params"]["n_iters"] == 3 and call["pool"] == "POOL"
    assert {k: v for k, v in call["crf_params"].items() if k != "n_iters"} == \
        {k: v for k, v in csrm.crf.PRESETS["irn"].items() if k != "n_iters"}
    rgb = np.asarray(call["rgb"])
    assert rgb.shape == (2 * B, CROP, CROP, 3)
    assert (rgb == torch.cat([run.t["rgb_l"], run.t["rgb_u"]]).numpy()).all()


def test_no_crf_iterations_run_eq6_without_the_crf(monkeypatch):
    run = Run(monkeypatch, crf_iters=0)
    assert run.call("cam_pseudo_labels")["crf_params"] is None


def test_one_crf_iteration_still_runs_the_crf(monkeypatch):
    """Catches the per-step CRF gated on another count than --crf-iters > 0 (e.g. '> 1', so that --crf-iters 1
    silently drops the dCRF of Eq. (6))."""
    assert Run(monkeypatch, crf_iters=1).call("cam_pseudo_labels")["crf_params"]["n_iters"] == 1


@pytest.mark.parametrize("train_crf, on_device", [("torch", True), ("pydensecrf", False), ("auto", False)])
def test_train_crf_picks_where_the_per_step_crfs_run(monkeypatch, train_crf, on_device):
    """Deviation 27. Catches: --train-crf ignored; auto running the torch CRF on a CPU run (the stubs' tensors
    are on the CPU), where pydensecrf is ~3x faster."""
    assert Run(monkeypatch, train_crf=train_crf).call("cam_pseudo_labels")["on_device"] is on_device


def test_auto_train_crf_is_torch_on_cuda_only():
    """Catches auto choosing by anything but the device type (the CPU stubs above never reach the CUDA case)."""
    pick = {c: csrm.Args(train_crf=c) for c in ("auto", "torch", "pydensecrf")}
    assert [csrm.crf_on_device(pick[c], "cuda:0") for c in pick] == [True, True, False]
    assert [csrm.crf_on_device(pick[c], torch.device("cpu")) for c in pick] == [False, True, False]


def test_classmix_gets_the_unmixed_images_labels_pl_and_eval_teacher_logits(monkeypatch):
    """Catches: ClassMix of the train-mode teacher's or the student's logits, of the CAMs, of other labels."""
    run = Run(monkeypatch)
    call = run.call("classmix")
    assert same(call["x"], torch.cat([run.t["x_l"], run.t["x_u"]]))
    assert same(call["y"], run.y(mixed=False))
    assert torch.equal(call["PL"], run.t["PL"])
    assert same(call["S_t"], run.t["seg_te"]) and not call["S_t"].requires_grad
    assert run.log["mixed"] == 1


def test_mix_prob_zero_never_mixes(monkeypatch):
    """Catches: the coin compared the wrong way, the mixed tensors used anyway."""
    run = Run(monkeypatch, mix_prob=0.0)
    assert run.calls["classmix"] == [] and run.log["mixed"] == 0
    x = torch.cat([run.t["x_l"], run.t["x_u"]])
    assert same(run.student.calls[0]["x"], x) and same(run.teacher.calls[1]["x"], x)
    assert torch.equal(run.call("loss_seg")["PL"], run.t["PL"][:B])
    assert same(run.call("restricted_probs")["S_t"], run.t["seg_te"])
    assert same(run.call("restricted_probs")["y"], run.y(mixed=False))


# ------------------------------------------------------------------ the stage helpers train_step stubs out above
def _eq6_inputs():
    """Three images, C = 3, CAMs at the crop size (1 x 5, so the align_corners upsampling is the identity), each
    present class with spatial max 1 (psi = A / (1 + 1e-5)); delta_bg = 0.07, delta_fg = 0.33 as in ARGS.
      image 0, classes 1 and 3 (two-class branch): px0 c1 = 1 -> 1; px1 c3 = 0.8 beats c1 = 0.5 -> 3; px2 max 0.2
        in (0.07, 0.33] -> 255; px3 0.05 -> background; px4 c3 = 1 -> 3;
      image 1, class 2 only (one-class branch): 1 -> 2, 0.2 -> 255, 0.5 -> 2, 0.03 -> 0, 0.1 -> 255;
      image 2 without labels: background everywhere, whatever its CAMs."""
    A = torch.zeros(3, C, 1, 5)
    A[0, 0, 0] = torch.tensor([1.0, 0.5, 0.2, 0.05, 0.0])
    A[0, 1, 0] = 9.0  # absent class
    A[0, 2, 0] = torch.tensor([0.0, 0.8, 0.1, 0.0, 1.0])
    A[1, 1, 0] = torch.tensor([1.0, 0.2, 0.5, 0.03, 0.1])
    A[1, 0, 0] = A[1, 2, 0] = 5.0  # absent classes
    A[2] = 3.0
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    rgb = np.zeros((3, 1, 5, 3), np.uint8)
    want = torch.tensor([[[1, 3, 255, 0, 3]], [[2, 255, 2, 0, 255]], [[0, 0, 0, 0, 0]]])
    return rgb, y, A, want


def test_cam_pseudo_labels_eq6_thresholds_and_maps_hand_computed():
    """Eq. (6) as assembled in cam_pseudo_labels (Deviation 18), no CRF. Catches: delta_fg / delta_bg swapped in the
    two-class branch (for thr in (bg_thr, fg_thr)) or in the one-class shortcut, the class painted where the bg
    map (instead of the fg map) holds it (masked_fill_(bg == j, ...)), the 255 band taken from the fg map, label
    indices not shifted by the background (top instead of top + 1) or not mapped to class ids, '>=' / '<' in the
    argmax-over-thresholds, a label-free image getting foreground."""
    rgb, y, A, want = _eq6_inputs()
    for on_device in (False, True):
        PL = ORIGINAL["cam_pseudo_labels"](rgb if not on_device else torch.from_numpy(rgb), y, A, 0.07, 0.33, None,
                                           on_device=on_device)
        assert PL.dtype == torch.int64 and torch.equal(PL, want), (on_device, PL.tolist())


def test_cam_pseudo_labels_upsample_psi_bilinear_align_corners():
    """Eq. (2) / Deviation 20: psi is normalised at the CAM resolution, then upsampled bilinearly with
    align_corners=True (as the seg logits) to the crop. psi = [1, 0] over 2 columns -> 5 columns: [1, .75, .5, .25,
    0]; with delta_bg = 0.07 and delta_fg = 0.2 the labels are [1, 1, 1, 1, 0] (one class and two classes alike).
    align_corners=False gives [1, .9, .5, .1, 0] -> [1, 1, 1, 255, 0]; nearest [1, 1, 1, 0, 0]. Catches: another
    upsampling mode or corner alignment, the normalisation after upsampling at another resolution."""
    A = torch.zeros(2, C, 1, 2)
    A[:, 0, 0, 0] = 2.0
    A[1, 2, 0] = -1.0  # a second present class that is never active (psi = 0): the two-class branch
    y = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])
    PL = ORIGINAL["cam_pseudo_labels"](np.zeros((2, 1, 5, 3), np.uint8), y, A, 0.07, 0.2, None)
    assert PL.tolist() == [[[1, 1, 1, 1, 0]], [[1, 1, 1, 1, 0]]]


def test_cam_pseudo_labels_use_the_two_crf_refined_maps(monkeypatch):
    """Eq. (6) with the label dCRF (Deviation 18 / 27): each image's fg map and bg map go through the CRF (host:
    one refine_labels call per map, through the pool; device: one refine_labels_torch call per image), with
    gt_prob 0.7, the image's own crop, 1 + #present labels and the given parameters, and the REFINED maps build the
    labels. The stub CRF rolls each map one pixel to the right, so the labels must be the no-CRF labels rolled.
    Catches: the CRF output dropped (the unrefined maps assembled), the maps of another image, the fg / bg maps
    swapped after refinement, another gt_prob or label count, the pool ignored."""
    _, y, A, want = _eq6_inputs()
    rgb = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 1, 5, 3)
    params = {"n_iters": 2, "bi_w": 4}
    seen, pool_calls = [], []

    def host(image, labels, n_labels, gt_prob=None, **kw):
        seen.append(("host", image.copy(), labels.copy(), n_labels, gt_prob, kw))
        return np.roll(labels, 1, -1)

    def device(image, labels, n_labels, gt_prob=None, **kw):
        seen.append(("device", np.asarray(image.cpu()).copy(), labels.cpu().numpy().copy(), n_labels, gt_prob, kw))
        return torch.roll(labels, 1, -1)
    monkeypatch.setattr(csrm.crf, "refine_labels", host)
    monkeypatch.setattr(csrm.crf, "refine_labels_torch", device)
    pool = types.SimpleNamespace(map=lambda fn, jobs: pool_calls.append(len(jobs)) or list(map(fn, jobs)))
    rolled = torch.roll(want, 1, -1)
    PL = ORIGINAL["cam_pseudo_labels"](rgb, y, A, 0.07, 0.33, params, pool=pool)
    assert torch.equal(PL, rolled), PL.tolist()
    assert pool_calls == [3]
    host_calls = [s for s in seen if s[0] == "host"]
    assert [s[3] for s in host_calls] == [3, 3, 2, 2, 1, 1] and all(s[4] == 0.7 and s[5] == params for s in host_calls)
    assert all((s[1] == rgb[i // 2]).all() for i, s in enumerate(host_calls))
    # the fg map (index 0) then the bg map (index 1) of image 0: label indices, 0 = background
    assert host_calls[0][2].tolist() == [[1, 2, 0, 0, 2]] and host_calls[1][2].tolist() == [[1, 2, 1, 0, 2]]
    seen.clear()
    PL = ORIGINAL["cam_pseudo_labels"](torch.from_numpy(rgb), y, A, 0.07, 0.33, params, on_device=True)
    assert torch.equal(PL, rolled), PL.tolist()
    assert [s[3] for s in seen] == [3, 2, 1] and all(s[0] == "device" and s[4] == 0.7 and s[5] == params for s in seen)
    assert all((s[1] == rgb[i]).all() for i, s in enumerate(seen))
    assert seen[0][2].tolist() == [[[1, 2, 0, 0, 2]], [[1, 2, 1, 0, 2]]]


def test_classmix_pastes_the_partner_classes_from_the_unmixed_images():
    """ClassMix (Deviation 10) with one foreground class per image, so the choice is forced and every output is
    hand-computable: image 0 receives image 1's class 3 (M0 = PL_1 == 3), image 1 receives image 0's class 1
    (M1 = PL_0 == 1, overlapping M0) from the UN-mixed image 0, with one mask shared by image, PL and teacher
    logits; labels only gain. Catches: S_t / x / PL pasted the other way round (torch.where(M, S_t[a], S_t[b])),
    the mask from the receiving image, the paste read from the already-mixed partner, the label of the pasted
    class not added or added at the wrong index (selected instead of selected - 1), 255 or background pasted,
    the inputs modified in place."""
    g = torch.Generator().manual_seed(0)
    x, S_t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, K, 4, 4, generator=g)
    PL = torch.zeros(2, 4, 4, dtype=torch.long)
    PL[0, :2, :2] = 1
    PL[0, 3, :] = 255
    PL[1, 1:3, 1:3] = 3
    PL[1, 0, 2:] = 255
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    inputs = [t.clone() for t in (x, y, PL, S_t)]
    torch.manual_seed(0)
    x_m, y_m, PL_m, S_m = ORIGINAL["classmix"](x, y, PL, S_t)
    for before, after in zip(inputs, (x, y, PL, S_t)):
        assert torch.equal(before, after)
    M0, M1 = PL[1] == 3, PL[0] == 1
    assert (M0 & M1).any()  # the overlap tells the un-mixed source from the mixed one
    assert torch.equal(x_m, torch.stack([torch.where(M0, x[1], x[0]), torch.where(M1, x[0], x[1])]))
    assert torch.equal(S_m, torch.stack([torch.where(M0, S_t[1], S_t[0]), torch.where(M1, S_t[0], S_t[1])]))
    assert torch.equal(PL_m, torch.stack([torch.where(M0, PL[1], PL[0]), torch.where(M1, PL[0], PL[1])]))
    assert y_m.tolist() == [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]


def test_classmix_pastes_half_of_the_partner_classes():
    """Deviation 10: a partner with 4 foreground classes pastes 2 of them (half, at least one), a partner with 1
    pastes it; the pasted classes are exactly the ones added to y. Catches: all classes pasted, one always, the
    paste mask of other classes than the ones whose labels are added."""
    y = torch.zeros(2, 6)
    PL = torch.zeros(2, 4, 4, dtype=torch.long)
    for j, c in enumerate((1, 2, 4, 6)):
        PL[0, j, :2] = c
        y[0, c - 1] = 1
    PL[1, 2:, 2:] = 5
    y[1, 4] = 1
    x, S_t = torch.zeros(2, 3, 4, 4), torch.zeros(2, 7, 4, 4)  # not checked here (the test above pins them)
    for seed in range(3):
        torch.manual_seed(seed)
        _, y_m, PL_m, _ = ORIGINAL["classmix"](x, y, PL, S_t)
        pasted = set(PL_m[1][PL_m[1] != PL[1]].tolist())
        assert len(pasted) == 2 and pasted <= {1, 2, 4, 6}
        assert {c + 1 for c in y_m[1].nonzero()[:, 0].tolist()} == pasted | {5}
        assert torch.equal(PL_m[0], torch.where(PL[1] == 5, PL[1], PL[0])) and y_m[0, 4] == 1


def test_ema_update_copies_through_epoch_w_then_ramped_momentum():
    """Sec. 3.2.6 mean teacher (Impl.: copy while epoch <= W, then d = min(1 - 1 / (1 + step - W S_e), ema)), with
    S_e = 10, W = 1, ema = 0.99; step = optimiser steps taken (1-based). Hand values: steps 1 and 20 (epochs 0 and
    1) copy; step 21 (epoch 2) d = 1 - 1/12; step 500 d = 0.99 (capped). Catches: '<' instead of '<=' in the copy
    test (EMA already in epoch W), the epoch from step instead of step - 1, the momentum weights swapped
    (alpha=d), no cap or max instead of min, the student updated instead of the teacher."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], "steps_per_epoch": 10, "warmup_epochs": 1, "ema": 0.99})
    student, teacher = nn.Linear(2, 2), nn.Linear(2, 2)
    teacher.requires_grad_(False)

    def update(step, t_value, s_value):
        with torch.no_grad():
            for p in teacher.parameters():
                p.fill_(t_value)
            for p in student.parameters():
                p.fill_(s_value)
        ORIGINAL["ema_update"](teacher, student, step, args)
        assert all((p == s_value).all() for p in student.parameters())
        values = torch.cat([p.flatten() for p in teacher.parameters()])
        assert torch.allclose(values, values[0].expand_as(values))
        return values[0].item()
    assert update(1, 5.0, 1.0) == pytest.approx(1.0)
    assert update(20, 5.0, 1.0) == pytest.approx(1.0)
    d = 1 - 1 / 12
    assert update(21, 5.0, 1.0) == pytest.approx(5.0 * d + 1.0 * (1 - d), rel=1e-6)
    assert update(500, 5.0, 1.0) == pytest.approx(5.0 * 0.99 + 0.01, rel=1e-6)
    assert not any(p.requires_grad for p in teacher.parameters())


# ------------------------------------------------------------------------------------------ losses
def test_loss_cls_on_the_student_logits_and_the_mixed_labels(monkeypatch):
    """Eq. (5). Catches: the teacher's logits, detached logits, the un-mixed labels, no label smoothing."""
    run = Run(monkeypatch)
    call = run.call("loss_cls")
    assert same(call["cls_logits"], run.t["cls_logits"]) and call["cls_logits"].requires_grad
    assert same(call["y"], run.y(mixed=True)) and call["eps"] == 0.15


def test_loss_seg_on_the_l_half_with_the_mixed_pseudo_labels(monkeypatch):
    """Eq. (7), Deviation 7. Catches: the u-half or both halves, the un-mixed PL, the teacher's S, S4 instead
    of S, no smoothing."""
    run = Run(monkeypatch)
    call = run.call("loss_seg")
    assert same(call["S"], run.t["seg"][:B]) and call["S"].requires_grad
    assert torch.equal(call["PL"], run.t["PL_m"][:B]) and call["eps"] == 0.15


def test_restricted_probs_of_the_mixed_eval_teacher_logits_and_mixed_labels(monkeypatch):
    """Catches: s^t from the un-mixed logits or labels, from the train-mode pass or the student."""
    run = Run(monkeypatch)
    call = run.call("restricted_probs")
    assert same(call["S_t"], run.t["S_m"]) and same(call["y"], run.y(mixed=True))


def test_loss_s2c_student_seg_and_cam_teacher_restricted_probs_sigma(monkeypatch):
    """Eqs. (8)-(9). Catches: the teacher's S or A, detached student A, the unrestricted / un-mixed s^t, sigma and
    the smoothing swapped, one half only."""
    run = Run(monkeypatch)
    call = run.call("loss_s2c")
    assert same(call["S"], run.t["seg"]) and same(call["A"], run.t["cam"]) and call["A"].requires_grad
    assert same(call["P_t"], run.P_t()) and not call["P_t"].requires_grad
    assert call["sigma"] == 0.45 and call["eps"] == 0.15


def test_loss_unsup_u_half_yhat_of_the_eval_teacher_entropy_of_the_train_teacher(monkeypatch):
    """Eqs. (10)-(12), Deviation 8. Catches: the l-half, Yhat from the train pass / unrestricted / un-mixed, H from
    the eval pass or from the student or over both halves, H of the restricted probabilities, rho or 1 - rho."""
    run = Run(monkeypatch)
    call = run.call("loss_unsup")
    assert same(call["S_u"], run.t["seg"][B:]) and call["S_u"].requires_grad
    assert torch.equal(call["Yhat_u"], run.P_t().argmax(1)[B:])
    H = ORIGINAL["entropy"](torch.softmax(run.t["seg_tt"][B:], 1))
    assert same(call["H_u"], H) and not call["H_u"].requires_grad
    assert call["rho"] == pytest.approx(RHO)


def test_loss_contrast_sources_masks_and_labels(monkeypatch):
    """Eq. (13) inputs. Catches: the student's R as keys / prototypes or the teacher's R as queries, R of the eval
    pass, prob4 from the student, restricted or at full resolution, PL on the u-half or Yhat on the l-half, the
    un-mixed labels, the low / high quantiles swapped or 1 - rho / rho exchanged, PL != 0 instead of != 255 on the
    l-half, present_u after mixing or from the l-half, n_l not B, another bank."""
    run = Run(monkeypatch)
    call = run.call("loss_contrast")
    assert same(call["rep"], run.t["rep"]) and call["rep"].requires_grad
    assert same(call["rep_t"], run.t["rep_tt"]) and not call["rep_t"].requires_grad
    prob4 = torch.softmax(run.t["seg4_tt"], 1)
    assert same(call["prob4"], prob4) and not call["prob4"].requires_grad
    labels4 = torch.cat([down(run.t["PL_m"][:B]), down(run.P_t().argmax(1)[B:])])
    assert torch.equal(call["labels4"], labels4)
    H4 = ORIGINAL["entropy"](prob4[B:])
    q = lambda v: ORIGINAL["quantile"](H4, v)  # noqa: E731
    sure_l = labels4[:B] != 255
    assert torch.equal(call["low"], torch.cat([sure_l, H4 < q(RHO)]))
    assert torch.equal(call["high"], torch.cat([sure_l, H4 >= q(1 - RHO)]))
    assert call["low"][B:].any() and call["high"][B:].any() and not torch.equal(call["low"], call["high"])
    present = torch.cat([torch.ones(B, 1), run.t["labels_u"]], 1) > 0.5
    assert torch.equal(call["present_u"], present)
    assert call["n_l"] == B and call["bank"] is run.bank and call["args"] is run.args


def test_loss_contrast_gradient_reaches_the_student_only_through_the_queries():
    """Eq. (13): prototypes and bank keys are detached teacher features. Catches: rep and rep_t swapped inside,
    a prototype that is not detached, keys from the student."""
    torch.manual_seed(0)
    args = csrm.Args(**{**csrm.PRESETS["toy"], **ARGS})
    rep = torch.randn(2 * B, D, H4, H4, requires_grad=True)
    rep_t = torch.randn(2 * B, D, H4, H4, requires_grad=True)
    prob4 = torch.softmax(torch.randn(2 * B, K, H4, H4) * 3, 1)
    labels4 = prob4.argmax(1)
    low, high = torch.rand(2 * B, H4, H4) < 0.6, torch.rand(2 * B, H4, H4) < 0.6
    present_u = torch.ones(B, K, dtype=torch.bool)
    bank = csrm.MemoryBank(K, D, 50, 50)
    loss = ORIGINAL["loss_contrast"](rep, rep_t, prob4, labels4, low, high, present_u, B, bank, args)
    loss.backward()
    assert rep_t.grad is None and rep.grad is not None and rep.grad.abs().sum() > 0
    # the bank holds teacher keys: every key is a row of rep_t
    rows = rep_t.detach().permute(0, 2, 3, 1).reshape(-1, D)
    for q in bank.queues:
        for key in q:
            assert (rows - key).abs().amax(1).min() < 1e-6


def test_loss_contrast_prototypes_are_teacher_means_student_only_at_queries():
    """Eq. (13). Changing the student's R away from the query pixels leaves L_m unchanged; changing the teacher's
    R at a class's reliable pixels changes it (the prototype). Catches: prototypes or keys from the student R."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], **ARGS, "query_conf": 0.5})
    g = torch.Generator().manual_seed(3)
    rep, rep_t = torch.randn(2 * B, D, H4, H4, generator=g), torch.randn(2 * B, D, H4, H4, generator=g)
    prob4 = torch.softmax(torch.randn(2 * B, K, H4, H4, generator=g) * 2, 1)
    labels4 = prob4.argmax(1)
    low = high = torch.ones(2 * B, H4, H4, dtype=torch.bool)
    present_u = torch.ones(B, K, dtype=torch.bool)
    query = prob4.amax(1) > 0.5  # a pixel is a query of its own label's class only
    assert query.any() and (~query).any()

    def loss(r, rt):
        torch.manual_seed(0)
        bank = csrm.MemoryBank(K, D, 100, 100)
        ORIGINAL["loss_contrast"](rep, rep_t, prob4, labels4, low, high, present_u, B, bank, args)  # fill the bank
        torch.manual_seed(1)
        return ORIGINAL["loss_contrast"](r, rt, prob4, labels4, low, high, present_u, B, bank, args)
    base = loss(rep, rep_t)
    assert base > 0
    moved = rep.clone()
    moved[(~query)[:, None].expand_as(rep)] += 5.0
    assert loss(moved, rep_t) == pytest.approx(base.item(), abs=1e-6)
    proto_moved = rep_t.clone()
    proto_moved[(labels4 == 1)[:, None].expand_as(rep_t)] *= -1  # the class-1 prototype flips
    assert abs(loss(rep, proto_moved).item() - base.item()) > 1e-3


def test_rank_window_is_zero_based_gamma_l_to_gamma_h_exclusive():
    """Sec. 3.2.5 rule (b) as coded (Deviation 19): 0-based ranks in [gamma_l, gamma_h), i.e. 1-based 4..6 for 3, 6.
    Catches: '<=' at gamma_h, '>' at gamma_l, rule (a) on present classes, the l-half rule using '==' c."""
    rank_c = torch.tensor([2, 3, 5, 6, 2, 3, 5, 6]).view(2, 1, 4)
    labels4 = torch.tensor([[[1, 0, 0, 0]], [[0, 0, 0, 0]]])
    present = torch.tensor([True])
    m = csrm.negative_rank_mask(rank_c, labels4, present, 1, 1, 3, 6)
    assert m[0].flatten().tolist() == [False, False, False, False]  # l-half: top-3 only, and pixel 0 is labelled 1
    assert m[1].flatten().tolist() == [False, True, True, False]  # u-half, class present: ranks 3 and 5
    m = csrm.negative_rank_mask(rank_c, torch.zeros_like(labels4), torch.tensor([False]), 1, 1, 3, 6)
    assert m[0].flatten().tolist() == [True, False, False, False]  # l-half: rank 2 < 3 and PL != c
    assert m[1].flatten().tolist() == [True, True, True, False]  # u-half, absent: rule (a) adds rank 2


def _gap_setup():
    """K = 4, D = 4, two images (n_l = 1) of 2 x 3 pixels. A pixel of class c has R = e_c (student = teacher) and
    p_c = 0.9 > delta_p (a query). No pixel is labelled 1, so the valid classes are {0, 2, 3}: a gap at 1. high is
    empty, so nothing new enters the banks: bank 0 holds e1 (orthogonal to the class-0 queries), bank 1 e0 (never
    used), bank 2 nothing, bank 3 e3 (the class-3 queries themselves)."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], "queries": 8, "negatives": 50, "tau": 0.5, "query_conf": 0.3})
    e = torch.eye(4)
    labels4 = torch.tensor([[[0, 0, 2], [3, 3, 2]], [[0, 2, 2], [3, 0, 0]]])
    rep = e[labels4].permute(0, 3, 1, 2).contiguous()  # (2, D, 2, 3)
    prob4 = torch.full((2, 4, 2, 3), 0.1 / 3).scatter_(1, labels4[:, None], 0.9)
    low, high = torch.ones(2, 2, 3, dtype=torch.bool), torch.zeros(2, 2, 3, dtype=torch.bool)
    bank = csrm.MemoryBank(4, 4, 100, 100)
    for c, key in ((0, e[1]), (1, e[0]), (3, e[3])):
        bank.push(c, key.repeat(5, 1))
    return args, rep, prob4, labels4, low, high, torch.ones(1, 4, dtype=torch.bool), bank


@pytest.mark.parametrize("quirk", [False, True])
def test_loss_contrast_class_gap_index_quirk_and_normaliser_hand_computed(quirk):
    """Eq. (13), Deviation 11, review B14. Hand values (N = 50, tau = 0.5): a negative orthogonal to the query gives
    log(1 + 50 e^-2), one equal to it log(51); the empty bank of class 2 adds 0 but still counts in the mean.
      default: (class 0: orthogonal + class 2: 0 + class 3: log(51)) / 3;
      --u2pl-index-quirk: class 3 sits at loop position 2 and takes class 2's queries and prototype (e2) against
      bank 3 (e3): (orthogonal + 0 + orthogonal) / 3.
    Catches: qi = i always, qi = c always (the flag ignored), the mean over the classes actually used (/ 2) or over
    all K classes (/ 4), the bank indexed by the loop position."""
    args, rep, prob4, labels4, low, high, present_u, bank = _gap_setup()
    args.u2pl_index_quirk = quirk
    orth, same_ = math.log(1 + 50 * math.exp(-2)), math.log(51)
    want = (orth + 0 + orth) / 3 if quirk else (orth + 0 + same_) / 3
    loss = ORIGINAL["loss_contrast"](rep, rep.clone(), prob4, labels4, low, high, present_u, 1, bank, args)
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_loss_contrast_is_zero_with_a_single_valid_class_and_one_pixel_makes_a_class_valid():
    """Eq. (13) as in U2PL: with at most one class among the reliable pixels L_m is 0 (no contrast to learn), and
    a class with a single reliable pixel is a valid class. Every pixel is class 0 (R = e0, p_0 = 0.9: all queries)
    and bank 0 holds e1, so the loop would give log(1 + 50 e^-2) > 0; then one pixel becomes class 3 (R = e3, bank
    3 holds e3): (log(1 + 50 e^-2) + log(51)) / 2. Catches: 'len(valid_classes) < 1' (or '== 0') instead of
    '<= 1'; 'n_valid > 1' instead of '> 0' (the one-pixel class dropped, so L_m = 0 again)."""
    args, _, _, _, low, high, present_u, bank = _gap_setup()

    def loss(labels4):
        rep = torch.eye(4)[labels4].permute(0, 3, 1, 2).contiguous().requires_grad_(True)
        prob4 = torch.full((2, 4, 2, 3), 0.1 / 3).scatter_(1, labels4[:, None], 0.9)
        out = ORIGINAL["loss_contrast"](rep, rep.detach().clone(), prob4, labels4, low, high, present_u, 1, bank, args)
        assert out.requires_grad
        return out.item()
    labels4 = torch.zeros(2, 2, 3, dtype=torch.long)
    assert loss(labels4) == 0.0
    labels4[1, 1, 2] = 3
    orth, same_ = math.log(1 + 50 * math.exp(-2)), math.log(51)
    assert loss(labels4) == pytest.approx((orth + same_) / 2, rel=1e-5)


def test_loss_contrast_queries_only_at_pixels_labelled_with_their_class():
    """Eq. (13) / Deviation 19: a class-c query is a pixel LABELLED c (PL or Yhat) that is also reliable and has
    p_c > delta_p. Here a third of the pixels carry a label that is not the teacher's argmax, so their p at the
    label is < 0.5 = delta_p: they are no query at all, and moving the student's R there leaves L_m unchanged.
    Catches: the query pool built from low & p_c > delta_p without the label test (low instead of valid), or from
    the argmax of p instead of the label."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], **ARGS, "query_conf": 0.5, "queries": 64})
    g = torch.Generator().manual_seed(5)
    rep, rep_t = torch.randn(2 * B, D, H4, H4, generator=g), torch.randn(2 * B, D, H4, H4, generator=g)
    prob4 = torch.softmax(torch.randn(2 * B, K, H4, H4, generator=g) * 3, 1)
    mislabel = torch.rand(2 * B, H4, H4, generator=g) < 0.33
    labels4 = torch.where(mislabel, (prob4.argmax(1) + 1) % K, prob4.argmax(1))
    low = high = torch.ones(2 * B, H4, H4, dtype=torch.bool)
    present_u = torch.ones(B, K, dtype=torch.bool)
    query = prob4.gather(1, labels4[:, None])[:, 0] > 0.5
    assert (mislabel & (prob4.amax(1) > 0.5)).sum() >= 5  # pixels a label-free pool would take

    def loss(r):
        torch.manual_seed(0)
        bank = csrm.MemoryBank(K, D, 100, 100)
        ORIGINAL["loss_contrast"](rep, rep_t, prob4, labels4, low, high, present_u, B, bank, args)  # fill the bank
        torch.manual_seed(1)
        return ORIGINAL["loss_contrast"](r, rep_t, prob4, labels4, low, high, present_u, B, bank, args).item()
    moved = rep.clone()
    moved[(~query)[:, None].expand_as(rep)] += 5.0
    assert loss(moved) == pytest.approx(loss(rep), abs=1e-6)


def test_overfull_enqueue_is_a_random_subset_kept_in_raster_order():
    """Deviation 12: 12 negatives of class 1 into a bank of 3 keep a random 3, in batch-then-raster order. Catches:
    the raster tail kept (U2PL; no subsampling), the subset left in random order, more keys than the cap."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], **ARGS, "rank_low": 2, "rank_high": 3})
    rep_t = torch.ones(2, 2, 2, 3)  # D = 2: (raster index, 1)
    rep_t[:, 0] = torch.arange(12.0).view(2, 2, 3)
    prob4 = torch.tensor([0.1, 0.6, 0.2, 0.1]).view(1, 4, 1, 1).expand(2, 4, 2, 3)  # class 1 at rank 0 everywhere
    labels4 = torch.zeros(2, 2, 3, dtype=torch.long)
    present_u = torch.tensor([[True, False, True, True]])  # class 1 absent from the u-half image: rule (a)
    low, high = torch.zeros(2, 2, 3, dtype=torch.bool), torch.ones(2, 2, 3, dtype=torch.bool)
    picks = []
    for seed in range(4):
        torch.manual_seed(seed)
        bank = csrm.MemoryBank(4, 2, 3, 100)
        ORIGINAL["loss_contrast"](rep_t.clone(), rep_t, prob4, labels4, low, high, present_u, 1, bank, args)
        idx = bank.queues[1][:, 0].tolist()
        assert len(idx) == 3 and idx == sorted(set(idx)), idx
        picks.append(idx)
    assert any(p != [9.0, 10.0, 11.0] for p in picks) and len({tuple(p) for p in picks}) > 1


def test_total_is_eq14_weighted_sum_in_gradient_and_log(monkeypatch):
    """Eq. (14). Catches: any weight missing, swapped, applied twice or to the wrong key, a term left out of the
    total or the log, the s2c ramp not applied."""
    run = Run(monkeypatch)
    assert run.grad == weights(FULL)
    for k in TERMS:
        assert run.log[f"losses/{k}"] == pytest.approx(CONST[k]), k
    assert run.log["losses/total"] == pytest.approx(sum(FULL[k] * CONST[k] for k in TERMS))
    assert (run.log["w/s2c"], run.log["w/u"], run.log["w/m"]) == pytest.approx((W_S2C, 0.7, 0.2))


def test_returned_stats(monkeypatch):
    """Catches: pl/reliable of the u-half, of the un-mixed PL, of the wrong comparison."""
    run = Run(monkeypatch)
    assert run.log["pl/reliable"] == pytest.approx((run.t["PL_m"][:B] != 255).float().mean().item())


def test_optimizer_clip_step_then_ema_of_teacher_from_student(monkeypatch):
    """Catches: zero_grad after backward, no clipping or another max-norm, the step after the EMA, the EMA
    between swapped networks or with a 0-based step."""
    run = Run(monkeypatch)
    assert run.events == ["zero_grad", "clip", "step", "ema"]
    params, max_norm = run.clip[0]
    assert max_norm == 0.77 and any(p is run.student.theta for p in params)
    ema = run.call("ema_update")
    assert ema["teacher"] is run.teacher and ema["student"] is run.student and ema["step"] == STEP + 1
    assert ema["args"] is run.args
    assert run.opt.theta_grad is not None and run.teacher.phi.grad is None


def test_non_finite_loss_raises_before_any_update(monkeypatch):
    """A nan L_s stops the run (exit 1 in run_guard) with the term and the 1-based iteration, before zero_grad, the
    step and the EMA. Catches: check_finite dropped, or moved after optimizer.step() / ema_update()."""
    run = Run(monkeypatch, nan_term="seg")
    assert run.error is not None and "losses/seg" in str(run.error) and f"iteration {STEP + 1}" in str(run.error)
    assert run.events == []


def test_autocast_wraps_the_three_network_passes(monkeypatch):
    """--amp: teacher pass 1, the student and teacher pass 2 run inside ctx.autocast(). Catches: autocast dropped
    around any of the three (the stubs record whether they run inside the context)."""
    @contextlib.contextmanager
    def autocast():
        CAST["depth"] += 1
        try:
            yield
        finally:
            CAST["depth"] -= 1
    run = Run(monkeypatch, autocast=autocast)
    assert [c["cast"] for c in run.teacher.calls] == [True, True] and run.student.calls[0]["cast"] is True
    assert CAST["depth"] == 0 and [c["cast"] for c in Run(monkeypatch).teacher.calls] == [False, False]


# ----------------------------------------------------------------------------- warm-up and schedules
def test_warmup_epoch_only_cls_and_seg(monkeypatch):
    """Epoch 0 < W: the auxiliary weights are 0 and the auxiliary losses are not computed (Deviation 13).
    Catches: the epoch computed from step + 1, '<=' in the warm-up test, a term computed during the warm-up."""
    run = Run(monkeypatch, step=9)  # last step of epoch 0
    assert run.calls["loss_s2c"] == [] and run.calls["loss_unsup"] == [] and run.calls["loss_contrast"] == []
    assert len(run.teacher.calls) == 1 and run.student.calls[0]["rep"] is False
    assert run.grad == weights(dict(cls=1.0, seg=1.0, s2c=0.0, u=0.0, m=0.0))
    assert run.log["losses/total"] == pytest.approx(CONST["cls"] + CONST["seg"])
    assert run.events == ["zero_grad", "clip", "step", "ema"]  # the EMA (copy) runs during the warm-up too
    first = Run(monkeypatch, step=10)  # first step of epoch 1: lambda_s2c = 0.1 w_s2c, rho = 0.25 * 4 / 5
    assert first.grad == weights(dict(FULL, s2c=0.1 * 0.3))
    assert first.call("loss_unsup")["rho"] == pytest.approx(0.25 * (1 - 1 / 5))


def test_schedule_values_at_the_last_epoch(monkeypatch):
    """Catches: the ramp or alpha_t stepping with epoch + 1, the ramp over E instead of E - W."""
    run = Run(monkeypatch, step=49)  # epoch 4 of 5
    assert run.grad["s2c"] == pytest.approx(0.3 * (0.1 + 0.9 * 3 / 4))
    assert run.call("loss_unsup")["rho"] == pytest.approx(0.25 * (1 - 4 / 5))


# ------------------------------------------------------------------------------- component switches
def test_no_s2c_removes_only_s2c(monkeypatch):
    run = Run(monkeypatch, s2c=False)
    assert run.calls["loss_s2c"] == [] and "losses/s2c" not in run.log
    assert run.grad == weights(dict(FULL, s2c=0.0))
    assert len(run.calls["loss_unsup"]) == 1 and len(run.calls["loss_contrast"]) == 1


def test_no_u_removes_only_u(monkeypatch):
    """The train-mode teacher pass and R still run for L_m."""
    run = Run(monkeypatch, u=False)
    assert run.calls["loss_unsup"] == [] and "losses/u" not in run.log
    assert run.grad == weights(dict(FULL, u=0.0))
    assert len(run.teacher.calls) == 2 and run.student.calls[0]["rep"] is True


def test_no_m_removes_only_m_and_the_r_head(monkeypatch):
    run = Run(monkeypatch, m=False)
    assert run.calls["loss_contrast"] == [] and "losses/m" not in run.log
    assert run.grad == weights(dict(FULL, m=0.0))
    assert run.student.calls[0]["rep"] is False and run.teacher.calls[1]["rep"] is False
    assert all(len(q) == 0 for q in run.bank.queues)


def test_table1_row1_ls_only_skips_the_second_teacher_pass(monkeypatch):
    """Table 1 row 1 (--no-s2c --no-u --no-m): L_c + L_s, one teacher pass, ClassMix still on (official)."""
    run = Run(monkeypatch, s2c=False, u=False, m=False)
    assert run.grad == weights(dict(cls=1.0, seg=1.0, s2c=0.0, u=0.0, m=0.0))
    assert len(run.teacher.calls) == 1 and run.student.calls[0]["rep"] is False
    assert len(run.calls["classmix"]) == 1


def test_zero_weight_is_the_same_as_the_switch(monkeypatch):
    run = Run(monkeypatch, w_u=0.0, w_m=0.0)
    assert run.calls["loss_unsup"] == [] and run.calls["loss_contrast"] == [] and len(run.teacher.calls) == 1
    assert run.grad == weights(dict(FULL, u=0.0, m=0.0))


# ------------------------------------------------------------------------------------------ stages
class Recorder:
    def __init__(self):
        self.loops = []

    def train_loop(self, ctx, stage, datasets, batch_size, total, step, modules, lr=None, salt=0, indices=None):
        self.loops.append(dict(stage=stage, datasets=datasets, batch_size=batch_size, total=total, step=step,
                               modules=modules, lr=lr, salt=salt, indices=indices))


def fake_ctx(args, **kw):
    finished = []
    ctx = types.SimpleNamespace(
        args=args, spec=types.SimpleNamespace(root="root", dataset="voc"),
        splits={"train": "train_aug", "seed": "train", "val": "val"}, device=torch.device("cpu"), main=True,
        wrap=lambda m: m, autocast=contextlib.nullcontext, reseed=lambda salt: None, log=lambda r, echo=False: None,
        finish_stage=lambda stage, **k: finished.append((stage, k)), stage_weights=lambda stage: kw.get("weights"),
        finished=finished, run_dir=Path("run"))
    return ctx


def test_train_csrm_loaders_optimizer_bank_schedule_and_step(monkeypatch):
    """Catches: the weak transform on the l-half (or strong on the u-half), both loaders on one seed, the
    teacher and student swapped in the step, a bank with other caps or dimension, the wrong total, the optimiser
    built on the teacher or with the lrs swapped, the final teacher not saved or the student saved in its place
    (finish_stage("csrm", weights={"teacher": student.state_dict()}))."""
    rec = Recorder()
    splits = []
    monkeypatch.setattr(csrm, "augmented_split", lambda ctx, kind, target=None, seed=0, **kw: splits.append((kind, seed))
                        or types.SimpleNamespace(kind=kind, seed=seed, labels=lambda: np.ones((6, 3))))
    monkeypatch.setattr(csrm.data, "SegDataset", lambda *a, **k: "val_set")
    monkeypatch.setattr(csrm, "train_loop", rec.train_loop)
    student, teacher = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)
    with torch.no_grad():
        student.weight.fill_(1.0), teacher.weight.fill_(2.0)
    student.pretrained_parameters = lambda: [student.weight]
    monkeypatch.setattr(csrm, "build_model", lambda args, n, w=None: (student, teacher))
    seen = {}
    monkeypatch.setattr(csrm, "train_step", lambda *a: seen.update(step=a) or {})
    monkeypatch.setattr(csrm, "validate_teacher", lambda args, net, ds, device: seen.setdefault("val", []).append(
        (net, ds)) or {})
    args = csrm.Args(**{**csrm.PRESETS["toy"], **ARGS, "crf_workers": 0, "lr": 0.01, "lr_new_mult": 10.0})
    ctx = fake_ctx(args, weights={"w": 1})
    csrm.train_csrm(ctx, C)
    assert splits == [("strong", 0), ("weak", 1)]
    loop = rec.loops[0]
    assert loop["stage"] == "csrm" and loop["batch_size"] == args.batch_size and loop["total"] == 5 * 10
    assert loop["datasets"]["l"].kind == "strong" and loop["datasets"]["u"].kind == "weak"
    mods = loop["modules"]
    assert mods["student"] is student and mods["teacher"] is teacher
    bank = mods["bank"]
    assert bank.caps == [70] + [50] * C and bank.queues[0].shape == (0, D)
    lrs = sorted(g["lr"] for g in mods["optimizer"].param_groups)
    assert lrs == pytest.approx([0.01, 0.1])  # the pretrained weight at lr, the bias (new) at 10 lr
    assert loop["lr"](0) == 1.0 and loop["lr"](25) == pytest.approx(csrm.poly_lr(25, 50))
    batch = {"l": "BL", "u": "BU"}
    loop["step"](batch, 0)  # it 0: the start point is validated (the teacher) before the first step
    assert seen["val"] == [(teacher, "val_set")]
    seen["val"].clear()
    loop["step"](batch, 5)
    assert seen["val"] == []  # mid-epoch: no validation
    loop["step"](batch, 9)
    a = seen["step"]
    assert a[0] is args and a[1] is student and a[2] is teacher and a[3] is mods["optimizer"] and a[4] is bank
    assert a[5] == "BL" and a[6] == "BU" and a[7] == 9
    assert seen["val"] == [(teacher, "val_set")]  # end of epoch 0 (it 9): the teacher, on the seed split
    assert ctx.finished[-1][0] == "csrm"
    saved = ctx.finished[-1][1]["weights"]["teacher"]
    assert saved.keys() == teacher.state_dict().keys() and torch.equal(saved["weight"], teacher.weight)


def test_train_cam_step_uses_unsmoothed_eq5_on_the_cam_logits(monkeypatch):
    """Stage 0. Catches: label smoothing in stage 0, the CAM map instead of the logits; cam_init/* (Table 2 row 1)
    scored on another split (cam_miou(ctx, cam_net, ctx.splits["train"]) for the seed split) or another network,
    cam_init/val missing (review B17)."""
    rec = Recorder()
    monkeypatch.setattr(csrm, "augmented_split", lambda ctx, kind, **k: types.SimpleNamespace(
        kind=kind, labels=lambda: np.ones((8, 3))))
    monkeypatch.setattr(csrm, "train_loop", rec.train_loop)
    scored = []
    monkeypatch.setattr(csrm, "cam_miou", lambda ctx, model, split: scored.append((model, split)) or {"split": split})
    calls = []
    monkeypatch.setattr(csrm, "loss_cls", lambda z, y, eps: calls.append((z, y, eps)) or (z * 0).sum())
    args = csrm.Args(**{**csrm.PRESETS["toy"], "cam_batch": 2})
    net = types.SimpleNamespace(backbone=nn.Conv2d(1, 1, 1), classifier=nn.Conv2d(1, 1, 1, bias=False))
    z = torch.randn(2, 3, requires_grad=True)
    net_fn = lambda x: {"cls_logits": z, "cam": torch.randn(2, 3, 1, 1)}  # noqa: E731
    ctx = fake_ctx(args)
    ctx.wrap = lambda m: types.SimpleNamespace(train=lambda: net_fn)
    csrm.train_cam(ctx, net)
    loop = rec.loops[0]
    assert loop["stage"] == "cam" and loop["datasets"].kind == "cam"
    y = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loop["step"]({"image": torch.zeros(2, 3, 4, 4), "label": y}, 0)
    assert calls[0][0] is z and calls[0][1] is y and calls[0][2] == 0.0
    assert scored == [(net, "train"), (net, "val")]  # fake_ctx: seed split "train", train split "train_aug"
    stage, facts = ctx.finished[-1]
    assert stage == "cam" and facts["results"] == {"cam_init/train": {"split": "train"}, "cam_init/val": {"split": "val"}}


@pytest.mark.parametrize("supervision", ["image", "full"])
def test_train_verify_on_the_pseudo_labels_or_the_mask(monkeypatch, supervision):
    """Stage 3. Catches: ground truth used under --supervision image, pseudo labels under full, the loss on
    another target, no ignore index."""
    rec = Recorder()
    seen = {}
    monkeypatch.setattr(csrm, "augmented_split", lambda ctx, kind, target=None, **k: seen.update(
        kind=kind, target=target, extra=k.get("extra_dirs")) or [0] * 8)
    monkeypatch.setattr(csrm, "train_loop", rec.train_loop)
    args = csrm.Args(**{**csrm.PRESETS["toy"], "seg_init": "imagenet", "seg_batch": 2, "supervision": supervision})
    seg_net = nn.Conv2d(3, K, 1)
    seg_net.backbone = nn.Conv2d(1, 1, 1)
    csrm.train_verify(fake_ctx(args), seg_net, Path("pl"), {})
    assert seen["kind"] == "seg"
    if supervision == "full":
        assert seen["target"] == "mask" and seen["extra"] is None
    else:
        assert seen["target"] == "pseudo" and seen["extra"] == {"pseudo": Path("pl")}
    step = rec.loops[0]["step"]
    x = torch.randn(2, 3, 4, 4)
    mask = torch.randint(0, K, (2, 4, 4))
    mask[:, 0] = 255
    want = F.cross_entropy(seg_net(x), mask, ignore_index=255, label_smoothing=args.label_smoothing)  # before the step
    out = step({"image": x, "mask": mask}, 0)
    assert out["losses/seg"] == pytest.approx(want.item(), rel=1e-4)


def test_stages_skip_images_without_foreground_labels(monkeypatch):
    """Official ignore_bg_images: stage 0 and CSRM read only the images with a foreground label. The stub datasets
    have no labels at images 1 and 4. Catches: indices=None (every image) in train_csrm or train_cam, the
    indices of another dataset."""
    labels = np.ones((6, 3))
    labels[[1, 4]] = 0
    monkeypatch.setattr(csrm, "augmented_split", lambda ctx, kind, target=None, seed=0, **kw: types.SimpleNamespace(
        kind=kind, labels=lambda: labels))
    monkeypatch.setattr(csrm.data, "SegDataset", lambda *a, **k: "val_set")
    monkeypatch.setattr(csrm, "cam_miou", lambda ctx, model, split: {})
    rec = Recorder()
    monkeypatch.setattr(csrm, "train_loop", rec.train_loop)
    student = nn.Conv2d(1, 1, 1)
    student.pretrained_parameters = lambda: [student.weight]
    monkeypatch.setattr(csrm, "build_model", lambda args, n, w=None: (student, nn.Conv2d(1, 1, 1)))
    args = csrm.Args(**{**csrm.PRESETS["toy"], **ARGS, "crf_workers": 0, "cam_batch": 2})
    csrm.train_csrm(fake_ctx(args), C)
    net = types.SimpleNamespace(backbone=nn.Conv2d(1, 1, 1), classifier=nn.Conv2d(1, 1, 1, bias=False))
    ctx = fake_ctx(args)
    ctx.wrap = lambda m: types.SimpleNamespace(train=lambda: m)
    csrm.train_cam(ctx, net)
    assert [loop["stage"] for loop in rec.loops] == ["csrm", "cam"]
    assert [list(loop["indices"]) for loop in rec.loops] == [[0, 2, 3, 5]] * 2


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_train_csrm_optimizer(monkeypatch, optimizer):
    """The CSRM stage's optimiser (--optimizer; Sec. 4 and Deviation 16): both kinds keep the official groups,
    pretrained parts at --lr, new layers at --lr-new-mult x --lr, weight decay --wd on weights only; sgd is Nesterov
    with momentum 0.9, adamw is AdamW. Catches: the switch ignored (SGD either way) or inverted, AdamW in one group
    (the multiplier lost), --seg-lr / --seg-wd / the verification network's AdamW decay 0.01 used here."""
    monkeypatch.setattr(csrm, "augmented_split", lambda ctx, kind, target=None, seed=0, **kw: types.SimpleNamespace(
        kind=kind, labels=lambda: np.ones((4, 3))))
    monkeypatch.setattr(csrm.data, "SegDataset", lambda *a, **k: "val_set")
    rec = Recorder()
    monkeypatch.setattr(csrm, "train_loop", rec.train_loop)
    student = nn.Conv2d(1, 1, 1)
    student.pretrained_parameters = lambda: [student.weight]
    monkeypatch.setattr(csrm, "build_model", lambda args, n, w=None: (student, nn.Conv2d(1, 1, 1)))
    args = csrm.Args(**{**csrm.PRESETS["toy"], **ARGS, "crf_workers": 0, "optimizer": optimizer, "lr": 0.002,
                        "lr_new_mult": 5.0, "wd": 3e-4, "seg_lr": 0.5, "seg_wd": 0.7})
    csrm.train_csrm(fake_ctx(args), C)
    opt = rec.loops[0]["modules"]["optimizer"]
    assert type(opt) is {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[optimizer]
    # the official SGD everywhere by default (Deviation 16: adamw was only tried), and the CLI refuses other names
    assert csrm.Args().optimizer == "sgd" and all(csrm.Args(**csrm.PRESETS[p]).optimizer == "sgd" for p in csrm.PRESETS)
    assert csrm.CHOICES["optimizer"] == ("sgd", "adamw")
    groups = {(round(g["lr"], 9), g["weight_decay"], tuple(id(p) for p in g["params"])) for g in opt.param_groups}
    assert groups == {(0.002, 3e-4, (id(student.weight),)), (0.01, 0.0, (id(student.bias),))}
    if optimizer == "sgd":
        assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)


def test_train_verify_trains_in_train_mode(monkeypatch):
    """Stage 3. Catches the verification network put in eval mode (ctx.wrap(seg_net).eval(): frozen BN statistics,
    no dropout) for its training."""
    rec = Recorder()
    monkeypatch.setattr(csrm, "augmented_split", lambda ctx, kind, target=None, **k: [0] * 8)
    monkeypatch.setattr(csrm, "train_loop", rec.train_loop)
    args = csrm.Args(**{**csrm.PRESETS["toy"], "seg_init": "imagenet", "seg_batch": 2})
    seg_net = nn.Sequential(nn.Conv2d(3, K, 1), nn.Dropout(0.5))
    seg_net.backbone = seg_net[0]
    seg_net.eval()
    csrm.train_verify(fake_ctx(args), seg_net, Path("pl"), {})
    assert seg_net.training and all(m.training for m in seg_net.modules())


class PoolNet(nn.Module):
    """A stand-in CAM network: the CAM is the 16 x 16 average pool of the input minus 0.5 (so it has negative parts),
    which commutes with a horizontal flip when the width is a multiple of 16. Records every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, seg=True, rep=True):
        self.calls.append(dict(shape=tuple(x.shape), seg=seg, rep=rep))
        cam = F.avg_pool2d(x[:, :C], 16) - 0.5
        return {"cam": cam}


def test_tta_cams_relu_flip_undone_scales_and_pnoc_upsampling():
    """Sec. 4 inference CAMs (stage 2): sum over scales and flips of ReLU CAMs, each upsampled (bilinear) to (H, W)
    rounded up to 16 and cropped (PNOC). With a flip-equivariant stand-in network the flipped pass, flipped back,
    equals the plain one, so flip=True doubles the plain result. Catches: the flipped CAM not flipped back, the
    ReLU dropped (or applied after the sum), the scales ignored (the network always at 1.0) or not summed, the
    upsampling straight to (H, W), the R / seg heads requested."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 48, generator=g)
    net = PoolNet()

    def plain(xs):  # one scale, no flip, written out
        A = F.relu(F.avg_pool2d(xs[:, :C], 16) - 0.5)
        return F.interpolate(A, size=(48, 48), mode="bilinear", align_corners=False)[0, :, :40, :48]
    one = ORIGINAL["tta_cams"](net, x, [1.0], False)
    assert torch.allclose(one, plain(x), atol=1e-6) and (F.avg_pool2d(x[:, :C], 16) < 0.5).any() and (one > 0).any()
    assert torch.allclose(ORIGINAL["tta_cams"](net, x, [1.0], True), 2 * plain(x), atol=1e-6)
    net.calls.clear()
    two = ORIGINAL["tta_cams"](net, x, [1.0, 0.5], False)
    assert [c["shape"] for c in net.calls] == [(1, 3, 40, 48), (1, 3, 20, 24)]
    assert all(c["seg"] is False and c["rep"] is False for c in net.calls)
    half = F.interpolate(x, size=(20, 24), mode="bicubic", align_corners=False)
    assert torch.allclose(two, plain(x) + plain(half), atol=1e-6)


def test_tta_seg_flip_undone_and_mean_over_scales():
    """Sec. 4 / Deviation 15 seg_ms/val: seg logits averaged over the scales, flips summed after flipping back, each
    upsampled to (H, W). Catches: the flipped logits not flipped back, the scales ignored, the sum instead of the
    mean over scales."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 48, generator=g)
    calls = []

    def net(inp):
        calls.append(tuple(inp.shape))
        return F.avg_pool2d(torch.cat([inp, -inp[:, :1]], 1), 4) - 0.1

    def plain(xs):
        return F.interpolate(net(xs), size=(32, 48), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(ORIGINAL["tta_seg"](net, x, [1.0], True), 2 * plain(x), atol=1e-6)
    calls.clear()
    got = ORIGINAL["tta_seg"](net, x, [1.0, 0.5], False)
    assert calls == [(1, 3, 32, 48), (1, 3, 16, 24)]
    half = F.interpolate(x, size=(16, 24), mode="bicubic", align_corners=False)
    assert torch.allclose(got, (plain(x) + plain(half)) / 2, atol=1e-6)


def test_validate_teacher_eval_mode_present_classes_class_ids_and_val_images():
    """Per-epoch validation (logged). A stand-in teacher gives, in eval mode, a seg map equal to the ground truth and
    a CAM of the present class (id 2) exactly on its pixels, plus a strong CAM of an ABSENT class everywhere; in
    train mode a wrong seg map. Only the first --val-images (1) image counts; the second would score 0. Expect
    val/seg_miou = val/cam_miou = 100. The seg map also puts a weaker ABSENT class on the background (the right
    half): the plain argmax keeps background there, so val/seg_restricted_miou = 100 too; raised above background,
    the absent class takes the whole background in the plain argmax (mIoU 33.3) but not in the restricted one (100).
    Catches: the teacher in train mode, CAMs of all classes (not the present ones), label indices scored as class
    ids (keys instead of keys + 1), --val-images ignored, the restriction not applied or applied to the wrong
    classes."""
    Hs = 16
    mask = np.zeros((Hs, Hs), np.int64)
    mask[:, :8] = 2
    label = np.array([0.0, 1.0, 0.0], np.float32)
    samples = [{"image": np.zeros((Hs, Hs, 3), np.uint8), "label": label, "mask": mask},
               {"image": np.zeros((Hs, Hs, 3), np.uint8), "label": label, "mask": np.full((Hs, Hs), 3, np.int64)}]
    ds = type("DS", (), {"num_classes": K, "__len__": lambda self: 2, "__getitem__": lambda self, i: samples[i]})()

    class Teacher(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def forward(self, x, seg=True, rep=True):
            self.calls.append((self.training, seg))
            cam = torch.zeros(1, C, Hs, Hs)
            cam[0, 1, :, :8] = 1.0
            cam[0, 0] = 4.0  # absent class
            seg_map = F.one_hot(torch.as_tensor(mask if not self.training else 3 - mask), K).permute(2, 0, 1)[None]
            seg = seg_map.float() * 5
            seg[0, 1, :, 8:] = self.absent  # class id 1 is absent from the label
            return {"cam": cam, "seg": seg}
    teacher = Teacher().train()
    teacher.absent = 2.0
    args = csrm.Args(**{**csrm.PRESETS["toy"], "val_images": 1})
    res = ORIGINAL["validate_teacher"](args, teacher, ds, torch.device("cpu"))
    assert teacher.calls == [(False, True)]
    assert res["val/seg_miou"] == pytest.approx(100.0) and res["val/cam_miou"] == pytest.approx(100.0)
    assert res["val/seg_restricted_miou"] == pytest.approx(100.0)
    teacher.absent = 9.0  # now the absent class wins the plain argmax on the background half
    res = ORIGINAL["validate_teacher"](args, teacher, ds, torch.device("cpu"))
    assert res["val/seg_miou"] < 50 and res["val/seg_restricted_miou"] == pytest.approx(100.0)


def test_build_model_teacher_is_a_frozen_copy_of_the_student():
    """Catches: a teacher with gradients, a teacher that is not the student's copy, the CAM weights loaded into
    the teacher only."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], "width": 8, "low_width": 4, "rep_dim": 4})
    torch.manual_seed(0)
    cam = csrm.CAMNet("resnet18", C)
    weights = {"backbone": cam.backbone.state_dict(), "classifier": cam.classifier.state_dict()}
    student, teacher = csrm.build_model(args, C, weights)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert any(p.requires_grad for p in student.parameters())
    for (n, p), (_, q) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert torch.equal(p, q), n
    assert torch.equal(student.classifier.weight, cam.classifier.weight)


def _stub_pl_inputs(monkeypatch, samples):
    """A K-class dataset stub: SegDataset -> it, split_ids -> the samples' names, each_sample -> the samples.
    -> the dataset stub."""
    ds = types.SimpleNamespace(num_classes=K, class_names=[f"c{i}" for i in range(K)])
    monkeypatch.setattr(csrm.data, "SegDataset", lambda *a, **k: ds)
    monkeypatch.setattr(csrm.data, "split_ids", lambda *a, **k: [s["name"] for s in samples])
    monkeypatch.setattr(csrm, "each_sample", lambda ctx, d, desc, *a, **k: iter(samples))
    return ds


def test_make_pseudo_labels_teacher_tta_cams_pl_threshold_crf_and_oracle_note(monkeypatch):
    """Stage 2 (Sec. 4 inference). Catches: the CAMs not normalised by the present classes' max, another
    background threshold than --pl-thr, absent classes in the argmax, the CRF with other parameters or on the
    un-thresholded map, the wrong model or TTA settings, the GT-swept cam/* entry without its oracle note."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], "pl_thr": 0.37, "crf_iters": 4, "tta_scales": (1.0, 0.5), "tta_flip": True})
    Hs, Ws = 4, 5
    g = torch.Generator().manual_seed(0)
    cams = torch.rand(C, Hs, Ws, generator=g) * 3
    cams[0, 0, 0], cams[0, 0, 1], cams[2, 0, 1] = 3.5, 0.385 * 3.5, 0.0  # pixel (0, 1): class 1 only at t < 0.385
    label = np.array([1.0, 0.0, 1.0], np.float32)
    sample = {"name": "a", "image": np.zeros((Hs, Ws, 3), np.uint8), "label": label,
              "mask": np.zeros((Hs, Ws), np.int64)}
    _stub_pl_inputs(monkeypatch, [sample])
    tta, crfs, saved = [], [], {}
    monkeypatch.setattr(csrm, "tta_cams", lambda model, x, scales, flip: tta.append((model, scales, flip)) or cams.clone())
    monkeypatch.setattr(csrm.crf, "refine_labels", lambda img, lab, n, gt_prob=None, **p: crfs.append(
        (lab.copy(), n, gt_prob, p)) or lab)
    monkeypatch.setattr(csrm.data, "save_mask", lambda path, m: saved.setdefault(Path(path).parts[-3], m.copy()))
    teacher = nn.Conv2d(1, 1, 1)
    ctx = fake_ctx(args)
    res = csrm.make_pseudo_labels(ctx, teacher, Path("pl"))
    assert tta[0] == (teacher, (1.0, 0.5), True) and teacher.training is False
    keys = np.array([0, 2])
    norm = (cams[keys] / (cams[keys].amax((1, 2), keepdim=True) + 1e-5)).numpy()
    idx = np.concatenate([np.full((1, Hs, Ws), 0.37, np.float32), norm]).argmax(0)
    want = np.array([0, 1, 3], np.uint8)[idx]
    assert want[0, 1] == 1
    assert (saved["pseudo"] == want).all()
    assert (crfs[0][0] == idx).all() and crfs[0][1] == 3 and crfs[0][2] == 0.7
    assert crfs[0][3] == {**csrm.crf.PRESETS["irn"], "n_iters": 4}
    assert res["pseudo/train"]["threshold"] == 0.37 and res["pseudo_crf/val"]["threshold"] == 0.37
    assert "optimistic" in res["cam/train"]["threshold_selection"] and "optimistic" in res["cam/val"]["threshold_selection"]


@pytest.mark.parametrize("flags", [{"pl_crf": False}, {"crf_iters": 0}])
def test_make_pseudo_labels_without_the_inference_crf(monkeypatch, flags):
    """--no-pl-crf, and --crf-iters 0 (one count for both CRFs, review B28): no dCRF call, no pseudo_crf PNG and no
    pseudo_crf/* key, the plain pseudo labels still written and scored. Catches: the inference CRF gated on
    --crf-iters only (crf_params = ... if args.crf_iters > 0), or on --pl-crf only (a 0-iteration CRF)."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], "crf_iters": 4, "tta_scales": (1.0,), **flags})
    sample = {"name": "a", "image": np.zeros((4, 5, 3), np.uint8), "label": np.array([1.0, 0.0, 0.0], np.float32),
              "mask": np.zeros((4, 5), np.int64)}
    _stub_pl_inputs(monkeypatch, [sample])
    monkeypatch.setattr(csrm, "tta_cams", lambda model, x, scales, flip: torch.rand(C, 4, 5))
    crfs, saved = [], []
    monkeypatch.setattr(csrm.crf, "refine_labels", lambda img, lab, *a, **k: crfs.append(lab) or lab)
    monkeypatch.setattr(csrm.data, "save_mask", lambda path, m: saved.append(Path(path).parts[-3]))
    res = csrm.make_pseudo_labels(fake_ctx(args), nn.Conv2d(1, 1, 1), Path("pl"))
    assert crfs == [] and saved == ["pseudo", "pseudo"]  # train, val
    assert {"pseudo/train", "pseudo/val", "cam/train", "cam/val"} == set(res)


def test_make_pseudo_labels_scores_train_on_the_seed_ids_only(monkeypatch):
    """Stage 2 / Deviation 26: the train-split metrics (cam/train, pseudo/train, pseudo_crf/train) are scored on the
    images of the seed split only (the train split has no ground truth outside it), val on every image. Two
    images get the same pseudo label (class 1 everywhere); only "a" is in the seed split and its mask is class 1,
    "b"'s mask is class 2. Catches: every train image scored (pseudo/train = 25 instead of 100), the seed filter
    applied to val too."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], "pl_thr": 0.3, "crf_iters": 0, "tta_scales": (1.0,)})
    samples = [{"name": n, "image": np.zeros((4, 5, 3), np.uint8), "label": np.array([1.0, 0.0, 0.0], np.float32),
                "mask": np.full((4, 5), c, np.int64)} for n, c in (("a", 1), ("b", 2))]
    _stub_pl_inputs(monkeypatch, samples)
    monkeypatch.setattr(csrm.data, "split_ids", lambda *a, **k: ["a"])
    monkeypatch.setattr(csrm, "tta_cams", lambda model, x, scales, flip: torch.ones(C, 4, 5))
    monkeypatch.setattr(csrm.data, "save_mask", lambda path, m: None)
    res = csrm.make_pseudo_labels(fake_ctx(args), nn.Conv2d(1, 1, 1), Path("pl"))
    assert res["pseudo/train"]["miou"] == 100.0 and res["cam/train"]["miou"] == 100.0
    assert res["pseudo/val"]["miou"] == 25.0


def test_evaluate_seg_val_single_scale_seg_ms_tta_and_the_vis_columns(monkeypatch, tmp_path):
    """Sec. 4 / Deviation 15. The stubbed tta_seg returns logits that predict the ground truth only for the single-scale
    call (scale 1.0, no flip), so seg/val = 100 and seg_ms/val is the score of the TTA logits. Catches: seg/val
    from the TTA call or with flip, seg_ms/val from the single-scale prediction, another --tta-scales / --tta-flip,
    the network left in train mode, the vis grid's CAM not single-scale or its pseudo-label column read from
    another folder, the columns' captions out of order."""
    args = csrm.Args(**{**csrm.PRESETS["toy"], "tta_scales": (0.5, 1.5), "tta_flip": True, "vis": 1})
    Hs, Ws = 4, 6
    mask = np.zeros((Hs, Ws), np.int64)
    mask[:, 3:] = 1
    samples = [{"name": n, "image": np.full((Hs, Ws, 3), i, np.uint8), "label": np.array([1.0, 0.0, 0.0], np.float32),
                "mask": mask} for i, n in enumerate(("a", "b"))]
    right = F.one_hot(torch.as_tensor(mask), K).permute(2, 0, 1).float()  # (K, H, W), argmax = mask
    wrong = torch.zeros(K, Hs, Ws)
    wrong[2, :, :2] = 1  # predicts background everywhere but class 2 on two columns
    calls = {"seg": [], "cam": [], "read": [], "grid": []}
    ds = _stub_pl_inputs(monkeypatch, samples)
    monkeypatch.setattr(csrm, "tta_seg", lambda net, x, scales, flip: calls["seg"].append((net, tuple(scales), flip))
                        or (right if (tuple(scales), flip) == ((1.0,), False) else wrong).clone())
    cams = torch.rand(C, Hs, Ws)
    monkeypatch.setattr(csrm, "tta_cams", lambda net, x, scales, flip: calls["cam"].append((net, tuple(scales), flip))
                        or cams.clone())
    pl = np.full((Hs, Ws), 3, np.uint8)
    monkeypatch.setattr(csrm.data, "read_mask", lambda path: calls["read"].append(Path(path)) or pl)
    monkeypatch.setattr(csrm, "save_grid", lambda path, rows, captions: calls["grid"].append((path, rows, captions)))
    seg_net, teacher = nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)
    ctx = fake_ctx(args)
    ctx.run_dir = tmp_path
    res = csrm.evaluate(ctx, seg_net, teacher, ds, Path("pl_dir"))
    assert calls["seg"] == [(seg_net, (1.0,), False), (seg_net, (0.5, 1.5), True)] * 2 and not seg_net.training
    assert res["seg/val"]["miou"] == 100.0
    cm = csrm.miou.ConfusionMatrix(K)
    for _ in samples:
        cm.update(wrong.argmax(0).numpy(), mask)
    assert res["seg_ms/val"] == csrm.miou_entry(cm.compute(), ds.class_names) and res["seg_ms/val"]["miou"] < 100
    assert calls["cam"] == [(teacher, (1.0,), False)] and calls["read"] == [Path("pl_dir") / "a.png"]
    path, rows, captions = calls["grid"][0]
    assert path == tmp_path / "vis" / "val.png" and len(rows) == 1
    assert captions == ["image", "teacher CAM", "pseudo label", "prediction", "ground truth"]
    assert (rows[0][2] == csrm.colour_labels(pl)).all() and (rows[0][3] == csrm.colour_labels(mask)).all()


MAIN_ARGV = ["--preset", "toy", "--crop", "64", "--workers", "0", "--width", "8", "--low-width", "4", "--rep-dim", "4"]


def run_main_with_stub_stages(monkeypatch, toy_root, out, *argv):
    """main() on the toy data with every stage replaced: stage 0 saves the CAM weights, "CSRM training" saves a
    teacher whose every float tensor differs from a fresh build_model() teacher; the others record what main gives
    them. -> (trained teacher state, record)."""
    seen = {}
    clone = lambda sd: {k: v.detach().clone() for k, v in sd.items()}  # noqa: E731

    def train_cam(ctx, cam_net):
        ctx.finish_stage("cam", weights={"backbone": cam_net.backbone.state_dict(),
                                         "classifier": cam_net.classifier.state_dict()})

    def train_csrm(ctx, n):
        teacher = csrm.build_model(ctx.args, n, ctx.stage_weights("cam"))[1]
        with torch.no_grad():
            for v in teacher.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.rand_like(v) + 1.0)
        seen["trained"] = clone(teacher.state_dict())
        ctx.finish_stage("csrm", weights={"teacher": teacher.state_dict()})

    def verify(ctx, seg_net, pl_dir, keep):
        seen.update(verify=pl_dir, keep=clone(keep["teacher"]))
        ctx.finish_stage("verify", weights={**keep, "seg": seg_net.state_dict()}, final=True)
    monkeypatch.setattr(csrm, "train_cam", train_cam)
    monkeypatch.setattr(csrm, "train_csrm", train_csrm)
    monkeypatch.setattr(csrm, "make_pseudo_labels", lambda ctx, teacher, out_dir, sam=None: seen.update(
        infer=clone(teacher.state_dict()), pl_root=out_dir) or {})
    monkeypatch.setattr(csrm, "train_verify", verify)
    monkeypatch.setattr(csrm, "evaluate", lambda ctx, net, teacher, ds, pl_dir: seen.update(
        vis=pl_dir, evaluated=clone(teacher.state_dict())) or {})
    csrm.main(["--data", str(toy_root), "--out", str(out), *MAIN_ARGV, *argv])
    return seen


@pytest.mark.parametrize("argv, folder", [([], "pseudo_crf"), (["--no-pl-crf"], "pseudo"),
                                          (["--crf-iters", "0"], "pseudo")])
def test_main_infers_with_the_trained_teacher_and_verifies_on_the_last_refinement(monkeypatch, toy_root, tmp_path,
                                                                                   capsys, argv, folder):
    """main() with stub stages. Catches: the trained teacher not loaded before the pseudo labels (deleting
    load_weights(teacher, ctx.stage_weights("csrm")["teacher"], ...)), so that stage 2, the vis grid and last.pt
    get the freshly built teacher; the verification network (and the vis column) reading pseudo/ while the dCRF
    runs, or pseudo_crf/ under --no-pl-crf / --crf-iters 0 (no PNGs there)."""
    out = tmp_path / "run"
    seen = run_main_with_stub_stages(monkeypatch, toy_root, out, *argv)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT csrm seg/val")
    trained = seen["trained"]
    for got in (seen["infer"], seen["evaluated"], seen["keep"]):
        assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in trained)
    pl = out / "pseudo_labels"
    assert seen["pl_root"] == pl
    assert seen["verify"] == pl / folder / "train_aug" and seen["vis"] == pl / folder / "val"


# ------------------------------------------------------------------------------------------ verification network
@pytest.mark.parametrize("seg_optimizer", ["sgd", "adamw"])
def test_train_verify_optimizer(monkeypatch, seg_optimizer):
    """--seg-optimizer sgd: PNOC's Nesterov SGD (build_optimizer: backbone at --seg-lr, new layers at --lr-new-mult x,
    weight decay --seg-wd on weights only, momentum 0.9); adamw (the toy, Deviation 16): AdamW over every seg_net
    parameter in one group at --seg-lr, weight decay 0.01. Catches: the switch ignored or inverted, AdamW on the
    head or backbone only, at --lr or with the new-layer multiplier, with --seg-wd instead of 0.01."""
    rec = Recorder()
    monkeypatch.setattr(csrm, "augmented_split", lambda ctx, kind, target=None, **k: [0] * 8)
    monkeypatch.setattr(csrm, "train_loop", rec.train_loop)
    args = csrm.Args(**{**csrm.PRESETS["toy"], "seg_init": "imagenet", "seg_batch": 2, "seg_optimizer": seg_optimizer,
                        "seg_lr": 0.003, "seg_wd": 7e-4, "lr": 0.02, "lr_new_mult": 5.0})
    seg_net = nn.Module()
    seg_net.backbone, seg_net.head = nn.Conv2d(3, 2, 1), nn.Conv2d(2, K, 1)
    csrm.train_verify(fake_ctx(args), seg_net, Path("pl"), {})
    opt = rec.loops[0]["modules"]["optimizer"]
    ids = lambda ps: frozenset(id(p) for p in ps)  # noqa: E731
    groups = {(round(g["lr"], 9), g["weight_decay"], ids(g["params"])) for g in opt.param_groups}
    b, h = seg_net.backbone, seg_net.head
    if seg_optimizer == "sgd":
        assert type(opt) is torch.optim.SGD
        assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
        assert groups == {(0.003, 7e-4, ids([b.weight])), (0.003, 0.0, ids([b.bias])),
                          (0.015, 7e-4, ids([h.weight])), (0.015, 0.0, ids([h.bias]))}
    else:
        assert type(opt) is torch.optim.AdamW and len(opt.param_groups) == 1
        assert groups == {(0.003, 0.01, ids(seg_net.parameters()))}


def test_verify_optimizer_presets():
    """Deviation 16: AdamW for the toy only; the Args default and both paper presets keep PNOC's SGD. Catches the toy
    value leaking into the default or a paper preset, or the toy's lost."""
    assert csrm.Args().seg_optimizer == "sgd" and csrm.PRESETS["toy"]["seg_optimizer"] == "adamw"
    assert all(csrm.Args(**csrm.PRESETS[p]).seg_optimizer == "sgd" for p in ("paper_voc", "paper_coco"))
