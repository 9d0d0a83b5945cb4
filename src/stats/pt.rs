//! Reader of the official `torch.save` statistics files (ALGORITHM.md §5.3), without PyTorch and
//! without ever executing pickle code.
//!
//! A `.pt` file is a zip archive with one top-level folder holding `data.pkl` (a pickle of
//! `{"metadata": {...}, "stats": {"layerLL_headHH": {q_mean_real, q_mean_imag, q_abs_mean}}}`),
//! one `data/<key>` entry per tensor storage, and optionally `byteorder` (must say `little`).
//!
//! The pickle is run by a small restricted virtual machine that knows only the opcodes these files
//! use (listed in `shared/data/official/README.md`) and only three kinds of callables:
//! `collections.OrderedDict` (called with no arguments), `torch._utils._rebuild_tensor_v2` and the
//! `torch.<X>Storage` classes named by persistent ids `('storage', <X>Storage, key, location,
//! numel)`. Every other opcode or global is refused with an error naming it and its offset. All
//! sizes (strings, stack, memo, objects, entries) are bounded, so garbage input yields an error,
//! never a panic or an absurd allocation.
//!
//! The result is converted into [`Stats`] with every float32 value bit-identical to the source.

use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::Path;
use std::rc::Rc;

use serde_json::Value as Json;
use zip::ZipArchive;

use crate::error::{Error, ErrorKind, Result};
use crate::model::PairingStyle;
use crate::stats::Stats;

/// Largest `data.pkl` accepted (the official files hold well under 1 MB).
const MAX_PICKLE_BYTES: u64 = 64 << 20;
/// Largest single storage entry accepted.
const MAX_STORAGE_BYTES: u64 = 1 << 30;
/// Largest total of storage bytes read from one archive.
const MAX_TOTAL_STORAGE_BYTES: u64 = 1 << 30;
/// Most values on the pickle stack at once.
const MAX_STACK: usize = 1 << 20;
/// Most nested MARKs at once.
const MAX_MARKS: usize = 1 << 16;
/// Most objects (strings, containers, tensors, ...) one pickle may create.
const MAX_OBJECTS: usize = 1 << 22;
/// Most container insertions (list/tuple items, dict entries) in one pickle.
const MAX_ITEMS: usize = 1 << 22;
/// Longest `module` or `name` line of a GLOBAL opcode.
const MAX_GLOBAL_LINE: usize = 256;
/// Deepest nesting converted to JSON metadata.
const MAX_JSON_DEPTH: usize = 64;
/// Most JSON nodes produced for one metadata value.
const MAX_JSON_NODES: usize = 1 << 20;
/// Most dimensions of a rebuilt tensor.
const MAX_TENSOR_DIMS: usize = 16;

/// Read an official statistics file (`torch.save` zip archive) into [`Stats`].
///
/// The metadata keys other than `rope_style`, `head_dim` and `sampled_heads` are copied as
/// strings (strings as they are, numbers and booleans as JSON text, nested values such as
/// `rope_scaling` as compact JSON); `source` is set to the file name.
///
/// # Errors
/// `Io` if the file cannot be read; `InvalidFormat`, `ShapeMismatch` or `Unsupported` naming the
/// file, the archive entry or the field otherwise (see [`parse_official`]).
pub fn read_official(path: impl AsRef<Path>) -> Result<Stats> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut stats = parse_official(&bytes).map_err(|e| e.context(path.display()))?;
    if let Some(name) = path.file_name() {
        stats.metadata.insert("source".into(), name.to_string_lossy().into_owned());
    }
    Ok(stats)
}

/// Parse the bytes of an official statistics file into [`Stats`].
///
/// Layers and heads are the largest indices found in `sampled_heads` and in the `stats` keys,
/// plus one; every (layer, head) must have statistics (partial statistics are refused for now).
///
/// # Errors
/// `InvalidFormat` for a malformed archive, a malformed or forbidden pickle (naming the opcode and
/// its offset) or a missing entry; `ShapeMismatch` for tensors of the wrong length; `Unsupported`
/// for valid but unsupported content (non-float32 statistics, big-endian data, missing heads).
pub fn parse_official(bytes: &[u8]) -> Result<Stats> {
    let mut archive = Archive::open(bytes)?;
    let pickle = archive.read_pickle()?;
    let pickle_name = format!("{}data.pkl", archive.prefix);
    let mut vm = Vm::new(&pickle);
    let root = vm.run().map_err(|e| e.context(&pickle_name))?;
    let objects = vm.objects;
    Converter { objects: &objects, archive: &mut archive }.stats(root)
}

// ---------------------------------------------------------------------------------------------
// Zip archive

struct Archive<'a> {
    zip: ZipArchive<Cursor<&'a [u8]>>,
    /// The top-level folder, with its trailing `/`.
    prefix: String,
    /// Storage bytes already read, by key.
    storages: HashMap<String, Rc<Vec<u8>>>,
    total_storage_bytes: u64,
}

/// A zip error's text, including the underlying I/O error (which `Display` leaves out).
fn zip_text(e: &zip::result::ZipError) -> String {
    match e {
        zip::result::ZipError::Io(io) => format!("i/o error: {io}"),
        other => other.to_string(),
    }
}

fn zip_error(what: &str, e: zip::result::ZipError) -> Error {
    Error::format(format!("{what}: {}", zip_text(&e))).with_source(e)
}

impl<'a> Archive<'a> {
    fn open(bytes: &'a [u8]) -> Result<Self> {
        let zip = ZipArchive::new(Cursor::new(bytes)).map_err(|e| {
            let hint = if bytes.first() == Some(&0x80) {
                " (this looks like the legacy pre-1.6 torch.save format, which is not supported)"
            } else {
                ""
            };
            Error::format(format!("not a torch.save zip archive{hint}: {}", zip_text(&e))).with_source(e)
        })?;
        let candidates: Vec<&str> = zip
            .file_names()
            .filter(|n| {
                n.strip_suffix("data.pkl").is_some_and(|p| p.ends_with('/') && p.find('/') == Some(p.len() - 1))
            })
            .collect();
        let prefix = match candidates.as_slice() {
            [one] => one[..one.len() - "data.pkl".len()].to_string(),
            _ => {
                let mut names: Vec<&str> = zip.file_names().take(5).collect();
                names.sort_unstable();
                return Err(Error::format(format!(
                    "torch.save archive: expected exactly one <folder>/data.pkl entry, got {} (entries include {names:?})",
                    candidates.len()
                )));
            }
        };
        let mut archive = Self { zip, prefix, storages: HashMap::new(), total_storage_bytes: 0 };
        archive.check_byteorder()?;
        Ok(archive)
    }

