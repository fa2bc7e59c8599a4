//! Learning: features and hindsight labels from profiles, a time split, a cost-weighted random
//! forest per target (linfa's decision trees on bootstrap samples and feature subsets, leaves
//! relabelled by replay cost, a majority vote), honest evaluation against the baselines, ONNX
//! export.
//!
//! Follows linfa's contract: unchecked params → checked params → `fit` → a model with `predict`.

use linfa::prelude::*;
use linfa_trees::DecisionTree;
use ndarray::{Array1, Array2, ArrayView2, s};
use polars::prelude::{Column, DataFrame, PolarsError};
use serde::Serialize;
use tuning::cost::{CostWeights, oracle, replay_cost};
use tuning::onnx::{TargetModel, Tree, TreeNode};
use tuning::{Profile, Settings, Target};

/// Training parameters (unchecked).
#[derive(Debug, Clone)]
pub struct TrainParams {
    /// Trees per target. One tree sees every training row and every feature; each tree of a
    /// forest is fitted on a bootstrap sample of the rows (drawn with replacement, as many as
    /// there are) and may split on a random share of the features ([`Self::feature_share`]),
    /// and the forest answers the class most of its trees answer.
    pub trees: usize,
    /// Share of the features each tree of a forest may split on (at least one).
    pub feature_share: f64,
    /// Deepest tree.
    pub max_depth: usize,
    /// Least total row weight a leaf may hold (row weights run from 1 to 16). Within one
    /// context the aggregate features drift while a window is read (the message rate of a
    /// service's earlier profiles moved between 0.32 and 0.54 a second in one benchmark
    /// window), and a tree allowed leaves of a single row split on that drift to carve out the
    /// light rows around each heavy one; serving sees the settled value and can land in such a
    /// leaf. A leaf of at least this weight keeps the context's weighted majority.
    pub min_leaf_weight: f32,
    /// Share of rows (the latest) held out for evaluation.
    pub test_share: f64,
    /// Least rows a class needs in the training part (else the target is refused).
    pub min_class_rows: usize,
    /// Cost weights of the labels.
    pub weights: CostWeights,
    /// Bootstrap resamples for the confidence intervals.
    pub bootstrap: usize,
    /// Seed of the bootstrap.
    pub seed: u64,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            trees: 25,
            feature_share: 0.5,
            max_depth: 8,
            min_leaf_weight: 32.0,
            test_share: 0.2,
            min_class_rows: 3,
            weights: CostWeights::default(),
            bootstrap: 200,
            seed: 7,
        }
    }
}

/// Why parameters or data were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LearnError {
    /// A parameter out of range.
    #[error("{0}")]
    Param(String),
    /// Too few rows to split or to learn from.
    #[error("{0}")]
    Data(String),
}

/// Checked parameters.
#[derive(Debug, Clone)]
pub struct CheckedParams(TrainParams);

impl TrainParams {
    /// Validate.
    pub fn check(self) -> Result<CheckedParams, LearnError> {
        if self.max_depth == 0 || self.max_depth > 32 {
            return Err(LearnError::Param(format!(
                "max_depth = {} must be between 1 and 32",
                self.max_depth
            )));
        }
        if !(1..=256).contains(&self.trees) {
            return Err(LearnError::Param(format!(
                "trees = {} must be between 1 and 256",
                self.trees
            )));
        }
        if !(self.feature_share > 0.0 && self.feature_share <= 1.0) {
            return Err(LearnError::Param(format!(
                "feature_share = {} must be above 0 and at most 1",
                self.feature_share
            )));
        }
        if !(self.min_leaf_weight.is_finite() && self.min_leaf_weight >= 1.0) {
            return Err(LearnError::Param(format!(
                "min_leaf_weight = {} must be a number of at least 1",
                self.min_leaf_weight
            )));
        }
        if !(0.05..=0.5).contains(&self.test_share) {
            return Err(LearnError::Param(format!(
                "test_share = {} must be between 0.05 and 0.5",
                self.test_share
            )));
        }
        Ok(CheckedParams(self))
    }
}

/// The training table: one row per profile, in start order.
///
/// `table` is a polars DataFrame with `started_at` (µs since the epoch), `service`, every
/// feature (`f_<name>`) and, per target, the class label (`y_<target>`) and the row weight
/// (`w_<target>`: how much getting the row wrong costs, the regret of the worst value). The trainer
/// fits and evaluates on this table and `trainer export` writes it, so a notebook reads exactly
/// what the model learned from.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The table.
    pub table: DataFrame,
    /// The table's feature columns as a row-major matrix (rows × `tuning::feature_len()`): what
    /// linfa fits, what the exported trees and ONNX Runtime are checked on.
    pub x: Array2<f32>,
    /// The profiles, row for row (the replay costs need their histograms).
    pub profiles: Vec<Profile>,
    /// Per target (in `Target::ALL`'s order), each row's replay cost under each class, the
    /// other targets at the row's oracle (rows × classes, row-major), for the targets whose
    /// leaves answer by cost ([`relabel_by_cost`]); empty for the others.
    pub class_costs: Vec<Vec<f32>>,
}

/// The targets whose leaves answer the class of least summed replay cost. Compression and mode
/// keep the weighted majority: a class of one is invalid beside some values of the other
/// (compression needs `frame_aware`), so a row's cost of it alone is not defined.
fn by_cost(t: Target) -> bool {
    matches!(
        t,
        Target::BufferSize | Target::PingInterval | Target::IdleTimeout
    )
}

