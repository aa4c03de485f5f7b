"""dvc.yaml declares what each stage reads: every params key a stage touches and every fedlease module
it imports, so a `dvc exp run -S key=value` can never skip a stage whose results depend on that key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, tiny_params

pytestmark = pytest.mark.slow

#: read by stages but changing no result they write (where to track, how to dispatch, where outputs go)
NOT_RESULTS = {"tracking", "orchestration", "output_dir", "profile"}

PROBE = r"""
import json, sys
from fedlease.config import Config, load_config
import fedlease.config as config

seen = set()
recording = [False]  # validation reads every section; record what the stage reads after loading
for cls in [c for c in vars(config).values() if isinstance(c, type) and issubclass(c, config._Strict)]:
    original = cls.__getattribute__
    def spy(self, name, _original=original, _cls=cls):
        if recording[0] and name in type(self).model_fields:
            seen.add((_cls.__name__, name))
        return _original(self, name)
    cls.__getattribute__ = spy
load = config.load_config
def loaded(*args, **kwargs):
    cfg = load(*args, **kwargs)
    recording[0] = True
    return cfg
config.load_config = loaded
from fedlease.cli import main
rc = main([sys.argv[1], "--params", sys.argv[2]])
mods = sorted(m.__file__ for n, m in list(sys.modules.items())
              if n.startswith("fedlease") and getattr(m, "__file__", None))
print(json.dumps({"rc": rc, "seen": sorted(seen), "modules": mods}))
"""


def _declared(stage: dict) -> tuple[set[str], list[str]]:
    """The params.yaml keys a stage declares (bare entries) and its code deps."""
    params = set()
    for p in stage.get("params", []):
        params |= set(p.get("params.yaml", [])) if isinstance(p, dict) else {p}
    deps = [d for d in stage.get("deps", []) if str(d).startswith("fedlease")]
    return params, deps


def test_every_stage_declares_the_params_and_modules_it_reads(tmp_path: Path):
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    raw = tiny_params(tmp_path, strategies=["fedlease", "fedit"], federation__rounds=1)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    # which sub-model class is which params section (fedlease.clustering -> ClusteringConfig, ...)
    from fedlease.config import Config

    owner: dict[str, str] = {"Config": ""}

    def walk(model: type, prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                owner[ann.__name__] = f"{prefix}{name}"
                walk(ann, f"{prefix}{name}.")

    walk(Config, "")
    problems = []
    for name in ("data", "warmup", "allocate", "federate", "evaluate"):
        out = subprocess.run([sys.executable, "-c", PROBE, name, str(params)], capture_output=True, text=True,
                             cwd=REPO, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        probe = json.loads(out.stdout.strip().splitlines()[-1])
        assert probe["rc"] == 0
        declared, deps = _declared(stages[name])
        for cls, field in probe["seen"]:
            key = f"{owner[cls]}.{field}" if owner.get(cls) else field
            if cls not in owner:  # a list item's model (a task of data.tasks)
                continue
            parts = key.split(".")
            prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
            if parts[0] in NOT_RESULTS or prefixes & declared:
                continue
            # reading a section object itself (cfg.data) is covered by any declared key under it
            if any(d.startswith(key + ".") for d in declared):
                continue
            problems.append(f"stage {name}: reads params key {key!r}, not declared in dvc.yaml")
        for module in probe["modules"]:
            rel = str(Path(module).resolve().relative_to(REPO))
            if not any(rel == d or rel.startswith(d.rstrip("/") + "/") for d in deps):
                problems.append(f"stage {name}: imports {rel}, not a dep in dvc.yaml")
    assert not problems, "\n".join(sorted(set(problems)))


def test_every_profile_file_declares_the_sections_it_sets():
    """A profile (params_nlg.yaml, params_glue.yaml) selected with `-S profile=...` is what the stages read:
    each stage declares, from each profile file, every section it declares from params.yaml that the
    profile sets, so `dvc exp show` shows the profile's values and a change to them re-runs the stage."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    profiles = sorted(p.name for p in REPO.glob("params_*.yaml"))
    assert {"params_nlg.yaml", "params_glue.yaml"} <= set(profiles)
    problems = []
    for name, stage in stages.items():
        sections = {key.split(".")[0] for key in _declared(stage)[0]} - NOT_RESULTS
        by_file = {f: set(keys) for p in stage.get("params", []) if isinstance(p, dict) for f, keys in p.items()}
        for profile in profiles:
            present = set(yaml.safe_load((REPO / profile).read_text())) - NOT_RESULTS
            missing = sorted((sections & present) - by_file.get(profile, set()))
            extra = sorted(by_file.get(profile, set()) - present)  # DVC fails on a declared key the file lacks
            if missing:
                problems.append(f"stage {name}: {profile} sets {missing}, not declared for that file")
            if extra:
                problems.append(f"stage {name}: declares {extra} from {profile}, which has no such section")
    assert not problems, "\n".join(problems)
