"""The toy results table: each method's default run, its baseline row, its paper-table ablation rows and the
fully supervised upper bound (--supervision full), over several seeds, as mean +- std of what metrics.json says.

    python tests/bench/toy_table.py                              (all five, 3 seeds: hours on 2 CPU cores)
    python tests/bench/toy_table.py --methods cosa --seeds 0 --rows default,baseline,oracle --jobs 2

Runs go to --out (default runs/toy_table_v<toy version>/<method>/<row>-s<seed>/, so that a run on an older
toy is not taken for one on the current toy); a finished run (metrics.json present) is reused, so the table
can be built up over several sessions. Every run uses --threads threads per process (default 1; float results
change slightly with the thread count, so compare tables made with the same one).
--knobs '{"sal_miss": 0.4}' runs every row on a toy generated with other knobs (common.data.TOY_KNOBS), made
once under --out/data-<knobs> and run with --preset toy; give such a table its own --out.
Printed: one markdown table per method, with the seconds per run and the keys of KEYS; the column "vs oracle"
is the default row's seg/val as a percentage of the oracle's. The captioned visual grids of each run are in
its vis/ folder (the table names the seed-0 grid of the default row).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from common import data  # noqa: E402  (the toy's version and knobs)

# Rows per method: the flags that turn the default run into the row. "baseline" is the row each method's
# paper compares against; the others are the rows of the paper's main ablation table.
ROWS = {
    "cosa": {"baseline": ["--ablation", "base"], "gc": ["--ablation", "gc"], "gc_sa": ["--ablation", "gc_sa"],
             "gc_sa_raw": ["--ablation", "gc_sa_raw"], "gc_sa_csc": ["--ablation", "gc_sa_csc"],
             "gc_sa_raw_csc": ["--ablation", "gc_sa_raw_csc"]},
    "csrm": {"baseline": ["--no-s2c", "--no-u", "--no-m"], "s2c": ["--no-u", "--no-m"], "s2c_u": ["--no-m"]},
    "cobra": {"baseline": ["--branches", "cnn", "--until", "seed"], "vit": ["--branches", "vit", "--until", "seed"],
              "seed": ["--until", "seed"], "no_aux": ["--losses", "none", "--until", "seed"],
              "no_cam": ["--losses", "cap,sap", "--until", "seed"], "no_cap": ["--losses", "cam,sap", "--until", "seed"],
              "cam": ["--losses", "cam", "--until", "seed"], "cam_cap": ["--losses", "cam,cap", "--until", "seed"],
              # the paper's IRN masks (the toy preset's masks are the CRF-refined seeds: cobra.py Deviation 11)
              "irn": ["--mask-method", "irn"],
              # the CNN-only pipeline through the segmentation network (the baseline row stops at the seeds)
              "cnn": ["--branches", "cnn"]},
    "auxsegnet": {"baseline": ["--variant", "baseline"], "mt": ["--variant", "mt"], "mt_ct": ["--variant", "mt_ct"],
                  # the finer single-stage rows of the paper's Tables 4-5 (auxsegnet.py Deviation 16)
                  "seg_cls": ["--variant", "mt", "--tasks", "seg+cls"], "seg_sal": ["--variant", "mt", "--tasks", "seg+sal"],
                  "aff_seg": ["--variant", "mt_ct", "--affinity", "seg"],
                  "ct_seg": ["--variant", "mt_ct", "--ct-constraint", "seg"],
                  # the paper's 4 stages instead of the toy preset's 3 (Deviation 12)
                  "stages4": ["--num-stages", "4"]},
    "csd": {"baseline": ["--csd", "off"], "uniform": ["--sampling", "uniform"],
            # MCTformer-V2 seeds + IRN masks, without / with CSD: not Table 1 rows (csd.py Deviations 6, 18)
            "baseline_irn": ["--csd", "off", "--mask-method", "irn"], "irn": ["--mask-method", "irn"],
            # Table 1 "IRN (ResNet-50)" / "IRN w/ CSD": IRN's CAM network and IRN masks (csd.py Deviations 19, 20)
            "irn_cls_base": ["--classifier", "irn", "--mask-method", "irn", "--csd", "off"],
            "irn_cls": ["--classifier", "irn", "--mask-method", "irn"]},
}
KEYS = ("seg/val", "seg_gtcls/val", "seg_ms/val", "seg_crf/val", "cam_init/train", "cam/train", "cam/val", "cam_ens/train",
        "seed/train", "mask/train", "mask_nocrf/train", "pseudo/train", "pseudo_crf/train", "pseudo_pr/train", "cpl/train")


def run(method, row, seed, args):
    flags = {"default": [], "oracle": ["--supervision", "full"], **ROWS[method]}[row]
    out = Path(args.out) / method / f"{row}-s{seed}"
    if not (out / "metrics.json").is_file():
        if out.exists():  # an interrupted run: continue it
            cmd = [sys.executable, str(ROOT / f"{method}.py"), "--resume", str(out)]
        else:
            cmd = [sys.executable, str(ROOT / f"{method}.py"), "--data", args.data, "--seed", str(seed),
                   "--out", str(out), *args.data_flags, *flags]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        t = time.time()
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            return method, row, seed, {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
        print(f"{method} {row} seed {seed}: {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    m = json.loads((out / "metrics.json").read_text())
    found = {k: v["miou"] for k, v in m["results"].items() if k in KEYS and isinstance(v, dict)}
    return method, row, seed, {**found, "seconds": m.get("seconds")}


def cell(values):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    each = ", ".join(f"{v:.2f}" for v in values)  # per seed, in --seeds order
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} ({each})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="cosa,csrm,cobra,auxsegnet,csd")
    ap.add_argument("--rows", default="", help="comma list (default: default, every row of ROWS, oracle)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data", default="toy")
    ap.add_argument("--out", default=str(ROOT / "runs" / f"toy_table_v{data.TOY_VERSION}"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=2, help="runs at the same time")
    ap.add_argument("--knobs", default="", help="JSON dict of toy knobs: run on a toy made with them")
    args = ap.parse_args()
    args.data_flags = []
    if args.knobs:  # a toy with other knobs is a dataset folder to the scripts, so name the preset
        knobs = json.loads(args.knobs)
        name = "data-" + "-".join(f"{k}{v}" for k, v in sorted(knobs.items())).replace(" ", "")
        args.data, args.data_flags = str(data.make_toy(Path(args.out) / name, knobs=knobs)), ["--preset", "toy"]
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    jobs = [(m, r, s) for m in methods
            for r in (args.rows.split(",") if args.rows else ["default", *ROWS[m], "oracle"])
            for s in seeds]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda j: run(*j, args), jobs))
    for method in methods:
        got = {}
        for m, row, seed, res in results:
            if m == method:
                got.setdefault(row, []).append(res)
        keys = [k for k in KEYS if any(k in r for rs in got.values() for r in rs)]
        print(f"\n### {method} (toy{' ' + args.knobs if args.knobs else ''}, seeds {args.seeds}, "
              f"{args.threads} thread(s) per run)\n")
        print("| row | " + " | ".join(keys) + " | seconds |\n|---|" + "---|" * (len(keys) + 1))
        for row, rs in got.items():
            errors = [r["error"] for r in rs if "error" in r]
            if errors:
                print(f"| {row} | failed: {errors[0]} |")
                continue
            print(f"| {row} | " + " | ".join(cell([r.get(k) for r in rs]) for k in keys) + f" | {cell([r['seconds'] for r in rs])} |")
        seg = {row: [r.get("seg/val") for r in rs if "error" not in r] for row, rs in got.items()}
        if seg.get("default") and seg.get("oracle") and all(v is not None for v in seg["default"] + seg["oracle"]):
            print(f"\ndefault seg/val = {100 * statistics.mean(seg['default']) / statistics.mean(seg['oracle']):.0f} % "
                  f"of the oracle; grid: {Path(args.out) / method / f'default-s{seeds[0]}' / 'vis'}")


if __name__ == "__main__":
    main()
