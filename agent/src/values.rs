//! Every bound on a value the user gives, defined once, with the parsers that enforce it: the
//! command line's value parsers (cli.rs) and the config file's deserializers (config.rs) call
//! the same functions, so a flag and its config key refuse the same values in the same words,
//! while parsing and before anything is attached.

use std::{
    net::{SocketAddr, ToSocketAddrs as _},
    path::{Path, PathBuf},
    time::Duration,
};

use allocwatch_common::capacity;

use crate::probes::Mode;

/// Why a value was refused: one sentence, without the flag or key (the caller names it).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

impl ValueError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

// ---------------------------------------------------------------------------------------------
// Durations

/// Allowed range of one kind of duration.
#[derive(Clone, Copy, Debug)]
pub struct DurationLimit {
    pub min: Duration,
    pub max: Duration,
    /// Completes "must be at least MIN: …".
    why_min: &'static str,
}

/// Longer than any session or TTL anyone means; far from the timers' overflow.
const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

/// `top --interval`: each refresh reads every kernel map and redraws the terminal.
pub const INTERVAL: DurationLimit = DurationLimit {
    min: Duration::from_millis(100),
    max: Duration::from_secs(3600),
    why_min: "each refresh reads every kernel map and redraws the screen",
};

/// `--duration`.
pub const SESSION: DurationLimit = DurationLimit {
    min: Duration::from_millis(1),
    max: YEAR,
    why_min: "a zero duration stops before anything is traced (leave --duration out to trace \
              until the target exits)",
};

/// `leaks --min-age`: 0 means every outstanding allocation.
pub const MIN_AGE: DurationLimit = DurationLimit {
    min: Duration::ZERO,
    max: YEAR,
    why_min: "",
};

/// The agent's `ttl`: below a second, the series of a process that exits are dropped before
/// any scraper can read its final counts.
pub const TTL: DurationLimit = DurationLimit {
    min: Duration::from_secs(1),
    max: YEAR,
    why_min: "the series of an exited process must outlive a scrape, or its final counts are \
              never read (make it longer than the scrape interval; default 10m)",
};

/// Parses `500ms`, `1s`, `2.5s`, `5m`, `1h` (a bare number is seconds), then checks `limit`.
pub fn duration(s: &str, limit: &DurationLimit) -> Result<Duration, ValueError> {
    let d = parse_duration(s)?;
    if d < limit.min {
        return Err(ValueError::new(format!(
            "must be at least {}: {}",
            duration_text(limit.min),
            limit.why_min
        )));
    }
    if d > limit.max {
        return Err(ValueError::new(format!(
            "must be at most {}",
            duration_text(limit.max)
        )));
    }
    Ok(d)
}

/// The duration syntax alone (no bounds).
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(ValueError::new(format!(
            "{s:?} is negative: a duration is 0 or more"
        )));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        ValueError::new(format!(
            "{s:?} is not a duration (examples: 500ms, 1s, 5m, 1h)"
        ))
    })?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => {
            return Err(ValueError::new(format!(
                "unknown unit {unit:?} in {s:?} (use ms, s, m or h)"
            )));
        }
    };
    Duration::try_from_secs_f64(secs)
        .map_err(|_| ValueError::new(format!("{s:?} is too long a duration")))
}

