"""The wheel installs and works outside the source tree.

Builds a wheel from a copy of the sources (so the shared working tree gets no build/ or
egg-info litter), installs it with ``--no-deps`` into a fresh venv made without pip, and
gives that venv the project venv's dependencies through a ``.pth`` file (offline, no
registry). A ``.pth`` line only appends a folder to ``sys.path``; it does not run the
``.pth`` files inside it, so the project's editable install cannot shadow the wheel. Then
``imtrial check`` runs on a copied example (with ``import "stdlib/…"``) from a temp folder,
and ``imtrial export inventory`` / ``imtrial export eprotocol`` prove the packaged templates and
data files are there.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{p.stdout}\n{p.stderr}"
    return p


def test_wheel_installs_and_checks_an_example(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("imtrial_dsl", "exporters", "grammar", "stdlib"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(wheels), "."],
        src, env)
    (wheel,) = wheels.glob("imtrial-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)], tmp_path, env)
    purelib = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).stdout.strip())
    (purelib / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    work = tmp_path / "study"
    work.mkdir()
    example = ROOT / "examples" / "amyloid_mri.imtrial"
    assert 'import "stdlib/' in example.read_text()
    shutil.copy(example, work / example.name)
    imtrial = venv / "bin" / "imtrial"

    where = run([str(py), "-c", "import imtrial_dsl, imtrial_dsl.exporters as e; from imtrial_dsl import paths; "
                 "print(imtrial_dsl.__file__, e.__file__, paths.grammar_file(), paths.stdlib_root(), sep='\\n')"],
                work, env).stdout.split()
    assert all(w.startswith(str(purelib)) for w in where), where  # the wheel, not the source tree

    p = run([str(imtrial), "check", example.name], work, env)
    assert p.stdout.strip() == f"{example.name}: ok" and p.stderr == ""
    p = run([str(imtrial), "export", "inventory", example.name, "-o", "out"], work, env)
    outs = [Path(x) for x in p.stdout.split()]
    assert outs and all((work / o).exists() for o in outs)
    # the e-protocol package ships its schema, DPP module table (read for CT) and card template
    ct = ROOT / "examples" / "oncology_ct.imtrial"
    shutil.copy(ct, work / ct.name)
    p = run([str(imtrial), "export", "eprotocol", ct.name, "-o", "ep"], work, env)
    outs = [work / x for x in p.stdout.split()]
    assert {o.suffix for o in outs} == {".json", ".html", ".dcm"} and all(o.exists() for o in outs)
