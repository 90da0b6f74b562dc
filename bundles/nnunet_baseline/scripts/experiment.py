"""``NnUNetExperiment``: one nnU-Net v2 run (raw dataset -> plans -> training -> test predictions) in one work dir.

nnunetv2's own API is called rather than ``monai.apps.nnunet.nnUNetV2Runner``: the runner passes no device
(so no CPU training), and its predictor helpers assume CUDA.
"""

import os
from pathlib import Path

import numpy as np
import torch
from monai.data import PILWriter
from tqdm import tqdm

from .budget import BUDGET_FILE, spent_seconds, train_for_minutes
from .raw_dataset import write_raw_dataset

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


class NnUNetExperiment:
    """The nnU-Net folders of one run, ``<work_dir>/{nnUNet_raw,nnUNet_preprocessed,nnUNet_results}``, and its steps.

    Each step points nnunetv2's environment variables at ``work_dir`` first (nnunetv2 reads them when used).

    Args:
        work_dir: folder of this run's nnU-Net data, plans, checkpoints; created when missing.
        dataset_id: nnU-Net dataset id, 1..999.
        dataset_name: the ``Name`` of ``DatasetNNN_Name``.
        configuration: nnU-Net configuration; ``2d`` (the only one planned for 2D PNGs).
        fold: ``all`` (train on every training case; default, since a 0.5 % datalist has 3 cases and nnU-Net's
            5-fold split needs 5) or a fold index of nnU-Net's split.
        trainer: nnU-Net trainer class name (``nnUNetTrainer`` or any class nnunetv2 finds).
        device: ``torch.device`` or name (``cpu``, ``cuda``).
        num_processes: worker processes for fingerprinting and preprocessing.
        num_workers: data-augmentation worker processes (nnU-Net's ``nnUNet_n_proc_DA``); None keeps nnU-Net's default.
    """

    def __init__(self, work_dir: str, dataset_id: int = 1, dataset_name: str = "MoNuSeg", configuration: str = "2d",
                 fold: int | str = "all", trainer: str = "nnUNetTrainer", plans: str = "nnUNetPlans",
                 device: torch.device | str = "cpu", num_processes: int = 2, num_workers: int | None = None):
        if not 1 <= int(dataset_id) <= 999:
            raise ValueError(f"dataset_id must be in 1..999, got {dataset_id}")
        self.work_dir = Path(work_dir).resolve()
        self.dataset = f"Dataset{int(dataset_id):03d}_{dataset_name}"
        self.configuration, self.trainer, self.plans = configuration, trainer, plans
        self.fold = fold if fold == "all" else int(fold)
        self.device = torch.device(device)
        self.num_processes, self.num_workers = num_processes, num_workers

    def _environment(self) -> None:
        for name in NNUNET_FOLDERS:
            (self.work_dir / name).mkdir(parents=True, exist_ok=True)
            os.environ[name] = str(self.work_dir / name)

    @property
    def model_folder(self) -> Path:
        """``nnUNet_results/<dataset>/<trainer>__<plans>__<configuration>`` (plans, dataset.json, ``fold_<f>/``)."""
        return self.work_dir / "nnUNet_results" / self.dataset / f"{self.trainer}__{self.plans}__{self.configuration}"

    @property
    def fold_folder(self) -> Path:
        return self.model_folder / f"fold_{self.fold}"

    def convert(self, datalist: str, splits: tuple[str, ...] = ("training",)) -> str:
        """Write the datalist's ``splits`` as this run's nnU-Net raw dataset (see ``write_raw_dataset``)."""
        self._environment()
        return write_raw_dataset(datalist, str(self.work_dir / "nnUNet_raw"), self.dataset, tuple(splits))

    def plan_and_preprocess(self, verify: bool = True) -> str:
        """nnU-Net's fingerprint (with its dataset integrity check when ``verify``), plans and preprocessing of the
        configuration; skipped when done before. Returns the plans file."""
        self._environment()
        from nnunetv2.experiment_planning.plan_and_preprocess_api import (
            extract_fingerprints,
            plan_experiments,
            preprocess,
        )

        preprocessed = self.work_dir / "nnUNet_preprocessed" / self.dataset
        plans_file = preprocessed / f"{self.plans}.json"
        cases = len(list((self.work_dir / "nnUNet_raw" / self.dataset / "labelsTr").glob("*.png")))
        done = len(list((preprocessed / f"{self.plans}_{self.configuration}").glob("*.pkl")))
        if plans_file.is_file() and cases and done == cases:
            print(f"{self.dataset}: planned and preprocessed already ({done} cases)")
            return str(plans_file)
        dataset_id = int(self.dataset[7:10])
        extract_fingerprints([dataset_id], num_processes=self.num_processes, check_dataset_integrity=verify,
                             clean=True, verbose=False)
        plan_experiments([dataset_id])
        preprocess([dataset_id], self.plans, configurations=(self.configuration,), num_processes=[self.num_processes])
        return str(plans_file)

    def train(self, epochs: int = 1000, iterations_per_epoch: int = 250, val_iterations_per_epoch: int = 50,
              save_every: int = 1, resume: bool = True, budget_minutes: float | None = None) -> str:
        """Train fold ``fold``; returns the final checkpoint. nnU-Net's defaults are 1000 epochs of 250 iterations.

        ``save_every`` epochs the latest checkpoint is written (nnU-Net's default is 50); with ``resume`` a killed
        run continues from it, a finished run is not trained again, and one finished with fewer epochs goes on.
        ``budget_minutes``: train for this wall-clock time instead of ``epochs`` (``budget.train_for_minutes``); a
        resumed run spends what is left of it.
        """
        self._environment()
        if self.num_workers is not None:  # for training only: nnU-Net's planner fails on 0 (torch.set_num_threads(0))
            os.environ["nnUNet_n_proc_DA"] = str(self.num_workers)
        from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

        final = self.fold_folder / "checkpoint_final.pth"
        if resume and final.is_file():
            trained = torch.load(final, map_location="cpu", weights_only=False)["current_epoch"]
            done = trained >= epochs if budget_minutes is None else spent_seconds(final.parent) >= 60 * budget_minutes
            if done:
                print(f"{final}: trained already ({trained} epochs)")
                return str(final)
        trainer = get_trainer_from_args(self.dataset, self.configuration, self.fold, self.trainer, self.plans,
                                        continue_training=resume, device=self.device)
        trainer.num_epochs, trainer.save_every = int(epochs), int(save_every)
        trainer.num_iterations_per_epoch = int(iterations_per_epoch)
        trainer.num_val_iterations_per_epoch = int(val_iterations_per_epoch)
        if not resume:
            (self.fold_folder / BUDGET_FILE).unlink(missing_ok=True)
        maybe_load_checkpoint(trainer, continue_training=resume, validation_only=False)
        if budget_minutes is None:
            trainer.run_training()
        else:
            train_for_minutes(trainer, budget_minutes)
        return str(final)

    def predict(self, images: list[str], output_dir: str, use_mirroring: bool = True, tile_step_size: float = 0.5,
                checkpoint_name: str = "checkpoint_final.pth") -> list[str]:
        """nnU-Net's sliding-window prediction (gaussian, optional mirroring) of whole images; writes, per image,
        ``<stem>_prob.png`` (nucleus probability x 255, uint8) and ``<stem>_mask.png`` (argmax, 0/1) like the allinsam
        bundle's inference. Returns the mask files."""
        self._environment()
        print(f"nnU-Net prediction: mirroring {'on' if use_mirroring else 'off'}, tile step {tile_step_size}")
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                    perform_everything_on_device=self.device.type == "cuda", device=self.device,
                                    allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(self.model_folder), use_folds=(self.fold,),
                                                       checkpoint_name=checkpoint_name)
        preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
        output = Path(output_dir)
        output.mkdir(parents=True, exist_ok=True)
        masks = []
        for image in tqdm(images, desc="nnU-Net predict", unit="image"):
            data, _, properties = preprocessor.run_case([str(image)], None, predictor.plans_manager,
                                                        predictor.configuration_manager, predictor.dataset_json)
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
            segmentation, probabilities = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, predictor.plans_manager, predictor.configuration_manager, predictor.label_manager, properties,
                return_probabilities=True, num_threads_torch=self.num_processes)
            stem = Path(image).stem
            _write_png(np.asarray(probabilities[1, 0], dtype=np.float32), output / f"{stem}_prob.png", scale=255)
            _write_png(np.asarray(segmentation[0], dtype=np.uint8), output / f"{stem}_mask.png", scale=None)
            masks.append(str(output / f"{stem}_mask.png"))
        return masks


def _write_png(array: np.ndarray, path: Path, scale: int | None) -> None:
    """(H, W) array -> uint8 PNG with MONAI's ``PILWriter``, the writer and options of the allinsam bundle's
    ``SaveImaged`` (``scale=255``: [0, 1] -> 0..255), so both bundles' files are read the same way."""
    writer = PILWriter(output_dtype=np.uint8, scale=scale)
    writer.set_data_array(array[None], channel_dim=0)
    writer.write(str(path), verbose=False, reverse_indexing=False)
