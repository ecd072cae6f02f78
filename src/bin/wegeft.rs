//! `wegeft`: fine-tune, evaluate, score, generate with and merge WeGeFT adapters on a Llama
//! model (GGUF file or HF safetensors directory). Run `wegeft --help`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use wegeft::adapter::{self, AdapterConfig, Init, Module, Sharing};
use wegeft::backend::Backend;
use wegeft::cpu::Cpu;
use wegeft::model::llama::{argmax, Batch, Dims, HostAdapter, HostWeights, Llama};
use wegeft::model::{LlamaWeights, Tokenizer};
use wegeft::train::arithmetic::{self, Problem, Split};
use wegeft::train::checkpoint;
use wegeft::train::data::{self, Batcher, Example};
use wegeft::train::optim::AdamWConfig;
use wegeft::train::schedule::{LrSchedule, ScheduleKind};
use wegeft::train::trainer::{self, check_max_grad_norm, Trainer};
use wegeft::{Error, Result};

#[derive(Parser)]
#[command(name = "wegeft", version, about = "WeGeFT fine-tuning of Llama-family models", args_override_self = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Device {
    Auto,
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Task {
    Arithmetic,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Format {
    /// The official GIFT layout: `<out>/adapter.safetensors` + `<out>/adapter.json`.
    Gift,
    /// The PEFT fork's layout: `<out>/adapter_config.json` + `<out>/adapter_model.safetensors`.
    Peft,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// A GGUF file or an HF safetensors directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Compute device; `auto` is the GPU when a CUDA driver and device are present (and the
    /// `cuda` feature is built in), else the CPU.
    #[arg(long, value_enum, default_value = "auto")]
    device: Device,
    /// Extra variables for the model's chat template, a JSON object, as
    /// `apply_chat_template(**kwargs)` takes them: `{"enable_thinking": false}` makes Qwen3's
    /// prompts ask for answers without thinking.
    #[arg(long, value_name = "JSON")]
    chat_template_kwargs: Option<String>,
}

/// What `merge` and `export-lora` read and write.
#[derive(clap::Args)]
struct AdapterOut {
    /// The WeGeFT adapter: an official-layout `.safetensors` or a PEFT-fork directory.
    #[arg(long)]
    adapter: PathBuf,
    /// A directory (`merge`: an HF checkpoint; `export-lora`: PEFT's LoRA layout), or
    /// `NAME.gguf` with a GGUF `--model` (`merge`: the model's file with the merged weights;
    /// `export-lora`: a llama.cpp LoRA).
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Fine-tune a WeGeFT adapter and save it.
    Finetune {
        #[command(flatten)]
        m: ModelArgs,
        /// JSONL records: {"tokens":[..]}, {"text":..}, {"prompt":..,"completion":..} or
        /// {"messages":[{"role":..,"content":..},..]} (loss on the assistant turns).
        #[arg(long, conflicts_with = "task", required_unless_present = "task")]
        data: Option<PathBuf>,
        /// A built-in task instead of --data.
        #[arg(long, value_enum)]
        task: Option<Task>,
        /// Comma-separated target modules.
        #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", value_delimiter = ',')]
        targets: Vec<String>,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        /// Scale alpha/rank on the update (the PEFT fork); none = scale 1 (the official code).
        #[arg(long)]
        alpha: Option<f32>,
        /// One pair per (layer, module) instead of one per module type shared by all layers.
        #[arg(long)]
        no_sharing: bool,
        /// Dropout probability on W in the adapter path during training (the PEFT fork's
        /// wegeft_dropout); default 0, or the --init-adapter's.
        #[arg(long)]
        dropout: Option<f32>,
        /// Initialisation of a fresh adapter: gift (phi ~ U, psi = 0) or peft (phi = 0, psi ~ U).
        #[arg(long, default_value = "gift")]
        init: String,
        #[arg(long, default_value_t = 2e-3)]
        lr: f64,
        #[arg(long, default_value_t = 0.0)]
        weight_decay: f64,
        #[arg(long, default_value_t = 150)]
        steps: usize,
        /// Learning-rate schedule after the warm-up, over --steps (transformers' `get_scheduler`).
        #[arg(long, value_name = "constant|linear|cosine", default_value = "constant")]
        lr_schedule: String,
        /// Steps of linear warm-up from 0 (the first update has learning rate 0, as in transformers).
        #[arg(long, default_value_t = 0)]
        warmup_steps: usize,
        /// Clip the gradient to this global 2-norm before each update (torch's `clip_grad_norm_`).
        #[arg(long)]
        max_grad_norm: Option<f64>,
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Batches per update, their gradients summed as one batch's (the loss is the mean over
        /// all their labelled tokens): an update sees batch x grad-accum examples.
        #[arg(long, default_value_t = 1)]
        grad_accum: usize,
        /// Examples are cut to this many tokens.
        #[arg(long, default_value_t = 64)]
        seq: usize,
        /// Start from this adapter (official layout .safetensors, or a PEFT directory).
        #[arg(long)]
        init_adapter: Option<PathBuf>,
        /// Output directory for the adapter.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "gift")]
        format: Format,
        /// One JSON line per step: {"step": i, "loss": loss before that step's update, "lr": its
        /// learning rate, "grad_norm": the gradient's norm before clipping}.
        #[arg(long)]
        log_json: Option<PathBuf>,
        /// Shuffle the data (seeded) instead of file order.
        #[arg(long)]
        shuffle: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Evaluation data (same record formats as --data): its mean loss over every labelled
        /// token is printed and logged ({"step": k, "eval_loss": loss after k updates}) before
        /// training, every --eval-every steps and after the last.
        #[arg(long)]
        eval_data: Option<PathBuf>,
        /// With --eval-data: evaluate every N steps as well (0 = before and after only).
        #[arg(long, default_value_t = 0)]
        eval_every: usize,
        /// Held-out problems evaluated before and after training (--task only; 0 = none).
        #[arg(long, default_value_t = 100)]
        eval_n: usize,
        /// Every N steps (and after the last), write a checkpoint (adapter, AdamW state, data
        /// position) atomically to <out>/checkpoint/; 0 = never.
        #[arg(long, default_value_t = 0)]
        save_every: usize,
        /// Continue the run checkpointed in DIR (same model, data and settings; --steps is the
        /// new total).
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
    },
    /// Exact-match accuracy with greedy decoding.
    Eval {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        adapter: Option<PathBuf>,
        #[arg(long, value_enum, conflicts_with = "data", required_unless_present = "data")]
        task: Option<Task>,
        /// JSONL of {"prompt":..,"completion":..} (the completion is the expected output) or
        /// {"messages":[..]} ending with an assistant message (its content is the expected
        /// output of the conversation before it, in the chat format).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Problems (task) or records (data) to evaluate.
        #[arg(long, default_value_t = 100)]
        n: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 16)]
        max_new: usize,
    },
    /// Logits of a sequence, as JSON: ids, argmax per position, top5_last, loss.
    Score {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Text, tokenized as `tokenizer(text)` does: BOS first where the model adds one
        /// (Llama 3; not SmolLM2).
        #[arg(long, conflicts_with = "tokens", required_unless_present = "tokens")]
        text: Option<String>,
        /// Comma-separated token ids.
        #[arg(long, value_delimiter = ',')]
        tokens: Option<Vec<u32>>,
    },
    /// Greedy generation from a chat prompt (or raw text with --raw).
    Generate {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, conflicts_with_all = ["adapters", "prompts"])]
        adapter: Option<PathBuf>,
        #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
        prompt: Option<String>,
        #[arg(long, default_value_t = 64)]
        max_new: usize,
        /// Use the prompt as raw text, without the chat template (BOS first where the model
        /// adds one).
        #[arg(long)]
        raw: bool,
        /// Several adapters on one base model (comma-separated files or PEFT directories),
        /// batched together; with --prompts.
        #[arg(long, value_delimiter = ',', requires = "prompts")]
        adapters: Option<Vec<PathBuf>>,
        /// JSONL, one `{"adapter": INDEX | "FILE NAME" | null, "prompt": "..."}` per line;
        /// prints one JSON line per prompt, in order.
        #[arg(long)]
        prompts: Option<PathBuf>,
    },
    /// Merge an adapter into the weights and write an HF safetensors directory, or, with
    /// `--out NAME.gguf` and a GGUF model, a GGUF: the model's file with the merged weights in
    /// place (F16 where the source was quantized; every other tensor and key as it was).
    Merge {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        io: AdapterOut,
    },
    /// Write an adapter as a standard LoRA adapter (`A = psi`, `B = s W phi` at every adapted
    /// site: the same model, exactly) for LoRA runtimes: a PEFT LoRA directory, or, with
    /// `--out NAME.gguf` and a GGUF model, a llama.cpp LoRA (`llama-cli --lora NAME.gguf`).
    ExportLora {
        #[command(flatten)]
        m: ModelArgs,
        #[command(flatten)]
        io: AdapterOut,
    },
    /// Time training steps (forward + backward + AdamW) in tokens per second.
    BenchStep {
        #[command(flatten)]
        m: ModelArgs,
        #[arg(long, default_value_t = 4)]
        batch: usize,
        #[arg(long, default_value_t = 64)]
        seq: usize,
        #[arg(long, default_value_t = 8)]
        rank: usize,
        #[arg(long, default_value = "q_proj,v_proj", value_delimiter = ',')]
        targets: Vec<String>,
        /// Timed steps (after one warm-up step).
        #[arg(long, default_value_t = 3)]
        steps: usize,
    },
}

