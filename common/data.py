"""Dataset loading shared by the five method scripts.

PASCAL VOC 2012 (+ SBD `SegmentationClassAug`), COCO 2014 with pre-rendered VOC-style masks,
any VOC-layout folder (optionally with `classes.txt`), and the generated toy dataset.
Conventions (ignore index 255, class order, palette, label layout) follow
../shared/methods/common.md; every bad-dataset condition raises `DataError` with one line that
says what is wrong and how to fix it, which the scripts turn into exit code 2.

Arrays: image uint8 (H, W, 3) RGB; mask uint8 (H, W) with values 0..C-1 and 255;
image label float32 (C-1,) multi-hot without background.
"""
from __future__ import annotations

import os
import shutil
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = [
    "IGNORE_INDEX", "VOC_CLASSES", "COCO_CLASSES", "COCO_CATEGORY_IDS", "IMAGENET_MEAN", "IMAGENET_STD",
    "DataError", "DataSpec", "voc_palette", "save_mask", "read_image", "read_mask", "read_class_names",
    "split_ids", "image_labels", "SegDataset", "make_toy", "resolve_data", "default_splits",
    "TOY_VERSION", "TOY_V3_KNOBS", "REPO_ROOT",
]

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REPO_ROOT = Path(__file__).resolve().parents[1]

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
# The 80 COCO "thing" categories in ascending category id; contiguous label = position + 1.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie",
    "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove",
    "skateboard", "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)

VOC_MASK_DIRS = ("SegmentationClass", "SegmentationClassAug")  # per id, the first folder holding it wins
NUM_TRAIN_AUG = 10582


class DataError(Exception):
    """A problem with the dataset on disk. `str(e)` is one line the user can act on.

    DataLoader workers re-raise exceptions with the worker traceback folded into the message;
    `__str__` recovers the original one-line message so the scripts can still print one line.
    """

    def __str__(self) -> str:
        msg = super().__str__()
        if "Traceback" in msg:
            last = [ln for ln in msg.strip().splitlines() if ln.strip()][-1]
            msg = last.split("DataError: ", 1)[-1]
        return msg


@dataclass(frozen=True)
class DataSpec:
    """Where a dataset lives and which layout it has (`voc` or `coco`); `name` is used in run names."""
    root: Path
    dataset: str
    name: str


# ---------------------------------------------------------------------------------------------
# Files: palette, images, masks
# ---------------------------------------------------------------------------------------------
def voc_palette() -> np.ndarray:
    """The VOC colour map, uint8 (256, 3): the bits of the index are spread over R, G, B from the top bit down."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


def save_mask(path, mask) -> None:
    """Write a uint8 (H, W) label map as a P-mode PNG with the VOC palette (255 shows as the void colour)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"save_mask expects a (H, W) label map, got shape {mask.shape}")
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError("save_mask: label values must lie in 0..255")
        mask = mask.astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(mask, mode="P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    image.save(path)


def read_image(path) -> np.ndarray:
    """Any image mode (L, RGB, RGBA, CMYK, P, ...) as uint8 (H, W, 3) RGB."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)  # a writable copy, unlike np.asarray
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except Exception as exc:  # PIL raises several types for truncated or non-image files
        raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}); replace or remove it") from None


def read_mask(path) -> np.ndarray:
    """A label PNG as uint8 (H, W) class indices: P-mode masks give their palette indices, L-mode their values.

    PIL keeps palette indices (imageio would apply the palette and return colours)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L", "I", "I;16"):
                raise DataError(f"mask {path} has mode {image.mode}; expected a single-channel (P or L) PNG of class indices")
            mask = np.array(image)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"mask {path} does not exist") from None
    except Exception as exc:
        raise DataError(f"cannot read mask {path} ({type(exc).__name__}: {exc})") from None
    if mask.ndim != 2:
        raise DataError(f"mask {path} is not 2-D (shape {mask.shape})")
    if mask.dtype != np.uint8:
        if mask.max() > 255:
            raise DataError(f"mask {path} has values above 255")
        mask = mask.astype(np.uint8)
    return mask


def read_class_names(root, dataset: str = "voc") -> tuple[str, ...]:
    """`classes.txt` (one name per line, background first) if present, else the VOC or COCO names."""
    path = Path(root) / "classes.txt"
    if path.is_file():
        names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
        if len(names) < 2:
            raise DataError(f"{path} must list background and at least one class, one name per line")
        if len(names) > 255:
            raise DataError(f"{path} lists {len(names)} classes; at most 255 fit in a uint8 mask with 255 = ignore")
        return names
    return COCO_CLASSES if dataset == "coco" else VOC_CLASSES


# ---------------------------------------------------------------------------------------------
# Splits and image-level labels
# ---------------------------------------------------------------------------------------------
def _read_list(path: Path) -> list[str]:
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split file {path} is empty; it should list one image id per line")
    return ids


