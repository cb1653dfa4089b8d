#!/usr/bin/env bash
# Device check on a GPU machine: the real Gemma 3 270M on cuda through the real-model session tests and the
# parity tests that need no llama.cpp, then bench/concurrency.py (ours; its children load the model on cuda).
# Needs the assembled model at $GEMMA_SESSIONS_CACHE/models/gemma-3-270m-q4_k_m.gguf (the model package is not
# needed once it is there) and gemma_sessions importable. Logs and the bench JSON go to $OUT (default: ./out).
#
#     GEMMA_SESSIONS_CACHE=... PYTHONPATH=src bash scripts/cuda_real.sh
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GEMMA_TEST_DEVICE=cuda
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
timeout 300 python3 -m pytest -q -p no:cacheprovider -rfE tests/e2e/test_sessions_real.py \
    tests/parity/test_real_model.py -k "not llama_cpp and not cli and not load_time" 2>&1 | tee "$OUT/pytest.log"
timeout 240 python3 bench/concurrency.py --n 1,16,64 --engines ours 2>&1 | tee "$OUT/concurrency.log"
cp bench/out/concurrency.json "$OUT/" 2>/dev/null
exit 0