/// Keeps freed activation buffers in the heap: without this, glibc returns every freed
/// buffer above its mmap threshold to the kernel and the next training step page-faults on
/// all of them again (about 40k faults, 160 MB of zeroing, per SmolLM2 step at B=4, S=64).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() {
    tune_malloc();
    let cli = Cli::parse();
    if let Err(e) = run(cli.cmd) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The engine `--device` names: `cpu`; `cuda` (an error without a usable device, or without
/// the `cuda` feature); `auto`, the GPU when a driver and a device are there, else the CPU.
enum Engine {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Box<wegeft::cuda::Gpu>),
}

fn check_device(d: Device) -> Result<Engine> {
    match d {
        Device::Cpu => Ok(Engine::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda => Ok(Engine::Cuda(Box::new(wegeft::cuda::Gpu::new(0)?))),
        #[cfg(not(feature = "cuda"))]
        Device::Cuda => Err(Error::NoCuda("this wegeft was built without the `cuda` feature; use --device cpu".into())),
        #[cfg(feature = "cuda")]
        Device::Auto if wegeft::cuda::driver_present() => match wegeft::cuda::Gpu::new(0) {
            Ok(g) => Ok(Engine::Cuda(Box::new(g))),
            Err(Error::NoCuda(_)) => Ok(Engine::Cpu),
            Err(e) => Err(e),
        },
        Device::Auto => Ok(Engine::Cpu),
    }
}

impl Cmd {
    fn device(&self) -> Device {
        match self {
            Cmd::Score { m, .. }
            | Cmd::Generate { m, .. }
            | Cmd::Eval { m, .. }
            | Cmd::Merge { m, .. }
            | Cmd::ExportLora { m, .. }
            | Cmd::BenchStep { m, .. }
            | Cmd::Finetune { m, .. } => m.device,
        }
    }
}

/// Runs `cmd` on the engine its `--device` picks.
fn run(cmd: Cmd) -> Result<()> {
    if matches!(cmd, Cmd::Merge { .. } | Cmd::ExportLora { .. }) {
        // Merging and exporting are host arithmetic on the weights.
        return run_on(&Cpu, cmd);
    }
    match check_device(cmd.device())? {
        Engine::Cpu => run_on(&Cpu, cmd),
        #[cfg(feature = "cuda")]
        Engine::Cuda(g) => run_on(g.as_ref(), cmd),
    }
}

struct Loaded<B: Backend> {
    model: Llama<B>,
    tok: Tokenizer,
    weights_config: wegeft::model::LlamaConfig,
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    if path.is_dir() {
        Tokenizer::from_file(path.join("tokenizer.json"))
    } else {
        Tokenizer::from_gguf(path)
    }
}

fn load<B: Backend>(be: &B, m: &ModelArgs) -> Result<Loaded<B>> {
    let w = LlamaWeights::load(&m.model)?;
    let weights_config = w.config.clone();
    let model = Llama::from_host(be, HostWeights::from_llama(w)?)?;
    let mut tok = load_tokenizer(&m.model)?;
    if let Some(text) = &m.chat_template_kwargs {
        let kwargs = match serde_json::from_str(text) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(other) => return Err(Error::invalid("--chat-template-kwargs", format!("{other} is not a JSON object"))),
            Err(e) => return Err(Error::invalid("--chat-template-kwargs", format!("not JSON: {e}"))),
        };
        tok = tok.with_chat_template_kwargs(kwargs)?;
    }
    Ok(Loaded { model, tok, weights_config })
}

