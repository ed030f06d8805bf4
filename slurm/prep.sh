#!/usr/bin/env bash
# slurm/prep.sh: submit a sharded data_prep build (array job) and its merge (afterok).
#
#   bash slurm/prep.sh [--shards K] [SBATCH OPTIONS...] -- BUILD ARGS...
#
#   bash slurm/prep.sh --shards 16 --partition=cpu --account=myproj -- \
#        --input 'raw/fr/*.jsonl.gz' --domain fr --tokenizer models/llama3 --seq-len 2048 --out data/fr
#
# SBATCH OPTIONS go to both jobs (they override the #SBATCH lines of prep.sbatch and
# merge.sbatch). BUILD ARGS go to `python -m data_prep build`; their --out is what the merge
# joins. Prints "ARRAY_JOB_ID MERGE_JOB_ID" on stdout, so you can chain more jobs:
#   read prep merge < <(bash slurm/prep.sh ...); sbatch --dependency=afterok:$merge slurm/train.sbatch ...
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# The jobs find the code here even when submitted from elsewhere (sbatch exports the env).
export REPO_DIR=${REPO_DIR:-$(dirname "$HERE")}
SHARDS=8
SBATCH_OPTS=()
while (( $# )); do
    case $1 in
        --shards) SHARDS=${2:?--shards needs a number}; shift 2 ;;
        --shards=*) SHARDS=${1#*=}; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; break ;;
        *) SBATCH_OPTS+=("$1"); shift ;;
    esac
done
BUILD_ARGS=("$@")

[[ $SHARDS =~ ^[1-9][0-9]*$ ]] || { echo "prep.sh: --shards must be a positive integer, got '$SHARDS'" >&2; exit 2; }
OUT=""
for ((i = 0; i < ${#BUILD_ARGS[@]}; i++)); do
    case ${BUILD_ARGS[i]} in
        --out) OUT=${BUILD_ARGS[i + 1]:-} ;;
        --out=*) OUT=${BUILD_ARGS[i]#--out=} ;;
    esac
done
[[ -n $OUT ]] || { echo "prep.sh: the build arguments (after --) need --out DIR" >&2; exit 2; }

# --parsable prints "jobid" or "jobid;cluster".
array_id=$(sbatch --parsable --array="0-$((SHARDS - 1))" "${SBATCH_OPTS[@]}" \
           "$HERE/prep.sbatch" "${BUILD_ARGS[@]}")
array_id=${array_id%%;*}
merge_id=$(sbatch --parsable --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
           "${SBATCH_OPTS[@]}" "$HERE/merge.sbatch" "$OUT")
merge_id=${merge_id%%;*}
echo "prep.sh: build array job $array_id ($SHARDS shards) -> merge job $merge_id (afterok) -> $OUT" >&2
echo "$array_id $merge_id"
