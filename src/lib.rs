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
