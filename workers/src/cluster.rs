//! Grouping sentences by meaning, from their normalised embeddings. Pure functions of the
//! vectors: no model, no I/O.
//!
//! Both algorithms work on one `n × dim` matrix of unit vectors and never hold the `n × n`
//! similarities of community detection: those are computed a block of rows at a time (a matrix
//! product of the block against every row), as sentence-transformers does in batches of 1024.
//! The work is split into steps (`Clusterer::step`) so that a worker can run other requests'
//! forward passes between them, report progress and stop when the client has gone.

use crate::model::kernels::{matmul, MatRef};

/// A partition of the input indices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clustering {
    /// Clusters, largest first (ties keep the order in which they were found); each cluster's
    /// indices in input order.
    pub clusters: Vec<Vec<usize>>,
    /// Indices that belong to no cluster of at least the minimum size, in input order.
    pub unclustered: Vec<usize>,
}

/// Unit vectors as the rows of one row-major matrix.
pub struct Vectors {
    data: Vec<f32>,
    rows: usize,
    dim: usize,
}

impl Vectors {
    /// Rows of equal length (the model's dimension), each freed once copied, so that a large
    /// request does not hold its vectors twice.
    pub fn from_rows(rows: Vec<Vec<f32>>) -> Vectors {
        let dim = rows.first().map_or(0, Vec::len);
        let count = rows.len();
        let mut data = Vec::with_capacity(count * dim);
        for r in rows {
            assert_eq!(r.len(), dim, "vectors of different lengths");
            data.extend_from_slice(&r);
        }
        Vectors {
            data,
            rows: count,
            dim,
        }
    }

    pub fn len(&self) -> usize {
        self.rows
    }

    pub fn is_empty(&self) -> bool {
        self.rows == 0
    }

    fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }

    /// Bytes held: what a request's vectors cost while it is clustered.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// `out[r * n + j] = <row first + r, row j>` for the `count` rows from `first`.
    fn similarities(&self, first: usize, count: usize, out: &mut [f32]) {
        let n = self.rows;
        let d = self.dim;
        let block = MatRef::new(&self.data[first * d..(first + count) * d], count, d, d, 1);
        // All rows, transposed by strides: column j is row j.
        let all = MatRef::new(&self.data, d, n, 1, d);
        matmul(
            &mut out[..count * n],
            n,
            1,
            false,
            block,
            all,
            1.0,
            rayon::current_num_threads(),
        );
    }
}

/// How `POST /cluster` groups sentences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// sentence-transformers' `util.community_detection` (the default).
    Community,
    /// Average-linkage agglomerative clustering on cosine similarity.
    Agglomerative,
}

impl Algorithm {
    /// The API's names, the default first.
    pub const NAMES: &'static [&'static str] = &["community", "agglomerative"];

    pub fn parse(name: &str) -> Option<Algorithm> {
        match name {
            "community" => Some(Algorithm::Community),
            "agglomerative" => Some(Algorithm::Agglomerative),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Community => "community",
            Algorithm::Agglomerative => "agglomerative",
        }
    }

    /// Group unit vectors at once (the steps of `Clusterer` run back to back): pairs at
    /// cosine similarity >= `threshold`, groups of at least `min_size`.
    pub fn run(self, vectors: Vectors, threshold: f32, min_size: usize) -> Clustering {
        let mut clusterer = Clusterer::new(self, vectors, threshold, min_size);
        while !clusterer.step() {}
        clusterer.finish()
    }
}

/// Cosine similarity of two L2-normalised vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One clustering, run in bounded steps.
pub enum Clusterer {
    Community(CommunityDetection),
    /// Agglomerative clustering runs in one step: its similarities must all be held anyway.
    Agglomerative {
        vectors: Vectors,
        threshold: f32,
        min_size: usize,
        done: Option<Clustering>,
    },
}

impl Clusterer {
    pub fn new(algorithm: Algorithm, vectors: Vectors, threshold: f32, min_size: usize) -> Self {
        match algorithm {
            Algorithm::Community => {
                Clusterer::Community(CommunityDetection::new(vectors, threshold, min_size))
            }
            Algorithm::Agglomerative => Clusterer::Agglomerative {
                vectors,
                threshold,
                min_size,
                done: None,
            },
        }
    }

