//! Shared helpers for the integration tests: fixture paths and golden-file readers.

use std::path::{Path, PathBuf};

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

pub mod synthetic;

/// Root of the committed fixtures (`tests/fixtures`); `KVZIP_FIXTURES_DIR` overrides it (test
/// binaries carried to another machine, e.g. the GPU bundle of `cargo xtask gpu`).
pub fn fixtures_dir() -> PathBuf {
    std::env::var_os("KVZIP_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
}

/// Directory of the parity fixture `name` (`llama`, `qwen2`, `qwen3`, `gemma3`, `mistral`,
/// `phi3`).
pub fn parity_dir(name: &str) -> PathBuf {
    fixtures_dir().join("parity").join(name)
}

/// A tensor read from a golden file, converted to f32 or i64.
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    /// Reads a safetensors golden file.
    pub fn open(path: &Path) -> Self {
        let bytes = std::fs::read(path)
            .unwrap_or_else(|e| panic!("cannot read golden file {}: {e}", path.display()));
        Self { bytes }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("golden file is valid safetensors")
    }

    /// Shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.tensors()
            .tensor(name)
            .unwrap_or_else(|_| panic!("golden tensor {name} missing"))
            .shape()
            .to_vec()
    }

    /// Tensor `name` as f32 (F32 storage).
    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.tensors();
        let t = st.tensor(name).expect("golden tensor present");
        assert_eq!(t.dtype(), Dtype::F32, "{name} must be F32");
        t.data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// Tensor `name` as integers (I64 or I32 storage).
    pub fn ids(&self, name: &str) -> Vec<i64> {
        let st = self.tensors();
        let t = st.tensor(name).expect("golden tensor present");
        match t.dtype() {
            Dtype::I64 => t
                .data()
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => t
                .data()
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                .collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        }
    }

    /// Tensor `name` as u32 token ids.
    pub fn token_ids(&self, name: &str) -> Vec<u32> {
        self.ids(name).into_iter().map(|x| x as u32).collect()
    }
}

/// Max |a - b| over two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Copies every file of `src` into a fresh temp dir (for tests that corrupt or edit fixtures).
pub fn copy_to_temp(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for entry in std::fs::read_dir(src).expect("fixture dir readable") {
        let entry = entry.expect("dir entry");
        if entry.file_type().expect("file type").is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
    }
    dir
}
