"""Generic geometric and photometric augmentations shared by the five method scripts.

Conventions (methods/common.md, Sec. 2):
    image  uint8 (H, W, 3) RGB
    masks  label maps, uint8 (H, W) with 0..C-1 and 255; resized nearest, padded with 255
    maps   float or uint8 maps, (H, W) or (H, W, K) (saliency, CAMs); resized bilinear, padded with 0
Geometric functions move image, masks and maps together so they stay pixel-aligned and return
``(image, masks, maps)`` (``random_crop`` adds the ``box`` of real pixels). Photometric functions
touch the image only. Every random function draws from the ``numpy.random.Generator`` it is given,
never from a global RNG, so a sample's augmentation depends only on that generator (``SegDataset``
seeds it per (seed, epoch, index), which makes augmentation independent of the worker count).

What to mix, how often and how labels change is a method's policy and lives in its script
(ClassMix in csrm.py, copy-paste in csd.py); this module only offers the primitives
``class_region`` and ``paste``.

Per-method recipes (methods/common.md, Sec. 3.5; keyword arguments of the calls, in order):
    CoSA       random_rescale(ratio_range=(0.5, 2.0)), random_hflip(p=0.5),
               random_crop(size=448, image_fill=(0, 0, 0)), gaussian_blur(p=0.5, radius=(0.1, 2.0));
               strong view: appearance_oneof on the weak view
    CoBra      random_resize_long(long_range=(320, 640), interp="bicubic"), random_hflip, random_crop(size=224)
    AuxSegNet  random_rescale(ratio_range=(0.7, 1.3)), random_hflip, random_crop(size=321, mask_fill=0)
    CSRM       random_rescale(ratio_range=(320 / 512, 640 / 512)), random_hflip,
               random_crop(size=512, image_fill="reflect"),
               color_jitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.25, p=0.8),
               gaussian_blur(p=0.5, radius=(0.15, 1.15))
    MCTformer  (CSD's classification stream) rand_augment(num_ops=2, magnitude=9)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from .data import IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "MEAN_FILL", "resize", "rescale", "random_rescale", "random_resize_long", "random_hflip",
    "random_crop", "color_jitter", "gaussian_blur", "appearance_oneof", "rand_augment",
    "normalize", "denormalize", "to_tensor", "mask_to_tensor", "class_region", "paste",
]

# ImageNet mean as uint8 RGB: padding with it gives ~0 after normalising (|x| < 0.01), like the
# repos that pad after normalisation (Cobra voc12/dataloader.py, AuxSegNet tool/exutils.py), and it
# is timm's ``img_mean`` fill for RandAugment's geometric ops.
MEAN_FILL = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)  # (124, 116, 104)

_INTERP = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


# ----------------------------------------------------------------------------- validation

def _check_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a uint8 (H, W, 3) RGB array, got {desc}")


def _check_aligned(image: np.ndarray, masks: Sequence[np.ndarray], maps: Sequence[np.ndarray]) -> None:
    _check_image(image)
    h, w = image.shape[:2]
    for m in masks:
        if m.ndim != 2 or m.shape != (h, w):
            raise ValueError(f"each mask must be (H, W) = {(h, w)} like the image, got {m.shape}")
    for m in maps:
        if m.ndim not in (2, 3) or m.shape[:2] != (h, w):
            raise ValueError(f"each map must be (H, W) or (H, W, K) with H, W = {(h, w)}, got {m.shape}")


def _pair(size) -> tuple[int, int]:
    h, w = (size, size) if np.isscalar(size) else tuple(size)
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(h), int(w)


# ----------------------------------------------------------------------------- geometry

def _resize_map(m: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an (H, W) or (H, W, K) map, keeping its dtype (PIL mode L for uint8, F otherwise)."""
    size = (hw[1], hw[0])  # PIL takes (W, H)
    if m.ndim == 3:
        return np.stack([_resize_map(m[..., k], hw) for k in range(m.shape[2])], axis=2)
    if m.dtype == np.uint8:
        return np.asarray(Image.fromarray(m).resize(size, Image.BILINEAR))
    out = np.asarray(Image.fromarray(m.astype(np.float32)).resize(size, Image.BILINEAR))
    return out.astype(m.dtype, copy=False)


