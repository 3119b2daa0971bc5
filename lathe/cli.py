"""Command-line entry points: ``lathe train``, ``tokenizer``, ``convert``, ``plot``, ``compare``, ``replay``, ...

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
  data         tokenize a corpus once into Megatron .bin/.idx shards (lathe data prepare --help)
  convert      lathe checkpoints <-> Hugging Face safetensors (lathe convert --help)
  seed-checkpoint  write initial weights (step-0) on one process, then exit
  plot         loss curves of one or several runs as PNG/SVG (lathe plot --help)
  compare      are two runs the same? per-step differences, exit 1 if not (lathe compare --help)
  replay       rerun a run from its run.json manifest (lathe replay --help)
  estimate     memory per rank of a config on N GPUs, measured on fake tensors (lathe estimate --help)
  plan         rank the layouts of a config for a cluster by predicted speed (lathe plan --help)
  config-docs  print the config reference as Markdown (docs/config.md)
"""


def setup_logging() -> None:
    """INFO from the ranks in ``LOG_RANK`` (global ranks, comma-separated; default 0), warnings and
    errors from every rank, so a multi-node job's log holds one copy of the step lines.
    No rank prefix here: torchrun's --tee (scripts/run_train.sh) prefixes each line with its rank."""
    shown = {r.strip() for r in os.environ.get("LOG_RANK", "0").split(",")}
    level = logging.INFO if os.environ.get("RANK", "0") in shown else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)


