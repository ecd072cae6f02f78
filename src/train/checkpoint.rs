//! Checkpoints of a fine-tuning run, for `wegeft finetune --save-every N` and `--resume DIR`.
//!
//! A checkpoint is one file, `DIR/checkpoint.safetensors`, written atomically (a temporary file
//! in `DIR`, `fsync`, `rename` over the old checkpoint, `fsync` of `DIR`): a crash or a
//! `SIGKILL` at any moment leaves the previous checkpoint or the new one, never a torn file.
//! It holds everything the next step depends on, so that a run of `a` steps resumed for `b`
//! more ends bitwise equal to a run of `a + b` steps:
//!
//! | tensor (F32, 1-D) | value |
//! |---|---|
//! | `params.<k>.phi`, `params.<k>.psi` | pair `k` of the adapter (`phi` d_in x r, `psi` r x d_in, row-major) |
//! | `adamw.m.<k>.phi`, `adamw.m.<k>.psi` | AdamW first moments |
//! | `adamw.v.<k>.phi`, `adamw.v.<k>.psi` | AdamW second moments |
//!
//! and, as JSON in the metadata key `wegeft.checkpoint`: the format version, `step` (AdamW's
//! step count = steps done), the data position (`epoch`, `pos` of the batcher) and the
//! [`RunConfig`]. The random state is a function of counters: the shuffle of epoch `e` is
//! seeded by `seed ^ e * 0x9E3779B97F4A7C15` and step `t`'s weight-dropout masks by the
//! adapter seed and `t`, so the seeds (in the run config), `step` and `epoch` restore it.
//!
//! Resuming checks the saved [`RunConfig`] against the new run's, field by field: a different
//! model, data, adapter configuration (rank, targets, sharing, alpha, dropout, seed), optimiser
//! hyper-parameters, learning-rate schedule, gradient clipping, batch, batches per update,
//! sequence length or shuffle is an error naming the field and both values. Only the number of
//! steps may change (not for a decaying schedule, whose total is part of it).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::adapter::AdapterConfig;
use crate::error::{Error, Result};
use crate::model::LlamaConfig;
use crate::train::optim::AdamWConfig;
use crate::train::schedule::LrSchedule;

/// The file inside a checkpoint directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// The metadata key holding the JSON state.
pub const META_KEY: &str = "wegeft.checkpoint";
/// The format version written (and the only one read).
pub const VERSION: u32 = 1;

/// What defines a run, besides its length: a resumed run must have the same.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// File (or directory) name of the model, its size in bytes (0 for a directory) and its
    /// configuration.
    pub model_name: String,
    pub model_bytes: u64,
    pub model_config: LlamaConfig,
    pub adapter: AdapterConfig,
    pub optim: AdamWConfig,
    pub batch: usize,
    pub seq: usize,
    /// `file:<name>` for `--data`, `task:<name>` for a built-in task.
    pub data: String,
    /// FNV-1a 64 of the data file's bytes (0 for a task), as 16 hex digits.
    pub data_hash: String,
    /// Number of examples; compared only with `shuffle` (a task makes `steps x batch`
    /// examples, and file order takes them as a prefix, so more steps change nothing before).
    pub examples: usize,
    /// The shuffle seed, or `None` for file order.
    pub shuffle: Option<u64>,
    /// The learning-rate schedule (constant in checkpoints from before it existed). A decaying
    /// one keeps its total steps: a resumed run must decay over the same total.
    #[serde(default)]
    pub schedule: LrSchedule,
    /// Gradient clipping's global norm, if any.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
    /// Batches per update.
    #[serde(default = "one")]
    pub grad_accum: usize,
}

fn one() -> usize {
    1
}

/// FNV-1a (64-bit) of `bytes`: `h = 0xcbf29ce484222325; h = (h ^ b) * 0x100000001b3` per byte.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Flattens a JSON value into `(dotted key, value as text)` pairs.
fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(o) => {
            for (k, x) in o {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, x, out);
            }
        }
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

