#!/usr/bin/env bash
# Issue 15's GPU checks in one device call.
#
# Before the call, on the development machine, in the repo root (see the device tool's README):
#   echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude   (.gpu/ is already in .gitignore)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl transformers==5.24.0 tokenizers==0.23.3 safetensors==0.8.0 peft==0.21.2
#   (not huggingface_hub 2.x: it imports httpx2, which the device lacks; its huggingface_hub 1.33.0
#   serves transformers 5.24)
#   mkdir -p .gpu && cp -r ../shared/llava-1.5-7b-hf .gpu/llava      # the real processor, no weights
#   cp -r ../shared/data/mm-safetybench .gpu/mm-safetybench          # 96 stand-in images at 1024 px (4.3 MB)
# Then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".gpu"], timeout_s=480)
# Everything it prints is also under $OUT (gpu_study.log, gpu_study.json).
set -o pipefail
# A warm machine keeps /tmp from the last call: start from an empty target, or an old wheel stays.
rm -rf /tmp/site
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" MECHPROBE_LLAVA_DIR="$PWD/.gpu/llava" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu-out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)'
# GPU_BENCH_STUDY_ARGS set: bench_study.py (naive way against the project's, at 7B) instead of gpu_study.py
if [ -n "${GPU_BENCH_STUDY_ARGS:-}" ]; then
    timeout "${GPU_TIMEOUT:-420}" python3 benchmarks/bench_study.py --model 7b-random --device cuda \
        --mmsb-root .gpu/mm-safetybench ${GPU_BENCH_STUDY_ARGS} 2>&1 | tee "$OUT/bench_study.log"
    exit
fi
# ${GPU_STUDY_ARGS} replaces the default extra arguments, e.g. "--skip-mfu --study-runs 2 --extra-study-batches 32"
# (the busy-fraction runs of the third session; MFU rows measured before)
timeout 420 python3 benchmarks/gpu_study.py --mmsb-root .gpu/mm-safetybench --queries 32 --deadline 390 \
    --json "$OUT/gpu_study.json" ${GPU_STUDY_ARGS:---compile --cprofile $OUT/study.prof} 2>&1 | tee "$OUT/gpu_study.log"
