//! The benchmark harness of design section 7 (figures G1 to G9).
//!
//! It starts a `trellis server` in a private network namespace and drives
//! it through the Garden API from this process. It then does the equivalent
//! work with `crun` in the same run, in blocks rather than interleaved, and
//! prints both side by side with the ratio Trellis / baseline per figure.
//!
//! - `cargo bench --bench garden` (what `scripts/bench` runs): the full
//!   run on the release build. `-- --json FILE` also writes the results as
//!   JSON (default `target/bench/garden.json`); `-- --iterations N` changes
//!   the number of samples per latency figure; `-- --no-crun` measures
//!   Trellis alone; `-- --only G3,G8` measures only the figures named
//!   (`memory` names the memory figure).
//! - `cargo test --bench garden` (part of `scripts/test`): the short mode,
//!   a few iterations of every figure, so the harness can't rot. Nothing is
//!   asserted about speed; the run fails only when an operation fails. Its
//!   default results file is `target/bench/garden-short.json`.

mod crun_side;
mod host;
mod stats;
mod trellis_side;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use stats::{Better, Figure};

/// How much work each figure does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub mode: String,
    pub warmup: usize,
    /// Samples of each latency figure (G1-G4, G7).
    pub iterations: usize,
    /// Rounds of G5, each 2 clients × `cycles_per_client` cycles.
    pub cycle_rounds: usize,
    pub cycles_per_client: usize,
    /// Creates per client in G6 (5 clients).
    pub concurrent_creates: usize,
    /// MiB written to stdout in G8.
    pub stdout_mib: usize,
    /// Size of the G9 archive in bytes.
    pub archive_bytes: usize,
    /// Samples of G8 and G9.
    pub throughput_rounds: usize,
    /// Idle containers for the memory figure.
    pub idle_containers: usize,
    /// Figures to measure (`G1` ... `G9`, `memory`); empty means all.
    pub only: Vec<String>,
}

impl Plan {
    /// Returns whether any of `ids` is to be measured.
    pub fn wants(&self, ids: &[&str]) -> bool {
        self.only.is_empty() || ids.iter().any(|id| self.only.iter().any(|only| only.eq_ignore_ascii_case(id)))
    }

    /// `count` when any of `ids` is to be measured, else 0.
    pub fn count(&self, ids: &[&str], count: usize) -> usize {
        if self.wants(ids) {
            count
        } else {
            0
        }
    }

    fn full(iterations: usize) -> Plan {
        Plan {
            mode: "full".into(),
            warmup: 3,
            iterations,
            cycle_rounds: 3,
            cycles_per_client: 10,
            concurrent_creates: 40,
            stdout_mib: 200,
            archive_bytes: 17 << 20,
            throughput_rounds: 5,
            idle_containers: 100,
            only: Vec::new(),
        }
    }

    fn short() -> Plan {
        Plan {
            mode: "short".into(),
            warmup: 1,
            iterations: 2,
            cycle_rounds: 1,
            cycles_per_client: 2,
            concurrent_creates: 2,
            stdout_mib: 8,
            archive_bytes: 17 << 20,
            throughput_rounds: 1,
            idle_containers: 3,
            only: Vec::new(),
        }
    }
}

struct Options {
    plan: Plan,
    json: PathBuf,
    crun: bool,
    rootfs: Option<PathBuf>,
}

