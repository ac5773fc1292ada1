"""The multitask network (issue 16, seed 004's MultiRecNet design): one U-Net that segments the tumour, classifies
the binary endpoint and scores the survival risk, from the same encoder pass.

Architecture
------------
`MultitaskNet` wraps a U-Net of `dynamic_network_architectures` (the library nnU-Net builds its networks with):
`PlainConvUNet` or `ResidualEncoderUNet`, deep supervision off, its decoder ending in 1x1 convolutions to 2 classes
(background, region). The encoder runs once per forward pass; its outputs (the skips, deepest last) feed

* the decoder: segmentation logits (N, 2, *spatial) at the crop's resolution;
* the heads: global average pools of the deepest `head_stages` encoder outputs (skips[-head_stages:]: 1 is the
  bottleneck alone), concatenated and dropped out; with clinical predictors, a small MLP (Linear(n_clinical,
  clinical_hidden) -> ReLU -> Dropout, as `FusionNet`) adds its vector to them (late fusion). Two Linear heads read
  that vector: a classification head (one logit per row, for the binary endpoint) and a risk head (one Cox log
  relative risk per row).

forward(x, clinical=None) -> (seg_logits, cls_logit (N,), risk (N,)), for 2D crops (N, C, H, W) and 3D crops
(N, C, D, H, W). Every spatial size of the crop must be divisible by the encoder's total stride on that axis (the
product of its stage strides), or the decoder's upsampled maps would not meet the skips: the builders check it
(ConfigError naming networks.crop_size).

`segmentation_loss` is soft Dice of the foreground + cross-entropy, over the rows (patients) that have a manual
mask only: most studies annotate a subset, and a patient without a mask must give the segmentation no gradient.

Why the project's own training loop
-----------------------------------
nnU-Net's trainer samples patches across the training images and optimises the segmentation; one patient is not a
unit of its batches, so it cannot train per-patient heads (a label and a survival time per patient, Cox's risk
sets over patients), nor follow the study design's splits and early stopping on an inner split. So the network is
trained in radstudy's loop on tumour-centred crops, one crop per patient (radstudy.networks), and nnU-Net is
used only for its architecture and, optionally, its trained weights.

Initialisation
--------------
* `build_multitask` (networks.multitask.encoder: random): a `PlainConvUNet` with nnU-Net's defaults (kernel 3,
  strides 1, 2, 2, ..., conv bias, InstanceNorm eps 1e-5 affine, LeakyReLU, decoder convolutions per stage
  n_conv_per_stage - 1 or 1) and its He initialisation; the heads keep torch's default initialisation.
* `build_from_nnunet` (encoder: nnunet): the U-Net exactly as the study's nnU-Net plans describe it (the
  configuration named in the checkpoint, built by the checkpoint trainer's build_network_architecture via
  `radstudy.segment.nnunet.load_trained_network`), with the trained weights of every encoder and decoder layer.
  Not loaded: the segmentation output layers (decoder.seg_layers: nnU-Net's have one output per label, here 2),
  replaced by new 1x1 convolutions (He initialisation), and the heads and the clinical MLP (random). A checkpoint
  that does not fit the network built from plans.json (a plans.json edited after training), a configuration of
  another dimensionality than networks.dims, other input channels or a crop the plans' strides do not divide
  raise ConfigError. The returned report counts the encoder tensors loaded (every one of them).
  The input normalisation differs from nnU-Net's: the crops given to this network are z-scored per crop, while
  nnU-Net normalises CT with the dataset's foreground percentiles, mean and std (and resamples to its target
  spacing; its transpose_forward is not applied either). The loaded weights are therefore a starting point that
  fine-tuning adapts, not a segmenter that works unchanged on these crops.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from radstudy.errors import ConfigError
from radstudy.networks.nets import fuse_clinical
from radstudy.torch_tools import ModelError, file_sha256

N_CLASSES = 2  # background, region
SMOOTH = 1e-5  # soft Dice's smoothing term


class MultitaskNet(nn.Module):
    """U-Net (segmentation) + pooled-encoder heads (classification logit, Cox risk), one encoder pass.

    unet: a dynamic_network_architectures U-Net (encoder returning its skips, decoder without deep supervision,
    N_CLASSES outputs). forward(x, clinical=None) -> (seg_logits (N, 2, *spatial), cls_logit (N,), risk (N,))."""

    def __init__(self, unet: nn.Module, n_clinical: int, clinical_hidden: int, dropout: float, head_stages: int = 1):
        super().__init__()
        encoder = unet.encoder
        n_stages = len(encoder.output_channels)
        if not 1 <= int(head_stages) <= n_stages:
            raise ConfigError(f"networks.multitask.head_stages must be between 1 and the encoder's {n_stages} "
                              f"stages, got {head_stages}")
        self.unet = unet
        self.dims = _conv_dims(encoder)
        self.head_stages = int(head_stages)
        self.n_clinical = int(n_clinical)
        self.n_pooled = int(sum(encoder.output_channels[-self.head_stages:]))
        self.dropout = nn.Dropout(dropout)
        self.clinical = (nn.Sequential(nn.Linear(n_clinical, clinical_hidden), nn.ReLU(), nn.Dropout(dropout))
                         if n_clinical > 0 else None)
        n_features = self.n_pooled + (int(clinical_hidden) if n_clinical > 0 else 0)
        self.cls_head = nn.Linear(n_features, 1)
        self.risk_head = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.dim() != self.dims + 2:
            raise ValueError(f"this {self.dims}D network takes (N, C, {'D, ' if self.dims == 3 else ''}H, W) crops, "
                             f"got shape {tuple(x.shape)}")
        skips = self.unet.encoder(x)
        seg_logits = self.unet.decoder(skips)
        spatial = tuple(range(2, x.dim()))
        pooled = self.dropout(torch.cat([s.mean(dim=spatial) for s in skips[-self.head_stages:]], dim=1))
        features = fuse_clinical(pooled, clinical, self.clinical, self.n_clinical)
        return seg_logits, self.cls_head(features).squeeze(1), self.risk_head(features).squeeze(1)


def _conv_dims(encoder: nn.Module) -> int:
    conv_op = encoder.conv_op
    if issubclass(conv_op, nn.Conv3d):
        return 3
    if issubclass(conv_op, nn.Conv2d):
        return 2
    raise ConfigError(f"the multitask network needs a 2D or 3D U-Net, got convolutions {conv_op.__name__}")


def _total_strides(encoder: nn.Module, dims: int) -> list[int]:
    """The product of the encoder's stage strides per spatial axis."""
    total = [1] * dims
    for stride in encoder.strides:
        stride = [int(stride)] * dims if isinstance(stride, int) else [int(s) for s in stride]
        total = [t * s for t, s in zip(total, stride)]
    return total


