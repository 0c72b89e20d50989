"""Shared helpers of the perf tools (Python 3.11 stdlib only): a throwaway PostgreSQL, a PgBouncer
and a supavisor, each started in a temporary directory and stopped by its own PID.

`initdb`, `postgres` and `pgbouncer` refuse to run as root: when root, they run as the `postgres`
OS user through `runuser -u postgres --`, with the temporary directory owned by that user.
"""

from __future__ import annotations

import os
import pwd
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Cargo's target directory (CARGO_TARGET_DIR when set, as cargo itself does).
TARGET = Path(os.environ["CARGO_TARGET_DIR"]) if os.environ.get("CARGO_TARGET_DIR") else REPO / "target"
SUPAVISOR_BIN = TARGET / "release" / "supavisor"
PASSWORD = "postgres"
CLK_TCK = os.sysconf("SC_CLK_TCK")
UNPRIVILEGED = "postgres"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def is_root() -> bool:
    return os.geteuid() == 0


def as_server_user(cmd: list[str], nofile: bool = False) -> list[str]:
    """The command, run as the unprivileged user when we are root. `nofile`: raise the soft fd
    limit to the hard one first (PAM resets it to 1024 under runuser)."""
    if nofile:
        cmd = ["bash", "-c", 'ulimit -n "$(ulimit -Hn)"; exec "$@"', "bash", *cmd]
    if is_root():
        return ["runuser", "-u", UNPRIVILEGED, "--", *cmd]
    return cmd


