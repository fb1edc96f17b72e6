//! Element-wise CUDA kernels and cuBLAS GEMMs vs the CPU reference ops on bf16-rounded inputs.
//! GPU only: run with `--features cuda` on a machine with a CUDA GPU.
#![cfg(feature = "cuda")]

use half::bf16;
use kvzip_kernels::cuda::gemm::{GemvNorm, GemvStore};
use kvzip_kernels::cuda::ops::Activation;
use kvzip_kernels::cuda::CudaBackend;
use kvzip_kernels::reference;
use kvzip_kernels::sampling::{argmax, Rng};

fn backend() -> CudaBackend {
    CudaBackend::new(0).expect("these tests need a CUDA GPU (run them on the GPU machine)")
}

/// Random values in [lo, hi) rounded to bf16 (so host and device see the same inputs).
fn rand_r(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    rng.uniform_vec(n, lo, hi).into_iter().map(round).collect()
}

fn round(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// ‖got − want‖ / ‖want‖ (NaN fails).
fn assert_rel(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - *w as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
    let rel = (num / den.max(1e-30)).sqrt();
    println!("{what}: rel {rel:.2e}");
    assert!(rel <= tol, "{what}: relative error {rel} > {tol}");
}

#[test]
fn rms_norm_plain_gemma_and_fused_residual() {
    let be = backend();
    let mut rng = Rng::new(1);
    for (rows, dim) in [(5usize, 4096usize), (3, 100), (1, 8)] {
        for (offset, fused) in [(0.0f32, false), (1.0, false), (0.0, true), (1.0, true)] {
            let x = rand_r(&mut rng, rows * dim, -3.0, 3.0);
            let res = rand_r(&mut rng, rows * dim, -3.0, 3.0);
            let w = rand_r(&mut rng, dim, -1.0, 1.5);
            let mut xd = be.upload_bf16(&x).unwrap();
            let rd = be.upload_bf16(&res).unwrap();
            let wd = be.upload_bf16(&w).unwrap();
            let mut out = be.upload_bf16(&vec![f32::NAN; rows * dim]).unwrap();
            let residual: Option<&dyn kvzip_kernels::cuda::DevicePtr<bf16>> =
                if fused { Some(&rd) } else { None };
            be.rms_norm(&mut xd, residual, &wd, &mut out, rows, dim, 1e-6, offset)
                .unwrap();
            let summed: Vec<f32> = if fused {
                x.iter().zip(&res).map(|(a, b)| round(a + b)).collect()
            } else {
                x.clone()
            };
            let mut want = vec![0f32; rows * dim];
            reference::rms_norm(&summed, &w, 1e-6, offset, dim, &mut want).unwrap();
            let what = format!("rms_norm rows {rows} dim {dim} offset {offset} fused {fused}");
            assert_rel(&what, &be.download_f32(&out).unwrap(), &want, 1e-2);
            assert_eq!(
                be.download_f32(&xd).unwrap(),
                summed,
                "{what}: x after the fused add"
            );
        }
    }
}

#[test]
fn rope_partial_rotary_with_attention_factor() {
    let be = backend();
    let mut rng = Rng::new(2);
    for (head_dim, rot_half, factor) in [(128usize, 64usize, 1.0f32), (128, 32, 1.3), (64, 16, 0.9)]
    {
        let (tokens, n_q, n_kv) = (7usize, 4usize, 2usize);
        let mut q = rand_r(&mut rng, tokens * n_q * head_dim, -2.0, 2.0);
        let mut k = rand_r(&mut rng, tokens * n_kv * head_dim, -2.0, 2.0);
        let inv_freq: Vec<f32> = (0..rot_half)
            .map(|i| 1.0 / 500000f32.powf(2.0 * i as f32 / (2 * rot_half) as f32))
            .collect();
        let positions: Vec<usize> = (0..tokens)
            .map(|_| (rng.next_u64() % 40000) as usize)
            .collect();
        let mut qd = be.upload_bf16(&q).unwrap();
        let mut kd = be.upload_bf16(&k).unwrap();
        let pd = be
            .upload(&positions.iter().map(|&p| p as i32).collect::<Vec<_>>())
            .unwrap();
        let fd = be.upload(&inv_freq).unwrap();
        be.rope(
            &mut qd,
            Some(&mut kd),
            &pd,
            &fd,
            tokens,
            n_q,
            n_kv,
            head_dim,
            factor,
        )
        .unwrap();
        reference::rope_inplace(&mut q, &positions, n_q, head_dim, &inv_freq, factor).unwrap();
        reference::rope_inplace(&mut k, &positions, n_kv, head_dim, &inv_freq, factor).unwrap();
        let what = format!("rope head_dim {head_dim} rot_half {rot_half} factor {factor}");
        assert_rel(
            &format!("{what} q"),
            &be.download_f32(&qd).unwrap(),
            &q,
            1e-2,
        );
        assert_rel(
            &format!("{what} k"),
            &be.download_f32(&kd).unwrap(),
            &k,
            1e-2,
        );
    }
}

#[test]
fn act_mul_silu_and_gelu() {
    let be = backend();
    let mut rng = Rng::new(3);
    for (rows, inter) in [(3usize, 1000usize), (2, 13)] {
        for act in [Activation::Silu, Activation::GeluTanh] {
            let gu = rand_r(&mut rng, rows * 2 * inter, -4.0, 4.0);
            let gd = be.upload_bf16(&gu).unwrap();
            let mut out = be.upload_bf16(&vec![f32::NAN; rows * inter]).unwrap();
            be.act_mul(&gd, &mut out, rows, inter, act).unwrap();
            let mut want = vec![0f32; rows * inter];
            for r in 0..rows {
                let g = &gu[r * 2 * inter..r * 2 * inter + inter];
                let u = &gu[r * 2 * inter + inter..(r + 1) * 2 * inter];
                let o = &mut want[r * inter..(r + 1) * inter];
                match act {
                    Activation::Silu => reference::silu_mul(g, u, o).unwrap(),
                    Activation::GeluTanh => reference::gelu_tanh_mul(g, u, o).unwrap(),
                }
            }
            let what = format!("act_mul {act:?} rows {rows} inter {inter}");
            assert_rel(&what, &be.download_f32(&out).unwrap(), &want, 1e-2);
        }
    }
}

#[test]
fn embedding_with_scale() {
    let be = backend();
    let mut rng = Rng::new(4);
    let (vocab, dim) = (50usize, 96usize);
    let table = rand_r(&mut rng, vocab * dim, -1.0, 1.0);
    let ids: Vec<u32> = (0..9)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let (td, idd) = (be.upload_bf16(&table).unwrap(), be.upload(&ids).unwrap());
    for scale in [1.0f32, (2048f32).sqrt()] {
        let mut out = be.upload_bf16(&vec![f32::NAN; ids.len() * dim]).unwrap();
        be.embedding(&idd, &td, &mut out, dim, scale).unwrap();
        let mut want = vec![0f32; ids.len() * dim];
        reference::embedding(&ids, &table, dim, scale, &mut want).unwrap();
        let want: Vec<f32> = want.into_iter().map(round).collect();
        assert_eq!(
            be.download_f32(&out).unwrap(),
            want,
            "embedding scale {scale}"
        );
    }
}

#[test]
fn add_and_add_bias() {
    let be = backend();
    let mut rng = Rng::new(5);
    let n = 1003;
    let (x, y) = (
        rand_r(&mut rng, n, -5.0, 5.0),
        rand_r(&mut rng, n, -5.0, 5.0),
    );
    let mut xd = be.upload_bf16(&x).unwrap();
    be.add(&mut xd, &be.upload_bf16(&y).unwrap(), n).unwrap();
    let want: Vec<f32> = x.iter().zip(&y).map(|(a, b)| round(a + b)).collect();
    assert_eq!(be.download_f32(&xd).unwrap(), want, "add");
    let (rows, cols) = (4usize, 96usize);
    let x = rand_r(&mut rng, rows * cols, -5.0, 5.0);
    let bias = rand_r(&mut rng, cols, -1.0, 1.0);
    let mut xd = be.upload_bf16(&x).unwrap();
    be.add_bias(&mut xd, &be.upload_bf16(&bias).unwrap(), rows)
        .unwrap();
    let want: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, a)| round(a + bias[i % cols]))
        .collect();
    assert_eq!(be.download_f32(&xd).unwrap(), want, "add_bias");
}

