#!/usr/bin/env bash
# The GPU measurements of the accelerator-speed work in one call of at most ~9 minutes,
# for a short device lease: every step has its own time limit and writes its JSON as it
# goes, so a cut-off run keeps what finished. Run from the repository root on a machine
# with one NVIDIA GPU and this package importable:
#
#   OUT=/some/dir bash benchmarks/gpu.sh      # default OUT: benchmarks/results/gpu
#
# Where pip cannot reach an index (this workplace's device machine), carry the missing
# pure-Python wheels (ml_collections; the image has JAX, Flax, Optax, Orbax, PyTorch)
# in .whl/ and install them first:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site && bash benchmarks/gpu.sh
# QUICK=1 runs every step at toy sizes (seconds on a CPU: checks the script itself).
set -u
OUT=${OUT:-benchmarks/results/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) > "$OUT/gpu.txt" 2>&1
"$PY" -c "import jax, sys; print('jax', jax.__version__, jax.devices(), file=sys.stderr)"

step() {   # step NAME SECONDS ARGS...: one measurement, its log and exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$PY" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s (log $OUT/$name.log)"
  tail -n 12 "$OUT/$name.log"
}

if [ "${QUICK:-0}" = 1 ]; then
  K=1; BLOCK=2; PAPER=digits_cnn; CNN_CLIENTS=40; CHUNK=vmap:10; PROFILE_STEPS=2
  Q="--quick --resnet-variants defaults,program,patches,bf16"
else
  K=100; BLOCK=5; PAPER=paper_resnet18; CNN_CLIENTS=10000; CHUNK=vmap:1000; PROFILE_STEPS=20; Q=
fi

# 1. ResNet-18, 10 clients x K = 100 x batch 20: vmap (float32 and bf16, XLA's and the
#    patches convolution), the authors'-style and the tuned PyTorch round on the same GPU,
#    XLA's FLOP count -> MFU; thresholds of every level.
step suite_resnet 300 benchmarks/suite.py $Q --sections resnet,masks --resnet-steps $K \
  --rounds 1 --out "$OUT/suite_gpu_resnet.json"
# 2. Whole rounds: one program per round against blocks compiled together, and the
#    evaluation (the levels side by side and one after another), on the paper's shapes:
#    the paper run's end-to-end time, extrapolated.
step rounds 150 benchmarks/rounds.py --workloads $PAPER --blocks 1 --block $BLOCK \
  --eval-levels vmap,map --out "$OUT/rounds_gpu.json"
# 3. The CNN at 10,000 clients per round (chunked vmap, streamed server sums).
step cnn10k 60 benchmarks/suite.py ${Q%% *} --sections strategies --cnn-clients $CNN_CLIENTS \
  --strategies $CHUNK --no-torch --rounds 1 --out "$OUT/suite_gpu_cnn10k.json"
# 4. Where a paper-shaped round's time goes (top kernels).
step profile 60 benchmarks/profile_rounds.py --workload $PAPER --rounds 1 \
  --set client.local_steps=$PROFILE_STEPS --out "$OUT/profile_gpu.json"
ls -l "$OUT"
