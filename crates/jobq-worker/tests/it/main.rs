//! The worker in-process against real Redis: handlers, failures, timeouts, panics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use jobq_core::backoff::{Backoff, Jitter, Strategy};
use jobq_core::job::{JobId, JobInfo, JobState, NewJob};
use jobq_testutil::{wait_until, TestEnv};
use jobq_worker::{HandlerError, JobContext, Registry, Worker};
use serde_json::json;
use tokio_util::sync::CancellationToken;

mod library;

const WAIT: Duration = Duration::from_secs(20);

pub(crate) fn fast_retry() -> Backoff {
    Backoff {
        strategy: Strategy::Constant,
        jitter: Jitter::None,
        base: Duration::from_millis(20),
        max: Duration::from_millis(20),
    }
}

/// Runs a worker (and a promoter loop for retries) until the returned token is cancelled.
pub(crate) fn start(env: &TestEnv, registry: Registry) -> Started {
    let settings = env.settings();
    let token = CancellationToken::new();
    let worker = Worker::new(env.broker.clone(), registry, settings.worker.clone(), Duration::from_millis(300));
    let handle = tokio::spawn(worker.run(token.clone()));
    let (broker, t) = (env.broker.clone(), token.clone());
    tokio::spawn(async move {
        while !t.is_cancelled() {
            let queues = broker.queues().await.unwrap_or_default();
            let _ = broker.promote(&queues, 100).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    (token, handle)
}

/// A worker started by [`start`]: its stop token and its task.
pub(crate) type Started = (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>);

/// Stops the workers (each must end cleanly) and removes the test's namespace and database.
pub(crate) async fn finish(env: TestEnv, workers: impl IntoIterator<Item = Started>) {
    for (token, handle) in workers {
        token.cancel();
        handle.await.unwrap().unwrap();
    }
    env.cleanup().await;
}

pub(crate) async fn wait_state(env: &TestEnv, id: JobId, state: JobState) -> JobInfo {
    wait_until(WAIT, &format!("job to be {state}"), || async {
        let job = env.broker.job(id).await.unwrap()?;
        (job.state == state).then_some(job)
    })
    .await
}

#[derive(serde::Deserialize)]
struct Add {
    a: i64,
    b: i64,
}

#[tokio::test]
async fn typed_handlers_get_their_payload_and_store_their_result() {
    let env = TestEnv::new().await;
    let mut registry = Registry::new();
    registry.register_typed("add", |p: Add, ctx: JobContext| async move {
        Ok::<_, HandlerError>(json!({"sum": p.a + p.b, "attempt": ctx.attempt}))
    });
    let (token, handle) = start(&env, registry);
    let id = env.broker.enqueue(NewJob::new("add", json!({"a": 2, "b": 40}))).await.unwrap().job.id;
    let job = wait_state(&env, id, JobState::Succeeded).await;
    assert_eq!(job.result, Some(json!({"sum": 42, "attempt": 1})));

    let bad = env.broker.enqueue(NewJob::new("add", json!({"a": "two"})).max_attempts(5)).await.unwrap().job.id;
    let job = wait_state(&env, bad, JobState::Dead).await;
    assert_eq!(job.attempt, 1, "a payload that does not deserialize is not retried");
    assert!(job.last_error.unwrap().contains("does not match its schema"));
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_job_whose_envelope_does_not_decode_is_left_to_the_reaper_and_its_batch_runs() {
    let env = TestEnv::new().await;
    let ran = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    let r = ran.clone();
    registry.register("count", move |_ctx: JobContext| {
        let r = r.clone();
        async move {
            r.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        }
    });
    let ids: Vec<JobId> = {
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(env.broker.enqueue(NewJob::new("count", json!({"n": n}))).await.unwrap().job.id);
        }
        ids
    };
    let queue = jobq_core::job::QueueName::default_queue();
    let _: () = redis::AsyncCommands::hset(
        &mut env.broker.connection(),
        env.keys().job(&queue, ids[1]),
        "envelope",
        "{\"v\": 1, \"id\": ",
    )
    .await
    .unwrap();
    let mut settings = env.settings();
    settings.worker.lease = Duration::from_millis(300);
    settings.worker.heartbeat = Duration::from_millis(100);
    settings.worker.reaper_interval = Duration::from_millis(100);
    settings.worker.max_reclaims = 2;
    let token = CancellationToken::new();
    let worker = Worker::new(env.broker.clone(), registry, settings.worker.clone(), Duration::from_millis(300));
    let handle = tokio::spawn(worker.run(token.clone()));
    wait_state(&env, ids[0], JobState::Succeeded).await;
    wait_state(&env, ids[2], JobState::Succeeded).await;
    // Never run; its lease lapses, the reaper re-queues it, and past max_reclaims it is dead.
    // (Read field by field: the job's view needs its envelope.)
    let key = env.keys().job(&queue, ids[1]);
    let (state, reason, reclaims) = wait_until(WAIT, "the undecodable job to be dead", || async {
        let fields: (Option<String>, Option<String>, Option<u32>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("state")
            .arg("dead_reason")
            .arg("reclaims")
            .query_async(&mut env.broker.connection())
            .await
            .unwrap();
        (fields.0.as_deref() == Some("dead")).then_some(fields)
    })
    .await;
    assert_eq!((state.as_deref(), reason.as_deref()), (Some("dead"), Some("max_reclaims")));
    assert!(reclaims.unwrap_or(0) >= 2, "reclaims {reclaims:?}");
    assert_eq!(ran.load(Ordering::SeqCst), 2);
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_panicking_handler_fails_its_attempt_and_the_worker_lives_on() {
    let env = TestEnv::new().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::with_builtins();
    let c = calls.clone();
    registry.register("explode", move |_ctx: JobContext| {
        let c = c.clone();
        async move {
            if c.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("kaboom");
            }
            Ok(None)
        }
    });
    let (token, handle) = start(&env, registry);
    let id = env.broker.enqueue(NewJob::new("explode", json!({})).backoff(fast_retry())).await.unwrap().job.id;
    let job = wait_state(&env, id, JobState::Succeeded).await;
    assert_eq!(job.attempt, 2, "the panic spent one attempt and was retried");
    let echo = env.broker.enqueue(NewJob::new("echo", json!(1))).await.unwrap().job.id;
    wait_state(&env, echo, JobState::Succeeded).await;
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_handler_past_its_timeout_is_cancelled_and_the_attempt_fails() {
    let env = TestEnv::new().await;
    let (token, handle) = start(&env, Registry::with_builtins());
    let mut job = NewJob::new("sleep", json!({"ms": 5000})).max_attempts(2).backoff(fast_retry());
    job.timeout = Some(Duration::from_millis(100));
    let started = std::time::Instant::now();
    let id = env.broker.enqueue(job).await.unwrap().job.id;
    let job = wait_state(&env, id, JobState::Dead).await;
    assert!(started.elapsed() < Duration::from_secs(4), "both attempts were cut at their timeout");
    assert_eq!(job.attempt, 2);
    assert!(job.last_error.unwrap().contains("timed out after 100ms"));
    finish(env, [(token, handle)]).await;
}

/// Registers `stubborn`: a handler that ignores cancellation and succeeds with `result` once the
/// returned `Notify` lets it (after the shutdown timeout, in the tests below).
fn stubborn(registry: &mut Registry, result: Option<serde_json::Value>) -> Arc<tokio::sync::Notify> {
    let go = Arc::new(tokio::sync::Notify::new());
    let g = go.clone();
    registry.register("stubborn", move |_ctx: JobContext| {
        let (g, result) = (g.clone(), result.clone());
        async move {
            g.notified().await;
            Ok(result)
        }
    });
    go
}

#[tokio::test]
async fn past_the_shutdown_timeout_a_late_success_is_written_and_a_cancelled_attempt_is_handed_back_uncounted() {
    let env = TestEnv::new().await;
    let mut registry = Registry::with_builtins();
    let go = stubborn(&mut registry, Some(json!("finished")));
    // Stops when told to, with an error.
    registry.register("polite", |ctx: JobContext| async move {
        ctx.cancel.cancelled().await;
        Err(HandlerError::retry(anyhow::anyhow!("stopped: shutting down")))
    });
    let mut settings = env.settings().worker.clone();
    settings.shutdown_timeout = Duration::from_millis(200);
    let worker = Worker::new(env.broker.clone(), registry, settings, Duration::from_secs(30));
    let token = CancellationToken::new();
    let handle = tokio::spawn(worker.run(token.clone()));
    let stubborn = env.broker.enqueue(NewJob::new("stubborn", json!({}))).await.unwrap().job.id;
    let polite = env.broker.enqueue(NewJob::new("polite", json!({}))).await.unwrap().job.id;
    wait_state(&env, stubborn, JobState::Running).await;
    wait_state(&env, polite, JobState::Running).await;
    token.cancel();
    // Past the 200 ms shutdown timeout: both jobs are given up, and the stubborn one returns.
    tokio::time::sleep(Duration::from_millis(600)).await;
    go.notify_one();
    handle.await.unwrap().unwrap();
    let done = env.broker.job(stubborn).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded, "its success is not thrown away to run it again");
    assert_eq!(done.result, Some(json!("finished")));
    let left = env.broker.job(polite).await.unwrap().unwrap();
    assert_eq!(left.state, JobState::Running, "left pending for the reaper, not failed");
    assert_eq!(left.attempt, 1);
    assert!(left.last_error.is_none(), "the error it returned on cancellation spent no attempt");
    // The next worker's first reaper pass takes it, well before its 30 s lease lapses, and a
    // graceful stop does not count as a crash.
    let mut registry = Registry::new();
    registry.register("polite", |_ctx: JobContext| async move { Ok(Some(json!("ran again"))) });
    let started = std::time::Instant::now();
    let next = start(&env, registry);
    let done = wait_state(&env, polite, JobState::Succeeded).await;
    assert!(started.elapsed() < Duration::from_secs(15), "re-queued by the next reaper pass, not after the lease");
    assert_eq!(done.result, Some(json!("ran again")));
    assert_eq!(done.attempt, 1, "the given-up attempt spent nothing");
    assert_eq!(done.reclaims, 0, "a job given up at a graceful stop is not counted as reclaimed");
    finish(env, [next]).await;
}

#[tokio::test]
async fn an_outcome_whose_write_fails_after_the_shutdown_timeout_is_retried_within_the_grace() {
    let env = TestEnv::new().await;
    let redis: std::net::SocketAddr = jobq_testutil::redis_url()
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .parse()
        .expect("REDIS_URL as redis://host:port");
    let proxy = jobq_testutil::TcpProxy::start(redis).await;
    let mut settings = env.settings();
    settings.redis.url = format!("redis://127.0.0.1:{}", proxy.port());
    settings.redis.timeout = Duration::from_millis(300);
    settings.worker.shutdown_timeout = Duration::from_millis(200);
    let broker = jobq_core::stream::Broker::connect(&settings).await.unwrap();
    let mut registry = Registry::new();
    let go = stubborn(&mut registry, None);
    let token = CancellationToken::new();
    let handle =
        tokio::spawn(Worker::new(broker, registry, settings.worker, Duration::from_secs(30)).run(token.clone()));
    let id = env.broker.enqueue(NewJob::new("stubborn", json!({}))).await.unwrap().job.id;
    wait_state(&env, id, JobState::Running).await;
    token.cancel();
    // Past the 200 ms shutdown timeout, Redis becomes unreachable from the worker, then the
    // handler returns; Redis comes back 1.5 s later.
    tokio::time::sleep(Duration::from_millis(600)).await;
    proxy.cut();
    go.notify_one();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.restore();
    handle.await.unwrap().unwrap();
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded, "the write was retried after the jobs were given up");
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_with_a_shorter_lease_does_not_take_a_job_another_worker_still_renews() {
    let env = TestEnv::new().await;
    let slow = || {
        let mut r = Registry::with_builtins();
        r.register("slow", |_ctx: JobContext| async {
            tokio::time::sleep(Duration::from_millis(2500)).await;
            Ok(None)
        });
        r
    };
    let mut long = env.settings().worker.clone();
    (long.lease, long.heartbeat, long.reaper_interval) =
        (Duration::from_secs(3), Duration::from_millis(1500), Duration::from_millis(500));
    let mut short = long.clone();
    (short.lease, short.heartbeat, short.reaper_interval) =
        (Duration::from_millis(400), Duration::from_millis(100), Duration::from_millis(100));
    let a = CancellationToken::new();
    let ha = tokio::spawn(Worker::new(env.broker.clone(), slow(), long, Duration::from_secs(30)).run(a.clone()));
    let id = env.broker.enqueue(NewJob::new("slow", json!({}))).await.unwrap().job.id;
    wait_state(&env, id, JobState::Running).await;
    // A second worker, configured with a lease shorter than the first one's heartbeat.
    let b = CancellationToken::new();
    let hb = tokio::spawn(Worker::new(env.broker.clone(), slow(), short, Duration::from_secs(30)).run(b.clone()));
    let job = wait_state(&env, id, JobState::Succeeded).await;
    assert_eq!((job.reclaims, job.attempt, job.run), (0, 1, 1), "it ran once, on the worker that took it");
    finish(env, [(a, ha), (b, hb)]).await;
}

#[tokio::test]
async fn fail_handler_fails_its_first_n_attempts_then_succeeds() {
    let env = TestEnv::new().await;
    let (token, handle) = start(&env, Registry::with_builtins());
    let id = env.broker.enqueue(NewJob::new("fail", json!({"times": 2})).backoff(fast_retry())).await.unwrap().job.id;
    let job = wait_state(&env, id, JobState::Succeeded).await;
    assert_eq!(job.attempt, 3);
    let always = env
        .broker
        .enqueue(NewJob::new("fail", json!({"message": "nope"})).max_attempts(3).backoff(fast_retry()))
        .await
        .unwrap();
    let job = wait_state(&env, always.job.id, JobState::Dead).await;
    assert_eq!(job.attempt, 3);
    assert!(job.last_error.unwrap().starts_with("nope"));
    finish(env, [(token, handle)]).await;
}

/// Runs `per_queue` jobs in each of `default` and `urgent` (enqueued alternately, default first)
/// on a worker serving `urgent,default` in strict order with `concurrency` slots, each job taking
/// `takes`; returns the queues in the order their jobs started.
async fn start_order(concurrency: &str, per_queue: usize, takes: Duration) -> Vec<String> {
    let env =
        TestEnv::with(&[("JOBQ_WORKER_QUEUES", "urgent,default"), ("JOBQ_WORKER_CONCURRENCY", concurrency)]).await;
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    let o = order.clone();
    registry.register("record", move |ctx: JobContext| {
        let o = o.clone();
        async move {
            o.lock().unwrap().push(ctx.queue.to_string());
            tokio::time::sleep(takes).await;
            Ok(None)
        }
    });
    for _ in 0..per_queue {
        env.broker.enqueue(NewJob::new("record", json!({}))).await.unwrap();
        env.broker.enqueue(NewJob::new("record", json!({})).queue("urgent".parse().unwrap())).await.unwrap();
    }
    let (token, handle) = start(&env, registry);
    let all = 2 * per_queue;
    wait_until(WAIT, "every job to start", || async { (order.lock().unwrap().len() == all).then_some(()) }).await;
    let order = order.lock().unwrap().clone();
    finish(env, [(token, handle)]).await;
    order
}

#[tokio::test]
async fn a_queue_with_a_backlog_keeps_every_free_slot_from_the_queues_after_it() {
    // Four slots are fetched two at a time: the slots left after a full fetch of `urgent` must
    // not go to `default` while `urgent` still has ready jobs.
    let order = start_order("4", 8, Duration::from_millis(50)).await;
    assert_eq!(order[..8], ["urgent"; 8], "{order:?}");
    assert_eq!(order[8..], ["default"; 8], "{order:?}");
}

#[tokio::test]
async fn jobs_are_served_in_the_configured_queue_order() {
    let order = start_order("1", 3, Duration::ZERO).await;
    assert_eq!(order, ["urgent", "urgent", "urgent", "default", "default", "default"]);
}

#[tokio::test]
async fn with_a_backlog_and_two_fetches_in_flight_slots_hold_each_job_runs_once_and_order_holds() {
    // Jobs that return at once, so that the worker sends the next fetch of `urgent` before the
    // reply of the one in flight. Still at most `concurrency` handlers at a time, each job once,
    // and no `default` job starts while an `urgent` one waits in its streams.
    let env = TestEnv::with(&[("JOBQ_WORKER_QUEUES", "urgent,default"), ("JOBQ_WORKER_CONCURRENCY", "8")]).await;
    let urgent: jobq_core::job::QueueName = "urgent".parse().unwrap();
    let runs = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<JobId, usize>::new()));
    let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let waiting_urgent = Arc::new(tokio::sync::OnceCell::<u64>::new());
    let mut registry = Registry::new();
    let (r, now, most, waiting, broker, q) =
        (runs.clone(), running.clone(), peak.clone(), waiting_urgent.clone(), env.broker.clone(), urgent.clone());
    registry.register("noop", move |ctx: JobContext| {
        let (r, now, most, waiting, broker, q) =
            (r.clone(), now.clone(), most.clone(), waiting.clone(), broker.clone(), q.clone());
        async move {
            most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
            *r.lock().unwrap().entry(ctx.id).or_default() += 1;
            if ctx.queue != q {
                waiting
                    .get_or_init(|| async {
                        let stats = broker.queue_stats(std::slice::from_ref(&q)).await.unwrap();
                        stats[0].queued.values().sum()
                    })
                    .await;
            }
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(None)
        }
    });
    let per_queue = 400;
    let jobs = (0..per_queue)
        .flat_map(|_| [NewJob::new("noop", json!({})), NewJob::new("noop", json!({})).queue(urgent.clone())])
        .collect();
    let ids: Vec<JobId> =
        env.broker.enqueue_many(jobs, true).await.unwrap().into_iter().map(|i| i.unwrap().job.id).collect();
    let (token, handle) = start(&env, registry);
    wait_until(WAIT, "every job to run", || async { (runs.lock().unwrap().len() == ids.len()).then_some(()) }).await;
    for id in &ids {
        wait_state(&env, *id, JobState::Succeeded).await;
    }
    let runs = runs.lock().unwrap().clone();
    assert!(runs.values().all(|&n| n == 1), "a job ran twice: {runs:?}");
    assert!(peak.load(Ordering::SeqCst) <= 8, "{} handlers at once with 8 slots", peak.load(Ordering::SeqCst));
    assert_eq!(waiting_urgent.get(), Some(&0), "a default job started while urgent jobs waited");
    finish(env, [(token, handle)]).await;
}

/// How the reply of a fetch never reaches the worker.
enum LostReply {
    /// Redis is frozen (SIGSTOP) past the worker's timeout while the fetch waits in it.
    TimedOut,
    /// The fetch waits in the frozen server's socket, and the proxy the worker goes through
    /// drops the connection before any reply; the worker reconnects while Redis is still frozen.
    ConnectionDropped,
}

/// A job started by a fetch whose reply was lost runs again long before its 30 s lease lapses,
/// counting neither an attempt nor a reclaim. A Redis server of the test's own, one slot: the
/// fetch that starts `quick` goes out once `stubborn` returns, while Redis is frozen.
async fn a_lost_fetch_reply_hands_its_job_back(how: LostReply) {
    let redis = jobq_testutil::RedisServer::start();
    let timeout = match how {
        LostReply::TimedOut => "300ms",
        LostReply::ConnectionDropped => "1s",
    };
    let env = TestEnv::with(&[
        ("REDIS_URL", &redis.url()),
        ("JOBQ_REDIS_TIMEOUT", timeout),
        ("JOBQ_WORKER_CONCURRENCY", "2"),
        ("JOBQ_WORKER_LEASE", "30s"),
        ("JOBQ_WORKER_HEARTBEAT", "1s"),
        ("JOBQ_WORKER_REAPER_INTERVAL", "200ms"),
    ])
    .await;
    let proxy = jobq_testutil::TcpProxy::start(redis.url().trim_start_matches("redis://").parse().unwrap()).await;
    let mut settings = env.settings();
    if matches!(how, LostReply::ConnectionDropped) {
        settings.redis.url = format!("redis://127.0.0.1:{}", proxy.port());
    }
    let broker = jobq_core::stream::Broker::connect(&settings).await.unwrap();
    let mut registry = Registry::new();
    let go = stubborn(&mut registry, None);
    registry.register("quick", |_ctx: JobContext| async { Ok(Some(json!("ran"))) });
    let token = CancellationToken::new();
    let handle =
        tokio::spawn(Worker::new(broker, registry, settings.worker, Duration::from_secs(30)).run(token.clone()));
    let first = env.broker.enqueue(NewJob::new("stubborn", json!({}))).await.unwrap().job.id;
    wait_state(&env, first, JobState::Running).await;
    let quick = env.broker.enqueue(NewJob::new("quick", json!({}))).await.unwrap().job.id;
    redis.signal("STOP");
    go.notify_one();
    match how {
        LostReply::TimedOut => tokio::time::sleep(Duration::from_millis(1500)).await,
        LostReply::ConnectionDropped => {
            tokio::time::sleep(Duration::from_millis(200)).await;
            proxy.cut();
            tokio::time::sleep(Duration::from_millis(300)).await;
            proxy.restore();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    redis.signal("CONT");
    let back = std::time::Instant::now();
    let job = wait_state(&env, quick, JobState::Succeeded).await;
    assert!(back.elapsed() < Duration::from_secs(10), "ran again after {:?}, not after its 30 s lease", back.elapsed());
    assert_eq!(
        (job.attempt, job.reclaims),
        (1, 0),
        "the attempt whose reply was lost counts neither as an attempt nor as a reclaim"
    );
    assert_eq!(job.result, Some(json!("ran")));
    assert_eq!(wait_state(&env, first, JobState::Succeeded).await.attempt, 1);
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_job_whose_fetch_reply_timed_out_runs_long_before_its_lease_lapses_and_counts_nothing() {
    a_lost_fetch_reply_hands_its_job_back(LostReply::TimedOut).await;
}

#[tokio::test]
async fn a_job_whose_fetch_lost_its_connection_runs_long_before_its_lease_lapses_and_counts_nothing() {
    a_lost_fetch_reply_hands_its_job_back(LostReply::ConnectionDropped).await;
}

#[tokio::test]
async fn jobs_whose_fetch_reply_waits_behind_a_handler_holding_the_runtime_keep_their_lease() {
    // The worker on a runtime of its own with one thread, which `hog` holds without yielding
    // for three leases. The fetch sent beside it starts `quick` in Redis, but its reply waits
    // for that thread, so the worker cannot register `quick` for renewal meanwhile. Another
    // worker's reaper looks for lapsed leases all along.
    let env = TestEnv::with(&[
        ("JOBQ_WORKER_CONCURRENCY", "2"),
        ("JOBQ_WORKER_LEASE", "600ms"),
        ("JOBQ_WORKER_HEARTBEAT", "200ms"),
    ])
    .await;
    let seen_running = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut registry = Registry::new();
    let seen = seen_running.clone();
    registry.register("hog", move |_ctx: JobContext| {
        let seen = seen.clone();
        async move {
            let since = std::time::Instant::now();
            while !seen.load(Ordering::SeqCst) && since.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(1800));
            Ok(None)
        }
    });
    registry.register("quick", |_ctx: JobContext| async { Ok(Some(json!("ran"))) });
    let hog = env.broker.enqueue(NewJob::new("hog", json!({}))).await.unwrap().job.id;
    let quick = env.broker.enqueue(NewJob::new("quick", json!({}))).await.unwrap().job.id;
    let settings = env.settings();
    let token = CancellationToken::new();
    let worker = Worker::new(env.broker.clone(), registry, settings.worker.clone(), Duration::from_secs(30));
    let t = token.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async move { tokio::spawn(worker.run(t)).await.unwrap() })
    });
    wait_state(&env, quick, JobState::Running).await;
    seen_running.store(true, Ordering::SeqCst);
    assert_eq!(
        env.broker.job(hog).await.unwrap().unwrap().state,
        JobState::Running,
        "quick started while hog holds the worker's thread"
    );
    let queue = jobq_core::job::QueueName::default_queue();
    let reaping = std::time::Instant::now();
    let mut reclaimed = 0;
    while reaping.elapsed() < Duration::from_millis(2500) {
        let r = env
            .broker
            .reclaim(
                "other-worker",
                std::slice::from_ref(&queue),
                Duration::from_millis(600),
                5,
                Duration::from_secs(1),
            )
            .await
            .unwrap();
        reclaimed += r.iter().map(|r| r.requeued + r.dead).sum::<u64>();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job = wait_state(&env, quick, JobState::Succeeded).await;
    assert_eq!((reclaimed, job.reclaims, job.attempt, job.run), (0, 0, 1, 1), "quick ran once, where it started");
    assert_eq!(wait_state(&env, hog, JobState::Succeeded).await.reclaims, 0);
    token.cancel();
    tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap().unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn an_attempt_a_wedged_runtime_holds_past_its_timeout_loses_its_lease_and_runs_elsewhere() {
    // The worker on a runtime of its own with one thread, which `wedge` holds without yielding
    // for 10 s, far past its 200 ms timeout: the timeout cannot fire. The heartbeat thread keeps
    // leases while handlers hold the runtime, but not a lease past the attempt's end (its
    // timeout and the 5 s a cancelled handler gets): a second worker's reaper then takes the
    // job, counted as a crash, and runs it. Before, the lease was renewed for the whole 10 s.
    // `quick`, fetched beside it, runs once whichever way it goes: first on that thread (also
    // when its handler returned and the wedge took the thread before its attempt saw it: its
    // lease is renewed until its outcome is written), or in a fetch whose reply waits for it
    // (renewed meanwhile), or registered and given up as the wedged attempt is, to run on the
    // second worker and not on the first one once it is free.
    let env = TestEnv::with(&[
        ("JOBQ_WORKER_LEASE", "600ms"),
        ("JOBQ_WORKER_HEARTBEAT", "200ms"),
        ("JOBQ_WORKER_REAPER_INTERVAL", "200ms"),
        ("JOBQ_WORKER_CONCURRENCY", "2"),
    ])
    .await;
    let quick_runs = Arc::new(AtomicUsize::new(0));
    let count_quick = |registry: &mut Registry| {
        let runs = quick_runs.clone();
        registry.register("quick", move |_ctx: JobContext| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok(None) }
        });
    };
    let mut registry = Registry::new();
    registry.register("wedge", |_ctx: JobContext| async {
        std::thread::sleep(Duration::from_secs(10));
        Ok(Some(json!("wedged worker")))
    });
    count_quick(&mut registry);
    let mut job = NewJob::new("wedge", json!({})).max_attempts(1);
    job.timeout = Some(Duration::from_millis(200));
    let id = env.broker.enqueue(job).await.unwrap().job.id;
    let mut quick = NewJob::new("quick", json!({})).max_attempts(1);
    quick.timeout = Some(Duration::from_millis(200));
    let quick = env.broker.enqueue(quick).await.unwrap().job.id;
    let settings = env.settings();
    let token = CancellationToken::new();
    let worker = Worker::new(env.broker.clone(), registry, settings.worker.clone(), Duration::from_secs(30));
    let t = token.clone();
    let wedged_since = std::time::Instant::now();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        rt.block_on(async move { tokio::spawn(worker.run(t)).await.unwrap() })
    });
    wait_state(&env, id, JobState::Running).await;
    let mut elsewhere = Registry::new();
    elsewhere.register("wedge", |_ctx: JobContext| async { Ok(Some(json!("second worker"))) });
    count_quick(&mut elsewhere);
    let second = start(&env, elsewhere);
    let job = wait_state(&env, id, JobState::Succeeded).await;
    assert!(wedged_since.elapsed() < Duration::from_secs(10), "it ran elsewhere while the first worker was wedged");
    assert_eq!(job.result, Some(json!("second worker")));
    assert_eq!(
        (job.reclaims, job.attempt, job.run),
        (1, 1, 1),
        "the wedged attempt counted as a crash, not as an attempt"
    );
    // The wedged worker comes back: its attempt ends at its timeout, and its outcome, on a lease
    // it no longer holds, is refused.
    token.cancel();
    tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap().unwrap();
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.result), (JobState::Succeeded, Some(json!("second worker"))));
    let quick = wait_state(&env, quick, JobState::Succeeded).await;
    assert_eq!(quick_runs.load(Ordering::SeqCst), 1, "quick ran once, on one worker: {quick:?}");
    finish(env, [second]).await;
}

