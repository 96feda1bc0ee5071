"""The five method scripts share one skeleton (../shared/STYLE.md §4) so that `diff cosa.py csd.py` shows the
methods, not five ways of writing the plumbing:

- the same section headers in the same order (Config, Model, Losses, Pseudo labels, Train, Evaluate,
  Infrastructure, Main), each a ruler / name / ruler triple;
- one Infrastructure block, byte-identical in all five scripts between BEGIN and END;
- the same common Args fields, and the glossary names of the README ("Reading the code").

After editing the block in one script, copy it to the other four:
    python tests/test_skeleton.py --sync cosa.py
"""
import ast
import re
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("cosa.py", "csrm.py", "cobra.py", "auxsegnet.py", "csd.py")
BEGIN = "# === Infrastructure: identical in all five scripts (edit one, copy to all) ==="
END = "# === End of infrastructure ==="
RULER = "# " + "=" * 98
SECTIONS = ["Config", "Model", "Losses", "Pseudo labels", "Train", "Evaluate", "Infrastructure", "Main"]
COMMON_ARGS = "    # --- common interface (DESIGN.md): the same fields in all five scripts ---"
GLOSSARY = ("Args", "PRESETS", "build_model", "train_step", "evaluate", "main")


def block(text):
    """The Infrastructure block of a script's text (markers included); ValueError if missing or repeated."""
    lines = text.splitlines()
    if lines.count(BEGIN) != 1 or lines.count(END) != 1:
        raise ValueError(f"needs exactly one '{BEGIN}' and one '{END}' line")
    start, stop = lines.index(BEGIN), lines.index(END)
    if stop < start:
        raise ValueError("the end marker comes before the begin marker")
    return lines[start:stop + 1]


def sections(text):
    """Section names in file order: `# Name` between two ruler lines; the block counts as 'Infrastructure'."""
    lines, names = text.splitlines(), []
    for i, line in enumerate(lines):
        if line == BEGIN:
            names.append("Infrastructure")
        elif 0 < i < len(lines) - 1 and lines[i - 1] == RULER and lines[i + 1] == RULER and line.startswith("# "):
            names.append(line[2:])
    return names


def common_args(text):
    """The common Args fields: the lines after COMMON_ARGS up to the next `    # ---` line."""
    lines = text.splitlines()
    start = lines.index(COMMON_ARGS)
    stop = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("    # ---"))
    return lines[start:stop]


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i, x, y
    return min(len(a), len(b)), "<end>" if len(a) <= len(b) else a[len(b)], "<end>" if len(b) <= len(a) else b[len(a)]


def drift(texts):
    """Problems of a {name: text} set of scripts, one string each; empty when the skeleton holds."""
    problems, ref = [], None
    for name, text in texts.items():
        try:
            b = block(text)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        if ref is None:
            ref = (name, b)
        elif b != ref[1]:
            i, x, y = first_difference(ref[1], b)
            problems.append(f"{name}: Infrastructure line {i + 1} differs from {ref[0]}: {y!r} vs {x!r}")
        if sections(text) != SECTIONS:
            problems.append(f"{name}: sections {sections(text)} != {SECTIONS}")
    return problems


def read_all():
    return {name: (ROOT / name).read_text() for name in SCRIPTS}


def test_infrastructure_identical_and_sections_in_order():
    problems = drift(read_all())
    assert not problems, "\n".join(problems) + "\n(edit one copy, then: python tests/test_skeleton.py --sync FILE)"


def test_drift_is_caught():
    """One changed, missing or moved line in one copy fails the check (the check itself can fail)."""
    texts = read_all()
    assert not drift(texts)
    victim = "csd.py"
    lines = texts[victim].splitlines()
    i = lines.index(BEGIN) + 20
    changed = dict(texts, **{victim: "\n".join(lines[:i] + [lines[i] + " "] + lines[i + 1:])})
    assert any("line 21 differs" in p for p in drift(changed))
    removed = dict(texts, **{victim: texts[victim].replace(END + "\n", "")})
    assert drift(removed)
    moved = texts[victim].replace("\n" + RULER + "\n# Losses\n" + RULER + "\n", "\n")
    moved = moved.replace("\n" + RULER + "\n# Train\n", "\n" + RULER + "\n# Losses\n" + RULER + "\n" + RULER + "\n# Train\n")
    assert any("sections" in p for p in drift(dict(texts, **{victim: moved})))


