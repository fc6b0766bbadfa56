//! `jobq dev` on a bare machine: when `REDIS_URL` / `DATABASE_URL` are not set and nothing
//! answers at the configured addresses, start private `redis-server` and PostgreSQL
//! (`initdb` + `pg_ctl`) instances from the binaries on PATH, on free ports, with their data in
//! `.jobq-dev/` under the current directory, and stop them on exit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use jobq_core::config::Settings;

/// Private services started for this `jobq dev`; stopped when dropped.
#[derive(Default)]
pub struct Private {
    redis: Option<std::process::Child>,
    postgres: Option<(Vec<String>, PathBuf)>,
    /// `.jobq-dev/jobq-dev.pid`, naming this process while it runs private servers on that data.
    claim: Option<PathBuf>,
}

impl Private {
    /// Claims the data in `data` (once) by writing this process's id to `.jobq-dev/jobq-dev.pid`,
    /// unless a `jobq dev` it names still runs: the data is this process's alone, and a server
    /// found running on it was left by an earlier `jobq dev` that exited at once (a second
    /// Ctrl+C), not one still in use.
    fn claim(&mut self, data: &Path) -> anyhow::Result<()> {
        if self.claim.is_some() {
            return Ok(());
        }
        std::fs::create_dir_all(data)?;
        let path = data.join("jobq-dev.pid");
        let holder = std::fs::read_to_string(&path).ok().and_then(|p| p.trim().parse::<u32>().ok());
        if let Some(pid) = holder.filter(|&p| p != std::process::id() && runs_jobq_dev(p)) {
            bail!(
                "another jobq dev (pid {pid}) runs on {}: stop it first, or start this one from another directory \
                 (if pid {pid} is no jobq dev, delete {})",
                data.display(),
                path.display()
            );
        }
        std::fs::write(&path, std::process::id().to_string()).context("writing .jobq-dev/jobq-dev.pid")?;
        self.claim = Some(path);
        Ok(())
    }
}

/// Whether process `pid` is a `jobq dev`: a program named `jobq` with the argument `dev`
/// (the pid file may name a process that reused the number of one that exited at once).
fn runs_jobq_dev(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => {
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let program = args.first().map(|a| a.rsplit(|&b| b == b'/').next().unwrap_or(a));
            program == Some(b"jobq".as_slice()) && args.iter().any(|a| *a == b"dev")
        }
        // No /proc (macOS): ask ps, less precisely.
        Err(_) if !Path::new("/proc/self").exists() => runs(pid, "jobq") && runs(pid, " dev"),
        Err(_) => false,
    }
}

/// Whether process `pid` runs a program whose command line holds `name`.
fn runs(pid: u32, name: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => String::from_utf8_lossy(&cmdline).contains(name),
        // No /proc (macOS): ask ps.
        Err(_) if !Path::new("/proc/self").exists() => std::process::Command::new("ps")
            .args(["-o", "command=", "-p", &pid.to_string()])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(name)),
        Err(_) => false,
    }
}

