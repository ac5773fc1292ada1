"""ComBat harmonisation: reference outputs of R neuroCombat, and properties that matter for the study."""

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone

from radstudy.statistics.harmonize import ComBat

REF = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "combat"
OUTPUTS = sorted((REF / "output").glob("testdata_combat_*_r.csv")) if REF.is_dir() else []
SCENARIO2 = REF / "output" / "training_test_scenario2_r.csv"
BATCH = np.array([1, 1, 1, 1, 1, 2, 2, 2, 2, 2])
PHENO = pd.DataFrame({"pheno": [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]})
TOL = 1e-6


def _settings(name):
    """ComBat keyword arguments and covariate flag encoded in an R reference file name."""
    tokens = name.removeprefix("testdata_combat_").removesuffix("_r.csv").split("_")
    prior, design, flags = tokens[0], tokens[1], set(tokens[2:])
    assert prior in ("parametric", "nonparametric") and design in ("adjusted", "unadjusted"), name
    assert flags <= {"noeb", "meanonly", "meanonl", "batchref"}, f"unknown setting in {name}"
    kwargs = dict(
        parametric=prior == "parametric",
        eb="noeb" not in flags,
        mean_only=bool(flags & {"meanonly", "meanonl"}),  # the authors' typo `meanonl` is the same setting
        ref_batch=1 if "batchref" in flags else None,
    )
    return kwargs, design == "adjusted"


def _testdata():
    return pd.read_csv(REF / "input" / "testdata.csv").T  # features x samples in the file


@pytest.mark.reference
def test_every_reference_output_is_covered():
    if not REF.is_dir():
        pytest.skip(f"reference data absent: {REF}")
    names = sorted(p.name for p in (REF / "output").iterdir())
    assert len(OUTPUTS) == 33  # 2 priors x 2 designs x 8 (noeb/meanonly/batchref), plus the `meanonl` copy
    assert names == sorted([p.name for p in OUTPUTS] + [SCENARIO2.name])
    assert "testdata_combat_nonparametric_unadjusted_meanonl_batchref_r.csv" in names


@pytest.mark.reference
@pytest.mark.parametrize(
    "path",
    OUTPUTS or [pytest.param(None, marks=pytest.mark.skip(reason=f"reference data absent: {REF}"))],
    ids=lambda p: p.name.removeprefix("testdata_combat_").removesuffix("_r.csv") if p else "absent",
)
def test_matches_r_neurocombat(path):
    kwargs, adjusted = _settings(path.name)
    X = _testdata()
    expected = pd.read_csv(path).T
    assert expected.shape == X.shape == (10, 200)
    model = ComBat(**kwargs)
    out = model.fit_transform(X, BATCH, PHENO if adjusted else None)
    assert isinstance(out, pd.DataFrame) and list(out.index) == list(X.index)
    assert np.abs(out.to_numpy() - expected.to_numpy()).max() <= TOL
    if kwargs["ref_batch"] is not None:  # the reference batch is left unchanged
        np.testing.assert_array_equal(out.to_numpy()[BATCH == 1], X.to_numpy()[BATCH == 1])
        assert model.batches_.tolist() == [1, 2]
        np.testing.assert_array_equal(model.gamma_star_[0], 0.0)
        np.testing.assert_array_equal(model.delta_star_[0], 1.0)


@pytest.mark.reference
def test_matches_r_neurocombat_from_training():
    if not SCENARIO2.exists():
        pytest.skip(f"reference data absent: {REF}")
    X = _testdata()
    model = ComBat().fit(X, BATCH, PHENO)
    test = [0, 1, 5, 6]
    out = model.transform(X.iloc[test], BATCH[test])  # no covariates: training-mean imputation, as in R
    expected = pd.read_csv(SCENARIO2).T
    assert list(expected.index) == list(out.index) == ["V1", "V2", "V6", "V7"]
    assert np.abs(out.to_numpy() - expected.to_numpy()).max() <= TOL
    # with the covariates, transform reproduces fit_transform's rows instead
    full = model.transform(X, BATCH, PHENO)
    np.testing.assert_allclose(model.transform(X.iloc[test], BATCH[test], PHENO.iloc[test]), full.iloc[test])
    assert np.abs(out.to_numpy() - full.iloc[test].to_numpy()).max() > 1e-3


