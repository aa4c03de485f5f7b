"""A method's final model as one folder: server state, cluster map, params, each client's local state.

Written by the federate stage, logged to MLflow (and registered for the primary method); `fedlease
predict --model-uri <folder>` rebuilds any client's model from it (`fedlease.predict`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from fedlease.config import Config
from fedlease.data.stage import load_client, load_manifest
from fedlease.engine.trainer import deepspeed_config
from fedlease.io import atomic_dir, atomic_write_json, atomic_write_text, read_json, save_tensors
from fedlease.local_state import load_local_state
from fedlease.paths import RunPaths
from fedlease.strategies.base import ServerState, Strategy


def settle_unchosen(cfg: Config, strategy: Strategy, state: ServerState, client_ids: Iterable[int]) -> ServerState:
    """IFCA: a client never sampled has joined no cluster; its evaluation chose one by loss on its training
    data. The same choice (same rule, data and seed as the last round's evaluation) is recorded in the final
    state, so `fedlease predict` and the peft export give the model that was evaluated, not the common init.
    `client_ids`: the clients whose data is here (all of them in a simulation, a silo's own at a silo)."""
    from fedlease.client import adopt_evaluation_choice
    from fedlease.runtime import SEEDED, build_client_model, runtime_for

    last = strategy.rounds()
    for cid in client_ids:
        download = strategy.eval_download(state, cid)
        if not strategy.candidates(download):
            continue
        rt = runtime_for(cfg)
        data = load_client(cfg, cid)
        with SEEDED:  # the model is built as the last round's evaluation built it (seeded init)
            model = build_client_model(rt, strategy, cid, len(data.label_names), download,
                                       load_local_state(cfg, strategy, cid, last))
            group = adopt_evaluation_choice(rt, strategy, model, download, data.train, cid, last)
        assert group is not None
        state = strategy.settle(state, cid, group)
    return state


def export_final_model(cfg: Config, strategy: Strategy, state: ServerState, folder: Path) -> None:
    """Final server state (experts, routers / shared LoRA) as safetensors + the cluster map + a loading README."""
    paths = RunPaths.of(cfg)
    if not cfg.orchestration.at_silos:  # at the silos the data to choose on is theirs
        state = settle_unchosen(cfg, strategy, state, [c["client_id"] for c in load_manifest(cfg)["clients"]])
    with atomic_dir(folder) as tmp:
        save_tensors(tmp / "server_state.safetensors", state.tensors)
        atomic_write_json(tmp / "meta.json", {"strategy": strategy.name, "state_meta": state.meta,
                                              "model": cfg.model.model_dump(), "lora": cfg.lora.model_dump()})
        if strategy.needs_allocation:
            atomic_write_json(tmp / "cluster_map.json", read_json(paths.cluster_map))
        if cfg.training.engine == "deepspeed":
            atomic_write_json(tmp / "deepspeed_config.json", deepspeed_config(cfg.training))
        atomic_write_json(tmp / "params.json", cfg.model_dump(mode="json"))
        manifest = load_manifest(cfg)
        atomic_write_json(tmp / "clients.json", {str(c["client_id"]): {"task": c["task"]} for c in manifest["clients"]})
        atomic_write_text(tmp / "README.md", MODEL_README.format(strategy=strategy.name))
        # The simulation keeps every client's local state (its head) beside the model so any client's
        # model can be rebuilt; in silo mode the model holds experts and routers only: heads and local
        # state stay at the silos, which export their own clients' models (`fedlease silo export`).
        at_silos = cfg.orchestration.at_silos
        (tmp / "clients").mkdir()
        for c in [] if at_silos else manifest["clients"]:
            cid = c["client_id"]
            local = load_local_state(cfg, strategy, cid, 10**9)  # inherited warm-up state merged in
            if local is not None:
                save_tensors(tmp / "clients" / f"client_{cid:03d}.safetensors", local)
            label_names = load_client(cfg, cid).label_names
            atomic_write_json(tmp / "clients" / f"client_{cid:03d}.json",
                              {"task": c["task"], "label_names": label_names})
    export_peft_adapters(cfg, strategy, state, folder.parent / "peft")


def export_peft_adapters(cfg: Config, strategy: Strategy, state: ServerState, folder: Path) -> None:
    """Standard peft adapters: a single-LoRA method's model of every client (its LoRA and head), and, for
    a method with experts or a global LoRA beside local parts, those shared LoRAs alone."""
    from fedlease.local_state import load_local_state
    from fedlease.models.adapters import get_state
    from fedlease.peft_export import write_adapter
    from fedlease.runtime import build_client_model, runtime_for
    from fedlease.strategies.base import ModelSpec

    manifest = load_manifest(cfg)
    plain = ModelSpec(r=cfg.lora.r)
    at_silos = cfg.orchestration.at_silos  # a client's own model (its head) is exported there
    if not at_silos and all(strategy.spec(c["client_id"]) == plain for c in manifest["clients"]):
        rt = runtime_for(cfg)
        for c in manifest["clients"]:
            cid = c["client_id"]
            labels = load_client(cfg, cid).label_names
            model = build_client_model(rt, strategy, cid, len(labels), strategy.eval_download(state, cid),
                                       load_local_state(cfg, strategy, cid, 10**9))
            write_adapter(folder / f"client_{cid:03d}", cfg, get_state(model, rt.head_module(), ("lora", "head")),
                          f"client {cid}'s model under {strategy.name} (task {c['task']}).", len(labels))
        return
    for prefix, what in shared_loras(state):
        lora = {k[len(prefix):]: v for k, v in state.tensors.items() if k.startswith(prefix + "lora.")}
        write_adapter(folder / (prefix.rstrip(".") or "global"), cfg, lora, what)


def shared_loras(state: ServerState) -> list[tuple[str, str]]:
    """The plain LoRAs in a server state: FedLEASE's experts (expert<e>.lora.*), IFCA's clusters, or one
    global LoRA (lora.*), with what each is."""
    prefixes = sorted({k.split("lora.", 1)[0] for k in state.tensors if ".lora." in k or k.startswith("lora.")})
    return [(p, f"the shared LoRA {p.rstrip('.') or 'of every client'} (no task head: heads stay with the clients).")
            for p in prefixes]


MODEL_README = """# Final {strategy} model (FedLEASE pipeline)

- `server_state.safetensors`: the server's final tensors. For FedLEASE: `expert<e>.lora.<module>.A|B`
  (one LoRA expert per cluster, rank r, scaling alpha/r) and `router<e>.router.<module>` (the router
  of cluster e, shape (2M-1, d_in); (2M, d_in) with `fedlease.router.personal_expert`, whose personal
  LoRAs are in the clients' local states below). For the single-LoRA baselines: `lora.<module>.A|B`.
- `cluster_map.json`: client -> expert, silhouette per k (the B-distance matrix is in the run's
  `allocation/distances.npy`).
- `meta.json`: base model and LoRA settings; `deepspeed_config.json`: the engine config used.
- `clients/client_NNN.safetensors`: each client's local state (its head, and what else the method keeps
  locally); `clients/client_NNN.json`: its task and label names.

Rebuild a client's model and predict without the training code path:

    fedlease predict --model-uri <this folder> --client 3 "some text"
"""
