//! Disk limits and disk usage of a container's writable layer.
//!
//! A kernel built without `CONFIG_QUOTA` (as on the host Trellis was
//! developed on) mounts neither XFS nor ext4 with project quotas, so quotas
//! on a shared filesystem are not used. A container with a disk limit
//! instead gets its own ext4 filesystem in a sparse image file,
//! loop-mounted at `<state dir>/disk`, and the overlay's upper and work
//! directories live on it. Writes past its size fail with ENOSPC as they
//! would on a full disk, while the rest of the host is unaffected. A limit
//! is grown online by enlarging the image and running `resize2fs` on the
//! mounted filesystem. ext4 cannot shrink while mounted, so a smaller limit
//! is rejected.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::api::DiskLimits;

/// Scope value of a disk limit that counts only the container's writes.
pub const SCOPE_EXCLUSIVE: u8 = 1;
/// The smallest filesystem mkfs.ext4 makes reliably; a smaller limit is
/// rejected.
pub const MIN_FILESYSTEM_BYTES: u64 = 1 << 20;
/// Inodes ext4 keeps for itself (the first 11, `lost+found` included) plus
/// the inodes of the upper and work directories the overlay needs.
const RESERVED_INODES: u64 = 11 + 4;
/// The capability number of CAP_SYS_RESOURCE (linux/capability.h).
const CAP_SYS_RESOURCE: u32 = 24;
/// The image file and the mount point below the state directory.
const IMAGE_FILE: &str = "disk.img";

/// How long an unmount that finds the filesystem busy is tried again
/// before the filesystem is detached lazily.
const BUSY_UNMOUNT_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
const MOUNT_DIR: &str = "disk";

/// Errors of disk limits.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk limit of {limit} bytes (scope total) leaves no room: the image alone uses {image} bytes")]
    ImageExceedsLimit { limit: u64, image: u64 },
    #[error("disk limit of {limit} inodes (scope total) leaves no room: the image alone uses {image} inodes")]
    ImageExceedsInodeLimit { limit: u64, image: u64 },
    #[error("disk limit of {bytes} bytes for the writable layer is below the minimum of {minimum} bytes")]
    TooSmall { bytes: u64, minimum: u64 },
    #[error("disk limits cannot be enforced for raw:// root filesystems, which have no writable layer of their own")]
    RawRootfs,
    #[error("container was created without a disk limit, so its writable layer is not on a size-limited filesystem; set disk limits at create")]
    NotLimited,
    #[error("disk limit of {requested} bytes is below the {used} bytes the container's writable layer uses")]
    BelowUsage { requested: u64, used: u64 },
    #[error("disk limit cannot shrink from {current} to {requested} bytes while the container runs: ext4 grows online but cannot shrink")]
    ShrinkUnsupported { current: u64, requested: u64 },
    #[error("growing a disk limit online needs the CAP_SYS_RESOURCE capability, which the server does not have; the limit is unchanged")]
    NoResizeCapability,
    #[error("failed to {step} for {path}")]
    Io { step: &'static str, path: PathBuf, #[source] source: io::Error },
    #[error("{command} failed for {path}: {output}")]
    Command { command: &'static str, path: PathBuf, output: String },
}

impl DiskError {
    /// Returns true when the request, not the host, is at fault.
    pub fn is_invalid_request(&self) -> bool {
        matches!(
            self,
            DiskError::ImageExceedsLimit { .. }
                | DiskError::ImageExceedsInodeLimit { .. }
                | DiskError::TooSmall { .. }
                | DiskError::RawRootfs
                | DiskError::NotLimited
                | DiskError::BelowUsage { .. }
                | DiskError::ShrinkUnsupported { .. }
        )
    }
}

/// Bytes and inodes used by a directory tree.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Allocated bytes (`st_blocks` × 512), so sparse files count what they
    /// occupy.
    pub bytes: u64,
    pub inodes: u64,
}

