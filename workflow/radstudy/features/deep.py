"""Deep features: a torch network applied to the tumour region, its pooled activations as features.

Backbones (`features.deep.backbone`):

* ``nnunet`` (default): the study's own trained nnU-Net (or another nnU-Net model folder). The network is built
  from plans.json with nnU-Net's API (`radstudy.segment.nnunet.load_trained_network`, as `predict` uses: no trainer lookup by name, no timm or
  torchvision), the checkpoint's weights are loaded and only the encoder runs. The features are the global
  average pools of the deepest `nnunet_stages` encoder stages (the bottleneck and the skips above it),
  concatenated. A 2d network runs on every slice of the crop that holds the region and the pooled vectors are
  averaged over those slices. Intensities are normalised with the plans' scheme through nnU-Net's own
  normalisation classes (CT: clip to the foreground 0.5/99.5 percentiles, z-score with the foreground mean/std
  of `foreground_intensity_properties_per_channel`), on the whole image before the crop, as nnU-Net does.
* ``resnet3d``: a 3D ResNet as in MedicalNet (Med3D; depth 10/18/34/50; conv1 7x7x7 stride 2, max pool, layer1-4
  with strides 1/2/1/1 and dilations 1/1/2/4), loaded from a user checkpoint; feature = global average pool
  after layer4 (512 or 2048 values). Input: the crop clipped to `window` (HU) and z-scored within the crop.
* ``resnet2d``: an ImageNet ResNet (18/34/50; torchvision's architecture and state-dict key names, so
  torchvision's published .pth files load) on the region's largest axial slice, clipped to `window`, scaled to
  [0, 1], replicated to 3 channels, resampled to 224 x 224 and normalised with the ImageNet mean/std.

The architectures are plain torch (torchvision is not imported). Checkpoints may hold the state dict at the top
level or under ``state_dict`` (or ``model``), with ``module.`` prefixes (DataParallel); classification /
segmentation heads (``fc.*``, ``conv_seg.*``) are ignored, every backbone key must be present and nothing else:
a mismatch raises `DeepFeatureError` naming the file and the missing / unexpected keys.

The crop (`crop_region`): a grid of `crop_size` voxels (z, y, x) around the region's bounding box. With
`spacing` null, the grid is isotropic, just large enough to hold the box plus `margin_mm` on every side, and
centred on it (the tumour is never cut and never distorted); with `spacing` given (mm, z y x), the field of view
is crop_size x spacing centred on the box (absolute scale kept; a large tumour may be cut). Images are
interpolated linearly, the region mask linearly and thresholded at 0.5; outside the image the image minimum is used.

Channels that do not cover the reference grid come with a field-of-view mask (`fovs`, see
`radstudy.features.radiomics`). No voxel outside it reaches the network with its fill value: a crop voxel counts as
inside only when every image voxel its interpolation reads is inside (`valid_on_grid`; beyond the image's border is
outside), and every other crop voxel is set to the normalisation's neutral value, 0: the mean after MedicalNet's z-score (computed over the inside voxels of
the crop), the ImageNet mean colour after the ImageNet normalisation (resnet2d), the foreground mean after nnU-Net's
CT normalisation and the channel mean after its z-score, whose statistics come from the voxels inside the field of
view (nnU-Net's own convention for voxels outside its normalisation mask). Each channel gets its own field of view.
A region more than `radiomics.MAX_OUTSIDE_FOV` outside a channel's field of view is a bad region
(`outside_field_of_view`); otherwise the fractions of the region and of the crop outside it are recorded as a note
(`partly_outside_field_of_view`, with channel, outside_region, outside_crop).

Deterministic: eval mode, seeds set from the study seed, torch's deterministic algorithms (and cuDNN's), no
benchmark mode; the same inputs give identical features on the same device.

Bad input (empty or 1-voxel region, constant image, unreadable files, a failing forward pass) never raises:
the patient's deep features are NaN and an issue {patient, region, reason, message} is returned, as
`radstudy.features.radiomics.extract_patient` does for radiomics.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
from torch import nn

from radstudy.features import radiomics
from radstudy.torch_tools import (  # noqa: F401 (re-exported: the deep features' public names)
    HEAD_PREFIXES,
    ModelError,
    deterministic,
    file_sha256,
    load_backbone,
    read_state_dict,
    resolve_device,
)
from radstudy.images import largest_slice, same_grid
from radstudy.segment import nnunet as segment

log = logging.getLogger(__name__)

BACKBONES = ("nnunet", "resnet3d", "resnet2d")
RESNET_LAYERS = {10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
                 50: ("bottleneck", (3, 4, 6, 3))}
RESNET3D_DEPTHS = (10, 18, 34, 50)
RESNET2D_DEPTHS = (18, 34, 50)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE_2D = 224
NAME_TEMPLATE = "{region}_{channel}_deep_{backbone}_{index:04d}"


DeepFeatureError = ModelError  # the deep features' errors: a checkpoint, device or setting that does not fit


def feature_names(region: str, channel: str, backbone: str, n: int) -> list[str]:
    return [NAME_TEMPLATE.format(region=region, channel=channel, backbone=backbone, index=i) for i in range(n)]


# ============================================================================ ResNets (plain torch)
class _ZeroPadShortcut(nn.Module):
    """MedicalNet's shortcut type A: subsample by `stride`, zero channels appended (no parameters)."""

    def __init__(self, planes: int, stride: int):
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x):
        if self.stride != 1:
            x = x[(slice(None), slice(None)) + (slice(None, None, self.stride),) * (x.dim() - 2)]
        extra = self.planes - x.shape[1]
        if extra <= 0:
            return x
        return torch.cat([x, x.new_zeros((x.shape[0], extra, *x.shape[2:]))], dim=1)


