//! Every CPU fast op against the reference oracle on random inputs, plus shape errors.

mod common;

use common::{assert_close, rand_vec};
use kvzip_kernels::sampling::Rng;
use kvzip_kernels::{cpu, reference, KernelError};

const RTOL: f32 = 1e-4;
const ATOL: f32 = 1e-5;

#[test]
fn linear_matches_reference_on_awkward_sizes() {
    let mut rng = Rng::new(1);
    for &(rows, in_dim, out_dim) in &[
        (1, 64, 96),
        (2, 33, 17),
        (3, 1, 5),
        (7, 129, 65),
        (64, 256, 130),
        (1, 1000, 1),
        (5, 0, 4),
    ] {
        for with_bias in [false, true] {
            let x = rand_vec(&mut rng, rows * in_dim);
            let w = rand_vec(&mut rng, out_dim * in_dim);
            let b = rand_vec(&mut rng, out_dim);
            let bias = with_bias.then_some(&b[..]);
            let mut y = vec![f32::NAN; rows * out_dim];
            let mut y_ref = vec![0.0; rows * out_dim];
            cpu::linear(&x, &w, bias, rows, in_dim, out_dim, &mut y).unwrap();
            reference::linear(&x, &w, bias, rows, in_dim, out_dim, &mut y_ref).unwrap();
            let what = format!("linear {rows}x{in_dim}->{out_dim} bias={with_bias}");
            assert_close(
                &what,
                &y,
                &y_ref,
                RTOL,
                ATOL * (in_dim as f32).sqrt().max(1.0),
            );
        }
    }
}

#[test]
fn matmul_matches_reference_with_alpha_beta_and_transpose() {
    let mut rng = Rng::new(2);
    for &(m, k, n) in &[(1, 1, 1), (3, 7, 5), (17, 64, 33), (128, 31, 9), (4, 0, 3)] {
        for trans_b in [false, true] {
            for &(alpha, beta) in &[(1.0, 0.0), (0.5, 1.0), (-2.0, 0.25)] {
                let a = rand_vec(&mut rng, m * k);
                let b = rand_vec(&mut rng, k * n);
                let c0 = rand_vec(&mut rng, m * n);
                let mut c = c0.clone();
                let mut c_ref = c0.clone();
                if beta == 0.0 {
                    c.fill(f32::NAN); // beta = 0 must ignore old contents
                }
                cpu::matmul(&a, &b, m, k, n, trans_b, alpha, beta, &mut c).unwrap();
                reference::matmul(&a, &b, m, k, n, trans_b, alpha, beta, &mut c_ref).unwrap();
                let what = format!("matmul {m}x{k}x{n} t={trans_b} a={alpha} b={beta}");
                assert_close(&what, &c, &c_ref, RTOL, ATOL * (k as f32).sqrt().max(1.0));
            }
        }
    }
}

#[test]
fn rms_norm_matches_reference_llama_and_gemma() {
    let mut rng = Rng::new(3);
    for &(rows, dim) in &[(1, 64), (3, 65), (17, 1), (300, 128), (2, 2048)] {
        for offset in [0.0, 1.0] {
            let x = rand_vec(&mut rng, rows * dim);
            let w = rand_vec(&mut rng, dim);
            let mut out = vec![0.0; rows * dim];
            let mut out_ref = vec![0.0; rows * dim];
            cpu::rms_norm(&x, &w, 1e-6, offset, dim, &mut out).unwrap();
            reference::rms_norm(&x, &w, 1e-6, offset, dim, &mut out_ref).unwrap();
            assert_close(
                &format!("rms_norm {rows}x{dim} off={offset}"),
                &out,
                &out_ref,
                RTOL,
                ATOL,
            );
        }
    }
}

#[test]
fn rms_norm_applies_formula() {
    let x = [3.0f32, 4.0];
    let w = [1.0f32, 2.0];
    let mut out = [0.0f32; 2];
    // mean(x^2) = 12.5
    let inv = 1.0 / 12.5f32.sqrt();
    cpu::rms_norm(&x, &w, 0.0, 1.0, 2, &mut out).unwrap();
    assert_close(
        "gemma norm",
        &out,
        &[3.0 * inv * 2.0, 4.0 * inv * 3.0],
        1e-6,
        0.0,
    );
}

