"""Stage II sequences: how text, Ẑ and image codes share one token stream (docs/design.md,
"Sequences").

Layouts (``[Ẑ]`` = h·w positions whose input embeddings are replaced by Ẑ, the aggregated code
embeddings of the frozen tokenizer; ``codes`` = the h·w·D code token ids; labels are -100
except on the underlined parts)::

    understanding   <s> USER: [Ẑ] question ASSISTANT: answer</s> USER: … ASSISTANT: answer</s>
                                                          ‾‾‾‾‾‾‾‾‾‾‾                  ‾‾‾‾‾‾‾‾‾‾‾
    decompression   <s> USER: [Ẑ] ASSISTANT: <img> codes </img></s>
                                                   ‾‾‾‾‾ ‾‾‾‾‾‾‾‾‾‾‾
    text-to-image   <s> caption <img> codes </img></s>      (caption dropped: <s> <img> …)
                                ‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾

Code order: the code grid (gh, gw, G) of the tokenizer flattened row-major — positions in
raster order, and at each position its G codes in depth order (RQ: layer 0 first; HQ: the
top code, then the four bottom codes, each in residual depth order). ``codes_to_ids`` and
``ids_to_codes`` are the two directions of that order.

Depth layout (a depth head decodes each position's G codes, :mod:`.depth`): an image written
by the model is one slot per code position, ``<img> [P] </img>``, the gh·gw slots holding the
aggregated embeddings of the (teacher-forced) codes of the positions; the codes themselves ride
along in ``Sample.codes`` as the depth head's targets. The hidden state at ``<img>`` and at each
slot but the last predicts the next position's codes; the last slot predicts ``</img>``.

A tokenizer the LLM reads through its codes (``reads == "codes"``: SEED-like families) has no
``[Ẑ]``: an image it reads is ``<img> codes </img>`` at the ``<image>`` place, and its codes may
be of variable length (a 1-D layout with a minimum and a maximum): every sequence is built per
sample, with as many code tokens as that image has.

Decompression in segments: with S > 1 segments a sample teaches one segment of the code
sequence (chosen at random), the earlier segments given as unlabelled context, so the mean
sequence is shorter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..tokenizers.base import PAD_CODE, CodeLayout
from .text import IMAGE_TOKEN, IMG_END, IMG_START, marker_ids, pad_id_of, text_ids

IGNORE = -100
USER, ASSISTANT = "USER:", "ASSISTANT:"


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    image_at: int = -1  # index of the first of the image's input slots (Ẑ or code tokens), -1: no image input
    image_len: int = 0  # how many input slots the image has
    codes_at: int = -1  # index of the first code token after <img>, -1: none
    n_codes: int = 0  # how many code tokens follow (fewer than h·w·D in a decompression segment); depth: slots
    codes: torch.Tensor | None = None  # depth layout: the (gh·gw, G) codes the slots after codes_at stand for


class SequenceFormat:
    """Turns conversations, captions and codes into token sequences for one model.

    ``code_layout``: the tokenizer's :class:`~unicodebook.tokenizers.base.CodeLayout`;
    ``num_latents``: the Ẑ slots of an image it reads, or None when it reads the image's codes;
    ``layout``: how images are written (``flat`` or ``depth``)."""

    def __init__(
        self,
        text_tok,
        code_token_ids: torch.Tensor,
        code_layout: CodeLayout,
        num_latents: int | None,
        layout: str = "flat",
    ):
        self.text_tok = text_tok
        ids = marker_ids(text_tok)
        self.image_id, self.start_id, self.end_id = ids[IMAGE_TOKEN], ids[IMG_START], ids[IMG_END]
        self.bos_id = text_tok.bos_token_id
        self.eos_id = text_tok.eos_token_id
        self.pad_id = pad_id_of(text_tok)
        self.code_token_ids = code_token_ids.cpu()
        self.num_latents = num_latents
        self.reads_codes = num_latents is None
        self.code_layout = code_layout
        self.grid_shape = code_layout.grid or (1, code_layout.length, 1)
        self.codes_per_image = code_layout.length  # the most, when variable
        self.layout = layout
        self.positions = code_layout.positions  # depth layout: LLM steps per written image

    # ---------------------------------------------------------------- pieces
    def _bos(self) -> list[int]:
        return [self.bos_id] if self.bos_id is not None else []

    def text(self, s: str) -> list[int]:
        return text_ids(self.text_tok, s)

    def read_length(self, codes: torch.Tensor | None) -> int:
        """Input slots of an image the LLM reads: h·w Ẑ slots, or as many as its codes."""
        if not self.reads_codes:
            return self.num_latents
        if codes is None:
            raise ValueError("this tokenizer is read through its codes: the image's codes are needed")
        return len(self.codes_to_ids(codes))

    def _image_slots(self, codes: torch.Tensor | None) -> tuple[list[int], int]:
        """The ids standing for one read image and the index of its first slot among them:
        h·w ``<image>`` placeholders (Ẑ goes there), or ``<img> code ids </img>``."""
        if not self.reads_codes:
            return [self.image_id] * self.num_latents, 0
        return [self.start_id] + self.codes_to_ids(codes) + [self.end_id], 1

    def _with_images(self, s: str, codes: torch.Tensor | None = None) -> tuple[list[int], int]:
        """Text that may contain one ``<image>``: ids with the image's slots there → (ids, first slot)."""
        if IMAGE_TOKEN not in s:
            return self.text(s), -1
        before, after = s.split(IMAGE_TOKEN, 1)
        if IMAGE_TOKEN in after:
            raise ValueError("one <image> per sample is supported")
        head = self.text(before.strip()) if before.strip() else []
        tail = self.text(after.strip()) if after.strip() else []
        slots, first = self._image_slots(codes)
        return head + slots + tail, len(head) + first

    def codes_to_ids(self, codes: torch.Tensor) -> list[int]:
        """One image's codes (its layout's shape; padding dropped) → their token ids in sequence order."""
        flat = codes.reshape(-1).long()
        return self.code_token_ids[flat[flat != PAD_CODE]].tolist()

    def ids_to_codes(self, code_indices: torch.Tensor) -> torch.Tensor:
        """(B, length) code indices in sequence order (:data:`PAD_CODE` after a shorter image's end)
        → (B, *layout.shape)."""
        return self.code_layout.unflatten(code_indices)

    # ---------------------------------------------------------------- tasks
    def conversation(self, turns: list[dict], codes: torch.Tensor | None = None) -> Sample:
        """LLaVA turns ``[{"from": "human"|"gpt", "value": …}, …]``; loss on the gpt turns only.
        ``codes``: the image's, where the LLM reads them."""
        ids, labels, image_at = self._bos(), [], -1
        labels = [IGNORE] * len(ids)
        for t in turns:
            if t["from"] == "human":
                part, at = self._with_images(f"{USER} {t['value']} {ASSISTANT}", codes)
                if at >= 0:
                    if image_at >= 0:
                        raise ValueError("one <image> per conversation is supported")
                    image_at = len(ids) + at
                ids += part
                labels += [IGNORE] * len(part)
            else:
                part = self.text(t["value"]) + [self.eos_id]
                ids += part
                labels += part
        return Sample(ids, labels, image_at, self.read_length(codes) if image_at >= 0 else 0)

    def prompt(
        self, question: str, with_image: bool = True, codes: torch.Tensor | None = None
    ) -> tuple[list[int], int]:
        """The input of one question: ``<s> USER: [image] question ASSISTANT:`` → (ids, image_at)."""
        body = f"{IMAGE_TOKEN}\n{question}" if with_image else question
        part, at = self._with_images(f"{USER} {body} {ASSISTANT}", codes)
        bos = self._bos()
        return bos + part, (len(bos) + at if at >= 0 else -1)

    def _written(self, prefix: list[int], codes: torch.Tensor, image_at: int = -1) -> Sample:
        """Depth layout: ``prefix <img> [P] </img></s>`` with the codes as the slots' targets."""
        slots = [self.image_id] * self.positions
        ids = prefix + [self.start_id] + slots + [self.end_id, self.eos_id]
        labels = [IGNORE] * len(prefix) + [self.start_id] + [IGNORE] * len(slots) + [self.end_id, self.eos_id]
        return Sample(
            ids,
            labels,
            image_at,
            self.num_latents if image_at >= 0 else 0,
            len(prefix) + 1,
            self.positions,
            codes.reshape(self.positions, self.grid_shape[2]).long(),
        )

    def decompression(self, codes: torch.Tensor, segments: int = 1, segment: int = 0) -> Sample:
        if self.reads_codes:
            raise ValueError("decompression needs an image read as Ẑ: this tokenizer is read through its codes")
        prefix, at = self.prompt("", with_image=True)
        if self.layout == "depth":
            return self._written(prefix, codes, at)
        code_ids = self.codes_to_ids(codes)
        n = len(code_ids)
        bounds = [round(n * i / segments) for i in range(segments + 1)]
        lo, hi = bounds[segment], bounds[segment + 1]
        last = segment == segments - 1
        ids = prefix + [self.start_id] + code_ids[:hi] + ([self.end_id, self.eos_id] if last else [])
        labels = [IGNORE] * len(prefix)
        labels += [self.start_id] if segment == 0 else [IGNORE]
        labels += [IGNORE] * lo + code_ids[lo:hi] + ([self.end_id, self.eos_id] if last else [])
        return Sample(ids, labels, at, self.num_latents, len(prefix) + 1, hi)

    def t2i_prefix(self, caption: str | None) -> list[int]:
        """``<s> caption <img>`` (``caption=None``: the unconditional prefix ``<s> <img>``)."""
        return self._bos() + (self.text(caption) if caption else []) + [self.start_id]

    def text_to_image(self, caption: str | None, codes: torch.Tensor) -> Sample:
        prefix = self.t2i_prefix(caption)
        if self.layout == "depth":
            return self._written(prefix[:-1], codes)
        code_ids = self.codes_to_ids(codes)
        tail = code_ids + [self.end_id, self.eos_id]
        labels = [IGNORE] * (len(prefix) - 1) + [self.start_id] + tail
        return Sample(prefix + tail, labels, codes_at=len(prefix), n_codes=len(code_ids))


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L), right-padded
    labels: torch.Tensor  # (B, L), IGNORE on padding and unlabelled positions
    attention_mask: torch.Tensor  # (B, L)
    image_at: torch.Tensor  # (B,), -1 where no image
    image_len: torch.Tensor  # (B,) input slots of the image read
    codes_at: torch.Tensor  # (B,), -1 where no codes
    n_codes: torch.Tensor  # (B,)
    codes: torch.Tensor | None = None  # depth layout: (R, gh·gw, G) targets of the R rows with codes_at >= 0
    codes_in: torch.Tensor | None = None  # the same codes as fed in (noisy teacher forcing); None: ``codes``


