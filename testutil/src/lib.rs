//! Test harness for jobq: every test gets its own Redis namespace and its own Postgres database
//! (migrated), removed afterwards, so the suite runs in parallel and leaves nothing behind.
//! [`Proc`] starts the real binaries for end-to-end tests.
//!
//! `REDIS_URL` and `DATABASE_URL` choose the servers (defaults: `redis://127.0.0.1:6379`,
//! `postgres://postgres@127.0.0.1:5432/postgres`; the database part names the admin database
//! used to create and drop the per-test ones).

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jobq_core::config::Settings;
use jobq_core::store::Store;
use jobq_core::stream::{Broker, Keys};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;

/// Redis URL of the tests.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Admin Postgres URL of the tests.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// One test's isolated world: a Redis namespace and a migrated Postgres database.
pub struct TestEnv {
    /// Namespace (key prefix) of this test.
    pub namespace: String,
    /// Name of this test's database.
    pub database: String,
    /// URL of this test's database.
    pub database_url: String,
    /// Pool on this test's database.
    pub pool: PgPool,
    /// Broker on this test's namespace.
    pub broker: Broker,
    /// Store on this test's database.
    pub store: Store,
    overrides: HashMap<String, String>,
    removal: Removal,
}

impl TestEnv {
    /// Creates a namespace and a migrated database. Panics with a clear message when Redis or
    /// Postgres does not answer.
    pub async fn new() -> Self {
        Self::with(&[]).await
    }

    /// Like [`TestEnv::new`], with extra settings as environment variables
    /// (`("JOBQ_WORKER_CONCURRENCY", "4")`) for [`TestEnv::settings`] and [`TestEnv::env`].
    pub async fn with(vars: &[(&str, &str)]) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let namespace = format!("test-{id}");
        let database = format!("jobq_test_{id}");
        let admin = PgConnectOptions::from_str(&database_url()).expect("DATABASE_URL is not a valid Postgres URL");
        let mut conn = admin.connect().await.unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable at DATABASE_URL={} ({e}); start it or set DATABASE_URL", database_url())
        });
        sqlx::query(&format!("CREATE DATABASE \"{database}\"")).execute(&mut conn).await.expect("create test database");
        // From here on a panic (a failed migration, say) still removes the database.
        let removal = Removal { settings: None, database: database.clone(), armed: true };
        conn.close().await.ok();
        let options = admin.clone().database(&database);
        let database_url = db_url(&database);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(5)
            .connect_with(options)
            .await
            .expect("connect test db");
        jobq_core::MIGRATOR.run(&pool).await.expect("migrate test database");
        let mut env = Self {
            namespace,
            database,
            database_url,
            pool: pool.clone(),
            broker: Broker::connect(&base_settings()).await.expect("redis settings"),
            store: Store::from_pool(pool),
            overrides: vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            removal,
        };
        let settings = env.settings();
        env.broker = Broker::connect(&settings).await.expect("redis settings");
        env.removal.settings = Some(settings);
        env.broker.ping().await.unwrap_or_else(|e| {
            panic!("Redis is not reachable at REDIS_URL={} ({e}); start it or set REDIS_URL", redis_url())
        });
        env
    }

    /// Environment variables that point a jobq process at this test's namespace and database,
    /// with fast intervals suited to tests.
    pub fn env(&self) -> HashMap<String, String> {
        let mut vars: HashMap<String, String> = [
            ("JOBQ_NAMESPACE", self.namespace.as_str()),
            ("REDIS_URL", &redis_url()),
            ("DATABASE_URL", &self.database_url),
            ("JOBQ_DATABASE_CREATE", "false"),
            ("JOBQ_AUTH", "off"),
            ("JOBQ_WORKER_POLL_INTERVAL", "1s"),
            ("JOBQ_WORKER_SHUTDOWN_TIMEOUT", "5s"),
            ("JOBQ_SCHEDULER_PROMOTE_INTERVAL", "20ms"),
            ("JOBQ_LOG_LEVEL", "info"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        vars.extend(self.overrides.clone());
        vars
    }

    /// [`TestEnv::env`] with `extra` set on top, for one process or a group of them.
    pub fn env_with(&self, extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut vars = self.env();
        vars.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        vars
    }

    /// Settings built from [`TestEnv::env`] (the process environment is not read).
    pub fn settings(&self) -> Settings {
        let vars = self.env();
        jobq_core::config::load_from(None, |name| vars.get(name).cloned()).expect("test settings")
    }

    /// Key names of this namespace.
    pub fn keys(&self) -> &Keys {
        self.broker.keys()
    }

    /// Deletes the namespace's keys and drops the database. A test that ends without calling
    /// this (it panicked, say) has the same done when its `TestEnv` is dropped.
    pub async fn cleanup(mut self) {
        self.removal.armed = false;
        self.pool.close().await;
        remove(Some(&self.broker), &self.removal.database).await.expect("remove the test's keys and database");
    }
}

/// The keys and the database of a test, removed when this is dropped while still armed.
struct Removal {
    /// Those of the namespace, once the env has them (there are no keys before).
    settings: Option<Settings>,
    database: String,
    armed: bool,
}

impl Drop for Removal {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Reached while the test unwinds, on a runtime thread that may not block: the removal
        // runs on a thread and a runtime of its own.
        let (settings, database) = (self.settings.take(), self.database.clone());
        let removed = std::thread::spawn(move || -> anyhow::Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            // A Redis the test froze (SIGSTOP) must not hang the failing test.
            runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), async {
                    let broker = match &settings {
                        Some(s) => Some(Broker::connect(s).await?),
                        None => None,
                    };
                    remove(broker.as_ref(), &database).await
                })
                .await
                .map_err(|_| anyhow::anyhow!("timed out after 10 s"))?
            })
        })
        .join();
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("test env {}: removing its keys and database failed: {e:#}", self.database),
            Err(_) => eprintln!("test env {}: removing its keys and database panicked", self.database),
        }
    }
}