#[tokio::test]
async fn fetches_that_time_out_beside_a_fetch_sent_ahead_lose_no_job_and_run_none_twice() {
    // A backlog of quick jobs keeps two fetches in flight; Redis (a server of the test's own) is
    // frozen past the worker's timeout three times, failing whatever is in flight then: fetches
    // of the loop, fetches sent ahead, outcome writes. What a failed fetch started is handed
    // back, not what the other one started and runs: every job runs once, within half of its
    // 60 s lease, counting neither an extra attempt nor a reclaim. Only the worker has the short
    // timeout: the test's own calls (10,000 enqueues at once) may take longer on a busy machine.
    let redis = jobq_testutil::RedisServer::start();
    let env = TestEnv::with(&[
        ("REDIS_URL", &redis.url()),
        ("JOBQ_WORKER_CONCURRENCY", "8"),
        ("JOBQ_WORKER_LEASE", "60s"),
        ("JOBQ_WORKER_HEARTBEAT", "1s"),
        ("JOBQ_WORKER_REAPER_INTERVAL", "200ms"),
    ])
    .await;
    let mut settings = env.settings();
    settings.redis.timeout = Duration::from_millis(300);
    let broker = jobq_core::stream::Broker::connect(&settings).await.unwrap();
    let runs = Arc::new(std::sync::Mutex::new(std::collections::HashMap::<JobId, usize>::new()));
    let mut registry = Registry::new();
    let r = runs.clone();
    registry.register("noop", move |ctx: JobContext| {
        *r.lock().unwrap().entry(ctx.id).or_default() += 1;
        async { Ok(None) }
    });
    let jobs = (0..10_000).map(|_| NewJob::new("noop", json!({}))).collect();
    let ids: Vec<JobId> =
        env.broker.enqueue_many(jobs, true).await.unwrap().into_iter().map(|i| i.unwrap().job.id).collect();
    let token = CancellationToken::new();
    let worker = Worker::new(broker, registry, settings.worker, Duration::from_secs(30));
    let handle = tokio::spawn(worker.run(token.clone()));
    let mut ran_before_freeze = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ran_before_freeze.push(runs.lock().unwrap().len());
        redis.signal("STOP");
        tokio::time::sleep(Duration::from_millis(700)).await;
        redis.signal("CONT");
    }
    assert!(
        ran_before_freeze.last().is_some_and(|&n| n < ids.len()),
        "a backlog was left at each freeze: {ran_before_freeze:?} of {}",
        ids.len()
    );
    let back = std::time::Instant::now();
    wait_until(Duration::from_secs(30), "every job to run", || async {
        (runs.lock().unwrap().len() == ids.len()).then_some(())
    })
    .await;
    let runs = runs.lock().unwrap().clone();
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "jobs ran twice: {twice:?}");
    for id in &ids {
        let job = wait_state(&env, *id, JobState::Succeeded).await;
        assert_eq!((job.attempt, job.reclaims), (1, 0), "job {id}");
    }
    assert!(back.elapsed() < Duration::from_secs(30), "done {:?} after the last freeze", back.elapsed());
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn an_outcome_redis_refuses_for_good_does_not_hold_the_others() {
    let env = TestEnv::new().await;
    let mut registry = Registry::new();
    registry.register("nap", |ctx: JobContext| async move {
        let ms = ctx.payload["ms"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(None)
    });
    let worker = start(&env, registry);
    let q = jobq_core::job::QueueName::default_queue();
    // Both within the 300 ms attempt timeout of these tests; the second ends after the first.
    let broken = env.broker.enqueue(NewJob::new("nap", json!({"ms": 150})).unique("k", None)).await.unwrap().job.id;
    let later = env.broker.enqueue(NewJob::new("nap", json!({"ms": 280}))).await.unwrap().job.id;
    wait_state(&env, broken, JobState::Running).await;
    // The first job's unique lock becomes a hash while it runs: every write of its outcome
    // meets WRONGTYPE releasing it, which no retry mends.
    let key = env.keys().unique(&q, "k");
    let mut conn = env.broker.connection();
    let _: () = redis::pipe().del(&key).hset(&key, "not", "a string").query_async(&mut conn).await.unwrap();
    let done = wait_state(&env, later, JobState::Succeeded).await;
    assert_eq!(done.attempt, 1);
    let more = env.broker.enqueue(NewJob::new("nap", json!({"ms": 0}))).await.unwrap().job.id;
    wait_state(&env, more, JobState::Succeeded).await;
    finish(env, [worker]).await;
}

/// A test environment whose workers serve `urgent` before `default`, and the `urgent` queue.
async fn urgent_then_default() -> (TestEnv, jobq_core::job::QueueName) {
    (TestEnv::with(&[("JOBQ_WORKER_QUEUES", "urgent,default")]).await, "urgent".parse().unwrap())
}

/// A worker (started as [`start`] does) whose `echo` handler succeeds at once.
fn start_echo(env: &TestEnv) -> Started {
    let mut registry = Registry::new();
    registry.register("echo", |_ctx: JobContext| async move { Ok(None) });
    start(env, registry)
}

#[tokio::test]
async fn a_queue_whose_stream_is_of_another_type_at_start_does_not_stop_the_others() {
    let (env, urgent) = urgent_then_default().await;
    let stream = env.keys().stream(&urgent, jobq_core::job::Priority::Normal);
    let _: () = redis::AsyncCommands::set(&mut env.broker.connection(), &stream, "not a stream").await.unwrap();
    let worker = start_echo(&env);
    let id = env.broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id;
    wait_state(&env, id, JobState::Succeeded).await;
    finish(env, [worker]).await;
}

#[tokio::test]
async fn a_queue_whose_consumer_group_is_gone_does_not_stop_the_others() {
    let (env, urgent) = urgent_then_default().await;
    let worker = start_echo(&env);
    let first = env.broker.enqueue(NewJob::new("echo", json!({})).queue(urgent.clone())).await.unwrap().job.id;
    wait_state(&env, first, JobState::Succeeded).await;
    // Its group destroyed while the worker runs: each fetch of the first queue meets NOGROUP.
    let stream = env.keys().stream(&urgent, jobq_core::job::Priority::Normal);
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(&stream)
        .arg(jobq_core::stream::Keys::GROUP)
        .query_async(&mut env.broker.connection())
        .await
        .unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(env.broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id);
    }
    for id in ids {
        wait_state(&env, id, JobState::Succeeded).await;
    }
    finish(env, [worker]).await;
}

