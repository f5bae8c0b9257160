"""Tier 2: options and service wiring (signaling.tap) against a MemoryReactor."""

import re

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.web.server import Site

from signaling.listening import with_backlog
from signaling.protocol import SignalingFactory
from signaling.tap import Options, SignalingOptions, makeService

pytestmark = pytest.mark.memory


@pytest.fixture(autouse=True)
def in_a_temporary_directory(tmp_path, monkeypatch):
    """makeService keeps the default resume secret in the working directory: not the checkout's."""
    monkeypatch.chdir(tmp_path)


def parse(*argv):
    options = SignalingOptions()
    options.parseOptions(list(argv))
    return options


def test_defaults():
    """Defaults: HTTP on tcp:3000, WebSocket on tcp:8080, backlog 1024, 256 KiB messages."""
    o = parse()
    assert (o["http"], o["ws"], o["backlog"]) == ("tcp:3000", "tcp:8080", 1024)
    s = o.settings()
    assert s.max_message_size == 262144
    assert (s.ping_interval, s.ping_timeout, s.drain_timeout) == (20.0, 10.0, 5.0)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max-message-size=65535"], "at least 65536"),
        (["--backlog=0"], "--backlog must be positive"),
        (["--ping-interval=-1"], "--ping-interval must not be negative"),
        (["--rate=fast"], "--rate must be a number, got 'fast'"),
        (["--burst=1.5"], "--burst must be a whole number"),
        (["--http=none"], "--http cannot be 'none'"),
        (["--ws="], "--ws must not be empty"),
        (["--resume-grace=-1"], "--resume-grace must not be negative"),
        (["--resume-queue=0"], "--resume-queue must be positive"),
    ],
)
def test_bad_options(argv, needle):
    """Bad option values are usage errors that say what is wrong."""
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert needle in str(e.value)


