//! Unit tests of the benchmark harness's statistics, which the harness
//! binary itself can't hold (it has no test harness).

#[path = "../benches/garden/stats.rs"]
#[allow(dead_code)]
mod stats;

use stats::{Better, Figure, Summary};

#[test]
fn summary_uses_nearest_rank() {
    let summary = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]).unwrap();
    assert_eq!(summary.min, 1.0);
    assert_eq!(summary.median, 5.0);
    assert_eq!(summary.p90, 9.0);
    assert_eq!(summary.max, 10.0);
    assert_eq!(summary.mean, 5.5);
}

#[test]
fn ratio_respects_direction() {
    let mut figure = Figure::new("G8", "x", "MiB/s", Better::Higher, 0.8, "pipe");
    figure.trellis_samples = vec![90.0];
    figure.baseline_samples = vec![100.0];
    figure.finish(true);
    assert_eq!(figure.meets_target, Some(true));
    let mut figure = Figure::new("G1", "x", "ms", Better::Lower, 0.5, "crun");
    figure.trellis_samples = vec![60.0];
    figure.baseline_samples = vec![100.0];
    figure.finish(true);
    assert_eq!(figure.meets_target, Some(false));
}

#[test]
fn short_mode_reports_no_verdict() {
    let mut figure = Figure::new("G1", "x", "ms", Better::Lower, 0.5, "crun");
    figure.trellis_samples = vec![60.0];
    figure.baseline_samples = vec![100.0];
    figure.finish(false);
    assert_eq!(figure.ratio, Some(0.6));
    assert_eq!(figure.meets_target, None);
    let table = stats::table(&[figure]);
    assert!(!table.contains("MISS"), "{table}");
}
