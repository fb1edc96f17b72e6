//! Mutation fuzzing of every kvzip parser on the stable toolchain. `cargo xtask fuzz` drives
//! the `kvzip-fuzz` binary per target in a child process with a memory limit, restarting it
//! after an abort and keeping the input that caused it; see `main.rs` for the loop.

pub mod mutate;
pub mod seeds;
pub mod targets;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

pub use targets::{Target, ALL};

/// What one input did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Parsed (and used) without error.
    Ok,
    /// Refused with an error (the expected result of bad input).
    Error(String),
    /// Panicked: a bug.
    Panic(String),
}

impl Outcome {
    /// A coarse signature of the outcome (digits and quoted values removed): distinct
    /// signatures approximate distinct code paths for the corpus.
    pub fn signature(&self) -> String {
        let text = match self {
            Outcome::Ok => return "ok".into(),
            Outcome::Error(e) => e,
            Outcome::Panic(p) => {
                let short: String = p
                    .chars()
                    .take(100)
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect();
                return format!("panic: {short}");
            }
        };
        let mut out = String::new();
        let mut quoted = false;
        for c in text.chars().take(160) {
            match c {
                '"' | '`' => quoted = !quoted,
                _ if quoted => {}
                d if d.is_ascii_digit() => {
                    if !out.ends_with('#') {
                        out.push('#');
                    }
                }
                c => out.push(c),
            }
        }
        out
    }
}

/// Runs `input` through `target`, catching panics.
pub fn run_one(target: Target, input: &[u8], scratch: &Path) -> Outcome {
    match catch_unwind(AssertUnwindSafe(|| target.run(input, scratch))) {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(e)) => Outcome::Error(e),
        Err(p) => Outcome::Panic(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into()),
        ),
    }
}
