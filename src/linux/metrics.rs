//! Metrics of a Linux container from its cgroup counters (v1 or v2), the
//! disk usage of its layers and the interfaces of its network namespace.
//!
//! The pure conversions live here so they can be tested without root; the
//! cgroup reading is [`super::cgroup::ContainerCgroup::stats`].

use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::{CpuStat, DiskStat, Metrics, MemoryStat, NetworkStat, PidStat};

use super::disk::Usage;

use super::cgroup::{CgroupStats, CgroupVersion};

/// The host's CPU count, memory size and clock tick, for CPU time and
/// entitlement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostShape {
    pub cpu_cores: u64,
    pub memory_bytes: u64,
    /// Clock ticks per second of `cpuacct.stat` (USER_HZ).
    pub ticks_per_second: u64,
    /// The operator's CPU entitlement per share in percent, which replaces
    /// the one derived from cores and memory.
    pub entitlement_percent: Option<f64>,
}

impl HostShape {
    /// Reads the host's online CPUs, total memory and USER_HZ.
    pub fn read() -> HostShape {
        let sysconf = |variable| nix::unistd::sysconf(variable).ok().flatten().map_or(0, |value| value.max(0) as u64);
        HostShape {
            cpu_cores: sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN).max(1),
            memory_bytes: super::host_memory_bytes().unwrap_or(0),
            ticks_per_second: sysconf(nix::unistd::SysconfVar::CLK_TCK).max(1),
            entitlement_percent: None,
        }
    }

    /// Returns the entitlement per share in percent: the operator's, or by
    /// default CPU cores × 100 ÷ the host's memory in MiB (integer division
    /// of the bytes).
    pub fn entitlement_per_share_percent(&self) -> f64 {
        if let Some(percent) = self.entitlement_percent {
            return percent;
        }
        let mebibytes = self.memory_bytes / 1_048_576;
        if mebibytes == 0 {
            return 0.0;
        }
        (self.cpu_cores * 100) as f64 / mebibytes as f64
    }
}

/// Returns ⌊shares × (percent / 100) × age⌋ in nanoseconds of CPU time.
pub fn cpu_entitlement(shares: u64, percent_per_share: f64, age: Duration) -> u64 {
    let value = shares as f64 * (percent_per_share / 100.0) * age.as_nanos() as f64;
    if value.is_finite() && value > 0.0 {
        value.floor() as u64
    } else {
        0
    }
}

/// Fills the v1 memory statistics from the keys of `memory.stat`. The v2
/// keys (`anon`, `file`, `swapcached`) stay 0 on a v1 host.
pub fn memory_stat_v1(stat: &BTreeMap<String, u64>) -> MemoryStat {
    let get = |key: &str| stat.get(key).copied().unwrap_or(0);
    let toward_limit = (get("total_rss") + get("total_cache") + get("total_swap")).saturating_sub(get("total_inactive_file"));
    MemoryStat {
        active_anon: get("active_anon"),
        active_file: get("active_file"),
        cache: get("cache"),
        hierarchical_memory_limit: get("hierarchical_memory_limit"),
        inactive_anon: get("inactive_anon"),
        inactive_file: get("inactive_file"),
        mapped_file: get("mapped_file"),
        pgfault: get("pgfault"),
        pgmajfault: get("pgmajfault"),
        pgpgin: get("pgpgin"),
        pgpgout: get("pgpgout"),
        rss: get("rss"),
        total_active_anon: get("total_active_anon"),
        total_active_file: get("total_active_file"),
        total_cache: get("total_cache"),
        total_inactive_anon: get("total_inactive_anon"),
        total_inactive_file: get("total_inactive_file"),
        total_mapped_file: get("total_mapped_file"),
        total_pgfault: get("total_pgfault"),
        total_pgmajfault: get("total_pgmajfault"),
        total_pgpgin: get("total_pgpgin"),
        total_pgpgout: get("total_pgpgout"),
        total_rss: get("total_rss"),
        total_unevictable: get("total_unevictable"),
        unevictable: get("unevictable"),
        swap: get("swap"),
        hierarchical_memsw_limit: get("hierarchical_memsw_limit"),
        total_swap: get("total_swap"),
        total_usage_toward_limit: toward_limit,
        anon: 0,
        file: 0,
        swapcached: 0,
    }
}

/// Fills the v2 memory statistics from the keys of `memory.stat`. Keys
/// v2 shares with v1 (`active_anon`, `pgfault`…) are copied; the v1-only
/// keys (`cache`, `rss`, `total_*`…) stay 0.
pub fn memory_stat_v2(stat: &BTreeMap<String, u64>) -> MemoryStat {
    let get = |key: &str| stat.get(key).copied().unwrap_or(0);
    let toward_limit = (get("file") + get("anon") + get("swapcached")).saturating_sub(get("inactive_file"));
    MemoryStat {
        active_anon: get("active_anon"),
        active_file: get("active_file"),
        inactive_anon: get("inactive_anon"),
        inactive_file: get("inactive_file"),
        pgfault: get("pgfault"),
        pgmajfault: get("pgmajfault"),
        unevictable: get("unevictable"),
        total_usage_toward_limit: toward_limit,
        anon: get("anon"),
        file: get("file"),
        swapcached: get("swapcached"),
        ..MemoryStat::default()
    }
}

