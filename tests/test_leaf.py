"""LEAF JSON datasets, their models, the lazy round path and the synthetic population, on tiny
files written in LEAF's real format (``datafiles.write_leaf``)."""

from __future__ import annotations

import json
import sys
from functools import partial

import numpy as np
import pytest
import torch
from datafiles import LEAF_CHARS, write_leaf
from torch import nn

from fl_lightning.algorithms import SCAFFOLD
from fl_lightning.cli import main
from fl_lightning.data.leaf import SENT140_WORDS, sent140_tokens
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.data.population import MAX_SIZE, TEST_CLIENTS, SyntheticPopulation
from fl_lightning.engine import SequentialEngine
from fl_lightning.engines import BatchedEngine
from fl_lightning.errors import ConfigError, DataNotFoundError
from fl_lightning.models import CharLSTM
from fl_lightning.models.leaf import UnrolledLSTM
from fl_lightning.module import FederatedModule
from fl_lightning.systems import LabelFlip, Systems

SIZES = {"f0003_12": 7, "f0001_40": 3, "f0107_00": 5}


def _dm(root, name, num_clients=3, **kw) -> FederatedDataModule:
    dm = FederatedDataModule(dataset=name, data_dir=str(root), partition="natural",
                             num_clients=num_clients, **kw)
    dm.setup("fit")
    return dm


# ----------------------------------------------------------------------------- loaders
def test_femnist_uint8_lossless_users_and_test_parts(tmp_path):
    written = write_leaf(tmp_path, "femnist", SIZES, {"f0001_40": 2, "f0003_12": 1, "x9": 4})
    dm = _dm(tmp_path, "femnist")
    assert dm.train_x.dtype == torch.uint8 and dm.input_scale == 255.0  # k / 255: lossless
    assert dm.leaf_users == list(SIZES) and dm.client_sizes == [7, 3, 5]
    x, y = dm.train_tensors()
    assert x.shape == (15, 1, 28, 28) and x.dtype == torch.float32
    want = np.asarray(written["train"]["f0001_40"]["x"], dtype=np.float32).reshape(3, 1, 28, 28)
    got = x[dm.client_indices[1]].numpy()
    assert np.abs(got - want).max() < 1e-7
    assert y[dm.client_indices[2]].tolist() == written["train"]["f0107_00"]["y"]
    # the test split: every test user's samples (x9 has no training data), each client's own
    assert len(dm.test_y) == 7 and [len(p) for p in dm.test_parts] == [1, 2, 0]
    tx, _ = dm.test_tensors()
    assert tx.dtype == torch.float32 and float(tx.max()) <= 1.0


def test_standard_library_json_gives_the_same_arrays(tmp_path, monkeypatch):
    from fl_lightning.data.leaf import load_leaf

    write_leaf(tmp_path, "synthetic_leaf", SIZES)
    fast = load_leaf("synthetic_leaf", str(tmp_path), "train")
    monkeypatch.setitem(sys.modules, "orjson", None)  # import orjson -> ImportError
    plain = load_leaf("synthetic_leaf", str(tmp_path), "train")
    assert np.array_equal(fast.x, plain.x) and np.array_equal(fast.y, plain.y)
    assert fast.users == plain.users and np.array_equal(fast.offsets, plain.offsets)


def test_femnist_not_multiples_of_255_float16(tmp_path):
    write_leaf(tmp_path, "femnist", {"u": 2})
    path = next((tmp_path / "femnist" / "train").glob("*.json"))
    doc = json.loads(path.read_text())
    doc["user_data"]["u"]["x"][0][0] = 0.3  # not k / 255
    path.write_text(json.dumps(doc))
    dm = _dm(tmp_path, "femnist", num_clients=1)
    assert dm.train_x.dtype == torch.float16 and dm.input_scale == 1.0
    assert abs(float(dm.train_tensors()[0][0, 0, 0, 0]) - 0.3) < 2e-4


