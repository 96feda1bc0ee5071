"""csrm.py --sepl: SAM Enhanced Pseudo-Labels (Chen et al. 2023, arXiv 2305.05803; CSRM Table 2 rows 4-5).

  * sepl_merge() on hand-made masks, one test per rule, each naming the one-line bug it catches;
  * make_pseudo_labels() / main() wiring with a fake mask generator: SEPL refines the dCRF label, is scored as
    pseudo_sepl/*, and the verification network trains on it;
  * the real SamAutomaticMaskGenerator on a 32 x 32 image with a tiny randomly initialised SAM;
  * bad --sepl / --sam-ckpt input: one line, exit code 2, nothing written.

CSRM_PATH=/some/copy/csrm.py runs these tests against another copy of the script (mutation testing, through
test_csrm_wiring's loader; the one subprocess test always runs the repository's csrm.py).
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from test_csrm_wiring import csrm  # one loader for both files: CSRM_PATH picks the copy under test

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TINY = ["--preset", "toy", "--crop", "64", "--cam-epochs", "1", "--cam-batch", "8", "--epochs", "2",
        "--steps-per-epoch", "2", "--batch-size", "2", "--seg-epochs", "1", "--seg-batch", "8", "--val-images", "2",
        "--vis", "2", "--mix-prob", "1", "--queries", "8", "--negatives", "4", "--crf-iters", "2", "--workers", "0"]


def merge(label, *masks):
    """sepl_merge with the official thresholds (0.5 of the mask, 0.85 of the class) on 1-row or 2-D lists."""
    return csrm.sepl_merge(np.array(label, np.uint8), [np.array(m, bool) for m in masks], 0.5, 0.85)


def row(width, **spans):
    """A (1, width) uint8 row: value v on [a, b) for each keyword v_<v>=(a, b); 0 elsewhere."""
    out = np.zeros((1, width), np.uint8)
    for key, (a, b) in spans.items():
        out[0, a:b] = int(key[2:])
    return out


def span(width, a, b):
    out = np.zeros((1, width), bool)
    out[0, a:b] = True
    return out


# ------------------------------------------------------------------------------------- the merge rule
def test_mask_mostly_inside_the_class_is_kept_ratio_over_the_mask():
    """Class 1 on [0, 30); the mask [24, 34) is 6/10 class 1 (> 0.5 of the mask) but holds 6/30 of the class.
    Catches: the 0.5 test divided by the class area |m_c| instead of the mask area |s|."""
    out = merge(row(40, v_1=(0, 30)), span(40, 24, 34))
    assert (out == row(40, v_1=(0, 34))).all()  # kept: the mask's 4 background pixels become class 1


def test_mask_holding_most_of_the_class_is_kept_ratio_over_the_class():
    """Class 1 on [0, 10); the mask [1, 41) holds 9/10 of the class (>= 0.85) but is only 9/40 class 1.
    Catches: the 0.85 test divided by the mask area |s| instead of the class area |m_c|."""
    out = merge(row(50, v_1=(0, 10)), span(50, 1, 41))
    assert (out == row(50, v_1=(0, 41))).all()


def test_exactly_half_of_the_mask_is_not_enough():
    """Class 1 on [0, 20); the mask [16, 24) is exactly 4/8 class 1 and holds 4/20 of it.
    Catches: '>= 0.5' instead of the official '2 |s & m| - |s| > 0' (strictly more than half)."""
    out = merge(row(40, v_1=(0, 20)), span(40, 16, 24))
    # not kept: the class pixels under the mask (CAM spill-over by SAM's reading) become background
    assert (out == row(40, v_1=(0, 16))).all()


def test_exactly_85_percent_of_the_class_is_enough():
    """Class 1 on [0, 20); the mask [3, 37) holds 17/20 = 0.85 of the class and is exactly 17/34 class 1.
    Catches: '> 0.85' instead of the official '>= 0.85'."""
    out = merge(row(40, v_1=(0, 20)), span(40, 3, 37))
    assert (out == row(40, v_1=(0, 37))).all()


def test_a_mask_that_is_not_kept_paints_nothing():
    """Class 2 on [0, 10); the mask [8, 20) is 2/12 class 2 and holds 2/10 of it: not kept.
    Catches: every mask painted with its assigned class whether kept or not ([8, 20) would become 2)."""
    out = merge(row(20, v_2=(0, 10)), span(20, 8, 20))
    assert (out[0, 10:] == 0).all()
    assert (out == row(20, v_2=(0, 8))).all()


def test_class_pixels_under_a_rejected_mask_become_background():
    """Same case. Catches: the 'SAM has no mask here' fallback tested against the KEPT masks only, which keeps the
    class pixels [8, 10) that SAM put into a rejected segment (official: pre_cls & no SAM mask at all)."""
    out = merge(row(20, v_2=(0, 10)), span(20, 8, 20))
    assert (out[0, 8:10] == 0).all() and (out[0, :8] == 2).all()


def test_classes_and_pixels_sam_does_not_cover_keep_their_label():
    """No mask at all, or masks away from a class: the pseudo label stays.
    Catches: a fallback that drops uncovered pixels, an empty mask list that crashes or blanks the label."""
    label = row(30, v_1=(0, 8), v_4=(10, 20))
    assert (merge(label) == label).all()
    out = merge(label, span(30, 0, 9))  # 8/9 class 1: kept; class 4 is not touched
    assert (out == row(30, v_1=(0, 9), v_4=(10, 20))).all()


def test_ignore_is_not_a_class_and_becomes_background():
    """Class 1 on [0, 10), 255 on [10, 16); the mask [6, 16) is 4 px class 1 and 6 px ignore.
    Catches: 255 treated as a class (it would keep the mask, 6/10 > 0.5, and paint [6, 16) with 255), and 255 copied
    through (the official merge starts from zeros, so ignore pixels outside kept masks become background)."""
    out = merge(row(20, v_1=(0, 10), v_255=(10, 16)), span(20, 6, 16))
    # for class 1 the mask is 4/10 of the mask and 4/10 of the class: not kept, so [6, 10) becomes background
    assert (out == row(20, v_1=(0, 6))).all()


def test_ignore_pixels_under_a_kept_mask_take_its_class():
    """Class 1 on [0, 10), 255 on [10, 12); the mask [4, 12) is 6/8 class 1: kept, and SAM names the 255 pixels.
    Catches: 255 pixels protected from kept masks too (out = label where label == 255)."""
    out = merge(row(14, v_1=(0, 10), v_255=(10, 12)), span(14, 4, 12))
    assert (out == row(14, v_1=(0, 12))).all()


def test_a_mask_goes_to_the_lowest_class_id_that_keeps_it():
    """Class 1 on [0, 4), class 2 on [4, 24); the mask [0, 20) + [26, 30) holds all of class 1 (the 0.85 test) and
    is 16/24 class 2 (the 0.5 test). The official loop gives it to class 1, the first id that keeps it, and the taken
    mask no longer counts as SAM covering class 2's pixels, which class 2 keeps.
    Catches: assignment by the largest overlap (class 2 would take it: [0, 24) and [26, 30) = 2); a taken mask still
    counting as 'SAM has a mask here' for class 2 ([4, 20) would stay class 1); a mask kept by two classes."""
    out = merge(row(30, v_1=(0, 4), v_2=(4, 24)), span(30, 0, 20) | span(30, 26, 30))
    want = row(30, v_1=(0, 4), v_2=(4, 24))
    want[0, 26:30] = 1  # the mask's background pixels are named by the class that took it
    assert (out == want).all()


def test_overlapping_kept_masks_of_two_classes_higher_id_wins():
    """Class 1 on [0, 10), class 3 on [10, 20); mask A [0, 12) is 10/12 class 1, mask B [8, 20) 10/12 class 3;
    both kept, and they share [8, 12). Catches: the painting order reversed or first-painted-wins (official: the
    later class id overwrites), and a mask painted with its index into the present classes (2) instead of the
    class id (3)."""
    out = merge(row(20, v_1=(0, 10), v_3=(10, 20)), span(20, 0, 12), span(20, 8, 20))
    assert (out == row(20, v_1=(0, 8), v_3=(8, 20))).all()


def test_two_dimensional_masks_hand_computed():
    """A 3 x 4 label with background, two classes and ignore; two masks. Catches: areas or overlaps summed over the
    wrong axes (the 1-row cases above cannot show it)."""
    label = [[0, 1, 1, 0],
             [0, 1, 1, 2],
             [255, 0, 2, 2]]
    tall = [[0, 1, 1, 0],  # 4 px, all class 1: kept; (0, 1), (0, 2), (1, 1), (1, 2)
            [0, 1, 1, 0],
            [0, 0, 0, 0]]
    left = [[1, 0, 0, 0],  # 4 px: background and the ignore pixel, no class pixel: never kept
            [1, 0, 0, 0],
            [1, 1, 0, 0]]
    want = [[0, 1, 1, 0],  # the ignore pixel becomes background (no kept mask covers it)
            [0, 1, 1, 2],
            [0, 0, 2, 2]]
    assert (merge(label, tall, left) == np.array(want)).all()
    wide = [[0, 0, 0, 0],  # 4 px, 3 of class 2 (0.75 > 0.5) and 3/3 of class 2: kept, names (2, 1)
            [0, 0, 0, 1],
            [0, 1, 1, 1]]
    want[2][1] = 2
    assert (merge(label, tall, wide) == np.array(want)).all()


# ------------------------------------------------------------------------------------- wiring
class FakeGenerator:
    """SamAutomaticMaskGenerator's interface: generate(rgb) -> records with a 'segmentation' bool mask."""

    def __init__(self):
        self.images = []

    def masks(self, shape):
        H, W = shape
        left, top = np.zeros((H, W), bool), np.zeros((H, W), bool)
        left[:, : W // 2] = True
        top[: H // 2] = True
        return [left, top]

    def generate(self, image):
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        self.images.append(image)
        return [{"segmentation": m, "area": int(m.sum())} for m in self.masks(image.shape[:2])]


def fake_ctx(args):
    return types.SimpleNamespace(args=args, spec=types.SimpleNamespace(root="root", dataset="voc"),
                                 splits={"train": "train_aug", "seed": "train", "val": "val"},
                                 device=torch.device("cpu"), main=True)


def run_make_pseudo_labels(monkeypatch, **kw):
    """make_pseudo_labels on one hand-made 4 x 6 sample (present classes 1 and 3) with a fake CRF that moves the
    background to class 3, a fake SAM and sepl_merge recorded; -> (results, saved PNGs by folder, record)."""
    C, Hs, Ws = 3, 4, 6
    args = csrm.Args(**{**csrm.PRESETS["toy"], "pl_thr": 0.4, "crf_iters": 2, "tta_scales": (1.0,), **kw})
    cams = torch.zeros(C, Hs, Ws)
    cams[0, :, :2] = 1.0  # class 1 on the two left columns
    cams[2, :, 4:] = 1.0  # class 3 on the two right columns
    image = np.random.default_rng(0).integers(0, 255, (Hs, Ws, 3), dtype=np.uint8)
    sample = {"name": "a", "image": image, "label": np.array([1.0, 0.0, 1.0], np.float32),
              "mask": np.zeros((Hs, Ws), np.int64)}
    ds = types.SimpleNamespace(num_classes=C + 1, class_names=[f"c{i}" for i in range(C + 1)])
    monkeypatch.setattr(csrm.data, "SegDataset", lambda *a, **k: ds)
    monkeypatch.setattr(csrm.data, "split_ids", lambda *a, **k: ["a"])
    monkeypatch.setattr(csrm, "each_sample", lambda ctx, d, desc, *a, **k: iter([sample]))
    monkeypatch.setattr(csrm, "tta_cams", lambda model, x, scales, flip: cams.clone())
    # a CRF label that differs from the plain one: the background columns go to label index 2 (class 3)
    monkeypatch.setattr(csrm.crf, "refine_labels", lambda img, lab, n, **k: np.where(lab == 0, 2, lab))
    saved, rec = {}, {"built": [], "merges": [], "gen": FakeGenerator(), "image": image}
    monkeypatch.setattr(csrm.data, "save_mask", lambda path, m: saved.setdefault(Path(path).parts[-3], m.copy()))
    monkeypatch.setattr(csrm, "sam_mask_generator", lambda sam, a, device: rec["built"].append((sam, a, device))
                        or rec["gen"])
    original = csrm.sepl_merge
    monkeypatch.setattr(csrm, "sepl_merge", lambda label, masks, r1, r2: rec["merges"].append(
        (label.copy(), masks, r1, r2)) or original(label, masks, r1, r2))
    rec["sam"], rec["args"] = object(), args
    res = csrm.make_pseudo_labels(fake_ctx(args), nn.Conv2d(1, 1, 1), Path("pl"), rec["sam"])
    return res, saved, rec


@pytest.mark.parametrize("pl_crf", [True, False])
def test_make_pseudo_labels_applies_sepl_to_the_dcrf_label(monkeypatch, pl_crf):
    """Table 2 row 5 is CSRM + dCRF + SEPL. Catches: SEPL on the plain label while the CRF runs (or on the CRF
    label when it does not run), the thresholds not taken from --sepl-sam-ratio / --sepl-label-ratio, SAM given
    another network or something other than the image, pseudo_sepl/* missing from the results."""
    res, saved, rec = run_make_pseudo_labels(monkeypatch, pl_crf=pl_crf, sepl=True, sepl_sam_ratio=0.3,
                                             sepl_label_ratio=0.9)
    sam, args, device = rec["built"][0]
    assert sam is rec["sam"] and args is rec["args"] and device == torch.device("cpu")
    assert len(rec["gen"].images) == 2 and (rec["gen"].images[0] == rec["image"]).all()  # train, then val
    source = saved["pseudo_crf"] if pl_crf else saved["pseudo"]
    if pl_crf:
        assert (saved["pseudo_crf"] != saved["pseudo"]).any()  # the case tells the two sources apart
    label, masks, r1, r2 = rec["merges"][0]
    assert (label == source).all() and (r1, r2) == (0.3, 0.9)
    want_masks = rec["gen"].masks(label.shape)
    assert len(masks) == 2 and all((m == w).all() for m, w in zip(masks, want_masks))
    assert (saved["pseudo_sepl"] == csrm.sepl_merge(source, want_masks, 0.3, 0.9)).all()
    assert {"pseudo_sepl/train", "pseudo_sepl/val"} <= set(res) and res["pseudo_sepl/val"]["threshold"] == 0.4
    assert ("pseudo_crf/train" in res) == pl_crf


def test_without_sepl_no_generator_and_no_pseudo_sepl(monkeypatch):
    """--sepl off (the default). Catches: SAM built or run, or pseudo_sepl written, without the flag."""
    res, saved, rec = run_make_pseudo_labels(monkeypatch)
    assert rec["built"] == [] and rec["merges"] == [] and "pseudo_sepl" not in saved
    assert not any(k.startswith("pseudo_sepl") for k in res) and "pseudo_crf/train" in res


def test_main_trains_the_verification_network_on_the_sepl_labels(monkeypatch, toy_root, tmp_path, capsys):
    """A tiny run with --sepl and a fake SAM. Catches: the verification network (and the vis grid) still reading
    pseudo_crf under --sepl, SEPL PNGs not written for every image, SAM not loaded in main, pseudo_sepl/* missing
    from metrics.json, the SEPL PNGs not made from the dCRF PNGs."""
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"")  # load_sam is replaced: only validate() looks at the file
    sam, gen, seen = object(), FakeGenerator(), {}
    monkeypatch.setattr(csrm, "load_sam", lambda args: seen.setdefault("loaded", args.sam_ckpt) and sam)
    monkeypatch.setattr(csrm, "sam_mask_generator", lambda s, args, device: seen.setdefault("sam", s) and gen)
    verify, evaluate = csrm.train_verify, csrm.evaluate
    monkeypatch.setattr(csrm, "train_verify", lambda ctx, net, pl_dir, keep: seen.setdefault("verify", pl_dir)
                        and verify(ctx, net, pl_dir, keep))
    monkeypatch.setattr(csrm, "evaluate", lambda ctx, net, teacher, ds, pl_dir: seen.setdefault("vis", pl_dir)
                        and evaluate(ctx, net, teacher, ds, pl_dir))
    out = tmp_path / "run"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        csrm.main(["--data", str(toy_root), "--out", str(out), *TINY, "--sepl", "--sam-ckpt", str(ckpt)])
    finally:
        torch.set_num_threads(n)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("RESULT csrm seg/val")
    assert seen["loaded"] == str(ckpt) and seen["sam"] is sam
    pl = out / "pseudo_labels"
    assert seen["verify"] == pl / "pseudo_sepl" / "train_aug" and seen["vis"] == pl / "pseudo_sepl" / "val"
    results = json.loads((out / "metrics.json").read_text())["results"]
    for k in ("pseudo_sepl/train", "pseudo_sepl/val", "pseudo_crf/train"):
        assert 0 <= results[k]["miou"] <= 100, k
    files = sorted((pl / "pseudo_sepl" / "train_aug").glob("*.png"))
    assert len(files) == 24 and len(list((pl / "pseudo_sepl" / "val").glob("*.png"))) == 8
    for f in files[:4]:
        crf_label = csrm.data.read_mask(pl / "pseudo_crf" / "train_aug" / f.name)
        want = csrm.sepl_merge(crf_label, gen.masks(crf_label.shape), 0.5, 0.85)
        assert (csrm.data.read_mask(f) == want).all(), f.name


# ------------------------------------------------------------------------------------- real SAM, tiny
def tiny_sam(seed=0, dim=16):
    """A randomly initialised SAM of ~40k parameters: 64-px input, one ViT block, 16-d prompts."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    size, patch = 64, 16
    return Sam(image_encoder=ImageEncoderViT(img_size=size, patch_size=patch, embed_dim=32, depth=1, num_heads=2,
                                             mlp_ratio=2.0, out_chans=dim, qkv_bias=True, use_rel_pos=True,
                                             window_size=0, global_attn_indexes=()),
               prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(size // patch,) * 2,
                                            input_image_size=(size, size), mask_in_chans=4),
               mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                   depth=1, embedding_dim=dim, mlp_dim=32, num_heads=2), transformer_dim=dim, iou_head_depth=1,
                   iou_head_hidden_dim=16),
               pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])


@pytest.fixture
def tiny_registry(monkeypatch):
    """--sam-model vit_b builds tiny_sam(seed=1) (a different init from the file's), recording its argument."""
    sa = pytest.importorskip("segment_anything")
    calls = []
    monkeypatch.setitem(sa.sam_model_registry, "vit_b", lambda checkpoint="unset": calls.append(checkpoint) or tiny_sam(1))
    return calls


def test_load_sam_loads_the_state_dict_itself(tiny_registry, tmp_path):
    """Catches: the registry given the file (its torch.load runs without weights_only), the weights not loaded,
    SAM left in train mode."""
    want = tiny_sam(0)
    torch.save(want.state_dict(), tmp_path / "sam.pth")
    args = csrm.Args(**{**csrm.PRESETS["toy"], "sepl": True, "sam_ckpt": str(tmp_path / "sam.pth"), "sam_model": "vit_b"})
    sam = csrm.load_sam(args)
    assert tiny_registry == [None] and not sam.training
    for (k, v), w in zip(sam.state_dict().items(), want.state_dict().values()):
        assert torch.equal(v, w), k


def test_real_mask_generator_end_to_end_on_a_tiny_image(tiny_registry, tmp_path):
    """load_sam -> sam_mask_generator -> SamAutomaticMaskGenerator.generate on a 32 x 32 image -> sepl_merge.
    Catches: generator settings other than amg.py's defaults and --sam-points, records whose masks do not fit
    the image, a merge that cannot take the generator's masks."""
    torch.save(tiny_sam(0).state_dict(), tmp_path / "sam.pth")
    args = csrm.Args(**{**csrm.PRESETS["toy"], "sepl": True, "sam_ckpt": str(tmp_path / "sam.pth"), "sam_model": "vit_b",
                        "sam_points": 3})
    gen = csrm.sam_mask_generator(csrm.load_sam(args), args, torch.device("cpu"))
    assert len(gen.point_grids) == 1 and gen.point_grids[0].shape == (9, 2)  # 3 x 3 prompts, no crop layers
    assert (gen.pred_iou_thresh, gen.stability_score_thresh, gen.box_nms_thresh) == (0.88, 0.95, 0.7)
    gen.pred_iou_thresh = gen.stability_score_thresh = 0.0  # random weights are never confident: keep every mask
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    records = gen.generate(image)
    masks = [r["segmentation"] for r in records]
    assert masks and all(m.shape == (32, 32) and m.dtype == bool for m in masks)
    label = np.zeros((32, 32), np.uint8)
    label[4:20, 4:20], label[20:30, 18:30], label[0, :] = 1, 2, 255
    out = csrm.sepl_merge(label, masks, args.sepl_sam_ratio, args.sepl_label_ratio)
    assert out.shape == label.shape and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1, 2}
    uncovered, fg = ~np.any(masks, 0), (label > 0) & (label < 255)
    assert (out[uncovered & fg] == label[uncovered & fg]).all()  # SAM silent: the label stays


# ------------------------------------------------------------------------------------- bad input
def _exit_2(argv, capsys, needle):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        csrm.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("csrm.py: error:") and needle in err[0], err


class Payload:
    """Unpickling this object runs a shell command (the attack a downloaded .pth can carry)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bad_sepl_input_one_line_exit_2_nothing_written(tiny_registry, toy_root, tmp_path, capsys):
    """--sepl without --sam-ckpt, a missing, text, truncated, code-holding, non-SAM or other-architecture file, and
    --sepl under --supervision full. Catches: a traceback or a late failure (after training started), the file
    unpickled without weights_only."""
    base = ["--data", toy_root, "--out", tmp_path / "y", *TINY]
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    torch.save(tiny_sam(0).state_dict(), tmp_path / "good.pth")
    raw = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(raw[: len(raw) // 2])
    marker = tmp_path / "PWNED"
    torch.save({"image_encoder.x": Payload(marker)}, tmp_path / "evil.pth")
    torch.save({"backbone.weight": torch.zeros(2)}, tmp_path / "other.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save(tiny_sam(0, dim=8).state_dict(), tmp_path / "narrow.pth")  # another architecture than vit_b here
    sam = ["--sepl", "--sam-model", "vit_b", "--sam-ckpt"]
    cases = [(["--sepl"], "needs --sam-ckpt"),
             ([*sam, tmp_path / "missing.pth"], "no such file"),
             ([*sam, tmp_path / "text.pth"], "not a readable torch checkpoint"),
             ([*sam, tmp_path / "truncated.pth"], "not a readable torch checkpoint"),
             ([*sam, tmp_path / "evil.pth"], "refused"),
             ([*sam, tmp_path / "other.pth"], "holds no SAM weights"),
             ([*sam, tmp_path / "list.pth"], "holds no state dict"),
             ([*sam, tmp_path / "narrow.pth"], "does not fit"),
             ([*sam, tmp_path / "good.pth", "--supervision", "full"], "--supervision full")]
    for argv, needle in cases:
        _exit_2(base + argv, capsys, needle)
    assert not marker.exists() and not (tmp_path / "y").exists()
    assert tiny_registry == [None]  # only the narrow file got as far as building the network


def test_csrm_runs_without_the_package_and_sepl_says_how_to_get_it(toy_root, tmp_path):
    """A fresh interpreter in which `import segment_anything` fails: csrm.py imports, and --sepl stops in one line
    that names the package, no traceback. Catches: a top-level import of segment_anything, the ImportError escaping."""
    torch.save({"image_encoder.weight": torch.zeros(1)}, tmp_path / "sam.pth")
    argv = ["--data", str(toy_root), "--out", str(tmp_path / "y"), *TINY, "--sepl", "--sam-ckpt", str(tmp_path / "sam.pth")]
    code = f"import sys; sys.modules['segment_anything'] = None; import csrm; csrm.main({argv!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("csrm.py: error:") and "pip install segment-anything" in lines[0]
    assert not (tmp_path / "y").exists()
