//! Thin wrappers for the system calls that nix 0.32 does not cover: the new
//! mount API (for idmapped layers), pidfds and `openat2`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `struct mount_attr` of `mount_setattr(2)`, version 0 (32 bytes).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;

fn path_to_cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(result: libc::c_long) -> io::Result<libc::c_long> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Clones the mount at `path` into a detached mount, not yet attached
/// anywhere (`open_tree(2)` with `OPEN_TREE_CLONE`).
pub fn open_tree_clone(path: &Path) -> io::Result<OwnedFd> {
    let path = path_to_cstring(path)?;
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: the path is a valid C string and the kernel returns a new fd.
    let fd = check(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, path.as_ptr(), flags) })?;
    // SAFETY: the fd was just returned by the kernel and has no other owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes the detached mount `mount` idmapped through the mappings of the
/// user namespace `userns` (`mount_setattr(2)` with `MOUNT_ATTR_IDMAP`).
pub fn set_idmap(mount: BorrowedFd<'_>, userns: BorrowedFd<'_>) -> io::Result<()> {
    let attr = MountAttr { attr_set: MOUNT_ATTR_IDMAP, attr_clr: 0, propagation: 0, userns_fd: userns.as_raw_fd() as u64 };
    let empty = c"";
    // SAFETY: attr lives across the call and its size is passed with it.
    check(unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            mount.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    })?;
    Ok(())
}

/// Attaches the detached mount `mount` at `target` (`move_mount(2)`).
pub fn move_mount_to(mount: BorrowedFd<'_>, target: &Path) -> io::Result<()> {
    let target = path_to_cstring(target)?;
    let empty = c"";
    // SAFETY: both strings are valid C strings for the duration of the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mount.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

/// Opens a pidfd for `pid` (`pidfd_open(2)`), which becomes readable when
/// the process exits.
pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain system call with integer arguments.
    let fd = check(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the fd was just returned by the kernel and has no other owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` to the process behind `pidfd` (`pidfd_send_signal(2)`),
/// which cannot hit a recycled pid.
pub fn pidfd_send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    // SAFETY: a null siginfo pointer is allowed and means a kill(2)-like signal.
    check(unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
    })?;
    Ok(())
}

/// Waits up to `timeout_ms` milliseconds (-1 waits for ever) for `fd` to
/// become readable; returns whether it did.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> io::Result<bool> {
    let mut poll_fd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    loop {
        // SAFETY: one valid pollfd is passed with its count.
        let result = unsafe { libc::poll(&mut poll_fd, 1, timeout_ms) };
        if result < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(error);
        }
        return Ok(result > 0);
    }
}

/// `struct open_how` of `openat2(2)`, version 0 (24 bytes); libc's type
/// cannot be built outside libc.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Opens `path` below `dirfd` with `openat2(2)` and `RESOLVE_IN_ROOT`, so
/// `dirfd` acts as `/` for absolute symlinks and `..`: no path, however it
/// is built or raced, resolves above it. Magic links of `/proc` are
/// rejected too (`RESOLVE_NO_MAGICLINKS`).
pub fn openat2_in_root(dirfd: BorrowedFd<'_>, path: &[u8], flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let path = CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: if flags & libc::O_CREAT != 0 { mode as u64 } else { 0 },
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
    };
    loop {
        // SAFETY: the path is a valid C string and `how` lives across the
        // call with its size passed beside it.
        let result = unsafe {
            libc::syscall(libc::SYS_openat2, dirfd.as_raw_fd(), path.as_ptr(), &how as *const OpenHow, std::mem::size_of::<OpenHow>())
        };
        match check(result) {
            // EAGAIN means a rename raced the lookup, and openat2(2) documents a retry.
            Err(error) if error.raw_os_error() == Some(libc::EAGAIN) => continue,
            Err(error) => return Err(error),
            // SAFETY: the fd was just returned by the kernel and has no other owner.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        }
    }
}
