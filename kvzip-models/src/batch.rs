//! Many sequences in one forward step: each continues a shared, read-only context cache (a
//! compressed document) with a private suffix (its question and answer so far). The suffixes
//! of all running sequences live in one [`SuffixPool`] (a [`KvCache`] whose heads are
//! `(slot, kv head)` pairs), so a decode step appends every sequence's new row with one gather
//! per layer and attends over all `(sequence, kv head)` key sets, context rows then suffix rows,
//! with one [`Device::attention_pieces`] launch per layer. The model's forward graph is the
//! same as for one sequence ([`crate::model::StepKv`]).

use kvzip_cache::{KvCache, KvStorage};
use kvzip_kernels::{
    greedy_rows, AttentionShape, Device, KvPiece, KvPieces, TokenSampler, View, ViewMut,
};

use crate::config::ModelSpec;
use crate::engine::{Engine, GenerateOptions, Generation};
use crate::error::{ModelError, Result};
use crate::model::{LogitsMode, StepKv};

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

/// One sequence of [`Engine::generate_batch`]: `prompt` continues the read-only `context`.
#[derive(Clone, Copy)]
pub struct BatchRequest<'a> {
    /// The context (a compressed cache, or an empty one).
    pub context: &'a KvCache,
    /// Ids to feed before generating (at least one).
    pub prompt: &'a [u32],
}

/// A running sequence of [`Engine::generate_batch`].
struct Live {
    req: usize,
    slot: usize,
    next: u32,
    sampler: TokenSampler,
}

impl Engine {
    /// Generates for many requests at once with continuous batching over at most `max_batch`
    /// slots: each request's prompt is prefilled on its own, then every running request decodes
    /// one token per batched step (one forward for all), each attending over its own context
    /// plus its private suffix. Contexts are never changed. Per request the result is what
    /// [`Engine::generate`] gives on that context (same stop and length rules; greedy answers
    /// are equal up to floating-point summation order). `progress(done, total)` reports
    /// finished requests.
    pub fn generate_batch(
        &self,
        reqs: &[BatchRequest<'_>],
        opts: &GenerateOptions,
        max_batch: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Generation>> {
        let n = reqs.len();
        let mut out = vec![Generation::default(); n];
        if n == 0 || opts.max_new_tokens == 0 {
            return Ok(out);
        }
        if let Some(i) = reqs.iter().position(|r| r.prompt.is_empty()) {
            return Err(ModelError::Input(format!(
                "batch request {i}: generate needs at least one prompt token"
            )));
        }
        let dev = self.device().clone();
        let rows = reqs.iter().map(|r| r.prompt.len()).max().unwrap_or(0) + opts.max_new_tokens;
        let mut pool = SuffixPool::new(&dev, self.spec(), max_batch.clamp(1, n), rows)?;
        let mut live: Vec<Live> = Vec::new();
        let (mut next_req, mut done) = (0, 0);
        // Records token `tok` of request `r`; true when it is finished.
        let finish = |out: &mut Vec<Generation>, r: usize, tok: u32| {
            let g = &mut out[r];
            g.tokens.push(tok);
            if opts.stop_tokens.contains(&tok) {
                g.stopped = true;
            }
            g.stopped || g.tokens.len() >= opts.max_new_tokens
        };
        while done < n {
            while next_req < n && pool.in_use() < pool.n_slots() {
                let r = next_req;
                next_req += 1;
                let slot = pool
                    .acquire()
                    .ok_or_else(|| ModelError::Input("no free batch slot".into()))?;
                let seqs = vec![BatchSeq {
                    context: reqs[r].context,
                    slot,
                }];
                let mut step = BatchStep::new(&mut pool, seqs, reqs[r].prompt.len(), None);
                let mut logits = self
                    .forward_step(reqs[r].prompt, &mut step, LogitsMode::Last)?
                    .ok_or_else(|| ModelError::Input("forward returned no logits".into()))?;
                let mut sampler = TokenSampler::new(opts.sampling)?;
                let tok = sampler.next(&dev, &mut logits, 0)?;
                if finish(&mut out, r, tok) {
                    pool.release(slot)?;
                    done += 1;
                    progress(done, n);
                } else {
                    live.push(Live {
                        req: r,
                        slot,
                        next: tok,
                        sampler,
                    });
                }
            }
            if live.is_empty() {
                continue;
            }
            let ids: Vec<u32> = live.iter().map(|l| l.next).collect();
            let seqs: Vec<BatchSeq<'_>> = live
                .iter()
                .map(|l| BatchSeq {
                    context: reqs[l.req].context,
                    slot: l.slot,
                })
                .collect();
            let b = seqs.len();
            let mut step = BatchStep::new(&mut pool, seqs, 1, None);
            let mut logits = self
                .forward_step(&ids, &mut step, LogitsMode::All)?
                .ok_or_else(|| ModelError::Input("forward returned no logits".into()))?;
            let tokens = if live.iter().all(|l| l.sampler.is_greedy()) {
                greedy_rows(&dev, &mut logits, b)?
            } else {
                let vocab = logits.len() / b;
                let mut t = Vec::with_capacity(b);
                for (i, l) in live.iter_mut().enumerate() {
                    let mut row = logits.slice_mut(i * vocab..(i + 1) * vocab)?;
                    let step = out[l.req].tokens.len() as u64;
                    t.push(l.sampler.next_in(&dev, &mut row, step)?);
                }
                t
            };
            let mut i = 0;
            for tok in tokens {
                let l = &mut live[i];
                if finish(&mut out, l.req, tok) {
                    pool.release(l.slot)?;
                    live.remove(i);
                    done += 1;
                    progress(done, n);
                } else {
                    l.next = tok;
                    i += 1;
                }
            }
        }
        Ok(out)
    }
}