/// Reads an adapter: a directory in the PEFT layout, or an official-layout `.safetensors`.
fn read_adapter(path: &Path, dims: &Dims) -> Result<adapter::Adapter> {
    let ad = dims.adapter_dims()?;
    if path.is_dir() {
        adapter::io::load_peft(path, &ad)
    } else {
        adapter::io::load_gift(path, &ad)
    }
}

/// The GGUF model a `.gguf` `--out` is derived from (`None` for any other output); an HF
/// `--model` with a `.gguf` output is an error.
fn gguf_source(model: &Path, out: &Path) -> Result<Option<wegeft::model::GgufFile>> {
    match out.extension().is_some_and(|x| x == "gguf") {
        true if model.is_dir() => {
            Err(Error::invalid("--out", "a .gguf output needs a GGUF --model (this one is an HF directory)"))
        }
        true => Ok(Some(wegeft::model::GgufFile::open(model)?)),
        false => Ok(None),
    }
}

fn host_adapter(path: Option<&Path>, dims: &Dims) -> Result<Option<HostAdapter>> {
    path.map(|p| HostAdapter::from_adapter(&read_adapter(p, dims)?)).transpose()
}

/// A chat-format arithmetic example: the prompt, then the answer and the end-of-turn token
/// (the loss on those only).
fn arithmetic_example(tok: &Tokenizer, p: &Problem) -> Result<Example> {
    let prompt = tok.chat_prompt(&p.question())?;
    let mut completion = tok.encode(&p.answer(), false)?;
    completion.push(tok.end_of_turn_id());
    Ok(Example::completion(prompt, completion))
}

