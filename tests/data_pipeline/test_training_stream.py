"""The training stream: deterministic, partitioned across ranks/accumulation like one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moceir.data.training import TrainingStream, TrainItem, dihedral, random_crop


def items(n: int = 5) -> list[TrainItem]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        clean = (rng.random((20 + i, 24, 3)) * 255).astype(np.uint8)
        out.append(TrainItem("denoise_25", clean))
        degraded = (rng.random((20 + i, 24, 3)) * 255).astype(np.uint8)
        out.append(TrainItem("derain", clean, degraded))
    return out


def test_same_seed_same_batches_other_seed_other_batches():
    a = TrainingStream(items(), crop=16, batch_size=3, seed=1)
    b = TrainingStream(items(), crop=16, batch_size=3, seed=1)
    c = TrainingStream(items(), crop=16, batch_size=3, seed=2)
    for k in (0, 1, 7):
        ba, bb, bc = a.micro_batch(k), b.micro_batch(k), c.micro_batch(k)
        assert torch.equal(ba["degraded"], bb["degraded"]) and torch.equal(ba["clean"], bb["clean"])
        assert not torch.equal(ba["degraded"], bc["degraded"])
    batch = a.micro_batch(0)
    assert batch["degraded"].shape == (3, 3, 16, 16) and batch["degraded"].dtype == torch.float32
    assert batch["task"].tolist() == [a.tasks.index(t) for t in [a.sample(p)[2] for p in range(3)]]


def test_random_access_equals_sequential_order():
    s = TrainingStream(items(), crop=16, batch_size=2, seed=0)
    seq = [s.micro_batch(k)["clean"] for k in range(12)]  # crosses several epochs (10 items)
    fresh = TrainingStream(items(), crop=16, batch_size=2, seed=0)
    for k in (11, 3, 7, 0):
        assert torch.equal(fresh.micro_batch(k)["clean"], seq[k])


@pytest.mark.parametrize("world,accumulation", [(2, 1), (2, 2), (4, 1), (1, 4)])
def test_ranks_and_accumulation_see_the_single_process_samples(world, accumulation):
    """world x accumulation micro-batches of one step = the same samples as 1 process with
    world * accumulation micro-batches, in the order (a * world + rank)."""
    single = TrainingStream(items(), 8, batch_size=2, accumulation=world * accumulation)
    for step in range(3):
        for a in range(accumulation):
            for rank in range(world):
                s = TrainingStream(
                    items(), 8, batch_size=2, accumulation=accumulation, world=world, rank=rank
                )
                g = a * world + rank
                assert list(s.positions(step * accumulation + a)) == list(
                    single.positions(step * world * accumulation + g)
                )


def test_every_item_once_per_epoch():
    its = items()
    s = TrainingStream(its, crop=8, batch_size=1, seed=3)
    seen = [id(s._item(p)) for p in range(len(its))]
    assert sorted(seen) == sorted(id(i) for i in its)
    second = [id(s._item(p)) for p in range(len(its), 2 * len(its))]
    assert sorted(second) == sorted(seen) and second != seen


def test_paired_crops_are_aligned():
    rng = np.random.default_rng(0)
    clean = (rng.random((30, 40, 3)) * 255).astype(np.uint8)
    s = TrainingStream([TrainItem("derain", clean, clean.copy())], crop=12, batch_size=4)
    b = s.micro_batch(0)
    assert torch.equal(b["degraded"], b["clean"])


def test_small_images_are_padded_to_the_crop():
    (out,) = random_crop([np.ones((5, 7, 3), np.float32)], 12, np.random.default_rng(0))
    assert out.shape == (12, 12, 3)


def test_dihedral_modes_are_the_eight_symmetries():
    x = np.arange(2 * 3 * 1, dtype=np.float32).reshape(2, 3, 1)
    outs = {dihedral(x, m).tobytes() + bytes(dihedral(x, m).shape) for m in range(8)}
    assert len(outs) == 8


def test_mismatched_pair_sizes_name_the_files(tmp_path):
    from PIL import Image  # noqa: PLC0415

    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((11, 12, 3), np.uint8)).save(tmp_path / "b.png")
    s = TrainingStream([TrainItem("derain", tmp_path / "a.png", tmp_path / "b.png")], crop=8, batch_size=1)
    with pytest.raises(RuntimeError, match=r"b\.png.*a\.png.*differ in size"):
        s.micro_batch(0)


def test_unreadable_training_image_names_the_file(tmp_path):
    (tmp_path / "bad.png").write_text("not an image")
    s = TrainingStream([TrainItem("denoise_25", tmp_path / "bad.png")], crop=8, batch_size=1)
    with pytest.raises(RuntimeError, match=r"bad\.png"):
        s.micro_batch(0)
