"""The causal-LM task kind on a tiny LLaMA built offline: data errors, prompt template,
response-only labels, adapter keys from the config alone, training that learns, and the
ClientApp handlers."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from client.app import evaluate, train
from protocol.wire import (
    ARRAYS,
    EVAL_LOSS,
    LORA_RANK,
    METRICS,
    NUM_EXAMPLES,
    SERVER_ROUND,
    TRAIN_LOSS,
)
from tests.client.test_app import context, instruction
from tests.workload.tiny_llama import save_tiny_llama, write_echo_jsonl
from workload.causal_lm import (
    IGNORE_INDEX,
    CausalLmSettings,
    Example,
    build_causal_lm,
    encode,
    evaluate_causal_lm,
    is_holdout,
    load_examples,
    render_prompt,
    site_data_path,
    site_examples,
    train_causal_lm,
)
from workload.model import (
    LoraSettings,
    get_lora_state,
    initial_adapter,
    resolve_target_modules,
    set_lora_state,
)

LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def lora(llama_dir: Path) -> LoraSettings:
    return LoraSettings(
        model=str(llama_dir), r=4, alpha=8, target_modules=("auto",), task="causal-lm"
    )


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_echo_jsonl(tmp_path_factory.mktemp("data") / "site.jsonl", 60, seed=1)


SETTINGS = CausalLmSettings(learning_rate=1e-2, batch_size=8, max_length=64)


# ----------------------------------------------------------------------------- data


def write_lines(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_load_examples_reads_schema_with_optional_input(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "d.jsonl",
        json.dumps({"instruction": "say hi", "response": "hi", "extra": 1}),
        "",
        json.dumps({"instruction": "copy", "input": "x", "response": "x"}),
    )
    assert load_examples(path) == [Example("say hi", "", "hi"), Example("copy", "x", "x")]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"line 2: not valid JSON"),
        ("[1, 2]", r"line 2: expected a JSON object, got list"),
        ('{"instruction": "a"}', r"line 2: field 'response' must be a non-empty string"),
        ('{"instruction": " ", "response": "b"}', r"line 2: field 'instruction'"),
        ('{"instruction": "a", "input": 3, "response": "b"}', r"line 2: field 'input'"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "d.jsonl", '{"instruction": "a", "response": "b"}', line)
    with pytest.raises(ValueError, match=message):
        load_examples(path)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="no examples"):
        load_examples(write_lines(tmp_path / "empty.jsonl", "", "  "))


def test_prompt_template_default_and_override() -> None:
    with_input = Example("Translate", "cheese", "fromage")
    assert render_prompt(with_input) == (
        "### Instruction:\nTranslate\n\n### Input:\ncheese\n\n### Response:\n"
    )
    assert render_prompt(Example("Hi", "", "x")) == "### Instruction:\nHi\n\n### Response:\n"
    assert render_prompt(with_input, "Q: {instruction} {input}\nA: ") == "Q: Translate cheese\nA: "


@pytest.mark.parametrize("template", ["{input} only", "{instruction} {answer}", "{instruction"])
def test_bad_template_is_rejected(template: str) -> None:
    with pytest.raises(ValueError, match="prompt-template"):
        CausalLmSettings.from_run_config({"prompt-template": template})


def test_site_data_path_prefers_node_config_then_fills_partition_id() -> None:
    run = {"data-path": "/d/site-{partition-id}.jsonl"}
    assert site_data_path({"data-path": "/own.jsonl", "partition-id": 3}, run) == "/own.jsonl"
    assert site_data_path({"partition-id": 3}, run) == "/d/site-3.jsonl"
    with pytest.raises(ValueError, match="needs node-config 'partition-id'"):
        site_data_path({}, run)
    with pytest.raises(ValueError, match="needs data"):
        site_examples({}, {}, "train")


def test_holdout_is_fixed_and_disjoint(data_file: Path) -> None:
    train_part = site_examples({"data-path": str(data_file)}, {}, "train")
    eval_part = site_examples({"data-path": str(data_file)}, {}, "eval")
    assert len(train_part) + len(eval_part) == 60
    assert eval_part and not set(train_part) & set(eval_part)
    assert all(is_holdout(e) for e in eval_part)


def test_labels_cover_only_response_and_eos(llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    example = Example("upper", "ab", "AB")
    [item] = encode([example], tokenizer, max_length=200)
    prompt_length = len(tokenizer(render_prompt(example))["input_ids"])
    assert item.labels[:prompt_length] == (IGNORE_INDEX,) * prompt_length
    response = tokenizer("AB", add_special_tokens=False)["input_ids"]
    assert list(item.labels[prompt_length:]) == [*response, tokenizer.eos_token_id]
    assert item.input_ids[prompt_length:] == item.labels[prompt_length:]
    with pytest.raises(ValueError, match="raise max-length"):
        encode([example], tokenizer, max_length=prompt_length)


# ----------------------------------------------------------------------------- model


def test_auto_targets_and_initial_adapter_from_config_only(
    tmp_path: Path, lora: LoraSettings
) -> None:
    assert resolve_target_modules(lora) == LLAMA_TARGETS
    config_only = save_tiny_llama(tmp_path / "config-only", weights=False)
    assert not (config_only / "model.safetensors").exists()
    adapter = initial_adapter(replace(lora, model=str(config_only)), seed=0)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    assert adapter["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape == (4, 64)
    assert adapter["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (
        16,
        4,
    )
    assert len(adapter) == 2 * 7 * 2
    model, _ = build_causal_lm(lora, SETTINGS)
    state = get_lora_state(model)
    assert list(state) == list(adapter)
    assert all(state[k].shape == adapter[k].shape for k in adapter)


def test_training_lowers_response_loss(lora: LoraSettings, data_file: Path) -> None:
    model, tokenizer = build_causal_lm(lora, SETTINGS)
    set_lora_state(model, initial_adapter(lora, seed=0))
    held_out = site_examples({"data-path": str(data_file)}, {}, "eval")
    examples = site_examples({"data-path": str(data_file)}, {}, "train")
    before = evaluate_causal_lm(model, tokenizer, held_out, SETTINGS)
    result = train_causal_lm(model, tokenizer, examples, replace(SETTINGS, local_epochs=4), seed=0)
    after = evaluate_causal_lm(model, tokenizer, held_out, SETTINGS)
    assert result.num_examples == len(examples) and result.num_tokens > 0
    assert after.loss < before.loss - 1.0, (before.loss, after.loss)
    assert math.isclose(after.perplexity, math.exp(after.loss))


def test_gradient_accumulation_equals_one_big_batch(lora: LoraSettings, data_file: Path) -> None:
    model, tokenizer = build_causal_lm(lora, SETTINGS)
    start = initial_adapter(lora, seed=0)
    start = {k: v + 0.01 if "lora_B" in k else v for k, v in start.items()}
    examples = load_examples(data_file)[:8]
    states = []
    for batch_size, accumulation in ((8, 1), (2, 4)):
        set_lora_state(model, start)
        settings = replace(SETTINGS, batch_size=batch_size, gradient_accumulation=accumulation)
        train_causal_lm(model, tokenizer, examples, settings, seed=0)
        states.append(get_lora_state(model))
    for key in start:
        torch.testing.assert_close(states[0][key], states[1][key], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("train_factors", ["ab", "b"])
def test_train_factors_b_trains_only_lora_b(
    lora: LoraSettings, data_file: Path, train_factors: str
) -> None:
    model, tokenizer = build_causal_lm(lora, SETTINGS)
    start = initial_adapter(lora, seed=0)
    start = {k: v + 0.01 if "lora_B" in k else v for k, v in start.items()}
    set_lora_state(model, start)
    settings = replace(SETTINGS, train_factors=train_factors)
    train_causal_lm(model, tokenizer, load_examples(data_file)[:16], settings, seed=0)
    trained = get_lora_state(model)
    a_keys = [k for k in trained if ".lora_A." in k]
    b_keys = [k for k in trained if ".lora_B." in k]
    assert len(a_keys) == len(b_keys) == 2 * 7
    assert all(not torch.equal(trained[k], start[k]) for k in b_keys)
    a_kept = [torch.equal(trained[k], start[k]) for k in a_keys]
    assert all(a_kept) if train_factors == "b" else not any(a_kept)
    assert all(p.requires_grad for name, p in model.named_parameters() if "lora_" in name)
    assert CausalLmSettings.from_run_config({"train-factors": "b"}).train_factors == "b"
    with pytest.raises(ValueError, match="'train-factors' must be one of ab, b; got 'B'"):
        CausalLmSettings.from_run_config({"train-factors": "B"})


# ----------------------------------------------------------------------------- handlers


def test_handlers_reply_with_lora_tensors_and_perplexity(
    lora: LoraSettings, data_file: Path
) -> None:
    run_config: dict[str, Any] = {
        "task": "causal-lm",
        "model": lora.model,
        "lora-r": 4,
        "lora-alpha": 8,
        "target-modules": "auto",
        "batch-size": 8,
        "max-length": 64,
        "learning-rate": 1e-2,
        "seed": 0,
        "data-path": str(data_file.parent / "{partition-id}.jsonl"),
    }
    (data_file.parent / "0.jsonl").write_text(data_file.read_text())
    adapter = initial_adapter(LoraSettings.from_run_config(run_config), seed=0)
    reply = train(
        instruction(adapter, "train", {SERVER_ROUND: 1}),
        context(run_config, **{"partition-id": 0}),
    )
    arrays = reply.content.array_records[ARRAYS].to_torch_state_dict()
    assert list(arrays) == list(adapter)
    assert any(not torch.equal(arrays[k], adapter[k]) for k in adapter)
    metrics = reply.content.metric_records[METRICS]
    assert set(metrics) == {NUM_EXAMPLES, TRAIN_LOSS, LORA_RANK}
    a_rank = next(value.shape[0] for key, value in adapter.items() if ".lora_A." in key)
    assert metrics[LORA_RANK] == a_rank  # the site trains the global's rank here
    scored = evaluate(
        instruction(arrays, "evaluate", {}), context(run_config, **{"data-path": str(data_file)})
    )
    assert set(scored.content.metric_records[METRICS]) == {
        NUM_EXAMPLES,
        EVAL_LOSS,
        "eval-perplexity",
    }
    assert set(scored.content.keys()) == {METRICS}


def test_task_kind_is_read_and_checked_by_client_and_server() -> None:
    from server.config import ConfigError, ServerSettings

    assert LoraSettings.from_run_config({"task": "causal-lm"}).task == "causal-lm"
    with pytest.raises(ValueError, match="'task' must be one of"):
        LoraSettings.from_run_config({"task": "seq2seq"})
    server = ServerSettings.from_run_config({"task": "causal-lm", "server-eval-data": " /e.jsonl "})
    assert (server.task, server.server_eval_data) == ("causal-lm", "/e.jsonl")
    assert ServerSettings.from_run_config({}).task == "classification"
    with pytest.raises(ConfigError, match="'task'"):
        ServerSettings.from_run_config({"task": "seq2seq"})
