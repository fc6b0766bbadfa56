//! The scheduler in-process against real Redis and PostgreSQL.

use std::time::Duration;

use jobq_core::job::{JobState, NewJob, QueueName};
use jobq_core::store::{DlqFilter, Store};
use jobq_core::stream::{Failure, Outcome};
use jobq_testutil::{wait_until, TestEnv};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn the_scheduler_promotes_due_jobs_and_records_attempts() {
    let env = TestEnv::new().await;
    let token = CancellationToken::new();
    let handle = tokio::spawn(jobq_scheduler::run(env.settings(), token.clone()));
    let q = QueueName::default_queue();
    let id = env.broker.enqueue(NewJob::new("x", json!({})).delay(Duration::from_millis(200))).await.unwrap().job.id;
    wait_until(WAIT, "promotion", || async {
        (env.broker.job(id).await.unwrap()?.state == JobState::Queued).then_some(())
    })
    .await;
    let f = env.broker.fetch(&q, "w", 1).await.unwrap();
    let fail = Failure { message: "bad".into(), retry_in: None, reason: "fatal" };
    env.broker.settle(&[Outcome { delivery: f.jobs[0].clone(), result: Err(fail) }]).await.unwrap();
    wait_until(WAIT, "the dead job in the DLQ", || async {
        let page = env.store.dead_jobs(&DlqFilter { limit: 10, ..Default::default() }).await.ok()?;
        (page.items.len() == 1).then_some(())
    })
    .await;
    // The recorder deletes the events once their rows are committed: just after the row shows.
    wait_until(WAIT, "recorded events deleted from the outbox", || async {
        let outbox: u64 =
            redis::AsyncCommands::xlen(&mut env.broker.connection(), env.keys().events(&q)).await.unwrap();
        (outbox == 0).then_some(())
    })
    .await;
    token.cancel();
    handle.await.unwrap().unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_scheduler_started_while_postgres_is_down_promotes_jobs_and_stops_cleanly() {
    let env = TestEnv::new().await;
    let mut settings = env.settings();
    settings.database.url = "postgres://postgres@127.0.0.1:1/nowhere".into();
    settings.database.create = false;
    settings.database.migrate = true;
    let token = CancellationToken::new();
    let handle = tokio::spawn(jobq_scheduler::run(settings, token.clone()));
    let id = env.broker.enqueue(NewJob::new("x", json!({})).delay(Duration::from_millis(200))).await.unwrap().job.id;
    wait_until(WAIT, "promotion while the migrations wait for Postgres", || async {
        (env.broker.job(id).await.unwrap()?.state == JobState::Queued).then_some(())
    })
    .await;
    assert!(!handle.is_finished(), "still waiting for Postgres, not failed");
    token.cancel();
    tokio::time::timeout(WAIT, handle).await.expect("stops while Postgres is still down").unwrap().unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn events_wait_in_the_outbox_while_postgres_is_down_and_are_written_once_after() {
    let env = TestEnv::new().await;
    let q = QueueName::default_queue();
    for _ in 0..20 {
        env.broker.enqueue(NewJob::new("x", json!({})).max_attempts(1)).await.unwrap();
    }
    let f = env.broker.fetch(&q, "w", 20).await.unwrap();
    let outcomes: Vec<Outcome> = f
        .jobs
        .into_iter()
        .map(|d| Outcome {
            delivery: d,
            result: Err(Failure { message: "x".into(), retry_in: Some(Duration::ZERO), reason: "max_attempts" }),
        })
        .collect();
    env.broker.settle(&outcomes).await.unwrap();
    env.broker.ensure_recorder_groups(std::slice::from_ref(&q)).await.unwrap();
    let mut conn = env.broker.blocking_connection(Duration::from_millis(100)).await.unwrap();
    let batch = env
        .broker
        .read_events(&mut conn, "r", std::slice::from_ref(&q), 100, Duration::from_millis(100))
        .await
        .unwrap();
    assert_eq!(batch.events.len(), 20);

    let mut down = env.settings().database;
    down.url = "postgres://postgres@127.0.0.1:1/nowhere".into();
    down.create = false;
    let unreachable = Store::connect(&down).await.unwrap();
    assert!(jobq_scheduler::record_once(&env.broker, &unreachable, &batch).await.is_err());
    let outbox: u64 = redis::AsyncCommands::xlen(&mut env.broker.connection(), env.keys().events(&q)).await.unwrap();
    assert_eq!(outbox, 20, "nothing acked while Postgres is down");

    // Postgres is back; a redelivery after a partial success is harmless too.
    assert_eq!(jobq_scheduler::record_once(&env.broker, &env.store, &batch).await.unwrap(), 20);
    assert_eq!(jobq_scheduler::record_once(&env.broker, &env.store, &batch).await.unwrap(), 20);
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead_jobs").fetch_one(&env.pool).await.unwrap();
    let execs: i64 = sqlx::query_scalar("SELECT count(*) FROM job_executions").fetch_one(&env.pool).await.unwrap();
    assert_eq!((dead, execs), (20, 20));
    env.cleanup().await;
}

#[tokio::test]
async fn a_burst_of_due_schedules_fires_without_waiting_for_the_next_poll() {
    let env = TestEnv::new().await;
    for i in 0..150 {
        let spec = serde_json::from_value(json!({"name": format!("s{i}"), "cron": "@hourly", "job": {"type": "x"}}));
        env.store.create_schedule(&spec.unwrap()).await.unwrap();
    }
    // Every one due at this hour's tick, more than one pass fires (100).
    sqlx::query("UPDATE schedules SET next_fire_at = date_trunc('hour', now()) WHERE next_fire_at > now()")
        .execute(&env.pool)
        .await
        .unwrap();
    let mut settings = env.settings();
    settings.scheduler.cron_poll = Duration::from_secs(30);
    settings.scheduler.misfire_grace = Duration::from_secs(3 * 3600);
    let token = CancellationToken::new();
    let handle = tokio::spawn(jobq_scheduler::run(settings, token.clone()));
    let stream = env.keys().stream(&QueueName::default_queue(), jobq_core::job::Priority::Normal);
    wait_until(Duration::from_secs(10), "every schedule fired, well before the next poll", || async {
        let n: u64 = redis::AsyncCommands::xlen(&mut env.broker.connection(), &stream).await.unwrap();
        (n == 150).then_some(())
    })
    .await;
    token.cancel();
    handle.await.unwrap().unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_whose_keys_redis_refuses_does_not_slow_the_promotion_of_the_others() {
    let env = TestEnv::new().await;
    let (fine, broken): (QueueName, QueueName) = ("fine".parse().unwrap(), "broken".parse().unwrap());
    env.broker.enqueue(NewJob::new("x", json!({})).queue(broken.clone()).delay(Duration::from_secs(1))).await.unwrap();
    let _: () = redis::AsyncCommands::set(&mut env.broker.connection(), env.keys().scheduled(&broken), "not a zset")
        .await
        .unwrap();
    let jobs = (0..1000).map(|_| NewJob::new("x", json!({})).queue(fine.clone()).delay(Duration::from_millis(1)));
    env.broker.enqueue_many(jobs.collect(), true).await.unwrap();
    let mut settings = env.settings();
    // Ten passes of 100 move them: only at once, one after the other, within the wait.
    settings.scheduler.promote_batch = 100;
    settings.scheduler.promote_interval = Duration::from_secs(30);
    let token = CancellationToken::new();
    let handle = tokio::spawn(jobq_scheduler::run(settings, token.clone()));
    let stream = env.keys().stream(&fine, jobq_core::job::Priority::Normal);
    wait_until(Duration::from_secs(10), "every due job of the fine queue promoted", || async {
        let n: u64 = redis::AsyncCommands::xlen(&mut env.broker.connection(), &stream).await.unwrap();
        (n == 1000).then_some(())
    })
    .await;
    token.cancel();
    handle.await.unwrap().unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_queue_whose_outbox_redis_refuses_does_not_stop_the_history_of_the_others() {
    let env = TestEnv::new().await;
    let (fine, broken, later): (QueueName, QueueName, QueueName) =
        ("fine".parse().unwrap(), "broken".parse().unwrap(), "later".parse().unwrap());
    // One queue's outbox is a key of another type from the start.
    env.broker.enqueue(NewJob::new("x", json!({})).queue(broken.clone())).await.unwrap();
    let mut conn = env.broker.connection();
    let _: () = redis::AsyncCommands::set(&mut conn, env.keys().events(&broken), "not a stream").await.unwrap();
    let token = CancellationToken::new();
    let handle = tokio::spawn(jobq_scheduler::run(env.settings(), token.clone()));
    let fatal = || Failure { message: "bad".into(), retry_in: None, reason: "fatal" };
    let kill = |q: QueueName| {
        let env = &env;
        async move {
            env.broker.enqueue(NewJob::new("x", json!({})).queue(q.clone())).await.unwrap();
            let f = env.broker.fetch(&q, "w", 1).await.unwrap();
            let outcome = Outcome { delivery: f.jobs[0].clone(), result: Err(fatal()) };
            env.broker.settle(&[outcome]).await.unwrap();
        }
    };
    let dead_in = |q: &'static str| {
        let store = &env.store;
        async move {
            let filter = DlqFilter { queue: Some(q.into()), limit: 10, ..Default::default() };
            let page = store.dead_jobs(&filter).await.ok()?;
            (page.items.len() == 1).then_some(())
        }
    };
    kill(fine.clone()).await;
    wait_until(WAIT, "the fine queue's dead job in the DLQ", || dead_in("fine")).await;
    // A queue whose outbox breaks while the recorder runs (its group destroyed) does not stop
    // the others either: the group is created again and its events are recorded.
    let _: () = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(env.keys().events(&fine))
        .arg(jobq_core::stream::Keys::RECORDER_GROUP)
        .query_async(&mut conn)
        .await
        .unwrap();
    kill(later).await;
    wait_until(WAIT, "a later queue's dead job in the DLQ", || dead_in("later")).await;
    kill(fine).await;
    wait_until(WAIT, "the fine queue's second dead job in the DLQ", || async {
        let filter = DlqFilter { queue: Some("fine".into()), limit: 10, ..Default::default() };
        (env.store.dead_jobs(&filter).await.ok()?.items.len() == 2).then_some(())
    })
    .await;
    token.cancel();
    handle.await.unwrap().unwrap();
    env.cleanup().await;
}
