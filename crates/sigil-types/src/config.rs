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
