//! Cron schedules in Postgres: exactly-once tick claiming, crash windows, misfires, pause.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use jobq_core::job::{Priority, QueueName};
use jobq_core::schedule::{CronSchedule, JobTemplate, Misfire, ScheduleSpec};
use jobq_core::store::Store;
use jobq_testutil::TestEnv;
use redis::AsyncCommands;

fn spec(name: &str, cron: &str) -> ScheduleSpec {
    serde_json::from_value(
        serde_json::json!({"name": name, "cron": cron, "job": {"type": "echo", "payload": {"s": name}}}),
    )
    .unwrap()
}

fn grace() -> chrono::Duration {
    chrono::Duration::seconds(30)
}

/// A grace so long that a rewound hourly tick is on time, whenever the test runs.
fn long_grace() -> chrono::Duration {
    chrono::Duration::hours(3)
}

async fn backlog(env: &TestEnv) -> u64 {
    env.broker.connection().xlen(env.keys().stream(&QueueName::default_queue(), Priority::Normal)).await.unwrap()
}

/// Moves a schedule's pending tick into the past, as if no scheduler had run since. Within 5 s
/// of the tick after it (an hourly schedule about the hour), it waits for that one to pass, so
/// that no other tick falls due while the test runs.
async fn rewind(env: &TestEnv, name: &str, by: chrono::Duration) -> chrono::DateTime<Utc> {
    let s = env.store.schedule(name).await.unwrap().unwrap();
    let cron = s.spec.validate().unwrap();
    let target = loop {
        let limit = Utc::now() - by;
        let target = cron.upcoming(limit - chrono::Duration::hours(2)).take_while(|t| *t <= limit).last().unwrap();
        let next = cron.upcoming(limit).next().unwrap();
        if (next - Utc::now()).num_seconds().abs() >= 5 {
            break target;
        }
        tokio::time::sleep(Duration::from_secs(6)).await;
    };
    sqlx::query("UPDATE schedules SET next_fire_at = $2 WHERE name = $1")
        .bind(name)
        .bind(target)
        .execute(&env.pool)
        .await
        .unwrap();
    target
}

#[tokio::test]
async fn a_due_tick_fires_once_and_the_next_one_is_scheduled() {
    let env = TestEnv::new().await;
    let s = env.store.create_schedule(&spec("every-minute", "@hourly")).await.unwrap();
    let first = s.next_fire_at.unwrap();
    assert!(first > Utc::now() && first <= Utc::now() + chrono::Duration::seconds(3601));
    assert!(env.store.fire_due(&env.broker, long_grace(), 10).await.unwrap().fired.is_empty(), "nothing due yet");
    let tick = rewind(&env, "every-minute", chrono::Duration::seconds(1)).await;
    let pass = env.store.fire_due(&env.broker, long_grace(), 10).await.unwrap();
    assert_eq!(pass.fired.len(), 1);
    assert_eq!(pass.fired[0].tick, tick);
    assert!(env.store.fire_due(&env.broker, long_grace(), 10).await.unwrap().fired.is_empty(), "a tick fires once");
    let after = env.store.schedule("every-minute").await.unwrap().unwrap();
    assert!(after.next_fire_at.unwrap() > Utc::now());
    assert_eq!(after.last_fired_at, Some(tick));
    let runs = env.store.schedule_runs("every-minute", 10).await.unwrap();
    assert_eq!((runs.len(), runs[0].job_id), (1, pass.fired[0].job_id));
    let job = env.broker.job(runs[0].job_id).await.unwrap().unwrap();
    assert_eq!(job.metadata.get("schedule").map(String::as_str), Some("every-minute"));
    assert_eq!(backlog(&env).await, 1);
    // The tick's idempotency key is held as long as a plan could fire the tick again: the
    // 3 h grace plus two periods (fire_once).
    let key = env.keys().unique(&QueueName::default_queue(), &format!("cron:every-minute:{}", tick.timestamp_millis()));
    let ttl: i64 = env.broker.connection().pttl(&key).await.unwrap();
    assert!((17_990_000..=18_000_000).contains(&ttl), "{ttl} ms");
    env.cleanup().await;
}

