"""docs/extending.md runs as written: its code blocks are the files of docs/examples/, the
FedDC example (imported by path from a folder outside the package) passes the conformance kit,
every command line of the page resolves, and the last one fits."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest

from fl_lightning.cli import main
from fl_lightning.testing import check_algorithm

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "extending.md"
EXAMPLES = REPO / "docs" / "examples"


def _commands() -> list[list[str]]:
    """The page's command lines, as argument lists after ``python -m fl_lightning.cli``, with
    the repository's config paths made absolute."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.S):
        for command in block.replace("\\\n", " ").splitlines():
            words = shlex.split(command)
            if "fl_lightning.cli" in words:
                args = words[words.index("fl_lightning.cli") + 1:]
                out.append([str(REPO / a) if a.startswith("configs/") else a for a in args])
    return out


def test_the_code_blocks_are_the_example_files_verbatim():
    blocks = re.findall(r"<!-- file: (\S+) -->\n```python\n(.*?)```", DOC.read_text(), re.S)
    assert sorted(Path(p).name for p, _ in blocks) == sorted(
        p.name for p in EXAMPLES.glob("*.py"))
    for path, code in blocks:
        assert (REPO / path).read_text() == code, path


def test_feddc_written_outside_the_package_passes_the_conformance_kit(tmp_path):
    shutil.copy(EXAMPLES / "feddc.py", tmp_path / "my_feddc.py")
    spec = importlib.util.spec_from_file_location("my_feddc", tmp_path / "my_feddc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = check_algorithm(module.FedDC, {"alpha": 0.1})
    assert report["engines"] < 1e-12 and report["resume"] == 0.0
    assert report["skipped_client"] == 0.0 and report["proximal"] == "ok"


def test_the_command_lines_resolve_and_the_last_one_fits(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.chdir(tmp_path)
    *each, together = _commands()
    assert len(each) == 5 and together[0] == "fit"
    for args in each:  # every option and class path resolves (no fit)
        with pytest.raises(SystemExit) as done:
            main([*args, "--print_config"])
        assert done.value.code in (0, None), args
    printed = capsys.readouterr().out
    for path in ("feddc.FedDC", "round_log.UpdateNormLog", "tiny_net.TinyMLP",
                 "free_rider.FreeRider"):
        assert path in printed
    main(together)
    run = tmp_path / "lightning_logs" / "fl" / "version_0"
    rows = json.loads((run / "update_norms.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["global_update"] > 0 and r["client_update"] > 0 for r in rows)
    assert json.loads((run / "final_metrics.json").read_text())["rounds"] == 2
