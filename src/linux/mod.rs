//! The Linux runtime: namespaces, garden-init, the process shim, root
//! filesystems and mounts, cgroups and users.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

/// First argument that starts this executable as a container's init.
pub const GARDEN_INIT_COMMAND: &str = "__garden-init";
/// First argument that starts this executable as a process shim.
pub const SHIM_COMMAND: &str = "__shim";

/// Settings of the Linux runtime, taken from the server configuration.
#[derive(Debug, Clone)]
pub struct LinuxConfig {
    /// Directory holding one state directory per container.
    pub depot: PathBuf,
    /// Root filesystem used when a create names no image.
    pub default_rootfs: PathBuf,
    /// Short tag carried by every host object this server creates (cgroup
    /// parent, mount points), so that several servers can share a host.
    pub tag: String,
    /// The `trellis` executable started as garden-init and as process shim:
    /// `/proc/self/exe` in the server, the built binary in tests.
    pub executable: PathBuf,
}

/// Entry point of garden-init, pid 1 of each container.
pub fn garden_init_main(_args: Vec<OsString>) -> ExitCode {
    ExitCode::FAILURE
}

/// Entry point of a process shim.
pub fn shim_main(_args: Vec<OsString>) -> ExitCode {
    ExitCode::FAILURE
}
