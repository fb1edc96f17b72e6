//! Decode plans (FlashInfer's plan/run split): the work items of a split-K decode step, built on
//! the host from the key counts and uploaded for the run kernel, plus the backend's persistent
//! decode scratch: the partial outputs of split heads and a staging buffer that per-layer plans
//! over pieces are copied into, so a batched decode step allocates nothing on the device.

use cudarc::driver::CudaSlice;

use super::attention::to_i32;
use super::params::KvzDecodeSegment;
use super::{CudaBackend, CudaError, CudaResult};

/// Keys per shared-memory tile of the decode kernels (items are cut at multiples of it).
pub(super) const DECODE_TILE_KEYS: usize = 64;

/// Bounds of the automatic decode chunk (keys per work item).
const AUTO_CHUNK_RANGE: (usize, usize) = (512, 4096);

/// Automatic keys per decode work item: the power of two nearest to `total_keys / n_sms`
/// (about one item per SM), clamped to [`AUTO_CHUNK_RANGE`]. Measured on the H200 (bench/gpu,
/// chunk sweep at Llama-3.1-8B and Qwen2.5-7B shapes, 32K/128K, full and ragged caches): each
/// work item pays a partial write and a combine read, so fewer, longer items win until the grid
/// no longer covers the SMs; this rule picked the best or near-best size in every case.
fn auto_chunk(total_keys: usize, n_sms: usize) -> usize {
    let per_sm = (total_keys / n_sms.max(1)).max(1) as f64;
    let nearest = 2f64.powf(per_sm.log2().round()) as usize;
    nearest.clamp(AUTO_CHUNK_RANGE.0, AUTO_CHUNK_RANGE.1)
}

/// Work decomposition of a varlen decode step (FlashInfer-style plan): the keys of every KV
/// head are cut into chunks of a uniform size; each (head, chunk) is one work item, uploaded
/// once and reusable by every layer with the same lengths (the partial buffers live in the
/// backend's decode scratch, shared by every plan). Heads cut into several chunks get
/// consecutive partial slots that the combine kernel merges; single-chunk heads write `out`
/// directly.
#[derive(Debug)]
pub struct DecodePlan {
    pub(super) lens: Vec<usize>,
    pub(super) q_len: usize,
    chunk_keys: usize,
    pub(super) n_items: usize,
    pub(super) n_partials: usize,
    /// `[n_items, 4]` i32: head, key_start, key_end, partial slot (-1: direct)
    /// (= KvzDecodeWorkItem), and `[n_kv_heads + 1]` i32 head_partials: the slots of head h are
    /// `head_partials[h] .. head_partials[h + 1]`.
    pub(super) buffers: PlanBuffers,
    /// Plans over pieces: one segment per item, and the virtual heads' lengths on the device.
    pub(super) segments: Option<CudaSlice<KvzDecodeSegment>>,
    pub(super) lens_dev: Option<CudaSlice<i32>>,
}

/// One piece of a virtual head's keys for [`DecodePlan::for_pieces`]: `n_keys` rows of
/// `[n_keys, head_dim]` bf16 K and V at device addresses `k` / `v`, holding key indices
/// `key_start .. key_start + n_keys` of virtual head `head`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPiece {
    /// Virtual head (e.g. `sequence * n_kv_heads + kv_head`).
    pub head: usize,
    /// Device address of the piece's first K row.
    pub k: u64,
    /// Device address of the piece's first V row.
    pub v: u64,
    /// Key index of the first row within the head's sequence of keys.
    pub key_start: usize,
    /// Rows of the piece.
    pub n_keys: usize,
}

/// Checks decode lengths (`q_len >= 1`, every head at least `q_len` keys, lengths within
/// i32) and picks the keys per work item: `chunk_keys`, or the automatic size for the total.
fn plan_chunk(
    backend: &CudaBackend,
    lens: &[usize],
    q_len: usize,
    chunk_keys: Option<usize>,
    what: &str,
) -> CudaResult<usize> {
    if q_len == 0 {
        return Err(CudaError::Shape("DecodePlan: q_len must be >= 1".into()));
    }
    if let Some((h, &l)) = lens.iter().enumerate().find(|(_, &l)| l < q_len) {
        return Err(CudaError::Shape(format!(
            "DecodePlan: {what} {h} has {l} keys, fewer than q_len {q_len} (the new tokens' \
             keys must be appended first)"
        )));
    }
    to_i32("max head length", lens.iter().copied().max().unwrap_or(0))?;
    match chunk_keys {
        Some(0) => Err(CudaError::Shape(
            "DecodePlan: chunk_keys must be > 0".into(),
        )),
        Some(c) => Ok(c),
        None => Ok(auto_chunk(lens.iter().sum(), backend.n_sms).next_multiple_of(DECODE_TILE_KEYS)),
    }
}