class _BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, conv, norm, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv(inplanes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = norm(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, conv, norm, inplanes, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        self.conv1 = conv(inplanes, planes, 1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = conv(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = norm(planes)
        self.conv3 = conv(planes, planes * 4, 1, bias=False)
        self.bn3 = norm(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet backbone without its head; forward returns the global average pool after layer4 (N x features).

    dims=3: MedicalNet's 3D ResNet (1 input channel; layer strides 1/2/1/1, dilations 1/1/2/4; shortcut "A"
    (zero padding) or "B" (1x1x1 conv + BN)). dims=2: torchvision's ResNet (3 input channels, strides 1/2/2/2,
    stride on the 3x3 conv of bottlenecks, shortcut "B"). State-dict keys are those of the originals.
    """

    def __init__(self, depth: int, dims: int, *, in_channels: int | None = None, shortcut: str = "B"):
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise DeepFeatureError(f"ResNet depth {depth} is not one of {sorted(RESNET_LAYERS)}")
        if shortcut not in ("A", "B"):
            raise DeepFeatureError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        conv = nn.Conv3d if dims == 3 else nn.Conv2d
        norm = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
        pool = nn.MaxPool3d if dims == 3 else nn.MaxPool2d
        kind, layers = RESNET_LAYERS[depth]
        block = _BasicBlock if kind == "basic" else _Bottleneck
        strides, dilations = ((1, 2, 1, 1), (1, 1, 2, 4)) if dims == 3 else ((1, 2, 2, 2), (1, 1, 1, 1))
        self.depth, self.dims, self.shortcut = depth, dims, shortcut
        self.conv1 = conv(in_channels or (1 if dims == 3 else 3), 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = pool(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, n, stride, dilation) in enumerate(zip((64, 128, 256, 512), layers, strides, dilations)):
            blocks = []
            for b in range(n):
                downsample = None
                if b == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    if shortcut == "A":
                        downsample = _ZeroPadShortcut(planes * block.expansion, stride)
                    else:
                        downsample = nn.Sequential(conv(inplanes, planes * block.expansion, 1, stride=stride,
                                                        bias=False), norm(planes * block.expansion))
                blocks.append(block(conv, norm, inplanes, planes, stride if b == 0 else 1, dilation, downsample))
                inplanes = planes * block.expansion
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
        self.n_features = inplanes

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(x.mean(dim=tuple(range(2, x.dim()))), 1)


# ============================================================================ checkpoints
def _shortcut_of(state: Mapping[str, torch.Tensor]) -> str:
    """B when the checkpoint has convolutional shortcuts (layerN.0.downsample.0.weight), else A."""
    return "B" if any(re.fullmatch(r"layer\d\.0\.downsample\.0\.weight", k) for k in state) else "A"


# ============================================================================ device and determinism
# ============================================================================ crop
@dataclass
class Crop:
    image: np.ndarray  # float32, (z, y, x)
    mask: np.ndarray  # bool, (z, y, x)
    spacing: tuple[float, float, float]  # mm, z y x
    valid: np.ndarray | None = None  # bool (z, y, x): inside the field of view (`valid_on_grid`); None: no fov


# A crop voxel is inside the field of view when its interpolated field-of-view mask is 1, i.e. every voxel the
# linear interpolation reads is inside (the tolerance absorbs float rounding of the interpolation weights).
FOV_INSIDE = 1.0 - 1e-3


def crop_grid(reference: sitk.Image, region: np.ndarray, size: Sequence[int], spacing: Sequence[float] | None = None,
              margin_mm: float = 0.0) -> sitk.Image:
    """An empty image defining the crop's grid (see the module docstring); region: bool (z, y, x) on `reference`.
    Axes of size 1 keep the reference's spacing and sit at the box's centre (one slice)."""
    size = np.asarray([int(s) for s in size])
    source = np.asarray(reference.GetSpacing(), float)[::-1]  # z, y, x
    where = np.argwhere(region)
    lo, hi = where.min(0).astype(float), where.max(0).astype(float)
    centre = (lo + hi) / 2.0  # continuous index (z, y, x)
    if spacing is None:
        extent = (hi - lo + 1.0) * source + 2.0 * float(margin_mm)  # mm
        several = size > 1
        scale = float(np.max(extent[several] / size[several])) if several.any() else 1.0
        out = np.where(several, scale, source)
    else:
        out = np.where(size > 1, np.asarray(spacing, float), source)
    first = centre - (size - 1) / 2.0 * out / source  # continuous index of the first output voxel
    grid = sitk.Image([int(s) for s in size[::-1]], sitk.sitkUInt8)
    grid.SetSpacing([float(s) for s in out[::-1]])
    grid.SetDirection(reference.GetDirection())
    grid.SetOrigin(reference.TransformContinuousIndexToPhysicalPoint([float(c) for c in first[::-1]]))
    return grid


def resample_to(image: sitk.Image, grid: sitk.Image, fill: float) -> np.ndarray:
    out = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, float(fill),
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def region_on_grid(region: np.ndarray, reference: sitk.Image, grid: sitk.Image) -> np.ndarray:
    """The region resampled onto the crop grid (linear, >= 0.5); nearest neighbour if that leaves nothing."""
    image = sitk.GetImageFromArray(region.astype(np.float32))
    image.CopyInformation(reference)
    mask = resample_to(image, grid, 0.0) >= 0.5
    if not mask.any():
        out = sitk.Resample(image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
        mask = sitk.GetArrayFromImage(out) > 0
    return mask


def valid_on_grid(fov: np.ndarray | None, reference: sitk.Image, grid: sitk.Image) -> np.ndarray | None:
    """Crop voxels whose interpolation reads only voxels inside the field of view `fov` (bool (z, y, x) on
    `reference`; None: the channel covers the whole grid, None returned). Crop voxels beyond the image's border lie
    outside the field of view too (the image minimum that fills them could be the fill value)."""
    if fov is None:
        return None
    image = sitk.GetImageFromArray(fov.astype(np.float32))
    image.CopyInformation(reference)
    return resample_to(image, grid, 0.0) >= FOV_INSIDE


def crop_outside(valid: np.ndarray | None) -> float:
    """Fraction of a crop outside the field of view (0 without a field-of-view mask)."""
    return 0.0 if valid is None else 1.0 - float(valid.mean())


def crop_region(image: sitk.Image, region: np.ndarray, size: Sequence[int], spacing: Sequence[float] | None = None,
                margin_mm: float = 0.0, fill: float | None = None, fov: np.ndarray | None = None) -> Crop:
    """The image and region on the crop grid; outside the image `fill` (default: the image minimum). `fov`: the
    channel's field of view on the image grid; the crop's `valid` then tells which crop voxels lie inside it."""
    grid = crop_grid(image, region, size, spacing, margin_mm)
    if fill is None:
        fill = float(sitk.GetArrayViewFromImage(image).min())
    return Crop(resample_to(image, grid, fill), region_on_grid(region, image, grid),
                tuple(float(s) for s in grid.GetSpacing()[::-1]), valid_on_grid(fov, image, grid))


# ============================================================================ normalisation
def normalise_nnunet(array: np.ndarray, scheme: str, properties: Mapping[str, float] | None,
                     use_mask_for_norm: bool = False, valid: np.ndarray | None = None) -> np.ndarray:
    """One channel normalised as nnU-Net's preprocessing does: its normalisation class named in the plans
    (`normalization_schemes`), with the plans' foreground intensity properties of that channel. `valid`: the
    channel's field of view; the normalisation then runs on the voxels inside it only (its statistics too) and the
    others are 0, the neutral value (as nnU-Net leaves the voxels outside its normalisation mask)."""
    from nnunetv2.preprocessing.normalization import default_normalization_schemes as schemes

    cls = getattr(schemes, scheme, None)
    if not isinstance(cls, type) or not issubclass(cls, schemes.ImageNormalization):
        raise DeepFeatureError(f"nnU-Net normalisation scheme {scheme!r} is not one of nnunetv2's default schemes")
    normaliser = cls(use_mask_for_norm=bool(use_mask_for_norm), intensityproperties=dict(properties or {}))
    seg = None
    if use_mask_for_norm:
        from nnunetv2.preprocessing.cropping.cropping import create_nonzero_mask

        seg = np.where(create_nonzero_mask(array[None]), 0, -1).astype(np.int8)
    if valid is None:
        return normaliser.run(np.array(array, dtype=np.float32, copy=True), seg)
    out = np.zeros(array.shape, np.float32)
    out[valid] = normaliser.run(np.array(array[valid], dtype=np.float32), None if seg is None else seg[valid])
    return out


def window(array: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip(array.astype(np.float32), float(low), float(high))


def standardise(x: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """z-score of the crop (MedicalNet's input normalisation); with `valid`, statistics of the voxels inside the
    field of view only, and the others set to 0, the mean."""
    if valid is None:
        return (x - x.mean()) / max(float(x.std()), 1e-8)
    out = np.zeros_like(x)
    inside = x[valid]
    out[valid] = (inside - inside.mean()) / max(float(inside.std()), 1e-8)
    return out


# ============================================================================ extractors
class Extractor:
    """A backbone loaded once; `extract(images, region, fovs)` gives one patient's feature vector and how much of
    the crop lay outside each channel's field of view."""

    backbone: str
    n_features: int
    channels_used: int = 1  # how many of the study's channels the network reads (in order)
    meta: dict

    def __init__(self, cfg: Mapping[str, Any], device: torch.device, seed: int):
        self.cfg, self.device, self.seed = dict(cfg), device, int(seed)
        self.meta = {"backbone": cfg["backbone"], "device": device.type, "torch": torch.__version__,
                     "crop_size": list(cfg["crop_size"]), "spacing": cfg.get("spacing"),
                     "margin_mm": cfg["margin_mm"], "seed": self.seed}

    def _forward(self, model: nn.Module, batch: np.ndarray) -> np.ndarray:
        with deterministic(self.seed), torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return model(x).double().cpu().numpy()

    def inputs(self, images: Sequence[sitk.Image], region: np.ndarray,
               fovs: Sequence[np.ndarray | None]) -> tuple[np.ndarray, list[float]]:
        """The network's input batch (normalised crop, outside the fields of view neutral) and, per channel read,
        the fraction of the crop outside its field of view. fovs: per image, bool (z, y, x) or None."""
        raise NotImplementedError

    def extract(self, images: Sequence[sitk.Image], region: np.ndarray,
                fovs: Sequence[np.ndarray | None] | None = None) -> tuple[np.ndarray, list[float]]:
        """One patient's feature vector (the batch's pooled outputs, averaged over slices for 2D networks) and the
        fractions of the crop outside each channel's field of view."""
        batch, outside = self.inputs(images, region, list(fovs) if fovs else [None] * len(images))
        return self._forward(self.model, batch).mean(0), outside

    def _load_resnet(self, backbone: str, dims: int, depths, checkpoint: str | Path) -> None:
        """Build the user's ResNet (3D: MedicalNet's shortcut from config or the checkpoint; 2D: torchvision's B)
        and load its weights strictly; sets model, n_features and the provenance in meta."""
        self.backbone = backbone
        depth = int(self.cfg.get("depth") or 18)
        if depth not in depths:
            raise DeepFeatureError(f"features.deep.depth: {backbone} supports depths {depths}, not {depth}")
        state = read_state_dict(checkpoint)
        shortcut = (self.cfg.get("shortcut") or _shortcut_of(state)) if dims == 3 else "B"
        model = ResNet(depth, dims, shortcut=shortcut)
        what = f"3D ResNet-{depth} (MedicalNet, shortcut {shortcut})" if dims == 3 else \
            f"2D ResNet-{depth} (torchvision layout)"
        load_backbone(model, state, checkpoint, what)
        self.model = model.to(self.device).eval()
        self.n_features = model.n_features
        self.meta.update(depth=depth, checkpoint=str(checkpoint), checkpoint_sha256=file_sha256(checkpoint),
                         window=list(self.cfg["window"]), **({"shortcut": shortcut} if dims == 3 else {}))


class ResNet3DExtractor(Extractor):
    def __init__(self, cfg, device, seed, checkpoint: str | Path):
        super().__init__(cfg, device, seed)
        self._load_resnet("resnet3d", 3, RESNET3D_DEPTHS, checkpoint)

    def inputs(self, images, region, fovs):
        crop = crop_region(images[0], region, self.cfg["crop_size"], self.cfg.get("spacing"), self.cfg["margin_mm"],
                           fov=fovs[0])
        x = standardise(window(crop.image, *self.cfg["window"]), crop.valid)  # MedicalNet: z-score of the input
        return x[None, None], [crop_outside(crop.valid)]


class ResNet2DExtractor(Extractor):
    def __init__(self, cfg, device, seed, checkpoint: str | Path):
        super().__init__(cfg, device, seed)
        self._load_resnet("resnet2d", 2, RESNET2D_DEPTHS, checkpoint)
        self.meta.update(image_size=IMAGE_SIZE_2D, slice="largest")

    def inputs(self, images, region, fovs):
        one = np.zeros_like(region)
        z = largest_slice(region)
        one[z] = region[z]
        spacing = self.cfg.get("spacing")
        crop = crop_region(images[0], one, (1, IMAGE_SIZE_2D, IMAGE_SIZE_2D),
                           None if spacing is None else (1.0, *spacing[1:]), self.cfg["margin_mm"], fov=fovs[0])
        low, high = self.cfg["window"]
        x = (window(crop.image[0], low, high) - low) / (high - low)
        x = np.stack([(x - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
        if crop.valid is not None:
            x[:, ~crop.valid[0]] = 0.0  # the ImageNet mean colour
        return x[None], [crop_outside(crop.valid)]


class _PooledEncoder(nn.Module):
    """nnU-Net encoder -> global average pools of its deepest `stages` outputs, concatenated."""

    def __init__(self, encoder: nn.Module, stages: int):
        super().__init__()
        self.encoder, self.stages = encoder, stages

    def forward(self, x):
        skips = self.encoder(x)
        skips = skips if isinstance(skips, (list, tuple)) else [skips]
        return torch.cat([s.mean(dim=tuple(range(2, s.dim()))) for s in skips[-self.stages:]], dim=1)


class NnunetExtractor(Extractor):
    def __init__(self, cfg, device, seed, model_folder: str | Path, checkpoint: str = "checkpoint_final.pth"):
        super().__init__(cfg, device, seed)
        self.backbone = "nnunet"
        trained = segment.load_trained_network(Path(model_folder), checkpoint)  # an ensemble's first fold
        folder, fold, path, network = trained.folder, trained.fold, trained.path, trained.network
        plans, dataset_json, manager = trained.plans, trained.dataset_json, trained.configuration_manager
        configuration, n_inputs = trained.configuration, trained.n_inputs
        if not hasattr(network, "encoder"):
            raise DeepFeatureError(f"{folder}: the network ({type(network).__name__}) has no `encoder` to run")
        n_stages = len(network.encoder.stages) if hasattr(network.encoder, "stages") else None
        stages = int(cfg["nnunet_stages"])
        if n_stages is not None and stages > n_stages:
            raise DeepFeatureError(f"features.deep.nnunet_stages: {stages} but the encoder of {folder} has "
                                   f"{n_stages} stages")
        self.model = _PooledEncoder(network.encoder, stages).to(device).eval()
        self.dims = len(manager.patch_size)
        self.schemes = list(manager.normalization_schemes)
        self.use_mask_for_norm = list(manager.use_mask_for_norm)
        self.properties = plans.get("foreground_intensity_properties_per_channel", {})
        self.transpose = list(plans.get("transpose_forward", [0, 1, 2]))
        self.channels_used = n_inputs
        self.radstudy_channels = dataset_json.get("radstudy_channels")
        probe = np.zeros((1, n_inputs, *list(cfg["crop_size"])[-self.dims:]), np.float32)
        self.n_features = int(self._forward(self.model, probe).shape[1])
        self.meta.update(model_folder=str(folder), fold=fold, checkpoint=str(path), checkpoint_sha256=file_sha256(path),
                         configuration=configuration, stages=stages, normalization=self.schemes)

    def inputs(self, images, region, fovs):
        if len(images) != self.channels_used:
            raise DeepFeatureError(f"the nnU-Net model takes {self.channels_used} channel(s), {len(images)} given")
        grid = crop_grid(images[0], region, self.cfg["crop_size"], self.cfg.get("spacing"), self.cfg["margin_mm"])
        channels, outside = [], []
        for c, (image, fov) in enumerate(zip(images, fovs)):
            array = normalise_nnunet(sitk.GetArrayFromImage(image), self.schemes[c], self.properties.get(str(c)),
                                     self.use_mask_for_norm[c], fov)
            normalised = sitk.GetImageFromArray(array)
            normalised.CopyInformation(image)
            crop = resample_to(normalised, grid, float(array.min()))
            valid = valid_on_grid(fov, image, grid)
            if valid is not None:
                crop[~valid] = 0.0
            channels.append(crop)
            outside.append(crop_outside(valid))
        mask = region_on_grid(region, images[0], grid)
        x = np.stack(channels).transpose([0, *[t + 1 for t in self.transpose]])
        mask = mask.transpose(self.transpose)
        if self.dims == 3:
            return x[None], outside
        slices = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1))
        return np.moveaxis(x[:, slices], 1, 0), outside  # slices x channels x H x W


def build_extractor(cfg: Mapping[str, Any], *, model: str | Path, seed: int) -> Extractor:
    """The configured backbone, loaded once. model: the nnU-Net model folder (nnunet) or the checkpoint file."""
    device = resolve_device(cfg.get("device", "auto"))
    backbone = cfg["backbone"]
    if backbone == "nnunet":
        extractor = NnunetExtractor(cfg, device, seed, model)
    elif backbone == "resnet3d":
        extractor = ResNet3DExtractor(cfg, device, seed, model)
    elif backbone == "resnet2d":
        extractor = ResNet2DExtractor(cfg, device, seed, model)
    else:
        raise DeepFeatureError(f"features.deep.backbone must be one of {BACKBONES}, got {backbone!r}")
    extractor.meta["n_features"] = extractor.n_features
    log.info("deep features: %s on %s, %d features per patient", backbone, device, extractor.n_features)
    return extractor


# ============================================================================ per patient
def extract_patient(extractor: Extractor, images: Mapping[str, str | Path], mask: str | Path, *, patient: str,
                    center: str, region: str, label: int, on_bad_region: str = "nan",
                    fovs: Mapping[str, str | Path] | None = None) -> tuple[pd.DataFrame, list[dict]]:
    """One patient's row (patient, center, excluded, exclusion_reason, deep features) and its issues.

    images: channel -> file, in the study's channel order (the first names the features; the nnU-Net backbone
    reads as many as its model takes). fovs: channel -> field-of-view mask file, for the channels that do not cover
    the whole grid (module docstring). A bad region or image gives NaN features and an issue, never an error;
    issues about a channel's field of view also carry channel, outside_region and outside_crop."""
    channels = [str(c) for c in images]
    names = feature_names(region, channels[0], extractor.backbone, extractor.n_features)
    values = dict.fromkeys(names, np.nan)
    issues: list[dict] = []
    bad: dict[str, str] = {}

    def issue(reason: str, message: str, **record):
        issues.append({"patient": patient, "center": center, "region": region, "reason": reason, "message": message,
                       **record})
        log.warning("%s", message)
        if reason not in radiomics.NOTES:
            bad.setdefault(region, reason)

    def row():
        return radiomics.feature_row(patient, center, values, bad, on_bad_region)

    mask_file = str(mask)
    try:
        mask_image = sitk.ReadImage(mask_file)
        voxels = sitk.GetArrayFromImage(mask_image) == int(label)
    except Exception as exc:  # noqa: BLE001 - reported, never raised
        issue(radiomics.UNREADABLE_MASK, f"{patient}: deep features: mask {mask_file} cannot be read ({exc})")
        return row(), issues
    n = int(voxels.sum())
    if n < 2:
        reason = radiomics.EMPTY_REGION if n == 0 else radiomics.SINGLE_VOXEL
        what = "is empty (no voxel" if n == 0 else "has a single voxel (no texture"
        issue(reason, f"{patient}: deep features: region {region!r} {what} of label {label}) in mask {mask_file}; "
                      "deep features NaN")
        return row(), issues
    used = channels[:max(1, extractor.channels_used)]
    fovs = {str(c): str(f) for c, f in (fovs or {}).items() if str(c) in used}
    loaded, fields = [], []
    for channel in used:
        try:
            image = sitk.ReadImage(str(images[channel]))
        except Exception as exc:  # noqa: BLE001
            issue(radiomics.UNREADABLE_IMAGE, f"{patient}: deep features: image {images[channel]} ({channel}) "
                                              f"cannot be read ({exc})")
            return row(), issues
        if not same_grid(mask_image, image, direction_tolerance=1e-4):
            issue(radiomics.OUTSIDE_IMAGE, f"{patient}: deep features: mask {mask_file} is not on the grid of "
                                           f"{images[channel]} ({channel})")
            return row(), issues
        fov = None
        if channel in fovs:
            try:
                fov = radiomics.read_fov(fovs[channel], image)
            except Exception as exc:  # noqa: BLE001
                issue(radiomics.UNREADABLE_IMAGE, f"{patient}: deep features: field-of-view mask {fovs[channel]} of "
                                                  f"image {images[channel]} ({channel}) cannot be used ({exc})",
                      channel=channel)
                return row(), issues
            share = radiomics.outside_share(voxels, fov)
            if share > radiomics.MAX_OUTSIDE_FOV:
                issue(radiomics.OUTSIDE_FOV, f"{patient}: deep features: {share:.1%} of region {region!r} lies outside "
                                             f"the field of view of {channel} ({fovs[channel]}), more than "
                                             f"{radiomics.MAX_OUTSIDE_FOV:.0%}; deep features NaN",
                      channel=channel, outside_region=share)
                return row(), issues
        loaded.append(image)
        fields.append(fov)
    inside = voxels if fields[0] is None else voxels & fields[0]
    values_in = sitk.GetArrayViewFromImage(loaded[0])[inside]
    if float(np.ptp(values_in)) == 0.0:
        issue(radiomics.CONSTANT_IMAGE, f"{patient}: deep features: image {images[channels[0]]} is constant "
                                        f"({float(values_in[0]):g}) inside region {region!r}; deep features NaN")
        return row(), issues
    start = time.perf_counter()
    try:
        vector, outside = extractor.extract(loaded, voxels, fields)
        vector = np.asarray(vector, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - a failing patient never stops the center
        issue(radiomics.EXTRACTION_FAILED, f"{patient}: deep features: {extractor.backbone} failed on region "
                                           f"{region!r}: {type(exc).__name__}: {exc}")
        return row(), issues
    if vector.shape != (extractor.n_features,) or not np.isfinite(vector).all():
        issue(radiomics.EXTRACTION_FAILED, f"{patient}: deep features: {extractor.backbone} gave "
                                           f"{vector.shape} values, {int((~np.isfinite(vector)).sum())} not finite")
        return row(), issues
    values.update(zip(names, vector.tolist()))
    for channel, fov, crop_share in zip(used, fields, outside):
        share = 0.0 if fov is None else radiomics.outside_share(voxels, fov)
        if share or crop_share:
            issue(radiomics.PARTLY_OUTSIDE_FOV, f"{patient}: deep features: {share:.1%} of region {region!r} and "
                                                f"{crop_share:.1%} of its crop lie outside the field of view of "
                                                f"{channel} ({fovs[channel]}); set to 0 there, the neutral value of "
                                                "the normalised input", channel=channel, outside_region=share,
                  outside_crop=crop_share)
    log.info("%s: %d deep features in %.2f s", patient, len(names), time.perf_counter() - start)
    return row(), issues
