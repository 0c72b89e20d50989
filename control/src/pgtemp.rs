//! A throwaway PostgreSQL server: `initdb` into a fresh temporary directory, listen on
//! 127.0.0.1 on a free port, stop and delete everything on drop.
//!
//! Used by the integration tests and by `supavisor demo`. `initdb` and `postgres` refuse to run as
//! root, so when the caller is root both run as the unprivileged `postgres` OS user through
//! `runuser` (Debian's package creates that user), with the temporary directory owned by it.

use std::fs;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

/// How many times `start` picks a new port when the server fails to come up (another process can
/// take the free port between our probe and the server's bind).
const START_ATTEMPTS: usize = 3;
/// The OS user the server runs as when the caller is root.
const UNPRIVILEGED_USER: &str = "postgres";

/// Settings of a [`TempPostgres`].
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `max_connections` of the server.
    pub max_connections: u32,
    /// Extra `postgresql.conf` lines, appended last (so they win).
    pub extra_conf: Vec<String>,
    /// Password of the `postgres` superuser.
    pub password: String,
    /// `ssl = on` with this PEM certificate (chain) and key.
    pub ssl: Option<(String, String)>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            max_connections: 100,
            extra_conf: Vec::new(),
            password: "postgres".to_string(),
            ssl: None,
        }
    }
}

/// A running throwaway PostgreSQL server.
#[derive(Debug)]
pub struct TempPostgres {
    pub port: u16,
    /// Always `127.0.0.1`.
    pub host: String,
    /// Always `postgres`.
    pub superuser: String,
    pub password: String,
    pub data_dir: PathBuf,
    bindir: PathBuf,
    /// The temporary root: data directory, socket directory, log file, password file.
    root: Option<tempfile::TempDir>,
    root_path: PathBuf,
    /// `Some(user)` when server commands run through `runuser -u user --`.
    run_as: Option<String>,
    stopped: AtomicBool,
}

impl TempPostgres {
    /// Start a server with the default [`PgOptions`].
    pub fn start() -> io::Result<TempPostgres> {
        Self::start_with(PgOptions::default())
    }

