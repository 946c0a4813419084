# Source me: runtime environment for fast, headless CPU runs.
for lib in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2; do
  [ -e "$lib" ] && export LD_PRELOAD="$lib" && break
done
export MUJOCO_GL=${MUJOCO_GL:-egl}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false
# OpenMP threads sleep instead of spinning while they wait: with more busy threads than cores (DataLoader or sim
# workers, two jobs at once) spinning made CPU training steps up to ~60x slower here (see README "Performance notes").
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
