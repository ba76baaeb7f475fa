//! `trellis server`: loads the configuration and runs the server.

use std::process::ExitCode;

/// Options of `trellis server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {}

/// Runs the server until it is told to stop.
pub fn main(_args: ServerArgs) -> ExitCode {
    eprintln!("trellis server: not built yet");
    ExitCode::FAILURE
}
