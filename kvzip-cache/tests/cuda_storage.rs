//! Host memory and CUDA buffers are two storages of the same cache: the same operations on a
//! host cache and on a CUDA cache (bf16-exact values) give equal caches after every step, and
//! a cache file written from either loads on the other. GPU only.
#![cfg(feature = "cuda")]

mod common;

use common::{random_mask, Rng};
use kvzip_cache::{CacheFileMeta, DeviceKv, KvCache};
use kvzip_kernels::Device;

const SHAPES: [(usize, usize); 3] = [(2, 64), (4, 128), (1, 64)];

fn exact(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| kvzip_kernels::bf16::from_f32(rng.f32() * 3.0).to_f32())
        .collect()
}

/// Appends `t` tokens to every layer of both caches through `begin_step` / `write_step`.
fn step(host: &mut KvCache, cuda: &mut KvCache, t: usize, rng: &mut Rng) {
    host.begin_step(t).unwrap();
    cuda.begin_step(t).unwrap();
    let dev = cuda.device().clone();
    for (l, &(nh, d)) in SHAPES.iter().enumerate() {
        let (k, v) = (exact(rng, t * nh * d), exact(rng, t * nh * d));
        host.write_step(
            l,
            kvzip_kernels::View::f32(&k),
            kvzip_kernels::View::f32(&v),
        )
        .unwrap();
        let (kd, vd) = (dev.upload_f32(&k).unwrap(), dev.upload_f32(&v).unwrap());
        cuda.write_step(l, kd.view(), vd.view()).unwrap();
    }
    assert!(*host == *cuda, "after a step of {t}");
}

#[test]
fn cuda_cache_equals_host_cache() {
    let dev = Device::cuda(0).expect("these tests need a CUDA GPU");
    let mut rng = Rng::new(3);
    let mut host = KvCache::new(&SHAPES).unwrap();
    let mut cuda = KvCache::on_device(&dev, &SHAPES, 0).unwrap();
    host.set_spans(5, 300);
    cuda.set_spans(5, 300);
    for t in [5, 120, 180, 1, 1] {
        step(&mut host, &mut cuda, t, &mut rng);
    }
    // A query rolled back.
    let (mh, mc) = (host.mark(), cuda.mark());
    step(&mut host, &mut cuda, 9, &mut rng);
    host.rollback(&mh).unwrap();
    cuda.rollback(&mc).unwrap();
    assert!(host == cuda, "after rollback");
    // Retain view and eviction from the same mask.
    let mask = random_mask(&host, 0.3, &[2], &mut rng);
    let (vh, vc) = (
        host.compacted_view(&mask).unwrap(),
        cuda.compacted_view(&mask).unwrap(),
    );
    assert!(vh == vc, "retain views");
    host.compact(&mask).unwrap();
    cuda.compact(&mask).unwrap();
    assert!(host == cuda, "after compaction");
    assert!(host == vh, "evict equals the retain view");
    // Turns after the compaction, a window trim of layer 2.
    step(&mut host, &mut cuda, 40, &mut rng);
    assert_eq!(
        host.trim_front(2, 31).unwrap(),
        cuda.trim_front(2, 31).unwrap()
    );
    assert!(host == cuda, "after trim");
    assert!(cuda.layer(2).unwrap().capacity_rows() <= 31 + kvzip_cache::MIN_HEAD_SLACK);
    // Files cross devices both ways (bf16 rows from CUDA, f32 from the host).
    let dir = tempfile::tempdir().unwrap();
    let meta = CacheFileMeta::default();
    let (ph, pc) = (dir.path().join("h"), dir.path().join("c"));
    host.save(&ph, &meta).unwrap();
    cuda.save(&pc, &meta).unwrap();
    let (from_cuda_on_host, _) = KvCache::load(&pc).unwrap();
    let (from_host_on_cuda, _) = KvCache::load_in(DeviceKv::new(dev.clone()), &ph).unwrap();
    assert!(from_cuda_on_host == host, "CUDA file on the host");
    assert!(from_host_on_cuda == cuda, "host file on CUDA");
    assert_eq!(cuda.storage().dtype(), kvzip_kernels::DType::Bf16);
    assert_eq!(cuda.kv_bytes_live() * 2, host.kv_bytes_live());
}
