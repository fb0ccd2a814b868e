"""Run one analysis program so that it dies with the run (started by :func:`imtrial_dsl.runner.procs.run_guarded`;
a stand-alone program like the other tools, run by path, never imported).

``python -I -S guard.py PARENT_PID -- ARGV...``: this guard asks the kernel for SIGTERM when its parent (the
runner's worker, or ``imtrial run`` itself) dies, starts the program in a process group of its own that also
gets SIGKILL when the guard dies, and on SIGTERM — the parent died, or the runner's timeout — kills that whole
group (the program and anything it started). When the program exits, leftovers in its group are killed too,
and the guard exits with the program's status. Standard library only: it runs without site-packages.
"""
import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1


def _pdeathsig(sig: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):  # not Linux: the runner's timeout still kills the group
        pass


def main() -> int:
    parent, argv = int(sys.argv[1]), sys.argv[3:]
    _pdeathsig(signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        return 137
    child = None

    def stop(signum, frame):
        if child is not None:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, stop)

    def in_child() -> None:  # the guard is single-threaded, so this runs safely between fork and exec
        os.setpgid(0, 0)
        _pdeathsig(signal.SIGKILL)

    try:
        child = subprocess.Popen(argv, preexec_fn=in_child)
    except OSError as exc:
        print(f"cannot run {argv[0]!r}: {exc}", file=sys.stderr)
        return 127
    rc = child.wait()
    try:
        os.killpg(child.pid, signal.SIGKILL)  # whatever the program left running in its group
    except (ProcessLookupError, PermissionError):
        pass
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
