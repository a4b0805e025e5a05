#!/usr/bin/env bash
# Multi-node RLHF pipeline on Slurm: N nodes x 8 GPUs, DeepSpeed's multi-node launcher with a hostfile built
# from the job's node list.
#
#   sbatch scripts/slurm_pipeline.sh                                         # configs/llama-7b-8gpu, 2 nodes
#   sbatch --nodes 4 scripts/slurm_pipeline.sh configs/llama-7b-8gpu/pipeline.yaml --set eval.num_prompts=256
#   DRY_RUN=1 scripts/slurm_pipeline.sh CONFIG    # inside an allocation: write the hostfile, print the command
#
# Arguments: the pipeline config (default configs/llama-7b-8gpu/pipeline.yaml), then options passed to
# `rlhf pipeline` unchanged (--set KEY=VALUE, --dry-run, ...). Submit from the repository root. Submitting the
# same command again (or a requeue: Slurm replays the arguments) resumes every stage from its last checkpoint;
# do not submit with --force unless you mean to start over on every requeue as well.
#
# Stopping: `--signal=B:TERM@300` below has Slurm send SIGTERM to `rlhf` (this script execs it) 5 minutes
# before the time limit; `rlhf` passes it to every rank on every node (a stop file in the stage's output_dir),
# they finish the step, save a checkpoint and the job exits 143; resubmit to continue. Give more lead time for
# slow saves (a 70B model's ZeRO states). `scancel --signal=TERM --batch JOBID` does the same by hand. A plain
# `scancel` or the time limit itself signals every process at once, and Slurm kills them KillWait seconds
# later (30 by default), usually before a checkpoint is written.
# Before submitting, `rlhf pipeline --config CONFIG --check-data --num-gpus 16` (the job's GPUs in all, for its
# batch checks; a login node will do: no GPU, nothing written) reads every stage's data as the runs will and
# stops at the first bad row, naming its file and row.
#
# Requirements (DeepSpeed's launcher starts the workers over pdsh/ssh from the first node):
#   - pdsh installed and passwordless ssh between the allocated nodes;
#   - the repository, the Python environment and the pipeline's output_dir at the same paths on every node
#     (a shared filesystem); Hugging Face caches (HF_HOME) on it too, or pre-filled on each node;
#   - gated models (meta-llama/*): `hf auth login` once, with the token file in a home directory every node
#     shares.
# Only variables DeepSpeed knows (NCCL*, PYTHON*, UCX*, ...) reach the other nodes by themselves; this script
# forwards the Hugging Face / tokenizer / OpenMP variables that are set through a DeepSpeed environment file
# (DS_ENV_FILE), unless DS_ENV_FILE is already set; the lines of ~/.deepspeed_env and ./.deepspeed_env, which
# DeepSpeed no longer reads once DS_ENV_FILE is set, are copied into it first.
#
# The script gives `rlhf pipeline` --hostfile (the allocated nodes) and --num-gpus (GPUS_PER_NODE); options that
# set the launch shape themselves are refused. MASTER_ADDR (the rendezvous) defaults to the first node's name.
#
# Environment: GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE, else 8), RLHF (how to call the CLI, default `rlhf`
# if on PATH, else `${PYTHON:-python3} -m rlhf_cli`), RLHF_JOB_DIR (where the hostfile and the env file go;
# only the first node reads them; default ${TMPDIR:-/tmp}/rlhf-slurm-JOB_ID), DRY_RUN=1 (print the command
# instead of running it).
#
#SBATCH --job-name=rlhf-pipeline
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then  # the header comment above
    sed -n '2,/^#SBATCH/p' "$0" | grep -v '^#SBATCH' | grep '^#' | sed 's/^# \{0,1\}//'
    exit 0
fi
config=${1:-configs/llama-7b-8gpu/pipeline.yaml}
[[ $# -gt 0 ]] && shift
for arg in "$@"; do  # the launch shape is the allocation's
    case "$arg" in
        --num-gpus|--num-gpus=*|--hostfile|--hostfile=*|--num-nodes|--num-nodes=*)
            echo "slurm_pipeline.sh: $arg is set from the allocation (--hostfile of its nodes, --num-gpus" \
                 "GPUS_PER_NODE); set GPUS_PER_NODE or sbatch --nodes instead" >&2
            exit 2 ;;
    esac
done

if [[ -z "${SLURM_JOB_NODELIST:-}" ]]; then
    echo "slurm_pipeline.sh: SLURM_JOB_NODELIST is not set; submit with sbatch (or run inside salloc)" >&2
    exit 2
fi
if [[ ! -f "$config" ]]; then
    echo "slurm_pipeline.sh: config not found: $config (submit from the repository root)" >&2
    exit 2
fi

gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
job_dir=${RLHF_JOB_DIR:-${TMPDIR:-/tmp}/rlhf-slurm-${SLURM_JOB_ID:-$$}}
mkdir -p "$job_dir"

# DeepSpeed hostfile: one "hostname slots=N" line per allocated node
hostfile=$job_dir/hostfile
mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
if [[ ${#hosts[@]} -eq 0 ]]; then
    echo "slurm_pipeline.sh: scontrol listed no hosts for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST" >&2
    exit 2
fi
: > "$hostfile"
for host in "${hosts[@]}"; do
    [[ -n "$host" ]] && echo "$host slots=$gpus_per_node" >> "$hostfile"
done

# the rendezvous: the first node by name (Slurm's nodes resolve each other's names), unless MASTER_ADDR is set;
# DeepSpeed's runner would otherwise guess the first address `hostname -I` lists, which may be a network the
# other nodes cannot reach
export MASTER_ADDR="${MASTER_ADDR:-${hosts[0]}}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores=${SLURM_CPUS_ON_NODE:-$(nproc 2> /dev/null || echo 8)}
    threads=$(( cores / gpus_per_node ))
    export OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 ))
fi

# variables the workers on the other nodes need (absolute DS_ENV_FILE: DeepSpeed's runner reads it by name)
if [[ -z "${DS_ENV_FILE:-}" ]]; then
    env_file=$job_dir/deepspeed_env
    : > "$env_file"
    # DS_ENV_FILE replaces the files DeepSpeed reads otherwise (~/.deepspeed_env, ./.deepspeed_env): their
    # lines come first (those with a `=`: DeepSpeed's reader fails on any other), this job's variables after
    for kept in "$HOME/.deepspeed_env" "./.deepspeed_env"; do
        if [[ -f "$kept" ]]; then
            grep '=' "$kept" >> "$env_file" || true
        fi
    done
    for name in HF_HOME HF_HUB_CACHE HF_DATASETS_CACHE HF_HUB_OFFLINE HF_DATASETS_OFFLINE TRANSFORMERS_OFFLINE \
                TOKENIZERS_PARALLELISM OMP_NUM_THREADS; do
        if [[ -n "${!name:-}" ]]; then
            echo "$name=${!name}" >> "$env_file"
        fi
    done
    export DS_ENV_FILE=$env_file
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

cmd=("${rlhf_cmd[@]}" pipeline --config "$config" --hostfile "$hostfile" --num-gpus "$gpus_per_node" "$@")
echo "slurm_pipeline.sh: ${#hosts[@]} node(s) x $gpus_per_node GPU(s), MASTER_ADDR=$MASTER_ADDR; hostfile $hostfile:" >&2
cat "$hostfile" >&2
if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"