def resize(image, size, masks=(), maps=(), interp="bilinear"):
    """Resize to ``size`` = int or (h, w): image with ``interp`` (bilinear | bicubic | nearest),
    masks nearest, maps bilinear. Returns (image, masks, maps)."""
    _check_aligned(image, masks, maps)
    hw = _pair(size)
    if hw == image.shape[:2]:
        return image, tuple(masks), tuple(maps)
    pil_size = (hw[1], hw[0])
    image = np.asarray(Image.fromarray(image).resize(pil_size, _INTERP[interp]))
    # Nearest for labels: interpolating class ids would invent classes along boundaries.
    masks = tuple(np.asarray(Image.fromarray(m).resize(pil_size, Image.NEAREST)) if m.dtype == np.uint8
                  else np.asarray(Image.fromarray(m.astype(np.int32)).resize(pil_size, Image.NEAREST)).astype(m.dtype)
                  for m in masks)
    maps = tuple(_resize_map(m, hw) for m in maps)
    return image, masks, maps


def rescale(image, ratio, masks=(), maps=(), interp="bilinear"):
    """Scale both sides by ``ratio``; the new size is round(side * ratio), at least 1
    (Impl. (jiwoon-ahn/irn, misc/imutils.py): skimage ``rescale`` rounds the size, it does not truncate)."""
    if ratio <= 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    h, w = image.shape[:2]
    size = (max(1, int(round(h * ratio))), max(1, int(round(w * ratio))))
    return resize(image, size, masks, maps, interp)


def random_rescale(image, rng: np.random.Generator, masks=(), maps=(), ratio_range=(0.5, 2.0), interp="bilinear"):
    """Rescale by r ~ U(ratio_range) (CoSA Table 12: U(0.5, 2.0); AuxSegNet: U(0.7, 1.3))."""
    ratio = rng.uniform(ratio_range[0], ratio_range[1])
    return rescale(image, ratio, masks, maps, interp)


def random_resize_long(image, rng: np.random.Generator, masks=(), maps=(), long_range=(320, 640), interp="bilinear"):
    """Rescale so the long side is an integer L ~ U{long_range[0], ..., long_range[1]}, both ends included.
    Impl. (jiwoon-ahn/irn, misc/imutils.py `random_resize_long`, the base of Cobra's loader):
    ``random.randint`` and a bicubic (order 3) image resize; pass ``interp="bicubic"`` to match."""
    target = int(rng.integers(long_range[0], long_range[1], endpoint=True))
    return rescale(image, target / max(image.shape[:2]), masks, maps, interp)


def _hflip(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a[:, ::-1])  # axis 1 is W for (H, W) and (H, W, K) arrays


def random_hflip(image, rng: np.random.Generator, masks=(), maps=(), p=0.5):
    """Mirror left-right with probability ``p``. Flipping twice is the identity."""
    _check_aligned(image, masks, maps)
    if rng.random() >= p:
        return image, tuple(masks), tuple(maps)
    return _hflip(image), tuple(_hflip(m) for m in masks), tuple(_hflip(m) for m in maps)


