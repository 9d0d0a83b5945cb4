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

/// A dense CPU KV cache of one sequence: per layer `K[Hkv, capacity, D]`, `V[Hkv, capacity, Dv]`,
/// the first `len` slots of every (layer, KV head) in use.
///
/// Engines usually own their caches; this one serves the CPU [`crate::Compressor`], the demo and
/// tests. Slot order is kept equal to position order (compaction is order-preserving).
#[derive(Clone, Debug)]
pub struct KvCache<T> {
    /// Layers L.
    pub num_layers: usize,
    /// KV heads Hkv.
    pub num_kv_heads: usize,
    /// Key dimension D.
    pub head_dim: usize,
    /// Value dimension Dv.
    pub value_dim: usize,
    /// Slots allocated per (layer, KV head).
    pub capacity: usize,
    /// Slots in use.
    pub len: usize,
    /// Keys per layer, `[Hkv, capacity, D]`.
    pub k: Vec<Vec<T>>,
    /// Values per layer, `[Hkv, capacity, Dv]`.
    pub v: Vec<Vec<T>>,
}

impl<T: Element> KvCache<T> {
    /// An empty cache with room for `capacity` slots.
    pub fn new(num_layers: usize, num_kv_heads: usize, head_dim: usize, value_dim: usize, capacity: usize) -> Self {
        let zero = T::from_f32(0.0);
        Self {
            num_layers,
            num_kv_heads,
            head_dim,
            value_dim,
            capacity,
            len: 0,
            k: vec![vec![zero; num_kv_heads * capacity * head_dim]; num_layers],
            v: vec![vec![zero; num_kv_heads * capacity * value_dim]; num_layers],
        }
    }

    /// Append one token: `keys` is `[L, Hkv, D]`, `values` `[L, Hkv, Dv]`.
    ///
    /// # Errors
    /// `ShapeMismatch` for wrong lengths; `InvalidArgument` when the cache is full.
    pub fn push(&mut self, keys: &[T], values: &[T]) -> Result<()> {
        let (l, h, d, dv) = (self.num_layers, self.num_kv_heads, self.head_dim, self.value_dim);
        if keys.len() != l * h * d {
            return Err(Error::shape("token keys", format!("[{l}, {h}, {d}]"), keys.len()));
        }
        if values.len() != l * h * dv {
            return Err(Error::shape("token values", format!("[{l}, {h}, {dv}]"), values.len()));
        }
        if self.len == self.capacity {
            return Err(Error::invalid_argument("cache slots", format!("< capacity {}", self.capacity), self.len + 1));
        }
        let slot = self.len;
        for layer in 0..l {
            for g in 0..h {
                let src = &keys[(layer * h + g) * d..(layer * h + g + 1) * d];
                let dst = (g * self.capacity + slot) * d;
                self.k[layer][dst..dst + d].copy_from_slice(src);
                let src = &values[(layer * h + g) * dv..(layer * h + g + 1) * dv];
                let dst = (g * self.capacity + slot) * dv;
                self.v[layer][dst..dst + dv].copy_from_slice(src);
            }
        }
        self.len += 1;
        Ok(())
    }

    /// The keys of `layer` as a strided view of the slots in use.
    pub fn keys(&self, layer: usize) -> LayerView<'_, T> {
        LayerView {
            data: &self.k[layer],
            num_kv_heads: self.num_kv_heads,
            len: self.len,
            dim: self.head_dim,
            head_stride: self.capacity * self.head_dim,
            row_stride: self.head_dim,
        }
    }
}
