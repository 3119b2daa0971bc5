"""Tokenizer formats behind one interface: detection, round trips, Llama 3 specials, long inputs,
the vocabulary check, and the Hub download's error messages (no network needed)."""

from __future__ import annotations

import json
import shutil

import pytest
from test_data_fixtures import (
    cfg_for,
    make_docs,
    train_sentencepiece,
    write_tiktoken_file,
)

from lathe.data import build_tokenizer, resolve_vocab_size
from lathe.data.tokenizer import (
    DEFAULT_TOKENIZER_PATH,
    LLAMA3_PAT_STR,
    HFTokenizer,
    SentencePieceTokenizer,
    TikTokenizer,
    download_tokenizer,
    llama3_special_tokens,
    load_tokenizer,
)
from lathe.errors import ConfigError

tiktoken = pytest.importorskip("tiktoken")
sentencepiece = pytest.importorskip("sentencepiece")

ODD_TEXTS = [
    "",
    "Hello, world!",
    "  leading spaces and trailing  ",
    "über naïve café — “quotes” 数据 🤖👍🏽 e\u0301",
    "\x00\x01\x7f\x80 \t\r\n\r\n\x0c\u2028\ufeff\ufffd",
    "def f(x):\n\treturn x ** 2  # comment\n",
    "text that mentions <|end_of_text|>, <|begin_of_text|>, <s> and </s> literally",
]


@pytest.fixture(scope="module")
def tok_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("toks")
    texts = make_docs(300, seed=3, max_words=20)
    return {
        "tiktoken": write_tiktoken_file(d / "llama3" / "tokenizer.model", texts),
        "sentencepiece": train_sentencepiece(d / "llama2" / "tokenizer", texts),
        "huggingface": DEFAULT_TOKENIZER_PATH,
    }


@pytest.mark.parametrize("kind,cls", [("huggingface", HFTokenizer), ("tiktoken", TikTokenizer),
                                      ("sentencepiece", SentencePieceTokenizer)])
def test_each_format_is_detected_and_round_trips(tok_files, kind, cls):
    tok = load_tokenizer(tok_files[kind])  # auto: from the content, not the file name
    assert isinstance(tok, cls)
    assert isinstance(load_tokenizer(tok_files[kind], kind=kind), cls)
    for text in ODD_TEXTS:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        inner = ids[1:-1]
        assert all(0 <= i < tok.vocab_size for i in ids)
        # Special-token text in a document is text: never a BOS/EOS id in the middle.
        assert tok.bos_id not in inner and tok.eos_id not in inner
        assert tok.decode(ids) == text, (kind, text)
    batch = tok.encode_batch(ODD_TEXTS, bos=True, eos=False)
    assert batch == [tok.encode(t, bos=True, eos=False) for t in ODD_TEXTS]


def test_tiktoken_llama3_special_tokens(tok_files):
    tok = load_tokenizer(tok_files["tiktoken"])
    specials = llama3_special_tokens()
    assert len(specials) == 256
    assert specials[:2] == ["<|begin_of_text|>", "<|end_of_text|>"]
    assert specials[6:10] == ["<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"]
    assert specials[-1] == "<|reserved_special_token_250|>"
    n = tok.num_base_tokens
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, -1)
    assert tok.vocab_size == n + 256
    assert tok.stop_tokens == {n + 1, n + 9}
    assert LLAMA3_PAT_STR.startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)")
    # The split pattern is Llama 3's: digits go in groups of at most three.
    pieces = [tok.decode([i]) for i in tok.encode("12345", bos=False, eos=False)]
    assert "".join(pieces) == "12345" and all(len(p) <= 3 for p in pieces)


def test_tiktoken_handles_a_million_character_whitespace_run(tok_files):
    tok = load_tokenizer(tok_files["tiktoken"], num_threads=2)
    for text in (" " * 1_000_000, "x" * 300_000 + "\n" * 300_000 + "word " * 1000):
        ids = tok.encode(text, bos=True, eos=True)
        assert tok.decode(ids) == text
    # The batched path takes the same care with long texts.
    assert tok.encode_batch(["a b", " " * 60_000], bos=False, eos=False)[1] == tok.encode(" " * 60_000, False, False)


