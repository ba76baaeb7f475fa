//! `GET /debug/vars`: the server's state in the shape of Go's `expvar`
//! package, which Garden operators scrape from guardian.
//!
//! Go clients decode `memstats` into `runtime.MemStats`, so every field
//! there has Go's JSON type: unsigned integers for counters and sizes,
//! `GCCPUFraction` a float, `EnableGC` and `DebugGC` booleans, `PauseNs`
//! and `PauseEnd` arrays of 256 integers, `BySize` 61 objects of
//! `{Size, Mallocs, Frees}`. The values come from glibc's `mallinfo2`,
//! `/proc/self/status` and `getrusage`. Rust has no garbage collector, so
//! the collector fields are zero and `EnableGC` is false.

use std::path::Path;

use serde_json::{json, Value};

/// Length of Go's `MemStats.PauseNs` and `PauseEnd` ring buffers.
const GO_PAUSE_SLOTS: usize = 256;
/// Number of size classes in Go's `MemStats.BySize`.
const GO_SIZE_CLASSES: usize = 61;

/// Memory figures of the server process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Bytes of heap in use: glibc's small-block (`uordblks`) plus
    /// mmapped (`hblkhd`) allocations.
    pub heap_in_use: u64,
    /// Bytes of heap free inside the arenas (`fordblks`).
    pub heap_free: u64,
    /// Bytes the allocator took from the system: arena plus mmapped blocks.
    pub heap_system: u64,
    /// `VmData` of /proc/self/status, in bytes.
    pub data_bytes: u64,
    /// `VmStk` of /proc/self/status, in bytes.
    pub stack_bytes: u64,
    /// `VmRSS` of /proc/self/status, in bytes.
    pub resident_bytes: u64,
    /// `Threads` of /proc/self/status.
    pub threads: u64,
    /// Minor plus major page faults from `getrusage`.
    pub page_faults: u64,
}

impl ProcessMemory {
    /// Reads the figures of the calling process.
    pub fn read() -> ProcessMemory {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let info = unsafe { libc::mallinfo2() };
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let mut memory = ProcessMemory {
            heap_in_use: (info.uordblks + info.hblkhd) as u64,
            heap_free: info.fordblks as u64,
            heap_system: (info.arena + info.hblkhd) as u64,
            ..ProcessMemory::default()
        };
        for line in status.lines() {
            let Some((key, value)) = line.split_once(':') else { continue };
            let number = value.trim().trim_end_matches(" kB").trim().parse::<u64>().unwrap_or(0);
            match key {
                "VmData" => memory.data_bytes = number * 1024,
                "VmStk" => memory.stack_bytes = number * 1024,
                "VmRSS" => memory.resident_bytes = number * 1024,
                "Threads" => memory.threads = number,
                _ => {}
            }
        }
        if let Ok(usage) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
            memory.page_faults = (usage.minor_page_faults() + usage.major_page_faults()) as u64;
        }
        memory
    }
}

/// Builds Go's `runtime.MemStats` object from `memory`.
pub fn memstats(memory: &ProcessMemory) -> Value {
    let by_size: Vec<Value> = (0..GO_SIZE_CLASSES).map(|_| json!({ "Size": 0u32, "Mallocs": 0u64, "Frees": 0u64 })).collect();
    let sys = memory.data_bytes.max(memory.heap_system + memory.stack_bytes);
    // NOTE: glibc keeps no cumulative allocation counts, so TotalAlloc is
    // the current heap (a lower bound) and Mallocs, Frees and HeapObjects are 0.
    json!({
        "Alloc": memory.heap_in_use,
        "TotalAlloc": memory.heap_in_use,
        "Sys": sys,
        "Lookups": 0u64,
        "Mallocs": 0u64,
        "Frees": 0u64,
        "HeapAlloc": memory.heap_in_use,
        "HeapSys": memory.heap_system,
        "HeapIdle": memory.heap_free,
        "HeapInuse": memory.heap_in_use,
        "HeapReleased": 0u64,
        "HeapObjects": 0u64,
        "StackInuse": memory.stack_bytes,
        "StackSys": memory.stack_bytes,
        "MSpanInuse": 0u64,
        "MSpanSys": 0u64,
        "MCacheInuse": 0u64,
        "MCacheSys": 0u64,
        "BuckHashSys": 0u64,
        "GCSys": 0u64,
        "OtherSys": sys.saturating_sub(memory.heap_system + memory.stack_bytes),
        "NextGC": 0u64,
        "LastGC": 0u64,
        "PauseTotalNs": 0u64,
        "PauseNs": vec![0u64; GO_PAUSE_SLOTS],
        "PauseEnd": vec![0u64; GO_PAUSE_SLOTS],
        "NumGC": 0u32,
        "NumForcedGC": 0u32,
        "GCCPUFraction": 0.0f64,
        "EnableGC": false,
        "DebugGC": false,
        "BySize": by_size,
    })
}

/// Counts the container state directories in the depot, or returns -1 when
/// it cannot be read (guardian's `depotDirs`). A destroyed container's
/// directory that waits to be deleted has a name no handle can have and is
/// not counted.
pub fn depot_dirs(depot: &Path) -> i64 {
    let Ok(entries) = std::fs::read_dir(depot) else { return -1 };
    let is_container = |entry: &std::fs::DirEntry| {
        let is_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
        is_dir && !entry.file_name().to_str().is_some_and(crate::linux::trash::is_discarded)
    };
    entries.filter_map(Result::ok).filter(is_container).count() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depot_dirs_counts_only_handles() {
        let depot = tempfile::tempdir().unwrap();
        std::fs::create_dir(depot.path().join("box")).unwrap();
        std::fs::create_dir(depot.path().join("removed@00ff")).unwrap();
        std::fs::write(depot.path().join("file"), b"").unwrap();
        assert_eq!(depot_dirs(depot.path()), 1);
        assert_eq!(depot_dirs(&depot.path().join("absent")), -1);
    }

    #[test]
    fn memstats_reflects_this_process() {
        let keep = vec![7u8; 4 << 20];
        let memory = ProcessMemory::read();
        assert!(memory.heap_in_use >= keep.len() as u64, "{memory:?}");
        assert!(memory.threads >= 1);
        assert!(memory.resident_bytes > 0);
        let stats = memstats(&memory);
        assert_eq!(stats["Alloc"], memory.heap_in_use);
        assert_eq!(stats["PauseNs"].as_array().unwrap().len(), 256);
        assert_eq!(stats["BySize"].as_array().unwrap().len(), 61);
        assert!(stats["GCCPUFraction"].is_f64());
        drop(keep);
    }

    #[test]
    fn depot_dirs_counts_directories() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::create_dir(dir.path().join("b")).unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        assert_eq!(depot_dirs(dir.path()), 2);
        assert_eq!(depot_dirs(&dir.path().join("missing")), -1);
    }
}