impl DecodePlan {
    /// Plans a decode of `q_len >= 1` tokens over heads of lengths `lens` (host copy of the
    /// device lengths, keys per KV head, each `>= q_len`). `chunk_keys`: keys per work item;
    /// `None` picks the power of two nearest to `total_keys / n_sms`, within 512..=4096 (see
    /// `auto_chunk`).
    pub fn new(
        backend: &CudaBackend,
        lens: &[usize],
        q_len: usize,
        chunk_keys: Option<usize>,
    ) -> CudaResult<Self> {
        let host = HeadItems::build(backend, lens, q_len, chunk_keys)?;
        Ok(Self {
            lens: lens.to_vec(),
            q_len,
            chunk_keys: host.chunk_keys,
            n_items: host.n_items,
            n_partials: host.n_partials,
            buffers: PlanBuffers::Owned {
                items: backend.upload(&host.items)?,
                head_partials: backend.upload(&host.head_partials)?,
            },
            segments: None,
            lens_dev: None,
        })
    }

    /// Plans of one decode step for every layer (`lens[l]`: layer `l`'s keys per KV head), as
    /// [`DecodePlan::new`] would build them, but written with one copy into the backend's
    /// persistent step buffer instead of two allocations and uploads per layer. The plans are
    /// valid until the next call on the same backend (a launch with an older plan is an error).
    pub fn staged_for_layers(
        backend: &CudaBackend,
        lens: &[&[usize]],
        q_len: usize,
        chunk_keys: Option<usize>,
    ) -> CudaResult<Vec<Self>> {
        let hosts = lens
            .iter()
            .map(|l| HeadItems::build(backend, l, q_len, chunk_keys))
            .collect::<CudaResult<Vec<_>>>()?;
        let mut bytes = Vec::new();
        let at: Vec<(usize, usize)> = hosts
            .iter()
            .map(|h| {
                let items = push_i32s(&mut bytes, &h.items);
                (items, push_i32s(&mut bytes, &h.head_partials))
            })
            .collect();
        let (base, generation) = backend.stage_step_bytes(&bytes)?;
        Ok(hosts
            .into_iter()
            .zip(at)
            .zip(lens)
            .map(|((h, (items, head_partials)), l)| Self {
                lens: l.to_vec(),
                q_len,
                chunk_keys: h.chunk_keys,
                n_items: h.n_items,
                n_partials: h.n_partials,
                buffers: PlanBuffers::Staged {
                    items: base + items as u64,
                    head_partials: base + head_partials as u64,
                    generation,
                },
                segments: None,
                lens_dev: None,
            })
            .collect())
    }

    /// Device addresses of the work items and head partial offsets (an error for a staged plan
    /// whose step buffer has since been rewritten).
    pub(super) fn item_ptrs(&self, backend: &CudaBackend) -> CudaResult<(u64, u64)> {
        match &self.buffers {
            PlanBuffers::Owned {
                items,
                head_partials,
            } => {
                let s = backend.stream();
                Ok((super::dptr(items, s), super::dptr(head_partials, s)))
            }
            PlanBuffers::Staged {
                items,
                head_partials,
                generation,
            } => {
                if backend.step_generation() != *generation {
                    return Err(CudaError::Shape(
                        "a staged decode plan was used after the next step's plans replaced it"
                            .into(),
                    ));
                }
                Ok((*items, *head_partials))
            }
        }
    }

    /// Plans a decode of `q_len >= 1` tokens per virtual head over keys in pieces of any
    /// buffers. `lens[h]` is virtual head `h`'s total key count (each `>= q_len`); its pieces
    /// (sorted by head, then key) must tile `0..lens[h]` exactly. Pieces are cut into items of
    /// at most `chunk_keys` keys (default as in [`DecodePlan::new`]), never across pieces.
    pub fn for_pieces(
        backend: &CudaBackend,
        pieces: &[KeyPiece],
        lens: &[usize],
        q_len: usize,
        chunk_keys: Option<usize>,
    ) -> CudaResult<Self> {
        let host = PiecesLayout::build(backend, pieces, lens, q_len, chunk_keys)?;
        Ok(Self {
            lens: lens.to_vec(),
            q_len,
            chunk_keys: host.chunk_keys,
            n_items: host.n_items,
            n_partials: host.n_partials,
            buffers: PlanBuffers::Owned {
                items: backend.upload(&host.items)?,
                head_partials: backend.upload(&host.head_partials)?,
            },
            segments: Some(backend.upload(&host.segments)?),
            lens_dev: Some(backend.upload(&host.lens)?),
        })
    }

