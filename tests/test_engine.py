"""Engines (DeepSpeed vs plain torch), the generated DeepSpeed config, exact communication bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlease.allocation import Allocation
from fedlease.runtime import ClientRuntime
from fedlease.comm import nbytes
from fedlease.config import TrainingConfig, config_from_dict
from fedlease.engine.batching import Batch, TruncationError, encode_generation, iterate_batches, worst_case_batch
from fedlease.engine.trainer import (DeepSpeedEngine, TorchEngine, deepspeed_config, hook_snapshot,
                                     remove_hooks_since, reserve_memory)
from fedlease.models.adapters import get_state, set_trainable
from fedlease.strategies.base import InitContext, ModelSpec
from fedlease.strategies.fedlease import FedLEASE

from .conftest import tiny_generation_params, tiny_params


def _train(engine, cfg, rt: ClientRuntime, steps_records, reserve: Batch | None = None) -> dict[str, torch.Tensor]:
    model = rt.fresh_model(ModelSpec(r=cfg.lora.r), 2)
    params = set_trainable(model, ("lora", "head"), rt.head_module())
    batches = list(iterate_batches(rt.tokenizer, steps_records, "classification", 8, 16, 1, 0))
    torch.manual_seed(0)
    engine.train(model, params, batches, "classification", reserve=reserve)
    return get_state(model, rt.head_module())


def _records(n: int) -> list[dict]:
    return [{"text": f"word{i} movie", "text_pair": None, "label": i % 2} for i in range(n)]


def test_reserve_steps_change_nothing(tmp_path: Path):
    """The worst-case steps before training (dropout on, so they draw random numbers) leave the trained
    state bit-identical, no gradient behind and the RNG where it was."""
    cfg = config_from_dict(tiny_params(tmp_path))
    rt = ClientRuntime(cfg)
    records = _records(24)
    ref = _train(TorchEngine(cfg.training), cfg, rt, records)
    worst = worst_case_batch(rt.tokenizer, "classification", 8, cfg.model.max_length)
    reserved = _train(TorchEngine(cfg.training), cfg, rt, records, reserve=worst)
    assert ref.keys() == reserved.keys()
    for key in ref:
        assert torch.equal(ref[key], reserved[key]), key
    model = rt.fresh_model(ModelSpec(r=cfg.lora.r), 2)
    params = set_trainable(model, ("lora", "head"), rt.head_module())
    model.train()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    reserve_memory(model, params, worst, "classification", steps=2)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(p.grad is None for p in params)


def test_worst_case_batch_has_the_largest_shape(tmp_path: Path):
    cfg = config_from_dict(tiny_params(tmp_path))
    rt = ClientRuntime(cfg)
    rt.build(ModelSpec(r=cfg.lora.r))
    cls = worst_case_batch(rt.tokenizer, "classification", 5, 16).tensors
    assert cls["input_ids"].shape == (5, 16) and cls["labels"].tolist() == [0] * 5
    assert int(cls["attention_mask"].sum()) == 5 * 16 - 1  # one padded position, like real batches
    gen_cfg = config_from_dict(tiny_generation_params(tmp_path / "gen"))
    gen_rt = ClientRuntime(gen_cfg)
    gen_rt.build(ModelSpec(r=gen_cfg.lora.r))
    gen = worst_case_batch(gen_rt.tokenizer, "generation", 3, 32).tensors
    assert gen["input_ids"].shape == gen["labels"].shape == (3, 32)
    assert (gen["labels"][:, 0] == -100).all() and torch.equal(gen["labels"][:, 1:], gen["input_ids"][:, 1:])


def test_runtime_reserves_once_per_model_structure(tmp_path: Path):
    cfg = config_from_dict(tiny_params(tmp_path))
    rt = ClientRuntime(cfg)
    rt.build(ModelSpec(r=cfg.lora.r))
    assert rt.reserve_batch(ModelSpec(r=cfg.lora.r)) is not None
    assert rt.reserve_batch(ModelSpec(r=cfg.lora.r)) is None  # once per process and structure
    assert rt.reserve_batch(ModelSpec(r=cfg.lora.r, num_experts=2)) is not None  # a new structure: again
    off = ClientRuntime(config_from_dict(tiny_params(tmp_path, training__reserve_steps=0)))
    assert off.reserve_batch(ModelSpec(r=cfg.lora.r)) is None


@pytest.mark.slow
def test_deepspeed_engine_matches_torch_engine(tmp_path: Path):
    cfg = config_from_dict(tiny_params(tmp_path))
    rt = ClientRuntime(cfg)
    records = _records(24)
    ref = _train(TorchEngine(cfg.training), cfg, rt, records)
    ds = _train(DeepSpeedEngine(cfg.training, Path(cfg.data.cache_dir)), cfg, rt, records)
    assert ref.keys() == ds.keys()
    changed = [k for k in ref if not torch.equal(ref[k], rt.common_init(ModelSpec(r=cfg.lora.r)).get(k, ref[k] * 0))]
    assert changed, "training must change the adapter"
    for key in ref:
        assert torch.allclose(ref[key], ds[key], atol=1e-5), key


def test_remove_hooks_since_removes_only_the_new_hooks():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    kept = model[0].register_forward_hook(lambda *a: None)
    snapshot = hook_snapshot(model)
    model.register_forward_pre_hook(lambda m, args, kwargs: None, with_kwargs=True)
    model[0].register_forward_hook(lambda m, args, kwargs, out: None, with_kwargs=True, always_call=True)
    model[1].register_full_backward_hook(lambda *a: None)
    assert remove_hooks_since(model, snapshot) == 3
    assert list(model[0]._forward_hooks) == [kept.id]
    assert not model._forward_pre_hooks and not model._forward_pre_hooks_with_kwargs
    assert not model[0]._forward_hooks_with_kwargs and not model[0]._forward_hooks_always_called
    assert not model[1]._backward_hooks
    assert remove_hooks_since(model, snapshot) == 0


@pytest.mark.slow
def test_deepspeed_engine_leaves_no_hooks_or_engines_on_the_reused_model(tmp_path: Path):
    """DeepSpeed's destroy() leaves forward hooks, which close over the engine, on the model; a worker
    reuses one model for client after client, so without their removal every past engine (optimizer
    included) stays alive and runs its hooks on each forward pass."""
    import gc

    from deepspeed.runtime.engine import DeepSpeedEngine as LibraryEngine

    cfg = config_from_dict(tiny_params(tmp_path))
    rt = ClientRuntime(cfg)
    engine = DeepSpeedEngine(cfg.training, Path(cfg.data.cache_dir))
    model = rt.fresh_model(ModelSpec(r=cfg.lora.r), 2)
    before = hook_snapshot(model)
    for _ in range(2):
        _train(engine, cfg, rt, _records(16))
    assert hook_snapshot(model) == before
    with pytest.raises(IndexError):  # a step that fails (label 5 of a 2-class head) cleans up too
        _train(engine, cfg, rt, [{"text": "a movie", "text_pair": None, "label": 5}] * 8)
    assert hook_snapshot(model) == before
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, LibraryEngine)]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
def test_base_weights_are_read_into_memory_unless_mmap_weights(tmp_path: Path):
    """Mapped, the weights page in lazily (each new token's embedding row on first use), so a worker's
    resident memory grows client after client; read in, it is all there after loading."""
    import os

    from fedlease.config import ModelConfig
    from fedlease.models.base import load_base_model, resolve_model_path

    def mapped_files() -> str:
        return Path("/proc/self/maps").read_text()

    checkpoint = os.path.realpath(Path(resolve_model_path(ModelConfig(), tmp_path)) / "model.safetensors")
    read_in = load_base_model(ModelConfig(), "classification", tmp_path)
    assert checkpoint not in mapped_files()
    mapped = load_base_model(ModelConfig(mmap_weights=True), "classification", tmp_path)
    assert checkpoint in mapped_files()  # the check above can see a mapping
    assert torch.equal(read_in.model.bert.embeddings.word_embeddings.weight,
                       mapped.model.bert.embeddings.word_embeddings.weight)


def test_deepspeed_config_comes_from_params():
    cfg = TrainingConfig(batch_size=8, gradient_accumulation_steps=4, gradient_clipping=0.5,
                         precision="bf16", deepspeed={"zero_stage": 2})
    conf = deepspeed_config(cfg)
    assert conf["train_micro_batch_size_per_gpu"] == 8 and conf["train_batch_size"] == 32
    assert conf["gradient_accumulation_steps"] == 4 and conf["zero_optimization"] == {"stage": 2}
    assert conf["gradient_clipping"] == 0.5 and conf["bf16"] == {"enabled": True}
    assert "bf16" not in deepspeed_config(TrainingConfig(precision="fp32"))


def test_zero3_is_rejected_with_a_reason():
    with pytest.raises(ValueError, match="zero_stage"):
        DeepSpeedEngine(TrainingConfig(deepspeed={"zero_stage": 3}), Path(".cache"))


def test_torch_engine_gradient_accumulation_averages_before_each_step(tmp_path: Path):
    """Accumulating 3 identical batches then stepping is one step on that batch: 6 batches at
    accumulation 3 must land where 2 batches at accumulation 1 do, and not where 6 steps do; and the
    gradient a step takes over 3 different batches is the mean of their 3 gradients."""
    cfg = config_from_dict(tiny_params(tmp_path))
    rt = ClientRuntime(cfg)

    def batch(token: int, labels: list[int]) -> Batch:
        ids = torch.full((2, 4), token, dtype=torch.long)
        return Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(labels)}, 2)

    def train(accum: int, batches: list[Batch]) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """The LoRA after training, and the gradient its first optimiser step took."""
        model = rt.fresh_model(ModelSpec(r=2), 2)
        for m in model.modules():  # no dropout: the runs see exactly the same forward passes
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        params = set_trainable(model, ("lora",), None)
        engine = TorchEngine(cfg.training.model_copy(update={"gradient_accumulation_steps": accum,
                                                              "gradient_clipping": 0.0}))
        step, first_grad = engine._step, []

        def recording_step(opt: torch.optim.Optimizer, ps: list[torch.nn.Parameter]) -> None:
            if not first_grad:
                first_grad.extend(p.grad.detach().clone() for p in ps if p.grad is not None)
            step(opt, ps)

        engine._step = recording_step  # type: ignore[method-assign]
        res = engine.train(model, params, batches, "classification")
        assert res.steps == len(batches) and first_grad
        return get_state(model, None, ("lora",)), first_grad

    same = batch(1, [0, 1])
    (accumulated, grad3), (two_steps, grad1), (six_steps, _) = (train(3, [same] * 6), train(1, [same] * 2),
                                                                train(1, [same] * 6))
    # float32 sums of thirds differ in the last bits, which Adam's normalisation magnifies to ~1e-6;
    # six real steps differ by ~1e-2
    assert all(torch.allclose(accumulated[k], two_steps[k], atol=2e-5) for k in accumulated)
    assert not all(torch.allclose(accumulated[k], six_steps[k], atol=1e-3) for k in accumulated)
    # the gradient is the mean over the accumulated batches, not their sum nor the last one (Adam's update is
    # nearly blind to a scale, so the weights alone would not tell)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-9) for a, b in zip(grad3, grad1, strict=True))
    different = [batch(1, [0, 1]), batch(2, [1, 1]), batch(3, [0, 0])]
    _, mixed = train(3, different)
    alone = [train(1, [b])[1] for b in different]
    mean = [sum(gs) / 3 for gs in zip(*alone, strict=True)]
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-9) for a, b in zip(mixed, mean, strict=True))
    assert not all(torch.allclose(a, b, rtol=1e-2) for a, b in zip(mixed, alone[-1], strict=True))


def test_communication_bytes_equal_closed_form(tmp_path: Path):
    """FedLEASE, tiny BERT (hidden 32, 2 layers, query+value = 4 modules), r = 2, M = 3, fp32:
    upload = expert + router = 4 * (2*32 + 32*2) * 4 + 4 * (2*3-1) * 32 * 4 bytes;
    download = M experts + the cluster's router."""
    cfg = config_from_dict(tiny_params(tmp_path))
    rt = ClientRuntime(cfg)
    strategy = FedLEASE(cfg, 4, Allocation([0, 1, 2, 2], 3))
    common = rt.common_init(strategy.spec(0))
    expert = {k: v for k, v in common.items() if k.startswith("lora.")}
    state = strategy.init_state(InitContext(common, [expert, expert, expert]))
    down = strategy.download(state, 3)
    modules, d, r, m = 4, 32, 2, 3
    expert_bytes = modules * (r * d + d * r) * 4
    router_bytes = modules * (2 * m - 1) * d * 4
    assert nbytes(down.tensors) == m * expert_bytes + router_bytes
    model = rt.fresh_model(strategy.spec(3), 2)
    upload = get_state(model, None, strategy.upload_groups)
    assert nbytes(upload) == expert_bytes + router_bytes
    assert nbytes({"x": torch.zeros(10, dtype=torch.bfloat16)}) == 20  # dtype aware


def test_generation_encoding_masks_prompt_and_rejects_empty_answers(tmp_path: Path):
    cfg = config_from_dict(tiny_params(tmp_path))
    rt = ClientRuntime(cfg)
    rt.build(ModelSpec(r=2))
    enc = encode_generation(rt.tokenizer, [{"prompt": "a long prompt " * 20, "response": "yes indeed"}], 16)
    assert enc["input_ids"].shape[1] <= 16
    answer = enc["labels"][0][enc["labels"][0] != -100]
    assert len(answer) >= 1, "the answer must survive truncation"
    assert (enc["labels"][0][:4] == -100).all(), "prompt tokens carry no loss"
    with pytest.raises(TruncationError, match="no response token"):
        encode_generation(rt.tokenizer, [{"prompt": "p", "response": ""}], 16)


def test_a_long_prompt_keeps_its_end_in_evaluation_as_in_training(tmp_path: Path):
    """Generation is scored on what training taught: the prompt's end (the question, the assistant turn)."""
    from fedlease.engine.batching import chat_prompt
    from fedlease.engine.evaluate import encode_prompts

    rt = ClientRuntime(config_from_dict(tiny_generation_params(tmp_path)))
    rt.build(ModelSpec(r=2))
    prompt = "some long context " * 20 + "and the question at the end"
    full = rt.tokenizer(chat_prompt(rt.tokenizer, prompt), add_special_tokens=False)["input_ids"]
    assert len(full) > 16
    evaluated = encode_prompts(rt.tokenizer, [prompt, "short"], 16)["input_ids"][0].tolist()
    assert evaluated == full[-16:]
    trained = encode_generation(rt.tokenizer, [{"prompt": prompt, "response": "yes"}], 16)
    prompt_part = trained["input_ids"][0][trained["labels"][0] == -100].tolist()
    assert evaluated[-len(prompt_part):] == prompt_part
    assert rt.tokenizer.truncation_side == "right" and rt.tokenizer.padding_side == "right"  # restored


def test_generation_loss_scores_response_tokens_only_and_matches_full_logits():
    """compute_loss asks the LM head only for positions that predict a response token; the loss and
    gradients must equal the plain full-logits cross entropy over the same labels."""
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM

    from fedlease.engine.trainer import compute_loss, response_logits_start
    from fedlease.models.base import _tiny_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(_tiny_config("llama", 40))
    ids = torch.randint(3, 40, (3, 12))
    labels = torch.full_like(ids, -100)
    for row, first in enumerate((5, 8, 10)):  # responses start at different positions
        labels[row, first:] = ids[row, first:]
    labels[2, 11] = -100  # a padded tail
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert response_logits_start(labels) == 4  # logits at 4 predict the earliest response token (5)

    loss = compute_loss(model, tensors, "generation")
    loss.backward()
    fast_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=tensors["attention_mask"]).logits
    full = F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1), ignore_index=-100)
    full.backward()
    assert torch.allclose(loss, full, atol=1e-6)
    assert torch.allclose(fast_grad, model.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-6)

    with pytest.raises(ValueError, match="no response tokens"):
        compute_loss(model, {**tensors, "labels": torch.full_like(ids, -100)}, "generation")


