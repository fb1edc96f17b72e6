//! Bounds-checked GGUF v2/v3 parsing over a memory-mapped (or in-memory) file.
//!
//! Layout (all little-endian): magic `GGUF`, `u32` version, `u64` tensor count, `u64` metadata
//! count, the metadata key/value pairs, the tensor infos (name, `u32` n_dims, `u64` dims in ggml
//! order — `dims[0]` is the innermost/contiguous one —, `u32` ggml type, `u64` offset relative to
//! the data section), padding up to `general.alignment` (default 32), then the tensor data.
//! Every read is checked against the file length; corrupt input gives a [`GgufError`], never a panic.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

pub use super::value::GgufValue;
use super::{dequantize, GgmlType};
use super::{GgufError, Result};

/// Default alignment of the data section and of each tensor's data, in bytes.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Most dimensions a ggml tensor can have.
const MAX_DIMS: u32 = 4;
/// Deepest nesting of metadata arrays accepted (real files use 1).
const MAX_ARRAY_DEPTH: u32 = 4;

/// Where one tensor lives and how it is stored.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// llama.cpp tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the contiguous one (HF shape is this reversed).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ggml_type: GgmlType,
    /// Byte offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Number of scalar elements (product of `dims`).
    pub n_elements: u64,
    /// Number of bytes the data occupies.
    pub byte_len: u64,
}

