"""
Does polling the stats delay relays?  With N idle users open, a few good
pairs relay at a fixed modest rate; their one-way latency is measured
quiet, then while pollers fetch /api/stats (and /metrics, /api/dashboard)
as fast as they can.

    python bench/stats_poll.py                         # 10,000 users, 8 pollers, every path and form
    python bench/stats_poll.py --python OTHER/bin/python --forms close
    python bench/stats_poll.py --users 2000 --seconds 4 --paths /api/stats --forms gzip
    python bench/stats_poll.py --server-arg=--stats-rate=0   # without the pacing per address

Processes: the installed server pinned to core 0 (``bench/_server.py``,
its measured configuration); on core 1 the load generator holding the idle
users (``loadgen.py idle``), the one measuring the pairs (``loadgen.py
rate``), and the pollers (this file, ``poll``), SCHED_IDLE
(``--poller-sched``) so that the pairs' generator runs first.  ``--churn
R`` adds users opening and closing R times a second during every phase, so
that the registry keeps changing.

Poller forms:

- ``close``: a new connection per request, no compression (what urllib
  does; the only form a server before the stats work answers in full with
  this many users: it aborts kept-alive connections whose response waits
  unsent);
- ``plain``: kept-alive connections, no compression, no validators;
- ``gzip``: kept-alive, ``Accept-Encoding: gzip``;
- ``etag``: kept-alive, gzip, and ``If-None-Match`` with the last ETag.

Every phase runs ``--rounds`` times, the phases interleaved (this machine
is shared: a noisy minute then spoils one round of each, not one phase).
The summary: per phase the medians over the rounds of the pairs' latency
(p50/p99/p99.9/max, ms), each round's p99, messages not received, the
pollers' requests/s and MB/s, the server's CPU use, and the ratio of the
median p99 to the quiet one.  ``--out`` keeps every round.
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _server import MEASURED, Server, pinned, run_loadgen  # noqa: E402

FORMS = ("close", "plain", "gzip", "etag")
PATHS = ("/api/stats", "/metrics", "/api/dashboard")


# -- the pollers (a process of their own) ----------------------------------------


async def read_response(reader):
    """Read one HTTP/1.1 response; return (status, headers, body length, connection closes)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    closes = headers.get("connection", "").lower() == "close"
    length = 0
    if status in (204, 304):
        pass
    elif "content-length" in headers:
        length = int(headers["content-length"])
        await reader.readexactly(length)
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            length += size
            if size == 0:
                break
    else:
        length = len(await reader.read())
        closes = True
    return status, headers, length, closes


async def poller(host, port, path, form, stop_at, tally):
    etag = None
    while time.perf_counter() < stop_at:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            tally["connect_failed"] += 1
            await asyncio.sleep(0.01)
            continue
        try:
            while time.perf_counter() < stop_at:
                head = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}"]
                if form == "close":
                    head.append("Connection: close")
                if form in ("gzip", "etag"):
                    head.append("Accept-Encoding: gzip")
                if form == "etag" and etag:
                    head.append(f"If-None-Match: {etag}")
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
                status, headers, length, closes = await read_response(reader)
                tally[str(status)] += 1
                tally["bytes"] += length
                tally["requests"] += 1
                etag = headers.get("etag", etag)
                if closes or form == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            tally["dropped"] += 1
        finally:
            writer.close()


async def poll_main(args):
    tally = Counter()
    started = time.perf_counter()
    stop_at = started + args.seconds
    await asyncio.gather(*(poller(args.host, args.port, args.path, args.form, stop_at, tally)
                           for _ in range(args.pollers)))
    elapsed = time.perf_counter() - started
    return {"path": args.path, "form": args.form, "pollers": args.pollers,
            "requests_per_s": round(tally["requests"] / elapsed, 1),
            "mb_per_s": round(tally["bytes"] / elapsed / 1e6, 2),
            "answers": {k: v for k, v in sorted(tally.items()) if k not in ("bytes", "requests")}}


def poll_cli(argv):
    parser = argparse.ArgumentParser(prog="stats_poll.py poll")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/api/stats")
    parser.add_argument("--form", choices=FORMS, default="plain")
    parser.add_argument("--pollers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every phase, interleaved")
    parser.add_argument("--sched", choices=("idle", "nice"), default="idle",
                        help="SCHED_IDLE, or only niced (the benchmark's --poller-sched)")
    args = parser.parse_args(argv)
    if args.pollers > 64 or args.seconds > 120:
        parser.error("bounded: --pollers <= 64, --seconds <= 120")
    os.nice(10)
    if args.sched == "idle" and hasattr(os, "SCHED_IDLE"):
        # On the generators' core, the pairs' generator must run the moment it
        # is woken: a niced poller still holds the core for a millisecond or
        # more now and then when the generator's timer fires (its message is
        # then sent late, and counted as the server's latency; measured: 99 of
        # the 148 relays over 0.5 ms in a 10 s phase, the server idle
        # meanwhile).  A SCHED_IDLE process gives way at once.
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    print(json.dumps(asyncio.run(poll_main(args))), flush=True)


