"""Hugging Face classes for a backbone extended with parallel gated adapters (see adapter.py).

A gated adapter cannot be folded into the backbone's weights (the gate scales it per
token), so an exported model ships this file and adapter.py, and config.json's
`auto_map` names the pair of classes below that matches its backbone:

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

Each model class is the backbone's own HF class; after building it, it puts a
`ParallelAdapterMLP` around every layer's MLP, sized from config.json's
"parallel_adapter" entry ({"adapter_size": h, "gate": "relu" | "sigmoid", "method": name}).
The model_type is not the backbone's (`parallel_adapter_<backbone>`), so loading the
directory without trust_remote_code fails instead of silently dropping the adapters.

The file is fixed, not generated: every supported backbone has its classes here, and
exports copy it byte for byte, which is what lets the trainer recognise its own exports
(and their code) by comparing bytes. It needs only torch, transformers and adapter.py.
"""
from transformers import (Gemma2Config, Gemma2ForCausalLM, GemmaConfig, GemmaForCausalLM, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from .adapter import GatedAdapter, ParallelAdapterMLP

CONFIG_KEY = "parallel_adapter"


class _ParallelAdapterConfig:
    """Mixed into a backbone's config class: carries the adapter spec through config.json."""

    def __init__(self, parallel_adapter=None, **kwargs):
        self.parallel_adapter = dict(parallel_adapter or {})
        super().__init__(**kwargs)


class _WithParallelAdapters:
    """Mixed into a backbone's causal-LM class: wraps each layer's MLP once the backbone is built."""

    def __init__(self, config):
        super().__init__(config)
        spec = config.parallel_adapter
        for layer in self.model.layers:
            adapter = GatedAdapter(config.hidden_size, spec["adapter_size"], spec["gate"])
            layer.mlp = ParallelAdapterMLP(layer.mlp, adapter)


class ParallelAdapterLlamaConfig(_ParallelAdapterConfig, LlamaConfig):
    model_type = "parallel_adapter_llama"


class ParallelAdapterLlamaForCausalLM(_WithParallelAdapters, LlamaForCausalLM):
    config_class = ParallelAdapterLlamaConfig


class ParallelAdapterMistralConfig(_ParallelAdapterConfig, MistralConfig):
    model_type = "parallel_adapter_mistral"


class ParallelAdapterMistralForCausalLM(_WithParallelAdapters, MistralForCausalLM):
    config_class = ParallelAdapterMistralConfig


class ParallelAdapterQwen2Config(_ParallelAdapterConfig, Qwen2Config):
    model_type = "parallel_adapter_qwen2"


class ParallelAdapterQwen2ForCausalLM(_WithParallelAdapters, Qwen2ForCausalLM):
    config_class = ParallelAdapterQwen2Config


class ParallelAdapterGemmaConfig(_ParallelAdapterConfig, GemmaConfig):
    model_type = "parallel_adapter_gemma"


class ParallelAdapterGemmaForCausalLM(_WithParallelAdapters, GemmaForCausalLM):
    config_class = ParallelAdapterGemmaConfig


class ParallelAdapterGemma2Config(_ParallelAdapterConfig, Gemma2Config):
    model_type = "parallel_adapter_gemma2"


class ParallelAdapterGemma2ForCausalLM(_WithParallelAdapters, Gemma2ForCausalLM):
    config_class = ParallelAdapterGemma2Config


# The backbone's model_type -> the (config, model) classes that add the adapters to it.
CLASSES = {
    "llama": (ParallelAdapterLlamaConfig, ParallelAdapterLlamaForCausalLM),
    "mistral": (ParallelAdapterMistralConfig, ParallelAdapterMistralForCausalLM),
    "qwen2": (ParallelAdapterQwen2Config, ParallelAdapterQwen2ForCausalLM),
    "gemma": (ParallelAdapterGemmaConfig, ParallelAdapterGemmaForCausalLM),
    "gemma2": (ParallelAdapterGemma2Config, ParallelAdapterGemma2ForCausalLM),
}