def test_shakespeare_characters_and_next_char(tmp_path):
    written = write_leaf(tmp_path, "shakespeare", SIZES)
    dm = _dm(tmp_path, "shakespeare")
    x, y = dm.train_tensors(dtype=torch.float32)  # a float dtype leaves token ids alone
    assert x.dtype == torch.int64 and x.shape == (15, 1, 1, 80) and dm.num_classes == 80
    text = written["train"]["f0003_12"]["x"][4]
    assert "".join(LEAF_CHARS[i] for i in x[4].flatten().tolist()) == text
    assert LEAF_CHARS[int(y[4])] == written["train"]["f0003_12"]["y"][4]


def test_sent140_vocabulary_from_the_training_split(tmp_path):
    written = write_leaf(tmp_path, "sent140", SIZES)
    dm = _dm(tmp_path, "sent140")
    x, y = dm.train_tensors()
    assert x.dtype == torch.int64 and x.shape == (15, 1, 1, SENT140_WORDS)
    vocab = dm.leaf_vocab
    assert min(vocab.values()) == 2 and "good" in vocab and "." in vocab
    tweet = written["train"]["f0001_40"]["x"][2][4]
    words = sent140_tokens(tweet)[:SENT140_WORDS]
    row = x[dm.client_indices[1][2]].flatten().tolist()
    assert row[:len(words)] == [vocab[w] for w in words]
    assert row[len(words):] == [0] * (SENT140_WORDS - len(words))  # padding
    assert y[dm.client_indices[1]].tolist() == written["train"]["f0001_40"]["y"]


def test_synthetic_leaf_and_first_clients_note(tmp_path, capsys):
    written = write_leaf(tmp_path, "synthetic_leaf", SIZES)
    dm = _dm(tmp_path, "synthetic_leaf", num_clients=2)
    assert "the first 2 of 3 users" in capsys.readouterr().err
    x, y = dm.train_tensors()
    assert x.shape == (10, 1, 1, 60) and dm.client_sizes == [7, 3]
    assert np.allclose(x[0].flatten().numpy(), written["train"]["f0003_12"]["x"][0], atol=1e-6)


BAD = [
    ("missing", None, "missing folder"),
    ("notjson", lambda p, d: p.write_text("{not json"), "is not a readable LEAF JSON file"),
    ("nokey", lambda p, d: p.write_text(json.dumps({"users": [], "num_samples": []})),
     "has no key 'user_data'"),
    ("count", lambda p, d: (d["num_samples"].__setitem__(0, 99), p.write_text(json.dumps(d))),
     "num_samples says 99 for user"),
    ("empty", lambda p, d: (d["num_samples"].__setitem__(0, 0),
                            d["user_data"][d["users"][0]].update(x=[], y=[]),
                            p.write_text(json.dumps(d))), "has 0 samples"),
    ("twice", lambda p, d: (d["users"].append(d["users"][0]), d["num_samples"].append(
        d["num_samples"][0]), p.write_text(json.dumps(d))), "user_data["),
    ("char", lambda p, d: (d["user_data"][d["users"][0]]["x"].__setitem__(
        0, "~" * 80), p.write_text(json.dumps(d))), "character '~' is not in LEAF's"),
]


