//! # triattn — TriAttention KV-cache compression
//!
//! Long reasoning makes the KV cache the bottleneck. TriAttention (Mao et al., arXiv:2604.04921)
//! scores every cached key from offline per-head query statistics and the RoPE frequencies —
//! the attention logit of the mean query placed at a few future positions, plus a norm term — and
//! keeps each KV head's `budget` best tokens. This crate is that algorithm as a library: the CPU
//! backend here is the specification (`shared/ALGORITHM.md` of the project), and the GPU kernels
//! are checked against it.
//!
//! A round, in stages (see [`round`]): **score** every key with per-round weights built in f64
//! ([`score`], [`cpu::score`]), **normalize** each (layer, head) row ([`cpu::normalize`]),
//! **reduce** over query heads and layers ([`cpu::reduce`]), **select** the kept slots with a
//! deterministic top-k ([`cpu::select`]), **compact** K and V ([`cpu::compact`]).
//! [`Compressor`] owns the policy ([`policy`]: presets `paper` and `vllm`, triggers, budgets,
//! protection) and per-sequence state, and runs its rounds on any [`Backend`] with the same calls:
//! the CPU, or every stage on the kernels (`emu`, or a GPU with feature `cuda`). Engines with
//! device-resident caches plan a round once per shape ([`cuda::RoundPlan`]: workspace sizing,
//! contiguous or paged caches) and then only launch on their stream.
//!
//! What an engine uses:
//!
//! | where | what |
//! |---|---|
//! | the crate root | [`Compressor`] (policy, per-sequence [`SequenceState`], rounds over a [`KvCache`], batches of [`BatchItem`]s), [`CompressionConfig`] and its [`Preset`]s, [`ModelConfig`] (a Hugging Face `config.json`: heads, head_dim, RoPE frequencies and scaling in f64), [`Stats`], [`Scorer`], [`Backend`], [`Error`] |
//! | [`cuda`] | device rounds: [`cuda::RoundPlan`] (plan once per cache shape, then only launch; contiguous or paged caches, compaction, positions) and, with feature `cuda`, the GPU runtime ([`cuda::CudaDevice`], [`cuda::DeviceRound`]) |
//! | [`ffi`] | the C ABI (`include/triattn.h`): contexts, compressors, plans, bindings |
//! | [`policy`], [`score`] | every knob of a round: selection modes, normalisation, protection, triggers, outcomes; the score's terms and offsets |
//! | [`stats`], [`io`] | statistics files (native safetensors, the official `.pt` reader, calibration), validated safetensors reading and atomic writing |
//! | [`decode`] | sparse decode attention over each KV head's kept slots (virtual eviction): list layouts and options |
//! | [`round`], [`cpu`] | one round as stages on any backend; the CPU backend's stages for custom pipelines |
//! | [`tuning`] | tuning tables (per-arch choices among interchangeable kernel variants) and the dispatch that reads them |
//! | [`kernels`] | the kernel-level layer under the plans: launch specs, params, the variant table, the emu launchers |
//!
//! ## Example
//!
//! ```
//! use triattn::{CompressionConfig, Compressor, KvCache, ModelConfig, SequenceState, Stats};
//! use triattn::round::Scorer;
//!
//! # fn main() -> triattn::Result<()> {
//! // Qwen3-8B and its statistics (shipped in data/, Apache-2.0, from the TriAttention authors).
//! let model = ModelConfig::from_file("data/qwen3_8b.config.json")?;
//! let stats = Stats::load("data/qwen3_8b.safetensors")?;
//! let config = CompressionConfig { budget: 64, divide_length: 16, ..CompressionConfig::default() };
//! let compressor = Compressor::new(config, Scorer::new(model.clone(), stats, None)?)?;
//!
//! let (l, hkv, d) = (model.num_layers, model.num_kv_heads, model.head_dim);
//! let mut cache = KvCache::<half::bf16>::new(l, hkv, d, d, 64 + 16);
//! let mut seq = SequenceState::new(l, hkv, 8); // an 8-token prompt
//! let mut rounds = 0;
//! for t in 0..200u32 {
//!     let key: Vec<half::bf16> = (0..l * hkv * d).map(|i| half::bf16::from_f32(((i as u32 * 7 + t * 13) % 17) as f32 - 8.0)).collect();
//!     cache.push(&key, &key)?;
//!     seq.advance(1);
//!     if t >= 8 && compressor.round_due(&seq, 0) {
//!         compressor.compress(&mut cache, &mut seq)?;
//!         rounds += 1;
//!     }
//! }
//! assert!(rounds > 0 && cache.len <= 64 + 16);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod batch;
mod cache;
mod compressor;
pub mod cpu;
pub mod cuda;
pub mod decode;
mod dtype;
#[cfg(feature = "emu")]
mod emu;
mod error;
pub mod ffi;
pub mod io;
pub mod kernels;
mod model;
pub mod policy;
pub mod round;
pub mod score;
pub mod shard;
pub mod stats;
pub mod tuning;
mod variant;

pub use batch::BatchItem;
pub use cache::{KvCache, LayerView};
pub use compressor::{evict, Compressor, RoundReport, SequenceState};
pub use dtype::{DType, Element};
pub use error::{Error, ErrorKind, Result};
pub use model::{ModelConfig, PairingStyle, RopeScaling};
pub use policy::{CompressionConfig, Preset, RoundOutcome, SelectionMode};
pub use round::{Backend, RoundResult, Scorer};
pub use stats::Stats;
