"""MLflow tracking: the only module that imports mlflow.

One parent run per pipeline run (its id kept in <output_dir>/tracking.json so every
stage, a DVC stage or a resumed run continues the same run), one nested run per
strategy, per-round metrics with step = round, artifacts and the registered model.
With tracking disabled every call is a no-op.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path
from typing import Any

from fedlease.config import Config, flatten
from fedlease.io import atomic_write_json, read_json
from fedlease.paths import RunPaths
from fedlease.records import RoundRecord


#: params logged on every strategy run too, so the compare view tells two runs of a method apart
#: (every FedLEASE option too: `local` continues from its warm-up, and option runs differ only there)
KEY_PARAM_SECTIONS = ("lora", "federation", "fedlease")
KEY_PARAMS = ("seed", "model.name", "data.kind", "data.partition.scheme", "data.partition.clients_per_task",
              "data.partition.num_clients", "data.partition.dirichlet_alpha", "data.partition.train_per_client",
              "training.lr", "training.batch_size", "training.local_epochs", "training.precision",
              "privacy.enabled", "strategies")


class TrackingError(RuntimeError):
    """The tracking server cannot be reached; the message names the URI."""


def tracking_uri(cfg: Config) -> str:
    """One store for every way of running, by this rule: `tracking.uri`; else $MLFLOW_TRACKING_URI; else,
    in the project (where infra/stack.sh is), the local stack's MLflow server when it answers, and its
    SQLite store (infra/state/mlflow.db, what that server serves) when it does not; else ./mlflow.db.
    So `make run`, `dvc repro` and `fedlease run` all land in the UI users are pointed at."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if Path("infra/stack.sh").exists():
        server = f"http://{os.environ.get('FEDLEASE_BIND_HOST', '127.0.0.1')}:{os.environ.get('MLFLOW_PORT', '5000')}"
        try:
            with urllib.request.urlopen(server + "/health", timeout=1) as resp:
                if resp.status == 200:
                    return server
        except OSError:
            pass
        state = Path(os.environ.get("FEDLEASE_STATE_DIR", "infra/state"))
        state.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{(state / 'mlflow.db').resolve()}"
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def check_reachable(uri: str, timeout_s: float) -> None:
    """Fail fast, before any run starts, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as resp:
            if resp.status != 200:
                raise TrackingError(f"tracking server {uri} answered {resp.status} on /health")
    except OSError as exc:
        raise TrackingError(f"tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)})") from None


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Keep a SQLite store's artifacts beside its database (not in ./mlruns of whatever directory)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).resolve().parent / "mlartifacts" / experiment).as_uri()
    return None


class Tracker:
    """Thin wrapper; every method is safe to call when tracking is disabled."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.enabled = cfg.tracking.enabled
        self.paths = RunPaths.of(cfg)
        self.state_file = self.paths.root / "tracking.json"
        self.client: Any = None
        if self.enabled:
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            uri = tracking_uri(cfg)
            check_reachable(uri, cfg.tracking.connect_timeout_s)
            import mlflow
            from mlflow.tracking import MlflowClient

            mlflow.set_tracking_uri(uri)
            self.mlflow = mlflow
            self.client = MlflowClient(uri)
            self.uri = uri

    # --- run bookkeeping -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return read_json(self.state_file) if self.state_file.exists() else {}

    def parent_run_id(self) -> str | None:
        if not self.enabled:
            return None
        state = self._state()
        run_id = state.get("parent")
        if run_id and state.get("params_hash") == self._params_hash() and self._exists(run_id):
            return run_id
        exp = self.client.get_experiment_by_name(self.cfg.tracking.experiment)
        if exp is not None and exp.artifact_location.startswith("mlflow-artifacts:") and self.uri.startswith("sqlite"):
            raise TrackingError(f"experiment {self.cfg.tracking.experiment!r} in {self.uri} keeps its artifacts "
                                "through the stack's MLflow server, which is not answering: start it (make up) "
                                "or set tracking.uri")
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            self.cfg.tracking.experiment, artifact_location=_artifact_location(self.uri, self.cfg.tracking.experiment))
        run = self.client.create_run(exp_id, run_name=f"pipeline-seed{self.cfg.seed}-{self._params_hash()[:6]}",
                                     tags=self._context_tags({"fedlease.kind": "pipeline",
                                                              "fedlease.output_dir": str(self.paths.root)}))
        params = flatten(self.cfg)
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i : i + 100])
        atomic_write_json(self.state_file, {"parent": run.info.run_id, "strategies": {}, "uri": self.uri,
                                            "params_hash": self._params_hash()})
        return run.info.run_id

    def _params_hash(self) -> str:
        """Other params in the same output_dir (a DVC experiment, an edited params file) get a new
        parent run instead of mixing into the old one; tracking/orchestration/fault settings do not."""
        import hashlib
        import json

        doc = self.cfg.model_dump(mode="json", exclude={"tracking": True, "orchestration": True, "faults": True,
                                                        "strategies": True, "output_dir": True, "profile": True,
                                                        "federation": {"rounds"}})
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def _exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # noqa: BLE001 - a run of another store or a deleted one
            return False

    def strategy_run_id(self, strategy: str) -> str | None:
        if not self.enabled:
            return None
        parent = self.parent_run_id()
        state = self._state()
        run_id = state.get("strategies", {}).get(strategy)
        if run_id and self._exists(run_id):
            return run_id
        parent_run = self.client.get_run(parent)
        experts = ""
        from fedlease.strategies import strategy_class

        if strategy_class(strategy).needs_allocation and self.paths.cluster_map.exists():
            experts = f"-M{read_json(self.paths.cluster_map)['num_experts']}"
        run = self.client.create_run(
            parent_run.info.experiment_id,
            run_name=f"{strategy}{experts}-seed{self.cfg.seed}-{self._params_hash()[:6]}",
            tags=self._context_tags({"mlflow.parentRunId": parent, "fedlease.kind": "strategy",
                                     "fedlease.strategy": strategy}))
        from mlflow.entities import Param

        params = flatten(self.cfg)
        key = [Param(k, v[:6000]) for k, v in params.items()
               if k.split(".")[0] in KEY_PARAM_SECTIONS or k in KEY_PARAMS]
        for i in range(0, len(key), 100):
            self.client.log_batch(run.info.run_id, params=key[i : i + 100])
        state.setdefault("strategies", {})[strategy] = run.info.run_id
        atomic_write_json(self.state_file, state)
        return run.info.run_id

    def _context_tags(self, tags: dict[str, str]) -> dict[str, str]:
        """MLflow's own context tags (user, source), the code version, and the Prefect flow run and DVC
        experiment the run belongs to, when there is one."""
        from mlflow.tracking.context.registry import resolve_tags

        from fedlease.provenance import code_version

        version = code_version()
        extra = {"fedlease.sources": version["sources"], "fedlease.params_hash": self._params_hash()}
        if version["commit"]:
            extra["mlflow.source.git.commit"] = version["commit"]
        if "prefect" in sys.modules:  # started from a Prefect flow: link the flow run
            try:
                from prefect.runtime import flow_run

                if flow_run.id:
                    extra.update({"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)})
                    if flow_run.ui_url:
                        extra["prefect.flow_run_url"] = str(flow_run.ui_url)
            except Exception:  # noqa: BLE001 - no flow run context
                pass
        if os.environ.get("DVC_EXP_NAME"):
            extra["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
        return resolve_tags({**extra, **tags})

    def close_open_runs(self, status: str) -> None:
        """Mark this pipeline's parent and strategy runs that are still RUNNING as `status` (FAILED when a
        stage raised, KILLED when it was interrupted), so the UI never shows a dead run as running."""
        if not self.enabled or not self.state_file.exists():
            return
        state = self._state()
        for run_id in [state.get("parent"), *state.get("strategies", {}).values()]:
            try:
                if run_id and self.client.get_run(run_id).info.status == "RUNNING":
                    self.client.set_terminated(run_id, status)
            except Exception:  # noqa: BLE001 - best effort while an error is already on its way up
                pass

    def log_partition(self, run_id: str | None, manifest: dict[str, Any]) -> None:
        """The partition as an MLflow dataset input of the run (one row per client: task, train/test sizes)."""
        if not self.enabled or run_id is None:
            return
        import pandas as pd
        from mlflow.data.pandas_dataset import from_pandas
        from mlflow.entities import DatasetInput, InputTag

        frame = pd.DataFrame(manifest["clients"])
        dataset = from_pandas(frame, source=str(self.paths.manifest),
                              name=f"{manifest['scheme']}-partition-{len(frame)}-clients")
        self.client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                     [InputTag("mlflow.data.context", "partition")])])

    def log_table(self, run_id: str | None, rows: dict[str, list[Any]], artifact_file: str) -> None:
        if self.enabled and run_id is not None:
            self.client.log_table(run_id, data=rows, artifact_file=artifact_file)

    # --- logging ----------------------------------------------------------------------------------

    def log_metrics(self, run_id: str | None, metrics: dict[str, float], step: int = 0) -> None:
        if not self.enabled or run_id is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # drop NaN
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_round(self, strategy: str, record: RoundRecord, cumulative: dict[str, float]) -> None:
        """Per-round metrics of one strategy, step = round."""
        if not self.enabled:
            return
        metrics = round_metrics(record, cumulative)
        run_id = self.strategy_run_id(strategy)
        self.log_metrics(run_id, metrics, step=record.round)
        if record.dropped:
            self.client.log_dict(run_id, record.dropped, f"dropped_clients/round_{record.round:04d}.json")

    def log_artifacts(self, run_id: str | None, folder: Path, artifact_path: str) -> None:
        if self.enabled and run_id is not None and folder.exists():
            if folder.is_dir():
                self.client.log_artifacts(run_id, str(folder), artifact_path)
            else:
                self.client.log_artifact(run_id, str(folder), artifact_path)

    def set_terminated(self, run_id: str | None, status: str = "FINISHED") -> None:
        if self.enabled and run_id is not None:
            self.client.set_terminated(run_id, status)


