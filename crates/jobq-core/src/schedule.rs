//! Cron schedules: parsing (the `cron` crate's 6/7-field syntax with seconds, the common 5-field
//! crontab form, `@hourly`-style aliases), IANA time zones, and tick computation across DST.
//!
//! Ticks are wall-clock times in the schedule's zone, computed from the expression (never
//! from sleeping intervals, so drift does not accumulate). A local time that does not exist
//! (spring forward) fires once at the end of the gap. A local time that occurs twice (fall
//! back) fires once, at its first occurrence, when the expression names its hours (`30 1 * * *`);
//! an expression with a wildcard hour (`*/15 * * * *`, `@hourly`) keeps its rhythm in real time
//! and fires in both occurrences of the repeated hour, as cron does.
//!
//! ```
//! use jobq_core::schedule::CronSchedule;
//! let s = CronSchedule::parse("30 2 * * *", "America/New_York").unwrap();
//! let after = "2026-03-07T12:00:00Z".parse().unwrap();
//! let next: Vec<String> = s.upcoming(after).take(2).map(|t| t.to_rfc3339()).collect();
//! // 02:30 EST, then the spring-forward day: 02:30 does not exist, it fires at 03:00 EDT.
//! assert_eq!(next, ["2026-03-08T07:00:00+00:00", "2026-03-09T06:30:00+00:00"]);
//! ```

use std::collections::BTreeMap;
use std::str::FromStr;

use chrono::{DateTime, Duration, LocalResult, NaiveDateTime, TimeZone, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

use crate::backoff::Backoff;
use crate::error::{Error, Result};
use crate::job::{NewJob, Priority, QueueName};

/// A parsed cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expr: String,
    schedule: cron::Schedule,
    /// A crontab expression restricting both the day of the month and the day of the week
    /// fires when either matches (the `cron` crate wants both): `schedule` takes the day of
    /// the month, this one the day of the week, and the ticks are those of either.
    or_weekday: Option<cron::Schedule>,
    tz: Tz,
    /// The hour field is a wildcard: the schedule fires in both occurrences of a repeated hour.
    every_hour: bool,
}

/// Prefix of the unique key of each job a schedule's tick enqueues (`cron:<name>:<tick ms>`),
/// which makes the tick fire once; the API refuses it in callers' keys.
pub const CRON_KEY_PREFIX: &str = "cron:";

const DAY_NAMES: [&str; 8] = ["SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"];

/// Turns a 5-field crontab day-of-week (0-7, Sunday = 0 or 7) into day names.
fn crontab_days(field: &str) -> std::result::Result<String, String> {
    if field == "*" || field == "?" {
        return Ok(field.to_owned());
    }
    let mut days = Vec::new();
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<usize>().map_err(|_| format!("bad step in `{part}`"))?),
            None => (part, 1),
        };
        if step == 0 {
            return Err(format!("bad step in `{part}`"));
        }
        let num = |s: &str| -> std::result::Result<usize, String> {
            if let Ok(n) = s.parse::<usize>() {
                return if n <= 7 { Ok(n) } else { Err(format!("day of week `{n}` is out of range 0-7")) };
            }
            DAY_NAMES.iter().position(|d| d.eq_ignore_ascii_case(s)).ok_or_else(|| format!("unknown day of week `{s}`"))
        };
        let (lo, hi) = match range {
            "*" => (0, 6),
            r => match r.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None if step > 1 => (num(r)?, 6),
                None => (num(r)?, num(r)?),
            },
        };
        if lo > hi {
            return Err(format!("day-of-week range `{range}` runs backwards"));
        }
        for d in (lo..=hi).step_by(step) {
            let name = DAY_NAMES[d];
            if !days.contains(&name) {
                days.push(name);
            }
        }
    }
    Ok(days.join(","))
}

