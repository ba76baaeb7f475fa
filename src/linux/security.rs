//! Capability sets and the seccomp filter of container processes and of
//! garden-init.
//!
//! Capability masks, as `/proc/<pid>/status` prints them:
//!
//! | process | inheritable and bounding | permitted and effective |
//! |---|---|---|
//! | unprivileged, any uid | [`UNPRIVILEGED_CAPS`] | uid 0: the same; else none |
//! | privileged uid 0 | [`PRIVILEGED_ROOT_CAPS`] | the same |
//! | privileged uid ≠ 0 | [`PRIVILEGED_USER_CAPS`] | none |
//!
//! Each mask is intersected with the bounding set the server runs with, so
//! a server whose own bounding set lacks a capability cannot hand it out.
//! The ambient set is always cleared.
//!
//! Unprivileged containers also get a seccomp filter (mode 2): an
//! allow-list whose default action is `EPERM`, where `clone` is allowed only
//! without namespace flags and `clone3` fails with `ENOSYS` so that libc
//! falls back to `clone`. On x86_64 the same list applies to 32-bit x86
//! and x32 processes, under those ABIs' system call numbers.

use std::io;

use seccompiler::{sock_filter, BpfProgram};

/// CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL, SETGID, SETUID, SETPCAP,
/// NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD, AUDIT_WRITE, SETFCAP.
pub const UNPRIVILEGED_CAPS: u64 = 0xa804_25fb;
/// [`UNPRIVILEGED_CAPS`] plus SYS_ADMIN (21).
pub const PRIVILEGED_USER_CAPS: u64 = UNPRIVILEGED_CAPS | 1 << 21;
/// Capabilities 0 (CHOWN) to 37 (AUDIT_READ). Newer ones (PERFMON, BPF,
/// CHECKPOINT_RESTORE) are left out even where the kernel has them.
pub const PRIVILEGED_ROOT_CAPS: u64 = (1 << 38) - 1;

/// `clone` flags that create namespaces: NEWNS, NEWUTS, NEWIPC, NEWUSER,
/// NEWPID and NEWNET.
pub const CLONE_NAMESPACE_FLAGS: u64 = 0x7C02_0000;

