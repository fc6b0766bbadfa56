use std::time::Duration;

use jobq_core::job::{JobState, NewJob, QueueName};
use jobq_core::store::DlqFilter;
use jobq_core::stream::{Failure, Outcome};
use jobq_testutil::TestEnv;
use serde_json::json;

/// Enqueues `n` jobs of `kind` with one attempt each, fails them fatally and returns the events.
async fn dead_jobs(env: &TestEnv, kind: &str, n: usize) -> Vec<jobq_core::stream::outbox::Event> {
    let q = QueueName::default_queue();
    for i in 0..n {
        env.broker.enqueue(NewJob::new(kind, json!({"i": i})).max_attempts(1)).await.unwrap();
    }
    let f = env.broker.fetch(&q, "c", n).await.unwrap();
    let outcomes: Vec<Outcome> = f
        .jobs
        .into_iter()
        .map(|d| Outcome {
            delivery: d,
            result: Err(Failure { message: "nope".into(), retry_in: Some(Duration::ZERO), reason: "max_attempts" }),
        })
        .collect();
    env.broker.settle(&outcomes).await.unwrap();
    env.broker.ensure_recorder_groups(std::slice::from_ref(&q)).await.unwrap();
    let mut conn = env.broker.blocking_connection(Duration::from_millis(100)).await.unwrap();
    let batch = env.broker.read_events(&mut conn, "r", &[q], 1000, Duration::from_millis(100)).await.unwrap();
    assert_eq!(batch.events.len(), n);
    batch.events
}

/// `n` jobs of `kind` dead and recorded in the DLQ; their ids.
async fn recorded_dead(env: &TestEnv, kind: &str, n: usize) -> Vec<jobq_core::job::JobId> {
    let events = dead_jobs(env, kind, n).await;
    env.store.record(&events).await.unwrap();
    events.iter().map(|e| e.job_id).collect()
}

/// The Redis half of a DLQ retry of `id` whose Postgres commit then failed: run 2 is queued,
/// the DLQ row is not marked.
async fn requeued_uncommitted(env: &TestEnv, id: jobq_core::job::JobId) {
    let envelope: jobq_core::job::Envelope =
        serde_json::from_value(env.store.dead_envelope(id).await.unwrap().unwrap()).unwrap();
    env.broker.retry_dead(&envelope, 1).await.unwrap();
}

