"""lathe's data: tokenizers, document sources, the exact elastic batch stream, validation data.

Entry points used by the trainer:

* `build_tokenizer(cfg)`: the tokenizer named by ``model.tokenizer_path`` / ``tokenizer_type``.
* `resolve_vocab_size(cfg, tokenizer)`: the model's vocabulary size (``model.vocab_size``).
* `build_train_data(cfg, tokenizer, dp_rank, dp_degree)`: this rank's batches, resumable on
  any number of ranks (``state_dict``/``load_state_dict``), produced ahead in the background.
* `build_validation_data(cfg, tokenizer, dp_rank, dp_degree)`: a factory of fresh, finite
  validation streams (used by `lathe.evaluation.Validator`).

See docs/data.md for the user-facing description.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from lathe.data.loader import DataLoader
from lathe.data.sources import (
    check_data_config,
    open_source,
    train_specs,
    validation_specs,
)
from lathe.data.split_tokenizer import SplitTokenizer
from lathe.data.stream import DocumentStream, PackedStream
from lathe.data.token_stream import TokenWindowStream, build_token_stream, open_token_stores
from lathe.data.tokenizer import (
    DEFAULT_TOKENIZER_PATH,
    HFTokenizer,
    SentencePieceTokenizer,
    TikTokenizer,
    Tokenizer,
    download_tokenizer,
    load_tokenizer,
    resolve_tokenizer_file,
)
from lathe.errors import ConfigError

logger = logging.getLogger("lathe")

__all__ = [
    "DEFAULT_TOKENIZER_PATH", "DataLoader", "DocumentStream", "HFTokenizer", "PackedStream",
    "SentencePieceTokenizer", "TikTokenizer", "TokenWindowStream", "Tokenizer", "build_tokenizer", "build_train_data",
    "build_validation_data", "check_data_config", "download_tokenizer", "load_tokenizer",
    "resolve_vocab_size",
]


def build_tokenizer(cfg) -> Tokenizer:
    """The tokenizer of ``model.tokenizer_path`` (empty = lathe's default), read as
    ``model.tokenizer_type`` (auto = inferred from the file). Bad input raises ConfigError."""
    m = cfg.model
    path = resolve_tokenizer_file(m.tokenizer_path)
    threads = max(1, int(getattr(cfg.training, "data_workers", 1)))
    try:
        tok = load_tokenizer(path, kind=m.tokenizer_type, num_threads=threads)
    except FileNotFoundError:
        raise ConfigError("model.tokenizer_path", "file not found",
                          "point it at a tokenizer.json or tokenizer.model (lathe tokenizer download fetches "
                          "one), or leave it empty for lathe's default tokenizer", m.tokenizer_path) from None
    except ImportError as e:
        raise ConfigError("model.tokenizer_type", str(e), "install the package named above",
                          m.tokenizer_type) from None
    except ValueError as e:
        option = "model.tokenizer_type" if m.tokenizer_type != "auto" else "model.tokenizer_path"
        value = m.tokenizer_type if option == "model.tokenizer_type" else str(path)
        raise ConfigError(option, str(e), "use a Hugging Face tokenizer.json, a tiktoken (Llama 3) or a "
                          "SentencePiece (Llama 2) tokenizer.model; model.tokenizer_type auto detects which",
                          value) from None
    logger.info("tokenizer: %r", tok)
    return tok


def resolve_vocab_size(cfg, tokenizer: Tokenizer) -> int:
    """``model.vocab_size``: 0 = the tokenizer's vocabulary; larger pads the embedding (e.g. to a
    multiple of 64 for faster matmuls); smaller than the tokenizer's is a ConfigError, because
    the tokenizer would produce ids the model has no embedding for."""
    want = int(cfg.model.vocab_size)
    have = int(tokenizer.vocab_size)
    if want == 0:
        return have
    if want < have:
        raise ConfigError("model.vocab_size", f"smaller than the tokenizer's vocabulary ({have} ids): the "
                          "tokenizer does not match the model", f"set 0 to use the tokenizer's size, or >= {have}",
                          want)
    return want


def _document_stream(cfg, split: str, infinite: bool) -> DocumentStream:
    if split == "train":
        specs, separate = train_specs(cfg), False
    else:
        specs, separate = validation_specs(cfg)
    sources = []
    for spec, _ in specs:
        src = open_source(spec, split, cfg, separate=separate)
        src.probe(spec.option)  # before training: empty, wrong text field, not UTF-8, offline Hub
        sources.append(src)
    t = cfg.training
    return DocumentStream(sources, [w for _, w in specs], seed=t.seed,
                          shuffle_buffer=t.shuffle_buffer if split == "train" else 0, infinite=infinite)


def build_train_data(cfg, tokenizer: Tokenizer, dp_rank: int, dp_degree: int) -> DataLoader:
    """This rank's training batches: an iterator of ``(inputs, labels)`` LongTensors of shape
    ``(training.batch_size, training.seq_len)`` (plus ``(document_ids, positions)`` with
    ``training.document_ids`` or block-causal attention), with ``state_dict()``/``load_state_dict()`` (exact, on any
    dp_degree) and ``close()``. Problems with the data raise ConfigError here, before training."""
    t = cfg.training
    check_data_config(cfg)
    if any(spec.kind == "tokens" for spec, _ in train_specs(cfg)):  # prepared/Megatron/flat tokens
        stream = build_token_stream(cfg, tokenizer, "train", dp_rank, dp_degree)
        return DataLoader(stream, workers=t.data_workers)
    docs = _document_stream(cfg, "train", infinite=True)
    names = ", ".join(f"{s.name} ({w:.0%})" for s, w in zip(docs.sources, docs.weights)) \
        if len(docs.sources) > 1 else docs.sources[0].name
    logger.info("data: %s, seq_len %d, batch %d per rank x %d ranks, shuffle buffer %d, %d worker thread(s)",
                names, t.seq_len, t.batch_size, dp_degree, t.shuffle_buffer, t.data_workers)
    encode_batch_size = 64
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if t.split_tokenization and world > 1:
        tokenizer, encode_batch_size = SplitTokenizer(tokenizer), min(64 * world, 2048)
        logger.info("data: the %d processes split the tokenization (each tokenizes 1/%d of the documents); each "
                    "still reads and parses every record%s. For large runs, tokenize once with `lathe data "
                    "prepare` and train from the prepared folder: each rank then reads only its share", world, world,
                    " and streams the whole Hugging Face split" if any(s.kind == "hf" for s, _ in train_specs(cfg))
                    else "")
    stream = PackedStream(docs, tokenizer, t.seq_len, t.batch_size, dp_rank=dp_rank, dp_degree=dp_degree,
                          document_ids=wants_document_ids(cfg), encode_batch_size=encode_batch_size)
    stream.option = "training.dataset_mix" if t.dataset_mix else train_specs(cfg)[0][0].option
    return DataLoader(stream, workers=t.data_workers, lockstep=isinstance(tokenizer, SplitTokenizer))


def wants_document_ids(cfg) -> bool:
    """Whether batches carry document ids: asked for, or needed by block-causal attention."""
    return cfg.training.document_ids or cfg.model.attention_mask == "block_causal"


def build_validation_data(cfg, tokenizer: Tokenizer, dp_rank: int, dp_degree: int) -> Callable[[], PackedStream]:
    """A function returning a fresh, finite stream over the validation data, from its start.

    Opening the sources (and their checks) happens once, here."""
    t, v = cfg.training, cfg.validation
    batch_size = v.batch_size or t.batch_size
    if any(spec.kind == "tokens" for spec, _ in validation_specs(cfg)[0]):
        stores, weights = open_token_stores(cfg, tokenizer, "validation")  # opened and checked now
        return lambda: build_token_stream(cfg, tokenizer, "validation", dp_rank, dp_degree, stores, weights)
    docs = _document_stream(cfg, "validation", infinite=False)
    sources, weights = docs.sources, docs.weights

    def fresh() -> PackedStream:
        d = DocumentStream(sources, weights, seed=t.seed, shuffle_buffer=0, infinite=False)
        return PackedStream(d, tokenizer, t.seq_len, batch_size, dp_rank=dp_rank, dp_degree=dp_degree,
                            document_ids=wants_document_ids(cfg))

    return fresh