/// Deletes the keys of `broker`'s namespace and drops `database` (its connections are closed).
async fn remove(broker: Option<&Broker>, database: &str) -> anyhow::Result<()> {
    if let Some(broker) = broker {
        broker.purge_namespace().await?;
    }
    let mut admin = PgConnectOptions::from_str(&database_url())?.connect().await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{database}\" WITH (FORCE)")).execute(&mut admin).await?;
    admin.close().await?;
    Ok(())
}

fn base_settings() -> Settings {
    jobq_core::config::load_from(None, |name| (name == "REDIS_URL").then(redis_url)).expect("default settings")
}

fn db_url(database: &str) -> String {
    let admin = database_url();
    match admin.rfind('/') {
        Some(i) if admin[..i].contains("://") && i > admin.find("://").unwrap_or(0) + 2 => {
            let rest = &admin[i + 1..];
            let query = rest.find('?').map(|q| &rest[q..]).unwrap_or("");
            format!("{}/{database}{query}", &admin[..i])
        }
        _ => format!("{admin}/{database}"),
    }
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Ports [`free_port`] hands out: below Linux's default ephemeral range (32768-60999), from
/// which the kernel picks the local port of every outgoing connection. A port from that range
/// could be taken by another test's connection to Redis or Postgres between the check here and
/// the spawned binary's bind.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// A TCP port on 127.0.0.1 that was free a moment ago, for a binary the test spawns. Each
/// test process (nextest runs every test in one of its own) starts at its own place in
/// [`TEST_PORTS`] and never hands out a port twice.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static START: OnceLock<u32> = OnceLock::new();
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    let start = *START.get_or_init(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        std::process::id().wrapping_mul(2_654_435_761).wrapping_add(nanos) % span
    });
    let candidates =
        (0..span).map(|_| TEST_PORTS.start + ((start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16);
    first_free(candidates).unwrap_or_else(|| panic!("no free port in {TEST_PORTS:?}"))
}

/// The first of `candidates` that binds on 127.0.0.1.
fn first_free(mut candidates: impl Iterator<Item = u16>) -> Option<u16> {
    candidates.find(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok())
}

/// Path of a workspace binary (`jobq-api`, `jobq-worker`, `jobq-scheduler`, `jobq`), built
/// with cargo first if it is missing or older than the running test (which was rebuilt after
/// a change the binary may not have).
pub fn bin_path(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<bin>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf();
    let path = dir.join(name);
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let stale = match (modified(&path), modified(&exe)) {
        (Some(bin), Some(test)) => bin < test,
        _ => true,
    };
    if stale {
        BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "--bins", "--workspace", "--quiet"])
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build --bins failed");
        });
    }
    assert!(path.exists(), "binary {} not found; run `cargo build --bins`", path.display());
    path
}