def test_type_override_and_mismatch(tok_files, tmp_path):
    with pytest.raises(ValueError, match="cannot read .* as a sentencepiece tokenizer .*looks like tiktoken"):
        load_tokenizer(tok_files["tiktoken"], kind="sentencepiece")
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\x00\x01not a tokenizer")
    with pytest.raises(ValueError, match="unrecognised"):
        load_tokenizer(junk)
    # A directory in the Hub's Llama 3 layout resolves to original/tokenizer.model.
    hub = tmp_path / "hub"
    (hub / "original").mkdir(parents=True)
    shutil.copy(tok_files["tiktoken"], hub / "original" / "tokenizer.model")
    assert isinstance(load_tokenizer(hub), TikTokenizer)


def test_hf_tokenizer_with_other_special_token_names(tmp_path):
    """A Llama-2-style tokenizer.json (<s>, </s>) works; tokenizer_config.json can name them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(make_docs(50), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<my_eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<my_eos>"}}))
    assert load_tokenizer(tmp_path).eos_id == 3


def test_build_tokenizer_from_config_and_errors(tok_files, tmp_path):
    tok = build_tokenizer(cfg_for("--model.tokenizer_path", str(tok_files["sentencepiece"])))
    assert isinstance(tok, SentencePieceTokenizer)
    assert isinstance(build_tokenizer(cfg_for()), HFTokenizer)  # the default
    with pytest.raises(ConfigError, match=r"model.tokenizer_path=.*file not found"):
        build_tokenizer(cfg_for("--model.tokenizer_path", str(tmp_path / "nope.model")))
    with pytest.raises(ConfigError, match=r"model.tokenizer_type='tiktoken': cannot read .* huggingface"):
        build_tokenizer(cfg_for("--model.tokenizer_type", "tiktoken"))


def test_vocab_size_resolution_and_mismatch(tok_files):
    tok = load_tokenizer(tok_files["tiktoken"])
    n = tok.vocab_size
    assert resolve_vocab_size(cfg_for(), tok) == n
    assert resolve_vocab_size(cfg_for("--model.vocab_size", str(n + 64)), tok) == n + 64  # padding
    with pytest.raises(ConfigError) as info:
        resolve_vocab_size(cfg_for("--model.vocab_size", "256"), tok)
    msg = str(info.value)
    assert msg.startswith("model.vocab_size=256: smaller than the tokenizer's vocabulary")
    assert "does not match the model" in msg and f">= {n}" in msg


def _raise(exc):
    def f(*args, **kwargs):
        raise exc
    return f


def test_download_tokenizer_errors_and_success(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    calls = []

    def fake_download(repo_id, filename, local_dir, token):
        calls.append((repo_id, filename, token))
        out = tmp_path / "dl" / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("x")
        return str(out)

    monkeypatch.setenv("HF_TOKEN", "hf_env_token")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    path = download_tokenizer("meta-llama/Meta-Llama-3-8B", "original/tokenizer.model", tmp_path / "dl")
    assert path == tmp_path / "dl" / "original" / "tokenizer.model"
    assert calls == [("meta-llama/Meta-Llama-3-8B", "original/tokenizer.model", "hf_env_token")]

    offline = errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise(offline))
    with pytest.raises(ConfigError, match="cannot reach the Hugging Face Hub"):
        download_tokenizer("meta-llama/Meta-Llama-3-8B", "original/tokenizer.model", tmp_path)

    class Resp:
        status_code = 401
        headers: dict = {}
        request = None
        url = "https://huggingface.co"

    unauthorized = errors.HfHubHTTPError("401 Client Error", response=Resp())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raise(unauthorized))
    with pytest.raises(ConfigError, match=r"unauthorized \(HTTP 401\).*hf-token"):
        download_tokenizer("meta-llama/Meta-Llama-3-8B", "original/tokenizer.model", tmp_path, token="bad")


def test_download_tokenizer_really_offline(tmp_path, monkeypatch):
    """The real hf_hub_download in offline mode: a clear message, quickly, no traceback."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="offline"):
        download_tokenizer("meta-llama/Meta-Llama-3-8B", "original/tokenizer.model", tmp_path)