#[tokio::test]
async fn recording_is_idempotent_per_attempt_and_fills_the_dlq() {
    let env = TestEnv::new().await;
    let events = dead_jobs(&env, "mail", 3).await;
    env.store.record(&events).await.unwrap();
    env.store.record(&events).await.unwrap();
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM job_executions").fetch_one(&env.pool).await.unwrap();
    assert_eq!(rows, 3, "one row per attempt even when an event is written twice");
    let page = env.store.dead_jobs(&DlqFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(page.items.len(), 3);
    assert!(page.items.iter().all(|d| d.kind == "mail" && d.reason == "max_attempts" && d.attempts == 1));
    let execs = env.store.executions(events[0].job_id).await.unwrap();
    assert_eq!(execs.len(), 1);
    assert_eq!(execs[0].outcome, "dead");
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_mixing_written_and_new_attempts_writes_each_attempt_once() {
    let env = TestEnv::new().await;
    let first = dead_jobs(&env, "mail", 2).await;
    env.store.record(&first).await.unwrap();
    let fresh = dead_jobs(&env, "sms", 2).await;
    // A written attempt, two new ones, and one of them twice in the same batch.
    let mixed = vec![first[1].clone(), fresh[0].clone(), fresh[1].clone(), fresh[0].clone()];
    env.store.record(&mixed).await.unwrap();
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT job_id, job_type FROM job_executions ORDER BY job_type, job_id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(rows.len(), 4, "{rows:?}");
    for e in first.iter().chain(&fresh) {
        assert_eq!(rows.iter().filter(|(id, _)| *id == e.job_id.0).count(), 1, "{rows:?}");
    }
    let page = env.store.dead_jobs(&DlqFilter { limit: 10, ..Default::default() }).await.unwrap();
    assert_eq!(page.items.len(), 4);
    env.cleanup().await;
}

#[tokio::test]
async fn dlq_pages_newest_first_with_filters_and_a_cursor() {
    let env = TestEnv::new().await;
    let mut events = dead_jobs(&env, "a", 5).await;
    events.extend(dead_jobs(&env, "b", 2).await);
    env.store.record(&events).await.unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = env
            .store
            .dead_jobs(&DlqFilter { kind: Some("a".into()), limit: 2, cursor, ..Default::default() })
            .await
            .unwrap();
        seen.extend(page.items.iter().map(|d| (d.failed_at, d.job_id)));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 5);
    let mut sorted = seen.clone();
    sorted.sort_by(|x, y| y.cmp(x));
    assert_eq!(seen, sorted, "newest first, no duplicates across pages");
    let other =
        env.store.dead_jobs(&DlqFilter { queue: Some("nope".into()), limit: 10, ..Default::default() }).await.unwrap();
    assert!(other.items.is_empty());
    env.cleanup().await;
}

#[tokio::test]
async fn a_dlq_retry_enqueues_once_and_hides_the_row() {
    let env = TestEnv::new().await;
    let id = recorded_dead(&env, "a", 1).await[0];
    let retried = env.store.retry_dead(&env.broker, id, None).await.unwrap();
    assert_eq!(retried.run, 2);
    let second = env.store.retry_dead(&env.broker, id, None).await.unwrap_err();
    assert!(matches!(second, jobq_core::Error::Conflict(_)), "{second}");
    assert_eq!(env.broker.job(id).await.unwrap().unwrap().state, JobState::Queued);
    let f = env.broker.fetch(&QueueName::default_queue(), "c", 10).await.unwrap();
    assert_eq!(f.jobs.len(), 1, "enqueued exactly once");
    assert!(env.store.dead_jobs(&DlqFilter { limit: 10, ..Default::default() }).await.unwrap().items.is_empty());
    assert_eq!(env.store.dead_job(id).await.unwrap().unwrap().retry_count, 1);
    let unknown = env.store.retry_dead(&env.broker, jobq_core::job::JobId::new(), None).await.unwrap_err();
    assert!(matches!(unknown, jobq_core::Error::JobNotFound(_)));
    env.cleanup().await;
}

#[tokio::test]
async fn a_dlq_retry_whose_commit_failed_is_not_run_again_after_its_run_finished() {
    use redis::AsyncCommands;
    let env = TestEnv::new().await;
    let q = QueueName::default_queue();
    let id = recorded_dead(&env, "a", 1).await[0];
    requeued_uncommitted(&env, id).await;
    let d = env.broker.fetch(&q, "c", 1).await.unwrap().jobs.pop().unwrap();
    env.broker.settle(&[Outcome { delivery: d, result: Ok(None) }]).await.unwrap();
    let mut conn = env.broker.blocking_connection(Duration::from_millis(100)).await.unwrap();
    let batch = env.broker.read_events(&mut conn, "r", std::slice::from_ref(&q), 10, Duration::from_millis(100)).await;
    env.store.record(&batch.unwrap().events).await.unwrap();
    // Its hash is swept at the end of the retention.
    let _: () = env.broker.connection().del(env.keys().job(&q, id)).await.unwrap();
    let retried = env.store.retry_dead(&env.broker, id, None).await.unwrap();
    assert_eq!(retried.run, 2, "the run that already happened");
    assert!(env.broker.job(id).await.unwrap().is_none(), "not enqueued again");
    assert!(env.broker.fetch(&q, "c", 10).await.unwrap().jobs.is_empty());
    assert_eq!(env.store.dead_job(id).await.unwrap().unwrap().retry_count, 1, "the row is marked");
    env.cleanup().await;
}

#[tokio::test]
async fn a_failed_enqueue_rolls_the_dlq_retry_back() {
    let env = TestEnv::new().await;
    let id = recorded_dead(&env, "a", 1).await[0];
    // A broker pointed at a Redis that is not there.
    let mut settings = env.settings();
    settings.redis.url = "redis://127.0.0.1:1".into();
    settings.redis.timeout = Duration::from_millis(300);
    let down = jobq_core::stream::Broker::connect(&settings).await.unwrap();
    let err = env.store.retry_dead(&down, id, None).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let row = env.store.dead_job(id).await.unwrap().unwrap();
    assert_eq!(row.retry_count, 0, "the row is not marked");
    assert_eq!(env.store.dead_jobs(&DlqFilter { limit: 10, ..Default::default() }).await.unwrap().items.len(), 1);
    env.cleanup().await;
}

#[tokio::test]
async fn an_error_or_envelope_holding_u0000_is_recorded_and_does_not_stop_the_recorder() {
    use redis::AsyncCommands;
    let env = TestEnv::new().await;
    let q = QueueName::default_queue();
    let id = env.broker.enqueue(NewJob::new("mail", json!({"to": "a"})).max_attempts(1)).await.unwrap().job.id;
    let d = env.broker.fetch(&q, "c", 1).await.unwrap().jobs.pop().unwrap();
    // An envelope Postgres cannot take as jsonb (as an older API could have accepted), and a
    // handler error with a NUL in it.
    let mut envelope = serde_json::to_value(&d.envelope).unwrap();
    envelope["payload"] = json!({"to": "a\u{0}b", "k\u{0}": [1]});
    let _: () = env.broker.connection().hset(env.keys().job(&q, id), "envelope", envelope.to_string()).await.unwrap();
    let failure = Failure { message: "bad\u{0}byte".into(), retry_in: None, reason: "fatal" };
    env.broker.settle(&[Outcome { delivery: d, result: Err(failure) }]).await.unwrap();
    env.broker.ensure_recorder_groups(std::slice::from_ref(&q)).await.unwrap();
    let mut conn = env.broker.blocking_connection(Duration::from_millis(100)).await.unwrap();
    let batch = env.broker.read_events(&mut conn, "r", &[q], 1000, Duration::from_millis(100)).await.unwrap();
    env.store.record(&batch.events).await.unwrap();
    let execs = env.store.executions(id).await.unwrap();
    assert_eq!(execs.len(), 1);
    assert_eq!(execs[0].error.as_deref(), Some("bad\u{FFFD}byte"));
    let dead = env.store.dead_job(id).await.unwrap().expect("in the DLQ");
    assert_eq!(dead.payload, json!({"to": "a\u{FFFD}b", "k\u{FFFD}": [1]}));
    env.cleanup().await;
}

#[tokio::test]
async fn a_batch_of_successes_with_u0000_in_its_worker_name_is_recorded() {
    let env = TestEnv::new().await;
    let q = QueueName::default_queue();
    let mut ids = Vec::new();
    for _ in 0..2 {
        ids.push(env.broker.enqueue(NewJob::new("mail", json!({}))).await.unwrap().job.id);
    }
    // Two attempts completed in one call: one outbox event carrying both (its `batch` field).
    let jobs = env.broker.fetch(&q, "w\u{0}1", 2).await.unwrap().jobs;
    let outcomes: Vec<Outcome> = jobs.into_iter().map(|d| Outcome { delivery: d, result: Ok(None) }).collect();
    env.broker.settle(&outcomes).await.unwrap();
    env.broker.ensure_recorder_groups(std::slice::from_ref(&q)).await.unwrap();
    let mut conn = env.broker.blocking_connection(Duration::from_millis(100)).await.unwrap();
    let batch = env.broker.read_events(&mut conn, "r", &[q], 1000, Duration::from_millis(100)).await.unwrap();
    assert_eq!(batch.events.len(), 2);
    env.store.record(&batch.events).await.unwrap();
    for id in ids {
        let execs = env.store.executions(id).await.unwrap();
        assert_eq!(execs.len(), 1);
        assert_eq!(execs[0].worker.as_deref(), Some("w\u{FFFD}1"));
    }
    env.cleanup().await;
}

/// A job whose attempt 1 failed and which then expired while waiting to retry: its events.
async fn failed_then_expired(env: &TestEnv) -> (jobq_core::job::JobId, Vec<jobq_core::stream::outbox::Event>) {
    let q = QueueName::default_queue();
    let deadline = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    let id =
        env.broker.enqueue(NewJob::new("mail", json!({})).max_attempts(5).expires_at(deadline)).await.unwrap().job.id;
    let d = env.broker.fetch(&q, "c", 1).await.unwrap().jobs.pop().unwrap();
    let failure =
        Failure { message: "SMTP 451".into(), retry_in: Some(Duration::from_secs(60)), reason: "max_attempts" };
    env.broker.settle(&[Outcome { delivery: d, result: Err(failure) }]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(env.broker.promote(std::slice::from_ref(&q), 10).await.unwrap()[0].expired, 1);
    env.broker.ensure_recorder_groups(std::slice::from_ref(&q)).await.unwrap();
    let mut conn = env.broker.blocking_connection(Duration::from_millis(100)).await.unwrap();
    let batch = env.broker.read_events(&mut conn, "r", &[q], 100, Duration::from_millis(100)).await.unwrap();
    let outcomes: Vec<&str> = batch.events.iter().map(|e| e.outcome.as_str()).collect();
    assert_eq!(outcomes, ["failed", "dead"], "both name attempt 1");
    (id, batch.events)
}

async fn assert_died_after_its_failed_attempt(env: &TestEnv, id: jobq_core::job::JobId) {
    let execs = env.store.executions(id).await.unwrap();
    assert_eq!(execs.len(), 1, "{execs:?}");
    assert_eq!((execs[0].attempt, execs[0].outcome.as_str()), (1, "dead"));
    assert_eq!(execs[0].error.as_deref(), Some("SMTP 451; expired before it started"));
    let dead = env.store.dead_job(id).await.unwrap().expect("in the DLQ");
    assert_eq!((dead.reason.as_str(), dead.last_error.as_deref()), ("expired", Some("expired before it started")));
}

#[tokio::test]
async fn a_job_that_expires_waiting_to_retry_ends_its_history_dead_in_one_batch_or_two() {
    let env = TestEnv::new().await;
    // Both events in one batch.
    let (id, events) = failed_then_expired(&env).await;
    env.store.record(&events).await.unwrap();
    assert_died_after_its_failed_attempt(&env, id).await;
    // Read again (a recorder stopped before its ack): nothing changes.
    env.store.record(&events).await.unwrap();
    assert_died_after_its_failed_attempt(&env, id).await;
    // The failed attempt recorded first, the death in a later batch.
    let (id, events) = failed_then_expired(&env).await;
    env.store.record(&events[..1]).await.unwrap();
    assert_eq!(env.store.executions(id).await.unwrap()[0].outcome, "failed");
    env.store.record(&events[1..]).await.unwrap();
    assert_died_after_its_failed_attempt(&env, id).await;
    env.store.record(&events).await.unwrap();
    assert_died_after_its_failed_attempt(&env, id).await;
    env.cleanup().await;
}

#[tokio::test]
async fn an_audit_entry_naming_a_nul_character_is_written() {
    let env = TestEnv::new().await;
    let filter = json!({"type": "a\u{0}b", "k\u{0}": ["\u{0}"]});
    env.store
        .audit("ops\u{0}", "dlq.purge", Some("t\u{0}".into()), Some(filter), 3, Some(json!({"error": "\u{0}"})))
        .await
        .unwrap();
    let entry = env.store.audit_log(1).await.unwrap().remove(0);
    assert_eq!(entry.filter, Some(json!({"type": "a\u{FFFD}b", "k\u{FFFD}": ["\u{FFFD}"]})));
    assert_eq!((entry.actor.as_str(), entry.target.as_deref()), ("ops\u{FFFD}", Some("t\u{FFFD}")));
    env.cleanup().await;
}

#[tokio::test]
async fn a_purge_leaves_a_row_a_retry_marks_while_it_waits_for_its_lock() {
    let env = TestEnv::new().await;
    let marked = recorded_dead(&env, "a", 2).await[0];
    // A retry holds the row's lock (its Redis half under way), then marks the row and commits.
    let mut retry = env.pool.begin().await.unwrap();
    sqlx::query("UPDATE dead_jobs SET retried_at = now(), retry_count = retry_count + 1 WHERE job_id = $1")
        .bind(marked.0)
        .execute(&mut *retry)
        .await
        .unwrap();
    let store = env.store.clone();
    let purge = tokio::spawn(async move { store.purge_dead(&DlqFilter::default()).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    retry.commit().await.unwrap();
    let deleted = purge.await.unwrap().unwrap();
    assert_eq!(deleted, 1, "only the row still dead");
    assert_eq!(env.store.dead_job(marked).await.unwrap().unwrap().retry_count, 1, "the retried row stays");
    env.cleanup().await;
}

#[tokio::test]
async fn an_edited_retry_after_a_retry_whose_commit_failed_says_its_payload_was_not_applied() {
    let env = TestEnv::new().await;
    let id = recorded_dead(&env, "a", 1).await[0];
    requeued_uncommitted(&env, id).await;
    let done = env.store.retry_dead(&env.broker, id, Some(json!({"fixed": true}))).await.unwrap();
    assert!(done.payload_not_applied, "{done:?}");
    assert_eq!(env.store.dead_job(id).await.unwrap().unwrap().retry_count, 1, "the row is marked all the same");
    let job = env.broker.job(id).await.unwrap().unwrap();
    assert_eq!((job.state, job.run, job.payload), (JobState::Queued, 2, json!({"i": 0})), "run 2, its old payload");
    env.cleanup().await;
}

#[tokio::test]
async fn a_retry_by_filter_passes_over_a_job_that_died_again_since_it_began() {
    let env = TestEnv::new().await;
    let ids = recorded_dead(&env, "a", 2).await;
    let (again, kept) = (ids[0], ids[1]);
    let filter = DlqFilter { kind: Some("a".into()), ..Default::default() };
    let selection = env.store.dead_selection(&filter, None, None, 2).await.unwrap();
    let replay = env.store.start_replay("test", &filter, &selection).await.unwrap();
    // Meanwhile one is retried by hand and dies again.
    sqlx::query("UPDATE dead_jobs SET failed_at = now() + interval '1 second', run = run + 1 WHERE job_id = $1")
        .bind(again.0)
        .execute(&env.pool)
        .await
        .unwrap();
    let err = env.store.retry_dead_matching(&env.broker, again, &replay.filter, replay.upto).await.unwrap_err();
    assert!(matches!(err, jobq_core::Error::JobNotFound(_)), "{err}");
    assert_eq!(env.store.dead_job(again).await.unwrap().unwrap().retry_count, 0, "left dead");
    let done = env.store.retry_dead_matching(&env.broker, kept, &replay.filter, replay.upto).await.unwrap();
    assert_eq!((done.run, done.state.as_str()), (2, "queued"));
    env.cleanup().await;
}

#[tokio::test]
async fn a_replay_taken_over_retries_no_job_outside_the_selection_it_began_with() {
    let env = TestEnv::new().await;
    recorded_dead(&env, "a", 6).await;
    let filter = DlqFilter { kind: Some("a".into()), ..Default::default() };
    // Three of the six, oldest first (their deaths may share a millisecond: job ids break ties).
    let selection = env.store.dead_selection(&filter, None, None, 3).await.unwrap();
    let replay = env.store.start_replay("test", &filter, &selection).await.unwrap();
    // It retried two and stopped before it reported them.
    for (_, id) in &selection[..2] {
        env.store.retry_dead_matching(&env.broker, *id, &replay.filter, replay.upto).await.unwrap();
    }
    // A death the recorder writes only now (catching up), though older than the selection's last.
    let late = recorded_dead(&env, "a", 1).await[0];
    sqlx::query("UPDATE dead_jobs SET failed_at = $2 WHERE job_id = $1")
        .bind(late.0)
        .bind(selection[0].0)
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE audit_log SET replay_alive_at = now() - interval '1 hour' WHERE id = $1")
        .bind(replay.audit_id)
        .execute(&env.pool)
        .await
        .unwrap();
    let taken = env.store.claim_stale_replay(Duration::from_secs(30)).await.unwrap().unwrap();
    assert_eq!(taken.left(), 3, "its counts never said it retried two");
    let rest = env.store.dead_selection(&taken.filter, taken.upto, taken.began, taken.of).await.unwrap();
    assert_eq!(rest, selection[2..], "only the one of its selection left, not newer deaths nor late ones");
    env.cleanup().await;
}
