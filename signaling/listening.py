"""
Listening: endpoint strings with a deliberate backlog, ``SO_REUSEPORT``
listeners, and the service that binds one endpoint (before privileges are
dropped, under ``twistd``).
"""

import re
import socket

from twisted.application.service import Service
from twisted.internet.defer import fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger

_BACKLOG_TYPES = ("tcp", "tcp6", "ssl", "unix")


def with_backlog(description: str, backlog: int) -> str:
    """Add ``backlog=`` to a listening endpoint string unless it sets one."""
    kind = description.split(":", 1)[0].lower()
    if kind not in _BACKLOG_TYPES or re.search(r"(^|:)backlog=", description):
        return description
    return f"{description}:backlog={backlog}"


class ReusePortEndpoint:
    """
    A TCP listening endpoint whose socket has SO_REUSEPORT set, adopted by
    the reactor: several processes may listen on the same address and port.
    Takes ``tcp:PORT[:interface=ADDR][:backlog=N]`` (IPv4 or IPv6 address).
    """

    def __init__(self, reactor, description: str):
        kind, _, rest = description.partition(":")
        if kind != "tcp" or not rest:
            raise ValueError(f"--reuse-port takes tcp:PORT endpoints, not {description!r}")
        options = {}
        parts = rest.split(":")
        for part in parts:
            key, eq, value = part.partition("=")
            if eq:
                options[key] = value
            else:
                options.setdefault("port", part)
        self.reactor = reactor
        self.port = int(options.pop("port"))
        self.interface = options.pop("interface", "")
        self.backlog = int(options.pop("backlog", 50))
        if options:
            raise ValueError(f"--reuse-port: unsupported endpoint options {sorted(options)}")

    def listen(self, factory):
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            port = self.reactor.adoptStreamPort(sock.fileno(), family, factory)
        except OSError as e:
            return fail(e)
        finally:
            sock.close()  # the reactor holds its own duplicate
        return succeed(port)


def make_endpoint(reactor, description: str, backlog: int, reuse_port: bool):
    description = with_backlog(description, backlog)
    if reuse_port:
        return ReusePortEndpoint(reactor, description)
    return serverFromString(reactor, description)


class ListenService(Service):
    """
    Listen on one endpoint while running; log the address actually bound.

    It binds in ``privilegedStartService``, which ``twistd`` runs before it
    drops privileges (``--uid``/``--gid``), so that a port below 1024 can be
    served by an unprivileged process; under ``twist`` (or anything that only
    calls ``startService``) it binds there instead.  A failure to bind (a
    port in use, a bad interface) is raised at once, so that ``twistd``
    reports it and exits.
    """

    _log = Logger()

    def __init__(self, label: str, endpoint, factory):
        self.label = label
        self.endpoint = endpoint
        self.factory = factory
        self.port = None
        self._bound = None  # the Deferred of the listen, once started

    def privilegedStartService(self):
        super().privilegedStartService()
        self._bind()

    def startService(self):
        super().startService()
        if self._bound is None:
            self._bind()

    def _bind(self):
        d = self._bound = self.endpoint.listen(self.factory)

        def listening(port):
            self.port = port
            address = port.getHost()
            self._log.info(
                "{label} listening on {host}:{port}",
                label=self.label,
                host=getattr(address, "host", address),
                port=getattr(address, "port", ""),
            )

        failures = []
        d.addCallbacks(listening, failures.append)
        if failures:
            # Listening failed at once (the usual case: port in use, bad
            # interface): raise, so that twistd reports it and exits.
            failures[0].raiseException()
        d.addCallback(
            lambda _: failures
            and self._log.failure("{label} could not listen", failures[0], label=self.label)
        )

    def stopService(self):
        super().stopService()
        self._bound = None
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
