//! Tuning tables: which compiled variant of a family runs for a shape, per GPU architecture.
//!
//! Every kernel variant belongs to a family ([`crate::kernels::variant`]: `score bf16 d128 mean`,
//! `select f32`, `compact bytes hole`, `decode bf16 d128`); the variants of a family are
//! interchangeable for the same inputs and differ only in speed. A [`Tuning`] table (TOML, format
//! `triattn-tuning-v1`) names, per family and optional shape bucket, the variant to run:
//!
//! ```toml
//! [meta]
//! format = "triattn-tuning-v1"
//! arch = "sm_90"                 # or "emu"
//! device = "NVIDIA H200"         # absent for arch-wide tables
//! source = "measured"            # or "model"
//! variant_table = "3f0c...e1"    # crate::kernels::variant::table_hash() of the build it names
//! sm_count = 132
//! toolkit = "13.0"
//! driver = "13.0"
//! crate_version = "0.2.0"
//! date = "2026-12-03"
//!
//! [[entry]]
//! family = "score bf16 d128 mean"
//! variant = "triattn_score_bf16_d128_amean_bn96_nt256"
//! max_len = 8192                 # optional bucket bounds: slots (list entries for decode)
//! max_batch = 16                 #   and sequences
//! time_us = 41.5                 # optional: what autotune measured, and the built-in choice
//! default_variant = "triattn_score_bf16_d128_amean_bn64_nt256"
//! default_us = 44.0
//! ```
//!
//! Lookup ([`Dispatch::pick`]): the user's table, then the shipped table of the device's
//! architecture (`tuning/sm_*.toml`, embedded at build time), then the built-in rule; in each
//! table the first entry whose family matches and whose bucket holds the shape wins.
//!
//! Strictness follows who asked for a table. A table named explicitly ([`Tuning::load`],
//! `--tuning`, `TRIATTN_TUNING`) that is malformed or names a variant this build does not compile
//! is refused with one line naming the line or entry. A table found implicitly (the per-device
//! file an earlier `triattn autotune` wrote, [`Tuning::find_implicit`]) is ignored with one
//! warning instead, so serving never stops on it. A stale table (another variant table, arch, SM
//! count or toolkit) is used for the entries that still resolve, with one warning.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::variant::{self, Variant};

pub mod model;

/// The `meta.format` of every table this crate reads and writes.
pub const FORMAT: &str = "triattn-tuning-v1";

/// The environment variable naming a user table (`off` disables user tables, implicit ones too).
pub const ENV: &str = "TRIATTN_TUNING";

/// Where a table's choices come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableSource {
    /// Timed on a device by `triattn autotune`.
    Measured,
    /// Derived from the hardware model (`tuning/README.md`).
    Model,
}

/// The `[meta]` table: what the table is for and what makes it stale.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuningMeta {
    /// [`FORMAT`].
    pub format: String,
    /// `sm_90`, ..., or `emu`.
    pub arch: String,
    /// The device measured on; absent for arch-wide tables.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Measured or modelled.
    pub source: TableSource,
    /// [`variant::table_hash`] of the build the table was made for.
    pub variant_table: String,
    /// Streaming multiprocessors of the device measured on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_count: Option<u32>,
    /// CUDA toolkit that compiled the kernels measured (`13.0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub toolkit: Option<String>,
    /// CUDA driver version of the measurement (recorded, not compared).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// The crate version that wrote the table.
    pub crate_version: String,
    /// `YYYY-MM-DD`.
    pub date: String,
}

/// One `[[entry]]`: the variant of `family` for the shapes of its bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuningEntry {
    /// [`Variant::family`] of `variant`.
    pub family: String,
    /// The kernel symbol to run.
    pub variant: String,
    /// The bucket holds shapes of at most this many slots (list entries for decode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_len: Option<u64>,
    /// The bucket holds shapes of at most this many sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch: Option<u64>,
    /// Measured time of `variant`, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_us: Option<f64>,
    /// The built-in choice for the bucket's shape, when it was measured too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_variant: Option<String>,
    /// Measured time of `default_variant`, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_us: Option<f64>,
}

