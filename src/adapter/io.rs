//! Adapter files, in the two layouts the PyTorch implementations read and write.
//!
//! **Official GIFT layout** ([`save_gift`], [`load_gift`]) — one safetensors file, the state
//! dict of `GIFTWrapperForCausalLM` minus the frozen backbone:
//!
//! | key | shape | value |
//! |---|---|---|
//! | `in_projections.<module>.weight` | `r x d_in` | `phi^T` |
//! | `out_projections.<module>.weight` | `d_in x r` | `psi^T` |
//!
//! `<module>` is a module name (`q_proj`, ...), one pair per module type, or
//! `shared_projection` (the official `share_projections=True`: one pair for every module).
//! Beside it, `<file>.json` (same stem) holds the configuration (rank, targets, alpha, ...);
//! the official code only needs the tensors. Without that JSON, [`load_gift`] infers rank and
//! targets from the tensors, with scale 1 (alpha `None`), as the official wrapper uses.
//!
//! **PEFT-fork layout** ([`save_peft`], [`load_peft`]) — a directory with `adapter_config.json`
//! (`peft_type` `"WEGEFT"`, `r`, `wegeft_alpha`, `target_modules`, `tied_modules`,
//! `wegeft_dropout`, `transform_dim` `"input"`, ...) and `adapter_model.safetensors` with, for
//! the layer that owns each pair (the first site of its group in model order):
//!
//! | key | shape | value |
//! |---|---|---|
//! | `base_model.model.model.layers.<L>.<self_attn\|mlp>.<module>.wegeft_phi.weight` | `r x d_in` | `phi^T` |
//! | `base_model.model.model.layers.<L>.<self_attn\|mlp>.<module>.wegeft_psi.weight` | `r x d_in` | `psi` |
//!
//! The fork's `tied_modules` is a list of groups of regular expressions; a module (full key
//! `model.layers.<L>.<parent>.<module>`) belongs to the first group with a pattern that
//! `re.match`es it (anchored at the start only), and the first module of a group in model
//! order owns the pair. Note that the fork's default, `[[m] for m in target_modules]`, never
//! matches a full key with `re.match`, so by default the fork shares nothing. We write
//! patterns that match (`.*\.q_proj$` for per-module sharing, one anchored literal per site
//! for explicit layer groups) and read the subset of regex syntax they and plain names use
//! (literals, `\.`-style escapes, `.`, `\d`, `*`, `+`, `?`, `(a|b)` groups, `$`); other syntax is
//! an error, not a guess.
//!
//! **Reading checks everything**: unknown or missing keys, shapes against the rank and the
//! model's dims, rank consistency, dtypes. F32 is taken as is; F16, BF16 and F64 are converted
//! to f32 (F64 rounds to nearest); any other dtype, and any NaN or infinity, is an error. Errors are
//! [`Error::Format`] naming the file and the key. **Writing is atomic**: a temporary file in the
//! same directory, fsync, rename (then fsync of the directory).

use super::config::{AdapterConfig, Init, ModelDims, Module, ShareGroup, Sharing};
use super::Adapter;
use crate::error::{Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Metadata key under which both layouts also store this crate's exact [`AdapterConfig`].
pub const META_CONFIG: &str = "wegeft.config";
/// File names of the PEFT layout.
pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, `fsync`,
/// `rename` over `path`, then `fsync` of the directory. A crash leaves the old file or the new
/// one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| Error::invalid("path", format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all(); // best effort: not every platform can fsync a directory
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

// ---------------------------------------------------------------------------------------------
// tensors in and out

pub(super) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// `a` (`rows x cols`) transposed.
fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; a.len()];
    for i in 0..rows {
        for j in 0..cols {
            t[j * rows + i] = a[i * cols + j];
        }
    }
    t
}

pub(super) struct Owned {
    pub(super) shape: Vec<usize>,
    pub(super) data: Vec<u8>,
}

