#!/bin/bash
# Rebuild .simpkgs/aloha_pruned.tar.xz: gym-aloha and the part of dm-control it runs on, as a site-packages tree
# small enough to travel to a bare GPU host (0.37 MB xz, 2.5 MB unpacked, 107 files, instead of dm-control's 116 MB
# installed). benchmarks/gpu_env.sh unpacks every .simpkgs/*.tar.xz into site-packages there. Reproducible (same
# bytes for the same inputs).
#
#   bash scripts/build_aloha_pruned.sh [SITE_PACKAGES] [OUT]  # default: project venv's, .simpkgs/aloha_pruned.tar.xz
#
# What the tree holds (taken from SITE_PACKAGES: gym-aloha 0.1.5, dm-control 1.0.28, dm-env 1.6, absl-py 2.5.1):
# * gym_aloha: all of it (its 4 scenes, the ViperX meshes they include, the task classes, env.py; 1.7 MB raw).
# * dm_control, only what gym-aloha's transfer-cube / insertion tasks (joint and end-effector scenes) and
#   chunkpolicy/sim/aloha_env.py + aloha_expert.py import at run time: __init__, _render (egl / osmesa / glfw
#   contexts), mujoco (Physics, index, wrapper, mjbindings; not mujoco/testing), rl/control.py, utils/*.py, and from
#   suite only base.py (gym-aloha's tasks subclass suite.base.Task) with suite/__init__.py REPLACED by a stub:
#   the original imports all 19 suite domains, and through them scipy (quadruped) and lxml (cartpole, xml_tools)
#   plus their assets, none of which the host has or ALOHA needs. So `dm_control.suite.load` and the suite
#   domains, locomotion, composer, mjcf, manipulation, viewer, blender, autowrap are absent, as are all tests.
# * dm_env (rl/control.py's TimeStep / specs) and absl (flags + logging, used by dm_control's renderer and
#   wrapper), without their tests / absl.testing.
# * each package's dist-info, without RECORD (the file list no longer matches), so versions still resolve.
# Not needed, so not shipped: dm-tree, labmaze, lxml, pyparsing, protobuf, scipy, requests, tqdm (dm-control's
# declared deps that this subset never imports). The host must provide numpy, mujoco 3.3.0, gymnasium, pyopengl,
# glfw, typing_extensions (.simpkgs wheels / torch's deps), with MUJOCO_GL=egl (or osmesa).
# Checked (dm-control 1.0.28, gym-aloha 0.1.5, mujoco 3.3.0) in a clean Python 3.12 venv holding only numpy, pillow,
# opencv-python-headless, imageio, typing_extensions, the .simpkgs wheels, this tree, zarr + its deps from wheels/,
# and torch (+ its deps, tqdm, pyyaml, packaging) on PYTHONPATH as the host has them:
#   MUJOCO_GL=egl PYTHONPATH=$PWD:<torch dir> python -m chunkpolicy.sim.collect --env aloha \
#       --tasks transfer-cube,insertion --episodes 2 --out /tmp/x.zarr --workers 1      # -> 4/4 expert successes
# and the episodes are bit-identical (actions, states, frames) to the full install's. gym_aloha's own
# gym.make("gym_aloha/AlohaTransferCube-v0") (480x640 frames) works too, without torch.
set -euo pipefail
SITE=${1:+$(realpath "$1")}
OUT=${2:+$(realpath -m "$2")}
cd "$(dirname "$0")/.."
SITE=${SITE:-$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')}
OUT=${OUT:-$PWD/.simpkgs/aloha_pruned.tar.xz}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

copy() {  # copy SITE/$1 (file or tree) into the staging dir, without caches and tests
  local src=$SITE/$1
  [ -e "$src" ] || { echo "missing: $src" >&2; exit 1; }
  mkdir -p "$tmp/$(dirname "$1")"
  cp -r "$src" "$tmp/$1"
}

copy gym_aloha
copy dm_control/__init__.py
copy dm_control/_render
copy dm_control/rl/__init__.py
copy dm_control/rl/control.py
copy dm_control/suite/base.py
copy dm_control/utils
copy dm_env
copy absl
mkdir -p "$tmp/dm_control/mujoco"
for f in "$SITE"/dm_control/mujoco/*.py; do copy "dm_control/mujoco/$(basename "$f")"; done
copy dm_control/mujoco/wrapper
cat > "$tmp/dm_control/suite/__init__.py" <<'EOF'
# Copyright 2017 The dm_control Authors. Licensed under the Apache License, Version 2.0.
"""dm_control.suite, pruned for gym-aloha by chunkpolicy's scripts/build_aloha_pruned.sh: only `suite.base` is
shipped. The original __init__ imports every suite domain (and scipy / lxml through them), which this copy lacks."""
EOF
for d in gym_aloha dm_control dm_env absl_py; do
  di=$(ls -d "$SITE"/${d}-*.dist-info | head -1)
  cp -r "$di" "$tmp/" && rm -f "$tmp/$(basename "$di")/RECORD" "$tmp/$(basename "$di")/direct_url.json"
done
rm -rf "$tmp/absl/testing"
find "$tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$tmp" \( -name "*_test.py" -o -name "_abstract_test_mixin.py" -o -name "test_utils.py" \) -delete
mkdir -p "$(dirname "$OUT")"
# fixed order, owner and times; the top-level names, not ".", so unpacking leaves site-packages' own mode alone
chmod -R u=rwX,go=rX "$tmp"
(cd "$tmp" && tar --sort=name --owner=0 --group=0 --numeric-owner --mtime='2024-01-01 00:00Z' -cf - -- *) \
  | xz -9e -T1 > "$OUT.tmp" && mv "$OUT.tmp" "$OUT"  # never a truncated tarball under the real name
echo "$OUT: $(du -h "$OUT" | cut -f1) ($(du -sh "$tmp" | cut -f1) unpacked, $(find "$tmp" -type f | wc -l) files)"
