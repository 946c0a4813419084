# Source me: runtime environment for fast, headless CPU runs.
for lib in /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 /usr/lib/aarch64-linux-gnu/libjemalloc.so.2; do
  [ -e "$lib" ] && export LD_PRELOAD="$lib" && break
done
export MUJOCO_GL=${MUJOCO_GL:-egl}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=false
