//! Writes the outbox into Postgres: reads events in the `jobq-recorder` group, writes a batch in
//! one transaction, then XACKs and XDELs it. While Postgres is down the batch is retried and
//! nothing more is read: events wait in Redis, nothing is lost.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use jobq_core::config::SchedulerSettings;
use jobq_core::job::QueueName;
use jobq_core::store::Store;
use jobq_core::stream::outbox::EventBatch;
use jobq_core::stream::Broker;
use tokio_util::sync::CancellationToken;

const QUEUE_REFRESH: Duration = Duration::from_secs(2);
const CLAIM_EVERY: Duration = Duration::from_secs(10);
/// After a read that brought less than half a batch, wait this long before the next one, so that
/// under load events are written in fewer, larger transactions (each read, Postgres commit and
/// ack costs about as much as tens of rows). The history lags by at most this much more.
const LINGER: Duration = Duration::from_millis(20);

/// Most bytes of event data (errors, envelopes of dead jobs) in one Postgres transaction: well
/// under the 1 GB Postgres takes in one message or one value, however large the payloads of a
/// backlog of dead jobs read in one batch after an outage.
const MAX_TX_BYTES: usize = 64 << 20;

/// About how many bytes an event takes in the statement: a fixed part for the row's ids, times
/// and names, plus its texts and its envelope as JSON.
fn event_bytes(e: &jobq_core::stream::outbox::Event) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let texts = [&e.error, &e.worker, &e.reason].iter().map(|t| t.as_ref().map_or(0, String::len)).sum::<usize>();
    let mut envelope = Count(0);
    if let Some(v) = &e.envelope {
        let _ = serde_json::to_writer(&mut envelope, v);
    }
    128 + e.kind.len() + texts + envelope.0
}