/// `1h`, `10m` or `30s`: the largest unit that divides the duration (milliseconds otherwise).
pub fn duration_text(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        0 => "0s".to_string(),
        _ if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        _ if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        _ if ms % 1000 == 0 => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

// ---------------------------------------------------------------------------------------------
// Counts

/// Allowed range of a count (rows, series, map entries).
#[derive(Clone, Copy, Debug)]
pub struct CountLimit {
    pub min: u64,
    pub max: u64,
    /// Completes "must be at least MIN: …".
    why_min: &'static str,
    /// Completes "must be at most MAX: …".
    why_max: &'static str,
}

/// `--top`: rows per table.
pub const TOP: CountLimit = CountLimit {
    min: 1,
    max: 1_000_000,
    why_min: "a table of 0 rows shows nothing",
    why_max: "more rows than any report can hold",
};

/// The agent's `top_k`: call sites per process identity with their own series.
pub const TOP_K: CountLimit = CountLimit {
    min: 1,
    max: 1_000_000,
    why_min: "0 would give no call site a series of its own (to export no call-site series, \
              set max_site_series = 0)",
    why_max: "more series than any Prometheus server can hold",
};

/// The agent's `max_site_series`: 0 exports no call-site series at all.
pub const MAX_SITE_SERIES: CountLimit = CountLimit {
    min: 0,
    max: 100_000_000,
    why_min: "",
    why_max: "more series than any Prometheus server can hold",
};

/// `--sample-bytes` / `sample_bytes`: mean bytes between sampled calls; 0 samples every call.
pub const SAMPLE_BYTES: CountLimit = CountLimit {
    min: 0,
    max: allocwatch_common::sample::MAX_MEAN,
    why_min: "",
    why_max: "the probe's fixed-point draw holds means up to 1 TiB",
};

/// `--sample-bytes` as a clap value parser.
pub fn sample_bytes(s: &str) -> Result<u64, ValueError> {
    count(s, &SAMPLE_BYTES)
}

/// A kernel map's capacity: the kernel reserves memory for every entry when it creates the map
/// (it cannot be grown later), so an absurd value either fails or takes the node's memory.
/// Maxima are 16 times the defaults (LIVE: 16 Mi entries, about 1.7 GiB of kernel memory,
/// created in about half a second on the test machine; 100 M entries did not finish in 20 s).
const fn map_capacity(default: u32) -> CountLimit {
    CountLimit {
        min: 1,
        max: default as u64 * 16,
        why_min: "a kernel map needs at least one entry",
        why_max: "the kernel reserves memory for every entry when the map is created",
    }
}

/// `--max-live` / `capacity.max_live` (entry: 16-byte key, 40-byte value, ~48 bytes of kernel
/// bookkeeping).
pub const MAX_LIVE: CountLimit = map_capacity(capacity::LIVE);
/// `--max-sites` / `capacity.max_sites` (per-CPU values: 56 bytes per CPU per entry).
pub const MAX_SITES: CountLimit = map_capacity(capacity::SITES);
/// `--max-stacks` / `capacity.max_stacks` (a 64-frame stack: 512 bytes per entry).
pub const MAX_STACKS: CountLimit = map_capacity(capacity::STACKS);
/// `--max-pending` / `capacity.max_pending` (two maps of that size).
pub const MAX_PENDING: CountLimit = map_capacity(capacity::PENDING);

/// Parses a decimal count and checks `limit`.
pub fn count(s: &str, limit: &CountLimit) -> Result<u64, ValueError> {
    let s = s.trim();
    if s.starts_with('-') {
        return Err(ValueError::new(format!(
            "{s} is negative: it must be at least {}",
            limit.min
        )));
    }
    let n: u64 = s
        .parse()
        .map_err(|_| ValueError::new(format!("{s:?} is not a whole number")))?;
    check_count(n, limit)
}

/// Checks a count that is already a number (config files).
pub fn check_count(n: u64, limit: &CountLimit) -> Result<u64, ValueError> {
    if n < limit.min {
        return Err(ValueError::new(format!(
            "must be at least {}: {}",
            limit.min, limit.why_min
        )));
    }
    if n > limit.max {
        return Err(ValueError::new(format!(
            "must be at most {}: {}",
            limit.max, limit.why_max
        )));
    }
    Ok(n)
}

/// A count limit as a clap value parser of `u32`.
pub fn count_u32(limit: CountLimit) -> impl Fn(&str) -> Result<u32, ValueError> + Clone {
    move |s| count(s, &limit).map(|n| n as u32)
}

/// A count limit as a clap value parser of `usize`.
pub fn count_usize(limit: CountLimit) -> impl Fn(&str) -> Result<usize, ValueError> + Clone {
    move |s| count(s, &limit).map(|n| n as usize)
}

// ---------------------------------------------------------------------------------------------
// Processes, patterns, addresses, modes, files

/// `--pid`: a process that can exist (0 is the kernel's idle task, not a process).
pub fn pid(s: &str) -> Result<std::num::NonZeroU32, ValueError> {
    let s = s.trim();
    let n: u32 = s
        .parse()
        .map_err(|_| ValueError::new(format!("{s:?} is not a process id (a whole number)")))?;
    let max = pid_max();
    if n > max {
        return Err(ValueError::new(format!(
            "no process can have pid {n}: the largest pid is {max} (/proc/sys/kernel/pid_max)"
        )));
    }
    std::num::NonZeroU32::new(n)
        .ok_or_else(|| ValueError::new("pid 0 is not a process (it names the kernel's idle task)"))
}

/// The kernel's `pid_max` (its largest possible value when unreadable).
fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .map_or(4_194_304, |m| m.saturating_sub(1))
}

