"""The embedded base model: built here, because no model hub can be reached.

1. A byte-level BPE tokenizer (digits split one per token) trained on the run's own task
   prompts, wrapped as a HF fast tokenizer with a ChatML chat template.
2. A Qwen2-architecture model of a few million parameters (vLLM and transformers both
   load it).
3. A short supervised warm start (loss on the completion only: each item's reference answer
   in its family's answer format, e.g. `\\boxed{X}` or `<answer>X</answer>`, after its worked
   solution when the reference has one), short on purpose so that RL starts from a
   non-trivial but imperfect pass rate. Its tasks are the run's training tasks, or
   `model.tiny.sft_tasks`: skills taught one at a time, whose composition RL trains on.

Deterministic for a seed. Saved in HF format and cached under
`$PRORL_CACHE` (default ~/.cache/prorl_actors) by a hash of everything that shapes it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from prorl_actors.spec import DataSpec, ModelSpec, TinyModelSpec
from prorl_actors.tasks import Scorer, TaskMixture

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SFT_SEED_OFFSET = 500_000_000  # far from both the RL training and the validation seeds
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    return Path(os.environ.get("PRORL_CACHE", Path.home() / ".cache" / "prorl_actors"))


def tiny_model_key(tiny: TinyModelSpec, data: DataSpec) -> str:
    shaped = dataclasses.asdict(tiny)
    for key in ("sft_tasks", "tokenize_roles"):
        if not shaped[key]:
            del shaped[key]   # the default keeps the keys (and the cached models) of before
    blob = json.dumps({"tiny": shaped, "tasks": [dataclasses.asdict(t) for t in data.tasks],
                       "prompts": dataclasses.asdict(data.prompts), "train_seed": data.train_seed, "v": 4},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_model_path(model: ModelSpec, data: DataSpec, log=print) -> Path:
    """model.path, or the cached tiny model (built now if missing)."""
    if model.path is not None:
        return Path(model.path)
    out = cache_root() / f"tiny-{tiny_model_key(model.tiny, data)}"
    if not (out / "config.json").exists():
        log(f"building the tiny base model into {out} (once; cached afterwards)")
        build_tiny_model(model.tiny, data, out, log=log)
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 bos_token=None, unk_token=None)
    hf.chat_template = CHAT_TEMPLATE
    hf.padding_side = "left"
    return hf


def _sft_example(tokenizer, messages: list[dict], completion: str) -> tuple[list[int], int]:
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(completion + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return p_ids + c_ids, len(p_ids)


def build_tiny_model(tiny: TinyModelSpec, data: DataSpec, out: Path, log=print) -> None:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    t0 = time.time()
    torch.manual_seed(tiny.seed)
    # the warm start draws from its own seed, so RL does not begin on the items SFT saw; its
    # tasks are the RL tasks unless model.tiny.sft_tasks names others (skills taught one at a time)
    sft_data = dataclasses.replace(data, train_seed=data.train_seed + SFT_SEED_OFFSET,
                                   tasks=tiny.sft_tasks or data.tasks)
    mixture = TaskMixture(sft_data)
    demos = Scorer(sft_data)   # only builds demonstrations: starts no verifier process
    corpus_items = mixture.sample(tiny.tokenizer_corpus_items)
    if tiny.sft_tasks:   # the tokenizer also sees prompts like those RL will ask (not the items themselves)
        corpus_items += TaskMixture(dataclasses.replace(sft_data, tasks=data.tasks)).sample(
            tiny.tokenizer_corpus_items)
    texts = [m["content"] for it in corpus_items for m in it.messages]
    if tiny.tokenize_roles:   # the role names the chat template writes: each message's, then the generation prompt's
        texts += [m["role"] for it in corpus_items for m in it.messages] + ["assistant"] * len(corpus_items)
    texts += [c for it in corpus_items for f in (True, False) if (c := demos.completion(it, f))]
    tokenizer = train_tokenizer(texts, tiny.vocab_size)
    log(f"  tokenizer: vocab {len(tokenizer)} ({time.time() - t0:.1f}s)")

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads, max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"  model: Qwen2, {n_params / 1e6:.2f}M parameters")

    # supervised warm start on fresh items of the training mixture (loss on the completion only)
    opt = torch.optim.AdamW(model.parameters(), lr=tiny.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / max(tiny.sft_steps, 1)))
    pad = tokenizer.pad_token_id
    fmt_rng = random.Random(tiny.seed)
    model.train()
    for step in range(tiny.sft_steps):
        batch = []
        for it in mixture.sample(tiny.sft_batch_size):
            off_format = fmt_rng.random() < tiny.sft_untagged_frac
            completion = demos.completion(it, formatted=not off_format) or demos.completion(it)
            if completion:   # file items may have no demonstration (e.g. code without a solution)
                batch.append(_sft_example(tokenizer, it.messages, completion))
        if not batch:
            raise ValueError("the warm start found no demonstration in the training tasks")
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), T), pad)              # (B, T) right-padded
        labels = torch.full((len(batch), T), -100)                # (B, T) -100 = no loss
        attn = torch.zeros((len(batch), T), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
            attn[i, :len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == tiny.sft_steps - 1:
            log(f"  sft step {step + 1}/{tiny.sft_steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")

    # atomic: write next to the target, then rename
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        model.eval()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                         bos_token_id=config.bos_token_id).save_pretrained(tmp)
        (tmp / "prorl_tiny.json").write_text(json.dumps(
            {"tiny": dataclasses.asdict(tiny), "num_params": n_params, "build_s": round(time.time() - t0, 1)},
            indent=1))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"  tiny model ready in {time.time() - t0:.0f}s: {out}")


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"  # it reloads as "right"
    return tok
