"""``chunkpolicy study``: run one row of a study, list a study's rows and their commands, aggregate the results.

    chunkpolicy study list --study configs/study/issue16.yaml
    chunkpolicy study run 4a-mt10-flow_expert --study configs/study/issue16.yaml [--force]
    chunkpolicy study aggregate benchmarks/results/study [--out DIR] [--study FILE] [--compare A:B]
    chunkpolicy study collect fetch aloha_4c --study configs/study/issue16.yaml   # data sources only

``run`` is resumable: rerunning a row continues its collection, training (from the latest checkpoint) and
evaluations; a row whose results JSON exists is skipped unless ``--force``. ``--session-minutes M`` ends a session
cleanly after about M minutes (exit code 3: not done yet), for machines lent in time slots::

    while chunkpolicy study run ROW --study FILE --session-minutes 8; [ $? -eq 3 ]; do :; done

Exit codes: 0 done, 1 a stage failed, 2 a bad study file or argument, 3 not done yet (session time up). Errors in the study file are one line
naming the key.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chunkpolicy study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or finish) one row; writes its results JSON")
    r.add_argument("row")
    r.add_argument("--study", required=True, help="study YAML (configs/study/*.yaml)")
    r.add_argument("--force", action="store_true", help="redo the row's evaluations and rewrite its results JSON")
    r.add_argument("--smoke", action="store_true",
                   help="the row at toy scale on this machine (2 tasks, 1 demo, 2 steps, 1 short episode; results in "
                        "OUT_DIR/smoke/): checks that it runs before it costs GPU time; its numbers mean nothing")
    r.add_argument("--session-minutes", type=float, default=None, metavar="M",
                   help="stop this session after about M minutes (training ends at its next step with a checkpoint; "
                   "exit code 3 = not done yet, run the same command again), e.g. to fit a row into machine time slots")
    r.add_argument("--eval-reserve-minutes", type=float, default=0.0, metavar="R",
                   help="with --session-minutes: start an evaluation only when at least R minutes of the session are "
                   "left (else exit 3 and evaluate in the next session)")
    ls = sub.add_parser("list", help="the study's rows: method, data, executor, done or not, command")
    ls.add_argument("--study", required=True)
    co = sub.add_parser("collect", help="collect (or resume) the named data sources only, e.g. on a machine whose "
                        "simulators the GPU host lacks; rows reuse a finished collection")
    co.add_argument("data", nargs="+", help="keys of the study's data")
    co.add_argument("--study", required=True)
    ag = sub.add_parser("aggregate", help="markdown tables and PNG plots from a folder of row results")
    ag.add_argument("dir")
    ag.add_argument("--out", default=None)
    ag.add_argument("--study", default=None, help="study YAML whose `comparisons` (row a − row b, paired) are tabulated")
    ag.add_argument("--compare", action="append", default=[], metavar="A:B", help="also compare row A with row B")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from chunkpolicy.study.config import StudyError, load_study

    try:
        if a.cmd == "aggregate":
            from chunkpolicy.study.aggregate import main as agg

            return agg([a.dir] + (["--out", a.out] if a.out else []) + (["--study", a.study] if a.study else [])
                       + [x for c in a.compare for x in ("--compare", c)])
        study = load_study(a.study)
        if a.cmd == "list":
            from chunkpolicy.study.runner import row_command, row_result_path

            for name, row in study.rows.items():
                done = "done" if row_result_path(study, name).is_file() else "todo"
                data = "+".join(d.name for d, _ in row.train_data) if row.mixture else row.data.name
                print(f"{done}  {row.group:<4} {name:<32} {row.label:<28} {data:<12} "
                      f"{row.eval['executor']:<18} {row_command(study, name)}")
            return 0
        if a.cmd == "collect":
            from chunkpolicy.study.runner import ensure_source

            bad = [d for d in a.data if d not in study.data]
            if bad:
                raise StudyError(f"data {bad[0]!r} is not in {study.path}; data: {sorted(study.data)}")
            for d in a.data:
                info = ensure_source(study.data[d])
                print(f"[data {d}] {info['episodes']} episodes, {info['frames']} frames in {info['store']}")
            return 0
        from chunkpolicy.study.runner import SessionLimit, run_row

        if a.smoke:
            from chunkpolicy.study.smoke import smoke_study

            study = smoke_study(study)

        try:
            run_row(study, a.row, force=a.force, session_minutes=a.session_minutes,
                    eval_reserve_minutes=a.eval_reserve_minutes)
        except SessionLimit as e:
            print(f"chunkpolicy study: not done yet ({e}); run the same command again to continue", file=sys.stderr)
            return 3
        return 0
    except (StudyError, FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"chunkpolicy study: error: {msg}", file=sys.stderr)
        return 2
    except (RuntimeError, FloatingPointError) as e:  # a stage failed (LeRobot's trainer, a diverged run, ...)
        print(f"chunkpolicy study: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
