"""Cost of the FedLEASE mixture: one training step with M experts vs a single LoRA of the same rank.

Packaged encoder, the default batch of params.yaml on real default-task examples, plain
torch engine (pure step cost), both timed in this run in alternating blocks. Also the number of
operators one training step runs (torch profiler, leaf aten ops: the CPU proxy for GPU kernel
launches, where the mixture's cost is launch count, not FLOPs), and with --bf16 the same under
bf16 autocast.
Last lines: `operator_count_ratio: <value>` (forward + backward; target <= 1.3), `mixture_step_ratio:
<value>` (<= 1.10).

    python benchmarks/mixture_cost.py [--experts 4] [--blocks 6] [--steps 10] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from common import default_config, kernel_ops

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
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and backward")
    args = ap.parse_args()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
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

    def step(name: str, b: dict[str, torch.Tensor]) -> None:
        model, opt = models[name]
        with autocast:
            loss = compute_loss(model, b, "classification")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def block(name: str) -> float:
        models[name][0].train()
        t0 = time.perf_counter()
        for b in batches:
            step(name, b)
        return (time.perf_counter() - t0) / len(batches)

    def operators(name: str) -> tuple[int, int]:
        """Kernel-launching operators of forward + backward, and of the whole step with AdamW's update."""
        from torch.profiler import ProfilerActivity, profile

        model, opt = models[name]
        model.train()
        step(name, batches[0])  # allocations and lazy init outside the count
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with autocast:
                loss = compute_loss(model, batches[0], "classification")
            loss.backward()
        fwd_bwd = kernel_ops(prof.events())
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return fwd_bwd, fwd_bwd + kernel_ops(prof.events())

    ops = {name: operators(name) for name in ("lora", "mixture")}
    block("lora"), block("mixture")  # warm-up
    times: dict[str, list[float]] = {"lora": [], "mixture": []}
    for i in range(args.blocks):
        for name in (("lora", "mixture") if i % 2 == 0 else ("mixture", "lora")):
            times[name].append(block(name))
    lora, mix = statistics.median(times["lora"]), statistics.median(times["mixture"])
    print(f"batch {bs} x {cfg.model.max_length} tokens, rank {cfg.lora.r}, M = {args.experts}, "
          f"{args.blocks} blocks x {args.steps} steps, torch threads {torch.get_num_threads()}, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}")
    print(f"kernel operators, forward + backward: single LoRA {ops['lora'][0]}, mixture {ops['mixture'][0]}; "
          f"with the optimizer step (AdamW, one loop per parameter on a CPU): {ops['lora'][1]}, {ops['mixture'][1]}")
    print(f"single LoRA step: {1000 * lora:.1f} ms (median of blocks {[round(1000 * t, 1) for t in times['lora']]})")
    print(f"mixture step:     {1000 * mix:.1f} ms (median of blocks {[round(1000 * t, 1) for t in times['mixture']]})")
    print(f"operator_count_ratio_with_optimizer: {ops['mixture'][1] / ops['lora'][1]:.3f}")
    print(f"operator_count_ratio: {ops['mixture'][0] / ops['lora'][0]:.3f}")
    print(f"mixture_step_ratio: {mix / lora:.3f}")


if __name__ == "__main__":
    main()
