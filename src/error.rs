//! The crate's one error type.
//!
//! Every failure is an [`Error`]: a [`ErrorKind`] that callers (and the C ABI) can match on, and a
//! message that names the file, tensor or field at fault and says what was expected and what was
//! got, e.g. `stats.safetensors: tensor q_mean_real: expected shape [36, 32, 64], got [36, 32, 32]`.

use std::fmt;

/// What went wrong, coarsely; the message says the rest.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// An argument or option is outside its documented range.
    InvalidArgument,
    /// A model `config.json` is malformed or describes something unsupported.
    InvalidConfig,
    /// A file is not in the expected format (truncated, garbage, wrong header, missing tensor).
    InvalidFormat,
    /// A tensor has the wrong shape or dtype, or contradicts another input.
    ShapeMismatch,
    /// The input is valid but asks for something this build does not support.
    Unsupported,
    /// Reading or writing a file failed.
    Io,
    /// No CUDA driver or device could be opened.
    NoDevice,
    /// The crate was built without compiled kernels.
    KernelsUnavailable,
    /// A CUDA driver call failed.
    Driver,
}

/// The error type of every fallible function in this crate: an [`ErrorKind`] that callers (and
/// the C ABI) can match on, and a message that names the file, tensor or field at fault and says
/// what was expected and what was got, e.g. `stats.safetensors: tensor q_mean_real: expected
/// shape [36, 32, 64], got [36, 32, 32]`.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a complete message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self { kind, message: message.into(), source: None }
    }

    /// `<what>: expected <expected>, got <got>` for an argument outside its range.
    pub fn invalid_argument(what: impl fmt::Display, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidArgument, format!("{what}: expected {expected}, got {got}"))
    }

    /// `<what>: expected <expected>, got <got>` for a shape or dtype that does not fit.
    pub fn shape(what: impl fmt::Display, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Self::new(ErrorKind::ShapeMismatch, format!("{what}: expected {expected}, got {got}"))
    }

    /// `<what>: expected <expected>, got <got>` for a malformed model config.
    pub fn config(what: impl fmt::Display, expected: impl fmt::Display, got: impl fmt::Display) -> Self {
        Self::new(ErrorKind::InvalidConfig, format!("{what}: expected {expected}, got {got}"))
    }

    /// A malformed file or container.
    pub fn format(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidFormat, message)
    }

    /// Something valid that is not supported (yet).
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// An I/O failure on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, err: std::io::Error) -> Self {
        let message = format!("{}: {err}", path.as_ref().display());
        Self { kind: ErrorKind::Io, message, source: Some(Box::new(err)) }
    }

    /// Attach the underlying error (a driver or library error).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefix the message with the file or object it concerns: `<context>: <message>`.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The coarse kind, for matching.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The full message (also what `Display` prints).
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// `Ok(())` when `ok`, else an `InvalidArgument` error `<what>: expected <expected>, got <got>`:
/// the one-line checks of every `<Op>Spec`.
pub(crate) fn ensure(ok: bool, what: &str, expected: impl fmt::Display, got: impl fmt::Display) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(what, expected, got))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_names_field_expected_and_got() {
        let e = Error::invalid_argument("budget", ">= 1", 0).context("compress");
        assert_eq!(e.to_string(), "compress: budget: expected >= 1, got 0");
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn error_is_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Error>();
    }
}