#[test]
fn gated_activations_match_reference() {
    let mut rng = Rng::new(4);
    for &n in &[1usize, 7, 1000, 70_001] {
        let gate: Vec<f32> = rng.uniform_vec(n, -12.0, 12.0);
        let up = rand_vec(&mut rng, n);
        let (mut out, mut out_ref) = (vec![0.0; n], vec![0.0; n]);
        cpu::silu_mul(&gate, &up, &mut out).unwrap();
        reference::silu_mul(&gate, &up, &mut out_ref).unwrap();
        assert_close(&format!("silu_mul {n}"), &out, &out_ref, RTOL, 1e-6);
        cpu::gelu_tanh_mul(&gate, &up, &mut out).unwrap();
        reference::gelu_tanh_mul(&gate, &up, &mut out_ref).unwrap();
        assert_close(&format!("gelu_tanh_mul {n}"), &out, &out_ref, RTOL, 1e-6);
    }
    // Known values: gelu_tanh(1) = 0.8411920, silu(1) = 0.7310586.
    let mut out = [0.0f32];
    cpu::gelu_tanh_mul(&[1.0], &[1.0], &mut out).unwrap();
    assert!((out[0] - 0.841_192).abs() < 1e-6, "{}", out[0]);
    cpu::silu_mul(&[1.0], &[1.0], &mut out).unwrap();
    assert!((out[0] - 0.731_058_6).abs() < 1e-6, "{}", out[0]);
}

#[test]
fn add_assign_and_softcap_match_reference() {
    let mut rng = Rng::new(5);
    for &n in &[1usize, 31, 50_000] {
        let base = rand_vec(&mut rng, n);
        let x = rand_vec(&mut rng, n);
        let (mut a, mut a_ref) = (base.clone(), base.clone());
        cpu::add_assign(&mut a, &x).unwrap();
        reference::add_assign(&mut a_ref, &x).unwrap();
        assert_eq!(a, a_ref);
        let mut s: Vec<f32> = base.iter().map(|v| v * 100.0).collect();
        let mut s_ref = s.clone();
        cpu::softcap_inplace(&mut s, 30.0);
        reference::softcap_inplace(&mut s_ref, 30.0);
        assert_close("softcap", &s, &s_ref, 1e-6, 1e-6);
        assert!(s.iter().all(|v| v.abs() <= 30.0));
    }
}

#[test]
fn embedding_matches_reference_and_names_bad_id() {
    let mut rng = Rng::new(6);
    let (vocab, dim) = (50, 24);
    let table = rand_vec(&mut rng, vocab * dim);
    let ids: Vec<u32> = (0..2000).map(|i| (i * 7 % vocab) as u32).collect();
    let (mut out, mut out_ref) = (vec![0.0; ids.len() * dim], vec![0.0; ids.len() * dim]);
    cpu::embedding(&ids, &table, dim, 2.5, &mut out).unwrap();
    reference::embedding(&ids, &table, dim, 2.5, &mut out_ref).unwrap();
    assert_eq!(out, out_ref);
    assert_eq!(
        out[dim..2 * dim],
        table[7 * dim..8 * dim]
            .iter()
            .map(|v| v * 2.5)
            .collect::<Vec<_>>()[..]
    );
    let err = cpu::embedding(&[1, 50], &table, dim, 1.0, &mut out[..2 * dim]).unwrap_err();
    assert_eq!(
        err,
        KernelError::TokenOutOfRange {
            id: 50,
            position: 1,
            vocab: 50
        }
    );
    assert!(err.to_string().contains("50"));
}

#[test]
fn rope_matches_reference_full_and_partial() {
    let mut rng = Rng::new(7);
    for &(tokens, heads, head_dim, rot) in &[
        (1, 1, 64, 64),
        (5, 3, 128, 128),
        (300, 4, 64, 32),
        (2, 2, 256, 256),
    ] {
        let inv_freq: Vec<f32> = (0..rot / 2)
            .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / rot as f32))
            .collect();
        let positions: Vec<usize> = (0..tokens).map(|t| 1000 + 3 * t).collect();
        let x = rand_vec(&mut rng, tokens * heads * head_dim);
        let (mut a, mut b) = (x.clone(), x.clone());
        cpu::rope_inplace(&mut a, &positions, heads, head_dim, &inv_freq, 1.1).unwrap();
        reference::rope_inplace(&mut b, &positions, heads, head_dim, &inv_freq, 1.1).unwrap();
        assert_close("rope", &a, &b, 1e-6, 1e-6);
        // Un-rotated tail is untouched.
        for row in 0..tokens * heads {
            let r = row * head_dim;
            assert_eq!(a[r + rot..r + head_dim], x[r + rot..r + head_dim]);
        }
    }
}

