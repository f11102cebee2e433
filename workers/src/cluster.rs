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

/// Agglomerative clustering with average linkage on cosine similarity: start with every
/// sentence alone, repeatedly merge the two clusters whose average pairwise similarity is
/// highest, and stop when it falls below `threshold` (so `threshold` means the same as in
/// `community_detection`: "at least this similar"). Average linkage is monotonic, so this is
/// the usual dendrogram cut at cosine distance `1 - threshold` (scipy's `fcluster` with
/// `criterion="distance"`). Clusters smaller than `min_size` are reported as unclustered.
/// O(n³) in the worst case, fine for the request sizes allowed (`max_sentences`).
pub fn agglomerative(embeddings: &[Vec<f32>], threshold: f32, min_size: usize) -> Clustering {
    let n = embeddings.len();
    // f64: averages of averages over hundreds of merges must not drift.
    let mut sim: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            (0..n)
                .map(|j| cosine(&embeddings[i], &embeddings[j]) as f64)
                .collect()
        })
        .collect();
    let mut members: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
    let mut active = vec![true; n];
    loop {
        // The most similar pair of live clusters; the first such pair on ties.
        let mut best: Option<(usize, usize, f64)> = None;
        for a in (0..n).filter(|&a| active[a]) {
            for b in (a + 1..n).filter(|&b| active[b]) {
                if best.is_none_or(|(_, _, s)| sim[a][b] > s) {
                    best = Some((a, b, sim[a][b]));
                }
            }
        }
        let Some((a, b, s)) = best else { break };
        if s < threshold as f64 {
            break;
        }
        // Lance–Williams update for average linkage: the merged cluster's average similarity
        // to k is the size-weighted mean of its parts'.
        let (na, nb) = (members[a].len() as f64, members[b].len() as f64);
        for k in (0..n).filter(|&k| active[k] && k != a && k != b) {
            let merged = (na * sim[a][k] + nb * sim[b][k]) / (na + nb);
            sim[a][k] = merged;
            sim[k][a] = merged;
        }
        let moved = std::mem::take(&mut members[b]);
        members[a].extend(moved);
        active[b] = false;
    }
    let mut clusters: Vec<Vec<usize>> = Vec::new();
    let mut unclustered = Vec::new();
    for (i, mut m) in members.into_iter().enumerate() {
        if !active[i] {
            continue;
        }
        m.sort_unstable();
        if m.len() >= min_size.max(1) {
            clusters.push(m);
        } else {
            unclustered.extend(m);
        }
    }
    // Largest first; equal sizes by their first sentence.
    clusters.sort_by(|x, y| y.len().cmp(&x.len()).then(x[0].cmp(&y[0])));
    unclustered.sort_unstable();
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
        let c = agglomerative(&[], 0.5, 1);
        assert!(c.clusters.is_empty() && c.unclustered.is_empty());
    }

    #[test]
    fn agglomerative_uses_the_average_not_the_closest_pair() {
        // 0-1 and 1-2 are each close, 0-2 is far: single linkage would chain all three;
        // average linkage merges one pair, whose average similarity to the third is too low.
        let e = vec![unit(&[1.0, 0.0]), unit(&[1.0, 1.0]), unit(&[0.0, 1.0])];
        // cos(0,1) = cos(1,2) = 0.707, cos(0,2) = 0: the merged pair's average to the
        // third is 0.354.
        let c = agglomerative(&e, 0.6, 1);
        assert_eq!(c.clusters, vec![vec![0, 1], vec![2]]);
        let c = agglomerative(&e, 0.3, 1);
        assert_eq!(c.clusters, vec![vec![0, 1, 2]]);
        every_index_once(&c, 3);
    }

    #[test]
    fn agglomerative_two_groups_and_min_size() {
        let e = vec![
            unit(&[1.0, 0.1, 0.0]),
            unit(&[0.0, 1.0, 0.1]),
            unit(&[1.0, 0.0, 0.1]),
            unit(&[0.1, 1.0, 0.0]),
            unit(&[0.9, 0.1, 0.1]),
            unit(&[0.0, 0.0, 1.0]),
        ];
        let c = agglomerative(&e, 0.8, 1);
        assert_eq!(c.clusters, vec![vec![0, 2, 4], vec![1, 3], vec![5]]);
        let c = agglomerative(&e, 0.8, 2);
        assert_eq!(c.clusters, vec![vec![0, 2, 4], vec![1, 3]]);
        assert_eq!(c.unclustered, vec![5]);
    }

    #[test]
    fn higher_thresholds_never_merge_more() {
        let e: Vec<Vec<f32>> = (0..12)
            .map(|i| {
                unit(&[
                    (i as f32).sin(),
                    (i as f32 * 0.7).cos(),
                    0.3 + (i % 3) as f32,
                ])
            })
            .collect();
        let mut last = 0;
        for t in [0.2, 0.4, 0.6, 0.8, 0.95, 1.0] {
            for c in [agglomerative(&e, t, 1), community_detection(&e, t, 1)] {
                every_index_once(&c, 12);
            }
            let count = agglomerative(&e, t, 1).clusters.len();
            assert!(
                count >= last,
                "threshold {t}: {count} clusters after {last}"
            );
            last = count;
        }
    }

    /// Random unit vectors: the clustering's properties hold for any input, not just
    /// sentences.
    fn vectors() -> impl proptest::strategy::Strategy<Value = Vec<Vec<f32>>> {
        use proptest::prelude::*;
        (2usize..6).prop_flat_map(|dim| {
            proptest::collection::vec(
                proptest::collection::vec(-1.0f32..1.0, dim).prop_map(|v| {
                    // Away from the zero vector, which has no direction.
                    let v: Vec<f32> = v.iter().map(|x| x + 0.01).collect();
                    unit(&v)
                }),
                1..40,
            )
        })
    }

    /// The output rules of both algorithms: every index exactly once; clusters of at least
    /// `min_size`, largest first, members in input order; unclustered in input order.
    fn well_formed(c: &Clustering, n: usize, min_size: usize) {
        every_index_once(c, n);
        for cluster in &c.clusters {
            assert!(cluster.len() >= min_size.max(1));
            assert!(cluster.windows(2).all(|w| w[0] < w[1]), "{cluster:?}");
        }
        assert!(c.clusters.windows(2).all(|w| w[0].len() >= w[1].len()));
        assert!(c.unclustered.windows(2).all(|w| w[0] < w[1]));
    }

    proptest::proptest! {
        #[test]
        fn prop_both_algorithms_partition_the_input(
            e in vectors(),
            threshold in -1.0f32..1.0,
            min_size in 1usize..5,
        ) {
            // community_detection caps the minimum at the input size, as sentence-transformers
            // does (`min(min_community_size, len(embeddings))`).
            well_formed(&community_detection(&e, threshold, min_size), e.len(), min_size.min(e.len()));
            well_formed(&agglomerative(&e, threshold, min_size), e.len(), min_size);
        }

        /// A higher threshold never merges more: every agglomerative cluster at the higher
        /// threshold lies inside one cluster at the lower (the same dendrogram, cut lower).
        #[test]
        fn prop_agglomerative_thresholds_are_monotonic(
            e in vectors(),
            a in -1.0f32..1.0,
            b in -1.0f32..1.0,
        ) {
            let (low, high) = if a <= b { (a, b) } else { (b, a) };
            let coarse = agglomerative(&e, low, 1);
            let fine = agglomerative(&e, high, 1);
            proptest::prop_assert!(fine.clusters.len() >= coarse.clusters.len());
            for f in &fine.clusters {
                proptest::prop_assert!(
                    coarse.clusters.iter().any(|c| f.iter().all(|i| c.contains(i))),
                    "{:?} at {} is split across clusters at {}", f, high, low
                );
            }
        }

        /// Community detection: a community is the unclaimed part of one anchor's
        /// neighbourhood, so some sentence (the anchor, possibly claimed by a larger community
        /// first) is at least `threshold` similar to every member; and with a threshold no
        /// pair reaches, nothing is grouped.
        #[test]
        fn prop_community_members_reach_the_threshold(
            e in vectors(),
            threshold in -1.0f32..1.0,
        ) {
            let c = community_detection(&e, threshold, 1);
            for cluster in &c.clusters {
                let anchored = (0..e.len()).any(|a| {
                    cluster.iter().all(|&j| cosine(&e[a], &e[j]) >= threshold)
                });
                proptest::prop_assert!(anchored, "no anchor within {} in {:?}", threshold, cluster);
            }
            let apart = community_detection(&e, 1.5, 1);
            proptest::prop_assert!(apart.clusters.is_empty());
        }
    }
}
