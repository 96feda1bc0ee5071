"""Wiring tests for auxsegnet.py: which tensor of which network / branch feeds each loss term and each label
update, detach or not, loss weights, thresholds, the stage-to-stage label flow and the ablation switches.

Stub networks, hand-made tensors and recording monkeypatches pin the connections between the equation
functions (tests/test_auxsegnet.py pins the functions themselves). The module under test is the file named
by AUXSEGNET_UNDER_TEST (default: the repository's auxsegnet.py), so that planted bugs can be checked:
    AUXSEGNET_UNDER_TEST=/tmp/mutant.py python -m pytest -q tests/test_auxsegnet_wiring.py
"""
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PATH = Path(os.environ.get("AUXSEGNET_UNDER_TEST", ROOT / "auxsegnet.py"))
_spec = importlib.util.spec_from_file_location("auxsegnet_under_test", PATH)
aux = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = aux  # inspect.getsource(Args) (the CLI builder) looks the module up here
_spec.loader.exec_module(aux)
from common import augment, data  # noqa: E402

NC = 4  # classes with background; 3 foreground classes


def tiny(variant="mt_ct", **flags):
    """The stage network of a variant (and ablation flags) on a tiny random-init backbone."""
    torch.manual_seed(0)
    args = aux.Args(variant=variant, backbone="resnet10t", pretrained=False, freeze_bn=False, head_dim=8,
                    dilations=(1, 1, 1), **flags)
    return aux.build_model(args, NC, "stage"), args


def make_batch(B=2, H=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, NC, (B, H, H), generator=g)
    seg[:, :3] = 255
    valid = torch.ones(B, H, H)
    valid[:, -5:] = 0
    return {"image": torch.randn(B, 3, H, H, generator=g), "label": (torch.rand(B, NC - 1, generator=g) > 0.5).float(),
            "seg": seg, "sal": torch.rand(B, H, H, generator=g), "sal_valid": valid}


def fake_out(with_ct=True, B=2, h=4, seed=1):
    """A forward output whose every tensor is distinct (so a wrong key gives a wrong value)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    out = {"cls_logits": r(B, NC - 1), "cam": r(B, NC - 1, h, h), "seg_init": r(B, NC, h, h), "seg_ref": r(B, NC, h, h),
           "sal_init": r(B, 1, h, h), "sal_ref": r(B, 1, h, h)}
    if with_ct:
        N = h * h
        out.update(A_seg=torch.softmax(r(B, N, N), -1), A_sal=torch.softmax(r(B, N, N), -1),
                   A_ct=torch.softmax(r(B, N, N), -1), omega=torch.softmax(r(B, 2, N, N), 1))
    return out


class Recorder:
    """Replaces a module function; records its arguments and returns the real result (or `ret`)."""

    def __init__(self, monkeypatch, name, ret=None):
        self.real, self.calls, self.ret = getattr(aux, name), [], ret
        monkeypatch.setattr(aux, name, self)

    def __call__(self, *a, **k):
        self.calls.append((a, k))
        return self.real(*a, **k) if self.ret is None else self.ret(*a, **k)


def same(a, b):
    return a is b or (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b))


# ----------------------------------------------------------------------------------------------------------
# Stage losses: which output feeds which term, with which target and threshold
# ----------------------------------------------------------------------------------------------------------
def test_stage_losses_inputs(monkeypatch):
    out, batch = fake_out(), make_batch()
    args = aux.Args(sal_bin_thresh=0.37)
    rec = {n: Recorder(monkeypatch, n) for n in ("loss_cls", "loss_sal", "loss_seg", "saliency_target")}
    parts = aux.stage_losses(out, batch, args)
    assert set(parts) == {"cls", "sal1", "sal2", "seg1", "seg2"}
    (a, k), = rec["saliency_target"].calls
    assert same(a[0], batch["sal"]) and (a[1:] or (k["thresh"],)) == (0.37,)
    B = aux.saliency_target(batch["sal"], 0.37)
    (a, _), = rec["loss_cls"].calls
    assert same(a[0], out["cls_logits"]) and same(a[1], batch["label"])
    s1, s2 = rec["loss_sal"].calls
    assert same(s1[0][0], out["sal_init"]) and same(s2[0][0], out["sal_ref"])
    for call in (s1, s2):
        assert same(call[0][1], B) and same(call[0][2], batch["sal_valid"])
    g1, g2 = rec["loss_seg"].calls
    assert same(g1[0][0], out["seg_init"]) and same(g2[0][0], out["seg_ref"])
    assert same(g1[0][1], batch["seg"]) and same(g2[0][1], batch["seg"])


def test_stage_losses_values():
    """The parts equal the loss functions on the intended tensors (hand-written losses, not aux's)."""
    out, batch = fake_out(), make_batch()
    args = aux.Args(sal_bin_thresh=0.37)
    parts = aux.stage_losses(out, batch, args)
    H = batch["seg"].shape[-1]
    up = lambda t: F.interpolate(t, size=(H, H), mode="bilinear", align_corners=False)  # noqa: E731
    target = (batch["sal"] > 0.37).float()
    v = batch["sal_valid"]

    def bce(logits):
        return (F.binary_cross_entropy_with_logits(up(logits)[:, 0], target, reduction="none") * v).sum() / v.sum()

    def ce(logits):
        return F.cross_entropy(up(logits), batch["seg"], ignore_index=255)

    y = batch["label"]
    z = out["cls_logits"]
    cls = -(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z)).mean()
    expected = {"cls": cls, "sal1": bce(out["sal_init"]), "sal2": bce(out["sal_ref"]), "seg1": ce(out["seg_init"]),
                "seg2": ce(out["seg_ref"])}
    for k, e in expected.items():
        torch.testing.assert_close(parts[k], e, rtol=1e-5, atol=1e-6, msg=k)
    assert len({round(float(x), 5) for x in expected.values()}) == 5  # all terms differ


def test_loss_reductions():
    # L_sal: mean over valid pixels only; L_seg: mean over non-ignored pixels; L_cls: mean over classes and batch
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    valid = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert aux.loss_sal(logits, target, valid).item() == pytest.approx(np.log(2))
    logits = torch.tensor([[[[5.0, 5.0]], [[0.0, 0.0]]]])  # (1, 2, 1, 2): class 0 wins by 5
    target = torch.tensor([[[0, 255]]])
    assert aux.loss_seg(logits, target).item() == pytest.approx(np.log(1 + np.exp(-5.0)), rel=1e-5)
    z, y = torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 0.0]])
    assert aux.loss_cls(z, y).item() == pytest.approx((np.log(2) + np.log(1 + np.e ** 2)) / 2, rel=1e-5)


def test_total_loss_weights_each_term():
    a = aux.Args(lambda_cls=2.0, lambda_sal=3.0, lambda_seg=5.0)
    for key, w in dict(cls=2.0, sal1=3.0, sal2=3.0, seg1=5.0, seg2=5.0).items():
        assert aux.total_loss({key: torch.tensor(1.0)}, a).item() == pytest.approx(w), key
    parts = {k: torch.tensor(v) for k, v in dict(cls=1.0, sal1=10.0, sal2=100.0, seg1=1e3, seg2=1e4).items()}
    assert aux.total_loss(parts, a).item() == pytest.approx(2 + 3 * 110 + 5 * 11000)


def test_paper_defaults_of_weights_and_thresholds():
    a = aux.Args()
    assert (a.lambda_cls, a.lambda_sal, a.lambda_seg) == (1.0, 1.0, 1.0)
    assert (a.cam_thresh, a.sal_fuse_thresh, a.sal_bin_thresh) == (0.2, 0.06, 0.5)
    assert (a.tasks, a.affinity, a.ct_constraint, a.sal_crf) == ("auto", "auto", "seg+sal", True)
    assert aux.saliency_target(torch.tensor([0.5, 0.51])).tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------------------------------------
# Ablation switches: each removes exactly its term / module
# ----------------------------------------------------------------------------------------------------------
TERMS = {
    ("full", ()): {"cls", "sal1", "sal2", "seg1", "seg2"},
    ("mt_ct", ()): {"cls", "sal1", "sal2", "seg1", "seg2"},
    ("mt_ct", (("ct_constraint", "seg"),)): {"cls", "sal1", "seg1", "seg2"},
    ("mt_ct", (("affinity", "seg"),)): {"cls", "sal1", "seg1", "seg2"},
    ("mt", ()): {"cls", "sal1", "seg1"},
    ("mt", (("tasks", "seg+cls"),)): {"cls", "seg1"},
    ("mt", (("tasks", "seg+sal"),)): {"sal1", "seg1"},
    ("baseline", ()): {"seg1"},
}


@pytest.mark.parametrize("variant, flags", list(TERMS))
def test_switch_terms(variant, flags):
    model, args = tiny(variant, **dict(flags))
    model.eval()
    batch = make_batch()
    with torch.no_grad():
        out = model(batch["image"])
        parts = aux.stage_losses(out, batch, args)
    assert set(parts) == TERMS[(variant, flags)]
    # the remaining terms are the loss functions on the intended tensors
    B = aux.saliency_target(batch["sal"], args.sal_bin_thresh)
    expected = {"cls": lambda: aux.loss_cls(out["cls_logits"], batch["label"]),
                "sal1": lambda: aux.loss_sal(out["sal_init"], B, batch["sal_valid"]),
                "sal2": lambda: aux.loss_sal(out["sal_ref"], B, batch["sal_valid"]),
                "seg1": lambda: aux.loss_seg(out["seg_init"], batch["seg"]),
                "seg2": lambda: aux.loss_seg(out["seg_ref"], batch["seg"])}
    for k in parts:
        torch.testing.assert_close(parts[k], expected[k](), msg=k)


