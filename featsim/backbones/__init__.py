"""Flax backbones that compute what torchvision's ImageNet models compute."""

from featsim import _guard  # noqa: F401  (first: names a namespace-package import)
from featsim.backbones.convert import (
    KeyMapping,
    abstract_variables,
    check_variables,
    convert_state_dict,
    torch_module_path,
)
from featsim.backbones.densenet import DenseNet
from featsim.backbones.efficientnet import EfficientNetLite
from featsim.backbones.inception import Inception3
from featsim.backbones.mobilenet import MobileNetV1, MobileNetV2
from featsim.backbones.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION_IMAGENET,
    Preprocessing,
)
from featsim.backbones.registry import (
    Backbone,
    convert_weights_file,
    get_backbone,
    list_backbones,
    load_pretrained,
    register_backbone,
)
from featsim.backbones.resnet import BasicBlock, Bottleneck, ResNet
from featsim.backbones.shufflenet import ShuffleNetV2
from featsim.backbones.small_cnn import ElAzhariCNN, SeparableConv2D
from featsim.backbones.tfjs import load_tfjs_mobilenet_v1, load_tfjs_weights
from featsim.backbones.vgg import VGG, adaptive_avg_pool
from featsim.backbones.weights import (
    WeightsSource,
    cache_dir,
    download_weights,
    find_local_weights,
    load_state_dict_file,
    load_variables,
    package_file,
    save_variables,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "TORCHVISION_IMAGENET",
    "VGG",
    "Backbone",
    "BasicBlock",
    "Bottleneck",
    "DenseNet",
    "EfficientNetLite",
    "ElAzhariCNN",
    "Inception3",
    "KeyMapping",
    "MobileNetV1",
    "MobileNetV2",
    "Preprocessing",
    "ResNet",
    "SeparableConv2D",
    "ShuffleNetV2",
    "WeightsSource",
    "abstract_variables",
    "adaptive_avg_pool",
    "cache_dir",
    "check_variables",
    "convert_state_dict",
    "convert_weights_file",
    "download_weights",
    "find_local_weights",
    "get_backbone",
    "list_backbones",
    "load_pretrained",
    "load_state_dict_file",
    "load_tfjs_mobilenet_v1",
    "load_tfjs_weights",
    "load_variables",
    "package_file",
    "register_backbone",
    "save_variables",
    "torch_module_path",
]
