"""Time to execute every notebook of the book from scratch, per notebook and in total.

    python bench/book_time.py                    # all notebooks/*.ipynb, one after the other
    python bench/book_time.py 01 08              # only notebooks whose name contains 01 or 08

The committed repository is cloned (``git clone``, so no run folder, cache or uncommitted file
comes along: ``--copy`` copies the working tree instead) into a temporary folder and each
notebook is executed there with ``jupyter nbconvert --execute``
(its default parameters, the ``python3`` kernel, the notebook's folder as working directory),
so committed notebooks and ``runs/`` are never touched and nothing is cached from an earlier
run. Notebooks run one at a time, as a reader (or ``make book``) would run them; the book's
goals on 2 CPU cores: every chapter at most 4 minutes at its defaults (chapter 15: 6), the whole
book at most 25 minutes. The table marks a chapter over its budget.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIP = shutil.ignore_patterns(".git", ".venv*", "_build", "runs", "__pycache__", ".ipynb_checkpoints",
                              "*.egg-info", ".pytest_cache")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("select", nargs="*", help="substrings of notebook names to run (default: all)")
    ap.add_argument("--timeout", type=int, default=1800, help="per-cell timeout in seconds (default 1800)")
    ap.add_argument("--jupyter", default=None, help="jupyter executable (default: next to this Python)")
    ap.add_argument("--copy", action="store_true", help="copy the working tree instead of cloning HEAD")
    args = ap.parse_args(argv)

    jupyter = args.jupyter or str(Path(sys.executable).parent / "jupyter")
    notebooks = sorted((REPO / "notebooks").glob("*.ipynb"))
    if args.select:
        notebooks = [nb for nb in notebooks if any(s in nb.name for s in args.select)]
    if not notebooks:
        print("no notebooks found", file=sys.stderr)
        return 1
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlbook_book_time_") as tmp:
        copy = Path(tmp) / "repo"
        if args.copy:
            shutil.copytree(REPO, copy, ignore=SKIP)
        else:
            subprocess.run(["git", "clone", "--quiet", "--local", str(REPO), str(copy)], check=True)
        for nb in notebooks:
            target = copy / "notebooks" / nb.name
            cmd = [jupyter, "nbconvert", "--to", "notebook", "--execute", "--inplace",
                   f"--ExecutePreprocessor.timeout={args.timeout}", "--ExecutePreprocessor.kernel_name=python3",
                   str(target)]
            print(f"  {nb.name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=target.parent, capture_output=True, text=True)
            secs = time.perf_counter() - t0
            ok = proc.returncode == 0
            if not ok:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print("    failed: " + " | ".join(tail), file=sys.stderr)
            print(f"    {secs:.1f} s", file=sys.stderr, flush=True)
            rows.append((nb.name, secs, ok))
    total = sum(s for _, s, _ in rows)
    print("| notebook | seconds | status |\n|---|---|---|")
    for name, secs, ok in rows:
        budget = 360 if name.startswith("15_") else 240
        status = ("ok" if secs <= budget else f"ok, over its {budget // 60}-minute budget") if ok else "FAILED"
        print(f"| {name} | {secs:.1f} | {status} |")
    print(f"| **total** | **{total:.1f}** ({total / 60:.1f} min) | "
          f"{sum(ok for *_, ok in rows)}/{len(rows)} ok |")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
