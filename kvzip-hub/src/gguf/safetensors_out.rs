//! A streaming `model.safetensors` writer: tensors are dequantized to f32 and stored as `BF16`
//! (round to nearest even; half the size of f32, the dtype HF checkpoints ship in). The header is
//! written first from the declared shapes, then each tensor's data in declaration order, so only
//! one dequantized tensor is in memory at a time.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{GgufError, Result};

/// Writes declared tensors (given as f32, stored as `BF16`) one after another into a safetensors
/// file.
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    tensors: Vec<(String, usize)>,
    next: usize,
}

impl SafetensorsWriter {
    /// Creates `path` and writes the header for `tensors` (`(name, shape)`, data in this order)
    /// and the string `metadata` (`__metadata__`).
    pub fn create(
        path: &Path,
        tensors: &[(String, Vec<usize>)],
        metadata: &[(&str, &str)],
    ) -> Result<Self> {
        let io = |action, source| GgufError::Io {
            path: path.to_path_buf(),
            action,
            source,
        };
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            let meta: serde_json::Map<String, serde_json::Value> = metadata
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
                .collect();
            header.insert("__metadata__".into(), meta.into());
        }
        let mut offset = 0usize;
        let mut sizes = Vec::with_capacity(tensors.len());
        for (name, shape) in tensors {
            let n: usize = shape.iter().product();
            let end = offset + n * 2;
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, end]}),
            );
            sizes.push((name.clone(), n));
            offset = end;
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

    /// Writes the data of the next declared tensor, which must be `name` with the declared size.
    pub fn write_next(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let invalid = |what: String| GgufError::Invalid {
            path: self.path.clone(),
            what,
        };
        let Some((expected, n)) = self.tensors.get(self.next) else {
            return Err(invalid(format!(
                "tensor {name:?} written after all declared tensors"
            )));
        };
        if expected != name || *n != data.len() {
            return Err(invalid(format!(
                "expected tensor {expected:?} with {n} values next, got {name:?} with {}",
                data.len()
            )));
        }
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in data.chunks(1 << 14) {
            buf.clear();
            buf.extend(
                chunk
                    .iter()
                    .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()),
            );
            self.out.write_all(&buf).map_err(|e| GgufError::Io {
                path: self.path.clone(),
                action: "write",
                source: e,
            })?;
        }
        self.next += 1;
        Ok(())
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