impl RunConfig {
    /// `Ok` when a checkpoint saved with `self` (read from `path`) can continue as a run with
    /// `now`; else an error naming every field that differs, with both values.
    pub fn check_resume(&self, now: &RunConfig, path: &Path) -> Result<()> {
        let as_list = |c: &RunConfig| -> Result<Vec<(String, String)>> {
            let v = serde_json::to_value(c).map_err(|e| Error::format(path, format!("run config: {e}")))?;
            let mut out = Vec::new();
            flatten("", &v, &mut out);
            Ok(out)
        };
        let (a, b) = (as_list(self)?, as_list(now)?);
        let b: HashMap<_, _> = b.into_iter().collect();
        let mut diffs = Vec::new();
        for (k, va) in &a {
            if k == "examples" && self.shuffle.is_none() && now.shuffle.is_none() {
                continue;
            }
            let vb = b.get(k).map(String::as_str).unwrap_or("(absent)");
            if va != vb {
                diffs.push(format!("{k} was {va}, now {vb}"));
            }
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(Error::format(
                path,
                format!("cannot resume a different run: {}", diffs.join("; ")),
            ))
        }
    }
}

/// `(phi, psi)` values of every pair.
pub type PairValues = Vec<(Vec<f32>, Vec<f32>)>;

/// The state of a run after `step` steps (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub run: RunConfig,
    /// Steps done (AdamW's step count).
    pub step: u64,
    /// The batcher's position: epoch and index into that epoch's order.
    pub epoch: u64,
    pub pos: usize,
    /// Adapter values, AdamW first and second moments: `(phi, psi)` per pair.
    pub params: PairValues,
    pub m: PairValues,
    pub v: PairValues,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    version: u32,
    step: u64,
    epoch: u64,
    pos: usize,
    pairs: usize,
    run: RunConfig,
}

struct F32s<'a>(&'a [f32], [usize; 1]);

impl safetensors::View for &F32s<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(self.0.iter().flat_map(|x| x.to_le_bytes()).collect())
    }
    fn data_len(&self) -> usize {
        self.0.len() * 4
    }
}

fn keys(k: usize) -> [(&'static str, String); 6] {
    [
        ("params", format!("params.{k}.phi")),
        ("params", format!("params.{k}.psi")),
        ("m", format!("adamw.m.{k}.phi")),
        ("m", format!("adamw.m.{k}.psi")),
        ("v", format!("adamw.v.{k}.phi")),
        ("v", format!("adamw.v.{k}.psi")),
    ]
}

impl Checkpoint {
    /// `dir/checkpoint.safetensors`.
    pub fn file(dir: &Path) -> PathBuf {
        dir.join(CHECKPOINT_FILE)
    }

    fn check_shapes(&self, path: &Path) -> Result<()> {
        let n = self.params.len();
        if self.m.len() != n || self.v.len() != n {
            return Err(Error::format(
                path,
                format!(
                    "{n} pairs of parameters but {} of m and {} of v",
                    self.m.len(),
                    self.v.len()
                ),
            ));
        }
        for k in 0..n {
            let (p, m, v) = (&self.params[k], &self.m[k], &self.v[k]);
            if m.0.len() != p.0.len() || v.0.len() != p.0.len() || m.1.len() != p.1.len() || v.1.len() != p.1.len() {
                return Err(Error::format(
                    path,
                    format!("pair {k}: m or v differs in length from the parameters"),
                ));
            }
        }
        Ok(())
    }

    /// Writes `dir/checkpoint.safetensors` atomically (creating `dir`), replacing the previous
    /// checkpoint; removes temporary files that a killed earlier save left in `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = Self::file(dir);
        self.check_shapes(&path)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let stale = format!(".{CHECKPOINT_FILE}.tmp");
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with(&stale) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let meta = Meta {
            version: VERSION,
            step: self.step,
            epoch: self.epoch,
            pos: self.pos,
            pairs: self.params.len(),
            run: self.run.clone(),
        };
        let json = serde_json::to_string(&meta).map_err(|e| Error::format(&path, format!("serialising: {e}")))?;
        let mut views: Vec<(String, F32s)> = Vec::with_capacity(6 * self.params.len());
        for k in 0..self.params.len() {
            let vals = [
                &self.params[k].0,
                &self.params[k].1,
                &self.m[k].0,
                &self.m[k].1,
                &self.v[k].0,
                &self.v[k].1,
            ];
            for ((_, key), v) in keys(k).into_iter().zip(vals) {
                views.push((key, F32s(v, [v.len()])));
            }
        }
        let mut md = HashMap::new();
        md.insert(META_KEY.to_string(), json);
        let bytes = safetensors::serialize(views.iter().map(|(k, v)| (k.as_str(), v)), Some(md))
            .map_err(|e| Error::format(&path, format!("serialising: {e}")))?;
        crate::adapter::io::write_atomic(&path, &bytes)
    }

    /// Reads `dir/checkpoint.safetensors` (or `dir` itself when it is the file), checking the
    /// version, that every tensor is present with consistent lengths, and that every value
    /// is finite. Errors name the file.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = if dir.is_dir() {
            Self::file(dir)
        } else {
            dir.to_path_buf()
        };
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let bad = |msg: String| Error::format(&path, msg);
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid checkpoint: {e}")))?;
        let (_, header) =
            SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a valid checkpoint: {e}")))?;
        let json = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| bad(format!("no {META_KEY} metadata: not a wegeft checkpoint")))?;
        let meta: Meta = serde_json::from_str(json).map_err(|e| bad(format!("metadata {META_KEY}: {e}")))?;
        if meta.version != VERSION {
            return Err(bad(format!(
                "checkpoint format version {} (this build reads {VERSION})",
                meta.version
            )));
        }
        if meta.pairs.checked_mul(6) != Some(st.len()) {
            return Err(bad(format!(
                "{} tensors, expected 6 per pair for {} pairs",
                st.len(),
                meta.pairs
            )));
        }
        let mut c = Checkpoint {
            run: meta.run,
            step: meta.step,
            epoch: meta.epoch,
            pos: meta.pos,
            params: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
        };
        for k in 0..meta.pairs {
            let mut vals = Vec::with_capacity(6);
            for (_, key) in keys(k) {
                let t = st.tensor(&key).map_err(|_| bad(format!("missing tensor {key}")))?;
                if t.dtype() != Dtype::F32 || t.shape().len() != 1 {
                    return Err(bad(format!(
                        "tensor {key}: {:?} {:?}, expected 1-D F32",
                        t.dtype(),
                        t.shape()
                    )));
                }
                let v: Vec<f32> = t
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(bad(format!("tensor {key}: element {i} is not finite ({})", v[i])));
                }
                vals.push(v);
            }
            let mut it = vals.into_iter();
            let mut two = || (it.next().unwrap_or_default(), it.next().unwrap_or_default());
            c.params.push(two());
            c.m.push(two());
            c.v.push(two());
        }
        c.check_shapes(&path)?;
        Ok(c)
    }
}

