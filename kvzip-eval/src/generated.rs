//! Needle and synthetic long-context tasks at configurable token lengths:
//! * `needle`: the KVzip needle sentence in a Paul Graham essay haystack at lengths x depths
//!   (KVZIP-SPEC §6.1), inserted right after the sentence end preceding the depth.
//! * `needle-multikey`: `keys` "special magic number" needles (RULER niah_multikey style) at
//!   seeded depths; one question per key.
//! * `kv-retrieval`: SCBench-kv style JSON object of UUID pairs; questions ask for `keys` values.
//! * `passkey`: a 5-digit pass key hidden at a seeded depth in repeated filler sentences.

use std::path::{Path, PathBuf};

use crate::datasets::{DataOptions, DatasetName, Example, TokenCount};
use crate::{io_err, EvalError, Result};

/// The KVzip needle sentence.
pub const NEEDLE: &str =
    "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.";
/// The needle question.
pub const NEEDLE_QUESTION: &str =
    "Based on the content of the book, the best thing to do in San Francisco is: ";
/// The needle's gold answer.
pub const NEEDLE_ANSWER: &str = "Eat a sandwich and sit in Dolores Park on a sunny day.";
/// Instruction heading the kv-retrieval context (SCBench kv).
pub const KV_HEADER: &str =
    "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n";
/// Filler sentences of the passkey task.
pub const PASSKEY_FILLER: &str =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";

/// splitmix64: a small deterministic generator for the synthetic tasks.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform integer in `0..n` (`n >= 1`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A UUID-4-formatted string.
    pub fn uuid(&mut self) -> String {
        let (a, b) = (self.next_u64(), self.next_u64());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:x}{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            8 + (b >> 62),
            (b >> 48) & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }
}

const ADJECTIVES: [&str; 16] = [
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly",
    "keen", "lucky", "misty", "noble", "quiet", "rusty",
];
const NOUNS: [&str; 16] = [
    "anchor", "badger", "candle", "dragon", "falcon", "garden", "harbor", "island", "jungle",
    "kettle", "lantern", "meadow", "orchid", "pepper", "river", "saddle",
];

/// Reads the essay folder's `*.txt` files in sorted name order (reversed when `reverse`).
pub fn essay_files(dir: &Path, reverse: bool) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    if files.is_empty() {
        return Err(EvalError::Input(format!(
            "{}: no *.txt essays; pass --data-file DIR with the Paul Graham essays",
            dir.display()
        )));
    }
    files.sort();
    if reverse {
        files.reverse();
    }
    Ok(files)
}

/// At least `chars` characters of essays concatenated (all of them if shorter).
pub fn essays_text(dir: &Path, chars: usize, reverse: bool) -> Result<String> {
    essays_text_from(dir, chars, reverse, 0)
}

/// [`essays_text`] starting at essay `start` (cycling through the sorted list): replicas of a
/// needle grid use different haystacks.
pub fn essays_text_from(dir: &Path, chars: usize, reverse: bool, start: usize) -> Result<String> {
    let mut files = essay_files(dir, reverse)?;
    let start = start % files.len();
    files.rotate_left(start);
    let mut text = String::new();
    for f in files {
        if text.len() >= chars {
            break;
        }
        text.push_str(&std::fs::read_to_string(&f).map_err(io_err(&f))?);
        text.push('\n');
    }
    Ok(text)
}

/// The essay folder: `--data-file DIR`, else `data_dir/pg-essays`.
pub fn essay_dir(opts: &DataOptions) -> Result<PathBuf> {
    let dir = match (&opts.data_file, &opts.data_dir) {
        (Some(f), _) => f.clone(),
        (None, Some(d)) => d.join("pg-essays"),
        (None, None) => crate::download::data_root(DatasetName::Needle)?.join("pg-essays"),
    };
    if !dir.is_dir() {
        return Err(EvalError::Input(format!(
            "{}: not a folder; pass --data-file DIR with the Paul Graham essays (*.txt)",
            dir.display()
        )));
    }
    Ok(dir)
}

