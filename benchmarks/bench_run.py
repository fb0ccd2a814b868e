"""End-to-end ``imtrial run`` benchmark (run on demand; not a test).

    .venv/bin/python benchmarks/bench_run.py [--subjects 1] [--visits baseline,m12] [--rounds 1] [--tmp DIR]
                                             [--no-peers] [--no-enhanced] [--no-rss]

Generates a peer-like corpus with ``imtrial synth`` from ``examples/amyloid_mri.imtrial`` (three sites and
vendors, 256x256 uint16 classic MR, planted PHI, a parameter deviation, ghosting and a wrong-device
follow-up; >= 2,400 files at the defaults) and runs, side by side in the same run (contenders alternate
within each round, so a busy machine hits all of them alike):

  floor      pydicom ``dcmread`` + ``save_as`` of every file, unchanged, on 1 and on 2 processes
  imtrial    ``imtrial run`` (ingest -> identify -> deidentify -> classify -> adherence -> qc -> archive),
             a fresh workdir each time, default options, ``--jobs 1`` and ``--jobs 2``; the whole process
             (start-up included)
  peers      the chain a central lab glues together: dicognito (library, dcmread + anonymize + save_as)
             then the mrQA CLI on dicognito's output

The study is the example without its analyses and endpoints (analysis programs are the study's own
code, not the runner's; the peers have none). It also measures the no-op re-run (the same inbox again,
nothing new), the peak RSS of ``--jobs 1`` on half and on all of the corpus, and Enhanced MR against
classic MR per frame (the same exams written both ways by synth).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
EXAMPLE = ROOT / "examples" / "amyloid_mri.imtrial"
DEVIATIONS = ("param_off", "ghosting", "wrong_device")
ENV = dict(os.environ, IMTRIAL_KEY=os.environ.get("IMTRIAL_KEY", "benchmark-key-not-for-real-data"),
           CENTRAL_TOKEN="unused")


def bench_study(out: Path) -> Path:
    """The example study without analyses, endpoints (which name analyses) and transfers."""
    text = EXAMPLE.read_text()
    text = re.sub(r'\nanalysis \w+ "[^"]*" \{.*?\n\}\n', "\n", text, flags=re.S)
    text = re.sub(r"\n\s*(endpoint|transfer) [^\n]*", "", text)
    p = out / "bench.imtrial"
    p.write_text(text)
    return p


SIZE = "full"


def synth(study: Path, out: Path, visits: list[str], subjects: int, enhanced: bool | None) -> list[Path]:
    from imtrial_dsl.loader import load
    from imtrial_dsl.synth import synthesize

    trial = load(str(study))[0]
    synthesize(trial, out, subjects_per_site=subjects, seed=7, deviations=DEVIATIONS if enhanced is None else (),
               size=SIZE, enhanced=False if enhanced is None else enhanced, visits=visits)
    return sorted(out.rglob("*.dcm"))


# --------------------------------------------------------------------------- contenders

def _floor_part(files: list[str], out: str) -> int:
    import pydicom

    for i, f in enumerate(files):
        pydicom.dcmread(f).save_as(os.path.join(out, f"{i:06d}.dcm"), enforce_file_format=True)
    return len(files)


def floor(files: list[Path], out: Path, jobs: int) -> float:
    names = [str(f) for f in files]
    t = time.perf_counter()
    if jobs == 1:
        _floor_part(names, str(out))
    else:
        parts = [out / str(k) for k in range(jobs)]
        for p in parts:
            p.mkdir()
        with ProcessPoolExecutor(jobs) as ex:
            list(ex.map(_floor_part, [names[k::jobs] for k in range(jobs)], [str(p) for p in parts]))
    return time.perf_counter() - t


def imtrial_run(study: Path, inbox: Path, work: Path, jobs: int, src: Path = ROOT) -> tuple[float, dict]:
    """``imtrial run`` of the code in ``src`` (this tree, or ``--compare``'s) in a fresh process."""
    t = time.perf_counter()
    cpu0 = _child_cpu()
    r = subprocess.run([sys.executable, "-m", "imtrial_dsl", "run", str(study), "--inbox", str(inbox),
                        "--workdir", str(work), "--jobs", str(jobs), "--json"],
                       capture_output=True, text=True, env=dict(ENV, PYTHONPATH=str(src)), cwd=str(src))
    dt = time.perf_counter() - t
    CPU.append(_child_cpu() - cpu0)
    if r.returncode not in (0, 1):
        raise SystemExit(f"imtrial run failed ({r.returncode}): {r.stderr[-2000:]}")
    try:
        summary = json.loads(r.stdout)
    except ValueError:
        summary = {}
    return dt, summary


CPU: list[float] = []   # CPU seconds (user + sys) of each imtrial_run, children included


def _child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def stage_split(work: Path) -> dict[str, float]:
    """Seconds spent in each step (summed over exams; QC checks together) from the workdir's state DB."""
    import sqlite3

    db = sqlite3.connect(work / "state.sqlite")
    out: dict[str, float] = {}
    for step, secs in db.execute("SELECT step, finished - started FROM steps WHERE finished IS NOT NULL"):
        k = step.split(":")[0]
        out[k] = out.get(k, 0.0) + (secs or 0.0)
    db.close()
    return out


def _dicognito_part(files: list[str], out: str) -> int:
    import pydicom
    from dicognito.anonymizer import Anonymizer

    anon = Anonymizer(seed="imtrial-bench")
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        anon.anonymize(ds)
        ds.save_as(os.path.join(out, f"{i:06d}.dcm"), enforce_file_format=True)
    return len(files)


def peers(files: list[Path], work: Path) -> tuple[float, float, str]:
    """dicognito then mrQA on its output; (dicognito s, mrQA s, note)."""
    out = work / "dicognito"
    out.mkdir()
    t = time.perf_counter()
    _dicognito_part([str(f) for f in files], str(out))
    t_dcg = time.perf_counter() - t
    import mrQA

    cfg = json.loads((Path(mrQA.__file__).parent / "resources" / "mri-config.json").read_text())
    cfg["begin"], cfg["end"] = "2000-01-01T00:00:00+00:00", "2100-01-01T00:00:00+00:00"  # synthetic dates
    (work / "mrqa.json").write_text(json.dumps(cfg))
    exe = Path(sys.executable).parent / "mrqa"
    t = time.perf_counter()
    r = subprocess.run([str(exe), "-d", str(out), "--config", str(work / "mrqa.json"), "-o", str(work / "mrqa-out"),
                        "-f", "dicom", "-n", "bench"], capture_output=True, text=True)
    t_mrqa = time.perf_counter() - t
    note = "ok" if r.returncode == 0 else f"mrQA exit {r.returncode}: {(r.stderr or r.stdout)[-300:]}"
    return t_dcg, t_mrqa, note


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of ``cmd`` (a fresh process, its children included: the largest of them)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True);"
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    r = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, env=ENV)
    rc, kb = r.stdout.split()
    if rc not in ("0", "1"):
        raise SystemExit(f"{cmd} failed ({rc})")
    return int(kb) / 1024


