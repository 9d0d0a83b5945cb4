//! Rounds on the kernel path, planned once per shape: [`RoundPlan`] validates a cache shape
//! (contiguous or paged, compaction, positions) and lays out a workspace; a run only launches,
//! on any [`Launcher`]. Planning is host code and exists in every build (an engine can plan a
//! round and size its workspace anywhere); the GPU runtime ([`CudaDevice`], [`CudaBackend`],
//! [`DeviceRound`]) needs the `cuda` feature. Rounds over host buffers run on any kernel backend
//! through the [`Backend`](crate::Backend) methods (`round_keys`, `round_in_place`, ...),
//! returning a [`HostRound`].
//!
//! The kernel-level layer under the plans (launch specs, params mirrored from
//! `cuda/common/params.cuh`, the variant table, the emu launchers) is [`crate::kernels`].

pub(crate) mod calibrate;
pub(crate) mod compact;
pub(crate) mod decode;
#[cfg(feature = "cuda")]
mod device_round;
#[cfg(any(feature = "emu", feature = "cuda"))]
pub(crate) mod host_round;
pub(crate) mod normalize;
pub(crate) mod params;
pub(crate) mod plan;
pub(crate) mod reduce;
#[cfg(feature = "cuda")]
pub(crate) mod runtime;
pub(crate) mod select;
pub(crate) mod spec;

pub use crate::variant::CompactMode;
pub use compact::{PositionType, RowStrides};
pub use decode::{
    DecodeAddresses, DecodeCache, DecodePlan, DecodeRun, DecodeShape, DecodeSpec, ListLengths, SplitPolicy,
};
#[cfg(feature = "cuda")]
pub use device_round::{CudaDevice, DeviceRound, StreamLauncher, TimedLauncher};
#[cfg(any(feature = "emu", feature = "cuda"))]
pub use host_round::{DecodeInputs, HostDecode, HostRound, RankTensors};
pub use plan::{
    check_workspace_address, CacheAddresses, CacheLayout, Compaction, Launcher, Region, RoundAddresses, RoundOutputs,
    RoundPlan, RoundShape, Stage, StageTimings, WorkspaceLayout, ROW_ALIGN, WORKSPACE_ALIGN,
};
#[cfg(feature = "cuda")]
pub use runtime::CudaBackend;
pub use spec::PageOrder;
