"""
A real TURN relay for the tests: Debian's coturn (``turnserver``), on
loopback, on free ports, with a shared secret (``use-auth-secret``), as
docs/turn.rst configures it for production (but loopback peers allowed).
"""

import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time

TURNSERVER = shutil.which("turnserver") or "/usr/bin/turnserver"
UCLIENT = shutil.which("turnutils_uclient") or "/usr/bin/turnutils_uclient"


def need_coturn():
    """coturn must be there (``.ci/run`` installs it): a failure in CI, a skip elsewhere."""
    import pytest

    if os.path.exists(TURNSERVER) and os.path.exists(UCLIENT):
        return
    message = f"{TURNSERVER} is missing (apt-get install coturn)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_udp_and_tcp_port():
    """A port free for both TCP and UDP on 127.0.0.1 (coturn listens on both)."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port")


class Coturn:
    """``turnserver`` with ``secret``, on ``port`` of 127.0.0.1; relays allocated from a range of 200 ports."""

    def __init__(self, secret: str):
        self.secret = secret
        self.port = free_udp_and_tcp_port()
        self.dir = tempfile.mkdtemp(prefix="signaling-coturn-")
        self.lines = []
        self.proc = None

    @property
    def uri(self):
        return f"turn:127.0.0.1:{self.port}?transport=udp"

    def start(self, timeout=30):
        low = random.randrange(40000, 60000, 200)
        self.proc = subprocess.Popen(
            [TURNSERVER, "-n", "--log-file=stdout", "--simple-log", "--no-cli", "--no-tls", "--no-dtls",
             "--listening-ip=127.0.0.1", "--relay-ip=127.0.0.1", f"--listening-port={self.port}",
             f"--min-port={low}", f"--max-port={low + 199}", "--use-auth-secret",
             f"--static-auth-secret={self.secret}", "--realm=test.local", "--fingerprint",
             "--allow-loopback-peers", "--no-multicast-peers", f"--pidfile={self.dir}/pid", f"--db={self.dir}/db"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        )
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self.lines.append(line)
            if "Total General servers" in line:
                threading.Thread(target=self._drain, daemon=True).start()
                return self
            if time.monotonic() > deadline:
                break
        self.stop()
        raise RuntimeError("turnserver did not start:\n" + "".join(self.lines[-20:]))

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def uclient(self, username, password, timeout=30):
        """Allocate a relay and bounce messages through it with turnutils_uclient; its exit status."""
        out = subprocess.run(
            [UCLIENT, "-y", "-n", "1", "-m", "1", "-u", username, "-w", password, "-p", str(self.port), "127.0.0.1"],
            capture_output=True, text=True, timeout=timeout,
        )
        return out.returncode, out.stdout + out.stderr

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)
