use std::collections::HashSet;
use std::time::Duration;

use crate::lease;
use jobq_core::job::{JobState, NewJob, Priority, QueueName};
use jobq_core::stream::{Broker, Delivery, Failure, Keys, Lease, LeaseStatus, Outcome, Requeued, Settled};
use jobq_testutil::TestEnv;
use redis::AsyncCommands;
use serde_json::json;

fn q() -> QueueName {
    QueueName::default_queue()
}

async fn hget(env: &TestEnv, key: &str, field: &str) -> Option<String> {
    env.broker.connection().hget(key, field).await.unwrap()
}

async fn xlen(env: &TestEnv, key: &str) -> u64 {
    env.broker.connection().xlen(key).await.unwrap()
}

async fn pending(env: &TestEnv, key: &str) -> u64 {
    let v: redis::Value =
        redis::cmd("XPENDING").arg(key).arg(Keys::GROUP).query_async(&mut env.broker.connection()).await.unwrap();
    match v {
        redis::Value::Array(items) => redis::from_redis_value(items[0].clone()).unwrap(),
        other => panic!("unexpected XPENDING reply {other:?}"),
    }
}

async fn fetch_one(broker: &Broker) -> Delivery {
    let mut f = broker.fetch(&q(), "c1", 1).await.unwrap();
    assert_eq!(f.jobs.len(), 1, "expected one job");
    f.jobs.pop().unwrap()
}

fn fail(d: &Delivery, retry_in: Option<Duration>) -> Outcome {
    Outcome {
        delivery: d.clone(),
        result: Err(Failure {
            message: "boom".into(),
            retry_in,
            reason: if retry_in.is_some() { "max_attempts" } else { "fatal" },
        }),
    }
}

#[tokio::test]
async fn enqueue_puts_a_ready_job_in_its_priority_stream() {
    let env = TestEnv::new().await;
    let job = env.broker.enqueue(NewJob::new("echo", json!({"a": 1})).priority(Priority::High)).await.unwrap();
    assert!(job.created);
    assert_eq!(job.job.state, JobState::Queued);
    assert_eq!(xlen(&env, &env.keys().stream(&q(), Priority::High)).await, 1);
    assert_eq!(xlen(&env, &env.keys().stream(&q(), Priority::Normal)).await, 0);
    let stored = env.broker.job(job.job.id).await.unwrap().expect("stored");
    assert_eq!(stored.payload, json!({"a": 1}));
    assert_eq!(stored.state, JobState::Queued);
    let queues = env.broker.queues().await.unwrap();
    assert_eq!(queues, vec![q()]);
    env.cleanup().await;
}

#[tokio::test]
async fn invalid_jobs_are_refused_before_touching_redis() {
    let env = TestEnv::new().await;
    let err = env.broker.enqueue(NewJob::new("", json!(null))).await.unwrap_err();
    assert!(matches!(err, jobq_core::Error::Invalid(_)));
    assert!(env.broker.queues().await.unwrap().is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn delayed_job_waits_in_the_scheduled_set_until_due_then_is_promoted() {
    let env = TestEnv::new().await;
    let job = env.broker.enqueue(NewJob::new("echo", json!({})).delay(Duration::from_millis(1000))).await.unwrap().job;
    assert_eq!(job.state, JobState::Scheduled);
    let zset = env.keys().scheduled(&q());
    let score: Option<f64> = env.broker.connection().zscore(&zset, job.id.to_string()).await.unwrap();
    assert!(score.is_some());
    let promoted = env.broker.promote(&[q()], 100).await.unwrap();
    assert_eq!(promoted[0].count, 0, "not due yet");
    assert!(env.broker.fetch(&q(), "c1", 10).await.unwrap().jobs.is_empty());
    tokio::time::sleep(Duration::from_millis(1050)).await;
    let promoted = env.broker.promote(&[q()], 100).await.unwrap();
    assert_eq!(promoted[0].count, 1);
    assert_eq!(env.broker.job(job.id).await.unwrap().unwrap().state, JobState::Queued);
    assert_eq!(fetch_one(&env.broker).await.envelope.id, job.id);
    env.cleanup().await;
}

#[tokio::test]
async fn fetch_starts_jobs_strictly_by_priority() {
    let env = TestEnv::new().await;
    for p in [Priority::Low, Priority::Normal, Priority::High, Priority::Critical] {
        for _ in 0..2 {
            env.broker.enqueue(NewJob::new("echo", json!({"p": p.as_str()})).priority(p)).await.unwrap();
        }
    }
    let first = env.broker.fetch(&q(), "c1", 3).await.unwrap();
    let got: Vec<Priority> = first.jobs.iter().map(|d| d.priority).collect();
    assert_eq!(got, [Priority::Critical, Priority::Critical, Priority::High]);
    let rest = env.broker.fetch(&q(), "c1", 10).await.unwrap();
    let got: Vec<Priority> = rest.jobs.iter().map(|d| d.priority).collect();
    assert_eq!(got, [Priority::High, Priority::Normal, Priority::Normal, Priority::Low, Priority::Low]);
    for d in first.jobs.iter().chain(&rest.jobs) {
        assert_eq!(d.attempt, 1);
        assert_eq!(d.envelope.payload["p"], d.priority.as_str());
        assert_eq!(env.broker.job(d.envelope.id).await.unwrap().unwrap().state, JobState::Running);
    }
    let empty = env.broker.fetch(&q(), "c1", 10).await.unwrap();
    assert!(empty.jobs.is_empty());
    assert_eq!(empty.last_ids.len(), 4, "an empty fetch reports each stream's last id to block on");
    env.cleanup().await;
}

#[tokio::test]
async fn two_consumers_racing_for_the_same_jobs_start_each_once() {
    let env = TestEnv::new().await;
    let mut ids = HashSet::new();
    for i in 0..200 {
        ids.insert(env.broker.enqueue(NewJob::new("echo", json!({"i": i}))).await.unwrap().job.id);
    }
    let a = Broker::connect(&env.settings()).await.unwrap();
    let b = Broker::connect(&env.settings()).await.unwrap();
    let race = |broker: Broker, name: &'static str| async move {
        let mut got = Vec::new();
        loop {
            let f = broker.fetch(&QueueName::default_queue(), name, 3).await.unwrap();
            if f.jobs.is_empty() {
                return got;
            }
            got.extend(f.jobs.into_iter().map(|d| d.envelope.id));
        }
    };
    let (ga, gb) = tokio::join!(race(a, "a"), race(b, "b"));
    assert!(!ga.is_empty() && !gb.is_empty(), "both consumers should win some jobs ({} / {})", ga.len(), gb.len());
    let all: Vec<_> = ga.iter().chain(&gb).copied().collect();
    let unique: HashSet<_> = all.iter().copied().collect();
    assert_eq!(all.len(), 200, "every job started exactly once");
    assert_eq!(unique, ids);
    env.cleanup().await;
}

#[tokio::test]
async fn complete_acks_deletes_the_entry_writes_the_outbox_and_sets_retention() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("echo", json!({"x": 1}))).await.unwrap().job.id;
    let d = fetch_one(&env.broker).await;
    let stream = env.keys().stream(&q(), Priority::Normal);
    assert_eq!(pending(&env, &stream).await, 1);
    let settled = env.broker.settle(&[Outcome { delivery: d, result: Ok(Some(json!({"ok": true}))) }]).await.unwrap();
    assert_eq!(settled, [Settled::Succeeded]);
    assert_eq!(xlen(&env, &stream).await, 0, "acked entries are deleted");
    assert_eq!(pending(&env, &stream).await, 0);
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.result, Some(json!({"ok": true})));
    assert!(job.finished_at.is_some());
    let ttl: i64 = env.broker.connection().ttl(env.keys().job(&q(), id)).await.unwrap();
    assert_eq!(ttl, -1, "no TTL: the retained set says when the hash goes");
    let retained: Vec<(String, f64)> =
        env.broker.connection().zrange_withscores(env.keys().retained(&q()), 0, -1).await.unwrap();
    assert_eq!(retained.len(), 1);
    assert_eq!(retained[0].0, id.to_string());
    let left = retained[0].1 as i64 - job.finished_at.unwrap().timestamp_millis();
    assert_eq!(left, 24 * 3600 * 1000, "kept for the default retention of succeeded jobs");
    let events: Vec<redis::streams::StreamId> = env
        .broker
        .connection()
        .xrange_all::<_, redis::streams::StreamRangeReply>(env.keys().events(&q()))
        .await
        .unwrap()
        .ids;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].get::<String>("outcome").as_deref(), Some("succeeded"));
    assert_eq!(events[0].get::<String>("id"), Some(id.to_string()));
    env.cleanup().await;
}

