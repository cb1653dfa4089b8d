"""Single-sequence generation straight on a model (no engine): ``generate`` and ``generate_stream``.

Contract: text (or token ids) in, text out; the prompt is plain text (tokenized without control tokens, with
``<bos>`` first); generation stops at ``max_tokens``, ``<end_of_turn>``/``<eos>``, a stop string, or the model's
context. This is the simple path for scripts and the CLI's ``generate``; many concurrent conversations go through
``Engine`` and ``SessionManager`` instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .errors import ContextLengthError, InvalidRequestError
from .sampling import Sampler, SamplingParams, TextDeltas


def _params(sampling: SamplingParams | None, overrides: dict) -> SamplingParams:
    base = sampling or SamplingParams()
    return base.replace(**{k: v for k, v in overrides.items() if v is not None}) if overrides else base


def generate_tokens(model, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[int]:
    """Yield generated token ids (stop tokens excluded) for one prompt."""
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    ctx = model.config.max_position_embeddings
    if len(prompt_ids) >= ctx:
        raise ContextLengthError(f"prompt has {len(prompt_ids)} tokens; the model's context is {ctx}")
    params.check_vocab(model.config.vocab_size)
    budget = min(params.max_tokens, ctx - len(prompt_ids))
    net, dev = model.net, model.device
    state = net.new_sequence(len(prompt_ids) + budget)
    sampler = Sampler(params)
    stops = frozenset() if params.ignore_eos else model.stop_ids
    ids = torch.as_tensor(list(prompt_ids), dtype=torch.long, device=dev)
    fast_greedy = not params.needs_logits and hasattr(net, "step_greedy")  # the same token, without the logits
    generated: list[int] = []  # what the penalties count
    for _ in range(budget):
        with torch.inference_mode():
            if fast_greedy:
                token = net.step_greedy(ids, state)
            else:
                token = sampler(net.step(ids, state, last_only=True)[0], generated)
        if token in stops:
            return
        generated.append(token)
        yield token
        ids = torch.tensor([token], device=dev)


def generate_stream(model, prompt: str | Sequence[int], sampling: SamplingParams | None = None, *,
                    max_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                    top_p: float | None = None, min_p: float | None = None, seed: int | None = None,
                    stop: Sequence[str] | None = None) -> Iterator[str]:
    """Stream text deltas for a completion of ``prompt`` (see :func:`generate` for the arguments)."""
    params = _params(sampling, dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    min_p=min_p, seed=seed, stop=tuple(stop) if stop is not None else None))
    prompt_ids = model.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
    deltas = TextDeltas(generate_tokens(model, prompt_ids, params), model.tokenizer, params.stop)
    while (delta := deltas.next_delta()) is not None:
        yield delta


def generate(model, prompt: str | Sequence[int], sampling: SamplingParams | None = None, **kwargs) -> str:
    """Complete ``prompt`` with ``model`` and return the text.

    Args:
        model: a loaded :class:`~gemma_sessions.loading.Model`.
        prompt: plain text (``<bos>`` is added; control-token text stays text) or token ids used as they are.
        sampling: a :class:`SamplingParams`; keyword arguments (max_tokens, temperature, top_k, top_p, min_p,
            seed, stop) override its fields.
    Returns:
        the generated text, without the stop token or stop string.
    """
    return "".join(generate_stream(model, prompt, sampling, **kwargs))