# ----------------------------------------------------------------- synthetic data
def _synthetic(n_per=(30, 25, 35), p=12, seed=0, group_effect=2.0):
    """Three batches with strong additive and multiplicative effects, a protected categorical covariate
    (unbalanced across batches) and a numeric one."""
    rng = np.random.default_rng(seed)
    batch = np.repeat(["A", "B", "C"], n_per)
    n = len(batch)
    prop = {"A": 0.7, "B": 0.3, "C": 0.5}
    group = np.array([rng.random() < prop[b] for b in batch])
    age = rng.normal(60, 10, n)
    mu, sd = rng.normal(0, 3, p), rng.uniform(0.5, 2, p)
    shift = {"A": sd * rng.normal(4, 0.5, p), "B": sd * rng.normal(-3, 0.5, p), "C": np.zeros(p)}
    scale = {"A": 2.0, "B": 0.5, "C": 1.0}
    X = np.empty((n, p))
    for i, b in enumerate(batch):
        X[i] = (
            mu
            + group_effect * group[i]
            + 0.05 * (age[i] - 60)
            + shift[b]
            + scale[b] * sd * rng.normal(size=p)
        )
    cov = pd.DataFrame({"histology": np.where(group, "adeno", "squamous"), "age": age})
    cols = [f"f{j}" for j in range(p)]
    return pd.DataFrame(X, columns=cols, index=[f"p{i}" for i in range(n)]), batch, cov, group


def _batch_means(X, batch):
    return np.array([np.asarray(X)[batch == b].mean(axis=0) for b in np.unique(batch)])


@pytest.mark.parametrize("kwargs", [{}, {"parametric": False}, {"eb": False}])
def test_batch_means_and_scales_equalised(kwargs):
    X, batch, _, _ = _synthetic(group_effect=0.0, p=40)
    out = ComBat(**kwargs).fit_transform(X, batch)
    assert np.isfinite(out.to_numpy()).all()
    before = np.ptp(_batch_means(X, batch), axis=0) / X.std().to_numpy()
    after = np.ptp(_batch_means(out, batch), axis=0) / out.std().to_numpy()
    sds = np.array([out.to_numpy()[batch == b].std(axis=0, ddof=1) for b in np.unique(batch)])
    assert before.min() > 1.5  # strong batch offsets ...
    if kwargs.get("eb", True):  # ... removed up to the empirical Bayes shrinkage towards the common effect
        assert after.mean() < (0.1 if kwargs.get("parametric", True) else 0.15) * before.mean()
        assert (after < 0.4 * before).all()  # non-parametric EB with few features shrinks the least precisely
        assert (sds.max(axis=0) / sds.min(axis=0)).max() < 1.6  # and the 4x scale differences too
    else:  # the plain location/scale model equalises them exactly
        assert after.max() < 1e-10
        np.testing.assert_allclose(sds.max(axis=0) / sds.min(axis=0), 1.0, rtol=1e-10)


def test_protected_covariate_effect_survives():
    X, batch, cov, group = _synthetic(n_per=(60, 60, 60), group_effect=2.0, seed=1)
    true_diff = 2.0
    protected = ComBat().fit(X, batch, cov)
    out = protected.transform(X, batch, cov).to_numpy()
    diff = out[group].mean(axis=0) - out[~group].mean(axis=0)
    assert np.abs(diff - true_diff).max() < 0.5
    assert protected.covariate_names_ == ["histology[squamous]", "age"]
    assert abs(protected.beta_[0].mean() + true_diff) < 0.3  # squamous vs adeno, in the raw units
    # unprotected, the unbalanced group is partly taken for a batch effect
    naive = ComBat().fit_transform(X, batch).to_numpy()
    naive_diff = naive[group].mean(axis=0) - naive[~group].mean(axis=0)
    assert np.abs(diff - true_diff).mean() < np.abs(naive_diff - true_diff).mean()


@pytest.mark.parametrize(
    "kwargs, with_cov",
    [
        ({}, False),
        ({}, True),
        ({"parametric": False}, True),
        ({"eb": False}, True),
        ({"ref_batch": "C"}, True),
        ({"mean_only": True}, False),
    ],
)
def test_transform_subset_equals_fit_transform_rows(kwargs, with_cov):
    X, batch, cov, _ = _synthetic(seed=2)
    cov = cov if with_cov else None
    model = ComBat(**kwargs)
    full = model.fit_transform(X, batch, cov)
    rows = np.array([3, 40, 41, 70, 0])
    part = model.transform(X.iloc[rows], batch[rows], None if cov is None else cov.iloc[rows])
    np.testing.assert_allclose(part.to_numpy(), full.iloc[rows].to_numpy(), rtol=0, atol=1e-10)
    assert list(part.index) == list(X.index[rows])
    # plain arrays in, arrays out
    arr = model.transform(X.to_numpy()[rows], batch[rows], None if cov is None else cov.iloc[rows])
    assert isinstance(arr, np.ndarray)
    np.testing.assert_allclose(arr, part.to_numpy())