#[test]
fn sample_argmax_and_softcap() {
    let be = backend();
    let mut rng = Rng::new(6);
    // Vocabularies of an even and an odd size, with and without a softcap.
    for (rows, vocab, softcap) in [
        (3usize, 50_000usize, 0.0f32),
        (3, 50_000, 30.0),
        (3, 50_001, 0.0),
        (3, 50_001, 30.0),
    ] {
        let mut logits = rng.uniform_vec(rows * vocab, -40.0, 40.0);
        let mut ld = be.upload(&logits).unwrap();
        let mut out = be.upload(&vec![u32::MAX; rows]).unwrap();
        be.sample(&mut ld, &mut out, rows, vocab, softcap, 0.0, 1, 0)
            .unwrap();
        if softcap > 0.0 {
            reference::softcap_inplace(&mut logits, softcap);
            assert_rel(
                "softcapped logits",
                &be.download(&ld).unwrap(),
                &logits,
                1e-6,
            );
        }
        let got = be.download(&out).unwrap();
        for r in 0..rows {
            let want = argmax(&logits[r * vocab..(r + 1) * vocab]);
            assert_eq!(
                got[r] as usize, want,
                "argmax row {r} vocab {vocab} softcap {softcap}"
            );
        }
    }
}

#[test]
fn sample_temperature_matches_softmax_frequencies() {
    let be = backend();
    let logits = [1.0f32, 0.0, -1.0, 2.0, 0.5, -3.0, 1.5, 0.2];
    let (vocab, rows, temperature) = (logits.len(), 40_000usize, 0.8f32);
    let mut counts = vec![0usize; vocab];
    for step in 0..2u64 {
        let all: Vec<f32> = (0..rows).flat_map(|_| logits).collect();
        let mut ld = be.upload(&all).unwrap();
        let mut out = be.upload(&vec![u32::MAX; rows]).unwrap();
        be.sample(&mut ld, &mut out, rows, vocab, 0.0, temperature, 42, step)
            .unwrap();
        for id in be.download(&out).unwrap() {
            counts[id as usize] += 1;
        }
    }
    let n = (2 * rows) as f64;
    let z: f64 = logits
        .iter()
        .map(|&l| ((l / temperature) as f64).exp())
        .sum();
    let chi2: f64 = logits
        .iter()
        .zip(&counts)
        .map(|(&l, &c)| {
            let e = n * ((l / temperature) as f64).exp() / z;
            (c as f64 - e).powi(2) / e
        })
        .sum();
    println!("sample counts {counts:?}, chi2 {chi2:.2} (7 dof)");
    // 7 degrees of freedom: P(chi2 > 29.9) = 1e-4 under the right distribution.
    assert!(
        chi2 < 29.9,
        "sampling frequencies off: chi2 {chi2}, counts {counts:?}"
    );
}

