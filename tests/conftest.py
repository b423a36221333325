"""Shared fixtures: the prepared SmolLM2 checkpoint, transformers reference outputs, logs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest


@pytest.fixture(scope="module", autouse=True)
def _no_triton_interpreter(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Outside tests/kernels, child processes (SGLang servers) must not run Triton interpreted."""
    if "kernels" in request.path.parts:
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        yield


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The embedded SmolLM2 checkpoint (bf16), prepared once per cache folder."""
    from sgl_kvext.model_prep import prepare_smollm2

    return prepare_smollm2().path


@pytest.fixture(scope="session")
def hf_greedy(model_path: Path) -> Callable[[Sequence[str], int], list[list[int]]]:
    """Greedy continuations from transformers in float32: the exactness reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()

    # Several server tests ask for the same prompts; transformers runs each once per session
    # (slowly: an idle SGLang scheduler keeps one of the two cores busy meanwhile).
    done: dict[tuple[str, int], list[int]] = {}

    def generate(prompts: Sequence[str], max_new_tokens: int) -> list[list[int]]:
        for prompt in prompts:
            if (prompt, max_new_tokens) in done:
                continue
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id)
            done[prompt, max_new_tokens] = out[0, ids.shape[1]:].tolist()
        return [list(done[p, max_new_tokens]) for p in prompts]

    return generate


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """One real SeaweedFS S3 server on loopback for the session."""
    from sgl_kvext.seaweedfs import SeaweedFS

    root = tmp_path_factory.mktemp("seaweed")
    with SeaweedFS(root / "data", log_path=root / "weed.log") as server:
        yield server


@pytest.fixture(scope="session")
def n_tokens(model_path: Path) -> Callable[[str], int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return lambda text: len(tok(text, add_special_tokens=False).input_ids)
