//! The server's log level, changeable while it runs.
//!
//! A [`LevelSwitch`] contains the minimum level. The root logger filters
//! through a [`SwitchFilter`] drain that reads it for every record, and the
//! debug listener's `POST /log-level` sets it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The minimum level of the log, shared by the logger and the debug listener.
#[derive(Debug, Clone)]
pub struct LevelSwitch(Arc<AtomicUsize>);

impl LevelSwitch {
    pub fn new(level: slog::Level) -> LevelSwitch {
        LevelSwitch(Arc::new(AtomicUsize::new(level.as_usize())))
    }

    pub fn level(&self) -> slog::Level {
        slog::Level::from_usize(self.0.load(Ordering::Relaxed)).unwrap_or(slog::Level::Info)
    }

    /// Sets the level, for slog records and for records of the `log` crate
    /// (actix and other libraries), whose filter is process-wide.
    pub fn set(&self, level: slog::Level) {
        self.0.store(level.as_usize(), Ordering::Relaxed);
        log::set_max_level(log_filter_of(level));
    }
}

/// A drain that passes records at or above the switch's level.
pub struct SwitchFilter<D> {
    drain: D,
    switch: LevelSwitch,
}

impl<D> SwitchFilter<D> {
    pub fn new(drain: D, switch: LevelSwitch) -> SwitchFilter<D> {
        SwitchFilter { drain, switch }
    }
}

impl<D: slog::Drain> slog::Drain for SwitchFilter<D> {
    type Ok = Option<D::Ok>;
    type Err = D::Err;

    fn log(&self, record: &slog::Record, values: &slog::OwnedKVList) -> Result<Self::Ok, Self::Err> {
        if record.level().is_at_least(self.switch.level()) {
            self.drain.log(record, values).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Parses a level as gdn's `/log-level` endpoint accepts it: `debug`,
/// `info`, `warn`, `error`, `fatal`, their first letters, or `0` to `4` in
/// that order. `trace` and `critical`, slog's extra levels, are accepted too.
pub fn parse_level(text: &str) -> Result<slog::Level, String> {
    let level = match text.trim().to_ascii_lowercase().as_str() {
        "trace" => slog::Level::Trace,
        "debug" | "d" | "0" => slog::Level::Debug,
        "info" | "i" | "1" => slog::Level::Info,
        "warn" | "warning" | "w" | "2" => slog::Level::Warning,
        "error" | "e" | "3" => slog::Level::Error,
        "fatal" | "f" | "4" | "critical" => slog::Level::Critical,
        _ => {
            return Err(format!(
                "invalid log level {text:?}: expected debug, info, warn, error or fatal (or d, i, w, e, f, or 0 to 4)"
            ))
        }
    };
    Ok(level)
}

/// Returns the `log` crate filter that matches an slog level.
pub fn log_filter_of(level: slog::Level) -> log::LevelFilter {
    match level {
        slog::Level::Critical | slog::Level::Error => log::LevelFilter::Error,
        slog::Level::Warning => log::LevelFilter::Warn,
        slog::Level::Info => log::LevelFilter::Info,
        slog::Level::Debug => log::LevelFilter::Debug,
        slog::Level::Trace => log::LevelFilter::Trace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slog::Drain;
    use std::sync::Mutex;

    /// Keeps the message of every record it receives.
    struct Collect(Arc<Mutex<Vec<String>>>);

    impl Drain for Collect {
        type Ok = ();
        type Err = slog::Never;

        fn log(&self, record: &slog::Record, _values: &slog::OwnedKVList) -> Result<(), slog::Never> {
            self.0.lock().unwrap().push(record.msg().to_string());
            Ok(())
        }
    }

    #[test]
    fn switch_changes_filter_live() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let switch = LevelSwitch::new(slog::Level::Info);
        let logger = slog::Logger::root(SwitchFilter::new(Collect(seen.clone()), switch.clone()).fuse(), slog::o!());
        slog::debug!(logger, "hidden");
        slog::info!(logger, "shown");
        switch.set(slog::Level::Debug);
        slog::debug!(logger, "now shown");
        switch.set(slog::Level::Error);
        slog::warn!(logger, "hidden again");
        assert_eq!(*seen.lock().unwrap(), vec!["shown", "now shown"]);
    }

    #[test]
    fn levels_parse_like_gdn() {
        for (text, level) in [("debug", slog::Level::Debug), ("I", slog::Level::Info), ("2", slog::Level::Warning), ("e", slog::Level::Error), ("fatal", slog::Level::Critical), (" info\n", slog::Level::Info)] {
            assert_eq!(parse_level(text), Ok(level), "{text}");
        }
        for bad in ["", "loud", "5", "-1"] {
            let error = parse_level(bad).unwrap_err();
            assert!(error.contains("invalid log level"), "{error}");
        }
    }
}
