"""Token-by-token decoding of a Llama-family LLM on a CPU, one compiled call per layer.

A decoding step of a small model reads its weights once, so it should take about as long as
streaming them from memory. ``transformers``' eager decoder layer spends as much again on its
~80 small ATen ops per layer (RMSNorm, rotary, cache update, attention, residuals): for the
100M-parameter bench model ~10 ms of a ~26 ms step (bench/README.md). :class:`CPUDecoder`
runs the same arithmetic — ``decode_layer`` in ``csrc/decode.c``, whose linear layers are the
streaming kernel of :mod:`.cpu_kernel` — with the model's own weights, rotary tables and the
key/value cache of the prefill, in one call per layer.

It takes over after ``transformers`` has run the prefill (the prompt, the image slots, the
masks: everything model-specific stays there) and is used only where its arithmetic is the
model's: :func:`unsupported` names the reason otherwise, and decoding keeps the ``transformers``
step. Logits can be restricted to a set of rows of the output layer (image generation only
ever reads the code ids' logits), which also skips reading the rest of that layer.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor, nn

from .cpu_kernel import decode_layer_kernel, run_kernel, small_linear_kernel

# decoder layers whose eval-mode arithmetic is decode_layer's: pre-norm RMSNorm, rotate-half
# RoPE, grouped-query attention, SiLU-gated MLP (biases optional throughout)
FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def unsupported(llm: nn.Module, positions: int) -> str | None:
    """Why :class:`CPUDecoder` cannot decode ``llm`` up to ``positions`` positions, or ``None``."""
    name = type(llm).__name__
    if name not in FAMILIES:
        return f"{name} is not one of {', '.join(FAMILIES)}"
    if decode_layer_kernel() is None:
        return "the compiled CPU kernels are not available"
    params = list(llm.parameters())
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return "fp32 weights on the CPU only"
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return "autograd is on (the kernels have no backward)"
    config = llm.config
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) > 1:
        return "only SiLU MLPs without tensor-parallel slicing"
    head = llm.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None:
        return "the output layer is not a plain bias-free nn.Linear"
    for i, layer in enumerate(llm.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        mods = [getattr(attn, n, None) for n in _WEIGHTS[:4]] + [getattr(mlp, n, None) for n in _WEIGHTS[4:]]
        if any(type(m) is not nn.Linear or not m.weight.is_contiguous() for m in mods):
            return f"layer {i}: its projections are not plain contiguous nn.Linear (LoRA, quantized or fused)"
        if any(m.bias is not None and not m.bias.is_contiguous() for m in mods):
            return f"layer {i}: a bias is not contiguous"
        window = getattr(attn, "sliding_window", getattr(config, "sliding_window", None))
        if window is not None and positions > window:
            return f"layer {i}: a sliding window of {window} positions (decoding reaches {positions})"
        if attn.config.num_attention_heads % attn.config.num_key_value_heads:
            heads, kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
            return f"layer {i}: {heads} heads do not group over {kv}"
    return None


class CPUDecoder:
    """Decode from the state a ``transformers`` prefill left: ``cache`` (its key/value cache),
    ``mask`` (B, n) (left padding: each row's ones are a suffix) and ``pos`` (B,) the next
    positions; room for ``extra`` more tokens. ``out_rows``: the output-layer rows whose logits
    :meth:`step` returns (all of them by default); ``hidden``: it returns the last normed hidden
    states instead (the depth layout scores them with its own head). Check :func:`unsupported` first."""

    def __init__(
        self,
        llm: nn.Module,
        cache,
        mask: Tensor,
        pos: Tensor,
        extra: int,
        out_rows: Tensor | None = None,
        hidden: bool = False,
    ):
        self.kernel, self.linear = decode_layer_kernel(), small_linear_kernel()
        cfg = llm.config
        self.layers = llm.model.layers
        self.norm = llm.model.norm
        b, n = mask.shape
        attn = self.layers[0].self_attn
        hd = attn.head_dim
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        width = self.layers[0].mlp.gate_proj.out_features
        total = n + extra
        self.b, self.n, self.total, self.scale = b, n, total, float(attn.scaling)
        self.eps = float(self.layers[0].input_layernorm.variance_epsilon)
        self.dims = torch.tensor([b, cfg.hidden_size, heads, kv_heads, hd, width, total], dtype=torch.long)
        self.start = (n - mask.sum(-1)).to(torch.long).contiguous()
        # the caches: the prefill's keys (rotated) and values, with room for what is to come
        self.k, self.v = map(list, zip(*(_room(cache, i, total) for i in range(len(self.layers)))))
        # the model's own rotary tables for every position still to come: (extra, B, hd) each
        ahead = pos[:, None].cpu() + torch.arange(extra)
        cos, sin = llm.model.rotary_emb(self.k[0], ahead)
        self.cos, self.sin = cos.transpose(0, 1).contiguous(), sin.transpose(0, 1).contiguous()
        self.weights = [_pointers(layer) for layer in self.layers]
        self.scratch = torch.empty(
            b * (2 * cfg.hidden_size + 2 * heads * hd + 2 * kv_heads * hd + 2 * width + heads * total)
        )
        self.head = None if hidden else _rows(llm.get_output_embeddings().weight, out_rows)
        self.t = 0
        self.threads = torch.get_num_threads()

    def step(self, emb: Tensor) -> Tensor:
        """emb (B, 1, d) or (B, d): the new tokens' input embeddings → logits (B, rows) fp32, or
        (made with ``hidden``) the last normed hidden states (B, d)."""
        if self.n + self.t >= self.total:
            raise RuntimeError(f"the decoder was made for {self.total} positions")
        x = emb.reshape(self.b, -1).to(torch.float32, copy=True).contiguous()
        cos, sin, n = self.cos[self.t], self.sin[self.t], self.n + self.t
        for w, k, v in zip(self.weights, self.k, self.v):
            self.kernel(
                x.data_ptr(),
                ctypes.addressof(w),
                k.data_ptr(),
                v.data_ptr(),
                cos.data_ptr(),
                sin.data_ptr(),
                self.start.data_ptr(),
                n,
                self.dims.data_ptr(),
                self.eps,
                self.scale,
                self.scratch.data_ptr(),
                self.threads,
            )
        self.t += 1
        if self.head is None:
            return self.norm(x)
        return run_kernel(self.linear, self.norm(x), self.head, None)


def _room(cache, i: int, total: int) -> tuple[Tensor, Tensor]:
    """Layer ``i``'s key and value buffers (B, KVH, total, hd), positions [0, n) the prefill's:
    the buffers :func:`.cache.reserve_cache` made where they have that shape (no second copy of
    the cache), else new ones."""
    if hasattr(cache, "layers"):  # transformers ≥ 4.56
        layer = cache.layers[i]
        keys, values = layer.keys, layer.values
        if hasattr(layer, "reserved"):
            k, v = layer.reserved()
            if k.shape[-2] == total and k.is_contiguous() and v.is_contiguous():
                return k, v
    else:
        keys, values = cache.key_cache[i], cache.value_cache[i]
    b, kv_heads, n, hd = keys.shape
    k, v = keys.new_empty(b, kv_heads, total, hd), values.new_empty(b, kv_heads, total, hd)
    k[:, :, :n], v[:, :, :n] = keys, values
    return k, v


def _pointers(layer: nn.Module):
    """The 16 addresses ``decode_layer`` reads, in its order (NULL for absent biases)."""
    a, m = layer.self_attn, layer.mlp
    ts = [layer.input_layernorm.weight]
    for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj):
        ts += [lin.weight, lin.bias]
    ts.append(layer.post_attention_layernorm.weight)
    for lin in (m.gate_proj, m.up_proj, m.down_proj):
        ts += [lin.weight, lin.bias]
    return (ctypes.c_void_p * len(ts))(*[None if t is None else t.data_ptr() for t in ts])


def _rows(weight: Tensor, rows: Tensor | None) -> Tensor:
    """``weight[rows]`` without a copy where ``rows`` is a contiguous run (a codebook's rows usually are)."""
    if rows is None:
        return weight.detach()
    rows = rows.cpu()
    lo = int(rows[0])
    if torch.equal(rows, torch.arange(lo, lo + len(rows))):
        return weight.detach()[lo : lo + len(rows)]
    return weight.detach()[rows].contiguous()
