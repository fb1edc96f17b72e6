//! The model trait every architecture implements, and the decoder stack (weights + forward
//! graph) that the LLaMA-family architectures share. The forward is written once over the
//! `kvzip-kernels` device interface: the same code runs on the CPU (f32) and on CUDA (bf16).

use kvzip_cache::KvCache;
use kvzip_kernels::{AttentionShape, DType, Device, LinearStore, Tensor, View, ViewMut, Weight};

use crate::config::{Activation, ModelSpec};
use crate::error::{ModelError, Result};
use crate::layers::{DecoderLayer, DecoderNames, Linear, Norm};
use crate::loader::WeightLoader;

/// Which logits a forward pass should return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// No logits (cache fill only, e.g. prefill of a context or scoring passes).
    None,
    /// Logits of the last input token only: `[vocab]`.
    Last,
    /// Logits of every input token: `[t, vocab]`.
    All,
}

/// Observer called inside every attention layer once the step's K/V are in the cache.
///
/// KVzip scoring and the baseline scorers use it to see the rotated queries together with the
/// full cache (keys of the system prompt, the context and the current input).
pub trait AttentionHook {
    /// The residual stream `x` (`[rows, hidden]` on `device`, rows at positions
    /// `first_pos..`) entering layer `layer`; the default ignores it.
    fn layer_input(
        &mut self,
        _device: &Device,
        _layer: usize,
        _x: &View<'_>,
        _rows: usize,
        _first_pos: usize,
    ) -> Result<()> {
        Ok(())
    }

    /// `q`: rotated queries `[q_len, n_heads, head_dim]` of layer `layer` on `device`; `cache`
    /// already holds the K/V of these `q_len` tokens at the end of every head's segment. The
    /// default ignores them.
    fn after_append(
        &mut self,
        _device: &Device,
        _layer: usize,
        _q: &View<'_>,
        _q_len: usize,
        _cache: &KvCache,
    ) -> Result<()> {
        Ok(())
    }

    /// Computes the layer's attention output (`out`, `[q_len, n_heads, head_dim]`, per
    /// `shape`) itself, e.g. fused with a score op over the same logits, and returns true; the
    /// default returns false and the step attends as usual. `out` is `None` when nothing reads
    /// the output (the last layer of a pass without logits). Called after
    /// [`AttentionHook::after_append`].
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        _device: &Device,
        _layer: usize,
        _q: &View<'_>,
        _q_len: usize,
        _cache: &KvCache,
        _shape: &AttentionShape,
        _out: Option<&mut ViewMut<'_>>,
    ) -> Result<bool> {
        Ok(false)
    }
}

/// Options of one forward pass.
pub struct ForwardOptions<'a> {
    /// Which logits to compute.
    pub logits: LogitsMode,
    /// Optional attention observer (scoring).
    pub hook: Option<&'a mut dyn AttentionHook>,
    /// Keys per work item of the CUDA decode plans (`None`: the planner's default).
    pub decode_chunk_keys: Option<usize>,
}

impl ForwardOptions<'_> {
    /// Options returning logits per `mode`, without a hook.
    pub fn logits(mode: LogitsMode) -> Self {
        Self {
            logits: mode,
            hook: None,
            decode_chunk_keys: None,
        }
    }
}

/// A causal language model on one device, running on the flattened per-head KV cache.
///
/// Implementations live one file per architecture in `models/`; registration is one line in
/// `models/mod.rs`.
pub trait CausalLm: Send + Sync {
    /// The normalised model description.
    fn spec(&self) -> &ModelSpec;

    /// The device the weights live on (and the cache must live on).
    fn device(&self) -> &Device;

