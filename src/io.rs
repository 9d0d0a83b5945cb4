//! Safetensors files: validated reading into owned tensors, and atomic writing.
//!
//! Reading checks everything a hostile or truncated file could get wrong (header length, JSON,
//! offsets, dtype sizes) before any value is used; every error names the file. Writing goes to a
//! temporary file in the destination directory and is renamed over the target only once complete,
//! so a failed command never leaves a partial output behind.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::tensor::{Dtype as StDtype, TensorView};

use crate::dtype::DType;
use crate::error::{Error, Result};

/// Largest safetensors header we accept (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element type of a tensor in a file (a superset of [`DType`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileDType {
    /// A key/value dtype.
    Float(DType),
    /// 32-bit signed integer.
    I32,
    /// 64-bit signed integer.
    I64,
    /// Unsigned byte.
    U8,
    /// Any other safetensors dtype (named for error messages).
    Other(&'static str),
}

impl FileDType {
    fn from_st(d: StDtype) -> Self {
        match d {
            StDtype::F32 => FileDType::Float(DType::F32),
            StDtype::F16 => FileDType::Float(DType::F16),
            StDtype::BF16 => FileDType::Float(DType::Bf16),
            StDtype::I32 => FileDType::I32,
            StDtype::I64 => FileDType::I64,
            StDtype::U8 => FileDType::U8,
            StDtype::F64 => FileDType::Other("F64"),
            StDtype::I8 => FileDType::Other("I8"),
            StDtype::I16 => FileDType::Other("I16"),
            StDtype::U16 => FileDType::Other("U16"),
            StDtype::U32 => FileDType::Other("U32"),
            StDtype::U64 => FileDType::Other("U64"),
            StDtype::BOOL => FileDType::Other("BOOL"),
            _ => FileDType::Other("unknown"),
        }
    }

    fn to_st(self) -> StDtype {
        match self {
            FileDType::Float(DType::F32) => StDtype::F32,
            FileDType::Float(DType::F16) => StDtype::F16,
            FileDType::Float(DType::Bf16) => StDtype::BF16,
            FileDType::I32 => StDtype::I32,
            FileDType::I64 => StDtype::I64,
            FileDType::U8 => StDtype::U8,
            FileDType::Other(name) => unreachable!("tensors of dtype {name} are never written"),
        }
    }
}

impl std::fmt::Display for FileDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileDType::Float(DType::F32) => f.write_str("F32"),
            FileDType::Float(DType::F16) => f.write_str("F16"),
            FileDType::Float(DType::Bf16) => f.write_str("BF16"),
            FileDType::I32 => f.write_str("I32"),
            FileDType::I64 => f.write_str("I64"),
            FileDType::U8 => f.write_str("U8"),
            FileDType::Other(n) => f.write_str(n),
        }
    }
}

/// One tensor read from a file: dtype, shape and little-endian bytes.
#[derive(Clone, Debug)]
pub struct Tensor {
    /// Element type.
    pub dtype: FileDType,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Raw little-endian bytes, `numel * dtype size` long.
    pub data: Vec<u8>,
}

/// Format a shape as `[a, b, c]`.
pub fn shape_str(shape: &[usize]) -> String {
    format!("{shape:?}")
}

impl Tensor {
    /// An f32 tensor.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Self { dtype: FileDType::Float(DType::F32), shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    /// An i32 tensor.
    pub fn from_i32(shape: Vec<usize>, values: &[i32]) -> Self {
        Self { dtype: FileDType::I32, shape, data: values.iter().flat_map(|v| v.to_le_bytes()).collect() }
    }

    /// A u8 tensor.
    pub fn from_u8(shape: Vec<usize>, values: &[u8]) -> Self {
        Self { dtype: FileDType::U8, shape, data: values.to_vec() }
    }

    /// A tensor of key/value dtype from raw little-endian bytes.
    pub fn from_raw(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Self {
        Self { dtype: FileDType::Float(dtype), shape, data }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Values widened to f32 (f32, f16 or bf16 tensors).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self.dtype {
            FileDType::Float(DType::F32) => {
                self.data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
            }
            FileDType::Float(DType::F16) => {
                self.data.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            FileDType::Float(DType::Bf16) => {
                self.data.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            other => unreachable!("to_f32_vec on a {other} tensor (callers check the dtype first)"),
        }
    }

    /// Values as i64 (I32 or I64 tensors).
    pub fn to_i64_vec(&self) -> Vec<i64> {
        match self.dtype {
            FileDType::I32 => {
                self.data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()
            }
            FileDType::I64 => self.data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect(),
            other => unreachable!("to_i64_vec on a {other} tensor (callers check the dtype first)"),
        }
    }
}

/// A safetensors file read into memory: its tensors and its `__metadata__`.
#[derive(Clone, Debug, Default)]
pub struct TensorFile {
    /// Where it came from (for messages); empty for files built in memory.
    pub path: PathBuf,
    /// Tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
    /// String metadata.
    pub metadata: BTreeMap<String, String>,
}

impl TensorFile {
    /// Read and validate a safetensors file.
    ///
    /// # Errors
    /// `Io` if it cannot be read; `InvalidFormat` naming the file if it is truncated, has an
    /// absurd header length, a header that is not JSON, or offsets that do not fit.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes).map_err(|e| e.context(path.display())).map(|mut f| {
            f.path = path.to_path_buf();
            f
        })
    }