/// Normalizes the accepted forms into the `cron` crate's syntax: one expression, or two whose
/// ticks together are the expression's (see [`CronSchedule::or_weekday`]).
fn normalize(expr: &str) -> std::result::Result<(String, Option<String>), String> {
    let e = expr.trim();
    let alias = match e.to_ascii_lowercase().as_str() {
        "@yearly" | "@annually" => Some("0 0 0 1 1 *"),
        "@monthly" => Some("0 0 0 1 * *"),
        "@weekly" => Some("0 0 0 * * SUN"),
        "@daily" | "@midnight" => Some("0 0 0 * * *"),
        "@hourly" => Some("0 0 * * * *"),
        _ => None,
    };
    if let Some(a) = alias {
        return Ok((a.to_owned(), None));
    }
    if e.starts_with('@') {
        return Err(format!("unknown alias `{e}` (use @yearly, @monthly, @weekly, @daily or @hourly)"));
    }
    let fields: Vec<&str> = e.split_whitespace().collect();
    match fields.len() {
        5 => {
            let (m, h, dom, month) = (fields[0], fields[1], fields[2], fields[3]);
            let dow = crontab_days(fields[4])?;
            let any = |f: &str| f == "*" || f == "?";
            if any(dom) || any(&dow) {
                Ok((format!("0 {m} {h} {dom} {month} {dow}"), None))
            } else {
                Ok((format!("0 {m} {h} {dom} {month} *"), Some(format!("0 {m} {h} * {month} {dow}"))))
            }
        }
        6 | 7 => Ok((fields.join(" "), None)),
        n => Err(format!("expected 5 fields (crontab), 6 or 7 (with seconds and year), got {n}")),
    }
}

/// The `cron` crate's message, its upper bounds worded as what they are: the crate says `Hours
/// must be less than 23.` for a bound that allows 23.
fn crate_message(m: &str) -> String {
    m.replace(" must be less than ", " must be at most ")
}

/// Parses an IANA time zone name (`Europe/Berlin`, `UTC`).
pub fn parse_tz(name: &str) -> Result<Tz> {
    Tz::from_str(name).map_err(|_| {
        Error::Invalid(format!("`timezone`: unknown time zone `{name}` (use an IANA name such as Europe/Berlin)"))
    })
}

impl CronSchedule {
    /// Parses `expr` in zone `tz`; errors name the field (`cron` or `timezone`).
    pub fn parse(expr: &str, tz: &str) -> Result<Self> {
        let tz = parse_tz(tz)?;
        let invalid = |e: &dyn std::fmt::Display| {
            Error::Invalid(format!("`cron`: invalid expression `{expr}`: {}", crate_message(&e.to_string())))
        };
        let (normalized, weekday) = normalize(expr).map_err(|e| invalid(&e))?;
        let schedule = cron::Schedule::from_str(&normalized).map_err(|e| invalid(&e))?;
        let or_weekday = weekday.map(|w| cron::Schedule::from_str(&w)).transpose().map_err(|e| invalid(&e))?;
        if schedule.upcoming(Utc).next().is_none()
            && or_weekday.as_ref().is_none_or(|w| w.upcoming(Utc).next().is_none())
        {
            return Err(Error::Invalid(format!("`cron`: expression `{expr}` never fires")));
        }
        let every_hour = normalized.split_whitespace().nth(2).is_some_and(|h| h.contains('*'));
        Ok(Self { expr: expr.trim().to_owned(), schedule, or_weekday, tz, every_hour })
    }