    /// Tokens per decode call this plan was built for.
    pub fn q_len(&self) -> usize {
        self.q_len
    }

    /// Keys per work item.
    pub fn chunk_keys(&self) -> usize {
        self.chunk_keys
    }

    /// Number of work items (CTAs per row block of the run kernel).
    pub fn n_items(&self) -> usize {
        self.n_items
    }

    /// Number of partial slots (items of heads that were split).
    pub fn n_partials(&self) -> usize {
        self.n_partials
    }

    /// Host copy of the key counts per KV head the plan was built for.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
}

/// Where a plan's work items live.
#[derive(Debug)]
pub(super) enum PlanBuffers {
    /// Uploaded into buffers of the plan's own.
    Owned {
        items: CudaSlice<i32>,
        head_partials: CudaSlice<i32>,
    },
    /// In the backend's step buffer ([`DecodePlan::staged_for_layers`]), valid while its
    /// generation is the backend's current one.
    Staged {
        items: u64,
        head_partials: u64,
        generation: u64,
    },
}

/// Host side of a plan over contiguous per-head keys: every head cut into chunks of
/// `chunk_keys` keys.
struct HeadItems {
    chunk_keys: usize,
    n_items: usize,
    n_partials: usize,
    /// `[max(n_items, 1), 4]` i32 (a dummy item when empty).
    items: Vec<i32>,
    head_partials: Vec<i32>,
}

impl HeadItems {
    fn build(
        backend: &CudaBackend,
        lens: &[usize],
        q_len: usize,
        chunk_keys: Option<usize>,
    ) -> CudaResult<Self> {
        let chunk = plan_chunk(backend, lens, q_len, chunk_keys, "KV head")?;
        let mut items: Vec<i32> = Vec::new();
        let mut head_partials = Vec::with_capacity(lens.len() + 1);
        let mut n_partials = 0usize;
        for (h, &len) in lens.iter().enumerate() {
            head_partials.push(n_partials as i32);
            let n_chunks = len.div_ceil(chunk).max(1);
            for c in 0..n_chunks {
                let slot = if n_chunks == 1 {
                    -1
                } else {
                    (n_partials + c) as i32
                };
                let end = ((c + 1) * chunk).min(len);
                items.extend_from_slice(&[h as i32, (c * chunk) as i32, end as i32, slot]);
            }
            if n_chunks > 1 {
                n_partials += n_chunks;
            }
        }
        head_partials.push(n_partials as i32);
        let n_items = items.len() / 4;
        if n_items > i32::MAX as usize || n_partials > i32::MAX as usize {
            return Err(CudaError::Shape(format!(
                "DecodePlan: {n_items} work items exceed i32; use a larger chunk_keys"
            )));
        }
        // cudarc rejects empty uploads; keep one dummy entry.
        if items.is_empty() {
            items.extend_from_slice(&[0, 0, 0, -1]);
        }
        Ok(Self {
            chunk_keys: chunk,
            n_items,
            n_partials,
            items,
            head_partials,
        })
    }
}

/// Host side of a plan over pieces: what [`DecodePlan::for_pieces`] uploads into its own
/// buffers and [`CudaBackend::attention_pieces_staged`] copies into the backend's staging buffer.
pub(super) struct PiecesLayout {
    pub(super) chunk_keys: usize,
    pub(super) n_items: usize,
    pub(super) n_partials: usize,
    /// `[max(n_items, 1), 4]` i32 (a dummy item when empty: uploads of nothing are rejected).
    pub(super) items: Vec<i32>,
    /// `[n_heads + 1]` i32.
    pub(super) head_partials: Vec<i32>,
    /// One per item.
    pub(super) segments: Vec<KvzDecodeSegment>,
    /// `[max(n_heads, 1)]` i32: the virtual heads' lengths.
    pub(super) lens: Vec<i32>,
}

/// Byte offsets of a [`PiecesLayout`] packed into one staging buffer.
pub(super) struct PackedOffsets {
    pub(super) segments: usize,
    pub(super) items: usize,
    pub(super) head_partials: usize,
    pub(super) lens: usize,
}

