"""bench/quant_quality.py and bench/eos_share.py on hand-written inputs: the statistics, the
resume rules, the prompts. No model runs here (the scripts' smoke runs do that)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import eos_share  # noqa: E402
import quant_quality as qq  # noqa: E402


def _record(method, bits, seed, bpb):
    return {"method": method, "bits": bits, "seed": seed, "calibrated": seed is not None,
            "bits_per_byte": bpb}


def test_difference_to_rtn_in_pooled_sd():
    records = [_record("rtn", 4, None, 2.00), _record("gptq", 4, 0, 1.97),
               _record("gptq", 4, 1, 1.99), _record("gptq", 4, 2, 1.98),
               _record("nf4", 4, None, 2.01), _record("rtn", 3, None, 2.10),
               _record("bf16", 16, None, 1.95)]
    rows = {(r["method"], r["bits"]): r for r in qq.summarize(records)}
    gptq = rows[("gptq", 4)]
    assert gptq["mean"] == pytest.approx(1.98) and gptq["sd"] == pytest.approx(0.01)
    # RTN is one deterministic run: it adds no degrees of freedom, the pooled sd is GPTQ's
    assert gptq["pooled_sd"] == pytest.approx(0.01)
    assert gptq["vs_rtn"] == pytest.approx(-0.02) and gptq["vs_rtn_sd"] == pytest.approx(-2.0)
    assert rows[("nf4", 4)]["vs_rtn_sd"] is None  # both deterministic: no sd to divide by
    assert "vs_rtn" not in rows[("bf16", 16)] and "vs_rtn" not in rows[("rtn", 3)]
    settings = {"eval_data": "/x/eval.txt", "eval_bytes": 0, "checkpoint": "/x/demo"}
    text = qq.table(qq.summarize(records), settings)
    assert "| gptq | 4 | 3 | 1.9800 | 0.0100 | +1.54% | -0.0200 | -2.0 |" in text
    assert "| rtn | 4 | - | 2.0000 | 0 (no calibration) |" in text


def test_plan_runs_deterministic_methods_once_and_calibrated_ones_per_seed():
    jobs = qq.plan([0, 1, 2])
    keys = [(label, bits, seed) for label, _, bits, _, seed in jobs]
    assert len(keys) == len(set(keys))
    assert [k for k in keys if k[2] is None] == [("bf16", 16, None), ("int8", 8, None),
                                                 ("nf4", 4, None), ("rtn", 4, None),
                                                 ("rtn", 3, None)]
    calibrated = [k for k in keys if k[2] is not None]
    assert len(calibrated) == 4 * 3 and keys[:5] == [k for k in keys if k[2] is None]


def test_results_file_resumes_only_with_the_same_settings(tmp_path):
    out = tmp_path / "qq.jsonl"
    settings = {"checkpoint": "/a", "eval_bytes": 0}
    assert qq.read_records(out, settings) == []
    out.write_text(json.dumps({**_record("rtn", 4, None, 2.0), "settings": settings}) + "\n")
    assert len(qq.read_records(out, settings)) == 1
    with pytest.raises(qq.BenchError, match="differ in eval_bytes"):
        qq.read_records(out, {**settings, "eval_bytes": 1000})
    notes = tmp_path / "notes.txt"
    notes.write_text('{"mine": 1}\n')
    with pytest.raises(qq.BenchError, match="not written by"):
        qq.read_records(notes, settings)


def test_a_used_out_file_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "taken.json"
    out.write_text("{}")
    assert eos_share.main(["--out", str(out), "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "exists" in capsys.readouterr().err
    assert out.read_text() == "{}"


def test_wilson_interval():
    low, high = eos_share.wilson(0, 8)
    z2 = 1.959964 ** 2
    assert low == 0 and high == pytest.approx(z2 / (8 + z2))  # the closed form at k = 0
    low, high = eos_share.wilson(50, 100)
    assert low + high == pytest.approx(1.0) and high - low == pytest.approx(0.19, abs=0.005)
    assert all(0 <= x <= 1 for x in eos_share.wilson(200, 200))
    assert not math.isnan(eos_share.wilson(1, 1)[0])


def test_prompts_are_seeded_distinct_sentence_starts():
    text = "One two three four. Five six seven eight nine! Ten eleven? A b c d e. " * 3
    first = eos_share.sentence_starts(text, 2, 3, seed=0)
    assert first == eos_share.sentence_starts(text, 2, 3, seed=0)
    assert len(set(first)) == 2
    assert set(first) <= {"One two three", "Five six seven", "A b c"}  # "Ten eleven?" is short
    with pytest.raises(ValueError, match="fewer than the 4"):
        eos_share.sentence_starts(text, 4, 3, seed=0)
