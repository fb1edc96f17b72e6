//! `kvzip-fuzz run TARGET --seconds N --out DIR [--seed S]`: mutate seeds and corpus inputs,
//! run each through the target (the input is first written to `DIR/current.bin`, so a parent
//! can keep it if the process aborts), keep inputs with a new outcome signature in
//! `DIR/corpus/`, save panics and hangs (> 10 s per input) in `DIR/crashes/`, and print one
//! JSON line of statistics. `kvzip-fuzz replay TARGET FILE...` runs saved inputs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvzip_fuzz::mutate::{mutate, Rng};
use kvzip_fuzz::{run_one, Outcome, Target};

/// Per-input time limit.
const HANG: Duration = Duration::from_secs(10);
const MAX_CORPUS: usize = 400;

fn hex(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

fn load_dir(dir: &Path) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.sort();
    files.iter().filter_map(|p| std::fs::read(p).ok()).collect()
}

fn run(target: Target, seconds: u64, out: &Path, seed: u64) -> Result<()> {
    let corpus_dir = out.join("corpus");
    let crash_dir = out.join("crashes");
    std::fs::create_dir_all(&corpus_dir)?;
    std::fs::create_dir_all(&crash_dir)?;
    let scratch = tempfile::tempdir()?;
    let mut corpus = target.seeds();
    corpus.extend(load_dir(&corpus_dir));
    if corpus.is_empty() {
        bail!("no seeds for {}", target.name());
    }
    // Quiet panics: they are recorded, not printed.
    std::panic::set_hook(Box::new(|_| {}));
    let started = Arc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    {
        // Watchdog: an input running past HANG is saved as a hang and the process exits.
        let (started, cur, crash_dir) =
            (started.clone(), out.join("current.bin"), crash_dir.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            let s = started.load(SeqCst);
            if s > 0 && epoch.elapsed().as_millis() as u64 > s + HANG.as_millis() as u64 {
                if let Ok(data) = std::fs::read(&cur) {
                    let _ =
                        std::fs::write(crash_dir.join(format!("hang-{}.bin", hex(&data))), &data);
                }
                eprintln!("hang: an input ran past {HANG:?}");
                std::process::exit(3);
            }
        });
    }
    let mut rng = Rng::new(seed);
    let mut seen = std::collections::BTreeSet::new();
    let (mut execs, mut panics, mut oks) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut i = 0usize;
    while Instant::now() < deadline {
        // Seeds as they are first, then mutations of random corpus entries.
        let input = if i < corpus.len() && execs < corpus.len() as u64 {
            corpus[i].clone()
        } else {
            let base = &corpus[rng.below(corpus.len())];
            let donor = &corpus[rng.below(corpus.len())];
            mutate(base, &mut rng, donor, target.container())
        };
        i += 1;
        std::fs::write(out.join("current.bin"), &input)?;
        started.store(epoch.elapsed().as_millis() as u64 + 1, SeqCst);
        let outcome = run_one(target, &input, scratch.path());
        started.store(0, SeqCst);
        execs += 1;
        match &outcome {
            Outcome::Panic(msg) => {
                panics += 1;
                // One saved input per distinct panic.
                if !seen.contains(&outcome.signature()) {
                    let name = crash_dir.join(format!("panic-{}.bin", hex(&input)));
                    std::fs::write(&name, &input)?;
                    std::fs::write(name.with_extension("txt"), msg)?;
                }
            }
            Outcome::Ok => oks += 1,
            Outcome::Error(_) => {}
        }
        if seen.insert(outcome.signature()) && corpus.len() < MAX_CORPUS {
            std::fs::write(corpus_dir.join(hex(&input)), &input)?;
            corpus.push(input);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "target": target.name(),
            "seconds": seconds,
            "executions": execs,
            "ok": oks,
            "panics": panics,
            "outcome_signatures": seen.len(),
            "corpus": corpus.len(),
        })
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "kvzip-fuzz run TARGET --seconds N --out DIR [--seed S] | replay TARGET FILE...";
    let target = args
        .get(1)
        .and_then(|t| Target::parse(t))
        .with_context(|| format!("{usage}; targets: gguf, model-dir, tokenizer, chat-template, cache-file, eval-data"))?;
    match args.first().map(String::as_str) {
        Some("run") => {
            let flag = |f: &str| {
                args.iter()
                    .position(|a| a == f)
                    .and_then(|i| args.get(i + 1))
            };
            let seconds = flag("--seconds").map_or(Ok(60), |s| s.parse())?;
            let seed = flag("--seed").map_or(Ok(1), |s| s.parse())?;
            let out = PathBuf::from(flag("--out").context("--out DIR")?);
            run(target, seconds, &out, seed)
        }
        Some("replay") => {
            let scratch = tempfile::tempdir()?;
            for f in &args[2..] {
                let data = std::fs::read(f).with_context(|| f.clone())?;
                println!("{f}: {:?}", run_one(target, &data, scratch.path()));
            }
            Ok(())
        }
        _ => bail!("{usage}"),
    }
}
