"""The visual-tokenizer interface that stage II (``lm/``, ``train/``) depends on, and the
registry of tokenizer families (docs/design.md, "The tokenizer interface"; field by field in
docs/tokenizers.md).

A *family* is one way of turning images into discrete codes (UniCode's codebook of LLM rows,
SEED's causal Q-Former, LaVIT's selected and merged patches, …). Stage II knows a tokenizer only
through :class:`VisualTokenizer`:

* the **layout** of one image's codes (:class:`CodeLayout`): a fixed grid (gh, gw, G), or a 1-D
  sequence of at most ``length`` codes (variable when ``min_length`` < ``length``; a shorter
  image is padded with :data:`PAD_CODE`);
* what the LLM **reads** for an image: ``"latents"`` — continuous input embeddings spliced in at
  ``num_latents`` ``<image>`` slots (UniCode: Ẑ) — or ``"codes"`` — the image's own code tokens
  ``<img> c₁ … cₙ </img>``; a family read through its codes may also offer each code's continuous
  feature before quantisation (``feature_dim`` > 0, ``encode_features``: LaVIT's merged tokens),
  which a model built with ``understanding_input: features`` reads in the codes' places;
* how it **attaches** to an LLM: which token ids stand for its K codes. UniCode binds to rows the
  LLM already has; a family with its own vocabulary appends K rows and tokens and leaves the text
  rows untouched;
* which stage II **tasks** it offers (decompression needs input and output to differ).

A tokenizer folder names its family in ``visual_tokenizer.json``; :func:`load_tokenizer` and
:func:`load_frozen` dispatch on it. A family registers a loader module (or object) with
``load(folder, device)`` for a tokenizer folder and ``load_frozen(folder)`` for the frozen copy
inside a stage II model folder.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnicodebookError

PAD_CODE = -1  # after the last code of a shorter image in a variable-length layout
FAMILY_FILE = "visual_tokenizer.json"
FAMILY_FORMAT = "unicodebook-visual-tokenizer"
READS = ("latents", "codes")


@dataclass(frozen=True)
class CodeLayout:
    """The codes of one image: a fixed grid ``(gh, gw, G)`` in raster order with G codes per
    position, or (``grid`` None) a 1-D sequence of ``min_length``…``length`` codes."""

    length: int  # codes per image (the most, when variable)
    grid: tuple[int, int, int] | None = None
    min_length: int | None = None  # None: always ``length``

    def __post_init__(self):
        if self.length < 1:
            raise ValueError(f"a code layout needs at least one code, got length {self.length}")
        if self.grid is not None and self.grid[0] * self.grid[1] * self.grid[2] != self.length:
            raise ValueError(f"grid {self.grid} does not hold {self.length} codes")
        if self.min_length is not None and not 1 <= self.min_length <= self.length:
            raise ValueError(f"min_length {self.min_length} is not in [1, {self.length}]")
        if self.grid is not None and not self.fixed:
            raise ValueError("a grid layout has a fixed number of codes")

    @property
    def fixed(self) -> bool:
        return self.min_length is None or self.min_length == self.length

    @property
    def shortest(self) -> int:
        return self.length if self.min_length is None else self.min_length

    @property
    def shape(self) -> tuple[int, ...]:
        """One image's codes as ``encode`` returns them: the grid, or ``(length,)``."""
        return self.grid if self.grid is not None else (self.length,)

    @property
    def positions(self) -> int:
        """Code positions: gh·gw for a grid, else ``length``."""
        return self.grid[0] * self.grid[1] if self.grid is not None else self.length

    @property
    def depth(self) -> int:
        """Codes per position (G for a grid, else 1)."""
        return self.grid[2] if self.grid is not None else 1

    def flatten(self, codes: Tensor) -> Tensor:
        """(B, *shape) → (B, length) in sequence order (padding kept)."""
        return codes.reshape(codes.shape[0], self.length)

    def unflatten(self, flat: Tensor) -> Tensor:
        """(B, length) in sequence order → (B, *shape)."""
        return flat.reshape(flat.shape[0], *self.shape)

    def lengths(self, codes: Tensor) -> Tensor:
        """(B, *shape) → (B,) the number of real codes of each image."""
        return (self.flatten(codes) != PAD_CODE).sum(1)