    /// Runs `ids` at positions `cache.seen_tokens()..+ids.len()`, appending their K/V to the
    /// cache and advancing `seen_tokens`. Returns logits per `opts.logits` as an f32 tensor on
    /// the device (`[1, vocab]` for `Last`, `[t, vocab]` for `All`, `None` for `None`).
    /// `scratch` holds the activation buffers between calls.
    fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        scratch: &mut Scratch,
        opts: ForwardOptions<'_>,
    ) -> Result<Option<Tensor>>;

    /// [`CausalLm::forward`] over any [`StepKv`] (e.g. a batch of sequences on shared
    /// contexts); `opts.hook` needs a step with a single cache.
    fn forward_step(
        &self,
        ids: &[u32],
        step: &mut dyn StepKv,
        scratch: &mut Scratch,
        opts: ForwardOptions<'_>,
    ) -> Result<Option<Tensor>>;

    /// Bytes of weights one decode step reads (every layer, the final norm and the LM head):
    /// the weight term of the decode bandwidth floor.
    fn weight_bytes(&self) -> usize;

    /// Decoder layer `l`'s weights (output projection, RoPE, ...) for scorers that need them
    /// (Expected Attention, KVzip+); `None` for models without the shared decoder.
    fn layer(&self, _l: usize) -> Option<&crate::layers::DecoderLayer> {
        None
    }
}

/// What one forward step reads and writes of the KV cache: the positions of the step's input
/// rows, where their keys and values go, and what their queries attend to. One sequence on one
/// [`KvCache`] is [`CacheStep`]; a batch of sequences on shared compressed contexts plus
/// private suffixes is [`crate::batch::BatchStep`]. The forward graph is the same for both.
pub trait StepKv {
    /// Starts a step of `rows` input rows (checking the cache fits the model on `device`);
    /// returns each row's absolute position (for RoPE).
    fn begin(&mut self, device: &Device, spec: &ModelSpec, rows: usize) -> Result<Vec<i32>>;

    /// Stores layer `layer`'s keys and values of the step rows (`[rows, n_kv_heads, head_dim]`,
    /// after RoPE).
    fn write(&mut self, layer: usize, k: View<'_>, v: View<'_>) -> Result<()>;

    /// Attention of the step's queries (`[rows, n_heads, head_dim]`) in layer `layer`: `shape`
    /// holds the layer's scale, window and softcap with `q_len = rows` and the model's KV heads.
    fn attend(
        &mut self,
        device: &Device,
        layer: usize,
        q: &View<'_>,
        shape: &AttentionShape,
        out: &mut ViewMut<'_>,
    ) -> Result<()>;

    /// Input rows per sequence (rows of one sequence are consecutive): all of them for one
    /// sequence, 1 in a decode step of a batch.
    fn rows_per_sequence(&self) -> usize;

    /// The single cache the step runs on, for attention hooks (`None` for batches).
    fn cache(&self) -> Option<&KvCache> {
        None
    }
}

/// One sequence continuing one [`KvCache`]: the step's rows are appended to every head and
/// attend to the whole cache (decode plans built once per step on CUDA).
pub struct CacheStep<'a> {
    cache: &'a mut KvCache,
    chunk_keys: Option<usize>,
    plans: Vec<Option<kvzip_kernels::AttentionPlan>>,
}

impl<'a> CacheStep<'a> {
    /// A step on `cache`; `chunk_keys`: keys per CUDA decode work item (`None`: default).
    pub fn new(cache: &'a mut KvCache, chunk_keys: Option<usize>) -> Self {
        Self {
            cache,
            chunk_keys,
            plans: Vec::new(),
        }
    }
}

impl StepKv for CacheStep<'_> {
    fn begin(&mut self, device: &Device, s: &ModelSpec, rows: usize) -> Result<Vec<i32>> {
        let cache = &mut *self.cache;
        if cache.device() != device {
            return Err(ModelError::Input(format!(
                "the KV cache lives on {}, the model on {}; create the cache with the engine",
                cache.device().name(),
                device.name()
            )));
        }
        if cache.n_layers() != s.n_layers()
            || cache
                .layers()
                .iter()
                .any(|l| l.n_kv_heads() != s.n_kv_heads || l.head_dim() != s.head_dim)
        {
            return Err(ModelError::Input(format!(
                "the KV cache's layers do not fit this model ({} layers of {} KV heads x {}); \
                 create the cache with the engine",
                s.n_layers(),
                s.n_kv_heads,
                s.head_dim
            )));
        }
        let start = cache.seen_tokens();
        cache.begin_step(rows)?;
        // Decode plans of every layer, written with one copy before the first launch of the
        // step, so that no host-to-device upload sits between this step's kernels (none on
        // the host).
        let lens: Vec<&[usize]> = cache.layers().iter().map(|lc| lc.lens()).collect();
        self.plans = device.attention_plans(&lens, rows, self.chunk_keys)?;
        Ok((start..start + rows).map(|p| p as i32).collect())
    }

    fn write(&mut self, layer: usize, k: View<'_>, v: View<'_>) -> Result<()> {
        Ok(self.cache.write_step(layer, k, v)?)
    }

    fn attend(
        &mut self,
        device: &Device,
        layer: usize,
        q: &View<'_>,
        shape: &AttentionShape,
        out: &mut ViewMut<'_>,
    ) -> Result<()> {
        let kv = self.cache.kv_view(layer)?;
        let plan = self.plans.get(layer).and_then(Option::as_ref);
        Ok(device.attention(q, &kv, shape, plan, out)?)
    }

    fn rows_per_sequence(&self) -> usize {
        usize::MAX
    }

    fn cache(&self) -> Option<&KvCache> {
        Some(self.cache)
    }
}

