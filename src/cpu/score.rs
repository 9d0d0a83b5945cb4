//! CPU scoring: raw per-attention-head scores of every cached key (ALGORITHM.md §2.2, §9).
//!
//! One pass over each (layer, KV head) serves the `G` query heads of its group: a key row is
//! widened to f32 once, its pair moduli computed once, then dotted with each head's weights.
//! Mean aggregation is one dot product per head; max is `J` per head followed by a max.

use rayon::prelude::*;

use crate::cache::LayerView;
use crate::dtype::Element;
use crate::error::{Error, Result};
use crate::model::PairingStyle;
use crate::score::{OffsetAggregation, RoundWeights};

/// Rows per parallel task.
const ROWS_PER_TASK: usize = 256;
/// Partial sums per dot product (a fixed association order, so results never depend on position).
const LANES: usize = 8;

/// Dot product with `LANES` partial sums in a fixed order.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = a.len() / LANES;
    for c in 0..chunks {
        let (x, y) = (&a[c * LANES..c * LANES + LANES], &b[c * LANES..c * LANES + LANES]);
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    for i in chunks * LANES..a.len() {
        acc[i % LANES] += a[i] * b[i];
    }
    let s4 = [acc[0] + acc[4], acc[1] + acc[5], acc[2] + acc[6], acc[3] + acc[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3])
}

