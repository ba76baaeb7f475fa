//! End-to-end tests of disk limits and disk metrics against a real
//! `trellis server` with the Linux runtime. They need root, mkfs.ext4,
//! resize2fs and losetup; see `support` for how they skip.

mod support;

use std::process::Command;

use support::TestServer;
use trellis::api::{ContainerSpec, DiskLimits, Limits};

const MIB: u64 = 1 << 20;
const EXCLUSIVE: u8 = 1;
const TOTAL: u8 = 0;
/// The capability number of CAP_SYS_RESOURCE (linux/capability.h).
const CAP_SYS_RESOURCE: u32 = 24;

fn disk_limits(byte_hard: u64, inode_hard: u64, scope: u8) -> Limits {
    Limits { disk_limits: DiskLimits { byte_hard, inode_hard, scope, ..DiskLimits::default() }, ..Limits::default() }
}

/// Writes `mebibytes` MiB of zeros to `path` in the container and returns
/// the exit status and stderr.
fn write_file(server: &TestServer, handle: &str, path: &str, mebibytes: u64) -> (i64, String) {
    let output = server.run_command(handle, "dd", &["if=/dev/zero", &format!("of={path}"), "bs=1M", &format!("count={mebibytes}")]);
    (output.status, output.stderr_text())
}

fn remove_file(server: &TestServer, handle: &str, path: &str) {
    let output = server.run_command(handle, "rm", &["-f", path]);
    assert_eq!(output.status, 0, "rm {path}: {}", output.stderr_text());
}

/// Lists the loop devices whose backing file is below the server's depot.
fn loop_devices_of(server: &TestServer) -> Vec<String> {
    let output = Command::new("losetup").args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"]).output().unwrap();
    let depot = server.depot.to_string_lossy().into_owned();
    String::from_utf8_lossy(&output.stdout).lines().filter(|line| line.contains(&depot)).map(str::to_string).collect()
}

/// Returns true when this process, and so the server it starts, has
/// CAP_SYS_RESOURCE in its effective set.
fn has_sys_resource() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let mask = status.lines().find_map(|line| line.strip_prefix("CapEff:")).unwrap();
    u64::from_str_radix(mask.trim(), 16).unwrap() & (1 << CAP_SYS_RESOURCE) != 0
}

