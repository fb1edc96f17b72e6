//! Element-wise ops: gated activations, residual add, embedding lookup, softcapping.

use super::{math, PAR_MIN_ELEMS};
use crate::{validate, KernelError, Result};
use rayon::prelude::*;

/// Elements per rayon task for element-wise ops.
const TASK_ELEMS: usize = 1 << 14;

/// `out = act(gate) * up` of one run of elements (SiLU on eight lanes where the CPU can).
fn gated_run(act: crate::Activation, g: &[f32], u: &[f32], o: &mut [f32]) {
    match act {
        crate::Activation::Silu => math::silu_mul_slice(g, u, o),
        crate::Activation::GeluTanh => {
            for ((ov, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
                *ov = math::gelu_tanh(gv) * uv;
            }
        }
    }
}

/// Applies `act(gate) * up` element-wise into `out`, in parallel for large inputs.
fn gated(gate: &[f32], up: &[f32], out: &mut [f32], act: crate::Activation) -> Result<()> {
    validate::binary("gate", gate.len(), "up", up.len(), out.len())?;
    let kernel = |g: &[f32], u: &[f32], o: &mut [f32]| gated_run(act, g, u, o);
    if gate.len() < PAR_MIN_ELEMS {
        kernel(gate, up, out);
    } else {
        out.par_chunks_mut(TASK_ELEMS)
            .zip(gate.par_chunks(TASK_ELEMS).zip(up.par_chunks(TASK_ELEMS)))
            .for_each(|(o, (g, u))| kernel(g, u, o));
    }
    Ok(())
}

/// `out = silu(gate) * up`, element-wise (SwiGLU). All three have the same length.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    gated(gate, up, out, crate::Activation::Silu)
}

/// `out = gelu_tanh(gate) * up`, element-wise (GeGLU with PyTorch's `gelu_pytorch_tanh`).
pub fn gelu_tanh_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    gated(gate, up, out, crate::Activation::GeluTanh)
}

/// `acc += x`, element-wise (residual connection). Both have the same length.
pub fn add_assign(acc: &mut [f32], x: &[f32]) -> Result<()> {
    validate::len("x", x.len(), acc.len(), "same as acc")?;
    if acc.len() < PAR_MIN_ELEMS {
        acc.iter_mut().zip(x).for_each(|(a, &b)| *a += b);
    } else {
        acc.par_chunks_mut(TASK_ELEMS)
            .zip(x.par_chunks(TASK_ELEMS))
            .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b));
    }
    Ok(())
}

/// `out[i, :] = table[ids[i], :] * scale`.
///
/// `table`: `[vocab, dim]`; `out`: `[ids.len(), dim]`. `scale` is 1 for most models and
/// `sqrt(hidden)` for Gemma. An id `>= vocab` gives [`KernelError::TokenOutOfRange`] naming the id
/// (checked before anything is written).
pub fn embedding(
    ids: &[u32],
    table: &[f32],
    dim: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    embedding_widened(ids, table, |t| t, dim, scale, out)
}

/// [`embedding`] over a table of any element type that `widen` turns into f32 (bf16 tables).
pub(crate) fn embedding_widened<T: Copy + Sync>(
    ids: &[u32],
    table: &[T],
    widen: impl Fn(T) -> f32 + Sync,
    dim: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let vocab = validate::embedding(ids.len(), table.len(), dim, out.len())?;
    if let Some((position, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(KernelError::TokenOutOfRange {
            id,
            position,
            vocab,
        });
    }
    let copy = |(o, &id): (&mut [f32], &u32)| {
        let row = &table[id as usize * dim..(id as usize + 1) * dim];
        o.iter_mut()
            .zip(row)
            .for_each(|(o, &t)| *o = widen(t) * scale);
    };
    if dim == 0 {
        return Ok(());
    }
    if out.len() < PAR_MIN_ELEMS {
        out.chunks_exact_mut(dim).zip(ids).for_each(copy);
    } else {
        out.par_chunks_exact_mut(dim).zip(ids).for_each(copy);
    }
    Ok(())
}

/// Element-wise softcapping in place: `x = cap * tanh(x / cap)` (Gemma final logits).
/// `cap` should be finite and positive; other values are applied as written.
pub fn softcap_inplace(x: &mut [f32], cap: f32) {
    let f = |v: &mut f32| *v = cap * (*v / cap).tanh();
    if x.len() < PAR_MIN_ELEMS {
        x.iter_mut().for_each(f);
    } else {
        x.par_iter_mut().with_min_len(TASK_ELEMS).for_each(f);
    }
}

/// Gated activation over stacked `[gate | up]` rows: `out[r, i] = act(gate_up[r, i]) *
/// gate_up[r, inter + i]`. `gate_up`: `[rows, 2 * inter]`; `out`: `[rows, inter]`. Rows run in
/// parallel for large inputs.
pub fn act_mul_rows(
    gate_up: &[f32],
    out: &mut [f32],
    rows: usize,
    inter: usize,
    act: crate::Activation,
) -> Result<()> {
    validate::len(
        "gate_up",
        gate_up.len(),
        rows * 2 * inter,
        "[rows, 2 * inter]",
    )?;
    validate::len("out", out.len(), rows * inter, "[rows, inter]")?;
    if rows * inter == 0 {
        return Ok(());
    }
    let row = |(o, gu): (&mut [f32], &[f32])| {
        let (g, u) = gu.split_at(inter);
        gated_run(act, g, u, o);
    };
    if out.len() < PAR_MIN_ELEMS {
        out.chunks_exact_mut(inter)
            .zip(gate_up.chunks_exact(2 * inter))
            .for_each(row);
    } else {
        let per_task = (TASK_ELEMS / inter).max(1);
        out.par_chunks_mut(per_task * inter)
            .zip(gate_up.par_chunks(per_task * 2 * inter))
            .for_each(|(o, gu)| {
                o.chunks_exact_mut(inter)
                    .zip(gu.chunks_exact(2 * inter))
                    .for_each(row)
            });
    }
    Ok(())
}
