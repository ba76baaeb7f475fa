//! The client subcommands of `trellis`.

use std::process::ExitCode;

/// Client subcommands, each pointed at a server by `--target`.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Check that the server answers.
    Ping,
}

/// Runs one client subcommand.
pub fn main(_command: ClientCommand) -> ExitCode {
    eprintln!("trellis: client commands are not built yet");
    ExitCode::FAILURE
}