@pytest.mark.parametrize(
    "description, expected",
    [
        ("tcp:8080", "tcp:8080:backlog=1024"),
        ("tcp:port=8080:interface=127.0.0.1", "tcp:port=8080:interface=127.0.0.1:backlog=1024"),
        ("tcp6:8080", "tcp6:8080:backlog=1024"),
        ("ssl:8443:privateKey=k.pem", "ssl:8443:privateKey=k.pem:backlog=1024"),
        ("unix:/tmp/s.sock", "unix:/tmp/s.sock:backlog=1024"),
        ("tcp:8080:backlog=10", "tcp:8080:backlog=10"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_with_backlog(description, expected):
    """The backlog is added to listening endpoints that take one and don't set it."""
    assert with_backlog(description, 1024) == expected


def test_make_service_listens_as_configured():
    """makeService listens on both endpoints with the backlog and interface asked for."""
    reactor = MemoryReactorClock()
    service = makeService(
        parse("--http=tcp:3001:interface=127.0.0.1", "--ws=tcp:8081", "--backlog=777"), reactor
    )
    service.startService()
    assert [(port, backlog, interface) for port, _, backlog, interface in reactor.tcpServers] == [
        (3001, 777, "127.0.0.1"),
        (8081, 777, ""),
    ]
    http_factory, ws_factory = (f for _, f, _, _ in reactor.tcpServers)
    assert isinstance(http_factory, Site)
    assert isinstance(ws_factory, SignalingFactory)
    assert ws_factory.registry is service.factory.registry
    d = service.stopService()
    assert d.called  # nobody connected: stopping is immediate


def test_ws_none_serves_only_http():
    """--ws=none listens on the HTTP endpoint only."""
    reactor = MemoryReactorClock()
    service = makeService(parse("--ws=none"), reactor)
    service.startService()
    assert [port for port, *_ in reactor.tcpServers] == [3000]
    service.stopService()


def test_summary_timer_uses_the_reactor_clock():
    """The periodic summary runs on the given reactor's clock."""
    from twisted.logger import capturedLogs

    reactor = MemoryReactorClock()
    service = makeService(parse("--summary-interval=30"), reactor)
    with capturedLogs() as events:
        service.startService()
        reactor.advance(30)
        reactor.advance(30)
    summaries = [e for e in events if e.get("log_namespace") == "signaling.summary"]
    assert len(summaries) == 3  # at start, then every 30 s
    assert summaries[-1]["users"] == 0
    service.stopService()


def test_gc_policy_wired_on_the_reactor_clock():
    """--gc-full-interval runs the periodic full collection on the reactor's clock; 0 leaves the collector alone."""
    import gc

    from signaling.gcpolicy import GenerationalFreeze

    assert not any(isinstance(s, GenerationalFreeze) for s in makeService(parse("--gc-full-interval=0"),
                                                                          MemoryReactorClock()))
    reactor = MemoryReactorClock()
    service = makeService(parse("--gc-full-interval=120"), reactor)
    policy = next(s for s in service if isinstance(s, GenerationalFreeze))
    service.startService()
    try:
        assert gc.get_freeze_count() > 0
        reactor.advance(120)
        assert policy.full_collections == 1
    finally:
        service.stopService()
    assert gc.get_freeze_count() == 0


def test_security_options(tmp_path):
    """Origins and trusted proxies repeat; secrets are read from files; all reach the settings."""
    secret = tmp_path / "secret"
    secret.write_bytes(b"  0123456789abcdef0123  \n")
    stats = tmp_path / "stats"
    stats.write_bytes(b"stats-token-0123456789\n")
    o = parse(
        "--origin=https://a.example/", "--origin=https://*.b.example",
        "--trusted-proxy=127.0.0.1", "--trusted-proxy=10.0.0.0/8",
        f"--token-secret-file={secret}", f"--stats-token-file={stats}", "--stats-hide-ip",
        "--max-connections=50", "--max-connections-per-ip=5", "--max-outbound-buffer=70000",
    )
    s = o.settings()
    assert s.allowed_origins == ("https://a.example", "https://*.b.example")
    assert [str(n) for n in s.trusted_proxies] == ["127.0.0.1/32", "10.0.0.0/8"]
    assert s.token_secret == b"0123456789abcdef0123"
    assert o.stats_token == "stats-token-0123456789"
    assert (s.max_connections, s.max_connections_per_ip, s.max_outbound) == (50, 5, 70000)
    assert o["stats-hide-ip"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--trusted-proxy=nope"], "not an address or network"),
        (["--token-secret-file=/nonexistent/secret"], "--token-secret-file:"),
        (["--max-connections=0"], "--max-connections must be positive"),
    ],
)
def test_bad_security_options(argv, needle):
    """Bad security options are usage errors naming the option."""
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert needle in str(e.value)


def test_short_secret_refused(tmp_path):
    """A token secret shorter than 16 bytes is refused."""
    short = tmp_path / "short"
    short.write_bytes(b"short")
    with pytest.raises(usage.UsageError, match="at least 16 bytes"):
        parse(f"--token-secret-file={short}")


def test_reuse_port_endpoint_parsing():
    """--reuse-port endpoints take tcp:PORT with interface and backlog, and refuse the rest."""
    from signaling.listening import ReusePortEndpoint

    e = ReusePortEndpoint(None, "tcp:8080:interface=127.0.0.1:backlog=777")
    assert (e.port, e.interface, e.backlog) == (8080, "127.0.0.1", 777)
    assert ReusePortEndpoint(None, "tcp:port=9000").port == 9000
    with pytest.raises(ValueError):
        ReusePortEndpoint(None, "ssl:8443:privateKey=k.pem")
    with pytest.raises(ValueError):
        ReusePortEndpoint(None, "tcp:8080:reuseAddress=1")
    with pytest.raises(usage.UsageError, match="--reuse-port works with tcp"):
        parse("--reuse-port", "--ws=ssl:8443:privateKey=k.pem")


def test_hardening_options():
    """The hardening options reach the WebSocket settings and the HTTP site."""
    o = parse(
        "--max-request-head=8192", "--max-fragments=16", "--ipv6-prefix=56", "--token-max-lifetime=600",
        "--max-http-connections=300", "--max-http-connections-per-ip=7", "--stats-origin=https://dash.example/",
        "--handshake-timeout=4",
    )
    s = o.settings()
    assert (s.max_handshake, s.max_fragments, s.ipv6_prefix, s.token_max_lifetime) == (8192, 16, 56, 600.0)
    reactor = MemoryReactorClock()
    service = makeService(o, reactor)
    service.startService()
    site = next(f for _, f, _, _ in reactor.tcpServers if isinstance(f, Site))
    assert (site.counts.max_total, site.counts.max_per_key) == (300, 7)
    assert (site.max_head, site.head_timeout, site.ipv6_prefix) == (8192, 4.0, 56)
    assert o["stats-origins"] == ["https://dash.example"]
    service.stopService()


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--ipv6-prefix=0"], "--ipv6-prefix must be 1 to 128"),
        (["--ipv6-prefix=129"], "--ipv6-prefix must be 1 to 128"),
        (["--max-fragments=0"], "--max-fragments must be positive"),
        (["--max-http-connections=-1"], "--max-http-connections must be positive"),
        (["--token-max-lifetime=0"], "--token-max-lifetime must be positive"),
    ],
)
def test_bad_hardening_options(argv, needle):
    """Bad hardening options are usage errors naming the option."""
    with pytest.raises(usage.UsageError) as e:
        parse(*argv)
    assert needle in str(e.value)


