"""Simulator adapters (Meta-World, Fetch, Push-T), observation → batch conversion, a lockstep env pool and scripted-expert
collection. Importing this package needs no simulator; adapters import theirs when built (``make_env``)."""

from chunkpolicy.sim.base import EnvPool, SimEnv, env_spec, env_tasks, make_env, obs_to_batch

__all__ = ["EnvPool", "SimEnv", "env_spec", "env_tasks", "make_env", "obs_to_batch"]
