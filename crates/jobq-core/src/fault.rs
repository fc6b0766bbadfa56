//! Crash points for fault-injection tests.
//!
//! `JOBQ_FAULTS=cron.claimed=0.2,cron.enqueued=0.2` makes the process abort at the named points
//! with the given probability, the way a `kill -9` at the worst moment would end it;
//! `cron.claimed=stop` stops it there (SIGSTOP, each time), the way a frozen VM or container
//! would, until it gets SIGCONT. Without the variable (as in production) a point costs one
//! check of an empty list.
//!
//! Points: `cron.claimed` (a scheduler holds a due schedule's row lock and has enqueued nothing
//! yet), `cron.checked` (its claim's session has just answered, right before the enqueue),
//! `cron.enqueued` (the tick's job is in Redis, the claim is not committed).

use std::sync::OnceLock;

/// Aborts the process with the probability `JOBQ_FAULTS` gives `name`, if any (or stops it).
pub fn point(name: &str) {
    static FAULTS: OnceLock<Vec<(String, f64)>> = OnceLock::new();
    let faults = FAULTS.get_or_init(|| std::env::var("JOBQ_FAULTS").map(|v| parse(&v)).unwrap_or_default());
    if let Some((_, p)) = faults.iter().find(|(n, _)| n == name) {
        if *p == STOP {
            eprintln!("jobq fault injected at {name}: stopping (SIGSTOP)");
            let _ = std::process::Command::new("kill").arg("-STOP").arg(std::process::id().to_string()).status();
        } else if rand::random::<f64>() < *p {
            eprintln!("jobq fault injected at {name}: aborting");
            std::process::abort();
        }
    }
}

/// The probability that stands for `stop`.
const STOP: f64 = -1.0;

/// `name=probability` (or `name=stop`) pairs; malformed entries are ignored (this is a test hook).
fn parse(spec: &str) -> Vec<(String, f64)> {
    spec.split(',')
        .filter_map(|kv| {
            let (name, p) = kv.split_once('=')?;
            let p = if p.trim() == "stop" { STOP } else { p.trim().parse().ok()? };
            Some((name.trim().to_owned(), p))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_points_and_probabilities() {
        assert_eq!(
            super::parse("cron.claimed=0.5, cron.enqueued=1,bad,x=y,z=stop"),
            vec![("cron.claimed".to_owned(), 0.5), ("cron.enqueued".to_owned(), 1.0), ("z".to_owned(), super::STOP)]
        );
        super::point("cron.claimed"); // unset in tests: never aborts
    }
}
