"""llama.cpp's K-quant mixes (``llama_tensor_get_type``): which GGUF type each tensor of a Q2_K ... Q6_K file gets.

A mix names a default K type and raises the precision of the tensors that matter most: the output head
(or the tied token embedding) to Q6_K, ``attn_v`` / ``ffn_down`` in some layers, ``attn_output`` in the low-bit
mixes.  A K type needs rows of a multiple of 256 weights; other widths take llama.cpp's fallback type
(``K_FALLBACK``), and the head / tied embedding takes Q8_0.  Rules for Falcon, 70B-class models and 8-expert
MoE models are not reproduced (lowbit exports none of them to GGUF).
"""

from __future__ import annotations

from lowbit.export.gguf_kquants import K_FALLBACK, QK_K

MIX_DEFAULT = {"Q2_K": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K",
               "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_rule(kind: str, mix: str, i: int, n: int, n_gqa: int) -> str | None:
    """The type a mix gives tensor ``kind`` of layer ``i`` of ``n``, or None for the mix's default."""
    if kind == "attn_v":
        rules = {"Q2_K": "Q4_K" if n_gqa >= 4 else "Q3_K", "Q3_K_M": "Q5_K" if i < 2 else "Q4_K", "Q3_K_L": "Q5_K",
                 "Q4_K_M": "Q6_K" if use_more_bits(i, n) else None, "Q5_K_M": "Q6_K" if use_more_bits(i, n) else None,
                 "Q4_K_S": "Q5_K" if i < 4 else None}
        return rules.get(mix)
    if kind == "ffn_down":
        rules = {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if i < n // 16 else "Q4_K", "Q3_K_L": "Q5_K",
                 "Q4_K_M": "Q6_K" if use_more_bits(i, n) else None, "Q5_K_M": "Q6_K" if use_more_bits(i, n) else None,
                 "Q4_K_S": "Q5_K" if i < n // 8 else None}
        return rules.get(mix)
    if kind == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix)
    return None


def mix_type(gguf_name: str, mix: str, n_layers: int, width: int = QK_K, has_output: bool = True,
             n_gqa: int = 1) -> str:
    """The GGUF type llama.cpp's ``mix`` gives tensor ``gguf_name`` (rows of ``width`` weights) in a model of
    ``n_layers`` blocks; ``has_output``: the head is its own tensor (else the token embedding is the head);
    ``n_gqa``: query heads per KV head."""
    default = MIX_DEFAULT[mix]
    is_head = gguf_name.startswith("output.") or (not has_output and gguf_name.startswith("token_embd."))
    if is_head:
        return "Q8_0" if width % QK_K else ("Q6_K" if default != "Q8_0" else default)
    parts = gguf_name.split(".")
    chosen = default
    if parts[0] == "blk" and len(parts) > 2:
        chosen = _layer_rule(parts[2], mix, int(parts[1]), n_layers, n_gqa) or default
    if width % QK_K:
        return K_FALLBACK[chosen]
    return chosen
