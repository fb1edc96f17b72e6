//! Every input the fuzzer ever found to crash, abort or hang (`regressions/<target>/*.hex`,
//! the bytes as hex text), plus
//! every seed: each must now give `Ok` or an error, never a panic.

use std::path::Path;

use kvzip_fuzz::{run_one, Outcome, ALL};

/// Bytes of a regression file: hex digits, whitespace ignored (`cargo xtask fuzz` writes them).
fn from_hex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).expect("hex digits"))
        .collect()
}

#[test]
fn seeds_and_past_crashes_do_not_panic() {
    let scratch = tempfile::tempdir().unwrap();
    for target in ALL {
        let mut inputs = target.seeds();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("regressions")
            .join(target.name());
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "hex") {
                    inputs.push(from_hex(&std::fs::read_to_string(e.path()).unwrap()));
                }
            }
        }
        assert!(!inputs.is_empty(), "{}: no seeds", target.name());
        for (i, input) in inputs.iter().enumerate() {
            let out = run_one(target, input, scratch.path());
            assert!(
                !matches!(out, Outcome::Panic(_)),
                "{} input {i}: {out:?}",
                target.name()
            );
        }
    }
}

#[test]
fn the_tiny_gguf_seed_imports_loads_and_runs() {
    let scratch = tempfile::tempdir().unwrap();
    let out = run_one(
        kvzip_fuzz::Target::Gguf,
        &kvzip_fuzz::seeds::tiny_gguf(),
        scratch.path(),
    );
    assert_eq!(out, Outcome::Ok, "the seed must reach the model loader");
}

#[test]
fn the_quantized_gguf_seed_imports_loads_and_runs() {
    let scratch = tempfile::tempdir().unwrap();
    let out = run_one(
        kvzip_fuzz::Target::Gguf,
        &kvzip_fuzz::seeds::tiny_quant_gguf(),
        scratch.path(),
    );
    assert_eq!(
        out,
        Outcome::Ok,
        "the seed must reach the quantized loader and forward"
    );
}

#[test]
fn the_imported_quantized_model_dir_seed_loads_and_runs() {
    let scratch = tempfile::tempdir().unwrap();
    let seeds = kvzip_fuzz::Target::ModelDir.seeds();
    // The first model-dir seed is the quantized GGUF imported with its blocks as stored.
    let has = |name: &[u8]| seeds[0].windows(name.len()).any(|w| w == name);
    assert!(
        has(b"kvzip_import.json"),
        "the imported quantized seed is missing"
    );
    let out = run_one(kvzip_fuzz::Target::ModelDir, &seeds[0], scratch.path());
    assert_eq!(out, Outcome::Ok, "the seed must reach the quantized loader");
}
