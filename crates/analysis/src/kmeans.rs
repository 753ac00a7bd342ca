//! Discovery: k-means over the customers' standardised R, F, M, adoption
//! and health (linfa), k chosen by silhouette, clusters set against the RFM
//! segments. Seeded: the same data and seed give the same clusters.

use linfa::prelude::*;
use linfa_clustering::KMeans;
use ndarray::{Array2, ArrayView1, Axis};
use rand_xoshiro::rand_core::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use crate::model::Dataset;
use crate::report::{feature_values, FEATURES};

/// The k tried.
pub const K_RANGE: std::ops::RangeInclusive<usize> = 2..=8;
/// Points k-means is fitted on (every customer is then assigned to a cluster).
pub const FIT_SAMPLE: usize = 20_000;
/// Points the silhouette is computed on (it costs the square of this).
pub const SILHOUETTE_SAMPLE: usize = 2_000;
/// The k-means features: the first five of [`FEATURES`].
pub const KMEANS_FEATURES: usize = 5;

#[derive(Debug, Clone, Serialize)]
pub struct Discovery {
    /// The k with the best silhouette.
    pub k: usize,
    pub silhouette: Vec<SilhouetteRow>,
    pub clusters: Vec<ClusterRow>,
    /// Clusters against the segments of `group`.
    pub group: String,
    pub contingency: Vec<ContingencyRow>,
    /// Agreement of the clusters with `group`'s segments (1: the same partition, 0: chance).
    pub adjusted_rand_index: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SilhouetteRow {
    pub k: usize,
    pub silhouette: f64,
}

/// A cluster's size and the means of its raw features.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterRow {
    pub cluster: usize,
    pub customers: u64,
    pub share: f64,
    #[serde(rename = "R")]
    pub r: f64,
    #[serde(rename = "F")]
    pub f: f64,
    #[serde(rename = "M")]
    pub m: f64,
    pub adoption: f64,
    pub health: f64,
    pub mrr: f64,
    /// The segment of the compared group most of its customers are in.
    pub main_segment: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ContingencyRow {
    pub cluster: usize,
    pub segment: String,
    pub customers: u64,
}

/// `n` distinct indices below `len`, seeded (all of them when `n ≥ len`), ascending.
pub fn sample_indices(len: usize, n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    if n >= len {
        return idx;
    }
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    for i in 0..n {
        let j = i + (rng.next_u64() % (len - i) as u64) as usize;
        idx.swap(i, j);
    }
    idx.truncate(n);
    idx.sort_unstable();
    idx
}

/// Each column to mean 0 and standard deviation 1 (a constant column to 0).
pub fn standardize(points: &mut Array2<f64>) {
    for mut col in points.axis_iter_mut(Axis(1)) {
        let n = col.len().max(1) as f64;
        let mean = col.sum() / n;
        let sd = (col.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
        col.mapv_inplace(|x| if sd > 1e-12 { (x - mean) / sd } else { 0.0 });
    }
}

fn distance(a: ArrayView1<'_, f64>, b: ArrayView1<'_, f64>) -> f64 {
    a.iter().zip(b.iter()).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt()
}

/// The mean silhouette of the points listed in `sample` (against each other).
pub fn silhouette(points: &Array2<f64>, labels: &[usize], sample: &[usize], k: usize) -> f64 {
    if sample.len() < 2 {
        return 0.0;
    }
    let mut total = 0.0;
    for &i in sample {
        let (mut sum, mut n) = (vec![0.0; k], vec![0usize; k]);
        for &j in sample {
            if i != j {
                sum[labels[j]] += distance(points.row(i), points.row(j));
                n[labels[j]] += 1;
            }
        }
        let own = labels[i];
        if n[own] == 0 {
            continue; // alone in its cluster: 0 by convention
        }
        let a = sum[own] / n[own] as f64;
        let b = (0..k).filter(|&c| c != own && n[c] > 0).map(|c| sum[c] / n[c] as f64).fold(f64::INFINITY, f64::min);
        if b.is_finite() {
            let s = (b - a) / a.max(b);
            if s.is_finite() {
                total += s;
            }
        }
    }
    total / sample.len() as f64
}

/// k-means with `k` clusters fitted on (a sample of) `points`, every point
/// then assigned to its nearest centroid.
pub fn kmeans(points: &Array2<f64>, k: usize, seed: u64) -> Option<Vec<usize>> {
    let fit_rows = sample_indices(points.nrows(), FIT_SAMPLE, seed);
    let fit = points.select(Axis(0), &fit_rows);
    let rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let model = KMeans::params_with_rng(k, rng)
        .n_runs(3)
        .max_n_iterations(100)
        .tolerance(1e-4)
        .fit(&DatasetBase::from(fit))
        .ok()?;
    Some(model.predict(points).to_vec())
}

/// k-means for each k of [`K_RANGE`] (below the number of points); the one
/// with the best silhouette: (k, labels, silhouette of each k tried).
pub fn choose_k(points: &Array2<f64>, seed: u64) -> Option<(usize, Vec<usize>, Vec<SilhouetteRow>)> {
    let sample = sample_indices(points.nrows(), SILHOUETTE_SAMPLE, seed ^ 0x5111);
    let mut best: Option<(usize, Vec<usize>, f64)> = None;
    let mut tried = Vec::new();
    for k in K_RANGE.filter(|&k| k < points.nrows()) {
        let Some(labels) = kmeans(points, k, seed) else { continue };
        let s = silhouette(points, &labels, &sample, k);
        tried.push(SilhouetteRow { k, silhouette: s });
        if best.as_ref().is_none_or(|b| s > b.2 + 1e-12) {
            best = Some((k, labels, s));
        }
    }
    best.map(|(k, labels, _)| (k, labels, tried))
}

fn pairs(n: u64) -> f64 {
    (n as f64) * (n as f64 - 1.0) / 2.0
}

/// Hubert and Arabie's adjusted Rand index of two labellings of the same points.
pub fn adjusted_rand_index(a: &[usize], b: &[usize]) -> f64 {
    let mut table = std::collections::HashMap::<(usize, usize), u64>::new();
    let (mut rows, mut cols) = (std::collections::HashMap::new(), std::collections::HashMap::new());
    for (&x, &y) in a.iter().zip(b) {
        *table.entry((x, y)).or_default() += 1;
        *rows.entry(x).or_insert(0u64) += 1;
        *cols.entry(y).or_insert(0u64) += 1;
    }
    let index: f64 = table.values().map(|&n| pairs(n)).sum();
    let (sa, sb): (f64, f64) = (rows.values().map(|&n| pairs(n)).sum(), cols.values().map(|&n| pairs(n)).sum());
    let expected = sa * sb / pairs(a.len() as u64).max(1.0);
    let max = (sa + sb) / 2.0;
    if (max - expected).abs() < 1e-12 {
        return 1.0;
    }
    (index - expected) / (max - expected)
}

/// The discovery section over the dataset's snapshot; `None` with fewer than ten customers.
pub fn discover(ds: &Dataset, seed: u64) -> Option<Discovery> {
    let snap = ds.snapshot();
    if snap.len() < 10 {
        return None;
    }
    let raw: Vec<[f64; FEATURES.len()]> = snap.iter().map(feature_values).collect();
    let mut points = Array2::from_shape_fn((snap.len(), KMEANS_FEATURES), |(i, j)| raw[i][j]);
    standardize(&mut points);
    let (k, labels, silhouette) = choose_k(&points, seed)?;

    let g = ds.names.group("rfm").unwrap_or(0);
    let group = ds.names.group_name(g).to_string();
    let segments = &ds.names.groups[usize::from(g)].segments;
    let seg_of: Vec<usize> =
        snap.iter().map(|s| usize::from(s.labels.get(usize::from(g)).copied().unwrap_or(0))).collect();
    let mut table = vec![vec![0u64; segments.len()]; k];
    let mut sums = vec![[0.0; FEATURES.len()]; k];
    for ((&c, &s), v) in labels.iter().zip(&seg_of).zip(&raw) {
        if let Some(cell) = table[c].get_mut(s) {
            *cell += 1;
        }
        for (acc, x) in sums[c].iter_mut().zip(v) {
            *acc += x;
        }
    }
    let clusters = (0..k)
        .map(|c| {
            let n: u64 = table[c].iter().sum();
            let mean = |i: usize| if n > 0 { sums[c][i] / n as f64 } else { 0.0 };
            let main = table[c].iter().enumerate().max_by_key(|(i, n)| (**n, std::cmp::Reverse(*i))).map(|(i, _)| i);
            ClusterRow {
                cluster: c,
                customers: n,
                share: n as f64 / snap.len() as f64,
                r: mean(0),
                f: mean(1),
                m: mean(2),
                adoption: mean(3),
                health: mean(4),
                mrr: mean(5),
                main_segment: main.map_or_else(String::new, |i| segments[i].clone()),
            }
        })
        .collect();
    let contingency = (0..k)
        .flat_map(|c| {
            table[c]
                .iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(move |(s, n)| ContingencyRow { cluster: c, segment: segments[s].clone(), customers: *n })
                .collect::<Vec<_>>()
        })
        .collect();
    Some(Discovery {
        k,
        silhouette,
        clusters,
        group,
        contingency,
        adjusted_rand_index: adjusted_rand_index(&labels, &seg_of),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rand_index_is_one_for_the_same_partition_and_near_zero_for_chance() {
        let a = [0, 0, 1, 1, 2, 2];
        let b = [5, 5, 3, 3, 4, 4];
        assert!((adjusted_rand_index(&a, &b) - 1.0).abs() < 1e-12);
        let c = [0, 1, 0, 1, 0, 1];
        assert!(adjusted_rand_index(&a, &c) < 0.1);
    }

    #[test]
    fn samples_are_distinct_seeded_and_sorted() {
        let s = sample_indices(100, 10, 3);
        assert_eq!(s.len(), 10);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(s, sample_indices(100, 10, 3));
        assert_ne!(s, sample_indices(100, 10, 4));
        assert_eq!(sample_indices(5, 10, 3), vec![0, 1, 2, 3, 4]);
    }
}
