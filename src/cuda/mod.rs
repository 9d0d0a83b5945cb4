//! The CUDA kernels' host side: params mirrored from `cuda/common/params.cuh`, validated launch
//! specs, and (feature `cuda`) the runtime that loads the embedded fatbin and launches on a
//! caller's stream.
//!
//! The params and specs are shared with the emu backend ([`crate::emu`]), which runs the same
//! kernel sources on the CPU through the same launch description, so this module exists when
//! either feature is on; only [`runtime`] needs the `cuda` feature.

pub mod params;
#[cfg(feature = "cuda")]
pub mod runtime;
pub mod spec;

pub use params::{RowPartial, RowStats, ScoreParams, TrigParams};
#[cfg(feature = "cuda")]
pub use runtime::CudaBackend;
pub use spec::{KeyLayout, PageOrder, ScoreAddresses, ScoreShape, ScoreSpec, TrigAddresses, TrigSpec, WeightsScope};
