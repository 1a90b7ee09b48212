//! The exit codes of every subcommand (also listed in `refetch --help`).
//!
//! | code | meaning |
//! |---|---|
//! | 0 | success (for `run`: stopped gracefully after a signal) |
//! | 1 | failure (a check failed, an entity could not be refreshed, the pipeline failed) |
//! | 2 | invalid command line or configuration |
//! | 130 | interrupted: a one-shot command stopped by a signal, or a second signal |

/// A check failed or the work could not be done.
pub const FAILURE: u8 = 1;
/// The command line or the configuration is invalid.
pub const CONFIG: u8 = 2;
/// Stopped by a signal before the work was done.
pub const INTERRUPTED: u8 = 130;

/// A configuration problem found after the file loaded (for example a sink setting only the
/// sink itself can check): `main` exits with [`CONFIG`] for it.
#[derive(Debug)]
pub struct InvalidConfiguration(pub String);

impl std::fmt::Display for InvalidConfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid configuration: {}", self.0)
    }
}

impl std::error::Error for InvalidConfiguration {}
