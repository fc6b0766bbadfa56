//! Batch, listing, history, queue stats, the full DLQ and the audit log.

use std::time::Duration;

use axum::http::StatusCode;
use jobq_core::job::{NewJob, QueueName};
use jobq_core::stream::{Failure, Outcome};
use jobq_testutil::{wait_until, TestEnv};
use serde_json::{json, Value};

use crate::{app, call};

/// Runs `n` jobs of `kind` to their death (one attempt each) and records them in Postgres.
async fn kill_jobs(env: &TestEnv, kind: &str, error: &str, n: usize) -> Vec<String> {
    for i in 0..n {
        env.broker.enqueue(NewJob::new(kind, json!({"i": i})).max_attempts(1)).await.unwrap();
    }
    kill_queued(env, error, n).await
}

/// Runs up to `n` queued jobs to their death and records them in Postgres.
async fn kill_queued(env: &TestEnv, error: &str, n: usize) -> Vec<String> {
    let q = QueueName::default_queue();
    let f = env.broker.fetch(&q, "w", n).await.unwrap();
    let outcomes: Vec<Outcome> = f
        .jobs
        .into_iter()
        .map(|d| Outcome {
            delivery: d,
            result: Err(Failure { message: error.into(), retry_in: None, reason: "fatal" }),
        })
        .collect();
    env.broker.settle(&outcomes).await.unwrap();
    env.broker.ensure_recorder_groups(std::slice::from_ref(&q)).await.unwrap();
    let mut conn = env.broker.blocking_connection(Duration::from_millis(100)).await.unwrap();
    let batch = env.broker.read_events(&mut conn, "r", &[q], 1000, Duration::from_millis(100)).await.unwrap();
    env.store.record(&batch.events).await.unwrap();
    batch.events.iter().map(|e| e.job_id.to_string()).collect()
}

