"""Issue 17: files given to any loading flag never run code, foreign or corrupt files stop in one line (exit 2),
and SIGINT / SIGTERM stop a run with a checkpoint from which --resume reaches the uninterrupted metrics."""
import ast
import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")

# Each script's smallest configuration (the same as in its own test file).
TINY = {
    "cosa": ["--preset", "toy", "--backbone-kwargs", "img_size=32,patch_size=8,embed_dim=32,depth=3,num_heads=2",
             "--crop", "32", "--eval-size", "32", "--batch-size", "4", "--max-iters", "8", "--loss-warmup", "2",
             "--warmup-iters", "2", "--queue-len", "2", "--decoder-dim", "16", "--num-vis", "2", "--aux-block", "-2",
             "--workers", "0"],
    "csrm": ["--preset", "toy", "--crop", "64", "--cam-epochs", "1", "--cam-batch", "8", "--epochs", "2",
             "--steps-per-epoch", "2", "--batch-size", "2", "--seg-epochs", "1", "--seg-batch", "8", "--val-images", "2",
             "--vis", "2", "--mix-prob", "1", "--queries", "8", "--negatives", "4", "--crf-iters", "2", "--workers", "0"],
    "cobra": ["--preset", "toy", "--crop", "64", "--k-sap-pos", "2", "--k-sap-neg", "1", "--k-cap-pos", "1",
              "--k-cap-neg", "2", "--max-iters", "2", "--batch-size", "4", "--irn-batch", "4", "--irn-crop", "64",
              "--seg-batch", "4", "--seg-crop", "64", "--warmup-epochs", "0", "--workers", "0"],
    "auxsegnet": ["--epochs-cls", "1", "--epochs-per-stage", "1", "--num-stages", "2", "--crop-size", "64",
                  "--cls-crop-size", "64", "--ckpt-every", "1000", "--workers", "0"],
    "csd": ["--preset", "toy", "--max-iters", "2", "--batch-size", "4", "--seg-batch", "4", "--crop-size", "32",
            "--csd-resize", "36", "--seg-crop", "32", "--embed-dim", "32", "--depth", "2", "--num-heads", "2",
            "--layer-index", "2", "--seed-scales", "0.5", "--workers", "0"],
}
# Every flag that reads a file with torch.load, per script (beside --weights, --eval-only --ckpt and --resume).
EXTRA_LOADERS = {"csrm": [["--init-ckpt"], ["--seg-init", "imagenet", "--seg-weights"]], "cobra": [["--cobra-ckpt"]]}


class Payload:
    """Unpickling this object runs a shell command: the attack a downloaded .pth file can carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def payload_file(tmp_path):
    marker, path = tmp_path / "PWNED", tmp_path / "evil.pth"
    torch.save({"state_dict": Payload(marker), "format": "wsss-reference/1"}, path)
    return path, marker


def main_exit(mod, argv, capsys):
    """Run the script's entry point in-process; -> (exit code, stderr lines)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        mod.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def assert_one_line(code, err, method, needle):
    assert code == 2 and len(err) == 1 and err[0].startswith(f"{method}.py: error:") and needle in err[0], err


def test_payload_is_a_real_attack(tmp_path):
    """The payload runs when loaded the unsafe way, so the tests below can fail."""
    path, marker = payload_file(tmp_path)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_no_unsafe_load_anywhere():
    """One torch.load in each script, inside the shared load_checkpoint, with weights_only=True."""
    for m in TINY:
        src = (ROOT / f"{m}.py").read_text()
        loads = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and ast.unparse(n.func) == "torch.load"]
        assert [ast.unparse(n) for n in loads] == ["torch.load(path, map_location='cpu', weights_only=True)"], m
        assert "import pickle" not in src and "weights_only=False" not in src, m


def loading_cases(m):
    cases = [["--no-pretrained", "--weights"], ["--eval-only", "--ckpt"]] + EXTRA_LOADERS.get(m, [])
    return [(m, c) for c in cases]


