//! The admin commands of the `tenet` binary, each a function from parsed
//! arguments to an exit code and text on stdout/stderr.

pub mod cert;
pub mod payload;
pub mod policy;

/// How a command prints its result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Output {
    /// For a person.
    #[default]
    Text,
    /// One JSON document on stdout, for programs.
    Json,
}
