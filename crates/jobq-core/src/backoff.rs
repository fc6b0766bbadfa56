//! Retry delays: a strategy (exponential, linear, constant) with a base and a cap, plus jitter
//! (none, full, equal, decorrelated) so failing jobs do not retry in lock-step.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// How the delay grows with the attempt number.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// `base * 2^(attempt-1)`.
    #[default]
    Exponential,
    /// `base * attempt`.
    Linear,
    /// `base`.
    Constant,
}

/// How randomness is applied to the computed delay `d` (AWS architecture blog's names).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    /// Exactly `d`.
    None,
    /// Uniform in `[0, d]`.
    Full,
    /// Uniform in `[d/2, d]`.
    #[default]
    Equal,
    /// Uniform in `[base, 3 * previous]`, capped.
    Decorrelated,
}

/// A retry policy. `{"strategy": "exponential", "base": "1s", "max": "1h", "jitter": "equal"}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    /// Growth.
    #[serde(default)]
    pub strategy: Strategy,
    /// Randomness.
    #[serde(default)]
    pub jitter: Jitter,
    /// First delay.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::duration::schema))]
    #[serde(with = "crate::duration::serde_human", default = "default_base")]
    pub base: Duration,
    /// Cap on any delay.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::duration::schema))]
    #[serde(with = "crate::duration::serde_human", default = "default_max")]
    pub max: Duration,
}

fn default_base() -> Duration {
    Duration::from_secs(1)
}

fn default_max() -> Duration {
    Duration::from_secs(3600)
}

impl Default for Backoff {
    fn default() -> Self {
        Self { strategy: Strategy::Exponential, jitter: Jitter::Equal, base: default_base(), max: default_max() }
    }
}