/// Measures the tree at `root` without following symbolic links or
/// leaving its filesystem. A hard-linked file counts once. Entries that
/// vanish during the walk are skipped.
pub fn measure(root: &Path) -> io::Result<Usage> {
    let mut usage = Usage::default();
    let mut seen = HashSet::new();
    let top = fs::symlink_metadata(root)?;
    let device = top.dev();
    let mut pending = vec![root.to_path_buf()];
    count(&top, &mut usage, &mut seen);
    while let Some(dir) = pending.pop() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        for entry in entries {
            let entry = entry?;
            let metadata = match entry.metadata() {
                Ok(metadata) => metadata,
                Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            if metadata.dev() != device {
                continue;
            }
            count(&metadata, &mut usage, &mut seen);
            if metadata.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(usage)
}

fn count(metadata: &fs::Metadata, usage: &mut Usage, seen: &mut HashSet<u64>) {
    if metadata.nlink() > 1 && !metadata.is_dir() && !seen.insert(metadata.ino()) {
        return;
    }
    usage.bytes += metadata.blocks() * 512;
    usage.inodes += 1;
}

/// The size of a container's filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilesystemSize {
    pub bytes: u64,
    /// Inodes to make; 0 leaves the mkfs default for the size.
    pub inodes: u64,
}

/// Returns the filesystem a container with `limits` needs, or `None` when
/// it has no hard disk limit. Scope total subtracts what the image uses.
/// `unlimited_bytes` sizes the filesystem of a container that limits only
/// inodes.
pub fn plan(limits: &DiskLimits, image: Usage, unlimited_bytes: u64) -> Result<Option<FilesystemSize>, DiskError> {
    if limits.byte_hard == 0 && limits.inode_hard == 0 {
        return Ok(None);
    }
    let total_scope = limits.scope != SCOPE_EXCLUSIVE;
    let bytes = match (limits.byte_hard, total_scope) {
        (0, _) => unlimited_bytes,
        (limit, false) => limit,
        (limit, true) if limit > image.bytes => limit - image.bytes,
        (limit, true) => return Err(DiskError::ImageExceedsLimit { limit, image: image.bytes }),
    };
    if bytes < MIN_FILESYSTEM_BYTES {
        return Err(DiskError::TooSmall { bytes, minimum: MIN_FILESYSTEM_BYTES });
    }
    // NOTE: ext4 rounds the inode count up to whole inode table blocks in
    // every block group (16 inodes per 128 MiB group with 4 KiB blocks).
    // An inode limit is therefore exact only to that step, which is coarse
    // for a filesystem sized by `unlimited_bytes`.
    let inodes = match (limits.inode_hard, total_scope) {
        (0, _) => 0,
        (limit, false) => limit + RESERVED_INODES,
        (limit, true) if limit > image.inodes => limit - image.inodes + RESERVED_INODES,
        (limit, true) => return Err(DiskError::ImageExceedsInodeLimit { limit, image: image.inodes }),
    };
    Ok(Some(FilesystemSize { bytes, inodes }))
}

/// A container's size-limited filesystem: an image file and its mount
/// point in the state directory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskImage {
    pub image: PathBuf,
    pub mount: PathBuf,
}

impl DiskImage {
    /// Returns the paths for the state directory `container_dir`; nothing
    /// is created.
    pub fn at(container_dir: &Path) -> DiskImage {
        DiskImage { image: container_dir.join(IMAGE_FILE), mount: container_dir.join(MOUNT_DIR) }
    }

    /// Creates the sparse image, makes an ext4 filesystem in it with
    /// `size.bytes` free and mounts it through a loop device. On error the
    /// caller undoes what was made with [`DiskImage::remove`].
    pub fn create(&self, size: FilesystemSize) -> Result<(), DiskError> {
        // ext4's own metadata (inode tables, bitmaps, group descriptors)
        // takes part of the image, so a first filesystem measures it and
        // the second, made larger by that much, leaves `size.bytes` free.
        self.make_filesystem(size.bytes, size.inodes)?;
        let overhead = self.metadata_bytes()?;
        self.make_filesystem(size.bytes + overhead, size.inodes)?;

        fs::create_dir_all(&self.mount).map_err(|source| self.io("create the disk mount point", source))?;
        // mount(8) sets up the loop device with autoclear, so the device
        // is released with the last unmount.
        let mut mount = Command::new("mount");
        mount.args(["-t", "ext4", "-o", "loop,nodev,nosuid"]).arg(&self.image).arg(&self.mount);
        run(mount, "mount", &self.mount)
    }

    /// Makes an ext4 filesystem of `bytes` in the image file.
    fn make_filesystem(&self, bytes: u64, inodes: u64) -> Result<(), DiskError> {
        let file = fs::File::create(&self.image).map_err(|source| self.io("create the disk image", source))?;
        file.set_len(bytes).map_err(|source| self.io("size the disk image", source))?;
        drop(file);

        // No journal and no reserved blocks: the filesystem is scratch
        // space that dies with the container, and all of it is the
        // container's to use.
        let mut mkfs = Command::new("mkfs.ext4");
        mkfs.args(["-q", "-F", "-m", "0", "-O", "^has_journal", "-E", "nodiscard"]);
        if inodes > 0 {
            mkfs.arg("-N").arg(inodes.to_string());
        }
        mkfs.arg(&self.image);
        run(mkfs, "mkfs.ext4", &self.image)
    }