def round_metrics(record: RoundRecord, cumulative: dict[str, float]) -> dict[str, float]:
    """Flatten one round record into MLflow metric names (cumulative bytes updated in place)."""
    out: dict[str, float] = {"train_loss": record.loss, "round_seconds": record.seconds,
                             "clients_dropped": float(len(record.dropped)),
                             "clients_reported": float(len(record.bytes_up))}
    if record.epsilon is not None and record.noise_multiplier is not None:
        out["dp_epsilon"] = record.epsilon
        out["dp_noise_multiplier"] = record.noise_multiplier
    up, down = record.total_up, record.total_down
    cumulative["up"] = cumulative.get("up", 0.0) + up
    cumulative["down"] = cumulative.get("down", 0.0) + down
    out.update({"bytes_up_total": up, "bytes_down_total": down, "bytes_up_cumulative": cumulative["up"],
                "bytes_down_cumulative": cumulative["down"]})
    for cid, b in record.bytes_up.items():  # grouped with '/', one chart section per kind
        out[f"client_bytes_up/{cid}"] = b
        out[f"client_bytes_down/{cid}"] = record.bytes_down[cid]
    ev = record.eval
    if ev:
        metric = ev["metric"]
        out[f"mean_{metric}"] = ev["mean"]
        if ev.get("weighted_mean") is not None:
            out[f"weighted_mean_{metric}"] = ev["weighted_mean"]
        if "mean_macro_f1" in ev:
            out["mean_macro_f1"] = ev["mean_macro_f1"]
        for task, v in ev["per_task"].items():
            out[f"task_{metric}/{task}"] = v
        if ev.get("majority"):  # the majority-class floor, beside the scores (the MLflow-read table shows it)
            out["majority_mean_accuracy"] = ev["majority"]["mean"]
            for task, v in ev["majority"]["per_task"].items():
                out[f"task_majority_accuracy/{task}"] = v
        for cid, c in ev["clients"].items():
            for key in ("accuracy", "macro_f1", "rougeL"):
                if key in c:
                    out[f"client_{key}/{cid}"] = c[key]
    return out


