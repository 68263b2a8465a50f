"""Our checkpoints in the Hugging Face ecosystem: transformers, lm-evaluation-harness, PEFT.

The remote code (fanformer/hf/modeling_fanformer.py) is checked module by module against
fanformer/model.py, and the demo is loaded in an interpreter that cannot import this
project, as a user with only torch + transformers + safetensors would load it.
"""

from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from fanformer import hf
from fanformer.checkpoint import DEMO_CHECKPOINT, load_checkpoint, save_checkpoint
from fanformer.data import bits_per_byte
from fanformer.export import main as export_main
from fanformer.generate import generate
from fanformer.tokenizer import EOS_TOKEN
from tests.conftest import FIXTURES, make_model

transformers = pytest.importorskip("transformers")

EVAL_TEXT = FIXTURES / "hf_eval.txt"  # 640 demo tokens: five 128-token windows exactly
WINDOW = 128


def hf_load(directory: Path, attn: str = "sdpa"):
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, trust_remote_code=True, dtype=torch.float32, attn_implementation=attn).eval()


@pytest.mark.parametrize("preset, overrides", [
    ("test", {}),  # HybridNorm*, FAN, CoLA, gates
    ("test", {"cola_rank": 0}),  # HybridNorm*, FAN, gates, full-rank linears
    ("transformer-test", {}),  # pre-norm, dense, no FAN, no gates
    ("test", {"fan_p": 0.0, "cola_rank": 0, "vocab_size": 500}),  # padded vocab
])
def test_every_module_matches_fanformer(tmp_path, tokenizer, preset, overrides):
    """Same parameter names, and every module with the same name gives the same output."""
    ours = make_model(preset, seed=3, **overrides)
    theirs = hf_load(save_checkpoint(tmp_path / "ckpt", ours, tokenizer))
    assert set(theirs.state_dict()) == set(ours.state_dict())
    outputs: dict[str, dict[str, torch.Tensor]] = {"ours": {}, "theirs": {}}

    def record(key, name):
        def hook(_module, _inputs, out):  # returns None: the output is left as it is
            outputs[key][name] = out[0] if isinstance(out, tuple) else out
        return hook

    for key, model in (("ours", ours), ("theirs", theirs)):
        for name, module in model.named_modules():
            module.register_forward_hook(record(key, name))
    ids = torch.randint(0, ours.config.vocab_size, (2, 33))
    with torch.no_grad():
        logits = ours(ids)
        assert torch.allclose(theirs(ids).logits, logits, atol=1e-5, rtol=0)
    ours_names = {name for name in outputs["ours"] if name and name != "rope"}
    assert ours_names <= set(outputs["theirs"]), "module names drifted from fanformer/model.py"
    for name in ours_names:
        torch.testing.assert_close(outputs["theirs"][name], outputs["ours"][name],
                                   atol=1e-5, rtol=0, msg=name)


def test_int8_and_nf4_checkpoints_refuse_to_load_in_transformers():
    """transformers skips an unknown quant_method and would load raw codes as weights."""
    from fanformer.hf.configuration_fanformer import FanformerConfig

    assert FanformerConfig(quantization_config={"quant_method": "gptq"}).n_layers == 12
    for method in ("int8", "nf4"):
        with pytest.raises(ValueError, match=f"{method} layers are fanformer's own format"):
            FanformerConfig(quantization_config={"quant_method": method})


def test_the_shipped_remote_code_is_the_package_source():
    for name in hf.REMOTE_CODE_FILES:
        assert filecmp.cmp(hf.SOURCE_DIR / name, DEMO_CHECKPOINT / name, shallow=False), name


# ---------------------------------------------------------------- a clean interpreter
CLEAN_SCRIPT = r'''
import importlib.util, json, sys
sys.path.append(sys.argv[1])  # site-packages only: -S skipped the editable install's hook
for package in ("fanformer", "quant", "server"):
    assert importlib.util.find_spec(package) is None, package
import torch
from transformers import AutoModelForCausalLM
job = json.load(open(sys.argv[2]))
out = {}
for attn in ("sdpa", "eager"):
    model = AutoModelForCausalLM.from_pretrained(
        job["dir"], trust_remote_code=True, dtype=torch.float32, attn_implementation=attn).eval()
    with torch.no_grad():
        out[attn] = model(torch.tensor([job["ids"]])).logits[0].tolist()
    prompt = torch.tensor([job["prompt"]])
    for cache in (True, False):
        tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                do_sample=False, max_new_tokens=job["new"], use_cache=cache)
        out[f"{attn}-cache={cache}"] = tokens[0, prompt.shape[1]:].tolist()
json.dump(out, open(sys.argv[3], "w"))
'''


