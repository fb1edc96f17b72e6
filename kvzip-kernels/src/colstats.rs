//! Causal-softmax column statistics: the shared types of [`crate::host::column_stats`].
//!
//! For a block of query rows and a set of key segments, the column statistic of a key is the
//! max (or the sum) over rows of that key's softmax probability. KVzip's reconstruction score
//! (max) and the H2O / SnapKV baselines (max / sum over an observation window) are all this
//! operation with different rows, keys and reductions.

/// How column statistics reduce over query rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColReduce {
    /// Maximum probability over rows.
    Max,
    /// Sum of probabilities over rows.
    Sum,
}

impl ColReduce {
    /// The starting value of the reduction: `-inf` log-probability for `Max` (the fast path
    /// reduces log-probabilities), 0 for `Sum`.
    #[cfg_attr(not(feature = "cpu-fast"), allow(dead_code))]
    pub(crate) fn identity(self) -> f32 {
        match self {
            ColReduce::Max => f32::NEG_INFINITY,
            ColReduce::Sum => 0.0,
        }
    }
}

/// One independent unit of work: a contiguous block of query rows attending to one key matrix.
#[derive(Debug, Clone, Copy)]
pub struct ColumnUnit<'a> {
    /// `[n_rows, d]` query rows, contiguous.
    pub q: &'a [f32],
    /// All key rows of the unit's KV head, row r = position r, `d` floats each.
    pub keys: &'a [f32],
    /// Rows are ordered `(g, t)`; the position of row r is `first_pos + r % period`.
    pub period: usize,
    /// Position of the row with `t = 0`.
    pub first_pos: usize,
}

/// Checks the arguments of `column_stats` (both backends): every unit's query rows are whole
/// rows of `d`, every unit holds the key rows its segments and target need, `target` lies inside
/// the segments and `out` holds `units.len() * target.len()` values.
pub(crate) fn validate(
    units: &[ColumnUnit<'_>],
    d: usize,
    segments: &[std::ops::Range<usize>],
    target: &std::ops::Range<usize>,
    out_len: usize,
) -> crate::Result<()> {
    use crate::KernelError;
    if d == 0 {
        return Err(KernelError::Shape(
            "column_stats: head_dim must be > 0".into(),
        ));
    }
    let need_out = units.len() * target.len();
    if out_len < need_out {
        return Err(KernelError::Shape(format!(
            "column_stats: out holds {out_len} values, {} units x target {} need {need_out}",
            units.len(),
            target.len()
        )));
    }
    if !segments
        .iter()
        .any(|s| s.start <= target.start && target.end <= s.end)
    {
        return Err(KernelError::Shape(format!(
            "column_stats: target {target:?} is not inside one of the key segments {segments:?}"
        )));
    }
    let key_rows = segments.iter().map(|s| s.end).max().unwrap_or(0);
    for (u, unit) in units.iter().enumerate() {
        if unit.q.len() % d != 0 || unit.keys.len() % d != 0 {
            return Err(KernelError::Shape(format!(
                "column_stats unit {u}: {} query / {} key floats are not whole rows of {d}",
                unit.q.len(),
                unit.keys.len()
            )));
        }
        if unit.period == 0 && !unit.q.is_empty() {
            return Err(KernelError::Shape(format!(
                "column_stats unit {u}: period must be >= 1"
            )));
        }
        if unit.keys.len() / d < key_rows {
            return Err(KernelError::Shape(format!(
                "column_stats unit {u}: {} key rows, the segments reach row {key_rows}",
                unit.keys.len() / d
            )));
        }
    }
    Ok(())
}