@pytest.mark.parametrize("method,flags", [c for m in TINY for c in loading_cases(m)],
                         ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_payload_never_runs(method, flags, toy_root, tmp_path, capsys):
    mod = importlib.import_module(method)
    path, marker = payload_file(tmp_path)
    code, err = main_exit(mod, ["--data", toy_root, "--out", tmp_path / "run", *TINY[method], *flags, path], capsys)
    assert_one_line(code, err, method, "could run code")
    assert not marker.exists()


@pytest.mark.parametrize("method", TINY)
def test_payload_in_resume_never_runs_and_run_is_kept(method, toy_root, tmp_path, capsys):
    mod = importlib.import_module(method)
    run = tmp_path / "run"
    args, _ = mod.parse_args(["--data", str(toy_root), "--out", str(run), *TINY[method]])
    (run / "checkpoints").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps(dataclasses.asdict(args)))
    path, marker = payload_file(tmp_path)
    os.replace(path, run / "checkpoints" / "last.pt")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, err = main_exit(mod, ["--resume", run], capsys)
    assert_one_line(code, err, method, "could run code")
    assert not marker.exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing of the run damaged


def foreign_files(tmp_path, method):
    other = "csd" if method != "csd" else "cosa"
    files = {}
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    files["notes.txt"] = (tmp_path / "notes.txt", "not a readable torch checkpoint")
    torch.save({"format": "wsss-reference/1", "method": other, "weights": {"x": torch.zeros(3)}}, tmp_path / "o.pt")
    files["other method"] = (tmp_path / "o.pt", f"written by {other}.py")
    torch.save({"model": {"conv.weight": torch.zeros(2, 2)}}, tmp_path / "sd.pt")
    files["plain state dict"] = (tmp_path / "sd.pt", "is not a run checkpoint")
    torch.save({"format": "wsss-reference/1", "method": method, "weights": {}}, tmp_path / "part.pt")
    files["no args"] = (tmp_path / "part.pt", "is not a complete run checkpoint (no args, state, payload, rng)")
    torch.save({"format": "wsss-reference/1", "args": {}}, tmp_path / "anon.pt")
    files["no method"] = (tmp_path / "anon.pt", "is not a complete run checkpoint (no method, state")
    blob = (tmp_path / "o.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(blob[: len(blob) // 2])
    files["truncated"] = (tmp_path / "cut.pt", "not a readable torch checkpoint")
    return files


@pytest.mark.parametrize("method", TINY)
def test_foreign_or_corrupt_ckpt_one_line(method, toy_root, tmp_path, capsys):
    mod = importlib.import_module(method)
    for what, (path, needle) in foreign_files(tmp_path, method).items():
        code, err = main_exit(mod, ["--data", toy_root, "--out", tmp_path / "run", *TINY[method], "--eval-only",
                                    "--ckpt", path], capsys)
        assert_one_line(code, err, method, needle)
        assert not (tmp_path / "run").exists(), what


@pytest.mark.parametrize("method", TINY)
def test_foreign_weights_one_line(method, toy_root, tmp_path, capsys):
    """A state dict of another network given to --weights: how many keys are missing, and one of them."""
    mod = importlib.import_module(method)
    torch.save({"state_dict": {"module.not_our.layer.weight": torch.zeros(2, 2)}}, tmp_path / "w.pt")
    entries = {"cnn": {"x": torch.zeros(1)}, "vit": {"x": torch.zeros(1)}} if method == "cobra" else None
    if entries:  # CoBra's --weights is a dict of backbone state dicts
        torch.save(entries, tmp_path / "w.pt")
    code, err = main_exit(mod, ["--data", toy_root, "--out", tmp_path / "run", *TINY[method], "--no-pretrained",
                                "--weights", tmp_path / "w.pt"], capsys)
    assert_one_line(code, err, method, "does not fit")
    assert "missing keys" in err[0] and "unexpected" in err[0]


def test_block_loaders_name_the_problem(tmp_path):
    """The shared loaders (identical in all five scripts, tests/test_skeleton.py): wrong number of classes."""
    import cosa
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(SystemExit) as e:
        cosa.load_weights(net, torch.nn.Sequential(torch.nn.Linear(4, 5)).state_dict(), "--weights w.pt")
    assert e.value.code == 2
    state = {"module.0.weight": torch.ones(3, 4), "module.0.bias": torch.ones(3)}
    cosa.load_weights(net, cosa.state_dict_of({"state_dict": state}, "w"), "w")  # DDP prefix and nesting removed
    assert torch.equal(net[0].weight, torch.ones(3, 4))
    # a file from before PyTorch 0.4.1 (torchvision's first ResNet weights) has no BatchNorm num_batches_tracked:
    # it loads; a real missing key still fails in one line. Catches the buffer counted as missing, or any key forgiven.
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(2))
    old = {k: torch.full_like(v, 2) for k, v in bn.state_dict().items() if not k.endswith("num_batches_tracked")}
    cosa.load_weights(bn, old, "--weights old.pth")
    assert torch.equal(bn[0].running_mean, torch.full((2,), 2.0))
    with pytest.raises(SystemExit) as e:
        cosa.load_weights(bn, {k: v for k, v in old.items() if k != "0.running_var"}, "--weights old.pth")
    assert e.value.code == 2


