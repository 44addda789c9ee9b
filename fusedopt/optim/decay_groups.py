"""fusedopt.param_groups: param groups that decay weights, not biases and normalization layers.

    opt = fusedopt.FusedAdamW(fusedopt.param_groups(model, weight_decay=0.1), lr=3e-4)
    opt = torch.optim.AdamW(fusedopt.param_groups(model, weight_decay=0.1), lr=3e-4)   # the same groups

The usual recipe (BERT, GPT-2, Hugging Face Trainer, timm, nanoGPT): weight decay on the weights of linear,
convolution and attention layers; none on biases and on the scale / shift of normalization layers (LayerNorm,
BatchNorm, GroupNorm, RMSNorm, ...), whose values decay would pull towards zero for no regularizing benefit;
optionally none on embeddings either.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Union

import torch
from torch import nn

from fusedopt.optim._validation import check_number

__all__ = ["param_groups"]

_NORM_TYPES = tuple(t for t in (
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm1d/2d/3d (and lazy ones)
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None)) if t is not None)
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)


def _is_norm(module: nn.Module) -> bool:
    # torch's normalization layers, and those defined elsewhere by name (transformers' LlamaRMSNorm, T5LayerNorm)
    return isinstance(module, _NORM_TYPES) or "norm" in type(module).__name__.lower()


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, _EMBEDDING_TYPES) or type(module).__name__.endswith("Embedding")


# category -> (module, attribute name, param) -> exempt from weight decay
_CATEGORIES: Dict[str, Callable[[nn.Module, str, torch.Tensor], bool]] = {
    "bias": lambda module, attr, p: attr == "bias",
    "norm": lambda module, attr, p: _is_norm(module),
    "embedding": lambda module, attr, p: _is_embedding(module),
    "1d": lambda module, attr, p: p.dim() <= 1,
}

Rule = Union[str, Callable[[str, torch.Tensor], bool]]


def param_groups(model: nn.Module, weight_decay: float, *, no_decay: Union[Rule, Sequence[Rule]] = ("bias", "norm"),
                 names: bool = True, trainable_only: bool = True) -> List[dict]:
    """Split ``model``'s parameters into a group with ``weight_decay`` and a group without.

    Args:
        model: the ``torch.nn.Module`` whose parameters to group (each parameter once, tied ones included, in
            ``model.named_parameters()`` order).
        weight_decay: the decay of the first group (finite, >= 0); the second group gets 0.
        no_decay: what to exempt, any of:
            ``"bias"`` -- parameters named ``bias`` (of any layer);
            ``"norm"`` -- all parameters of normalization layers: torch's BatchNorm*, InstanceNorm*, LayerNorm,
            GroupNorm, RMSNorm, LocalResponseNorm, and any module whose class name contains "Norm"
            (``LlamaRMSNorm``, ``T5LayerNorm``);
            ``"embedding"`` -- parameters of ``nn.Embedding`` / ``nn.EmbeddingBag`` (and classes named
            ``...Embedding``);
            ``"1d"`` -- every parameter with at most one dimension (timm's and nanoGPT's rule);
            or a callable ``(name, param) -> bool`` (True: no decay). Default ``("bias", "norm")``, the rule of
            Hugging Face's Trainer. A parameter shared by several modules is exempt when any of them exempts it.
        names: give the params as ``(name, param)`` pairs, so that the optimizer records ``param_names`` in its
            ``state_dict()`` (torch.optim >= 2.6 and every fusedopt optimizer take them); False: plain tensors.
        trainable_only: leave out parameters with ``requires_grad=False`` (frozen layers).

    Returns:
        ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``, torch
        param groups (a group with no parameters is left out, as torch.optim refuses an empty named group).
        Every other hyperparameter comes from the optimizer's defaults; add keys to a group to change it.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ValueError: a bad ``weight_decay`` (torch's message) or an
        unknown ``no_decay`` category.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups needs a torch.nn.Module, got {type(model).__name__} (for a list of "
                        f"parameters, build the groups by hand)")
    check_number("weight_decay value", weight_decay, minimum=0.0)
    rules = [no_decay] if isinstance(no_decay, str) or callable(no_decay) else list(no_decay)
    module_rules, name_rules = [], []
    for rule in rules:
        if callable(rule):
            name_rules.append(rule)
        elif rule in _CATEGORIES:
            module_rules.append(_CATEGORIES[rule])
        else:
            raise ValueError(f"no_decay: unknown category {rule!r}; use {', '.join(map(repr, _CATEGORIES))} or a "
                             f"callable (name, param) -> bool")

    exempt = set()
    for module in model.modules():
        for attr, p in module.named_parameters(recurse=False):
            if p is not None and any(rule(module, attr, p) for rule in module_rules):
                exempt.add(id(p))
    decay, no = [], []
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        skip = id(p) in exempt or any(rule(name, p) for rule in name_rules)
        (no if skip else decay).append((name, p) if names else p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
