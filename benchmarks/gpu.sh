#!/usr/bin/env bash
# What we run on a lent GPU machine (JAX with CUDA, PyTorch; no tensorflow-datasets and no
# SimpleITK there, so the cardiac cohort is generated in memory and the elastix row is
# computed on a CPU machine afterwards). Steps, each under its own time limit (seconds):
#
#   bash benchmarks/gpu.sh tests     # versions; the model and kernel tests on the GPU (120)
#   bash benchmarks/gpu.sh kernel    # the first and second layers alone, both convs and
#                                    # the first layer in training:
#                                    # our Triton kernels against XLA
#                                    # (benchmarks/layers.py) (210); what they
#                                    # compile to is counted off the GPU (benchmarks/sass.py)
#   bash benchmarks/gpu.sh onepair   # one pair: register against its A/B twins, interleaved
#                                    # (benchmarks/one_pair.py) (45)
#   bash benchmarks/gpu.sh bench     # the benchmark table: baselines (float32, bf16 and
#                                    # the A/B rows) and PyTorch at both sizes first, then
#                                    # the variants while the budget lasts (200); the rest
#                                    # later by `python -m benchmarks.core --variants=…`
#   bash benchmarks/gpu.sh profile   # top kernels: batch 512, a train step, one 256² pair,
#                                    # their compiled programs in hlo.tar.gz (80)
#   bash benchmarks/gpu.sh ncu       # Nsight Compute on our Triton kernels at batch 512 and
#                                    # in a train step: throughput, occupancy, warp stalls,
#                                    # memory (ncu_*.txt, its logs ncu_*.log, ncu.tar.gz) (150)
#   bash benchmarks/gpu.sh flags     # one pair, batch 512 and training under XLA flag sets:
#                                    # CUDA graphs off; no Triton GEMMs; cuDNN runtime fusion
#                                    # (conv + bias + ELU); graphs around loops, from one op (120)
#   bash benchmarks/gpu.sh train     # cardiac experiment, paper settings, every variant (300)
#   bash benchmarks/gpu.sh all       # tests, kernel, onepair, bench, profile (~8 min; flags
#                                    # and train have been measured)
#
# Limits: TESTS_SECONDS, ONEPAIR_SECONDS, BENCH_SECONDS, PROFILE_SECONDS, NCU_SECONDS,
# FLAGS_SECONDS, TRAIN_SECONDS. BENCH_ARGS: more arguments for benchmarks.core (--sizes=256, say).
# KERNEL_LAYERS: the layers `kernel` times (default: train1bn 1 2 train train1).
# Results go to $OUT (default benchmarks/results/gpu): the tests' log, one JSON per tool
# (the layers' four in layers.tar.gz), every tool's printed table in gpu.log, compiled
# programs as .tar.gz (at most 8 files, what a lease brings back). After `train`, unpack
# $OUT/sunnybrook-paper.tar.gz into runs/ on a machine with the full install and run
#   python -m experiments.sunnybrook --variant=C1 --workdir=runs/sunnybrook-paper
# there: the trained variants are reused and the SimpleElastix row is added.
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}

run_pytest() {  # until SECONDS reaches $1, the tests named after it, at full precision
  local end=$1
  shift
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout -s INT -k 15 $((end - SECONDS > 5 ? end - SECONDS : 5)) \
    $py -m pytest -v --tb=short -p no:cacheprovider "$@" >>"$OUT/gpu_tests.log" 2>&1
}