    fn check_byteorder(&mut self) -> Result<()> {
        let name = format!("{}byteorder", self.prefix);
        let mut text = Vec::new();
        match self.zip.by_name(&name) {
            Err(zip::result::ZipError::FileNotFound) => return Ok(()),
            Err(e) => return Err(zip_error(&name, e)),
            Ok(entry) => {
                entry.take(64).read_to_end(&mut text).map_err(|e| Error::format(format!("{name}: {e}")))?;
            }
        }
        if text.as_slice() != b"little" {
            return Err(Error::unsupported(format!(
                "{name}: expected \"little\", got {:?}",
                String::from_utf8_lossy(&text)
            )));
        }
        Ok(())
    }

    /// Read the entry `name`, which must be exactly `expected` bytes long if given, at most `max`.
    fn read_entry(&mut self, name: &str, expected: Option<u64>, max: u64) -> Result<Vec<u8>> {
        let entry = match self.zip.by_name(name) {
            Ok(entry) => entry,
            Err(zip::result::ZipError::FileNotFound) => {
                return Err(Error::format(format!("archive entry {name} is missing")));
            }
            Err(e) => return Err(zip_error(name, e)),
        };
        let declared = entry.size();
        if let Some(expected) = expected {
            if declared != expected {
                return Err(Error::format(format!("{name}: expected {expected} bytes, got {declared}")));
            }
        }
        if declared > max {
            return Err(Error::format(format!("{name}: expected at most {max} bytes, got {declared}")));
        }
        let mut data = Vec::new();
        entry.take(declared + 1).read_to_end(&mut data).map_err(|e| Error::format(format!("{name}: {e}")))?;
        if data.len() as u64 != declared {
            return Err(Error::format(format!(
                "{name}: expected {declared} bytes (declared size), got {}",
                data.len()
            )));
        }
        Ok(data)
    }

    fn read_pickle(&mut self) -> Result<Vec<u8>> {
        let name = format!("{}data.pkl", self.prefix);
        self.read_entry(&name, None, MAX_PICKLE_BYTES)
    }

    /// The bytes of storage `s` (read once, then cached).
    fn storage(&mut self, s: &Storage) -> Result<Rc<Vec<u8>>> {
        if let Some(data) = self.storages.get(&*s.key) {
            let expected = s.numel.saturating_mul(s.ty.item_size() as u64);
            if data.len() as u64 != expected {
                return Err(Error::format(format!(
                    "storage {}: expected {expected} bytes ({} x {}), got {} (another reference to the same key)",
                    s.key,
                    s.numel,
                    s.ty.name(),
                    data.len()
                )));
            }
            return Ok(Rc::clone(data));
        }
        let name = format!("{}data/{}", self.prefix, s.key);
        let expected =
            s.numel.checked_mul(s.ty.item_size() as u64).filter(|&n| n <= MAX_STORAGE_BYTES).ok_or_else(|| {
                Error::format(format!(
                    "storage {}: expected at most {MAX_STORAGE_BYTES} bytes, got {} elements of {}",
                    s.key,
                    s.numel,
                    s.ty.name()
                ))
            })?;
        if self.total_storage_bytes + expected > MAX_TOTAL_STORAGE_BYTES {
            return Err(Error::format(format!(
                "storages: expected at most {MAX_TOTAL_STORAGE_BYTES} bytes in all, got more (at storage {})",
                s.key
            )));
        }
        let data = Rc::new(self.read_entry(&name, Some(expected), MAX_STORAGE_BYTES).map_err(|e| {
            if e.message().ends_with("is missing") {
                Error::format(format!("{} (storage {} of {} elements)", e.message(), s.key, s.numel))
            } else {
                e
            }
        })?);
        self.total_storage_bytes += expected;
        self.storages.insert(s.key.to_string(), Rc::clone(&data));
        Ok(data)
    }
}

// ---------------------------------------------------------------------------------------------
// Restricted pickle VM

/// A value on the pickle stack; containers and strings live in the object arena.
#[derive(Clone, Copy, Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Obj(usize),
}

/// Storage element types of the `torch.<X>Storage` family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StorageType {
    Float,
    Double,
    Half,
    BFloat16,
    Long,
    Int,
    Short,
    Char,
    Byte,
    Bool,
    ComplexFloat,
    ComplexDouble,
}

impl StorageType {
    const ALL: [StorageType; 12] = [
        StorageType::Float,
        StorageType::Double,
        StorageType::Half,
        StorageType::BFloat16,
        StorageType::Long,
        StorageType::Int,
        StorageType::Short,
        StorageType::Char,
        StorageType::Byte,
        StorageType::Bool,
        StorageType::ComplexFloat,
        StorageType::ComplexDouble,
    ];

    fn name(self) -> &'static str {
        match self {
            StorageType::Float => "FloatStorage",
            StorageType::Double => "DoubleStorage",
            StorageType::Half => "HalfStorage",
            StorageType::BFloat16 => "BFloat16Storage",
            StorageType::Long => "LongStorage",
            StorageType::Int => "IntStorage",
            StorageType::Short => "ShortStorage",
            StorageType::Char => "CharStorage",
            StorageType::Byte => "ByteStorage",
            StorageType::Bool => "BoolStorage",
            StorageType::ComplexFloat => "ComplexFloatStorage",
            StorageType::ComplexDouble => "ComplexDoubleStorage",
        }
    }

    fn item_size(self) -> usize {
        match self {
            StorageType::Byte | StorageType::Char | StorageType::Bool => 1,
            StorageType::Half | StorageType::BFloat16 | StorageType::Short => 2,
            StorageType::Float | StorageType::Int => 4,
            StorageType::Double | StorageType::Long | StorageType::ComplexFloat => 8,
            StorageType::ComplexDouble => 16,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// The only callables a pickle may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    Storage(StorageType),
}

impl Global {
    fn name(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".into(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".into(),
            Global::Storage(t) => format!("torch.{}", t.name()),
        }
    }
}

#[derive(Debug)]
struct Storage {
    ty: StorageType,
    key: Rc<str>,
    numel: u64,
}

/// A contiguous tensor view of a storage (checked against the storage's size when rebuilt).
#[derive(Debug)]
struct TensorView {
    /// Arena index of the [`Object::Storage`].
    storage: usize,
    /// Element offset into the storage.
    offset: u64,
    shape: Vec<u64>,
    numel: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Str(Rc<str>),
    Int(i64),
}