impl TuningEntry {
    /// Whether the bucket holds a shape of `len` slots and `batch` sequences.
    pub fn holds(&self, shape: Bucket) -> bool {
        self.max_len.is_none_or(|m| shape.len as u64 <= m) && self.max_batch.is_none_or(|m| shape.batch as u64 <= m)
    }
}

/// The two numbers a bucket bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Bucket {
    /// Slots per row (score, select, compact) or list entries (decode; slots when dense).
    pub len: usize,
    /// Sequences.
    pub batch: usize,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    meta: TuningMeta,
    #[serde(default, rename = "entry")]
    entries: Vec<TuningEntry>,
}

/// How a table was found, which decides how strictly it is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strictness {
    /// Named by the user: a bad entry is an error.
    Explicit,
    /// Found by convention (or shipped): a bad entry is dropped with a warning.
    Implicit,
}

/// What the running device is, for the staleness checks.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Target {
    /// `sm_90` or `emu`.
    pub arch: String,
    /// Streaming multiprocessors, when known.
    pub sm_count: Option<u32>,
}

/// A parsed, checked tuning table.
#[derive(Clone, Debug, PartialEq)]
pub struct Tuning {
    meta: TuningMeta,
    entries: Vec<TuningEntry>,
    origin: String,
    warnings: Vec<String>,
}

