"""From a run directory to files other tools load: adapters-only safetensors and a full
Hugging Face model directory (LoRA and ungated adapters merged; gated adapters with their
modeling file, a copy of `trainer/method/adapter.py`)."""
