//! Shutdown signals. Every long-running loop takes a [`CancellationToken`] and stops when it is
//! cancelled; binaries cancel it on the first SIGTERM/SIGINT and exit at once on the second.

pub use tokio_util::sync::CancellationToken;

/// Resolves on SIGINT (Ctrl+C) or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

/// Cancels `token` on the first signal; on a second signal exits the process at once (code 130).
pub async fn cancel_on_signal(token: CancellationToken) {
    signal().await;
    tracing::info!("shutdown requested; finishing in-flight work (send the signal again to exit at once)");
    token.cancel();
    signal().await;
    tracing::warn!("second signal: exiting now; unfinished jobs stay pending and will be reclaimed");
    std::process::exit(130);
}

/// A token cancelled by signals, with the signal watcher running in the background: on a
/// thread of its own with a one-thread runtime, so that a signal is handled (and a second one
/// exits) also while tasks that do not yield hold every thread of the caller's runtime. Called
/// from within a runtime; if the watcher's thread cannot be started, it runs as a task there.
pub fn token_from_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    let watcher = tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|rt| {
        std::thread::Builder::new().name("jobq-signals".into()).spawn(move || rt.block_on(cancel_on_signal(t)))
    });
    if let Err(e) = watcher {
        tracing::warn!(error = %e, "cannot start the signal thread; signals are handled on the runtime");
        tokio::spawn(cancel_on_signal(token.clone()));
    }
    token
}