KILLED_WRITER = """
import os, signal, sys, torch
sys.path.insert(0, sys.argv[1])
import cosa
last = sys.argv[2]
full = lambda it: {"format": "wsss-reference/1", "method": "cosa", "args": {}, "state": {}, "payload": {},
                   "rng": {}, "weights": {}, "it": torch.tensor(it)}
cosa.save_checkpoint(last, full(1))
real_save = torch.save
def save_then_die(obj, f):  # half of the new file is on disk when the process is killed
    real_save(obj, f)
    with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
cosa.save_checkpoint(last, full(2))
"""


def test_sigkill_during_checkpoint_write_keeps_last(tmp_path):
    """SIGKILL in the middle of writing checkpoints/last.pt: the previous complete file is still there and loads."""
    import cosa
    last = tmp_path / "last.pt"
    p = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(ROOT), str(last)], env=ENV, timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert int(cosa.load_run_checkpoint(last, "--resume")["it"]) == 1
    with pytest.raises(SystemExit):  # the half-written file would not have loaded
        cosa.load_checkpoint(tmp_path / "last.pt.tmp", "--resume")


# --------------------------------------------------------------------------------------------- signals
SIGNAL_RUNS = {"cosa": signal.SIGINT, "csrm": signal.SIGTERM, "cobra": signal.SIGTERM, "auxsegnet": signal.SIGINT,
               "csd": signal.SIGTERM}
LONGER = {"cosa": ["--max-iters", "12"], "cobra": ["--max-iters", "12"], "csd": ["--max-iters", "12"],
          "csrm": ["--steps-per-epoch", "6"], "auxsegnet": []}


def cli(method, *args, wait=True):
    cmd = [sys.executable, str(ROOT / f"{method}.py"), *map(str, args)]
    return (subprocess.run if wait else subprocess.Popen)(cmd, cwd=ROOT, env=ENV, text=True, **(
        dict(capture_output=True, timeout=600) if wait else dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)))


def metrics(run):
    m = json.loads((run / "metrics.json").read_text())
    return {k: v.get("miou") if isinstance(v, dict) else v for k, v in m["results"].items()}


@pytest.mark.parametrize("method", SIGNAL_RUNS)
def test_signal_stops_with_checkpoint_and_resume_matches(method, toy_root, tmp_path):
    """SIGINT (cosa, auxsegnet) / SIGTERM (the others) once the first training step is logged: exit 128+signal,
    the --resume command printed, and the resumed run ends with the uninterrupted run's metrics."""
    sig, args = SIGNAL_RUNS[method], ["--data", toy_root, *TINY[method], *LONGER[method], "--log-every", "1"]
    ref = cli(method, *args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    # issue 18: every logged training step says where the time went, metrics.json the seconds per stage
    steps = [r for r in map(json.loads, (tmp_path / "ref" / "log.jsonl").read_text().splitlines()) if "iteration" in r]
    assert steps and all(r["time/data"] >= 0 and r["time/step"] > 0 for r in steps)
    seconds = json.loads((tmp_path / "ref" / "metrics.json").read_text())["stage_seconds"]
    assert seconds and all(v >= 0 for v in seconds.values())
    run = tmp_path / "stopped"
    p = cli(method, *args, "--out", run, wait=False)
    log, t0 = run / "log.jsonl", time.time()
    while not (log.is_file() and "time/step" in log.read_text()) and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.01)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 128 + sig, (p.returncode, err[-2000:])
    assert f"--resume {run}" in out and "Traceback" not in err
    assert not (run / "metrics.json").exists()
    p = cli(method, "--resume", run)
    assert p.returncode == 0, p.stderr[-2000:]
    assert metrics(run) == metrics(tmp_path / "ref")