def _fitted_state(model):
    return {k: copy.deepcopy(v) for k, v in vars(model).items() if k.endswith("_") or k.startswith("_")}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            assert (
                a[k] == b[k] if not isinstance(a[k], list) else list(map(str, a[k])) == list(map(str, b[k]))
            ), k


def test_transform_never_changes_fitted_estimates():
    X, batch, cov, _ = _synthetic(seed=3)
    train = np.arange(len(batch)) % 3 != 0
    model = ComBat().fit(X[train], batch[train], cov[train])
    state = _fitted_state(model)
    rng = np.random.default_rng(0)
    test = ~train
    outputs = []
    for rows in [np.flatnonzero(test), rng.permutation(np.flatnonzero(test))[:7], np.flatnonzero(train)]:
        Xt = X.iloc[rows] * (1 + rng.random())  # even wildly different inputs
        outputs.append(model.transform(Xt, batch[rows], cov.iloc[rows]))
        _assert_same_state(state, _fitted_state(model))
    # each sample's result depends on that sample only, not on which others were passed with it
    a = model.transform(X[test], batch[test], cov[test])
    b = model.transform(X[test].iloc[::-1].iloc[:5], batch[test][::-1][:5], cov[test].iloc[::-1].iloc[:5])
    np.testing.assert_allclose(b.to_numpy(), a.loc[b.index].to_numpy(), rtol=0, atol=1e-12)
    # and refitting on the training samples gives the same model
    _assert_same_state(state, _fitted_state(clone(model).fit(X[train], batch[train], cov[train])))


def test_small_batch_error_names_the_batch():
    X, batch, _, _ = _synthetic(n_per=(30, 25, 1))
    with pytest.raises(ValueError, match=r"batch 'C' has 1 sample\(s\)"):
        ComBat().fit(X, batch)
    X, batch, _, _ = _synthetic(n_per=(30, 25, 3))
    with pytest.raises(ValueError, match=r"batch 'C' has 3 sample\(s\), fewer than min_batch_size=5"):
        ComBat(min_batch_size=5).fit(X, batch)
    ComBat().fit(X, batch)  # 3 >= the default 2
    with pytest.raises(ValueError, match="small_batch"):
        ComBat(small_batch="drop").fit(X, batch)


@pytest.mark.parametrize("size", [1, 3])
@pytest.mark.parametrize("kwargs", [{}, {"parametric": False}, {"eb": False}])
def test_small_batch_mean_only_fallback(size, kwargs):
    X, batch, _, _ = _synthetic(n_per=(30, 25, size), seed=4)
    X.iloc[-size:] += 10.0  # the small batch is far off
    model = ComBat(min_batch_size=5, small_batch="mean_only", **kwargs)
    out = model.fit_transform(X, batch)
    assert np.isfinite(out.to_numpy()).all()
    assert model.location_only_.tolist() == [False, False, True]
    np.testing.assert_array_equal(model.delta_star_[2], 1.0)
    assert not np.allclose(model.delta_star_[:2], 1.0)  # the other batches keep their scale adjustment
    small = batch == "C"
    dist_before = np.abs(X[small].mean() - X[~small].mean()).mean()
    dist_after = np.abs(out[small].mean() - out[~small].mean()).mean()
    assert dist_after < 0.3 * dist_before


def test_zero_variance_and_constant_features():
    X, batch, _, _ = _synthetic(seed=5)
    X["f1"] = np.where(batch == "B", 3.0, X["f1"])  # constant within one batch only
    X_const = X.assign(const=7.5)  # constant overall
    model = ComBat()
    out = model.fit_transform(X_const, batch)
    assert np.isfinite(out.to_numpy()).all()
    assert model.constant_features_.tolist() == [False] * X.shape[1] + [True]
    np.testing.assert_array_equal(out["const"], 7.5)
    # the constant feature takes no part in the estimation of the others
    np.testing.assert_allclose(out[X.columns], ComBat().fit_transform(X, batch), rtol=0, atol=1e-12)
    new = X_const.iloc[:4].assign(const=[1.0, 2.0, 3.0, 4.0])  # and is passed through at transform time
    np.testing.assert_array_equal(model.transform(new, batch[:4])["const"], [1.0, 2.0, 3.0, 4.0])