def _coco_folder(split: str) -> str:
    return {"train": "train2014", "val": "val2014"}.get(split, split)


def _coco_stem(image_id: str, folder: str) -> str:
    # Lists may hold bare 12-digit ids (PNOC) or full stems (MCTformer, CoSA).
    image_id = image_id.rsplit(".", 1)[0] if image_id.endswith(".jpg") else image_id
    return f"COCO_{folder}_{int(image_id):012d}" if image_id.isdigit() else image_id


def split_ids(root, split: str, dataset: str = "voc") -> list[str]:
    """Image ids of a split.

    VOC layout: `ImageSets/Segmentation/<split>.txt`; without `train_aug.txt`, `train_aug` is the
    stems of `SegmentationClassAug/` minus `val` (10,582 on the real data).
    COCO layout: `ImageSets/Segmentation/<split>.txt` if present, else every image of
    `train2014/` or `val2014/` that has a mask.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; see data/README.md for the expected layout (or use --data toy)")
    list_path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if dataset == "coco":
        folder = _coco_folder(split)
        if list_path.is_file():
            return [_coco_stem(i, folder) for i in _read_list(list_path)]
        if not (root / folder).is_dir():
            raise DataError(f"{root} has no {folder}/ folder and no ImageSets/Segmentation/{split}.txt; see data/README.md")
        mask_dir = _coco_mask_dir(root, folder)
        have_mask = {p.stem for p in mask_dir.glob("*.png")}
        ids = sorted(p.stem for p in (root / folder).glob("*.jpg")
                     if p.stem in have_mask or p.stem.rsplit("_", 1)[-1] in have_mask)
        if not ids:
            raise DataError(f"no image of {root / folder} has a mask in {mask_dir}; see data/README.md")
        return ids
    if list_path.is_file():
        return _read_list(list_path)
    if split == "train_aug" and (root / "SegmentationClassAug").is_dir():
        val_path = root / "ImageSets" / "Segmentation" / "val.txt"
        val = set(_read_list(val_path)) if val_path.is_file() else set()
        ids = sorted(p.stem for p in (root / "SegmentationClassAug").glob("*.png") if p.stem not in val)
        if not ids:
            raise DataError(f"{root / 'SegmentationClassAug'} holds no PNG masks, so train_aug is empty")
        if len(ids) != NUM_TRAIN_AUG:
            warnings.warn(f"train_aug derived from SegmentationClassAug/ has {len(ids)} ids, not the canonical {NUM_TRAIN_AUG}")
        return ids
    raise DataError(f"split file {list_path} is missing; create it (one image id per line) or choose another split")


def _coco_mask_dir(root: Path, folder: str) -> Path:
    for candidate in (root / "SegmentationClass" / folder, root / "coco_seg_anno"):
        if candidate.is_dir():
            return candidate
    raise DataError(f"{root} has neither SegmentationClass/{folder}/ nor coco_seg_anno/ (COCO masks); see data/README.md")


def _labels_from_xml(path: Path, class_names) -> np.ndarray:
    label = np.zeros(len(class_names) - 1, dtype=np.float32)
    index = {name: i for i, name in enumerate(class_names)}
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"cannot parse annotation {path} ({exc})") from None
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in index or index[name] == 0:
            raise DataError(f"annotation {path} names class '{name}', which is not in the class list")
        label[index[name] - 1] = 1.0
    return label


def _labels_from_mask(mask: np.ndarray, num_classes: int, where: str = "") -> np.ndarray:
    values = np.unique(mask)
    bad = values[(values >= num_classes) & (values != IGNORE_INDEX)]
    if bad.size:
        raise DataError(f"mask {where} has value {int(bad[0])}, but the dataset has only {num_classes} classes "
                        f"(0..{num_classes - 1}, 255 = ignore); fix the mask or list the classes in classes.txt")
    label = np.zeros(num_classes - 1, dtype=np.float32)
    fg = values[(values > 0) & (values < num_classes)]
    label[fg.astype(np.int64) - 1] = 1.0
    return label


def image_labels(root, ids, source: str = "xml", cache=None, *, dataset: str = "voc") -> dict[str, np.ndarray]:
    """Multi-hot image labels float32 (C-1,) keyed by string id.

    `source="xml"`: the `<object><name>` tags of `Annotations/<id>.xml` (the published VOC
    convention); `source="mask"`: the mask values minus {0, 255}. `cache`: optional `.npy` path
    holding the dict; reused when it covers every id.
    """
    root = Path(root)
    if cache is not None and Path(cache).is_file():
        stored = np.load(cache, allow_pickle=True).item()
        if all(i in stored for i in ids):
            return {i: stored[i] for i in ids}
    class_names = read_class_names(root, dataset)
    labels = {}
    if source == "xml":
        for i in ids:
            path = root / "Annotations" / f"{i}.xml"
            if not path.is_file():
                raise DataError(f"annotation {path} is missing (labels are read from Annotations/ when that folder exists)")
            labels[i] = _labels_from_xml(path, class_names)
    elif source == "mask":
        finder = _MaskFinder(root, dataset, None)
        for i in ids:
            path = finder.path(i)
            if path is None:
                raise DataError(f"no mask for image {i} in {finder.describe()}; image labels come from masks when there is no Annotations/")
            labels[i] = _labels_from_mask(read_mask(path), len(class_names), str(path))
    else:
        raise ValueError(f"unknown label source {source!r}; use 'xml' or 'mask'")
    if cache is not None:
        np.save(cache, labels, allow_pickle=True)
    return labels


class _MaskFinder:
    """Locates `<id>.png` in the mask folder(s) of a layout; folder listings are read once."""

    def __init__(self, root: Path, dataset: str, mask_dir, split: str | None = None):
        if mask_dir is not None:
            dirs = [Path(mask_dir) if Path(mask_dir).is_absolute() else root / mask_dir]
        elif dataset == "coco":
            dirs = [d for d in (root / "SegmentationClass" / "train2014", root / "SegmentationClass" / "val2014",
                                root / "coco_seg_anno") if d.is_dir()]
        else:
            dirs = [root / d for d in VOC_MASK_DIRS if (root / d).is_dir()]
        self.dirs = [d for d in dirs if d.is_dir()]
        self.listing = [{p.stem for p in d.glob("*.png")} for d in self.dirs]
        self.coco = dataset == "coco"

    def describe(self) -> str:
        return ", ".join(str(d) for d in self.dirs) or "(no mask folder)"

    def path(self, image_id: str):
        keys = [image_id]
        if self.coco:  # coco_seg_anno names masks by the bare 12-digit id
            keys.append(image_id.rsplit("_", 1)[-1])
        for d, names in zip(self.dirs, self.listing):
            for key in keys:
                if key in names:
                    return d / f"{key}.png"
        return None


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------
class SegDataset:
    """One split of a VOC- or COCO-layout dataset.

    A sample is `{"name", "image" uint8 (H, W, 3), "mask" uint8 (H, W) (when the split has masks),
    "label" float32 (C-1,), **extras}` where `extras` are uint8 (H, W) maps read from
    `extra_dirs[key]/<id>.png` (saliency, pseudo labels). `ds[i]` returns `transform(sample, rng)`
    with `rng = np.random.default_rng((seed, epoch, i))`, so the augmentation of an image depends
    on (seed, epoch, index) only, never on the number of DataLoader workers.
    """

    def __init__(self, root, split: str, *, dataset: str = "voc", mask_dir=None, extra_dirs=None,
                 transform=None, seed: int = 0, label_source: str | None = None):
        self.root = Path(root)
        self.split, self.dataset, self.transform, self.seed, self.epoch = split, dataset, transform, seed, 0
        if not self.root.is_dir():
            raise DataError(f"dataset folder {self.root} does not exist; see data/README.md for the expected layout (or use --data toy)")
        self.class_names = read_class_names(self.root, dataset)
        self.num_classes = len(self.class_names)
        self.ids = split_ids(self.root, split, dataset)

        # Images: JPEGImages/ (VOC) or train2014/ / val2014/ (COCO).
        if dataset == "coco":
            self.image_dir = self.root / _coco_folder(split)
            if not self.image_dir.is_dir():
                self.image_dir = self.root / ("val2014" if any("val2014" in i for i in self.ids[:1]) else "train2014")
        else:
            self.image_dir = self.root / "JPEGImages"
        if not self.image_dir.is_dir():
            raise DataError(f"{self.root} has no {self.image_dir.name}/ folder; expected the layout in data/README.md")
        have = {p.stem: p for p in self.image_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        missing = [i for i in self.ids if i not in have]
        if missing:
            raise DataError(f"{len(missing)} ids of split '{split}' have no image in {self.image_dir} (first: {missing[0]}); "
                            "fix the split file or add the images")
        self.image_paths = [have[i] for i in self.ids]

        # Masks: the test split has none; any other split must have one per id.
        self.masks = _MaskFinder(self.root, dataset, mask_dir)
        if not self.masks.dirs and split != "test":
            expected = "SegmentationClass/ or SegmentationClassAug/" if dataset == "voc" else "SegmentationClass/<split>2014/ or coco_seg_anno/"
            raise DataError(f"{self.root} has no mask folder ({expected}); see data/README.md")
        self.mask_paths = [self.masks.path(i) for i in self.ids] if self.masks.dirs else [None] * len(self.ids)
        without = [i for i, p in zip(self.ids, self.mask_paths) if p is None]
        if without and split != "test":
            raise DataError(f"{len(without)} ids of split '{split}' have no mask in {self.masks.describe()} (first: {without[0]})")

        # Image-level labels: Annotations/*.xml when that folder exists, otherwise from the masks (lazily).
        if label_source is None:
            label_source = "xml" if (dataset == "voc" and (self.root / "Annotations").is_dir()) else "mask"
        self.label_source = label_source
        self._labels = image_labels(self.root, self.ids, "xml", dataset=dataset) if label_source == "xml" else {}

        self.extra_dirs = {}
        for key, folder in (extra_dirs or {}).items():
            folder = Path(folder)
            if not folder.is_dir():
                raise DataError(f"folder {folder} for '{key}' maps does not exist")
            self.extra_dirs[key] = folder

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def label(self, index: int) -> np.ndarray:
        """Image label of one sample (reads the mask once when labels come from masks)."""
        name = self.ids[index]
        if name not in self._labels:
            path = self.mask_paths[index]
            if path is None:
                return np.zeros(self.num_classes - 1, dtype=np.float32)
            self._labels[name] = _labels_from_mask(read_mask(path), self.num_classes, str(path))
        return self._labels[name]

    def labels(self) -> np.ndarray:
        """All image labels, float32 (N, C-1), in `ids` order (e.g. for a single/multi-label split)."""
        return np.stack([self.label(i) for i in range(len(self))]) if len(self) else np.zeros((0, self.num_classes - 1), np.float32)

    def load(self, index: int) -> dict:
        """The raw sample (no transform), with every consistency check of the files."""
        name = self.ids[index]
        image = read_image(self.image_paths[index])
        sample = {"name": name, "image": image}
        if self.mask_paths[index] is not None:
            path = self.mask_paths[index]
            mask = read_mask(path)
            if mask.shape != image.shape[:2]:
                raise DataError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                                f"{image.shape[1]}x{image.shape[0]}; masks must match their images")
            label = _labels_from_mask(mask, self.num_classes, str(path))  # also validates the values
            self._labels.setdefault(name, label)
            sample["mask"] = mask
        sample["label"] = self.label(index).copy()
        for key, folder in self.extra_dirs.items():
            path = folder / f"{name}.png"
            if not path.is_file():
                raise DataError(f"'{key}' map {path} is missing")
            extra = read_mask(path)
            if extra.shape != image.shape[:2]:
                raise DataError(f"'{key}' map {path} is {extra.shape[1]}x{extra.shape[0]} but its image is "
                                f"{image.shape[1]}x{image.shape[0]}")
            sample[key] = extra
        return sample

    def __getitem__(self, index: int):
        sample = self.load(index)
        if self.transform is None:
            return sample
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return self.transform(sample, rng)


# ---------------------------------------------------------------------------------------------
# Resolving --data
# ---------------------------------------------------------------------------------------------
def resolve_data(spec: str, *, toy_train: int = 1000, toy_val: int = 200) -> DataSpec:
    """`toy`, `VOC2012`, `COCO2014` (bare names: `<repo>/data/<name>`) or a path to a dataset folder.

    `toy` generates `<repo>/data/toy` on first use and whenever its generator version changed.
    A folder holding `train2014/` is read with the COCO layout, anything else as VOC layout.
    """
    spec = str(spec)
    if spec == "toy":
        root = REPO_ROOT / "data" / "toy"
        make_toy(root, num_train=toy_train, num_val=toy_val, seed=0)
        return DataSpec(root, "voc", "toy")
    is_name = os.sep not in spec and "/" not in spec and not spec.startswith(".")
    root = (REPO_ROOT / "data" / spec) if is_name and not Path(spec).is_dir() else Path(spec).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; put the data there as data/README.md describes, "
                        "pass --data PATH, or use --data toy")
    # A VOCdevkit download nests the data one level down; accept the outer folder too.
    if not (root / "JPEGImages").is_dir() and (root / "VOC2012" / "JPEGImages").is_dir():
        root = root / "VOC2012"
    dataset = "coco" if (root / "train2014").is_dir() or (root / "val2014").is_dir() else "voc"
    if dataset == "voc" and not (root / "JPEGImages").is_dir():
        raise DataError(f"{root} has no JPEGImages/ folder; expected the VOC layout in data/README.md")
    return DataSpec(root, dataset, root.name if not is_name else spec)


def default_splits(spec: DataSpec) -> dict[str, str]:
    """The split a method trains on, the one its seeds/pseudo labels are scored on, and val."""
    if spec.dataset == "coco":
        return {"train": "train", "seed": "train", "val": "val"}
    return {"train": "train_aug", "seed": "train", "val": "val"}


# ---------------------------------------------------------------------------------------------
# The toy dataset
# ---------------------------------------------------------------------------------------------
TOY_VERSION = 4
TOY_CLASSES = ("background", "boat", "train", "cow", "bird", "car", "person")
# Unlabeled context (stays background in the masks) that comes with a class, like water under
# boats, rails under trains and grass under cows: plain CAMs learn it as evidence and spill into it.
TOY_CONTEXT = {1: "water", 2: "rails", 3: "grass"}
# Which classes go together: the first class is drawn from TOY_PRIOR, the others from its row.
# Zero entries are pairs that never co-occur (boat-train, boat-cow, train-cow, bird-train).
TOY_PRIOR = np.array([0.17, 0.15, 0.17, 0.15, 0.18, 0.18])
TOY_COOCCUR = np.array([
    # boat train cow  bird car  person
    [0.0, 0.0, 0.0, 0.35, 0.0, 0.65],   # boat: people on boats, birds over water
    [0.0, 0.0, 0.0, 0.0, 0.3, 0.7],     # train: platforms with people, cars at crossings
    [0.0, 0.0, 0.0, 0.45, 0.1, 0.45],   # cow: birds and farmers
    [0.4, 0.0, 0.45, 0.0, 0.0, 0.15],   # bird
    [0.0, 0.2, 0.05, 0.0, 0.0, 0.75],   # car
    [0.25, 0.2, 0.15, 0.05, 0.35, 0.0],  # person
])
# Each class has one saturated signature colour on one part of its shape (the sail, the cab, the head,
# the wings, the wheels, the head: indices into _toy_polygon's parts). It is the easiest cue, so a
# classifier's CAM fires on it first: the partial activation of large objects that WSSS methods attack.
TOY_SIGNATURE = np.array([[235, 40, 40], [250, 210, 30], [150, 60, 230], [30, 200, 230], [40, 220, 70],
                          [250, 120, 200]], float)
TOY_SIGNATURE_PARTS = {1: {1}, 2: {1}, 3: {1}, 4: {1, 2}, 5: {2, 3}, 6: {1}}
# Body colour of each class. With probability body_shared a body takes a random class's colour instead
# (v3: 0.3), so that the body alone does not always say the class; v4 sets it to 0: the shared bodies made
# recognition, not WSSS, the hard part (data/README.md: calibration).
TOY_BODY = np.array([[175, 105, 80], [95, 110, 165], [130, 100, 70], [150, 140, 90], [80, 150, 150],
                     [185, 150, 120]], float)
# The knobs that calibrate the toy (data/README.md says what each does to the measured numbers). Toy v4 is
# v3 with body_shared 0.3 -> 0.0 and limb 1.0 -> 2.0 in the same code, so make_toy(knobs=TOY_V3_KNOBS) writes
# v3's images, masks and maps byte for byte.
TOY_KNOBS = {
    "size": (0.3, 0.55),      # object scale as a fraction of the shorter side (trains, cows x 0.75)
    "body_shared": 0.0,       # probability that a body takes a random class's body colour (v3: 0.3)
    "colour_spread": 18.0,    # std of the per-object colour jitter
    "context_p": 0.9,         # probability that a class's context is painted when the class is present
    "stray_context_p": 0.08,  # probability of one context without its class
    "distractors": (0, 2),    # low-saturation strokes on the background (min, max)
    "noise": 5.0,             # pixel noise std
    "sal_miss": 0.1,          # stand-in saliency: probability that an object is missing from it
    "sal_blobs": 0.35,        # stand-in saliency: probability of a false blob
    "sal_noise": 12.0,        # stand-in saliency: pixel noise std (0-255 scale; 0 = noise-free)
    "sal_blur": (1.0, 2.5),   # stand-in saliency: Gaussian blur radius range (min, max); (0, 0) = sharp
    "limb": 2.0,              # width of the thin parts (cow legs, bird wings) as a multiple of v3's
}
TOY_V3_KNOBS = {"body_shared": 0.3, "limb": 1.0}
_TOY_PROBABILITIES = ("body_shared", "context_p", "stray_context_p", "sal_miss", "sal_blobs")
_TOY_STDS = ("colour_spread", "noise", "sal_noise")
_TOY_POSITIVE = ("limb",)
_TOY_RANGES = ("size", "distractors", "sal_blur")


def _check_toy_knobs(knobs: dict) -> None:
    """ValueError naming the first knob whose value is out of range (probabilities in [0, 1], stds >= 0,
    limb > 0, (min, max) ranges with 0 <= min <= max, size > 0)."""
    def number(v):
        return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and np.isfinite(v)

    for k, v in knobs.items():
        if k in _TOY_PROBABILITIES:
            ok, want = number(v) and 0 <= v <= 1, "a probability in [0, 1]"
        elif k in _TOY_STDS:
            ok, want = number(v) and v >= 0, "a finite number >= 0"
        elif k in _TOY_POSITIVE:
            ok, want = number(v) and v > 0, "a finite number > 0"
        elif k in _TOY_RANGES:
            ok = (isinstance(v, (tuple, list)) and len(v) == 2 and all(map(number, v))
                  and (0 < v[0] if k == "size" else 0 <= v[0]) and v[0] <= v[1]
                  and (k != "distractors" or all(float(x).is_integer() for x in v)))  # a count: rng.integers
            want = "a (min, max) pair with " + ("0 < min <= max" if k == "size" else "0 <= min <= max") + (
                ", whole numbers" if k == "distractors" else "")
        else:
            continue
        if not ok:
            raise ValueError(f"invalid toy knob {k}={v!r}: must be {want}")


def _toy_polygon(cls: int, rng, size: float, limb: float = 1.0) -> list[np.ndarray]:
    """Parts of a class's shape as polygons around the origin (before rotation); see TOY_SIGNATURE_PARTS.
    `limb` widens the thin parts (legs, wings) that a stride-8 output cannot resolve."""
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    ellipse = lambda a, b, cx=0.0, cy=0.0: np.stack([cx + a * np.cos(t), cy + b * np.sin(t)], 1)
    jitter = lambda: rng.uniform(0.85, 1.15)
    if cls == 1:  # boat: a hull (lower half-ellipse) and a triangular sail
        half = np.linspace(0, np.pi, 12)
        hull = np.stack([size * np.cos(half), 0.35 * size * np.sin(half) * jitter()], 1)
        sail = np.array([[-0.05 * size, 0.0], [0.05 * size, -1.1 * size * jitter()], [0.6 * size, 0.0]])
        return [hull, sail]
    if cls == 2:  # train: a long box with a cab
        length, height = 1.2 * size * jitter(), 0.45 * size
        body = np.array([[-length, -height], [length, -height], [length, height], [-length, height]])
        cab = np.array([[length * 0.55, -height * 1.8], [length, -height * 1.8], [length, -height], [length * 0.55, -height]])
        return [body, cab]
    if cls == 3:  # cow: a big body, a head, four legs
        body = ellipse(size, 0.55 * size * jitter())
        head = ellipse(0.3 * size, 0.25 * size, cx=1.05 * size, cy=-0.35 * size)
        half = 0.08 * limb * size
        legs = [np.array([[x - half, 0.3 * size], [x + half, 0.3 * size],
                          [x + half, 0.95 * size], [x - half, 0.95 * size]]) for x in (-0.7 * size, -0.4 * size, 0.4 * size, 0.7 * size)]
        return [body, head, *legs]
    if cls == 4:  # bird: a small body with two swept wings
        body = ellipse(0.45 * size, 0.22 * size)
        wing = lambda s: np.array([[-0.1 * limb * size, 0.0], [s * 0.2 * size, -0.9 * size * jitter()], [0.25 * limb * size, 0.0]])
        return [body, wing(-1), wing(1)]
    if cls == 5:  # car: a low box, a cabin and two wheels
        w = 1.1 * size * jitter()
        body = np.array([[-w, -0.1 * size], [w, -0.1 * size], [w, 0.35 * size], [-w, 0.35 * size]])
        cabin = np.array([[-0.55 * w, -0.1 * size], [-0.35 * w, -0.5 * size], [0.4 * w, -0.5 * size], [0.6 * w, -0.1 * size]])
        wheels = [ellipse(0.22 * size, 0.22 * size, cx=x, cy=0.4 * size) for x in (-0.6 * w, 0.6 * w)]
        return [body, cabin, *wheels]
    # person: an upright body and a round head
    body = ellipse(0.28 * size * jitter(), 0.75 * size, cy=0.25 * size)
    head = ellipse(0.2 * size, 0.2 * size, cy=-0.72 * size)
    return [body, head]


def _toy_background(rng, shape: tuple[int, int], knobs: dict) -> np.ndarray:
    """Low-saturation background: a grey-ish colour gradient, soft blobs and a few grey strokes.

    Unlike the objects it holds no saturated colour, so recognising an object is easy; what stays hard is
    what image labels cannot say (where an object ends, what belongs to its context)."""
    h, w = shape
    grey = rng.uniform(70, 190)
    base = grey + rng.normal(0, 8, 3)
    yy = np.arange(h, dtype=np.float32)[:, None, None] / h - 0.5
    low = np.asarray(Image.fromarray(rng.integers(0, 255, (5, 5), dtype=np.uint8)).resize((w, h), Image.BICUBIC), np.float32)
    image = base[None, None] + rng.uniform(-40, 40) * yy + 0.2 * (low[..., None] - 128)
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(knobs["distractors"][0], knobs["distractors"][1] + 1))):
        colour = tuple(int(v) for v in np.clip(rng.uniform(40, 220) + rng.normal(0, 6, 3), 0, 255))
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        draw.line([(x0, y0), (x0 + rng.uniform(-40, 40), y0 + rng.uniform(-40, 40))], fill=colour, width=int(rng.integers(2, 5)))
    return np.asarray(canvas, np.float32)


def _toy_context(kind: str, rng, image: np.ndarray, top: float) -> int:
    """Paint a class's unlabeled context from row `top` downwards, in place; returns that row."""
    h, w, _ = image.shape
    y0 = int(np.clip(top, h * 0.35, h - 6))
    yy, xx = np.mgrid[y0:h, 0:w].astype(np.float32)
    if kind == "water":  # blue with wave ripples
        colour = np.array([40, 90, 170]) + rng.normal(0, 10, 3)
        ripple = 18 * np.sin(xx / rng.uniform(3, 6) + yy * 0.8)[..., None]
        image[y0:] = colour[None, None] + ripple
    elif kind == "grass":  # green with vertical blades
        colour = np.array([70, 140, 50]) + rng.normal(0, 10, 3)
        image[y0:] = colour[None, None] - 25 * (np.sin(xx * 1.7 + rng.uniform(0, 6)) > 0.6)[..., None]
    else:  # rails: two dark lines with sleepers on gravel
        image[y0:] = (np.array([120, 110, 100]) + rng.normal(0, 8, 3))[None, None] + rng.normal(0, 12, (h - y0, w, 1))
        band = min(10, h - y0)
        for x in range(int(rng.integers(0, 6)), w, 7):
            image[y0:y0 + band, x:x + 2] = (80, 55, 35)
        image[y0 + 1:y0 + 3] = (45, 45, 50)
        image[min(h - 1, y0 + band - 3):min(h, y0 + band - 1)] = (45, 45, 50)
    return y0


