"""
Start a server for a benchmark (loopback, free ports), optionally pinned to
one core, and read its memory and CPU time.  The installed ``twistd
signaling`` by default; any command that logs ``ws listening on HOST:PORT``
and then ``ready`` (the naive baseline) with ``argv=``.  Also: the server's
measured configuration, and running the load generator (``loadgen.py``).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

#: Our server's measured configuration: every protection on, with the limits
#: a single load-generating host needs raised, and no log line per relay.
MEASURED = [
    "--rate=5000", "--burst=10000", "--max-connections=30000", "--max-connections-per-ip=30000",
    "--no-relay-log", "--summary-interval=0",
]


#: twistd's own options for our server in the measured configuration: the
#: reactor built for it (signaling/reactor.py).  ``bench/perf.py
#: --ours-reactor default`` measures it on Twisted's default reactor instead.
MEASURED_TWISTD = ["-r", "signaling-epoll"]


def pinned(core, argv):
    """``argv`` under ``taskset -c core`` where taskset exists (and core is not None)."""
    if core is None or not shutil.which("taskset"):
        return list(argv)
    return ["taskset", "-c", str(core), *argv]


class Server:
    """
    ``args`` go to the plugin (``twistd ... signaling ARGS``), ``twistd``
    to twistd itself, before the plugin name (``-r signaling-epoll``).
    """

    def __init__(self, *args, core=None, argv=None, python=None, twistd=()):
        self.tmp = tempfile.mkdtemp(prefix="signaling-bench-")
        if argv is None:
            twistd_bin = os.path.join(os.path.dirname(python or sys.executable), "twistd")
            listen = ["--http=tcp:0:interface=127.0.0.1"]
            if not any(a.startswith("--ws=") for a in args):
                listen.append("--ws=tcp:0:interface=127.0.0.1")
            argv = [twistd_bin, "-n", "--pidfile=", *twistd, "signaling", *listen, "--summary-interval=0", *args]
        self.proc = subprocess.Popen(
            pinned(core, argv), cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.ports = {}
        self.lines = []
        deadline = time.monotonic() + 30
        # a cluster node admits peers once it is registered in Redis
        waiting = {" ready"} | ({"admitting peers"} if any(a.startswith("--redis=") for a in args) else set())
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"(http|ws) listening on \S+:(\d+)", line)
            if m:
                self.ports[m.group(1)] = int(m.group(2))
            waiting = {w for w in waiting if w not in line}
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
        if "ws" not in self.ports:
            self.stop()
            raise SystemExit("server did not start:\n" + "".join(self.lines[-20:]))
        self.line_count = len(self.lines)  # all the lines logged so far (``lines`` keeps the last ones)
        threading.Thread(target=self._drain, daemon=True).start()
        self.ws = f"ws://127.0.0.1:{self.ports['ws']}/"
        self.http = f"http://127.0.0.1:{self.ports['http']}" if "http" in self.ports else None

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            self.line_count += 1
            if len(self.lines) > 5000:
                del self.lines[:1000]

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self):
        """User plus system CPU time the process has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_loadgen(*args, core=None):
    """Run ``loadgen.py`` with ``args`` (pinned to ``core`` if given); return its JSON report."""
    out = subprocess.run(pinned(core, [sys.executable, os.path.join(HERE, "loadgen.py"), *args]),
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"loadgen failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
