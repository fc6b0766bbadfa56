//! The library's layers and job context against real Redis: held jobs spend no attempt,
//! limits hold across workers, checkpoints and progress persist, follow-up jobs are enqueued.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jobq_core::job::{JobState, NewJob};
use jobq_testutil::{wait_until, TestEnv};
use jobq_worker::{layers, HandlerError, JobContext, Registry};
use serde_json::json;

use crate::{fast_retry, finish, start, wait_state, WAIT};

/// A handler that sleeps `ms` and records how many of its kind run at once (max in `peak`).
fn gauge_handler(
    registry: &mut Registry,
    kind: &str,
    ms: u64,
    now: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
) -> Arc<AtomicUsize> {
    let done = Arc::new(AtomicUsize::new(0));
    let d = done.clone();
    registry.register(kind, move |_ctx: JobContext| {
        let (now, peak, done) = (now.clone(), peak.clone(), d.clone());
        async move {
            let n = now.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            done.fetch_add(1, Ordering::SeqCst);
            Ok(None)
        }
    });
    done
}

#[tokio::test]
async fn a_concurrency_limit_holds_across_two_workers_and_held_jobs_spend_no_attempt() {
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "10")]).await;
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    let mut done = Vec::new();
    for _ in 0..2 {
        let mut registry = Registry::new();
        done.push(gauge_handler(&mut registry, "report", 60, now.clone(), peak.clone()));
        registry.layer_for("report", layers::ConcurrencyLimit::per_type(3).retry_in(Duration::from_millis(20)));
        workers.push(start(&env, registry));
    }
    let jobs: Vec<_> = (0..40).map(|i| NewJob::new("report", json!(i)).max_attempts(1)).collect();
    let ids: Vec<_> =
        env.broker.enqueue_many(jobs, false).await.unwrap().into_iter().map(|r| r.unwrap().job.id).collect();
    for id in &ids {
        let job = wait_state(&env, *id, JobState::Succeeded).await;
        assert_eq!(job.attempt, 1, "held-back starts spent no attempt (max_attempts 1)");
    }
    let peak = peak.load(Ordering::SeqCst);
    println!("concurrency limit 3 over 2 workers x 10 slots: peak in flight {peak}");
    assert_eq!(peak, 3, "never more than the limit, and the limit was reached");
    assert!(done.iter().all(|d| d.load(Ordering::SeqCst) > 0), "both workers ran jobs");
    finish(env, workers).await;
}

