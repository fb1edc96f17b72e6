//! Build script of `kvzip-kernels`.
//!
//! Without the `cuda` feature it does nothing (a CPU build needs no toolkit). With it, it
//! 1. finds `nvcc` (env `NVCC`, then `PATH`, `$CUDA_HOME/bin`, `/usr/local/cuda/bin`, then the
//!    pip-installed CUDA 13.0 toolchain under `$KVZIP_CUDA_VENV` or `~/.cache/kvzip/cuda-venv`
//!    that `scripts/install-cuda-toolchain.sh` creates),
//! 2. compiles every `csrc/*.cu` to one cubin per target architecture (sm_90a, sm_80), in
//!    parallel, keeping each ptxas resource report beside it in `OUT_DIR`,
//! 3. writes `OUT_DIR/cubins.rs`, which embeds the cubins with `include_bytes!`,
//! 4. generates the kernel parameter structs for Rust from `csrc/kvzip_params.h` with bindgen
//!    (libclang from `LIBCLANG_PATH`, or the pip `libclang` package in the same venv).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cuda")]
    cuda::build();
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    /// Target architectures: (suffix, nvcc -gencode argument).
    const ARCHS: [(&str, &str); 2] = [
        ("sm90a", "arch=compute_90a,code=sm_90a"),
        ("sm80", "arch=compute_80,code=sm_80"),
    ];

    pub fn build() {
        let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
        let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
        let csrc = manifest.join("csrc");
        println!("cargo:rerun-if-changed={}", csrc.display());
        for var in ["NVCC", "CUDA_HOME", "KVZIP_CUDA_VENV", "LIBCLANG_PATH"] {
            println!("cargo:rerun-if-env-changed={var}");
        }
        let nvcc = find_nvcc().unwrap_or_else(|| {
            panic!(
                "the `cuda` feature needs nvcc (CUDA 13.0) and none was found: run \
                 scripts/install-cuda-toolchain.sh (pip wheels, no GPU needed) or set NVCC=/path/to/nvcc"
            )
        });
        let mut sources: Vec<PathBuf> = std::fs::read_dir(&csrc)
            .unwrap_or_else(|e| panic!("{}: {e}", csrc.display()))
            .map(|e| e.expect("readable csrc entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        sources.sort();
        for entry in std::fs::read_dir(&csrc).expect("csrc readable").flatten() {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }

        let jobs: Vec<(PathBuf, &str, &str)> = sources
            .iter()
            .flat_map(|src| {
                ARCHS
                    .iter()
                    .map(move |(tag, gen)| (src.clone(), *tag, *gen))
            })
            .collect();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..threads.min(jobs.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((src, tag, gen)) = jobs.get(i) else {
                        break;
                    };
                    compile(&nvcc, &csrc, src, tag, gen, &out);
                });
            }
        });

        let mut table = String::from(
            "/// Embedded cubins: (module name, sm_90a image, sm_80 image, kernel names).\n\
             pub(crate) const CUBINS: &[(&str, &[u8], &[u8], &[&str])] = &[\n",
        );
        for src in &sources {
            let stem = src.file_stem().expect("file name").to_string_lossy();
            let text = std::fs::read_to_string(src).expect("readable .cu");
            let kernels: Vec<String> = kernel_names(&text)
                .into_iter()
                .map(|k| format!("\"{k}\""))
                .collect();
            table.push_str(&format!(
                "    (\"{stem}\", include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.sm90a.cubin\")), \
                 include_bytes!(concat!(env!(\"OUT_DIR\"), \"/{stem}.sm80.cubin\")), &[{}]),\n",
                kernels.join(", ")
            ));
        }
        table.push_str("];\n");
        std::fs::write(out.join("cubins.rs"), table).expect("write cubins.rs");

        generate_bindings(&nvcc, &csrc.join("kvzip_params.h"), &out.join("params.rs"));
    }

    fn compile(nvcc: &Path, csrc: &Path, src: &Path, tag: &str, gencode: &str, out: &Path) {
        let stem = src.file_stem().expect("file name").to_string_lossy();
        let cubin = out.join(format!("{stem}.{tag}.cubin"));
        let mut cmd = Command::new(nvcc);
        cmd.arg("-cubin")
            .arg(format!("-gencode={gencode}"))
            .args(["-O3", "-std=c++17", "-lineinfo", "-Xptxas", "-v"])
            .arg("-I")
            .arg(csrc);
        if let Some(cccl) = cccl_include(nvcc) {
            cmd.arg("-I").arg(cccl);
        }
        cmd.arg("-o").arg(&cubin).arg(src);
        let output = cmd
            .output()
            .unwrap_or_else(|e| panic!("could not run {}: {e}", nvcc.display()));
        let report = String::from_utf8_lossy(&output.stderr).into_owned();
        std::fs::write(out.join(format!("{stem}.{tag}.ptxas.txt")), &report).ok();
        if !output.status.success() {
            panic!(
                "nvcc failed on {} ({tag}):\n{}{}",
                src.display(),
                String::from_utf8_lossy(&output.stdout),
                report
            );
        }
        for line in report.lines() {
            if line.contains("bytes stack frame") && !line.contains(" 0 bytes stack frame") {
                println!("cargo:warning={stem} {tag}: {}", line.trim());
            }
        }
    }

    /// Entry points of a `.cu` file: the name of every `__global__` function whose name starts
    /// with `kvz_` (by convention every kernel is `extern "C"` and named `kvz_*`, and device
    /// helpers are not). `__launch_bounds__(...)` may appear before or after the return type.
    fn kernel_names(text: &str) -> Vec<String> {
        let mut names = Vec::new();
        for (i, _) in text.match_indices("__global__") {
            let mut rest = &text[i + "__global__".len()..];
            let mut last_ident = String::new();
            loop {
                rest = rest.trim_start();
                if let Some(r) = rest.strip_prefix("__launch_bounds__") {
                    // Skip the balanced argument list.
                    let mut depth = 0usize;
                    let mut end = r.len();
                    for (j, c) in r.char_indices() {
                        match c {
                            '(' => depth += 1,
                            ')' => {
                                depth = depth.saturating_sub(1);
                                if depth == 0 {
                                    end = j + 1;
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    rest = &r[end..];
                    continue;
                }
                let ident_len = rest
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(rest.len());
                if ident_len == 0 {
                    break;
                }
                last_ident = rest[..ident_len].to_string();
                rest = &rest[ident_len..];
            }
            if rest.starts_with('(') && last_ident.starts_with("kvz_") {
                names.push(last_ident);
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// The pip wheels keep CCCL headers under `include/cccl`, which nvcc does not search.
    fn cccl_include(nvcc: &Path) -> Option<PathBuf> {
        let dir = nvcc.parent()?.parent()?.join("include").join("cccl");
        dir.is_dir().then_some(dir)
    }

    fn find_nvcc() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("NVCC") {
            return Some(PathBuf::from(p));
        }
        let path_dirs = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .unwrap_or_default();
        let mut candidates: Vec<PathBuf> = path_dirs.into_iter().map(|d| d.join("nvcc")).collect();
        if let Some(home) = std::env::var_os("CUDA_HOME") {
            candidates.push(PathBuf::from(home).join("bin/nvcc"));
        }
        candidates.push(PathBuf::from("/usr/local/cuda/bin/nvcc"));
        candidates.extend(
            venv_dirs()
                .iter()
                .filter_map(|v| venv_site_file(v, "nvidia/cu13/bin/nvcc")),
        );
        candidates.into_iter().find(|p| p.is_file())
    }

    fn venv_dirs() -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        if let Some(v) = std::env::var_os("KVZIP_CUDA_VENV") {
            dirs.push(PathBuf::from(v));
        }
        let home = std::env::var_os("KVZIP_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/kvzip")));
        if let Some(h) = home {
            dirs.push(h.join("cuda-venv"));
        }
        dirs
    }

    /// `venv/lib/python3.*/site-packages/<rel>` if it exists.
    fn venv_site_file(venv: &Path, rel: &str) -> Option<PathBuf> {
        std::fs::read_dir(venv.join("lib"))
            .ok()?
            .flatten()
            .map(|e| e.path().join("site-packages").join(rel))
            .find(|p| p.exists())
    }

    fn generate_bindings(nvcc: &Path, header: &Path, dest: &Path) {
        if std::env::var_os("LIBCLANG_PATH").is_none() {
            // nvcc at <site>/nvidia/cu13/bin/nvcc: the pip `libclang` wheel sits at <site>/clang/native.
            let from_nvcc = nvcc
                .ancestors()
                .nth(4)
                .map(|site| site.join("clang/native"))
                .filter(|d| d.is_dir());
            let from_venv = venv_dirs()
                .iter()
                .find_map(|v| venv_site_file(v, "clang/native"));
            if let Some(dir) = from_nvcc.or(from_venv) {
                std::env::set_var("LIBCLANG_PATH", dir);
            }
        }
        let bindings = bindgen::Builder::default()
            .header(header.to_string_lossy())
            .allowlist_type("Kvz.*")
            .allowlist_var("KVZ_.*")
            .derive_default(true)
            .derive_debug(true)
            .layout_tests(false)
            .generate()
            .unwrap_or_else(|e| {
                panic!(
                    "bindgen failed on {}: {e}. It needs libclang: pip install libclang into the \
                     CUDA venv (scripts/install-cuda-toolchain.sh does) or set LIBCLANG_PATH",
                    header.display()
                )
            });
        bindings.write_to_file(dest).expect("write params.rs");
    }
}
