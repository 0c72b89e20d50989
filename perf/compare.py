#!/usr/bin/env python3
"""Side-by-side pgbench: PostgreSQL direct, PgBouncer and supavisor, in alternation.

One command (Python 3.11 stdlib only):

    cargo build --release && python3 perf/compare.py            # full run (~40 min)
    python3 perf/compare.py --quick                             # ~3 min smoke run

It starts its own throwaway PostgreSQL (initdb into a temp dir, free port, scram-sha-256,
max_connections 1200), a PgBouncer (transaction mode, auth_type scram-sha-256 with the SCRAM secret
from pg_authid) and one `target/release/supavisor` per `--shards` value (tenant `bench`, the same
pool size), runs `pgbench -i` once directly, then for each workload and client count runs pgbench
against every target in turn (A B C D A B C D ..., `--rounds` rounds of `--seconds` each). Per cell
it reports the median over rounds of tps, average and p99 latency (from pgbench's per-transaction
`--log`), and the pooler's CPU seconds per 10,000 transactions (utime+stime from /proc/PID/stat),
each also as a ratio to PgBouncer's, and appends them to perf/RESULTS.md. Everything it started
is stopped by PID at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402

WORKLOADS = {
    "simple": ["-S", "-M", "simple"],
    "extended": ["-S", "-M", "extended"],
    "prepared": ["-S", "-M", "prepared"],
    "tpcb": ["-M", "extended"],
    "connect": ["-C", "-S"],
}
WORKLOAD_TITLES = {
    "simple": "select-only `-S -M simple`",
    "extended": "select-only `-S -M extended`",
    "prepared": "select-only `-S -M prepared`",
    "tpcb": "TPC-B `-M extended`",
    "connect": "new connection per transaction `-C -S` (SCRAM); tps = connections/s",
}

current_pgbench: subprocess.Popen | None = None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="alternation rounds (>= 3 recommended)")
    p.add_argument("--seconds", type=int, default=10, help="seconds per pgbench run")
    p.add_argument("--clients", default="1,100,1000", help="client counts, comma-separated")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated subset of {','.join(WORKLOADS)}")
    p.add_argument("--shards", default="1,2", help="supavisor shard counts, comma-separated")
    p.add_argument("--pool-size", type=int, default=20, help="server connections (both poolers)")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i scale")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j")
    p.add_argument("--quick", action="store_true",
                   help="--seconds 3, clients 1 and 100, workloads simple and extended")
    p.add_argument("--no-results", action="store_true", help="do not append to perf/RESULTS.md")
    a = p.parse_args()
    if a.quick:
        a.seconds = 3
        a.clients = "1,100"
        a.workloads = "simple,extended"
    a.clients = [int(x) for x in a.clients.split(",") if x]
    a.workloads = [w for w in a.workloads.split(",") if w]
    a.shards = [int(x) for x in a.shards.split(",") if x]
    for w in a.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w}")
    return a


def percentile(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, max(0, int(round(q * (len(sorted_vals) - 1)))))
    return float(sorted_vals[k])


def run_pgbench(args, logdir: Path, tag: str, port: int, user: str, workload: str,
                clients: int, pooler_pid: int | None) -> dict:
    """One pgbench run; returns tps, latency (ms) and the pooler's CPU seconds."""
    global current_pgbench
    for f in logdir.glob("*"):
        f.unlink()
    # pgbench's -T clock runs while its clients log in (SCRAM on both ends), which takes
    # seconds at 1,000 clients: give every 100 clients one more second so that the measured
    # window is about --seconds long. (tps is reported without the initial connection time.)
    duration = args.seconds + (clients // 100 if workload != "connect" else 0)
    cmd = ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(port), "-U", user,
           "-T", str(duration), "-c", str(clients), "-j", str(min(args.jobs, clients)),
           "-l", f"--log-prefix={logdir / 'tx'}", *WORKLOADS[workload], "postgres"]
    env = dict(os.environ, PGPASSWORD=lib.PASSWORD)
    cpu0 = lib.proc_cpu_ticks(pooler_pid) if pooler_pid else None
    t0 = time.time()
    current_pgbench = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=env, start_new_session=True)
    try:
        out, err = current_pgbench.communicate(timeout=duration + 120)
    except subprocess.TimeoutExpired:
        lib.kill_pid(current_pgbench.pid, signal.SIGKILL)
        out, err = current_pgbench.communicate()
        err += "\n(timed out)"
    rc = current_pgbench.returncode
    current_pgbench = None
    elapsed = time.time() - t0
    cpu1 = lib.proc_cpu_ticks(pooler_pid) if pooler_pid else None
    m_tps = re.search(r"^tps = ([0-9.]+)", out, re.M)
    m_n = re.search(r"number of transactions actually processed: (\d+)", out)
    res = {"ok": rc == 0 and m_tps is not None and m_n is not None and int(m_n.group(1)) > 0,
           "elapsed": elapsed}
    if not res["ok"]:
        lines = [l for l in (err + out).splitlines() if l.strip()]
        msg = next((l for l in lines if "error" in l.lower() or "fatal" in l.lower()), None)
        if msg is None:
            m_done = re.search(r"^number of transactions actually processed: .*$", out, re.M)
            m_tps0 = re.search(r"^tps = .*$", out, re.M)
            msg = " / ".join(x.group(0) for x in (m_done, m_tps0) if x) or \
                (lines[-1] if lines else f"exit {rc}")
        res["error"] = msg.strip()[:160]
        lib.log(f"  {tag}: pgbench failed (exit {rc}): {res['error']}")
        return res
    lat = []
    for f in logdir.glob("tx*"):
        with open(f) as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[2].isdigit():
                    lat.append(int(parts[2]))
        f.unlink()
    lat.sort()
    ntx = int(m_n.group(1)) if m_n else len(lat)
    res["tps"] = float(m_tps.group(1))
    res["avg_ms"] = (sum(lat) / len(lat) / 1000.0) if lat else float("nan")
    res["p99_ms"] = percentile(lat, 0.99) / 1000.0
    res["ntx"] = ntx
    if cpu0 is not None and ntx > 0:
        res["cpu_per_10k"] = (cpu1 - cpu0) / lib.CLK_TCK / ntx * 10000.0
    lib.log(f"  {tag}: tps {res['tps']:.0f}  avg {res['avg_ms']:.3f} ms  p99 {res['p99_ms']:.3f} ms"
            + (f"  cpu/10k {res['cpu_per_10k']:.3f} s" if "cpu_per_10k" in res else ""))
    return res


