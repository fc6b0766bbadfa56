//! Leases, reclaim, fencing, expiry, cancellation, unique keys and pause at the script level.

use std::time::Duration;

use crate::lease;
use jobq_core::job::{JobId, JobState, NewJob, Priority, QueueName};
use jobq_core::stream::{
    Broker, Bulk, BulkAction, BulkFilter, Cancel, Delivery, Failure, LeaseStatus, Outcome, RunNow, Settled,
};
use jobq_testutil::TestEnv;
use redis::AsyncCommands;
use serde_json::json;

fn q() -> QueueName {
    QueueName::default_queue()
}

async fn fetch(broker: &Broker, consumer: &str, n: usize) -> Vec<Delivery> {
    broker.fetch(&q(), consumer, n).await.unwrap().jobs
}

/// Enqueues two jobs and fetches both on `consumer`: their ids, and the deliveries as fetched.
async fn two_fetched(env: &TestEnv, consumer: &str, first: NewJob, second: NewJob) -> (JobId, JobId, Vec<Delivery>) {
    let a = env.broker.enqueue(first).await.unwrap().job.id;
    let b = env.broker.enqueue(second).await.unwrap().job.id;
    (a, b, fetch(&env.broker, consumer, 2).await)
}

/// The two jobs of a fetch of two, `first` first.
fn by_id(jobs: &[Delivery], first: JobId) -> (&Delivery, &Delivery) {
    if jobs[0].envelope.id == first {
        (&jobs[0], &jobs[1])
    } else {
        (&jobs[1], &jobs[0])
    }
}