    /// The expression as given.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The zone.
    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The first tick strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.upcoming(after).next()
    }

    /// Ticks strictly after `after`, in order.
    pub fn upcoming(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        // Evaluate the expression on naive wall-clock time (UTC stands in for "local"), then map
        // each local time to an instant in the zone, keeping ticks strictly after `after` and
        // increasing (a repeated local hour maps to its first occurrence, already past, unless
        // the hour is a wildcard: then the fold's ticks come in their first occurrences, then in
        // their second ones).
        let mut local_after = after.with_timezone(&self.tz).naive_local() - Duration::seconds(1);
        if self.every_hour && matches!(self.tz.from_local_datetime(&local_after), LocalResult::Ambiguous(..)) {
            // `after` is inside a fold: start before it, so that the second occurrences of the
            // fold's earlier ticks still come (the ones not after `after` are dropped below).
            local_after -= Duration::hours(3);
        }
        let start = Utc.from_utc_datetime(&local_after);
        let mut days = self.schedule.after(&start).map(|t| t.naive_utc()).peekable();
        let mut weekdays = self.or_weekday.as_ref().map(|w| w.after(&start).map(|t| t.naive_utc()).peekable());
        // The local times of either schedule, in order, once each.
        let mut local = std::iter::from_fn(move || {
            let Some(w) = weekdays.as_mut() else { return days.next() };
            match (days.peek(), w.peek()) {
                (Some(d), Some(x)) if d == x => {
                    w.next();
                    days.next()
                }
                (Some(d), Some(x)) if x < d => w.next(),
                (Some(_), _) => days.next(),
                (None, _) => w.next(),
            }
        })
        .peekable();
        let mut fold: std::collections::VecDeque<DateTime<Utc>> = std::collections::VecDeque::new();
        let mut last = after;
        std::iter::from_fn(move || loop {
            let t = match fold.pop_front() {
                Some(t) => t,
                None => {
                    let naive = local.next()?;
                    match self.tz.from_local_datetime(&naive) {
                        LocalResult::Ambiguous(first, second) if self.every_hour => {
                            let mut again = vec![second.with_timezone(&Utc)];
                            fold.push_back(first.with_timezone(&Utc));
                            while let Some(LocalResult::Ambiguous(first, second)) =
                                local.peek().map(|n| self.tz.from_local_datetime(n))
                            {
                                fold.push_back(first.with_timezone(&Utc));
                                again.push(second.with_timezone(&Utc));
                                local.next();
                            }
                            fold.extend(again);
                            continue;
                        }
                        _ => match self.instant(naive) {
                            Some(t) => t,
                            None => continue,
                        },
                    }
                }
            };
            if t > last {
                last = t;
                return Some(t);
            }
        })
    }

    /// The instant of local time `naive`: the first occurrence when it repeats, the end of the
    /// gap when it does not exist.
    fn instant(&self, naive: NaiveDateTime) -> Option<DateTime<Utc>> {
        match self.tz.from_local_datetime(&naive) {
            LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
            LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
            LocalResult::None => {
                // Find the transition: the first instant whose local time is past `naive`.
                let before = self.tz.from_local_datetime(&(naive - Duration::hours(3))).earliest()?.with_timezone(&Utc);
                let (mut lo, mut hi) = (before, before + Duration::hours(6));
                while hi - lo > Duration::seconds(1) {
                    let mid = lo + (hi - lo) / 2;
                    if mid.with_timezone(&self.tz).naive_local() >= naive {
                        hi = mid;
                    } else {
                        lo = mid;
                    }
                }
                Some(hi.trunc_subsecs())
            }
        }
    }
}

/// What to do with ticks missed by more than the misfire grace (no scheduler was running).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Misfire {
    /// Fire none of them.
    Skip,
    /// Fire the latest one once, late.
    #[default]
    FireOnce,
    /// Fire the latest `catch_up_limit` of them, oldest first.
    CatchUp,
}

impl Misfire {
    /// The name stored in Postgres.
    pub fn as_str(self) -> &'static str {
        match self {
            Misfire::Skip => "skip",
            Misfire::FireOnce => "fire_once",
            Misfire::CatchUp => "catch_up",
        }
    }
}

impl FromStr for Misfire {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "skip" => Ok(Misfire::Skip),
            "fire_once" => Ok(Misfire::FireOnce),
            "catch_up" => Ok(Misfire::CatchUp),
            _ => Err(format!("unknown misfire policy `{s}`")),
        }
    }
}

/// The job a schedule enqueues at each tick.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobTemplate {
    /// Handler name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Handler input.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// Queue (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueName>,
    /// Priority (default `normal`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
    /// Attempt budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<u32>,
    /// Per-attempt timeout.
    #[cfg_attr(feature = "openapi", schema(schema_with = crate::duration::schema_opt))]
    #[serde(default, with = "crate::duration::serde_human_opt", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<std::time::Duration>,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// String map carried to the handler.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

impl JobTemplate {
    /// The job to enqueue.
    pub fn new_job(&self) -> NewJob {
        let mut job = NewJob::new(self.kind.clone(), self.payload.clone());
        job.queue = self.queue.clone().unwrap_or_else(QueueName::default_queue);
        job.priority = self.priority.unwrap_or_default();
        job.max_attempts = self.max_attempts;
        job.timeout = self.timeout;
        job.backoff = self.backoff;
        job.metadata = self.metadata.clone();
        job.tags = self.tags.clone();
        job
    }