#[test]
fn linear_and_linear_f32_match_reference() {
    let be = backend();
    let mut rng = Rng::new(8);
    for (m, n, k) in [(33usize, 70usize, 256usize), (1, 4096, 512)] {
        let x = rand_r(&mut rng, m * k, -1.0, 1.0);
        let w = rand_r(&mut rng, n * k, -1.0, 1.0);
        let (xd, wd) = (be.upload_bf16(&x).unwrap(), be.upload_bf16(&w).unwrap());
        let mut want = vec![0f32; m * n];
        reference::linear(&x, &w, None, m, k, n, &mut want).unwrap();
        let mut out = be.upload_bf16(&vec![f32::NAN; m * n]).unwrap();
        be.linear(&xd, &wd, &mut out, m, n, k).unwrap();
        assert_rel(
            &format!("linear {m}x{n}x{k}"),
            &be.download_f32(&out).unwrap(),
            &want,
            1e-2,
        );
        let mut out32 = be.upload(&vec![f32::NAN; m * n]).unwrap();
        be.linear_f32(&xd, &wd, &mut out32, m, n, k).unwrap();
        assert_rel(
            &format!("linear_f32 {m}x{n}x{k}"),
            &be.download(&out32).unwrap(),
            &want,
            1e-4,
        );
    }
}

