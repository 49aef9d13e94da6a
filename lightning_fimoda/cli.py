"""The ``fimoda`` command line, and the YAML schema shared with LightningCLI and the plugin.

Commands::

    fimoda run CONFIG.yaml [--trainer.max_epochs=3 ...]      # train, attribute, gold standard, report
    fimoda attribute --checkpoint CKPT --config CONFIG.yaml  # an existing model (final-model-only)
    fimoda run CONFIG.yaml --fimoda.gold.seeds=4             # one key of the gold block, the rest kept
    fimoda report RUN_DIR                                    # re-render report.md and figures
    fimoda verify GOLD_RUN_DIR                               # checksums, fingerprint, what a resume recomputes

Configuration (a LightningCLI config with one extra section, ``fimoda``; parsed with jsonargparse,
so every key is type-checked and ``--key=value`` overrides work)::

    seed_everything: 0                      # global seed before the model is built
    trainer:                                # lightning.pytorch.Trainer arguments
      max_epochs: 200
      accelerator: cpu
      logger:                               # default: TensorBoardLogger under default_root_dir
        class_path: lightning.pytorch.loggers.TensorBoardLogger
        init_args: {save_dir: runs, name: diabetes}
    model:                                  # any LightningModule; it should define attribution_task()
      class_path: lightning_fimoda.zoo.models.MLP
      init_args: {...}
    data:                                   # any LightningDataModule exposing train_dataset / test_dataset
      class_path: lightning_fimoda.zoo.data.DiabetesDataModule
      init_args: {...}
    fimoda:                                 # FiMODACallback arguments
      estimators:                           # names, or {name: ..., <estimator arguments>}
        - grad_dot
        - {name: grad_cos, label: cosine}
      num_train: 100                        # or train_indices: [...]; also the leave-one-out set
      num_test: 50                          # or test_indices: [...]
      seed: 0                               # seed of those random choices
      task:                                 # optional: default is model.attribution_task()
        class_path: lightning_fimoda.SupervisedTask
        init_args: {loss: mse}
      gold:                                 # FurtherTrainingLoop arguments (the task comes from the model)
        optimizer: sgd                      # sgd | adam | adamw
        lr: 0.03
        epochs: 10                          # or steps: ...
        batch_size: 128
        seeds: 10
        eval_every: epoch
        adjustments: [mean, full]
      output_dir: null                      # default: <trainer.log_dir>/fimoda
      log: true
      plots: true
      mislabeled: null                      # training indices with flipped labels (AUC)
      seed_ks: null                         # seed-averaging group sizes

The same ``fimoda`` section configures the Lightning plugin (:mod:`lightning_fimoda.plugin`). Inside a
plain LightningCLI config, put the same arguments under ``trainer.callbacks`` with
``class_path: lightning_fimoda.FiMODACallback``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from ._quiet import quiet_attribution
from .callback import FiMODACallback
from .evaluation.report import AttributionReport
from .exceptions import FiMODAError
from .further_training.verify import add_verify_command, run_verify

__all__ = ["FiMODACLI", "callback_from_config", "main"]

SECTION = "fimoda"


class FiMODACLI(LightningCLI):
    """``LightningCLI`` with a ``fimoda`` section whose arguments build a :class:`FiMODACallback`."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_lightning_class_args(FiMODACallback, SECTION)

    def before_instantiate_classes(self) -> None:
        """A model whose ``input_dim`` is ``null`` gets the datamodule's ``input_dim`` (the number of
        features after encoding), read from the data before anything trains; a datamodule that cannot
        load its data fails here, with its own message."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        model, data = config.get("model"), config.get("data")
        args = getattr(model, "init_args", None)
        if args is None or "input_dim" not in args or args.input_dim is not None or data is None:
            return
        module, _, name = data.class_path.rpartition(".")
        datamodule = getattr(importlib.import_module(module), name)(**vars(data.init_args))
        args.input_dim = datamodule.input_dim


def _make_cli(args: Sequence[str], *, save_config: bool) -> FiMODACLI:
    argv, sys.argv = sys.argv, sys.argv[:1]  # the arguments are passed explicitly, not read from argv
    try:
        with quiet_attribution():
            return FiMODACLI(
                args=merge_gold_overrides(list(args)),
                run=False,
                save_config_callback=SaveConfigCallback if save_config else None,
                save_config_kwargs={"overwrite": True},
            )
    finally:
        sys.argv = argv


def _gold_from_config(args: Sequence[str]) -> dict[str, Any]:
    """The ``fimoda.gold`` mapping of the last ``--config`` file in ``args`` (empty if none)."""
    configs = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    configs += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    if not configs or not Path(configs[-1]).is_file():
        return {}
    content = yaml.safe_load(Path(configs[-1]).read_text()) or {}
    gold = (content.get(SECTION) or {}).get("gold") if isinstance(content, Mapping) else None
    return dict(gold) if isinstance(gold, Mapping) else {}


def merge_gold_overrides(args: list[str]) -> list[str]:
    """Turn ``--fimoda.gold.KEY=VALUE`` (or ``--fimoda.gold.KEY VALUE``) into one ``--fimoda.gold=...``
    holding the configured ``gold`` mapping with just those keys changed (``gold`` is a free-form
    mapping, so the parser alone would replace the whole block). Values are parsed as YAML."""
    prefix = f"--{SECTION}.gold."
    base, changes, rest, i = None, {}, [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(prefix):
            key, has_value, value = arg[len(prefix):].partition("=")
            if not has_value:
                i += 1
                value = args[i] if i < len(args) else ""
            changes[key] = yaml.safe_load(value)
        elif arg.startswith(f"--{SECTION}.gold="):
            base = yaml.safe_load(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if not changes:
        return args if base is None else [*rest, f"--{SECTION}.gold={json.dumps(base)}"]
    gold = dict(base) if isinstance(base, Mapping) else _gold_from_config(rest)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        target = gold
        for name in parents:
            target = target.setdefault(name, {})
        target[leaf] = value
    return [*rest, f"--{SECTION}.gold={json.dumps(gold)}"]


def fimoda_callback(cli: LightningCLI) -> FiMODACallback:
    """The :class:`FiMODACallback` the CLI attached to its trainer."""
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, FiMODACallback)]
    if len(found) != 1:
        raise RuntimeError(f"Expected one FiMODACallback on the trainer, found {len(found)}.")
    return found[0]


def callback_from_config(path: str | Path) -> FiMODACallback:
    """A :class:`FiMODACallback` from a YAML file: its ``fimoda`` section, or the whole file if absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FiMODA configuration file not found: {path}")
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, Mapping):
        raise ValueError(f"{path}: expected a YAML mapping of FiMODACallback arguments.")
    section = content.get(SECTION, content)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FiMODACallback, SECTION, fail_untyped=False)
    cfg = parser.parse_object({SECTION: dict(section or {})})
    return parser.instantiate_classes(cfg)[SECTION]