fn parse_options(args: &[String]) -> Result<Options, String> {
    // cargo passes --bench to benchmarks it runs with `cargo bench`, and
    // nothing of the kind under `cargo test`.
    let full = args.iter().any(|arg| arg == "--bench") && !args.iter().any(|arg| arg == "--short");
    let mut iterations = 20;
    // The short mode writes a file of its own, so that a test run does not
    // replace the results of the last full run.
    let file_name = if full { "garden.json" } else { "garden-short.json" };
    // CARGO_TARGET_TMPDIR is `<target>/tmp`, so the results go to
    // `<target>/bench`.
    let target_tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let mut json = target_tmp.parent().unwrap_or(target_tmp).join("bench").join(file_name);
    let mut crun = true;
    let mut rootfs = None;
    let mut only = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--bench" | "--short" => {}
            "--iterations" => {
                iterations = value("--iterations")?
                    .parse()
                    .map_err(|error| format!("--iterations: {error}"))?;
                if iterations == 0 {
                    return Err("--iterations must be at least 1".into());
                }
            }
            "--json" => json = PathBuf::from(value("--json")?),
            "--no-crun" => crun = false,
            "--only" => {
                only = value("--only")?.split(',').map(|id| id.trim().to_string()).collect();
                let known = ["G1", "G2", "G3", "G4", "G5", "G6", "G7", "G8", "G9", "memory"];
                if let Some(unknown) = only.iter().find(|id| !known.iter().any(|k| k.eq_ignore_ascii_case(id))) {
                    return Err(format!("--only: unknown figure {unknown:?}; known: {}", known.join(", ")));
                }
            }
            "--rootfs" => rootfs = Some(PathBuf::from(value("--rootfs")?)),
            // Filters and flags that `cargo test` passes to every target.
            other if !full && !other.starts_with("--") => {}
            "--nocapture" | "--quiet" | "--test-threads" | "--include-ignored" | "--ignored" if !full => {}
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    let mut plan = if full { Plan::full(iterations) } else { Plan::short() };
    plan.only = only;
    Ok(Options { plan, json, crun, rootfs })
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(crun_side::BLOCK_FLAG) {
        if let Err(error) = crun_side::block_main(&args[1..]) {
            eprintln!("crun block: {error}");
            std::process::exit(1);
        }
        return;
    }
    if let Err(error) = run(&args) {
        eprintln!("bench: {error}");
        std::process::exit(1);
    }
}

fn run(args: &[String]) -> Result<(), String> {
    let options = parse_options(args)?;
    if !nix::unistd::geteuid().is_root() {
        return skip("needs root to create namespaces, cgroups and mounts");
    }
    if !Path::new(host::CPUACCT).exists() {
        return skip("needs the cgroup v1 cpuacct hierarchy to charge CPU time");
    }
    let rootfs = match &options.rootfs {
        Some(rootfs) => rootfs.clone(),
        None => build_rootfs()?,
    };
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_trellis"));
    let plan = &options.plan;
    // Whatever ran before (a build, or another run's disk writes) can
    // leave the host filesystem busy, and that slowed the Trellis block's
    // first steps tenfold. The crun block also starts after a pause.
    settle(plan);
    eprintln!("bench: {} mode, Trellis block ({})", plan.mode, binary.display());
    let trellis = trellis_side::measure(plan, &binary, &rootfs)?;

    let crun = if options.crun && crun_side::available() {
        settle(plan);
        eprintln!("bench: crun block");
        let results = crun_side::measure(plan, &rootfs)?;
        settle(plan);
        Some(results)
    } else if options.crun && plan.mode == "full" {
        return Err("crun is not installed (apt-get install crun), or pass --no-crun".into());
    } else {
        eprintln!("bench: crun is not measured (not installed or --no-crun)");
        None
    };
    eprintln!("bench: baselines");
    let pipe = if plan.wants(&["G8"]) { pipe_baseline(plan, &rootfs)? } else { Vec::new() };

    let crun_or_empty = |pick: fn(&crun_side::Results) -> &Vec<f64>| crun.as_ref().map(pick).cloned().unwrap_or_default();
    let mut figures = vec![
        Figure::new("G1", "create + run echo, to first output", "ms", Better::Lower, 0.5, "crun"),
        Figure::new("G2", "create alone (networking included)", "ms", Better::Lower, 0.5, "crun"),
        Figure::new("G3", "run in existing container, to first output", "ms", Better::Lower, 1.0, "crun"),
        Figure::new("G4", "destroy", "ms", Better::Lower, 0.5, "crun"),
        Figure::new("G5", "create-run-destroy cycles, 2 clients", "cycles/s", Better::Higher, 0.5, "crun"),
        Figure::new("G6", "create latency, 5 clients (mean)", "ms", Better::Lower, 2.0, "crun").comparing_means(),
        Figure::new("G7", "CPU time per create + destroy", "ms", Better::Lower, 1.0, "crun"),
        Figure::new("G8", "stdout streamed to the client", "MiB/s", Better::Higher, 0.8, "pipe"),
        Figure::new("G9", "stream in of a 17 MiB tar", "MiB/s", Better::Higher, 0.7, "tar -x"),
    ];
    let trellis_samples = [
        &trellis.g1, &trellis.g2, &trellis.g3, &trellis.g4, &trellis.g5, &trellis.g6, &trellis.g7, &trellis.g8, &trellis.g9,
    ];
    let baselines = [
        crun_or_empty(|r| &r.g1),
        crun_or_empty(|r| &r.g2),
        crun_or_empty(|r| &r.g3),
        crun_or_empty(|r| &r.g4),
        crun_or_empty(|r| &r.g5),
        crun_or_empty(|r| &r.g6),
        crun_or_empty(|r| &r.g7),
        pipe,
        trellis.g9_tar.clone(),
    ];
    for ((figure, samples), baseline) in figures.iter_mut().zip(trellis_samples).zip(baselines) {
        figure.trellis_samples = samples.clone();
        figure.baseline_samples = baseline;
        figure.finish(plan.mode == "full");
    }

    figures.retain(|figure| plan.wants(&[figure.id]));
    println!("{}", stats::table(&figures));
    if plan.mode != "full" {
        println!("short mode: too few samples to judge the targets");
    }
    println!("memory (KiB): {}", trellis.memory);
    let report = serde_json::json!({
        "plan": plan,
        "machine": host::machine(),
        "crun_version": crun.as_ref().map(|crun| crun.version.clone()),
        "figures": figures,
        "memory_kib": trellis.memory,
    });
    if let Some(parent) = options.json.parent() {
        std::fs::create_dir_all(parent).map_err(|error| format!("creating {}: {error}", parent.display()))?;
    }
    std::fs::write(&options.json, serde_json::to_string_pretty(&report).expect("a report serialises"))
        .map_err(|error| format!("writing {}: {error}", options.json.display()))?;
    eprintln!("bench: results written to {}", options.json.display());
    Ok(())
}

