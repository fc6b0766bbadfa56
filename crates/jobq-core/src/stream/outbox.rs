//! The outbox: attempt events the scripts XADD to `jobq:{q:Q}:events`, read by the recorder in
//! the `jobq-recorder` consumer group, then XACK'ed and XDEL'ed once written to Postgres.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::Value;

use super::{create_group, protocol, Broker, Keys};
use crate::error::Result;
use crate::job::{from_millis, JobId, QueueName};

/// One finished attempt, as written by the complete/fail scripts.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Queue of the job.
    pub queue: QueueName,
    /// Outbox entry id.
    pub entry: String,
    /// Job.
    pub job_id: JobId,
    /// Run number.
    pub run: i32,
    /// Attempt number in the run.
    pub attempt: i32,
    /// `succeeded`, `failed` (will retry) or `dead`.
    pub outcome: String,
    /// Job type.
    pub kind: String,
    /// Attempt start.
    pub started_at: Option<DateTime<Utc>>,
    /// Attempt end.
    pub finished_at: Option<DateTime<Utc>>,
    /// Consumer that ran it.
    pub worker: Option<String>,
    /// Error message of a failed attempt.
    pub error: Option<String>,
    /// Why the job died (`max_attempts`, `unknown_type`, ...).
    pub reason: Option<String>,
    /// Envelope JSON (dead events only).
    pub envelope: Option<serde_json::Value>,
}

/// Events read from the outbox; `malformed` entries could not be decoded (logged, then acked).
#[derive(Debug, Default)]
pub struct EventBatch {
    /// Decoded events.
    pub events: Vec<Event>,
    /// (queue, entry) of undecodable entries.
    pub malformed: Vec<(QueueName, String)>,
}

impl EventBatch {
    fn push(&mut self, queue: &QueueName, e: StreamId) {
        if e.map.contains_key("batch") {
            match decode_batch(queue, &e) {
                Some(events) => self.events.extend(events),
                None => self.malformed.push((queue.clone(), e.id)),
            }
            return;
        }
        match decode(queue, &e) {
            Some(ev) => self.events.push(ev),
            None => self.malformed.push((queue.clone(), e.id)),
        }
    }

    /// Number of events plus undecodable entries in the batch (an outbox entry written by
    /// `complete_many` holds the events of several attempts).
    pub fn len(&self) -> usize {
        self.events.len() + self.malformed.len()
    }

    /// The outbox entries the batch came from, each once: what to XACK and XDEL once written.
    pub fn entries(&self) -> Vec<(QueueName, String)> {
        let mut entries: Vec<(QueueName, String)> = Vec::with_capacity(self.len());
        for e in &self.events {
            // The events of one entry are next to each other.
            if entries.last().is_none_or(|(q, id)| *id != e.entry || *q != e.queue) {
                entries.push((e.queue.clone(), e.entry.clone()));
            }
        }
        entries.extend(self.malformed.iter().cloned());
        entries
    }

    /// True when nothing was read.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Postgres text and jsonb cannot hold U+0000; a handler's error message (or an envelope written
/// before enqueue refused it) may. Such a character is stored as U+FFFD, so that one event can
/// never stop the recorder.
pub(crate) fn storable(mut s: String) -> String {
    if s.contains('\0') {
        s = s.replace('\0', "\u{FFFD}");
    }
    s
}

pub(crate) fn storable_json(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::String(s) if s.contains('\0') => *s = storable(std::mem::take(s)),
        Value::Array(a) => a.iter_mut().for_each(storable_json),
        Value::Object(o) => {
            if o.keys().any(|k| k.contains('\0')) {
                *o = std::mem::take(o).into_iter().map(|(k, v)| (storable(k), v)).collect();
            }
            o.values_mut().for_each(storable_json);
        }
        _ => {}
    }
}