#[tokio::test]
async fn a_queue_whose_keys_its_redis_user_may_not_touch_does_not_stop_the_others() {
    let (env, urgent) = urgent_then_default().await;
    // A Redis user that may use every key of the namespace but the first queue's.
    let ns = env.keys().namespace();
    let user = format!("{ns}-worker");
    let mut conn = env.broker.connection();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">secret")
        .arg("+@all")
        .arg("&*")
        .arg(format!("~{ns}:{{q:default}}:*"))
        .arg(format!("~{ns}:queues"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut settings = env.settings();
    let url = jobq_testutil::redis_url();
    settings.redis.url = url.replacen("redis://", &format!("redis://{user}:secret@"), 1);
    let broker = jobq_core::stream::Broker::connect(&settings).await.unwrap();
    let mut registry = Registry::new();
    registry.register("echo", |_ctx: JobContext| async move { Ok(None) });
    let token = CancellationToken::new();
    let handle = tokio::spawn(
        Worker::new(broker, registry, settings.worker.clone(), Duration::from_secs(30)).run(token.clone()),
    );
    // The first queue (in strict order) is refused at every fetch; the second's jobs run.
    env.broker.enqueue(NewJob::new("echo", json!({})).queue(urgent)).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(env.broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id);
    }
    let ran = async {
        for id in ids {
            wait_state(&env, id, JobState::Succeeded).await;
        }
    };
    let outcome = tokio::time::timeout(Duration::from_secs(15), ran).await;
    token.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), handle).await;
    let _: () = redis::cmd("ACL").arg("DELUSER").arg(&user).query_async(&mut conn).await.unwrap();
    outcome.expect("the jobs of the queue the user may touch ran");
    env.cleanup().await;
}