/// The longest whitespace-delimited prefix of `text` with at most `budget` tokens.
pub fn truncate_to_tokens<'t>(
    text: &'t str,
    budget: usize,
    counter: &dyn TokenCount,
) -> Result<&'t str> {
    let ends: Vec<usize> = text
        .char_indices()
        .filter(|(_, c)| c.is_whitespace())
        .map(|(i, _)| i)
        .chain(std::iter::once(text.len()))
        .collect();
    let (mut lo, mut hi) = (0usize, ends.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if counter.count(&text[..ends[mid - 1]])? <= budget {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    Ok(if lo == 0 { "" } else { &text[..ends[lo - 1]] })
}

/// Byte offset just after the last sentence end (`.`) at or before `at` (0 if none).
fn sentence_start_before(text: &str, at: usize) -> usize {
    text[..at].rfind('.').map_or(0, |p| p + 1)
}

/// Inserts `insert` at `depth` percent of `hay`, moved back to just after the preceding
/// sentence end (depth 100 appends).
pub fn insert_at_depth(hay: &str, insert: &str, depth: usize) -> String {
    let mut at = hay.len() * depth.min(100) / 100;
    while !hay.is_char_boundary(at) {
        at -= 1;
    }
    if depth < 100 {
        at = sentence_start_before(hay, at);
    }
    let (head, tail) = hay.split_at(at);
    if head.is_empty() {
        format!("{insert} {}", tail.trim_start())
    } else {
        format!("{head} {insert}{tail}")
    }
}

/// The needle context of `tokens` tokens with the needle at `depth` percent.
pub fn needle_context(
    haystack: &str,
    tokens: usize,
    depth: usize,
    counter: &dyn TokenCount,
) -> Result<String> {
    let budget = tokens.saturating_sub(counter.count(NEEDLE)? + 1);
    let hay = truncate_to_tokens(haystack, budget, counter)?;
    Ok(insert_at_depth(hay, NEEDLE, depth))
}

fn lengths_cycle(opts: &DataOptions, i: usize) -> usize {
    opts.context_tokens[i % opts.context_tokens.len()]
}

/// Builds the examples of a needle or generated task (see the module docs).
pub fn load_generated(
    name: DatasetName,
    opts: &DataOptions,
    counter: &dyn TokenCount,
) -> Result<Vec<Example>> {
    let max_len = opts.context_tokens.iter().copied().max().unwrap_or(0);
    let haystack = match name {
        DatasetName::Needle | DatasetName::NeedleMultikey => {
            essays_text(&essay_dir(opts)?, max_len * 8 + 4096, false)?
        }
        _ => String::new(),
    };
    let mut out = Vec::new();
    match name {
        DatasetName::Needle => {
            if opts.depths.iter().any(|d| *d > 100) {
                return Err(EvalError::Input(
                    "--depths are percentages in 0..=100".into(),
                ));
            }
            // Replica r > 0 repeats the lengths x depths grid over a haystack that starts r * 7
            // essays later (so `--num` beyond the grid size gives independent repetitions).
            let grid = opts.context_tokens.len() * opts.depths.len();
            let replicas = opts.num.div_ceil(grid.max(1));
            'grid: for r in 0..replicas {
                let hay = if r == 0 {
                    haystack.clone()
                } else {
                    essays_text_from(&essay_dir(opts)?, max_len * 8 + 4096, false, r * 7)?
                };
                for &len in &opts.context_tokens {
                    for &depth in &opts.depths {
                        if out.len() == opts.num {
                            break 'grid;
                        }
                        out.push(Example {
                            id: if r == 0 {
                                format!("needle-{len}-{depth}")
                            } else {
                                format!("needle-{len}-{depth}-r{r}")
                            },
                            context: needle_context(&hay, len, depth, counter)?,
                            questions: vec![NEEDLE_QUESTION.to_owned()],
                            answers: vec![NEEDLE_ANSWER.to_owned()],
                        });
                    }
                }
            }
        }
        DatasetName::NeedleMultikey => {
            for i in 0..opts.num {
                let len = lengths_cycle(opts, i);
                let mut rng = SplitMix64::new(opts.seed.wrapping_mul(1_000_003) ^ i as u64);
                out.push(multikey_example(
                    &haystack,
                    len,
                    opts.keys.max(1),
                    &mut rng,
                    counter,
                    i,
                )?);
            }
        }
        DatasetName::KvRetrieval => {
            for i in 0..opts.num {
                let len = lengths_cycle(opts, i);
                let mut rng = SplitMix64::new(opts.seed.wrapping_mul(1_000_003) ^ i as u64);
                out.push(kv_example(len, opts.keys.max(1), &mut rng, counter, i)?);
            }
        }
        DatasetName::Passkey => {
            for i in 0..opts.num {
                let len = lengths_cycle(opts, i);
                let mut rng = SplitMix64::new(opts.seed.wrapping_mul(1_000_003) ^ i as u64);
                out.push(passkey_example(len, &mut rng, counter, i)?);
            }
        }
        DatasetName::Squad | DatasetName::Gsm8k => {
            return Err(EvalError::Input(format!("{name} is not a generated task")))
        }
    }
    Ok(out)
}

