//! A tenant's log and the `wasi:logging` provider: one line per record or output line appended
//! to the tenant's `tenant.log`, and a `tracing` event (target `tenant`) for the host's own log.
//!
//! Lines are `<time> <tag> <text>`: the tag is the record's level in capitals (`INFO [context]
//! message`) or, for what a supervisor writes from the guest's streams, `stdout` / `stderr`.
//! The guest's text is untrusted, so a line can never be more than one line: control
//! characters (newlines included), Unicode line separators and bidirectional overrides are
//! escaped (`\n`, `\u{1b}`, ...), as is the backslash itself so that escapes stay unambiguous.
//! The escaped context is capped at [`MAX_CONTEXT_LEN`] bytes and the message at
//! [`MAX_MESSAGE_LEN`], with a marker saying how much was cut. Each line reaches the file in one
//! `write` with no user-space buffer, so a record acknowledged to the guest is in the file even
//! if wasmvisor is killed right after (it is not `fsync`ed: a host crash may lose the tail).
//!
//! The log is bounded: once `tenant.log` would grow past its limit it is renamed to
//! `tenant.log.1` (replacing the previous one) and a new file is started, so a tenant keeps at
//! most twice the limit on disk. [`TenantLog::read`] returns both, oldest first.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
#[cfg(unix)]
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use wasmvisor_abi::capability::LogLevel;

use crate::tenant::TenantName;

/// Largest escaped context written, in bytes.
pub(crate) const MAX_CONTEXT_LEN: usize = 1024;
/// Largest escaped message written, in bytes.
pub(crate) const MAX_MESSAGE_LEN: usize = 64 * 1024;
/// The default size at which a tenant log is rotated.
pub const DEFAULT_LOG_LIMIT: u64 = 8 << 20;

/// Called with each line (without its newline) right after it reached the file.
pub type LineListener = Box<dyn Fn(&str) + Send + Sync>;

/// A tenant's open log file, shared by whoever writes to it (the broker's `wasi:logging`
/// provider, a supervisor's output capture).
pub struct TenantLog {
    path: PathBuf,
    echo: bool,
    limit: std::sync::atomic::AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    file: File,
    size: u64,
    listener: Option<LineListener>,
}

impl std::fmt::Debug for TenantLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TenantLog").field("path", &self.path).field("limit", &self.limit()).finish_non_exhaustive()
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    options.mode(0o600);
    options.open(path)
}

impl TenantLog {
    /// Opens (creating, mode 0600) `path` for appending, rotated at [`DEFAULT_LOG_LIMIT`];
    /// with `echo`, each record is also written to stderr.
    pub fn open(path: PathBuf, echo: bool) -> io::Result<Self> {
        Self::open_bounded(path, echo, DEFAULT_LOG_LIMIT)
    }

