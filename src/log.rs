//! Operational log lines on stderr: `2026-11-24T08:00:00.123456Z INFO worker 0: message`, or
//! one JSON object per line (`SCOPEGATE_LOG_FORMAT=json`) for collectors.
//!
//! Deliberately tiny: the gateway logs at start-up, on errors and on state changes; per request
//! only when asked (`SCOPEGATE_ACCESS_LOG`) or when it refused something, and then within a
//! budget ([`budget`]), so a logging framework buys nothing here.

use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Instant;
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error = 0,
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Some(Level::Error),
            "warn" | "warning" => Some(Level::Warn),
            "info" => Some(Level::Info),
            "debug" => Some(Level::Debug),
            _ => None,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Level::Error => "ERROR",
            Level::Warn => "WARN",
            Level::Info => "INFO",
            Level::Debug => "DEBUG",
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);
static JSON: AtomicBool = AtomicBool::new(false);

/// Lines as JSON objects (`SCOPEGATE_LOG_FORMAT=json`).
pub fn set_json(on: bool) {
    JSON.store(on, Ordering::Relaxed);
}

/// A value of a structured line.
pub enum Field<'a> {
    Str(&'a str),
    Num(u64),
}

pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

pub fn write(level: Level, args: std::fmt::Arguments<'_>) {
    if JSON.load(Ordering::Relaxed) {
        return record(level, &args.to_string(), &[]);
    }
    let mut line = String::with_capacity(128);
    rfc3339_micros(SystemTime::now(), &mut line);
    use std::fmt::Write as _;
    let _ = writeln!(line, " {} {}", level.label(), args);
    // One write per line so lines from different threads do not interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

/// A line with fields: `message k=v k="v w"` as text, or `{"time", "level", "message", k: v}`.
pub fn record(level: Level, message: &str, fields: &[(&str, Field<'_>)]) {
    if !enabled(level) {
        return;
    }
    let mut time = String::with_capacity(28);
    rfc3339_micros(SystemTime::now(), &mut time);
    let line = format_line(JSON.load(Ordering::Relaxed), &time, level, message, fields);
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

fn format_line(
    json: bool,
    time: &str,
    level: Level,
    message: &str,
    fields: &[(&str, Field<'_>)],
) -> String {
    use std::fmt::Write as _;
    let mut line = String::with_capacity(160);
    if json {
        let level = level.label().to_ascii_lowercase();
        let _ = write!(
            line,
            "{{\"time\":\"{time}\",\"level\":\"{level}\",\"message\":{}",
            quote(message)
        );
        for (k, v) in fields {
            match v {
                Field::Str(s) => {
                    let _ = write!(line, ",{}:{}", quote(k), quote(s));
                }
                Field::Num(n) => {
                    let _ = write!(line, ",{}:{n}", quote(k));
                }
            }
        }
        line.push_str("}\n");
    } else {
        let _ = write!(line, "{time} {} {message}", level.label());
        for (k, v) in fields {
            match v {
                // Quoted (JSON escapes) unless plainly printable: an agent's strings cannot
                // forge another field or line, nor carry terminal controls.
                Field::Str(s)
                    if s.is_empty()
                        || !s
                            .bytes()
                            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'=') =>
                {
                    let _ = write!(line, " {k}={}", quote(s));
                }
                Field::Str(s) => {
                    let _ = write!(line, " {k}={s}");
                }
                Field::Num(n) => {
                    let _ = write!(line, " {k}={n}");
                }
            }
        }
        line.push('\n');
    }
    line
}

/// `s` as a JSON string that shows everything a terminal or a reader might not: every control
/// character (C0, DEL, C1) and the invisible or reordering ones (zero-width, bidi controls,
/// Unicode tag characters) as `\uXXXX` escapes.
fn quote(s: &str) -> String {
    use std::fmt::Write as _;
    // JSON: a code point as its UTF-16 units.
    crate::fmt::quoted(s, |c, out| {
        let mut units = [0u16; 2];
        for u in c.encode_utf16(&mut units) {
            let _ = write!(out, "\\u{u:04x}");
        }
    })
}

/// Lines an agent can cause (its refusals) per second, per worker thread, and the burst.
const BUDGET_PER_SECOND: f64 = 10.0;
const BUDGET_BURST: f64 = 20.0;

thread_local! {
    /// Tokens left, when they were counted, lines not written since the last one that was.
    static BUDGET: Cell<(f64, Option<Instant>, u64)> = const { Cell::new((BUDGET_BURST, None, 0)) };
}

/// Whether a line an agent caused may be written now (a token bucket per worker thread, so an
/// attack cannot flood the log): `Some(n)`, with the lines dropped since the last written one.
pub fn budget() -> Option<u64> {
    BUDGET.with(|b| {
        let (tokens, at, dropped) = b.get();
        let now = Instant::now();
        let refill = at.map_or(0.0, |t| {
            now.duration_since(t).as_secs_f64() * BUDGET_PER_SECOND
        });
        let tokens = (tokens + refill).min(BUDGET_BURST);
        if tokens >= 1.0 {
            b.set((tokens - 1.0, Some(now), 0));
            Some(dropped)
        } else {
            b.set((tokens, Some(now), dropped + 1));
            None
        }
    })
}

/// Formats `t` as `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC).
/// Logs `message` at warn level the first time `key` is seen by this process: a condition that
/// repeats on every request (a misconfigured upstream) is said once, not per request.
pub fn warn_once(key: &str, message: &str) {
    static SEEN: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if seen.iter().any(|k| k == key) || seen.len() >= 1024 {
        return;
    }
    seen.push(key.to_owned());
    drop(seen);
    if !enabled(Level::Warn) {
        return;
    }
    write(Level::Warn, format_args!("{message}"));
}

pub fn rfc3339_micros(t: SystemTime, out: &mut String) {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (y, m, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    use std::fmt::Write as _;
    let _ = write!(
        out,
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_micros()
    );
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[macro_export]
macro_rules! log_at {
    ($level:expr, $($arg:tt)*) => {
        if $crate::log::enabled($level) {
            $crate::log::write($level, format_args!($($arg)*));
        }
    };
}
#[macro_export]
macro_rules! error { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Error, $($arg)*) }; }
#[macro_export]
macro_rules! warn { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Warn, $($arg)*) }; }
#[macro_export]
macro_rules! info { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Info, $($arg)*) }; }
#[macro_export]
macro_rules! debug { ($($arg:tt)*) => { $crate::log_at!($crate::log::Level::Debug, $($arg)*) }; }

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_rfc3339_with_micros() {
        let mut s = String::new();
        rfc3339_micros(
            UNIX_EPOCH + Duration::new(1_795_478_400, 123_456_000),
            &mut s,
        );
        assert_eq!(s, "2026-11-24T00:00:00.123456Z");
        s.clear();
        rfc3339_micros(UNIX_EPOCH + Duration::new(951_782_400, 0), &mut s);
        assert_eq!(s, "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn the_budget_lets_a_burst_through_then_counts_what_it_drops() {
        std::thread::spawn(|| {
            let allowed = (0..100).filter(|_| budget().is_some()).count();
            assert!((20..=22).contains(&allowed), "{allowed}");
            std::thread::sleep(std::time::Duration::from_millis(250));
            // Refilled by now (10 a second): the next line says how many were dropped.
            let dropped = budget().expect("refilled");
            assert!((78..=80).contains(&dropped), "{dropped}");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn an_agents_strings_cannot_forge_fields_or_lines() {
        let fields = [
            ("tool", Field::Str("add decision=allowed\r\n\u{1b}[2J")),
            ("agent", Field::Str("bot")),
            ("us", Field::Num(7)),
        ];
        let text = format_line(false, "T", Level::Info, "refused", &fields);
        assert_eq!(
            text,
            "T INFO refused tool=\"add decision=allowed\\r\\n\\u001b[2J\" agent=bot us=7\n"
        );
        let json = format_line(true, "T", Level::Info, "refused", &fields);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["tool"], "add decision=allowed\r\n\u{1b}[2J");
        assert_eq!(
            (v["level"].as_str(), v["us"].as_u64()),
            (Some("info"), Some(7))
        );
        assert_eq!(json.matches('\n').count(), 1);
        // DEL, C1 controls, bidi overrides and tag characters are escaped too, and the JSON
        // form still reads back as the agent's string.
        let sly = "a\u{7f}b\u{9b}c\u{202e}d\u{E0041}";
        let text = format_line(false, "T", Level::Info, "x", &[("tool", Field::Str(sly))]);
        assert_eq!(
            text,
            "T INFO x tool=\"a\\u007fb\\u009bc\\u202ed\\udb40\\udc41\"\n"
        );
        let json = format_line(true, "T", Level::Info, "x", &[("tool", Field::Str(sly))]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["tool"], sly);
    }
}
