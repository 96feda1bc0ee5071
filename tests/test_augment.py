"""common/augment.py: geometric transforms keep image, masks and maps pixel-aligned; padding values;
crop boxes; determinism under a given rng; photometric ops; tensors; mixing primitives."""
import numpy as np
import pytest
import torch
from PIL import Image

from common import augment as A

CELL = 12
GRID_H, GRID_W = 4, 6  # 24 cells of 12x12 px -> a 48 x 72 image, cells wide enough to keep interiors at 0.6x


def _palette(n):
    """n distinct RGB colours, far from each other and from the fill colours used below."""
    k = np.arange(n)
    return np.stack([20 + (k % 6) * 40, 30 + (k // 6 % 3) * 90, 10 + (k // 18) * 80], axis=1).astype(np.uint8)


PALETTE = _palette(GRID_H * GRID_W)


@pytest.fixture
def cells():
    """Image, mask and float map that encode the same cell id at every pixel: colour PALETTE[id],
    label id, value id / 100."""
    ids = (np.arange(GRID_H)[:, None] * GRID_W + np.arange(GRID_W)[None, :]).astype(np.uint8)
    mask = np.kron(ids, np.ones((CELL, CELL), np.uint8))  # (48, 72)
    image = PALETTE[mask]  # (48, 72, 3)
    fmap = mask.astype(np.float32) / 100.0
    return image, mask, fmap


def _interior(mask, radius):
    """Pixels whose (2r+1)^2 neighbourhood in ``mask`` holds a single value (away from cell borders)."""
    h, w = mask.shape
    pad = np.pad(mask.astype(np.int32), radius, mode="edge")
    same = np.ones((h, w), bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= pad[dy:dy + h, dx:dx + w] == mask
    return same


def assert_aligned(image, mask, fmap, radius=2, tol=2):
    """Inside each cell (away from borders, where interpolation mixes neighbours) the image colour,
    the mask label and the map value must name the same cell."""
    inner = _interior(mask, radius) & (mask != 255)
    assert inner.sum() > 50, "test pattern too small to check alignment"
    labels = mask[inner].astype(int)
    assert np.abs(image[inner].astype(int) - PALETTE[labels].astype(int)).max() <= tol
    np.testing.assert_allclose(fmap[inner], labels / 100.0, atol=1e-4)


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("ratio", [0.6, 1.0, 1.7])
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_rescale_keeps_alignment_and_rounds_size(cells, ratio, interp):
    image, mask, fmap = cells
    out, (m,), (f,) = A.rescale(image, ratio, (mask,), (fmap,), interp=interp)
    assert out.shape == (round(48 * ratio), round(72 * ratio), 3) and out.dtype == np.uint8
    assert m.shape == out.shape[:2] and m.dtype == np.uint8
    assert f.shape == out.shape[:2] and f.dtype == np.float32
    # Nearest keeps labels a subset of the input ones; bilinear would invent intermediate ids.
    assert set(np.unique(m)) <= set(np.unique(mask))
    # Upsampling bicubic reaches 2 source pixels (3.4 output pixels at 1.7x) and overshoots near edges.
    assert_aligned(out, m, f, radius=4 if interp == "bicubic" and ratio > 1 else 2)


def test_resize_uint8_map_stays_uint8(cells):
    image, mask, _ = cells
    sal = (mask * 4).astype(np.uint8)
    _, _, (s,) = A.resize(image, (30, 40), maps=(sal,))
    assert s.dtype == np.uint8 and s.shape == (30, 40)


def test_resize_multichannel_map(cells):
    image, mask, fmap = cells
    stacked = np.stack([fmap, 2 * fmap], axis=2)  # (H, W, 2)
    out, (m,), (f,) = A.resize(image, (96, 144), (mask,), (stacked,))
    assert f.shape == (96, 144, 2)
    assert_aligned(out, m, f[..., 0])
    np.testing.assert_allclose(f[..., 1], 2 * f[..., 0], atol=1e-5)


def test_random_rescale_range_and_alignment(cells):
    image, mask, fmap = cells
    for seed in range(5):
        out, (m,), (f,) = A.random_rescale(image, np.random.default_rng(seed), (mask,), (fmap,), ratio_range=(0.7, 1.3))
        assert round(48 * 0.7) <= out.shape[0] <= round(48 * 1.3)
        assert_aligned(out, m, f)


def test_random_resize_long_range_and_alignment(cells):
    image, mask, fmap = cells
    longs = set()
    for seed in range(40):
        out, (m,), (f,) = A.random_resize_long(image, np.random.default_rng(seed), (mask,), (fmap,), long_range=(60, 64))
        longs.add(max(out.shape[:2]))
        assert out.shape[1] > out.shape[0]  # aspect ratio kept (72 > 48)
        assert_aligned(out, m, f)
    assert longs == {60, 61, 62, 63, 64}  # both ends of the range are reachable


def test_hflip_moves_everything_and_is_an_involution(cells):
    image, mask, fmap = cells
    rng = np.random.default_rng(0)
    out, (m,), (f,) = A.random_hflip(image, rng, (mask,), (fmap,), p=1.0)
    np.testing.assert_array_equal(out, image[:, ::-1])
    np.testing.assert_array_equal(m, mask[:, ::-1])
    np.testing.assert_array_equal(f, fmap[:, ::-1])
    assert_aligned(out, m, f, radius=0, tol=0)
    back, (m2,), (f2,) = A.random_hflip(out, rng, (m,), (f,), p=1.0)
    np.testing.assert_array_equal(back, image)
    np.testing.assert_array_equal(m2, mask)
    np.testing.assert_array_equal(f2, fmap)
    same, (m3,), _ = A.random_hflip(image, rng, (mask,), p=0.0)
    np.testing.assert_array_equal(same, image)
    np.testing.assert_array_equal(m3, mask)


def test_hflip_probability_uses_rng():
    image = np.zeros((2, 3, 3), np.uint8)
    image[:, 0] = 255
    flips = [A.random_hflip(image, np.random.default_rng(s))[0][0, 0, 0] == 0 for s in range(400)]
    assert 0.4 < np.mean(flips) < 0.6


def test_random_crop_inside_large_image(cells):
    image, mask, fmap = cells
    out, (m,), (f,), box = A.random_crop(image, np.random.default_rng(3), (20, 30), (mask,), (fmap,))
    assert out.shape == (20, 30, 3) and m.shape == (20, 30) and f.shape == (20, 30)
    assert box == (0, 20, 0, 30)
    # Exactly one offset of the source reproduces the crop, and masks and maps use the same one.
    hits = [(y, x) for y in range(48 - 20 + 1) for x in range(72 - 30 + 1)
            if np.array_equal(image[y:y + 20, x:x + 30], out)]
    assert len(hits) == 1
    y, x = hits[0]
    np.testing.assert_array_equal(m, mask[y:y + 20, x:x + 30])
    np.testing.assert_array_equal(f, fmap[y:y + 20, x:x + 30])


def test_random_crop_pads_small_image_with_fills_and_box(cells):
    image, mask, fmap = cells
    out, (m,), (f,), box = A.random_crop(image, np.random.default_rng(1), 80, (mask,), (fmap,))
    y0, y1, x0, x1 = box
    assert out.shape == (80, 80, 3) and (y1 - y0, x1 - x0) == (48, 72)
    np.testing.assert_array_equal(out[y0:y1, x0:x1], image)
    np.testing.assert_array_equal(m[y0:y1, x0:x1], mask)
    np.testing.assert_array_equal(f[y0:y1, x0:x1], fmap)
    outside = np.ones((80, 80), bool)
    outside[y0:y1, x0:x1] = False
    assert (out[outside] == np.array([124, 116, 104], np.uint8)).all()  # ImageNet mean colour
    assert (m[outside] == 255).all()
    assert (f[outside] == 0).all()
    # The mean colour normalises to ~0, the convention of repos that pad after normalising.
    assert np.abs(A.normalize(out)[outside]).max() < 0.01


def test_random_crop_mixed_sides_custom_fills(cells):
    image, mask, fmap = cells
    out, (m,), (f,), box = A.random_crop(image, np.random.default_rng(2), (60, 40), (mask,), (fmap,),
                                         image_fill=(0, 0, 0), mask_fill=0)
    y0, y1, x0, x1 = box
    assert (y1 - y0, x1 - x0) == (48, 40) and (x0, x1) == (0, 40)  # rows padded, columns cropped
    outside = np.ones((60, 40), bool)
    outside[y0:y1] = False
    assert (out[outside] == 0).all() and (m[outside] == 0).all()
    assert_aligned(out[y0:y1], m[y0:y1], f[y0:y1], radius=0, tol=0)


def test_random_crop_reflect_padding(cells):
    image, mask, fmap = cells
    out, (m,), _, (y0, y1, x0, x1) = A.random_crop(image, np.random.default_rng(5), 64, (mask,), (fmap,),
                                                   image_fill="reflect")
    assert (y1 - y0, x0, x1) == (48, 0, 64)  # rows padded, columns cropped
    hits = [x for x in range(72 - 64 + 1) if np.array_equal(out[y0:y1], image[:, x:x + 64])]
    assert len(hits) == 1
    np.testing.assert_array_equal(m[y0:y1], mask[:, hits[0]:hits[0] + 64])
    if y0 > 0:  # mirrored about the first real row
        np.testing.assert_array_equal(out[y0 - 1], out[y0 + 1])
    if y1 < 64:
        np.testing.assert_array_equal(out[y1], out[y1 - 2])
    outside = np.ones((64, 64), bool)
    outside[y0:y1, x0:x1] = False
    assert (m[outside] == 255).all()  # reflected pixels are not real: still ignored in labels


def test_random_crop_offsets_cover_the_whole_range():
    image = np.zeros((30, 30, 3), np.uint8)
    tops = {A.random_crop(image, np.random.default_rng(s), (32, 28))[3][0] for s in range(60)}
    lefts = {A.random_crop(image, np.random.default_rng(s), (32, 28))[3][2] for s in range(60)}
    assert tops == {0, 1, 2}  # padded axis: the image may sit anywhere, both ends included
    assert lefts == {0}  # cropped axis: real pixels fill the crop


@pytest.mark.parametrize("name", ["random_rescale", "random_resize_long", "random_hflip", "random_crop"])
def test_geometry_is_deterministic_given_the_rng(cells, name):
    image, mask, fmap = cells
    fn = getattr(A, name)
    extra = {"size": 40} if name == "random_crop" else {}
    runs = [fn(image, np.random.default_rng(s), masks=(mask,), maps=(fmap,), **extra) for s in (7, 7, 8, 9, 10)]
    for a, b in zip(runs[0], runs[1]):
        if isinstance(a, tuple) and a and isinstance(a[0], np.ndarray):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_array_equal(a, b)
    # Different seeds must give at least one different result (the rng is actually used).
    assert any(not np.array_equal(runs[0][0], r[0]) for r in runs[2:])


def test_geometry_validates_inputs(cells):
    image, mask, fmap = cells
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="uint8"):
        A.rescale(image.astype(np.float32), 1.5)
    with pytest.raises(ValueError, match="mask"):
        A.random_hflip(image, rng, (mask[:10],))
    with pytest.raises(ValueError, match="map"):
        A.random_crop(image, rng, 16, maps=(fmap[:, :5],))
    with pytest.raises(ValueError, match="reflect"):
        A.random_crop(image, rng, 16, image_fill="mirror")


# ----------------------------------------------------------------------------- photometric


@pytest.fixture
def noise_image():
    return np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8)


def test_photometric_ops_keep_shape_dtype_and_are_deterministic(noise_image):
    ops = [
        lambda im, r: A.color_jitter(im, r, 0.25, 0.25, 0.25, 0.25, p=1.0),
        lambda im, r: A.gaussian_blur(im, r, p=1.0),
        lambda im, r: A.appearance_oneof(im, r),
        lambda im, r: A.appearance_oneof(im, r, magnitudes="code"),
        lambda im, r: A.rand_augment(im, r),
    ]
    for op in ops:
        for seed in range(6):
            a = op(noise_image, np.random.default_rng(seed))
            assert a.shape == noise_image.shape and a.dtype == np.uint8
            np.testing.assert_array_equal(a, op(noise_image, np.random.default_rng(seed)))


def test_photometric_p0_is_identity(noise_image):
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(A.color_jitter(noise_image, rng, 0.5, 0.5, 0.5, 0.2, p=0.0), noise_image)
    np.testing.assert_array_equal(A.gaussian_blur(noise_image, rng, p=0.0), noise_image)
    np.testing.assert_array_equal(A.rand_augment(noise_image, rng, p=0.0), noise_image)


def test_color_jitter_fixed_brightness_halves_pixels():
    image = np.full((4, 4, 3), 200, np.uint8)
    out = A.color_jitter(image, np.random.default_rng(0), brightness=(0.5, 0.5), p=1.0)
    assert (out == 100).all()  # 200 * 0.5


def test_color_jitter_rejects_bad_hue(noise_image):
    with pytest.raises(ValueError, match="hue"):
        A.color_jitter(noise_image, np.random.default_rng(0), hue=0.7)


def test_gaussian_blur_smooths_noise(noise_image):
    out = A.gaussian_blur(noise_image, np.random.default_rng(0), p=1.0, radius=(1.0, 2.0))
    assert out.astype(float).std() < 0.6 * noise_image.astype(float).std()


@pytest.mark.parametrize("magnitudes", ["paper", "code"])
def test_appearance_oneof_ops(noise_image, magnitudes):
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(A.appearance_oneof(noise_image, rng, magnitudes, op="identity"), noise_image)
    for _ in range(5):
        sol = A.appearance_oneof(noise_image, rng, magnitudes, op="solarize").astype(int)
        x = noise_image.astype(int)
        assert ((sol == x) | (sol == 255 - x)).all()  # each pixel kept or inverted
        post = A.appearance_oneof(noise_image, rng, magnitudes, op="posterize")
        # Posterize to b bits zeroes the 8 - b low bits; paper b in 4..8, code b = 4 - int(0.4 m) in 1..4.
        bits = range(4, 9) if magnitudes == "paper" else range(1, 5)
        assert any(np.array_equal(post, noise_image & np.uint8((0xFF << (8 - b)) & 0xFF)) for b in bits)
    # Paper factors are < 1: brightness never brightens.
    if magnitudes == "paper":
        bright = A.appearance_oneof(noise_image, rng, magnitudes, op="brightness")
        assert (bright <= noise_image).all() and bright.mean() < noise_image.mean()
    with pytest.raises(ValueError):
        A.appearance_oneof(noise_image, rng, magnitudes, op="rotate")


@pytest.mark.parametrize("name", A._RA_OPS)
@pytest.mark.parametrize("level", [0.0, 4.5, 9.3])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rand_augment_ops_match_timm(noise_image, monkeypatch, name, level, sign):
    """Each op equals timm's op at the same magnitude and sign (timm/data/auto_augment.py)."""
    import timm.data.auto_augment as aa  # timm is a requirement: a missing module must fail, not skip
    monkeypatch.setattr(aa, "_randomly_negate", lambda v: -v if sign < 0 else v)
    fill = A.MEAN_FILL
    hparams = dict(translate_const=250, img_mean=fill)
    level_fn = aa.LEVEL_TO_ARG[name]
    args = level_fn(level, hparams) if level_fn is not None else ()
    pil = Image.fromarray(noise_image)
    expected = np.asarray(aa.NAME_TO_OP[name](pil, *args, fillcolor=fill, resample=Image.BICUBIC))
    np.testing.assert_array_equal(np.asarray(A._ra_apply(pil, name, level, sign, fill)), expected)


# ----------------------------------------------------------------------------- tensors


def test_normalize_hand_values():
    image = np.array([[[255, 0, 124]]], np.uint8)
    out = A.normalize(image)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3)
    np.testing.assert_allclose(out[0, 0], [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (124 / 255 - 0.406) / 0.225],
                               rtol=1e-6)


def test_normalize_denormalize_round_trip():
    image = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    image = image.astype(np.uint8)
    t = A.to_tensor(image)
    assert t.dtype == torch.float32 and t.shape == (3, 16, 16)
    np.testing.assert_array_equal(A.denormalize(t), image)
    np.testing.assert_array_equal(A.denormalize(A.normalize(image)), image)
    with pytest.raises(ValueError):
        A.denormalize(torch.zeros(16, 16, 3))


def test_mask_to_tensor():
    mask = np.array([[0, 3], [255, 1]], np.uint8)
    t = A.mask_to_tensor(mask)
    assert t.dtype == torch.int64
    assert t.tolist() == [[0, 3], [255, 1]]


# ----------------------------------------------------------------------------- mixing primitives


def test_class_region():
    mask = torch.tensor([[0, 1, 2], [255, 1, 3]])
    assert A.class_region(mask, [1, 3]).tolist() == [[False, True, False], [False, True, True]]
    assert A.class_region(mask, 255).tolist() == [[False, False, False], [True, False, False]]
    assert not A.class_region(mask, []).any()


def test_paste_image_and_mask():
    region = torch.tensor([[True, False], [False, True]])
    dst = torch.zeros(3, 2, 2)
    src = torch.arange(12, dtype=torch.float32).reshape(3, 2, 2)
    out = A.paste(dst, src, region)
    expected = torch.tensor([[[0, 0], [0, 3]], [[4, 0], [0, 7]], [[8, 0], [0, 11]]], dtype=torch.float32)
    assert torch.equal(out, expected)
    assert torch.equal(dst, torch.zeros(3, 2, 2))  # inputs untouched
    m = A.paste(torch.tensor([[1, 1], [1, 1]]), torch.tensor([[5, 6], [7, 255]]), region)
    assert m.tolist() == [[5, 1], [1, 255]]
    batched = A.paste(dst[None].repeat(2, 1, 1, 1), src[None].repeat(2, 1, 1, 1), region[None].repeat(2, 1, 1))
    assert torch.equal(batched[1], expected)


def test_paste_with_class_region_classmix_style():
    """The ClassMix pattern: paste the pixels of class 2 from image b, image and label together."""
    mask_b = torch.tensor([[2, 0], [2, 1]])
    region = A.class_region(mask_b, [2])
    img = A.paste(torch.zeros(3, 2, 2), torch.ones(3, 2, 2), region)
    lab = A.paste(torch.tensor([[3, 3], [3, 3]]), mask_b, region)
    assert lab.tolist() == [[2, 3], [2, 3]]
    assert torch.equal(img[0], region.float())


def test_paste_validates():
    with pytest.raises(ValueError):
        A.paste(torch.zeros(3, 2, 2), torch.zeros(3, 2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError):
        A.paste(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), torch.ones(2, 2))
    with pytest.raises(ValueError):
        A.paste(torch.zeros(3, 2, 2), torch.zeros(3, 2, 2), torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("ratio", [0.55, 0.8, 1.3, 1.7, 2.0])
def test_rescale_edges_agree_to_the_pixel(ratio):
    """Sub-pixel check the cell test cannot see: a vertical and a horizontal step edge land on the
    same output pixel in the image (50% crossing), the mask (first label-1 pixel) and the map."""
    h, w, ey, ex = 40, 72, 17, 30
    mask = np.zeros((h, w), np.uint8)
    mask[:, ex:] = 1
    mask[ey:, :] = 1
    image = np.repeat(mask[..., None] * 200, 3, axis=2).astype(np.uint8)
    fmap = mask.astype(np.float32)
    out, (m,), (f,) = A.rescale(image, ratio, (mask,), (fmap,))
    row, col = 0, 0  # a row above the horizontal edge, a column left of the vertical edge
    assert np.argmax(out[row, :, 0] > 100) == np.argmax(m[row] == 1) == np.argmax(f[row] > 0.5)
    assert np.argmax(out[:, col, 0] > 100) == np.argmax(m[:, col] == 1) == np.argmax(f[:, col] > 0.5)
