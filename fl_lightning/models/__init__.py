"""Models of the FedSoL paper, each built as ``Net(num_classes, input_shape, ...)``.

The last child module of every model is its classifier head (FedSoL's head/body split).
"""

from fl_lightning.models.base import FederatedNet
from fl_lightning.models.cnn import FedAvgCNN
from fl_lightning.models.leaf import FEMNISTCNN, CharLSTM, Sent140BoW
from fl_lightning.models.linear import LogisticRegression
from fl_lightning.models.mlp import MLP2NN
from fl_lightning.models.pfl_cnn import PflSimpleCNN
from fl_lightning.models.resnet import ResNet18
from fl_lightning.models.vgg import VGG11
from fl_lightning.models.vit import SLViT

__all__ = ["FEMNISTCNN", "MLP2NN", "CharLSTM", "FedAvgCNN", "FederatedNet", "LogisticRegression",
           "PflSimpleCNN", "ResNet18", "SLViT", "Sent140BoW", "VGG11"]
