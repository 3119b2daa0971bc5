"""Tokenizing text on the fly without N times the work: the processes of a job share it.

Without a prepared store (`lathe data prepare`), every process runs the same `PackedStream` over
the same documents: the global window stream is then a function of (seed, position) alone and
resume is exact on any data-parallel degree. The expensive part of that stream is tokenization,
and it need not be repeated: `SplitTokenizer` wraps the run's tokenizer so that, for each batch of
documents the stream tokenizes, process ``r`` of ``N`` tokenizes only a contiguous ``1/N`` of them
(balanced by characters) and one ``all_gather`` over a dedicated gloo group gives every process
the ids of all of them. Every process still builds the identical stream (so nothing about order,
packing, document ids or the resume state changes), but does ``1/N`` of the tokenizing.

What stays N times: every process still reads and decodes (JSON-parses) every record, and for a
Hugging Face dataset streams the whole split. Parsing is a few percent of tokenizing; the
download is not, which is why large runs should prepare their data once and train from the
store, where each rank reads only its share of the tokens.

The processes must call `encode_batch` the same number of times with the same documents. They
do: the stream depends only on the data and the config, never on the rank, and all of them read
it at the same pace (one batch per micro-batch). `lathe.data.loader.DataLoader` keeps this true
when it stops (see ``lockstep`` there).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from lathe.data.tokenizer import Tokenizer


def split_points(texts: Sequence[str], parts: int) -> list[int]:
    """Boundaries cutting ``texts`` into ``parts`` contiguous slices of similar total length."""
    sizes = np.fromiter((len(t) + 1 for t in texts), dtype=np.int64, count=len(texts))
    cum = np.cumsum(sizes)
    total = int(cum[-1]) if len(cum) else 0
    cuts = [int(np.searchsorted(cum, total * k / parts, side="left")) + (1 if total else 0) for k in range(1, parts)]
    cuts = [min(max(c, 0), len(texts)) for c in cuts]
    return [0, *np.maximum.accumulate(cuts).tolist(), len(texts)] if cuts else [0, len(texts)]


class SplitTokenizer(Tokenizer):
    """``tokenizer``, with `encode_batch` shared among the processes of a gloo ``group``."""

    lockstep = True  # every process must call encode_batch alike (see the module docstring)

    def __init__(self, tokenizer: Tokenizer, group=None):
        self.inner = tokenizer
        self.group = group if group is not None else dist.new_group(backend="gloo")
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self._bos_id, self._eos_id, self._pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
        self.tokenized_here = 0  # documents this process tokenized itself

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return self.inner.encode(text, bos=bos, eos=eos)

    def encode_batch(self, texts: Sequence[str], bos: bool, eos: bool) -> list[list[int]]:
        texts = list(texts)
        cuts = split_points(texts, self.world)
        mine = self.inner.encode_batch(texts[cuts[self.rank] : cuts[self.rank + 1]], bos=bos, eos=eos)
        self.tokenized_here += len(mine)
        # One int32 message per process: the lengths of its documents, then their ids.
        lengths = [len(ids) for ids in mine]
        flat = np.fromiter((t for ids in mine for t in ids), dtype=np.int32, count=sum(lengths))
        message = torch.from_numpy(np.concatenate((np.asarray(lengths, dtype=np.int32), flat)))
        size = torch.tensor([message.numel()], dtype=torch.int64)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros(longest, dtype=torch.int32)
        padded[: message.numel()] = message
        gathered = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(gathered, padded, group=self.group)
        out: list[list[int]] = []
        for r, buf in enumerate(gathered):
            n_docs = cuts[r + 1] - cuts[r]
            data = buf[: int(sizes[r].item())].numpy()
            doc_lengths = data[:n_docs]
            ids = data[n_docs:].tolist()
            at = 0
            for n in doc_lengths.tolist():
                out.append(ids[at : at + n])
                at += n
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return self.inner.decode(ids)

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    def __repr__(self) -> str:
        return f"SplitTokenizer({self.inner!r}, {self.world} processes)"
