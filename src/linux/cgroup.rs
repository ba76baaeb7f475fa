//! Per-container cgroups on cgroup v1 and v2.
//!
//! Each container gets one cgroup per hierarchy, at
//! `<server's own cgroup>/<tag>/<container>`, so containers stay inside the
//! resource budget the server itself was given, and never at the hierarchy
//! root. Discovery reads `/proc/self/mountinfo` and `/proc/self/cgroup`.
//!
//! NOTE: cgroups-rs 0.5 is not used here. Its v1 hierarchy type places a
//! cgroup at the same relative path in every hierarchy. The server's own
//! cgroup can differ between hierarchies (a supervisor may place it in a
//! memory cgroup only), so the paths are built from `/proc/self/cgroup`.

use std::fs;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::api::{CpuLimits, Limits};

/// v1 controllers the runtime uses; each gets a container cgroup in its
/// hierarchy when the host has it.
pub const V1_CONTROLLERS: [&str; 6] = ["memory", "cpu", "cpuacct", "pids", "freezer", "devices"];

/// Errors of cgroup discovery and management.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup hierarchy found for controller {controller} in /proc/self/mountinfo; mount the cgroup hierarchies (`ip netns exec` mounts a fresh /sys without them, `nsenter --net=` does not)")]
    MissingController { controller: String },
    #[error("no cgroup v2 mount found in /proc/self/mountinfo")]
    MissingUnifiedMount,
    #[error("failed to read {path}")]
    Read { path: PathBuf, #[source] source: io::Error },
    #[error("failed to create cgroup {path}")]
    Create { path: PathBuf, #[source] source: io::Error },
    #[error("failed to write {value:?} to {path}")]
    Write { path: PathBuf, value: String, #[source] source: io::Error },
    #[error("failed to remove cgroup {path}")]
    Remove { path: PathBuf, #[source] source: io::Error },
    #[error("failed to rename cgroup {path} to {target}")]
    Rename { path: PathBuf, target: PathBuf, #[source] source: io::Error },
    #[error("cgroup v2 cannot rename a cgroup ({path})")]
    RenameUnsupported { path: PathBuf },
    #[error("memory limit of {requested} bytes is below the container's current memory usage of {usage} bytes; request at least {usage} bytes")]
    MemoryBelowUsage { requested: u64, usage: u64 },
    #[error("cgroup {path} did not freeze within {seconds} s")]
    FreezeTimeout { path: PathBuf, seconds: u64 },
}

/// The cgroup version of a container's cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// A mounted hierarchy and the server's own cgroup in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Mount point, such as `/sys/fs/cgroup/memory`.
    pub mount: PathBuf,
    /// Controllers attached to the hierarchy (empty for v2).
    pub controllers: Vec<String>,
    /// The server's own cgroup, relative to the mount point.
    pub own_path: PathBuf,
}

/// Finds the v1 hierarchies of `wanted` controllers, from the text of
/// `/proc/self/mountinfo` and `/proc/self/cgroup`. Controllers that share a
/// hierarchy (`cpu,cpuacct`) yield one entry; a wanted controller the host
/// lacks is an error.
pub fn discover_v1(mountinfo: &str, self_cgroup: &str, wanted: &[&str]) -> Result<Vec<Hierarchy>, CgroupError> {
    let mut hierarchies: Vec<Hierarchy> = Vec::new();
    for controller in wanted {
        if hierarchies.iter().any(|hierarchy| hierarchy.controllers.iter().any(|c| c == controller)) {
            continue;
        }
        let missing = || CgroupError::MissingController { controller: controller.to_string() };
        let (mount, controllers) = mountinfo
            .lines()
            .filter_map(parse_mountinfo_line)
            .find_map(|(mount, fstype, super_options)| {
                let controllers: Vec<String> = super_options
                    .split(',')
                    .filter(|option| !is_cgroup_mount_option(option))
                    .map(str::to_string)
                    .collect();
                (fstype == "cgroup" && controllers.iter().any(|c| c == controller)).then_some((mount, controllers))
            })
            .ok_or_else(missing)?;
        let own_path = self_cgroup
            .lines()
            .find_map(|line| {
                let mut fields = line.splitn(3, ':');
                let (_id, list, path) = (fields.next()?, fields.next()?, fields.next()?);
                list.split(',').any(|c| c == *controller).then(|| PathBuf::from(path.trim_start_matches('/')))
            })
            .ok_or_else(missing)?;
        hierarchies.push(Hierarchy { mount: PathBuf::from(mount), controllers, own_path });
    }
    Ok(hierarchies)
}

/// Returns true for the v1 super options that are not controller names.
fn is_cgroup_mount_option(option: &str) -> bool {
    matches!(option, "rw" | "ro" | "xattr" | "noprefix" | "clone_children" | "cpuset_v2_mode" | "favordynmods") || option.contains('=')
}

/// Lists every v1 hierarchy that has at least one controller, with the
/// calling process's cgroup in each; empty on a pure cgroup v2 host.
pub fn all_v1(mountinfo: &str, self_cgroup: &str) -> Vec<Hierarchy> {
    // /proc/self/cgroup has one line per v1 hierarchy ("<id>:<controllers>:
    // <path>"); named hierarchies such as name=systemd have no controller.
    let wanted: Vec<&str> = self_cgroup
        .lines()
        .filter_map(|line| line.split(':').nth(1))
        .filter_map(|list| list.split(',').find(|controller| !controller.is_empty() && !controller.starts_with("name=")))
        .collect();
    discover_v1(mountinfo, self_cgroup, &wanted).unwrap_or_default()
}

/// Finds the cgroup v2 mount and the server's own cgroup in it.
pub fn discover_v2(mountinfo: &str, self_cgroup: &str) -> Result<Hierarchy, CgroupError> {
    let mount = mountinfo
        .lines()
        .filter_map(parse_mountinfo_line)
        .find_map(|(mount, fstype, _)| (fstype == "cgroup2").then_some(mount))
        .ok_or(CgroupError::MissingUnifiedMount)?;
    let own_path = self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| PathBuf::from(path.trim_start_matches('/')))
        .ok_or(CgroupError::MissingUnifiedMount)?;
    Ok(Hierarchy { mount: PathBuf::from(mount), controllers: Vec::new(), own_path })
}

/// Returns the mount point, filesystem type and super options of a
/// mountinfo line.
fn parse_mountinfo_line(line: &str) -> Option<(String, &str, &str)> {
    let (before, after) = line.split_once(" - ")?;
    let mount = before.split(' ').nth(4)?;
    let mut after = after.split(' ');
    let fstype = after.next()?;
    let _source = after.next()?;
    let super_options = after.next().unwrap_or("");
    // mountinfo escapes space, tab, newline and backslash as octal.
    let mount = mount.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\");
    Some((mount, fstype, super_options))
}

/// Writes `value` to the control file `file` of the cgroup at `dir`. The file
/// must exist, as every control file of a real cgroup does.
pub fn write_control(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let path = dir.join(file);
    let result = fs::OpenOptions::new().write(true).open(&path).and_then(|mut handle| handle.write_all(value.as_bytes()));
    result.map_err(|source| CgroupError::Write { path, value: value.to_string(), source })
}

fn read_control(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let path = dir.join(file);
    fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })
}

