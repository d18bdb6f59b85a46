"""``moceir restore`` end to end on tiny images, the engine's tiling/batching, and bad input."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from moceir.cli import main
from moceir.restore import Restorer, blend_ramp, plan_batches, tile_starts
from tests.cli.conftest import write_image


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def messy_folder(tmp_path) -> Path:
    """Good images of several kinds and sizes, plus broken files."""
    src = tmp_path / "in"
    write_image(src / "a.png", 20, 28, 1)
    write_image(src / "b.png", 20, 28, 2)
    write_image(src / "c.jpg", 20, 28, 3)
    write_image(src / "odd.bmp", 13, 21, 4)
    write_image(src / "sub" / "gray.png", 17, 19, 5, mode="L")
    write_image(src / "scan.tif", 18, 18, 6)
    write_image(src / "palette.png", 16, 16, 7, mode="P")
    rgba = np.dstack(
        [
            np.asarray(Image.open(write_image(src / "tmp.png", 15, 22, 8))),
            np.tile(np.arange(22, dtype=np.uint8) * 10, (15, 1)),
        ]
    )
    (src / "tmp.png").unlink()
    Image.fromarray(rgba).save(src / "rgba.png")
    Image.fromarray((np.arange(16 * 16).reshape(16, 16) * 200).astype(np.uint16)).save(src / "deep16.png")
    (src / "fake.png").write_text("this is not an image")
    (src / "empty.jpg").write_bytes(b"")
    data = (src / "a.png").read_bytes()
    (src / "trunc.png").write_bytes(data[: len(data) // 2])
    (src / "notes.txt").write_text("ignored: not an image extension")
    return src


GOOD = "a.png b.png c.jpg odd.bmp sub/gray.png scan.tif palette.png rgba.png deep16.png".split()
BAD = ["fake.png", "empty.jpg", "trunc.png"]


def test_restore_a_messy_folder(messy_folder, tiny_checkpoint, tmp_path, capsys):
    before = digest(messy_folder)
    out = tmp_path / "out"
    code = main(
        [
            "restore",
            str(messy_folder),
            "-o",
            str(out),
            "--checkpoint",
            str(tiny_checkpoint),
            "--batch-size",
            "2",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1, "some inputs were skipped"
    assert digest(messy_folder) == before, "inputs untouched"
    for name in GOOD:
        src, dst = messy_folder / name, (out / name).with_suffix(".png")
        assert dst.is_file(), name
        with Image.open(src) as a, Image.open(dst) as b:
            assert a.size == b.size
    with Image.open(out / "sub/gray.png") as g:
        assert g.mode == "L"
    with Image.open(out / "rgba.png") as r, Image.open(messy_folder / "rgba.png") as s:
        assert r.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(r)[..., 3], np.asarray(s)[..., 3])
    for name in BAD:
        assert name in err
    report = json.loads((out / "report.json").read_text())
    assert report["restored"] == len(GOOD) and not report["random_weights"]
    skipped = {Path(s["input"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == set(BAD)
    assert "truncated" in skipped["trunc.png"] and "not an image" in skipped["fake.png"]
    blocks = report["decoder_blocks"]
    assert blocks == ["dec0.b0", "dec1.b0", "dec2.b0"]
    by_name = {Path(i["input"]).name: i for i in report["images"]}
    assert by_name["rgba.png"]["converted"].startswith("RGBA")
    assert "16" in by_name["deep16.png"]["converted"]
    for name in GOOD:
        entry = by_name[Path(name).name]
        assert entry["status"] == "restored"
        assert set(entry["experts"]) == set(blocks)
        assert all(0 <= e < 4 for picks in entry["experts"].values() for e in picks)
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert len(rows) == len(GOOD) + len(BAD)
    row = next(r for r in rows if r["input"].endswith("a.png"))
    assert row["status"] == "restored" and row["dec0.b0"] == "+".join(
        map(str, by_name["a.png"]["experts"]["dec0.b0"])
    )


def test_a_batch_equals_its_images_one_by_one(tmp_path, tiny_checkpoint):
    src = tmp_path / "in"
    for i in range(5):
        write_image(src / f"{i}.png", 24, 24, i)
    reports = {}
    for bs in (1, 3):
        out = tmp_path / f"out{bs}"
        assert (
            main(
                [
                    "restore",
                    str(src),
                    "-o",
                    str(out),
                    "--checkpoint",
                    str(tiny_checkpoint),
                    "--batch-size",
                    str(bs),
                    "--quiet",
                ]
            )
            == 0
        )
        reports[bs] = json.loads((out / "report.json").read_text())
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "out1" / f"{i}.png"), np.int16)
        b = np.asarray(Image.open(tmp_path / "out3" / f"{i}.png"), np.int16)
        assert np.abs(a - b).max() <= 1  # float rounding may flip one 8-bit level
    assert [i["experts"] for i in reports[1]["images"]] == [i["experts"] for i in reports[3]["images"]]


def test_tiled_restore_covers_the_image(tmp_path, tiny_checkpoint):
    src = write_image(tmp_path / "big.png", 40, 50, 0)
    out = tmp_path / "out"
    assert (
        main(
            [
                "restore",
                str(src),
                "-o",
                str(out),
                "--checkpoint",
                str(tiny_checkpoint),
                "--tile",
                "16",
                "--tile-overlap",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    entry = json.loads((out / "report.json").read_text())["images"][0]
    assert entry["tiles"] == 3 * 4  # rows start 0, 12, 24; columns 0, 12, 24, 34
    assert sum(entry["expert_counts_over_tiles"]["dec0.b0"].values()) == 12
    with Image.open(out / "big.png") as im:
        assert im.size == (50, 40)


def test_output_inside_the_input_folder_is_refused_unless_allowed(tmp_path, tiny_checkpoint, capsys):
    src = tmp_path / "in"
    write_image(src / "a.png", 16, 16, 0)
    code = main(["restore", str(src), "-o", str(src / "restored"), "--checkpoint", str(tiny_checkpoint)])
    assert code == 2 and "--allow-inside" in capsys.readouterr().err
    assert not (src / "restored").exists()
    # an input inside the output folder: same refusal
    assert main(["restore", str(src / "a.png"), "-o", str(src), "--checkpoint", str(tiny_checkpoint)]) == 2
    before = (src / "a.png").read_bytes()
    for _ in range(2):  # the second run must not read the first run's outputs as inputs
        args = [
            "restore",
            str(src),
            "-o",
            str(src / "restored"),
            "--checkpoint",
            str(tiny_checkpoint),
            "--allow-inside",
            "--overwrite",
            "--quiet",
        ]
        assert main(args) == 0
    assert sorted(p.name for p in (src / "restored").iterdir()) == ["a.png", "report.csv", "report.json"]
    # output folder = the input's folder: the output gets another name, the input survives
    assert (
        main(
            [
                "restore",
                str(src / "a.png"),
                "-o",
                str(src),
                "--checkpoint",
                str(tiny_checkpoint),
                "--allow-inside",
                "--quiet",
            ]
        )
        == 0
    )
    assert (src / "a.png").read_bytes() == before
    assert (src / "a_restored.png").is_file()


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, tiny_checkpoint, capsys):
    src = write_image(tmp_path / "in" / "a.png", 16, 16, 0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"precious")
    assert main(["restore", str(src), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--quiet"]) == 1
    assert (out / "a.png").read_bytes() == b"precious" and "--overwrite" in capsys.readouterr().err
    assert (
        main(
            [
                "restore",
                str(src),
                "-o",
                str(out),
                "--checkpoint",
                str(tiny_checkpoint),
                "--overwrite",
                "--quiet",
            ]
        )
        == 0
    )
    assert (out / "a.png").read_bytes() != b"precious"


def test_globs_name_clashes_and_missing_inputs(tmp_path, tiny_checkpoint):
    write_image(tmp_path / "x" / "p.png", 16, 16, 0)
    write_image(tmp_path / "x" / "p.jpg", 16, 16, 1)
    write_image(tmp_path / "y" / "p.png", 16, 16, 2)
    out = tmp_path / "out"
    args = [
        "restore",
        str(tmp_path / "x" / "p.*"),
        str(tmp_path / "y" / "p.png"),
        str(tmp_path / "nope.png"),
        "-o",
        str(out),
        "--checkpoint",
        str(tiny_checkpoint),
        "--quiet",
    ]
    assert main(args) == 1
    report = json.loads((out / "report.json").read_text())
    outputs = sorted(Path(i["output"]).name for i in report["images"] if i["status"] == "restored")
    assert outputs == ["p.png", "p_png.png", "p_png_2.png"]  # x/p.jpg, x/p.png, y/p.png
    assert [Path(s["input"]).name for s in report["skipped"]] == ["nope.png"]


def test_random_weights_warn_loudly(tmp_path, capsys):
    src = write_image(tmp_path / "a.png", 16, 16, 0)
    assert main(["restore", str(src), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["random_weights"] is True


@pytest.mark.parametrize("kind", ["missing", "corrupt", "foreign", "truncated"])
def test_bad_checkpoints_give_a_clear_error(tmp_path, tiny_checkpoint, capsys, kind):
    src = write_image(tmp_path / "a.png", 16, 16, 0)
    ckpt = tmp_path / "w.safetensors"
    if kind == "corrupt":
        ckpt.write_bytes(b"\x00" * 64)
    elif kind == "foreign":
        from safetensors.torch import save_file  # noqa: PLC0415

        save_file({"fc.weight": torch.zeros(3, 3)}, str(ckpt))
    elif kind == "truncated":
        ckpt.write_bytes(tiny_checkpoint.read_bytes()[:2000])
    code = main(["restore", str(src), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt)])
    err = capsys.readouterr().err
    assert code == 2
    expected = {
        "missing": "checkpoint not found",
        "corrupt": "cannot load",
        "foreign": "not a MoCE-IR state dict",
        "truncated": "cannot load",
    }
    assert expected[kind] in err and "Traceback" not in err


# --- the engine, with a stand-in model whose exact output is known ---------------------------


class Pointwise(nn.Module):
    """``y = 0.5 x + 0.1`` per pixel, routing every image to expert 1; can fail like a full GPU."""

    def __init__(self, max_pixels: int | None = None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.config = SimpleNamespace(top_k=1, num_dec_blocks=(1,))
        self.max_pixels, self.calls, self._b = max_pixels, [], 0

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        if self.max_pixels is not None and x.shape[0] * x.shape[2] * x.shape[3] > self.max_pixels:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        self._b = x.shape[0]
        return 0.5 * x * self.w + 0.1

    def routing_choices(self):
        return [torch.ones(self._b, 1, dtype=torch.long)]


def images(n: int, h: int, w: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((h, w, 3)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize(
    "h,w,tile,overlap", [(40, 50, 16, 4), (33, 17, 16, 8), (10, 70, 32, 0), (64, 64, 64, 8)]
)
def test_tiles_blend_back_to_the_whole_image(h, w, tile, overlap):
    (im,) = images(1, h, w)
    (res,) = Restorer(Pointwise(), torch.device("cpu"), batch_size=3, tile=tile, tile_overlap=overlap)([im])
    np.testing.assert_allclose(res.image, 0.5 * im + 0.1, atol=1e-6)
    assert res.tiles == len(tile_starts(h, tile, overlap)) * len(tile_starts(w, tile, overlap))
    assert res.experts == [[1]]


@pytest.mark.parametrize(
    "length,tile,overlap", [(10, 16, 4), (16, 16, 4), (17, 16, 4), (100, 32, 8), (33, 16, 15)]
)
def test_tile_starts_cover_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
        assert 0 <= s and s + min(tile, length) <= length
    assert covered.all()
    for a, b in zip(starts, starts[1:], strict=False):
        assert a + tile - b >= overlap


def test_blend_ramp_is_positive_and_flat_in_the_middle():
    r = blend_ramp(16, 4)
    assert (r > 0).all() and r[4:12].min() == 1.0 and r[0] == pytest.approx(0.2)


def test_out_of_memory_splits_the_batch_then_tiles():
    ims = images(4, 48, 48)
    model = Pointwise(max_pixels=48 * 48)  # one image fits, two do not
    res = Restorer(model, torch.device("cpu"), batch_size=4)(ims)
    for r, im in zip(res, ims, strict=True):
        np.testing.assert_allclose(r.image, 0.5 * im + 0.1, atol=1e-6)
    assert (4, 3, 48, 48) in model.calls and (1, 3, 48, 48) in model.calls
    model = Pointwise(max_pixels=64 * 64)  # not even one 128 x 128 image: tiles of 64
    (big,) = images(1, 128, 128)
    (r,) = Restorer(model, torch.device("cpu"), batch_size=1)([big])
    np.testing.assert_allclose(r.image, 0.5 * big + 0.1, atol=1e-6)
    assert r.tiles > 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param(dict(batch_size=0), r"--batch-size must be an int >= 1, got 0", id="batch-0"),
        pytest.param(dict(tile=-8), r"--tile must be an int >= 0", id="tile-negative"),
        pytest.param(dict(tile=16, tile_overlap=16), r"--tile-overlap .* = 0\.\.15, got 16", id="overlap"),
    ],
)
def test_restorer_refuses_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Restorer(Pointwise(), torch.device("cpu"), **kwargs)


def test_report_name_may_name_a_sub_folder(tmp_path, tiny_checkpoint):
    src = write_image(tmp_path / "a.png", 16, 16, 0)
    out = tmp_path / "out"
    args = ["restore", str(src), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--quiet"]
    assert main([*args, "--report-name", "reports/run1"]) == 0
    assert json.loads((out / "reports" / "run1.json").read_text())["restored"] == 1
    assert (out / "reports" / "run1.csv").is_file() and (out / "a.png").is_file()


def test_plan_batches_groups_equal_sizes():
    sizes = [(8, 8), (8, 9), (8, 8), (8, 8), (8, 9)]
    assert plan_batches(sizes, 2) == [[0, 2], [3], [1, 4]]


def test_ctrl_c_still_writes_the_report(tmp_path, tiny_checkpoint, monkeypatch):
    from moceir import restore  # noqa: PLC0415

    for i in range(3):
        write_image(tmp_path / "in" / f"{i}.png", 16, 16 + i, i)  # three sizes: three batches
    calls = []
    real = restore.Restorer.__call__

    def interrupted(self, images):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images)

    monkeypatch.setattr(restore.Restorer, "__call__", interrupted)
    out = tmp_path / "out"
    assert (
        main(
            ["restore", str(tmp_path / "in"), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--quiet"]
        )
        == 130
    )
    report = json.loads((out / "report.json").read_text())
    assert report["restored"] == 1
    assert [s["reason"] for s in report["skipped"]] == ["interrupted (Ctrl-C) before it was restored"] * 2


def test_cuda_graph_restorer_gives_the_eager_results(tiny_checkpoint):
    """``cuda_graph=True`` on the CPU runs GraphedInference(capture=False): the graph's forward
    (one per input shape, short batches filled up) without the graph. Outputs and reported
    experts equal the plain restorer's, for whole images and for tiles with a short last batch."""
    import moceir  # noqa: PLC0415

    model = moceir.load_checkpoint(tiny_checkpoint).eval()
    cpu = torch.device("cpu")
    ims = images(3, 24, 20)
    (big,) = images(1, 40, 50)
    plain = Restorer(model, cpu, batch_size=2)
    graphed = Restorer(model, cpu, batch_size=2, cuda_graph=True)
    for a, b in zip(plain(ims), graphed(ims), strict=True):  # batches of 2 and 1 (filled up to 2)
        np.testing.assert_allclose(b.image, a.image, atol=1e-5)
        assert b.experts == a.experts
    assert list(graphed._graphs) == [(2, 3, 24, 20)]
    tiled = [
        Restorer(model, cpu, batch_size=5, tile=16, tile_overlap=4, cuda_graph=g)([big])[0] for g in (0, 1)
    ]
    np.testing.assert_allclose(tiled[1].image, tiled[0].image, atol=1e-5)  # 12 tiles: 5 + 5 + 2 (filled up)
    assert tiled[1].expert_counts == tiled[0].expert_counts and tiled[1].tiles == 12


def test_cuda_graph_restore_needs_cuda_and_a_fast_backend(tmp_path, tiny_checkpoint, capsys):
    src = write_image(tmp_path / "a.png", 16, 16, 0)
    out = tmp_path / "out"
    args = ["restore", str(src), "-o", str(out), "--checkpoint", str(tiny_checkpoint), "--quiet"]
    assert main([*args, "--cuda-graph", "--device", "cpu"]) == 2
    assert "--cuda-graph needs a CUDA device and a fast --backend" in capsys.readouterr().err
    assert not out.exists()
