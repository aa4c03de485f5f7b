"""The round loop, owned in one place: sample, send, collect, validate, aggregate, evaluate, checkpoint.

Client work is dispatched through a `ClientMapper` (sequential here; the Prefect
flows pass one that submits one task per client), so the loop is identical in
`make run`, the Prefect deployment and `dvc repro`. After every round an atomic
checkpoint (server tensors + JSON with the round, history and sampling seed) is
written; a re-run resumes after the last finished round, and a finished run is a
no-op that returns its results.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedlease.config import Config, ExchangeConfig
from fedlease.exchange import LOCAL, join, remove_round, round_location, validate_upload, write_download
from fedlease.io import atomic_write_json, load_tensors, read_json, save_tensors
from fedlease.isolation import run_client_call
from fedlease.paths import RunPaths
from fedlease.records import ClientTrainResult, RoundRecord, history_from_json, history_to_json
from fedlease.strategies.base import ServerState, Strategy, Update


class RoundFailed(RuntimeError):
    """Too few clients reported for a round; the last checkpoint is intact."""


class ClientMapper(Protocol):
    def __call__(self, fn: Callable[..., Any], calls: list[dict[str, Any]], label: str
                 ) -> list[Any | BaseException]: ...


def sequential_mapper(fn: Callable[..., Any], calls: list[dict[str, Any]], label: str
                      ) -> list[Any | BaseException]:
    """Run client calls one after another in this process (retries as configured)."""
    from tqdm import tqdm

    out: list[Any | BaseException] = []
    for call in tqdm(calls, desc=label, unit="client", leave=False, disable=not sys.stderr.isatty()):
        cfg: Config = call["cfg"]
        for attempt in range(cfg.orchestration.retries + 1):
            try:
                out.append(run_client_call(fn, call))
                break
            except Exception as exc:  # noqa: BLE001 - a failed client is dropped, not fatal
                if attempt == cfg.orchestration.retries:
                    out.append(exc)
                else:
                    time.sleep(cfg.orchestration.retry_delay_s)
    return out


def fingerprint(cfg: Config, strategy: str, inputs: Sequence[Path], rounds_matter: bool = False) -> str:
    """What a checkpoint was made from: every param that changes results, the code version (sources
    hash and git commit: a run folder made by other code is not reused), plus the input files.

    `federation.rounds` is left out so that a finished run can be extended, unless `rounds_matter` (the
    equal-compute extra rounds come after the nominal ones, and a DP target is spent over all of them:
    such a run cannot be extended, it starts afresh); tracking, orchestration, the exchange store
    and the list of methods do not change a method's results. Defaults are left
    out so the dump is canonical: a new params key with a default does not void old checkpoints.
    """
    import hashlib

    from fedlease.provenance import code_version

    doc = cfg.model_dump(mode="json", exclude_defaults=True,
                         exclude={"tracking": True, "orchestration": True, "strategies": True, "faults": True,
                                  "federation": {"rounds", "exchange"}, "output_dir": True})
    version = code_version()
    schedule = cfg.federation.rounds if rounds_matter else None
    h = hashlib.sha256(json.dumps([doc, strategy, version["sources"], version["commit"], schedule],
                                  sort_keys=True).encode())
    for path in inputs:
        h.update(path.read_bytes() if path.exists() else b"<missing>")
    return h.hexdigest()[:16]


def sample_clients(cfg: Config, round_: int, num_clients: int) -> list[int]:
    """Seeded per round, so a resumed run replays exactly the same choices."""
    k = cfg.sampled_per_round()
    if k >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([cfg.seed, round_, 4242])
    return sorted(rng.choice(num_clients, size=k, replace=False).tolist())


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Checkpoint:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def meta_path(self) -> Path:
        return self.folder / "checkpoint.json"

    def load(self) -> tuple[ServerState, dict[str, Any]] | None:
        if not self.meta_path.exists():
            return None
        meta = read_json(self.meta_path)
        tensors = load_tensors(self.folder / meta["state_file"])
        return ServerState(tensors, meta["state_meta"]), meta

    def save(self, state: ServerState, meta: dict[str, Any]) -> None:
        name = f"state_r{meta['round']:04d}.safetensors"
        save_tensors(self.folder / name, state.tensors)
        atomic_write_json(self.meta_path, {**meta, "state_file": name, "state_meta": state.meta})
        for old in self.folder.glob("state_r*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)


@dataclass(frozen=True)
class Clients:
    """How the round loop reaches the clients: what they run (the pipeline passes `fedlease.client`'s
    functions; the server never imports the client side) and how the calls are dispatched."""

    train: Callable[..., ClientTrainResult]
    evaluate: Callable[..., dict[str, Any]]
    mapper: ClientMapper = sequential_mapper


@dataclass
class RoundsResult:
    history: list[RoundRecord]
    state: ServerState


def run_rounds(cfg: Config, strategy: Strategy, initial: Callable[[], ServerState], clients: Clients,
               inputs: Sequence[Path] = (),
               on_round: Callable[[RoundRecord, list[RoundRecord]], None] | None = None) -> RoundsResult:
    """Run (or resume) the strategy's rounds in its stage folder; `inputs` are the files its results
    depend on (a changed one restarts it)."""
    run_dir = strategy.home(RunPaths.of(cfg))
    ckpt = Checkpoint(run_dir / "checkpoint")
    dp_target = strategy.federated and cfg.privacy.enabled and cfg.privacy.target_epsilon is not None
    fp = fingerprint(cfg, strategy.name, inputs, rounds_matter=strategy.extra_rounds() > 0 or dp_target)
    loaded = ckpt.load()
    if loaded is not None and loaded[1].get("fingerprint") != fp:
        _progress(f"[{strategy.name}] params or inputs changed since the checkpoint: starting afresh")
        shutil.rmtree(run_dir, ignore_errors=True)
        loaded = None
    if loaded is not None:
        state, meta = loaded
        history = history_from_json(meta["history"])
        start = meta["round"] + 1
        if start <= strategy.rounds():
            _progress(f"[{strategy.name}] resuming after round {meta['round']}")
    else:
        state, history, start = initial(), [], 1
    for round_ in range(start, strategy.rounds() + 1):
        t0 = time.perf_counter()
        xdir = round_location(cfg.federation.exchange, run_dir / "rounds" / f"r{round_:04d}",
                              f"{Path(cfg.output_dir).name}-{fp[:16]}",
                              strategy.name, round_)
        state, record = train_round(cfg, strategy, state, round_, xdir, clients)
        if strategy.evaluates() and (round_ % cfg.federation.eval_every == 0 or round_ == strategy.rounds()):
            record.eval = evaluate_clients(cfg, strategy, state, xdir, round_, clients)
        record.seconds = time.perf_counter() - t0
        history.append(record)
        ckpt.save(state, {"round": round_, "history": history_to_json(history), "strategy": strategy.name,
                          "fingerprint": fp})
        remove_round(xdir, cfg.federation.exchange)
        _progress(round_line(strategy.name, record))
        if on_round is not None:
            on_round(record, history)
        if cfg.faults.crash_after_round == round_ and strategy.federated:
            _progress(f"[{strategy.name}] faults.crash_after_round={round_}: killing the run")
            os.kill(os.getpid(), signal.SIGKILL)
    return RoundsResult(history, state)


def train_round(cfg: Config, strategy: Strategy, state: ServerState, round_: int, xdir: str,
                clients: Clients) -> tuple[ServerState, RoundRecord]:
    """Sample, send, train, collect, validate and aggregate one round (its files under the exchange
    location `xdir`); fails (RoundFailed) when too few sampled clients report."""
    n = strategy.num_clients
    sampled = list(range(n)) if strategy.samples_every_client() else sample_clients(cfg, round_, n)
    calls = []
    for cid in sampled:
        down = join(xdir, f"down_{cid:03d}.safetensors")
        write_download(down, strategy.download(state, cid), cfg.federation.exchange)
        calls.append({"cfg": cfg, "strategy_name": strategy.name, "client_id": cid, "round_": round_,
                      "download_path": down, "upload_path": join(xdir, f"up_{cid:03d}.safetensors"),
                      "num_clients": n})
    results = clients.mapper(clients.train, calls, f"{strategy.name}-r{round_}-train")
    updates, reports, dropped = collect_updates(sampled, results, cfg.federation.exchange)
    needed = max(1, int(np.ceil(cfg.federation.min_clients_fraction * len(sampled))))
    if len(updates) < needed:
        raise RoundFailed(f"[{strategy.name}] round {round_}: only {len(updates)} of {len(sampled)} sampled "
                          f"clients reported (need {needed}); dropped: {dropped}")
    state = strategy.aggregate(state, updates)
    reports = [r for r in reports if r.client_id not in dropped]
    record = RoundRecord(
        round=round_, sampled=sampled, dropped={str(k): v for k, v in dropped.items()},
        loss=float(np.mean([r.loss for r in reports])) if reports else float("nan"),
        bytes_up={str(r.client_id): r.bytes_up for r in reports},
        bytes_down={str(r.client_id): r.bytes_down for r in reports},
        steps={str(r.client_id): r.steps for r in reports},
        client_seconds=float(sum(r.seconds for r in reports)),
        setup_seconds=float(sum(r.setup_seconds for r in reports)))
    if strategy.federated and cfg.privacy.enabled:
        from fedlease.privacy import epsilon_after, noise_multiplier

        record.epsilon = epsilon_after(cfg, round_, strategy.rounds())
        record.noise_multiplier = noise_multiplier(cfg, strategy.rounds())
    return state, record


def collect_updates(sampled: list[int], results: list[ClientTrainResult | BaseException],
                    exchange: ExchangeConfig = LOCAL) -> tuple[list[Update], list[ClientTrainResult], dict[int, str]]:
    """The round's valid updates; a client whose call failed, whose upload is missing, late or corrupt,
    has NaN/Inf, or whose shapes differ from the majority of its group is dropped, with the reason."""
    updates, reports, dropped = [], [], {}
    for cid, res in zip(sampled, results, strict=True):
        if isinstance(res, BaseException):
            dropped[cid] = f"{type(res).__name__}: {res}"
            continue
        try:
            tensors = validate_upload(res.upload, exchange, who=f"client {cid}")
        except Exception as exc:  # noqa: BLE001
            dropped[cid] = str(exc)
            continue
        updates.append(Update(cid, tensors, res.num_examples, res.group))
        reports.append(res)
    shape_ref = _shape_reference(updates)
    for u in updates:
        if _signature(u) != shape_ref[u.group]:
            dropped[u.client_id] = "update shapes differ from the other clients'"
    return [u for u in updates if u.client_id not in dropped], reports, dropped


def _signature(update: Update) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in update.tensors.items()}


def _shape_reference(updates: list[Update]) -> dict[int, dict[str, tuple[int, ...]]]:
    """Majority shape signature per group (updates of one expert or cluster must share shapes)."""
    groups: dict[int, list[dict[str, tuple[int, ...]]]] = {}
    for u in updates:
        groups.setdefault(u.group, []).append(_signature(u))
    return {key: max(sigs, key=sigs.count) for key, sigs in groups.items()}


def evaluate_clients(cfg: Config, strategy: Strategy, state: ServerState, xdir: str, round_: int,
                     clients: Clients) -> dict[str, Any]:
    """Every client (sampled this round or not) evaluates the aggregated model on its test split."""
    n = strategy.num_clients
    calls = []
    for cid in range(n):
        down = join(xdir, f"eval_{cid:03d}.safetensors")
        write_download(down, strategy.eval_download(state, cid), cfg.federation.exchange)
        calls.append({"cfg": cfg, "strategy_name": strategy.name, "client_id": cid, "round_": round_,
                      "download_path": down, "num_clients": n})
    results = clients.mapper(clients.evaluate, calls, f"{strategy.name}-r{round_}-eval")
    clients = {}
    for cid, res in zip(range(n), results, strict=True):
        if isinstance(res, BaseException):
            clients[str(cid)] = {"error": f"{type(res).__name__}: {res}"}
            _progress(f"[{strategy.name}] round {round_}: evaluation of client {cid} failed: "
                      f"{clients[str(cid)]['error']}")
        else:
            clients[str(cid)] = res
    return summarise_eval(clients, cfg.data.kind)


def summarise_eval(clients: dict[str, dict[str, Any]], kind: str) -> dict[str, Any]:
    """Client mean (the paper's), mean weighted by test examples, per task; for classification also the
    majority-class floor and, where clients have one, accuracy on their task's label-balanced test set."""
    metric = "accuracy" if kind == "classification" else "rougeL"
    ok = {k: v for k, v in clients.items() if metric in v}
    # clients whose evaluation failed are out of every mean: say how many, so a table can refuse them
    out: dict[str, Any] = {"metric": metric, **_means(ok, metric), "clients": clients,
                           "failed_clients": sorted(set(clients) - set(ok), key=int)}
    if kind == "classification" and ok:
        out["mean_macro_f1"] = float(np.mean([v["macro_f1"] for v in ok.values()]))
        out["majority"] = _means(ok, "majority_accuracy")
        balanced = {k: v for k, v in ok.items() if "balanced_accuracy" in v}
        if balanced:
            out["balanced"] = _means(balanced, "balanced_accuracy", "num_balanced_test")
            if all("balanced_majority_accuracy" in v for v in balanced.values()):
                out["balanced_majority"] = _means(balanced, "balanced_majority_accuracy", "num_balanced_test")
    return out


def _means(clients: dict[str, dict[str, Any]], key: str, count: str = "num_test") -> dict[str, Any]:
    per_task: dict[str, list[float]] = {}
    for v in clients.values():
        per_task.setdefault(v["task"], []).append(v[key])
    weights = [v.get(count, 1) for v in clients.values()]
    values = [v[key] for v in clients.values()]
    return {"mean": float(np.mean(values)) if values else float("nan"),
            "weighted_mean": float(np.average(values, weights=weights)) if values and sum(weights) else float("nan"),
            "per_task": {t: float(np.mean(vals)) for t, vals in sorted(per_task.items())}}


def round_line(name: str, record: RoundRecord) -> str:
    ev = record.eval
    score = f"{ev['metric']} {ev['mean']:.4f}" if ev else "no eval"
    dropped = f" dropped {sorted(record.dropped)}" if record.dropped else ""
    dropped += f" | epsilon {record.epsilon:.2f}" if record.epsilon is not None else ""
    return (f"[{name}] round {record.round}: {score} | loss {record.loss:.4f} | "
            f"{record.seconds:.1f}s | up {record.total_up / 1e6:.2f} MB down {record.total_down / 1e6:.2f} MB{dropped}")
