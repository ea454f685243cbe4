//! Exact search: every stored vector scored against the query by one GEMM (our multi-threaded
//! f32 kernel; for unit vectors the score is the cosine similarity), then the best k kept in a
//! heap. 1M x 512 is 0.5 GFLOP and 2 GB read per query: memory-bound, measured in
//! docs/SEARCH.md.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use harma_kernels::raw::gemm::gemm_acc;

use crate::store::Vectors;

/// A result: the tile's id and its score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub id: i64,
    pub score: f32,
}

/// The score of every row of `v` against `q` (`v.dim` floats): `v.data @ q`.
pub fn scores(v: &Vectors, q: &[f32]) -> Vec<f32> {
    assert_eq!(q.len(), v.dim, "query size");
    let n = v.len();
    let mut y = vec![0.0f32; n];
    if n > 0 {
        gemm_acc(&mut y, &v.data, n, v.dim, 1, (q, 1, 1));
    }
    y
}

/// A candidate in the heap: ordered so that the heap's top is the worst kept one (lowest
/// score; among equal scores the later row, so ties go to the earlier row).
#[derive(PartialEq)]
struct Worst(f32, usize);

impl Eq for Worst {}

impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.total_cmp(&self.0).then(self.1.cmp(&other.1))
    }
}

impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The `k` best rows of `scores`, best first; equal scores in row order. NaN scores are
/// never kept.
pub fn top_k(scores: &[f32], k: usize) -> Vec<(usize, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut heap: BinaryHeap<Worst> = BinaryHeap::with_capacity(k + 1);
    for (i, &s) in scores.iter().enumerate() {
        if s.is_nan() {
            continue;
        }
        if heap.len() < k {
            heap.push(Worst(s, i));
        } else if s > heap.peek().expect("k > 0").0 {
            heap.pop();
            heap.push(Worst(s, i));
        }
    }
    // into_sorted_vec is ascending by Ord: best first
    heap.into_sorted_vec()
        .into_iter()
        .map(|Worst(s, i)| (i, s))
        .collect()
}

/// The `k` tiles of `v` nearest to `q`, best first.
pub fn search(v: &Vectors, q: &[f32], k: usize) -> Vec<Hit> {
    top_k(&scores(v, q), k)
        .into_iter()
        .map(|(r, score)| Hit {
            id: v.ids[r],
            score,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_a_sorted_prefix_with_ties_in_row_order() {
        let s = [0.5, 0.9, f32::NAN, 0.1, 0.9, 0.7, -1.0];
        assert_eq!(top_k(&s, 3), vec![(1, 0.9), (4, 0.9), (5, 0.7)]);
        assert_eq!(top_k(&s, 0), vec![]);
        assert_eq!(top_k(&s, 100).len(), 6);
        // against a full sort
        let s: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1013) as f32).collect();
        let mut order: Vec<usize> = (0..s.len()).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]).then(a.cmp(&b)));
        let want: Vec<(usize, f32)> = order[..25].iter().map(|&i| (i, s[i])).collect();
        assert_eq!(top_k(&s, 25), want);
    }

    #[test]
    fn scores_are_dot_products() {
        let v = Vectors {
            dim: 3,
            data: vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.6, 0.8, 0.0],
            ids: vec![10, 11, 12],
        };
        let q = [0.8, 0.6, 0.0];
        let s = scores(&v, &q);
        for (a, b) in s.iter().zip([0.8, 0.6, 0.96]) {
            assert!((a - b).abs() < 1e-6, "{s:?}");
        }
        let hits = search(&v, &q, 2);
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), vec![12, 10]);
    }
}
