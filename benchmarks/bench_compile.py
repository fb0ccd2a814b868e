"""Compile benchmark: a generated study of 100 sites, 300 devices, 50 protocols x 3 variants, 20 visits.

Times ``compile_text`` (parse + lower + imports + check + graph), best of N runs, and prints it.
Run on demand:  PYTHONPATH=. .venv/bin/python benchmarks/bench_compile.py [--runs 5] [--profile]
Goal: < 0.5 s on the 2-core development machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VENDORS = [("Siemens", "MAGNETOM Prisma", "XA30"), ("GE", "SIGNA Premier", "MR30.1"), ("Philips", "Ingenia Elition X", "R5.7")]


def generate(n_sites: int = 100, devices_per_site: int = 3, n_protocols: int = 50, n_visits: int = 20) -> str:
    out = ['import "stdlib/deid/ps315.imtrial"', 'import "stdlib/qc/common.imtrial"', "",
           'study BIG01 "Generated benchmark study" {', '  registry "NCT00000000"', '  sponsor "Bench"', '  version "1"', "}", ""]
    for s in range(n_sites):
        out.append(f'site S{s:03d} "Site {s}" {{')
        out.append(f'  contact imaging_pi "PI {s}" <pi{s}@site{s}.example>')
        out.append(f'  irb approved "IRB-{s}" date 2026-01-15')
        for k in range(devices_per_site):
            vendor, model, sw = VENDORS[(s + k) % 3]
            out.append(f"  device S{s:03d}_MR{k} {{")
            out.append(f'    modality MR  vendor {vendor}  model "{model}"  software "{sw}"  field 3 T  serial "SN{s:03d}{k}"')
            out.append("  }")
        out.append("}")
    for p in range(n_protocols):
        out.append(f'protocol P{p:02d} modality MR "Protocol {p}" {{')
        out.append(f'  match SeriesDescription ~ "(?i)^p{p:02d}[_ ](t1|t2|flair|swi)"')
        out.append('  match ImageType has "ORIGINAL"')
        out.append(f"  RepetitionTime = {2000 + p * 10} ms ± 1%")
        out.append("  EchoTime in 2.0 .. 3.5 ms")
        out.append("  FlipAngle = 9 deg ± 1 deg")
        out.append("  SliceThickness <= 1.2 mm severity warning")
        out.append("  PixelSpacing[0] in 0.9 .. 1.1 mm")
        out.append(f'  variant Siemens software "XA30" {{ SequenceName ~ "tfl3d1" }}')
        out.append("  variant GE { RepetitionTime = 7.3 ms ± 10%  EchoTime in 2.8 .. 3.2 ms }")
        out.append('  variant Philips software "R5.*" { RepetitionTime = 6.8 ms ± 10%  remove FlipAngle }')
        out.append("}")
    out.append("schedule {")
    for v in range(n_visits):
        name = "baseline" if v == 0 else f"m{v * 3}"
        acq = ", ".join(f"P{p:02d}" for p in range(v % 5, n_protocols, 5))
        out.append(f"  visit {name} at month {v * 3} window -14 .. +14 d acquire {acq}")
    out.append("  same_device required")
    out.append("}")
    out.append("deidentify using ps315_basic with retain_longitudinal_modified_dates, clean_descriptors {")
    out.append("  key env IMTRIAL_KEY")
    out.append("}")
    out.append('identifiers {\n  subject "BIG01-{site}-{seq:04}{check}"\n  check_digit mod97\n  key env IMTRIAL_KEY\n}')
    out.append("qc p00_snr on P00, P01 uses snr(min = 12)")
    out.append('analysis vol "Volume" {\n  input t1 from P00\n  output volumes file\n  run "vol {t1} {volumes}"\n'
               '  measure volume mm3 "Volume"\n}')
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print a cProfile summary of one run")
    args = ap.parse_args()
    from imtrial_dsl.compiler import compile_text

    text = generate()
    name = str(Path(__file__).resolve().parent / "generated_study.imtrial")
    first = time.perf_counter()
    res = compile_text(text, name)
    first = time.perf_counter() - first
    errors = [d for d in res.diagnostics if d.severity.value == "error"]
    if errors:
        print(f"generated study has {len(errors)} errors, first: {errors[0]}", file=sys.stderr)
        return 1
    times = []
    for i in range(args.runs):
        fresh = text + f"# run {i}\n"  # a new text each run, so no in-process memo of this study applies
        t0 = time.perf_counter()
        compile_text(fresh, name)
        times.append(time.perf_counter() - t0)
    n_dev = len(res.trial.devices())
    print(f"study: {len(res.trial.sites)} sites, {n_dev} devices, {len(res.trial.protocols)} protocols "
          f"({sum(len(p.variants) for p in res.trial.protocols)} variants), {len(res.trial.schedule.visits)} visits, "
          f"{len(text.splitlines())} lines + stdlib imports; graph {res.graph.number_of_nodes()} nodes; "
          f"{len(res.diagnostics)} warnings")
    print(f"compile_text: first run in this process {first:.3f} s (also parses the imported stdlib files); "
          f"then new texts, best of {args.runs}: {min(times):.3f} s (median {sorted(times)[len(times) // 2]:.3f} s)")
    from imtrial_dsl.check import check
    from imtrial_dsl.graph import build_graph
    from imtrial_dsl.loader import load_text

    stages = {"load (parse+lower+imports)": [], "check": [], "graph": []}
    for _ in range(args.runs):
        t0 = time.perf_counter()
        trial, _d, _s = load_text(text + "# stage run\n", name)
        t1 = time.perf_counter()
        check(trial)
        t2 = time.perf_counter()
        build_graph(trial)
        t3 = time.perf_counter()
        for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2)):
            stages[key].append(dt)
    print("stages, best of runs: " + ", ".join(f"{k} {min(v):.3f} s" for k, v in stages.items()))
    if os.name == "posix":
        print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings scale with it)")
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        compile_text(text, name)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