impl safetensors::View for &Owned {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Owned>, meta: HashMap<String, String>) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta))
        .map_err(|e| Error::format(path, format!("serialising: {e}")))?;
    write_atomic(path, &bytes)
}

/// The tensor `key` of `st` as f32 with exactly `shape`, converting F16/BF16/F64.
fn read_f32(path: &Path, st: &SafeTensors, key: &str, shape: (usize, usize)) -> Result<Vec<f32>> {
    let view = st.tensor(key).map_err(|_| Error::format(path, format!("missing tensor {key}")))?;
    if view.shape() != [shape.0, shape.1] {
        return Err(Error::format(
            path,
            format!("tensor {key}: shape {:?}, expected [{}, {}]", view.shape(), shape.0, shape.1),
        ));
    }
    let b = view.data();
    let v: Vec<f32> = match view.dtype() {
        Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F64 => b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
        Dtype::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        d => return Err(Error::format(path, format!("tensor {key}: dtype {d:?} is not a float type (F32, F16, BF16, F64)"))),
    };
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::format(path, format!("tensor {key}: element {i} is not finite ({})", v[i])));
    }
    Ok(v)
}

fn open(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

fn parse_st<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))
}

fn meta_config(path: &Path, bytes: &[u8]) -> Result<Option<AdapterConfig>> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
    match meta.metadata().as_ref().and_then(|m| m.get(META_CONFIG)) {
        None => Ok(None),
        Some(s) => serde_json::from_str(s)
            .map(Some)
            .map_err(|e| Error::format(path, format!("metadata {META_CONFIG}: {e}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// official GIFT layout

/// The JSON written beside a GIFT-layout file.
#[derive(serde::Serialize, serde::Deserialize)]
struct GiftJson {
    rank: usize,
    target_modules: Vec<String>,
    share_projections: bool,
    in_projection_bias: bool,
    out_projection_bias: bool,
    /// `null`: scale 1.
    alpha: Option<f32>,
    dropout: f32,
    seed: u64,
    init: Init,
}

/// `<file>.json` beside a GIFT-layout `<file>.safetensors`.
pub fn gift_json_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

/// Writes `adapter` in the official GIFT layout (see the module docs) to `path`, plus the JSON
/// config at [`gift_json_path`]. Only per-module sharing, or one group of all targets over all
/// layers (`shared_projection`), exist in that layout; other sharing is an error.
pub fn save_gift(adapter: &Adapter, path: &Path) -> Result<()> {
    let c = &adapter.config;
    let shared = match &c.sharing {
        Sharing::PerModule => false,
        Sharing::Groups(g)
            if g.len() == 1 && g[0].layers.is_none() && c.targets.iter().all(|m| g[0].modules.contains(m)) =>
        {
            true
        }
        _ => {
            return Err(Error::invalid(
                "adapter",
                "the GIFT layout holds one pair per module type or one shared pair; use the PEFT layout for other sharing",
            ))
        }
    };
    let r = c.rank;
    let mut t = BTreeMap::new();
    for p in adapter.pairs() {
        let name = if shared { "shared_projection".to_string() } else { p.name.clone() };
        t.insert(format!("in_projections.{name}.weight"), Owned { shape: vec![r, p.d_in], data: f32_bytes(&transpose(&p.phi, p.d_in, r)) });
        t.insert(format!("out_projections.{name}.weight"), Owned { shape: vec![p.d_in, r], data: f32_bytes(&transpose(&p.psi, r, p.d_in)) });
    }
    let cfg_json = serde_json::to_string(c).map_err(|e| Error::format(path, e.to_string()))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert(META_CONFIG.to_string(), cfg_json);
    write_safetensors(path, &t, meta)?;
    let targets: Vec<Module> = Module::ALL.into_iter().filter(|m| c.targets.contains(m)).collect();
    let j = GiftJson {
        rank: r,
        target_modules: targets.iter().map(|m| m.name().to_string()).collect(),
        share_projections: shared,
        in_projection_bias: false,
        out_projection_bias: false,
        alpha: c.alpha,
        dropout: c.dropout,
        seed: c.seed,
        init: c.init,
    };
    let jp = gift_json_path(path);
    let bytes = serde_json::to_vec_pretty(&j).map_err(|e| Error::format(&jp, e.to_string()))?;
    write_atomic(&jp, &bytes)
}

/// Reads an official-layout adapter for a model with `dims` (see the module docs for what is
/// checked). The JSON beside it, when present, gives alpha, dropout, seed and init and must
/// agree with the tensors; without it the adapter has scale 1, no dropout, seed 0.
pub fn load_gift(path: &Path, dims: &ModelDims) -> Result<Adapter> {
    let bytes = open(path)?;
    let st = parse_st(path, &bytes)?;
    // collect module names of in/out projections
    let mut ins: BTreeMap<String, ()> = BTreeMap::new();
    let mut outs: BTreeMap<String, ()> = BTreeMap::new();
    let mut names = st.names();
    names.sort_unstable();
    for name in names {
        let parse = |prefix: &str| name.strip_prefix(prefix).and_then(|s| s.strip_suffix(".weight")).map(str::to_string);
        if let Some(m) = parse("in_projections.") {
            ins.insert(m, ());
        } else if let Some(m) = parse("out_projections.") {
            outs.insert(m, ());
        } else {
            return Err(Error::format(
                path,
                format!("unexpected tensor {name} (expected in_projections.<module>.weight / out_projections.<module>.weight; biases and hypernets are not supported)"),
            ));
        }
    }
    for (a, b, what) in [(&ins, &outs, "out_projections"), (&outs, &ins, "in_projections")] {
        if let Some(m) = a.keys().find(|m| !b.contains_key(*m)) {
            return Err(Error::format(path, format!("missing tensor {what}.{m}.weight")));
        }
    }
    if ins.is_empty() {
        return Err(Error::format(path, "no in_projections.<module>.weight tensor"));
    }
    let shared = ins.contains_key("shared_projection");
    if shared && ins.len() > 1 {
        return Err(Error::format(path, "shared_projection mixed with per-module projections"));
    }
    // JSON beside, if any
    let jp = gift_json_path(path);
    let json: Option<GiftJson> = match std::fs::read(&jp) {
        Ok(b) => Some(serde_json::from_slice(&b).map_err(|e| Error::format(&jp, e.to_string()))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&jp, e)),
    };
    let targets: Vec<Module> = if shared {
        let j = json.as_ref().ok_or_else(|| {
            Error::format(path, format!("shared_projection needs the target list from {}", jp.display()))
        })?;
        j.target_modules.iter().map(|s| Module::parse(s)).collect::<Result<_>>().map_err(|e| Error::format(&jp, e.to_string()))?
    } else {
        ins.keys()
            .map(|s| Module::parse(s).map_err(|_| Error::format(path, format!("tensor in_projections.{s}.weight: unknown module {s:?}"))))
            .collect::<Result<_>>()?
    };
    // rank from the first in-projection
    let first = format!("in_projections.{}.weight", ins.keys().next().unwrap());
    let view = st.tensor(&first).map_err(|e| Error::format(path, e.to_string()))?;
    if view.shape().len() != 2 || view.shape()[0] == 0 {
        return Err(Error::format(path, format!("tensor {first}: shape {:?} is not r x d_in", view.shape())));
    }
    let rank = view.shape()[0];
    let mut config = AdapterConfig::new(rank, targets.clone()).map_err(|e| Error::format(path, e.to_string()))?;
    if shared {
        config.sharing = Sharing::Groups(vec![ShareGroup { modules: targets.clone(), layers: None }]);
    }
    if let Some(j) = &json {
        if j.rank != rank {
            return Err(Error::format(&jp, format!("rank {} but the tensors have rank {rank}", j.rank)));
        }
        let mut jt: Vec<Module> = j.target_modules.iter().map(|s| Module::parse(s)).collect::<Result<_>>().map_err(|e| Error::format(&jp, e.to_string()))?;
        let mut tt = targets.clone();
        jt.sort();
        tt.sort();
        if jt != tt {
            return Err(Error::format(&jp, format!("target_modules {:?} but the tensors hold {:?}", j.target_modules, tt)));
        }
        if j.share_projections != shared {
            return Err(Error::format(&jp, "share_projections disagrees with the tensors"));
        }
        if j.in_projection_bias || j.out_projection_bias {
            return Err(Error::format(&jp, "projection biases are not supported"));
        }
        config.alpha = j.alpha;
        config.dropout = j.dropout;
        config.seed = j.seed;
        config.init = j.init;
        config.validate().map_err(|e| Error::format(&jp, e.to_string()))?;
    }
    config.validate_for(dims).map_err(|e| Error::format(path, e.to_string()))?;
    let names = Adapter::pair_names(&config, dims)?;
    let mut values = Vec::with_capacity(names.len());
    for (name, d_in) in names.iter().zip(super::layout(&config, dims)?.0.iter().map(|p| p.1)) {
        let key = if shared { "shared_projection" } else { name.as_str() };
        let inp = read_f32(path, &st, &format!("in_projections.{key}.weight"), (rank, d_in))?;
        let out = read_f32(path, &st, &format!("out_projections.{key}.weight"), (d_in, rank))?;
        values.push((transpose(&inp, rank, d_in), transpose(&out, d_in, rank)));
    }
    Adapter::from_values(config, *dims, values)
}

// ---------------------------------------------------------------------------------------------
// PEFT-fork layout

/// A tiny regular-expression matcher for `tied_modules` patterns, with Python `re.match`
/// semantics (anchored at the start, not at the end unless `$`).
mod pattern {
    #[derive(Clone, Debug)]
    enum Atom {
        Char(char),
        Any,
        Digit,
        Alt(Vec<String>),
    }
    #[derive(Clone, Copy, Debug)]
    enum Rep {
        One,
        Star,
        Plus,
        Opt,
    }
    #[derive(Clone, Debug)]
    pub struct Pattern {
        items: Vec<(Atom, Rep)>,
        end: bool,
    }

    pub fn compile(p: &str) -> Result<Pattern, String> {
        let cs: Vec<char> = p.chars().collect();
        let mut items = Vec::new();
        let mut end = false;
        let mut i = 0;
        while i < cs.len() {
            if end {
                return Err("text after `$`".into());
            }
            let atom = match cs[i] {
                '\\' => {
                    i += 1;
                    match cs.get(i) {
                        Some('d') => Atom::Digit,
                        Some(&c) if !c.is_alphanumeric() => Atom::Char(c),
                        Some(c) => return Err(format!("unsupported escape \\{c}")),
                        None => return Err("trailing backslash".into()),
                    }
                }
                '.' => Atom::Any,
                '$' => {
                    end = true;
                    i += 1;
                    continue;
                }
                '(' => {
                    let close = cs[i..].iter().position(|&c| c == ')').ok_or("unclosed `(`")? + i;
                    let inner: String = cs[i + 1..close].iter().collect();
                    let inner = inner.strip_prefix("?:").unwrap_or(&inner).to_string();
                    if inner.chars().any(|c| "\\.()[]{}*+?^$".contains(c)) {
                        return Err(format!("group ({inner}) is not a plain alternation"));
                    }
                    i = close;
                    Atom::Alt(inner.split('|').map(str::to_string).collect())
                }
                c if "[]{}^|)".contains(c) => return Err(format!("unsupported syntax `{c}`")),
                '*' | '+' | '?' => return Err("quantifier without an atom".into()),
                c => Atom::Char(c),
            };
            i += 1;
            let rep = match cs.get(i) {
                Some('*') => Rep::Star,
                Some('+') => Rep::Plus,
                Some('?') => Rep::Opt,
                _ => Rep::One,
            };
            if !matches!(rep, Rep::One) {
                i += 1;
                if matches!(cs.get(i), Some('?') | Some('+') | Some('*')) {
                    return Err("lazy/possessive quantifiers are not supported".into());
                }
            }
            items.push((atom, rep));
        }
        Ok(Pattern { items, end })
    }

    /// Lengths of the ways `atom` can match at the start of `s`.
    fn atom_lens(atom: &Atom, s: &[char]) -> Vec<usize> {
        match atom {
            Atom::Char(c) => (s.first() == Some(c)).then_some(1).into_iter().collect(),
            Atom::Any => (!s.is_empty() && s[0] != '\n').then_some(1).into_iter().collect(),
            Atom::Digit => s.first().filter(|c| c.is_ascii_digit()).map(|_| 1).into_iter().collect(),
            Atom::Alt(alts) => alts
                .iter()
                .filter(|a| {
                    let a: Vec<char> = a.chars().collect();
                    s.len() >= a.len() && s[..a.len()] == a[..]
                })
                .map(|a| a.chars().count())
                .collect(),
        }
    }

    fn m(items: &[(Atom, Rep)], end: bool, s: &[char]) -> bool {
        let Some(((atom, rep), rest)) = items.split_first() else {
            return !end || s.is_empty();
        };
        match rep {
            Rep::One => atom_lens(atom, s).into_iter().any(|l| m(rest, end, &s[l..])),
            Rep::Opt => atom_lens(atom, s).into_iter().any(|l| m(rest, end, &s[l..])) || m(rest, end, s),
            Rep::Star | Rep::Plus => {
                if !matches!(rep, Rep::Plus) && m(rest, end, s) {
                    return true;
                }
                atom_lens(atom, s).into_iter().any(|l| l > 0 && m(&[(atom.clone(), Rep::Star)].iter().cloned().chain(rest.iter().cloned()).collect::<Vec<_>>(), end, &s[l..]))
            }
        }
    }

    impl Pattern {
        /// Python `re.match(pattern, s) is not None`.
        pub fn matches(&self, s: &str) -> bool {
            let cs: Vec<char> = s.chars().collect();
            m(&self.items, self.end, &cs)
        }
    }
}

/// `re.escape` of a literal for the patterns we write.
pub(super) fn re_escape(s: &str) -> String {
    s.chars().map(|c| if c.is_alphanumeric() || c == '_' { c.to_string() } else { format!("\\{c}") }).collect()
}

/// `tied_modules` patterns describing `config`'s sharing (see the module docs).
fn tied_modules(config: &AdapterConfig, dims: &ModelDims) -> Vec<Vec<String>> {
    let targets: Vec<Module> = Module::ALL.into_iter().filter(|m| config.targets.contains(m)).collect();
    match &config.sharing {
        Sharing::PerModule => targets.iter().map(|m| vec![format!(".*\\.{}$", m.name())]).collect(),
        Sharing::None => Vec::new(),
        Sharing::Groups(groups) => groups
            .iter()
            .enumerate()
            .map(|(gi, _)| {
                let mut pats = Vec::new();
                for l in 0..dims.n_layers {
                    for m in Module::ALL {
                        if config.targets.contains(&m) && config.group_of(l, m) == Some(gi) {
                            pats.push(format!("{}$", re_escape(&m.key(l))));
                        }
                    }
                }
                pats
            })
            .filter(|p| !p.is_empty())
            .collect(),
    }
}

fn peft_key(layer: usize, m: Module, which: &str) -> String {
    format!("base_model.model.{}.wegeft_{which}.weight", m.key(layer))
}

/// Writes `adapter` as a PEFT-fork adapter directory `dir` (created if needed):
/// `adapter_config.json` and `adapter_model.safetensors`, each atomically. The scale maps to
/// `wegeft_alpha = alpha` (or `r` for scale 1). Dropout and init are recorded in the config.
pub fn save_peft(adapter: &Adapter, dir: &Path) -> Result<()> {
    let c = &adapter.config;
    let r = c.rank;
    let mut t = BTreeMap::new();
    for p in adapter.pairs() {
        let (l, m) = p.sites[0];
        t.insert(peft_key(l, m, "phi"), Owned { shape: vec![r, p.d_in], data: f32_bytes(&transpose(&p.phi, p.d_in, r)) });
        t.insert(peft_key(l, m, "psi"), Owned { shape: vec![r, p.d_in], data: f32_bytes(&p.psi) });
    }
    let config = serde_json::to_string(c).map_err(|e| Error::invalid("adapter config", e.to_string()))?;
    let targets: Vec<&str> = Module::ALL.into_iter().filter(|m| c.targets.contains(m)).map(|m| m.name()).collect();
    let cfg = serde_json::json!({
        "peft_type": "WEGEFT",
        "r": r,
        "wegeft_alpha": c.alpha.unwrap_or(r as f32),
        "transform_dim": "input",
        "target_modules": targets,
        "tied_modules": tied_modules(c, &adapter.dims),
        "wegeft_dropout": if c.dropout > 0.0 { serde_json::json!(c.dropout) } else { serde_json::Value::Null },
        "init_wegeft_weights": true,
    });
    write_peft_dir(dir, &t, Some(config), cfg)
}

/// Writes a PEFT adapter directory `dir` (created if needed): `adapter_model.safetensors`
/// (`tensors`, f32, with this crate's [`AdapterConfig`] JSON under [`META_CONFIG`] where given)
/// and `adapter_config.json` (`config`'s keys plus the ones every config written here shares:
/// a causal LM, no base model path, inference mode, no bias, no layer or rank patterns), each
/// atomically.
pub(super) fn write_peft_dir(
    dir: &Path,
    tensors: &BTreeMap<String, Owned>,
    adapter_config: Option<String>,
    config: serde_json::Value,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    if let Some(c) = adapter_config {
        meta.insert(META_CONFIG.to_string(), c);
    }
    write_safetensors(&dir.join(PEFT_WEIGHTS_FILE), tensors, meta)?;
    let mut cfg = serde_json::json!({
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": null,
        "revision": null,
        "inference_mode": true,
        "fan_in_fan_out": false,
        "bias": "none",
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    if let (Some(all), serde_json::Value::Object(own)) = (cfg.as_object_mut(), config) {
        all.extend(own);
    }
    let cpath = dir.join(PEFT_CONFIG_FILE);
    let bytes = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::format(&cpath, e.to_string()))?;
    write_atomic(&cpath, &bytes)
}

/// Reads a PEFT-fork adapter directory for a model with `dims`. The sharing comes from
/// `tied_modules` with the fork's semantics; every key of the owner layers must be present
/// with shape `r x d_in`, and no other key. Options this crate does not implement
/// (`transform_dim` "output", `rank_pattern`, `alpha_pattern`, `layers_to_transform`, a regex
/// string for `target_modules`, `bias` other than "none") are errors.
pub fn load_peft(dir: &Path, dims: &ModelDims) -> Result<Adapter> {
    let cpath = dir.join(PEFT_CONFIG_FILE);
    let cbytes = open(&cpath)?;
    let j: serde_json::Value = serde_json::from_slice(&cbytes).map_err(|e| Error::format(&cpath, e.to_string()))?;
    let fe = |msg: String| Error::format(&cpath, msg);
    let get = |k: &str| j.get(k).filter(|v| !v.is_null());
    if let Some(t) = get("peft_type") {
        if !t.as_str().is_some_and(|s| s.eq_ignore_ascii_case("wegeft")) {
            return Err(fe(format!("peft_type {t} is not WEGEFT")));
        }
    }
    let rank = get("r").and_then(|v| v.as_u64()).ok_or_else(|| fe("missing or invalid \"r\"".into()))? as usize;
    let alpha = match get("wegeft_alpha") {
        None => 8.0, // the fork's default
        Some(v) => v.as_f64().ok_or_else(|| fe(format!("wegeft_alpha {v} is not a number")))? as f32,
    };
    let targets: Vec<Module> = match get("target_modules") {
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| {
                let s = v.as_str().ok_or_else(|| fe(format!("target_modules entry {v} is not a string")))?;
                let last = s.rsplit('.').next().unwrap_or(s);
                Module::parse(last).map_err(|e| fe(e.to_string()))
            })
            .collect::<Result<_>>()?,
        other => return Err(fe(format!("target_modules must be a list of module names, got {other:?}"))),
    };
    match get("transform_dim") {
        None => {}
        Some(serde_json::Value::String(s)) if s == "input" => {}
        Some(serde_json::Value::Object(o)) if o.values().all(|v| v.as_str() == Some("input")) => {}
        Some(v) => return Err(fe(format!("transform_dim {v} is not supported (only \"input\")"))),
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k).is_some_and(|v| v.as_object().map_or(true, |o| !o.is_empty())) {
            return Err(fe(format!("{k} is not supported")));
        }
    }
    if get("layers_to_transform").is_some() {
        return Err(fe("layers_to_transform is not supported".into()));
    }
    if let Some(b) = get("bias") {
        if b.as_str() != Some("none") {
            return Err(fe(format!("bias {b} is not supported")));
        }
    }
    let dropout = match get("wegeft_dropout") {
        None => 0.0,
        Some(v) => v.as_f64().ok_or_else(|| fe(format!("wegeft_dropout {v} is not a number")))? as f32,
    };
    // tied_modules -> groups of sites, with re.match on the full module key
    let tied: Vec<Vec<pattern::Pattern>> = match get("tied_modules") {
        None => targets.iter().map(|m| vec![pattern::compile(m.name()).unwrap()]).collect(),
        Some(serde_json::Value::Array(groups)) => groups
            .iter()
            .map(|g| {
                let pats: Vec<&serde_json::Value> = match g {
                    serde_json::Value::Array(p) => p.iter().collect(),
                    s @ serde_json::Value::String(_) => vec![s],
                    other => return Err(fe(format!("tied_modules entry {other} is not a list of patterns"))),
                };
                pats.into_iter()
                    .map(|p| {
                        let s = p.as_str().ok_or_else(|| fe(format!("tied_modules pattern {p} is not a string")))?;
                        pattern::compile(s).map_err(|e| fe(format!("tied_modules pattern {s:?}: {e}")))
                    })
                    .collect()
            })
            .collect::<Result<_>>()?,
        Some(v) => return Err(fe(format!("tied_modules {v} is not a list"))),
    };
    let mut site_group: BTreeMap<usize, Vec<(usize, Module)>> = BTreeMap::new();
    for l in 0..dims.n_layers {
        for m in Module::ALL {
            if !targets.contains(&m) {
                continue;
            }
            let key = m.key(l);
            if let Some(gi) = tied.iter().position(|g| g.iter().any(|p| p.matches(&key))) {
                site_group.entry(gi).or_default().push((l, m));
            }
        }
    }
    let all_layers: Vec<usize> = (0..dims.n_layers).collect();
    let sharing = if site_group.is_empty() {
        Sharing::None
    } else if site_group.len() == targets.len()
        && site_group.values().all(|s| s.iter().all(|x| x.1 == s[0].1) && s.iter().map(|x| x.0).collect::<Vec<_>>() == all_layers)
    {
        Sharing::PerModule
    } else {
        // explicit groups: one ShareGroup per (group, module set) with its layer list
        let mut groups = Vec::new();
        for sites in site_group.values() {
            let mut mods: Vec<Module> = sites.iter().map(|s| s.1).collect();
            mods.sort();
            mods.dedup();
            let mut layers: Vec<usize> = sites.iter().map(|s| s.0).collect();
            layers.dedup();
            // representable as modules x layers?
            if sites.len() != mods.len() * layers.len() {
                return Err(fe("a tied_modules group that is not a set of modules over a set of layers is not supported".into()));
            }
            let layers = if layers == all_layers { None } else { Some(layers) };
            groups.push(ShareGroup { modules: mods, layers });
        }
        Sharing::Groups(groups)
    };
    let config = AdapterConfig { rank, alpha: Some(alpha), targets, sharing, init: Init::Peft, dropout, seed: 0 };
    config.validate_for(dims).map_err(|e| fe(e.to_string()))?;

    let wpath = dir.join(PEFT_WEIGHTS_FILE);
    let bytes = open(&wpath)?;
    let st = parse_st(&wpath, &bytes)?;
    // our own exact config, when we wrote the file: keeps alpha None / seed / init
    let config = match meta_config(&wpath, &bytes)? {
        Some(mc) => {
            let same = mc.rank == config.rank
                && mc.scale() == config.scale()
                && Adapter::pair_names(&mc, dims).ok().map(|n| n.len()) == Some(layout_len(&config, dims)?)
                && super::layout(&mc, dims)?.0.iter().map(|p| p.2.clone()).collect::<Vec<_>>()
                    == super::layout(&config, dims)?.0.iter().map(|p| p.2.clone()).collect::<Vec<_>>();
            if !same {
                return Err(Error::format(&wpath, format!("metadata {META_CONFIG} disagrees with {PEFT_CONFIG_FILE}")));
            }
            mc
        }
        None => config,
    };
    let (lay, _) = super::layout(&config, dims)?;
    let mut expected = std::collections::BTreeSet::new();
    let mut values = Vec::with_capacity(lay.len());
    for (_, d_in, sites) in &lay {
        let (l, m) = sites[0];
        let (kphi, kpsi) = (peft_key(l, m, "phi"), peft_key(l, m, "psi"));
        let phi_t = read_f32(&wpath, &st, &kphi, (rank, *d_in))?;
        let psi = read_f32(&wpath, &st, &kpsi, (rank, *d_in))?;
        values.push((transpose(&phi_t, rank, *d_in), psi));
        expected.insert(kphi);
        expected.insert(kpsi);
    }
    let mut names = st.names();
    names.sort_unstable();
    if let Some(k) = names.into_iter().find(|k| !expected.contains(*k)) {
        return Err(Error::format(&wpath, format!("unexpected tensor {k} (not the owner of a pair under {PEFT_CONFIG_FILE})")));
    }
    Adapter::from_values(config, *dims, values)
}

fn layout_len(config: &AdapterConfig, dims: &ModelDims) -> Result<usize> {
    Ok(super::layout(config, dims)?.0.len())
}

#[cfg(test)]
mod tests {
    use super::pattern::compile;

    #[test]
    fn re_match_semantics() {
        let k = "model.layers.12.self_attn.q_proj";
        assert!(!compile("q_proj").unwrap().matches(k)); // re.match anchors at the start
        assert!(compile(".*q_proj").unwrap().matches(k));
        assert!(compile(r".*\.q_proj$").unwrap().matches(k));
        assert!(!compile(r".*\.k_proj$").unwrap().matches(k));
        assert!(compile(r"model\.layers\.\d+\.self_attn\.(q|k)_proj$").unwrap().matches(k));
        assert!(!compile(r"model\.layers\.1\.self_attn\.q_proj$").unwrap().matches(k));
        assert!(compile(r"model\.layers\.12\.self_attn\.q_proj$").unwrap().matches(k));
        assert!(compile("model").unwrap().matches(k));
        assert!(!compile(r".*q_proj$").unwrap().matches("model.layers.0.self_attn.q_proj_x"));
        assert!(compile("[ab]").is_err());
    }
}
