"""
``twistd signaling`` / ``twist signaling``: options and service wiring.

``makeService`` only wires: a registry, the WebSocket factory, the Klein site,
one listener per endpoint string, and the periodic summary.  Graceful
shutdown (stop accepting, close every WebSocket with 1001, wait at most the
drain bound, log a final summary) is
:class:`~signaling.service.SignalingService`'s ``stopService``; listening is
:mod:`signaling.listening`.
"""

import ipaddress
import os
import sys
from typing import Any, List, Tuple

from twisted.application.internet import TimerService
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage

from signaling import __version__
from signaling.gcpolicy import GenerationalFreeze
from signaling.httpguard import GuardedSite
from signaling.listening import ListenService, cannot_listen, endpoint_error, make_endpoint
from signaling.logs import is_json_observer_factory, json_log_observer_factory
from signaling.metrics import ServerMetrics, count_open_fds, open_fds_by_stat
from signaling.peerjs_protocol import serve_peerjs
from signaling.protocol import SignalingFactory
from signaling.registry import Registry
from signaling.service import SignalingService, log_summary
from signaling.settings import Settings
from signaling.stats import Slicer, StatsCache
from signaling.tokens import read_or_create_secret, read_secret
from signaling.turn import MAX_TTL, MIN_TTL, IceServers, check_uri, read_secrets
from signaling.web import STATS_BURST, STATS_RATE, SignalingWeb, WebSocketTakeover

_DEFAULTS = Settings()
_log = Logger()

#: where the resume-token secret is kept by default (in the working directory)
DEFAULT_RESUME_KEY = "signaling-resume.key"

#: options from the environment: --max-connections is SIGNALING_MAX_CONNECTIONS
ENV_PREFIX = "SIGNALING_"

#: options that may be given more than once (from the environment: a list
#: separated by commas or whitespace)
REPEATABLE = ("origin", "stats-origin", "stun", "turn", "trusted-proxy")

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_name(option: str) -> str:
    """The environment variable of ``--option``."""
    return ENV_PREFIX + option.upper().replace("-", "_")


def _number(kind, name, allow_zero, doc, minimum=None):
    """A coercer for a numeric option that names the option in its errors; ``doc`` ends its help."""
    noun = "a whole number" if kind is int else "a number"

    def convert(value):
        try:
            number = kind(value)
        except ValueError:
            raise ValueError(f"--{name} must be {noun}, got {value!r}") from None
        if minimum is not None and number < minimum:
            raise ValueError(f"--{name} must be at least {minimum}, got {value!r}")
        if number < 0 or (number == 0 and not allow_zero):
            rule = "must not be negative" if allow_zero else "must be positive"
            raise ValueError(f"--{name} {rule}, got {value!r}")
        return number

    convert.coerceDoc = doc
    return convert


def _prefix(value):
    try:
        prefix = int(value)
    except ValueError:
        raise ValueError(f"--ipv6-prefix must be a whole number, got {value!r}") from None
    if not 1 <= prefix <= 128:
        raise ValueError(f"--ipv6-prefix must be 1 to 128, got {value!r}")
    return prefix


_prefix.coerceDoc = ""  # type: ignore[attr-defined]


def _ttl(value):
    try:
        ttl = int(value)
    except ValueError:
        raise ValueError(f"--turn-ttl must be a whole number of seconds, got {value!r}") from None
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise ValueError(f"--turn-ttl must be {MIN_TTL} to {MAX_TTL} seconds, got {value!r}")
    return ttl


_ttl.coerceDoc = ""  # type: ignore[attr-defined]


def _positive(kind, name):
    return _number(kind, name, False, "Must be positive.")


def _non_negative(kind, name, zero="0 disables it."):
    """``zero``: what 0 means, for the help ("" when the help says it already)."""
    return _number(kind, name, True, zero)


def _at_least(kind, name, minimum, why):
    return _number(kind, name, False, f"At least {minimum} ({why}).", minimum)


def _one_line(method):
    """Help from a method's docstring, on one line (Twisted keeps a docstring's indentation)."""
    method.__doc__ = " ".join((method.__doc__ or "").split())
    return method


