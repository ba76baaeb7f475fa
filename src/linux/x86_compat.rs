//! System call numbers of the two compatibility ABIs of an x86_64 kernel,
//! for the seccomp filter of [`super::security`]: 32-bit x86 (i386) and
//! x32.
//!
//! The numbers are those of the kernel's `syscall_32.tbl` and
//! `syscall_64.tbl`, as `asm/unistd_32.h` and `asm/unistd_x32.h` of
//! linux-libc-dev print them; a unit test compares them with those headers
//! where they are installed.

/// System calls a 32-bit x86 process of an unprivileged container may make
/// with any arguments, by name and i386 number. The list is the x86_64
/// allow-list under the i386 names, plus the 32-bit forms of the same calls:
/// the `*32` id calls, the `*64` file calls, the `*_time64` calls of
/// 64-bit `time_t`, the old signal calls, and `socketcall` and `ipc`, which
/// multiplex socket and System V IPC calls that the x86_64 list allows
/// one by one. `clone` and `clone3` are left out because the filter
/// treats them on their own.
pub const I386_ALLOWED: &[(&str, i64)] = &[
    ("restart_syscall", 0),
    ("exit", 1),
    ("fork", 2),
    ("read", 3),
    ("write", 4),
    ("open", 5),
    ("close", 6),
    ("waitpid", 7),
    ("creat", 8),
    ("link", 9),
    ("unlink", 10),
    ("execve", 11),
    ("chdir", 12),
    ("time", 13),
    ("mknod", 14),
    ("chmod", 15),
    ("lchown", 16),
    ("lseek", 19),
    ("getpid", 20),
    ("setuid", 23),
    ("getuid", 24),
    ("ptrace", 26),
    ("alarm", 27),
    ("pause", 29),
    ("utime", 30),
    ("access", 33),
    ("sync", 36),
    ("kill", 37),
    ("rename", 38),
    ("mkdir", 39),
    ("rmdir", 40),
    ("dup", 41),
    ("pipe", 42),
    ("times", 43),
    ("brk", 45),
    ("setgid", 46),
    ("getgid", 47),
    ("geteuid", 49),
    ("getegid", 50),
    ("ioctl", 54),
    ("fcntl", 55),
    ("setpgid", 57),
    ("umask", 60),
    ("chroot", 61),
    ("dup2", 63),
    ("getppid", 64),
    ("getpgrp", 65),
    ("setsid", 66),
    ("sigaction", 67),
    ("setreuid", 70),
    ("setregid", 71),
    ("sigsuspend", 72),
    ("sigpending", 73),
    ("setrlimit", 75),
    ("getrlimit", 76),
    ("getrusage", 77),
    ("gettimeofday", 78),
    ("getgroups", 80),
    ("setgroups", 81),
    ("select", 82),
    ("symlink", 83),
    ("readlink", 85),
    ("mmap", 90),
    ("munmap", 91),
    ("truncate", 92),
    ("ftruncate", 93),
    ("fchmod", 94),
    ("fchown", 95),
    ("getpriority", 96),
    ("setpriority", 97),
    ("statfs", 99),
    ("fstatfs", 100),
    ("socketcall", 102),
    ("setitimer", 104),
    ("getitimer", 105),
    ("stat", 106),
    ("lstat", 107),
    ("fstat", 108),
    ("wait4", 114),
    ("sysinfo", 116),
    ("ipc", 117),
    ("fsync", 118),
    ("sigreturn", 119),
    ("uname", 122),
    ("mprotect", 125),
    ("sigprocmask", 126),
    ("getpgid", 132),
    ("fchdir", 133),
    ("personality", 136),
    ("setfsuid", 138),
    ("setfsgid", 139),
    ("_llseek", 140),
    ("getdents", 141),
    ("_newselect", 142),
    ("flock", 143),
    ("msync", 144),
    ("readv", 145),
    ("writev", 146),
    ("getsid", 147),
    ("fdatasync", 148),
    ("mlock", 150),
    ("munlock", 151),
    ("mlockall", 152),
    ("munlockall", 153),
    ("sched_setparam", 154),
    ("sched_getparam", 155),
    ("sched_setscheduler", 156),
    ("sched_getscheduler", 157),
    ("sched_yield", 158),
    ("sched_get_priority_max", 159),
    ("sched_get_priority_min", 160),
    ("sched_rr_get_interval", 161),
    ("nanosleep", 162),
    ("mremap", 163),
    ("setresuid", 164),
    ("getresuid", 165),
    ("poll", 168),
    ("setresgid", 170),
    ("getresgid", 171),
    ("prctl", 172),
    ("rt_sigreturn", 173),
    ("rt_sigaction", 174),
    ("rt_sigprocmask", 175),
    ("rt_sigpending", 176),
    ("rt_sigtimedwait", 177),
    ("rt_sigqueueinfo", 178),
    ("rt_sigsuspend", 179),
    ("pread64", 180),
    ("pwrite64", 181),
    ("chown", 182),
    ("getcwd", 183),
    ("capget", 184),
    ("capset", 185),
    ("sigaltstack", 186),
    ("sendfile", 187),
    ("vfork", 190),
    ("ugetrlimit", 191),
    ("mmap2", 192),
    ("truncate64", 193),
    ("ftruncate64", 194),
    ("stat64", 195),
    ("lstat64", 196),
    ("fstat64", 197),
    ("lchown32", 198),
    ("getuid32", 199),
    ("getgid32", 200),
    ("geteuid32", 201),
    ("getegid32", 202),
    ("setreuid32", 203),
    ("setregid32", 204),
    ("getgroups32", 205),
    ("setgroups32", 206),
    ("fchown32", 207),
    ("setresuid32", 208),
    ("getresuid32", 209),
    ("setresgid32", 210),
    ("getresgid32", 211),
    ("chown32", 212),
    ("setuid32", 213),
    ("setgid32", 214),
    ("setfsuid32", 215),
    ("setfsgid32", 216),
    ("mincore", 218),
    ("madvise", 219),
    ("getdents64", 220),
    ("fcntl64", 221),
    ("gettid", 224),
    ("readahead", 225),
    ("setxattr", 226),
    ("lsetxattr", 227),
    ("fsetxattr", 228),
    ("getxattr", 229),
    ("lgetxattr", 230),
    ("fgetxattr", 231),
    ("listxattr", 232),
    ("llistxattr", 233),
    ("flistxattr", 234),
    ("removexattr", 235),
    ("lremovexattr", 236),
    ("fremovexattr", 237),
    ("tkill", 238),
    ("sendfile64", 239),
    ("futex", 240),
    ("sched_setaffinity", 241),
    ("sched_getaffinity", 242),
    ("set_thread_area", 243),
    ("get_thread_area", 244),
    ("io_setup", 245),
    ("io_destroy", 246),
    ("io_getevents", 247),
    ("io_submit", 248),
    ("io_cancel", 249),
    ("fadvise64", 250),
    ("exit_group", 252),
    ("epoll_create", 254),
    ("epoll_ctl", 255),
    ("epoll_wait", 256),
    ("remap_file_pages", 257),
    ("set_tid_address", 258),
    ("timer_create", 259),
    ("timer_settime", 260),
    ("timer_gettime", 261),
    ("timer_getoverrun", 262),
    ("timer_delete", 263),
    ("clock_gettime", 265),
    ("clock_getres", 266),
    ("clock_nanosleep", 267),
    ("statfs64", 268),
    ("fstatfs64", 269),
    ("tgkill", 270),
    ("utimes", 271),
    ("fadvise64_64", 272),
    ("mbind", 274),
    ("get_mempolicy", 275),
    ("set_mempolicy", 276),
    ("mq_open", 277),
    ("mq_unlink", 278),
    ("mq_timedsend", 279),
    ("mq_timedreceive", 280),
    ("mq_notify", 281),
    ("mq_getsetattr", 282),
    ("waitid", 284),
    ("ioprio_set", 289),
    ("ioprio_get", 290),
    ("inotify_init", 291),
    ("inotify_add_watch", 292),
    ("inotify_rm_watch", 293),
    ("openat", 295),
    ("mkdirat", 296),
    ("mknodat", 297),
    ("fchownat", 298),
    ("futimesat", 299),
    ("fstatat64", 300),
    ("unlinkat", 301),
    ("renameat", 302),
    ("linkat", 303),
    ("symlinkat", 304),
    ("readlinkat", 305),
    ("fchmodat", 306),
    ("faccessat", 307),
    ("pselect6", 308),
    ("ppoll", 309),
    ("set_robust_list", 311),
    ("get_robust_list", 312),
    ("splice", 313),
    ("sync_file_range", 314),
    ("tee", 315),
    ("vmsplice", 316),
    ("getcpu", 318),
    ("epoll_pwait", 319),
    ("utimensat", 320),
    ("signalfd", 321),
    ("timerfd_create", 322),
    ("eventfd", 323),
    ("fallocate", 324),
    ("timerfd_settime", 325),
    ("timerfd_gettime", 326),
    ("signalfd4", 327),
    ("eventfd2", 328),
    ("epoll_create1", 329),
    ("dup3", 330),
    ("pipe2", 331),
    ("inotify_init1", 332),
    ("preadv", 333),
    ("pwritev", 334),
    ("rt_tgsigqueueinfo", 335),
    ("recvmmsg", 337),
    ("prlimit64", 340),
    ("syncfs", 344),
    ("sendmmsg", 345),
    ("process_vm_readv", 347),
    ("process_vm_writev", 348),
    ("sched_setattr", 351),
    ("sched_getattr", 352),
    ("renameat2", 353),
    ("seccomp", 354),
    ("getrandom", 355),
    ("memfd_create", 356),
    ("execveat", 358),
    ("socket", 359),
    ("socketpair", 360),
    ("bind", 361),
    ("connect", 362),
    ("listen", 363),
    ("accept4", 364),
    ("getsockopt", 365),
    ("setsockopt", 366),
    ("getsockname", 367),
    ("getpeername", 368),
    ("sendto", 369),
    ("sendmsg", 370),
    ("recvfrom", 371),
    ("recvmsg", 372),
    ("shutdown", 373),
    ("membarrier", 375),
    ("mlock2", 376),
    ("copy_file_range", 377),
    ("preadv2", 378),
    ("pwritev2", 379),
    ("statx", 383),
    ("arch_prctl", 384),
    ("rseq", 386),
    ("semget", 393),
    ("semctl", 394),
    ("shmget", 395),
    ("shmctl", 396),
    ("shmat", 397),
    ("shmdt", 398),
    ("msgget", 399),
    ("msgsnd", 400),
    ("msgrcv", 401),
    ("msgctl", 402),
    ("clock_gettime64", 403),
    ("clock_getres_time64", 406),
    ("clock_nanosleep_time64", 407),
    ("timer_gettime64", 408),
    ("timer_settime64", 409),
    ("timerfd_gettime64", 410),
    ("timerfd_settime64", 411),
    ("utimensat_time64", 412),
    ("pselect6_time64", 413),
    ("ppoll_time64", 414),
    ("recvmmsg_time64", 417),
    ("mq_timedsend_time64", 418),
    ("mq_timedreceive_time64", 419),
    ("semtimedop_time64", 420),
    ("rt_sigtimedwait_time64", 421),
    ("futex_time64", 422),
    ("sched_rr_get_interval_time64", 423),
    ("pidfd_send_signal", 424),
    ("pidfd_open", 434),
    ("close_range", 436),
    ("openat2", 437),
    ("faccessat2", 439),
    ("epoll_pwait2", 441),
    ("landlock_create_ruleset", 444),
    ("landlock_add_rule", 445),
    ("landlock_restrict_self", 446),
];

