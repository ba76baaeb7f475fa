//! Host set-up shared by both runtimes' blocks: network namespaces, a
//! cpuacct cgroup that charges a whole process tree, overlay mounts, the
//! test archive, and memory readings.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The cgroup v1 cpuacct hierarchy. Its usage counters are hierarchical,
/// so a parent keeps what its removed children consumed.
pub const CPUACCT: &str = "/sys/fs/cgroup/cpuacct";

/// Runs a tool and fails with its output when it fails.
pub fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|error| format!("starting {program}: {error}"))?;
    checked(program, args, &output)
}

/// Turns a tool's failed exit into an error with its stderr.
fn checked(program: &str, args: &[&str], output: &std::process::Output) -> Result<(), String> {
    if output.status.success() {
        return Ok(());
    }
    Err(format!("{program} {} failed with {}: {}", args.join(" "), output.status, String::from_utf8_lossy(&output.stderr).trim()))
}

/// Runs a tool, feeding `input` to its stdin.
pub fn run_with_input(program: &str, args: &[&str], input: &[u8]) -> Result<(), String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| format!("starting {program}: {error}"))?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input)
        .map_err(|error| format!("writing to {program}: {error}"))?;
    let output = child.wait_with_output().map_err(|error| format!("waiting for {program}: {error}"))?;
    checked(program, args, &output)
}

/// The external IP the benchmark server is given: an address of its own
/// namespace, because a namespace without a route out has none to find.
pub const EXTERNAL_IP: &str = "198.51.100.1";
/// The DNS server written into containers; never contacted.
pub const DNS_SERVER: &str = "198.51.100.53";

/// A network namespace made with `ip netns add`, with loopback up and a
/// veth pair holding [`EXTERNAL_IP`], both ends inside: the server has no
/// route out of the machine (design section 8).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Netns, String> {
        run("ip", &["netns", "add", name])?;
        let netns = Netns { name: name.to_string() };
        let commands = format!(
            "link set lo up\nlink add ext0 type veth peer name ext1\naddr add {EXTERNAL_IP}/24 dev ext0\n\
             link set ext0 up\nlink set ext1 up\n"
        );
        run_with_input("ip", &["-n", name, "-b", "-"], commands.as_bytes())?;
        Ok(netns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = run("ip", &["netns", "delete", &self.name]) {
            eprintln!("bench: {error}");
        }
    }
}

/// A cpuacct cgroup whose usage counts every process placed in it and all
/// their descendants, including child cgroups removed meanwhile.
pub struct CpuCgroup {
    pub path: PathBuf,
}

impl CpuCgroup {
    pub fn create(name: &str) -> Result<CpuCgroup, String> {
        let path = Path::new(CPUACCT).join(name);
        fs::create_dir(&path).map_err(|error| format!("creating {}: {error}", path.display()))?;
        Ok(CpuCgroup { path })
    }

