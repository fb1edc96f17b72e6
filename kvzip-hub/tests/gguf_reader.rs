//! GGUF parsing on hand-built files: all value types, alignment, v2/v3, and corrupt input
//! (truncation at every offset, flipped bytes) that must give errors, never panics.

mod gguf_common;

use std::path::Path;

use gguf_common::{q8_0_blocks, GgufBuilder};
use kvzip_hub::gguf::{GgmlType, GgufError, GgufFile, GgufValue};

fn sample() -> GgufBuilder {
    let mut b = GgufBuilder::new();
    b.raw("u8", 0, vec![200])
        .raw("i8", 1, vec![0xFE])
        .raw("u16", 2, 513u16.to_le_bytes().to_vec())
        .raw("i16", 3, (-3i16).to_le_bytes().to_vec())
        .u32("u32", 70000)
        .raw("i32", 5, (-70000i32).to_le_bytes().to_vec())
        .f32("f32", 0.5)
        .bool("bool", true)
        .str("general.architecture", "llama")
        .raw("u64", 10, (1u64 << 40).to_le_bytes().to_vec())
        .raw("i64", 11, (-5i64).to_le_bytes().to_vec())
        .raw("f64", 12, 2.25f64.to_le_bytes().to_vec())
        .str_array("strings", &["a", "", "ü"])
        .i32_array("ints", &[1, -2, 3]);
    // array of arrays of u8: [[1, 2], []]
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend(2u64.to_le_bytes());
    nested.extend(0u32.to_le_bytes());
    nested.extend(2u64.to_le_bytes());
    nested.extend([1u8, 2]);
    nested.extend(0u32.to_le_bytes());
    nested.extend(0u64.to_le_bytes());
    b.raw("nested", 9, nested);
    b.tensor_f32("a.weight", &[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let q: Vec<f32> = (0..64).map(|i| (i as f32 - 32.0) * 0.25).collect();
    b.tensor("q.weight", &[32, 2], 8, q8_0_blocks(&q, 0.25));
    b.tensor(
        "h.weight",
        &[2],
        1,
        [half::f16::from_f32(-1.5), half::f16::from_f32(8.0)]
            .iter()
            .flat_map(|h| h.to_le_bytes())
            .collect(),
    );
    b
}

fn parse(bytes: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(Path::new("test.gguf"), bytes)
}

#[test]
fn reads_all_value_types_and_tensors() {
    let f = parse(sample().build()).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get("u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.get("i8"), Some(&GgufValue::I8(-2)));
    assert_eq!(f.get("u16"), Some(&GgufValue::U16(513)));
    assert_eq!(f.get("i16"), Some(&GgufValue::I16(-3)));
    assert_eq!(f.require_u64("u32").unwrap(), 70000);
    assert_eq!(f.get("i32"), Some(&GgufValue::I32(-70000)));
    assert_eq!(f.opt_f64("f32").unwrap(), Some(0.5));
    assert_eq!(f.opt_bool("bool").unwrap(), Some(true));
    assert_eq!(f.require_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.require_u64("u64").unwrap(), 1 << 40);
    assert_eq!(f.get("i64"), Some(&GgufValue::I64(-5)));
    assert_eq!(f.opt_f64("f64").unwrap(), Some(2.25));
    assert_eq!(
        f.opt_str_array("strings").unwrap().unwrap(),
        vec!["a", "", "ü"]
    );
    assert_eq!(f.opt_i64_array("ints").unwrap().unwrap(), vec![1, -2, 3]);
    let nested = f.get("nested").unwrap().as_array().unwrap();
    assert_eq!(
        nested[0],
        GgufValue::Array(vec![GgufValue::U8(1), GgufValue::U8(2)])
    );
    assert_eq!(nested[1], GgufValue::Array(vec![]));
    // type errors name the key
    let err = f.require_str("u32").unwrap_err().to_string();
    assert!(err.contains("\"u32\"") && err.contains("string"), "{err}");

    let a = f.tensor("a.weight").unwrap();
    assert_eq!(a.hf_shape(), vec![2, 3]);
    assert_eq!(
        f.dequantize_tensor(a).unwrap(),
        vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    );
    let q = f.tensor("q.weight").unwrap();
    assert_eq!(q.ggml_type, GgmlType::Q8_0);
    let qv = f.dequantize_tensor(q).unwrap();
    assert_eq!(qv[0], -8.0);
    assert_eq!(qv[63], 7.75);
    assert_eq!(
        f.dequantize_tensor(f.tensor("h.weight").unwrap()).unwrap(),
        vec![-1.5, 8.0]
    );
    assert_eq!(f.data_offset % 32, 0);
}

#[test]
fn honours_general_alignment_and_version_2() {
    let mut b = sample();
    b.alignment = 64;
    b.version = 2;
    b.u32("general.alignment", 64);
    let f = parse(b.build()).unwrap();
    assert_eq!((f.version, f.alignment), (2, 64));
    assert_eq!(f.data_offset % 64, 0);
    let q = f.tensor("q.weight").unwrap();
    assert_eq!(q.offset % 64, 0);
    assert_eq!(f.dequantize_tensor(q).unwrap()[1], -7.75);
}

fn msg(r: Result<GgufFile, GgufError>) -> String {
    r.expect_err("must fail").to_string()
}

#[test]
fn specific_corruptions_give_specific_errors() {
    let good = sample().build();
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(msg(parse(bad)).contains("not a GGUF file"));
    let mut bad = good.clone();
    bad[4] = 9;
    assert!(msg(parse(bad)).contains("unsupported GGUF version 9"));
    // unknown value type id
    let mut b = GgufBuilder::new();
    b.raw("weird", 13, vec![0; 8]);
    let m = msg(parse(b.build()));
    assert!(
        m.contains("unknown value type id 13") && m.contains("weird") && m.contains("test.gguf"),
        "{m}"
    );
    // unknown tensor type id
    let mut b = GgufBuilder::new();
    b.tensor("t", &[4], 99, vec![0; 16]);
    let m = msg(parse(b.build()));
    assert!(
        m.contains("unknown ggml type id 99") && m.contains("\"t\""),
        "{m}"
    );
    // tensor data beyond the end of the file
    let mut bytes = sample().build();
    bytes.truncate(bytes.len() - 3);
    let m = msg(parse(bytes));
    assert!(
        m.contains("beyond the end of the file") && m.contains("h.weight"),
        "{m}"
    );
    // truncated header
    let m = msg(parse(good[..20].to_vec()));
    assert!(
        m.contains("truncated") && m.contains("metadata count"),
        "{m}"
    );
    // a huge array count is refused before allocating
    let mut b = GgufBuilder::new();
    let mut p = 0u32.to_le_bytes().to_vec();
    p.extend(u64::MAX.to_le_bytes());
    b.raw("big", 9, p);
    assert!(msg(parse(b.build())).contains("truncated"));
    // Q2_K is known but not supported for dequantization
    let mut b = GgufBuilder::new();
    b.tensor("k2", &[256], 10, vec![0; 84]);
    let f = parse(b.build()).unwrap();
    let m = f
        .dequantize_tensor(f.tensor("k2").unwrap())
        .unwrap_err()
        .to_string();
    assert!(m.contains("Q2_K") && m.contains("not supported"), "{m}");
    // empty file, nonexistent file
    assert!(msg(parse(Vec::new())).contains("truncated"));
    let m = GgufFile::open(Path::new("/nonexistent/x.gguf"))
        .unwrap_err()
        .to_string();
    assert!(m.contains("/nonexistent/x.gguf"), "{m}");
}

#[test]
fn every_truncation_is_an_error() {
    let good = sample().build();
    for len in 0..good.len() {
        assert!(
            parse(good[..len].to_vec()).is_err(),
            "truncated to {len} bytes parsed"
        );
    }
}

#[test]
fn flipped_bytes_never_panic() {
    let good = sample().build();
    let mut failures = 0;
    for pos in 0..good.len() {
        for mask in [0xFFu8, 0x01, 0x80] {
            let mut bytes = good.clone();
            bytes[pos] ^= mask;
            match parse(bytes) {
                Err(_) => failures += 1,
                Ok(f) => {
                    // whatever parsed must be readable without panics
                    for t in &f.tensors {
                        let _ = f.dequantize_tensor(t);
                    }
                }
            }
        }
    }
    assert!(
        failures > good.len() / 4,
        "only {failures} corruptions detected"
    );
}
