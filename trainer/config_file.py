"""``--config FILE``: option values from a JSON or YAML file, and the resolved config written back.

A file holds either the sections of a resolved config (``{"optim": {"lr": 0.05}, ...}``, the
shape of the ``config.json`` every run writes into its directory, so a run's file starts another
run) or flat option names (``{"lr": 0.05, "batch_size": 64}``). Command-line options override the
file. YAML needs PyYAML (``.yaml``/``.yml``); JSON needs nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.errors import TrainerError

CONFIG_FILE = "config.json"  # the resolved config, written into every run directory
DERIVED = {("model", "num_classes"), ("model", "in_channels")}  # filled in from the dataset


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The file's mapping, or a TrainerError that says what is wrong with it."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TrainerError(f"--config {path}: cannot read it ({exc.strerror})") from None
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise TrainerError(f"--config {path}: YAML needs PyYAML (pip install pyyaml); or write "
                               "the file as JSON") from None
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise TrainerError(f"--config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    else:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainerError(f"--config {path} is not valid JSON ({exc}); YAML files must end "
                               "in .yaml or .yml") from None
    if not isinstance(raw, dict):
        raise TrainerError(f"--config {path} must hold a mapping of options, got {type(raw).__name__}")
    return raw


def option_values(raw: dict[str, Any], options: dict[str, tuple[str, str]], source: str) -> dict[str, Any]:
    """Map a config file's contents to click parameter names (``options``: param -> (section,
    field)). Unknown keys are an error, so a typo never passes silently."""
    by_field = {where: param for param, where in options.items()}
    sections = {section for section, _ in options.values()}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in sections and isinstance(value, dict):
            for name, inner in value.items():
                if (key, name) in DERIVED:
                    continue
                if (key, name) not in by_field:
                    raise TrainerError(f"--config {source}: unknown key {key}.{name}")
                values[by_field[(key, name)]] = inner
        elif key in options:
            values[key] = value
        else:
            raise TrainerError(f"--config {source}: unknown option {key!r}")
    return values


def write_config(out_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write the resolved config as ``OUT_DIR/config.json`` (what ``--config`` reads back)."""
    path = Path(out_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
