//! Summaries of measured samples and the report: a table for people and a
//! JSON file for tools.

use serde::Serialize;

/// Order statistics of one figure's samples.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub median: f64,
    pub p90: f64,
    pub max: f64,
    pub mean: f64,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            count: sorted.len(),
            min: sorted[0],
            median: percentile(&sorted, 50.0),
            p90: percentile(&sorted, 90.0),
            max: sorted[sorted.len() - 1],
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
        })
    }
}

/// Returns the nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], percent: f64) -> f64 {
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Direction in which a figure improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Lower,
    Higher,
}

/// One performance figure of design section 7, measured for Trellis and
/// for its baseline in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub id: &'static str,
    pub what: &'static str,
    pub unit: &'static str,
    pub better: Better,
    /// The statistic the target compares (`median` or `mean`).
    pub compared: &'static str,
    /// The design's target as a ratio of Trellis to the baseline.
    pub target_ratio: f64,
    pub baseline_name: &'static str,
    /// Every sample: in the order taken, except G6's, which are grouped
    /// by client.
    pub trellis_samples: Vec<f64>,
    pub baseline_samples: Vec<f64>,
    pub trellis: Option<Summary>,
    pub baseline: Option<Summary>,
    /// Trellis divided by the baseline, on the compared statistic.
    pub ratio: Option<f64>,
    /// Whether the ratio meets the target. It is reported, never asserted,
    /// and left out in the short mode, whose samples are too few to judge.
    pub meets_target: Option<bool>,
}

impl Figure {
    pub fn new(
        id: &'static str,
        what: &'static str,
        unit: &'static str,
        better: Better,
        target_ratio: f64,
        baseline_name: &'static str,
    ) -> Figure {
        Figure {
            id,
            what,
            unit,
            better,
            compared: "median",
            target_ratio,
            baseline_name,
            trellis_samples: Vec::new(),
            baseline_samples: Vec::new(),
            trellis: None,
            baseline: None,
            ratio: None,
            meets_target: None,
        }
    }

    /// Compares the means instead of the medians (G6 is a mean).
    pub fn comparing_means(mut self) -> Figure {
        self.compared = "mean";
        self
    }

    /// Computes the summaries and the ratio, and with `judge` whether the
    /// ratio meets the target.
    pub fn finish(&mut self, judge: bool) {
        self.trellis = Summary::of(&self.trellis_samples);
        self.baseline = Summary::of(&self.baseline_samples);
        let pick = |summary: &Summary| if self.compared == "mean" { summary.mean } else { summary.median };
        if let (Some(trellis), Some(baseline)) = (&self.trellis, &self.baseline) {
            let (trellis, baseline) = (pick(trellis), pick(baseline));
            if baseline > 0.0 {
                let ratio = trellis / baseline;
                self.ratio = Some(ratio);
                self.meets_target = judge.then_some(match self.better {
                    Better::Lower => ratio <= self.target_ratio,
                    Better::Higher => ratio >= self.target_ratio,
                });
            }
        }
    }
}

/// Formats the figures as a fixed-width table.
pub fn table(figures: &[Figure]) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{:<4} {:<44} {:<8} {:>9} {:>9} {:>9} {:>9} | {:<8} {:>9} {:>7} {:>8}\n",
        "id", "figure", "unit", "min", "median", "p90", "max", "baseline", "median", "ratio", "target"
    ));
    for figure in figures {
        let cell = |value: Option<f64>| value.map_or_else(|| "-".to_string(), |value| format!("{value:.2}"));
        let trellis = figure.trellis.as_ref();
        let baseline = figure.baseline.as_ref();
        let target = match figure.better {
            Better::Lower => format!("<={:.1}", figure.target_ratio),
            Better::Higher => format!(">={:.1}", figure.target_ratio),
        };
        let verdict = match figure.meets_target {
            Some(true) => " ok",
            Some(false) => " MISS",
            None => "",
        };
        out.push_str(&format!(
            "{:<4} {:<44} {:<8} {:>9} {:>9} {:>9} {:>9} | {:<8} {:>9} {:>7} {:>8}{}\n",
            figure.id,
            figure.what,
            figure.unit,
            cell(trellis.map(|s| s.min)),
            cell(trellis.map(|s| if figure.compared == "mean" { s.mean } else { s.median })),
            cell(trellis.map(|s| s.p90)),
            cell(trellis.map(|s| s.max)),
            figure.baseline_name,
            cell(baseline.map(|s| if figure.compared == "mean" { s.mean } else { s.median })),
            cell(figure.ratio),
            target,
            verdict,
        ));
    }
    if figures.iter().any(|figure| figure.compared == "mean") {
        let means: Vec<&str> = figures.iter().filter(|figure| figure.compared == "mean").map(|figure| figure.id).collect();
        out.push_str(&format!("{}: the median columns show means, which the target compares\n", means.join(", ")));
    }
    out
}
