"""FanformerForCausalLM: the FANformer of `fanformer/model.py` as a transformers model.

Self-contained (torch + transformers only): this file is copied next to the weights of every
checkpoint and loaded with `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.
It computes what `fanformer.model.FANformer` computes (docs/MODEL.md), with transformers'
conventions around it: a `Cache` (DynamicCache by default) instead of our caller-owned cache,
`attention_mask` and `position_ids`, tied embeddings, and attention through
`ALL_ATTENTION_FUNCTIONS` ("eager", "sdpa", or a backend such as vLLM's) so that
`generate()`, lm-evaluation-harness, PEFT and vLLM's Transformers backend can run it.

Module and parameter names are those of `fanformer.model.FANformer` one for one (`embed`,
`blocks.{i}.attn.qkv.a`, ..., `norm`, `lm_head`), so `model.safetensors` loads with no
renaming; `FanformerForCausalLM` therefore extends `FanformerModel` instead of wrapping it.
tests/test_hf.py checks every module's output against `fanformer/model.py`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_fanformer import FanformerConfig


class CoLALinear(nn.Module):
    """CoLA: y = b(SiLU(a x)), two leaf linears with a nonlinearity between them."""

    def __init__(self, in_features, out_features, rank, bias=False):
        super().__init__()
        self.a = nn.Linear(in_features, rank, bias=False)
        self.b = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.b(F.silu(self.a(x)))


def make_linear(in_features, out_features, rank, bias=False):
    """A CoLA layer when `rank` > 0, else a dense nn.Linear."""
    if rank > 0:
        return CoLALinear(in_features, out_features, rank, bias)
    return nn.Linear(in_features, out_features, bias=bias)


class FANLayer(nn.Module):
    """Fourier features X_F = [cos P | sin P | G] from one linear with a bias."""

    def __init__(self, d_model, p):
        super().__init__()
        self.periodic_dim = int(d_model * p)
        self.linear_dim = d_model - 2 * self.periodic_dim
        self.proj = nn.Linear(d_model, self.periodic_dim + self.linear_dim, bias=True)

    def forward(self, h):
        p, g = self.proj(h).split([self.periodic_dim, self.linear_dim], dim=-1)
        return torch.cat([torch.cos(p), torch.sin(p), g], dim=-1)  # (B, T, d)


class SwiGLU(nn.Module):
    """FFN(u) = down(SiLU(gate(u)) * up(u))."""

    def __init__(self, d_model, d_ff, rank):
        super().__init__()
        self.gate = make_linear(d_model, d_ff, rank)
        self.up = make_linear(d_model, d_ff, rank)
        self.down = make_linear(d_ff, d_model, rank)

    def forward(self, u):
        return self.down(F.silu(self.gate(u)) * self.up(u))


def rope_tables(config, position_ids):
    """fp32 cos/sin (B, T, 1, hd/2) for position_ids (B, T); computed per call, no buffer."""
    hd = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (
        torch.arange(0, hd, 2, dtype=torch.float32, device=position_ids.device) / hd)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)


def apply_rope(x, cos, sin):
    """x (B, T, H, hd) rotated (rotate-half layout) in fp32, returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).type_as(x)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0,
                            **kwargs):
    """Plain softmax attention: q (B, H, T, hd), k/v (B, n_kv, S, hd) -> (B, T, H, hd)."""
    groups = module.num_key_value_groups
    key = key.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, H, T, S)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class FanformerAttention(nn.Module):
    """FAN layer -> CoLA QKV -> per-head RMSNorm on q, k, v -> RoPE -> attention -> CoLA O."""

    def __init__(self, config, layer_idx):
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.num_key_value_groups = c.n_heads // c.n_kv_heads  # read by the attention functions
        self.scaling = c.head_dim ** -0.5
        self.is_causal = True
        self.attention_dropout = c.dropout
        self.fan = FANLayer(c.d_model, c.fan_p) if c.fan_p > 0 else None
        self.qkv = make_linear(c.d_model, c.d_model + 2 * c.n_kv_heads * c.head_dim, c.cola_rank)
        self.o = make_linear(c.d_model, c.d_model, c.cola_rank)
        qkv_norm = c.norm == "hybrid"
        self.q_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps) if qkv_norm else None
        self.k_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps) if qkv_norm else None
        self.v_norm = nn.RMSNorm(c.head_dim, eps=c.norm_eps) if qkv_norm else None

    def forward(self, hidden_states, rope, attention_mask=None, cache=None, **kwargs):
        B, T, _ = hidden_states.shape
        x_f = self.fan(hidden_states) if self.fan is not None else hidden_states  # (B, T, d)
        kv = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x_f).split([self.n_heads * self.head_dim, kv, kv], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, n_kv, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, n_kv, S, hd)
        attention: Callable = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, weights = attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                 dropout=self.attention_dropout if self.training else 0.0,
                                 **kwargs)  # (B, T, H, hd)
        return self.o(out.reshape(B, T, -1)), weights


