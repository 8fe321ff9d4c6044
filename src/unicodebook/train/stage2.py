"""Stage II recipe: teach the LLM to read and write images through a frozen visual tokenizer.

The tokenizer is any registered family (``tokenizers.base``), known here only through its
interface: stage II owns the LLM — UniCode's is the one its codebook is bound to, another family
attaches its code rows to the configured one — and trains the tasks the family offers.

``Stage2Recipe`` is the run in parts: its construction is the setup (run folder, text tokenizer
with the image markers, LLM — full or LoRA —, records, cached codes, optimizer); ``batch`` and
``train_step`` are one step (one task per step, drawn by ``train_lm.tasks`` weights);
``checkpoint`` writes an atomic checkpoint; ``run`` loops (tqdm, metrics.jsonl, TensorBoard,
sample grids) and saves the model folder. ``train_lm`` is ``Stage2Recipe(...).run()``.

A run may be a curriculum: ``train_lm.phases`` lists consecutive phases, each with its own task
weights, learning-rate schedule, code noise and caption dropout (the run's values where a phase
says nothing); the phase of a step is a function of the step.

Everything random is a function of (seed, step): the task of a step, the batch of that task,
caption dropout and decompression segments — so ``--resume`` continues the same run exactly,
from any step of any phase.
The tokenizer's encoder, decoder and visual codebook stay frozen.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import Config, LMTrainConfig, load_config, save_config
from ..data.images import image_limits, split_folder
from ..data.multimodal import cached_codes, read_records
from ..data.sources import ShardRecords, is_shard_spec
from ..errors import UnicodebookError
from ..lm.llm import BUILTIN, enable_checkpointing, load_llm
from ..lm.model import UniCodeLM, load_model, save_model
from ..lm.sequence import ASSISTANT, USER, collate, corrupt_codes
from ..lm.text import IMAGE_TOKEN, ensure_markers, load_text_tokenizer, train_word_tokenizer
from ..tokenizers.base import load_tokenizer
from .checkpoint import check_resume, load_checkpoint, run_lock, write_errors
from .engine import Engine, NonFiniteError, NonFiniteGuard, StopOnSigterm, param_names, save_training_checkpoint
from .optim import build_optimizer
from .runlog import RunLog
from .stage1 import lr_at

TASKS = ("decompress", "instruct", "t2i")


@dataclass
class Stage2Result:
    run: Path
    steps: int
    final: dict
    seconds: float
    main: bool = True  # the main process of the run (the one that reports)


class Phases:
    """The phase settings of each step of a run (``train_lm.phases``, or the run as one phase)."""

    def __init__(self, tc: LMTrainConfig):
        self.phases = tc.phase_list()

    def at(self, step: int) -> tuple[int, LMTrainConfig]:
        """(the phase's first step, its settings) for a global step."""
        for start, p in reversed(self.phases):
            if step >= start:
                return start, p
        raise IndexError(step)  # pragma: no cover

    def lr(self, step: int) -> float:
        start, p = self.at(step)
        return lr_at(step - start, p)

    def weights(self, step: int) -> dict[str, float]:
        return {t: getattr(self.at(step)[1].tasks, t) for t in TASKS}


class TaskSchedule:
    """Which task and which of its examples each global step trains on, from (seed, step) alone;
    the task weights are those of the step's phase."""

    def __init__(self, sizes: dict[str, int], phases: Phases, batch_size: int, seed: int):
        self.names = [
            t for t in TASKS if sizes.get(t, 0) > 0 and any(getattr(p.tasks, t) > 0 for _, p in phases.phases)
        ]
        if not self.names:
            raise UnicodebookError("no stage II task has both data and a weight > 0")
        for start, p in phases.phases:
            if not any(getattr(p.tasks, t) > 0 for t in self.names):
                raise UnicodebookError(f"stage II phase from step {start}: no task with data has a weight > 0")
        self.sizes, self.seed, self.phases = sizes, seed, phases
        self.bs = {t: min(batch_size, sizes[t]) for t in self.names}
        self.cursor = {t: 0 for t in self.names}

    def task_at(self, step: int) -> str:
        w = self.phases.weights(step)
        weights = torch.tensor([w[t] for t in self.names], dtype=torch.float64)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return self.names[int(torch.multinomial(weights, 1, generator=g))]

    def skip_to(self, step: int) -> None:
        for s in range(step):
            self.cursor[self.task_at(s)] += 1

    def next(self, step: int) -> tuple[str, list[int]]:
        task = self.task_at(step)
        c = self.cursor[task]
        self.cursor[task] += 1
        n, bs = self.sizes[task], self.bs[task]
        per_epoch = max(1, n // bs)
        epoch, k = divmod(c, per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + 7919 * TASKS.index(task) + epoch)
        return task, torch.randperm(n, generator=g)[k * bs : (k + 1) * bs].tolist()


def text_corpus(turns: list[str], captions: list[str]) -> list[str]:
    """What a word-level text tokenizer is trained on: the turns as they appear in a sequence
    (between the role markers, the image placeholder removed) and the captions."""
    return [f"{USER} {t.replace(IMAGE_TOKEN, ' ')} {ASSISTANT}" for t in turns] + list(captions)


def build_text_tokenizer(cfg: Config, llm, texts, run: Path, resume: bool, start: UniCodeLM | None = None):
    """The run's text tokenizer: reloaded on resume; the ``start`` model's (``init_from``); else
    trained on ``texts()`` (the data's conversation turns and captions; builtin LLM) or
    ``AutoTokenizer`` from the LLM's folder; the image markers added either way."""
    folder = run / "text_tokenizer"
    if resume and folder.exists():
        text_tok = load_text_tokenizer(folder)
    elif start is not None:
        text_tok = start.text_tok
    elif cfg.llm.name == BUILTIN:
        text_tok = train_word_tokenizer(texts(), max_vocab=llm.get_input_embeddings().weight.shape[0])
    else:
        text_tok = load_text_tokenizer(Path(cfg.llm.name))
    ensure_markers(text_tok, llm)
    return text_tok


def load_start(folder: str | Path, visual_tok, image_positions: bool, layout: str = "flat") -> UniCodeLM:
    """The stage II model a run starts from (``train_lm.init_from``), checked to fit this run:
    the same frozen visual tokenizer (bit for bit), the same image-position switch and layout."""
    try:
        start = load_model(folder)
    except UnicodebookError as e:
        raise UnicodebookError(f"train_lm.init_from: {e}") from None
    if start.tokenizer.family != visual_tok.family:
        raise UnicodebookError(
            f"train_lm.init_from: {folder} reads {start.tokenizer.family} codes, this run {visual_tok.family}"
        )
    mine, theirs = visual_tok.state_dict(), start.tokenizer.state_dict()
    if mine.keys() != theirs.keys() or any(
        mine[k].shape != theirs[k].shape or not torch.equal(mine[k].cpu(), theirs[k]) for k in mine
    ):
        raise UnicodebookError(f"train_lm.init_from: {folder} was trained on another visual tokenizer than this run's")
    if (start.image_positions is not None) != image_positions:
        raise UnicodebookError(
            f"train_lm.init_from: {folder} has image_positions={start.image_positions is not None}, "
            f"this run {image_positions}"
        )
    if start.layout != layout:
        raise UnicodebookError(
            f"train_lm.init_from: {folder} writes images in the {start.layout} layout, this run {layout}"
        )
    return start


def wrap_lora(llm, cfg: LMTrainConfig):
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(llm, peft_cfg)


class Stage2Recipe:
    """One stage II run, in parts: construction is the setup (run folder, text tokenizer with the
    image markers, the LLM — full or LoRA — and its tokenizer attached, records and cached codes,
    the optimizer, restored on resume); ``batch`` and ``train_step`` are one step; ``checkpoint``
    saves; ``run`` is the loop and the finish (the model folder, its samples and curves).

    One process or every rank of a distributed launch: ``train_lm.batch_size`` is the global
    batch, the loss is the mean over the global batch's target tokens, and the main process
    writes the run folder.
    """

    def __init__(
        self,
        cfg: Config,
        tokenizer_run: str | Path,
        data: str | Path,
        out: str | Path,
        resume: bool = False,
        progress: bool = True,
        asked: Sequence[str] = (),
    ):
        self.tc = tc = cfg.train_lm
        self.asked = tuple(asked)
        self.run_dir, self.tokenizer_run, self.progress = Path(out), str(tokenizer_run), progress
        if tc.threads:
            torch.set_num_threads(tc.threads)
        # a task may leave the depth table, the depth head or the features' projector unused
        unused = tc.image_positions or tc.image_layout == "depth" or tc.understanding_input == "features"
        self.engine = Engine(find_unused_parameters=unused)
        self.phases = Phases(tc)
        self.main = self.engine.is_main
        if self.engine.shards_parameters and tc.lora.enabled:
            raise UnicodebookError(
                "LoRA under FSDP is not supported: launch LoRA runs with a DDP config "
                "(configs/accelerate/ddp_8gpu.yaml); a LoRA model's optimizer state is small"
            )
        if self.engine.shards_parameters and tc.optimizer == "muon":
            raise UnicodebookError(
                "train_lm.optimizer=muon needs whole weight matrices, and FSDP shards them: use adamw under FSDP"
            )
        self.visual_tok, llm, self.cfg = self._tokenizer_and_llm(cfg)
        ckpts = check_resume(self.run_dir, self.cfg, resume)
        start = (
            load_start(tc.init_from, self.visual_tok, tc.image_positions, tc.image_layout)
            if tc.init_from and not resume
            else None
        )
        self.streaming = is_shard_spec(data)
        texts = self._open_records(data)
        self._write_text_tokenizer(llm, texts, resume, start)
        torch.manual_seed(tc.seed)
        self.umodel = self._build_model(llm, start)
        del start
        self.umodel.train()
        self.fmt = self.umodel.fmt
        self.code_ids = self.fmt.code_token_ids  # on the CPU, where batches are built
        self.task_names = [t for t in TASKS if any(getattr(p.tasks, t) > 0 for _, p in self.phases.phases)]
        self.bad_here = 0  # bad streamed samples this process met (summed over ranks when logged)
        self.sums: dict[str, list[float]] = {}  # per task: loss, accuracy, steps since the last log row
        self.tokens = 0
        if self.streaming:
            self.skipped = self.bad_images = 0
            self.preview: list[str] = []
        else:
            self._cache_codes()
        self.start = self._optimizer(ckpts, resume)
        self.guard = NonFiniteGuard(tc.max_nonfinite, "stage II", self.run_dir)
        self.log = RunLog(self.run_dir, self.start, resume, enabled=self.main)
        if self.main:
            (self.run_dir / "samples").mkdir(exist_ok=True)

    # ------------------------------------------------------------------ setup
    def _tokenizer_and_llm(self, cfg: Config):
        """The frozen visual tokenizer (it encodes and embeds where the LLM trains), the LLM and
        the run's config: a tokenizer bound to an LLM (UniCode) brings its own, and its run then
        defines the model and the LLM while stage II's settings come from ``cfg``."""
        visual_tok = load_tokenizer(self.tokenizer_run, device=self.engine.device)
        for _, p in self.phases.phases:
            for t in TASKS:
                if getattr(p.tasks, t) > 0 and t not in visual_tok.tasks:
                    raise UnicodebookError(
                        f"the {visual_tok.family} tokenizer offers no '{t}' task (it offers "
                        f"{', '.join(visual_tok.tasks)}): set train_lm.tasks.{t}=0"
                    )
        llm = visual_tok.bound_llm()
        if visual_tok.config is not None:
            _check_bound(cfg, visual_tok.config, self.tokenizer_run, self.asked)
            cfg = dataclasses.replace(cfg, llm=visual_tok.config.llm, model=visual_tok.config.model)
        if llm is None:
            llm = load_llm(cfg.llm, seed=self.tc.seed)
        return visual_tok, llm, cfg

    def _open_records(self, data: str | Path):
        """The training records (a folder's, or a shard stream) and a function returning the
        texts a word-level text tokenizer is trained on."""
        cfg = self.cfg
        if self.streaming:
            self.stream = ShardRecords(
                data, self.visual_tok.image_size, cfg.data.odd_size, self.engine, self.tc.seed, cfg.data.num_workers
            )
            return lambda: text_corpus(*self.stream.texts())
        self.folder = split_folder(data, "train")
        self.records = records = read_records(self.folder, data=cfg.data)
        return lambda: text_corpus(
            [t["value"] for c in records.conversations for t in c.turns], [c.caption for c in records.captions]
        )

    def _write_text_tokenizer(self, llm, texts, resume: bool, start) -> None:
        """The run folder and its config; the main process builds and saves the text tokenizer,
        the others load it."""
        engine, run = self.engine, self.run_dir
        engine.barrier()
        if self.main:
            run.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, run / "config.yaml")
        for turn in (True, False):
            if turn == self.main:
                self.text_tok = build_text_tokenizer(self.cfg, llm, texts, run, resume or not self.main, start)
                if self.main and not (run / "text_tokenizer").exists():
                    self.text_tok.save_pretrained(str(run / "text_tokenizer"))
            engine.barrier()

    def _build_model(self, llm, start: UniCodeLM | None) -> UniCodeLM:
        """The trained model: the LLM (``init_from``'s weights, checkpointing, LoRA) with the
        tokenizer attached, the image-position table and the depth head."""
        tc = self.tc
        if start is not None:
            try:
                llm.load_state_dict(start.llm.state_dict())
            except RuntimeError as e:
                raise UnicodebookError(
                    f"train_lm.init_from: the LLM in {tc.init_from} does not fit this run's ({str(e).splitlines()[0]})"
                ) from None
        if tc.gradient_checkpointing:
            enable_checkpointing(llm)
        if tc.lora.enabled:
            llm = wrap_lora(llm, tc)
        umodel = UniCodeLM(
            llm,
            self.visual_tok,
            self.text_tok,
            image_positions=tc.image_positions,
            layout=tc.image_layout,
            image_attention=tc.image_attention,
            depth_head=dataclasses.asdict(tc.depth_head),
            understanding_input=tc.understanding_input,
        )
        if start is not None:  # a part the start has no weights for (vit_proj of a codes reader) starts fresh
            theirs_all = start.parts()
            for name, mine in umodel.parts().items():
                theirs = theirs_all.get(name)
                if theirs is not None:
                    try:
                        mine.load_state_dict(theirs.state_dict())
                    except RuntimeError as e:
                        raise UnicodebookError(
                            f"train_lm.init_from: {tc.init_from} does not fit this run's model "
                            f"({str(e).splitlines()[0]})"
                        ) from None
        return umodel

    def _cache_codes(self) -> None:
        """A folder's images encoded once (the main process writes the cache, the others read
        it); the records whose image could not be encoded are counted and left out."""
        engine, records, tc = self.engine, self.records, self.tc
        images = [c.image for c in records.conversations] + [c.image for c in records.captions]
        for turn in (True, False):
            if turn == self.main:
                self.cache = cached_codes(
                    self.visual_tok,
                    self.folder,
                    images,
                    fallback=self.run_dir / "codes_cache",
                    progress=self.progress and self.main,
                    odd_size=self.cfg.data.odd_size,
                    limits=image_limits(self.cfg.data),
                    features=self.umodel.reads_features,
                )
            engine.barrier()
        index = self.cache.index
        self.convs = [c for c in records.conversations if c.image in index]
        self.caps = [c for c in records.captions if c.image in index]
        self.decomp = sorted({c.image for c in self.convs} | {c.image for c in self.caps})
        self.skipped = (
            records.bad + (len(records.conversations) - len(self.convs)) + (len(records.captions) - len(self.caps))
        )
        self.bad_images = len(self.cache.bad)
        sizes = {"decompress": len(self.decomp), "instruct": len(self.convs), "t2i": len(self.caps)}
        self.schedule = TaskSchedule(sizes, self.phases, tc.batch_size, tc.seed)
        for bs in self.schedule.bs.values():
            engine.local_batch_size(bs)  # fail early on an uneven split
        self.preview = [c.caption for c in self.caps[:8]]

    def _optimizer(self, ckpts, resume: bool) -> int:
        """The optimizer over the trainable parameters, the model and optimizer prepared for the engine
        and restored from the last checkpoint on resume; returns the first step to train."""
        tc, engine, umodel = self.tc, self.engine, self.umodel
        opt = build_optimizer(umodel, tc.optimizer, tc.lr, tc.betas, tc.weight_decay)
        names = param_names(umodel, opt)
        self.modules = {"llm": umodel.llm} | umodel.parts()
        start, opt_state = 0, None
        if resume:  # weights now (prepare shards them); the optimizer once it is wrapped
            state = load_checkpoint(ckpts[-1], self.modules, {"llm": None}, kind="lm", rank=engine.rank)
            start, opt_state = state["step"], state["optimizer_states"]["llm"]
        if self.streaming:
            self.records_iter = self.stream.batches(tc.batch_size, start)
        else:
            self.schedule.skip_to(start)
        self.model, self.opt = engine.prepare(umodel, opt)
        if opt_state is not None:
            engine.load_optimizer_state(self.model, self.opt, opt_state, names)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP swaps in sharded parameters
        return start

    # ------------------------------------------------------------------ batches
    def sample(self, task: str, codes: torch.Tensor, turns=None, caption: str | None = None, segment: int = 0):
        """One training sequence of ``task`` for an image's codes — the one place the folder and
        the stream paths build samples: ``turns`` for instruct, ``segment`` for decompression,
        ``caption`` for text-to-image (None: the caption dropped, an unconditional sample)."""
        if task == "instruct":
            return self.fmt.conversation(turns, codes)
        if task == "decompress":
            return self.fmt.decompression(codes, self.tc.decompress_segments, segment)
        return self.fmt.text_to_image(caption, codes)

    def _collate(self, samples: list, step: int, g: torch.Generator):
        return corrupt_codes(collate(samples, self.fmt.pad_id), self.code_ids, self.phases.at(step)[1].code_noise, g)

    def batch(self, step: int):
        """(task, batch, latents of the images the LLM reads) of ``step``, for this rank."""
        return self._stream_batch(step) if self.streaming else self._folder_batch(step)

    def _folder_batch(self, step: int):
        """This rank's share of the step's global batch (random choices drawn for all of it)."""
        task, idx = self.schedule.next(step)
        engine, cache = self.engine, self.cache
        g = torch.Generator().manual_seed(self.tc.seed * 48_271 + step)
        if task == "instruct":
            items = engine.shard([self.convs[i] for i in idx])
            keys = [cache.index[c.image] for c in items]
            samples = [self.sample(task, cache.codes[k].long(), turns=c.turns) for c, k in zip(items, keys)]
        elif task == "decompress":
            segs = engine.shard(torch.randint(self.tc.decompress_segments, (len(idx),), generator=g).tolist())
            keys = [cache.index[self.decomp[i]] for i in engine.shard(idx)]
            samples = [self.sample(task, cache.codes[k].long(), segment=s) for k, s in zip(keys, segs)]
        else:
            p_drop = self.phases.at(step)[1].caption_dropout
            drop = engine.shard((torch.rand(len(idx), generator=g) < p_drop).tolist())
            items = engine.shard([self.caps[i] for i in idx])
            samples = [
                self.sample(task, cache.codes[cache.index[c.image]].long(), caption=None if d else c.caption)
                for c, d in zip(items, drop)
            ]
            keys = []
        batch = self._collate(samples, step, g)
        return task, batch, self.umodel.latents(*cache.take(keys)) if keys else None

    def _stream_batch(self, step: int):
        """This rank's next streamed batch, each sample given one of the tasks it allows
        (decompression always; instruct with a conversation; t2i with a caption), drawn by the
        task weights; images encoded by the frozen tokenizer on the fly."""
        recs, n_bad = next(self.records_iter)
        self.bad_here += int(n_bad)
        codes, features = self.umodel.encode(recs["image"]) if len(recs["key"]) else (None, None)
        g = torch.Generator().manual_seed((self.tc.seed * 48_271 + step) * 1_000 + self.engine.rank)
        pc = self.phases.at(step)[1]
        samples, with_image = [], []
        for i, (conv, cap) in enumerate(zip(recs["conversation"], recs["caption"])):
            allowed = [
                t for t in self.task_names if t == "decompress" or (t == "instruct" and conv) or (t == "t2i" and cap)
            ]
            if not allowed:
                continue
            w = torch.tensor([getattr(pc.tasks, t) for t in allowed], dtype=torch.float64)
            if not bool(w.sum() > 0):
                continue
            task = allowed[int(torch.multinomial(w, 1, generator=g))]
            if task == "instruct":
                samples.append(self.sample(task, codes[i], turns=conv))
            elif task == "decompress":
                seg = int(torch.randint(self.tc.decompress_segments, (1,), generator=g))
                samples.append(self.sample(task, codes[i], segment=seg))
            else:
                drop = bool(torch.rand(1, generator=g) < pc.caption_dropout)
                samples.append(self.sample(task, codes[i], caption=None if drop else cap))
            if task != "t2i":
                with_image.append(i)
        if not samples:
            raise UnicodebookError(f"step {step}: no usable sample in this rank's batch (all bad, or no task applies)")
        batch = self._collate(samples, step, g)
        if not with_image:
            return "mixed", batch, None
        read = None if features is None else features[with_image]
        return "mixed", batch, self.umodel.latents(codes[with_image], read)

    # ------------------------------------------------------------------ one step
    def train_step(self, step: int, task: str, batch, latents) -> tuple[float, str | None]:
        """One optimizer step on ``batch``: (its learning rate, why it was skipped or None)."""
        engine, opt, model = self.engine, self.opt, self.model
        if batch.input_ids.shape[1] > self.umodel.max_positions:
            raise UnicodebookError(
                f"a {task} sequence has {batch.input_ids.shape[1]} tokens; "
                f"the LLM's context is {self.umodel.max_positions}"
            )
        lr = self.phases.lr(step)
        for group in opt.param_groups:
            group["lr"] = lr
        with engine.autocast(self.tc.precision):
            out = model(batch, latents)
        # the mean over the global batch's target tokens: weight this rank's mean by its share
        global_tokens = engine.sum(out.n_tokens)
        loss = out.loss * (out.n_tokens * engine.world / max(global_tokens, 1.0))
        opt.zero_grad(set_to_none=True)
        engine.backward(loss)
        why = engine.clip_and_check(out.loss, self.params, self.tc.grad_clip)
        if why is None:
            opt.step()
            s = self.sums.setdefault(task, [0.0, 0.0, 0])
            s[0] += float(out.loss.detach())  # this rank's; averaged over ranks when logged
            s[1] += float(out.accuracy)
            s[2] += 1
        else:
            opt.zero_grad(set_to_none=True)
            self.log.write({"step": step + 1, "skipped": why, "task": task})
        try:
            self.guard.record(why, step + 1)
        except NonFiniteError:
            self.log.close()  # the metrics so far stay readable; the checkpoints are untouched
            raise
        self.tokens += int(batch.attention_mask.sum())
        return lr, why

    def _log(self, step: int, lr: float, t0: float) -> dict:
        engine = self.engine
        el = time.time() - t0
        row = {
            "step": step,
            "lr": lr,
            "elapsed_s": round(el, 2),
            "tokens_per_s": round(engine.sum(self.tokens) / max(el, 1e-9), 1),
            "bad_records": self.skipped,
            "bad_images": self.bad_images + int(engine.sum(self.bad_here)),
            "skipped_steps": self.guard.total,
        }
        if engine.world > 1 and step == self.tc.steps:  # the invariant of a distributed run, checked
            row["weights_rank_max_diff"] = engine.max_diff_from_main(*self.params)
        for t, (loss_sum, acc_sum, n) in self.sums.items():
            row[f"loss_{t}"], row[f"acc_{t}"] = engine.mean_over_ranks(loss_sum / n), acc_sum / n
        self.sums = {}
        self.log.write(row, scalars=True)
        return row

    def checkpoint(self, at: int) -> dict:
        """An atomic checkpoint of step ``at``; returns the gathered weights per module."""
        engine = self.engine
        full = engine.state_dict(self.model)
        states = {
            name: {k[len(name) + 1 :]: v for k, v in full.items() if k.startswith(name + ".")} for name in self.modules
        }
        save_training_checkpoint(
            engine,
            self.run_dir,
            at,
            states,
            {"llm": self.opt},
            {"skipped_steps": self.guard.total},
            self.tc.keep_last,
            "lm",
            self.model,
        )
        return states

    def _samples(self, name: str, step: int) -> None:
        """Text-to-image samples of the preview captions (FSDP: a sharded module cannot decode
        outside forward)."""
        if self.main and self.preview and not self.engine.shards_parameters:
            _write_samples(self.umodel, self.preview, self.run_dir / "samples" / name, self.cfg, self.log.writer, step)

    # ------------------------------------------------------------------ the loop
    def run(self) -> Stage2Result:
        tc, engine, main = self.tc, self.engine, self.main
        t0 = time.time()
        self.sums, self.tokens = {}, 0
        last: dict = {}
        bar = tqdm(
            total=tc.steps,
            initial=self.start,
            desc="stage II",
            disable=not (self.progress and main),
            dynamic_ncols=True,
        )
        step = self.start
        with StopOnSigterm(engine) as sigterm:
            while step < tc.steps:
                task, batch, latents = self.batch(step)
                lr, _ = self.train_step(step, task, batch, latents)
                step += 1
                bar.update(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    last = self._log(step, lr, t0)
                    bar.set_postfix(
                        {k.replace("loss_", ""): f"{v:.3f}" for k, v in last.items() if k.startswith("loss_")}
                    )
                if tc.sample_every and step % tc.sample_every == 0 and step < tc.steps:
                    self._samples(f"t2i_{step:07d}.png", step)
                if step < tc.steps and sigterm.requested():
                    bar.close()
                    self.checkpoint(step)
                    self.log.close()
                    raise sigterm.stop("stage II", step, tc.steps, self.run_dir)
                if tc.save_every and step % tc.save_every == 0 and step < tc.steps:
                    self.checkpoint(step)
        bar.close()

        states = self.checkpoint(step)
        if main:
            # the gathered full weights: under FSDP the modules themselves hold only shards
            with write_errors(self.run_dir, f"the model in {self.run_dir}"):
                save_model(
                    self.umodel,
                    self.run_dir,
                    self.cfg,
                    self.tokenizer_run,
                    states=states if engine.shards_parameters else None,
                )
            self._samples("t2i_final.png", step)
        self.log.close()
        if main:
            _plot(self.run_dir)
        engine.barrier()
        return Stage2Result(self.run_dir, step, last, time.time() - t0, main)


def _check_bound(cfg: Config, stage1: Config, run: str, asked: Sequence[str]) -> None:
    """A tokenizer bound to its LLM fixes ``llm`` and ``model``: an explicit override (``asked``,
    dotted keys) that asks for another value there is an error, not silently replaced. The rest
    of ``cfg.llm`` / ``cfg.model`` (a preset's values) gives way to stage I's quietly."""

    def value(c: Config, key: str):
        v = c
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else getattr(v, part, None)
        return v

    keys = [k for k in asked if k.split(".")[0] in ("llm", "model")]
    differ = [f"{k}={value(cfg, k)} (stage I: {value(stage1, k)})" for k in keys if value(cfg, k) != value(stage1, k)]
    if differ:
        more = f" and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise UnicodebookError(
            f"the tokenizer in {run} is bound to its stage I LLM, so llm.* and model.* come from "
            f"that run; this run asks for {', '.join(differ[:3])}{more}: set them in stage I"
        )


def train_lm(
    cfg: Config,
    tokenizer_run: str | Path,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
    asked: Sequence[str] = (),
) -> Stage2Result:
    """Run stage II on ``data`` (a shapes-world root — its ``train`` split — or a folder with
    ``instruct.json`` and/or ``t2i.jsonl``), starting from the stage I run ``tokenizer_run``
    (``Stage2Recipe``)."""
    with run_lock(Path(out)):
        return Stage2Recipe(cfg, tokenizer_run, data, out, resume=resume, progress=progress, asked=asked).run()


def _write_samples(model: UniCodeLM, prompts: list[str], path: Path, cfg: Config, writer, step: int) -> None:
    import numpy as np

    from ..eval.plots import captioned_grid

    gen_cfg = cfg.generate
    images = model.generate_image(
        prompts, cfg_scale=gen_cfg.cfg_scale, temperature=gen_cfg.temperature, top_k=gen_cfg.top_k, seed=0
    )
    grid = captioned_grid(images, prompts)
    grid.save(path)
    writer.add_image("t2i", np.asarray(grid), step, dataformats="HWC")


def _plot(run: Path) -> None:
    from ..eval.plots import plot_curves

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    keys = tuple(k for k in (f"loss_{t}" for t in (*TASKS, "mixed")) if any(k in r for r in rows))
    if keys:
        plot_curves(run / "metrics.jsonl", run / "curves.png", keys=keys)


def train_lm_from_files(
    config: str | Path | None,
    overrides: list[str],
    tokenizer_run: str | Path,
    data: str | Path,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> Stage2Result:
    """CLI entry: the config defaults to the run's own (on --resume) or the tokenizer run's."""
    run = Path(out)
    if config is None:
        if resume and (run / "config.yaml").exists():
            config = run / "config.yaml"
        elif (Path(tokenizer_run) / "config.yaml").exists():
            config = Path(tokenizer_run) / "config.yaml"
    cfg = load_config(config or "tiny", overrides)
    asked = [o.split("=", 1)[0].strip() for o in overrides]
    return train_lm(cfg, tokenizer_run, data, out, resume=resume, progress=progress, asked=asked)