class VisualTokenizer(nn.Module):
    """What stage II asks of a visual tokenizer (frozen during stage II). A family subclasses it.

    ``encode`` returns long codes (B, *layout.shape) in [0, num_codes), :data:`PAD_CODE` after
    the end of a shorter image; ``decode`` takes the same and returns images (B, 3, H, W) in
    [0, 1]; ``embed`` (``reads == "latents"`` only) → (B, num_latents, d). The defaults below
    are those of a family with code rows of its own, read through its codes."""

    family: str = ""
    image_size: int
    layout: CodeLayout
    num_codes: int
    reads: str = "codes"  # "latents" | "codes"
    num_latents: int = 0  # input slots per image when reading latents
    feature_dim: int = 0  # > 0: ``encode_features`` gives each code's continuous feature of this size
    tasks: tuple[str, ...] = ("instruct", "t2i")  # the stage II tasks it offers (also "decompress")
    shares_text_rows: bool = False  # its code ids are rows text also uses (UniCode): answers may use them
    config = None  # the stage I run config (a ``Config``) when the family has one

    def encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def decode(self, codes: Tensor) -> Tensor:
        raise NotImplementedError

    def embed(self, codes: Tensor) -> Tensor:
        raise NotImplementedError(f"the {self.family} tokenizer is read through its codes, not as latents")

    def encode_features(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images → (codes as ``encode`` gives them, features (B, layout.length, feature_dim)):
        each code's continuous feature before quantisation, from the same decisions, zeros after
        a shorter image's end. Only where ``feature_dim`` > 0."""
        raise NotImplementedError(f"the {self.family} tokenizer has no continuous features to read")

    def attach(self, llm, text_tok) -> Tensor:
        """Make ``llm`` and ``text_tok`` able to carry the codes (idempotent) → (K,) token ids.
        By default: K tokens of its own (:func:`append_code_tokens`)."""
        return append_code_tokens(llm, text_tok, self.num_codes)

    def bound_llm(self):
        """The LLM whose rows this tokenizer's codebook is (stage II must train it), or None."""
        return None

    def save_frozen(self, folder: Path) -> None:
        """The copy a stage II model folder keeps: everything to encode, embed and decode."""
        raise NotImplementedError

    def code_layers(self, codes: Tensor) -> tuple[Tensor, list[str]]:
        """codes (B, *layout.shape) → (N, L): one column per group whose usage the health
        figures count, and the groups' names. By default one column of every real code."""
        flat = codes.reshape(-1)
        return flat[flat != PAD_CODE][:, None], ["codes"]

    def encode_settings(self) -> dict:
        """What decides ``encode``'s codes besides the weights (JSON values): the code cache is keyed
        by it too, so a tokenizer set to encode otherwise never reads another's cached codes."""
        return {}

    def health(self) -> dict:
        """Figures of the family's own (``eval tokenizer`` adds them to PSNR, SSIM and usage)."""
        return {}


def odd_size_of(visual_tok: VisualTokenizer) -> str:
    """What to do with an image not at the tokenizer's size: its stage I run's ``data.odd_size``."""
    return visual_tok.config.data.odd_size if visual_tok.config is not None else "resize"


def limits_of(visual_tok: VisualTokenizer) -> dict:
    """``load_image``'s limits from the tokenizer's stage I run (``data.max_image_*``)."""
    from ..data.images import image_limits

    return image_limits(visual_tok.config.data if visual_tok.config is not None else None)


# ---------------------------------------------------------------------------------- registry
_FAMILIES: dict[str, Any] = {
    "unicode": "unicodebook.tokenizers.unicode",
    "seed": "unicodebook.tokenizers.seed",
    "lavit": "unicodebook.tokenizers.lavit",
}


def register_family(name: str, loader) -> None:
    """Register a family: ``loader`` is a module path or an object with ``load(folder, device)``
    and ``load_frozen(folder)``."""
    _FAMILIES[name] = loader


def families() -> list[str]:
    return sorted(_FAMILIES)


def _loader(name: str):
    loader = _FAMILIES.get(name)
    if loader is None:
        raise UnicodebookError(f"visual tokenizer family '{name}' is not known (known: {', '.join(families())})")
    return importlib.import_module(loader) if isinstance(loader, str) else loader


def write_family(folder: Path, family: str, **info) -> None:
    """Tag ``folder`` with its family (written last by a family's save: a torn folder has none)."""
    from ..utils.io import atomic_write_json

    atomic_write_json(Path(folder) / FAMILY_FILE, {"format": FAMILY_FORMAT, "family": family, **info})


def read_family(folder: str | Path) -> dict:
    """The family tag of a tokenizer folder (``{"family": …, …}``); one error line if there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnicodebookError(f"tokenizer folder '{folder}' does not exist")
    path = folder / FAMILY_FILE
    if not path.exists() and (folder / "binding.json").exists():
        return {"format": FAMILY_FORMAT, "family": "unicode"}  # a UniCode folder written before the tag
    try:
        info = json.loads(path.read_text())
    except FileNotFoundError:
        raise UnicodebookError(
            f"{folder}: not a tokenizer folder (no {FAMILY_FILE}: not written, or torn before its save finished)"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise UnicodebookError(f"{folder}: {FAMILY_FILE} is unreadable") from None
    if not isinstance(info, dict) or info.get("format") != FAMILY_FORMAT or not isinstance(info.get("family"), str):
        raise UnicodebookError(f"{folder}: {FAMILY_FILE} is not a {FAMILY_FORMAT} file")
    return info


def load_tokenizer(folder: str | Path, device: str | torch.device = "cpu") -> VisualTokenizer:
    """A tokenizer folder (a stage I run) of any registered family, on ``device``, in eval mode."""
    return _loader(read_family(folder)["family"]).load(Path(folder), device)


def load_frozen(folder: str | Path) -> VisualTokenizer:
    """The frozen tokenizer copy inside a stage II model folder (``folder/visual_tokenizer``)."""
    return _loader(read_family(folder)["family"]).load_frozen(Path(folder))


def append_code_tokens(llm, text_tok, count: int, prefix: str = "img") -> Tensor:
    """Give ``count`` codes their own tokens ``<img_00000>`` … in ``text_tok`` (ids after its last)
    and rows in ``llm`` (it grows when they pass its last row, the new rows starting at the mean
    of the old ones; rows it already has past the text vocabulary are taken as they are). No text
    id and no existing row changes. Idempotent: tokens already there are reused. → their ids."""
    names = [f"<{prefix}_{i:05d}>" for i in range(count)]
    vocab = text_tok.get_vocab()
    missing = [n for n in names if n not in vocab]
    if missing and len(missing) != count:
        raise UnicodebookError(
            f"the text tokenizer holds {count - len(missing)} of the {count} code tokens "
            f"<{prefix}_…>: it was attached to another tokenizer"
        )
    if missing:
        text_tok.add_tokens(missing, special_tokens=True)
    ids = torch.tensor(text_tok.convert_tokens_to_ids(names), dtype=torch.long)
    rows = llm.get_input_embeddings().weight.shape[0]
    if len(text_tok) > rows:
        llm.resize_token_embeddings(len(text_tok), mean_resizing=True)
    return ids
