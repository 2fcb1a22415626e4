//! Median, min and max over runs, and paired ratios against a baseline
//! measured in the same run.

use std::fmt;

/// A figure over several runs.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    /// Median of the runs.
    pub median: f64,
    /// Smallest run.
    pub min: f64,
    /// Largest run.
    pub max: f64,
}

impl Stat {
    /// The statistic of `samples`; `None` when there is none.
    pub fn of(samples: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Self {
            median: median_sorted(&v),
            min: v[0],
            max: v[v.len() - 1],
        })
    }

    /// Each run's `subject / baseline`, baseline and subject taken in the
    /// same run, so that load shared by both cancels out.
    pub fn ratio(subject: &[f64], baseline: &[f64]) -> Option<Self> {
        let r: Vec<f64> = subject.iter().zip(baseline).map(|(s, b)| s / b).collect();
        Self::of(&r)
    }

    /// `median [min–max]` with `digits` decimals.
    pub fn show(&self, digits: usize) -> String {
        format!(
            "{:.d$} [{:.d$}–{:.d$}]",
            self.median,
            self.min,
            self.max,
            d = digits
        )
    }
}

impl fmt::Display for Stat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.show(1))
    }
}

fn median_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile (0..=1) of `samples` by nearest rank; `None` when empty.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = samples.to_vec();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max_and_paired_ratio() {
        let s = Stat::of(&[3.0, 1.0, 2.0, 10.0]).expect("stat");
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        let r = Stat::ratio(&[2.0, 4.0, 9.0], &[1.0, 2.0, 3.0]).expect("ratio");
        assert_eq!((r.median, r.min, r.max), (2.0, 2.0, 3.0));
        assert!(Stat::of(&[]).is_none());
        assert_eq!(quantile(&[5.0, 1.0, 3.0, 2.0, 4.0], 0.5), Some(3.0));
        assert_eq!(quantile(&[5.0, 1.0, 3.0, 2.0, 4.0], 0.99), Some(5.0));
    }
}