    /// `initdb` a fresh cluster and start it.
    pub fn start_with(opts: PgOptions) -> io::Result<TempPostgres> {
        let bindir = Self::bindir()?;
        let is_root = unsafe { libc::geteuid() } == 0;
        let owner = if is_root {
            Some(lookup_user(UNPRIVILEGED_USER)?)
        } else {
            None
        };
        // As root, the unprivileged server user must be able to reach the directory: /tmp is
        // world-traversable, a root-only $TMPDIR may not be.
        let parent = if is_root {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let root = tempfile::Builder::new()
            .prefix("supavisor-pg.")
            .tempdir_in(&parent)?;
        let root_path = root.path().to_path_buf();
        let data_dir = root_path.join("data");
        let pwfile = root_path.join("pwfile");
        {
            let mut f = fs::File::create(&pwfile)?;
            f.write_all(opts.password.as_bytes())?;
            f.write_all(b"\n")?;
        }
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&root_path, Some(uid), Some(gid))?;
            std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid))?;
        }

        let mut pg = TempPostgres {
            port: 0,
            host: "127.0.0.1".to_string(),
            superuser: "postgres".to_string(),
            password: opts.password.clone(),
            data_dir: data_dir.clone(),
            bindir,
            root: Some(root),
            root_path: root_path.clone(),
            run_as: owner.map(|_| UNPRIVILEGED_USER.to_string()),
            // Nothing to stop until pg_ctl start succeeded.
            stopped: AtomicBool::new(true),
        };

        let out = pg.server_command("initdb", |c| {
            c.arg("-D")
                .arg(&data_dir)
                .args(["-U", "postgres", "--auth=scram-sha-256", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync"])
                .arg(format!("--pwfile={}", pwfile.display()));
        })?;
        check_output("initdb", &out)?;
        fs::remove_file(&pwfile)?;

        let mut conf = format!(
            "\n# supavisor pgtemp\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\n\
             max_connections = {}\n\
             password_encryption = 'scram-sha-256'\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n",
            root_path.display(),
            opts.max_connections
        );
        if let Some((cert, key)) = &opts.ssl {
            // The key must belong to the server's user, mode 0600.
            for (name, pem) in [("server.crt", cert), ("server.key", key)] {
                let path = root_path.join(name);
                fs::write(&path, pem)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                }
            }
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{0}/server.crt'\nssl_key_file = '{0}/server.key'\n",
                root_path.display()
            ));
        }
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        append(&data_dir.join("postgresql.conf"), &conf)?;

        pg.start_on_free_port()?;
        Ok(pg)
    }

    /// A streaming replica of `primary` (which needs `wal_level = replica`,
    /// PostgreSQL's default, a `replication` line in `pg_hba.conf`, which
    /// `initdb` writes for 127.0.0.1, and free WAL senders): `pg_basebackup
    /// -R` into a fresh directory, then started as a hot standby on its own
    /// port. Stopped and deleted on drop like any [`TempPostgres`].
    pub fn start_replica_of(primary: &TempPostgres) -> io::Result<TempPostgres> {
        let bindir = Self::bindir()?;
        let is_root = unsafe { libc::geteuid() } == 0;
        let owner = if is_root {
            Some(lookup_user(UNPRIVILEGED_USER)?)
        } else {
            None
        };
        let parent = if is_root {
            PathBuf::from("/tmp")
        } else {
            std::env::temp_dir()
        };
        let root = tempfile::Builder::new()
            .prefix("supavisor-pg-replica.")
            .tempdir_in(&parent)?;
        let root_path = root.path().to_path_buf();
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&root_path, Some(uid), Some(gid))?;
        }
        let data_dir = root_path.join("data");
        let mut pg = TempPostgres {
            port: 0,
            host: primary.host.clone(),
            superuser: primary.superuser.clone(),
            password: primary.password.clone(),
            data_dir: data_dir.clone(),
            bindir,
            root: Some(root),
            root_path: root_path.clone(),
            run_as: owner.map(|_| UNPRIVILEGED_USER.to_string()),
            stopped: AtomicBool::new(true),
        };
        // The password travels in the connection string, which -R writes
        // into primary_conninfo for the standby to use.
        let conninfo = format!(
            "host={} port={} user={} password={}",
            primary.host, primary.port, primary.superuser, primary.password
        );
        let out = pg.server_command("pg_basebackup", |c| {
            c.arg("-d").arg(&conninfo).arg("-D").arg(&data_dir).args([
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ]);
        })?;
        check_output("pg_basebackup", &out)?;
        append(
            &data_dir.join("postgresql.conf"),
            &format!(
                "\n# supavisor pgtemp replica\nunix_socket_directories = '{}'\nhot_standby = on\n",
                root_path.display()
            ),
        )?;
        pg.start_on_free_port()?;
        Ok(pg)
    }

    /// Starts the server of `data_dir` on a free port (retried on another
    /// port when the one found free was taken meanwhile).
    fn start_on_free_port(&mut self) -> io::Result<()> {
        let log = self.log_file();
        let mut last_err = None;
        for _ in 0..START_ATTEMPTS {
            let port = free_port()?;
            append(
                &self.data_dir.join("postgresql.conf"),
                &format!("port = {port}\n"),
            )?;
            let data_dir = self.data_dir.clone();
            let out = self.server_command("pg_ctl", |c| {
                c.arg("-D")
                    .arg(&data_dir)
                    .arg("-l")
                    .arg(&log)
                    .args(["-w", "-t", "60", "start"]);
            })?;
            match check_output("pg_ctl start", &out) {
                Ok(()) => {
                    self.port = port;
                    self.stopped.store(false, Ordering::SeqCst);
                    return Ok(());
                }
                Err(e) => {
                    let tail = fs::read_to_string(&log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(20).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    last_err = Some(io::Error::new(
                        e.kind(),
                        format!("{e}\nserver log:\n{}", tail.join("\n")),
                    ));
                }
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("pg_ctl start failed")))
    }

    /// `pg_ctl stop -m immediate` (as if the server were killed: no
    /// shutdown checkpoint, connections dropped without a goodbye), keeping
    /// the data directory for `start_again`.
    pub fn kill_for_now(&self) -> io::Result<()> {
        let out = self.server_command("pg_ctl", |c| {
            c.arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "immediate", "-w", "-t", "60"]);
        })?;
        check_output("pg_ctl stop", &out)
    }

    /// The directory holding `initdb`, `pg_ctl`, `postgres`, `psql` and `pgbench`:
    /// `pg_config --bindir` if it has `initdb`, else the newest `/usr/lib/postgresql/*/bin`.
    pub fn bindir() -> io::Result<PathBuf> {
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if dir.join("initdb").is_file() {
                    return Ok(dir);
                }
            }
        }
        let mut best: Option<(Vec<u32>, PathBuf)> = None;
        if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let version: Vec<u32> = name.split('.').filter_map(|p| p.parse().ok()).collect();
                let bin = entry.path().join("bin");
                if version.is_empty() || !bin.join("initdb").is_file() {
                    continue;
                }
                if best.as_ref().is_none_or(|(v, _)| version > *v) {
                    best = Some((version, bin));
                }
            }
        }
        best.map(|(_, bin)| bin).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no PostgreSQL binaries: neither `pg_config --bindir` nor /usr/lib/postgresql/*/bin has initdb",
            )
        })
    }

    /// `postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres`
    pub fn url(&self) -> String {
        format!(
            "postgres://{}:{}@{}:{}/postgres",
            self.superuser,
            percent_encode(&self.password),
            self.host,
            self.port
        )
    }

    /// The server log (`pg_ctl -l`).
    pub fn log_file(&self) -> PathBuf {
        self.root_path.join("postgres.log")
    }

    /// Run `psql -X -A -t -v ON_ERROR_STOP=1 -c SQL` as the superuser; returns stdout, or an
    /// error carrying stderr.
    pub fn psql(&self, sql: &str) -> io::Result<String> {
        let out = Command::new(self.bindir.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", &self.host, "-p", &self.port.to_string()])
            .args(["-U", &self.superuser, "-d", "postgres", "-c", sql])
            .env("PGPASSWORD", &self.password)
            .env("PGSSLMODE", "disable")
            .stdin(Stdio::null())
            .output()?;
        check_output("psql", &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `pg_ctl restart -m fast`: every connection is closed, the server is
    /// back (same port) when this returns.
    pub fn restart(&self) -> io::Result<()> {
        let log = self.log_file();
        let out = self.server_command("pg_ctl", |c| {
            c.arg("restart")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "fast", "-w", "-t", "60", "-l"])
                .arg(&log);
        })?;
        check_output("pg_ctl restart", &out)
    }

    /// `pg_ctl stop -m fast`, keeping the data directory for `start_again`.
    pub fn stop_for_now(&self) -> io::Result<()> {
        let out = self.server_command("pg_ctl", |c| {
            c.arg("stop")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-m", "fast", "-w", "-t", "60"]);
        })?;
        check_output("pg_ctl stop", &out)
    }

    /// Starts a server stopped by `stop_for_now` again, on the same port.
    pub fn start_again(&self) -> io::Result<()> {
        let log = self.log_file();
        let out = self.server_command("pg_ctl", |c| {
            c.arg("start")
                .arg("-D")
                .arg(&self.data_dir)
                .args(["-w", "-t", "60", "-l"])
                .arg(&log);
        })?;
        check_output("pg_ctl start", &out)
    }

    /// `pg_ctl stop -m fast`. Idempotent; also runs on drop.
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    /// `pg_ctl stop -m immediate` through a shared reference, for exit hooks of a server kept in
    /// a `static` (statics are never dropped). Idempotent. Also removes the temporary directory,
    /// since the owning value will not be dropped.
    pub fn stop_immediate(&self) {
        self.stop_mode("immediate");
        let _ = fs::remove_dir_all(&self.root_path);
    }

    fn stop_mode(&self, mode: &str) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let data_dir = self.data_dir.clone();
        let _ = self.server_command("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data_dir)
                .args(["-m", mode, "-w", "-t", "30", "stop"]);
        });
    }

    /// Run a server binary of `bindir`, as the unprivileged user when we are root.
    fn server_command(&self, program: &str, args: impl FnOnce(&mut Command)) -> io::Result<Output> {
        let exe = self.bindir.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(exe);
                c
            }
            None => Command::new(exe),
        };
        args(&mut cmd);
        // The server user may not be able to read the caller's working directory.
        cmd.current_dir(&self.root_path)
            .stdin(Stdio::null())
            .env("LC_ALL", "C")
            .output()
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.stop();
        if let Some(root) = self.root.take() {
            let _ = root.close();
        }
    }
}

fn check_output(what: &str, out: &Output) -> io::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{what} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    )))
}

fn append(path: &Path, text: &str) -> io::Result<()> {
    let mut f = fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())
}

/// A port that was free a moment ago on 127.0.0.1.
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// uid and gid of an OS user.
fn lookup_user(name: &str) -> io::Result<(u32, u32)> {
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: getpwnam returns a pointer into static storage or null; we copy the two fields out
    // at once. Callers in one process race only with other getpwnam users, and tests do not.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    if pw.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("running as root needs an OS user `{name}` to run PostgreSQL as"),
        ));
    }
    let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
    Ok((uid, gid))
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