def median_of(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if r.get("ok") and key in r]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, digits: int) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def ratio(v: float | None, base: float | None) -> str:
    if v is None or base is None or base == 0:
        return "—"
    return f"{v / base:.2f}x"


def main() -> int:
    args = parse_args()
    lib.raise_nofile()
    cleanup = lib.Cleanup()
    cleanup.install_signals()

    def stop_pgbench():
        if current_pgbench is not None:
            lib.kill_pid(current_pgbench.pid, signal.SIGKILL)

    results: dict = {}
    started = time.time()
    try:
        root = lib.make_tempdir(cleanup, "supavisor-perf.")
        cleanup.add("pgbench", stop_pgbench)
        logdir = root / "pgbench-logs"
        logdir.mkdir()
        max_clients = max(2000, max(args.clients) + 100)
        pg = lib.Postgres(cleanup, root, max_connections=1200)
        lib.log(f"pgbench -i -s {args.scale}")
        subprocess.run(["pgbench", "-i", "-q", "-s", str(args.scale), "-h", "127.0.0.1", "-p",
                        str(pg.port), "-U", "postgres", "postgres"],
                       check=True, env=pg.env(), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        pgb = lib.PgBouncer(cleanup, root, pg, args.pool_size, max_client_conn=max_clients)
        svs = [lib.Supavisor(cleanup, root, pg, args.pool_size, s, max_clients=max_clients)
               for s in args.shards]
        targets = [("direct", pg.port, "postgres", None), ("pgbouncer", pgb.port, "postgres", pgb.pid)]
        targets += [(f"supavisor s{sv.shards}", sv.port, "postgres.bench", sv.pid) for sv in svs]
        pgb_prepared = pgb.version >= (1, 21)

        for w in args.workloads:
            for c in args.clients:
                lib.log(f"{w} at {c} clients")
                cell: dict = {t[0]: [] for t in targets}
                for r in range(args.rounds):
                    for name, port, user, pid in targets:
                        if w == "prepared" and name == "pgbouncer" and not pgb_prepared:
                            continue
                        res = run_pgbench(args, logdir, f"round {r + 1} {name}", port, user, w, c, pid)
                        cell[name].append(res)
                results[(w, c)] = cell
    except KeyboardInterrupt:
        lib.log("interrupted: cleaning up")
        cleanup.run()
        return 130
    finally:
        cleanup.run()

    table = render(args, results, targets, pgb_prepared, pgb.version)
    print(table)
    if not args.no_results:
        title = "pgbench side by side" + (" (quick)" if args.quick else "")
        text = lib.results_header(title, ["python3"] + sys.argv)
        text += (f"PgBouncer {pgb.version[0]}.{pgb.version[1]} (transaction mode) and supavisor "
                 f"(transaction port), pool size {args.pool_size} each; PostgreSQL "
                 f"max_connections 1200, fsync off; pgbench -i -s {args.scale}, -j {args.jobs}, "
                 f"{args.rounds} rounds x {args.seconds} s in alternation; medians over rounds. "
                 "Latency from pgbench `-l` per-transaction logs. CPU = pooler utime+stime per "
                 "10,000 transactions. Ratios are to PgBouncer (tps: higher is better; latency "
                 f"and CPU: lower is better). Wall time {(time.time() - started) / 60:.1f} min.\n\n")
        text += table
        path = lib.append_results(text)
        lib.log(f"appended to {path}")
    return 0


def render(args, results, targets, pgb_prepared, pgb_version) -> str:
    out = []
    for w in args.workloads:
        out.append(f"### {WORKLOAD_TITLES[w]}\n")
        if w == "prepared" and not pgb_prepared:
            out.append(f"PgBouncer {pgb_version[0]}.{pgb_version[1]} has no prepared-statement "
                       "support in transaction mode (needs >= 1.21): no PgBouncer column.\n")
        out.append("| clients | target | tps | tps vs PgB | avg ms | avg vs PgB | p99 ms | "
                   "p99 vs PgB | pooler CPU s / 10k tx | CPU vs PgB |")
        out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for c in args.clients:
            cell = results.get((w, c))
            if cell is None:
                continue
            base = cell.get("pgbouncer", [])
            b_tps, b_avg = median_of(base, "tps"), median_of(base, "avg_ms")
            b_p99, b_cpu = median_of(base, "p99_ms"), median_of(base, "cpu_per_10k")
            for name, *_ in targets:
                runs = cell.get(name, [])
                if not runs:
                    continue
                failed = [r for r in runs if not r.get("ok")]
                tps, avg = median_of(runs, "tps"), median_of(runs, "avg_ms")
                p99, cpu = median_of(runs, "p99_ms"), median_of(runs, "cpu_per_10k")
                label = name
                if failed:
                    label += f" ({len(failed)}/{len(runs)} runs failed: {failed[0]['error']})"
                cpu_s = "n/a" if name == "direct" else fmt(cpu, 3)
                out.append(f"| {c} | {label} | {fmt(tps, 0)} | {ratio(tps, b_tps)} | {fmt(avg, 3)} | "
                           f"{ratio(avg, b_avg)} | {fmt(p99, 3)} | {ratio(p99, b_p99)} | {cpu_s} | "
                           f"{'n/a' if name == 'direct' else ratio(cpu, b_cpu)} |")
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
