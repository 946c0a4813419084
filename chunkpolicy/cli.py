"""The ``chunkpolicy`` console script: one entry point, subcommands delegate to their packages.

Subcommand modules are imported lazily so ``chunkpolicy data info`` does not pay for importing simulators or models.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence


def _data(args: argparse.Namespace) -> int:
    from chunkpolicy.data import commands

    if args.data_cmd == "info":
        print(commands.data_info(args.store))
    elif args.data_cmd == "import-lerobot":
        commands.cmd_import_lerobot(
            args.root, args.out, repo_id=args.repo_id, embodiment_name=args.embodiment, overwrite=args.overwrite,
            allow_metadata_mismatch=args.allow_metadata_mismatch,
        )
    elif args.data_cmd == "export-lerobot":
        commands.cmd_export_lerobot(args.store, args.root, repo_id=args.repo_id, use_videos=args.videos, overwrite=args.overwrite)
    elif args.data_cmd == "stats":
        commands.cmd_stats(args.store)
    elif args.data_cmd == "verify":
        return commands.cmd_verify(args.store, repair=args.repair)
    return 0


def _model(args: argparse.Namespace) -> int:
    if args.model_cmd == "import":
        from chunkpolicy.models.importers import import_checkpoint

        opts = {k: v for k, v in (("tokenizer", args.tokenizer), ("embodiment", args.embodiment),
                                  ("control_hz", args.control_hz), ("asset_id", args.asset_id),
                                  ("cameras", args.cameras.split(",") if args.cameras else None)) if v is not None}
        print(import_checkpoint(args.src, args.out, args.format, **opts).summary())
        return 0
    from chunkpolicy.models.info import format_model_info, model_info

    import yaml

    print(format_model_info(model_info(args.preset, yaml.safe_load(args.head))))  # a name or a {type: ..., ...} mapping
    return 0


def _forward(module: str) -> Callable[[list[str]], int]:
    """Subcommands that own their argument parsing (train, eval, collect, quickstart, tour, serve)."""

    def run(argv: list[str]) -> int:
        import importlib

        rc = importlib.import_module(module).main(argv)
        return rc if isinstance(rc, int) else 0  # some mains return a summary dict

    return run


FORWARDED = {
    "train": _forward("chunkpolicy.training.cli"),
    "eval": _forward("chunkpolicy.evaluation.cli"),
    "collect": _forward("chunkpolicy.sim.collect"),
    "quickstart": _forward("chunkpolicy.quickstart"),
    "tour": _forward("chunkpolicy.tour"),
    "study": _forward("chunkpolicy.study.cli"),
    "serve": _forward("chunkpolicy.serving.server"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chunkpolicy", description="Action-chunking robot policies.")
    sub = p.add_subparsers(dest="cmd", required=True)

    data = sub.add_parser("data", help="episode stores: info, LeRobot import/export, stats")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    info = dsub.add_parser("info", help="episodes, frames, keys, embodiment, fps, tasks of a store")
    info.add_argument("store")
    imp = dsub.add_parser("import-lerobot", help="LeRobotDataset v3 directory -> zarr episode store")
    imp.add_argument("root")
    imp.add_argument("out")
    imp.add_argument("--repo-id", default=None)
    imp.add_argument("--embodiment", default=None, help="embodiment name (default: from the dataset)")
    imp.add_argument("--overwrite", action="store_true", help="replace an existing store (only once the new one is complete)")
    imp.add_argument(
        "--allow-metadata-mismatch", action="store_true",
        help="import what the data holds when meta/info.json or meta/episodes disagree with it (warns); default: error",
    )
    exp = dsub.add_parser("export-lerobot", help="zarr episode store -> LeRobotDataset v3 directory")
    exp.add_argument("store")
    exp.add_argument("root")
    exp.add_argument("--repo-id", default=None)
    exp.add_argument("--videos", action="store_true", help="encode cameras as videos instead of images")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing dataset (only once the new one is complete)")
    st = dsub.add_parser("stats", help="compute and save exact normalization stats of a store")
    st.add_argument("store")
    ver = dsub.add_parser("verify", help="check every chunk (presence, checksum, decode), shapes, episode index, NaN/inf, "
                                         "stats freshness; exit 1 when anything is wrong")
    ver.add_argument("store")
    ver.add_argument("--repair", action="store_true", help="drop damaged tail episodes (only a contiguous tail; atomic)")
    data.set_defaults(func=_data)

    model = sub.add_parser("model", help="model presets")
    msub = model.add_subparsers(dest="model_cmd", required=True)
    minfo = msub.add_parser("info", help="parameter counts per component (built on the meta device)")
    minfo.add_argument("--preset", default="paligemma-3b")
    minfo.add_argument("--head", default="flow_expert", help="head name, or a typed config: '{type: dit, depth: 2}'")
    mimp = msub.add_parser("import", help="convert pretrained weights (LeRobot or openpi pi0 / pi05, PaliGemma, SigLIP) into a "
                                          "chunkpolicy checkpoint; prints what was mapped, left out and assumed")
    mimp.add_argument("src", help="local source directory (nothing is downloaded)")
    mimp.add_argument("out", help="checkpoint directory to write (atomically)")
    mimp.add_argument("--format", required=True, help="lerobot-pi0 | lerobot-pi05 | openpi-pi0 | openpi-pi05 | paligemma | siglip")
    mimp.add_argument("--tokenizer", default=None, help="local prompt tokenizer directory (LeRobot pi0/pi05: PaliGemma's)")
    mimp.add_argument("--embodiment", default=None, help="embodiment name for the imported policy (default: 'lerobot')")
    mimp.add_argument("--control-hz", type=float, default=None, help="control rate of the robot (LeRobot does not record it)")
    mimp.add_argument("--cameras", default=None, help="openpi: camera names in the model's order, comma-separated")
    mimp.add_argument("--asset-id", default=None, help="openpi: which assets/<id>/norm_stats.json (when there are several)")
    model.set_defaults(func=_model)

    for name in FORWARDED:
        sub.add_parser(name, help=f"{name} (see `chunkpolicy {name} --help`)", add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in FORWARDED:
        return FORWARDED[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, TimeoutError) as e:  # user errors (TimeoutError: a
        # store's write lock held by another process): one clear line, no traceback
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"chunkpolicy: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
