"""``python -m fl_lightning.flower``: run the Flower app on a local SuperLink + SuperNodes.

Example::

    python -m fl_lightning.flower --supernodes 3 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from fl_lightning.flower.federation import LocalFederation

DEFAULT_APP = Path(__file__).resolve().parents[2] / "flower_app"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fl_lightning.flower",
        description="Start a SuperLink and N SuperNodes on 127.0.0.1 (one partition each), "
        "run the Flower app with `flwr run`, print the final accuracy, stop every process.",
    )
    parser.add_argument("--supernodes", type=int, default=3,
                        help="SuperNodes to start; must equal the config's --data.num_clients")
    parser.add_argument("--app", default=str(DEFAULT_APP), help="the Flower app folder")
    parser.add_argument("--rounds", type=int, default=5, help="communication rounds")
    parser.add_argument("--config", default=None,
                        help="an fl-lightning config (default: the app's fedsol_digits.yaml)")
    parser.add_argument("--args", default="", help="more fl-lightning options, one string")
    parser.add_argument("--data-dir", default=None, help="each SuperNode's dataset folder")
    parser.add_argument("--save-dir", default=None,
                        help="where final.pt and summary.json go (default: a new temp folder)")
    parser.add_argument("--workdir", default=None, help="Flower homes and logs")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads per process (as OMP_NUM_THREADS); the weights "
                        "equal a simulation's bit for bit with the same thread count")
    opts = parser.parse_args(argv)
    if opts.supernodes < 1:
        parser.error(f"--supernodes={opts.supernodes} is invalid: use an integer >= 1")
    if opts.threads < 1:
        parser.error(f"--threads={opts.threads} is invalid: use an integer >= 1")
    if opts.rounds < 1:
        parser.error(f"--rounds={opts.rounds} is invalid: use an integer >= 1")
    if not (Path(opts.app) / "pyproject.toml").is_file():
        parser.error(f"--app={opts.app} has no pyproject.toml: pass the flower_app folder")
    save_dir = os.path.abspath(opts.save_dir or tempfile.mkdtemp(prefix="fl-flower-result-"))
    if os.path.exists(os.path.join(save_dir, "summary.json")):
        parser.error(f"--save-dir={save_dir} already holds a summary.json: pick a new folder")
    run_config = {"rounds": opts.rounds, "args": opts.args, "save-dir": save_dir}
    if opts.config:
        run_config["config"] = os.path.abspath(opts.config)
    with LocalFederation(opts.supernodes, opts.workdir, data_dir=opts.data_dir,
                         threads=opts.threads) as fed:
        print(f"fl-lightning: SuperLink on 127.0.0.1:{fed.port}, {opts.supernodes} SuperNodes; "
              f"logs in {fed.workdir}", flush=True)
        fed.run(opts.app, run_config)
    summary = os.path.join(save_dir, "summary.json")
    if not os.path.isfile(summary):
        print(f"fl-lightning: error: the run did not finish (no {summary}); see the logs in "
              f"{fed.workdir}", file=sys.stderr)
        return 1
    with open(summary) as fh:
        result = json.load(fh)
    print(f"fl-lightning: final global test accuracy {result['test_acc']:.4f} after "
          f"{result['rounds']} rounds over {opts.supernodes} SuperNodes; saved {save_dir}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