class FanformerBlock(nn.Module):
    """HybridNorm*: block 0 pre-norms attention and FFN; later blocks feed the raw stream to
    QKV-norm attention and use a post-norm FFN whose residual is Norm(y). `norm="pre"` is the
    dense baseline's pre-norm block."""

    def __init__(self, config, index):
        super().__init__()
        c = config
        self.prenorm_ffn = c.norm == "pre" or index == 0
        self.attn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps) if self.prenorm_ffn else None
        self.attn = FanformerAttention(c, index)
        self.ffn_norm = nn.RMSNorm(c.d_model, eps=c.norm_eps)
        self.ffn = SwiGLU(c.d_model, c.d_ff, c.cola_rank)
        self.drop = nn.Dropout(c.dropout)
        if c.gated_residual:  # per-channel gates, sigmoid(0) = 0.5 at init
            self.attn_gate = nn.Parameter(torch.zeros(c.d_model))
            self.ffn_gate = nn.Parameter(torch.zeros(c.d_model))
        else:
            self.attn_gate = self.ffn_gate = None

    @staticmethod
    def _gated(gate, branch):
        return branch if gate is None else torch.sigmoid(gate).to(branch.dtype) * branch

    def forward(self, x, rope, attention_mask=None, cache=None, **kwargs):
        h = self.attn_norm(x) if self.attn_norm is not None else x
        a, _ = self.attn(h, rope, attention_mask, cache, **kwargs)
        y = x + self._gated(self.attn_gate, self.drop(a))
        n = self.ffn_norm(y)
        residual = y if self.prenorm_ffn else n
        return residual + self._gated(self.ffn_gate, self.drop(self.ffn(n)))


class FanformerPreTrainedModel(PreTrainedModel):
    config_class = FanformerConfig
    base_model_prefix = ""  # no wrapper module: names match fanformer's checkpoints 1:1
    _no_split_modules = ["FanformerBlock"]
    _supports_sdpa = True
    _supports_attention_backend = True  # vLLM's Transformers backend requires this flag

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, FanformerBlock) and module.attn_gate is not None:
            nn.init.zeros_(module.attn_gate)
            nn.init.zeros_(module.ffn_gate)


class FanformerModel(FanformerPreTrainedModel):
    """Embedding -> blocks -> final RMSNorm: the hidden states the LM head reads."""

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(FanformerBlock(config, i) for i in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, past_key_values=None, **kwargs):
        """input_ids (B, T) -> BaseModelOutputWithPast(last_hidden_state (B, T, d), cache)."""
        cache = cache if cache is not None else past_key_values  # the pre-5.2x name
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, d)
        use_cache = getattr(self.config, "use_cache", True) if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + x.shape[1], device=x.device)[None]
        mask = create_causal_mask(config=self.config, inputs_embeds=x,
                                  attention_mask=attention_mask, cache=cache,
                                  position_ids=position_ids)
        rope = rope_tables(self.config, position_ids.expand(x.shape[0], -1))
        for block in self.blocks:
            x = block(x, rope, mask, cache, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x), cache=cache)


class FanformerForCausalLM(FanformerModel, GenerationMixin):
    """FanformerModel + the LM head tied to the embedding; logits are cut to vocab_size."""

    _tied_weights_keys = {"lm_head.weight": "embed.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                past_key_values=None, **kwargs):
        out = super().forward(input_ids, attention_mask, position_ids, cache, inputs_embeds,
                              use_cache, past_key_values, **kwargs)
        hidden = out.last_hidden_state  # (B, T, d)
        if isinstance(logits_to_keep, int):
            hidden = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        else:
            hidden = hidden[:, logits_to_keep]
        logits = self.lm_head(hidden)[..., : self.config.vocab_size]  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels,
                                      vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)