class SignalingOptions(usage.Options):
    """The options; bad ones raise ``usage.UsageError`` (see :class:`Options`)."""

    synopsis = "[options]"
    longdesc = (
        "A WebRTC signaling server: browser peers connect over WebSocket, pair "
        "up with ping/pong and exchange offers, answers and ICE candidates. "
        "Endpoints are Twisted endpoint strings, e.g. tcp:8080, "
        "tcp:8080:interface=127.0.0.1, ssl:8443:privateKey=key.pem:certKey=cert.pem."
    )
    optParameters = [
        ["http", None, "tcp:3000",
         "Endpoint for HTTP: /api/stats, /test.html, and the WebSocket at /ws."],
        ["ws", None, "tcp:8080",
         "Endpoint for the WebSocket (any path), or 'none' to serve it only at /ws."],
        ["backlog", None, 1024,
         "Listen backlog added to endpoints that do not set backlog= themselves "
         "(Twisted's default of 50 stalls bursts of connections).", _positive(int, "backlog")],
        ["ping-interval", None, _DEFAULTS.ping_interval,
         "Seconds between WebSocket pings to each peer (keepalive).", _non_negative(float, "ping-interval")],
        ["ping-timeout", None, _DEFAULTS.ping_timeout,
         "Seconds to wait for a pong before the peer is dropped.",
         _non_negative(float, "ping-timeout", "0: never drop a peer for a missing pong.")],
        ["handshake-timeout", None, _DEFAULTS.handshake_timeout,
         "Seconds allowed for a WebSocket opening handshake, and for each HTTP request head "
         "(trickled bytes do not extend it).", _non_negative(float, "handshake-timeout")],
        ["max-request-head", None, _DEFAULTS.max_handshake,
         "Largest request line plus headers, in bytes, of an HTTP request or a WebSocket "
         "handshake (HTTP 414 or 431 past it).", _positive(int, "max-request-head")],
        ["max-message-size", None, _DEFAULTS.max_message_size,
         "Largest accepted message in bytes; larger ones close the socket with 1009.",
         _at_least(int, "max-message-size", 65536, "real SDP can be tens of KiB")],
        ["max-fragments", None, _DEFAULTS.max_fragments,
         "Most frames one message may arrive in; more close the socket with 1009.",
         _positive(int, "max-fragments")],
        ["rate", None, _DEFAULTS.rate,
         "Frames per second each peer may send on average (messages, and continuation and "
         "control frames).", _non_negative(float, "rate")],
        ["burst", None, _DEFAULTS.burst,
         "Frames a peer may send at once above the rate.", _positive(int, "burst")],
        ["flood-strikes", None, _DEFAULTS.flood_strikes,
         "Rate-limited frames (less one for each frame let through since) at which a peer is "
         "closed with 1008.",
         _positive(int, "flood-strikes")],
        ["drain-timeout", None, _DEFAULTS.drain_timeout,
         "Seconds to wait for WebSockets to close on shutdown.",
         _non_negative(float, "drain-timeout", "0: do not wait.")],
        ["summary-interval", None, 60.0,
         "Seconds between summary log lines (users, pairs).", _non_negative(float, "summary-interval")],
        ["gc-full-interval", None, 600.0,
         "Seconds between full garbage collections of the whole heap; in between, what "
         "survives a collection is frozen (gc.freeze), so that collections do not pause "
         "for every open connection.  0 leaves Python's collector as it is.",
         _non_negative(float, "gc-full-interval", "")],
        ["max-connections", None, _DEFAULTS.max_connections,
         "WebSockets allowed at once in total; more are refused with HTTP 503.",
         _positive(int, "max-connections")],
        ["max-connections-per-ip", None, _DEFAULTS.max_connections_per_ip,
         "WebSockets allowed at once from one client address (opening ones included); "
         "more get HTTP 429.", _positive(int, "max-connections-per-ip")],
        ["max-http-connections", None, 1024,
         "HTTP connections (not yet WebSockets) allowed at once on the HTTP port; more get "
         "HTTP 503 and are closed at once.", _positive(int, "max-http-connections")],
        ["max-http-connections-per-ip", None, 64,
         "HTTP connections allowed at once from one client address; more get HTTP 429.",
         _positive(int, "max-http-connections-per-ip")],
        ["ipv6-prefix", None, _DEFAULTS.ipv6_prefix,
         "Per-address limits count an IPv6 client by its network of this prefix length "
         "(1 to 128).", _prefix],
        ["max-outbound-buffer", None, _DEFAULTS.max_outbound,
         "Bytes that may wait unsent to a peer that does not read before it is dropped.",
         _positive(int, "max-outbound-buffer")],
        ["token-secret-file", None, None,
         "File with the shared secret for access tokens (at least 16 bytes); when set, WebSockets "
         "need a valid token (?token= or Authorization: Bearer), else HTTP 401."],
        ["token-max-lifetime", None, _DEFAULTS.token_max_lifetime,
         "Seconds an access token may still be valid for when it is presented; tokens "
         "valid for longer are refused (HTTP 401).", _positive(float, "token-max-lifetime")],
        ["stats-token-file", None, None,
         "File with a bearer token (at least 16 bytes) that /api/stats, /metrics and "
         "/api/dashboard then require (else HTTP 401)."],
        ["stats-rate", None, STATS_RATE,
         "Answers of /api/stats, /metrics and /api/dashboard per second to one client address, on "
         "average (more requests wait their turn; none is refused).  0 disables the pacing.",
         _non_negative(float, "stats-rate", "")],
        ["stats-burst", None, STATS_BURST,
         "Answers of /api/stats, /metrics and /api/dashboard to one client address at once, "
         "before --stats-rate paces them.", _positive(int, "stats-burst")],
        ["resume-grace", None, _DEFAULTS.resume_grace,
         "Seconds a peer whose socket was lost (not closed by it) keeps its id, state and partner, "
         "resuming with its welcome's token; its partner is told peer_left only after.  0 disables it.",
         _non_negative(float, "resume-grace", "")],
        ["resume-queue", None, _DEFAULTS.resume_queue,
         "Messages kept for a peer in its grace period; past them senders get queue-full.",
         _positive(int, "resume-queue")],
        ["resume-secret-file", None, None,
         "File with the secret that signs resume tokens (at least 16 bytes), so that they stay valid "
         "across restarts; created (random, mode 0600) if missing.  Default: " + DEFAULT_RESUME_KEY
         + " in the working directory; with --redis, a secret the nodes share through Redis."],
        ["turn-secret-file", None, None,
         "File with the secret shared with the TURN server (coturn's static-auth-secret), "
         "one per line, the first one signing: needed with --turn; not readable by others."],
        ["turn-ttl", None, 86400,
         f"Seconds the TURN credentials handed out stay valid ({MIN_TTL} to {MAX_TTL}).", _ttl],
        ["redis", None, None,
         "redis://host:port/db: share peers with other nodes through Redis "
         "(default: this process only)."],
        ["node-id", None, None, "This node's id in Redis mode (default: host-pid-time)."],
        ["node-timeout", None, 10.0,
         "Redis mode: seconds without a heartbeat after which a node's peers are removed.",
         _positive(float, "node-timeout")],
        ["redis-prefix", None, "signaling:", "Redis mode: prefix of every key and channel."],
        ["peerjs-key", None, "peerjs",
         "The key PeerJS clients must give (their key option) at /peerjs; with --token-secret-file "
         "their key is the access token instead."],
        ["peerjs-expire-timeout", None, 5.0,
         "Seconds PeerJS messages for an id that is not connected wait for it (then the senders "
         "get EXPIRE).", _positive(float, "peerjs-expire-timeout")],
        ["yjs-max-topics-per-connection", None, 64,
         "y-webrtc clients (/yjs): topics (rooms) one connection may subscribe to at once.",
         _positive(int, "yjs-max-topics-per-connection")],
        ["yjs-max-topics", None, 20000,
         "y-webrtc clients (/yjs): topics this process holds at once (subscribes past it are refused).",
         _positive(int, "yjs-max-topics")],
    ]
    optFlags = [
        ["reuse-port", None,
         "Listen with SO_REUSEPORT (tcp: endpoints), so that several processes "
         "share each port and the kernel spreads connections over them; "
         "combine with --redis."],
        ["stats-hide-ip", None, "Show null instead of client addresses in /api/stats."],
        ["no-relay-log", None,
         "Do not log a line per relayed message (the busiest log line; "
         "connects, pairing, errors and summaries are still logged)."],
        ["no-peerjs", None,
         "Do not serve PeerJS clients (the WebSocket at /peerjs and GET /<key>/id)."],
        ["json-lines", None,
         "With twist's JSON log (--log-format=json): one JSON object per line, without the "
         "RFC 7464 record separator (0x1E) that starts each record otherwise."],
        ["no-yjs", None, "Do not serve y-webrtc's signaling protocol at /yjs."],
    ]

    def parseOptions(self, options=None):
        """
        Parse ``options`` (the command line), each option not given there
        taken from its environment variable (``SIGNALING_HTTP`` for
        ``--http``), if set.
        """
        argv = list(sys.argv[1:] if options is None else options)
        from_env = self.environment_arguments(os.environ, argv)
        try:
            super().parseOptions(from_env + argv)
        except usage.UsageError as e:
            named = [env_name(arg[2:].split("=", 1)[0]) for arg in from_env
                     if arg[2:].split("=", 1)[0] in str(e)]
            if named:
                raise usage.UsageError(f"{e} (from the environment: {named[0]})") from None
            raise

    def environment_arguments(self, environ, argv) -> List[str]:
        """Command-line arguments for the options set in ``environ`` and not given in ``argv``."""
        given = {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}
        out: List[str] = []
        for name, kind in self.option_kinds():
            key = env_name(name)
            if key not in environ or name in given:
                continue
            value = environ[key]
            if kind == "flag":
                if value.strip().lower() in _TRUE:
                    out.append(f"--{name}")
                elif value.strip().lower() not in _FALSE:
                    raise usage.UsageError(f"{key} must be true or false (1/0, yes/no, on/off), got {value!r}")
            elif kind == "list":
                out.extend(f"--{name}={item}" for item in value.replace(",", " ").split())
            else:
                out.append(f"--{name}={value}")
        return out

    @classmethod
    def option_kinds(cls):
        """``(name, "parameter" | "flag" | "list")`` of every option that may come from the environment."""
        for name, *_ in cls.optParameters:
            yield name, "parameter"
        for name, *_ in cls.optFlags:
            yield name, "flag"
        for name in REPEATABLE:
            yield name, "list"

    def __init__(self):
        super().__init__()
        self["origins"] = []
        self["stats-origins"] = []
        self["stun"] = []
        self["turn"] = []
        self["trusted-proxies"] = []

    @_one_line
    def opt_origin(self, origin):
        """
        Allow browsers from this Origin (e.g. https://app.example.com; * and ?
        wildcards work).  Repeatable; without it every origin is allowed.
        Others are refused with HTTP 403.
        """
        if not origin.strip():
            raise usage.UsageError("--origin must not be empty (that would refuse every browser)")
        self["origins"].append(origin.rstrip("/"))

    @_one_line
    def opt_stun(self, uri):
        """
        A STUN server for clients' ICE (stun:host[:port]); repeatable.  Sent
        in every welcome and by /api/ice-servers.
        """
        try:
            self["stun"].append(check_uri(uri, ("stun", "stuns")))
        except ValueError as e:
            raise usage.UsageError(f"--stun: {e}") from None

    @_one_line
    def opt_turn(self, uri):
        """
        A TURN server for clients' ICE (turn:host[:port][?transport=udp|tcp] or
        turns:...), with credentials signed by --turn-secret-file; repeatable.
        """
        try:
            self["turn"].append(check_uri(uri, ("turn", "turns")))
        except ValueError as e:
            raise usage.UsageError(f"--turn: {e}") from None

    @_one_line
    def opt_stats_origin(self, origin):
        """
        Let pages from this Origin read /api/stats (CORS; * and ? wildcards
        work).  Repeatable; without it no other origin may.
        """
        if not origin.strip():
            raise usage.UsageError("--stats-origin must not be empty")
        self["stats-origins"].append(origin.rstrip("/"))

    @_one_line
    def opt_trusted_proxy(self, network):
        """
        A reverse proxy (address or CIDR network, or "unix" for the clients
        of a unix: endpoint) whose X-Forwarded-For header gives the client
        address.  Repeatable.
        """
        if network == "unix":  # the clients of a UNIX socket endpoint (a proxy on this machine)
            self["trusted-proxies"].append("unix")
            return
        try:
            self["trusted-proxies"].append(ipaddress.ip_network(network, strict=False))
        except ValueError:
            raise usage.UsageError(f"--trusted-proxy: not an address or network: {network!r}") from None

    @_one_line
    def opt_version(self):
        """Print the version and exit."""
        print(f"signaling {__version__}")
        raise SystemExit(0)

    def postOptions(self):
        for name in ("http", "ws"):
            if not self[name]:
                raise usage.UsageError(f"--{name} must not be empty")
        if self["http"] == "none":
            raise usage.UsageError("--http cannot be 'none'")
        if not self["peerjs-key"]:
            raise usage.UsageError("--peerjs-key must not be empty")
        if self["reuse-port"]:
            for name in ("http", "ws"):
                if self[name] != "none" and not self[name].startswith("tcp:"):
                    raise usage.UsageError(f"--reuse-port works with tcp: endpoints; --{name} is {self[name]!r}")
        for name in ("http", "ws"):
            why = endpoint_error(self[name]) if self[name] != "none" else None
            if why is not None:
                hint = f" (did you mean tcp:{self[name]}?)" if self[name].isdigit() else ""
                raise usage.UsageError(
                    f"--{name}: {self[name]!r} is not a listening endpoint{hint} (tcp:PORT, "
                    f"tcp:PORT:interface=ADDRESS, ssl:PORT:privateKey=...:certKey=..., unix:PATH): {why}"
                )
        if self["redis"] is not None:
            from signaling.redis_registry import parse_url

            try:
                parse_url(self["redis"])
            except ValueError as e:
                raise usage.UsageError(f"--redis: {e}") from None
        self.token_secret = self._secret("token-secret-file")
        self.resume_secret = None  # read (or created) by makeService: see resume_secret()
        if self["resume-secret-file"] is not None and os.path.exists(self["resume-secret-file"]):
            self.resume_secret = self._secret("resume-secret-file")
        self.turn_secrets = None
        if self["turn-secret-file"] is not None:
            if not self["turn"]:
                raise usage.UsageError("--turn-secret-file is for --turn URIs: give at least one --turn")
            try:
                self.turn_secrets = read_secrets(self["turn-secret-file"])
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--turn-secret-file: {e}") from None
        elif self["turn"]:
            raise usage.UsageError("--turn needs --turn-secret-file (coturn's static-auth-secret)")
        stats_token = self._secret("stats-token-file")
        self.stats_token = stats_token.decode("utf-8", "replace") if stats_token else None

    def _secret(self, name):
        path = self[name]
        if path is None:
            return None
        try:
            return read_secret(path)
        except (OSError, ValueError) as e:
            raise usage.UsageError(f"--{name}: {e}") from None

    def settings(self) -> Settings:
        return Settings(
            max_message_size=self["max-message-size"],
            ping_interval=self["ping-interval"],
            ping_timeout=self["ping-timeout"],
            handshake_timeout=self["handshake-timeout"],
            rate=self["rate"],
            burst=self["burst"],
            flood_strikes=self["flood-strikes"],
            drain_timeout=self["drain-timeout"],
            max_connections=self["max-connections"],
            max_connections_per_ip=self["max-connections-per-ip"],
            ipv6_prefix=self["ipv6-prefix"],
            max_handshake=self["max-request-head"],
            max_fragments=self["max-fragments"],
            token_max_lifetime=self["token-max-lifetime"],
            resume_grace=self["resume-grace"],
            resume_queue=self["resume-queue"],
            resume_secret=self.resume_secret,
            max_outbound=self["max-outbound-buffer"],
            allowed_origins=tuple(self["origins"]),
            token_secret=self.token_secret,
            trusted_proxies=tuple(self["trusted-proxies"]),
            log_relays=not self["no-relay-log"],
        )


