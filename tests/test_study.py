"""bench/study.py: the ablation plan (cumulative arms at equal parameters, sweep then seeds),
the manifest (a rerun skips finished runs; an interrupted run resumes to the uninterrupted
run's numbers), and the report's maths (paired differences, tokens-to-loss) on synthetic
metrics."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import study  # noqa: E402
from study_report import (  # noqa: E402
    eval_curve,
    final_metrics,
    paired_differences,
    report_markdown,
    summarize,
    tokens_to_reach,
)

from fanformer.config import ModelConfig  # noqa: E402
from tests.conftest import FIXTURES  # noqa: E402

SHAPE = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
             max_seq_len=64, fan_p=0.15, cola_rank=16)


# ---- the plan ----
def test_arms_add_one_switch_each_at_the_dense_arms_parameter_count():
    configs = study.arm_configs(SHAPE, list(study.ARMS))
    switches = [(c.fan_p > 0, c.cola_rank > 0, c.norm == "hybrid", c.gated_residual)
                for c in configs.values()]
    assert switches == [(False, False, False, False), (True, False, False, False),
                        (True, True, False, False), (True, True, True, False),
                        (True, True, True, True)]
    full = ModelConfig.from_preset("test")  # the last arm is the FANformer, d_ff aside
    assert {k: v for k, v in configs["gates"].to_dict().items() if k not in ("d_ff",
                                                                             "max_seq_len")} \
        == {k: v for k, v in full.to_dict().items() if k not in ("d_ff", "max_seq_len")}
    assert configs["dense"].d_ff == SHAPE["d_ff"]
    assert configs["fan"].d_ff < SHAPE["d_ff"]  # FAN's projection paid for by a narrower FFN
    target = study.non_embedding_parameters(configs["dense"])
    for name, config in configs.items():
        assert abs(study.non_embedding_parameters(config) / target - 1) <= 0.01, name
    unmatched = study.non_embedding_parameters(
        ModelConfig(**{**configs["fan"].to_dict(), "d_ff": SHAPE["d_ff"]}))
    assert unmatched / target - 1 > 0.01  # so the matching did something


def test_a_subset_of_arms_keeps_the_cumulative_switches():
    configs = study.arm_configs(SHAPE, ["dense", "hybridnorm"])
    assert list(configs) == ["dense", "hybridnorm"]
    h = configs["hybridnorm"]
    assert (h.fan_p, h.cola_rank, h.norm, h.gated_residual) == (0.15, 16, "hybrid", False)


def run(arm: str, lr: float, bpb: float, seed: int = 0, phase: str = "sweep"):
    """(run id, manifest entry) of a finished run."""
    entry = {"arm": arm, "lr": lr, "seed": seed, "phase": phase,
             "final": {"eval_bits_per_byte": bpb}}
    return study.Run(arm, lr, seed, phase).id, entry


def test_the_best_rate_counts_the_rates_earlier_invocations_finished():
    """`--lrs 0.016` alone, after a sweep at 2e-3 .. 8e-3, must not make 1.6e-2 the best."""
    runs = dict([run("cola", 2e-3, 2.08), run("cola", 8e-3, 2.04), run("cola", 1.6e-2, 2.23),
                 run("cola", 4e-3, 1.90, seed=1, phase="seeds")])  # other seeds never count
    assert study.best_rates(["cola"], [1.6e-2], 0, runs) == {"cola": 8e-3}
    assert study.best_rates(["cola"], [1.6e-2, 3.2e-2], 0, runs) == {}  # 3.2e-2 not run yet


def test_sweep_first_then_the_other_seeds_at_each_arms_best_rate():
    arms, lrs, seeds = ["dense", "fan"], [1e-3, 2e-3, 4e-3], [0, 1, 2]
    sweep = study.plan_runs(arms, lrs, seeds, {})
    assert [(r.arm, r.lr, r.seed, r.phase) for r in sweep] == [
        (a, lr, 0, "sweep") for a in arms for lr in lrs]
    finals = dict([run("dense", lr, v) for lr, v in zip(lrs, [2.1, 2.0, math.nan])]  # NaN:
                  + [run("fan", 1e-3, 1.0)])  # a diverged run never wins
    best = study.best_rates(arms, lrs, 0, finals)
    assert best == {"dense": 2e-3}  # fan's sweep is not finished: no best rate yet
    runs = study.plan_runs(arms, lrs, seeds, best)
    assert runs[:6] == sweep
    assert [(r.arm, r.lr, r.seed, r.phase) for r in runs[6:]] == [
        ("dense", 2e-3, 1, "seeds"), ("dense", 2e-3, 2, "seeds")]  # seed 0 is the sweep's
    assert len({r.id for r in runs}) == len(runs)


def test_run_states_come_from_the_run_folders(tmp_path):
    final = {"step": 6, "tokens": 384, "eval_cross_entropy": 3.0, "eval_bits_per_byte": 1.5}
    for name, rows in (("finished", [{"step": 6, "loss": 3.1}, {**final, "final": True}]),
                       ("half", [{"step": 3, "loss": 3.2}])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n"
                                                               for r in rows))
    manifest = {"runs": {  # as a study killed with SIGKILL, or with a run folder deleted, left it
        "a": {"out_dir": "finished", "status": "running"},
        "b": {"out_dir": "half", "status": "running"},
        "c": {"out_dir": "gone", "status": "done", "final": final}}}
    study.refresh(manifest, tmp_path)
    assert manifest["runs"]["a"] == {"out_dir": "finished", "status": "done", "final": final}
    assert [manifest["runs"][r]["status"] for r in "bc"] == ["stopped", "stopped"]
    assert "final" not in manifest["runs"]["c"]
    assert study.steps_done(tmp_path / "half") == 3


# ---- the report's maths ----
def test_paired_differences_cancel_the_seed_noise():
    seed_noise = {0: 0.3, 1: -0.2, 2: 0.05}
    by_seed = {"dense": {s: 2.0 + n for s, n in seed_noise.items()},
               "fan": {s: 1.99 + n for s, n in seed_noise.items()},
               "cola": {0: 2.1 + seed_noise[0], 1: 2.0 + seed_noise[1]}}
    paired = paired_differences(by_seed)
    assert paired["fan"]["mean"] == pytest.approx(-0.01)
    assert paired["fan"]["sd"] == pytest.approx(0.0, abs=1e-12)  # unpaired sd would be ~0.25
    assert paired["fan"]["n"] == 3
    assert paired["cola"]["diffs"] == pytest.approx({0: 0.1, 1: 0.0})
    assert paired["cola"]["sd"] == pytest.approx(math.sqrt(0.005))
    assert paired["dense"]["mean"] == 0
    arms = {a: {"label": a, "non_embedding_parameters": 1} for a in by_seed}
    finals = {(a, 1e-3, s): v for a, vs in by_seed.items() for s, v in vs.items()}
    summary = summarize(arms, [1e-3], [0, 1, 2], dict.fromkeys(arms, 1e-3), finals, {})
    assert summary["arms"]["cola"]["paired_vs_previous"]["diffs"] == pytest.approx(
        {0: 0.11, 1: 0.01})  # cola - fan, on the seeds both have
    assert summary["arms"]["dense"]["paired_vs_previous"] is None


def test_tokens_to_reach_interpolates_the_first_crossing():
    curve = [(100, 3.0), (200, 2.0), (300, 1.0), (400, 1.5), (500, 0.5)]
    assert tokens_to_reach(curve, 1.5) == pytest.approx(250.0)
    assert tokens_to_reach(curve, 2.0) == pytest.approx(200.0)
    assert tokens_to_reach(curve, 1.0) == pytest.approx(300.0)  # not the later crossing
    assert tokens_to_reach(curve, 5.0) == 100.0  # reached before the first point: a bound
    assert tokens_to_reach(curve, 0.1) is None


def test_summary_on_synthetic_runs():
    """fan reaches every loss of dense in 80% of the tokens (curve = dense's at 1.25x the
    tokens) and ends 0.05 lower, on every seed; the summary must say exactly that."""
    tokens = [1000 * i for i in range(1, 11)]

    def curve(scale, shift):
        return [(t, 3.0 - 0.1 * t * scale / 1000 + shift) for t in tokens]

    finals, curves = {}, {}
    for seed, shift in enumerate([0.0, 0.1, -0.05]):
        for lr, extra in ((1e-3, 0.2), (2e-3, 0.0)):
            curves[("dense", lr, seed)] = curve(1.0, shift + extra)
            curves[("fan", lr, seed)] = curve(1.25, shift + extra)
            finals[("dense", lr, seed)] = 2.0 + shift + extra
            finals[("fan", lr, seed)] = 1.95 + shift + extra
    arms = {a: {"label": a, "non_embedding_parameters": 1} for a in ("dense", "fan")}
    s = summarize(arms, [1e-3, 2e-3], [0, 1, 2], {"dense": 2e-3, "fan": 2e-3}, finals, curves,
                  targets=[2.5, 2.2])
    fan = s["arms"]["fan"]
    assert fan["sweep"] == {1e-3: pytest.approx(2.15), 2e-3: pytest.approx(1.95)}
    assert fan["best_at_edge"]
    assert fan["final_bits_per_byte"]["n"] == 3
    assert fan["paired_vs_baseline"]["mean"] == pytest.approx(-0.05)
    assert fan["paired_vs_baseline"]["sd"] == pytest.approx(0.0, abs=1e-12)
    for row in fan["tokens_to"]:
        assert row["ratio_vs_baseline"]["mean"] == pytest.approx(0.8)
        assert row["reached"] == 3
    assert fan["paired_curve"]["mean"][-1] == pytest.approx(-0.25)  # 0.1 * 10 * (1 - 1.25)
    dense_targets = summarize(arms, [1e-3, 2e-3], [0, 1, 2], {"dense": 2e-3, "fan": 2e-3},
                              finals, curves)["targets"]
    worst = [3.0 - 0.1 * i + 0.1 for i in range(1, 11)]  # dense's worst seed (shift 0.1)
    assert dense_targets == pytest.approx([worst[2], worst[4], worst[9]])


# ---- running: the manifest, skip and resume ----
def study_argv(tokenizer_file: str, out_dir: Path, *extra: str) -> list[str]:
    return [str(FIXTURES / "tiny.txt"), "--out_dir", str(out_dir), "--tokenizer",
            tokenizer_file, "--eval_file", str(FIXTURES / "hf_eval.txt"), "--arms", "dense",
            "--lrs", "0.002", "--seeds", "0", "--d_model", "64", "--n_layers", "2",
            "--n_heads", "4", "--n_kv_heads", "2", "--d_ff", "128", "--seq_len", "32",
            "--batch_size", "2", "--steps", "6", "--warmup_steps", "2", "--eval_every", "2",
            "--eval_tokens", "256", "--save_every", "100", "--precision", "fp32",
            "--jobs", "1", "--threads", "1", "--poll_s", "0.1", *extra]


def test_an_interrupted_study_resumes_to_the_uninterrupted_numbers_and_skips_finished_runs(
        tmp_path, tokenizer_file, monkeypatch, capsys):
    assert study.main(study_argv(tokenizer_file, tmp_path / "straight")) == 0
    split = tmp_path / "split"
    capsys.readouterr()
    assert study.main(study_argv(tokenizer_file, split, "--stop_at_step", "3")) == 0
    out = capsys.readouterr()
    assert "1 run(s) not finished (dense_lr0.002_s0)" in out.out + out.err
    assert "outside this command's" not in out.out + out.err
    manifest = json.loads((split / "manifest.json").read_text())
    (run,) = manifest["runs"].values()
    assert run["status"] == "stopped" and "final" not in run
    assert study.main(study_argv(tokenizer_file, split)) == 0
    manifest = json.loads((split / "manifest.json").read_text())
    (run,) = manifest["runs"].values()
    assert run["status"] == "done" and run["attempts"] == 2 and "--resume" in run["command"]
    a, b = tmp_path / "straight" / "runs" / "dense_lr0.002_s0", split / run["out_dir"]
    assert final_metrics(b) == pytest.approx(final_metrics(a), rel=1e-6)
    assert [t for t, _ in eval_curve(b)] == [128, 256]  # steps 2 and 4 (6 is the final eval)
    assert [v for _, v in eval_curve(b)] == pytest.approx([v for _, v in eval_curve(a)],
                                                          rel=1e-6)
    report = json.loads((split / "report.json").read_text())
    assert report["arms"]["dense"]["final_bits_per_byte"]["mean"] == pytest.approx(
        final_metrics(a)["eval_bits_per_byte"])
    assert (split / "curves.png").stat().st_size > 0

    def no_runs(*args, **kwargs):
        raise AssertionError("a finished run was started again")

    monkeypatch.setattr(subprocess, "Popen", no_runs)
    assert study.main(study_argv(tokenizer_file, split)) == 0
    capsys.readouterr()
    assert study.main(study_argv(tokenizer_file, split, "--steps", "8")) == 2
    assert "other steps" in capsys.readouterr().err
    # a run an earlier invocation planned (here lr 4e-3) and this one does not: named apart
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["runs"]["dense_lr0.004_s0"] = {**run, "lr": 0.004, "status": "stopped",
                                            "out_dir": "runs/dense_lr0.004_s0"}
    (split / "manifest.json").write_text(json.dumps(manifest))
    assert study.main(study_argv(tokenizer_file, split)) == 0
    err = capsys.readouterr().err
    assert "1 earlier run(s) outside this command's --arms / --lrs / --seeds left " \
           "unfinished: dense_lr0.004_s0" in err and "not finished" not in err


def test_an_invocation_for_other_arms_keeps_the_earlier_arms_in_the_report(tmp_path,
                                                                          tokenizer_file):
    """Adding an arm (or rates for some arms) later must not drop the others' rows."""
    out = tmp_path / "study"
    assert study.main(study_argv(tokenizer_file, out)) == 0  # dense
    assert study.main(study_argv(tokenizer_file, out, "--arms", "fan")) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["arms"]) == ["dense", "fan"]
    assert manifest["best_lr"] == {"dense": 0.002, "fan": 0.002}
    report = json.loads((out / "report.json").read_text())["arms"]
    assert set(report) == {"dense", "fan"} and report["dense"]["best_lr"] == 0.002


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tokenizer_file, capsys):
    out = tmp_path / "study"
    argv = study_argv(tokenizer_file, out, "--dry_run", "--arms", "dense", "fan",
                      "--lrs", "1e-3", "2e-3", "--seeds", "0", "1", "2")
    assert study.main(argv) == 0
    text = capsys.readouterr().out
    assert "0 done, 0 to resume, 8 to start (4 of them at a rate the sweep will pick)" in text
    assert "estimated time left" in text and "+ FAN attention" in text
    assert not out.exists()