    /// Returns the bytes the unmounted filesystem uses for its own
    /// metadata: all blocks but the free ones, from `dumpe2fs -h`.
    fn metadata_bytes(&self) -> Result<u64, DiskError> {
        let output = Command::new("dumpe2fs").arg("-h").arg(&self.image).output().map_err(|source| self.io("run dumpe2fs", source))?;
        let text = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| -> Option<u64> {
            text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
        };
        match (field("Block count"), field("Free blocks"), field("Block size")) {
            (Some(blocks), Some(free), Some(block_size)) => Ok(blocks.saturating_sub(free) * block_size),
            _ => Err(DiskError::Command {
                command: "dumpe2fs -h",
                path: self.image.clone(),
                output: format!("no block counts in its output: {}", String::from_utf8_lossy(&output.stderr).trim()),
            }),
        }
    }

    /// Returns true when the container has a disk image.
    pub fn exists(&self) -> bool {
        self.image.exists()
    }

    /// Returns the length of the image file in bytes.
    pub fn size(&self) -> Result<u64, DiskError> {
        Ok(fs::metadata(&self.image).map_err(|source| self.io("read the disk image size", source))?.len())
    }

    /// Changes the free space of the mounted filesystem from `current` to
    /// `requested` bytes. Growing works online. Shrinking is rejected, as
    /// a size below `used` bytes would be in any case. On failure the
    /// filesystem keeps its size.
    pub fn resize(&self, current: u64, requested: u64, used: u64) -> Result<(), DiskError> {
        if requested < used {
            return Err(DiskError::BelowUsage { requested, used });
        }
        if requested < current {
            return Err(DiskError::ShrinkUnsupported { current, requested });
        }
        if requested == current {
            return Ok(());
        }
        // The kernel allows an online resize (EXT4_IOC_RESIZE_FS) only
        // with CAP_SYS_RESOURCE, so without it nothing is changed.
        if !has_capability(CAP_SYS_RESOURCE) {
            return Err(DiskError::NoResizeCapability);
        }
        let device = self.loop_device()?;
        let old_length = self.size()?;
        let grown = (|| {
            self.set_length(&device, old_length + (requested - current))?;
            let mut resize = Command::new("resize2fs");
            resize.arg(&device);
            run(resize, "resize2fs", &self.image)
        })();
        if grown.is_err() {
            // The filesystem did not grow, so the image can return to its
            // old length without touching any of its blocks.
            let _ = self.set_length(&device, old_length);
        }
        grown
    }

    /// Sets the length of the image and makes the loop device `device`
    /// re-read it, because a loop device keeps its size until then.
    fn set_length(&self, device: &Path, length: u64) -> Result<(), DiskError> {
        let file = fs::OpenOptions::new().write(true).open(&self.image).map_err(|source| self.io("open the disk image", source))?;
        file.set_len(length).map_err(|source| self.io("change the disk image length", source))?;
        let mut capacity = Command::new("losetup");
        capacity.arg("--set-capacity").arg(device);
        run(capacity, "losetup --set-capacity", &self.image)
    }

    /// Returns the loop device the image is attached to.
    fn loop_device(&self) -> Result<PathBuf, DiskError> {
        let listed = Command::new("losetup")
            .args(["--noheadings", "--output", "NAME", "--associated"])
            .arg(&self.image)
            .output()
            .map_err(|source| self.io("run losetup", source))?;
        let text = String::from_utf8_lossy(&listed.stdout);
        let device = text.lines().next().map(str::trim).filter(|line| !line.is_empty());
        device.map(PathBuf::from).ok_or_else(|| DiskError::Command {
            command: "losetup --associated",
            path: self.image.clone(),
            output: "no loop device is attached to the image".into(),
        })
    }

    /// Unmounts the filesystem and removes the mount point and the image.
    /// Anything already gone counts as removed. A filesystem still busy
    /// after [`BUSY_UNMOUNT_WAIT`] is detached, and the kernel frees it and
    /// its loop device once the last user closes it.
    pub fn remove(&self) -> Result<(), DiskError> {
        use nix::mount::{umount2, MntFlags};
        let busy_until = std::time::Instant::now() + BUSY_UNMOUNT_WAIT;
        loop {
            match umount2(&self.mount, MntFlags::empty()) {
                Ok(()) => continue,
                Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => break,
                // The overlay on this filesystem may still be referenced by
                // the dead container's mount namespace: the kernel drops
                // those last references from a work queue, a moment after
                // garden-init is reaped.
                Err(nix::errno::Errno::EBUSY) if std::time::Instant::now() < busy_until => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                Err(nix::errno::Errno::EBUSY) => {
                    umount2(&self.mount, MntFlags::MNT_DETACH)
                        .map_err(|errno| self.io("detach the disk filesystem", io::Error::from(errno)))?;
                }
                Err(errno) => return Err(self.io("unmount the disk filesystem", io::Error::from(errno))),
            }
        }
        for (path, removed) in [(&self.mount, fs::remove_dir_all(&self.mount)), (&self.image, fs::remove_file(&self.image))] {
            match removed {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(DiskError::Io { step: "remove", path: path.clone(), source }),
            }
        }
        Ok(())
    }

