"""Model forwards and the KV cache of Hinted Decoding (`trl_onpolicy.hinted.decoding`).

- `forward_kwargs`, `cache_argument`: what the model's forward accepts, read from the innermost model (a PEFT
  wrapper's forward takes ``**kwargs`` and passes them on, so its own signature says nothing): the last position's
  logits only (``logits_to_keep=1``, never ``[rows, T, V]`` at prefill) and the name of the cache argument;
- `left_pad`, `separate_prefill`: prompts left-padded with a mask; hinted and plain prompts prefilled in two forwards
  and their caches stacked;
- `use_buffered_layers`: a plain `DynamicCache` whose layers keep spare room, so appending a token writes one position
  instead of copying the whole cache.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import torch


def innermost_model(model):
    """The model under PEFT-style wrappers (``get_base_model()``), whose forward declares its real arguments."""
    for _ in range(8):  # a wrapper of a wrapper at most a few levels deep
        get_base = getattr(model, "get_base_model", None)
        inner = get_base() if callable(get_base) else None
        if inner is None or inner is model:
            break
        model = inner
    return model


def forward_params(model) -> dict:
    try:
        return dict(inspect.signature(innermost_model(model).forward).parameters)
    except (TypeError, ValueError):
        return {}


def forward_kwargs(model) -> dict:
    """Ask the model for the last position's logits only, when its (innermost) forward accepts it."""
    params = forward_params(model)
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}
    return {}


def cache_argument(model) -> str:
    """The name under which the model's forward takes the KV cache: ``cache`` (transformers >= 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (older releases, and models that still use it)."""
    return "cache" if "cache" in forward_params(model) else "past_key_values"


def cache_of(out):
    """The KV cache of a forward's output, read without touching the deprecated ``past_key_values`` alias."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def context_window(model) -> int | None:
    """The model's context window (``max_position_embeddings`` of its text config), or None when it declares none."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    size = getattr(config, "max_position_embeddings", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        input_ids[r, width - len(p):] = torch.tensor(p)
        attention[r, width - len(p):] = 1
    return input_ids.to(device), attention.to(device)


def plain_dynamic_cache(cache) -> bool:
    from transformers.cache_utils import DynamicCache, DynamicLayer

    layers = getattr(cache, "layers", None)
    return (type(cache) is DynamicCache and bool(layers)
            and all(type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None for layer in layers))


_BUFFERED_LAYER = None


def _buffered_layer_class():
    """A `DynamicLayer` whose keys and values are views of buffers with spare room: appending a token writes one
    position instead of concatenating (copying) the whole cache, as `DynamicLayer.update` does at every step. The
    buffers double when full, so the copying is amortised O(1) per token; `batch_select_indices` selects rows of
    the buffers. The attention sees the same values as with a plain `DynamicLayer`."""
    global _BUFFERED_LAYER
    if _BUFFERED_LAYER is None:
        from transformers.cache_utils import DynamicLayer

        class BufferedDynamicLayer(DynamicLayer):
            def _set_views(self):
                self.keys = self._key_buffer[..., : self._length, :]
                self.values = self._value_buffer[..., : self._length, :]

            def _reserve(self, capacity: int):
                def grown(buffer):
                    new = buffer.new_empty((*buffer.shape[:-2], capacity, buffer.shape[-1]))
                    new[..., : self._length, :] = buffer[..., : self._length, :]
                    return new

                self._key_buffer, self._value_buffer = grown(self._key_buffer), grown(self._value_buffer)

            def update(self, key_states, value_states, *args, **kwargs):
                n, m = self._length, key_states.shape[-2]
                if n + m > self._key_buffer.shape[-2]:
                    self._reserve(max(n + m, 2 * self._key_buffer.shape[-2]))
                self._key_buffer[..., n : n + m, :] = key_states
                self._value_buffer[..., n : n + m, :] = value_states
                self._length = n + m
                self._set_views()
                return self.keys, self.values

            def batch_select_indices(self, indices):
                self._key_buffer = self._key_buffer.index_select(0, indices)
                self._value_buffer = self._value_buffer.index_select(0, indices)
                self._set_views()

            def crop(self, tokens_to_remove: int) -> None:
                super().crop(tokens_to_remove)
                self._length = self.keys.shape[-2]

        _BUFFERED_LAYER = BufferedDynamicLayer
    return _BUFFERED_LAYER


def use_buffered_layers(cache, room: int) -> None:
    """Turn the layers of a plain `DynamicCache` into `_buffered_layer_class` layers with ``room`` spare positions
    (no-op for any other cache)."""
    if not plain_dynamic_cache(cache):
        return
    cls = _buffered_layer_class()
    for layer in cache.layers:
        keys, values = layer.keys, layer.values
        layer.__class__ = cls
        layer._length = keys.shape[-2]
        layer._key_buffer, layer._value_buffer = keys, values
        layer._reserve(keys.shape[-2] + room)
        layer._set_views()


def separate_prefill(model, hinted, plain, pad_token_id, device, forward_kwargs):
    """Prefill the hinted and the plain prompts in two forwards, each padded only to its own longest prompt, then
    stack the two KV caches (the shorter one left-padded with zeros that the attention mask hides). This avoids
    computing the plain rows' padding up to the (usually much longer) hinted width. Returns ``(None, None)`` when
    the model's cache is not a plain `DynamicCache` (sliding-window, hybrid, ...): the caller then prefills jointly."""
    outs, masks = [], []
    for prompts in (hinted, plain):
        ids, mask = left_pad(prompts, pad_token_id, device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **forward_kwargs)
        if not plain_dynamic_cache(cache_of(out)):
            return None, None
        outs.append(out)
        masks.append(mask)
    width = max(m.shape[1] for m in masks)

    def pad_left(t: torch.Tensor, dim: int) -> torch.Tensor:
        missing = width - t.shape[dim]
        if missing == 0:
            return t
        shape = list(t.shape)
        shape[dim] = missing
        return torch.cat([t.new_zeros(shape), t], dim=dim)

    cache, other = cache_of(outs[0]), cache_of(outs[1])
    for layer, layer_p in zip(cache.layers, other.layers):
        layer.keys = torch.cat([pad_left(layer.keys, -2), pad_left(layer_p.keys, -2)], dim=0)
        layer.values = torch.cat([pad_left(layer.values, -2), pad_left(layer_p.values, -2)], dim=0)
    attention = torch.cat([pad_left(m, 1) for m in masks], dim=0)
    logits = torch.cat([outs[0].logits[:, -1:], outs[1].logits[:, -1:]], dim=0)

    return SimpleNamespace(logits=logits, cache=cache), attention