def _check_crop(cfg: dict, encoder: nn.Module, dims: int, source: str) -> None:
    crop = [int(c) for c in list(cfg["crop_size"])[-dims:]]
    total = _total_strides(encoder, dims)
    if len(crop) != dims or any(c % t for c, t in zip(crop, total)):
        axes = "z y x" if dims == 3 else "y x (dims 2)"
        raise ConfigError(f"networks.crop_size {list(cfg['crop_size'])}: the crop's {axes} sizes {crop} must be "
                          f"divisible by the encoder's total stride {total} per axis ({source})")


def build_multitask(cfg: dict, in_channels: int, n_clinical: int = 0) -> MultitaskNet:
    """A randomly initialised `MultitaskNet` as `cfg` (the `networks` settings) describes it: a PlainConvUNet with
    nnU-Net's defaults, networks.multitask.features_per_stage (one stage per entry, strides 1, 2, 2, ...) and
    n_conv_per_stage, for `in_channels` input channels and `n_clinical` clinical predictors."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    dims = int(cfg["dims"])
    if dims not in (2, 3):
        raise ConfigError(f"networks.dims must be 2 or 3, got {cfg['dims']!r}")
    mt = cfg["multitask"]
    features = [int(f) for f in mt["features_per_stage"]]
    if len(features) < 2 or min(features) < 1:
        raise ConfigError(f"networks.multitask.features_per_stage must list >= 2 positive stage widths (a U-Net "
                          f"needs a bottleneck and one skip), got {mt['features_per_stage']}")
    n_conv = int(mt["n_conv_per_stage"])
    if n_conv < 1:
        raise ConfigError(f"networks.multitask.n_conv_per_stage must be >= 1, got {mt['n_conv_per_stage']}")
    n_stages = len(features)
    conv_op, norm_op = (nn.Conv3d, nn.InstanceNorm3d) if dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    unet = PlainConvUNet(int(in_channels), n_stages, features, conv_op, [[3] * dims] * n_stages,
                         [[1] * dims] + [[2] * dims] * (n_stages - 1), n_conv, N_CLASSES, max(n_conv - 1, 1),
                         conv_bias=True, norm_op=norm_op, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=False)
    _check_crop(cfg, unet.encoder, dims, f"networks.multitask.features_per_stage: {n_stages} stages, each after the "
                                         f"first halving every axis")
    unet.apply(unet.initialize)  # nnU-Net's He initialisation (as get_network_from_plans does)
    return MultitaskNet(unet, int(n_clinical), int(cfg["clinical_hidden"]), float(cfg["dropout"]),
                        int(mt.get("head_stages", 1)))


def build_from_nnunet(cfg: dict, model_folder: str | Path, in_channels: int,
                      n_clinical: int = 0, channels: list[str] | None = None) -> tuple[MultitaskNet, dict]:
    """A `MultitaskNet` on the U-Net of a trained nnU-Net model folder, with its trained weights except the
    segmentation output layers (module docstring), and a report: model_folder, fold, checkpoint, checkpoint_sha256,
    configuration, encoder_tensors, encoder_loaded (== encoder_tensors), decoder_loaded, skipped (checkpoint keys
    not loaded). Raises ConfigError naming the files and settings that do not fit."""
    from radstudy.segment.nnunet import load_trained_network

    dims = int(cfg["dims"])
    try:
        trained = load_trained_network(Path(model_folder))
    except ModelError as error:
        raise ConfigError(f"networks.multitask.encoder is 'nnunet': {error} (the checkpoint must come from a "
                          "training with this plans.json: was it edited or replaced after training?)") from error
    plans_file = trained.folder / "plans.json"
    where = f"{plans_file}, configuration {trained.configuration!r} of checkpoint {trained.path}"
    unet = trained.network
    if not all(hasattr(unet, a) for a in ("encoder", "decoder")) or not hasattr(unet.decoder, "seg_layers"):
        raise ConfigError(f"networks.multitask.encoder is 'nnunet' but the network of {where} "
                          f"({type(unet).__name__}) is not an encoder-decoder U-Net with seg_layers")
    model_dims = len(trained.configuration_manager.patch_size)
    if model_dims != dims:
        raise ConfigError(f"networks.dims is {dims} but the nnU-Net model is {model_dims}D ({where}): set networks.dims "
                          f"to {model_dims} or train a {dims}d nnU-Net configuration")
    if trained.n_inputs != int(in_channels):
        raise ConfigError(f"the nnU-Net model takes {trained.n_inputs} input channel(s) (channel_names of "
                          f"{trained.folder / 'dataset.json'}), the multitask network gets {in_channels}: its crops "
                          "must hold the model's channels, in its order")
    expected = trained.dataset_json.get("radstudy_channels")
    if channels is not None and expected is not None and list(channels) != list(expected):
        raise ConfigError(f"the nnU-Net model takes the channels {list(expected)} in this order (radstudy_channels of "
                          f"{trained.folder / 'dataset.json'}), the multitask network's crops hold {list(channels)}: "
                          "set networks.channels to the model's order")
    _check_crop(cfg, unet.encoder, dims, f"the strides of {where}")

    decoder = unet.decoder
    decoder.seg_layers = nn.ModuleList(
        type(layer)(layer.in_channels, N_CLASSES, 1, 1, 0, bias=True) for layer in decoder.seg_layers)
    decoder.seg_layers.apply(unet.initialize if hasattr(unet, "initialize") else _he_init)
    decoder.num_classes = N_CLASSES
    net = MultitaskNet(unet, int(n_clinical), int(cfg["clinical_hidden"]), float(cfg["dropout"]),
                       int(cfg["multitask"].get("head_stages", 1)))

    state, weights = unet.state_dict(), trained.weights

    def loaded(key: str) -> bool:
        return key in weights and weights[key].shape == state[key].shape and torch.equal(weights[key], state[key])

    encoder_keys = [k for k in state if k.startswith("encoder.")]
    decoder_keys = [k for k in state if k.startswith("decoder.") and not k.startswith("decoder.encoder.")
                    and not k.startswith("decoder.seg_layers.")]
    report = {"model_folder": str(Path(trained.folder).resolve()), "fold": trained.fold, "checkpoint": str(trained.path),
              "checkpoint_sha256": file_sha256(trained.path), "configuration": trained.configuration,
              "encoder_tensors": len(encoder_keys), "encoder_loaded": sum(loaded(k) for k in encoder_keys),
              "decoder_loaded": sum(loaded(k) for k in decoder_keys),
              "skipped": sorted(k for k in weights if k not in state or not loaded(k))}
    if report["encoder_loaded"] != report["encoder_tensors"]:  # cannot happen after a strict load: a guard
        raise ConfigError(f"only {report['encoder_loaded']} of {report['encoder_tensors']} encoder tensors of "
                          f"{trained.path} were loaded")
    return net, report


def _he_init(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        nn.init.zeros_(module.bias)


def segmentation_loss(seg_logits: torch.Tensor, target: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """Soft Dice + cross-entropy of the rows with a manual mask; rows without one contribute nothing (no gradient).

    seg_logits (N, 2, *spatial); target (N, *spatial), foreground where > 0.5 (float or int); has_mask (N,) bool.
    Dice: per row, of the foreground probability (softmax) against the target, (2 |P T| + 1e-5) / (|P| + |T| +
    1e-5); the loss is 1 - the mean Dice over the masked rows, plus the mean cross-entropy over their voxels. Without
    any masked row the loss is seg_logits.sum() * 0: zero, with a zero gradient, and still in the graph."""
    has_mask = torch.as_tensor(has_mask, device=seg_logits.device).to(torch.bool).reshape(-1)
    if has_mask.numel() != seg_logits.shape[0] or target.shape[0] != seg_logits.shape[0]:
        raise ValueError(f"segmentation_loss: {seg_logits.shape[0]} rows of logits, {target.shape[0]} of targets, "
                         f"{has_mask.numel()} mask flags")
    if not bool(has_mask.any()):
        return seg_logits.sum() * 0.0
    logits = seg_logits[has_mask]
    labels = (target[has_mask] > 0.5).long()
    if labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"segmentation_loss: targets {tuple(target.shape)} do not match logits "
                         f"{tuple(seg_logits.shape)} (N, 2, *spatial)")
    foreground = torch.softmax(logits, dim=1)[:, 1]
    truth = labels.to(foreground.dtype)
    spatial = tuple(range(1, foreground.dim()))
    intersection = (foreground * truth).sum(dim=spatial)
    dice = (2 * intersection + SMOOTH) / (foreground.sum(dim=spatial) + truth.sum(dim=spatial) + SMOOTH)
    return (1 - dice.mean()) + F.cross_entropy(logits, labels)
