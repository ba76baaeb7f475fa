//! Stream in and stream out: the tar helper process.
//!
//! The server starts this executable with [`super::FILES_COMMAND`] and a JSON
//! [`FilesConfig`]. The helper joins the container's cgroups, its user
//! namespace (unprivileged containers) and its mount namespace, so its root
//! directory is the container's root and no host path can be named. It then
//! becomes the requesting user and either extracts the tar archive on stdin
//! into the destination (stream in) or writes a tar archive of the source to
//! stdout (stream out).
//!
//! Every path, each archive name included, is opened with `openat2` and
//! `RESOLVE_IN_ROOT` below the container's root, and the last component is
//! created or opened with `O_NOFOLLOW` or `O_EXCL`. A symlink that a
//! container process swaps in during the copy therefore cannot lead outside
//! the container either. Archive names with a `..` component are rejected.
//!
//! Reporting: on failure the helper writes one message to stderr and exits
//! with [`EXIT_INVALID_REQUEST`] when the client asked for something that
//! cannot be done (unknown user, missing source) or 1 otherwise. A stream
//! out writes [`READY_LINE`] to stderr once its source is open, so a missing
//! source is reported before the first byte of the archive.

use std::ffi::{CString, OsString};
use std::fs;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::process::ExitCode;

use nix::sched::{setns, CloneFlags};
use nix::unistd::{Gid, Uid};

use super::syscalls;
use super::users::{self, ExecUser};
use crate::runtime::RuntimeError;

/// Line a stream out writes to stderr when the source is open and the
/// archive follows on stdout.
pub const READY_LINE: &str = "ready\n";
/// Exit status for a failure the client caused.
pub const EXIT_INVALID_REQUEST: u8 = 2;
/// Size of one copy between the archive and a file.
const COPY_CHUNK: usize = 128 * 1024;
/// Name of the pseudo entry that carries a GNU long name or link name.
const GNU_LONG_NAME: &[u8] = b"././@LongLink";

/// Direction of a helper run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    /// Extract the archive on stdin into `path`.
    In,
    /// Write an archive of `path` to stdout.
    Out,
}

/// Settings of one helper run.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FilesConfig {
    /// Host pid of the container's garden-init, whose namespaces are joined.
    pub init_pid: i32,
    /// Privileged containers have no user namespace to join.
    pub privileged: bool,
    /// The container's cgroup in each hierarchy.
    pub cgroup_dirs: Vec<PathBuf>,
    pub direction: Direction,
    /// Destination (in) or source (out) as the client sent it; relative
    /// paths start at the user's home.
    pub path: String,
    /// The user as the client sent it; empty means root.
    pub user: String,
}

/// Errors of the helper; the message is what the client receives.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("failed to join the container: {reason}")]
    Join { reason: String },
    #[error("{source}")]
    User {
        #[from]
        source: users::UserError,
    },
    #[error("{path}: {source}")]
    Path { path: String, source: io::Error },
    #[error("invalid name {name:?} in archive: names with a \"..\" component are rejected")]
    ParentComponent { name: String },
    #[error("{name}: the destination itself can only be replaced by a directory entry")]
    ReplaceDestination { name: String },
    #[error("{name}: unsupported entry type {kind}")]
    UnsupportedEntry { name: String, kind: u8 },
    #[error("failed to read the archive: {source}")]
    ReadArchive { source: io::Error },
    #[error("failed to write the archive: {source}")]
    WriteArchive { source: io::Error },
}

impl FilesError {
    fn path(path: &[u8], source: io::Error) -> FilesError {
        FilesError::Path { path: display(path), source }
    }

