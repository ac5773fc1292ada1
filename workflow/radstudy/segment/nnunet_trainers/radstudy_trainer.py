"""RadstudyTrainer: nnU-Net's default trainer with a configurable length, early stopping and seeds.

Everything about the network, loss, augmentation and sampling is nnU-Net's (`nnUNetTrainer`); this class
only changes how long it trains and makes a run repeatable:

* `num_epochs`, `num_iterations_per_epoch`, `num_val_iterations_per_epoch`: small for the demo study,
  nnU-Net's 1000 x 250 (50) for a real one;
* early stopping on the EMA pseudo-Dice that nnU-Net already tracks (`ema_fg_dice`, the number behind
  `checkpoint_best.pth`): training stops when it has not improved by more than `early_stopping_min_delta`
  for `early_stopping_patience` epochs; `checkpoint_final.pth` is then the last epoch's state, as usual;
* `seed`: Python, NumPy and torch are seeded before the network is built, so weights, patch sampling and
  augmentation repeat exactly when the augmentation runs in the main process (nnUNet_n_proc_DA=0, what
  `radstudy.segment.nnunet.train` uses by default; nnU-Net's multi-process augmenter is not seedable);
  on CUDA cuDNN is also set to deterministic, which costs some speed;
* `radstudy_training.json` in the fold folder records what ran (epochs, early stop, seconds per iteration).

`radstudy.segment.nnunet.train` constructs this class directly and sets the attributes through `configure()`.
With nnU-Net's command line (`nnUNet_extTrainer`, see the package docstring) the same settings come from
environment variables, read when the trainer is constructed:

    RADSTUDY_NNUNET_EPOCHS, RADSTUDY_NNUNET_ITERATIONS, RADSTUDY_NNUNET_VAL_ITERATIONS,
    RADSTUDY_NNUNET_PATIENCE, RADSTUDY_NNUNET_MIN_DELTA, RADSTUDY_NNUNET_SEED

This module is imported as `radstudy.segment.nnunet_trainers.radstudy_trainer` by radstudy and as the top-level
module `radstudy_trainer` by nnU-Net's trainer search, so it must only use absolute imports.
"""

from __future__ import annotations

import json
import os
import random
from time import time

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA


def _env_number(name: str, cast, default):
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return cast(value)


