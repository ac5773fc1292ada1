"""Where an end-to-end network looks: Grad-CAM maps over the input crop (MONAI's `GradCAM`) and the figure a
radiologist reads (the region's largest axial slice, the map over it, the region's contour).

Grad-CAM (Selvaraju et al. 2017) weights a layer's activations by the mean gradient of the network's score (the
logit of the binary endpoint, the log relative risk of the time-to-event one) and keeps the positive part: the map
shows the voxels that raise the score. It is computed on a copy of the network, so the caller's model keeps no
hooks and no changed flags.

The coarse map is brought to the input grid with each cell at the centre of its receptive field: MONAI's ResNet
pads every convolution and pooling so that cell i of a layer with total stride S looks at input voxel S*i. MONAI's
default upsampler (and cv2.resize in other Grad-CAM tools) puts it at S*i + (S - 1)/2 instead, a shift of 3.5
voxels for layer2 and 15.5 for layer4 (stride-2 stem), which on a 32-voxel crop moves the map off a small tumour.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

# The backbone's residual stages, deepest first: Grad-CAM's default layer is the deepest whose map still has
# MIN_CAM_CELLS cells along every axis. On the demo's 32-voxel crops with a stride-2 stem, layer4's map is a
# single voxel (a constant map says nothing), layer2's is 4^3; on 96^3 crops layer4's is 3^3 to 6^3.
BACKBONE_STAGES = ("backbone.layer4", "backbone.layer3", "backbone.layer2", "backbone.layer1")
MIN_CAM_CELLS = 4


class _ScoreAsClass(nn.Module):
    """The network's (N,) score as MONAI's CAM expects class outputs: (N, 1), class 0 being the score."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, image, clinical=None):
        score = self.net(image) if clinical is None else self.net(image, clinical)
        return score.reshape(-1, 1)


def unit_range(maps: torch.Tensor) -> torch.Tensor:
    """Each row's map scaled to [0, 1] (its maximum 1); a constant row (no voxel raises the score) is all 0.
    MONAI's default postprocessing would flip the map (max -> 0); this one keeps 'bright = looked at'."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(1, keepdim=True).values
    span = flat.max(1, keepdim=True).values - low
    scaled = torch.where(span > 0, (flat - low) / span.clamp_min(torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return scaled.reshape(maps.shape)


def cell_centred_upsampler(spatial: tuple[int, ...]):
    """MONAI `upsampler` (spatial size -> function of (N, 1, *cells) maps) placing cell i at input voxel S*i along
    each axis and interpolating linearly between cells (constant beyond the last). S = the layer's total stride, a
    power of two in MONAI's ResNet (strides 1 or 2); with c = ceil(n / S) cells on n voxels, S = 2**ceil(log2(n/c))."""
    from scipy.ndimage import map_coordinates

    def upsample(maps: torch.Tensor) -> torch.Tensor:
        cells = maps.shape[2:]
        strides = [2.0 ** np.ceil(np.log2(n / c)) if c > 1 else 1.0 for n, c in zip(spatial, cells)]
        grid = np.stack(np.meshgrid(*[np.arange(n) / s for n, s in zip(spatial, strides)], indexing="ij"))
        rows = maps.detach().cpu().numpy()
        out = np.stack([map_coordinates(row[0], grid, order=1, mode="nearest") for row in rows])[:, None]
        return torch.from_numpy(out.astype(np.float32)).to(maps.device)

    return upsample


def _check_inputs(inputs: np.ndarray, clinical: np.ndarray | None) -> None:
    if inputs.ndim not in (4, 5):
        raise ValueError(f"grad_cam needs inputs (N, C, H, W) or (N, C, D, H, W); got shape {inputs.shape}")
    if clinical is not None and (clinical.ndim != 2 or clinical.shape[0] != inputs.shape[0]):
        raise ValueError(f"grad_cam: clinical has shape {clinical.shape}; expected ({inputs.shape[0]}, n_clinical), "
                         "one row per input row")


def default_layer(model: nn.Module, example: torch.Tensor, clinical: torch.Tensor | None = None) -> str:
    """The deepest backbone stage (BACKBONE_STAGES) whose feature map on `example` has at least MIN_CAM_CELLS
    cells along every axis; the shallowest present stage if none has. The model's mode and hooks are as before."""
    modules = dict(model.named_modules())
    present = [name for name in BACKBONE_STAGES if name in modules]
    if not present:
        raise ValueError(f"grad_cam: the network has none of the layers {', '.join(BACKBONE_STAGES)} (a MONAI "
                         "ResNet as .backbone); name one with layer=")
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[2:]))) for name in present]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()
            if clinical is None:
                model(example)
            else:
                model(example, clinical)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return next((name for name in present if min(shapes[name]) >= MIN_CAM_CELLS), present[-1])


def _network_and_clinical(network, clinical: np.ndarray | None) -> tuple[nn.Module, np.ndarray | None]:
    """The module to explain and the clinical values as it takes them: a TrainedNetwork's clinical data imputed and
    scaled by its normaliser (as `predict` does); a bare module's as given, which must then be complete."""
    from radstudy.networks.train import TrainedNetwork

    if isinstance(network, TrainedNetwork):
        if (network.normaliser is None) != (clinical is None):
            raise ValueError("grad_cam: clinical data must be given exactly when the network was trained with it")
        return network.model, None if clinical is None else network.normaliser.transform(clinical)
    if not isinstance(network, nn.Module):
        raise TypeError(f"grad_cam explains a TrainedNetwork or a torch module, not {type(network).__name__}")
    if clinical is not None and not np.isfinite(np.asarray(clinical, dtype=np.float32)).all():
        raise ValueError("grad_cam: clinical has missing or infinite values; pass the TrainedNetwork, whose "
                         "normaliser imputes them as training did")
    return network, clinical


