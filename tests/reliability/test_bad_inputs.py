"""The bad-input contract, as one table: each row is (callable, bad arguments, exception type,
message regex), and the regex names the argument at fault.

What other tables already check is not repeated here: the ops' wrong rank, dtype, shape, k,
NaN/Inf and backend names (``BAD_INPUTS`` in ``tests/ops/test_<op>.py``), the model's 3-D,
one-channel, integer, NaN and non-tensor inputs, unknown config names and overrides, truncated,
foreign and pickled checkpoints (``tests/model/test_checkpoint_and_inputs.py``), and the
restore command's missing, corrupt, foreign and truncated checkpoints and output folder inside
an input folder (``tests/cli/test_restore.py``). This table adds the rest: ``patch_fft_conv``
(no table of its own), a tensor on another device for every op (a ``meta`` tensor stands in
for a second device, so these run on any machine), hand-corrupted routing plans, more model
inputs and configurations, more broken checkpoint files, and the command line.

Rows marked ``gap`` (``xfail(strict=True)``) are known gaps: the regex is the error the row
should give; the code gives an unclear one (or none). When a gap is fixed the row passes,
strict xfail turns that into a failure, and the mark must go. None is open at present (the 13
first found are fixed and their rows assert the messages); an empty batch is not an error (the
model returns an empty output: ``test_model_empty_batch_gives_an_empty_output``).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import pytest
import torch

import moceir
from moce_kernels import combine, dispatch, grouped_dwconv, layernorm2d, patch_fft_conv, route
from moceir.cli import main
from tests.cli.conftest import write_image

TINY = {"dim": 8, "num_blocks": (1, 1, 1, 1), "num_dec_blocks": (1, 1, 1), "num_refinement_blocks": 1}

# Valid arguments, each row breaks one of them. M: on the meta device (another device than x).
META = torch.device("meta")
X3, X4, X4_INT = torch.randn(4, 5, 5), torch.randn(3, 4, 5, 5), torch.ones(3, 4, 5, 5, dtype=torch.int64)
X4_M, X4_WIDE = torch.empty(3, 4, 5, 5, device=META), torch.randn(3, 4, 5, 6)
PLAN = route(torch.randn(3, 4), 2)  # B = 3, E = 4, k = 2: 6 slots
BAD_IMAGES = PLAN._replace(sorted_images=torch.tensor([0, 1, 2, 99, 0, 1]))
BAD_INVERSE = PLAN._replace(inverse=torch.tensor([0, 1, 2, 3, 4, -7]))
SHORT_INVERSE = PLAN._replace(inverse=PLAN.inverse[:5])
SHORT_SLOTS = PLAN._replace(sorted_slots=PLAN.sorted_slots[:5])
Y, GATES_M = torch.randn(6, 2), torch.rand(3, 2, device=META)
W, B, OFF = torch.randn(2, 4, 3, 3), torch.randn(2, 4), torch.tensor([0, 1, 3])  # grouped_dwconv
C, K = [4, 2], [3, 3]
ONES, ZEROS = torch.ones(4), torch.zeros(4)  # layernorm2d


def gap(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=f"known gap: {reason}")


def row(id: str, fn, args: tuple, error, match: str, kwargs: dict | None = None, marks=()):
    return pytest.param(fn, args, kwargs or {}, error, match, id=id, marks=marks)


OPS = [
    # patch_fft_conv: the only op without its own bad-input table
    row("fft-q-3d", patch_fft_conv, (X3, X3, 4), ValueError,
        r"^q must have 4 dimensions, got shape \(4, 5, 5\)$"),
    row("fft-q-list", patch_fft_conv, ([[0.0]], X4, 4), TypeError,
        r"^q must be a torch\.Tensor, got list$"),
    row("fft-q-int", patch_fft_conv, (X4_INT, X4, 4), TypeError,
        r"^q must have dtype in \(.*\), got torch\.int64$"),
    row("fft-k-int", patch_fft_conv, (X4, X4_INT, 4), TypeError,
        r"^k must have dtype in \(.*\), got torch\.int64$"),
    row("fft-k-shape", patch_fft_conv, (X4, X4_WIDE, 4), ValueError,
        r"^k must have shape \(3, 4, 5, 5\), got \(3, 4, 5, 6\)$"),
    row("fft-k-device", patch_fft_conv, (X4, X4_M, 4), ValueError,
        r"^k must be on cpu \(like the input\), got meta$"),
    row("fft-patch-0", patch_fft_conv, (X4, X4, 0), ValueError,
        r"^patch must be an int >= 1, got 0$"),
    row("fft-patch-float", patch_fft_conv, (X4, X4, 4.0), ValueError,
        r"^patch must be an int >= 1, got 4\.0$"),
    row("fft-patch-bool", patch_fft_conv, (X4, X4, True), ValueError,
        r"^patch must be an int >= 1, got True$"),
    row("fft-backend-unknown", patch_fft_conv, (X4, X4, 4), ValueError,
        r"^backend must be one of \(.*\), got 'fast'$", {"backend": "fast"}),
    row("fft-backend-cpu", patch_fft_conv, (X4, X4, 4), RuntimeError,
        r"^patch_fft_conv: backend 'cpu' is not implemented", {"backend": "cpu"}),
    # a tensor on another device than the input
    row("route-noise-device", route, (torch.randn(3, 4), 1, torch.zeros(3, 4, device=META)), ValueError,
        r"^noise must be on cpu \(like the input\), got meta$"),
    row("dispatch-plan-device", dispatch, (X4_M, PLAN), ValueError,
        r"^plan\.sorted_images is on cpu but the input is on meta$"),
    row("combine-plan-device", combine, (Y.to(META), PLAN), ValueError,
        r"^plan\.sorted_images is on cpu but the input is on meta$"),
    row("combine-gates-device", combine, (Y, PLAN, GATES_M), ValueError,
        r"^gates must be on cpu \(like the input\), got meta$"),
    row("dwconv-weight-device", grouped_dwconv, (X4, W.to(META), None, OFF, C, K), ValueError,
        r"^weight must be on cpu \(like the input\), got meta$"),
    row("dwconv-bias-device", grouped_dwconv, (X4, W, B.to(META), OFF, C, K), ValueError,
        r"^bias must be on cpu \(like the input\), got meta$"),
    row("dwconv-offsets-device", grouped_dwconv, (X4, W, None, OFF.to(META), C, K), ValueError,
        r"^offsets must be on cpu \(like the input\), got meta$"),
    row("ln-weight-device", layernorm2d, (X4, ONES.to(META), ZEROS), ValueError,
        r"^weight must be on cpu \(like the input\), got meta$"),
    row("ln-bias-device", layernorm2d, (X4, ONES, ZEROS.to(META)), ValueError,
        r"^bias must be on cpu \(like the input\), got meta$"),
    # shapes and values the op tables leave out
    row("dwconv-offsets-2d", grouped_dwconv, (X4, W, None, OFF[None], C, K), ValueError,
        r"^offsets must have 1 dimensions, got shape \(1, 3\)$"),
    row("dwconv-offsets-negative", grouped_dwconv, (X4, W, None, torch.tensor([-1, 1, 3]), C, K), ValueError,
        r"^offsets must rise from 0 to N = 3, got \[-1, 1, 3\]$"),
    row("ln-eps-none", layernorm2d, (X4, ONES, ZEROS, None), TypeError,
        r"^eps must be a float > 0, got NoneType \(None\)$"),
    row("ln-eps-str", layernorm2d, (X4, ONES, ZEROS, "1e-5"), TypeError,
        r"^eps must be a float > 0, got str \('1e-5'\)$"),
    # hand-corrupted routing plans: lengths are checked always (shapes only), index values on
    # CPU tensors and by the reference backend (a GPU's fast backends trust plans from route)
    row("dispatch-index-reference", dispatch, (Y[:3], BAD_IMAGES), ValueError,
        r"^plan\.sorted_images\[3\] = 99 is out of range \[0, 3\): a corrupted plan\?",
        {"backend": "reference"}),
    row("dispatch-index-auto", dispatch, (Y[:3], BAD_IMAGES), ValueError,
        r"^plan\.sorted_images\[3\] = 99 is out of range \[0, 3\)"),
    row("combine-index-reference", combine, (Y, BAD_INVERSE), ValueError,
        r"^plan\.inverse\[5\] = -7 is out of range \[0, 6\): a corrupted plan\?", {"backend": "reference"}),
    row("combine-index-auto", combine, (Y, BAD_INVERSE), ValueError,
        r"^plan\.inverse\[5\] = -7 is out of range \[0, 6\)"),
    row("dispatch-inverse-length", dispatch, (Y[:3], SHORT_INVERSE), ValueError,
        r"^plan\.inverse must have shape \(B \* k,\) = \(6,\) \(B = 3, k = 2: .*\), got \(5,\)"),
    row("combine-sorted-slots-length", combine, (Y, SHORT_SLOTS), ValueError,
        r"^plan\.sorted_slots must have shape \(B \* k,\) = \(6,\) .*, got \(5,\)", {"backend": "reference"}),
    row("combine-plan-gates-shape", combine, (Y, PLAN._replace(gates=PLAN.gates[:2])), ValueError,
        r"^plan\.gates must have shape \(3, 2\), got \(2, 2\)$"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "args", "kwargs", "error", "match"), OPS)
def test_op_bad_input(fn, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


# --- the model: building it and calling it ---------------------------------------------------


def build(**overrides):
    return moceir.build_model("moce_ir_s", **{**TINY, **overrides})


def override(id: str, error, match: str, marks=(), **overrides):
    return row(id, build, (), error, match, overrides, marks)


BUILD = [
    override("num-blocks-length", ValueError, r"^heads must have 3 entries and num_dec_blocks 2",
             num_blocks=(1, 1, 1)),
    override("heads-length", ValueError, r"^heads must have 4 entries",
             heads=(1, 2, 4)),
    override("patch-sizes-length", ValueError, r"^patch_sizes must have num_experts = 4 entries$",
             patch_sizes=(4, 8)),
    override("top-k-0", ValueError, r"^top_k must be in 1\.\.4 \(the number of experts\), got 0$",
             top_k=0),
    override("num-experts-0", ValueError, r"^top_k must be in 1\.\.0 \(the number of experts\)",
             num_experts=0),
    override("noise-std-negative", ValueError, r"^noise_std must be > 0, got -1\.0$",
             noise_std=-1.0),
    override("expert-depth-0", ValueError, r"^expert_depth must be >= 1, got 0$",
             expert_depth=0),
    override("dim-0", ValueError, r"^dim must be >= 1, got 0$",
             dim=0),
    override("dim-negative", ValueError, r"^dim must be >= 1, got -8$",
             dim=-8),
    override("dim-odd", ValueError, r"^dim must be even \(.*\), got 7$",
             dim=7),
    override("dim-below-expert-ranks", ValueError,
             r"^dim must be >= 2\*\*\(num_experts - 1\) = 8 \(the smallest expert's rank .*\), got 4$",
             dim=4),
    override("dim-str", TypeError, r"^dim must be an int, got str \('8'\)$",
             dim="8"),
    override("dim-bool", TypeError, r"^dim must be an int, got bool \(True\)$",
             dim=True),
    override("in-channels-0", ValueError, r"^in_channels must be >= 1, got 0$",
             in_channels=0),
    override("out-channels-other", ValueError, r"^out_channels must equal in_channels = 3 \(.*\), got 1$",
             out_channels=1),
    override("heads-not-dividing", ValueError,
             r"^heads\[0\] = 3 must be >= 1 and divide the width of level 0, dim \* 2\*\*0 = 8 \(dim = 8\)$",
             heads=(3, 2, 4, 8)),
    override("heads-0", ValueError, r"^heads\[1\] = 0 must be >= 1",
             heads=(1, 0, 4, 8)),
    override("num-blocks-str", TypeError, r"^num_blocks must be a tuple of ints, got '1111'$",
             num_blocks="1111"),
    override("num-blocks-negative", ValueError,
             r"^num_blocks must hold block counts >= 0, got \(1, -1, 1, 1\)$",
             num_blocks=(1, -1, 1, 1)),
    override("num-blocks-one-level", ValueError, r"^num_blocks must have at least 2 entries",
             num_blocks=(1,), heads=(1,), num_dec_blocks=()),
    override("no-decoder-blocks", ValueError, r"^num_dec_blocks must hold at least one block",
             num_dec_blocks=(0, 0, 0)),
    override("ffn-expansion-0", ValueError, r"^ffn_expansion must be > 0 .*, got 0\.0 \(dim = 8\)$",
             ffn_expansion=0),
    override("noise-std-str", TypeError, r"^noise_std must be a number, got str \('0\.1'\)$",
             noise_std="0.1"),
    override("patch-sizes-0", ValueError, r"^patch_sizes must be >= 1, got \(0, 8, 16, 32\)$",
             patch_sizes=(0, 8, 16, 32)),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "args", "kwargs", "error", "match"), BUILD)
def test_build_model_bad_override(fn, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        fn(*args, **kwargs)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build().eval()


def x_row(id: str, x: torch.Tensor, error, match: str, marks=()):
    return pytest.param(x, error, match, id=id, marks=marks)


MODEL_INPUTS = [
    x_row("5d", torch.rand(1, 1, 3, 8, 8), ValueError,
          r"^x must have 4 dimensions, got shape \(1, 1, 3, 8, 8\)$"),
    x_row("4-channels", torch.rand(1, 4, 8, 8), ValueError,
          r"^x must have 3 channels \(\[B, C, H, W\]\), got shape"),
    x_row("bool", torch.ones(1, 3, 8, 8, dtype=torch.bool), TypeError,
          r"^x must have dtype in \(.*\), got torch\.bool$"),
    x_row("complex", torch.rand(1, 3, 8, 8, dtype=torch.complex64), TypeError,
          r"^x must have dtype in \(.*\), got torch\.complex64$"),
    x_row("inf", torch.full((1, 3, 8, 8), float("inf")), ValueError, r"^x contains NaN or Inf$"),
    x_row("float64-into-float32-model", torch.rand(1, 3, 8, 8, dtype=torch.float64), TypeError,
          r"^x has dtype torch\.float64 but the model's parameters are torch\.float32: cast the input "
          r"with x\.to\(torch\.float32\) \(or the model with model\.to\(torch\.float64\)\)$"),
    x_row("zero-height", torch.rand(1, 3, 0, 8), ValueError,
          r"^x must have height and width >= 1 \(H, W of \[B, C, H, W\]\), got shape \(1, 3, 0, 8\)$"),
    x_row("zero-width", torch.rand(2, 3, 8, 0), ValueError,
          r"^x must have height and width >= 1 .*, got shape \(2, 3, 8, 0\)$"),
    x_row("another-device", torch.empty(1, 3, 8, 8, device=META), ValueError,
          r"^x is on meta but the model is on cpu: move it with x\.to\('cpu'\)$"),
]  # fmt: skip


@pytest.mark.parametrize(("x", "error", "match"), MODEL_INPUTS)
def test_model_bad_input(model, x, error, match):
    with torch.inference_mode(), pytest.raises(error, match=match):
        model(x)


@pytest.mark.parametrize("training", [False, True])
def test_model_empty_batch_gives_an_empty_output(model, training):
    """B = 0 is not an error (the ops take empty batches too): an empty [0, 3, H, W] output."""
    model.train(training)
    try:
        x = torch.rand(0, 3, 13, 7, requires_grad=True)
        out = model(x)
        assert out.shape == (0, 3, 13, 7) and out.dtype == x.dtype
        assert float(model.total_loss) == 0.0 and model.routing_choices() == []
        (out.sum() + model.total_loss).backward()  # a graph to step through, as for any batch
        assert x.grad.shape == x.shape
    finally:
        model.eval()


# --- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return moceir.save_checkpoint(build(), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


TEXT = b"hello, these are not weights\n"

CHECKPOINTS = [
    # (file name, content: bytes, "folder", "tiny[:n]" or None for no file)
    pytest.param("missing.ckpt", None, FileNotFoundError,
                 r"^checkpoint not found: .*missing\.ckpt$", id="missing"),
    pytest.param("", "folder", FileNotFoundError, r"^checkpoint not found: ", id="folder"),
    pytest.param("empty.pt", b"", ValueError,
                 r"^cannot read checkpoint .*empty\.pt \(truncated or not a torch file\?\): "
                 r"the file is empty$",
                 id="empty-pt"),
    pytest.param("notes.pt", TEXT, ValueError,
                 r"^cannot read checkpoint .*notes\.pt: not a checkpoint file \(neither a torch "
                 r"zip/pickle of tensors nor safetensors; it starts with b'hello, these are'\)$",
                 id="text-pt"),
    pytest.param("notes.ckpt", b"xyz: not weights either\n", ValueError,  # was "would run code"
                 r"^cannot read checkpoint .*notes\.ckpt: not a checkpoint file", id="other-text-ckpt"),
    pytest.param("cut.pt", "tiny-pt[:1000]", ValueError,
                 r"^cannot read checkpoint .*cut\.pt \(truncated or not a torch file\?\): ",
                 id="truncated-pt"),
    pytest.param("empty.safetensors", b"", ValueError,
                 r"^cannot read safetensors checkpoint .*empty\.safetensors: the file is empty$",
                 id="empty-safetensors"),
    pytest.param("cut.safetensors", "tiny[:3000]", ValueError,
                 r"^cannot read safetensors checkpoint .*cut\.safetensors: ", id="truncated-safetensors"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "error", "match"), CHECKPOINTS)
def test_load_checkpoint_bad_file(name, content, error, match, tmp_path, tiny_checkpoint):
    path = tmp_path / name
    if content == "folder":
        path.mkdir(exist_ok=True)
    elif content == "tiny[:3000]":
        path.write_bytes(tiny_checkpoint.read_bytes()[:3000])
    elif content == "tiny-pt[:1000]":
        torch.save(moceir.load_checkpoint(tiny_checkpoint).state_dict(), path)
        path.write_bytes(path.read_bytes()[:1000])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=match):
        moceir.load_checkpoint(path)


class _Payload:
    """Unpickling this would create the file ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["load_checkpoint", "cli"])