    /// Parse safetensors bytes.
    ///
    /// # Errors
    /// `InvalidFormat` describing the first problem found.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < 8 {
            return Err(Error::format(format!(
                "not a safetensors file: expected at least 8 bytes (header length), got {}",
                bytes.len()
            )));
        }
        let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        if header_len > MAX_HEADER_BYTES || header_len > (bytes.len() as u64 - 8) {
            return Err(Error::format(format!(
                "not a safetensors file: header length {header_len} exceeds the file ({} bytes after the length field)",
                bytes.len() - 8
            )));
        }
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::format(format!("not a valid safetensors file: {e:?}")))?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::format(format!("not a valid safetensors file: {e:?}")))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dtype = FileDType::from_st(view.dtype());
            tensors.insert(name, Tensor { dtype, shape: view.shape().to_vec(), data: view.data().to_vec() });
        }
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(Self { path: PathBuf::new(), tensors, metadata })
    }

    fn label(&self) -> String {
        match self.path.file_name() {
            Some(n) => n.to_string_lossy().into_owned(),
            None => "<memory>".to_string(),
        }
    }

    /// The tensor `name`, or an error naming the file and the tensor.
    ///
    /// # Errors
    /// `InvalidFormat` if it is absent.
    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).ok_or_else(|| Error::format(format!("{}: tensor {name} is missing", self.label())))
    }

    /// The tensor `name`, checked to have one of `dtypes` and exactly `shape`.
    ///
    /// # Errors
    /// `InvalidFormat` if absent, `ShapeMismatch` naming file, tensor, expected and got otherwise.
    pub fn get_checked(&self, name: &str, dtypes: &[FileDType], shape: &[usize]) -> Result<&Tensor> {
        let t = self.get(name)?;
        if !dtypes.contains(&t.dtype) {
            let expected: Vec<String> = dtypes.iter().map(|d| d.to_string()).collect();
            return Err(Error::shape(format!("{}: tensor {name} dtype", self.label()), expected.join(" or "), t.dtype));
        }
        if t.shape != shape {
            return Err(Error::shape(
                format!("{}: tensor {name} shape", self.label()),
                shape_str(shape),
                shape_str(&t.shape),
            ));
        }
        Ok(t)
    }

    /// Metadata value `key`, if present.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.get(key).map(String::as_str)
    }

    /// Metadata value `key` parsed as an integer, if present.
    ///
    /// # Errors
    /// `InvalidFormat` naming the key if present but not a non-negative integer.
    pub fn meta_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.meta(key) {
            None => Ok(None),
            Some(v) => v.trim().parse::<usize>().map(Some).map_err(|_| {
                Error::format(format!("{}: metadata {key}: expected a non-negative integer, got {v:?}", self.label()))
            }),
        }
    }

    /// Serialise to safetensors bytes (tensors in name order).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let views: Vec<(String, TensorView<'_>)> = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let v = TensorView::new(t.dtype.to_st(), t.shape.clone(), &t.data)
                    .map_err(|e| Error::format(format!("tensor {n}: {e:?}")))?;
                Ok((n.clone(), v))
            })
            .collect::<Result<_>>()?;
        let meta: Option<std::collections::HashMap<String, String>> =
            if self.metadata.is_empty() { None } else { Some(self.metadata.clone().into_iter().collect()) };
        safetensors::serialize(views, &meta).map_err(|e| Error::format(format!("serialising safetensors: {e:?}")))
    }

    /// Write atomically to `path` (temporary file + rename).
    ///
    /// # Errors
    /// `Io` naming the path.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        write_atomic(path.as_ref(), &self.to_bytes()?)
    }
}

/// Write `bytes` to `path` through a temporary file in the same directory, renamed on success.
///
/// # Errors
/// `Io` naming the path; the temporary file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_with_metadata() {
        let mut f = TensorFile::default();
        f.tensors.insert("a".into(), Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]));
        f.metadata.insert("k".into(), "v".into());
        let g = TensorFile::parse(&f.to_bytes().unwrap()).unwrap();
        assert_eq!(g.get("a").unwrap().to_f32_vec(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(g.meta("k"), Some("v"));
    }

    #[test]
    fn absurd_header_length_is_an_error_not_a_panic() {
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = TensorFile::parse(&bytes).unwrap_err();
        assert!(e.to_string().contains("header length"), "{e}");
        assert!(TensorFile::parse(b"abc").is_err());
        assert!(TensorFile::parse(&[2, 0, 0, 0, 0, 0, 0, 0, b'x', b'y']).is_err());
    }
}