impl Tuning {
    /// Read and check the table at `path`, named explicitly by the user.
    ///
    /// # Errors
    /// `Io` when it cannot be read; `InvalidFormat` with one line naming the line of a TOML or
    /// field error, or the entry whose variant this build does not compile or whose family is
    /// not the variant's.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&text, &path.display().to_string(), Strictness::Explicit)
    }

    /// Parse `text` (named `origin` in messages).
    ///
    /// # Errors
    /// As [`Self::load`]; with [`Strictness::Implicit`] only for malformed TOML or fields (bad
    /// entries are dropped with a warning).
    pub fn parse(text: &str, origin: &str, strictness: Strictness) -> Result<Self> {
        let file: TableFile = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| format!(" line {}", text[..s.start].lines().count().max(1)));
            let message = e.message().lines().next().unwrap_or("malformed").to_string();
            Error::format(format!("tuning table {origin}{}: {message}", line.unwrap_or_default()))
        })?;
        if file.meta.format != FORMAT {
            return Err(Error::format(format!(
                "tuning table {origin}: meta.format: expected \"{FORMAT}\", got \"{}\"",
                file.meta.format
            )));
        }
        let hash = variant::table_hash();
        let current = file.meta.variant_table == hash;
        let mut warnings = Vec::new();
        let mut entries = Vec::new();
        let mut dropped = Vec::new();
        for (i, e) in file.entries.into_iter().enumerate() {
            let at = format!("entry {} (family \"{}\", variant {})", i + 1, e.family, e.variant);
            let problem = match variant::variant_by_symbol(&e.variant) {
                None => Some(format!("{at}: the variant is not compiled in this build")),
                Some(v) if v.family() != e.family => {
                    Some(format!("{at}: the variant belongs to family \"{}\"", v.family()))
                }
                Some(_) if e.max_len == Some(0) || e.max_batch == Some(0) => {
                    Some(format!("{at}: bucket bounds: expected >= 1, got 0"))
                }
                Some(_) => None,
            };
            match problem {
                Some(p) if strictness == Strictness::Explicit && current => {
                    return Err(Error::format(format!("tuning table {origin}: {p}")));
                }
                Some(p) => dropped.push(p),
                None => entries.push(e),
            }
        }
        if !current {
            warnings.push(format!(
                "tuning table {origin} is stale: made for variant table {}, this build has {hash}; using the {} entries that still resolve{}",
                file.meta.variant_table,
                entries.len(),
                if dropped.is_empty() { String::new() } else { format!(" ({} dropped)", dropped.len()) }
            ));
        } else if !dropped.is_empty() {
            warnings.push(format!("tuning table {origin}: {} entries dropped: {}", dropped.len(), dropped.join("; ")));
        }
        Ok(Self { meta: file.meta, entries, origin: origin.to_string(), warnings })
    }

    /// A new table of `entries` with `meta` (what autotune and the model write).
    ///
    /// # Errors
    /// `InvalidArgument` for an entry whose variant is not compiled or not of its family.
    pub fn new(meta: TuningMeta, entries: Vec<TuningEntry>, origin: &str) -> Result<Self> {
        for (i, e) in entries.iter().enumerate() {
            match variant::variant_by_symbol(&e.variant) {
                Some(v) if v.family() == e.family => {}
                _ => {
                    return Err(Error::invalid_argument(
                        format!("tuning entry {}", i + 1),
                        format!("a compiled variant of family \"{}\"", e.family),
                        &e.variant,
                    ))
                }
            }
        }
        Ok(Self { meta, entries, origin: origin.to_string(), warnings: Vec::new() })
    }

    /// The table as TOML text (what [`Self::write`] writes).
    pub fn to_toml(&self) -> String {
        let file = TableFile { meta: self.meta.clone(), entries: self.entries.clone() };
        toml::to_string(&file).expect("a table of strings and numbers serializes")
    }

    /// Write the table to `path` atomically (temporary file, then rename), creating its folder.
    ///
    /// # Errors
    /// `Io` naming the path.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let header = format!(
            "# triattn tuning table ({}), written by triattn {}; see tuning/README.md of the crate.\n",
            FORMAT,
            env!("CARGO_PKG_VERSION")
        );
        crate::io::write_atomic(path, format!("{header}{}", self.to_toml()).as_bytes())
    }

    /// `[meta]`.
    pub fn meta(&self) -> &TuningMeta {
        &self.meta
    }

    /// The entries that resolve in this build, in file order.
    pub fn entries(&self) -> &[TuningEntry] {
        &self.entries
    }

    /// The path (or name) the table was read from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Warnings from reading it (stale, dropped entries) and from [`Self::check_target`].
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Add a warning when the table was made for another arch, SM count or toolkit than
    /// `target` and this build; returns whether it is stale. Its entries stay in use.
    pub fn check_target(&mut self, target: &Target) -> bool {
        let mut why = Vec::new();
        if self.meta.arch != target.arch {
            why.push(format!("arch {} (running on {})", self.meta.arch, target.arch));
        }
        if let (Some(a), Some(b)) = (self.meta.sm_count, target.sm_count) {
            if a != b {
                why.push(format!("{a} SMs (this device has {b})"));
            }
        }
        if let (Some(t), Some(b)) = (&self.meta.toolkit, built_toolkit()) {
            if t != b {
                why.push(format!("toolkit {t} (this build: {b})"));
            }
        }
        if why.is_empty() {
            return false;
        }
        self.warnings.push(format!(
            "tuning table {} is stale: made for {}; using its {} entries that still resolve",
            self.origin,
            why.join(", "),
            self.entries.len()
        ));
        true
    }

    /// The first entry of `family` whose bucket holds `shape` and whose variant `accept`s.
    pub fn lookup(&self, family: &str, shape: Bucket, accept: &dyn Fn(Variant) -> bool) -> Option<Variant> {
        self.entries
            .iter()
            .filter(|e| e.family == family && e.holds(shape))
            .filter_map(|e| variant::variant_by_symbol(&e.variant))
            .find(|v| accept(*v))
    }

    /// The shipped (model or measured) table of SM version `arch`, embedded at build time.
    pub fn shipped(arch: u32) -> Option<Self> {
        shipped_table(arch).map(|t| (*t).clone())
    }

    /// The per-device file of an earlier `triattn autotune` for `device` (see
    /// [`default_path`]), read leniently: `Ok(None)` when there is none; a malformed file is
    /// `Err` with the warning to print (the caller goes on without it).
    pub fn find_implicit(device: &str) -> std::result::Result<Option<Self>, String> {
        let Some(path) = default_path(device) else { return Ok(None) };
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}; ignored", path.display()))?;
        Self::parse(&text, &path.display().to_string(), Strictness::Implicit)
            .map(Some)
            .map_err(|e| format!("{}; ignored", e.message()))
    }
}