impl PiecesLayout {
    /// Checks the pieces (they must tile every head's keys in order) and cuts them into items
    /// of at most `chunk_keys` keys (default as in [`DecodePlan::new`]), never across pieces.
    pub(super) fn build(
        backend: &CudaBackend,
        pieces: &[KeyPiece],
        lens: &[usize],
        q_len: usize,
        chunk_keys: Option<usize>,
    ) -> CudaResult<Self> {
        let chunk = plan_chunk(backend, lens, q_len, chunk_keys, "virtual head")?;
        // Pieces must tile every head's keys in order.
        let mut next = vec![0usize; lens.len()];
        let mut last_head = 0;
        for (i, p) in pieces.iter().enumerate() {
            if p.head >= lens.len() || p.head < last_head || p.key_start != next[p.head] {
                return Err(CudaError::Shape(format!(
                    "DecodePlan: piece {i} (head {}, keys {}..{}) does not continue its head's \
                     keys in order",
                    p.head,
                    p.key_start,
                    p.key_start + p.n_keys
                )));
            }
            next[p.head] += p.n_keys;
            last_head = p.head;
        }
        if let Some(h) = (0..lens.len()).find(|&h| next[h] != lens[h]) {
            return Err(CudaError::Shape(format!(
                "DecodePlan: the pieces of virtual head {h} hold {} keys, its length is {}",
                next[h], lens[h]
            )));
        }
        let mut items: Vec<i32> = Vec::new();
        let mut segments: Vec<KvzDecodeSegment> = Vec::new();
        let mut item_heads: Vec<usize> = Vec::new();
        for p in pieces {
            let mut k0 = p.key_start;
            let end = p.key_start + p.n_keys;
            while k0 < end {
                let k1 = (k0 + chunk).min(end);
                items.extend_from_slice(&[p.head as i32, k0 as i32, k1 as i32, -1]);
                segments.push(KvzDecodeSegment {
                    k: p.k as _,
                    v: p.v as _,
                    key_base: p.key_start as i64,
                });
                item_heads.push(p.head);
                k0 = k1;
            }
        }
        // Partial slots for heads with several items; direct writes otherwise.
        let mut head_partials = Vec::with_capacity(lens.len() + 1);
        let mut n_partials = 0usize;
        let mut first = 0usize;
        for h in 0..lens.len() {
            head_partials.push(n_partials as i32);
            let mut last = first;
            while last < item_heads.len() && item_heads[last] == h {
                last += 1;
            }
            if last - first > 1 {
                for (slot, it) in (first..last).enumerate() {
                    items[it * 4 + 3] = (n_partials + slot) as i32;
                }
                n_partials += last - first;
            }
            first = last;
        }
        head_partials.push(n_partials as i32);
        let n_items = items.len() / 4;
        if n_items > i32::MAX as usize {
            return Err(CudaError::Shape(format!(
                "DecodePlan: {n_items} work items exceed i32; use a larger chunk_keys"
            )));
        }
        if items.is_empty() {
            items.extend_from_slice(&[0, 0, 0, -1]);
            segments.push(KvzDecodeSegment {
                k: std::ptr::null(),
                v: std::ptr::null(),
                key_base: 0,
            });
        }
        Ok(Self {
            chunk_keys: chunk,
            n_items,
            n_partials,
            items,
            head_partials,
            segments,
            lens: if lens.is_empty() {
                vec![0]
            } else {
                lens.iter().map(|&l| l as i32).collect()
            },
        })
    }

    /// The four arrays in one byte buffer (each at a 16-byte aligned offset), as the run
    /// kernel reads them, and where each starts.
    pub(super) fn pack(&self) -> (Vec<u8>, PackedOffsets) {
        let mut bytes = Vec::with_capacity(
            self.segments.len() * 24 + (self.items.len() + self.head_partials.len()) * 4 + 64,
        );
        for s in &self.segments {
            // KvzDecodeSegment: k, v (device addresses), key_base (i64); 24 bytes, no padding.
            bytes.extend_from_slice(&(s.k as u64).to_ne_bytes());
            bytes.extend_from_slice(&(s.v as u64).to_ne_bytes());
            bytes.extend_from_slice(&s.key_base.to_ne_bytes());
        }
        let items = push_i32s(&mut bytes, &self.items);
        let head_partials = push_i32s(&mut bytes, &self.head_partials);
        let lens = push_i32s(&mut bytes, &self.lens);
        (
            bytes,
            PackedOffsets {
                segments: 0,
                items,
                head_partials,
                lens,
            },
        )
    }
}

