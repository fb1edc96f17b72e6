//! llama.cpp → HF tensor names, and llama.cpp's Q/K row permutation for the `llama` architecture.

/// Architectures the importer understands (`general.architecture`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama` (LLaMA 2/3, SmolLM2, ...): Q/K rows permuted by llama.cpp.
    Llama,
    /// `qwen2` (Qwen2 / Qwen2.5): biases on q/k/v.
    Qwen2,
    /// `qwen3`: per-head q/k RMSNorm.
    Qwen3,
    /// `gemma3`: four norms per layer, q/k norms, RMSNorm weights stored as `1 + w`.
    Gemma3,
}

impl Arch {
    /// Parses `general.architecture`; `None` if unsupported.
    pub fn from_gguf(name: &str) -> Option<Self> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "gemma3" => Some(Arch::Gemma3),
            _ => None,
        }
    }

    /// The GGUF metadata prefix (`llama`, `qwen2`, ...).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Gemma3 => "gemma3",
        }
    }
}

/// The HF name of a llama.cpp tensor, or `None` if the importer does not use it.
///
/// `token_embd` → `model.embed_tokens`, `output_norm` → `model.norm`, `output` → `lm_head`,
/// `blk.N.X` → `model.layers.N.Y` with `X → Y` per [`layer_suffix`].
pub fn hf_tensor_name(arch: Arch, gguf_name: &str) -> Option<String> {
    let (base, kind) = gguf_name.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf_base = match base {
        "token_embd" => "model.embed_tokens".to_string(),
        "output_norm" => "model.norm".to_string(),
        "output" => "lm_head".to_string(),
        _ => {
            let rest = base.strip_prefix("blk.")?;
            let (layer, suffix) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            format!("model.layers.{layer}.{}", layer_suffix(arch, suffix)?)
        }
    };
    Some(format!("{hf_base}.{kind}"))
}

/// HF name (within `model.layers.N.`) of a llama.cpp per-layer tensor base name.
pub fn layer_suffix(arch: Arch, suffix: &str) -> Option<&'static str> {
    Some(match (suffix, arch) {
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("attn_q_norm", _) => "self_attn.q_norm",
        ("attn_k_norm", _) => "self_attn.k_norm",
        ("attn_norm", _) => "input_layernorm",
        ("ffn_norm", Arch::Gemma3) => "pre_feedforward_layernorm",
        ("ffn_norm", _) => "post_attention_layernorm",
        ("post_attention_norm", Arch::Gemma3) => "post_attention_layernorm",
        ("post_ffw_norm", Arch::Gemma3) => "post_feedforward_layernorm",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        _ => return None,
    })
}

/// Whether a GGUF tensor is an RMSNorm weight that llama.cpp stores as `1 + w` for Gemma.
pub fn is_gemma_norm(gguf_name: &str) -> bool {
    gguf_name.ends_with("norm.weight")
}

/// llama.cpp's permutation of Q/K projection rows (convert_hf_to_gguf `LlamaModel.permute`):
/// within each of `n_head` heads of `rows / n_head` rows, HF row `j * half + i` (rotary half `j`,
/// pair index `i`) moves to row `2 * i + j` (interleaved pairs). `data` is `rows × cols`
/// row-major. Returns `None` if `rows` is not a multiple of `2 * n_head` or sizes disagree.
pub fn permute_qk_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Option<Vec<f32>> {
    remap_rows(data, rows, cols, n_head, true)
}

/// Inverse of [`permute_qk_rows`]: GGUF (interleaved) row order back to HF (half-split) order.
/// Rows are `cols` elements of any type (f32 values, or the bytes of quantized rows).
pub fn unpermute_qk_rows<T: Copy + Default>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Option<Vec<T>> {
    remap_rows(data, rows, cols, n_head, false)
}

fn remap_rows<T: Copy + Default>(
    data: &[T],
    rows: usize,
    cols: usize,
    n_head: usize,
    to_gguf: bool,
) -> Option<Vec<T>> {
    if n_head == 0 || rows % (2 * n_head) != 0 || rows.checked_mul(cols)? != data.len() {
        return None;
    }
    let head_rows = rows / n_head;
    let half = head_rows / 2;
    let mut out = vec![T::default(); data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * head_rows + j * half + i;
                let gguf_row = h * head_rows + 2 * i + j;
                let (src, dst) = if to_gguf {
                    (hf_row, gguf_row)
                } else {
                    (gguf_row, hf_row)
                };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_names() {
        let a = Arch::Llama;
        assert_eq!(
            hf_tensor_name(a, "token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(
            hf_tensor_name(a, "blk.12.attn_output.weight").as_deref(),
            Some("model.layers.12.self_attn.o_proj.weight")
        );
        assert_eq!(
            hf_tensor_name(a, "blk.0.ffn_norm.weight").as_deref(),
            Some("model.layers.0.post_attention_layernorm.weight")
        );
        assert_eq!(
            hf_tensor_name(Arch::Qwen2, "blk.3.attn_k.bias").as_deref(),
            Some("model.layers.3.self_attn.k_proj.bias")
        );
        assert_eq!(
            hf_tensor_name(a, "output.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(hf_tensor_name(a, "rope_freqs.weight"), None);
        assert_eq!(hf_tensor_name(a, "blk.x.attn_q.weight"), None);
    }

    #[test]
    fn maps_gemma3_norms() {
        let g = Arch::Gemma3;
        let cases = [
            (
                "blk.1.attn_norm.weight",
                "model.layers.1.input_layernorm.weight",
            ),
            (
                "blk.1.post_attention_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.pre_feedforward_layernorm.weight",
            ),
            (
                "blk.1.post_ffw_norm.weight",
                "model.layers.1.post_feedforward_layernorm.weight",
            ),
            (
                "blk.1.attn_q_norm.weight",
                "model.layers.1.self_attn.q_norm.weight",
            ),
            (
                "blk.1.attn_k_norm.weight",
                "model.layers.1.self_attn.k_norm.weight",
            ),
            ("output_norm.weight", "model.norm.weight"),
        ];
        for (from, to) in cases {
            assert_eq!(hf_tensor_name(g, from).as_deref(), Some(to), "{from}");
        }
        assert!(is_gemma_norm("blk.1.attn_q_norm.weight"));
        assert!(!is_gemma_norm("blk.1.attn_q.weight"));
    }

    #[test]
    fn permutation_matches_llama_cpp_formula_and_round_trips() {
        // 2 heads of 6 rows (half = 3), 2 columns; value = 100*row + col.
        let (rows, cols, n_head) = (12, 2, 2);
        let hf: Vec<f32> = (0..rows * cols)
            .map(|k| (100 * (k / cols) + k % cols) as f32)
            .collect();
        let gguf = permute_qk_rows(&hf, rows, cols, n_head).unwrap();
        // numpy: w.reshape(n_head, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)
        // → head 0 rows are HF rows [0, 3, 1, 4, 2, 5].
        let order: Vec<usize> = (0..rows).map(|r| gguf[r * cols] as usize / 100).collect();
        assert_eq!(order, vec![0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
        assert_eq!(unpermute_qk_rows(&gguf, rows, cols, n_head).unwrap(), hf);
        assert!(permute_qk_rows(&hf, rows, cols, 5).is_none());
    }
}