    /// One bounded piece of work; true once there is nothing left but `finish`.
    pub fn step(&mut self) -> bool {
        match self {
            Clusterer::Community(c) => c.step(),
            Clusterer::Agglomerative {
                vectors,
                threshold,
                min_size,
                done,
            } => {
                if done.is_none() {
                    *done = Some(agglomerative(vectors, *threshold, *min_size));
                }
                true
            }
        }
    }

    /// (rows compared with every other, rows): for progress reports.
    pub fn progress(&self) -> (usize, usize) {
        match self {
            Clusterer::Community(c) => (c.next_row, c.vectors.len()),
            Clusterer::Agglomerative { vectors, done, .. } => {
                (done.as_ref().map_or(0, |_| vectors.len()), vectors.len())
            }
        }
    }

    /// The clustering, once `step` has returned true.
    pub fn finish(self) -> Clustering {
        match self {
            Clusterer::Community(c) => c.finish(),
            Clusterer::Agglomerative {
                vectors,
                threshold,
                min_size,
                done,
            } => done.unwrap_or_else(|| agglomerative(&vectors, threshold, min_size)),
        }
    }
}

/// Similarities computed per step: rows × n of them, at most this many (16 MiB of f32), and at
/// least one row.
const BLOCK_SIMILARITIES: usize = 1 << 22;

/// Members of proposed communities kept between the two phases, at most this many (64 MiB of
/// u32); the members of proposals past it are computed again if they are needed.
const KEPT_MEMBERS: usize = 1 << 24;

/// sentence-transformers' `util.community_detection` (its current code, 6.x), step by step:
/// 1. every sentence with at least `min_size` sentences (itself included) at similarity
///    `>= threshold` proposes a community around itself, its centre: all those sentences;
/// 2. proposals are taken largest first (stable: equal sizes by centre index); a proposal
///    whose centre is already in a community is skipped; otherwise its members not yet in a
///    community, if at least `min_size` of them, form a community with the centre;
/// 3. the communities are ordered largest first (stable).
///
/// With fewer sentences than `min_size`, nothing is grouped (the library returns no
/// community). Unlike the library, members are returned in input order (so that the API's
/// output is easy to read) and sentences left out are reported rather than dropped.
pub struct CommunityDetection {
    vectors: Vectors,
    threshold: f32,
    min_size: usize,
    /// Rows compared with every row so far.
    next_row: usize,
    /// Rows per step.
    block: usize,
    similarities: Vec<f32>,
    proposals: Vec<Proposal>,
    /// The members of the proposals that have `members: Some(..)`.
    kept: Vec<u32>,
    /// Most members kept (`KEPT_MEMBERS`; lowered by tests to exercise recomputing).
    kept_limit: usize,
}

struct Proposal {
    centre: usize,
    size: usize,
    /// Where its members start in `kept`, if they were kept.
    members: Option<usize>,
}

impl CommunityDetection {
    pub fn new(vectors: Vectors, threshold: f32, min_size: usize) -> Self {
        let n = vectors.len();
        let block = (BLOCK_SIMILARITIES / n.max(1)).clamp(1, n.max(1));
        let min_size = min_size.max(1);
        CommunityDetection {
            // Fewer sentences than the minimum: no proposal can reach it.
            next_row: if n < min_size { n } else { 0 },
            vectors,
            threshold,
            min_size,
            block,
            similarities: Vec::new(),
            proposals: Vec::new(),
            kept: Vec::new(),
            kept_limit: KEPT_MEMBERS,
        }
    }

    /// Compare the next block of rows with every row and note their proposals. True when
    /// every row has been compared.
    pub fn step(&mut self) -> bool {
        let n = self.vectors.len();
        if self.next_row >= n {
            self.similarities = Vec::new();
            return true;
        }
        let first = self.next_row;
        let count = self.block.min(n - first);
        self.similarities.resize(self.block * n, 0.0);
        self.vectors
            .similarities(first, count, &mut self.similarities);
        for r in 0..count {
            let row = &self.similarities[r * n..(r + 1) * n];
            let size = row.iter().filter(|&&s| s >= self.threshold).count();
            if size < self.min_size {
                continue;
            }
            let members = (self.kept.len() + size <= self.kept_limit).then(|| {
                let start = self.kept.len();
                self.kept.extend(
                    row.iter()
                        .enumerate()
                        .filter(|(_, &s)| s >= self.threshold)
                        .map(|(j, _)| j as u32),
                );
                start
            });
            self.proposals.push(Proposal {
                centre: first + r,
                size,
                members,
            });
        }
        self.next_row = first + count;
        self.next_row >= n
    }