/// Widen a row to f32.
#[inline(always)]
fn widen<T: Element>(src: &[T], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

/// Pair moduli `|k̃_f| = sqrt(re² + im²)`.
#[inline(always)]
fn moduli(style: PairingStyle, k: &[f32], out: &mut [f32]) {
    let f_count = out.len();
    match style {
        PairingStyle::Half => {
            let (re, im) = k.split_at(f_count);
            for f in 0..f_count {
                out[f] = (re[f] * re[f] + im[f] * im[f]).sqrt();
            }
        }
        PairingStyle::Interleaved => {
            for f in 0..f_count {
                let (re, im) = (k[2 * f], k[2 * f + 1]);
                out[f] = (re * re + im * im).sqrt();
            }
        }
    }
}

/// Score rows `rows` of KV head `g`; `out[i][r]` receives head `i` of the group for row `r`.
#[inline(always)]
fn score_rows<T: Element>(
    weights: &RoundWeights,
    layer: usize,
    keys: &LayerView<'_, T>,
    style: PairingStyle,
    g: usize,
    first_row: usize,
    out: &mut [&mut [f32]],
) {
    let d = weights.head_dim;
    let f_count = d / 2;
    let group = out.len();
    let vectors = weights.vectors_per_head;
    let mut k = vec![0f32; d];
    let mut m = vec![0f32; f_count];
    for r in 0..out[0].len() {
        widen(keys.row(g, first_row + r), &mut k);
        moduli(style, &k, &mut m);
        for (i, o) in out.iter_mut().enumerate().take(group) {
            let h = g * group + i;
            let e = dot(&m, weights.head_norm(layer, h));
            let w = weights.head_weights(layer, h);
            let trig = match (vectors, weights.aggregation) {
                (0, _) => 0.0,
                (_, OffsetAggregation::Mean) => dot(&k, w),
                (_, OffsetAggregation::Max) => {
                    // NaN keys give NaN through `e`; the comparison below never selects NaN.
                    let mut best = f32::NEG_INFINITY;
                    for j in 0..vectors {
                        let t = dot(&k, &w[j * d..(j + 1) * d]);
                        if t > best {
                            best = t;
                        }
                    }
                    best
                }
            };
            o[r] = trig + e;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! The AVX2 kernel: the same IEEE operations in the same order as [`super::score_rows`], eight
    //! rows at a time so that independent dot products overlap, with the chunk loops fully
    //! unrolled for the common head dimensions (64, 128, 256).
    //!
    //! Lane `l` of an accumulator is `acc[l]` of [`super::dot`]; products and sums are separate
    //! `mul`/`add` instructions (no fused multiply-add), the square root is the correctly rounded
    //! `vsqrtps`, and the horizontal sum is `(s[0] + s[2]) + (s[1] + s[3])` with
    //! `s[l] = acc[l] + acc[l + 4]`, exactly as the portable code. Row widening is exact in every
    //! form (bf16 byte shuffle, F16C conversion, f32 copy).

    use std::arch::x86_64::*;

    use crate::cache::LayerView;
    use crate::dtype::{DType, Element};
    use crate::model::PairingStyle;
    use crate::score::{OffsetAggregation, RoundWeights};

    /// Rows scored together.
    pub(super) const BLOCK: usize = 8;
    /// How far ahead (in rows) keys are prefetched.
    pub(super) const PREFETCH_ROWS: usize = 16;

    /// Whether the kernel handles this shape (otherwise the portable code runs): the dot products
    /// must have whole 8-lane chunks (`D` and `F = D / 2` multiples of 8).
    pub(super) fn supports(d: usize) -> bool {
        d.is_multiple_of(16)
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// Widen one row to f32 (exact).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen<T: Element>(src: &[T], dst: &mut [f32]) {
        let n = dst.len();
        debug_assert_eq!(src.len(), n);
        match T::DTYPE {
            DType::F32 => {
                // SAFETY: T is f32 (sealed trait, DTYPE tag).
                let s = std::slice::from_raw_parts(src.as_ptr() as *const f32, n);
                dst.copy_from_slice(s);
            }
            DType::Bf16 => {
                let s = src.as_ptr() as *const u16;
                // bf16 `e` becomes the f32 with bits `e << 16`: one byte shuffle moves elements
                // 0..4 (low lane) and 4..8 (high lane) of a broadcast 8-element load into the
                // upper halves of 32-bit lanes and zeroes the lower halves.
                let spread = _mm256_setr_epi8(
                    -128, -128, 0, 1, -128, -128, 2, 3, -128, -128, 4, 5, -128, -128, 6, 7, //
                    -128, -128, 8, 9, -128, -128, 10, 11, -128, -128, 12, 13, -128, -128, 14, 15,
                );
                let mut i = 0;
                while i + 8 <= n {
                    let h = _mm256_broadcastsi128_si256(_mm_loadu_si128(s.add(i) as *const __m128i));
                    let w = _mm256_shuffle_epi8(h, spread);
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_castsi256_ps(w));
                    i += 8;
                }
                for j in i..n {
                    dst[j] = src[j].to_f32();
                }
            }
            DType::F16 => {
                let s = src.as_ptr() as *const u16;
                let mut i = 0;
                while i + 8 <= n {
                    let h = _mm_loadu_si128(s.add(i) as *const __m128i);
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
                    i += 8;
                }
                for j in i..n {
                    dst[j] = src[j].to_f32();
                }
            }
        }
    }

    /// Pair moduli `sqrt(re * re + im * im)` of one widened row; `F` a multiple of 8.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn moduli(style: PairingStyle, k: &[f32], out: &mut [f32]) {
        let f_count = out.len();
        match style {
            PairingStyle::Half => {
                let (re, im) = (k.as_ptr(), k.as_ptr().add(f_count));
                for c in (0..f_count).step_by(8) {
                    let r = _mm256_loadu_ps(re.add(c));
                    let i = _mm256_loadu_ps(im.add(c));
                    let s = _mm256_add_ps(_mm256_mul_ps(r, r), _mm256_mul_ps(i, i));
                    _mm256_storeu_ps(out.as_mut_ptr().add(c), _mm256_sqrt_ps(s));
                }
            }
            PairingStyle::Interleaved => {
                for c in (0..f_count).step_by(8) {
                    // a = (re, im) of pairs c..c+4, b = pairs c+4..c+8.
                    let a = _mm256_loadu_ps(k.as_ptr().add(2 * c));
                    let b = _mm256_loadu_ps(k.as_ptr().add(2 * c + 8));
                    // hadd adds adjacent squares: re² + im² per pair, lanes [c0 c1 c4 c5 | c2 c3 c6 c7].
                    let s = _mm256_hadd_ps(_mm256_mul_ps(a, a), _mm256_mul_ps(b, b));
                    let s = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(s)));
                    _mm256_storeu_ps(out.as_mut_ptr().add(c), _mm256_sqrt_ps(s));
                }
            }
        }
    }

    /// 8-lane partial sums of `rows[b] · w` over `chunks` chunks of 8, for eight rows.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn acc8(rows: [*const f32; 8], w: *const f32, chunks: usize) -> [__m256; 8] {
        let mut a = [_mm256_setzero_ps(); 8];
        for c in 0..chunks {
            let o = c * 8;
            let y = _mm256_loadu_ps(w.add(o));
            for b in 0..8 {
                a[b] = _mm256_add_ps(a[b], _mm256_mul_ps(_mm256_loadu_ps(rows[b].add(o)), y));
            }
        }
        a
    }

    /// The horizontal sums of eight accumulators, in row order.
    ///
    /// Each row's sum is `(s0 + s2) + (s1 + s3)` with `s = lo + hi` (the lanes `l` and `l + 4`
    /// added first), exactly as [`super::dot`] finishes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn reduce8(acc: [__m256; 8]) -> __m256 {
        // For rows (a, b, c, d): [(s0 + s2) (s1 + s3) of a, c | of b, d].
        #[inline]
        #[target_feature(enable = "avx2,f16c")]
        unsafe fn pairs(a: __m256, b: __m256, c: __m256, d: __m256) -> __m256 {
            // [sa | sb] and [sc | sd], s = lo + hi.
            let ab = _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(a, b), _mm256_permute2f128_ps::<0x31>(a, b));
            let cd = _mm256_add_ps(_mm256_permute2f128_ps::<0x20>(c, d), _mm256_permute2f128_ps::<0x31>(c, d));
            // [s0 s1 (a) s0 s1 (c) | (b) (d)] + [s2 s3 (a) s2 s3 (c) | (b) (d)].
            _mm256_add_ps(_mm256_shuffle_ps::<0x44>(ab, cd), _mm256_shuffle_ps::<0xEE>(ab, cd))
        }
        let lo = pairs(acc[0], acc[1], acc[2], acc[3]);
        let hi = pairs(acc[4], acc[5], acc[6], acc[7]);
        // (s0 + s2) + (s1 + s3) per row: [r0 r2 r4 r6 | r1 r3 r5 r7], then into row order.
        let r = _mm256_hadd_ps(lo, hi);
        _mm256_permutevar8x32_ps(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
    }

    /// Prefetch the key rows of the block at `r0`: the rows `PREFETCH_ROWS` ahead, and at the
    /// start every row up to there (prefetching does not change any result).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn prefetch_block<T: Element>(
        keys: &LayerView<'_, T>,
        g: usize,
        first_row: usize,
        r0: usize,
        rows: usize,
    ) {
        let ahead = if r0 == 0 { 0 } else { r0 + PREFETCH_ROWS };
        for r in (ahead..r0 + PREFETCH_ROWS + BLOCK).take_while(|&r| r < rows) {
            let row = keys.row(g, first_row + r);
            let p = row.as_ptr() as *const i8;
            for line in (0..std::mem::size_of_val(row)).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(p.add(line));
            }
        }
    }

    /// Store the block's scores: all eight, or the first `out.len()` of a short last block.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn store_block(out: &mut [f32], scores: __m256) {
        if out.len() == BLOCK {
            _mm256_storeu_ps(out.as_mut_ptr(), scores);
        } else {
            let mut t = [0f32; BLOCK];
            _mm256_storeu_ps(t.as_mut_ptr(), scores);
            out.copy_from_slice(&t[..out.len()]);
        }
    }

    /// Score rows `first_row..first_row + out[0].len()` of KV head `g` (see [`super::score_rows`]).
    ///
    /// # Safety
    /// Only after [`supports`] returned true for `weights.head_dim`.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn score_rows<T: Element>(
        weights: &RoundWeights,
        layer: usize,
        keys: &LayerView<'_, T>,
        style: PairingStyle,
        g: usize,
        first_row: usize,
        out: &mut [&mut [f32]],
    ) {
        // Constant chunk counts let the compiler unroll the dot products; any other D uses the
        // loop form. Both perform the same operations.
        match weights.head_dim {
            64 => score_rows_d::<T, 8>(weights, layer, keys, style, g, first_row, out),
            128 => score_rows_d::<T, 16>(weights, layer, keys, style, g, first_row, out),
            256 => score_rows_d::<T, 32>(weights, layer, keys, style, g, first_row, out),
            _ => score_rows_d::<T, 0>(weights, layer, keys, style, g, first_row, out),
        }
    }

    /// [`score_rows`] with `D = 8 * DC` known at compile time (`DC = 0`: read from the weights).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn score_rows_d<T: Element, const DC: usize>(
        weights: &RoundWeights,
        layer: usize,
        keys: &LayerView<'_, T>,
        style: PairingStyle,
        g: usize,
        first_row: usize,
        out: &mut [&mut [f32]],
    ) {
        let d = if DC == 0 { weights.head_dim } else { 8 * DC };
        let (d_chunks, f_chunks) = (d / 8, d / 16);
        let f_count = d / 2;
        let group = out.len();
        let vectors = weights.vectors_per_head;
        let rows = out[0].len();
        // The weights and norm coefficients of the group's heads, contiguous in `RoundWeights`.
        let first_head = layer * weights.num_heads + g * group;
        let per_head = vectors * d;
        // Copied into 32-byte aligned scratch with the widened rows and moduli, so that no 8-lane
        // load splits a cache line (`D` is a multiple of 16: every row starts aligned).
        let (w_len, c_len) = (group * per_head, group * f_count);
        let (k_len, m_len) = (BLOCK * d, BLOCK * f_count);
        let mut scratch = vec![_mm256_setzero_ps(); (w_len + c_len + k_len + m_len) / 8];
        // SAFETY: `__m256` is 8 plain f32 lanes; the slices are disjoint parts of `scratch`.
        let all = std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut f32, scratch.len() * 8);
        let (group_w, rest) = all.split_at_mut(w_len);
        let (group_c, rest) = rest.split_at_mut(c_len);
        let (k, m) = rest.split_at_mut(k_len);
        group_w.copy_from_slice(&weights.weights[first_head * per_head..(first_head + group) * per_head]);
        group_c.copy_from_slice(&weights.norm[first_head * f_count..(first_head + group) * f_count]);
        let mut r0 = 0;
        while r0 < rows {
            let live = (rows - r0).min(BLOCK);
            prefetch_block(keys, g, first_row, r0, rows);
            for b in 0..BLOCK {
                // A short last block repeats its last row; those results are discarded.
                let r = r0 + b.min(live - 1);
                widen(keys.row(g, first_row + r), &mut k[b * d..(b + 1) * d]);
                moduli(style, &k[b * d..(b + 1) * d], &mut m[b * f_count..(b + 1) * f_count]);
            }
            let kp: [*const f32; BLOCK] = std::array::from_fn(|b| k.as_ptr().add(b * d));
            let mp: [*const f32; BLOCK] = std::array::from_fn(|b| m.as_ptr().add(b * f_count));
            for (i, o) in out.iter_mut().enumerate() {
                let e = reduce8(acc8(mp, group_c[i * f_count..].as_ptr(), f_chunks));
                let w = &group_w[i * per_head..(i + 1) * per_head];
                let trig = match (vectors, weights.aggregation) {
                    (0, _) => _mm256_setzero_ps(),
                    (_, OffsetAggregation::Mean) => reduce8(acc8(kp, w.as_ptr(), d_chunks)),
                    (_, OffsetAggregation::Max) => {
                        let mut best = _mm256_set1_ps(f32::NEG_INFINITY);
                        for j in 0..vectors {
                            let t = reduce8(acc8(kp, w.as_ptr().add(j * d), d_chunks));
                            // `if t > best { best = t }` per row: NaN never replaces the best.
                            best = _mm256_blendv_ps(best, t, _mm256_cmp_ps::<_CMP_GT_OQ>(t, best));
                        }
                        best
                    }
                };
                store_block(&mut o[r0..r0 + live], _mm256_add_ps(trig, e));
            }
            r0 += BLOCK;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The AVX-512 kernel: the AVX2 kernel's operations, two rows per 512-bit register. Each
    //! register holds the eight lanes of one row's accumulator in its low half and the next
    //! row's in its high half. Lane `l` of each half is `acc[l]` of [`super::dot`]; products and
    //! sums stay separate (no fused multiply-add), the moduli use the correctly rounded square
    //! root, and the horizontal sums are the AVX2 kernel's, so all three paths are bit-identical.
    //!
    //! Widened rows and their moduli are stored interleaved: chunk `c` of rows `2p` and `2p + 1`
    //! is one 16-float register at `(c * 4 + p) * 16`.
    //!
    //! Up to [`WAYS`] weight vectors (the heads of a KV group, or consecutive offsets of one head
    //! under max aggregation) are dotted in one pass over a block: each chunk of the rows is
    //! loaded once for all of them, and the `4 * WAYS` independent accumulators keep both 512-bit
    //! pipes busy (four accumulators alone wait on the add latency).

    use std::arch::x86_64::*;

    use super::avx2::{prefetch_block, reduce8, store_block, BLOCK};
    use crate::cache::LayerView;
    use crate::dtype::{DType, Element};
    use crate::model::PairingStyle;
    use crate::score::{OffsetAggregation, RoundWeights};

    /// Row pairs per block.
    const PAIRS: usize = BLOCK / 2;
    /// Weight vectors dotted in one pass.
    const WAYS: usize = 4;

    /// Whether this CPU runs the kernel for head dimension `d` (a multiple of 16).
    pub(super) fn supports(d: usize) -> bool {
        d.is_multiple_of(16)
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
    }

    /// Widen one row to f32 (exact) straight into the interleaved block: chunk `c` goes to
    /// `dst + c * PAIRS * 16` (the caller points `dst` at the row's pair and half).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx2,f16c")]
    unsafe fn widen_interleaved<T: Element>(src: &[T], dst: *mut f32, chunks: usize) {
        let s = src.as_ptr() as *const u16;
        let at = |c: usize| dst.add(c * PAIRS * 16);
        match T::DTYPE {
            DType::F32 => {
                let s = src.as_ptr() as *const f32;
                for c in 0..chunks {
                    _mm256_store_ps(at(c), _mm256_loadu_ps(s.add(c * 8)));
                }
            }
            DType::Bf16 => {
                // bf16 `e` becomes the f32 with bits `e << 16`.
                for c in 0..chunks {
                    let h = _mm256_cvtepu16_epi32(_mm_loadu_si128(s.add(c * 8) as *const __m128i));
                    _mm256_store_ps(at(c), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(h)));
                }
            }
            DType::F16 => {
                for c in 0..chunks {
                    let h = _mm_loadu_si128(s.add(c * 8) as *const __m128i);
                    _mm256_store_ps(at(c), _mm256_cvtph_ps(h));
                }
            }
        }
    }

    /// Partial sums of the eight rows (interleaved at `rows`) times each of the `NW` vectors
    /// `w[i]`, `chunks` chunks of 8: `[vector][pair]`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx2,f16c")]
    unsafe fn acc<const NW: usize>(rows: *const f32, w: [*const f32; NW], chunks: usize) -> [[__m512; PAIRS]; NW] {
        let mut a = [[_mm512_setzero_ps(); PAIRS]; NW];
        for c in 0..chunks {
            let r: [__m512; PAIRS] = std::array::from_fn(|p| _mm512_load_ps(rows.add((c * PAIRS + p) * 16)));
            for (acc, &w) in a.iter_mut().zip(&w) {
                let y = _mm512_broadcast_f32x8(_mm256_loadu_ps(w.add(c * 8)));
                for (acc, &r) in acc.iter_mut().zip(&r) {
                    *acc = _mm512_add_ps(*acc, _mm512_mul_ps(r, y));
                }
            }
        }
        a
    }

    /// The eight rows' sums of [`acc`]'s accumulators of one vector, in row order (the AVX2
    /// reduction).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx2,f16c")]
    unsafe fn sums(a: [__m512; PAIRS]) -> __m256 {
        let halves: [__m256; BLOCK] = std::array::from_fn(|b| {
            let z = a[b / 2];
            if b % 2 == 0 {
                _mm512_castps512_ps256(z)
            } else {
                _mm512_extractf32x8_ps::<1>(z)
            }
        });
        reduce8(halves)
    }

    /// The block's dot products with `NW` vectors, one `__m256` of eight row sums each.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx2,f16c")]
    unsafe fn dots<const NW: usize>(rows: *const f32, w: [*const f32; NW], chunks: usize) -> [__m256; NW] {
        let a = acc::<NW>(rows, w, chunks);
        std::array::from_fn(|i| sums(a[i]))
    }

    /// [`dots`] for `w.len()` vectors, `WAYS` at a time, into `out`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx2,f16c")]
    unsafe fn dots_all(rows: *const f32, w: &[*const f32], chunks: usize, out: &mut [__m256]) {
        for (w, out) in w.chunks(WAYS).zip(out.chunks_mut(WAYS)) {
            match w.len() {
                4 => out.copy_from_slice(&dots::<4>(rows, [w[0], w[1], w[2], w[3]], chunks)),
                3 => out.copy_from_slice(&dots::<3>(rows, [w[0], w[1], w[2]], chunks)),
                2 => out.copy_from_slice(&dots::<2>(rows, [w[0], w[1]], chunks)),
                _ => out.copy_from_slice(&dots::<1>(rows, [w[0]], chunks)),
            }
        }
    }

    /// Score rows `first_row..first_row + out[0].len()` of KV head `g` (see [`super::score_rows`]).
    ///
    /// # Safety
    /// Only after [`supports`] returned true for `weights.head_dim`.
    #[target_feature(enable = "avx512f,avx512dq,avx2,f16c")]
    pub(super) unsafe fn score_rows<T: Element>(
        weights: &RoundWeights,
        layer: usize,
        keys: &LayerView<'_, T>,
        style: PairingStyle,
        g: usize,
        first_row: usize,
        out: &mut [&mut [f32]],
    ) {
        match weights.head_dim {
            64 => score_rows_d::<T, 8>(weights, layer, keys, style, g, first_row, out),
            128 => score_rows_d::<T, 16>(weights, layer, keys, style, g, first_row, out),
            256 => score_rows_d::<T, 32>(weights, layer, keys, style, g, first_row, out),
            _ => score_rows_d::<T, 0>(weights, layer, keys, style, g, first_row, out),
        }
    }

    /// [`score_rows`] with `D = 8 * DC` known at compile time (`DC = 0`: read from the weights).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq,avx2,f16c")]
    unsafe fn score_rows_d<T: Element, const DC: usize>(
        weights: &RoundWeights,
        layer: usize,
        keys: &LayerView<'_, T>,
        style: PairingStyle,
        g: usize,
        first_row: usize,
        out: &mut [&mut [f32]],
    ) {
        let d = if DC == 0 { weights.head_dim } else { 8 * DC };
        let (d_chunks, f_chunks) = (d / 8, d / 16);
        let f_count = d / 2;
        let group = out.len();
        let vectors = weights.vectors_per_head;
        let rows = out[0].len();
        let first_head = layer * weights.num_heads + g * group;
        let per_head = vectors * d;
        // 64-byte aligned scratch: the group's weights and norm coefficients, and the block's
        // interleaved rows and moduli.
        let (w_len, c_len) = (group * per_head, group * f_count);
        let (k_len, m_len) = (BLOCK * d, BLOCK * f_count);
        let total = (w_len + c_len + k_len + m_len).div_ceil(16);
        let mut scratch = vec![_mm512_setzero_ps(); total];
        // SAFETY: `__m512` is 16 plain f32 lanes; the slices are disjoint parts of `scratch`.
        let all = std::slice::from_raw_parts_mut(scratch.as_mut_ptr() as *mut f32, total * 16);
        let (kz, rest) = all.split_at_mut(k_len);
        let (mz, rest) = rest.split_at_mut(m_len);
        let (group_w, rest) = rest.split_at_mut(w_len);
        let group_c = &mut rest[..c_len];
        group_w.copy_from_slice(&weights.weights[first_head * per_head..(first_head + group) * per_head]);
        group_c.copy_from_slice(&weights.norm[first_head * f_count..(first_head + group) * f_count]);
        let norm_w: Vec<*const f32> = (0..group).map(|i| group_c.as_ptr().add(i * f_count)).collect();
        // Mean: one vector per head. Max: every offset's vector of each head, head-major.
        let mean_w: Vec<*const f32> = (0..group).map(|i| group_w.as_ptr().add(i * per_head)).collect();
        let offset_w: Vec<*const f32> = (0..group * vectors).map(|v| group_w.as_ptr().add(v * d)).collect();
        let mut e = vec![_mm256_setzero_ps(); group];
        let mut trig = vec![_mm256_setzero_ps(); group];
        let mut per_offset = vec![_mm256_setzero_ps(); vectors];
        let even = _mm512_setr_epi32(0, 2, 4, 6, 16, 18, 20, 22, 8, 10, 12, 14, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 17, 19, 21, 23, 9, 11, 13, 15, 25, 27, 29, 31);
        let mut r0 = 0;
        while r0 < rows {
            let live = (rows - r0).min(BLOCK);
            prefetch_block(keys, g, first_row, r0, rows);
            // Widen each row into its interleaved place (a short last block repeats its last row).
            for b in 0..BLOCK {
                let r = r0 + b.min(live - 1);
                let dst = kz.as_mut_ptr().add((b / 2) * 16 + (b % 2) * 8);
                widen_interleaved(keys.row(g, first_row + r), dst, d_chunks);
            }
            // Moduli of all eight rows, two rows per register.
            for p in 0..PAIRS {
                for c in 0..f_chunks {
                    let m = match style {
                        PairingStyle::Half => {
                            let re = _mm512_load_ps(kz.as_ptr().add((c * PAIRS + p) * 16));
                            let im = _mm512_load_ps(kz.as_ptr().add(((c + f_chunks) * PAIRS + p) * 16));
                            _mm512_sqrt_ps(_mm512_add_ps(_mm512_mul_ps(re, re), _mm512_mul_ps(im, im)))
                        }
                        PairingStyle::Interleaved => {
                            // Chunks 2c and 2c + 1 hold pairs 8c..8c + 8 as (re, im) neighbours.
                            let a = _mm512_load_ps(kz.as_ptr().add((2 * c * PAIRS + p) * 16));
                            let b = _mm512_load_ps(kz.as_ptr().add(((2 * c + 1) * PAIRS + p) * 16));
                            let (a2, b2) = (_mm512_mul_ps(a, a), _mm512_mul_ps(b, b));
                            let re2 = _mm512_permutex2var_ps(a2, even, b2);
                            let im2 = _mm512_permutex2var_ps(a2, odd, b2);
                            _mm512_sqrt_ps(_mm512_add_ps(re2, im2))
                        }
                    };
                    _mm512_store_ps(mz.as_mut_ptr().add((c * PAIRS + p) * 16), m);
                }
            }
            dots_all(mz.as_ptr(), &norm_w, f_chunks, &mut e);
            match (vectors, weights.aggregation) {
                (0, _) => trig.fill(_mm256_setzero_ps()),
                (_, OffsetAggregation::Mean) => dots_all(kz.as_ptr(), &mean_w, d_chunks, &mut trig[..group]),
                (_, OffsetAggregation::Max) => {
                    for (i, offsets) in offset_w.chunks(vectors).enumerate() {
                        dots_all(kz.as_ptr(), offsets, d_chunks, &mut per_offset);
                        // `if t > best { best = t }` per row, in offset order: NaN never
                        // replaces the best.
                        let mut best = _mm256_set1_ps(f32::NEG_INFINITY);
                        for &t in &per_offset {
                            best = _mm256_blendv_ps(best, t, _mm256_cmp_ps::<_CMP_GT_OQ>(t, best));
                        }
                        trig[i] = best;
                    }
                }
            }
            for (i, o) in out.iter_mut().enumerate() {
                store_block(&mut o[r0..r0 + live], _mm256_add_ps(trig[i], e[i]));
            }
            r0 += BLOCK;
        }
    }
}