/// A regular expression (process selection): compiled once here to refuse a bad one.
pub fn regex(s: &str) -> Result<String, ValueError> {
    regex::Regex::new(s).map_err(|e| ValueError::new(regex_error(&e)))?;
    Ok(s.to_string())
}

/// regex's multi-line message (the pattern, a caret, `error: …`) as one phrase.
fn regex_error(e: &regex::Error) -> String {
    match e {
        regex::Error::Syntax(text) => {
            let what = text
                .lines()
                .rev()
                .find_map(|l| l.trim().strip_prefix("error: "))
                .unwrap_or(text.as_str());
            format!("not a regular expression: {what}")
        }
        other => format!("not a usable regular expression: {other}"),
    }
}

/// The listen address: `HOST:PORT`, where HOST is an IP address or a name resolved now
/// (`localhost:9464`; of its addresses the first IPv4 one, which is what scrapers of
/// `localhost` try first, else the first).
pub fn listen(s: &str) -> Result<SocketAddr, ValueError> {
    let s = s.trim();
    let addr = match s.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => {
            let Some((host, port)) = s.rsplit_once(':') else {
                return Err(ValueError::new(format!(
                    "{s:?} has no port: expected HOST:PORT, e.g. 0.0.0.0:9464 or localhost:9464"
                )));
            };
            if port.parse::<u16>().is_err() {
                return Err(ValueError::new(format!(
                    "{port:?} is not a port (1-65535): expected HOST:PORT, e.g. 0.0.0.0:9464"
                )));
            }
            if host.is_empty() {
                return Err(ValueError::new(format!(
                    "{s:?} has no host: expected HOST:PORT, e.g. 0.0.0.0:9464"
                )));
            }
            let addrs: Vec<SocketAddr> = s
                .to_socket_addrs()
                .map_err(|e| ValueError::new(format!("cannot resolve {host:?}: {e}")))?
                .collect();
            addrs
                .iter()
                .find(|a| a.is_ipv4())
                .or(addrs.first())
                .copied()
                .ok_or_else(|| ValueError::new(format!("{host:?} has no address")))?
        }
    };
    if addr.port() == 0 {
        return Err(ValueError::new(
            "port 0 would be a random port that no scraper knows: give a port, e.g. 9464",
        ));
    }
    Ok(addr)
}

/// `--mode` of the CLI sessions: every mode with its help, the benchmark-only floor modes
/// hidden.
pub fn mode_parser() -> impl clap::builder::TypedValueParser<Value = Mode> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
    PossibleValuesParser::new(Mode::ALL.map(|m| {
        PossibleValue::new(m.name())
            .help(m.help())
            .hide(!m.is_public())
    }))
    // Only the names above get here.
    .map(|name| Mode::from_name(&name).unwrap_or_default())
}

/// A `--mode` of the agent: the benchmark-only floor modes are refused.
pub fn public_mode(s: &str) -> Result<Mode, ValueError> {
    match Mode::from_name(s) {
        Some(m) if m.is_public() => Ok(m),
        _ => Err(ValueError::new(format!(
            "unknown mode `{s}`: expected one of {}",
            Mode::public_names().join(", ")
        ))),
    }
}

/// `--log-level`: a level of the `log` crate, any case.
pub fn log_level(s: &str) -> Result<log::LevelFilter, ValueError> {
    s.parse().map_err(|_| {
        ValueError::new(format!(
            "unknown level `{s}`: expected one of off, error, warn, info, debug, trace"
        ))
    })
}

