"""A run's logs: ``metrics.jsonl`` (one JSON object per line) and TensorBoard, on the main
process only. A resumed run first drops the records logged after its checkpoint, so the log
reads as one uninterrupted run."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..utils.io import atomic_write_text


class RunLog:
    def __init__(self, run: Path, start: int, resume: bool, enabled: bool = True):
        self.enabled = enabled
        self.writer = self._file = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run / "tb"), purge_step=start if resume else None)
        if resume:
            trim_metrics(run / "metrics.jsonl", start)
        self._file = open(run / "metrics.jsonl", "a" if resume else "w")

    def write(self, record: dict, scalars: bool = False) -> None:
        """Append ``record``; with ``scalars`` its float values also go to TensorBoard (train/…)."""
        if not self.enabled:
            return
        # a NaN/inf (a skipped step's loss) is written as null: the file stays strict JSON
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if scalars:
            for k, v in record.items():
                if isinstance(v, float) and k != "elapsed_s":
                    self.writer.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self.enabled:
            self._file.close()
            self.writer.close()
            self.enabled = False


def trim_metrics(path: Path, step: int) -> None:
    """Drop records logged after the checkpoint a resumed run restarts from (no duplicates)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_text(path, "".join(line + "\n" for line in keep))
