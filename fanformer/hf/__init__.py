"""The Hugging Face remote code that every checkpoint carries next to its weights.

`configuration_fanformer.py` and `modeling_fanformer.py` in this folder are self-contained
(torch + transformers only, no import of this project): `fanformer.checkpoint.write_config`
copies them into each checkpoint directory, where `AutoModelForCausalLM.from_pretrained(
dir, trust_remote_code=True)` finds them through `config.json`'s `auto_map`. Importing this
package does not import transformers; only the two files do. Their architecture must not
drift from `fanformer/model.py`: tests/test_hf.py compares every module's output.
"""

from __future__ import annotations

from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
REMOTE_CODE_FILES = ("configuration_fanformer.py", "modeling_fanformer.py")
AUTO_MAP = {
    "AutoConfig": "configuration_fanformer.FanformerConfig",
    "AutoModel": "modeling_fanformer.FanformerModel",
    "AutoModelForCausalLM": "modeling_fanformer.FanformerForCausalLM",
}
ARCHITECTURES = ["FanformerForCausalLM"]
