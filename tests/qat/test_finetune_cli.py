"""``lowbit finetune --method qlora|lora|peqa|qat`` end to end on a tiny saved Llama: what each writes loads
back (plain peft, transformers, lowbit's loader and ``lowbit eval``), and bad input is one ``error:`` line."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch

peft = pytest.importorskip("peft")

from lowbit.finetune import finetune  # noqa: E402
from lowbit.qat.merge import merge_lora  # noqa: E402

FAST = ["--steps", "3", "--batch-size", "2", "--seqlen", "16", "--lr", "1e-2", "--rank", "4"]


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))} | {"[UNK]": 255}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]")


@pytest.fixture()
def saved(tiny_llama, tmp_path):
    """(full-precision model directory, training text file, the model) for the CLI."""
    words = [f"w{i % 40}" for i in range(4000)]
    text = tmp_path / "train.txt"
    text.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, len(words), 20)))
    base = tmp_path / "base"
    tiny_llama.save_pretrained(base)
    _word_tokenizer(words).save_pretrained(base)
    return base, text, tiny_llama


def _json(run_cli, *argv: str) -> dict:
    code, out, err = run_cli("finetune", *argv, "--json")
    assert code == 0, err
    return json.loads(out)  # stdout holds the JSON object and nothing else


def _lora_weights(model) -> dict[str, torch.Tensor]:
    return {n.split("base_model.model.")[-1]: p for n, p in model.named_parameters() if "lora_" in n}


def test_qlora_writes_an_adapter_plain_peft_loads_and_a_merged_checkpoint(saved, run_cli, tmp_path):
    from transformers import AutoModelForCausalLM

    base, text, fp = saved
    out = tmp_path / "qlora"
    s = _json(run_cli, str(base), "--method", "qlora", *FAST, "--data", str(text), "--merge", "dequantized",
              "--out", str(out))
    assert s["base_bits_per_weight"] == pytest.approx(4.137, abs=1e-3)  # 4.127 + the per-layer fp32 offsets
    assert s["tokens"] == 3 * 2 * 16 and s["layers"] == 14 and s["rank"] == 4 and s["alpha"] == 8
    assert json.loads((out / "finetune.json").read_text())["loss_last"] == s["loss_last"]
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(fp), out / "adapter")  # plain peft, full-precision base
    lora = _lora_weights(plain)
    assert len(lora) == 2 * 14 and any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")  # an ordinary HF checkpoint
    assert not any("lora" in n for n in merged.state_dict())
    assert type(merged.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_merge_folds_the_adapters_into_the_nf4_base_exactly(tiny_llama):
    text = torch.arange(64).repeat(8, 1) % 50
    finetune(tiny_llama, None, "qlora", text, steps=4, lr=1e-2, rank=4)  # adapters injected in place
    x = text[:2, :32]
    with torch.no_grad():
        trained = tiny_llama(x).logits
        merged = merge_lora(tiny_llama)(x).logits
    assert torch.allclose(trained, merged, atol=1e-5)  # measured 2.4e-7: (W + BA) x against W x + B(A x)


def test_lora_merge_dequantized_matches_plain_peft_and_requantized_evaluates(saved, run_cli, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.models.loading import load_model
    from lowbit.packed.qlinear import QuantLinear

    base, text, fp = saved
    out = tmp_path / "lora"
    s = _json(run_cli, str(base), "--method", "lora", *FAST, "--optim", "adamw8bit", "--data", str(text),
              "--merge", "dequantized", "--out", str(out))
    assert s["optimizer"] == "adamw8bit" and s["base_bits_per_weight"] == 32.0
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(fp), out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    x = torch.arange(32).reshape(2, 16)
    with torch.no_grad():
        assert torch.allclose(plain(x).logits, merged(x).logits, atol=1e-5)  # measured 2.4e-7
    out2 = tmp_path / "lora-rq"
    s = _json(run_cli, str(base), "--method", "lora", *FAST, "--data", str(text), "--merge", "requantized",
              "--spec", "W4_G64", "--out", str(out2))
    assert s["merged_format"] == "compressed-tensors" and s["merged_bits_per_weight"] == 4 + 36 / 64
    model, _ = load_model(out2 / "merged")
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    code, stdout, err = run_cli("eval", str(out2 / "merged"), "--dataset", str(text), "--seqlen", "16",
                                "--max-windows", "2", "--json")
    assert code == 0, err
    assert json.loads(stdout)["perplexity"] > 1


def test_qat_writes_a_quantized_checkpoint_lowbit_loads_evaluates_and_exports(saved, run_cli, tmp_path):
    from lowbit.models.loading import load_model
    from lowbit.packed.qlinear import QuantLinear

    base, text, _ = saved
    out = tmp_path / "qat"
    s = _json(run_cli, str(base), "--method", "qat", *FAST, "--spec", "W4_G32", "--optim", "adamw4bit",
              "--data", str(text), "--out", str(out))
    assert s["layers"] == 14 and s["bits_per_weight"] == 4 + 36 / 32  # fp32 scale + 4-bit zero per 32
    assert s["loss_last"] < s["loss_first"]
    model, _ = load_model(out)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert json.loads((out / "finetune.json").read_text())["method"] == "qat"
    code, stdout, err = run_cli("eval", str(out), "--dataset", str(text), "--seqlen", "16", "--max-windows", "2",
                                "--json")
    assert code == 0, err
    assert 1 < json.loads(stdout)["perplexity"] < 256
    code, _, err = run_cli("export", str(out), str(tmp_path / "fq"), "--format", "fake-quant")
    assert code == 0, err


def test_qat_to_nf4_keeps_min_max_ranges_and_evaluates(saved, run_cli, tmp_path):
    from lowbit.models.loading import load_model

    base, text, _ = saved
    out = tmp_path / "qat-nf4"
    s = _json(run_cli, str(base), "--method", "qat", *FAST, "--spec", "NF4", "--data", str(text), "--out", str(out))
    assert s["learned_ranges"] is False and s["format"] == "fake-quant"
    assert s["bits_per_weight"] == pytest.approx(4.13, abs=0.02)  # NF4 + double quant, small layers
    model, _ = load_model(out)  # fake-quant: the weights on the NF4 grid, at most 16 values per block of 64
    w = model.model.layers[0].self_attn.q_proj.weight.detach().reshape(-1, 64)
    assert max(row.unique().numel() for row in w) <= 16
    code, stdout, err = run_cli("eval", str(out), "--dataset", str(text), "--seqlen", "16", "--max-windows", "2",
                                "--json")
    assert code == 0, err


def test_peqa_on_a_quantized_checkpoint(saved, run_cli, tmp_path):
    from lowbit.models.loading import load_model
    from lowbit.qat.peqa import load_task, prepare_peqa

    base, text, _ = saved
    q = tmp_path / "q"
    assert run_cli("finetune", str(base), "--method", "qat", "--steps", "1", *FAST[2:], "--data", str(text),
                   "--out", str(q), "--json")[0] == 0  # a quantized checkpoint to tune (one QAT step)
    s = _json(run_cli, str(q), "--method", "peqa", *FAST, "--data", str(text), "--out", str(tmp_path / "task"))
    assert s["task_bytes"] > 0 and s["base_bits_per_weight"] == 4 + 36 / 64
    loaded, _ = load_model(q, require_tokenizer=False)
    prepare_peqa(loaded)
    load_task(loaded, tmp_path / "task" / "peqa_task.safetensors")


def test_progress_line_shows_loss_speed_and_steps():
    from lowbit.cli.finetune import ProgressLine

    buf = io.StringIO()
    line = ProgressLine(buf)
    for step in (1, 2, 3):
        line(step, 3, 2.5 / step, 64 * step, 0.5 * step)
    line.close()
    text = buf.getvalue()
    assert "3/3" in text and "loss 0.8333" in text and "128 tok/s" in text


BAD = [
    (["--steps", "0"], "--steps must be at least 1"),
    (["--method", "sft"], "unknown method 'sft'"),
    (["--method", "lora", "--rank", "0"], "--rank must be at least 1"),
    (["--method", "peqa", "--merge", "dequantized"], "--merge folds LoRA adapters"),
    (["--method", "qat", "--spec", "NF4", "--ranges", "learned"], "--method qat cannot train spec NF4"),
    (["--method", "qat", "--spec", "{type: codebook, fmt: kmeans, bits: 3, granularity: channel}"], "is fitted"),
    (["--method", "qat", "--spec", "W9_G1"], "unknown preset"),
    (["--optim", "sgd"], "unknown optimizer 'sgd'"),
    (["--method", "lora", "--targets", "nope_proj"], "--targets nope_proj match no linear layer"),
    (["--method", "lora", "--batch-size", "64", "--seqlen", "128"], "less than one batch of 64 x 128"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[b[1].split()[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_one_error_line(saved, run_cli, tmp_path, extra, needle):
    base, text, _ = saved
    args = ["finetune", str(base), "--steps", "2", "--batch-size", "2", "--seqlen", "16", "--data", str(text),
            "--out", str(tmp_path / "o")]
    code, out, err = run_cli(*args, *extra)
    assert code == 2 and out == "" and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert needle in err, err
    assert not (tmp_path / "o").exists()


def test_resume_takes_its_own_run_and_refuses_another_in_one_error_line(saved, run_cli, tmp_path):
    base, text, _ = saved
    ckpt = tmp_path / "state.pt"
    args = [str(base), "--method", "lora", *FAST, "--data", str(text), "--checkpoint", str(ckpt)]
    first = _json(run_cli, *args, "--save-every", "1", "--out", str(tmp_path / "a"))
    again = _json(run_cli, *args, "--resume", "--out", str(tmp_path / "a2"))  # the same run: taken up at its end
    assert again["resumed_at_step"] == 3 and again["loss_last"] == first["loss_last"]
    code, out, err = run_cli("finetune", *args[:-4], "--lr", "5e-3", *args[-4:], "--resume",
                             "--out", str(tmp_path / "b"))
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and "belongs to another run" in err, err
    assert not (tmp_path / "b").exists()


def test_training_windows_cycle_over_a_short_text_instead_of_failing(saved):
    from transformers import AutoTokenizer

    from lowbit.data.training import training_windows

    base, text, _ = saved
    tok = AutoTokenizer.from_pretrained(base)
    assert training_windows(str(text), tok, 3, 2, 16).shape == (6, 16)  # what the steps use
    assert training_windows(str(text), tok, 1000, 2, 16).shape == (250, 16)  # what 4000 tokens hold


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_gradient_checkpointing_trains_the_same_steps(tiny_llama, method):
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(steps=3, batch_size=2, lr=1e-2, rank=4)
    plain = finetune(copy.deepcopy(tiny_llama), None, method, ids, **kw)
    ckpt = finetune(copy.deepcopy(tiny_llama), None, method, ids, gradient_checkpointing=True, **kw)
    assert ckpt["loss_last"] == pytest.approx(plain["loss_last"], rel=1e-5)  # measured equal to ~1e-7