#[tokio::test]
async fn a_job_held_back_by_a_limit_counts_once_in_the_enqueue_to_start_histogram() {
    let metrics = jobq_core::ops::prometheus();
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "10"), ("JOBQ_WORKER_QUEUES", "held")]).await;
    let mut registry = Registry::new();
    gauge_handler(&mut registry, "report", 30, Arc::default(), Arc::default());
    registry.layer_for("report", layers::ConcurrencyLimit::per_type(1).retry_in(Duration::from_millis(10)));
    let workers = vec![start(&env, registry)];
    let jobs: Vec<_> = (0..6).map(|i| NewJob::new("report", json!(i)).queue("held".parse().unwrap())).collect();
    let ids: Vec<_> =
        env.broker.enqueue_many(jobs, false).await.unwrap().into_iter().map(|r| r.unwrap().job.id).collect();
    for id in &ids {
        wait_state(&env, *id, JobState::Succeeded).await;
    }
    let text = metrics.render();
    let line =
        |name: &str| text.lines().find(|l| l.starts_with(name) && l.contains(r#"queue="held""#)).map(str::to_owned);
    let postponed = text.lines().any(|l| l.contains(r#"outcome="postponed""#) && l.contains(r#"queue="held""#));
    assert!(postponed, "the limit held some starts back: {text}");
    let count = line("jobq_enqueue_to_start_seconds_count").expect("the histogram has samples");
    assert!(count.ends_with(" 6"), "one sample per job, not per held-back start: {count}");
    finish(env, workers).await;
}

#[tokio::test]
async fn a_job_run_again_after_a_crash_is_not_sampled_again_in_the_enqueue_to_start_histogram() {
    let metrics = jobq_core::ops::prometheus();
    let env = TestEnv::with(&[("JOBQ_WORKER_QUEUES", "rerun")]).await;
    let q: jobq_core::job::QueueName = "rerun".parse().unwrap();
    let id = env.broker.enqueue(NewJob::new("report", json!({})).queue(q.clone())).await.unwrap().job.id;
    // Started by a worker that died: the reaper puts it back as attempt 1 of its run.
    env.broker.fetch(&q, "gone", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    env.broker
        .reclaim("reaper", std::slice::from_ref(&q), Duration::from_millis(1), 3, Duration::from_secs(60))
        .await
        .unwrap();
    let mut registry = Registry::new();
    gauge_handler(&mut registry, "report", 0, Arc::default(), Arc::default());
    let workers = vec![start(&env, registry)];
    let job = wait_state(&env, id, JobState::Succeeded).await;
    assert_eq!((job.attempt, job.reclaims), (1, 1));
    let text = metrics.render();
    let count =
        text.lines().find(|l| l.starts_with("jobq_enqueue_to_start_seconds_count") && l.contains(r#"queue="rerun""#));
    assert!(count.is_none_or(|c| c.ends_with(" 0")), "its first start was sampled, or would have been: {count:?}");
    finish(env, workers).await;
}

/// Attempt 1 of a job of this type ends without returning (`first`); attempt 2 succeeds.
fn cut_short_once(registry: &mut Registry, kind: &str, first: fn() -> std::future::Ready<()>) {
    registry.register(kind, move |ctx: JobContext| async move {
        if ctx.attempt == 1 {
            first().await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        Ok(Some(json!({"attempt": ctx.attempt})))
    });
}

#[tokio::test]
async fn a_concurrency_slot_comes_back_when_its_attempt_times_out_or_panics() {
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "4")]).await;
    let mut registry = Registry::new();
    // The worker's attempt timeout is 300 ms here: attempt 1 of `stuck` is cut at it, attempt
    // 1 of `crash` panics (the handler's own CatchPanic makes it a failure). Each type has one
    // slot, which attempt 2 needs.
    cut_short_once(&mut registry, "stuck", || std::future::ready(()));
    cut_short_once(&mut registry, "crash", || panic!("attempt 1 crashes"));
    for kind in ["stuck", "crash"] {
        registry.layer_for(kind, layers::ConcurrencyLimit::per_type(1).retry_in(Duration::from_millis(20)));
    }
    let (token, handle) = start(&env, registry);
    for kind in ["stuck", "crash"] {
        let job = NewJob::new(kind, json!({})).max_attempts(2).backoff(fast_retry());
        let id = env.broker.enqueue(job).await.unwrap().job.id;
        let job = wait_state(&env, id, JobState::Succeeded).await;
        assert_eq!(job.result, Some(json!({"attempt": 2})), "{kind}: attempt 2 got the slot attempt 1 held");
        // The slot goes back as the attempt ends, beside the writing of its outcome.
        let slots = env.keys().limit("slots", &format!("type:{kind}"));
        wait_until(WAIT, &format!("{kind}: no slot left held once its jobs ended"), || async {
            let held: u64 = redis::cmd("ZCARD").arg(&slots).query_async(&mut env.broker.connection()).await.unwrap();
            (held == 0).then_some(())
        })
        .await;
    }
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_circuit_counts_timeouts_and_panics_as_failures_but_not_cancels_or_fatal_errors() {
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "4")]).await;
    let mut registry = Registry::new();
    registry.register("hang", |_ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(None)
    });
    registry.register("boom", |_ctx: JobContext| async move { panic!("always crashes") });
    // Ignores its cancel, so the worker drops it after the grace period.
    registry.register("stubborn", |_ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(None)
    });
    // Honours its cancel with a retryable error, as a handler should.
    registry.register("polite", |ctx: JobContext| async move {
        ctx.cancel.cancelled().await;
        Err(HandlerError::retry(anyhow::anyhow!("stopped on cancel")))
    });
    // Fails retryably, or fatally (bad input) when its payload says so.
    registry.register("flaky", |ctx: JobContext| async move {
        if ctx.payload == json!("fatal") {
            return Err(HandlerError::fail(anyhow::anyhow!("bad input")));
        }
        Err(HandlerError::retry(anyhow::anyhow!("dependency down")))
    });
    registry.layer_for("hang", layers::CircuitBreaker::new(2, Duration::from_secs(30)));
    registry.layer_for("boom", layers::CircuitBreaker::new(2, Duration::from_secs(30)));
    registry.layer_for("stubborn", layers::CircuitBreaker::new(1, Duration::from_secs(30)));
    registry.layer_for("polite", layers::CircuitBreaker::new(1, Duration::from_secs(30)));
    registry.layer_for("flaky", layers::CircuitBreaker::new(2, Duration::from_secs(30)));
    let (token, handle) = start(&env, registry);
    let is_open = |kind: &str| {
        let mut conn = env.broker.connection();
        let key = env.keys().limit("breaker", &format!("type:{kind}"));
        async move { redis::cmd("HEXISTS").arg(key).arg("opened_at").query_async::<bool>(&mut conn).await.unwrap() }
    };
    for kind in ["hang", "boom"] {
        for i in 0..2 {
            let id = env.broker.enqueue(NewJob::new(kind, json!(i)).max_attempts(1)).await.unwrap().job.id;
            wait_state(&env, id, JobState::Dead).await;
        }
        let open = wait_until(WAIT, &format!("the circuit of `{kind}` to open"), || async {
            is_open(kind).await.then_some(true)
        })
        .await;
        assert!(open, "2 attempts of `{kind}` cut short opened its circuit (threshold 2)");
        let held = env.broker.enqueue(NewJob::new(kind, json!("held")).max_attempts(1)).await.unwrap().job.id;
        let job = wait_until(WAIT, "the job to be held back", || async {
            let job = env.broker.job(held).await.unwrap()?;
            job.held_by.is_some().then_some(job)
        })
        .await;
        assert!(job.held_by.unwrap().contains("circuit open"), "`{kind}` jobs are held while it is open");
    }
    let mut stubborn = NewJob::new("stubborn", json!({})).max_attempts(1);
    stubborn.timeout = Some(Duration::from_secs(30));
    let id = env.broker.enqueue(stubborn).await.unwrap().job.id;
    wait_state(&env, id, JobState::Running).await;
    env.broker.cancel(id).await.unwrap();
    wait_state(&env, id, JobState::Cancelled).await;
    // The dropped attempt's step is written by a task of its own: give it time to land.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!is_open("stubborn").await, "a cancelled attempt is not a failure (threshold 1)");
    let id = env.broker.enqueue(NewJob::new("polite", json!({})).max_attempts(1)).await.unwrap().job.id;
    wait_state(&env, id, JobState::Running).await;
    env.broker.cancel(id).await.unwrap();
    wait_state(&env, id, JobState::Cancelled).await;
    assert!(!is_open("polite").await, "an error returned on a cancel is not a failure (threshold 1)");
    // failure, fatal, failure: the fatal error neither counts nor ends the streak (threshold 2).
    for (i, payload) in ["retry", "fatal", "retry"].into_iter().enumerate() {
        let id = env.broker.enqueue(NewJob::new("flaky", json!(payload)).max_attempts(1)).await.unwrap().job.id;
        wait_state(&env, id, JobState::Dead).await;
        if i < 2 {
            assert!(!is_open("flaky").await, "one retryable failure, then a fatal one: still closed");
        }
    }
    let open = wait_until(WAIT, "the circuit of `flaky` to open", || async { is_open("flaky").await.then_some(true) });
    assert!(open.await, "two retryable failures around a fatal one opened the circuit");
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_job_held_back_after_its_cancel_was_seen_ends_cancelled_without_spending_an_attempt() {
    let env = TestEnv::new().await;
    let mut registry = Registry::new();
    // As a limit that gives up waiting once the job is cancelled: held back, it never ran.
    registry.register("waits", |ctx: JobContext| async move {
        ctx.cancel.cancelled().await;
        Err(HandlerError::held("slot still taken", Duration::from_secs(1)))
    });
    let (token, handle) = start(&env, registry);
    let mut job = NewJob::new("waits", json!({})).max_attempts(3);
    job.timeout = Some(Duration::from_secs(30));
    let id = env.broker.enqueue(job).await.unwrap().job.id;
    wait_state(&env, id, JobState::Running).await;
    env.broker.cancel(id).await.unwrap();
    let job = wait_state(&env, id, JobState::Cancelled).await;
    assert_eq!(job.attempt, 0, "the held-back attempt is not counted");
    let events = env.keys().events(&jobq_core::job::QueueName::default_queue());
    let mut conn = env.broker.connection();
    let events: u64 = redis::cmd("XLEN").arg(&events).query_async(&mut conn).await.unwrap();
    assert_eq!(events, 0, "no history event for an attempt that never ran");
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn the_metrics_layer_counts_an_attempt_cut_at_its_timeout() {
    let metrics = jobq_core::ops::prometheus();
    let env = TestEnv::new().await;
    let mut registry = Registry::new();
    registry.register("stall", |_ctx: JobContext| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        Ok(None)
    });
    registry.layer(layers::Metrics).layer(layers::Trace);
    let (token, handle) = start(&env, registry);
    // The worker's attempt timeout is 300 ms here.
    let id = env.broker.enqueue(NewJob::new("stall", json!({})).max_attempts(1)).await.unwrap().job.id;
    wait_state(&env, id, JobState::Dead).await;
    let text = metrics.render();
    let line =
        |name: &str| text.lines().find(|l| l.starts_with(name) && l.contains(r#"type="stall""#)).map(str::to_owned);
    assert_eq!(
        line("jobq_handler_outcomes_total").as_deref(),
        Some(r#"jobq_handler_outcomes_total{type="stall",outcome="timeout"} 1"#),
        "{text}"
    );
    let count = line("jobq_handler_duration_seconds_count").expect("the cut attempt was timed");
    assert!(count.ends_with(" 1"), "{count}");
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_partition_limit_bounds_each_tenant_and_leaves_others_free() {
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "20")]).await;
    let running: Arc<Mutex<std::collections::HashMap<String, (usize, usize)>>> = Arc::default();
    let mut registry = Registry::new();
    let r = running.clone();
    registry.register("sync", move |ctx: JobContext| {
        let r = r.clone();
        async move {
            let tenant = ctx.partition_key.clone().unwrap_or_default();
            {
                let mut m = r.lock().unwrap();
                let e = m.entry(tenant.clone()).or_default();
                e.0 += 1;
                e.1 = e.1.max(e.0);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            r.lock().unwrap().get_mut(&tenant).unwrap().0 -= 1;
            Ok(None)
        }
    });
    registry.layer(layers::ConcurrencyLimit::per_partition(2).retry_in(Duration::from_millis(20)));
    let (token, handle) = start(&env, registry);
    let mut jobs = Vec::new();
    for i in 0..30 {
        jobs.push(NewJob::new("sync", json!(i)).partition("acme"));
        if i < 6 {
            jobs.push(NewJob::new("sync", json!(i)).partition(format!("small-{i}")));
        }
    }
    let ids: Vec<_> =
        env.broker.enqueue_many(jobs, false).await.unwrap().into_iter().map(|r| r.unwrap().job.id).collect();
    for id in &ids {
        wait_state(&env, *id, JobState::Succeeded).await;
    }
    let m = running.lock().unwrap().clone();
    assert_eq!(m["acme"].1, 2, "the big tenant never ran more than 2 at once");
    assert!((0..6).all(|i| m[&format!("small-{i}")].1 == 1));
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_rate_limit_holds_within_ten_percent_over_ten_seconds() {
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "20")]).await;
    let starts = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let mut registry = Registry::new();
    let s = starts.clone();
    registry.register("ping", move |ctx: JobContext| {
        let s = s.clone();
        async move {
            assert_eq!(ctx.attempt, 1, "held-back starts spent no attempt");
            s.lock().unwrap().push(Instant::now());
            Ok(None)
        }
    });
    registry.layer_for("ping", layers::RateLimit::per_type(20.0, 1));
    let jobs: Vec<_> = (0..400).map(|i| NewJob::new("ping", json!(i)).max_attempts(1)).collect();
    env.broker.enqueue_many(jobs, false).await.unwrap();
    let (token, handle) = start(&env, registry);
    // The window counts from the first start, however long the worker took to get there.
    let first = wait_until(WAIT, "the first start", || {
        let first = starts.lock().unwrap().first().copied();
        async move { first }
    })
    .await;
    tokio::time::sleep_until((first + Duration::from_millis(10_500)).into()).await;
    let starts = starts.lock().unwrap().clone();
    let in_window = starts.iter().filter(|t| t.duration_since(first) < Duration::from_secs(10)).count();
    println!("rate limit 20/s: {in_window} starts in the first 10 s (expected 200)");
    assert!((180..=220).contains(&in_window), "{in_window} starts in 10 s at 20/s");
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn the_circuit_is_shared_by_two_workers_opens_holds_reopens_on_a_failed_probe_and_closes() {
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "1")]).await;
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    // Two workers, one breaker state.
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let mut registry = Registry::new();
            let (h, c) = (healthy.clone(), calls.clone());
            registry.register("charge", move |_ctx: JobContext| {
                let (h, c) = (h.clone(), c.clone());
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    if h.load(Ordering::SeqCst) {
                        Ok(None)
                    } else {
                        Err(HandlerError::retry(anyhow::anyhow!("gateway down")))
                    }
                }
            });
            // Open long enough for the held job below to be fetched while it is, on a busy machine.
            registry.layer(layers::CircuitBreaker::new(3, Duration::from_secs(2)));
            start(&env, registry)
        })
        .collect();
    let state_key = env.keys().limit("breaker", "type:charge");
    let is_open = || {
        let mut conn = env.broker.connection();
        let key = state_key.clone();
        async move { redis::cmd("HEXISTS").arg(key).arg("opened_at").query_async::<bool>(&mut conn).await.unwrap() }
    };
    let failing: Vec<_> = (0..3).map(|i| NewJob::new("charge", json!(i)).max_attempts(1)).collect();
    for r in env.broker.enqueue_many(failing, false).await.unwrap() {
        wait_state(&env, r.unwrap().job.id, JobState::Dead).await;
    }
    assert!(is_open().await, "3 consecutive failures open the circuit (state in Redis, shared by every worker)");
    let calls_when_opened = calls.load(Ordering::SeqCst);
    let held = env.broker.enqueue(NewJob::new("charge", json!("held")).max_attempts(1)).await.unwrap().job.id;
    let job = wait_until(WAIT, "the job to be held back", || async {
        let job = env.broker.job(held).await.unwrap()?;
        job.held_by.is_some().then_some(job)
    })
    .await;
    assert_eq!(job.state, JobState::Scheduled, "held back, not failed");
    assert!(job.held_by.unwrap().contains("circuit open"));
    assert_eq!(calls.load(Ordering::SeqCst), calls_when_opened, "the handler was not called while open");
    // Still unhealthy: the held job runs as the half-open probe, fails, and the circuit reopens.
    let job = wait_state(&env, held, JobState::Dead).await;
    assert_eq!(job.attempt, 1, "held rounds spent no attempt (max_attempts 1); the probe spent the one");
    assert_eq!(calls.load(Ordering::SeqCst), calls_when_opened + 1, "exactly one probe across both workers");
    assert!(is_open().await, "a failed probe opens the circuit again");
    healthy.store(true, Ordering::SeqCst);
    let next = env.broker.enqueue(NewJob::new("charge", json!("next")).max_attempts(1)).await.unwrap().job.id;
    wait_state(&env, next, JobState::Succeeded).await;
    assert!(!is_open().await, "a successful probe closes the circuit");
    finish(env, workers).await;
}