#[test]
fn exclusive_limit_stops_writer() {
    let Some(server) = TestServer::start("exclusive_limit_stops_writer") else { return };
    let limited = server.create_with_limits("limited", disk_limits(10 * MIB, 0, EXCLUSIVE));
    let sibling = server.create("sibling");
    assert_eq!(loop_devices_of(&server).len(), 1, "one filesystem for the limited container");

    let (status, stderr) = write_file(&server, &limited, "/nine", 9);
    assert_eq!(status, 0, "9 MiB fit a 10 MiB limit: {stderr}");
    remove_file(&server, &limited, "/nine");
    let (status, stderr) = write_file(&server, &limited, "/eleven", 11);
    assert_ne!(status, 0, "11 MiB exceed a 10 MiB limit");
    assert!(stderr.contains("No space left on device"), "{stderr}");

    let (status, stderr) = write_file(&server, &sibling, "/twenty", 20);
    assert_eq!(status, 0, "the sibling has no limit: {stderr}");
    let limits = server.block_on(server.client.disk_limits(&limited)).unwrap();
    assert_eq!(limits, DiskLimits { byte_hard: 10 * MIB, scope: EXCLUSIVE, ..DiskLimits::default() });

    for handle in [&limited, &sibling] {
        server.block_on(server.client.destroy(handle)).unwrap();
    }
    assert_eq!(loop_devices_of(&server), Vec::<String>::new());
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn total_limit_counts_the_image() {
    let Some(server) = TestServer::start("total_limit_counts_the_image") else { return };
    let handle = server.create_with_limits("total", disk_limits(20 * MIB, 0, TOTAL));
    let metrics = server.block_on(server.client.metrics(&handle)).unwrap();
    let image = metrics.disk_stat.total_bytes_used - metrics.disk_stat.exclusive_bytes_used;
    assert!(image > 0, "the busybox image is not empty: {:?}", metrics.disk_stat);
    let room = (20 * MIB - image) / MIB;

    let (status, stderr) = write_file(&server, &handle, "/fits", room - 1);
    assert_eq!(status, 0, "{} MiB fit beside a {image}-byte image: {stderr}", room - 1);
    remove_file(&server, &handle, "/fits");
    let (status, stderr) = write_file(&server, &handle, "/full", 20);
    assert_ne!(status, 0, "20 MiB and the image exceed 20 MiB");
    assert!(stderr.contains("No space left on device"), "{stderr}");

    // A limit the image alone exceeds fails the create and leaves nothing.
    let spec = ContainerSpec { handle: server.unique_handle("tiny"), limits: disk_limits(image / 2, 0, TOTAL), ..ContainerSpec::default() };
    let error = server.block_on(server.client.create(&spec)).unwrap_err();
    assert!(error.to_string().contains("the image alone uses"), "{error}");
    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(loop_devices_of(&server), Vec::<String>::new());
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn disk_limit_grows_online_and_rejects_shrinking() {
    let Some(server) = TestServer::start("disk_limit_grows_online") else { return };
    let handle = server.create_with_limits("grow", disk_limits(10 * MIB, 0, EXCLUSIVE));
    let (status, _) = write_file(&server, &handle, "/big", 15);
    assert_ne!(status, 0, "15 MiB exceed the first limit");
    remove_file(&server, &handle, "/big");

    let target = format!("/containers/{handle}/limits/disk");
    let grow = format!("{{\"byte_hard\":{},\"scope\":1}}", 30 * MIB);
    if !has_sys_resource() {
        // The kernel resizes a mounted ext4 filesystem only for a caller
        // with CAP_SYS_RESOURCE; without it the route must fail cleanly.
        eprintln!("disk_limit_grows_online: no CAP_SYS_RESOURCE here, so only the rejection is checked");
        let (status, body) = server.raw_request("PUT", &target, &grow);
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("CAP_SYS_RESOURCE"), "{body}");
        let limits = server.block_on(server.client.disk_limits(&handle)).unwrap();
        assert_eq!(limits.byte_hard, 10 * MIB, "the limit is unchanged");
        let (status, stderr) = write_file(&server, &handle, "/nine", 9);
        assert_eq!(status, 0, "the filesystem keeps its size: {stderr}");
        let (status, _) = write_file(&server, &handle, "/more", 2);
        assert_ne!(status, 0, "and is not larger either");
        server.block_on(server.client.destroy(&handle)).unwrap();
        assert_eq!(loop_devices_of(&server), Vec::<String>::new());
        return;
    }
    let (status, body) = server.raw_request("PUT", &target, &grow);
    assert_eq!((status, body), (200, format!("{{\"byte_hard\":{},\"scope\":1}}\n", 30 * MIB)));
    let (status, stderr) = write_file(&server, &handle, "/big", 25);
    assert_eq!(status, 0, "25 MiB fit the grown limit: {stderr}");

    // Shrinking below what the container uses is rejected, and so is any
    // shrink of a mounted ext4 filesystem; the limit stays as it was.
    let (status, body) = server.raw_request("PUT", &target, &format!("{{\"byte_hard\":{},\"scope\":1}}", 5 * MIB));
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("is below the"), "{body}");
    assert!(body.contains("writable layer uses"), "{body}");
    let (status, body) = server.raw_request("PUT", &target, &format!("{{\"byte_hard\":{},\"scope\":1}}", 28 * MIB));
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("cannot shrink"), "{body}");
    let limits = server.block_on(server.client.disk_limits(&handle)).unwrap();
    assert_eq!(limits.byte_hard, 30 * MIB);
    let (status, _) = write_file(&server, &handle, "/more", 8);
    assert_ne!(status, 0, "the limit is still 30 MiB");

    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(loop_devices_of(&server), Vec::<String>::new());
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn unenforceable_disk_limits_are_rejected() {
    let Some(server) = TestServer::start("unenforceable_disk_limits") else { return };
    // Without a limit at create, the writable layer is not on a
    // filesystem of its own, so one cannot be added later.
    let handle = server.create("plain");
    let target = format!("/containers/{handle}/limits/disk");
    let (status, body) = server.raw_request("PUT", &target, &format!("{{\"byte_hard\":{}}}", 10 * MIB));
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("created without a disk limit"), "{body}");
    assert_eq!(server.raw_request("GET", &target, ""), (200, "{}\n".to_string()), "nothing half applied");

    // A raw:// root filesystem has no writable layer to limit.
    let rootfs = format!("raw://{}", support::busybox_rootfs().display());
    let spec = ContainerSpec { handle: server.unique_handle("raw"), rootfs, limits: disk_limits(10 * MIB, 0, EXCLUSIVE), ..ContainerSpec::default() };
    let error = server.block_on(server.client.create(&spec)).unwrap_err();
    assert!(error.to_string().contains("raw://"), "{error}");

    // Large limits are accepted: the filesystem image is sparse.
    let large = server.create_with_limits("large", disk_limits(2 << 30, 0, EXCLUSIVE));
    for handle in [&handle, &large] {
        server.block_on(server.client.destroy(handle)).unwrap();
    }
    assert_eq!(loop_devices_of(&server), Vec::<String>::new());
    assert_eq!(server.leftovers(), Vec::<String>::new());
}

