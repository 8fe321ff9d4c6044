"""Build, save and load a UniCode tokenizer as a self-describing folder.

A tokenizer folder holds:

* ``config.yaml``        — the full run config (model, codebook rule, LLM);
* ``model.safetensors``  — encoder, decoder, projections, the visual codebook and its EMA
                           statistics and the code-index → token-id map;
* ``binding.json``       — which LLM the codebook is bound to and a fingerprint of its rows;
* ``visual_tokenizer.json`` — the family tag (``unicode``), written last;
* ``llm/``               — the builtin LLM (``save_pretrained``), when that is the LLM;
* ``llm_rows.safetensors`` — the rows written into an external LLM (``dual`` mode only).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ...config import CodebookConfig, Config, config_from_dict, read_yaml, save_config
from ...errors import UnicodebookError
from ...lm.llm import BUILTIN, embedding_fingerprint, input_embedding, load_llm, quiet_transformers
from ...quantize import CodebookRule, UnifiedCodebook
from ...utils.io import atomic_dir, atomic_save_tensors, atomic_write_text, first_state_mismatch
from ..base import write_family
from .model import UniCodeTokenizer

BINDING_VERSION = 1


def codebook_rows(cb: CodebookConfig, vocab_size: int) -> torch.Tensor:
    """The LLM token ids exposed as codes, in code-index order."""
    if cb.rows is not None:
        rows = torch.tensor(cb.rows, dtype=torch.long, device="cpu")
    else:
        n = cb.num_rows if cb.num_rows is not None else vocab_size - cb.row_offset
        rows = torch.arange(cb.row_offset, cb.row_offset + n, device="cpu")
    if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= vocab_size:
        raise UnicodebookError(f"codebook rows must lie in [0, {vocab_size}) of the LLM vocabulary")
    return rows


def _rule(cb: CodebookConfig) -> CodebookRule:
    """The update rule alone (a copy, so a tokenizer never aliases a config object)."""
    return CodebookRule(**{k: getattr(cb, k) for k in CodebookRule.__dataclass_fields__})


def build_tokenizer(cfg: Config, llm=None, seed: int = 0) -> UniCodeTokenizer:
    """A fresh tokenizer bound to ``llm`` (built or loaded from ``cfg.llm`` when None)."""
    if llm is None:
        llm = load_llm(cfg.llm, seed=seed)
    emb = input_embedding(llm)
    vocab, dim = emb.weight.shape
    rows = codebook_rows(cfg.model.codebook, vocab)
    codebook = UnifiedCodebook(rows, dim, _rule(cfg.model.codebook)).bind(emb, copy=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        visual_tok = UniCodeTokenizer(cfg.model, codebook)
    visual_tok.__dict__["llm"] = llm  # held by reference, never a submodule of the tokenizer
    visual_tok.__dict__["config"] = cfg
    return visual_tok


def save_tokenizer(visual_tok: UniCodeTokenizer, folder: Path) -> None:
    """Write (or refresh) the tokenizer files in ``folder``; a run folder is a tokenizer folder.

    Each file is written to a temporary name and renamed; ``binding.json`` and the family tag go
    last, so a crash mid-save leaves a folder whose fingerprint check refuses the mismatch.
    """
    cfg: Config = visual_tok.config
    cb = visual_tok.codebook
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(cfg, folder / "config.yaml")
    atomic_save_tensors(
        visual_tok.state_dict(), folder / "model.safetensors", metadata={"format": "unicodebook-tokenizer"}
    )
    if cfg.llm.name == BUILTIN:
        if cb.mode == "dual" or not (folder / "llm" / "config.json").exists():
            with atomic_dir(folder / "llm") as tmp:
                visual_tok.llm.save_pretrained(tmp, safe_serialization=True)
    elif cb.mode == "dual":
        atomic_save_tensors({"rows": cb.language_codebook()}, folder / "llm_rows.safetensors")
    binding = {
        "version": BINDING_VERSION,
        "llm": cfg.llm.name if cfg.llm.name == BUILTIN else str(Path(cfg.llm.name).resolve()),
        "vocab_size": int(cb.llm_embedding.weight.shape[0]),
        "hidden_size": cb.dim,
        "mode": cb.mode,
        "num_codes": cb.num_codes,
        "fingerprint": embedding_fingerprint(cb.llm_embedding.weight, cb.token_ids),
    }
    atomic_write_text(folder / "binding.json", json.dumps(binding, indent=2))
    write_family(folder, UniCodeTokenizer.family)


def save_frozen(visual_tok: UniCodeTokenizer, folder: Path) -> None:
    """The copy a stage II model folder keeps: config and weights (its visual codebook included),
    no LLM — the model folder holds the trained one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(visual_tok.config, folder / "config.yaml")
    atomic_save_tensors(
        visual_tok.state_dict(), folder / "model.safetensors", metadata={"format": "unicodebook-tokenizer"}
    )
    write_family(folder, UniCodeTokenizer.family)