class Options(SignalingOptions):
    """
    The options as ``twistd``/``twist`` parse them: a bad option ends the
    process with status 2 and one line naming it.  (``twistd`` before
    Twisted 26.10 printed the usage and exited with status 0, which a
    service manager reads as a clean start and stop.)
    """

    def parseOptions(self, options=None):
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            # (our coercers' messages name the option; Twisted prefixes them)
            why = str(e).replace("Parameter type enforcement failed: ", "", 1)
            sys.stderr.write(f"signaling: {why}\n")
            raise SystemExit(2) from None

    def postOptions(self):
        super().postOptions()
        # what would otherwise fail later with a traceback (or, in daemon
        # mode, a truncated repr): the folders of twistd's own files, and
        # every listening endpoint, tried now
        parent = getattr(self, "parent", None)
        observer = parent.get("fileLogObserverFactory") if parent is not None else None
        if is_json_observer_factory(observer):
            # every JSON event gets its rendered message (log_text)
            parent["fileLogObserverFactory"] = json_log_observer_factory(bool(self["json-lines"]))
        elif self["json-lines"]:
            raise usage.UsageError("--json-lines is for twist's JSON log: twist --log-format=json signaling ...")
        for option in ("logfile", "pidfile"):
            try:
                path = parent[option] if parent is not None else None
            except KeyError:
                continue
            if path and path != "-" and isinstance(path, str):
                folder = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(folder):
                    raise usage.UsageError(
                        f"twistd --{option}={path}: the folder {folder} does not exist (create it first)"
                    )
        problems = []
        for name in ("http", "ws"):
            if self[name] != "none":
                why = cannot_listen(self[name], bool(self["reuse-port"]))
                if why is not None:
                    problems.append(f"--{name}={self[name]}: {why}")
        if problems:
            raise usage.UsageError("cannot listen: " + "; ".join(problems))


