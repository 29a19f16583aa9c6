"""Training: ``onebit train`` (a config's model and data) and ``onebit.fit`` (a user's own).

From the bottom up:

- ``config``: :class:`TrainConfig`, every option of a run and its checks;
- ``build``: the config's names (model, dataset, optimizer, schedule) resolved to objects, in one place;
- ``console``: the run's header, progress bar and :class:`EpochTable`;
- ``tensorboard``: TensorBoard event files of a run (optional);
- ``epoch_log``: the header, progress bar, epoch table and TensorBoard log of a run's epochs;
- ``checkpoint``: the run directory: its files and format, its lock, :func:`load_run`;
- ``collective``: what a run's processes agree on (rank, sums, the step to stop at);
- ``batches``, ``loss``, ``update``, ``evaluation``: a step's batch, its loss, the update after it,
  and the test metrics; ``teacher``: a distilled run's teacher; ``state``: a run's random streams and
  position; ``stopping``: stop signals and :class:`Interrupted`;
- ``trainer``: :class:`Trainer`, the loop over epochs and steps, ``state_dict`` / ``load_state_dict``,
  :func:`train`, :func:`resume`;
- ``distributed``: the processes of a multi-process run (spawned or under torchrun);
- ``fit``: :func:`onebit.fit`, the trainer on a user's module and dataset.
"""

from onebit.train.build import seed_everything
from onebit.train.checkpoint import (
    CHECKPOINT,
    LOCK_FILE,
    RUN_FILES,
    RunDirectoryError,
    clear_run,
    holds_run,
    load_run,
    lock_run_directory,
    prepare_run_directory,
    read_run_config,
)
from onebit.train.config import MEMORY_FORMATS, OPTIMIZERS, SCHEDULES, TrainConfig
from onebit.train.console import EpochTable
from onebit.train.distributed import (
    end_distributed,
    init_distributed_from_env,
    run_distributed,
)
from onebit.train.trainer import (
    Interrupted,
    Trainer,
    distillation_loss,
    epoch_permutation,
    resume,
    train,
)

__all__ = [
    "TrainConfig",
    "Trainer",
    "EpochTable",
    "train",
    "resume",
    "load_run",
    "run_distributed",
    "Interrupted",
    "distillation_loss",
    "RunDirectoryError",
    "holds_run",
    "lock_run_directory",
    "prepare_run_directory",
    "read_run_config",
    "clear_run",
    "init_distributed_from_env",
    "end_distributed",
    "seed_everything",
    "epoch_permutation",
    "OPTIMIZERS",
    "SCHEDULES",
    "MEMORY_FORMATS",
    "CHECKPOINT",
    "RUN_FILES",
    "LOCK_FILE",
]