@pytest.mark.parametrize(("case", "spoil", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_files_one_line(tmp_path, case, spoil, needle):
    write_leaf(tmp_path, "shakespeare", SIZES, files=1)
    path = next((tmp_path / "shakespeare" / "train").glob("*.json"))
    if spoil is None:
        for f in path.parent.iterdir():
            f.unlink()
        path.parent.rmdir()
    else:
        spoil(path, json.loads(path.read_text()))
    with pytest.raises(DataNotFoundError) as info:
        _dm(tmp_path, "shakespeare")
    line = str(info.value)
    assert needle in line and "\n" not in line
    assert (str(path) in line) if spoil is not None else "shakespeare/train" in line


def test_user_in_two_files_and_too_many_clients(tmp_path):
    write_leaf(tmp_path, "synthetic_leaf", SIZES, files=3)
    with pytest.raises(ConfigError, match=r"num_clients=4 is more than the 3 users"):
        _dm(tmp_path, "synthetic_leaf", num_clients=4)
    first, second = sorted((tmp_path / "synthetic_leaf" / "train").glob("*.json"))[:2]
    doc = json.loads(second.read_text())
    doc["users"][0] = "f0003_12"  # the first file's user
    doc["user_data"]["f0003_12"] = doc["user_data"].pop("f0001_40")
    second.write_text(json.dumps(doc))
    with pytest.raises(DataNotFoundError, match="is also in .*" + first.name):
        _dm(tmp_path, "synthetic_leaf")


# ----------------------------------------------------------------------------- the lazy path
def test_lazy_plan_visits_the_eager_samples_in_the_eager_order(tmp_path):
    write_leaf(tmp_path, "femnist", {f"u{i}": 3 + i for i in range(6)})
    dm = _dm(tmp_path, "femnist", num_clients=6)
    plan = dm.round_plan(3, 4, local_epochs=2, batch_size=2)
    x_round, y_round = dm.round_tensors(plan, "cpu", torch.float32)
    x_all, y_all = dm.train_tensors()
    assert len(y_round) == sum(c.num_samples for c in plan.clients) < len(y_all)
    first = 0
    for c in plan.clients:
        eager = dm.client_batches(3, c.client_id, 2, 2)  # global indices, the eager order
        start = int(dm.client_indices[c.client_id][0])
        assert [(b - first + start).tolist() for b in c.batches] == [b.tolist() for b in eager]
        for lazy_b, eager_b in zip(c.batches, eager, strict=True):
            assert torch.equal(x_round[lazy_b], x_all[eager_b])
            assert torch.equal(y_round[lazy_b], y_all[eager_b])
        first += c.num_samples
    indices = dm.round_client_indices()
    c0 = plan.clients[0].client_id
    assert len(indices) == 6 and indices[c0].tolist() == list(range(plan.clients[0].num_samples))


def test_charlstm_batched_engine_equals_sequential(tmp_path):
    write_leaf(tmp_path, "shakespeare", SIZES)
    dm = _dm(tmp_path, "shakespeare")
    net = partial(CharLSTM, embed_dim=4, hidden_size=8)
    out = []
    for engine in (SequentialEngine(), BatchedEngine()):
        torch.manual_seed(0)
        module = FederatedModule(net=net, algorithm=SCAFFOLD(), num_classes=80,
                                 input_shape=(1, 1, 80), sample_ratio=1.0, local_epochs=1,
                                 batch_size=4, engine=engine).attach(dm)
        result = module.build_round(optimizer=module.configure_optimizers()).run(0)
        out.append(torch.cat([v.flatten() for v in result.global_after.values()]))
    assert torch.allclose(out[0], out[1], atol=1e-5)
    assert not torch.equal(out[0], torch.cat(
        [v.flatten() for v in result.global_before.values()]))


def test_unrolled_lstm_equals_torch_lstm_with_gradients():
    torch.manual_seed(1)
    ref = nn.LSTM(5, 7, 2, batch_first=True)
    mine = UnrolledLSTM(5, 7, 2)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, 5)
    ref(x)[0][:, -1].square().sum().backward()
    mine(x).square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), mine.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


# ----------------------------------------------------------------------------- population
def test_population_client_data_depends_on_its_id_only():
    big = SyntheticPopulation(100_000, seed=3)
    small = SyntheticPopulation(1_000, seed=3)
    assert np.array_equal(big.sizes[:1000], small.sizes)  # sizes: counter-based, per id
    assert big.sizes.max() <= MAX_SIZE and big.sizes.min() >= 50
    x1, y1 = small.client(7)
    big.clients([999, 5, 123])  # other clients generated first, in another order
    x2, y2 = big.client(7)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert not np.array_equal(big.client(8)[0][:1], x1[:1])
    assert not np.array_equal(SyntheticPopulation(10, seed=4).client(7)[0][:1], x1[:1])
    tx, ty = small.test_set()
    assert np.array_equal(big.test_set()[1], ty) and len(ty) > TEST_CLIENTS * 50 - 1


