"""Shared fixtures: the real smollm2-135m model (loaded once) and the local data directory.

Tests never touch the Hugging Face hub: ``HF_HUB_OFFLINE=1`` is set here.  Data come from
``$LOWBIT_DATA_DIR``, defaulting to ``../shared/data`` beside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LOWBIT_DATA_DIR", str((REPO.parent / "shared" / "data").resolve()))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DATA_DIR = Path(os.environ["LOWBIT_DATA_DIR"])


@pytest.fixture(scope="session", autouse=True)
def _gguf_conversions(tmp_path_factory):
    """GGUF files the tests write are converted into a session directory, not the user's cache."""
    old = os.environ.get("LOWBIT_GGUF_CACHE")
    os.environ["LOWBIT_GGUF_CACHE"] = str(tmp_path_factory.mktemp("gguf-cache"))
    yield
    if old is None:
        os.environ.pop("LOWBIT_GGUF_CACHE", None)
    else:
        os.environ["LOWBIT_GGUF_CACHE"] = old


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.fail(f"evaluation data not found under LOWBIT_DATA_DIR={DATA_DIR}; point it at shared/data")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm():
    """(model, tokenizer) of the real smollm2-135m in fp32, loaded once per session."""
    import torch

    from lowbit.models.loading import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m")


@pytest.fixture()
def tiny_llama():
    """A randomly initialised 2-block Llama built from a config (no download), fp32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A 2-block Llama (hidden 64) with smollm2's tokenizer, saved as an HF directory (read-only: copy to change)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lowbit.models.loading import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m").path)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    out = tmp_path_factory.mktemp("model") / "small"
    LlamaForCausalLM(cfg).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def tiny_calib():
    """Random token windows for the tiny models: (8, 32) ids below 256."""
    import torch

    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture()
def run_cli(capsys):
    """Run ``lowbit`` in-process: returns ``(exit_code, stdout, stderr)``."""
    from lowbit.cli import main

    def run(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err.strip()

    return run


def _assert_clean_error(code: int, err: str, *needles: str) -> None:
    last = err.splitlines()[-1] if err else ""
    assert code == 2, err
    assert last.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in last, last


@pytest.fixture()
def clean_error():
    """Checker: exit code 2, a last stderr line ``error: ...`` holding every needle, no traceback."""
    return _assert_clean_error


@pytest.fixture()
def real_layer(smollm):
    """Function: layer name -> (weight fp32, its calibration inputs X, Hessian 2/n X^T X) on 4 x 512 wikitext2 tokens."""
    import torch

    from lowbit.data import get_calibration

    model, tok = smollm
    calib = get_calibration("wikitext2", tok, nsamples=4, seqlen=512, seed=0)

    class _Stop(Exception):
        pass

    def capture(name: str):
        layer = dict(model.named_modules())[name]
        xs = []

        def grab(m, a, o):
            xs.append(a[0].reshape(-1, a[0].shape[-1]).float())
            raise _Stop  # nothing after this layer is needed

        hook = layer.register_forward_hook(grab)
        with torch.no_grad():
            try:
                model(calib)
            except _Stop:
                pass
        hook.remove()
        x = torch.cat(xs)
        return layer.weight.data.float(), x, 2 * x.T @ x / x.shape[0]

    return capture