fn data_err(e: PolarsError) -> LearnError {
    LearnError::Data(format!("training table: {e}"))
}

impl Dataset {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.table.height()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.table.height() == 0
    }

    /// The class labels of a target, row for row.
    pub fn labels(&self, t: Target) -> Result<Vec<usize>, LearnError> {
        let c = self
            .table
            .column(&format!("y_{}", t.name()))
            .map_err(data_err)?;
        Ok(c.u32()
            .map_err(data_err)?
            .iter()
            .map(|v| v.unwrap_or(0) as usize)
            .collect())
    }

    /// The row weights of a target, row for row.
    pub fn weights(&self, t: Target) -> Result<Vec<f32>, LearnError> {
        let c = self
            .table
            .column(&format!("w_{}", t.name()))
            .map_err(data_err)?;
        Ok(c.f32()
            .map_err(data_err)?
            .iter()
            .map(|v| v.unwrap_or(1.0))
            .collect())
    }

    /// Assemble the table from its columns (`x` row-major), and read the matrix back from it.
    fn assemble(
        profiles: Vec<Profile>,
        x: &[f32],
        labels: Vec<Vec<u32>>,
        weights: Vec<Vec<f32>>,
    ) -> Result<Dataset, LearnError> {
        let n = profiles.len();
        let width = tuning::feature_len();
        let mut cols = vec![
            Column::new(
                "started_at".into(),
                profiles
                    .iter()
                    .map(|p| p.started_at.timestamp_micros())
                    .collect::<Vec<i64>>(),
            ),
            Column::new(
                "service".into(),
                profiles
                    .iter()
                    .map(|p| p.context.service.as_str())
                    .collect::<Vec<&str>>(),
            ),
        ];
        for (j, name) in tuning::feature_names().iter().enumerate() {
            cols.push(Column::new(
                format!("f_{name}").into(),
                (0..n).map(|r| x[r * width + j]).collect::<Vec<f32>>(),
            ));
        }
        for ((t, y), w) in Target::ALL.iter().zip(labels).zip(weights) {
            cols.push(Column::new(format!("y_{}", t.name()).into(), y));
            cols.push(Column::new(format!("w_{}", t.name()).into(), w));
        }
        let table = DataFrame::new(n, cols).map_err(data_err)?;
        let x = feature_matrix(&table)?;
        Ok(Dataset {
            table,
            x,
            profiles,
            class_costs: vec![Vec::new(); Target::ALL.len()],
        })
    }
}

/// The `f_<name>` columns of a table, in the schema's order, as a row-major matrix.
pub fn feature_matrix(table: &DataFrame) -> Result<Array2<f32>, LearnError> {
    let names = tuning::feature_names();
    let mut x = Array2::<f32>::zeros((table.height(), names.len()));
    for (j, name) in names.iter().enumerate() {
        let c = table.column(&format!("f_{name}")).map_err(data_err)?;
        for (r, v) in c.f32().map_err(data_err)?.iter().enumerate() {
            x[[r, j]] = v.unwrap_or(0.0);
        }
    }
    Ok(x)
}

/// Build the training table from profiles sorted by start time: each row's aggregates come
/// from the rows before it only.
pub fn dataset(profiles: Vec<Profile>, w: &CostWeights) -> Result<Dataset, LearnError> {
    let mut agg = tuning::aggregates::Aggregator::default();
    let mut x = Vec::with_capacity(profiles.len() * tuning::feature_len());
    let mut labels = vec![Vec::with_capacity(profiles.len()); Target::ALL.len()];
    let mut weights = vec![Vec::with_capacity(profiles.len()); Target::ALL.len()];
    let mut class_costs = vec![Vec::new(); Target::ALL.len()];
    for p in &profiles {
        x.extend(tuning::encode(&p.context, &agg.get(&p.context)));
        agg.observe(p);
        // The labels: every target's class in the joint hindsight choice.
        let best = oracle(p, w);
        for (i, t) in Target::ALL.iter().enumerate() {
            labels[i].push(t.class_of(&best) as u32);
            // weight: regret of the worst choice for this target (the others at the oracle's),
            // log-scaled
            let mut s = best;
            let mut costs = Vec::new();
            for c in 0..t.classes() {
                t.set_class(&mut s, c);
                let cost = s.validate().is_ok().then(|| replay_cost(p, &s, w));
                if by_cost(*t) {
                    class_costs[i].push(cost.map_or(f32::INFINITY, |c| c as f32));
                }
                costs.extend(cost);
            }
            weights[i].push(regret_weight(costs));
        }
    }
    let mut d = Dataset::assemble(profiles, &x, labels, weights)?;
    d.class_costs = class_costs;
    Ok(d)
}

