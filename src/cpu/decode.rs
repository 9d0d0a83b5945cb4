//! Sparse decode attention on the CPU backend: the specification of `triattn decode` and of the
//! decode kernels (`cuda/decode/`). The formula is in [`crate::decode`].
//!
//! f32 arithmetic in one pass over each list (online softmax): the listed slots are read in
//! blocks of [`BLOCK`] rows, converted to f32 once, scored against every query row of the KV
//! head's group (so each listed K and V row is read once for all `G * T` rows), the running
//! maximum rescales the accumulators once per block. Rayon spreads (layer, KV head) work items
//! over the pool.

use rayon::prelude::*;

use crate::cache::LayerView;
use crate::decode::{DecodeOptions, ListLayout};
use crate::dtype::Element;
use crate::error::{Error, Result};

/// Listed slots per block of the inner loop.
pub const BLOCK: usize = 32;

/// Blocks of listed rows requested ahead of the arithmetic (into L2).
const PREFETCH_BLOCKS: usize = 4;

/// The slot lists a decode reads: one per list of a [`ListLayout`], each strictly ascending in
/// `[0, N)` (or none: dense).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotLists {
    layout: ListLayout,
    lists: Vec<Vec<u32>>,
}

impl SlotLists {
    /// No lists: every slot is visible.
    pub fn dense() -> Self {
        SlotLists { layout: ListLayout::Dense, lists: Vec::new() }
    }

    /// `lists` of `layout` for a model of `layers` layers and `kv_heads` KV heads over caches of
    /// `n` slots.
    ///
    /// # Errors
    /// `ShapeMismatch` for another number of lists; `InvalidArgument` naming the list and entry
    /// for an out-of-range, unsorted or repeated slot.
    pub fn new(layout: ListLayout, lists: Vec<Vec<u32>>, layers: usize, kv_heads: usize, n: usize) -> Result<Self> {
        let count = layout.num_lists(layers, kv_heads);
        if lists.len() != count {
            return Err(Error::shape(format!("{} lists", layout.name()), count, lists.len()));
        }
        for (i, list) in lists.iter().enumerate() {
            for (j, &slot) in list.iter().enumerate() {
                if slot as usize >= n {
                    return Err(Error::invalid_argument(
                        format!("list {i} entry {j}"),
                        format!("a slot in 0..{n}"),
                        slot,
                    ));
                }
                if j > 0 && slot <= list[j - 1] {
                    return Err(Error::invalid_argument(
                        format!("list {i} entry {j}"),
                        format!("> the previous entry {} (strictly ascending)", list[j - 1]),
                        slot,
                    ));
                }
            }
        }
        Ok(SlotLists { layout, lists })
    }

    /// The lists of a `keep` tensor as `triattn compress` writes it: shape `[K]` (one list),
    /// `[Hkv, K]` (per KV head) or `[L, Hkv, K]` (per layer and KV head); each row strictly
    /// ascending slots in `[0, n)`, optionally followed by `-1` padding (ragged lists; a row may
    /// be all `-1`).
    ///
    /// # Errors
    /// `ShapeMismatch` for a shape that fits no layout; `InvalidArgument` naming the entry for a
    /// bad slot or a `-1` before a valid entry.
    pub fn from_keep(
        what: &str,
        shape: &[usize],
        values: &[i64],
        layers: usize,
        kv_heads: usize,
        n: usize,
    ) -> Result<Self> {
        let layout = match shape {
            [_] => ListLayout::Shared,
            [g, _] if *g == kv_heads => ListLayout::PerKvHead,
            [l, g, _] if *l == layers && *g == kv_heads => ListLayout::PerLayerKvHead,
            _ => {
                return Err(Error::shape(
                    format!("{what} shape"),
                    format!("[K], [{kv_heads}, K] or [{layers}, {kv_heads}, K]"),
                    crate::io::shape_str(shape),
                ))
            }
        };
        let k = *shape.last().unwrap_or(&0);
        let rows = values.len().checked_div(k).unwrap_or_else(|| layout.num_lists(layers, kv_heads));
        let mut lists = Vec::with_capacity(rows);
        for r in 0..rows {
            let row = &values[r * k..(r + 1) * k];
            let len = row.iter().position(|&x| x == -1).unwrap_or(k);
            if let Some(j) = row[len..].iter().position(|&x| x != -1) {
                return Err(Error::invalid_argument(
                    format!("{what} row {r} entry {}", len + j),
                    "-1 (padding only after the valid entries)",
                    row[len + j],
                ));
            }
            let mut list = Vec::with_capacity(len);
            for (j, &x) in row[..len].iter().enumerate() {
                if x < 0 || x as u64 >= n as u64 {
                    return Err(Error::invalid_argument(
                        format!("{what} row {r} entry {j}"),
                        format!("a slot in 0..{n} or -1 padding"),
                        x,
                    ));
                }
                list.push(x as u32);
            }
            lists.push(list);
        }
        SlotLists::new(layout, lists, layers, kv_heads, n).map_err(|e| e.context(what))
    }

