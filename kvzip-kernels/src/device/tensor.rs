//! Flat device buffers and borrowed views of them.
//!
//! A [`Tensor`] is a one-dimensional buffer of one element type ([`DType`]) on one device: host
//! memory (`Vec`) or CUDA memory (a cudarc slice, feature `cuda`). Shapes are not stored: every
//! op takes its dimensions as arguments and documents them as `[dims]`, as the backends do.
//! [`View`] / [`ViewMut`] borrow a range of a tensor; they split and slice without copying, so a
//! forward pass can carve one scratch buffer into q, k and v.
//!
//! Ops live on [`crate::Device`]; they check that every argument lives on the op's device and
//! has the element type the backend computes in (host: f32, CUDA: bf16 activations and f32
//! logits/scores) and fail with [`crate::KernelError::Device`] naming the argument otherwise.

use std::ops::Range;

use half::bf16;

#[cfg(feature = "cuda")]
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

use crate::{KernelError, Result};

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// bfloat16.
    Bf16,
    /// 32-bit unsigned integer (token ids).
    U32,
    /// 32-bit signed integer (positions).
    I32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bf16 => 2,
            DType::F32 | DType::U32 | DType::I32 => 4,
        }
    }

    /// Lower-case name (`f32`, `bf16`, `u32`, `i32`).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
            DType::U32 => "u32",
            DType::I32 => "i32",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Owned storage of a tensor.
pub(crate) enum Repr {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    #[cfg(feature = "cuda")]
    CudaF32(CudaSlice<f32>),
    #[cfg(feature = "cuda")]
    CudaBf16(CudaSlice<bf16>),
    #[cfg(feature = "cuda")]
    CudaU32(CudaSlice<u32>),
    #[cfg(feature = "cuda")]
    CudaI32(CudaSlice<i32>),
}

