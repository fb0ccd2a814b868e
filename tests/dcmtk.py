"""Find dcmtk's command-line tools (not pynetdicom's apps of the same names, which a virtualenv's bin/ may hold)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest


def dcmtk(tool: str) -> str:
    """The path of dcmtk's ``tool`` (findscu, storescu …); fails the test when dcmtk is not installed."""
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        exe = Path(folder) / tool
        if exe.is_file() and os.access(exe, os.X_OK):
            out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=30)
            if "$dcmtk:" in out.stdout + out.stderr:
                return str(exe)
    pytest.fail(f"dcmtk's {tool} is not installed: run scripts/sysdeps.sh (Debian/Ubuntu: apt-get install dcmtk)")
