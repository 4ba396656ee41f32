#!/usr/bin/env bash
# One short GPU check (CI stays CPU-only): ZeroOptimizer on CUDA with NCCL.
#   1. the optimizer's CPU test files, unchanged, to show the CUDA build of torch passes them;
#   2. parity with single-process torch AdamW on CUDA/NCCL at every world size the GPUs allow
#      (1 .. nGPU), host syncs per step, memory_report;
#   3. the step benchmark (DDP + AdamW, DDP + ZeroRedundancyOptimizer, ZeroOptimizer 1/2 x
#      offload x fp32/bf16) at the largest world size.
# Usage (on the GPU machine, from the repository root): bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-python3}
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible to $PY: nothing to check"; exit 2
fi
$PY -m pip install -q -e . pytest hypothesis psutil 2>&1 | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
rc=0
echo "== 1. optimizer tests (gloo/CPU) under this torch"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/test_optimizer.py tests/test_optimizer_matrix.py tests/test_optimizer_semantics.py 2>&1 | tail -3 || rc=1
for ws in $(seq 1 "$NGPU"); do
  echo "== 2. parity on CUDA/NCCL, world size $ws"
  timeout 240 $PY -m torch.distributed.run --standalone --nproc-per-node "$ws" bench/gpu_check.py parity || rc=1
done
echo "== 3. step benchmark, world size $NGPU"
timeout 300 $PY -m torch.distributed.run --standalone --nproc-per-node "$NGPU" bench/gpu_check.py bench || rc=1
exit $rc
