"""fusedopt.param_groups (issue 11, section 4): decay weights, not biases and normalization layers.

Oracles: Hugging Face Trainer's own choice of decayed parameters (``Trainer.get_decay_parameter_names``) on
small transformers built from configs (no downloads), and timm's / nanoGPT's rule (no decay for parameters of
at most one dimension) on a convolutional net with BatchNorm, where the two rules coincide. Training with the
groups: fusedopt and torch.optim given the same groups end at the same place (rtol 1e-6: float32, a few ulps,
see test_parity).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import fusedopt
from fusedopt import FusedAdamW, FusedLion, FusedSGD


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=16))
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2))


def _names(group):
    return [n for n, _ in group["params"]]


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_same_decayed_parameters_as_hugging_face_trainer(kind):
    model = _tiny(kind)
    decay, no_decay = fusedopt.param_groups(model, weight_decay=0.1)
    hf = transformers.Trainer.get_decay_parameter_names(None, model)  # an instance method that uses no state
    assert _names(decay) == [n for n, _ in model.named_parameters() if n in hf]
    assert set(_names(no_decay)) == {n for n, _ in model.named_parameters()} - set(hf)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False),
                         nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def test_batch_norm_and_biases_as_timms_rule():
    model = _convnet()
    decay, no_decay = fusedopt.param_groups(model, 5e-4, names=False)
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters() if p.dim() <= 1}
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.dim() > 1}
    same = fusedopt.param_groups(model, 5e-4, no_decay="1d", names=False)
    assert [[id(p) for p in g["params"]] for g in same] == [[id(p) for p in g["params"]] for g in (decay, no_decay)]


def test_embeddings_on_request_and_callables():
    model = _tiny("gpt2")  # tied embeddings: wte is also the lm_head weight (listed once)
    names = [n for n, _ in model.named_parameters()]
    default = fusedopt.param_groups(model, 0.1)
    assert "transformer.wte.weight" in _names(default[0])
    with_emb = fusedopt.param_groups(model, 0.1, no_decay=("bias", "norm", "embedding"))
    assert {"transformer.wte.weight", "transformer.wpe.weight"} <= set(_names(with_emb[1]))
    assert sorted(_names(with_emb[0]) + _names(with_emb[1])) == sorted(names)
    custom = fusedopt.param_groups(model, 0.1, no_decay=lambda name, p: name.endswith("c_attn.weight"))
    assert _names(custom[1]) == ["transformer.h.0.attn.c_attn.weight"]


def test_frozen_parameters_and_empty_groups_are_left_out():
    model = _convnet()
    for p in model[1].parameters():
        p.requires_grad_(False)
    groups = fusedopt.param_groups(model, 0.1)
    listed = {id(p) for g in groups for _, p in g["params"]}
    assert not any(id(p) in listed for p in model[1].parameters())
    only_weights = nn.Linear(3, 2, bias=False)
    assert [g["weight_decay"] for g in fusedopt.param_groups(only_weights, 0.1)] == [0.1]


@pytest.mark.parametrize("ours,theirs", [
    (lambda g: FusedAdamW(g, lr=1e-2), lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=False)),
    (lambda g: FusedSGD(g, lr=1e-2, momentum=0.9), lambda g: torch.optim.SGD(g, lr=1e-2, momentum=0.9, foreach=False)),
])
def test_the_groups_train_the_same_in_fusedopt_and_torch(ours, theirs):
    a, b = _tiny("bert").eval(), _tiny("bert").eval()  # eval: no dropout (its random masks would differ)
    opt_a, opt_b = ours(fusedopt.param_groups(a, 0.1)), theirs(fusedopt.param_groups(b, 0.1))
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(5):
        # the grads of model a for both (grads of b would differ in the last bits, which Adam's first steps
        # amplify: it divides a grad by its own magnitude)
        opt_a.zero_grad()
        a(ids).last_hidden_state.pow(2).mean().backward()
        for p, q in zip(a.parameters(), b.parameters()):
            q.grad = None if p.grad is None else p.grad.clone()  # (the pooler gets none)
        opt_a.step()
        opt_b.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert opt_a.state_dict()["param_groups"][1]["param_names"] == opt_b.state_dict()["param_groups"][1]["param_names"]


def test_every_fusedopt_optimizer_takes_them():
    model = _convnet()
    for cls in (FusedAdamW, FusedSGD, FusedLion):
        opt = cls(fusedopt.param_groups(model, 0.1))
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("call,error,match", [
    (lambda: fusedopt.param_groups(list(_convnet().parameters()), 0.1), TypeError, "needs a torch.nn.Module"),
    (lambda: fusedopt.param_groups(_convnet(), -0.1), ValueError, "Invalid weight_decay value: -0.1"),
    (lambda: fusedopt.param_groups(_convnet(), 0.1, no_decay="biases"), ValueError, "unknown category 'biases'"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