/// Each leaf of a fitted tree answers the class whose replay cost, summed over the training
/// rows that reach it, is least, instead of linfa's weighted majority of hindsight labels.
/// Rows a context cannot tell apart share a leaf, and the cheapest answer for all of them is
/// the policy's business: one device in five vanishing is worth pings for every device of its
/// kind (each vanished one costs tens of thousands, the pings of the others a few dozen), where
/// the majority of labels (the live devices', which need no pings) said no pings, and the
/// log-scaled weights could not outvote it. A leaf keeps its class when no other is strictly
/// cheaper, and so does a leaf no row reaches. `costs` holds each row's cost of each class
/// (rows × `k`, row-major: [`class_costs`]); `rows` are the training rows the tree learned
/// from (a bootstrap sample repeats some). Nothing changes when `costs` is empty.
pub fn relabel_by_cost(
    mut tree: Tree,
    x: &Array2<f32>,
    costs: &[f32],
    k: usize,
    rows: impl IntoIterator<Item = usize>,
) -> Tree {
    if costs.is_empty() || k == 0 {
        return tree;
    }
    let mut sums: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
    for r in rows.into_iter().filter(|r| *r < costs.len() / k) {
        let row = x.row(r);
        let leaf = match row.as_slice() {
            Some(x) => tree.leaf(x),
            None => tree.leaf(&row.to_vec()),
        };
        let s = sums.entry(leaf).or_insert_with(|| vec![0.0; k]);
        for (c, v) in s.iter_mut().enumerate() {
            *v += f64::from(costs[r * k + c]);
        }
    }
    for (leaf, s) in sums {
        let TreeNode::Leaf { class: now } = tree.nodes[leaf] else {
            continue;
        };
        if let Some((class, least)) = s
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .min_by(|a, b| a.1.total_cmp(b.1))
            && s.get(now).is_none_or(|v| v > least)
        {
            tree.nodes[leaf] = TreeNode::Leaf { class };
        }
    }
    tree
}

/// The replay cost of each of the first `rows` rows under each class of `t` (rows × classes,
/// row-major; infinite where the combination is invalid), the other settings at `base(row)`.
pub fn class_costs(
    d: &Dataset,
    t: Target,
    rows: usize,
    w: &CostWeights,
    base: impl Fn(usize) -> Settings,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * t.classes());
    for (r, p) in d.profiles.iter().enumerate().take(rows) {
        let mut s = base(r);
        for c in 0..t.classes() {
            t.set_class(&mut s, c);
            out.push(if s.validate().is_ok() {
                replay_cost(p, &s, w) as f32
            } else {
                f32::INFINITY
            });
        }
    }
    out
}

/// The weight of a row whose classes cost `costs`: `1 + round(ln(1 + regret))`, the regret
/// being the worst valid class's cost above the best's (whole numbers from 1 to 16: linfa
/// accumulates weights in f32, and sums of whole numbers stay exact below 2^24 where fractions
/// drift and can reach a negative class frequency on large tables).
fn regret_weight(costs: impl IntoIterator<Item = f64>) -> f32 {
    let (lo, hi) = costs
        .into_iter()
        .filter(|c| c.is_finite())
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), c| {
            (lo.min(c), hi.max(c))
        });
    (1.0 + (hi - lo).max(0.0)).ln().round().clamp(0.0, 15.0) as f32 + 1.0
}

/// The first fit learns each row's oracle labels, and its leaves answer by cost with each
/// row's other settings at its oracle's: a combination a policy cannot always give. A device
/// that vanished after its first reading is cheapest with a 30 s timeout and no pings, so no
/// label asks for pings; but its context also holds live devices whose 45 s gaps need 60 s,
/// and with 60 s, which the policy gives them all, three missed 15 s pings find the vanished
/// one 15 s sooner. So the targets that answer by cost are fitted again, target after target,
/// given what the model answers each row for the other settings, until no answer on a
/// training row changes (at most three rounds): the policy's own coordinate descent. A row's
/// label is then the class of least summed cost over the rows of its context (its decision
/// bucket: what the model can tell apart), the most common oracle label among the cheapest
/// where several tie; labelled row by row, the vanished devices' pings against the live ones'
/// none, the tree split one context's rows along its drifting aggregate features (an earlier
/// vanishing raises the context's abnormal-close share), which serving does not see. Rows keep
/// the weight of their own regret, and the leaves answer by the same costs.
fn refit_given_policy(
    p: &TrainParams,
    d: &Dataset,
    models: &mut [TargetModel],
    train: usize,
) -> Result<(), LearnError> {
    let rows: Vec<Vec<f32>> = (0..train).map(|r| d.x.row(r).to_vec()).collect();
    let answers = |models: &[TargetModel]| -> Vec<Settings> {
        let f = Fitted {
            models: models.to_vec(),
        };
        rows.iter()
            .enumerate()
            .map(|(r, x)| f.predict(x, d.profiles[r].decision.settings))
            .collect()
    };
    let mut contexts: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (r, p) in d.profiles.iter().enumerate().take(train) {
        contexts.entry(p.context.bucket_key()).or_default().push(r);
    }
    let mut before = answers(models);
    for _ in 0..3 {
        for (i, t) in Target::ALL.iter().enumerate() {
            if !by_cost(*t) {
                continue;
            }
            let policy = answers(models);
            let k = t.classes();
            let costs = class_costs(d, *t, train, &p.weights, |r| policy[r]);
            let oracle = d.labels(*t)?;
            let mut y = vec![0; train];
            for rows in contexts.values() {
                let mut sums = vec![0.0f64; k];
                let mut votes = vec![0usize; k];
                for r in rows {
                    for (c, v) in sums.iter_mut().enumerate() {
                        *v += f64::from(costs[r * k + c]);
                    }
                    votes[oracle[*r].min(k - 1)] += 1;
                }
                let least = sums.iter().copied().fold(f64::INFINITY, f64::min);
                let label = (0..k)
                    .filter(|c| sums[*c] == least)
                    .max_by_key(|c| (votes[*c], std::cmp::Reverse(*c)))
                    .unwrap_or(0);
                for r in rows {
                    y[*r] = label;
                }
            }
            let w: Vec<f32> = (0..train)
                .map(|r| regret_weight(costs[r * k..(r + 1) * k].iter().map(|c| f64::from(*c))))
                .collect();
            models[i].trees = fit_forest(p, d, *t, &y, &w, &costs)
                .map_err(|e| LearnError::Data(format!("{}: {e}", t.name())))?;
        }
        let after = answers(models);
        if after == before {
            break;
        }
        before = after;
    }
    Ok(())
}

