// normalize.cuh: z-score finalisation of raw score rows from the scorer's tile partials.
//
// Computes:  for every row r (one (sequence, layer, head)), the count, mean and M2 of its z-score
//            candidates combined from partials[r, 0..num_tiles) in f64, in tile order (Chan et
//            al., exactly RowPartial::combine in src/cuda/params.rs; empty tiles skipped), the
//            divisor of the flavour (ALGORITHM.md section 3.1, src/cpu/normalize.rs):
//              population (0): max(sqrt(M2 / count), 1e-6)
//              unbiased   (1): sqrt(M2 / (count - 1)) (0 when count <= 1); 1 when < 1e-8 or not
//                              finite
//            (count 0: mean 0, divisor 1), then out[r, n] = f32((f64(raw[r, n]) - mean) / divisor)
//            for every slot n < len. The candidate set is whatever the scorer counted: slots in
//            [stat_start, stat_end) (the paper preset's non-prompt slots, or all slots), NaN
//            scores left out, as src/cpu/normalize.rs row_moments.
// Mapping:   grid = (num_rows); thread 0 combines the row's partials into shared memory, then
//            the block normalises the row, slots strided by NT (coalesced). out may equal raw.
// Shared memory: static, 2 doubles.
// Host guarantees (NormalizeSpec): 1 <= len, 1 <= num_tiles, flavour in {0, 1}, strides cover
//            the rows, partials hold num_rows * num_tiles entries.
// Numerics:  bit-identical to moments_from_partials (src/cuda/normalize.rs) on the host: every
//            product is divided before it is added, so nvcc has no multiply-add to contract (the
//            SASS is the same with --fmad=false), and f64 division and sqrt are correctly rounded.
//            Against cpu::normalize it differs by the f32 rounding of the tile partials
//            (tests/kernels/cuda_stages.rs NORMALIZE_TOL).
// Knobs:     NT.
#pragma once
#include "../common/arch.cuh"
#include "../common/params.cuh"

namespace tri {

template <int NT>
TRI_DEVICE void normalize_rows(const tri_normalize_params& p) {
  TRI_SHARED(double, moments, [2]);  // mean, divisor
  const int64_t row = blockIdx.x;
  if (threadIdx.x == 0) {
    const tri_row_partial* parts = p.partials + row * p.num_tiles;
    double count = 0.0, mean = 0.0, m2 = 0.0;
    for (int t = 0; t < p.num_tiles; ++t) {
      const tri_row_partial q = parts[t];
      if (!(q.count > 0.f)) continue;
      const double nb = (double)q.count, mb = (double)q.mean, m2b = (double)q.m2;
      const double total = count + nb;
      const double delta = mb - mean;
      mean += delta * nb / total;
      m2 += m2b + delta * delta * count * nb / total;
      count = total;
    }
    double divisor = 1.0;
    if (count == 0.0) {
      mean = 0.0;
    } else if (p.flavour == TRI_ZSCORE_POPULATION_FLOOR) {
      const double sd = sqrt(m2 / count);
      divisor = sd > 1e-6 ? sd : 1e-6;  // as f64::max: a NaN deviation gives the floor
    } else {
      const double sd = count > 1.0 ? sqrt(m2 / (count - 1.0)) : 0.0;
      const bool finite = sd == sd && sd - sd == 0.0;
      divisor = (sd < 1e-8 || !finite) ? 1.0 : sd;
    }
    moments[0] = mean;
    moments[1] = divisor;
  }
  sync_block();
  const double mean = moments[0], divisor = moments[1];
  const float* raw = p.raw + row * p.raw_stride;
  float* out = p.out + row * p.out_stride;
  for (int n = threadIdx.x; n < p.len; n += NT) out[n] = (float)(((double)raw[n] - mean) / divisor);
}

}  // namespace tri