impl Drop for Private {
    fn drop(&mut self) {
        if let Some(mut r) = self.redis.take() {
            // SIGTERM: Redis writes its append-only file out before it exits.
            let _ = std::process::Command::new("kill").arg("-TERM").arg(r.id().to_string()).status();
            for _ in 0..100 {
                if r.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = r.kill();
            let _ = r.wait();
        }
        if let Some((prefix, dir)) = self.postgres.take() {
            let pg_ctl = find("pg_ctl").unwrap_or_else(|| PathBuf::from("pg_ctl"));
            let _ = command(&prefix, &pg_ctl).arg("-D").arg(&dir).args(["-m", "fast", "-w", "stop"]).output();
        }
        if let Some(path) = self.claim.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn env_set(names: &[&str]) -> bool {
    names.iter().any(|n| std::env::var(n).is_ok_and(|v| !v.is_empty()))
}

fn answers(url: &str, default_port: u16) -> bool {
    let Some(rest) = url.split("://").nth(1) else { return false };
    let host_port = rest.rsplit('@').next().unwrap_or(rest).split('/').next().unwrap_or("");
    let addr = if host_port.contains(':') { host_port.to_owned() } else { format!("{host_port}:{default_port}") };
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(300)).is_ok())
}

/// A binary on PATH, or in Debian's PostgreSQL directory.
fn find(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        dirs.extend(entries.flatten().map(|e| e.path().join("bin")));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `runuser -u postgres --` when running as root (PostgreSQL refuses to run as root).
fn pg_prefix() -> anyhow::Result<Vec<String>> {
    let uid = std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if uid.ok().as_deref() != Some("0") {
        return Ok(Vec::new());
    }
    let has_user = std::process::Command::new("id").arg("postgres").output().is_ok_and(|o| o.status.success());
    if !has_user || find("runuser").is_none() {
        bail!("PostgreSQL cannot run as root and there is no `postgres` user to run it as: run jobq dev as a normal user or set DATABASE_URL");
    }
    Ok(vec!["runuser".into(), "-u".into(), "postgres".into(), "--".into()])
}

fn command(prefix: &[String], program: &Path) -> std::process::Command {
    let mut c = match prefix.split_first() {
        Some((first, rest)) => {
            let mut c = std::process::Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => std::process::Command::new(program),
    };
    own_group(&mut c);
    c
}

/// Runs the child in a process group of its own: a Ctrl+C in the terminal signals the
/// terminal's foreground group, and a private server in it would stop at once, while `jobq dev`
/// still finishes its running jobs and writes their outcomes.
fn own_group(c: &mut std::process::Command) {
    #[cfg(unix)]
    std::os::unix::process::CommandExt::process_group(c, 0);
}

/// Stops a private redis-server that an earlier `jobq dev` left running (it exited at once on a
/// second Ctrl+C), named by the pid file in `dir`, so that two servers never share its data.
fn stop_leftover_redis(dir: &Path) {
    let pidfile = dir.join("redis.pid");
    let Some(pid) = std::fs::read_to_string(&pidfile).ok().and_then(|p| p.trim().parse::<u32>().ok()) else {
        return;
    };
    let is_redis = |pid: u32| runs(pid, "redis-server");
    if is_redis(pid) {
        println!("jobq dev: stopping the private redis-server an earlier run left (pid {pid})");
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        for _ in 0..100 {
            if !is_redis(pid) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let _ = std::fs::remove_file(pidfile);
}

/// Starts what is missing and points `settings` at it.
pub async fn ensure(settings: &mut Settings) -> anyhow::Result<Private> {
    let mut private = Private::default();
    let data = std::env::current_dir()?.join(".jobq-dev");
    if !env_set(&["REDIS_URL", "JOBQ_REDIS_URL"]) && !answers(&settings.redis.url, 6379) {
        let bin = find("redis-server").context(
            "nothing answers at the Redis URL and redis-server is not on PATH: install Redis 7 (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis) or set REDIS_URL",
        )?;
        let port = free_port()?;
        private.claim(&data)?;
        let dir = data.join("redis");
        std::fs::create_dir_all(&dir)?;
        stop_leftover_redis(&dir);
        println!(
            "jobq dev: no Redis at {}; starting a private redis-server on 127.0.0.1:{port} (data in {})",
            settings.redis.url,
            dir.display()
        );
        let mut redis = std::process::Command::new(bin);
        redis
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "yes"])
            .args(["--maxmemory-policy", "noeviction", "--dir"])
            .arg(&dir)
            .arg("--pidfile")
            .arg(dir.join("redis.pid"))
            .stdout(std::process::Stdio::null());
        own_group(&mut redis);
        let child = redis.spawn().context("starting redis-server")?;
        private.redis = Some(child);
        settings.redis.url = format!("redis://127.0.0.1:{port}");
        for _ in 0..100 {
            if answers(&settings.redis.url, port) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    if !env_set(&["DATABASE_URL", "JOBQ_DATABASE_URL"]) && !answers(&settings.database.url, 5432) {
        let missing = "nothing answers at the database URL and PostgreSQL's initdb/pg_ctl are not on PATH: install PostgreSQL 13+ (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql) or set DATABASE_URL";
        let initdb = find("initdb").context(missing)?;
        let pg_ctl = find("pg_ctl").context(missing)?;
        let prefix = pg_prefix()?;
        private.claim(&data)?;
        let dir = data.join("postgres");
        let port = free_port()?;
        if !dir.join("PG_VERSION").exists() {
            std::fs::create_dir_all(&dir)?;
            if !prefix.is_empty() {
                std::process::Command::new("chown").arg("-R").arg("postgres").arg(&data).status()?;
            }
            let out =
                command(&prefix, &initdb).arg("-D").arg(&dir).args(["-U", "postgres", "--auth=trust"]).output()?;
            if !out.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        if dir.join("postmaster.pid").exists() {
            // Left running by an earlier `jobq dev` that exited at once (a second Ctrl+C), or a
            // stale file: pg_ctl stops the one, and start copes with the other.
            let _ = command(&prefix, &pg_ctl).arg("-D").arg(&dir).args(["-m", "fast", "-w", "stop"]).output();
        }
        println!(
            "jobq dev: no PostgreSQL at its URL; starting a private one on 127.0.0.1:{port} (data in {})",
            dir.display()
        );
        let opts = format!("-p {port} -c listen_addresses=127.0.0.1 -k {}", dir.display());
        let out = command(&prefix, &pg_ctl)
            .arg("-D")
            .arg(&dir)
            .args(["-o", &opts, "-l"])
            .arg(dir.join("log"))
            .args(["-w", "start"])
            .output()?;
        if !out.status.success() {
            bail!("pg_ctl start failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        private.postgres = Some((prefix, dir));
        settings.database.url = format!("postgres://postgres@127.0.0.1:{port}/jobq");
    }
    Ok(private)
}
