//! Calibration accumulator (filled in below).
