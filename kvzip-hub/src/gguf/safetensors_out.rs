//! A streaming `model.safetensors` writer. A tensor is either dense — given as f32, stored as
//! `BF16` (round to nearest even; the dtype HF checkpoints ship in) — or ggml-quantized rows kept
//! as stored: `U8 [rows, row_bytes]` plus the metadata entry `"ggml_type.<name>": "<TYPE>:<cols>"`
//! that `kvzip_models::Weights` reads. The header is written first from the declarations, then
//! each tensor's data in declaration order, so only one tensor is in memory at a time.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{GgmlType, GgufError, Result};

/// One declared tensor of a [`SafetensorsWriter`].
#[derive(Debug, Clone)]
pub struct TensorDecl {
    /// Tensor name.
    pub name: String,
    /// Logical shape (`[rows, cols]` for quantized rows).
    pub shape: Vec<usize>,
    /// `Some(type)`: rows stored as ggml blocks of `type`; `None`: dense, stored as `BF16`.
    pub quant: Option<GgmlType>,
}

impl TensorDecl {
    /// Bytes of the stored data; `None` when a quantized shape is not whole blocks.
    fn stored_bytes(&self) -> Option<usize> {
        let n: usize = self.shape.iter().product();
        match self.quant {
            None => n.checked_mul(2),
            Some(ty) => {
                let (rows, cols) = (self.shape.first()?, self.shape.get(1)?);
                kvzip_kernels::quant::row_bytes(ty, *cols)?.checked_mul(*rows)
            }
        }
    }
}

/// Writes declared tensors one after another into a safetensors file.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    tensors: Vec<(TensorDecl, usize)>,
    next: usize,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `tensors` (data in this order) and the string
    /// `metadata` (`__metadata__`, plus one `ggml_type.<name>` entry per quantized tensor).
    pub fn create(path: &Path, tensors: &[TensorDecl], metadata: &[(&str, &str)]) -> Result<Self> {
        let io = |action, source| GgufError::Io {
            path: path.to_path_buf(),
            action,
            source,
        };
        let invalid = |what: String| GgufError::Invalid {
            path: path.to_path_buf(),
            what,
        };
        let mut header = serde_json::Map::new();
        let mut meta: serde_json::Map<String, serde_json::Value> = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let mut offset = 0usize;
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in tensors {
            let bytes = t.stored_bytes().ok_or_else(|| {
                invalid(format!(
                    "tensor {:?}: shape {:?} cannot be stored",
                    t.name, t.shape
                ))
            })?;
            let end = offset + bytes;
            let entry = match t.quant {
                None => {
                    serde_json::json!({"dtype": "BF16", "shape": t.shape, "data_offsets": [offset, end]})
                }
                Some(ty) => {
                    meta.insert(
                        format!("ggml_type.{}", t.name),
                        format!("{}:{}", ty.name(), t.shape[1]).into(),
                    );
                    let row = bytes / t.shape[0].max(1);
                    serde_json::json!({"dtype": "U8", "shape": [t.shape[0], row], "data_offsets": [offset, end]})
                }
            };
            header.insert(t.name.clone(), entry);
            sizes.push((t.clone(), bytes));
            offset = end;
        }
        if !meta.is_empty() {
            header.insert("__metadata__".into(), meta.into());
        }
        let mut text = serde_json::to_vec(&header).map_err(|e| GgufError::Invalid {
            path: path.to_path_buf(),
            what: format!("cannot serialize safetensors header: {e}"),
        })?;
        while text.len() % 8 != 0 {
            text.push(b' ');
        }
        let file = File::create(path).map_err(|e| io("create", e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        out.write_all(&(text.len() as u64).to_le_bytes())
            .and_then(|_| out.write_all(&text))
            .map_err(|e| io("write", e))?;
        Ok(SafetensorsWriter {
            path: path.to_path_buf(),
            out,
            tensors: sizes,
            next: 0,
        })
    }

    /// Writes the data of the next declared tensor, which must be the dense tensor `name` with
    /// the declared number of values (stored as bf16).
    pub fn write_next(&mut self, name: &str, data: &[f32]) -> Result<()> {
        self.check_next(name, data.len() * 2, false)?;
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in data.chunks(1 << 14) {
            buf.clear();
            buf.extend(
                chunk
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()),
            );
            self.write_bytes(&buf)?;
        }
        self.next += 1;
        Ok(())
    }

    /// Writes the next declared tensor, which must be the quantized tensor `name`, from its
    /// stored bytes (rows of ggml blocks).
    pub fn write_next_raw(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.check_next(name, bytes.len(), true)?;
        self.write_bytes(bytes)?;
        self.next += 1;
        Ok(())
    }

    fn check_next(&self, name: &str, bytes: usize, quantized: bool) -> Result<()> {
        let invalid = |what: String| GgufError::Invalid {
            path: self.path.clone(),
            what,
        };
        let Some((decl, expected_bytes)) = self.tensors.get(self.next) else {
            return Err(invalid(format!(
                "tensor {name:?} written after all declared tensors"
            )));
        };
        if decl.name != name || *expected_bytes != bytes || decl.quant.is_some() != quantized {
            return Err(invalid(format!(
                "expected tensor {:?} ({expected_bytes} bytes) next, got {name:?} ({bytes} bytes)",
                decl.name
            )));
        }
        Ok(())
    }

    fn write_bytes(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| GgufError::Io {
            path: self.path.clone(),
            action: "write",
            source: e,
        })
    }

    /// Checks every declared tensor was written, flushes and syncs the file.
    pub fn finish(mut self) -> Result<()> {
        if self.next != self.tensors.len() {
            return Err(GgufError::Invalid {
                path: self.path.clone(),
                what: format!(
                    "only {} of {} declared tensors were written",
                    self.next,
                    self.tensors.len()
                ),
            });
        }
        let path = self.path.clone();
        self.out.flush().map_err(|e| GgufError::Io {
            path: path.clone(),
            action: "flush",
            source: e,
        })?;
        let file = self.out.into_inner().map_err(|e| GgufError::Io {
            path: path.clone(),
            action: "flush",
            source: e.into_error(),
        })?;
        file.sync_all().map_err(|e| GgufError::Io {
            path,
            action: "sync",
            source: e,
        })
    }
}