MODULES = {  # top-level modules and non-local parts of each configuration
    ("mt_ct", ()): {"fc8", "seg", "sal", "cross_att", "seg.theta", "sal.theta"},
    ("mt_ct", (("ct_constraint", "seg"),)): {"fc8", "seg", "sal", "cross_att", "seg.theta", "sal.theta"},
    ("mt_ct", (("affinity", "seg"),)): {"fc8", "seg", "sal", "seg.theta"},
    ("mt", ()): {"fc8", "seg", "sal"},
    ("mt", (("tasks", "seg+cls"),)): {"fc8", "seg"},
    ("mt", (("tasks", "seg+sal"),)): {"seg", "sal"},
    ("baseline", ()): {"seg"},
}


@pytest.mark.parametrize("variant, flags", list(MODULES))
def test_switch_modules(variant, flags):
    model, _ = tiny(variant, **dict(flags))
    have = {n for n in ("fc8", "seg", "sal", "cross_att") if hasattr(model, n)}
    have |= {f"{t}.theta" for t in ("seg", "sal") if hasattr(model, t) and hasattr(getattr(model, t), "theta")}
    assert have == MODULES[(variant, flags)]


def test_variant_config_mapping():
    cfg = lambda **f: aux.variant_config(aux.Args(**f))  # noqa: E731
    assert cfg() == (("cls", "sal", "seg"), "ct", ("seg", "sal"))
    assert cfg(variant="mt") == (("cls", "sal", "seg"), "none", ("seg", "sal"))
    assert cfg(variant="baseline")[:2] == (("seg",), "none")
    assert set(cfg(variant="mt", tasks="seg+cls")[0]) == {"seg", "cls"}
    assert set(cfg(variant="mt", tasks="seg+sal")[0]) == {"seg", "sal"}
    assert cfg(variant="mt_ct", affinity="seg")[1:] == ("seg", ("seg",))
    assert cfg(variant="mt_ct", ct_constraint="seg") == (("cls", "sal", "seg"), "ct", ("seg",))


@pytest.mark.parametrize("argv", [["--tasks", "seg+cls"], ["--variant", "full", "--affinity", "seg"],
                                  ["--variant", "mt", "--ct-constraint", "seg"],
                                  ["--variant", "mt_ct", "--affinity", "seg", "--ct-constraint", "seg"]])
def test_switch_needs_its_variant(argv, toy_root, capsys):
    a, _ = aux.parse_args(["--data", str(toy_root), *argv])
    with pytest.raises(SystemExit) as e:
        aux.validate(a)
    assert e.value.code == 2 and "paper" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Forward: which branch's features / affinity feed which output
# ----------------------------------------------------------------------------------------------------------
def branch_reference(model, x):
    feats = model.backbone(x)[-1]
    X = {t: getattr(model, t).features(feats) for t in ("seg", "sal") if hasattr(model, t)}
    return feats, X


@pytest.mark.parametrize("flags", [{}, {"ct_constraint": "seg"}])
def test_forward_ct_wiring(flags):
    model, _ = tiny("mt_ct", **flags)
    model.train()  # dropout active: the CAM must come from the un-dropped features
    x = make_batch()["image"]
    torch.manual_seed(5)
    with torch.no_grad():
        out = model(x)
        feats, X = branch_reference(model, x)
        A = {t: aux.task_affinity(getattr(model, t).theta(X[t]).flatten(2), getattr(model, t).phi(X[t]).flatten(2))
             for t in X}
        S = {t: getattr(model, t).predict(getattr(model, t).enhance(X[t], A[t])) for t in X}
        A_ct, omega = model.cross_att(A["seg"], A["sal"])
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
    close(out["cam"], F.conv2d(feats, model.fc8.weight))
    for t in ("seg", "sal"):
        close(out[f"A_{t}"], A[t])
        close(out[f"{t}_init"], S[t])
    close(out["A_ct"], A_ct)
    close(out["omega"], omega)
    close(out["seg_ref"], aux.refine_by_affinity(A_ct, S["seg"]))
    if flags:  # --ct-constraint seg: A_CT refines S_seg only
        assert torch.equal(out["sal_ref"], out["sal_init"])
    else:
        close(out["sal_ref"], aux.refine_by_affinity(A_ct, S["sal"]))
    assert not torch.allclose(out["A_seg"], out["A_sal"]) and not torch.allclose(A_ct, A["seg"])