#[tokio::test]
async fn completions_in_any_order_delete_exactly_the_acked_entries() {
    let env = TestEnv::new().await;
    for n in 0..6 {
        env.broker.enqueue(NewJob::new("echo", json!({"n": n}))).await.unwrap();
    }
    let stream = env.keys().stream(&q(), Priority::Normal);
    let entries = || async {
        let reply: redis::streams::StreamRangeReply = env.broker.connection().xrange_all(&stream).await.unwrap();
        reply.ids.into_iter().map(|e| e.id).collect::<Vec<_>>()
    };
    let all = entries().await;
    let d = env.broker.fetch(&q(), "c1", 4).await.unwrap().jobs;
    let ok = |d: &Delivery| Outcome { delivery: d.clone(), result: Ok(None) };
    // The oldest job is still running: the newer completed entries go, its entry stays.
    assert_eq!(env.broker.settle(&[ok(&d[1]), ok(&d[3])]).await.unwrap(), [Settled::Succeeded; 2]);
    assert_eq!(entries().await, [0, 2, 4, 5].map(|i| all[i].clone()));
    assert_eq!(env.broker.settle(&[ok(&d[0])]).await.unwrap(), [Settled::Succeeded]);
    assert_eq!(entries().await, [2, 4, 5].map(|i| all[i].clone()));
    // Nothing pending after this one: the two never delivered entries stay.
    assert_eq!(env.broker.settle(&[ok(&d[2])]).await.unwrap(), [Settled::Succeeded]);
    assert_eq!(entries().await, [4, 5].map(|i| all[i].clone()));
    assert_eq!(pending(&env, &stream).await, 0);
    let rest = env.broker.fetch(&q(), "c1", 4).await.unwrap().jobs;
    assert_eq!(rest.len(), 2);
    assert_eq!(env.broker.settle(&[ok(&rest[1]), ok(&rest[0])]).await.unwrap(), [Settled::Succeeded; 2]);
    assert_eq!(xlen(&env, &stream).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn the_promoter_deletes_succeeded_jobs_once_their_retention_ends_and_nothing_else() {
    let env = TestEnv::with(&[("JOBQ_RETENTION_SUCCEEDED", "1s")]).await;
    let broker = &env.broker;
    for n in 0..5 {
        broker.enqueue(NewJob::new("echo", json!({"n": n}))).await.unwrap();
    }
    let fetched = broker.fetch(&q(), "c1", 5).await.unwrap().jobs;
    let ok = |d: &Delivery| Outcome { delivery: d.clone(), result: Ok(None) };
    // Two calls: the first three in one member of the retained set, the fourth in another.
    let first: Vec<Outcome> = fetched[..3].iter().map(ok).collect();
    assert_eq!(broker.settle(&first).await.unwrap(), [Settled::Succeeded; 3]);
    assert_eq!(broker.settle(&[ok(&fetched[3])]).await.unwrap(), [Settled::Succeeded]);
    let retained = env.keys().retained(&q());
    let members: u64 = broker.connection().zcard(&retained).await.unwrap();
    assert_eq!(members, 2);
    let promoted = broker.promote(&[q()], 1000).await.unwrap();
    assert_eq!(promoted[0].swept, 0, "retention not over yet");
    assert!(broker.job(fetched[0].envelope.id).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let promoted = broker.promote(&[q()], 1000).await.unwrap();
    assert_eq!((promoted[0].swept, promoted[0].more), (4, false));
    for d in &fetched[..4] {
        assert!(broker.job(d.envelope.id).await.unwrap().is_none(), "the succeeded hash is gone");
    }
    let running = broker.job(fetched[4].envelope.id).await.unwrap().expect("the running job stays");
    assert_eq!(running.state, JobState::Running);
    let members: u64 = broker.connection().zcard(&retained).await.unwrap();
    assert_eq!(members, 0);
    // A sweep stops once it has deleted its limit (8 members at a time) and says there is more.
    for n in 0..10 {
        broker.enqueue(NewJob::new("echo", json!({"n": n}))).await.unwrap();
    }
    for d in broker.fetch(&q(), "c1", 10).await.unwrap().jobs {
        broker.settle(&[ok(&d)]).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let promoted = broker.promote(&[q()], 1).await.unwrap();
    assert_eq!((promoted[0].swept, promoted[0].more), (8, true));
    let promoted = broker.promote(&[q()], 1).await.unwrap();
    assert_eq!((promoted[0].swept, promoted[0].more), (2, false));
    env.cleanup().await;
}

#[tokio::test]
async fn with_no_retention_a_succeeded_job_leaves_redis_at_once_unless_its_unique_key_is_held_for_a_time() {
    let env = TestEnv::with(&[("JOBQ_RETENTION_SUCCEEDED", "0")]).await;
    let broker = &env.broker;
    let first = broker.enqueue(NewJob::new("echo", json!({})).unique("once", None)).await.unwrap().job.id;
    let dependent = broker.enqueue(NewJob::new("echo", json!({})).depends_on([first])).await.unwrap().job.id;
    assert_eq!(broker.job(dependent).await.unwrap().unwrap().state, JobState::Waiting);
    let d = fetch_one(broker).await;
    assert_eq!(d.envelope.id, first);
    assert_eq!(
        broker.settle(&[Outcome { delivery: d, result: Ok(Some(json!(1))) }]).await.unwrap(),
        [Settled::Succeeded]
    );
    let exists: bool = env.broker.connection().exists(env.keys().job(&q(), first)).await.unwrap();
    assert!(!exists, "the succeeded job's hash is gone");
    assert_eq!(xlen(&env, &env.keys().stream(&q(), Priority::Normal)).await, 1, "only the dependent's entry is left");
    assert_eq!(broker.job(dependent).await.unwrap().unwrap().state, JobState::Queued, "the dependent is released");
    let again = broker.enqueue(NewJob::new("echo", json!({})).unique("once", None)).await.unwrap();
    assert!(again.created, "the unique lock went with the job");
    let events = xlen(&env, &env.keys().events(&q())).await;
    assert_eq!(events, 1, "the attempt still reaches the outbox for the history");

    // A unique key held for a time keeps deduplicating after success: the hash stays with it.
    let held = broker.enqueue(NewJob::new("echo", json!({})).unique("for-a-while", Some(Duration::from_secs(60))));
    let held = held.await.unwrap().job.id;
    let mut f = broker.fetch(&q(), "c1", 10).await.unwrap();
    let d = f.jobs.iter().position(|d| d.envelope.id == held).map(|i| f.jobs.swap_remove(i)).unwrap();
    assert_eq!(broker.settle(&[Outcome { delivery: d, result: Ok(None) }]).await.unwrap(), [Settled::Succeeded]);
    assert_eq!(broker.job(held).await.unwrap().unwrap().state, JobState::Succeeded);
    let ttl: i64 = env.broker.connection().pttl(env.keys().job(&q(), held)).await.unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000, "the hash lives as long as the lock: {ttl} ms");
    let dup = broker.enqueue(NewJob::new("echo", json!({})).unique("for-a-while", Some(Duration::from_secs(60))));
    let dup = dup.await.unwrap();
    assert!(!dup.created && dup.job.id == held, "the duplicate gets the succeeded job back");
    env.cleanup().await;
}

#[tokio::test]
async fn with_no_retention_a_batch_callback_after_its_jobs_succeeded_still_runs() {
    let env = TestEnv::with(&[("JOBQ_RETENTION_SUCCEEDED", "0")]).await;
    let broker = &env.broker;
    let done = broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id;
    let waits = broker.enqueue(NewJob::new("echo", json!({})).delay(Duration::from_secs(60))).await.unwrap().job.id;
    // The first job succeeds (and leaves Redis) before the callback is enqueued, as a fast
    // worker does between a batch and its `on_complete`.
    let d = fetch_one(broker).await;
    assert_eq!(d.envelope.id, done);
    assert_eq!(broker.settle(&[Outcome { delivery: d, result: Ok(None) }]).await.unwrap(), [Settled::Succeeded]);
    assert!(broker.job(done).await.unwrap().is_none(), "gone per retention");

    let callback = broker.enqueue(NewJob::new("done", json!({})).after_batch([done])).await.unwrap();
    assert!(callback.created);
    assert_eq!(callback.job.state, JobState::Queued, "nothing left to wait for");
    let callback = broker.enqueue(NewJob::new("done", json!({})).after_batch([done, waits])).await.unwrap();
    assert_eq!(callback.job.state, JobState::Waiting, "waits for the job still there only");

    // A dependency named by the caller that is not in Redis stays unknown: it may never have existed.
    for job in [
        NewJob::new("echo", json!({})).depends_on([done]),
        NewJob::new("echo", json!({})).after_all_finish([done]),
        NewJob {
            dependency_mode: jobq_core::job::DependencyMode::Finished,
            ..NewJob::new("echo", json!({})).depends_on([done])
        },
    ] {
        let err = broker.enqueue(job).await.unwrap_err().to_string();
        assert!(err.contains(&done.to_string()), "{err}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_stale_lease_can_neither_complete_nor_fail_the_job() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id;
    let mut d = fetch_one(&env.broker).await;
    d.lease = "999".into();
    let ok = Outcome { delivery: d.clone(), result: Ok(None) };
    assert_eq!(env.broker.settle(&[ok, fail(&d, None)]).await.unwrap(), [Settled::Stale, Settled::Stale]);
    assert_eq!(env.broker.job(id).await.unwrap().unwrap().state, JobState::Running);
    assert_eq!(
        pending(&env, &env.keys().stream(&q(), Priority::Normal)).await,
        1,
        "the real owner's entry stays pending"
    );
    assert_eq!(xlen(&env, &env.keys().events(&q())).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn completed_attempts_reach_the_outbox_with_what_their_fetch_returned_and_stale_ones_do_not() {
    let env = TestEnv::new().await;
    for n in 0..3 {
        env.broker.enqueue(NewJob::new("echo", json!({"n": n}))).await.unwrap();
    }
    let fetched = env.broker.fetch(&q(), "c1", 3).await.unwrap().jobs;
    assert_eq!(fetched.len(), 3);
    let mut stale = fetched[1].clone();
    stale.lease = "999".into();
    let ok = |d: &Delivery| Outcome { delivery: d.clone(), result: Ok(None) };
    let settled = env.broker.settle(&[ok(&fetched[0]), ok(&stale), ok(&fetched[2])]).await.unwrap();
    assert_eq!(settled, [Settled::Succeeded, Settled::Stale, Settled::Succeeded]);
    // The middle job, still running under its real lease, completes on its own.
    assert_eq!(env.broker.settle(&[ok(&fetched[1])]).await.unwrap(), [Settled::Succeeded]);

    env.broker.ensure_recorder_groups(&[q()]).await.unwrap();
    let mut conn = env.broker.blocking_connection(Duration::from_millis(100)).await.unwrap();
    let batch = env.broker.read_events(&mut conn, "r1", &[q()], 100, Duration::from_millis(100)).await.unwrap();
    let ids: Vec<_> = batch.events.iter().map(|e| e.job_id).collect();
    let order = [&fetched[0], &fetched[2], &fetched[1]];
    assert_eq!(ids, order.map(|d| d.envelope.id), "the stale attempt is left out of the batch event");
    for (e, d) in batch.events.iter().zip(order) {
        let stored = env.broker.job(d.envelope.id).await.unwrap().unwrap();
        assert_eq!(stored.state, JobState::Succeeded);
        assert_eq!((e.run, e.attempt, e.outcome.as_str(), e.kind.as_str()), (1, 1, "succeeded", "echo"));
        assert_eq!(e.worker.as_deref(), Some("c1"));
        assert!(e.started_at.is_some());
        assert_eq!(e.started_at, stored.started_at, "the event's start is the hash's");
        assert_eq!(e.started_at.unwrap().timestamp_millis(), d.started_ms);
        assert_eq!(e.finished_at, stored.finished_at);
    }
    assert_eq!(batch.entries().len(), 2, "one batch entry and one plain entry");
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_given_dependents_while_it_runs_releases_them_when_it_completes() {
    let env = TestEnv::new().await;
    let b = &env.broker;
    let parent = b.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id;
    let plain = b.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id;
    let running = b.fetch(&q(), "c1", 2).await.unwrap().jobs;
    let child = b.enqueue(NewJob::new("echo", json!({})).depends_on([parent])).await.unwrap().job;
    assert_eq!(child.state, JobState::Waiting);
    let ok = |d: &Delivery| Outcome { delivery: d.clone(), result: Ok(None) };
    assert_eq!(b.settle(&[ok(&running[0]), ok(&running[1])]).await.unwrap(), [Settled::Succeeded; 2]);
    assert_eq!(b.job(child.id).await.unwrap().unwrap().state, JobState::Queued);
    assert_eq!(b.job(plain).await.unwrap().unwrap().state, JobState::Succeeded);
    let d = fetch_one(b).await;
    assert_eq!(d.envelope.id, child.id);
    env.cleanup().await;
}

async fn marked_plain(env: &TestEnv, id: jobq_core::job::JobId) -> bool {
    hget(env, &env.keys().job(&q(), id), "plain").await.is_some()
}

#[tokio::test]
async fn a_job_marked_plain_still_releases_a_dependent_added_later_and_resumes_from_its_checkpoint() {
    // The mark says only what the enqueue wrote: a dependent or a checkpoint comes later, from
    // any version of the scripts, and leaves it, so both are read whatever it says.
    let env = TestEnv::new().await;
    let b = &env.broker;
    let ids = enqueue_n(&env, 2).await;
    let (parent, ckpt) = (ids[0], ids[1]);
    let deadline = NewJob::new("echo", json!({})).expires_at(chrono::Utc::now() + chrono::Duration::hours(1));
    let deadline = b.enqueue(deadline).await.unwrap().job.id;
    let unique = b.enqueue(NewJob::new("echo", json!({})).unique("u", None)).await.unwrap().job.id;
    assert!(marked_plain(&env, parent).await && marked_plain(&env, ckpt).await);
    assert!(!marked_plain(&env, deadline).await && !marked_plain(&env, unique).await);
    let running = b.fetch(&q(), "c1", 2).await.unwrap().jobs;
    let child = b.enqueue(NewJob::new("echo", json!({})).depends_on([parent])).await.unwrap().job;
    assert_eq!(child.state, JobState::Waiting);
    assert!(!marked_plain(&env, child.id).await, "a job with dependencies");
    assert!(marked_plain(&env, parent).await, "a dependent leaves its dependency's mark");
    let d = running.iter().find(|d| d.envelope.id == ckpt).unwrap();
    assert!(b.touch(&lease(d), &[("checkpoint", "7".into())]).await.unwrap());
    assert!(marked_plain(&env, ckpt).await, "so does a checkpoint");
    let p = running.iter().find(|d| d.envelope.id == parent).unwrap();
    let ok = Outcome { delivery: p.clone(), result: Ok(None) };
    assert_eq!(
        b.settle(&[ok, fail(d, Some(Duration::from_secs(60)))]).await.unwrap(),
        [Settled::Succeeded, Settled::Retrying]
    );
    assert_eq!(b.job(child.id).await.unwrap().unwrap().state, JobState::Queued, "released with its dependency");
    // The next attempt gets the checkpoint.
    let _: () = b.connection().zadd(env.keys().scheduled(&q()), ckpt.to_string(), 0).await.unwrap();
    assert_eq!(b.promote(&[q()], 10).await.unwrap()[0].count, 1);
    let again = b.fetch(&q(), "c1", 10).await.unwrap().jobs;
    let again = again.iter().find(|d| d.envelope.id == ckpt).expect("fetched again");
    assert_eq!((again.attempt, again.checkpoint.clone()), (2, Some(json!(7))));
    env.cleanup().await;
}

#[tokio::test]
async fn a_counter_written_by_something_else_as_no_number_counts_from_zero_and_fails_no_fetch() {
    let env = TestEnv::new().await;
    let b = &env.broker;
    let ids = enqueue_n(&env, 2).await;
    let (id, other) = (ids[0], ids[1]);
    let _: () = b.connection().hset(env.keys().job(&q(), id), "attempts_total", "many").await.unwrap();
    let started = b.fetch(&q(), "c1", 2).await.unwrap().jobs;
    let ids: Vec<_> = started.iter().map(|d| (d.envelope.id, d.attempt, d.attempts_total)).collect();
    assert_eq!(ids, [(id, 1, 1), (other, 1, 1)]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_unique_lock_held_until_the_end_is_released_when_the_job_completes_in_a_batch() {
    let env = TestEnv::new().await;
    let b = &env.broker;
    let unique = b.enqueue(NewJob::new("echo", json!({})).unique("once", None)).await.unwrap().job.id;
    b.enqueue(NewJob::new("echo", json!({}))).await.unwrap();
    let running = b.fetch(&q(), "c1", 2).await.unwrap().jobs;
    let dup = b.enqueue(NewJob::new("echo", json!({})).unique("once", None)).await.unwrap();
    assert!(!dup.created && dup.job.id == unique, "held while it runs");
    let ok = |d: &Delivery| Outcome { delivery: d.clone(), result: Ok(None) };
    assert_eq!(b.settle(&[ok(&running[0]), ok(&running[1])]).await.unwrap(), [Settled::Succeeded; 2]);
    let again = b.enqueue(NewJob::new("echo", json!({})).unique("once", None)).await.unwrap();
    assert!(again.created && again.job.id != unique, "released at completion");
    env.cleanup().await;
}

#[tokio::test]
async fn failures_retry_with_backoff_then_dead_letter_with_the_envelope() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("flaky", json!({"k": "v"})).max_attempts(2)).await.unwrap().job.id;
    let d = fetch_one(&env.broker).await;
    assert_eq!(env.broker.settle(&[fail(&d, Some(Duration::from_secs(60)))]).await.unwrap(), [Settled::Retrying]);
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Retrying);
    assert_eq!(job.last_error.as_deref(), Some("boom"));
    let zset = env.keys().scheduled(&q());
    let score: f64 = env.broker.connection().zscore(&zset, id.to_string()).await.unwrap();
    let wait = score as i64 - chrono::Utc::now().timestamp_millis();
    assert!((55_000..=61_000).contains(&wait), "retry scheduled after its backoff, got {wait} ms");
    assert_eq!(xlen(&env, &env.keys().stream(&q(), Priority::Normal)).await, 0);
    // Make it due now and promote it.
    let _: () = env.broker.connection().zadd(&zset, id.to_string(), 0).await.unwrap();
    assert_eq!(env.broker.promote(&[q()], 10).await.unwrap()[0].count, 1);
    let d = fetch_one(&env.broker).await;
    assert_eq!(d.attempt, 2);
    assert_eq!(env.broker.settle(&[fail(&d, Some(Duration::from_secs(1)))]).await.unwrap(), [Settled::Dead]);
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(hget(&env, &env.keys().job(&q(), id), "dead_reason").await.as_deref(), Some("max_attempts"));
    let events = env
        .broker
        .connection()
        .xrange_all::<_, redis::streams::StreamRangeReply>(env.keys().events(&q()))
        .await
        .unwrap()
        .ids;
    let outcomes: Vec<String> = events.iter().filter_map(|e| e.get("outcome")).collect();
    assert_eq!(outcomes, ["failed", "dead"]);
    let envelope: String = events[1].get("envelope").expect("dead event carries the envelope");
    assert!(envelope.contains("\"flaky\""));
    env.cleanup().await;
}

#[tokio::test]
async fn a_fatal_failure_dead_letters_at_once_and_a_dlq_retry_requeues_once() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("x", json!({})).max_attempts(5)).await.unwrap().job.id;
    let d = fetch_one(&env.broker).await;
    assert_eq!(env.broker.settle(&[fail(&d, None)]).await.unwrap(), [Settled::Dead]);
    assert_eq!(hget(&env, &env.keys().job(&q(), id), "dead_reason").await.as_deref(), Some("fatal"));
    assert_eq!(env.broker.retry_dead(&d.envelope, 1).await.unwrap(), Requeued::Queued { run: 2 });
    assert!(matches!(env.broker.retry_dead(&d.envelope, 1).await.unwrap(), Requeued::NotDead { .. }));
    let again = fetch_one(&env.broker).await;
    assert_eq!((again.run, again.attempt, again.attempts_total), (2, 1, 2));
    env.cleanup().await;
}

#[tokio::test]
async fn a_dlq_retry_rebuilds_an_expired_job_hash_from_the_envelope() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("x", json!({"keep": 1}))).await.unwrap().job.id;
    let d = fetch_one(&env.broker).await;
    env.broker.settle(&[fail(&d, None)]).await.unwrap();
    let _: () = env.broker.connection().del(env.keys().job(&q(), id)).await.unwrap();
    assert_eq!(env.broker.retry_dead(&d.envelope, 1).await.unwrap(), Requeued::Queued { run: 2 });
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.payload), (JobState::Queued, json!({"keep": 1})));
    // A worker frozen since the job's first life still holds lease "1": the rebuilt hash does
    // not hand that token out again, so the zombie cannot complete the new attempt.
    assert_eq!(d.lease, "1");
    let again = fetch_one(&env.broker).await;
    assert_ne!(again.lease, d.lease, "a rebuilt hash's lease tokens do not start over");
    let zombie = Outcome { delivery: Delivery { entry: again.entry.clone(), ..d.clone() }, result: Ok(None) };
    assert_eq!(env.broker.settle(&[zombie]).await.unwrap(), [Settled::Stale]);
    let mine = Outcome { delivery: again, result: Ok(None) };
    assert_eq!(env.broker.settle(&[mine]).await.unwrap(), [Settled::Succeeded]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_finished_job_leaves_the_expiring_set_whatever_ends_it() {
    let env = TestEnv::new().await;
    let later = chrono::Utc::now() + chrono::Duration::days(30);
    let expiring = env.keys().expiring(&q());
    let members = || async { env.broker.connection().zcard::<_, u64>(&expiring).await.unwrap() };
    // Succeeded, dead, cancelled while queued.
    for _ in 0..2 {
        env.broker.enqueue(NewJob::new("x", json!({})).expires_at(later)).await.unwrap();
    }
    let cancelled = env.broker.enqueue(NewJob::new("x", json!({})).expires_at(later)).await.unwrap().job.id;
    assert_eq!(members().await, 3);
    let mut f = env.broker.fetch(&q(), "c1", 2).await.unwrap();
    let (a, b) = (f.jobs.pop().unwrap(), f.jobs.pop().unwrap());
    let done = env.broker.settle(&[Outcome { delivery: a, result: Ok(None) }, fail(&b, None)]).await.unwrap();
    assert_eq!(done, [Settled::Succeeded, Settled::Dead]);
    env.broker.cancel(cancelled).await.unwrap();
    assert_eq!(members().await, 0, "no member left behind for a job that ended");
    env.cleanup().await;
}

/// How many SCRIPT LOADs the server has run.
async fn script_commands(broker: &Broker) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut broker.connection()).await.unwrap();
    let line = info.lines().find_map(|l| l.strip_prefix("cmdstat_script|load:calls="));
    line.map_or(0, |l| l.split(',').next().unwrap().parse().unwrap())
}

#[tokio::test]
async fn scripts_are_reloaded_once_after_redis_loses_its_script_cache_however_many_calls_find_them_gone() {
    // A server of its own: SCRIPT FLUSH empties the cache of every client of a server.
    let redis = jobq_testutil::RedisServer::start();
    let env = TestEnv::with(&[("REDIS_URL", &redis.url())]).await;
    let fresh = script_commands(&env.broker).await;
    env.broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap();
    let per_load = script_commands(&env.broker).await - fresh;
    assert!(per_load >= 10, "the first call loaded every script: {per_load} SCRIPT LOADs");
    for round in 1..=2u64 {
        redis::cmd("SCRIPT").arg("FLUSH").query_async::<()>(&mut env.broker.connection()).await.unwrap();
        let before = script_commands(&env.broker).await;
        // Clones share the connection, and also the knowledge of a load in progress.
        let calls = (0..20).map(|i| {
            let broker = env.broker.clone();
            tokio::spawn(async move { broker.enqueue(NewJob::new("echo", json!({ "i": i }))).await })
        });
        for call in futures_util::future::join_all(calls).await {
            assert!(call.unwrap().expect("NOSCRIPT is handled").created);
        }
        let loads = script_commands(&env.broker).await - before;
        assert_eq!(loads, per_load, "round {round}: 20 calls found the scripts gone and one of them loaded them");
    }
    assert_eq!(env.broker.fetch(&q(), "c1", 50).await.unwrap().jobs.len(), 41);
    env.cleanup().await;
}

#[tokio::test]
async fn stream_entries_of_vanished_jobs_are_dropped_by_fetch() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id;
    let keep = env.broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap().job.id;
    let _: () = env.broker.connection().del(env.keys().job(&q(), id)).await.unwrap();
    let f = env.broker.fetch(&q(), "c1", 10).await.unwrap();
    assert_eq!(f.jobs.iter().map(|d| d.envelope.id).collect::<Vec<_>>(), [keep]);
    let stream = env.keys().stream(&q(), Priority::Normal);
    assert_eq!(xlen(&env, &stream).await, 1, "the orphan entry was deleted");
    env.cleanup().await;
}

