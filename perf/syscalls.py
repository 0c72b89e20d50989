#!/usr/bin/env python3
"""Syscalls per transaction: PgBouncer against supavisor, counted by `strace -c -f` on the pooler.

    cargo build --release && python3 perf/syscalls.py [--seconds 3] [--clients 1]

Starts a throwaway PostgreSQL, a PgBouncer (transaction mode) and a supavisor (1 shard), then for
`-S -M simple` and `-S -M extended` attaches strace to each pooler while pgbench runs through it,
and prints the pooler's syscalls per transaction, in total and for the most frequent calls. CPU
speed does not enter the counts, so they are comparable on a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--clients", type=int, default=1)
    args = p.parse_args()
    cleanup = lib.Cleanup()
    try:
        root = lib.make_tempdir(cleanup, "supavisor-syscalls.")
        pg = lib.Postgres(cleanup, root, 200)
        env = dict(os.environ, PGPASSWORD=lib.PASSWORD)
        subprocess.run(["pgbench", "-i", "-s", "1", "-h", "127.0.0.1", "-p", str(pg.port),
                        "-U", "postgres", "postgres"], env=env, capture_output=True, check=True)
        pgb = lib.PgBouncer(cleanup, root, pg, 5, max_client_conn=200)
        sv = lib.Supavisor(cleanup, root, pg, 5, 1)
        for name, port, pid, user in [("pgbouncer", pgb.port, pgb.pid, "postgres"),
                                      ("supavisor", sv.port, sv.pid, "postgres.bench")]:
            for mode in ["simple", "extended"]:
                out_file = root / f"strace-{name}-{mode}.txt"
                st = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out_file)],
                                      stderr=subprocess.DEVNULL)
                time.sleep(1)  # strace attaches to every thread
                run = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", str(args.clients),
                                      "-T", str(args.seconds), "-h", "127.0.0.1", "-p", str(port),
                                      "-U", user, "postgres"], env=env, capture_output=True, text=True)
                st.terminate()
                st.wait()
                m = re.search(r"actually processed: (\d+)", run.stdout)
                n = int(m.group(1)) if m else 0
                if n == 0:
                    print(f"{name} {mode}: pgbench failed: {run.stderr.strip()[-300:]}")
                    continue
                calls = {}
                for line in out_file.read_text().splitlines():
                    parts = line.split()
                    if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                        calls[parts[-1]] = int(parts[3])
                top = sorted(calls.items(), key=lambda kv: -kv[1])[:5]
                print(f"{name:10} {mode:9} {n:6} tx  {sum(calls.values()) / n:6.2f} syscalls/tx  "
                      + "  ".join(f"{k} {v / n:.2f}" for k, v in top))
    finally:
        cleanup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
