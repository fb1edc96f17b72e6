//! Save/load of a (compressed) cache as one safetensors file with JSON metadata.
//!
//! The format is device-independent: a cache compressed on a GPU loads on the CPU and the
//! other way round. Tensors, per layer `l` (rows packed head-major, free capacity dropped):
//! `layer.{l}.k` / `layer.{l}.v` `[rows, head_dim]` in the storage's element type (F32 from
//! the CPU, BF16 from CUDA; converted on load), `layer.{l}.positions` U32 `[rows]`,
//! `layer.{l}.lens` U64 `[n_kv_heads]`. The safetensors `__metadata__` string map holds
//! `format` = [`FORMAT_NAME`], `format_version` = [`FORMAT_VERSION`] and `kvzip_cache` = a JSON
//! object with the spans, `seen_tokens`, the layer geometry and the [`CacheFileMeta`].

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use std::cell::RefCell;

use kvzip_kernels::HostData;
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, View};
use serde::{Deserialize, Serialize};

use crate::layer::{packed_offsets, LayerCache, MIN_HEAD_SLACK};
use crate::storage::{DeviceKv, KvStorage};
use crate::{CacheError, KvCache};

/// Value of the `format` metadata key identifying a kvzip cache file.
pub const FORMAT_NAME: &str = "kvzip-rs/kv-cache";
/// Value of the `format_version` metadata key written by this crate: 3 adds the SHA-256
/// checksum over the metadata and every tensor ([`KEY_CHECKSUM`]), verified on load. Versions 1
/// (F32 rows only) and 2 (no checksum) are read too.
pub const FORMAT_VERSION: &str = "3";
/// Older versions this crate still reads.
const READABLE_VERSIONS: [&str; 3] = ["1", "2", "3"];

const KEY_FORMAT: &str = "format";
const KEY_VERSION: &str = "format_version";
const KEY_HEADER: &str = "kvzip_cache";
/// Metadata key of the checksum: SHA-256 (hex) of the `kvzip_cache` JSON followed by every
/// tensor in name order (name, dtype, shape as little-endian u64s, data).
pub const KEY_CHECKSUM: &str = "checksum_sha256";
const RECREATE: &str = "re-create it by compressing the context again with --save-cache";

/// Caller-provided description of a saved cache (stored in the file and returned by `load`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CacheFileMeta {
    /// Model identity, e.g. `"<model name>@<weights hash>"`; a loader must check it.
    pub model_id: String,
    /// Fraction of context pairs requested to be kept, if the cache was pruned.
    pub ratio_requested: Option<f64>,
    /// Fraction of context pairs really kept.
    pub ratio_real: Option<f64>,
    /// Selection level used (`"pair"`, `"pair-uniform"`, `"head"`, ...).
    pub level: Option<String>,
    /// Token ids of the system prompt + context (`n_sys + n_ctx` ids), to check a match.
    pub token_ids: Vec<u32>,
    /// Free-form fields.
    pub extra: BTreeMap<String, String>,
}