    /// The queue the job goes to.
    pub fn queue(&self) -> QueueName {
        self.queue.clone().unwrap_or_else(QueueName::default_queue)
    }
}

fn default_tz() -> String {
    "UTC".into()
}

fn default_true() -> bool {
    true
}

fn default_catch_up() -> u32 {
    10
}

/// A schedule definition, as the API and the config file's `schedules` section give it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    /// Unique name (may be left out of a `PUT` body, whose path names it).
    #[cfg_attr(feature = "openapi", schema(pattern = r"^[A-Za-z0-9_.:-]{0,128}$"))]
    #[serde(default)]
    pub name: String,
    /// Cron expression.
    pub cron: String,
    /// IANA time zone.
    #[serde(default = "default_tz")]
    pub timezone: String,
    /// The job to enqueue.
    pub job: JobTemplate,
    /// Fires only when enabled.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Policy for ticks missed while no scheduler ran.
    #[serde(default)]
    pub misfire: Misfire,
    /// How many missed ticks `catch_up` fires at most.
    #[serde(default = "default_catch_up")]
    pub catch_up_limit: u32,
}

impl ScheduleSpec {
    /// Validates every field (errors name it) and returns the parsed schedule.
    pub fn validate(&self) -> Result<CronSchedule> {
        let ok_name = self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':'));
        if self.name.is_empty() || self.name.len() > 128 || !ok_name {
            return Err(Error::Invalid(format!(
                "`name`: `{}` must be 1-128 characters of A-Z, a-z, 0-9, '_', '-', '.', ':'",
                self.name
            )));
        }
        let schedule = CronSchedule::parse(&self.cron, &self.timezone)?;
        self.job.new_job().validate().map_err(|e| Error::Invalid(format!("`job`: {e}")))?;
        if !(1..=1000).contains(&self.catch_up_limit) {
            return Err(Error::Invalid("`catch_up_limit` must be between 1 and 1000".into()));
        }
        Ok(schedule)
    }
}

/// Which ticks to fire now and the next tick to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TickPlan {
    /// Ticks to enqueue, oldest first.
    pub fire: Vec<DateTime<Utc>>,
    /// Ticks dropped by the misfire policy (after a downtime of more than 10,000 ticks, at
    /// least this many: the ticks jumped over are not counted).
    pub skipped: u64,
    /// The next tick after `now`.
    pub next: Option<DateTime<Utc>>,
}

/// Plans the due ticks from `next_fire_at` up to `now`: ticks late by at most `grace` fire; of
/// older ones, the misfire policy decides.
pub fn plan_ticks(
    schedule: &CronSchedule,
    next_fire_at: DateTime<Utc>,
    now: DateTime<Utc>,
    misfire: Misfire,
    catch_up_limit: u32,
    grace: Duration,
) -> TickPlan {
    let keep = match misfire {
        Misfire::Skip => 0,
        Misfire::FireOnce => 1,
        Misfire::CatchUp => catch_up_limit as usize,
    };
    let mut due = DueTicks { now, grace, keep, late: Default::default(), recent: Vec::new(), skipped: 0 };
    let mut tick = Some(next_fire_at);
    let mut walked = 0u32;
    while let Some(t) = tick.filter(|t| *t <= now) {
        due.add(t);
        walked += 1;
        if walked >= MAX_WALK {
            // Down for long on a fast schedule: jump to the ticks just before `now` instead of
            // walking every one. The late ticks kept so far are superseded by later ones; the
            // ticks jumped over are not counted in `skipped`, which is then a lower bound.
            let (window, from) = last_ticks(schedule, t, now, grace, keep);
            if from > t {
                due.skipped += due.late.len() as u64;
                due.late.clear();
            }
            window.into_iter().for_each(|u| due.add(u));
            break;
        }
        tick = schedule.next_after(t);
    }
    let mut fire: Vec<DateTime<Utc>> = due.late.into_iter().collect();
    fire.extend(due.recent);
    TickPlan { fire, skipped: due.skipped, next: schedule.next_after(now.max(next_fire_at)) }
}

/// The due ticks [`plan_ticks`] has seen, sorted as they come: within the grace they all fire;
/// of the older ones, the latest `keep` do and the rest count as skipped.
struct DueTicks {
    now: DateTime<Utc>,
    grace: Duration,
    keep: usize,
    late: std::collections::VecDeque<DateTime<Utc>>,
    recent: Vec<DateTime<Utc>>,
    skipped: u64,
}

