"""GGUF inputs are converted once, kept under the file's content hash, and reused by later commands."""

from __future__ import annotations

import shutil

import torch

from lowbit.models import loading


def _counting(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = loading.convert_gguf_to_hf

    def count(path, out, source):
        calls.append(source["sha256"])
        return real(path, out, source)
    monkeypatch.setattr(loading, "convert_gguf_to_hf", count)
    return calls


def test_a_gguf_file_is_converted_once_by_content(tiny, tmp_path, monkeypatch):
    from lowbit.export.gguf import export_gguf

    monkeypatch.setenv("LOWBIT_GGUF_CACHE", str(tmp_path / "cache"))
    src = tiny.save("llama", tmp_path / "src")
    model, tok = loading.load_model(src)
    export_gguf(model, tok, tmp_path / "a.gguf", "F32", "F32")
    calls = _counting(monkeypatch)
    first, _ = loading.load_model(tmp_path / "a.gguf")
    shutil.copy(tmp_path / "a.gguf", tmp_path / "renamed.gguf")
    second, tok2 = loading.load_model(tmp_path / "renamed.gguf")  # same bytes, another name: no conversion
    assert len(calls) == 1 and calls[0] == loading.gguf_digest(tmp_path / "a.gguf")
    assert (tmp_path / "cache" / calls[0][:24] / "config.json").is_file()
    assert second.lowbit_source.kind == "gguf" and tok2 is not None
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k
    export_gguf(model, tok, tmp_path / "b.gguf", "Q8_0", "F32")  # other bytes: converted anew
    loading.load_model(tmp_path / "b.gguf")
    assert len(calls) == 2 and calls[1] != calls[0]


def test_the_cache_can_be_switched_off(tiny, tmp_path, monkeypatch):
    from lowbit.export.gguf import export_gguf

    model, tok = loading.load_model(tiny.save("llama", tmp_path / "src"))
    export_gguf(model, tok, tmp_path / "a.gguf", "F32", "F32")
    monkeypatch.setenv("LOWBIT_GGUF_CACHE", "off")
    calls = _counting(monkeypatch)
    back, _ = loading.load_model(tmp_path / "a.gguf")  # converted in memory, nothing written
    assert calls == [] and back.lowbit_source.kind == "gguf"
