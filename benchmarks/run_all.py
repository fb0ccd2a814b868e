"""Run every benchmark, one after the other, and print their tables (on demand; not part of the tests).

    make bench            # or: .venv/bin/python benchmarks/run_all.py [--quick]

The peers (pydicom/deid, dicognito, mrQA) are installed into the current environment first; they are
benchmark-only dependencies, never imported by imtrial itself.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = ["deid", "dicognito", "mrQA"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small corpora (smoke run, figures not meaningful)")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *PEERS], check=False)
    runs = [
        ["bench_compile.py"],
        ["bench_check.py"] + (["--sizes", "100,300"] if args.quick else []),
        ["bench_docs.py"] + (["--runs", "1"] if args.quick else []),
        ["bench_deid.py"] + (["--n", "300"] if args.quick else []),
        ["bench_adherence.py"] + (["--files", "300"] if args.quick else []),
        ["bench_listen.py"] + (["--repeats", "1", "--slices", "6"] if args.quick else []),
        ["bench_cwl.py"] + (["--subjects", "1", "--visits", "baseline", "--size", "small"] if args.quick else []),
        ["bench_enhanced.py"] + (["--rounds", "1"] if args.quick else []),
        ["bench_run.py"] + (["--size", "small", "--visits", "baseline"] if args.quick else []),
    ]
    status = 0
    for cmd in runs:
        print(f"\n===== {' '.join(cmd)}", flush=True)
        status |= subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:]]).returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