impl DueTicks {
    fn add(&mut self, t: DateTime<Utc>) {
        if self.now - t <= self.grace {
            self.recent.push(t);
        } else {
            self.late.push_back(t);
            if self.late.len() > self.keep {
                self.late.pop_front();
                self.skipped += 1;
            }
        }
    }
}

/// Ticks walked one by one before [`plan_ticks`] jumps ahead.
const MAX_WALK: u32 = 10_000;

/// The ticks after `from` up to `now`, where `from` (not before `after`) is the latest start
/// that still yields `keep` ticks older than the grace, or `after` itself.
fn last_ticks(
    schedule: &CronSchedule,
    after: DateTime<Utc>,
    now: DateTime<Utc>,
    grace: Duration,
    keep: usize,
) -> (Vec<DateTime<Utc>>, DateTime<Utc>) {
    let mut span = grace + Duration::hours(1);
    loop {
        let from = (now - span).max(after);
        let window: Vec<DateTime<Utc>> = schedule.upcoming(from).take_while(|u| *u <= now).collect();
        if from == after || window.iter().filter(|u| now - **u > grace).count() >= keep {
            return (window, from);
        }
        span = span * 4;
    }
}

trait TruncSubsecs {
    fn trunc_subsecs(self) -> Self;
}

impl TruncSubsecs for DateTime<Utc> {
    fn trunc_subsecs(self) -> Self {
        DateTime::from_timestamp(self.timestamp(), 0).unwrap_or(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticks(expr: &str, tz: &str, after: &str, n: usize) -> Vec<String> {
        let s = CronSchedule::parse(expr, tz).unwrap();
        s.upcoming(after.parse().unwrap()).take(n).map(|t| t.to_rfc3339()).collect()
    }

    #[test]
    fn five_field_six_field_and_aliases_are_accepted() {
        assert_eq!(
            ticks("*/15 * * * *", "UTC", "2026-01-01T00:00:00Z", 2),
            ["2026-01-01T00:15:00+00:00", "2026-01-01T00:30:00+00:00"]
        );
        assert_eq!(
            ticks("*/20 * * * * *", "UTC", "2026-01-01T00:00:00Z", 2),
            ["2026-01-01T00:00:20+00:00", "2026-01-01T00:00:40+00:00"]
        );
        assert_eq!(ticks("@hourly", "UTC", "2026-01-01T00:00:00Z", 1), ["2026-01-01T01:00:00+00:00"]);
        assert_eq!(ticks("@midnight", "UTC", "2026-01-01T05:00:00Z", 1), ["2026-01-02T00:00:00+00:00"]);
        // 2026-01-01 is a Thursday. Crontab day numbers: 0 and 7 are Sunday, 1-5 Monday-Friday.
        assert_eq!(ticks("0 9 * * 1-5", "UTC", "2026-01-02T10:00:00Z", 1), ["2026-01-05T09:00:00+00:00"]);
        assert_eq!(ticks("0 9 * * 0", "UTC", "2026-01-01T00:00:00Z", 1), ["2026-01-04T09:00:00+00:00"]);
        assert_eq!(ticks("0 9 * * 7", "UTC", "2026-01-01T00:00:00Z", 1), ["2026-01-04T09:00:00+00:00"]);
        assert_eq!(ticks("@weekly", "UTC", "2026-01-01T00:00:00Z", 1), ["2026-01-04T00:00:00+00:00"]);
    }

    #[test]
    fn a_crontab_naming_both_day_fields_fires_when_either_matches() {
        // 2026-12-01 is a Tuesday: the 1st of each month and every Monday, as crontab does.
        assert_eq!(
            ticks("0 9 1 * MON", "UTC", "2026-12-01T00:00:00Z", 7),
            [
                "2026-12-01T09:00:00+00:00",
                "2026-12-07T09:00:00+00:00",
                "2026-12-14T09:00:00+00:00",
                "2026-12-21T09:00:00+00:00",
                "2026-12-28T09:00:00+00:00",
                "2027-01-01T09:00:00+00:00",
                "2027-01-04T09:00:00+00:00",
            ]
        );
        // A Monday that is the 1st fires once; in a zone, the same wall-clock rules hold.
        assert_eq!(
            ticks("30 8 1,15 * 1", "Europe/Berlin", "2027-02-27T00:00:00Z", 3),
            ["2027-03-01T07:30:00+00:00", "2027-03-08T07:30:00+00:00", "2027-03-15T07:30:00+00:00"]
        );
        // With a wildcard in either day field the other decides alone; the six-field form keeps
        // the `cron` crate's meaning (both must match).
        assert_eq!(ticks("0 9 * * MON", "UTC", "2026-12-01T00:00:00Z", 1), ["2026-12-07T09:00:00+00:00"]);
        assert_eq!(ticks("0 0 9 1 * MON", "UTC", "2026-12-01T00:00:00Z", 1), ["2027-02-01T09:00:00+00:00"]);
    }

    #[test]
    fn bad_expressions_and_zones_name_their_field() {
        for bad in ["", "* * *", "61 * * * *", "@fortnightly", "0 0 * * 9", "a b c d e f"] {
            let e = CronSchedule::parse(bad, "UTC").unwrap_err().to_string();
            assert!(e.starts_with("`cron`"), "{bad}: {e}");
        }
        // Upper bounds are inclusive, and say so: 23 is an hour, 24 is not.
        let e = CronSchedule::parse("0 24 * * *", "UTC").unwrap_err().to_string();
        assert!(e.contains("Hours must be at most 23") && e.contains("'24'"), "{e}");
        let e = CronSchedule::parse("0 0 32 * *", "UTC").unwrap_err().to_string();
        assert!(e.contains("at most 31") && !e.contains("less than"), "{e}");
        assert!(CronSchedule::parse("59 23 31 12 *", "UTC").is_ok());
        let e = CronSchedule::parse("* * * * *", "Mars/Olympus").unwrap_err().to_string();
        assert!(e.starts_with("`timezone`") && e.contains("Mars/Olympus"), "{e}");
    }

    #[test]
    fn spring_forward_in_new_york_fires_a_missing_time_once_at_the_end_of_the_gap() {
        // 2026-03-08: clocks go from 02:00 EST to 03:00 EDT; 02:30 does not exist.
        assert_eq!(
            ticks("0 30 2 * * *", "America/New_York", "2026-03-06T12:00:00Z", 3),
            ["2026-03-07T07:30:00+00:00", "2026-03-08T07:00:00+00:00", "2026-03-09T06:30:00+00:00"]
        );
    }

    #[test]
    fn fall_back_in_new_york_fires_a_repeated_time_once() {
        // 2026-11-01: clocks go from 02:00 EDT back to 01:00 EST; 01:30 happens twice.
        assert_eq!(
            ticks("0 30 1 * * *", "America/New_York", "2026-10-31T12:00:00Z", 3),
            ["2026-11-01T05:30:00+00:00", "2026-11-02T06:30:00+00:00", "2026-11-03T06:30:00+00:00"]
        );
    }

    #[test]
    fn berlin_transitions_follow_the_zone_rules() {
        // 2026-03-29 02:00 CET → 03:00 CEST; 2026-10-25 03:00 CEST → 02:00 CET.
        assert_eq!(
            ticks("0 30 2 * * *", "Europe/Berlin", "2026-03-28T12:00:00Z", 2),
            ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]
        );
        assert_eq!(
            ticks("0 30 2 * * *", "Europe/Berlin", "2026-10-24T12:00:00Z", 2),
            ["2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00"]
        );
        // An hourly schedule stays hourly in real time across spring forward (no duplicate)
        // and across fall back (02:00 comes twice: 00:00 and 01:00 UTC).
        let spring = ticks("@hourly", "Europe/Berlin", "2026-03-28T23:30:00Z", 3);
        assert_eq!(spring, ["2026-03-29T00:00:00+00:00", "2026-03-29T01:00:00+00:00", "2026-03-29T02:00:00+00:00"]);
        let fall = ticks("@hourly", "Europe/Berlin", "2026-10-24T22:30:00Z", 4);
        assert_eq!(
            fall,
            [
                "2026-10-24T23:00:00+00:00",
                "2026-10-25T00:00:00+00:00",
                "2026-10-25T01:00:00+00:00",
                "2026-10-25T02:00:00+00:00"
            ]
        );
    }

    #[test]
    fn a_wildcard_hour_keeps_its_rhythm_through_a_repeated_hour_and_a_named_one_fires_once() {
        // New York, 2026-11-01: 01:00-01:59 happens at 05:00-05:59Z (EDT) and 06:00-06:59Z (EST).
        let quarter = ticks("*/15 * * * *", "America/New_York", "2026-11-01T04:50:00Z", 10);
        let every_15_min: Vec<String> =
            (0..10).map(|i| (at("2026-11-01T05:00:00Z") + Duration::minutes(15 * i)).to_rfc3339()).collect();
        assert_eq!(quarter, every_15_min, "no gap and no repeat in real time");
        // The scheduler asks for one tick at a time, from each tick it fired: the same ticks.
        let s = CronSchedule::parse("*/15 * * * *", "America/New_York").unwrap();
        let mut one_by_one = vec![s.next_after(at("2026-11-01T04:50:00Z")).unwrap()];
        while one_by_one.len() < 10 {
            one_by_one.push(s.next_after(*one_by_one.last().unwrap()).unwrap());
        }
        let one_by_one: Vec<String> = one_by_one.iter().map(|t| t.to_rfc3339()).collect();
        assert_eq!(one_by_one, every_15_min);
        // Hours 1-2 named: 01:30 fires once, at its first occurrence.
        assert_eq!(
            ticks("30 1-2 * * *", "America/New_York", "2026-11-01T04:50:00Z", 3),
            ["2026-11-01T05:30:00+00:00", "2026-11-01T07:30:00+00:00", "2026-11-02T06:30:00+00:00"]
        );
        // Seconds resolution through the fold: 7,200 ticks in the two hours, strictly increasing.
        let s = CronSchedule::parse("* * * * * *", "America/New_York").unwrap();
        let got: Vec<_> = s.upcoming(at("2026-11-01T04:59:59Z")).take(7200).collect();
        assert_eq!((got[0], got[7199]), (at("2026-11-01T05:00:00Z"), at("2026-11-01T06:59:59Z")));
        assert!(got.windows(2).all(|w| w[1] - w[0] == Duration::seconds(1)));
    }

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn ticks_within_the_grace_fire_and_the_policy_decides_older_ones() {
        let s = CronSchedule::parse("0 * * * * *", "UTC").unwrap();
        let grace = Duration::seconds(30);
        // On time: one tick, a second late.
        let p = plan_ticks(&s, at("2026-01-01T10:00:00Z"), at("2026-01-01T10:00:01Z"), Misfire::Skip, 10, grace);
        assert_eq!(p.fire, [at("2026-01-01T10:00:00Z")]);
        assert_eq!(p.next, Some(at("2026-01-01T10:01:00Z")));
        // Down from 10:00 to 10:05:10: ticks 10:00..10:05 are late except 10:05.
        let (from, now) = (at("2026-01-01T10:00:00Z"), at("2026-01-01T10:05:10Z"));
        let skip = plan_ticks(&s, from, now, Misfire::Skip, 10, grace);
        assert_eq!((skip.fire.clone(), skip.skipped), (vec![at("2026-01-01T10:05:00Z")], 5));
        let once = plan_ticks(&s, from, now, Misfire::FireOnce, 10, grace);
        assert_eq!(once.fire, [at("2026-01-01T10:04:00Z"), at("2026-01-01T10:05:00Z")]);
        let catch = plan_ticks(&s, from, now, Misfire::CatchUp, 3, grace);
        assert_eq!(
            catch.fire,
            [
                at("2026-01-01T10:02:00Z"),
                at("2026-01-01T10:03:00Z"),
                at("2026-01-01T10:04:00Z"),
                at("2026-01-01T10:05:00Z")
            ]
        );
        assert_eq!(catch.next, Some(at("2026-01-01T10:06:00Z")));
        // Down longer than the grace with no recent tick: fire_once fires the latest missed one.
        let p = plan_ticks(&s, from, at("2026-01-01T10:05:45Z"), Misfire::FireOnce, 10, grace);
        assert_eq!(p.fire, [at("2026-01-01T10:05:00Z")]);
    }

    #[test]
    fn after_a_long_downtime_the_policies_still_pick_the_latest_ticks() {
        let grace = Duration::seconds(30);
        let every_second = CronSchedule::parse("* * * * * *", "UTC").unwrap();
        let (down, now) = (at("2026-01-01T00:00:00Z"), at("2026-01-31T12:00:00.5Z"));
        let started = std::time::Instant::now();
        let once = plan_ticks(&every_second, down, now, Misfire::FireOnce, 10, grace);
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "{:?}", started.elapsed());
        // The latest late tick, then the 30 within the grace.
        assert_eq!(once.fire.len(), 31, "{:?}", &once.fire[..3]);
        assert_eq!(once.fire[0], at("2026-01-31T11:59:30Z"));
        assert_eq!(*once.fire.last().unwrap(), at("2026-01-31T12:00:00Z"));
        assert!(once.skipped >= 10_000, "{}", once.skipped);
        assert_eq!(once.next, Some(at("2026-01-31T12:00:01Z")));
        let catch = plan_ticks(&every_second, down, now, Misfire::CatchUp, 5, grace);
        assert_eq!(catch.fire[..5].first(), Some(&at("2026-01-31T11:59:26Z")));
        assert_eq!(catch.fire.len(), 35);
        let skip = plan_ticks(&every_second, down, now, Misfire::Skip, 10, grace);
        assert_eq!((skip.fire.len(), skip.fire[0]), (30, at("2026-01-31T11:59:31Z")));
        // Hourly, down five years (43,800 ticks): the last missed hour fires.
        let hourly = CronSchedule::parse("@hourly", "UTC").unwrap();
        let p =
            plan_ticks(&hourly, at("2021-01-01T00:00:00Z"), at("2026-01-01T10:20:00Z"), Misfire::FireOnce, 10, grace);
        assert_eq!(p.fire, [at("2026-01-01T10:00:00Z")]);
        // Below the walking limit the count is exact: daily, down 100 days.
        let daily = CronSchedule::parse("@daily", "UTC").unwrap();
        let p =
            plan_ticks(&daily, at("2025-09-23T00:00:00Z"), at("2026-01-01T10:00:00Z"), Misfire::FireOnce, 10, grace);
        assert_eq!((p.fire.clone(), p.skipped), (vec![at("2026-01-01T00:00:00Z")], 100));
    }