def test_a_pickled_callable_is_refused_without_running_it(how, tmp_path, capsys):
    marker = tmp_path / "the_payload_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, path)
    if how == "load_checkpoint":
        with pytest.raises(ValueError, match=r"^refusing to load .*evil\.ckpt: .*run code"):
            moceir.load_checkpoint(path)
    else:
        image = write_image(tmp_path / "a.png", 16, 16)
        argv = ["restore", str(image), "-o", str(tmp_path / "out"), "--checkpoint", str(path)]
        code, err = run_cli(argv, capsys)
        assert code == 2 and "refusing to load" in err and "Traceback" not in err
    assert not marker.exists()


# --- the command line (in-process: moceir.cli.main) ------------------------------------------


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit status (an argparse usage error raises SystemExit) and stderr of ``moceir argv``."""
    try:
        code = main([*argv, "--quiet"])
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def cli_paths(tmp_path, tiny_checkpoint) -> dict[str, str]:
    image = write_image(tmp_path / "in" / "a.png", 16, 16)
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "notes.pt").write_bytes(TEXT)
    return {
        "image": str(image),
        "in": str(tmp_path / "in"),
        "out": str(tmp_path / "out"),
        "tmp": str(tmp_path),
        "ckpt": str(tiny_checkpoint),
    }


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def cli(id: str, args: str, match: str, marks=()):
    return pytest.param(args, match, id=id, marks=marks)


CLI = [
    cli("missing-input", "{tmp}/nope.png -o {out}",
        r"no input images found \(.*nope\.png: no such file or folder\)"),
    cli("glob-matches-nothing", "'{tmp}/*.jpeg' -o {out}",
        r"no input images found \(.*\.jpeg: the pattern matches no file\)"),
    cli("output-is-a-file", "{image} -o {tmp}/a_file",
        r"-o/--output-dir .*a_file exists and is not a folder"),
    cli("output-under-a-file", "{image} -o {tmp}/a_file/sub --checkpoint {ckpt}",
        r"cannot create the output folder .*a_file/sub: "),
    cli("backend-unknown", "{image} -o {out} --backend tpu",
        r"argument --backend: invalid choice: 'tpu'"),
    cli("backend-cuda-without-gpu", "{image} -o {out} --backend cuda --checkpoint {ckpt}",
        r"--backend cuda: .*CUDA", marks=no_cuda),
    cli("device-unknown", "{image} -o {out} --device tpu",
        r"unknown device 'tpu'"),
    cli("device-cuda-without-gpu", "{image} -o {out} --device cuda",
        r"--device cuda: torch sees no CUDA GPU", marks=no_cuda),
    cli("tile-negative", "{image} -o {out} --tile -1",
        r"--tile must be an int >= 0 \(0: no tiling\), got -1"),
    cli("tile-not-int", "{image} -o {out} --tile abc",
        r"argument --tile: invalid int value: 'abc'"),
    cli("overlap-not-below-tile", "{image} -o {out} --tile 64 --tile-overlap 64",
        r"--tile-overlap must be in 0\.\.tile-1 = 0\.\.63, got 64"),
    cli("overlap-negative", "{image} -o {out} --tile 64 --tile-overlap -1",
        r"--tile-overlap must be in 0\.\.tile-1 = 0\.\.63, got -1"),
    cli("batch-size-0", "{image} -o {out} --batch-size 0",
        r"--batch-size must be an int >= 1, got 0"),
    cli("precision-unknown", "{image} -o {out} --precision fp8",
        r"argument --precision: invalid choice: 'fp8'"),
    cli("config-unknown", "{image} -o {out} --config moce_ir_xl",
        r"argument --config: invalid choice: 'moce_ir_xl'"),
    cli("no-output-dir", "{image}",
        r"the following arguments are required: -o/--output-dir"),
    cli("unknown-option", "{image} -o {out} --tiles 4",
        r"unrecognized arguments: --tiles 4"),
    cli("checkpoint-folder-without-weights", "{image} -o {out} --checkpoint {in}",
        r"in is a folder without model\.safetensors or checkpoints/latest"),
    cli("checkpoint-text", "{image} -o {out} --checkpoint {tmp}/notes.pt",
        r"error: cannot load checkpoint: cannot read checkpoint [^:]*notes\.pt: not a checkpoint file"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "match"), CLI)
def test_restore_command_bad_input(args, match, cli_paths, capsys):
    code, err = run_cli(["restore", *shlex.split(args.format(**cli_paths))], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("moceir restore: error: ", "moceir: error: ")), err
    assert re.search(match, last), err
    assert not os.path.exists(cli_paths["out"]), "a refused command must not create its output folder"
