"""LoRA through peft: which weights train, merging, one shared base for several roles, official checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from anyflow.models import FlowMapWanTransformer3DModel
from anyflow.models.lora import (AdapterRole, LoraSpec, add_adapter, merge_lora_state, merged_state, named_trainable,
                                 official_state_dict)

STUDENT = LoraSpec(4, 8.0, ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj",
                            "ffn.net.2", "time_embedder", "delta_embedder"))
SCORE = LoraSpec(2, 2.0, ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"))


def _model(tiny_kwargs, seed=0):
    torch.manual_seed(seed)
    return FlowMapWanTransformer3DModel(**tiny_kwargs)


def _inputs(tiny_kwargs, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 2, 4, 4, generator=g)
    e = torch.randn(2, 5, tiny_kwargs["text_dim"], generator=g)
    return x, torch.tensor([700.0, 300.0]), torch.tensor([200.0, 0.0]), e


def _randomise(model, adapter, seed):
    """Give adapter ``adapter`` non-zero B (a fresh one is the identity), deterministically."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".lora_B.{adapter}." in name or f".lora_A.{adapter}." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _out(model, x, t, r, e):
    return model(x, t, r, e, return_dict=False)[0]


def test_only_the_adapter_gets_gradients(tiny_kwargs):
    model = add_adapter(_model(tiny_kwargs), "student", STUDENT)
    _randomise(model, "student", 0)
    x, t, r, e = _inputs(tiny_kwargs)
    _out(model, x, t, r, e).square().mean().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in named_trainable(model)}
    assert trained and all(".lora_A.student." in n or ".lora_B.student." in n for n in trained)
    # every configured layer has an adapter, the embedders included; nothing else does
    layers = {n.rsplit(".lora_", 1)[0] for n in trained}
    assert "condition_embedder.time_embedder.linear_1" in layers and "condition_embedder.delta_embedder.linear_2" in layers
    assert "blocks.0.attn1.to_out.0" in layers and "blocks.1.ffn.net.2" in layers
    assert not any("attn2" in n or "time_proj" in n or "proj_out" in n for n in layers)
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_merged_weights_equal_the_unmerged_network_and_peft(tiny_kwargs):
    model = add_adapter(_model(tiny_kwargs), "student", STUDENT)
    _randomise(model, "student", 3)
    x, t, r, e = _inputs(tiny_kwargs)
    plain = _model(tiny_kwargs, seed=5)  # other random weights: all must be overwritten
    plain.load_state_dict(merged_state(model.state_dict(), "student", STUDENT), strict=True)
    with torch.no_grad():
        reference = _out(model, x, t, r, e)
        torch.testing.assert_close(_out(plain, x, t, r, e), reference, rtol=0, atol=2e-6)
        # peft's own merge agrees with the state-dict merge (α/r = 8/4 = 2)
        wrapped = get_peft_model(_model(tiny_kwargs), LoraConfig(r=4, lora_alpha=8.0, target_modules=sorted(
            {n.rsplit(".lora_", 1)[0] for n, _ in named_trainable(model)})), adapter_name="student")
        wrapped.base_model.model.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(_out(wrapped.merge_and_unload(), x, t, r, e), reference, rtol=0, atol=2e-6)


def test_merge_by_hand():
    state = {"l.base_layer.weight": torch.eye(2), "l.base_layer.bias": torch.zeros(2),
             "l.lora_A.s.weight": torch.tensor([[1.0, 2.0]]), "l.lora_B.s.weight": torch.tensor([[3.0], [4.0]]),
             "l.lora_A.other.weight": torch.ones(1, 2), "l.lora_B.other.weight": torch.ones(2, 1)}
    merged = merge_lora_state(state, "s", alpha=2.0)  # α/r = 2: W + 2·B·A = I + 2·[[3, 6], [4, 8]]
    assert set(merged) == {"l.weight", "l.bias"}
    assert torch.equal(merged["l.weight"], torch.tensor([[7.0, 12.0], [8.0, 17.0]]))


