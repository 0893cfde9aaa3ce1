#!/usr/bin/env bash
# The whole GPU measurement of issue 7 in one go (within 8 minutes on one H200): the CUDA
# tests (batched augmentations, dice_paper, stored slices), then benchmarks/bench_train.py --device cuda, in this
# order: 2D SimSiam pairs/s with data loading in bf16 with --batch_augment on and off, the step
# alone with FLOPs and model FLOP utilisation; the levers stacked (loss read every step /
# every 20 steps, --fused_optimizer) with their mean losses; the pipeline alone; 3D 96^3;
# the evaluation's cost beside the model; fine-tuning time; --compile on top of the levers
# (compilation takes minutes); then fp16 and fp32.
# train_cuda.json is rewritten after every
# measurement, so a run stopped by the time limit keeps what it measured ("complete": false).
#
# On the GPU machine (see ../shared/gpu/README.md; MONAI, einops and nibabel come as wheels in
# .whl/, installed into .site/ here when they are not importable):
#
#     OUT=/some/folder bash benchmarks/gpu_check.sh
#
# Writes under $OUT (default: a new temporary folder, printed at the end):
#     nvidia-smi.txt, env.txt, pytest_cuda.log, bench_train.log, train_cuda.json
#     (train_cpu_small.json in a dry run)
# Copy train_cuda.json to benchmarks/results/ in the project afterwards.
#
# Dry run of the same steps on a CPU machine (small sizes, under 3 minutes):
#
#     GPU_CHECK_SMALL=1 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
#
# Exit status: that of the benchmark (the pytest status is logged, and repeated at the end).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
OUT="${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "${GPU_CHECK_SMALL:-0}" = 1 ] && PY=.venv/bin/python
SMALL="${GPU_CHECK_SMALL:-0}"
t_start=$(date +%s)

# MONAI & co. from the wheels when the interpreter lacks them
if ! "$PY" -c "import monai, einops, nibabel" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .site .whl/*.whl || exit 2
        export PYTHONPATH="$PWD/.site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "error: monai, einops or nibabel missing and no wheels in .whl/ (run ../shared/gpu/prepare_wheels.sh)" >&2
        exit 2
    fi
fi

{
    date -u
    "$PY" -c "import torch, monai, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda, 'monai', monai.__version__); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
    echo "cpus $(nproc)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "(no nvidia-smi)" >> "$OUT/nvidia-smi.txt"

# 1. the CUDA tests: batch_augment.py (equal in distribution to MONAI), dice_paper and stored slices on the GPU
timeout 150 "$PY" -m pytest -q tests/test_batch_augment.py tests/test_metrics.py tests/test_finetune.py -k cuda > "$OUT/pytest_cuda.log" 2>&1
pytest_rc=$?
echo "pytest -k cuda: exit $pytest_rc ($(tail -n 1 "$OUT/pytest_cuda.log"))"

# 2. the benchmark; workers: the machine's cores, at most 16
workers=$(nproc); [ "$workers" -gt 16 ] && workers=16
if [ "$SMALL" = 1 ]; then
    bench=(--device cpu --quick --no-three_d --workers 1)
    result=train_cpu_small.json
    limit=240
else
    bench=(--device cuda --workers "$workers")
    result=train_cuda.json
    limit=$(( 470 - ($(date +%s) - t_start) ))
fi
timeout "$limit" "$PY" benchmarks/bench_train.py "${bench[@]}" --out "$OUT/$result" > "$OUT/bench_train.log" 2>&1
bench_rc=$?
tail -n 60 "$OUT/bench_train.log"
echo "bench_train: exit $bench_rc; pytest -k cuda: exit $pytest_rc; $(( $(date +%s) - t_start )) s; results in $OUT"
exit "$bench_rc"
