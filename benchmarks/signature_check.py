"""The allocation the input-signature distance makes on issue 20's settings, with no warm-up run: its ARI.

    python benchmarks/signature_check.py [--seeds 0,1,2] [--runs DIR] [--full]

FedLEASE clusters clients by their warm-up LoRA's B matrices, and at this project's budgets B follows the
head a client starts from more than its data (`head_seed_check.py`, benchmarks/README.md). The option
`fedlease.clustering.distance: inputs` clusters instead each client's input signature, the frozen base
model's mean representation of its training inputs (no head, no labels, no training: `client.input_signature`,
which each client computes before its warm-up). This computes the signatures as the option does, makes the
allocation the run's clustering settings make of them (`pipeline.allocate`: 1 - cos of the signatures centred
on their mean) and prints its ARI against the tasks, on every setting of issue 20 (quick size unless `--full`).
Such a signature tells clients apart by what their inputs look like: it cannot tell two tasks on the same
inputs apart, and it shares a summary of a client's inputs with the server (as B does, in another form).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent


def settings() -> dict[str, tuple[str, list[str]]]:
    """Issue 20's settings, name: (params file, overrides); the label skew is quality.py's own (`LABEL_SKEW`,
    its alpha overridden where a later override names another)."""
    from quality import LABEL_SKEW

    return {
        "default mix": (str(HERE.parent / "params.yaml"), []),
        "label skew 0.5": (str(HERE.parent / "params.yaml"), [*LABEL_SKEW]),
        "label skew 0.1": (str(HERE.parent / "params.yaml"),
                           [*LABEL_SKEW, "data.partition.dirichlet_alpha=0.1", "data.partition.min_test_per_client=4"]),
        "3-task mix": (str(HERE / "params_mix3.yaml"), []),
        "5-task mix": (str(HERE / "params_mix5.yaml"), []),
        "4 binary tasks": (str(HERE / "params_binary4.yaml"), []),
        "NLG": (str(HERE.parent / "params_nlg.yaml"), []),  # prompts through the decoder; quick: quality.py's NLG size
    }


def signatures(cfg, n: int) -> list[dict]:  # type: ignore[no-untyped-def]
    """Each client's input signature as the option computes it (`client.input_signature`: the frozen base model,
    adapter disabled, dropout off), keyed as in a warm-up upload."""
    from fedlease.allocation import SIGNATURE_KEY
    from fedlease.client import input_signature
    from fedlease.data.stage import load_client
    from fedlease.runtime import ClientRuntime
    from fedlease.strategies.base import ModelSpec

    rt = ClientRuntime(cfg)
    out = []
    for c in range(n):
        data = load_client(cfg, c)
        model = rt.fresh_model(ModelSpec(r=cfg.lora.r), len(data.label_names))
        out.append({SIGNATURE_KEY: input_signature(rt, model, data.train)})
    return out


def allocation_of(cfg, adapters: list[dict], tasks: list[str]) -> str:  # type: ignore[no-untyped-def]
    """The allocation the run's clustering settings make of the signatures by the `inputs` distance, its ARI."""
    from sklearn.metrics import adjusted_rand_score

    from fedlease.pipeline import allocate

    _, alloc = allocate(cfg, adapters, "inputs")
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
    for name, (params, extra) in settings().items():
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