    /// Returns whether the client caused the failure.
    fn is_invalid_request(&self, direction: Direction) -> bool {
        match self {
            FilesError::User { .. } => true,
            FilesError::Path { source, .. } => direction == Direction::Out && source.kind() == io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

fn display(path: &[u8]) -> String {
    String::from_utf8_lossy(path).into_owned()
}

/// Entry point of the helper.
pub fn main(args: Vec<OsString>) -> ExitCode {
    let Some(config) = args.first().and_then(|arg| arg.to_str()).and_then(|arg| serde_json::from_str::<FilesConfig>(arg).ok()) else {
        eprint!("files helper: missing or invalid configuration argument");
        return ExitCode::FAILURE;
    };
    let prefix = match config.direction {
        Direction::In => "error streaming in",
        Direction::Out => "error streaming out",
    };
    match run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // One write, so the server never reads half a message.
            let message = format!("{prefix}: {error}");
            let _ = io::stderr().write_all(message.as_bytes());
            if error.is_invalid_request(config.direction) {
                ExitCode::from(EXIT_INVALID_REQUEST)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run(config: &FilesConfig) -> Result<(), FilesError> {
    enter_container(config)?;

    let passwd = fs::read_to_string("/etc/passwd").ok();
    let group = fs::read_to_string("/etc/group").ok();
    let user = users::resolve_user(&config.user, passwd.as_deref(), group.as_deref())?;
    let path = container_path(&config.path, &user);

    // umask 0 makes the archive's permission bits apply as recorded, as far
    // as the user may set them.
    nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    drop_privileges(&user)?;
    let root = Root::open()?;
    match config.direction {
        Direction::In => extract(&root, &path, io::stdin().lock()),
        Direction::Out => {
            let contents = config.path.ends_with('/');
            archive(&root, &path, contents, io::stdout().lock())
        }
    }
}

/// Joins the container's cgroups, then its user and mount namespaces; the
/// helper is single threaded, which joining a user namespace requires.
fn enter_container(config: &FilesConfig) -> Result<(), FilesError> {
    let join = |reason: String| FilesError::Join { reason };
    // Joined first, from the host's view of the cgroup files; "0" names the
    // writing process.
    for dir in &config.cgroup_dirs {
        let path = dir.join("cgroup.procs");
        fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|mut file| file.write_all(b"0"))
            .map_err(|error| join(format!("failed to join cgroup {}: {error}", dir.display())))?;
    }

    let open = |name: &str| {
        let path = format!("/proc/{}/ns/{name}", config.init_pid);
        fs::File::open(&path).map(OwnedFd::from).map_err(|error| join(format!("failed to open {path}: {error}")))
    };
    let user_ns = if config.privileged { None } else { Some(open("user")?) };
    let mount_ns = open("mnt")?;
    // The user namespace comes first, because the mount namespace belongs
    // to it and joining that needs the capabilities it grants.
    if let Some(user_ns) = &user_ns {
        setns(user_ns, CloneFlags::CLONE_NEWUSER).map_err(|error| join(format!("failed to join the user namespace: {error}")))?;
    }
    // Joining a mount namespace sets the root directory and the working
    // directory to the namespace's root: garden-init pivoted into the
    // container's root filesystem, so host paths are out of reach from here.
    setns(&mount_ns, CloneFlags::CLONE_NEWNS).map_err(|error| join(format!("failed to join the mount namespace: {error}")))?;
    nix::unistd::chdir("/").map_err(|error| join(format!("failed to enter /: {error}")))?;
    if user_ns.is_some() {
        // The host's root is unmapped in the container's user namespace;
        // become container root before switching to the user.
        nix::unistd::setgroups(&[]).map_err(|error| join(format!("failed to clear groups: {error}")))?;
        nix::unistd::setresgid(Gid::from_raw(0), Gid::from_raw(0), Gid::from_raw(0)).map_err(|error| join(format!("failed to set gid 0: {error}")))?;
        nix::unistd::setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).map_err(|error| join(format!("failed to set uid 0: {error}")))?;
    }
    Ok(())
}

fn drop_privileges(user: &ExecUser) -> Result<(), FilesError> {
    let join = |reason: String| FilesError::Join { reason };
    let groups: Vec<Gid> = user.groups.iter().map(|gid| Gid::from_raw(*gid)).collect();
    nix::unistd::setgroups(&groups).map_err(|error| join(format!("failed to set groups {:?}: {error}", user.groups)))?;
    let gid = Gid::from_raw(user.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|error| join(format!("failed to set gid {}: {error}", user.gid)))?;
    let uid = Uid::from_raw(user.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|error| join(format!("failed to set uid {}: {error}", user.uid)))?;
    Ok(())
}

/// Returns the absolute container path of a client path: relative paths
/// (empty and `.` included) start at the user's home.
pub fn container_path(path: &str, user: &ExecUser) -> Vec<u8> {
    let mut full = if path.starts_with('/') { Vec::new() } else { user.home.as_bytes().to_vec() };
    full.push(b'/');
    full.extend_from_slice(path.as_bytes());
    normalize(&full)
}

/// Removes empty and `.` components; keeps `..`, which resolution below
/// the container root confines. The result starts with `/`.
pub(super) fn normalize(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len() + 1);
    for component in path.split(|byte| *byte == b'/').filter(|part| !part.is_empty() && *part != b".") {
        out.push(b'/');
        out.extend_from_slice(component);
    }
    if out.is_empty() {
        out.push(b'/');
    }
    out
}

/// Returns the components of an archive name, without empty and `.` ones;
/// absolute names become relative. Rejects a `..` component.
pub fn archive_components(name: &[u8]) -> Result<Vec<&[u8]>, FilesError> {
    let mut components = Vec::new();
    for component in name.split(|byte| *byte == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err(FilesError::ParentComponent { name: display(name) }),
            _ => components.push(component),
        }
    }
    Ok(components)
}

fn join(base: &[u8], components: &[&[u8]]) -> Vec<u8> {
    let mut path = base.to_vec();
    for component in components {
        if path.last() != Some(&b'/') {
            path.push(b'/');
        }
        path.extend_from_slice(component);
    }
    path
}

/// Splits an absolute path into its parent and last component; `/` has an
/// empty last component.
pub(super) fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|byte| *byte == b'/') {
        Some(0) => (b"/", &path[1..]),
        Some(index) => (&path[..index], &path[index + 1..]),
        None => (b"/", path),
    }
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A root directory below which every path is resolved: the container's
/// root in the helper, the prepared root filesystem in garden-init.
pub(super) struct Root {
    fd: OwnedFd,
}