impl TensorInfo {
    /// Shape in row-major (HF / safetensors) order: `dims` reversed.
    pub fn hf_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Storage {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: header, metadata, tensor infos, and access to the (mapped) tensor data.
pub struct GgufFile {
    path: PathBuf,
    storage: Storage,
    /// GGUF version from the header (2 or 3).
    pub version: u32,
    /// Metadata key/value pairs in file order.
    pub metadata: Vec<(String, GgufValue)>,
    index: HashMap<String, usize>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    /// Alignment in bytes (`general.alignment`, default 32).
    pub alignment: u64,
    /// Absolute byte offset of the data section.
    pub data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |action, source| GgufError::Io {
            path: path.to_path_buf(),
            action,
            source,
        };
        let file = File::open(path).map_err(|e| io("open", e))?;
        let len = file.metadata().map_err(|e| io("stat", e))?.len();
        if len == 0 {
            return Self::from_bytes(path, Vec::new());
        }
        // SAFETY: the map is read-only; the file is not expected to change while we hold it
        // (a concurrent writer could only make us read wrong values, every access is bounds-checked).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("mmap", e))?;
        Self::parse(path.to_path_buf(), Storage::Mapped(map))
    }

    /// Parses an in-memory GGUF image; `label` names it in errors.
    pub fn from_bytes(label: &Path, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(label.to_path_buf(), Storage::Owned(bytes))
    }

    fn parse(path: PathBuf, storage: Storage) -> Result<Self> {
        let bytes = storage.bytes();
        let mut cur = Cursor {
            path: &path,
            bytes,
            pos: 0,
        };
        let magic = cur.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: magic.to_vec(),
            });
        }
        let version = cur.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = cur.u64("tensor count")?;
        let n_kv = cur.u64("metadata count")?;
        // Each metadata pair takes at least 12 bytes, each tensor info at least 28.
        cur.check_count(n_kv, 12, "metadata count")?;
        cur.check_count(n_tensors, 28, "tensor count")?;

        let mut metadata = Vec::with_capacity(n_kv as usize);
        let mut index = HashMap::with_capacity(n_kv as usize);
        for i in 0..n_kv {
            let key = cur.string(&format!("key of metadata pair {i}"))?;
            let type_id = cur.u32(&format!("value type of {key:?}"))?;
            let value = cur.value(&key, type_id, 0)?;
            if index.insert(key.clone(), metadata.len()).is_some() {
                return Err(cur.invalid(format!("duplicate metadata key {key:?}")));
            }
            metadata.push((key, value));
        }

        let alignment = match index.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let a = metadata[i].1.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() || a > (1 << 20) {
                    return Err(cur.invalid(format!(
                        "general.alignment must be a power of two up to 1 MiB, found {:?}",
                        metadata[i].1
                    )));
                }
                a
            }
        };

        let mut tensors = Vec::with_capacity(n_tensors as usize);
        let mut tensor_index = HashMap::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let info = cur.tensor_info(i, alignment)?;
            if tensor_index
                .insert(info.name.clone(), tensors.len())
                .is_some()
            {
                return Err(cur.invalid(format!("duplicate tensor name {:?}", info.name)));
            }
            tensors.push(info);
        }

        let file_len = bytes.len() as u64;
        let data_offset = align_up(cur.pos as u64, alignment)
            .ok_or_else(|| cur.invalid("data offset overflows".to_string()))?;
        for t in &tensors {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.byte_len));
            match (start, end) {
                (Some(_), Some(end)) if end <= file_len => {}
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        path: path.clone(),
                        tensor: t.name.clone(),
                        start: data_offset.saturating_add(t.offset),
                        end: data_offset
                            .saturating_add(t.offset)
                            .saturating_add(t.byte_len),
                        file_len,
                    })
                }
            }
        }
        Ok(GgufFile {
            path,
            storage,
            version,
            metadata,
            index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn meta_err(&self, key: &str, problem: String) -> GgufError {
        GgufError::Metadata {
            path: self.path.clone(),
            key: key.to_string(),
            problem,
        }
    }

    /// A required non-negative integer metadata value.
    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self
            .get(key)
            .ok_or_else(|| self.meta_err(key, "missing".into()))?;
        v.as_u64().ok_or_else(|| {
            self.meta_err(
                key,
                format!("expected a non-negative integer, found {}", v.type_name()),
            )
        })
    }

    /// An optional non-negative integer metadata value (`Err` only on a wrong type).
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.require_u64(key).map(Some),
        }
    }

    /// An optional float metadata value (`Err` only on a wrong type).
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                self.meta_err(key, format!("expected a number, found {}", v.type_name()))
            }),
        }
    }

    /// An optional string metadata value (`Err` only on a wrong type).
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.meta_err(key, format!("expected a string, found {}", v.type_name()))
            }),
        }
    }

    /// A required string metadata value.
    pub fn require_str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?
            .ok_or_else(|| self.meta_err(key, "missing".into()))
    }

    /// An optional bool metadata value (`Err` only on a wrong type).
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.meta_err(key, format!("expected a bool, found {}", v.type_name()))
            }),
        }
    }

    /// An optional array of strings (`Err` if it is not an array of strings).
    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.opt_array(key, "a string", GgufValue::as_str)
    }

    /// An optional array of integers (`Err` if it is not an array of integers).
    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        self.opt_array(key, "an integer", GgufValue::as_i64)
    }

    /// An optional array whose every element converts with `elem` (`what` names the element
    /// type in errors).
    fn opt_array<'s, T>(
        &'s self,
        key: &str,
        what: &str,
        elem: impl Fn(&'s GgufValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let arr = v.as_array().ok_or_else(|| {
            self.meta_err(key, format!("expected an array, found {}", v.type_name()))
        })?;
        arr.iter()
            .enumerate()
            .map(|(i, e)| {
                elem(e).ok_or_else(|| {
                    self.meta_err(key, format!("element {i} is {}, not {what}", e.type_name()))
                })
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// A tensor info by llama.cpp name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        let end = start + info.byte_len as usize;
        self.storage.bytes().get(start..end).unwrap_or(&[])
    }

    /// A tensor dequantized to `f32`, in row-major order of [`TensorInfo::hf_shape`].
    pub fn dequantize_tensor(&self, info: &TensorInfo) -> Result<Vec<f32>> {
        dequantize(
            info.ggml_type,
            self.tensor_bytes(info),
            info.n_elements as usize,
            &info.name,
        )
    }
}

fn align_up(x: u64, alignment: u64) -> Option<u64> {
    x.checked_add(alignment - 1)
        .map(|v| v / alignment * alignment)
}

