#!/usr/bin/env bash
# The issue-6 device run, prepared so that one short lease does it: correctness on the GPU first, then the
# benchmarks, every result written as it comes (a part that runs out of its time leaves the earlier ones).
#
#   scripts/gpu_bench.sh [PART ...]   PART: fused-adam, tests, cpu-tests, gen-NAME, gen-stop-NAME, gen-fused-NAME,
#                                     ppo-NAME, trl-NAME, trl-mixed-NAME (NAME: w1, w2, tiny; configs/bench/);
#                                     default: fused-adam tests ppo-w1 gen-w1
#
# The machine the `device` tool lends has torch and transformers but no deepspeed, datasets, pydantic or trl and
# no network: first, here, `../shared/device/wheels.sh trl==0.23.1` (fills .whl/, 6.2 MB, which this script
# installs there; on a machine without the `wheel` package its DeepSpeed build fails with "invalid command
# 'bdist_wheel'": `pip install wheel` first). A session has 15 minutes of device time, machine start included, so make one call with the default
# parts, whose limits below add up to 555 s (the trace summary's 40 s included; each part may overrun its limit by
# 5 s before it is killed, and the wheels install and environment report take ~30 s first: ~585 s in all, 600 at
# the very worst, when the device tool's limit keeps what is already in $OUT):
#   run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=600)
# and only if 5 minutes are left, at once (the machine stays warm 30 s; it keeps runs/bench/w1, and the wheels
# install again), TRL on the same workload and card, for the speed-up over it (issue 6's TRL figures are from an
# H100, with a precision it does not record; trl-mixed-w1 is the other candidate):
#   run(command="bash scripts/gpu_bench.sh trl-w1", carry=[".whl"], timeout_s=200)
# then, with time left, `gen-fused-w1` (timeout_s=150: the experimental compiled step with the sampling inside
# against the plain compiled one) or `ppo-w2` (timeout_s=360; its part limit is 290 s). The first compile of a
# decoding step falls in the warm-up iterations; a ppo part without the fused-adam part before it on this machine
# builds FusedAdam there too. A ppo part stopped by its limit still writes the result of the iterations done
# (marked "stopped").
#
# gen-stop-NAME times the static compiled sampler with min_new_tokens 0, i.e. with the per-step "has every row
# stopped?" check the workloads (exactly new_tokens per response) never make; beside gen-NAME it prices that check.
# trl-NAME prints the speed-up of the ppo-NAME result this machine still has (runs/bench/NAME/bench-ppo.json);
# a ppo-NAME after a trl-NAME puts it into its JSON (vs_trl). Only the last TRL run is kept for that.
#
# Writes to $OUT (the device tool's folder; else runs/gpu): env.json, tests.xml, ppo-w1.json with
# ppo-w1-profile.json.gz and ppo-w1-profile.txt (torch.profiler's trace and kernel table of one more, untimed,
# iteration: where the time goes, read back here), generate-w1.json (trl-w1.json, ppo-w2*, generate-stop-w1.json,
# ...), log.txt (everything printed, recompilations and CUDA-graph recordings included): 7 files with the default
# parts, and the device tool returns 8 at most. Exits 1 if a part failed or ran out of its time.
# `scripts/gpu_bench.sh gen-tiny ppo-tiny trl-tiny` on a CPU machine checks the script itself.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
tee_pid=$!

if [ -d .whl ] && ! python3 -c "import deepspeed, datasets, pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PATH=/tmp/site/bin:$PATH
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# DeepSpeed's op builder cannot parse the machine's '9.0a'; no hub access; unbuffered output; recompiles and
# CUDA-graph recordings (and the reason for a skipped one) logged
export TORCH_CUDA_ARCH_LIST=9.0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TORCH_LOGS=${TORCH_LOGS:-recompiles,cudagraphs}
python3 -c "import torch" 2>/dev/null || { echo "TORCH_LOGS=$TORCH_LOGS refused; logging recompiles only"
                                          export TORCH_LOGS=recompiles; }

parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(fused-adam tests ppo-w1 gen-w1)
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, report its exit code and duration
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  # a JIT build killed by an earlier part's limit leaves its lock, on which torch waits without a time limit
  rm -f "${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}"/*/*/lock
  timeout --signal=INT --kill-after=5 "$limit" "$@"
  rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

python3 -m rlhf_cli env --json > "$OUT/env.json" || true
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv >> "$OUT/log.txt" 2>&1 || true