impl RunConfig {
    /// The run config of a `finetune`: the model at `model` (name and size) with `config`,
    /// the adapter, optimiser and batching (`batch`, `seq`) settings, and the data: the file `data` (its name
    /// and FNV-1a hash), or the built-in `task` when `data` is `None`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &Path,
        config: &LlamaConfig,
        adapter: &AdapterConfig,
        optim: AdamWConfig,
        (batch, seq): (usize, usize),
        data: Option<&Path>,
        task: &str,
        examples: usize,
        shuffle: Option<u64>,
    ) -> Result<Self> {
        let name = |p: &Path| {
            p.file_name()
                .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
        };
        let meta = std::fs::metadata(model).map_err(|e| Error::io(model, e))?;
        let (data, data_hash) = match data {
            Some(p) => {
                let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                (format!("file:{}", name(p)), format!("{:016x}", fnv1a64(&bytes)))
            }
            None => (format!("task:{task}"), format!("{:016x}", 0)),
        };
        Ok(RunConfig {
            model_name: name(model),
            model_bytes: if meta.is_file() { meta.len() } else { 0 },
            model_config: config.clone(),
            adapter: adapter.clone(),
            optim,
            batch,
            seq,
            data,
            data_hash,
            examples,
            shuffle,
            schedule: LrSchedule::default(),
            max_grad_norm: None,
            grad_accum: 1,
        })
    }
}

impl Checkpoint {
    /// The state of `trainer` and `batcher` now, for the run `run`.
    pub fn capture<B: crate::backend::Backend>(
        trainer: &crate::train::trainer::Trainer<'_, B>,
        batcher: &crate::train::data::Batcher,
        run: &RunConfig,
    ) -> Result<Self> {
        let (step, m, v) = trainer.optimizer_state()?;
        let params = trainer
            .host_adapter()?
            .pairs
            .into_iter()
            .map(|(_, phi, psi)| (phi, psi))
            .collect();
        let (epoch, pos) = batcher.position();
        Ok(Checkpoint {
            run: run.clone(),
            step,
            epoch,
            pos,
            params,
            m,
            v,
        })
    }

