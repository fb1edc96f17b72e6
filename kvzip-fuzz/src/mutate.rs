//! Mutations: byte-level (flips, random bytes, inserts, deletes, truncations, duplicated and
//! spliced chunks), integer-aware (little-endian u32/u64 overwritten with boundary values: the
//! lengths, counts, offsets, dims and type tags of binary headers) and JSON-aware (a random
//! node replaced by an extreme number, a huge or odd string, an empty or duplicated container,
//! a deleted key, deep nesting). Multi-file inputs are containers of sections, mutated one
//! section at a time.

use kvzip_eval::generated::SplitMix64;
use serde_json::Value;

/// The mutation random source (the eval harness's splitmix64).
pub struct Rng(SplitMix64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(SplitMix64::new(seed))
    }

    /// 64 random bits.
    pub fn bits(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `0..n` (`n >= 1`).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.below(n as u64) as usize
    }
}

const INTERESTING: [u64; 14] = [
    0,
    1,
    2,
    7,
    255,
    65_535,
    1 << 20,
    i32::MAX as u64,
    u32::MAX as u64,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 1,
];

/// One byte-level or integer-aware mutation of `data`.
pub fn mutate_bytes(data: &mut Vec<u8>, rng: &mut Rng, donor: &[u8]) {
    let n = data.len();
    match rng.below(9) {
        0 if n > 0 => {
            let i = rng.below(n);
            data[i] ^= 1 << rng.below(8);
        }
        1 if n > 0 => {
            let i = rng.below(n);
            data[i] = rng.bits() as u8;
        }
        2 => {
            let i = rng.below(n + 1);
            let len = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..len).map(|_| rng.bits() as u8).collect();
            data.splice(i..i, bytes);
        }
        3 if n > 1 => {
            let i = rng.below(n);
            let len = 1 + rng.below((n - i).min(64));
            data.drain(i..i + len);
        }
        4 if n > 0 => data.truncate(rng.below(n)),
        5 if n > 8 => {
            // Integer-aware: a boundary value at an aligned-ish offset, as u32 or u64.
            let v = INTERESTING[rng.below(INTERESTING.len())];
            if rng.below(2) == 0 && n >= 4 {
                let i = rng.below(n - 3);
                data[i..i + 4].copy_from_slice(&(v as u32).to_le_bytes());
            } else if n >= 8 {
                let i = rng.below(n - 7);
                data[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        6 if n > 0 => {
            let i = rng.below(n);
            let len = 1 + rng.below((n - i).min(256));
            let chunk = data[i..i + len].to_vec();
            let at = rng.below(n + 1);
            data.splice(at..at, chunk);
        }
        7 if !donor.is_empty() => {
            // Splice: our prefix, the donor's suffix.
            let cut = rng.below(n + 1);
            let from = rng.below(donor.len());
            data.truncate(cut);
            data.extend_from_slice(&donor[from..]);
        }
        _ if n > 0 => {
            let i = rng.below(n);
            data[i] = [0u8, 0xff, b'"', b'{', b'[', b'\\', b'9'][rng.below(7)];
        }
        _ => data.push(rng.bits() as u8),
    }
}

fn extreme_value(rng: &mut Rng) -> Value {
    match rng.below(12) {
        0 => Value::from(0),
        1 => Value::from(-1),
        2 => Value::from(u64::MAX),
        3 => Value::from(i64::MIN),
        4 => serde_json::json!(1e308),
        5 => serde_json::json!(-1e-308),
        6 => Value::from(1u64 << 32),
        7 => Value::from("x".repeat(1 << rng.below(17))),
        8 => Value::from(""),
        9 => Value::Null,
        10 => Value::Bool(rng.below(2) == 0),
        _ => Value::from("\u{0}\u{FFFD}{{ x }}{% if %}<|im_end|>"),
    }
}

/// One structural mutation of a JSON document (returns false if `data` is not JSON).
pub fn mutate_json(data: &mut Vec<u8>, rng: &mut Rng) -> bool {
    let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    // Collect paths to nodes (bounded walk), then mutate one.
    let mut nodes = 0usize;
    count(&v, &mut nodes, 0);
    let target = rng.below(nodes.max(1));
    let mut seen = 0usize;
    mutate_node(&mut v, target, &mut seen, rng, 0);
    *data = serde_json::to_vec(&v).unwrap_or_default();
    true
}

fn count(v: &Value, n: &mut usize, depth: usize) {
    *n += 1;
    if depth > 64 || *n > 200_000 {
        return;
    }
    match v {
        Value::Array(a) => a.iter().for_each(|x| count(x, n, depth + 1)),
        Value::Object(o) => o.values().for_each(|x| count(x, n, depth + 1)),
        _ => {}
    }
}

fn mutate_node(
    v: &mut Value,
    target: usize,
    seen: &mut usize,
    rng: &mut Rng,
    depth: usize,
) -> bool {
    if *seen == target {
        match (v.clone(), rng.below(6)) {
            (Value::Object(mut o), 0) if !o.is_empty() => {
                let k = o
                    .keys()
                    .nth(rng.below(o.len()))
                    .cloned()
                    .unwrap_or_default();
                o.remove(&k);
                *v = Value::Object(o);
            }
            (Value::Array(mut a), 1) if !a.is_empty() => {
                let x = a[rng.below(a.len())].clone();
                for _ in 0..rng.below(8) + 1 {
                    a.push(x.clone());
                }
                *v = Value::Array(a);
            }
            (Value::Array(_), 2) | (Value::Object(_), 2) => {
                *v = if rng.below(2) == 0 {
                    Value::Array(vec![])
                } else {
                    Value::Object(Default::default())
                };
            }
            (_, 3) => {
                let mut x = v.clone();
                for _ in 0..1 + rng.below(200) {
                    x = Value::Array(vec![x]);
                }
                *v = x;
            }
            _ => *v = extreme_value(rng),
        }
        return true;
    }
    *seen += 1;
    if depth > 64 {
        return false;
    }
    match v {
        Value::Array(a) => a
            .iter_mut()
            .any(|x| mutate_node(x, target, seen, rng, depth + 1)),
        Value::Object(o) => o
            .values_mut()
            .any(|x| mutate_node(x, target, seen, rng, depth + 1)),
        _ => false,
    }
}

/// A multi-file input: named sections `(name, bytes)`, serialized as
/// `[u32 name len][name][u32 data len][data]...`.
pub fn pack(sections: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in sections {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// Parses [`pack`]ed sections; a damaged container yields what can be read.
pub fn unpack(mut data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let take = |data: &mut &[u8]| -> Option<Vec<u8>> {
        if data.len() < 4 {
            return None;
        }
        let n = u32::from_le_bytes(data[..4].try_into().ok()?) as usize;
        let rest = &data[4..];
        if n > rest.len() {
            return None;
        }
        let v = rest[..n].to_vec();
        *data = &rest[n..];
        Some(v)
    };
    while let (Some(name), Some(body)) = (take(&mut data), take(&mut data)) {
        out.push((String::from_utf8_lossy(&name).into_owned(), body));
    }
    out
}

/// Mutates one input: for containers one section (JSON-aware when it is JSON, else bytes),
/// sometimes the raw container itself.
pub fn mutate(input: &[u8], rng: &mut Rng, donor: &[u8], container: bool) -> Vec<u8> {
    let rounds = 1 + rng.below(4);
    if container && rng.below(10) != 0 {
        let mut sections = unpack(input);
        if !sections.is_empty() {
            for _ in 0..rounds {
                let i = rng.below(sections.len());
                let data = &mut sections[i].1;
                if rng.below(2) == 0 && mutate_json(data, rng) {
                    continue;
                }
                mutate_bytes(data, rng, donor);
            }
            return pack(&sections);
        }
    }
    let mut data = input.to_vec();
    for _ in 0..rounds {
        if rng.below(3) == 0 && mutate_json(&mut data, rng) {
            continue;
        }
        mutate_bytes(&mut data, rng, donor);
    }
    data
}
