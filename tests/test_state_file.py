"""The client-state store on disk (``ClientStateStore.spill_to``): equal to the RAM store, no
rows in RAM, checkpoints refer to records that are never overwritten, exact resume from the
older of two checkpoints and after a kill, a damaged or missing file is one line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fl_lightning.algorithms import SCAFFOLD, FedDyn
from fl_lightning.algorithms.state import ClientStateStore
from fl_lightning.algorithms.state_file import HEADER, StateFileError
from fl_lightning.engine import SequentialEngine
from fl_lightning.engines import BatchedEngine
from fl_lightning.testing import ROUNDS, _problem, _run

RECORD = 3 * 4 * 4 + 4 * 8 + 2 * 8  # float32 (3, 4), float64 (4,), int64 (2,)


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"c_i": {"w": torch.randn(3, 4, generator=g),
                    "b": torch.randn(4, generator=g, dtype=torch.float64)},
            "n": {"count": torch.randint(0, 1000, (2,), generator=g)}}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[e].keys() == b[e].keys() and all(torch.equal(a[e][k], b[e][k]) for k in a[e])
        for e in a)


def _stacked(seeds: list[int]) -> dict:
    states = [_state(s) for s in seeds]
    return {e: {k: torch.stack([s[e][k] for s in states]) for k in states[0][e]}
            for e in states[0]}


def _drive(store: ClientStateStore) -> None:
    """Puts, a scatter over old and new clients, rewrites: 40 clients in all."""
    for c in range(20):
        store.put(c, _state(c))
    store.scatter([3, 25, 7, 30], _stacked([103, 125, 107, 130]))
    for c in range(20, 40):
        if c not in (25, 30):
            store.put(c, _state(c))
    store.put(3, _state(203))


@pytest.mark.parametrize("budget", [0, 10 * RECORD], ids=["disk-from-the-start", "spill-at-16"])
def test_disk_store_equals_the_ram_store_and_holds_no_rows(budget, tmp_path):
    ram, disk = ClientStateStore(), ClientStateStore()
    disk.spill_to(str(tmp_path / "s.bin"), budget)
    _drive(ram)
    _drive(disk)
    assert disk.file == str(tmp_path / "s.bin") and ram.file is None
    assert disk._data == {} and disk._rows == {}  # nothing of the clients' state in RAM
    assert len(disk) == len(ram) == 40 and 25 in disk and 41 not in disk
    ids = [30, 3, 0, 39, 25]
    assert _equal(disk.gather(ids), ram.gather(ids))
    for c in range(40):
        assert _equal(disk.get(c, dict), ram.get(c, dict))
    assert disk.get(99, lambda: {"x": {}}) == {"x": {}}
    # no checkpoint refers to anything: rewrites go in place, one record per client
    for c in range(40):
        disk.put(c, _state(1000 + c))
    assert os.path.getsize(tmp_path / "s.bin") == HEADER + 40 * RECORD
    # a RAM checkpoint (copied state) loads into a store on disk, and the other way round
    moved = _fresh(tmp_path, "from_ram.bin")
    moved.load_state_dict(ram.state_dict())
    back = ClientStateStore()
    back.load_state_dict(moved.state_dict())
    assert moved.file is not None and back.file is None and len(moved) == len(back) == 40
    assert _equal(moved.gather(ids), ram.gather(ids)) and _equal(back.gather(ids), ram.gather(ids))
    with pytest.raises(ValueError, match=r"c_i/w is \[4, 3\] torch.float32 but the store holds"):
        disk.put(1, {"c_i": {"w": torch.zeros(4, 3), "b": torch.zeros(4, dtype=torch.float64)},
                     "n": {"count": torch.zeros(2, dtype=torch.int64)}})


def _checkpoint(store: ClientStateStore, path: Path) -> dict:
    """What a checkpoint save does: snapshot, pin, write the file."""
    snap = store.state_dict()
    store.pin(str(path))
    torch.save(snap, path)
    return torch.load(path, weights_only=True)


def _fresh(tmp_path: Path, name: str) -> ClientStateStore:
    store = ClientStateStore()
    store.spill_to(str(tmp_path / name), 0)
    return store


def test_checkpoints_keep_their_records_and_resume_exactly(tmp_path):
    """Two kept checkpoints, writes after the newer one (a run killed later): loading either
    gives exactly its clients and values; later writes are not seen; records are reused once
    a checkpoint file is removed."""
    store = _fresh(tmp_path, "run.bin")
    for c in range(6):
        store.put(c, _state(c))
    older = _checkpoint(store, tmp_path / "round=1.ckpt")
    for c in range(4, 9):
        store.put(c, _state(100 + c))
    newer = _checkpoint(store, tmp_path / "round=2.ckpt")
    for c in range(0, 12):  # after the newest checkpoint; then the process is killed
        store.put(c, _state(500 + c))
    assert len(older["store"]["clients"]) == 6 and len(newer["store"]["clients"]) == 9
    for snap, expected in ((older, {c: c for c in range(6)}),
                           (newer, {**{c: c for c in range(4)},
                                    **{c: 100 + c for c in range(4, 9)}})):
        resumed = _fresh(tmp_path, f"resumed{len(expected)}.bin")
        resumed.load_state_dict(snap)
        assert sorted(resumed.state_dict()["store"]["clients"].tolist()) == sorted(expected)
        for c, seed in expected.items():
            assert _equal(resumed.get(c, dict), _state(seed)), c
        assert 10 not in resumed
        assert not os.path.exists(tmp_path / f"resumed{len(expected)}.bin")  # nothing written
        resumed.put(0, _state(7))  # a resumed run writes its own file, never the old one
        assert os.path.getsize(tmp_path / f"resumed{len(expected)}.bin") == HEADER + RECORD
    # a RAM store (library use, no file of its own) reads the snapshot in
    ram = ClientStateStore()
    ram.load_state_dict(older)
    assert ram.file is None and _equal(ram.get(5, dict), _state(5))
    size = os.path.getsize(tmp_path / "run.bin")
    assert size == HEADER + (6 + 5 + 12) * RECORD  # copy on write past each checkpoint
    store.unpin(str(tmp_path / "round=1.ckpt"))
    os.remove(tmp_path / "round=1.ckpt")
    store.unpin(str(tmp_path / "round=2.ckpt"))
    os.remove(tmp_path / "round=2.ckpt")
    for c in range(12):
        store.put(c, _state(900 + c))
    _checkpoint(store, tmp_path / "round=3.ckpt")
    for c in range(12):
        store.put(c, _state(950 + c))  # into the 11 records freed by the removed checkpoints
    assert os.path.getsize(tmp_path / "run.bin") == size + RECORD


def test_a_damaged_or_missing_store_file_is_one_line_and_left_as_it_is(tmp_path):
    store = _fresh(tmp_path, "run.bin")
    for c in range(3):
        store.put(c, _state(c))
    snap = _checkpoint(store, tmp_path / "a.ckpt")
    path = tmp_path / "run.bin"
    data = bytearray(path.read_bytes())
    data[HEADER + RECORD + 5] ^= 0xFF  # a byte inside client 1's record (record 1)
    path.write_bytes(bytes(data))
    resumed = _fresh(tmp_path, "resumed.bin")
    resumed.load_state_dict(snap)
    assert _equal(resumed.get(0, dict), _state(0))
    with pytest.raises(StateFileError) as err:
        resumed.get(1, dict)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "checksum" in message
    assert "resume from an older checkpoint, or restore the file" in message
    assert path.read_bytes() == bytes(data)  # nothing was written to it
    path.write_bytes(bytes(data[: HEADER + RECORD]))
    with pytest.raises(StateFileError, match="is truncated"):
        _fresh(tmp_path, "again.bin").load_state_dict(snap)
    path.unlink()
    with pytest.raises(StateFileError, match=r"run\.bin does not exist \(a checkpoint's client"):
        _fresh(tmp_path, "again.bin").load_state_dict(snap)


@pytest.mark.parametrize(("algorithm", "engine"), [(SCAFFOLD, BatchedEngine),
                                                   (FedDyn, SequentialEngine)],
                         ids=["scaffold-batched-gather-scatter", "feddyn-sequential-get-put"])
def test_scaffold_and_feddyn_are_bit_identical_on_disk(algorithm, engine, tmp_path):
    problem = _problem(None, 0)
    ram, disk = algorithm(), algorithm()
    disk.clients.spill_to(str(tmp_path / "c.bin"), 0)
    _, net_ram = _run(ram, engine(), problem, ROUNDS)
    _, net_disk = _run(disk, engine(), problem, ROUNDS)
    assert disk.clients.file is not None
    for (k, a), (_, b) in zip(net_ram.named_parameters(), net_disk.named_parameters(),
                              strict=True):
        assert torch.equal(a, b), k
    for c in range(6):
        assert _equal(ram.clients.get(c, lambda: {}), disk.clients.get(c, lambda: {})), c


def test_fit_on_disk_resumes_exactly_from_a_moved_run_folder_and_says_when_the_store_is_gone(
    tmp_path, monkeypatch, capsys
):
    """SCAFFOLD with every client's c_i on disk (--client_state_ram_mb 0): the checkpoints
    hold an index, not the state; resuming from the older of two kept checkpoints, after the
    run folder was moved and the store holds later writes, ends as the uninterrupted run; a
    checkpoint whose store is gone is refused with one line before anything runs."""
    from test_cli import FAST, QUICK, REPO

    from fl_lightning.cli import main

    monkeypatch.chdir(tmp_path)
    args = ["--config", QUICK, *FAST, "--config", str(REPO / "configs/algorithms/scaffold.yaml"),
            "--model.sample_ratio", "0.5", "--trainer.val_check_interval", "2",
            "--checkpoint_every_n_rounds", "2", "--keep_last_checkpoints", "5",
            "--trainer.max_steps", "4", "--client_state_ram_mb", "0"]
    main(["fit", *args, "--trainer.default_root_dir", "a"])
    run = tmp_path / "a/lightning_logs/fl/version_0"
    ckpt = torch.load(run / "checkpoints/round=4.ckpt", weights_only=True)
    ref = ckpt["fl_algorithm_state"]["clients"]["store"]
    assert "clients" not in ckpt["fl_algorithm_state"]["clients"]  # no copy of the state
    assert ref["files"] == [str(run / "client_state/algorithm.clients.bin")]
    assert len(ref["clients"]) > 10
    os.rename(tmp_path / "a", tmp_path / "moved")
    moved = tmp_path / "moved/lightning_logs/fl/version_0"
    main(["fit", *args, "--trainer.default_root_dir", "b",
          "--ckpt_path", str(moved / "checkpoints/round=2.ckpt")])
    resumed = torch.load(tmp_path / "b/lightning_logs/fl/version_0/checkpoints/round=4.ckpt",
                         weights_only=True)
    for k, w in ckpt["state_dict"].items():
        assert torch.equal(w, resumed["state_dict"][k]), k
    assert torch.equal(resumed["fl_algorithm_state"]["server"]["c"]["classifier.bias"],
                       ckpt["fl_algorithm_state"]["server"]["c"]["classifier.bias"])
    lonely = tmp_path / "copied.ckpt"
    lonely.write_bytes((moved / "checkpoints/round=2.ckpt").read_bytes())
    os.rename(tmp_path / "moved", tmp_path / "gone")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args, "--trainer.default_root_dir", "c", "--ckpt_path", str(lonely)])
    [err] = [line for line in capsys.readouterr().err.splitlines() if "fl-lightning" in line]
    assert stop.value.code == 2
    assert err.startswith(f"fl-lightning: error: --ckpt_path={lonely}: client-state file ")
    assert "copied without that folder cannot resume" in err
    assert "algorithm.clients.bin does not exist" in err and not (tmp_path / "c").exists()