impl Root {
    pub(super) fn from_fd(fd: OwnedFd) -> Root {
        Root { fd }
    }

    fn open() -> Result<Root, FilesError> {
        let fd = fs::File::open("/").map_err(|error| FilesError::path(b"/", error))?;
        Ok(Root { fd: fd.into() })
    }

    pub(super) fn open_path(&self, path: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
        syscalls::openat2_in_root(self.fd.as_fd(), path, flags, 0)
    }

    /// Opens the directory `path` (`O_PATH`), creating it and its missing
    /// parents with mode 0755 as the current user.
    pub(super) fn ensure_dir(&self, path: &[u8]) -> io::Result<OwnedFd> {
        match self.open_path(path, libc::O_PATH | libc::O_DIRECTORY) {
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {
                let (parent, name) = split_last(path);
                if name.is_empty() {
                    return Err(error);
                }
                let parent_fd = self.ensure_dir(parent)?;
                match mkdirat(parent_fd.as_fd(), name, 0o755) {
                    Err(error) if error.raw_os_error() != Some(libc::EEXIST) => return Err(error),
                    _ => {}
                }
                self.open_path(path, libc::O_PATH | libc::O_DIRECTORY)
            }
            result => result,
        }
    }
}

fn mkdirat(parent: BorrowedFd<'_>, name: &[u8], mode: libc::mode_t) -> io::Result<()> {
    let name = cstring(name)?;
    // SAFETY: a valid C string and a directory fd.
    check(unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), mode) })
}

