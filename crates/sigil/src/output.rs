//! The output format shared by the commands that show or list things.

use clap::ValueEnum;

/// Output format of show and list commands.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub(crate) enum Output {
    /// Human-readable text.
    #[default]
    Text,
    /// JSON, one document.
    Json,
}
