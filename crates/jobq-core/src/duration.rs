//! Human-readable durations (`"30s"`, `"5m"`, `"1h 30m"`) in settings and in the REST API.

use std::time::Duration;

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h30m"`; a bare number is milliseconds.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(Duration::from_millis(ms));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration `{s}`: {e} (examples: 500ms, 30s, 5m, 1h)"))
}

/// Like [`parse`], but a number other than 0 needs a unit (`3600` is refused rather than read
/// as 3.6 seconds): for durations typed by a person, who cannot be expected to know the
/// default unit.
pub fn parse_with_unit(s: &str) -> Result<Duration, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Ok(Duration::ZERO),
        Ok(n) => Err(format!("duration `{n}` has no unit: write {n}ms, {n}s or {n}m (only 0 may go without one)")),
        Err(_) => parse(s),
    }
}

/// Formats a duration the way [`parse`] reads it.
pub fn format(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// OpenAPI schema of a duration field: a human-readable string or integer milliseconds
/// (`#[schema(schema_with = jobq_core::duration::schema)]`).
#[cfg(feature = "openapi")]
pub fn schema() -> utoipa::openapi::schema::Schema {
    utoipa::openapi::schema::Schema::OneOf(one_of().build())
}

#[cfg(feature = "openapi")]
fn one_of() -> utoipa::openapi::schema::OneOfBuilder {
    use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Type};
    OneOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^\s*[0-9]+\s*[A-Za-zµ]*(\s*[0-9]+\s*[A-Za-zµ]+)*\s*$"))
                .examples([serde_json::json!("30s")]),
        )
        .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)).description(Some("milliseconds")))
        .description(Some("`\"500ms\"`, `\"30s\"`, `\"5m\"`, `\"1h 30m\"`, or integer milliseconds"))
}

/// Like [`schema`], for optional fields (null allowed).
#[cfg(feature = "openapi")]
pub fn schema_opt() -> utoipa::openapi::schema::Schema {
    use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
    Schema::OneOf(one_of().item(ObjectBuilder::new().schema_type(Type::Null)).build())
}

/// `#[serde(with = "jobq_core::duration::serde_human")]` for `Duration` fields.
pub mod serde_human {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    /// Writes the duration as a human-readable string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    /// Reads a string (`"30s"`) or an integer number of milliseconds. A visitor rather than an
    /// untagged enum: every envelope holds two durations, and an untagged enum buffers the value
    /// and builds (then drops) an error for each variant that does not match.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(Human)
    }

    struct Human;

    impl serde::de::Visitor<'_> for Human {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration such as \"30s\" or an integer number of milliseconds")
        }

        fn visit_u64<E: serde::de::Error>(self, ms: u64) -> Result<Duration, E> {
            Ok(Duration::from_millis(ms))
        }

        fn visit_i64<E: serde::de::Error>(self, ms: i64) -> Result<Duration, E> {
            u64::try_from(ms)
                .map(Duration::from_millis)
                .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(ms), &self))
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            super::parse(text).map_err(E::custom)
        }
    }
}

/// `#[serde(with = "jobq_core::duration::serde_setting")]` for `Duration` settings: like
/// [`serde_human`], but a value other than 0 needs a unit. `JOBQ_JOBS_TIMEOUT=600` is refused
/// rather than read as 600 milliseconds, since a reader of the variable cannot tell which unit
/// was meant.
pub mod serde_setting {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    /// Writes the duration as a human-readable string.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        super::serde_human::serialize(d, s)
    }

    /// Reads a string with a unit (`"30s"`), or 0.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(Setting)
    }

    struct Setting;

    fn unitless<E: serde::de::Error>(n: impl std::fmt::Display) -> E {
        E::custom(format!("duration `{n}` has no unit: write {n}ms, {n}s or {n}m (only 0 may go without one)"))
    }

    impl serde::de::Visitor<'_> for Setting {
        type Value = Duration;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a duration with a unit, such as \"30s\", \"500ms\" or \"5m\"")
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Duration, E> {
            if n == 0 {
                Ok(Duration::ZERO)
            } else {
                Err(unitless(n))
            }
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Duration, E> {
            if n == 0 {
                Ok(Duration::ZERO)
            } else {
                Err(unitless(n))
            }
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
            match text.trim().parse::<u64>() {
                Ok(n) => self.visit_u64(n),
                Err(_) => super::parse(text).map_err(E::custom),
            }
        }
    }
}

/// Like [`serde_human`], for `Option<Duration>`.
pub mod serde_human_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes `None` as null.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serde_human::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    /// Reads null, a string or milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super::serde_human")] Duration);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_typed_by_a_person_needs_a_unit() {
        assert_eq!(parse_with_unit("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_with_unit(" 0 ").unwrap(), Duration::ZERO);
        assert!(parse_with_unit("3600").unwrap_err().contains("no unit"));
        assert!(parse_with_unit("soon").is_err());
    }

    #[test]
    fn parses_units_and_bare_milliseconds() {
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("250").unwrap(), Duration::from_millis(250));
        assert!(parse("soon").unwrap_err().contains("soon"));
    }

    #[derive(serde::Deserialize, Debug)]
    struct Holder {
        #[serde(with = "serde_human")]
        d: Duration,
    }

    #[test]
    fn serde_reads_text_or_milliseconds_and_names_what_it_expects() {
        let read = |json: &str| serde_json::from_str::<Holder>(json).map(|h| h.d).map_err(|e| e.to_string());
        assert_eq!(read(r#"{"d":"1h 30m"}"#), Ok(Duration::from_secs(5400)));
        assert_eq!(read(r#"{"d":1500}"#), Ok(Duration::from_millis(1500)));
        assert!(read(r#"{"d":-1}"#).unwrap_err().contains("integer number of milliseconds"));
        assert!(read(r#"{"d":true}"#).unwrap_err().contains("a duration such as"));
        assert!(read(r#"{"d":"soon"}"#).unwrap_err().contains("soon"));
        assert!(read(r#"{"d":1.5}"#).is_err());
    }
}
