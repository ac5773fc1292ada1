"""Training end-to-end networks: planted signals are learned, permuted labels are not, runs are reproducible, rows
outside the training partition change nothing, and a saved network scores new rows as the trained one does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radstudy.concordance import auc, harrell_c
from radstudy.config import settings
from radstudy.networks.train import (
    ClinicalNormaliser,
    _augment,
    _batches,
    load_network,
    predict,
    save_network,
    train_network,
)

SIZE = 16
CFG = {"architecture": "resnet10", "widen_factor": 0.125, "crop_size": [SIZE] * 3, "epochs": 12, "batch_size": 8,
       "early_stopping_patience": 4, "learning_rate": 0.003, "threads": 1}
# one thread: on a machine whose cores are busy with other jobs, 2 threads can run 10-100x slower


def _blobs(n: int, *, seed: int, dims: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Noisy crops with a blob near the centre whose brightness and radius grow with a latent signal (N(0, 1))."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=n)
    axes = np.stack(np.meshgrid(*[np.arange(SIZE) - SIZE / 2 + 0.5] * dims, indexing="ij"))
    centre = rng.integers(-2, 3, size=(n, dims)).reshape(n, dims, *[1] * dims)
    distance = np.sqrt(((axes[None] - centre) ** 2).sum(axis=1))
    radius = np.clip(3.5 + 0.8 * signal, 1.5, 6).reshape(n, *[1] * dims)
    brightness = (1.5 + 0.6 * signal).reshape(n, *[1] * dims)
    images = rng.normal(scale=0.5, size=(n, *[SIZE] * dims)) + (distance < radius) * brightness
    return images[:, None].astype(np.float32), signal


def _binary(n: int = 240, seed: int = 0, n_train: int = 96):
    images, signal = _blobs(n, seed=seed)
    train = np.zeros(n, bool)
    train[:n_train] = True
    return images, (signal > 0).astype(float), train


def _survival(n: int = 200, seed: int = 1, n_train: int = 96):
    images, signal = _blobs(n, seed=seed)
    rng = np.random.default_rng(seed + 100)
    time = np.exp(-1.5 * signal + 0.3 * rng.normal(size=n))
    event = (rng.random(n) < 0.75).astype(float)
    train = np.zeros(n, bool)
    train[:n_train] = True
    return images, {"time": time, "event": event}, train


def _history(trained):
    return trained.history.drop(columns=["seconds", "inner_seconds"])


def test_planted_signal_separates_held_out_rows_and_early_stopping_keeps_the_best_epoch():
    images, y, train = _binary()
    trained = train_network(images, None, {"y": y}, "binary", train, CFG, seed=3)
    history = trained.history
    assert trained.best_epoch == int(history.loc[history["inner_loss"].idxmin(), "epoch"])
    assert len(history) <= trained.best_epoch + CFG["early_stopping_patience"]
    assert history.loc[trained.best_epoch - 1, "inner_metric"] > 0.9
    score = predict(trained, images)
    assert auc(y[~train], score[~train]) > 0.9
    assert set(trained.inner_rows) < set(np.flatnonzero(train))


def test_permuted_labels_give_chance_on_held_out_rows():
    images, y, train = _binary()
    permuted = np.random.default_rng(7).permutation(y)
    trained = train_network(images, None, {"y": permuted}, "binary", train, CFG, seed=3)
    assert abs(auc(permuted[~train], predict(trained, images)[~train]) - 0.5) < 0.15


def test_survival_network_learns_a_planted_risk():
    images, target, train = _survival()
    trained = train_network(images, None, target, "survival", train, CFG, seed=4)
    score = predict(trained, images)
    assert harrell_c(target["time"][~train], target["event"][~train], score[~train]) > 0.8
    assert trained.history["inner_metric"].max() > 0.75


def test_two_runs_with_the_same_seed_give_identical_predictions_and_another_seed_does_not():
    images, y, train = _binary(n=120, n_train=64)
    cfg = {**CFG, "epochs": 3}
    first, second, other = (train_network(images, None, {"y": y}, "binary", train, cfg, seed=s) for s in (5, 5, 6))
    assert np.array_equal(predict(first, images), predict(second, images))
    assert _history(first).equals(_history(second))
    assert not np.array_equal(predict(first, images), predict(other, images))


def _clinical(n: int, seed: int) -> np.ndarray:
    clinical = np.random.default_rng(seed).normal(size=(n, 3)) * [1.0, 10.0, 0.1] + [0, 50, 2]
    clinical[::5, 1] = np.nan
    return clinical


@pytest.mark.parametrize("endpoint", ["binary", "survival"])
def test_rows_outside_the_training_partition_change_no_weight_epoch_or_training_prediction(endpoint):
    """Validation and test rows get other outcomes (or none), other images and other clinical values."""
    images, target, train = (_survival(n=120, n_train=64) if endpoint == "survival" else
                             (lambda i, y, t: (i, {"y": y}, t))(*_binary(n=120, n_train=64)))
    clinical = _clinical(len(images), seed=8)
    cfg = {**CFG, "epochs": 4, "early_stopping_patience": 1}
    first = train_network(images, clinical, target, endpoint, train, cfg, seed=9)

    rng = np.random.default_rng(10)
    images2, clinical2 = images.copy(), clinical.copy()
    images2[~train] = rng.normal(size=images2[~train].shape) * 3
    clinical2[~train] = rng.normal(size=clinical2[~train].shape) * 100
    target2 = {k: v.copy() for k, v in target.items()}
    for key in target2:
        target2[key][~train] = np.nan
    second = train_network(images2, clinical2, target2, endpoint, train, cfg, seed=9)

    assert first.best_epoch == second.best_epoch
    assert _history(first).equals(_history(second))
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key
    assert np.array_equal(first.normaliser.means, second.normaliser.means)
    assert np.array_equal(first.normaliser.scales, second.normaliser.scales)
    assert np.array_equal(predict(first, images[train], clinical[train]),
                          predict(second, images2[train], clinical2[train]))


def test_clinical_values_are_imputed_and_scaled_with_training_statistics():
    clinical = np.array([[1.0, 10.0], [3.0, np.nan], [np.nan, 30.0], [5.0, 30.0]])
    normaliser = ClinicalNormaliser.fit(clinical)
    assert np.allclose(normaliser.means, [3.0, 70 / 3])
    assert np.allclose(normaliser.scales, [np.std([1, 3, 5]), np.std([10, 30, 30])])
    out = normaliser.transform(np.array([[np.nan, np.nan], [5.0, 10.0]]))
    assert out.dtype == np.float32 and np.allclose(out[0], 0.0)
    assert np.allclose(out[1], [(5 - 3) / np.std([1, 3, 5]), (10 - 70 / 3) / np.std([10, 30, 30])])
    assert ClinicalNormaliser.fit(np.array([[2.0], [2.0]])).scales[0] == 1.0
    with pytest.raises(ValueError, match=r"clinical column\(s\) \[1\] have no value in the training partition"):
        ClinicalNormaliser.fit(np.array([[1.0, np.nan], [2.0, np.nan]]))


def test_saved_network_scores_new_rows_as_the_trained_one(tmp_path):
    images, y, train = _binary(n=60, n_train=40)
    clinical = _clinical(60, seed=11)
    trained = train_network(images, clinical, {"y": y}, "binary", train, {**CFG, "epochs": 2}, seed=12,
                            channels=["portal"])
    save_network(trained, tmp_path / "binary" / "cnn_clinical.pt")
    loaded = load_network(tmp_path / "binary" / "cnn_clinical.pt")
    assert np.array_equal(predict(loaded, images, clinical), predict(trained, images, clinical))
    assert loaded.channels == ["portal"] and loaded.best_epoch == trained.best_epoch
    assert loaded.versions["torch"] == torch.__version__ and loaded.history.equals(trained.history)
    with pytest.raises(ValueError, match="clinical data must be given exactly when"):
        predict(loaded, images)
    with pytest.raises(ValueError, match=r"1 channels: portal"):
        predict(loaded, np.concatenate([images, images], axis=1), clinical)
    (tmp_path / "other.pt").write_bytes(b"nothing")
    with pytest.raises(ValueError, match=r"other\.pt cannot be read"):
        load_network(tmp_path / "other.pt")


def test_two_dimensional_network_trains_on_slices():
    images, signal = _blobs(60, seed=13, dims=2)
    train = np.arange(60) < 40
    cfg = settings("networks", {**CFG, "dims": 2, "epochs": 2})
    trained = train_network(images, None, {"y": (signal > 0).astype(float)}, "binary", train, cfg, seed=14)
    assert predict(trained, images).shape == (60,) and len(trained.history) == 2


def test_survival_batches_each_hold_an_event_and_use_every_row_once():
    generator = torch.Generator().manual_seed(0)
    events = np.zeros(50, bool)
    events[[3, 17, 40, 41, 42, 43]] = True
    batches = _batches(events, 8, generator, survival=True)
    assert len(batches) == 6 and all(events[b].any() and 8 <= len(b) <= 15 for b in batches)
    assert sorted(np.concatenate(batches)) == list(range(50))
    few = _batches(events[:20] & False | (np.arange(20) == 5), 4, generator, survival=True)
    assert len(few) == 1 and len(few[0]) == 20  # one event: one batch holding every row


def test_binary_batches_spread_both_classes():
    generator = torch.Generator().manual_seed(1)
    positive = np.arange(40) % 4 == 0
    batches = _batches(positive, 8, generator, survival=False)
    assert [positive[b].sum() for b in batches] == [2] * 5


def test_augmentation_flips_rotates_scales_and_shifts_only_the_image_channels():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(16, 2, 8, 8, 8)
    flip_only = _augment(x.clone(), generator, {"flip": True, "rotate_degrees": 0, "scale": 0,
                                                "intensity_shift": 0}, image_channels=2)
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(flip_only, x)])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(flip_only, x)])
    assert (flipped | same).all() and flipped.any() and same.any()
    shifted = _augment(x.clone(), generator, {"flip": False, "rotate_degrees": 0, "scale": 0,
                                              "intensity_shift": 0.5}, image_channels=1)
    delta = (shifted - x)[:, 0].flatten(1)
    assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-6) and delta.abs().max() <= 0.5
    assert torch.equal(shifted[:, 1], x[:, 1])  # the mask channel keeps its values
    warped = _augment(torch.ones(4, 1, 8, 8, 8), generator, {"flip": True, "rotate_degrees": 20, "scale": 0.2,
                                                             "intensity_shift": 0}, image_channels=1)
    assert warped.shape == (4, 1, 8, 8, 8) and not torch.equal(warped, torch.ones_like(warped))


def test_separable_augmentation_equals_a_trilinear_3d_resampling_with_the_same_affine():
    """The rotation about z and the isotropic zoom are applied as a 2D grid_sample of the axial planes and a linear
    resampling along z: the result must be torch's 3D grid_sample with the same (flip x rotation x zoom) affine."""
    x = torch.randn(6, 2, 12, 10, 8)
    aug = {"flip": True, "rotate_degrees": 20, "scale": 0.4, "intensity_shift": 0}
    out = _augment(x.clone(), torch.Generator().manual_seed(3), aug, image_channels=2)
    u = torch.rand(6, 3, generator=torch.Generator().manual_seed(3))  # the draws _augment makes, in its order
    flip = torch.where(u[:, 0] < 0.5, -1.0, 1.0)
    angle, zoom = (u[:, 1] * 2 - 1) * np.radians(20), 1 + (u[:, 2] * 2 - 1) * 0.4
    theta = torch.zeros(6, 3, 4)
    theta[:, 0, 0], theta[:, 0, 1] = torch.cos(angle) * zoom * flip, -torch.sin(angle) * zoom
    theta[:, 1, 0], theta[:, 1, 1] = torch.sin(angle) * zoom * flip, torch.cos(angle) * zoom
    theta[:, 2, 2] = zoom
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    expected = torch.nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False)
    assert torch.allclose(out, expected, atol=1e-5)
    assert (flip < 0).any() and (flip > 0).any() and (zoom > 1.2).any() and (zoom < 0.8).any()


