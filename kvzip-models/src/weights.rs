//! Safetensors weight loading through memory maps, single file or sharded
//! (`model.safetensors.index.json`), converting F32/BF16/F16 tensors to f32.
//!
//! A tensor may also hold ggml-quantized rows kept as stored (what `kvzip import-gguf`
//! writes): dtype `U8`, shape `[rows, row_bytes]`, and a metadata entry
//! `"ggml_type.<tensor name>": "<TYPE>:<cols>"` (e.g. `"Q5_0:896"`). Its logical shape is
//! `[rows, cols]`; [`Weights::quant_rows`] hands out its bytes without a copy, and the f32/bf16
//! readers dequantize it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use kvzip_kernels::quant::{row_bytes, GgmlType, SharedBytes};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::error::{ModelError, Result};

/// Location of one tensor inside a mapped file.
#[derive(Debug, Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    /// Logical shape (`[rows, cols]` for quantized rows).
    shape: Vec<usize>,
    /// ggml block type of quantized rows (dtype `U8`), `None` for plain tensors.
    ggml: Option<GgmlType>,
    /// Absolute byte range inside the file.
    start: usize,
    end: usize,
}

/// All tensors of a checkpoint, memory-mapped; tensors are converted to f32 on request.
pub struct Weights {
    files: Vec<(PathBuf, Arc<Mmap>)>,
    tensors: HashMap<String, TensorEntry>,
}

fn weights_err(path: &Path, tensor: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Weights {
        path: path.to_path_buf(),
        tensor: tensor.into(),
        msg: msg.into(),
    }
}

