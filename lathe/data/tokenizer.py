"""One tokenizer interface for the whole framework.

The model only ever sees integer ids; everything that turns text into ids (and back) goes through
`Tokenizer`. Concrete formats plug in as subclasses:

* `HFTokenizer`: a Hugging Face ``tokenizers`` ``tokenizer.json`` (lathe's own default format, and
  what the Hub's Llama 3 / Mistral / GPT-2 style repositories ship as ``tokenizer.json``).
* `TikTokenizer`: a tiktoken BPE file in Meta's Llama 3 format (``original/tokenizer.model``:
  one ``base64(token bytes) rank`` line per token), with Llama 3's 256 special tokens and split
  pattern.
* `SentencePieceTokenizer`: a SentencePiece ``.model`` file (Llama 2).

`load_tokenizer()` picks the class by looking at the file's *content* (not its name: Llama 2 and
Llama 3 both call theirs ``tokenizer.model``); ``model.tokenizer_type`` can force one.

Every tokenizer adds BOS/EOS *by id* only: special-token text that occurs inside a document (a
tutorial that mentions ``<|end_of_text|>``) is encoded as ordinary text, never as the special id.

lathe's special tokens are ``<|begin_of_text|>`` (BOS, put in front of every document),
``<|end_of_text|>`` (EOS, put after it) and ``<|pad|>`` (padding; optional).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import lathe

logger = logging.getLogger("lathe")

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN]

# The committed default tokenizer: byte-level BPE, 4096 tokens, trained on the default corpus
# (see lathe/assets/README.md).
DEFAULT_TOKENIZER_PATH = Path(lathe.__file__).parent / "assets" / "tokenizer.json"

# Values of model.tokenizer_type (besides "auto") -> the class that reads that format.
TOKENIZER_TYPES = ("huggingface", "tiktoken", "sentencepiece")

# File names looked for, in this order, when a tokenizer path is a directory.
_DIR_CANDIDATES = ("tokenizer.json", "tokenizer.model", "original/tokenizer.model")


class Tokenizer:
    """Text <-> token ids.

    Subclasses implement `encode`, `decode` and `vocab_size`, and set ``_bos_id``, ``_eos_id`` (and
    ``_pad_id`` if there is one); `encode_batch` has a plain loop as default and may be overridden
    with something faster.
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

    # Subclasses set these three in __init__.
    _bos_id: int
    _eos_id: int
    _pad_id: int = -1

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        """Id of the padding token, or -1 if the tokenizer has none."""
        return self._pad_id


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

        # BOS/EOS/PAD: lathe's names first, then the names other families use (Llama 2 and
        # Mistral "<s>"/"</s>", Gemma "<bos>"/"<eos>", GPT-2 "<|endoftext|>" for both), and a
        # tokenizer_config.json next to the file (as on the Hub) overrides all of them.
        declared = _declared_special_tokens(self.path.parent)
        self._bos_id = self._find_id("BOS", declared.get("bos_token"), _BOS_CANDIDATES)
        self._eos_id = self._find_id("EOS", declared.get("eos_token"), _EOS_CANDIDATES)
        pad = self._lookup(declared.get("pad_token"), _PAD_CANDIDATES)
        self._pad_id = -1 if pad is None else pad

    def _lookup(self, declared: str | None, candidates: Sequence[str]) -> int | None:
        for token in ([declared] if declared else []) + list(candidates):
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        return None

    def _find_id(self, what: str, declared: str | None, candidates: Sequence[str]) -> int:
        token_id = self._lookup(declared, candidates)
        if token_id is None:
            raise ValueError(
                f"tokenizer {self.path} has no {what} token (looked for {', '.join(candidates)}), "
                "which lathe puts around every document"
            )
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

    def __repr__(self) -> str:
        return f"HFTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"



_BOS_CANDIDATES = (BOS_TOKEN, "<s>", "<bos>", "<|bos|>", "<|startoftext|>", "<|endoftext|>")
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|eos|>", "<|endoftext|>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "<|finetune_right_pad_id|>")


def _declared_special_tokens(folder: Path) -> dict[str, str]:
    """bos_token/eos_token/pad_token of a Hub-style tokenizer_config.json in ``folder``, if any."""
    try:
        data = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = data.get(key) if isinstance(data, dict) else None
        if isinstance(value, dict):  # {"content": "<s>", ...} in older files
            value = value.get("content")
        if isinstance(value, str) and value:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# tiktoken (Llama 3)