/// Decode-sized products (the GEMV kernel: 1-2 rows, k % 8 == 0, aligned) and every case that
/// falls back to cuBLAS (3 rows, k % 8 != 0, a misaligned x) agree with the reference, with and
/// without a bias, into bf16 and f32; every output element is written.
#[test]
fn linear_decode_rows_gemv_and_fallbacks_match_reference() {
    let be = backend();
    let mut rng = Rng::new(21);
    // (m, n, k, x offset in elements): n not a multiple of the 16 rows per block, k not a
    // multiple of the 32 lanes x 4 chunks per iteration.
    let cases = [
        (1usize, 70usize, 256usize, 0usize),
        (2, 33, 264, 0),
        (1, 4099, 4096, 0),
        (2, 1, 8, 0),
        (1, 17, 20, 0),
        (3, 70, 256, 0),
        (1, 70, 256, 1),
    ];
    for (m, n, k, off) in cases {
        // bf16-exact inputs: the reference sees exactly the device's operands.
        let x = rand_r(&mut rng, m * k, -1.0, 1.0);
        let w = rand_r(&mut rng, n * k, -1.0, 1.0);
        let bias = rand_r(&mut rng, n, -1.0, 1.0);
        let mut padded = vec![0.5f32; off];
        padded.extend_from_slice(&x);
        let xd = be.upload_bf16(&padded).unwrap();
        let xv = xd.slice(off..);
        let (wd, bd) = (be.upload_bf16(&w).unwrap(), be.upload_bf16(&bias).unwrap());
        for with_bias in [false, true] {
            let mut want = vec![0f32; m * n];
            let b = with_bias.then_some(&bias[..]);
            reference::linear(&x, &w, b, m, k, n, &mut want).unwrap();
            let what = format!("linear {m}x{n}x{k} offset {off} bias {with_bias}");
            let mut out = be.upload_bf16(&vec![f32::NAN; m * n]).unwrap();
            be.linear_bias(&xv, &wd, with_bias.then_some(&bd), &mut out, m, n, k)
                .unwrap();
            let got = be.download_f32(&out).unwrap();
            assert!(
                got.iter().all(|v| v.is_finite()),
                "{what}: unwritten output"
            );
            assert_rel(&what, &got, &want, 1e-2);
            if !with_bias {
                let mut out32 = be.upload(&vec![f32::NAN; m * n]).unwrap();
                be.linear_f32(&xv, &wd, &mut out32, m, n, k).unwrap();
                assert_rel(
                    &format!("{what} f32"),
                    &be.download(&out32).unwrap(),
                    &want,
                    1e-4,
                );
            }
        }
    }
    // A bias of the wrong length is refused, not read past its end.
    let (xd, wd) = (
        be.upload_bf16(&[1.0; 8]).unwrap(),
        be.upload_bf16(&[1.0; 16]).unwrap(),
    );
    let short = be.upload_bf16(&[1.0]).unwrap();
    let mut out = be.upload_bf16(&[0.0; 2]).unwrap();
    assert!(be
        .linear_bias(&xd, &wd, Some(&short), &mut out, 1, 2, 8)
        .is_err());
}

/// No bias / no norm arguments of [`CudaBackend::linear_fused`].
const NO_BIAS: Option<&kvzip_kernels::cuda::CudaSlice<bf16>> = None;

/// The fused gate-and-up GEMV (`act(x · gateᵀ) * (x · upᵀ)`) of 1-2 rows equals the reference
/// linear layer followed by the activation product; 3 rows are left to the unfused path.
#[test]
fn linear_glu_matches_linear_then_act_mul() {
    let be = backend();
    let mut rng = Rng::new(22);
    for (m, inter, k) in [(1usize, 70usize, 256usize), (2, 33, 264), (1, 1000, 896)] {
        for act in [Activation::Silu, Activation::GeluTanh] {
            let x = rand_r(&mut rng, m * k, -1.0, 1.0);
            let w = rand_r(&mut rng, 2 * inter * k, -0.2, 0.2);
            let mut gate_up = vec![0f32; m * 2 * inter];
            reference::linear(&x, &w, None, m, k, 2 * inter, &mut gate_up).unwrap();
            let mut want = vec![0f32; m * inter];
            reference::act_mul_rows(&gate_up, &mut want, m, inter, act).unwrap();
            let (xd, wd) = (be.upload_bf16(&x).unwrap(), be.upload_bf16(&w).unwrap());
            let mut out = be.upload_bf16(&vec![f32::NAN; m * inter]).unwrap();
            let glu = GemvStore::Glu(act);
            assert!(be
                .linear_fused(&xd, &wd, NO_BIAS, None, &mut out, m, inter, k, glu)
                .unwrap());
            let got = be.download_f32(&out).unwrap();
            let what = format!("linear_glu {act:?} {m}x{inter}x{k}");
            assert!(
                got.iter().all(|v| v.is_finite()),
                "{what}: unwritten output"
            );
            assert_rel(&what, &got, &want, 1e-2);
        }
    }
    let x = be.upload_bf16(&[0.5; 3 * 8]).unwrap();
    let w = be.upload_bf16(&[0.5; 2 * 4 * 8]).unwrap();
    let mut out = be.upload_bf16(&[0.0; 3 * 4]).unwrap();
    let glu = GemvStore::Glu(Activation::Silu);
    assert!(!be
        .linear_fused(&x, &w, NO_BIAS, None, &mut out, 3, 4, 8, glu)
        .unwrap());
}