def cmd_train(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        from lathe import config as config_lib

        print("usage: lathe train [--config FILE] [--print-config] [--section.key VALUE ...]\n")
        print(config_lib.help_text())
        return 0
    from lathe.checkpoint import preemption

    preemption.pause_point("before-handlers")
    installed = preemption.install()  # first: a preemption signal from now on is never lost
    try:
        return _cmd_train(argv)
    finally:
        if installed:
            preemption.uninstall()


def _cmd_train(argv: list[str]) -> int:
    from lathe import config as config_lib
    from lathe.checkpoint import preemption

    preemption.pause_point("start")
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
        signum = preemption.requested()
        if signum is not None:  # after the last step: the run is complete, the signal still answered
            code = launch.worker_preempted(cfg.training.steps, saved=True)
            logging.getLogger("lathe").warning("received a preemption signal after the last step: the run is "
                                               "complete; exiting %s", _preempted_exit(code))
    except TrainingError as e:
        print(f"lathe: error: {e}", file=sys.stderr)
        code = EXIT_TRAINING_ERROR
    except Preempted as e:
        code = launch.worker_preempted(e.step, e.saved)
        logging.getLogger("lathe").warning("%s; exiting %s", e, _preempted_exit(code))
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


def _preempted_exit(code: int) -> str:
    if code == 0:  # a worker under lathe launch: a non-zero exit would make torchrun restart the group
        return "with code 0 to lathe launch, which exits 75 (preempted)"
    return f"with code {code} (preempted)"


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
    empty = [f for f in files if not _has_text(f)]
    if files and len(empty) == len(files):
        raise ConfigError("files", f"no text to train on: {', '.join(map(str, files[:5]))} "
                          f"{'holds' if len(files) == 1 else 'hold'} none (empty, only whitespace, or empty documents)",
                          "give files that hold text: .txt, or .jsonl with a text field")
    if empty:
        logging.getLogger("lathe").warning("tokenizer: %d of %d files hold no text and add nothing: %s", len(empty),
                                           len(files), ", ".join(map(str, empty[:5])))
    if not files:
        files = [build_corpus().train]
    try:
        out = train_tokenizer(files, args.vocab_size, Path(args.output))
    except UnicodeDecodeError as e:
        raise ConfigError("files", f"not UTF-8 text ({e.reason} at byte {e.start})",
                          "convert the files to UTF-8, e.g. with iconv -f latin1 -t utf-8") from None
    print(f"wrote {out}")
    return 0


def _has_text(path) -> bool:
    """Whether a tokenizer training file holds any non-whitespace text (reading only as far as
    the first); a file that is not UTF-8 is a ConfigError."""
    from lathe.data.tokenizer import _iter_training_texts

    try:
        if path.suffix == ".jsonl":
            return any(text.strip() for text in _iter_training_texts([path]))
        with path.open(encoding="utf-8") as fh:
            while chunk := fh.read(1 << 20):
                if chunk.strip():
                    return True
        return False
    except UnicodeDecodeError as e:
        raise ConfigError("files", f"not UTF-8 text ({e.reason} at byte {e.start})",
                          "convert it to UTF-8, e.g. with iconv -f latin1 -t utf-8", str(path)) from None


def cmd_data(argv: list[str]) -> int:
    """``lathe data prepare|info ...`` (see lathe/data/prepare.py)."""
    from lathe.data.prepare import main as data_main

    return data_main(argv)


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

    try:  # bad input is a ConfigError (one line) from lathe/checkpoint/hf.py
        if args.direction == "lathe-to-hf":
            out = lathe_to_hf(args.source, args.output, args.dtype)
        else:
            out = hf_to_lathe(args.source, args.output)
    except OSError as e:  # a folder that cannot be created or written
        raise ConfigError(str(e.filename or args.output), e.strerror or str(e), "check the path and its "
                          "permissions") from None
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


def cmd_plot(argv: list[str]) -> int:
    """``lathe plot RUN_DIR... [--output FILE.png] [--metrics loss,lr] [--x steps|tokens]``"""
    parser = argparse.ArgumentParser(prog="lathe plot", description="plot metrics.jsonl of one or several runs")
    parser.add_argument("runs", nargs="+", help="run folders (job.dump_folder) or metrics.jsonl files")
    parser.add_argument("--output", default=None, help="PNG or SVG file; default RUN_DIR/metrics.png for one run, "
                        "runs.png for several")
    parser.add_argument("--metrics", default="loss,val_loss,lr,grad_norm,wps,mfu", help="comma-separated")
    parser.add_argument("--x", default="steps", choices=("steps", "tokens"), help="x axis")
    parser.add_argument("--smooth", type=float, default=0.6, help="EMA weight of the smoothed curve; 0 = raw only")
    args = parser.parse_args(argv)
    from pathlib import Path

    from lathe.metrics.plot import plot_runs

    output = args.output or (str(Path(args.runs[0]) / "metrics.png") if len(args.runs) == 1 else "runs.png")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    print(f"wrote {plot_runs(args.runs, output, metrics, args.x, args.smooth)}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    """``lathe compare RUN_A RUN_B [--rtol X] [--assert-equal]``: exit 0 if the runs agree, 1 if not."""
    parser = argparse.ArgumentParser(prog="lathe compare", description="per-step loss and gradient-norm "
                                     "differences of two runs; exit code 0 = they agree within --rtol, 1 = not")
    parser.add_argument("run_a")
    parser.add_argument("run_b")
    parser.add_argument("--rtol", type=float, default=1e-6, help="relative tolerance; 0 = bitwise equal")
    parser.add_argument("--assert-equal", action="store_true", help="also require the same logged steps")
    parser.add_argument("--metrics", default=None, help="comma-separated metrics to compare; default "
                        "step_loss,grad_norm (per-step values: a resumed run compares equal to an uninterrupted one)")
    parser.add_argument("--output", "--plot", dest="output", default=None,
                        help="also draw the curves and their differences into this PNG/SVG file")
    args = parser.parse_args(argv)
    from lathe.metrics.compare import compare_runs, format_table, plot_comparison, summary

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    cmp = compare_runs(args.run_a, args.run_b, metrics, args.rtol)
    print(format_table(cmp))
    text, code = summary(cmp, args.assert_equal)
    if args.output and args.output.lower() != "none":  # --plot none: the old way to ask for no picture
        try:
            text += f"\nplot: {plot_comparison(cmp, args.output)}"
        except ConfigError as e:  # matplotlib missing: the table still answers
            text += f"\nno plot: {e}"
    print(text)
    return code


def cmd_replay(argv: list[str]) -> int:
    """``lathe replay RUN_DIR [--output DIR] [-- train overrides]``"""
    parser = argparse.ArgumentParser(prog="lathe replay", description="rerun a run from its run.json: same config, "
                                     "same data, same number of processes; then `lathe compare RUN_DIR OUTPUT`")
    parser.add_argument("run_dir")
    parser.add_argument("--output", default=None, help="the replay's job.dump_folder; default RUN_DIR-replay")
    parser.add_argument("--force", action="store_true", help="replay even if the tokenizer or data changed")
    cut = argv.index("--") if "--" in argv else len(argv)  # after "--": overrides of the replayed config
    args = parser.parse_args(argv[:cut])
    overrides = argv[cut + 1:]
    setup_logging()
    from lathe.manifest import replay

    _check_replay_record(args.run_dir)
    return replay(args.run_dir, args.output, overrides, args.force)


def _check_replay_record(run_dir: str) -> None:
    """A run.json that replay can read: an object whose parts have the types lathe writes (a damaged
    or hand-made file is one line, not a traceback)."""
    import json
    from pathlib import Path

    from lathe.manifest import MANIFEST, read_manifest

    read_manifest(run_dir)  # a missing or unreadable file: its own line
    path = Path(run_dir) / MANIFEST
    record = json.loads(path.read_text())

    def bad(what: str) -> ConfigError:
        return ConfigError("RUN_DIR", f"{path} is not a lathe run manifest: {what}",
                           "point it at the job.dump_folder of a lathe run, or restore its run.json", run_dir)

    def kind(v) -> str:
        names = {dict: "an object", list: "a list", str: "text", int: "a number", float: "a number", bool: "true/false"}
        return "null" if v is None else names.get(type(v), type(v).__name__)

    if not isinstance(record, dict):
        raise bad(f"it holds {kind(record)}, not an object")
    config = record.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("job"), dict):
        raise bad(f"its 'config' is {kind(config)}, not the run's config (an object of sections)")
    for section, values in config.items():
        if not isinstance(values, dict):
            raise bad(f"config section '{section}' is {kind(values)}, not an object")
    expected = {"world": dict, "tokenizer": dict, "data": list, "previous_runs": list}
    for key, typ in expected.items():
        if key in record and not isinstance(record[key], typ):
            raise bad(f"its '{key}' is {kind(record[key])}, not {kind(typ())}")
    for key in ("data", "previous_runs"):
        if any(not isinstance(x, dict) for x in record.get(key, [])):
            raise bad(f"its '{key}' holds something other than objects")
    for key in ("world_size", "nodes"):
        v = record.get("world", {}).get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise bad(f"world.{key} is {v!r}, not a positive whole number")


COMMANDS = {"train": cmd_train, "launch": cmd_launch, "slurm": cmd_slurm, "tokenizer": cmd_tokenizer,
            "data": cmd_data, "convert": cmd_convert, "seed-checkpoint": cmd_seed_checkpoint,
            "config-docs": cmd_config_docs, "plot": cmd_plot, "compare": cmd_compare, "replay": cmd_replay,
            "estimate": cmd_estimate, "plan": cmd_plan}


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
