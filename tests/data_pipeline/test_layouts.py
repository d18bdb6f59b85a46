"""Official dataset layouts: pairing by name, the missing-folder errors, training items."""

from __future__ import annotations

from pathlib import Path

import pytest

from moceir.data import layouts as L
from moceir.data.training import training_items
from tests.cli.conftest import write_image, write_official_layout


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_official_layout(tmp_path_factory.mktemp("layout"), n=3, size=(20, 24))


@pytest.mark.parametrize(
    "degraded,clean,key,expected",
    [
        pytest.param(
            ["rain-1", "rain-10", "rain-2"],
            ["norain-1", "norain-2", "norain-10"],
            "digits",
            {"rain-1": "norain-1", "rain-2": "norain-2", "rain-10": "norain-10"},
            id="rain-digits",
        ),
        pytest.param(
            ["0001_0.8_0.2", "0001_0.9_0.1", "0002_1_0.2"],
            ["0001", "0002"],
            "first_token",
            {"0001_0.8_0.2": "0001", "0001_0.9_0.1": "0001", "0002_1_0.2": "0002"},
            id="haze-first-token",
        ),
        pytest.param(
            ["b", "a"], ["a", "b", "c"], "stem", {"a": "a", "b": "b"}, id="stem-extra-clean-ignored"
        ),
    ],
)
def test_pair_by_name(degraded, clean, key, expected):
    pairs = L.pair_by_name([Path(f"d/{n}.png") for n in degraded], [Path(f"c/{n}.png") for n in clean], key)
    assert {p.degraded.stem: p.clean.stem for p in pairs} == expected


def test_pairing_by_name_does_not_trust_sorted_order():
    # sorted(): rain-10 < rain-2 but norain-2 < norain-10 would pair by position in another order
    pairs = L.pair_by_name(
        [Path("rain-10.png"), Path("rain-2.png")], [Path("norain-2.png"), Path("norain-10.png")], "digits"
    )
    assert [(p.degraded.stem, p.clean.stem) for p in pairs] == [
        ("rain-10", "norain-10"),
        ("rain-2", "norain-2"),
    ]


def test_unmatched_or_ambiguous_names_raise():
    with pytest.raises(L.DatasetLayoutError, match="no clean image of the same name"):
        L.pair_by_name([Path("x/rain-3.png")], [Path("c/norain-1.png")], "digits")
    with pytest.raises(L.DatasetLayoutError, match="matches several clean images"):
        L.pair_by_name([Path("x/0001_1.png")], [Path("c/0001.png"), Path("c/0001.jpg")], "first_token")


@pytest.mark.parametrize("task", [t for t in L.TASKS if t != "cdd11"], ids=str)
def test_every_test_layout_is_found(data, task):
    pairs = L.find_pairs(L.TEST_LAYOUTS[task], data)
    assert len(pairs) == 3
    for p in pairs:
        assert p.clean.is_file()
        assert p.degraded is None if task.startswith("denoise") else p.degraded.is_file()


def test_cdd11_pairs_every_degradation_folder(data):
    pairs = L.find_pairs(L.TEST_LAYOUTS["cdd11"], data)
    assert sorted({p.subset for p in pairs}) == ["haze", "low_rain"]
    assert all(p.degraded.name == p.clean.name for p in pairs)


@pytest.mark.parametrize("task", ["derain", "dehaze", "deblur", "lowlight", "denoise_25"], ids=str)
def test_missing_folder_error_names_the_folder_and_the_layout(tmp_path, task):
    (tmp_path / "denoising").mkdir()  # an official root, but without the task's folders
    with pytest.raises(L.DatasetLayoutError) as err:
        L.find_pairs(L.TEST_LAYOUTS[task], tmp_path)
    message = str(err.value)
    assert "folder not found" in message and str(tmp_path) in message
    assert "expected layout" in message
    for folder in L.TEST_LAYOUTS[task].clean + L.TEST_LAYOUTS[task].degraded:
        assert folder in message


def test_training_items_official_layout_repeats_tasks(data):
    items, mode = training_items(data, ["denoise_15", "derain", "dehaze", "deblur", "lowlight", "cdd11"])
    assert mode == "official"
    count = lambda t: sum(it.task == t for it in items)  # noqa: E731
    assert count("denoise_15") == 6 * 3  # BSD400 + WED, x3
    assert count("derain") == 3 * 120
    assert count("dehaze") == 3
    assert count("deblur") == 3 * 5
    assert count("lowlight") == 3 * 20
    assert count("cdd11") == 6 * 2
    assert all(it.degraded is None for it in items if it.task == "denoise_15")
    rain = [it for it in items if it.task == "derain"]
    assert all(it.degraded.name.replace("rain-", "norain-") == it.clean.name for it in rain)


def test_training_items_override_repeats(data):
    items, _ = training_items(data, ["derain"], {"derain": 2})
    assert len(items) == 6


def test_training_items_from_a_clean_folder_synthesise_every_task(tmp_path):
    for i in range(4):
        write_image(tmp_path / "photos" / f"sub{i % 2}" / f"{i}.png", 16, 16, i)
    items, mode = training_items(tmp_path / "photos", ["denoise_50", "derain", "lowlight"])
    assert mode == "synthetic"
    assert len(items) == 12 and all(it.degraded is None for it in items)
    with pytest.raises(L.DatasetLayoutError, match="cdd11 has no synthetic degradation"):
        training_items(tmp_path / "photos", ["cdd11"])


def test_training_items_bad_roots(tmp_path):
    with pytest.raises(L.DatasetLayoutError, match="data folder not found"):
        training_items(tmp_path / "nope", ["derain"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(L.DatasetLayoutError, match="neither the official dataset layout"):
        training_items(tmp_path / "empty", ["derain"])
    with pytest.raises(ValueError, match="unknown task"):
        training_items(tmp_path, ["desnow"])


def test_task_aliases():
    assert L.canonical_task("gopro") == "deblur"
    assert L.canonical_task("lolv1") == "lowlight"