    #[test]
    fn specs_validate_every_field() {
        let spec = |cron: &str, tz: &str, kind: &str| ScheduleSpec {
            name: "nightly".into(),
            cron: cron.into(),
            timezone: tz.into(),
            job: JobTemplate {
                kind: kind.into(),
                payload: serde_json::Value::Null,
                queue: None,
                priority: None,
                max_attempts: None,
                timeout: None,
                backoff: None,
                metadata: BTreeMap::new(),
                tags: vec![],
            },
            enabled: true,
            misfire: Misfire::FireOnce,
            catch_up_limit: 10,
        };
        assert!(spec("@daily", "Europe/Berlin", "report").validate().is_ok());
        assert!(spec("nope", "UTC", "report").validate().unwrap_err().to_string().starts_with("`cron`"));
        assert!(spec("@daily", "Nowhere", "report").validate().unwrap_err().to_string().starts_with("`timezone`"));
        assert!(spec("@daily", "UTC", "").validate().unwrap_err().to_string().starts_with("`job`"));
        let mut bad = spec("@daily", "UTC", "x");
        bad.name = "has space".into();
        assert!(bad.validate().unwrap_err().to_string().starts_with("`name`"));
        let json: ScheduleSpec =
            serde_json::from_str(r#"{"name":"n","cron":"@hourly","job":{"type":"echo"},"misfire":"catch_up"}"#)
                .unwrap();
        assert_eq!((json.timezone.as_str(), json.enabled, json.misfire), ("UTC", true, Misfire::CatchUp));
    }

    #[test]
    fn ticks_are_computed_from_the_expression_so_they_do_not_drift() {
        let s = CronSchedule::parse("*/7 * * * * *", "UTC").unwrap();
        let start: DateTime<Utc> = "2026-01-01T00:00:00.123Z".parse().unwrap();
        let mut t = start;
        for _ in 0..1000 {
            t = s.next_after(t).unwrap();
            assert_eq!(t.timestamp_subsec_millis(), 0);
            assert_eq!(t.timestamp() % 60 % 7, 0);
        }
    }
}