/// Exact-match accuracy of greedy answers on `(prompt ids, expected text)` pairs.
fn exact_match<B: Backend>(
    be: &B,
    l: &Loaded<B>,
    adapter: Option<&wegeft::model::llama::Adapter<B>>,
    cases: &[(Vec<u32>, String)],
    max_new: usize,
    label: &str,
) -> Result<f64> {
    let stop = [l.tok.end_of_turn_id(), l.tok.eos_id()];
    let pb = bar(cases.len() as u64, label);
    let mut correct = 0usize;
    // Batches of 32 prompts through one KV cache (prompts of equal length decode together).
    for (k, chunk) in cases.chunks(32).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|(p, _)| p.clone()).collect();
        let outs = l.model.generate_batch(be, adapter, &prompts, max_new, &stop)?;
        for ((_, want), out) in chunk.iter().zip(outs) {
            if l.tok.decode(&out, true)?.trim() == want.trim() {
                correct += 1;
            }
        }
        pb.inc(chunk.len() as u64);
        pb.set_message(format!("{correct}/{}", (k * 32 + chunk.len())));
    }
    pb.finish_and_clear();
    Ok(correct as f64 / cases.len().max(1) as f64)
}

fn arithmetic_cases(tok: &Tokenizer, seed: u64, n: usize) -> Result<Vec<(Vec<u32>, String)>> {
    arithmetic::problems(Split::HeldOut, seed, n)?
        .iter()
        .map(|p| Ok((tok.chat_prompt(&p.question())?, p.answer())))
        .collect()
}

fn bar(n: u64, label: &str) -> ProgressBar {
    let pb = ProgressBar::new(n);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(label.to_string());
    pb
}

fn parse_targets(targets: &[String]) -> Result<Vec<Module>> {
    let mut out: Vec<Module> = Vec::new();
    for t in targets {
        let m = Module::parse(t.trim())?;
        if !out.contains(&m) {
            out.push(m);
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("targets", "no target modules"));
    }
    Ok(out)
}