#[tokio::test]
async fn a_failed_enqueue_rolls_the_claim_back_and_the_tick_fires_later_once() {
    let env = TestEnv::new().await;
    env.store.create_schedule(&spec("s", "@hourly")).await.unwrap();
    let tick = rewind(&env, "s", chrono::Duration::seconds(1)).await;
    let mut settings = env.settings();
    settings.redis.url = "redis://127.0.0.1:1".into();
    settings.redis.timeout = Duration::from_millis(200);
    let down = jobq_core::stream::Broker::connect(&settings).await.unwrap();
    assert!(env.store.fire_due(&down, long_grace(), 10).await.is_err());
    assert_eq!(env.store.schedule("s").await.unwrap().unwrap().next_fire_at, Some(tick), "claim rolled back");
    // The row lock went with the rollback: another replica can claim the tick at once.
    let mut other = env.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM schedules WHERE name = 's' FOR UPDATE NOWAIT")
        .execute(&mut *other)
        .await
        .expect("the failed pass still holds the schedule's row");
    other.rollback().await.unwrap();
    let pass = env.store.fire_due(&env.broker, long_grace(), 10).await.unwrap();
    assert_eq!(pass.fired.len(), 1);
    assert_eq!(backlog(&env).await, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn a_tick_enqueued_before_a_crash_is_not_enqueued_again() {
    let env = TestEnv::new().await;
    env.store.create_schedule(&spec("s", "@hourly")).await.unwrap();
    let tick = rewind(&env, "s", chrono::Duration::seconds(1)).await;
    // A replica enqueued the tick, then died before its commit.
    let template: JobTemplate = env.store.schedule("s").await.unwrap().unwrap().spec.job;
    let earlier = env
        .broker
        .enqueue(
            template.new_job().unique(format!("cron:s:{}", tick.timestamp_millis()), Some(Duration::from_secs(3600))),
        )
        .await
        .unwrap();
    let pass = env.store.fire_due(&env.broker, long_grace(), 10).await.unwrap();
    assert_eq!(pass.fired[0].job_id, earlier.job.id, "the idempotency key returns the existing job");
    assert_eq!(backlog(&env).await, 1, "fired once");
    env.cleanup().await;
}

#[tokio::test]
async fn replicas_racing_for_the_same_ticks_fire_each_once() {
    let env = TestEnv::new().await;
    for i in 0..20 {
        env.store.create_schedule(&spec(&format!("s{i}"), "@hourly")).await.unwrap();
        rewind(&env, &format!("s{i}"), chrono::Duration::seconds(1)).await;
    }
    let replicas: Vec<Store> = futures_util::future::join_all((0..4).map(|_| async {
        Store::from_pool(
            sqlx::postgres::PgPoolOptions::new().max_connections(3).connect(&env.database_url).await.unwrap(),
        )
    }))
    .await;
    let passes =
        futures_util::future::join_all(replicas.iter().map(|r| r.fire_due(&env.broker, long_grace(), 100))).await;
    let fired: usize = passes.into_iter().map(|p| p.unwrap().fired.len()).sum();
    assert_eq!(fired, 20);
    assert_eq!(backlog(&env).await, 20);
    env.cleanup().await;
}

#[tokio::test]
async fn misfire_policies_decide_what_ticks_missed_while_down_do() {
    let env = TestEnv::new().await;
    for (name, misfire) in [("skip", Misfire::Skip), ("once", Misfire::FireOnce), ("catch", Misfire::CatchUp)] {
        let mut s = spec(name, "* * * * *");
        s.misfire = misfire;
        s.catch_up_limit = 3;
        env.store.create_schedule(&s).await.unwrap();
        rewind(&env, name, chrono::Duration::minutes(10)).await;
    }
    let before = Utc::now();
    let pass = env.store.fire_due(&env.broker, grace(), 10).await.unwrap();
    let count = |n: &str| pass.fired.iter().filter(|f| f.schedule == n).count();
    // A tick within the last 30 s (there is one in half of each minute) fires whatever the
    // policy; the older ones follow it. Each schedule is claimed at its own moment of the pass,
    // so each has its own count of recent ticks.
    let recent =
        |n: &str| pass.fired.iter().filter(|f| f.schedule == n && f.late_ms <= grace().num_milliseconds()).count();
    assert!(recent("skip") <= 1 && count("skip") == recent("skip"), "skip drops missed ticks");
    assert_eq!(count("once"), 1 + recent("once"), "fire_once fires the latest missed tick once");
    assert_eq!(count("catch"), 3 + recent("catch"), "catch_up fires at most catch_up_limit missed ticks");
    for name in ["skip", "once", "catch"] {
        assert!(env.store.schedule(name).await.unwrap().unwrap().next_fire_at.unwrap() > before);
    }
    env.cleanup().await;
}

#[tokio::test]
async fn pausing_and_resuming_does_not_fire_the_skipped_ticks() {
    let env = TestEnv::new().await;
    env.store.create_schedule(&spec("p", "* * * * * *")).await.unwrap();
    let paused = env.store.patch_schedule("p", |s| s.enabled = false).await.unwrap();
    assert_eq!(paused.next_fire_at, None);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(env.store.fire_due(&env.broker, grace(), 10).await.unwrap().fired.is_empty());
    let before = Utc::now();
    let resumed = env.store.patch_schedule("p", |s| s.enabled = true).await.unwrap();
    assert!(resumed.next_fire_at.unwrap() > before - chrono::Duration::milliseconds(10));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let pass = env.store.fire_due(&env.broker, grace(), 10).await.unwrap();
    assert!(pass.fired.len() <= 2, "only ticks after the resume fire: {:?}", pass.fired);
    assert!(pass.fired.iter().all(|f| f.tick >= resumed.next_fire_at.unwrap()));
    env.cleanup().await;
}

#[tokio::test]
async fn declared_schedules_upsert_by_name_and_keep_their_pending_tick() {
    let env = TestEnv::new().await;
    env.store.create_schedule(&spec("from-api", "@hourly")).await.unwrap();
    let (a, created) = env.store.put_schedule(&spec("from-config", "@daily"), "config").await.unwrap();
    assert!(created);
    let (b, created) = env.store.put_schedule(&spec("from-config", "@daily"), "config").await.unwrap();
    assert!(!created);
    assert_eq!(a.next_fire_at, b.next_fire_at, "an unchanged definition keeps its tick");
    // Half past the hour never coincides with @daily's midnight, whatever the time of day.
    let (c, _) = env.store.put_schedule(&spec("from-config", "0 30 * * * *"), "config").await.unwrap();
    assert_ne!(c.next_fire_at, a.next_fire_at, "a new expression restarts from now");
    let all: Vec<String> =
        env.store.schedules().await.unwrap().into_iter().map(|s| format!("{}:{}", s.spec.name, s.source)).collect();
    assert_eq!(all, ["from-api:api", "from-config:config"]);
    assert!(env.store.create_schedule(&spec("from-api", "@daily")).await.is_err(), "names are unique");
    env.cleanup().await;
}

#[tokio::test]
async fn a_schedule_that_cannot_be_fired_does_not_hold_back_the_others() {
    let env = TestEnv::new().await;
    for name in ["broken", "fine"] {
        env.store.create_schedule(&spec(name, "@hourly")).await.unwrap();
    }
    let broken_tick = rewind(&env, "broken", chrono::Duration::minutes(90)).await;
    rewind(&env, "fine", chrono::Duration::minutes(30)).await;
    // A row this version cannot read (as one written by a newer one could be): it is the
    // earliest due, so every pass meets it first.
    sqlx::query("UPDATE schedules SET job = '{\"type\": \"echo\", \"colour\": 1}' WHERE name = 'broken'")
        .execute(&env.pool)
        .await
        .unwrap();
    // And one whose queue's stream Redis refuses to append to (a key of another type there):
    // a script error on that queue's keys, not an outage.
    let mut jammed = spec("jammed", "@hourly");
    jammed.job.queue = Some("jammed".parse().unwrap());
    env.store.create_schedule(&jammed).await.unwrap();
    rewind(&env, "jammed", chrono::Duration::minutes(60)).await;
    let stream = env.keys().stream(&"jammed".parse().unwrap(), Priority::Normal);
    let _: () = env.broker.connection().set(&stream, "not a stream").await.unwrap();
    let pass = env.store.fire_due(&env.broker, long_grace(), 100).await.unwrap();
    assert!(!pass.fired.is_empty() && pass.fired.iter().all(|f| f.schedule == "fine"), "{:?}", pass.fired);
    assert_eq!(pass.failed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["broken", "jammed"]);
    assert!(pass.failed[0].1.contains("colour"), "{:?}", pass.failed);
    let _: () = env.broker.connection().del(&stream).await.unwrap();
    let broken =
        sqlx::query_scalar::<_, chrono::DateTime<Utc>>("SELECT next_fire_at FROM schedules WHERE name = 'broken'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(broken, broken_tick, "its claim was rolled back: it is tried again next pass");
    assert_eq!(backlog(&env).await, pass.fired.len() as u64, "only the fine schedule's ticks were enqueued");
    env.cleanup().await;
}

#[tokio::test]
async fn a_manual_trigger_that_enqueued_answers_with_its_job_even_if_the_run_cannot_be_listed() {
    let env = TestEnv::new().await;
    env.store.create_schedule(&spec("report", "@daily")).await.unwrap();
    // Postgres refuses the run's row (the table is gone) after Redis took the job.
    sqlx::query("ALTER TABLE schedule_runs RENAME TO schedule_runs_away").execute(&env.pool).await.unwrap();
    let job = env.store.trigger_schedule(&env.broker, "report").await.unwrap();
    assert_eq!(env.broker.job(job.id).await.unwrap().unwrap().state, jobq_core::job::JobState::Queued);
    assert_eq!(backlog(&env).await, 1, "enqueued once; a caller has no reason to trigger again");
    sqlx::query("ALTER TABLE schedule_runs_away RENAME TO schedule_runs").execute(&env.pool).await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_yearly_schedule_catching_up_fires_its_late_tick() {
    let env = TestEnv::new().await;
    let mut yearly = spec("yearly", "@yearly");
    yearly.misfire = Misfire::CatchUp;
    env.store.create_schedule(&yearly).await.unwrap();
    // The latest yearly tick, missed: its key's ttl spans the catch-up plan's ten years and
    // more, and is held to the longest an enqueue takes.
    let tick = CronSchedule::parse("@yearly", "UTC")
        .unwrap()
        .upcoming(Utc::now() - chrono::Duration::days(366))
        .next()
        .unwrap();
    sqlx::query("UPDATE schedules SET next_fire_at = $1 WHERE name = 'yearly'")
        .bind(tick)
        .execute(&env.pool)
        .await
        .unwrap();
    let pass = env.store.fire_due(&env.broker, grace(), 100).await.unwrap();
    assert!(pass.failed.is_empty(), "{:?}", pass.failed);
    assert_eq!(pass.fired.iter().map(|f| f.tick).collect::<Vec<_>>(), [tick]);
    assert_eq!(backlog(&env).await, 1);
    env.cleanup().await;
}

#[tokio::test]
async fn a_pass_stopped_at_its_batch_says_more_may_be_due() {
    let env = TestEnv::new().await;
    for i in 0..5 {
        env.store.create_schedule(&spec(&format!("s{i}"), "@hourly")).await.unwrap();
        rewind(&env, &format!("s{i}"), chrono::Duration::minutes(30)).await;
    }
    // A schedule may fire more than one late tick: count the schedules.
    let schedules = |p: &jobq_core::store::schedules::FirePass| {
        p.fired.iter().map(|f| f.schedule.clone()).collect::<HashSet<_>>().len()
    };
    let first = env.store.fire_due(&env.broker, long_grace(), 3).await.unwrap();
    assert_eq!((schedules(&first), first.more), (3, true), "{:?}", first.fired);
    let second = env.store.fire_due(&env.broker, long_grace(), 3).await.unwrap();
    assert_eq!((schedules(&second), second.more), (2, false), "{:?}", second.fired);
    env.cleanup().await;
}