# ---------------------------------------------------------------------------------------------

# Llama 3's pre-tokenizer split pattern (identical to tiktoken's cl100k_base one).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RESERVED_SPECIAL_TOKENS = 256


def llama3_special_tokens(num_reserved: int = LLAMA3_NUM_RESERVED_SPECIAL_TOKENS) -> list[str]:
    """Llama 3's special tokens, in id order (they follow the BPE ranks)."""
    named = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>",
        "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|reserved_special_token_4|>",
        "<|eot_id|>",
    ]
    return named + [f"<|reserved_special_token_{i}|>" for i in range(5, num_reserved - 5)]


# tiktoken's Rust core can overflow its stack (a panic, issue openai/tiktoken#195) on very long
# runs of whitespace or of non-whitespace. Meta's reference code encodes in chunks of at most
# 400,000 characters, each cut further so that no run exceeds 25,000 characters; so do we.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
TIKTOKEN_MAX_NO_WHITESPACE_CHARS = 25_000


def _split_whitespaces_or_nonwhitespaces(s: str, max_consecutive: int) -> Iterator[str]:
    """Cut ``s`` into pieces none of which holds a run of more than ``max_consecutive``
    consecutive whitespace or consecutive non-whitespace characters (Meta's Llama 3 helper)."""
    current_slice_len = 0
    current_slice_is_space = s[0].isspace() if len(s) > 0 else False
    slice_start = 0
    for i in range(len(s)):
        is_now_space = s[i].isspace()
        if current_slice_is_space ^ is_now_space:
            current_slice_len = 1
            current_slice_is_space = is_now_space
        else:
            current_slice_len += 1
            if current_slice_len > max_consecutive:
                yield s[slice_start:i]
                slice_start = i
                current_slice_len = 1
    yield s[slice_start:]


def _tiktoken_chunks(text: str) -> Iterator[str]:
    for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        yield from _split_whitespaces_or_nonwhitespaces(
            text[i : i + TIKTOKEN_MAX_ENCODE_CHARS], TIKTOKEN_MAX_NO_WHITESPACE_CHARS
        )


