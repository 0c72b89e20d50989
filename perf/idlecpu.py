#!/usr/bin/env python3
"""CPU an idle pooler burns: supavisor against PgBouncer, nobody connected.

    cargo build --release && python3 perf/idlecpu.py [--seconds 10] [--shards 1] [--binary PATH]

Starts a throwaway PostgreSQL, a supavisor (no `[cluster]`: the embedded single-node defaults)
and a PgBouncer, lets one client log in and run a query through each (so that each holds a pool
with an idle server connection), then reads every thread's run time and the number of times it
was scheduled in (`/proc/<pid>/task/<tid>/schedstat`) over `--seconds` with nobody connected, and
prints both per second by thread. Prints only; nothing is written to RESULTS.md.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402


def schedstat(pid: int) -> dict[str, tuple[str, int, int]]:
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            run_ns, _wait_ns, runs = map(int, open(f"/proc/{pid}/task/{t}/schedstat").read().split())
            out[t] = (comm, run_ns, runs)
        except OSError:
            pass
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--binary", type=Path, default=None, help="supavisor binary (default: target/release)")
    a = p.parse_args()
    cleanup = lib.Cleanup()
    try:
        root = lib.make_tempdir(cleanup, "idlecpu.")
        pg = lib.Postgres(cleanup, root, 300)
        env = dict(os.environ, PGPASSWORD=lib.PASSWORD)
        extra = {"binary": a.binary.resolve()} if a.binary else {}
        sv = lib.Supavisor(cleanup, root, pg, 5, a.shards, **extra)
        pgb = lib.PgBouncer(cleanup, root, pg, 5, max_client_conn=300)
        for port, user in [(sv.port, "postgres.bench"), (pgb.port, "postgres")]:
            subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", "postgres",
                            "-Atc", "SELECT 1"], env=dict(env, PGSSLMODE="disable"), capture_output=True, check=True)
        time.sleep(2)
        for name, pid in [("supavisor", sv.pid), ("pgbouncer", pgb.pid)]:
            before = schedstat(pid)
            time.sleep(a.seconds)
            after = schedstat(pid)
            total_ns = total_runs = 0
            rows = []
            for t, (comm, run_ns, runs) in after.items():
                if t not in before:
                    continue
                d_ns, d_runs = run_ns - before[t][1], runs - before[t][2]
                total_ns += d_ns
                total_runs += d_runs
                if d_runs:
                    rows.append((comm, d_ns, d_runs))
            print(f"{name}: {total_ns / a.seconds / 1e3:.0f} us of CPU per second idle, "
                  f"{total_runs / a.seconds:.1f} wake-ups per second")
            for comm, d_ns, d_runs in sorted(rows, key=lambda r: -r[1]):
                print(f"    {comm:16s} {d_ns / a.seconds / 1e3:8.1f} us/s  {d_runs / a.seconds:6.1f} wake-ups/s")
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