/// Borrowed read-only storage.
pub(crate) enum ViewRepr<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    U32(&'a [u32]),
    I32(&'a [i32]),
    #[cfg(feature = "cuda")]
    CudaF32(CudaView<'a, f32>),
    #[cfg(feature = "cuda")]
    CudaBf16(CudaView<'a, bf16>),
    #[cfg(feature = "cuda")]
    CudaU32(CudaView<'a, u32>),
    #[cfg(feature = "cuda")]
    CudaI32(CudaView<'a, i32>),
}

/// Borrowed mutable storage.
pub(crate) enum ViewMutRepr<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [bf16]),
    U32(&'a mut [u32]),
    I32(&'a mut [i32]),
    #[cfg(feature = "cuda")]
    CudaF32(CudaViewMut<'a, f32>),
    #[cfg(feature = "cuda")]
    CudaBf16(CudaViewMut<'a, bf16>),
    #[cfg(feature = "cuda")]
    CudaU32(CudaViewMut<'a, u32>),
    #[cfg(feature = "cuda")]
    CudaI32(CudaViewMut<'a, i32>),
}

/// Applies `$e` (with the payload bound to `$x`) to every variant of a representation enum.
macro_rules! each {
    ($enum:ident, $v:expr, $x:ident => $e:expr) => {
        match $v {
            $enum::F32($x) => $e,
            $enum::Bf16($x) => $e,
            $enum::U32($x) => $e,
            $enum::I32($x) => $e,
            #[cfg(feature = "cuda")]
            $enum::CudaF32($x) => $e,
            #[cfg(feature = "cuda")]
            $enum::CudaBf16($x) => $e,
            #[cfg(feature = "cuda")]
            $enum::CudaU32($x) => $e,
            #[cfg(feature = "cuda")]
            $enum::CudaI32($x) => $e,
        }
    };
}

/// Maps every variant to the same variant of another enum: `$h` for host payloads, `$c` for
/// CUDA payloads (both with the payload bound to `$x`).
macro_rules! map_each {
    ($from:ident => $to:ident, $v:expr, $x:ident => host: $h:expr, cuda: $c:expr) => {
        match $v {
            $from::F32($x) => $to::F32($h),
            $from::Bf16($x) => $to::Bf16($h),
            $from::U32($x) => $to::U32($h),
            $from::I32($x) => $to::I32($h),
            #[cfg(feature = "cuda")]
            $from::CudaF32($x) => $to::CudaF32($c),
            #[cfg(feature = "cuda")]
            $from::CudaBf16($x) => $to::CudaBf16($c),
            #[cfg(feature = "cuda")]
            $from::CudaU32($x) => $to::CudaU32($c),
            #[cfg(feature = "cuda")]
            $from::CudaI32($x) => $to::CudaI32($c),
        }
    };
}

fn dtype_of_tag(tag: u8) -> DType {
    match tag {
        0 => DType::F32,
        1 => DType::Bf16,
        2 => DType::U32,
        _ => DType::I32,
    }
}

macro_rules! tags {
    ($enum:ident, $v:expr) => {
        match $v {
            $enum::F32(_) => (0u8, false),
            $enum::Bf16(_) => (1, false),
            $enum::U32(_) => (2, false),
            $enum::I32(_) => (3, false),
            #[cfg(feature = "cuda")]
            $enum::CudaF32(_) => (0, true),
            #[cfg(feature = "cuda")]
            $enum::CudaBf16(_) => (1, true),
            #[cfg(feature = "cuda")]
            $enum::CudaU32(_) => (2, true),
            #[cfg(feature = "cuda")]
            $enum::CudaI32(_) => (3, true),
        }
    };
}

fn check_range(what: &str, range: &Range<usize>, len: usize) -> Result<()> {
    if range.start > range.end || range.end > len {
        return Err(KernelError::Shape(format!(
            "{what}: range {range:?} is outside a tensor of {len} elements"
        )));
    }
    Ok(())
}

/// A flat buffer on one device (see the module docs).
pub struct Tensor {
    pub(crate) repr: Repr,
    /// Logical length (CUDA buffers keep at least one element: cudarc cannot allocate zero).
    pub(crate) len: usize,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({} x {} on {})",
            self.len(),
            self.dtype(),
            if self.is_cuda() { "cuda" } else { "cpu" }
        )
    }
}

impl Tensor {
    /// A host tensor owning `v`.
    pub fn from_f32(v: Vec<f32>) -> Self {
        Self {
            len: v.len(),
            repr: Repr::F32(v),
        }
    }

    /// A host bf16 tensor owning `v`.
    pub fn from_bf16(v: Vec<bf16>) -> Self {
        Self {
            len: v.len(),
            repr: Repr::Bf16(v),
        }
    }

    /// A host u32 tensor owning `v`.
    pub fn from_u32(v: Vec<u32>) -> Self {
        Self {
            len: v.len(),
            repr: Repr::U32(v),
        }
    }

    /// A host i32 tensor owning `v`.
    pub fn from_i32(v: Vec<i32>) -> Self {
        Self {
            len: v.len(),
            repr: Repr::I32(v),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        dtype_of_tag(tags!(Repr, &self.repr).0)
    }

    /// Whether the tensor lives in CUDA memory.
    pub fn is_cuda(&self) -> bool {
        tags!(Repr, &self.repr).1
    }

    /// Bytes of storage (`len * dtype.size()`).
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype().size()
    }

    /// A view of the whole tensor.
    pub fn view(&self) -> View<'_> {
        View {
            repr: map_each!(Repr => ViewRepr, &self.repr, x => host: &x[..self.len], cuda: x.slice(..self.len)),
        }
    }

    /// A mutable view of the whole tensor.
    pub fn view_mut(&mut self) -> ViewMut<'_> {
        let n = self.len;
        ViewMut {
            repr: map_each!(Repr => ViewMutRepr, &mut self.repr, x => host: &mut x[..n], cuda: x.slice_mut(..n)),
        }
    }

    /// A view of elements `range`; errors if the range is out of bounds.
    pub fn slice(&self, range: Range<usize>) -> Result<View<'_>> {
        self.view().slice(range)
    }

    /// A mutable view of elements `range`; errors if the range is out of bounds.
    pub fn slice_mut(&mut self, range: Range<usize>) -> Result<ViewMut<'_>> {
        check_range("slice_mut", &range, self.len())?;
        Ok(ViewMut {
            repr: map_each!(Repr => ViewMutRepr, &mut self.repr, x => host: &mut x[range], cuda: x.slice_mut(range)),
        })
    }

    /// `(self[..mid], self[mid..])` as two disjoint mutable views; errors if `mid > len`.
    pub fn split_at_mut(&mut self, mid: usize) -> Result<(ViewMut<'_>, ViewMut<'_>)> {
        let n = self.len;
        check_range("split_at_mut", &(0..mid), n)?;
        macro_rules! split {
            ($variant:ident, $a:expr, $b:expr) => {
                (
                    ViewMut {
                        repr: ViewMutRepr::$variant($a),
                    },
                    ViewMut {
                        repr: ViewMutRepr::$variant($b),
                    },
                )
            };
        }
        Ok(match &mut self.repr {
            Repr::F32(x) => {
                let (a, b) = x[..n].split_at_mut(mid);
                split!(F32, a, b)
            }
            Repr::Bf16(x) => {
                let (a, b) = x[..n].split_at_mut(mid);
                split!(Bf16, a, b)
            }
            Repr::U32(x) => {
                let (a, b) = x[..n].split_at_mut(mid);
                split!(U32, a, b)
            }
            Repr::I32(x) => {
                let (a, b) = x[..n].split_at_mut(mid);
                split!(I32, a, b)
            }
            #[cfg(feature = "cuda")]
            Repr::CudaF32(x) => {
                let (a, b) = x.split_at_mut(mid);
                split!(CudaF32, a, b)
            }
            #[cfg(feature = "cuda")]
            Repr::CudaBf16(x) => {
                let (a, b) = x.split_at_mut(mid);
                split!(CudaBf16, a, b)
            }
            #[cfg(feature = "cuda")]
            Repr::CudaU32(x) => {
                let (a, b) = x.split_at_mut(mid);
                split!(CudaU32, a, b)
            }
            #[cfg(feature = "cuda")]
            Repr::CudaI32(x) => {
                let (a, b) = x.split_at_mut(mid);
                split!(CudaI32, a, b)
            }
        })
    }

    /// The host f32 data, or an error naming `what` if the tensor is not a host f32 tensor.
    pub fn host_f32(&self, what: &str) -> Result<&[f32]> {
        match &self.repr {
            Repr::F32(v) => Ok(&v[..self.len]),
            _ => Err(wrong(
                what,
                "a host f32 tensor",
                self.dtype(),
                self.is_cuda(),
            )),
        }
    }

    /// Mutable host f32 data (see [`Tensor::host_f32`]).
    pub fn host_f32_mut(&mut self, what: &str) -> Result<&mut [f32]> {
        let (dtype, cuda, n) = (self.dtype(), self.is_cuda(), self.len);
        match &mut self.repr {
            Repr::F32(v) => Ok(&mut v[..n]),
            _ => Err(wrong(what, "a host f32 tensor", dtype, cuda)),
        }
    }

    /// The underlying CUDA bf16 buffer (feature `cuda`), for kernel-level code and benchmarks.
    #[cfg(feature = "cuda")]
    pub fn cuda_bf16(&self) -> Option<&CudaSlice<bf16>> {
        match &self.repr {
            Repr::CudaBf16(s) => Some(s),
            _ => None,
        }
    }

    /// The underlying CUDA f32 buffer (feature `cuda`).
    #[cfg(feature = "cuda")]
    pub fn cuda_f32(&self) -> Option<&CudaSlice<f32>> {
        match &self.repr {
            Repr::CudaF32(s) => Some(s),
            _ => None,
        }
    }
}

pub(crate) fn wrong(what: &str, want: &str, dtype: DType, cuda: bool) -> KernelError {
    KernelError::Device(format!(
        "`{what}` must be {want}, but it is a {} {dtype} tensor",
        if cuda { "CUDA" } else { "host" }
    ))
}

/// A read-only view of (part of) a tensor.
pub struct View<'a> {
    pub(crate) repr: ViewRepr<'a>,
}

impl Clone for View<'_> {
    fn clone(&self) -> Self {
        self.slice_unchecked(0..self.len())
    }
}

impl<'a> View<'a> {
    /// A host f32 view of `v`.
    pub fn f32(v: &'a [f32]) -> Self {
        Self {
            repr: ViewRepr::F32(v),
        }
    }

    /// A host u32 view of `v`.
    pub fn u32(v: &'a [u32]) -> Self {
        Self {
            repr: ViewRepr::U32(v),
        }
    }

    /// A host bf16 view of `v`.
    pub fn bf16(v: &'a [bf16]) -> Self {
        Self {
            repr: ViewRepr::Bf16(v),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each!(ViewRepr, &self.repr, x => x.len())
    }

    /// Whether the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        dtype_of_tag(tags!(ViewRepr, &self.repr).0)
    }

    /// Whether the view is of CUDA memory.
    pub fn is_cuda(&self) -> bool {
        tags!(ViewRepr, &self.repr).1
    }

    fn slice_unchecked(&self, r: Range<usize>) -> View<'a> {
        View {
            repr: map_each!(ViewRepr => ViewRepr, &self.repr, x => host: &x[r], cuda: x.slice(r)),
        }
    }

    /// Elements `range` of this view; errors if out of bounds.
    pub fn slice(&self, range: Range<usize>) -> Result<View<'a>> {
        check_range("slice", &range, self.len())?;
        Ok(self.slice_unchecked(range))
    }

    /// `(self[..mid], self[mid..])`; errors if `mid > len`.
    pub fn split_at(&self, mid: usize) -> Result<(View<'a>, View<'a>)> {
        let n = self.len();
        check_range("split_at", &(0..mid), n)?;
        Ok((self.slice_unchecked(0..mid), self.slice_unchecked(mid..n)))
    }

    /// The host f32 data, or an error naming `what`.
    pub fn host_f32(&self, what: &str) -> Result<&'a [f32]> {
        match &self.repr {
            ViewRepr::F32(v) => Ok(v),
            _ => Err(wrong(
                what,
                "a host f32 tensor",
                self.dtype(),
                self.is_cuda(),
            )),
        }
    }

    /// The host u32 data, or an error naming `what`.
    pub fn host_u32(&self, what: &str) -> Result<&'a [u32]> {
        match &self.repr {
            ViewRepr::U32(v) => Ok(v),
            _ => Err(wrong(
                what,
                "a host u32 tensor",
                self.dtype(),
                self.is_cuda(),
            )),
        }
    }

    /// The host i32 data, or an error naming `what`.
    pub fn host_i32(&self, what: &str) -> Result<&'a [i32]> {
        match &self.repr {
            ViewRepr::I32(v) => Ok(v),
            _ => Err(wrong(
                what,
                "a host i32 tensor",
                self.dtype(),
                self.is_cuda(),
            )),
        }
    }

    /// The host bf16 data, or an error naming `what`.
    pub fn host_bf16(&self, what: &str) -> Result<&'a [bf16]> {
        match &self.repr {
            ViewRepr::Bf16(v) => Ok(v),
            _ => Err(wrong(
                what,
                "a host bf16 tensor",
                self.dtype(),
                self.is_cuda(),
            )),
        }
    }

    /// The CUDA bf16 view, or an error naming `what` (feature `cuda`).
    #[cfg(feature = "cuda")]
    pub fn cuda_bf16(&self, what: &str) -> Result<CudaView<'a, bf16>> {
        match &self.repr {
            ViewRepr::CudaBf16(v) => Ok(v.slice(..)),
            _ => Err(wrong(
                what,
                "a CUDA bf16 tensor",
                self.dtype(),
                self.is_cuda(),
            )),
        }
    }

    /// The CUDA f32 view, or an error naming `what` (feature `cuda`).
    #[cfg(feature = "cuda")]
    pub fn cuda_f32(&self, what: &str) -> Result<CudaView<'a, f32>> {
        match &self.repr {
            ViewRepr::CudaF32(v) => Ok(v.slice(..)),
            _ => Err(wrong(
                what,
                "a CUDA f32 tensor",
                self.dtype(),
                self.is_cuda(),
            )),
        }
    }

    /// The CUDA u32 view, or an error naming `what` (feature `cuda`).
    #[cfg(feature = "cuda")]
    pub fn cuda_u32(&self, what: &str) -> Result<CudaView<'a, u32>> {
        match &self.repr {
            ViewRepr::CudaU32(v) => Ok(v.slice(..)),
            _ => Err(wrong(
                what,
                "a CUDA u32 tensor",
                self.dtype(),
                self.is_cuda(),
            )),
        }
    }

    /// The CUDA i32 view, or an error naming `what` (feature `cuda`).
    #[cfg(feature = "cuda")]
    pub fn cuda_i32(&self, what: &str) -> Result<CudaView<'a, i32>> {
        match &self.repr {
            ViewRepr::CudaI32(v) => Ok(v.slice(..)),
            _ => Err(wrong(
                what,
                "a CUDA i32 tensor",
                self.dtype(),
                self.is_cuda(),
            )),
        }
    }
}

