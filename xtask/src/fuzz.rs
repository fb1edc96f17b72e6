//! `cargo xtask fuzz TARGET|all --seconds N [--profile test]`: runs `kvzip-fuzz` per target in a child process
//! limited to 6 GiB of address space (an allocation that size fails and aborts, which counts
//! as a crash), restarts it after an abort or a hang with the rest of the time, keeps the
//! input that caused it (also copied to `kvzip-fuzz/regressions/<target>/`, where the
//! regression test replays it), and writes the figures to `bench/fuzz/<target>.json`. Fails
//! when anything crashed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{repo_root, run};

const TARGETS: [&str; 6] = [
    "gguf",
    "model-dir",
    "tokenizer",
    "chat-template",
    "cache-file",
    "eval-data",
];
const ADDRESS_SPACE_KB: u64 = 6 << 20;

/// `cargo xtask fuzz ...`.
pub fn fuzz(args: &[String]) -> Result<()> {
    let which = args
        .first()
        .context("cargo xtask fuzz TARGET|all --seconds N")?;
    let seconds: u64 = match args.iter().position(|a| a == "--seconds") {
        Some(i) => args.get(i + 1).context("--seconds N")?.parse()?,
        None => 60,
    };
    let targets: Vec<&str> = if which == "all" {
        TARGETS.to_vec()
    } else if TARGETS.contains(&which.as_str()) {
        vec![which.as_str()]
    } else {
        bail!(
            "unknown fuzz target {which:?}; targets: all, {}",
            TARGETS.join(", ")
        );
    };
    // `--profile test` reuses what `cargo test` built (the CI smoke); release by default.
    let profile = match args.iter().position(|a| a == "--profile") {
        Some(i) => args.get(i + 1).context("--profile NAME")?.clone(),
        None => "release".into(),
    };
    let root = repo_root();
    run(Command::new("cargo")
        .args(["build", "--profile", &profile, "-p", "kvzip-fuzz"])
        .current_dir(&root))?;
    let dir = if profile == "release" {
        "release"
    } else {
        "debug"
    };
    let bin = root.join("target").join(dir).join("kvzip-fuzz");
    let mut failed = Vec::new();
    for t in targets {
        let work = root.join("target/fuzz").join(t);
        let _ = std::fs::remove_dir_all(work.join("crashes"));
        std::fs::create_dir_all(work.join("crashes"))?;
        let t0 = Instant::now();
        let (mut execs, mut panics, mut aborts, mut hangs, mut sigs, mut corpus, mut oks) =
            (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        let mut seed = 1u64;
        while t0.elapsed() < Duration::from_secs(seconds) {
            let left = seconds.saturating_sub(t0.elapsed().as_secs()).max(1);
            let cmd = format!(
                "ulimit -v {ADDRESS_SPACE_KB} && exec {} run {t} --seconds {left} --out {} --seed {seed}",
                bin.display(),
                work.display()
            );
            let out = Command::new("sh")
                .args(["-c", &cmd])
                .stderr(Stdio::inherit())
                .output()
                .context("run kvzip-fuzz")?;
            seed += 1;
            let line = String::from_utf8_lossy(&out.stdout);
            if let Some(stats) = line
                .lines()
                .rev()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
            {
                execs += stats["executions"].as_u64().unwrap_or(0);
                panics += stats["panics"].as_u64().unwrap_or(0);
                oks += stats["ok"].as_u64().unwrap_or(0);
                sigs = sigs.max(stats["outcome_signatures"].as_u64().unwrap_or(0));
                corpus = corpus.max(stats["corpus"].as_u64().unwrap_or(0));
            }
            if !out.status.success() {
                // Aborted (out of memory, stack overflow) or a hang: keep the input.
                let hang = out.status.code() == Some(3);
                if hang {
                    hangs += 1;
                } else {
                    aborts += 1;
                    if let Ok(data) = std::fs::read(work.join("current.bin")) {
                        std::fs::write(
                            work.join("crashes").join(format!("abort-{seed}.bin")),
                            data,
                        )?;
                    }
                }
            }
        }
        // Every crash input becomes a regression input, stored as hex text (`NAME.hex`, 96
        // digits per line) so that no binary file is committed.
        let reg = root.join("kvzip-fuzz/regressions").join(t);
        let mut crash_files = Vec::new();
        for e in std::fs::read_dir(work.join("crashes"))?.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "bin") {
                std::fs::create_dir_all(&reg)?;
                let data = std::fs::read(&path)?;
                let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
                let lines: Vec<&str> = hex
                    .as_bytes()
                    .chunks(96)
                    .map(|c| std::str::from_utf8(c).unwrap_or_default())
                    .collect();
                let name = path.with_extension("hex");
                let name = name.file_name().unwrap_or_default();
                std::fs::write(reg.join(name), lines.join("\n") + "\n")?;
                crash_files.push(name.to_string_lossy().into_owned());
            }
        }
        let report = json!({
            "target": t,
            "command": format!("cargo xtask fuzz {t} --seconds {seconds}"),
            "seconds": t0.elapsed().as_secs(),
            "executions": execs,
            "executions_per_s": execs as f64 / t0.elapsed().as_secs_f64().max(1e-9),
            "accepted_inputs": oks,
            "outcome_signatures": sigs,
            "corpus": corpus,
            "panics": panics,
            "aborts": aborts,
            "hangs": hangs,
            "crash_inputs": crash_files,
        });
        println!("{report}");
        // Long runs are the committed figures; short ones (the CI smoke) stay in target/.
        let out_dir = if seconds >= 300 {
            root.join("bench/fuzz")
        } else {
            work.join("report")
        };
        std::fs::create_dir_all(&out_dir)?;
        std::fs::write(
            out_dir.join(format!("{t}.json")),
            serde_json::to_string_pretty(&report)? + "\n",
        )?;
        if panics + aborts + hangs > 0 {
            failed.push(t);
        }
    }
    if !failed.is_empty() {
        bail!("fuzzing found crashes in {failed:?}; inputs copied to kvzip-fuzz/regressions/");
    }
    Ok(())
}