def make_ice_servers(options: SignalingOptions, reactor) -> IceServers:
    return IceServers(reactor, options["stun"], options["turn"], options.turn_secrets or (), options["turn-ttl"])


def make_factory(options: SignalingOptions, registry, reactor, ice_servers=None) -> SignalingFactory:
    ice = make_ice_servers(options, reactor) if ice_servers is None else ice_servers
    factory = SignalingFactory(registry, options.settings(), reactor, ice_servers=ice)
    if not options["no-peerjs"]:
        serve_peerjs(factory, key=options["peerjs-key"], expire_timeout=options["peerjs-expire-timeout"])
    return factory


def make_yjs(options: SignalingOptions, factory, backend) -> None:
    """Serve y-webrtc's protocol at /yjs (unless --no-yjs); with --redis, its topics span the nodes."""
    if options["no-yjs"]:
        return
    from signaling.yjs_protocol import install

    rooms = install(factory, options["yjs-max-topics-per-connection"], options["yjs-max-topics"])
    if backend is not None:
        from signaling.cluster_topics import RedisTopics

        RedisTopics(backend, rooms)


def _in_thread(reactor, function):
    """``function`` as ``() -> Deferred``, run in the reactor's thread pool (if it has one)."""
    if not hasattr(reactor, "getThreadPool"):
        return None  # (a fake reactor: at once)
    return lambda: deferToThreadPool(reactor, reactor.getThreadPool(), function)


