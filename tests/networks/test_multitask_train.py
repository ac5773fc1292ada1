"""Training the multitask network (seed 004): each head learns a planted signal (the segmentation a blob, the
classification and the Cox risk a latent value), rows outside the training partition change nothing (inputs,
outcomes, masks and clinical values), a training row without a manual mask gives no segmentation signal, the
segmentation warm-up is kept out of the choice of the epoch, and a saved network predicts as the trained one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radstudy.concordance import auc, harrell_c
from radstudy.errors import ConfigError
from radstudy.networks.train import dice, load_network, predict_multitask, save_network, train_multitask

SIZE = 16
CFG = {"crop_size": [SIZE] * 3, "epochs": 10, "batch_size": 8, "early_stopping_patience": 4,
       "learning_rate": 0.003, "threads": 1, "augmentation": {"rotate_degrees": 0, "scale": 0},
       "multitask": {"features_per_stage": [4, 8, 16], "n_conv_per_stage": 1}}


def _study(n: int = 160, seed: int = 0, n_train: int = 96):
    """Crops with a bright blob (the 'tumour', also the mask) whose brightness and radius grow with a latent signal;
    y = signal > 0, survival time falls with it."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    axes = np.stack(np.meshgrid(*[np.arange(SIZE) - SIZE / 2 + 0.5] * 3, indexing="ij"))
    centre = rng.integers(-2, 3, size=(n, 3)).reshape(n, 3, 1, 1, 1)
    distance = np.sqrt(((axes[None] - centre) ** 2).sum(axis=1))
    radius = np.clip(3.5 + 0.8 * signal, 1.5, 6).reshape(n, 1, 1, 1)
    mask = (distance < radius).astype(np.uint8)
    brightness = (1.5 + 0.6 * signal).reshape(n, 1, 1, 1)
    images = (rng.normal(scale=0.5, size=(n, SIZE, SIZE, SIZE)) + mask * brightness)[:, None].astype(np.float32)
    time = np.exp(-1.5 * signal + 0.3 * rng.normal(size=n))
    event = (rng.random(n) < 0.75).astype(float)
    target = {"y": (signal > 0).astype(float), "time": time, "event": event}
    train = np.arange(n) < n_train
    return images, target, mask, train


def test_each_head_learns_its_planted_signal_on_held_out_rows():
    images, target, mask, train = _study()
    has_mask = train & (np.arange(len(train)) % 2 == 0)  # half of the training rows annotated
    trained = train_multitask(images, None, target, mask, has_mask, train, CFG, seed=3)
    out = predict_multitask(trained, images)
    held = ~train
    assert auc(target["y"][held], out["logit"][held]) > 0.85
    assert harrell_c(target["time"][held], target["event"][held], out["risk"][held]) > 0.75
    dices = [dice(p > 0.5, m > 0) for p, m in zip(out["probability_map"][held], mask[held])]
    assert np.median(dices) > 0.7
    history = trained.history
    assert {"inner_auc", "inner_dice"} <= set(history.columns) and history["inner_dice"].max() > 0.5
    assert trained.best_epoch == int(history.loc[history["inner_loss"].idxmin(), "epoch"])


def test_rows_outside_the_training_partition_and_training_rows_without_a_mask_change_nothing():
    images, target, mask, train = _study(n=80, n_train=48)
    has_mask = train & (np.arange(len(train)) % 3 != 0)
    clinical = np.random.default_rng(8).normal(size=(len(train), 2))
    cfg = {**CFG, "epochs": 3, "early_stopping_patience": 1}
    first = train_multitask(images, clinical, target, mask, has_mask, train, cfg, seed=9)

    rng = np.random.default_rng(10)
    images2, clinical2, mask2 = images.copy(), clinical.copy(), mask.copy()
    images2[~train] = rng.normal(size=images2[~train].shape) * 3
    clinical2[~train] = rng.normal(size=clinical2[~train].shape) * 100
    mask2[~has_mask] = rng.integers(0, 2, size=mask2[~has_mask].shape)  # held-out and unannotated rows' masks
    target2 = {k: np.where(train, v, np.nan) for k, v in target.items()}
    second = train_multitask(images2, clinical2, target2, mask2, has_mask, train, cfg, seed=9)

    assert first.best_epoch == second.best_epoch
    assert first.history.drop(columns=["seconds", "inner_seconds"]).equals(
        second.history.drop(columns=["seconds", "inner_seconds"]))
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    a, b = (predict_multitask(t, i[train], c[train]) for t, i, c in ((first, images, clinical),
                                                                   (second, images2, clinical2)))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # ... while the mask of an annotated row that the network is fitted on (not an inner row) changes the weights
    mask3 = mask.copy()
    mask3[np.setdiff1d(np.flatnonzero(has_mask), first.inner_rows)[0]] = 0
    third = train_multitask(images, clinical, target, mask3, has_mask, train, cfg, seed=9)
    assert any(not torch.equal(v, third.model.state_dict()[k]) for k, v in first.model.state_dict().items())