tests() {
  nvidia-smi -L
  $py -c "import jax, flax, optax, orbax.checkpoint as ocp, torch
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__,
      'orbax', getattr(ocp, '__version__', '?'), 'torch', torch.__version__, jax.devices())"
  # The defaults first, as whole networks (training with the first layer at once and the
  # pairs form, and inside shard_map as over several GPUs; registration with the 128²
  # layer's kernel and with the first layer reading the pair; bfloat16 training with the
  # kernels; bfloat16 registration with the 128² layer's, the candidate) and the GPU's
  # platform name, then the kernels one by one. One line per test
  # (-v), so a run cut short still says which passed; stopped by SIGINT, pytest still
  # prints the tracebacks of what failed.
  # Full float32 convolutions and products, as on the CPU the tolerances were set on (the
  # GPU's default is TF32-like; the timings below use the default).
  local m=tests/test_models.py l=tests/test_layers.py end=$((SECONDS + ${TESTS_SECONDS:-120}))
  local first=(
    tests/test_train_conv.py::test_dirnet_trains_alike_with_the_kernels
    tests/test_train_conv.py::test_bfloat16_training_with_the_kernels_is_as_close_to_float32_as_xlas
    tests/test_pooled_layers.py::test_dirnet_with_the_kernel_registers_alike
    tests/test_pooled_layers.py::test_bfloat16_dirnet_with_the_kernel_is_as_close_to_float32_as_xlas
    tests/test_first_layer.py::test_pair_kernel_is_the_layer_of_the_stacked_pair
    tests/test_first_layer.py::test_register_reading_the_pair_registers_alike
    tests/test_dispatch.py::test_default_platform_names_the_gpu_kind
  )
  # Run 9's 240 s ended in test_pooled_layers.py, after the two files that come last now.
  local rest=(
    tests/test_pooled_layers.py tests/test_first_layer.py
    $l::test_first_layer_train_gradients_are_the_reference_layers
    $m::test_folded_batchnorm_gives_the_same_grid
    $l::test_fused_first_layer_is_conv_elu_pool $l::test_conv_taps_is_a_zero_padded_correlation
    $l::test_conv_taps_gradients_are_the_convolutions $m::test_training_computes_the_first_conv_by_taps
    $m::test_bfloat16_activations_register_within_bfloat16_precision tests/test_batchnorm.py
    tests/test_bspline.py tests/test_resample.py tests/test_tps.py tests/test_losses.py
    tests/test_first_layer_grad.py tests/test_train_conv.py
  )
  # Two runs: in one, pytest orders the tests by file, whatever the order given.
  local deselect=() status=0
  for t in "${first[@]}"; do deselect+=(--deselect "$t"); done
  run_pytest "$end" "${first[@]}" || status=$?
  run_pytest "$end" "${rest[@]}" "${deselect[@]}" || status=$?
  echo "tests: exit $status"
  grep -c PASSED "$OUT/gpu_tests.log"
  grep -E "FAILED|ERROR|passed|failed" "$OUT/gpu_tests.log" | tail -20
}

train() {
  local run=/tmp/sunnybrook-paper end=$((SECONDS + ${TRAIN_SECONDS:-300}))
  for v in C1 all; do  # C1 first: the variant Table 1 is about
    timeout $((end - SECONDS > 10 ? end - SECONDS : 10)) $py -m experiments.sunnybrook \
      --variant=$v --preset=paper --in_memory --noelastix --progress=false --workdir=$run \
      2>&1 | tee -a "$OUT/train.log"
  done
  tar -czf "$OUT/sunnybrook-paper.tar.gz" -C /tmp sunnybrook-paper
}

kernel() {
  local -A limit=([1]=45 [2]=45 [train]=60 [train1]=30 [train1bn]=30)  # ~3/4 used
  local dir=/tmp/layers
  mkdir -p $dir
  for layer in ${KERNEL_LAYERS:-train1bn 1 2 train train1}; do
    timeout "${limit[$layer]}" $py -m benchmarks.layers --layer=$layer \
      --out="$dir/layer${layer}_gpu.json" 2>&1 | tee -a "$OUT/gpu.log"
  done
  tar -czf "$OUT/layers.tar.gz" -C $dir .  # one file: a lease brings back at most 8
}

onepair() {
  timeout "${ONEPAIR_SECONDS:-45}" $py -m benchmarks.one_pair --out="$OUT/one_pair_gpu.json" \
    2>&1 | tee -a "$OUT/gpu.log"
}

bench() {  # no variant starts after the budget; a block takes ~30 s; timeout is a backstop
  local budget=${BENCH_SECONDS:-200}
  # shellcheck disable=SC2086  # BENCH_ARGS holds several arguments
  timeout $((budget + 40)) $py -m benchmarks.core --seconds=$((budget - 30)) ${BENCH_ARGS:-} \
    --out="$OUT/bench_gpu.json" 2>&1 | tee -a "$OUT/gpu.log"
}

