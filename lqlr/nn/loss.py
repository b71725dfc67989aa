"""The next-token loss of a causal LM, with the LM head run a chunk of tokens at a time."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def causal_lm_loss(model: nn.Module, ids: torch.Tensor, chunk: int = 256, reduction: str = "mean",
                   inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy of ``ids`` (b, T): the mean over the b·(T−1) predicted tokens, as
    ``model(input_ids=ids, labels=ids).loss`` (``reduction="sum"``: their sum). ``inputs_embeds``
    (b, T, d) replaces the embedding lookup (gradients then reach the activations without weight
    gradients).

    With ``chunk`` > 0 the LM head and the loss run on ``chunk`` tokens at a time, each recomputed in
    backward, so the (b·T, vocab) logits are never held whole: on a 49k-vocabulary model they are
    most of a backward pass's activation memory. Models whose head does more than a linear map
    (logit soft-capping or scaling) take the stock path.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction={reduction!r}: choose mean or sum")
    split = body_and_head(model)
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": ids}
    target = ids[:, 1:].reshape(-1)
    if chunk <= 0 or split is None:
        if reduction == "mean" and inputs_embeds is None:
            return model(input_ids=ids, labels=ids, use_cache=False).loss
        logits = model(**inputs, use_cache=False).logits[:, :-1].float()
        total = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target, reduction="sum")
        return total if reduction == "sum" else total / target.numel()
    body, head = split
    hidden = body(**inputs, use_cache=False).last_hidden_state[:, :-1].reshape(-1, head.in_features)

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # summed cross-entropy of one chunk
        return nn.functional.cross_entropy(head(h).float(), y, reduction="sum")

    total = sum(checkpoint(piece, h, y, use_reentrant=False) for h, y in zip(hidden.split(chunk), target.split(chunk)))
    return total if reduction == "sum" else total / target.numel()


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder body returning ``last_hidden_state``, LM head) of a causal LM whose logits are just
    head(hidden); None when the head does more (logit soft-capping or scaling) or cannot be found."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    conf = getattr(base, "config", None)
    plain_head = not any(getattr(conf, k, None) for k in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
    return (body, head) if body is not None and head is not None and plain_head else None


def chunked_log_probs(model: nn.Module, ids: torch.Tensor, chunk: int = 256):
    """log-softmax next-token distributions of ``ids`` (b, T), yielded ``chunk`` positions at a time as
    (start, (b, c, vocab) float32): the whole (b, T, vocab) tensor is never held (the model's own full
    forward when its head is not a plain linear map, see :func:`body_and_head`)."""
    split = body_and_head(model)
    if split is None:
        logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
        for i in range(0, ids.shape[1], chunk):
            yield i, logp[:, i : i + chunk]
        return
    body, head = split
    hidden = body(input_ids=ids, use_cache=False).last_hidden_state  # (b, T, d)
    for i in range(0, ids.shape[1], chunk):
        yield i, torch.log_softmax(head(hidden[:, i : i + chunk]).float(), -1)
