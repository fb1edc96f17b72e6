//! Attention over key pieces in separate buffers (a shared context cache + a private suffix
//! per sequence) equals attention over the same keys in one segment; the fast path equals the
//! reference; bad piece layouts are errors.

mod common;

use common::assert_close;
use kvzip_kernels::pieces::{attention_pieces_reference, HostPiece, PiecesArgs};
use kvzip_kernels::sampling::Rng;
use kvzip_kernels::{cpu, reference, KvSegments};

struct Case {
    /// Per virtual head, the sizes of its pieces.
    splits: Vec<Vec<usize>>,
    q_len: usize,
    group: usize,
    head_dim: usize,
    window: Option<usize>,
    softcap: Option<f32>,
}

fn check(rng: &mut Rng, c: &Case) {
    let d = c.head_dim;
    let lens: Vec<usize> = c.splits.iter().map(|s| s.iter().sum()).collect();
    // Every piece in its own buffer.
    let bufs: Vec<Vec<(Vec<f32>, Vec<f32>)>> = c
        .splits
        .iter()
        .map(|s| {
            s.iter()
                .map(|&n| {
                    (
                        rng.uniform_vec(n * d, -1.0, 1.0),
                        rng.uniform_vec(n * d, -1.0, 1.0),
                    )
                })
                .collect()
        })
        .collect();
    let mut pieces = Vec::new();
    for (h, hb) in bufs.iter().enumerate() {
        let mut at = 0;
        for (k, v) in hb {
            pieces.push(HostPiece {
                head: h,
                k,
                v,
                key_start: at,
            });
            at += k.len() / d;
        }
    }
    // The same keys as one contiguous segment per head.
    let mut k_all = Vec::new();
    let mut v_all = Vec::new();
    let mut offsets = Vec::new();
    for hb in &bufs {
        offsets.push(k_all.len() / d);
        for (k, v) in hb {
            k_all.extend_from_slice(k);
            v_all.extend_from_slice(v);
        }
    }
    let seg = KvSegments {
        k: &k_all,
        v: &v_all,
        offsets: &offsets,
        lens: &lens,
        head_dim: d,
    };
    let n_q = lens.len() * c.group;
    let q = rng.uniform_vec(c.q_len * n_q * d, -3.0, 3.0);
    let scale = 1.0 / (d as f32).sqrt();
    let mut want = vec![0.0; q.len()];
    reference::attention(
        &q, &seg, c.q_len, c.group, d, scale, c.window, c.softcap, &mut want,
    )
    .unwrap();
    let args = PiecesArgs {
        q_len: c.q_len,
        group: c.group,
        head_dim: d,
        scale,
        window: c.window,
        softcap: c.softcap,
    };
    let what = format!(
        "splits {:?} q_len {} group {} window {:?} softcap {:?}",
        c.splits, c.q_len, c.group, c.window, c.softcap
    );
    let mut got = vec![f32::NAN; q.len()];
    attention_pieces_reference(&q, &pieces, &lens, &args, &mut got).unwrap();
    assert_close(&format!("{what} reference"), &got, &want, 1e-5, 1e-6);
    let mut fast = vec![f32::NAN; q.len()];
    cpu::attention_pieces(&q, &pieces, &lens, &args, &mut fast).unwrap();
    assert_close(&format!("{what} fast"), &fast, &want, 1e-4, 2e-5);
}

#[test]
fn pieces_equal_one_segment() {
    let mut rng = Rng::new(42);
    for (splits, q_len, group, window, softcap) in [
        (
            vec![vec![300, 7], vec![5, 1], vec![1000, 40]],
            1,
            4,
            None,
            None,
        ),
        (vec![vec![600, 30, 2], vec![64]], 5, 2, None, Some(20.0)),
        (vec![vec![40, 25]; 3], 25, 1, Some(16), None),
        (vec![vec![1300], vec![700, 700]], 16, 3, Some(300), None),
    ] {
        check(
            &mut rng,
            &Case {
                splits,
                q_len,
                group,
                head_dim: 32,
                window,
                softcap,
            },
        );
    }
}

#[test]
fn bad_piece_layouts_are_errors() {
    let d = 4;
    let k = vec![0.0f32; 3 * d];
    let args = PiecesArgs {
        q_len: 1,
        group: 1,
        head_dim: d,
        scale: 1.0,
        window: None,
        softcap: None,
    };
    let q = vec![0.0; d];
    let mut out = vec![0.0; d];
    let piece = |head, key_start| HostPiece {
        head,
        k: &k,
        v: &k,
        key_start,
    };
    // A gap between pieces.
    let err = cpu::attention_pieces(&q, &[piece(0, 0), piece(0, 4)], &[7], &args, &mut out);
    assert!(err.unwrap_err().to_string().contains("in order"));
    // Pieces shorter than the head's length.
    let err = cpu::attention_pieces(&q, &[piece(0, 0)], &[5], &args, &mut out);
    assert!(err.unwrap_err().to_string().contains("length"));
    // A head out of range.
    let err = cpu::attention_pieces(&q, &[piece(1, 0)], &[3], &args, &mut out);
    assert!(err.is_err());
}
