//! Helpers shared by the integration tests.
#![allow(dead_code)]

use kvzip_kernels::sampling::Rng;

/// Random values uniform in [-1, 1).
pub fn rand_vec(rng: &mut Rng, n: usize) -> Vec<f32> {
    rng.uniform_vec(n, -1.0, 1.0)
}

/// Asserts `|got - want| <= atol + rtol * |want|` element-wise, naming the first failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * w.abs();
        assert!(
            (g - w).abs() <= tol || (g.is_nan() && w.is_nan()),
            "{what}: index {i}: got {g}, want {w} (tol {tol})"
        );
    }
}
