//! Schedule specs, read as Go Machinery reads them: robfig/cron v3's `ParseStandard`
//! (Go: `v2/server.go`, `RegisterPeriodicTask` calls `cron.ParseStandard(spec)`).
//!
//! - five fields, `minute hour day-of-month month day-of-week`, each a list of `*`, `?`, `n`,
//!   `a-b`, with an optional `/step` (`n/step` means `n-max/step`); months `jan`..`dec` and
//!   weekdays `sun`..`sat` by name, case-insensitive; weekdays 0 (Sunday) to 6;
//! - when both day fields are restricted a day matches either (cron's rule), else both;
//! - descriptors `@yearly` (`@annually`), `@monthly`, `@weekly`, `@daily` (`@midnight`),
//!   `@hourly`, and `@every <duration>` in Go's `time.ParseDuration` syntax (`1m30s`, `1.5h`,
//!   `500ms`), rounded down to whole seconds and at least one second, as robfig's `Every`;
//! - a `CRON_TZ=` or `TZ=` prefix naming `UTC` or `Local`.
//!
//! Cron schedules run in the local time zone, as Go's `cron.New()` does. robfig's grammar is
//! checked here, field by field, with its bounds and error cases; the time of the next match is
//! computed by the `croner` crate from the checked fields (written out as plain lists, so that
//! none of croner's extensions, `L`, `W`, `#` or seconds, can slip in).

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, Local, TimeDelta, Utc};
use croner::parser::{CronParser, Seconds, Year};

use crate::error::{Error, Result};

/// A parsed schedule spec: when a periodic task fires.
///
/// ```
/// use chrono::{TimeZone, Utc};
/// use machinery::periodic::Schedule;
///
/// let every = Schedule::parse("@every 1m30s")?;
/// let now = Utc.with_ymd_and_hms(2024, 1, 1, 0, 0, 0).unwrap();
/// assert_eq!(every.next_after(now), Some(Utc.with_ymd_and_hms(2024, 1, 1, 0, 1, 30).unwrap()));
///
/// assert!(Schedule::parse("*/5 * * * *").is_ok());
/// assert!(Schedule::parse("61 * * * *").is_err());
/// # Ok::<(), machinery::Error>(())
/// ```
#[derive(Clone)]
pub struct Schedule {
    spec: String,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// robfig's `ConstantDelaySchedule`: whole seconds, at least one.
    Every(Duration),
    /// A five-field schedule, in UTC or the local time zone.
    Cron { cron: Box<croner::Cron>, utc: bool },
}