impl CacheFileMeta {
    /// Checks the file was made for `model_id` and, if given, from exactly `token_ids`
    /// (system prompt + context ids); `path` is only used in the error message. Errors with
    /// [`CacheError::Mismatch`] saying what differs.
    pub fn check(
        &self,
        path: &Path,
        model_id: &str,
        token_ids: Option<&[u32]>,
    ) -> Result<(), CacheError> {
        if self.model_id != model_id {
            return Err(CacheError::Mismatch {
                path: path.to_path_buf(),
                msg: format!(
                    "it was made for model '{}', not '{model_id}'; use that model or {RECREATE}",
                    self.model_id
                ),
            });
        }
        if let Some(ids) = token_ids {
            if ids != self.token_ids.as_slice() {
                let at = ids
                    .iter()
                    .zip(&self.token_ids)
                    .take_while(|(a, b)| a == b)
                    .count();
                return Err(CacheError::Mismatch {
                    path: path.to_path_buf(),
                    msg: format!(
                        "its prompt+context tokens ({} ids) differ from the expected ones ({} ids) \
                         from index {at}; {RECREATE}",
                        self.token_ids.len(),
                        ids.len()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Geometry and spans stored next to the caller's meta.
#[derive(Debug, Serialize, Deserialize)]
struct FileHeader {
    n_sys: usize,
    n_ctx: usize,
    seen_tokens: usize,
    /// `(n_kv_heads, head_dim)` per layer.
    layers: Vec<(usize, usize)>,
    meta: CacheFileMeta,
}

/// A tensor whose little-endian bytes are produced only when the serializer asks for them
/// (one layer in host memory at a time). A read error is stashed in `error` and zeros are
/// produced; the writer then refuses to persist the file.
enum LazyTensor<'a, S: KvStorage> {
    Rows {
        storage: &'a S,
        layer: &'a LayerCache<S::Layer>,
        is_k: bool,
        dtype: Dtype,
        error: &'a RefCell<Option<CacheError>>,
    },
    Positions(&'a LayerCache<S::Layer>),
    Lens(&'a LayerCache<S::Layer>),
}

/// All live rows of a layer, packed head after head.
fn live_plan<L>(layer: &LayerCache<L>) -> Result<kvzip_kernels::GatherPlan, CacheError> {
    let rows: Vec<Vec<usize>> = (0..layer.n_kv_heads())
        .map(|h| {
            let (a, b) = layer.head_range(h);
            (a..b).collect()
        })
        .collect();
    let counts: Vec<usize> = rows.iter().map(Vec::len).collect();
    Ok(kvzip_kernels::GatherPlan::from_rows(
        &rows,
        &packed_offsets(&counts),
    )?)
}

impl<S: KvStorage> LazyTensor<'_, S> {
    fn dtype(&self) -> Dtype {
        match self {
            Self::Rows { dtype, .. } => *dtype,
            Self::Positions(_) => Dtype::U32,
            Self::Lens(_) => Dtype::U64,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data_len());
        match self {
            Self::Rows {
                storage,
                layer,
                is_k,
                error,
                ..
            } => {
                let read = live_plan(layer)
                    .and_then(|plan| storage.read_packed(&layer.data, &plan, layer.head_dim()));
                match read {
                    Ok((k, v)) => match if *is_k { k } else { v } {
                        HostData::F32(x) => x
                            .iter()
                            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                        HostData::Bf16(x) => x
                            .iter()
                            .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
                    },
                    Err(e) => {
                        error.borrow_mut().get_or_insert(e);
                    }
                }
                out.resize(self.data_len(), 0);
            }
            Self::Positions(layer) => {
                for h in 0..layer.n_kv_heads() {
                    let pos = layer.head_positions(h);
                    pos.iter()
                        .for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
                }
            }
            Self::Lens(layer) => {
                for &len in layer.lens() {
                    out.extend_from_slice(&(len as u64).to_le_bytes());
                }
            }
        }
        out
    }

    fn data_len(&self) -> usize {
        match self {
            Self::Rows { layer, dtype, .. } => {
                layer.rows() * layer.head_dim() * if *dtype == Dtype::BF16 { 2 } else { 4 }
            }
            Self::Positions(layer) => layer.rows() * 4,
            Self::Lens(layer) => layer.n_kv_heads() * 8,
        }
    }
}

/// A [`LazyTensor`] with its shape, as the safetensors serializer wants it.
struct Shaped<'a, S: KvStorage> {
    tensor: LazyTensor<'a, S>,
    shape: Vec<usize>,
}

impl<S: KvStorage> View for Shaped<'_, S> {
    fn dtype(&self) -> Dtype {
        self.tensor.dtype()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.tensor.bytes())
    }
    fn data_len(&self) -> usize {
        self.tensor.data_len()
    }
}

/// The file checksum (see [`KEY_CHECKSUM`]) over `header_json` and `(name, dtype, shape,
/// data)` tensors, sorted by name here.
fn checksum<'a>(
    version: &str,
    header_json: &str,
    tensors: impl Iterator<Item = (String, String, Vec<usize>, Cow<'a, [u8]>)>,
) -> String {
    use sha2::{Digest, Sha256};
    let mut all: Vec<_> = tensors.collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    let mut h = Sha256::new();
    h.update(version.as_bytes());
    h.update(b"\0");
    h.update(header_json.as_bytes());
    for (name, dtype, shape, data) in all {
        h.update(name.as_bytes());
        h.update(dtype.as_bytes());
        for d in shape {
            h.update((d as u64).to_le_bytes());
        }
        h.update(&data);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn format_err(path: &Path, msg: impl Into<String>) -> CacheError {
    CacheError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl<S: KvStorage + Clone> KvCache<S> {
    /// Writes the live rows, positions, lengths, spans and `meta` to `path` as one
    /// safetensors file (rows in the storage's element type, bit-exact; free capacity is not
    /// stored, so a compacted cache gives a proportionally smaller file). Atomic: written to a
    /// temporary file in the same directory, fsynced, then renamed over `path`. The format is
    /// described in [`mod@crate::file`].
    ///
    /// ```
    /// use kvzip_cache::{CacheFileMeta, KvCache};
    ///
    /// let mut cache = KvCache::uniform(2, 2, 4)?;
    /// let ids: Vec<u32> = vec![7, 8, 9, 10, 11]; // system prompt + context token ids
    /// let pos = cache.next_positions(ids.len());
    /// let kv: Vec<f32> = (0..5 * 2 * 4).map(|i| i as f32).collect();
    /// for l in 0..2 {
    ///     cache.append(l, &kv, &kv, &pos)?;
    /// }
    /// cache.set_spans(1, 4);
    ///
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("context.kvzip.safetensors");
    /// let meta = CacheFileMeta {
    ///     model_id: "toy@0".into(),
    ///     token_ids: ids.clone(),
    ///     ..Default::default()
    /// };
    /// cache.save(&path, &meta)?;
    ///
    /// let (loaded, meta_back) = KvCache::load(&path)?;
    /// meta_back.check(&path, "toy@0", Some(&ids))?; // right model, same prompt + context
    /// assert!(meta_back.check(&path, "other-model", None).is_err());
    /// assert!(loaded == cache); // same spans, seen_tokens, rows and positions
    /// # Ok::<(), kvzip_cache::CacheError>(())
    /// ```
    pub fn save(&self, path: impl AsRef<Path>, meta: &CacheFileMeta) -> Result<(), CacheError> {
        let path = path.as_ref();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err(&dir))?;
        self.serialize_with(path, meta, |tensors, info| {
            safetensors::serialize_to_file(tensors, info, tmp.path())
        })?;
        tmp.as_file().sync_all().map_err(io_err(tmp.path()))?;
        tmp.persist(path).map_err(|e| CacheError::Io {
            path: path.to_path_buf(),
            source: e.error,
        })?;
        Ok(())
    }

    /// The bytes [`save`](Self::save) would write (the same format), for stores that keep
    /// caches elsewhere than in a file (a key-value store, memory). `origin` names the cache
    /// in error messages.
    pub fn to_bytes(&self, origin: &str, meta: &CacheFileMeta) -> Result<Vec<u8>, CacheError> {
        self.serialize_with(Path::new(origin), meta, |tensors, info| {
            safetensors::serialize(tensors, info)
        })
    }

    /// Builds the tensor table of the file format and hands it to `write` (to a file or to
    /// memory); errors name `path`.
    fn serialize_with<R>(
        &self,
        path: &Path,
        meta: &CacheFileMeta,
        write: impl FnOnce(
            Vec<(String, Shaped<'_, S>)>,
            &Option<HashMap<String, String>>,
        ) -> Result<R, SafeTensorError>,
    ) -> Result<R, CacheError> {
        let header = FileHeader {
            n_sys: self.n_sys(),
            n_ctx: self.n_ctx(),
            seen_tokens: self.seen_tokens(),
            layers: self
                .layers()
                .iter()
                .map(|l| (l.n_kv_heads(), l.head_dim()))
                .collect(),
            meta: meta.clone(),
        };
        let header_json = serde_json::to_string(&header)
            .map_err(|e| format_err(path, format!("cannot encode metadata as JSON: {e}")))?;
        let row_dtype = if self.storage.elem_bytes() == 2 {
            Dtype::BF16
        } else {
            Dtype::F32
        };
        let error = RefCell::new(None);
        let mut tensors: Vec<(String, Shaped<S>)> = Vec::new();
        for (l, layer) in self.layers().iter().enumerate() {
            let (rows, hd) = (layer.rows(), layer.head_dim());
            let rows_of = |is_k| LazyTensor::Rows {
                storage: &self.storage,
                layer,
                is_k,
                dtype: row_dtype,
                error: &error,
            };
            let items = [
                ("k", rows_of(true), vec![rows, hd]),
                ("v", rows_of(false), vec![rows, hd]),
                ("positions", LazyTensor::Positions(layer), vec![rows]),
                ("lens", LazyTensor::Lens(layer), vec![layer.n_kv_heads()]),
            ];
            for (name, tensor, shape) in items {
                tensors.push((format!("layer.{l}.{name}"), Shaped { tensor, shape }));
            }
        }
        // Integrity: a checksum over the metadata and every tensor (each tensor's data is
        // produced twice, once for the checksum and once for the file, so nothing large is
        // held in memory).
        let sum = checksum(
            FORMAT_VERSION,
            &header_json,
            tensors.iter().map(|(name, t)| {
                (
                    name.clone(),
                    format!("{:?}", t.tensor.dtype()),
                    t.shape.clone(),
                    Cow::Owned(t.tensor.bytes()),
                )
            }),
        );
        if let Some(e) = error.borrow_mut().take() {
            return Err(e);
        }
        let info: HashMap<String, String> = [
            (KEY_FORMAT.to_string(), FORMAT_NAME.to_string()),
            (KEY_VERSION.to_string(), FORMAT_VERSION.to_string()),
            (KEY_HEADER.to_string(), header_json),
            (KEY_CHECKSUM.to_string(), sum),
        ]
        .into();
        let out = write(tensors, &Some(info)).map_err(|e| match e {
            SafeTensorError::IoError(source) => CacheError::Io {
                path: path.to_path_buf(),
                source,
            },
            other => format_err(path, format!("cannot serialize: {other}")),
        })?;
        if let Some(e) = error.into_inner() {
            return Err(e);
        }
        Ok(out)
    }

    /// Reads a file written by [`save`](Self::save) into `storage`, validating its format,
    /// version and every shape; returns the cache (with [`MIN_HEAD_SLACK`] free rows per head)
    /// and its meta. Rows are converted to the storage's element type, so a cache saved from
    /// CUDA (bf16) loads on the host (f32) and the other way round.
    ///
    /// Errors: [`CacheError::Io`] (unreadable file), [`CacheError::Format`] (truncated,
    /// foreign, another version, inconsistent shapes), each naming the file and the fix. Check
    /// the returned meta with [`CacheFileMeta::check`] before using the cache with a model.
    pub fn load_in(
        storage: S,
        path: impl AsRef<Path>,
    ) -> Result<(KvCache<S>, CacheFileMeta), CacheError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        Self::from_bytes_in(storage, path.to_string_lossy().as_ref(), &bytes)
    }

    /// Reads bytes made by [`to_bytes`](Self::to_bytes) (or a whole file written by
    /// [`save`](Self::save)) into `storage`, with the checks of [`load_in`](Self::load_in);
    /// `origin` names the bytes in error messages.
    pub fn from_bytes_in(
        storage: S,
        origin: &str,
        bytes: &[u8],
    ) -> Result<(KvCache<S>, CacheFileMeta), CacheError> {
        let path = Path::new(origin);
        let st = parse_safetensors(path, bytes)?;
        verify_checksum(path, bytes, &st)?;
        let header = read_header(path, bytes)?;
        let mut layers = Vec::with_capacity(header.layers.len());
        for (l, &(n_heads, head_dim)) in header.layers.iter().enumerate() {
            layers.push(read_layer(
                &storage,
                path,
                &st,
                l,
                n_heads,
                head_dim,
                header.seen_tokens,
            )?);
        }
        let cache = KvCache::from_parts(
            storage,
            layers,
            header.n_sys,
            header.n_ctx,
            header.seen_tokens,
        )?;
        Ok((cache, header.meta))
    }
}

impl KvCache<DeviceKv> {
    /// [`load_in`](KvCache::load_in) host (f32) storage: reads a cache file written by
    /// [`save`](KvCache::save) (from any device). See `save` for an example.
    pub fn load(path: impl AsRef<Path>) -> Result<(KvCache, CacheFileMeta), CacheError> {
        Self::load_in(DeviceKv::host(), path)
    }
}

fn parse_safetensors<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>, CacheError> {
    if bytes.len() < 8 {
        return Err(format_err(
            path,
            format!(
                "truncated or corrupt: only {} bytes, not even a safetensors header; {RECREATE}",
                bytes.len()
            ),
        ));
    }
    let mut n = [0u8; 8];
    n.copy_from_slice(&bytes[..8]);
    let header_len = u64::from_le_bytes(n);
    if header_len > 100_000_000
        || bytes.get(8) != Some(&b'{') && header_len as usize + 8 <= bytes.len()
    {
        return Err(format_err(
            path,
            "not a safetensors file (bad header): corrupt, or not a cache; pass a cache file written by --save-cache",
        ));
    }
    if header_len as usize + 8 > bytes.len() {
        return Err(format_err(
            path,
            format!(
                "truncated or corrupt: the header needs {} bytes but the file has {}; {RECREATE}",
                header_len + 8,
                bytes.len()
            ),
        ));
    }
    SafeTensors::deserialize(bytes).map_err(|e| match e {
        SafeTensorError::MetadataIncompleteBuffer => format_err(
            path,
            format!(
                "truncated or corrupt: the data size does not match the tensor table; {RECREATE}"
            ),
        ),
        other => format_err(
            path,
            format!("not a valid safetensors file ({other}): the file is corrupt; {RECREATE}"),
        ),
    })
}

/// Checks the [`KEY_CHECKSUM`] of a version-3 file (older versions carry none).
fn verify_checksum(path: &Path, bytes: &[u8], st: &SafeTensors<'_>) -> Result<(), CacheError> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| {
        format_err(
            path,
            format!("cannot read the safetensors header ({e}): the file is corrupt"),
        )
    })?;
    let map = metadata.metadata().clone().unwrap_or_default();
    let version = map.get(KEY_VERSION).map(String::as_str).unwrap_or("");
    // Version 3 must carry a checksum; any file that carries one is verified (a flipped
    // version label cannot skip the check: the version is part of the checksum).
    if version != FORMAT_VERSION && !map.contains_key(KEY_CHECKSUM) {
        return Ok(());
    }
    let corrupt = |what: &str| {
        format_err(
            path,
            format!("the file is corrupt ({what}): it changed after it was written; {RECREATE}"),
        )
    };
    let stored = map
        .get(KEY_CHECKSUM)
        .ok_or_else(|| corrupt("checksum missing"))?;
    let header_json = map.get(KEY_HEADER).map(String::as_str).unwrap_or("");
    let sum = checksum(
        version,
        header_json,
        st.tensors().into_iter().map(|(name, view)| {
            (
                name,
                format!("{:?}", view.dtype()),
                view.shape().to_vec(),
                Cow::Borrowed(view.data()),
            )
        }),
    );
    if &sum != stored {
        return Err(corrupt("checksum mismatch"));
    }
    Ok(())
}

fn read_header(path: &Path, bytes: &[u8]) -> Result<FileHeader, CacheError> {
    let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| {
        format_err(
            path,
            format!("cannot read the safetensors header ({e}): the file is corrupt; {RECREATE}"),
        )
    })?;
    let map = metadata.metadata().clone().unwrap_or_default();
    let foreign = || {
        format_err(
            path,
            format!(
                "a safetensors file, but not a kvzip cache, or a corrupt one (metadata key '{KEY_FORMAT}' is not \
                 '{FORMAT_NAME}'; is it a model weight file?); pass a file written by --save-cache"
            ),
        )
    };
    match map.get(KEY_FORMAT) {
        Some(f) if f == FORMAT_NAME => {}
        _ => return Err(foreign()),
    }
    match map.get(KEY_VERSION).map(String::as_str) {
        Some(v) if READABLE_VERSIONS.contains(&v) => {}
        Some(v) => {
            return Err(format_err(
                path,
                format!(
                    "cache format version {v:?}, this build reads version {FORMAT_VERSION} (or the file is corrupt); \
                     use the kvzip version that wrote it or {RECREATE}"
                ),
            ))
        }
        None => {
            return Err(format_err(
                path,
                format!("metadata key '{KEY_VERSION}' missing (the file is corrupt or not a cache); {RECREATE}"),
            ))
        }
    }
    let json = map.get(KEY_HEADER).ok_or_else(|| {
        format_err(
            path,
            format!("metadata key '{KEY_HEADER}' missing (the file is corrupt or not a cache); {RECREATE}"),
        )
    })?;
    let header: FileHeader = serde_json::from_str(json).map_err(|e| {
        format_err(
            path,
            format!("metadata '{KEY_HEADER}' is not valid ({e}): the file is corrupt; {RECREATE}"),
        )
    })?;
    if header.n_sys + header.n_ctx > header.seen_tokens {
        return Err(format_err(
            path,
            format!(
                "n_sys {} + n_ctx {} exceeds seen_tokens {}; {RECREATE}",
                header.n_sys, header.n_ctx, header.seen_tokens
            ),
        ));
    }
    Ok(header)
}

/// Tensor `name` with dtype `dtype` and shape `shape`, as raw little-endian bytes.
fn tensor_bytes<'a>(
    path: &Path,
    st: &SafeTensors<'a>,
    name: &str,
    dtype: Dtype,
    shape: &[usize],
) -> Result<&'a [u8], CacheError> {
    let t = st.tensor(name).map_err(|_| {
        format_err(
            path,
            format!("tensor '{name}' missing (the file is corrupt or not a cache); {RECREATE}"),
        )
    })?;
    if t.dtype() != dtype || t.shape() != shape {
        return Err(format_err(
            path,
            format!(
                "tensor '{name}' is {:?} {:?}, expected {dtype:?} {shape:?}; {RECREATE}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(t.data())
}

/// Tensor `name` with shape `shape` in F32 or BF16, as host data.
fn float_rows(
    path: &Path,
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
) -> Result<HostData, CacheError> {
    let dtype = st.tensor(name).map(|t| t.dtype()).unwrap_or(Dtype::F32);
    match dtype {
        Dtype::BF16 => Ok(HostData::Bf16(
            tensor_bytes(path, st, name, Dtype::BF16, shape)?
                .chunks_exact(2)
                .map(|c| kvzip_kernels::bf16::from_le_bytes([c[0], c[1]]))
                .collect(),
        )),
        _ => Ok(HostData::F32(
            tensor_bytes(path, st, name, Dtype::F32, shape)?
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )),
    }
}

/// Rows `a..b` (of `d` elements) of packed host data.
fn host_rows(data: &HostData, a: usize, b: usize, d: usize) -> HostData {
    match data {
        HostData::F32(v) => HostData::F32(v[a * d..b * d].to_vec()),
        HostData::Bf16(v) => HostData::Bf16(v[a * d..b * d].to_vec()),
    }
}

fn read_layer<S: KvStorage>(
    storage: &S,
    path: &Path,
    st: &SafeTensors,
    l: usize,
    n_heads: usize,
    head_dim: usize,
    seen_tokens: usize,
) -> Result<LayerCache<S::Layer>, CacheError> {
    let shape_err = |msg: String| format_err(path, format!("layer {l}: {msg}; {RECREATE}"));
    if n_heads == 0 || head_dim == 0 {
        return Err(shape_err(format!(
            "geometry {n_heads} heads x head_dim {head_dim}"
        )));
    }
    let lens_raw = tensor_bytes(path, st, &format!("layer.{l}.lens"), Dtype::U64, &[n_heads])?;
    let mut lens = Vec::with_capacity(n_heads);
    for c in lens_raw.chunks_exact(8) {
        let len = u64::from_le_bytes(c.try_into().unwrap_or([0xff; 8]));
        let len = usize::try_from(len).map_err(|_| shape_err(format!("head length {len}")))?;
        lens.push(len);
    }
    let rows = lens
        .iter()
        .try_fold(0usize, |a, &b| a.checked_add(b))
        .filter(|&r| r <= seen_tokens.saturating_mul(n_heads))
        .ok_or_else(|| {
            shape_err(format!(
                "head lengths {lens:?} exceed seen_tokens {seen_tokens} per head"
            ))
        })?;
    let k = float_rows(path, st, &format!("layer.{l}.k"), &[rows, head_dim])?;
    let v = float_rows(path, st, &format!("layer.{l}.v"), &[rows, head_dim])?;
    let p_raw = tensor_bytes(
        path,
        st,
        &format!("layer.{l}.positions"),
        Dtype::U32,
        &[rows],
    )?;
    let positions: Vec<u32> = p_raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut start = 0;
    for (h, &len) in lens.iter().enumerate() {
        let head = &positions[start..start + len];
        if head.windows(2).any(|w| w[0] >= w[1])
            || head.last().is_some_and(|&p| p as usize >= seen_tokens)
        {
            return Err(shape_err(format!(
                "head {h} positions are not increasing and below seen_tokens {seen_tokens}"
            )));
        }
        start += len;
    }
    let caps: Vec<usize> = lens.iter().map(|&len| len + MIN_HEAD_SLACK).collect();
    let offsets = packed_offsets(&caps);
    let total: usize = caps.iter().sum();
    let mut data = storage.alloc_layer(total, head_dim)?;
    let mut pos = vec![0u32; total];
    let mut src = 0;
    for (h, &len) in lens.iter().enumerate() {
        let o = offsets[h];
        storage.write_packed(
            &mut data,
            o,
            &host_rows(&k, src, src + len, head_dim),
            &host_rows(&v, src, src + len, head_dim),
            head_dim,
        )?;
        pos[o..o + len].copy_from_slice(&positions[src..src + len]);
        src += len;
    }
    Ok(LayerCache {
        n_kv_heads: n_heads,
        head_dim,
        pos,
        offsets,
        caps,
        lens,
        relayouts: 0,
        data,
    })
}
