"""The exact prefill's result per prompt, kept on disk across ``sgl-kvext-bench blend`` runs.

A method sweep repeats the same exact prefills run after run (200 prompts of ~3k tokens take
~35 min in float32 on a 2-core AVX2 CPU); with ``--reference-cache DIR`` each is computed once
and later runs read it back. An entry is keyed by everything that decides it: the model
folder, dtype, torch version, the prompt's token ids, the answer length and the stop tokens.
An entry that cannot be read, or reads back malformed, is computed again and overwritten.
The cached ``ttft_s`` is the time measured when the entry was computed (``cached`` says so):
compare speed-ups only within runs on one machine.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import torch


class Reference(NamedTuple):
    """One prompt's exact prefill: its last position's logits, greedy answer and time."""

    last_logits: torch.Tensor
    answer: str
    ttft_s: float
    cached: bool = False


class ReferenceCache:
    """Exact results under ``folder`` (None: nothing kept, every call computes)."""

    def __init__(self, folder: Path | None, model: str, dtype: str, answer_tokens: int,
                 stop: Iterable[int]) -> None:
        self.folder = folder
        self._salt = "\n".join([model, dtype, torch.__version__, str(answer_tokens),
                                ",".join(map(str, sorted(stop)))]).encode()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def path(self, ids: torch.Tensor) -> Path | None:
        if self.folder is None:
            return None
        digest = hashlib.sha256(self._salt)
        digest.update(ids.to(torch.int64).numpy().tobytes())
        return self.folder / f"{digest.hexdigest()[:32]}.pt"

    def get(self, ids: torch.Tensor, compute: Callable[[torch.Tensor], Reference]) -> Reference:
        """The cached result for ``ids``, else ``compute(ids)`` (stored for the next run)."""
        path = self.path(ids)
        if path is not None and path.exists():
            try:
                raw = torch.load(path, weights_only=True)
                ref = Reference(raw["last_logits"], str(raw["answer"]), float(raw["ttft_s"]),
                                True)
                if ref.last_logits.dim() == 1:
                    return ref
            except Exception:       # torch.load raises many kinds; unreadable: compute again
                pass
        ref = compute(ids)
        if path is not None:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"last_logits": ref.last_logits.detach().float().cpu().clone(),
                        "answer": ref.answer, "ttft_s": ref.ttft_s}, tmp)
            tmp.replace(path)
        return ref
