"""Model invariants: cached decode == full forward (on every device), true GQA,
FAN/HybridNorm/CoLA layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fanformer.config import ModelConfig
from fanformer.layers import CoLALinear, FANLayer
from fanformer.model import ContiguousKVCache
from tests.conftest import make_model

FAMILIES = ["test", "transformer-test", "test-dense-hybrid"]


def _model(family: str):
    if family == "test-dense-hybrid":  # HybridNorm + gates but dense linears and no FAN
        return make_model("test", cola_rank=0, fan_p=0.0)
    return make_model(family)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("prompt_len", [1, 7, 33])
def test_cached_decode_equals_full_forward(family, prompt_len, device):
    model = _model(family).to(device)
    total = prompt_len + 10
    ids = torch.randint(0, model.config.vocab_size, (2, total)).to(device)
    with torch.no_grad():
        full = model(ids)
        cache = ContiguousKVCache(model.config, 2, device=device)
        steps = [model(ids[:, :prompt_len],
                       torch.arange(prompt_len, device=device).expand(2, -1), cache)]
        for t in range(prompt_len, total):
            steps.append(model(ids[:, t:t + 1], torch.full((2, 1), t, device=device), cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_of_different_lengths_in_one_batch(family, device):
    """Right-padded prompts of lengths 3 and 11 decode like each alone."""
    model = _model(family).to(device)
    lengths, new = [3, 11], 6
    seqs = [torch.randint(0, model.config.vocab_size, (n + new,)).to(device) for n in lengths]
    width = max(lengths)
    with torch.no_grad():
        cache = ContiguousKVCache(model.config, 2, device=device)
        padded = torch.stack([F.pad(s[:n], (0, width - n)) for s, n in zip(seqs, lengths)])
        model(padded, torch.arange(width, device=device).expand(2, -1), cache)
        # continue each row from its own length (the padding's cache entries get overwritten)
        batched = []
        pos = torch.tensor(lengths, device=device)
        for step in range(new):
            ids = torch.stack([s[n + step] for s, n in zip(seqs, lengths)])[:, None]
            batched.append(model(ids, (pos + step)[:, None], cache)[:, 0])
        for row, (s, n) in enumerate(zip(seqs, lengths)):
            alone = model(s[None])[0, n:]
            torch.testing.assert_close(torch.stack([b[row] for b in batched]), alone,
                                       atol=1e-5, rtol=1e-4)


def test_grouped_query_attention_matches_repeat_interleave_reference():
    model = make_model("test")
    attn = model.blocks[1].attn
    c = model.config
    h = torch.randn(2, 9, c.d_model)
    positions = torch.arange(9).expand(2, -1)
    with torch.no_grad():
        got = attn(h, positions, model.rope, 1)
        q, k, v = attn.qkv(attn.fan(h)).split([c.d_model, c.kv_dim, c.kv_dim], -1)
        q = attn.q_norm(q.view(2, 9, c.n_heads, c.head_dim))
        k = attn.k_norm(k.view(2, 9, c.n_kv_heads, c.head_dim))
        v = attn.v_norm(v.view(2, 9, c.n_kv_heads, c.head_dim))
        q, k = model.rope(q, positions), model.rope(k, positions)
        group = c.n_heads // c.n_kv_heads
        k = k.repeat_interleave(group, dim=2)  # query head i uses KV head i // group
        v = v.repeat_interleave(group, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / c.head_dim ** 0.5
        scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
        out = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(2, 9, -1)
        want = attn.o(out)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_all_query_heads_are_distinct():
    """The original tiled Q like K/V, leaving 6 distinct heads of 12; ours has 12."""
    model = make_model("fanformer-92m", vocab_size=256, n_layers=1, dropout=0.0)
    attn = model.blocks[0].attn
    h = torch.randn(1, 5, model.config.d_model)
    with torch.no_grad():
        q = attn.qkv(attn.fan(h))[..., : model.config.d_model].view(1, 5, 12, 64)
    for i in range(12):
        for j in range(i + 1, 12):
            assert not torch.allclose(q[:, :, i], q[:, :, j]), (i, j)


def test_fan_layer_layout():
    layer = FANLayer(768, 0.15)
    assert (layer.periodic_dim, layer.linear_dim) == (115, 538)
    assert layer.proj.bias is not None  # the learnable phase
    h = torch.randn(3, 4, 768)
    out = layer(h)
    p, g = layer.proj(h).split([115, 538], -1)
    assert out.shape == (3, 4, 768)
    torch.testing.assert_close(out[..., :115], torch.cos(p))
    torch.testing.assert_close(out[..., 115:230], torch.sin(p))
    torch.testing.assert_close(out[..., 230:], g)


def test_hybridnorm_placement():
    model = make_model("test", n_layers=3)
    first, later = model.blocks[0], model.blocks[1:]
    assert first.attn_norm is not None and first.prenorm_ffn
    assert all(b.attn_norm is None and not b.prenorm_ffn for b in later)
    assert all(b.attn.q_norm is not None and b.attn.v_norm is not None for b in model.blocks)
    # a later block's output is Norm(y) + gate * FFN(Norm(y)), with y = x + gate * Attn(x)
    block = model.blocks[1]
    x = torch.randn(1, 4, model.config.d_model)
    positions = torch.arange(4)[None]
    with torch.no_grad():
        y = x + torch.sigmoid(block.attn_gate) * block.attn(x, positions, model.rope, 1)
        n = block.ffn_norm(y)
        want = n + torch.sigmoid(block.ffn_gate) * block.ffn(n)
        torch.testing.assert_close(block(x, positions, model.rope, 1), want)
    dense = make_model("transformer-test")
    assert all(b.attn_norm is not None and b.prenorm_ffn and b.attn.q_norm is None
               and b.attn.fan is None and b.attn_gate is None for b in dense.blocks)


def test_cola_is_two_leaf_linears_with_silu_between():
    model = make_model("test")
    cola = model.blocks[0].ffn.up
    assert isinstance(cola, CoLALinear)
    assert isinstance(cola.a, nn.Linear) and isinstance(cola.b, nn.Linear)
    assert list(cola.a.children()) == [] and cola.a.out_features == model.config.cola_rank
    x = torch.randn(2, model.config.d_model)
    torch.testing.assert_close(cola(x), cola.b(F.silu(cola.a(x))))
    leaves = {type(m) for m in model.modules() if not list(m.children())}
    assert nn.Linear in leaves and CoLALinear not in leaves


def test_vocab_is_padded_and_logits_are_not():
    model = make_model("test", vocab_size=500)
    assert model.embed.weight.shape[0] == 512
    assert model.lm_head.weight is model.embed.weight
    assert model(torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 500)


def test_dropout_only_in_training():
    model = make_model("test", dropout=0.5)
    ids = torch.randint(0, 512, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids))
        model.train()
        assert not torch.allclose(model(ids), model(ids))


def test_config_errors_list_the_valid_choices():
    with pytest.raises(ValueError, match="valid presets: test, tiny, fanformer-92m"):
        ModelConfig.from_preset("gpt5")
    with pytest.raises(ValueError, match="unknown ModelConfig keys \\['widht'\\].*d_model"):
        ModelConfig.from_preset("test", widht=3)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ModelConfig(d_model=100, n_heads=12)


def test_parameter_count_of_the_original_shape():
    """The number the README states for fanformer-92m with a 49,152-token vocabulary."""
    with torch.device("meta"):
        from fanformer.model import FANformer
        model = FANformer(ModelConfig.from_preset("fanformer-92m"))
    assert model.num_parameters() == 72_117_660


# ---- document-masked packing (fanformer-train --document_mask) ----
def _documents(vocab: int, eos: int, lengths: list[int], seed: int) -> list[torch.Tensor]:
    """Random documents of the given lengths, each ending with EOS (no EOS inside)."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        body = torch.randint(1, vocab, (n - 1,), generator=g)
        body[body == eos] = eos + 1
        docs.append(torch.cat([body, torch.tensor([eos])]))
    return docs