/// i386 number of `clone`, allowed only without namespace flags.
pub const I386_CLONE: i64 = 120;
/// i386 number of `clone3`, which fails with ENOSYS.
pub const I386_CLONE3: i64 = 435;

/// Bit that marks a system call of the x32 ABI. x32 calls carry the
/// x86_64 architecture value, so the filter tells them apart by it.
pub const X32_SYSCALL_BIT: i64 = 0x4000_0000;

/// x86_64 system calls whose x32 form has a number of its own (512 to
/// 547), because an argument holds pointers or `long`s of different
/// width: the x86_64 number, then the x32 number without
/// [`X32_SYSCALL_BIT`]. Every other x32 call uses the x86_64 number.
pub const X32_OWN_NUMBERS: &[(i64, i64)] = &[
    (libc::SYS_rt_sigaction, 512),
    (libc::SYS_rt_sigreturn, 513),
    (libc::SYS_ioctl, 514),
    (libc::SYS_readv, 515),
    (libc::SYS_writev, 516),
    (libc::SYS_recvfrom, 517),
    (libc::SYS_sendmsg, 518),
    (libc::SYS_recvmsg, 519),
    (libc::SYS_execve, 520),
    (libc::SYS_ptrace, 521),
    (libc::SYS_rt_sigpending, 522),
    (libc::SYS_rt_sigtimedwait, 523),
    (libc::SYS_rt_sigqueueinfo, 524),
    (libc::SYS_sigaltstack, 525),
    (libc::SYS_timer_create, 526),
    (libc::SYS_mq_notify, 527),
    (libc::SYS_kexec_load, 528),
    (libc::SYS_waitid, 529),
    (libc::SYS_set_robust_list, 530),
    (libc::SYS_get_robust_list, 531),
    (libc::SYS_vmsplice, 532),
    (libc::SYS_move_pages, 533),
    (libc::SYS_preadv, 534),
    (libc::SYS_pwritev, 535),
    (libc::SYS_rt_tgsigqueueinfo, 536),
    (libc::SYS_recvmmsg, 537),
    (libc::SYS_sendmmsg, 538),
    (libc::SYS_process_vm_readv, 539),
    (libc::SYS_process_vm_writev, 540),
    (libc::SYS_setsockopt, 541),
    (libc::SYS_getsockopt, 542),
    (libc::SYS_io_setup, 543),
    (libc::SYS_io_submit, 544),
    (libc::SYS_execveat, 545),
    (libc::SYS_preadv2, 546),
    (libc::SYS_pwritev2, 547),
];

