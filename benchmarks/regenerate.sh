#!/usr/bin/env bash
# Every published quality table from one code version: results/quality.md (task heterogeneity and label
# skew over 3 seeds, the ablations, NLG), results/quality_quick.md, results/robustness.md (issue 20's
# settings), results/robustness_options.md (its options' ablation rows) and results/shipped_default.md (the
# option the pre-registered rule picks, whose full-size rows then join robustness.md; it is shipped only if it
# also holds at full size, choose_default.py --full). Runs the benchmark of COMMIT
# from a git worktree of it, so later commits on the branch do not enter the numbers. Every unit of
# methods (minutes) leaves a small record under benchmarks/results/records/COMMIT; commit them as they
# come: the same command on a fresh clone reads them and runs only what is missing (run folders, which
# resume round by round, do not survive a machine). About 19-20 hours on a 2-core CPU: benchmarks/README.md.
#
#   benchmarks/regenerate.sh COMMIT ["a note on the run's conditions" ...]
#
# Environment: PYTHON (default .venv/bin/python), REGEN_WORKTREE (default benchmarks/runs/worktree-COMMIT).
# Everything runs from `main "$@"; exit` on the last line: bash has parsed every function and that whole line
# before the first step and never reads the file again, so the script can be edited while a regeneration runs
# (bash reads a script as it goes: with `exit` on a line of its own, an edit would shift what it reads next).
set -euo pipefail

shipped_default_in() {  # the name choose_default.py's last line gives (an option's, or paper)
    tail -n 1 "$1" | sed 's/^shipped_default: //'
}

step() {  # quality.py of the worktree; `sub` (optional) places the records under a sub-folder
    echo "=== quality.py $* ($(date -u +%FT%TZ))"
    "$py" "$quality" "$@" --records "$records${sub:-}"
}

option() {  # NAME "COLUMN LABEL" METHODS NLG(yes|no) KEY=VALUE...: an option's runs on the quick settings
    local name=$1 label=$2 methods=$3 nlg=$4
    shift 4
    local sets=(--set "strategies=[$methods]")
    for kv in "$@"; do sets+=(--set "$kv"); done
    local o="$runs/opt-$name" r="$records/opt-$name"
    sub=/opt-$name step --quick --seeds 0,1,2 --label-skew --skew-alpha 0.1 --skew-min-test 4 "${sets[@]}" \
        --runs "$o" --out "$o/robust.md"
    sub=/opt-$name/mix3 step --quick --seeds 0,1,2 --params "$tree/benchmarks/params_mix3.yaml" "${sets[@]}" \
        --runs "$o/mix3" --out "$o/robust-mix3.md"
    sub=/opt-$name/mix5 step --quick --seeds 0,1,2 --params "$tree/benchmarks/params_mix5.yaml" "${sets[@]}" \
        --runs "$o/mix5" --out "$o/robust-mix5.md"
    sub=/opt-$name/binary4 step --quick --seeds 0,1,2 --params "$binary4" "${sets[@]}" \
        --runs "$o/binary4" --out "$o/robust-binary4.md"
    local nlg_setting=()
    if [ "$nlg" = yes ]; then
        sub=/opt-$name step --quick --nlg --seeds 0,1,2 "${sets[@]}" --runs "$o" --out "$o/robust-nlg.md"
        nlg_setting=(--setting "NLG, SmolLM2 (quick)=$records/nlg-quick,$r/nlg-quick")
    fi
    mkdir -p "$runs/verdicts"  # what choose_default.py reads: each option's verdicts, its overrides, NLG or not
    printf '%s\n' "strategies=[$methods]" "$@" > "$runs/verdicts/$name.sets"
    echo "$nlg" > "$runs/verdicts/$name.nlg"
    { echo "## $label (\`$*\`), quick size, 3 seeds"; echo
      "$py" "$table" --column "$label" --verdicts "$runs/verdicts/$name.json" \
          --setting "task mix, 4 tasks (quick)=$records/quick,$r/quick" \
          --setting "task + label skew, alpha 0.1 (quick)=$records/quick-label_skew_a0.1,$r/quick-label_skew_a0.1" \
          --setting "3-task mix: emotion, intent, dialog (quick)=$records/mix3/quick,$r/mix3/quick" \
          --setting "5-task mix (quick)=$records/mix5/quick,$r/mix5/quick" \
          --setting "4 binary tasks (quick)=$records/binary4/quick,$r/binary4/quick" ${nlg_setting[@]+"${nlg_setting[@]}"}
      echo; } >> "$runs/robustness_options.md.part"
}