def run_clean(script: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`script` in `python -I -S` (no PYTHON* variables, no user site, no .pth hooks) with
    only site-packages on sys.path, from an empty directory, with an offline HF home."""
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    (tmp_path / "script.py").write_text(script)
    work = tmp_path / "cwd"
    work.mkdir()
    return subprocess.run(
        [sys.executable, "-I", "-S", str(tmp_path / "script.py"),
         sysconfig.get_paths()["purelib"], *args],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)


def test_demo_loads_in_transformers_without_our_code(tmp_path):
    demo = shutil.copytree(DEMO_CHECKPOINT, tmp_path / "demo")
    model, tokenizer = load_checkpoint(demo, dtype=torch.float32)
    ids = tokenizer.encode(EVAL_TEXT.read_text())[:200]
    prompt, new = ids[:12], 16
    job = {"dir": str(demo), "ids": ids, "prompt": prompt, "new": new}
    (tmp_path / "job.json").write_text(json.dumps(job))
    result = run_clean(CLEAN_SCRIPT, tmp_path, str(tmp_path / "job.json"),
                       str(tmp_path / "out.json"))
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0]
    sdpa, eager = torch.tensor(out["sdpa"]), torch.tensor(out["eager"])
    assert (sdpa - ours).abs().max() < 1e-5
    # eager (matmul, softmax) sums in another order than SDPA: 1.3e-5 measured on logits of
    # magnitude ~10, i.e. fp32 rounding; the greedy tokens below must still agree exactly
    assert (eager - sdpa).abs().max() < 5e-5
    reference = generate(model, prompt, new, temperature=0.0)  # no EOS stop on either side
    for key in ("sdpa-cache=True", "sdpa-cache=False", "eager-cache=True", "eager-cache=False"):
        assert out[key] == reference, key


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tmp_path):
    model = hf_load(DEMO_CHECKPOINT)
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_CHECKPOINT, padding_side="left")
    prompts = ["Holmes said", "It was a dark and stormy night, and"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    together = model.generate(**batch, do_sample=False, max_new_tokens=8)[:, -8:]
    for row, text in enumerate(prompts):
        alone = model.generate(**tokenizer([text], return_tensors="pt"), do_sample=False,
                               max_new_tokens=8)[0, -8:]
        assert together[row].tolist() == alone.tolist()


# ---------------------------------------------------------------- old checkpoints, export
def test_old_format_loads_and_exports_to_the_shipped_demo(tmp_path, capsys):
    """A format-1 demo (nested "model" config, no remote code) still loads, and
    fanformer-export turns it into exactly what ships, with bit-identical weights."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO_CHECKPOINT / name, old / name)
    shutil.copyfile(FIXTURES / "demo_config_v1.json", old / "config.json")
    ids = torch.randint(0, 8192, (1, 20))
    assert torch.equal(load_checkpoint(old)[0](ids), load_checkpoint(DEMO_CHECKPOINT)[0](ids))

    assert export_main(["--checkpoint", str(old), "--output", str(tmp_path / "new")]) == 0
    new = tmp_path / "new"
    assert sorted(p.name for p in new.iterdir()) == sorted(
        p.name for p in DEMO_CHECKPOINT.iterdir() if p.is_file())
    for file in new.iterdir():
        assert filecmp.cmp(file, DEMO_CHECKPOINT / file.name, shallow=False), file.name

    assert export_main(["--checkpoint", str(old), "--output", str(new)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1


# ---------------------------------------------------------------- PEFT
def test_peft_lora_on_the_attention_projections_learns(tmp_path):
    peft = pytest.importorskip("peft")
    model = hf_load(DEMO_CHECKPOINT)
    # every projection is a leaf nn.Linear: a CoLA layer's two factors, or the layer itself
    targets = ["qkv.a", "qkv.b", "o.a", "o.b"] if model.config.cola_rank else ["qkv", "o"]
    config = peft.LoraConfig(r=4, target_modules=targets)
    model = peft.get_peft_model(model, config)
    ids = torch.tensor([load_checkpoint(DEMO_CHECKPOINT)[1].encode(EVAL_TEXT.read_text())[:64]])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- lm-evaluation-harness
LM_EVAL_SCRIPT = r'''
import json, sys
sys.path.append(sys.argv[1])
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
job = json.load(open(sys.argv[2]))
manager = TaskManager(include_path=job["tasks"])
out = {}
for name, (model, args) in job["runs"].items():
    result = simple_evaluate(model=model, model_args=args, tasks=["fanformer_hf_eval"],
                             task_manager=manager, batch_size=1, device="cpu")
    out[name] = result["results"]["fanformer_hf_eval"]["bits_per_byte,none"]
json.dump(out, open(sys.argv[3], "w"))
'''

TASK_YAML = """task: fanformer_hf_eval
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""


def test_lm_eval_bits_per_byte_equals_ours_through_transformers_and_our_server(tmp_path):
    """`--model hf` and `--model local-completions` (our server, echo + logprobs) score the
    shipped text like fanformer.data.bits_per_byte. lm-eval predicts the first token after
    EOS (its prefix token), so ours scores EOS + text; both roll in 128-token windows (the
    API backend subtracts 2 from max_length: 1 for the reply, 1 for the context token)."""
    pytest.importorskip("lm_eval")
    from tests.test_api import spawn_server, wait_healthy

    text = EVAL_TEXT.read_text()
    model, tokenizer = load_checkpoint(DEMO_CHECKPOINT, dtype=torch.float32)
    assert len(tokenizer.encode(text)) % WINDOW == 0  # no partial window (see docs/HF.md)
    ours = bits_per_byte(model, tokenizer, EOS_TOKEN + text, seq_len=WINDOW)["bits_per_byte"]

    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "task.yaml").write_text(TASK_YAML.format(data=tmp_path / "doc.jsonl"))
    proc, url = spawn_server(DEMO_CHECKPOINT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_healthy(proc, url)
        runs = {
            "hf": ("hf", f"pretrained={DEMO_CHECKPOINT},trust_remote_code=True,"
                         f"dtype=float32,max_length={WINDOW}"),
            "server": ("local-completions",
                       f"model=demo,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                       f"tokenizer={DEMO_CHECKPOINT},max_length={WINDOW + 2},max_retries=1"),
        }
        job = tmp_path / "job.json"
        job.write_text(json.dumps({"tasks": str(tmp_path / "tasks"), "runs": runs}))
        result = run_clean(LM_EVAL_SCRIPT, tmp_path, str(job), str(tmp_path / "out.json"))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "out.json").read_text())
    assert abs(scores["hf"] - ours) < 1e-3, (scores, ours)
    assert abs(scores["server"] - ours) < 1e-3, (scores, ours)
