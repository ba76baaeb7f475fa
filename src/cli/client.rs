//! The client subcommands of `trellis`: each one makes Garden API calls
//! through [`crate::client`] and prints the result.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use crate::api::{
    BandwidthLimits, BindMount, ContainerSpec, CpuLimits, DiskLimits, ImageRef, Limits, MemoryLimits, NetIn, PidLimits,
    ProcessSpec, TtySpec, WindowSize, BIND_MOUNT_MODE_RO, BIND_MOUNT_MODE_RW,
};
use super::output::OutputArgs;
use super::{commands, files};
use crate::client::{Client, ClientError, ProcessController, ProcessIo, Signal, Target};

/// Exit code of `run` and `attach` when the request itself fails, as
/// opposed to the process exiting with a non-zero status.
const REQUEST_FAILED_EXIT_CODE: u8 = 125;

/// Property that `trellis run` puts on the containers it creates.
const CREATED_BY_PROPERTY: &str = "trellis.created-by";

/// Server address option shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Garden server address: `host:port` for TCP, or the path of a Unix
    /// socket (anything containing `/`, or `unix:PATH`).
    #[arg(long, env = "TRELLIS_TARGET", default_value = "127.0.0.1:7777", global = true)]
    pub target: String,
}

/// Client subcommands, each pointed at a server by `--target`.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Check that the server responds to a ping.
    Ping {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Create a container and print its handle.
    Create(Box<CreateArgs>),
    /// Print the server's memory, disk and container capacity.
    Capacity {
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// List containers with their state, address and process count.
    List {
        /// Only list containers with this property, as KEY=VALUE; repeat to
        /// require several (all must match).
        #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        properties: Vec<(String, String)>,
        /// Print only the handles, one per line (for scripts).
        #[arg(long, short = 'q', conflicts_with = "json")]
        quiet: bool,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Print a container's state, addresses, processes and properties.
    Info {
        /// Handle of the container.
        handle: String,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Print the info of several containers in one request.
    BulkInfo {
        /// Handles of the containers.
        #[arg(required = true)]
        handles: Vec<String>,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Print memory, CPU time and disk usage of one or more containers.
    Metrics {
        /// Handles of the containers; one handle uses the single-container
        /// route, several use the bulk route.
        #[arg(required = true)]
        handles: Vec<String>,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Print a container's limits, after setting those given as options.
    Limits(Box<commands::LimitsArgs>),
    /// Set a container's grace time: the idle time after which the server
    /// destroys it.
    GraceTime {
        /// Handle of the container.
        handle: String,
        /// A duration such as 30s, 5m or 1h30m (units ns, us, ms, s, m, h);
        /// 0 means never.
        #[arg(value_parser = parse_duration)]
        grace_time: Duration,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Forward a host port to a port of the container.
    NetIn {
        /// Handle of the container.
        handle: String,
        /// Host port; 0 lets the server pick one from its pool.
        #[arg(long, default_value_t = 0)]
        host_port: u32,
        /// Container port; 0 means the same as the host port.
        #[arg(long, default_value_t = 0)]
        container_port: u32,
        #[command(flatten)]
        output: OutputArgs,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Allow outbound traffic from the container.
    NetOut(Box<commands::NetOutArgs>),
    /// Allow outbound traffic by several rules from a JSON file, sent in
    /// one request: the server adds all of them or none.
    BulkNetOut(Box<commands::BulkNetOutArgs>),
    /// Copy a local file or directory (or a tar archive) into a container.
    StreamIn(Box<files::StreamInArgs>),
    /// Copy a file or directory out of a container.
    StreamOut(Box<files::StreamOutArgs>),
    /// Run a command in a container, streaming stdin, stdout and stderr,
    /// and exit with the command's exit code.
    ///
    /// Without --handle, a new container is created first. That container
    /// is kept after the command exits, so `trellis list` shows it, unless
    /// --rm is given or the command could not be started; it carries the
    /// property `trellis.created-by=run`. Exits with 125 when a request
    /// fails.
    Run(Box<RunArgs>),
    /// Attach to a running process, stream its output and exit with its
    /// exit code (125 when a request fails).
    Attach {
        /// Handle of the container.
        handle: String,
        /// Id of the process, as `run` printed or was given with
        /// --process-id.
        process_id: String,
        /// Also forward this terminal's stdin to the process; its end of
        /// file closes the process's stdin.
        #[arg(long)]
        stdin: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Stop every process in a container: SIGTERM, then SIGKILL after the
    /// server's timeout (10 seconds in Garden's reference backend).
    Stop {
        /// Handle of the container.
        handle: String,
        /// Send SIGKILL at once instead of SIGTERM first.
        #[arg(long)]
        kill: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Destroy containers and everything running in them.
    Destroy {
        /// Handles of the containers, destroyed in order; the first failure
        /// stops the command.
        #[arg(required = true)]
        handles: Vec<String>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Read and change container properties.
    Properties {
        #[command(subcommand)]
        command: PropertiesCommand,
        #[command(flatten)]
        target: TargetArgs,
    },
}

/// Options of `trellis create` that describe the container.
#[derive(Debug, clap::Args)]
pub struct ContainerArgs {
    /// Property to set, as KEY=VALUE; repeat for several.
    #[arg(long = "property", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub properties: Vec<(String, String)>,
    /// Environment variable of the container, as NAME=VALUE; every process
    /// in it inherits it. Repeat for several.
    #[arg(long = "container-env", value_name = "NAME=VALUE")]
    pub container_env: Vec<String>,
    /// Run the container without a user namespace, as the host's root.
    #[arg(long)]
    pub privileged: bool,
    /// Root filesystem directory on the server host (the server's default
    /// rootfs when neither this nor --image is given).
    #[arg(long, value_name = "PATH", conflicts_with = "image")]
    pub rootfs: Option<String>,
    /// Root filesystem image URI, such as `raw:///path` or `docker:///name`.
    #[arg(long, value_name = "URI")]
    pub image: Option<String>,
    /// Idle time after which the server destroys the container, such as
    /// `30s`, `5m` or `1h30m` (units ns, us, ms, s, m, h); `0` means never.
    /// Default: the server's default grace time.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub grace_time: Option<Duration>,
    /// Static subnet of the container, outside the server's dynamic pool:
    /// `IP/PREFIX` takes that address (the network address takes the next
    /// free one), and a bare IPv4 address means IP/30. The first usable
    /// address of the subnet is the gateway, so it can't be the container's.
    /// Default: the next free /30 block of the server's pool.
    #[arg(long, value_name = "CIDR_OR_IP", value_parser = parse_network)]
    pub network: Option<String>,
    /// Memory limit, in bytes (suffixes K, M, G for KiB, MiB, GiB).
    #[arg(long, value_name = "BYTES", value_parser = commands::parse_size)]
    pub memory: Option<u64>,
    /// CPU weight, in cgroup shares (the kernel uses 2 to 262144 and
    /// raises smaller values to 2; its default is 1024).
    #[arg(long, value_name = "SHARES")]
    pub cpu_shares: Option<u64>,
    /// Maximum number of processes and threads in the container, a count.
    #[arg(long, value_name = "COUNT")]
    pub pids: Option<u64>,
    /// Hard disk limit, in bytes (suffixes K, M, G).
    #[arg(long, visible_alias = "disk-bytes", value_name = "BYTES", value_parser = commands::parse_size)]
    pub disk: Option<u64>,
    /// Hard limit on inodes (files and directories), a count.
    #[arg(long, value_name = "COUNT")]
    pub disk_inodes: Option<u64>,
    /// Scope of the disk limits: total (the image plus what the container
    /// writes) or exclusive (only what it writes).
    #[arg(long, value_name = "SCOPE", value_parser = commands::parse_disk_scope)]
    pub disk_scope: Option<u8>,
    /// Bandwidth rate, in bytes per second (suffixes K, M, G); needs
    /// --bandwidth-burst.
    #[arg(long, value_name = "BYTES_PER_SECOND", value_parser = commands::parse_size, requires = "bandwidth_burst")]
    pub bandwidth_rate: Option<u64>,
    /// Bandwidth burst, in bytes (suffixes K, M, G); needs
    /// --bandwidth-rate.
    #[arg(long, value_name = "BYTES", value_parser = commands::parse_size, requires = "bandwidth_rate")]
    pub bandwidth_burst: Option<u64>,
    /// Forward a host port to a container port, as HOST:CONTAINER; host
    /// port 0 lets the server pick one, container port 0 means the same as
    /// the host port. Repeat for several.
    #[arg(long = "net-in", value_name = "HOST:CONTAINER", value_parser = commands::parse_net_in)]
    pub net_in: Vec<NetIn>,
    /// Mount a directory or file of the server host into the container, as
    /// SRC:DST, read-write, or SRC:DST:ro, read-only. Both paths are
    /// absolute. Repeat for several.
    #[arg(long = "bind-mount", value_name = "SRC:DST[:ro]", value_parser = parse_bind_mount)]
    pub bind_mounts: Vec<BindMount>,
}

impl ContainerArgs {
    /// Returns whether any option was given.
    fn sets_anything(&self) -> bool {
        !self.properties.is_empty()
            || !self.container_env.is_empty()
            || self.privileged
            || self.rootfs.is_some()
            || self.image.is_some()
            || self.grace_time.is_some()
            || self.network.is_some()
            || self.sets_limits()
            || !self.net_in.is_empty()
            || !self.bind_mounts.is_empty()
    }

    fn sets_limits(&self) -> bool {
        self.memory.is_some()
            || self.cpu_shares.is_some()
            || self.pids.is_some()
            || self.disk.is_some()
            || self.disk_inodes.is_some()
            || self.disk_scope.is_some()
            || self.bandwidth_rate.is_some()
    }

    /// Builds the spec's limits from the options. Unset limits stay 0,
    /// which Garden reads as no limit.
    fn limits(&self) -> Limits {
        Limits {
            bandwidth_limits: BandwidthLimits {
                rate: self.bandwidth_rate.unwrap_or(0),
                burst: self.bandwidth_burst.unwrap_or(0),
            },
            cpu_limits: CpuLimits {
                weight: self.cpu_shares.unwrap_or(0),
                limit_in_shares: 0,
            },
            disk_limits: DiskLimits {
                byte_hard: self.disk.unwrap_or(0),
                inode_hard: self.disk_inodes.unwrap_or(0),
                scope: self.disk_scope.unwrap_or(0),
                ..DiskLimits::default()
            },
            memory_limits: MemoryLimits {
                limit_in_bytes: self.memory.unwrap_or(0),
            },
            pid_limits: PidLimits {
                max: self.pids.unwrap_or(0),
            },
        }
    }
}

/// Options of `trellis create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Handle of the new container (the server generates one when omitted).
    pub handle: Option<String>,
    #[command(flatten)]
    pub container: ContainerArgs,
    /// Environment variable of the container, as NAME=VALUE; repeat for
    /// several. The same as --container-env.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Options of `trellis run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Run in this existing container instead of creating one.
    #[arg(long, conflicts_with = "create")]
    pub handle: Option<String>,
    /// Create a new container for the command (the default without
    /// --handle).
    #[arg(long)]
    pub create: bool,
    /// Destroy the container created for the command once it exited.
    #[arg(long, conflicts_with = "handle")]
    pub rm: bool,
    #[command(flatten)]
    pub container: ContainerArgs,
    /// Environment variable of the process, as NAME=VALUE; repeat for
    /// several.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    pub env: Vec<String>,
    /// Working directory of the process inside the container.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<String>,
    /// User the process runs as inside the container (default root).
    #[arg(long)]
    pub user: Option<String>,
    /// Process id to use (the server generates one when omitted).
    #[arg(long = "process-id", value_name = "ID")]
    pub process_id: Option<String>,
    /// Give the process a terminal. When this terminal is a TTY, it is put
    /// in raw mode and its window size is passed on.
    #[arg(long, short = 't')]
    pub tty: bool,
    /// Do not forward stdin; the process's stdin stays open until it exits.
    #[arg(long)]
    pub no_stdin: bool,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<String>,
    #[command(flatten)]
    pub target: TargetArgs,
}

/// Subcommands of `trellis properties`.
#[derive(Debug, clap::Subcommand)]
pub enum PropertiesCommand {
    /// Print every property as KEY=VALUE lines.
    List {
        /// Handle of the container.
        handle: String,
    },
    /// Print one property's value.
    Get {
        /// Handle of the container.
        handle: String,
        /// Name of the property.
        key: String,
    },
    /// Set one property.
    Set {
        /// Handle of the container.
        handle: String,
        /// Name of the property.
        key: String,
        /// New value of the property.
        value: String,
    },
    /// Remove one property.
    Remove {
        /// Handle of the container.
        handle: String,
        /// Name of the property.
        key: String,
    },
}

/// Runs one client subcommand.
pub fn main(command: ClientCommand) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("trellis: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(dispatch(command));
    // A read of this process's stdin may still be blocked in a worker
    // thread; waiting for it would hang until the user types.
    runtime.shutdown_background();
    code
}

async fn dispatch(command: ClientCommand) -> ExitCode {
    let result = match command {
        ClientCommand::Run(args) => return run_command(*args).await,
        ClientCommand::Attach {
            handle,
            process_id,
            stdin,
            target,
        } => return attach_command(&target, &handle, &process_id, stdin).await,
        ClientCommand::Ping { target } => ping(&target).await,
        ClientCommand::Create(args) => create_command(*args).await,
        ClientCommand::Capacity { output, target } => commands::capacity(&target, output).await,
        ClientCommand::List { properties, quiet, output, target } => commands::list(&target, properties, quiet, output).await,
        ClientCommand::Info { handle, output, target } => commands::info(&target, &handle, output).await,
        ClientCommand::BulkInfo { handles, output, target } => commands::bulk_info(&target, &handles, output).await,
        ClientCommand::Metrics { handles, output, target } => commands::metrics(&target, &handles, output).await,
        ClientCommand::Limits(args) => commands::limits(*args).await,
        ClientCommand::GraceTime { handle, grace_time, target } => commands::grace_time(&target, &handle, grace_time).await,
        ClientCommand::NetIn { handle, host_port, container_port, output, target } => {
            commands::net_in(&target, &handle, host_port, container_port, output).await
        }
        ClientCommand::NetOut(args) => commands::net_out(*args).await,
        ClientCommand::BulkNetOut(args) => return exit_code(commands::bulk_net_out(*args).await),
        ClientCommand::StreamIn(args) => return exit_code(files::stream_in(*args).await),
        ClientCommand::StreamOut(args) => return exit_code(files::stream_out(*args).await),
        ClientCommand::Stop { handle, kill, target } => stop(&target, &handle, kill).await,
        ClientCommand::Destroy { handles, target } => destroy(&target, &handles).await,
        ClientCommand::Properties { command, target } => properties(&target, command).await,
    };
    exit_code(result)
}

/// Prints the error, if any, and returns the exit code: 0 or 1.
fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("trellis: {error}");
            ExitCode::FAILURE
        }
    }
}

pub(super) fn connect(args: &TargetArgs) -> Result<Client, ClientError> {
    Ok(Client::new(args.target.parse::<Target>()?))
}

async fn ping(target: &TargetArgs) -> Result<(), ClientError> {
    connect(target)?.ping().await
}

async fn create_command(args: CreateArgs) -> Result<(), ClientError> {
    let client = connect(&args.target)?;
    let mut spec = container_spec(&args.container);
    spec.handle = args.handle.unwrap_or_default();
    spec.env.extend(args.env);
    let handle = client.create(&spec).await?;
    println!("{handle}");
    Ok(())
}

fn container_spec(args: &ContainerArgs) -> ContainerSpec {
    ContainerSpec {
        rootfs: args.rootfs.clone().unwrap_or_default(),
        image: ImageRef {
            uri: args.image.clone().unwrap_or_default(),
            ..ImageRef::default()
        },
        properties: args.properties.iter().cloned().collect(),
        env: args.container_env.clone(),
        privileged: args.privileged,
        grace_time: args
            .grace_time
            .map_or(0, |duration| i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)),
        network: args.network.clone().unwrap_or_default(),
        limits: args.limits(),
        netin: args.net_in.clone(),
        bind_mounts: args.bind_mounts.clone(),
        ..ContainerSpec::default()
    }
}

async fn stop(target: &TargetArgs, handle: &str, kill: bool) -> Result<(), ClientError> {
    connect(target)?.stop(handle, kill).await
}

async fn destroy(target: &TargetArgs, handles: &[String]) -> Result<(), ClientError> {
    let client = connect(target)?;
    for handle in handles {
        client.destroy(handle).await?;
    }
    Ok(())
}

async fn properties(target: &TargetArgs, command: PropertiesCommand) -> Result<(), ClientError> {
    let client = connect(target)?;
    match command {
        PropertiesCommand::List { handle } => {
            for (key, value) in client.properties(&handle).await? {
                println!("{key}={value}");
            }
        }
        PropertiesCommand::Get { handle, key } => println!("{}", client.property(&handle, &key).await?),
        PropertiesCommand::Set { handle, key, value } => client.set_property(&handle, &key, &value).await?,
        PropertiesCommand::Remove { handle, key } => client.remove_property(&handle, &key).await?,
    }
    Ok(())
}

async fn run_command(args: RunArgs) -> ExitCode {
    let client = match connect(&args.target) {
        Ok(client) => client,
        Err(error) => return request_failed(error),
    };
    let (handle, created) = match &args.handle {
        Some(_) if args.container.sets_anything() => {
            eprintln!("trellis: container options such as --property, --rootfs or --memory need a new container, not --handle");
            return ExitCode::from(REQUEST_FAILED_EXIT_CODE);
        }
        Some(handle) => (handle.clone(), false),
        None => {
            let mut spec = container_spec(&args.container);
            spec.properties.insert(CREATED_BY_PROPERTY.into(), "run".into());
            match client.create(&spec).await {
                Ok(handle) => (handle, true),
                Err(error) => return request_failed(error),
            }
        }
    };

    let (code, started) = run_in(&client, &handle, &args).await;

    // A container made for a process that never started holds nothing of
    // the user's, and its handle was never printed, so it goes too.
    if created && (args.rm || !started) {
        if let Err(error) = client.destroy(&handle).await {
            eprintln!("trellis: destroying container {handle} failed: {error}");
            return ExitCode::from(REQUEST_FAILED_EXIT_CODE);
        }
    }
    code
}

/// Runs the command in the container and follows it. Returns the exit code
/// and whether the process started at all.
async fn run_in(client: &Client, handle: &str, args: &RunArgs) -> (ExitCode, bool) {
    let (path, process_args) = args.command.split_first().expect("clap requires a command");
    let terminal = args.tty.then(RawTerminal::enter).flatten();
    let spec = ProcessSpec {
        id: args.process_id.clone().unwrap_or_default(),
        path: path.clone(),
        args: process_args.to_vec(),
        env: args.env.clone(),
        dir: args.dir.clone().unwrap_or_default(),
        user: args.user.clone().unwrap_or_default(),
        tty: args.tty.then(|| TtySpec {
            window_size: terminal_size(),
        }),
        ..ProcessSpec::default()
    };
    let io = local_io(!args.no_stdin);
    let started = client.run(handle, &spec, io).await;
    let process_started = started.is_ok();
    let code = follow(started, args.tty).await;
    drop(terminal);
    (code, process_started)
}

async fn attach_command(target: &TargetArgs, handle: &str, process_id: &str, forward_stdin: bool) -> ExitCode {
    let client = match connect(target) {
        Ok(client) => client,
        Err(error) => return request_failed(error),
    };
    let started = client.attach(handle, process_id, local_io(forward_stdin)).await;
    follow(started, false).await
}

/// Connects the process to this program's stdio.
fn local_io(forward_stdin: bool) -> ProcessIo {
    ProcessIo {
        stdin: forward_stdin.then(|| Box::new(tokio::io::stdin()) as _),
        stdout: Some(Box::new(tokio::io::stdout())),
        stderr: Some(Box::new(tokio::io::stderr())),
    }
}

/// Waits for a started process, forwarding SIGINT and SIGTERM to it (and
/// window size changes when it has a TTY), and returns its exit code.
async fn follow(started: Result<crate::client::Process, ClientError>, tty: bool) -> ExitCode {
    let mut process = match started {
        Ok(process) => process,
        Err(error) => return request_failed(error),
    };
    let forwarder = tokio::spawn(forward_signals(process.controller(), tty));
    let result = process.wait().await;
    forwarder.abort();
    match result {
        // Exit statuses outside 0..=255 (a signal number from some
        // backends) are folded into one byte as a shell does.
        Ok(status) => ExitCode::from((status & 0xff) as u8),
        Err(error) => request_failed(error),
    }
}

async fn forward_signals(controller: ProcessController, tty: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut interrupt), Ok(mut terminate), Ok(mut window_change)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::window_change()),
    ) else {
        return;
    };
    loop {
        tokio::select! {
            _ = interrupt.recv() => { let _ = controller.signal(Signal::Terminate).await; }
            _ = terminate.recv() => { let _ = controller.signal(Signal::Terminate).await; }
            _ = window_change.recv() => {
                if let (true, Some(size)) = (tty, terminal_size()) {
                    let _ = controller.resize(size.columns, size.rows).await;
                }
            }
        }
    }
}

fn request_failed(error: ClientError) -> ExitCode {
    eprintln!("trellis: {error}");
    ExitCode::from(REQUEST_FAILED_EXIT_CODE)
}

/// Returns the window size of the terminal on stdout, if it is one.
fn terminal_size() -> Option<WindowSize> {
    if !std::io::stdout().is_terminal() {
        return None;
    }
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the valid pointer.
    let result = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (result == 0).then_some(WindowSize {
        columns: size.ws_col,
        rows: size.ws_row,
    })
}

/// The local terminal in raw mode, so keys such as Ctrl-C reach the
/// process's TTY instead of this program. Restores the saved mode on drop.
struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// Switches stdin to raw mode; returns `None` when stdin is not a
    /// terminal.
    fn enter() -> Option<RawTerminal> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return None;
        }
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(RawTerminal { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use nix::sys::termios::{tcsetattr, SetArg};
        if let Err(error) = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved) {
            eprintln!("trellis: restoring the terminal mode failed: {error}");
        }
    }
}

