"""Progress bars for long work seen from the client side (a job's training steps)."""

from __future__ import annotations

import sys

from tqdm import tqdm


class JobProgress:
    """A tqdm bar fed by WatchJob updates: steps done, live loss and tokens/s, status changes."""

    def __init__(self, desc: str = "training", file=sys.stderr):
        self.bar = tqdm(total=0, desc=desc, unit="step", file=file, dynamic_ncols=True)
        self.status = ""
        self.eval_loss: float | None = None

    def update(self, update) -> None:
        from .client import job_status_name

        status = job_status_name(update.job.status)
        if update.kind == "metrics":
            m = update.metrics
            total = int(m.get("max_steps", 0))
            if total and self.bar.total != total:
                self.bar.total = total
            # a sample redelivered late (its first handling failed) does not move the bar back
            self.bar.n = max(self.bar.n, int(update.step))
            postfix = {"loss": f"{m.get('loss', float('nan')):.4f}",
                       "tok_s": f"{m.get('tokens_per_s', 0):.0f}"}
            if "eval_loss" in m:
                self.eval_loss = m["eval_loss"]
            if self.eval_loss is not None:
                postfix["eval_loss"] = f"{self.eval_loss:.4f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.refresh()
        elif update.kind == "checkpoint":
            self.bar.write(f"checkpoint at step {update.step}")
        if status != self.status:
            self.status = status
            self.bar.set_description(f"training [{status}]")

    def close(self) -> None:
        self.bar.close()