/// Device rules of an unprivileged container: rwm on the standard nodes and
/// ptys, mknod on any node, everything else denied.
const DEVICE_RULES: [&str; 11] = [
    "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 5:0 rwm", "c 5:2 rwm", "c 136:* rwm",
    "c 10:200 rwm", "c *:* m", "b *:* m",
];
/// Extra device rule of privileged containers: /dev/fuse.
const PRIVILEGED_DEVICE_RULE: &str = "c 10:229 rwm";

/// One container's cgroups.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ContainerCgroup {
    pub version: CgroupVersion,
    /// The container's cgroup in each hierarchy; for v1 the first one
    /// is the freezer's when the host has it.
    pub dirs: Vec<PathBuf>,
    /// The `<tag>` parent in each hierarchy, removed when empty.
    pub parents: Vec<PathBuf>,
    /// The operator's hard CPU quota per share in microseconds per
    /// period; 0 leaves CPU uncapped.
    pub cpu_quota_per_share: u64,
}

/// The CFS period of a CPU quota, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest CPU quota written, in microseconds; the kernel rejects
/// quotas below 1 ms.
pub const MIN_CPU_QUOTA_US: u64 = 1_000;
/// The largest CPU quota the kernel takes, in microseconds (its MAX_BW,
/// 2^44 - 1, in kernel/sched/core.c of Linux 6.x).
pub const MAX_CPU_QUOTA_US: u64 = (1 << 44) - 1;

/// Returns the CPU quota in microseconds per [`CPU_PERIOD_US`] for
/// `shares` with `per_share` microseconds each: max(S·Q, 1000), capped
/// at what the kernel takes. `None` when either is 0.
pub fn cpu_quota(shares: u64, per_share: u64) -> Option<u64> {
    if shares == 0 || per_share == 0 {
        return None;
    }
    Some(shares.saturating_mul(per_share).clamp(MIN_CPU_QUOTA_US, MAX_CPU_QUOTA_US))
}

impl ContainerCgroup {
    /// Returns the paths a container named `name` gets below the `tag`
    /// parent of each hierarchy, without creating anything.
    pub fn plan(version: CgroupVersion, hierarchies: &[Hierarchy], tag: &str, name: &str) -> ContainerCgroup {
        let mut ordered: Vec<&Hierarchy> = hierarchies.iter().collect();
        // The freezer's cgroup comes first: stop and destroy list processes
        // there.
        ordered.sort_by_key(|hierarchy| !hierarchy.controllers.iter().any(|c| c == "freezer"));
        let parents: Vec<PathBuf> = ordered.iter().map(|h| h.mount.join(&h.own_path).join(tag)).collect();
        let dirs = parents.iter().map(|parent| parent.join(name)).collect();
        ContainerCgroup { version, dirs, parents, cpu_quota_per_share: 0 }
    }

    /// Sets the operator's hard CPU quota per share (0: uncapped).
    pub fn with_cpu_quota_per_share(mut self, microseconds: u64) -> ContainerCgroup {
        self.cpu_quota_per_share = microseconds;
        self
    }

    /// Creates the cgroups (and their parents when missing) and applies the
    /// device rules and the simple limits. A cgroup left from an earlier
    /// failed run is reused.
    pub fn create(&self, privileged: bool, limits: &Limits) -> Result<(), CgroupError> {
        for (parent, dir) in self.parents.iter().zip(&self.dirs) {
            // The destroy of another container removes the parent when it
            // finds it empty, which it is until `dir` exists; the parent is
            // then made again.
            let mut attempts = 0;
            loop {
                create_dir(parent)?;
                if self.version == CgroupVersion::V2 {
                    enable_v2_controllers(parent)?;
                }
                match create_dir(dir) {
                    Err(CgroupError::Create { ref source, .. }) if source.kind() == io::ErrorKind::NotFound && attempts < PARENT_ATTEMPTS => {
                        attempts += 1;
                    }
                    created => break created?,
                }
            }
        }
        self.apply_devices(privileged)?;
        self.apply_limits(limits)
    }

    fn apply_devices(&self, privileged: bool) -> Result<(), CgroupError> {
        // NOTE: cgroup v2 controls devices with an eBPF program, which is not
        // written yet; only v1 gets device rules.
        for dir in self.dirs.iter().filter(|dir| dir.join("devices.deny").exists()) {
            write_control(dir, "devices.deny", "a")?;
            for rule in DEVICE_RULES {
                write_control(dir, "devices.allow", rule)?;
            }
            if privileged {
                write_control(dir, "devices.allow", PRIVILEGED_DEVICE_RULE)?;
            }
        }
        Ok(())
    }