/// Activation buffers of one forward step, grown on demand (no allocation per step once warm).
#[derive(Default)]
pub struct Scratch {
    rows: usize,
    bufs: Option<Buffers>,
}

struct Buffers {
    x: Tensor,
    delta: Tensor,
    normed: Tensor,
    q: Tensor,
    kv: Tensor,
    head_tmp: Tensor,
    qkv: Tensor,
    attn: Tensor,
    gate_up: Tensor,
    act: Tensor,
    ids: Tensor,
    positions: Tensor,
}

impl Scratch {
    fn ensure(&mut self, dev: &Device, s: &ModelSpec, rows: usize) -> Result<&mut Buffers> {
        if self.bufs.is_none() || self.rows < rows {
            let (h, d, i) = (s.hidden_size, s.head_dim, s.intermediate_size);
            let (qd, kvd) = (s.n_heads * d, s.n_kv_heads * d);
            let r = rows.max(1);
            let f = dev.float_dtype();
            // Zeroed once per size (not per step): every byte a kernel can read is defined,
            // however the GEMM library stores its outputs (initcheck does not track cuBLAS's
            // stores and reported RoPE reading q/k "uninitialized" before this).
            self.bufs = None;
            self.bufs = Some(Buffers {
                x: dev.zeros(f, r * h)?,
                delta: dev.zeros(f, r * h)?,
                normed: dev.zeros(f, r * h)?,
                q: dev.zeros(f, r * qd)?,
                kv: dev.zeros(f, 2 * r * kvd)?,
                head_tmp: dev.zeros(f, r * qd.max(kvd))?,
                qkv: dev.zeros(f, qd + 2 * kvd)?,
                attn: dev.zeros(f, r * qd)?,
                gate_up: dev.zeros(f, r * 2 * i)?,
                act: dev.zeros(f, r * i)?,
                ids: dev.zeros(DType::U32, r)?,
                positions: dev.zeros(DType::I32, r)?,
            });
            self.rows = r;
        }
        self.bufs
            .as_mut()
            .ok_or_else(|| ModelError::Input("scratch buffers missing".into()))
    }
}

/// The generic decoder: embedding, layers, final norm, LM head. LLaMA, Qwen2, Qwen3, Gemma3,
/// Mistral and Phi-3 are all this stack with different [`ModelSpec`] switches and
/// [`DecoderNames`].
pub struct DecoderStack {
    device: Device,
    spec: ModelSpec,
    embed: Weight,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    lm_head: Option<Weight>,
}

/// Views of one step's q (`[t, n_heads, head_dim]`) and of k then v (`[t, n_kv, head_dim]`
/// each, k first).
type QandKv<'a> = (ViewMut<'a>, ViewMut<'a>);

/// q, k, v projections. One token: one GEMM over the stacked weights into `fused`, whose row
/// is `[q | k | v]`; more tokens: one GEMM per row block of the stacked weights into `q` and
/// the two halves of `kv`.
#[allow(clippy::too_many_arguments)]
fn project_qkv<'a>(
    dev: &Device,
    qkv: &Linear,
    x: &View<'_>,
    t: usize,
    (qd, kvd): (usize, usize),
    q: &'a mut Tensor,
    kv: &'a mut Tensor,
    fused: &'a mut Tensor,
) -> Result<QandKv<'a>> {
    if t == 1 {
        let mut f = fused.slice_mut(0..qd + 2 * kvd)?;
        qkv.forward(dev, x, &mut f, 1)?;
        return Ok(fused.split_at_mut(qd)?);
    }
    let mut q = q.slice_mut(0..t * qd)?;
    qkv.forward_part(dev, x, &mut q, t, 0, qd)?;
    let mut kv = kv.slice_mut(0..2 * t * kvd)?;
    {
        let (mut k, mut v) = kv.split_at_mut(t * kvd)?;
        qkv.forward_part(dev, x, &mut k, t, qd, kvd)?;
        qkv.forward_part(dev, x, &mut v, t, qd + kvd, kvd)?;
    }
    Ok((q, kv))
}

