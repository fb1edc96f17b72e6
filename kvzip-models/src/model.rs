//! The model trait every architecture implements, and the decoder stack (weights + forward
//! graph) that the LLaMA-family architectures share. The forward is written once over the
//! `kvzip-kernels` device interface: the same code runs on the CPU (f32) and on CUDA (bf16).

use kvzip_cache::KvCache;
use kvzip_kernels::{AttentionShape, DType, Device, Tensor, View, ViewMut};

use crate::config::{Activation, ModelSpec};
use crate::error::{ModelError, Result};
use crate::layers::{DecoderLayer, DecoderNames, Linear, Norm};
use crate::loader::{Init, WeightLoader};

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
    /// `q`: rotated queries `[q_len, n_heads, head_dim]` of layer `layer` on `device`; `cache`
    /// already holds the K/V of these `q_len` tokens at the end of every head's segment.
    fn after_append(
        &mut self,
        device: &Device,
        layer: usize,
        q: &View<'_>,
        q_len: usize,
        cache: &KvCache,
    ) -> Result<()>;
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

    /// Bytes of weights one decode step reads (every layer, the final norm and the LM head):
    /// the weight term of the decode bandwidth floor.
    fn weight_bytes(&self) -> usize;
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
            self.bufs = None;
            self.bufs = Some(Buffers {
                x: dev.alloc(f, r * h)?,
                delta: dev.alloc(f, r * h)?,
                normed: dev.alloc(f, r * h)?,
                q: dev.alloc(f, r * qd)?,
                kv: dev.alloc(f, 2 * r * kvd)?,
                head_tmp: dev.alloc(f, r * qd.max(kvd))?,
                qkv: dev.alloc(f, qd + 2 * kvd)?,
                attn: dev.alloc(f, r * qd)?,
                gate_up: dev.alloc(f, r * 2 * i)?,
                act: dev.alloc(f, r * i)?,
                ids: dev.alloc(DType::U32, r)?,
                positions: dev.alloc(DType::I32, r)?,
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
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    lm_head: Option<Tensor>,
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

/// Gemma's norm after a sub-block: `delta = norm(delta)` (through `normed`, then swapped).
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
        let embed = w.tensor(
            &format!("{}.embed_tokens.weight", names.prefix),
            &[v, h],
            Init::Matrix,
        )?;
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
            Some(w.tensor(&names.lm_head, &[v, h], Init::Matrix)?)
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
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
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
        mut opts: ForwardOptions<'_>,
    ) -> Result<Option<Tensor>> {
        let t = ids.len();
        if t == 0 {
            return Err(ModelError::Input("forward called with no tokens".into()));
        }
        let dev = &self.device;
        if cache.device() != dev {
            return Err(ModelError::Input(format!(
                "the KV cache lives on {}, the model on {}; create the cache with the engine",
                cache.device().name(),
                dev.name()
            )));
        }
        let s = &self.spec;
        if cache.n_layers() != self.layers.len()
            || cache
                .layers()
                .iter()
                .any(|l| l.n_kv_heads() != s.n_kv_heads || l.head_dim() != s.head_dim)
        {
            return Err(ModelError::Input(format!(
                "the KV cache's layers do not fit this model ({} layers of {} KV heads x {}); \
                 create the cache with the engine",
                self.layers.len(),
                s.n_kv_heads,
                s.head_dim
            )));
        }
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
        let start = cache.seen_tokens();
        let positions: Vec<i32> = (start..start + t).map(|p| p as i32).collect();
        let b = scratch.ensure(dev, s, t)?;
        dev.write_u32(&mut b.ids.slice_mut(0..t)?, ids)?;
        dev.write_i32(&mut b.positions.slice_mut(0..t)?, &positions)?;
        cache.begin_step(t)?;

        dev.embedding(
            &b.ids.slice(0..t)?,
            &self.embed.view(),
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
        // Decode plans of every layer, built before the first launch of the step so that no
        // host-to-device upload sits between this step's kernels (none on the host).
        let plans = cache
            .layers()
            .iter()
            .map(|lc| dev.attention_plan(lc.lens(), t, opts.decode_chunk_keys))
            .collect::<kvzip_kernels::Result<Vec<_>>>()?;
        // Seq-len-dependent RoPE (longrope, dynamic NTK) picks its frequencies per forward.
        let seq_len = start + t;
        let mut pending_delta = false;
        for (l, layer) in self.layers.iter().enumerate() {
            let dynamic_freq = if layer.rope.params.depends_on_seq_len() {
                Some(crate::loader::f32_tensor(
                    dev,
                    &layer.rope.params.inv_freq_for_seq_len(seq_len),
                )?)
            } else {
                None
            };
            let inv_freq = dynamic_freq.as_ref().unwrap_or(&layer.rope.inv_freq);
            // x += delta (previous MLP output); normed = input_norm(x).
            {
                let res = pending_delta.then(|| b.delta.view());
                layer.input_norm.apply(
                    dev,
                    &mut b.x.view_mut(),
                    res.as_ref(),
                    &mut b.normed.view_mut(),
                    t,
                )?;
            }
            let normed = b.normed.view();
            let (mut q, mut kv_new) = project_qkv(
                dev,
                &layer.qkv,
                &normed,
                t,
                (nq * d, nkv * d),
                &mut b.q,
                &mut b.kv,
                &mut b.qkv,
            )?;
            let (mut k, v) = kv_new.split_at_mut(t * nkv * d)?;
            if let Some(n) = &layer.q_norm {
                head_norm(dev, n, &mut q, &mut b.head_tmp, t * nq)?;
            }
            if let Some(n) = &layer.k_norm {
                head_norm(dev, n, &mut k, &mut b.head_tmp, t * nkv)?;
            }
            dev.rope(
                &mut q,
                Some(&mut k),
                &b.positions.slice(0..t)?,
                &inv_freq.view(),
                t,
                nq,
                nkv,
                d,
                layer.rope.factor,
            )?;
            cache.write_step(l, k.as_view(), v.as_view())?;
            let q = q.as_view();
            if let Some(hk) = opts.hook.as_deref_mut() {
                hk.after_append(dev, l, &q, t, cache)?;
            }
            let shape = shape_for(layer.window);
            let kv = cache.kv_view(l)?;
            dev.attention(&q, &kv, &shape, plans[l].as_ref(), &mut b.attn.view_mut())?;
            layer
                .o
                .forward(dev, &b.attn.view(), &mut b.delta.view_mut(), t)?;
            post_norm(dev, layer.post_attention_norm.as_ref(), b, t)?;
            // x += attention output; normed = pre_mlp_norm(x).
            layer.pre_mlp_norm.apply(
                dev,
                &mut b.x.view_mut(),
                Some(&b.delta.view()),
                &mut b.normed.view_mut(),
                t,
            )?;
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
            layer
                .down
                .forward(dev, &b.act.view(), &mut b.delta.view_mut(), t)?;
            post_norm(dev, layer.post_mlp_norm.as_ref(), b, t)?;
            pending_delta = true;
        }
        let (first, rows) = match opts.logits {
            LogitsMode::None => return Ok(None),
            LogitsMode::Last => (t - 1, 1),
            LogitsMode::All => (0, t),
        };
        // Last MLP output folded into only the rows whose logits are wanted (fused add + norm).
        let span = first * h..(first + rows) * h;
        self.norm.apply(
            dev,
            &mut b.x.slice_mut(span.clone())?,
            Some(&b.delta.slice(span)?),
            &mut b.normed.view_mut(),
            rows,
        )?;
        let v = s.vocab_size;
        let mut logits = dev.alloc(DType::F32, rows * v)?;
        dev.linear(
            &b.normed.slice(0..rows * h)?,
            &self.lm_head().view(),
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
