"""The end-to-end network: a MONAI ResNet on the crop, optionally fused late with the clinical predictors.

`build_network` makes a `FusionNet`: MONAI's ResNet 10/18/34 (`monai.networks.nets.ResNet`, 3D for dims 3, 2D for
dims 2) without its classifier (feed_forward=False: the global average pool after layer4 is the image embedding),
with `widen_factor` and the stride of its first convolution (`stem_stride`) from the config. With clinical
predictors (`cnn_clinical`), a small MLP (Linear(n_clinical, clinical_hidden) -> ReLU -> Dropout) maps them to a
vector concatenated with the (dropped-out) image embedding before one Linear head (late fusion, as seeds 000 and
003 do). The head gives one number per row: a logit (binary endpoint) or a log relative risk (survival).

The shortcut of each depth follows the layout of the checkpoints the config may name: MedicalNet's (Med3D) for
dims 3 (resnet10: 1x1 convolution + BatchNorm without bias; resnet18/34: zero-padding shortcut "A", no
parameters), torchvision's for dims 2 (1x1 convolution + BatchNorm without bias). The state-dict keys of the
backbone are then those of the published files (conv1, bn1, layer1-4; their heads conv_seg / fc are not used),
so `load_pretrained` reads them without renaming.

`load_pretrained` reads a checkpoint with `radstudy.torch_tools.read_state_dict` (top level or under
`state_dict` / `model`, `module.` prefixes removed) and loads it with `torch_tools.load_backbone`: strict on
every backbone key, heads ignored, a mismatch raises `ModelError` (a ValueError) naming the file and the
missing / unexpected keys or wrong shapes. The fusion MLP and the head keep their random initialisation.

First convolution: a checkpoint made for c input channels (MedicalNet 1, torchvision 3) is adapted to the
network's k channels (the crop's channels, plus the mask channel) by the rule of `adapt_first_conv`: every new
input channel gets the mean of the checkpoint's input-channel kernels times c / k. An image given identically in
all k channels then gives exactly the first-layer response the checkpoint gives to that image in all c channels
(the sum of the kernels is kept), and no channel is favoured. With c == k the weights are loaded as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import ResNet
from torch import nn

from radstudy.torch_tools import file_sha256, load_backbone, read_state_dict

# depth -> (layers per stage, shortcut, bias of a convolutional shortcut) in the checkpoints' layouts
LAYOUT_3D = {"resnet10": ((1, 1, 1, 1), "B", False), "resnet18": ((2, 2, 2, 2), "A", True),
             "resnet34": ((3, 4, 6, 3), "A", True)}  # MedicalNet (as monai.networks.nets.resnet_params)
LAYOUT_2D = {"resnet10": ((1, 1, 1, 1), "B", False), "resnet18": ((2, 2, 2, 2), "B", False),
             "resnet34": ((3, 4, 6, 3), "B", False)}  # torchvision
PLANES = (64, 128, 256, 512)
FIRST_CONV = "conv1.weight"


class FusionNet(nn.Module):
    """Image backbone (+ clinical MLP) -> one score per row. forward(image, clinical=None) -> (N,)."""

    def __init__(self, backbone: nn.Module, n_features: int, n_clinical: int, clinical_hidden: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.n_clinical = int(n_clinical)
        self.dropout = nn.Dropout(dropout)
        self.clinical = (nn.Sequential(nn.Linear(n_clinical, clinical_hidden), nn.ReLU(), nn.Dropout(dropout))
                         if n_clinical > 0 else None)
        self.head = nn.Linear(n_features + (clinical_hidden if n_clinical > 0 else 0), 1)

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """The image embedding (N, features): the backbone's global average pool after layer4."""
        return self.backbone(image)

    def forward(self, image: torch.Tensor, clinical: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(fuse_clinical(self.dropout(self.embed(image)), clinical, self.clinical,
                                       self.n_clinical)).squeeze(1)


def fuse_clinical(image_features: torch.Tensor, clinical: torch.Tensor | None, mlp: nn.Module | None,
                  n_clinical: int) -> torch.Tensor:
    """Late fusion: the image features joined with the clinical MLP's output (`mlp` None: an image-only network,
    which takes no clinical data). A clear error when clinical data are missing, of another width, or given to an
    image-only network."""
    if mlp is None:
        if clinical is not None:
            raise ValueError("this network has no clinical input (an image-only model), but clinical data was given")
        return image_features
    if clinical is None or clinical.shape[-1] != n_clinical:
        got = "none" if clinical is None else clinical.shape[-1]
        raise ValueError(f"this network fuses {n_clinical} clinical predictors, got {got}")
    return torch.cat([image_features, mlp(clinical)], dim=1)


def build_network(cfg: dict, in_channels: int, n_clinical: int = 0) -> FusionNet:
    """A `FusionNet` as `cfg` (the `networks` settings) describes it, for `in_channels` input channels."""
    dims = int(cfg["dims"])
    layers, shortcut, bias = (LAYOUT_3D if dims == 3 else LAYOUT_2D)[cfg["architecture"]]
    backbone = ResNet("basic", list(layers), list(PLANES), spatial_dims=dims, n_input_channels=int(in_channels),
                      conv1_t_stride=int(cfg["stem_stride"]), shortcut_type=shortcut, bias_downsample=bias,
                      widen_factor=float(cfg["widen_factor"]), feed_forward=False)
    n_features = int(PLANES[-1] * float(cfg["widen_factor"]))
    return FusionNet(backbone, n_features, int(n_clinical), int(cfg["clinical_hidden"]), float(cfg["dropout"]))


def adapt_first_conv(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """The first convolution's kernels (out, c, *k) for `in_channels` inputs: the mean over the c input channels,
    repeated in_channels times and scaled by c / in_channels (see the module docstring)."""
    given = weight.shape[1]
    if given == in_channels:
        return weight
    mean = weight.mean(dim=1, keepdim=True) * (given / in_channels)
    return mean.repeat(1, in_channels, *([1] * (weight.dim() - 2))).contiguous()


def load_pretrained(net: FusionNet, path: str | Path, *, dims: int) -> dict:
    """Load a pretrained backbone (MedicalNet layout for dims 3, torchvision for dims 2) into `net` in place.

    Returns a report: file, sha256, layout, backbone keys loaded, checkpoint keys ignored (heads) and the first
    convolution's adaptation. Raises ModelError naming the file and the keys that do not fit."""
    if dims != net.backbone.conv1.weight.dim() - 2:
        raise ValueError(f"load_pretrained: dims {dims} for a {net.backbone.conv1.weight.dim() - 2}D network")
    state = read_state_dict(path)
    in_channels = net.backbone.conv1.weight.shape[1]
    adaptation = "none"
    if FIRST_CONV in state and state[FIRST_CONV].dim() == net.backbone.conv1.weight.dim():
        given = state[FIRST_CONV].shape[1]
        if given != in_channels:
            state[FIRST_CONV] = adapt_first_conv(state[FIRST_CONV], in_channels)
            adaptation = f"{given} -> {in_channels} input channels (mean kernel x {given}/{in_channels})"
    layout = "MedicalNet" if dims == 3 else "torchvision"
    load_backbone(net.backbone, state, path, f"{layout} layout of the {dims}D backbone")
    expected = net.backbone.state_dict()
    return {"file": str(path), "sha256": file_sha256(path), "layout": layout,
            "loaded": sum(k in state for k in expected), "ignored": sorted(k for k in state if k not in expected),
            "first_conv": adaptation}