# -- the benchmark ---------------------------------------------------------------


def start_pollers(server, path, form, pollers, seconds, sched="idle"):
    argv = [sys.executable, os.path.abspath(__file__), "poll", "--port", str(server.ports["http"]),
            "--path", path, "--form", form, "--pollers", str(pollers), "--seconds", str(seconds),
            "--sched", sched]
    return subprocess.Popen(pinned(1, argv), stdout=subprocess.PIPE, text=True)


def probe(server, timeout=10.0):
    """The server's reactor turns since the last call (bench/_probe.py), or None without --probe."""
    if not getattr(server, "probed", False):
        return None
    seen = server.line_count
    server.proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in server.lines[-(server.line_count - seen):] if server.line_count > seen else []:
            if "probe {" in line:
                return json.loads(line.split("probe ", 1)[1])
        time.sleep(0.05)  # (a benchmark: waiting for the server's line)
    return None


def users(server):
    """How many users the server has (the idle ones must all be there for a phase to count)."""
    import urllib.request

    with urllib.request.urlopen(server.http + "/api/stats", timeout=60) as response:
        return json.loads(response.read())["connectedUsers"]


def measure(server, args, pollers=None):
    """One phase: the pairs at a fixed rate (and the pollers, if given, started first)."""
    phase = {"users_before": users(server)}
    probe(server)  # (counting from here)
    proc = churn = None
    span = args.seconds + args.warmup + 2.0  # the pairs' generator connects and pairs first
    if args.churn:
        churn = subprocess.Popen(pinned(1, [sys.executable, os.path.join(HERE, "loadgen.py"), "churn", server.ws,
                                            "--rate", str(args.churn), "--seconds", str(span)]),
                                 stdout=subprocess.PIPE, text=True)
    if pollers is not None:
        path, form = pollers
        target = getattr(args, "control_server", None) or server  # (--control: another server takes the polls)
        proc = start_pollers(target, path, form, args.pollers, span, args.poller_sched)
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    phase["pairs"] = run_loadgen("rate", server.ws, "--pairs", str(args.pairs), "--rate", str(args.rate),
                                 "--seconds", str(args.seconds), "--warmup", str(args.warmup), core=1)
    phase["server_cpu_busy"] = round((server.cpu_seconds() - cpu0) / (time.monotonic() - t0), 2)
    if proc is not None:
        out, _ = proc.communicate(timeout=span + 60)
        phase["pollers"] = json.loads(out.strip().splitlines()[-1])
    if churn is not None:
        out, _ = churn.communicate(timeout=span + 60)
        phase["churn"] = json.loads(out.strip().splitlines()[-1])
    turns = probe(server)
    if turns is not None:
        phase["reactor_turns"] = turns
    phase["users_after"] = users(server)
    if min(phase["users_before"], phase["users_after"]) < args.users:
        raise SystemExit(f"idle users lost: {phase['users_before']} -> {phase['users_after']} of {args.users}")
    return phase


def hold_idle(server, n):
    """Open n idle users from a load generator; return it (kill it to close them)."""
    gen = subprocess.Popen(pinned(1, [sys.executable, os.path.join(HERE, "loadgen.py"), "idle", server.ws,
                                      "-n", str(n), "--hold", "3600"]), stdout=subprocess.PIPE, text=True)
    opened = json.loads(gen.stdout.readline())["open"]
    if opened != n:
        raise SystemExit(f"only {opened} of {n} idle users opened")
    return gen


def document_size(server, path):
    import urllib.request

    with urllib.request.urlopen(server.http + path, timeout=60) as response:
        return len(response.read())


