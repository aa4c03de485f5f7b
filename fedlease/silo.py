"""Silo mode, the silo's side: a client's data stays in its organisation.

A silo is configured by its own file (`FEDLEASE_SILO_CONFIG`), which the coordinator never reads: its
name, a work folder, and where each of its clients' data lie. Its Prefect worker runs the calls the
coordinator sends (`flows/silo_flow.py`): prepare a client (read and split its files into the silo's
work folder; only counts and label names go back), train one round, evaluate, export. Downloads,
uploads and results travel through the exchange store; the client's data, its head and every other
piece of local state stay in the silo's work folder.

The coordinator shares what a client needs from the server besides its download (the cluster map, the
client's own warm-up adapter) under `<exchange url>/<run>/shared/`, and each call fetches it first.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedlease.config import ClientFileSpec, Config, ConfigError, _Strict, config_from_dict
from fedlease.exchange import copy_in, exists, join, publish, write_json
from fedlease.io import atomic_write_json
from fedlease.paths import RunPaths

SILO_CONFIG_ENV = "FEDLEASE_SILO_CONFIG"


class SiloError(RuntimeError):
    """A silo's configuration does not match the call it received; the message names the silo."""


class SiloConfig(_Strict):
    """One organisation's side of silo mode (its own file; the coordinator never sees it)."""

    name: str
    workdir: str
    clients: dict[str, ClientFileSpec]
    storage_options: dict[str, Any] = {}  # for `fedlease silo export` (calls take the run's own)


