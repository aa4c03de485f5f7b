"""Would an allocation signal that does not pass through the head find the tasks? A diagnostic, not an option.

    python benchmarks/signature_check.py [--seeds 0,1,2] [--runs DIR] [--full]

FedLEASE clusters clients by their warm-up LoRA's B matrices, and at this project's budgets B follows the
head a client starts from more than its data (`head_seed_check.py`, benchmarks/README.md). This computes,
for each client, the frozen base model's mean sentence representation of its training inputs (no warm-up,
no head, no labels), centres the clients' vectors on their mean, clusters them by cosine distance with the
allocation's own rule (`choose_experts`, the run's clustering settings) and prints the ARI against the tasks,
on every setting of issue 20 (quick size unless `--full`). Such a signature tells clients apart by what their
inputs look like: it cannot tell two tasks on the same inputs apart, and it shares a summary of a client's
inputs with the server (as B does, in another form). The option built on it: `fedlease.clustering.distance:
inputs` (the same signature, computed by each client before its warm-up).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent
SKEW = ["data.partition.scheme=task_dirichlet", "data.partition.balanced_test_per_label=8"]
SETTINGS = {  # name: (params file, overrides): issue 20's settings
    "default mix": (str(HERE.parent / "params.yaml"), []),
    "label skew 0.5": (str(HERE.parent / "params.yaml"), [*SKEW, "data.partition.dirichlet_alpha=0.5"]),
    "label skew 0.1": (str(HERE.parent / "params.yaml"),
                       [*SKEW, "data.partition.dirichlet_alpha=0.1", "data.partition.min_test_per_client=4"]),
    "3-task mix": (str(HERE / "params_mix3.yaml"), []),
    "5-task mix": (str(HERE / "params_mix5.yaml"), []),
    "4 binary tasks": (str(HERE / "params_binary4.yaml"), []),
    "NLG": (str(HERE.parent / "params_nlg.yaml"), []),  # prompts through the decoder; quick: quality.py's NLG size
}


def signatures(cfg, n: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """(N, d): each client's mean last-layer representation of its training inputs under the frozen base model."""
    import torch

    from fedlease.data.stage import load_client
    from fedlease.engine.evaluate import encode_inputs
    from fedlease.models.base import load_base_model
    from fedlease.models.dual import sequence_mean

    loaded = load_base_model(cfg.model, cfg.data.kind, Path(cfg.data.cache_dir), seed=cfg.seed)
    out = []
    for c in range(n):
        records = load_client(cfg, c).train
        reps = []
        for i in range(0, len(records), cfg.training.eval_batch_size):
            enc = encode_inputs(loaded.tokenizer, records[i:i + cfg.training.eval_batch_size], cfg.data.kind,
                                cfg.model.max_length)
            call = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            with torch.no_grad():
                hidden = loaded.model(**call, output_hidden_states=True).hidden_states[-1].float()
            reps.append(sequence_mean(hidden, enc.get("attention_mask")))
        out.append(torch.cat(reps).mean(dim=0).numpy())
    return np.stack(out)


def allocation_of(cfg, sig: np.ndarray, tasks: list[str]) -> str:  # type: ignore[no-untyped-def]
    """The allocation rule applied to the signatures' centred cosine distances, with its ARI."""
    from sklearn.metrics import adjusted_rand_score

    from fedlease.allocation import DISTANCE_RANGE, choose_experts

    centred = sig - sig.mean(axis=0, keepdims=True)
    unit = centred / np.linalg.norm(centred, axis=1, keepdims=True).clip(min=1e-12)
    dist = np.clip(1.0 - unit @ unit.T, 0.0, 2.0)
    np.fill_diagonal(dist, 0.0)
    cl = cfg.fedlease.clustering
    alloc = choose_experts(dist, cfg.fedlease.m_max, cl.method, cl.linkage, cl.fixed_m, cfg.seed,
                           cl.silhouette_tolerance, DISTANCE_RANGE["cosine"])
    return f"M = {alloc.num_experts}, ARI {adjusted_rand_score(tasks, alloc.assignment):.3f}"


def main() -> None:
    from quality import NLG_QUICK, QUICK

    from fedlease.config import load_config
    from fedlease.pipeline import stage_data

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default=str(HERE / "runs" / "signature-check"))
    ap.add_argument("--full", action="store_true", help="the params' own size (default: quality.py's quick size)")
    args = ap.parse_args()
    for name, (params, extra) in SETTINGS.items():
        results = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            folder = Path(args.runs) / name.replace(" ", "_") / f"seed{seed}"
            quick = NLG_QUICK if name == "NLG" else QUICK
            cfg = load_config(params, [*([] if args.full else quick), *extra, f"seed={seed}", f"output_dir={folder}",
                                       "tracking.enabled=false", "strategies=[fedlease]"])
            stage_data(cfg)
            clients = json.loads((folder / "data" / "stats.json").read_text())["clients"]
            tasks = [c["task"] for c in clients]
            results.append(f"seed {seed}: {allocation_of(cfg, signatures(cfg, len(tasks)), tasks)}")
        print(f"{name}: " + "; ".join(results), flush=True)


if __name__ == "__main__":
    main()
