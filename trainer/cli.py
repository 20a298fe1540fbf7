"""``fgc-train`` / ``python -m trainer``: train a gated ResNet with BAS, then FGC.

Launch with ``torchrun --nproc_per_node N -m trainer ...`` for data parallelism (gloo on CPU,
nccl on GPU). Every option's default is FGC's published CIFAR-10 / ResNet-20 setting. This is the
only module that reads click options, builds the :class:`~trainer.config.TrainConfig` and
configures logging.

Resuming (``--resume``) restores the whole config from the checkpoint; options given on the
command line override it, except the shape-defining ones (model, dataset, contrasted blocks,
phase), which must agree. ``--init-from`` takes only the model (weights and shape) from a
checkpoint, typically BAS's, and starts the given phase at that checkpoint's epoch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click
from click.core import ParameterSource
from torch.distributed.elastic.multiprocessing.errors import record

from fgc_bank.errors import BankError
from trainer.builder import StartFrom
from trainer.checkpoint import check_run_dir, load_checkpoint
from trainer.config import DATASETS, PHASES, TrainConfig
from trainer.config_file import option_values, read_config_file, write_config
from trainer.errors import TrainerError, rank, record_for_torchrun
from trainer.models import ARCHS

logger = logging.getLogger(__name__)

# click parameter -> (config section, field). Defaults are read from the dataclasses.
OPTIONS: dict[str, tuple[str, str]] = {
    "arch": ("model", "arch"), "gate_hidden": ("model", "gate_hidden"),
    "gate_tau": ("model", "gate_tau"),
    "dataset": ("data", "dataset"), "data_root": ("data", "root"),
    "batch_size": ("data", "batch_size"), "workers": ("data", "workers"),
    "synthetic_size": ("data", "synthetic_size"), "image_size": ("data", "image_size"),
    "epochs": ("optim", "epochs"), "lr": ("optim", "lr"), "momentum": ("optim", "momentum"),
    "nesterov": ("optim", "nesterov"), "weight_decay": ("optim", "weight_decay"),
    "milestones": ("optim", "milestones"), "gamma": ("optim", "gamma"),
    "rho": ("gates", "rho"), "l0_start": ("gates", "l0_start"), "l0_end": ("gates", "l0_end"),
    "bs_weight": ("gates", "bs_weight"), "bs_end": ("gates", "bs_end"),
    "kappa": ("fgc", "kappa"), "nn_num": ("fgc", "nn_num"), "nn_epoch": ("fgc", "nn_epoch"),
    "contrast_blocks": ("fgc", "contrast_blocks"), "temperature": ("fgc", "temperature"),
    "bank_momentum": ("fgc", "bank_momentum"), "negatives": ("fgc", "negatives"),
    "bank": ("fgc", "bank"), "bank_prefix": ("fgc", "bank_prefix"),
    "bank_timeout": ("fgc", "bank_timeout"), "curve_secret": ("fgc", "curve_secret"),
    "curve_server": ("fgc", "curve_server"),
    "phase": ("run", "phase"), "out_dir": ("run", "out_dir"), "seed": ("run", "seed"),
    "device": ("run", "device"), "save_every": ("run", "save_every"),
    "max_steps": ("run", "max_steps"), "progress": ("run", "progress"),
    "save_feature_banks": ("run", "save_feature_banks"),
    "dump_gate_banks": ("run", "dump_gate_banks"), "tensorboard": ("run", "tensorboard"),
}
# Fields taken from the checkpoint and never from the command line: the model's shape with
# --init-from; that, the dataset, the contrasted blocks and the phase with --resume.
MODEL_FIELDS = {("model", f.name) for f in dataclasses.fields(TrainConfig().model)}
RESTORED_ON_RESUME = MODEL_FIELDS | {("data", "dataset"), ("fgc", "contrast_blocks"),
                                     ("run", "phase")}
_DEFAULTS = TrainConfig()


def _default(param: str) -> Any:
    if param == "contrast_blocks":  # empty: the --arch's own last two, filled in by TrainConfig
        return ()
    section, name = OPTIONS[param]
    return getattr(getattr(_DEFAULTS, section), name)


class IntList(click.ParamType):
    """Comma-separated integers, e.g. ``300,375,450``; empty for none."""

    name = "ints"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple | list):  # a list: from a --config file
            return tuple(int(v) for v in value)
        try:
            return tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers, e.g. 300,375,450",
                      param, ctx)


class SetupFailed(click.ClickException):
    """A bad input found before training: message printed, exit status 2."""

    exit_code = 2


def _opt(*decls: str, param: str, **kwargs: Any) -> Any:
    return click.option(*decls, param, default=_default(param), show_default=True, **kwargs)


@click.command(context_settings={"help_option_names": ["-h", "--help"],
                                 "max_content_width": 100})
@click.version_option(package_name="fgc-bank", prog_name="fgc-train")
@_opt("--phase", param="phase", type=click.Choice(PHASES),
      help="bas: batch-shaping baseline; fgc: gate contrastive loss with bank positives.")
@_opt("--arch", param="arch", type=click.Choice(ARCHS), help="Gated ResNet.")
@_opt("--dataset", param="dataset", type=click.Choice(DATASETS), help="Training data.")
@_opt("--data-root", param="data_root", type=click.Path(file_okay=False),
      help="Directory of cifar10 (cifar-10-batches-py) or imagefolder (train/, val/ class folders).")
@_opt("--epochs", param="epochs", type=click.IntRange(min=1),
      help="Total epochs, counted from the start of BAS.")
@_opt("--batch-size", param="batch_size", type=click.IntRange(min=2),
      help="Global batch size, split evenly over the ranks.")
@_opt("--lr", param="lr", type=click.FloatRange(min=0.0), help="Initial learning rate.")
@_opt("--milestones", param="milestones", type=IntList(),
      help="Epochs at which the lr is multiplied by --gamma (comma-separated).")
@_opt("--gamma", param="gamma", type=float, help="lr factor at each milestone.")
@_opt("--momentum", param="momentum", type=float, help="SGD momentum.")
@_opt("--nesterov/--no-nesterov", param="nesterov", help="Nesterov momentum.")
@_opt("--weight-decay", "--wd", param="weight_decay", type=click.FloatRange(min=0.0),
      help="Weight decay (never applied to gate parameters).")
@_opt("--rho", param="rho", type=click.FloatRange(min=0.0), help="L0 weight after the ramp.")
@_opt("--l0-start", param="l0_start", type=int, help="Epoch where the L0 ramp starts at 0.")
@_opt("--l0-end", param="l0_end", type=int, help="Epoch where the L0 weight reaches --rho.")
@_opt("--bs-weight", param="bs_weight", type=click.FloatRange(min=0.0),
      help="Batch-shaping weight at epoch 0 (BAS phase).")
@_opt("--bs-end", param="bs_end", type=click.IntRange(min=1),
      help="Epoch where the batch-shaping weight has decayed to 0.")
@_opt("--kappa", param="kappa", type=click.FloatRange(min=0.0),
      help="Weight of the gate contrastive loss (FGC phase).")
@_opt("--nn-num", param="nn_num", type=click.IntRange(min=1),
      help="k: feature-bank neighbours added to each instance's positives.")
@_opt("--nn-epoch", param="nn_epoch", type=click.IntRange(min=0),
      help="Warm-up epochs at the start of FGC with self-only positives.")
@_opt("--contrast-blocks", param="contrast_blocks", type=IntList(),
      help="Indices (from 0) of the gated blocks to contrast; by default the architecture's last "
           "two: resnet20 7,8 (as published), resnet32 13,14, resnet56 25,26, resnet18 6,7, resnet34 14,15.")
@_opt("--temperature", param="temperature", type=click.FloatRange(min=0.0, min_open=True),
      help="T of the gate contrastive softmax.")
@_opt("--bank-momentum", param="bank_momentum", type=click.FloatRange(0.0, 1.0, max_open=True),
      help="Momentum m of both banks' updates.")
@_opt("--negatives", param="negatives", type=click.IntRange(min=0),
      help="0: exact gate loss over the whole gate bank; M>0: APPROXIMATION from M sampled rows.")
@_opt("--bank", param="bank", type=str,
      help="Feature-bank address: local:// (in-process, one rank) or tcp://HOST:PORT.")
@_opt("--bank-prefix", param="bank_prefix", type=str,
      help="Bank names are PREFIX/BLOCK; change it to start fresh banks on a running server.")
@_opt("--bank-timeout", param="bank_timeout", type=click.FloatRange(min=0.0, min_open=True),
      help="Seconds a bank call may take before it fails.")
@_opt("--curve-secret", param="curve_secret", type=click.Path(dir_okay=False),
      help="CURVE: this client's secret key file (from `fgc-bank keys`), for a server started "
           "with --curve-secret.")
@_opt("--curve-server", param="curve_server", type=click.Path(dir_okay=False),
      help="CURVE: the bank server's public key file.")
@_opt("--gate-tau", param="gate_tau", type=click.FloatRange(min=0.0, min_open=True),
      help="Gumbel-sigmoid temperature of the gates.")
@_opt("--gate-hidden", param="gate_hidden", type=click.IntRange(min=1),
      help="Hidden width of each gate MLP.")
@_opt("--out-dir", param="out_dir", type=click.Path(file_okay=False),
      help="Where checkpoint.pt, best.pt and metrics.jsonl go; refused if it holds a run "
           "(unless --resume).")
@_opt("--seed", param="seed", type=int, help="Seed of weights, sampling and bank init.")
@_opt("--device", param="device", type=str, help="auto, cpu or cuda.")
@_opt("--workers", param="workers", type=click.IntRange(min=0),
      help="DataLoader worker processes per rank.")
@_opt("--synthetic-size", param="synthetic_size", type=click.IntRange(min=16),
      help="Training examples of --dataset synthetic.")
@_opt("--image-size", param="image_size", type=click.IntRange(min=8),
      help="imagefolder: side of the square crops (ImageNet: 224).")
@_opt("--save-every", param="save_every", type=click.IntRange(min=1),
      help="Epochs between checkpoints (the last epoch is always saved).")
@_opt("--max-steps", param="max_steps", type=click.IntRange(min=0),
      help="Cap on training steps per epoch (0: none); for smoke runs.")
@_opt("--progress/--no-progress", param="progress", help="tqdm progress bars on rank 0.")
@_opt("--save-feature-banks/--no-save-feature-banks", param="save_feature_banks",
      help="Copy the feature banks' rows into checkpoints when the bank server keeps no snapshots "
           "(with --snapshot-dir the checkpoint records a paired snapshot instead).")
@_opt("--dump-gate-banks/--no-dump-gate-banks", param="dump_gate_banks",
      help="At the end, each rank saves its gate bank to OUT_DIR/gate_bank.rankR.pt.")
@_opt("--tensorboard/--no-tensorboard", param="tensorboard",
      help="Also log the epoch records to OUT_DIR/tensorboard (needs the tensorboard package).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), is_eager=True,
              callback=lambda ctx, param, value: _apply_config_file(ctx, value), expose_value=False,
              help="Option values from a JSON or YAML file (e.g. a run's config.json); options "
                   "given on the command line win.")
@click.option("--print-config", is_flag=True,
              help="Print the resolved config as JSON and exit without training.")
@click.option("--resume", type=click.Path(dir_okay=False),
              help="Continue the run saved in this checkpoint.")
@click.option("--init-from", type=click.Path(dir_okay=False),
              help="Start from this checkpoint's weights (e.g. BAS's, to start FGC).")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING"]), default="INFO",
              show_default=True, help="Log level on rank 0 (other ranks log warnings only).")
@click.pass_context
def train(ctx: click.Context, resume: str | None, init_from: str | None, log_level: str,
          print_config: bool, **options: Any) -> None:
    """Train a gated ResNet: the BAS phase, or FGC with feature-bank positives.

    `fgc-train eval CHECKPOINT` evaluates a saved model (top-1, gate density, MACs kept) with no
    bank. A new run refuses an --out-dir that already holds one; --resume continues it.
    """
    setup_logging(log_level if rank() == 0 else "WARNING", rank())
    explicit = {name for name in OPTIONS if ctx.get_parameter_source(name) in
                (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.DEFAULT_MAP)}
    try:
        cfg, start = resolve_config(options, explicit, resume, init_from)
        if print_config:
            click.echo(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
            return
        if not resume:
            check_run_dir(cfg.run.out_dir)
        run(cfg, start)
    except TrainerError as exc:
        fail(ctx, str(exc), SetupFailed.exit_code)
    except BankError as exc:  # a bank call failed mid-run (server gone, timeout, ...)
        fail(ctx, f"bank error: {exc}", 1)


def fail(ctx: click.Context, message: str, code: int) -> NoReturn:
    """End the run with one line from rank 0 (no traceback) and a non-zero status on every rank;
    the message also goes to torchrun's failure summary. Other ranks stay quiet: the same
    error on N ranks would otherwise print N times."""
    record_for_torchrun(message)
    if rank() == 0:
        error = click.ClickException(message)
        error.exit_code = code
        raise error
    ctx.exit(code)


def _apply_config_file(ctx: click.Context, path: str | None) -> None:
    """``--config``: the file's values become the options' defaults (the command line wins)."""
    if path is None:
        return
    try:
        values = option_values(read_config_file(path), OPTIONS, path)
    except TrainerError as exc:
        fail(ctx, str(exc), SetupFailed.exit_code)
    ctx.default_map = {**(ctx.default_map or {}), **values}


def config_from_options(options: dict[str, Any]) -> TrainConfig:
    """The click options as a validated TrainConfig."""
    sections: dict[str, dict[str, Any]] = {}
    for param, (section, name) in OPTIONS.items():
        sections.setdefault(section, {})[name] = options[param]
    return TrainConfig.from_dict(sections)


def resolve_config(options: dict[str, Any], explicit: set[str], resume: str | None,
                   init_from: str | None) -> tuple[TrainConfig, StartFrom | None]:
    """Merge the command line with a checkpoint's config (see the module docstring)."""
    if resume and init_from:
        raise TrainerError("--resume continues a run, --init-from starts a new one from its "
                           "weights: give one of them")
    cfg = config_from_options(options)
    if not (resume or init_from):
        return cfg, None
    checkpoint = load_checkpoint(resume or init_from)
    saved = TrainConfig.from_dict(checkpoint.config)
    restored = RESTORED_ON_RESUME if resume else MODEL_FIELDS
    base = saved if resume else cfg
    for section, name in restored:
        base = base.replace(section, **{name: getattr(getattr(saved, section), name)})
    if not resume and "contrast_blocks" not in explicit:  # the restored --arch's own default
        base = base.replace("fgc", contrast_blocks=())
    for param in explicit:
        section, name = OPTIONS[param]
        value, kept = getattr(getattr(cfg, section), name), getattr(getattr(base, section), name)
        if (section, name) in restored and value != kept:
            raise TrainerError(f"--{param.replace('_', '-')} {value} conflicts with the "
                               f"checkpoint {resume or init_from}, which has {kept}; drop the "
                               "option or use a checkpoint of that configuration")
        base = base.replace(section, **{name: value})
    return base, StartFrom(checkpoint, resume=bool(resume), path=str(Path(resume or init_from).resolve()))


