//! Many sequences in one forward step: each continues a shared, read-only context cache (a
//! compressed document) with a private suffix (its question and answer so far). The suffixes
//! of all running sequences live in one [`SuffixPool`] (a [`KvCache`] whose heads are
//! `(slot, kv head)` pairs), so a decode step appends every sequence's new row with one gather
//! per layer and attends over all `(sequence, kv head)` key sets, context rows then suffix rows,
//! with one [`Device::attention_pieces`] launch per layer. The model's forward graph is the
//! same as for one sequence ([`crate::model::StepKv`]).

use kvzip_cache::{KvCache, KvStorage};
use kvzip_kernels::{AttentionShape, Device, KvPiece, KvPieces, View, ViewMut};

use crate::config::ModelSpec;
use crate::error::{ModelError, Result};
use crate::model::StepKv;

/// Private suffix storage of up to `n_slots` concurrent sequences.
pub struct SuffixPool {
    cache: KvCache,
    n_kv: usize,
    free: Vec<usize>,
    n_slots: usize,
}

impl SuffixPool {
    /// A pool for `n_slots` sequences of a model with `spec`'s layers on `device`, with
    /// `rows_per_slot` rows reserved per (slot, kv head) (it grows when a suffix is longer).
    pub fn new(
        device: &Device,
        spec: &ModelSpec,
        n_slots: usize,
        rows_per_slot: usize,
    ) -> Result<Self> {
        if n_slots == 0 {
            return Err(ModelError::Input(
                "a suffix pool needs at least one slot".into(),
            ));
        }
        let heads = n_slots * spec.n_kv_heads;
        let cache = KvCache::on_device(
            device,
            &vec![(heads, spec.head_dim); spec.n_layers()],
            rows_per_slot,
        )?;
        Ok(Self {
            cache,
            n_kv: spec.n_kv_heads,
            free: (0..n_slots).rev().collect(),
            n_slots,
        })
    }

    /// The cache holding every slot's suffix (heads are `(slot, kv head)` pairs).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Number of slots.
    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.n_slots - self.free.len()
    }

    /// Takes a free slot (`None` when all are in use).
    pub fn acquire(&mut self) -> Option<usize> {
        self.free.pop()
    }

    /// Empties `slot` and makes it free again.
    pub fn release(&mut self, slot: usize) -> Result<()> {
        if slot >= self.n_slots || self.free.contains(&slot) {
            return Err(ModelError::Input(format!("slot {slot} is not in use")));
        }
        self.cache.clear_heads(slot * self.n_kv, self.n_kv)?;
        self.free.push(slot);
        Ok(())
    }

    /// Suffix rows of `slot` (the same in every layer and head).
    pub fn len(&self, slot: usize) -> usize {
        self.cache
            .layer(0)
            .map_or(0, |l| l.lens().get(slot * self.n_kv).copied().unwrap_or(0))
    }

    /// Whether every slot is empty.
    pub fn is_empty(&self) -> bool {
        (0..self.n_slots).all(|s| self.len(s) == 0)
    }

    /// Allocated K+V bytes (free capacity included).
    pub fn bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// K+V bytes one token of one sequence takes, over all layers and kv heads.
    pub fn token_bytes(&self) -> usize {
        let per_head: usize = self
            .cache
            .layers()
            .iter()
            .map(|l| l.head_dim() * 2 * self.cache.storage().elem_bytes())
            .sum();
        per_head * self.n_kv
    }

    /// Live K+V bytes of `slot`.
    pub fn slot_bytes(&self, slot: usize) -> usize {
        self.len(slot) * self.token_bytes()
    }
}

/// One sequence of a [`BatchStep`]: its shared context and its pool slot.
#[derive(Clone, Copy)]
pub struct BatchSeq<'a> {
    /// The read-only context the sequence continues (a compressed cache; may be empty).
    pub context: &'a KvCache,
    /// Its slot in the pool.
    pub slot: usize,
}

/// A forward step of `seqs.len()` sequences with `t` new tokens each: many sequences with one
/// token each (a decode step), or one sequence with `t` tokens (its prompt). Input rows are
/// ordered sequence by sequence.
pub struct BatchStep<'a> {
    pool: &'a mut SuffixPool,
    seqs: Vec<BatchSeq<'a>>,
    t: usize,
    chunk_keys: Option<usize>,
}