flags() {  # the tool keeps to its budget and prints its table; timeout is a backstop
  local budget=${FLAGS_SECONDS:-120}
  timeout $((budget + 30)) $py -m benchmarks.flags --seconds="$budget" \
    --out="$OUT/flags_gpu.json" 2>&1 | tee -a "$OUT/gpu.log"
}

profile() {
  local end=$((SECONDS + ${PROFILE_SECONDS:-80})) hlo=/tmp/hlo
  mkdir -p $hlo
  for args in "--batch=512" "--what=train --batch=32" "--batch=1"; do
    name=$(echo "$args" | tr -dc 'a-z0-9=' | tr '=' '_')
    # shellcheck disable=SC2086  # $args holds several flags
    timeout $((end - SECONDS > 10 ? end - SECONDS : 10)) $py -m benchmarks.profile $args \
      --top=30 --hlo=$hlo/$name.txt 2>&1 | tee -a "$OUT/gpu.log"
  done
  tar -czf "$OUT/hlo.tar.gz" -C $hlo .
}

ncu() {  # hardware counters need the Firecracker runtime (KINDS.md): gVisor refuses them
  local tool end=$((SECONDS + ${NCU_SECONDS:-150})) dir=/tmp/ncu status
  tool=$(type -P ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)  # not this function
  if [ -z "$tool" ]; then echo "ncu: not found" | tee -a "$OUT/gpu.log"; return; fi
  "$tool" --version | tail -1 | tee -a "$OUT/gpu.log"
  mkdir -p $dir
  # Our kernels by name (Pallas names them after their Python functions; XLA suffixes
  # copies __N), the first 16 launches of the warm-up calls of each workload; the clocks as
  # they are (METHOD.md). One allocation per buffer, not XLA's preallocated pool, so that
  # replaying a kernel saves and restores its own buffers only. No autotuning: its
  # thousands of launches pass through ncu too, and the Triton kernels' blocks are fixed.
  # Run 9 printed nothing in 170 s (the output went through `tail`, and ncu outlived its
  # SIGTERM): each run now writes its own log as it goes and is killed 10 s after.
  local names='^(_kernel_dot|_kernel|_stats_kernel|_sums_kernel|_kernel_grad_kernel|_conv_kernel_pairs|_kernel_grad_kernel_pairs)(__[0-9]+)?$'
  for args in "--batch=512" "--what=train --batch=32"; do
    name=$(echo "$args" | tr -dc 'a-z0-9=' | tr '=' '_')
    # shellcheck disable=SC2086  # $args holds several flags
    XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_ALLOCATOR=platform \
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
      timeout -k 10 $((end - SECONDS > 10 ? end - SECONDS : 10)) "$tool" --clock-control none \
      --target-processes all --kernel-name regex:"$names" --launch-count 16 \
      --section SpeedOfLight --section LaunchStats --section Occupancy \
      --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
      --section ComputeWorkloadAnalysis -f -o "$dir/$name" \
      $py -m benchmarks.profile $args --calls=0 >"$OUT/ncu_$name.log" 2>&1
    status=$?
    echo "ncu $args: exit $status, $(grep -c '==PROF== Profiling' "$OUT/ncu_$name.log") kernels" \
      | tee -a "$OUT/gpu.log"
    [ -f "$dir/$name.ncu-rep" ] && "$tool" --import "$dir/$name.ncu-rep" --page details \
      >"$OUT/ncu_$name.txt" 2>&1
  done
  tar -czf "$OUT/ncu.tar.gz" -C $dir .  # the reports, for ncu-ui or --import elsewhere
}

case "${1:-all}" in
tests | kernel | onepair | bench | profile | ncu | flags | train) "$1" ;;
all) tests; kernel; onepair; bench; profile ;;
*)
  echo "usage: bash benchmarks/gpu.sh tests|kernel|onepair|bench|profile|ncu|flags|train|all" >&2
  exit 2
  ;;
esac
