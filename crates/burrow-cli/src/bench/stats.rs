//! Summary statistics of latency samples: nearest-rank percentiles, so p50 and p99 are always
//! samples that were actually measured (never interpolated between two).

use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub n: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// The `q`-quantile (0 < q ≤ 1) of sorted samples by the nearest-rank method: the smallest
/// sample such that at least `q` of all samples are at or below it.
pub fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "percentile of no samples");
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Summarises samples; `None` when there are none.
pub fn latency(samples: &[Duration]) -> Option<Latency> {
    if samples.is_empty() {
        return None;
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    Some(Latency {
        n: ms.len(),
        p50_ms: nearest_rank(&ms, 0.50),
        p99_ms: nearest_rank(&ms, 0.99),
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn median_of_odd_and_even_counts_is_a_measured_sample() {
        assert_eq!(latency(&ms(&[5, 1, 3])).unwrap().p50_ms, 3.0);
        // Nearest rank takes the lower middle of an even count.
        assert_eq!(latency(&ms(&[4, 1, 3, 2])).unwrap().p50_ms, 2.0);
    }

    #[test]
    fn p99_of_a_hundred_samples_is_the_ninety_ninth() {
        let samples: Vec<u64> = (1..=100).rev().collect();
        let l = latency(&ms(&samples)).unwrap();
        assert_eq!(l.p99_ms, 99.0);
        assert_eq!(l.p50_ms, 50.0);
        assert_eq!((l.min_ms, l.max_ms, l.n), (1.0, 100.0, 100));
    }

    #[test]
    fn p99_of_few_samples_is_the_slowest() {
        assert_eq!(latency(&ms(&[7, 9, 8])).unwrap().p99_ms, 9.0);
    }

    #[test]
    fn one_sample_is_every_percentile_and_none_is_nothing() {
        let l = latency(&ms(&[4])).unwrap();
        assert_eq!((l.p50_ms, l.p99_ms), (4.0, 4.0));
        assert!(latency(&[]).is_none());
    }
}
