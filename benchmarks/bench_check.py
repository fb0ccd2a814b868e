"""Checker at study scale: `imtrial check` on generated studies of 100 / 300 / 1,000 / 3,000 protocols.

Each size runs in a fresh process (`imtrial check FILE`, what a designer runs), so the time includes start-up,
parse, lower, imports, every check and printing; peak RSS is the child's ``ru_maxrss``. Two shapes:

- *realistic*: 24 sites with MR, CT and PET/CT devices of four vendors, protocols of the three modalities with
  anchored match rules, ImageType rules, constraints with units, vendor/software variants, and a schedule of
  12 visits that acquire them;
- *overlapping* (worst case): every MR protocol matches the same series (one copied protocol), so every pair
  of them is a match ambiguity (E405).

Run on demand:  .venv/bin/python benchmarks/bench_check.py [--sizes 100,300,1000,3000] [--timeout 600] [--tree DIR]
Goal: linear or n·log n in protocols; 3,000 protocols in seconds, peak RSS under 500 MB.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENDORS = [("Siemens", "MAGNETOM Prisma", "XA30"), ("GE", "SIGNA Premier", "MR30.1"),
           ("Philips", "Ingenia Elition X", "R5.7"), ("Canon", "Vantage Galan 3T", "V7.0")]
CT = [("Siemens", "SOMATOM Force", "VB20"), ("GE", "Revolution CT", "23.1"), ("Philips", "IQon", "4.7")]
PT = [("Siemens", "Biograph Vision", "VG80"), ("GE", "Discovery MI", "PET4.0")]
SEQ = ["t1", "t2", "flair", "swi", "dwi", "bold", "asl", "pd"]


def _header(n_sites: int) -> list[str]:
    out = ['import "stdlib/deid/ps315.imtrial"', 'import "stdlib/qc/common.imtrial"', "",
           'study SCALE01 "Generated study for the checker benchmark" {', '  registry "NCT00000001"',
           '  sponsor "Bench"', '  version "1"', "}", ""]
    for s in range(n_sites):
        out += [f'site S{s:02d} "Site {s}" {{', f'  contact imaging_pi "PI {s}" <pi{s}@site{s}.example>',
                f'  irb approved "IRB-{s}" date 2026-01-15']
        vendor, model, sw = VENDORS[s % len(VENDORS)]
        out += [f"  device S{s:02d}_MR1 {{",
                f'    modality MR  vendor {vendor}  model "{model}"  software "{sw}"  field 3 T  serial "MR{s:03d}"', "  }"]
        vendor, model, sw = CT[s % len(CT)]
        out += [f"  device S{s:02d}_CT1 {{", f'    modality CT  vendor {vendor}  model "{model}"  software "{sw}"  serial "CT{s:03d}"', "  }"]
        if s % 3 == 0:
            vendor, model, sw = PT[s % len(PT)]
            out += [f"  device S{s:02d}_PT1 {{",
                    f'    modality PT  vendor {vendor}  model "{model}"  software "{sw}"  serial "PT{s:03d}"', "  }"]
        out.append("}")
    return out


def _protocol(p: int) -> list[str]:
    kind = p % 10
    name = f"P{p:05d}"
    if kind < 7:  # MR: one of eight sequence kinds, with vendor variants
        seq = SEQ[p % len(SEQ)]
        return [f'protocol {name} modality MR "MR protocol {p}" {{',
                f'  match SeriesDescription ~ "(?i)^{name.lower()}[_ ]{seq}"',
                '  match ImageType has "ORIGINAL"',
                f"  RepetitionTime = {2000 + (p % 400) * 5} ms ± 1%",
                "  EchoTime in 2.0 .. 3.5 ms",
                "  FlipAngle = 9 deg ± 1 deg",
                "  SliceThickness <= 1.2 mm severity warning",
                "  PixelSpacing[0] in 0.9 .. 1.1 mm",
                '  variant Siemens software "XA30" { SequenceName ~ "tfl3d1" }',
                "  variant GE { RepetitionTime = 7.3 ms ± 10%  EchoTime in 2.8 .. 3.2 ms }",
                '  variant Philips software "R5.*" { RepetitionTime = 6.8 ms ± 10%  remove FlipAngle }',
                "}"]
    if kind < 9:
        return [f'protocol {name} modality CT "CT protocol {p}" {{',
                f'  match SeriesDescription ~ "(?i)^{name.lower()} (chest|abdomen)"',
                '  match ImageType has "AXIAL"',
                "  KVP in 100 .. 120 kV",
                "  SliceThickness <= 1.5 mm",
                "  variant GE { KVP in 80 .. 140 kV }",
                "  variant Siemens { KVP in 70 .. 150 kV }",
                "  variant Philips { KVP in 80 .. 140 kV }",
                "}"]
    return [f'protocol {name} modality PT "PET protocol {p}" {{',
            f'  match SeriesDescription ~ "(?i)^{name.lower()}_ac"',
            "  SliceThickness <= 3 mm severity warning",
            "  variant Siemens { SliceThickness <= 2 mm }",
            "  variant GE { SliceThickness <= 3.3 mm }",
            "}"]


def generate(n_protocols: int, overlapping: bool = False, n_sites: int = 24, n_visits: int = 12) -> str:
    """A study with ``n_protocols`` protocols (see the module docstring for the two shapes)."""
    out = _header(n_sites)
    names = [f"P{p:05d}" for p in range(n_protocols)]
    for p in range(n_protocols):
        if overlapping:
            out += [f'protocol {names[p]} modality MR "Copied T1 protocol {p}" {{', '  match SeriesDescription ~ "(?i)t1"',
                    "  RepetitionTime = 2300 ms ± 1%", "}"]
        else:
            out += _protocol(p)
    out.append("schedule {")
    for v in range(n_visits):
        visit = "baseline" if v == 0 else f"m{v * 3}"
        acq = ", ".join(names[v % n_visits::n_visits]) or names[0]
        out.append(f"  visit {visit} at month {v * 3} window -14 .. +14 d acquire {acq}")
    out += ["  same_device required", "}",
            "deidentify using ps315_basic with retain_longitudinal_modified_dates, clean_descriptors {",
            "  key env IMTRIAL_KEY", "}",
            'identifiers {\n  subject "SCALE01-{site}-{seq:04}{check}"\n  check_digit mod97\n  key env IMTRIAL_KEY\n}',
            f"qc snr_check on {names[0]} uses snr(min = 12)"]
    return "\n".join(out) + "\n"


def run_one(path: Path, timeout: float, tree: str = "") -> dict:
    """`imtrial check PATH` in a child process (of the source tree ``tree``, default this one): wall and CPU
    time, peak RSS (MB), exit code, last output line."""
    env = dict(os.environ, NO_COLOR="1")
    if tree:
        env["PYTHONPATH"] = tree
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "imtrial_dsl", "check", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, cwd=tree or ROOT, env=env, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        dt = time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        dt = None
    # the child has been waited for: its peak RSS is in RUSAGE_CHILDREN (the maximum over the children so far)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    lines = out.strip().splitlines()
    return {"seconds": dt, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024, "rc": proc.returncode, "summary": lines[-1] if lines else "",
            "lines": len(lines)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,300,1000,3000", help="protocol counts, comma-separated")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run before it counts as not finished")
    ap.add_argument("--shape", choices=("both", "realistic", "overlapping"), default="both")
    ap.add_argument("--tree", default="", help="check with the imtrial_dsl of this source tree (e.g. an export of an "
                    "older commit, for a before/after comparison); default: this one")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    shapes = ("realistic", "overlapping") if args.shape == "both" else (args.shape,)
    print("| shape | protocols | lines | wall (s) | CPU (s) | peak RSS (MB) | exit | imtrial check says |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            for n in sizes:
                path = Path(tmp) / f"{shape}_{n}.imtrial"
                text = generate(n, overlapping=shape == "overlapping")
                path.write_text(text, encoding="utf-8")
                # ru_maxrss of children is a running maximum: measure each size in its own grandchild
                res = _isolated(path, args.timeout, args.tree)
                secs = f"{res['seconds']:.2f}" if res["seconds"] is not None else f"> {args.timeout:.0f} (killed)"
                print(f"| {shape} | {n} | {len(text.splitlines())} | {secs} | {res['cpu']:.2f} | {res['rss_mb']:.0f} | {res['rc']} | "
                      f"{res['summary'].split(': ', 1)[-1]} ({res['lines']} lines of output) |", flush=True)
                expected_rc = 0 if shape == "realistic" else 1
                if res["seconds"] is None or res["rc"] != expected_rc:
                    status = 1
    if os.name == "posix":
        print(f"\nload average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings scale with it)")
    return status


def _isolated(path: Path, timeout: float, tree: str) -> dict:
    """Run :func:`run_one` in a fresh Python so RUSAGE_CHILDREN holds only this run's peak."""
    import json

    code = ("import json, sys; sys.path.insert(0, %r); from bench_check import run_one; from pathlib import Path; "
            "print(json.dumps(run_one(Path(%r), %r, %r)))") % (str(Path(__file__).resolve().parent), str(path), timeout, tree)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