/// Returns the CPU time of the container in nanoseconds. v1 reads
/// `cpuacct.usage` and the USER_HZ ticks of `cpuacct.stat`; v2 reads the
/// microseconds of `cpu.stat`.
pub fn cpu_stat(stats: &CgroupStats, ticks_per_second: u64) -> CpuStat {
    match stats.version {
        CgroupVersion::V1 => {
            let tick_ns = 1_000_000_000 / ticks_per_second.max(1);
            CpuStat { usage: stats.cpu_usage_ns, user: stats.cpu_user_ticks * tick_ns, system: stats.cpu_system_ticks * tick_ns }
        }
        CgroupVersion::V2 => {
            let micros = |key: &str| stats.cpu_stat.get(key).copied().unwrap_or(0) * 1000;
            CpuStat { usage: micros("usage_usec"), user: micros("user_usec"), system: micros("system_usec") }
        }
    }
}

/// Returns the disk statistics from the usage of the image and of the
/// writable layer: total counts both, exclusive only the writable layer.
pub fn disk_stat(image: Usage, writable: Usage) -> DiskStat {
    DiskStat {
        total_bytes_used: image.bytes + writable.bytes,
        total_inodes_used: image.inodes + writable.inodes,
        exclusive_bytes_used: writable.bytes,
        exclusive_inodes_used: writable.inodes,
    }
}

/// Sums the received and sent bytes of every interface but `lo` in the
/// text of a `/proc/<pid>/net/dev` file.
pub fn network_stat(net_dev: &str) -> NetworkStat {
    let mut stat = NetworkStat::default();
    // Two header lines, then `<name>: <8 receive fields> <8 transmit
    // fields>`, bytes first in each group.
    for line in net_dev.lines().skip(2) {
        let Some((name, counters)) = line.split_once(':') else { continue };
        if name.trim() == "lo" {
            continue;
        }
        let fields: Vec<u64> = counters.split_whitespace().filter_map(|field| field.parse().ok()).collect();
        if fields.len() >= 16 {
            stat.rx_bytes += fields[0];
            stat.tx_bytes += fields[8];
        }
    }
    stat
}