/// Seq-len-dependent RoPE (longrope, dynamic NTK): HF picks the frequencies per forward from
/// the largest position of the sequence. Input rows come `per_seq` per sequence; returns runs
/// `(first row, end row, inv_freq)` of consecutive sequences that share frequencies.
fn rope_runs(
    dev: &Device,
    params: &kvzip_kernels::rope::RopeParams,
    positions: &[i32],
    per_seq: usize,
) -> Result<Vec<(usize, usize, Tensor)>> {
    let mut runs: Vec<(usize, usize, Vec<f32>)> = Vec::new();
    for (s, rows) in positions.chunks(per_seq.max(1)).enumerate() {
        let seq_len = rows.iter().copied().max().unwrap_or(0).max(0) as usize + 1;
        let freq = params.inv_freq_for_seq_len(seq_len);
        let (r0, r1) = (s * per_seq, s * per_seq + rows.len());
        match runs.last_mut() {
            Some(last) if last.2 == freq && last.1 == r0 => last.1 = r1,
            _ => runs.push((r0, r1, freq)),
        }
    }
    runs.into_iter()
        .map(|(a, b, f)| Ok((a, b, crate::loader::f32_tensor(dev, &f)?)))
        .collect()
}

/// Gemma's norm after a sub-block: `delta = norm(delta)` (through `normed`, then swapped).
/// Which decode-row GEMV fusions the forward uses (CUDA, 1-2 rows): `glu` (gate, up and the
/// activation in one product), `norm` (RMSNorm inside the next product), `add` (the residual
/// add inside the o / down products). All on by default; `KVZIP_DECODE_FUSION` (a comma list
/// of `glu`, `norm`, `add`, or `none`) picks a subset, for benchmarks and bisecting.
#[derive(Debug, Clone, Copy)]
struct DecodeFusion {
    glu: bool,
    norm: bool,
    add: bool,
}

impl DecodeFusion {
    /// The fusions a forward of `rows` rows on `dev` uses: none beyond the rows the device
    /// fuses (none at all on the CPU), else the [`Self::from_env`] choice.
    fn for_rows(dev: &Device, rows: usize) -> Self {
        let on = rows <= dev.fused_linear_max_rows();
        let f = Self::from_env();
        DecodeFusion {
            glu: on && f.glu,
            norm: on && f.norm,
            add: on && f.add,
        }
    }

    fn from_env() -> Self {
        static CHOICE: std::sync::OnceLock<DecodeFusion> = std::sync::OnceLock::new();
        *CHOICE.get_or_init(|| match std::env::var("KVZIP_DECODE_FUSION") {
            Ok(v) => {
                let has = |name: &str| v.split(',').any(|p| p.trim() == name);
                DecodeFusion {
                    glu: has("glu"),
                    norm: has("norm"),
                    add: has("add"),
                }
            }
            Err(_) => DecodeFusion {
                glu: true,
                norm: true,
                add: true,
            },
        })
    }
}

fn post_norm(dev: &Device, norm: Option<&Norm>, b: &mut Buffers, rows: usize) -> Result<()> {
    if let Some(n) = norm {
        n.apply(
            dev,
            &mut b.delta.view_mut(),
            None,
            &mut b.normed.view_mut(),
            rows,
        )?;
        std::mem::swap(&mut b.delta, &mut b.normed);
    }
    Ok(())
}

/// Per-head norm in place (q/k-norm) through a scratch buffer.
fn head_norm(
    dev: &Device,
    norm: &Norm,
    x: &mut ViewMut<'_>,
    tmp: &mut Tensor,
    rows: usize,
) -> Result<()> {
    let n = rows * norm.dim;
    let mut out = tmp.slice_mut(0..n)?;
    norm.apply(dev, &mut x.slice_mut(0..n)?, None, &mut out, rows)?;
    dev.copy(&out.as_view(), &mut x.slice_mut(0..n)?)?;
    Ok(())
}

