"""Cost of the FedLEASE mixture: one training step with M experts vs a single LoRA of the same rank.

Packaged encoder, the default batch of params.yaml on real default-task examples, plain
torch engine (pure step cost), both timed in this run in alternating blocks.
Last line: `mixture_step_ratio: <value>` (target <= 1.10 at M = 4).

    python benchmarks/mixture_cost.py [--experts 4] [--blocks 6] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from common import default_config

from fedlease.runtime import ClientRuntime
from fedlease.data.stage import build_partitions
from fedlease.engine.batching import encode_classification
from fedlease.engine.trainer import compute_loss
from fedlease.models.adapters import set_trainable
from fedlease.strategies.base import ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cfg = default_config(tempfile.mkdtemp(prefix="bench-"))
    clients, _ = build_partitions(cfg)
    records = [r for c in clients for r in c.train]
    rt = ClientRuntime(cfg)
    models = {}
    for name, experts in (("lora", None), ("mixture", args.experts)):
        model = rt.fresh_model(ModelSpec(r=cfg.lora.r, num_experts=experts), 4)
        params = set_trainable(model, ("lora", "router", "head"), cfg.model.head_module)
        models[name] = (model, torch.optim.AdamW(params, lr=cfg.training.lr))
    bs = cfg.training.batch_size
    batches = [encode_classification(rt.tokenizer, records[i * bs : (i + 1) * bs], cfg.model.max_length)
               for i in range(args.steps)]
    for b in batches:
        b["labels"] = b["labels"] % 4

    def block(name: str) -> float:
        model, opt = models[name]
        model.train()
        t0 = time.perf_counter()
        for b in batches:
            compute_loss(model, b, "classification").backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / len(batches)

    block("lora"), block("mixture")  # warm-up
    times: dict[str, list[float]] = {"lora": [], "mixture": []}
    for i in range(args.blocks):
        for name in (("lora", "mixture") if i % 2 == 0 else ("mixture", "lora")):
            times[name].append(block(name))
    lora, mix = statistics.median(times["lora"]), statistics.median(times["mixture"])
    print(f"batch {bs} x {cfg.model.max_length} tokens, rank {cfg.lora.r}, M = {args.experts}, "
          f"{args.blocks} blocks x {args.steps} steps, torch threads {torch.get_num_threads()}")
    print(f"single LoRA step: {1000 * lora:.1f} ms (median of blocks {[round(1000 * t, 1) for t in times['lora']]})")
    print(f"mixture step:     {1000 * mix:.1f} ms (median of blocks {[round(1000 * t, 1) for t in times['mixture']]})")
    print(f"mixture_step_ratio: {mix / lora:.3f}")


if __name__ == "__main__":
    main()