def test_a_folder_it_did_not_write_is_refused(tmp_path, tokenizer_file, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert study.main(study_argv(tokenizer_file, tmp_path)) == 2
    assert "not written by bench/study.py" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_edge_of_the_sweep_is_judged_on_the_rates_an_arm_ran():
    """A later arm swept at 2e-3..8e-3 (not 1e-3) with its best at 2e-3 is at its own edge,
    and one with its best at 4e-3 is inside, whatever rates the other arms ran."""
    lrs = [1e-3, 2e-3, 4e-3, 8e-3]
    finals = {("dense", lr, 0): v for lr, v in zip(lrs, [2.04, 1.98, 1.95, 1.96])}
    finals.update({("cola", lr, 0): v for lr, v in zip(lrs[1:], [1.90, 1.92, 1.95])})
    finals.update({("gates", lr, 0): v for lr, v in zip(lrs[1:], [1.93, 1.92, 1.95])})
    arms = {a: {"label": a, "non_embedding_parameters": 1} for a in ("dense", "cola", "gates")}
    s = summarize(arms, lrs, [0], {"dense": 4e-3, "cola": 2e-3, "gates": 4e-3}, finals, {})
    assert s["arms"]["cola"]["sweep"][1e-3] is None
    assert s["arms"]["cola"]["best_at_edge"]
    assert not s["arms"]["gates"]["best_at_edge"]
    assert not s["arms"]["dense"]["best_at_edge"]
    assert "| cola | 1 | - | 1.9000 |" in report_markdown(s)