/// A position in the file with checked reads.
struct Cursor<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn invalid(&self, what: String) -> GgufError {
        GgufError::Invalid {
            path: self.path.to_path_buf(),
            what,
        }
    }

    fn truncated(&self, what: &str, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what: what.to_string(),
            offset: self.pos as u64,
            needed,
            file_len: self.bytes.len() as u64,
        }
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    /// Rejects counts whose minimal encoding could not fit in the rest of the file
    /// (so no huge allocation happens on corrupt input).
    fn check_count(&self, count: u64, min_size: u64, what: &str) -> Result<()> {
        match count.checked_mul(min_size) {
            Some(n) if n <= self.remaining() => Ok(()),
            _ => Err(self.truncated(
                &format!("{what} ({count} entries)"),
                count.saturating_mul(min_size),
            )),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.truncated(what, n));
        }
        let start = self.pos;
        self.pos += n as usize;
        Ok(&self.bytes[start..self.pos])
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(s);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(&format!("length of {what}"))?;
        let at = self.pos;
        let raw = self.take(len, what)?;
        String::from_utf8(raw.to_vec())
            .map_err(|e| self.invalid(format!("{what} at offset {at} is not valid UTF-8 ({e})")))
    }

    fn value(&mut self, key: &str, type_id: u32, depth: u32) -> Result<GgufValue> {
        let what = || format!("value of {key:?}");
        Ok(match type_id {
            0 => GgufValue::U8(self.array::<1>(&what())?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array::<1>(&what())?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array::<2>(&what())?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array::<2>(&what())?)),
            4 => GgufValue::U32(self.u32(&what())?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array::<4>(&what())?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array::<4>(&what())?)),
            7 => match self.array::<1>(&what())?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(
                        self.invalid(format!("bool value of {key:?} is {b}, expected 0 or 1"))
                    )
                }
            },
            8 => GgufValue::String(self.string(&what())?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(format!("arrays in {key:?} nest too deep")));
                }
                let elem_type = self.u32(&format!("array element type of {key:?}"))?;
                let count = self.u64(&format!("array length of {key:?}"))?;
                let min_size = match elem_type {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(GgufError::UnknownValueType {
                            path: self.path.to_path_buf(),
                            key: format!("{key}[]"),
                            type_id: other,
                        })
                    }
                };
                self.check_count(count, min_size, &format!("array {key:?}"))?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(key, elem_type, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(&what())?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array::<8>(&what())?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array::<8>(&what())?)),
            other => {
                return Err(GgufError::UnknownValueType {
                    path: self.path.to_path_buf(),
                    key: key.to_string(),
                    type_id: other,
                })
            }
        })
    }

    fn tensor_info(&mut self, i: u64, alignment: u64) -> Result<TensorInfo> {
        let name = self.string(&format!("name of tensor {i}"))?;
        let n_dims = self.u32(&format!("n_dims of tensor {name:?}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(self.invalid(format!(
                "tensor {name:?} has {n_dims} dimensions (expected 1..={MAX_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(self.u64(&format!("dimension {d} of tensor {name:?}"))?);
        }
        let type_id = self.u32(&format!("type of tensor {name:?}"))?;
        let ggml_type = GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnknownTensorType {
            path: self.path.to_path_buf(),
            tensor: name.clone(),
            type_id,
        })?;
        let offset = self.u64(&format!("data offset of tensor {name:?}"))?;
        if offset % alignment != 0 {
            return Err(self.invalid(format!(
                "tensor {name:?} data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n < (1u64 << 48))
            .ok_or_else(|| self.invalid(format!("tensor {name:?} shape {dims:?} is too large")))?;
        let (block, type_size) = ggml_type.block_layout();
        if dims[0] % block != 0 {
            return Err(self.invalid(format!(
                "tensor {name:?} of type {} has a row length {} that is not a multiple of its block size {block}",
                ggml_type.name(),
                dims[0]
            )));
        }
        let byte_len = n_elements / block * type_size;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            n_elements,
            byte_len,
        })
    }
}
