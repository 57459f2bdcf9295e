"""Training metrics: a CSV of loss and learning rate per step, a PNG loss curve,
and optionally TensorBoard. Only the main process writes.

On ``--resume`` the CSV is cut back to the resumed step, so it always holds
one row per optimizer step of the run that led to the current weights.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ctgridit.files import atomic_output

COLUMNS = ("step", "loss", "lr", "samples_per_s", "elapsed_s")
#: Moving-average window (in logged rows) of the smoothed curve on the PNG.
SMOOTHING = 25


class MetricsLog:
    """Append rows to ``folder/train_log.csv``; draw ``folder/loss.png`` on demand."""

    def __init__(self, folder: str | Path, resume_step: int = 0, tensorboard: bool = False):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.folder / "train_log.csv"
        self.png_path = self.folder / "loss.png"
        rows = [r for r in self.rows() if int(r["step"]) <= resume_step] if resume_step else []
        self._rewrite(rows)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # tensorboard is optional
                raise RuntimeError("logging.tensorboard needs the tensorboard package: pip install tensorboard") from err
            self._writer = SummaryWriter(str(self.folder / "tensorboard"))

    def rows(self) -> list[dict[str, str]]:
        if not self.csv_path.exists():
            return []
        with self.csv_path.open(newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        with atomic_output(self.csv_path, force=True) as tmp:
            tmp.write_text(buffer.getvalue())

    def log(self, step: int, loss: float, lr: float, samples_per_s: float, elapsed_s: float) -> None:
        with self.csv_path.open("a", newline="") as f:
            csv.writer(f).writerow([step, f"{loss:.6g}", f"{lr:.6g}", f"{samples_per_s:.4g}", f"{elapsed_s:.1f}"])
        if self._writer is not None:
            self._writer.add_scalar("train/loss", loss, step)
            self._writer.add_scalar("train/lr", lr, step)

    def plot(self, title: str = "") -> Path | None:
        """Draw the loss curve (raw and smoothed, log scale) to ``loss.png``."""
        rows = self.rows()
        if len(rows) < 2:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [int(r["step"]) for r in rows]
        loss = [float(r["loss"]) for r in rows]
        smooth = [sum(loss[max(0, i - SMOOTHING + 1): i + 1]) / len(loss[max(0, i - SMOOTHING + 1): i + 1])
                  for i in range(len(loss))]
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot(steps, loss, color="0.75", linewidth=0.8, label="loss")
        ax.plot(steps, smooth, color="C0", linewidth=1.5, label=f"moving average ({SMOOTHING} rows)")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("DDPM epsilon MSE")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_output(self.png_path, force=True) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        return self.png_path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
