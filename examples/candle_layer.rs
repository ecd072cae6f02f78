//! A WeGeFT linear layer in a candle model, trained with candle's autograd and AdamW.
//!
//! ```sh
//! cargo run --release --features candle --example candle_layer
//! ```
//!
//! Two frozen linear layers (`W1`, `W2`, as if from a pretrained model) share one trainable
//! WeGeFT pair `(phi, psi)`; `y = L2(relu(L1(x)))` learns a regression target. Each layer
//! computes `x W^T + s (x psi^T) (W phi)^T + b` through this crate's CPU kernels, and its
//! backward returns `dx`, `dphi`, `dpsi` to candle (see `wegeft::candle`).

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Module, Optimizer};
use wegeft::candle::WegeftLinear;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let (d, hidden, d_out, rank, tokens) = (64, 64, 32, 8, 256);
    let scale = 16.0 / rank as f32; // s = alpha / r
    let w1 = (Tensor::randn(0f32, 1.0, (hidden, d), &dev)? / (d as f64).sqrt())?;
    let w2 = (Tensor::randn(0f32, 1.0, (d_out, hidden), &dev)? / (hidden as f64).sqrt())?;
    let b1 = Tensor::zeros(hidden, DType::F32, &dev)?;
    // The pair, shared by both layers (WeGeFT shares one pair per module type). psi starts at
    // zero, as in the official code, so the adapted model starts as the frozen one.
    let phi = Var::from_tensor(&(Tensor::randn(0f32, 1.0, (d, rank), &dev)? / (d as f64).sqrt())?)?;
    let psi = Var::zeros((rank, d), DType::F32, &dev)?;
    let l1 = WegeftLinear::new(&w1, Some(&b1), phi.as_tensor(), psi.as_tensor(), scale)?;
    let l2 = WegeftLinear::new(&w2, None, phi.as_tensor(), psi.as_tensor(), scale)?;

    let x = Tensor::randn(0f32, 1.0, (tokens, d), &dev)?;
    let target = (x.narrow(1, 0, d_out)?.tanh()? * 0.5)?;
    let params = candle_nn::ParamsAdamW { lr: 1e-2, weight_decay: 0.0, ..Default::default() };
    let mut opt = candle_nn::AdamW::new(vec![phi.clone(), psi.clone()], params)?;
    for step in 0..=50 {
        let y = l2.forward(&l1.forward(&x)?.relu()?)?;
        let loss = (y - &target)?.sqr()?.mean_all()?;
        if step % 10 == 0 {
            println!("step {step:>2}: loss {:.5}", loss.to_scalar::<f32>()?);
        }
        opt.backward_step(&loss)?;
    }
    Ok(())
}