impl<'a> BatchStep<'a> {
    /// A step of `seqs` with `t` tokens each on `pool`; `chunk_keys`: keys per CUDA work item.
    pub fn new(
        pool: &'a mut SuffixPool,
        seqs: Vec<BatchSeq<'a>>,
        t: usize,
        chunk_keys: Option<usize>,
    ) -> Self {
        Self {
            pool,
            seqs,
            t,
            chunk_keys,
        }
    }
}

impl StepKv for BatchStep<'_> {
    fn begin(&mut self, device: &Device, s: &ModelSpec, rows: usize) -> Result<Vec<i32>> {
        let (b, t) = (self.seqs.len(), self.t);
        if b == 0 || t == 0 || rows != b * t || (b > 1 && t > 1) {
            return Err(ModelError::Input(format!(
                "a batch step is many sequences with one token each or one sequence with many; \
                 got {b} sequences x {t} tokens for {rows} input rows"
            )));
        }
        if self.pool.cache.device() != device {
            return Err(ModelError::Input(
                "the suffix pool lives on another device than the model".into(),
            ));
        }
        let n_kv = self.pool.n_kv;
        let mut groups = Vec::with_capacity(b);
        let mut positions = Vec::with_capacity(rows);
        for (i, seq) in self.seqs.iter().enumerate() {
            let c = seq.context;
            if c.device() != device
                || c.n_layers() != s.n_layers()
                || c.layers()
                    .iter()
                    .any(|l| l.n_kv_heads() != n_kv || l.head_dim() != s.head_dim)
            {
                return Err(ModelError::Input(format!(
                    "sequence {i}: its context cache does not fit the model or lives on another \
                     device"
                )));
            }
            if seq.slot >= self.pool.n_slots || self.pool.free.contains(&seq.slot) {
                return Err(ModelError::Input(format!(
                    "sequence {i}: slot {} is not acquired",
                    seq.slot
                )));
            }
            let start = c.seen_tokens() + self.pool.len(seq.slot);
            s.check_length(start, t)?;
            groups.push((seq.slot * n_kv, n_kv, start as u32));
            positions.extend((start..start + t).map(|p| p as i32));
        }
        self.pool.cache.begin_step_heads(&groups, t)?;
        Ok(positions)
    }

    fn write(&mut self, layer: usize, k: View<'_>, v: View<'_>) -> Result<()> {
        Ok(self.pool.cache.write_step_heads(layer, k, v)?)
    }

    fn rows_per_sequence(&self) -> usize {
        self.t
    }

    fn attend(
        &mut self,
        device: &Device,
        layer: usize,
        q: &View<'_>,
        shape: &AttentionShape,
        out: &mut ViewMut<'_>,
    ) -> Result<()> {
        let kv = batch_pieces(self.pool, &self.seqs, layer, shape.head_dim)?;
        let batch_shape = AttentionShape {
            q_len: self.t,
            n_kv_heads: self.seqs.len() * self.pool.n_kv,
            ..*shape
        };
        Ok(device.attention_pieces(q, &kv, &batch_shape, self.chunk_keys, out)?)
    }
}

/// The keys of `layer` for a batch: per (sequence, kv head), virtual head
/// `sequence * n_kv_heads + kv_head`, the sequence's context rows then its suffix rows in
/// `pool` (what [`BatchStep`] attends over; benches time it alone).
pub fn batch_pieces<'a>(
    pool: &'a SuffixPool,
    seqs: &[BatchSeq<'a>],
    layer: usize,
    head_dim: usize,
) -> Result<KvPieces<'a>> {
    let n_kv = pool.n_kv;
    let mut lens = Vec::with_capacity(seqs.len() * n_kv);
    let mut pieces = Vec::with_capacity(2 * seqs.len() * n_kv);
    for (b, seq) in seqs.iter().enumerate() {
        for h in 0..n_kv {
            let vh = b * n_kv + h;
            let (ck, cv) = seq.context.head_rows(layer, h)?;
            let (sk, sv) = pool.cache.head_rows(layer, seq.slot * n_kv + h)?;
            let n_ctx = ck.len() / head_dim;
            let n_suf = sk.len() / head_dim;
            if n_ctx > 0 {
                pieces.push(KvPiece {
                    head: vh,
                    k: ck,
                    v: cv,
                    key_start: 0,
                });
            }
            pieces.push(KvPiece {
                head: vh,
                k: sk,
                v: sv,
                key_start: n_ctx,
            });
            lens.push(n_ctx + n_suf);
        }
    }
    Ok(KvPieces {
        head_dim,
        lens,
        pieces,
    })
}
