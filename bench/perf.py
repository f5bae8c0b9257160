"""
The performance harness: runs our server, PeerJS server 1.0 (Node) and the
naive baseline relay side by side in one invocation, each pinned to core 0
with the load generator (its own process) on core 1 where ``taskset``
exists, and writes the results as JSON and a chart.

    python bench/perf.py                      # everything, Node generator, ~4 minutes
    python bench/perf.py --quick              # shorter runs
    python bench/perf.py --generator picows   # bench/loadgen.py (picows) as the generator
    python bench/perf.py --generator both     # both, one after the other
    python bench/perf.py --only relay_p50_w1,relay_p100_w4,burst_5000_c100 --rounds 3
    python bench/perf.py --out docs/perf      # -> docs/perf.json, docs/perf.png

Generators: ``node`` is ``bench/node/loadgen.mjs`` (Node and ``ws``; its
packages are installed by ``npm ci`` in bench/node on first use), ``picows``
is ``bench/loadgen.py``.  Both speak our protocol and PeerJS server's, run
the same scenarios, and mark the measured part of a run, where the
servers' CPU time and the load on both cores are read.

Servers: ``ours`` in its measured configuration (every protection on: size
and rate limits, connection limits, keepalive, outbound cap; the limits a
single load-generating host needs raised, see docs/performance.rst; the
per-relay log line off; ``twistd -r signaling-epoll``); ``peerjs``, PeerJS server 1.0 with its own CLI
(``peerjs --port P``, its one limit, 5,000 concurrent peers, raised as
ours are); ``baseline``, a naive twenty-line Autobahn relay.

The machine may be shared: every run records the CPU time that other
processes took on the two cores while it was measured (``foreign_busy``);
``--max-foreign`` repeats a run that was disturbed (``--retries`` times at
most) and keeps the least disturbed.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _node  # noqa: E402
from _server import MEASURED, MEASURED_TWISTD, Server, pinned  # noqa: E402

SERVERS = ("ours", "peerjs", "baseline")
SERVER_CORE, GENERATOR_CORE = 0, 1

#: scenario name -> (generator arguments, whether it needs a fresh server)
SCENARIOS = {
    "relay_p50_w1": (["relay", "--pairs", "50", "--inflight", "1"], False),
    "relay_p50_w8": (["relay", "--pairs", "50", "--inflight", "8"], False),
    "relay_p100_w4": (["relay", "--pairs", "100", "--inflight", "4"], False),
    "relay_p200_w4": (["relay", "--pairs", "200", "--inflight", "4"], False),
    "rate_p50_2000": (["rate", "--pairs", "50", "--rate", "2000"], False),
    "burst_5000_c100": (["burst", "-n", "5000", "-c", "100"], True),
    "burst_10000_c200": (["burst", "-n", "10000", "-c", "200"], True),
    "idle": (None, True),
}


# -- the machine ------------------------------------------------------------------------


def core_ticks():
    """Per core: (busy, total) clock ticks since boot, from /proc/stat (busy includes steal)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *fields = line.split()
                ticks = [int(x) for x in fields[:8]]
                idle = ticks[3] + ticks[4]
                out[name] = (sum(ticks) - idle, sum(ticks))
    return out


