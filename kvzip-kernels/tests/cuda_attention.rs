//! CUDA attention (prefill and split-K decode) against the CPU attention on random bf16-rounded
//! inputs. Runs only on a machine with a GPU (`--features cuda`).
#![cfg(feature = "cuda")]

mod common;

use kvzip_kernels::cpu;
use kvzip_kernels::cuda::attention::{AttentionShape, DecodePlan};
use kvzip_kernels::cuda::{bf16, CudaBackend, CudaError};
use kvzip_kernels::sampling::Rng;
use kvzip_kernels::KvSegments;

/// Relative error bound ‖gpu − cpu‖ / ‖cpu‖ for bf16 operands and a bf16 output.
const TOL: f64 = 1e-2;
/// Rows left unused between head segments (filled with NaN on the GPU to catch stray reads).
const GAP_ROWS: usize = 3;

fn backend() -> CudaBackend {
    CudaBackend::new(0).unwrap_or_else(|e| panic!("cuda_attention tests need a CUDA GPU: {e}"))
}

/// How the GPU computes a case.
#[derive(Debug, Clone, Copy)]
enum Path {
    Prefill,
    /// Decode with this chunk size (`None`: automatic).
    Decode(Option<usize>),
    /// Decode with a plan staged for a step of three layers (`DecodePlan::staged_for_layers`:
    /// one copy into the backend's step buffer); the case is the middle layer, so its arrays
    /// sit at an offset.
    Staged(Option<usize>),
    /// `CudaBackend::attention`, which picks the kernel.
    Auto,
}

#[derive(Debug, Clone)]
struct Case {
    head_dim: usize,
    group: usize,
    q_len: usize,
    lens: Vec<usize>,
    window: Option<usize>,
    softcap: Option<f32>,
}

impl Case {
    fn new(head_dim: usize, group: usize, q_len: usize, lens: Vec<usize>) -> Self {
        Self {
            head_dim,
            group,
            q_len,
            lens,
            window: None,
            softcap: None,
        }
    }
}

fn bf16_vec(rng: &mut Rng, n: usize, amp: f32) -> Vec<f32> {
    rng.uniform_vec(n, -amp, amp)
        .into_iter()
        .map(|x| f32::from(bf16::from_f32(x)))
        .collect()
}

/// Runs `case` on the GPU along `path` and on the CPU; returns the relative error.
fn run_case(be: &CudaBackend, case: &Case, path: Path, seed: u64) -> f64 {
    let mut rng = Rng::new(seed);
    let (d, n_kv) = (case.head_dim, case.lens.len());
    let mut offsets = Vec::with_capacity(n_kv);
    let mut rows = GAP_ROWS;
    for &l in &case.lens {
        offsets.push(rows);
        rows += l + GAP_ROWS;
    }
    let k = bf16_vec(&mut rng, rows * d, 1.0);
    let v = bf16_vec(&mut rng, rows * d, 1.0);
    let q = bf16_vec(&mut rng, case.q_len * n_kv * case.group * d, 4.0);
    let scale = 1.0 / (d as f32).sqrt();
    let seg = KvSegments {
        k: &k,
        v: &v,
        offsets: &offsets,
        lens: &case.lens,
        head_dim: d,
    };
    let mut want = vec![0f32; q.len()];
    cpu::attention(
        &q,
        &seg,
        case.q_len,
        case.group,
        d,
        scale,
        case.window,
        case.softcap,
        &mut want,
    )
    .expect("cpu attention");

    // Unused rows hold NaN on the device: reading outside a segment poisons the output.
    let mut in_seg = vec![false; rows];
    for (&o, &l) in offsets.iter().zip(&case.lens) {
        in_seg[o..o + l].iter_mut().for_each(|x| *x = true);
    }
    let poison = |src: &[f32]| -> Vec<f32> {
        src.chunks(d)
            .zip(&in_seg)
            .flat_map(|(row, &ok)| row.iter().map(move |&x| if ok { x } else { f32::NAN }))
            .collect()
    };
    let dq = be.upload_bf16(&q).unwrap();
    let dk = be.upload_bf16(&poison(&k)).unwrap();
    let dv = be.upload_bf16(&poison(&v)).unwrap();
    let offsets_i64: Vec<i64> = offsets.iter().map(|&o| o as i64).collect();
    let lens_i32: Vec<i32> = case.lens.iter().map(|&l| l as i32).collect();
    let doff = be.upload(&offsets_i64).unwrap();
    let dlens = be.upload(&lens_i32).unwrap();
    let mut dout = be.upload_bf16(&vec![f32::NAN; q.len()]).unwrap();
    let shape = AttentionShape {
        q_len: case.q_len,
        n_kv_heads: n_kv,
        group: case.group,
        head_dim: d,
        scale,
        window: case.window,
        softcap: case.softcap,
    };
    match path {
        Path::Prefill => be.attention_prefill(&dq, &dk, &dv, &doff, &dlens, &shape, &mut dout),
        Path::Decode(chunk) => {
            let plan = DecodePlan::new(be, &case.lens, case.q_len, chunk).unwrap();
            be.attention_decode(&plan, &dq, &dk, &dv, &doff, &dlens, &shape, &mut dout)
        }
        Path::Staged(chunk) => {
            let other: Vec<usize> = case.lens.iter().map(|&l| l + 37).collect();
            let layers: [&[usize]; 3] = [&other, &case.lens, &other[..1]];
            let plans = DecodePlan::staged_for_layers(be, &layers, case.q_len, chunk).unwrap();
            be.attention_decode(&plans[1], &dq, &dk, &dv, &doff, &dlens, &shape, &mut dout)
        }
        Path::Auto => be.attention(&dq, &dk, &dv, &doff, &dlens, &case.lens, &shape, &mut dout),
    }
    .unwrap_or_else(|e| panic!("{path:?} {case:?}: {e}"));
    let got = be.download_f32(&dout).unwrap();
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        assert!(
            g.is_finite(),
            "{path:?} {case:?}: out[{i}] = {g} (unwritten or NaN)"
        );
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    let rel = (num / den.max(1e-30)).sqrt();
    println!(
        "{path:?} d={d} g={} q_len={} lens={:?} window={:?} softcap={:?}: rel {rel:.2e}",
        case.group,
        case.q_len,
        short(&case.lens),
        case.window,
        case.softcap
    );
    assert!(
        rel <= TOL,
        "{path:?} {case:?}: relative error {rel:.3e} > {TOL}"
    );
    rel
}