    /// Resolve the proposals into communities (phase 2; cheap unless members were not kept).
    pub fn finish(mut self) -> Clustering {
        while !self.step() {}
        let n = self.vectors.len();
        let mut proposals = std::mem::take(&mut self.proposals);
        // Largest first; sort_by_key is stable, as Python's sorted(..., reverse=True) is.
        proposals.sort_by_key(|p| std::cmp::Reverse(p.size));
        let mut used = vec![false; n];
        let mut clusters: Vec<Vec<usize>> = Vec::new();
        let mut recomputed: Vec<u32> = Vec::new();
        for p in &proposals {
            if used[p.centre] {
                continue;
            }
            let members: &[u32] = match p.members {
                Some(start) => &self.kept[start..start + p.size],
                None => {
                    recomputed.clear();
                    let centre = self.vectors.row(p.centre);
                    recomputed.extend(
                        (0..n)
                            .filter(|&j| cosine(centre, self.vectors.row(j)) >= self.threshold)
                            .map(|j| j as u32),
                    );
                    &recomputed
                }
            };
            let fresh = members.iter().filter(|&&j| !used[j as usize]).count();
            if fresh < self.min_size {
                continue;
            }
            let mut community = vec![p.centre];
            community.extend(
                members
                    .iter()
                    .map(|&j| j as usize)
                    .filter(|&j| !used[j] && j != p.centre),
            );
            for &j in &community {
                used[j] = true;
            }
            clusters.push(community);
        }
        clusters.sort_by_key(|c| std::cmp::Reverse(c.len()));
        for c in &mut clusters {
            c.sort_unstable();
        }
        let unclustered = (0..n).filter(|&j| !used[j]).collect();
        Clustering {
            clusters,
            unclustered,
        }
    }
}

/// Community detection at once (`CommunityDetection`'s steps back to back).
pub fn community_detection(vectors: Vectors, threshold: f32, min_size: usize) -> Clustering {
    CommunityDetection::new(vectors, threshold, min_size).finish()
}

/// Bytes agglomerative clustering holds for `n` sentences: one f64 per pair.
pub fn agglomerative_bytes(n: usize) -> usize {
    n * n.saturating_sub(1) / 2 * 8
}

