use std::process::ExitCode;

fn main() -> ExitCode {
    // The container init, the process shim and the tar helper are this same executable,
    // started by the server in a hidden mode. They are dispatched before any
    // argument parsing or thread creation, because both must stay single
    // threaded to enter namespaces.
    let mut args = std::env::args_os();
    let _program = args.next();
    match args.next().as_deref().and_then(|arg| arg.to_str()) {
        Some(trellis::linux::GARDEN_INIT_COMMAND) => trellis::linux::garden_init_main(args.collect()),
        Some(trellis::linux::SHIM_COMMAND) => trellis::linux::shim_main(args.collect()),
        Some(trellis::linux::FILES_COMMAND) => trellis::linux::files_main(args.collect()),
        _ => trellis::cli::main(),
    }
}