/// Appends `values` to `bytes` at the next 16-byte aligned offset, which it returns.
fn push_i32s(bytes: &mut Vec<u8>, values: &[i32]) -> usize {
    bytes.resize(bytes.len().next_multiple_of(16), 0);
    let at = bytes.len();
    values
        .iter()
        .for_each(|x| bytes.extend_from_slice(&x.to_ne_bytes()));
    at
}

// The packing above writes the segment struct field by field.
const _: () = assert!(std::mem::size_of::<KvzDecodeSegment>() == 24);

/// Persistent device buffers of the decode path, one set per backend (every op runs on the
/// backend's single stream, so one decode's use ends before the next one's begins): the
/// partial outputs / LSEs of split heads, and the staging buffer of per-call plans over pieces.
/// Both only grow; a decode step in steady state allocates nothing.
#[derive(Default)]
pub(crate) struct DecodeScratch {
    partials: Option<(CudaSlice<f32>, CudaSlice<f32>)>,
    staging: Option<CudaSlice<u8>>,
    /// The per-layer plans of the current decode step, and how many steps were staged.
    step: Option<CudaSlice<u8>>,
    step_generation: u64,
}

impl CudaBackend {
    /// Device addresses of partial outputs `[n_partials * rows, head_dim]` f32 and LSEs
    /// `[n_partials * rows]` f32 in the backend's scratch (grown when a call needs more);
    /// zeros when no head is split.
    pub(super) fn partial_workspace(
        &self,
        n_partials: usize,
        rows: usize,
        head_dim: usize,
    ) -> CudaResult<(u64, u64)> {
        if n_partials == 0 {
            return Ok((0, 0));
        }
        let need = n_partials * rows;
        let mut scratch = self
            .decode_scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let fits = scratch
            .partials
            .as_ref()
            .is_some_and(|(o, l)| o.len() >= need * head_dim && l.len() >= need);
        if !fits {
            // Grow geometrically: decode steps of a batch differ a little in size.
            let cap = need.next_power_of_two();
            scratch.partials = Some((self.alloc::<f32>(cap * head_dim)?, self.alloc::<f32>(cap)?));
        }
        let s = self.stream();
        match scratch.partials.as_mut() {
            Some((o, l)) => Ok((super::dptr_mut(o, s), super::dptr_mut(l, s))),
            None => Err(CudaError::Shape("decode scratch missing".into())),
        }
    }

    /// Copies one decode step's per-layer plans into the backend's step buffer (grown when too
    /// small; queued on the stream after the previous step's kernels) and returns its device
    /// address and the new generation, which invalidates the plans of earlier steps.
    pub(super) fn stage_step_bytes(&self, bytes: &[u8]) -> CudaResult<(u64, u64)> {
        let mut scratch = self
            .decode_scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let base = self.copy_into_growing(&mut scratch.step, bytes)?;
        scratch.step_generation += 1;
        Ok((base, scratch.step_generation))
    }

    /// Copies `bytes` to the start of `buf`, first replacing it with a larger one (a power of
    /// two, at least 4 KiB) when it is missing or too small; returns its device address.
    fn copy_into_growing(&self, buf: &mut Option<CudaSlice<u8>>, bytes: &[u8]) -> CudaResult<u64> {
        if buf.as_ref().is_none_or(|b| b.len() < bytes.len()) {
            *buf = Some(self.alloc::<u8>(bytes.len().next_power_of_two().max(4096))?);
        }
        let s = self.stream();
        match buf.as_mut() {
            Some(b) => {
                if !bytes.is_empty() {
                    s.memcpy_htod(bytes, &mut b.slice_mut(..bytes.len()))?;
                }
                Ok(super::dptr_mut(b, s))
            }
            None => Err(CudaError::Shape("decode staging buffer missing".into())),
        }
    }

    /// Generation of the step buffer's current contents (see [`Self::stage_step_bytes`]).
    pub(super) fn step_generation(&self) -> u64 {
        self.decode_scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .step_generation
    }

    /// Copies `bytes` into the backend's staging buffer (grown when too small) and returns its
    /// device address. Queued on the stream, so the kernels of an earlier call have read the
    /// previous contents before they are overwritten.
    pub(super) fn stage_bytes(&self, bytes: &[u8]) -> CudaResult<u64> {
        let mut scratch = self
            .decode_scratch
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.copy_into_growing(&mut scratch.staging, bytes)
    }
}