def test_one_endpoint_missing_for_some_training_rows_and_the_warmup_is_not_a_kept_epoch():
    images, target, mask, train = _study(n=80, n_train=48)
    target = {k: v.copy() for k, v in target.items()}
    target["y"][:10] = np.nan  # a binary outcome unknown, the survival known
    cfg = {**CFG, "epochs": 4, "early_stopping_patience": None, "multitask": {**CFG["multitask"], "warmup_epochs": 2}}
    trained = train_multitask(images, None, target, mask, train, train, cfg, seed=4)
    assert trained.best_epoch > 2 and len(trained.history) == 4
    # a warm-up as long as the training would leave the prediction heads untrained: refused, naming both settings
    with pytest.raises(ConfigError, match=r"multitask.warmup_epochs \(4\) must be below networks.epochs \(4\)"):
        train_multitask(images, None, target, mask, train, train,
                        {**cfg, "multitask": {**cfg["multitask"], "warmup_epochs": 4}}, seed=4)


def test_a_saved_multitask_network_predicts_as_the_trained_one(tmp_path):
    images, target, mask, train = _study(n=60, n_train=40)
    trained = train_multitask(images, None, target, mask, train, train, {**CFG, "epochs": 2}, seed=5)
    save_network(trained, tmp_path / "multitask.pt")
    loaded = load_network(tmp_path / "multitask.pt")
    a, b = predict_multitask(trained, images), predict_multitask(loaded, images)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert list(loaded.history.columns) == list(trained.history.columns)


@pytest.mark.slow
def test_training_starts_from_the_study_nnunet_and_the_saved_network_is_rebuilt_from_its_plans(tiny_nnunet,
                                                                                                 tmp_path):
    """multitask.encoder nnunet (2d crops, as the tiny nnU-Net): training starts from its weights (the load report
    travels with the network) and a saved network loads back onto the same architecture."""
    images, target, mask, train = _study(n=40, n_train=30)
    images2d = images[:, :, SIZE // 2].repeat(2, -1).repeat(2, -2)  # 32 x 32 slices: the tiny plans stride 16
    mask2d = mask[:, SIZE // 2].repeat(2, -1).repeat(2, -2)
    cfg = {**CFG, "dims": 2, "crop_size": [8, 32, 32], "epochs": 2,
           "multitask": {"encoder": "nnunet"}}
    trained = train_multitask(images2d, None, target, mask2d, train, train, cfg, seed=6, channels=["CT"],
                              nnunet_model=tiny_nnunet["model"])
    assert trained.pretrained["encoder_loaded"] == trained.pretrained["encoder_tensors"] > 0
    with pytest.raises(ConfigError, match=r"takes the channels \['CT'\].*hold \['T2'\]"):
        train_multitask(images2d, None, target, mask2d, train, train, cfg, seed=6, channels=["T2"],
                        nnunet_model=tiny_nnunet["model"])
    save_network(trained, tmp_path / "multitask.pt")
    loaded = load_network(tmp_path / "multitask.pt")
    a, b = predict_multitask(trained, images2d), predict_multitask(loaded, images2d)
    assert all(np.allclose(a[k], b[k], atol=1e-6) for k in a)
