"""The run-once step shared by the table scripts: run a CLI command, keep its log and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping


def run_cached(cmd: list[str], out_dir: str, label: str, metrics: Mapping[str, str]) -> dict:
    """Run ``cmd`` once with its output under ``out_dir``; later calls read ``result.json``.

    ``metrics`` maps a JSON file the run writes (e.g. ``final_metrics.json``) to the key it is
    stored under in the result. The first one's ``test_acc`` is printed with ``label``.
    """
    done = os.path.join(out_dir, "result.json")
    if os.path.exists(done):
        return json.load(open(done))
    os.makedirs(out_dir, exist_ok=True)
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    seconds = time.time() - start
    with open(os.path.join(out_dir, "log.txt"), "w") as fh:
        fh.write(proc.stdout + proc.stderr)
    result: dict = {"cmd": cmd, "seconds": seconds, "rc": proc.returncode}
    for root, _, files in os.walk(out_dir):
        for name, key in metrics.items():
            if name in files:
                result[key] = json.load(open(os.path.join(root, name)))
    json.dump(result, open(done, "w"), indent=2)
    first = next(iter(metrics.values()))
    print(f"{label}: rc={proc.returncode} {seconds:.0f}s "
          f"{result.get(first, {}).get('test_acc')}", flush=True)
    return result
