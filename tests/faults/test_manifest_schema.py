"""A checkpoint's manifest is a schema, not a suggestion; ``lathe convert`` checks what it reads.

Resume cases: step-4 of a tiny-Llama checkpoint folder (steps 2 and 4, written once per module by
the real CheckpointManager) is damaged in one way; the manager's own load() must report it in one
warning line naming the file (and entry), fall back to step-2, and run no code (one case also
through ``lathe train``: exit 0, the line on stdout). Convert cases call
the CLI entry point (``lathe.cli.main``): exit code 2, one line on stderr naming the file and the
tensor or key, nothing written. The catalogue is docs/reliability.md.
"""

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from lathe import cli
from lathe.checkpoint import integrity
from lathe.checkpoint.hf import lathe_to_hf
from lathe.checkpoint.integrity import DamagedCheckpoint
from lathe.checkpoint.manager import CheckpointManager, TrainState, inspect_checkpoint
from lathe.config import load_config
from lathe.models.llama import ModelArgs, Transformer
from lathe.optim import LRSchedules, build_optimizers

ARGS = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=4096, multiple_of=64,
                 rope_theta=500000, max_seq_len=32)  # the "tiny" flavor


def make_manager(dump_folder: Path, *extra: str) -> CheckpointManager:
    cfg, _ = load_config(["--model.flavor", "tiny", "--training.steps", "4", "--checkpoint.enable_checkpoint",
                          "--job.dump_folder", str(dump_folder), *extra])
    torch.manual_seed(0)
    model = Transformer(ARGS)
    optimizers = build_optimizers([model], cfg.optimizer)
    schedules = LRSchedules(optimizers, 4, cfg.lr_scheduler)
    return CheckpointManager(cfg.checkpoint, dump_folder, [model], optimizers, schedules, None, TrainState(), ARGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """checkpoint/step-2 and step-4 (train_state.step 2 and 4) and a Hugging Face export of step-4."""
    root = tmp_path_factory.mktemp("schema")
    manager = make_manager(root / "run")
    for step in (2, 4):
        manager.train_state.step = step
        manager.save(step, last_step=True)
    lathe_to_hf(root / "run" / "checkpoint" / "step-4", root / "hf")
    return root


@pytest.fixture
def run(saved, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(saved / "run", folder)
    return folder


def manifest(step: Path) -> dict:
    return json.loads((step / "manifest.json").read_text())


def write_manifest(step: Path, data: dict) -> None:
    (step / "manifest.json").write_text(json.dumps(data))


def resume(run: Path, caplog, *extra: str) -> str:
    """Load the newest checkpoint that verifies with a fresh manager; assert it was step-2 and
    return the one warning line that names the damage of step-4."""
    manager = make_manager(run, *extra)
    with caplog.at_level(logging.WARNING, logger="lathe"):
        assert manager.load()
    assert manager.train_state.step == 2  # the fallback checkpoint was used
    damaged = [r.getMessage() for r in caplog.records if "step-4 is damaged" in r.getMessage()]
    assert len(damaged) == 1 and "\n" not in damaged[0], caplog.text
    assert "resumed from step 2 instead of the damaged step-4" in caplog.text
    return damaged[0]


# --- a malformed manifest is damage like any other ---------------------------------------------

SHARD = "__0_0.distcp"


def _rename_key(key):
    def damage(step):
        data = manifest(step)
        data["files"][SHARD]["renamed_" + key] = data["files"][SHARD].pop(key)
        write_manifest(step, data)
    return damage


def _set_entry(value_of):
    def damage(step):
        data = manifest(step)
        data["files"][SHARD] = value_of(data["files"][SHARD])
        write_manifest(step, data)
    return damage


def _drop_shard(step):
    data = manifest(step)
    del data["files"][SHARD]
    write_manifest(step, data)


def _name(name):
    def damage(step):
        data = manifest(step)
        data["files"][name] = {"size": 0, "chunk": integrity.CHUNK, "crc32": [0]}
        write_manifest(step, data)
    return damage


MANIFEST_CASES = {
    "crc32_key_renamed": (_rename_key("crc32"), f"manifest.json: entry '{SHARD}': missing key crc32"),
    "chunk_key_renamed": (_rename_key("chunk"), f"manifest.json: entry '{SHARD}': missing key chunk"),
    "size_key_renamed": (_rename_key("size"), f"manifest.json: entry '{SHARD}': missing key size"),
    "string_size": (_set_entry(lambda e: {**e, "size": str(e["size"])}),
                    f"manifest.json: entry '{SHARD}': size '9"),
    "entry_not_an_object": (_set_entry(lambda e: [e["size"], e["crc32"]]),
                            f"manifest.json: entry '{SHARD}': a list, not an object"),
    "empty_crc32": (_set_entry(lambda e: {**e, "crc32": []}),
                    f"manifest.json: entry '{SHARD}': 0 crc32 values for 1 chunk"),
    "manifest_is_a_list": (lambda step: (step / "manifest.json").write_text("[]"),
                           "manifest.json: not a JSON object (a list)"),
    "storage_file_not_listed": (_drop_shard, f"step-4/{SHARD}: named by .metadata but not listed in manifest.json"),
    "parent_path": (_name("../../etc/hostname"),
                    "manifest.json: entry '../../etc/hostname': is not a relative path inside the checkpoint"),
    "absolute_device": (_name("/dev/zero"),
                        "manifest.json: entry '/dev/zero': is not a relative path inside the checkpoint"),
}


@pytest.mark.parametrize("case", MANIFEST_CASES)
def test_malformed_manifest_falls_back(run, caplog, case):
    damage, expected = MANIFEST_CASES[case]
    damage(run / "checkpoint" / "step-4")
    line = resume(run, caplog)
    assert expected in line, line


def test_link_out_of_the_checkpoint_falls_back(run, caplog, tmp_path):
    """rng/rank0.json replaced by a link to an identical copy outside the folder: the checksum
    would pass, the link is refused."""
    rng = run / "checkpoint" / "step-4" / "rng" / "rank0.json"
    outside = tmp_path / "outside.json"
    shutil.copy(rng, outside)
    rng.unlink()
    rng.symlink_to(outside)
    line = resume(run, caplog)
    assert f"step-4/rng/rank0.json: links to {outside}, outside the checkpoint folder" in line, line


def test_link_to_a_device_and_a_pipe_fall_back_without_reading(run, caplog, tmp_path):
    """A listed file that is a link to /dev/zero (read without end) or a named pipe (a read
    blocks) is refused before it is opened, with verify=full and verify=off alike."""
    step = run / "checkpoint" / "step-4"
    (step / SHARD).unlink()
    (step / SHARD).symlink_to("/dev/zero")
    line = resume(run, caplog, "--checkpoint.verify", "off")
    assert f"step-4/{SHARD}: links to /dev/zero, outside the checkpoint folder" in line, line
    caplog.clear()
    (step / SHARD).unlink()
    os.mkfifo(step / SHARD)
    line = resume(run, caplog)
    assert f"step-4/{SHARD}: not a regular file (a pipe)" in line, line


def _point_metadata_outside(step: Path) -> Path:
    """Rewrite .metadata (a valid DCP metadata pickle) so its storage entries name
    ../../outside.distcp, a copy of the shard outside the checkpoint; refresh the manifest so
    every checksum matches."""
    metadata = integrity.read_metadata(step / ".metadata")
    for info in metadata.storage_data.values():
        info.relative_path = "../../outside.distcp"
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    outside = step.parent.parent / "outside.distcp"
    shutil.copy(step / SHARD, outside)
    (step / "manifest.json").unlink()
    integrity.write_manifest(step, world_size=0)
    return outside


@pytest.mark.parametrize("version", [2, 1])
def test_metadata_naming_a_file_outside_falls_back(run, caplog, version):
    """With checksums (version 2) and without (an old checkpoint: version 1, no manifest)."""
    step = run / "checkpoint" / "step-4"
    _point_metadata_outside(step)
    if version == 1:
        (step / "manifest.json").unlink()
        sidecar = json.loads((step / "train_state.json").read_text())
        sidecar["format_version"] = 1
        (step / "train_state.json").write_text(json.dumps(sidecar))
    line = resume(run, caplog)
    assert "step-4/.metadata: entry '" in line and "' names storage file '../../outside.distcp', not a " \
        "relative path inside the checkpoint folder" in line, line


class Evil:
    """A pickle that, when loaded, creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant_refused_entry(step: Path, marker: Path) -> None:
    """Rewrite step's DCP files with model.tok_embeddings.weight stored as a pickled object that
    runs code (everything else intact), and a manifest whose checksums all match: only the safe
    loader stands between the file and the code."""
    manager = make_manager(step.parent.parent)
    state = {"model": manager._model_state(), "optimizer": manager._optimizer_state()}
    state["model"]["tok_embeddings.weight"] = Evil(marker)
    for f in [step / ".metadata", *step.glob("*.distcp"), step / "manifest.json"]:
        f.unlink()
    dcp.save(state, checkpoint_id=str(step), no_dist=True)
    integrity.write_manifest(step, world_size=0)
    inspect_checkpoint(step, "full")  # it verifies: the damage is only visible when loading


def test_refused_entry_falls_back_naming_file_and_entry(run, caplog, tmp_path):
    marker = tmp_path / "PWNED"
    _plant_refused_entry(run / "checkpoint" / "step-4", marker)
    line = resume(run, caplog)
    assert not marker.exists()
    assert f"step-4/{SHARD}: entry 'model.tok_embeddings.weight' (bytes " in line, line
    assert "refused by the safe loader: Unsupported global: GLOBAL " in line and "Traceback" not in line, line


def test_format_version_true_is_not_version_1(run):
    """``true == 1`` in Python: a sidecar with ``"format_version": true`` must not pass as an old
    checkpoint that is loaded without its manifest."""
    step = run / "checkpoint" / "step-4"
    sidecar = json.loads((step / "train_state.json").read_text())
    sidecar["format_version"] = True
    (step / "train_state.json").write_text(json.dumps(sidecar))
    with pytest.raises(Exception, match="format version True"):
        inspect_checkpoint(step, "full")


def test_checkpoints_of_this_writer_verify(saved):
    """The schema accepts what lathe writes (also checked by every resume test in the suite)."""
    for step in (2, 4):
        folder = saved / "run" / "checkpoint" / f"step-{step}"
        assert inspect_checkpoint(folder, "full")["train_state"]["step"] == step
        with pytest.raises(DamagedCheckpoint, match="not listed"):  # the check bites on this folder
            integrity.check_metadata(folder, {})


def test_damage_found_while_loading_crosses_ranks():
    """DCP gathers the exception a rank's read raised to the other ranks by pickling it."""
    e = pickle.loads(pickle.dumps(DamagedCheckpoint(Path("/c/step-4/__1_0.distcp"), "entry 'x' refused")))
    assert isinstance(e, DamagedCheckpoint) and str(e) == "/c/step-4/__1_0.distcp: entry 'x' refused"


# --- lathe convert -----------------------------------------------------------------------------

@pytest.fixture
def convert(capsys):
    """``lathe convert ...`` through the CLI entry point: (exit code, stderr lines). Restores the
    root logger's handlers, which the command replaces."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level

    def call(*args):
        code = cli.main(["convert", *map(str, args)])
        err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
        return code, err

    yield call
    root.handlers[:] = handlers
    root.setLevel(level)


def one_line(code, err) -> str:
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("lathe: error: "), err
    return err[0]


@pytest.fixture
def hf(saved, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(saved / "hf", folder)
    return folder


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def _huge_header_length(hf):
    st = hf / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes((2**62).to_bytes(8, "little") + raw[8:])


def _overflowing_shape(hf):
    st = hf / "model.safetensors"
    header, data = _header(st)
    header["model.norm.weight"]["shape"] = [2**62, 2**62]
    _write_header(st, header, data)


def _config(change):
    def damage(hf):
        config = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps(change(config)))
    return damage


def _drop_tensor(hf):
    st = hf / "model.safetensors"
    header, data = _header(st)
    del header["model.layers.2.mlp.up_proj.weight"]  # its bytes stay, unreferenced: still a valid file
    _write_header(st, header, data)


HF_CASES = {
    "header_length_2_62": (_huge_header_length, "model.safetensors: header length 4,611,686,018,427,387,904 bytes"),
    "shape_overflows": (_overflowing_shape, "model.safetensors: tensor 'model.norm.weight': shape "
                        f"[{2**62}, {2**62}] of F32 needs"),
    "num_attention_heads_0": (_config(lambda c: {**c, "num_attention_heads": 0}),
                              "config.json: num_attention_heads is 0, not a positive whole number"),
    "missing_key": (_config(lambda c: {k: v for k, v in c.items() if k != "hidden_size"}),
                    "config.json: missing key 'hidden_size'"),
    "config_is_a_list": (_config(lambda c: [c]), "config.json: holds a JSON list, not an object"),
    "fewer_layers_than_tensors": (_config(lambda c: {**c, "num_hidden_layers": 3}),
                                  "model.safetensors: tensor 'model.layers.3."),
    "other_vocab_size": (_config(lambda c: {**c, "vocab_size": 4000}),
                         "has shape [4096, 64], ", ),
    "missing_tensor": (_drop_tensor, "config.json: describes tensor 'model.layers.2.mlp.up_proj.weight' of shape "
                       "[192, 64], which no .safetensors file holds"),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_to_lathe_bad_input_is_one_line_and_writes_nothing(hf, tmp_path, convert, case):
    damage, expected = HF_CASES[case]
    damage(hf)
    out = tmp_path / "out"
    line = one_line(*convert("hf-to-lathe", hf, out))
    assert expected in line, line
    if case == "fewer_layers_than_tensors":
        assert "is not part of the Llama model" in line and "config.json describes" in line
    if case == "other_vocab_size":
        assert "config.json implies [4000, 64]" in line
    assert not out.exists()


def test_hf_to_lathe_of_the_intact_export_converts(hf, tmp_path, convert):
    code, err = convert("hf-to-lathe", hf, tmp_path / "out")
    assert code == 0, err
    assert inspect_checkpoint(tmp_path / "out" / "step-0", "full")["model"]["n_layers"] == 4


def test_lathe_to_hf_refused_entry_is_one_line(run, tmp_path, convert):
    marker = tmp_path / "PWNED"
    step = run / "checkpoint" / "step-4"
    _plant_refused_entry(step, marker)
    out = tmp_path / "hf-out"
    line = one_line(*convert("lathe-to-hf", step, out))
    assert f"step-4/{SHARD}: entry 'model.tok_embeddings.weight'" in line, line
    assert "refused by the safe loader: Unsupported global" in line, line
    assert not marker.exists() and not out.exists()


def test_lathe_to_hf_malformed_manifest_is_one_line(run, tmp_path, convert):
    step = run / "checkpoint" / "step-4"
    _set_entry(lambda e: {**e, "crc32": []})(step)
    out = tmp_path / "hf-out"
    line = one_line(*convert("lathe-to-hf", step, out))
    assert f"manifest.json: entry '{SHARD}': 0 crc32 values for 1 chunk" in line, line
    assert not out.exists()


def test_hf_to_lathe_of_a_transformers_5_folder_keeps_rope_theta_and_tied_head(tmp_path, convert):
    """transformers 5 writes rope_theta inside rope_parameters (read as 10000 before: a silently
    different model); a tied model's folder has no lm_head.weight (the embeddings are used). The
    converted model gives the Hugging Face model's logits."""
    transformers = pytest.importorskip("transformers")
    from lathe.checkpoint.hf import load_lathe_weights

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    theirs = transformers.LlamaForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path / "hf")
    code, err = convert("hf-to-lathe", tmp_path / "hf", tmp_path / "out")
    assert code == 0, err
    args, weights = load_lathe_weights(tmp_path / "out" / "step-0")
    assert args.rope_theta == 500000.0
    ours = Transformer(args)
    ours.load_state_dict(weights)
    ours.init_rope("cpu")
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens).logits, atol=1e-5, rtol=1e-5)