impl Schedule {
    /// Parses `spec` as Go's `cron.ParseStandard` does; an error says what is wrong with it.
    ///
    /// ```
    /// use machinery::periodic::Schedule;
    /// assert!(Schedule::parse("@hourly").is_ok());
    /// assert!(Schedule::parse("@every 10s").is_ok());
    /// assert!(Schedule::parse("* * * *").is_err()); // four fields
    /// ```
    pub fn parse(spec: &str) -> Result<Schedule> {
        let invalid = |why: String| Error::config(format!("invalid schedule `{spec}`: {why}"));
        if spec.is_empty() {
            return Err(invalid("empty spec string".into()));
        }
        // Go: robfig/cron v3 parser.go, `Parse`: the time zone prefix comes first.
        let mut rest = spec;
        let mut utc = false;
        if rest.starts_with("TZ=") || rest.starts_with("CRON_TZ=") {
            let Some(space) = rest.find(' ') else {
                return Err(invalid(
                    "the time zone prefix is not followed by a schedule".into(),
                ));
            };
            let zone = &rest[rest.find('=').map_or(0, |i| i + 1)..space];
            utc = match zone {
                "UTC" | "" => true,
                "Local" => false,
                other => {
                    return Err(invalid(format!(
                        "time zone `{other}`: only UTC and Local are supported"
                    )))
                }
            };
            rest = rest[space..].trim();
        }
        let fields = if let Some(descriptor) = rest.strip_prefix('@') {
            match descriptor {
                "yearly" | "annually" => "0 0 1 1 *".to_owned(),
                "monthly" => "0 0 1 * *".to_owned(),
                "weekly" => "0 0 * * 0".to_owned(),
                "daily" | "midnight" => "0 0 * * *".to_owned(),
                "hourly" => "0 * * * *".to_owned(),
                _ => match descriptor.strip_prefix("every ") {
                    Some(duration) => {
                        let nanos = parse_go_duration(duration).map_err(|e| {
                            invalid(format!("failed to parse duration @{descriptor}: {e}"))
                        })?;
                        return Ok(Schedule {
                            spec: spec.to_owned(),
                            kind: Kind::Every(every(nanos)),
                        });
                    }
                    None => return Err(invalid(format!("unrecognized descriptor: @{descriptor}"))),
                },
            }
        } else {
            normalize_fields(rest).map_err(invalid)?
        };
        let cron = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build()
            .parse(&fields)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Schedule {
            spec: spec.to_owned(),
            kind: Kind::Cron {
                cron: Box::new(cron),
                utc,
            },
        })
    }

    /// The spec as registered.
    ///
    /// ```
    /// # use machinery::periodic::Schedule;
    /// assert_eq!(Schedule::parse("@daily")?.spec(), "@daily");
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// The first time after `now` the schedule fires (robfig's `Schedule.Next`), or `None` when
    /// it never does (a date that does not exist, such as `0 0 30 2 *`).
    ///
    /// ```
    /// use chrono::{TimeZone, Utc};
    /// # use machinery::periodic::Schedule;
    /// let every = Schedule::parse("@every 1s")?;
    /// let now = Utc.timestamp_nanos(1_700_000_000_250_000_000);
    /// assert_eq!(every.next_after(now), Some(Utc.timestamp_nanos(1_700_000_001_000_000_000)));
    /// # Ok::<(), machinery::Error>(())
    /// ```
    pub fn next_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.kind {
            // Go: robfig/cron v3 constantdelay.go, `Next`: `t.Add(Delay - t.Nanosecond())`.
            Kind::Every(delay) => {
                let base = now - TimeDelta::nanoseconds(i64::from(now.timestamp_subsec_nanos()));
                base.checked_add_signed(TimeDelta::from_std(*delay).ok()?)
            }
            Kind::Cron { cron, utc: true } => cron.find_next_occurrence(&now, false).ok(),
            Kind::Cron { cron, utc: false } => cron
                .find_next_occurrence(&now.with_timezone(&Local), false)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        }
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Schedule").field(&self.spec).finish()
    }
}

/// robfig's `Every`: at least one second, rounded down to whole seconds.
fn every(nanos: i128) -> Duration {
    let secs = nanos / 1_000_000_000;
    Duration::from_secs(u64::try_from(secs.max(1)).unwrap_or(u64::MAX))
}