def make_site(options: SignalingOptions, registry, factory, reactor) -> GuardedSite:
    # The stats' background work (captures in slices, bodies written a
    # little a turn) lets the relays the last poll's events sent go out first.
    urgent = factory.writes.flush
    stats = StatsCache(registry, reactor, hide_ip=bool(options["stats-hide-ip"]), rooms=getattr(factory, "yjs", None),
                       slicer=Slicer(reactor, first=urgent))
    # (where stat counts the descriptors at once, no thread: a thread listing
    # 10,000 of them contends for the GIL with the reactor for milliseconds)
    count_fds = None if open_fds_by_stat() is not None else _in_thread(reactor, count_open_fds)
    metrics = ServerMetrics(factory, registry, reactor, stats=stats, count_fds=count_fds)
    web = SignalingWeb(
        registry,
        WebSocketTakeover(factory),
        stats_token=options.stats_token,
        hide_ip=bool(options["stats-hide-ip"]),
        stats_origins=options["stats-origins"],
        stats_rate=options["stats-rate"],
        stats_burst=options["stats-burst"],
        ice_servers=factory.ice_servers,
        admission=factory.settings,
        clock=reactor,
        metrics=metrics,
        peerjs=getattr(factory, "peerjs", None),
        stats=stats,
        urgent=urgent,
    )
    site = metrics.site = GuardedSite(
        web.resource(), reactor,
        max_connections=options["max-http-connections"],
        max_per_address=options["max-http-connections-per-ip"],
        max_head=options["max-request-head"],
        head_timeout=options["handshake-timeout"],
        trusted_proxies=tuple(options["trusted-proxies"]),
        ipv6_prefix=options["ipv6-prefix"],
    )
    return site