main() {
    if [ $# -lt 1 ]; then
        echo "usage: benchmarks/regenerate.sh COMMIT [NOTE ...]" >&2
        exit 2
    fi
    root=$(git rev-parse --show-toplevel)
    cd "$root"
    commit=$(git rev-parse --short "$1^{commit}")
    shift
    tree=${REGEN_WORKTREE:-$root/benchmarks/runs/worktree-$commit}
    if [ ! -d "$tree" ]; then
        git worktree prune  # a worktree folder removed by hand stays registered until pruned
        git worktree add --detach "$tree" "$commit"
    fi
    if [ "$(git -C "$tree" rev-parse --short HEAD)" != "$commit" ]; then
        echo "error: $tree is not a worktree of $commit" >&2
        exit 2
    fi
    py=${PYTHON:-$root/.venv/bin/python}
    quality="$tree/benchmarks/quality.py"
    # the tables of issue 20 are assembled by this checkout's script: it only reads the records (which name
    # the code version that made them), and later fixes to the assembly apply to COMMIT's runs too
    table="$root/benchmarks/robustness_table.py"
    # the 4-binary-task mix, from COMMIT's tree as the other settings' params (a commit before it has none)
    binary4="$tree/benchmarks/params_binary4.yaml"
    runs="$root/benchmarks/runs/regen-$commit"
    out="$root/benchmarks/results"
    records="$out/records/$commit"
    local notes=()
    for note in "$@"; do notes+=(--note "$note"); done

    # The order: every quick setting, then the full-size tables of quality.md (the task table's 3 seeds, issue
    # 19's headline; the label skew, ablations and NLG), then issue 20's options' rows, the choice of the shipped
    # default and its full-size rows. Every step reads the records the steps before it left, so the last
    # documents are assembled from all of them.
    step --quick --label-skew --ablations --runs "$runs" --out "$out/quality_quick.md" ${notes[@]+"${notes[@]}"}
    step --quick --nlg --seeds 0,1,2 --runs "$runs" --out "$out/quality_quick.md"
    # issue 20's other settings at quick size, 3 seeds (the default mix and alpha 0.5 at full size come below)
    step --quick --seeds 0,1,2 --label-skew --skew-alpha 0.1 --skew-min-test 4 --runs "$runs" --out "$runs/robust-skew01.md"
    sub=/mix3 step --quick --seeds 0,1,2 --params "$tree/benchmarks/params_mix3.yaml" --runs "$runs/mix3" \
        --out "$runs/robust-mix3.md"
    sub=/mix5 step --quick --seeds 0,1,2 --params "$tree/benchmarks/params_mix5.yaml" --runs "$runs/mix5" \
        --out "$runs/robust-mix5.md"

    # issue 19's full tables (quality.md) before issue 20's options: they need no option, and finished first they
    # make issue 19's comparison complete hours before issue 20's (whose last rows need the option chosen below)
    step --seeds 0,1,2 --runs "$runs" --out "$runs/task.md"  # issue 19's headline table, before the label skew
    step --seeds 0,1,2 --label-skew --ablations --runs "$runs" --out "$out/quality.md" ${notes[@]+"${notes[@]}"}
    step --nlg --seeds 0 --runs "$runs" --out "$out/quality.md"
    # issue 20's sixth quick setting: four binary tasks, where no label count tells the tasks apart
    # (benchmarks/README.md)
    sub=/binary4 step --quick --seeds 0,1,2 --params "$binary4" --runs "$runs/binary4" \
        --out "$runs/robust-binary4.md"

    # issue 20's options, each an ablation row per quick setting beside the paper rule's runs above; an option
    # that changes the warm-up reruns `local` with it (the floor it must beat), the others run FedLEASE alone
    rm -rf "$runs/robustness_options.md.part" "$runs/verdicts"  # no verdict of an option no longer listed
    option personal "personal expert" fedlease yes fedlease.router.personal_expert=true
    option own_prior2 "own prior b = 2" fedlease yes fedlease.router.own_prior=2
    option tolerance0.005 "silhouette tolerance 0.005" fedlease yes fedlease.clustering.silhouette_tolerance=0.005
    option balanced "class-balanced warm-up loss" fedlease,local no fedlease.warmup_balanced_loss=true
    option subspace "subspace distance" fedlease yes fedlease.clustering.distance=subspace
    option subspace_personal "subspace distance + personal expert" fedlease yes \
        fedlease.clustering.distance=subspace fedlease.router.personal_expert=true
    option inputs "input-signature distance" fedlease yes fedlease.clustering.distance=inputs
    # classification only (its head-only epochs fit a classifier head): NLG counts as the paper rule's result
    option head_epoch "head-only first warm-up epoch" fedlease,local no fedlease.warmup_head_epochs=1
    { echo "# FedLEASE's robustness options, one ablation row per setting (quick size; commit $commit)"; echo
      cat "$runs/robustness_options.md.part"; } > "$out/robustness_options.md.tmp"
    mv "$out/robustness_options.md.tmp" "$out/robustness_options.md"
    # the rule fixed before these rows were read (benchmarks/README.md) picks the shipped default
    "$py" "$root/benchmarks/choose_default.py" "$runs"/verdicts/*.json --sets-dir "$runs/verdicts" \
        --out "$out/shipped_default.md"
    local chosen label column="shipped default" heading="FedLEASE's robustness (issue 20; commit $commit)"
    local title="$heading: the paper rule, which is the shipped default"
    chosen=$(shipped_default_in "$out/shipped_default.md")

    # an option chosen as the shipped default gets its full-size rows (FedLEASE, and `local` when it changes the
    # warm-up) beside the paper rule's; its quick rows are the option's above. Paper chosen: one set of runs.
    local c_full="" c_skew="" c_quick="" c_skew01="" c_mix3="" c_mix5="" c_binary4="" c_nlg=""
    if [ "$chosen" != paper ]; then
        local kvs=() sets=() o="$runs/shipped-$chosen" s="$records/shipped-$chosen" r="$records/opt-$chosen"
        mapfile -t kvs < "$runs/verdicts/$chosen.sets"
        for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done
        sub=/shipped-$chosen step --seeds 0,1,2 --label-skew "${sets[@]}" --runs "$o" --out "$o/full.md"
        c_full=",$s/task" c_skew=",$s/label_skew_a0.5" c_quick=",$r/quick" c_skew01=",$r/quick-label_skew_a0.1"
        c_mix3=",$r/mix3/quick" c_mix5=",$r/mix5/quick" c_binary4=",$r/binary4/quick"
        if [ "$(cat "$runs/verdicts/$chosen.nlg")" = yes ]; then
            sub=/shipped-$chosen step --nlg --seeds 0 "${sets[@]}" --runs "$o" --out "$o/full-nlg.md"
            c_nlg=",$s/nlg"
        fi
        # the pick must also hold at full size (choose_default.py --full): its full-size margins against the
        # paper rule's; one that falls below them is not shipped, and its column says so
        local full=(--setting "task mix, 4 tasks (full)=$records/task$c_full"
                    --setting "task + label skew, alpha 0.5 (full)=$records/label_skew_a0.5$c_skew")
        [ -z "$c_nlg" ] || full+=(--setting "NLG (full, 1 seed)=$records/nlg$c_nlg")
        label=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["column"])' "$runs/verdicts/$chosen.json")
        mkdir -p "$runs/verdicts-full"
        "$py" "$table" "${full[@]}" --column "$label" --verdicts "$runs/verdicts-full/$chosen.json" > /dev/null
        "$py" "$root/benchmarks/choose_default.py" "$runs"/verdicts/*.json --sets-dir "$runs/verdicts" \
            --full "$runs/verdicts-full/$chosen.json" --out "$out/shipped_default.md"
        if [ "$(shipped_default_in "$out/shipped_default.md")" = paper ]; then
            column="$label (not shipped)"
            title="$title, beside $label, the quick-size pick that does not hold at full size \
(results/shipped_default.md)"
        else
            title="$heading: the paper rule beside the shipped default, $label"
        fi
    fi
    "$py" "$table" --out "$out/robustness.md" --column "$column" --title "$title" \
        --setting "task mix, 4 tasks (the default; full: 16 clients, 3 rounds)=$records/task$c_full" \
        --setting "task + label skew, alpha 0.5 (full)=$records/label_skew_a0.5$c_skew" \
        --setting "task mix, 4 tasks (quick: 8 clients, 2 rounds)=$records/quick$c_quick" \
        --setting "task + label skew, alpha 0.1 (quick)=$records/quick-label_skew_a0.1$c_skew01" \
        --setting "3-task mix not tuned on: emotion, intent, dialog (quick)=$records/mix3/quick$c_mix3" \
        --setting "5-task mix: the default four + dialog (quick)=$records/mix5/quick$c_mix5" \
        --setting "4 binary tasks, as the paper's GLUE four (quick)=$records/binary4/quick$c_binary4" \
        --setting "NLG, SmolLM2, 4 task groups (full, 1 seed)=$records/nlg$c_nlg"
    echo "=== done ($(date -u +%FT%TZ)); results in $out"
}

main "$@"; exit