/// Builds the Metrics of a container from its cgroup counters. Disk and
/// network statistics come from [`disk_stat`] and [`network_stat`].
pub fn build_metrics(stats: &CgroupStats, shares: u64, pid_limit: u64, host: &HostShape, age: Duration) -> Metrics {
    let memory_stat = match stats.version {
        CgroupVersion::V1 => memory_stat_v1(&stats.memory),
        CgroupVersion::V2 => memory_stat_v2(&stats.memory),
    };
    Metrics {
        memory_stat,
        cpu_stat: cpu_stat(stats, host.ticks_per_second),
        disk_stat: DiskStat::default(),
        network_stat: None,
        pid_stat: PidStat { current: stats.pids_current, max: pid_limit },
        age: i64::try_from(age.as_nanos()).unwrap_or(i64::MAX),
        cpu_entitlement: cpu_entitlement(shares, host.entitlement_per_share_percent(), age),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::cgroup::parse_flat_keyed;

    #[test]
    fn entitlement_matches_the_worked_example() {
        // 4 cores and 16 GiB: 1024 shares earn 2.5 s of CPU per 10 s of age.
        let host = HostShape { cpu_cores: 4, memory_bytes: 16 << 30, ticks_per_second: 100, entitlement_percent: None };
        assert_eq!(host.entitlement_per_share_percent(), 0.0244140625);
        let earned = cpu_entitlement(1024, host.entitlement_per_share_percent(), Duration::from_secs(10));
        assert_eq!(earned, 2_500_000_000);
        assert_eq!(cpu_entitlement(0, host.entitlement_per_share_percent(), Duration::from_secs(10)), 0);
    }

    #[test]
    fn memory_stat_keys_map_and_usage_is_floored() {
        let stat = parse_flat_keyed(
            "cache 819200\nrss 1200128\nmapped_file 65536\ninactive_file 778240\nhierarchical_memory_limit 268435456\n\
             total_rss 1200128\ntotal_cache 819200\ntotal_swap 0\ntotal_inactive_file 778240\ngarbage\n",
        );
        let memory = memory_stat_v1(&stat);
        assert_eq!(memory.cache, 819200);
        assert_eq!(memory.rss, 1200128);
        assert_eq!(memory.mapped_file, 65536);
        assert_eq!(memory.hierarchical_memory_limit, 268435456);
        assert_eq!(memory.total_usage_toward_limit, 1200128 + 819200 - 778240);
        assert_eq!((memory.anon, memory.file, memory.swapcached), (0, 0, 0));
        let floored = memory_stat_v1(&parse_flat_keyed("total_rss 1\ntotal_inactive_file 9\n"));
        assert_eq!(floored.total_usage_toward_limit, 0);
    }

    #[test]
    fn cpu_ticks_become_nanoseconds() {
        let stats = CgroupStats { cpu_usage_ns: 5, cpu_user_ticks: 3, cpu_system_ticks: 2, pids_current: 4, ..CgroupStats::new(CgroupVersion::V1) };
        let host = HostShape { cpu_cores: 2, memory_bytes: 2 << 30, ticks_per_second: 100, entitlement_percent: None };
        let metrics = build_metrics(&stats, 0, 128, &host, Duration::from_secs(1));
        assert_eq!(metrics.cpu_stat, CpuStat { usage: 5, user: 30_000_000, system: 20_000_000 });
        assert_eq!(metrics.pid_stat, PidStat { current: 4, max: 128 });
        assert_eq!(metrics.age, 1_000_000_000);
        assert_eq!(metrics.cpu_entitlement, 0);
    }

    #[test]
    fn v2_memory_and_cpu_use_v2_keys() {
        let mut stats = CgroupStats::new(CgroupVersion::V2);
        stats.memory = parse_flat_keyed(
            "anon 1200128\nfile 819200\nswapcached 4096\ninactive_file 778240\nactive_anon 1000\nactive_file 2000\n\
             inactive_anon 3000\nunevictable 5\npgfault 77\npgmajfault 2\nfile_mapped 65536\nshmem 0\n",
        );
        stats.cpu_stat = parse_flat_keyed("usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 0\n");
        stats.pids_current = 3;
        let host = HostShape { cpu_cores: 4, memory_bytes: 16 << 30, ticks_per_second: 100, entitlement_percent: None };
        let metrics = build_metrics(&stats, 1024, 0, &host, Duration::from_secs(10));

        let memory = metrics.memory_stat;
        assert_eq!((memory.anon, memory.file, memory.swapcached), (1200128, 819200, 4096));
        assert_eq!(memory.total_usage_toward_limit, 1200128 + 819200 + 4096 - 778240);
        assert_eq!((memory.active_anon, memory.active_file, memory.inactive_anon, memory.inactive_file), (1000, 2000, 3000, 778240));
        assert_eq!((memory.unevictable, memory.pgfault, memory.pgmajfault), (5, 77, 2));
        assert_eq!((memory.cache, memory.rss, memory.mapped_file, memory.total_rss), (0, 0, 0, 0), "v1 keys stay 0");
        assert_eq!(metrics.cpu_stat, CpuStat { usage: 1_500_000, user: 1_000_000, system: 500_000 });
        assert_eq!(metrics.pid_stat, PidStat { current: 3, max: 0 });
        assert_eq!(metrics.cpu_entitlement, 2_500_000_000);
    }

    #[test]
    fn v2_usage_toward_limit_is_floored() {
        let memory = memory_stat_v2(&parse_flat_keyed("file 10\ninactive_file 50\n"));
        assert_eq!(memory.total_usage_toward_limit, 0);
    }

    #[test]
    fn disk_stat_adds_image_to_writable_layer() {
        let stat = disk_stat(Usage { bytes: 4 << 20, inodes: 400 }, Usage { bytes: 8192, inodes: 3 });
        assert_eq!(stat, DiskStat { total_bytes_used: (4 << 20) + 8192, total_inodes_used: 403, exclusive_bytes_used: 8192, exclusive_inodes_used: 3 });
    }

    #[test]
    fn network_stat_skips_loopback() {
        let text = "Inter-|   Receive                                                |  Transmit\n \
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n    \
lo:    9000      10    0    0    0     0          0         0     9000      10    0    0    0     0       0          0\n  \
eth0:    1520      12    0    0    0     0          0         0      980       9    0    0    0     0       0          0\n  \
eth1:      10       1    0    0    0     0          0         0       20       1    0    0    0     0       0          0\n";
        assert_eq!(network_stat(text), NetworkStat { rx_bytes: 1530, tx_bytes: 1000 });
        let only_loopback = "h1\nh2\n    lo:  5 1 0 0 0 0 0 0  5 1 0 0 0 0 0 0\n";
        assert_eq!(network_stat(only_loopback), NetworkStat::default());
    }

    #[test]
    fn operator_entitlement_replaces_the_host_default() {
        let host = HostShape { cpu_cores: 4, memory_bytes: 16 << 30, ticks_per_second: 100, entitlement_percent: Some(0.5) };
        assert_eq!(host.entitlement_per_share_percent(), 0.5);
        // 100 shares × 0.5 % of a CPU for 10 s.
        assert_eq!(cpu_entitlement(100, host.entitlement_per_share_percent(), Duration::from_secs(10)), 5_000_000_000);
    }
}
