"""Time one training iteration of each method at the paper's size: random weights, real step functions.

    python tests/bench/paper_step.py --iters 1             # CPU: 10-20 minutes on 2 cores
    python tests/bench/paper_step.py                       # one GPU: 2 warm-up + 5 timed iterations each
    python tests/bench/paper_step.py --methods cosa,csrm --amp --markdown

For each script: its paper preset (`--preset paper --no-pretrained`, VOC sizes: 20 classes + background) is
built with random weights through the script's own build_model and optimiser code, and the script's own step
function (train_step) runs W warm-up + N timed iterations on a batch at the paper's crop and per-GPU batch (the
preset's global batch divided by the paper's number of GPUs). The images and masks of that batch are toy
images resized to the crop, not noise: on noise the dense CRFs inside CSRM's step run ~8x slower than on
such images (one 512 px CRF, measured). Data loading is not timed (it runs in DataLoader workers in a real run).

The table (one row per method; a failing method prints its error in its row, the others still run):
- s/it, images/s: mean wall time of one step (CUDA synchronised), images of the training batch per second;
- peak GPU memory: torch.cuda.max_memory_allocated over model building and the steps ("-" on CPU);
- host ms/it: time spent per step in the host-side functions listed in the last column (numpy / scikit-learn
  / dense-CRF / CPU bookkeeping inside the step, CUDA synchronised around each call). Target: <= 50 ms;
  torch work on the training device outside the network (CSRM's CRFs with --csrm-train-crf torch, ClassMix, the
  memory-bank enqueue) is listed after "on the device" and not counted as host time (on a CPU benchmark the
  device is the CPU);
- paper: the training time the paper reports for that stage ("n/a" where it gives none);
  projected: s/it x the preset's total iterations of that stage, as if run on the paper's number of GPUs of
  this kind, each with the per-GPU batch (gradient all-reduce and per-epoch validation not included).

These are random-weight timings of the real code path, not accuracy: losses and pseudo labels are meaningless.
The step is taken at the middle iteration of the stage's schedule, so every loss warm-up is over; queues that a
long run keeps full (CoSA's threshold histograms, CSRM's memory banks) are filled before timing.
"""
import argparse
import contextlib
import functools
import gc
import importlib
import re
import resource
import sys
import tempfile
import time
import traceback
from multiprocessing.pool import ThreadPool
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from common import augment, data  # noqa: E402

METHODS = ("cosa", "csrm", "cobra", "auxsegnet", "csd")
OPTS = argparse.Namespace(csrm_train_crf="torch")  # main() sets it from the command line
VOC_CLASSES = 21  # background + 20 foreground classes
VOC_TRAIN = data.NUM_TRAIN_AUG  # 10,582 train_aug images: the epoch length of the epoch-based schedules

# What each paper says about the benchmarked stage. gpus divides the preset's global batch (1 where the paper
# does not say); hours = the reported training time (None: the paper reports none; never estimated here).
PAPER = {
    "cosa": dict(gpus=2, hours=8.7, note="8.7 h total, 'a single 3090' (Tab. 6); 20K it. on 2 GPUs x 2 images "
                                         "(Supp. B)"),
    "csrm": dict(gpus=4, hours=3.9, note="3.9 h, 15.7 min/epoch on 4x P100 (Sec. 5); batch 32 per half"),
    "cobra": dict(gpus=1, hours=None, note="no training time given; 'NVIDIA RTX A6000 GPU' (Sec. 4), batch 32"),
    "auxsegnet": dict(gpus=1, hours=None, note="no training time nor GPU count given; batch 4"),
    "csd": dict(gpus=1, hours=None, note="no training time nor GPU count given; MCTformer-V2 recipe, batch 64"),
}


