//! KV-cache append and compaction kernels vs host copies (exact equality). GPU only.
#![cfg(feature = "cuda")]

use half::bf16;
use kvzip_kernels::cuda::cache::CompactPlan;
use kvzip_kernels::cuda::{CudaBackend, CudaError};
use kvzip_kernels::sampling::Rng;

fn backend() -> CudaBackend {
    CudaBackend::new(0).expect("these tests need a CUDA GPU (run them on the GPU machine)")
}

fn rand_bf16(rng: &mut Rng, n: usize) -> Vec<bf16> {
    rng.uniform_vec(n, -4.0, 4.0)
        .into_iter()
        .map(bf16::from_f32)
        .collect()
}

fn append_case(head_dim: usize) {
    let be = backend();
    let mut rng = Rng::new(7 + head_dim as u64);
    let capacities = [40usize, 17, 64, 25];
    let lens0 = [3i32, 0, 60, 20];
    let offsets = CompactPlan::packed_offsets(&capacities);
    let n_heads = capacities.len();
    let rows: usize = capacities.iter().sum();
    let mut seg = be.head_segments(&offsets, &lens0, &capacities).unwrap();
    let mut k_host = rand_bf16(&mut rng, rows * head_dim);
    let mut v_host = rand_bf16(&mut rng, rows * head_dim);
    let mut k_cache = be.upload(&k_host).unwrap();
    let mut v_cache = be.upload(&v_host).unwrap();
    for q_len in [1usize, 3] {
        let k_new = rand_bf16(&mut rng, q_len * n_heads * head_dim);
        let v_new = rand_bf16(&mut rng, q_len * n_heads * head_dim);
        let (kd, vd) = (be.upload(&k_new).unwrap(), be.upload(&v_new).unwrap());
        let lens_before = seg.lens().to_vec();
        be.append_kv(
            &mut seg,
            &kd,
            &vd,
            &mut k_cache,
            &mut v_cache,
            q_len,
            head_dim,
        )
        .unwrap();
        for t in 0..q_len {
            for h in 0..n_heads {
                let dst = (offsets[h] as usize + lens_before[h] as usize + t) * head_dim;
                let src = (t * n_heads + h) * head_dim;
                k_host[dst..dst + head_dim].copy_from_slice(&k_new[src..src + head_dim]);
                v_host[dst..dst + head_dim].copy_from_slice(&v_new[src..src + head_dim]);
            }
        }
        let want_lens: Vec<i32> = lens_before.iter().map(|&l| l + q_len as i32).collect();
        assert_eq!(seg.lens(), &want_lens[..]);
        assert_eq!(be.download(seg.lens_dev()).unwrap(), want_lens);
        assert!(
            be.download(&k_cache).unwrap() == k_host,
            "k cache differs (head_dim {head_dim})"
        );
        assert!(
            be.download(&v_cache).unwrap() == v_host,
            "v cache differs (head_dim {head_dim})"
        );
    }
    // Head 2 is now at 64 / 64: one more row must be refused and nothing written.
    let k_new = rand_bf16(&mut rng, n_heads * head_dim);
    let kd = be.upload(&k_new).unwrap();
    let err = be.append_kv(&mut seg, &kd, &kd, &mut k_cache, &mut v_cache, 1, head_dim);
    assert!(matches!(err, Err(CudaError::Shape(m)) if m.contains("head 2")));
    assert!(
        be.download(&k_cache).unwrap() == k_host,
        "a refused append wrote"
    );
    // Rolling back is bookkeeping.
    be.set_head_lens(&mut seg, &lens0).unwrap();
    assert_eq!(be.download(seg.lens_dev()).unwrap(), lens0.to_vec());
    assert!(
        be.set_head_lens(&mut seg, &[41, 0, 0, 0]).is_err(),
        "len over capacity accepted"
    );
}

#[test]
fn append_vector_path() {
    append_case(128);
}

#[test]
fn append_scalar_path() {
    append_case(36);
}

