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

/// Returns a finished figure with one sample on each side.
fn finished(better: Better, target: f64, trellis: f64, baseline: f64, judge: bool) -> Figure {
    let mut figure = Figure::new("G1", "x", "ms", better, target, "crun");
    figure.trellis_samples = vec![trellis];
    figure.baseline_samples = vec![baseline];
    figure.finish(judge);
    figure
}

#[test]
fn ratio_respects_direction() {
    let figure = finished(Better::Higher, 0.8, 90.0, 100.0, true);
    assert_eq!(figure.meets_target, Some(true));
    let figure = finished(Better::Lower, 0.5, 60.0, 100.0, true);
    assert_eq!(figure.meets_target, Some(false));
}

#[test]
fn short_mode_reports_no_verdict() {
    let figure = finished(Better::Lower, 0.5, 60.0, 100.0, false);
    assert_eq!(figure.ratio, Some(0.6));
    assert_eq!(figure.meets_target, None);
    let table = stats::table(&[figure]);
    assert!(!table.contains("MISS"), "{table}");
}