def grad_cam(network, inputs: np.ndarray, clinical: np.ndarray | None = None, *, layer: str | None = None,
             batch_size: int = 8) -> np.ndarray:
    """Grad-CAM map of each input row on the input grid, scaled to [0, 1] per row: (N, D, H, W) for 3D inputs
    (N, C, D, H, W), (N, H, W) for 2D inputs (N, C, H, W).

    network: a TrainedNetwork (networks/train.py; its clinical data are imputed and scaled by its normaliser, as
    `predict` does) or a module with a MONAI ResNet as `.backbone` whose forward(image, clinical=None) gives one
    score per row (FusionNet; clinical then as it takes them). clinical: (N, n_clinical), passed through.
    layer: the module whose activations are weighted; by default the deepest backbone stage with a map of at least
    MIN_CAM_CELLS cells per axis (`default_layer`). Rows run in batches of `batch_size`, in eval mode, on the model's
    device; the map is interpolated linearly up to the input grid, each cell at its receptive field's centre
    (`cell_centred_upsampler`).
    """
    from monai.visualize import GradCAM

    model, clinical = _network_and_clinical(network, clinical)
    inputs = np.asarray(inputs, dtype=np.float32)
    clinical = None if clinical is None else np.asarray(clinical, dtype=np.float32)
    _check_inputs(inputs, clinical)
    net = _ScoreAsClass(copy.deepcopy(model)).eval()
    net.requires_grad_(True)  # a frozen backbone still needs gradients at the target layer
    device = next(net.parameters()).device

    def tensors(rows: slice):
        image = torch.from_numpy(inputs[rows]).to(device)
        extra = {} if clinical is None else {"clinical": torch.from_numpy(clinical[rows]).to(device)}
        return image, extra

    target = "net." + layer if layer is not None else None
    if target is None:
        image, extra = tensors(slice(0, 1))
        target = "net." + default_layer(net.net, image, extra.get("clinical"))
    if target not in dict(net.named_modules()):
        raise ValueError(f"grad_cam: the network has no layer {layer!r}")
    cam = GradCAM(nn_module=net, target_layers=target, upsampler=cell_centred_upsampler, postprocessing=unit_range)
    maps = []
    with torch.enable_grad():
        for start in range(0, len(inputs), batch_size):
            image, extra = tensors(slice(start, start + batch_size))
            maps.append(cam(image, class_idx=0, **extra).detach().cpu().numpy()[:, 0])
    return np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, *inputs.shape[2:]), np.float32)


def _display_range(image: np.ndarray) -> tuple[float, float]:
    """Grey levels from the 1st to the 99th percentile of the slice (a flat slice: its value +- 1)."""
    low, high = np.percentile(image, [1, 99])
    return (float(low), float(high)) if high > low else (float(low) - 1, float(low) + 1)


def saliency_slice(inputs_row: np.ndarray, cam: np.ndarray, *, mask_channel: bool = False) -> int | None:
    """The axial slice (axis 0 of a 3D row) the figure shows: the region's largest when the last channel is its
    mask (and the mask is not empty), else the slice holding the map's maximum; None for a 2D row."""
    from radstudy.images import largest_slice

    if inputs_row.ndim == 3:
        return None
    if mask_channel and (inputs_row[-1] > 0.5).any():
        return largest_slice(inputs_row[-1] > 0.5)
    return int(np.unravel_index(int(np.argmax(cam)), cam.shape)[0])


def saliency_figure(inputs_row: np.ndarray, cam: np.ndarray, *, title: str, mask_channel: bool = False):
    """The figure of one patient: the first channel in grey with the region's contour (left) and with the Grad-CAM
    map over it (right, with a colour bar), on one axial slice (`saliency_slice`) of a 3D row (C, D, H, W) or on
    the slice of a 2D row (C, H, W). `mask_channel`: the last channel is the region mask. Returns the figure (save
    it with radstudy.figures.save_figure: PNG + PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    inputs_row, cam = np.asarray(inputs_row, dtype=np.float32), np.asarray(cam, dtype=np.float32)
    if inputs_row.ndim not in (3, 4) or cam.shape != inputs_row.shape[1:]:
        raise ValueError(f"saliency_figure ({title}): the map {cam.shape} must match the input row's grid "
                         f"{inputs_row.shape[1:]} (row (C, H, W) or (C, D, H, W))")
    k = saliency_slice(inputs_row, cam, mask_channel=mask_channel)
    pick = (lambda a: a) if k is None else (lambda a: a[k])
    image, heat = pick(inputs_row[0]), pick(cam)
    region = pick(inputs_row[-1]) > 0.5 if mask_channel else None
    low, high = _display_range(image)
    fig, axes = plt.subplots(1, 2, figsize=(7.4, 3.6), layout="constrained")
    for ax in axes:
        ax.imshow(image, cmap="gray", vmin=low, vmax=high, interpolation="nearest")
        ax.set_axis_off()
    axes[1].imshow(heat, cmap="jet", vmin=0, vmax=1, alpha=0.45, interpolation="bilinear")
    if region is not None and region.any():
        for ax in axes:
            ax.contour(region, levels=[0.5], colors="lime", linewidths=1.0)
    where = "" if k is None else f", axial slice {k + 1} of {inputs_row.shape[1]}"
    axes[0].set_title("image" + where, fontsize=9)
    axes[1].set_title("Grad-CAM (1 = raises the score most)", fontsize=9)
    colour_bar = axes[1].inset_axes([1.04, 0.0, 0.045, 1.0])  # as tall as the image
    fig.colorbar(ScalarMappable(Normalize(0, 1), cmap="jet"), cax=colour_bar)
    fig.suptitle(title, fontsize=10)
    return fig
