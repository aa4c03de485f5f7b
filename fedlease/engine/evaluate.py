"""Evaluation: accuracy and macro-F1 for classification, ROUGE-L for generation."""

from __future__ import annotations

from typing import Any

import torch
from sklearn.metrics import f1_score
from torch import nn

from fedlease.engine.batching import chat_prompt, encode_classification
from fedlease.engine.trainer import device


@torch.no_grad()
def predict_labels(model: nn.Module, tokenizer: Any, records: list[dict[str, Any]], max_length: int,
                   batch_size: int) -> list[int]:
    model.eval()
    preds: list[int] = []
    dev = device()
    for start in range(0, len(records), batch_size):
        enc = encode_classification(tokenizer, records[start : start + batch_size], max_length)
        enc.pop("labels")
        logits = model(**{k: v.to(dev) for k, v in enc.items()}).logits
        preds += logits.argmax(-1).tolist()
    return preds


def classification_metrics(preds: list[int], labels: list[int], num_labels: int) -> dict[str, float]:
    correct = sum(p == y for p, y in zip(preds, labels, strict=True))
    return {
        "accuracy": correct / max(1, len(labels)),
        "macro_f1": float(f1_score(labels, preds, labels=list(range(num_labels)), average="macro", zero_division=0)),
    }


def encode_prompts(tokenizer: Any, prompts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Prompts with the chat template, left-padded, as generation reads them. A prompt over `max_length` loses
    its start, as in training (`encode_generation`): its end holds the question and the template's assistant
    turn, which the answer follows."""
    sides = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        enc = tokenizer([chat_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                        truncation=True, max_length=max_length, add_special_tokens=False)
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return {k: enc[k] for k in ("input_ids", "attention_mask")}


def encode_inputs(tokenizer: Any, records: list[dict[str, Any]], kind: str, max_length: int
                  ) -> dict[str, torch.Tensor]:
    """Model inputs of `records` as inference sees them (no labels; prompts only for generation)."""
    if kind == "classification":
        enc = encode_classification(tokenizer, records, max_length)
        enc.pop("labels")
        return enc
    return encode_prompts(tokenizer, [r["prompt"] for r in records], max_length)


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[str], max_length: int, max_new_tokens: int,
             batch_size: int) -> list[str]:
    """Greedy generation with the chat template, left-padded batches."""
    model.eval()
    outs: list[str] = []
    dev = device()
    for start in range(0, len(prompts), batch_size):
        inputs = {k: v.to(dev) for k, v in encode_prompts(tokenizer, prompts[start : start + batch_size],
                                                           max_length).items()}
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        outs += tokenizer.batch_decode(gen[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return [o.strip() for o in outs]


def rouge_l(predictions: list[str], references: list[str]) -> float:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references, strict=True)]
    return sum(scores) / max(1, len(scores))
