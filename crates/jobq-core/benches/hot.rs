//! Micro-benchmarks of the pure code every job passes through: envelope JSON encode/decode,
//! backoff delays and Redis key building. `cargo bench -p jobq-core --bench hot`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use jobq_core::backoff::{Backoff, Jitter, Strategy};
use jobq_core::job::{Envelope, JobId, Priority, QueueName, ENVELOPE_VERSION};
use jobq_core::stream::keys::Keys;

fn envelope() -> Envelope {
    Envelope {
        v: ENVELOPE_VERSION,
        id: JobId::new(),
        kind: "email.send".into(),
        queue: "mail".parse().unwrap(),
        priority: Priority::High,
        payload: serde_json::json!({"to": "someone@example.com", "template": "welcome", "vars": {"name": "Ada", "n": 3}}),
        max_attempts: 10,
        backoff: Backoff::default(),
        timeout: Some(Duration::from_secs(30)),
        created_at: chrono::Utc::now(),
        expires_at: None,
        unique_key: None,
        partition_key: None,
        depends_on: Vec::new(),
        dependency_mode: None,
        enqueued_by: Some("producer".into()),
        metadata: BTreeMap::from([(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        )]),
        tags: Vec::new(),
    }
}

fn envelopes(c: &mut Criterion) {
    let env = envelope();
    let json = serde_json::to_string(&env).unwrap();
    c.bench_function("envelope/encode", |b| b.iter(|| serde_json::to_string(black_box(&env)).unwrap()));
    c.bench_function("envelope/decode", |b| b.iter(|| serde_json::from_str::<Envelope>(black_box(&json)).unwrap()));
    c.bench_function("envelope/traceparent", |b| {
        b.iter(|| {
            jobq_core::job::parse_traceparent(black_box("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
        })
    });
}

fn backoff(c: &mut Criterion) {
    let mut rng = rand::rng();
    for (name, jitter) in [("none", Jitter::None), ("full", Jitter::Full), ("decorrelated", Jitter::Decorrelated)] {
        let policy = Backoff { strategy: Strategy::Exponential, jitter, ..Backoff::default() };
        c.bench_function(&format!("backoff/exponential-{name}"), |b| {
            let mut attempt = 0u32;
            b.iter(|| {
                attempt = attempt % 20 + 1;
                policy.delay(black_box(attempt), Some(Duration::from_secs(4)), &mut rng)
            })
        });
    }
}

fn keys(c: &mut Criterion) {
    let keys = Keys::new("jobq");
    let queue: QueueName = "mail".parse().unwrap();
    let id = JobId::new();
    c.bench_function("keys/stream", |b| b.iter(|| keys.stream(black_box(&queue), Priority::Normal)));
    c.bench_function("keys/job", |b| b.iter(|| keys.job(black_box(&queue), black_box(id))));
    c.bench_function("keys/streams", |b| b.iter(|| keys.streams(black_box(&queue))));
}

criterion_group!(benches, envelopes, backoff, keys);
criterion_main!(benches);
