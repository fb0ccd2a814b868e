"""Child processes of a run that die with it: an analysis program runs under a small guard (``imtrial_dsl/tools/guard.py``)
that kills the program's whole process group when the run dies (parent-death signal) or times out."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional

GUARD = str(Path(__file__).resolve().parents[1] / "tools" / "guard.py")
GRACE_S = 10.0  # after the guard is told to stop, how long it may take before it is killed


def run_guarded(argv: list[str], *, timeout: Optional[float], env: dict, cwd: str) -> subprocess.CompletedProcess:
    """Like ``subprocess.run(argv, capture_output=True, timeout=…)``, but the program and everything it starts
    are killed when the run dies, and on timeout the whole group goes, not only the program (a leftover child
    holding the output pipes would otherwise hang the run). Raises ``subprocess.TimeoutExpired``, and
    ``OSError`` when ``argv[0]`` is not found."""
    prog = os.path.join(cwd, argv[0]) if os.sep in argv[0] else argv[0]  # a relative path is the program's cwd's
    if shutil.which(prog, path=env.get("PATH")) is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), argv[0])
    guard = subprocess.Popen([sys.executable, "-I", "-S", GUARD, str(os.getpid()), "--", *argv], env=env, cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = guard.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        guard.send_signal(signal.SIGTERM)  # the guard kills the program's process group, then exits
        try:
            out, err = guard.communicate(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            guard.kill()
            out, err = guard.communicate()
        raise subprocess.TimeoutExpired(argv, timeout, output=out, stderr=err) from None
    except BaseException:
        guard.send_signal(signal.SIGTERM)
        guard.wait()
        raise
    return subprocess.CompletedProcess(argv, guard.returncode, out, err)