def run(cfg: TrainConfig, start: StartFrom | None) -> None:
    """Join the process group, build the trainer, train, print the evaluation (rank 0)."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from trainer.builder import build_trainer
    from trainer.distributed import init_distributed, shutdown
    from trainer.plot import plot_run

    ctx = init_distributed(cfg.run.device)
    try:
        trainer = build_trainer(cfg, ctx, start)
        if ctx.is_main:
            write_config(cfg.run.out_dir, trainer.cfg.to_dict())  # as resolved: --config reads it back
        if ctx.is_main:
            logger.info("training %s (%s phase) on %s, epochs %d..%d, %d rank(s), bank %s",
                        cfg.model.arch, cfg.run.phase, cfg.data.dataset, trainer.start_epoch,
                        cfg.optim.epochs - 1, ctx.world_size,
                        cfg.fgc.bank if trainer.banks else "none")
        with logging_redirect_tqdm():
            result = trainer.fit()
        if ctx.is_main:
            click.echo(f"final: {result.summary()}")
            plotted = plot_run(cfg.run.out_dir)
            if plotted is not None:
                logger.info("plot of the run: %s", plotted)
        if trainer.banks is not None:
            trainer.banks.features.client.close()
    finally:
        shutdown()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(level: str, rank: int) -> None:
    """One stderr handler, tagged with the rank (only the CLI configures logging)."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level), handlers=[handler], force=True)


@record  # torchrun's summary: an unexpected exception's traceback; our own errors, their one line
def main() -> None:
    """Console-script entry point: ``fgc-train [OPTIONS]`` trains, ``fgc-train eval CHECKPOINT``
    evaluates (a subcommand in front of the training options, which stay where they were)."""
    if sys.argv[1:2] == ["eval"]:
        from trainer.eval_cli import eval_command

        eval_command(args=sys.argv[2:], prog_name="fgc-train eval", auto_envvar_prefix="FGC_TRAIN_EVAL")
    else:
        train(auto_envvar_prefix="FGC_TRAIN")


if __name__ == "__main__":
    main()