def test_convert_into_an_unwritable_output_is_one_line(saved, tmp_path, convert):
    (tmp_path / "afile").write_text("x")
    line = one_line(*convert("lathe-to-hf", saved / "run" / "checkpoint" / "step-4", tmp_path / "afile" / "hf"))
    assert "afile/hf" in line and "Not a directory" in line, line


def test_resume_through_the_cli_falls_back_with_one_warning_line(run):
    """The same through ``lathe train`` (one case; the others share the path above): exit 0, one
    warning line naming manifest.json and the entry, training continues from step 2."""
    _set_entry(lambda e: {**e, "crc32": []})(run / "checkpoint" / "step-4")
    proc = subprocess.run([sys.executable, "-m", "lathe", "train", "--model.flavor", "tiny", "--training.seq_len", "32",
                           "--training.batch_size", "2", "--training.steps", "3", "--checkpoint.enable_checkpoint",
                           "--checkpoint.interval", "100", "--metrics.log_freq", "1", "--job.dump_folder", str(run)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    damaged = [x for x in proc.stdout.splitlines() if "is damaged" in x]
    assert len(damaged) == 1 and f"step-4/manifest.json: entry '{SHARD}': 0 crc32 values for 1 chunk" in damaged[0]
    assert "resumed from step 2 instead of the damaged step-4" in proc.stdout
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == [3]
