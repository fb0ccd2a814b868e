"""Latency of ``imtrial listen``: last instance received -> verdict shown, with dcmtk's storescu as the scanner.

    .venv/bin/python benchmarks/bench_listen.py [--slices 6 32 96] [--repeats 5] [--quiet 1]

Each series (pydicom's real MR test image stacked by the mini corpus, one with a planted TR deviation)
is sent with storescu; the listener measures from the arrival of the series' last instance to the
moment its verdict is shown (console line, status page). That is the quiet time plus the pipeline's
ingest, identify, deidentify, classify, adherence and QC steps on the series.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def dcmtk_storescu() -> str:
    """dcmtk's storescu (a virtualenv's bin/ may hold pynetdicom's app of the same name first)."""
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]:
        exe = Path(folder) / "storescu"
        if exe.is_file() and "$dcmtk:" in subprocess.run([str(exe), "--version"], capture_output=True, text=True).stdout:
            return str(exe)
    raise SystemExit("dcmtk's storescu is not installed (scripts/sysdeps.sh)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, nargs="+", default=[6, 32, 96])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quiet", type=float, default=1.0)
    args = ap.parse_args()
    os.environ.setdefault("IMTRIAL_KEY", "bench-listen-key-not-for-real-data")
    import pydicom

    from imtrial_dsl.compiler import compile_file
    from imtrial_dsl.listen.service import listen
    from imtrial_dsl.tools.minicorpus import make_corpus

    tmp = Path(tempfile.mkdtemp(prefix="bench-listen-"))
    print(f"| instances | verdict | latency median s | min | max | pipeline s (median) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    try:
        for n in args.slices:
            m = make_corpus(tmp / f"c{n}", slices=n, subjects=1, visits=(("baseline", 0),))
            trial = compile_file(m["study"]).trial
            src = Path(m["inbox"]) / "PAT0001" / "baseline"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            L = listen(trial, tmp / f"w{n}", port=port, quiet_s=args.quiet)
            try:
                for kind, pattern in (("PASS", "t2_se_tra_*.dcm"), ("FAIL", "flair_tra_*.dcm")):
                    lat, pipe = [], []
                    for r in range(args.repeats):
                        d = tmp / f"s{n}{kind}{r}"
                        d.mkdir()
                        series_uid = pydicom.uid.generate_uid()
                        for i, f in enumerate(sorted(src.glob(pattern))):
                            ds = pydicom.dcmread(f)
                            ds.SeriesInstanceUID = series_uid
                            ds.SOPInstanceUID = pydicom.uid.generate_uid()
                            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                            ds.SeriesDescription = "t2_se_tra"
                            if kind == "FAIL":
                                ds.RepetitionTime = 2500
                            ds.save_as(d / f"{i:04d}.dcm")
                        before = len(L.verdicts)
                        subprocess.run([dcmtk_storescu(), "-aet", "HOSMR1", "-aec", "IMTRIAL_SCP", "127.0.0.1",
                                        str(L.port), *map(str, sorted(d.glob("*.dcm")))], check=True, capture_output=True)
                        v = L.wait_for(before + 1, timeout=120)[-1]
                        assert v["verdict"] == kind, v
                        lat.append(v["latency_s"])
                        pipe.append(v["seconds"])
                    print(f"| {n} | {kind} | {statistics.median(lat):.2f} | {min(lat):.2f} | {max(lat):.2f} | "
                          f"{statistics.median(pipe):.2f} |", flush=True)
            finally:
                L.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
