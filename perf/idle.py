#!/usr/bin/env python3
"""Idle clients: pooler RSS per authenticated idle client, supavisor against PgBouncer.

    cargo build --release && python3 perf/idle.py                    # 19,000 clients each
    python3 perf/idle.py --connections 5000 --hold-secs 15           # quicker

Starts a throwaway PostgreSQL, a supavisor (tenant `bench`) and a PgBouncer (helpers in
perf/lib.py), then runs `target/release/idle-clients` (perf/idle) against each in turn: N
connections that finish startup + SCRAM and reach ReadyForQuery, from source addresses 127.0.0.1..8,
held idle while a random sample runs `SELECT 1` every few seconds. Reads each pooler's VmRSS before
and after, and the kernel's socket memory, and appends the figures and the arithmetic for 250,000
clients on a 16-core, 64 GB node to perf/RESULTS.md.

One process holds at most ~19,500 sockets under a 20,000 `ulimit -n`: the generator holds N and the
pooler N more, so N = 19,000 is the most one generator measures here. For more, run several
`idle-clients` processes at once against the same pooler (each with its own `--connections`) and
add up their counts.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib  # noqa: E402

IDLE_BIN = lib.TARGET / "release" / "idle-clients"
TARGET_CLIENTS = 250_000
NODE_GB = 64
PAGE = 4096


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--connections", type=int, default=19000)
    p.add_argument("--hold-secs", type=int, default=30)
    p.add_argument("--sources", type=int, default=8)
    p.add_argument("--shards", type=int, default=2, help="supavisor shards")
    p.add_argument("--pool-size", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2000,
                   help="connections opened and closed before the measured run (0: none)")
    p.add_argument("--tls", action="store_true",
                   help="clients connect with TLS (sslmode=require) to both poolers")
    p.add_argument("--no-pgbouncer", action="store_true")
    p.add_argument("--no-results", action="store_true")
    return p.parse_args()


def run_idle(args, port: int, user: str, pid: int, name: str) -> dict:
    if args.warmup > 0:
        # Fixed costs first: the pool's server connections, the allocator's arenas and the
        # ring's provided buffers (256 x 16 KiB per shard, resident once touched) would
        # otherwise count as per-client growth. The same for both poolers.
        warm = [str(IDLE_BIN), "--host", "127.0.0.1", "--port", str(port), "--user", user,
                "--password", lib.PASSWORD, "--connections", str(args.warmup),
                "--sources", str(args.sources), "--hold-secs", "3",
                "--sample-every-secs", "1", "--sample", "50", "--pid", str(pid)]
        warm += ["--tls"] if args.tls else []
        lib.log(f"{name}: warm-up: {' '.join(warm)}")
        subprocess.run(warm, stdout=subprocess.DEVNULL, check=True, start_new_session=True)
    cmd = [str(IDLE_BIN), "--host", "127.0.0.1", "--port", str(port), "--user", user,
           "--password", lib.PASSWORD, "--connections", str(args.connections),
           "--sources", str(args.sources), "--hold-secs", str(args.hold_secs),
           "--sample-every-secs", "5", "--sample", "50", "--pid", str(pid)]
    cmd += ["--tls"] if args.tls else []
    lib.log(f"{name}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True)
    out_lines = []
    try:
        for line in proc.stdout:
            out_lines.append(line.rstrip())
            lib.log(f"  {name}: {line.rstrip()}")
        proc.wait()
    except KeyboardInterrupt:
        lib.kill_pid(proc.pid)
        raise
    res = {"name": name, "log": out_lines}
    for line in out_lines:
        if line.startswith("idle-clients result "):
            for kv in line.split()[2:]:
                k, v = kv.split("=", 1)
                res[k] = float(v)
    return res


def main() -> int:
    args = parse_args()
    if not IDLE_BIN.is_file():
        sys.exit(f"{IDLE_BIN} missing: run `cargo build --release -p idle-clients` first")
    lib.raise_nofile()
    cleanup = lib.Cleanup()
    cleanup.install_signals()
    results = []
    pgb_version = None
    try:
        root = lib.make_tempdir(cleanup, "supavisor-idle.")
        pg = lib.Postgres(cleanup, root, max_connections=200)
        max_clients = args.connections + 500
        tls = lib.make_cert(root) if args.tls else None
        sv = lib.Supavisor(cleanup, root, pg, args.pool_size, args.shards, max_clients=max_clients,
                           tls=tls)
        results.append(run_idle(args, sv.port, "postgres.bench", sv.pid,
                                f"supavisor (shards {args.shards})"))
        sv.stop()
        if not args.no_pgbouncer:
            pgb = lib.PgBouncer(cleanup, root, pg, args.pool_size, max_client_conn=max_clients,
                                tls=tls)
            pgb_version = pgb.version
            results.append(run_idle(args, pgb.port, "postgres", pgb.pid,
                                    f"PgBouncer {pgb.version[0]}.{pgb.version[1]}"))
            pgb.stop()
    except KeyboardInterrupt:
        lib.log("interrupted: cleaning up")
        return 130
    finally:
        cleanup.run()

    text = render(args, results)
    print(text)
    if not args.no_results:
        head = lib.results_header("Idle clients" + (" over TLS" if args.tls else "")
                                  + (" (quick)" if args.connections < 19000 else ""),
                                  ["python3"] + sys.argv)
        path = lib.append_results(head + text)
        lib.log(f"appended to {path}")
    return 0


def render(args, results: list[dict]) -> str:
    out = [f"{args.connections} connections per pooler ({'TLS (ECDSA P-256 certificate), ' if args.tls else ''}"
           "startup + SCRAM + ReadyForQuery), from "
           f"{args.sources} source addresses, held {args.hold_secs} s with `SELECT 1` on 50 random "
           "connections every 5 s. RSS growth = pooler VmRSS after holding minus before opening, "
           "divided by the connections that opened"
           + (f"; before it, {args.warmup} connections were opened and closed against each pooler "
              "(warm-up: server connections, allocator arenas, I/O buffers)" if args.warmup else "")
           + ".\n",
           "| pooler | opened | failed | time to open s | conn/s | sampled SELECT 1 failures | "
           "RSS before MiB | RSS after MiB | RSS per idle client bytes | vs PgBouncer |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = next((r for r in results if r["name"].startswith("PgBouncer")), None)
    base_per = base.get("rss_per_client_bytes") if base else None
    for r in results:
        per = r.get("rss_per_client_bytes")
        ok = int(r.get("ok", 0))
        rate = ok / r["open_secs"] if r.get("open_secs") else 0
        vs = f"{per / base_per:.2f}x" if per is not None and base_per else "—"
        out.append(
            f"| {r['name']} | {ok} | {int(r.get('failed', 0))} | {r.get('open_secs', 0):.1f} | "
            f"{rate:.0f} | {int(r.get('sample_failures', 0))}/{int(r.get('samples', 0))} | "
            f"{r.get('rss_before_kib', 0) / 1024:.1f} | {r.get('rss_after_kib', 0) / 1024:.1f} | "
            f"{per:.0f} | {vs} |" if per is not None else f"| {r['name']} | {ok} | failed | | | | | | | |")
    out.append("")

    # Kernel memory per socket, measured: slab growth and TCP buffer pages with everything open.
    # Both ends of every connection live on this machine (generator + pooler): halve it.
    kern = []
    for r in results:
        if "slab_open_kib" in r and r.get("ok"):
            slab = (r["slab_open_kib"] - r["slab_before_kib"]) * 1024 / (2 * r["ok"])
            tcp = (r["tcp_mem_pages_open"] - r["tcp_mem_pages_before"]) * PAGE / (2 * r["ok"])
            kern.append((r["name"], slab, tcp))
            out.append(f"- kernel, {r['name']} run: slab +{slab:.0f} bytes and TCP buffer memory "
                       f"+{tcp:.0f} bytes per socket (machine-wide readings; others' processes add "
                       "noise)")
    # The estimate used below: the measured slab figure when it is plausible, else 2.5 KiB
    # (struct tcp_sock ~2.3 KB + socket inode, file and dentry ~1 KB; an idle socket holds no
    # buffer pages).
    slab_vals = [k[1] for k in kern if 500 < k[1] < 20000]
    kernel_per = max(slab_vals) if slab_vals else 3500.0
    kernel_src = "measured (slab growth per socket, largest run)" if slab_vals else \
        "assumed 3.5 KB (tcp_sock + inode + file + dentry; no buffer pages while idle)"
    out.append("")
    out.append(f"**{TARGET_CLIENTS:,} idle clients on a 16-core, {NODE_GB} GB node** (pooler RSS per "
               f"client x {TARGET_CLIENTS:,}, plus kernel memory per client socket: {kernel_src}; "
               "an idle socket with empty queues holds no buffer pages, a client that leaves data "
               "unread costs up to its rmem/wmem more; the pooler's own baseline RSS and glommio's "
               "10 MiB io memory per shard (16 shards: 160 MiB) come on top; fds: LimitNOFILE "
               "1048576 in the systemd unit):\n")
    out.append("| pooler | RSS per client | pooler RSS at 250k | kernel at 250k | total | share of "
               f"{NODE_GB} GB |")
    out.append("|---|---:|---:|---:|---:|---:|")
    for r in results:
        per = r.get("rss_per_client_bytes")
        if per is None:
            continue
        pool_gib = per * TARGET_CLIENTS / 2**30
        kern_gib = kernel_per * TARGET_CLIENTS / 2**30
        tot = pool_gib + kern_gib
        out.append(f"| {r['name']} | {per:.0f} B | {pool_gib:.2f} GiB | {kern_gib:.2f} GiB | "
                   f"{tot:.2f} GiB | {tot / (NODE_GB * 1e9 / 2**30) * 100:.1f}% |")
    out.append("")
    out.append(f"Arithmetic: {TARGET_CLIENTS:,} x bytes per client / 2^30 = GiB; kernel "
               f"{kernel_per:.0f} B x {TARGET_CLIENTS:,} = {kernel_per * TARGET_CLIENTS / 2**30:.2f} GiB.")
    out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
