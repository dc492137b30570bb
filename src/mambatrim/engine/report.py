"""Run records: a JSON-lines metrics log (rank 0), optional TensorBoard, and the final summary JSON."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON object per event to ``OUTPUT_DIR/metrics.jsonl``; mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: str | Path | None, enabled: bool, tensorboard: bool = False) -> None:
        self.path = Path(output_dir) / "metrics.jsonl" if (output_dir and enabled) else None
        self.writer = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(str(self.path.parent / "tensorboard"))
                except ImportError:
                    print("tensorboard is not installed: logging to metrics.jsonl only")

    def log(self, kind: str, step: int, **values: Any) -> None:
        if self.path is None:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **values}
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def write_json(path: str | Path, data: dict[str, Any]) -> Path:
    """``data`` as indented JSON, written atomically (a temporary file replaced in one step)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def write_result(out_dir: str | Path, stem: str, result: dict[str, Any], markdown: str) -> None:
    """A benchmark's record: ``STEM.json`` (the numbers) and ``STEM.md`` (the table) in ``out_dir``."""
    write_json(Path(out_dir) / f"{stem}.json", result)
    (Path(out_dir) / f"{stem}.md").write_text(markdown)
