"""The multitask network: masked segmentation loss (by gradient), shapes, crop checks, nnU-Net initialisation."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from radstudy.errors import ConfigError
from radstudy.networks.multitask import build_from_nnunet, build_multitask, segmentation_loss

FEATURES = [8, 16, 32, 64]


def _cfg(dims: int = 3, crop_size=(16, 32, 32), **multitask) -> dict:
    return {"dims": dims, "crop_size": list(crop_size), "dropout": 0.1, "clinical_hidden": 8,
            "multitask": {"encoder": "random", "features_per_stage": FEATURES, "n_conv_per_stage": 2,
                          "head_stages": 1, **multitask}}


# ============================================================================ segmentation loss
def test_rows_without_a_mask_get_no_segmentation_gradient():
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 4, 8, 8, requires_grad=True)
    target = (torch.rand(4, 4, 8, 8) > 0.7).float()
    has_mask = torch.tensor([True, False, True, False])
    loss = segmentation_loss(logits, target, has_mask)
    loss.backward()
    grad = logits.grad
    assert torch.all(grad[1] == 0) and torch.all(grad[3] == 0)  # exactly zero, not small
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    # the unmasked rows' logits and targets do not change the value either
    other = logits.detach().clone()
    other[[1, 3]] = torch.randn(2, 2, 4, 8, 8) * 10
    other_target = target.clone()
    other_target[[1, 3]] = 1 - other_target[[1, 3]]
    assert torch.isclose(segmentation_loss(other, other_target, has_mask), loss.detach())


def test_no_masked_row_gives_zero_loss_and_zero_gradient_in_the_graph():
    logits = torch.randn(3, 2, 16, 16, requires_grad=True)
    loss = segmentation_loss(logits, torch.ones(3, 16, 16), torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


def test_dice_plus_cross_entropy_by_hand():
    """Row 0: p(fg) 0.5 everywhere, 2 of 4 voxels foreground; row 1: p(fg) 0.75, all foreground; row 2 unmasked."""
    logits = torch.zeros(3, 2, 2, 2)
    logits[1, 1] = math.log(3.0)  # softmax: 0.25 background, 0.75 foreground
    logits[2] = torch.randn(2, 2, 2) * 5
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 1.0]]])
    dice = [(2 * 1.0 + 1e-5) / (2.0 + 2.0 + 1e-5), (2 * 3.0 + 1e-5) / (3.0 + 4.0 + 1e-5)]
    cross_entropy = (4 * math.log(2.0) + 4 * -math.log(0.75)) / 8  # mean over the 8 voxels of the masked rows
    expected = 1 - sum(dice) / 2 + cross_entropy
    has_mask = torch.tensor([True, True, False])
    assert segmentation_loss(logits, target, has_mask).item() == pytest.approx(expected, rel=1e-6)
    # integer labels (tumour label 2 counts as foreground) and soft values > 0.5 give the same loss
    assert segmentation_loss(logits, (target * 2).long(), has_mask).item() == pytest.approx(expected, rel=1e-6)
    assert segmentation_loss(logits, target * 0.6, has_mask).item() == pytest.approx(expected, rel=1e-6)


# ============================================================================ random architecture
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("n_clinical", [0, 3])
def test_forward_shapes_and_one_encoder_pass(dims, n_clinical):
    torch.manual_seed(1)
    net = build_multitask(_cfg(dims, head_stages=2), in_channels=2, n_clinical=n_clinical)
    calls = []
    net.unet.encoder.register_forward_hook(lambda *_: calls.append(1))
    spatial = (16, 32, 32)[-dims:]
    x = torch.randn(3, 2, *spatial)
    clinical = torch.randn(3, n_clinical) if n_clinical else None
    seg, cls_logit, risk = net(x, clinical)
    assert seg.shape == (3, 2, *spatial) and cls_logit.shape == (3,) and risk.shape == (3,)
    assert len(calls) == 1
    assert net.n_pooled == sum(FEATURES[-2:])  # bottleneck + the skip above it
    assert net.cls_head.in_features == sum(FEATURES[-2:]) + (8 if n_clinical else 0)
    net.eval()
    with torch.no_grad():
        _, c0, r0 = net(x, clinical)
        _, c1, r1 = net(x[:1], None if clinical is None else clinical[:1])
    assert not torch.allclose(c0, r0)  # two heads, not one number twice
    torch.testing.assert_close(c1, c0[:1], rtol=1e-4, atol=1e-5)  # a row's score does not depend on the batch
    torch.testing.assert_close(r1, r0[:1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="clinical"):
        net(x, None if n_clinical else torch.randn(3, 2))


def test_random_unet_has_nnunet_defaults():
    net = build_multitask(_cfg(3), in_channels=1)
    encoder = net.unet.encoder
    assert encoder.strides == [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert list(encoder.output_channels) == FEATURES
    norms = [m for m in net.unet.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(m.eps == 1e-5 and m.affine for m in norms)
    assert all(len(stage.convs) == 1 for stage in net.unet.decoder.stages)  # n_conv_per_stage 2 -> 1 in decoder
    assert all(layer.out_channels == 2 for layer in net.unet.decoder.seg_layers)


def test_wraps_a_residual_encoder_unet_with_anisotropic_strides():
    """nnU-Net's ResEnc plans build a ResidualEncoderUNet; strides need not be equal on every axis."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from radstudy.networks.multitask import MultitaskNet

    unet = ResidualEncoderUNet(1, 4, FEATURES, torch.nn.Conv3d, 3, [1, 2, 2, [1, 2, 2]], [1, 2, 2, 2], 2, 1,
                               conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
                               norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU)
    net = MultitaskNet(unet, n_clinical=0, clinical_hidden=8, dropout=0.0, head_stages=3)
    seg, cls_logit, risk = net(torch.randn(2, 1, 8, 32, 32))
    assert seg.shape == (2, 2, 8, 32, 32) and cls_logit.shape == risk.shape == (2,)
    assert net.n_pooled == sum(FEATURES[-3:])


