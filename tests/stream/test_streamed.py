"""Streamed (block-at-a-time) compression: the same bytes as the in-memory run, durable blocks that an
interrupted run resumes from with the same bytes, and what it refuses before work."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.quantization import quantize, save_quantized
from lowbit.stream.run import partial_dir, quantize_streamed


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A 3-block Llama saved as safetensors (2 shards, with an index)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("stream") / "src"
    LlamaForCausalLM(cfg).save_pretrained(out, max_shard_size="150KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))


def _in_memory(source: Path, recipe: str, calib: torch.Tensor, out: Path) -> tuple[Path, str]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(source).eval()
    report = quantize(model, recipe, calib, batch_size=4, progress=False)
    return save_quantized(model, None, report, out)


@pytest.fixture(scope="module")
def tied_source(tmp_path_factory) -> Path:
    """A 3-block Llama with its head tied to the embedding (as smollm2): one tensor on disk for both."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("stream") / "tied"
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.mark.parametrize("recipe, fmt, tied", [("gptq-w4g64", "compressed-tensors", False),
                                               ("gptq-w4g64", "compressed-tensors", True),
                                               ("gptq-w3g64-lorc32", "fake-quant", False),
                                               ("sparsegpt50", "fake-quant", True)])
def test_streamed_writes_the_in_memory_bytes(source, tied_source, calib, tmp_path, recipe, fmt, tied):
    source = tied_source if tied else source
    mem, mem_fmt = _in_memory(source, recipe, calib, tmp_path / "mem")
    report, written = quantize_streamed(str(source), recipe, calib, tmp_path / "str", batch_size=4, progress=False)
    assert written == mem_fmt == fmt
    assert (mem / "model.safetensors").read_bytes() == (tmp_path / "str" / "model.safetensors").read_bytes()
    assert (mem / "config.json").read_text() == (tmp_path / "str" / "config.json").read_text()
    assert report.bits_per_weight > 0 and len(report.layers) == 3 * 7
    assert not partial_dir(tmp_path / "str").exists()


def test_an_interrupted_run_resumes_to_the_same_bytes(source, calib, tmp_path, monkeypatch):
    from lowbit.stream import run as stream_run

    whole, _ = quantize_streamed(str(source), "gptq-w4g64", calib, tmp_path / "whole", batch_size=4, progress=False)
    done = stream_run._StreamedBlocks.done

    def crash_after_block_1(self, index, *args):
        done(self, index, *args)
        if index == 1:
            raise KeyboardInterrupt  # the run is killed once block 1 is durable

    monkeypatch.setattr(stream_run._StreamedBlocks, "done", crash_after_block_1)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        quantize_streamed(str(source), "gptq-w4g64", calib, out, batch_size=4, progress=False)
    monkeypatch.setattr(stream_run._StreamedBlocks, "done", done)
    assert not out.exists() and (partial_dir(out) / "state.json").is_file()
    with pytest.raises(LowbitError, match="--resume"):
        quantize_streamed(str(source), "gptq-w4g64", calib, out, batch_size=4, progress=False)
    with pytest.raises(LowbitError, match="another model, recipe"):
        quantize_streamed(str(source), "rtn-w4g64", calib, out, batch_size=4, progress=False, resume=True)
    report, _ = quantize_streamed(str(source), "gptq-w4g64", calib, out, batch_size=4, progress=False, resume=True)
    assert report.extra["streamed"]["resumed_at_block"] == 2
    assert len(report.layers) == 3 * 7
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not partial_dir(out).exists()


@pytest.mark.parametrize("recipe, message", [
    ("w8a8-smoothquant", "transforms the whole model"),
    ({"name": "owl", "methods": [{"method": "wanda", "ignore": ["lm_head"], "options": {"sparsity": 0.5, "owl": True}}]},
     "OWL"),
    ("qat-block-e2e-w3g64", "whole model after the blocks"),
    ("lowrank80-svd-llm", "two linears"),
])
def test_whole_model_steps_are_refused_before_work(source, calib, tmp_path, recipe, message):
    with pytest.raises(LowbitError, match=message):
        quantize_streamed(str(source), recipe, calib, tmp_path / "o", batch_size=4, progress=False)
    assert not (tmp_path / "o").exists() and not partial_dir(tmp_path / "o").exists()