/// splitmix64: the forest's draws, the same for the same seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A draw from `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The trees of one target, fitted on the first `y.len()` rows: one tree on every row and
/// feature when `p.trees` is 1, else a random forest. Each of its trees learns from a bootstrap
/// sample (a row drawn k times weighs k times its weight), may split only on its own random
/// `feature_share` of the features (the others are zero in its matrix, so never split on), and
/// has its leaves relabelled by the replay cost of its sample ([`relabel_by_cost`]). The draws
/// come from `p.seed` and the target, so a window trains the same model every time.
fn fit_forest(
    p: &TrainParams,
    d: &Dataset,
    t: Target,
    y: &[usize],
    w: &[f32],
    costs: &[f32],
) -> Result<Vec<Tree>, LearnError> {
    let train = y.len();
    let x = d.x.slice(s![..train, ..]);
    let target = Target::ALL.iter().position(|x| *x == t).unwrap_or(0);
    let k = t.classes();
    let present: std::collections::BTreeSet<usize> = y.iter().copied().collect();
    if present.len() == 1 {
        let tree = Tree::constant(*present.iter().next().expect("one class"));
        return Ok(vec![relabel_by_cost(tree, &d.x, costs, k, 0..train)]);
    }
    if p.trees == 1 {
        let (_, tree) = fit_tree(x, y, w, p.max_depth, p.min_leaf_weight)?;
        return Ok(vec![relabel_by_cost(tree, &d.x, costs, k, 0..train)]);
    }
    let cols = x.ncols();
    let keep = ((cols as f64 * p.feature_share).round() as usize).clamp(1, cols);
    let mut rng = SplitMix(p.seed ^ (target as u64 + 1).wrapping_mul(0xd1b5_4a32_d192_ed03));
    let mut trees = Vec::with_capacity(p.trees);
    for _ in 0..p.trees {
        let mut drawn = vec![0u32; train];
        for _ in 0..train {
            drawn[rng.below(train)] += 1;
        }
        // a partial Fisher–Yates shuffle picks the tree's features
        let mut order: Vec<usize> = (0..cols).collect();
        for i in 0..keep {
            let j = i + rng.below(cols - i);
            order.swap(i, j);
        }
        let rows: Vec<usize> = (0..train).filter(|r| drawn[*r] > 0).collect();
        let mut bx = Array2::<f32>::zeros((rows.len(), cols));
        for (i, r) in rows.iter().enumerate() {
            for c in &order[..keep] {
                bx[[i, *c]] = x[[*r, *c]];
            }
        }
        let by: Vec<usize> = rows.iter().map(|r| y[*r]).collect();
        let bw: Vec<f32> = rows.iter().map(|r| w[*r] * drawn[*r] as f32).collect();
        let (_, tree) = fit_tree(bx.view(), &by, &bw, p.max_depth, p.min_leaf_weight)?;
        let sample = rows
            .iter()
            .flat_map(|r| std::iter::repeat_n(*r, drawn[*r] as usize));
        trees.push(relabel_by_cost(tree, &d.x, costs, k, sample));
    }
    Ok(trees)
}

/// Fit one cost-weighted tree and convert it to the exported form.
pub fn fit_tree(
    x: ArrayView2<'_, f32>,
    y: &[usize],
    w: &[f32],
    max_depth: usize,
    min_leaf_weight: f32,
) -> Result<(DecisionTree<f32, usize>, Tree), LearnError> {
    let ds = Dataset2::new(x.to_owned(), y.iter().copied().collect::<Array1<usize>>())
        .with_weights(w.iter().copied().collect::<Array1<f32>>());
    let params = DecisionTree::params()
        .max_depth(Some(max_depth))
        .min_weight_leaf(min_leaf_weight);
    // linfa asserts on degenerate splits; a training failure must not take the process down.
    let fitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| params.fit(&ds)))
        .map_err(|_| LearnError::Data("the tree learner failed on this data".into()))?
        .map_err(|e| LearnError::Data(e.to_string()))?;
    let tree = to_tree(&fitted);
    Ok((fitted, tree))
}