/// What the built-in rule runs for `family` at rows of `len` slots: the family's first variant,
/// or for `select f32` the single-block / multi-block rule; `None` for a family this build lacks.
pub fn built_in_choice(family: &str, len: usize) -> Option<Variant> {
    if family == variant::select_variant(1).family() {
        return Some(crate::cuda::select::built_in_variant(len));
    }
    variant::family_members(family).first().copied()
}

/// The shipped tables: `(SM version, TOML)`.
const SHIPPED: [(u32, &str); 4] = [
    (80, include_str!("../../tuning/sm_80.toml")),
    (86, include_str!("../../tuning/sm_86.toml")),
    (89, include_str!("../../tuning/sm_89.toml")),
    (90, include_str!("../../tuning/sm_90.toml")),
];

/// Today's date (UTC) as `YYYY-MM-DD`, what tables record in `meta.date`.
pub fn today_utc() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // Days to a civil date (proleptic Gregorian), H. Hinnant's algorithm.
    let z = (secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The shipped table of SM version `arch`, parsed once per process (plans consult it per round).
fn shipped_table(arch: u32) -> Option<Arc<Tuning>> {
    static PARSED: std::sync::OnceLock<Vec<(u32, Option<Arc<Tuning>>)>> = std::sync::OnceLock::new();
    let parsed = PARSED.get_or_init(|| {
        // Shipped tables name only compiled variants (a test pins it); an arch-mismatched build
        // (fewer variants) drops what does not resolve.
        SHIPPED
            .iter()
            .map(|(a, text)| {
                (*a, Tuning::parse(text, &format!("shipped sm_{a}"), Strictness::Implicit).ok().map(Arc::new))
            })
            .collect()
    });
    parsed.iter().find(|(a, _)| *a == arch).and_then(|(_, t)| t.clone())
}

/// The CUDA toolkit version (`13.0`) that compiled this build's kernels, if it compiled any.
pub fn built_toolkit() -> Option<&'static str> {
    option_env!("TRIATTN_NVCC_VERSION").filter(|v| !v.is_empty())
}

/// Where `triattn autotune` writes (and the runtime finds) the table of `device` (`emu`, or the
/// device name with its arch, e.g. `NVIDIA H200 sm_90`): `$XDG_CONFIG_HOME/triattn/tuning/` (or
/// `~/.config/triattn/tuning/`, `%APPDATA%\triattn\tuning\`), the name lowercased with runs of
/// other characters as `-`, `.toml`. `None` without a home folder.
pub fn default_path(device: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("APPDATA").filter(|v| !v.is_empty()).map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config")))?;
    let mut slug = String::new();
    for c in device.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    let slug = slug.trim_matches('-');
    Some(base.join("triattn").join("tuning").join(format!("{}.toml", if slug.is_empty() { "device" } else { slug })))
}

/// The device a table is for on `backend`: its name for [`default_path`] (`NVIDIA H200 sm_90`,
/// or `emu`), the staleness target, and the SM version of a GPU.
pub fn device_of(backend: &crate::round::Backend) -> (String, Target, Option<u32>) {
    match backend {
        #[cfg(feature = "cuda")]
        crate::round::Backend::Cuda(dev) => {
            let b = dev.backend();
            let arch = format!("sm_{}", b.arch());
            (
                format!("{} {arch}", b.device_name()),
                Target { arch, sm_count: Some(b.sm_count() as u32) },
                Some(b.arch()),
            )
        }
        _ => ("emu".to_string(), Target { arch: "emu".to_string(), sm_count: None }, None),
    }
}