fn run_on<B: Backend>(be: &B, cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Score { m, adapter, text, tokens } => {
            let l = load(be, &m)?;
            let ids = match (text, tokens) {
                (Some(t), _) => l.tok.encode(&t, true)?,
                (None, Some(t)) => t,
                (None, None) => return Err(Error::invalid("score", "give --text or --tokens")),
            };
            let ctx = l.weights_config.max_position_embeddings;
            if ids.len() > ctx {
                let msg = format!("{} tokens are longer than the model's context of {ctx}", ids.len());
                return Err(Error::invalid("--text/--tokens", msg));
            }
            let ad =
                host_adapter(adapter.as_deref(), &l.model.dims)?.map(|a| a.upload(be, &l.model.dims)).transpose()?;
            let (logits, loss) = l.model.score(be, ad.as_ref(), &ids)?;
            let v = l.model.dims.vocab;
            let am: Vec<usize> = logits.chunks(v).map(argmax).collect();
            let last = &logits[(ids.len() - 1) * v..];
            let mut idx: Vec<usize> = (0..v).collect();
            idx.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
            let top5: Vec<(usize, f32)> = idx[..5.min(v)].iter().map(|&i| (i, last[i])).collect();
            let out = serde_json::json!({"ids": ids, "argmax": am, "top5_last": top5, "loss": loss});
            println!("{out}");
            Ok(())
        }
        Cmd::Generate { m, adapter, prompt, max_new, raw, adapters, prompts } => {
            if let Some(file) = prompts {
                return generate_multi(be, &m, adapters.as_deref().unwrap_or_default(), &file, max_new, raw);
            }
            let prompt = prompt.ok_or_else(|| Error::invalid("prompt", "give --prompt or --prompts"))?;
            let l = load(be, &m)?;
            let ad =
                host_adapter(adapter.as_deref(), &l.model.dims)?.map(|a| a.upload(be, &l.model.dims)).transpose()?;
            let ids = if raw { l.tok.encode(&prompt, true)? } else { l.tok.chat_prompt(&prompt)? };
            let stop = [l.tok.end_of_turn_id(), l.tok.eos_id()];
            let out = l.model.generate(be, ad.as_ref(), &ids, max_new, &stop)?;
            println!("{}", l.tok.decode(&out, true)?);
            Ok(())
        }
        Cmd::Eval { m, adapter, task, data, n, seed, max_new } => {
            let l = load(be, &m)?;
            let ad =
                host_adapter(adapter.as_deref(), &l.model.dims)?.map(|a| a.upload(be, &l.model.dims)).transpose()?;
            let cases = match (task, data) {
                (Some(Task::Arithmetic), _) => arithmetic_cases(&l.tok, seed, n)?,
                (None, Some(path)) => read_eval_cases(&path, &l.tok, n)?,
                (None, None) => return Err(Error::invalid("eval", "give --task or --data")),
            };
            let acc = exact_match(be, &l, ad.as_ref(), &cases, max_new, "eval")?;
            println!("{}", serde_json::json!({"n": cases.len(), "exact_match": acc}));
            Ok(())
        }
        Cmd::Merge { m, io: AdapterOut { adapter, out } } => {
            let src = gguf_source(&m.model, &out)?;
            let mut w = match &src {
                Some(g) => LlamaWeights::from_gguf_file(g)?,
                None => LlamaWeights::load(&m.model)?,
            };
            let dims = Dims::from_config(&w.config);
            let ad = HostAdapter::from_adapter(&read_adapter(&adapter, &dims)?)?;
            ad.merge_into(&mut w)?;
            match &src {
                Some(g) => {
                    let adapted = |l: usize, module: &str| {
                        wegeft::model::llama::module_index(module).is_ok_and(|mi| ad.sites[l][mi].is_some())
                    };
                    wegeft::model::weights::gguf_with_linears(g, &w, adapted)?.write(&out)?;
                }
                None => {
                    w.save_safetensors_hf(&out)?;
                    load_tokenizer(&m.model)?.save_hf(&out)?;
                }
            }
            eprintln!("merged model written to {}", out.display());
            Ok(())
        }
        Cmd::ExportLora { m, io: AdapterOut { adapter, out } } => {
            let src = gguf_source(&m.model, &out)?;
            let w = match &src {
                Some(g) => LlamaWeights::from_gguf_file(g)?,
                None => LlamaWeights::load(&m.model)?,
            };
            let dims = Dims::from_config(&w.config);
            let lora = HostAdapter::from_adapter(&read_adapter(&adapter, &dims)?)?.to_lora(&w)?;
            match &src {
                Some(g) => wegeft::model::weights::gguf_lora(g, &w.config, &lora)?.write(&out)?,
                None => adapter::lora::save_peft_lora(&lora, &out)?,
            }
            eprintln!(
                "LoRA adapter (rank {}, {} sites, scale 1) written to {}",
                lora.rank,
                lora.sites.len(),
                out.display()
            );
            Ok(())
        }
        Cmd::BenchStep { m, batch, seq, rank, targets, steps } => {
            let l = load(be, &m)?;
            let dims = &l.model.dims;
            let config = AdapterConfig::new(rank, parse_targets(&targets)?)?;
            // A nonzero psi, so that every product of the step does real work.
            let init = adapter::Adapter::for_benchmark(config, dims.adapter_dims()?)?;
            let host = HostAdapter::from_adapter(&init)?;
            let opt = AdamWConfig { lr: 1e-3, weight_decay: 0.0, ..AdamWConfig::default() };
            let mut tr = Trainer::new(be, &l.model, &host, opt)?;
            let seqs: Vec<Vec<u32>> = (0..batch)
                .map(|b| (0..seq).map(|t| ((b * 7919 + t * 104_729 + 17) % dims.vocab) as u32).collect())
                .collect();
            let bt = Batch::causal(&seqs)?;
            tr.step(&bt)?;
            let t0 = Instant::now();
            for _ in 0..steps {
                tr.step(&bt)?;
            }
            let dt = t0.elapsed().as_secs_f64() / steps.max(1) as f64;
            let tps = (batch * seq) as f64 / dt;
            println!(
                "{}",
                serde_json::json!({"device": be.name(), "batch": batch, "seq": seq, "rank": rank, "targets": targets,
                    "threads": rayon::current_num_threads(), "step_s": dt, "tokens_per_s": tps})
            );
            Ok(())
        }
        Cmd::Finetune {
            m,
            data,
            task,
            targets,
            rank,
            alpha,
            no_sharing,
            dropout,
            init,
            lr,
            weight_decay,
            steps,
            lr_schedule,
            warmup_steps,
            max_grad_norm,
            batch,
            grad_accum,
            seq,
            init_adapter,
            out,
            format,
            log_json,
            shuffle,
            seed,
            eval_n,
            eval_data,
            eval_every,
            save_every,
            resume,
        } => {
            if steps == 0 {
                return Err(Error::invalid("--steps", "must be at least 1, got 0"));
            }
            if grad_accum == 0 {
                return Err(Error::invalid("--grad-accum", "must be at least 1, got 0"));
            }
            if let Some(max) = max_grad_norm {
                check_max_grad_norm("--max-grad-norm", max)?;
            }
            let kind = ScheduleKind::parse(&lr_schedule)
                .map_err(|_| Error::invalid("--lr-schedule", format!("{lr_schedule:?}: expected constant, linear or cosine")))?;
            let schedule = LrSchedule::new(kind, warmup_steps as u64, steps as u64);
            let l = load(be, &m)?;
            let ctx = l.weights_config.max_position_embeddings;
            if seq > ctx {
                return Err(Error::invalid("--seq", format!("{seq} is longer than the model's context of {ctx} tokens")));
            }
            let dims = l.model.dims.clone();
            let ad_dims = dims.adapter_dims()?;
            // The adapter: from a file, or fresh.
            let mut adapter = match &init_adapter {
                Some(p) => read_adapter(p, &dims)?,
                None => {
                    let init = match init.as_str() {
                        "gift" => Init::Gift,
                        "peft" => Init::Peft,
                        other => return Err(Error::invalid("init", format!("{other:?}: expected gift or peft"))),
                    };
                    let config = AdapterConfig {
                        rank,
                        alpha,
                        targets: parse_targets(&targets)?,
                        sharing: if no_sharing { Sharing::None } else { Sharing::PerModule },
                        init,
                        dropout: dropout.unwrap_or(0.0),
                        seed,
                    };
                    adapter::Adapter::new(config, ad_dims)?
                }
            };
            if let Some(p) = dropout {
                adapter.config.dropout = p;
                adapter.config.validate()?;
            }
            // The examples.
            let read = |path: &PathBuf| -> Result<Vec<Example>> {
                let ex = data::read_jsonl(path, Some(&l.tok), seq)?;
                data::check_ids(path, &ex, dims.vocab)?;
                Ok(ex)
            };
            let examples: Vec<Example> = match (&data, task) {
                (Some(path), _) => read(path)?,
                (None, Some(Task::Arithmetic)) => arithmetic::problems(Split::Train, seed, steps * batch * grad_accum)?
                    .iter()
                    .map(|p| {
                        let mut e = arithmetic_example(&l.tok, p)?;
                        let full = e.ids.len();
                        e.truncate(seq);
                        // The answer is last: a long chat template can push all of it past --seq.
                        if !e.target.iter().skip(1).any(|&t| t) {
                            return Err(Error::invalid(
                                "--seq",
                                format!("{seq} tokens cut off the answer of an arithmetic problem: with this model's chat template it takes {full} tokens; give --seq {full} or more"),
                            ));
                        }
                        Ok(e)
                    })
                    .collect::<Result<_>>()?,
                (None, None) => return Err(Error::invalid("finetune", "give --data or --task")),
            };
            let eval_set = match &eval_data {
                Some(path) => {
                    let ex = read(path)?;
                    if !ex.iter().any(|e| e.target.iter().skip(1).any(|&t| t)) {
                        return Err(Error::format(path, "no example has a token to predict"));
                    }
                    Some(ex)
                }
                None => None,
            };
            let opt = AdamWConfig { lr, weight_decay, ..AdamWConfig::default() };
            let mut batcher = Batcher::new(examples.len(), batch, shuffle.then_some(seed))?;
            let run_config = checkpoint::RunConfig {
                schedule,
                max_grad_norm,
                grad_accum,
                ..checkpoint::RunConfig::new(
                    &m.model,
                    &l.weights_config,
                    &adapter.config,
                    opt,
                    (batch, seq),
                    data.as_deref(),
                    "arithmetic",
                    examples.len(),
                    shuffle.then_some(seed),
                )?
            };
            let mut host = HostAdapter::from_adapter(&adapter)?;
            let resumed = match &resume {
                Some(dir) => Some(checkpoint::Checkpoint::load_for(dir, &run_config, &mut host, steps)?),
                None => None,
            };
            // Every input is checked: now the outputs (removed again if the run fails while empty).
            let out_dir = checkpoint::OutDir::prepare(&out)?;
            let ckpt_dir = out.join("checkpoint");
            let mut saved = resumed.as_ref().map(|c| c.step).filter(|_| resume.as_deref() == Some(ckpt_dir.as_path()));
            let eval_cases = match task {
                Some(Task::Arithmetic) if eval_n > 0 => Some(arithmetic_cases(&l.tok, seed, eval_n)?),
                _ => None,
            };
            if let Some(cases) = &eval_cases {
                let a = host.upload(be, &dims)?;
                let acc = exact_match(be, &l, Some(&a), cases, 8, "eval before")?;
                println!("held-out exact match before: {:.1}% ({} problems)", acc * 100.0, cases.len());
            }
            let mut tr = match &resumed {
                Some(c) => {
                    batcher.seek(c.epoch, c.pos)?;
                    Trainer::resume(be, &l.model, &host, opt, c.step, &c.m, &c.v)?
                }
                None => Trainer::new(be, &l.model, &host, opt)?,
            }
            .with_seed(adapter.config.seed)
            .with_schedule(schedule);
            if let Some(max) = max_grad_norm {
                tr = tr.with_max_grad_norm(max)?;
            }
            let first = tr.steps() as usize;
            let mut log = match &log_json {
                Some(p) => Some(std::io::BufWriter::new(checkpoint::open_log(p, resumed.is_some())?)),
                None => None,
            };
            let pad = l.tok.pad_id().unwrap_or(0);
            // The evaluation loss after `k` updates: printed, and logged.
            let evaluate = |tr: &Trainer<B>, k: usize, log: &mut Option<std::io::BufWriter<std::fs::File>>| -> Result<()> {
                let Some(set) = &eval_set else { return Ok(()) };
                let loss = trainer::eval_loss(be, &l.model, Some(tr.adapter()), set, batch, pad)?;
                eprintln!("eval loss after {k} steps: {loss:.6}");
                if let (Some(w), Some(p)) = (log.as_mut(), &log_json) {
                    writeln!(w, "{}", serde_json::json!({"step": k, "eval_loss": loss})).map_err(|e| Error::io(p, e))?;
                    w.flush().map_err(|e| Error::io(p, e))?;
                }
                Ok(())
            };
            evaluate(&tr, first, &mut log)?;
            let pb = bar((steps - first) as u64, "finetune");
            let t0 = Instant::now();
            let mut tokens = 0usize;
            for step in first..steps {
                let batches = (0..grad_accum)
                    .map(|_| {
                        let refs: Vec<&Example> = batcher.next_indices().iter().map(|&i| &examples[i]).collect();
                        data::make_batch(&refs, pad)
                    })
                    .collect::<Result<Vec<_>>>()?;
                tokens += batches.iter().map(|b| b.ids.len()).sum::<usize>();
                let st = tr.step_many(&batches).map_err(|e| checkpoint::stopped(e, &ckpt_dir, saved))?;
                let loss = st.loss;
                if let (Some(w), Some(p)) = (log.as_mut(), &log_json) {
                    let line = serde_json::json!({"step": step, "loss": loss, "lr": st.lr, "grad_norm": st.grad_norm});
                    writeln!(w, "{line}").map_err(|e| Error::io(p, e))?;
                    w.flush().map_err(|e| Error::io(p, e))?;
                }
                if save_every > 0 && ((step + 1) % save_every == 0 || step + 1 == steps) {
                    checkpoint::Checkpoint::capture(&tr, &batcher, &run_config)?.save(&ckpt_dir)?;
                    saved = Some(tr.steps());
                }
                pb.inc(1);
                pb.set_message(format!("loss {loss:.4}  {:.0} tok/s", tokens as f64 / t0.elapsed().as_secs_f64()));
                if (eval_every > 0 && (step + 1) % eval_every == 0) || step + 1 == steps {
                    pb.suspend(|| evaluate(&tr, step + 1, &mut log))?;
                }
            }
            pb.finish_and_clear();
            let secs = t0.elapsed().as_secs_f64();
            eprintln!("trained {} steps in {secs:.1} s ({:.0} tokens/s)", steps - first, tokens as f64 / secs);
            tr.host_adapter()?.store_into(&mut adapter)?;
            let saved = match format {
                Format::Gift => {
                    let p = out.join("adapter.safetensors");
                    adapter::io::save_gift(&adapter, &p)?;
                    p
                }
                Format::Peft => {
                    adapter::io::save_peft(&adapter, &out)?;
                    out.clone()
                }
            };
            out_dir.keep();
            eprintln!("adapter saved to {}", saved.display());
            if let Some(cases) = &eval_cases {
                let acc = exact_match(be, &l, Some(tr.adapter()), cases, 8, "eval after")?;
                println!("held-out exact match after: {:.1}% ({} problems)", acc * 100.0, cases.len());
            }
            Ok(())
        }
    }
}

