#!/usr/bin/env bash
# Download, here, the wheels that the GPU machine lacks (its image has torch, numpy, h5py, huggingface_hub, typer,
# imageio and websockets, but not the simulator, gymnasium, minari or tyro) into .whl/, for Python 3.12 on x86-64.
# Then run bench/gpu_check.sh there with `.whl` carried. .whl/ is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any"
for pkg in mujoco==4.0.0 mujoco-core==4.0.0 mujoco-studio==4.0.0 glfw pyopengl gymnasium==1.4.0 \
           farama-notifications cloudpickle minari==0.5.4 tyro==1.0.17 typeguard docstring-parser; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl "$pkg"
done
du -sh .whl
