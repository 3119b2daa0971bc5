"""Command-line entry points: ``lathe train``, ``lathe tokenizer train``, ``lathe config-docs``.

Bad input ends here as one line on stderr naming the option and the fix, exit code 2, no
traceback. A run that fails while training (non-finite loss) exits with code 3.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lathe.errors import ConfigError

EXIT_CONFIG_ERROR = 2
EXIT_TRAINING_ERROR = 3

USAGE = """usage: lathe COMMAND [options]

commands:
  train        train a model (lathe train --help lists every option)
  launch       torchrun with clean exit codes, preemption and restarts (lathe launch --help)
  slurm        write or submit a Slurm batch script for a run (lathe slurm --help)
  tokenizer    tokenizer tools (lathe tokenizer train --help)
  convert      lathe checkpoints <-> Hugging Face safetensors (lathe convert --help)
  seed-checkpoint  write initial weights (step-0) on one process, then exit
  estimate     memory per rank of a config on N GPUs, measured on fake tensors (lathe estimate --help)
  plan         rank the layouts of a config for a cluster by predicted speed (lathe plan --help)
  config-docs  print the config reference as Markdown (docs/config.md)
"""


def setup_logging() -> None:
    # No rank prefix here: torchrun's --tee (scripts/run_train.sh) prefixes each line with its rank.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def cmd_train(argv: list[str]) -> int:
    from lathe import config as config_lib

    if "-h" in argv or "--help" in argv:
        print("usage: lathe train [--config FILE] [--print-config] [--section.key VALUE ...]\n")
        print(config_lib.help_text())
        return 0
    cfg, print_config = config_lib.load_config(argv)
    if print_config:
        print(config_lib.to_toml(cfg), end="")
        return 0
    if cfg.memory_estimation.enabled:  # torchtitan's switch: estimate for $WORLD_SIZE ranks instead
        return cmd_estimate([*argv, "--world-size", os.environ.get("WORLD_SIZE", "1")])
    setup_logging()
    from lathe import launch
    from lathe.checkpoint.preemption import Preempted
    from lathe.parallel import distributed
    from lathe.trainer import TrainingError, train  # heavy imports only when training

    if "LOCAL_RANK" in os.environ:  # a torchrun worker: never outlive the launcher
        launch.die_with_parent()
    code = 0
    try:
        train(cfg)
    except TrainingError as e:
        print(f"lathe: error: {e}", file=sys.stderr)
        code = EXIT_TRAINING_ERROR
    except Preempted as e:
        code = launch.worker_preempted()
        logging.getLogger("lathe").warning("%s (exit code %d)", e, code)
    except ConfigError as e:
        handed_over = launch.worker_config_error(e)
        if distributed.world_size() == 1 and not handed_over:
            raise  # main() prints the one line
        if not handed_over:
            print(f"lathe: error: {e}", file=sys.stderr)
        # Other ranks may be inside a collective: leave now, without a barrier. torchrun (or
        # `lathe launch`, which prints this rank's line once) ends the rest.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_CONFIG_ERROR)
    if distributed.world_size() > 1:
        distributed.finish(code)  # tears down the process group and exits; see its docstring
    return code


def cmd_tokenizer(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lathe tokenizer")
    sub = parser.add_subparsers(dest="action", required=True)
    tr = sub.add_parser("train", help="train a byte-level BPE tokenizer (Hugging Face tokenizers)")
    tr.add_argument("files", nargs="*", help="text or jsonl files; default: the embedded corpus")
    tr.add_argument("--vocab-size", type=int, default=4096)
    tr.add_argument("--output", required=True, help="where to write tokenizer.json")
    dl = sub.add_parser("download", help="fetch a tokenizer file from the Hugging Face Hub")
    dl.add_argument("repo_id", help="e.g. meta-llama/Meta-Llama-3.1-8B")
    dl.add_argument("--filename", default="tokenizer.json", help="Llama 3: original/tokenizer.model")
    dl.add_argument("--local-dir", default="tokenizers")
    dl.add_argument("--hf-token", default=None, help="default: $HF_TOKEN or the saved login")
    args = parser.parse_args(argv)
    if args.action == "download":
        from lathe.data.tokenizer import download_tokenizer

        print(f"wrote {download_tokenizer(args.repo_id, args.filename, args.local_dir, args.hf_token)}")
        return 0
    from pathlib import Path

    from lathe.data.corpus import build_corpus
    from lathe.data.tokenizer import train_tokenizer

    setup_logging()
    files = [Path(f) for f in args.files]
    for f in files:
        if not f.is_file():
            raise ConfigError("files", "file not found", "check the path", str(f))
    if args.vocab_size < 300:
        raise ConfigError("--vocab-size", "must be at least 300 (256 bytes + special tokens + merges)",
                          "e.g. 4096", args.vocab_size)
    if not files:
        files = [build_corpus().train]
    out = train_tokenizer(files, args.vocab_size, Path(args.output))
    print(f"wrote {out}")
    return 0


def cmd_convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lathe convert", description="Hugging Face safetensors <-> lathe checkpoints")
    parser.add_argument("direction", choices=("lathe-to-hf", "hf-to-lathe"))
    parser.add_argument("source", help="a lathe step-N folder, or a Hugging Face model folder")
    parser.add_argument("output", help="output folder")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="lathe-to-hf: dtype of the written weights")
    args = parser.parse_args(argv)
    setup_logging()
    from lathe.checkpoint.hf import hf_to_lathe, lathe_to_hf

    if args.direction == "lathe-to-hf":
        out = lathe_to_hf(args.source, args.output, args.dtype)
    else:
        out = hf_to_lathe(args.source, args.output)
    print(f"wrote {out}")
    return 0


def cmd_seed_checkpoint(argv: list[str]) -> int:
    """``lathe seed-checkpoint [train options]``: write step-0 weights on one process and exit."""
    return cmd_train([*argv, "--checkpoint.enable_checkpoint", "--checkpoint.create_seed_checkpoint"])


def cmd_config_docs(argv: list[str]) -> int:
    from lathe.config import markdown_reference

    print(markdown_reference(), end="")
    return 0


def cmd_estimate(argv: list[str]) -> int:
    """``lathe estimate [train options] --world-size N [--device NAME] [--json]`` (lathe/estimate.py)."""
    from lathe.estimate import main as estimate_main

    setup_logging()
    logging.getLogger("lathe").setLevel(logging.WARNING)  # the report is the output
    # torch's advice on a simulated run (sequential all-reduces of a 2-D grad norm) is noise here
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    return estimate_main(argv)


def cmd_plan(argv: list[str]) -> int:
    """``lathe plan [train options] --nodes N --gpus-per-node G --device NAME [--json]`` (lathe/plan.py)."""
    from lathe.plan import main as plan_main

    setup_logging()
    logging.getLogger("lathe").setLevel(logging.WARNING)
    return plan_main(argv)


def cmd_launch(argv: list[str]) -> int:
    """``lathe launch [torchrun options] -- [train options]`` (see lathe/launch.py)."""
    from lathe.launch import main as launch_main

    return launch_main(argv)


def cmd_slurm(argv: list[str]) -> int:
    """``lathe slurm [options] -- [train options]``: write (and submit) an sbatch script."""
    from lathe.slurm import main as slurm_main

    return slurm_main(argv)


COMMANDS = {"train": cmd_train, "launch": cmd_launch, "slurm": cmd_slurm, "tokenizer": cmd_tokenizer, "convert": cmd_convert,
            "seed-checkpoint": cmd_seed_checkpoint, "config-docs": cmd_config_docs, "estimate": cmd_estimate,
            "plan": cmd_plan}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else EXIT_CONFIG_ERROR
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"lathe: error: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr, end="")
        return EXIT_CONFIG_ERROR
    try:
        return command(argv[1:])
    except ConfigError as e:
        print(f"lathe: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except BrokenPipeError:  # e.g. `lathe train --help | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