fn multikey_example(
    haystack: &str,
    len: usize,
    keys: usize,
    rng: &mut SplitMix64,
    counter: &dyn TokenCount,
    i: usize,
) -> Result<Example> {
    let mut names: Vec<String> = Vec::new();
    while names.len() < keys.min(ADJECTIVES.len() * NOUNS.len()) {
        let k = format!(
            "{}-{}",
            ADJECTIVES[rng.below(ADJECTIVES.len() as u64) as usize],
            NOUNS[rng.below(NOUNS.len() as u64) as usize]
        );
        if !names.contains(&k) {
            names.push(k);
        }
    }
    let values: Vec<String> = names
        .iter()
        .map(|_| (1_000_000 + rng.below(9_000_000)).to_string())
        .collect();
    let needles: Vec<String> = names
        .iter()
        .zip(&values)
        .map(|(k, v)| format!("One of the special magic numbers for {k} is: {v}."))
        .collect();
    let needle_tokens: usize = needles
        .iter()
        .map(|n| counter.count(n).map(|c| c + 1))
        .sum::<Result<usize>>()?;
    let mut context =
        truncate_to_tokens(haystack, len.saturating_sub(needle_tokens), counter)?.to_owned();
    for n in &needles {
        let depth = rng.below(101) as usize;
        context = insert_at_depth(&context, n, depth);
    }
    Ok(Example {
        id: format!("needle-multikey-{len}-{i}"),
        context,
        questions: names
            .iter()
            .map(|k| {
                format!("What is the special magic number for {k} mentioned in the provided text?")
            })
            .collect(),
        answers: values,
    })
}

fn kv_example(
    len: usize,
    keys: usize,
    rng: &mut SplitMix64,
    counter: &dyn TokenCount,
    i: usize,
) -> Result<Example> {
    let pair = |rng: &mut SplitMix64| format!("\"{}\": \"{}\"", rng.uuid(), rng.uuid());
    let mut probe = SplitMix64::new(rng.next_u64());
    let sample: Vec<String> = (0..8).map(|_| pair(&mut probe)).collect();
    let per_pair = counter.count(&sample.join(", "))?.div_ceil(8).max(1);
    let header = counter.count(KV_HEADER)? + 2;
    let n_pairs = (len.saturating_sub(header) / per_pair).max(keys);
    let pairs: Vec<(String, String)> = (0..n_pairs).map(|_| (rng.uuid(), rng.uuid())).collect();
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("\"{k}\": \"{v}\""))
        .collect();
    let context = format!("{KV_HEADER}{{{}}}", body.join(", "));
    let picks: Vec<usize> = (0..keys)
        .map(|j| (2 * j + 1) * n_pairs / (2 * keys))
        .collect();
    Ok(Example {
        id: format!("kv-retrieval-{len}-{i}"),
        context,
        questions: picks
            .iter()
            .map(|&p| {
                format!(
                    "Key: \"{}\"\nThe value associated with the specified key is: ",
                    pairs[p].0
                )
            })
            .collect(),
        answers: picks.iter().map(|&p| pairs[p].1.clone()).collect(),
    })
}

fn passkey_example(
    len: usize,
    rng: &mut SplitMix64,
    counter: &dyn TokenCount,
    i: usize,
) -> Result<Example> {
    let key = (10_000 + rng.below(90_000)).to_string();
    let info = format!("The pass key is {key}. Remember it. {key} is the pass key.");
    let per_filler = counter.count(PASSKEY_FILLER)?.max(1);
    let reps = len.saturating_sub(counter.count(&info)? + 1) / per_filler;
    let filler = PASSKEY_FILLER.repeat(reps.max(1));
    let depth = rng.below(101) as usize;
    Ok(Example {
        id: format!("passkey-{len}-{i}"),
        context: insert_at_depth(filler.trim_end(), &info, depth),
        questions: vec!["What is the pass key?".to_owned()],
        answers: vec![key],
    })
}

/// Held-out text for head scores: about `tokens` tokens from the essays taken in reverse
/// file order (the needle haystack uses them in forward order, so the two do not overlap for
/// haystacks shorter than half the essays).
pub fn head_sample_text(dir: &Path, tokens: usize, counter: &dyn TokenCount) -> Result<String> {
    let text = essays_text(dir, tokens * 8 + 1024, true)?;
    Ok(truncate_to_tokens(&text, tokens, counter)?.to_owned())
}