def archive_hashes(work: Path) -> set[str]:
    d = work / "archive" / "objects" / "sha256"
    return {p.parent.name + p.name for p in d.rglob("*") if p.is_file()} if d.is_dir() else set()


def verdicts(summary: dict) -> dict:
    return {k: summary.get(k) for k in ("classification", "adherence", "qc", "exam_status", "warnings", "instances")}


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", type=int, default=1, help="subjects per site (default 1)")
    ap.add_argument("--visits", default="baseline,m12", help="schedule visits (default baseline,m12: 2,562 files)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of all contenders (default 1)")
    ap.add_argument("--tmp", type=Path, help="where corpus and workdirs go (default: a temporary folder)")
    ap.add_argument("--no-peers", action="store_true", help="skip dicognito + mrQA")
    ap.add_argument("--no-enhanced", action="store_true", help="skip Enhanced vs classic MR")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS runs")
    ap.add_argument("--compare", type=Path, metavar="SRC",
                    help="also run the imtrial of another source tree (e.g. a checkout of main) in the same rounds")
    ap.add_argument("--size", default="full", choices=("small", "medium", "full"),
                    help="synth image size (default full: 256x256; small is a smoke run, figures not meaningful)")
    a = ap.parse_args(argv)
    global SIZE
    SIZE = a.size
    base = Path(tempfile.mkdtemp(prefix="bench_run_", dir=a.tmp))
    try:
        return _main(a, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _main(a, base: Path) -> int:
    study = bench_study(base)
    visits = a.visits.split(",")
    inbox = base / "inbox"
    t = time.perf_counter()
    files = synth(study, inbox, visits, a.subjects, None)
    size = sum(f.stat().st_size for f in files)
    print(f"corpus: {len(files)} files, {size / 1e6:.0f} MB in {inbox} ({time.perf_counter() - t:.0f} s to generate)",
          file=sys.stderr)
    for f in files:   # warm the page cache: every contender reads from memory
        f.read_bytes()
    n = len(files)
    times: dict[str, list[float]] = {}
    extra: dict[str, list[float]] = {"dicognito": [], "mrqa": []}
    hashes, results, note = {}, {}, "skipped"
    cpu: dict[str, float] = {}
    split: dict[str, dict[str, float]] = {}
    for r in range(a.rounds):
        order = ["floor1", "ours1", "floor2", "ours2"] + ([] if a.no_peers else ["peers"])
        if a.compare:
            order[2:2] = ["base1"]
            order += ["base2"]
        if r % 2:
            order.reverse()
        for c in order:
            work = base / f"w_{c}_{r}"
            work.mkdir()
            if c.startswith("floor"):
                dt = floor(files, work, int(c[-1]))
            elif c.startswith(("ours", "base")):
                jobs, src = int(c[-1]), (a.compare if c.startswith("base") else ROOT)
                dt, summary = imtrial_run(study, inbox, work / "wd", jobs, src)
                cpu[c] = cpu.get(c, 0.0) + CPU[-1]
                hashes[c], results[c] = archive_hashes(work / "wd"), verdicts(summary)
                split.setdefault(c, stage_split(work / "wd"))
                noop, _ = imtrial_run(study, inbox, work / "wd", jobs, src)
                extra.setdefault(f"noop_{c}", []).append(noop)
            else:
                t_dcg, t_mrqa, note = peers(files, work)
                extra["dicognito"].append(t_dcg)
                extra["mrqa"].append(t_mrqa)
                dt = t_dcg + t_mrqa
            times.setdefault(c, []).append(dt)
            print(f"  round {r + 1}: {c} {dt:.1f} s ({n / dt:.0f} files/s)", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)

    rate = {c: n * len(v) / sum(v) for c, v in times.items()}
    print(f"\nCorpus: {n} files ({size / 1e6:.0f} MB), {a.subjects} subject(s) per site, visits {a.visits}, "
          f"deviations {', '.join(DEVIATIONS)}; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"{a.rounds} round(s)\n")
    print(f"{'contender':42s} {'files/s':>9s} {'x floor':>8s}")
    for jobs in (1, 2):
        fl = rate[f"floor{jobs}"]
        print(f"{'floor: pydicom read+write, ' + str(jobs) + ' proc':42s} {fl:9.0f} {1:8.2f}")
        for c, label in ((f"ours{jobs}", "imtrial run"), (f"base{jobs}", "imtrial run (--compare)")):
            if c in rate:
                print(f"{label + ' --jobs ' + str(jobs):42s} {rate[c]:9.0f} {rate[c] / fl:8.2f}"
                      f"   CPU {cpu[c] / len(times[c]):.1f} s")
    if "peers" in rate:
        print(f"{'dicognito then mrQA (1 proc)':42s} {rate['peers']:9.0f} {rate['peers'] / rate['floor1']:8.2f}"
              f"   [{note}]")
        print(f"  of which dicognito {sum(extra['dicognito']) / len(extra['dicognito']):.1f} s, "
              f"mrQA {sum(extra['mrqa']) / len(extra['mrqa']):.1f} s")
        print(f"imtrial --jobs 1 is {rate['ours1'] / rate['peers']:.2f}x the peer chain; "
              f"--jobs 2 {rate['ours2'] / rate['peers']:.2f}x")
    for c in sorted(k for k in extra if k.startswith("noop_")):
        print(f"no-op re-run, {c[5:]}: {min(extra[c]):.2f} s (best of {len(extra[c])})")
    for c, sp in sorted(split.items()):
        print(f"stage split (s summed over exams), {c}: " + ", ".join(f"{k} {v:.1f}" for k, v in sp.items()))
    runs = sorted(hashes)
    same = all(hashes[c] == hashes[runs[0]] and results[c] == results[runs[0]] for c in runs)
    print(f"{', '.join(runs)}: {len(hashes[runs[0]])} archive objects, "
          f"{'identical archives and verdicts' if same else 'DIFFERENT results'}")
    print("verdicts:", json.dumps(results.get("ours1"), sort_keys=True))

    if not a.no_rss:
        half = base / "half"
        half.mkdir()
        # the first visit only: half of the exams
        for f in files:
            rel = f.relative_to(inbox)
            if visits[0] in rel.parts[2]:
                dst = half / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(f, dst)
        n_half = sum(1 for _ in half.rglob("*.dcm"))
        exe = str(Path(sys.executable).parent / "imtrial")
        rss = []
        for src, k in ((half, n_half), (inbox, n)):
            wd = base / f"rss_{k}"
            rss.append((k, peak_rss_mb([exe, "run", str(study), "--inbox", str(src), "--workdir", str(wd), "--jobs", "1",
                                        "--json"])))
            shutil.rmtree(wd, ignore_errors=True)
        print("peak RSS, --jobs 1: " + ", ".join(f"{k} files {mb:.0f} MB" for k, mb in rss))

    if not a.no_enhanced:
        enhanced_vs_classic(study, base, visits[:1])
    return 0


def enhanced_vs_classic(study: Path, base: Path, visits: list[str]) -> None:
    """The same exams (one subject per site, first visit) written as classic and as Enhanced MR, run alternately."""
    import pydicom

    per = {}
    for kind, enh in (("classic", False), ("enhanced", True)):
        files = synth(study, base / f"inbox_{kind}", visits, 1, enh)
        frames = 0
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            frames += int(ds.get("NumberOfFrames", 1) or 1)
            f.read_bytes()
        per[kind] = {"files": len(files), "frames": frames, "secs": []}
    for r in range(2):
        for kind in (("classic", "enhanced") if r == 0 else ("enhanced", "classic")):
            wd = base / f"w_{kind}_{r}"
            dt, _ = imtrial_run(study, base / f"inbox_{kind}", wd, 1)
            per[kind]["secs"].append(dt)
            shutil.rmtree(wd, ignore_errors=True)
    ms = {k: 1000 * min(v["secs"]) / v["frames"] for k, v in per.items()}
    for k, v in per.items():
        print(f"{k:9s} MR: {v['files']} files, {v['frames']} frames, best of 2 {min(v['secs']):.1f} s, "
              f"{ms[k]:.2f} ms/frame")
    print(f"Enhanced / classic per frame: {ms['enhanced'] / ms['classic']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