def read_tiktoken_bpe(path: str | Path) -> dict[bytes, int]:
    """The mergeable ranks of a tiktoken BPE file (``base64(token) rank`` per line)."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except Exception as e:
                raise ValueError(f"{path}:{lineno}: not a tiktoken BPE line: {line[:80]!r}") from e
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken BPE file")
    return ranks


class TikTokenizer(Tokenizer):
    """A tiktoken BPE file in Meta's Llama 3 format, with Llama 3's special tokens.

    Special-token ids follow the BPE ranks: ``<|begin_of_text|>`` is ``num_base_tokens``,
    ``<|end_of_text|>`` the next, and so on for 256 specials (Llama 3: 128,000 + 256 = 128,256).
    There is no padding token (``pad_id`` is -1).
    """

    def __init__(self, path: str | Path, num_threads: int = 1):
        try:
            import tiktoken
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("reading a tiktoken tokenizer needs the tiktoken package: pip install tiktoken") from e
        self.path = Path(path)
        self.num_threads = max(1, int(num_threads))
        ranks = read_tiktoken_bpe(self.path)
        self.num_base_tokens = len(ranks)
        specials = llama3_special_tokens()
        self.special_tokens = {tok: self.num_base_tokens + i for i, tok in enumerate(specials)}
        self._enc = tiktoken.Encoding(
            name=self.path.name,
            pat_str=LLAMA3_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self._bos_id = self.special_tokens["<|begin_of_text|>"]
        self._eos_id = self.special_tokens["<|end_of_text|>"]
        self.stop_tokens = {self._eos_id, self.special_tokens["<|eot_id|>"]}

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self._bos_id)
        if eos:
            ids.append(self._eos_id)
        return ids

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        # encode_ordinary: special-token text inside the document is plain text.
        if len(text) <= TIKTOKEN_MAX_NO_WHITESPACE_CHARS:  # no run can be too long: one call
            ids = self._enc.encode_ordinary(text)
        else:
            ids = []
            for chunk in _tiktoken_chunks(text):
                ids.extend(self._enc.encode_ordinary(chunk))
        return self._wrap(ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        texts = list(texts)
        if self.num_threads <= 1 or len(texts) < 2 or any(
            len(t) > TIKTOKEN_MAX_NO_WHITESPACE_CHARS for t in texts
        ):
            return [self.encode(t, bos=bos, eos=eos) for t in texts]
        batch = self._enc.encode_ordinary_batch(texts, num_threads=self.num_threads)
        return [self._wrap(ids, bos, eos) for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([i for i in ids if i < self.num_base_tokens])

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def __repr__(self) -> str:
        return f"TikTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# SentencePiece (Llama 2)
# ---------------------------------------------------------------------------------------------


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece ``.model`` file (Llama 2: 32,000 pieces, BOS 1, EOS 2, no padding)."""

    def __init__(self, path: str | Path, num_threads: int = 1):
        try:
            from sentencepiece import SentencePieceProcessor
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "reading a SentencePiece tokenizer needs the sentencepiece package: pip install sentencepiece"
            ) from e
        self.path = Path(path)
        self.num_threads = max(1, int(num_threads))
        self._sp = SentencePieceProcessor(model_file=str(self.path))
        self._bos_id = self._sp.bos_id()
        self._eos_id = self._sp.eos_id()
        if self._bos_id < 0 or self._eos_id < 0:
            raise ValueError(f"SentencePiece model {self.path} has no BOS/EOS piece, which lathe needs")

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            ids.insert(0, self._bos_id)
        if eos:
            ids.append(self._eos_id)
        return ids

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        # Control pieces (<s>, </s>) are never produced from text: "<s>" in a document is text.
        return self._wrap(list(self._sp.encode(text)), bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        texts = list(texts)
        if not texts:
            return []
        batch = self._sp.encode(texts, num_threads=self.num_threads)
        return [self._wrap(list(ids), bos, eos) for ids in batch]

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def resolve_tokenizer_file(path: str | Path | None) -> Path:
    """The tokenizer file that ``path`` means: the default for None/"", the known file names
    inside a directory (tokenizer.json, tokenizer.model, original/tokenizer.model)."""
    path = Path(path).expanduser() if path else DEFAULT_TOKENIZER_PATH
    if path.is_dir():
        for name in _DIR_CANDIDATES:
            if (path / name).is_file():
                return path / name
    return path


def load_tokenizer(path: str | Path | None = None, kind: str = "auto", num_threads: int = 1) -> Tokenizer:
    """Load a tokenizer, choosing the implementation from the file's content.

    ``path`` may be a tokenizer file or a directory containing ``tokenizer.json`` or
    ``tokenizer.model`` (also ``original/tokenizer.model``, the Hub's Llama 3 layout); ``None``
    or ``""`` (the config's "use the default") means the committed `DEFAULT_TOKENIZER_PATH`.
    ``kind`` is ``auto`` (detect) or one of `TOKENIZER_TYPES`. ``num_threads`` is how many
    threads batch encoding may use (tiktoken, sentencepiece; ``tokenizers`` manages its own).
    """
    path = resolve_tokenizer_file(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer file not found: {path} (expected a tokenizer.json, a tiktoken or a "
            f"SentencePiece tokenizer.model; `lathe tokenizer train` makes one, "
            f"`lathe tokenizer download` fetches one, and the default is {DEFAULT_TOKENIZER_PATH})"
        )
    if kind not in ("auto", *TOKENIZER_TYPES):
        raise ValueError(f"unknown tokenizer type {kind!r}: use auto, {', '.join(TOKENIZER_TYPES)}")
    detected = _detect_format(path)
    if kind == "auto":
        if detected is None:
            raise ValueError(
                f"unrecognised tokenizer file format: {path} (not a tokenizer.json, a tiktoken BPE "
                "file or a SentencePiece model)"
            )
        kind = detected
    try:
        if kind == "huggingface":
            return HFTokenizer(path)
        if kind == "tiktoken":
            return TikTokenizer(path, num_threads=num_threads)
        return SentencePieceTokenizer(path, num_threads=num_threads)
    except ImportError:
        raise
    except Exception as e:
        hint = f" (the file looks like {detected})" if detected and detected != kind else ""
        raise ValueError(f"cannot read {path} as a {kind} tokenizer{hint}: {e}") from e


def _detect_format(path: Path) -> str | None:
    """A short name for the tokenizer format of ``path`` (one of TOKENIZER_TYPES), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    stripped = head.lstrip()
    if stripped.startswith(b"{"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        # Every tokenizers-library file has a "model" section (BPE, Unigram, WordPiece, ...).
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            return "huggingface"
        return None
    if _looks_like_tiktoken(head):
        return "tiktoken"
    # SentencePiece models are serialized protobufs (binary): the only reliable test is loading.
    try:
        from sentencepiece import SentencePieceProcessor

        SentencePieceProcessor(model_file=str(path))
        return "sentencepiece"
    except Exception:
        return None


def _looks_like_tiktoken(head: bytes) -> bool:
    lines = head.split(b"\n")
    if len(head) == 4096:
        lines = lines[:-1]  # the last one may be cut off
    lines = [ln.strip() for ln in lines if ln.strip()]
    if not lines:
        return False
    for line in lines[:20]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            return False
        try:
            base64.b64decode(parts[0], validate=True)
        except ValueError:
            return False
    return True


def download_tokenizer(
    repo_id: str,
    filename: str = "tokenizer.json",
    local_dir: str | Path = "tokenizers",
    token: str | None = None,
) -> Path:
    """Fetch one tokenizer file from the Hugging Face Hub into ``local_dir``; returns its path.

    Examples: ``download_tokenizer("meta-llama/Meta-Llama-3.1-8B", "original/tokenizer.model")``
    (tiktoken), ``download_tokenizer("meta-llama/Llama-2-7b-hf", "tokenizer.model")``
    (SentencePiece), ``download_tokenizer("gpt2", "tokenizer.json")``. The file keeps its path
    inside the repository (``local_dir/original/tokenizer.model``).

    ``token`` defaults to ``$HF_TOKEN`` (or the login saved by ``hf auth login``); gated
    repositories such as meta-llama need one. Errors are raised as `lathe.errors.ConfigError`
    with what went wrong and what to do: offline, unauthorized/gated, no such repository or file.
    """
    from lathe.errors import ConfigError

    try:
        from huggingface_hub import errors as hub_errors
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise ConfigError("tokenizer download", "needs the huggingface_hub package",
                          "pip install huggingface_hub") from None
    token = token or os.environ.get("HF_TOKEN") or None
    where = f"{repo_id}/{filename}"
    try:
        out = hf_hub_download(repo_id=repo_id, filename=filename, local_dir=str(local_dir), token=token)
    except hub_errors.GatedRepoError:
        raise ConfigError(where, "the repository is gated and this account has no access",
                          "accept its license on huggingface.co, then pass --hf-token or set HF_TOKEN") from None
    except hub_errors.RepositoryNotFoundError:
        raise ConfigError(where, "repository not found, or it is private and no valid token was given",
                          "check the repo id; for gated/private repos pass --hf-token or set HF_TOKEN") from None
    except (hub_errors.RemoteEntryNotFoundError, hub_errors.RevisionNotFoundError):
        raise ConfigError(where, "no such file in the repository",
                          "check --filename (Llama 3: original/tokenizer.model or tokenizer.json; "
                          "Llama 2: tokenizer.model)") from None
    except hub_errors.LocalEntryNotFoundError:
        raise ConfigError(where, "cannot reach the Hugging Face Hub (offline?) and the file is not cached",
                          "check the internet connection / HF_ENDPOINT / proxy, unset HF_HUB_OFFLINE, "
                          "or copy the file here and use --model.tokenizer_path") from None
    except hub_errors.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status in (401, 403):
            raise ConfigError(where, f"unauthorized (HTTP {status})",
                              "pass a valid --hf-token or set HF_TOKEN (huggingface.co/settings/tokens)") from None
        raise ConfigError(where, f"download failed: {e}", "try again later") from None
    except OSError as e:  # connection errors that huggingface_hub did not wrap
        raise ConfigError(where, f"download failed: {e}",
                          "check the internet connection, or copy the file here and use --model.tokenizer_path") from None
    path = Path(out)
    logger.info("downloaded %s to %s", where, path)
    return path


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