/// A real jobq process, killed when dropped.
pub struct Proc {
    child: tokio::process::Child,
    name: String,
}

impl Proc {
    /// Starts binary `name` with `env` added to the environment. Its output goes to the test's.
    pub fn spawn(name: &str, env: &HashMap<String, String>) -> Self {
        Self::spawn_args(name, &[], env)
    }

    /// Like [`Proc::spawn`], with command-line arguments.
    pub fn spawn_args(name: &str, args: &[&str], env: &HashMap<String, String>) -> Self {
        let mut cmd = tokio::process::Command::new(bin_path(name));
        cmd.args(args);
        for (var, _) in std::env::vars() {
            if var.starts_with("JOBQ_") {
                cmd.env_remove(var);
            }
        }
        cmd.envs(env).stdin(Stdio::null()).stdout(Stdio::inherit()).stderr(Stdio::inherit()).kill_on_drop(true);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { child, name: name.to_owned() }
    }

    /// Whether the process has exited (it is reaped if so).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id().expect("process still running")
    }

    /// Sends a signal (`"TERM"`, `"KILL"`, `"STOP"`, `"CONT"`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status();
        assert!(status.map(|s| s.success()).unwrap_or(false), "kill -{sig} {} failed", self.name);
    }

    /// Waits for the process to exit (at most `timeout`) and returns its exit code.
    pub async fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let status = tokio::time::timeout(timeout, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {timeout:?}", self.name))
            .expect("wait");
        status.code()
    }
}

/// HTTP client helpers for a running API.
pub struct Api {
    /// Base URL, `http://127.0.0.1:port`.
    pub base: String,
    /// The client.
    pub client: reqwest::Client,
}

impl Api {
    /// A client for the API at `127.0.0.1:port`.
    pub fn new(port: u16) -> Self {
        Self { base: format!("http://127.0.0.1:{port}"), client: reqwest::Client::new() }
    }