/// Where a chosen variant came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChoiceSource {
    /// The built-in rule of [`crate::kernels::variant`].
    BuiltIn,
    /// The shipped table of the device's arch.
    Shipped,
    /// The user's table ([`Dispatch::user`]).
    User,
}

/// The tables a plan consults, in order: the user's, the shipped one of the device's arch, then
/// the built-in rule. Cheap to clone (the tables are shared).
#[derive(Clone, Debug, Default)]
pub struct Dispatch {
    user: Option<Arc<Tuning>>,
    shipped: Option<Arc<Tuning>>,
}

impl Dispatch {
    /// The built-in rule only (what plans use unless given another dispatch).
    pub fn built_in() -> Self {
        Self::default()
    }

    /// The user's `table` (if any) over the shipped table of SM version `arch` (if any).
    pub fn new(user: Option<Tuning>, arch: Option<u32>) -> Self {
        Self { user: user.map(Arc::new), shipped: arch.and_then(shipped_table) }
    }

    /// A dispatch that runs `variants` (one per family) for every shape: what tests and
    /// `triattn autotune` use to run a chosen candidate through the normal planning path.
    ///
    /// # Panics
    /// Never for variants of this build's table (they are compiled by definition).
    pub fn forcing(variants: &[Variant]) -> Self {
        let meta = TuningMeta {
            format: FORMAT.to_string(),
            arch: "any".to_string(),
            device: None,
            source: TableSource::Measured,
            variant_table: variant::table_hash(),
            sm_count: None,
            toolkit: None,
            driver: None,
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            date: String::new(),
        };
        let entries = variants
            .iter()
            .map(|v| TuningEntry {
                family: v.family(),
                variant: v.symbol(),
                max_len: None,
                max_batch: None,
                time_us: None,
                default_variant: None,
                default_us: None,
            })
            .collect();
        let table = Tuning::new(meta, entries, "forced").expect("variants of the table resolve");
        Self { user: Some(Arc::new(table)), shipped: None }
    }

    /// The user's table.
    pub fn user(&self) -> Option<&Tuning> {
        self.user.as_deref()
    }

    /// The shipped table in use.
    pub fn shipped(&self) -> Option<&Tuning> {
        self.shipped.as_deref()
    }

    /// The variant of `family` for `shape`: the first table with an entry whose bucket holds it
    /// and whose variant the caller `accept`s (it fits the shape); `None`: the built-in rule.
    pub fn pick(
        &self,
        family: &str,
        shape: Bucket,
        accept: &dyn Fn(Variant) -> bool,
    ) -> Option<(Variant, ChoiceSource)> {
        if let Some(v) = self.user.as_ref().and_then(|t| t.lookup(family, shape, accept)) {
            return Some((v, ChoiceSource::User));
        }
        self.shipped.as_ref().and_then(|t| t.lookup(family, shape, accept)).map(|v| (v, ChoiceSource::Shipped))
    }

    /// Where `source` points, for `--verbose`: `built-in`, `shipped sm_90`, `tuning: FILE`.
    pub fn describe(&self, source: ChoiceSource) -> String {
        match source {
            ChoiceSource::BuiltIn => "built-in".to_string(),
            ChoiceSource::Shipped => self.shipped.as_ref().map_or("shipped".to_string(), |t| t.origin.clone()),
            ChoiceSource::User => {
                format!("tuning: {}", self.user.as_ref().map_or("user table", |t| t.origin.as_str()))
            }
        }
    }

    /// The tables for plans on `backend`: the user's table (`explicit`, else [`ENV`], else the
    /// per-device file of an earlier `triattn autotune`) over the shipped table of the GPU's
    /// arch, and the warnings to show once (stale or implicit tables). On the CPU backend an
    /// explicit table is read and checked, and nothing is looked up.
    ///
    /// # Errors
    /// What [`Tuning::load`] refuses, for an explicitly named table (`explicit` or [`ENV`]).
    pub fn resolve(backend: &crate::round::Backend, explicit: Option<&Path>) -> Result<(Self, Vec<String>)> {
        let mut warnings = Vec::new();
        if backend.is_cpu() {
            if let Some(path) = explicit {
                Tuning::load(path).map_err(|e| e.context("--tuning"))?;
            }
            return Ok((Self::built_in(), warnings));
        }
        let (device, target, arch) = device_of(backend);
        let user = Self::user_table(explicit, &device, &target, &mut |w| warnings.push(w))?;
        Ok((Self::new(user, arch), warnings))
    }