def test_shared_base_roles_equal_separate_networks_exactly(tiny_kwargs):
    base = _model(tiny_kwargs)
    separate = {name: copy.deepcopy(base) for name in ("student", "teacher", "fake_score")}
    add_adapter(base, "student", STUDENT)
    add_adapter(base, "teacher", SCORE)
    add_adapter(base, "fake_score", SCORE)
    for i, name in enumerate(("student", "teacher", "fake_score")):
        _randomise(base, name, 10 + i)
        add_adapter(separate[name], name, STUDENT if name == "student" else SCORE)
        _randomise(separate[name], name, 10 + i)
    roles = {name: AdapterRole(base, name) for name in separate}
    x, t, r, e = _inputs(tiny_kwargs)
    with torch.no_grad():
        for name in separate:
            tt, rr = (t, r) if name == "student" else (t, t)
            assert torch.equal(_out(roles[name], x, tt, rr, e), _out(separate[name], x, tt, rr, e)), name
        bare = AdapterRole(base, None)  # adapters off: the base itself
        assert torch.equal(_out(bare, x, t, t, e), _out(_model(tiny_kwargs), x, t, t, e))
    # a role trains its adapter only, and switching roles leaves every requires_grad flag as it was
    flags = {n: p.requires_grad for n, p in base.named_parameters()}
    _out(roles["fake_score"], x, t, t, e).square().mean().backward()
    assert {n for n, p in base.named_parameters() if p.grad is not None} == {n for n, _ in roles["fake_score"].named_trainable()}
    assert flags == {n: p.requires_grad for n, p in base.named_parameters()}
    assert {n for n, _ in roles["student"].named_trainable()}.isdisjoint(n for n, _ in roles["teacher"].named_trainable())


def test_shared_base_saves_two_bases_of_parameter_bytes(tiny_kwargs):
    def nbytes(*modules):
        seen = {id(p): p for m in modules for p in m.parameters()}
        return sum(p.numel() * p.element_size() for p in seen.values())

    base = _model(tiny_kwargs)
    separate = [add_adapter(copy.deepcopy(base), n, s) for n, s in
                (("student", STUDENT), ("teacher", SCORE), ("fake_score", SCORE))]
    for name, spec in (("student", STUDENT), ("teacher", SCORE), ("fake_score", SCORE)):
        add_adapter(base, name, spec)
    plain = nbytes(_model(tiny_kwargs))
    saved = nbytes(*separate) - nbytes(base)
    print(f"\n[lora] tiny model: base {plain} B; three networks {nbytes(*separate)} B, one shared base "
          f"{nbytes(base)} B; saved {saved} B = {saved / plain:.2f} bases")
    assert saved == 2 * plain  # the adapters are the same either way; two copies of the base are gone


def test_official_checkpoint_state_dict(tiny_kwargs):
    """An official training checkpoint: ``ema`` → peft-wrapped state dict, adapter ``real``, rank = α."""
    model = _model(tiny_kwargs)
    names = sorted({n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "attn1" in n})
    wrapped = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=names), adapter_name="real")
    _randomise(wrapped, "real", 7)
    x, t, r, e = _inputs(tiny_kwargs)
    with torch.no_grad():
        reference = _out(wrapped, x, t, r, e)
    state = official_state_dict({"ema": wrapped.state_dict(), "step": 100})
    assert not any("lora" in k or k.startswith("base_model.") for k in state)
    plain = _model(tiny_kwargs, seed=9)
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_out(plain, x, t, r, e), reference, rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="has no 'ema' entry"):
        official_state_dict({"model_state": 1})


def test_bad_lora_spec_is_one_sentence():
    with pytest.raises(ValueError, match="rank must be ≥ 1"):
        LoraSpec.from_config({"rank": 0, "alpha": 1, "targets": ["attn1.to_q"]})
    with pytest.raises(ValueError, match="no linear layer of the network matches"):
        LoraSpec(2, 2.0, ("attn9",)).peft_config(torch.nn.Sequential(torch.nn.Linear(2, 2)))