@pytest.mark.parametrize("family", FAMILIES)
def test_document_masked_forward_equals_each_document_alone(family, device):
    """Two packed rows with different splits (the last document of each row is cut by the
    window, as in training): each document's logits equal the document run alone."""
    from fanformer.data import document_positions

    model = _model(family).to(device)
    eos = 3
    rows = [[5, 9, 1, 12, 4], [14, 2, 2, 13]]  # document lengths, EOS included
    packed, alone = [], []
    for r, lengths in enumerate(rows):
        docs = _documents(model.config.vocab_size, eos, lengths, seed=r)
        docs[-1] = docs[-1][:-1]  # the window ends mid-document: no EOS at its end
        packed.append(torch.cat(docs))
        with torch.no_grad():
            alone.append(torch.cat([model(d[None].to(device))[0] for d in docs]))
    ids = torch.stack(packed).to(device)  # (2, 30) and (2, 30): both rows are 30 tokens
    positions = document_positions(ids, eos)
    with torch.no_grad():
        masked = model(ids, positions)  # (2, T, V)
        plain = model(ids)
    torch.testing.assert_close(masked, torch.stack(alone), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(plain, masked, atol=1e-3)  # the mask changed something


@pytest.mark.parametrize("family", FAMILIES)
def test_document_mask_without_eos_is_plain_causal(family, device):
    from fanformer.data import document_positions

    model = _model(family).to(device)
    ids = torch.randint(1, model.config.vocab_size, (2, 40)).to(device)
    positions = document_positions(ids, eos_id=0)
    assert positions.tolist() == [list(range(40))] * 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids, positions), model(ids), atol=1e-5, rtol=1e-4)
