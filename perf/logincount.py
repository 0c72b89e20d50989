#!/usr/bin/env python3
"""What a login costs in counted work, not in CPU time (which this noisy host blurs): per
`pgbench -C -S` login, the shard's sleeps (glommio's park), ring requests submitted, task polls,
timers armed, and every pooler's allocator calls and context switches, supavisor beside
PgBouncer. Counts come from uprobes (`perf probe`, needs root) on a copy of the binary and on
libc, read with `perf stat`; the probes are removed at the end. Reports only; nothing is written
to RESULTS.md.

    python3 perf/logincount.py [clients=10] [seconds=6] [shards=1] [--binary PATH]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402

LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
# (probe name, symbol pattern in the binary): all matching symbols count together.
GLOMMIO = [
    ("park", r"glommio3sys5uring7Reactor4park17h"),
    ("sqe", r"queue_request_into_ring17h"),
    ("timer", r"7Reactor12insert_timer17h"),
    ("poll", r"RawTask.*3run17h"),
]
ALLOC = ["malloc", "free", "calloc", "realloc"]


def text_offset(binary: Path) -> int:
    """vaddr - file offset of the executable segment: perf probe takes file offsets."""
    out = subprocess.run(["readelf", "-lW", str(binary)], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*LOAD\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s.*\bR E\b", line)
        if m:
            return int(m.group(2), 16) - int(m.group(1), 16)
    return 0


def add_probes(binary: Path) -> list:
    events = []
    delta = text_offset(binary)
    syms = subprocess.run(["nm", str(binary)], capture_output=True, text=True, check=True).stdout.splitlines()
    for name, pat in GLOMMIO:
        n = 0
        for line in syms:
            f = line.split()
            if len(f) != 3 or f[1] not in "tT" or not re.search(pat, f[2]):
                continue
            n += 1
            ev = f"{name}{n}"
            addr = int(f[0], 16) - delta
            r = subprocess.run(["perf", "probe", "-q", "-x", str(binary), "-a", f"{ev}={addr:#x}"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                events.append((name, f"probe_{binary.name.replace('-', '_')}:{ev}"))
    for fn in ALLOC:
        r = subprocess.run(["perf", "probe", "-q", "-x", LIBC, "-a", f"lc_{fn}={fn}"], capture_output=True, text=True)
        if r.returncode == 0 or "already exists" in r.stderr:
            events.append((fn, f"probe_libc:lc_{fn}"))
    return events


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("clients", nargs="?", type=int, default=10)
    p.add_argument("seconds", nargs="?", type=int, default=6)
    p.add_argument("shards", nargs="?", type=int, default=1)
    p.add_argument("--binary", type=Path, default=lib.SUPAVISOR_BIN)
    a = p.parse_args()
    if os.geteuid() != 0:
        sys.exit("perf probe needs root")
    tmp = Path(tempfile.mkdtemp(prefix="logincount."))
    binary = tmp / "svprobe"
    shutil.copy(a.binary.resolve(), binary)
    cleanup = lib.Cleanup()
    try:
        events = add_probes(binary)
        if not events:
            sys.exit("no probes could be added")
        root = lib.make_tempdir(cleanup, "logincount.")
        pg = lib.Postgres(cleanup, root, 300)
        env = dict(os.environ, PGPASSWORD=lib.PASSWORD)
        subprocess.run(["pgbench", "-i", "-s", "1", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "postgres"],
                       env=env, capture_output=True, check=True)
        sv = lib.Supavisor(cleanup, root, pg, 5, a.shards, binary=binary)
        pgb = lib.PgBouncer(cleanup, root, pg, 5, max_client_conn=300)
        rows = {}
        for name, port, pid, user in [("supavisor", sv.port, sv.pid, "postgres.bench"),
                                      ("pgbouncer", pgb.port, pgb.pid, "postgres")]:
            out = tmp / f"stat-{name}.txt"
            # glommio's probes are in supavisor's binary only.
            mine = [(n, e) for n, e in events if name == "supavisor" or n in ALLOC]
            evs = ",".join(["context-switches"] + [e for _, e in mine])
            ps = subprocess.Popen(["perf", "stat", "-x", ",", "-e", evs, "-p", str(pid), "-o", str(out)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            run = subprocess.run(["pgbench", "-n", "-S", "-C", "-c", str(a.clients), "-j", "2", "-T", str(a.seconds),
                                  "-h", "127.0.0.1", "-p", str(port), "-U", user, "postgres"],
                                 env=env, capture_output=True, text=True)
            ps.send_signal(2)
            ps.wait()
            m = re.search(r"actually processed: (\d+)", run.stdout)
            if not m:
                sys.exit(f"pgbench against {name} failed: {run.stderr[-500:]}")
            logins = int(m.group(1))
            totals = {}
            short = {e: n for n, e in mine}
            short["context-switches"] = "context switches"
            for line in open(out):
                f = line.strip().split(",")
                if len(f) < 3 or not f[0].replace(".", "").isdigit():
                    continue
                key = short.get(f[2])
                if key:
                    totals[key] = totals.get(key, 0) + float(f[0])
            rows[name] = (logins, totals)
        keys = ["context switches"] + [n for n, _ in GLOMMIO] + ALLOC
        print(f"per -C login ({a.clients} clients, {a.shards} shard(s)):")
        print(f"{'':18s}" + "".join(f"{k:>18s}" for k in rows))
        for k in keys:
            vals = [f"{totals[k] / logins:18.1f}" if k in totals else f"{'-':>18s}"
                    for logins, totals in rows.values()]
            print(f"{k:18s}" + "".join(vals))
        print("(park: the shard's sleeps or ring polls; sqe: ring requests; poll: task polls; "
              "timer: timers armed; '-': not a glommio process)")
    finally:
        cleanup.run()
        subprocess.run(["perf", "probe", "-q", "-d", f"probe_{binary.name.replace('-', '_')}:*"], capture_output=True)
        subprocess.run(["perf", "probe", "-q", "-d", "probe_libc:lc_*"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
