#!/bin/bash
# Build the ignored folders that travel to a bare GPU host of the device tool (no network there), from PyPI and
# Debian, in a fresh checkout (they are not in git, so every new checkout has to rebuild them; ~2 minutes):
#   wheels/     what the host's image lacks or has in another version: transformers 5.5.4 + tokenizers 0.22.2 (the
#               host's transformers breaks SigLIP), diffusers, zarr + numcodecs / donfig / google-crc32c / msgspec,
#               omegaconf, websockets, importlib_metadata                                                   (~21 MiB)
#   .simpkgs/   mujoco 3.3.0, gymnasium 1.4.0 (+ farama-notifications), glfw, pyopengl wheels, and two site-packages
#               trees: metaworld_pruned.tar.xz (Meta-World 3.0.0 with only the asset files its 50 v3 tasks load) and
#               aloha_pruned.tar.xz (scripts/build_aloha_pruned.sh)                                          (~19 MiB)
#   .gl/        libEGL / libOpenGL / GLVND debs for MUJOCO_GL=egl                                            (<1 MiB)
#   wheels_lr/  lerobot 0.6.1 and what the host lacks of its imports (draccus, mergedeep, toml, termcolor, jsonlines,
#               datasets, dill, multiprocess, av 15.1.0: lerobot.datasets needs `av.option`, gone in av 19)  (~41 MiB)
# benchmarks/gpu_env.sh installs whatever of these was carried. The device tool carries at most 64 MiB with the working
# tree: wheels + .simpkgs + .gl for simulation (the study), wheels_lr alone in a call of its own (installed packages
# stay on a warm machine for the next call), see benchmarks/study_gpu.sh and benchmarks/import_equivalence.py.
#
#   bash scripts/build_gpu_carry.sh            # after scripts/setup.sh (uses .venv's versions of the sim packages)
#   bash scripts/build_gpu_carry.sh --xemb     # also runs/study/data/xemb_sims.tar.xz: the study's Fetch and ALOHA
#                                              # pretraining stores (Fetch's simulator is not on the host; ~3 min here)
set -euo pipefail
cd "$(dirname "$0")/.."
xemb=0; [ "${1:-}" = "--xemb" ] && xemb=1
PY=.venv/bin/python
[ -x "$PY" ] || { echo "run scripts/setup.sh first (.venv with the [sim] extra)" >&2; exit 1; }
SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any -q)
ver() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }

echo "[carry] wheels/"
$PY -m pip download "${plat[@]}" -d wheels "transformers==$(ver transformers)" "tokenizers==$(ver tokenizers)" \
  "diffusers==$(ver diffusers)" "zarr==$(ver zarr)" "numcodecs==$(ver numcodecs)" "donfig==$(ver donfig)" \
  "google-crc32c==$(ver google-crc32c)" "msgspec==$(ver msgspec)" "omegaconf==$(ver omegaconf)" \
  "websockets==$(ver websockets)" importlib_metadata

echo "[carry] wheels_lr/"
$PY -m pip download "${plat[@]}" -d wheels_lr "lerobot==$(ver lerobot)" "draccus==$(ver draccus)" \
  "mergedeep==$(ver mergedeep)" "toml==$(ver toml)" "termcolor==$(ver termcolor)" "jsonlines==$(ver jsonlines)" \
  "datasets==$(ver datasets)" "dill==$(ver dill)" "multiprocess==$(ver multiprocess)" "av==$(ver av)"

echo "[carry] .simpkgs/"
$PY -m pip download "${plat[@]}" -d .simpkgs "mujoco==$(ver mujoco)" "gymnasium==$(ver gymnasium)" \
  "farama-notifications==$(ver farama-notifications)" "glfw==$(ver glfw)" "pyopengl==$(ver pyopengl)"
bash scripts/build_aloha_pruned.sh

# Meta-World's assets are 39 MB, a third of them never loaded by the v3 tasks. Which files MuJoCo opens (in C, out of
# Python's sight) is read from access times: a copy of the package gets old times, the 50 tasks are built from the copy,
# and the files whose access time moved are kept. Then the pruned tree is checked by building the 50 tasks from it.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mwdist=$(basename "$(ls -d "$SITE"/metaworld-*.dist-info)")
mkdir -p "$work/copy" "$work/check"
cp -r "$SITE/metaworld" "$SITE/$mwdist" "$work/copy/"
find "$work/copy" -name __pycache__ -type d -prune -exec rm -rf {} +
find "$work/copy" -type f -exec touch -d '2000-01-01 00:00Z' {} +
build_all() {  # build and reset every v3 task with the metaworld package found first on PYTHONPATH=$1
  PYTHONPATH="$1:$PWD" MUJOCO_GL=${MUJOCO_GL:-egl} $PY -c "
import metaworld, sys
assert metaworld.__file__.startswith('$1'), metaworld.__file__
from chunkpolicy.sim import metaworld_env as m
tasks = sorted(metaworld.MT50().train_classes)
for t in tasks:
    e = m.make(t); e.reset(seed=0); e.render(); e.close()
print(len(tasks), 'tasks built from', '$1')"
}
build_all "$work/copy"
(cd "$work/copy" && {
  find metaworld -type f ! -path 'metaworld/assets/*' ! -path '*__pycache__*'
  find metaworld/assets -type f -newerat '2001-01-01'
  find "$mwdist" -type f ! -name RECORD ! -name direct_url.json
} | sort > "$work/files.txt")
kept=$(grep -c '^metaworld/assets/' "$work/files.txt" || true)
[ "$kept" -gt 0 ] || { echo "no asset file's access time moved (filesystem mounted noatime?)" >&2; exit 1; }
# written beside, checked, then renamed: a killed build never leaves a truncated tarball for gpu_env.sh to unpack
(cd "$work/copy" && tar --owner=0 --group=0 --numeric-owner -cf - -T "$work/files.txt") | xz -9 -T1 > .simpkgs/.metaworld_pruned.tar.xz.tmp
tar xJf .simpkgs/.metaworld_pruned.tar.xz.tmp -C "$work/check"
build_all "$work/check"
mv .simpkgs/.metaworld_pruned.tar.xz.tmp .simpkgs/metaworld_pruned.tar.xz
echo "[carry] .simpkgs/metaworld_pruned.tar.xz: $(du -h .simpkgs/metaworld_pruned.tar.xz | cut -f1), $kept asset files of $(find "$SITE/metaworld/assets" -type f | wc -l)"

echo "[carry] .gl/"
mkdir -p .gl "$work/apt/partial"
o=(-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists="$work/apt")
apt-get "${o[@]}" update -qq >/dev/null
(cd .gl && apt-get "${o[@]}" download libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 2>&1 | grep -v "^W:" || true)

if [ $xemb = 1 ]; then  # collected here, unpacked by benchmarks/study_gpu.sh on the host (a finished store is reused)
  echo "[carry] runs/study/data/xemb_sims.tar.xz"
  $PY -m chunkpolicy.study.cli collect fetch aloha_4c --study configs/study/issue16.yaml
  tar cJf runs/study/data/.xemb_sims.tar.xz.tmp -C runs/study/data fetch.zarr fetch.zarr.collect.json \
    aloha_4c.zarr aloha_4c.zarr.collect.json
  mv runs/study/data/.xemb_sims.tar.xz.tmp runs/study/data/xemb_sims.tar.xz
  du -sh runs/study/data/xemb_sims.tar.xz
fi
du -sh wheels wheels_lr .simpkgs .gl
