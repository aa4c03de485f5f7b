"""Turn records into padded tensor batches (classification and instruction tuning)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


class TruncationError(ValueError):
    """A generation example lost every response token to truncation (its loss would be NaN)."""


@dataclass
class Batch:
    tensors: dict[str, torch.Tensor]
    size: int


def encode_classification(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
    texts = [r["text"] for r in records]
    pairs = [r.get("text_pair") for r in records]
    if any(p is not None for p in pairs):
        enc = tokenizer(texts, [p or "" for p in pairs], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
    else:
        enc = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    enc = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    enc["labels"] = torch.tensor([r["label"] for r in records], dtype=torch.long)
    return enc


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """The model's chat template around a user prompt (plain text if it has none)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{prompt}\n"


def encode_generation(tokenizer: Any, records: list[dict[str, Any]], max_length: int) -> dict[str, torch.Tensor]:
    """Prompt + response, loss only on response tokens; left-truncates the prompt, never the whole answer."""
    rows, masks = [], []
    eos = tokenizer.eos_token or ""
    for i, r in enumerate(records):
        p_ids = tokenizer(chat_prompt(tokenizer, r["prompt"]), add_special_tokens=False)["input_ids"]
        a_ids = tokenizer(r["response"] + eos, add_special_tokens=False)["input_ids"]
        a_ids = a_ids[: max_length // 2] if len(p_ids) + len(a_ids) > max_length else a_ids
        room = max_length - len(a_ids)
        p_ids = p_ids[-room:] if room > 0 else []
        if not a_ids:
            raise TruncationError(f"example {i}: no response token survives max_length={max_length}")
        rows.append(p_ids + a_ids)
        masks.append([0] * len(p_ids) + [1] * len(a_ids))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (row, m) in enumerate(zip(rows, masks, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        att[i, : len(row)] = 1
        labels[i, : len(row)] = torch.where(torch.tensor(m) == 1, torch.tensor(row), torch.tensor(-100))
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def iterate_batches(tokenizer: Any, records: list[dict[str, Any]], kind: str, batch_size: int, max_length: int,
                    epochs: int, seed: int) -> Iterator[Batch]:
    """Seeded shuffled mini-batches over `epochs` passes."""
    encode = encode_classification if kind == "classification" else encode_generation
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(records))
        for start in range(0, len(order), batch_size):
            chunk = [records[i] for i in order[start : start + batch_size]]
            yield Batch(encode(tokenizer, chunk, max_length), len(chunk))


def worst_case_batch(tokenizer: Any, kind: str, batch_size: int, max_length: int) -> Batch:
    """The largest batch training can meet: `batch_size` sequences of `max_length` tokens, one position
    padded (real batches are padded, which decides the attention path); for generation every position
    after the first is scored (the LM head runs over all of them). Only its shape matters (`trainer.reserve_memory`)."""
    enc = tokenizer(["memory " * max_length] * batch_size, truncation=True, max_length=max_length,
                    padding="max_length", return_tensors="pt")
    tensors = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    tensors["attention_mask"][-1, -1] = 0
    if kind == "classification":
        tensors["labels"] = torch.zeros(batch_size, dtype=torch.long)
    else:
        labels = tensors["input_ids"].clone()
        labels[:, 0] = -100
        tensors["labels"] = labels
    return Batch(tensors, batch_size)