def _load_weights(model: torch.nn.Module, checkpoint: str | Path) -> dict[str, Any]:
    """Load ``checkpoint`` into ``model``; returns what it says about the training (for the report)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    # A Lightning checkpoint holds more than tensors (hyperparameters, loop state): trusted files only,
    # as with LightningModule.load_from_checkpoint.
    state = torch.load(path, map_location="cpu", weights_only=False)
    facts: dict[str, Any] = {"checkpoint": str(path.resolve())}
    if isinstance(state, Mapping) and "state_dict" in state:
        facts.update(_trained_so_far(state))
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds neither a Lightning checkpoint nor a state_dict.")
    model.load_state_dict(state)
    return facts


def _trained_so_far(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """Epochs and steps trained when a Lightning checkpoint was saved (epochs: the fit loop's count of
    finished epochs, else the epoch number it was saved in)."""
    try:
        epochs = int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError):
        epochs = int(ckpt.get("epoch", 0))
    return {"trained_epochs": epochs, "trained_steps": int(ckpt.get("global_step", 0))}


def run(config: str, overrides: Sequence[str] = ()) -> AttributionReport | None:
    """``fimoda run``: fit the configured model with the FiMODA callback attached."""
    cli = _make_cli(["--config", config, *overrides], save_config=True)
    with quiet_attribution():
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return fimoda_callback(cli).report


def attribute(checkpoint: str, config: str, overrides: Sequence[str] = ()) -> AttributionReport | None:
    """``fimoda attribute``: attribute the model in ``checkpoint`` without training it."""
    cli = _make_cli(["--config", config, *overrides], save_config=False)
    facts = _load_weights(cli.model, checkpoint)
    dm = cli.datamodule
    if dm is not None:
        dm.prepare_data()
        dm.setup("fit")
    return fimoda_callback(cli).attribute(cli.trainer, cli.model, datamodule=dm, info=facts)


def rerender(run_dir: str | Path) -> AttributionReport:
    """``fimoda report``: load the report in ``run_dir``; rewrite ``report.md`` and the PNG figures."""
    from .evaluation.plotting import render_figures, save_figures

    report = AttributionReport.load(run_dir)
    report.write_markdown(run_dir)
    save_figures(render_figures(report), run_dir)
    return report


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fimoda",
        description="Final-model-only data attribution with Lightning.",
        epilog="Extra --key=value arguments (e.g. --trainer.max_epochs=5 --fimoda.num_train=50) override the "
        "YAML configuration; --print_config prints the complete configuration. Schema: "
        "python -m pydoc lightning_fimoda.cli",
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train, attribute, run the gold standard and write the report")
    r.add_argument("config", help="YAML configuration (see `python -m pydoc lightning_fimoda.cli`)")
    a = sub.add_parser("attribute", help="attribute an existing checkpoint (no training)")
    a.add_argument("--checkpoint", required=True, help="Lightning .ckpt or a state_dict file")
    a.add_argument("--config", required=True, help="YAML configuration naming the model and data")
    rep = sub.add_parser("report", help="re-render report.md and figures from a saved report")
    rep.add_argument("run_dir", help="directory holding report.json (the callback's output_dir)")
    add_verify_command(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fimoda`` command; extra ``--key=value`` arguments override the config."""
    args, overrides = _parser().parse_known_args(argv)
    if args.command == "verify":
        return run_verify(args)
    if args.command == "report":
        if overrides:
            raise SystemExit(f"fimoda report: unexpected arguments {overrides}")
        report = rerender(args.run_dir)
        print(report.summary())
        print(f"Re-rendered {Path(args.run_dir) / 'report.md'} and figures.")
        return 0
    try:
        if args.command == "run":
            run(args.config, overrides)
        else:
            attribute(args.checkpoint, args.config, overrides)
    except (FiMODAError, FileNotFoundError) as err:  # the user's input or set-up, said in one line
        print(f"fimoda {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
