//! Views of cached keys and values as the backends read them.

use crate::dtype::Element;
use crate::error::{Error, Result};

/// The keys (or values) of one layer: `[Hkv, N, D]` with element strides.
///
/// Row `n` of KV head `g` starts at `g * head_stride + n * row_stride` and holds `dim`
/// contiguous elements. [`LayerView::contiguous`] builds the dense layout.
#[derive(Clone, Copy, Debug)]
pub struct LayerView<'a, T> {
    /// The underlying elements.
    pub data: &'a [T],
    /// KV heads (Hkv).
    pub num_kv_heads: usize,
    /// Slots (N).
    pub len: usize,
    /// Elements per row (D for keys, Dv for values).
    pub dim: usize,
    /// Elements between consecutive KV heads.
    pub head_stride: usize,
    /// Elements between consecutive slots.
    pub row_stride: usize,
}

impl<'a, T: Element> LayerView<'a, T> {
    /// A dense `[Hkv, N, dim]` view.
    ///
    /// # Errors
    /// `ShapeMismatch` naming `what` if `data` does not hold exactly `Hkv * N * dim` elements.
    pub fn contiguous(what: &str, data: &'a [T], num_kv_heads: usize, len: usize, dim: usize) -> Result<Self> {
        Self::strided(what, data, num_kv_heads, len, dim, len * dim, dim)
    }

    /// A strided view; every row must lie inside `data`.
    ///
    /// # Errors
    /// `ShapeMismatch` naming `what` if a row would fall outside `data` or rows overlap.
    pub fn strided(
        what: &str,
        data: &'a [T],
        num_kv_heads: usize,
        len: usize,
        dim: usize,
        head_stride: usize,
        row_stride: usize,
    ) -> Result<Self> {
        if num_kv_heads > 0 && len > 0 {
            if row_stride < dim {
                return Err(Error::shape(format!("{what} row stride"), format!(">= {dim} elements"), row_stride));
            }
            let needed = (num_kv_heads - 1) * head_stride + (len - 1) * row_stride + dim;
            if data.len() < needed {
                return Err(Error::shape(
                    format!("{what} elements"),
                    format!("at least {needed} for [{num_kv_heads}, {len}, {dim}]"),
                    data.len(),
                ));
            }
        }
        Ok(Self { data, num_kv_heads, len, dim, head_stride, row_stride })
    }

    /// Row `n` of KV head `g`.
    #[inline(always)]
    pub fn row(&self, g: usize, n: usize) -> &'a [T] {
        let start = g * self.head_stride + n * self.row_stride;
        &self.data[start..start + self.dim]
    }
}
