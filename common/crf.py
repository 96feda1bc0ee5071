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
          refine_labels_torch  refine_labels in torch on the training device, for CRFs inside a training
                         step (CSRM); needs no pydensecrf (the comment block above it gives its approximation)
Parameters (every function): n_iters, pos_xy_std, pos_w, bi_xy_std, bi_rgb_std, bi_w; pass
``**PRESETS[name]`` to use a repository's values. Defaults: ``deeplab_v2`` for refine_probs and
refine_unary, ``irn`` for refine_labels.
The image must be the RGB uint8 image the probabilities belong to (same H, W); Cobra's
step/eval_sem_seg_thres.py passes BGR by mistake, which changes the bilateral kernel.
"""
from __future__ import annotations

import warnings

import numpy as np

__all__ = ["PRESETS", "available", "refine_probs", "refine_labels", "refine_unary", "refine_labels_torch"]

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


# --------------------------------------------------------------------------------------------------
# The same label-unary CRF on the training device, in torch, for CRFs inside a training step.
#
# pydensecrf runs on the host: CSRM's two label CRFs per crop cost ~24 s per step at the paper's batch and
# crop (tests/bench/paper_step.py, 2 threads), while the GPU waits. refine_labels_torch computes the same
# energy and the same mean-field updates as pydensecrf (symmetric kernel normalisation, Potts compatibility,
# the unary of ``unary_from_labels``); only the filtering of the two kernels differs:
#   - the position kernel is an exact separable Gaussian, cut at 3 standard deviations (pydensecrf
#     approximates it on its lattice);
#   - the bilateral kernel is filtered on a sparse 5-D grid (x, y, r, g, b scaled by their standard
#     deviations): multilinear splat to the 2^5 cell corners, a [1, 2, 1] blur along each axis, multilinear
#     slice — a bilateral grid (Chen et al., SIGGRAPH 2007) in place of pydensecrf's permutohedral lattice
#     (Adams et al., 2010). Only occupied cells are stored, so memory grows with the image, not the grid.
# tests/test_crf.py measures the agreement with pydensecrf's labels and with the exact bilateral filter.
# --------------------------------------------------------------------------------------------------

# The splat tent, [1, 2, 1] / 4 blur and slice tent add up to a variance of 1/6 + 1/2 + 1/6 = 5/6 cell^2
# per axis, so cells of sqrt(6/5) standard deviations make the grid's kernel a unit-variance bump.
_GRID_CELL = (6 / 5) ** 0.5
_CORNERS = np.array(np.meshgrid(*[[0, 1]] * 5, indexing="ij")).reshape(5, -1).T  # (32, 5) in {0, 1}


class _BilateralGrid:
    """Sparse bilateral grid of one image: filter(v) ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j for features f (N, 5)
    already divided by their standard deviations. Built once per image, applied at every mean-field step."""

    def __init__(self, f):
        import torch
        g = f / _GRID_CELL
        base = torch.floor(g)
        self.w = torch.where(torch.as_tensor(_CORNERS, device=f.device).bool()[None], (g - base)[:, None],
                             1 - (g - base)[:, None]).prod(-1)  # (N, 32) multilinear weight of each cell corner
        base = base.long()
        base = base - base.min(0).values + 1  # >= 1, so every cell's -1 neighbour has a valid key
        radix = base.max(0).values + 3  # room for the +1 corner and its +1 neighbour
        mul = torch.cumprod(torch.cat([radix.new_ones(1), radix[:-1]]), 0)  # (5,) mixed-radix cell key
        corner_keys = (torch.as_tensor(_CORNERS, device=f.device) * mul).sum(1)  # (32,) key offset of each corner
        # pixels -> their base cell (its lowest corner) -> that cell's 32 corners, deduplicated: the occupied cells
        base_keys, pixel_base = torch.unique((base * mul).sum(1), return_inverse=True)  # (Mb,), (N,)
        cells, self.corner_cell = torch.unique((base_keys[:, None] + corner_keys).flatten(), return_inverse=True)
        n, self.m = len(f), len(cells)  # the grid has m cells and one zero row (index m) for missing neighbours
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore")
            # splat, first half: (Mb, N) sums the pixels of each base cell
            counts = torch.bincount(pixel_base, minlength=len(base_keys))
            self.gather = torch.sparse_csr_tensor(torch.cat([counts.new_zeros(1), counts.cumsum(0)]),
                                                  torch.argsort(pixel_base), f.new_ones(n), (len(base_keys), n))
            # slice: (N, m + 1), each pixel reads its 32 corners with its multilinear weights
            self.slice = torch.sparse_csr_tensor(torch.arange(0, 32 * n + 1, 32, device=f.device),
                                                 self.corner_cell.view(-1, 32)[pixel_base].flatten(),
                                                 self.w.flatten(), (n, self.m + 1))
        self.neighbours = []  # per axis: the (m,) rows of the cells one step below and above (m where empty)
        for d in range(5):
            pair = []
            for step in (-1, 1):
                key = cells + step * mul[d]
                pos = torch.searchsorted(cells, key).clamp(max=self.m - 1)
                pair.append(torch.where(cells[pos] == key, pos, self.m))
            self.neighbours.append(pair)

    def filter(self, v):
        """v (N, L) float32 -> (N, L)."""
        import torch
        n, L = v.shape
        per_base = self.gather @ (self.w[:, :, None] * v[:, None]).reshape(n, 32 * L)  # (Mb, 32 L): splat ...
        grid = v.new_zeros(self.m + 1, L).index_add_(0, self.corner_cell, per_base.view(-1, L))  # ... to corners
        for below, above in self.neighbours:  # blur [1, 2, 1] / 4 along each axis; row m stays zero
            grid = torch.cat([0.5 * grid[:-1] + 0.25 * (grid[below] + grid[above]), grid[-1:]])
        return self.slice @ grid  # slice


def _gaussian_filter(q, std):
    """Exact position kernel: q (L, H, W) -> sum_j exp(-|p_i - p_j|^2 / 2 std^2) q_j, zero outside the image."""
    import torch
    import torch.nn.functional as F
    r = max(int(np.ceil(3 * std)), 1)
    k = torch.exp(-torch.arange(-r, r + 1, dtype=q.dtype, device=q.device) ** 2 / (2 * std ** 2))
    x = q[:, None]  # (L, 1, H, W)
    x = F.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))
    x = F.conv2d(x, k.view(1, 1, 1, -1), padding=(0, r))
    return x[:, 0]


def refine_labels_torch(image, labels, n_labels: int, *, gt_prob: float = 0.7, **params):
    """refine_labels on the device, for several label maps of ONE image at once (they share its kernels).

    image: uint8 (H, W, 3) tensor, RGB; labels: integer (K, H, W) tensor with values in 0..n_labels-1.
    Returns int64 (K, H, W) on the image's device."""
    import torch
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"CRF image must be an RGB uint8 (H, W, 3) tensor, got {image.dtype} {tuple(image.shape)}")
    if labels.ndim != 3 or labels.shape[1:] != image.shape[:2] or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer (K, H, W) tensor with H, W = {tuple(image.shape[:2])}, "
                         f"got {labels.dtype} {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_labels):
        raise ValueError(f"labels must lie in 0..{n_labels - 1}")
    if not 0.0 < gt_prob < 1.0:
        raise ValueError(f"gt_prob must be in (0, 1), got {gt_prob}")
    p = _params(params, "irn")
    K, H, W = labels.shape
    if n_labels == 1:
        return torch.zeros(K, H, W, dtype=torch.long, device=labels.device)
    # unary_from_labels (zero_unsure=False): U = -log(gt_prob) on the label, -log((1-gt_prob)/(n-1)) elsewhere
    onehot = torch.nn.functional.one_hot(labels.long(), n_labels).permute(0, 3, 1, 2).float()  # (K, L, H, W)
    U = torch.where(onehot > 0, -np.log(gt_prob), -np.log((1 - gt_prob) / (n_labels - 1)))
    yy, xx = torch.meshgrid(torch.arange(H, device=image.device), torch.arange(W, device=image.device),
                            indexing="ij")
    f = torch.cat([torch.stack([xx, yy], -1).float() / p["bi_xy_std"], image.float() / p["bi_rgb_std"]], -1)
    grid = _BilateralGrid(f.view(-1, 5))  # features (N, 5)
    ones = U.new_ones(1, H, W)
    # symmetric normalisation (pydensecrf's default): message = n * filter(n * Q), n = filter(1)^-1/2
    n_pos = _gaussian_filter(ones, p["pos_xy_std"]).clamp_min(1e-20).rsqrt()  # (1, H, W)
    n_bi = grid.filter(ones.view(-1, 1)).clamp_min(1e-20).rsqrt().view(1, H, W)
    Q = torch.softmax(-U, 1)
    for _ in range(int(p["n_iters"])):
        q = Q.reshape(K * n_labels, H, W)
        pos = n_pos * _gaussian_filter(n_pos * q, p["pos_xy_std"])
        bi = (n_bi * grid.filter((n_bi * q).reshape(K * n_labels, -1).T).T.reshape(K * n_labels, H, W))
        # Potts: the posterior of the same label at similar pixels lowers that label's energy
        Q = torch.softmax(-U + (p["pos_w"] * pos + p["bi_w"] * bi).view(K, n_labels, H, W), 1)
    return Q.argmax(1)