def test_population_generates_only_the_sampled_clients():
    counts = []
    for n in (1_000, 1_000_000):
        dm = FederatedDataModule(dataset="synthetic_population", partition="natural",
                                 num_clients=n, augment="none")
        dm.setup("fit")
        test_samples = dm.population.generated
        assert test_samples == len(dm.test_y)
        rounds = []
        for r in range(2):
            plan = dm.round_plan(r, 20, 1, 10)
            x, y = dm.round_tensors(plan, "cpu", torch.float32)
            rounds.append(sum(c.num_samples for c in plan.clients))
            assert len(y) == rounds[-1] and x.shape == (rounds[-1], 1, 1, 60)
        assert dm.population.generated - test_samples == sum(rounds) <= 2 * 20 * MAX_SIZE
        assert plan.num_clients == n and plan.total_samples == int(dm.population.sizes.sum())
        counts.append(dm.population.generated)
    with pytest.raises(ConfigError, match="synthetic_population .* has no whole training set"):
        dm.train_tensors()


def test_label_flip_reaches_the_round_tensors_of_malicious_sampled_clients():
    dm = FederatedDataModule(dataset="synthetic_population", partition="natural",
                             num_clients=40, augment="none")
    plan = dm.round_plan(0, 12, 1, 10)
    data = dm.round_tensors(plan, "cpu", torch.float32)
    systems = Systems(attack=LabelFlip(share=0.5))
    _, flipped = systems.training_data(data, dm.round_client_indices(), dm.seed, 10)
    bad = systems.malicious(dm.seed, 40)
    start = 0
    for c in plan.clients:
        rows = slice(start, start + c.num_samples)
        want = 9 - data[1][rows] if c.client_id in bad else data[1][rows]
        assert torch.equal(flipped[rows], want)
        start += c.num_samples
    assert any(c.client_id in bad for c in plan.clients) and start == len(flipped)


# ----------------------------------------------------------------------------- CLI
RUNS = [
    ("femnist", "fl_lightning.models.FEMNISTCNN", []),
    ("shakespeare", "fl_lightning.models.CharLSTM",
     ["--model.net.hidden_size", "16"]),  # the batched engine: the equality test above
    ("sent140", "fl_lightning.models.Sent140BoW", []),
    ("synthetic_leaf", "fl_lightning.models.LogisticRegression", []),
    ("synthetic_population", "fl_lightning.models.LogisticRegression",
     ["--data.num_clients", "100000", "--model.sample_ratio", "0.00005",
      "--model.batch_size", "1000", "--model.algorithm", "SCAFFOLD"]),
]


@pytest.mark.parametrize(("dataset", "net", "extra"), RUNS, ids=[r[0] for r in RUNS])
def test_two_rounds_through_the_cli(tmp_path, monkeypatch, capsys, dataset, net, extra):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["fl-lightning"])
    if dataset != "synthetic_population":
        write_leaf(tmp_path / "data", dataset, SIZES)
    main(["fit", "--data.dataset", dataset, "--data.data_dir", "data", "--data.partition",
          "natural", "--data.num_clients", "3", "--model.net", net, "--model.sample_ratio",
          "0.67", "--model.local_epochs", "1", "--model.batch_size", "8",
          "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false",
          "--trainer.enable_model_summary", "false", "--trainer.enable_checkpointing", "false",
          *extra])
    logs = sorted(tmp_path.glob("lightning_logs/fl/version_*"))
    metrics = json.loads((logs[-1] / "final_metrics.json").read_text())
    assert metrics["rounds"] == 2 and np.isfinite(metrics["test_loss"])
    assert "after 2 rounds" in capsys.readouterr().out