    /// The layout.
    pub fn layout(&self) -> ListLayout {
        self.layout
    }

    /// The list `(layer, kv_head)` reads; `None` when dense.
    pub fn list(&self, layer: usize, kv_head: usize, kv_heads: usize) -> Option<&[u32]> {
        self.layout.list_index(layer, kv_head, kv_heads).map(|i| self.lists[i].as_slice())
    }

    /// The lists for the kernels: `i32 [lists, capacity]` (padding `-1`), their lengths, and the
    /// capacity (the longest list, at least 1).
    pub fn flat(&self) -> (Vec<i32>, Vec<i32>, usize) {
        let capacity = self.lists.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let mut flat = Vec::with_capacity(self.lists.len() * capacity);
        for list in &self.lists {
            flat.extend(list.iter().map(|&s| s as i32));
            flat.extend(std::iter::repeat_n(-1, capacity - list.len()));
        }
        (flat, self.lists.iter().map(|l| l.len() as i32).collect(), capacity)
    }
}

/// One layer's decode output: `o` `[H, T, Dv]` and `lse` `[H, T]` (natural log).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LayerDecode {
    /// `[H, T, Dv]`.
    pub o: Vec<f32>,
    /// `[H, T]`.
    pub lse: Vec<f32>,
}

/// Decode one layer: `queries` `[H, T, D]` against `keys` `[Hkv, N, D]` and `values`
/// `[Hkv, N, Dv]` through the lists of `layer`, with optional `sinks` `[H]`.
///
/// # Errors
/// `ShapeMismatch` or `InvalidArgument` naming the tensor or option that does not fit.
#[allow(clippy::too_many_arguments)]
pub fn decode_layer<Q: Element, T: Element>(
    queries: &[Q],
    num_queries: usize,
    keys: &LayerView<'_, T>,
    values: &LayerView<'_, T>,
    lists: &SlotLists,
    layer: usize,
    sinks: Option<&[f32]>,
    options: &DecodeOptions,
) -> Result<LayerDecode> {
    options.validate()?;
    let (hkv, n, d, dv) = (keys.num_kv_heads, keys.len, keys.dim, values.dim);
    if values.num_kv_heads != hkv || values.len != n {
        return Err(Error::shape(
            "values",
            format!("[{hkv}, {n}, Dv] as the keys"),
            format!("[{}, {}, {dv}]", values.num_kv_heads, values.len),
        ));
    }
    let per_head = num_queries * d;
    if num_queries == 0 || per_head == 0 || !queries.len().is_multiple_of(per_head) {
        return Err(Error::shape("queries", format!("[H, {num_queries}, {d}] (head_dim of the keys)"), queries.len()));
    }
    let h = queries.len() / per_head;
    if h == 0 || !h.is_multiple_of(hkv) {
        return Err(Error::shape("query heads", format!("a multiple of the {hkv} KV heads"), h));
    }
    if let Some(s) = sinks {
        if s.len() != h {
            return Err(Error::shape("sinks", format!("[{h}]"), s.len()));
        }
    }
    let group = h / hkv;
    let scale = options.scale_for(d);
    let per_kv: Vec<(Vec<f32>, Vec<f32>)> = (0..hkv)
        .into_par_iter()
        .map(|g| {
            let rows = group * num_queries;
            let q: Vec<f32> =
                queries[g * group * per_head..(g + 1) * group * per_head].iter().map(|x| x.to_f32()).collect();
            let row_sinks: Vec<Option<f32>> =
                (0..rows).map(|r| sinks.map(|s| s[g * group + r / num_queries])).collect();
            let slots: Vec<u32> = match lists.list(layer, g, hkv) {
                Some(list) => list.to_vec(),
                None => (0..n as u32).collect(),
            };
            decode_group(&Group {
                q: &q,
                rows,
                d,
                dv,
                keys,
                values,
                g,
                slots: &slots,
                scale,
                softcap: options.softcap,
                sinks: &row_sinks,
            })
        })
        .collect();
    let mut out = LayerDecode { o: Vec::with_capacity(h * num_queries * dv), lse: Vec::with_capacity(h * num_queries) };
    for (o, lse) in per_kv {
        out.o.extend(o);
        out.lse.extend(lse);
    }
    Ok(out)
}