/// Errors of applying capabilities or the seccomp filter.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("failed to read the capability sets")]
    ReadCapabilities { #[source] source: io::Error },
    #[error("failed to drop capability {capability} from the bounding set")]
    DropBounding { capability: u32, #[source] source: io::Error },
    #[error("failed to set capabilities (inheritable {inheritable:#x}, permitted {permitted:#x}, effective {effective:#x})")]
    SetCapabilities { inheritable: u64, permitted: u64, effective: u64, #[source] source: io::Error },
    #[error("failed to clear the ambient capability set")]
    ClearAmbient { #[source] source: io::Error },
    #[error("failed to set the keep-capabilities flag")]
    KeepCapabilities { #[source] source: io::Error },
    #[error("failed to build the seccomp filter: {message}")]
    BuildFilter { message: String },
    #[error("failed to install the seccomp filter: {message}")]
    InstallFilter { message: String },
}

/// Returns the inheritable and bounding set of a container process.
pub fn container_caps(privileged: bool, uid: u32) -> u64 {
    match (privileged, uid) {
        (false, _) => UNPRIVILEGED_CAPS,
        (true, 0) => PRIVILEGED_ROOT_CAPS,
        (true, _) => PRIVILEGED_USER_CAPS,
    }
}

/// The three capability sets of a thread, as masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSets {
    pub inheritable: u64,
    pub permitted: u64,
    pub effective: u64,
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Reads this thread's capability sets.
pub fn read_caps() -> Result<CapSets, SecurityError> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two CapData entries for version 3.
    let result = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if result != 0 {
        return Err(SecurityError::ReadCapabilities { source: io::Error::last_os_error() });
    }
    let join = |low: u32, high: u32| u64::from(low) | u64::from(high) << 32;
    Ok(CapSets {
        inheritable: join(data[0].inheritable, data[1].inheritable),
        permitted: join(data[0].permitted, data[1].permitted),
        effective: join(data[0].effective, data[1].effective),
    })
}

/// Sets this thread's capability sets.
pub fn write_caps(sets: CapSets) -> Result<(), SecurityError> {
    let mut header = CapHeader { version: CAPABILITY_VERSION_3, pid: 0 };
    let split = |mask: u64| (mask as u32, (mask >> 32) as u32);
    let (inheritable_low, inheritable_high) = split(sets.inheritable);
    let (permitted_low, permitted_high) = split(sets.permitted);
    let (effective_low, effective_high) = split(sets.effective);
    let data = [
        CapData { effective: effective_low, permitted: permitted_low, inheritable: inheritable_low },
        CapData { effective: effective_high, permitted: permitted_high, inheritable: inheritable_high },
    ];
    // SAFETY: capset reads two CapData entries for version 3.
    let result = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if result != 0 {
        return Err(SecurityError::SetCapabilities {
            inheritable: sets.inheritable,
            permitted: sets.permitted,
            effective: sets.effective,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Returns this process's bounding set.
pub fn read_bounding() -> u64 {
    let mut mask = 0;
    for capability in 0..64 {
        // SAFETY: PR_CAPBSET_READ only reads.
        if unsafe { libc::prctl(libc::PR_CAPBSET_READ, capability as libc::c_ulong, 0, 0, 0) } == 1 {
            mask |= 1 << capability;
        }
    }
    mask
}

/// Limits the bounding set to `keep` and clears the ambient set. Needs
/// CAP_SETPCAP, so it runs before the process gives up root.
pub fn restrict_bounding(keep: u64) -> Result<(), SecurityError> {
    for capability in 0..64u32 {
        if keep & 1 << capability != 0 {
            continue;
        }
        // SAFETY: PR_CAPBSET_DROP takes a capability number.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, capability as libc::c_ulong, 0, 0, 0) } != 0 {
            let source = io::Error::last_os_error();
            // EINVAL: the kernel has no capability of that number.
            if source.raw_os_error() == Some(libc::EINVAL) {
                continue;
            }
            return Err(SecurityError::DropBounding { capability, source });
        }
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointer.
    if unsafe { libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(SecurityError::ClearAmbient { source: io::Error::last_os_error() });
    }
    Ok(())
}

/// Sets or clears the flag that keeps the permitted set across a change
/// from uid 0 to another uid.
pub fn keep_caps(keep: bool) -> Result<(), SecurityError> {
    // SAFETY: PR_SET_KEEPCAPS takes 0 or 1.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, keep as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(SecurityError::KeepCapabilities { source: io::Error::last_os_error() });
    }
    Ok(())
}

/// `AUDIT_ARCH_*` of `<linux/audit.h>`: the architecture value seccomp
/// reports for a system call of the native ABI.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 0xC000_00B7;
/// `AUDIT_ARCH_I386`, the architecture value of a system call made
/// through the 32-bit x86 ABI.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_I386: u32 = 0x4000_0003;

/// Offsets in `struct seccomp_data`: the system call number, the
/// architecture value and the low 32 bits of the first argument.
const SECCOMP_DATA_NR_OFFSET: u32 = 0;
const SECCOMP_DATA_ARCH_OFFSET: u32 = 4;
const SECCOMP_DATA_ARG0_LOW_OFFSET: u32 = 16;

/// Classic BPF opcodes of the filter (`<linux/bpf_common.h>`).
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
const BPF_JMP_JSET_K: u16 = 0x45;
const BPF_RET_K: u16 = 0x06;

/// Maximum instructions of one seccomp filter (`BPF_MAXINSNS`).
const MAX_FILTER_INSTRUCTIONS: usize = 4096;

const ACTION_ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
const ACTION_EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
const ACTION_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
const ACTION_KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;

/// The system call numbers of the filter for one architecture value.
struct AbiNumbers {
    audit_arch: u32,
    /// Allowed with any arguments.
    allowed: Vec<i64>,
    /// `clone`, allowed only without namespace flags.
    clone: Vec<i64>,
    /// `clone3`, which fails with ENOSYS.
    clone3: Vec<i64>,
}

/// Returns the numbers of each ABI the filter covers. On x86_64 the x32
/// numbers join the native ones, because x32 calls carry the same
/// architecture value.
fn abi_numbers() -> Vec<AbiNumbers> {
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut native = AbiNumbers {
        audit_arch: AUDIT_ARCH_NATIVE,
        allowed: ALLOWED_SYSCALLS.to_vec(),
        clone: vec![libc::SYS_clone],
        clone3: vec![libc::SYS_clone3],
    };
    #[cfg(target_arch = "x86_64")]
    {
        use super::x86_compat::{x32_number, I386_ALLOWED, I386_CLONE, I386_CLONE3};
        native.allowed.extend(ALLOWED_SYSCALLS.iter().map(|number| x32_number(*number)));
        native.clone.push(x32_number(libc::SYS_clone));
        native.clone3.push(x32_number(libc::SYS_clone3));
        let i386 = AbiNumbers {
            audit_arch: AUDIT_ARCH_I386,
            allowed: I386_ALLOWED.iter().map(|(_, number)| *number).collect(),
            clone: vec![I386_CLONE],
            clone3: vec![I386_CLONE3],
        };
        vec![native, i386]
    }
    #[cfg(not(target_arch = "x86_64"))]
    vec![native]
}

/// Builds the seccomp filter of an unprivileged container process.
///
/// It loads the architecture value and jumps to the part for that ABI,
/// and kills the process for any other ABI. On x86_64 the parts cover
/// the x86_64, x32 and 32-bit x86 ABIs with the same list of calls, as
/// Garden's profile does. Each part allows the listed calls, allows
/// `clone` without namespace flags, makes `clone3` fail with ENOSYS and
/// every other call with EPERM.
///
/// seccompiler 0.5 has no i386 target and compiles five instructions per
/// allowed call, which for three ABIs exceeds the kernel's limit of 4096
/// instructions, so the program is written here, as a binary search over
/// the call numbers of each ABI (see [`abi_body`]).
pub fn build_filter() -> Result<BpfProgram, SecurityError> {
    let abis = abi_numbers();
    let bodies: Vec<(u32, Vec<sock_filter>)> = abis.iter().map(|abi| (abi.audit_arch, abi_body(abi))).collect();

    // The load, a compare and a jump per ABI, and the kill.
    let header_len = 1 + 2 * bodies.len() + 1;
    let mut program = vec![statement(BPF_LD_W_ABS, SECCOMP_DATA_ARCH_OFFSET)];
    let mut body_start = header_len;
    for (audit_arch, body) in &bodies {
        program.push(jump(BPF_JMP_JEQ_K, *audit_arch, 0, 1));
        // `ja` counts from the next instruction and has a 32-bit offset,
        // while a conditional jump reaches only 255 instructions.
        let offset = body_start - (program.len() + 1);
        program.push(statement(BPF_JMP_JA, offset as u32));
        body_start += body.len();
    }
    program.push(statement(BPF_RET_K, ACTION_KILL));
    for (_, body) in bodies {
        program.extend(body);
    }
    if program.len() > MAX_FILTER_INSTRUCTIONS {
        return Err(SecurityError::BuildFilter {
            message: format!("the filter has {} instructions, more than the kernel's {MAX_FILTER_INSTRUCTIONS}", program.len()),
        });
    }
    Ok(program)
}

/// Action of the filter for one system call number of an ABI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CallAction {
    Allow,
    /// `clone`: allowed without namespace flags, EPERM with them.
    Clone,
    Enosys,
    Deny,
}

/// Splits the 32-bit number space of one ABI into intervals whose numbers
/// share an action, as (first number, action) pairs in ascending order.
/// The first interval starts at 0 and each one ends where the next starts.
/// A number listed twice keeps the action of its first list: allowed,
/// then `clone3`, then `clone`.
fn abi_intervals(abi: &AbiNumbers) -> Vec<(u32, CallAction)> {
    let mut actions = std::collections::BTreeMap::new();
    let lists = [(&abi.allowed, CallAction::Allow), (&abi.clone3, CallAction::Enosys), (&abi.clone, CallAction::Clone)];
    for (numbers, action) in lists {
        for number in numbers {
            // The filter compares the 32-bit number the kernel passes.
            actions.entry(*number as u32).or_insert(action);
        }
    }
    let mut intervals: Vec<(u32, CallAction)> = Vec::new();
    let mut add = |start: u32, action: CallAction| {
        if intervals.last().map(|(_, last)| *last) != Some(action) {
            intervals.push((start, action));
        }
    };
    let mut next: u64 = 0;
    for (number, action) in actions {
        if u64::from(number) > next {
            add(next as u32, CallAction::Deny);
        }
        add(number, action);
        next = u64::from(number) + 1;
    }
    if next <= u64::from(u32::MAX) {
        add(next as u32, CallAction::Deny);
    }
    intervals
}

/// Returns the part of the filter for one ABI. It loads the system call
/// number itself and ends every path with a return, so it runs unchanged
/// at any offset.
///
/// The part is a binary search over [`abi_intervals`]. A list of one
/// comparison per call would be as strict but slower to install. The
/// kernel emulates a new filter for every call number, to cache the calls
/// that are always allowed (`seccomp_cache_prepare_bitmap` in Linux's
/// kernel/seccomp.c). Along a list of 1831 instructions that took 0.87 ms
/// per process start (perf on the seccomp system call, 2-core machine,
/// Linux 6.18). A search decides each number in about ten steps.
fn abi_body(abi: &AbiNumbers) -> Vec<sock_filter> {
    let mut body = vec![statement(BPF_LD_W_ABS, SECCOMP_DATA_NR_OFFSET)];
    search(&abi_intervals(abi), &mut body);
    body
}

/// Appends the search over `intervals` (at least one) to `program`.
fn search(intervals: &[(u32, CallAction)], program: &mut Vec<sock_filter>) {
    if let [(_, action)] = intervals {
        decide(*action, program);
        return;
    }
    let middle = intervals.len() / 2;
    let mut lower = Vec::new();
    search(&intervals[..middle], &mut lower);
    // Numbers from the first one of the upper half on skip the lower
    // half. A conditional jump reaches only 255 instructions, so a longer
    // lower half is skipped with `ja`.
    let pivot = intervals[middle].0;
    match u8::try_from(lower.len()) {
        Ok(length) => program.push(jump(BPF_JMP_JGE_K, pivot, length, 0)),
        Err(_) => {
            program.push(jump(BPF_JMP_JGE_K, pivot, 0, 1));
            program.push(statement(BPF_JMP_JA, lower.len() as u32));
        }
    }
    program.extend(lower);
    search(&intervals[middle..], program);
}

/// Appends the instructions that end the filter with `action`.
fn decide(action: CallAction, program: &mut Vec<sock_filter>) {
    match action {
        CallAction::Allow => program.push(statement(BPF_RET_K, ACTION_ALLOW)),
        CallAction::Enosys => program.push(statement(BPF_RET_K, ACTION_ENOSYS)),
        CallAction::Deny => program.push(statement(BPF_RET_K, ACTION_EPERM)),
        CallAction::Clone => {
            // The namespace flags all sit in the low 32 bits of the flags
            // argument, so the high half need not be loaded.
            program.push(statement(BPF_LD_W_ABS, SECCOMP_DATA_ARG0_LOW_OFFSET));
            program.push(jump(BPF_JMP_JSET_K, CLONE_NAMESPACE_FLAGS as u32, 1, 0));
            program.push(statement(BPF_RET_K, ACTION_ALLOW));
            program.push(statement(BPF_RET_K, ACTION_EPERM));
        }
    }
}

fn statement(code: u16, k: u32) -> sock_filter {
    sock_filter { code, jt: 0, jf: 0, k }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Installs a filter built by [`build_filter`] on the calling thread.
/// Needs CAP_SYS_ADMIN in the thread's user namespace, because the
/// no_new_privs flag is not set. seccompiler's `apply_filter` is not used
/// because it always sets no_new_privs, which Garden leaves to the
/// operator's option: with it, setuid programs such as sudo stop working.
pub fn install_filter(filter: &BpfProgram) -> Result<(), SecurityError> {
    #[repr(C)]
    struct SockFprog {
        len: libc::c_ushort,
        filter: *const sock_filter,
    }
    let len = libc::c_ushort::try_from(filter.len())
        .map_err(|_| SecurityError::InstallFilter { message: format!("filter of {} instructions is too long", filter.len()) })?;
    let program = SockFprog { len, filter: filter.as_ptr() };
    // SAFETY: the kernel copies the program, which outlives the call.
    let result = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &program as *const SockFprog) };
    if result != 0 {
        return Err(SecurityError::InstallFilter { message: io::Error::last_os_error().to_string() });
    }
    Ok(())
}

/// Sets the no_new_privs flag, the operator's hardening option.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes 1.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// System calls the allow-list permits with any arguments. Left out, so
/// they fail with EPERM: mount and the new mount API, umount2, pivot_root,
/// unshare, setns, keyctl, add_key, request_key, module and kexec calls,
/// reboot, swapon, swapoff, acct, bpf, perf_event_open, syslog, clock and
/// time setting, sethostname, setdomainname, open_by_handle_at,
/// name_to_handle_at, quotactl, userfaultfd, fanotify_init, io_uring, kcmp,
/// pidfd_getfd, lookup_dcookie, iopl, ioperm and the NUMA page movers.
const ALLOWED_SYSCALLS: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_chroot,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_get_mempolicy,
    libc::SYS_get_robust_list,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_getrlimit,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_io_cancel,
    libc::SYS_io_destroy,
    libc::SYS_io_getevents,
    libc::SYS_io_setup,
    libc::SYS_io_submit,
    libc::SYS_ioctl,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_kill,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self,
    libc::SYS_lgetxattr,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_madvise,
    libc::SYS_mbind,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_mincore,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mlockall,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mq_getsetattr,
    libc::SYS_mq_notify,
    libc::SYS_mq_open,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_unlink,
    libc::SYS_mremap,
    libc::SYS_msgctl,
    libc::SYS_msgget,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munlockall,
    libc::SYS_munmap,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_personality,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe2,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pselect6,
    libc::SYS_ptrace,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_remap_file_pages,
    libc::SYS_removexattr,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_semctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_set_mempolicy,
    libc::SYS_set_robust_list,
    libc::SYS_set_tid_address,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_setrlimit,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_setuid,
    libc::SYS_setxattr,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_shmdt,
    libc::SYS_shmget,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd4,
    libc::SYS_socket,
    libc::SYS_socketpair,
    libc::SYS_splice,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_sync_file_range,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlinkat,
    libc::SYS_utimensat,
    libc::SYS_vmsplice,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
    // The older x86_64 calls that the generic table replaced.
    #[cfg(target_arch = "x86_64")]
    libc::SYS_access,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_alarm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_arch_prctl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_chmod,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_chown,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_creat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_dup2,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_create,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_epoll_wait,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_eventfd,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_fork,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_futimesat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_getdents,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_getpgrp,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_inotify_init,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lchown,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_link,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_lstat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_mkdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_mknod,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_open,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_pause,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_pipe,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_poll,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_readlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rename,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_rmdir,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_select,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_signalfd,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_stat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_symlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_time,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_unlink,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_utime,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_utimes,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_vfork,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_masks_match_garden() {
        assert_eq!(container_caps(false, 0), 0xa80425fb);
        assert_eq!(container_caps(false, 1000), 0xa80425fb);
        assert_eq!(container_caps(true, 0), 0x3f_ffff_ffff);
        assert_eq!(container_caps(true, 1000), 0xa82425fb);
        assert_eq!(UNPRIVILEGED_CAPS.count_ones(), 14);
    }

    #[test]
    fn allow_list_leaves_out_namespace_calls() {
        for blocked in [libc::SYS_unshare, libc::SYS_setns, libc::SYS_mount, libc::SYS_umount2, libc::SYS_pivot_root, libc::SYS_keyctl] {
            assert!(!ALLOWED_SYSCALLS.contains(&blocked), "system call {blocked} is allowed");
        }
        assert!(!ALLOWED_SYSCALLS.contains(&libc::SYS_clone), "clone must only be allowed with a condition");
    }

    /// Runs a seccomp filter on one system call, as the kernel's classic
    /// BPF interpreter does for the opcodes [`build_filter`] writes, and
    /// returns the filter's action.
    fn run_filter(program: &[seccompiler::sock_filter], arch: u32, number: i64, args: [u64; 6]) -> u32 {
        run_filter_counting(program, arch, number, args).0
    }

    /// Like [`run_filter`], and also returns the number of instructions
    /// executed.
    fn run_filter_counting(program: &[seccompiler::sock_filter], arch: u32, number: i64, args: [u64; 6]) -> (u32, usize) {
        // struct seccomp_data: nr, arch, instruction_pointer, args[6].
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&(number as u32).to_ne_bytes());
        data.extend_from_slice(&arch.to_ne_bytes());
        data.extend_from_slice(&0u64.to_ne_bytes());
        for arg in args {
            data.extend_from_slice(&arg.to_ne_bytes());
        }
        let mut accumulator = 0u32;
        let mut pc = 0usize;
        let mut steps = 0;
        loop {
            steps += 1;
            let instruction = &program[pc];
            let k = instruction.k;
            pc += 1;
            let jump = |condition: bool| usize::from(if condition { instruction.jt } else { instruction.jf });
            match instruction.code {
                0x20 => accumulator = u32::from_ne_bytes(data[k as usize..k as usize + 4].try_into().unwrap()),
                0x05 => pc += k as usize,
                0x15 => pc += jump(accumulator == k),
                0x35 => pc += jump(accumulator >= k),
                0x45 => pc += jump(accumulator & k != 0),
                0x06 => return (k, steps),
                code => panic!("opcode {code:#x} at {} is not interpreted", pc - 1),
            }
        }
    }

    const NO_ARGS: [u64; 6] = [0; 6];

    fn flags(flags: libc::c_int) -> [u64; 6] {
        [flags as u64, 0, 0, 0, 0, 0]
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x86_64_calls_follow_allow_list() {
        let filter = build_filter().expect("filter builds");
        for number in ALLOWED_SYSCALLS {
            assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, *number, NO_ARGS), ACTION_ALLOW, "x86_64 system call {number}");
        }
        for denied in [libc::SYS_unshare, libc::SYS_setns, libc::SYS_mount, libc::SYS_keyctl, libc::SYS_reboot] {
            assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, denied, NO_ARGS), ACTION_EPERM, "x86_64 system call {denied}");
        }
        assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, libc::SYS_clone, flags(libc::SIGCHLD)), ACTION_ALLOW);
        assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, libc::SYS_clone, flags(libc::CLONE_NEWUSER | libc::SIGCHLD)), ACTION_EPERM);
        assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, libc::SYS_clone3, NO_ARGS), ACTION_ENOSYS);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn i386_calls_follow_allow_list() {
        use crate::linux::x86_compat::{I386_ALLOWED, I386_CLONE, I386_CLONE3};
        let filter = build_filter().expect("filter builds");
        for (name, number) in I386_ALLOWED {
            assert_eq!(run_filter(&filter, AUDIT_ARCH_I386, *number, NO_ARGS), ACTION_ALLOW, "i386 system call {name}");
        }
        for (name, number) in [("unshare", 310), ("setns", 346), ("mount", 21), ("umount2", 52), ("pivot_root", 217), ("keyctl", 288)] {
            assert_eq!(run_filter(&filter, AUDIT_ARCH_I386, number, NO_ARGS), ACTION_EPERM, "i386 system call {name}");
        }
        assert_eq!(run_filter(&filter, AUDIT_ARCH_I386, I386_CLONE, flags(libc::SIGCHLD)), ACTION_ALLOW);
        assert_eq!(run_filter(&filter, AUDIT_ARCH_I386, I386_CLONE, flags(libc::CLONE_NEWNET | libc::SIGCHLD)), ACTION_EPERM);
        assert_eq!(run_filter(&filter, AUDIT_ARCH_I386, I386_CLONE3, NO_ARGS), ACTION_ENOSYS);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_calls_follow_allow_list() {
        use crate::linux::x86_compat::{x32_number, X32_SYSCALL_BIT};
        let filter = build_filter().expect("filter builds");
        for number in ALLOWED_SYSCALLS {
            let x32 = x32_number(*number);
            assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, x32, NO_ARGS), ACTION_ALLOW, "x32 system call {x32:#x}");
        }
        assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, X32_SYSCALL_BIT + 512, NO_ARGS), ACTION_ALLOW, "x32 rt_sigaction");
        assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, X32_SYSCALL_BIT | libc::SYS_unshare, NO_ARGS), ACTION_EPERM);
        assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, x32_number(libc::SYS_clone), flags(libc::SIGCHLD)), ACTION_ALLOW);
        assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, x32_number(libc::SYS_clone), flags(libc::CLONE_NEWPID | libc::SIGCHLD)), ACTION_EPERM);
        assert_eq!(run_filter(&filter, AUDIT_ARCH_NATIVE, x32_number(libc::SYS_clone3), NO_ARGS), ACTION_ENOSYS);
    }

    #[test]
    fn other_architectures_are_killed() {
        // AUDIT_ARCH_ARM, which the filter has no part for.
        let filter = build_filter().expect("filter builds");
        assert_eq!(run_filter(&filter, 0x4000_0028, libc::SYS_getpid, NO_ARGS), ACTION_KILL);
    }

    #[test]
    fn filter_fits_kernel_limit() {
        let filter = build_filter().expect("filter builds");
        assert!(filter.len() <= MAX_FILTER_INSTRUCTIONS, "filter of {} instructions", filter.len());
    }

    /// Returns the action that a list of one comparison per call gives,
    /// checked in the order allowed, `clone3`, `clone`, else EPERM.
    fn expected_action(abi: &AbiNumbers, number: u32, arg0: u64) -> u32 {
        let listed = |numbers: &[i64]| numbers.iter().any(|listed| *listed as u32 == number);
        if listed(&abi.allowed) {
            ACTION_ALLOW
        } else if listed(&abi.clone3) {
            ACTION_ENOSYS
        } else if listed(&abi.clone) {
            if arg0 as u32 & CLONE_NAMESPACE_FLAGS as u32 != 0 {
                ACTION_EPERM
            } else {
                ACTION_ALLOW
            }
        } else {
            ACTION_EPERM
        }
    }

    /// A search whose lower half is longer than a conditional jump reaches
    /// skips it with `ja` and still gives every number its action.
    #[test]
    fn search_with_long_halves_uses_ja() {
        let abi = AbiNumbers {
            audit_arch: AUDIT_ARCH_NATIVE,
            allowed: (0..800).step_by(2).collect(),
            clone: vec![1001],
            clone3: vec![1003],
        };
        let body = abi_body(&abi);
        assert!(body.iter().any(|instruction| instruction.code == BPF_JMP_JA), "no `ja` in a body of {} instructions", body.len());
        for number in 0..1100u32 {
            for arg0 in [libc::SIGCHLD as u64, CLONE_NAMESPACE_FLAGS] {
                let action = run_filter(&body, AUDIT_ARCH_NATIVE, i64::from(number), [arg0, 0, 0, 0, 0, 0]);
                assert_eq!(action, expected_action(&abi, number, arg0), "number {number} flags {arg0:#x}");
            }
        }
    }

    /// Every number of each ABI, around every listed number and at the
    /// ends of the range, gets the action of the plain list, within a
    /// search's number of steps.
    #[test]
    fn search_matches_the_list_for_every_number() {
        let filter = build_filter().expect("filter builds");
        for abi in abi_numbers() {
            let mut numbers: Vec<u32> = (0..2048).collect();
            for listed in abi.allowed.iter().chain(&abi.clone).chain(&abi.clone3) {
                let listed = *listed as u32;
                numbers.extend([listed.wrapping_sub(1), listed, listed.wrapping_add(1)]);
            }
            numbers.extend([0x3fff_ffff, 0x4000_0000, 0x7fff_ffff, 0x8000_0000, u32::MAX - 1, u32::MAX]);
            let mut longest = 0;
            for number in numbers {
                for arg0 in [libc::SIGCHLD as u64, (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64, CLONE_NAMESPACE_FLAGS] {
                    let args = [arg0, 0, 0, 0, 0, 0];
                    let (action, steps) = run_filter_counting(&filter, abi.audit_arch, i64::from(number), args);
                    assert_eq!(action, expected_action(&abi, number, arg0), "arch {:#x} number {number:#x} flags {arg0:#x}", abi.audit_arch);
                    longest = longest.max(steps);
                }
            }
            // A list would take hundreds of steps for the last calls.
            assert!(longest <= 40, "arch {:#x}: a call took {longest} steps", abi.audit_arch);
        }
    }
}