def test_predictions_see_no_augmentation():
    images, y, train = _binary(n=40, n_train=30)
    trained = train_network(images, None, {"y": y}, "binary", train, {**CFG, "epochs": 1}, seed=15)
    with torch.no_grad():
        direct = trained.model.eval()(torch.from_numpy(images)).numpy()
    assert np.allclose(predict(trained, images), direct, atol=1e-6)


def test_bad_training_data_is_named():
    images, y, train = _binary(n=40, n_train=30)
    bad = y.copy()
    bad[4] = np.nan
    with pytest.raises(ValueError, match=r"target 'y' of training row\(s\) \[4\] is \[nan\]"):
        train_network(images, None, {"y": bad}, "binary", train, CFG, seed=1)
    one_positive = np.zeros(40)
    one_positive[0] = 1
    with pytest.raises(ValueError, match=r">= 2 rows of each outcome class .* \{0: 29, 1: 1\}"):
        train_network(images, None, {"y": one_positive}, "binary", train, CFG, seed=1)
    with pytest.raises(ValueError, match="boolean mask of length 40"):
        train_network(images, None, {"y": y}, "binary", np.flatnonzero(train), CFG, seed=1)
    with pytest.raises(ValueError, match="clinical has 39 rows, the inputs have 40"):
        train_network(images, np.zeros((39, 2)), {"y": y}, "binary", train, CFG, seed=1)
    broken = images.copy()
    broken[7, 0, 1, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"input row\(s\) \[7\] hold NaN"):
        train_network(broken, None, {"y": y}, "binary", train, CFG, seed=1)


def test_torch_threads_and_random_state_are_restored():
    images, y, train = _binary(n=40, n_train=30)
    threads = torch.get_num_threads()
    state = torch.random.get_rng_state()
    train_network(images, None, {"y": y}, "binary", train, {**CFG, "epochs": 1, "threads": 2}, seed=1)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)
