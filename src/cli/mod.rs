//! The `trellis` command line: `trellis server` and the client commands.

pub mod client;
pub mod commands;
pub mod files;
pub mod output;
pub mod server;

use std::process::ExitCode;

use clap::Parser;

/// Trellis, a Garden-compatible container server and its client.
#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about,
    after_help = "Client commands connect to --target: host:port for TCP, or the path of a Unix socket \
                  (default 127.0.0.1:7777, or the TRELLIS_TARGET environment variable). \
                  Each command's --help lists its options with their units. \
                  On failure a command prints the server's error message and exits non-zero."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the Garden server.
    Server(server::ServerArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
}

/// Parses the command line and runs the chosen subcommand.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Server(args) => server::main(args),
        Command::Client(command) => client::main(command),
    }
}
