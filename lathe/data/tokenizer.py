"""One tokenizer interface for the whole framework.

The model only ever sees integer ids; everything that turns text into ids (and back) goes through
`Tokenizer`. Concrete formats plug in as subclasses:

* `HFTokenizer`: a Hugging Face ``tokenizers`` ``tokenizer.json`` (lathe's own default format).

`load_tokenizer()` picks the right class by looking at the file, so adding a format later means
one more subclass and one more branch in `_detect_format()`.

lathe's special tokens are ``<|begin_of_text|>`` (BOS, put in front of every document),
``<|end_of_text|>`` (EOS, put after it) and ``<|pad|>`` (padding; optional).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import lathe

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]

# The committed default tokenizer: byte-level BPE, 4096 tokens, trained on the default corpus
# (see lathe/assets/README.md).
DEFAULT_TOKENIZER_PATH = Path(lathe.__file__).parent / "assets" / "tokenizer.json"


class Tokenizer:
    """Text <-> token ids.

    Subclasses implement `encode`, `decode` and the four id properties; `encode_batch` has a
    plain loop as default and may be overridden with something faster.
    """

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        """Token ids of ``text``, optionally with BOS in front and EOS at the end."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        """`encode` for many texts at once (subclasses may parallelise this)."""
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of a sequence of ids (special tokens are dropped)."""
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids, special tokens included (ids are ``0 .. vocab_size - 1``)."""
        raise NotImplementedError

    @property
    def bos_id(self) -> int:
        raise NotImplementedError

    @property
    def eos_id(self) -> int:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        """Id of the padding token, or -1 if the tokenizer has none."""
        raise NotImplementedError


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` ``tokenizer.json`` file."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer as _HFTokenizer

        self.path = Path(path)
        self._tok = _HFTokenizer.from_file(str(self.path))
        # Treat special-token strings that occur *in the text* as ordinary text. Otherwise a
        # document that merely mentions "<|end_of_text|>" (a tokenizer tutorial, say) would inject
        # a real EOS in the middle of the document. BOS/EOS are only ever added by id, below.
        self._tok.encode_special_tokens = True

        self._bos_id = self._required_id(BOS_TOKEN)
        self._eos_id = self._required_id(EOS_TOKEN)
        pad = self._tok.token_to_id(PAD_TOKEN)
        self._pad_id = -1 if pad is None else pad

    def _required_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"tokenizer {self.path} has no {token!r} token, which lathe needs")
        return token_id

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self._bos_id)
        if eos:
            ids.append(self._eos_id)
        return ids

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        # add_special_tokens=False: no post-processor template; we add BOS/EOS ourselves so the
        # behaviour does not depend on what the tokenizer.json file happens to configure.
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        # encode_batch runs on all cores (in Rust, without the GIL); the "fast" variant skips
        # computing character offsets, which we never use. Older tokenizers lack it.
        texts = list(texts)
        batch_fn = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = batch_fn(texts, add_special_tokens=False)
        return [self._wrap(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path | None = None) -> Tokenizer:
    """Load a tokenizer, choosing the implementation from the file's content.

    ``path`` may be a tokenizer file or a directory containing ``tokenizer.json``; ``None`` or
    ``""`` (the config's "use the default") means the committed `DEFAULT_TOKENIZER_PATH`.
    """
    path = Path(path).expanduser() if path else DEFAULT_TOKENIZER_PATH
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} (expected a Hugging Face tokenizer.json; "
            f"`lathe tokenizer train` makes one, and the default is {DEFAULT_TOKENIZER_PATH})"
        )
    kind = _detect_format(path)
    if kind == "hf":
        return HFTokenizer(path)
    # Future formats (tiktoken, sentencepiece) get their branch here.
    raise ValueError(f"unrecognised tokenizer file format: {path}")


def _detect_format(path: Path) -> str | None:
    """A short name for the tokenizer format of ``path``, or None if unrecognised."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        # Every tokenizers-library file has a "model" section (BPE, Unigram, WordPiece, ...).
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            return "hf"
    return None


def _iter_training_texts(files: Sequence[Path]) -> Iterator[str]:
    """Documents from ``.jsonl`` files (their ``text`` fields) or whole plain-text files."""
    from lathe.data.corpus import iter_documents

    for f in files:
        f = Path(f)
        if f.suffix == ".jsonl":
            yield from iter_documents(f)
        else:
            yield f.read_text(encoding="utf-8")


def train_tokenizer(files: list[Path], vocab_size: int, out_path: Path) -> Path:
    """Train a byte-level BPE tokenizer on ``files`` and save it as ``out_path`` (tokenizer.json).

    Byte-level means text is first turned into UTF-8 bytes, each byte shown as one printable
    character; BPE then merges frequent pairs. Starting from all 256 bytes (``initial_alphabet``)
    guarantees that *any* string can be encoded, even bytes never seen in training, so there is
    no unknown token. The result is deterministic for the same input files.
    """
    from tokenizers import Tokenizer as _HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (256 bytes + specials)")
    files = [Path(f) for f in files]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"tokenizer training file not found: {f}")

    tok = _HFTokenizer(models.BPE())
    # add_prefix_space=False: "hello" at the start of a document is encoded as it is written,
    # and decode(encode(text)) == text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # train_from_iterator rather than train(files): the .jsonl files must be read as documents,
    # not as raw text (which would teach the tokenizer JSON escapes like '\\n').
    tok.train_from_iterator(_iter_training_texts(files), trainer=trainer)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path), pretty=True)
    return out_path
