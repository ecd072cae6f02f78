#!/usr/bin/env python3
"""Writes the reference data of the crate's training-recipe tests (tests/recipe.rs): transformers'
learning-rate schedules, and a WeGeFT fine-tune with the setup of transformers' Trainer
(warm-up and decay, gradient clipping, gradient accumulation) in float64 PyTorch.

* tests/data/schedules.json — for each case (kind, warm-up, total steps, base lr), the learning
  rate of updates 1 to total + 3 as `transformers.get_scheduler(kind, AdamW(lr),
  num_warmup_steps, num_training_steps)` sets it (`optimizer.param_groups[0]["lr"]` before each
  `optimizer.step()`, the scheduler stepped after it; past the total too, where transformers'
  cosine rises again).
* tests/data/llama3/recipe/ — train.json, train_init.safetensors, train_final.safetensors:
  scripts/reference_common.train_reference with a recipe (cosine schedule with 2 warm-up steps
  over 6 updates, lr 8e-3, gradient clipped to a norm of 3.5, 2 batches per update) on the
  tiny Llama 3 of tests/data/llama3/hf (loaded in float64). The gradient norms lie on both
  sides of 3.5, so some updates are clipped and some are not (the script asserts it).

    python -m venv /tmp/pt && /tmp/pt/bin/pip install torch transformers safetensors
    /tmp/pt/bin/python scripts/recipe_reference.py
"""
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM, get_scheduler

import reference_common as common

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "tests", "data")
RECIPE = dict(steps=6, lr=8e-3, schedule="cosine", warmup_steps=2, max_grad_norm=3.5, grad_accum=2)
SCHEDULES = [
    ("constant", 0, 5, 1e-3),
    ("constant", 3, 8, 2e-3),
    ("linear", 0, 6, 1e-3),
    ("linear", 3, 10, 5e-4),
    ("linear", 10, 10, 1e-3),
    ("linear", 12, 10, 1e-3),
    ("cosine", 0, 7, 2e-3),
    ("cosine", 2, 9, 3e-3),
    ("cosine", 1, 1, 1e-3),
]


def schedules():
    cases = []
    for kind, warmup, total, lr in SCHEDULES:
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        sched = get_scheduler(kind if warmup == 0 or kind != "constant" else "constant_with_warmup", opt,
                              num_warmup_steps=warmup, num_training_steps=total)
        lrs = []
        for _ in range(total + 3):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        cases.append(dict(kind=kind, warmup=warmup, total=total, lr=lr, lrs=lrs))
    return cases


def main():
    json.dump(dict(cases=schedules(), transformers=transformers.__version__),
              open(os.path.join(DATA, "schedules.json"), "w"), indent=1)
    out = os.path.join(DATA, "llama3", "recipe")
    os.makedirs(out, exist_ok=True)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(DATA, "llama3", "hf"), dtype=torch.float64)
    t = common.train_reference("llama3-recipe", model, out, recipe=RECIPE)
    print("losses", t["losses"])
    print("lrs", t["lrs"])
    print("grad norms", t["grad_norms"])
    clipped = [n > RECIPE["max_grad_norm"] for n in t["grad_norms"]]
    assert any(clipped) and not all(clipped), t["grad_norms"]
    t["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__)
    json.dump(t, open(os.path.join(out, "train.json"), "w"))
    common.print_sizes(out)


if __name__ == "__main__":
    main()
