"""De-identification throughput benchmark (run on demand; not a test).

One command, from the repository root:

    PYTHONPATH=. .venv/bin/python benchmarks/bench_deid.py [--n 5000] [--corpus DIR] [--keep-corpus DIR]
                                                           [--blocks 10] [--others-fraction 0.2] [--skip-others]

Generates (or takes from ``--corpus``) >= N MR files - copies of real pydicom-data MR files (MR_small explicit
and implicit VR, a 10-frame Enhanced MR, a Siemens MR with private CSA headers and overlays) with varied
UIDs and PHI per subject/study/series - then measures files/s side by side:

  floor       pydicom dcmread + dcmwrite, unchanged (the ceiling any pydicom-based tool can reach)
  ours        imtrial's engine, all of PS3.15 Table E.1-1 (basic profile), and with the example study's options
  deid        pydicom/deid ``replace_identifiers`` with its default recipe (if installed)
  dicognito   dicognito ``Anonymizer`` (if installed)

each on one core and with 2 processes, and the peak RSS of ours at two corpus sizes (it should be flat).
Measurements are interleaved block by block (the machine may be shared); deid and dicognito, being much slower,
get ``--others-fraction`` of each block (their rate is over the files they processed).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SOURCES = [("MR_small.dcm", 50), ("MR_small_implicit.dcm", 20), ("emri_small.dcm", 20),
           ("MR-SIEMENS-DICOM-WithOverlays.dcm", 10)]
STUDIES = {
    "ours_basic": "deidentify using ps315_basic { key env IMTRIAL_BENCH_KEY }",
    "ours_example": ("deidentify using ps315_basic with retain_longitudinal_modified_dates,"
                     " retain_patient_characteristics, clean_descriptors {\n keep PatientSex, PatientAge\n"
                     " replace InstitutionName with \"AMY01 imaging site\"\n empty ReferringPhysicianName\n"
                     " key env IMTRIAL_BENCH_KEY\n date_shift -365 .. -1 d\n}"),
}


# --------------------------------------------------------------------------- corpus

def make_corpus(n: int, out: Path) -> list[Path]:
    """n files: varied patients (50 files each), studies, series, UIDs, dates, names, institutions."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    rng = random.Random(1234)
    templates = [(pydicom.dcmread(get_testdata_file(name)), w) for name, w in SOURCES]
    pool = [t for t, w in templates for _ in range(w)]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        ds = pool[i % len(pool)].copy()
        pat, study, series = i // 50, i // 25, i // 5
        ds.PatientName = f"Doe{pat}^Jane^Q"
        ds.PatientID = f"MRN{100000 + pat}"
        ds.PatientBirthDate = f"19{40 + pat % 50:02d}0{1 + pat % 9}1{pat % 9}"
        ds.StudyInstanceUID = generate_uid(entropy_srcs=[f"study{study}"])
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"series{series}"])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[f"sop{i}"])
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[f"for{study}"])
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = f"2026{1 + study % 12:02d}{1 + study % 28:02d}"
        ds.AccessionNumber = f"ACC{study:07d}"
        ds.InstitutionName = rng.choice(["Boston General", "CHU Lyon", "Tokyo Medical Center"])
        ds.ReferringPhysicianName = f"Ref{rng.randint(0, 99)}^Doc"
        ds.SeriesDescription = rng.choice(["t1_mprage_sag", "FLAIR 3D", "SWI"]) + f" Doe{pat}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = out / f"{i:06d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- workers (module level: picklable)

_ENGINES: dict = {}


def _engine(study_key: str):
    if study_key not in _ENGINES:
        from imtrial_dsl.loader import load_text
        from imtrial_dsl.deid import Deidentifier, resolve_key

        text = 'import "stdlib/deid/ps315.imtrial"\nstudy BENCH "bench" { sponsor "Bench" }\n' + STUDIES[study_key]
        trial, diags, _ = load_text(text, str(ROOT / "bench.imtrial"))
        errors = [d for d in diags if d.severity.value == "error"]
        if errors:
            raise SystemExit(f"bench study does not load: {errors}")
        _ENGINES[study_key] = Deidentifier(trial, resolve_key(trial))
    return _ENGINES[study_key]


def work_floor(files: list[str], out: str, arg: str) -> int:
    import pydicom

    for f in files:
        ds = pydicom.dcmread(f)
        ds.save_as(os.path.join(out, os.path.basename(f)), enforce_file_format=True)
    return len(files)


def work_ours(files: list[str], out: str, arg: str) -> int:
    engine = _engine(arg)
    identity = {"subject_id": "BENCH-0001", "site": "BOS", "timepoint": "baseline"}
    for f in files:
        res, data = engine.deidentify_file(Path(f), identity)
        if data is None:
            raise RuntimeError(f"{f}: {res.reason}")
        with open(os.path.join(out, os.path.basename(f)), "wb") as fh:
            fh.write(data)
    return len(files)


def work_deid(files: list[str], out: str, arg: str) -> int:
    import logging

    from deid.config import DeidRecipe
    from deid.dicom import replace_identifiers

    logging.disable(logging.WARNING)
    replace_identifiers(dicom_files=files, deid=DeidRecipe(), save=True, output_folder=out, overwrite=True,
                        remove_private=True)
    return len(files)


_ANON = None


def work_dicognito(files: list[str], out: str, arg: str) -> int:
    global _ANON
    import pydicom
    from dicognito.anonymizer import Anonymizer

    _ANON = _ANON or Anonymizer(seed="imtrial-bench")
    for f in files:
        ds = pydicom.dcmread(f)
        _ANON.anonymize(ds)
        ds.save_as(os.path.join(out, os.path.basename(f)), enforce_file_format=True)
    return len(files)


def _warm(name: str, arg: str) -> int:
    if name.startswith("ours"):
        _engine(arg)
    return os.getpid()


class Tool:
    def __init__(self, name: str, func, arg: str = "", fraction: float = 1.0):
        self.name, self.func, self.arg, self.fraction = name, func, arg, fraction
        self.done, self.secs = {1: 0, 2: 0}, {1: 0.0, 2: 0.0}


def measure(tools: list[Tool], files: list[Path], blocks: int) -> None:
    """Interleaved: each block of files goes through every tool in turn, so load changes on a shared machine
    hit all tools alike. One process (in this process) and 2 processes (warm pools, files split in two)."""
    names = [str(f) for f in files]
    size = max(1, len(names) // blocks)
    pools = {t.name: ProcessPoolExecutor(2) for t in tools}
    try:
        for t in tools:
            _warm(t.name, t.arg)
            for fut in [pools[t.name].submit(_warm, t.name, t.arg) for _ in range(4)]:
                fut.result()
        for b in range(0, len(names), size):
            block = names[b:b + size]
            for t in tools:
                part = block[: max(2, int(len(block) * t.fraction))]
                for jobs in (1, 2):
                    out = Path(tempfile.mkdtemp(prefix=f"bench_out_{t.name}_"))
                    try:
                        t0 = time.perf_counter()
                        if jobs == 1:
                            n = t.func(part, str(out), t.arg)
                        else:
                            futs = [pools[t.name].submit(t.func, part[k::2], str(out), t.arg) for k in range(2)]
                            n = sum(f.result() for f in futs)
                        t.secs[jobs] += time.perf_counter() - t0
                        t.done[jobs] += n
                    finally:
                        shutil.rmtree(out, ignore_errors=True)
            print(f"  block {b // size + 1}: " + ", ".join(
                f"{t.name} {t.done[1] / max(t.secs[1], 1e-9):.0f}/{t.done[2] / max(t.secs[2], 1e-9):.0f}"
                for t in tools) + " files/s (1/2 procs)", file=sys.stderr)
    finally:
        for p in pools.values():
            p.shutdown()


def rss_probe(corpus: Path, n: int) -> int:
    """Peak RSS (kB) of a fresh process running ours over the first n files."""
    code = (f"import sys, resource; sys.path.insert(0, {str(ROOT)!r}); sys.argv=['x'];"
            f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); from bench_deid import work_ours; import tempfile, glob;"
            f"files=sorted(glob.glob({str(corpus)!r}+'/*.dcm'))[:{n}];"
            f"d=tempfile.mkdtemp(); work_ours(files, d, 'ours_example'); import shutil; shutil.rmtree(d);"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(ROOT))
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return int(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="imtrial de-identification benchmark")
    ap.add_argument("--n", type=int, default=5000, help="corpus size when generating (default 5000)")
    ap.add_argument("--corpus", type=Path, help="use the .dcm files in this folder instead of generating")
    ap.add_argument("--keep-corpus", type=Path, help="generate into this folder and keep it")
    ap.add_argument("--blocks", type=int, default=10, help="interleaving blocks (default 10)")
    ap.add_argument("--others-fraction", type=float, default=0.2,
                    help="share of each block given to deid/dicognito, which are much slower (default 0.2)")
    ap.add_argument("--skip-others", action="store_true", help="only floor and ours")
    a = ap.parse_args(argv)
    os.environ.setdefault("IMTRIAL_BENCH_KEY", "benchmark-key-not-secret")

    tmp = None
    if a.corpus:
        files = sorted(a.corpus.glob("*.dcm"))
        corpus_dir = a.corpus
    else:
        corpus_dir = a.keep_corpus or Path(tempfile.mkdtemp(prefix="bench_deid_corpus_"))
        tmp = None if a.keep_corpus else corpus_dir
        t0 = time.perf_counter()
        files = make_corpus(a.n, corpus_dir)
        print(f"generated {len(files)} files in {corpus_dir} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    size = sum(f.stat().st_size for f in files)
    for f in files:                      # warm the page cache so the first tool is not penalized
        f.read_bytes()

    tools = [Tool("floor", work_floor), Tool("ours_basic", work_ours, "ours_basic"),
             Tool("ours_example", work_ours, "ours_example")]
    if not a.skip_others:
        for mod, fn in (("deid", work_deid), ("dicognito", work_dicognito)):
            try:
                __import__(mod)
                tools.append(Tool(mod, fn, "", a.others_fraction))
            except ImportError:
                print(f"{mod}: not installed, skipped (pip install {mod})", file=sys.stderr)
    measure(tools, files, a.blocks)

    print(f"\nCorpus: {len(files)} MR files, {size / 1e6:.0f} MB, mix {', '.join(f'{n} {w}%' for n, w in SOURCES)}")
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; interleaved in {a.blocks} blocks\n")
    print(f"{'tool':14s} {'procs':>5s} {'files':>7s} {'seconds':>8s} {'files/s':>9s} {'x floor':>8s}")
    floor = {j: tools[0].done[j] / tools[0].secs[j] for j in (1, 2)}
    for jobs in (1, 2):
        for t in tools:
            rate = t.done[jobs] / t.secs[jobs]
            print(f"{t.name:14s} {jobs:5d} {t.done[jobs]:7d} {t.secs[jobs]:8.1f} {rate:9.0f} {rate / floor[jobs]:8.2f}")

    small, big = max(1, len(files) // 5), len(files)
    r_small, r_big = rss_probe(corpus_dir, small), rss_probe(corpus_dir, big)
    print(f"\nPeak RSS of ours (one process): {small} files {r_small / 1024:.0f} MB, {big} files {r_big / 1024:.0f} MB")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
