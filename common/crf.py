"""Fully connected CRF (Krähenbühl & Koltun, NeurIPS 2011) through pydensecrf, with the presets of the
WSSS repositories.

pydensecrf is imported lazily: the PyPI package ``pydensecrf`` (1.0rc3) does not build on Python 3.11,
``pydensecrf2`` installs the same import package (methods/common.md, Sec. 1). Tests skip when
``available()`` is False; method scripts call it before offering ``--crf``.

Energy: E(x) = sum_i U_i(x_i) + sum_{i<j} mu(x_i, x_j) [ pos_w * exp(-|p_i - p_j|^2 / 2 pos_xy_std^2)
          + bi_w * exp(-|p_i - p_j|^2 / 2 bi_xy_std^2 - |I_i - I_j|^2 / 2 bi_rgb_std^2) ]
with Potts mu; ``n_iters`` mean-field steps; the result is the approximate posterior Q (C, H, W).

Unaries:  refine_probs   U = -log p from soft probabilities (``unary_from_softmax``)
          refine_labels  U from a hard map (``unary_from_labels``, zero_unsure=False): -log(gt_prob) on the
                         given label, -log((1 - gt_prob) / (n_labels - 1)) on the others
          refine_unary   a caller-built U (e.g. AuxSegNet's saliency energy in auxsegnet.py)
Parameters (every function): n_iters, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w; pass
``**PRESETS[name]`` to use a repository's values. Defaults: ``deeplab_v2`` for refine_probs and
refine_unary, ``irn`` for refine_labels.
The image must be the RGB uint8 image the probabilities belong to (same H, W); Cobra's
step/eval_sem_seg_thres.py passes BGR by mistake, which changes the bilateral kernel.
"""
from __future__ import annotations

import numpy as np

__all__ = ["PRESETS", "available", "refine_probs", "refine_labels", "refine_unary"]

PRESETS: dict[str, dict[str, float]] = {
    # softmax unary. Impl. (lucasdavid/PNOC, tools/ai/demo_utils.py `crf_inference_dlv2_softmax`,
    # from kazuto1011/deeplab-pytorch): DeepLab-v2's CRF.
    "deeplab_v2": dict(n_iters=10, pos_xy_std=1, pos_w=3, bi_xy_std=67, bi_rgb_std=3, bi_w=4),
    # label unary, gt_prob 0.7. Impl. (MICV-yonsei/Cobra, misc/imutils.py `crf_inference_label`;
    # lucasdavid/PNOC, tools/ai/demo_utils.py, used for CSRM's pseudo labels in lucasdavid/wsss-csrm,
    # csrm/mutual_promotion.py): IRN's CRF.
    "irn": dict(n_iters=10, pos_xy_std=3, pos_w=3, bi_xy_std=50, bi_rgb_std=5, bi_w=10),
    # softmax unary. Impl. (xulianuwa/AuxSegNet, tool/imutils.py `crf_inference_inf`; xulianuwa/MCTformer,
    # seg/tool/imutils.py `crf_inference_inf`).
    "aux_mct": dict(n_iters=10, pos_xy_std=4, pos_w=3, bi_xy_std=83, bi_rgb_std=5, bi_w=3),
    # softmax unary. Impl. (xulianuwa/MCTformer, psa/tool/imutils.py `crf_inference`): PSA's CRF.
    "psa": dict(n_iters=10, pos_xy_std=3, pos_w=3, bi_xy_std=80, bi_rgb_std=13, bi_w=10),
    # softmax unary, ONE iteration. Impl. (youshyee/CoSA, utils/seg_helper.py `crf_inference_infv2`):
    # the final "Seg_crf" of CoSA*.
    "cosa": dict(n_iters=1, pos_xy_std=1, pos_w=1, bi_xy_std=121, bi_rgb_std=5, bi_w=4),
    # saliency unary built by the caller (refine_unary), one iteration. Impl. (xulianuwa/AuxSegNet,
    # tool/imutils.py `crf_for_sal`).
    "aux_sal": dict(n_iters=1, pos_xy_std=3, pos_w=3, bi_xy_std=60, bi_rgb_std=5, bi_w=5),
    # label unary, gt_prob 0.7. Impl. (MICV-yonsei/Cobra, step/eval_sem_seg_thres.py `crf_inference_label`).
    "cobra_seg": dict(n_iters=10, pos_xy_std=2, pos_w=3, bi_xy_std=45, bi_rgb_std=5, bi_w=4),
}

_PARAM_NAMES = frozenset(PRESETS["deeplab_v2"])
_PROB_FLOOR = 1e-8  # -log(1e-8) = 18.4: a finite unary for classes the network rules out


