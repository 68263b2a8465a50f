"""`fanformer-quantize` end to end on a tiny checkpoint, for every method, and its errors:
one line on stderr, exit status 2, nothing written to --output."""

from __future__ import annotations

import json

import pytest
import torch

from quant import load_any_checkpoint
from quant.cli import REPORT_FILE, main
from quant.config import QUANT_CONFIG_FILE

FAST = ["--calib_samples", "4", "--calib_seq_len", "32", "--eval_tokens", "256",
        "--eval_seq_len", "64", "--quiet"]
REPORT_KEYS = {"eval_bpb_before", "eval_bpb_after", "size_bytes_before", "size_bytes_after",
               "seconds", "model_memory_bytes_before", "model_memory_bytes_after"}


@pytest.fixture
def calib_file(tmp_path):
    from tests.conftest import FIXTURES

    path = tmp_path / "calib.txt"
    path.write_text((FIXTURES / "tiny.txt").read_text())
    return path


@pytest.mark.parametrize("method,extra,overrides", [
    ("rtn", ["--lm_head", "int8"], {}), ("int8", [], {}), ("nf4", [], {}),
    ("gptq", ["--group_size", "32", "--desc_act"], {}), ("awq", ["--group_size", "32"], {}),
    # FAN attention, HybridNorm and gates with full-rank linears (no CoLA)
    ("gptq", ["--group_size", "32"], {"cola_rank": 0}),
    ("awq", ["--group_size", "32"], {"cola_rank": 0})])
def test_every_method_end_to_end(tmp_path, checkpoint_dir, tokenizer, calib_file, capsys,
                                 method, extra, overrides):
    if method in ("gptq", "awq"):  # calibrate a bf16-stored checkpoint, as the demo is
        from fanformer.checkpoint import save_checkpoint
        from tests.conftest import make_model

        checkpoint_dir = save_checkpoint(tmp_path / "bf16", make_model(**overrides), tokenizer,
                                         dtype=torch.bfloat16)
    out = tmp_path / "out"
    code = main(["--method", method, "--checkpoint", str(checkpoint_dir), "--output", str(out),
                 "--calib_data", str(calib_file), *FAST, *extra])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / REPORT_FILE).read_text())
    assert printed == saved and REPORT_KEYS <= set(saved)
    assert saved["size_bytes_after"] < saved["size_bytes_before"]
    assert abs(saved["eval_bpb_after"] / saved["eval_bpb_before"] - 1) < 0.05
    assert (out / QUANT_CONFIG_FILE).is_file()
    model, _ = load_any_checkpoint(out)
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)


