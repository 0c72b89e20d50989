"""Where a login's CPU goes: pgbench -C -S through supavisor and PgBouncer, the pooler's CPU per
login by thread (user and total), and with PSTAT=1 the context switches and wait syscalls per
login (perf stat; for counted work per login see perf/logincount.py), SV_BINARY=path runs another build, with STRACE=1 every syscall (strace -c), with PERF=1 a perf record of supavisor
in /tmp/perf.data. Reports only; nothing is written to RESULTS.md.

    python3 perf/logincost.py [clients=10] [seconds=8] [shards=1]
"""
import os, re, subprocess, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib
clients = int(sys.argv[1]) if len(sys.argv) > 1 else 10
secs = int(sys.argv[2]) if len(sys.argv) > 2 else 8
shards = int(sys.argv[3]) if len(sys.argv) > 3 else 1
def threads(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = open(f"/proc/{pid}/task/{t}/comm").read().strip()
            f = open(f"/proc/{pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()
            out[t] = (comm, int(f[11]) + int(f[12]), int(f[11]), int(f[12]))
        except OSError:
            pass
    return out
cleanup = lib.Cleanup()
try:
    root = lib.make_tempdir(cleanup, "conncpu.")
    pg = lib.Postgres(cleanup, root, 300)
    env = dict(os.environ, PGPASSWORD=lib.PASSWORD)
    subprocess.run(["pgbench", "-i", "-s", "1", "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres", "postgres"], env=env, capture_output=True, check=True)
    sv = lib.Supavisor(cleanup, root, pg, 5, shards, binary=Path(os.environ.get("SV_BINARY", lib.SUPAVISOR_BIN)))
    pgb = lib.PgBouncer(cleanup, root, pg, 5, max_client_conn=300)
    for name, port, pid, user in [("supavisor", sv.port, sv.pid, "postgres.bench"), ("pgbouncer", pgb.port, pgb.pid, "postgres")]:
        a = threads(pid)
        perf = None
        if name == "supavisor" and os.environ.get("PERF"):
            perf = subprocess.Popen(["perf", "record", "-F", "4000", "-g", "-p", str(pid), "-o", "/tmp/perf.data"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            time.sleep(0.5)
        ps = None
        if os.environ.get("PSTAT"):
            ps = subprocess.Popen(["perf", "stat", "-e", "context-switches,page-faults,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_sendto,syscalls:sys_enter_recvfrom", "-p", str(pid), "-o", f"/tmp/pstat-{name}.txt"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            time.sleep(0.5)
        st = None
        if os.environ.get("STRACE"):
            st = subprocess.Popen(["strace", "-f", "-c", "-o", f"/tmp/strace-{name}.txt", "-p", str(pid)] + sum([["-p", t] for t in os.listdir(f"/proc/{pid}/task")], []), stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
            time.sleep(1)
        run = subprocess.run(["pgbench", "-n", "-S", "-C", "-c", str(clients), "-j", "2", "-T", str(secs), "-h", "127.0.0.1", "-p", str(port), "-U", user, "postgres"], env=env, capture_output=True, text=True)
        if perf:
            perf.send_signal(2); perf.wait()
        if ps:
            ps.send_signal(2); ps.wait(); print(open(f"/tmp/pstat-{name}.txt").read())
        if st:
            st.send_signal(2); st.wait(); print(open(f"/tmp/strace-{name}.txt").read()[:2500])
        b = threads(pid)
        n = int(re.search(r"actually processed: (\d+)", run.stdout).group(1))
        tot = sum(b[t][1] - a.get(t, (0, 0))[1] for t in b)
        print(f"{name}: {n/secs:.0f} logins/s, CPU {tot/100/n*1e6:.0f} us per login")
        for t in sorted(b, key=lambda t: -(b[t][1] - a.get(t, ("", 0, 0, 0))[1])):
            d = b[t][1] - a.get(t, ("", 0, 0, 0))[1]
            if d:
                du = b[t][2] - a.get(t, ("", 0, 0, 0))[2]
                print(f"   {b[t][0]:16s} {d/100/n*1e6:7.1f} us per login (user {du/100/n*1e6:.1f})")
finally:
    cleanup.run()
