"""Small off-screen MuJoCo camera renderer shared by the MuJoCo adapters (Meta-World, Fetch).

``fast=True`` turns off shadows and multisampling on the model *before* the GL buffers are created; on a CPU
renderer (EGL/OSMesa llvmpipe) that makes a small frame ~5-8x cheaper and changes nothing a policy needs.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Any, Mapping

import numpy as np

from chunkpolicy.sim.base import setup_headless_gl

setup_headless_gl()

import mujoco  # noqa: E402  (MUJOCO_GL must be set before this import)

_LIVE: "weakref.WeakSet[CameraRenderer]" = weakref.WeakSet()
_ATEXIT = False


def _close_all() -> None:
    for r in list(_LIVE):
        r.close()


def make_fast(model: Any) -> None:
    """No shadows, no multisampling (must happen before a renderer is created for ``model``)."""
    model.light_castshadow[:] = 0
    model.vis.quality.offsamples = 0


class CameraRenderer:
    """Renders named cameras of one model at one size; each camera is a model camera name or an ``MjvCamera``.

    Args:
        model: ``mujoco.MjModel``.
        height, width: frame size.
        cameras: ``{key: camera}`` where ``camera`` is a camera name in the model or a ``mujoco.MjvCamera``.
        flip: keys whose frames are rotated by 180° (cameras mounted upside down).
        fast: turn off shadows and multisampling first (see module docstring).
    """

    def __init__(self, model: Any, height: int, width: int, cameras: Mapping[str, Any],
                 flip: tuple[str, ...] = (), fast: bool = True) -> None:
        global _ATEXIT
        if fast:
            make_fast(model)
        names = {model.camera(i).name for i in range(model.ncam)}
        for key, cam in cameras.items():
            if isinstance(cam, str) and cam not in names:
                raise ValueError(f"camera {key!r}: {cam!r} is not a camera of the model; cameras: {sorted(names)}")
        if max(height, width) > min(model.vis.global_.offheight, model.vis.global_.offwidth):
            model.vis.global_.offheight = max(model.vis.global_.offheight, height)
            model.vis.global_.offwidth = max(model.vis.global_.offwidth, width)
        self.cameras, self.flip = dict(cameras), set(flip)
        self.height, self.width = int(height), int(width)
        self._renderer: mujoco.Renderer | None = mujoco.Renderer(model, self.height, self.width)
        _LIVE.add(self)
        if not _ATEXIT:  # registered after the GL library's own exit hook, so it runs before the display goes away
            atexit.register(_close_all)
            _ATEXIT = True

    def render(self, data: Any, key: str) -> np.ndarray:
        """uint8 ``[h, w, 3]`` frame of camera ``key``."""
        if self._renderer is None:
            raise RuntimeError("CameraRenderer is closed")
        self._renderer.update_scene(data, camera=self.cameras[key])
        img = self._renderer.render()
        return np.ascontiguousarray(img[::-1, ::-1]) if key in self.flip else img.copy()

    def render_all(self, data: Any) -> dict[str, np.ndarray]:
        return {k: self.render(data, k) for k in self.cameras}

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def free_camera(lookat: tuple[float, float, float], distance: float, azimuth: float, elevation: float) -> Any:
    """A free ``MjvCamera`` looking at ``lookat`` (degrees for the angles)."""
    cam = mujoco.MjvCamera()
    cam.type = mujoco.mjtCamera.mjCAMERA_FREE
    cam.lookat[:] = lookat
    cam.distance, cam.azimuth, cam.elevation = distance, azimuth, elevation
    return cam
