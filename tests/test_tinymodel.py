import dataclasses

import torch
from safetensors.torch import load_file

from prorl_actors.config import build_spec
from prorl_actors.tasks import chat_messages
from prorl_actors.tinymodel import build_tiny_model, load_tokenizer, resolve_model_path, tiny_model_key


def test_build_is_deterministic_and_loadable(small_spec, tiny_model, tmp_path):
    again = tmp_path / "again"
    build_tiny_model(small_spec.model.tiny, small_spec.data, again, log=lambda *_: None)
    a, b = load_file(tiny_model / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tok = load_tokenizer(tiny_model)
    assert tok.padding_side == "left" and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(chat_messages("sys", "1 + 2 ="), tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n1 + 2 =<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert [tok.decode([i]) for i in tok("123", add_special_tokens=False)["input_ids"]] == ["1", "2", "3"]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_cache_key_and_resolve(small_spec, tmp_path, monkeypatch):
    tiny = small_spec.model.tiny
    key = tiny_model_key(tiny, small_spec.data)
    assert key != tiny_model_key(dataclasses.replace(tiny, seed=1), small_spec.data)
    other = dataclasses.replace(small_spec.data.prompts, logic=dataclasses.replace(small_spec.data.prompts.logic,
                                                                                   system="other"))
    assert key != tiny_model_key(tiny, dataclasses.replace(small_spec.data, prompts=other))
    monkeypatch.setenv("PRORL_CACHE", str(tmp_path))
    model = dataclasses.replace(small_spec.model, tiny=dataclasses.replace(tiny, sft_steps=2))
    path = resolve_model_path(model, small_spec.data, log=lambda *_: None)
    assert (path / "config.json").exists() and path.parent == tmp_path
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # built atomically
    mtime = (path / "config.json").stat().st_mtime
    assert resolve_model_path(model, small_spec.data, log=lambda *_: None) == path  # cached: not rebuilt
    assert (path / "config.json").stat().st_mtime == mtime


def test_untagged_share_of_warm_start(small_spec, monkeypatch):
    """sft_untagged_frac decides the share of warm-start completions outside the answer format,
    in every family of the mix."""
    import prorl_actors.tinymodel as tm
    seen = []
    real = tm._sft_example
    monkeypatch.setattr(tm, "_sft_example", lambda tok, msgs, c: seen.append(c) or real(tok, msgs, c))
    tiny = dataclasses.replace(small_spec.model.tiny, sft_steps=4, sft_batch_size=100, sft_untagged_frac=0.3)
    data = build_spec({"data": {"tasks": [{"name": "a", "family": "logic", "dataset": "chain_sum"},
                                          {"name": "b", "family": "math", "dataset": "arithmetic"}]}}).data
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        tm.build_tiny_model(tiny, data, Path(d) / "m", log=lambda *_: None)
    off = sum(not (c.startswith("<answer>") or c.startswith("\\boxed{")) for c in seen) / len(seen)
    assert len(seen) == 400 and 0.22 < off < 0.38
    assert any(c.startswith("The answer is") for c in seen) and any(c.isdigit() or c[1:].isdigit() for c in seen)


def test_warm_start_on_its_own_tasks(small_spec, monkeypatch, tmp_path):
    """model.tiny.sft_tasks: the warm start imitates those tasks' worked solutions and never the RL
    tasks; the tokenizer still sees the RL prompts; the cache key tells the two apart and is the
    old one when the list is empty."""
    import prorl_actors.tinymodel as tm
    seen = []
    real = tm._sft_example
    monkeypatch.setattr(tm, "_sft_example", lambda tok, msgs, c: seen.append((msgs[-1]["content"], c))
                        or real(tok, msgs, c))
    skill = {"name": "small", "family": "math", "dataset": "step_sum",
             "config": {"min_terms": 2, "max_terms": 3, "max_running": 9}}
    spec = build_spec({"data": {"tasks": [{"name": "long", "family": "math", "dataset": "step_sum",
                                           "config": {"min_terms": 6, "max_terms": 6}}]},
                       "model": {"tiny": {**dataclasses.asdict(small_spec.model.tiny), "sft_steps": 3,
                                          "sft_batch_size": 20, "sft_untagged_frac": 0.0,
                                          "sft_tasks": [skill]}}})
    tm.build_tiny_model(spec.model.tiny, spec.data, tmp_path / "m", log=lambda *_: None)
    assert len(seen) == 60
    for question, completion in seen:
        terms = question[len("Compute "):-1].split(" + ")
        assert 2 <= len(terms) <= 3 and completion.endswith(f"\\boxed{{{sum(map(int, terms))}}}")
        assert completion.count("=") == len(terms) - 1 and sum(map(int, terms)) <= 9
    tiny = spec.model.tiny
    assert tm.tiny_model_key(tiny, spec.data) != tm.tiny_model_key(dataclasses.replace(tiny, sft_tasks=[]), spec.data)
    import hashlib
    import json
    old = json.dumps({"tiny": {k: v for k, v in dataclasses.asdict(small_spec.model.tiny).items()
                               if k not in ("sft_tasks", "tokenize_roles")},
                      "tasks": [dataclasses.asdict(t) for t in small_spec.data.tasks],
                      "prompts": dataclasses.asdict(small_spec.data.prompts),
                      "train_seed": small_spec.data.train_seed, "v": 4}, sort_keys=True)
    assert tm.tiny_model_key(small_spec.model.tiny, small_spec.data) == hashlib.sha256(old.encode()).hexdigest()[:16]


def test_tokenize_roles(small_spec, tmp_path):
    """model.tiny.tokenize_roles: the chat roles' names become a token each, so a prompt is shorter;
    off, the cache key is that of before (test_warm_start_on_its_own_tasks checks the old key)."""
    import prorl_actors.tinymodel as tm
    toks = {}
    for on in (False, True):
        tiny = dataclasses.replace(small_spec.model.tiny, sft_steps=0, tokenize_roles=on)
        tm.build_tiny_model(tiny, small_spec.data, tmp_path / str(on), log=lambda *_: None)
        toks[on] = load_tokenizer(tmp_path / str(on))
    messages = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "Compute 3 + 4."}]
    ids = {on: t(t.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"] for on, t in toks.items()}   # as batch.make_prompts
    pieces = {on: [toks[on].decode([i]) for i in ids[on]] for on in toks}
    for role in ("system", "user", "assistant"):
        assert pieces[True].count(role) == 1 and role not in pieces[False]
    assert len(ids[True]) < len(ids[False])
    tiny = small_spec.model.tiny
    assert tm.tiny_model_key(tiny, small_spec.data) != tm.tiny_model_key(
        dataclasses.replace(tiny, tokenize_roles=True), small_spec.data)
