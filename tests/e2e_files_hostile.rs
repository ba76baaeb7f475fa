//! Hostile archives against a real server: absolute names, `..` names,
//! symlinks followed by files through them, hard links to host files,
//! device nodes and a symlink swapped in during extraction. After each, a
//! canary directory on the host must be unchanged and the container still
//! usable. Needs root; see `support` for how it skips.

mod support;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use support::TestServer;
use trellis::client::ClientError;

/// A directory on the host that no archive may change. Removed on drop.
struct Canary {
    path: PathBuf,
}

static CANARY_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl Canary {
    fn new() -> Canary {
        let number = CANARY_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/trellis-canary-{}-{number}", std::process::id()));
        std::fs::create_dir_all(path.join("sub")).unwrap();
        std::fs::write(path.join("victim"), b"original\n").unwrap();
        std::fs::write(path.join("sub/deep"), b"deep original\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        Canary { path }
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// Returns every path below the canary with its type, mode, owner,
    /// size, mtime, inode link count and contents.
    fn snapshot(&self) -> BTreeMap<String, String> {
        let mut found = BTreeMap::new();
        walk(&self.path, &self.path, &mut found);
        found
    }
}

fn walk(root: &Path, path: &Path, found: &mut BTreeMap<String, String>) {
    let metadata = std::fs::symlink_metadata(path).unwrap();
    let contents = if metadata.is_file() {
        String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned()
    } else if metadata.file_type().is_symlink() {
        std::fs::read_link(path).unwrap().display().to_string()
    } else {
        String::new()
    };
    let relative = path.strip_prefix(root).unwrap().display().to_string();
    found.insert(
        relative,
        format!(
            "{:o} {}:{} {} {} {} {contents:?}",
            metadata.mode(),
            metadata.uid(),
            metadata.gid(),
            metadata.len(),
            metadata.mtime(),
            metadata.nlink()
        ),
    );
    if metadata.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            walk(root, &entry.unwrap().path(), found);
        }
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!("removing {} failed: {error}", self.path.display());
        }
    }
}

/// Builds an archive header by hand, because the tar crate refuses
/// absolute and `..` names.
fn raw_entry(archive: &mut Vec<u8>, name: &str, kind: tar::EntryType, link: &str, data: &[u8], device: Option<(u32, u32)>) {
    let mut header = tar::Header::new_gnu();
    header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_mtime(1_000_000_000);
    if let Some((major, minor)) = device {
        header.set_device_major(major).unwrap();
        header.set_device_minor(minor).unwrap();
    }
    header.set_cksum();
    archive.extend_from_slice(header.as_bytes());
    archive.extend_from_slice(data);
    archive.resize(archive.len().div_ceil(512) * 512, 0);
}

fn file(archive: &mut Vec<u8>, name: &str, data: &[u8]) {
    raw_entry(archive, name, tar::EntryType::Regular, "", data, None);
}

fn symlink(archive: &mut Vec<u8>, name: &str, target: &str) {
    raw_entry(archive, name, tar::EntryType::Symlink, target, b"", None);
}

fn hard_link(archive: &mut Vec<u8>, name: &str, target: &str) {
    raw_entry(archive, name, tar::EntryType::Link, target, b"", None);
}

fn finish(mut archive: Vec<u8>) -> Vec<u8> {
    archive.extend_from_slice(&[0u8; 1024]);
    archive
}

fn stream_in(server: &TestServer, handle: &str, destination: &str, user: &str, tar: &[u8]) -> Result<(), ClientError> {
    let mut reader = tar;
    server.block_on(server.client.stream_in(handle, destination, user, &mut reader))
}

fn sh(server: &TestServer, handle: &str, script: &str) -> String {
    let output = server.run_command(handle, "sh", &["-c", script]);
    assert_eq!(output.status, 0, "{script:?} failed: {}", output.stderr_text());
    output.stdout_text()
}

/// Checks what every hostile archive must leave true.
fn assert_confined(server: &TestServer, handle: &str, canary: &Canary, before: &BTreeMap<String, String>, case: &str) {
    assert_eq!(&canary.snapshot(), before, "{case}: the host canary changed");
    assert_eq!(sh(server, handle, "echo usable"), "usable\n", "{case}: container unusable");
}