def _place(length: int, crop: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Along one axis: (src0, dst0, n) = first source pixel, first crop pixel, number of real pixels.
    Impl. (lucasdavid/PNOC, tools/ai/augment_utils.py `random_crop_box`, from IRN): a larger image is
    cropped at a random offset; a smaller one is placed at a random offset inside the padded crop."""
    if length >= crop:
        return int(rng.integers(0, length - crop, endpoint=True)), 0, crop
    return 0, int(rng.integers(0, crop - length, endpoint=True)), length


def random_crop(image, rng: np.random.Generator, size, masks=(), maps=(), image_fill=MEAN_FILL, mask_fill=IGNORE_INDEX):
    """Random ``size`` crop (int or (h, w)); a side shorter than the crop is padded.

    Padding: image with the RGB ``image_fill`` (default the ImageNet mean, ~0 after normalising;
    CoSA pads raw 0 -> ``(0, 0, 0)``) or ``"reflect"`` (mirror the image into the padding, CSRM /
    PNOC); masks with ``mask_fill`` (255 = ignore; AuxSegNet pads 255 too, 0 = background only with
    --pad-as-background, as its official code does); maps with 0.
    Returns (image, masks, maps, box) with box = (y0, y1, x0, x1): the crop rows/columns holding
    real image pixels, so pseudo labels can be set to 255 outside it (reflected pixels are not real).
    """
    _check_aligned(image, masks, maps)
    ch, cw = _pair(size)
    h, w = image.shape[:2]
    sy, dy, nh = _place(h, ch, rng)
    sx, dx, nw = _place(w, cw, rng)
    src = (slice(sy, sy + nh), slice(sx, sx + nw))
    dst = (slice(dy, dy + nh), slice(dx, dx + nw))
    box = (dy, dy + nh, dx, dx + nw)

    if isinstance(image_fill, str):
        if image_fill != "reflect":
            raise ValueError(f"image_fill must be an RGB triple or 'reflect', got {image_fill!r}")
        # numpy's reflect handles pads longer than the image by reflecting repeatedly.
        pad = ((dy, ch - dy - nh), (dx, cw - dx - nw), (0, 0))
        out_image = np.pad(image[src], pad, mode="reflect")
    else:
        out_image = np.empty((ch, cw, 3), np.uint8)
        out_image[...] = np.asarray(image_fill, np.uint8)
        out_image[dst] = image[src]

    out_masks = []
    for m in masks:
        o = np.full((ch, cw), mask_fill, m.dtype)
        o[dst] = m[src]
        out_masks.append(o)
    out_maps = []
    for m in maps:
        o = np.zeros((ch, cw) + m.shape[2:], m.dtype)
        o[dst] = m[src]
        out_maps.append(o)
    return out_image, tuple(out_masks), tuple(out_maps), box


# ----------------------------------------------------------------------------- photometric (image only)

def _jitter_range(value, name: str, center: float = 1.0, bound: tuple[float, float] = (0.0, float("inf"))):
    """torchvision ColorJitter's argument rule: v -> [max(0, c - v), c + v]; a (min, max) pair is used as is;
    0 or None disables the op."""
    if value is None:
        return None
    if np.isscalar(value):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
        lo, hi = center - value, center + value
        lo = max(lo, bound[0])
    else:
        lo, hi = float(value[0]), float(value[1])
    if not bound[0] <= lo <= hi <= bound[1]:
        raise ValueError(f"{name} range must lie in {bound}, got {(lo, hi)}")
    return None if lo == hi == center else (lo, hi)


def color_jitter(image, rng: np.random.Generator, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, p=1.0):
    """torchvision ``RandomApply([ColorJitter(b, c, s, h)], p)`` with the randomness from ``rng``:
    factors b, c, s ~ U[max(0, 1 - x), 1 + x] (or a given (min, max)), hue shift ~ U[-h, h] with
    h <= 0.5, applied in a random order (torchvision permutes the four ops). The ops themselves are
    torchvision's ``adjust_*`` on the PIL image. CSRM: (0.25, 0.25, 0.25, 0.25, p=0.8)."""
    _check_image(image)
    ranges = [_jitter_range(brightness, "brightness"), _jitter_range(contrast, "contrast"),
              _jitter_range(saturation, "saturation"), _jitter_range(hue, "hue", 0.0, (-0.5, 0.5))]
    if rng.random() >= p:
        return image
    order = rng.permutation(4)
    factors = [None if r is None else rng.uniform(r[0], r[1]) for r in ranges]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    pil = Image.fromarray(image)
    for i in order:
        if factors[i] is not None:
            pil = ops[i](pil, factors[i])
    return np.asarray(pil)


def gaussian_blur(image, rng: np.random.Generator, p=0.5, radius=(0.1, 2.0)):
    """With probability ``p``, PIL GaussianBlur with radius ~ U(radius) (CoSA Table 12: p 0.5,
    U(0.1, 2.0); CSRM: p 0.5, U(0.15, 1.15))."""
    _check_image(image)
    if rng.random() >= p:
        return image
    r = rng.uniform(radius[0], radius[1])
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=r)))


_ONEOF_OPS = ("identity", "autocontrast", "equalize", "solarize", "color", "contrast", "brightness",
              "sharpness", "posterize")
_ENHANCE = {"color": ImageEnhance.Color, "contrast": ImageEnhance.Contrast,
            "brightness": ImageEnhance.Brightness, "sharpness": ImageEnhance.Sharpness}


