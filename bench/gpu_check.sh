#!/usr/bin/env bash
# The GPU check, one script (at most 9.5 minutes on one GPU). Here first:
# bash bench/fetch_wheels.sh (the simulator, gymnasium, minari and tyro as wheels into .whl/).
# On a machine with a GPU, from the repository root, carrying .whl:
#     bash bench/gpu_check.sh            # results in $OUT (or bench-out/): gpu_check.json, tests.log, check.log
# 1. the CUDA-graph tests (graphed parts against eager ones);
# 2. bench/gpu_check.py: the ADEPT-SAC and SAC steps' speed at the paper's settings, eager and graphed; a run stopped
#    and resumed ends where an uninterrupted run ends (graphs on);
# 3. the other tests, with the end-to-end runs on CUDA (ADEPT_TEST_CUDA=1).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-out}"
mkdir -p "$out"
if ! python3 -c "import mujoco, gymnasium, minari, tyro" 2>/dev/null; then  # the GPU machine lacks these
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
export PYTHONUNBUFFERED=1 MUJOCO_GL=disable  # no rendering: EGL is not on every GPU machine
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
# Most telling first, each part with its own time limit, so that one device run of at most 9.5 minutes says all it
# can: the CUDA-graph tests, the check (speed, then resume with graphs on), then the other tests on CUDA.
ADEPT_TEST_CUDA=1 timeout 100 python3 -m pytest -q -p no:cacheprovider test_adept.py -k "graphed or state_kept" 2>&1 \
  | tee "$out/tests-graphs.log" | tail -n 15
graph_tests=${PIPESTATUS[0]}
timeout 270 python3 bench/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/check.log" | grep -E "^\{|Error|Traceback" | cut -c1-2000
check=${PIPESTATUS[0]}
ADEPT_TEST_CUDA=1 timeout 180 python3 -m pytest -q -p no:cacheprovider test_adept.py -k "not graphed and not state_kept" \
  --durations 5 2>&1 | tee "$out/tests.log" | tail -n 15
tests=${PIPESTATUS[0]}
echo "graph tests exit $graph_tests, check exit $check, tests exit $tests"
[ "$graph_tests" = 0 ] && [ "$check" = 0 ] && [ "$tests" = 0 ]