impl DecoderStack {
    /// Loads every weight named by `names` onto the loader's device.
    pub fn load(w: &WeightLoader<'_>, names: &DecoderNames, spec: ModelSpec) -> Result<Self> {
        let (v, h) = (spec.vocab_size, spec.hidden_size);
        let embed = w.weight(&format!("{}.embed_tokens.weight", names.prefix), &[v, h])?;
        let layers = spec
            .layers
            .iter()
            .enumerate()
            .map(|(l, ls)| DecoderLayer::load(w, names, l, &spec, ls))
            .collect::<Result<Vec<_>>>()?;
        let norm = Norm::load(w, &format!("{}.norm", names.prefix), h, &spec)?;
        let lm_head = if spec.tie_word_embeddings && !w.contains(&names.lm_head, false) {
            None
        } else {
            Some(w.weight(&names.lm_head, &[v, h])?)
        };
        Ok(Self {
            device: w.device().clone(),
            spec,
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// The model description.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The LM head matrix `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Decoder layer `l` (see [`CausalLm::layer`]).
    pub fn layer(&self, l: usize) -> Option<&DecoderLayer> {
        self.layers.get(l)
    }

    /// See [`CausalLm::weight_bytes`].
    pub fn weight_bytes(&self) -> usize {
        self.layers.iter().map(DecoderLayer::bytes).sum::<usize>()
            + self.lm_head().bytes()
            + self.norm.bytes()
    }

    fn activation(&self) -> kvzip_kernels::Activation {
        match self.spec.activation {
            Activation::Silu => kvzip_kernels::Activation::Silu,
            Activation::GeluTanh => kvzip_kernels::Activation::GeluTanh,
        }
    }

    /// See [`CausalLm::forward`].
    pub fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        scratch: &mut Scratch,
        opts: ForwardOptions<'_>,
    ) -> Result<Option<Tensor>> {
        let chunk = opts.decode_chunk_keys;
        self.forward_step(ids, &mut CacheStep::new(cache, chunk), scratch, opts)
    }

    /// See [`CausalLm::forward_step`].
    pub fn forward_step(
        &self,
        ids: &[u32],
        step: &mut dyn StepKv,
        scratch: &mut Scratch,
        mut opts: ForwardOptions<'_>,
    ) -> Result<Option<Tensor>> {
        let t = ids.len();
        if t == 0 {
            return Err(ModelError::Input("forward called with no tokens".into()));
        }
        let dev = &self.device;
        let s = &self.spec;
        if let Some((i, &bad)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= s.vocab_size)
        {
            return Err(ModelError::Input(format!(
                "token id {bad} at position {i} is outside the vocabulary ({}); the tokenizer \
                 does not match the model",
                s.vocab_size
            )));
        }
        let (h, d, inter) = (s.hidden_size, s.head_dim, s.intermediate_size);
        let (nq, nkv) = (s.n_heads, s.n_kv_heads);
        let positions = step.begin(dev, s, t)?;
        let b = scratch.ensure(dev, s, t)?;
        dev.write_u32(&mut b.ids.slice_mut(0..t)?, ids)?;
        dev.write_i32(&mut b.positions.slice_mut(0..t)?, &positions)?;

        dev.embedding_weight(
            &b.ids.slice(0..t)?,
            &self.embed,
            &mut b.x.view_mut(),
            h,
            s.embed_scale,
        )?;
        let shape_for = |window: Option<usize>| AttentionShape {
            q_len: t,
            n_kv_heads: nkv,
            group: s.group(),
            head_dim: d,
            scale: s.attn_scale,
            window,
            softcap: s.attn_softcap,
        };
        let mut pending_delta = false;
        // Decode rows on CUDA run the GEMV with its fusions (norm, residual add, GLU); each
        // fused call falls back to the unfused ops where the kernel does not apply.
        let fusion = DecodeFusion::for_rows(dev, t);
        let n_layers = self.layers.len();
        for (l, layer) in self.layers.iter().enumerate() {
            // Rows `start..end` with their frequencies: one run for the usual RoPE; for the
            // seq-len-dependent kinds, runs of sequences whose largest position selects the
            // same frequencies (each sequence of a batch on its own, as it would run alone).
            let dynamic: Vec<(usize, usize, Tensor)> = if layer.rope.params.depends_on_seq_len() {
                rope_runs(
                    dev,
                    &layer.rope.params,
                    &positions,
                    step.rows_per_sequence(),
                )?
            } else {
                Vec::new()
            };
            // x += delta (previous MLP output); normed = input_norm(x). One decode row whose x
            // is already whole (the last product added itself into it) instead has the norm
            // run inside the qkv product.
            let norm_in_qkv = fusion.norm && t == 1 && !pending_delta;
            if !norm_in_qkv {
                let res = pending_delta.then(|| b.delta.view());
                layer.input_norm.apply(
                    dev,
                    &mut b.x.view_mut(),
                    res.as_ref(),
                    &mut b.normed.view_mut(),
                    t,
                )?;
            }
            if let Some(hk) = opts.hook.as_deref_mut() {
                let first = positions.first().copied().unwrap_or(0).max(0) as usize;
                hk.layer_input(dev, l, &b.x.slice(0..t * h)?, t, first)?;
            }
            let qkv_fused = norm_in_qkv
                && layer.qkv.forward_fused(
                    dev,
                    &b.x.view(),
                    Some(&layer.input_norm),
                    &mut b.qkv.slice_mut(0..(nq + 2 * nkv) * d)?,
                    1,
                    LinearStore::Output,
                )?;
            if norm_in_qkv && !qkv_fused {
                let (x, normed) = (&mut b.x.view_mut(), &mut b.normed.view_mut());
                layer.input_norm.apply(dev, x, None, normed, t)?;
            }
            let (mut q, mut kv_new) = if qkv_fused {
                b.qkv.split_at_mut(nq * d)?
            } else {
                project_qkv(
                    dev,
                    &layer.qkv,
                    &b.normed.view(),
                    t,
                    (nq * d, nkv * d),
                    &mut b.q,
                    &mut b.kv,
                    &mut b.qkv,
                )?
            };
            let (mut k, v) = kv_new.split_at_mut(t * nkv * d)?;
            if let Some(n) = &layer.q_norm {
                head_norm(dev, n, &mut q, &mut b.head_tmp, t * nq)?;
            }
            if let Some(n) = &layer.k_norm {
                head_norm(dev, n, &mut k, &mut b.head_tmp, t * nkv)?;
            }
            if dynamic.is_empty() {
                dev.rope(
                    &mut q,
                    Some(&mut k),
                    &b.positions.slice(0..t)?,
                    &layer.rope.inv_freq.view(),
                    t,
                    nq,
                    nkv,
                    d,
                    layer.rope.factor,
                )?;
            }
            for (r0, r1, freq) in &dynamic {
                dev.rope(
                    &mut q.slice_mut(r0 * nq * d..r1 * nq * d)?,
                    Some(&mut k.slice_mut(r0 * nkv * d..r1 * nkv * d)?),
                    &b.positions.slice(*r0..*r1)?,
                    &freq.view(),
                    r1 - r0,
                    nq,
                    nkv,
                    d,
                    layer.rope.factor,
                )?;
            }
            step.write(l, k.as_view(), v.as_view())?;
            let q = q.as_view();
            let shape = shape_for(layer.window);
            let last_unread = matches!(opts.logits, LogitsMode::None) && l + 1 == n_layers;
            let mut attended = false;
            if let Some(hk) = opts.hook.as_deref_mut() {
                let cache = step.cache().ok_or_else(|| {
                    ModelError::Input("attention hooks need a single-cache step".into())
                })?;
                hk.after_append(dev, l, &q, t, cache)?;
                let mut out = b.attn.view_mut();
                attended = hk.attend(
                    dev,
                    l,
                    &q,
                    t,
                    cache,
                    &shape,
                    (!last_unread).then_some(&mut out),
                )?;
            }
            if last_unread {
                // Nothing reads the last layer's output when no logits are wanted (its K/V are
                // in the cache and the hooks have seen its queries).
                return Ok(None);
            }
            if !attended {
                step.attend(dev, l, &q, &shape, &mut b.attn.view_mut())?;
            }
            // x += o(attention): on decode rows the product adds itself into x.
            let o_added = fusion.add
                && layer.post_attention_norm.is_none()
                && layer.o.forward_fused(
                    dev,
                    &b.attn.view(),
                    None,
                    &mut b.x.slice_mut(0..t * h)?,
                    t,
                    LinearStore::AddInto,
                )?;
            if !o_added {
                layer
                    .o
                    .forward(dev, &b.attn.view(), &mut b.delta.view_mut(), t)?;
                post_norm(dev, layer.post_attention_norm.as_ref(), b, t)?;
            }
            // act = act(gate) * up of pre_mlp_norm(x). Decode rows: the norm (when x is
            // already whole), gate, up and the activation in one kernel.
            let act = LinearStore::Glu(self.activation());
            let mut act_done = o_added
                && fusion.norm
                && fusion.glu
                && layer.gate_up.forward_fused(
                    dev,
                    &b.x.view(),
                    Some(&layer.pre_mlp_norm),
                    &mut b.act.view_mut(),
                    t,
                    act,
                )?;
            if !act_done {
                let res = (!o_added).then(|| b.delta.view());
                layer.pre_mlp_norm.apply(
                    dev,
                    &mut b.x.view_mut(),
                    res.as_ref(),
                    &mut b.normed.view_mut(),
                    t,
                )?;
                act_done = fusion.glu
                    && layer.gate_up.forward_fused(
                        dev,
                        &b.normed.view(),
                        None,
                        &mut b.act.view_mut(),
                        t,
                        act,
                    )?;
            }
            if !act_done {
                layer
                    .gate_up
                    .forward(dev, &b.normed.view(), &mut b.gate_up.view_mut(), t)?;
                dev.act_mul(
                    &b.gate_up.view(),
                    &mut b.act.view_mut(),
                    t,
                    inter,
                    self.activation(),
                )?;
            }
            // x += down(act), added in place on decode rows, else left in delta for the next
            // norm's fused add.
            let down_added = fusion.add
                && layer.post_mlp_norm.is_none()
                && layer.down.forward_fused(
                    dev,
                    &b.act.view(),
                    None,
                    &mut b.x.slice_mut(0..t * h)?,
                    t,
                    LinearStore::AddInto,
                )?;
            if !down_added {
                layer
                    .down
                    .forward(dev, &b.act.view(), &mut b.delta.view_mut(), t)?;
                post_norm(dev, layer.post_mlp_norm.as_ref(), b, t)?;
            }
            pending_delta = !down_added;
        }
        let (first, rows) = match opts.logits {
            LogitsMode::None => return Ok(None),
            LogitsMode::Last => (t - 1, 1),
            LogitsMode::All => (0, t),
        };
        let span = first * h..(first + rows) * h;
        let v = s.vocab_size;
        // Zeroed (one memset per call): compute-sanitizer's initcheck does not see cuBLAS's
        // stores, so a sampler reading the GEMM's output would be reported as reading
        // uninitialized memory; with the memset every byte is defined either way.
        let mut logits = dev.zeros(DType::F32, rows * v)?;
        // Decode rows whose x is whole: the final norm runs inside the lm_head product.
        if fusion.norm && !pending_delta {
            let gv = self.norm.weight.view();
            let pre = self.norm.pre_norm(&gv);
            if dev.linear_fused_weight(
                &b.x.slice(span.clone())?,
                self.lm_head(),
                None,
                Some(pre),
                &mut logits.view_mut(),
                rows,
                v,
                h,
                LinearStore::OutputF32,
            )? {
                if let Some(cap) = s.final_softcap {
                    dev.softcap(&mut logits.view_mut(), cap)?;
                }
                return Ok(Some(logits));
            }
        }
        // Last MLP output folded into only the rows whose logits are wanted (fused add + norm).
        let res = pending_delta
            .then(|| b.delta.slice(span.clone()))
            .transpose()?;
        self.norm.apply(
            dev,
            &mut b.x.slice_mut(span)?,
            res.as_ref(),
            &mut b.normed.view_mut(),
            rows,
        )?;
        dev.linear_weight(
            &b.normed.slice(0..rows * h)?,
            self.lm_head(),
            0,
            None,
            &mut logits.view_mut(),
            rows,
            v,
            h,
        )?;
        if let Some(cap) = s.final_softcap {
            dev.softcap(&mut logits.view_mut(), cap)?;
        }
        Ok(Some(logits))
    }
}
