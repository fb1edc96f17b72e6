//! KV-cache append and row-gather ops on CUDA vs the host (exact equality on bf16-exact
//! values), through the device interface. GPU only.
#![cfg(feature = "cuda")]

use kvzip_kernels::sampling::Rng;
use kvzip_kernels::{DType, Device, GatherPlan, Tensor};

fn gpu() -> Device {
    Device::cuda(0).expect("these tests need a CUDA GPU (run them on the GPU machine)")
}

/// `n` values exactly representable in bf16.
fn rand_exact(rng: &mut Rng, n: usize) -> Vec<f32> {
    rng.uniform_vec(n, -4.0, 4.0)
        .into_iter()
        .map(|x| half::bf16::from_f32(x).to_f32())
        .collect()
}

fn packed_offsets(caps: &[usize]) -> Vec<usize> {
    caps.iter()
        .scan(0, |acc, &c| {
            let o = *acc;
            *acc += c;
            Some(o)
        })
        .collect()
}

fn append_case(head_dim: usize) {
    let dev = gpu();
    let mut rng = Rng::new(7 + head_dim as u64);
    let caps = [40usize, 17, 64, 25];
    let mut lens = vec![3usize, 0, 60, 20];
    let offsets = packed_offsets(&caps);
    let n_heads = caps.len();
    let rows: usize = caps.iter().sum();
    let mut k_host = rand_exact(&mut rng, rows * head_dim);
    let mut v_host = rand_exact(&mut rng, rows * head_dim);
    let mut k_dev = dev.upload_f32(&k_host).unwrap();
    let mut v_dev = dev.upload_f32(&v_host).unwrap();
    let mut mirror = dev.kv_layout_mirror(&[n_heads]).unwrap();
    dev.sync_kv_offsets(&mut mirror, &offsets).unwrap();
    for q_len in [1usize, 3] {
        let k_new = rand_exact(&mut rng, q_len * n_heads * head_dim);
        let v_new = rand_exact(&mut rng, q_len * n_heads * head_dim);
        let (kd, vd) = (
            dev.upload_f32(&k_new).unwrap(),
            dev.upload_f32(&v_new).unwrap(),
        );
        let lens_before = lens.clone();
        lens.iter_mut().for_each(|l| *l += q_len);
        dev.sync_kv_lens(&mut mirror, &lens, q_len).unwrap();
        dev.append_kv(
            &kd.view(),
            &vd.view(),
            &mut k_dev.view_mut(),
            &mut v_dev.view_mut(),
            (&offsets, &lens_before, &caps),
            Some((&mirror, 0)),
            q_len,
            head_dim,
        )
        .unwrap();
        // The same op on the host is the reference.
        let (mut kh, mut vh) = (
            Tensor::from_f32(k_host.clone()),
            Tensor::from_f32(v_host.clone()),
        );
        Device::Cpu
            .append_kv(
                &kvzip_kernels::View::f32(&k_new),
                &kvzip_kernels::View::f32(&v_new),
                &mut kh.view_mut(),
                &mut vh.view_mut(),
                (&offsets, &lens_before, &caps),
                None,
                q_len,
                head_dim,
            )
            .unwrap();
        k_host = kh.host_f32("k").unwrap().to_vec();
        v_host = vh.host_f32("v").unwrap().to_vec();
        assert_eq!(
            dev.to_host_f32(&k_dev.view()).unwrap(),
            k_host,
            "K after append"
        );
        assert_eq!(
            dev.to_host_f32(&v_dev.view()).unwrap(),
            v_host,
            "V after append"
        );
    }
    // A head without room is refused before anything is written.
    let full = dev.upload_f32(&vec![0.0; 40 * n_heads * head_dim]).unwrap();
    let err = dev
        .append_kv(
            &full.view(),
            &full.view(),
            &mut k_dev.view_mut(),
            &mut v_dev.view_mut(),
            (&offsets, &lens, &caps),
            Some((&mirror, 0)),
            40,
            head_dim,
        )
        .unwrap_err();
    assert!(err.to_string().contains("do not fit"), "{err}");
}