def test_cli_streamed_run_and_its_errors(run_cli, small_model_dir, tmp_path, clean_error):
    out = tmp_path / "q"
    code, stdout, err = run_cli("quantize", str(small_model_dir), "--recipe", "rtn-w4g64", "--streamed", "--out",
                                str(out), "--nsamples", "4", "--seqlen", "64")
    assert code == 0, err
    assert "compressed-tensors" in stdout and (out / "tokenizer.json").is_file()
    from lowbit.models.loading import load_model

    model, tok = load_model(out)
    assert tok is not None and model.config.num_hidden_layers == 2
    clean_error(*run_cli("quantize", str(small_model_dir), "--streamed")[::2], "--out")
    clean_error(*run_cli("quantize", str(small_model_dir), "--resume", "--out", str(tmp_path / "r"))[::2],
                "--streamed")
    clean_error(*run_cli("quantize", str(small_model_dir), "--streamed", "--eval", "--out", str(tmp_path / "e"))[::2],
                "--eval")


def test_spilled_activations_give_the_same_bytes_and_resume(source, calib, tmp_path, monkeypatch):
    from lowbit.stream import run as stream_run

    plan = stream_run.memory_plan(_meta(source), calib, 4, None)
    assert not plan.spill and plan.in_ram - plan.minimum == 2 * 8 * 32 * 64 * 4 // 2  # two batches of (4, 32, 64) fp32
    assert stream_run.memory_plan(_meta(source), calib, 4, plan.in_ram + (64 << 20)).spill is False
    # the tiny model's activations are too small to spill by a budget (this process's memory moves more than they
    # weigh): force the plan that a tight budget gives
    quantize_streamed(str(source), "gptq-w4g64", calib, tmp_path / "ram", batch_size=4, progress=False)
    monkeypatch.setattr(stream_run, "memory_plan", lambda *a: stream_run.MemoryPlan(0, 0, True))
    budget = 1 << 30
    done = stream_run._StreamedBlocks.done

    def crash_after_block_0(self, index, *args):
        done(self, index, *args)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(stream_run._StreamedBlocks, "done", crash_after_block_0)
    out = tmp_path / "disk"
    with pytest.raises(KeyboardInterrupt):
        quantize_streamed(str(source), "gptq-w4g64", calib, out, batch_size=4, progress=False, max_memory=budget)
    monkeypatch.setattr(stream_run._StreamedBlocks, "done", done)
    assert sorted(p.name for p in (partial_dir(out) / "hidden").iterdir()) == ["gen-1"]
    quantize_streamed(str(source), "gptq-w4g64", calib, out, batch_size=4, progress=False, max_memory=budget,
                      resume=True)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ram" / "model.safetensors").read_bytes()


def test_a_budget_below_one_block_names_the_minimum(source, calib, tmp_path):
    with pytest.raises(LowbitError, match=r"at least \d+ MiB"):
        quantize_streamed(str(source), "gptq-w4g64", calib, tmp_path / "o", batch_size=4, progress=False,
                          max_memory=10 << 20)
    assert not partial_dir(tmp_path / "o").exists()


def _meta(source: Path):
    import torch
    from transformers import AutoConfig

    from lowbit.stream.weights import meta_model

    return meta_model(AutoConfig.from_pretrained(source), torch.float32)


def test_an_output_lowbit_did_not_write_is_refused_before_work(source, calib, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(LowbitError, match="overwrite"):
        quantize_streamed(str(source), "rtn-w4g64", calib, out, batch_size=4, progress=False)
    assert not partial_dir(out).exists() and (out / "notes.txt").read_text() == "the user's"
    quantize_streamed(str(source), "rtn-w4g64", calib, out, batch_size=4, progress=False, overwrite=True)
    assert (out / "model.safetensors").is_file() and not (out / "notes.txt").exists()