class RadstudyTrainer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # the parameter names must stay those of nnUNetTrainer.__init__ (it records them for checkpoints)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = _env_number("RADSTUDY_NNUNET_EPOCHS", int, self.num_epochs)
        self.num_iterations_per_epoch = _env_number("RADSTUDY_NNUNET_ITERATIONS", int, self.num_iterations_per_epoch)
        self.num_val_iterations_per_epoch = _env_number(
            "RADSTUDY_NNUNET_VAL_ITERATIONS", int, self.num_val_iterations_per_epoch)
        self.early_stopping_patience: int | None = _env_number("RADSTUDY_NNUNET_PATIENCE", int, None)
        self.early_stopping_min_delta: float = _env_number("RADSTUDY_NNUNET_MIN_DELTA", float, 0.0)
        self.seed: int | None = _env_number("RADSTUDY_NNUNET_SEED", int, None)
        self._es_best: float | None = None
        self._es_wait = 0
        self.stopped_early_at_epoch: int | None = None

    def configure(self, *, epochs: int | None = None, iterations_per_epoch: int | None = None,
                  val_iterations_per_epoch: int | None = None, early_stopping_patience: int | None = None,
                  early_stopping_min_delta: float | None = None, seed: int | None = None,
                  foreground_oversampling: float | None = None) -> "RadstudyTrainer":
        """Set the training length, early stopping, seed and the share of patches forced to contain foreground
        (nnU-Net's oversample_foreground_percent, 0.33; small lesions learn sooner with more) — None leaves a
        setting as it is."""
        if self.was_initialized:
            raise RuntimeError("configure() must be called before training starts")
        if epochs is not None:
            if epochs < 1:
                raise ValueError(f"epochs must be >= 1, got {epochs}")
            self.num_epochs = int(epochs)
        if iterations_per_epoch is not None:
            if iterations_per_epoch < 1:
                raise ValueError(f"iterations_per_epoch must be >= 1, got {iterations_per_epoch}")
            self.num_iterations_per_epoch = int(iterations_per_epoch)
        if val_iterations_per_epoch is not None:
            if val_iterations_per_epoch < 1:
                raise ValueError(f"val_iterations_per_epoch must be >= 1, got {val_iterations_per_epoch}")
            self.num_val_iterations_per_epoch = int(val_iterations_per_epoch)
        if early_stopping_patience is not None:
            self.early_stopping_patience = int(early_stopping_patience) if early_stopping_patience > 0 else None
        if early_stopping_min_delta is not None:
            self.early_stopping_min_delta = float(early_stopping_min_delta)
        if seed is not None:
            self.seed = int(seed)
        if foreground_oversampling is not None:
            if not 0 <= foreground_oversampling <= 1:
                raise ValueError(f"foreground_oversampling must be in [0, 1], got {foreground_oversampling}")
            self.oversample_foreground_percent = float(foreground_oversampling)
        return self

    # ------------------------------------------------------------------ reproducibility
    def _seed_everything(self) -> None:
        if self.seed is None:
            return
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        torch.manual_seed(self.seed)  # also seeds every CUDA device
        if self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        if get_allowed_n_proc_DA() > 0:
            self.print_to_log_file(
                "WARNING: data augmentation runs in background processes (nnUNet_n_proc_DA > 0), which nnU-Net "
                "does not seed: the network initialisation is seeded but the batches are not repeatable.")

    # ------------------------------------------------------------------ early stopping
    def on_epoch_end(self):
        super().on_epoch_end()  # logs, checkpoints, updates the EMA pseudo-Dice, increments current_epoch
        ema = self.logger.get_value("ema_fg_dice", step=-1)
        if ema is None or not np.isfinite(ema):
            self._es_wait += 1
        elif self._es_best is None or ema > self._es_best + self.early_stopping_min_delta:
            self._es_best = float(ema)
            self._es_wait = 0
        else:
            self._es_wait += 1

    def _should_stop_early(self) -> bool:
        return self.early_stopping_patience is not None and self._es_wait >= self.early_stopping_patience

    # ------------------------------------------------------------------ the loop (nnUNetTrainer.run_training + stop)
    def run_training(self):
        self._seed_everything()
        self.print_to_log_file(
            f"RadstudyTrainer: epochs={self.num_epochs} iterations_per_epoch={self.num_iterations_per_epoch} "
            f"val_iterations_per_epoch={self.num_val_iterations_per_epoch} "
            f"early_stopping_patience={self.early_stopping_patience} seed={self.seed}")
        self.on_train_start()
        first_epoch = self.current_epoch
        epoch_seconds_per_iteration = []
        started = time()
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()

            self.on_train_epoch_start()
            train_outputs = []
            t0 = time()
            for _ in range(self.num_iterations_per_epoch):
                train_outputs.append(self.train_step(next(self.dataloader_train)))
            epoch_seconds_per_iteration.append((time() - t0) / self.num_iterations_per_epoch)
            self.on_train_epoch_end(train_outputs)

            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = []
                for _ in range(self.num_val_iterations_per_epoch):
                    val_outputs.append(self.validation_step(next(self.dataloader_val)))
                self.on_validation_epoch_end(val_outputs)

            self.on_epoch_end()
            if self._should_stop_early():
                self.stopped_early_at_epoch = epoch
                self.print_to_log_file(
                    f"Early stopping: EMA pseudo Dice has not improved by more than {self.early_stopping_min_delta} "
                    f"for {self.early_stopping_patience} epochs (best {self._es_best:.4f}); stopping after epoch "
                    f"{epoch}.")
                break

        self.on_train_end()
        if self.local_rank == 0:
            summary = {
                "trainer": self.__class__.__name__,
                "configuration": self.configuration_name,
                "fold": self.fold,
                "epochs_planned": self.num_epochs,
                "epochs_run": self.current_epoch - first_epoch,
                "iterations_per_epoch": self.num_iterations_per_epoch,
                "val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                "batch_size": self.batch_size,
                "patch_size": list(self.configuration_manager.patch_size),
                "early_stopping_patience": self.early_stopping_patience,
                "stopped_early_at_epoch": self.stopped_early_at_epoch,
                "best_ema_pseudo_dice": self._best_ema,
                "final_ema_pseudo_dice": self.logger.get_value("ema_fg_dice", step=-1),
                "final_pseudo_dice_per_class": [float(v) for v in
                                                self.logger.get_value("dice_per_class_or_region", step=-1)],
                "seed": self.seed,
                "device": str(self.device),
                "torch_threads": torch.get_num_threads(),
                # mean over all training iterations, and the median over epochs of each epoch's mean (robust to
                # a machine shared with other jobs)
                "seconds_per_train_iteration": float(np.mean(epoch_seconds_per_iteration))
                if epoch_seconds_per_iteration else None,
                "seconds_per_train_iteration_median_epoch": float(np.median(epoch_seconds_per_iteration))
                if epoch_seconds_per_iteration else None,
                "seconds_total": time() - started,
            }
            with open(join(self.output_folder, "radstudy_training.json"), "w") as handle:
                json.dump(summary, handle, indent=2, default=float)