/// Reports why the harness can't run; fatal when the test suite requires
/// its root tests to run.
fn skip(reason: &str) -> Result<(), String> {
    if std::env::var("TRELLIS_REQUIRE_ROOT_TESTS").is_ok_and(|value| value == "1") {
        return Err(format!("cannot run: {reason}"));
    }
    eprintln!("SKIPPED bench: {reason}");
    Ok(())
}

/// Builds the busybox rootfs under the target directory once.
fn build_rootfs() -> Result<PathBuf, String> {
    let rootfs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-busybox-rootfs");
    if rootfs.is_dir() {
        return Ok(rootfs);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-busybox-rootfs");
    let output = Command::new(&script)
        .arg(&rootfs)
        .output()
        .map_err(|error| format!("running {}: {error}", script.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(rootfs)
}

/// How long the full mode lets the kernel finish tearing down one block's
/// namespaces, links and mounts before the next block starts. Both
/// runtimes leave veth pairs to the kernel, and the server's namespace
/// goes with its idle bridges. That work would otherwise slow the next
/// block's measurements.
const SETTLE_TIME: std::time::Duration = std::time::Duration::from_secs(20);

/// Waits [`SETTLE_TIME`] in the full mode.
fn settle(plan: &Plan) {
    if plan.mode == "full" {
        eprintln!("bench: letting the kernel settle for {} s", SETTLE_TIME.as_secs());
        std::thread::sleep(SETTLE_TIME);
    }
}

/// G8's baseline: the same busybox `dd` writing into a pipe this process
/// reads, on the host.
fn pipe_baseline(plan: &Plan, rootfs: &Path) -> Result<Vec<f64>, String> {
    use std::io::Read;
    let mut samples = Vec::new();
    for _ in 0..plan.throughput_rounds {
        let started = std::time::Instant::now();
        let mut child = Command::new(rootfs.join("bin/busybox"))
            .args(["dd", "if=/dev/zero", "bs=1048576", &format!("count={}", plan.stdout_mib)])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|error| format!("starting busybox dd: {error}"))?;
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut buffer = vec![0_u8; 64 * 1024];
        let mut total = 0;
        loop {
            let read = stdout.read(&mut buffer).map_err(|error| error.to_string())?;
            if read == 0 {
                break;
            }
            total += read;
        }
        child.wait().map_err(|error| error.to_string())?;
        if total != plan.stdout_mib << 20 {
            return Err(format!("the pipe delivered {total} bytes"));
        }
        samples.push(plan.stdout_mib as f64 / started.elapsed().as_secs_f64());
    }
    Ok(samples)
}