# --- inputs -------------------------------------------------------------------------------------------
class ToyBatches:
    """Batches of toy images, masks and saliency maps resized to the crop, with VOC-sized (20) labels."""

    def __init__(self, root, device):
        ds = data.SegDataset(root, "train")
        self.samples = [ds.load(i) for i in range(len(ds))]
        for s in self.samples:
            s["sal"] = data.read_mask(Path(root) / "saliency" / f"{s['name']}.png")  # uint8, 255 = salient
        self.device, self.rng = device, np.random.default_rng(0)

    def draw(self, n, crop):
        """-> rgb uint8 (n, crop, crop, 3), mask int64 (n, crop, crop), sal float (n, crop, crop) in [0, 1],
        label float (n, 20) multi-hot from the mask; all on the device (as train_loop's to_device leaves them)."""
        rgb, mask, sal = [], [], []
        for i in self.rng.integers(len(self.samples), size=n):
            s = self.samples[i]
            image, (m,), (sm,) = augment.resize(s["image"], crop, masks=(s["mask"],), maps=(s["sal"],))
            rgb.append(image), mask.append(m.astype(np.int64)), sal.append(sm / np.float32(255))
        mask = torch.from_numpy(np.stack(mask))
        label = torch.zeros(n, VOC_CLASSES - 1)
        for b, m in enumerate(mask):
            fg = m.unique()
            fg = fg[(fg > 0) & (fg < 255)]
            label[b, fg - 1] = 1.0
        out = {"rgb": torch.from_numpy(np.stack(rgb)), "mask": mask, "sal": torch.from_numpy(np.stack(sal)),
               "label": label}
        out["image"] = torch.stack([augment.to_tensor(im) for im in out["rgb"].numpy()])  # normalised (n, 3, H, W)
        return {k: v.to(self.device) for k, v in out.items()}