def test_common_args_fields_identical():
    ref = common_args((ROOT / SCRIPTS[0]).read_text())
    for name, text in read_all().items():
        assert common_args(text) == ref, f"{name}: the common Args fields differ from {SCRIPTS[0]}'s"


@pytest.mark.parametrize("name", SCRIPTS)
def test_glossary_names_defined(name):
    tree = ast.parse((ROOT / name).read_text())
    top = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    top |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert set(GLOSSARY) <= top, f"{name} lacks {sorted(set(GLOSSARY) - top)}"
    assert any(re.fullmatch(r"train_\w+", n) and n not in ("train_step", "train_loop") for n in top), \
        f"{name} has no train_<stage> function"


def sync(source):
    """Copy the Infrastructure block of `source` into the other scripts."""
    ref = block((ROOT / source).read_text())
    for name in SCRIPTS:
        text = (ROOT / name).read_text()
        lines = text.splitlines()
        start, stop = lines.index(BEGIN), lines.index(END)
        new = "\n".join(lines[:start] + ref + lines[stop + 1:]) + ("\n" if text.endswith("\n") else "")
        if new != text:
            (ROOT / name).write_text(new)
            print(f"updated {name}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--sync" and Path(sys.argv[2]).name in SCRIPTS:
        sync(Path(sys.argv[2]).name)
    else:
        print(__doc__)
        sys.exit(2)


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_limit_spec_is_understood(name):
    """A typo in LIMITS ('=>0', '<1') must fail here, not silently accept or reject every value."""
    import importlib
    mod = importlib.import_module(name[:-3])
    for field, spec in {**mod.COMMON_LIMITS, **mod.LIMITS}.items():
        mod.in_range(0.5, spec)  # raises ValueError on an unknown spec
    for spec in ("=>0", "<1", "0..1"):
        with pytest.raises(ValueError):
            mod.in_range(0.5, spec)
    assert mod.in_range(1.0, ">=1") and not mod.in_range(1.0, ">1") and mod.in_range(1.0, "(0,1]") \
        and not mod.in_range(1.0, "[0,1)")


@pytest.mark.parametrize("name", SCRIPTS)
def test_save_grid_recreates_a_missing_folder(name, tmp_path):
    """A resumed run whose vis/ was deleted still saves its grids (it crashed with FileNotFoundError at the end of a
    stage). Catches: the mkdir dropped from save_grid."""
    import importlib
    mod = importlib.import_module(name[:-3])
    path = tmp_path / "run" / "vis" / "val.png"
    mod.save_grid(path, [[np.zeros((4, 6, 3), np.uint8)]], ["image"])
    assert path.is_file()


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_boolean_flag_sets_its_field_both_ways(name):
    """build_parser gives each bool field --X / --no-X (BooleanOptionalAction), which reads EVERY flag starting with
    --no- as False: a field named no_X could never be set from the command line (cosa.py's --no-gc ... --no-dt did
    nothing until 2026-12-07). Catches: a bool field whose flag does not reach it, in either direction."""
    import dataclasses
    import importlib
    mod = importlib.import_module(name[:-3])
    parser = mod.build_parser()
    for field in dataclasses.fields(mod.Args):
        if isinstance(field.default, bool):
            flag = "--" + field.name.replace("_", "-")
            no_flag = "--no-" + field.name.replace("_", "-")
            assert getattr(parser.parse_args([flag]), field.name) is True, f"{name}: {flag}"
            assert getattr(parser.parse_args([no_flag]), field.name) is False, f"{name}: {no_flag}"
