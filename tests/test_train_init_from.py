"""`fanformer-train --init_from`: continued pre-training / fine-tuning from a model checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fanformer.checkpoint import QUANT_CONFIG_FILE, load_checkpoint, read_config
from fanformer.train import main
from tests.test_train import CORPUS, common, losses

STEP_8 = Path("checkpoints") / "step_00000008"


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer_file) -> Path:
    """A trained model checkpoint to start from (the exported bf16 one, as users have)."""
    root = tmp_path_factory.mktemp("source")
    assert main(common(tokenizer_file, root / "run", "--export_dir", str(root / "export"))) == 0
    return root / "export"


def continued(init_from: Path, out_dir: Path, *extra: str) -> list[str]:
    """Like tests.test_train.common, without the shape and tokenizer (they come with it)."""
    return [CORPUS, "--init_from", str(init_from), "--out_dir", str(out_dir),
            "--seq_len", "32", "--batch_size", "2", "--max_steps", "8", "--warmup_steps", "2",
            "--eval_every", "0", "--log_every", "1", "--save_every", "100",
            "--precision", "fp32", "--eval_fraction", "0.05", *extra]


def test_init_from_starts_from_the_checkpoints_weights(tmp_path, source):
    """At a vanishing learning rate the run ends where its source began, in fp32, with the
    source's config and tokenizer; trained from scratch it would not."""
    assert main(continued(source, tmp_path / "run", "--lr", "1e-12")) == 0
    start, start_tokenizer = load_checkpoint(source, dtype=torch.float32)
    end, end_tokenizer = load_checkpoint(tmp_path / "run" / STEP_8)
    assert read_config(tmp_path / "run" / STEP_8) == read_config(source)
    assert end_tokenizer.encode("the queen said") == start_tokenizer.encode("the queen said")
    for (name, x), y in zip(start.state_dict().items(), end.state_dict().values()):
        assert y.dtype == torch.float32, name  # fp32 master weights, not the bf16 export's
        torch.testing.assert_close(y, x, rtol=0, atol=1e-6, msg=name)


def test_init_from_continues_training_where_the_source_left_off(tmp_path, source,
                                                                tokenizer_file):
    """The first loss of a continued run is that of a trained model, not of a random one;
    its export counts the source's tokens and its own."""
    export = tmp_path / "export"
    assert main(continued(source, tmp_path / "continued", "--export_dir", str(export))) == 0
    assert main(common(tokenizer_file, tmp_path / "scratch")) == 0
    assert losses(tmp_path / "continued")[1] < losses(tmp_path / "scratch")[1] - 0.2
    trained = [json.loads((d / "config.json").read_text())["metadata"]["trained_tokens"]
               for d in (source, export)]
    assert trained == [8 * 2 * 2 * 32, 8 * 2 * 2 * 32 + 8 * 2 * 32]


def test_an_init_from_run_resumes_exactly(tmp_path, source):
    """The same command plus --resume continues from the run's checkpoint, not the source;
    --dropout (training only) may be set on top of the source's config, and is used."""
    dropout = ("--dropout", "0.2")
    assert main(continued(source, tmp_path / "straight", *dropout)) == 0
    assert main(continued(source, tmp_path / "split", *dropout, "--stop_at_step", "4")) == 0
    assert main(continued(source, tmp_path / "split", *dropout, "--resume")) == 0
    assert read_config(tmp_path / "split" / STEP_8).dropout == 0.2
    assert main(continued(source, tmp_path / "no_dropout")) == 0
    assert losses(tmp_path / "no_dropout")[1] != pytest.approx(losses(tmp_path / "straight")[1])
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert sorted(split) == list(range(1, 9))
    assert split == pytest.approx(straight, rel=1e-6)


@pytest.mark.parametrize("extra, message", [
    (["--tokenizer", "{tokenizer}"], "drop --tokenizer"),
    (["--d_model", "32", "--fan_p", "0.2"], "drop --d_model, --fan_p"),
    (["--preset", "tiny"], "drop --preset"),  # not ignored: the shape is the source's
    (["--init_from", "{tmp}/nowhere"], "does not exist"),
    (["--init_from", "{tmp}/quantized"], "is a quantized checkpoint"),
    (["--init_from", "{tmp}/quantized", "--export_dir", "{tmp}/quantized/"],
     "the export would replace the model this run starts from"),
    (["--init_from", "{tmp}/quantized", "--export_dir", "{tmp}"], "holds the --init_from"),
    (["--init_from", "{tmp}/quantized", "--export_dir", "{tmp}/quantized/export"],
     "lies inside the --init_from"),
])
def test_init_from_conflicts_are_one_line_before_any_work(tmp_path, source, tokenizer_file,
                                                          capsys, extra, message):
    shutil.copytree(source, tmp_path / "quantized")
    (tmp_path / "quantized" / QUANT_CONFIG_FILE).write_text("{}")
    argv = continued(source, tmp_path / "run") + [
        a.replace("{tmp}", str(tmp_path)).replace("{tokenizer}", tokenizer_file) for a in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fanformer-train: error:"), err
    assert message in err[0], err
    assert not (tmp_path / "run").exists()