#[tokio::test]
async fn heartbeats_keep_a_lease_and_the_reaper_takes_lapsed_ones() {
    let env = TestEnv::new().await;
    let (held, lapsed, jobs) = two_fetched(&env, "w1", NewJob::new("a", json!({})), NewJob::new("b", json!({}))).await;
    let (dh, dl) = by_id(&jobs, held);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(env.broker.heartbeat("w1", &[lease(dh)]).await.unwrap(), [LeaseStatus::Held]);
    let r = env.broker.reclaim("w2", &[q()], Duration::from_millis(1000), 3, Duration::from_secs(1)).await.unwrap();
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
        let r =
            env.broker.reclaim("reaper", &[q()], Duration::from_millis(50), 2, Duration::from_secs(1)).await.unwrap();
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
async fn a_job_running_at_its_deadline_then_held_back_or_requeued_is_dead_at_the_next_sweep() {
    let env = TestEnv::new().await;
    let deadline = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    let job = || NewJob::new("x", json!({})).max_attempts(5).expires_at(deadline);
    let (held, requeued, d) = two_fetched(&env, "w", job(), job()).await;
    tokio::time::sleep(Duration::from_millis(350)).await;
    // Both run past the deadline: the sweep leaves them.
    assert_eq!(env.broker.promote(&[q()], 100).await.unwrap()[0].expired, 0);
    // Then a limit holds one back for a minute, and the other's worker stops.
    let (held_attempt, _) = by_id(&d, held);
    env.broker.settle(&[failure(held_attempt, Some(Duration::from_secs(60)), "postponed")]).await.unwrap();
    let r = env.broker.reclaim("reaper", &[q()], Duration::from_millis(50), 3, Duration::from_secs(1)).await.unwrap();
    assert_eq!(r[0].requeued, 1);
    // Neither has started, and both are past the deadline: the next sweep ends them.
    assert_eq!(env.broker.promote(&[q()], 100).await.unwrap()[0].expired, 2);
    for id in [held, requeued] {
        let job = env.broker.job(id).await.unwrap().unwrap();
        assert_eq!((job.state, job.dead_reason.as_deref()), (JobState::Dead, Some("expired")), "{id}");
    }
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
async fn a_scheduled_or_retrying_job_runs_now_on_request_and_no_other_state_changes() {
    let env = TestEnv::new().await;
    let scheduled_set = env.keys().scheduled(&q());
    let later = NewJob::new("x", json!({"n": 1})).delay(Duration::from_secs(3600));
    let scheduled = env.broker.enqueue(later.priority(Priority::High)).await.unwrap().job.id;
    let RunNow::Queued(answered) = env.broker.run_now(scheduled).await.unwrap() else { panic!("not queued") };
    let info = env.broker.job(scheduled).await.unwrap().unwrap();
    assert_eq!(*answered, info, "the job as the script left it");
    assert_eq!(info.state, JobState::Queued);
    assert!(info.run_at.unwrap() <= chrono::Utc::now(), "run_at is now, not in an hour");
    let members: u64 = env.broker.connection().zcard(&scheduled_set).await.unwrap();
    assert_eq!(members, 0, "it left the scheduled set");
    let d = fetch(&env.broker, "w", 10).await;
    assert_eq!((d.len(), d[0].envelope.id, d[0].priority), (1, scheduled, Priority::High), "it keeps its priority");
    assert_eq!(env.broker.run_now(scheduled).await.unwrap(), RunNow::Not(JobState::Running));
    env.broker.settle(&[Outcome { delivery: d[0].clone(), result: Ok(None) }]).await.unwrap();
    assert_eq!(env.broker.run_now(scheduled).await.unwrap(), RunNow::Not(JobState::Succeeded));

    // A retry an hour away runs now, as its second attempt.
    let id = env.broker.enqueue(NewJob::new("x", json!({})).max_attempts(3)).await.unwrap().job.id;
    let d = fetch(&env.broker, "w", 1).await.pop().unwrap();
    let failed = Failure { message: "boom".into(), retry_in: Some(Duration::from_secs(3600)), reason: "max_attempts" };
    env.broker.settle(&[Outcome { delivery: d, result: Err(failed) }]).await.unwrap();
    assert_eq!(env.broker.job(id).await.unwrap().unwrap().state, JobState::Retrying);
    assert!(matches!(env.broker.run_now(id).await.unwrap(), RunNow::Queued(j) if j.state == JobState::Queued));
    let d = fetch(&env.broker, "w", 10).await;
    assert_eq!((d.len(), d[0].envelope.id, d[0].attempt), (1, id, 2));

    // Queued already: nothing changes, no second entry.
    let queued = env.broker.enqueue(NewJob::new("x", json!({}))).await.unwrap().job.id;
    assert_eq!(env.broker.run_now(queued).await.unwrap(), RunNow::Not(JobState::Queued));
    let len: u64 = env.broker.connection().xlen(env.keys().stream(&q(), Priority::Normal)).await.unwrap();
    assert_eq!(len, 2, "the retried job's entry (running) and the queued job's one");
    assert!(matches!(env.broker.run_now(JobId::new()).await, Err(jobq_core::Error::JobNotFound(_))));
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_cancel_takes_the_jobs_not_started_by_type_and_state_and_leaves_the_rest() {
    let env = TestEnv::new().await;
    let b = &env.broker;
    let running = b.enqueue(NewJob::new("a", json!({})).priority(Priority::Critical)).await.unwrap().job.id;
    assert_eq!(fetch(b, "w", 1).await[0].envelope.id, running);
    let retrying = b.enqueue(NewJob::new("a", json!({})).max_attempts(3)).await.unwrap().job.id;
    let d = fetch(b, "w", 1).await.pop().unwrap();
    let failed = Failure { message: "boom".into(), retry_in: Some(Duration::from_secs(3600)), reason: "max_attempts" };
    b.settle(&[Outcome { delivery: d, result: Err(failed) }]).await.unwrap();
    let mut queued = Vec::new();
    for job in [NewJob::new("a", json!({})), NewJob::new("a", json!({})).priority(Priority::High)] {
        queued.push(b.enqueue(job).await.unwrap().job.id);
    }
    let mut others = Vec::new();
    for _ in 0..2 {
        others.push(b.enqueue(NewJob::new("b", json!({}))).await.unwrap().job.id);
    }
    let mut delayed = Vec::new();
    for _ in 0..2 {
        delayed.push(b.enqueue(NewJob::new("a", json!({})).delay(Duration::from_secs(3600))).await.unwrap().job.id);
    }
    let of_a = |states: &[JobState]| BulkFilter { kind: Some("a".into()), states: states.to_vec() };

    let dry = b.queue_jobs(&q(), BulkAction::Cancel, &of_a(&[]), 100, true).await.unwrap();
    assert_eq!(dry, Bulk { count: 5, more: false }, "2 queued, 2 delayed, 1 retrying; not the running one");
    assert_eq!(b.job(queued[0]).await.unwrap().unwrap().state, JobState::Queued, "a dry run changes nothing");
    let first = b.queue_jobs(&q(), BulkAction::Cancel, &of_a(&[JobState::Queued]), 1, false).await.unwrap();
    assert_eq!(first, Bulk { count: 1, more: true });
    let rest = b.queue_jobs(&q(), BulkAction::Cancel, &of_a(&[JobState::Queued]), 100, false).await.unwrap();
    assert_eq!(rest, Bulk { count: 1, more: false });
    for id in &queued {
        assert_eq!(b.job(*id).await.unwrap().unwrap().state, JobState::Cancelled);
    }
    assert_eq!(b.job(delayed[0]).await.unwrap().unwrap().state, JobState::Scheduled, "only the states asked for");
    let waiting = b
        .queue_jobs(&q(), BulkAction::Cancel, &of_a(&[JobState::Scheduled, JobState::Retrying]), 100, false)
        .await
        .unwrap();
    assert_eq!(waiting.count, 3);
    for id in delayed.iter().chain([&retrying]) {
        assert_eq!(b.job(*id).await.unwrap().unwrap().state, JobState::Cancelled);
    }
    let members: u64 = b.connection().zcard(env.keys().scheduled(&q())).await.unwrap();
    assert_eq!(members, 0);
    assert_eq!(b.job(running).await.unwrap().unwrap().state, JobState::Running, "a running job is left");
    let started: Vec<JobId> = fetch(b, "w", 10).await.iter().map(|d| d.envelope.id).collect();
    assert_eq!(started, others, "only the other type's jobs are left to start");
    let len: u64 = b.connection().xlen(env.keys().stream(&q(), Priority::High)).await.unwrap();
    assert_eq!(len, 0, "the cancelled entries are deleted");

    assert!(matches!(
        b.queue_jobs(&q(), BulkAction::Cancel, &of_a(&[JobState::Running]), 100, false).await,
        Err(jobq_core::stream::BulkStopped { error: jobq_core::Error::Invalid(m), .. }) if m.contains("running")
    ));
    let empty = BulkFilter { kind: Some(String::new()), states: vec![] };
    assert!(
        matches!(
            b.queue_jobs(&q(), BulkAction::Cancel, &empty, 100, false).await,
            Err(jobq_core::stream::BulkStopped { error: jobq_core::Error::Invalid(m), .. }) if m.contains("empty")
        ),
        "an empty type matches no job; it is not read as no filter"
    );
    let none = b
        .queue_jobs(&"nothing-here".parse().unwrap(), BulkAction::Cancel, &BulkFilter::default(), 100, false)
        .await
        .unwrap();
    assert_eq!(none, Bulk { count: 0, more: false });
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_cancel_leaves_the_callbacks_its_cancels_release_in_any_priority() {
    let env = TestEnv::new().await;
    let b = &env.broker;
    // A batch of two high jobs, and its callbacks (any outcome) in the low stream, walked after
    // the high one, and in the critical one, walked before it.
    let mut batch = Vec::new();
    for _ in 0..2 {
        batch.push(b.enqueue(NewJob::new("a", json!({})).priority(Priority::High)).await.unwrap().job.id);
    }
    let mut callbacks = Vec::new();
    for p in [Priority::Low, Priority::Critical] {
        let job = NewJob::new("done", json!({})).priority(p).after_all_finish(batch.clone());
        callbacks.push(b.enqueue(job).await.unwrap().job.id);
    }
    assert_eq!(b.job(callbacks[0]).await.unwrap().unwrap().state, JobState::Waiting);

    let cancel = b.queue_jobs(&q(), BulkAction::Cancel, &BulkFilter::default(), 100, false).await.unwrap();
    assert_eq!(cancel, Bulk { count: 2, more: false }, "the batch; the callbacks were waiting");
    for id in &batch {
        assert_eq!(b.job(*id).await.unwrap().unwrap().state, JobState::Cancelled);
    }
    for id in &callbacks {
        assert_eq!(b.job(*id).await.unwrap().unwrap().state, JobState::Queued, "released, as by a DELETE of each");
    }
    let started: Vec<JobId> = fetch(b, "w", 10).await.iter().map(|d| d.envelope.id).collect();
    assert_eq!(started, [callbacks[1], callbacks[0]], "they run, the critical one first");
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_set_emptied_under_a_running_process_is_filled_again_by_its_next_enqueue() {
    let env = TestEnv::new().await;
    let b = env.broker.clone().registering_queues_every(Duration::from_millis(200));
    let set = env.keys().queues();
    b.enqueue(NewJob::new("x", json!({}))).await.unwrap();
    assert_eq!(b.queues().await.unwrap(), [q()]);
    // Another process purges the namespace: this one's registration is still fresh for a while.
    let _: () = b.connection().del(&set).await.unwrap();
    b.enqueue(NewJob::new("x", json!({}))).await.unwrap();
    assert!(b.queues().await.unwrap().is_empty(), "one Redis call per queue and interval, not per enqueue");
    tokio::time::sleep(Duration::from_millis(250)).await;
    b.enqueue(NewJob::new("x", json!({}))).await.unwrap();
    assert_eq!(b.queues().await.unwrap(), [q()], "where the promoter and the recorder find it");
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_run_queues_the_waiting_jobs_now_by_type_and_state_in_their_priority() {
    let env = TestEnv::new().await;
    let b = &env.broker;
    // 150 retrying jobs of type a (more than one call's 100 members), then a delayed a, a
    // delayed b and a queued a.
    let mut retrying = Vec::new();
    for _ in 0..150 {
        retrying.push(b.enqueue(NewJob::new("a", json!({})).max_attempts(3)).await.unwrap().job.id);
    }
    let failed = Failure { message: "boom".into(), retry_in: Some(Duration::from_secs(3600)), reason: "max_attempts" };
    let outcomes = fetch(b, "w", 150).await.into_iter().map(|d| Outcome { delivery: d, result: Err(failed.clone()) });
    b.settle(&outcomes.collect::<Vec<_>>()).await.unwrap();
    let later = |kind: &str| NewJob::new(kind, json!({})).delay(Duration::from_secs(3600));
    let delayed = b.enqueue(later("a").priority(Priority::Critical)).await.unwrap().job.id;
    let other = b.enqueue(later("b")).await.unwrap().job.id;
    let queued = b.enqueue(NewJob::new("a", json!({}))).await.unwrap().job.id;
    let of_a = |states: &[JobState]| BulkFilter { kind: Some("a".into()), states: states.to_vec() };

    let dry = b.queue_jobs(&q(), BulkAction::Run, &of_a(&[]), 1000, true).await.unwrap();
    assert_eq!(dry, Bulk { count: 151, more: false }, "the retrying and the delayed a, not the queued one");
    let run = b.queue_jobs(&q(), BulkAction::Run, &of_a(&[JobState::Retrying]), 1000, false).await.unwrap();
    assert_eq!(run, Bulk { count: 150, more: false });
    assert_eq!(b.job(delayed).await.unwrap().unwrap().state, JobState::Scheduled, "only the states asked for");
    let run = b.queue_jobs(&q(), BulkAction::Run, &of_a(&[]), 1000, false).await.unwrap();
    assert_eq!(run, Bulk { count: 1, more: false });
    let started = fetch(b, "w", 1000).await;
    assert_eq!(started.len(), 152, "the 150 retries, the delayed a, and the one queued before");
    assert_eq!((started[0].envelope.id, started[0].priority), (delayed, Priority::Critical), "in its priority");
    assert!(started.iter().filter(|d| retrying.contains(&d.envelope.id)).all(|d| d.attempt == 2));
    assert!(started.iter().any(|d| d.envelope.id == queued));
    assert_eq!(b.job(other).await.unwrap().unwrap().state, JobState::Scheduled, "another type is left");
    let members: u64 = b.connection().zcard(env.keys().scheduled(&q())).await.unwrap();
    assert_eq!(members, 1);
    assert!(matches!(
        b.queue_jobs(&q(), BulkAction::Run, &of_a(&[JobState::Queued]), 100, false).await,
        Err(jobq_core::stream::BulkStopped { error: jobq_core::Error::Invalid(m), .. }) if m.contains("queued")
    ));
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_cancel_walks_past_many_calls_and_a_job_of_another_type_between() {
    let env = TestEnv::new().await;
    let b = &env.broker;
    // 1,300 queued and 700 delayed, types alternating: many calls of 100 entries each.
    let jobs = |n: usize, delay: bool| {
        (0..n)
            .map(|i| {
                let job = NewJob::new(if i % 2 == 0 { "x" } else { "y" }, json!({ "i": i }));
                if delay {
                    job.delay(Duration::from_secs(3600))
                } else {
                    job
                }
            })
            .collect::<Vec<_>>()
    };
    for chunk in [jobs(650, false), jobs(650, false), jobs(700, true)] {
        b.enqueue_many(chunk, true).await.unwrap();
    }
    let x = BulkFilter { kind: Some("x".into()), states: vec![] };
    assert_eq!(
        b.queue_jobs(&q(), BulkAction::Cancel, &x, 100_000, true).await.unwrap(),
        Bulk { count: 1000, more: false }
    );
    assert_eq!(b.queue_jobs(&q(), BulkAction::Cancel, &x, 600, false).await.unwrap(), Bulk { count: 600, more: true });
    assert_eq!(
        b.queue_jobs(&q(), BulkAction::Cancel, &x, 100_000, false).await.unwrap(),
        Bulk { count: 400, more: false }
    );
    let left = b.queue_jobs(&q(), BulkAction::Cancel, &BulkFilter::default(), 100_000, true).await.unwrap();
    assert_eq!(left, Bulk { count: 1000, more: false }, "every y is left");
    let len: u64 = b.connection().xlen(env.keys().stream(&q(), Priority::Normal)).await.unwrap();
    let members: u64 = b.connection().zcard(env.keys().scheduled(&q())).await.unwrap();
    assert_eq!((len, members), (650, 350));
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

fn failure(d: &Delivery, retry_in: Option<Duration>, reason: &'static str) -> Outcome {
    Outcome { delivery: d.clone(), result: Err(Failure { message: "boom".into(), retry_in, reason }) }
}

async fn outbox(env: &TestEnv) -> Vec<redis::streams::StreamId> {
    let r: redis::streams::StreamRangeReply =
        env.broker.connection().xrange_all(env.keys().events(&q())).await.unwrap();
    r.ids
}

#[tokio::test]
async fn expired_or_stale_entries_at_the_head_of_a_stream_never_let_a_lower_priority_start() {
    use jobq_core::job::Priority;
    let env = TestEnv::new().await;
    let expiring = |n: usize| {
        let soon = chrono::Utc::now() + chrono::Duration::milliseconds(100);
        (0..n).map(|_| NewJob::new("x", json!({})).priority(Priority::Critical).expires_at(soon)).collect()
    };
    env.broker.enqueue_many(expiring(2), false).await.unwrap();
    let gone = env.broker.enqueue(NewJob::new("x", json!({})).priority(Priority::Critical)).await.unwrap().job.id;
    let _: () = env.broker.connection().del(env.keys().job(&q(), gone)).await.unwrap();
    let mut live = Vec::new();
    for _ in 0..2 {
        live.push(env.broker.enqueue(NewJob::new("x", json!({})).priority(Priority::Critical)).await.unwrap().job.id);
    }
    env.broker.enqueue(NewJob::new("x", json!({})).priority(Priority::Low)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    // No sweep has run: the fetch itself meets two expired entries and one whose hash is gone.
    let got = fetch(&env.broker, "w", 2).await;
    assert_eq!(got.iter().map(|d| d.envelope.id).collect::<Vec<_>>(), live, "the critical jobs start, not the low one");

    // Past the per-call limit of entries that start nothing, the fetch stops and says so,
    // starting nothing of a lower priority meanwhile.
    env.broker.enqueue_many(expiring(1001), false).await.unwrap();
    let next = env.broker.enqueue(NewJob::new("x", json!({})).priority(Priority::Critical)).await.unwrap().job.id;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let first = env.broker.fetch(&q(), "w", 1).await.unwrap();
    assert!(first.jobs.is_empty() && first.more && first.last_ids.is_empty(), "{first:?}");
    let second = env.broker.fetch(&q(), "w", 1).await.unwrap();
    assert_eq!(second.jobs.iter().map(|d| d.envelope.id).collect::<Vec<_>>(), [next]);
    assert!(!second.more);
    let last = fetch(&env.broker, "w", 5).await;
    assert_eq!(last.iter().map(|d| d.priority).collect::<Vec<_>>(), [Priority::Low]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_cancel_requested_while_an_attempt_ran_stops_its_retry_and_its_postponement() {
    let env = TestEnv::new().await;
    let (failing, held, d) = two_fetched(
        &env,
        "w",
        NewJob::new("x", json!({})).max_attempts(5),
        NewJob::new("x", json!({})).max_attempts(5),
    )
    .await;
    for id in [failing, held] {
        assert_eq!(env.broker.cancel(id).await.unwrap(), Cancel::Requested);
    }
    // Both attempts end before their worker saw the request.
    let settled = env
        .broker
        .settle(&[
            failure(&d[0], Some(Duration::ZERO), "max_attempts"),
            failure(&d[1], Some(Duration::ZERO), "postponed"),
        ])
        .await
        .unwrap();
    assert_eq!(settled, [Settled::Cancelled, Settled::Cancelled]);
    for id in [failing, held] {
        let job = env.broker.job(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(job.last_error.as_deref().map(|e| e.contains("boom")), Some(true), "{job:?}");
    }
    assert_eq!(env.broker.job(held).await.unwrap().unwrap().attempt, 0, "a held attempt never ran");
    let scheduled: u64 = env.broker.connection().zcard(env.keys().scheduled(&q())).await.unwrap();
    assert_eq!(scheduled, 0, "nothing waits for a retry");
    tokio::time::sleep(Duration::from_millis(20)).await;
    env.broker.promote(&[q()], 10).await.unwrap();
    assert!(fetch(&env.broker, "w", 10).await.is_empty(), "neither runs again");
    let events = outbox(&env).await;
    let rows: Vec<(String, String)> =
        events.iter().map(|e| (e.get::<String>("id").unwrap(), e.get::<String>("outcome").unwrap())).collect();
    assert_eq!(rows, [(failing.to_string(), "failed".to_string())], "only the attempt that ran has a history row");
    env.cleanup().await;
}

#[tokio::test]
async fn a_dlq_retry_clears_the_deadline_of_the_run_that_died() {
    let env = TestEnv::new().await;
    let deadline = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    let id = env.broker.enqueue(NewJob::new("x", json!({})).expires_at(deadline)).await.unwrap().job.id;
    let d = fetch(&env.broker, "w", 1).await.pop().unwrap();
    assert_eq!(env.broker.settle(&[failure(&d, None, "fatal")]).await.unwrap(), [Settled::Dead]);
    assert_eq!(env.broker.retry_dead(&d.envelope, 1).await.unwrap(), jobq_core::stream::Requeued::Queued { run: 2 });
    tokio::time::sleep(Duration::from_millis(350)).await;
    let p = env.broker.promote(&[q()], 100).await.unwrap();
    assert_eq!(p[0].expired, 0, "run 2 has no deadline");
    let again = fetch(&env.broker, "w", 1).await;
    assert_eq!(again.iter().map(|d| (d.envelope.id, d.run)).collect::<Vec<_>>(), [(id, 2)]);
    let zset: u64 = env.broker.connection().zcard(env.keys().expiring(&q())).await.unwrap();
    assert_eq!(zset, 0, "the sweep dropped the stale member");
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_dead_after_crashes_records_its_last_attempt_apart_from_the_earlier_ones() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("poison", json!({})).max_attempts(10)).await.unwrap().job.id;
    let d = fetch(&env.broker, "w", 1).await.pop().unwrap();
    assert_eq!(
        env.broker.settle(&[failure(&d, Some(Duration::ZERO), "max_attempts")]).await.unwrap(),
        [Settled::Retrying]
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    env.broker.promote(&[q()], 10).await.unwrap();
    for round in 1..=2 {
        let d = fetch(&env.broker, "w", 1).await;
        assert_eq!(d.iter().map(|d| d.attempt).collect::<Vec<_>>(), [2], "round {round}: a crash spends no attempt");
        tokio::time::sleep(Duration::from_millis(60)).await;
        env.broker.reclaim("reaper", &[q()], Duration::from_millis(50), 1, Duration::from_secs(1)).await.unwrap();
    }
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.dead_reason.as_deref(), job.attempt), (JobState::Dead, Some("max_reclaims"), 1));
    let attempts: Vec<(String, String)> = outbox(&env)
        .await
        .iter()
        .map(|e| (e.get::<String>("attempt").unwrap(), e.get::<String>("outcome").unwrap()))
        .collect();
    assert_eq!(attempts, [("1".into(), "failed".into()), ("2".into(), "dead".into())]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_unique_key_held_longer_than_the_retention_keeps_finding_its_job() {
    let env = TestEnv::with(&[("JOBQ_RETENTION_SUCCEEDED", "1s"), ("JOBQ_RETENTION_DEAD", "1s")]).await;
    let ttl = Some(Duration::from_millis(2500));
    let (done, died, d) = two_fetched(
        &env,
        "w",
        NewJob::new("x", json!({})).unique("daily-report", ttl),
        NewJob::new("x", json!({})).unique("nightly-sync", ttl),
    )
    .await;
    let (ok, bad) = by_id(&d, done);
    env.broker
        .settle(&[Outcome { delivery: ok.clone(), result: Ok(None) }, failure(bad, None, "fatal")])
        .await
        .unwrap();
    // Past both retentions, within the lock: the sweep keeps the hashes, and duplicates get
    // their job back.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    env.broker.promote(&[q()], 100).await.unwrap();
    for (key, id) in [("daily-report", done), ("nightly-sync", died)] {
        let dup = env.broker.enqueue(NewJob::new("x", json!({})).unique(key, ttl)).await.unwrap();
        assert!(!dup.created, "{key}: a duplicate within the key's ttl");
        assert_eq!(dup.job.id, id);
    }
    // Once the lock expires, the hashes go and the key is free.
    tokio::time::sleep(Duration::from_millis(1400)).await;
    env.broker.promote(&[q()], 100).await.unwrap();
    for id in [done, died] {
        assert!(env.broker.job(id).await.unwrap().is_none(), "{id} swept with its lock");
    }
    let again = env.broker.enqueue(NewJob::new("x", json!({})).unique("daily-report", ttl)).await.unwrap();
    assert!(again.created);

    // A job dead-lettered because its dependency was cancelled keeps its hash as long, too.
    let dependency = env.broker.enqueue(NewJob::new("x", json!({})).delay(Duration::from_secs(60))).await.unwrap();
    let dependent = NewJob::new("x", json!({})).unique("after-import", ttl).depends_on([dependency.job.id]);
    let dependent = env.broker.enqueue(dependent).await.unwrap().job.id;
    env.broker.cancel(dependency.job.id).await.unwrap();
    assert_eq!(env.broker.job(dependent).await.unwrap().unwrap().state, JobState::Dead);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let dup = env.broker.enqueue(NewJob::new("x", json!({})).unique("after-import", ttl)).await.unwrap();
    assert_eq!((dup.created, dup.job.id), (false, dependent), "past the dead retention, within the key's ttl");
    env.cleanup().await;
}

#[tokio::test]
async fn a_reaper_waits_for_the_longest_lease_a_live_worker_of_the_queue_runs_with() {
    let env = TestEnv::new().await;
    let id = env.broker.enqueue(NewJob::new("a", json!({}))).await.unwrap().job.id;
    // Worker "long" runs with a 5 s lease (heartbeats every 2.5 s); it registers it for 2 s.
    let r = env.broker.reclaim("long", &[q()], Duration::from_secs(5), 3, Duration::from_secs(2)).await.unwrap();
    assert_eq!(r[0].min_idle, Duration::from_secs(5));
    assert_eq!(fetch(&env.broker, "long", 1).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Worker "short" runs with a 100 ms lease: the job, idle 300 ms, is still within the
    // lease of the worker that runs it, and stays where it is.
    let r = env.broker.reclaim("short", &[q()], Duration::from_millis(100), 3, Duration::from_secs(5)).await.unwrap();
    assert_eq!((r[0].requeued, r[0].min_idle), (0, Duration::from_secs(5)));
    assert_eq!(env.broker.job(id).await.unwrap().unwrap().state, JobState::Running);
    // "long" stops renewing its registration (its process is gone): once it lapses, the
    // shorter leases decide again and the job is reclaimed.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let r = env.broker.reclaim("short", &[q()], Duration::from_millis(100), 3, Duration::from_secs(5)).await.unwrap();
    assert_eq!((r[0].requeued, r[0].min_idle), (1, Duration::from_millis(100)));
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.reclaims), (JobState::Queued, 1));
    let leases: Vec<String> = env.broker.connection().hkeys(env.keys().leases(&q())).await.unwrap();
    assert_eq!(leases, ["short"], "the lapsed registration is removed");
    env.cleanup().await;
}

#[tokio::test]
async fn a_heartbeat_registration_counts_for_reapers_and_a_shorter_one_does_not_cut_it() {
    let env = TestEnv::new().await;
    env.broker.register_lease("long", &[q()], Duration::from_secs(7), Duration::from_secs(30)).await.unwrap();
    // The same lease registered again for less time (as a reaper pass does) keeps the longer.
    env.broker.register_lease("long", &[q()], Duration::from_secs(7), Duration::from_millis(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = env.broker.reclaim("short", &[q()], Duration::from_millis(100), 3, Duration::from_secs(5)).await.unwrap();
    assert_eq!(r[0].min_idle, Duration::from_secs(7));
    // The hash lasts as long as its longest registration, plus a second.
    let ttl: i64 =
        redis::cmd("PTTL").arg(env.keys().leases(&q())).query_async(&mut env.broker.connection()).await.unwrap();
    assert!(ttl > 29_000 && ttl <= 31_000, "{ttl}");
    env.cleanup().await;
}

#[tokio::test]
async fn the_jobs_of_a_fetch_whose_reply_was_lost_are_handed_back_uncounted_and_no_others() {
    use jobq_core::job::Priority;
    use jobq_core::stream::Received;
    let env = TestEnv::new().await;
    let enqueue = |p: Priority| {
        let broker = env.broker.clone();
        async move { broker.enqueue(NewJob::new("a", json!({})).priority(p)).await.unwrap().job.id }
    };
    let h1 = enqueue(Priority::High).await;
    let n1 = enqueue(Priority::Normal).await;
    let n2 = enqueue(Priority::Normal).await;
    let n3 = enqueue(Priority::Normal).await;
    let mut received = Received::default();
    let seen = env.broker.fetch_raw(&q(), "w1", 2).await.unwrap().jobs;
    assert_eq!(seen.iter().map(|j| j.id).collect::<Vec<_>>(), [h1, n1]);
    received.note(&seen);
    // Nothing newer than what w1 received is pending to it: nothing to hand back.
    assert_eq!(env.broker.disown(&q(), "w1", &received).await.unwrap(), 0);
    let h2 = enqueue(Priority::High).await;
    // w1's next fetch starts h2 and n2, but its reply never reaches w1.
    let lost = env.broker.fetch_raw(&q(), "w1", 2).await.unwrap().jobs;
    assert_eq!(lost.iter().map(|j| j.id).collect::<Vec<_>>(), [h2, n2]);
    drop(lost);
    // Another worker's job, newer than anything w1 received, is not w1's to hand back.
    assert_eq!(env.broker.fetch_raw(&q(), "w2", 1).await.unwrap().jobs[0].id, n3);

    // Renewing w1's jobs renews all four running under its name, but none given up by w1.
    assert_eq!(env.broker.renew_pending(&[q()], "w1", &[]).await.unwrap(), 4);
    assert_eq!(env.broker.renew_pending(&[q()], "w1", &[h1, n2]).await.unwrap(), 2);
    assert_eq!(env.broker.disown(&q(), "w1", &received).await.unwrap(), 2);
    assert_eq!(env.broker.disown(&q(), "w1", &received).await.unwrap(), 0, "none is handed back twice");
    // The next reaper pass takes them at once, long before the 30 s lease, and counts nothing.
    let r = env.broker.reclaim("reaper", &[q()], Duration::from_secs(30), 3, Duration::from_secs(1)).await.unwrap();
    assert_eq!((r[0].requeued, r[0].dead), (2, 0));
    for id in [h2, n2] {
        let job = env.broker.job(id).await.unwrap().unwrap();
        assert_eq!((job.state, job.attempt, job.reclaims), (JobState::Queued, 0, 0), "{id}: re-queued, uncounted");
    }
    for id in [h1, n1, n3] {
        let job = env.broker.job(id).await.unwrap().unwrap();
        assert_eq!((job.state, job.attempt), (JobState::Running, 1), "{id}: still running where it was received");
    }
    // Strict priority still holds for the re-queued jobs.
    let again = env.broker.fetch_raw(&q(), "w1", 2).await.unwrap().jobs;
    assert_eq!(again.iter().map(|j| j.id).collect::<Vec<_>>(), [h2, n2]);
    assert!(again.into_iter().all(|j| j.decode().unwrap().attempt == 1), "their first counted attempt");
    env.cleanup().await;
}

#[tokio::test]
async fn an_outcome_written_again_after_its_reply_was_lost_is_reported_written_and_changes_nothing() {
    let env = TestEnv::new().await;
    let (a, b, jobs) = two_fetched(&env, "w1", NewJob::new("a", json!({})), NewJob::new("b", json!({}))).await;
    let (da, db) = by_id(&jobs, a);
    let ok = |d: &Delivery| Outcome { delivery: d.clone(), result: Ok(Some(json!("done"))) };
    // The write of `a` lands, but its reply never reaches the worker.
    assert_eq!(env.broker.settle(&[ok(da)]).await.unwrap(), [Settled::Succeeded]);
    let events = outbox(&env).await.len();
    // The worker writes it again, with the outcome that came after it.
    assert_eq!(env.broker.settle(&[ok(da), ok(db)]).await.unwrap(), [Settled::Succeeded, Settled::Succeeded]);
    let after = outbox(&env).await;
    assert_eq!(after.len(), events + 1, "one event more, for b alone");
    assert_eq!(after.last().unwrap().get::<String>("id"), Some(b.to_string()));
    let stats = env.broker.queue_stats(&[q()]).await.unwrap();
    assert_eq!(stats[0].counts.get("succeeded"), Some(&2), "each success counted once");
    assert_eq!(env.broker.job(a).await.unwrap().unwrap().result, Some(json!("done")));
    // A write on any other lease of the same job is still refused.
    let mut zombie = da.clone();
    zombie.lease = "999".into();
    assert_eq!(env.broker.settle(&[ok(&zombie)]).await.unwrap(), [Settled::Stale]);
    env.cleanup().await;
}

#[tokio::test]
async fn a_failure_written_again_after_its_reply_was_lost_is_reported_as_before_and_changes_nothing() {
    let env = TestEnv::new().await;
    let (retried, dies, jobs) = two_fetched(
        &env,
        "w1",
        NewJob::new("r", json!({})).max_attempts(3),
        NewJob::new("d", json!({})).max_attempts(3),
    )
    .await;
    let (dr, dd) = by_id(&jobs, retried);
    let outcomes = [failure(dr, Some(Duration::from_secs(3600)), "handler_error"), failure(dd, None, "fatal")];
    for o in &outcomes {
        let first = env.broker.settle(std::slice::from_ref(o)).await.unwrap();
        let events = outbox(&env).await.len();
        assert_eq!(
            env.broker.settle(std::slice::from_ref(o)).await.unwrap(),
            first,
            "written again: reported as before"
        );
        assert_eq!(outbox(&env).await.len(), events, "no second history event");
    }
    let r = env.broker.job(retried).await.unwrap().unwrap();
    assert_eq!((r.state, r.attempt), (JobState::Retrying, 1));
    assert_eq!(env.broker.job(dies).await.unwrap().unwrap().state, JobState::Dead);
    let stats = env.broker.queue_stats(&[q()]).await.unwrap();
    assert_eq!((stats[0].counts.get("failed"), stats[0].counts.get("dead")), (Some(&1), Some(&1)), "each counted once");
    // Once the retry has moved on, an old write is stale again.
    let mut zombie = dr.clone();
    zombie.lease = "999".into();
    let stale = failure(&zombie, Some(Duration::from_secs(1)), "handler_error");
    assert_eq!(env.broker.settle(&[stale]).await.unwrap(), [Settled::Stale]);
    env.cleanup().await;
}
