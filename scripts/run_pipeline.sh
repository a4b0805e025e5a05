#!/usr/bin/env bash
# Run the whole RLHF pipeline (SFT -> reward model -> PPO -> eval -> report) on this machine.
#
#   scripts/run_pipeline.sh CONFIG [rlhf pipeline options...]
#   scripts/run_pipeline.sh configs/qwen2.5-0.5b/pipeline.yaml                 # one GPU
#   scripts/run_pipeline.sh configs/llama-7b-8gpu/pipeline.yaml --num-gpus 8   # 8 GPUs
#   scripts/run_pipeline.sh configs/qwen2.5-1.5b/pipeline.yaml --dry-run       # validate, print the plan
#
# Without --num-gpus / --hostfile in the options (and NUM_GPUS unset), the GPUs CUDA_VISIBLE_DEVICES lists (set
# but empty: none, one process), else those nvidia-smi lists, are used: --num-gpus N is added when there are 2
# or more. Extra options go to `rlhf pipeline` unchanged (--force,
# --set KEY=VALUE, --dry-run, --debug, ...). Run it from the repository root or anywhere: the config path is
# taken relative to the current directory.
#
# Environment:
#   NUM_GPUS=N        processes (GPUs) per node (default: detected, see above)
#   RLHF="CMD"        how to call the CLI (default: `rlhf` if on PATH, else `${PYTHON:-python3} -m rlhf_cli`)
#   DRY_RUN=1         print the command instead of running it
# Defaults set only when unset: TOKENIZERS_PARALLELISM=false (no fork warnings from the tokenizer threads),
# OMP_NUM_THREADS = CPU cores / GPUs (at least 1).
set -euo pipefail

usage() {  # the header comment above, its Environment section included
    sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'
}

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    usage
    [[ $# -ge 1 ]] && exit 0
    exit 2
fi

config=$1
shift
if [[ ! -f "$config" ]]; then
    echo "run_pipeline.sh: config not found: $config" >&2
    exit 2
fi

# The CLI lookup and the DRY_RUN tail are the same in run_pipeline.sh and slurm_pipeline.sh on purpose: each
# script stands alone (sbatch runs a copy of its script from a spool directory, where a sourced helper is not).
if [[ -n "${RLHF:-}" ]]; then
    read -r -a rlhf_cmd <<< "$RLHF"
elif command -v rlhf > /dev/null 2>&1; then
    rlhf_cmd=(rlhf)
else
    rlhf_cmd=("${PYTHON:-python3}" -m rlhf_cli)
fi

# was the launch shape given explicitly? (and how many processes per node: for the thread count below)
explicit=0
given=""
prev=""
for arg in "$@"; do
    case "$arg" in
        --num-gpus=*) explicit=1; given=${arg#--num-gpus=} ;;
        --num-gpus|--hostfile|--hostfile=*) explicit=1 ;;
    esac
    [[ "$prev" == "--num-gpus" ]] && given=$arg
    prev=$arg
done

if [[ -n "${NUM_GPUS:-}" && ! "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]]; then
    if [[ $explicit -eq 0 ]]; then
        echo "run_pipeline.sh: NUM_GPUS must be a whole number of at least 1, got '$NUM_GPUS'" >&2
        exit 2
    fi
    unset NUM_GPUS  # not used: the options give the launch shape
elif [[ -n "${NUM_GPUS:-}" && $explicit -eq 1 ]]; then
    echo "run_pipeline.sh: NUM_GPUS=$NUM_GPUS not passed on (the options give --num-gpus or --hostfile)" >&2
fi

launch=()
gpus=1
if [[ "$given" =~ ^[0-9]+$ && "$given" -ge 1 ]]; then
    gpus=$given
elif [[ -n "${NUM_GPUS:-}" ]]; then
    gpus=$NUM_GPUS
    [[ $explicit -eq 0 ]] && launch=(--num-gpus "$gpus")
elif [[ $explicit -eq 0 && -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # what this job may use, not the node's all
    IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"  # (set but empty: no GPU for this job, one process)
    gpus=${#visible[@]}
    [[ "$gpus" -ge 2 ]] && launch=(--num-gpus "$gpus")
elif [[ $explicit -eq 0 ]] && command -v nvidia-smi > /dev/null 2>&1; then
    gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU' || true)
    [[ "$gpus" =~ ^[0-9]+$ && "$gpus" -ge 1 ]] || gpus=1
    [[ "$gpus" -ge 2 ]] && launch=(--num-gpus "$gpus")
fi

export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
cores=$(nproc 2> /dev/null || echo 1)
threads=$(( cores / (gpus > 0 ? gpus : 1) ))
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( threads > 0 ? threads : 1 ))}"

cmd=("${rlhf_cmd[@]}" pipeline --config "$config" ${launch[@]+"${launch[@]}"} "$@")
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
