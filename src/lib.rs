//! TriAttention KV-cache compression.
#![warn(missing_docs)]

pub mod dtype;
pub mod error;
pub mod io;
pub mod model;
pub mod stats;

pub use dtype::{DType, Element};
pub use error::{Error, ErrorKind, Result};
pub use model::{ModelConfig, PairingStyle, RopeScaling};
pub use stats::Stats;
pub mod cache;
pub mod cpu;
pub mod policy;
pub mod round;
pub mod score;

pub use cache::LayerView;
pub use policy::{CompressionConfig, Preset, RoundOutcome, SelectionMode};
pub use round::{RoundResult, Scorer};