/// The work of one KV head: its query rows against its listed slots.
struct Group<'a, T> {
    /// `[rows, D]` f32.
    q: &'a [f32],
    rows: usize,
    d: usize,
    dv: usize,
    keys: &'a LayerView<'a, T>,
    values: &'a LayerView<'a, T>,
    g: usize,
    slots: &'a [u32],
    scale: f32,
    softcap: Option<f32>,
    /// `[rows]` the sink of each row's head.
    sinks: &'a [Option<f32>],
}

/// The rows of `w`: `(o [rows, Dv], lse [rows])`. With AVX2 the same code is compiled for
/// 256-bit vectors: the same operations per lane (no FMA), so both paths give the same bits.
fn decode_group<T: Element>(w: &Group<'_, T>) -> (Vec<f32>, Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { decode_group_avx2(w) };
    }
    decode_group_body::<T, Portable>(w)
}

/// [`decode_group_body`] compiled for AVX2, with the block arithmetic of [`Avx2`].
///
/// # Safety
/// The CPU supports AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn decode_group_avx2<T: Element>(w: &Group<'_, T>) -> (Vec<f32>, Vec<f32>) {
    decode_group_body::<T, Avx2>(w)
}

#[inline(always)]
fn decode_group_body<T: Element, M: BlockMath>(w: &Group<'_, T>) -> (Vec<f32>, Vec<f32>) {
    let Group { q, rows, d, dv, keys, values, g, slots, scale, softcap, sinks } = *w;
    let mut m = vec![f32::NEG_INFINITY; rows];
    let mut den = vec![0f32; rows];
    let mut acc = vec![0f32; rows * dv];
    let mut kb = vec![0f32; BLOCK * d];
    let mut vb = vec![0f32; BLOCK * dv];
    let mut s = [0f32; BLOCK];
    let blocks: Vec<&[u32]> = slots.chunks(BLOCK).collect();
    for first in blocks.iter().take(PREFETCH_BLOCKS) {
        prefetch_rows(keys, values, g, first);
    }
    for (bi, &block) in blocks.iter().enumerate() {
        // The listed rows are scattered: ask for the rows PREFETCH_BLOCKS blocks ahead before
        // this block's arithmetic, so their memory latency overlaps it.
        if let Some(next) = blocks.get(bi + PREFETCH_BLOCKS) {
            prefetch_rows(keys, values, g, next);
        }
        let b = block.len();
        for (i, &slot) in block.iter().enumerate() {
            widen(keys.row(g, slot as usize), &mut kb[i * d..(i + 1) * d]);
            widen(values.row(g, slot as usize), &mut vb[i * dv..(i + 1) * dv]);
        }
        for r in 0..rows {
            let qr = &q[r * d..(r + 1) * d];
            M::dots(qr, &kb[..b * d], &mut s[..b]);
            for si in s[..b].iter_mut() {
                let x = *si * scale;
                *si = match softcap {
                    Some(c) => c * (x / c).tanh(),
                    None => x,
                };
            }
            let block_max = s[..b].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let m_new = m[r].max(block_max);
            if m_new == f32::NEG_INFINITY {
                continue;
            }
            let alpha = if m[r] == f32::NEG_INFINITY { 0.0 } else { (m[r] - m_new).exp() };
            let ar = &mut acc[r * dv..(r + 1) * dv];
            if alpha != 1.0 {
                ar.iter_mut().for_each(|x| *x *= alpha);
            }
            let mut sum = 0f32;
            for pi in s[..b].iter_mut() {
                *pi = (*pi - m_new).exp();
                sum += *pi;
            }
            M::accumulate(ar, &s[..b], &vb[..b * dv], dv);
            den[r] = den[r] * alpha + sum;
            m[r] = m_new;
        }
    }
    let mut lse = vec![0f32; rows];
    for r in 0..rows {
        let sink = sinks[r].unwrap_or(f32::NEG_INFINITY);
        let mf = m[r].max(sink);
        let em = if m[r] == f32::NEG_INFINITY { 0.0 } else { (m[r] - mf).exp() };
        let total = den[r] * em + if sink == f32::NEG_INFINITY { 0.0 } else { (sink - mf).exp() };
        let factor = if total > 0.0 { em / total } else { 0.0 };
        acc[r * dv..(r + 1) * dv].iter_mut().for_each(|x| *x *= factor);
        lse[r] = if total > 0.0 { mf + total.ln() } else { f32::NEG_INFINITY };
    }
    (acc, lse)
}

