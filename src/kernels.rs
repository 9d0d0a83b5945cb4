//! The kernel-level layer: what a round plan is made of, for custom pipelines, benchmarks and
//! the parity tests. Engines use [`crate::cuda::RoundPlan`] instead.
//!
//! - launch specs, one per op (`<Op>Spec`: validated on the host, with the grid, the params and
//!   the variant of its launch) and the addresses each launch reads (`<Op>Addresses`);
//! - the params structs, mirrored from `cuda/common/params.cuh` with size and offset checks;
//! - [`variant`]: the single table of compiled kernel variants and the ptxas report;
//! - [`emu`] (feature `emu`): every op launched on the CPU by the SIMT layer over host buffers;
//! - the GPU launchers are methods of [`crate::cuda::CudaBackend`] (`launch_*_raw`, feature
//!   `cuda`).

pub use crate::cuda::calibrate::{CalibrateAddresses, CalibrateSpec};
pub use crate::cuda::compact::{
    CompactAddresses, CompactLayout, CompactShape, CompactSpec, CompactTarget, PositionType, RowStrides,
};
pub use crate::cuda::normalize::{moments_from_partials, NormalizeAddresses, NormalizeSpec};
pub use crate::cuda::params::{
    CalibrateParams, CompactParams, CompactTensor, NormalizeParams, ReduceParams, ReduceShardParams, RowPartial,
    RowStats, ScoreParams, SelectParams, TrigParams,
};
pub use crate::cuda::reduce::{
    FinishFrom, ReduceAddresses, ReduceShardAddresses, ReduceShardSpec, ReduceSpec, ShardPart, ShardStep,
};
#[cfg(feature = "cuda")]
pub use crate::cuda::runtime::{ScoreBuffers, WeightsBuffer, FATBIN};
pub use crate::cuda::select::{
    SelectAddresses, SelectLaunch, SelectLaunches, SelectShape, SelectSpec, SELECT_CHUNK_LEN, SELECT_MAX_LEN,
    SELECT_MULTI_LAUNCHES, SELECT_SINGLE_MAX_LEN,
};
pub use crate::cuda::spec::{
    weight_image_len, weight_levels, weights_from_levels, KeyLayout, PageOrder, ScoreAddresses, ScoreShape, ScoreSpec,
    TrigAddresses, TrigSpec, WeightsScope, WEIGHT_LEVELS,
};

/// The single table of compiled kernel variants, and the report of what ptxas made of them.
pub mod variant {
    pub use crate::variant::*;
}

/// The emu backend's kernel launchers: every op run on the CPU by the SIMT layer over host
/// buffers (the CUDA sources compiled by the host C++ compiler).
#[cfg(feature = "emu")]
pub mod emu {
    pub use crate::emu::*;
}
