"""TRL's GRPOTrainer on the prompts and settings benchmarks/vs_trl.py hands it, timed per step.

Runs in TRL's own virtual environment (vs_trl.py makes it and calls this file with its python);
it imports nothing of prorl_actors. Reads a JSON job (model, prompts, settings), trains
`num_steps` GRPO steps on the CPU and writes a JSON result: the wall time of every step (from
a TrainerCallback: generation, rewards, reference and policy log-probs, one optimizer step).
Reward: 1 when the response's <answer>...</answer> is the item's answer, else 0.
"""
from __future__ import annotations

import json
import re
import sys
import time


def main(job_path: str, out_path: str) -> None:
    t_start = time.time()
    job = json.loads(open(job_path).read())
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(job["threads"])
    tok = AutoTokenizer.from_pretrained(job["model"])
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    rows = [json.loads(line) for line in open(job["prompts"])]
    data = Dataset.from_list([{"prompt": r["messages"], "answer": r["answer"]} for r in rows])
    tag = re.compile(r"<answer>(.*?)</answer>", re.S)

    def reward(prompts, completions, answer, **_):
        out = []
        for c, a in zip(completions, answer):
            m = tag.search(c[0]["content"] if isinstance(c, list) else c)
            out.append(1.0 if m and m.group(1).strip() == a.strip() else 0.0)
        return out

    s = job["settings"]
    micro = s["micro_batch_size"]
    per_step = s["prompts_per_step"] * s["samples_per_prompt"]
    cfg = GRPOConfig(
        output_dir=job["output_dir"], max_steps=job["num_steps"], seed=0, use_cpu=True, bf16=False,
        per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
        steps_per_generation=per_step // micro,          # one generation of the whole step's samples ...
        num_iterations=1,                                # ... and one optimizer step on it
        num_generations=s["samples_per_prompt"], max_completion_length=s["max_new_tokens"],
        temperature=s["temperature"], top_p=1.0, top_k=0, beta=s["kl_coef"], learning_rate=s["lr"],
        lr_scheduler_type="constant", warmup_steps=0, loss_type="dapo", epsilon=s["eps_low"],
        epsilon_high=s["eps_high"], max_grad_norm=1.0, gradient_checkpointing=False,
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        shuffle_dataset=False)

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)
            print(f"trl step {len(self.times)}: {self.times[-1]:.2f}s", flush=True)

    times = StepTimes()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[times])
    t_train = time.time()
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    json.dump({"step_s": times.times, "train_s": time.time() - t_train, "process_s": time.time() - t_start,
               "reward": rewards, "trl": __import__("trl").__version__}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