#: file descriptors kept for everything but client connections (listeners, Redis, logs)
FD_RESERVE = 64


def fit_fd_limit(options: SignalingOptions) -> None:
    """
    Make the connection caps fit the process's file descriptor limit, so
    that running out of descriptors (which stops every accept, health
    checks included) cannot happen: raise the soft limit as far as the hard
    one allows; if that is still short, lower --max-http-connections to at
    most a quarter of what is left and --max-connections to the rest, and
    say so.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    ws, http = options["max-connections"], options["max-http-connections"]
    needed = ws + http + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (ValueError, OSError):
        pass
    if soft >= needed:
        return
    available = max(2, soft - FD_RESERVE)
    http = min(http, max(1, available // 4))
    ws = min(ws, available - http)
    _log.warn(
        "the file descriptor limit ({limit}) is below --max-connections ({old_ws}) + "
        "--max-http-connections ({old_http}) + {reserve}: using {ws} and {http} "
        "(raise the limit: ulimit -n, or LimitNOFILE= in systemd)",
        limit=soft, old_ws=options["max-connections"], old_http=options["max-http-connections"],
        reserve=FD_RESERVE, ws=ws, http=http,
    )
    options["max-connections"], options["max-http-connections"] = ws, http


def make_registry(options: SignalingOptions, reactor):
    """The in-memory registry, or the Redis one (also a service) with --redis."""
    if options["redis"] is None:
        return Registry(reactor), None
    from signaling.redis_registry import RedisRegistry, default_node_id

    registry = RedisRegistry(
        options["redis"], options["node-id"] or default_node_id(), reactor,
        node_timeout=options["node-timeout"], prefix=options["redis-prefix"],
        grace=options["resume-grace"], queue_limit=options["resume-queue"],
        queue_bytes=options["max-outbound-buffer"],
    )
    return registry, registry


def resume_secret(options: SignalingOptions) -> None:
    """
    Read or create the secret of resume tokens (``--resume-secret-file``,
    else ``DEFAULT_RESUME_KEY`` unless the nodes of a cluster share one
    through Redis).  If it cannot be created, resume tokens are signed with
    a secret of this process only (they then do not survive a restart).
    """
    path = options["resume-secret-file"]
    if path is None and options["redis"] is not None:
        return
    if options.resume_secret is not None or options["resume-grace"] <= 0:
        return
    path = path or DEFAULT_RESUME_KEY
    try:
        options.resume_secret, created = read_or_create_secret(path)
    except (OSError, ValueError) as e:
        _log.warn(
            "resume tokens: cannot use {path} ({error}); signing with a secret of this process only "
            "(tokens will not survive a restart)", path=path, error=e,
        )
        return
    if created:
        _log.info("resume tokens: created the secret that signs them in {path}", path=os.path.abspath(path))


def makeService(options: SignalingOptions, reactor=None) -> SignalingService:
    if reactor is None:
        from twisted.internet import reactor
    fit_fd_limit(options)
    resume_secret(options)
    _log.info("settings: {settings!r}", settings=options.settings())
    registry, backend = make_registry(options, reactor)
    factory = make_factory(options, registry, reactor)
    if backend is not None:
        registry.attach(factory)
    make_yjs(options, factory, backend)
    service = SignalingService(factory, options["drain-timeout"], reactor, backend)
    backlog = options["backlog"]
    listeners: List[Tuple[str, str, Any]] = [("http", options["http"], make_site(options, registry, factory, reactor))]
    if options["ws"] != "none":
        listeners.append(("ws", options["ws"], factory))
    for label, description, server_factory in listeners:
        endpoint = make_endpoint(reactor, description, backlog, bool(options["reuse-port"]))
        ListenService(label, endpoint, server_factory).setServiceParent(service)
    if options["summary-interval"] > 0:
        timer = TimerService(options["summary-interval"], log_summary, registry)
        timer.clock = reactor
        timer.setServiceParent(service)
    if options["gc-full-interval"] > 0:
        # last: what the other services made at startup is frozen too
        GenerationalFreeze(reactor, options["gc-full-interval"]).setServiceParent(service)
    return service