def appearance_oneof(image, rng: np.random.Generator, magnitudes="paper", op=None):
    """CoSA's strong-view ``OneOf(TransAppearance)``: one of nine PIL ops, chosen uniformly.

    ``magnitudes="paper"`` (CoSA Table 14): Solarize threshold 256*T, T ~ U(0, 1) (pixels >= the
    threshold are inverted); Color / Contrast / Brightness / Sharpness factor C ~ U(0.05, 0.95)
    (0 = grey / flat / black / blurred, 1 = original); Posterize to C ~ U{4..8} bits.
    ``magnitudes="code"`` (youshyee/CoSA, dataloaders/randaug.py): m ~ U{1..9}; Solarize threshold
    int(25.6 m); enhance factor 0.18 m + 0.1 (in [0.28, 1.72]); Posterize to 4 - int(0.4 m) bits.
    ``op`` forces one op by name (tests, ablations). Identity returns the input unchanged.
    """
    _check_image(image)
    if magnitudes not in ("paper", "code"):
        raise ValueError(f"magnitudes must be 'paper' or 'code', got {magnitudes!r}")
    name = _ONEOF_OPS[int(rng.integers(len(_ONEOF_OPS)))] if op is None else op
    if name not in _ONEOF_OPS:
        raise ValueError(f"unknown appearance op {name!r}; choose from {_ONEOF_OPS}")
    if name == "identity":
        return image
    m = int(rng.integers(1, 10)) if magnitudes == "code" else None  # code: np.random.randint(1, 10)
    pil = Image.fromarray(image)
    if name == "autocontrast":
        pil = ImageOps.autocontrast(pil)
    elif name == "equalize":
        pil = ImageOps.equalize(pil)
    elif name == "solarize":
        threshold = int(256 * rng.uniform(0.0, 1.0)) if magnitudes == "paper" else min(int(m * 256 / 10), 255)
        pil = ImageOps.solarize(pil, threshold)
    elif name == "posterize":
        bits = int(rng.integers(4, 8, endpoint=True)) if magnitudes == "paper" else 4 - int(m * 4 / 10)
        pil = ImageOps.posterize(pil, bits)
    else:
        factor = rng.uniform(0.05, 0.95) if magnitudes == "paper" else m * 1.8 / 10 + 0.1
        pil = _ENHANCE[name](pil).enhance(factor)
    return np.asarray(pil)


# timm's "increasing" RandAugment set (timm/data/auto_augment.py `_RAND_INCREASING_TRANSFORMS`),
# selected by the ``inc1`` in MCTformer's ``rand-m9-mstd0.5-inc1``.
_RA_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
           "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
           "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _ra_apply(pil: Image.Image, name: str, level: float, sign: float, fill) -> Image.Image:
    """One timm RandAugment op at magnitude ``level`` in [0, 10] with timm's level-to-argument rules;
    ``sign`` (+1 or -1) is the outcome of timm's ``_randomly_negate`` for the signed ops."""
    frac = level / 10.0
    affine = dict(resample=Image.BICUBIC, fillcolor=fill)  # DeiT/MCTformer train interpolation: bicubic
    if name == "AutoContrast":
        return ImageOps.autocontrast(pil)
    if name == "Equalize":
        return ImageOps.equalize(pil)
    if name == "Invert":
        return ImageOps.invert(pil)
    if name == "Rotate":
        return pil.rotate(sign * 30.0 * frac, **affine)
    if name == "PosterizeIncreasing":
        bits = 4 - int(frac * 4)
        return pil if bits >= 8 else ImageOps.posterize(pil, bits)
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(pil, 256 - min(256, int(frac * 256)))
    if name == "SolarizeAdd":
        add = min(128, int(frac * 110))
        lut = [min(255, i + add) if i < 128 else i for i in range(256)]
        return pil.point(lut * 3)
    if name.endswith("Increasing"):  # Color / Contrast / Brightness / Sharpness
        factor = max(0.1, 1.0 + sign * 0.9 * frac)
        enhancer = _ENHANCE[name[: -len("Increasing")].lower()]
        return enhancer(pil).enhance(factor)
    if name in ("ShearX", "ShearY"):
        s = sign * 0.3 * frac
        coeffs = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
        return pil.transform(pil.size, Image.AFFINE, coeffs, **affine)
    # TranslateXRel / TranslateYRel: shift by up to 45% of the side (timm translate_pct 0.45).
    if name == "TranslateXRel":
        return pil.transform(pil.size, Image.AFFINE, (1, 0, sign * 0.45 * frac * pil.size[0], 0, 1, 0), **affine)
    return pil.transform(pil.size, Image.AFFINE, (1, 0, 0, 0, 1, sign * 0.45 * frac * pil.size[1]), **affine)