fn short(lens: &[usize]) -> String {
    if lens.len() <= 8 {
        format!("{lens:?}")
    } else {
        format!("{:?}.. ({} heads)", &lens[..8], lens.len())
    }
}

/// Ragged lengths for `q_len` new tokens: no extra key, one, odd sizes, a few tiles.
fn ragged(q_len: usize) -> Vec<usize> {
    [0, 1, 77, 300].iter().map(|e| q_len + e).collect()
}

#[test]
fn prefill_matches_cpu_across_head_dims_groups_and_lengths() {
    let be = backend();
    let mut seed = 1;
    for d in [64, 128, 256] {
        for group in [1, 4, 7] {
            for q_len in [1, 37, 130] {
                run_case(
                    &be,
                    &Case::new(d, group, q_len, ragged(q_len)),
                    Path::Prefill,
                    seed,
                );
                seed += 1;
            }
        }
    }
}

#[test]
fn prefill_long_query_over_existing_cache() {
    let be = backend();
    run_case(
        &be,
        &Case::new(128, 4, 1000, vec![1000, 1513, 3048]),
        Path::Prefill,
        100,
    );
    run_case(
        &be,
        &Case::new(64, 7, 700, vec![701, 700, 1999]),
        Path::Prefill,
        101,
    );
    run_case(
        &be,
        &Case::new(256, 2, 513, vec![513, 1100]),
        Path::Prefill,
        102,
    );
}

#[test]
fn prefill_sliding_window_and_softcap() {
    let be = backend();
    let mut seed = 200;
    for d in [64, 128, 256] {
        for window in [1, 5, 64, 300] {
            let mut c = Case::new(d, 4, 150, vec![150, 151, 700]);
            c.window = Some(window);
            run_case(&be, &c, Path::Prefill, seed);
            seed += 1;
        }
        for cap in [1.5f32, 30.0] {
            let mut c = Case::new(d, 3, 90, vec![90, 400]);
            c.softcap = Some(cap);
            run_case(&be, &c, Path::Prefill, seed);
            seed += 1;
        }
        let mut c = Case::new(d, 2, 200, vec![260, 1000]);
        c.window = Some(128);
        c.softcap = Some(20.0);
        run_case(&be, &c, Path::Prefill, seed);
        seed += 1;
    }
}

#[test]
fn decode_matches_cpu_across_head_dims_groups_and_q_lens() {
    let be = backend();
    let mut seed = 300;
    for d in [64, 128, 256] {
        for group in [1, 4, 7] {
            for q_len in [1, 3, 16] {
                let lens = vec![q_len, q_len + 1, 777, 5000, 64];
                for chunk in [None, Some(64), Some(100)] {
                    for path in [Path::Decode(chunk), Path::Staged(chunk)] {
                        run_case(&be, &Case::new(d, group, q_len, lens.clone()), path, seed);
                        seed += 1;
                    }
                }
            }
        }
    }
}