impl Key {
    fn text(&self) -> String {
        match self {
            Key::Str(s) => s.to_string(),
            Key::Int(i) => i.to_string(),
        }
    }
}

/// An insertion-ordered dict with Python's replace-on-duplicate semantics.
#[derive(Debug, Default)]
struct Dict {
    entries: Vec<(Key, Value)>,
    index: HashMap<Key, usize>,
}

impl Dict {
    fn insert(&mut self, key: Key, value: Value) {
        match self.index.get(&key) {
            Some(&i) => self.entries[i].1 = value,
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, value));
            }
        }
    }

    fn get(&self, key: &str) -> Option<Value> {
        self.index.get(&Key::Str(Rc::from(key))).map(|&i| self.entries[i].1)
    }
}

#[derive(Debug)]
enum Object {
    Str(Rc<str>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Dict),
    Global(Global),
    Storage(Storage),
    Tensor(TensorView),
}

/// Name of a pickle opcode (every protocol 0-5 opcode), for messages.
fn opcode_name(op: u8) -> Option<&'static str> {
    Some(match op {
        b'(' => "MARK",
        b'.' => "STOP",
        b'0' => "POP",
        b'1' => "POP_MARK",
        b'2' => "DUP",
        b'F' => "FLOAT",
        b'I' => "INT",
        b'J' => "BININT",
        b'K' => "BININT1",
        b'L' => "LONG",
        b'M' => "BININT2",
        b'N' => "NONE",
        b'P' => "PERSID",
        b'Q' => "BINPERSID",
        b'R' => "REDUCE",
        b'S' => "STRING",
        b'T' => "BINSTRING",
        b'U' => "SHORT_BINSTRING",
        b'V' => "UNICODE",
        b'X' => "BINUNICODE",
        b'a' => "APPEND",
        b'b' => "BUILD",
        b'c' => "GLOBAL",
        b'd' => "DICT",
        b'}' => "EMPTY_DICT",
        b'e' => "APPENDS",
        b'g' => "GET",
        b'h' => "BINGET",
        b'i' => "INST",
        b'j' => "LONG_BINGET",
        b'l' => "LIST",
        b']' => "EMPTY_LIST",
        b'o' => "OBJ",
        b'p' => "PUT",
        b'q' => "BINPUT",
        b'r' => "LONG_BINPUT",
        b's' => "SETITEM",
        b't' => "TUPLE",
        b')' => "EMPTY_TUPLE",
        b'u' => "SETITEMS",
        b'G' => "BINFLOAT",
        0x80 => "PROTO",
        0x81 => "NEWOBJ",
        0x82 => "EXT1",
        0x83 => "EXT2",
        0x84 => "EXT4",
        0x85 => "TUPLE1",
        0x86 => "TUPLE2",
        0x87 => "TUPLE3",
        0x88 => "NEWTRUE",
        0x89 => "NEWFALSE",
        0x8a => "LONG1",
        0x8b => "LONG4",
        b'B' => "BINBYTES",
        b'C' => "SHORT_BINBYTES",
        0x8c => "SHORT_BINUNICODE",
        0x8d => "BINUNICODE8",
        0x8e => "BINBYTES8",
        0x8f => "EMPTY_SET",
        0x90 => "ADDITEMS",
        0x91 => "FROZENSET",
        0x92 => "NEWOBJ_EX",
        0x93 => "STACK_GLOBAL",
        0x94 => "MEMOIZE",
        0x95 => "FRAME",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => return None,
    })
}

struct Vm<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset and byte of the opcode being executed (for messages).
    op_at: usize,
    op: u8,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objects: Vec<Object>,
    items: usize,
}