#[tokio::test]
async fn outbox_events_are_read_once_per_group_and_deleted_on_ack() {
    let env = TestEnv::new().await;
    env.broker.enqueue(NewJob::new("echo", json!({}))).await.unwrap();
    let d = fetch_one(&env.broker).await;
    env.broker.settle(&[Outcome { delivery: d, result: Ok(None) }]).await.unwrap();
    env.broker.ensure_recorder_groups(&[q()]).await.unwrap();
    let mut conn = env.broker.blocking_connection(Duration::from_millis(100)).await.unwrap();
    let batch = env.broker.read_events(&mut conn, "r1", &[q()], 100, Duration::from_millis(100)).await.unwrap();
    assert_eq!(batch.events.len(), 1);
    assert_eq!(batch.events[0].outcome, "succeeded");
    let again = env.broker.read_events(&mut conn, "r2", &[q()], 100, Duration::from_millis(50)).await.unwrap();
    assert!(again.is_empty(), "another recorder does not get the same event");
    // Not acked yet: a recorder can take it over once idle.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let claimed = env.broker.claim_events("r2", &q(), Duration::from_millis(50), 100).await.unwrap();
    assert_eq!(claimed.events.len(), 1);
    let entries: Vec<_> = claimed.events.iter().map(|e| (e.queue.clone(), e.entry.clone())).collect();
    env.broker.ack_events(&entries).await.unwrap();
    assert_eq!(xlen(&env, &env.keys().events(&q())).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_large_batch_over_two_queues_keeps_each_queues_order_across_script_calls() {
    let env = TestEnv::new().await;
    let other: QueueName = "other".parse().unwrap();
    // 700 jobs, alternating queues: each queue's 350 span two enqueue calls. The last job of
    // `default` depends on its first (an earlier call), and two share a unique key.
    let mut jobs: Vec<NewJob> = (0..700)
        .map(|i| NewJob::new("echo", json!({"i": i})).queue(if i % 2 == 0 { q() } else { other.clone() }))
        .collect();
    let first = env.broker.enqueue_many(jobs.drain(..1).collect(), false).await.unwrap();
    let first_id = first[0].as_ref().unwrap().job.id;
    jobs[697] = NewJob::new("echo", json!({"i": 698})).depends_on(vec![first_id]);
    jobs[101] = NewJob::new("echo", json!({"i": 102})).unique("once", None);
    jobs[301] = NewJob::new("echo", json!({"i": 302})).unique("once", None);
    let items = env.broker.enqueue_many(jobs, false).await.unwrap();
    assert_eq!(items.len(), 699);
    let created: Vec<_> = items.iter().map(|r| r.as_ref().unwrap()).collect();
    assert_eq!(created.iter().filter(|e| !e.created).count(), 1, "the second unique key is the first's job");
    assert_eq!(created[301].job.id, created[101].job.id);
    assert_eq!(created[697].job.state, JobState::Waiting, "waits for a job enqueued by an earlier call");
    // Stream order in each queue is the order given.
    for (queue, parity) in [(q(), 0), (other.clone(), 1)] {
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(env.keys().stream(&queue, Priority::Normal))
            .arg("-")
            .arg("+")
            .query_async(&mut env.broker.connection())
            .await
            .unwrap();
        let ids: Vec<String> = entries.into_iter().map(|(_, f)| f[0].1.clone()).collect();
        let mut expected: Vec<String> = std::iter::once(first_id.to_string()).filter(|_| parity == 0).collect();
        expected.extend(
            created
                .iter()
                .enumerate()
                .filter(|(k, e)| (k + 1) % 2 == parity && e.created && e.job.state == JobState::Queued)
                .map(|(_, e)| e.job.id.to_string()),
        );
        assert_eq!(ids, expected, "queue {queue}");
    }
    // Counters start absent and read as 0.
    let stored = env.broker.job(created[0].job.id).await.unwrap().unwrap();
    assert_eq!((stored.attempt, stored.reclaims), (0, 0));
    assert_eq!(hget(&env, &env.keys().job(&other, created[0].job.id), "attempt").await, None);
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_key_of_another_type_spoils_only_its_own_job() {
    let env = TestEnv::new().await;
    let ids: Vec<_> = enqueue_n(&env, 4).await;
    // A fetch meeting one: the others start, its entry goes.
    spoil(&env, ids[0]).await;
    let f = env.broker.fetch(&q(), "c1", 10).await.unwrap();
    assert_eq!(f.jobs.iter().map(|d| d.envelope.id).collect::<Vec<_>>(), ids[1..]);
    assert_eq!(xlen(&env, &env.keys().stream(&q(), Priority::Normal)).await, 3);
    // A heartbeat meeting one: the others' leases are renewed, its lease is lost.
    spoil(&env, ids[2]).await;
    let leases: Vec<Lease> = f.jobs.iter().map(lease).collect();
    let held = env.broker.heartbeat("c1", &leases).await.unwrap();
    assert_eq!(held, [LeaseStatus::Held, LeaseStatus::Lost, LeaseStatus::Held]);
    // A batch of outcomes meeting one: the others are written in full (history, retention).
    let outcomes: Vec<Outcome> = f.jobs.iter().map(|d| Outcome { delivery: d.clone(), result: Ok(None) }).collect();
    let settled = env.broker.settle(&outcomes).await.unwrap();
    assert_eq!(settled, [Settled::Succeeded, Settled::Stale, Settled::Succeeded]);
    for id in [ids[1], ids[3]] {
        assert_eq!(env.broker.job(id).await.unwrap().unwrap().state, JobState::Succeeded);
    }
    let retained: Vec<String> = env.broker.connection().zrange(env.keys().retained(&q()), 0, -1).await.unwrap();
    assert_eq!(retained, [format!("{} {}", ids[1], ids[3])]);
    let events: redis::streams::StreamRangeReply =
        env.broker.connection().xrange_all(env.keys().events(&q())).await.unwrap();
    let batch = events.ids[0].get::<String>("batch").unwrap();
    assert!(batch.contains(&ids[1].to_string()) && batch.contains(&ids[3].to_string()), "{batch}");
    // The promoter meeting one among due jobs: the others move.
    let mut later = Vec::new();
    for _ in 0..2 {
        later.push(
            env.broker.enqueue(NewJob::new("x", json!({})).delay(Duration::from_millis(1))).await.unwrap().job.id,
        );
    }
    spoil(&env, later[0]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let promoted = env.broker.promote(&[q()], 100).await.unwrap();
    assert_eq!(promoted[0].count, 1);
    assert_eq!(env.broker.job(later[1]).await.unwrap().unwrap().state, JobState::Queued);
    let scheduled: u64 = env.broker.connection().zcard(env.keys().scheduled(&q())).await.unwrap();
    assert_eq!(scheduled, 0, "the spoiled member is gone too");
    env.cleanup().await;
}

/// Puts a string where the job's hash was.
async fn spoil(env: &TestEnv, id: jobq_core::job::JobId) {
    let key = env.keys().job(&q(), id);
    let _: () =
        redis::pipe().del(&key).set(&key, "not a hash").query_async(&mut env.broker.connection()).await.unwrap();
}

async fn enqueue_n(env: &TestEnv, n: usize) -> Vec<jobq_core::job::JobId> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(env.broker.enqueue(NewJob::new("x", json!({}))).await.unwrap().job.id);
    }
    ids
}

#[tokio::test]
async fn a_job_retrying_past_its_deadline_is_dead_lettered_as_expired() {
    let env = TestEnv::new().await;
    let deadline = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    let id = env.broker.enqueue(NewJob::new("x", json!({})).expires_at(deadline)).await.unwrap().job.id;
    let d = fetch_one(&env.broker).await;
    // The deadline passes while it runs, and a promoter pass lets go of its member.
    tokio::time::sleep(Duration::from_millis(400)).await;
    env.broker.promote(&[q()], 100).await.unwrap();
    assert_eq!(env.broker.job(id).await.unwrap().unwrap().state, JobState::Running);
    let settled = env.broker.settle(&[fail(&d, Some(Duration::from_secs(3600)))]).await.unwrap();
    assert_eq!(settled, [Settled::Retrying]);
    let p = env.broker.promote(&[q()], 100).await.unwrap();
    assert_eq!(p[0].expired, 1, "not an hour later, at its retry");
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Dead);
    env.cleanup().await;
}

/// Other keys of the database come and go: the same SCAN position then covers other buckets.
async fn churn(env: &TestEnv, round: usize) {
    let ns = env.keys().namespace();
    let mut pipe = redis::pipe();
    for i in 0..500 {
        pipe.set(format!("{ns}:{{churn}}:{round}:{i}"), 1).ignore();
        if round > 0 {
            pipe.del(format!("{ns}:{{churn}}:{}:{i}", round - 1)).ignore();
        }
    }
    let _: () = pipe.query_async(&mut env.broker.connection()).await.unwrap();
}

#[tokio::test]
async fn paging_through_jobs_while_keys_come_and_go_skips_and_repeats_none() {
    let env = TestEnv::new().await;
    let ids: HashSet<_> = enqueue_n(&env, 200).await.into_iter().collect();
    let (mut seen, mut cursor, mut round) = (Vec::new(), None::<String>, 0);
    loop {
        let (items, next) = env.broker.list_jobs(Some(&q()), None, None, 7, cursor.as_deref()).await.unwrap();
        assert!(items.len() <= 7 + 20, "about `limit` jobs: {}", items.len());
        seen.extend(items.into_iter().map(|j| j.id));
        churn(&env, round).await;
        round += 1;
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let unique: HashSet<_> = seen.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no job twice");
    assert_eq!(unique, ids, "every job once");
    env.cleanup().await;
}

#[tokio::test]
async fn a_priority_stream_of_another_type_spoils_only_itself() {
    let env = TestEnv::new().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(env.broker.enqueue(NewJob::new("x", json!({})).priority(Priority::Critical)).await.unwrap().job.id);
    }
    let low = env.keys().stream(&q(), Priority::Low);
    let _: () = env.broker.connection().set(&low, "not a stream").await.unwrap();
    // The fetch asks for more than the critical stream holds: it reads on past it, and the
    // jobs it started are returned, not left pending with the script failed.
    let f = env.broker.fetch(&q(), "c1", 10).await.unwrap();
    assert_eq!(f.jobs.iter().map(|d| d.envelope.id).collect::<Vec<_>>(), ids);
    let empty = env.broker.fetch(&q(), "c1", 10).await.unwrap();
    assert!(empty.jobs.is_empty());
    assert!(empty.last_ids.iter().all(|(k, _)| *k != low), "nothing to wait on there: {:?}", empty.last_ids);
    // A job of another stream whose group is destroyed while it runs: only its lease is lost.
    let normal = env.broker.enqueue(NewJob::new("x", json!({}))).await.unwrap().job.id;
    let d = fetch_one(&env.broker).await;
    assert_eq!(d.envelope.id, normal);
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(env.keys().stream(&q(), Priority::Normal))
        .arg(Keys::GROUP)
        .query_async(&mut env.broker.connection())
        .await
        .unwrap();
    let leases: Vec<Lease> = f.jobs.iter().chain([&d]).map(lease).collect();
    let held = env.broker.heartbeat("c1", &leases).await.unwrap();
    assert_eq!(held, [LeaseStatus::Held, LeaseStatus::Held, LeaseStatus::Held, LeaseStatus::Lost]);
    // A lost fetch handed back, and the reaper, go over the other streams.
    env.broker.disown(&q(), "c1", &Default::default()).await.unwrap();
    env.broker.reclaim("r", &[q()], Duration::from_millis(1), 3, Duration::from_secs(60)).await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_breaker_probe_admitted_again_runs_and_other_jobs_wait_for_it() {
    use jobq_core::stream::BreakerOp;
    let env = TestEnv::new().await;
    let b = &env.broker;
    let open_for = Duration::from_secs(2);
    let (probe, other) = (jobq_core::job::JobId::new(), jobq_core::job::JobId::new());
    assert_eq!(b.breaker("pdf", BreakerOp::Fail, 1, open_for, probe).await.unwrap(), 1, "opens");
    assert!(b.breaker("pdf", BreakerOp::Admit, 1, open_for, probe).await.unwrap() > 0, "open: held");
    tokio::time::sleep(open_for + Duration::from_millis(20)).await;
    assert_eq!(b.breaker("pdf", BreakerOp::Admit, 1, open_for, probe).await.unwrap(), 0, "half-open: the probe");
    // The probe's answer was lost; the job comes back and asks again: it is still the probe.
    assert_eq!(b.breaker("pdf", BreakerOp::Admit, 1, open_for, probe).await.unwrap(), 0, "the probe runs");
    assert!(b.breaker("pdf", BreakerOp::Admit, 1, open_for, other).await.unwrap() > 0, "others wait for it");
    assert_eq!(b.breaker("pdf", BreakerOp::Ok, 1, open_for, probe).await.unwrap(), 1, "closes");
    assert_eq!(b.breaker("pdf", BreakerOp::Admit, 1, open_for, other).await.unwrap(), 0, "closed: runs");
    env.cleanup().await;
}
