#!/usr/bin/env bash
# The issue-6 device run, prepared so that one short lease does it all: correctness on the GPU first, then the
# benchmarks, every result written as it comes (a step that runs out of time leaves the earlier ones).
#
#   scripts/gpu_bench.sh [PART ...]   PART: tests, gen-NAME, ppo-NAME (NAME: w1, w2, tiny; configs/bench/)
#                                     default: tests gen-w1 ppo-w1 gen-w2 ppo-w2
#
# On the machine the `device` tool lends (torch and transformers there; no deepspeed, datasets, pydantic,
# no network): first, here, `../shared/device/wheels.sh` (fills .whl/), then one call per part group, e.g.
#   run(command="bash scripts/gpu_bench.sh tests gen-w1 ppo-w1", carry=[".whl"], timeout_s=480)
#   run(command="bash scripts/gpu_bench.sh ppo-w2 gen-w2", carry=[".whl"], timeout_s=420)
# (the second at once, while the machine is still warm). Measured times are what each part allows itself
# (timeout below); the first compile of a decoding step and DeepSpeed's FusedAdam JIT build fall in the
# warm-up iterations.
#
# Writes to $OUT (the device tool's folder; else runs/gpu): env.json, tests.xml, generate-w1.json,
# ppo-w1.json, generate-w2.json, ppo-w2.json, log.txt (everything printed, recompilations included); exits 1
# if a part failed or ran out of its time. On a CPU machine `scripts/gpu_bench.sh gen-tiny ppo-tiny` checks
# the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

if [ -d .whl ] && ! python3 -c "import deepspeed, datasets, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PATH=/tmp/site/bin:$PATH
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# DeepSpeed's op builder cannot parse the machine's '9.0a'; no hub access; unbuffered output; recompiles logged
export TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_LOGS=${TORCH_LOGS:-recompiles}

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(tests gen-w1 ppo-w1 gen-w2 ppo-w2)
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report its exit code and duration
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

python3 -m rlhf_cli env --json > "$OUT/env.json" 2>&1 || true
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >> "$OUT/log.txt" 2>&1 || true

for part in "${parts[@]}"; do
  case $part in
    tests)  # the fast path against its references: on the GPU, and (the CPU tests) with this machine's versions
      step tests 150 python3 -m pytest -q -p no:cacheprovider --junitxml="$OUT/tests.xml" \
        tests/test_gpu_fastpath.py tests/test_fastpath.py tests/test_ppo_units.py ;;
    gen-*)  # the sampler alone: static (compiled, CUDA graphs) vs dynamic cache, sampling work per step
      step "$part" 150 python3 -m rlhf_cli bench generate --workload "${part#gen-}" --iters 3 --warmup 1 \
        --out "$OUT/generate-${part#gen-}.json" ;;
    ppo-*)  # the real rlhf ppo path: the workload's iterations (configs/bench/NAME.yaml), medians after warm-up
      step "$part" 240 python3 -m rlhf_cli bench ppo --workload "${part#ppo-}" --out "$OUT/ppo-${part#ppo-}.json" ;;
    *) echo "unknown part $part (tests, gen-NAME, ppo-NAME; NAME a workload in configs/bench)"; status=2 ;;
  esac
done
exit $status