/// Evaluation records: `{"prompt":..,"completion":..}` (the chat-free prompt ids and the
/// expected text) or `{"messages":[..]}` ending with an assistant message (the chat prompt of
/// the messages before it, and that message's content).
fn read_eval_cases(path: &Path, tok: &Tokenizer, n: usize) -> Result<Vec<(Vec<u32>, String)>> {
    #[derive(serde::Deserialize)]
    struct Rec {
        prompt: Option<String>,
        completion: Option<String>,
        messages: Option<Vec<wegeft::model::ChatMessage>>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).take(n) {
        let bad = |m: String| Error::format(path, format!("line {}: {m}", i + 1));
        let r: Rec = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        out.push(match (r.prompt, r.completion, r.messages) {
            // BOS first where the model adds one, as training encodes a prompt.
            (Some(p), Some(c), None) => (tok.encode(&p, true)?, c),
            (None, None, Some(m)) => match m.split_last() {
                Some((last, before)) if last.role == "assistant" => {
                    (tok.chat_ids(before, true).map_err(|e| bad(e.to_string()))?, last.content.clone())
                }
                _ => return Err(bad("the messages must end with an assistant message (the expected answer)".into())),
            },
            _ => return Err(bad("expected {\"prompt\", \"completion\"} or {\"messages\"}".into())),
        });
    }
    if out.is_empty() {
        return Err(Error::format(path, "no records"));
    }
    Ok(out)
}

