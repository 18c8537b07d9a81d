#!/usr/bin/env bash
# GPU checks in one call on a lent device machine (see /work/.library/device).
#
#   bash bench/device.sh prepare   # here: cp312 wheels of gemmi/mrcfile into .whl/, the
#                                  # shared data the GPU tests and benchmarks read into
#                                  # .shared_data/ and the cost model's H100 estimates into
#                                  # .cost/ (bench/gpu_cost.py, ~8 min; all git-ignored,
#                                  # carried, ~25 MB)
#   run(command="bash bench/device.sh run", carry=[".whl", ".shared_data", ".cost"])
#   run(command="bash bench/device.sh sanitize", carry=[".whl", ".shared_data", ".cost"])
#
# "run" installs the wheels, then writes to $OUT: nvidia-smi, a first run of the example on
# CuPy (it compiles every kernel into CuPy's cache, so that no later time includes NVRTC), the
# GPU tests (backend=cupy and the parity tests; NumPy-only tests are deselected),
# bench/kernels.py (NVRTC resource report), bench/restraints.py, bench/rsr.py (with the cost
# model's estimates beside the measured times) and bench/density.py --quick.  Each step has its own
# time limit, so that one slow step cannot take the others' results with it when the call's
# 600 s run out.  Copy the numbers into bench/RESULTS.md with the date and commit.
#
# A task is lent 15 minutes of device time in all (start-up included): "run" first (under
# 10 minutes), then "sanitize" (under 4) at once while the machine is warm, where time is left.
#
# "sanitize" runs the GPU parity tests and the GPU rsr test of the example under
# compute-sanitizer: memcheck (out-of-bounds and misaligned accesses; CuPy's memory pool is
# switched off so that every array is its own allocation and an overrun is seen) and
# racecheck (shared-memory hazards).
set -u
case "${1:-}" in
prepare)
    shared=${GPU_REFINE_SHARED_DATA:-../shared/data}
    mkdir -p .whl .shared_data/xray .shared_data/cryoem
    python3 -m pip download -q --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_28_x86_64 --no-deps -d .whl gemmi==0.7.5 mrcfile==1.5.4 || exit 1
    for d in xray/4iid xray/4hg7 cryoem/emd2566_3j6b_chain9 monomers; do
        rm -rf ".shared_data/$d" && cp -r "$shared/$d" ".shared_data/$d" || exit 1
    done
    chmod -R u+w .shared_data
    mkdir -p .cost
    python3 bench/gpu_cost.py --data "$shared" --json .cost/estimates.json | tail -n 3 || exit 1
    du -sh .whl .shared_data .cost
    ;;
run|sanitize)
    : "${OUT:?run this on the device machine, where OUT is set}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD GPU_REFINE_SHARED_DATA=$PWD/.shared_data PYTHONUNBUFFERED=1
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    git rev-parse --short HEAD > "$OUT/commit.txt" 2>/dev/null
    step() {   # step SECONDS OUTFILE COMMAND...: the command's output into $OUT/OUTFILE
        local limit=$1 file=$2
        shift 2
        timeout "$limit" "$@" > "$OUT/$file" 2>&1
        echo "== $file: exit $? (limit ${limit} s)"
        tail -n 25 "$OUT/$file"
    }
    if [ "$1" = sanitize ]; then
        tests='import sys, cupy, pytest
cupy.cuda.set_allocator(None)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-k", "cupy and not numpy",
                      "tests/test_kernels.py", "tests/test_restraint_kernels.py",
                      "tests/test_rsr.py::test_strategies_on_the_example"]))'
        step 150 memcheck.txt compute-sanitizer --tool memcheck --error-exitcode 99 \
            python3 -c "$tests"
        step 60 racecheck.txt compute-sanitizer --tool racecheck --error-exitcode 99 \
            python3 -c "$tests"
        exit 0
    fi
    step 60 warm.txt bash -c 'python3 -m gpu_refine example directory=/tmp/ex &&
        python3 -m gpu_refine rsr /tmp/ex/helix.cif /tmp/ex/helix_3A.mrc resolution=3 \
        --backend cupy output.prefix=/tmp/ex/warm'
    step 240 tests.txt python3 -m pytest -q tests -k "not numpy and not standin and not benchmark"
    step 30 kernels.txt python3 bench/kernels.py
    step 60 restraints.txt python3 bench/restraints.py --data .shared_data --batches 1,32,256
    step 150 rsr.txt python3 bench/rsr.py --data .shared_data --batches 1,16,128 \
        --numpy-batches 0 --estimates .cost/estimates.json
    step 60 density.txt python3 bench/density.py --quick
    ;;
*)
    echo "usage: bash bench/device.sh prepare|run|sanitize" >&2
    exit 2
    ;;
esac
