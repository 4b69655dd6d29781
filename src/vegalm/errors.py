"""User-facing errors. The CLI prints these as one line (no traceback unless --debug)."""


class VegaError(Exception):
    """A mistake in the user's input: a path, a file's contents, a recipe key. Message names file:line or key."""


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped training at a step boundary, after a checkpoint where checkpointing is on.

    A KeyboardInterrupt, so `except Exception` lets it through; the CLI prints it and exits 128 + signal.
    """

    def __init__(self, step: int, checkpoint: str | None, signum: int):
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        where = (f"checkpoint saved in {checkpoint}; run the same command again to resume" if checkpoint
                 else "no checkpoint (checkpointing is off), so running the command again starts over")
        super().__init__(f"interrupted at step {step}: {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def __reduce__(self):  # picklable: a worker process returns it to `vegalm run --jobs` (an unpicklable
        return type(self), (self.step, self.checkpoint, self.signum)  # result breaks the whole pool)


class WorkersInterrupted(Interrupted):
    """SIGINT / SIGTERM stopped `vegalm run --jobs N` or `vegalm ablate --jobs N` (workers.supervised_pool): its
    workers stopped at a step boundary (pretraining, and fine-tuning with checkpoint_every, save a checkpoint
    there) and the parent waited for them."""

    def __init__(self, signum: int):
        self.step, self.checkpoint, self.signum = None, None, signum
        KeyboardInterrupt.__init__(self, "interrupted: the workers stopped at a step boundary (pretraining, and "
                                         "fine-tuning with checkpoint_every, saved a checkpoint; finished runs are "
                                         "cached); run the same command again to resume")

    def __reduce__(self):
        return type(self), (self.signum,)