def test_caps_are_fitted_to_the_descriptor_limit(monkeypatch):
    """
    The soft descriptor limit is raised as far as the hard one allows; if
    the caps still do not fit, the HTTP cap gets at most a quarter, the
    WebSocket cap the rest, and a warning names the numbers.
    """
    import resource

    from twisted.logger import capturedLogs, formatEvent

    from signaling.tap import fit_fd_limit

    limits = {"now": (512, 1000)}
    monkeypatch.setattr(resource, "getrlimit", lambda which: limits["now"])
    monkeypatch.setattr(resource, "setrlimit", lambda which, value: limits.update(now=value))
    o = parse()
    with capturedLogs() as events:
        fit_fd_limit(o)
    assert limits["now"] == (1000, 1000)
    assert (o["max-connections"], o["max-http-connections"]) == (702, 234)  # 1000 - 64 kept for the rest
    [event] = events
    assert "file descriptor limit (1000)" in formatEvent(event) and "using 702 and 234" in formatEvent(event)
    limits["now"] = (100, 100_000)
    o = parse()
    fit_fd_limit(o)
    assert limits["now"] == (20000 + 1024 + 64, 100_000)
    assert (o["max-connections"], o["max-http-connections"]) == (20000, 1024)


def test_twistd_options_exit_with_status_2(capsys):
    """The options twistd parses end a bad command line with status 2 and one line naming the option."""
    with pytest.raises(SystemExit) as e:
        Options().parseOptions(["--max-fragments=0"])
    assert e.value.code == 2
    assert capsys.readouterr().err == "signaling: --max-fragments must be positive, got '0'\n"


def test_ports_are_bound_before_privileges_are_dropped():
    """
    twistd runs privilegedStartService before it drops privileges
    (--uid/--gid): both ports are bound then, so a port below 1024 can be
    served by an unprivileged process; startService binds nothing again.
    """
    reactor = MemoryReactorClock()
    service = makeService(parse("--http=tcp:80", "--ws=tcp:443"), reactor)
    service.privilegedStartService()
    assert [port for port, *_ in reactor.tcpServers] == [80, 443]
    service.startService()  # (twistd: after dropping privileges)
    assert [port for port, *_ in reactor.tcpServers] == [80, 443]
    service.stopService()
    # twist (or anything that only calls startService) binds there
    reactor = MemoryReactorClock()
    service = makeService(parse("--http=tcp:3005", "--ws=none"), reactor)
    service.startService()
    assert [port for port, *_ in reactor.tcpServers] == [3005]
    service.stopService()


