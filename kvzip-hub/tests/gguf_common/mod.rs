//! A minimal GGUF writer for tests: metadata of any type, tensors with raw data, any alignment.
#![allow(dead_code)]

/// A metadata value with its GGUF type id, pre-encoded.
pub struct Meta {
    key: String,
    type_id: u32,
    payload: Vec<u8>,
}

fn gguf_str(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// Builds a GGUF image in memory.
pub struct GgufBuilder {
    pub version: u32,
    pub alignment: u64,
    meta: Vec<Meta>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

impl GgufBuilder {
    pub fn new() -> Self {
        GgufBuilder {
            version: 3,
            alignment: 32,
            meta: Vec::new(),
            tensors: Vec::new(),
        }
    }
    pub fn raw(&mut self, key: &str, type_id: u32, payload: Vec<u8>) -> &mut Self {
        self.meta.push(Meta {
            key: key.into(),
            type_id,
            payload,
        });
        self
    }
    pub fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.raw(key, 4, v.to_le_bytes().to_vec())
    }
    pub fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.raw(key, 6, v.to_le_bytes().to_vec())
    }
    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.raw(key, 7, vec![v as u8])
    }
    pub fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.raw(key, 8, gguf_str(v))
    }
    pub fn str_array(&mut self, key: &str, items: &[&str]) -> &mut Self {
        let mut p = 8u32.to_le_bytes().to_vec();
        p.extend((items.len() as u64).to_le_bytes());
        for s in items {
            p.extend(gguf_str(s));
        }
        self.raw(key, 9, p)
    }
    pub fn i32_array(&mut self, key: &str, items: &[i32]) -> &mut Self {
        let mut p = 5u32.to_le_bytes().to_vec();
        p.extend((items.len() as u64).to_le_bytes());
        for v in items {
            p.extend(v.to_le_bytes());
        }
        self.raw(key, 9, p)
    }
    /// Adds a tensor; `dims` in ggml order (innermost first), `data` already encoded.
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.into(), dims.to_vec(), type_id, data));
        self
    }
    pub fn tensor_f32(&mut self, name: &str, dims: &[u64], values: &[f32]) -> &mut Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, dims, 0, data)
    }
    pub fn build(&self) -> Vec<u8> {
        let align = |x: usize| x.div_ceil(self.alignment as usize) * self.alignment as usize;
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.meta.len() as u64).to_le_bytes());
        for m in &self.meta {
            out.extend(gguf_str(&m.key));
            out.extend(m.type_id.to_le_bytes());
            out.extend(&m.payload);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            out.extend(gguf_str(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = align(offset + data.len());
        }
        out.resize(align(out.len()), 0);
        let base = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(base + off, 0);
            out.extend(data);
        }
        out
    }
}

/// Encodes f32 values as one Q8_0 block per 32 values with scale `d` (values must be multiples of d).
pub fn q8_0_blocks(values: &[f32], d: f32) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in values.chunks(32) {
        out.extend(half::f16::from_f32(d).to_bits().to_le_bytes());
        for v in chunk {
            out.push(((v / d).round() as i8) as u8);
        }
    }
    out
}