/// `generate --adapters a,b --prompts FILE.jsonl`: every prompt with the adapter its record
/// names (index into --adapters, or the file name as given or its last component; `null`: the
/// base model), all batched together; one JSON line per prompt, in the file's order.
fn generate_multi<B: Backend>(be: &B, m: &ModelArgs, paths: &[PathBuf], file: &Path, max_new: usize, raw: bool) -> Result<()> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Rec {
        adapter: Option<serde_json::Value>,
        prompt: String,
    }
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let mut recs = Vec::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |msg: String| Error::format(file, format!("line {}: {msg}", i + 1));
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        if v.get("adapter").is_none() {
            return Err(bad("no \"adapter\" (an index, a file name, or null for the base model)".into()));
        }
        let r: Rec = serde_json::from_value(v).map_err(|e| bad(e.to_string()))?;
        let a: i32 = match &r.adapter {
            None => -1,
            Some(serde_json::Value::Number(n)) => match n.as_u64() {
                Some(k) if (k as usize) < paths.len() => k as i32,
                _ => return Err(bad(format!("adapter {n} is not an index into the {} --adapters", paths.len()))),
            },
            Some(serde_json::Value::String(name)) => {
                let hit = paths.iter().position(|p| {
                    p.as_os_str() == name.as_str() || p.file_name().is_some_and(|f| f == name.as_str())
                });
                match hit {
                    Some(k) => k as i32,
                    None => return Err(bad(format!("adapter {name:?} is not one of --adapters"))),
                }
            }
            Some(other) => return Err(bad(format!("adapter must be an index, a file name or null, got {other}"))),
        };
        recs.push((i + 1, a, r.prompt));
    }
    if recs.is_empty() {
        return Err(Error::format(file, "no records"));
    }
    let l = load(be, m)?;
    let hosts = paths
        .iter()
        .map(|p| HostAdapter::from_adapter(&read_adapter(p, &l.model.dims)?))
        .collect::<Result<Vec<_>>>()?;
    let ids = recs
        .iter()
        .map(|(line, _, p)| {
            if raw { l.tok.encode(p, true) } else { l.tok.chat_prompt(p) }
                .map_err(|e| Error::format(file, format!("line {line}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    if let Some((line, _, _)) = recs.iter().zip(&ids).find(|(_, t)| t.is_empty()).map(|(r, _)| r) {
        return Err(Error::format(file, format!("line {line}: the prompt has no tokens")));
    }
    let which: Vec<i32> = recs.iter().map(|r| r.1).collect();
    let stop = [l.tok.end_of_turn_id(), l.tok.eos_id()];
    let outs = if hosts.is_empty() {
        l.model.generate_batch(be, None, &ids, max_new, &stop)?
    } else {
        let multi = wegeft::model::llama::MultiAdapter::upload(be, &l.model.dims, &hosts)?;
        l.model.generate_multi(be, &multi, &ids, &which, max_new, &stop)?
    };
    for ((line, a, _), out) in recs.iter().zip(outs) {
        let adapter = usize::try_from(*a).ok().map(|k| paths[k].display().to_string());
        let completion = l.tok.decode(&out, true)?;
        println!("{}", serde_json::json!({"line": line, "adapter": adapter, "completion": completion, "tokens": out}));
    }
    Ok(())
}