struct Bounds {
    what: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Bounds = Bounds {
    what: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: Bounds = Bounds {
    what: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DOM: Bounds = Bounds {
    what: "day of month",
    min: 1,
    max: 31,
    names: &[],
};
/// Names from 1: `jan` is 1.
const MONTH: Bounds = Bounds {
    what: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
/// Names from 0: `sun` is 0.
const DOW: Bounds = Bounds {
    what: "day of week",
    min: 0,
    max: 6,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

/// Checks the five fields with robfig's grammar and writes them out as plain lists (`*` where
/// robfig keeps its star bit, which decides how the two day fields combine).
fn normalize_fields(spec: &str) -> std::result::Result<String, String> {
    let fields: Vec<&str> = spec.split_whitespace().collect();
    // Go: robfig/cron v3 parser.go, `normalizeFields`.
    if fields.len() != 5 {
        return Err(format!(
            "expected exactly 5 fields, found {}: {spec}",
            fields.len()
        ));
    }
    let mut out = Vec::with_capacity(5);
    for (field, bounds) in fields.iter().zip([&MINUTE, &HOUR, &DOM, &MONTH, &DOW]) {
        let (bits, star) = parse_field(field, bounds)?;
        if star {
            out.push("*".to_owned());
        } else {
            let values: Vec<String> = (bounds.min..=bounds.max)
                .filter(|v| bits & (1 << v) != 0)
                .map(|v| v.to_string())
                .collect();
            out.push(values.join(","));
        }
    }
    Ok(out.join(" "))
}

/// Go: robfig/cron v3 parser.go, `getField`: the bits of a comma-separated list, and whether
/// robfig's star bit is set.
fn parse_field(field: &str, bounds: &Bounds) -> std::result::Result<(u64, bool), String> {
    let mut bits = 0;
    let mut star = false;
    for expr in field.split(',') {
        let (b, s) = get_range(expr, bounds)?;
        bits |= b;
        star |= s;
    }
    Ok((bits, star))
}

/// Go: robfig/cron v3 parser.go, `getRange`.
fn get_range(expr: &str, r: &Bounds) -> std::result::Result<(u64, bool), String> {
    let range_and_step: Vec<&str> = expr.split('/').collect();
    let low_and_high: Vec<&str> = range_and_step[0].split('-').collect();
    let single = low_and_high.len() == 1;
    let (start, mut end, mut star) = if low_and_high[0] == "*" || low_and_high[0] == "?" {
        (r.min, r.max, true)
    } else {
        let start = parse_int_or_name(low_and_high[0], r.names)?;
        let end = match low_and_high.len() {
            1 => start,
            2 => parse_int_or_name(low_and_high[1], r.names)?,
            _ => return Err(format!("too many hyphens: {expr}")),
        };
        (start, end, false)
    };
    let step = match range_and_step.len() {
        1 => 1,
        2 => {
            let step = must_parse_int(range_and_step[1])?;
            // "N/step" means "N-max/step".
            if single {
                end = r.max;
            }
            if step > 1 {
                star = false;
            }
            step
        }
        _ => return Err(format!("too many slashes: {expr}")),
    };
    let what = r.what;
    if start < r.min {
        return Err(format!(
            "{what}: beginning of range ({start}) below minimum ({}): {expr}",
            r.min
        ));
    }
    if end > r.max {
        return Err(format!(
            "{what}: end of range ({end}) above maximum ({}): {expr}",
            r.max
        ));
    }
    if start > end {
        return Err(format!(
            "{what}: beginning of range ({start}) beyond end of range ({end}): {expr}"
        ));
    }
    if step == 0 {
        return Err(format!(
            "{what}: step of range should be a positive number: {expr}"
        ));
    }
    let mut bits = 0u64;
    let mut v = start;
    while v <= end {
        bits |= 1 << v;
        v = v.saturating_add(step);
    }
    Ok((bits, star))
}

/// Go: robfig/cron v3 parser.go, `parseIntOrName`; names are matched lower-cased.
fn parse_int_or_name(expr: &str, names: &[&str]) -> std::result::Result<u32, String> {
    let lower = expr.to_ascii_lowercase();
    if let Some(i) = names.iter().position(|n| *n == lower) {
        // Months count from 1, weekdays from 0.
        let offset = u32::from(names.len() == 12);
        return Ok(u32::try_from(i).unwrap_or(0) + offset);
    }
    must_parse_int(expr)
}

/// Go: robfig/cron v3 parser.go, `mustParseInt` (`strconv.Atoi`, no negatives).
fn must_parse_int(expr: &str) -> std::result::Result<u32, String> {
    let digits = expr.strip_prefix('+').unwrap_or(expr);
    if expr.starts_with('-') {
        return Err(format!("negative number ({expr}) not allowed"));
    }
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("failed to parse int from {expr}"));
    }
    // Anything past 64 is out of every field's range; keep it large without overflowing.
    Ok(digits.parse::<u32>().unwrap_or(u32::MAX).min(1_000))
}

/// Go's `time.ParseDuration`: `[-+]?([0-9]*(\.[0-9]*)?[a-z]+)+`, in nanoseconds.
///
/// Units `ns`, `us` (`µs`, `μs`), `ms`, `s`, `m`, `h`; `0` alone needs none.
pub(crate) fn parse_go_duration(orig: &str) -> std::result::Result<i128, String> {
    const MAX: u128 = 1 << 63;
    let invalid = || format!("time: invalid duration \"{orig}\"");
    let mut s = orig;
    let mut neg = false;
    if let Some(c) = s.chars().next() {
        if c == '-' || c == '+' {
            neg = c == '-';
            s = &s[1..];
        }
    }
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut d: u128 = 0;
    while !s.is_empty() {
        let first = s.as_bytes()[0];
        if !(first == b'.' || first.is_ascii_digit()) {
            return Err(invalid());
        }
        // [0-9]*
        let int_len = s.bytes().take_while(u8::is_ascii_digit).count();
        let mut v: u128 = 0;
        for b in s[..int_len].bytes() {
            v = v * 10 + u128::from(b - b'0');
            if v > MAX {
                return Err(invalid());
            }
        }
        let pre = int_len > 0;
        s = &s[int_len..];
        // (\.[0-9]*)?
        let mut f: u128 = 0;
        let mut scale: f64 = 1.0;
        let mut post = false;
        if let Some(after) = s.strip_prefix('.') {
            let frac_len = after.bytes().take_while(u8::is_ascii_digit).count();
            let mut overflow = false;
            for b in after[..frac_len].bytes() {
                // Go: `leadingFraction` stops adding digits once they would overflow.
                if overflow || f > (MAX - 1) / 10 {
                    overflow = true;
                    continue;
                }
                f = f * 10 + u128::from(b - b'0');
                scale *= 10.0;
            }
            post = frac_len > 0;
            s = &after[frac_len..];
        }
        if !pre && !post {
            return Err(invalid());
        }
        // The unit runs up to the next digit or `.`.
        let unit_len = s
            .bytes()
            .take_while(|b| !(*b == b'.' || b.is_ascii_digit()))
            .count();
        if unit_len == 0 {
            return Err(format!("time: missing unit in duration \"{orig}\""));
        }
        let unit: u128 = match &s[..unit_len] {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            other => {
                return Err(format!(
                    "time: unknown unit \"{other}\" in duration \"{orig}\""
                ))
            }
        };
        s = &s[unit_len..];
        if v > MAX / unit {
            return Err(invalid());
        }
        v *= unit;
        if f > 0 {
            // Go: float64 keeps fractions of hours nanosecond-accurate.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let frac = (f as f64 * (unit as f64 / scale)) as u128;
            v += frac;
            if v > MAX {
                return Err(invalid());
            }
        }
        d += v;
        if d > MAX {
            return Err(invalid());
        }
    }
    let d = i128::try_from(d).map_err(|_| invalid())?;
    if neg {
        return Ok(-d);
    }
    if d > i128::from(i64::MAX) {
        return Err(invalid());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(spec: &str) -> Schedule {
        Schedule::parse(&format!("CRON_TZ=UTC {spec}")).unwrap()
    }

    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn go_durations() {
        // Go: src/time/time_test.go, parseDurationTests.
        for (text, nanos) in [
            ("0", 0i128),
            ("5s", 5_000_000_000),
            ("30s", 30_000_000_000),
            ("1478s", 1_478_000_000_000),
            ("-5s", -5_000_000_000),
            ("+5s", 5_000_000_000),
            ("-0", 0),
            ("+0", 0),
            ("5.0s", 5_000_000_000),
            ("5.6s", 5_600_000_000),
            ("5.s", 5_000_000_000),
            (".5s", 500_000_000),
            ("1.0s", 1_000_000_000),
            ("1.00s", 1_000_000_000),
            ("1.004s", 1_004_000_000),
            ("100.00100s", 100_001_000_000),
            ("10ns", 10),
            ("11us", 11_000),
            ("12µs", 12_000),
            ("12μs", 12_000),
            ("13ms", 13_000_000),
            ("14s", 14_000_000_000),
            ("15m", 900_000_000_000),
            ("16h", 57_600_000_000_000),
            ("3h30m", 12_600_000_000_000),
            ("10.5s4m", 250_500_000_000),
            ("-2m3.4s", -123_400_000_000),
            ("1h2m3s4ms5us6ns", 3_723_004_005_006),
        ] {
            assert_eq!(parse_go_duration(text), Ok(nanos), "{text}");
        }
        assert_eq!(parse_go_duration("39h9m14.425s"), Ok(140_954_425_000_000));
        assert_eq!(
            parse_go_duration("9223372036854775807ns"),
            Ok(i128::from(i64::MAX))
        );
        assert_eq!(
            parse_go_duration("-9223372036854775808ns"),
            Ok(i128::from(i64::MIN))
        );
        for bad in [
            "",
            "3",
            "-",
            "s",
            ".",
            "-.",
            ".s",
            "+.s",
            "1d",
            "\u{85}\u{85}",
            "\u{FFFD}",
            "1ns2",
            "9223372036854775808ns",
            "9223372036854775810ns",
            "3000000h",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn every_rounds_as_robfig() {
        // Go: robfig/cron v3 constantdelay.go, `Every`.
        let now = Utc.timestamp_nanos(1_700_000_000_250_000_000);
        for (spec, next_secs) in [
            ("@every 1s", 1),
            ("@every 1.9s", 1),
            ("@every 100ms", 1),
            ("@every 0s", 1),
            ("@every -5s", 1),
            ("@every 1m30s", 90),
        ] {
            let next = Schedule::parse(spec).unwrap().next_after(now).unwrap();
            assert_eq!(
                next,
                Utc.timestamp_nanos((1_700_000_000 + next_secs) * 1_000_000_000),
                "{spec}"
            );
        }
    }

    #[test]
    fn descriptors_and_fields() {
        let now = at(2024, 1, 31, 10, 20, 30) + TimeDelta::milliseconds(250);
        for (spec, next) in [
            ("@hourly", at(2024, 1, 31, 11, 0, 0)),
            ("@daily", at(2024, 2, 1, 0, 0, 0)),
            ("@midnight", at(2024, 2, 1, 0, 0, 0)),
            ("@weekly", at(2024, 2, 4, 0, 0, 0)),
            ("@monthly", at(2024, 2, 1, 0, 0, 0)),
            ("@yearly", at(2025, 1, 1, 0, 0, 0)),
            ("@annually", at(2025, 1, 1, 0, 0, 0)),
            ("* * * * *", at(2024, 1, 31, 10, 21, 0)),
            ("*/15 * * * *", at(2024, 1, 31, 10, 30, 0)),
            ("5/15 * * * *", at(2024, 1, 31, 10, 35, 0)),
            ("0 9-17/4 * * *", at(2024, 1, 31, 13, 0, 0)),
            ("0 0 * FEB *", at(2024, 2, 1, 0, 0, 0)),
            ("0 0 * * sat", at(2024, 2, 3, 0, 0, 0)),
            ("0 0 * * Mon-Tue", at(2024, 2, 5, 0, 0, 0)),
            ("0 0 ? * 3", at(2024, 2, 7, 0, 0, 0)),
            // Both day fields restricted: either matches (1 Feb is a Thursday).
            ("0 0 1 * 0", at(2024, 2, 1, 0, 0, 0)),
            // A stepped star is no star: `*/1` is, `*/2` is not.
            ("0 0 */2 * 0", at(2024, 2, 1, 0, 0, 0)),
            ("0 0 29 2 *", at(2024, 2, 29, 0, 0, 0)),
        ] {
            assert_eq!(utc(spec).next_after(now), Some(next), "{spec}");
        }
        assert_eq!(utc("0 0 30 2 *").next_after(now), None);
        // Whole-second ticks, just after the tick itself.
        let tick = at(2024, 1, 31, 10, 21, 0) + TimeDelta::microseconds(300);
        assert_eq!(
            utc("* * * * *").next_after(tick),
            Some(at(2024, 1, 31, 10, 22, 0))
        );
    }

    #[test]
    fn bad_specs_are_errors() {
        // What robfig's ParseStandard refuses.
        for bad in [
            "",
            "* * * *",
            "* * * * * *",
            "60 * * * *",
            "* 24 * * *",
            "* * 0 * *",
            "* * 32 * *",
            "* * * 13 *",
            "* * * * 7",
            "5-1 * * * *",
            "*/0 * * * *",
            "1-2-3 * * * *",
            "*/2/3 * * * *",
            "-1 * * * *",
            "x * * * *",
            "L * * * *",
            "* * L * *",
            "* * * * 5#3",
            "* * 15W * *",
            "@every",
            "@every ",
            "@every 1",
            "@every 1d",
            "@Hourly",
            "@fortnightly",
            " @hourly",
            "TZ=Europe/Paris * * * * *",
            "CRON_TZ=UTC",
        ] {
            let err = Schedule::parse(bad).expect_err(bad);
            assert_eq!(err.kind(), crate::ErrorKind::Config, "{bad}");
        }
    }
}
