//! Crash points for fault-injection tests.
//!
//! `JOBQ_FAULTS=cron.claimed=0.2,cron.enqueued=0.2` makes the process abort at the named points
//! with the given probability, the way a `kill -9` at the worst moment would end it. Without the
//! variable (as in production) a point costs one check of an empty list.
//!
//! Points: `cron.claimed` (a scheduler holds a due schedule's row lock and has enqueued nothing
//! yet), `cron.enqueued` (the tick's job is in Redis, the claim is not committed).

use std::sync::OnceLock;

/// Aborts the process with the probability `JOBQ_FAULTS` gives `name`, if any.
pub fn point(name: &str) {
    static FAULTS: OnceLock<Vec<(String, f64)>> = OnceLock::new();
    let faults = FAULTS.get_or_init(|| std::env::var("JOBQ_FAULTS").map(|v| parse(&v)).unwrap_or_default());
    if let Some((_, p)) = faults.iter().find(|(n, _)| n == name) {
        if rand::random::<f64>() < *p {
            eprintln!("jobq fault injected at {name}: aborting");
            std::process::abort();
        }
    }
}

/// `name=probability` pairs; malformed entries are ignored (this is a test hook).
fn parse(spec: &str) -> Vec<(String, f64)> {
    spec.split(',')
        .filter_map(|kv| {
            let (name, p) = kv.split_once('=')?;
            Some((name.trim().to_owned(), p.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_points_and_probabilities() {
        assert_eq!(
            super::parse("cron.claimed=0.5, cron.enqueued=1,bad,x=y"),
            vec![("cron.claimed".to_owned(), 0.5), ("cron.enqueued".to_owned(), 1.0)]
        );
        super::point("cron.claimed"); // unset in tests: never aborts
    }
}
