"""Grad-CAM maps of the end-to-end networks: where the map points, its shapes, the figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from radstudy.config import settings
from radstudy.figures import save_figure
from radstudy.networks.nets import build_network
from radstudy.networks.saliency import cell_centred_upsampler, grad_cam, saliency_figure, saliency_slice
from radstudy.networks.train import ClinicalNormaliser, TrainedNetwork


def network(dims: int, channels: int = 1, n_clinical: int = 0):
    """The project's FusionNet (networks/nets.py): MONAI ResNet10, widen factor 0.25, stride-2 stem."""
    cfg = settings("networks", {"architecture": "resnet10", "widen_factor": 0.25, "dims": dims})
    return build_network(cfg, channels, n_clinical)


def intensity_network(dims: int):
    """Planted weights: the backbone blurs channel 0's positive intensity down the network (stem and each block's
    first convolution: a box average of channel 0 into channel 0; second convolution: its centre tap; the strided
    1x1 shortcuts, which would skip voxels: 0) and the head adds up that channel. The score is the pooled intensity,
    the voxels that raise it are the bright ones, and every layer's cell i looks at input voxel stride * i."""
    torch.manual_seed(0)
    net = network(dims)
    with torch.no_grad():
        for name, module in net.backbone.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()
                if name == "conv1" or name.endswith(".conv1"):
                    module.weight[0, 0] = 1.0 / module.weight[0, 0].numel()
                elif name.endswith(".conv2"):
                    module.weight[(0, 0, *(k // 2 for k in module.kernel_size))] = 1.0
        net.head.weight.zero_()
        net.head.weight[0, 0] = 1.0
        net.head.bias.zero_()
    return net.eval()


def blob_rows(n: int, shape: tuple[int, ...], radius: float, seed: int, bright: np.ndarray | None = None):
    """(n, 1, *shape) low noise with a ball of +3 at a random place per row (where `bright`, if given); the balls."""
    rng = np.random.default_rng(seed)
    grid = np.indices(shape)
    x = rng.normal(0, 0.3, (n, 1, *shape)).astype(np.float32)
    balls = np.zeros((n, *shape), bool)
    for i in range(n):
        centre = [rng.integers(int(radius) + 1, s - int(radius) - 1) for s in shape]
        balls[i] = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
        if bright is None or bright[i]:
            x[i, 0][balls[i]] += 3.0
    return x, balls


@pytest.mark.parametrize("shape", [(32, 40), (32, 32, 40)], ids=["2d", "3d"])
def test_grad_cam_points_at_the_bright_ball_of_each_row(shape):
    """On a network whose score is the pooled intensity, a row's map peaks inside that row's ball (radius 6 voxels,
    the map's cells 8 voxels apart): the map lies on the input grid in the input's axis order (non-cubic grids),
    scaled to [0, 1] per row. Measured: 20/20 (2D) and 19/20 (3D) peaks in the ball; with MONAI's default
    upsampler, which shifts the map by 3.5 voxels, 11/20 and 5/20."""
    x, balls = blob_rows(20, shape, radius=6, seed=1)
    cams = grad_cam(intensity_network(len(shape)), x)
    assert cams.shape == (20, *shape) and cams.dtype == np.float32
    assert np.allclose(cams.reshape(20, -1).max(1), 1) and cams.min() >= 0
    peaks_in_ball = [ball.reshape(-1)[np.argmax(cam)] for cam, ball in zip(cams, balls)]
    assert np.mean(peaks_in_ball) >= 0.9
    assert all(cam[ball].mean() > 3 * cam[~ball].mean() for cam, ball in zip(cams, balls))


@pytest.mark.parametrize("spatial, cells", [((32, 40), (4, 5)), ((33, 31, 17), (5, 4, 3))])
def test_upsampled_cells_sit_at_their_receptive_fields_centre(spatial, cells):
    """Cell i of a layer with total stride S (8 here: 33 voxels give 5 cells, 31 give 4, 17 give 3) lands on input
    voxel S * i, where MONAI's ResNet centres its receptive field."""
    maps = torch.zeros((1, 1, *cells))
    hot = tuple(c - 2 for c in cells)
    maps[(0, 0, *hot)] = 1.0
    up = cell_centred_upsampler(spatial)(maps).numpy()[0, 0]
    assert up.shape == spatial
    assert np.unravel_index(np.argmax(up), spatial) == tuple(8 * i for i in hot)
    assert up.max() == pytest.approx(1.0)


def test_grad_cam_of_a_trained_network_looks_at_the_planted_signal():
    """A network trained 20 steps to tell rows with a bright ball from rows without looks at the ball: in the rows of
    a new set the map is higher inside the ball than outside it, and its maximum lies in the ball far more often than
    a random voxel would. Measured: higher inside in 20/20 rows; peak in the ball in 16/20 rows, chance 4.8%."""
    torch.manual_seed(0)
    net = network(2)
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3)
    for step in range(20):
        y = np.arange(16) % 2
        x, _ = blob_rows(16, (32, 32), radius=4, seed=100 + step, bright=y == 1)
        target = torch.tensor(y, dtype=torch.float32)
        loss = nn.functional.binary_cross_entropy_with_logits(net(torch.from_numpy(x)), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    x, balls = blob_rows(20, (32, 32), radius=4, seed=7)
    cams = grad_cam(net, x)
    assert np.mean([cam[ball].mean() > cam[~ball].mean() for cam, ball in zip(cams, balls)]) >= 0.9
    peak_in_ball = np.mean([ball.reshape(-1)[np.argmax(cam)] for cam, ball in zip(cams, balls)])
    assert peak_in_ball > 3 * balls.mean(), (peak_in_ball, balls.mean())


def test_grad_cam_passes_clinical_inputs_and_leaves_the_model_as_it_was():
    net = network(3, channels=2, n_clinical=3).train()
    x = np.random.default_rng(0).normal(size=(3, 2, 32, 32, 32)).astype(np.float32)
    clinical = np.zeros((3, 3), np.float32)
    cams = grad_cam(net, x, clinical, batch_size=2)
    assert cams.shape == (3, 32, 32, 32)
    assert net.training and not net.backbone.layer2._forward_hooks and not net.backbone.layer2._backward_hooks
    with pytest.raises(ValueError, match="fuses 3 clinical predictors, got none"):
        grad_cam(net, x)
    with pytest.raises(ValueError, match=r"clinical has shape \(2, 3\); expected \(3, n_clinical\)"):
        grad_cam(net, x, clinical[:2])


def test_grad_cam_takes_a_named_layer_and_names_a_missing_one():
    net = network(2)
    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    assert grad_cam(net, x, layer="backbone.layer4").shape == (2, 64, 64)
    with pytest.raises(ValueError, match="no layer 'backbone.layer9'"):
        grad_cam(net, x, layer="backbone.layer9")
    with pytest.raises(ValueError, match=r"inputs \(N, C, H, W\) or \(N, C, D, H, W\); got shape \(64, 64\)"):
        grad_cam(net, x[0, 0])


def test_saliency_slice_is_the_regions_largest_or_the_maps_maximum():
    row = np.zeros((2, 10, 16, 16), np.float32)
    row[1, 3, 4:6, 4:6] = 1
    row[1, 6, 2:12, 2:12] = 1  # the region's largest slice
    cam = np.zeros((10, 16, 16), np.float32)
    cam[8, 5, 5] = 1
    assert saliency_slice(row, cam, mask_channel=True) == 6
    assert saliency_slice(row, cam, mask_channel=False) == 8
    assert saliency_slice(row[:, 0], cam[0]) is None


@pytest.mark.parametrize("dims", [2, 3])
def test_saliency_figure_renders_the_slice_with_map_and_contour(tmp_path, dims):
    shape = (32, 32, 40)[-dims:]
    x, balls = blob_rows(1, shape, radius=6, seed=3)
    row = np.concatenate([x[0], balls[:1].astype(np.float32)])  # image + region mask channel
    cam = grad_cam(intensity_network(dims), x)[0]
    fig = saliency_figure(row, cam, title="P001 (external) score 1.23", mask_channel=True)
    png = save_figure(fig, tmp_path, f"saliency_{dims}d")
    assert png.stat().st_size > 10_000 and png.with_suffix(".pdf").stat().st_size > 0
    with pytest.raises(ValueError, match="must match the input row's grid"):
        saliency_figure(row, cam[..., :-1], title="P001")


def test_grad_cam_of_a_trained_network_imputes_and_scales_its_clinical_data_as_predict_does():
    """A TrainedNetwork's clinical data go through its normaliser (training means fill the gaps); a bare module
    given clinical data with a gap fails, saying what to pass instead."""
    model = network(2, n_clinical=2)
    trained = TrainedNetwork(model=model, history=pd.DataFrame(), best_epoch=1,
                             normaliser=ClinicalNormaliser(means=np.array([60.0, 5.0]), scales=np.array([10.0, 2.0])),
                             cfg={"dims": 2}, channels=["ct"], endpoint="binary", versions={},
                             inner_rows=np.zeros(0, int))
    x = np.random.default_rng(0).normal(size=(2, 1, 32, 32)).astype(np.float32)
    clinical = np.array([[70.0, np.nan], [np.nan, 3.0]])
    cams = grad_cam(trained, x, clinical)
    assert cams.shape == (2, 32, 32) and np.isfinite(cams).all()
    with pytest.raises(ValueError, match="missing or infinite values; pass the TrainedNetwork"):
        grad_cam(model, x, clinical)
    with pytest.raises(ValueError, match="clinical data must be given exactly when the network was trained with it"):
        grad_cam(trained, x)