def process_ticks(pid):
    """User plus system clock ticks of a process (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


class Sample:
    """The cores' and our processes' CPU time at one moment."""

    def __init__(self, server_pid, generator_pid):
        self.at = time.monotonic()
        self.cores = core_ticks()
        self.server = process_ticks(server_pid)
        self.generator = process_ticks(generator_pid)

    def since(self, before):
        """CPU use between two samples: our server's, the generator's, and what others took on each core."""
        hz = os.sysconf("SC_CLK_TCK")
        wall = self.at - before.at
        server = (self.server - before.server) / hz / wall
        generator = (self.generator - before.generator) / hz / wall
        ours = {f"cpu{SERVER_CORE}": server, f"cpu{GENERATOR_CORE}": generator}
        foreign = {}
        for core, (busy, total) in self.cores.items():
            b0, t0 = before.cores[core]
            share = (busy - b0) / max(1, total - t0)
            foreign[core] = round(max(0.0, share - ours.get(core, 0.0)), 2)
        return {"wall_s": round(wall, 2), "server": round(server, 3), "generator": round(generator, 3),
                "foreign": foreign}


def wait_quiet(limit_s, threshold=0.15):
    """Wait (at most ``limit_s``) until no core is busier than ``threshold`` over half a second."""
    deadline = time.monotonic() + limit_s
    while True:
        before = core_ticks()
        time.sleep(0.5)
        after = core_ticks()
        busiest = max((after[c][0] - before[c][0]) / max(1, after[c][1] - before[c][1]) for c in after)
        if busiest <= threshold or time.monotonic() >= deadline:
            return round(busiest, 2)


# -- servers and generators -------------------------------------------------------------


def start(name, args):
    """
    A server pinned to core 0: ours or the baseline on ``args.python``
    (default: this interpreter; ours also ``args.ours_python``, e.g. another
    venv's, for a before/after), or PeerJS's.
    """
    python = args.python
    if name == "ours":
        return Server(*MEASURED, core=SERVER_CORE, python=args.ours_python or python, twistd=ours_twistd(args))
    if name == "peerjs":
        return _node.PeerJSServer(core=SERVER_CORE)
    return Server(core=SERVER_CORE, argv=[python or sys.executable, os.path.join(HERE, "baseline_server.py")])


def ours_twistd(args):
    return [] if args.ours_reactor == "default" else ["-r", args.ours_reactor]


def target(name, server, args):
    """(URL, protocol) the generator uses for server ``name``."""
    if name == "peerjs":
        return server.ws, "peerjs"
    if name == "ours" and args.ours_protocol == "peerjs":
        return server.ws + "peerjs", "peerjs"
    return server.ws, "native"


def generator_argv(generator, scenario_args, url, protocol):
    scenario, *options = scenario_args
    if generator == "node":
        return pinned(GENERATOR_CORE, _node.loadgen_argv(scenario, url, *options, protocol=protocol))
    return pinned(GENERATOR_CORE, [sys.executable, os.path.join(HERE, "loadgen.py"), scenario, url, *options,
                                   "--protocol", protocol])


def run_generator(generator, scenario_args, url, protocol, server, timeout=600):
    """
    Run one scenario and return the generator's report, with ``cpu_busy``
    (the server's and the generator's CPU time over the whole run, setup
    included, as fractions of its wall time: whichever is near 1.0 is the
    bottleneck) and ``measured`` (the same over the measured part only, with
    the load other processes put on each core, and the server's CPU time
    per message or per connection).
    """
    started = time.monotonic()
    server_ticks = process_ticks(server.proc.pid)
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen(generator_argv(generator, scenario_args, url, protocol), stdout=subprocess.PIPE,
                                stderr=err, text=True)
        watchdog = threading.Timer(timeout, proc.kill)
        watchdog.start()
        marks, result = {}, None
        try:
            for line in proc.stdout:
                msg = json.loads(line)
                if "phase" in msg:
                    marks[msg["phase"]] = Sample(server.proc.pid, proc.pid)
                else:
                    result = msg
            generator_ticks = process_ticks(proc.pid)  # (still there until reaped)
            proc.wait()
        finally:
            watchdog.cancel()
        if proc.returncode != 0 or result is None:
            err.seek(0)
            raise SystemExit(f"{generator} generator failed ({proc.returncode}): {err.read()[-2000:]}")
    wall = time.monotonic() - started
    hz = os.sysconf("SC_CLK_TCK")
    result["cpu_busy"] = {"server": round((process_ticks(server.proc.pid) - server_ticks) / hz / wall, 2),
                          "generator": round(generator_ticks / hz / wall, 2)}
    if "measuring" in marks and "measured" in marks:
        measured = marks["measured"].since(marks["measuring"])
        rate = result.get("messages_per_s") or result.get("connections_per_s")
        if rate:
            unit = "server_us_per_message" if "messages_per_s" in result else "server_us_per_connection"
            measured[unit] = round(measured["server"] / rate * 1e6, 2)
        result["measured"] = measured
    return result


def idle_rss(name, server, generator, args):
    """Open ``args.idle`` idle connections; return the server's RSS per connection (KiB)."""
    url, protocol = target(name, server, args)
    before = server.rss_kib()
    argv = generator_argv(generator, ["idle", "-n", str(args.idle), "--hold", "600"], url, protocol)
    gen = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        line = gen.stdout.readline()  # printed once every connection is open
        opened = json.loads(line)["open"]
        time.sleep(1)  # let the server settle before reading its memory (a benchmark)
        during = server.rss_kib()
    finally:
        gen.terminate()
        gen.wait(60)
    return {"connections": opened, "rss_before_kib": before, "rss_open_kib": during,
            "kib_per_connection": round((during - before) / opened, 2)}


def disturbance(result):
    measured = result.get("measured")
    return max(measured["foreign"].values()) if measured else 0.0


def measure(name, scenario, server, generator, args):
    """One scenario on a running server, repeated while other processes disturbed it (see --max-foreign)."""
    base, _ = SCENARIOS[scenario]
    timing = ["--seconds", args.seconds, "--warmup", str(args.warmup)] if base[0] in ("relay", "rate") else []
    url, protocol = target(name, server, args)
    best = None
    for attempt in range(1, args.retries + 2):
        if args.wait_quiet:
            wait_quiet(args.wait_quiet)
        result = run_generator(generator, [*base, *timing], url, protocol, server)
        result["attempt"] = attempt
        if best is None or disturbance(result) < disturbance(best):
            best = result
        if disturbance(result) <= args.max_foreign:
            break
    return best


def run_server(name, generator, args, scenarios):
    """Every selected scenario against one server: the steady ones on one process, the others on fresh ones."""
    out = {}
    steady = [s for s in scenarios if not SCENARIOS[s][1]]
    if steady:
        server = start(name, args)
        try:
            for scenario in steady:
                out[scenario] = measure(name, scenario, server, generator, args)
            out["rss_after_relays_kib"] = server.rss_kib()
        finally:
            server.stop()
    for scenario in scenarios:
        if not SCENARIOS[scenario][1]:
            continue
        server = start(name, args)  # a fresh process for each connection scenario
        try:
            if scenario == "idle":
                out["idle"] = idle_rss(name, server, generator, args)
            else:
                out[scenario] = measure(name, scenario, server, generator, args)
        finally:
            server.stop()
    return out


def headline(result):
    """The figure a round is ranked by: messages/s, connections/s or (rate) -p99."""
    if not isinstance(result, dict):
        return result
    for key in ("messages_per_s", "connections_per_s", "kib_per_connection"):
        if key in result:
            return result[key]
    if "latency_ms" in result:
        return -result["latency_ms"]["p99"]
    return 0


def summarise(rounds):
    """
    Several rounds of one server's scenarios -> one: the median round of
    each scenario (by its headline figure), with every round's figures and
    their range.
    """
    if len(rounds) == 1:
        return rounds[0]
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if key in r]
        if not isinstance(values[0], dict):
            out[key] = statistics.median(values)
            continue
        ranked = sorted(values, key=headline)
        median = dict(ranked[(len(ranked) - 1) // 2])
        median["rounds"] = [compact(v) for v in values]
        out[key] = median
    return out


def compact(result):
    """The figures of one round worth keeping beside the median."""
    keep = {}
    for key in ("messages_per_s", "connections_per_s", "kib_per_connection", "latency_ms", "welcome_ms"):
        if key in result:
            keep[key] = result[key]
    if "measured" in result:
        keep["server_cpu"] = result["measured"]["server"]
        keep["foreign"] = result["measured"]["foreign"]
    return keep


def ratios(runs, a, b):
    """``a`` against ``b``: throughput ratios (relays, bursts) and p99 ratios (lower is better for ``a``)."""
    out = {}
    if a not in runs or b not in runs:
        return out
    for key, ra in runs[a].items():
        rb = runs[b].get(key)
        if not isinstance(ra, dict) or not isinstance(rb, dict):
            continue
        for rate, lat in (("messages_per_s", "latency_ms"), ("connections_per_s", "welcome_ms")):
            if rate in ra and rb.get(rate):
                out[key] = {"throughput": round(ra[rate] / rb[rate], 2),
                            "p99": round(ra[lat]["p99"] / rb[lat]["p99"], 2) if rb[lat]["p99"] else None}
    return out


def run_generator_suite(generator, args, scenarios):
    names = [n for n in args.servers if n != "peerjs" or shutil.which("node")]
    rounds = {name: [] for name in names}
    for round_no in range(args.rounds):
        for name in names:  # alternated, so that a slow spell of the machine hits every server
            rounds[name].append(run_server(name, generator, args, scenarios))
            print(json.dumps({"generator": generator, "round": round_no + 1, name: rounds[name][-1]}), flush=True)
    runs = {name: summarise(r) for name, r in rounds.items()}
    out = {"runs": runs}
    if "ours" in runs and "baseline" in runs:  # (the original key: relay throughput, ours / baseline)
        out["ratios"] = {k: v["throughput"] for k, v in ratios(runs, "ours", "baseline").items()
                         if k.startswith("relay_")}
    if "ours" in runs and "peerjs" in runs:
        out["ratios_vs_peerjs"] = ratios(runs, "ours", "peerjs")
    return out


def runtime(python):
    out = subprocess.run([python or sys.executable, "-c", "import platform; "
                          "print(platform.python_implementation(), platform.python_version())"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_all(args):
    scenarios = [s for s in SCENARIOS if s in args.only] if args.only else list(SCENARIOS)
    generators = ["node", "picows"] if args.generator == "both" else [args.generator]
    machine = {"python": runtime(args.python), "cores": os.cpu_count(), "taskset": bool(shutil.which("taskset"))}
    if "node" in generators or "peerjs" in args.servers:
        _node.ensure_installed()
        machine.update(_node.versions())
    machine["load_generator"] = {"node": f"Node {machine.get('node')} + ws {machine.get('ws')}",
                                 "picows": runtime(None) + " + picows"}[generators[0]]
    results = {"machine": machine, "generator": generators[0], "ours_options": MEASURED,
               "ours_twistd_options": ours_twistd(args), "ours_python": runtime(args.ours_python or args.python),
               "peerjs_options": _node.PEERJS_OPTIONS, "rounds": args.rounds, "seconds": float(args.seconds)}
    for i, generator in enumerate(generators):
        suite = run_generator_suite(generator, args, scenarios)
        if i == 0:
            results.update(suite)
        else:
            results.setdefault("by_generator", {})[generator] = suite
    return results


# -- the chart ----------------------------------------------------------------------------------

LABELS = {"ours": "signaling", "peerjs": "PeerJS server 1.0 (Node)", "baseline": "naive Autobahn relay"}


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    names = [n for n in SERVERS if n in runs]
    relays = [k for k in SCENARIOS if k.startswith("relay_") and all(k in runs[n] for n in names)]
    bursts = [k for k in SCENARIOS if k.startswith("burst_") and all(k in runs[n] for n in names)]
    width = 0.8 / len(names)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for i, name in enumerate(names):
        offset = (i - (len(names) - 1) / 2) * width
        axes[0].bar([x + offset for x in range(len(relays))], [runs[name][k]["messages_per_s"] for k in relays],
                    width, label=LABELS[name], color=f"C{i}")
        axes[1].bar([x + offset for x in range(len(relays))],
                    [runs[name][k]["latency_ms"]["p99"] for k in relays], width, color=f"C{i}")
        axes[2].bar([x + offset for x in range(len(bursts))], [runs[name][k]["connections_per_s"] for k in bursts],
                    width, color=f"C{i}")
    for ax, keys in ((axes[0], relays), (axes[1], relays), (axes[2], bursts)):
        ax.set_xticks(list(range(len(keys))), [k.split("_", 1)[1] for k in keys])
    axes[0].set_title("relay throughput (messages/s)")
    axes[0].legend(fontsize=8)
    axes[1].set_title("relay one-way latency p99 (ms)")
    axes[2].set_title("connection bursts (connections/s)")
    fig.suptitle(f"{results['machine']['python']} and Node {results['machine'].get('node', '?')}, "
                 f"server on core 0, load generator ({results['generator']}) on core 1")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    parser.add_argument("--quick", action="store_true", help="2 s per relay instead of 5")
    parser.add_argument("--generator", choices=["node", "picows", "both"], default="node")
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, from: " + ", ".join(SERVERS))
    parser.add_argument("--only", default="", help="comma-separated scenarios, from: " + ", ".join(SCENARIOS))
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything, servers alternated; "
                        "each figure is then the median round, with every round's figures kept")
    parser.add_argument("--ours-reactor", default=MEASURED_TWISTD[1],
                        help="twistd -r for our server (default: %(default)s; 'default': Twisted's own)")
    parser.add_argument("--ours-python", default=None,
                        help="interpreter (of a venv with the server installed) to run our server on, e.g. an older "
                             "version's, for a before/after")
    parser.add_argument("--ours-protocol", choices=["native", "peerjs"], default="native",
                        help="the protocol the generator speaks to our server (peerjs: at /peerjs)")
    parser.add_argument("--burst", type=int, default=None, help="(kept for old command lines; ignored)")
    parser.add_argument("--idle", type=int, default=10000)
    parser.add_argument("--python", default=None,
                        help="interpreter to run our server and the baseline on (e.g. a PyPy venv's python, with "
                             "the server installed there); the picows generator runs on this one")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (a JIT needs more)")
    parser.add_argument("--max-foreign", type=float, default=1.0,
                        help="repeat a run if other processes took more than this share of a core while it was "
                             "measured (default 1.0: never)")
    parser.add_argument("--retries", type=int, default=2, help="at most this many repeats of a disturbed run")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="before each run, wait up to this many seconds for both cores to be quiet")
    args = parser.parse_args()
    args.seconds = "2" if args.quick else "5"
    args.servers = [s for s in args.servers.split(",") if s]
    args.only = [s for s in args.only.split(",") if s]
    unknown = [s for s in args.servers if s not in SERVERS] + [s for s in args.only if s not in SCENARIOS]
    if unknown or not 1 <= args.rounds <= 10:
        parser.error(f"unknown server or scenario: {unknown}" if unknown else "--rounds: 1 to 10")
    results = run_all(args)
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=2)
        chart(results, args.out + ".png")


if __name__ == "__main__":
    main()