def raise_nofile() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        d = Path(out.stdout.strip())
        if (d / "initdb").is_file():
            return d
    except (OSError, subprocess.CalledProcessError):
        pass
    best = None
    for d in Path("/usr/lib/postgresql").glob("*/bin"):
        if (d / "initdb").is_file():
            v = int(d.parent.name) if d.parent.name.isdigit() else 0
            if best is None or v > best[0]:
                best = (v, d)
    if best is None:
        sys.exit("no PostgreSQL found (pg_config or /usr/lib/postgresql/*/bin)")
    return best[1]


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return int(fields[11]) + int(fields[12])


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            s = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(s[s.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            out.append(int(d.name))
    return out


def proc_name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def find_descendant(pid: int, name: str, timeout: float = 10.0) -> int:
    """The PID of the first descendant of `pid` (or `pid` itself) whose comm is `name`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        todo = [pid]
        while todo:
            p = todo.pop()
            if proc_name(p) == name:
                return p
            todo.extend(children_of(p))
        time.sleep(0.05)
    raise RuntimeError(f"no {name} process under PID {pid}")


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


class Cleanup:
    """Runs registered stop functions in reverse order, once, at exit or on SIGINT/SIGTERM."""

    def __init__(self) -> None:
        self.actions: list[tuple[str, object]] = []
        self.done = False

    def add(self, what: str, fn) -> None:
        self.actions.append((what, fn))

    def run(self) -> None:
        if self.done:
            return
        self.done = True
        for what, fn in reversed(self.actions):
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep cleaning up
                log(f"cleanup of {what}: {e}")

    def install_signals(self) -> None:
        def handler(signum, _frame):
            raise KeyboardInterrupt(f"signal {signum}")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


def kill_pid(pid: int, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
    """Signals one process by PID and waits for it to go (SIGKILL after `wait`)."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # Reap it if it is our child.
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def make_tempdir(cleanup: Cleanup, prefix: str, keep: bool = False) -> Path:
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(root, 0o755)
    if is_root():
        pw = pwd.getpwnam(UNPRIVILEGED)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    if not keep:
        cleanup.add(f"temp dir {root}", lambda: shutil.rmtree(root, ignore_errors=True))
    return root


def chown_server(path: Path) -> None:
    if is_root():
        pw = pwd.getpwnam(UNPRIVILEGED)
        os.chown(path, pw.pw_uid, pw.pw_gid)


def make_cert(root: Path) -> tuple[Path, Path]:
    """A throwaway self-signed ECDSA P-256 certificate and key for localhost (openssl CLI)."""
    cert, key = root / "tls.crt", root / "tls.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    for p in (cert, key):
        os.chmod(p, 0o600)
        chown_server(p)
    return cert, key


class Postgres:
    def __init__(self, cleanup: Cleanup, root: Path, max_connections: int = 1200):
        self.bindir = pg_bindir()
        self.root = root
        self.data = root / "pgdata"
        self.log = root / "postgres.log"
        pwfile = root / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        chown_server(pwfile)
        subprocess.run(
            as_server_user(
                [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                 "--auth=scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync",
                 f"--pwfile={pwfile}"]
            ),
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        pwfile.unlink()
        self.port = free_port()
        with open(self.data / "postgresql.conf", "a") as f:
            f.write(
                f"\n# perf\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{root}'\nmax_connections = {max_connections}\n"
                "password_encryption = 'scram-sha-256'\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nshared_buffers = '256MB'\n"
            )
        subprocess.run(
            as_server_user(
                [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                 "-w", "-t", "60", "start"],
                nofile=True,
            ),
            check=True, stdout=subprocess.DEVNULL, start_new_session=True,
        )
        cleanup.add("postgres", self.stop)
        self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
        log(f"PostgreSQL on 127.0.0.1:{self.port} (PID {self.pid})")

    def stop(self) -> None:
        subprocess.run(
            as_server_user([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast",
                            "-w", "stop"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            os.kill(self.pid, 0)
            kill_pid(self.pid, signal.SIGQUIT)
        except ProcessLookupError:
            pass

    def env(self) -> dict:
        return dict(os.environ, PGPASSWORD=PASSWORD)

    def psql(self, sql: str) -> str:
        out = subprocess.run(
            [str(self.bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
             "-d", "postgres", "-tAc", sql],
            check=True, capture_output=True, text=True, env=self.env(),
        )
        return out.stdout.strip()

    def scram_secret(self, user: str = "postgres") -> str:
        return self.psql(f"SELECT rolpassword FROM pg_authid WHERE rolname = '{user}'")


def pgbouncer_version() -> tuple[int, int]:
    out = subprocess.run(["pgbouncer", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"PgBouncer (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


class PgBouncer:
    def __init__(self, cleanup: Cleanup, root: Path, pg: Postgres, pool_size: int,
                 max_client_conn: int = 2000, tls: tuple[Path, Path] | None = None):
        self.port = free_port()
        self.version = pgbouncer_version()
        d = root / "pgbouncer"
        d.mkdir()
        chown_server(d)
        userlist = d / "userlist.txt"
        userlist.write_text(f'"postgres" "{pg.scram_secret()}"\n')
        os.chmod(userlist, 0o600)
        chown_server(userlist)
        extra = ""
        if self.version >= (1, 21):
            extra = "max_prepared_statements = 200\n"
        if tls:
            extra += (f"client_tls_sslmode = allow\nclient_tls_cert_file = {tls[0]}\n"
                      f"client_tls_key_file = {tls[1]}\n")
        ini = d / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"postgres = host=127.0.0.1 port={pg.port} dbname=postgres\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = scram-sha-256\nauth_file = {userlist}\n"
            f"pool_mode = transaction\ndefault_pool_size = {pool_size}\nmin_pool_size = 0\n"
            f"reserve_pool_size = 0\nmax_client_conn = {max_client_conn}\n"
            f"logfile = {d / 'pgbouncer.log'}\npidfile = {d / 'pgbouncer.pid'}\n"
            "log_connections = 0\nlog_disconnections = 0\nlog_pooler_errors = 1\n"
            "server_reset_query =\nignore_startup_parameters = extra_float_digits\n" + extra
        )
        chown_server(ini)
        self.proc = subprocess.Popen(
            as_server_user(["pgbouncer", str(ini)], nofile=True),
            stdout=subprocess.DEVNULL, stderr=open(d / "stderr.log", "w"),
            start_new_session=True,
        )
        cleanup.add("pgbouncer", self.stop)
        self.pid = find_descendant(self.proc.pid, "pgbouncer")
        wait_port(self.port)
        log(f"PgBouncer {self.version[0]}.{self.version[1]} on 127.0.0.1:{self.port} "
            f"(PID {self.pid}, pool {pool_size})")

    def stop(self) -> None:
        kill_pid(self.pid, signal.SIGTERM)
        kill_pid(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)


class Supavisor:
    def __init__(self, cleanup: Cleanup, root: Path, pg: Postgres, pool_size: int, shards: int,
                 max_clients: int = 2000, binary: Path = SUPAVISOR_BIN,
                 tls: tuple[Path, Path] | None = None):
        if not binary.is_file():
            sys.exit(f"{binary} missing: run `cargo build --release` first")
        d = root / f"supavisor-s{shards}"
        d.mkdir()
        self.session_port, self.port, api = free_port(), free_port(), free_port()
        self.ws_port = free_port()
        self.shards = shards
        conf = d / "supavisor.toml"
        conf.write_text(
            "[proxy]\n"
            f'session_addr = "127.0.0.1:{self.session_port}"\n'
            f'transaction_addr = "127.0.0.1:{self.port}"\n'
            f'websocket_addr = "127.0.0.1:{self.ws_port}"\n'
            f"shards = {shards}\n"
            "[api]\n"
            f'addr = "127.0.0.1:{api}"\n'
            "[store]\n"
            f'path = "{d / "store"}"\n'
            "[[tenants]]\n"
            'external_id = "bench"\n'
            f'db_host = "127.0.0.1"\ndb_port = {pg.port}\ndb_database = "postgres"\n'
            f"default_pool_size = {pool_size}\ndefault_max_clients = {max_clients}\n"
            "[[tenants.users]]\n"
            f'db_user = "postgres"\ndb_password = "{PASSWORD}"\n'
            f"pool_size = {pool_size}\nmax_clients = {max_clients}\n"
            + (f'[tls]\ncert = "{tls[0]}"\nkey = "{tls[1]}"\n' if tls else "")
        )
        env = dict(os.environ, VAULT_ENC_KEY="perf-throwaway", RUST_LOG="warn")
        self.stderr_path = d / "stderr.log"
        # SUPAVISOR_WRAP="heaptrack -o /tmp/ht" (say) runs the pooler under a profiler; the
        # RSS figures are then the wrapper's, not the pooler's.
        wrap = os.environ.get("SUPAVISOR_WRAP", "").split()
        self.wrapped = bool(wrap)
        self.proc = subprocess.Popen(
            wrap + [str(binary), "--config", str(conf)],
            stdout=subprocess.PIPE, stderr=open(self.stderr_path, "w"), text=True, env=env,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        cleanup.add(f"supavisor shards={shards}", self.stop)
        lines: queue.Queue = queue.Queue()

        def reader():
            for line in self.proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=reader, daemon=True).start()
        deadline = time.time() + 60
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.time()))
            except queue.Empty:
                line = None
            if line is None:
                err = self.stderr_path.read_text()[-2000:]
                raise RuntimeError(f"supavisor did not get ready:\n{err}")
            m = re.search(r"supavisor ready session=\S+ transaction=\S+:(\d+) api=", line)
            if m:
                self.port = int(m.group(1))
                break
        log(f"supavisor shards={shards} transaction port 127.0.0.1:{self.port} (PID {self.pid})")

    def stop(self) -> None:
        if self.wrapped:
            # The pooler is a descendant of the wrapper: it gets the SIGTERM, and the wrapper
            # (a profiler writing its data) is given time to finish.
            try:
                kill_pid(find_descendant(self.pid, "supavisor", timeout=1.0), signal.SIGTERM, wait=15)
            except RuntimeError:
                pass
            wait_gone(self.pid, 120)
        kill_pid(self.pid, signal.SIGTERM, wait=15)


def wait_gone(pid: int, wait: float) -> None:
    """Waits up to `wait` seconds for a process to exit (reaping it if it is our child)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        time.sleep(0.1)


def machine_info() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout.rstrip()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
        if dirty:
            commit += " (with uncommitted changes)"
    except OSError:
        commit = "?"
    return {"cpu": cpu, "nproc": nproc, "free": free, "commit": commit}


def results_header(title: str, argv: list[str]) -> str:
    m = machine_info()
    cmd = " ".join(argv)
    return (
        f"\n## {title} — {time.strftime('%Y-%m-%d %H:%M %Z')}\n\n"
        f"- machine: {m['nproc']} cores, {m['cpu']}\n"
        f"- commit: `{m['commit']}`\n"
        f"- command: `{cmd}`\n\n"
        f"```\n$ free -g\n{m['free']}\n```\n\n"
    )


def append_results(text: str) -> Path:
    path = REPO / "perf" / "RESULTS.md"
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write("# Performance results\n\nAppended by `perf/compare.py` and `perf/idle.py`; "
                    "each section names its machine, commit and command.\n")
        f.write(text)
    return path
