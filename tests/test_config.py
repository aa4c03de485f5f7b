from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedlease.config import ConfigError, apply_overrides, config_from_dict, load_config

from .conftest import REPO, tiny_params


def test_repo_params_yaml_is_valid():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.num_clients == len(cfg.data.tasks) * cfg.data.partition.clients_per_task
    assert cfg.lora.r > 0 and cfg.fedlease.m_max >= 2


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("lora.r=0", "lora.r"),
        ("fedlease.m_max=1", "fedlease.m_max"),
        ("data.partition.dirichlet_alpha=0", "data.partition.dirichlet_alpha"),
        ("federation.min_clients_fraction=1.5", "federation.min_clients_fraction"),
        ("federation.clients_per_round=0.0", "federation.clients_per_round"),
        ("training.lr=abc", "training.lr"),
        ("lora.typo=3", "lora.typo"),
        ("strategies=[fedlease, nope]", "strategies.1"),
        ("federation.clients_per_round=99", "federation.clients_per_round"),
        ("data.tasks.1.max_examples=10", "data.tasks.1.max_examples"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, override: str, key: str):
    raw = apply_overrides(tiny_params(tmp_path), [override])
    with pytest.raises(ConfigError) as err:
        config_from_dict(raw)
    assert key in str(err.value)


def test_override_types_and_list_index(tmp_path: Path):
    raw = apply_overrides(tiny_params(tmp_path),
                          ["lora.r=8", "data.tasks.0.name=renamed", "fedlease.clustering.fixed_m=2"])
    cfg = config_from_dict(raw)
    assert cfg.lora.r == 8 and cfg.data.tasks[0].name == "renamed" and cfg.fedlease.clustering.fixed_m == 2
    with pytest.raises(ConfigError, match="data.tasks.9"):
        apply_overrides(raw, ["data.tasks.9.name=x"])


def test_cli_config_check_exit_codes(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(tiny_params(tmp_path)))
    ok = subprocess.run([sys.executable, "-m", "fedlease.cli", "config", "check", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "m_max: 3" in ok.stdout
    bad = tmp_path / "bad.yaml"
    raw = tiny_params(tmp_path)
    raw["lora"]["r"] = -1
    bad.write_text(yaml.safe_dump(raw))
    res = subprocess.run([sys.executable, "-m", "fedlease.cli", "config", "check", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert "lora.r" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "fedlease.cli", "config", "check", str(good), "--set", "nope.x=1"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "nope" in res.stderr


def test_missing_and_non_utf8_params(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    p = tmp_path / "latin.yaml"
    p.write_bytes(b"seed: 1\nname: \xe9\xff\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(p)


def test_paper_variant_puts_every_robustness_option_back_to_the_paper(tmp_path: Path):
    from fedlease.config import PAPER_RULE, FedLeaseConfig

    def value_at(obj: object, dotted: str) -> object:
        for part in dotted.split("."):
            obj = getattr(obj, part)
        return obj

    raw = tiny_params(tmp_path)
    raw["fedlease"] = {**raw.get("fedlease", {}), "warmup_balanced_loss": True, "warmup_epochs": 3,
                       "warmup_head_epochs": 1,
                       "clustering": {"silhouette_tolerance": 0.02, "distance": "subspace", "method": "spectral"},
                       "router": {"own_prior": 2.0, "personal_expert": True, "init_std": 0.1}}
    configured = config_from_dict(raw).fedlease
    assert [value_at(configured, d) for d in PAPER_RULE] == [True, 1, 0.02, "subspace", 2.0, True]
    paper = config_from_dict(apply_overrides(raw, ["fedlease.variant=paper"])).fedlease
    assert {d: value_at(paper, d) for d in PAPER_RULE} == PAPER_RULE
    assert paper.clustering.method == "spectral" and paper.router.init_std == 0.1  # not options: as written
    assert {d: value_at(FedLeaseConfig(), d) for d in PAPER_RULE} == PAPER_RULE  # no option is on in the code
    # an assignment re-validates the model (validate_assignment): its sections stay models, the options reset
    assigned = config_from_dict(raw).fedlease
    assigned.variant = "paper"
    assigned.m_max = 4
    assert {d: value_at(assigned, d) for d in PAPER_RULE} == PAPER_RULE and assigned.m_max == 4
    # a section of the wrong type is the field's error, naming the key, not a crash in the variant
    raw["fedlease"] = {"variant": "paper", "router": 5}
    with pytest.raises(ConfigError, match="fedlease.router"):
        config_from_dict(raw)
