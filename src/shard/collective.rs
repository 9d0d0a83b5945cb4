//! The exposed buffers' encodings and an in-process all-reduce that stands in for the engine's
//! collective (the CLI's `--tp-size` / `--pp-size` and the tests).

use super::{ReduceOp, ReductionBuffer, ReductionData};
use crate::error::{Error, Result};

/// The order-preserving key of `x`: for numbers, `a < b` exactly when `max_key(a) <
/// max_key(b)` (`-0 < +0`), and every NaN maps to `i32::MAX`, above every number. The integer
/// max of keys is therefore the NaN-propagating max of the values.
#[inline]
pub fn max_key(x: f32) -> i32 {
    if x.is_nan() {
        return i32::MAX;
    }
    let bits = x.to_bits() as i32;
    // Negative floats order backwards in their bits: flip the magnitude.
    if bits < 0 {
        bits ^ i32::MAX
    } else {
        bits
    }
}

/// The value of a key made by [`max_key`] (NaN for `i32::MAX`).
#[inline]
pub fn key_to_max(key: i32) -> f32 {
    if key == i32::MAX {
        return f32::NAN;
    }
    let bits = if key < 0 { key ^ i32::MAX } else { key };
    f32::from_bits(bits as u32)
}

/// All-reduce the buffers of one collective, one per participating rank, in place: every
/// buffer ends with the element-wise max (keys) or sum (f64, added in the order given).
///
/// # Errors
/// `InvalidArgument` when the buffers are not of one reduction (kind, length, ranks).
pub fn all_reduce_in_process(buffers: &mut [ReductionBuffer<'_>]) -> Result<()> {
    let Some(first) = buffers.first() else { return Ok(()) };
    let reduction = first.reduction.clone();
    if buffers.len() != reduction.ranks.len() {
        return Err(Error::invalid_argument(
            format!("{} buffers", reduction.kind.name()),
            format!("one per rank of {:?}", reduction.ranks),
            buffers.len(),
        ));
    }
    for b in buffers.iter() {
        if b.reduction != reduction {
            return Err(Error::invalid_argument(
                "all-reduce",
                format!("buffers of one reduction ({reduction:?})"),
                format!("{:?} on rank {}", b.reduction, b.rank),
            ));
        }
    }
    match reduction.kind.op() {
        ReduceOp::Max => {
            let mut acc = vec![i32::MIN; reduction.len];
            for b in buffers.iter() {
                if let ReductionData::MaxKeys(keys) = &b.data {
                    acc.iter_mut().zip(keys.iter()).for_each(|(a, &k)| *a = (*a).max(k));
                }
            }
            for b in buffers.iter_mut() {
                if let ReductionData::MaxKeys(keys) = &mut b.data {
                    keys.copy_from_slice(&acc);
                }
            }
        }
        ReduceOp::Sum => {
            let mut acc = vec![0f64; reduction.len];
            for (i, b) in buffers.iter().enumerate() {
                if let ReductionData::Sums(sums) = &b.data {
                    if i == 0 {
                        acc.copy_from_slice(sums);
                    } else {
                        acc.iter_mut().zip(sums.iter()).for_each(|(a, &s)| *a += s);
                    }
                }
            }
            for b in buffers.iter_mut() {
                if let ReductionData::Sums(sums) = &mut b.data {
                    sums.copy_from_slice(&acc);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_order_like_the_values_and_round_trip() {
        let values = [f32::NEG_INFINITY, -3.4e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 2.5, 3.4e38, f32::INFINITY];
        for w in values.windows(2) {
            assert!(max_key(w[0]) < max_key(w[1]), "{} vs {}", w[0], w[1]);
        }
        for &v in &values {
            assert_eq!(key_to_max(max_key(v)).to_bits(), v.to_bits());
        }
        assert!(max_key(f32::NAN) > max_key(f32::INFINITY));
        assert!(key_to_max(max_key(-f32::NAN)).is_nan());
    }
}