/// `events` cut into runs of at most `per_tx` events and, but for a single larger event, at most
/// `max_bytes`.
fn chunks(
    events: &[jobq_core::stream::outbox::Event],
    per_tx: usize,
    max_bytes: usize,
) -> Vec<&[jobq_core::stream::outbox::Event]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, e) in events.iter().enumerate() {
        let size = event_bytes(e);
        if i > start && (i - start >= per_tx.max(1) || bytes + size > max_bytes) {
            out.push(&events[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < events.len() {
        out.push(&events[start..]);
    }
    out
}

/// Writes one batch to Postgres and acks it. Returns the number of outbox entries handled.
pub async fn record_once(broker: &Broker, store: &Store, batch: &EventBatch) -> jobq_core::Result<usize> {
    record_in_chunks(broker, store, batch, usize::MAX).await
}

/// [`record_once`] with at most `per_tx` events per Postgres transaction (an outbox entry of
/// `complete_many` holds many events). Acks once every chunk is written.
async fn record_in_chunks(
    broker: &Broker,
    store: &Store,
    batch: &EventBatch,
    per_tx: usize,
) -> jobq_core::Result<usize> {
    if batch.is_empty() {
        return Ok(0);
    }
    for (q, entry) in &batch.malformed {
        tracing::error!(queue.name = %q, entry, "undecodable outbox entry; dropping it");
    }
    for chunk in chunks(&batch.events, per_tx, MAX_TX_BYTES) {
        store.record(chunk).await.inspect_err(|_| {
            metrics::counter!("jobq_postgres_errors_total", "component" => "recorder").increment(1);
        })?;
    }
    metrics::counter!("jobq_recorded_events_total").increment(batch.events.len() as u64);
    let entries: Vec<(QueueName, String)> = batch.entries();
    broker.ack_events(&entries).await?;
    Ok(entries.len())
}

pub(crate) async fn run(
    broker: Broker,
    store: Store,
    settings: SchedulerSettings,
    consumer: String,
    shutdown: CancellationToken,
) {
    let block = Duration::from_millis(500);
    let mut conn = None;
    let mut queues: Vec<QueueName> = Vec::new();
    let mut refused: HashSet<QueueName> = HashSet::new();
    let mut refreshed = Instant::now() - QUEUE_REFRESH;
    let mut claimed = Instant::now() - CLAIM_EVERY;
    let mut delay = Duration::from_millis(100);
    while !shutdown.is_cancelled() {
        if refreshed.elapsed() >= QUEUE_REFRESH {
            match broker.queues().await {
                Ok(q) => match broker.ensure_recorder_groups(&q).await {
                    Ok(found) => {
                        // Logged when a queue's outbox becomes unreadable, and when it is again.
                        let now_refused: HashSet<QueueName> = found.refused.iter().map(|(q, _)| q.clone()).collect();
                        for (q, e) in &found.refused {
                            if !refused.contains(q) {
                                tracing::error!(queue.name = %q, error = %e, "the queue's outbox cannot be read; its attempts are not recorded until it can");
                            }
                        }
                        for q in refused.difference(&now_refused) {
                            tracing::info!(queue.name = %q, "the queue's outbox can be read again");
                        }
                        refused = now_refused;
                        queues = found.readable;
                        refreshed = Instant::now();
                    }
                    Err(e) => tracing::warn!(error = %e, "creating recorder groups failed"),
                },
                Err(e) => tracing::warn!(error = %e, "listing queues failed"),
            }
        }
        let batch = if claimed.elapsed() >= CLAIM_EVERY {
            claimed = Instant::now();
            match broker
                .cleanup_consumers(&queues, jobq_core::stream::Keys::RECORDER_GROUP, Duration::from_secs(3600))
                .await
            {
                Ok(n) if n > 0 => tracing::info!(removed = n, "removed idle recorder consumers with nothing pending"),
                Ok(_) => {}
                Err(e) => tracing::debug!(error = %e, "recorder consumer clean-up failed"),
            }
            let mut all = EventBatch::default();
            for q in &queues {
                match broker.claim_events(&consumer, q, settings.reclaim_idle, settings.record_batch).await {
                    Ok(b) => {
                        all.events.extend(b.events);
                        all.malformed.extend(b.malformed);
                    }
                    Err(e) => tracing::warn!(error = %e, queue.name = %q, "claiming stale outbox entries failed"),
                }
            }
            if !all.is_empty() {
                tracing::info!(events = all.len(), "took over outbox entries of a stopped recorder");
            }
            Ok(all)
        } else {
            if conn.is_none() {
                conn = broker
                    .blocking_connection(block)
                    .await
                    .map_err(|e| tracing::warn!(error = %e, "cannot connect to Redis"))
                    .ok();
            }
            match conn.as_mut() {
                Some(c) => tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = broker.read_events(c, &consumer, &queues, settings.record_batch, block) => r,
                },
                None => Err(jobq_core::Error::Protocol("no connection".into())),
            }
        };
        let batch = match batch {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(error = %e, "reading the outbox failed; retrying");
                conn = None;
                // A queue's outbox broken since the last look (its group destroyed, a key of
                // another type in its place) fails the read of every queue: look again now, which
                // creates the group again or leaves that queue out.
                refreshed = Instant::now() - QUEUE_REFRESH;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Write this batch until it lands; read nothing else meanwhile.
        loop {
            match record_in_chunks(&broker, &store, &batch, settings.record_batch).await {
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(entries = n, events = batch.events.len(), "recorded outbox events");
                    }
                    delay = Duration::from_millis(100);
                    if !batch.is_empty() && batch.len() < settings.record_batch / 2 {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(LINGER) => {}
                        }
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = batch.len(), "recording failed; the events stay in the outbox and are retried");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jobq_core::stream::outbox::Event;

    fn event(envelope_bytes: usize) -> Event {
        Event {
            queue: QueueName::default_queue(),
            entry: "1-0".into(),
            job_id: jobq_core::job::JobId::new(),
            run: 1,
            attempt: 1,
            outcome: "dead".into(),
            kind: "x".into(),
            started_at: None,
            finished_at: None,
            worker: None,
            error: None,
            reason: None,
            envelope: (envelope_bytes > 0).then(|| serde_json::json!({"payload": "p".repeat(envelope_bytes)})),
        }
    }

    #[test]
    fn a_transaction_holds_at_most_its_events_and_its_bytes() {
        let small: Vec<Event> = (0..10).map(|_| event(0)).collect();
        let sizes = |c: Vec<&[Event]>| c.iter().map(|c| c.len()).collect::<Vec<_>>();
        assert_eq!(sizes(chunks(&small, 4, MAX_TX_BYTES)), [4, 4, 2]);
        assert_eq!(sizes(chunks(&small, usize::MAX, MAX_TX_BYTES)), [10]);
        // Dead jobs with large payloads: cut by bytes; one larger than the bound goes alone.
        let large: Vec<Event> = [400, 400, 400, 2000, 100].into_iter().map(event).collect();
        assert_eq!(sizes(chunks(&large, 100, 1200)), [2, 1, 1, 1]);
        assert!(chunks(&[], 4, 1000).is_empty());
    }
}
