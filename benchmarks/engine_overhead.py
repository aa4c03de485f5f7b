"""Engine overhead: DeepSpeed vs plain-torch step time, fixed per-client-round cost, memory growth.

On the packaged encoder with the default params (batch, epochs, train size), in one run:
1. the same batches trained by each engine (step time excludes engine creation);
2. `--rounds` consecutive default client-rounds through the real client path
   (`fedlease.client.client_train`: load state, build the engine, train, write the upload):
   fixed overhead = call time - pure step time, as a share of the call;
3. peak RSS growth after the first client-round.
Last three lines: `deepspeed_step_ratio`, `fixed_overhead_share`, `rss_growth`.

    python benchmarks/engine_overhead.py [--rounds 50] [--steps 12] [--set key=value] [--start-client N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import current_rss_mb, default_config, peak_rss_mb

from fedlease.client import client_train
from fedlease.exchange import write_download
from fedlease.runtime import runtime_for
from fedlease.data.stage import run_data_stage
from fedlease.engine.batching import encode_classification, Batch
from fedlease.engine.trainer import DeepSpeedEngine, TorchEngine
from fedlease.models.adapters import set_trainable
from fedlease.strategies import make_strategy
from fedlease.strategies.base import InitContext, ModelSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="params override, e.g. training.reserve_steps=0")
    ap.add_argument("--start-client", type=int, default=0,
                    help="diagnostic: begin the cycle over clients here (e.g. the client with the longest texts)")
    args = ap.parse_args()
    out = tempfile.mkdtemp(prefix="bench-engine-")
    cfg = default_config(out, ["strategies=[fedit]", *args.overrides])
    manifest = run_data_stage(cfg)
    n = len(manifest["clients"])
    rt = runtime_for(cfg)
    rt.build(ModelSpec(r=cfg.lora.r))  # loads the base model and its tokenizer
    from fedlease.data.stage import load_client

    records = load_client(cfg, 0).train
    bs = cfg.training.batch_size
    enc = [encode_classification(rt.tokenizer, records[(i * bs) % len(records):][:bs], cfg.model.max_length)
           for i in range(args.steps)]
    engines = {"torch": TorchEngine(cfg.training), "deepspeed": DeepSpeedEngine(cfg.training, Path(cfg.data.cache_dir))}
    step = {}
    for name, engine in engines.items():
        model = rt.fresh_model(ModelSpec(r=cfg.lora.r), len(load_client(cfg, 0).label_names))
        params = set_trainable(model, ("lora", "head"), cfg.model.head_module)
        engine.train(model, params, [Batch(e, bs) for e in enc[:2]], "classification")  # warm-up / JIT
        times = []
        for _ in range(3):
            res = engine.train(model, params, [Batch(e, bs) for e in enc], "classification")
            times.append((res.seconds - res.setup_seconds) / res.steps)
        step[name] = statistics.median(times)
    print(f"step (batch {bs} x {cfg.model.max_length}): torch {1000 * step['torch']:.1f} ms, "
          f"deepspeed ZeRO-{cfg.training.deepspeed.zero_stage} {1000 * step['deepspeed']:.1f} ms")

    strategy = make_strategy("fedit", cfg, n)
    state = strategy.init_state(InitContext(rt.common_init(ModelSpec(r=cfg.lora.r))))
    shares, rss_after = [], []
    for i in range(args.rounds):
        cid = (args.start_client + i) % n
        down = Path(out) / "bench" / f"down_{i}.safetensors"
        write_download(down, strategy.download(state, cid))
        t0 = time.perf_counter()
        upload = str(Path(out) / "bench" / f"up_{i}.safetensors")
        res = client_train(cfg, "fedit", cid, 1 + i // n, str(down), upload, n)
        total = time.perf_counter() - t0
        pure_steps = res.train_seconds - res.setup_seconds
        shares.append((total - pure_steps) / total)
        rss_after.append(peak_rss_mb())
        if i % 10 == 0:
            print(f"client-round {i}: {total:.2f} s, {res.steps} steps, fixed {total - pure_steps:.2f} s, "
                  f"peak RSS {rss_after[-1]:.0f} MB, current {current_rss_mb():.0f} MB", flush=True)
    growth = (rss_after[-1] - rss_after[0]) / rss_after[0]
    steady = (rss_after[-1] - rss_after[n - 1]) / rss_after[n - 1] if args.rounds > n else float("nan")
    print(f"{args.rounds} client-rounds; peak RSS after the first {rss_after[0]:.0f} MB, after the first pass over "
          f"all {n} clients {rss_after[n - 1]:.0f} MB, after the last {rss_after[-1]:.0f} MB")
    print(f"rss_growth_after_first_pass: {steady:.4f}  (each client has other sequence lengths and head sizes; "
          "the first pass grows the allocator's pools)")
    print(f"deepspeed_step_ratio: {step['deepspeed'] / step['torch']:.3f}")
    print(f"fixed_overhead_share: {statistics.median(shares):.3f}")
    print(f"rss_growth: {growth:.4f}")


if __name__ == "__main__":
    main()
