//! Logs (O2): `tracing` to stderr, as text for people or JSON lines for
//! machines (`--log-format json`, TOML `log_format`). The level comes from
//! `RUST_LOG` (default `info` for `serve`, `warn` for client commands).
//!
//! A JSON line carries the time, level, target, message and the event's
//! fields (`shard`, `topic`, `partition`, ... where they apply) at the top
//! level, and the spans it ran in, so a log pipeline can filter on them
//! without parsing text.

use crate::error::Error;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<LogFormat, Error> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(Error::Config(format!(
                "invalid log format {other:?}: expected text or json"
            ))),
        }
    }
}

/// Installs the process' subscriber: `RUST_LOG` or `default_level`, to
/// stderr, in `format`. Call once.
pub fn init(default_level: &str, format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_thread_names(true)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse() {
        assert_eq!("json".parse::<LogFormat>().ok(), Some(LogFormat::Json));
        assert_eq!("text".parse::<LogFormat>().ok(), Some(LogFormat::Text));
        assert!("yaml".parse::<LogFormat>().is_err());
    }
}