/// Parses `KEY=VALUE`; the value may contain `=` and be empty.
fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// Validates a container network: an IPv4 address, or a subnet in CIDR
/// form. The server checks that it lies outside its dynamic pool.
fn parse_network(text: &str) -> Result<String, String> {
    let valid = text.parse::<std::net::Ipv4Addr>().is_ok() || text.parse::<ipnetwork::Ipv4Network>().is_ok();
    if valid {
        Ok(text.to_string())
    } else {
        Err(format!("invalid network {text:?}: expected an IPv4 address or CIDR subnet, such as 10.77.0.9 or 10.77.0.0/24"))
    }
}

/// Parses a bind mount `SRC:DST` (read-write) or `SRC:DST:ro`/`SRC:DST:rw`,
/// with absolute paths on the host.
fn parse_bind_mount(text: &str) -> Result<BindMount, String> {
    let invalid = |reason: &str| format!("invalid bind mount {text:?}: {reason}; expected SRC:DST or SRC:DST:ro with absolute paths");
    let parts: Vec<&str> = text.split(':').collect();
    let (source, destination, mode) = match parts.as_slice() {
        [source, destination] => (*source, *destination, BIND_MOUNT_MODE_RW),
        [source, destination, "rw"] => (*source, *destination, BIND_MOUNT_MODE_RW),
        [source, destination, "ro"] => (*source, *destination, BIND_MOUNT_MODE_RO),
        [_, _, mode] => return Err(invalid(&format!("unknown mode {mode:?}"))),
        _ => return Err(invalid("wrong number of fields")),
    };
    if !source.starts_with('/') || !destination.starts_with('/') {
        return Err(invalid("a path is not absolute"));
    }
    Ok(BindMount {
        src_path: source.to_string(),
        dst_path: destination.to_string(),
        mode,
        // Origin 0: the source is a path on the host.
        origin: 0,
    })
}

