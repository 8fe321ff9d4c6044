"""The LLM whose input-embedding table is the unified codebook.

Either the builtin random Llama-style model (the tiny preset sizes it for the embedded default; built with
``transformers``' own ``LlamaForCausalLM``) or any ``AutoModelForCausalLM`` in a local folder.
Nothing here downloads: a name other than ``builtin`` must be an existing folder.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from pathlib import Path

import torch
from torch import nn

from ..config import LLMConfig
from ..errors import UnicodebookError

BUILTIN = "builtin"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quiet_transformers() -> None:
    """Our own bars report progress; transformers' per-shard bars only add noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def build_builtin_llm(cfg: LLMConfig, seed: int = 0):
    """A random Llama (``LlamaForCausalLM``) sized by ``cfg``; deterministic by seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    quiet_transformers()
    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(_DTYPES[cfg.dtype])


def load_llm(cfg: LLMConfig, seed: int = 0, device: str | torch.device | None = None):
    """Build the builtin random model or load a causal LM from a local folder (no hub access)."""
    if cfg.name == BUILTIN:
        model = build_builtin_llm(cfg, seed)
        return model if device is None else model.to(device)
    path = Path(cfg.name)
    if not (path / "config.json").exists():
        raise UnicodebookError(f"LLM '{cfg.name}' is neither 'builtin' nor a local model folder with config.json")
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[cfg.dtype], local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnicodebookError(f"cannot load LLM from {path}: {first}") from None
    return model if device is None else model.to(device)


def enable_checkpointing(llm) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant), cache off."""
    kwargs = {"use_reentrant": False}
    if hasattr(llm, "activation_checkpointing_enable"):  # transformers 5.x; the old name is deprecated there
        llm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    llm.config.use_cache = False


def cache_argument(model) -> str:
    """The keyword a causal LM's ``forward`` takes its KV cache by: ``cache`` in transformers
    releases that renamed it (``past_key_values`` is deprecated there, to be removed in 5.40),
    ``past_key_values`` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_keyword(type(base))


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls: type) -> str:  # looked up once per model class: decoding asks every token
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def kv_cache(output):
    """The KV cache a forward with ``use_cache=True`` returned, under either name."""
    return output["cache"] if "cache" in output else output.past_key_values


def input_embedding(model) -> nn.Embedding:
    emb = model.get_input_embeddings()
    if not isinstance(emb, nn.Embedding):
        raise UnicodebookError(f"{type(model).__name__} has no nn.Embedding input table")
    return emb


def embedding_fingerprint(weight: torch.Tensor, rows: torch.Tensor) -> str:
    """Short hash of the given rows, to tell a codebook's LLM from another model."""
    with torch.no_grad():
        data = weight.detach()[rows.to(weight.device)].float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]
