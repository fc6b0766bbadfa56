//! Metric handles of each (queue, job type), looked up once: with labels, a registry lookup
//! (hashing the labels, building their strings) costs more than the increment it serves, and the
//! worker records five metrics per job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use jobq_core::job::QueueName;
use jobq_core::stream::Settled;
use metrics::{Counter, Histogram};

/// Most (queue, type) pairs kept; past that, handles are looked up on each use.
const MAX_CACHED: usize = 1_000;

/// The handles of one queue and job type.
pub(crate) struct KindMetrics {
    pub(crate) started: Counter,
    pub(crate) enqueue_to_start: Histogram,
    pub(crate) duration: Histogram,
    pub(crate) failed: Counter,
    finished: [Counter; 6],
}

impl KindMetrics {
    fn new(queue: &QueueName, kind: &str) -> Self {
        let (queue, kind) = (queue.to_string(), jobq_core::ops::type_label(kind));
        let labels = [("queue", queue.clone()), ("type", kind.clone())];
        let finished = |outcome: &'static str| metrics::counter!("jobq_jobs_finished_total", "queue" => queue.clone(), "type" => kind.clone(), "outcome" => outcome);
        Self {
            started: metrics::counter!("jobq_jobs_started_total", &labels),
            enqueue_to_start: metrics::histogram!("jobq_enqueue_to_start_seconds", "queue" => queue.clone()),
            duration: metrics::histogram!("jobq_attempt_duration_seconds", &labels),
            failed: metrics::counter!("jobq_jobs_failed_total", &labels),
            finished: [
                finished("succeeded"),
                finished("retried"),
                finished("dead"),
                finished("cancelled"),
                finished("postponed"),
                finished("stale"),
            ],
        }
    }

    /// `jobq_jobs_finished_total` for this outcome.
    pub(crate) fn finished(&self, outcome: Settled) -> &Counter {
        &self.finished[match outcome {
            Settled::Succeeded => 0,
            Settled::Retrying => 1,
            Settled::Dead => 2,
            Settled::Cancelled => 3,
            Settled::Postponed => 4,
            Settled::Stale => 5,
        }]
    }
}

/// Handles by job type, of one queue.
type ByKind = HashMap<String, Arc<KindMetrics>>;

/// The cache, shared by the job tasks and the completer.
#[derive(Clone, Default)]
pub(crate) struct JobMetrics(Arc<Mutex<HashMap<QueueName, ByKind>>>);

impl JobMetrics {
    /// The handles of `kind` in `queue`.
    pub(crate) fn of(&self, queue: &QueueName, kind: &str) -> Arc<KindMetrics> {
        let Ok(mut cache) = self.0.lock() else { return Arc::new(KindMetrics::new(queue, kind)) };
        if let Some(m) = cache.get(queue).and_then(|kinds| kinds.get(kind)) {
            return m.clone();
        }
        let m = Arc::new(KindMetrics::new(queue, kind));
        if cache.values().map(HashMap::len).sum::<usize>() < MAX_CACHED {
            cache.entry(queue.clone()).or_default().insert(kind.to_owned(), m.clone());
        }
        m
    }
}
