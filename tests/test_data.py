"""common/data.py: loaders on fabricated VOC/COCO folders, every error, the toy generator."""
import time

import numpy as np
import pytest
import torch
from PIL import Image

from common import data
from common.data import DataError, SegDataset


def write_voc(root, *, annotations=True, classes=None, num=4, mask_mode="P", grayscale_first=True,
              mask_dir="SegmentationClass"):
    """A tiny VOC-layout folder: image i holds class (i % 3) + 1 in a square; image 0 is grayscale."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / mask_dir).mkdir()
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    names = classes or data.VOC_CLASSES
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    if annotations:
        (root / "Annotations").mkdir()
    ids = [f"img_{i}" for i in range(num)]
    for i, name in enumerate(ids):
        h, w = 20 + i, 24
        image = np.full((h, w, 3), 40 * i, np.uint8)
        if grayscale_first and i == 0:
            Image.fromarray(image[..., 0], mode="L").save(root / "JPEGImages" / f"{name}.jpg")
        else:
            Image.fromarray(image).save(root / "JPEGImages" / f"{name}.jpg")
        mask = np.zeros((h, w), np.uint8)
        cls = i % 3 + 1
        mask[4:12, 4:12] = cls
        mask[4, 4:12] = 255
        if mask_mode == "P":
            data.save_mask(root / mask_dir / f"{name}.png", mask)
        else:
            Image.fromarray(mask, mode="L").save(root / mask_dir / f"{name}.png")
        if annotations:
            objects = "".join(f"<object><name>{n}</name></object>" for n in (names[cls], names[1]))
            (root / "Annotations" / f"{name}.xml").write_text(f"<annotation>{objects}</annotation>")
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(ids[:3]) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text(ids[3] + "\n")
    return ids


def test_palette_and_save_mask_roundtrip(tmp_path):
    pal = data.voc_palette()
    assert pal.shape == (256, 3)
    assert pal[0].tolist() == [0, 0, 0] and pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128] and pal[20].tolist() == [0, 64, 128]
    assert pal[255].tolist() == [224, 224, 192]
    mask = np.array([[0, 1, 20], [255, 7, 0]], np.uint8)
    data.save_mask(tmp_path / "a" / "m.png", mask)
    with Image.open(tmp_path / "a" / "m.png") as im:
        assert im.mode == "P"
    np.testing.assert_array_equal(data.read_mask(tmp_path / "a" / "m.png"), mask)


@pytest.mark.parametrize("mask_mode", ["P", "L"])
def test_voc_loader_with_annotations(tmp_path, mask_mode):
    write_voc(tmp_path, mask_mode=mask_mode)
    ds = SegDataset(tmp_path, "train")
    assert ds.num_classes == 21 and ds.class_names[0] == "background" and len(ds) == 3
    assert ds.label_source == "xml"
    s = ds[0]
    assert s["name"] == "img_0"
    assert s["image"].shape == (20, 24, 3) and s["image"].dtype == np.uint8  # grayscale JPEG comes back RGB
    assert s["mask"].dtype == np.uint8 and set(np.unique(s["mask"])) == {0, 1, 255}
    # XML names both 'aeroplane' (1) and the square's class: labels follow the XML, not the mask.
    assert s["label"].shape == (20,) and s["label"].dtype == np.float32
    assert np.flatnonzero(ds[1]["label"]).tolist() == [0, 1]


def test_labels_from_masks_and_classes_txt(tmp_path):
    write_voc(tmp_path, annotations=False, classes=["background", "cat", "dog", "fox"])
    ds = SegDataset(tmp_path, "train")
    assert ds.class_names == ("background", "cat", "dog", "fox") and ds.num_classes == 4
    assert ds.label_source == "mask"
    np.testing.assert_array_equal(ds.labels(), [[1, 0, 0], [0, 1, 0], [0, 0, 1]])
    labels = data.image_labels(tmp_path, ds.ids, "mask", cache=tmp_path / "cache.npy")
    assert (tmp_path / "cache.npy").is_file() and labels["img_2"].tolist() == [0, 0, 1]


def test_image_modes_come_back_rgb(tmp_path):
    write_voc(tmp_path, annotations=False)
    for mode in ("L", "CMYK", "P", "RGBA"):
        path = tmp_path / f"x_{mode}.png" if mode != "CMYK" else tmp_path / "x.jpg"
        Image.new(mode, (5, 4)).save(path)
        out = data.read_image(path)
        assert out.shape == (4, 5, 3) and out.dtype == np.uint8


def test_train_aug_derived_from_aug_masks(tmp_path):
    write_voc(tmp_path, annotations=False, mask_dir="SegmentationClassAug")
    with pytest.warns(UserWarning, match="10582"):
        ids = data.split_ids(tmp_path, "train_aug")
    assert ids == ["img_0", "img_1", "img_2"]  # all Aug stems minus val
    ds = SegDataset(tmp_path, "val")  # masks found in SegmentationClassAug
    assert ds[0]["mask"].shape == (23, 24)


def test_extra_dirs_and_test_split(tmp_path):
    write_voc(tmp_path, annotations=False)
    (tmp_path / "sal").mkdir()
    for i in range(4):
        Image.fromarray(np.full((20 + i, 24), 200, np.uint8)).save(tmp_path / "sal" / f"img_{i}.png")
    ds = SegDataset(tmp_path, "train", extra_dirs={"saliency": tmp_path / "sal"})
    assert ds[2]["saliency"].shape == (22, 24)
    (tmp_path / "ImageSets" / "Segmentation" / "test.txt").write_text("extra\n")
    Image.new("RGB", (8, 8)).save(tmp_path / "JPEGImages" / "extra.jpg")
    s = SegDataset(tmp_path, "test")[0]
    assert "mask" not in s and s["image"].shape == (8, 8, 3)


def test_rng_depends_on_seed_epoch_index_not_workers(tmp_path):
    write_voc(tmp_path, annotations=False)
    transform = lambda sample, rng: torch.tensor(rng.random(3))
    ds = SegDataset(tmp_path, "train", transform=transform, seed=7)
    a = torch.stack([ds[i] for i in range(3)])
    b = torch.cat(list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)))
    torch.testing.assert_close(a, b)
    ds.set_epoch(1)
    assert not torch.equal(a[0], ds[0])
    assert torch.equal(SegDataset(tmp_path, "train", transform=transform, seed=7)[1], a[1])


def test_coco_layouts(tmp_path):
    for layout in ("SegmentationClass", "coco_seg_anno"):
        root = tmp_path / layout
        (root / "train2014").mkdir(parents=True)
        mdir = root / "SegmentationClass" / "train2014" if layout == "SegmentationClass" else root / "coco_seg_anno"
        mdir.mkdir(parents=True)
        for k in (9, 25):
            stem = f"COCO_train2014_{k:012d}"
            Image.new("RGB", (10, 6)).save(root / "train2014" / f"{stem}.jpg")
            mask = np.zeros((6, 10), np.uint8)
            mask[1:3, 1:3] = 80 if k == 9 else 1
            Image.fromarray(mask).save(mdir / f"{stem if layout == 'SegmentationClass' else f'{k:012d}'}.png")
        spec = data.resolve_data(str(root))
        assert spec.dataset == "coco"
        ds = SegDataset(spec.root, "train", dataset="coco")
        assert ds.num_classes == 81 and ds.class_names[80] == "toothbrush"
        assert ds.ids == ["COCO_train2014_000000000009", "COCO_train2014_000000000025"]
        assert np.flatnonzero(ds[0]["label"]).tolist() == [79]
    assert len(data.COCO_CATEGORY_IDS) == 80 and data.COCO_CATEGORY_IDS[-1] == 90


def test_resolve_data(tmp_path):
    write_voc(tmp_path / "VOCdevkit" / "VOC2012", annotations=False)
    spec = data.resolve_data(str(tmp_path / "VOCdevkit"))
    assert spec.root == tmp_path / "VOCdevkit" / "VOC2012" and spec.dataset == "voc"
    assert data.default_splits(spec) == {"train": "train_aug", "seed": "train", "val": "val"}
    with pytest.raises(DataError, match="does not exist"):
        data.resolve_data(str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"data.README\.md|--data"):
        data.resolve_data("NoSuchDatasetName")


# ----------------------------------------------------------------------------- errors
def _one_line(exc):
    msg = str(exc.value)
    assert "\n" not in msg and msg
    return msg


def test_error_missing_root(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        SegDataset(tmp_path / "missing", "train")
    _one_line(e)


def test_error_missing_jpegimages_and_masks(tmp_path):
    write_voc(tmp_path, annotations=False)
    (tmp_path / "JPEGImages").rename(tmp_path / "images")
    with pytest.raises(DataError, match="JPEGImages") as e:
        SegDataset(tmp_path, "train")
    _one_line(e)
    (tmp_path / "images").rename(tmp_path / "JPEGImages")
    (tmp_path / "SegmentationClass").rename(tmp_path / "masks")
    with pytest.raises(DataError, match="mask folder"):
        SegDataset(tmp_path, "train")


def test_error_split_files(tmp_path):
    write_voc(tmp_path, annotations=False)
    with pytest.raises(DataError, match="trainval.txt is missing"):
        SegDataset(tmp_path, "trainval")
    (tmp_path / "ImageSets" / "Segmentation" / "trainval.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        SegDataset(tmp_path, "trainval")
    (tmp_path / "ImageSets" / "Segmentation" / "trainval.txt").write_text("img_0\nghost\n")
    with pytest.raises(DataError, match="1 ids of split 'trainval' have no image.*ghost"):
        SegDataset(tmp_path, "trainval")


def test_error_mask_size_and_values(tmp_path):
    write_voc(tmp_path, annotations=False, classes=["background", "a", "b", "c"])
    data.save_mask(tmp_path / "SegmentationClass" / "img_0.png", np.zeros((5, 5), np.uint8))
    ds = SegDataset(tmp_path, "train")
    with pytest.raises(DataError, match="5x5 but its image is 24x20") as e:
        ds[0]
    _one_line(e)
    data.save_mask(tmp_path / "SegmentationClass" / "img_1.png", np.full((21, 24), 9, np.uint8))
    with pytest.raises(DataError, match="value 9.*only 4 classes"):
        ds[1]


def test_error_unreadable_image_and_worker_message(tmp_path):
    write_voc(tmp_path, annotations=False)
    (tmp_path / "JPEGImages" / "img_1.jpg").write_bytes(b"not a jpeg")
    ds = SegDataset(tmp_path, "train")
    with pytest.raises(DataError, match="cannot read image .*img_1.jpg"):
        ds[1]
    # Raised inside a DataLoader worker, the message still reads as one line.
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, collate_fn=lambda x: x)
    with pytest.raises(DataError) as e:
        list(loader)
    assert _one_line(e).startswith("cannot read image")


def test_error_bad_xml_class(tmp_path):
    write_voc(tmp_path)
    (tmp_path / "Annotations" / "img_0.xml").write_text("<annotation><object><name>unicorn</name></object></annotation>")
    with pytest.raises(DataError, match="unicorn"):
        SegDataset(tmp_path, "train")


# ----------------------------------------------------------------------------- toy dataset
def test_toy_deterministic_and_reused(tmp_path):
    a = data.make_toy(tmp_path / "a", num_train=6, num_val=2, seed=3)
    b = data.make_toy(tmp_path / "b", num_train=6, num_val=2, seed=3)
    for sub in ("JPEGImages/train_00004.jpg", "SegmentationClass/val_00001.png", "saliency/train_00002.png"):
        assert (a / sub).read_bytes() == (b / sub).read_bytes()
    before = (a / "JPEGImages" / "train_00000.jpg").stat().st_mtime_ns
    data.make_toy(a, num_train=6, num_val=2, seed=3)  # same version and arguments: reused
    assert (a / "JPEGImages" / "train_00000.jpg").stat().st_mtime_ns == before
    (a / "toy_version.txt").write_text("version=0\n")  # an older generator: regenerated
    data.make_toy(a, num_train=6, num_val=2, seed=3)
    assert (a / "toy_version.txt").read_text().startswith(f"version={data.TOY_VERSION}")
    c = data.make_toy(tmp_path / "c", num_train=6, num_val=2, seed=4)
    assert (c / "JPEGImages/train_00004.jpg").read_bytes() != (a / "JPEGImages/train_00004.jpg").read_bytes()


def test_toy_full_size_speed_and_statistics(tmp_path):
    start = time.perf_counter()
    root = data.make_toy(tmp_path / "toy", num_train=1000, num_val=200)
    assert time.perf_counter() - start < 30
    train = SegDataset(root, "train")
    assert len(train) == 1000 and len(SegDataset(root, "val")) == 200
    assert train.class_names == data.TOY_CLASSES
    labels = train.labels()
    single = (labels.sum(1) == 1).mean()
    assert 0.4 < single < 0.6 and labels.sum(1).max() <= 3 and labels.sum(1).min() >= 1
    pairs = labels.T @ labels
    never = [(0, 1), (0, 2), (1, 2), (1, 3)]  # boat-train, boat-cow, train-cow, train-bird
    assert all(pairs[i, j] == 0 for i, j in never)
    assert pairs[0, 5] > 50 and pairs[4, 5] > 50  # boat-person and car-person are frequent
    s = train[0]
    assert 96 <= s["image"].shape[0] <= 128 and (s["mask"] == 255).any()
    assert data.split_ids(root, "train_aug") == train.ids

    # Object sizes, context placement and the signature colours, over the first 300 train images.
    largest, background, with_class, painted, signature = [], [], 0, 0, []
    for i in range(300):
        mask = train.load(i)["mask"]
        image = np.asarray(Image.open(root / "JPEGImages" / f"{train.ids[i]}.jpg").convert("RGB"), float)
        context = data.read_mask(root / "context" / f"{train.ids[i]}.png")
        present = [c for c in np.unique(mask) if 0 < c < 255]
        largest.append(max((mask == c).mean() for c in present))
        background.append((mask == 0).mean())
        assert not ((context > 0) & (mask > 0) & (mask < 255)).any()  # context is never under an object
        for k, cls in enumerate(data.TOY_CONTEXT, start=1):
            if (context == k).any():
                painted += 1
                with_class += cls in present
                assert (context == k).mean() > 0.05 and ((context[-1] == k) | (mask[-1] > 0)).all()  # a bottom band
        for c in present:  # the signature colour is on the object and nowhere on the background
            near = np.abs(image - data.TOY_SIGNATURE[c - 1]).max(-1) < 40
            signature.append((near & (mask == c)).sum() > 0.3 * near.sum() and (near & (mask == c)).any())
    largest = np.array(largest)
    assert 0.14 < largest.mean() < 0.24 and 0.45 < (largest >= 0.15).mean() < 0.75  # large objects are common
    assert 0.6 < np.mean(background) < 0.8
    assert 0.85 < with_class / painted < 0.97  # context comes with its class, rarely without it
    assert np.mean(signature) > 0.9


def test_toy_knobs(tmp_path):
    with pytest.raises(ValueError, match="unknown toy knobs"):
        data.make_toy(tmp_path / "x", num_train=2, num_val=1, knobs={"sizes": (0.1, 0.2)})
    plain = data.make_toy(tmp_path / "a", num_train=4, num_val=1)
    blind = data.make_toy(tmp_path / "b", num_train=4, num_val=1, knobs={"sal_miss": 1.0, "sal_blobs": 0.0})
    assert (plain / "JPEGImages/train_00003.jpg").read_bytes() == (blind / "JPEGImages/train_00003.jpg").read_bytes()
    assert "sal_miss" in (blind / "toy_version.txt").read_text() and "knobs={}" in (plain / "toy_version.txt").read_text()
    for i in range(4):  # every object missed, no false blob: the stand-in saliency is only blur of nothing + noise
        sal = np.asarray(Image.open(blind / "saliency" / f"train_{i:05d}.png"), float)
        assert sal.mean() < 15


def test_toy_saliency_noise_and_blur_knobs(tmp_path):
    # Knobs set to their default values change nothing: the same draws, files and stamp.
    assert data.TOY_KNOBS["sal_noise"] == 12.0 and data.TOY_KNOBS["sal_blur"] == (1.0, 2.5)
    plain = data.make_toy(tmp_path / "a", num_train=4, num_val=1)
    same = data.make_toy(tmp_path / "s", num_train=4, num_val=1,
                         knobs={"sal_noise": 12.0, "sal_blur": (1.0, 2.5), "limb": 2.0, "body_shared": 0.0})
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(same) for p in same.rglob("*") if p.is_file())
    assert all((plain / f).read_bytes() == (same / f).read_bytes() for f in files)
    assert "knobs={}" in (plain / "toy_version.txt").read_text()
    # v3's random stream under TOY_V3_KNOBS, and v4's: after one sample the generator is where it was left when
    # the values were recorded (v3 seeds 0, 2, 5: the v3 code of f9ee24c gives these values; v4 seeds 2, 7: the
    # v4 commit). Seeds 2 and 7 draw a shared body under v3's body_shared 0.3 (one more number drawn), so v3 and
    # v4 part there; seeds 0 and 5 draw none. Catches draws added, dropped or reordered, and a v3 knob that
    # no longer reproduces v3, without depending on Pillow's blur output.
    v3 = {**data.TOY_KNOBS, **data.TOY_V3_KNOBS}
    for knobs, seed, after in ((v3, 0, 0.21017200058310326), (v3, 5, 0.787424314977918), (v3, 2, 0.8104042264322372),
                               (data.TOY_KNOBS, 2, 0.5966359850034825), (data.TOY_KNOBS, 7, 0.2707434532531674)):
        rng = np.random.default_rng(seed)
        data._toy_sample(rng, knobs)
        assert rng.random() == after

    # sal_noise=0: noise-free maps, nothing else changes; the default map is that map plus N(0, 12) noise.
    clean = data.make_toy(tmp_path / "c", num_train=4, num_val=1, knobs={"sal_noise": 0})
    assert "sal_noise" in (clean / "toy_version.txt").read_text()
    residuals = []
    for i in range(4):
        for sub in ("JPEGImages", "SegmentationClass", "context"):
            ext = "jpg" if sub == "JPEGImages" else "png"
            assert (plain / sub / f"train_{i:05d}.{ext}").read_bytes() == (clean / sub / f"train_{i:05d}.{ext}").read_bytes()
        noisy = np.asarray(Image.open(plain / "saliency" / f"train_{i:05d}.png"), float)
        smooth = np.asarray(Image.open(clean / "saliency" / f"train_{i:05d}.png"), float)
        assert (smooth == 0).mean() > 0.3 and (noisy == 0).mean() < (smooth == 0).mean()  # far background: exactly 0
        interior = (smooth >= 50) & (smooth <= 205)  # the noise is neither clipped nor saturated here
        residuals.append((noisy - smooth)[interior])
    residuals = np.concatenate(residuals)
    assert residuals.size > 500 and 11 < residuals.std() < 13

    # No blur, no noise, no misses, no blobs: the map is exactly 255 on the objects and 0 on the background.
    sharp = data.make_toy(tmp_path / "d", num_train=4, num_val=1,
                          knobs={"sal_noise": 0.0, "sal_blur": (0, 0), "sal_miss": 0.0, "sal_blobs": 0.0})
    for i in range(4):
        sal = np.asarray(Image.open(sharp / "saliency" / f"train_{i:05d}.png"))
        mask = data.read_mask(sharp / "SegmentationClass" / f"train_{i:05d}.png")
        assert set(np.unique(sal)) <= {0, 255}
        assert (sal[(mask > 0) & (mask < 255)] == 255).all() and (sal[mask == 0] == 0).all()

    # Out-of-range values are refused before anything is written, with the unknown-knob error's type.
    for bad in ({"sal_noise": -1.0}, {"sal_noise": float("nan")}, {"sal_blur": (2.5, 1.0)}, {"sal_blur": (-1, 1)},
                {"sal_blur": 2.0}, {"sal_miss": 1.5}, {"distractors": (0, 1.5)}, {"limb": 0}, {"limb": -1.0}):
        with pytest.raises(ValueError, match=f"invalid toy knob {next(iter(bad))}="):
            data.make_toy(tmp_path / "bad", num_train=2, num_val=1, knobs=bad)
        assert not (tmp_path / "bad").exists()


def test_toy_limb_knob_widens_legs_and_wings_only():
    # limb scales the half-width of the cow's legs and the base of the bird's wings (the thin parts a stride-8
    # output cannot resolve); the other parts, the draws and the boat's sail stay as they are. Hand values for
    # size 10: a leg spans x +- 0.8 (limb 1) or +- 1.6 (limb 2) around its centre; a wing's base runs from
    # -1 to 2.5 (limb 1) or -2 to 5 (limb 2). Catches the knob ignored, applied to the wrong part, or squared.
    def parts(cls, limb):
        return data._toy_polygon(cls, np.random.default_rng(3), 10.0, limb)
    cow1, cow2 = parts(3, 1.0), parts(3, 2.0)
    for leg1, leg2, centre in zip(cow1[2:], cow2[2:], (-7.0, -4.0, 4.0, 7.0)):
        assert np.allclose(np.ptp(leg1[:, 0]), 1.6) and np.allclose(np.ptp(leg2[:, 0]), 3.2)
        assert np.allclose(leg2[:, 0].mean(), centre) and np.allclose(leg2[:, 1], leg1[:, 1])
    assert all(np.array_equal(a, b) for a, b in zip(cow1[:2], cow2[:2]))  # body and head unchanged
    bird1, bird2 = parts(4, 1.0), parts(4, 2.0)
    for w1, w2 in zip(bird1[1:], bird2[1:]):
        assert np.allclose(w1[[0, 2], 0], [-1.0, 2.5]) and np.allclose(w2[[0, 2], 0], [-2.0, 5.0])
        assert np.allclose(w1[1], w2[1])  # the tip stays
    for cls in (1, 2, 5, 6):  # boat, train, car, person have no such parts
        assert all(np.array_equal(a, b) for a, b in zip(parts(cls, 1.0), parts(cls, 2.0)))
    # limb 1.0 is v3 to the bit: the same float expressions as v3's hard-coded 0.08 * size and (-0.1, 0.25) * size
    assert all(np.array_equal(leg[[0, 1], 0], [x - 0.08 * 10.0, x + 0.08 * 10.0])
               for leg, x in zip(cow1[2:], (-0.7 * 10.0, -0.4 * 10.0, 0.4 * 10.0, 0.7 * 10.0)))
    assert all(np.array_equal(w[[0, 2], 0], [-0.1 * 10.0, 0.25 * 10.0]) for w in bird1[1:])


def test_toy_limb_knob_reaches_the_generated_masks(tmp_path):
    # make_toy must hand the knob to the shapes: with v4's limb 2 (the default) instead of v3's 1 the masks of
    # images holding a cow or a bird change, the others stay byte-equal (no draw moves), and the stamp names the
    # changed knob. Catches the knob dropped between make_toy and _toy_polygon (the unit test above calls
    # _toy_polygon directly).
    narrow = data.make_toy(tmp_path / "n", num_train=12, num_val=1, knobs={"limb": 1.0})
    wide = data.make_toy(tmp_path / "w", num_train=12, num_val=1)
    assert "limb" in (narrow / "toy_version.txt").read_text() and "limb" not in (wide / "toy_version.txt").read_text()
    assert "'limb': 2.0" in (wide / "README.txt").read_text()  # README.txt lists every knob's value
    changed = kept = 0
    for i in range(12):
        a = data.read_mask(narrow / "SegmentationClass" / f"train_{i:05d}.png")
        b = data.read_mask(wide / "SegmentationClass" / f"train_{i:05d}.png")
        if np.isin(a, [3, 4]).any():  # a cow or a bird
            changed += not np.array_equal(a, b)
            assert np.isin(b, [3, 4]).sum() > np.isin(a, [3, 4]).sum()  # wider limbs: more of those pixels
        else:
            kept += 1
            assert np.array_equal(a, b)
    assert changed > 0 and kept > 0


def test_toy_v4_is_v3_with_two_knobs_changed(tmp_path):
    # The version bump regenerates an old folder; TOY_V3_KNOBS names exactly the two knobs v4 changed (so a
    # reader can rebuild v3); body_shared 0 gives every body its own class's colour. Catches a default changed
    # without updating TOY_V3_KNOBS, or body_shared still drawing another class's colour at 0.
    assert data.TOY_VERSION == 4 and data.TOY_V3_KNOBS == {"body_shared": 0.3, "limb": 1.0}
    assert {k: data.TOY_KNOBS[k] for k in data.TOY_V3_KNOBS} == {"body_shared": 0.0, "limb": 2.0}
    old = data.make_toy(tmp_path / "toy", num_train=3, num_val=1)
    (old / "toy_version.txt").write_text("version=3 num_train=3 num_val=1 seed=0 knobs={}\n")  # a v3 folder's stamp
    (old / "README.txt").write_text("v3")
    data.make_toy(old, num_train=3, num_val=1)
    assert (old / "toy_version.txt").read_text() == "version=4 num_train=3 num_val=1 seed=0 knobs={}\n"
    assert (old / "README.txt").read_text().startswith("Toy dataset generated by common.data.make_toy (version 4")
    # Every body wears its own class's colour: with the colour jitter and pixel noise off (they draw the same
    # numbers at std 0), most pixels of an object lie within 12 (JPEG) of one TOY_BODY row, and under v4 that row
    # is the object's own class for every object of the first 40 train images (v3's body_shared 0.3: 14 of 57
    # objects wear another class's body).
    flat = {"colour_spread": 0.0, "noise": 0.0}
    for knobs, want_other in ((flat, 0), ({**flat, **data.TOY_V3_KNOBS}, 14)):
        root = data.make_toy(tmp_path / f"flat-{want_other}", num_train=40, num_val=1, knobs=knobs)
        other = 0
        for i in range(40):
            image = np.asarray(Image.open(root / "JPEGImages" / f"train_{i:05d}.jpg").convert("RGB"), float)
            mask = data.read_mask(root / "SegmentationClass" / f"train_{i:05d}.png")
            for c in [c for c in np.unique(mask) if 0 < c < 255]:
                dist = np.abs(image[mask == c][:, None] - data.TOY_BODY[None]).max(-1)  # (pixels, 6)
                votes = np.bincount(dist.argmin(1)[dist.min(1) < 12], minlength=6)
                other += int(votes.argmax() != c - 1)
        assert other == want_other