@pytest.mark.parametrize(("dims", "crop"), [(3, (12, 32, 32)), (2, (16, 32, 36))])
def test_crop_not_divisible_by_the_total_stride_is_a_config_error(dims, crop):
    with pytest.raises(ConfigError, match=r"networks.crop_size .* total stride \[8, 8"):
        build_multitask(_cfg(dims, crop), in_channels=1)
    with pytest.raises(ConfigError, match="head_stages"):
        build_multitask(_cfg(3, head_stages=5), in_channels=1)


# ============================================================================ nnU-Net initialisation (tiny model)
NNUNET_CROP = (8, 32, 32)  # the tiny 2d plans stride 16 in-plane


@pytest.mark.slow
def test_nnunet_init_loads_every_encoder_tensor(tiny_nnunet):
    model = tiny_nnunet["model"]
    net, report = build_from_nnunet(_cfg(2, NNUNET_CROP, encoder="nnunet"), model, in_channels=1, n_clinical=2)
    weights = torch.load(model / "fold_all" / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    encoder = {k: v for k, v in net.unet.state_dict().items() if k.startswith("encoder.")}
    assert report["encoder_tensors"] == len(encoder) > 0
    assert report["encoder_loaded"] == len(encoder)
    assert all(torch.equal(encoder[k], weights[k]) for k in encoder)
    seg_keys = sorted(k for k in weights if k.startswith("decoder.seg_layers."))
    assert seg_keys and report["skipped"] == seg_keys
    assert all(layer.out_channels == 2 for layer in net.unet.decoder.seg_layers)
    decoder = [k for k in weights if k.startswith("decoder.") and not k.startswith(("decoder.encoder.",
                                                                                    "decoder.seg_layers."))]
    assert report["decoder_loaded"] == len(decoder) > 0
    assert report["configuration"] == "2d" and report["fold"] == "all" and len(report["checkpoint_sha256"]) == 64
    seg, cls_logit, risk = net(torch.randn(2, 1, 32, 32), torch.randn(2, 2))
    assert seg.shape == (2, 2, 32, 32) and cls_logit.shape == risk.shape == (2,)


@pytest.mark.slow
def test_nnunet_init_fails_clearly_on_what_does_not_fit(tiny_nnunet, tmp_path):
    model = tiny_nnunet["model"]
    with pytest.raises(ConfigError, match=r"networks.dims is 3 but the nnU-Net model is 2D .*plans.json"):
        build_from_nnunet(_cfg(3, NNUNET_CROP, encoder="nnunet"), model, in_channels=1)
    with pytest.raises(ConfigError, match=r"takes 1 input channel.*dataset.json.*gets 2"):
        build_from_nnunet(_cfg(2, NNUNET_CROP, encoder="nnunet"), model, in_channels=2)
    with pytest.raises(ConfigError, match=r"networks.crop_size .*\[40, 40\].*total stride \[16, 16\]"):
        build_from_nnunet(_cfg(2, (8, 40, 40), encoder="nnunet"), model, in_channels=1)

    edited = tmp_path / "edited_model"
    shutil.copytree(model, edited)
    plans = json.loads((edited / "plans.json").read_text())
    arch = plans["configurations"]["2d"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [f * 2 for f in arch["features_per_stage"]]
    (edited / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(ConfigError, match=r"fold_all/checkpoint_final.pth do not fit the network built from .*"
                                          r"edited_model/plans.json"):
        build_from_nnunet(_cfg(2, NNUNET_CROP, encoder="nnunet"), edited, in_channels=1)
