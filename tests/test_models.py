"""Models of the paper: documented parameter counts, forward on 28 and 32 px inputs, the head as
the last child, and use through the functional local step."""

from __future__ import annotations

import pytest
import torch

from fl_lightning.algorithms import FedAvg
from fl_lightning.algorithms.base import LocalContext, head_parameter_names
from fl_lightning.models import MLP2NN, VGG11, FedAvgCNN, PflSimpleCNN, ResNet18, SLViT

CASES = [
    (FedAvgCNN, {}, (1, 28, 28), 1_664_970),
    (FedAvgCNN, {}, (3, 32, 32), 2_156_490),
    (MLP2NN, {}, (1, 28, 28), 199_210),  # McMahan et al.'s 2NN: 784-200-200-10
    (MLP2NN, {"hidden": 8}, (3, 8, 8), 1_706),
    (VGG11, {}, (3, 32, 32), 9_750_922),
    (VGG11, {}, (1, 28, 28), 9_750_922),
    (ResNet18, {"norm": "bn"}, (3, 32, 32), 11_173_962),
    (ResNet18, {"norm": "gn"}, (3, 32, 32), 11_173_962),
    (ResNet18, {"norm": "bn"}, (1, 28, 28), 11_173_962),
    (SLViT, {}, (3, 32, 32), 6_176_275),
    (SLViT, {}, (3, 28, 28), 6_132_625),
    (PflSimpleCNN, {}, (3, 32, 32), 1_626_442),  # pfl-research's simple_cnn: FC 12544 -> 128
    (PflSimpleCNN, {}, (1, 28, 28), 1_199_882),
]


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize(("cls", "kwargs", "shape", "params"), CASES)
def test_parameter_counts_forward_and_head(cls, kwargs, shape, params):
    torch.manual_seed(0)
    net = cls(10, shape, **kwargs)
    assert count(net) == params
    assert len(list(net.buffers())) == 0  # nothing but parameters to average
    with torch.no_grad():
        out = net(torch.randn(2, *shape))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    head = head_parameter_names(net)
    last = list(net.children())[-1]
    assert head and all(n.split(".")[0] == list(net.named_children())[-1][0] for n in head)
    assert isinstance(last, torch.nn.Linear) or isinstance(last[-1], torch.nn.Linear)


def test_num_classes_changes_only_the_head():
    assert count(ResNet18(9, (3, 28, 28))) - count(ResNet18(10, (3, 28, 28))) == -513
    assert count(SLViT(8, (1, 28, 28))) - count(SLViT(10, (1, 28, 28))) == -386


def test_grayscale_is_repeated_to_rgb():
    torch.manual_seed(0)
    net = ResNet18(10, (1, 28, 28), norm="gn")
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(net(x), net(x.expand(-1, 3, -1, -1)))


def test_batchnorm_uses_batch_statistics_in_eval():
    torch.manual_seed(0)
    net = ResNet18(10, (3, 16, 16), norm="bn").eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        alone = net(x[:1])
        together = net(x)[:1]
    assert not torch.allclose(alone, together)  # no running statistics


@pytest.mark.parametrize("cls", [VGG11, ResNet18, SLViT, MLP2NN])
def test_functional_local_step(cls):
    torch.manual_seed(0)
    shape = (3, 32, 32) if cls is VGG11 else (3, 16, 16)  # VGG11 resizes to 32x32 anyway
    net = cls(10, shape)
    params = {k: p.detach().clone() for k, p in net.named_parameters()}
    ctx = LocalContext(net=net, global_params=params, buffers={}, round=0, client_id=0, lr=0.1)
    x, y = torch.randn(2, *shape), torch.tensor([1, 7])
    direction, loss = FedAvg().direction(params, x, y, ctx)
    assert set(direction) == set(params) and torch.isfinite(loss)
    assert any(float(d.abs().sum()) > 0 for d in direction.values())


def test_invalid_arguments():
    with pytest.raises(ValueError, match="norm"):
        ResNet18(10, (3, 32, 32), norm="ln")
    with pytest.raises(ValueError, match="groups"):
        ResNet18(10, (3, 32, 32), norm="gn", groups=3)
    with pytest.raises(ValueError, match="patch_size"):
        SLViT(10, (3, 30, 30), patch_size=8)
    with pytest.raises(ValueError, match="input_shape"):
        VGG11(10, (2, 32, 32))