    /// The user table for a run: the file named by `explicit` (a `--tuning` flag), else by
    /// [`ENV`], else the per-device file of an earlier autotune for `device`. Warnings to print
    /// once go to `warn`.
    ///
    /// # Errors
    /// What [`Tuning::load`] refuses, for an explicitly named table.
    pub fn user_table(
        explicit: Option<&Path>,
        device: &str,
        target: &Target,
        warn: &mut dyn FnMut(String),
    ) -> Result<Option<Tuning>> {
        let env = std::env::var(ENV).ok().filter(|v| !v.is_empty());
        if explicit.is_none() && env.as_deref() == Some("off") {
            return Ok(None);
        }
        let mut table = match explicit.map(Path::to_path_buf).or_else(|| env.map(PathBuf::from)) {
            Some(path) => Tuning::load(&path).map_err(|e| e.context("--tuning"))?,
            None => match Tuning::find_implicit(device) {
                Ok(Some(t)) => t,
                Ok(None) => return Ok(None),
                Err(w) => {
                    warn(w);
                    return Ok(None);
                }
            },
        };
        table.check_target(target);
        for w in table.warnings() {
            warn(w.clone());
        }
        Ok(Some(table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    fn meta(hash: &str) -> String {
        format!(
            "[meta]\nformat = \"{FORMAT}\"\narch = \"emu\"\nsource = \"measured\"\nvariant_table = \"{hash}\"\ncrate_version = \"0.2.0\"\ndate = \"2026-12-03\"\n"
        )
    }

    fn entry(family: &str, variant: &str, extra: &str) -> String {
        format!("\n[[entry]]\nfamily = \"{family}\"\nvariant = \"{variant}\"\n{extra}")
    }

    #[test]
    fn lookup_takes_the_first_entry_whose_bucket_holds_the_shape() {
        let fam = "compact bytes hole";
        let members = variant::family_members(fam);
        assert!(members.len() >= 3, "compact has alternatives: {members:?}");
        let text = format!(
            "{}{}{}",
            meta(&variant::table_hash()),
            entry(fam, &members[1].symbol(), "max_len = 4096\nmax_batch = 4\n"),
            entry(fam, &members[2].symbol(), "")
        );
        let t = Tuning::parse(&text, "t.toml", Strictness::Explicit).unwrap();
        assert!(t.warnings().is_empty(), "{:?}", t.warnings());
        let any = |_: Variant| true;
        assert_eq!(t.lookup(fam, Bucket { len: 4096, batch: 4 }, &any), Some(members[1]));
        assert_eq!(t.lookup(fam, Bucket { len: 4097, batch: 1 }, &any), Some(members[2]));
        assert_eq!(t.lookup(fam, Bucket { len: 10, batch: 5 }, &any), Some(members[2]));
        assert_eq!(t.lookup(fam, Bucket { len: 10, batch: 1 }, &|v| v != members[1]), Some(members[2]));
        assert_eq!(t.lookup("compact bytes order", Bucket { len: 10, batch: 1 }, &any), None);
        let d = Dispatch::new(Some(t.clone()), None);
        assert_eq!(d.pick(fam, Bucket { len: 1, batch: 1 }, &any), Some((members[1], ChoiceSource::User)));
        assert_eq!(d.describe(ChoiceSource::User), "tuning: t.toml");
        // The round trip keeps every field.
        let again = Tuning::parse(&t.to_toml(), "t.toml", Strictness::Explicit).unwrap();
        assert_eq!((again.meta(), again.entries()), (t.meta(), t.entries()));
    }

    #[test]
    fn explicit_tables_are_refused_by_line_or_entry_implicit_ones_drop_entries() {
        let hash = variant::table_hash();
        let bad_toml = format!("{}\n[[entry]]\nfamily = \"select f32\"\nvarient = \"x\"\n", meta(&hash));
        let e = Tuning::parse(&bad_toml, "t.toml", Strictness::Explicit).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidFormat);
        assert!(e.message().starts_with("tuning table t.toml line 10: unknown field `varient`"), "{}", e.message());
        assert!(!e.message().contains('\n'), "one line: {}", e.message());

        let missing = format!("{}{}", meta(&hash), entry("select f32", "triattn_select_f32_nt4096", ""));
        let e = Tuning::parse(&missing, "t.toml", Strictness::Explicit).unwrap_err();
        assert_eq!(
            e.message(),
            "tuning table t.toml: entry 1 (family \"select f32\", variant triattn_select_f32_nt4096): the variant is not compiled in this build"
        );
        let implicit = Tuning::parse(&missing, "t.toml", Strictness::Implicit).unwrap();
        assert!(implicit.entries().is_empty());
        assert_eq!(implicit.warnings().len(), 1, "{:?}", implicit.warnings());

        let wrong_family = format!(
            "{}{}",
            meta(&hash),
            entry("select f32", &variant::compact_variant(variant::CompactMode::HoleFilling).symbol(), "")
        );
        let e = Tuning::parse(&wrong_family, "t.toml", Strictness::Explicit).unwrap_err();
        assert!(e.message().ends_with("the variant belongs to family \"compact bytes hole\""), "{}", e.message());

        let bad_format = meta(&hash).replace(FORMAT, "triattn-tuning-v0");
        let e = Tuning::parse(&bad_format, "t.toml", Strictness::Explicit).unwrap_err();
        assert!(e.message().contains("meta.format: expected \"triattn-tuning-v1\", got \"triattn-tuning-v0\""));
    }

    #[test]
    fn stale_tables_keep_the_entries_that_resolve_with_one_warning() {
        let text = format!(
            "{}{}{}",
            meta("0000000000000000"),
            entry("select f32", "triattn_select_f32_nt128", ""),
            entry("select f32", "triattn_select_f32_nt4096", "")
        );
        let mut t = Tuning::parse(&text, "old.toml", Strictness::Explicit).unwrap();
        assert_eq!(t.entries().len(), 1);
        assert_eq!(t.warnings().len(), 1);
        assert!(t.warnings()[0].contains("is stale") && t.warnings()[0].contains("(1 dropped)"), "{:?}", t.warnings());
        assert!(t.check_target(&Target { arch: "sm_90".into(), sm_count: None }));
        assert!(t.warnings()[1].contains("arch emu (running on sm_90)"), "{:?}", t.warnings());
        assert!(!t.check_target(&Target { arch: "emu".into(), sm_count: Some(7) }));
    }

    #[test]
    fn default_paths_are_per_device_under_the_config_folder() {
        let p = default_path("NVIDIA H200 sm_90").unwrap();
        assert!(p.ends_with("triattn/tuning/nvidia-h200-sm-90.toml"), "{}", p.display());
    }

    #[test]
    fn shipped_tables_parse_and_name_only_compiled_variants() {
        for (arch, text) in SHIPPED {
            let t = Tuning::parse(text, &format!("tuning/sm_{arch}.toml"), Strictness::Explicit)
                .unwrap_or_else(|e| panic!("tuning/sm_{arch}.toml: {}", e.message()));
            assert_eq!(t.meta().arch, format!("sm_{arch}"));
            assert!(
                t.meta().device.is_none() || t.meta().source == TableSource::Measured,
                "arch-wide tables are modelled"
            );
            assert!(t.warnings().is_empty(), "tuning/sm_{arch}.toml: {:?}", t.warnings());
            assert!(Tuning::shipped(arch).is_some());
        }
    }
}
