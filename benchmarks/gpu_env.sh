# Source on a bare GPU host of the device tool (no network there): installs what travelled in the ignored, carried
# folders (built in a fresh checkout by scripts/build_gpu_carry.sh) and sets the environment. Carry: wheels (transformers 5.5.4 and the project's other pins: the host's own
# transformers breaks SigLIP), .simpkgs (mujoco, gymnasium, glfw, pyopengl wheels + metaworld_pruned.tar.xz: the
# package with only the assets the 50 v3 tasks load, to fit the 64 MiB transfer; + aloha_pruned.tar.xz, 0.4 MB:
# gym-aloha with the part of dm-control its tasks run on, dm-env and absl, built by scripts/build_aloha_pruned.sh;
# every .simpkgs/*.tar.xz is unpacked into site-packages), .gl (libEGL / libOpenGL debs for
# MUJOCO_GL=egl), wheels_lr (lerobot 0.6.1 and what the host lacks of its imports: draccus, mergedeep, toml, termcolor,
# jsonlines, datasets 4.8.5 + dill / multiprocess / xxhash, av 15.1.0 (lerobot.datasets needs `av.option`, gone in av
# 19), websockets + msgpack for the server; deepdiff is optional in lerobot and not needed). The 64 MiB transfer does
# not hold all four folders: carry .simpkgs + .gl for simulation, wheels_lr for LeRobot comparisons and serving.
# Only what is present is installed.
python -m pip install -q --no-deps --no-index wheels/*.whl 2>&1 | grep -v "^WARNING" || true
[ -d wheels_lr ] && { python -m pip install -q --no-deps --no-index wheels_lr/*.whl 2>&1 | grep -v "^WARNING" || true; }
if [ -d .simpkgs ]; then
  python -m pip install -q --no-deps --no-index .simpkgs/*.whl 2>&1 | grep -v "^WARNING" || true
  site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for f in .simpkgs/*.tar.xz; do [ -f "$f" ] && tar xJf "$f" -C "$site"; done
fi
if [ -d .gl ]; then for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false MUJOCO_GL=egl PYTHONUNBUFFERED=1
export __EGL_VENDOR_LIBRARY_FILENAMES=${__EGL_VENDOR_LIBRARY_FILENAMES:-/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json}
