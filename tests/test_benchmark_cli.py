"""`benchmarks/quality.py` on a task mix and seeds of the caller's choosing (tiny fixtures): the table,
mean +- std over seeds, the label-skew table, and the two last lines a reader greps."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from .conftest import REPO, tiny_params

sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts' modules: quality, robustness_table

pytestmark = pytest.mark.slow


def test_quality_benchmark_takes_params_seeds_and_overrides(tmp_path: Path):
    params = tmp_path / "mix.yaml"
    params.write_text(yaml.safe_dump(tiny_params(tmp_path, strategies=["fedlease", "local", "fedit"])))
    out = tmp_path / "quality.md"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--params", str(params), "--seeds", "0,1",
         "--set", "federation.rounds=1", "--set", "data.partition.min_test_per_client=2", "--label-skew",
         "--runs", str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-4:]
    assert re.fullmatch(r"ari: -?\d+\.\d{3} \(protocol equal_compute, mean over 2 seed\(s\)\)", last[0]), last[0]
    for line, name in zip(last[1:3], ("fedlease_margin", "skew_margin"), strict=True):
        assert re.fullmatch(name + r": -?\d+\.\d{2} \(protocol equal_compute, mean over 2 seed\(s\)\)", line), line
    assert last[3] == "nlg_margin: not run (--nlg runs it, in a run of its own)"  # all four, never a silent gap
    text = out.read_text()
    assert "```\n" + "\n".join(last) + "\n```" in text  # the file carries them too
    # both seeds ran in their own folders under --runs, with the override applied: one round, and fedit
    # one more (the warm-up's epoch, equal compute); the printed margin is the one of those metrics
    margins, aris = {}, []
    for setting in ("task", "label_skew_a0.5"):
        means = []
        for seed in (0, 1):
            metrics = json.loads((tmp_path / "runs" / setting / f"seed{seed}" / "metrics.json").read_text())
            if setting == "task":
                aris.append(metrics["allocation"]["ari_vs_task"])
            assert {n: m["rounds"] for n, m in metrics["methods"].items()} == {"fedlease": 1, "local": 1, "fedit": 2}
            means.append({n: m["mean"] for n, m in metrics["methods"].items()})
        avg = {n: sum(m[n] for m in means) / 2 for n in means[0]}
        margins[setting] = 100 * (avg["fedlease"] - max(avg["local"], avg["fedit"]))
    assert float(last[0].split()[1]) == pytest.approx(sum(aris) / 2, abs=0.0006)  # ari: FedLEASE's, over the seeds
    assert float(last[1].split()[1]) == pytest.approx(margins["task"], abs=0.006)
    assert float(last[2].split()[1]) == pytest.approx(margins["label_skew_a0.5"], abs=0.006)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert {"fedlease", "local", "fedit"} <= set(rows)
    # the task table's compute and traffic columns are the runs' own (mean over the seeds), per method
    task_lines = text.split("## Task heterogeneity")[1].split("\n\n")[1].splitlines()
    head = [c.strip() for c in task_lines[0].strip("|").split("|")]
    for line in task_lines[2:5]:
        cells = dict(zip(head, (c.strip() for c in line.strip("|").split("|")), strict=True))
        per_seed = [json.loads((tmp_path / "runs" / "task" / f"seed{seed}" / "metrics.json").read_text())
                    ["methods"][cells["method"]] for seed in (0, 1)]
        for column, key, scale in (("local steps/client", "local_steps_per_client", 1),
                                   ("MB up/client", "bytes_up_total_per_client", 1e6),
                                   ("MB down/client", "bytes_down_total_per_client", 1e6)):
            assert float(cells[column]) == pytest.approx(sum(m[key] for m in per_seed) / 2 / scale, abs=0.006), column
        assert float(cells["local steps/client"]) > 0 and float(cells["MB up/client"]) >= 0
    assert "±" in rows["fedlease"]  # mean ± std over the two seeds
    assert "## Task + label heterogeneity" in text and "seeds [0, 1]" in text
    assert "majority class (floor)" in rows and "Protocol: equal compute" in text and "code: commit" in text
    assert "label-balanced test sets" in text
    assert re.search(r"Ran on: .+, \d+ cores \(6 method-seed\(s\)\)\.", text), "the machine of every unit"
    # the warm-up's heirs ran as one unit, every other method alone, each recorded with its fingerprint
    unit_dir = tmp_path / "runs" / "task" / "seed0" / "units"
    assert sorted(p.name for p in unit_dir.iterdir()) == ["fedit.json", "fedlease+local.json"]
    # a rerun reads every unit from its record: a record edited by hand shows in the margin, no run redoes it
    record = json.loads((unit_dir / "fedit.json").read_text())
    record["metrics"]["methods"]["fedit"]["mean"] = 0.99
    (unit_dir / "fedit.json").write_text(json.dumps(record))
    again = subprocess.run(proc.args, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("read from its record") == 8 and "running it" not in again.stdout
    avg_fedit = (0.99 + json.loads((tmp_path / "runs" / "task" / "seed1" / "metrics.json").read_text())
                 ["methods"]["fedit"]["mean"]) / 2
    avg_fl = sum(json.loads((tmp_path / "runs" / "task" / f"seed{s}" / "metrics.json").read_text())
                 ["methods"]["fedlease"]["mean"] for s in (0, 1)) / 2
    margin = float(next(line for line in again.stdout.splitlines() if line.startswith("fedlease_margin: ")).split()[1])
    assert margin == pytest.approx(100 * (avg_fl - avg_fedit), abs=0.006)
    # a record of other params (or code) is not reused: that unit alone runs again
    record["fingerprint"] = "0" * 16
    (unit_dir / "fedit.json").write_text(json.dumps(record))
    third = subprocess.run(proc.args, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("read from its record") == 7 and third.stdout.count("running it") == 1
    assert json.loads((unit_dir / "fedit.json").read_text())["metrics"]["methods"]["fedit"]["mean"] != 0.99



def test_a_unit_record_is_not_reused_across_params_faults_or_seeds(tmp_path: Path):
    """The record fingerprint changes with any param that changes results, the injected faults included
    (the rounds' own fingerprint leaves those out), and not with where the run folder is."""
    from quality import record_fingerprint

    from fedlease.config import config_from_dict

    def fp(**over: object) -> str:
        return record_fingerprint(config_from_dict(tiny_params(tmp_path, **over)), "fedlease+local")

    base = fp()
    assert fp(output_dir=str(tmp_path / "elsewhere")) == base
    assert fp(faults__client_failure_rate=0.25) != base
    assert fp(seed=1) != base and fp(training__lr=0.01) != base
    assert record_fingerprint(config_from_dict(tiny_params(tmp_path)), "fedit") != base


def _metrics(folder: Path, seed: int, scores: dict[str, float], ari: float | None, commit: str = "a" * 40,
             protocol: str = "equal_compute", majority: bool = True, balanced: dict[str, float] | None = None,
             spent: dict[str, tuple[float, float, float, float]] | None = None) -> None:
    """A seed's run as quality.py leaves it; `balanced`: scores on label-balanced test sets; `spent`: per method
    (local steps per client, bytes up, bytes down per client, seconds of rounds), else 10 steps, 1 / 2 MB, 5 s."""
    version = {"commit": commit, "sources": "b" * 16, "dirty": False}
    methods = {m: {"mean": s, "majority": {"mean": 0.4} if majority else None, "code_version": version,
                   **dict(zip(("local_steps_per_client", "bytes_up_total_per_client", "bytes_down_total_per_client",
                               "wall_seconds"), (spent or {}).get(m, (10, 1e6, 2e6, 5.0)), strict=True)),
                   **({"balanced": {"mean": balanced[m]}} if balanced else {})}
               for m, s in scores.items()}
    out = folder / f"seed{seed}" / "metrics.json"
    (out.parent / "units").mkdir(parents=True)
    run = {"methods": methods, "protocol": protocol, "code_version": version,
           "allocation": {"num_experts": 4, "capped": seed == 1, "ari_vs_task": ari, "warmup_seconds": 7.0}}
    out.write_text(json.dumps(run))
    from quality import method_units

    for unit in method_units(list(methods)):  # the unit records quality.py merges metrics.json from
        part = {**run, "methods": {m: methods[m] for m in unit}}
        (out.parent / "units" / f"{'+'.join(unit)}.json").write_text(json.dumps({"fingerprint": "f", "metrics": part}))


def _in_process(main: Callable[[], None], argv: list[str], monkeypatch: pytest.MonkeyPatch,
                capsys: pytest.CaptureFixture[str]) -> subprocess.CompletedProcess[str]:
    """A benchmark script's main() run in this process (a subprocess would spend seconds importing torch
    per call), with the exit status, stdout and stderr a subprocess would give: SystemExit("msg") exits 1
    and prints msg on stderr."""
    monkeypatch.setattr(sys, "argv", argv)
    code: int | str | None = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    if isinstance(code, str):
        return subprocess.CompletedProcess(argv, 1, out, err + code + "\n")
    return subprocess.CompletedProcess(argv, code or 0, out, err)


def test_robustness_table_takes_the_margin_over_the_best_other_method_local_included(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    from robustness_table import main

    def table(*settings: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        args = [a for setting in settings for a in ("--setting", setting)]
        return _in_process(main, ["robustness_table.py", *args, *extra], monkeypatch, capsys)

    def rows(stdout: str) -> dict[str, list[str]]:  # the goal table's rows (the first of each label)
        found: dict[str, list[str]] = {}
        for line in stdout.splitlines():
            if line.startswith("| "):
                found.setdefault(line.split(" | ")[0][2:], line.split(" | "))
        return found

    for seed, (fl, ifca, ari) in enumerate([(0.70, 0.66, 1.0), (0.72, 0.70, 0.9)]):  # FedLEASE 71, IFCA 68, local 65
        _metrics(tmp_path / "mix", seed, {"fedlease": fl, "local": 0.65, "fedit": 0.60, "ifca": ifca}, ari)
    _metrics(tmp_path / "skew", 0, {"fedlease": 0.50, "local": 0.555, "fedit": 0.52}, 0.5)  # local leads by 5.5
    _metrics(tmp_path / "nlg", 0, {"fedlease": 0.30, "local": 0.28}, None, majority=False)  # no floor, no tasks
    proc = table(f"mix={tmp_path / 'mix'}", f"skew={tmp_path / 'skew'}", f"nlg={tmp_path / 'nlg'}",
                 extra=("--out", str(tmp_path / "robustness.md")))
    assert proc.returncode == 0, proc.stderr
    got = rows(proc.stdout)
    mix, skew, nlg = got["mix"], got["skew"], got["nlg"]
    assert mix[2:9] == ["40.00", "65.00", "ifca 68.00", "71.00", "71.00", "+3.00", "yes"]
    assert mix[9:12] == ["4, 4 (cap)", "1.00, 0.90", "**no** |"]  # the ARI goal must hold on every seed: 0.90 fails
    assert skew[4:9] == ["fedit 52.00", "50.00", "50.00", "-5.50", "**no**"] and skew[11] == "**no** |"
    assert nlg[2:5] == ["-", "28.00", "-"] and nlg[7:9] == ["+2.00", "yes"] and nlg[10:] == ["-", "- |"]
    assert proc.stdout.splitlines()[-1] == ("robustness_goal: met in 1 of 3 settings (shipped default); "
                                            "smallest margin -5.50")
    assert "robustness_goal_paper_rule" not in proc.stdout  # the same runs: one count
    written = (tmp_path / "robustness.md").read_text()
    assert written in proc.stdout and written.splitlines()[-1] == proc.stdout.splitlines()[-1]  # the goal line too
    # an option's runs without `local` (same warm-up): the paper runs' `local` is the floor it must beat
    for seed in (0, 1):
        _metrics(tmp_path / "prior", seed, {"fedlease": 0.60}, 1.0)
    option = table(f"mix={tmp_path / 'mix'},{tmp_path / 'prior'}", extra=("--column", "own prior b = 2",
                                                                         "--title", "Paper rule and prior"))
    assert option.returncode == 0, option.stderr
    assert option.stdout.splitlines()[:2] == ["# Paper rule and prior", ""]
    assert "FedLEASE, own prior b = 2" in option.stdout.splitlines()[2]
    assert rows(option.stdout)["mix"][3:9] == ["65.00", "ifca 68.00", "71.00", "60.00", "-8.00", "**no**"]
    # an option that reruns `local` with its own warm-up: the margin is over the better `local` of the two (the
    # paper's 55.50 here, not the option's 50.00), and a margin just under the goal is not shown rounded onto it
    _metrics(tmp_path / "balanced", 0, {"fedlease": 0.56496, "local": 0.50}, 0.5)
    option = table(f"skew={tmp_path / 'skew'},{tmp_path / 'balanced'}", extra=("--column", "balanced loss"))
    assert option.returncode == 0, option.stderr
    assert rows(option.stdout)["skew"][3:9] == ["55.50 (with its warm-up: 50.00)", "fedit 52.00", "50.00", "56.50",
                                                "+0.996", "**no**"]
    # the decision rule's counts, on the same settings: the option's, and the paper rule's (over its own `local`)
    option = table(f"skew={tmp_path / 'skew'},{tmp_path / 'balanced'}", f"nlg={tmp_path / 'nlg'}",
                   extra=("--column", "balanced loss", "--verdicts", str(tmp_path / "balanced.json")))
    verdicts = json.loads((tmp_path / "balanced.json").read_text())  # what choose_default.py reads
    assert verdicts["settings"]["skew"]["met"] is False and verdicts["settings"]["skew"]["margin"] == pytest.approx(
        0.996) and verdicts["paper_rule"]["skew"]["margin"] == pytest.approx(-5.5)
    assert verdicts["settings"]["nlg"] == verdicts["paper_rule"]["nlg"] == {"met": True, "margin": pytest.approx(2.0)}
    # the paper rule's verdict: its margin over its own `local` (not the option's better one), its ARI checked too
    _metrics(tmp_path / "strong", 0, {"fedlease": 0.70, "local": 0.60}, 0.5)  # +10 points, clusters not the tasks
    _metrics(tmp_path / "strong_opt", 0, {"fedlease": 0.72, "local": 0.69}, 1.0)  # its warm-up: local 69
    table(f"strong={tmp_path / 'strong'},{tmp_path / 'strong_opt'}", extra=("--verdicts", str(tmp_path / "s.json")))
    strong = json.loads((tmp_path / "s.json").read_text())
    assert strong["paper_rule"]["strong"] == {"met": False, "margin": pytest.approx(10.0)}
    assert strong["settings"]["strong"] == {"met": True, "margin": pytest.approx(3.0)}
    assert option.stdout.splitlines()[-2:] == [
        "robustness_goal_paper_rule: met in 1 of 2 settings (paper rule); smallest margin -5.50",
        "robustness_goal: met in 1 of 2 settings (balanced loss); smallest margin +0.996"]
    # a margin of 1.00 up to float noise (100 * 0.565 - 100 * 0.555 = 0.99999999999998) meets a goal of 1
    _metrics(tmp_path / "one", 0, {"fedlease": 0.565, "local": 0.555}, 1.0)
    assert rows(table(f"one={tmp_path / 'one'}").stdout)["one"][7:9] == ["+1.00", "yes"]
    # a seed's metrics.json that its unit records no longer give (a unit rerun or removed since) is refused
    shutil.copytree(tmp_path / "mix", tmp_path / "stale")
    units = tmp_path / "stale" / "seed1" / "units"
    (units / "fedlease.json").write_text("{}")  # a leftover file of no unit of these methods: not read
    record = json.loads((units / "ifca.json").read_text())
    record["metrics"]["methods"]["ifca"]["mean"] = 0.69
    (units / "ifca.json").write_text(json.dumps(record))
    stale = table(f"stale={tmp_path / 'stale'}")
    assert stale.returncode != 0 and "seed1/metrics.json is not the merge of its unit records" in stale.stderr
    assert "different: ifca)" in stale.stderr
    (units / "ifca.json").unlink()
    (units / "fedlease+local.json").unlink()
    assert "different: fedlease, ifca, local)" in table(f"stale={tmp_path / 'stale'}").stderr
    (units / "fedit.json").write_text("{}")
    assert "fedit.json: not a unit record" in table(f"stale={tmp_path / 'stale'}").stderr
    # refused, each by a clear error: another code version, the paper protocol, different seeds
    _metrics(tmp_path / "other", 0, {"fedlease": 0.5, "local": 0.4}, 1.0, commit="c" * 40)
    _metrics(tmp_path / "paper", 0, {"fedlease": 0.5, "local": 0.4}, 1.0, protocol="paper")
    for settings, message in [((f"mix={tmp_path / 'mix'}", f"o={tmp_path / 'other'}"), "different code versions"),
                              ((f"p={tmp_path / 'paper'}",), "equal-compute protocol"),
                              ((f"mix={tmp_path / 'mix'},{tmp_path / 'skew'}",), "['seed0', 'seed1']")]:
        refused = table(*settings)
        assert refused.returncode != 0 and message in refused.stderr, (settings, refused.stderr)


def test_robustness_table_reads_label_skew_on_balanced_test_sets_and_shows_what_each_method_spent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Beside the goal (on the clients' own test sets): the label-skew settings on label-balanced test sets, the
    margin there over the best other (an option's own `local` included), and per method its local steps per client
    (one number at equal compute), MB up / down per client and seconds with the warm-up it continues from."""
    from robustness_table import main

    scores = {"fedlease": 0.80, "local": 0.79, "fedit": 0.78, "ifca": 0.77}
    for seed, (fl, ifca) in enumerate([(0.40, 0.44), (0.50, 0.48)]):  # balanced: FedLEASE 45, IFCA 46, local 35
        _metrics(tmp_path / "skew", seed, scores, 1.0, balanced={"fedlease": fl, "local": 0.35, "fedit": 0.30,
                                                               "ifca": ifca})
        _metrics(tmp_path / "opt", seed, {"fedlease": 0.81, "local": 0.80}, 1.0,
                 balanced={"fedlease": 0.50, "local": 0.47})  # its own warm-up: local 47 on balanced sets
    _metrics(tmp_path / "mix", 0, scores, 1.0, spent={"fedlease": (12, 1e6, 3e6, 20.0), "local": (12, 0, 0, 4.0),
                                                      "fedit": (12, 2e6, 2e6, 30.0), "ifca": (11, 2e6, 8e6, 40.0)})
    argv = ["robustness_table.py", "--setting", f"skew={tmp_path / 'skew'},{tmp_path / 'opt'}", "--setting",
            f"mix={tmp_path / 'mix'}", "--column", "balanced loss"]
    proc = _in_process(main, argv, monkeypatch, capsys)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    balanced = [line for line in lines if line.startswith("| skew | 2 | ")]
    assert balanced[1] == "| skew | 2 | 47.00 | ifca 46.00 | 45.00 | 50.00 | +3.00 |"  # over the option's local
    spent_at = next(i for i, line in enumerate(lines) if line.startswith("What each method spent"))
    assert not any(line.startswith("| mix |") for line in lines[lines.index(balanced[1]):spent_at]), "no skew there"
    mix = next(line for line in lines if line.startswith("| mix | **differ**"))  # ifca ran a step less
    assert "fedlease 1.00 / 3.00 MB, 27 s" in mix and "local 0.00 / 0.00 MB, 11 s" in mix  # + the 7 s warm-up
    assert "fedit 2.00 / 2.00 MB, 30 s" in mix and "ifca 11" in mix  # no warm-up: rounds alone
    skew = next(line for line in lines if line.startswith("| skew | 10 |"))  # equal compute: one number
    assert "fedlease (column) 1.00 / 2.00 MB, 12 s" in skew and "local (column)" in skew
    from robustness_table import experts_cell  # M per seed names the cap it stopped at, where the run kept it

    assert experts_cell({"num_experts": 5, "capped": True, "cap": "N - 1 = 5 with 6 clients"}) == (
        "5 (cap: N - 1 = 5 with 6 clients)")
    assert experts_cell({"num_experts": 4, "capped": True}) == "4 (cap)" and experts_cell({"num_experts": 3}) == "3"


def test_a_results_file_mixes_no_code_versions(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """quality.py writes the classification tables and the NLG section into one file by two invocations: a
    part made by other code is replaced by a stub saying what to run, never kept beside the new one."""
    from quality import NLG_HEADING, upsert_section, write_doc

    from fedlease.provenance import describe

    old, new = {"commit": "a" * 40, "sources": "s1"}, {"commit": "b" * 40, "sources": "s2"}
    dirty = {**new, "dirty": True}  # writing a results file into the checkout dirties it: still the same version
    out = tmp_path / "quality.md"

    def classification(version: dict[str, str]) -> None:
        write_doc(str(out), ["# Quality benchmark", "", f"task table; code: {describe(version)}.", ""], version)

    def nlg(version: dict[str, str]) -> None:
        text = f"{NLG_HEADING} (full)\n\nnlg table; code: {describe(version)}.\n"
        out.write_text(upsert_section(out, NLG_HEADING, text, version))

    classification(old)
    nlg(old)
    assert out.read_text().count("code: commit aaaaaaaaaaaa, sources s1") == 2  # same version: both kept
    classification(new)  # the old NLG section goes
    text = out.read_text()
    assert "nlg table" not in text and "code: commit bbbbbbbbbbbb, sources s2" in text
    assert f"{NLG_HEADING}\n\nNot run yet at this code version (code: commit bbbbbbbbbbbb, sources s2): " in text
    assert "its NLG section is not of this code version" in capsys.readouterr().err
    assert "run `benchmarks/quality.py` with `--nlg` with `--out` naming this file" in text
    classification(new)  # a stub of this version is kept as it is, without a word
    assert out.read_text() == text and "not of this code version" not in capsys.readouterr().err
    nlg(dirty)  # replaces the stub, keeps the same version's tables
    text = out.read_text()
    assert "Not run yet" not in text and text.count("code: commit bbbbbbbbbbbb, sources s2") == 1
    assert text.count("code: commit bbbbbbbbbbbb-dirty, sources s2") == 1
    classification(new)  # and the other way round: a section stamped -dirty is of the same version
    assert out.read_text().count("nlg table; code: commit bbbbbbbbbbbb-dirty") == 1
    nlg(old)  # an NLG run of other code: the classification part becomes a stub
    text = out.read_text()
    assert "task table" not in text and "code: commit bbbb" not in text and "nlg table; code: commit aaaa" in text
    assert text.startswith("# Quality benchmark\n\nNot run yet at this code version (code: commit aaaaaaaaaaaa")


def test_the_shipped_default_is_chosen_by_the_rule_fixed_before_the_rows(tmp_path: Path):
    """benchmarks/README.md's rule: most settings meeting the goal, ties to the higher smallest margin, and the
    paper rule replaced only by a higher count or, on an equal count, a smallest margin >= 0.5 points higher."""
    from choose_default import PAPER, choose

    def v(met: bool, margin: float) -> dict[str, Any]:
        return {"met": met, "margin": margin}

    paper = {"mix": v(True, 1.2), "skew": v(False, -4.0), "nlg": v(False, -2.0)}

    def block(settings: dict[str, dict[str, Any]], code: str = "c1") -> dict[str, Any]:
        return {"column": "x", "code": code, "settings": settings,
                "paper_rule": {label: paper[label] for label in settings}}

    more = block({"mix": v(True, 1.5), "skew": v(True, 1.1), "nlg": v(False, -1.0)})  # 2 settings against 1
    near = block({"mix": v(True, 1.3), "skew": v(False, -3.6), "nlg": v(False, -1.0)})  # 1, smallest +0.4 higher
    clear = block({"mix": v(True, 1.3), "skew": v(False, -3.4), "nlg": v(False, -1.0)})  # 1, smallest +0.6 higher
    chosen, standings = choose({"near": near, "more": more}, 0.5)
    assert chosen == "more" and standings["more"] == (2, -1.0) and standings[PAPER] == (1, -4.0)
    assert choose({"near": near}, 0.5)[0] == PAPER
    assert choose({"near": near, "clear": clear}, 0.5)[0] == "clear"
    # an option that did not run generation (no labels to balance) gets the paper rule's verdict there
    balanced = block({"mix": v(True, 1.4), "skew": v(True, 1.0)})
    chosen, standings = choose({"balanced": balanced, "near": near}, 0.5)
    assert chosen == "balanced" and standings["balanced"] == (2, -2.0)
    with pytest.raises(SystemExit, match="different code versions"):
        choose({"more": more, "other": block({"mix": v(True, 9.0)}, code="c2")}, 0.5)
    # the 0.5-point bar holds at equality, up to float noise (margins are differences of percentages)
    at_bar = block({"mix": v(True, 1.3), "skew": v(False, -4.0 + 0.5 - 1e-12), "nlg": v(False, -1.0)})
    assert choose({"at_bar": at_bar}, 0.5)[0] == "at_bar"
    odd = block({"mix": v(True, 1.5)})
    odd["paper_rule"]["mix"] = v(True, 1.25)
    with pytest.raises(SystemExit, match="not the same runs"):
        choose({"more": more, "odd": odd}, 0.5)


def test_choose_default_names_the_winner_and_its_overrides_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]):
    """What regenerate.sh reads: the last line `shipped_default: NAME` (NAME = the verdicts file's stem) and the
    overrides from NAME.sets in the written file."""
    from choose_default import main

    paper = {"mix": {"met": False, "margin": -1.0}}
    for name, margin in (("subspace", 2.0), ("own_prior2", -0.5)):
        doc = {"column": name, "code": "c1", "settings": {"mix": {"met": margin >= 1, "margin": margin}},
               "paper_rule": paper}
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    (tmp_path / "subspace.sets").write_text("strategies=[fedlease]\nfedlease.clustering.distance=subspace\n")
    out = tmp_path / "shipped_default.md"
    proc = _in_process(main, ["choose_default.py", str(tmp_path / "subspace.json"), str(tmp_path / "own_prior2.json"),
                              "--sets-dir", str(tmp_path), "--out", str(out)], monkeypatch, capsys)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "shipped_default: subspace" == out.read_text().splitlines()[-1]
    assert "Chosen: subspace (`strategies=[fedlease] fedlease.clustering.distance=subspace`)." in out.read_text()
    assert "| paper rule | 0 of 1 | -1.00 |" in proc.stdout


def test_a_pick_that_falls_below_the_paper_rule_at_full_size_is_not_shipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """The full-size check: the quick-size pick stands only if no full-size setting's margin is more than 0.5
    below the paper rule's (at the bar it stands); else the paper rule is shipped, and the file says why."""
    from choose_default import full_size_falls, main

    def full(margins: dict[str, tuple[float, float]]) -> dict[str, Any]:
        return {"column": "subspace", "code": "c1",
                "settings": {k: {"met": False, "margin": m} for k, (m, _) in margins.items()},
                "paper_rule": {k: {"met": False, "margin": p} for k, (_, p) in margins.items()}}

    assert full_size_falls(full({"task": (-2.64, 1.97), "skew": (0.5, 0.38)}), 0.5) == {"task": (-2.64, 1.97)}
    assert full_size_falls(full({"task": (1.47, 1.97), "skew": (-3.0, -4.0)}), 0.5) == {}  # at the bar: holds
    paper = {"mix": {"met": False, "margin": -1.0}}
    doc = {"column": "subspace", "code": "c1", "settings": {"mix": {"met": True, "margin": 2.0}}, "paper_rule": paper}
    (tmp_path / "subspace.json").write_text(json.dumps(doc))
    (tmp_path / "subspace.sets").write_text("strategies=[fedlease]\nfedlease.clustering.distance=subspace\n")
    (tmp_path / "full").mkdir()
    for margins, shipped in (({"task": (-2.64, 1.97)}, "paper"), ({"task": (1.8, 1.97)}, "subspace")):
        (tmp_path / "full" / "subspace.json").write_text(json.dumps(full(margins)))
        proc = _in_process(main, ["choose_default.py", str(tmp_path / "subspace.json"), "--sets-dir", str(tmp_path),
                                  "--full", str(tmp_path / "full" / "subspace.json")], monkeypatch, capsys)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[-1] == f"shipped_default: {shipped}"
    assert "| task | +1.80 | +1.97 | yes |" in proc.stdout
    (tmp_path / "full" / "other.json").write_text(json.dumps(full({"task": (9.0, 1.0)})))
    proc = _in_process(main, ["choose_default.py", str(tmp_path / "subspace.json"),
                              "--full", str(tmp_path / "full" / "other.json")], monkeypatch, capsys)
    assert proc.returncode != 0 and "the pick is 'subspace'" in proc.stderr


def test_a_benchmark_tracks_to_its_own_store_not_to_a_server_it_finds_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A server found answering on the project's port is what the pipeline tracks to (the one UI), but a
    benchmark runs for hours: one that tracked to a server someone stopped died mid-step. It pins its store
    before the first run: what was asked for, else SQLite beside its run folders."""
    import argparse
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    import quality
    from fedlease.tracking import tracking_uri

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.chdir(REPO)  # the project folder, where the pipeline's rule looks for the stack's server
        monkeypatch.setenv("MLFLOW_PORT", str(server.server_address[1]))
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
        monkeypatch.delenv("FEDLEASE_BIND_HOST", raising=False)
        params = tmp_path / "mix.yaml"
        raw = tiny_params(tmp_path)
        raw["tracking"] = {"enabled": True}
        params.write_text(yaml.safe_dump(raw))
        from fedlease.config import load_config

        found = tracking_uri(load_config(params))
        assert found == f"http://127.0.0.1:{server.server_address[1]}"  # the pipeline's rule finds the server
        monkeypatch.setattr(quality, "RUNS", tmp_path / "runs")
        args = argparse.Namespace(tracking_uri=None, params=str(params), nlg=False, overrides=[])
        assert quality.pinned_tracking_uri(args) == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")  # asked for: kept
        assert quality.pinned_tracking_uri(args) == "http://tracking.example:5000"
        args.overrides = ["tracking.uri=sqlite:///elsewhere.db"]
        assert quality.pinned_tracking_uri(args) == "sqlite:///elsewhere.db"
        args.tracking_uri = "sqlite:///flag.db"
        assert quality.pinned_tracking_uri(args) == "sqlite:///flag.db"
    finally:
        server.shutdown()


def test_head_seed_check_draws_one_head_per_task_inside_its_patch_and_restores_the_shipped_draw(tmp_path: Path):
    """The diagnostic's premise: inside the patch, clients of one task share a head and tasks of one label count
    do not; outside it, every client of a label count starts from the one shipped draw again."""
    import fedlease.client as client_module
    from fedlease.config import config_from_dict
    from fedlease.models.adapters import get_state
    from fedlease.runtime import ClientRuntime
    from fedlease.strategies import warmup_strategy
    from fedlease.strategies.base import Download
    from head_seed_check import heads_seeded_by_task

    cfg = config_from_dict(tiny_params(tmp_path))
    rt, warmup = ClientRuntime(cfg), warmup_strategy(cfg, 4)

    def heads() -> list[torch.Tensor]:
        return [get_state(client_module.build_client_model(rt, warmup, c, 2, Download({}), None), "classifier",
                          ("head",))["head.weight"].clone() for c in range(4)]

    shipped = heads()
    assert all(torch.equal(h, shipped[0]) for h in shipped)  # one draw per label count
    with heads_seeded_by_task(["sentiment", "sentiment", "dialog", "dialog"]):
        patched = heads()
    assert torch.equal(patched[0], patched[1]) and torch.equal(patched[2], patched[3])
    assert not torch.equal(patched[0], patched[2]) and not torch.equal(patched[0], shipped[0])
    assert all(torch.equal(h, shipped[0]) for h in heads())  # restored