def test_one_precision_key_serves_both_engines(tmp_path: Path):
    """training.precision: DeepSpeed's bf16 mode, and the plain-torch engine's autocast (bf16 matmuls)."""
    from fedlease.engine.trainer import autocast_for

    bf16 = TrainingConfig(precision="bf16")
    assert deepspeed_config(bf16)["bf16"] == {"enabled": True}
    with autocast_for(bf16):
        out = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16
    with autocast_for(TrainingConfig(precision="fp32")):
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32
    cfg = config_from_dict(tiny_params(tmp_path, training__precision="bf16"))
    rt = ClientRuntime(cfg)
    model = rt.fresh_model(ModelSpec(r=2), 2)
    params = set_trainable(model, ("lora", "head"), "classifier")
    enc = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
           "labels": torch.tensor([0, 1])}
    res = TorchEngine(cfg.training).train(model, params, [Batch(enc, 2)] * 2, "classification")
    assert res.steps == 2 and res.loss == res.loss and all(p.dtype == torch.float32 for p in params)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_loading_is_a_clear_error_without_a_gpu(tmp_path: Path, mode: str):
    from fedlease.config import ModelConfig
    from fedlease.models.base import ModelError, load_base_model, quantization_config

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the loading itself is exercised by the GPU check")
    with pytest.raises(ModelError, match=f"model.quantization: {mode} .* needs a CUDA GPU"):
        load_base_model(ModelConfig(name="packaged:all-minilm-l6-v2", quantization=mode), "classification",
                        tmp_path)
    conf = quantization_config(mode)
    assert (conf.load_in_8bit, conf.load_in_4bit) == ((True, False) if mode == "8bit" else (False, True))
    if mode == "4bit":
        assert conf.bnb_4bit_quant_type == "nf4" and conf.bnb_4bit_compute_dtype == torch.bfloat16


def test_user_deepspeed_json_is_merged_and_offload_is_configured(tmp_path: Path):
    import json

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7}, "communication_data_type": "fp32",
                                "train_micro_batch_size_per_gpu": 8}))
    cfg = TrainingConfig(batch_size=8, deepspeed={"zero_stage": 2, "offload_optimizer": "cpu",
                                                  "config_file": str(user)})
    conf = deepspeed_config(cfg)
    assert conf["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                         "reduce_bucket_size": 5e7}
    assert conf["communication_data_type"] == "fp32" and conf["train_micro_batch_size_per_gpu"] == 8
    user.write_text(json.dumps({"train_micro_batch_size_per_gpu": 32}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu.*differ"):
        deepspeed_config(cfg)
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="offload_optimizer"):
        TrainingConfig(deepspeed={"zero_stage": 0, "offload_optimizer": "cpu"})