    /// Waits until `GET /ready` answers 200.
    pub async fn wait_ready(&self, timeout: Duration) {
        wait_until(timeout, "the API to be ready", || async {
            let r = self.client.get(format!("{}/ready", self.base)).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
    }

    /// GET a path, returning (status, JSON body).
    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.client.get(format!("{}{path}", self.base)).send().await.expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// POST JSON to a path, returning (status, JSON body).
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
        let r = self.client.post(format!("{}{path}", self.base)).json(body).send().await.expect("POST");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Waits until job `id` is in `state` and returns it.
    pub async fn wait_for_state(&self, id: &str, state: &str, timeout: Duration) -> serde_json::Value {
        wait_until(timeout, &format!("job {id} to be {state}"), || async {
            let (status, job) = self.get(&format!("/api/v1/jobs/{id}")).await;
            (status == 200 && job["state"] == state).then_some(job)
        })
        .await
    }
}

/// A TCP proxy the test owns, to cut a process off from Redis or Postgres and restore it.
pub struct TcpProxy {
    port: u16,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards every connection to `target`.
    pub async fn start(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (d, c) = (down.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if d.load(std::sync::atomic::Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                c.lock().expect("lock").push(task.abort_handle());
            }
        });
        Self { port, down, conns, accept }
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every open connection and refuses new ones until [`TcpProxy::restore`].
    pub fn cut(&self) {
        self.down.store(true, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().expect("lock").drain(..) {
            c.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.down.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// A Redis server of the test's own, on a free port with its own data directory and the
/// append-only file on (`appendfsync everysec`): for faults (kill -9, restart from the AOF,
/// SIGSTOP) the machine's shared server must never see. Killed and its directory removed when
/// dropped.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Starts `redis-server` and waits until it answers PING.
    pub fn start() -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("jobq-redis-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the Redis data directory");
        let mut server = Self { port, dir, child: None };
        server.restart();
        server
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("Redis is running")
    }

    /// Starts the server again on the same port and directory (it loads its AOF) and waits
    /// until it answers PING (not LOADING).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "Redis is still running");
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--loglevel", "warning"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server (is it installed?): {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.answers() {
            assert!(Instant::now() < deadline, "redis-server on port {} did not come up", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9, and reaps the process.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (`"STOP"`, `"CONT"`) with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = std::process::Command::new("kill").arg(format!("-{sig}")).arg(self.pid().to_string()).status();
        assert!(status.map(|s| s.success()).unwrap_or(false), "kill -{sig} redis-server failed");
    }

    fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut reply = [0u8; 5];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut reply).is_ok() && &reply == b"+PONG"
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill(); // SIGKILL ends a stopped process too
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_lie_outside_the_ephemeral_range_and_are_never_handed_out_twice() {
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next().and_then(|low| low.parse::<u16>().ok()));
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: std::collections::HashSet<_> = ports.iter().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice: {ports:?}");
        for p in &ports {
            assert!(TEST_PORTS.contains(p), "{p} is outside {TEST_PORTS:?}");
            if let Some(low) = ephemeral {
                assert!(*p < low, "{p} is in the ephemeral range starting at {low}");
            }
        }
        // What it hands out binds; a port held by a listener is passed over.
        let held = std::net::TcpListener::bind(("127.0.0.1", free_port())).unwrap();
        let taken = held.local_addr().unwrap().port();
        let next = free_port();
        assert_eq!(first_free([taken, next].into_iter()), Some(next));
        assert_eq!(first_free([taken].into_iter()), None);
    }

    /// Whether any key of `pattern` is left, and whether `database` still exists.
    async fn left_behind(pattern: &str, database: &str) -> (bool, bool) {
        let mut conn = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
        let (_, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(0)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(100_000)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut admin = PgConnectOptions::from_str(&database_url()).unwrap().connect().await.unwrap();
        let db: Option<String> = sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname = $1")
            .bind(database)
            .fetch_optional(&mut admin)
            .await
            .unwrap();
        (!keys.is_empty(), db.is_some())
    }

    async fn populated() -> (TestEnv, String, String) {
        let env = TestEnv::new().await;
        let mut conn = env.broker.connection();
        redis::cmd("SET").arg(env.keys().queues()).arg(1).query_async::<()>(&mut conn).await.unwrap();
        let (pattern, database) = (env.keys().pattern(), env.database.clone());
        assert_eq!(left_behind(&pattern, &database).await, (true, true), "the env exists before it is removed");
        (env, pattern, database)
    }

    #[tokio::test]
    async fn cleanup_removes_the_keys_and_the_database() {
        let (env, pattern, database) = populated().await;
        env.cleanup().await;
        assert_eq!(left_behind(&pattern, &database).await, (false, false));
    }

    #[tokio::test]
    async fn a_test_that_panics_leaves_nothing_behind() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let test = tokio::spawn(async move {
            let (env, pattern, database) = populated().await;
            tx.send((pattern, database)).unwrap();
            let _env = env;
            panic!("a failing assertion");
        });
        assert!(test.await.unwrap_err().is_panic());
        let (pattern, database) = rx.await.unwrap();
        assert_eq!(left_behind(&pattern, &database).await, (false, false));
    }

    #[tokio::test]
    async fn the_guard_taken_right_after_create_database_drops_it_when_armed() {
        let database = format!("jobq_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnectOptions::from_str(&database_url()).unwrap().connect().await.unwrap();
        sqlx::query(&format!("CREATE DATABASE \"{database}\"")).execute(&mut admin).await.unwrap();
        let pattern = format!("{database}:*");
        assert_eq!(left_behind(&pattern, &database).await, (false, true));
        drop(Removal { settings: None, database: database.clone(), armed: true });
        assert_eq!(left_behind(&pattern, &database).await, (false, false));
    }
}
