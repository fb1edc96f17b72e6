//! One forward step of [`GpuModel`] over [`GpuKvCache`]: everything stays on the device; the
//! host only uploads the step's token ids, positions and the cache lengths.

use kvzip_kernels::cuda::attention::{AttentionShape, DecodePlan};
use kvzip_kernels::cuda::{bf16, CudaBackend, CudaSlice, CudaViewMut};

use super::cache::GpuKvCache;
use super::model::{GpuLinear, GpuModel, GpuNorm};
use crate::error::{ModelError, Result};
use crate::model::LogitsMode;

/// Observer called in every layer once the step's K/V are in the cache (KVzip scoring).
pub trait GpuAttentionHook {
    /// `q`: rotated queries `[q_len, n_heads, head_dim]` of layer `layer`.
    fn after_append(
        &mut self,
        gpu: &CudaBackend,
        layer: usize,
        q: &CudaViewMut<'_, bf16>,
        q_len: usize,
        cache: &GpuKvCache,
    ) -> Result<()>;
}

/// Steps of at most this many query tokens use the split-K decode kernel.
pub const DECODE_MAX_Q: usize = 16;

/// Activation buffers of one step, grown on demand (no allocation per step once warm).
#[derive(Default)]
pub struct Scratch {
    rows: usize,
    bufs: Option<Buffers>,
}

struct Buffers {
    x: CudaSlice<bf16>,
    delta: CudaSlice<bf16>,
    normed: CudaSlice<bf16>,
    q: CudaSlice<bf16>,
    kv: CudaSlice<bf16>,
    head_tmp: CudaSlice<bf16>,
    qkv: CudaSlice<bf16>,
    attn: CudaSlice<bf16>,
    gate_up: CudaSlice<bf16>,
    act: CudaSlice<bf16>,
    ids: CudaSlice<u32>,
    positions: CudaSlice<i32>,
}

impl Scratch {
    fn ensure(&mut self, gpu: &CudaBackend, m: &GpuModel, rows: usize) -> Result<&mut Buffers> {
        if self.bufs.is_none() || self.rows < rows {
            let s = &m.spec;
            let (h, d, i) = (s.hidden_size, s.head_dim, s.intermediate_size);
            let (qd, kvd) = (s.n_heads * d, s.n_kv_heads * d);
            let r = rows.max(1);
            self.bufs = Some(Buffers {
                x: gpu.alloc(r * h)?,
                delta: gpu.alloc(r * h)?,
                normed: gpu.alloc(r * h)?,
                q: gpu.alloc(r * qd)?,
                kv: gpu.alloc(2 * r * kvd)?,
                head_tmp: gpu.alloc(r * qd.max(kvd))?,
                qkv: gpu.alloc(qd + 2 * kvd)?,
                attn: gpu.alloc(r * qd)?,
                gate_up: gpu.alloc(r * 2 * i)?,
                act: gpu.alloc(r * i)?,
                ids: gpu.alloc(r)?,
                positions: gpu.alloc(r)?,
            });
            self.rows = r;
        }
        self.bufs
            .as_mut()
            .ok_or_else(|| ModelError::Input("scratch buffers missing".into()))
    }
}

fn linear(
    gpu: &CudaBackend,
    lin: &GpuLinear,
    x: &CudaSlice<bf16>,
    rows: usize,
    out: &mut CudaSlice<bf16>,
) -> Result<()> {
    gpu.linear(x, &lin.weight, out, rows, lin.out_dim, lin.in_dim)?;
    if let Some(b) = &lin.bias {
        gpu.add_bias(out, b, rows)?;
    }
    Ok(())
}

/// Views of one step's q (`[t, n_heads, head_dim]`) and of k then v (`[t, n_kv, head_dim]`
/// each, k first).
type QandKv<'a> = (CudaViewMut<'a, bf16>, CudaViewMut<'a, bf16>);