def load_frozen(folder: Path) -> UniCodeTokenizer:
    """A :func:`save_frozen` copy (its codebook unbound: it encodes, embeds and decodes)."""
    folder = Path(folder)
    for name in ("config.yaml", "model.safetensors"):
        if not (folder / name).exists():
            raise UnicodebookError(f"{folder}: not a visual tokenizer copy (missing {name})")
    return tokenizer_from_file(folder / "model.safetensors", config_from_dict(read_yaml(folder / "config.yaml"))).eval()


def _read_binding(folder: Path) -> dict:
    path = folder / "binding.json"
    try:
        binding = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise UnicodebookError(f"{folder}: not a tokenizer folder (missing or unreadable binding.json)") from None
    if binding.get("version") != BINDING_VERSION:
        raise UnicodebookError(f"{folder}: binding.json version {binding.get('version')} is not supported")
    return binding


def tokenizer_from_file(path: Path, cfg: Config) -> UniCodeTokenizer:
    """A tokenizer (codebook unbound) from its safetensors weights; torn or foreign files refused."""
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise UnicodebookError(f"{path} is corrupt or truncated ({e})") from None
    rows, embed = state.get("quantizer.codebook.token_ids"), state.get("quantizer.codebook.embed")
    if rows is None or embed is None:
        raise UnicodebookError(f"{path} is not a UniCode tokenizer checkpoint")
    visual_tok = UniCodeTokenizer(cfg.model, UnifiedCodebook(rows, embed.shape[1], _rule(cfg.model.codebook)))
    bad = first_state_mismatch(visual_tok, state)
    if bad:
        raise UnicodebookError(f"{path} does not match its config (first bad key: {bad})")
    visual_tok.load_state_dict(state)
    visual_tok.__dict__["config"] = cfg
    return visual_tok


def load(folder: Path, device: str | torch.device = "cpu") -> UniCodeTokenizer:
    """The registry's entry (``tokenizers.base.load_tokenizer``)."""
    return load_tokenizer(folder, device)


def load_tokenizer(folder: str | Path, device: str | torch.device = "cpu", llm=None) -> UniCodeTokenizer:
    """Load a tokenizer folder, re-bind it to its LLM and check the binding's fingerprint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnicodebookError(f"tokenizer folder '{folder}' does not exist")
    for name in ("config.yaml", "model.safetensors"):
        if not (folder / name).exists():
            raise UnicodebookError(f"{folder}: not a tokenizer folder (missing {name})")
    binding = _read_binding(folder)
    cfg = config_from_dict(read_yaml(folder / "config.yaml"))
    if llm is None:
        if binding["llm"] == BUILTIN:
            from transformers import AutoModelForCausalLM

            quiet_transformers()
            llm = AutoModelForCausalLM.from_pretrained(folder / "llm", local_files_only=True)
        else:
            cfg.llm.name = binding["llm"]
            llm = load_llm(cfg.llm)
    emb = input_embedding(llm)
    if tuple(emb.weight.shape) != (binding["vocab_size"], binding["hidden_size"]):
        raise UnicodebookError(
            f"{folder}: bound to an LLM with embedding {binding['vocab_size']}×{binding['hidden_size']}, "
            f"got {tuple(emb.weight.shape)[0]}×{tuple(emb.weight.shape)[1]}"
        )
    visual_tok = tokenizer_from_file(folder / "model.safetensors", cfg)
    codebook, rows = visual_tok.codebook, visual_tok.codebook.token_ids
    if binding["mode"] == "dual" and (folder / "llm_rows.safetensors").exists():
        with torch.no_grad():
            emb.weight[rows] = load_file(folder / "llm_rows.safetensors")["rows"].to(emb.weight.dtype)
    fp = embedding_fingerprint(emb.weight, rows)
    if fp != binding["fingerprint"]:
        raise UnicodebookError(
            f"{folder}: the LLM's embedding rows do not match the ones this tokenizer was bound to "
            f"(fingerprint {fp} != {binding['fingerprint']})"
        )
    codebook.bind(emb, copy=False)
    visual_tok.__dict__["llm"] = llm
    visual_tok.__dict__["config"] = cfg
    return visual_tok.to(device).eval()