    /// Applies the memory limit, the pid limit and the cpu shares of `limits`
    /// where set (0 means unset).
    // TODO: the cpu quota and the v2 swap limit are not written yet.
    pub fn apply_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        // A new cgroup has no limits, so every value set is a change from
        // unlimited.
        self.update_limits(&Limits::default(), limits)
    }

    /// Applies `requested` where it differs from `current`, for the limits with
    /// a simple kernel effect: memory (with swap on v1), pids and cpu
    /// shares. A zero requested value leaves that limit as it is.
    pub fn update_limits(&self, current: &Limits, requested: &Limits) -> Result<(), CgroupError> {
        let old_memory = current.memory_limits.limit_in_bytes.min(i64::MAX as u64);
        let memory = requested.memory_limits.limit_in_bytes.min(i64::MAX as u64);
        let pids = requested.pid_limits.max;
        let shares = effective_shares(&requested.cpu_limits);
        if memory > 0 && memory != old_memory {
            // The kernel would reclaim or OOM-kill to fit a lower limit, so
            // one below current usage is rejected before anything is
            // written.
            if let Some(usage) = self.memory_usage()? {
                if memory < usage {
                    return Err(CgroupError::MemoryBelowUsage { requested: memory, usage });
                }
            }
        }
        for dir in &self.dirs {
            match self.version {
                CgroupVersion::V1 => {
                    if memory > 0 && memory != old_memory && dir.join("memory.limit_in_bytes").exists() {
                        // Zero means unlimited, so any value lowers it.
                        write_v1_memory(dir, memory, old_memory != 0 && memory > old_memory)?;
                    }
                    if pids > 0 && dir.join("pids.max").exists() {
                        write_control(dir, "pids.max", &pids_max_value(pids))?;
                    }
                    if shares > 0 && dir.join("cpu.shares").exists() {
                        write_control(dir, "cpu.shares", &shares.to_string())?;
                    }
                    if let Some(quota) = cpu_quota(shares, self.cpu_quota_per_share).filter(|_| dir.join("cpu.cfs_quota_us").exists()) {
                        write_control(dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                        write_control(dir, "cpu.cfs_quota_us", &quota.to_string())?;
                    }
                }
                CgroupVersion::V2 => {
                    if memory > 0 {
                        write_control(dir, "memory.max", &memory.to_string())?;
                        // v2 limits swap on its own; none keeps the memory
                        // limit the whole budget, as memsw does on v1.
                        if dir.join("memory.swap.max").exists() {
                            write_control(dir, "memory.swap.max", "0")?;
                        }
                    }
                    if pids > 0 {
                        write_control(dir, "pids.max", &pids_max_value(pids))?;
                    }
                    if shares > 0 && dir.join("cpu.weight").exists() {
                        write_control(dir, "cpu.weight", &v2_weight(shares).to_string())?;
                    }
                    if let Some(quota) = cpu_quota(shares, self.cpu_quota_per_share).filter(|_| dir.join("cpu.max").exists()) {
                        write_control(dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Returns the memory the container uses now, as the memory limit
    /// counts it (v1 `memory.usage_in_bytes`, v2 `memory.current`); `None`
    /// without a memory cgroup.
    pub fn memory_usage(&self) -> Result<Option<u64>, CgroupError> {
        let file = match self.version {
            CgroupVersion::V1 => "memory.usage_in_bytes",
            CgroupVersion::V2 => "memory.current",
        };
        let Some(dir) = self.dirs.iter().find(|dir| dir.join(file).exists()) else { return Ok(None) };
        let text = read_control(dir, file)?;
        let usage = text.trim().parse().map_err(|_| CgroupError::Read {
            path: dir.join(file),
            source: io::Error::new(io::ErrorKind::InvalidData, format!("not a number: {:?}", text.trim())),
        })?;
        Ok(Some(usage))
    }

    /// Reads the usage counters of the container's cgroups. A counter the
    /// host does not have reads as zero.
    pub fn stats(&self) -> CgroupStats {
        let mut stats = CgroupStats::new(self.version);
        for dir in &self.dirs {
            if self.version == CgroupVersion::V2 {
                if let Ok(text) = read_control(dir, "cpu.stat") {
                    stats.cpu_stat = parse_flat_keyed(&text);
                }
            }
            if let Ok(text) = read_control(dir, "memory.stat") {
                stats.memory = parse_flat_keyed(&text);
            }
            if let Ok(text) = read_control(dir, "memory.memsw.limit_in_bytes") {
                stats.memsw_limit = text.trim().parse().ok();
            }
            if let Ok(text) = read_control(dir, "cpuacct.usage") {
                stats.cpu_usage_ns = text.trim().parse().unwrap_or(0);
            }
            if let Ok(text) = read_control(dir, "cpuacct.stat") {
                let ticks = parse_flat_keyed(&text);
                stats.cpu_user_ticks = ticks.get("user").copied().unwrap_or(0);
                stats.cpu_system_ticks = ticks.get("system").copied().unwrap_or(0);
            }
            if let Ok(text) = read_control(dir, "pids.current") {
                stats.pids_current = text.trim().parse().unwrap_or(0);
            }
        }
        stats
    }

    /// Gives these cgroups, with the processes in them, the names of
    /// `target`'s, which must lie below the same parents. Only cgroup v1
    /// can rename a cgroup. On failure the cgroups renamed so far get
    /// their names back.
    pub fn rename_to(&self, target: &ContainerCgroup) -> Result<(), CgroupError> {
        if self.version == CgroupVersion::V2 || target.version == CgroupVersion::V2 {
            let path = self.dirs.first().cloned().unwrap_or_default();
            return Err(CgroupError::RenameUnsupported { path });
        }
        for (index, (from, to)) in self.dirs.iter().zip(&target.dirs).enumerate() {
            if let Err(source) = fs::rename(from, to) {
                for (done_from, done_to) in self.dirs.iter().zip(&target.dirs).take(index) {
                    let _ = fs::rename(done_to, done_from);
                }
                return Err(CgroupError::Rename { path: from.clone(), target: to.clone(), source });
            }
        }
        Ok(())
    }

    /// Moves process `pid` into every container cgroup.
    pub fn attach(&self, pid: u32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write_control(dir, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Lists the host pids in the container's cgroup. A cgroup already gone
    /// contains none.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let Some(dir) = self.dirs.first() else { return Ok(Vec::new()) };
        match read_control(dir, "cgroup.procs") {
            Ok(text) => Ok(text.lines().filter_map(|line| line.trim().parse().ok()).collect()),
            Err(CgroupError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }

    /// Freezes every process of the container and waits until the kernel
    /// reports it frozen, so none can fork while a kill is in progress.
    pub fn freeze(&self) -> Result<(), CgroupError> {
        let Some(dir) = self.freezer_dir() else { return Ok(()) };
        let (file, value) = match self.version {
            CgroupVersion::V1 => ("freezer.state", "FROZEN"),
            CgroupVersion::V2 => ("cgroup.freeze", "1"),
        };
        write_control(dir, file, value)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let frozen = match self.version {
                CgroupVersion::V1 => read_control(dir, "freezer.state")?.trim() == "FROZEN",
                CgroupVersion::V2 => read_control(dir, "cgroup.events")?.lines().any(|line| line.trim() == "frozen 1"),
            };
            if frozen {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(CgroupError::FreezeTimeout { path: dir.clone(), seconds: 5 });
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Thaws the container's processes.
    pub fn thaw(&self) -> Result<(), CgroupError> {
        let Some(dir) = self.freezer_dir() else { return Ok(()) };
        match self.version {
            CgroupVersion::V1 => write_control(dir, "freezer.state", "THAWED"),
            CgroupVersion::V2 => write_control(dir, "cgroup.freeze", "0"),
        }
    }

    fn freezer_dir(&self) -> Option<&PathBuf> {
        let dir = self.dirs.first()?;
        let file = match self.version {
            CgroupVersion::V1 => "freezer.state",
            CgroupVersion::V2 => "cgroup.freeze",
        };
        dir.join(file).exists().then_some(dir)
    }

    /// Kills every process of the cgroup v2 container cgroup at once through
    /// `cgroup.kill` (Linux 5.14 and later), which also catches processes
    /// that fork meanwhile. Returns false on v1, which has no such file.
    pub fn kill_all(&self) -> Result<bool, CgroupError> {
        match (self.version, self.dirs.first()) {
            (CgroupVersion::V2, Some(dir)) if dir.join("cgroup.kill").exists() => {
                write_control(dir, "cgroup.kill", "1")?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Removes the container's cgroups, retrying for a short while when the
    /// kernel still counts exiting tasks (EBUSY), then the `<tag>` parents
    /// when no other container uses them. Cgroups already gone count as
    /// removed.
    pub fn remove(&self) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(error) if error.kind() == io::ErrorKind::NotFound => break,
                    Err(error) if error.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err(source) => return Err(CgroupError::Remove { path: dir.clone(), source }),
                }
            }
        }
        for parent in &self.parents {
            // Another container may still use the parent; EBUSY, ENOTEMPTY
            // and ENOENT all mean there is nothing to do now.
            if let Err(error) = fs::remove_dir(parent) {
                if !matches!(error.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENOTEMPTY) | Some(libc::ENOENT)) {
                    return Err(CgroupError::Remove { path: parent.clone(), source: error });
                }
            }
        }
        Ok(())
    }
}

/// How long a v1 watch waits, after an out-of-memory notification, for the
/// kernel's kill counter to rise: the kernel notifies before the OOM killer
/// picks its victim.
const V1_KILL_COUNT_WAIT: Duration = Duration::from_secs(1);

/// A watch on the out-of-memory kills of one container's memory cgroup.
///
/// On cgroup v1 an eventfd is registered for `memory.oom_control` through
/// `cgroup.event_control`, and the kernel signals it on every OOM in the
/// cgroup and once more when the cgroup is removed. On cgroup v2 an inotify
/// watch on `memory.events` fires whenever a counter in it changes. Either
/// way the kill count comes from the `oom_kill` line of the same file.
#[derive(Debug)]
pub struct OomListener {
    version: CgroupVersion,
    /// The container's memory cgroup.
    dir: PathBuf,
    /// The eventfd (v1) or inotify instance (v2).
    notify: OwnedFd,
    /// The kill count last reported, or read when the watch was opened.
    kills: u64,
    initial_kills: u64,
}

impl OomListener {
    /// Opens the watch on the memory cgroup among `dirs`; `None` when the
    /// container has no memory cgroup.
    pub fn open(version: CgroupVersion, dirs: &[PathBuf]) -> Result<Option<OomListener>, CgroupError> {
        let file = match version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        };
        let Some(dir) = dirs.iter().find(|dir| dir.join(file).exists()) else { return Ok(None) };
        let notify = match version {
            CgroupVersion::V1 => register_v1_oom_eventfd(dir)?,
            CgroupVersion::V2 => watch_v2_memory_events(dir)?,
        };
        let kills = read_oom_kills(version, dir)?.unwrap_or(0);
        Ok(Some(OomListener { version, dir: dir.clone(), notify, kills, initial_kills: kills }))
    }

    /// Returns the kill count read when the watch was opened.
    pub fn initial_kills(&self) -> u64 {
        self.initial_kills
    }

    /// Blocks until the kill count rises, the cgroup is removed or `stop`
    /// becomes readable.
    pub fn wait(&mut self, stop: BorrowedFd<'_>) -> Result<OomEvent, CgroupError> {
        loop {
            let (notified, stopped) = poll_two(self.notify.as_fd(), stop).map_err(|source| self.read_error(source))?;
            if stopped {
                return Ok(OomEvent::Stopped);
            }
            if !notified {
                continue;
            }
            let removed = self.drain().map_err(|source| self.read_error(source))?;
            if removed {
                return Ok(OomEvent::Gone);
            }
            match self.count_after_notification(stop)? {
                Some(count) if count > self.kills => {
                    self.kills = count;
                    return Ok(OomEvent::Kills(count));
                }
                Some(_) => {}
                None => return Ok(OomEvent::Gone),
            }
        }
    }

    /// Reads the notification and returns true when it reports the cgroup
    /// gone.
    fn drain(&self) -> io::Result<bool> {
        let mut buffer = [0u8; 4096];
        // SAFETY: the buffer is valid for its length, and the fd is open.
        let read = unsafe { libc::read(self.notify.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len()) };
        if read < 0 {
            return Err(io::Error::last_os_error());
        }
        match self.version {
            // An eventfd counter carries no reason; a removed cgroup shows
            // as a missing control file.
            CgroupVersion::V1 => Ok(!self.dir.join("memory.oom_control").exists()),
            CgroupVersion::V2 => Ok(inotify_reports_removal(&buffer[..read as usize])),
        }
    }

    /// Reads the kill count after a notification. On v1 the kernel notifies
    /// before it kills, so the count is read again for a short while until
    /// it rises. `None` means the cgroup is gone.
    fn count_after_notification(&self, stop: BorrowedFd<'_>) -> Result<Option<u64>, CgroupError> {
        let deadline = Instant::now() + V1_KILL_COUNT_WAIT;
        loop {
            let count = match read_oom_kills(self.version, &self.dir) {
                Ok(Some(count)) => count,
                // A v1 kernel without the `oom_kill` line (before Linux
                // 4.13): each notification counts as one kill. v2 always has
                // the line.
                Ok(None) if self.version == CgroupVersion::V1 => self.kills + 1,
                Ok(None) => self.kills,
                Err(CgroupError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(error) => return Err(error),
            };
            if count > self.kills || self.version == CgroupVersion::V2 || Instant::now() >= deadline {
                return Ok(Some(count));
            }
            // Returns early when the server stops the watch meanwhile.
            if super::syscalls::wait_readable(stop, 10).map_err(|source| self.read_error(source))? {
                return Ok(Some(count));
            }
        }
    }

    fn read_error(&self, source: io::Error) -> CgroupError {
        CgroupError::Read { path: self.dir.clone(), source }
    }
}

impl crate::runtime::OomWatch for OomListener {
    fn initial_kills(&self) -> u64 {
        OomListener::initial_kills(self)
    }

    fn wait(&mut self, stop: BorrowedFd<'_>) -> Result<crate::runtime::OomWait, crate::runtime::RuntimeError> {
        use crate::runtime::{OomWait, RuntimeError};
        match OomListener::wait(self, stop) {
            Ok(OomEvent::Kills(count)) => Ok(OomWait::Kills(count)),
            Ok(OomEvent::Stopped) => Ok(OomWait::Stopped),
            Ok(OomEvent::Gone) => Ok(OomWait::Gone),
            Err(error) => Err(RuntimeError::failed(error.to_string())),
        }
    }
}

/// The outcome of one [`OomListener::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OomEvent {
    /// The new kill count.
    Kills(u64),
    Stopped,
    Gone,
}

/// Returns the `oom_kill` count of `memory.oom_control` (v1) or
/// `memory.events` (v2); `None` when the file has no such line.
pub fn read_oom_kills(version: CgroupVersion, dir: &Path) -> Result<Option<u64>, CgroupError> {
    let file = match version {
        CgroupVersion::V1 => "memory.oom_control",
        CgroupVersion::V2 => "memory.events",
    };
    Ok(parse_flat_keyed(&read_control(dir, file)?).get("oom_kill").copied())
}

/// Creates an eventfd and registers it for the OOM notifications of the v1
/// memory cgroup `dir`, by writing `"<eventfd> <fd of memory.oom_control>"`
/// to its `cgroup.event_control`.
fn register_v1_oom_eventfd(dir: &Path) -> Result<OwnedFd, CgroupError> {
    let control_path = dir.join("memory.oom_control");
    // SAFETY: eventfd takes no pointers; a non-negative result is a new fd
    // that nothing else owns.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(CgroupError::Read { path: control_path, source: io::Error::last_os_error() });
    }
    // SAFETY: `raw` is a fresh fd with no other owner.
    let eventfd = unsafe { OwnedFd::from_raw_fd(raw) };
    // The kernel takes its own reference to the control file during the
    // write, so the file can be closed afterwards.
    let control = fs::File::open(&control_path).map_err(|source| CgroupError::Read { path: control_path.clone(), source })?;
    let registration = format!("{} {}", eventfd.as_raw_fd(), control.as_raw_fd());
    write_control(dir, "cgroup.event_control", &registration)?;
    Ok(eventfd)
}

/// Creates an inotify instance watching the v2 `memory.events` of `dir`
/// for changes and for its removal.
fn watch_v2_memory_events(dir: &Path) -> Result<OwnedFd, CgroupError> {
    let path = dir.join("memory.events");
    let failed = |source: io::Error| CgroupError::Read { path: path.clone(), source };
    // SAFETY: inotify_init1 takes no pointers; a non-negative result is a
    // new fd that nothing else owns.
    let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    if raw < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh fd with no other owner.
    let inotify = unsafe { OwnedFd::from_raw_fd(raw) };
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| failed(io::Error::from_raw_os_error(libc::EINVAL)))?;
    // SAFETY: the path is a valid NUL-terminated string and the fd is open.
    let watch = unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), c_path.as_ptr(), libc::IN_MODIFY | libc::IN_DELETE_SELF) };
    if watch < 0 {
        return Err(failed(io::Error::last_os_error()));
    }
    Ok(inotify)
}

/// Returns true when a buffer of inotify events reports the watched file
/// removed (`IN_DELETE_SELF`) or the watch dropped (`IN_IGNORED`).
fn inotify_reports_removal(events: &[u8]) -> bool {
    // Each event is a `struct inotify_event`: wd (i32), mask (u32), cookie
    // (u32) and len (u32), then `len` bytes of name.
    let mut offset = 0;
    while offset + 16 <= events.len() {
        let field = |at: usize| u32::from_ne_bytes(events[offset + at..offset + at + 4].try_into().expect("four bytes"));
        let mask = field(4);
        let name_len = field(12) as usize;
        if mask & (libc::IN_DELETE_SELF | libc::IN_IGNORED) != 0 {
            return true;
        }
        offset += 16 + name_len;
    }
    false
}

/// Polls two fds for input; returns which of them are readable (or hung
/// up). EINTR restarts the poll.
fn poll_two(first: BorrowedFd<'_>, second: BorrowedFd<'_>) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd { fd: first.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: second.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    loop {
        // SAFETY: two valid pollfds are passed with their count.
        let result = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if result < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(error);
        }
        let ready = |fd: &libc::pollfd| fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0;
        return Ok((ready(&fds[0]), ready(&fds[1])));
    }
}

/// Writes a v1 memory limit together with the memory+swap limit, when the
/// host accounts swap. The kernel refuses (EINVAL) a
/// `memory.memsw.limit_in_bytes` below `memory.limit_in_bytes`, so a raise
/// writes memsw first and a lowering writes the memory limit first.
fn write_v1_memory(dir: &Path, bytes: u64, raising: bool) -> Result<(), CgroupError> {
    let value = bytes.to_string();
    let has_memsw = dir.join("memory.memsw.limit_in_bytes").exists();
    if raising && has_memsw {
        write_control(dir, "memory.memsw.limit_in_bytes", &value)?;
    }
    write_control(dir, "memory.limit_in_bytes", &value)?;
    if !raising && has_memsw {
        write_control(dir, "memory.memsw.limit_in_bytes", &value)?;
    }
    Ok(())
}

/// Returns the effective v1 shares of a CPU limit: `weight` when set, else
/// `limit_in_shares`; 0 means not set.
pub fn effective_shares(cpu: &CpuLimits) -> u64 {
    if cpu.weight > 0 {
        cpu.weight
    } else {
        cpu.limit_in_shares
    }
}

/// Converts v1 shares to a cgroup v2 `cpu.weight` (1 to 10000) on the
/// curve that maps 2, 1024 and 262144 shares to 1, 100 and 10000:
/// W = ⌈10^((L² + 125·L − 126) / 612)⌉ with L = log₂ S.
pub fn v2_weight(shares: u64) -> u64 {
    if shares <= 2 {
        return 1;
    }
    if shares >= 262_144 {
        return 10_000;
    }
    let log = (shares as f64).log2();
    let weight = 10f64.powf((log * log + 125.0 * log - 126.0) / 612.0);
    // The tolerance keeps an exact power such as 100 from rounding up to
    // 101 through floating-point error.
    ((weight - 1e-9).ceil() as u64).clamp(1, 10_000)
}

/// Usage counters of one container's cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupStats {
    /// The version the counters come from, which decides their keys.
    pub version: CgroupVersion,
    /// The keys and values of `memory.stat`.
    pub memory: std::collections::BTreeMap<String, u64>,
    /// `memory.memsw.limit_in_bytes`, when the host accounts swap.
    pub memsw_limit: Option<u64>,
    /// `cpuacct.usage`, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// `user` and `system` of `cpuacct.stat`, in USER_HZ ticks.
    pub cpu_user_ticks: u64,
    pub cpu_system_ticks: u64,
    /// The keys of the v2 `cpu.stat` (`usage_usec`, `user_usec`,
    /// `system_usec`…), in microseconds; empty on v1.
    pub cpu_stat: std::collections::BTreeMap<String, u64>,
    pub pids_current: u64,
}

impl CgroupStats {
    /// Returns all-zero counters of `version`.
    pub fn new(version: CgroupVersion) -> CgroupStats {
        CgroupStats {
            version,
            memory: Default::default(),
            memsw_limit: None,
            cpu_usage_ns: 0,
            cpu_user_ticks: 0,
            cpu_system_ticks: 0,
            cpu_stat: Default::default(),
            pids_current: 0,
        }
    }
}

/// Parses a flat keyed file such as `memory.stat`: one `key value` per
/// line. Lines that do not parse are skipped.
pub fn parse_flat_keyed(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            let value = words.next()?.parse().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

/// How often a container cgroup is tried again when its parent was removed
/// under it.
const PARENT_ATTEMPTS: u32 = 10;

fn create_dir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Create { path: path.to_path_buf(), source }),
    }
}

