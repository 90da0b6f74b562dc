"""Cost of the bundle machinery: one training step of ``train.json``'s SupervisedTrainer vs a plain torch loop.

    python scripts/bench_train_step.py --steps 12

Both loops train the same AllInSamNet (LiteMedSAM + SAM-Adapter) with the same loss and optimizer on the same
sample crops (batch 1, 256 px). The plain loop gets its batches ready-made in memory; the trainer loads,
augments and collates them and runs its handlers (loss logging, LR schedule, progress bar, epoch checkpoint).
Prints the median seconds per step of each (first steps dropped as warm-up) and their ratio. Run it alone:
two torch jobs on two cores slow each other down.
"""

import statistics
import tempfile
import time
from pathlib import Path

import fire
import torch

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "allinsam"
import bundle_path  # noqa: E402, F401  (puts the bundle's scripts package on sys.path)


def _train_workflow(ckpt_dir: str, epochs: int, trainable: str):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "train.json"), workflow_type="train",
                              epochs=epochs, val_interval=epochs + 1, batch_size=1, trainable=trainable,
                              ckpt_dir=ckpt_dir, output_dir=ckpt_dir, resume=False)
    workflow.initialize()
    return workflow


def main(steps: int = 12, warmup: int = 2, threads: int | None = None, trainable: str = "adapter") -> dict:
    """``trainable``: a recipe that trains on images (``adapter`` or ``full``; the cached recipes' steps are not
    comparable with a plain loop over images)."""
    if trainable not in ("adapter", "full"):
        raise ValueError(f"trainable must be 'adapter' or 'full' (recipes that train on images), got {trainable!r}")
    if threads:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as work:
        # bundle: SupervisedTrainer from train.json (2 training crops -> 2 steps per epoch)
        workflow = _train_workflow(work, epochs=(steps + warmup + 1) // 2, trainable=trainable)
        trainer = workflow.parser.get_parsed_content("train#trainer")
        stamps = []
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: stamps.append(time.perf_counter()))
        trainer.add_event_handler(Events.ITERATION_STARTED,
                                  lambda engine: (stamps.append(time.perf_counter())
                                                  if engine.state.iteration == 1 else None))
        workflow.run()
        bundle_steps = [b - a for a, b in zip(stamps[:-1], stamps[1:])][warmup:]

        # plain torch: the same network class, loss and optimizer, batches prepared beforehand
        network = workflow.parser.get_parsed_content("network_def", instantiate=True).to("cpu").train()
        loss_function = workflow.parser.get_parsed_content("loss")
        optimizer = torch.optim.AdamW([p for p in network.parameters() if p.requires_grad], lr=2e-4)
        batches = [(item["image"][None], item["label"][None]) for item in
                   (workflow.parser.get_parsed_content("train#dataset")[i][0] for i in range(2))]
        plain_steps = []
        for step in range(steps + warmup):
            image, label = batches[step % len(batches)]
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = loss_function(network(image), label)
            loss.backward()
            optimizer.step()
            plain_steps.append(time.perf_counter() - start)
        plain_steps = plain_steps[warmup:]
    bundle, plain = statistics.median(bundle_steps), statistics.median(plain_steps)
    print(f"threads {torch.get_num_threads()}, {len(bundle_steps)} bundle / {len(plain_steps)} plain steps measured")
    print(f"SupervisedTrainer (train.json): {bundle:.2f} s/step (median)")
    print(f"plain torch loop:               {plain:.2f} s/step (median)")
    print(f"ratio bundle / plain:           {bundle / plain:.3f}")
    return {"bundle_s": bundle, "plain_s": plain, "ratio": bundle / plain}


if __name__ == "__main__":
    fire.Fire(main, serialize=lambda result: None)