impl<'a> Vm<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            op_at: 0,
            op: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            objects: Vec::new(),
            items: 0,
        }
    }

    /// An error about the current opcode.
    fn err(&self, message: impl std::fmt::Display) -> Error {
        let name = opcode_name(self.op).unwrap_or("unknown opcode");
        Error::format(format!("pickle opcode 0x{:02x} ({name}) at offset {}: {message}", self.op, self.op_at))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let remaining = self.data.len() - self.pos;
        if n > remaining {
            return Err(self.err(format!("expected {n} more bytes of argument, got {remaining} (truncated pickle)")));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn take_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take_array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take_array()?))
    }

    fn line(&mut self) -> Result<&'a str> {
        let data = self.data;
        let rest = &data[self.pos..];
        let window = &rest[..rest.len().min(MAX_GLOBAL_LINE + 1)];
        let Some(end) = window.iter().position(|&b| b == b'\n') else {
            return Err(self.err(format!("expected a newline-terminated name of at most {MAX_GLOBAL_LINE} bytes")));
        };
        let bytes = self.take(end + 1)?;
        std::str::from_utf8(&bytes[..end]).map_err(|_| self.err("expected an ASCII name, got invalid UTF-8"))
    }

    fn new_object(&mut self, o: Object) -> Result<Value> {
        if self.objects.len() >= MAX_OBJECTS {
            return Err(self.err(format!("expected at most {MAX_OBJECTS} objects, got more")));
        }
        self.objects.push(o);
        Ok(Value::Obj(self.objects.len() - 1))
    }

    fn count_items(&mut self, n: usize) -> Result<()> {
        self.items = self.items.saturating_add(n);
        if self.items > MAX_ITEMS {
            return Err(self.err(format!("expected at most {MAX_ITEMS} container items in all, got more")));
        }
        Ok(())
    }

    fn push(&mut self, v: Value) -> Result<()> {
        if self.stack.len() >= MAX_STACK {
            return Err(self.err(format!("expected a stack of at most {MAX_STACK} values, got more")));
        }
        self.stack.push(v);
        Ok(())
    }

    fn frame_floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Result<Value> {
        if self.stack.len() <= self.frame_floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<Value> {
        if self.stack.len() <= self.frame_floor() {
            return Err(self.err("stack underflow"));
        }
        self.stack.last().copied().ok_or_else(|| self.err("stack underflow"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let Some(mark) = self.marks.pop() else {
            return Err(self.err("expected a MARK on the stack, got none"));
        };
        Ok(self.stack.split_off(mark))
    }

    fn type_name(&self, v: Value) -> String {
        type_name(&self.objects, v)
    }

    fn key(&self, v: Value) -> Result<Key> {
        match v {
            Value::Int(i) => Ok(Key::Int(i)),
            Value::Obj(i) => match &self.objects[i] {
                Object::Str(s) => Ok(Key::Str(Rc::clone(s))),
                _ => Err(self.err(format!("dict key: expected str or int, got {}", self.type_name(v)))),
            },
            _ => Err(self.err(format!("dict key: expected str or int, got {}", self.type_name(v)))),
        }
    }

    fn set_items(&mut self, target: Value, pairs: Vec<Value>) -> Result<()> {
        let keys = pairs.chunks_exact(2).map(|p| Ok((self.key(p[0])?, p[1]))).collect::<Result<Vec<_>>>()?;
        self.count_items(keys.len())?;
        let name = self.type_name(target);
        match target {
            Value::Obj(i) => match &mut self.objects[i] {
                Object::Dict(d) => {
                    for (k, v) in keys {
                        d.insert(k, v);
                    }
                    Ok(())
                }
                _ => Err(self.err(format!("target: expected a dict, got {name}"))),
            },
            _ => Err(self.err(format!("target: expected a dict, got {name}"))),
        }
    }

    fn append(&mut self, target: Value, values: Vec<Value>) -> Result<()> {
        self.count_items(values.len())?;
        let name = self.type_name(target);
        match target {
            Value::Obj(i) => match &mut self.objects[i] {
                Object::List(l) => {
                    l.extend(values);
                    Ok(())
                }
                _ => Err(self.err(format!("target: expected a list, got {name}"))),
            },
            _ => Err(self.err(format!("target: expected a list, got {name}"))),
        }
    }

    fn tuple(&mut self, items: Vec<Value>) -> Result<Value> {
        self.count_items(items.len())?;
        self.new_object(Object::Tuple(items))
    }

    fn string(&mut self, len: usize) -> Result<()> {
        let bytes = self.take(len)?;
        let s = std::str::from_utf8(bytes).map_err(|e| self.err(format!("expected UTF-8 text, got {e}")))?;
        let v = self.new_object(Object::Str(Rc::from(s)))?;
        self.push(v)
    }

    fn memo_get(&self, key: u32) -> Result<Value> {
        self.memo.get(&key).copied().ok_or_else(|| self.err(format!("memo entry {key} is not defined")))
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let v = self.top()?;
        if self.memo.len() >= MAX_OBJECTS && !self.memo.contains_key(&key) {
            return Err(self.err(format!("expected at most {MAX_OBJECTS} memo entries, got more")));
        }
        self.memo.insert(key, v);
        Ok(())
    }

    fn global(&mut self) -> Result<()> {
        let module = self.line()?;
        let name = self.line()?;
        let g = match (module, name) {
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch", n) if StorageType::from_name(n).is_some() => match StorageType::from_name(n) {
                Some(t) => Global::Storage(t),
                None => return Err(self.err(format!("global torch.{n} is not a known storage class"))),
            },
            _ => {
                return Err(self.err(format!(
                    "global {module}.{name} is not allowed (expected collections.OrderedDict, \
                     torch._utils._rebuild_tensor_v2 or a torch.<X>Storage class)"
                )))
            }
        };
        let v = self.new_object(Object::Global(g))?;
        self.push(v)
    }

    fn as_global(&self, v: Value) -> Option<Global> {
        match v {
            Value::Obj(i) => match &self.objects[i] {
                Object::Global(g) => Some(*g),
                _ => None,
            },
            _ => None,
        }
    }

    fn as_tuple(&self, v: Value) -> Option<&[Value]> {
        match v {
            Value::Obj(i) => match &self.objects[i] {
                Object::Tuple(t) => Some(t),
                _ => None,
            },
            _ => None,
        }
    }

    fn as_str(&self, v: Value) -> Option<Rc<str>> {
        match v {
            Value::Obj(i) => match &self.objects[i] {
                Object::Str(s) => Some(Rc::clone(s)),
                _ => None,
            },
            _ => None,
        }
    }

    fn int_tuple(&self, v: Value, what: &str) -> Result<Vec<i64>> {
        let items = self
            .as_tuple(v)
            .ok_or_else(|| self.err(format!("{what}: expected a tuple of ints, got {}", self.type_name(v))))?;
        items
            .iter()
            .map(|&x| match x {
                Value::Int(i) => Ok(i),
                _ => {
                    Err(self
                        .err(format!("{what}: expected a tuple of ints, got an item of type {}", self.type_name(x))))
                }
            })
            .collect()
    }

    fn persistent_load(&mut self) -> Result<()> {
        let pid = self.pop()?;
        let expected = "('storage', torch.<X>Storage, key, location, numel)";
        let Some(t) = self.as_tuple(pid) else {
            return Err(self.err(format!("persistent id: expected {expected}, got {}", self.type_name(pid))));
        };
        let [tag, ty, key, location, numel] = t else {
            return Err(self.err(format!("persistent id: expected {expected}, got a tuple of {} items", t.len())));
        };
        let (tag, ty, key, location, numel) = (*tag, *ty, *key, *location, *numel);
        if self.as_str(tag).as_deref() != Some("storage") {
            return Err(self.err(format!("persistent id tag: expected 'storage', got {}", self.describe(tag))));
        }
        let Some(Global::Storage(ty)) = self.as_global(ty) else {
            return Err(
                self.err(format!("persistent id storage type: expected torch.<X>Storage, got {}", self.type_name(ty)))
            );
        };
        let Some(key) = self.as_str(key) else {
            return Err(self.err(format!("persistent id key: expected str, got {}", self.type_name(key))));
        };
        if self.as_str(location).is_none() {
            return Err(self.err(format!("persistent id location: expected str, got {}", self.type_name(location))));
        }
        let numel = match numel {
            Value::Int(n) if n >= 0 => n as u64,
            other => {
                return Err(self.err(format!("persistent id numel: expected an int >= 0, got {}", self.describe(other))))
            }
        };
        let v = self.new_object(Object::Storage(Storage { ty, key, numel }))?;
        self.push(v)
    }

    fn describe(&self, v: Value) -> String {
        match v {
            Value::Int(i) => format!("int {i}"),
            Value::Obj(i) => match &self.objects[i] {
                Object::Str(s) => format!("str {:?}", truncate(s, 60)),
                _ => self.type_name(v),
            },
            _ => self.type_name(v),
        }
    }

    fn reduce(&mut self) -> Result<()> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Some(g) = self.as_global(callable) else {
            return Err(self.err(format!("callable: expected an allowed global, got {}", self.type_name(callable))));
        };
        let Some(args) = self.as_tuple(args).map(<[Value]>::to_vec) else {
            return Err(self.err(format!("arguments of {}: expected a tuple, got {}", g.name(), self.type_name(args))));
        };
        let v = match g {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err(self.err(format!("collections.OrderedDict: expected no arguments, got {}", args.len())));
                }
                self.new_object(Object::Dict(Dict::default()))?
            }
            Global::RebuildTensorV2 => self.rebuild_tensor(&args)?,
            Global::Storage(t) => {
                return Err(self.err(format!("torch.{} may only appear in a persistent id, not be called", t.name())))
            }
        };
        self.push(v)
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])`.
    fn rebuild_tensor(&mut self, args: &[Value]) -> Result<Value> {
        const WHAT: &str = "torch._utils._rebuild_tensor_v2";
        if args.len() != 6 && args.len() != 7 {
            return Err(self.err(format!("{WHAT}: expected 6 or 7 arguments, got {}", args.len())));
        }
        let storage_value = args[0];
        let (storage, storage_numel) = match storage_value {
            Value::Obj(i) => match &self.objects[i] {
                Object::Storage(s) => (i, s.numel),
                _ => {
                    return Err(
                        self.err(format!("{WHAT} storage: expected a storage, got {}", self.type_name(storage_value)))
                    )
                }
            },
            _ => {
                return Err(
                    self.err(format!("{WHAT} storage: expected a storage, got {}", self.type_name(storage_value)))
                )
            }
        };
        let offset = match args[1] {
            Value::Int(o) if o >= 0 => o as u64,
            other => {
                return Err(
                    self.err(format!("{WHAT} storage_offset: expected an int >= 0, got {}", self.describe(other)))
                )
            }
        };
        let size = self.int_tuple(args[2], &format!("{WHAT} size"))?;
        let stride = self.int_tuple(args[3], &format!("{WHAT} stride"))?;
        if size.len() > MAX_TENSOR_DIMS {
            return Err(
                self.err(format!("{WHAT} size: expected at most {MAX_TENSOR_DIMS} dimensions, got {}", size.len()))
            );
        }
        if stride.len() != size.len() {
            return Err(self.err(format!(
                "{WHAT} stride: expected {} entries (one per dimension of size {size:?}), got {stride:?}",
                size.len()
            )));
        }
        if let Some(&bad) = size.iter().find(|&&s| s < 0) {
            return Err(self.err(format!("{WHAT} size: expected sizes >= 0, got {bad} in {size:?}")));
        }
        let shape: Vec<u64> = size.iter().map(|&s| s as u64).collect();
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &s| acc.checked_mul(s))
            .ok_or_else(|| self.err(format!("{WHAT} size: element count of {size:?} overflows")))?;
        // Contiguous (row-major) strides; dimensions of size 1 may carry any stride.
        let mut expected_stride = 1u64;
        for d in (0..shape.len()).rev() {
            if shape[d] != 1 && numel != 0 && stride[d] as u64 != expected_stride {
                return Err(Error::unsupported(format!(
                    "pickle offset {}: {WHAT}: expected a contiguous tensor (stride {:?} for size {size:?}), got stride {stride:?}",
                    self.op_at,
                    contiguous_strides(&shape)
                )));
            }
            expected_stride = expected_stride.saturating_mul(shape[d]);
        }
        if numel > 0 {
            let end = offset.checked_add(numel);
            if !matches!(end, Some(e) if e <= storage_numel) {
                return Err(self.err(format!(
                    "{WHAT}: expected storage_offset + numel <= {storage_numel} (storage size), got {offset} + {numel}"
                )));
            }
        }
        match args[4] {
            Value::Bool(_) => {}
            other => {
                return Err(self.err(format!("{WHAT} requires_grad: expected a bool, got {}", self.type_name(other))))
            }
        }
        let hooks = args[5];
        let hooks_ok = match hooks {
            Value::Obj(i) => matches!(&self.objects[i], Object::Dict(d) if d.entries.is_empty()),
            _ => false,
        };
        if !hooks_ok {
            return Err(
                self.err(format!("{WHAT} backward_hooks: expected an empty dict, got {}", self.type_name(hooks)))
            );
        }
        self.new_object(Object::Tensor(TensorView { storage, offset, shape, numel }))
    }

    /// Run to STOP and return the single value left.
    fn run(&mut self) -> Result<Value> {
        loop {
            self.op_at = self.pos;
            let Some(&op) = self.data.get(self.pos) else {
                self.op = 0;
                return Err(Error::format(format!(
                    "pickle: expected a STOP opcode, got the end of data at offset {}",
                    self.pos
                )));
            };
            self.op = op;
            self.pos += 1;
            match op {
                0x80 => {
                    let v = self.u8()?;
                    if v > 5 {
                        return Err(self.err(format!("expected pickle protocol <= 5, got {v}")));
                    }
                }
                0x95 => {
                    let n = u64::from_le_bytes(self.take_array()?);
                    let remaining = (self.data.len() - self.pos) as u64;
                    if n > remaining {
                        return Err(self.err(format!("frame of {n} bytes exceeds the {remaining} bytes left")));
                    }
                }
                b'.' => {
                    if !self.marks.is_empty() {
                        return Err(self.err(format!("expected no open MARK at STOP, got {}", self.marks.len())));
                    }
                    if self.stack.len() != 1 {
                        return Err(
                            self.err(format!("expected exactly one value on the stack, got {}", self.stack.len()))
                        );
                    }
                    return self.pop();
                }
                b'(' => {
                    if self.marks.len() >= MAX_MARKS {
                        return Err(self.err(format!("expected at most {MAX_MARKS} nested MARKs, got more")));
                    }
                    self.marks.push(self.stack.len());
                }
                b'}' => {
                    let v = self.new_object(Object::Dict(Dict::default()))?;
                    self.push(v)?;
                }
                b']' => {
                    let v = self.new_object(Object::List(Vec::new()))?;
                    self.push(v)?;
                }
                b')' => {
                    let v = self.new_object(Object::Tuple(Vec::new()))?;
                    self.push(v)?;
                }
                b't' => {
                    let items = self.pop_mark()?;
                    let v = self.tuple(items)?;
                    self.push(v)?;
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    let v = self.tuple(items)?;
                    self.push(v)?;
                }
                b's' => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let target = self.top()?;
                    self.set_items(target, vec![key, value])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err(format!("expected key/value pairs, got {} items", items.len())));
                    }
                    let target = self.top()?;
                    self.set_items(target, items)?;
                }
                b'a' => {
                    let value = self.pop()?;
                    let target = self.top()?;
                    self.append(target, vec![value])?;
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let target = self.top()?;
                    self.append(target, items)?;
                }
                b'X' => {
                    let n = self.u32()? as usize;
                    self.string(n)?;
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    self.string(n)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(v as i64))?;
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))?;
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.take_array()?);
                    self.push(Value::Int(v as i64))?;
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    if n > 8 {
                        return Err(Error::unsupported(format!(
                            "pickle opcode 0x8a (LONG1) at offset {}: expected an integer of at most 8 bytes, got {n}",
                            self.op_at
                        )));
                    }
                    let bytes = self.take(n)?;
                    let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) { 0xff } else { 0 };
                    let mut buf = [fill; 8];
                    buf[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(buf)))?;
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take_array()?);
                    self.push(Value::Float(v))?;
                }
                0x88 => self.push(Value::Bool(true))?,
                0x89 => self.push(Value::Bool(false))?,
                b'N' => self.push(Value::None)?,
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?;
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = u32::try_from(self.memo.len()).map_err(|_| self.err("memo is full"))?;
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    let v = self.memo_get(k)?;
                    self.push(v)?;
                }
                b'j' => {
                    let k = self.u32()?;
                    let v = self.memo_get(k)?;
                    self.push(v)?;
                }
                b'c' => self.global()?,
                b'R' => self.reduce()?,
                b'Q' => self.persistent_load()?,
                _ => {
                    let name = opcode_name(op).unwrap_or("unknown opcode");
                    return Err(Error::format(format!(
                        "pickle opcode 0x{op:02x} ({name}) at offset {} is not allowed: expected only the opcodes \
                         of plain containers, strings, numbers and float tensors (refusing to run pickle code)",
                        self.op_at
                    )));
                }
            }
        }
    }
}

fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut strides = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1].saturating_mul(shape[d + 1]);
    }
    strides
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

fn type_name(objects: &[Object], v: Value) -> String {
    match v {
        Value::None => "None".into(),
        Value::Bool(_) => "bool".into(),
        Value::Int(_) => "int".into(),
        Value::Float(_) => "float".into(),
        Value::Obj(i) => match &objects[i] {
            Object::Str(_) => "str".into(),
            Object::List(_) => "list".into(),
            Object::Tuple(_) => "tuple".into(),
            Object::Dict(_) => "dict".into(),
            Object::Global(g) => format!("global {}", g.name()),
            Object::Storage(s) => format!("storage ({})", s.ty.name()),
            Object::Tensor(_) => "tensor".into(),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Conversion to Stats

struct Converter<'o, 'a, 'b> {
    objects: &'o [Object],
    archive: &'b mut Archive<'a>,
}

/// Parse `layerLL_headHH` (decimal indices of at most 9 digits).
fn parse_head_key(key: &str) -> Option<(usize, usize)> {
    let rest = key.strip_prefix("layer")?;
    let (layer, head) = rest.split_once("_head")?;
    let number = |s: &str| {
        if s.is_empty() || s.len() > 9 || !s.bytes().all(|b| b.is_ascii_digit()) {
            None
        } else {
            s.parse::<usize>().ok()
        }
    };
    Some((number(layer)?, number(head)?))
}

impl<'o> Converter<'o, '_, '_> {
    fn type_name(&self, v: Value) -> String {
        type_name(self.objects, v)
    }

    fn dict(&self, v: Value, what: &str) -> Result<&'o Dict> {
        let objects: &'o [Object] = self.objects;
        match v {
            Value::Obj(i) => match &objects[i] {
                Object::Dict(d) => Ok(d),
                _ => Err(Error::format(format!("{what}: expected a dict, got {}", self.type_name(v)))),
            },
            _ => Err(Error::format(format!("{what}: expected a dict, got {}", self.type_name(v)))),
        }
    }

    fn str(&self, v: Value, what: &str) -> Result<&'o str> {
        let objects: &'o [Object] = self.objects;
        match v {
            Value::Obj(i) => match &objects[i] {
                Object::Str(s) => Ok(s),
                _ => Err(Error::format(format!("{what}: expected a str, got {}", self.type_name(v)))),
            },
            _ => Err(Error::format(format!("{what}: expected a str, got {}", self.type_name(v)))),
        }
    }

    fn sequence(&self, v: Value, what: &str) -> Result<&'o [Value]> {
        let objects: &'o [Object] = self.objects;
        match v {
            Value::Obj(i) => match &objects[i] {
                Object::List(l) | Object::Tuple(l) => Ok(l),
                _ => Err(Error::format(format!("{what}: expected a list, got {}", self.type_name(v)))),
            },
            _ => Err(Error::format(format!("{what}: expected a list, got {}", self.type_name(v)))),
        }
    }

    /// `sampled_heads`: a list of `[layer, head]` pairs of non-negative ints.
    fn sampled_heads(&self, v: Value) -> Result<Vec<(usize, usize)>> {
        let what = "metadata sampled_heads";
        let items = self.sequence(v, what)?;
        let mut pairs = Vec::with_capacity(items.len());
        for (i, &item) in items.iter().enumerate() {
            let pair = self.sequence(item, &format!("{what}[{i}]"))?;
            let index = |x: Value| match x {
                Value::Int(n) if (0..=i32::MAX as i64).contains(&n) => Some(n as usize),
                _ => None,
            };
            match pair {
                &[l, h] if index(l).is_some() && index(h).is_some() => {
                    if let (Some(l), Some(h)) = (index(l), index(h)) {
                        pairs.push((l, h));
                    }
                }
                _ => {
                    let got: Vec<String> = pair.iter().map(|&x| self.scalar_text(x)).collect();
                    return Err(Error::format(format!(
                        "{what}[{i}]: expected [layer, head] with two ints >= 0, got [{}]",
                        got.join(", ")
                    )));
                }
            }
        }
        Ok(pairs)
    }

    fn scalar_text(&self, v: Value) -> String {
        match v {
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::None => "None".into(),
            Value::Obj(i) => match &self.objects[i] {
                Object::Str(s) => format!("{:?}", truncate(s, 60)),
                _ => self.type_name(v),
            },
        }
    }

    /// The values of a float32 tensor `v`, bit-exact, and its shape.
    fn tensor_f32(&mut self, v: Value, what: &str) -> Result<(Vec<u64>, Vec<f32>)> {
        let Value::Obj(i) = v else {
            return Err(Error::format(format!("{what}: expected a tensor, got {}", self.type_name(v))));
        };
        let Object::Tensor(t) = &self.objects[i] else {
            return Err(Error::format(format!("{what}: expected a tensor, got {}", self.type_name(v))));
        };
        let Object::Storage(s) = &self.objects[t.storage] else {
            return Err(Error::format(format!("{what}: expected a tensor backed by a storage")));
        };
        if s.ty != StorageType::Float {
            return Err(Error::unsupported(format!(
                "{what}: expected a float32 tensor (FloatStorage), got {}",
                s.ty.name()
            )));
        }
        let data = self.archive.storage(s).map_err(|e| e.context(what))?;
        // rebuild_tensor checked offset + numel <= storage numel; the storage has numel * 4 bytes.
        let start = (t.offset as usize).saturating_mul(4);
        let end = start.saturating_add((t.numel as usize).saturating_mul(4));
        let bytes = data.get(start..end).ok_or_else(|| {
            Error::format(format!(
                "{what}: expected elements {}..{} of storage {}, got a storage of {} bytes",
                t.offset,
                t.offset + t.numel,
                s.key,
                data.len()
            ))
        })?;
        let values = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok((t.shape.clone(), values))
    }

    /// A metadata value as JSON (dicts, lists, tuples, scalars, float tensors).
    fn json(&mut self, v: Value, what: &str, depth: usize, nodes: &mut usize) -> Result<Json> {
        *nodes += 1;
        if depth > MAX_JSON_DEPTH || *nodes > MAX_JSON_NODES {
            return Err(Error::unsupported(format!(
                "{what}: expected at most {MAX_JSON_DEPTH} levels and {MAX_JSON_NODES} values, got more"
            )));
        }
        Ok(match v {
            Value::None => Json::Null,
            Value::Bool(b) => Json::Bool(b),
            Value::Int(i) => Json::from(i),
            Value::Float(f) => Json::from(f),
            Value::Obj(i) => match &self.objects[i] {
                Object::Str(s) => Json::String(s.to_string()),
                Object::List(items) | Object::Tuple(items) => {
                    let mut out = Vec::with_capacity(items.len().min(1024));
                    for (j, &item) in items.iter().enumerate() {
                        out.push(self.json(item, &format!("{what}[{j}]"), depth + 1, nodes)?);
                    }
                    Json::Array(out)
                }
                Object::Dict(d) => {
                    let mut out = serde_json::Map::new();
                    for (k, item) in &d.entries {
                        let key = k.text();
                        let value = self.json(*item, &format!("{what}.{key}"), depth + 1, nodes)?;
                        out.insert(key, value);
                    }
                    Json::Object(out)
                }
                Object::Tensor(t) => {
                    if t.numel as usize > MAX_JSON_NODES {
                        return Err(Error::unsupported(format!(
                            "{what}: expected a tensor of at most {MAX_JSON_NODES} elements, got {}",
                            t.numel
                        )));
                    }
                    let (shape, values) = self.tensor_f32(v, what)?;
                    *nodes += values.len();
                    nest(&shape, &values)
                }
                Object::Global(_) | Object::Storage(_) => {
                    return Err(Error::unsupported(format!(
                        "{what}: expected a plain value, got {}",
                        self.type_name(v)
                    )))
                }
            },
        })
    }

    /// A metadata value as a string: strings as they are, everything else as compact JSON.
    fn meta_text(&mut self, v: Value, what: &str) -> Result<String> {
        if let Value::Obj(i) = v {
            if let Object::Str(s) = &self.objects[i] {
                return Ok(s.to_string());
            }
        }
        if let Value::Float(f) = v {
            if !f.is_finite() {
                return Ok(if f.is_nan() {
                    "nan"
                } else if f > 0.0 {
                    "inf"
                } else {
                    "-inf"
                }
                .into());
            }
        }
        let mut nodes = 0;
        Ok(self.json(v, what, 0, &mut nodes)?.to_string())
    }

    fn stats(&mut self, root: Value) -> Result<Stats> {
        let root_dict = self.dict(root, "pickle root")?;
        let metadata_value = root_dict
            .get("metadata")
            .ok_or_else(|| Error::format("pickle root: expected a dict with key \"metadata\", got none"))?;
        let stats_value = root_dict
            .get("stats")
            .ok_or_else(|| Error::format("pickle root: expected a dict with key \"stats\", got none"))?;
        let metadata = self.dict(metadata_value, "metadata")?;
        let stats = self.dict(stats_value, "stats")?;

        let rope_style = match metadata.get("rope_style") {
            None => {
                return Err(Error::format("metadata rope_style: expected \"half\" or \"interleaved\", got nothing"))
            }
            Some(v) => PairingStyle::parse("metadata rope_style", self.str(v, "metadata rope_style")?)
                .map_err(|e| Error::new(ErrorKind::InvalidFormat, e.message()))?,
        };
        let head_dim = match metadata.get("head_dim") {
            Some(Value::Int(d)) if d > 0 && d % 2 == 0 && d <= 1 << 20 => d as usize,
            Some(v) => {
                return Err(Error::format(format!(
                    "metadata head_dim: expected an even int > 0, got {}",
                    self.scalar_text(v)
                )))
            }
            None => return Err(Error::format("metadata head_dim: expected an even int > 0, got nothing")),
        };
        let freq_count = head_dim / 2;
        let sampled = match metadata.get("sampled_heads") {
            Some(v) => Some(self.sampled_heads(v)?),
            None => None,
        };

        // Index the per-head entries.
        let mut heads: HashMap<(usize, usize), (&str, Value)> = HashMap::with_capacity(stats.entries.len());
        let (mut num_layers, mut num_heads) = (0usize, 0usize);
        for (key, value) in &stats.entries {
            let name = match key {
                Key::Str(s) => &**s,
                Key::Int(i) => {
                    return Err(Error::format(format!("stats: expected keys layerLL_headHH, got the int {i}")))
                }
            };
            let Some((l, h)) = parse_head_key(name) else {
                return Err(Error::format(format!(
                    "stats: expected keys layerLL_headHH, got {:?}",
                    truncate(name, 60)
                )));
            };
            if let Some((other, _)) = heads.insert((l, h), (name, *value)) {
                return Err(Error::format(format!(
                    "stats: expected one entry per (layer, head), got both {other:?} and {name:?} for layer {l} head {h}"
                )));
            }
            num_layers = num_layers.max(l + 1);
            num_heads = num_heads.max(h + 1);
        }
        for &(l, h) in sampled.iter().flatten() {
            num_layers = num_layers.max(l + 1);
            num_heads = num_heads.max(h + 1);
        }
        if heads.is_empty() {
            return Err(Error::format("stats: expected at least one layerLL_headHH entry, got none"));
        }
        // Every (layer, head) must be present: find the first missing one before allocating.
        let total = num_layers.checked_mul(num_heads);
        if total != Some(heads.len()) {
            for l in 0..num_layers {
                for h in 0..num_heads {
                    if !heads.contains_key(&(l, h)) {
                        return Err(Error::unsupported(format!(
                            "stats: expected statistics for every (layer, head) of {num_layers} x {num_heads}, \
                             got layer{l:02}_head{h:02} missing (partial statistics are not supported yet)"
                        )));
                    }
                }
            }
        }
        for (key, expected) in [("num_layers", num_layers), ("num_attention_heads", num_heads)] {
            if let Some(v) = metadata.get(key) {
                match v {
                    Value::Int(n) if n >= 0 && n as u64 == expected as u64 => {}
                    _ => {
                        return Err(Error::shape(
                            format!("metadata {key}"),
                            format!("{expected} (from the stats keys and sampled_heads)"),
                            self.scalar_text(v),
                        ))
                    }
                }
            }
        }

        let n = num_layers * num_heads * freq_count;
        let mut q_mean_real = vec![0f32; n];
        let mut q_mean_imag = vec![0f32; n];
        let mut q_abs_mean = vec![0f32; n];
        for l in 0..num_layers {
            for h in 0..num_heads {
                let Some(&(name, value)) = heads.get(&(l, h)) else {
                    return Err(Error::unsupported(format!("stats: layer{l:02}_head{h:02} is missing")));
                };
                let entry = self.dict(value, &format!("stats {name}"))?;
                let fields = ["q_mean_real", "q_mean_imag", "q_abs_mean"].map(|f| (f, entry.get(f)));
                let offset = (l * num_heads + h) * freq_count;
                for ((field, v), out) in fields.into_iter().zip([&mut q_mean_real, &mut q_mean_imag, &mut q_abs_mean]) {
                    let what = format!("stats {name} {field}");
                    let v = v.ok_or_else(|| Error::format(format!("{what}: expected a tensor, got nothing")))?;
                    let (shape, values) = self.tensor_f32(v, &what)?;
                    if shape.as_slice() != [freq_count as u64] {
                        return Err(Error::shape(
                            &what,
                            format!("shape [{freq_count}] (head_dim / 2)"),
                            format!("{shape:?}"),
                        ));
                    }
                    if let Some(j) = values.iter().position(|x| !x.is_finite()) {
                        return Err(Error::format(format!(
                            "{what}: expected finite values, got {} at [{j}]",
                            values[j]
                        )));
                    }
                    out[offset..offset + freq_count].copy_from_slice(&values);
                }
            }
        }

        let mut meta = BTreeMap::new();
        for (key, value) in &metadata.entries {
            let key = key.text();
            if matches!(key.as_str(), "rope_style" | "head_dim" | "sampled_heads") {
                continue;
            }
            let text = self.meta_text(*value, &format!("metadata {key}"))?;
            meta.insert(key, text);
        }
        if let Some(kv) = meta.get("num_kv_heads").cloned() {
            meta.entry("num_key_value_heads".into()).or_insert(kv);
        }
        let sampled_heads = sampled.map(|p| p.into_iter().map(|(l, h)| [l as i32, h as i32]).collect());
        Ok(Stats {
            num_layers,
            num_heads,
            head_dim,
            rope_style,
            q_mean_real,
            q_mean_imag,
            q_abs_mean,
            sampled_heads,
            metadata: meta,
        })
    }
}

/// Nest flat `values` into JSON arrays following `shape`.
fn nest(shape: &[u64], values: &[f32]) -> Json {
    match shape {
        [] => values.first().map_or(Json::Null, |&x| Json::from(x as f64)),
        [_] => Json::Array(values.iter().map(|&x| Json::from(x as f64)).collect()),
        [first, rest @ ..] => {
            let inner: usize = rest.iter().map(|&d| d as usize).product();
            if inner == 0 {
                return Json::Array((0..*first).map(|_| nest(rest, &[])).collect());
            }
            Json::Array(values.chunks(inner).map(|c| nest(rest, c)).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_keys() {
        assert_eq!(parse_head_key("layer03_head12"), Some((3, 12)));
        assert_eq!(parse_head_key("layer3_head7"), Some((3, 7)));
        assert_eq!(parse_head_key("layer_head7"), None);
        assert_eq!(parse_head_key("layer1_head+7"), None);
        assert_eq!(parse_head_key("layer1234567890_head0"), None);
    }

    #[test]
    fn opcodes_are_refused_by_name() {
        let mut vm = Vm::new(b"\x80\x02i__builtin__\nobject\n.");
        let e = vm.run().unwrap_err();
        assert!(e.message().contains("0x69 (INST) at offset 2"), "{e}");
        let mut vm = Vm::new(b"\x80\x02cos\nsystem\n.");
        let e = vm.run().unwrap_err();
        assert!(e.message().contains("os.system is not allowed"), "{e}");
    }

    #[test]
    fn long1_and_memo() {
        let mut vm = Vm::new(b"\x80\x02\x8a\x02\xff\x7fq\x00h\x00\x86.");
        let v = vm.run().unwrap();
        let Value::Obj(i) = v else { panic!() };
        let Object::Tuple(t) = &vm.objects[i] else { panic!() };
        assert!(matches!(t.as_slice(), [Value::Int(32767), Value::Int(32767)]));
        let mut vm = Vm::new(b"\x8a\x01\xff.");
        assert!(matches!(vm.run().unwrap(), Value::Int(-1)));
    }

    #[test]
    fn random_opcode_streams_never_panic() {
        let ops = b"(.}])t\x85\x86\x87sua\x65XJKM\x8aG\x88\x89Nqr\x94hjcRQ\x95\x80\x8c";
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let iterations = std::env::var("TRIATTN_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
        for _ in 0..iterations {
            let mut p = Vec::new();
            for _ in 0..next() % 64 {
                p.push(ops[(next() % ops.len() as u64) as usize]);
                for _ in 0..next() % 3 {
                    p.push(match next() % 4 {
                        0 => 0,
                        1 => b'\n',
                        2 => 1,
                        _ => next() as u8,
                    });
                }
                if next() % 8 == 0 {
                    p.extend_from_slice(b"torch\nFloatStorage\n");
                }
            }
            p.push(b'.');
            let _ = Vm::new(&p).run();
        }
    }

    #[test]
    fn huge_string_length_is_an_error() {
        let mut vm = Vm::new(b"\x80\x02X\xff\xff\xff\xffabc");
        let e = vm.run().unwrap_err();
        assert!(e.message().contains("truncated"), "{e}");
    }
}