def _fails(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err, err


def test_bad_input_errors(tmp_path, checkpoint_dir, calib_file, capsys):
    out = tmp_path / "out"
    base = ["--checkpoint", str(checkpoint_dir), "--output", str(out), *FAST]
    _fails(capsys, ["--method", "gguf", *base], "unknown method 'gguf'")
    _fails(capsys, ["--method", "gptq", "--bits", "5", *base], "--bits 5 is not supported")
    _fails(capsys, ["--method", "awq", "--bits", "3", *base], "--bits 3 is not supported")
    _fails(capsys, ["--method", "rtn", "--group_size", "100", *base], "--group_size must be")
    # 3-bit packing needs widths in multiples of 32; the rank-16 CoLA factors are not
    _fails(capsys, ["--method", "gptq", "--bits", "3", *base], "unsupported bits/group size")
    short = tmp_path / "short.txt"
    short.write_text("too short to calibrate on")
    _fails(capsys, ["--method", "gptq", "--calib_data", str(short), *base],
           "fewer than the 4 samples")
    _fails(capsys, ["--method", "awq", "--calib_data", str(tmp_path / "nope.txt"), *base],
           "cannot read the calibration text")
    _fails(capsys, ["--method", "rtn", *base, "--eval_data", str(tmp_path / "nope.txt")],
           "cannot read the eval text")
    _fails(capsys, ["--method", "rtn", "--checkpoint", str(tmp_path / "missing"),  # checked
                    "--output", str(out), *FAST, "--eval_tokens", "-1"],  # before any load
           "--eval_tokens must be")
    _fails(capsys, ["--method", "rtn", "--checkpoint", str(tmp_path / "missing"),
                    "--output", str(out), *FAST], "does not exist")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_already_quantized_checkpoint_is_refused(tmp_path, checkpoint_dir, capsys):
    first = tmp_path / "q"
    assert main(["--method", "rtn", "--checkpoint", str(checkpoint_dir), "--output",
                 str(first), *FAST]) == 0
    capsys.readouterr()
    _fails(capsys, ["--method", "int8", "--checkpoint", str(first), "--output",
                    str(tmp_path / "qq"), *FAST], "already quantized")
    assert not (tmp_path / "qq").exists()


def test_module_entry_point_runs():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "quant.cli", "--method", "nope",
                             "--checkpoint", "x", "--output", "y"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown method" in result.stderr


def test_output_folder_with_user_files_is_never_replaced(tmp_path, checkpoint_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "IMPORTANT.txt").write_text("mine")
    argv = ["--method", "rtn", "--checkpoint", str(checkpoint_dir), "--output", str(out), *FAST]
    _fails(capsys, argv, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["IMPORTANT.txt"]
    assert (out / "IMPORTANT.txt").read_text() == "mine"


def test_output_folder_of_an_earlier_quantize_is_replaced(tmp_path, checkpoint_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is fine too
    argv = ["--method", "rtn", "--checkpoint", str(checkpoint_dir), "--output-dir", str(out),
            *FAST]
    assert main(argv) == 0
    first = json.loads((out / QUANT_CONFIG_FILE).read_text())
    assert main([*argv, "--method", "int8"]) == 0  # its own earlier output: replaced
    assert json.loads((out / QUANT_CONFIG_FILE).read_text()) != first
    (out / "notes.txt").write_text("added by hand")  # marked, so still ours to replace
    capsys.readouterr()
    assert main(argv) == 0
    assert not (out / "notes.txt").exists()


def test_overwrite_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path, checkpoint_dir,
                                                                   capsys):
    out = tmp_path / "home"
    out.mkdir()
    (out / "IMPORTANT.txt").write_text("mine")
    argv = ["--method", "rtn", "--checkpoint", str(checkpoint_dir), "--output", str(out),
            "--overwrite", *FAST]
    _fails(capsys, argv, "replaces only a checkpoint folder")
    assert sorted(p.name for p in out.iterdir()) == ["IMPORTANT.txt"]
    assert (out / "IMPORTANT.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".home")]


def test_overwrite_replaces_a_checkpoint_folder(tmp_path, checkpoint_dir, tokenizer, model,
                                                capsys):
    from fanformer.checkpoint import save_checkpoint

    out = save_checkpoint(tmp_path / "other", model, tokenizer)  # holds config.json
    argv = ["--method", "rtn", "--checkpoint", str(checkpoint_dir), "--output", str(out),
            *FAST]
    _fails(capsys, argv, "--overwrite")
    assert main([*argv, "--overwrite"]) == 0
    assert (out / QUANT_CONFIG_FILE).is_file()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_output_holding_the_checkpoint_is_refused(tmp_path, checkpoint_dir, capsys,
                                                  overwrite):
    before = sorted(p.name for p in checkpoint_dir.iterdir())
    for output in (checkpoint_dir.parent, checkpoint_dir):
        argv = ["--method", "rtn", "--checkpoint", str(checkpoint_dir), "--output",
                str(output), *overwrite, *FAST]
        _fails(capsys, argv, "--checkpoint")
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == before
    assert (tmp_path / "ckpt").is_dir()


def test_the_eval_scores_the_whole_text_by_default_and_says_how_much(tmp_path, checkpoint_dir,
                                                                     tokenizer, capsys):
    """No --eval_tokens: every token of the (credit-stripped) eval text is scored, and the
    report gives the count; with a cap, exactly the cap."""
    from fanformer.data import read_eval_text
    from tests.conftest import FIXTURES

    eval_file = tmp_path / "eval.txt"
    eval_file.write_text("Produced by a volunteer.\n\n"
                         + (FIXTURES / "tiny.txt").read_text()[:3000])
    text = read_eval_text(eval_file)
    assert not text.startswith("Produced")
    base = ["--method", "rtn", "--checkpoint", str(checkpoint_dir), "--eval_data",
            str(eval_file), "--eval_seq_len", "64", "--quiet"]
    assert main([*base, "--output", str(tmp_path / "all")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["eval_tokens_scored"] == len(tokenizer.encode(text)) - 1
    assert report["eval_text_bytes"] == len(text.encode("utf-8"))
    assert report["eval_tokens_cap"] is None
    assert main([*base, "--output", str(tmp_path / "capped"), "--eval_tokens", "100"]) == 0
    assert json.loads(capsys.readouterr().out)["eval_tokens_scored"] == 100


def test_the_report_scores_the_weights_own_error(tmp_path, checkpoint_dir, tokenizer, capsys,
                                                 monkeypatch):
    """The quantized model is scored on the weight-only kernels even where the default
    policy would put the eval's batches on w8a8 (forced here for every call), and the report
    says which kernels it scored on."""
    import quant.layers
    from fanformer.data import bits_per_byte, read_eval_text
    from tests.conftest import FIXTURES

    monkeypatch.setattr(quant.layers, "WEIGHT_ONLY_MAX_WORK", 0)  # default: w8a8 always
    monkeypatch.setattr(quant.layers, "NATIVE_MAX_WORK", 0)  # on the native kernel too
    monkeypatch.setattr(quant.layers, "NATIVE_MAX_WORK_VS_INT_MM", 0)
    monkeypatch.setattr(quant.layers, "int8_gemm_fast", lambda: True)  # even where it is slow
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text((FIXTURES / "tiny.txt").read_text()[:3000])
    out = tmp_path / "out"
    assert main(["--method", "rtn", "--checkpoint", str(checkpoint_dir), "--output", str(out),
                 "--eval_data", str(eval_file), "--eval_seq_len", "64", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, _ = load_any_checkpoint(out)
    layers = [m for m in model.modules() if isinstance(m, quant.layers.QuantLinear)]
    assert sum(report["eval_kernels"].values()) == len(layers)
    assert report["eval_kernels"]["weight-only"] > 0  # some layers' shapes fit no int4 kernel
    from quant.convert import cast_float_tensors

    cast_float_tensors(model, torch.float32)
    text = read_eval_text(eval_file)
    score = lambda: bits_per_byte(model, tokenizer, text, seq_len=64, batch_size=4)
    on_w8a8 = score()["bits_per_byte"]
    with quant.layers.weight_only_everywhere():
        weight_only = score()["bits_per_byte"]
    assert report["eval_bpb_after"] == weight_only != on_w8a8
