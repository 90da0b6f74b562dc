"""Training for a wall-clock budget instead of an epoch count, with the learning rate annealed over that budget."""

import math
import time

from ignite.engine import Engine, Events


class TrainingBudget:
    """The learning-rate shape of a run (linear warm-up over ``warmup_steps``, then cosine down to ``end_factor``)
    over either ``total_steps`` or, when ``minutes`` is set, the wall-clock budget: training stops after the first
    optimizer step past the budget (that epoch is cut short but still ends, so the epoch-end checkpoint is written),
    and the cosine follows the elapsed share of it. The elapsed time is checkpointed, so a
    resumed run spends only what is left.

    Use ``lr_factor`` as a ``LambdaLR`` lambda and attach to the trainer.
    """

    def __init__(self, minutes: float | None, total_steps: int, warmup_steps: int = 0, end_factor: float = 0.0):
        if minutes is not None and minutes <= 0:
            raise ValueError(f"budget_minutes must be positive, got {minutes}")
        self.seconds = None if minutes is None else 60.0 * minutes
        self.total_steps, self.warmup_steps, self.end_factor = max(total_steps, 1), warmup_steps, end_factor
        self._spent, self._started = 0.0, None

    @property
    def elapsed(self) -> float:
        """Training seconds spent, earlier (resumed) runs included."""
        return self._spent + (0.0 if self._started is None else time.monotonic() - self._started)

    def progress(self, step: int) -> float:
        """Share of the schedule done, in [0, 1]."""
        if self.seconds is not None:
            return min(self.elapsed / self.seconds, 1.0)
        return min(max(step - self.warmup_steps, 0) / max(self.total_steps - self.warmup_steps, 1), 1.0)

    def lr_factor(self, step: int) -> float:
        """Multiplier of the base learning rate at optimizer step ``step``."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        cosine = 0.5 * (1.0 + math.cos(math.pi * self.progress(step)))
        return self.end_factor + (1.0 - self.end_factor) * cosine

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.EPOCH_STARTED, self._stop_when_spent)  # a resumed run whose budget is spent
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._end_epoch_when_spent)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._stop_when_spent)
        engine.add_event_handler(Events.COMPLETED, self._pause)

    def _start(self, engine: Engine) -> None:
        self._started = time.monotonic()

    def _pause(self, engine: Engine) -> None:
        self._spent, self._started = self.elapsed, None

    def _end_epoch_when_spent(self, engine: Engine) -> None:
        if self.seconds is not None and self.elapsed >= self.seconds:
            engine.terminate_epoch()

    def _stop_when_spent(self, engine: Engine) -> None:
        if self.seconds is not None and self.elapsed >= self.seconds:
            engine.logger.info(f"training budget of {self.seconds / 60:g} min spent after epoch {engine.state.epoch}, "
                               f"iteration {engine.state.iteration}")
            engine.terminate()

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed}

    def load_state_dict(self, state: dict) -> None:
        self._spent = float(state["elapsed_s"])
        if self._started is not None:
            self._started = time.monotonic()


class ValidateAtTheEnd:
    """Validate once more when training ends on an epoch the validator has not seen (a budget spent, or
    ``max_epochs`` not a multiple of the validation interval), so a run of any length writes its best-model
    checkpoint. Ours because MONAI's ``ValidationHandler`` validates only every ``interval`` epochs."""

    def __init__(self, validator: Engine):
        self.validator = validator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if engine.state.epoch > 0 and self.validator.state.epoch != engine.state.epoch:
            self.validator.run(engine.state.epoch)
