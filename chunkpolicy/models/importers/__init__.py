"""Pretrained weights from other formats into chunkpolicy checkpoints: ``chunkpolicy model import SRC OUT --format F``.

Formats (``FORMATS``):

* ``lerobot-pi0`` / ``lerobot-pi05`` — a LeRobot 0.6.x ``PI0Policy`` / ``PI05Policy`` directory (``config.json``,
  ``model.safetensors``, ``policy_preprocessor.json`` / ``policy_postprocessor.json`` with their normalizer state
  files), see :mod:`.lerobot`. Weights, normalization stats and the embodiment (features) come across; the result
  gives the same action chunk as LeRobot for the same observation and initial noise (tested on random weights).
* ``openpi-pi0`` / ``openpi-pi05`` — openpi's PyTorch layout (its converter's ``model.safetensors`` + ``config.json``
  + ``assets/<asset_id>/norm_stats.json``), see :mod:`.openpi`; cameras and prompt length must be given.
* ``paligemma`` — a ``transformers`` PaliGemma directory (``save_pretrained`` output or a hub snapshot), see
  :mod:`.paligemma`: its config is read by ``transformers``' own ``PaliGemmaConfig``; the vision tower, projector and
  Gemma LM are loaded unchanged under a fresh head.
* ``siglip`` — a ``transformers`` SigLIP directory, see :mod:`.siglip`: its vision tower on the ``siglip`` backbone
  (light text embedding, no Gemma layers) under a fresh ``dit`` head.

:func:`export_lerobot_pi0` goes the other way for π0-shaped policies (a model post-trained here runs in LeRobot).

Every import returns an :class:`ImportReport` (what was mapped, what was left out and why, what was assumed) and
writes a normal checkpoint with :meth:`ChunkPolicy.save_pretrained` (temp directory, then rename). Nothing is
downloaded: sources are local directories.
"""

from __future__ import annotations

import os
from typing import Any

from chunkpolicy.models.importers.report import ImportReport

FORMATS = ("lerobot-pi0", "lerobot-pi05", "openpi-pi0", "openpi-pi05", "paligemma", "siglip")


def import_checkpoint(src: str | os.PathLike, out: str | os.PathLike, fmt: str, **options: Any) -> ImportReport:
    """Convert ``src`` (format ``fmt``) into a chunkpolicy checkpoint at ``out``; ``options`` go to the format's
    importer (:func:`.lerobot.import_lerobot_pi`, :func:`.paligemma.import_paligemma`)."""
    if fmt in ("lerobot-pi0", "lerobot-pi05"):
        from chunkpolicy.models.importers.lerobot import import_lerobot_pi

        return import_lerobot_pi(src, out, variant=fmt.split("-", 1)[1], **options)
    if fmt in ("openpi-pi0", "openpi-pi05"):
        from chunkpolicy.models.importers.openpi import import_openpi_pi

        return import_openpi_pi(src, out, variant=fmt.split("-", 1)[1], **options)
    if fmt == "paligemma":
        from chunkpolicy.models.importers.paligemma import import_paligemma

        return import_paligemma(src, out, **options)
    if fmt == "siglip":
        from chunkpolicy.models.importers.siglip import import_siglip

        return import_siglip(src, out, **options)
    raise ValueError(f"--format: unknown import format {fmt!r}; formats: {list(FORMATS)}")


def export_lerobot_pi0(policy: Any, out: str | os.PathLike, **options: Any) -> ImportReport:
    """A π0-shaped policy (or checkpoint directory) → LeRobot ``PI0Policy`` directory; see :mod:`.lerobot_export`."""
    from chunkpolicy.models.importers.lerobot_export import export_lerobot_pi0 as export

    return export(policy, out, **options)


__all__ = ["FORMATS", "ImportReport", "export_lerobot_pi0", "import_checkpoint"]
