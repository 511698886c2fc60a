"""The region vocabulary: order, aliases, targets and validation."""

import pytest

from regionnet.regions import (
    OTHER,
    REGIONS,
    canonical_region,
    region_info,
    to_target,
    validate_regions,
)


def test_regions_are_the_studys_five_in_order():
    assert REGIONS == ("shoulder", "elbow", "hand", "pelvis", "knee")


@pytest.mark.parametrize(
    "label, expected",
    [
        ("hip", "pelvis"),
        ("HIP", "pelvis"),
        ("PELVIS", "pelvis"),
        ("XR_SHOULDER", "shoulder"),
        (" Knee ", "knee"),
        ("ELBOW", "elbow"),
        ("HAND", "hand"),
        ("wrist", "wrist"),
        ("lower-leg", "leg"),
        ("banana", None),
    ],
)
def test_canonical_region_maps_aliases_and_dicom_terms(label, expected):
    assert canonical_region(label) == expected


def test_wrist_and_finger_are_not_hand_unless_configured():
    assert to_target("wrist", REGIONS) == OTHER
    assert to_target("finger", REGIONS) == OTHER
    assert to_target("wrist", REGIONS, aliases={"wrist": "hand"}) == "hand"


def test_other_anatomy_is_negative_and_targets_follow_the_region_set():
    seven = (*REGIONS, "wrist", "chest")
    assert to_target("chest", REGIONS) == OTHER
    assert to_target("chest", seven) == "chest"


def test_unknown_label_fails_with_valid_names_unless_other_is_allowed():
    with pytest.raises(ValueError, match="unknown region name 'misc'.*knee.*unknown_as_other"):
        to_target("misc", REGIONS, where="folder /x/misc")
    assert to_target("misc", REGIONS, unknown_as_other=True) == OTHER


def test_validate_regions_rejects_bad_sets():
    assert validate_regions(["hip", "knee"]) == ("pelvis", "knee")
    with pytest.raises(ValueError, match="more than once"):
        validate_regions(["hip", "pelvis"])
    with pytest.raises(ValueError, match="reserved"):
        validate_regions(["knee", "other"])
    with pytest.raises(ValueError, match="empty"):
        validate_regions([])
    with pytest.raises(ValueError, match="list of region names"):
        validate_regions("knee")


def test_codes_of_the_five_regions_are_pinned_as_literals():
    """Every other code check compares output with the table the code reads, so a typo in the
    table passes them all. These are the published codes, typed out: SNOMED CT body structures
    (DICOM CID 4031 uses them for BodyPartExamined's coded form) and RadLex anatomy ids."""
    expected = {
        "shoulder": ("16982005", "RID39518", "SHOULDER"),
        "elbow": ("127949000", "RID2010", "ELBOW"),
        "hand": ("85562004", "RID2318", "HAND"),
        "pelvis": ("12921003", "RID2507", "PELVIS"),
        "knee": ("72696002", "RID2743", "KNEE"),
    }
    got = {r: (region_info(r).snomed, region_info(r).radlex, region_info(r).dicom) for r in REGIONS}
    assert got == expected