impl Weights {
    /// Opens the checkpoint in `dir`: `model.safetensors`, or the shards listed by
    /// `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let bytes = std::fs::read(&index).map_err(|source| ModelError::Io {
                path: index.clone(),
                source,
            })?;
            let json: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| weights_err(&index, "", format!("index is not valid JSON ({e})")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| weights_err(&index, "", "missing object field `weight_map`"))?;
            let mut shard_names: Vec<String> = Vec::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    weights_err(&index, tensor, "weight_map value must be a file name")
                })?;
                if file.contains('/') || file.contains('\\') || file.starts_with("..") {
                    return Err(weights_err(
                        &index,
                        tensor,
                        "shard name must be a plain file name",
                    ));
                }
                if !shard_names.iter().any(|s| s == file) {
                    shard_names.push(file.to_owned());
                }
            }
            shard_names.sort();
            let paths: Vec<PathBuf> = shard_names.iter().map(|s| dir.join(s)).collect();
            Self::open_files(&paths)
        } else if single.exists() {
            Self::open_files(&[single])
        } else {
            Err(weights_err(
                &single,
                "",
                "no model.safetensors or model.safetensors.index.json in the model directory",
            ))
        }
    }

    /// Opens explicit safetensors files; a tensor name appearing twice is an error.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors = HashMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = std::fs::File::open(path).map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is opened read-only; we never hand out references that outlive
            // the map, and a concurrent truncation by another process is outside our contract.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| ModelError::Io {
                path: path.clone(),
                source,
            })?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                let what = match e {
                    safetensors::SafeTensorError::MetadataIncompleteBuffer
                    | safetensors::SafeTensorError::HeaderTooSmall => {
                        "the file is truncated (its data is shorter than its header declares)"
                            .to_owned()
                    }
                    other => format!("not a valid safetensors file ({other})"),
                };
                weights_err(path, "", format!("{what}; re-download or re-export it"))
            })?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let start = data_start + info.data_offsets.0;
                let end = data_start + info.data_offsets.1;
                if end > mmap.len() || start > end {
                    return Err(weights_err(
                        path,
                        &name,
                        format!(
                            "data range {start}..{end} lies beyond the end of the file ({} bytes): the file is truncated",
                            mmap.len()
                        ),
                    ));
                }
                let n: usize = info.shape.iter().product();
                if n * info.dtype.size() != end - start {
                    return Err(weights_err(
                        path,
                        &name,
                        format!(
                            "shape {:?} of {:?} needs {} bytes but the file stores {}",
                            info.shape,
                            info.dtype,
                            n * info.dtype.size(),
                            end - start
                        ),
                    ));
                }
                let key = format!("ggml_type.{name}");
                let quant = meta.metadata().as_ref().and_then(|m| m.get(&key));
                let (ggml, shape) = match quant {
                    None => (None, info.shape.clone()),
                    Some(spec) => {
                        let (ty, cols) =
                            parse_quant_spec(spec, info.dtype, &info.shape).map_err(|what| {
                                weights_err(path, &name, format!("metadata {key:?}: {what}"))
                            })?;
                        (Some(ty), vec![info.shape[0], cols])
                    }
                };
                let entry = TensorEntry {
                    file: fi,
                    dtype: info.dtype,
                    shape,
                    ggml,
                    start,
                    end,
                };
                if tensors.insert(name.clone(), entry).is_some() {
                    return Err(weights_err(
                        path,
                        &name,
                        "tensor appears in more than one shard",
                    ));
                }
            }
            files.push((path.clone(), Arc::new(mmap)));
        }
        Ok(Self { files, tensors })
    }

    /// Whether a tensor named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Names of all tensors (unordered).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Shape of tensor `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// Whether tensor `name` is stored as bf16 (it can then be kept as stored, bit for bit).
    pub fn is_bf16(&self, name: &str) -> bool {
        self.tensors
            .get(name)
            .is_some_and(|e| e.dtype == Dtype::BF16)
    }

    /// The ggml block type of tensor `name` if it holds quantized rows kept as stored.
    pub fn quant_type(&self, name: &str) -> Option<GgmlType> {
        self.tensors.get(name).and_then(|e| e.ggml)
    }

    /// The quantized rows of tensor `name` (checking its logical `shape`), borrowed from the
    /// memory map: no copy; pages are read from the file as the kernels touch them.
    pub fn quant_rows(&self, name: &str, shape: &[usize]) -> Result<(GgmlType, SharedBytes)> {
        let entry = self.entry(name, shape)?;
        let (path, map) = &self.files[entry.file];
        let ty = entry
            .ggml
            .ok_or_else(|| weights_err(path, name, "is not a quantized tensor"))?;
        let map: Arc<dyn AsRef<[u8]> + Send + Sync> = map.clone();
        let bytes = SharedBytes::new(map, entry.start..entry.end)
            .ok_or_else(|| weights_err(path, name, "data range lies outside the file"))?;
        Ok((ty, bytes))
    }

    /// The file that would be reported for a missing tensor.
    fn primary_path(&self) -> PathBuf {
        self.files
            .first()
            .map(|(p, _)| p.clone())
            .unwrap_or_default()
    }

    /// Loads tensor `name` as f32, checking it has exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n = self.entry(name, shape)?.shape.iter().product();
        let mut out = vec![0.0f32; n];
        self.read_f32_into(name, shape, &mut out)?;
        Ok(out)
    }

    /// Converts tensor `name` (checking `shape`) straight from the mapped file into `out`
    /// (`[numel]` f32): no intermediate copy.
    pub fn read_f32_into(&self, name: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
        self.convert_into(name, shape, out, |x| x)
    }

    /// Converts tensor `name` (checking `shape`) straight from the mapped file into `out`
    /// (`[numel]` bf16, rounded to nearest even): no intermediate f32 copy.
    pub fn read_bf16_into(
        &self,
        name: &str,
        shape: &[usize],
        out: &mut [half::bf16],
    ) -> Result<()> {
        self.convert_into(name, shape, out, half::bf16::from_f32)
    }

    /// Decodes every element of tensor `name` (F32, BF16 or F16) into `out` through `conv`;
    /// BF16 into a bf16 `out` stays bit for bit (the f32 detour is exact).
    fn convert_into<T>(
        &self,
        name: &str,
        shape: &[usize],
        out: &mut [T],
        conv: impl Fn(f32) -> T,
    ) -> Result<()> {
        let entry = self.entry(name, shape)?;
        let path = &self.files[entry.file].0;
        let bytes = &self.files[entry.file].1[entry.start..entry.end];
        if let Some(ty) = entry.ggml {
            let n: usize = entry.shape.iter().product();
            if out.len() != n {
                return Err(weights_err(
                    path,
                    name,
                    format!("{n} values for a destination of {}", out.len()),
                ));
            }
            let mut values = vec![0.0f32; n];
            kvzip_kernels::quant::dequantize_into(ty, bytes, &mut values, name)
                .map_err(|e| weights_err(path, name, e.to_string()))?;
            out.iter_mut().zip(values).for_each(|(o, v)| *o = conv(v));
            return Ok(());
        }
        let n = bytes.len() / entry.dtype.size().max(1);
        if out.len() != n {
            return Err(weights_err(
                path,
                name,
                format!("{n} values for a destination of {}", out.len()),
            ));
        }
        let pairs = out.iter_mut();
        match entry.dtype {
            Dtype::F32 => pairs
                .zip(bytes.chunks_exact(4))
                .for_each(|(o, c)| *o = conv(f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            Dtype::BF16 => pairs
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, c)| *o = conv(half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
            Dtype::F16 => pairs
                .zip(bytes.chunks_exact(2))
                .for_each(|(o, c)| *o = conv(half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
            other => {
                return Err(weights_err(
                    path,
                    name,
                    format!("dtype {other:?} is not supported; store weights as F32, BF16 or F16"),
                ))
            }
        }
        Ok(())
    }

    /// Tells the OS that the file pages of tensor `name` are no longer needed, so a loader that
    /// has copied (or uploaded) the tensor does not keep the mapped file resident as well
    /// (peak RSS of a load stays near the largest converted tensor, not the file size).
    pub fn release(&self, name: &str) {
        let Some(entry) = self.tensors.get(name) else {
            return;
        };
        let map = &self.files[entry.file].1;
        let page = 4096;
        let start = entry.start.div_ceil(page) * page;
        let end = (entry.end / page) * page;
        if end > start {
            // SAFETY: the map is read-only and private to this process; dropping its pages only
            // makes later reads fault them in again from the file.
            let _ = unsafe {
                map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let entry = self.tensors.get(name).ok_or_else(|| {
            weights_err(
                &self.primary_path(),
                name,
                "missing from the checkpoint (does config.json match the weights?)",
            )
        })?;
        if entry.shape != shape {
            return Err(weights_err(
                &self.files[entry.file].0,
                name,
                format!(
                    "has shape {:?} but the config implies {:?}; the checkpoint does not match config.json",
                    entry.shape, shape
                ),
            ));
        }
        Ok(entry)
    }

    /// Loads `name` if present (with shape check), `Ok(None)` if absent.
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Vec<f32>>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Parses a `"<TYPE>:<cols>"` quantization entry for a tensor of `dtype` and stored `shape`
/// (`[rows, row_bytes]`, `U8`), returning the type and the logical column count.
fn parse_quant_spec(
    spec: &str,
    dtype: Dtype,
    shape: &[usize],
) -> std::result::Result<(GgmlType, usize), String> {
    let (ty, cols) = spec
        .split_once(':')
        .ok_or_else(|| format!("{spec:?} is not \"<TYPE>:<cols>\""))?;
    let ty = GgmlType::from_name(ty)
        .filter(|t| kvzip_kernels::quant::is_kernel_type(*t))
        .ok_or_else(|| format!("ggml type {ty:?} is not one the CPU kernels compute on"))?;
    let cols: usize = cols
        .parse()
        .map_err(|_| format!("column count {cols:?} is not a number"))?;
    if dtype != Dtype::U8 || shape.len() != 2 {
        return Err(format!(
            "quantized rows must be stored as U8 [rows, row_bytes], found {dtype:?} {shape:?}"
        ));
    }
    match row_bytes(ty, cols) {
        Some(rb) if rb == shape[1] => Ok((ty, cols)),
        _ => Err(format!(
            "{cols} columns of {} do not take {} bytes per row",
            ty.name(),
            shape[1]
        )),
    }
}
