"""A toy visual-tokenizer family that pins the interface: 1-D, variable length, read through its
codes, with code rows of its own appended to the LLM (SEED- and LaVIT-like, in a dozen lines of
maths instead of a trained network).

An image is cut into a c × c grid of cells; each cell's code is its mean colour, thresholded per
channel (8 codes: black … white). The code sequence is the cells in raster order up to the last
cell that differs from the first one (the background), and at least ``min_length`` codes — so
an image with its objects near the top has fewer codes than one with an object at the bottom.
Decoding paints the cells; it is exact on its own output (encode ∘ decode = identity on codes).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from unicodebook.errors import UnicodebookError
from unicodebook.tokenizers.base import (
    PAD_CODE,
    CodeLayout,
    VisualTokenizer,
    append_code_tokens,
    read_family,
    write_family,
)

FAMILY = "fake-cells"
BITS = torch.tensor([4, 2, 1])  # code = 4·r + 2·g + b


class CellTokenizer(VisualTokenizer):
    """Read through its codes, with code rows of its own (the interface's defaults)."""

    family = FAMILY
    num_codes = 8

    def __init__(self, image_size: int = 32, cells: int = 4, min_length: int = 2):
        super().__init__()
        if image_size % cells:
            raise UnicodebookError(f"{cells} cells do not divide the image size {image_size}")
        self.image_size, self.cells, self.min_length = image_size, cells, min_length
        self.layout = CodeLayout(cells * cells, min_length=min_length)
        self.register_buffer("threshold", torch.tensor(0.5))  # its "weights": what the code cache hashes

    def encode(self, images: Tensor) -> Tensor:
        b, c = images.shape[0], self.cells
        means = images.reshape(b, 3, c, self.image_size // c, c, self.image_size // c).mean((3, 5))
        cell = ((means > self.threshold).long() * BITS[None, :, None, None]).sum(1).reshape(b, c * c)
        differs = cell != cell[:, :1]
        last = torch.where(differs.any(1), c * c - 1 - differs.flip(1).long().argmax(1), torch.zeros_like(cell[:, 0]))
        length = (last + 1).clamp_min(self.min_length)
        return cell.masked_fill(torch.arange(c * c)[None] >= length[:, None], PAD_CODE)

    def decode(self, codes: Tensor) -> Tensor:
        b, c = codes.shape[0], self.cells
        full = torch.where(codes == PAD_CODE, codes[:, :1], codes)  # past the end: the background
        rgb = ((full[..., None] // BITS) % 2).float()  # (B, c·c, 3)
        grid = rgb.reshape(b, c, c, 3).permute(0, 3, 1, 2)
        return grid.repeat_interleave(self.image_size // c, 2).repeat_interleave(self.image_size // c, 3)

    def attach(self, llm, text_tok) -> Tensor:
        return append_code_tokens(llm, text_tok, self.num_codes, prefix="cell")

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_family(folder, FAMILY, image_size=self.image_size, cells=self.cells, min_length=self.min_length)

    save_frozen = save


def load(folder: Path, device="cpu") -> CellTokenizer:
    info = read_family(folder)
    try:
        return CellTokenizer(info["image_size"], info["cells"], info["min_length"]).to(device).eval()
    except KeyError as e:
        raise UnicodebookError(f"{folder}: {FAMILY} tag without {e}") from None


load_frozen = load


def tag(folder: Path) -> dict:
    return json.loads((Path(folder) / "visual_tokenizer.json").read_text())
