#!/usr/bin/env bash
# One mini table of docs/results/, end to end: its whole grid (5 seeds), then its report
# (report.md, report.json, seeds.csv, figures/) and run_info.txt (the command, machine,
# versions, date, wall time, git commit, the sha256 of the setting: the experiment file and
# its rows' files in conf/arm/). When the setting changed since the report in --out was
# made, that report is kept: moved to --out/history/<date>-<first 8 hex of its sha256>/ first.
#
#   bash scripts/mini_table.sh TABLE [--dry-run] [--runs DIR] [--out DIR] [OVERRIDE ...]
#
# TABLE: gyro | multisample | stochastic_depth | early_dropout | dropout_variants: the
# sweep of conf/experiment/mini_TABLE.yaml (its grid is the file's hydra.sweeper.params),
# run in outputs/mini/TABLE/ (--runs), reported in docs/results/TABLE/ (--out). OVERRIDEs
# (Hydra's, e.g. trainer=smoke for a quick check) go to every job; SEEDS=0,1,2,3,4 (default,
# the tables' five seeds)
# sets the seeds. Running it again skips the finished jobs (run folders are keyed by
# config), resumes unfinished ones and rewrites the report. --dry-run prints the sweep's
# command and runs nothing.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
SEEDS=${SEEDS:-0,1,2,3,4}
TABLES="gyro multisample stochastic_depth early_dropout dropout_variants"

usage() {
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[ $# -ge 1 ] || usage
table=$1
shift
case " $TABLES " in
    *" $table "*) ;;
    *) [ "$table" = -h ] || [ "$table" = --help ] && usage
       echo "mini_table.sh: unknown table '$table'; valid: ${TABLES// /, }" >&2
       exit 2 ;;
esac

dry_run=false
runs=outputs/mini/$table
out=docs/results/$table
overrides=()
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) dry_run=true ;;
        --runs) runs=$2; shift ;;
        --out) out=$2; shift ;;
        *) overrides+=("$1") ;;
    esac
    shift
done

command=("$PYTHON" train.py -m "experiment=mini_$table" "seed=$SEEDS" "hydra.sweep.dir=$runs"
         ${overrides[@]+"${overrides[@]}"})
if $dry_run; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi

experiment_file=conf/experiment/mini_$table.yaml
# The setting is the experiment file and the files of its rows (conf/arm/, swept as `arm:`):
# a row changed in place is another setting too.
setting_files=("$experiment_file")
for row in $(sed -n 's/^ *arm: *//p' "$experiment_file" | head -n 1 | tr ',' ' '); do
    setting_files+=("conf/arm/$row.yaml")
done
experiment_hash=$(cat "${setting_files[@]}" | sha256sum | cut -d' ' -f1)

# Every run disclosed: a report of another setting of this table goes to history/, whole.
if [ -f "$out/report.md" ]; then
    previous=$(sed -n 's/^\(setting\|experiment file\) sha256[^:]*: //p' "$out/run_info.txt" 2>/dev/null || true)
    if [ "$previous" != "$experiment_hash" ]; then
        made=$(sed -n 's/^date: \([0-9-]*\).*/\1/p' "$out/run_info.txt" 2>/dev/null || true)
        keep="$out/history/${made:-$(date -u +%Y-%m-%d)}-${previous:0:8}"
        [ -n "$previous" ] || keep="$out/history/${made:-$(date -u +%Y-%m-%d)}-unknown"
        mkdir -p "$keep"
        for item in report.md report.json seeds.csv figures run_info.txt; do
            if [ -e "$out/$item" ]; then
                if [ -e "$keep/$item" ]; then
                    rm -r "${out:?}/$item"  # kept there already (the same setting)
                else
                    mv "$out/$item" "$keep/$item"
                fi
            fi
        done
        echo "mini_table.sh: the report of the earlier setting is kept in $keep" >&2
    fi
fi

start=$(date +%s)
status=0
"${command[@]}" || status=$?  # failed jobs are named in the report; the others still count
elapsed=$(( $(date +%s) - start ))

"$PYTHON" -m regdrop.report "$runs" --out "$out"
machine=$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -n 1)
{
    echo "command: bash scripts/mini_table.sh $table${overrides[*]+ ${overrides[*]}} (SEEDS=$SEEDS)"
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: ${machine:-unknown CPU}, $(nproc) CPU cores; load average at the end (1, 5, 15 min): $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
    echo "versions: $("$PYTHON" -c 'import platform, torch, torchvision; print(f"Python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}")')"
    echo "wall time of the sweep: ${elapsed} s (jobs an earlier call finished are skipped, not counted)"
    echo "exit status of the sweep: $status"
    echo "git commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- "${setting_files[@]}" 2>/dev/null || echo ' (the setting files differ from it)')"
    echo "setting files: ${setting_files[*]}"
    echo "setting sha256 (the setting files, concatenated in that order): $experiment_hash"
} > "$out/run_info.txt"
cat "$out/run_info.txt"
exit $status