/// Returns the x32 number of the x86_64 system call `number`, with
/// [`X32_SYSCALL_BIT`] set.
pub fn x32_number(number: i64) -> i64 {
    let own = X32_OWN_NUMBERS.iter().find(|(x86_64, _)| *x86_64 == number).map(|(_, x32)| *x32);
    own.unwrap_or(number) | X32_SYSCALL_BIT
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    const HEADER_DIR: &str = "/usr/include/x86_64-linux-gnu/asm";

    /// Returns the `#define __NR_<name> <value>` lines of a header as a map
    /// of name to value text, or `None` when the header is not installed.
    fn header_numbers(file: &str) -> Option<BTreeMap<String, String>> {
        let text = std::fs::read_to_string(format!("{HEADER_DIR}/{file}")).ok()?;
        let numbers = text
            .lines()
            .filter_map(|line| line.strip_prefix("#define __NR_"))
            .filter_map(|rest| rest.split_once(' '))
            .map(|(name, value)| (name.to_string(), value.trim().to_string()))
            .collect();
        Some(numbers)
    }

    #[test]
    fn i386_numbers_match_header() {
        let Some(header) = header_numbers("unistd_32.h") else {
            eprintln!("skipped: {HEADER_DIR}/unistd_32.h is not installed (linux-libc-dev)");
            return;
        };
        for (name, number) in I386_ALLOWED {
            assert_eq!(header.get(*name), Some(&number.to_string()), "i386 number of {name}");
        }
        assert_eq!(header.get("clone"), Some(&I386_CLONE.to_string()));
        assert_eq!(header.get("clone3"), Some(&I386_CLONE3.to_string()));
    }

    #[test]
    fn x32_numbers_match_header() {
        let Some(header) = header_numbers("unistd_x32.h") else {
            eprintln!("skipped: {HEADER_DIR}/unistd_x32.h is not installed (linux-libc-dev)");
            return;
        };
        let own_in_header: BTreeSet<i64> = header
            .values()
            .filter_map(|value| value.strip_prefix("(__X32_SYSCALL_BIT + "))
            .filter_map(|rest| rest.trim_end_matches(')').parse().ok())
            .filter(|number| *number >= 512)
            .collect();
        let own_in_table: BTreeSet<i64> = X32_OWN_NUMBERS.iter().map(|(_, x32)| *x32).collect();
        assert_eq!(own_in_table, own_in_header);
        assert_eq!(header.get("rt_sigaction").map(String::as_str), Some("(__X32_SYSCALL_BIT + 512)"));
        assert_eq!(x32_number(libc::SYS_rt_sigaction), X32_SYSCALL_BIT + 512);
        assert_eq!(header.get("getpid").map(String::as_str), Some("(__X32_SYSCALL_BIT + 39)"));
        assert_eq!(x32_number(libc::SYS_getpid), X32_SYSCALL_BIT + 39);
    }

    #[test]
    fn i386_list_leaves_out_denied_calls() {
        let names: BTreeSet<&str> = I386_ALLOWED.iter().map(|(name, _)| *name).collect();
        assert_eq!(names.len(), I386_ALLOWED.len(), "a name is listed twice");
        for denied in ["clone", "clone3", "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "keyctl", "stime", "settimeofday", "clock_settime", "clock_settime64", "iopl", "ioperm", "vm86", "vm86old", "kexec_load", "reboot"] {
            assert!(!names.contains(denied), "{denied} is allowed for i386");
        }
        for required in ["write", "exit", "exit_group", "execve", "mmap2", "_llseek", "socketcall", "ipc", "futex_time64", "set_thread_area"] {
            assert!(names.contains(required), "{required} is missing for i386");
        }
    }
}
