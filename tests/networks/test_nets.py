"""FusionNet: MONAI ResNet backbones, late clinical fusion, and pretrained checkpoints loaded strictly."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import ResNet

from radstudy.config import settings
from radstudy.features import deep
from radstudy.networks.nets import build_network, load_pretrained

WIDEN = 0.125


def _cfg(**changes) -> dict:
    return settings("networks", {"architecture": "resnet10", "widen_factor": WIDEN, **changes})


def _reference(dims: int, in_channels: int, **kwargs) -> ResNet:
    """A MONAI ResNet10 in the checkpoints' layout (MedicalNet for 3D, torchvision for 2D), as a user would save."""
    return ResNet("basic", [1, 1, 1, 1], [64, 128, 256, 512], spatial_dims=dims, n_input_channels=in_channels,
                  conv1_t_stride=2, shortcut_type="B", bias_downsample=False, widen_factor=WIDEN,
                  feed_forward=False, **kwargs)


@pytest.mark.parametrize("dims", [3, 2])
@pytest.mark.parametrize("architecture", ["resnet10", "resnet18", "resnet34"])
def test_network_scores_one_number_per_row_with_and_without_clinical_data(dims, architecture):
    cfg = _cfg(dims=dims, architecture=architecture)
    image = torch.randn(3, 2, *[16] * dims)
    net = build_network(cfg, in_channels=2, n_clinical=4).eval()
    assert net(image, torch.randn(3, 4)).shape == (3,)
    assert net.embed(image).shape == (3, int(512 * WIDEN))
    with pytest.raises(ValueError, match="fuses 4 clinical predictors, got none"):
        net(image)
    alone = build_network(cfg, in_channels=2).eval()
    assert alone(image).shape == (3,)
    with pytest.raises(ValueError, match="no clinical input"):
        alone(image, torch.randn(3, 4))


def test_stem_stride_and_width_follow_the_config():
    wide = build_network(_cfg(widen_factor=0.25, stem_stride=1), in_channels=1)
    assert wide.backbone.conv1.stride == (1, 1, 1)
    assert wide.backbone.conv1.out_channels == 16
    assert build_network(_cfg(), in_channels=1).backbone.conv1.stride == (2, 2, 2)


def test_clinical_data_changes_the_score_of_the_fused_network():
    net = build_network(_cfg(), in_channels=1, n_clinical=2).eval()
    image = torch.randn(1, 1, 16, 16, 16).repeat(2, 1, 1, 1, 1)
    out = net(image, torch.tensor([[0.0, 0.0], [3.0, -3.0]]))
    assert out[0] != out[1]


def _variants(state: dict) -> dict[str, dict]:
    """The ways users hand over the same weights: plain, under state_dict, DataParallel's module. prefix, and
    MedicalNet's published layout (state_dict, module. prefix and its segmentation head conv_seg)."""
    prefixed = {f"module.{k}": v for k, v in state.items()}
    head = {"module.conv_seg.0.weight": torch.randn(4, 64, 3, 3, 3), "module.conv_seg.1.weight": torch.randn(4)}
    return {"plain": state, "state_dict": {"state_dict": state, "epoch": 3}, "module": prefixed,
            "medicalnet": {"state_dict": {**prefixed, **head}}}


@pytest.mark.parametrize("variant", ["plain", "state_dict", "module", "medicalnet"])
def test_checkpoint_loads_the_whole_backbone_in_every_variant(variant, tmp_path):
    torch.manual_seed(0)
    source = _reference(3, 1)
    path = tmp_path / "resnet_10.pth"
    torch.save(_variants(source.state_dict())[variant], path)
    net = build_network(_cfg(), in_channels=1, n_clinical=2)
    head_before = net.head.weight.detach().clone()
    report = load_pretrained(net, path, dims=3)
    for key, value in source.state_dict().items():
        assert torch.equal(net.backbone.state_dict()[key], value), key
    assert torch.equal(net.head.weight, head_before)  # head and fusion keep their initialisation
    assert report["loaded"] == len(source.state_dict())
    assert report["first_conv"] == "none" and report["layout"] == "MedicalNet"
    assert report["ignored"] == (["conv_seg.0.weight", "conv_seg.1.weight"] if variant == "medicalnet" else [])
    image = torch.randn(2, 1, 16, 16, 16)
    assert torch.allclose(net.eval().embed(image), source.eval()(image))


def test_torchvision_layout_2d_checkpoint_with_its_classifier_loads_and_adapts_three_channels_to_one(tmp_path):
    torch.manual_seed(1)
    source = _reference(2, 3)
    state = {**source.state_dict(), "fc.weight": torch.randn(1000, 64), "fc.bias": torch.randn(1000)}
    torch.save(state, tmp_path / "resnet.pth")
    net = build_network(_cfg(dims=2), in_channels=1)
    report = load_pretrained(net, tmp_path / "resnet.pth", dims=2)
    assert report["layout"] == "torchvision" and report["ignored"] == ["fc.bias", "fc.weight"]
    assert report["first_conv"].startswith("3 -> 1")
    assert torch.allclose(net.backbone.conv1.weight[:, 0], source.conv1.weight.sum(dim=1), atol=1e-6)


