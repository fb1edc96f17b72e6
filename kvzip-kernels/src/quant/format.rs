//! ggml storage types (block layouts) and their dequantization to `f32`: the scalar reference
//! every fused kernel is tested against.
//!
//! Block layouts follow ggml (`ggml-common.h` / `ggml-quants.c`) and gguf-py's `quants.py`; the
//! arithmetic is done in the same order as gguf-py so results are bit-identical to its numpy
//! implementation (the reference transformers uses when it loads a GGUF). Work is split over
//! groups of blocks with rayon (feature `cpu-fast`).

use half::{bf16, f16};

use super::QuantError;

/// Super-block size of the k-quants, in elements.
pub const QK_K: usize = 256;
/// Elements per parallel work item (a multiple of every block size).
const ELEMS_PER_TASK: usize = 1 << 16;

macro_rules! ggml_types {
    ($( $variant:ident = $id:literal, $name:literal, $block:literal, $size:literal; )*) => {
        /// A ggml tensor storage type (the `type` field of a GGUF tensor info).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[allow(non_camel_case_types)]
        pub enum GgmlType {
            $(
                #[doc = concat!("ggml type id ", stringify!($id), " (`", $name, "`): blocks of ", stringify!($block), " elements in ", stringify!($size), " bytes.")]
                $variant,
            )*
        }

        impl GgmlType {
            /// The type for a ggml type id, or `None` for an unknown id.
            pub fn from_id(id: u32) -> Option<Self> {
                match id {
                    $( $id => Some(GgmlType::$variant), )*
                    _ => None,
                }
            }

            /// The ggml type id.
            pub fn id(self) -> u32 {
                match self { $( GgmlType::$variant => $id, )* }
            }

            /// The ggml type name, e.g. `Q4_K`.
            pub fn name(self) -> &'static str {
                match self { $( GgmlType::$variant => $name, )* }
            }

            /// `(elements per block, bytes per block)`.
            pub fn block_layout(self) -> (u64, u64) {
                match self { $( GgmlType::$variant => ($block, $size), )* }
            }

            /// The type named `name` (as [`name`](Self::name) spells it), or `None`.
            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $( $name => Some(GgmlType::$variant), )*
                    _ => None,
                }
            }
        }
    };
}

ggml_types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 18;
    Q4_1 = 3, "Q4_1", 32, 20;
    Q5_0 = 6, "Q5_0", 32, 22;
    Q5_1 = 7, "Q5_1", 32, 24;
    Q8_0 = 8, "Q8_0", 32, 34;
    Q8_1 = 9, "Q8_1", 32, 40;
    Q2_K = 10, "Q2_K", 256, 84;
    Q3_K = 11, "Q3_K", 256, 110;
    Q4_K = 12, "Q4_K", 256, 144;
    Q5_K = 13, "Q5_K", 256, 176;
    Q6_K = 14, "Q6_K", 256, 210;
    Q8_K = 15, "Q8_K", 256, 292;
    IQ2_XXS = 16, "IQ2_XXS", 256, 66;
    IQ2_XS = 17, "IQ2_XS", 256, 74;
    IQ3_XXS = 18, "IQ3_XXS", 256, 98;
    IQ1_S = 19, "IQ1_S", 256, 50;
    IQ4_NL = 20, "IQ4_NL", 32, 18;
    IQ3_S = 21, "IQ3_S", 256, 110;
    IQ2_S = 22, "IQ2_S", 256, 82;
    IQ4_XS = 23, "IQ4_XS", 256, 136;
    I8 = 24, "I8", 1, 1;
    I16 = 25, "I16", 1, 2;
    I32 = 26, "I32", 1, 4;
    I64 = 27, "I64", 1, 8;
    F64 = 28, "F64", 1, 8;
    IQ1_M = 29, "IQ1_M", 256, 56;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", 256, 54;
    TQ2_0 = 35, "TQ2_0", 256, 66;
    MXFP4 = 39, "MXFP4", 32, 17;
    NVFP4 = 40, "NVFP4", 64, 36;
    Q1_0 = 41, "Q1_0", 128, 18;
}

/// Decodes one block (`block_layout().1` bytes) into `block_layout().0` floats.
pub type BlockFn = fn(&[u8], &mut [f32]);

impl GgmlType {
    /// Whether [`dequantize`] supports this type.
    pub fn is_supported(self) -> bool {
        self.block_fn().is_some()
    }

    /// The scalar decoder of one block, if [`dequantize`] supports this type.
    pub fn block_fn(self) -> Option<BlockFn> {
        Some(match self {
            GgmlType::F32 => block_f32,
            GgmlType::F16 => block_f16,
            GgmlType::BF16 => block_bf16,
            GgmlType::Q4_0 => block_q4_0,
            GgmlType::Q4_1 => block_q4_1,
            GgmlType::Q5_0 => block_q5_0,
            GgmlType::Q8_0 => block_q8_0,
            GgmlType::Q4_K => block_q4_k,
            GgmlType::Q5_K => block_q5_k,
            GgmlType::Q6_K => block_q6_k,
            _ => return None,
        })
    }
}

/// Dequantizes `n_elements` values of type `ty` stored in `bytes` to `f32`.
///
/// `tensor` names the tensor in errors. Fails if the type is unsupported or `bytes` does not hold
/// exactly `n_elements` values (which must be a whole number of blocks).
pub fn dequantize(
    ty: GgmlType,
    bytes: &[u8],
    n_elements: usize,
    tensor: &str,
) -> Result<Vec<f32>, QuantError> {
    let mut out = vec![0f32; n_elements];
    dequantize_into(ty, bytes, &mut out, tensor)?;
    Ok(out)
}

