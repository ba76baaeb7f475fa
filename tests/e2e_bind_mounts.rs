//! End-to-end tests of client bind mounts and `raw://` root filesystems
//! against a real server. Needs root; see `support` for how it skips.

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use support::TestServer;
use trellis::api::{BindMount, ContainerSpec};

static DIR_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A host directory for one test, removed on drop; unmounts first when a
/// tmpfs was mounted on it.
struct HostDir {
    path: PathBuf,
    mounted: bool,
}

impl HostDir {
    fn new(label: &str) -> HostDir {
        let number = DIR_COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/trellis-bind-{}-{number}-{label}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        HostDir { path, mounted: false }
    }

    /// Mounts a tmpfs with `options` on the directory.
    fn mount_tmpfs(&mut self, flags: nix::mount::MsFlags) {
        nix::mount::mount(Some("tmpfs"), &self.path, Some("tmpfs"), flags, Some("size=1m,mode=755")).expect("mounting a tmpfs");
        self.mounted = true;
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn text(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for HostDir {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(error) = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!("unmounting {} failed: {error}", self.path.display());
            }
        }
        if let Err(error) = std::fs::remove_dir_all(&self.path) {
            eprintln!("removing {} failed: {error}", self.path.display());
        }
    }
}

fn bind(source: &str, destination: &str, mode: u8) -> BindMount {
    BindMount { src_path: source.to_string(), dst_path: destination.to_string(), mode, origin: 0 }
}

fn create(server: &TestServer, label: &str, spec: ContainerSpec) -> Result<String, trellis::client::ClientError> {
    let spec = ContainerSpec { handle: server.unique_handle(label), ..spec };
    server.block_on(server.client.create(&spec))
}

/// Runs a shell command as root in the container; returns status, stdout
/// and stderr.
fn sh(server: &TestServer, handle: &str, script: &str) -> (i64, String, String) {
    let output = server.run_command(handle, "sh", &["-c", script]);
    (output.status, output.stdout_text(), output.stderr_text())
}