#[tokio::test]
async fn batch_enqueue_reports_each_item_and_atomic_batches_are_all_or_nothing() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let body = json!({"jobs": [
        {"type": "echo", "payload": 1},
        {"type": "", "payload": 2},
        {"type": "echo", "colour": "red"},
        {"type": "echo", "unique_key": "u", "queue": "mail"},
        {"type": "echo", "unique_key": "u", "queue": "mail"},
        {"type": "echo", "delay": "1h"},
        ["echo"]
    ]});
    let (s, r) = call(&app, "POST", "/api/v1/jobs/batch", Some(&body.to_string())).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let statuses: Vec<u64> = r["results"].as_array().unwrap().iter().map(|i| i["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [201, 422, 422, 201, 200, 201, 422], "an item is an object, not an array of its fields");
    assert_eq!((r["created"].as_u64(), r["existing"].as_u64(), r["failed"].as_u64()), (Some(3), Some(1), Some(3)));
    assert_eq!(r["results"][4]["job"]["id"], r["results"][3]["job"]["id"]);
    assert!(r["results"][2]["error"]["message"].as_str().unwrap().contains("colour"));
    assert_eq!(r["results"][5]["job"]["state"], "scheduled");

    let before = env.broker.queues().await.unwrap();
    let atomic = json!({"atomic": true, "jobs": [{"type": "echo", "queue": "atomic"}, {"type": "echo", "max_attempts": 0, "queue": "atomic"}]});
    let (s, err) = call(&app, "POST", "/api/v1/jobs/batch", Some(&atomic.to_string())).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(err["error"]["details"][0]["index"], 1);
    assert_eq!(env.broker.queues().await.unwrap(), before, "nothing of the atomic batch was enqueued");
    let ok = json!({"atomic": true, "jobs": (0..50).map(|i| json!({"type": "echo", "payload": i, "queue": "atomic"})).collect::<Vec<_>>()});
    let (s, r) = call(&app, "POST", "/api/v1/jobs/batch", Some(&ok.to_string())).await;
    assert_eq!((s, r["created"].as_u64()), (StatusCode::OK, Some(50)));

    let too_many = json!({"jobs": vec![json!({"type": "echo"}); 1001]});
    let (s, err) = call(&app, "POST", "/api/v1/jobs/batch", Some(&too_many.to_string())).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(err["error"]["message"].as_str().unwrap().contains("1000"));
    let (s, _) = call(&app, "POST", "/api/v1/jobs/batch", Some(r#"{"jobs": []}"#)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "an empty batch is invalid, not too large");
    env.cleanup().await;
}

#[tokio::test]
async fn jobs_are_listed_by_queue_state_and_type_with_a_cursor() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let mut ids = std::collections::HashSet::new();
    for i in 0..7 {
        let q = if i % 2 == 0 { "a" } else { "b" };
        let kind = if i < 5 { "echo" } else { "report" };
        let (_, j) = call(&app, "POST", "/api/v1/jobs", Some(&json!({"type": kind, "queue": q}).to_string())).await;
        ids.insert(j["id"].as_str().unwrap().to_owned());
    }
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let uri = match &cursor {
            Some(c) => format!("/api/v1/jobs?limit=2&cursor={c}"),
            None => "/api/v1/jobs?limit=2".into(),
        };
        let (s, page) = call(&app, "GET", &uri, None).await;
        assert_eq!(s, StatusCode::OK, "{page}");
        // A page ends between two SCAN calls of at least 10 keys: a few more than `limit`.
        assert!(page["items"].as_array().unwrap().len() <= 2 + 10, "about `limit` jobs: {page}");
        for j in page["items"].as_array().unwrap() {
            assert!(seen.insert(j["id"].as_str().unwrap().to_owned()), "no job twice");
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, ids);
    // A page does bounded work (a SCAN step over the whole keyspace), so it may hold fewer
    // items than exist: follow the cursor.
    let mut found = 0;
    let mut uri = "/api/v1/jobs?queue=a&type=echo&state=queued".to_owned();
    loop {
        let (_, page) = call(&app, "GET", &uri, None).await;
        found += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(c) => uri = format!("/api/v1/jobs?queue=a&type=echo&state=queued&cursor={c}"),
            None => break,
        }
    }
    assert_eq!(found, 3);
    // A cursor naming a queue that is gone continues with the next queue by name.
    let (s, page) = call(&app, "GET", "/api/v1/jobs?cursor=0.aa", None).await;
    assert_eq!(s, StatusCode::OK, "{page}");
    assert!(page["items"].as_array().unwrap().iter().all(|j| j["queue"] == "b"), "{page}");
    for bad in [
        "/api/v1/jobs?state=happy",
        "/api/v1/jobs?limit=0",
        "/api/v1/jobs?queue=a%20b",
        "/api/v1/jobs?cursor=x",
        "/api/v1/jobs?cursor=nope.a",
        "/api/v1/jobs?cursor=0.a%20b",
        // A value that does not parse is as invalid as one out of range.
        "/api/v1/jobs?limit=ten",
        "/api/v1/jobs?limit=-1",
        "/api/v1/dlq?limit=ten",
        "/api/v1/dlq?failed_after=yesterday",
        "/api/v1/audit?limit=1.5",
        "/api/v1/schedules/nightly/runs?limit=x",
    ] {
        let (s, err) = call(&app, "GET", bad, None).await;
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {err}");
        assert_eq!(err["error"]["code"], "invalid_request", "{bad}: {err}");
    }
    // A parameter the route does not take, or one given twice, is a malformed request.
    for bad in ["/api/v1/jobs?colour=red", "/api/v1/dlq?limit=1&limit=2", "/api/v1/audit?since=1"] {
        let (s, err) = call(&app, "GET", bad, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {err}");
        assert_eq!(err["error"]["code"], "bad_request", "{bad}: {err}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn executions_queue_stats_and_the_whole_dlq() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let dead = kill_jobs(&env, "mail", "SMTP 550 mailbox full", 3).await;
    kill_jobs(&env, "sms", "gateway timeout", 2).await;
    let (s, h) = call(&app, "GET", &format!("/api/v1/jobs/{}/executions", dead[0]), None).await;
    assert_eq!((s, h["items"][0]["outcome"].as_str()), (StatusCode::OK, Some("dead")));

    env.broker.enqueue(NewJob::new("echo", json!({})).delay(Duration::from_secs(60))).await.unwrap();
    env.broker.pause(&QueueName::default_queue()).await.unwrap();
    let (s, qs) = call(&app, "GET", "/api/v1/queues/default", None).await;
    assert_eq!(s, StatusCode::OK, "{qs}");
    assert_eq!((qs["scheduled"].as_u64(), qs["paused"].as_bool(), qs["dead"].as_u64()), (Some(1), Some(true), Some(5)));
    assert_eq!(qs["counts"]["dead"], 5);
    let (s, all) = call(&app, "GET", "/api/v1/queues", None).await;
    assert_eq!((s, all["items"].as_array().unwrap().len()), (StatusCode::OK, 1));
    let (s, _) = call(&app, "GET", "/api/v1/queues/nope", None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Filters.
    let (_, page) = call(&app, "GET", "/api/v1/dlq?error=MAILBOX", None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 3, "error substring, case-insensitive");
    let (_, page) = call(&app, "GET", "/api/v1/dlq?error=100%25", None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0, "pattern characters match literally");
    let future = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339().replace('+', "%2B");
    let (_, page) = call(&app, "GET", &format!("/api/v1/dlq?failed_after={future}"), None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    let (_, page) = call(&app, "GET", &format!("/api/v1/dlq?failed_before={future}&type=sms"), None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);

    // Show, retry with an edited payload.
    let (s, shown) = call(&app, "GET", &format!("/api/v1/dlq/{}", dead[0]), None).await;
    assert_eq!((s, shown["envelope"]["type"].as_str()), (StatusCode::OK, Some("mail")));
    let (s, r) =
        call(&app, "POST", &format!("/api/v1/dlq/{}/retry", dead[0]), Some(r#"{"payload": {"fixed": true}}"#)).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (_, job) = call(&app, "GET", &format!("/api/v1/jobs/{}", dead[0]), None).await;
    assert_eq!((job["payload"].clone(), job["state"].as_str()), (json!({"fixed": true}), Some("queued")));
    let (s, _) = call(&app, "POST", &format!("/api/v1/dlq/{}/retry", dead[0]), Some(r#"{"payload": 1, "x": 2}"#)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    let nul = r#"{"payload": {"note": "a\u0000b"}}"#;
    let (s, err) = call(&app, "POST", &format!("/api/v1/dlq/{}/retry", dead[1]), Some(nul)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("U+0000"), "{err}");
    // The body is read as on every JSON route: an object, JSON, said to be JSON.
    let path = format!("/api/v1/dlq/{}/retry", dead[1]);
    let (s, err) = call(&app, "POST", &path, Some(r#"[{"payload": {"fixed": true}}]"#)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "an array of the fields is not the body: {err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("a JSON object"), "{err}");
    let (s, err) = call(&app, "POST", &path, Some(r#"{"payload": "#)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{err}");
    let untyped =
        axum::http::Request::builder().method("POST").uri(&path).body(axum::body::Body::from(r#"{"payload": 1}"#));
    let resp = tower::ServiceExt::oneshot(app.clone(), untyped.unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let (_, job) = call(&app, "GET", &format!("/api/v1/jobs/{}", dead[1]), None).await;
    assert_eq!(job["state"], "dead", "every refused retry left it: {job}");
    // An explicit `null` is a payload like any other, not "keep the old one".
    let (s, r) = call(&app, "POST", &format!("/api/v1/dlq/{}/retry", dead[2]), Some(r#"{"payload": null}"#)).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let (_, job) = call(&app, "GET", &format!("/api/v1/jobs/{}", dead[2]), None).await;
    assert_eq!((job["payload"].clone(), job["state"].as_str()), (Value::Null, Some("queued")), "{job}");

    // Retry by filter: a dry run counts, the real one replays in the background.
    let (s, dry) = call(&app, "POST", "/api/v1/dlq/retry", Some(r#"{"type": "mail", "dry_run": true}"#)).await;
    assert_eq!((s, dry["matched"].as_i64()), (StatusCode::OK, Some(1)));
    let (s, started) = call(&app, "POST", "/api/v1/dlq/retry", Some(r#"{"type": "mail"}"#)).await;
    assert_eq!((s, started["matched"].as_i64()), (StatusCode::ACCEPTED, Some(1)));
    wait_until(Duration::from_secs(10), "the replay to finish", || async {
        let (_, log) = call(&app, "GET", "/api/v1/audit", None).await;
        log["items"]
            .as_array()?
            .iter()
            .find(|e| e["action"] == "dlq.retry_filter" && e["details"]["done"] == true)
            .cloned()
    })
    .await;
    let (_, page) = call(&app, "GET", "/api/v1/dlq?type=mail", None).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 0);
    let (s, again) = call(&app, "POST", "/api/v1/dlq/retry", Some(r#"{"type": "mail", "dry_run": true}"#)).await;
    assert_eq!((s, again["matched"].as_i64()), (StatusCode::OK, Some(0)), "idempotent: nothing left to replay");

    // Delete one, purge the rest (only with confirm=true).
    let (_, page) = call(&app, "GET", "/api/v1/dlq?type=sms", None).await;
    let one = page["items"][0]["job_id"].as_str().unwrap().to_owned();
    let (s, _) = call(&app, "DELETE", &format!("/api/v1/dlq/{one}"), None).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let (s, _) = call(&app, "DELETE", &format!("/api/v1/dlq/{one}"), None).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, err) = call(&app, "DELETE", "/api/v1/dlq?type=sms", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(err["error"]["message"].as_str().unwrap().contains("confirm=true"));
    let (s, purged) = call(&app, "DELETE", "/api/v1/dlq?type=sms&confirm=true", None).await;
    assert_eq!((s, purged["deleted"].as_u64()), (StatusCode::OK, Some(1)));

    let (_, log) = call(&app, "GET", "/api/v1/audit", None).await;
    let actions: Vec<&str> = log["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for a in ["dlq.retry_edited", "dlq.retry_filter", "dlq.delete", "dlq.purge"] {
        assert!(actions.contains(&a), "{a} audited: {actions:?}");
    }
    let purge: &Value = log["items"].as_array().unwrap().iter().find(|e| e["action"] == "dlq.purge").unwrap();
    assert_eq!(
        (purge["count"].as_i64(), purge["filter"]["type"].as_str(), purge["actor"].as_str()),
        (Some(1), Some("sms"), Some("anonymous"))
    );
    env.cleanup().await;
}

#[tokio::test]
async fn retention_prunes_history_dlq_and_schedule_run_rows_in_batches() {
    let env = TestEnv::new().await;
    kill_jobs(&env, "old", "x", 5).await;
    let spec: jobq_core::schedule::ScheduleSpec =
        serde_json::from_value(json!({"name": "often", "cron": "0 0 * * * *", "job": {"type": "echo"}})).unwrap();
    env.store.create_schedule(&spec).await.unwrap();
    for _ in 0..3 {
        env.store.trigger_schedule(&env.broker, "often").await.unwrap();
    }
    let future = chrono::Utc::now() + chrono::Duration::minutes(1);
    let past = chrono::Utc::now() - chrono::Duration::days(1);
    assert_eq!(env.store.prune(past, past, 2).await.unwrap(), (0, 0, 0));
    assert_eq!(env.store.prune(future, future, 2).await.unwrap(), (5, 5, 3));
    assert!(env.store.schedule("often").await.unwrap().is_some(), "the schedule itself stays");
    env.cleanup().await;
}

#[tokio::test]
async fn a_dlq_replay_whose_process_stopped_mid_way_is_taken_over_and_finished() {
    let env = TestEnv::with(&[("JOBQ_API_DLQ_REPLAY_RATE", "50")]).await;
    kill_jobs(&env, "mail", "smtp down", 10).await;
    kill_jobs(&env, "sms", "gateway down", 2).await;
    // A replay of the ten mails whose API process stopped after three: its audit entry and its
    // retries as that process left them.
    let filter = jobq_core::store::DlqFilter { kind: Some("mail".into()), ..Default::default() };
    let selection = env.store.dead_selection(&filter, None, None, 10).await.unwrap();
    let mut replay = env.store.start_replay("ops", &filter, &selection).await.unwrap();
    let ids: Vec<_> = selection.iter().map(|s| s.1).collect();
    for id in &ids[..3] {
        env.store.retry_dead(&env.broker, *id, None).await.unwrap();
        replay.retried += 1;
    }
    assert!(env.store.replay_progress(&replay, false).await.unwrap());
    // One of them ran and died again since: a new death, not this replay's to retry.
    let again = kill_queued(&env, "smtp down again", 1).await;
    // And someone deleted one it had not reached yet.
    assert!(env.store.delete_dead(ids[9]).await.unwrap());
    let state = jobq_api::AppState::new(env.broker.clone(), env.store.clone(), &env.settings());
    assert_eq!(
        jobq_api::replay::take_over(&state, Duration::from_secs(30)).await.unwrap(),
        0,
        "not silent long enough"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(jobq_api::replay::take_over(&state, Duration::from_millis(200)).await.unwrap(), 1);
    assert!(
        !env.store.replay_progress(&replay, false).await.unwrap(),
        "the stopped replay's owner may not report any more"
    );
    let app = app(&env);
    let entry = wait_until(Duration::from_secs(10), "the replay to be finished", || async {
        let (_, log) = call(&app, "GET", "/api/v1/audit", None).await;
        log["items"].as_array()?.iter().find(|e| e["id"] == replay.audit_id && e["details"]["done"] == true).cloned()
    })
    .await;
    let mut details = entry["details"].clone();
    assert!(details.as_object_mut().unwrap().remove("upto").is_some(), "the selection's bound is kept: {entry}");
    assert_eq!(details, json!({"retried": 9, "skipped": 0, "failed": 0, "of": 10, "done": true}), "{entry}");
    assert_eq!(entry["count"], 9);
    let (_, left) = call(&app, "POST", "/api/v1/dlq/retry", Some(r#"{"type": "mail", "dry_run": true}"#)).await;
    assert_eq!(left["matched"], 1, "every mail retried once: the one that died again is left");
    let (_, page) = call(&app, "GET", "/api/v1/dlq?type=mail", None).await;
    assert_eq!(page["items"][0]["job_id"].as_str(), Some(again[0].as_str()));
    let (_, other) = call(&app, "POST", "/api/v1/dlq/retry", Some(r#"{"type": "sms", "dry_run": true}"#)).await;
    assert_eq!(other["matched"], 2, "nothing outside its filter");
    assert_eq!(
        jobq_api::replay::take_over(&state, Duration::ZERO).await.unwrap(),
        0,
        "a finished replay is not taken over"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_edited_dlq_retry_whose_payload_cannot_be_applied_answers_409_and_is_audited() {
    let env = TestEnv::new().await;
    let app = app(&env);
    let id = kill_jobs(&env, "mail", "smtp down", 1).await.remove(0);
    // The Redis half of a retry whose Postgres commit then failed (its caller got a 503).
    let stored = env.store.dead_envelope(id.parse().unwrap()).await.unwrap().unwrap();
    env.broker.retry_dead(&serde_json::from_value(stored).unwrap(), 1).await.unwrap();
    let path = format!("/api/v1/dlq/{id}/retry");
    let (s, err) = call(&app, "POST", &path, Some(r#"{"payload": {"fixed": true}}"#)).await;
    assert_eq!(s, StatusCode::CONFLICT, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("not applied"), "{err}");
    let (_, log) = call(&app, "GET", "/api/v1/audit", None).await;
    let entry = &log["items"][0];
    assert_eq!((entry["action"].as_str(), entry["target"].as_str()), (Some("dlq.retry"), Some(id.as_str())), "{log}");
    assert_eq!(entry["details"]["payload_not_applied"], json!({"fixed": true}), "{log}");
    let (s, _) = call(&app, "POST", &path, None).await;
    assert_eq!(s, StatusCode::CONFLICT, "the row is marked: a further retry is the usual 409");
    env.cleanup().await;
}
