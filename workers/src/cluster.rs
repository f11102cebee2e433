//! Grouping sentences by meaning, from their normalised embeddings. Pure functions of the
//! vectors: no model, no I/O.

/// A partition of the input indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clustering {
    /// Clusters, largest first (ties keep the order in which they were found); each cluster's
    /// indices in input order.
    pub clusters: Vec<Vec<usize>>,
    /// Indices that belong to no cluster of at least the minimum size, in input order.
    pub unclustered: Vec<usize>,
}

/// Cosine similarity of two L2-normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// sentence-transformers' `util.community_detection`, with the same semantics:
/// 1. every sentence with at least `min_size` neighbours (itself included) at similarity
///    `>= threshold` proposes a community: all those neighbours, most similar first;
/// 2. proposals are taken largest first (stable for equal sizes, i.e. by index of the proposing
///    sentence); members already taken are dropped from later proposals, and a proposal left
///    with fewer than `min_size` members is discarded;
/// 3. the communities are ordered largest first.
///
/// Unlike the library, members are returned in input order (so that the API's output is easy to
/// read) and sentences left out are reported rather than silently dropped.
pub fn community_detection(embeddings: &[Vec<f32>], threshold: f32, min_size: usize) -> Clustering {
    let n = embeddings.len();
    let min_size = min_size.clamp(1, n.max(1));

    let mut proposals: Vec<Vec<usize>> = Vec::new();
    for anchor in embeddings {
        let mut neighbours: Vec<(usize, f32)> = embeddings
            .iter()
            .enumerate()
            .map(|(j, other)| (j, cosine(anchor, other)))
            .filter(|&(_, s)| s >= threshold)
            .collect();
        if neighbours.len() < min_size {
            continue;
        }
        // Most similar first, like torch.topk; equal scores by index so the result is
        // deterministic.
        neighbours.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        proposals.push(neighbours.into_iter().map(|(j, _)| j).collect());
    }
    proposals.sort_by_key(|c| std::cmp::Reverse(c.len()));

    let mut taken = vec![false; n];
    let mut clusters: Vec<Vec<usize>> = Vec::new();
    for proposal in proposals {
        let fresh: Vec<usize> = proposal.into_iter().filter(|&j| !taken[j]).collect();
        if fresh.len() >= min_size {
            for &j in &fresh {
                taken[j] = true;
            }
            clusters.push(fresh);
        }
    }
    clusters.sort_by_key(|c| std::cmp::Reverse(c.len()));
    for c in &mut clusters {
        c.sort_unstable();
    }
    let unclustered = (0..n).filter(|&j| !taken[j]).collect();
    Clustering {
        clusters,
        unclustered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    fn every_index_once(c: &Clustering, n: usize) {
        let mut seen: Vec<usize> = c.clusters.iter().flatten().copied().collect();
        seen.extend(&c.unclustered);
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>());
    }

    #[test]
    fn two_clear_groups() {
        let e = vec![
            unit(&[1.0, 0.1, 0.0]),
            unit(&[0.0, 1.0, 0.1]),
            unit(&[1.0, 0.0, 0.1]),
            unit(&[0.1, 1.0, 0.0]),
            unit(&[0.9, 0.1, 0.1]),
        ];
        let c = community_detection(&e, 0.8, 1);
        assert_eq!(c.clusters, vec![vec![0, 2, 4], vec![1, 3]]);
        assert!(c.unclustered.is_empty());
    }

    #[test]
    fn min_size_leaves_small_groups_unclustered() {
        let e = vec![
            unit(&[1.0, 0.0]),
            unit(&[0.0, 1.0]),
            unit(&[1.0, 0.05]),
            unit(&[1.0, 0.02]),
        ];
        let c = community_detection(&e, 0.9, 2);
        assert_eq!(c.clusters, vec![vec![0, 2, 3]]);
        assert_eq!(c.unclustered, vec![1]);
        every_index_once(&c, 4);
    }

    #[test]
    fn overlapping_proposals_are_resolved_largest_first() {
        // 1 is close to both 0 and 2, which are not close to each other: 1's proposal {0,1,2}
        // is the largest and wins.
        let e = vec![unit(&[1.0, 0.0]), unit(&[1.0, 1.0]), unit(&[0.0, 1.0])];
        let c = community_detection(&e, 0.7, 1);
        assert_eq!(c.clusters, vec![vec![0, 1, 2]]);
    }

    #[test]
    fn duplicates_are_kept_apart_by_index() {
        let v = unit(&[0.3, 0.4, 0.5]);
        let e = vec![v.clone(), v.clone(), v];
        let c = community_detection(&e, 0.99, 1);
        assert_eq!(c.clusters, vec![vec![0, 1, 2]]);
    }

    #[test]
    fn empty_input() {
        let c = community_detection(&[], 0.5, 1);
        assert!(c.clusters.is_empty() && c.unclustered.is_empty());
    }
}
