#!/usr/bin/env python3
"""WebSocket against TCP clients through the same pooler: tps and the pooler's CPU per transaction.

One command (Python 3.11 stdlib only; builds nothing itself):

    cargo build --release -p control -p wsbench && python3 perf/websocket.py
    python3 perf/websocket.py --rounds 5 --seconds 5 --clients 1,20,100 --shards 1

It starts a throwaway PostgreSQL and one supavisor (tenant `bench`, transaction mode, the
WebSocket listener on a free port), then runs `target/release/wsbench` (one client implementation,
one thread, a simple-protocol `SELECT 1` per transaction) over TCP (SCRAM login) and over WebSocket
(pipelined cleartext login, one masked binary frame per query) in alternation, TCP WS TCP WS ...,
`--rounds` rounds of `--seconds` each per client count. Per cell it reports the median tps and
the median pooler CPU microseconds per transaction (utime+stime from /proc/PID/stat over the
measured window), and the WebSocket/TCP ratio of each. Then, with `strace -c -f` attached to the
pooler, one client each way counts the pooler's syscalls per transaction (CPU speed does not enter
the counts, so they compare on a busy machine). Both tables are appended to perf/RESULTS.md.
Everything it started is stopped by PID at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402

WSBENCH = lib.TARGET / "release" / "wsbench"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternation rounds")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per run")
    p.add_argument("--clients", default="1,20,100", help="client counts, comma-separated")
    p.add_argument("--shards", type=int, default=1, help="supavisor shards")
    p.add_argument("--pool-size", type=int, default=10, help="server connections")
    p.add_argument("--no-results", action="store_true", help="do not append to perf/RESULTS.md")
    a = p.parse_args()
    a.clients = [int(x) for x in a.clients.split(",") if x]
    return a


def syscalls(root: Path, sv: lib.Supavisor, transport: str, seconds: float) -> tuple[float, list]:
    """Pooler syscalls per transaction for one client: (total, [(name, per tx)] of the top 5)."""
    out_file = root / f"strace-{transport}.txt"
    st = subprocess.Popen(["strace", "-c", "-f", "-p", str(sv.pid), "-o", str(out_file)],
                          stderr=subprocess.DEVNULL)
    time.sleep(1)  # strace attaches to every thread
    res = run_bench(sv, transport, 1, seconds, warmup=0.1)
    st.terminate()
    st.wait()
    n = res["all_transactions"]
    calls = {}
    for line in out_file.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:5]
    return sum(calls.values()) / n, [(k, v / n) for k, v in top]


def run_bench(sv: lib.Supavisor, transport: str, clients: int, seconds: float,
              warmup: float = 1.0) -> dict:
    addr = f"127.0.0.1:{sv.ws_port if transport == 'ws' else sv.port}"
    cmd = [str(WSBENCH), "--transport", transport, "--addr", addr,
           "--address", f"localhost:{sv.port}", "--user", "postgres.bench",
           "--password", lib.PASSWORD, "--clients", str(clients), "--seconds", str(seconds),
           "--warmup-secs", str(warmup), "--pid", str(sv.pid)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise RuntimeError(f"wsbench failed ({out.returncode}): {out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    a = parse_args()
    if not WSBENCH.is_file():
        sys.exit(f"{WSBENCH} missing: run `cargo build --release -p control -p wsbench` first")
    cleanup = lib.Cleanup()
    cleanup.install_signals()
    try:
        root = lib.make_tempdir(cleanup, "supavisor-ws-perf.")
        pg = lib.Postgres(cleanup, root)
        sv = lib.Supavisor(cleanup, root, pg, a.pool_size, a.shards)
        rows = []
        for clients in a.clients:
            got = {"tcp": [], "ws": []}
            for r in range(a.rounds):
                for transport in ("tcp", "ws"):
                    res = run_bench(sv, transport, clients, a.seconds)
                    got[transport].append(res)
                    lib.log(f"clients={clients} round={r + 1} {transport}: {res['tps']:.0f} tps, "
                            f"{res['cpu_us_per_tx']} us CPU/tx")
            med = {t: (statistics.median(x["tps"] for x in v),
                       statistics.median(x["cpu_us_per_tx"] for x in v)) for t, v in got.items()}
            rows.append((clients, med))
        lines = ["| clients | TCP tps | WebSocket tps | tps WS/TCP | TCP CPU µs/tx | WebSocket CPU µs/tx | CPU WS/TCP |",
                 "|---:|---:|---:|---:|---:|---:|---:|"]
        for clients, med in rows:
            (tt, tc), (wt, wc) = med["tcp"], med["ws"]
            lines.append(f"| {clients} | {tt:.0f} | {wt:.0f} | {wt / tt:.2f} | {tc:.1f} | {wc:.1f} | {wc / tc:.2f} |")
        table = "\n".join(lines) + "\n"
        if shutil.which("strace"):
            table += "\n| transport (1 client, under strace) | pooler syscalls / transaction | of which |\n|---|---:|---|\n"
            for transport in ("tcp", "ws"):
                total, top = syscalls(root, sv, transport, a.seconds)
                table += (f"| {transport} | {total:.2f} | "
                          + ", ".join(f"{k} {v:.2f}" for k, v in top) + " |\n")
        print(table)
        if not a.no_results:
            title = "WebSocket vs TCP clients"
            text = lib.results_header(title, ["python3"] + sys.argv)
            text += (f"supavisor shards={a.shards}, pool_size {a.pool_size}, transaction mode; "
                     f"`wsbench` `SELECT 1` closed loop, {a.rounds} alternating rounds of "
                     f"{a.seconds:g} s per cell, medians.\n\n") + table
            path = lib.append_results(text)
            lib.log(f"appended to {path}")
        return 0
    finally:
        cleanup.run()


if __name__ == "__main__":
    sys.exit(main())