/// [`dequantize`] into `out` (`out.len()` elements), in parallel over groups of blocks.
pub fn dequantize_into(
    ty: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
    tensor: &str,
) -> Result<(), QuantError> {
    let block_fn = ty.block_fn().ok_or_else(|| QuantError::Unsupported {
        tensor: tensor.to_string(),
        type_name: ty.name().to_string(),
    })?;
    let n_elements = out.len();
    let (block, size) = ty.block_layout();
    let (block, size) = (block as usize, size as usize);
    let expected = (n_elements / block).checked_mul(size);
    if n_elements % block != 0 || expected != Some(bytes.len()) {
        return Err(QuantError::BadData {
            tensor: tensor.to_string(),
            what: format!(
                "type {} with {n_elements} elements needs {} bytes but has {}",
                ty.name(),
                expected.map_or("an overflowing number of".to_string(), |e| e.to_string()),
                bytes.len()
            ),
        });
    }
    let blocks_per_task = (ELEMS_PER_TASK / block).max(1);
    let task = |(dst, src): (&mut [f32], &[u8])| {
        for (d, s) in dst.chunks_exact_mut(block).zip(src.chunks_exact(size)) {
            block_fn(s, d);
        }
    };
    #[cfg(feature = "cpu-fast")]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(blocks_per_task * block)
            .zip(bytes.par_chunks(blocks_per_task * size))
            .for_each(task);
    }
    #[cfg(not(feature = "cpu-fast"))]
    out.chunks_mut(blocks_per_task * block)
        .zip(bytes.chunks(blocks_per_task * size))
        .for_each(task);
    Ok(())
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

fn block_f32(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn block_f16(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

fn block_bf16(b: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
}

/// Q4_0: `d: f16`, 16 bytes of nibbles; element `j` is the low nibble of byte `j`, element
/// `j + 16` the high nibble; value `(q - 8) * d`.
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = d * ((qs[j] & 0x0F) as i32 - 8) as f32;
        y[j + 16] = d * ((qs[j] >> 4) as i32 - 8) as f32;
    }
}

/// Q4_1: `d: f16`, `m: f16`, 16 bytes of nibbles (as Q4_0); value `d * q + m`.
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = d * (qs[j] & 0x0F) as f32 + m;
        y[j + 16] = d * (qs[j] >> 4) as f32 + m;
    }
}

/// Q5_0: `d: f16`, `qh: u32` (bit `j` = 5th bit of element `j`), 16 bytes of low nibbles;
/// value `(q - 16) * d`.
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..16 {
        let lo = (qs[j] & 0x0F) as u32 | (((qh >> j) & 1) << 4);
        let hi = (qs[j] >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
        y[j] = d * (lo as i32 - 16) as f32;
        y[j + 16] = d * (hi as i32 - 16) as f32;
    }
}

/// Q8_0: `d: f16`, 32 `i8`; value `q * d`.
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for j in 0..32 {
        y[j] = (b[2 + j] as i8) as f32 * d;
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K / Q5_K.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K: `d: f16`, `dmin: f16`, 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles.
/// Sub-block `2c` (32 elements) is the low nibbles of bytes `32c..32c+32`, sub-block `2c+1` the
/// high nibbles; value `d*sc * q - dmin*m`.
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for s in 0..8 {
        let (sc, m) = scale_min_k4(s, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        let (c, shift) = (s / 2, 4 * (s % 2));
        for j in 0..32 {
            let q = (qs[c * 32 + j] >> shift) & 0x0F;
            y[s * 32 + j] = d1 * q as f32 - m1;
        }
    }
}

/// Q5_K: as Q4_K plus 32 bytes `qh` before the nibbles: bit `s` of `qh[j]` is the 5th bit of
/// element `j` of sub-block `s`.
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qh = &b[16..48];
    let qs = &b[48..176];
    for s in 0..8 {
        let (sc, m) = scale_min_k4(s, scales);
        let d1 = d * sc as f32;
        let m1 = dmin * m as f32;
        let (c, shift) = (s / 2, 4 * (s % 2));
        for j in 0..32 {
            let q = ((qs[c * 32 + j] >> shift) & 0x0F) | (((qh[j] >> s) & 1) << 4);
            y[s * 32 + j] = d1 * q as f32 - m1;
        }
    }
}

/// Q6_K: 128 bytes `ql` (low 4 bits), 64 bytes `qh` (high 2 bits), 16 `i8` scales (one per 16
/// elements), `d: f16`; value `d*scale * (q - 32)`. Within each half `h` of 128 elements, element
/// `32k + l` takes nibble `k / 2` of `ql[64h + 32(k % 2) + l]` and bits `2k..2k+2` of `qh[32h + l]`.
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = f16_at(b, 208);
    for h in 0..2 {
        for k in 0..4 {
            for l in 0..32 {
                let lo = (ql[64 * h + 32 * (k % 2) + l] >> (4 * (k / 2))) & 0x0F;
                let hi = (qh[32 * h + l] >> (2 * k)) & 0x03;
                let q = (lo | (hi << 4)) as i32 - 32;
                let e = 128 * h + 32 * k + l;
                let sc = scales[e / 16] as i8;
                y[e] = (d * sc as f32) * q as f32;
            }
        }
    }
    debug_assert_eq!(y.len(), QK_K);
}