#[test]
fn decode_long_ragged_context() {
    let be = backend();
    let lens = vec![65536, 1, 30000, 12345, 64, 40000, 3, 65535];
    for (i, q_len) in [1usize, 3, 16].into_iter().enumerate() {
        let lens: Vec<usize> = lens.iter().map(|&l| l.max(q_len)).collect();
        run_case(
            &be,
            &Case::new(128, 4, q_len, lens.clone()),
            Path::Decode(None),
            400 + i as u64,
        );
    }
    run_case(
        &be,
        &Case::new(128, 4, 1, lens.clone()),
        Path::Decode(Some(4096)),
        410,
    );
}

#[test]
fn decode_sliding_window_and_softcap() {
    let be = backend();
    let mut seed = 500;
    for d in [64, 128, 256] {
        for window in [1, 7, 100, 4096] {
            let mut c = Case::new(d, 4, 3, vec![3, 5000, 129]);
            c.window = Some(window);
            run_case(&be, &c, Path::Decode(Some(256)), seed);
            seed += 1;
        }
        let mut c = Case::new(d, 7, 16, vec![16, 3000]);
        c.softcap = Some(1.5);
        run_case(&be, &c, Path::Decode(None), seed);
        c.window = Some(50);
        c.softcap = Some(30.0);
        run_case(&be, &c, Path::Decode(Some(64)), seed + 1);
        seed += 2;
    }
}

#[test]
fn auto_path_switches_between_decode_and_prefill() {
    let be = backend();
    run_case(&be, &Case::new(128, 4, 16, vec![16, 2000]), Path::Auto, 600);
    run_case(&be, &Case::new(128, 4, 17, vec![17, 2000]), Path::Auto, 601);
}

#[test]
fn decode_and_prefill_agree_on_the_same_inputs() {
    // Both GPU paths against the same CPU reference on one case with many chunks per head.
    let be = backend();
    let c = Case::new(128, 4, 8, vec![9000, 8, 4097]);
    run_case(&be, &c, Path::Prefill, 700);
    run_case(&be, &c, Path::Decode(Some(512)), 700);
}

#[test]
fn bad_shapes_and_plans_are_errors() {
    let be = backend();
    let z = be.upload_bf16(&[1.0; 96 * 8]).unwrap();
    let off = be.upload(&[0i64]).unwrap();
    let lens = be.upload(&[8i32]).unwrap();
    let mut out = be.upload_bf16(&[0.0; 96 * 8]).unwrap();
    let mut shape = AttentionShape {
        q_len: 1,
        n_kv_heads: 1,
        group: 1,
        head_dim: 96,
        scale: 0.1,
        window: None,
        softcap: None,
    };
    let e = be.attention_prefill(&z, &z, &z, &off, &lens, &shape, &mut out);
    assert!(
        matches!(e, Err(CudaError::Shape(ref m)) if m.contains("head_dim")),
        "{e:?}"
    );
    shape.head_dim = 64;
    shape.q_len = 100;
    let e = be.attention_prefill(&z, &z, &z, &off, &lens, &shape, &mut out);
    assert!(
        matches!(e, Err(CudaError::Shape(ref m)) if m.contains("q")),
        "{e:?}"
    );
    let e = DecodePlan::new(&be, &[8, 2], 3, None);
    assert!(
        matches!(e, Err(CudaError::Shape(ref m)) if m.contains("KV head 1")),
        "{e:?}"
    );
    // A staged plan expires when the next step's plans are staged.
    let stale = DecodePlan::staged_for_layers(&be, &[&[8]], 1, None).unwrap();
    let _next = DecodePlan::staged_for_layers(&be, &[&[9]], 1, None).unwrap();
    shape.q_len = 1;
    shape.n_kv_heads = 1;
    let e = be.attention_decode(&stale[0], &z, &z, &z, &off, &lens, &shape, &mut out);
    assert!(
        matches!(e, Err(CudaError::Shape(ref m)) if m.contains("staged")),
        "{e:?}"
    );
    let plan = DecodePlan::new(&be, &[8], 2, None).unwrap();
    shape.q_len = 1;
    let e = be.attention_decode(&plan, &z, &z, &z, &off, &lens, &shape, &mut out);
    assert!(
        matches!(e, Err(CudaError::Shape(ref m)) if m.contains("plan")),
        "{e:?}"
    );
}