fn to_tree(t: &DecisionTree<f32, usize>) -> Tree {
    fn walk(n: &linfa_trees::TreeNode<f32, usize>, out: &mut Vec<TreeNode>) -> usize {
        let me = out.len();
        if let Some(class) = n.prediction() {
            out.push(TreeNode::Leaf { class });
            return me;
        }
        out.push(TreeNode::Leaf { class: 0 }); // placeholder until the children are in
        let (feature, threshold, _) = n.split();
        let kids = n.children();
        let yes = kids[0].as_ref().map(|k| walk(k, out));
        let no = kids[1].as_ref().map(|k| walk(k, out));
        out[me] = match (yes, no) {
            (Some(yes), Some(no)) => TreeNode::Branch {
                feature,
                threshold,
                yes,
                no,
            },
            (Some(only), None) | (None, Some(only)) => out[only],
            (None, None) => TreeNode::Leaf { class: 0 },
        };
        me
    }
    let mut nodes = Vec::new();
    if let Some(root) = t.iter_nodes().next() {
        walk(root, &mut nodes);
    }
    Tree { nodes }
}

/// Per-target classification quality on the held-out rows.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    /// The target.
    pub target: &'static str,
    /// Mean recall over the classes present.
    pub balanced_accuracy: f64,
    /// Mean F1 over the classes present.
    pub macro_f1: f64,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
}

/// Replay cost of a policy on the held-out rows.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyCost {
    /// The policy.
    pub policy: String,
    /// Mean replay cost per connection.
    pub mean_cost: f64,
}

/// A per-service delta with its bootstrap confidence interval.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceDelta {
    /// Service.
    pub service: String,
    /// Held-out connections.
    pub rows: usize,
    /// Mean (best static − model) cost per connection: positive = the model is cheaper.
    pub saving: f64,
    /// 95 % bootstrap interval of the saving.
    pub ci95: (f64, f64),
}

/// What training produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Rows used for training and for evaluation.
    pub train_rows: usize,
    /// Held-out rows.
    pub test_rows: usize,
    /// Per-target quality.
    pub targets: Vec<TargetReport>,
    /// Replay costs: the model, the shipped defaults, the best single static config, a
    /// per-service p95 rule, the hindsight oracle.
    pub costs: Vec<PolicyCost>,
    /// Share of the gap between the best static config and the oracle the model closes.
    pub gap_closed: f64,
    /// The best single static config.
    pub best_static: Settings,
    /// Per-service savings against the best static config.
    pub services: Vec<ServiceDelta>,
}

/// A fitted model: a forest (or one tree) per target.
#[derive(Debug, Clone)]
pub struct Fitted {
    /// The trees of each target.
    pub models: Vec<TargetModel>,
}

impl Fitted {
    /// The settings the model picks for a feature row.
    pub fn predict(&self, x: &[f32], base: Settings) -> Settings {
        let mut s = base;
        for m in &self.models {
            m.target.set_class(&mut s, m.predict(x));
        }
        s.clamp().0
    }
}

fn all_static() -> Vec<Settings> {
    let mut out = Vec::new();
    for b in tuning::settings::BUFFER_SIZES {
        for p in tuning::settings::PING_INTERVALS {
            for i in tuning::settings::IDLE_TIMEOUTS {
                for (c, m) in [
                    (false, tuning::Mode::ZeroCopy),
                    (false, tuning::Mode::FrameAware),
                    (true, tuning::Mode::FrameAware),
                ] {
                    out.push(Settings {
                        buffer_size: b,
                        ping_interval: p,
                        idle_timeout: i,
                        compression: c,
                        mode: m,
                    });
                }
            }
        }
    }
    out
}

fn mean(v: &[f64]) -> f64 {
    if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    }
}

/// Fit on the earlier rows, evaluate on the later ones.
pub fn fit_and_evaluate(p: &CheckedParams, d: &Dataset) -> Result<(Fitted, Report), LearnError> {
    let p = &p.0;
    let n = d.len();
    let test = ((n as f64) * p.test_share).round() as usize;
    let train = n - test;
    if train < 10 || test < 5 {
        return Err(LearnError::Data(format!(
            "{n} rows are too few: at least 10 for training and 5 for evaluation are needed"
        )));
    }
    let mut models = Vec::new();
    for (i, t) in Target::ALL.iter().enumerate() {
        let y: Vec<usize> = d.labels(*t)?[..train].to_vec();
        let w: Vec<f32> = d.weights(*t)?[..train].to_vec();
        let present: std::collections::BTreeSet<usize> = y.iter().copied().collect();
        if present.len() > 1 {
            for c in &present {
                let rows = y.iter().filter(|v| *v == c).count();
                if rows < p.min_class_rows {
                    return Err(LearnError::Data(format!(
                        "{}: class {c} has {rows} training rows, fewer than {}",
                        t.name(),
                        p.min_class_rows
                    )));
                }
            }
        }
        let trees = fit_forest(p, d, *t, &y, &w, &d.class_costs[i])
            .map_err(|e| LearnError::Data(format!("{}: {e}", t.name())))?;
        models.push(TargetModel { target: *t, trees });
    }
    refit_given_policy(p, d, &mut models, train)?;
    let fitted = Fitted { models };
    let predicted: Vec<Settings> = (train..n)
        .map(|r| fitted.predict(&d.x.row(r).to_vec(), d.profiles[r].decision.settings))
        .collect();
    let report = evaluate(p, d, train, &predicted)?;
    Ok((fitted, report))
}