/// q, k, v projections. One token: one GEMM over the stacked weights into `fused`, whose row
/// is `[q | k | v]`; more tokens: one GEMM per row block of the stacked weights into `q` and
/// the two halves of `kv`.
#[allow(clippy::too_many_arguments)]
fn project_qkv<'a>(
    gpu: &CudaBackend,
    qkv: &GpuLinear,
    x: &CudaSlice<bf16>,
    t: usize,
    (qd, kvd): (usize, usize),
    q: &'a mut CudaSlice<bf16>,
    kv: &'a mut CudaSlice<bf16>,
    fused: &'a mut CudaSlice<bf16>,
) -> Result<QandKv<'a>> {
    let h = qkv.in_dim;
    if t == 1 {
        gpu.linear(x, &qkv.weight, fused, 1, qd + 2 * kvd, h)?;
        if let Some(bias) = &qkv.bias {
            gpu.add_bias(fused, bias, 1)?;
        }
        return Ok(fused.split_at_mut(qd));
    }
    let project = |start: usize, n: usize, out: &mut CudaViewMut<'_, bf16>| -> Result<()> {
        let w = qkv.weight.slice(start * h..(start + n) * h);
        gpu.linear(x, &w, out, t, n, h)?;
        if let Some(bias) = &qkv.bias {
            gpu.add_bias(out, &bias.slice(start..start + n), t)?;
        }
        Ok(())
    };
    let mut q = q.slice_mut(..t * qd);
    project(0, qd, &mut q)?;
    let mut kv = kv.slice_mut(..2 * t * kvd);
    {
        let (mut k, mut v) = kv.split_at_mut(t * kvd);
        project(qd, kvd, &mut k)?;
        project(qd + kvd, kvd, &mut v)?;
    }
    Ok((q, kv))
}

/// Per-head norm in place (q/k-norm) through a scratch buffer.
fn head_norm(
    gpu: &CudaBackend,
    norm: &GpuNorm,
    x: &mut CudaViewMut<'_, bf16>,
    tmp: &mut CudaSlice<bf16>,
    rows: usize,
    dim: usize,
) -> Result<()> {
    let n = rows * dim;
    norm.apply(gpu, x, None, tmp, rows)?;
    gpu.stream()
        .memcpy_dtod(&tmp.slice(..n), x)
        .map_err(|e| ModelError::Cuda(e.into()))?;
    Ok(())
}

