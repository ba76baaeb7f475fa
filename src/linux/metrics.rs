//! Metrics of a Linux container from its cgroup v1 counters.
//!
//! The pure conversions live here so they can be tested without root; the
//! reading is [`super::cgroup::ContainerCgroup::stats`].

use std::collections::BTreeMap;
use std::time::Duration;

use crate::api::{CpuStat, Metrics, MemoryStat, PidStat};

use super::cgroup::CgroupStats;

/// The host's CPU count, memory size and clock tick, for CPU time and
/// entitlement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostShape {
    pub cpu_cores: u64,
    pub memory_bytes: u64,
    /// Clock ticks per second of `cpuacct.stat` (USER_HZ).
    pub ticks_per_second: u64,
}

impl HostShape {
    /// Reads the host's online CPUs, total memory and USER_HZ.
    pub fn read() -> HostShape {
        let sysconf = |variable| nix::unistd::sysconf(variable).ok().flatten().map_or(0, |value| value.max(0) as u64);
        HostShape {
            cpu_cores: sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN).max(1),
            memory_bytes: super::host_memory_bytes().unwrap_or(0),
            ticks_per_second: sysconf(nix::unistd::SysconfVar::CLK_TCK).max(1),
        }
    }

    /// Returns the default entitlement per share, in percent: CPU cores ×
    /// 100 ÷ the host's memory in MiB (integer division of the bytes).
    pub fn entitlement_per_share_percent(&self) -> f64 {
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

/// Builds the Metrics of a container from its cgroup counters.
///
/// NOTE: `DiskStat` stays zero and `NetworkStat` null: disk usage needs the
/// writable layer's accounting and network counters the container's
/// interface, both later work.
pub fn metrics_v1(stats: &CgroupStats, shares: u64, pid_limit: u64, host: &HostShape, age: Duration) -> Metrics {
    let tick_ns = 1_000_000_000 / host.ticks_per_second.max(1);
    Metrics {
        memory_stat: memory_stat_v1(&stats.memory),
        cpu_stat: CpuStat {
            usage: stats.cpu_usage_ns,
            user: stats.cpu_user_ticks * tick_ns,
            system: stats.cpu_system_ticks * tick_ns,
        },
        disk_stat: Default::default(),
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
        let host = HostShape { cpu_cores: 4, memory_bytes: 16 << 30, ticks_per_second: 100 };
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
        let stats = CgroupStats { cpu_usage_ns: 5, cpu_user_ticks: 3, cpu_system_ticks: 2, pids_current: 4, ..CgroupStats::default() };
        let host = HostShape { cpu_cores: 2, memory_bytes: 2 << 30, ticks_per_second: 100 };
        let metrics = metrics_v1(&stats, 0, 128, &host, Duration::from_secs(1));
        assert_eq!(metrics.cpu_stat, CpuStat { usage: 5, user: 30_000_000, system: 20_000_000 });
        assert_eq!(metrics.pid_stat, PidStat { current: 4, max: 128 });
        assert_eq!(metrics.age, 1_000_000_000);
        assert_eq!(metrics.cpu_entitlement, 0);
    }
}