    /// The size at which `tenant.log` is rotated.
    pub fn limit(&self) -> u64 {
        self.limit.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Changes the rotation size (a tenant's quota was changed); it applies from the next write.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    /// As [`open`](Self::open), rotated once the file would exceed `limit` bytes.
    pub fn open_bounded(path: PathBuf, echo: bool, limit: u64) -> io::Result<Self> {
        let file = open_append(&path)?;
        let size = file.metadata()?.len();
        let limit = std::sync::atomic::AtomicU64::new(limit.max(1));
        Ok(Self { path, echo, limit, inner: Mutex::new(Inner { file, size, listener: None }) })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The rotated file's path.
    pub fn rotated_path(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".1");
        PathBuf::from(name)
    }

    /// Sets the one listener told of every line written from now on.
    pub fn set_listener(&self, listener: LineListener) {
        self.lock().listener = Some(listener);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the file half-written (one write per
        // line), so the poison is only a flag.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Both files' text, oldest first, with `then` called while no line can be written: a
    /// follower that subscribes in `then` misses no line and sees none twice.
    pub fn read<R>(&self, then: impl FnOnce() -> R) -> io::Result<(String, R)> {
        let _guard = self.lock();
        let mut text = match std::fs::read(self.rotated_path()) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        text.extend(std::fs::read(&self.path)?);
        Ok((String::from_utf8_lossy(&text).into_owned(), then()))
    }

    fn append(&self, line: &str) -> io::Result<()> {
        let mut inner = self.lock();
        let len = line.len() as u64 + 1;
        if inner.size > 0 && inner.size + len > self.limit() {
            std::fs::rename(&self.path, self.rotated_path())?;
            inner.file = open_append(&self.path)?;
            inner.size = 0;
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        // One write of the whole line: lines never interleave within a line.
        inner.file.write_all(&bytes)?;
        inner.size += len;
        if let Some(listener) = &inner.listener {
            listener(line);
        }
        Ok(())
    }

    /// Appends one record, stamped `now`, and reports it to `tracing`.
    pub(crate) fn record(
        &self,
        tenant: &TenantName,
        level: LogLevel,
        context: &str,
        message: &str,
        now: SystemTime,
    ) -> io::Result<()> {
        let context = escape_capped(context, MAX_CONTEXT_LEN);
        let message = escape_capped(message, MAX_MESSAGE_LEN);
        let stamp = rfc3339_utc(now);
        let line = format!("{stamp} {} [{context}] {message}", level_name(level));
        trace_record(tenant, level, &context, &message);
        self.append(&line)?;
        if self.echo {
            // The same escaped line without the time stamp, in one write. A closed or full
            // stderr loses the echo, never the record.
            let _ = io::stderr().write_all(format!("{}\n", &line[stamp.len() + 1..]).as_bytes());
        }
        Ok(())
    }

    /// Appends one line of the guest's output (`tag` is `stdout` or `stderr`), escaped and
    /// capped as a record's message is.
    pub fn output(&self, tag: &str, text: &str, now: SystemTime) -> io::Result<()> {
        let text = escape_capped(text, MAX_MESSAGE_LEN);
        self.append(&format!("{} {tag} {text}", rfc3339_utc(now)))
    }
}

fn level_name(level: LogLevel) -> &'static str {
    match level {
        LogLevel::Trace => "TRACE",
        LogLevel::Debug => "DEBUG",
        LogLevel::Info => "INFO",
        LogLevel::Warn => "WARN",
        LogLevel::Error => "ERROR",
        LogLevel::Critical => "CRITICAL",
    }
}

fn trace_record(tenant: &TenantName, level: LogLevel, context: &str, message: &str) {
    let tenant = tenant.as_str();
    let name = level_name(level);
    // `tracing` levels are static per call site, hence one call per level.
    match level {
        LogLevel::Trace => tracing::trace!(target: "tenant", tenant, level = name, context, "{message}"),
        LogLevel::Debug => tracing::debug!(target: "tenant", tenant, level = name, context, "{message}"),
        LogLevel::Info => tracing::info!(target: "tenant", tenant, level = name, context, "{message}"),
        LogLevel::Warn => tracing::warn!(target: "tenant", tenant, level = name, context, "{message}"),
        LogLevel::Error | LogLevel::Critical => {
            tracing::error!(target: "tenant", tenant, level = name, context, "{message}")
        }
    }
}

/// Whether `c` must not appear raw in a log line: it could end the line, rewrite the terminal,
/// or reorder what a reader sees.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\\' | '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}')
        || matches!(c, '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\\' => out.push_str("\\\\"),
        c if needs_escape(c) => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// `s` with every unsafe character escaped, cut to at most `cap` bytes plus a marker.
fn escape_capped(s: &str, cap: usize) -> String {
    let mut out = String::with_capacity(s.len().min(cap));
    for (i, c) in s.char_indices() {
        let before = out.len();
        push_escaped(&mut out, c);
        if out.len() > cap {
            out.truncate(before);
            let _ = write!(out, "…[truncated {} of {} bytes]", s.len() - i, s.len());
            break;
        }
    }
    out
}

/// `t` as RFC 3339 in UTC with milliseconds, e.g. `2026-11-20T08:15:42.123Z` (times before 1970
/// print as the epoch).
pub fn rfc3339_utc(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::test_utils::TempDir;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = |secs: u64, millis: u64| rfc3339_utc(UNIX_EPOCH + Duration::from_millis(secs * 1000 + millis));
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(at(1_700_000_000, 999), "2023-11-14T22:13:20.999Z");
        assert_eq!(at(4_107_542_399, 0), "2100-02-28T23:59:59.000Z");
        assert_eq!(at(253_402_300_799, 0), "9999-12-31T23:59:59.000Z");
        assert_eq!(rfc3339_utc(UNIX_EPOCH - Duration::from_secs(5)), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn guest_text_cannot_break_the_line() {
        assert_eq!(escape_capped("a\nb\r\tc\\n", 100), "a\\nb\\r\\tc\\\\n");
        assert_eq!(escape_capped("\u{1b}[2J\u{7f}\u{85}", 100), "\\u{1b}[2J\\u{7f}\\u{85}");
        assert_eq!(escape_capped("x\u{2028}y\u{202e}z", 100), "x\\u{2028}y\\u{202e}z");
        assert_eq!(escape_capped("héllo ✓", 100), "héllo ✓");
        let escaped = escape_capped(&"\n\u{0}\u{2029}".repeat(1000), MAX_MESSAGE_LEN);
        assert!(!escaped.contains(['\n', '\r', '\0', '\u{2029}']));
    }

    #[test]
    fn long_text_is_cut_at_a_char_boundary_with_a_marker() {
        assert_eq!(escape_capped("abcdef", 4), "abcd…[truncated 2 of 6 bytes]");
        // An escape is never split: "\n" needs two bytes and only one is left.
        assert_eq!(escape_capped("abc\n", 4), "abc…[truncated 1 of 4 bytes]");
        assert_eq!(escape_capped("ééé", 5), "éé…[truncated 2 of 6 bytes]");
        let long = escape_capped(&"m".repeat(MAX_MESSAGE_LEN + 10), MAX_MESSAGE_LEN);
        assert!(long.starts_with(&"m".repeat(MAX_MESSAGE_LEN)) && long.ends_with("[truncated 10 of 65546 bytes]"));
        assert_eq!(escape_capped(&"c".repeat(MAX_CONTEXT_LEN), MAX_CONTEXT_LEN).len(), MAX_CONTEXT_LEN);
    }

    #[test]
    fn records_are_appended_one_line_each() {
        let dir = TempDir::new();
        let path = dir.path().join("tenant.log");
        let tenant: TenantName = "t".parse().unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let log = TenantLog::open(path.clone(), false).unwrap();
        log.record(&tenant, LogLevel::Warn, "ctx", "disk almost full", now).unwrap();
        log.record(&tenant, LogLevel::Critical, "", "forged\n2023-11-14T22:13:20.000Z INFO [x] ok", now).unwrap();
        drop(log);
        // Reopening appends.
        TenantLog::open(path.clone(), false).unwrap().record(&tenant, LogLevel::Trace, "c\nd", "", now).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "2023-11-14T22:13:20.000Z WARN [ctx] disk almost full",
                "2023-11-14T22:13:20.000Z CRITICAL [] forged\\n2023-11-14T22:13:20.000Z INFO [x] ok",
                "2023-11-14T22:13:20.000Z TRACE [c\\nd] ",
            ]
        );
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn the_log_rotates_at_its_limit_and_reads_back_oldest_first() {
        let dir = TempDir::new();
        let path = dir.path().join("tenant.log");
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let log = TenantLog::open_bounded(path.clone(), false, 100).unwrap();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        log.set_listener(Box::new(move |line| sink.lock().unwrap().push(line.to_owned())));
        // Each line is 24 + 1 + 6 + 1 + 10 + 1 = 43 bytes: two fit in 100, the third rotates.
        for i in 0..5 {
            log.output("stdout", &format!("line {i:05}"), now).unwrap();
        }
        log.output("stderr", "a\nb", now).unwrap();
        let (text, ()) = log.read(|| ()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        // Rotated twice: the oldest two lines are gone, the rest are in order.
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].ends_with("stdout line 00002"), "{text}");
        assert!(lines[3].ends_with("stderr a\\nb"), "{text}");
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        assert!(std::fs::metadata(log.rotated_path()).unwrap().len() <= 100);
        assert_eq!(seen.lock().unwrap().len(), 6);
        // Reopening continues the file and its size.
        drop(log);
        let log = TenantLog::open_bounded(path.clone(), false, 100).unwrap();
        log.output("stdout", "again", now).unwrap();
        assert!(log.read(|| ()).unwrap().0.ends_with("stdout again\n"));
    }
}