def collate(samples: list[Sample], pad_id: int) -> Batch:
    n = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for i, s in enumerate(samples):
        k = len(s.input_ids)
        ids[i, :k] = torch.tensor(s.input_ids)
        labels[i, :k] = torch.tensor(s.labels)
        mask[i, :k] = 1

    def col(name: str) -> torch.Tensor:
        return torch.tensor([getattr(s, name) for s in samples])

    written = [s.codes for s in samples if s.codes is not None]
    return Batch(
        ids,
        labels,
        mask,
        col("image_at"),
        col("image_len"),
        col("codes_at"),
        col("n_codes"),
        torch.stack(written) if written else None,
    )


def corrupt_codes(batch: Batch, code_token_ids: torch.Tensor, rate: float, generator: torch.Generator) -> Batch:
    """Noisy teacher forcing: each code token fed in (the ``n_codes`` after ``codes_at``) is
    replaced by a uniformly random code id with probability ``rate``; the labels keep the true
    codes, so every target is still the clean sequence (``<img>`` and the text stay clean).
    Depth layout: the written codes (``batch.codes``) are corrupted the same way into ``codes_in``,
    what the LLM reads back; the depth head's prefix within a position stays ``batch.codes``."""
    if rate <= 0:
        return batch
    if batch.codes is not None:
        hit = torch.rand(batch.codes.shape, generator=generator) < rate
        noisy = batch.codes.clone()
        noisy[hit] = torch.randint(len(code_token_ids), (int(hit.sum()),), generator=generator)
        return dataclasses.replace(batch, codes_in=noisy)
    pos = torch.arange(batch.input_ids.shape[1])
    inside = (
        (batch.codes_at[:, None] >= 0)
        & (pos >= batch.codes_at[:, None])
        & (pos < (batch.codes_at + batch.n_codes)[:, None])
    )
    hit = inside & (torch.rand(batch.input_ids.shape, generator=generator) < rate)
    ids = batch.input_ids.clone()
    ids[hit] = code_token_ids[torch.randint(len(code_token_ids), (int(hit.sum()),), generator=generator)]
    return dataclasses.replace(batch, input_ids=ids)