def rand_augment(image, rng: np.random.Generator, num_ops=2, magnitude=9, magnitude_std=0.5, p=0.5, fill=MEAN_FILL):
    """timm RandAugment ``rand-m9-mstd0.5-inc1`` (MCTformer datasets.py via timm create_transform),
    re-implemented on PIL so the randomness comes from ``rng``.

    Variant: timm's, not the original paper's. ``num_ops`` ops drawn with replacement from the 15-op
    "increasing" set (AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize, SolarizeAdd, Color,
    Contrast, Brightness, Sharpness, ShearX/Y, TranslateX/YRel); each op runs with probability ``p``
    at a magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10], and every signed op flips its
    sign with probability 0.5. Geometric ops fill with ``fill`` (timm ``img_mean``) and resample
    bicubic. Image-only: the geometric ops (rotate, shear, translate) would misalign masks, so use
    this only where no mask travels with the image (classification streams).
    """
    _check_image(image)
    pil = Image.fromarray(image)
    for k in rng.choice(len(_RA_OPS), size=num_ops, replace=True):
        if rng.random() > p:
            continue
        level = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else float(magnitude)
        sign = -1.0 if rng.random() > 0.5 else 1.0
        pil = _ra_apply(pil, _RA_OPS[k], float(np.clip(level, 0.0, 10.0)), sign, tuple(fill))
    return np.asarray(pil)


# ----------------------------------------------------------------------------- tensors

_MEAN = np.asarray(IMAGENET_MEAN, np.float32)
_STD = np.asarray(IMAGENET_STD, np.float32)


def normalize(image) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (H, W, 3): (x / 255 - mean) / std with the ImageNet statistics."""
    _check_image(image)
    return (image.astype(np.float32) / 255.0 - _MEAN) / _STD


def denormalize(t) -> np.ndarray:
    """Inverse of ``normalize``: a normalised (3, H, W) tensor or (H, W, 3) array -> uint8 (H, W, 3)."""
    if isinstance(t, torch.Tensor):
        if t.ndim != 3 or t.shape[0] != 3:
            raise ValueError(f"denormalize expects a (3, H, W) tensor, got {tuple(t.shape)}")
        a = t.detach().float().cpu().numpy().transpose(1, 2, 0)  # (H, W, 3)
    else:
        a = np.asarray(t, np.float32)
        if a.ndim != 3 or a.shape[2] != 3:
            raise ValueError(f"denormalize expects an (H, W, 3) array, got {a.shape}")
    return np.clip(np.rint((a * _STD + _MEAN) * 255.0), 0, 255).astype(np.uint8)


def to_tensor(image) -> torch.Tensor:
    """uint8 (H, W, 3) -> normalised float32 tensor (3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(normalize(image).transpose(2, 0, 1)))


def mask_to_tensor(mask) -> torch.Tensor:
    """Label map (H, W) -> int64 tensor (H, W) (the dtype cross-entropy expects)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got {mask.shape}")
    return torch.from_numpy(mask.astype(np.int64))


# ----------------------------------------------------------------------------- mixing primitives (torch)

def class_region(mask: torch.Tensor, classes) -> torch.Tensor:
    """bool tensor shaped like ``mask``: True where the label is one of ``classes`` (int, sequence or tensor)."""
    classes = torch.as_tensor(classes, dtype=mask.dtype, device=mask.device).reshape(-1)
    return torch.isin(mask, classes)


def paste(dst: torch.Tensor, src: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """New tensor equal to ``src`` inside ``region`` and to ``dst`` elsewhere.

    dst, src: images (3, H, W) or masks (H, W), optionally with a leading batch dim; region: bool
    (H, W) (or (B, H, W)), broadcast over the channel dim of images. Inputs are not modified.
    """
    if dst.shape != src.shape:
        raise ValueError(f"paste needs dst and src of equal shape, got {tuple(dst.shape)} and {tuple(src.shape)}")
    if region.dtype != torch.bool:
        raise ValueError(f"region must be a bool tensor, got {region.dtype}")
    if region.shape[-2:] != dst.shape[-2:]:
        raise ValueError(f"region (H, W) {tuple(region.shape[-2:])} does not match {tuple(dst.shape[-2:])}")
    if dst.ndim == region.ndim + 1:
        region = region.unsqueeze(-3)  # (.., 1, H, W): same region for every channel
    elif dst.ndim != region.ndim:
        raise ValueError(f"region {tuple(region.shape)} does not fit a tensor of shape {tuple(dst.shape)}")
    return torch.where(region, src, dst)