/// The CPU scoring kernels. All three perform the same IEEE operations in the same order
/// (8-lane partial sums, no fused multiply-add), so their results are bit-identical;
/// [`ScoreKernel::best`] is the default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScoreKernel {
    /// Plain Rust, any CPU.
    Portable,
    /// AVX2 and F16C, eight rows at a time (x86-64, head_dim a multiple of 16).
    Avx2,
    /// AVX-512F and DQ, two rows per register (x86-64, head_dim a multiple of 16).
    Avx512,
}

impl ScoreKernel {
    /// `portable`, `avx2` or `avx512`.
    pub fn name(self) -> &'static str {
        match self {
            ScoreKernel::Portable => "portable",
            ScoreKernel::Avx2 => "avx2",
            ScoreKernel::Avx512 => "avx512",
        }
    }

    /// Whether this CPU runs the kernel for `head_dim`.
    pub fn supports(self, head_dim: usize) -> bool {
        match self {
            ScoreKernel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            ScoreKernel::Avx2 => avx2::supports(head_dim),
            #[cfg(target_arch = "x86_64")]
            ScoreKernel::Avx512 => avx512::supports(head_dim),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The kernels this CPU runs for `head_dim`, fastest last.
    pub fn available(head_dim: usize) -> Vec<Self> {
        [ScoreKernel::Portable, ScoreKernel::Avx2, ScoreKernel::Avx512]
            .into_iter()
            .filter(|k| k.supports(head_dim))
            .collect()
    }

    /// The kernel rounds use: AVX2 where this CPU runs it, else portable. AVX-512 runs on
    /// request only: on the machine this crate is measured on (`docs/perf.md`) it is level with
    /// AVX2, though it issues fewer instructions per key.
    pub fn best(head_dim: usize) -> Self {
        if ScoreKernel::Avx2.supports(head_dim) {
            ScoreKernel::Avx2
        } else {
            ScoreKernel::Portable
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn score_rows_dispatch<T: Element>(
    kernel: ScoreKernel,
    weights: &RoundWeights,
    layer: usize,
    keys: &LayerView<'_, T>,
    style: PairingStyle,
    g: usize,
    first_row: usize,
    out: &mut [&mut [f32]],
) {
    match kernel {
        // SAFETY: `score_layer_with` checked that this CPU runs the kernel for this head_dim.
        // Each kernel performs the portable path's IEEE operations in the same order (no fused
        // multiply-add), so results do not depend on which one runs.
        #[cfg(target_arch = "x86_64")]
        ScoreKernel::Avx512 => unsafe { avx512::score_rows(weights, layer, keys, style, g, first_row, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        ScoreKernel::Avx2 => unsafe { avx2::score_rows(weights, layer, keys, style, g, first_row, out) },
        _ => score_rows(weights, layer, keys, style, g, first_row, out),
    }
}

/// The argument checks of every backend's `score_layer`: keys fit the weights, `layer` exists,
/// `out` holds `H x N` scores.
///
/// # Errors
/// `ShapeMismatch` or `InvalidArgument` naming the argument, expected and got.
pub(crate) fn check_layer_args<T: Element>(
    weights: &RoundWeights,
    layer: usize,
    keys: &LayerView<'_, T>,
    out: &[f32],
) -> Result<()> {
    let (h, n) = (weights.num_heads, keys.len);
    if keys.dim != weights.head_dim {
        return Err(Error::shape("keys head_dim", weights.head_dim, keys.dim));
    }
    if keys.num_kv_heads == 0 || h % keys.num_kv_heads != 0 {
        return Err(Error::shape(
            "keys KV heads",
            format!("a divisor of the statistics' {h} attention heads"),
            keys.num_kv_heads,
        ));
    }
    if layer >= weights.num_layers {
        return Err(Error::invalid_argument("layer", format!("< {}", weights.num_layers), layer));
    }
    if out.len() != h * n {
        return Err(Error::shape("raw score buffer", format!("{h} x {n} = {}", h * n), out.len()));
    }
    Ok(())
}

/// `Unsupported` unless this CPU runs `kernel` for `head_dim`.
fn check_kernel(kernel: ScoreKernel, head_dim: usize) -> Result<()> {
    if kernel.supports(head_dim) {
        return Ok(());
    }
    Err(Error::unsupported(format!(
        "CPU score kernel {}: expected one this CPU runs for head_dim {head_dim} ({:?}), got {}",
        kernel.name(),
        ScoreKernel::available(head_dim).iter().map(|k| k.name()).collect::<Vec<_>>(),
        kernel.name()
    )))
}

/// Raw scores of one layer: `out[h * N + n]` for every attention head `h` and slot `n`.
///
/// # Errors
/// `ShapeMismatch` if `keys` or `out` do not match the weights' heads and head_dim.
pub fn score_layer<T: Element>(
    weights: &RoundWeights,
    layer: usize,
    keys: &LayerView<'_, T>,
    style: PairingStyle,
    out: &mut [f32],
) -> Result<()> {
    score_layer_with(ScoreKernel::best(weights.head_dim), weights, layer, keys, style, out)
}

/// [`score_layer`] on a chosen kernel (bit-identical to every other).
///
/// # Errors
/// As [`score_layer`]; `Unsupported` for a kernel this CPU does not run for the head_dim.
pub fn score_layer_with<T: Element>(
    kernel: ScoreKernel,
    weights: &RoundWeights,
    layer: usize,
    keys: &LayerView<'_, T>,
    style: PairingStyle,
    out: &mut [f32],
) -> Result<()> {
    check_kernel(kernel, weights.head_dim)?;
    check_layer_args(weights, layer, keys, out)?;
    let mut tasks = Vec::new();
    push_tasks(&mut tasks, layer, keys, weights.num_heads, out);
    run_tasks(kernel, weights, style, tasks);
    Ok(())
}

/// Raw scores of every layer, `out[l][h * N + n]` as [`score_layer`] per layer, in one parallel
/// region (a fork and join per round, not per layer).
///
/// # Errors
/// As [`score_layer`]; `ShapeMismatch` if `out` does not have one buffer per view.
pub fn score_layers<T: Element>(
    weights: &RoundWeights,
    keys: &[LayerView<'_, T>],
    style: PairingStyle,
    out: &mut [Vec<f32>],
) -> Result<()> {
    score_layers_with(ScoreKernel::best(weights.head_dim), weights, keys, style, out)
}

/// [`score_layers`] on a chosen kernel (bit-identical to every other).
///
/// # Errors
/// As [`score_layer_with`]; `ShapeMismatch` if `out` does not have one buffer per view.
pub fn score_layers_with<T: Element>(
    kernel: ScoreKernel,
    weights: &RoundWeights,
    keys: &[LayerView<'_, T>],
    style: PairingStyle,
    out: &mut [Vec<f32>],
) -> Result<()> {
    check_kernel(kernel, weights.head_dim)?;
    if out.len() != keys.len() {
        return Err(Error::shape("raw score buffers", format!("{} (one per layer view)", keys.len()), out.len()));
    }
    for (layer, (k, o)) in keys.iter().zip(out.iter()).enumerate() {
        check_layer_args(weights, layer, k, o)?;
    }
    let mut tasks = Vec::new();
    for (layer, (k, o)) in keys.iter().zip(out.iter_mut()).enumerate() {
        push_tasks(&mut tasks, layer, k, weights.num_heads, o);
    }
    run_tasks(kernel, weights, style, tasks);
    Ok(())
}

/// One scoring task: the rows from `first` of KV head `g` of `keys` (layer `layer`), writing the
/// group's `G` head rows of that block.
struct Task<'k, 'o, T> {
    layer: usize,
    keys: &'k LayerView<'k, T>,
    g: usize,
    first: usize,
    parts: Vec<&'o mut [f32]>,
}

/// Split one layer's `[H, N]` output into tasks of (KV head, block of [`ROWS_PER_TASK`] rows).
fn push_tasks<'k, 'o, T: Element>(
    tasks: &mut Vec<Task<'k, 'o, T>>,
    layer: usize,
    keys: &'k LayerView<'k, T>,
    heads: usize,
    out: &'o mut [f32],
) {
    let n = keys.len;
    if n == 0 {
        return;
    }
    let group = heads / keys.num_kv_heads;
    for (g, block) in out.chunks_mut(group * n).enumerate() {
        let mut rows: Vec<std::slice::ChunksMut<'_, f32>> =
            block.chunks_mut(n).map(|row| row.chunks_mut(ROWS_PER_TASK)).collect();
        let mut first = 0;
        loop {
            let parts: Vec<&mut [f32]> = rows.iter_mut().filter_map(|it| it.next()).collect();
            if parts.len() < group {
                break;
            }
            let len = parts[0].len();
            tasks.push(Task { layer, keys, g, first, parts });
            first += len;
        }
    }
}

/// Run the tasks in parallel.
fn run_tasks<T: Element>(
    kernel: ScoreKernel,
    weights: &RoundWeights,
    style: PairingStyle,
    tasks: Vec<Task<'_, '_, T>>,
) {
    tasks.into_par_iter().for_each(|mut t| {
        score_rows_dispatch(kernel, weights, t.layer, t.keys, style, t.g, t.first, &mut t.parts);
    });
}
