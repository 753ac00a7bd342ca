//! k-means on data with planted clusters: found again, the same each time.

use ndarray::Array2;
use segstream_analysis::{choose_k, standardize};

/// A small deterministic generator (SplitMix64) and Box–Muller normals.
struct Noise(u64);

impl Noise {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-12), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Three clusters in five dimensions, of unequal sizes, with their true labels.
fn planted(seed: u64) -> (Array2<f64>, Vec<usize>) {
    let centers = [[1.0, 1.0, 1.0, 10.0, 20.0], [5.0, 4.0, 2.0, 80.0, 75.0], [2.0, 5.0, 5.0, 40.0, 50.0]];
    let spread = [0.4, 0.4, 0.4, 6.0, 6.0];
    let sizes = [500, 300, 200];
    let mut noise = Noise(seed);
    let (mut rows, mut truth) = (Vec::new(), Vec::new());
    for (c, n) in sizes.iter().enumerate() {
        for _ in 0..*n {
            rows.extend((0..5).map(|j| centers[c][j] + spread[j] * noise.normal()));
            truth.push(c);
        }
    }
    (Array2::from_shape_vec((truth.len(), 5), rows).expect("shape"), truth)
}

/// The adjusted Rand index, from pair counts written out here.
fn ari(a: &[usize], b: &[usize]) -> f64 {
    let n = a.len();
    let (mut same_both, mut same_a, mut same_b) = (0u64, 0u64, 0u64);
    for i in 0..n {
        for j in i + 1..n {
            let (x, y) = (a[i] == a[j], b[i] == b[j]);
            same_both += u64::from(x && y);
            same_a += u64::from(x);
            same_b += u64::from(y);
        }
    }
    let pairs = (n * (n - 1) / 2) as f64;
    let expected = same_a as f64 * same_b as f64 / pairs;
    let max = (same_a + same_b) as f64 / 2.0;
    (same_both as f64 - expected) / (max - expected)
}

#[test]
fn kmeans_recovers_planted_clusters_and_is_deterministic_with_a_seed() {
    let (mut points, truth) = planted(42);
    standardize(&mut points);
    let (k, labels, tried) = choose_k(&points, 7).expect("clusters");
    assert_eq!(k, 3, "silhouettes: {tried:?}");
    assert_eq!(tried.iter().map(|t| t.k).collect::<Vec<_>>(), (2..=8).collect::<Vec<_>>());
    let score = ari(&labels, &truth);
    assert!(score > 0.95, "adjusted Rand index {score}");
    assert!((segstream_analysis::adjusted_rand_index(&labels, &truth) - score).abs() < 1e-9);
    // The same seed gives the same clusters.
    let (_, again, _) = choose_k(&points, 7).expect("clusters");
    assert_eq!(labels, again);
    // Another seed finds the same partition (its cluster numbers may differ).
    let (k2, other, _) = choose_k(&points, 8).expect("clusters");
    assert_eq!(k2, 3);
    assert!(ari(&other, &truth) > 0.95);
}

#[test]
fn data_without_structure_is_not_split_into_clean_clusters() {
    let mut noise = Noise(3);
    let rows: Vec<f64> = (0..600 * 5).map(|_| noise.normal()).collect();
    let mut points = Array2::from_shape_vec((600, 5), rows).expect("shape");
    standardize(&mut points);
    let (_, _, tried) = choose_k(&points, 7).expect("clusters");
    let best = tried.iter().map(|t| t.silhouette).fold(f64::MIN, f64::max);
    assert!(best < 0.3, "one Gaussian blob has no strong clusters: {tried:?}");
}