impl GpuModel {
    /// Runs `ids` at positions `cache.seen_tokens..`, appending their K/V, and returns logits
    /// per `mode` as an f32 device buffer (`[1, vocab]` for `Last`, `[t, vocab]` for `All`,
    /// `None` for `LogitsMode::None`).
    pub fn forward(
        &self,
        gpu: &CudaBackend,
        ids: &[u32],
        cache: &mut GpuKvCache,
        scratch: &mut Scratch,
        mode: LogitsMode,
        mut hook: Option<&mut dyn GpuAttentionHook>,
    ) -> Result<Option<CudaSlice<f32>>> {
        let t = ids.len();
        if t == 0 {
            return Err(ModelError::Input("forward called with no tokens".into()));
        }
        let s = &self.spec;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= s.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary ({}); the tokenizer does not match the model",
                s.vocab_size
            )));
        }
        let (h, d, inter) = (s.hidden_size, s.head_dim, s.intermediate_size);
        let (nq, nkv) = (s.n_heads, s.n_kv_heads);
        let start = cache.seen_tokens;
        let positions: Vec<i32> = (start..start + t).map(|p| p as i32).collect();
        let b = scratch.ensure(gpu, self, t)?;
        let st = gpu.stream();
        let cerr = |e: kvzip_kernels::cuda::DriverError| ModelError::Cuda(e.into());
        st.memcpy_htod(ids, &mut b.ids.slice_mut(..t))
            .map_err(cerr)?;
        st.memcpy_htod(&positions, &mut b.positions.slice_mut(..t))
            .map_err(cerr)?;
        cache.begin_step(gpu, t)?;

        gpu.embedding(&b.ids.slice(..t), &self.embed, &mut b.x, h, s.embed_scale)?;
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
        // host-to-device upload sits between this step's kernels.
        let plans: Vec<DecodePlan> = if t <= DECODE_MAX_Q {
            cache
                .layers
                .iter()
                .map(|kv| DecodePlan::new(gpu, &kv.lens, t, self.decode_chunk_keys))
                .collect::<std::result::Result<_, _>>()?
        } else {
            Vec::new()
        };
        let mut pending_delta = false;
        for (l, layer) in self.layers.iter().enumerate() {
            // x += delta (previous MLP output); normed = input_norm(x).
            let res =
                pending_delta.then_some(&b.delta as &dyn kvzip_kernels::cuda::DevicePtr<bf16>);
            layer
                .input_norm
                .apply(gpu, &mut b.x, res, &mut b.normed, t)?;
            let (mut q, mut kv_new) = project_qkv(
                gpu,
                &layer.qkv,
                &b.normed,
                t,
                (nq * d, nkv * d),
                &mut b.q,
                &mut b.kv,
                &mut b.qkv,
            )?;
            let (mut k, v) = kv_new.split_at_mut(t * nkv * d);
            if let Some(n) = &layer.q_norm {
                head_norm(gpu, n, &mut q, &mut b.head_tmp, t * nq, d)?;
            }
            if let Some(n) = &layer.k_norm {
                head_norm(gpu, n, &mut k, &mut b.head_tmp, t * nkv, d)?;
            }
            gpu.rope(
                &mut q,
                Some(&mut k),
                &b.positions.slice(..t),
                &layer.inv_freq,
                t,
                nq,
                nkv,
                d,
                layer.rope_factor,
            )?;
            {
                let (kv, lens_before, offsets) = cache.layer_for_append(l);
                // SAFETY: begin_step reserved `t` free rows in every head.
                unsafe {
                    gpu.append_rows(
                        &k,
                        &v,
                        &mut kv.k,
                        &mut kv.v,
                        &offsets,
                        &lens_before,
                        t,
                        nkv,
                        d,
                    )?;
                }
            }
            if let Some(hk) = hook.as_deref_mut() {
                hk.after_append(gpu, l, &q, t, cache)?;
            }
            let shape = shape_for(layer.window);
            let (lens, _, offsets) = cache.layer_meta(l);
            let kv = &cache.layers[l];
            if let Some(plan) = plans.get(l) {
                gpu.attention_decode(plan, &q, &kv.k, &kv.v, &offsets, &lens, &shape, &mut b.attn)?;
            } else {
                gpu.attention_prefill(&q, &kv.k, &kv.v, &offsets, &lens, &shape, &mut b.attn)?;
            }
            linear(gpu, &layer.o, &b.attn, t, &mut b.delta)?;
            if let Some(n) = &layer.post_attention_norm {
                n.apply(gpu, &mut b.delta, None, &mut b.normed, t)?;
                std::mem::swap(&mut b.delta, &mut b.normed);
            }
            // x += attention output; normed = pre_mlp_norm(x).
            let n = &layer.pre_mlp_norm;
            n.apply(gpu, &mut b.x, Some(&b.delta), &mut b.normed, t)?;
            linear(gpu, &layer.gate_up, &b.normed, t, &mut b.gate_up)?;
            gpu.act_mul(&b.gate_up, &mut b.act, t, inter, self.activation())?;
            linear(gpu, &layer.down, &b.act, t, &mut b.delta)?;
            if let Some(n) = &layer.post_mlp_norm {
                n.apply(gpu, &mut b.delta, None, &mut b.normed, t)?;
                std::mem::swap(&mut b.delta, &mut b.normed);
            }
            pending_delta = true;
        }
        cache.seen_tokens = start + t;
        let (first, rows) = match mode {
            LogitsMode::None => return Ok(None),
            LogitsMode::Last => (t - 1, 1),
            LogitsMode::All => (0, t),
        };
        // Last MLP output folded into only the rows whose logits are wanted (fused add + norm).
        let span = first * h..(first + rows) * h;
        self.norm.apply(
            gpu,
            &mut b.x.slice_mut(span.clone()),
            Some(&b.delta.slice(span)),
            &mut b.normed,
            rows,
        )?;
        let v = s.vocab_size;
        let mut logits = gpu.alloc::<f32>(rows * v)?;
        gpu.linear_f32(&b.normed, self.lm_head(), &mut logits, rows, v, h)?;
        Ok(Some(logits))
    }
}