def _toy_sample(rng, knobs: dict = TOY_KNOBS) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One toy image, its mask (with the 255 outline band), a GT-derived stand-in saliency map and the
    context map (0 none, then 1, 2, 3 in TOY_CONTEXT order, 0 under objects)."""
    h, w = int(rng.integers(96, 129)), int(rng.integers(96, 129))
    num = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    first = int(rng.choice(6, p=TOY_PRIOR))
    classes = [first]
    while len(classes) < num:
        # Later classes follow the first one's row and must be allowed with every class already drawn.
        allowed = np.all([(TOY_COOCCUR[c] + TOY_COOCCUR[:, c]) > 0 for c in classes], axis=0)
        p = TOY_COOCCUR[first] * allowed
        p[classes] = 0
        if p.sum() == 0:
            break
        classes.append(int(rng.choice(6, p=p / p.sum())))
    labels = [c + 1 for c in classes]

    image = _toy_background(rng, (h, w), knobs)
    context = np.zeros((h, w), np.uint8)
    # Context of each present class (and rarely without it, so it is a strong but not perfect cue).
    kinds = {TOY_CONTEXT[c] for c in labels if c in TOY_CONTEXT and rng.random() < knobs["context_p"]}
    # A stray context only on an image without one: two painted contexts would overwrite each other.
    if rng.random() < knobs["stray_context_p"] and not kinds:
        kinds.add(rng.choice(list(TOY_CONTEXT.values())))
    horizon = rng.uniform(0.55, 0.75) * h
    for kind in sorted(kinds):
        y0 = _toy_context(kind, rng, image, horizon + rng.uniform(-6, 6))
        context[y0:] = list(TOY_CONTEXT.values()).index(kind) + 1

    mask = np.zeros((h, w), np.uint8)
    instances = [c for c in labels for _ in range(1 if rng.random() < 0.75 else 2)]
    rng.shuffle(instances)
    for cls in instances:
        size = rng.uniform(*knobs["size"]) * min(h, w) * (0.75 if cls in (2, 3) else 1.0)
        # Objects with ground context stand on it; the others float anywhere.
        cx = rng.uniform(0.25, 0.75) * w
        cy = horizon - 0.2 * size if cls in TOY_CONTEXT else rng.uniform(0.3, 0.7) * h
        angle = rng.normal(0, 0.12) if cls in TOY_CONTEXT else rng.uniform(-0.5, 0.5)
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        flip = -1.0 if rng.random() < 0.5 else 1.0
        body_cls = cls if rng.random() >= knobs["body_shared"] else int(rng.integers(1, 7))
        body = np.clip(TOY_BODY[body_cls - 1] + rng.normal(0, knobs["colour_spread"], 3), 0, 255)
        sign = np.clip(TOY_SIGNATURE[cls - 1] + rng.normal(0, knobs["colour_spread"] / 2, 3), 0, 255)
        parts = Image.new("L", (w, h), 0)  # 1 body, 2 signature part
        draw = ImageDraw.Draw(parts)
        for k, poly in enumerate(_toy_polygon(cls, rng, size, knobs["limb"])):
            pts = (poly * [flip, 1.0]) @ rot.T + [cx, cy]
            draw.polygon([tuple(p) for p in pts], fill=2 if k in TOY_SIGNATURE_PARTS[cls] else 1)
        parts = np.asarray(parts)
        image[parts == 1] = body
        image[parts == 2] = sign
        mask[parts > 0] = cls  # later objects occlude earlier ones
    context[mask > 0] = 0
    image = np.clip(image + rng.normal(0, knobs["noise"], image.shape), 0, 255).astype(np.uint8)

    # VOC-style void band: pixels whose 3x3 neighbourhood holds another label.
    padded = np.pad(mask, 1, mode="edge")
    edge = np.zeros((h, w), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            edge |= padded[dy:dy + h, dx:dx + w] != mask
    out_mask = mask.copy()
    out_mask[edge] = IGNORE_INDEX

    # Stand-in saliency (GT-derived): blurred foreground, some objects missed, false blobs, noise.
    present = [c for c in np.unique(mask) if c > 0]
    sal = np.isin(mask, [c for c in present if rng.random() >= knobs["sal_miss"]]).astype(np.float32)
    blobs = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(blobs)
    for _ in range(int(rng.random() < knobs["sal_blobs"]) + int(rng.random() < knobs["sal_blobs"] / 3)):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 14)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=int(rng.uniform(120, 230)))
    sal = np.maximum(sal, np.asarray(blobs, np.float32) / 255.0)
    sal_img = Image.fromarray((sal * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(*knobs["sal_blur"])))
    sal = np.clip(np.asarray(sal_img, np.float32) + rng.normal(0, knobs["sal_noise"], (h, w)), 0, 255).astype(np.uint8)
    return image, out_mask, sal, context


TOY_README = """Toy dataset generated by common.data.make_toy (version {version}, seed {seed}, knobs {knobs}).
VOC layout: JPEGImages/, SegmentationClass/ (P-mode, 255 = outline band), ImageSets/Segmentation/,
classes.txt. Image labels come from the masks (there is no Annotations/).
saliency/<id>.png are STAND-IN saliency maps DERIVED FROM THE GROUND-TRUTH MASKS (blurred, with missed
objects, false blobs and noise) so that AuxSegNet can run; they are not the output of a saliency model.
Unlabeled context: water comes with boats, rails with trains, grass with cows (pixels stay background);
context/<id>.png marks it (1 water, 2 rails, 3 grass, 0 elsewhere and under objects) for tests/bench/toy_errors.py.
"""


def _toy_stamp(num_train: int, num_val: int, seed: int, knobs: dict) -> str:
    changed = {k: v for k, v in knobs.items() if TOY_KNOBS[k] != v}
    return f"version={TOY_VERSION} num_train={num_train} num_val={num_val} seed={seed} knobs={changed}\n"


def make_toy(root, *, num_train: int = 1000, num_val: int = 200, seed: int = 0, knobs: dict | None = None) -> Path:
    """Generate the toy dataset in VOC layout at `root` (deterministic in `seed` and `knobs`).

    `knobs` overrides entries of TOY_KNOBS (data/README.md: what each does). Reuses an existing folder whose
    `toy_version.txt` matches the generator version and the arguments; otherwise writes a fresh one into a
    temporary folder and renames it into place, so an interrupted or concurrent generation never leaves a
    half-written dataset behind.
    """
    unknown = set(knobs or {}) - set(TOY_KNOBS)
    if unknown:
        raise ValueError(f"unknown toy knobs {sorted(unknown)}; known: {sorted(TOY_KNOBS)}")
    knobs = {**TOY_KNOBS, **(knobs or {})}
    _check_toy_knobs(knobs)
    root = Path(root)
    stamp = _toy_stamp(num_train, num_val, seed, knobs)
    stamp_path = root / "toy_version.txt"
    if stamp_path.is_file() and stamp_path.read_text() == stamp:
        return root
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("JPEGImages", "SegmentationClass", "saliency", "context", "ImageSets/Segmentation"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    (tmp / "classes.txt").write_text("\n".join(TOY_CLASSES) + "\n")
    (tmp / "README.txt").write_text(TOY_README.format(version=TOY_VERSION, seed=seed, knobs=knobs))
    splits = {"train": [f"train_{i:05d}" for i in range(num_train)], "val": [f"val_{i:05d}" for i in range(num_val)]}
    for split_index, (split, ids) in enumerate(splits.items()):
        for index, name in enumerate(ids):
            image, mask, sal, context = _toy_sample(np.random.default_rng((seed, split_index, index)), knobs)
            Image.fromarray(image).save(tmp / "JPEGImages" / f"{name}.jpg", quality=92)
            save_mask(tmp / "SegmentationClass" / f"{name}.png", mask)
            Image.fromarray(sal).save(tmp / "saliency" / f"{name}.png")
            Image.fromarray(context).save(tmp / "context" / f"{name}.png")
    lists = {"train": splits["train"], "val": splits["val"], "train_aug": splits["train"],
             "trainval": splits["train"] + splits["val"]}
    for split, ids in lists.items():
        (tmp / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (tmp / "toy_version.txt").write_text(stamp)
    # Swap into place; if another process finished first with the same stamp, keep theirs.
    if stamp_path.is_file() and stamp_path.read_text() == stamp:
        shutil.rmtree(tmp, ignore_errors=True)
        return root
    shutil.rmtree(root, ignore_errors=True)
    try:
        os.replace(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (stamp_path.is_file() and stamp_path.read_text() == stamp):
            raise
    return root