/// The two vector loops of a block. Every implementation performs the same f32 operations in
/// the same order per lane (a multiply, then an add; never fused), so all give the same bits.
trait BlockMath {
    /// `s[j] = dot(q, k[j])` over the rows `k` `[s.len(), D]`, each as [`dot`].
    fn dots(q: &[f32], k: &[f32], s: &mut [f32]);
    /// `acc += sum_b p[b] * v[b]` over the rows `v` `[p.len(), dv]`, each lane in slot order.
    fn accumulate(acc: &mut [f32], p: &[f32], v: &[f32], dv: usize);
}

/// The reference loops, left to the compiler's vectoriser.
struct Portable;

impl BlockMath for Portable {
    #[inline(always)]
    fn dots(q: &[f32], k: &[f32], s: &mut [f32]) {
        for (si, kr) in s.iter_mut().zip(k.chunks_exact(q.len())) {
            *si = dot(q, kr);
        }
    }

    #[inline(always)]
    fn accumulate(acc: &mut [f32], p: &[f32], v: &[f32], dv: usize) {
        accumulate(acc, p, v, dv);
    }
}

/// The same loops written with AVX2 intrinsics: four dots side by side and eight accumulator
/// registers per pass, so independent additions overlap instead of waiting on each other.
/// Only [`decode_group_avx2`] uses it.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl BlockMath for Avx2 {
    #[inline(always)]
    fn dots(q: &[f32], k: &[f32], s: &mut [f32]) {
        // SAFETY: `Avx2` is used only inside `decode_group_avx2`, which runs on AVX2 CPUs.
        unsafe { avx2::dots(q, k, s) }
    }

    #[inline(always)]
    fn accumulate(acc: &mut [f32], p: &[f32], v: &[f32], dv: usize) {
        // SAFETY: as above.
        unsafe { avx2::accumulate(acc, p, v, dv) }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_storeu_ps,
    };

    /// [`super::BlockMath::dots`], four rows at a time.
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dots(q: &[f32], k: &[f32], s: &mut [f32]) {
        let d = q.len();
        assert!(k.len() >= s.len() * d, "dots: {} key values for {} rows of {d}", k.len(), s.len());
        let full = d - d % 8;
        let mut j = 0;
        while j + 4 <= s.len() {
            let mut acc: [__m256; 4] = [_mm256_setzero_ps(); 4];
            for c in (0..full).step_by(8) {
                // SAFETY: c + 8 <= d = q.len(); row j + r < s.len() lies inside `k` (asserted).
                let x = _mm256_loadu_ps(q.as_ptr().add(c));
                for (r, a) in acc.iter_mut().enumerate() {
                    let y = _mm256_loadu_ps(k.as_ptr().add((j + r) * d + c));
                    *a = _mm256_add_ps(*a, _mm256_mul_ps(x, y));
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let mut lanes = [0f32; 8];
                // SAFETY: `lanes` holds eight f32.
                _mm256_storeu_ps(lanes.as_mut_ptr(), *a);
                let y = &k[(j + r) * d..(j + r + 1) * d];
                let tail: f32 = q[full..].iter().zip(&y[full..]).map(|(a, b)| a * b).sum();
                s[j + r] = lanes.iter().sum::<f32>() + tail;
            }
            j += 4;
        }
        for (jj, sj) in s.iter_mut().enumerate().skip(j) {
            *sj = super::dot(q, &k[jj * d..(jj + 1) * d]);
        }
    }

    /// [`super::BlockMath::accumulate`], 64 lanes (eight registers) per pass over the rows.
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn accumulate(acc: &mut [f32], p: &[f32], v: &[f32], dv: usize) {
        assert!(
            acc.len() == dv && v.len() >= p.len() * dv,
            "accumulate: acc {} v {} for {} rows of {dv}",
            acc.len(),
            v.len(),
            p.len()
        );
        let mut start = 0;
        while start + 64 <= dv {
            pass::<8>(acc, p, v, dv, start);
            start += 64;
        }
        while start + 8 <= dv {
            pass::<1>(acc, p, v, dv, start);
            start += 8;
        }
        for (e, a) in acc[start..].iter_mut().enumerate() {
            for (b, &pb) in p.iter().enumerate() {
                *a += pb * v[b * dv + start + e];
            }
        }
    }

    /// `acc[start..start + 8R] += sum_b p[b] * v[b, start..start + 8R]`.
    ///
    /// # Safety
    /// The CPU supports AVX2; `start + 8R <= dv = acc.len()` and `v` holds `p.len()` rows of `dv`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn pass<const R: usize>(acc: &mut [f32], p: &[f32], v: &[f32], dv: usize, start: usize) {
        let mut a: [__m256; R] = [_mm256_setzero_ps(); R];
        for (i, ai) in a.iter_mut().enumerate() {
            // SAFETY: start + 8R <= acc.len() (caller).
            *ai = _mm256_loadu_ps(acc.as_ptr().add(start + 8 * i));
        }
        for (b, &pb) in p.iter().enumerate() {
            let w = _mm256_set1_ps(pb);
            // SAFETY: row b < p.len() of `v`, lanes start..start + 8R <= dv (caller).
            let row = v.as_ptr().add(b * dv + start);
            for (i, ai) in a.iter_mut().enumerate() {
                *ai = _mm256_add_ps(*ai, _mm256_mul_ps(w, _mm256_loadu_ps(row.add(8 * i))));
            }
        }
        for (i, ai) in a.iter().enumerate() {
            // SAFETY: as the loads.
            _mm256_storeu_ps(acc.as_mut_ptr().add(start + 8 * i), *ai);
        }
    }
}