fn decode(queue: &QueueName, e: &StreamId) -> Option<Event> {
    let s = |f: &str| {
        e.map.get(f).and_then(|v| redis::from_redis_value_ref::<String>(v).ok()).filter(|v| !v.is_empty()).map(storable)
    };
    let n = |f: &str| s(f).and_then(|v| v.parse::<i64>().ok());
    Some(Event {
        queue: queue.clone(),
        entry: e.id.clone(),
        job_id: s("id")?.parse().ok()?,
        run: n("run")? as i32,
        attempt: n("attempt")? as i32,
        outcome: s("outcome")?,
        kind: s("type").unwrap_or_default(),
        started_at: n("started_at").and_then(from_millis),
        finished_at: n("finished_at").and_then(from_millis),
        worker: s("worker"),
        error: s("error"),
        reason: s("reason"),
        envelope: s("envelope").and_then(|v| serde_json::from_str(&v).ok()).map(|mut v| {
            storable_json(&mut v);
            v
        }),
    })
}

/// The events of a batch entry (`complete_many`): `outcome`, `finished_at`, and `batch`, a JSON
/// array of six strings per attempt: id, run, attempt, type, started_at, worker.
fn decode_batch(queue: &QueueName, e: &StreamId) -> Option<Vec<Event>> {
    let s = |f: &str| e.map.get(f).and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
    let outcome = s("outcome").filter(|o| !o.is_empty())?;
    let finished_at = s("finished_at").and_then(|v| v.parse::<i64>().ok()).and_then(from_millis);
    let flat: Vec<String> = serde_json::from_str(&s("batch")?).ok()?;
    if flat.is_empty() || flat.len() % 6 != 0 {
        return None;
    }
    let some = |v: &str| (!v.is_empty()).then(|| v.to_owned());
    flat.chunks_exact(6)
        .map(|a| {
            Some(Event {
                queue: queue.clone(),
                entry: e.id.clone(),
                job_id: a[0].parse().ok()?,
                run: a[1].parse().ok()?,
                attempt: a[2].parse().ok()?,
                outcome: outcome.clone(),
                kind: storable(a[3].clone()),
                started_at: a[4].parse::<i64>().ok().and_then(from_millis),
                finished_at,
                worker: some(&a[5]).map(storable),
                error: None,
                reason: None,
                envelope: None,
            })
        })
        .collect()
}

/// What [`Broker::ensure_recorder_groups`] found.
#[derive(Debug, Default)]
pub struct RecorderQueues {
    /// Queues whose outbox the recorder reads.
    pub readable: Vec<QueueName>,
    /// Queues whose outbox Redis refuses for good, with the error.
    pub refused: Vec<(QueueName, crate::Error)>,
}

impl Broker {
    /// Creates the recorder group on each queue's outbox (idempotent); returns the queues whose
    /// outbox can be read, and those whose outbox Redis refuses for good (a key of another type
    /// in its place, written by something other than jobq) with the error, so that one bad key
    /// does not stop the history of every queue. An outage is an error.
    pub async fn ensure_recorder_groups(&self, queues: &[QueueName]) -> Result<RecorderQueues> {
        let mut conn = self.connection();
        let mut out = RecorderQueues::default();
        for q in queues {
            match create_group(&mut conn, &self.keys.events(q), Keys::RECORDER_GROUP).await {
                Ok(()) => out.readable.push(q.clone()),
                Err(e) if e.is_transient_redis() => return Err(e),
                Err(e) => out.refused.push((q.clone(), e)),
            }
        }
        Ok(out)
    }

