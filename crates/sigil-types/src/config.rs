//! The error of loading a TOML configuration file, shared by the server and
//! the agent so that both name the file and the key the same way.

use std::path::PathBuf;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema (unknown keys, wrong types, bad durations).
    #[error("invalid config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, naming the key.
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("invalid config{}: {key}: {message}", path.as_ref().map(|p| format!(" file {}", p.display())).unwrap_or_default())]
    Invalid {
        /// The file, if any.
        path: Option<PathBuf>,
        /// The key.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Checks values that must be above zero (sizes, counts, rates, durations
/// as nanoseconds), in order; the first that is zero is refused through
/// `invalid`, which names its key (and the file).
pub fn require_positive(
    values: &[(&'static str, u128)],
    invalid: &dyn Fn(&'static str, String) -> ConfigError,
) -> Result<(), ConfigError> {
    match values.iter().find(|(_, v)| *v == 0) {
        Some((key, _)) => Err(invalid(key, "must be greater than 0".into())),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;

    fn invalid(key: &'static str, message: String) -> ConfigError {
        ConfigError::Invalid {
            path: None,
            key,
            message,
        }
    }

    #[test]
    fn the_first_zero_value_is_named() {
        assert!(require_positive(&[("a", 1), ("b", 2)], &invalid).is_ok());
        let err = require_positive(&[("a", 1), ("b", 0), ("c", 0)], &invalid)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "invalid config: b: must be greater than 0");
    }
}