/// `acc += sum_b p[b] * v[b]` over the rows `v` `[b, dv]`: eight lanes at a time, each lane's
/// accumulator kept in a register across the block (the slot order of every lane is fixed).
#[inline(always)]
fn accumulate(acc: &mut [f32], p: &[f32], v: &[f32], dv: usize) {
    let mut chunks = acc.chunks_exact_mut(8);
    for (c, a) in (&mut chunks).enumerate() {
        let mut lanes: [f32; 8] = a.try_into().expect("8 lanes");
        for (b, &pb) in p.iter().enumerate() {
            let row = &v[b * dv + 8 * c..b * dv + 8 * c + 8];
            for i in 0..8 {
                lanes[i] += pb * row[i];
            }
        }
        a.copy_from_slice(&lanes);
    }
    let done = dv - dv % 8;
    for (e, a) in chunks.into_remainder().iter_mut().enumerate() {
        for (b, &pb) in p.iter().enumerate() {
            *a += pb * v[b * dv + done + e];
        }
    }
}

/// Hint the caches to load the K and V rows of `slots` into L2 (no effect on the results).
#[inline(always)]
fn prefetch_rows<T: Element>(keys: &LayerView<'_, T>, values: &LayerView<'_, T>, g: usize, slots: &[u32]) {
    #[cfg(target_arch = "x86_64")]
    for &slot in slots {
        for row in [keys.row(g, slot as usize), values.row(g, slot as usize)] {
            let bytes = std::mem::size_of_val(row);
            let base = row.as_ptr().cast::<i8>();
            for line in (0..bytes).step_by(64) {
                // SAFETY: a prefetch never faults; the address is inside the row.
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(base.add(line)) };
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (keys, values, g, slots);
}

#[inline(always)]
fn widen<T: Element>(src: &[T], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// f32 dot product in 8 independent lanes (vectorisable; the order is fixed).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ar.iter().zip(br).map(|(x, y)| x * y).sum();
    lanes.iter().sum::<f32>() + tail
}

/// Decode every layer: `queries[l]` `[H, T, D]`, `keys[l]`, `values[l]`, `sinks[l]` `[H]`; the
/// layers in parallel.
///
/// # Errors
/// As [`decode_layer`], the message prefixed with the layer; `ShapeMismatch` for per-layer
/// inputs of different lengths.
pub fn decode<Q: Element, T: Element>(
    queries: &[&[Q]],
    num_queries: usize,
    keys: &[LayerView<'_, T>],
    values: &[LayerView<'_, T>],
    lists: &SlotLists,
    sinks: Option<&[&[f32]]>,
    options: &DecodeOptions,
) -> Result<Vec<LayerDecode>> {
    let l = queries.len();
    for (what, got) in [("key layers", keys.len()), ("value layers", values.len())] {
        if got != l {
            return Err(Error::shape(what, format!("{l} (the query layers)"), got));
        }
    }
    if let Some(s) = sinks {
        if s.len() != l {
            return Err(Error::shape("sink layers", l, s.len()));
        }
    }
    (0..l)
        .into_par_iter()
        .map(|layer| {
            decode_layer(
                queries[layer],
                num_queries,
                &keys[layer],
                &values[layer],
                lists,
                layer,
                sinks.map(|s| s[layer]),
                options,
            )
            .map_err(|e| e.context(format!("layer {layer}")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// A deterministic stream of values in [-2, 2).
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// The AVX2 block arithmetic gives the portable loops' bits: head dims with and without a
    /// tail of eight, value dims below, at and above 64 lanes, partial blocks, softcap and sinks.
    #[test]
    fn avx2_path_gives_the_portable_bits() {
        #[cfg(target_arch = "x86_64")]
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("SKIP avx2_path_gives_the_portable_bits: this CPU has no AVX2");
            return;
        }
        let n = 300;
        for (case, &(d, dv, rows, listed, softcap)) in [
            (128, 128, 4, 70, None),
            (64, 256, 8, 33, Some(30.0)),
            (100, 72, 3, 129, None),
            (36, 20, 24, 5, None),
            (256, 64, 1, 300, Some(5.0)),
        ]
        .iter()
        .enumerate()
        {
            let keys: Vec<bf16> = values(case as u64, n * d).into_iter().map(bf16::from_f32).collect();
            let vals: Vec<bf16> = values(100 + case as u64, n * dv).into_iter().map(bf16::from_f32).collect();
            let kv = LayerView::contiguous("k", &keys, 1, n, d).unwrap();
            let vv = LayerView::contiguous("v", &vals, 1, n, dv).unwrap();
            let q = values(200 + case as u64, rows * d);
            let slots: Vec<u32> = (0..listed as u32).map(|i| i * (n / listed) as u32).collect();
            let sinks: Vec<Option<f32>> = (0..rows).map(|r| (r % 2 == 0).then_some(0.5)).collect();
            let group = Group {
                q: &q,
                rows,
                d,
                dv,
                keys: &kv,
                values: &vv,
                g: 0,
                slots: &slots,
                scale: 1.0 / (d as f32).sqrt(),
                softcap,
                sinks: &sinks,
            };
            let (o_ref, lse_ref) = decode_group_body::<bf16, Portable>(&group);
            let (o, lse) = decode_group(&group);
            for (what, got, want) in [("o", &o, &o_ref), ("lse", &lse, &lse_ref)] {
                if let Some(i) = (0..want.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
                    panic!(
                        "case {case} (D {d}, Dv {dv}, {rows} rows, {listed} listed): {what}[{i}] is {} on AVX2, {} portable",
                        got[i], want[i]
                    );
                }
            }
        }
    }
}