    fn io(&self, step: &'static str, source: io::Error) -> DiskError {
        DiskError::Io { step, path: self.image.clone(), source }
    }
}

/// Returns true when capability `capability` is in the server's effective
/// set, from `CapEff` of `/proc/self/status`.
fn has_capability(capability: u32) -> bool {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status.lines().find_map(|line| line.strip_prefix("CapEff:")).and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok());
    effective.is_some_and(|mask| mask & (1 << capability) != 0)
}

/// Runs `command` and turns a failure into an error with its output.
fn run(mut command: Command, name: &'static str, path: &Path) -> Result<(), DiskError> {
    let output = command.output().map_err(|source| DiskError::Command { command: name, path: path.to_path_buf(), output: source.to_string() })?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if text.is_empty() {
        text = format!("exit status {}", output.status);
    }
    Err(DiskError::Command { command: name, path: path.to_path_buf(), output: text })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(byte_hard: u64, inode_hard: u64, scope: u8) -> DiskLimits {
        DiskLimits { byte_hard, inode_hard, scope, ..DiskLimits::default() }
    }

    const IMAGE: Usage = Usage { bytes: 4 << 20, inodes: 400 };

    #[test]
    fn no_hard_limit_needs_no_filesystem() {
        let soft_only = DiskLimits { byte_soft: 1 << 30, inode_soft: 10, ..DiskLimits::default() };
        assert_eq!(plan(&soft_only, IMAGE, 1 << 30).unwrap(), None);
    }

    #[test]
    fn exclusive_scope_ignores_the_image() {
        let size = plan(&limits(10 << 20, 0, SCOPE_EXCLUSIVE), IMAGE, 0).unwrap().unwrap();
        assert_eq!(size, FilesystemSize { bytes: 10 << 20, inodes: 0 });
        let size = plan(&limits(10 << 20, 100, SCOPE_EXCLUSIVE), IMAGE, 0).unwrap().unwrap();
        assert_eq!(size.inodes, 100 + RESERVED_INODES);
    }

    #[test]
    fn total_scope_subtracts_the_image() {
        let size = plan(&limits(20 << 20, 1000, 0), IMAGE, 0).unwrap().unwrap();
        assert_eq!(size, FilesystemSize { bytes: 16 << 20, inodes: 600 + RESERVED_INODES });
        let error = plan(&limits(3 << 20, 0, 0), IMAGE, 0).unwrap_err();
        assert!(matches!(error, DiskError::ImageExceedsLimit { limit: 3145728, image: 4194304 }), "{error}");
        assert!(error.is_invalid_request());
        let error = plan(&limits(20 << 20, 400, 0), IMAGE, 0).unwrap_err();
        assert!(matches!(error, DiskError::ImageExceedsInodeLimit { .. }), "{error}");
    }

    #[test]
    fn inode_only_limit_takes_the_unlimited_size() {
        let size = plan(&limits(0, 50, SCOPE_EXCLUSIVE), IMAGE, 8 << 30).unwrap().unwrap();
        assert_eq!(size.bytes, 8 << 30);
    }

    #[test]
    fn tiny_limit_is_rejected() {
        let error = plan(&limits(4096, 0, SCOPE_EXCLUSIVE), IMAGE, 0).unwrap_err();
        assert!(matches!(error, DiskError::TooSmall { bytes: 4096, .. }), "{error}");
    }

    #[test]
    fn measure_counts_blocks_inodes_and_hard_links_once() {
        let root = tempfile::tempdir().unwrap();
        let empty = measure(root.path()).unwrap();
        assert_eq!(empty.inodes, 1);
        fs::create_dir(root.path().join("sub")).unwrap();
        fs::write(root.path().join("sub/data"), vec![7u8; 1 << 20]).unwrap();
        fs::hard_link(root.path().join("sub/data"), root.path().join("link")).unwrap();
        std::os::unix::fs::symlink("/", root.path().join("escape")).unwrap();
        let usage = measure(root.path()).unwrap();
        // The root, sub, data (once for its two names) and the symlink.
        assert_eq!(usage.inodes, 4);
        assert!(usage.bytes >= 1 << 20, "{usage:?}");
        assert!(usage.bytes < (1 << 20) + (64 << 10), "{usage:?}");
    }
}
