"""Property-based: any invalid params file gives a ConfigError naming a key, never a deep traceback."""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlease.config import Config, ConfigError, config_from_dict

from ..conftest import tiny_params

BASE = tiny_params(Path("/tmp/fedlease-hypothesis"))
LEAVES: list[tuple[str, ...]] = []


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            _leaves(v, (*path, k))
    else:
        LEAVES.append(path)


_leaves(BASE)
JUNK = st.one_of(st.none(), st.integers(-10**6, 0), st.floats(allow_nan=True), st.text(max_size=5),
                 st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(LEAVES), value=JUNK)
def test_any_corrupted_value_is_valid_or_names_its_key(path, value):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    try:
        cfg = config_from_dict(raw)
    except ConfigError as err:
        top = path[0]
        assert top in str(err) or "data.tasks" in str(err) or "<root>" in str(err), str(err)
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=60, deadline=None)
@given(key=st.text(alphabet="abcdefghij_", min_size=1, max_size=8), section=st.sampled_from(
    ["lora", "training", "federation", "fedlease", "data", "model", "tracking", "orchestration"]))
def test_unknown_keys_are_rejected_by_name(key, section):
    raw = yaml.safe_load(yaml.safe_dump(BASE))
    raw.setdefault(section, {})
    if key in raw[section]:
        return
    raw[section][key] = 1
    try:
        config_from_dict(raw)
    except ConfigError as err:
        assert f"{section}.{key}" in str(err)
    else:
        raise AssertionError(f"{section}.{key} was accepted")