@pytest.mark.live
def test_twistd_serves_a_port_bound_before_dropping_privileges(tmp_path):
    """
    The installed plugin under twistd --uid/--gid (as root, dropping to
    nobody) serves a port it bound before dropping them (a port below 1024
    where the tests run as root).
    """
    import os
    import pwd
    import socket
    import subprocess
    import sys
    import urllib.request

    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test needs root, to drop privileges (CI runs as root)")
        pytest.skip("needs root to drop privileges")
    nobody = pwd.getpwnam("nobody")
    with socket.socket() as probe:  # a free port below 1024
        for port in range(900, 1000):
            try:
                probe.bind(("127.0.0.1", port))
                break
            except OSError:
                continue
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    tmp_path.chmod(0o777)
    proc = subprocess.Popen(
        [twistd, "-n", "--pidfile=", f"--uid={nobody.pw_uid}", f"--gid={nobody.pw_gid}", "signaling",
         f"--http=tcp:{port}:interface=127.0.0.1", "--ws=none"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        for line in proc.stdout:
            if " ready" in line or "Traceback" in line:
                break
        for path in ("/api/health", "/api/stats", "/test.html", "/signaling.js"):  # (lazy imports, as nobody)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
                assert response.status == 200, path

        async def websocket():
            from live import connect

            ws = await connect(f"ws://127.0.0.1:{port}/ws")
            await ws.close()

        from live import run

        run(websocket())
        with open(f"/proc/{proc.pid}/status") as f:
            uids = next(line for line in f if line.startswith("Uid:")).split()[1:]
        assert set(uids) == {str(nobody.pw_uid)}
    finally:
        proc.terminate()
        proc.wait(30)


def test_resume_secret_is_created_once_and_kept(tmp_path):
    """
    Without --resume-secret-file, the secret of resume tokens is kept in
    signaling-resume.key in the working directory: created (0600) at the
    first start, read at the next, so tokens survive a restart.
    """
    import os
    import stat


    reactor = MemoryReactorClock()
    first = parse()
    makeService(first, reactor)
    key = tmp_path / "signaling-resume.key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert len(first.resume_secret) >= 32
    second = parse()
    makeService(second, reactor)
    assert second.resume_secret == first.resume_secret
    assert second.settings().resume_secret == first.resume_secret


def test_resume_secret_file_given(tmp_path):
    """--resume-secret-file names the file (created if missing); a short secret in it is a usage error."""
    reactor = MemoryReactorClock()
    path = tmp_path / "keys" / "resume"
    path.parent.mkdir()
    o = parse(f"--resume-secret-file={path}")
    makeService(o, reactor)
    assert path.read_bytes().strip() == o.resume_secret
    assert not (tmp_path / "signaling-resume.key").exists()
    path.write_bytes(b"short")
    with pytest.raises(usage.UsageError) as e:
        parse(f"--resume-secret-file={path}")
    assert "at least 16 bytes" in str(e.value)


def test_resume_secret_unwritable_falls_back_to_this_process(tmp_path):
    """If the default file cannot be created, tokens are signed with a secret of this process only (logged)."""
    from twisted.logger import capturedLogs, formatEvent

    not_a_directory = tmp_path / "a-file"
    not_a_directory.write_text("")  # (unwritable below it even for root)
    o = parse(f"--resume-secret-file={not_a_directory / 'key'}")
    with capturedLogs() as events:
        service = makeService(o, MemoryReactorClock())
    assert o.resume_secret is None
    assert any("tokens will not survive a restart" in formatEvent(e) for e in events)
    assert len(service.factory.resume_secret) == 32


def test_cluster_nodes_share_the_resume_secret_through_redis(tmp_path):
    """With --redis and no --resume-secret-file, no file is made: the nodes share a secret through Redis."""
    o = parse("--redis=redis://127.0.0.1:1/0")
    makeService(o, MemoryReactorClock())
    assert o.resume_secret is None
    assert not (tmp_path / "signaling-resume.key").exists()


def test_options_from_the_environment(monkeypatch):
    """SIGNALING_<NAME> gives an option not on the command line: parameters, flags, lists; the command line wins."""
    monkeypatch.setenv("SIGNALING_RATE", "3")
    monkeypatch.setenv("SIGNALING_BURST", "9")
    monkeypatch.setenv("SIGNALING_REUSE_PORT", "on")
    monkeypatch.setenv("SIGNALING_STATS_HIDE_IP", "0")
    monkeypatch.setenv("SIGNALING_ORIGIN", "https://a.example,https://b.example  https://c.example")
    monkeypatch.setenv("SIGNALING_TRUSTED_PROXY", "10.0.0.0/8 unix")
    monkeypatch.setenv("SIGNALING_NOT_AN_OPTION", "x")  # ignored
    o = parse("--burst=4")
    assert (o["rate"], o["burst"], o["reuse-port"], o["stats-hide-ip"]) == (3.0, 4, 1, 0)
    assert o["origins"] == ["https://a.example", "https://b.example", "https://c.example"]
    assert [str(p) for p in o["trusted-proxies"]] == ["10.0.0.0/8", "unix"]
    o = parse("--origin=https://d.example")  # given on the command line: the variable is not used
    assert o["origins"] == ["https://d.example"]
    monkeypatch.setenv("SIGNALING_REUSE_PORT", "maybe")
    with pytest.raises(usage.UsageError) as e:
        parse()
    assert "SIGNALING_REUSE_PORT must be true or false" in str(e.value)
    monkeypatch.setenv("SIGNALING_REUSE_PORT", "")
    monkeypatch.setenv("SIGNALING_PING_INTERVAL", "-1")
    with pytest.raises(usage.UsageError) as e:
        parse()
    assert "--ping-interval must not be negative, got '-1' (from the environment: SIGNALING_PING_INTERVAL)" in str(
        e.value)


def test_configuration_table_lists_every_option():
    """docs/configuration.rst's one table has a row for every option, with its variable."""
    import os

    from signaling.tap import env_name

    doc = open(os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.rst"), encoding="utf-8").read()
    rows = {m for m in re.findall(r"^   \* - ``--([a-z0-9-]+)``", doc, re.M)}
    names = {name for name, _ in SignalingOptions.option_kinds()}
    assert rows == names
    for name in names:
        assert f"``{env_name(name)}``" in doc, name


def test_peerjs_options_and_wiring(monkeypatch):
    """PeerJS is served at /peerjs by default (key peerjs, 5 s); its options and --no-peerjs turn it."""
    from signaling.peerjs_protocol import PeerJSProtocol

    service = makeService(parse(), MemoryReactorClock())
    factory = service.factory
    assert factory.wire_formats["/peerjs"] is PeerJSProtocol
    assert (factory.peerjs.key, factory.peerjs.pending.timeout) == ("peerjs", 5.0)
    monkeypatch.setenv("SIGNALING_PEERJS_KEY", "my-app")
    factory = makeService(parse("--peerjs-expire-timeout=2.5"), MemoryReactorClock()).factory
    assert (factory.peerjs.key, factory.peerjs.pending.timeout) == ("my-app", 2.5)
    factory = makeService(parse("--no-peerjs"), MemoryReactorClock()).factory
    assert "/peerjs" not in factory.wire_formats and not hasattr(factory, "peerjs")
    factory = makeService(parse("--no-peerjs", "--no-yjs"), MemoryReactorClock()).factory
    assert factory.wire_formats == {}
    for argv, needle in [(["--peerjs-key="], "--peerjs-key must not be empty"),
                         (["--peerjs-expire-timeout=0"], "--peerjs-expire-timeout must be positive")]:
        with pytest.raises(usage.UsageError) as e:
            parse(*argv)
        assert needle in str(e.value)