#[test]
fn inode_limit_stops_file_creation() {
    let Some(server) = TestServer::start("inode_limit_stops_file_creation") else { return };
    // With a byte limit the filesystem is small, so ext4's rounding of the
    // inode count stays small too.
    let handle = server.create_with_limits("inodes", disk_limits(64 * MIB, 100, EXCLUSIVE));
    let script = "mkdir /many && i=0; while touch /many/f$i 2>/dev/null; do i=$((i+1)); [ $i -ge 1000 ] && break; done; echo $i";
    let output = server.run_command(&handle, "sh", &["-c", script]);
    let created: u64 = output.stdout_text().trim().parse().unwrap_or_else(|_| panic!("{output:?}"));
    // ext4 rounds its inode count up to whole inode table blocks.
    assert!((90..=140).contains(&created), "{created} files under an inode limit of 100");
    server.block_on(server.client.destroy(&handle)).unwrap();
    assert_eq!(loop_devices_of(&server), Vec::<String>::new());
}

#[test]
fn disk_stat_grows_with_writes() {
    let Some(server) = TestServer::start("disk_stat_grows_with_writes") else { return };
    let handle = server.create("stat");
    let before = server.block_on(server.client.metrics(&handle)).unwrap().disk_stat;
    assert!(before.total_bytes_used > before.exclusive_bytes_used, "{before:?}");
    assert!(before.total_inodes_used > before.exclusive_inodes_used, "{before:?}");

    let (status, stderr) = write_file(&server, &handle, "/three", 3);
    assert_eq!(status, 0, "{stderr}");
    let after = server.block_on(server.client.metrics(&handle)).unwrap().disk_stat;
    let grown = after.exclusive_bytes_used - before.exclusive_bytes_used;
    assert!((2 * MIB..=4 * MIB).contains(&grown), "a 3 MiB file added {grown} bytes");
    assert_eq!(after.total_bytes_used - after.exclusive_bytes_used, before.total_bytes_used - before.exclusive_bytes_used);
    assert!(after.exclusive_inodes_used > before.exclusive_inodes_used);

    let metrics = server.block_on(server.client.metrics(&handle)).unwrap();
    assert!(metrics.network_stat.is_some(), "network statistics are filled");
    server.block_on(server.client.destroy(&handle)).unwrap();
}
