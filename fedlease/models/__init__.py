"""Base models, LoRA adapters and the mixture-of-LoRA-experts layer."""
