"""The workdir layout: the one place that spells where the runner keeps things.

::

    W/state.sqlite               pipeline state, identity registry, ledgers (imtrial_dsl.store)
    W/exams/<exam_key>/          one exam (see ExamDir)
    W/quarantine/<sha256>/       files refused anywhere: file + reason.json
    W/archive/                   the content-addressed archive (imtrial_dsl.runner.archive)
    W/measurements.{csv,json}    the tidy measurements table
    W/.run.lock                  held by the one ``imtrial run`` using W

An exam folder holds the paths that the step table (imtrial_dsl.pipeline) names as step inputs
and outputs, relative to the exam folder, so the local runner, ``imtrial step`` and the CWL tools
all read and write the same places.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .files import TMP_SUFFIX

STATE_DB = "state.sqlite"

# Exam-relative paths (the vocabulary of step inputs and outputs). A trailing "/" marks a folder.
EXAM_JSON = "exam.json"             # site-side summary of what was ingested (holds source identifiers)
ORIGINAL = "original/"              # ingested instances: original/<series16>/<sha256>.dcm
DEID = "deid/"                      # de-identified instances: deid/<SOPInstanceUID>.dcm
RESULTS = "results/"
IDENTITY = "results/identity.json"
CLASSIFICATION = "results/classification.json"
ADHERENCE = "results/adherence.json"
QC = "results/qc/"                  # results/qc/<check>.json, one per QC check
ARCHIVED = "results/archived.json"
ANALYSES = "analyses/"              # analyses/<name>/ (outputs/ + result.json)
MEASUREMENTS = "results/measurements.json"


def qc_result(check: str) -> str:
    return f"{QC}{check}.json"


def analysis_dir(name: str) -> str:
    return f"{ANALYSES}{name}/"


class ExamDir:
    """One exam folder ``W/exams/<exam_key>/`` (or any folder laid out the same way, e.g. a CWL staging dir)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def key(self) -> str:
        return self.root.name

    def path(self, rel: str) -> Path:
        """The absolute path of an exam-relative step path (``results/identity.json``, ``deid/`` …)."""
        return self.root / rel.rstrip("/")

    def has(self, rel: str) -> bool:
        p = self.path(rel)
        return p.is_dir() and any(p.iterdir()) if rel.endswith("/") else p.is_file()

    @property
    def exam_json(self) -> Path:
        return self.path(EXAM_JSON)

    @property
    def original(self) -> Path:
        return self.path(ORIGINAL)

    @property
    def deid(self) -> Path:
        return self.path(DEID)

    @property
    def results(self) -> Path:
        return self.path(RESULTS)

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def partial(self, rel: str) -> Path:
        """Where a step builds a folder output before renaming it into place (``deid.partial``)."""
        return self.root / (rel.rstrip("/") + ".partial")

    def __repr__(self) -> str:
        return f"ExamDir({str(self.root)!r})"


class Workdir:
    """A runner workdir ``W``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def state_db(self) -> Path:
        return self.root / STATE_DB

    @property
    def exams(self) -> Path:
        return self.root / "exams"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def archive(self) -> Path:
        return self.root / "archive"

    @property
    def measurements_csv(self) -> Path:
        return self.root / "measurements.csv"

    @property
    def measurements_json(self) -> Path:
        return self.root / "measurements.json"

    @property
    def run_lock(self) -> Path:
        return self.root / ".run.lock"

    @property
    def pull_lock(self) -> Path:
        """Held by ``imtrial pull`` (one pull per workdir at a time)."""
        return self.root / ".pull.lock"

    @property
    def pull_staging(self) -> Path:
        """Where ``imtrial pull`` writes an instance before renaming it into the inbox (never half a file there)."""
        return self.root / "pull" / "staging"

    @property
    def listen(self) -> Path:
        """``imtrial listen``'s folder: received series (``series/``), verdicts, status page, outbox."""
        return self.root / "listen"

    def exam(self, exam_key: str) -> ExamDir:
        return ExamDir(self.exams / exam_key)

    def create(self) -> "Workdir":
        for p in (self.exams, self.quarantine, self.archive):
            p.mkdir(parents=True, exist_ok=True)
        return self

    def sweep_temp(self) -> int:
        """Remove half-written files a killed run left (call only while holding the run lock)."""
        n = 0
        for sub in (self.exams, self.quarantine, self.archive):
            if not sub.exists():
                continue
            for p in sub.rglob(f".*{TMP_SUFFIX}"):
                if p.is_file():
                    p.unlink()
                    n += 1
        if self.exams.exists():
            for p in [q for q in self.exams.rglob("*.partial") if q.is_dir()]:
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    def __repr__(self) -> str:
        return f"Workdir({str(self.root)!r})"