#[test]
fn append_vector_path() {
    append_case(64);
}

#[test]
fn append_scalar_path() {
    append_case(12);
}

fn compact_case(head_dim: usize, seed: u64, keep_p: f64) {
    let dev = gpu();
    let mut rng = Rng::new(seed);
    let caps = [300usize, 5, 128, 77];
    let lens = [290usize, 0, 128, 70];
    let offsets = packed_offsets(&caps);
    let rows: usize = caps.iter().sum();
    let k = rand_exact(&mut rng, rows * head_dim);
    let v = rand_exact(&mut rng, rows * head_dim);
    let kept: Vec<Vec<usize>> = lens
        .iter()
        .zip(&offsets)
        .map(|(&len, &o)| {
            (0..len)
                .filter(|_| rng.next_f64() < keep_p)
                .map(|p| o + p)
                .collect()
        })
        .collect();
    let dst_caps: Vec<usize> = kept.iter().map(|r| r.len() + 3).collect();
    let dst_offsets = packed_offsets(&dst_caps);
    let plan = GatherPlan::from_rows(&kept, &dst_offsets).unwrap();
    let dst_rows: usize = dst_caps.iter().sum();
    let (kd, vd) = (dev.upload_f32(&k).unwrap(), dev.upload_f32(&v).unwrap());
    let mut ko = dev.zeros(DType::Bf16, dst_rows * head_dim).unwrap();
    let mut vo = dev.zeros(DType::Bf16, dst_rows * head_dim).unwrap();
    dev.gather_rows(
        (&kd.view(), &vd.view()),
        (&mut ko.view_mut(), &mut vo.view_mut()),
        &plan,
        head_dim,
    )
    .unwrap();
    let (mut kh, mut vh) = (
        Tensor::from_f32(vec![0.0; dst_rows * head_dim]),
        Tensor::from_f32(vec![0.0; dst_rows * head_dim]),
    );
    Device::Cpu
        .gather_rows(
            (&kvzip_kernels::View::f32(&k), &kvzip_kernels::View::f32(&v)),
            (&mut kh.view_mut(), &mut vh.view_mut()),
            &plan,
            head_dim,
        )
        .unwrap();
    assert_eq!(
        dev.to_host_f32(&ko.view()).unwrap(),
        kh.host_f32("k").unwrap(),
        "K after gather (keep {keep_p})"
    );
    assert_eq!(
        dev.to_host_f32(&vo.view()).unwrap(),
        vh.host_f32("v").unwrap(),
        "V after gather (keep {keep_p})"
    );
}

#[test]
fn compact_vector_path() {
    // Many short runs: the gather kernel; everything kept: one copy per head.
    compact_case(128, 1, 0.3);
    compact_case(64, 2, 1.0);
}

#[test]
fn compact_scalar_path() {
    compact_case(20, 3, 0.5);
}

#[test]
fn compact_plan_errors() {
    let dev = gpu();
    let d = 8;
    let src = dev.upload_f32(&vec![0.0; 10 * d]).unwrap();
    let mut dst = dev.zeros(DType::Bf16, 10 * d).unwrap();
    let mut dst2 = dev.zeros(DType::Bf16, 10 * d).unwrap();
    let mut run = |plan: &GatherPlan| {
        dev.gather_rows(
            (&src.view(), &src.view()),
            (&mut dst.view_mut(), &mut dst2.view_mut()),
            plan,
            d,
        )
    };
    // A source row past the buffer.
    let plan = GatherPlan::from_rows(&[vec![0, 11]], &[0]).unwrap();
    assert!(run(&plan).unwrap_err().to_string().contains("outside"));
    // Overlapping destination ranges.
    let plan = GatherPlan::from_rows(&[vec![0, 1, 2], vec![3]], &[0, 2]).unwrap();
    assert!(run(&plan).unwrap_err().to_string().contains("overlap"));
    // Destination past the buffer.
    let plan = GatherPlan::from_rows(&[vec![0, 1]], &[9]).unwrap();
    assert!(run(&plan).is_err());
}
