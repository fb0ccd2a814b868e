"""Shared by the tests that start servers on 127.0.0.1 (worklist, listen, pull, SMTP sink)."""
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