    /// Reads new events of all `queues` for `consumer`, blocking up to `block` on `conn`.
    pub async fn read_events(
        &self,
        conn: &mut MultiplexedConnection,
        consumer: &str,
        queues: &[QueueName],
        count: usize,
        block: Duration,
    ) -> Result<EventBatch> {
        let mut batch = EventBatch::default();
        if queues.is_empty() {
            tokio::time::sleep(block).await;
            return Ok(batch);
        }
        let by_key: HashMap<String, &QueueName> = queues.iter().map(|q| (self.keys.events(q), q)).collect();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(Keys::RECORDER_GROUP).arg(consumer).arg("COUNT").arg(count);
        cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64).arg("STREAMS");
        for q in queues {
            cmd.arg(self.keys.events(q));
        }
        for _ in queues {
            cmd.arg(">");
        }
        let reply: Value = cmd.query_async(conn).await?;
        if matches!(reply, Value::Nil) {
            return Ok(batch);
        }
        let reply: StreamReadReply = redis::from_redis_value(reply).map_err(protocol)?;
        for key in reply.keys {
            let Some(queue) = by_key.get(&key.key) else { continue };
            for e in key.ids {
                batch.push(queue, e);
            }
        }
        Ok(batch)
    }

    /// Takes over events of `queue` pending longer than `min_idle` on any recorder (a crashed
    /// one, or this process before a restart), up to `count`.
    pub async fn claim_events(
        &self,
        consumer: &str,
        queue: &QueueName,
        min_idle: Duration,
        count: usize,
    ) -> Result<EventBatch> {
        let mut conn = self.connection();
        let mut batch = EventBatch::default();
        let mut cursor = "0-0".to_owned();
        loop {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(self.keys.events(queue))
                .arg(Keys::RECORDER_GROUP)
                .arg(consumer)
                .arg(min_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(count)
                .query_async(&mut conn)
                .await?;
            if !reply.deleted_ids.is_empty() {
                tracing::error!(queue.name = %queue, count = reply.deleted_ids.len(), "outbox entries were deleted while pending; their history is lost");
            }
            for e in reply.claimed {
                batch.push(queue, e);
            }
            cursor = reply.next_stream_id;
            if cursor == "0-0" || batch.len() >= count {
                break;
            }
        }
        Ok(batch)
    }

    /// Outbox entries not yet written to Postgres over `queues`, and the age in ms of the oldest.
    pub async fn outbox_backlog(&self, queues: &[QueueName]) -> Result<(u64, i64)> {
        let mut pipe = redis::pipe();
        for q in queues {
            pipe.cmd("XLEN").arg(self.keys.events(q));
            pipe.cmd("XRANGE").arg(self.keys.events(q)).arg("-").arg("+").arg("COUNT").arg(1);
        }
        pipe.cmd("TIME");
        let mut replies: Vec<Value> = pipe.query_async(&mut self.connection()).await?;
        let time: (String, String) = redis::from_redis_value(replies.pop().unwrap_or(Value::Nil)).map_err(protocol)?;
        let now = time.0.parse::<i64>().unwrap_or(0) * 1000 + time.1.parse::<i64>().unwrap_or(0) / 1000;
        let (mut total, mut oldest) = (0u64, None::<i64>);
        for pair in replies.chunks(2) {
            total += redis::from_redis_value::<u64>(pair[0].clone()).unwrap_or(0);
            let first: Vec<(String, Value)> = redis::from_redis_value(pair[1].clone()).unwrap_or_default();
            if let Some(ms) = first.first().and_then(|(id, _)| id.split('-').next()?.parse::<i64>().ok()) {
                oldest = Some(oldest.map_or(ms, |o| o.min(ms)));
            }
        }
        Ok((total, oldest.map(|o| (now - o).max(0)).unwrap_or(0)))
    }

    /// Acks and deletes written events (one pipeline).
    pub async fn ack_events(&self, entries: &[(QueueName, String)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut by_queue: BTreeMap<&QueueName, Vec<&str>> = BTreeMap::new();
        for (q, e) in entries {
            by_queue.entry(q).or_default().push(e);
        }
        for ids in by_queue.values_mut() {
            ids.sort_unstable();
            ids.dedup();
        }
        let mut pipe = redis::pipe();
        for (q, ids) in by_queue {
            let key = self.keys.events(q);
            pipe.cmd("XACK").arg(&key).arg(Keys::RECORDER_GROUP).arg(&ids).ignore();
            pipe.cmd("XDEL").arg(&key).arg(&ids).ignore();
        }
        let mut conn = self.connection();
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }
}
