//! The adapter: configuration and layout, initialisation, and files in both layouts, against
//! the official implementation's SmolLM2 adapter files.

mod common;

use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use wegeft::adapter::io::{load_gift, load_peft, save_gift, save_peft, write_atomic, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE};
use wegeft::adapter::{Adapter, AdapterConfig, Init, ModelDims, Module, ShareGroup, Sharing};
use wegeft::Error;

fn smol() -> ModelDims {
    ModelDims::new(30, 576, 1536).unwrap()
}

fn fixture(name: &str) -> PathBuf {
    common::fixtures_dir().join("smollm2").join(name)
}

#[derive(serde::Deserialize)]
struct TrainJson {
    rank: usize,
    targets: Vec<String>,
    adapter_keys: Vec<String>,
}

fn train_json() -> TrainJson {
    serde_json::from_slice(&std::fs::read(fixture("train.json")).unwrap()).unwrap()
}

/// Raw bytes of every tensor of a safetensors file.
fn raw(path: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let b = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&b).unwrap();
    st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect()
}

fn write_raw(path: &Path, tensors: &HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn assert_format_err(r: Result<Adapter, Error>, file: &str, needle: &str) {
    match r {
        Err(Error::Format { path, msg }) => {
            assert!(path.to_string_lossy().ends_with(file), "error names {} not {file}", path.display());
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
        }
        other => panic!("expected a Format error naming {file} / {needle:?}, got {other:?}"),
    }
}

// ----------------------------------------------------------------------------- config & layout

#[test]
fn layouts_and_pair_map() {
    let dims = smol();
    let all = Module::ALL.to_vec();
    let c = AdapterConfig::new(4, all.clone()).unwrap();
    let a = Adapter::new(c.clone(), dims).unwrap();
    assert_eq!(a.pairs().len(), 7);
    assert_eq!(a.pairs()[0].name, "q_proj");
    assert_eq!(a.pairs()[6].name, "down_proj");
    assert_eq!(a.pairs()[6].d_in, 1536);
    assert_eq!(a.pairs()[0].sites.len(), 30);
    assert_eq!(a.pair(17, Module::VProj).unwrap().unwrap().name, "v_proj");
    assert_eq!(a.num_params(), 6 * 2 * 576 * 4 + 2 * 1536 * 4);
    assert!(a.pair(30, Module::QProj).is_err());
    assert_eq!(a.scale(), 1.0);

    let mut none = c.clone();
    none.sharing = Sharing::None;
    let a = Adapter::new(none, dims).unwrap();
    assert_eq!(a.pairs().len(), 7 * 30);
    assert_eq!(a.pair(3, Module::OProj).unwrap().unwrap().name, "layers.3.o_proj");

    let mut g = AdapterConfig::new(2, vec![Module::QProj, Module::KProj, Module::VProj, Module::DownProj]).unwrap();
    g.alpha = Some(8.0);
    g.sharing = Sharing::Groups(vec![
        ShareGroup { modules: vec![Module::QProj, Module::KProj], layers: Some(vec![0, 1, 2]) },
        ShareGroup { modules: vec![Module::QProj, Module::KProj, Module::VProj], layers: None },
    ]);
    let a = Adapter::new(g.clone(), dims).unwrap();
    assert_eq!(a.scale(), 4.0);
    // group 0: (0..3) x {q,k}; group 1: the rest of q,k and all v; down_proj: own pair per layer
    assert_eq!(a.pairs().len(), 2 + 30);
    assert_eq!(a.pair_index(1, Module::KProj).unwrap(), a.pair_index(2, Module::QProj).unwrap());
    assert_ne!(a.pair_index(2, Module::QProj).unwrap(), a.pair_index(3, Module::QProj).unwrap());
    assert_eq!(a.pair_index(3, Module::QProj).unwrap(), a.pair_index(29, Module::VProj).unwrap());
    assert_eq!(a.pair(0, Module::OProj).unwrap(), None);
    assert_eq!(a.pairs()[0].sites.len(), 6);
    assert_eq!(a.pairs()[1].sites[0], (0, Module::VProj)); // owner = first site in model order

    // invalid configurations
    let mut bad = g.clone();
    bad.sharing = Sharing::Groups(vec![ShareGroup { modules: vec![Module::QProj, Module::DownProj], layers: None }]);
    assert!(Adapter::new(bad, dims).is_err()); // different d_in
    let mut bad = g.clone();
    bad.sharing = Sharing::Groups(vec![ShareGroup { modules: vec![Module::QProj], layers: Some(vec![30]) }]);
    assert!(Adapter::new(bad, dims).is_err());
    assert!(AdapterConfig::new(0, all.clone()).is_err());
    assert!(AdapterConfig::new(4, vec![]).is_err());
    assert!(AdapterConfig::new(4, vec![Module::QProj, Module::QProj]).is_err());
    let mut bad = c.clone();
    bad.dropout = 1.0;
    assert!(bad.validate().is_err());
    assert!(Module::parse("lm_head").is_err());
    assert!(ModelDims::new(0, 576, 1536).is_err());
}

#[test]
fn wide_attention_gives_o_proj_its_own_input_width() {
    // Qwen3-0.6B: hidden 1024, 16 heads of 128: o_proj reads 2048 features.
    let dims = ModelDims::new(2, 1024, 3072).unwrap().with_attn_width(2048).unwrap();
    assert_eq!((dims.d_in(Module::QProj), dims.d_in(Module::OProj), dims.d_in(Module::DownProj)), (1024, 2048, 3072));
    assert_eq!(ModelDims::new(2, 8, 12).unwrap().with_attn_width(8).unwrap(), ModelDims::new(2, 8, 12).unwrap());
    assert!(ModelDims::new(2, 8, 12).unwrap().with_attn_width(0).is_err());
    let a = Adapter::new(AdapterConfig::new(4, Module::ALL.to_vec()).unwrap(), dims).unwrap();
    let o = a.pairs().iter().find(|p| p.name == "o_proj").unwrap();
    assert_eq!((o.d_in, o.phi.len()), (2048, 2048 * 4));
    // q_proj and o_proj no longer share an input space.
    let mut c = AdapterConfig::new(4, vec![Module::QProj, Module::OProj]).unwrap();
    c.sharing = Sharing::Groups(vec![ShareGroup { modules: vec![Module::QProj, Module::OProj], layers: None }]);
    let e = Adapter::new(c.clone(), dims).unwrap_err().to_string();
    assert!(e.contains("q_proj") && e.contains("o_proj") && e.contains("2048"), "{e}");
    assert!(Adapter::new(c, ModelDims::new(2, 1024, 3072).unwrap()).is_ok());
}

#[test]
fn initialisation() {
    let dims = ModelDims::new(2, 64, 256).unwrap();
    let mut c = AdapterConfig::new(8, Module::ALL.to_vec()).unwrap();
    c.seed = 42;
    let a = Adapter::new(c.clone(), dims).unwrap();
    for p in a.pairs() {
        let bound = 1.0 / (p.d_in as f32).sqrt();
        assert!(p.psi.iter().all(|&x| x == 0.0), "GIFT init: psi (out_proj) is zero");
        assert!(p.phi.iter().all(|&x| x.abs() <= bound));
        let var = p.phi.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / p.phi.len() as f64;
        let want = (bound as f64).powi(2) / 3.0; // variance of U(-b, b)
        assert!((var / want - 1.0).abs() < 0.15, "{} variance {var} vs {want}", p.name);
    }
    assert_eq!(Adapter::new(c.clone(), dims).unwrap(), a, "same seed, same values");
    c.seed = 43;
    assert_ne!(Adapter::new(c.clone(), dims).unwrap().pairs()[0].phi, a.pairs()[0].phi);
    c.init = Init::Peft;
    let a = Adapter::new(c, dims).unwrap();
    for p in a.pairs() {
        assert!(p.phi.iter().all(|&x| x == 0.0), "PEFT init: wegeft_phi is zero");
        assert!(p.psi.iter().any(|&x| x != 0.0));
        assert!(p.psi.iter().all(|&x| x.abs() <= 1.0 / (p.d_in as f32).sqrt()));
    }
}

// ----------------------------------------------------------------------------- GIFT layout

#[test]
fn official_fixtures_load_with_expected_shapes() {
    let tj = train_json();
    for (file, init) in [("init_adapter.safetensors", true), ("final_adapter.safetensors", false)] {
        let a = load_gift(&fixture(file), &smol()).unwrap();
        assert_eq!(a.rank(), tj.rank);
        let mut targets: Vec<&str> = a.config.targets.iter().map(|m| m.name()).collect();
        let mut want: Vec<&str> = tj.targets.iter().map(|s| s.as_str()).collect();
        targets.sort();
        want.sort();
        assert_eq!(targets, want);
        assert_eq!(a.config.sharing, Sharing::PerModule);
        assert_eq!(a.scale(), 1.0);
        assert_eq!(a.pairs().len(), 7);
        for p in a.pairs() {
            let d_in = if p.name == "down_proj" { 1536 } else { 576 };
            assert_eq!((p.d_in, p.phi.len(), p.psi.len()), (d_in, d_in * 4, 4 * d_in), "{}", p.name);
            let bound = 1.0 / (d_in as f32).sqrt();
            if init {
                // official init: in_proj ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), out_proj = 0
                assert!(p.psi.iter().all(|&x| x == 0.0), "{}: out_proj is zero at init", p.name);
                assert!(p.phi.iter().all(|&x| x.abs() <= bound), "{}", p.name);
                assert!(p.phi.iter().any(|&x| x.abs() > 0.5 * bound));
            } else {
                assert!(p.psi.iter().any(|&x| x != 0.0), "{}: trained psi", p.name);
            }
        }
        // the orientation: phi[j][k] = in_proj.weight[k][j]
        let r = raw(&fixture(file));
        let (_, shape, bytes) = &r["in_projections.down_proj.weight"];
        assert_eq!(shape, &vec![4, 1536]);
        let at = |k: usize, j: usize| f32::from_le_bytes(bytes[(k * 1536 + j) * 4..][..4].try_into().unwrap());
        let p = a.pair(0, Module::DownProj).unwrap().unwrap();
        assert_eq!(p.phi[7 * 4 + 3], at(3, 7));
        assert_eq!(p.phi[1535 * 4], at(0, 1535));
    }
    let _ = tj.adapter_keys;
}

#[test]
fn gift_round_trip_is_bitwise() {
    let dir = common::fresh_dir("adapter-gift");
    let a = load_gift(&fixture("final_adapter.safetensors"), &smol()).unwrap();
    let out = dir.join("adapter.safetensors");
    save_gift(&a, &out).unwrap();
    assert!(dir.join("adapter.json").is_file(), "the JSON config beside it");
    let b = load_gift(&out, &smol()).unwrap();
    assert_eq!(a, b);
    // same keys, shapes, dtypes and bytes as the file the official code wrote
    let (want, got) = (raw(&fixture("final_adapter.safetensors")), raw(&out));
    let mut wk: Vec<_> = want.keys().collect();
    let mut gk: Vec<_> = got.keys().collect();
    wk.sort();
    gk.sort();
    assert_eq!(wk, gk);
    for k in want.keys() {
        assert!(want[k] == got[k], "{k} differs");
    }
    assert_eq!(gk.iter().map(|s| s.to_string()).collect::<Vec<_>>(), train_json().adapter_keys);
    // alpha, seed, dropout survive through the JSON
    let mut c = a.config.clone();
    c.alpha = Some(16.0);
    c.seed = 7;
    c.dropout = 0.1;
    let values = a.pairs().iter().map(|p| (p.phi.clone(), p.psi.clone())).collect();
    let a2 = Adapter::from_values(c, smol(), values).unwrap();
    save_gift(&a2, &out).unwrap();
    assert_eq!(load_gift(&out, &smol()).unwrap(), a2);
    // shared_projection (official share_projections=True)
    let dims = ModelDims::new(3, 32, 48).unwrap();
    let mut c = AdapterConfig::new(3, vec![Module::QProj, Module::VProj, Module::UpProj]).unwrap();
    c.sharing = Sharing::Groups(vec![ShareGroup { modules: c.targets.clone(), layers: None }]);
    let s = Adapter::new(c, dims).unwrap();
    save_gift(&s, &out).unwrap();
    let keys: Vec<String> = raw(&out).into_keys().collect();
    assert_eq!(keys.len(), 2);
    assert!(keys.contains(&"in_projections.shared_projection.weight".to_string()));
    assert_eq!(load_gift(&out, &dims).unwrap(), s);
    // sharing the GIFT layout cannot hold
    let mut c = AdapterConfig::new(3, vec![Module::QProj]).unwrap();
    c.sharing = Sharing::None;
    assert!(save_gift(&Adapter::new(c, dims).unwrap(), &out).is_err());
    // no temp files left behind
    let names: Vec<String> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp")), "{names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gift_bad_files() {
    let dir = common::fresh_dir("adapter-giftbad");
    let good = raw(&fixture("final_adapter.safetensors"));
    let p = dir.join("a.safetensors");
    let dims = smol();

    // truncated / garbage
    let bytes = std::fs::read(fixture("final_adapter.safetensors")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    assert_format_err(load_gift(&p, &dims), "a.safetensors", "not a valid safetensors");
    std::fs::write(&p, b"hello").unwrap();
    assert_format_err(load_gift(&p, &dims), "a.safetensors", "not a valid safetensors");
    assert!(matches!(load_gift(&dir.join("missing.safetensors"), &dims), Err(Error::Io { .. })));

    // missing out_projection
    let mut t = good.clone();
    t.remove("out_projections.k_proj.weight");
    write_raw(&p, &t);
    assert_format_err(load_gift(&p, &dims), "a.safetensors", "out_projections.k_proj.weight");
    // unknown module
    let mut t = good.clone();
    let v = t["in_projections.q_proj.weight"].clone();
    t.insert("in_projections.lm_head.weight".into(), v.clone());
    t.insert("out_projections.lm_head.weight".into(), t["out_projections.q_proj.weight"].clone());
    write_raw(&p, &t);
    assert_format_err(load_gift(&p, &dims), "a.safetensors", "lm_head");
    // unexpected key
    let mut t = good.clone();
    t.insert("hypernets.q_proj.weight".into(), v.clone());
    write_raw(&p, &t);
    assert_format_err(load_gift(&p, &dims), "a.safetensors", "hypernets.q_proj.weight");
    // wrong shape (transposed) for one tensor
    let mut t = good.clone();
    let (d, _, b) = t["in_projections.v_proj.weight"].clone();
    t.insert("in_projections.v_proj.weight".into(), (d, vec![576, 4], b));
    write_raw(&p, &t);
    assert_format_err(load_gift(&p, &dims), "a.safetensors", "in_projections.v_proj.weight");
    // rank mismatch between modules
    let mut t = good.clone();
    let (d, _, b) = t["out_projections.o_proj.weight"].clone();
    t.insert("out_projections.o_proj.weight".into(), (d, vec![1152, 2], b));
    write_raw(&p, &t);
    assert_format_err(load_gift(&p, &dims), "a.safetensors", "out_projections.o_proj.weight");
    // the model's dims disagree (hidden 512)
    write_raw(&p, &good);
    assert!(matches!(load_gift(&p, &ModelDims::new(30, 512, 1536).unwrap()), Err(Error::Format { .. })));
    // integer dtype
    let mut t = good.clone();
    let (_, s, b) = t["in_projections.q_proj.weight"].clone();
    t.insert("in_projections.q_proj.weight".into(), (Dtype::I32, s, b));
    write_raw(&p, &t);
    assert_format_err(load_gift(&p, &dims), "a.safetensors", "dtype");
    // NaN
    let mut t = good.clone();
    let (d, s, mut b) = t["in_projections.q_proj.weight"].clone();
    b[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    t.insert("in_projections.q_proj.weight".into(), (d, s, b));
    write_raw(&p, &t);
    assert_format_err(load_gift(&p, &dims), "a.safetensors", "not finite");
    // f16 and f64 are converted
    let mut t = good.clone();
    let (_, s, b) = t["out_projections.up_proj.weight"].clone();
    let vals: Vec<f32> = b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let b16: Vec<u8> = vals.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect();
    t.insert("out_projections.up_proj.weight".into(), (Dtype::F16, s.clone(), b16));
    let b64: Vec<u8> = vals.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect();
    t.insert("out_projections.gate_proj.weight".into(), (Dtype::F64, s, b64));
    write_raw(&p, &t);
    let a = load_gift(&p, &dims).unwrap();
    let want = load_gift(&fixture("final_adapter.safetensors"), &dims).unwrap();
    let up = |a: &Adapter, m| a.pair(0, m).unwrap().unwrap().psi.clone();
    assert_eq!(up(&a, Module::GateProj), {
        // gate got up_proj's values as f64: exact
        let mut v = vec![0.0f32; 576 * 4];
        let psi_t = vals.clone(); // out_proj = psi^T (576 x 4)
        for j in 0..576 {
            for k in 0..4 {
                v[k * 576 + j] = psi_t[j * 4 + k];
            }
        }
        v
    });
    let diff = up(&a, Module::UpProj).iter().zip(up(&want, Module::UpProj)).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(diff < 1e-3, "f16 conversion error {diff}");
    // a JSON beside that disagrees
    write_raw(&p, &good);
    std::fs::write(dir.join("a.json"), r#"{"rank": 8, "target_modules": ["q_proj"], "share_projections": false, "in_projection_bias": false, "out_projection_bias": false, "alpha": null, "dropout": 0.0, "seed": 0, "init": "gift"}"#).unwrap();
    assert_format_err(load_gift(&p, &dims), "a.json", "rank");
    std::fs::write(dir.join("a.json"), b"{not json").unwrap();
    assert_format_err(load_gift(&p, &dims), "a.json", "");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ----------------------------------------------------------------------------- PEFT layout

fn random_values(c: &AdapterConfig, dims: &ModelDims, seed: u64) -> Adapter {
    let names = Adapter::pair_names(c, dims).unwrap();
    let a0 = Adapter::new(c.clone(), *dims).unwrap();
    let values = a0
        .pairs()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let n = p.d_in * c.rank;
            let f = |s: u64| common::rand_vec(s, n).into_iter().map(|x| x as f32).collect::<Vec<f32>>();
            (f(seed + 2 * i as u64), f(seed + 2 * i as u64 + 1))
        })
        .collect();
    assert_eq!(names.len(), a0.pairs().len());
    Adapter::from_values(c.clone(), *dims, values).unwrap()
}

#[test]
fn peft_round_trips() {
    let dims = ModelDims::new(4, 24, 40).unwrap();
    let all = Module::ALL.to_vec();
    let mut configs = Vec::new();
    let mut c = AdapterConfig::new(3, all.clone()).unwrap();
    configs.push(c.clone());
    c.alpha = Some(6.0);
    c.sharing = Sharing::None;
    configs.push(c.clone());
    c.targets = vec![Module::QProj, Module::KProj, Module::VProj, Module::GateProj, Module::UpProj, Module::DownProj];
    c.sharing = Sharing::Groups(vec![
        ShareGroup { modules: vec![Module::QProj, Module::KProj, Module::VProj], layers: None },
        ShareGroup { modules: vec![Module::GateProj, Module::UpProj], layers: Some(vec![1, 3]) },
    ]);
    c.dropout = 0.05;
    c.init = Init::Peft;
    c.seed = 9;
    configs.push(c.clone());
    for (i, c) in configs.into_iter().enumerate() {
        let dir = common::fresh_dir(&format!("adapter-peft{i}"));
        let a = random_values(&c, &dims, 1000 * i as u64);
        save_peft(&a, &dir).unwrap();
        let b = load_peft(&dir, &dims).unwrap();
        assert_eq!(a, b, "config {i}");
        // the safetensors holds exactly the owners' keys, shapes r x d_in
        let t = raw(&dir.join(PEFT_WEIGHTS_FILE));
        assert_eq!(t.len(), 2 * a.pairs().len());
        for p in a.pairs() {
            let (l, m) = p.sites[0];
            let k = format!("base_model.model.model.layers.{l}.{}.{}.wegeft_psi.weight", m.parent(), m.name());
            assert_eq!(t[&k].1, vec![3, p.d_in], "{k}");
            // psi stored as is, phi transposed
            let psi: Vec<f32> = t[&k].2.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(psi, p.psi);
        }
        // without our metadata, the adapter_config.json alone gives the same layout and values
        let mut stripped = HashMap::new();
        for (k, v) in t {
            stripped.insert(k, v);
        }
        write_raw(&dir.join(PEFT_WEIGHTS_FILE), &stripped);
        let c2 = load_peft(&dir, &dims).unwrap();
        assert_eq!(c2.pairs(), a.pairs(), "config {i} from adapter_config.json only");
        assert_eq!(c2.scale(), a.scale());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn peft_config_semantics_of_the_fork() {
    let dims = ModelDims::new(3, 8, 12).unwrap();
    let dir = common::fresh_dir("adapter-peftsem");
    // a config as the fork writes it by default: tied_modules null -> [[m] for m in targets],
    // which re.match never finds in "model.layers.L.self_attn.q_proj": every layer owns a pair
    let mut t = HashMap::new();
    let val = |n: usize| -> Vec<u8> { (0..n).flat_map(|i| (i as f32 * 0.01).to_le_bytes()).collect() };
    for l in 0..3 {
        for w in ["phi", "psi"] {
            t.insert(format!("base_model.model.model.layers.{l}.self_attn.q_proj.wegeft_{w}.weight"), (Dtype::F32, vec![2, 8], val(16)));
        }
    }
    write_raw(&dir.join(PEFT_WEIGHTS_FILE), &t);
    let cfg = |tied: &str| {
        format!(r#"{{"peft_type": "WEGEFT", "r": 2, "wegeft_alpha": 4, "target_modules": ["q_proj"], "tied_modules": {tied}, "transform_dim": "input", "bias": "none", "rank_pattern": {{}}, "alpha_pattern": {{}}}}"#)
    };
    std::fs::write(dir.join(PEFT_CONFIG_FILE), cfg("null")).unwrap();
    let a = load_peft(&dir, &dims).unwrap();
    assert_eq!(a.config.sharing, Sharing::None);
    assert_eq!(a.pairs().len(), 3);
    assert_eq!(a.scale(), 2.0);
    // a pattern that matches: one shared pair, owned by layer 0; the other layers' keys are extra
    std::fs::write(dir.join(PEFT_CONFIG_FILE), cfg(r#"[[".*q_proj"]]"#)).unwrap();
    assert_format_err(load_peft(&dir, &dims), PEFT_WEIGHTS_FILE, "unexpected tensor base_model.model.model.layers.1");
    let mut t1 = t.clone();
    t1.retain(|k, _| k.contains("layers.0."));
    write_raw(&dir.join(PEFT_WEIGHTS_FILE), &t1);
    let a = load_peft(&dir, &dims).unwrap();
    assert_eq!(a.config.sharing, Sharing::PerModule);
    assert_eq!(a.pairs()[0].sites.len(), 3);
    // layer-subset group written as literal keys
    std::fs::write(dir.join(PEFT_CONFIG_FILE), cfg(r#"[["model\\.layers\\.(1|2)\\.self_attn\\.q_proj$"]]"#)).unwrap();
    let mut t2 = t.clone();
    t2.retain(|k, _| !k.contains("layers.2."));
    write_raw(&dir.join(PEFT_WEIGHTS_FILE), &t2);
    let a = load_peft(&dir, &dims).unwrap();
    assert_eq!(a.pairs().len(), 2);
    assert_eq!(a.pair_index(1, Module::QProj).unwrap(), a.pair_index(2, Module::QProj).unwrap());
    // errors: unsupported options, bad patterns, missing keys, wrong shapes
    write_raw(&dir.join(PEFT_WEIGHTS_FILE), &t);
    for (bad, needle) in [
        (cfg("null").replace(r#""input""#, r#""output""#), "transform_dim"),
        (cfg(r#"[["[qk]_proj"]]"#), "tied_modules pattern"),
        (cfg("null").replace(r#""rank_pattern": {}"#, r#""rank_pattern": {"q_proj": 4}"#), "rank_pattern"),
        (cfg("null").replace(r#"["q_proj"]"#, r#"["lm_head"]"#), "lm_head"),
        (cfg("null").replace(r#""r": 2"#, r#""r": 4"#), ""),
        (cfg("null").replace("WEGEFT", "LORA"), "peft_type"),
        ("{".to_string(), ""),
    ] {
        std::fs::write(dir.join(PEFT_CONFIG_FILE), &bad).unwrap();
        let r = load_peft(&dir, &dims);
        assert!(matches!(&r, Err(Error::Format { msg, .. }) if msg.contains(needle)), "{bad}: {r:?}");
    }
    std::fs::write(dir.join(PEFT_CONFIG_FILE), cfg("null")).unwrap();
    let mut t3 = t.clone();
    t3.remove("base_model.model.model.layers.2.self_attn.q_proj.wegeft_phi.weight");
    write_raw(&dir.join(PEFT_WEIGHTS_FILE), &t3);
    assert_format_err(load_peft(&dir, &dims), PEFT_WEIGHTS_FILE, "missing tensor base_model.model.model.layers.2.self_attn.q_proj.wegeft_phi.weight");
    let bytes = std::fs::read(dir.join(PEFT_WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(PEFT_WEIGHTS_FILE), &bytes[..bytes.len() / 2]).unwrap();
    assert_format_err(load_peft(&dir, &dims), PEFT_WEIGHTS_FILE, "not a valid safetensors");
    std::fs::remove_file(dir.join(PEFT_CONFIG_FILE)).unwrap();
    assert!(matches!(load_peft(&dir, &dims), Err(Error::Io { .. })));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gift_fixture_to_peft_and_back() {
    let dims = smol();
    let a = load_gift(&fixture("init_adapter.safetensors"), &dims).unwrap();
    let dir = common::fresh_dir("adapter-g2p");
    save_peft(&a, &dir).unwrap();
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(PEFT_CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["wegeft_alpha"].as_f64(), Some(4.0)); // scale 1 = alpha / r
    assert_eq!(cfg["tied_modules"][0][0], r".*\.q_proj$");
    let b = load_peft(&dir, &dims).unwrap();
    assert_eq!(a, b);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn atomic_write_replaces_whole_file() {
    let dir = common::fresh_dir("adapter-atomic");
    let p = dir.join("f.bin");
    write_atomic(&p, b"first version").unwrap();
    write_atomic(&p, b"2").unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), b"2");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    assert!(write_atomic(&dir.join("no/such/dir/f"), b"x").is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}