def load_silo_config(path: str | None = None) -> SiloConfig:
    path = path or os.environ.get(SILO_CONFIG_ENV)
    if not path:
        raise SiloError(f"{SILO_CONFIG_ENV} is not set: a silo worker needs its silo config file")
    try:
        return SiloConfig.model_validate(yaml.safe_load(Path(path).read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise SiloError(f"{path}: not a valid silo config ({exc})") from None


def run_location(cfg: Config) -> str:
    """The run's folder in the store (its output folder's name): shared server files, call results."""
    assert cfg.federation.exchange.url is not None
    return join(cfg.federation.exchange.url, Path(cfg.output_dir).name)


def _shared(run_folder: str) -> str:
    return join(run_folder, "shared")


def shared_location(cfg: Config) -> str:
    """Where the coordinator shares server files the clients read."""
    return _shared(run_location(cfg))


def _cluster_map_file(paths: RunPaths) -> tuple[str, Path]:
    return "cluster_map.json", paths.cluster_map


def _warmup_file(paths: RunPaths, client_id: int) -> tuple[str, Path]:
    return f"warmup/client_{client_id:03d}.safetensors", paths.warmup_adapter(client_id)


def _publish(cfg: Config, files: list[tuple[str, Path]]) -> None:
    for name, path in files:
        publish(path, join(shared_location(cfg), name), cfg.federation.exchange)


def publish_warmup(cfg: Config, num_clients: int) -> None:
    """Coordinator, after the warm-up: each client's adapter, for its silo (`local` continues from it)."""
    paths = RunPaths.of(cfg)
    _publish(cfg, [_warmup_file(paths, cid) for cid in range(num_clients)])


def publish_allocation(cfg: Config) -> None:
    """Coordinator, after the allocation: the cluster map (a client's model layout: its experts)."""
    _publish(cfg, [_cluster_map_file(RunPaths.of(cfg))])


def _fetch_shared(cfg: Config, silo_cfg: Config, client_id: int) -> None:
    paths = RunPaths.of(silo_cfg)
    for name, dest in (_cluster_map_file(paths), _warmup_file(paths, client_id)):
        location = join(shared_location(cfg), name)
        if exists(location, cfg.federation.exchange):
            copy_in(location, dest, cfg.federation.exchange, f"shared {name}")


def silo_config_for(cfg: Config, silo: SiloConfig) -> Config:
    """The run's config at the silo: outputs in the silo's work folder, one sub-folder per run and
    results-relevant params (as the coordinator's checkpoints: the same params resume, other params
    never see this run's local state)."""
    from fedlease.server import fingerprint

    run = f"{Path(cfg.output_dir).name}-{fingerprint(cfg, 'silo', ())[:12]}"
    return config_from_dict({**cfg.model_dump(mode="json"), "output_dir": str(Path(silo.workdir) / run)})


def prepare_client(cfg: Config, client_id: int, spec: ClientFileSpec, task: str | None) -> dict[str, Any]:
    """Read and split one client's files into the silo's work folder; return only its counts."""
    from fedlease.data.partition import partition_stats
    from fedlease.data.stage import client_of_files, manifest_entry

    client = client_of_files(cfg, client_id, spec, task)
    atomic_write_json(RunPaths.of(cfg).client_file(client_id), client.to_json())
    return {"manifest": manifest_entry(client), "stats": partition_stats([client])["clients"][0]}


#: the client functions a coordinator dispatches, by the kind of call a silo runs
KINDS = {"client_train": "train", "client_evaluate": "evaluate", "silo_prepare": "prepare"}


@dataclass(frozen=True)
class SiloCall:
    """One client call as the coordinator sends it: to which silo, the parameters of the silo's run (the
    call as JSON), and where its result will be in the store."""

    silo: str
    kind: str
    client_id: int
    parameters: dict[str, Any]

    @property
    def result_path(self) -> str:
        return str(self.parameters["result_path"])


def silo_call_for(fn: Any, call: dict[str, Any]) -> SiloCall:
    """The coordinator's side of dispatching `fn(**call)` to the client's silo."""
    import uuid

    cfg: Config = call["cfg"]
    client_id = int(call["client_id"])
    kind = KINDS[fn.__name__]
    params = {"kind": kind, "result_path": join(run_location(cfg), f"results/{uuid.uuid4().hex}.json"),
              "call": {**{k: v for k, v in call.items() if k != "cfg"}, "cfg": cfg.model_dump(mode="json")}}
    return SiloCall(str(cfg.data.clients[client_id].silo), kind, client_id, params)


def silo_call_result(cfg: Config, sent: SiloCall) -> Any:
    """The call's result, read (checked) from the store: a ClientTrainResult for training."""
    from fedlease.exchange import read_json_from
    from fedlease.records import ClientTrainResult

    result = read_json_from(sent.result_path, cfg.federation.exchange,
                            f"client {sent.client_id} (silo {sent.silo}): {sent.kind} result")
    return ClientTrainResult(**result) if sent.kind == "train" else result


def silo_prepare(cfg: Config, client_id: int) -> dict[str, Any]:
    """The data stage's call for one client in silo mode: it names the work; it runs at the silo."""
    raise SiloError(f"client {client_id}: preparing a silo client runs at its silo (orchestration.task_runner: "
                    "silo dispatches it), never at the coordinator")


def run_silo_call_logged(kind: str, call: dict[str, Any], result_path: str) -> None:
    """`run_silo_call` for the silo's worker: a failure's details (which may name the silo's files or quote
    its data) go to the silo's own log, and the coordinator gets only which call failed and how."""
    import traceback

    silo = load_silo_config()
    try:
        run_silo_call(kind, call, result_path, silo)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, its details kept here
        log = Path(silo.workdir) / "logs" / "calls.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as f:
            f.write(f"--- {kind} client {call.get('client_id')}\n{traceback.format_exc()}\n")
        raise SiloError(f"silo {silo.name}: client {call.get('client_id')}'s {kind} call failed with "
                        f"{type(exc).__name__} (details in the silo's log)") from None


def run_silo_call(kind: str, call: dict[str, Any], result_path: str, silo: SiloConfig | None = None) -> None:
    """Run one call the coordinator sent (prepare, train, evaluate) and put its result in the store."""
    from fedlease.client import client_evaluate, client_train

    silo = silo or load_silo_config()
    try:
        cfg = config_from_dict(call["cfg"])
    except ConfigError as exc:
        raise SiloError(f"silo {silo.name}: the call's config is invalid ({exc})") from None
    client_id = int(call["client_id"])
    entry = cfg.data.clients[client_id]
    if entry.silo != silo.name:
        raise SiloError(f"silo {silo.name}: client {client_id} ({entry.name}) belongs to silo {entry.silo}")
    if entry.name not in silo.clients:
        raise SiloError(f"silo {silo.name}: no client {entry.name!r} in its config (has {sorted(silo.clients)})")
    spec = silo.clients[entry.name]
    local = silo_config_for(cfg, silo)
    args = {k: v for k, v in call.items() if k != "cfg"}
    if kind == "prepare":
        result: Any = prepare_client(local, client_id, spec, entry.task or spec.task)
    elif kind == "train":
        _fetch_shared(cfg, local, client_id)
        result = asdict(client_train(local, **args))
    elif kind == "evaluate":
        _fetch_shared(cfg, local, client_id)
        result = client_evaluate(local, **args)
    else:
        raise SiloError(f"silo {silo.name}: unknown call kind {kind!r}")
    write_json(result_path, result, cfg.federation.exchange)


#: the files of a final-model folder every silo receives (no client's state among them)
FINAL_FILES = ("server_state.safetensors", "meta.json", "params.json", "clients.json", "cluster_map.json",
               "deepspeed_config.json", "README.md")


def publish_final(cfg: Config, method: str, folder: Path) -> None:
    """Coordinator: share a method's final model (experts, routers / shared LoRA) with the silos."""
    for name in FINAL_FILES:
        if (folder / name).exists():
            publish(folder / name, join(shared_location(cfg), f"final/{method}/{name}"), cfg.federation.exchange)


def export_at_silo(silo: SiloConfig, store: str, run: str, method: str) -> Path:
    """Silo: the method's final model with this silo's clients' own state (heads) added, as a folder
    `fedlease predict --model-uri` loads. Nothing of it leaves the silo."""
    from fedlease.config import ExchangeConfig
    from fedlease.data.stage import load_client
    from fedlease.export import settle_unchosen
    from fedlease.io import atomic_dir, load_tensors, read_json, save_tensors
    from fedlease.local_state import load_local_state
    from fedlease.runtime import strategy_for
    from fedlease.strategies.base import ServerState

    exchange = ExchangeConfig(url=store, storage_options=silo.storage_options)
    shared = join(_shared(join(store, run)), f"final/{method}")
    if not exists(join(shared, "meta.json"), exchange):
        raise SiloError(f"silo {silo.name}: no final {method} model of run {run!r} in {store} (has the run finished?)")
    fetched = Path(silo.workdir) / "export-incoming" / run / method
    for name in FINAL_FILES:
        if exists(join(shared, name), exchange):
            copy_in(join(shared, name), fetched / name, exchange, f"silo {silo.name}: final model {name}")
    cfg = config_from_dict(read_json(fetched / "params.json"))
    local = silo_config_for(cfg, silo)
    folder = Path(local.output_dir) / "export" / method
    mine = [cid for cid, entry in enumerate(cfg.data.clients) if entry.silo == silo.name]
    strategy = strategy_for(local, method, cfg.num_clients)
    meta = read_json(fetched / "meta.json")
    state = ServerState(load_tensors(fetched / "server_state.safetensors"), meta["state_meta"])
    # IFCA: a client of this silo never sampled gets the cluster its evaluation chose (here, on its data)
    settled = settle_unchosen(local, strategy, state, mine).meta
    with atomic_dir(folder) as tmp:
        for name in FINAL_FILES:
            if (fetched / name).exists():
                (tmp / name).write_bytes((fetched / name).read_bytes())
        if settled != meta["state_meta"]:
            atomic_write_json(tmp / "meta.json", {**meta, "state_meta": settled})
        (tmp / "clients").mkdir()
        for cid in mine:
            own_state = load_local_state(local, strategy, cid, 10**9)
            if own_state is not None:
                save_tensors(tmp / "clients" / f"client_{cid:03d}.safetensors", own_state)
            client = load_client(local, cid)
            atomic_write_json(tmp / "clients" / f"client_{cid:03d}.json",
                              {"task": client.task, "label_names": client.label_names})
    return folder