#[test]
fn bind_mounts_modes_order_and_files() {
    let Some(server) = TestServer::start("bind_mounts_modes_order_and_files") else { return };
    let read_only = HostDir::new("ro");
    std::fs::write(read_only.path().join("data"), "from host\n").unwrap();
    let read_write = HostDir::new("rw");
    // Container root is an unmapped host user, so the host directory must
    // be writable by others.
    std::fs::set_permissions(read_write.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let first = HostDir::new("first");
    std::fs::write(first.path().join("which"), "first\n").unwrap();
    let second = HostDir::new("second");
    std::fs::write(second.path().join("which"), "second\n").unwrap();
    let file_source = HostDir::new("file");
    let single = file_source.path().join("single.conf");
    std::fs::write(&single, "single file\n").unwrap();

    let spec = ContainerSpec {
        bind_mounts: vec![
            bind(&read_only.text(), "/mnt/missing/ro", 0),
            bind(&read_write.text(), "/mnt/rw", 1),
            bind(&first.text(), "/mnt/same", 0),
            bind(&second.text(), "/mnt/same", 0),
            bind(&single.display().to_string(), "/etc/single.conf", 0),
        ],
        ..ContainerSpec::default()
    };
    let handle = create(&server, "binds", spec).expect("create with bind mounts");

    assert_eq!(sh(&server, &handle, "cat /mnt/missing/ro/data").1, "from host\n");
    let (status, _, stderr) = sh(&server, &handle, "echo x > /mnt/missing/ro/new");
    assert_ne!(status, 0, "a mode 0 bind mount must be read-only");
    assert!(stderr.contains("Read-only file system"), "{stderr}");

    assert_eq!(sh(&server, &handle, "echo written > /mnt/rw/new && echo ok").1, "ok\n");
    assert_eq!(std::fs::read_to_string(read_write.path().join("new")).unwrap(), "written\n");

    assert_eq!(sh(&server, &handle, "cat /mnt/same/which").1, "second\n", "the later mount must be on top");
    assert_eq!(sh(&server, &handle, "cat /etc/single.conf").1, "single file\n");
}

#[test]
fn bind_mount_keeps_source_flags() {
    let Some(server) = TestServer::start("bind_mount_keeps_source_flags") else { return };
    let mut source = HostDir::new("flags");
    use nix::mount::MsFlags;
    source.mount_tmpfs(MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC);
    std::fs::write(source.path().join("tool"), "#!/bin/sh\necho ran\n").unwrap();
    std::fs::set_permissions(source.path().join("tool"), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let spec = ContainerSpec { bind_mounts: vec![bind(&source.text(), "/opt/flags", 0)], ..ContainerSpec::default() };
    let handle = create(&server, "flags", spec).expect("a read-only bind of a nosuid,nodev,noexec source");
    let (_, mounts, _) = sh(&server, &handle, "grep ' /opt/flags ' /proc/self/mountinfo");
    let options = mounts.split_whitespace().nth(5).unwrap_or_default().to_string();
    for flag in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(options.split(',').any(|option| option == flag), "{flag} missing from {options:?}");
    }
    let (status, _, _) = sh(&server, &handle, "/opt/flags/tool");
    assert_ne!(status, 0, "noexec must be kept");
    assert_eq!(sh(&server, &handle, "cat /opt/flags/tool").1, "#!/bin/sh\necho ran\n");
}

#[test]
fn missing_bind_source_fails_create() {
    let Some(server) = TestServer::start("missing_bind_source_fails_create") else { return };
    let missing = format!("/tmp/trellis-bind-{}-does-not-exist", std::process::id());
    let spec = ContainerSpec { bind_mounts: vec![bind(&missing, "/mnt/x", 0)], ..ContainerSpec::default() };
    let handle = server.unique_handle("missing");
    let error = server
        .block_on(server.client.create(&ContainerSpec { handle: handle.clone(), ..spec }))
        .expect_err("a missing source must fail the create");
    assert!(error.to_string().contains("no such file or directory"), "{error}");
    assert!(error.to_string().contains(&missing), "{error}");
    let all = [("garden.state".to_string(), "all".to_string())].into_iter().collect();
    assert!(!server.block_on(server.client.list(&all)).unwrap().contains(&handle), "a failed create left the container listed");
    assert!(!server.depot.join(&handle).exists(), "a failed create left its state directory");
}

#[test]
fn raw_rootfs_is_used_in_place() {
    let Some(server) = TestServer::start("raw_rootfs_is_used_in_place") else { return };
    let raw = HostDir::new("raw");
    let root = raw.path().join("root");
    let copied = std::process::Command::new("cp").arg("-a").arg(support::busybox_rootfs()).arg(&root).status().unwrap();
    assert!(copied.success(), "copying the busybox rootfs");
    std::fs::write(root.join("marker"), "placed on the host\n").unwrap();

    let spec = ContainerSpec { rootfs: format!("raw://{}", root.display()), ..ContainerSpec::default() };
    let handle = create(&server, "raw", spec).expect("create with a raw:// rootfs");
    // Host ownership is kept, so the unmapped container root cannot enter
    // the host-root-owned /root: run from /.
    let cat = |path: &str| {
        let spec = trellis::api::ProcessSpec { dir: "/".into(), ..support::command_spec("cat", &[path]) };
        server.run(&handle, &spec, None).expect("running cat").stdout_text()
    };
    assert_eq!(cat("/marker"), "placed on the host\n");
    // Used as is: a file written on the host now shows inside at once.
    std::fs::write(root.join("later"), "later\n").unwrap();
    assert_eq!(cat("/later"), "later\n");

    server.block_on(server.client.destroy(&handle)).expect("destroy");
    assert_eq!(std::fs::read_to_string(root.join("marker")).unwrap(), "placed on the host\n", "destroy must keep a raw:// rootfs");
}