#[tokio::test]
async fn checkpoints_carry_over_to_the_next_attempt_and_progress_is_visible() {
    let env = TestEnv::new().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut registry = Registry::new();
    let s = seen.clone();
    registry.register("import", move |mut ctx: JobContext| {
        let s = s.clone();
        async move {
            let from: u32 = ctx.last_checkpoint().unwrap_or(0);
            s.lock().unwrap().push((ctx.attempt, from));
            for row in from..from + 5 {
                ctx.checkpoint(row + 1).await?;
                ctx.progress((row + 1) as f32, format!("row {}", row + 1)).await?;
            }
            if ctx.attempt == 1 {
                return Err(HandlerError::retry_after(anyhow::anyhow!("connection reset"), Duration::from_millis(600)));
            }
            Ok(Some(json!({"rows": from + 5})))
        }
    });
    let (token, handle) = start(&env, registry);
    let id = env.broker.enqueue(NewJob::new("import", json!({})).max_attempts(3)).await.unwrap().job.id;
    let retrying = wait_state(&env, id, JobState::Retrying).await;
    let progress = retrying.progress.expect("progress is stored on the job");
    assert_eq!((progress.percent, progress.message.as_deref()), (5.0, Some("row 5")));
    assert_eq!(retrying.checkpoint, Some(json!(5)));
    let waited = retrying.run_at.unwrap() - retrying.finished_at.unwrap();
    assert!(waited.num_milliseconds() >= 590, "the handler's retry delay was used: {waited}");
    let job = wait_state(&env, id, JobState::Succeeded).await;
    assert_eq!(*seen.lock().unwrap(), [(1, 0), (2, 5)], "attempt 2 resumed from the checkpoint");
    assert_eq!(job.result, Some(json!({"rows": 10})));
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_handler_enqueues_follow_up_jobs_that_carry_its_trace() {
    let env = TestEnv::new().await;
    let mut registry = Registry::with_builtins();
    registry.register("fan-out", |ctx: JobContext| async move {
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(ctx.enqueue(NewJob::new("echo", json!(i))).await?.job.id.to_string());
        }
        Ok(Some(json!(ids)))
    });
    let (token, handle) = start(&env, registry);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut job = NewJob::new("fan-out", json!({}));
    job.metadata.insert("traceparent".into(), tp.into());
    let id = env.broker.enqueue(job).await.unwrap().job.id;
    let parent = wait_state(&env, id, JobState::Succeeded).await;
    for child in parent.result.unwrap().as_array().unwrap() {
        let child = wait_state(&env, child.as_str().unwrap().parse().unwrap(), JobState::Succeeded).await;
        assert_eq!(child.metadata.get("traceparent").map(String::as_str), Some(tp));
    }
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_timeout_layer_fails_the_attempt_and_a_custom_layer_sees_every_job() {
    let env = TestEnv::new().await;
    let seen = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::with_builtins();
    let s = seen.clone();
    registry
        .layer(layers::from_fn(move |ctx: JobContext, next: layers::Next| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                next.run(ctx).await
            }
        }))
        .layer(layers::Metrics)
        .layer(layers::Trace)
        .layer_for("sleep", layers::Timeout::new(Duration::from_millis(100)));
    let (token, handle) = start(&env, registry);
    let slow = NewJob::new("sleep", json!({"ms": 2000})).max_attempts(2).backoff(fast_retry());
    let id = env.broker.enqueue(slow).await.unwrap().job.id;
    let job = wait_state(&env, id, JobState::Dead).await;
    assert_eq!(job.attempt, 2, "the timeout is retryable");
    assert!(job.last_error.unwrap().contains("timed out after 100ms"));
    let echo = env.broker.enqueue(NewJob::new("echo", json!(1))).await.unwrap().job.id;
    wait_state(&env, echo, JobState::Succeeded).await;
    assert_eq!(seen.load(Ordering::SeqCst), 3, "the global layer saw both attempts and the echo job");
    finish(env, [(token, handle)]).await;
}