#[test]
fn rope_rotates_pairs_half_apart() {
    // head_dim 4, one frequency pair (0, 1) rotated... with inv_freq [1, 0]: pair (0,2) by pos, (1,3) by 0.
    let mut x = vec![1.0f32, 5.0, 0.0, 7.0];
    cpu::rope_inplace(&mut x, &[2], 1, 4, &[1.0, 0.0], 1.0).unwrap();
    let (c, s) = (2.0f32.cos(), 2.0f32.sin());
    assert_close("rope pair", &x, &[c, 5.0, s, 7.0], 1e-6, 1e-7);
}

#[test]
fn softmax_rows_matches_reference_and_handles_masked_rows() {
    let mut rng = Rng::new(8);
    for &(rows, dim) in &[(1, 1), (3, 17), (100, 1000)] {
        let x: Vec<f32> = rng.uniform_vec(rows * dim, -20.0, 20.0);
        let (mut a, mut b) = (x.clone(), x.clone());
        cpu::softmax_rows(&mut a, dim).unwrap();
        reference::softmax_rows(&mut b, dim).unwrap();
        assert_close("softmax", &a, &b, RTOL, 1e-7);
    }
    let mut masked = vec![f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
    cpu::softmax_rows(&mut masked, 2).unwrap();
    assert_eq!(masked, vec![0.0, 0.0, 1.0, 0.0]);
}

fn is_shape_err_naming(r: kvzip_kernels::Result<()>, name: &str) -> bool {
    matches!(r, Err(KernelError::Shape(m)) if m.contains(name))
}

#[test]
fn bad_shapes_are_errors_naming_the_argument() {
    let v = vec![0.0f32; 12];
    let mut o = vec![0.0f32; 12];
    for (r, name) in [
        (cpu::linear(&v[..5], &v, None, 2, 3, 4, &mut o[..8]), "`x`"),
        (
            cpu::linear(&v[..6], &v[..11], None, 2, 3, 4, &mut o[..8]),
            "`w`",
        ),
        (
            cpu::linear(&v[..6], &v, Some(&v[..3]), 2, 3, 4, &mut o[..8]),
            "`bias`",
        ),
        (cpu::linear(&v[..6], &v, None, 2, 3, 4, &mut o[..7]), "`y`"),
        (
            reference::linear(&v[..6], &v, None, 2, 3, 4, &mut o[..7]),
            "`y`",
        ),
        (
            cpu::matmul(&v, &v[..5], 4, 3, 2, false, 1.0, 0.0, &mut o[..8]),
            "`b`",
        ),
        (cpu::rms_norm(&v, &v[..5], 1e-6, 0.0, 4, &mut o), "`w`"),
        (cpu::rms_norm(&v, &v[..5], 1e-6, 0.0, 5, &mut o), "`x`"),
        (
            cpu::rms_norm(&v, &v[..4], 1e-6, 0.0, 4, &mut o[..8]),
            "`out`",
        ),
        (cpu::silu_mul(&v, &v[..3], &mut o), "`up`"),
        (cpu::gelu_tanh_mul(&v, &v, &mut o[..3]), "`out`"),
        (cpu::add_assign(&mut o, &v[..3]), "`x`"),
        (
            cpu::embedding(&[0], &v[..10], 4, 1.0, &mut o[..4]),
            "`table`",
        ),
        (cpu::embedding(&[0, 1], &v, 4, 1.0, &mut o[..4]), "`out`"),
        (cpu::rope_inplace(&mut o, &[0, 1], 1, 4, &[1.0], 1.0), "`x`"),
        (
            cpu::rope_inplace(&mut o, &[0, 1, 2], 1, 4, &[1.0; 3], 1.0),
            "`inv_freq`",
        ),
        (cpu::softmax_rows(&mut o, 5), "`x`"),
        (cpu::softmax_rows(&mut o, 0), "`dim`"),
    ] {
        assert!(
            is_shape_err_naming(r.clone(), name),
            "expected shape error naming {name}, got {r:?}"
        );
    }
    assert!(matches!(
        cpu::rms_norm(&v, &v[..4], f32::NAN, 0.0, 4, &mut o),
        Err(KernelError::InvalidArgument(_))
    ));
}
