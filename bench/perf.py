"""
The performance harness: runs our server and the naive baseline relay side
by side in one invocation, each pinned to core 0 with the load generator
(bench/loadgen.py, picows, its own process) on core 1 where ``taskset``
exists, and writes the results as JSON and a chart.

    python bench/perf.py                      # everything, ~2 minutes
    python bench/perf.py --quick              # shorter runs
    python bench/perf.py --out docs/perf      # -> docs/perf.json, docs/perf.png

Our server runs in its measured configuration: every protection on (size
and rate limits, connection limits, keepalive, outbound cap), with the
limits that a single load-generating host needs raised (see
docs/performance.rst) and the per-relay log line off.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _server import MEASURED, Server, pinned, run_loadgen  # noqa: E402


def start(name, python=None):
    """Our server or the baseline, pinned to core 0, on ``python`` (default: this interpreter)."""
    if name == "ours":
        return Server(*MEASURED, core=0, python=python)
    return Server(core=0, argv=[python or sys.executable, os.path.join(HERE, "baseline_server.py")])


def loadgen(*args, server=None):
    """
    Run one scenario; with ``server``, also report the CPU time the server
    and the generator used over the whole run (setup included), as
    fractions of its wall time: whichever is near 1.0 is the bottleneck.
    """
    started, server_cpu = time.monotonic(), server.cpu_seconds() if server else 0.0
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = run_loadgen(*args, core=1)
    if server is not None:
        wall = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        generator = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
        result["cpu_busy"] = {"server": round((server.cpu_seconds() - server_cpu) / wall, 2),
                              "generator": round(generator / wall, 2)}
    return result


def idle_rss(server, n):
    """Open n idle connections from a load generator; return the server's RSS per connection (KiB)."""
    before = server.rss_kib()
    gen = subprocess.Popen(pinned(1, [sys.executable, os.path.join(HERE, "loadgen.py"), "idle", server.ws,
                                      "-n", str(n), "--hold", "600"]),
                           stdout=subprocess.PIPE, text=True)
    line = gen.stdout.readline()  # printed once every connection is welcomed
    opened = json.loads(line)["open"]
    time.sleep(1)  # let the server settle before reading its memory (a benchmark)
    during = server.rss_kib()
    gen.terminate()
    gen.wait(60)
    return {"connections": opened, "rss_before_kib": before, "rss_open_kib": during,
            "kib_per_connection": round((during - before) / opened, 2)}


def runtime(python):
    out = subprocess.run([python or sys.executable, "-c", "import platform; "
                          "print(platform.python_implementation(), platform.python_version())"],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def run_all(args):
    seconds = "2" if args.quick else "5"
    timing = ["--seconds", seconds, "--warmup", str(args.warmup)]
    results = {"machine": {"python": runtime(args.python), "load_generator": runtime(None),
                           "cores": os.cpu_count(), "taskset": bool(shutil.which("taskset"))},
               "ours_options": MEASURED, "runs": {}}
    for name in ("ours", "baseline"):
        r = results["runs"][name] = {}
        server = start(name, args.python)
        try:
            for pairs, inflight in ((50, 1), (50, 8), (200, 4)):
                r[f"relay_p{pairs}_w{inflight}"] = loadgen("relay", server.ws, "--pairs", str(pairs),
                                                            "--inflight", str(inflight), *timing, server=server)
            r["rate_p50_2000"] = loadgen("rate", server.ws, "--pairs", "50", "--rate", "2000", *timing)
            r["rss_after_relays_kib"] = server.rss_kib()
        finally:
            server.stop()
        server = start(name, args.python)  # fresh process for the connection scenarios
        try:
            r["burst_10000_c200"] = loadgen("burst", server.ws, "-n", str(args.burst), "-c", "200")
        finally:
            server.stop()
        server = start(name, args.python)
        try:
            r["idle"] = idle_rss(server, args.idle)
        finally:
            server.stop()
        print(json.dumps({name: r}), flush=True)
    ours, base = results["runs"]["ours"], results["runs"]["baseline"]
    results["ratios"] = {
        k: round(ours[k]["messages_per_s"] / base[k]["messages_per_s"], 2)
        for k in ours if k.startswith("relay_")
    }
    return results


def chart(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours, base = results["runs"]["ours"], results["runs"]["baseline"]
    relays = [k for k in ours if k.startswith("relay_")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    x = range(len(relays))
    axes[0].bar([i - 0.2 for i in x], [ours[k]["messages_per_s"] for k in relays], 0.4, label="signaling")
    axes[0].bar([i + 0.2 for i in x], [base[k]["messages_per_s"] for k in relays], 0.4, label="naive baseline")
    axes[0].set_xticks(list(x), [k.replace("relay_", "") for k in relays])
    axes[0].set_title("relay throughput (messages/s)")
    axes[0].legend()
    for i, key in enumerate(("p50", "p99", "p999")):
        axes[1].bar(i - 0.2, ours["rate_p50_2000"]["latency_ms"][key], 0.4, color="C0")
        axes[1].bar(i + 0.2, base["rate_p50_2000"]["latency_ms"][key], 0.4, color="C1")
    axes[1].set_xticks([0, 1, 2], ["p50", "p99", "p99.9"])
    axes[1].set_title("latency at 2,000 msg/s, 50 pairs (ms)")
    axes[2].bar([0, 1], [ours["burst_10000_c200"]["welcome_ms"]["p99"], base["burst_10000_c200"]["welcome_ms"]["p99"]],
                color=["C0", "C1"])
    axes[2].set_xticks([0, 1], ["signaling", "baseline"])
    axes[2].set_title("burst: time to welcome p99 (ms)")
    fig.suptitle(f"{results['machine']['python']}, server on core 0, load generator on core 1")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.png")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--burst", type=int, default=10000)
    parser.add_argument("--idle", type=int, default=10000)
    parser.add_argument("--python", default=None,
                        help="interpreter to run both servers on (e.g. a PyPy venv's python, with the server "
                             "installed there); the load generator runs on this one")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before measuring (a JIT needs more)")
    args = parser.parse_args()
    results = run_all(args)
    print(json.dumps(results, indent=2))
    if args.out:
        with open(args.out + ".json", "w") as f:
            json.dump(results, f, indent=2)
        chart(results, args.out + ".png")


if __name__ == "__main__":
    main()