/// Evaluate settings `predicted` for the rows from `train` on (in order) against the labels and
/// the baselines; the best static config and the per-service p95 rule are fitted on the rows
/// before `train`.
pub fn evaluate(
    p: &TrainParams,
    d: &Dataset,
    train: usize,
    predicted: &[Settings],
) -> Result<Report, LearnError> {
    let n = d.len();
    let test = n - train;
    // Classification quality per target on the evaluated rows.
    let mut targets = Vec::new();
    for t in Target::ALL.iter() {
        let k = t.classes();
        let mut confusion = vec![vec![0u64; k]; k];
        let labels = d.labels(*t)?;
        for r in train..n {
            let truth = labels[r];
            let pred = t.class_of(&predicted[r - train]).min(k - 1);
            confusion[truth][pred] += 1;
        }
        let mut recalls = Vec::new();
        let mut f1s = Vec::new();
        for c in 0..k {
            let tp = confusion[c][c] as f64;
            let actual: f64 = confusion[c].iter().sum::<u64>() as f64;
            let predicted: f64 = confusion.iter().map(|row| row[c]).sum::<u64>() as f64;
            if actual > 0.0 {
                recalls.push(tp / actual);
                let precision = if predicted > 0.0 { tp / predicted } else { 0.0 };
                let recall = tp / actual;
                f1s.push(if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                });
            }
        }
        targets.push(TargetReport {
            target: t.name(),
            balanced_accuracy: mean(&recalls),
            macro_f1: mean(&f1s),
            confusion,
        });
    }
    // Replay costs of the policies.
    let w = &p.weights;
    let rows = &d.profiles[train..];
    let model_costs: Vec<f64> = rows
        .iter()
        .zip(predicted)
        .map(|(pr, s)| replay_cost(pr, s, w))
        .collect();
    let defaults: Vec<f64> = rows
        .iter()
        .map(|pr| replay_cost(pr, &Settings::default(), w))
        .collect();
    let oracle: Vec<f64> = rows
        .iter()
        .map(|pr| replay_cost(pr, &tuning::cost::oracle(pr, w), w))
        .collect();
    // The best single static config is chosen on the training rows (no peeking); on at most
    // 20 000 of them, evenly spaced, since it tries all 240 configs.
    let stride = (train / 20_000).max(1);
    let sample: Vec<&Profile> = d.profiles[..train].iter().step_by(stride).collect();
    let best_static = all_static()
        .into_iter()
        .map(|c| {
            let total: f64 = sample.iter().map(|pr| replay_cost(pr, &c, w)).sum();
            (c, total)
        })
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(c, _)| c)
        .unwrap_or_default();
    let statics: Vec<f64> = rows
        .iter()
        .map(|pr| replay_cost(pr, &best_static, w))
        .collect();
    // Per-service p95 rule: buffer sized to the service's p95 message size, idle timeout above
    // its p95 gap, learned on the training rows.
    let mut rule: std::collections::HashMap<String, Settings> = std::collections::HashMap::new();
    {
        let mut sizes: std::collections::HashMap<&str, tuning::Hist> = Default::default();
        let mut gaps: std::collections::HashMap<&str, tuning::Hist> = Default::default();
        for pr in &d.profiles[..train] {
            let s = sizes.entry(pr.context.service.as_str()).or_default();
            let g = gaps.entry(pr.context.service.as_str()).or_default();
            for dir in [&pr.client_to_upstream, &pr.upstream_to_client] {
                for (i, c) in dir.msg_sizes.0.iter().enumerate() {
                    s.0[i] += c;
                }
            }
            g.record(
                pr.client_to_upstream
                    .max_gap_ms
                    .max(pr.upstream_to_client.max_gap_ms),
            );
        }
        for (svc, h) in &sizes {
            let p95 = h.quantile_upper(0.95).unwrap_or(0);
            let gap95 = gaps[svc].quantile_upper(0.95).unwrap_or(0) / 1000;
            let s = Settings {
                buffer_size: *tuning::settings::BUFFER_SIZES
                    .iter()
                    .find(|b| u64::from(**b) >= p95)
                    .unwrap_or(&(256 << 10)),
                idle_timeout: *tuning::settings::IDLE_TIMEOUTS
                    .iter()
                    .find(|t| u64::from(**t) > gap95)
                    .unwrap_or(&900),
                ..Settings::default()
            };
            rule.insert(svc.to_string(), s);
        }
    }
    let rules: Vec<f64> = rows
        .iter()
        .map(|pr| {
            let s = rule.get(&pr.context.service).copied().unwrap_or_default();
            replay_cost(pr, &s, w)
        })
        .collect();
    let (m, st, or) = (mean(&model_costs), mean(&statics), mean(&oracle));
    let gap_closed = if st - or > 1e-9 {
        (st - m) / (st - or)
    } else {
        1.0
    };
    // Per-service savings against the best static config, with bootstrap intervals.
    let mut services = Vec::new();
    let mut names: Vec<&str> = rows.iter().map(|r| r.context.service.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    let mut rng = p.seed.max(1);
    for svc in names {
        let deltas: Vec<f64> = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.context.service == svc)
            .map(|(i, _)| statics[i] - model_costs[i])
            .collect();
        let mut means = Vec::with_capacity(p.bootstrap);
        for _ in 0..p.bootstrap {
            let mut s = 0.0;
            for _ in 0..deltas.len() {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                s += deltas[(rng % deltas.len() as u64) as usize];
            }
            means.push(s / deltas.len() as f64);
        }
        means.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| means[((means.len() - 1) as f64 * q).round() as usize];
        services.push(ServiceDelta {
            service: svc.to_string(),
            rows: deltas.len(),
            saving: mean(&deltas),
            ci95: (at(0.025), at(0.975)),
        });
    }
    Ok(Report {
        train_rows: train,
        test_rows: test,
        targets,
        costs: vec![
            PolicyCost {
                policy: "model".into(),
                mean_cost: m,
            },
            PolicyCost {
                policy: "shipped defaults".into(),
                mean_cost: mean(&defaults),
            },
            PolicyCost {
                policy: "best static config".into(),
                mean_cost: st,
            },
            PolicyCost {
                policy: "per-service p95 rule".into(),
                mean_cost: mean(&rules),
            },
            PolicyCost {
                policy: "hindsight oracle".into(),
                mean_cost: or,
            },
        ],
        gap_closed,
        best_static,
        services,
    })
}

