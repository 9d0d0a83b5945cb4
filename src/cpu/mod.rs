//! The CPU backend: the specification of every stage, fast enough to serve.
//!
//! Plain loops over f32 with f64 where accuracy needs it, rayon across rows. Results on one
//! machine are bit-identical run after run: every row is computed by the same sequence of
//! operations whatever its position or the thread that runs it.

pub mod compact;
pub mod decode;
pub mod normalize;
pub mod reduce;
pub mod score;
pub mod select;