def available() -> bool:
    """True when pydensecrf (package ``pydensecrf2``) can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def _import():
    try:
        import pydensecrf.densecrf as dcrf
        import pydensecrf.utils as dutils
    except ImportError as e:
        raise ImportError("dense CRF needs pydensecrf: pip install pydensecrf2==1.1 (needs a C++ compiler)") from e
    return dcrf, dutils


def _params(params: dict, default: str) -> dict:
    unknown = set(params) - _PARAM_NAMES
    if unknown:
        raise TypeError(f"unknown CRF parameter(s) {sorted(unknown)}; valid: {sorted(_PARAM_NAMES)}")
    p = {**PRESETS[default], **params}
    if int(p["n_iters"]) < 1 or any(p[k] <= 0 for k in ("pos_xy_std", "bi_xy_std", "bi_rgb_std")):
        raise ValueError(f"CRF needs n_iters >= 1 and positive standard deviations, got {p}")
    return p


def _check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"CRF image must be an RGB uint8 (H, W, 3) array, got {desc}; "
                         "denormalize tensors first (common.augment.denormalize)")
    # pydensecrf reads the raw buffer through a writable memoryview: a flipped or sliced view would
    # be read in the wrong order, and a read-only array (np.asarray of a PIL image) is refused.
    return np.require(image, requirements=["C_CONTIGUOUS", "WRITEABLE"])


def _check_maps(image: np.ndarray, x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[1:] != image.shape[:2]:
        raise ValueError(f"{name} must be (C, H, W) with H, W = {image.shape[:2]} of the image, got {x.shape}")
    if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
        raise ValueError(f"{name} must be finite floats, got dtype {x.dtype}")
    return x


def _infer(image: np.ndarray, unary: np.ndarray, p: dict) -> np.ndarray:
    """Mean-field inference; unary float32 (C, H*W). Returns the posterior float32 (C, H, W)."""
    dcrf, _ = _import()
    h, w = image.shape[:2]
    n_labels = unary.shape[0]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=p["pos_xy_std"], compat=p["pos_w"])
    d.addPairwiseBilateral(sxy=p["bi_xy_std"], srgb=p["bi_rgb_std"], rgbim=image, compat=p["bi_w"])
    q = np.asarray(d.inference(int(p["n_iters"])), dtype=np.float32)  # (C, H*W)
    return q.reshape(n_labels, h, w)


def refine_unary(image, unary, **params) -> np.ndarray:
    """Posterior float32 (C, H, W) for a caller-provided unary energy U = -log p, float (C, H, W)."""
    image = _check_image(image)
    unary = _check_maps(image, unary, "unary")
    p = _params(params, "deeplab_v2")
    return _infer(image, unary.reshape(unary.shape[0], -1).astype(np.float32), p)


def refine_probs(image, probs, **params) -> np.ndarray:
    """Posterior float32 (C, H, W) (sums to 1 over C) from class probabilities float (C, H, W).

    The probabilities are clipped to >= 1e-8 and renormalised, so zeros (classes absent from the
    image label) give a large but finite unary.
    """
    image = _check_image(image)
    probs = _check_maps(image, probs, "probs")
    if (probs < 0).any():
        raise ValueError("probs must be non-negative (pass a softmax, not logits)")
    p = _params(params, "deeplab_v2")
    _, dutils = _import()
    probs = np.maximum(probs.astype(np.float32), _PROB_FLOOR)
    probs /= probs.sum(axis=0, keepdims=True)
    return _infer(image, dutils.unary_from_softmax(probs, clip=None), p)


def refine_labels(image, labels, n_labels: int, *, gt_prob: float = 0.7, **params) -> np.ndarray:
    """Refined int64 (H, W) labels in 0..n_labels-1 from a hard label map (H, W) with values in
    0..n_labels-1 (callers map class ids to these indices through their class keys and back)."""
    image = _check_image(image)
    labels = np.asarray(labels)
    if labels.shape != image.shape[:2] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer (H, W) map with H, W = {image.shape[:2]}, "
                         f"got {labels.dtype} {labels.shape}")
    if int(n_labels) < 1:
        raise ValueError(f"n_labels must be >= 1, got {n_labels}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(f"labels must lie in 0..{n_labels - 1}, got values {labels.min()}..{labels.max()}; "
                         "map 255 and class ids to label indices first")
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    p = _params(params, "irn")
    if int(n_labels) == 1:  # a single label is the only possible answer (and the unary would divide by 0)
        return np.zeros(labels.shape, np.int64)
    _, dutils = _import()
    unary = dutils.unary_from_labels(labels.astype(np.int64), int(n_labels), gt_prob=gt_prob, zero_unsure=False)
    return _infer(image, unary, p).argmax(axis=0).astype(np.int64)