    /// Loads the checkpoint in `dir` to continue as the run `run` of `steps` steps in all: the
    /// run configs must agree ([`RunConfig::check_resume`]), the checkpoint must be before
    /// `steps`, and its pairs must have the shapes of `adapter`, whose values it then takes.
    pub fn load_for(
        dir: &Path,
        run: &RunConfig,
        adapter: &mut crate::model::llama::HostAdapter,
        steps: usize,
    ) -> Result<Self> {
        let c = Self::load(dir)?;
        let path = if dir.is_dir() {
            Self::file(dir)
        } else {
            dir.to_path_buf()
        };
        c.run.check_resume(run, &path)?;
        if c.step >= steps as u64 {
            return Err(Error::invalid(
                "--steps",
                format!(
                    "{steps}, but the checkpoint {} is already at step {}",
                    path.display(),
                    c.step
                ),
            ));
        }
        if c.pos > run.examples {
            return Err(Error::format(
                &path,
                format!("data position {} is past the {} examples", c.pos, run.examples),
            ));
        }
        if c.params.len() != adapter.pairs.len() {
            return Err(Error::format(
                &path,
                format!("{} pairs, the adapter has {}", c.params.len(), adapter.pairs.len()),
            ));
        }
        for (k, ((_, phi, psi), (p, q))) in adapter.pairs.iter_mut().zip(&c.params).enumerate() {
            if p.len() != phi.len() || q.len() != psi.len() {
                return Err(Error::format(
                    &path,
                    format!(
                        "pair {k}: ({}, {}) elements, the adapter has ({}, {})",
                        p.len(),
                        q.len(),
                        phi.len(),
                        psi.len()
                    ),
                ));
            }
            phi.copy_from_slice(p);
            psi.copy_from_slice(q);
        }
        Ok(c)
    }
}

/// The output directory of a run, made sure to be writable before the run spends time on
/// training. Dropped without [`OutDir::keep`] (the run failed), a directory that
/// [`OutDir::prepare`] created is removed again if it is still empty.
#[derive(Debug)]
pub struct OutDir {
    path: PathBuf,
    created: bool,
    keep: bool,
}

impl OutDir {
    /// Creates `out` if needed and writes and removes a probe file in it. Errors name `--out`
    /// and the path: an existing file, a path under a file, no permission.
    pub fn prepare(out: &Path) -> Result<Self> {
        let created = match std::fs::metadata(out) {
            Ok(m) if m.is_dir() => false,
            Ok(_) => {
                return Err(Error::invalid(
                    "--out",
                    format!("{} exists and is not a directory", out.display()),
                ))
            }
            Err(_) => {
                std::fs::create_dir_all(out)
                    .map_err(|e| Error::invalid("--out", format!("cannot create {}: {e}", out.display())))?;
                true
            }
        };
        let dir = OutDir {
            path: out.to_path_buf(),
            created,
            keep: false,
        };
        let probe = out.join(format!(".wegeft-probe-{}", std::process::id()));
        let res = std::fs::write(&probe, b"");
        let _ = std::fs::remove_file(&probe);
        res.map_err(|e| Error::invalid("--out", format!("cannot write into {}: {e}", out.display())))?;
        Ok(dir)
    }
    /// The run succeeded: keep the directory.
    pub fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if self.created && !self.keep {
            let _ = std::fs::remove_dir(&self.path); // only succeeds while empty
        }
    }
}

/// Opens the `--log-json` file: truncated for a new run, appended to when resuming.
pub fn open_log(path: &Path, resume: bool) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resume)
        .truncate(!resume)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// A training error, with where the run's last good checkpoint is (`dir` at step `saved`) when
/// it is a numerical one (a non-finite loss or gradient).
pub fn stopped(e: Error, dir: &Path, saved: Option<u64>) -> Error {
    match e {
        Error::Numerical(msg) => Error::Numerical(match saved {
            Some(k) => format!(
                "{msg}; training stopped, the last good checkpoint is {} (step {k})",
                dir.display()
            ),
            None => format!("{msg}; training stopped, no checkpoint was written (see --save-every)"),
        }),
        other => other,
    }
}