/// A file allocwatch writes at the end of a session: checked before tracing starts, so that a
/// long run is not lost at the end for a missing directory.
pub fn output_file(s: &str) -> Result<PathBuf, ValueError> {
    let path = PathBuf::from(s);
    if s.is_empty() {
        return Err(ValueError::new("an empty file name"));
    }
    if path.is_dir() {
        return Err(ValueError::new(format!(
            "{s} is a directory: give a file name"
        )));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ValueError::new(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        Err(_) => {
            return Err(ValueError::new(format!(
                "directory {} does not exist",
                dir.display()
            )));
        }
    }
    let c_dir = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(dir.as_os_str()))
        .map_err(|_| ValueError::new("a file name with a NUL byte"))?;
    // SAFETY: a valid NUL-terminated path.
    if unsafe { libc::access(c_dir.as_ptr(), libc::W_OK) } != 0 {
        return Err(ValueError::new(format!(
            "cannot write in {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels() {
        assert_eq!(log_level("debug"), Ok(log::LevelFilter::Debug));
        assert_eq!(log_level("WARN"), Ok(log::LevelFilter::Warn));
        assert_eq!(log_level("off"), Ok(log::LevelFilter::Off));
        let e = log_level("loud").unwrap_err();
        assert!(e.to_string().contains("unknown level `loud`"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert!(parse_duration("1x").is_err());
        assert!(parse_duration("s").is_err());
        let neg = parse_duration("-1s").unwrap_err().to_string();
        assert!(neg.contains("negative"), "{neg}");
        assert!(parse_duration("99999999999999999999999s").is_err());
    }

    #[test]
    fn duration_limits() {
        let e = duration("0s", &INTERVAL).unwrap_err().to_string();
        assert!(e.starts_with("must be at least 100ms: "), "{e}");
        assert_eq!(
            duration("100ms", &INTERVAL).unwrap(),
            Duration::from_millis(100)
        );
        assert!(duration("2h", &INTERVAL).is_err());
        assert!(duration("0s", &SESSION).is_err());
        assert_eq!(duration("0s", &MIN_AGE).unwrap(), Duration::ZERO);
        let e = duration("0s", &TTL).unwrap_err().to_string();
        assert!(e.contains("scrape"), "{e}");
        assert!(duration("9000h", &TTL).is_err(), "beyond a year");
        // Far beyond a year but still a Duration: refused, never added to an Instant.
        assert!(duration("9999999999999999999s", &SESSION).is_err());
    }

    #[test]
    fn counts() {
        assert_eq!(count("10", &TOP), Ok(10));
        assert!(count("0", &TOP).unwrap_err().to_string().contains("0 rows"));
        assert!(
            count("-1", &TOP)
                .unwrap_err()
                .to_string()
                .contains("negative")
        );
        assert!(count("ten", &TOP).is_err());
        assert_eq!(count("0", &MAX_SITE_SERIES), Ok(0));
        assert_eq!(
            MAX_LIVE.max,
            u64::from(capacity::LIVE) * 16,
            "16 Mi entries were created here in about half a second"
        );
        let e = count("4000000000", &MAX_LIVE).unwrap_err().to_string();
        assert!(e.contains("at most 16777216"), "{e}");
        assert!(count("0", &MAX_STACKS).is_err());
    }

    #[test]
    fn pids() {
        assert_eq!(pid("42").unwrap().get(), 42);
        assert!(pid("0").unwrap_err().to_string().contains("idle task"));
        assert!(pid("x").is_err());
        assert!(
            pid("4294967295")
                .unwrap_err()
                .to_string()
                .contains("pid_max")
        );
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            listen("127.0.0.1:9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(listen("[::1]:9464").unwrap(), "[::1]:9464".parse().unwrap());
        let local = listen("localhost:9464").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 9464, "{local}");
        assert!(
            listen("nowhere")
                .unwrap_err()
                .to_string()
                .contains("no port")
        );
        assert!(listen("localhost:http").is_err());
        assert!(
            listen("127.0.0.1:0")
                .unwrap_err()
                .to_string()
                .contains("port 0")
        );
        assert!(listen(":9464").is_err());
        let e = listen("no-such-host.invalid:9464").unwrap_err().to_string();
        assert!(
            e.starts_with("cannot resolve \"no-such-host.invalid\""),
            "{e}"
        );
    }

    #[test]
    fn regexes_are_one_phrase() {
        assert_eq!(regex("^a$"), Ok("^a$".to_string()));
        assert_eq!(
            regex("(").unwrap_err().to_string(),
            "not a regular expression: unclosed group"
        );
    }

    #[test]
    fn modes() {
        assert_eq!(public_mode("count"), Ok(Mode::Count));
        assert!(
            public_mode("floor")
                .unwrap_err()
                .to_string()
                .contains("unknown mode")
        );
    }

    #[test]
    fn output_files() {
        assert!(output_file("/tmp/allocwatch-report.json").is_ok());
        assert!(output_file("report.json").is_ok());
        let e = output_file("/nonexistent/dir/x.json")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "directory /nonexistent/dir does not exist");
        assert!(
            output_file("/tmp")
                .unwrap_err()
                .to_string()
                .contains("directory")
        );
        assert!(output_file("/etc/passwd/x").is_err());
    }
}