/// Attention over pieces in separate device buffers (a shared context cache + a private suffix
/// per sequence, in one launch) against the host reference, on bf16-rounded inputs.
#[test]
fn pieces_match_cpu_across_head_dims() {
    use kvzip_kernels::pieces::{attention_pieces_reference, HostPiece, PiecesArgs};
    use kvzip_kernels::{AttentionShape, Device, KvPiece, KvPieces};
    let dev = Device::cuda(0).expect("a CUDA GPU");
    let mut rng = kvzip_kernels::sampling::Rng::new(77);
    let exact = |rng: &mut kvzip_kernels::sampling::Rng, n: usize, a: f32| -> Vec<f32> {
        rng.uniform_vec(n, -a, a)
            .into_iter()
            .map(|x| half::bf16::from_f32(x).to_f32())
            .collect()
    };
    for (d, group, q_len, splits, window) in [
        (
            64usize,
            4usize,
            1usize,
            vec![vec![3000usize, 9], vec![17, 1], vec![5000, 130]],
            None,
        ),
        (128, 7, 1, vec![vec![9000, 2]; 4], None),
        (256, 2, 3, vec![vec![700, 40], vec![33, 64]], Some(100usize)),
        (128, 4, 20, vec![vec![2048, 20], vec![100, 30]], None),
    ] {
        let lens: Vec<usize> = splits.iter().map(|s| s.iter().sum()).collect();
        let host: Vec<Vec<(Vec<f32>, Vec<f32>)>> = splits
            .iter()
            .map(|s| {
                s.iter()
                    .map(|&n| (exact(&mut rng, n * d, 1.0), exact(&mut rng, n * d, 1.0)))
                    .collect()
            })
            .collect();
        let dev_bufs: Vec<Vec<(kvzip_kernels::Tensor, kvzip_kernels::Tensor)>> = host
            .iter()
            .map(|hb| {
                hb.iter()
                    .map(|(k, v)| (dev.upload_f32(k).unwrap(), dev.upload_f32(v).unwrap()))
                    .collect()
            })
            .collect();
        let mut hp = Vec::new();
        let mut dp = Vec::new();
        for h in 0..lens.len() {
            let mut at = 0;
            for ((k, v), (kd, vd)) in host[h].iter().zip(&dev_bufs[h]) {
                hp.push(HostPiece {
                    head: h,
                    k,
                    v,
                    key_start: at,
                });
                dp.push(KvPiece {
                    head: h,
                    k: kd.view(),
                    v: vd.view(),
                    key_start: at,
                });
                at += k.len() / d;
            }
        }
        let n_q = lens.len() * group;
        let q = exact(&mut rng, q_len * n_q * d, 2.0);
        let scale = 1.0 / (d as f32).sqrt();
        let args = PiecesArgs {
            q_len,
            group,
            head_dim: d,
            scale,
            window,
            softcap: None,
        };
        let mut want = vec![0.0; q.len()];
        attention_pieces_reference(&q, &hp, &lens, &args, &mut want).unwrap();
        let shape = AttentionShape {
            q_len,
            n_kv_heads: lens.len(),
            group,
            head_dim: d,
            scale,
            window,
            softcap: None,
        };
        let qd = dev.upload_f32(&q).unwrap();
        // Every chunk size queued back to back with no synchronisation in between: each call's
        // plan is staged in the same backend buffer (grown on the way: chunk 64 has the most
        // items), so this checks that a call's kernels read their plan before the next call
        // overwrites it.
        let chunks = [None, Some(256), Some(64)];
        let mut outs = Vec::new();
        for chunk in chunks {
            let mut out = dev.alloc(kvzip_kernels::DType::Bf16, q.len()).unwrap();
            let kv = KvPieces {
                head_dim: d,
                lens: lens.clone(),
                pieces: dp
                    .iter()
                    .map(|p| KvPiece {
                        head: p.head,
                        k: p.k.clone(),
                        v: p.v.clone(),
                        key_start: p.key_start,
                    })
                    .collect(),
            };
            dev.attention_pieces(&qd.view(), &kv, &shape, chunk, &mut out.view_mut())
                .unwrap();
            outs.push(out);
        }
        for (chunk, out) in chunks.iter().zip(&outs) {
            let got = dev.to_host_f32(&out.view()).unwrap();
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            let scale_w = want
                .iter()
                .map(|x| x.abs())
                .fold(0.0f32, f32::max)
                .max(1e-3);
            assert!(
                err / scale_w < 2e-2,
                "d {d} group {group} q_len {q_len} chunk {chunk:?}: max err {err} vs {scale_w}"
            );
        }
    }
}
