"""Accuracy checks for `convnext.optimize` on real data (issue #5 targets 2 and 5), not timings.

1. bf16 inference agrees with fp32: top-1 agreement and accuracy of the plain fp32 model and of the bf16 fast
   path on a trained run's held-out images (e.g. `runs/cifar10_budget/ours` from `cifar10_budget.py`).
2. Training through the fast path follows plain fp32 eager training: the loss of 200 steps from the same
   initial weights and batches, fp32 and bf16 fast paths against the plain model.

    python benchmarks/fast_checks.py --run runs/cifar10_budget/ours --steps 200
"""

from __future__ import annotations

import argparse
import copy
import json

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from convnext.data import build_eval_dataset
from convnext.fast import optimize
from convnext.resolve import resolve


def bf16_agreement(run: str, batch_size: int, limit: int | None) -> dict:
    r = resolve(run)
    model, cfg = r.model, r.run
    d = cfg["data"]
    ds, _ = build_eval_dataset(d["name"], "val", d["img_size"], d["crop_pct"], d["mean"], d["std"])
    if limit:
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
    loader = DataLoader(ds, batch_size=batch_size)
    x0 = next(iter(loader))[0]
    fast = optimize(model, "inference", torch.bfloat16, example_input=x0, aot=False)
    n = agree = right32 = right16 = 0
    with torch.inference_mode():
        for x, y in loader:
            p32 = model(x).argmax(1)
            p16 = fast(x).argmax(1)
            n += len(y)
            agree += int((p32 == p16).sum())
            right32 += int((p32 == y).sum())
            right16 += int((p16 == y).sum())
    return {"n": n, "top1_agreement": 100 * agree / n, "top1_fp32": 100 * right32 / n, "top1_bf16": 100 * right16 / n}


def loss_curves(run: str, steps: int, batch_size: int) -> dict:
    """Plain fp32 eager vs fast fp32 vs fast bf16 training from the run's architecture at init, same batches."""
    r = resolve(run)
    model, cfg = r.model, r.run
    d = cfg["data"]
    ds, _ = build_eval_dataset(d["name"], "train", d["img_size"], d["crop_pct"], d["mean"], d["std"])
    g = torch.Generator().manual_seed(0)
    batches = [next(iter(DataLoader(ds, batch_size=batch_size, shuffle=True, generator=g))) for _ in range(8)]
    torch.manual_seed(0)
    for m in model.modules():  # fresh weights: the interesting part of a loss curve is its start
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    init = copy.deepcopy(model.state_dict())
    curves = {}
    for name, dtype in [("plain_fp32", None), ("fast_fp32", torch.float32), ("fast_bf16", torch.bfloat16)]:
        model.load_state_dict(init)
        model.train()
        net = model if dtype is None else optimize(model, "train", dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
        losses = []
        for s in range(steps):
            x, y = batches[s % len(batches)]
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves[name] = losses
    ref = torch.tensor(curves["plain_fp32"])
    out = {}
    for name in ("fast_fp32", "fast_bf16"):
        diff = (torch.tensor(curves[name]) - ref).abs()
        out[name] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                     "final_loss": curves[name][-1]}  # fmt: skip
    out["plain_fp32"] = {"final_loss": curves["plain_fp32"][-1], "first_loss": curves["plain_fp32"][0]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a training run folder (config.json + best.pt)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=None, help="evaluate on the first N held-out images")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "bf16_inference": bf16_agreement(args.run, 256, args.limit),
        "training_loss": loss_curves(args.run, args.steps, args.batch_size),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
