"""What a run tells its user while it trains: the progress line and the note on the first validation.

Every duration of a run (budget, checkpoints, rate, progress) is read from `now()`, which reads
`_clock` (tests replace it)."""

from __future__ import annotations

import sys
import time

_clock = time.monotonic


def now() -> float:
    return _clock()


def minutes(seconds: float) -> str:
    m = seconds / 60
    return f"{m:.1f}" if m < 10 else f"{m:.0f}"


class _Progress:
    """A one-line progress display on a terminal; off a terminal (a log, a background job) a line every
    `log_every_s` seconds and at each validation, with the measured rate and the time left.

    With a time budget of `budget_s` seconds counted from `begun`, the time left is the smaller of what
    the episodes left need at the measured rate and what is left of the budget, and says which ends the run."""

    def __init__(self, total: int, enabled: bool, done: int = 0, log_every_s: float = 30.0, budget_s: float = 0.0,
                 begun: float | None = None):
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.start, self.first = _clock(), done  # a resumed run counts its own episodes only
        self.log_every_s, self.last_line = log_every_s, self.start
        self.budget_s, self.begun = budget_s, self.start if begun is None else begun

    def time_left(self, done: int) -> tuple[float, float | None] | None:
        """(seconds left, and what the episodes would need when the budget ends the run first, else None);
        None before a rate is measured or once the episodes are done."""
        now = _clock()
        rate = (done - self.first) / max(now - self.start, 1e-9)
        if rate <= 0 or done >= self.total:
            return None
        by_episodes = (self.total - done) / rate
        if self.budget_s > 0:
            by_budget = max(0.0, self.budget_s - (now - self.begun))
            if by_budget < by_episodes:
                return by_budget, by_episodes
        return by_episodes, None

    def line(self, done: int, loss: float, acc: float, val: str) -> str:
        seconds = _clock() - self.start
        rate = (done - self.first) / max(seconds, 1e-9)
        speed = f"{rate:.3g} ep/s" if rate >= 1 else f"{1 / rate:.3g} s/ep" if rate > 0 else "- ep/s"
        left = self.time_left(done)
        if left is None:
            left_text = ""
        elif left[1] is not None:
            left_text = f"  {minutes(left[0])} min left (time budget; {self.total} episodes would need {minutes(left[1])})"
        else:
            left_text = f"  {minutes(left[0])} min left" + (" (episodes, within the budget)" if self.budget_s > 0 else "")
        filled = int(30 * done / self.total)
        return (f"[{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} episodes  "
                f"loss {loss:.3f}  acc {100 * acc:5.1f}%  val {val}  {speed}{left_text}")

    def update(self, done: int, loss: float, acc: float, val: str, force_line: bool = False) -> None:
        if not self.enabled:
            return
        now = _clock()
        if self.tty and (force_line or now - self.last_line >= 0.5):
            self.last_line = now
            print("\r" + self.line(done, loss, acc, val), end="\n" if force_line else "", file=sys.stderr, flush=True)
        elif not self.tty and (force_line or now - self.last_line >= self.log_every_s):
            self.last_line = now
            print(self.line(done, loss, acc, val), file=sys.stderr, flush=True)


def first_validation_note(done: int, rate: float, budget_left_s: float, every: int, episodes: int,
                           validated_before: bool) -> str:
    """The note when, at the measured `rate` (episodes per second), the run's next validation would
    come after its budget ends, with what then happens and what to set; "" when it comes in time."""
    upcoming = min((done // every + 1) * every, episodes)
    need = (upcoming - done) / rate
    if need <= budget_left_s:
        return ""
    reach = done + int(rate * max(budget_left_s, 0.0))
    return (f"the first validation of this run (episode {upcoming}) would come in about {minutes(need)} min at the "
            f"measured {rate:.3g} episodes/s, after the time budget ends ({minutes(max(budget_left_s, 0.0))} min left): "
            f"the run will validate once, when the budget ends (near episode {reach}), and model.keras will hold those "
            f"last weights" + (" unless an earlier validation scored higher" if validated_before else "")
            + f"; to validate on the way, set [validation] every to at most {max(1, int(0.9 * (reach - done)))}")
