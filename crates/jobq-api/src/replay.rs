//! DLQ retries by filter, replayed in the background at `JOBQ_API_DLQ_REPLAY_RATE` jobs per
//! second with their progress in their audit entry. A replay whose API process stopped mid-way
//! goes silent; any API process (the same one restarted, or another replica) takes it over and
//! retries the jobs that match its filter and were dead when it began.

use std::time::Duration;

use jobq_core::job::JobId;
use jobq_core::store::Replay;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// A running replay writes its progress (and so that it is alive) at least this often.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// A replay silent for this long is taken over.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// How often an API process looks for silent replays.
const LOOK_EVERY: Duration = Duration::from_secs(10);

/// Retries the dead jobs `ids` for `replay`, in a task of its own.
pub(crate) fn spawn(state: AppState, replay: Replay, ids: Vec<JobId>) {
    tokio::spawn(run(state, replay, ids));
}

async fn run(state: AppState, mut replay: Replay, ids: Vec<JobId>) {
    let rate = state.dlq_replay_rate.max(1);
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    // After a stall (Postgres slow or down), go on at the rate instead of catching up on the
    // ticks missed in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = tokio::time::Instant::now();
    for id in ids {
        tick.tick().await;
        match state.store.retry_dead_matching(&state.broker, id, &replay.filter, replay.upto).await {
            Ok(_) => replay.retried += 1,
            Err(jobq_core::Error::Conflict(_) | jobq_core::Error::JobNotFound(_)) => replay.skipped += 1,
            Err(e) => {
                replay.failed += 1;
                tracing::warn!(job.id = %id, error = %e, "DLQ replay of one job failed; it stays in the DLQ");
            }
        }
        if reported.elapsed() >= REPORT_EVERY {
            reported = tokio::time::Instant::now();
            match state.store.replay_progress(&replay, false).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        audit_id = replay.audit_id,
                        "another API process took this DLQ replay over; stopping"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(audit_id = replay.audit_id, error = %e, "could not record a DLQ replay's progress")
                }
            }
        }
    }
    let mut wait = Duration::from_millis(500);
    for _ in 0..6 {
        match state.store.replay_progress(&replay, true).await {
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(audit_id = replay.audit_id, error = %e, "could not record the end of a DLQ replay; retrying")
            }
        }
        tokio::time::sleep(wait).await;
        wait *= 2;
    }
    tracing::warn!(audit_id = replay.audit_id, "the end of a DLQ replay is not recorded; it is taken over once silent");
}

/// Takes over every replay silent for `stale` and goes on with the jobs of its selection that
/// still match its filter and were dead when it began. Returns how many it took over.
pub async fn take_over(state: &AppState, stale: Duration) -> jobq_core::Result<usize> {
    let mut n = 0;
    while let Some(replay) = state.store.claim_stale_replay(stale).await? {
        // Its selection's bound, not what its counts say is left: jobs retried after its last
        // report, or by someone else, are gone from the DLQ and must not make room for others.
        // Rows recorded after it began are not of its selection, even dead before its bound (a
        // recorder catching up).
        let ids = match replay.upto {
            Some(upto) => {
                state.store.dead_selection(&replay.filter, Some(upto), replay.began, replay.of.max(0)).await?
            }
            None => state.store.dead_selection(&replay.filter, None, None, replay.left()).await?,
        };
        let ids: Vec<JobId> = ids.into_iter().map(|(_, id)| id).collect();
        metrics::counter!("jobq_api_dlq_replays_taken_over_total").increment(1);
        tracing::warn!(audit_id = replay.audit_id, left = ids.len(), "taking over an interrupted DLQ replay");
        spawn(state.clone(), replay, ids);
        n += 1;
    }
    Ok(n)
}

/// Runs [`take_over`] every few seconds until shutdown.
pub(crate) async fn take_over_loop(state: AppState, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(LOOK_EVERY) => {}
        }
        if let Err(e) = take_over(&state, STALE_AFTER).await {
            tracing::warn!(error = %e, "could not look for interrupted DLQ replays");
        }
    }
}
