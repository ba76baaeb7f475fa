//! Bandwidth limits with tc on the host end of a container's veth pair.
//!
//! The host end is outside the container, so container root cannot remove
//! the limits. Traffic to the container leaves through the host end's
//! egress, shaped here by a token bucket filter. Traffic the container
//! sends is limited by a policer in the server's nft table instead
//! ([`super::nft::bandwidth_script`]).
//!
//! NOTE: policing the host end's ingress with tc needs the kernel's
//! `act_police` module, which not every kernel has (the project machine's
//! lacks it), so the sending direction uses nft's `limit` expression.

use std::process::Command;

use super::NetworkError;
use crate::api::BandwidthLimits;

/// Smallest bucket used, in bytes, because a bucket below a few packets
/// stalls TCP.
// NOTE: a client's burst below this is raised to it; the reported limits
// stay as the client set them.
const MIN_BURST_BYTES: u64 = 32 * 1024;

/// Returns the bucket size used for `limits`, in bytes.
pub fn effective_burst(limits: &BandwidthLimits, mtu: u32) -> u64 {
    limits.burst.max(MIN_BURST_BYTES).max(u64::from(mtu) * 2)
}

fn run(args: &[&str]) -> Result<(), NetworkError> {
    let command = format!("tc {}", args.join(" "));
    let output = Command::new("tc")
        .args(args)
        .output()
        .map_err(|error| NetworkError::Tc { command: command.clone(), reason: error.to_string() })?;
    if !output.status.success() {
        return Err(NetworkError::Tc { command, reason: String::from_utf8_lossy(&output.stderr).trim().to_string() });
    }
    Ok(())
}

/// Checks that `tc` runs, for the start-up check.
pub fn check_available() -> Result<(), NetworkError> {
    match Command::new("tc").arg("-V").output() {
        Ok(output) if output.status.success() => Ok(()),
        Ok(output) => Err(NetworkError::Missing { what: format!("a working tc command (`tc -V` exited with {})", output.status) }),
        Err(error) => Err(NetworkError::Missing { what: format!("the tc command ({error}); install Debian's iproute2 package") }),
    }
}

/// Returns the tc arguments that set `limits` on `device`, as lists of
/// arguments for successive tc calls; none for a zero rate.
pub fn commands(device: &str, limits: &BandwidthLimits, mtu: u32) -> Vec<Vec<String>> {
    let mut calls: Vec<Vec<String>> = Vec::new();
    let text = |parts: &[&str]| parts.iter().map(|part| part.to_string()).collect::<Vec<String>>();
    if limits.rate == 0 {
        return calls;
    }
    let rate = format!("{}bps", limits.rate);
    let burst = format!("{}b", effective_burst(limits, mtu));
    calls.push(text(&["qdisc", "replace", "dev", device, "root", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms"]));
    calls
}

/// Applies `limits` to `device`; a zero rate removes the qdisc.
pub fn apply(device: &str, limits: &BandwidthLimits, mtu: u32) -> Result<(), NetworkError> {
    if limits.rate == 0 {
        // Deleting a qdisc that is not there fails; nothing to remove then.
        let _ = run(&["qdisc", "del", "dev", device, "root"]);
        return Ok(());
    }
    for call in commands(device, limits, mtu) {
        let args: Vec<&str> = call.iter().map(String::as_str).collect();
        run(&args)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_in_bytes_per_second() {
        let calls = commands("t1h000001", &BandwidthLimits { rate: 1 << 20, burst: 1 << 20 }, 1500);
        assert_eq!(calls.len(), 1);
        assert!(calls[0].join(" ").contains("root tbf rate 1048576bps burst 1048576b"));
    }

    #[test]
    fn small_burst_raised_and_zero_rate_sets_nothing() {
        let calls = commands("d", &BandwidthLimits { rate: 1000, burst: 1 }, 1500);
        assert!(calls[0].join(" ").contains("burst 32768b"));
        assert!(commands("d", &BandwidthLimits { rate: 0, burst: 5 }, 1500).is_empty());
    }
}
