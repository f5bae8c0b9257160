"""
Listening: endpoint strings with a deliberate backlog, ``SO_REUSEPORT``
listeners, and the service that binds one endpoint (before privileges are
dropped, under ``twistd``).
"""

import errno
import os
import re
import socket

from twisted.application.service import Service
from twisted.internet.defer import fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger


def safe_path(name) -> str:
    """A socket path for the log (bytes from the kernel decoded, whatever they are)."""
    return name.decode("utf-8", "backslashreplace") if isinstance(name, bytes) else str(name)

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
            if hasattr(address, "host"):
                self._log.info(
                    "{label} listening on {host}:{port}", label=self.label, host=address.host, port=address.port
                )
            else:  # a UNIX socket
                self._log.info("{label} listening on unix:{path}", label=self.label,
                               path=safe_path(getattr(address, "name", address)))

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


class _ProbeReactor:
    """
    Stands in for the reactor to learn what an endpoint string would listen
    on, listening on nothing (``serverFromString`` and an endpoint's
    ``listen`` only call these methods of the reactor).
    """

    def __init__(self):
        self.calls = []

    def listenTCP(self, port, factory, backlog=50, interface=""):
        self.calls.append(("tcp", port, interface))

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        self.calls.append(("tcp", port, interface))

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        self.calls.append(("unix", address, None))

    def adoptStreamPort(self, fileDescriptor, addressFamily, factory):
        self.calls.append(("adopted", fileDescriptor, None))


def endpoint_error(description: str):
    """Why ``description`` is not a listening endpoint string, or None if it is one."""
    try:
        serverFromString(_ProbeReactor(), description)
    except Exception as e:  # (each endpoint parser raises its own kinds of errors)
        return str(e) or e.__class__.__name__
    return None


def cannot_listen(description: str, reuse_port: bool = False):
    """
    Why listening on ``description`` would fail now (a port in use, a
    privileged port, an address this host does not have, a folder that does
    not exist), found by binding a throwaway socket; None if it would work
    (or cannot be told in advance: port 0, adopted sockets).
    """
    probe = _ProbeReactor()
    try:
        endpoint = serverFromString(probe, description)
        endpoint.listen(object())
    except Exception as e:
        return str(e) or e.__class__.__name__
    for kind, where, interface in probe.calls:
        if kind == "tcp" and where:
            family = socket.AF_INET6 if ":" in (interface or "") else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (as Twisted does)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind((interface or "", where))
            except OSError as e:
                host = interface or ("::" if family == socket.AF_INET6 else "0.0.0.0")
                why = e.strerror or str(e)
                if e.errno == errno.EACCES and where < 1024:
                    why += " (ports below 1024 need root, or CAP_NET_BIND_SERVICE)"
                return f"port {where} on {host}: {why.lower()}"
            finally:
                sock.close()
        elif kind == "unix":
            folder = os.path.dirname(os.path.abspath(where))
            if not os.path.isdir(folder):
                return f"the folder {folder} does not exist"
    return None
