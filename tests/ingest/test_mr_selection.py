"""MR series selection (issue 17): channels named as radiologists name MR series -- by description, sequence tags
(ScanningSequence, EchoTime, RepetitionTime), ImageType (derived ADC maps) and the diffusion b-value, read from the
standard tag, the enhanced MR functional groups or the private tags of Siemens, GE and Philips; several b-values of
one DWI series split into one channel per b-value."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_factory import (
    SeriesUIDs,
    assert_excluded,
    write_ct_series,
    write_enhanced,
    write_mr_series,
)
from radstudy import errors
from radstudy.errors import ConfigError
from radstudy.ingest import dicomio

PATIENT = "RS-0107"
N, ROWS, COLUMNS = 6, 5, 4
DWI_TYPE = ("ORIGINAL", "PRIMARY", "DIFFUSION", "TRACEW")
ADC_TYPE = ("DERIVED", "PRIMARY", "DIFFUSION", "ADC")
DWI = {"description": "ep2d_diff_b0_800_tra", "image_type": DWI_TYPE, "echo_time": 72.0, "repetition_time": 5200.0,
       "scanning_sequence": "EP", "sequence_name": "*ep_b800t"}


def volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2000, size=(N, ROWS, COLUMNS)).astype(np.int16)


def series_of(folder):
    headers, bad = dicomio.scan_folder(folder)
    assert bad == []
    return dicomio.group_series(headers)


def select(folder, selector):
    return dicomio.select_series(series_of(folder), {"modality": "MR", "min_slices": N, **selector}, patient=PATIENT)


def read(series) -> np.ndarray:
    import SimpleITK as sitk

    image = dicomio.read_series(dicomio.check_geometry(series, patient=PATIENT), patient=PATIENT)
    return sitk.GetArrayFromImage(image)


def write_dwi(folder, b0, b800, **kwargs) -> tuple[SeriesUIDs, SeriesUIDs]:
    """One DWI series holding a b0 and a b800 file at every slice position, as Siemens delivers trace images."""
    first = write_mr_series(folder, b0, b_value=0, file_prefix="B0_", series_number=5, **DWI, **kwargs)
    kwargs.update(study_uid=first.study_uid, frame_of_reference_uid=first.frame_of_reference_uid)
    second = write_mr_series(folder, b800, b_value=800, file_prefix="B800_", series_number=5, series_uid=first.series_uid,
                             **DWI, **kwargs)
    return first, second


def write_prostate_like_study(folder):
    """T2 (TE 100), a PD-weighted TSE whose description also says t2 (TE 12), DWI b0/b800 and its ADC map."""
    t2 = write_mr_series(folder / "t2", volume(1), description="t2_tse_tra", echo_time=100.0, series_number=2)
    shared = {"study_uid": t2.study_uid, "frame_of_reference_uid": t2.frame_of_reference_uid}
    write_mr_series(folder / "pd", volume(2), description="t2_tse_tra_pd", echo_time=12.0, repetition_time=3000.0,
                    series_number=3, **shared)
    write_dwi(folder / "dwi", volume(3), volume(4), **shared)
    write_mr_series(folder / "adc", volume(5), description="ep2d_diff_b0_800_tra_ADC", image_type=ADC_TYPE,
                    echo_time=72.0, repetition_time=5200.0, scanning_sequence="EP", sequence_name="*ep_b800t",
                    series_number=6, **shared)
    return t2


# --------------------------------------------------------------------------- b-values


def test_dwi_series_with_b0_and_b800_is_split_by_b_value(tmp_path):
    b0, b800 = volume(10), volume(11)
    write_dwi(tmp_path, b0, b800)
    for b, expected in ((800, b800), (0, b0), (800.6, b800)):  # 800.6: within the 1 s/mm^2 tolerance
        chosen = select(tmp_path, {"b_value": b})
        assert chosen.n_slices == N and {h.b_value for h in chosen.headers} == {round(b, -2)}
        np.testing.assert_array_equal(read(chosen), expected)
    assert_excluded(errors.NO_MATCHING_SERIES, PATIENT, select, tmp_path, {"b_value": 802})
    # min_slices counts after the split: the series has 2N files, but only N at b800
    assert_excluded(errors.NO_MATCHING_SERIES, PATIENT, select, tmp_path, {"b_value": 800, "min_slices": N + 1})
    # without b_value both b-values are stacked at the same positions: excluded, saying how to select one
    whole = select(tmp_path, {})
    assert whole.n_slices == 2 * N
    error = assert_excluded(errors.GEOMETRY_MIXED, PATIENT, dicomio.check_geometry, whole, patient=PATIENT)
    assert "b-values 0 and 800: set the channel's b_value" in error.message


@pytest.mark.parametrize(("tag", "kwargs", "source"), [
    ("standard", {}, "DiffusionBValue (0018,9087)"),
    ("siemens", {}, "Siemens private (0019,100C)"),
    ("siemens", {"private_raw": True}, "Siemens private (0019,100C)"),
    ("ge", {}, "GE private (0043,1039)"),
    ("ge", {"ge_bias": True}, "GE private (0043,1039)"),  # 1000000800 on multi-b-value GE sequences
    ("ge", {"ge_bias": True, "private_raw": True}, "GE private (0043,1039)"),
    ("philips", {}, "Philips private (2001,1003)"),
    ("philips", {"private_raw": True}, "Philips private (2001,1003)"),
    # no private creator in the file at all: the element at the vendor's usual place, its value as raw bytes
    ("siemens", {"private_creator": "", "private_raw": True}, "Siemens private (0019,100C)"),
    ("ge", {"private_creator": "", "private_raw": True, "ge_bias": True}, "GE private (0043,1039)"),
    ("philips", {"private_creator": "", "private_raw": True}, "Philips private (2001,1003)"),
])
def test_each_vendors_b_value_tag_is_read(tmp_path, tag, kwargs, source):
    b0, b800 = volume(20), volume(21)
    write_dwi(tmp_path, b0, b800, b_value_tag=tag, **kwargs)
    headers, _ = dicomio.scan_folder(tmp_path)
    assert sorted({(h.b_value, h.b_value_source) for h in headers}) == [(0.0, source), (800.0, source)]
    np.testing.assert_array_equal(read(select(tmp_path, {"b_value": 800})), b800)


@pytest.mark.parametrize(("tag", "kwargs"), [
    ("siemens", {"manufacturer": "GE MEDICAL SYSTEMS"}),  # the Siemens tag in another vendor's file
    ("ge", {"manufacturer": "SIEMENS"}),
    ("philips", {"private_creator": "ACME LAB 01"}),  # (2001,1003) of a block that is not Philips'
    ("siemens", {"private_creator": "SIEMENS CSA HEADER"}),
])
def test_private_tag_of_another_vendor_or_creator_is_not_read(tmp_path, tag, kwargs):
    write_dwi(tmp_path, volume(30), volume(31), b_value_tag=tag, **kwargs)
    headers, _ = dicomio.scan_folder(tmp_path)
    assert {(h.b_value, h.b_value_source) for h in headers} == {(None, None)}
    assert_excluded(errors.NO_MATCHING_SERIES, PATIENT, select, tmp_path, {"b_value": 800})


def test_enhanced_mr_with_per_frame_b_values_is_split(tmp_path):
    """One Enhanced MR file with b0 frames (DiffusionDirectionality NONE, no b-value, as the standard allows) and
    b800 frames (MRDiffusionSequence > DiffusionBValue per frame)."""
    b0, b800 = volume(40), volume(41)
    first, second = write_dwi(tmp_path / "single", b0, b800)
    both = SeriesUIDs(first.study_uid, first.series_uid, first.frame_of_reference_uid,
                      first.sop_instance_uids + second.sop_instance_uids, first.files + second.files)
    content = ([{"MRDiffusionSequence": {"DiffusionDirectionality": "NONE"}}] * N
               + [{"MRDiffusionSequence": {"DiffusionDirectionality": "ISOTROPIC", "DiffusionBValue": 800.0}}] * N)
    write_enhanced(tmp_path / "enhanced" / "dwi.dcm", both, modality="MR", frame_content=content,
                   dimensions=(("MRDiffusionSequence", "DiffusionBValue"),))
    b800_frames = select(tmp_path / "enhanced", {"b_value": 800})
    assert [h.frame_number for h in b800_frames.headers] == list(range(N + 1, 2 * N + 1))
    assert {h.b_value_source for h in b800_frames.headers} == {"MRDiffusionSequence > DiffusionBValue"}
    np.testing.assert_array_equal(read(b800_frames), b800)
    np.testing.assert_array_equal(read(select(tmp_path / "enhanced", {"b_value": 0})), b0)
    whole = select(tmp_path / "enhanced", {})
    error = assert_excluded(errors.GEOMETRY_MIXED, PATIENT, dicomio.check_geometry, whole, patient=PATIENT)
    assert "one b-value with the channel's b_value" in error.message


# --------------------------------------------------------------------------- ImageType and sequence tags


@pytest.mark.parametrize("image_type", [["DERIVED", "ADC"], ["adc"]])
def test_adc_map_is_picked_by_image_type_among_t2_and_dwi(tmp_path, image_type):
    write_prostate_like_study(tmp_path)
    chosen = select(tmp_path, {"image_type": image_type})
    assert chosen.series_number == 6 and chosen.image_type == ADC_TYPE
    np.testing.assert_array_equal(read(chosen), volume(5))
    # the DWI's own ImageType values (with its b-value) pick it; a value no series carries matches nothing
    assert select(tmp_path, {"image_type": ["DIFFUSION"], "b_value": 800}).series_number == 5
    assert_excluded(errors.NO_MATCHING_SERIES, PATIENT, select, tmp_path, {"image_type": ["DERIVED", "TRACEW"]})


def test_t2_is_picked_by_description_and_echo_time(tmp_path):
    write_prostate_like_study(tmp_path)
    # both TSE series say t2 in their description: most_slices cannot tell them apart
    assert_excluded(errors.AMBIGUOUS_SERIES, PATIENT, select, tmp_path, {"description": "t2"})
    chosen = select(tmp_path, {"description": "t2", "echo_time": [80, 120]})
    assert chosen.series_number == 2
    np.testing.assert_array_equal(read(chosen), volume(1))
    assert select(tmp_path, {"description": "t2", "echo_time": [None, 20]}).series_number == 3  # open lower bound
    assert select(tmp_path, {"description": "t2", "repetition_time": [3500, None]}).series_number == 2
    assert select(tmp_path, {"scanning_sequence": "^SE", "echo_time": [80, None]}).series_number == 2
    assert select(tmp_path, {"scanning_sequence": r"ep_b\d+t", "image_type": ["ORIGINAL"], "b_value": 0}).series_number == 5
    assert_excluded(errors.NO_MATCHING_SERIES, PATIENT, select, tmp_path, {"description": "t2", "echo_time": [150, 200]})


def test_no_match_lists_every_series_with_b_values_image_type_and_times(tmp_path):
    write_prostate_like_study(tmp_path)
    error = assert_excluded(errors.NO_MATCHING_SERIES, PATIENT, select, tmp_path, {"b_value": 1400})
    message = error.message
    assert "b_value=1400" in message
    assert ("#5 MR 'ep2d_diff_b0_800_tra' [ORIGINAL\\PRIMARY\\DIFFUSION\\TRACEW] 12 slices; b-values 0 (6), 800 (6) "
            "from DiffusionBValue (0018,9087); TE 72 ms; TR 5200 ms; sequence EP *ep_b800t") in message
    assert "#2 MR 't2_tse_tra' [ORIGINAL\\PRIMARY\\M\\NORM] 6 slices; TE 100 ms; TR 4000 ms; sequence SE *tse2d1_15" in message
    assert "#3 MR 't2_tse_tra_pd'" in message and "TE 12 ms; TR 3000 ms" in message
    assert "#6 MR 'ep2d_diff_b0_800_tra_ADC' [DERIVED\\PRIMARY\\DIFFUSION\\ADC] 6 slices; TE 72 ms" in message


def test_ct_selection_and_summary_are_unchanged(tmp_path):
    write_ct_series(tmp_path, np.zeros((12, 4, 4), dtype=np.int16), description="AXIAL 2mm", series_number=2)
    (series,) = series_of(tmp_path)
    assert series.summary() == "#2 CT 'AXIAL 2mm' [ORIGINAL\\PRIMARY\\AXIAL] 12 slices"
    assert dicomio.select_series([series], {}, patient=PATIENT).n_slices == 12
    # an MR selector key on CT files: they have no b-value, so nothing matches
    assert_excluded(errors.NO_MATCHING_SERIES, PATIENT, dicomio.select_series, [series], {"b_value": 0}, patient=PATIENT)


@pytest.mark.parametrize(("selector", "named"), [
    ({"echo_time": [100, 50]}, "echo_time range [100, 50]"),
    ({"scanning_sequence": "(SE"}, "scanning_sequence is not a valid regex"),
    ({"b_value": -5}, "b_value"),
    ({"echo_time": [10]}, "echo_time"),
    ({"image_type": "ADC"}, "image_type"),
])
def test_bad_mr_selector_is_a_config_error_naming_the_key(selector, named):
    with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
        dicomio.validate_selector(selector)