/// linfa's dataset type, named here once.
type Dataset2 = linfa::DatasetBase<Array2<f32>, Array1<usize>>;

#[cfg(test)]
mod tests {
    use super::*;

    /// A profile of `ctx` under the shipped defaults, with no traffic yet.
    fn profile(ctx: &tuning::ConnectionContext) -> Profile {
        Profile::new(
            ctx.clone(),
            tuning::Decision::fixed(Settings::default(), tuning::Reason::Default),
        )
    }

    /// A WebSocket context of `service` (route `/{service}`), nothing else told apart.
    fn context(service: &str) -> tuning::ConnectionContext {
        tuning::ConnectionContext {
            service: service.into(),
            route: format!("/{service}"),
            protocol: tuning::Protocol::Websocket,
            subprotocol: None,
            offers_deflate: false,
            client_class: tuning::ClientClass::Other,
            client_region: "eu".into(),
            hour_of_week: 0,
            client_key: None,
        }
    }

    /// One context, one in three rows heavy (weight 13, class 1) and the rest light (weight 1,
    /// class 0), and a feature that only drifts (as an aggregate does while a window is read):
    /// with leaves of a single row the tree carves light rows out along the drift and answers
    /// 0 for part of its range; with the default least leaf weight it answers 1 everywhere.
    #[test]
    fn a_leaf_must_hold_enough_weight_to_outvote_a_drifting_feature() {
        let n = 120;
        let mut x = Array2::<f32>::zeros((n, 2));
        let (mut y, mut w) = (Vec::new(), Vec::new());
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for r in 0..n {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            x[[r, 0]] = 1.0;
            x[[r, 1]] = 0.32 + (state % 1000) as f32 / 1000.0 * 0.22;
            let heavy = r % 3 == 0;
            y.push(usize::from(heavy));
            w.push(if heavy { 13.0 } else { 1.0 });
        }
        let answers = |min_leaf: f32| {
            let (_, tree) = fit_tree(x.view(), &y, &w, 8, min_leaf).unwrap();
            (0..=220)
                .map(|i| tree.predict(&[1.0, 0.32 + i as f32 / 1000.0]))
                .collect::<std::collections::BTreeSet<usize>>()
        };
        assert!(
            answers(1.0).contains(&0),
            "single-row leaves follow the drift"
        );
        assert_eq!(
            answers(TrainParams::default().min_leaf_weight),
            std::collections::BTreeSet::from([1])
        );
    }

    /// Ten devices that report every 45 s and two that vanish, in one context: the labels say
    /// no pings for ten rows and 15 s for two (whose log-scaled weights cannot outvote them),
    /// while pings for all cost 320 and save 60 000. The leaf answers 15 s.
    #[test]
    fn a_leaf_answers_the_class_of_least_summed_cost_not_the_majority_label() {
        let ctx = context("iot");
        let device = |vanished: bool| {
            let mut p = profile(&ctx);
            p.duration_us = if vanished { 150 } else { 60 } * 1_000_000;
            let d = &mut p.client_to_upstream;
            d.messages = 2;
            d.bytes = 40;
            d.msg_sizes.record(20);
            d.msg_sizes.record(20);
            d.gaps_ms.record(45_000);
            d.max_gap_ms = if vanished { 100_000 } else { 45_000 };
            p.dead_peer = vanished;
            p
        };
        let profiles: Vec<Profile> = (0..12).map(|i| device(i % 6 == 5)).collect();
        let d = dataset(profiles, &CostWeights::default()).unwrap();
        let t = Target::PingInterval;
        let i = Target::ALL.iter().position(|x| *x == t).unwrap();
        let labels = d.labels(t).unwrap();
        assert_eq!(labels.iter().filter(|c| **c == 0).count(), 10);
        let w = d.weights(t).unwrap();
        let by_weight =
            |c: usize| -> f32 { (0..12).filter(|r| labels[*r] == c).map(|r| w[r]).sum() };
        assert!(by_weight(0) > by_weight(1), "the majority says no pings");
        let tree = relabel_by_cost(
            Tree::constant(0),
            &d.x,
            &d.class_costs[i],
            t.classes(),
            0..12,
        );
        assert_eq!(
            tuning::settings::PING_INTERVALS[tree.predict(&vec![0.0; d.x.ncols()])],
            15
        );
        assert_eq!(d.class_costs[i].len(), 12 * t.classes());
    }

