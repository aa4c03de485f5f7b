"""Standard peft adapter folders (adapter_config.json + adapter_model.safetensors), so an expert, a
warm-up adapter or a single-LoRA method's client model loads with `PeftModel.from_pretrained`, a
multi-LoRA server or a hub, without this project's code.

A FedLEASE client's full model (its routed mixture) and FedDPA's dual adapter are not standard LoRA:
those stay in the method's final-model folder (`fedlease predict`); their experts / global LoRA export here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fedlease.config import Config
from fedlease.io import atomic_dir, atomic_write_text, save_tensors
from fedlease.models.base import head_linear_name, resolve_model_path

Tensors = dict[str, torch.Tensor]

CARD = """---
library_name: peft
base_model: {base}
tags:
- lora
- federated-learning
- fedlease
---

# {title}

A LoRA adapter (rank {r}, alpha {alpha}, on {targets}) from the FedLEASE pipeline: {what}

```python
from peft import PeftModel
from transformers import {auto}

base = {auto}.from_pretrained("{base}"{labels})
model = PeftModel.from_pretrained(base, "<this folder>")
```
"""


def peft_keys(state: Tensors, head_name: str | None) -> Tensors:
    """Our state keys (lora.<module>.A|B, head.weight|bias) in peft's saved-adapter naming."""
    out = {}
    for key, value in state.items():
        kind, _, rest = key.partition(".")
        if kind == "lora":
            module, _, part = rest.rpartition(".")
            out[f"base_model.model.{module}.lora_{part}.weight"] = value
        elif kind == "head" and head_name is not None:
            out[f"base_model.model.{head_name}.{rest}"] = value
    return out


def write_adapter(folder: Path, cfg: Config, state: Tensors, what: str, num_labels: int | None = None) -> None:
    """A peft LoRA adapter folder from `state` (lora.* and, for a classifier, head.*), written atomically."""
    from peft import LoraConfig as PeftLoraConfig

    classification = cfg.data.kind == "classification"
    base = cfg.model.name if not cfg.model.name.startswith("packaged:") else resolve_model_path(
        cfg.model, Path(cfg.data.cache_dir))
    head = None
    if classification and any(k.startswith("head.") for k in state):
        head = _head_name(cfg)
    config = PeftLoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                            target_modules=list(cfg.lora.target_modules), bias="none",
                            # a head-less classifier adapter (an expert) has no task type: LoRA weights only
                            task_type=("SEQ_CLS" if head else None) if classification else "CAUSAL_LM",
                            modules_to_save=[head] if head else None, base_model_name_or_path=str(base))
    with atomic_dir(folder) as tmp:
        config.save_pretrained(str(tmp))
        save_tensors(tmp / "adapter_model.safetensors", peft_keys(state, head), {"format": "pt"})
        auto = "AutoModelForSequenceClassification" if classification else "AutoModelForCausalLM"
        atomic_write_text(tmp / "README.md", CARD.format(
            base=base, title=folder.name, r=cfg.lora.r, alpha=cfg.lora.alpha,
            targets=", ".join(cfg.lora.target_modules), what=what, auto=auto,
            labels=f", num_labels={num_labels}" if head and num_labels else ""))


def _head_name(cfg: Config) -> str:
    """The head's output Linear in the base model (where peft saves it: modules_to_save)."""
    from fedlease.runtime import runtime_for
    from fedlease.strategies.base import ModelSpec

    rt = runtime_for(cfg)
    assert cfg.model.head_module is not None
    return head_linear_name(rt.build(ModelSpec(r=cfg.lora.r)).model.get_base_model(), cfg.model.head_module)
