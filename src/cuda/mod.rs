//! The CUDA kernels' host side: params mirrored from `cuda/common/params.cuh`, validated launch
//! specs, and (feature `cuda`) the runtime that loads the embedded fatbin and launches on a
//! caller's stream.
//!
//! The params, specs and round plans are host code shared with the emu backend (`crate::emu`),
//! which runs the same kernel sources on the CPU through the same launch description, so they
//! exist in every build (an engine can plan a round and size its workspace anywhere); only
//! `runtime` and `device_round` need the `cuda` feature.

pub mod calibrate;
pub mod compact;
#[cfg(feature = "cuda")]
pub mod device_round;
#[cfg(any(feature = "emu", feature = "cuda"))]
pub(crate) mod host_round;
pub mod normalize;
pub mod params;
pub mod plan;
pub mod reduce;
#[cfg(feature = "cuda")]
pub mod runtime;
pub mod select;
pub mod spec;

pub use calibrate::{CalibrateAddresses, CalibrateSpec};
pub use compact::{
    CompactAddresses, CompactLayout, CompactShape, CompactSpec, CompactTarget, PositionType, RowStrides,
};
#[cfg(feature = "cuda")]
pub use device_round::{CudaDevice, DeviceRound, StreamLauncher, TimedLauncher};
#[cfg(any(feature = "emu", feature = "cuda"))]
pub use host_round::HostRound;
pub use normalize::{moments_from_partials, NormalizeAddresses, NormalizeSpec};
pub use params::{CalibrateParams, CompactParams, CompactTensor};
pub use params::{NormalizeParams, ReduceParams, RowPartial, RowStats, ScoreParams, SelectParams, TrigParams};
pub use plan::{
    check_workspace_address, CacheAddresses, CacheLayout, Compaction, Launcher, Region, RoundAddresses, RoundOutputs,
    RoundPlan, RoundShape, Stage, StageTimings, WorkspaceLayout, ROW_ALIGN, WORKSPACE_ALIGN,
};
pub use reduce::{ReduceAddresses, ReduceSpec};
#[cfg(feature = "cuda")]
pub use runtime::CudaBackend;
pub use select::{SelectAddresses, SelectShape, SelectSpec, SELECT_MAX_LEN};
pub use spec::{KeyLayout, PageOrder, ScoreAddresses, ScoreShape, ScoreSpec, TrigAddresses, TrigSpec, WeightsScope};
