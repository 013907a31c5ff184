"""One benchmark script, run on this checkout and on an earlier commit, interleaved, in the same run.

    python tests/bench/compare.py REF SCRIPT [--repeats 3] [--json OUT] [-- SCRIPT ARGS...]
    python tests/bench/compare.py 0ec2b0e accuracy.py --repeats 1 -- --repeats 1 --train conversation_data.sample.jsonl --test conversation_data.sample.jsonl

REF is checked out with `git worktree` under .bucketchat/compare/REF (kept for later runs). It runs
on this checkout's installed packages (a small venv whose path file points at them), with REF's own
code first on the path and its own `bucketchat` command; so the two sides differ only in the code.
SCRIPT is a file in tests/bench/ of *each* side, called with `--json`; the runs alternate (before,
after, before, ...) so a busy spell of the shared machine hits both. Prints, for every number the two
JSON results share at the same place, the median of each side and after/before. Both sides run
from this checkout's folder; give data paths explicitly (a script's default is relative to its own
tree, and the earlier tree sits elsewhere). ``--this-script`` runs this checkout's SCRIPT on both
sides (with each side's Python and `bucketchat`), for a benchmark REF does not have.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def checkout(ref: str) -> Path:
    """A worktree of ``ref`` with a venv that borrows this checkout's site-packages."""
    commit = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    tree = ROOT / ".bucketchat" / "compare" / commit
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True, capture_output=True)
    venv = tree / ".venv"
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next((venv / "lib").glob("python*/site-packages"))
        here = next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())
        (site / "_borrowed.pth").write_text(f"{tree}\n{here}\n")  # REF's code first, then the packages
        cli = "interfaces.cli" if (tree / "interfaces" / "cli.py").is_file() else "flows.cli"
        (venv / "bin" / "bucketchat").write_text(f'#!/bin/sh\nexec "{venv}/bin/python" -P -m {cli} "$@"\n')  # -P: REF's code, not the cwd's
        (venv / "bin" / "bucketchat").chmod(0o755)
    return tree


def numbers(x, path: str = "") -> dict[str, float]:
    """Every number in a JSON value, by its place ("pipeline_s", "runs.0.accuracy", ...)."""
    if isinstance(x, bool):
        return {}
    if isinstance(x, int | float):
        return {path: float(x)}
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else []
    return {k: v for key, value in items for k, v in numbers(value, f"{path}.{key}" if path else str(key)).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref")
    p.add_argument("script")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--this-script", action="store_true", help="run this checkout's SCRIPT on both sides")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    a = p.parse_args(argv[:cut])
    a.args = argv[cut + 1 :]  # the script's own arguments
    sides = {"before": checkout(a.ref), "after": ROOT}
    found: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(a.repeats):
        for side, tree in sides.items():
            out = Path(tempfile.mkdtemp(prefix=f"bucketchat-compare-{side}-")) / "result.json"
            python = tree / ".venv" / "bin" / "python"
            print(f"[{i + 1}/{a.repeats}] {side}: {a.script} {' '.join(a.args)}", flush=True)
            # From this checkout's folder, so a relative path in the arguments names the same file for both.
            script = (ROOT if a.this_script else tree) / "tests" / "bench" / a.script
            subprocess.run([str(python), str(script), *a.args, "--json", str(out)], cwd=ROOT, check=True)
            found[side].append(numbers(json.loads(out.read_text())))
    shared = sorted(set.intersection(*(set(r) for r in found["before"] + found["after"])))
    table = {}
    for key in shared:
        before = statistics.median(r[key] for r in found["before"])
        after = statistics.median(r[key] for r in found["after"])
        table[key] = {"before": before, "after": after, "ratio": after / before if before else None}
        print(f"{key:<48} {before:>12.4g} {after:>12.4g}  {'' if not before else f'{after / before:.2f}x'}")
    if a.json:
        a.json.write_text(json.dumps({"ref": a.ref, "script": a.script, "args": a.args, "repeats": a.repeats, "figures": table}, indent=2))


if __name__ == "__main__":
    main()
