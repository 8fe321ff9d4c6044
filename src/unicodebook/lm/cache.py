"""A KV cache that decoding writes in place.

``transformers``' default ``DynamicLayer`` concatenates each step, copying the whole cache for
every new token. Image decoding runs hundreds of steps: at batch 8 (16 rows with guidance) of
the 100M bench model that copy moves ~400 MB per code token, more than the weights the step
reads. :func:`reserve_cache` swaps each such layer after the prefill for one whose keys and
values are views of buffers with room for the tokens still to come.
"""

from __future__ import annotations

import torch

try:  # transformers ≥ 4.56: caches made of layers
    from transformers.cache_utils import DynamicLayer
except ImportError:  # older releases: left as they are
    DynamicLayer = None


def reserve_cache(cache, extra: int):
    """Give every growing full-attention layer of ``cache`` room for ``extra`` more positions.
    Other layers (sliding windows, custom caches, older releases) are left alone. Returns ``cache``."""
    if DynamicLayer is None:
        return cache
    layers = getattr(cache, "layers", [])
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.get_seq_length() > 0:
            layers[i] = ReservedLayer(layer, extra)
    return cache


if DynamicLayer is not None:

    class ReservedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys and values are the filled part of larger buffers (made
        for our decoding loops, which only append)."""

        def __init__(self, layer, extra: int):
            super().__init__()
            self.device, self.is_initialized = layer.device, True
            b, h, n, _ = layer.keys.shape
            self._k = layer.keys.new_empty(b, h, n + extra, layer.keys.shape[-1])
            self._v = layer.values.new_empty(b, h, n + extra, layer.values.shape[-1])
            self._k[:, :, :n], self._v[:, :, :n] = layer.keys, layer.values
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

        def reserved(self) -> tuple[torch.Tensor, torch.Tensor]:
            """The whole key and value buffers (B, H, filled + room, head_dim); the filled part is
            ``keys`` / ``values``. For decoders that write the next positions themselves."""
            return self._k, self._v

        def update(self, key_states, value_states, *args, **kwargs):
            n, m = self.keys.shape[-2], key_states.shape[-2]
            if n + m > self._k.shape[-2]:  # past the reservation: grow as the default layer does
                self._k = torch.cat([self._k[:, :, :n], key_states], dim=-2)
                self._v = torch.cat([self._v[:, :, :n], value_states], dim=-2)
            else:
                self._k[:, :, n : n + m], self._v[:, :, n : n + m] = key_states, value_states
            self.keys, self.values = self._k[:, :, : n + m], self._v[:, :, : n + m]
            return self.keys, self.values