/// A mutable view of (part of) a tensor.
pub struct ViewMut<'a> {
    pub(crate) repr: ViewMutRepr<'a>,
}

impl<'a> ViewMut<'a> {
    /// A host f32 mutable view of `v`.
    pub fn f32(v: &'a mut [f32]) -> Self {
        Self {
            repr: ViewMutRepr::F32(v),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        each!(ViewMutRepr, &self.repr, x => x.len())
    }

    /// Whether the view has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        dtype_of_tag(tags!(ViewMutRepr, &self.repr).0)
    }

    /// Whether the view is of CUDA memory.
    pub fn is_cuda(&self) -> bool {
        tags!(ViewMutRepr, &self.repr).1
    }

    /// A read-only view of the same elements.
    pub fn as_view(&self) -> View<'_> {
        View {
            repr: map_each!(ViewMutRepr => ViewRepr, &self.repr, x => host: x, cuda: x.as_view()),
        }
    }

    /// A shorter-lived mutable view of the same elements.
    pub fn reborrow(&mut self) -> ViewMut<'_> {
        let n = self.len();
        self.slice_mut_unchecked(0..n)
    }

    fn slice_mut_unchecked(&mut self, r: Range<usize>) -> ViewMut<'_> {
        ViewMut {
            repr: map_each!(ViewMutRepr => ViewMutRepr, &mut self.repr, x => host: &mut x[r], cuda: x.slice_mut(r)),
        }
    }

    /// Elements `range` of this view; errors if out of bounds.
    pub fn slice_mut(&mut self, range: Range<usize>) -> Result<ViewMut<'_>> {
        check_range("slice_mut", &range, self.len())?;
        Ok(self.slice_mut_unchecked(range))
    }

    /// `(self[..mid], self[mid..])` as two disjoint mutable views; errors if `mid > len`.
    pub fn split_at_mut(&mut self, mid: usize) -> Result<(ViewMut<'_>, ViewMut<'_>)> {
        check_range("split_at_mut", &(0..mid), self.len())?;
        macro_rules! split {
            ($variant:ident, $x:expr) => {{
                let (a, b) = $x.split_at_mut(mid);
                (
                    ViewMut {
                        repr: ViewMutRepr::$variant(a),
                    },
                    ViewMut {
                        repr: ViewMutRepr::$variant(b),
                    },
                )
            }};
        }
        Ok(match &mut self.repr {
            ViewMutRepr::F32(x) => split!(F32, x),
            ViewMutRepr::Bf16(x) => split!(Bf16, x),
            ViewMutRepr::U32(x) => split!(U32, x),
            ViewMutRepr::I32(x) => split!(I32, x),
            #[cfg(feature = "cuda")]
            ViewMutRepr::CudaF32(x) => split!(CudaF32, x),
            #[cfg(feature = "cuda")]
            ViewMutRepr::CudaBf16(x) => split!(CudaBf16, x),
            #[cfg(feature = "cuda")]
            ViewMutRepr::CudaU32(x) => split!(CudaU32, x),
            #[cfg(feature = "cuda")]
            ViewMutRepr::CudaI32(x) => split!(CudaI32, x),
        })
    }

    /// The host f32 data, or an error naming `what`.
    pub fn host_f32(&mut self, what: &str) -> Result<&mut [f32]> {
        let (dtype, cuda) = (self.dtype(), self.is_cuda());
        match &mut self.repr {
            ViewMutRepr::F32(v) => Ok(v),
            _ => Err(wrong(what, "a host f32 tensor", dtype, cuda)),
        }
    }

    /// The host u32 data, or an error naming `what`.
    pub fn host_u32(&mut self, what: &str) -> Result<&mut [u32]> {
        let (dtype, cuda) = (self.dtype(), self.is_cuda());
        match &mut self.repr {
            ViewMutRepr::U32(v) => Ok(v),
            _ => Err(wrong(what, "a host u32 tensor", dtype, cuda)),
        }
    }

    /// The host bf16 data, or an error naming `what`.
    pub fn host_bf16(&mut self, what: &str) -> Result<&mut [bf16]> {
        let (dtype, cuda) = (self.dtype(), self.is_cuda());
        match &mut self.repr {
            ViewMutRepr::Bf16(v) => Ok(v),
            _ => Err(wrong(what, "a host bf16 tensor", dtype, cuda)),
        }
    }

    /// The CUDA bf16 view, or an error naming `what` (feature `cuda`).
    #[cfg(feature = "cuda")]
    pub fn cuda_bf16(&mut self, what: &str) -> Result<&mut CudaViewMut<'a, bf16>> {
        let (dtype, cuda) = (self.dtype(), self.is_cuda());
        match &mut self.repr {
            ViewMutRepr::CudaBf16(v) => Ok(v),
            _ => Err(wrong(what, "a CUDA bf16 tensor", dtype, cuda)),
        }
    }

    /// The CUDA f32 view, or an error naming `what` (feature `cuda`).
    #[cfg(feature = "cuda")]
    pub fn cuda_f32(&mut self, what: &str) -> Result<&mut CudaViewMut<'a, f32>> {
        let (dtype, cuda) = (self.dtype(), self.is_cuda());
        match &mut self.repr {
            ViewMutRepr::CudaF32(v) => Ok(v),
            _ => Err(wrong(what, "a CUDA f32 tensor", dtype, cuda)),
        }
    }

    /// The CUDA u32 view, or an error naming `what` (feature `cuda`).
    #[cfg(feature = "cuda")]
    pub fn cuda_u32(&mut self, what: &str) -> Result<&mut CudaViewMut<'a, u32>> {
        let (dtype, cuda) = (self.dtype(), self.is_cuda());
        match &mut self.repr {
            ViewMutRepr::CudaU32(v) => Ok(v),
            _ => Err(wrong(what, "a CUDA u32 tensor", dtype, cuda)),
        }
    }
}