/// Delegates the memory, cpu and pids controllers to the children of the
/// v2 cgroup `parent`, as far as `parent` itself has them.
// NOTE: `parent` only has a controller when the server's own cgroup
// delegates it, which the "no internal processes" rule forbids while the
// server runs in that cgroup. Moving the server into a leaf first is not
// done yet, so on v2 the container cgroups may lack controllers.
fn enable_v2_controllers(parent: &Path) -> Result<(), CgroupError> {
    let available = read_control(parent, "cgroup.controllers")?;
    let wanted: Vec<String> = available
        .split_whitespace()
        .filter(|controller| matches!(*controller, "memory" | "cpu" | "pids"))
        .map(|controller| format!("+{controller}"))
        .collect();
    if wanted.is_empty() {
        return Ok(());
    }
    write_control(parent, "cgroup.subtree_control", &wanted.join(" "))
}

/// The kernel's largest pid count (`PID_MAX_LIMIT` on 64-bit Linux);
/// `pids.max` rejects larger numbers.
const PID_MAX_LIMIT: u64 = 4 * 1024 * 1024;

/// Returns what `pids.max` gets for a limit of `pids`: the number, or `max`
/// for a limit the kernel cannot hold, which no container could reach.
fn pids_max_value(pids: u64) -> String {
    if pids >= PID_MAX_LIMIT {
        "max".to_string()
    } else {
        pids.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const SELF_CGROUP: &str = "9:name=systemd:/\n6:freezer:/\n4:memory:/supervisor/job\n1:cpu,cpuacct:/\n0::/srv\n";

    #[test]
    fn v1_discovery_merges_shared_hierarchies() {
        let found = discover_v1(MOUNTINFO, SELF_CGROUP, &["memory", "cpu", "cpuacct", "freezer"]).unwrap();
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].mount, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(found[0].own_path, PathBuf::from("supervisor/job"));
        assert_eq!(found[1].controllers, vec!["cpu".to_string(), "cpuacct".to_string()]);
        assert_eq!(found[2].own_path, PathBuf::from(""));
    }

    #[test]
    fn all_v1_lists_hierarchies_with_controllers() {
        let found = all_v1(MOUNTINFO, SELF_CGROUP);
        let mounts: Vec<&Path> = found.iter().map(|hierarchy| hierarchy.mount.as_path()).collect();
        assert_eq!(mounts, [Path::new("/sys/fs/cgroup/freezer"), Path::new("/sys/fs/cgroup/memory"), Path::new("/sys/fs/cgroup/cpu,cpuacct")]);
        assert!(all_v1("41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "0::/\n").is_empty());
    }

    #[test]
    fn v1_discovery_reports_missing_controller() {
        let error = discover_v1(MOUNTINFO, SELF_CGROUP, &["pids"]).unwrap_err();
        assert!(error.to_string().starts_with("no cgroup hierarchy found for controller pids in /proc/self/mountinfo;"), "{error}");
    }

    #[test]
    fn v2_discovery_reads_unified_entry() {
        let found = discover_v2(MOUNTINFO, SELF_CGROUP).unwrap();
        assert_eq!(found.mount, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(found.own_path, PathBuf::from("srv"));
    }

    #[test]
    fn plan_puts_freezer_first_below_tag() {
        let hierarchies = discover_v1(MOUNTINFO, SELF_CGROUP, &["memory", "freezer"]).unwrap();
        let cgroup = ContainerCgroup::plan(CgroupVersion::V1, &hierarchies, "trellis", "box");
        assert_eq!(cgroup.dirs[0], PathBuf::from("/sys/fs/cgroup/freezer/trellis/box"));
        assert_eq!(cgroup.dirs[1], PathBuf::from("/sys/fs/cgroup/memory/supervisor/job/trellis/box"));
    }

    /// Seeds a directory with the files the kernel shows in a v2 cgroup.
    fn seed_v2(dir: &Path, controllers: &str) {
        fs::create_dir_all(dir).unwrap();
        for file in ["cgroup.procs", "cgroup.subtree_control", "cgroup.kill", "cgroup.freeze", "memory.max", "pids.max"] {
            fs::write(dir.join(file), "").unwrap();
        }
        fs::write(dir.join("cgroup.controllers"), controllers).unwrap();
        fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 1\n").unwrap();
    }

    fn v2_fixture() -> (tempfile::TempDir, ContainerCgroup) {
        let root = tempfile::tempdir().unwrap();
        let hierarchy = Hierarchy { mount: root.path().to_path_buf(), controllers: Vec::new(), own_path: PathBuf::from("srv") };
        seed_v2(&root.path().join("srv/trellis"), "cpuset cpu io memory pids");
        let cgroup = ContainerCgroup::plan(CgroupVersion::V2, &[hierarchy], "trellis", "box");
        (root, cgroup)
    }

    #[test]
    fn v2_create_delegates_controllers_and_removes() {
        let (root, cgroup) = v2_fixture();
        cgroup.create(false, &Limits::default()).unwrap();
        let parent = root.path().join("srv/trellis");
        assert_eq!(fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap(), "+cpu +memory +pids");
        assert!(parent.join("box").is_dir());
        cgroup.remove().unwrap();
        assert!(!parent.join("box").exists());
        // The seeded parent is not empty, as a parent with other containers.
        assert!(parent.exists());
        cgroup.remove().unwrap();
    }

    #[test]
    fn v2_control_files_are_written() {
        let (root, cgroup) = v2_fixture();
        let dir = root.path().join("srv/trellis/box");
        seed_v2(&dir, "memory pids");
        let mut limits = Limits::default();
        limits.memory_limits.limit_in_bytes = 64 << 20;
        limits.pid_limits.max = 50;
        limits.cpu_limits.weight = 1028;
        fs::write(dir.join("cpu.weight"), "100").unwrap();
        cgroup.create(false, &limits).unwrap();
        assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap(), "67108864");
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "50");
        assert_eq!(fs::read_to_string(dir.join("cpu.weight")).unwrap(), "101");

        cgroup.attach(4242).unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.procs")).unwrap(), "4242");
        assert_eq!(cgroup.pids().unwrap(), vec![4242]);

        cgroup.freeze().unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "1");
        cgroup.thaw().unwrap();
        assert_eq!(fs::read_to_string(dir.join("cgroup.freeze")).unwrap(), "0");

        assert!(cgroup.kill_all().unwrap());
        assert_eq!(fs::read_to_string(dir.join("cgroup.kill")).unwrap(), "1");
    }

    #[test]
    fn v2_weight_follows_the_curve() {
        for (shares, weight) in [(1028, 101), (280, 37), (1024, 100), (100, 17), (123, 20), (2, 1), (0, 1), (262_144, 10_000), (1 << 30, 10_000)] {
            assert_eq!(v2_weight(shares), weight, "{shares} shares");
        }
    }

    #[test]
    fn write_control_requires_existing_file() {
        let root = tempfile::tempdir().unwrap();
        let error = write_control(root.path(), "memory.max", "1").unwrap_err();
        assert!(error.to_string().starts_with("failed to write \"1\" to "), "{error}");
    }

    #[test]
    fn v1_kill_all_is_not_available() {
        let cgroup = ContainerCgroup { version: CgroupVersion::V1, dirs: vec![PathBuf::from("/nonexistent")], parents: Vec::new(), cpu_quota_per_share: 0 };
        assert!(!cgroup.kill_all().unwrap());
        assert_eq!(cgroup.pids().unwrap(), Vec::<i32>::new());
    }

    /// Returns an eventfd used as the stop fd of an OOM wait.
    fn stop_fd() -> OwnedFd {
        // SAFETY: a fresh eventfd with no other owner.
        unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) }
    }

    #[test]
    fn v2_oom_kills_come_from_memory_events() {
        let (root, cgroup) = v2_fixture();
        let dir = root.path().join("srv/trellis/box");
        seed_v2(&dir, "memory");
        fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n").unwrap();
        assert_eq!(read_oom_kills(CgroupVersion::V2, &dir).unwrap(), Some(0));

        let mut listener = OomListener::open(CgroupVersion::V2, &cgroup.dirs).unwrap().expect("a memory cgroup");
        assert_eq!(listener.initial_kills(), 0);
        let stop = stop_fd();
        let events = dir.join("memory.events");
        let writer = thread::spawn(move || {
            // A rise of another counter alone is not a kill.
            fs::write(&events, "low 0\nhigh 0\nmax 4\noom 0\noom_kill 0\n").unwrap();
            thread::sleep(Duration::from_millis(50));
            fs::write(&events, "low 0\nhigh 0\nmax 5\noom 2\noom_kill 2\n").unwrap();
        });
        assert_eq!(listener.wait(stop.as_fd()).unwrap(), OomEvent::Kills(2));
        writer.join().unwrap();

        fs::remove_file(dir.join("memory.events")).unwrap();
        assert_eq!(listener.wait(stop.as_fd()).unwrap(), OomEvent::Gone);
    }

    #[test]
    fn oom_wait_ends_on_stop() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("memory.events"), "oom_kill 3\n").unwrap();
        let mut listener = OomListener::open(CgroupVersion::V2, &[root.path().to_path_buf()]).unwrap().unwrap();
        assert_eq!(listener.initial_kills(), 3);
        let stop = stop_fd();
        let one = 1u64.to_ne_bytes();
        // SAFETY: eight valid bytes to an open eventfd.
        assert_eq!(unsafe { libc::write(stop.as_raw_fd(), one.as_ptr().cast(), 8) }, 8);
        assert_eq!(listener.wait(stop.as_fd()).unwrap(), OomEvent::Stopped);
    }

    #[test]
    fn no_memory_cgroup_means_no_oom_watch() {
        let root = tempfile::tempdir().unwrap();
        assert!(OomListener::open(CgroupVersion::V2, &[root.path().to_path_buf()]).unwrap().is_none());
        assert!(OomListener::open(CgroupVersion::V1, &[root.path().to_path_buf()]).unwrap().is_none());
    }

    #[test]
    fn v1_oom_control_without_kill_line_reads_none() {
        let root = tempfile::tempdir().unwrap();
        fs::write(root.path().join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\n").unwrap();
        assert_eq!(read_oom_kills(CgroupVersion::V1, root.path()).unwrap(), None);
        fs::write(root.path().join("memory.oom_control"), "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n").unwrap();
        assert_eq!(read_oom_kills(CgroupVersion::V1, root.path()).unwrap(), Some(7));
    }

    #[test]
    fn v2_memory_below_usage_is_rejected_before_writing() {
        let (root, cgroup) = v2_fixture();
        let dir = root.path().join("srv/trellis/box");
        seed_v2(&dir, "memory");
        fs::write(dir.join("memory.current"), "41943040\n").unwrap();
        let mut current = Limits::default();
        current.memory_limits.limit_in_bytes = 128 << 20;
        let mut requested = current.clone();
        requested.memory_limits.limit_in_bytes = 16 << 20;
        requested.pid_limits.max = 10;
        let error = cgroup.update_limits(&current, &requested).unwrap_err();
        assert!(matches!(error, CgroupError::MemoryBelowUsage { requested: 16777216, usage: 41943040 }), "{error}");
        assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap(), "", "nothing written");
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "", "nothing written");

        requested.memory_limits.limit_in_bytes = u64::MAX;
        cgroup.update_limits(&current, &requested).unwrap();
        assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap(), i64::MAX.to_string());
        assert_eq!(fs::read_to_string(dir.join("pids.max")).unwrap(), "10");
        assert_eq!(pids_max_value(u64::MAX), "max");
        assert_eq!(pids_max_value(PID_MAX_LIMIT - 1), (PID_MAX_LIMIT - 1).to_string());
    }

    #[test]
    fn v2_stats_read_v2_files() {
        let (root, cgroup) = v2_fixture();
        let dir = root.path().join("srv/trellis/box");
        seed_v2(&dir, "memory cpu pids");
        fs::write(dir.join("memory.stat"), "anon 4096\nfile 8192\ninactive_file 1024\n").unwrap();
        fs::write(dir.join("cpu.stat"), "usage_usec 30\nuser_usec 20\nsystem_usec 10\n").unwrap();
        fs::write(dir.join("pids.current"), "3\n").unwrap();
        fs::write(dir.join("memory.current"), "12288\n").unwrap();

        let stats = cgroup.stats();
        assert_eq!(stats.version, CgroupVersion::V2);
        assert_eq!(stats.memory.get("anon"), Some(&4096));
        assert_eq!(stats.memory.get("inactive_file"), Some(&1024));
        assert_eq!(stats.cpu_stat.get("usage_usec"), Some(&30));
        assert_eq!(stats.cpu_stat.get("system_usec"), Some(&10));
        assert_eq!(stats.pids_current, 3);
        assert_eq!(cgroup.memory_usage().unwrap(), Some(12288));
    }

    #[test]
    fn v2_memory_limit_disables_swap() {
        let (root, cgroup) = v2_fixture();
        let dir = root.path().join("srv/trellis/box");
        seed_v2(&dir, "memory");
        // Empty, because writes to a fixture file do not truncate it.
        fs::write(dir.join("memory.swap.max"), "").unwrap();
        let mut limits = Limits::default();
        cgroup.create(false, &limits).unwrap();
        assert_eq!(fs::read_to_string(dir.join("memory.swap.max")).unwrap(), "", "no memory limit, swap untouched");
        limits.memory_limits.limit_in_bytes = 32 << 20;
        cgroup.update_limits(&Limits::default(), &limits).unwrap();
        assert_eq!(fs::read_to_string(dir.join("memory.max")).unwrap(), "33554432");
        assert_eq!(fs::read_to_string(dir.join("memory.swap.max")).unwrap(), "0");
    }

    #[test]
    fn cpu_quota_follows_shares() {
        assert_eq!(cpu_quota(0, 100), None);
        assert_eq!(cpu_quota(512, 0), None);
        assert_eq!(cpu_quota(512, 100), Some(51_200));
        assert_eq!(cpu_quota(2, 100), Some(1_000), "at least 1 ms");
        assert_eq!(cpu_quota(u64::MAX, 100), Some(MAX_CPU_QUOTA_US));
    }

    #[test]
    fn v2_cpu_quota_is_written_to_cpu_max() {
        let (root, cgroup) = v2_fixture();
        let cgroup = cgroup.with_cpu_quota_per_share(100);
        let dir = root.path().join("srv/trellis/box");
        seed_v2(&dir, "cpu");
        fs::write(dir.join("cpu.weight"), "").unwrap();
        fs::write(dir.join("cpu.max"), "").unwrap();
        let mut limits = Limits::default();
        limits.cpu_limits.limit_in_shares = 1024;
        cgroup.create(false, &limits).unwrap();
        assert_eq!(fs::read_to_string(dir.join("cpu.max")).unwrap(), "102400 100000");
        assert_eq!(fs::read_to_string(dir.join("cpu.weight")).unwrap(), "100");
    }
}