impl Backoff {
    /// Checks base and cap; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max < self.base {
            return Err(format!(
                "`backoff.max` ({}) must not be below `backoff.base` ({})",
                crate::duration::format(self.max),
                crate::duration::format(self.base)
            ));
        }
        if self.max > Duration::from_secs(30 * 24 * 3600) {
            return Err("`backoff.max` must be at most 30 days".into());
        }
        Ok(())
    }

    /// The delay before the retry that follows failed attempt `attempt` (1-based), without jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let n = attempt.max(1);
        let d = match self.strategy {
            Strategy::Constant => self.base,
            Strategy::Linear => self.base.saturating_mul(n),
            Strategy::Exponential => self.base.saturating_mul(2u32.saturating_pow((n - 1).min(31))),
        };
        d.min(self.max)
    }

    /// The delay before the retry after failed attempt `attempt`, with jitter. `previous` is the
    /// delay used before the previous retry (only decorrelated jitter reads it).
    pub fn delay(&self, attempt: u32, previous: Option<Duration>, rng: &mut impl Rng) -> Duration {
        let d = self.nominal(attempt);
        let between = |rng: &mut dyn rand::RngCore, lo: Duration, hi: Duration| {
            if hi <= lo {
                lo
            } else {
                Duration::from_nanos(rng.random_range(lo.as_nanos() as u64..=hi.as_nanos() as u64))
            }
        };
        match self.jitter {
            Jitter::None => d,
            Jitter::Full => between(rng, Duration::ZERO, d),
            Jitter::Equal => between(rng, d / 2, d),
            Jitter::Decorrelated => {
                let prev = previous.unwrap_or(self.base).max(self.base);
                between(rng, self.base, prev.saturating_mul(3).min(self.max)).min(self.max)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(strategy: Strategy, jitter: Jitter) -> Backoff {
        Backoff { strategy, jitter, base: Duration::from_millis(100), max: Duration::from_secs(10) }
    }

    #[test]
    fn nominal_delays_follow_the_strategy_and_stop_at_the_cap() {
        let exp = policy(Strategy::Exponential, Jitter::None);
        let got: Vec<_> = (1..=5).map(|a| exp.nominal(a).as_millis()).collect();
        assert_eq!(got, [100, 200, 400, 800, 1600]);
        assert_eq!(exp.nominal(40), Duration::from_secs(10));
        assert_eq!(exp.nominal(u32::MAX), Duration::from_secs(10));
        let lin = policy(Strategy::Linear, Jitter::None);
        assert_eq!(lin.nominal(3), Duration::from_millis(300));
        let con = policy(Strategy::Constant, Jitter::None);
        assert_eq!(con.nominal(9), Duration::from_millis(100));
    }

    #[test]
    fn jittered_delays_stay_within_their_bounds() {
        let mut rng = rand::rng();
        for strategy in [Strategy::Exponential, Strategy::Linear, Strategy::Constant] {
            for jitter in [Jitter::None, Jitter::Full, Jitter::Equal, Jitter::Decorrelated] {
                let b = policy(strategy, jitter);
                let mut prev = None;
                for attempt in 1..=60 {
                    let d = b.delay(attempt, prev, &mut rng);
                    let nominal = b.nominal(attempt);
                    assert!(d <= b.max, "{b:?} attempt {attempt}: {d:?} above cap");
                    match jitter {
                        Jitter::None => assert_eq!(d, nominal),
                        Jitter::Full => assert!(d <= nominal),
                        Jitter::Equal => assert!(d >= nominal / 2 && d <= nominal),
                        Jitter::Decorrelated => assert!(d >= b.base),
                    }
                    prev = Some(d);
                }
            }
        }
    }

    fn strategies() -> impl proptest::strategy::Strategy<Value = Strategy> {
        proptest::prop_oneof![
            proptest::strategy::Just(Strategy::Exponential),
            proptest::strategy::Just(Strategy::Linear),
            proptest::strategy::Just(Strategy::Constant)
        ]
    }

    fn jitters() -> impl proptest::strategy::Strategy<Value = Jitter> {
        proptest::prop_oneof![
            proptest::strategy::Just(Jitter::None),
            proptest::strategy::Just(Jitter::Full),
            proptest::strategy::Just(Jitter::Equal),
            proptest::strategy::Just(Jitter::Decorrelated)
        ]
    }

    proptest::proptest! {
        #[test]
        fn every_delay_is_within_the_policy_bounds(
            strategy in strategies(),
            jitter in jitters(),
            base_ms in 1u64..60_000,
            extra_ms in 0u64..86_400_000,
            attempt in 1u32..10_000,
            previous_ms in proptest::option::of(0u64..86_400_000),
            seed in proptest::prelude::any::<u64>(),
        ) {
            use rand::SeedableRng;
            let b = Backoff {
                strategy,
                jitter,
                base: Duration::from_millis(base_ms),
                max: Duration::from_millis(base_ms + extra_ms),
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let d = b.delay(attempt, previous_ms.map(Duration::from_millis), &mut rng);
            let nominal = b.nominal(attempt);
            proptest::prop_assert!(d <= b.max);
            proptest::prop_assert!(nominal >= b.base.min(b.max) && nominal <= b.max);
            match jitter {
                Jitter::None => proptest::prop_assert_eq!(d, nominal),
                Jitter::Full => proptest::prop_assert!(d <= nominal),
                Jitter::Equal => proptest::prop_assert!(d >= nominal / 2 && d <= nominal),
                Jitter::Decorrelated => proptest::prop_assert!(d >= b.base),
            }
            // Growth never shrinks the nominal delay.
            proptest::prop_assert!(b.nominal(attempt + 1) >= nominal);
        }
    }

    #[test]
    fn backoff_json_uses_human_durations_and_rejects_unknown_fields() {
        let b: Backoff = serde_json::from_str(r#"{"strategy":"linear","base":"2s","max":"1m"}"#).unwrap();
        assert_eq!(b.strategy, Strategy::Linear);
        assert_eq!(b.jitter, Jitter::Equal);
        assert_eq!(b.base, Duration::from_secs(2));
        assert!(serde_json::from_str::<Backoff>(r#"{"factor":3}"#).is_err());
        let bad = Backoff { base: Duration::from_secs(5), max: Duration::from_secs(1), ..Backoff::default() };
        assert!(bad.validate().unwrap_err().contains("backoff.max"));
    }
}
