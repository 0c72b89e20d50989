#!/usr/bin/env python3
"""Paired comparison of two pooler builds beside PgBouncer.

Starts one PostgreSQL, two supavisor binaries (A and B, `--shards` each, default 1; pool 5) and PgBouncer, then
runs `pgbench -S` against each in turn for several rounds, alternating the order of A and B, and
prints per target the median tps and the median pooler CPU per transaction (utime + stime from
/proc). On a noisy machine only numbers from one run are comparable; use this to decide whether a
change helps before running the full `perf/compare.py` table.

    cargo build --release && cp target/release/supavisor /tmp/sv-b
    git stash && cargo build --release && cp target/release/supavisor /tmp/sv-a && git stash pop
    python3 perf/ab.py /tmp/sv-a /tmp/sv-b --clients 100 --rounds 6 --seconds 3
    python3 perf/ab.py /tmp/sv-a /tmp/sv-b --clients 4 --connect      # CPU per login
    python3 perf/ab.py /tmp/sv-a /tmp/sv-b --clients 100 --tpcb       # TPC-B (row locks)

Prints only; nothing is appended to RESULTS.md.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--mode", default="extended", choices=["simple", "extended", "prepared"])
    p.add_argument("--pool", type=int, default=5)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--connect", action="store_true",
                   help="pgbench -C: a new connection (SCRAM login) per transaction")
    p.add_argument("--tpcb", action="store_true",
                   help="pgbench's TPC-B-like script instead of -S (select-only)")
    args = p.parse_args()
    cleanup = lib.Cleanup()
    try:
        root = lib.make_tempdir(cleanup, "supavisor-ab.")
        pg = lib.Postgres(cleanup, root, 300)
        env = dict(os.environ, PGPASSWORD=lib.PASSWORD)
        subprocess.run(["pgbench", "-i", "-s", "1", "-h", "127.0.0.1", "-p", str(pg.port),
                        "-U", "postgres", "postgres"], env=env, capture_output=True, check=True)
        (root / "a").mkdir()
        (root / "b").mkdir()
        a = lib.Supavisor(cleanup, root / "a", pg, args.pool, args.shards, binary=args.a.resolve())
        b = lib.Supavisor(cleanup, root / "b", pg, args.pool, args.shards, binary=args.b.resolve())
        pgb = lib.PgBouncer(cleanup, root, pg, args.pool, max_client_conn=300)
        targets = [("A", a.port, a.pid, "postgres.bench"), ("B", b.port, b.pid, "postgres.bench"),
                   ("pgbouncer", pgb.port, pgb.pid, "postgres")]
        res: dict[str, list[tuple[float, float]]] = {t[0]: [] for t in targets}
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else [targets[1], targets[0], targets[2]]
            for name, port, pid, user in order:
                t0 = lib.proc_cpu_ticks(pid)
                run = subprocess.run(
                    ["pgbench", "-n", *([] if args.tpcb else ["-S"]), *(["-C"] if args.connect else []),
                     "-M", args.mode, "-c", str(args.clients),
                     "-j", "2" if args.clients > 1 else "1", "-T", str(args.seconds),
                     "-h", "127.0.0.1", "-p", str(port), "-U", user, "postgres"],
                    env=env, capture_output=True, text=True)
                t1 = lib.proc_cpu_ticks(pid)
                m = re.search(r"actually processed: (\d+)", run.stdout)
                if not m or int(m.group(1)) == 0:
                    print(f"{name}: pgbench failed: {run.stderr.strip()[-300:]}")
                    return 1
                n = int(m.group(1))
                res[name].append((n / args.seconds, (t1 - t0) / 100 / n * 1e6))
        for name, v in res.items():
            tps = statistics.median(x[0] for x in v)
            cpu = statistics.median(x[1] for x in v)
            print(f"{name:10} tps {tps:8.0f}  cpu/tx {cpu:6.1f} us   rounds: "
                  + " ".join(f"{x[0]:.0f}/{x[1]:.1f}" for x in v))
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
