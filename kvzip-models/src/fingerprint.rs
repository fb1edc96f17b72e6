//! Identity of a model by content: a fingerprint of its weights, independent of the directory
//! name, recorded in compressed caches and head-score files so that a renamed model still loads
//! its caches and another model with the same shapes is refused.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};

/// Blocks of tensor data sampled per safetensors file.
const SAMPLES: u64 = 64;
/// Bytes per sampled block.
const BLOCK: u64 = 4096;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `wfp-` + 32 hex digits: SHA-256 over `config.json`, then per `*.safetensors` file (name
/// order) its tensor table (names, dtypes, shapes, offsets) and 64 evenly spaced 4 KiB blocks
/// of its data. Reads about 256 KiB per file, so it is cheap to compute at every load.
pub fn weights_fingerprint(dir: &Path) -> Result<String> {
    let mut h = Sha256::new();
    let config = dir.join("config.json");
    h.update(std::fs::read(&config).map_err(io(&config))?);
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Input(format!(
            "{}: no *.safetensors weights to fingerprint",
            dir.display()
        )));
    }
    for path in files {
        let mut f = File::open(&path).map_err(io(&path))?;
        let size = f.metadata().map_err(io(&path))?.len();
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io(&path))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > size.saturating_sub(8) || header_len > 100 << 20 {
            return Err(ModelError::Input(format!(
                "{}: safetensors header length {header_len} does not fit the {size}-byte file",
                path.display()
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        f.read_exact(&mut header).map_err(io(&path))?;
        h.update(&header);
        let start = 8 + header_len;
        let data = size - start;
        let mut block = vec![0u8; BLOCK.min(data) as usize];
        for i in 0..SAMPLES {
            let at = start + (data.saturating_sub(BLOCK)) * i / (SAMPLES - 1).max(1);
            f.seek(SeekFrom::Start(at)).map_err(io(&path))?;
            f.read_exact(&mut block).map_err(io(&path))?;
            h.update(&block);
        }
    }
    let hex: String = h
        .finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("wfp-{hex}"))
}

#[cfg(test)]
mod tests {
    use super::weights_fingerprint;

    #[test]
    fn same_weights_same_fingerprint_whatever_the_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let a = tmp.path().join("model-a");
        std::fs::create_dir(&a).unwrap();
        std::fs::write(a.join("config.json"), b"{}").unwrap();
        let header = br#"{"w":{"dtype":"F32","shape":[4096],"data_offsets":[0,16384]}}"#;
        let mut file = (header.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(header);
        file.extend((0..16384u32).map(|i| (i % 251) as u8));
        std::fs::write(a.join("model.safetensors"), &file).unwrap();
        let fa = weights_fingerprint(&a).unwrap();
        let b = tmp.path().join("renamed");
        std::fs::rename(&a, &b).unwrap();
        assert_eq!(weights_fingerprint(&b).unwrap(), fa);
        // One changed weight byte (in a sampled block) changes it.
        let n = file.len();
        file[n - 1] ^= 1;
        std::fs::write(b.join("model.safetensors"), &file).unwrap();
        assert_ne!(weights_fingerprint(&b).unwrap(), fa);
    }
}
