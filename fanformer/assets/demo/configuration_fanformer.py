"""FanformerConfig: the Hugging Face view of a fanformer checkpoint's config.json.

Self-contained (transformers only): this file is copied next to the weights of every
checkpoint and loaded with `trust_remote_code=True`. The field names and meanings are
those of `fanformer.config.ModelConfig`; `attribute_map` gives the names that
transformers, lm-evaluation-harness and vLLM look for (hidden_size, num_hidden_layers, ...)
without storing any fact twice.
"""

from transformers import PretrainedConfig


class FanformerConfig(PretrainedConfig):
    """Shape and switches of one FANformer (or dense pre-norm baseline); see MODEL.md."""

    model_type = "fanformer"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_seq_len",
        "rms_norm_eps": "norm_eps",
    }

    def __init__(self, vocab_size=49152, d_model=768, n_layers=12, n_heads=12, n_kv_heads=6,
                 d_ff=2048, max_seq_len=1024, fan_p=0.15, cola_rank=192, norm="hybrid",
                 gated_residual=True, dropout=0.1, norm_eps=1e-5, rope_theta=10000.0,
                 vocab_multiple=64, tie_word_embeddings=True, bos_token_id=None,
                 eos_token_id=None, pad_token_id=None, **kwargs):
        method = (kwargs.get("quantization_config") or {}).get("quant_method")
        if method in ("int8", "nf4"):  # transformers would skip them and load raw codes
            raise ValueError(
                f"this checkpoint's {method} layers are fanformer's own format, which "
                "transformers cannot load; use fanformer (quant.load_any_checkpoint), or "
                "quantize with --method gptq or awq (docs/QUANTIZATION.md)")
        self.vocab_size = vocab_size  # tokenizer vocabulary; logits are cut to this width
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.d_ff = d_ff
        self.max_seq_len = max_seq_len
        self.fan_p = fan_p  # share of cos/sin channels in the FAN layer; 0 = no FAN layer
        self.cola_rank = cola_rank  # CoLA bottleneck; 0 = dense linears
        self.norm = norm  # "hybrid" (HybridNorm*) or "pre"
        self.gated_residual = gated_residual
        self.dropout = dropout
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.vocab_multiple = vocab_multiple  # embedding rows are vocab_size rounded up to this
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        super().__init__(**kwargs)

    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def padded_vocab_size(self):
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple
