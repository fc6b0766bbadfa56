//! Leases, reclaim, fencing, expiry, cancellation, unique keys and pause at the script level.

use std::time::Duration;

use jobq_core::job::{JobState, NewJob, QueueName};
use jobq_core::stream::{Broker, Cancel, Delivery, Failure, Lease, LeaseStatus, Outcome, Settled};
use jobq_testutil::TestEnv;
use redis::AsyncCommands;
use serde_json::json;

fn q() -> QueueName {
    QueueName::default_queue()
}

fn lease(d: &Delivery) -> Lease {
    Lease {
        queue: d.queue.clone(),
        priority: d.priority,
        entry: d.entry.clone(),
        id: d.envelope.id,
        token: d.lease.clone(),
    }
}

async fn fetch(broker: &Broker, consumer: &str, n: usize) -> Vec<Delivery> {
    broker.fetch(&q(), consumer, n).await.unwrap().jobs
}

#[tokio::test]
async fn heartbeats_keep_a_lease_and_the_reaper_takes_lapsed_ones() {
    let env = TestEnv::new().await;
    let held = env.broker.enqueue(NewJob::new("a", json!({}))).await.unwrap().job.id;
    let lapsed = env.broker.enqueue(NewJob::new("b", json!({}))).await.unwrap().job.id;
    let jobs = fetch(&env.broker, "w1", 2).await;
    let (dh, dl) = if jobs[0].envelope.id == held { (&jobs[0], &jobs[1]) } else { (&jobs[1], &jobs[0]) };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(env.broker.heartbeat("w1", &[lease(dh)]).await.unwrap(), [LeaseStatus::Held]);
    let r = env.broker.reclaim("w2", &[q()], Duration::from_millis(1000), 3).await.unwrap();
    assert_eq!(r[0].requeued, 1, "only the job without a heartbeat is reclaimed");
    let job = env.broker.job(lapsed).await.unwrap().unwrap();
    assert_eq!((job.state, job.reclaims, job.attempt), (JobState::Queued, 1, 0), "the crashed attempt is not counted");
    assert_eq!(env.broker.job(held).await.unwrap().unwrap().state, JobState::Running);

    // The zombie wakes up: its outcome and its heartbeat are refused.
    assert_eq!(
        env.broker.settle(&[Outcome { delivery: dl.clone(), result: Ok(None) }]).await.unwrap(),
        [Settled::Stale]
    );
    assert_eq!(env.broker.heartbeat("w1", &[lease(dl)]).await.unwrap(), [LeaseStatus::Lost]);
    let again = fetch(&env.broker, "w2", 1).await;
    assert_eq!(again[0].envelope.id, lapsed);
    assert_eq!(again[0].attempt, 1);
    assert_ne!(again[0].lease, dl.lease, "a fresh lease token");
    assert_eq!(
        env.broker.settle(&[Outcome { delivery: dl.clone(), result: Ok(None) }]).await.unwrap(),
        [Settled::Stale]
    );
    assert_eq!(
        env.broker.settle(&[Outcome { delivery: again[0].clone(), result: Ok(None) }]).await.unwrap(),
        [Settled::Succeeded]
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_reclaimed_more_than_max_reclaims_times_is_dead() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("poison", json!({})).max_attempts(10)).await.unwrap().job.id;
    for round in 1..=3 {
        let d = fetch(&env.broker, "w", 1).await;
        assert_eq!(d.len(), 1, "round {round}");
        tokio::time::sleep(Duration::from_millis(60)).await;
        let r = env.broker.reclaim("reaper", &[q()], Duration::from_millis(50), 2).await.unwrap();
        let expect_dead = round == 3;
        assert_eq!((r[0].requeued, r[0].dead), if expect_dead { (0, 1) } else { (1, 0) }, "round {round}");
    }
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(job.dead_reason.as_deref(), Some("max_reclaims"));
    assert!(job.last_error.unwrap().contains("3 times"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_not_started_before_it_expires_is_dead_and_never_runs() {
    let env = TestEnv::new().await;
    let soon = chrono::Utc::now() + chrono::Duration::milliseconds(1000);
    let queued = env.broker.enqueue(NewJob::new("x", json!({})).expires_at(soon)).await.unwrap().job.id;
    let delayed = env
        .broker
        .enqueue(NewJob::new("x", json!({})).delay(Duration::from_millis(50)).expires_at(soon))
        .await
        .unwrap()
        .job
        .id;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The sweep dead-letters both, whatever fetch would have seen.
    let p = env.broker.promote(&[q()], 100).await.unwrap();
    assert_eq!(p[0].expired, 2);
    assert!(fetch(&env.broker, "w", 10).await.is_empty(), "an expired job never runs");
    for id in [queued, delayed] {
        let job = env.broker.job(id).await.unwrap().unwrap();
        assert_eq!((job.state, job.dead_reason.as_deref()), (JobState::Dead, Some("expired")));
    }
    // A job fetched after its deadline (no sweep yet) is dead-lettered by the fetch itself.
    let late = env
        .broker
        .enqueue(NewJob::new("x", json!({})).expires_at(chrono::Utc::now() + chrono::Duration::milliseconds(50)))
        .await
        .unwrap()
        .job
        .id;
    tokio::time::sleep(Duration::from_millis(80)).await;
    assert!(fetch(&env.broker, "w", 10).await.is_empty());
    assert_eq!(env.broker.job(late).await.unwrap().unwrap().dead_reason.as_deref(), Some("expired"));
    env.cleanup().await;
}

#[tokio::test]
async fn cancelled_queued_and_scheduled_jobs_never_start() {
    let env = TestEnv::new().await;
    let queued = env.broker.enqueue(NewJob::new("x", json!({}))).await.unwrap().job.id;
    let scheduled =
        env.broker.enqueue(NewJob::new("x", json!({})).delay(Duration::from_millis(30))).await.unwrap().job.id;
    assert_eq!(env.broker.cancel(queued).await.unwrap(), Cancel::Cancelled);
    assert_eq!(env.broker.cancel(scheduled).await.unwrap(), Cancel::Cancelled);
    assert_eq!(env.broker.cancel(queued).await.unwrap(), Cancel::Finished(JobState::Cancelled));
    tokio::time::sleep(Duration::from_millis(50)).await;
    env.broker.promote(&[q()], 10).await.unwrap();
    assert!(fetch(&env.broker, "w", 10).await.is_empty());
    let len: u64 =
        env.broker.connection().xlen(env.keys().stream(&q(), jobq_core::job::Priority::Normal)).await.unwrap();
    assert_eq!(len, 0, "the cancelled job's entry is gone");
    assert!(matches!(env.broker.cancel(jobq_core::job::JobId::new()).await, Err(jobq_core::Error::JobNotFound(_))));
    env.cleanup().await;
}

#[tokio::test]
async fn cancelling_a_running_job_flags_it_and_its_worker_ends_it_cancelled() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("x", json!({}))).await.unwrap().job.id;
    let d = fetch(&env.broker, "w", 1).await.pop().unwrap();
    let mut requests = std::pin::pin!(env.broker.cancel_requests().await.unwrap());
    assert_eq!(env.broker.cancel(id).await.unwrap(), Cancel::Requested);
    let published =
        tokio::time::timeout(Duration::from_secs(2), futures_util::StreamExt::next(&mut requests)).await.unwrap();
    assert_eq!(published, Some(id), "the fast path publishes the id");
    assert_eq!(env.broker.heartbeat("w", &[lease(&d)]).await.unwrap(), [LeaseStatus::CancelRequested]);
    let cancelled = Failure { message: "cancelled on request".into(), retry_in: None, reason: "cancelled" };
    assert_eq!(
        env.broker.settle(&[Outcome { delivery: d, result: Err(cancelled) }]).await.unwrap(),
        [Settled::Cancelled]
    );
    assert_eq!(env.broker.job(id).await.unwrap().unwrap().state, JobState::Cancelled);
    env.cleanup().await;
}

#[tokio::test]
async fn a_unique_key_dedupes_until_the_job_finishes_or_for_its_ttl() {
    let env = TestEnv::new().await;
    let first = env.broker.enqueue(NewJob::new("x", json!({"n": 1})).unique("order-7", None)).await.unwrap();
    let dup = env.broker.enqueue(NewJob::new("x", json!({"n": 2})).unique("order-7", None)).await.unwrap();
    assert!(first.created && !dup.created);
    assert_eq!(dup.job.id, first.job.id);
    assert_eq!(dup.job.payload, json!({"n": 1}), "the existing job is returned");
    let d = fetch(&env.broker, "w", 10).await;
    assert_eq!(d.len(), 1, "nothing else was enqueued");
    env.broker.settle(&[Outcome { delivery: d[0].clone(), result: Ok(None) }]).await.unwrap();
    let after = env.broker.enqueue(NewJob::new("x", json!({})).unique("order-7", None)).await.unwrap();
    assert!(after.created, "the key is released when the job finishes");

    let ttl = Some(Duration::from_millis(1000));
    let a = env.broker.enqueue(NewJob::new("x", json!({})).unique("daily", ttl)).await.unwrap();
    let d = fetch(&env.broker, "w", 10).await;
    env.broker.settle(&[Outcome { delivery: d.last().unwrap().clone(), result: Ok(None) }]).await.unwrap();
    let b = env.broker.enqueue(NewJob::new("x", json!({})).unique("daily", ttl)).await.unwrap();
    assert!(!b.created && b.job.id == a.job.id, "a key with a ttl is held for the ttl even after the job finished");
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert!(env.broker.enqueue(NewJob::new("x", json!({})).unique("daily", ttl)).await.unwrap().created);
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_sent_again_gets_each_existing_job_back_in_its_place() {
    let env = TestEnv::new().await;
    let other: QueueName = "other".parse().unwrap();
    let job = |n: usize| {
        let j = NewJob::new("x", json!({"n": n})).unique(format!("order-{n}"), None);
        if n % 3 == 0 {
            j.queue(other.clone())
        } else {
            j
        }
    };
    let first = env.broker.enqueue_many((0..600).map(job).collect(), false).await.unwrap();
    assert!(first.iter().all(|r| r.as_ref().unwrap().created));
    // A lock naming a job whose hash is gone is not a live job's: that item is enqueued anew.
    let gone = first[1].as_ref().unwrap().job.id;
    let mut conn =
        redis::Client::open(jobq_testutil::redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: () = conn.del(env.keys().job(&q(), gone)).await.unwrap();

    // The same 600 again, with 300 new ones among them.
    let again = env
        .broker
        .enqueue_many((0..900).map(|n| job(if n % 3 == 2 { 1000 + n } else { n / 3 * 2 + n % 3 })).collect(), false)
        .await
        .unwrap();
    assert_eq!(again.len(), 900);
    for (n, r) in again.iter().enumerate() {
        if n % 3 == 2 {
            let e = r.as_ref().unwrap();
            assert!(e.created, "item {n} is new");
            assert_eq!(e.job.payload, json!({"n": 1000 + n}));
            continue;
        }
        let original = n / 3 * 2 + n % 3;
        let before = &first[original].as_ref().unwrap().job;
        if before.id == gone {
            let e = r.as_ref().unwrap();
            assert!(e.created && e.job.id != gone, "item {n}: {e:?}");
            continue;
        }
        let e = r.as_ref().unwrap();
        assert!(!e.created, "item {n} exists");
        assert_eq!((e.job.id, &e.job.queue, &e.job.payload), (before.id, &before.queue, &before.payload), "item {n}");
        assert_eq!(e.job.state, JobState::Queued);
    }
    // A single enqueue of a duplicate answers the same way.
    let one = env.broker.enqueue(job(4)).await.unwrap();
    assert!(!one.created && one.job.id == first[4].as_ref().unwrap().job.id);
    env.cleanup().await;
}

#[tokio::test]
async fn peek_lists_waiting_jobs_in_fetch_order_without_cancelled_ones() {
    use jobq_core::job::Priority;
    let env = TestEnv::new().await;
    let mut ids = Vec::new();
    for (n, p) in
        [Priority::Low, Priority::Normal, Priority::Critical, Priority::Normal, Priority::High].into_iter().enumerate()
    {
        ids.push(env.broker.enqueue(NewJob::new("x", json!({"n": n})).priority(p)).await.unwrap().job.id);
    }
    env.broker.cancel(ids[1]).await.unwrap();
    let peek = |only: Option<Priority>, count: usize| {
        let broker = env.broker.clone();
        async move {
            let jobs = broker.peek(&q(), only, count).await.unwrap();
            jobs.iter().map(|j| j.payload["n"].as_u64().unwrap()).collect::<Vec<_>>()
        }
    };
    assert_eq!(peek(None, 10).await, [2, 4, 3, 0]);
    assert_eq!(peek(None, 2).await, [2, 4]);
    assert_eq!(peek(Some(Priority::Normal), 10).await, [3]);
    env.cleanup().await;
}

#[tokio::test]
async fn concurrent_enqueues_with_one_unique_key_create_one_job() {
    let env = TestEnv::new().await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let b = env.broker.clone();
            tokio::spawn(async move { b.enqueue(NewJob::new("x", json!({})).unique("race", None)).await.unwrap() })
        })
        .collect();
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for t in tasks {
        let e = t.await.unwrap();
        created += usize::from(e.created);
        ids.insert(e.job.id);
    }
    assert_eq!((created, ids.len()), (1, 1));
    env.cleanup().await;
}

#[tokio::test]
async fn a_paused_queue_starts_nothing_until_resumed() {
    let env = TestEnv::new().await;
    env.broker.pause(&q()).await.unwrap();
    let id = env.broker.enqueue(NewJob::new("x", json!({}))).await.unwrap().job.id;
    let f = env.broker.fetch(&q(), "w", 10).await.unwrap();
    assert!(f.paused && f.jobs.is_empty() && f.last_ids.is_empty());
    assert!(env.broker.is_paused(&q()).await.unwrap());
    env.broker.resume(&q()).await.unwrap();
    assert_eq!(fetch(&env.broker, "w", 10).await[0].envelope.id, id);
    env.cleanup().await;
}

#[tokio::test]
async fn only_idle_consumers_with_nothing_pending_are_removed() {
    let env = TestEnv::new().await;
    env.broker.enqueue(NewJob::new("x", json!({}))).await.unwrap();
    env.broker.enqueue(NewJob::new("x", json!({}))).await.unwrap();
    let busy = fetch(&env.broker, "busy", 1).await;
    let done = fetch(&env.broker, "gone", 1).await;
    env.broker.settle(&[Outcome { delivery: done[0].clone(), result: Ok(None) }]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(120)).await;
    let removed =
        env.broker.cleanup_consumers(&[q()], jobq_core::stream::Keys::GROUP, Duration::from_millis(100)).await.unwrap();
    assert_eq!(removed, 1, "the consumer with nothing pending");
    let stream = env.keys().stream(&q(), jobq_core::job::Priority::Normal);
    let consumers: redis::Value = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&stream)
        .arg(jobq_core::stream::Keys::GROUP)
        .query_async(&mut env.broker.connection())
        .await
        .unwrap();
    let text = format!("{consumers:?}");
    assert!(text.contains("busy") && !text.contains("gone"), "{text}");
    assert_eq!(
        env.broker.settle(&[Outcome { delivery: busy[0].clone(), result: Ok(None) }]).await.unwrap(),
        [Settled::Succeeded]
    );
    env.cleanup().await;
}
