"""``fgc-train eval CHECKPOINT``: top-1, gate density and MACs kept of a saved model, no bank.

Evaluation needs only the model: the gates are thresholded (``sigmoid(a) > 0.5``) and neither
feature nor gate bank takes part, so a checkpoint of an FGC run evaluates on a machine with no
bank server. The test set and model shape come from the config stored in the checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import click
from torch.utils.data import DataLoader

from trainer.checkpoint import load_checkpoint
from trainer.config import TrainConfig
from trainer.errors import TrainerError
from trainer.evaluate import EvalResult, evaluate


def evaluate_checkpoint(path: str | Path, data_root: str | None = None, device: str = "cpu",
                        batch_size: int = 256) -> EvalResult:
    """Rebuild the checkpoint's model, load its weights and evaluate it on its test set.

    Parameters
    ----------
    data_root : where the dataset is now, if not where the run read it.
    device : ``auto``, ``cpu`` or ``cuda[:N]``.
    """
    from trainer.builder import fit_model_to_data, load_weights
    from trainer.data import load_dataset
    from trainer.distributed import DistContext, pick_device
    from trainer.macs import profile_macs
    from trainer.models import build_model

    checkpoint = load_checkpoint(path)
    cfg = TrainConfig.from_dict(checkpoint.config)
    splits = load_dataset(cfg.data.dataset, data_root or cfg.data.root, cfg.data.synthetic_size,
                          cfg.run.seed, cfg.data.image_size)
    cfg = fit_model_to_data(cfg, splits)
    ctx = DistContext(0, 1, 0, pick_device(device, 0))
    model = build_model(cfg.model.arch, cfg.model.num_classes, cfg.model.in_channels, (),
                        cfg.model.gate_hidden, cfg.model.gate_tau).to(ctx.device)
    load_weights(model, checkpoint, cfg)
    loader = DataLoader(splits.test, batch_size=batch_size, shuffle=False)
    return evaluate(model, loader, profile_macs(model, splits.input_shape), ctx)


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--data-root", type=click.Path(file_okay=False),
              help="The dataset's directory, if it moved since the run.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N].")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def eval_command(checkpoint: str, data_root: str | None, device: str, batch_size: int,
                 as_json: bool) -> None:
    """Evaluate CHECKPOINT (checkpoint.pt or best.pt): top-1, gate density, MACs kept."""
    try:
        result = evaluate_checkpoint(checkpoint, data_root, device, batch_size)
    except TrainerError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(asdict(result), sort_keys=True))
    else:
        click.echo(f"{checkpoint}: {result.summary()}")