/// Agglomerative clustering with average linkage on cosine similarity: start with every
/// sentence alone, merge the two clusters whose average pairwise similarity is highest, and
/// stop when it falls below `threshold` (so `threshold` means the same as in
/// `community_detection`: "at least this similar"): the dendrogram cut at cosine distance
/// `1 - threshold` (scipy's `fcluster` with `criterion="distance"`). Clusters smaller than
/// `min_size` are reported as unclustered.
///
/// Found with the nearest-neighbour chain, which gives the same merges as the greedy
/// "most similar pair first" for average linkage (it is reducible: a merged cluster is never
/// more similar to a third than the closer of its parts) in O(n²) time instead of O(n³), and
/// the pair similarities in f64 (averages of averages must not drift): `agglomerative_bytes`.
pub fn agglomerative(vectors: &Vectors, threshold: f32, min_size: usize) -> Clustering {
    let n = vectors.len();
    let mut sim = PairSimilarities::new(vectors);
    let threshold = threshold as f64;
    let mut members: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
    // Still able to merge with another cluster at `threshold` or above.
    let mut active = vec![true; n];
    let mut chain: Vec<usize> = Vec::new();
    let mut start = 0;
    loop {
        if chain.is_empty() {
            while start < n && !active[start] {
                start += 1;
            }
            if start == n {
                break;
            }
            chain.push(start);
        }
        let a = chain[chain.len() - 1];
        let previous = chain.len().checked_sub(2).map(|i| chain[i]);
        // a's most similar active cluster; the previous link on ties, so the chain ends.
        let mut best = previous.map(|p| (p, sim.get(a, p)));
        for k in (0..n).filter(|&k| active[k] && k != a && Some(k) != previous) {
            let s = sim.get(a, k);
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((k, s));
            }
        }
        match best {
            // Nothing close enough for a; along the chain similarities only grow, so nothing
            // is for any link of it either: all of them are final.
            None => {
                active[a] = false;
                chain.clear();
            }
            Some((_, s)) if s < threshold => {
                for &c in &chain {
                    active[c] = false;
                }
                chain.clear();
            }
            Some((b, _)) if Some(b) == previous => {
                chain.truncate(chain.len() - 2);
                let (keep, gone) = (a.min(b), a.max(b));
                // Lance–Williams for average linkage: the merged cluster's similarity to k is
                // the size-weighted mean of its parts'.
                let (nk, ng) = (members[keep].len() as f64, members[gone].len() as f64);
                for k in (0..n).filter(|&k| active[k] && k != keep && k != gone) {
                    let merged = (nk * sim.get(keep, k) + ng * sim.get(gone, k)) / (nk + ng);
                    sim.set(keep, k, merged);
                }
                let moved = std::mem::take(&mut members[gone]);
                members[keep].extend(moved);
                active[gone] = false;
            }
            Some((b, _)) => chain.push(b),
        }
    }
    let mut clusters: Vec<Vec<usize>> = Vec::new();
    let mut unclustered = Vec::new();
    for mut m in members.into_iter().filter(|m| !m.is_empty()) {
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

/// The similarity of every pair (i < j), condensed: n(n-1)/2 values.
struct PairSimilarities {
    values: Vec<f64>,
    n: usize,
}

impl PairSimilarities {
    fn new(vectors: &Vectors) -> Self {
        let n = vectors.len();
        let mut values = vec![0.0; agglomerative_bytes(n) / 8];
        let block = (BLOCK_SIMILARITIES / n.max(1)).clamp(1, n.max(1));
        let mut rows = vec![0.0f32; block * n];
        let mut first = 0;
        while first < n {
            let count = block.min(n - first);
            vectors.similarities(first, count, &mut rows);
            for r in 0..count {
                let i = first + r;
                let at = Self::index(n, i, i + 1);
                for (v, &s) in values[at..at + (n - i - 1)]
                    .iter_mut()
                    .zip(&rows[r * n + i + 1..(r + 1) * n])
                {
                    *v = s as f64;
                }
            }
            first += count;
        }
        PairSimilarities { values, n }
    }

    /// Position of (i, j), i < j.
    fn index(n: usize, i: usize, j: usize) -> usize {
        i * (2 * n - i - 1) / 2 + (j - i - 1)
    }

    fn get(&self, a: usize, b: usize) -> f64 {
        let (i, j) = (a.min(b), a.max(b));
        self.values[Self::index(self.n, i, j)]
    }

    fn set(&mut self, a: usize, b: usize, value: f64) {
        let (i, j) = (a.min(b), a.max(b));
        self.values[Self::index(self.n, i, j)] = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(rows: &[Vec<f32>]) -> Vectors {
        Vectors::from_rows(rows.to_vec())
    }

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
        let c = community_detection(v(&e), 0.8, 1);
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
        let c = community_detection(v(&e), 0.9, 2);
        assert_eq!(c.clusters, vec![vec![0, 2, 3]]);
        assert_eq!(c.unclustered, vec![1]);
        every_index_once(&c, 4);
    }

    #[test]
    fn overlapping_proposals_are_resolved_largest_first() {
        // 1 is close to both 0 and 2, which are not close to each other: 1's proposal {0,1,2}
        // is the largest and wins.
        let e = vec![unit(&[1.0, 0.0]), unit(&[1.0, 1.0]), unit(&[0.0, 1.0])];
        let c = community_detection(v(&e), 0.7, 1);
        assert_eq!(c.clusters, vec![vec![0, 1, 2]]);
    }

    #[test]
    fn duplicates_are_kept_apart_by_index() {
        let same = unit(&[0.3, 0.4, 0.5]);
        let e = vec![same.clone(), same.clone(), same];
        let c = community_detection(v(&e), 0.99, 1);
        assert_eq!(c.clusters, vec![vec![0, 1, 2]]);
    }

    #[test]
    fn empty_input() {
        let c = community_detection(v(&[]), 0.5, 1);
        assert!(c.clusters.is_empty() && c.unclustered.is_empty());
        let c = agglomerative(&v(&[]), 0.5, 1);
        assert!(c.clusters.is_empty() && c.unclustered.is_empty());
    }

    #[test]
    fn agglomerative_uses_the_average_not_the_closest_pair() {
        // 0-1 and 1-2 are each close, 0-2 is far: single linkage would chain all three;
        // average linkage merges one pair, whose average similarity to the third is too low.
        let e = vec![unit(&[1.0, 0.0]), unit(&[1.0, 1.0]), unit(&[0.0, 1.0])];
        // cos(0,1) = cos(1,2) = 0.707, cos(0,2) = 0: the merged pair's average to the
        // third is 0.354.
        let c = agglomerative(&v(&e), 0.6, 1);
        assert_eq!(c.clusters, vec![vec![0, 1], vec![2]]);
        let c = agglomerative(&v(&e), 0.3, 1);
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
        let c = agglomerative(&v(&e), 0.8, 1);
        assert_eq!(c.clusters, vec![vec![0, 2, 4], vec![1, 3], vec![5]]);
        let c = agglomerative(&v(&e), 0.8, 2);
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
            for c in [
                agglomerative(&v(&e), t, 1),
                community_detection(v(&e), t, 1),
            ] {
                every_index_once(&c, 12);
            }
            let count = agglomerative(&v(&e), t, 1).clusters.len();
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

    /// sentence-transformers' `community_detection`, line by line, on a full similarity
    /// matrix: the oracle for the block-wise version.
    fn community_as_the_library_writes_it(
        e: &[Vec<f32>],
        threshold: f32,
        min_size: usize,
    ) -> Vec<Vec<usize>> {
        let n = e.len();
        if n < min_size {
            return Vec::new();
        }
        let sims = PairSimilarities::new(&v(e));
        let sim = |i: usize, j: usize| {
            if i == j {
                cosine(&e[i], &e[i]) as f64
            } else {
                sims.get(i, j)
            }
        };
        let mut extracted: Vec<(usize, Vec<usize>)> = Vec::new();
        for i in 0..n {
            let members: Vec<usize> = (0..n).filter(|&j| sim(i, j) as f32 >= threshold).collect();
            if members.len() >= min_size {
                extracted.push((i, members));
            }
        }
        extracted.sort_by_key(|(_, m)| std::cmp::Reverse(m.len()));
        let mut used = vec![false; n];
        let mut unique: Vec<Vec<usize>> = Vec::new();
        for (centre, community) in extracted {
            if used[centre] {
                continue;
            }
            let fresh: Vec<usize> = community.into_iter().filter(|&j| !used[j]).collect();
            if fresh.len() >= min_size {
                let mut c = vec![centre];
                c.extend(fresh.into_iter().filter(|&j| j != centre));
                for &j in &c {
                    used[j] = true;
                }
                unique.push(c);
            }
        }
        unique.sort_by_key(|c| std::cmp::Reverse(c.len()));
        for c in &mut unique {
            c.sort_unstable();
        }
        unique
    }

    /// The greedy definition of average linkage (merge the most similar pair, repeat): the
    /// oracle for the nearest-neighbour chain.
    fn agglomerative_by_definition(e: &[Vec<f32>], threshold: f32) -> Vec<Vec<usize>> {
        let n = e.len();
        let pairs = PairSimilarities::new(&v(e));
        let sim: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| if i == j { 0.0 } else { pairs.get(i, j) })
                    .collect()
            })
            .collect();
        let mut sim = sim;
        let mut members: Vec<Vec<usize>> = (0..n).map(|i| vec![i]).collect();
        let mut active = vec![true; n];
        loop {
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
        let mut clusters: Vec<Vec<usize>> = members
            .into_iter()
            .filter(|m| !m.is_empty())
            .map(|mut m| {
                m.sort_unstable();
                m
            })
            .collect();
        clusters.sort_by(|x, y| y.len().cmp(&x.len()).then(x[0].cmp(&y[0])));
        clusters
    }

    #[test]
    fn fewer_sentences_than_the_minimum_form_no_community() {
        let e = vec![unit(&[1.0, 0.0]), unit(&[1.0, 0.01])];
        let c = community_detection(v(&e), 0.5, 3);
        assert!(c.clusters.is_empty());
        assert_eq!(c.unclustered, vec![0, 1]);
    }

    #[test]
    fn a_proposal_whose_centre_is_taken_is_skipped() {
        // Points on a circle, neighbours within 0.3 rad. The largest proposal (centred on
        // 0.2) takes 0..=4; the next, centred on 0.69, takes {5, 6, 7}. Keeping the unclaimed
        // members of a proposal whose centre was taken instead (what forkserve did before)
        // gives {5, 6} and leaves 7 out. Recorded from sentence-transformers 6.2.
        let angles = [0.06f32, 0.07, 0.11, 0.2, 0.45, 0.54, 0.69, 0.8];
        let e: Vec<Vec<f32>> = angles.iter().map(|a| vec![a.cos(), a.sin()]).collect();
        let threshold = 0.3f32.cos();
        let c = community_detection(v(&e), threshold, 2);
        assert_eq!(c.clusters, vec![vec![0, 1, 2, 3, 4], vec![5, 6, 7]]);
        assert_eq!(
            c.clusters,
            community_as_the_library_writes_it(&e, threshold, 2)
        );
    }

    proptest::proptest! {
        /// Block-wise community detection, with members kept or recomputed, equals the
        /// library's algorithm run on the whole similarity matrix.
        #[test]
        fn prop_community_detection_is_the_librarys(
            e in vectors(),
            threshold in -1.0f32..1.0,
            min_size in 1usize..5,
            keep in proptest::bool::ANY,
        ) {
            let expected = community_as_the_library_writes_it(&e, threshold, min_size);
            let mut detection = CommunityDetection::new(v(&e), threshold, min_size);
            detection.block = 3; // several steps
            if !keep {
                detection.kept_limit = 0; // every member list computed again
            }
            let got = detection.finish();
            proptest::prop_assert_eq!(&got.clusters, &expected);
            well_formed(&got, e.len(), min_size);
        }

        /// The nearest-neighbour chain merges what the greedy definition merges.
        #[test]
        fn prop_agglomerative_chain_equals_the_definition(
            e in vectors(),
            threshold in -1.0f32..1.0,
        ) {
            let got = agglomerative(&v(&e), threshold, 1);
            proptest::prop_assert_eq!(got.clusters, agglomerative_by_definition(&e, threshold));
        }

        #[test]
        fn prop_both_algorithms_partition_the_input(
            e in vectors(),
            threshold in -1.0f32..1.0,
            min_size in 1usize..5,
        ) {
            well_formed(&community_detection(v(&e), threshold, min_size), e.len(), min_size);
            well_formed(&agglomerative(&v(&e), threshold, min_size), e.len(), min_size);
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
            let coarse = agglomerative(&v(&e), low, 1);
            let fine = agglomerative(&v(&e), high, 1);
            proptest::prop_assert!(fine.clusters.len() >= coarse.clusters.len());
            for f in &fine.clusters {
                proptest::prop_assert!(
                    coarse.clusters.iter().any(|c| f.iter().all(|i| c.contains(i))),
                    "{:?} at {} is split across clusters at {}", f, high, low
                );
            }
        }

        /// Community detection: a community is built around its centre, so one member (the
        /// centre) is at least `threshold` similar to every other member; and with a
        /// threshold no pair reaches, nothing is grouped.
        #[test]
        fn prop_community_members_reach_the_threshold(
            e in vectors(),
            threshold in -1.0f32..1.0,
        ) {
            let c = community_detection(v(&e), threshold, 1);
            for cluster in &c.clusters {
                let centred = cluster.iter().any(|&a| {
                    cluster.iter().all(|&j| j == a || cosine(&e[a], &e[j]) >= threshold - 1e-6)
                });
                proptest::prop_assert!(centred, "no centre within {} in {:?}", threshold, cluster);
            }
            let apart = community_detection(v(&e), 1.5, 1);
            proptest::prop_assert!(apart.clusters.is_empty());
        }
    }
}