def run_ui_path(cfg: Config, run_id: str) -> str:
    """The MLflow UI's path to a run (its experiment and run ids)."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri(cfg)).get_run(run_id)
    return f"/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def register_model(tracker: Tracker, run_id: str | None, folder: Path, kind: str) -> str | None:
    """Log the final-model `folder` as an MLflow pyfunc model (signature, input example) on the run,
    register it under tracking.registered_model and point the alias at the new version."""
    if not tracker.enabled or run_id is None:
        return None
    import pandas as pd
    from mlflow.models import infer_signature

    name, alias = tracker.cfg.tracking.registered_model, tracker.cfg.tracking.alias
    if kind == "classification":
        example = pd.DataFrame({"client": [0, 1], "text": ["an utterly charming film", "wake me up at 7"],
                                "text_pair": ["", ""]})
    else:
        example = pd.DataFrame({"client": [0, 1], "prompt": ["Turn the fact into a question: cats purr.",
                                                              "Answer: what is 2 plus 2?"]})
    signature = infer_signature(example, ["answer", "answer"])
    if kind == "classification":  # text_pair only for pair tasks: optional
        from mlflow.types.schema import ColSpec, Schema

        signature.inputs = Schema([ColSpec("long", "client"), ColSpec("string", "text"),
                                   ColSpec("string", "text_pair", required=False)])
    code = Path(__file__).resolve().parent
    lock = code.parent / "requirements.lock"
    requirements = [line.strip() for line in lock.read_text().splitlines()
                    if line.strip() and not line.startswith(("#", "-"))] if lock.exists() else []
    with tracker.mlflow.start_run(run_id=run_id, nested=True):
        info = tracker.mlflow.pyfunc.log_model(
            name="model", python_model=str(code / "mlflow_model.py"), artifacts={"model_dir": str(folder)},
            code_paths=[str(code)], signature=signature, input_example=example,
            pip_requirements=["torch==2.13.0", *requirements])
    client = tracker.client
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet
        client.create_registered_model(name, description="FedLEASE: experts, routers and client heads (pyfunc)")
    version = tracker.mlflow.register_model(info.model_uri, name)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def fetch_model(uri: str, dest: Path, tracking: str | None = None) -> Path:
    """A local final-model folder for `models:/name@alias`, `models:/name/version`, `runs:/...` or a plain
    path (a pyfunc model's folder is found inside it)."""
    if not uri.startswith(("models:/", "runs:/")):
        return Path(uri)
    import mlflow

    if tracking:
        mlflow.set_tracking_uri(tracking)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    if (local / "MLmodel").exists():  # a pyfunc model: the final-model folder is its `model_dir` artifact
        import yaml

        flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
        return local / flavor["artifacts"]["model_dir"]["path"]
    return local


def report_from_mlflow(cfg: Config, run_id: str | None = None) -> str:
    """Markdown table (method x task score, average, steps, MB, time, the majority-class floor) from a parent
    run's children, under the protocol and the code version they ran with."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(cfg)
    check_reachable(uri, cfg.tracking.connect_timeout_s)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is None:
        raise TrackingError(f"no experiment {cfg.tracking.experiment!r} at {uri}")
    if run_id is None:
        parents = client.search_runs([exp.experiment_id], "tags.`fedlease.kind` = 'pipeline'",
                                     order_by=["attributes.start_time DESC"], max_results=1)
        if not parents:
            raise TrackingError(f"no pipeline run in experiment {cfg.tracking.experiment!r} at {uri}")
        run_id = parents[0].info.run_id
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{run_id}'")
    from fedlease.strategies import strategy_class

    parent = client.get_run(run_id).data
    warmup_seconds = parent.metrics.get("warmup.seconds")  # none in a run logged before it was kept
    methods = {}
    for child in sorted(children, key=lambda r: r.data.tags.get("fedlease.strategy", r.info.run_name or "")):
        m = child.data.metrics
        metric = "accuracy" if "mean_accuracy" in m else "rougeL"
        tasks = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"task_{metric}/")}
        reported = client.get_metric_history(child.info.run_id, "clients_reported")

        def per_client_round(key: str, run: str = child.info.run_id) -> float:
            totals = client.get_metric_history(run, key)
            values = [t.value / max(1.0, r.value) for t, r in zip(totals, reported, strict=False)]
            return sum(values) / max(1, len(values))

        name = child.data.tags.get("fedlease.strategy", child.info.run_name)
        majority = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("task_majority_accuracy/")}
        try:
            heir = strategy_class(name).inherits_warmup
        except ValueError:  # a run of a strategy this code no longer has
            heir = None
        methods[name] = {
            "metric": metric, "mean": m.get(f"mean_{metric}", float("nan")), "per_task": tasks,
            "majority": {"mean": m["majority_mean_accuracy"], "per_task": majority}
            if "majority_mean_accuracy" in m else None,
            "bytes_up_per_client_round": per_client_round("bytes_up_total"),
            "bytes_down_per_client_round": per_client_round("bytes_down_total"),
            "trainable_params": int(m.get("trainable_params", 0)), "wall_seconds": m.get("wall_seconds", float("nan")),
            "rounds": int(m.get("rounds", len(reported))), "weighted_mean": m.get(f"final_weighted_mean_{metric}"),
            **{key: m.get(key, float("nan")) for key in ("local_steps_per_client", "bytes_up_total_per_client",
                                                         "bytes_down_total_per_client")},
            **({"warmup_seconds": warmup_seconds if heir else 0.0}
               if heir is False or (heir and warmup_seconds is not None) else {})}
    if not methods:
        raise TrackingError(f"run {run_id}: no strategy runs under it at {uri}")
    from fedlease.report import method_table

    protocol = parent.params.get("federation.protocol", "not logged")
    code = (f"commit {parent.tags.get('mlflow.source.git.commit', 'unknown')[:12]}, "
            f"sources {parent.tags.get('fedlease.sources', 'unknown')}")
    return (f"Run {run_id} ({uri}); protocol: {protocol}; code: {code}\n\n"
            + method_table([{"methods": methods}]))