#[test]
fn hostile_archives_stay_confined() {
    let Some(server) = TestServer::start("hostile_archives_stay_confined") else { return };
    let handle = server.create("hostile");
    let canary = Canary::new();
    let target = canary.name();
    let before = canary.snapshot();
    let host_marker = format!("/etc/trellis-hostile-{}", std::process::id());

    // Absolute names are extracted below the destination.
    let mut tar = Vec::new();
    file(&mut tar, &format!("{target}/victim"), b"pwned\n");
    file(&mut tar, &host_marker, b"pwned\n");
    stream_in(&server, &handle, "/tmp/abs", "", &finish(tar)).expect("absolute names extract inside");
    assert_eq!(sh(&server, &handle, &format!("cat /tmp/abs{target}/victim")), "pwned\n");
    assert!(!Path::new(&host_marker).exists(), "absolute name reached the host");
    assert_confined(&server, &handle, &canary, &before, "absolute names");

    // Names with `..` are rejected.
    for name in [format!("../../../../../../../..{target}/victim"), "a/../../escape".to_string()] {
        let mut tar = Vec::new();
        file(&mut tar, &name, b"pwned\n");
        let error = stream_in(&server, &handle, "/tmp/dots", "", &finish(tar)).expect_err("a .. name must fail");
        assert!(error.to_string().contains("\"..\""), "{name}: {error}");
        assert_confined(&server, &handle, &canary, &before, &format!("dot-dot name {name}"));
    }

    // A symlink to a host path, then a file through it; the same with a
    // relative symlink that climbs, and with a /proc magic link. The path
    // also exists inside the container, where the writes must land.
    sh(&server, &handle, &format!("mkdir -p {target}/sub"));
    let mut tar = Vec::new();
    symlink(&mut tar, "escape", &target);
    file(&mut tar, "escape/victim", b"pwned\n");
    symlink(&mut tar, "up", "../../../../../../../../../..");
    file(&mut tar, &format!("up{target}/sub/deep"), b"pwned\n");
    stream_in(&server, &handle, "/tmp/links", "", &finish(tar)).expect("links resolve inside the container");
    assert_eq!(sh(&server, &handle, &format!("cat {target}/victim {target}/sub/deep")), "pwned\npwned\n");
    assert_confined(&server, &handle, &canary, &before, "symlink then file");
    let mut tar = Vec::new();
    symlink(&mut tar, "magic", "/proc/self/root");
    file(&mut tar, &format!("magic{target}/victim"), b"pwned\n");
    assert!(stream_in(&server, &handle, "/tmp/magic", "", &finish(tar)).is_err(), "a magic link must not be followed");
    assert_confined(&server, &handle, &canary, &before, "magic link");

    // Hard links to host files: the target is an archive name below the
    // destination, and through a symlink it stays inside the container.
    sh(&server, &handle, &format!("rm -rf {target}"));
    let mut tar = Vec::new();
    hard_link(&mut tar, "hard", &format!("{target}/victim"));
    assert!(stream_in(&server, &handle, "/tmp/hard", "", &finish(tar)).is_err(), "hard link to a missing file must fail");
    let mut tar = Vec::new();
    symlink(&mut tar, "via", &target);
    hard_link(&mut tar, "hard", "via/victim");
    assert!(stream_in(&server, &handle, "/tmp/hard2", "", &finish(tar)).is_err(), "hard link through a symlink must fail");
    assert_confined(&server, &handle, &canary, &before, "hard links");

    // Device nodes: refused to an unprivileged user and to container root.
    for user in ["vcap", ""] {
        let mut tar = Vec::new();
        raw_entry(&mut tar, "mem", tar::EntryType::Char, "", b"", Some((1, 1)));
        let error = stream_in(&server, &handle, "/tmp/devices", user, &finish(tar)).expect_err("a device node must fail");
        assert!(error.to_string().contains("Operation not permitted"), "user {user:?}: {error}");
        let mut tar = Vec::new();
        raw_entry(&mut tar, "disk", tar::EntryType::Block, "", b"", Some((8, 0)));
        assert!(stream_in(&server, &handle, "/tmp/devices", user, &finish(tar)).is_err(), "user {user:?}: block device");
    }
    assert_eq!(sh(&server, &handle, "ls -A /tmp/devices"), "");
    assert_confined(&server, &handle, &canary, &before, "device nodes");
}

#[test]
fn swapped_symlink_stays_confined() {
    let Some(server) = TestServer::start("swapped_symlink_stays_confined") else { return };
    let handle = server.create("swap");
    let canary = Canary::new();
    let target = canary.name();
    let before = canary.snapshot();

    // A container process keeps replacing the directory the archive writes
    // into with symlinks to the host canary's path and to a climbing path.
    let swapper = format!(
        "(i=0; while [ $i -lt 40000 ]; do rm -rf /tmp/race/d; ln -s {target} /tmp/race/d; rm -f /tmp/race/d; \
         ln -s ../../../../../../..{target} /tmp/race/d; rm -f /tmp/race/d; mkdir -p /tmp/race/d; i=$((i+1)); done) \
         >/dev/null 2>&1 & echo $! > /tmp/swapper.pid"
    );
    sh(&server, &handle, "mkdir -p /tmp/race");
    sh(&server, &handle, &swapper);
    let mut tar = Vec::new();
    for index in 0..300 {
        file(&mut tar, &format!("d/victim-{index}"), b"pwned\n");
        file(&mut tar, "d/victim", b"pwned\n");
    }
    let tar = finish(tar);
    for _ in 0..10 {
        // Each round may fail when a swap wins a race; it may not escape.
        let _ = stream_in(&server, &handle, "/tmp/race", "", &tar);
        assert_eq!(&canary.snapshot(), &before, "the host canary changed during a swap race");
    }
    sh(&server, &handle, "kill $(cat /tmp/swapper.pid) 2>/dev/null; true");
    assert_confined(&server, &handle, &canary, &before, "swapped symlink");
}
