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


# The heavy tools of the extras, made unimportable: what a designer-only `pip install imtrial` lacks.
_BLOCK = ("import sys, importlib.abc\n"
          "class _NoExtras(importlib.abc.MetaPathFinder):\n"
          "    def find_spec(self, name, path=None, target=None):\n"
          "        if name.split('.')[0] in ('cwltool', 'cwl_utils', 'toil', 'weasyprint', 'ruamel', 'aiosmtpd'):\n"
          "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
          "sys.meta_path.insert(0, _NoExtras())\n"
          "from imtrial_dsl.cli import main\n"
          "sys.exit(main(sys.argv[1:]))\n")


def test_designer_install_needs_no_extra(tmp_path: Path) -> None:
    """check, fmt, graph, compile, explain-code and lsp work without cwltool, Toil and WeasyPrint; a command
    that needs an extra says which one (E900 and the pip line), not a traceback."""
    from importlib.metadata import requires

    base = [r for r in requires("imtrial") if "extra ==" not in r]
    assert not any(r.split()[0].lower().startswith(("cwltool", "toil", "weasyprint", "cwl-utils")) for r in base), base

    example = ROOT / "examples" / "amyloid_mri.imtrial"

    def imtrial(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", _BLOCK, *args], cwd=tmp_path, capture_output=True, text=True,
                              input=stdin, timeout=120, env=dict(os.environ, NO_COLOR="1"))

    for args in (["check", str(example)], ["fmt", "--check", str(example)], ["graph", str(example), "--format", "mermaid"],
                 ["compile", str(example), "-o", "ir.json"], ["explain-code", "E301"], ["lsp", "--help"]):
        p = imtrial(*args)
        assert p.returncode == 0, (args, p.stderr)
    # the server starts and answers an LSP 'initialize' without any extra
    body = '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"capabilities":{}}}'
    exit_ = '{"jsonrpc":"2.0","method":"exit"}'
    frames = "".join(f"Content-Length: {len(b)}\r\n\r\n{b}" for b in (body, exit_))
    p = imtrial("lsp", stdin=frames)
    assert '"id": 1' in p.stdout.replace('"id":1', '"id": 1') and "capabilities" in p.stdout, p.stdout + p.stderr
    for target, extra in (("cwl", "cwl"), ("docs", "docs")):
        p = imtrial("export", target, str(example), "-o", f"out-{target}")
        assert p.returncode == 1 and "error[E900]" in p.stderr and f"pip install 'imtrial[{extra}]'" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
