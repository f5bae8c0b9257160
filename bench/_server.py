"""Start the installed server for a benchmark (loopback, free ports) and read its memory."""

import os
import re
import subprocess
import sys
import tempfile
import threading
import time


class Server:
    def __init__(self, *args):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.tmp = tempfile.mkdtemp(prefix="signaling-bench-")
        listen = ["--http=tcp:0:interface=127.0.0.1"]
        if not any(a.startswith("--ws=") for a in args):
            listen.append("--ws=tcp:0:interface=127.0.0.1")
        self.proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "signaling", *listen, "--summary-interval=0", *args],
            cwd=self.tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.ports = {}
        self.lines = []
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"(http|ws) listening on \S+:(\d+)", line)
            if m:
                self.ports[m.group(1)] = int(m.group(2))
            if " ready" in line:
                break
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
        threading.Thread(target=self._drain, daemon=True).start()
        self.ws = f"ws://127.0.0.1:{self.ports['ws']}/"
        self.http = f"http://127.0.0.1:{self.ports['http']}"

    def _drain(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if len(self.lines) > 5000:
                del self.lines[:1000]

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