pub(super) fn openat(parent: BorrowedFd<'_>, name: &[u8], flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let name = cstring(name)?;
    // SAFETY: a valid C string and a directory fd; the new fd is owned here.
    let fd = unsafe { libc::openat(parent.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the fd was just returned by the kernel and has no other owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Removes what is at `name` unless it is a directory, so a new entry never
/// writes through an existing file or symlink. Nothing there counts as
/// removed.
fn remove_non_directory(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<()> {
    let cname = cstring(name)?;
    // SAFETY: a valid C string and a directory fd.
    match check(unsafe { libc::unlinkat(parent.as_raw_fd(), cname.as_ptr(), 0) }) {
        Err(error) if error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        // unlink(2) reports EISDIR for a directory on Linux; an empty one
        // is replaced as tar does, a full one is an error.
        Err(error) if error.raw_os_error() == Some(libc::EISDIR) => {
            // SAFETY: a valid C string and a directory fd.
            check(unsafe { libc::unlinkat(parent.as_raw_fd(), cname.as_ptr(), libc::AT_REMOVEDIR) })
        }
        result => result,
    }
}

fn set_times(parent: BorrowedFd<'_>, name: &[u8], mtime: u64) -> io::Result<()> {
    let name = cstring(name)?;
    let time = libc::timespec { tv_sec: mtime as libc::time_t, tv_nsec: 0 };
    let times = [time, time];
    // SAFETY: a valid C string, a directory fd and two timespecs.
    check(unsafe { libc::utimensat(parent.as_raw_fd(), name.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) })
}

fn set_fd_times(fd: BorrowedFd<'_>, mtime: u64) -> io::Result<()> {
    let time = libc::timespec { tv_sec: mtime as libc::time_t, tv_nsec: 0 };
    let times = [time, time];
    // SAFETY: an open fd and two timespecs.
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })
}

fn set_fd_mode(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    // SAFETY: an open fd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) })
}

/// A directory whose mode and mtime are set after the whole archive, so a
/// read-only directory can still receive its entries.
struct DeferredDir {
    path: Vec<u8>,
    mode: u32,
    mtime: u64,
    /// The destination itself, from a `./` entry.
    is_destination: bool,
}

/// Extracts the archive read from `input` into `destination`, which is
/// created if missing.
fn extract(root: &Root, destination: &[u8], input: impl Read) -> Result<(), FilesError> {
    root.ensure_dir(destination).map_err(|error| FilesError::path(destination, error))?;
    let mut archive = tar::Archive::new(input);
    let mut deferred = Vec::new();
    {
        let entries = archive.entries().map_err(|source| FilesError::ReadArchive { source })?;
        for entry in entries {
            let mut entry = entry.map_err(|source| FilesError::ReadArchive { source })?;
            extract_entry(root, destination, &mut entry, &mut deferred)?;
        }
    }
    // Deepest first, so setting a parent's mtime comes after its children
    // changed it.
    for dir in deferred.iter().rev() {
        let fd = root
            .open_path(&dir.path, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .map_err(|error| FilesError::path(&dir.path, error))?;
        let applied = set_fd_mode(fd.as_fd(), dir.mode).and_then(|()| set_fd_times(fd.as_fd(), dir.mtime));
        match applied {
            // An archive made with a trailing slash starts with `./`. A user
            // may extract it into a directory they can write but do not own
            // (such as /tmp), whose mode and mtime stay as they are.
            Err(error) if dir.is_destination && error.raw_os_error() == Some(libc::EPERM) => {}
            result => result.map_err(|error| FilesError::path(&dir.path, error))?,
        }
    }
    // The end-of-archive blocks and any padding after them are read, so the
    // server never writes into a closed pipe after a good archive.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(|source| FilesError::ReadArchive { source })?;
    Ok(())
}

fn extract_entry<R: Read>(root: &Root, destination: &[u8], entry: &mut tar::Entry<'_, R>, deferred: &mut Vec<DeferredDir>) -> Result<(), FilesError> {
    let name = entry.path_bytes().into_owned();
    let components = archive_components(&name)?;
    let kind = entry.header().entry_type();
    let mode = entry.header().mode().map_err(|source| FilesError::ReadArchive { source })? & 0o7777;
    let mtime = entry.header().mtime().map_err(|source| FilesError::ReadArchive { source })?;
    let path = join(destination, &components);
    if components.is_empty() {
        if !kind.is_dir() {
            return Err(FilesError::ReplaceDestination { name: display(&name) });
        }
        deferred.push(DeferredDir { path, mode, mtime, is_destination: true });
        return Ok(());
    }
    let (parent_path, file_name) = split_last(&path);
    let parent = root.ensure_dir(parent_path).map_err(|error| FilesError::path(parent_path, error))?;
    let parent = parent.as_fd();
    let failed = |error: io::Error| FilesError::path(&path, error);

    match kind {
        tar::EntryType::Directory => {
            match mkdirat(parent, file_name, 0o700) {
                Err(error) if error.raw_os_error() == Some(libc::EEXIST) => {
                    let existing = openat(parent, file_name, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(failed)?;
                    if !fs::File::from(existing).metadata().map_err(failed)?.is_dir() {
                        remove_non_directory(parent, file_name).map_err(failed)?;
                        mkdirat(parent, file_name, 0o700).map_err(failed)?;
                    }
                }
                result => result.map_err(failed)?,
            }
            deferred.push(DeferredDir { path, mode, mtime, is_destination: false });
        }
        tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
            remove_non_directory(parent, file_name).map_err(failed)?;
            let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
            let mut file = fs::File::from(openat(parent, file_name, flags, mode).map_err(failed)?);
            copy_entry(entry, &mut file, &path)?;
            set_xattrs(entry, &file, &path)?;
            // A write by an unprivileged owner clears setuid and setgid, so
            // the mode is set again after the data.
            set_fd_mode(file.as_fd(), mode).map_err(failed)?;
            set_fd_times(file.as_fd(), mtime).map_err(failed)?;
        }
        tar::EntryType::Symlink => {
            let target = entry.link_name_bytes().map(|target| target.into_owned()).unwrap_or_default();
            remove_non_directory(parent, file_name).map_err(failed)?;
            let target = cstring(&target).map_err(failed)?;
            let link = cstring(file_name).map_err(failed)?;
            // SAFETY: two valid C strings and a directory fd. The target is
            // stored as text; it is resolved later, and only below the root.
            check(unsafe { libc::symlinkat(target.as_ptr(), parent.as_raw_fd(), link.as_ptr()) }).map_err(failed)?;
            set_times(parent, file_name, mtime).map_err(failed)?;
        }
        tar::EntryType::Link => {
            let target_name = entry.link_name_bytes().map(|target| target.into_owned()).unwrap_or_default();
            // Hard-link targets are archive names, relative to the destination.
            let target_path = join(destination, &archive_components(&target_name)?);
            let (target_parent_path, target_file) = split_last(&target_path);
            let target_parent = root
                .open_path(target_parent_path, libc::O_PATH | libc::O_DIRECTORY)
                .map_err(|error| FilesError::path(&target_path, error))?;
            remove_non_directory(parent, file_name).map_err(failed)?;
            let target_file = cstring(target_file).map_err(failed)?;
            let link = cstring(file_name).map_err(failed)?;
            // SAFETY: two valid C strings and two directory fds. Without
            // AT_SYMLINK_FOLLOW a symlink target is linked itself, never
            // followed.
            check(unsafe { libc::linkat(target_parent.as_raw_fd(), target_file.as_ptr(), parent.as_raw_fd(), link.as_ptr(), 0) })
                .map_err(failed)?;
        }
        tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
            let file_type = match kind {
                tar::EntryType::Char => libc::S_IFCHR,
                tar::EntryType::Block => libc::S_IFBLK,
                _ => libc::S_IFIFO,
            };
            let major = entry.header().device_major().ok().flatten().unwrap_or(0);
            let minor = entry.header().device_minor().ok().flatten().unwrap_or(0);
            remove_non_directory(parent, file_name).map_err(failed)?;
            let node = cstring(file_name).map_err(failed)?;
            // SAFETY: a valid C string and a directory fd. The kernel allows
            // device nodes only to a user with CAP_MKNOD in the host's user
            // namespace, so container users get EPERM.
            check(unsafe { libc::mknodat(parent.as_raw_fd(), node.as_ptr(), file_type | mode, libc::makedev(major, minor)) })
                .map_err(failed)?;
            set_times(parent, file_name, mtime).map_err(failed)?;
        }
        tar::EntryType::XHeader | tar::EntryType::XGlobalHeader | tar::EntryType::GNULongName | tar::EntryType::GNULongLink => {}
        other => return Err(FilesError::UnsupportedEntry { name: display(&name), kind: other.as_byte() }),
    }
    Ok(())
}

fn copy_entry<R: Read>(entry: &mut tar::Entry<'_, R>, file: &mut fs::File, path: &[u8]) -> Result<(), FilesError> {
    let mut buffer = vec![0u8; COPY_CHUNK];
    loop {
        let count = match entry.read(&mut buffer) {
            Ok(0) => return Ok(()),
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(FilesError::ReadArchive { source }),
        };
        file.write_all(&buffer[..count]).map_err(|error| FilesError::path(path, error))?;
    }
}

/// Applies the PAX `SCHILY.xattr.*` records of an entry to its file.
fn set_xattrs<R: Read>(entry: &mut tar::Entry<'_, R>, file: &fs::File, path: &[u8]) -> Result<(), FilesError> {
    let Some(extensions) = entry.pax_extensions().map_err(|source| FilesError::ReadArchive { source })? else {
        return Ok(());
    };
    for extension in extensions {
        let extension = extension.map_err(|source| FilesError::ReadArchive { source })?;
        let Some(name) = extension.key_bytes().strip_prefix(b"SCHILY.xattr.") else { continue };
        let name = cstring(name).map_err(|error| FilesError::path(path, error))?;
        let value = extension.value_bytes();
        // SAFETY: an open fd, a valid C string and a byte buffer with its length.
        let result = unsafe { libc::fsetxattr(file.as_raw_fd(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        check(result).map_err(|error| FilesError::path(path, error))?;
    }
    Ok(())
}

/// A file system object opened for archiving.
enum Node {
    File(fs::File, fs::Metadata),
    Dir(OwnedFd, fs::Metadata),
    Symlink(Vec<u8>, fs::Metadata),
    /// A fifo or device node: only its header is archived.
    Special(fs::Metadata),
}

/// Opens `name` below `parent` without following a final symlink, with the
/// permissions of the current user.
fn open_node(parent: BorrowedFd<'_>, name: &[u8]) -> io::Result<Node> {
    let handle = fs::File::from(openat(parent, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?);
    let metadata = handle.metadata()?;
    let file_type = metadata.file_type();
    if file_type.is_file() {
        let file = fs::File::from(openat(parent, name, libc::O_RDONLY | libc::O_NOFOLLOW, 0)?);
        let metadata = file.metadata()?;
        if !metadata.is_file() {
            return Err(io::Error::other("replaced while being archived"));
        }
        Ok(Node::File(file, metadata))
    } else if file_type.is_dir() {
        let dir = openat(parent, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
        let metadata = fs::File::from(dir.try_clone()?).metadata()?;
        Ok(Node::Dir(dir, metadata))
    } else if file_type.is_symlink() {
        let cname = cstring(name)?;
        let mut target = vec![0u8; libc::PATH_MAX as usize];
        // SAFETY: a valid C string, a directory fd and a buffer with its length.
        let length = unsafe { libc::readlinkat(parent.as_raw_fd(), cname.as_ptr(), target.as_mut_ptr().cast(), target.len()) };
        if length < 0 {
            return Err(io::Error::last_os_error());
        }
        target.truncate(length as usize);
        Ok(Node::Symlink(target, metadata))
    } else {
        Ok(Node::Special(metadata))
    }
}

/// Writes an archive of `source` to `output`: with `contents`, the entries
/// of the directory rooted at `./`, else one top-level entry named after the
/// source's last component.
fn archive(root: &Root, source: &[u8], contents: bool, output: impl Write) -> Result<(), FilesError> {
    let failed = |error: io::Error| FilesError::path(source, error);
    let (node, name) = if contents {
        let dir = root.open_path(source, libc::O_RDONLY | libc::O_DIRECTORY).map_err(failed)?;
        let metadata = fs::File::from(dir.try_clone().map_err(failed)?).metadata().map_err(failed)?;
        (Node::Dir(dir, metadata), b".".to_vec())
    } else {
        let (parent_path, name) = split_last(source);
        if name.is_empty() {
            return archive(root, source, true, output);
        }
        let parent = root.open_path(parent_path, libc::O_PATH | libc::O_DIRECTORY).map_err(failed)?;
        (open_node(parent.as_fd(), name).map_err(failed)?, name.to_vec())
    };

    // The source is open and readable: from here on the client gets a 200.
    let mut stderr = io::stderr().lock();
    stderr.write_all(READY_LINE.as_bytes()).and_then(|()| stderr.flush()).map_err(|source| FilesError::WriteArchive { source })?;

    let mut writer = TarWriter { output: BufWriter::with_capacity(COPY_CHUNK, output) };
    writer.append_node(node, &name, source)?;
    writer.finish()
}

/// Writes tar entries with names exactly as given (the tar crate drops a
/// leading `./`, which Garden's archives keep).
struct TarWriter<W: Write> {
    output: W,
}

impl<W: Write> TarWriter<W> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), FilesError> {
        self.output.write_all(bytes).map_err(|source| FilesError::WriteArchive { source })
    }

    fn pad(&mut self, length: u64) -> Result<(), FilesError> {
        let remainder = (length % 512) as usize;
        if remainder != 0 {
            self.write(&[0u8; 512][..512 - remainder])?;
        }
        Ok(())
    }

    /// Writes a GNU long name or long link record when `value` does not
    /// fit in a header field of 100 bytes.
    fn long_record(&mut self, kind: tar::EntryType, value: &[u8]) -> Result<(), FilesError> {
        if value.len() <= 100 {
            return Ok(());
        }
        let mut header = tar::Header::new_gnu();
        header.as_old_mut().name[..GNU_LONG_NAME.len()].copy_from_slice(GNU_LONG_NAME);
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(value.len() as u64 + 1);
        header.set_cksum();
        self.write(header.as_bytes())?;
        self.write(value)?;
        self.write(&[0])?;
        self.pad(value.len() as u64 + 1)
    }

    fn header(&mut self, metadata: &fs::Metadata, name: &[u8], kind: tar::EntryType, link: Option<&[u8]>) -> Result<(), FilesError> {
        self.long_record(tar::EntryType::GNULongName, name)?;
        if let Some(link) = link {
            self.long_record(tar::EntryType::GNULongLink, link)?;
        }
        let mut header = tar::Header::new_gnu();
        header.set_metadata_in_mode(metadata, tar::HeaderMode::Complete);
        header.set_entry_type(kind);
        if kind != tar::EntryType::Regular {
            header.set_size(0);
        }
        let field = &mut header.as_old_mut().name;
        let length = name.len().min(100);
        field[..length].copy_from_slice(&name[..length]);
        if let Some(link) = link {
            let field = &mut header.as_old_mut().linkname;
            let length = link.len().min(100);
            field[..length].copy_from_slice(&link[..length]);
        }
        header.set_cksum();
        self.write(header.as_bytes())
    }

    fn append_node(&mut self, node: Node, name: &[u8], path: &[u8]) -> Result<(), FilesError> {
        match node {
            Node::File(mut file, metadata) => {
                self.header(&metadata, name, tar::EntryType::Regular, None)?;
                let size = metadata.len();
                let mut remaining = size;
                let mut buffer = vec![0u8; COPY_CHUNK];
                while remaining > 0 {
                    let want = remaining.min(buffer.len() as u64) as usize;
                    let count = match file.read(&mut buffer[..want]) {
                        // The header already promised `size` bytes.
                        Ok(0) => return Err(FilesError::path(path, io::Error::other("file shrank while being archived"))),
                        Ok(count) => count,
                        Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                        Err(error) => return Err(FilesError::path(path, error)),
                    };
                    self.write(&buffer[..count])?;
                    remaining -= count as u64;
                }
                self.pad(size)
            }
            Node::Dir(dir, metadata) => {
                let mut dir_name = name.to_vec();
                if !dir_name.ends_with(b"/") {
                    dir_name.push(b'/');
                }
                self.header(&metadata, &dir_name, tar::EntryType::Directory, None)?;
                let mut children = list_dir(&dir).map_err(|error| FilesError::path(path, error))?;
                children.sort();
                for child in children {
                    let child_path = join(path, &[&child]);
                    let node = open_node(dir.as_fd(), &child).map_err(|error| FilesError::path(&child_path, error))?;
                    let mut child_name = dir_name.clone();
                    child_name.extend_from_slice(&child);
                    self.append_node(node, &child_name, &child_path)?;
                }
                Ok(())
            }
            Node::Symlink(target, metadata) => self.header(&metadata, name, tar::EntryType::Symlink, Some(&target)),
            Node::Special(metadata) => {
                let file_type = metadata.file_type();
                let kind = if file_type.is_char_device() {
                    tar::EntryType::Char
                } else if file_type.is_block_device() {
                    tar::EntryType::Block
                } else if file_type.is_fifo() {
                    tar::EntryType::Fifo
                } else {
                    // Sockets cannot be archived; tar skips them too.
                    return Ok(());
                };
                self.header(&metadata, name, kind, None)
            }
        }
    }

    fn finish(mut self) -> Result<(), FilesError> {
        self.write(&[0u8; 1024])?;
        self.output.flush().map_err(|source| FilesError::WriteArchive { source })
    }
}

/// Returns the names in a directory, without `.` and `..`.
fn list_dir(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    use std::os::unix::ffi::OsStrExt;
    let mut stream = nix::dir::Dir::from_fd(dir.try_clone()?).map_err(io::Error::from)?;
    let mut names = Vec::new();
    for entry in stream.iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes());
        if name != "." && name != ".." {
            names.push(name.as_bytes().to_vec());
        }
    }
    Ok(names)
}

/// Starts the helper with `config`; stdin and stdout are pipes or null as
/// the direction needs, stderr is always a pipe.
fn start_helper(executable: &std::path::Path, config: &FilesConfig) -> Result<std::process::Child, RuntimeError> {
    use std::process::{Command, Stdio};
    let argument = serde_json::to_string(config).map_err(|error| RuntimeError::failed(error.to_string()))?;
    let (stdin, stdout) = match config.direction {
        Direction::In => (Stdio::piped(), Stdio::null()),
        Direction::Out => (Stdio::null(), Stdio::piped()),
    };
    Command::new(executable)
        .arg(super::FILES_COMMAND)
        .arg(argument)
        .stdin(stdin)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|error| RuntimeError::failed(format!("failed to start the files helper {}: {error}", executable.display())))
}

/// Waits for the helper and turns a failure into the error it reported.
fn finish_helper(child: &mut std::process::Child, mut message: String) -> Result<(), RuntimeError> {
    if let Some(mut stderr) = child.stderr.take() {
        let _ = stderr.read_to_string(&mut message);
    }
    let status = child.wait().map_err(|error| RuntimeError::failed(format!("failed to wait for the files helper: {error}")))?;
    if status.success() {
        return Ok(());
    }
    if message.trim().is_empty() {
        message = format!("the files helper failed: {status}");
    }
    if status.code() == Some(EXIT_INVALID_REQUEST as i32) {
        Err(RuntimeError::invalid(message))
    } else {
        Err(RuntimeError::failed(message))
    }
}

/// Runs a stream in: copies `tar` into the helper as it arrives, then
/// returns the helper's result.
pub(super) fn stream_in(executable: &std::path::Path, config: &FilesConfig, tar: &mut dyn Read) -> Result<(), RuntimeError> {
    let mut child = start_helper(executable, config)?;
    let mut stdin = child.stdin.take();
    let mut buffer = vec![0u8; COPY_CHUNK];
    while let Some(pipe) = stdin.as_mut() {
        let count = match tar.read(&mut buffer) {
            Ok(0) => break,
            Ok(count) => count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(RuntimeError::failed(format!("error streaming in: failed to read the request body: {error}")));
            }
        };
        // A closed pipe means the helper stopped early, and its exit status
        // and message give the reason.
        if pipe.write_all(&buffer[..count]).is_err() {
            break;
        }
    }
    // Closing stdin marks the end of the archive for the helper.
    drop(stdin);
    finish_helper(&mut child, String::new())
}

/// Runs a stream out up to the first byte of the archive.
pub(super) fn stream_out(executable: &std::path::Path, config: &FilesConfig) -> Result<Box<dyn Read + Send>, RuntimeError> {
    let mut child = start_helper(executable, config)?;
    let mut stderr = child.stderr.take().expect("stderr is piped");
    // The first line is READY_LINE or the start of an error message.
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while first.len() < READY_LINE.len() {
        match stderr.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => first.push(byte[0]),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if first != READY_LINE.as_bytes() {
        child.stderr = Some(stderr);
        // Not killed: the helper is exiting and its message may still be
        // on the way.
        let message = String::from_utf8_lossy(&first).into_owned();
        return Err(finish_helper(&mut child, message).err().unwrap_or_else(|| RuntimeError::failed("the files helper exited before the archive")));
    }
    child.stderr = Some(stderr);
    let stdout = child.stdout.take().expect("stdout is piped");
    Ok(Box::new(ArchiveReader { child: Some(child), stdout }))
}

/// The archive of a running stream out. At the end of the archive it waits
/// for the helper, so a failure after the first byte becomes a read error.
/// Dropped early, it kills the helper.
struct ArchiveReader {
    child: Option<std::process::Child>,
    stdout: std::process::ChildStdout,
}

impl Read for ArchiveReader {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let count = self.stdout.read(buffer)?;
        if count == 0 {
            if let Some(mut child) = self.child.take() {
                finish_helper(&mut child, String::new()).map_err(|error| io::Error::other(error.to_string()))?;
            }
        }
        Ok(count)
    }
}

impl Drop for ArchiveReader {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The client went away or the server gave up: stop producing.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(home: &str) -> ExecUser {
        ExecUser { uid: 1000, gid: 1000, groups: Vec::new(), home: home.to_string() }
    }

    #[test]
    fn relative_paths_start_at_home() {
        assert_eq!(container_path("app", &user("/home/vcap")), b"/home/vcap/app");
        assert_eq!(container_path(".", &user("/home/vcap")), b"/home/vcap");
        assert_eq!(container_path("", &user("/home/vcap")), b"/home/vcap");
        assert_eq!(container_path("/", &user("/home/vcap")), b"/");
        assert_eq!(container_path("/var//log/./x/", &user("/")), b"/var/log/x");
    }

    #[test]
    fn archive_names_drop_root_and_reject_parent() {
        assert_eq!(archive_components(b"/etc/passwd").unwrap(), vec![&b"etc"[..], &b"passwd"[..]]);
        assert_eq!(archive_components(b"./a//b/").unwrap(), vec![&b"a"[..], &b"b"[..]]);
        assert!(archive_components(b"./").unwrap().is_empty());
        assert!(matches!(archive_components(b"a/../../b"), Err(FilesError::ParentComponent { .. })));
        assert!(matches!(archive_components(b".."), Err(FilesError::ParentComponent { .. })));
        // A name that only starts with dots is an ordinary name.
        assert_eq!(archive_components(b"..x/y").unwrap(), vec![&b"..x"[..], &b"y"[..]]);
    }

    #[test]
    fn split_last_keeps_root() {
        assert_eq!(split_last(b"/a"), (&b"/"[..], &b"a"[..]));
        assert_eq!(split_last(b"/a/b"), (&b"/a"[..], &b"b"[..]));
        assert_eq!(split_last(b"/"), (&b"/"[..], &b""[..]));
    }

    #[test]
    fn tar_writer_keeps_dot_slash_and_long_names() {
        let dir = tempfile::tempdir().unwrap();
        let long = "n".repeat(150);
        fs::write(dir.path().join(&long), b"hello").unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("sub/link")).unwrap();
        let fd: OwnedFd = fs::File::open(dir.path()).unwrap().into();
        let metadata = fs::metadata(dir.path()).unwrap();
        let mut bytes = Vec::new();
        let mut writer = TarWriter { output: &mut bytes };
        writer.append_node(Node::Dir(fd, metadata), b".", b"/x").unwrap();
        writer.finish().unwrap();

        let mut archive = tar::Archive::new(&bytes[..]);
        let mut seen = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = String::from_utf8(entry.path_bytes().into_owned()).unwrap();
            let link = entry.link_name_bytes().map(|link| String::from_utf8(link.into_owned()).unwrap());
            let mut data = String::new();
            entry.read_to_string(&mut data).unwrap();
            seen.push((name, link, data));
        }
        assert_eq!(
            seen,
            vec![
                ("./".to_string(), None, String::new()),
                (format!("./{long}"), None, "hello".to_string()),
                ("./sub/".to_string(), None, String::new()),
                ("./sub/link".to_string(), Some("/etc/passwd".to_string()), String::new()),
            ]
        );
    }
}