# --- one function per script: its networks, optimiser and step, as its train_<stage> builds them ----------
# Each returns dict(stage, batch (images per GPU and step), crop, iters (the stage's total), make_batch(),
# step(batch), host [(owner, attribute name)] to time, close()).
def setup_cosa(mod, args, ctx, toy, gpus):
    """CoSA's single stage (train_cosa): ON on the strong view, AN = EMA of ON on 3 scales x flip, two DT queues."""
    C = VOC_CLASSES - 1
    online = mod.build_model(args, C, init_weights=True).to(ctx.device)
    assign_net = mod.build_model(args, C, init_weights=False).to(ctx.device)
    assign_net.load_state_dict(online.state_dict())
    assign_net.requires_grad_(False).eval()
    optimizer = mod.build_optimizer(online, args)
    thresholds = [mod.DynamicThreshold(args.queue_len, args.dt_init, args.gmm_min) for _ in range(2)]
    B = args.batch_size // gpus
    cells = (args.crop // online.backbone.patch_embed.patch_size[0]) ** 2
    gen = torch.Generator().manual_seed(0)
    for dt in thresholds:  # a long run's queues are full: Q batches of bimodal confidences, fitted once
        for _ in range(args.queue_len):
            u = torch.rand(B, cells, generator=gen)
            dt.push(torch.where(torch.rand(B, cells, generator=gen) < 0.3, 0.6 + 0.4 * u, 0.4 * u))
        dt.update()
    net = ctx.wrap(online).train()
    it = args.iters // 2  # past the 6K loss warm-up: all of Eq. (11) and the AN

    def make_batch():
        t = toy.draw(B, args.crop)
        box = torch.tensor([[0, args.crop, 0, args.crop]] * B, device=ctx.device)  # (y0, y1, x0, x1): no padding
        return {"weak": t["image"], "strong": t["image"].clone(), "label": t["label"], "box": box}

    return dict(stage="cosa", batch=B, crop=args.crop, iters=args.iters, make_batch=make_batch,
                step=lambda b: mod.train_step(net, assign_net, b, it, args, thresholds, optimizer, ctx.autocast),
                host=[(mod.DynamicThreshold, "push"), (mod.DynamicThreshold, "update")])


def setup_csrm(mod, args, ctx, toy, gpus):
    """CSRM's stage 1 (train_csrm): two teacher passes, dCRF pseudo labels, ClassMix, Eq. (14), EMA."""
    C = VOC_CLASSES - 1
    args.train_crf = OPTS.csrm_train_crf  # torch: what `auto` picks on a GPU, also on a CPU benchmark
    student, teacher = (m.to(ctx.device) for m in mod.build_model(args, C))
    optimizer = mod.build_optimizer(student, student.pretrained_parameters(), args.lr, args.wd, args.lr_new_mult)
    bank = mod.MemoryBank(C + 1, args.rep_dim, args.bank, args.bank_bg)
    for c, cap in enumerate(bank.caps):  # full, as after the first epochs
        bank.push(c, torch.randn(cap, args.rep_dim, device=ctx.device))
    pool = ThreadPool(args.crf_workers) if args.crf_workers > 0 else None
    net = ctx.wrap(student)
    B = args.batch_size // gpus  # per half: B augmented (l) + B plain (u) images
    total = mod.stage_iters(args, args.epochs * args.steps_per_epoch)
    it = total // 2  # past the warm-up epoch: every loss of Eq. (14) is on

    def make_batch():
        return [{k: v for k, v in toy.draw(B, args.crop).items() if k in ("image", "rgb", "label")} for _ in "lu"]

    return dict(stage="csrm", batch=2 * B, crop=args.crop, iters=total, make_batch=make_batch,
                step=lambda b: mod.train_step(args, net, teacher, optimizer, bank, b[0], b[1], it, ctx.autocast, pool),
                host=[(mod, "cam_pseudo_labels")],  # torch, but a per-image Python loop: counted as host to be safe
                # torch kernels on the batch tensors: the CRFs, ClassMix, and the memory-bank enqueue (a copy between
                # two device tensors, up to 30,000 x 256 floats per class: memory-bound on a CPU, no host work)
                device_side=[(mod.crf, "refine_labels_torch"), (mod, "classmix"), (mod.MemoryBank, "push")],
                close=pool.close if pool is not None else None)


def setup_cobra(mod, args, ctx, toy, gpus):
    """CoBra's stage 1 (train_cobra): CNN + ViT branches on the same crops, Eq. (3) with the auxiliary losses."""
    model, irn, seg = mod.build_model(args, VOC_CLASSES, init_weights=True)
    del irn, seg  # later stages
    model.to(ctx.device)
    optimizers = list(mod.build_optimizers(model, args).values())  # the paper preset: one SGD (Deviation 7)
    net = ctx.wrap(model).train()
    B = args.batch_size // gpus
    total = args.epochs * (VOC_TRAIN // args.batch_size)

    def make_batch():
        t = toy.draw(B, args.crop)
        return {"image": t["image"], "label": t["label"]}

    return dict(stage="cobra", batch=B, crop=args.crop, iters=total, make_batch=make_batch,
                step=lambda b: mod.train_step(net, b, total // 2, args, optimizers, ctx.autocast, aux_on=True),
                host=[])


def setup_auxsegnet(mod, args, ctx, toy, gpus):
    """AuxSegNet's stage 0 (train_stage): the multi-task network with cross-task affinity, Eq. (C10).
    Stages 1-3 train the same network; the label updates between stages are not per-iteration work."""
    model = mod.build_model(args, VOC_CLASSES, "stage", init_weights=True).to(ctx.device)
    optimizer = mod.build_optimizer(model, args.lr, args.head_lr_mult, args.momentum, args.weight_decay)
    net = ctx.wrap(model).train()
    B = args.batch_size // gpus
    total = mod.stage_iters(args, VOC_TRAIN, args.batch_size, args.epochs_per_stage)

    def make_batch():
        t = toy.draw(B, args.crop_size)
        return {"image": t["image"], "label": t["label"], "seg": t["mask"], "sal": t["sal"],
                "sal_valid": torch.ones_like(t["sal"])}

    return dict(stage="stage0 (1 of 4)", batch=B, crop=args.crop_size, iters=total, make_batch=make_batch,
                step=lambda b: mod.train_step(net, b, total // 2, args, optimizer, ctx.autocast), host=[])


def setup_csd(mod, args, ctx, toy, gpus):
    """CSD's stage 2 (train_classifier, csd_on): MCTformer-V2 on the batch + both composites, teacher on x_s."""
    K = VOC_CLASSES - 1
    model = mod.build_model(args, K, init_weights=True).to(ctx.device)
    optimizer = torch.optim.AdamW(mod.param_groups(model, args.weight_decay), lr=args.lr, eps=1e-8)
    net = ctx.wrap(model).train()
    B = args.batch_size // gpus
    crop = args.crop_size
    total = args.epochs * (VOC_TRAIN // args.batch_size)

    def make_batch():
        """The triplet of CSDTransform (done in the DataLoader workers): source x_s with the mask of one of its
        classes c_s, target x_m, and the two composites; toy masks stand in for the stage-1 prior."""
        cls, src, tgt = toy.draw(B, crop), toy.draw(B, crop), toy.draw(B, crop)
        c_s = src["label"].argmax(1)  # the first present class of each source image
        M_fg = src["mask"] == (c_s + 1)[:, None, None]
        R_bg = ~M_fg & (src["mask"] != data.IGNORE_INDEX) & (tgt["mask"] == 0)
        x_fg, x_bg = zip(*(mod.make_composites(*a) for a in zip(src["image"], tgt["image"], M_fg, R_bg)))
        y_fg = torch.maximum(tgt["label"], torch.eye(K, device=ctx.device)[c_s])
        return {"image": cls["image"], "label": cls["label"], "x_s": src["image"], "x_fg": torch.stack(x_fg),
                "x_bg": torch.stack(x_bg), "M_fg": M_fg, "R_bg": R_bg, "c_s": c_s, "y_fg": y_fg}

    return dict(stage="csd (stage 2)", batch=B, crop=crop, iters=total, make_batch=make_batch,
                step=lambda b: mod.train_step(net, b, total // 2, args, K, True, optimizer, ctx.autocast), host=[])


SETUP = {"cosa": setup_cosa, "csrm": setup_csrm, "cobra": setup_cobra, "auxsegnet": setup_auxsegnet,
         "csd": setup_csd}


# --- timing -------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HostTimers:
    """Wall time of chosen functions while `active`; module attributes are swapped for timed wrappers (the
    scripts look their functions up at call time) and restored on exit. A host call nested in another timed
    call is not counted twice; a `device` function (torch work on the training device, e.g. CSRM's CRF) is
    timed on its own and its time is taken out of the host function that called it."""

    def __init__(self, targets, device, device_targets=()):
        self.targets, self.device_targets = list(targets), list(device_targets)
        self.device, self.active, self.depth, self.nested = device, False, 0, 0.0
        self.seconds = {self.key(owner, name): 0.0 for owner, name in self.targets}
        self.device_seconds = {self.key(owner, name): 0.0 for owner, name in self.device_targets}

    @staticmethod
    def key(owner, name):
        return name if isinstance(owner, type(sys)) else f"{owner.__name__}.{name}"

    def wrap(self, fn, key, on_device):
        @functools.wraps(fn)
        def timed(*a, **kw):
            if not self.active or (self.depth and not on_device):
                return fn(*a, **kw)
            self.depth += 1
            nested_before = self.nested
            sync(self.device)  # GPU work queued before the call is not host time
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                sync(self.device)
                spent = time.perf_counter() - t0
                self.depth -= 1
                if on_device:
                    self.device_seconds[key] += spent
                    self.nested += spent
                else:
                    self.seconds[key] += spent - (self.nested - nested_before)
        return timed

    @contextlib.contextmanager
    def patched(self):
        originals = [(owner, name, getattr(owner, name), on_device)
                     for targets, on_device in ((self.targets, False), (self.device_targets, True))
                     for owner, name in targets]
        try:
            for owner, name, fn, on_device in originals:
                setattr(owner, name, self.wrap(fn, self.key(owner, name), on_device))
            yield self
        finally:
            for owner, name, fn, _ in originals:
                setattr(owner, name, fn)


def bench_method(name, opts, toy_root, device):
    """Build `name`'s paper preset, run its step; returns a row dict (with "error" when it failed)."""
    mod = importlib.import_module(name)
    argv = ["--data", str(toy_root), "--preset", "paper", "--no-pretrained", "--device", opts.device]
    args, spec = mod.parse_args(argv + (["--amp"] if opts.amp else []))  # without --amp: the preset's choice
    mod.validate(args)
    ctx = mod.Context(args, spec)  # device, autocast, seeds; writes nothing before ctx.start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    gpus = PAPER[name]["gpus"]
    bench = SETUP[name](mod, args, ctx, ToyBatches(toy_root, ctx.device), gpus)
    row = dict(method=name, stage=bench["stage"], batch=bench["batch"], crop=bench["crop"],
               amp="bf16" if ctx.amp else "off", iters=bench["iters"])
    timers, times = HostTimers(bench["host"], ctx.device, bench.get("device_side", ())), []
    try:
        with timers.patched():
            for i in range(opts.warmup + opts.iters):
                batch = bench["make_batch"]()  # the DataLoader's job: not timed
                timers.active = i >= opts.warmup
                sync(ctx.device)
                t0 = time.perf_counter()
                bench["step"](batch)
                sync(ctx.device)
                if timers.active:
                    times.append(time.perf_counter() - t0)
                print(f"  {name}: {'timed' if timers.active else 'warm-up'} step {i + 1}: "
                      f"{time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)
    except (Exception, SystemExit) as e:  # e.g. out of memory: keep the host times measured before it
        traceback.print_exc(file=sys.stderr)
        row["error"] = one_line(e)
    finally:
        if bench.get("close"):
            bench["close"]()
    started = len(times) + ("error" in row and timers.active)  # a failed timed step counts with its partial time
    row["host"] = {k: 1000 * v / max(started, 1) for k, v in timers.seconds.items()}
    row["host_ms"] = sum(row["host"].values())
    row["device_side"] = {k: 1000 * v / max(started, 1) for k, v in timers.device_seconds.items()}
    if times:
        s_it = float(np.mean(times))
        row.update(s_it=s_it, img_s=bench["batch"] / s_it)
    row["mem"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return row


def one_line(e):
    """The exception as one short line (the scripts' fail() raises SystemExit(2) after printing its message)."""
    text = str(e).splitlines()[0] if str(e) else ""
    size = re.search(r"can't allocate memory: you tried to allocate (\d+) bytes", text)  # CPU: drop the C++ noise
    if size:
        return f"out of host memory (allocating {int(size[1]) / 2**20:.0f} MiB more failed)"
    return f"{type(e).__name__}: {text[:120]}"


# --- output -------------------------------------------------------------------------------------------
def hours(h):
    return "n/a" if h is None else f"{h:.2f} h" if h < 10 else f"{h:.0f} h"


def table_rows(rows):
    head = ["method", "stage", "batch/GPU", "crop", "amp", "s/it", "images/s", "peak GPU mem", "host ms/it",
            "paper", "projected", "host-side functions (ms/it) or error"]
    out = [head]
    for r in rows:
        paper = hours(PAPER[r["method"]]["hours"])
        if "stage" not in r:  # failed while building
            out.append([r["method"]] + ["-"] * 8 + [paper, "-", "ERROR " + r["error"]])
            continue
        common = [r["method"], r["stage"], str(r["batch"]), str(r["crop"]), r["amp"]]
        host = ", ".join(f"{k} {v:.1f}" for k, v in r["host"].items()) or "none in the step"
        if r.get("device_side"):
            host += "; on the device, not host: " + ", ".join(f"{k} {v:.1f}" for k, v in r["device_side"].items())
        timed = "s_it" in r
        out.append(common + [f"{r['s_it']:.3f}" if timed else "-", f"{r['img_s']:.2f}" if timed else "-",
                             "-" if r["mem"] is None else f"{r['mem']:.1f} GiB", f"{r['host_ms']:.1f}", paper,
                             hours(r["s_it"] * r["iters"] / 3600) + f" ({r['iters']} it)" if timed else "-",
                             host if "error" not in r else f"ERROR {r['error']}; host before it: {host}"])
    return out


def print_table(rows, markdown):
    cells = table_rows(rows)
    if markdown:
        lines = ["| " + " | ".join(c) + " |" for c in cells]
        lines.insert(1, "|" + "---|" * len(cells[0]))
    else:
        widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
    print("\n".join(lines))
    print("\npaper:")
    for r in rows:
        print(f"  {r['method']}: {PAPER[r['method']]['note']}")
    print("projected = s/it x the stage's total iterations on the paper's number of GPUs (per-GPU batch), "
          "no all-reduce, no validation. Random weights: timings, not accuracy.")


def limit_cpu_memory():
    """On CPU, cap the address space at what is free now, so that a paper-size step that does not fit fails
    with a MemoryError in its row instead of waking the kernel's OOM killer (which may hit any process)."""
    meminfo = dict(line.split(":") for line in Path("/proc/meminfo").read_text().splitlines())
    status = dict(line.split(":") for line in Path("/proc/self/status").read_text().splitlines())
    free = int(meminfo["MemAvailable"].split()[0]) * 1024
    used = int(status["VmSize"].split()[0]) * 1024  # libraries already mapped
    resource.setrlimit(resource.RLIMIT_AS, (used + int(0.85 * free), resource.RLIM_INFINITY))
    return 0.85 * free


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS), help="comma list from " + ",".join(METHODS))
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations first (default: 2 on GPU, 0 on CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA in every script (default: the preset's)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--csrm-train-crf", choices=("torch", "pydensecrf"), default="torch",
                   help="CSRM's per-step CRFs: torch on the device (a GPU run's default) or the official host CRF")
    opts = p.parse_args(argv)
    OPTS.csrm_train_crf = opts.csrm_train_crf
    methods = [m.strip() for m in opts.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        p.error(f"unknown methods {sorted(unknown)}; choose from {','.join(METHODS)}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA device is visible")
    device = torch.device("cuda" if opts.device != "cpu" and torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    opts.warmup = (2 if gpu else 0) if opts.warmup is None else opts.warmup
    opts.iters = (5 if gpu else 1) if opts.iters is None else max(1, opts.iters)
    what = torch.cuda.get_device_name(device) if gpu else f"cpu, {torch.get_num_threads()} threads"
    if not gpu:
        what += f", memory capped at {limit_cpu_memory() / 2**30:.0f} GiB (85% of the free memory)"
    print(f"device: {what}; {opts.warmup} warm-up + {opts.iters} timed iterations per method", flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        toy_root = data.make_toy(Path(tmp) / "toy", num_train=8, num_val=2, seed=0)  # parse_args needs a folder
        for name in methods:
            t0 = time.time()
            print(f"{name}: building the paper preset ...", file=sys.stderr, flush=True)
            try:
                rows.append(bench_method(name, opts, toy_root, device))
            except (Exception, SystemExit) as e:  # the scripts' fail() raises SystemExit(2) after its one line
                traceback.print_exc(file=sys.stderr)
                rows.append(dict(method=name, error=one_line(e)))
            print(f"{name}: done in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    print(flush=True)
    print_table(rows, opts.markdown)


if __name__ == "__main__":
    main()