def test_forward_cls_logits_use_dropout_then_gap():
    model, _ = tiny("mt_ct")
    model.eval()
    x = make_batch()["image"]
    with torch.no_grad():
        out = model(x)
        feats = model.backbone(x)[-1]
    torch.testing.assert_close(out["cls_logits"], model.fc8(feats.mean((2, 3), keepdim=True)).flatten(1),
                               rtol=1e-4, atol=1e-5)
    model.train()  # Dropout2d acts on the features before the pooling in training (same random draw below)
    torch.manual_seed(3)
    with torch.no_grad():
        z_train = model(x)["cls_logits"]
        feats = model.backbone(x)[-1]
        torch.manual_seed(3)
        dropped = model.dropout7(feats)
    torch.testing.assert_close(z_train, model.fc8(dropped.mean((2, 3), keepdim=True)).flatten(1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(z_train, model.fc8(feats.mean((2, 3), keepdim=True)).flatten(1), rtol=1e-4, atol=1e-5)


def test_enhance_gathers_with_affinity_rows():
    """Eq. (C4) with a non-symmetric A: Y(i) = X(i) + W(sum_j A[i, j] G(X)(j)), G = W = identity."""
    branch = aux.DenseBranch(4, 1, 2, (1, 1, 1), non_local=True)
    with torch.no_grad():
        for conv in (branch.g, branch.W):
            conv.weight.fill_(1.0)
            conv.bias.zero_()
    X = torch.tensor([[[[1.0, 10.0]]]])  # (1, 1, 1, 2)
    A = torch.tensor([[[1.0, 0.0], [0.5, 0.5]]])
    Y = branch.enhance(X, A)
    torch.testing.assert_close(Y, torch.tensor([[[[1.0 + 1.0, 10.0 + 5.5]]]]))


def test_forward_seg_affinity_wiring():
    model, _ = tiny("mt_ct", affinity="seg")
    model.eval()
    x = make_batch()["image"]
    with torch.no_grad():
        out = model(x)
        _, X = branch_reference(model, x)
        A = aux.task_affinity(model.seg.theta(X["seg"]).flatten(2), model.seg.phi(X["seg"]).flatten(2))
        S_seg = model.seg.predict(model.seg.enhance(X["seg"], A))
    assert "A_ct" not in out and "A_sal" not in out
    torch.testing.assert_close(out["A_seg"], A)
    torch.testing.assert_close(out["seg_init"], S_seg, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["seg_ref"], aux.refine_by_affinity(A, S_seg), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["sal_init"], model.sal.predict(X["sal"]), rtol=1e-4, atol=1e-5)
    assert torch.equal(out["sal_ref"], out["sal_init"])


def test_forward_mt_wiring():
    model, _ = tiny("mt")
    model.eval()
    x = make_batch()["image"]
    with torch.no_grad():
        out = model(x)
        _, X = branch_reference(model, x)
    for t in ("seg", "sal"):
        torch.testing.assert_close(out[f"{t}_init"], getattr(model, t).predict(X[t]), rtol=1e-4, atol=1e-5)
        assert torch.equal(out[f"{t}_ref"], out[f"{t}_init"])


# ----------------------------------------------------------------------------------------------------------
# Gradients: no detach anywhere; each term reaches exactly its modules
# ----------------------------------------------------------------------------------------------------------
def reached(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    names = set()
    for n, p in model.named_parameters():
        if p.grad is not None and p.grad.abs().sum() > 0:
            parts = n.split(".")
            names.add(parts[0] if parts[0] in ("backbone", "fc8") else ".".join(parts[:2]))
    return names


BRANCH = ("conv1", "conv2", "theta", "phi", "g", "W", "conv3", "conv4")
AFF = ("conv1", "conv2", "theta", "phi")  # what an affinity A_t depends on
REACH = {
    "cls": {"backbone", "fc8"},
    "sal1": {"backbone"} | {f"sal.{m}" for m in BRANCH},
    "sal2": {"backbone", "cross_att.conv1", "cross_att.conv2"} | {f"sal.{m}" for m in BRANCH} | {f"seg.{m}" for m in AFF},
    "seg1": {"backbone"} | {f"seg.{m}" for m in BRANCH},
    "seg2": {"backbone", "cross_att.conv1", "cross_att.conv2"} | {f"seg.{m}" for m in BRANCH} | {f"sal.{m}" for m in AFF},
}


@pytest.mark.parametrize("term", list(REACH))
def test_gradient_reach_per_term(term):
    model, args = tiny("mt_ct")
    model.train()
    batch = make_batch()
    parts = aux.stage_losses(model(batch["image"]), batch, args)
    assert reached(model, parts[term]) == REACH[term]


def test_gradient_reach_seg_affinity_row():
    model, args = tiny("mt_ct", affinity="seg")
    model.train()
    batch = make_batch()
    parts = aux.stage_losses(model(batch["image"]), batch, args)
    assert reached(model, parts["seg2"]) == {"backbone"} | {f"seg.{m}" for m in BRANCH}


def test_param_groups_split_heads_and_base():
    """param_groups (official get_10x_lr_params) and build_optimizer: the 10x group holds exactly the fc8 / seg / sal
    parameters; the backbone and the SA module (cross_att) are in the 1x group; every trainable parameter is in
    exactly one group. Catches: cross_att dropped from the base group (the SA module never trained) or moved to the
    10x group, a head left out of (or added to) the 10x group, the two groups handed to SGD swapped."""
    model, _ = tiny("mt_ct")
    base, heads = model.param_groups()
    top = {id(p): n.split(".")[0] for n, p in model.named_parameters()}
    assert {top[id(p)] for p in heads} == {"fc8", "seg", "sal"}
    assert {top[id(p)] for p in base} == {"backbone", "cross_att"}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(map(id, base + heads)) == sorted(map(id, trainable))  # all of them, each once
    opt = aux.build_optimizer(model, 0.01, 10.0, 0.0, 0.0)
    g1, g10 = opt.param_groups
    assert [id(p) for p in g1["params"]] == [id(p) for p in base] and g1["lr"] == pytest.approx(0.01)
    assert [id(p) for p in g10["params"]] == [id(p) for p in heads] and g10["lr"] == pytest.approx(0.1)


def test_frozen_bn_stays_in_eval_mode_and_untrained():
    """--freeze-bn (official network/resnet38d.py `train`): model.train() leaves every backbone BatchNorm in eval
    mode (running statistics untouched by a training forward), with no gradient and in no optimizer group, while the
    rest of the network (dropout, heads) is in training mode. Catches: the frozen BN switched to train mode with the
    rest (m.train(mode)), frozen_bn() returning nothing when --freeze-bn is set, the heads left in eval mode."""
    torch.manual_seed(0)
    args = aux.Args(variant="mt_ct", backbone="resnet10t", pretrained=False, freeze_bn=True, head_dim=8,
                    dilations=(1, 1, 1))
    model = aux.build_model(args, NC, "stage")
    bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns
    model.eval()
    model.train()
    assert all(not m.training for m in bns)
    assert model.training and model.dropout7.training and model.seg.training and model.cross_att.training
    stats = [m.running_mean.clone() for m in bns]
    with torch.no_grad():
        model(make_batch()["image"])
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, stats))
    frozen = {id(p) for m in bns for p in m.parameters()}
    assert frozen and all(not p.requires_grad for m in bns for p in m.parameters())
    base, heads = model.param_groups()
    assert not frozen & {id(p) for p in base + heads}


def test_train_step_wiring(monkeypatch):
    """train_step: net(batch image) -> stage_losses -> Eq. (C10) -> zero_grad, backward, one SGD step."""
    model, args = tiny("mt_ct", lambda_cls=0.5, lambda_sal=2.0, lambda_seg=3.0)
    model.eval()  # deterministic forward (no dropout) to recompute the gradient
    batch = make_batch()
    seen = []
    net = lambda x: (seen.append(x), model(x))[1]  # noqa: E731
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # stale gradients must be cleared
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref = aux.stage_losses(model(batch["image"]), batch, args)
    total = 0.5 * ref["cls"] + 2.0 * (ref["sal1"] + ref["sal2"]) + 3.0 * (ref["seg1"] + ref["seg2"])
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(total, list(model.parameters()), allow_unused=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    log = aux.train_step(net, batch, 0, args, opt, lambda: torch.autocast("cpu", enabled=False))
    assert len(seen) == 1 and seen[0] is batch["image"]
    assert log["losses/total"] == pytest.approx(total.item(), rel=1e-5)
    for k in ref:
        assert log[f"losses/{k}"] == pytest.approx(ref[k].item(), rel=1e-5)
    for n, p, g in zip(names, model.parameters(), grads):
        g = torch.zeros_like(p) if g is None else g
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * g, rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------------------
# Label update (after a stage): a transcription of the official step/gen_pgt.py
# ----------------------------------------------------------------------------------------------------------
def stub_update_out(h=4, w=5, seed=2):
    g = torch.Generator().manual_seed(seed)
    N = h * w
    sal_ref = 8 * torch.sign(torch.randn(1, 1, h, w, generator=g))  # sharp logits: the sigmoid order matters
    return {"cam": 3 * torch.randn(1, NC - 1, h, w, generator=g), "A_ct": torch.softmax(2 * torch.randn(1, N, N, generator=g), -1),
            "A_seg": torch.softmax(torch.randn(1, N, N, generator=g), -1),
            "A_sal": torch.softmax(torch.randn(1, N, N, generator=g), -1), "sal_ref": sal_ref,
            "sal_init": torch.randn(1, 1, h, w, generator=g), "seg_ref": torch.randn(1, NC, h, w, generator=g),
            "seg_init": torch.randn(1, NC, h, w, generator=g), "cls_logits": torch.randn(1, NC - 1, generator=g)}


def gen_pgt_reference(out, sal0, H, W):
    """step/gen_pgt.py, transcribed: normalised CAM, matmul with ct_aff, upsample; sigmoid then upsample of the
    refined saliency logits; average with the initial saliency map (then crf_for_sal, then fusion_cam)."""
    cam = F.relu(out["cam"].clone())
    cam = cam / (torch.max(torch.max(cam, dim=2, keepdim=True)[0], dim=3, keepdim=True)[0] + 1e-5)
    refined = cam.view(cam.size(0), cam.size(1), -1).permute(0, 2, 1).contiguous()
    refined = torch.matmul(out["A_ct"], refined)
    refined = refined.permute(0, 2, 1).contiguous().view(*cam.size())
    refined = F.interpolate(refined, size=(H, W), mode="bilinear", align_corners=False)
    ref_sal = F.interpolate(torch.sigmoid(out["sal_ref"]), size=(H, W), mode="bilinear", align_corners=False)
    fused = (ref_sal.numpy().squeeze() + sal0) / 2
    return refined[0].numpy(), fused


@pytest.mark.parametrize("sal_crf", [True, False])
def test_update_maps_matches_gen_pgt(monkeypatch, sal_crf):
    H, W = 32, 40
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    sal0 = rng.random((H, W)).astype(np.float32)
    out = stub_update_out()
    seen = []
    model = lambda x: (seen.append(x), out)[1]  # noqa: E731
    crf_calls = Recorder(monkeypatch, "saliency_crf", ret=lambda img, a, **k: (a ** 2).astype(np.float32))
    M, sal = aux.update_maps(model, image, sal0, aux.Args(sal_crf=sal_crf), torch.device("cpu"))
    torch.testing.assert_close(seen[0], aux.image_tensor(image, "cpu"))
    M_ref, a_ref = gen_pgt_reference(out, sal0, H, W)
    np.testing.assert_allclose(M, M_ref, rtol=1e-5, atol=1e-6)
    if sal_crf:
        (img, a), _ = crf_calls.calls[0]
        assert img is image or np.array_equal(img, image)
        np.testing.assert_allclose(a, a_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(sal, a_ref ** 2, rtol=1e-5, atol=1e-6)
    else:
        assert not crf_calls.calls
        np.testing.assert_allclose(sal, a_ref, rtol=1e-5, atol=1e-6)


def test_update_maps_sigmoid_before_upsampling():
    """The review's C13a case: with sharp logits the two orders differ at edges; the official order is used."""
    H, W = 32, 40
    out = stub_update_out()
    sal0 = np.zeros((H, W), np.float32)
    _, sal = aux.update_maps(lambda x: out, np.zeros((H, W, 3), np.uint8), sal0, aux.Args(sal_crf=False), "cpu")
    wrong = 0.5 * torch.sigmoid(F.interpolate(out["sal_ref"], size=(H, W), mode="bilinear", align_corners=False))[0, 0]
    assert np.abs(sal - wrong.numpy()).max() > 0.05
    _, a_ref = gen_pgt_reference(out, sal0, H, W)
    np.testing.assert_allclose(sal, a_ref, rtol=1e-5, atol=1e-6)


def test_stage0_cams_wiring():
    """Stage 0: ReLU CAMs of every scale (and flip, flipped back) upsampled to the image, summed, normalised."""
    H, W = 24, 32
    image = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(NC - 1, 3, 1, 1, generator=g)

    def model(x):  # a CAM that depends on the input (so flips and scales matter)
        return {"cam": F.conv2d(F.avg_pool2d(x, 4), weight), "A_ct": None}

    args = aux.Args(cam_scales=(1.0, 0.5), cam_flip=True)
    got = aux.stage0_cams(model, image, args, "cpu")
    acc = 0
    for s in (1.0, 0.5):
        x = aux.image_tensor(image if s == 1.0 else augment.rescale(image, s)[0], "cpu")
        c = F.relu(model(x)["cam"]) + F.relu(model(x.flip(-1))["cam"]).flip(-1)
        acc = acc + F.interpolate(c, size=(H, W), mode="bilinear", align_corners=False)
    ref = acc / (acc.flatten(2).max(-1).values[..., None, None] + 1e-5)
    np.testing.assert_allclose(got, ref[0].numpy(), rtol=1e-5, atol=1e-6)


def test_pseudo_label_maps_routes_each_stage(monkeypatch):
    H, W = 8, 8
    image = np.zeros((H, W, 3), np.uint8)
    sal0 = np.full((H, W), 0.3, np.float32)
    cams0, cams1 = (np.full((NC - 1, H, W), v, np.float32) for v in (0.1, 0.9))
    sal1 = np.full((H, W), 0.8, np.float32)
    st = Recorder(monkeypatch, "stage0_cams", ret=lambda *a: cams0)
    up = Recorder(monkeypatch, "update_maps", ret=lambda *a: (cams1, sal1))
    fuse = Recorder(monkeypatch, "fuse_cam_saliency", ret=lambda *a, **k: np.zeros((H, W), np.uint8))
    args = aux.Args(cam_thresh=0.33, sal_fuse_thresh=0.11)
    label = np.array([0, 1, 1])
    model = object()
    aux.pseudo_label_maps(model, image, sal0, label, 0, args, "cpu")
    assert st.calls[0][0][:3] == (model, image, args) and not up.calls
    a, k = fuse.calls[-1]
    assert a[0] is cams0 and a[1] is sal0 and a[2] is label and (*a[3:], *k.values()) == (0.33, 0.11)
    _, sal, _ = aux.pseudo_label_maps(model, image, sal0, label, 2, args, "cpu")
    assert up.calls[0][0][:4] == (model, image, sal0, args) and len(st.calls) == 1
    a, k = fuse.calls[-1]
    assert a[0] is cams1 and a[1] is sal1 and sal is sal1 and (*a[3:], *k.values()) == (0.33, 0.11)


def test_fusion_uses_given_thresholds():
    cams = np.array([[[0.3, 0.3, 0.1, 0.1]]], np.float32)
    sal = np.array([[0.1, 0.05, 0.1, 0.05]], np.float32)
    assert aux.fuse_cam_saliency(cams, sal, np.array([1])).tolist() == [[1, 255, 255, 0]]
    assert aux.fuse_cam_saliency(cams, sal, np.array([1]), 0.35, 0.08).tolist() == [[255, 0, 255, 0]]
    assert aux.fuse_cam_saliency(cams, sal, np.array([1]), 0.05, 0.01).tolist() == [[1, 1, 1, 1]]


def test_fusion_only_present_classes_compete():
    """Eq. (C14): the argmax runs over the image's present classes only; an absent class with the stronger CAM neither
    wins a pixel nor makes one 'object'. Catches: the label mask dropped or widened (label >= 0, every class kept),
    or inverted (absent classes kept), or the class index off by one (k instead of k + 1)."""
    cams = np.array([[[0.9, 0.9, 0.1]], [[0.5, 0.1, 0.1]], [[0.3, 0.05, 0.0]]], np.float32)  # (3, 1, 3)
    sal = np.array([[0.5, 0.5, 0.5]], np.float32)
    # class 0 absent: pixel 0 -> class 1 (label 2); pixel 1: present max 0.1 < 0.2 but salient -> 255
    assert aux.fuse_cam_saliency(cams, sal, np.array([0, 1, 1])).tolist() == [[2, 255, 255]]
    assert aux.fuse_cam_saliency(cams, sal, np.array([1, 0, 1])).tolist() == [[1, 1, 255]]


# ----------------------------------------------------------------------------------------------------------
# Pseudo-label quality (Deviation 15)
# ----------------------------------------------------------------------------------------------------------
def test_label_quality_counts_ignored_pixels():
    gt = np.array([[0, 0, 1, 1], [1, 1, 255, 2]])
    pgt = np.array([[0, 255, 1, 0], [255, 1, 1, 2]])
    m = aux.label_quality_update(np.zeros((3, 4), np.int64), pgt, gt)
    q = aux.label_quality(m)
    # class 0: tp 1, gt 2, pred 2 -> P 1/2, R 1/2, IoU 1/3; class 1: tp 2, gt 4 (one ignored), pred 2 -> P 1, R 1/2,
    # IoU 1/2; class 2: all right
    np.testing.assert_allclose(q["precision"], [0.5, 1.0, 1.0])
    np.testing.assert_allclose(q["recall"], [0.5, 0.5, 1.0])
    np.testing.assert_allclose(q["iou"], [1 / 3, 0.5, 1.0])
    assert q["miou"] == pytest.approx((1 / 3 + 0.5 + 1) / 3)
    assert q["mean_precision"] == pytest.approx(2.5 / 3) and q["mean_recall"] == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------------------
# Stage drivers: which weights, labels, saliency and optimiser settings each stage gets
# ----------------------------------------------------------------------------------------------------------
class FakeCtx:
    def __init__(self, args, root, run_dir, weights):
        spec = data.resolve_data(str(root))
        self.args, self.spec, self.splits, self.run_dir = args, spec, data.default_splits(spec), run_dir
        self.main, self.rank, self.world, self.device = True, 0, 1, torch.device("cpu")
        self.weights_of, self.asked, self.finished, self.logged = weights, [], [], []

    def reseed(self, salt):
        torch.manual_seed(salt)

    def stage_weights(self, stage):
        self.asked.append(stage)
        return {"model": self.weights_of[stage]}

    def check_signal(self, where):
        pass

    def log(self, record, echo=False):
        self.logged.append(record)

    def finish_stage(self, stage, results=None, weights=None, final=False, **facts):
        self.finished.append(dict(stage=stage, results=results, weights=weights, final=final))

    def wrap(self, model):
        return model

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def tiny_args(**kw):
    return aux.Args(**{**dict(backbone="resnet10t", pretrained=False, freeze_bn=False, head_dim=8, dilations=(1, 1, 1),
                              workers=0, num_vis=0, crop_size=32, cls_crop_size=24), **kw})


def weights_for(args, kind, seed):
    torch.manual_seed(seed)
    return aux.build_model(args, 7, kind).state_dict()


@pytest.mark.parametrize("s", [0, 1, 2])
def test_make_pseudo_labels_wiring(s, toy_root, tmp_path, monkeypatch):
    args = tiny_args(variant="full", num_stages=3)
    weights = {"cls": weights_for(args, "cls", 1), "stage0": weights_for(args, "stage", 2),
               "stage1": weights_for(args, "stage", 3)}
    ctx = FakeCtx(args, toy_root, tmp_path, weights)
    calls = []

    def fake_maps(model, image, sal0, label, stage, a, device):
        calls.append(dict(model=model, sal0=sal0, stage=stage))
        mask = next(x["mask"] for x in samples if np.array_equal(x["image"], image))
        pgt = np.where(np.arange(mask.size).reshape(mask.shape) % 5 == 0, 255, mask).astype(np.uint8)
        return np.zeros((6,) + mask.shape, np.float32), np.full(mask.shape, 0.25, np.float32), pgt

    ds = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset)
    samples = [ds.load(i) for i in range(len(ds))]
    monkeypatch.setattr(aux, "pseudo_label_maps", fake_maps)
    aux.make_pseudo_labels(ctx, s, toy_root / "saliency")
    assert ctx.asked == ["cls" if s == 0 else f"stage{s - 1}"]
    model = calls[0]["model"]
    assert not model.training and all(c["stage"] == s for c in calls) and len(calls) == len(ds)
    assert hasattr(model, "fc8") and hasattr(model, "sal") == (s > 0)  # stage 0: the classifier; s > 0: stage s-1
    want = weights["cls" if s == 0 else f"stage{s - 1}"]
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    name = samples[0]["name"]
    np.testing.assert_allclose(calls[0]["sal0"], aux.read_saliency(toy_root / "saliency" / f"{name}.png",
                                                                   samples[0]["image"].shape[:2]))
    written = data.read_mask(tmp_path / "pseudo_labels" / str(s) / "train" / f"{name}.png")
    assert (written == 255).any() and np.array_equal(written[written != 255], samples[0]["mask"][written != 255])
    sal_png = tmp_path / "pseudo_labels" / str(s) / "train_saliency" / f"{name}.png"
    assert sal_png.is_file() == (s > 0)
    if s > 0:
        assert np.all(np.asarray(Image.open(sal_png)) == 64)  # rint(0.25 * 255)
    (fin,) = ctx.finished
    assert fin["stage"] == f"labels{s}"
    res = fin["results"]
    assert res[f"pseudo_s{s}/train"]["miou"] == 100.0 and res["pseudo/train"] is res[f"pseudo_s{s}/train"]
    pr = res[f"pseudo_pr_s{s}/train"]
    assert res["pseudo_pr/train"] is pr  # the paper's form for the latest labels too
    assert pr["precision"] == 100.0 and 70 < pr["recall"] < 90 and pr["miou"] == pytest.approx(pr["recall"], abs=1e-6)
    assert ("cam/train" in res) == (s == 0)


@pytest.mark.parametrize("s", [0, 1, 2])
def test_train_stage_wiring(s, toy_root, tmp_path, monkeypatch):
    """Stage s asks for the right weights (cls at s = 0, stage s - 1 after) and loads them (s = 0: backbone + fc8 only;
    s = 1 included, so `if s > 1` / a stage-0 start skipped at stage 1 is caught), its optimiser groups and schedule,
    its labels and saliency folders, and hands the step (model, batch, it, args, optimizer) to train_step."""
    args = tiny_args(variant="full", num_stages=4, lr=0.003, head_lr_mult=7.0, momentum=0.4, weight_decay=0.01,
                     batch_size=4, epochs_per_stage=2, poly_power=0.7)
    weights = {"cls": weights_for(args, "cls", 1), "stage0": weights_for(args, "stage", 2),
               "stage1": weights_for(args, "stage", 3)}
    ctx = FakeCtx(args, toy_root, tmp_path, weights)
    for d in ("train", "train_saliency"):
        (tmp_path / "pseudo_labels" / str(s) / d).mkdir(parents=True)
    seen = {}

    def fake_loop(ctx_, stage, ds, batch_size, total, step, modules, lr=None, salt=0, indices=None):
        seen.update(stage=stage, ds=ds, batch_size=batch_size, total=total, step=step, modules=modules, lr=lr)

    monkeypatch.setattr(aux, "train_loop", fake_loop)
    monkeypatch.setattr(aux, "evaluate", lambda ctx_, model, ds, post=True, vis_path=None: {"seg/val": {"miou": 1.0}})
    steps = Recorder(monkeypatch, "train_step", ret=lambda *a, **k: {})
    aux.train_stage(ctx, s, toy_root / "saliency")
    assert ctx.asked == ["cls" if s == 0 else f"stage{s - 1}"]
    model, opt = seen["modules"]["model"], seen["modules"]["optimizer"]
    state = model.state_dict()
    if s == 0:  # backbone + classifier from pre-training; the dense heads stay random
        assert all(torch.equal(state[k], v) for k, v in weights["cls"].items())
        assert not torch.equal(state["seg.conv4.weight"], weights["stage0"]["seg.conv4.weight"])
    else:
        assert all(torch.equal(state[k], v) for k, v in weights[f"stage{s - 1}"].items())
    base, heads = opt.param_groups
    assert (base["lr"], heads["lr"], base["momentum"], base["weight_decay"]) == pytest.approx((0.003, 0.021, 0.4, 0.01))
    assert seen["stage"] == f"stage{s}" and seen["batch_size"] == 4
    ds = seen["ds"]
    assert seen["total"] == 2 * (len(ds) // 4)
    assert seen["lr"](3) == pytest.approx(aux.poly_lr(3, seen["total"], 0.7))
    assert ds.extra_dirs["seg"] == tmp_path / "pseudo_labels" / str(s) / "train"
    assert ds.saliency_dir == (toy_root / "saliency" if s == 0 else tmp_path / "pseudo_labels" / str(s) / "train_saliency")
    batch = {"image": torch.zeros(1)}
    seen["step"](batch, 5)
    (a, _), = steps.calls
    assert a[0] is model and a[1] is batch and a[2] == 5 and a[3] is args and a[4] is opt
    (fin,) = ctx.finished
    assert fin["stage"] == f"stage{s}" and not fin["final"] and f"seg_s{s}/val" in fin["results"]
    assert fin["weights"]["model"] is not None


def test_train_cls_wiring(toy_root, tmp_path, monkeypatch):
    args = tiny_args(cls_lr=0.02, head_lr_mult=4.0, cls_momentum=0.3, cls_weight_decay=0.002, cls_batch_size=4,
                     epochs_cls=3)
    ctx = FakeCtx(args, toy_root, tmp_path, {})
    seen = {}

    def fake_loop(ctx_, stage, ds, batch_size, total, step, modules, lr=None, salt=0, indices=None):
        seen.update(stage=stage, ds=ds, batch_size=batch_size, total=total, step=step, modules=modules, lr=lr)

    monkeypatch.setattr(aux, "train_loop", fake_loop)
    torch.manual_seed(0)
    model = aux.build_model(args, 7, "cls")
    aux.train_cls(ctx, model)
    opt = seen["modules"]["optimizer"]
    base, heads = opt.param_groups
    assert (base["lr"], heads["lr"], base["momentum"], base["weight_decay"]) == pytest.approx((0.02, 0.08, 0.3, 0.002))
    assert seen["batch_size"] == 4 and seen["total"] == 3 * (len(seen["ds"]) // 4)
    assert seen["ds"][0]["image"].shape[-2:] == (24, 24)  # --cls-crop-size
    rec = Recorder(monkeypatch, "loss_cls")
    batch = {"image": torch.randn(2, 3, 24, 24), "label": torch.tensor([[1.0, 0, 0, 0, 0, 1], [0, 1.0, 0, 0, 0, 0]])}
    model.eval()
    log = seen["step"](batch, 0)
    (a, _), = rec.calls
    assert a[0].shape == (2, 6) and same(a[1], batch["label"]) and set(log) == {"losses/cls", "losses/total"}
    assert ctx.finished[0]["stage"] == "cls"


def test_stage_iters_counts_full_batches_and_caps():
    """A stage runs epochs x floor(n / batch) iterations (drop_last; Deviation 17), capped by --max-iters
    (Deviation 9). 27 images, batch 4, 3 epochs: 3 x 6 = 18. Catches: epochs * n // batch (20), a ceil (21), the
    cap ignored or applied as a floor, the epochs dropped."""
    a = aux.Args()
    assert aux.stage_iters(a, 27, 4, 3) == 18  # epochs * n // batch would give 20, ceil 21
    assert aux.stage_iters(a, 27, 4, 1) == 6
    assert aux.stage_iters(aux.Args(max_iters=5), 27, 4, 3) == 5
    assert aux.stage_iters(aux.Args(max_iters=50), 27, 4, 3) == 18


def record_loop(monkeypatch):
    """A train_loop that records its arguments and the network's training mode when the loop starts."""
    seen = {}

    def fake_loop(ctx_, stage, ds, batch_size, total, step, modules, lr=None, salt=0, indices=None):
        seen.update(stage=stage, ds=ds, batch_size=batch_size, total=total, step=step, modules=modules, lr=lr,
                    training=modules["model"].training)

    monkeypatch.setattr(aux, "train_loop", fake_loop)
    return seen


def test_train_cls_schedule_and_train_mode(toy_root, tmp_path, monkeypatch):
    """Pre-training runs in train mode (dropout on; the model comes in eval mode, as after an evaluation), on
    --cls-batch-size batches (here != --batch-size) for --epochs-cls epochs with the poly factor of --poly-power.
    Catches: ctx.wrap(model).eval(); --batch-size used for the iteration count or the loader; the poly schedule
    dropped (lr=None) or its power fixed at 0.9."""
    args = tiny_args(cls_batch_size=2, batch_size=6, epochs_cls=2, poly_power=0.6)
    ctx = FakeCtx(args, toy_root, tmp_path, {})
    seen = record_loop(monkeypatch)
    torch.manual_seed(0)
    model = aux.build_model(args, 7, "cls").eval()
    aux.train_cls(ctx, model)
    assert seen["stage"] == "cls" and seen["training"] and seen["modules"]["model"] is model
    assert seen["batch_size"] == 2 and seen["total"] == 2 * (len(seen["ds"]) // 2)
    assert seen["lr"] is not None
    for it in (0, 3, 7):
        assert seen["lr"](it) == pytest.approx(aux.poly_lr(it, seen["total"], 0.6))
    assert seen["lr"](3) != pytest.approx(aux.poly_lr(3, seen["total"], 0.9))


def test_train_cls_step_uses_dropout_logits_and_steps(toy_root, tmp_path, monkeypatch):
    """The pre-training step: L_cls of cls_logits (dropout then GAP then fc8, as in training) against the image
    label, one SGD step on its gradient (here lr 0.08 on fc8: cls_lr x head_lr_mult, weight decay 0.002).
    Catches: the CAM's spatial mean (the un-dropped features) used as the logits, the label of another key, no
    backward / no optimizer.step / zero_grad after backward."""
    args = tiny_args(cls_lr=0.02, head_lr_mult=4.0, cls_momentum=0.0, cls_weight_decay=0.002, cls_batch_size=2)
    ctx = FakeCtx(args, toy_root, tmp_path, {})
    seen = record_loop(monkeypatch)
    torch.manual_seed(0)
    model = aux.build_model(args, 7, "cls")
    aux.train_cls(ctx, model)
    model.train()
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(2, 3, 24, 24, generator=g),
             "label": torch.tensor([[1.0, 0, 0, 0, 0, 1], [0, 1.0, 0, 0, 0, 0]])}
    torch.manual_seed(3)
    out = model(batch["image"])
    ref = aux.loss_cls(out["cls_logits"], batch["label"])
    undropped = aux.loss_cls(out["cam"].mean((2, 3)), batch["label"])
    assert abs(ref.item() - undropped.item()) > 1e-3  # the dropout draw matters
    w0 = model.fc8.weight.detach().clone()
    (grad,) = torch.autograd.grad(ref, model.fc8.weight)
    for p in model.parameters():
        p.grad = torch.full_like(p, 5.0)  # stale gradients must be cleared
    rec = Recorder(monkeypatch, "loss_cls")
    torch.manual_seed(3)
    log = seen["step"](batch, 0)
    (a, _), = rec.calls
    torch.testing.assert_close(a[0].detach(), out["cls_logits"].detach(), rtol=1e-4, atol=1e-5)
    assert same(a[1], batch["label"])
    assert log["losses/cls"] == pytest.approx(ref.item(), rel=1e-5) and log["losses/total"] == log["losses/cls"]
    torch.testing.assert_close(model.fc8.weight.detach(), w0 - 0.08 * (grad + 0.002 * w0), rtol=1e-4, atol=1e-6)


def test_train_stage_runs_in_train_mode(toy_root, tmp_path, monkeypatch):
    """A stage trains its network in train mode (dropout, batch statistics). Catches: ctx.wrap(model).eval()."""
    args = tiny_args(variant="full", num_stages=2, batch_size=4)
    ctx = FakeCtx(args, toy_root, tmp_path, {"cls": weights_for(args, "cls", 1)})
    (tmp_path / "pseudo_labels" / "0" / "train").mkdir(parents=True)
    seen = record_loop(monkeypatch)
    monkeypatch.setattr(aux, "evaluate", lambda ctx_, model, ds, post=True, vis_path=None: {"seg/val": {"miou": 1.0}})
    modes = []
    monkeypatch.setattr(aux, "train_step", lambda net, *a, **k: (modes.append(net.training), {})[1])
    aux.train_stage(ctx, 0, toy_root / "saliency")
    assert seen["stage"] == "stage0" and seen["training"]
    seen["step"]({"image": torch.zeros(1)}, 0)
    assert modes == [True]


@pytest.mark.parametrize("s", [0, 1])
def test_stage_dataset_reads_this_stages_labels_and_saliency(s, toy_root, tmp_path):
    """make_stage_dataset: the crops of stage s carry pseudo_labels/<s>/train (seg) and, as the saliency target,
    SAL_0 (the given folder) at s = 0 and pseudo_labels/<s>/train_saliency at s > 0, cropped at --crop-size.
    Constant maps (seg 1 / 2 per stage, saliency 33 for SAL_0, 55 / 77 in the stage folders) show which file was
    read. Catches: the transform given sal0_dir (or the stage's saliency folder) at every stage while the
    bookkeeping attribute is right, another stage's folder, --cls-crop-size used for the stage crops."""
    args = tiny_args(crop_size=40, cls_crop_size=24, scale_range=(1.0, 1.0))
    ctx = FakeCtx(args, toy_root, tmp_path / "run", {})
    first = data.SegDataset(ctx.spec.root, ctx.splits["train"], dataset=ctx.spec.dataset).load(0)  # what ds[0] reads
    name, shape = first["name"], first["image"].shape[:2]
    sal0_dir = tmp_path / "sal0"
    sal0_dir.mkdir()
    Image.fromarray(np.full(shape, 33, np.uint8)).save(sal0_dir / f"{name}.png")
    for stage, (seg_value, sal_value) in enumerate(((1, 55), (2, 77))):
        root = tmp_path / "run" / "pseudo_labels" / str(stage)
        (root / "train_saliency").mkdir(parents=True)
        data.save_mask(root / "train" / f"{name}.png", np.full(shape, seg_value, np.uint8))
        Image.fromarray(np.full(shape, sal_value, np.uint8)).save(root / "train_saliency" / f"{name}.png")
    ds = aux.make_stage_dataset(ctx, s, sal0_dir)
    out = ds[0]
    assert out["image"].shape[-2:] == (40, 40) and out["seg"].shape == out["sal"].shape == (40, 40)
    valid = out["sal_valid"] > 0
    assert valid.any()
    want_sal = 33 if s == 0 else 77
    np.testing.assert_allclose(out["sal"][valid].numpy(), want_sal / 255.0, atol=1e-6)
    assert (out["seg"][valid] == (1 if s == 0 else 2)).all()


def test_main_stage_order(toy_root, tmp_path, monkeypatch):
    """main: pre-training, then labels s before stage s for every s (stage 0's labels only under image supervision)."""
    order = []

    def fake_cls(ctx, model):
        order.append("cls")
        ctx.finish_stage("cls", weights={"model": model.state_dict()})

    def fake_labels(ctx, s, sal0_dir):
        order.append(f"labels{s}")
        assert sal0_dir == toy_root / "saliency"
        ctx.finish_stage(f"labels{s}")

    def fake_stage(ctx, s, sal0_dir):
        order.append(f"stage{s}")
        assert sal0_dir == toy_root / "saliency"
        model = aux.build_model(ctx.args, 7, "stage")
        ctx.finish_stage(f"stage{s}", weights={"model": model.state_dict()}, final=s == ctx.args.num_stages - 1)

    monkeypatch.setattr(aux, "train_cls", fake_cls)
    monkeypatch.setattr(aux, "make_pseudo_labels", fake_labels)
    monkeypatch.setattr(aux, "train_stage", fake_stage)
    monkeypatch.setattr(aux, "evaluate", lambda ctx, model, ds, post=True, vis_path=None: {"seg/val": {"miou": 1.0}})
    common = ["--data", str(toy_root), "--preset", "toy", "--workers", "0", "--head-dim", "8", "--no-sal-crf"]
    aux.main([*common, "--out", str(tmp_path / "a"), "--num-stages", "3"])
    assert order == ["cls", "labels0", "stage0", "labels1", "stage1", "labels2", "stage2"]
    order.clear()
    aux.main([*common, "--out", str(tmp_path / "b"), "--num-stages", "2", "--supervision", "full"])
    assert order == ["cls", "stage0", "labels1", "stage1"]


# ----------------------------------------------------------------------------------------------------------
# Inference: predict_probs (card §7) and evaluate's post-processing
# ----------------------------------------------------------------------------------------------------------
class StubSegNet:
    """seg_init / seg_ref: distinct, sharp (|logits| of several units) 1x1 convolutions of the 8x8-pooled input (the
    output stride 8; ceil mode: ceil(H/8) cells) plus a left-to-right ramp over the cells, so neither is
    flip-equivariant nor blind to where the cells fall, and the view order, the flip-back, the softmax and the
    padding matter."""

    def __init__(self, seed=6):
        g = torch.Generator().manual_seed(seed)
        self.w = {k: 4 * torch.randn(NC, 3, 1, 1, generator=g) for k in ("seg_init", "seg_ref")}
        self.ramp = {k: 3 * torch.randn(NC, 1, 1, generator=g) for k in ("seg_init", "seg_ref")}
        self.seen = []

    def __call__(self, x):
        self.seen.append(x)
        f = F.avg_pool2d(x, 8, ceil_mode=True)
        ramp = torch.linspace(-1, 1, f.shape[-1])
        return {k: F.conv2d(f, self.w[k]) + self.ramp[k] * ramp for k in self.w}


def probs_reference(model, image, scales, flip, key="seg_ref", softmax_views=True, flip_back=True, pad="flip-pad-crop"):
    """Hand-written card §7 inference with Deviation 18: per scale (and flipped view, mirrored back) the view padded
    at the bottom / right to a multiple of 8, the network's `key` logits upsampled x8 (bilinear), cropped to the view
    and resized to the image; the softmax of each view; the mean of all views. The switches build the wrong
    variants; `pad`: pad-then-flip (the mirror's padding at its left), no-pad (the unpadded view's logits stretched
    to the image, the official protocol), pad-left, stretch (the padded view's logits stretched to the image)."""
    H, W = image.shape[:2]
    views = []
    for s in scales:
        x = aux.image_tensor(image if s == 1.0 else augment.rescale(image, s)[0], "cpu")
        h, w = x.shape[2:]
        amount = {"pad-left": (-w % 8, 0, -h % 8, 0), "no-pad": (0, 0, 0, 0)}.get(pad, (0, -w % 8, 0, -h % 8))
        for flipped in (False, True) if flip else (False,):
            if pad == "pad-then-flip":
                v = F.pad(x, amount).flip(-1) if flipped else F.pad(x, amount)
            else:
                v = F.pad(x.flip(-1) if flipped else x, amount)
            cells = model(v)[key]
            if pad in ("no-pad", "stretch"):
                logits = F.interpolate(cells, size=(H, W), mode="bilinear", align_corners=False)[0]
            else:
                up = F.interpolate(cells, size=(8 * cells.shape[2], 8 * cells.shape[3]), mode="bilinear",
                                   align_corners=False)[:, :, :h, :w]
                logits = F.interpolate(up, size=(H, W), mode="bilinear", align_corners=False)[0]
            v = torch.softmax(logits, 0) if softmax_views else logits
            views.append(v.flip(-1) if flipped and flip_back else v)
    mean = torch.stack(views).mean(0)
    return (mean if softmax_views else torch.softmax(mean, 0)).numpy()


def test_predict_probs_refined_softmax_mean_over_views():
    """predict_probs = mean over scales x {image, flipped image mirrored back} of softmax(upsampled seg_ref logits), at
    image size. Catches: seg_init read instead of seg_ref; logits averaged (softmax after the mean, or none); the
    flipped view not mirrored back (or the wrong half mirrored); a scale dropped / scales ignored / 1/s used; the
    mean divided by the scales only (or the views only); no resize to the image / a wrong interpolation; the
    plain (unflipped) batch sent instead of [x, x.flip(-1)]."""
    H, W = 24, 32
    image = np.random.default_rng(3).integers(0, 256, (H, W, 3), dtype=np.uint8)
    model = StubSegNet()
    got = aux.predict_probs(model, image, "cpu", scales=(1.0, 0.5), flip=True)
    assert got.shape == (NC, H, W)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)
    # the network saw [x, x.flip(-1)] at each scale, the rescaled image at 0.5 (12 x 16, padded to 16 x 16)
    assert [tuple(x.shape) for x in model.seen] == [(2, 3, H, W), (2, 3, 16, W // 2)]
    for x, s in zip(model.seen, (1.0, 0.5)):
        ref_x = aux.image_tensor(image if s == 1.0 else augment.rescale(image, s)[0], "cpu")
        assert torch.equal(x, F.pad(torch.cat([ref_x, ref_x.flip(-1)]), (0, 0, 0, -ref_x.shape[2] % 8)))
    ref = probs_reference(model, image, (1.0, 0.5), True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # the fixture tells the wrong variants apart (each differs from the reference by far more than the tolerance)
    wrong = {"seg_init": probs_reference(model, image, (1.0, 0.5), True, key="seg_init"),
             "mean of logits": probs_reference(model, image, (1.0, 0.5), True, softmax_views=False),
             "no flip-back": probs_reference(model, image, (1.0, 0.5), True, flip_back=False),
             "scale 1 only": probs_reference(model, image, (1.0,), True),
             "no flip": probs_reference(model, image, (1.0, 0.5), False)}
    for name, w in wrong.items():
        assert np.abs(w - ref).max() > 0.05, name
    # defaults: one view, the plain image at scale 1, seg_ref
    model.seen.clear()
    one = aux.predict_probs(model, image, "cpu")
    assert len(model.seen) == 1 and torch.equal(model.seen[0], aux.image_tensor(image, "cpu"))
    np.testing.assert_allclose(one, probs_reference(model, image, (1.0,), False), rtol=1e-5, atol=1e-5)
    assert np.abs(one - probs_reference(model, image, (1.0,), False, key="seg_init")).max() > 0.05


@pytest.mark.parametrize("scales", [(1.0,), (1.0, 0.75)])
@pytest.mark.parametrize("flip", [False, True])
def test_predict_probs_flips_then_pads_each_view_to_the_stride_and_crops(scales, flip):
    """Deviation 18, on a 113 x 100 image: the network sees each view flipped first and then padded at the bottom /
    right to a multiple of 8 (120 x 104; at 0.75, 85 x 75 -> 88 x 80), and predict_probs = the hand-written
    reference (seg_ref upsampled x8, cropped to the view, resized, softmax, mirror flipped back, mean). Catches:
    padding before the flip (the mirror's padding at its left), no padding (the official stretch), padding at the
    top / left, the padded logits stretched instead of cropped, another multiple or upsampling factor than 8;
    each wrong variant differs from the reference by far more than the tolerance."""
    g = np.random.default_rng(5)
    image = np.kron(g.integers(0, 256, (17, 15, 3)), np.ones((7, 7, 1)))[:113, :100].astype(np.uint8)  # 7 px blocks
    model = StubSegNet()
    got = aux.predict_probs(model, image, "cpu", scales=scales, flip=flip)
    assert got.shape == (NC, 113, 100)
    sizes = [(113, 100), (85, 75)][:len(scales)]
    assert [tuple(v.shape) for v in model.seen] == [(2 if flip else 1, 3, -(-h // 8) * 8, -(-w // 8) * 8)
                                                     for h, w in sizes]
    x = aux.image_tensor(image, "cpu")
    assert torch.equal(model.seen[0], F.pad(torch.cat([x, x.flip(-1)]) if flip else x, (0, 4, 0, 7)))
    ref = probs_reference(model, image, scales, flip)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    for pad in ["no-pad", "pad-left", "stretch"] + (["pad-then-flip"] if flip else []):
        assert np.abs(probs_reference(model, image, scales, flip, pad=pad) - ref).max() > 0.05, pad


class ListDataset(list):
    """Samples in memory, as evaluate reads them (each_sample indexes a dataset)."""
    num_classes, class_names = NC, [f"c{i}" for i in range(NC)]


def eval_fixture(monkeypatch, post=True, **flags):
    """evaluate on 2 images with a recording predict_probs (single view: every pixel wrong; multi view: the top row
    right; CRF: all right) and a recording crf.refine_probs."""
    H, W = 6, 8
    rng = np.random.default_rng(7)
    samples = ListDataset()
    for i in range(2):
        gt = rng.integers(0, NC, (H, W)).astype(np.uint8)
        gt[0, :NC] = np.arange(NC)  # every class present
        samples.append({"name": f"im{i}", "image": rng.integers(0, 256, (H, W, 3), dtype=np.uint8), "mask": gt,
                        "label": np.ones(NC - 1, np.float32)})
    onehot = lambda lab: np.eye(NC, dtype=np.float32)[lab].transpose(2, 0, 1) * 0.7 + 0.3 / NC  # noqa: E731
    gt_of = lambda image: next(s["mask"] for s in samples if np.array_equal(s["image"], image))  # noqa: E731
    sig = inspect.signature(aux.predict_probs)

    def fake_probs(*a, **k):
        b = sig.bind(*a, **k)
        b.apply_defaults()
        gt = gt_of(b.arguments["image"]).astype(np.int64)
        single = tuple(b.arguments["scales"]) == (1.0,) and not b.arguments["flip"]
        wrong = (gt + 1) % NC
        return onehot(wrong if single else np.where(np.arange(H)[:, None] == 0, gt, wrong))

    calls = Recorder(monkeypatch, "predict_probs", ret=fake_probs)
    crf_calls = []

    def fake_crf(image, probs, **params):
        crf_calls.append((image, probs, params))
        return onehot(gt_of(image).astype(np.int64))

    monkeypatch.setattr(aux.crf, "refine_probs", fake_crf)
    args = aux.Args(workers=0, num_vis=0, **flags)
    ctx = FakeCtx.__new__(FakeCtx)
    ctx.args, ctx.device, ctx.main, ctx.rank, ctx.world = args, torch.device("cpu"), True, 0, 1
    model = torch.nn.Identity()
    res = aux.evaluate(ctx, model, samples, post=post)
    bound = []
    for a, k in calls.calls:
        b = sig.bind(*a, **k)
        b.apply_defaults()
        assert b.arguments["model"] is model
        bound.append(b.arguments)
    return samples, bound, crf_calls, res


@pytest.mark.parametrize("multi", [False, True])
def test_evaluate_crf_gets_aux_mct_and_the_right_probs(monkeypatch, multi):
    """--eval-crf: crf.refine_probs(image, probs of keys[-2], **PRESETS["aux_mct"]): the single-scale softmax
    (seg -> seg_crf) or, with --eval-scales / --eval-flip, the multi-view one (seg_ms -> seg_ms_crf); seg/val is
    always the single view. Catches: another preset (deeplab_v2, aux_sal, ...) or a missing / changed parameter;
    probs["seg"] (or keys[-1]) sent to the CRF under multi-view; another image; seg computed with the eval
    scales/flip; seg_ms computed single-view; a confusion matrix fed another key's prediction; the CRF skipped."""
    flags = dict(eval_crf=True, eval_scales=(1.0, 0.5), eval_flip=True) if multi else dict(eval_crf=True)
    samples, bound, crf_calls, res = eval_fixture(monkeypatch, **flags)
    keys = ["seg", "seg_ms", "seg_ms_crf"] if multi else ["seg", "seg_crf"]
    assert set(res) == {f"{k}/val" for k in keys}
    assert len(bound) == len(samples) * (2 if multi else 1) and len(crf_calls) == len(samples)
    per_image = len(bound) // len(samples)
    for i, s in enumerate(samples):
        views = bound[i * per_image:(i + 1) * per_image]
        assert all(v["image"] is s["image"] or np.array_equal(v["image"], s["image"]) for v in views)
        assert (tuple(views[0]["scales"]), views[0]["flip"]) == ((1.0,), False)  # seg/val: the plain single view
        if multi:
            assert (tuple(views[1]["scales"]), views[1]["flip"]) == ((1.0, 0.5), True)
        image, probs, params = crf_calls[i]
        assert np.array_equal(image, s["image"]) and image.dtype == np.uint8
        assert params == aux.crf.PRESETS["aux_mct"]
        gt = s["mask"].astype(np.int64)
        assert not np.array_equal(probs.argmax(0), gt)  # the CRF's input is not the answer
        top_right = np.array_equal(probs.argmax(0)[0], gt[0])
        assert top_right == multi  # the multi-view probabilities (top row right) iff multi, else the single view
    assert res["seg/val"]["miou"] == 0.0
    assert res[f"{keys[-1]}/val"]["miou"] == 100.0
    if multi:
        assert 0.0 < res["seg_ms/val"]["miou"] < 100.0


def test_evaluate_without_post_skips_views_and_crf(monkeypatch):
    """post=False (the stage-end ablation protocol): only seg/val, one single view per image, no CRF, even with
    --eval-crf / --eval-scales / --eval-flip set. Catches: `post` ignored in `multi` or in the CRF key."""
    samples, bound, crf_calls, res = eval_fixture(monkeypatch, post=False, eval_crf=True, eval_scales=(1.0, 0.5),
                                                  eval_flip=True)
    assert set(res) == {"seg/val"} and not crf_calls and len(bound) == len(samples)
    assert all((tuple(b["scales"]), b["flip"]) == ((1.0,), False) for b in bound)


@pytest.mark.parametrize("post", [False, True])
def test_evaluate_runs_the_network_in_eval_mode(monkeypatch, post):
    """evaluate puts the network in eval mode before predicting (train_stage hands it the model straight from the
    training loop, in train mode: dropout, batch statistics). Catches: model.eval() dropped or model.train()."""
    modes = []

    def fake_probs(model, image, device, scales=(1.0,), flip=False):
        modes.append(model.training)
        return np.full((NC,) + image.shape[:2], 1.0 / NC, np.float32)

    monkeypatch.setattr(aux, "predict_probs", fake_probs)
    samples = ListDataset([{"name": "im", "image": np.zeros((6, 8, 3), np.uint8), "mask": np.zeros((6, 8), np.uint8),
                            "label": np.ones(NC - 1, np.float32)}])
    ctx = FakeCtx.__new__(FakeCtx)
    ctx.args, ctx.device, ctx.main, ctx.rank, ctx.world = aux.Args(workers=0, num_vis=0), torch.device("cpu"), True, 0, 1
    model = torch.nn.Sequential(torch.nn.Dropout(0.5)).train()
    aux.evaluate(ctx, model, samples, post=post)
    assert modes and not any(modes)


# ----------------------------------------------------------------------------------------------------------
# Training crops (card §6, Deviation 5) and the saliency CRF (Eq. (C13))
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pad_bg, target", [(False, "seg"), (True, "seg"), (False, "mask")])
def test_train_transform_padding_and_sal_valid(tmp_path, pad_bg, target):
    """An image smaller than the crop lands at a random offset; its box (found from the image tensor: the padding is
    the ImageNet mean) holds the `target` labels and the saliency map with the image's flip; outside it the labels
    are 255 (--pad-as-background: 0) and the saliency 0; sal_valid is 1 exactly on the box and 0 on the padding
    (--pad-as-background: 1 everywhere). Catches: the box rows / columns swapped or shifted in sal_valid; sal_valid
    1 (or 0) everywhere, or its default taken from `not pad_as_background`; the label fill 255 / 0 swapped or
    fixed; the other label map (seg <-> mask) read; --scale-range ignored; labels or saliency not flipped with the
    image; a wrong crop size."""
    h, w, crop = 12, 20, 32
    rng0 = np.random.default_rng(11)
    image = rng0.integers(0, 100, (h, w, 3), dtype=np.uint8)  # red < 100: never the padding's mean colour (124, ...)
    seg = rng0.integers(1, NC, (h, w)).astype(np.uint8)  # 1..3, so a 0 fill is visible
    mask = (seg + 3).astype(np.uint8)  # a different map
    sal_png = rng0.integers(1, 256, (h, w)).astype(np.uint8)
    (tmp_path / "sal").mkdir()
    Image.fromarray(sal_png).save(tmp_path / "sal" / "im.png")
    sal = sal_png.astype(np.float32) / 255.0
    labels = {"seg": seg, "mask": mask}[target]
    sample = {"name": "im", "image": image, "label": np.array([0.0, 1.0, 1.0], np.float32), "seg": seg, "mask": mask}
    tf = aux.make_train_transform(aux.Args(scale_range=(1.0, 1.0), pad_as_background=pad_bg), crop, tmp_path / "sal",
                                  target)
    fill_pixel = augment.to_tensor(np.full((1, 1, 3), augment.MEAN_FILL, np.uint8))[:, 0, 0]
    offsets, flips = set(), set()
    for seed in range(8):
        out = tf(sample, np.random.default_rng(seed))
        assert set(out) == {"image", "label", "seg", "sal", "sal_valid"}
        assert torch.equal(out["label"], torch.tensor([0.0, 1.0, 1.0]))
        assert out["image"].shape == (3, crop, crop) and out["seg"].shape == out["sal_valid"].shape == (crop, crop)
        real = (out["image"] != fill_pixel[:, None, None]).any(0)
        ys, xs = torch.nonzero(real, as_tuple=True)
        y0, x0 = int(ys.min()), int(xs.min())
        assert (int(ys.max()) + 1 - y0, int(xs.max()) + 1 - x0) == (h, w)  # the image at its own size
        box = (slice(y0, y0 + h), slice(x0, x0 + w))
        inside = torch.zeros(crop, crop, dtype=torch.bool)
        inside[box] = True
        flipped = not torch.equal(out["image"][:, box[0], box[1]], augment.to_tensor(image))
        assert torch.equal(out["image"][:, box[0], box[1]], augment.to_tensor(image[:, ::-1] if flipped else image))
        f = (lambda a: a[:, ::-1]) if flipped else (lambda a: a)  # noqa: E731
        assert np.array_equal(out["seg"][box].numpy(), f(labels))
        np.testing.assert_allclose(out["sal"][box].numpy(), f(sal), atol=1e-6)
        assert (out["sal"][~inside] == 0).all()
        assert (out["seg"][~inside] == (0 if pad_bg else data.IGNORE_INDEX)).all()
        if pad_bg:
            assert (out["sal_valid"] == 1).all()
        else:
            assert torch.equal(out["sal_valid"], inside.float())
        offsets.add((y0, x0))
        flips.add(flipped)
    assert len(offsets) > 2 and any(y and x for y, x in offsets) and flips == {False, True}  # the draws vary


def test_train_transform_without_saliency_is_image_and_label():
    """The classification crops (no saliency folder): image and image label only, the image padded the same way."""
    image = np.zeros((12, 20, 3), np.uint8)
    out = aux.make_train_transform(aux.Args(scale_range=(1.0, 1.0)), 24)({"image": image, "label": np.ones(3)},
                                                                          np.random.default_rng(0))
    assert set(out) == {"image", "label"} and out["image"].shape == (3, 24, 24)


def test_saliency_crf_unary_and_parameters(monkeypatch):
    """Eq. (C13) with tau = 1.05, eps = 1e-8: U_bg = -log(1 - a + eps) / (tau sig(1 - a)) in channel 0,
    U_fg = -log(a + eps) / (tau sig(a)) in channel 1 (hand-computed below), the official crf_for_sal parameters
    (common.crf preset aux_sal: ONE iteration, Gaussian 3/3, bilateral 60/5/5), the image itself, and channel 1
    of the posterior returned. Catches: tau 1.0 (or another default), eps changed, sig(a) / sig(1 - a) swapped,
    the channels swapped, Q[0] returned, n_iters / any pairwise parameter changed or left to refine_unary's
    deeplab_v2 default, another image passed."""
    assert inspect.signature(aux.saliency_crf).parameters["tau"].default == 1.05
    calls = []

    def fake_unary(image, unary, **params):
        calls.append((image, unary, params))
        return np.stack([np.full(unary.shape[1:], 0.2), np.full(unary.shape[1:], 0.7)]).astype(np.float32)

    monkeypatch.setattr(aux.crf, "refine_unary", fake_unary)
    image = np.random.default_rng(0).integers(0, 256, (2, 2, 3), dtype=np.uint8)
    a = np.array([[0.25, 0.9], [0.0, 1.0]], np.float32)
    q = aux.saliency_crf(image, a)
    (img, unary, params), = calls
    assert np.array_equal(img, image)
    assert params == aux.crf.PRESETS["aux_sal"] == dict(n_iters=1, pos_xy_std=3, pos_w=3, bi_xy_std=60, bi_rgb_std=5,
                                                         bi_w=5)
    # a = 0.25: U_bg = -log 0.75 / (1.05 sig(0.75)) = 0.28768 / 0.71314
    #           U_fg = log 4 / (1.05 sig(0.25)) = 1.38629 / 0.59029
    # a = 0.9:  U_bg = -log 0.1 / (1.05 sig(0.1)); U_fg = -log 0.9 / (1.05 sig(0.9))
    # a = 0 / 1: the eps term: -log(1e-8) / (1.05 * 0.5) = 35.087 on the impossible label, ~0 on the other
    U_bg = [[0.403403278, 4.17719053], [0.0, 35.0870109]]
    U_fg = [[2.34851564, 0.141139894], [35.0870109, 0.0]]
    np.testing.assert_allclose(unary, np.array([U_bg, U_fg]), rtol=1e-6, atol=1e-7)
    assert unary.shape == (2, 2, 2) and q.dtype == np.float32
    np.testing.assert_allclose(q, 0.7)
    # tau is a divisor of both unaries
    calls.clear()
    aux.saliency_crf(image, a, tau=2.1)
    np.testing.assert_allclose(calls[0][1], np.array([U_bg, U_fg]) / 2, rtol=1e-6, atol=1e-7)