for part in "${parts[@]}"; do
  case $part in
    fused-adam)  # DeepSpeed's FusedAdam JIT build (~35 s), once, so that neither the tests' engine check nor a
                 # ppo part's warm-up spends its own limit on it
      step fused-adam 60 python3 -c "from deepspeed.ops.op_builder import FusedAdamBuilder; FusedAdamBuilder().load()" ;;
    tests)  # the fast path against its references on the GPU (CUDA graphs, bf16, a DeepSpeed engine's steps)
      step tests 165 python3 -m pytest -q -rP -p no:cacheprovider --junitxml="$OUT/tests.xml" tests/test_gpu_fastpath.py ;;
    cpu-tests)  # the CPU fast-path tests with this machine's torch and transformers (not the slow two-process one: its
                # first DeepSpeed CPU collective JIT-builds an op, minutes of a short lease)
      step cpu-tests 120 python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_fastpath.py tests/test_ppo_units.py ;;
    gen-stop-*)  # the compiled static sampler with a stop check at every step (min_new_tokens 0)
      name=${part#gen-stop-}
      step "$part" 80 python3 -m rlhf_cli bench generate --workload "$name" --iters 3 --warmup 1 --cache static \
        --set ppo.generation.min_new_tokens=0 --out "$OUT/generate-stop-$name.json" ;;
    gen-fused-*)  # the compiled step with the sampling inside (generation.compile_sampling) vs the static path
      name=${part#gen-fused-}
      step "$part" 120 python3 -m rlhf_cli bench generate --workload "$name" --iters 3 --warmup 1 --cache compiled \
        --out "$OUT/generate-fused-$name.json" ;;
    gen-*)  # the sampler alone: static (compiled, CUDA graphs) vs dynamic cache, sampling work per step
      step "$part" 80 python3 -m rlhf_cli bench generate --workload "${part#gen-}" --iters 3 --warmup 1 \
        --out "$OUT/generate-${part#gen-}.json" ;;
    ppo-*)  # the real rlhf ppo path: the workload's iterations (configs/bench/NAME.yaml), medians after warm-up,
            # roofline floors, the speed-up over TRL when a trl-NAME ran before (on this warm machine); then the
            # profiled iteration's summary (per phase: GPU time and how busy the GPU was) into the log. The results
            # stay in runs/bench/NAME too, where a later trl-NAME finds them.
      name=${part#ppo-}
      res=runs/bench/$name/bench-ppo
      rm -f "$res.json" "$res-profile.json.gz" "$res-profile.txt"
      limit=210
      [ "$name" = w2 ] && limit=290
      step "$part" "$limit" python3 -m rlhf_cli bench ppo --workload "$name"
      for suffix in .json -profile.json.gz -profile.txt; do
        [ -f "$res$suffix" ] && cp "$res$suffix" "$OUT/ppo-$name$suffix"
      done
      if [ -f "$OUT/ppo-$name-profile.json.gz" ]; then
        timeout 40 python3 -m rlhf_cli bench trace "$OUT/ppo-$name-profile.json.gz" --top 12 || status=1
      fi ;;
    trl-*)  # TRL 0.23.1's PPOTrainer on the same workload (needs its wheel in .whl: wheels.sh trl==0.23.1), 1
            # warm-up and 2 timed iterations; with a ppo-NAME result from this machine, the speed-up.
            # trl-NAME: the workload's bf16 weights as they are; trl-mixed-NAME: fp32 weights, bf16 autocast
      name=${part#trl-}
      precision=auto
      case $name in mixed-*) name=${name#mixed-}; precision=bf16-mixed ;; esac
      res=runs/bench/$name/bench-trl.json
      rm -f "$res"
      step "$part" 150 python3 -m rlhf_cli bench trl --workload "$name" --iters 2 --warmup 1 --precision "$precision"
      [ -f "$res" ] && cp "$res" "$OUT/$part.json" ;;
    *) echo "unknown part $part (fused-adam, tests, cpu-tests, gen-NAME, gen-stop-NAME, gen-fused-NAME, ppo-NAME, trl-NAME,"\
            "trl-mixed-NAME;"\
            "NAME a workload in configs/bench)"
       status=2 ;;
  esac
done
exec >&- 2>&-  # log.txt complete before the device tool collects $OUT: tee ends at end of input
wait "$tee_pid" 2>/dev/null
exit $status