    /// Devices that report every 45 s, one in five vanishing after its first reading. Each
    /// row's oracle says no pings (a vanished device alone is cheapest with a 30 s timeout,
    /// which three missed pings cannot beat), so no label asks for pings. But the policy must
    /// give the whole context 60 s (the live devices' gaps), and with 60 s, pings every 15 s find
    /// a vanished device 15 s sooner: relabelled given what the policy does, the model answers
    /// pings every 15 s and 60 s.
    #[test]
    fn the_leaves_answer_by_cost_given_what_the_policy_does_for_the_other_settings() {
        let ctx = context("iot");
        let device = |vanished: bool| {
            let mut p = profile(&ctx);
            p.dead_peer = vanished;
            p.duration_us = if vanished { 125 } else { 60 } * 1_000_000;
            let d = &mut p.client_to_upstream;
            d.msg_sizes.record(20);
            if vanished {
                d.messages = 1;
                d.bytes = 20;
                d.max_gap_ms = 125_000;
            } else {
                d.messages = 2;
                d.bytes = 40;
                d.msg_sizes.record(20);
                d.gaps_ms.record(45_000);
                d.max_gap_ms = 45_000;
            }
            p
        };
        let profiles: Vec<Profile> = (0..60).map(|i| device(i % 5 == 4)).collect();
        let d = dataset(profiles, &CostWeights::default()).unwrap();
        let pings = d.labels(Target::PingInterval).unwrap();
        let timeouts = d.labels(Target::IdleTimeout).unwrap();
        assert!(pings.iter().all(|c| *c == 0), "no label asks for pings");
        for (r, c) in timeouts.iter().enumerate() {
            let want = if r % 5 == 4 { 30 } else { 60 };
            assert_eq!(tuning::settings::IDLE_TIMEOUTS[*c], want, "row {r}");
        }
        let params = TrainParams {
            min_class_rows: 1,
            ..TrainParams::default()
        }
        .check()
        .unwrap();
        let (f, _) = fit_and_evaluate(&params, &d).unwrap();
        for r in 48..60 {
            let s = f.predict(&d.x.row(r).to_vec(), Settings::default());
            assert_eq!((s.ping_interval, s.idle_timeout), (15, 60), "row {r}");
        }
    }

    /// Two contexts told apart by 3 of the features only, `zero_copy` for one and `frame_aware`
    /// for the other. A tree that drew none of the three into its half of the features cannot tell
    /// them apart and answers one class for both; the forest's vote answers each its own, on
    /// every held-out row. The same seed gives the same forest, another seed another one.
    #[test]
    fn a_forest_outvotes_its_trees_that_could_not_see_the_telling_features() {
        let n = 200;
        let width = tuning::feature_len();
        let telling = [3, width / 2, width - 2];
        let mut x = Vec::with_capacity(n * width);
        let mut labels = vec![vec![0u32; n]; Target::ALL.len()];
        for (r, label) in labels[4].iter_mut().enumerate() {
            let b = r % 2 == 1;
            x.extend((0..width).map(|c| if telling.contains(&c) && b { 1.0 } else { 0.25 }));
            *label = u32::from(b);
        }
        let p = profile(&context("s"));
        let d = Dataset::assemble(
            vec![p; n],
            &x,
            labels,
            vec![vec![1.0; n]; Target::ALL.len()],
        )
        .unwrap();
        let params = |seed: u64| {
            TrainParams {
                seed,
                ..TrainParams::default()
            }
            .check()
            .unwrap()
        };
        let (f, report) = fit_and_evaluate(&params(7), &d).unwrap();
        let forest = &f.models[4];
        assert_eq!(forest.target, Target::Mode);
        assert_eq!(forest.trees.len(), TrainParams::default().trees);
        let row = |b: bool| d.x.row(usize::from(b)).to_vec();
        let blind = forest
            .trees
            .iter()
            .filter(|t| t.predict(&row(false)) == t.predict(&row(true)))
            .count();
        assert!(blind > 0, "some trees drew none of the telling features");
        assert!(blind < forest.trees.len() / 2, "{blind} blind trees");
        assert_eq!(forest.predict(&row(false)), 0);
        assert_eq!(forest.predict(&row(true)), 1);
        assert_eq!(report.targets[4].balanced_accuracy, 1.0);
        assert_eq!(fit_and_evaluate(&params(7), &d).unwrap().0.models, f.models);
        assert_ne!(
            fit_and_evaluate(&params(8), &d).unwrap().0.models[4],
            *forest
        );
    }

    #[test]
    fn a_class_with_too_few_training_rows_is_refused_by_name() {
        let ctx = context("s");
        let n = 40;
        let p = profile(&ctx);
        let mut labels = vec![vec![0u32; n]; Target::ALL.len()];
        labels[0][3] = 2; // one training row of buffer_size class 2 (64 KiB)
        labels[0][4] = 1;
        labels[0][5] = 1;
        labels[0][6] = 1;
        let x: Vec<f32> = (0..n)
            .flat_map(|i| vec![i as f32; tuning::feature_len()])
            .collect();
        let d = Dataset::assemble(
            vec![p; n],
            &x,
            labels,
            vec![vec![1.0; n]; Target::ALL.len()],
        )
        .unwrap();
        let e = fit_and_evaluate(&TrainParams::default().check().unwrap(), &d).unwrap_err();
        assert_eq!(
            e.to_string(),
            "buffer_size: class 2 has 1 training rows, fewer than 3"
        );
    }
}
