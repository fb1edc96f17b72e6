//! Shared test helpers: a deterministic RNG, random K/V chunks and a plain row-list model of
//! the cache to compare against.
#![allow(dead_code)]

use kvzip_cache::{KeepMask, KvCache, LayerKeep};

/// Small deterministic xorshift generator.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn bool(&mut self, p_true: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p_true
    }
}

/// One row of the reference model: K, V and position.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub pos: u32,
}

/// Reference: `rows[layer][head]` = list of rows in order.
pub type Model = Vec<Vec<Vec<Row>>>;

/// Appends `t` random tokens at the cache's next positions to every layer of both the cache and
/// the reference model.
pub fn append_random(cache: &mut KvCache, model: &mut Model, t: usize, rng: &mut Rng) {
    let positions = cache.next_positions(t);
    for (l, heads) in model.iter_mut().enumerate() {
        let (nh, hd) = {
            let layer = cache.layer(l).unwrap();
            (layer.n_kv_heads(), layer.head_dim())
        };
        let k: Vec<f32> = (0..t * nh * hd).map(|_| rng.f32()).collect();
        let v: Vec<f32> = (0..t * nh * hd).map(|_| rng.f32()).collect();
        cache.append(l, &k, &v, &positions).unwrap();
        for (i, &pos) in positions.iter().enumerate() {
            for (h, rows) in heads.iter_mut().enumerate() {
                let at = (i * nh + h) * hd;
                rows.push(Row {
                    k: k[at..at + hd].to_vec(),
                    v: v[at..at + hd].to_vec(),
                    pos,
                });
            }
        }
    }
}

/// An empty cache and matching empty model.
pub fn empty(shapes: &[(usize, usize)]) -> (KvCache, Model) {
    let cache = KvCache::new(shapes).unwrap();
    let model = shapes.iter().map(|&(nh, _)| vec![Vec::new(); nh]).collect();
    (cache, model)
}

/// Asserts the cache holds exactly the rows of the model, head by head.
pub fn assert_matches(cache: &KvCache, model: &Model) {
    assert_eq!(cache.n_layers(), model.len());
    for (l, heads) in model.iter().enumerate() {
        let layer = cache.layer(l).unwrap();
        assert_eq!(layer.n_kv_heads(), heads.len());
        for (h, rows) in heads.iter().enumerate() {
            assert_eq!(layer.lens()[h], rows.len(), "layer {l} head {h} length");
            let k: Vec<f32> = rows.iter().flat_map(|r| r.k.clone()).collect();
            let v: Vec<f32> = rows.iter().flat_map(|r| r.v.clone()).collect();
            let p: Vec<u32> = rows.iter().map(|r| r.pos).collect();
            assert_eq!(
                layer.head_keys(h).unwrap(),
                k.as_slice(),
                "layer {l} head {h} K"
            );
            assert_eq!(
                layer.head_values(h).unwrap(),
                v.as_slice(),
                "layer {l} head {h} V"
            );
            assert_eq!(
                layer.head_positions(h),
                p.as_slice(),
                "layer {l} head {h} positions"
            );
        }
    }
}

/// A random mask over the cache's context; layers listed in `frozen` get no bits (not evictable).
pub fn random_mask(cache: &KvCache, p_keep: f64, frozen: &[usize], rng: &mut Rng) -> KeepMask {
    let n_ctx = cache.n_ctx();
    let layers = (0..cache.n_layers())
        .map(|l| {
            if frozen.contains(&l) {
                return None;
            }
            let n_heads = cache.layer(l).unwrap().n_kv_heads();
            let bits = (0..n_heads * n_ctx).map(|_| rng.bool(p_keep)).collect();
            Some(LayerKeep { n_heads, bits })
        })
        .collect();
    KeepMask::from_layers(n_ctx, layers).unwrap()
}

/// Applies `mask` to the reference model by filtering rows (context positions only).
pub fn filter_model(model: &Model, mask: &KeepMask, n_sys: usize, n_ctx: usize) -> Model {
    model
        .iter()
        .enumerate()
        .map(|(l, heads)| {
            heads
                .iter()
                .enumerate()
                .map(|(h, rows)| {
                    rows.iter()
                        .filter(|r| {
                            let p = r.pos as usize;
                            p < n_sys || p >= n_sys + n_ctx || mask.is_kept(l, h, p - n_sys)
                        })
                        .cloned()
                        .collect()
                })
                .collect()
        })
        .collect()
}