/// Parses a duration such as `0`, `30s`, `1.5h` or `1h30m` (units ns, us,
/// µs, ms, s, m, h, as Go's `time.ParseDuration` accepts).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("invalid duration {text:?}: expected a number with a unit, such as 30s, 5m or 1h30m");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(invalid());
    }
    while !rest.is_empty() {
        let number_length = rest
            .find(|character: char| !(character.is_ascii_digit() || character == '.'))
            .ok_or_else(invalid)?;
        let number: f64 = rest[..number_length].parse().map_err(|_| invalid())?;
        rest = &rest[number_length..];
        let unit_length = rest
            .find(|character: char| character.is_ascii_digit() || character == '.')
            .unwrap_or(rest.len());
        let nanoseconds_per_unit = match &rest[..unit_length] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_length..];
        total += number * nanoseconds_per_unit;
    }
    if total > i64::MAX as f64 {
        return Err(format!("invalid duration {text:?}: longer than about 292 years"));
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10ns"), Ok(Duration::from_nanos(10)));
    }

    #[test]
    fn durations_reject_garbage() {
        for text in ["", "5", "s", "5x", "1h30", "-1s", "1e3s"] {
            assert!(parse_duration(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn key_values_parse() {
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_key_value("a="), Ok(("a".into(), String::new())));
        assert!(parse_key_value("=b").is_err());
        assert!(parse_key_value("ab").is_err());
    }

    fn parse(args: &[&str]) -> crate::cli::Cli {
        crate::cli::Cli::try_parse_from(args).unwrap()
    }

    #[test]
    fn run_takes_command_after_options() {
        let cli = parse(&["trellis", "run", "--target", "/tmp/s.sock", "--", "echo", "-n", "hi"]);
        let crate::cli::Command::Client(ClientCommand::Run(args)) = cli.command else {
            panic!("not a run command");
        };
        assert_eq!(args.command, ["echo", "-n", "hi"]);
        assert_eq!(args.target.target, "/tmp/s.sock");
        assert!(args.handle.is_none());
    }

    #[test]
    fn run_rejects_handle_with_create() {
        let result = crate::cli::Cli::try_parse_from(["trellis", "run", "--handle", "h", "--create", "true"]);
        assert!(result.is_err());
    }

    #[test]
    fn properties_take_target_after_subcommand() {
        let cli = parse(&["trellis", "properties", "get", "h", "k", "--target", "10.0.0.1:1"]);
        let crate::cli::Command::Client(ClientCommand::Properties { target, command }) = cli.command else {
            panic!("not a properties command");
        };
        assert_eq!(target.target, "10.0.0.1:1");
        assert!(matches!(command, PropertiesCommand::Get { .. }));
    }

    #[test]
    fn create_collects_properties() {
        let cli = parse(&["trellis", "create", "web", "--property", "a=1", "--property", "b=2", "--grace-time", "5m"]);
        let crate::cli::Command::Client(ClientCommand::Create(args)) = cli.command else {
            panic!("not a create command");
        };
        let spec = container_spec(&args.container);
        assert_eq!(spec.properties.len(), 2);
        assert_eq!(spec.grace_time, 300_000_000_000);
        assert_eq!(args.handle.as_deref(), Some("web"));
    }

    #[test]
    fn create_builds_network_limits_and_mounts() {
        let cli = parse(&[
            "trellis", "create", "--network", "10.254.0.8/30", "--memory", "64M", "--cpu-shares", "512", "--pids", "40",
            "--disk", "1G", "--disk-scope", "exclusive", "--bandwidth-rate", "1M", "--bandwidth-burst", "64K",
            "--net-in", "0:8080", "--net-in", "61010:22", "--bind-mount", "/srv/a:/a:ro", "--bind-mount", "/srv/b:/b",
        ]);
        let crate::cli::Command::Client(ClientCommand::Create(args)) = cli.command else {
            panic!("not a create command");
        };
        let spec = container_spec(&args.container);
        assert_eq!(spec.network, "10.254.0.8/30");
        assert_eq!(spec.limits.memory_limits.limit_in_bytes, 64 << 20);
        assert_eq!(spec.limits.cpu_limits.weight, 512);
        assert_eq!(spec.limits.pid_limits.max, 40);
        assert_eq!(spec.limits.disk_limits.byte_hard, 1 << 30);
        assert_eq!(spec.limits.disk_limits.scope, crate::api::DISK_SCOPE_EXCLUSIVE);
        assert_eq!(spec.limits.bandwidth_limits, BandwidthLimits { rate: 1 << 20, burst: 64 << 10 });
        assert_eq!(spec.netin, vec![NetIn { host_port: 0, container_port: 8080 }, NetIn { host_port: 61010, container_port: 22 }]);
        assert_eq!(spec.bind_mounts[0].mode, BIND_MOUNT_MODE_RO);
        assert_eq!(spec.bind_mounts[1].mode, BIND_MOUNT_MODE_RW);
        assert_eq!(spec.bind_mounts[1].dst_path, "/b");
    }

    #[test]
    fn create_rejects_bad_values() {
        for args in [
            &["--network", "10.254.0"][..],
            &["--network", "10.254.0.0/33"],
            &["--net-in", "8080"],
            &["--bind-mount", "relative:/a"],
            &["--bind-mount", "/a:/b:rx"],
            &["--disk-scope", "some"],
            &["--bandwidth-rate", "1M"],
        ] {
            let mut line = vec!["trellis", "create"];
            line.extend_from_slice(args);
            assert!(crate::cli::Cli::try_parse_from(&line).is_err(), "{args:?} was accepted");
        }
    }

    #[test]
    fn run_rejects_limits_with_handle() {
        let cli = parse(&["trellis", "run", "--handle", "h", "--memory", "1M", "--", "true"]);
        let crate::cli::Command::Client(ClientCommand::Run(args)) = cli.command else {
            panic!("not a run command");
        };
        assert!(args.container.sets_anything());
    }
}
