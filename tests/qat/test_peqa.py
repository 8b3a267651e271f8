"""PEQA: only scales train, dW/ds = q - z exactly, task files swap in place, conversion back to typed layers."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import LowbitError
from lowbit.packed.intweight import int_weight_of
from lowbit.qat.peqa import convert_peqa, load_task, prepare_peqa, save_task, task_scales
from lowbit.qat.train import train_next_token
from lowbit.quantization import quantize
from lowbit.quantized_layers import quantized_weight


def _quantized(tiny_llama, tiny_calib):
    quantize(tiny_llama, {"name": "t", "methods": [
        {"method": "rtn", "spec": {"type": "int", "bits": 4, "granularity": "group", "group_size": 32,
                                   "symmetric": False, "signed": False}, "ignore": ["lm_head"]}]},
             tiny_calib, batch_size=4, progress=False)
    return tiny_llama


def test_prepare_keeps_the_function_and_trains_only_scales(tiny_llama, tiny_calib):
    model = _quantized(tiny_llama, tiny_calib)
    x = tiny_calib[:2]
    with torch.no_grad():
        ref = model(x).logits
    layers = prepare_peqa(model)
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref, atol=1e-5)  # measured 1e-6: s * (q - z) in another order
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".scale") for n in trainable)
    name, layer = next(iter(layers.items()))
    layer.weight_value().sum().backward()
    q = layer.codes.float() - layer.zero.float().repeat_interleave(32, dim=1)
    assert torch.allclose(layer.scale.grad, q.reshape(q.shape[0], -1, 32).sum(-1))  # dW/ds = q - z, summed


def test_tuning_lowers_the_loss_and_tasks_swap(tiny_llama, tiny_calib, tmp_path):
    model = _quantized(tiny_llama, tiny_calib)
    prepare_peqa(model)
    base = task_scales(model)
    size = save_task(model, tmp_path / "base.safetensors")
    text = torch.arange(64).repeat(8, 1) % 50  # a repetitive "task" the random model does not know
    r = train_next_token(model, text, steps=20, lr=1e-2, batch_size=4)
    assert r.losses[-1] < 0.9 * r.losses[0]  # measured 5.53 -> 4.79 (20 steps)
    assert r.trained_params == sum(s.numel() for s in base.values())
    save_task(model, tmp_path / "task.safetensors")
    load_task(model, tmp_path / "base.safetensors")
    assert all(torch.equal(task_scales(model)[n], s) for n, s in base.items())
    load_task(model, tmp_path / "task.safetensors")
    fp32_bytes = sum(m.codes.numel() * 4 for m in model.modules() if hasattr(m, "codes"))
    assert size < 0.05 * fp32_bytes  # one fp32 scale per 32 weights: measured 3.6% (with the header)
    names = convert_peqa(model)
    layer = model.get_submodule(names[0])
    assert quantized_weight(layer).method == "peqa"
    assert torch.equal(int_weight_of(layer).dequantize(), layer.weight.data)


def test_bad_inputs(tiny_llama, tiny_calib, tmp_path):
    with pytest.raises(LowbitError, match="quantize it first"):
        prepare_peqa(tiny_llama)
    model = _quantized(tiny_llama, tiny_calib)
    prepare_peqa(model)
    with pytest.raises(LowbitError, match="steps must be at least 1"):
        train_next_token(model, tiny_calib, steps=0)
    with pytest.raises(LowbitError, match="at least one batch"):
        train_next_token(model, tiny_calib[:2], steps=1, batch_size=4)
    bad = tmp_path / "bad.safetensors"
    from safetensors.torch import save_file

    save_file({"x.scale": torch.ones(1)}, str(bad), metadata={"format": "lowbit-peqa-scales"})
    with pytest.raises(LowbitError, match="other layers"):
        load_task(model, bad)



def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))} | {"[UNK]": 255}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="[UNK]")


def test_finetune_cli_on_a_saved_checkpoint(tiny_llama, tiny_calib, tmp_path, capsys):
    """The user path: quantize -> save -> lowbit finetune --method peqa -> a task file that swaps in."""
    import json

    from lowbit.cli import main
    from lowbit.models.loading import load_model
    from lowbit.quantization import save_quantized

    model = _quantized(tiny_llama, tiny_calib)
    words = [f"w{i % 40}" for i in range(4000)]
    text = tmp_path / "train.txt"
    text.write_text("\n".join(" ".join(words[i:i + 20]) for i in range(0, len(words), 20)))
    ckpt, _ = save_quantized(model, _word_tokenizer(words), None, tmp_path / "q")
    out = tmp_path / "task"
    args = [str(ckpt), "--steps", "3", "--batch-size", "2", "--seqlen", "16", "--data", str(text), "--out", str(out)]
    assert main(["finetune", *args, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 3 and summary["tokens"] == 3 * 2 * 16 and summary["task_bytes"] > 0
    loaded, _ = load_model(ckpt, require_tokenizer=False)
    prepare_peqa(loaded)
    load_task(loaded, out / "peqa_task.safetensors")  # the task swaps into the saved checkpoint
    (out / "notes.txt").write_text("mine")  # now the directory holds a file lowbit did not write
    assert main(["finetune", *args]) == 2  # refused before any work: --overwrite needed
    assert "error:" in capsys.readouterr().err and (out / "notes.txt").read_text() == "mine"
    assert main(["finetune", *args[:2], "0", *args[3:], "--overwrite"]) == 2  # --steps 0



def test_resume_ends_bit_identical_and_refuses_other_runs(tiny_llama, tiny_calib, tmp_path):
    import copy

    model = _quantized(tiny_llama, tiny_calib)
    prepare_peqa(model)
    start = copy.deepcopy(model)
    text = torch.arange(64).repeat(8, 1) % 50
    kw = {"steps": 6, "lr": 1e-2, "batch_size": 2}
    full_model = copy.deepcopy(start)
    full = train_next_token(full_model, text, **kw)

    killed = copy.deepcopy(start)
    calls = {"n": 0}

    def die_on_fifth(module, args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt

    handle = killed.register_forward_pre_hook(die_on_fifth)
    ckpt = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):
        train_next_token(killed, text, checkpoint=ckpt, every=2, **kw)
    handle.remove()
    resumed_model = copy.deepcopy(start)  # a new process: the model as loaded, plus the checkpoint
    resumed = train_next_token(resumed_model, text, checkpoint=ckpt, every=2, resume=True, **kw)
    assert resumed.resumed_at == 4 and resumed.losses == full.losses
    for (n, a), b in zip(task_scales(full_model).items(), task_scales(resumed_model).values()):
        assert torch.equal(a, b), n
    with pytest.raises(LowbitError, match="another run"):
        train_next_token(copy.deepcopy(start), text[:4], checkpoint=ckpt, resume=True, **kw)  # other data