def test_first_conv_adaptation_from_one_to_two_channels_keeps_the_response_to_a_repeated_image(tmp_path):
    """The documented rule: each new channel gets the mean kernel x c / k, so an image given in both channels
    gives the checkpoint's own embedding."""
    torch.manual_seed(2)
    source = _reference(3, 1)
    torch.save({"state_dict": source.state_dict()}, tmp_path / "one.pth")
    net = build_network(_cfg(), in_channels=2)
    report = load_pretrained(net, tmp_path / "one.pth", dims=3)
    assert report["first_conv"] == "1 -> 2 input channels (mean kernel x 1/2)"
    assert torch.allclose(net.backbone.conv1.weight, source.conv1.weight.repeat(1, 2, 1, 1, 1) / 2)
    image = torch.randn(2, 1, 16, 16, 16)
    assert torch.allclose(net.eval().embed(image.repeat(1, 2, 1, 1, 1)), source.eval()(image), atol=1e-5)


@pytest.mark.parametrize("architecture, dims, shortcut", [("resnet10", 3, "B"), ("resnet18", 3, "A"),
                                                         ("resnet18", 2, "B")])
def test_the_published_layouts_load_at_full_width(architecture, dims, shortcut, tmp_path):
    """Against features.deep's independent ResNets in MedicalNet's layout (3D: resnet10 with convolutional
    shortcuts, resnet18 with zero-padding ones) and torchvision's (2D; its parameter count is checked there)."""
    source = deep.ResNet(int(architecture[6:]), dims, shortcut=shortcut)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}  # old files
    torch.save(state, tmp_path / "published.pth")
    net = build_network(_cfg(architecture=architecture, dims=dims, widen_factor=1.0), in_channels=1 if dims == 3 else 3)
    report = load_pretrained(net, tmp_path / "published.pth", dims=dims)
    assert report["loaded"] == len(state) and report["ignored"] == [] and report["first_conv"] == "none"
    for key, value in state.items():
        assert torch.equal(net.backbone.state_dict()[key], value), key
    if dims == 2:  # torchvision's resnet18 has 11,689,512 parameters with its 1000-class fc layer
        assert sum(p.numel() for p in net.backbone.parameters()) == 11_689_512 - (512 * 1000 + 1000)


def test_a_checkpoint_of_another_network_fails_naming_the_missing_and_unexpected_keys(tmp_path):
    torch.save(_reference(3, 1).state_dict(), tmp_path / "resnet10.pth")
    net18 = build_network(_cfg(architecture="resnet18"), in_channels=1)
    with pytest.raises(ValueError, match=r"resnet10\.pth does not fit .*missing keys: layer1\.1\.bn1\.bias") as error:
        load_pretrained(net18, tmp_path / "resnet10.pth", dims=3)
    assert "unexpected keys: layer2.0.downsample.0.weight" in str(error.value)  # resnet10 has conv shortcuts


def test_a_checkpoint_lacking_keys_or_of_another_width_fails_naming_them(tmp_path):
    state = _reference(3, 1).state_dict()
    del state["layer4.0.bn2.weight"]
    torch.save({"state_dict": state}, tmp_path / "cut.pth")
    with pytest.raises(ValueError, match=r"missing keys: layer4\.0\.bn2\.weight$"):
        load_pretrained(build_network(_cfg(), in_channels=1), tmp_path / "cut.pth", dims=3)
    with pytest.raises(ValueError, match=r"wrong shapes: bn1\.bias \(8,\) \(expected \(16,\)\)"):
        load_pretrained(build_network(_cfg(widen_factor=0.25), in_channels=1), tmp_path / "cut.pth", dims=3)


def test_a_3d_checkpoint_does_not_load_into_the_2d_network(tmp_path):
    torch.save(_reference(3, 1).state_dict(), tmp_path / "3d.pth")
    with pytest.raises(ValueError, match=r"wrong shapes: conv1\.weight"):
        load_pretrained(build_network(_cfg(dims=2), in_channels=1), tmp_path / "3d.pth", dims=2)


def test_the_layout_asked_for_must_be_the_networks(tmp_path):
    torch.save(_reference(3, 1).state_dict(), tmp_path / "3d.pth")
    with pytest.raises(ValueError, match="dims 2 for a 3D network"):
        load_pretrained(build_network(_cfg(), in_channels=1), tmp_path / "3d.pth", dims=2)


def test_a_file_that_is_no_checkpoint_fails_naming_it(tmp_path):
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"notes\.pth cannot be read"):
        load_pretrained(build_network(_cfg(), in_channels=1), tmp_path / "notes.pth", dims=3)