/// A handler that records the order jobs ran in (by payload) and fails payloads starting with
/// "fail".
fn recorder(registry: &mut Registry) -> Arc<Mutex<Vec<String>>> {
    let order = Arc::new(Mutex::new(Vec::new()));
    let o = order.clone();
    registry.register("step", move |ctx: JobContext| {
        let o = o.clone();
        async move {
            let name = ctx.payload.as_str().unwrap_or_default().to_owned();
            o.lock().unwrap().push(name.clone());
            if name.starts_with("fail") {
                return Err(HandlerError::fail(anyhow::anyhow!("{name} failed")));
            }
            Ok(Some(json!({"waited_for": ctx.depends_on.len()})))
        }
    });
    order
}

#[tokio::test]
async fn a_chain_of_three_runs_in_order_and_a_failure_dead_letters_the_rest_of_its_chain() {
    let env = TestEnv::new().await;
    let mut registry = Registry::new();
    let order = recorder(&mut registry);
    // Enqueued before any worker runs: b and c wait.
    let a = env.broker.enqueue(NewJob::new("step", json!("a"))).await.unwrap().job;
    let b = env.broker.enqueue(NewJob::new("step", json!("b")).depends_on([a.id])).await.unwrap().job;
    let c = env.broker.enqueue(NewJob::new("step", json!("c")).depends_on([b.id])).await.unwrap().job;
    assert_eq!((a.state, b.state, c.state), (JobState::Queued, JobState::Waiting, JobState::Waiting));
    let x = env.broker.enqueue(NewJob::new("step", json!("fail-x"))).await.unwrap().job;
    let y = env.broker.enqueue(NewJob::new("step", json!("y")).depends_on([x.id])).await.unwrap().job;
    let z = env.broker.enqueue(NewJob::new("step", json!("z")).depends_on([y.id])).await.unwrap().job;
    let (token, handle) = start(&env, registry);
    wait_state(&env, c.id, JobState::Succeeded).await;
    let ran = order.lock().unwrap().clone();
    let pos = |n: &str| ran.iter().position(|r| r == n).unwrap();
    assert!(pos("a") < pos("b") && pos("b") < pos("c"), "{ran:?}");
    for id in [y.id, z.id] {
        let job = wait_state(&env, id, JobState::Dead).await;
        assert_eq!(job.dead_reason.as_deref(), Some("dependency_failed"));
        assert_eq!(job.attempt, 0, "never started");
    }
    assert!(!ran.contains(&"y".to_owned()) && !ran.contains(&"z".to_owned()));
    // A dependency already dead at enqueue time dead-letters at once; an unknown one is refused.
    let late = env.broker.enqueue(NewJob::new("step", json!("late")).depends_on([x.id])).await.unwrap().job;
    assert_eq!(late.state, JobState::Dead);
    let unknown = env.broker.enqueue(NewJob::new("step", json!("u")).depends_on([jobq_core::job::JobId::new()])).await;
    assert!(unknown.unwrap_err().to_string().contains("depends_on"));
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn a_fan_in_of_fifty_runs_once_after_all_and_a_batch_callback_runs_after_every_outcome() {
    let env = TestEnv::with(&[("JOBQ_WORKER_CONCURRENCY", "20")]).await;
    let mut registry = Registry::new();
    let order = recorder(&mut registry);
    let (token, handle) = start(&env, registry);
    let parts: Vec<_> = (0..50).map(|i| NewJob::new("step", json!(format!("part-{i}")))).collect();
    let ids: Vec<_> =
        env.broker.enqueue_many(parts, false).await.unwrap().into_iter().map(|r| r.unwrap().job.id).collect();
    let join = env.broker.enqueue(NewJob::new("step", json!("join")).depends_on(ids.clone())).await.unwrap().job;
    let joined = wait_state(&env, join.id, JobState::Succeeded).await;
    assert_eq!(joined.result, Some(json!({"waited_for": 50})));
    let ran = order.lock().unwrap().clone();
    assert_eq!(ran.last().map(String::as_str), Some("join"), "the join ran after all fifty");
    assert_eq!(ran.iter().filter(|r| *r == "join").count(), 1);
    for id in &ids {
        assert_eq!(env.broker.job(*id).await.unwrap().unwrap().state, JobState::Succeeded);
    }

    // A batch with a failing job: the callback still runs, once, after everything finished.
    let batch = vec![
        NewJob::new("step", json!("ok-1")),
        NewJob::new("step", json!("fail-2")).max_attempts(1),
        NewJob::new("step", json!("ok-3")),
    ];
    let ids: Vec<_> =
        env.broker.enqueue_many(batch, true).await.unwrap().into_iter().map(|r| r.unwrap().job.id).collect();
    let callback = env.broker.enqueue(NewJob::new("step", json!("callback")).after_all_finish(ids)).await.unwrap().job;
    wait_state(&env, callback.id, JobState::Succeeded).await;
    let ran = order.lock().unwrap().clone();
    assert_eq!(ran.last().map(String::as_str), Some("callback"));
    assert_eq!(ran.iter().filter(|r| *r == "callback").count(), 1);
    finish(env, [(token, handle)]).await;
}

#[tokio::test]
async fn cancelling_a_dependency_dead_letters_its_waiting_dependents() {
    let env = TestEnv::new().await;
    let a = env.broker.enqueue(NewJob::new("step", json!("a")).delay(Duration::from_secs(60))).await.unwrap().job;
    let b = env.broker.enqueue(NewJob::new("step", json!("b")).depends_on([a.id])).await.unwrap().job;
    let after = env.broker.enqueue(NewJob::new("step", json!("c")).after_all_finish([a.id])).await.unwrap().job;
    env.broker.cancel(a.id).await.unwrap();
    let b = env.broker.job(b.id).await.unwrap().unwrap();
    assert_eq!((b.state, b.dead_reason.as_deref()), (JobState::Dead, Some("dependency_failed")));
    assert!(b.last_error.unwrap().contains("cancelled"));
    let after = env.broker.job(after.id).await.unwrap().unwrap();
    assert_eq!(after.state, JobState::Queued, "a callback waits for any outcome");
    env.cleanup().await;
}

#[tokio::test]
async fn a_layer_whose_redis_state_is_broken_for_good_fails_the_job_instead_of_holding_it_for_ever() {
    let env = TestEnv::new().await;
    let mut registry = Registry::new();
    let layer_keys = [
        ("limited", "slots", "concurrency limit"),
        ("rated", "rate", "rate limit"),
        ("guarded", "breaker", "circuit breaker"),
    ];
    for (kind, _, _) in layer_keys {
        registry.register(kind, |_ctx: JobContext| async { Ok(Some(json!("ran"))) });
    }
    registry.layer_for("limited", layers::ConcurrencyLimit::per_type(2));
    registry.layer_for("rated", layers::RateLimit::per_type(100.0, 10));
    registry.layer_for("guarded", layers::CircuitBreaker::new(3, Duration::from_secs(5)));
    // Each layer's key of the wrong type: every script call on it fails (WRONGTYPE), and would
    // on every try. (An outage of Redis holds the job back instead: see the layers' unit tests.)
    let mut conn = env.broker.connection();
    for (kind, key, _) in layer_keys {
        let key = env.keys().limit(key, &format!("type:{kind}"));
        redis::cmd("LPUSH").arg(&key).arg("x").query_async::<()>(&mut conn).await.unwrap();
    }
    let started = start(&env, registry);
    for (kind, _, layer) in layer_keys {
        let id = env.broker.enqueue(NewJob::new(kind, json!({})).max_attempts(1)).await.unwrap().job.id;
        let job = wait_state(&env, id, JobState::Dead).await;
        let error = job.last_error.unwrap_or_default();
        assert!(error.contains(layer) && error.contains("WRONGTYPE"), "{kind}: {error}");
    }
    finish(env, [started]).await;
}

#[tokio::test]
async fn a_redis_stall_as_a_limited_handler_returns_does_not_turn_its_success_into_a_timeout() {
    let redis = jobq_testutil::RedisServer::start();
    let env = TestEnv::with(&[("REDIS_URL", &redis.url()), ("JOBQ_REDIS_TIMEOUT", "5s")]).await;
    let pid = redis.pid().to_string();
    let mut registry = Registry::new();
    registry.register("limited", move |ctx: JobContext| {
        let pid = pid.clone();
        async move {
            // Redis stalls (a slow fork, a fail-over) as the first attempt's handler returns.
            if ctx.attempt == 1 {
                std::process::Command::new("kill").args(["-STOP", &pid]).status().unwrap();
            }
            Ok(Some(json!("done")))
        }
    });
    registry.layer_for("limited", layers::ConcurrencyLimit::per_type(2));
    registry.layer_for("limited", layers::CircuitBreaker::new(3, Duration::from_secs(5)));
    let workers = vec![start(&env, registry)];
    let mut job = NewJob::new("limited", json!({}));
    job.timeout = Some(Duration::from_secs(1));
    let id = env.broker.enqueue(job).await.unwrap().job.id;
    // Longer than the job's time limit: the layers' calls after the handler wait for Redis.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    redis.signal("CONT");
    let job = wait_state(&env, id, JobState::Succeeded).await;
    assert_eq!(job.attempt, 1, "the handler's success stands: not a timeout, not run again");
    finish(env, workers).await;
}