fn compact_case(head_dim: usize, seed: u64) {
    let be = backend();
    let mut rng = Rng::new(seed);
    let src_lens = [0i32, 1, 500, 1000, 333, 64];
    let src_offsets: Vec<i64> = {
        let mut acc = 0i64;
        src_lens
            .iter()
            .map(|&l| {
                acc += 13; // gaps between heads
                let o = acc;
                acc += l as i64;
                o
            })
            .collect()
    };
    let src_rows = (src_offsets[5] + 64 + 7) as usize;
    // Keep ratios from none to all, per head.
    let keep_p = [0.5, 1.0, 0.3, 0.0, 0.9, 1.0];
    let masks: Vec<Vec<bool>> = src_lens
        .iter()
        .zip(keep_p)
        .map(|(&l, p)| (0..l).map(|_| rng.next_f64() < p).collect())
        .collect();
    let plan_counts: Vec<usize> = masks
        .iter()
        .map(|m| m.iter().filter(|&&b| b).count())
        .collect();
    let capacities: Vec<usize> = plan_counts.iter().map(|c| c + 5).collect();
    let dst_offsets = CompactPlan::packed_offsets(&capacities);
    let plan = CompactPlan::from_masks(&masks, &src_offsets, &src_lens, &dst_offsets).unwrap();
    assert_eq!(
        plan.kept_lens(),
        plan_counts.iter().map(|&c| c as i32).collect::<Vec<_>>()
    );
    let dplan = be.upload_compact_plan(&plan).unwrap();
    let k_src = rand_bf16(&mut rng, src_rows * head_dim);
    let v_src = rand_bf16(&mut rng, src_rows * head_dim);
    let dst_rows: usize = capacities.iter().sum();
    let poison = bf16::from_f32(-1234.0);
    let mut k_dst = be.upload(&vec![poison; dst_rows * head_dim]).unwrap();
    let mut v_dst = be.upload(&vec![poison; dst_rows * head_dim]).unwrap();
    let (ks, vs) = (be.upload(&k_src).unwrap(), be.upload(&v_src).unwrap());
    be.compact(&ks, &vs, &mut k_dst, &mut v_dst, &dplan, head_dim)
        .unwrap();
    let mut k_want = vec![poison; dst_rows * head_dim];
    let mut v_want = k_want.clone();
    for h in 0..src_lens.len() {
        let kept = masks[h].iter().enumerate().filter(|(_, &b)| b);
        for (i, (pos, _)) in kept.enumerate() {
            let dst = dst_offsets[h] as usize + i;
            let src = (src_offsets[h] as usize + pos) * head_dim;
            k_want[dst * head_dim..(dst + 1) * head_dim]
                .copy_from_slice(&k_src[src..src + head_dim]);
            v_want[dst * head_dim..(dst + 1) * head_dim]
                .copy_from_slice(&v_src[src..src + head_dim]);
        }
    }
    assert!(
        be.download(&k_dst).unwrap() == k_want,
        "k compaction differs (head_dim {head_dim})"
    );
    assert!(
        be.download(&v_dst).unwrap() == v_want,
        "v compaction differs (head_dim {head_dim})"
    );
}

#[test]
fn compact_vector_path() {
    compact_case(128, 3);
    compact_case(64, 4);
    compact_case(256, 5);
}

#[test]
fn compact_scalar_path() {
    compact_case(20, 6);
}

#[test]
fn compact_plan_errors() {
    let be = backend();
    let bad_order = CompactPlan::from_kept(&[vec![3, 2]], &[0], &[5], &[0]);
    assert!(matches!(bad_order, Err(CudaError::Shape(m)) if m.contains("ascending")));
    let out_of_range = CompactPlan::from_kept(&[vec![5]], &[0], &[5], &[0]);
    assert!(out_of_range.is_err());
    let mask_len = CompactPlan::from_masks(&[vec![true; 4]], &[0], &[5], &[0]);
    assert!(mask_len.is_err());
    let overlap =
        CompactPlan::from_kept(&[vec![0, 1, 2], vec![0]], &[0, 10], &[5, 5], &[0, 2]).unwrap();
    assert!(
        be.upload_compact_plan(&overlap).is_err(),
        "overlapping heads accepted"
    );
    let ok = CompactPlan::from_kept(&[vec![0, 1, 2], vec![0]], &[0, 10], &[5, 5], &[0, 3]).unwrap();
    let dplan = be.upload_compact_plan(&ok).unwrap();
    let src = be.zeros::<bf16>(8 * 11).unwrap();
    let mut dst = be.zeros::<bf16>(8 * 3).unwrap();
    let mut dst2 = be.zeros::<bf16>(8 * 4).unwrap();
    let err = be.compact(&src, &src, &mut dst, &mut dst2, &dplan, 8);
    assert!(matches!(err, Err(CudaError::Shape(m)) if m.contains("k_dst")));
}
