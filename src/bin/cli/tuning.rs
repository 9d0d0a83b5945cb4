//! Tuning tables in the CLI: `--tuning` / `TRIATTN_TUNING` on the commands that plan kernels.

use std::path::Path;

use triattn::round::Backend;
use triattn::tuning::Dispatch;
use triattn::Result;

/// The tables a command's plans consult on `backend` ([`Dispatch::resolve`]); its warnings go to
/// stderr, one line each.
///
/// # Errors
/// A malformed explicit table, or one naming a variant this build does not compile.
pub(crate) fn dispatch_for(backend: &Backend, explicit: Option<&Path>) -> Result<Dispatch> {
    let (dispatch, warnings) = Dispatch::resolve(backend, explicit)?;
    for w in warnings {
        eprintln!("warning: {w}");
    }
    Ok(dispatch)
}
