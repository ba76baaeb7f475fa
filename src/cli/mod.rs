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
#[command(name = "trellis", version, about)]
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