/// The GEMV with its pre-norm (RMSNorm of the raw rows in shared memory), GLU and
/// residual-add epilogues equals the unfused kernels bit for bit (`rms_norm`, then the product,
/// then `act_mul`; the product into a scratch, then `rms_norm`'s fused add) and the CPU
/// reference within bf16 rounding, for bf16 (with bias), f32 and GLU stores, 1-2 rows, plain
/// and Gemma (`1 + w`) norms, k past 8,192 (several chunks per norm thread); shapes it cannot
/// take (rows that do not fit shared memory, k % 8 != 0, 3 rows) are declined, not run.
#[test]
fn linear_fused_norm_and_residual_match_unfused_ops() {
    let be = backend();
    let mut rng = Rng::new(23);
    let cases = [
        (1usize, 70usize, 256usize),
        (2, 33, 264),
        (1, 4099, 4096),
        (2, 40, 8192),
        (1, 40, 12288),
    ];
    for (m, n, k) in cases {
        for offset in [0.0f32, 1.0] {
            let x = rand_r(&mut rng, m * k, -3.0, 3.0);
            let g = rand_r(&mut rng, k, -1.0, 1.5);
            let w = rand_r(&mut rng, 2 * n * k, -0.2, 0.2);
            let bias = rand_r(&mut rng, n, -1.0, 1.0);
            let (xd, gd) = (be.upload_bf16(&x).unwrap(), be.upload_bf16(&g).unwrap());
            let (wd, bd) = (be.upload_bf16(&w).unwrap(), be.upload_bf16(&bias).unwrap());
            let w_n = wd.slice(0..n * k);
            let norm = || GemvNorm {
                weight: &gd,
                eps: 1e-6,
                offset,
            };
            let what = format!("norm linear {m}x{n}x{k} offset {offset}");
            // Unfused on the device: normed = rms_norm(x), then the products.
            let mut xs = be.upload_bf16(&x).unwrap();
            let mut normed = be.upload_bf16(&vec![0.0; m * k]).unwrap();
            be.rms_norm(&mut xs, None, &gd, &mut normed, m, k, 1e-6, offset)
                .unwrap();
            let normed_host = be.download_f32(&normed).unwrap();
            let mut unfused = be.upload_bf16(&vec![0.0; m * n]).unwrap();
            be.linear_bias(&normed, &w_n, Some(&bd), &mut unfused, m, n, k)
                .unwrap();
            let mut want = vec![0f32; m * n];
            reference::linear(&normed_host, &w[..n * k], Some(&bias), m, k, n, &mut want).unwrap();
            let mut out = be.upload_bf16(&vec![f32::NAN; m * n]).unwrap();
            let store = GemvStore::Bf16;
            assert!(be
                .linear_fused(&xd, &w_n, Some(&bd), Some(norm()), &mut out, m, n, k, store)
                .unwrap());
            let got = be.download_f32(&out).unwrap();
            assert_eq!(
                got,
                be.download_f32(&unfused).unwrap(),
                "{what}: vs unfused"
            );
            assert_rel(&what, &got, &want, 1e-2);
            // f32 store (logits), no bias.
            let mut unfused32 = be.upload(&vec![0.0; m * n]).unwrap();
            be.linear_f32(&normed, &w_n, &mut unfused32, m, n, k)
                .unwrap();
            let mut out32 = be.upload(&vec![f32::NAN; m * n]).unwrap();
            assert!(be
                .linear_fused_f32(&xd, &w_n, Some(norm()), &mut out32, m, n, k)
                .unwrap());
            let got32 = be.download(&out32).unwrap();
            assert_eq!(
                got32,
                be.download(&unfused32).unwrap(),
                "{what}: f32 vs unfused"
            );
            reference::linear(&normed_host, &w[..n * k], None, m, k, n, &mut want).unwrap();
            assert_rel(&format!("{what} f32"), &got32, &want, 1e-3);
            // GLU store: act(normed · gateᵀ) * (normed · upᵀ).
            let mut gate_up_d = be.upload_bf16(&vec![0.0; m * 2 * n]).unwrap();
            be.linear(&normed, &wd, &mut gate_up_d, m, 2 * n, k)
                .unwrap();
            let mut unfused_glu = be.upload_bf16(&vec![0.0; m * n]).unwrap();
            be.act_mul(&gate_up_d, &mut unfused_glu, m, n, Activation::Silu)
                .unwrap();
            let mut gate_up = vec![0f32; m * 2 * n];
            reference::linear(&normed_host, &w, None, m, k, 2 * n, &mut gate_up).unwrap();
            let mut want_glu = vec![0f32; m * n];
            reference::act_mul_rows(&gate_up, &mut want_glu, m, n, Activation::Silu).unwrap();
            let mut glu = be.upload_bf16(&vec![f32::NAN; m * n]).unwrap();
            let store = GemvStore::Glu(Activation::Silu);
            assert!(be
                .linear_fused(&xd, &wd, NO_BIAS, Some(norm()), &mut glu, m, n, k, store)
                .unwrap());
            let got_glu = be.download_f32(&glu).unwrap();
            assert_eq!(
                got_glu,
                be.download_f32(&unfused_glu).unwrap(),
                "{what}: glu vs unfused"
            );
            assert_rel(&format!("{what} glu"), &got_glu, &want_glu, 1e-2);
        }
    }
    // Residual add: out += bf16(x · wᵀ + bias), exactly what the product into a scratch and
    // rms_norm's fused add store into x.
    for (m, n, k) in [(1usize, 4096usize, 4096usize), (2, 70, 264)] {
        let x = rand_r(&mut rng, m * k, -1.0, 1.0);
        let w = rand_r(&mut rng, n * k, -0.2, 0.2);
        let bias = rand_r(&mut rng, n, -1.0, 1.0);
        let resid = rand_r(&mut rng, m * n, -3.0, 3.0);
        let (xd, wd, bd) = (
            be.upload_bf16(&x).unwrap(),
            be.upload_bf16(&w).unwrap(),
            be.upload_bf16(&bias).unwrap(),
        );
        let mut delta = be.upload_bf16(&vec![0.0; m * n]).unwrap();
        be.linear_bias(&xd, &wd, Some(&bd), &mut delta, m, n, k)
            .unwrap();
        let mut unfused = be.upload_bf16(&resid).unwrap();
        let mut scratch = be.upload_bf16(&vec![0.0; m * n]).unwrap();
        let ones = be.upload_bf16(&vec![1.0; n]).unwrap();
        let delta_ref: &dyn kvzip_kernels::cuda::DevicePtr<bf16> = &delta;
        be.rms_norm(
            &mut unfused,
            Some(delta_ref),
            &ones,
            &mut scratch,
            m,
            n,
            1e-6,
            0.0,
        )
        .unwrap();
        let mut fused = be.upload_bf16(&resid).unwrap();
        let store = GemvStore::Accumulate;
        assert!(be
            .linear_fused(&xd, &wd, Some(&bd), None, &mut fused, m, n, k, store)
            .unwrap());
        assert_eq!(
            be.download_f32(&fused).unwrap(),
            be.download_f32(&unfused).unwrap(),
            "residual add {m}x{n}x{k}"
        );
    }
    // Declined: normalised rows over 48 KiB of shared memory, k % 8 != 0, 3 rows.
    for (m, k) in [(2usize, 12296usize), (1, 20), (3, 64)] {
        let x = be.upload_bf16(&vec![0.5; m * k]).unwrap();
        let g = be.upload_bf16(&vec![1.0; k]).unwrap();
        let w = be.upload_bf16(&vec![0.5; 4 * k]).unwrap();
        let mut out = be.upload_bf16(&vec![0.0; m * 4]).unwrap();
        let norm = GemvNorm {
            weight: &g,
            eps: 1e-6,
            offset: 0.0,
        };
        assert!(
            !be.linear_fused(
                &x,
                &w,
                NO_BIAS,
                Some(norm),
                &mut out,
                m,
                4,
                k,
                GemvStore::Bf16
            )
            .unwrap(),
            "{m} rows, k {k}: should be declined"
        );
    }
}