    /// Returns the path of `cgroup.procs`, which a child writes "0" to
    /// between fork and exec to move itself in.
    pub fn procs_file(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// CPU time consumed so far, in nanoseconds.
    pub fn usage_ns(&self) -> Result<u64, String> {
        let file = self.path.join("cpuacct.usage");
        let text = fs::read_to_string(&file).map_err(|error| format!("reading {}: {error}", file.display()))?;
        text.trim().parse().map_err(|error| format!("parsing {}: {error}", file.display()))
    }
}

impl Drop for CpuCgroup {
    fn drop(&mut self) {
        remove_cgroup_tree(&self.path);
    }
}

/// Removes a cgroup directory and its (empty) children, deepest first.
pub fn remove_cgroup_tree(path: &Path) {
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    if let Err(error) = fs::remove_dir(path) {
        if error.kind() != io::ErrorKind::NotFound {
            eprintln!("bench: removing cgroup {}: {error}", path.display());
        }
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` is
/// `procs` (a NUL-terminated path). Only async-signal-safe calls, so it may
/// run between fork and exec.
pub fn join_cgroup_raw(procs: &std::ffi::CStr) -> io::Result<()> {
    // SAFETY: open, write and close on a valid C string and a local buffer.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        let error = io::Error::last_os_error();
        libc::close(fd);
        if written != 1 {
            return Err(error);
        }
    }
    Ok(())
}

/// An overlay of `lower` with its own upper and work directories under
/// `dir`, mounted at `dir/merged`.
pub struct Overlay {
    pub dir: PathBuf,
    pub merged: PathBuf,
}

impl Overlay {
    pub fn mount(lower: &Path, dir: &Path) -> Result<Overlay, String> {
        let upper = dir.join("upper");
        let work = dir.join("work");
        let merged = dir.join("merged");
        for path in [&upper, &work, &merged] {
            fs::create_dir_all(path).map_err(|error| format!("creating {}: {error}", path.display()))?;
        }
        // `volatile`, as Trellis mounts its overlays: neither side pays
        // for a flush of the host filesystem at unmount.
        let options = format!(
            "lowerdir={},upperdir={},workdir={},volatile",
            lower.display(),
            upper.display(),
            work.display()
        );
        nix::mount::mount(
            Some("overlay"),
            &merged,
            Some("overlay"),
            nix::mount::MsFlags::empty(),
            Some(options.as_str()),
        )
        .map_err(|error| format!("mounting the overlay at {}: {error}", merged.display()))?;
        Ok(Overlay { dir: dir.to_path_buf(), merged })
    }

    /// Unmounts and deletes the overlay's directories.
    pub fn remove(self) -> Result<(), String> {
        let merged = self.merged.clone();
        let dir = self.dir.clone();
        std::mem::forget(self);
        nix::mount::umount2(&merged, nix::mount::MntFlags::MNT_DETACH)
            .map_err(|error| format!("unmounting {}: {error}", merged.display()))?;
        fs::remove_dir_all(&dir).map_err(|error| format!("removing {}: {error}", dir.display()))
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.merged, nix::mount::MntFlags::MNT_DETACH);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Builds the stream-in archive: `total` bytes of incompressible file data
/// in 1 MiB files plus a tree of small files, as a build context would be.
pub fn build_archive(total: usize) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::with_capacity(total + total / 8));
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut noise = |length: usize| {
        let mut data = Vec::with_capacity(length);
        while data.len() < length {
            // xorshift64: cheap bytes that neither side can compress.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            data.extend_from_slice(&state.to_le_bytes());
        }
        data.truncate(length);
        data
    };
    let append = |builder: &mut tar::Builder<Vec<u8>>, path: String, data: Vec<u8>| {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, path, data.as_slice()).expect("appending to an in-memory archive");
    };
    let small_files = 256;
    let small_size = 4096;
    let big = total.saturating_sub(small_files * small_size);
    let mut written = 0;
    let mut index = 0;
    while written < big {
        let length = (1 << 20).min(big - written);
        append(&mut builder, format!("blobs/blob-{index:03}"), noise(length));
        written += length;
        index += 1;
    }
    for file in 0..small_files {
        append(&mut builder, format!("src/dir-{:02}/file-{file:03}.txt", file % 16), noise(small_size));
    }
    builder.into_inner().expect("finishing an in-memory archive")
}

/// Reads the `field` line of a /proc file of `pid` whose values are in kB.
fn proc_kib(pid: u32, file: &str, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Returns the resident memory of `pid` in KiB (VmRSS of /proc/<pid>/status).
pub fn rss_kib(pid: u32) -> Option<u64> {
    proc_kib(pid, "status", "VmRSS:")
}

/// Returns the proportional memory of `pid` in KiB (Pss of smaps_rollup):
/// pages shared with other processes, such as the text of a binary every
/// garden-init maps, count in proportion to their sharers.
pub fn pss_kib(pid: u32) -> Option<u64> {
    proc_kib(pid, "smaps_rollup", "Pss:")
}

/// Returns the anonymous memory of `pid` in KiB (Pss_Anon of
/// smaps_rollup): its heap and stacks, without the binary's pages.
pub fn anon_kib(pid: u32) -> Option<u64> {
    proc_kib(pid, "smaps_rollup", "Pss_Anon:")
}

/// Lists every process in the cgroup at `path` and its descendant cgroups.
pub fn cgroup_pids(path: &Path) -> Vec<u32> {
    let mut found: Vec<u32> = fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
        .collect();
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                found.extend(cgroup_pids(&entry.path()));
            }
        }
    }
    found
}

/// Kernel release and CPU model, for the report.
pub fn machine() -> serde_json::Value {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |count| count.get());
    let memory = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    serde_json::json!({
        "kernel": kernel.trim(),
        "cpu_model": model,
        "cpus": cpus,
        "memory": memory.split_whitespace().skip(1).collect::<Vec<_>>().join(" "),
    })
}