def median(values):
    values = sorted(values)
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def run(args):
    report = {"users": args.users, "pairs": args.pairs, "rate": args.rate, "pollers": args.pollers,
              "server_args": args.server_arg, "poller_sched": args.poller_sched, "rounds": args.rounds,
              "seconds": args.seconds,
              "churn_per_s": args.churn, "python": args.python or sys.executable, "phases": {}}
    if args.probe:  # twistd with a probe of the reactor's turns
        python = args.python or sys.executable
        argv = [python, os.path.join(HERE, "_probe.py"), "-n", "--pidfile=", "signaling",
                "--http=tcp:0:interface=127.0.0.1", "--ws=tcp:0:interface=127.0.0.1", *MEASURED, *args.server_arg]
        server = Server(core=0, argv=argv)
        server.probed = True
    else:
        server = Server(*MEASURED, *args.server_arg, core=0, python=args.python)
    idle = None
    phases = report["phases"]
    try:
        idle = hold_idle(server, args.users)
        if args.control:
            args.control_server = Server(*MEASURED, "--stats-rate=0", core=1)
        report["stats_bytes"] = document_size(server, "/api/stats")
        names = ["quiet"] + [f"{path} {form}" for path in args.paths for form in args.forms]
        for r in range(args.rounds):  # interleaved, so that a noisy minute spoils one round of each, not one phase
            for name in names:
                pollers = None if name == "quiet" else tuple(name.split(" "))
                phase = measure(server, args, pollers)
                phases.setdefault(name, []).append(phase)
                print(json.dumps({"round": r, name: phase}), flush=True)
        report["server_rss_kib"] = server.rss_kib()
        report["server_alive"] = server.alive()
    finally:
        if idle is not None:
            idle.terminate()
            idle.wait(60)
        if getattr(args, "control_server", None) is not None:
            args.control_server.stop()
        server.stop()
    summary = report["summary"] = {}
    for name, runs in phases.items():
        lat = [p["pairs"]["latency_ms"] for p in runs]
        summary[name] = {k: round(median([x[k] for x in lat]), 3) for k in ("p50", "p99", "p999", "max")}
        summary[name]["p99_rounds"] = [x["p99"] for x in lat]
        summary[name]["lost"] = sum(p["pairs"]["sent"] - p["pairs"]["received"] for p in runs)
        if runs[0].get("pollers"):
            summary[name]["requests_per_s"] = round(median([p["pollers"]["requests_per_s"] for p in runs]), 1)
            summary[name]["mb_per_s"] = round(median([p["pollers"]["mb_per_s"] for p in runs]), 2)
        summary[name]["server_cpu_busy"] = round(median([p["server_cpu_busy"] for p in runs]), 2)
        if "reactor_turns" in runs[0]:
            turns = [p["reactor_turns"]["cpu_ms"] for p in runs]
            summary[name]["turn_cpu_ms"] = {k: round(median([t[k] for t in turns]), 3) for k in ("p99", "p999", "max")}
            summary[name]["turns_over_1ms"] = [t["over_1ms"] for t in turns]
            summary[name]["reactor_busy_s"] = [t["total_s"] for t in turns]
    quiet = summary["quiet"]["p99"]
    for name in summary:
        summary[name]["p99_ratio"] = round(summary[name]["p99"] / quiet, 2)
    return report


def main():
    if sys.argv[1:2] == ["poll"]:
        return poll_cli(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=None, help="the server's interpreter (a venv with the server installed)")
    parser.add_argument("--users", type=int, default=10000)
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--rate", type=float, default=1000.0, help="the pairs' total messages/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every phase, interleaved")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--pollers", type=int, default=8)
    parser.add_argument("--churn", type=float, default=0.0, help="users opening and closing per second")
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--forms", default="close,plain,gzip,etag")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="another option for the server (repeatable), e.g. --server-arg=--stats-rate=0")
    parser.add_argument("--probe", action="store_true",
                        help="run the server under bench/_probe.py: the CPU time of its reactor's turns, per phase")
    parser.add_argument("--control", action="store_true",
                        help="a control: the pollers poll another server (on core 1, without users, unpaced), "
                             "so that only their own process's load is measured")
    parser.add_argument("--poller-sched", choices=("idle", "nice"), default="idle",
                        help="the pollers' scheduling on the generators' core: SCHED_IDLE (they give way "
                             "to the pairs' generator at once), or only niced (as before 2026-12-07)")
    parser.add_argument("--out", default=None, help="also write the report to this file")
    args = parser.parse_args()
    args.paths = [p for p in args.paths.split(",") if p]
    args.forms = [f for f in args.forms.split(",") if f]
    if any(f not in FORMS for f in args.forms):
        parser.error(f"forms: {', '.join(FORMS)}")
    if args.users > 15000 or args.seconds > 60 or args.pollers > 64 or args.rounds > 10:
        parser.error("bounded: --users <= 15000, --seconds <= 60, --pollers <= 64, --rounds <= 10")
    report = run(args)
    print(json.dumps(report["summary"], indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