def test_unseen_batch_is_refused_then_mapped_onto_training_reference():
    X, batch, _, _ = _synthetic(seed=6)
    model = ComBat(eb=False).fit(X, batch)
    state = _fitted_state(model)
    rng = np.random.default_rng(7)
    ext = X[batch == "C"].sample(20, random_state=1) * 2.5 + 8.0 + rng.normal(0, 0.1, (20, X.shape[1]))
    with pytest.raises(ValueError, match=r"\['EXT'\] were not seen in fit.*fit_unseen_batch"):
        model.transform(ext, ["EXT"] * len(ext))
    model.fit_unseen_batch(ext, "EXT")
    assert model.batches_.tolist() == ["A", "B", "C", "EXT"] and model.external_batches_ == ["EXT"]
    for k in ("grand_mean_", "var_pooled_", "beta_"):
        np.testing.assert_array_equal(getattr(model, k), state[k])
    np.testing.assert_array_equal(model.gamma_star_[:3], state["gamma_star_"])
    np.testing.assert_array_equal(model.delta_star_[:3], state["delta_star_"])
    out = model.transform(ext, ["EXT"] * len(ext))
    # without EB the external batch lands exactly on the training grand mean and pooled variance
    np.testing.assert_allclose(out.mean().to_numpy(), model.grand_mean_, atol=1e-10)
    np.testing.assert_allclose(out.std().to_numpy(), np.sqrt(model.var_pooled_), rtol=1e-10)
    # training batches are harmonised as before
    np.testing.assert_allclose(model.transform(X, batch), clone(model).fit_transform(X, batch), atol=1e-12)
    with pytest.raises(ValueError, match="already part"):
        model.fit_unseen_batch(ext, "EXT")


@pytest.mark.parametrize("kwargs", [{}, {"parametric": False}, {"ref_batch": "A"}])
def test_unseen_batch_with_eb_lands_near_training_reference(kwargs):
    X, batch, _, _ = _synthetic(seed=8, p=30)
    model = ComBat(**kwargs).fit(X, batch)
    trained = model.transform(X, batch)
    target = trained[batch == "A"] if kwargs.get("ref_batch") else trained
    sd = np.sqrt(model.var_pooled_)
    ext = X[batch == "C"]
    ext = (ext - ext.mean()) * 2.5 + ext.mean() - 5 * sd  # a new center: scaled and shifted
    assert (np.abs(ext.mean() - target.mean()) / sd).min() > 2
    out = model.fit_unseen_batch(ext, "EXT").transform(ext, ["EXT"] * len(ext))
    assert np.isfinite(out.to_numpy()).all()
    assert (np.abs(out.mean() - target.mean()) / sd).max() < 0.3
    ratio = out.std().to_numpy() / target.std().to_numpy()
    assert 0.7 < ratio.min() and ratio.max() < 1.4


def test_input_validation():
    X, batch, cov, _ = _synthetic(seed=9)
    model = ComBat().fit(X, batch, cov)
    with pytest.raises(ValueError, match="histology.*not seen in fit"):
        model.transform(X.iloc[:2], batch[:2], cov.iloc[:2].assign(histology="sarcoma"))
    with pytest.raises(ValueError, match="lacks 1 fitted feature"):
        model.transform(X.drop(columns="f3"), batch)
    shuffled = X[X.columns[::-1]]  # columns are matched by name
    np.testing.assert_allclose(model.transform(shuffled, batch, cov), model.transform(X, batch, cov))
    with pytest.raises(ValueError, match="NaN"):
        ComBat().fit(X.mask(X > 5), batch)
    with pytest.raises(ValueError, match="confounded"):
        ComBat().fit(X, batch, pd.DataFrame({"site": batch}))
    with pytest.raises(ValueError, match="ref_batch 'Z'"):
        ComBat(ref_batch="Z").fit(X, batch)
    with pytest.raises(ValueError, match="without covariates"):
        ComBat().fit(X, batch).transform(X, batch, cov)
    assert clone(ComBat(parametric=False, ref_batch="A")).get_params()["ref_batch"] == "A"
