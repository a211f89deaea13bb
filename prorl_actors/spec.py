"""The typed run spec: one dataclass per section, loaded from YAML plus dotted overrides.

Loading goes YAML -> OmegaConf (file, `key=value` overrides, `${...}` interpolation) ->
a plain dict -> `check()`, which walks the dataclass types and reports EVERY problem at
once (unknown key, wrong type, value out of range, cross-field rule), each with its key
path, the value given and what is allowed. Nothing is fixed up silently: a spec either
builds exactly as written or does not build. Defaults live here and only here.

Each role reads only its own section (`GeneratorSpec`, `LearnerSpec`, ...).
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, OmegaConf

from prorl_actors.errors import InputError


def opt(default, *, ge=None, gt=None, le=None, lt=None, help=""):
    """A spec field with bounds; `help` says what it does and why."""
    meta = {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}
    meta["help"] = help
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---------------------------------------------------------------------------- sections
@dataclass
class TinyModelSpec:
    """The embedded base model, built locally when `model.path` is null (no hub here)."""
    seed: int = opt(0, ge=0)
    vocab_size: int = opt(1024, ge=300, le=65536, help="byte-level BPE vocabulary trained locally")
    hidden_size: int = opt(128, ge=16)
    intermediate_size: int = opt(384, ge=16)
    num_layers: int = opt(4, ge=1)
    num_heads: int = opt(4, ge=1)
    num_kv_heads: int = opt(2, ge=1)
    max_position_embeddings: int = opt(512, ge=64)
    tokenizer_corpus_items: int = opt(4000, ge=100, help="task items used to train the tokenizer")
    sft_steps: int = opt(350, ge=0, help="supervised warm start; short on purpose, so RL starts imperfect")
    sft_batch_size: int = opt(64, ge=1)
    sft_lr: float = opt(2e-3, gt=0)
    sft_untagged_frac: float = opt(0.0, ge=0, le=1, help=(
        "share of warm-start completions that give the right answer outside the format the family's "
        "verifier reads (no \\boxed{}, no <answer> tags, the option's text instead of its letter), like a "
        "base model that does not yet follow the requested format: RL has to learn the format too"))


@dataclass
class ModelSpec:
    path: str | None = opt(None, help="HF model dir; null = the embedded tiny model (cached)")
    dtype: Literal["float32", "bfloat16"] = opt("float32")
    tiny: TinyModelSpec = opt(TinyModelSpec())


@dataclass
class VLLMSpec:
    kv_cache_gib: float = opt(1.0, gt=0, help="VLLM_CPU_KVCACHE_SPACE on CPU")
    gpu_memory_utilization: float = opt(0.5, gt=0, le=1)
    tensor_parallel_size: int = opt(1, ge=1)
    max_num_seqs: int = opt(256, ge=1)
    enforce_eager: bool = opt(True)


@dataclass
class GeneratorSpec:
    engine: Literal["vllm", "hf"] = opt("vllm", help="vllm (vllm-cpu here, vllm on GPUs) or transformers generate")
    num_actors: int = opt(1, ge=1)
    chunks_per_actor: int = opt(2, ge=1, help=(
        "with several generator actors, each call's prompts are cut into num_actors x this chunks, each "
        "handed to whichever actor is free (a slow or busy actor takes fewer); more chunks balance better "
        "but give the engine smaller batches, so fewer are cut when a chunk would hold fewer sequences than "
        "the engine runs at once (vllm.max_num_seqs, hf_batch_size), down to one per actor. One actor takes "
        "a call's prompts in one piece"))
    num_cpus: float = opt(0.5, ge=0)
    num_gpus: float = opt(0.0, ge=0)
    num_samples_per_prompt: int = opt(16, ge=1, help="n samples per prompt = the GRPO group size G")
    temperature: float = opt(1.2, gt=0, help="ProRL samples hot (1.2) to keep exploring")
    top_p: float = opt(1.0, gt=0, le=1)
    max_new_tokens: int = opt(32, ge=1)
    max_model_len: int = opt(512, ge=16, help="prompt + response tokens; longer prompts are rejected and counted")
    hf_batch_size: int = opt(256, ge=1, help="sequences per generate() call for engine hf")
    vllm: VLLMSpec = opt(VLLMSpec())


@dataclass
class CodeVerifierSpec:
    """The sandbox that runs code answers (see sandbox/: limits are per test)."""
    wall_s: float = opt(2.0, gt=0, help="wall-clock limit per test")
    program_wall_s: float = opt(10.0, gt=0, help="wall-clock limit for all of a program's tests")
    memory_mib: int = opt(1024, ge=64)
    workers: int | None = opt(None, ge=1, help="programs run at once per verifier; null = 2 per core")
    allow_weaker: bool = opt(False, help="run even if an isolation layer is missing here (logged); never on "
                                         "a machine that matters")


@dataclass
class VerifierSpec:
    num_actors: int = opt(1, ge=1)
    num_cpus: float = opt(0.25, ge=0)
    num_threads: int = opt(4, ge=1, help="responses scored at once per verifier actor")
    timeout_s: float = opt(60.0, gt=0, help="a response whose scoring takes longer gets reward 0 and is counted")
    math_timeout_s: float = opt(5.0, gt=0, help="limit of one math-verify equivalence check")
    code: CodeVerifierSpec = opt(CodeVerifierSpec())


@dataclass
class DeepSpeedSpec:
    """Learner engine deepspeed: ZeRO data parallelism over learner.num_actors ranks (gloo on CPU,
    NCCL on GPUs). The optimizer is torch's AdamW (learner.lr, betas, ...) unless offloaded."""
    zero_stage: int = opt(2, ge=1, le=3, help=(
        "1: optimizer state partitioned over the ranks, gradients reduced once per mini-batch (at the "
        "accumulation boundary): the fastest for models whose weights and gradients fit on every rank; 2: + "
        "gradients partitioned, reduce-scattered after every micro-batch's backward (fewer, larger "
        "micro-batches: learner.max_tokens_per_micro_batch); 3: + parameters (gathered layer by layer in "
        "forward and backward; the largest models). Stage 0 is not offered: DeepSpeed would apply a step "
        "whose gradients are not finite"))
    bf16: bool = opt(False, help="bf16 weights, activations and gradients; fp32 master weights and Adam state in "
                                 "the ZeRO optimizer (learner.autocast_bf16 is the torch engine's switch)")
    offload_optimizer: bool = opt(False, help=(
        "ZeRO-Offload: Adam state and step on the CPU (zero_stage >= 1). Uses DeepSpeed's CPU Adam, which "
        "compiles a C++ op on first use (~3.5 min, cached in ~/.cache/torch_extensions)"))
    offload_params: bool = opt(False, help="zero_stage 3: parameters live on the CPU between uses")


@dataclass
class LearnerSpec:
    engine: Literal["torch", "deepspeed"] = opt("torch", help=(
        "torch: one process, plain AdamW; deepspeed: num_actors data-parallel ranks with ZeRO (see deepspeed)"))
    num_actors: int = opt(1, ge=1, help=(
        "data-parallel ranks (engine deepspeed), placed with a Ray placement group (placement.strategy); every "
        "mini-batch is cut across them, the loss and update are the one-process ones"))
    num_cpus: float = opt(0.5, ge=0, help="per rank")
    num_gpus: float = opt(0.0, ge=0, help="per rank")
    deepspeed: DeepSpeedSpec = opt(DeepSpeedSpec())
    num_threads: int = opt(2, ge=1, help="torch intra-op threads in the learner process")
    lr: float = opt(1e-6, gt=0)
    lr_warmup_steps: int = opt(0, ge=0, help="linear warm-up over this many optimizer steps, restarted "
                                             "whenever the optimizer is re-initialised (Adam's first steps "
                                             "move every weight by about lr)")
    weight_decay: float = opt(0.01, ge=0)
    betas: list[float] = opt([0.9, 0.999])
    adam_eps: float = opt(1e-8, gt=0)
    max_grad_norm: float = opt(1.0, gt=0)
    num_prompts_per_mini_batch: int = opt(64, ge=1, help=(
        "one optimizer step per mini-batch of this many groups; a batch of n groups is cut into "
        "ceil(n / this) mini-batches of equal size (within one group), never a ragged last one"))
    num_epochs: int = opt(1, ge=1, help="passes over each rollout batch")
    micro_batch_size: int = opt(64, ge=1, help="sequences per forward/backward when max_tokens_per_micro_batch "
                                               "is null (memory only: the gradient does not depend on it)")
    max_tokens_per_micro_batch: int | None = opt(None, ge=1, help=(
        "micro-batches bounded by tokens instead of rows (verl's dynamic batch size): rows sorted by length "
        "and cut so that rows x longest row (prompt + response, padding included) stays within this; "
        "data-parallel ranks get equal token loads. Memory only: the gradient is the same. null = "
        "micro_batch_size rows per pass"))
    max_logits_mib: float = opt(1024.0, gt=0, help=(
        "the LM head runs on response positions only, in chunks whose float32 logits (positions x vocabulary) "
        "take at most this many MiB; with more than one chunk each is recomputed in backward"))
    share_prompts: bool = opt(False, help=(
        "run each prompt once for all the responses of its group (their keys and values shared, gradients "
        "included) instead of once per response: G times fewer prompt positions, the same log-probs within "
        "float rounding. The larger the prompt next to the responses, the larger the saving (5x on the demo); "
        "not with gradient_checkpointing (HF drops the cache there)"))
    autocast_bf16: bool = opt(False, help="bf16 autocast for forward/backward")
    gradient_checkpointing: bool = opt(False, help=(
        "recompute each layer's activations in backward instead of keeping them (HF gradient checkpointing): "
        "long responses of a large model fit in memory for about a third more compute"))


@dataclass
class ReferenceSpec:
    num_actors: int = opt(1, ge=1, help="reference actors; each scores a share of the batch (all hold the same weights)")
    num_cpus: float = opt(0.25, ge=0)
    num_gpus: float = opt(0.0, ge=0)
    micro_batch_size: int = opt(128, ge=1, help="sequences per forward pass when max_tokens_per_micro_batch is null")
    max_tokens_per_micro_batch: int | None = opt(None, ge=1, help=(
        "forward passes bounded by tokens instead of rows: rows sorted by length, rows x longest row within "
        "this (see learner.max_tokens_per_micro_batch)"))
    max_logits_mib: float = opt(1024.0, gt=0, help="float32 logits of the LM head alive at once (see learner)")
    share_prompts: bool = opt(False, help="each prompt run once for its group's responses (see learner)")
    num_threads: int = opt(2, ge=1, help="torch intra-op threads in the reference process")
    temperature_scale: float = opt(1.0, gt=0, help=(
        "the reference's logprobs are taken at generator.temperature x this. 1 = the paper's KL. > 1 "
        "flattens the reference, so the KL penalty can pull entropy above the snapshot's (a penalty to the "
        "plain snapshot only pulls towards its entropy, which a reset may have taken low)"))


@dataclass
class OverlongSpec:
    """Responses cut off by generator.max_new_tokens (DAPO)."""
    mode: Literal["none", "mask", "soft_punish"] = opt("none", help=(
        "mask: truncated responses get no gradient; soft_punish: a length penalty falling linearly "
        "from 0 to -1 over the last buffer_tokens before the limit is added to the reward"))
    buffer_tokens: int = opt(64, ge=1, help="soft_punish: the length of the penalty ramp")


@dataclass
class OffPolicySpec:
    """The correction for tokens sampled by another policy than the learner's (algo/offpolicy.py)."""
    mode: Literal["none", "tis", "icepop", "seq_mask_tis"] = opt("none", help=(
        "each token's policy-gradient term is multiplied by a weight from r = pi_learner / pi_sampler (the "
        "learner's log-probs before the update over the generator's): none = 1; tis = min(r, high) (truncated "
        "importance sampling); icepop = r inside [low, high], 0 outside (ICE-POP); seq_mask_tis = min(r, high), "
        "0 for whole sequences whose geometric-mean r leaves [low, high] (NeMo-RL's ProRL v2). The vLLM "
        "sampler's kernels are not the learner's, and with supervisor.max_staleness > 0 its weights are older"))
    low: float = opt(0.5, ge=0, le=1, help="icepop, seq_mask_tis: the lower bound of r")
    high: float = opt(5.0, ge=1, help="tis, seq_mask_tis: the truncation; icepop: the upper bound of r")


@dataclass
class AlgorithmSpec:
    adv_estimator: Literal["grpo", "dr_grpo"] = opt("grpo", help="grpo divides by the group std; dr_grpo (Dr.GRPO) does not")
    eps_low: float = opt(0.2, ge=0, lt=1)
    eps_high: float = opt(0.4, ge=0, help="DAPO clip-higher: a larger upper bound keeps low-probability tokens alive")
    dual_clip_c: float | None = opt(None, gt=1)
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                      "seq-mean-token-sum-norm"] = opt(
        "token-mean", help="token-mean (DAPO) weights every token equally; seq-mean biases towards short answers")
    kl_estimator: Literal["k1", "k2", "k3"] = opt("k3")
    k3_cap: float | None = opt(10.0, gt=0, help=(
        "k3's per-token value is cut to at most this (verl: 10), so that a few tokens the reference finds far "
        "likelier cannot dominate the KL term; the share of capped tokens is reported (kl_capped_frac). null = "
        "no cap"))
    entropy_coef: float = opt(0.0, ge=0, help="entropy bonus: loss -= entropy_coef * entropy (0 = none, the paper's)")
    overlong: OverlongSpec = opt(OverlongSpec())
    off_policy_correction: OffPolicySpec = opt(OffPolicySpec())


@dataclass
class DynamicSamplingSpec:
    """DAPO's dynamic sampling: only groups with different rewards are trained on; every round
    asks for as many prompts as the measured keep rate says it takes to fill the batch."""
    enabled: bool = opt(True, help="DAPO: drop groups whose rewards are all equal and sample more")
    max_rounds: int = opt(4, ge=1, help="generation rounds per step before training on what it has")
    fill_confidence: float = opt(0.9, ge=0.5, lt=1, help=(
        "each round asks for enough prompts that the missing groups are all kept with this probability, at "
        "the running keep rate (binomial); the groups beyond the batch are not trained on (counted as "
        "surplus_groups). Higher: fewer rounds, more surplus"))
    keep_rate_decay: float = opt(0.5, ge=0, lt=1, help=(
        "the running keep rate is kept groups / generated groups, older rounds weighted by this per round "
        "(0 = the last round alone); 1.0 before the first round"))
    max_oversample: float = opt(4.0, ge=1, help="a round asks for at most this many times the missing prompts")


@dataclass
class KLControlSpec:
    mode: Literal["fixed", "entropy-target", "kl-target"] = opt("fixed", help=(
        "fixed: the paper's constant beta; entropy-target: move beta to hold policy entropy in a band "
        "(up when entropy is below it, down when above); kl-target: the adaptive-KL rule of "
        "Ziegler et al. / OpenRLHF, for comparison"))
    coef: float = opt(1e-4, ge=0, help="beta of the KL penalty to the reference policy (the start value "
                                       "for the controllers)")
    actuator: Literal["kl_coef", "entropy_coef", "reference_temperature"] = opt("kl_coef", help=(
        "entropy-target: what the controller moves: kl_coef = beta (ProRL's lever; a penalty can only pull "
        "entropy towards the reference's), entropy_coef = the entropy bonus's coefficient, starting from "
        "algorithm.entropy_coef, with beta fixed at coef (Skywork-OR1's adaptive entropy control), "
        "reference_temperature = the reference's temperature scale, starting from "
        "reference.temperature_scale, with beta fixed at coef (> 1 flattens the reference so the penalty "
        "lifts entropy, < 1 sharpens it so the penalty lowers it, whatever the snapshot's entropy); "
        "coef_min / coef_max bound whichever it moves"))
    entropy_target: float | None = opt(None, gt=0, help="entropy-target: the target, nats per token")
    entropy_target_relative: float | None = opt(None, gt=0, help=(
        "entropy-target: the target as this fraction of the entropy measured on the first step"))
    entropy_signal: Literal["batch", "task_mean"] = opt("batch", help=(
        "entropy-target: the entropy controlled: batch = the token mean over the step's trained tokens "
        "(moves with the batch's task mix, which dynamic sampling shifts); task_mean = each task's token mean "
        "weighted by data.tasks' weights (over the tasks in the batch)"))
    band: float = opt(0.05, gt=0, help="entropy-target: the band is target +- band (nats per token)")
    rate: float = opt(0.2, gt=0, help="entropy-target: integral gain, log(beta) per step per band width of error")
    kp: float = opt(1.0, ge=0, help="entropy-target: proportional gain (damps the loop)")
    smoothing: float = opt(1.0, gt=0, le=1, help="entropy-target: weight of the newest entropy in a moving "
                                                 "average (1 = none; smoothing adds lag)")
    coef_min: float = opt(1e-6, gt=0)
    coef_max: float = opt(1.0, gt=0)
    kl_target: float | None = opt(None, gt=0, help="kl-target: the KL to hold")
    horizon: float = opt(10.0, gt=0, help="kl-target: steps over which a 20% error is corrected")


@dataclass
class ResetSpec:
    triggers: list[Literal["scheduled", "validation", "kl"]] = opt(["scheduled"], help=(
        "any of: scheduled (every every_steps), validation (no improvement for patience evaluations or a "
        "drop above max_drop), kl (the KL term's share of the loss above max_kl_share, or KL above "
        "kl_ceiling for kl_steps steps); [] = never"))
    every_steps: int = opt(200, ge=1)
    patience: int = opt(3, ge=1, help="validation: evaluations without improvement since the last reset")
    min_delta: float = opt(0.0, ge=0, help="validation: an improvement must exceed this")
    max_drop: float | None = opt(None, gt=0, help="validation: reset when accuracy falls this far below its best")
    max_kl_share: float | None = opt(None, gt=0, le=1, help="kl: beta*KL / (|pg loss| + beta*KL) above this")
    kl_ceiling: float | None = opt(None, gt=0, help="kl: KL above this for kl_steps steps in a row")
    kl_steps: int = opt(3, ge=1)
    min_gap: int = opt(1, ge=1, help="steps between two resets at least")
    reset_optimizer: bool = opt(True, help="re-initialise the learner's optimizer state at a reset")
    restore_kl_coef: bool = opt(False, help="start what the controller moves (beta, the bonus or the "
                                           "reference's temperature scale: kl.actuator) again from its start "
                                           "value at a reset")
    match_reference_entropy: bool = opt(True, help=(
        "kl.actuator reference_temperature: at a reset the reference's temperature scale is chosen again so "
        "that the new reference's entropy on the step's responses equals the old one's (the penalty's pull "
        "does not jump at the reset; bumpless transfer), within kl.coef_min..coef_max"))
    wait_for_entropy: bool = opt(True, help=(
        "kl.mode entropy-target moving kl_coef: a due reset waits until entropy (kl.entropy_signal, the mean "
        "of the last entropy_window steps) reaches the target + entropy_margin band widths, since the KL penalty holds "
        "entropy just below the reference's; it is skipped after max_wait_steps and the triggers count "
        "again. No effect in the other modes"))
    entropy_margin: float = opt(0.5, ge=-1, le=2, help=(
        "wait_for_entropy: band widths above the target to wait for (below it, if negative: with a "
        "flattened reference, reference.temperature_scale > 1, the penalty lifts entropy above the snapshot's)"))
    entropy_margin_high: float | None = opt(None, ge=0, le=2, help=(
        "wait_for_entropy: band widths above the target beyond which a due reset waits too (None: no "
        "limit); for a flattened reference, whose snapshot taken high lifts entropy further"))
    max_wait_steps: int = opt(20, ge=0, help="wait_for_entropy: steps a due reset waits before it is skipped")
    entropy_window: int = opt(3, ge=1, help="wait_for_entropy: steps averaged (one step's entropy is noisy)")


@dataclass
class SupervisorSpec:
    num_prompts_per_step: int = opt(256, ge=1)
    max_staleness: int = opt(0, ge=0, help=(
        "how many policy versions old a rollout may be when it is trained on: step k's batch is sampled with "
        "the weights of step k - 1 - max_staleness. 0 = synchronous (generation waits for the learner's "
        "weights, the learner for the batch); 1 = one-step-off (the next batch is sampled while the learner "
        "trains); more lets generation run further ahead. A fixed schedule: runs stay reproducible, resumes "
        "exact (with weight_sync.method broadcast, up to 1: beyond, a batch may be sampled with weights newer "
        "than the schedule's, whichever the learner holds when the generators are free). Rows sampled by older "
        "weights are corrected by algorithm.off_policy_correction"))
    dynamic_sampling: DynamicSamplingSpec = opt(DynamicSamplingSpec())
    kl: KLControlSpec = opt(KLControlSpec())
    resets: ResetSpec = opt(ResetSpec())


FAMILIES = ("math", "code", "stem", "logic", "ifeval")


@dataclass
class PromptSpec:
    """How a family's item becomes chat messages; the family's verifier reads the answer format asked for."""
    system: str = opt("", help="the system message; empty = none")
    user: str = opt("{question}", help="the user message; {question} is replaced by the item's prompt")


@dataclass
class PromptsSpec:
    """One prompt template per task family."""
    math: PromptSpec = opt(PromptSpec(system="Solve the problem. Put the final answer in \\boxed{}."))
    code: PromptSpec = opt(PromptSpec(system="Write a Python 3 program that solves the problem. Give the "
                                             "whole program in one ```python code block."))
    stem: PromptSpec = opt(PromptSpec(system="Answer the question. Put the final answer in \\boxed{}: the "
                                             "letter of the option for a multiple-choice question."))
    logic: PromptSpec = opt(PromptSpec(system="Put the final answer in <answer></answer>."))
    ifeval: PromptSpec = opt(PromptSpec())


@dataclass
class TaskSpec:
    name: str = opt("chain_sum", help="task name in the run: metrics are reported under it")
    family: Literal["math", "code", "stem", "logic", "ifeval"] = opt(
        "logic", help="which verifier scores it: math (math-verify), code (sandboxed tests), stem (multiple "
                      "choice or short answer), logic (reasoning-gym's score_answer), ifeval (instructions)")
    source: Literal["generator", "file"] = opt("generator", help="items from a procedural generator or from a file")
    dataset: str | None = opt(None, help="source generator: a reasoning-gym dataset name (logic; math "
                                                "takes its arithmetic ones) or a built-in generator of the family")
    path: str | None = opt(None, help="source file: Parquet or JSONL rows {task, prompt, reference, metadata}")
    bad_rows: Literal["error", "skip"] = opt("error", help="source file: a malformed row stops loading with its "
                                                           "file and row, or is skipped and counted")
    holdout_rows: int = opt(0, ge=0, help="source file: rows kept out of training for validation; 0 = "
                                          "validation draws from the training rows (recorded as an event)")
    weight: float = opt(1.0, gt=0)
    config: dict[str, Any] = opt({}, help="keyword arguments of the generator (difficulty settings)")
    prompt: PromptSpec | None = opt(None, help="this task's template instead of its family's in data.prompts")


@dataclass
class DataSpec:
    train_seed: int = opt(1, ge=0)
    validation_seed: int = opt(900_000_000, ge=0, help="keep millions apart from train_seed (reasoning-gym items overlap)")
    prompts: PromptsSpec = opt(PromptsSpec())
    tasks: list[TaskSpec] = opt([TaskSpec(dataset="chain_sum")])


@dataclass
class ValidationSpec:
    every_steps: int = opt(10, ge=0, help="0 = only at step 0 and at the end")
    num_prompts_per_task: int = opt(64, ge=1)
    num_samples: int = opt(8, ge=1)
    temperature: float = opt(0.6, gt=0)
    top_p: float = opt(0.95, gt=0, le=1)
    ks: list[int] = opt([1, 4, 8])
    tasks: list[TaskSpec] = opt([], help="tasks evaluated but never trained on (e.g. ProRL's out-of-distribution "
                                         "reasoning-gym tasks acre, boxnet, game_of_life_halting)")


@dataclass
class EvaluationSpec:
    """`prorl eval`: pass@k of a model, and of a base model beside it, on the held-out prompts
    of data.tasks and validation.tasks (the same prompts as validation, each sampled many more
    times), at validation.temperature and validation.top_p."""
    num_samples: int = opt(64, ge=1, help="n: responses per prompt; pass@k is estimated for k up to n "
                                          "(unbiased: Chen et al. 2021), so n well above the largest k of interest")
    ks: list[int] = opt([], help="the k reported besides 1 and num_samples (always reported; the verdict on the "
                                 "boundary is read at num_samples); [] = 1, 2, 4, ... and num_samples")
    num_prompts_per_task: int | None = opt(None, ge=1, help="null: validation.num_prompts_per_task")
    tasks: list[str] = opt([], help="names from data.tasks and validation.tasks; [] = all of them")
    novelty_ngram: int = opt(4, ge=1, help="n-gram length of the novelty figure: the share of the n-grams "
                                           "(words and symbols) of the model's correct responses that appear in "
                                           "none of the base model's responses to the same prompt")
    margin: float = opt(0.02, ge=0, le=1, help="a pass@k difference within this is reported as no change")
    z: float = opt(2.0, ge=0, help="a pass@k difference within this many paired standard errors (over prompts) "
                                   "is reported as no change: with few prompts, a handful solved by one model "
                                   "alone is noise; 0 = the margin alone")

    @property
    def reported_ks(self) -> list[int]:
        """The k of the reports: 1, `ks` (or the powers of two below num_samples) and num_samples."""
        if self.ks:
            return sorted(set(self.ks) | {1, self.num_samples})
        return sorted({2 ** i for i in range(self.num_samples.bit_length()) if 2 ** i <= self.num_samples}
                      | {self.num_samples})


@dataclass
class CheckpointSpec:
    every_steps: int = opt(10, ge=0, help="a checkpoint after every N steps (and at the end, and on SIGTERM); "
                                          "0 = only at the end and on SIGTERM")
    keep_last: int = opt(2, ge=1, help="complete checkpoints kept (older ones are deleted after a save)")


@dataclass
class FaultToleranceSpec:
    """What the supervisor does when an actor dies (its process is killed, its node goes)."""
    max_actor_restarts: int = opt(20, ge=0, help="restarts per role over the whole run before the run fails "
                                                 "(a restart storm is a bug to look at, not to loop on)")
    max_rollbacks: int = opt(5, ge=0, help="learner losses survived by rolling back to the last checkpoint "
                                           "(in-process, without restarting the job)")
    call_timeout_s: float = opt(0.0, ge=0, help="a call to an actor that has not returned after this many "
                                                "seconds counts as a death (the actor is killed and "
                                                "replaced); 0 = no limit")


@dataclass
class WeightSyncSpec:
    """How the learner's new weights reach the generators after every update (each rollout row
    records the policy version it was sampled with)."""
    method: Literal["object_store", "broadcast"] = opt("object_store", help=(
        "object_store: rank 0 puts the weights in Ray's object store and every generator reads them (the CPU "
        "default; any placement). broadcast: one torch.distributed broadcast from learner rank 0 to every "
        "generator worker, NCCL when learner and generators have GPUs, gloo on CPUs: no copy through the "
        "object store, the GPU path of a cluster. Reference resets (rare) and replaced generators always take "
        "the object store"))
    bucket_mb: float = opt(256.0, gt=0, help="broadcast: tensors are sent flattened in buckets of this size")
    timeout_s: float = opt(300.0, gt=0, help="broadcast: a member that does not answer within this is lost; the "
                                             "group is formed again and the weights sent again")


@dataclass
class PlacementSpec:
    """Where the roles run on a Ray cluster. The learner's ranks get one placement-group bundle each
    (their num_cpus / num_gpus plus those of the roles colocated with them)."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = opt("PACK", help=(
        "Ray's placement-group strategy for the learner's bundles: PACK fills a node first (NCCL inside a "
        "node), SPREAD puts ranks on different nodes, STRICT_* fail rather than deviate"))
    colocate: list[Literal["generator", "reference"]] = opt([], help=(
        "roles whose actor i runs in learner rank i's bundle: on its node and, with fractional num_gpus "
        "summing to at most 1, on its GPU (verl's colocated layout; vLLM's gpu_memory_utilization must leave "
        "room). Needs the role's num_actors <= learner.num_actors. [] = every role placed on its own"))
    ready_timeout_s: float = opt(600.0, gt=0, help="a placement group not placed within this fails the run "
                                                   "(the cluster lacks the resources the spec asks for)")


@dataclass
class PrometheusSpec:
    """The run's Prometheus exporter (prometheus-client's HTTP server in the driver)."""
    enabled: bool = opt(True)
    address: str = opt("127.0.0.1", help="address the exporter listens on (0.0.0.0 for a Prometheus on "
                                         "another host)")
    port: int = opt(0, ge=0, le=65535, help="0 = any free port; either way the address is written to "
                                             "targets_dir, where monitoring/prometheus/prometheus.yml finds it")
    targets_dir: str = opt("/tmp/prorl/prometheus", help=(
        "file_sd target files of live runs (<name>-<pid>.prorl.json) and of their Ray nodes' metrics "
        "(<name>-<pid>.ray.json); removed when the run exits"))
    linger_s: float = opt(0.0, ge=0, help="keep serving this long after the run completes, so that a scrape "
                                          "sees the final figures (a stopped run exits at once)")


@dataclass
class MetricsSpec:
    print_every_steps: int = opt(1, ge=1)
    prometheus: PrometheusSpec = opt(PrometheusSpec())


@dataclass
class RaySpec:
    address: str | None = opt(None, help="null: RAY_ADDRESS if set (ray job submit), else an embedded local Ray")
    num_cpus: int = opt(2, ge=1, help="CPUs of the embedded local Ray")
    namespace: str = opt("prorl")
    metrics_export_port: int = opt(0, ge=0, le=65535, help="port of the embedded Ray's own Prometheus metrics "
                                                          "(0 = Ray picks one; the exporter lists it)")


@dataclass
class RunSpec:
    name: str = opt("run")
    output_dir: str = opt("runs")
    seed: int = opt(0, ge=0)
    num_steps: int = opt(100, ge=1)
    model: ModelSpec = opt(ModelSpec())
    generator: GeneratorSpec = opt(GeneratorSpec())
    verifier: VerifierSpec = opt(VerifierSpec())
    learner: LearnerSpec = opt(LearnerSpec())
    reference: ReferenceSpec = opt(ReferenceSpec())
    algorithm: AlgorithmSpec = opt(AlgorithmSpec())
    supervisor: SupervisorSpec = opt(SupervisorSpec())
    data: DataSpec = opt(DataSpec())
    validation: ValidationSpec = opt(ValidationSpec())
    evaluation: EvaluationSpec = opt(EvaluationSpec())
    checkpoint: CheckpointSpec = opt(CheckpointSpec())
    resume: str = opt("auto", help="auto: continue from the newest complete checkpoint of this run's directory "
                                   "if there is one; never: start afresh (an earlier run's directory is moved "
                                   "aside); or the path of a checkpoint directory (step_NNNNNN) to start from")
    fault_tolerance: FaultToleranceSpec = opt(FaultToleranceSpec())
    weight_sync: WeightSyncSpec = opt(WeightSyncSpec())
    placement: PlacementSpec = opt(PlacementSpec())
    metrics: MetricsSpec = opt(MetricsSpec())
    ray: RaySpec = opt(RaySpec())

    @property
    def group_size(self) -> int:
        """G: samples per prompt (ProRL: n = 16)."""
        return self.generator.num_samples_per_prompt

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def cross_checks(self) -> list[tuple[str, Any, str]]:
        """Rules that span fields: (key path, value, what is allowed)."""
        errs = []
        n, mb = self.supervisor.num_prompts_per_step, self.learner.num_prompts_per_mini_batch
        if mb > n:
            errs.append(("learner.num_prompts_per_mini_batch", mb,
                         f"at most supervisor.num_prompts_per_step ({n})"))
        for i, k in enumerate(self.validation.ks):
            if not 1 <= k <= self.validation.num_samples:
                errs.append((f"validation.ks[{i}]", k,
                             f"1..validation.num_samples ({self.validation.num_samples})"))
        errs += self._task_checks()
        ev = self.evaluation
        for i, k in enumerate(ev.ks):
            if not 1 <= k <= ev.num_samples:
                errs.append((f"evaluation.ks[{i}]", k, f"1..evaluation.num_samples ({ev.num_samples})"))
        names = [t.name for t in self.data.tasks] + [t.name for t in self.validation.tasks]
        for i, name in enumerate(ev.tasks):
            if name not in names:
                errs.append((f"evaluation.tasks[{i}]", name, f"one of {', '.join(names)} (data.tasks and "
                                                             "validation.tasks)"))
        if self.supervisor.dynamic_sampling.enabled and self.generator.num_samples_per_prompt < 2:
            errs.append(("generator.num_samples_per_prompt", self.generator.num_samples_per_prompt,
                         "at least 2 with supervisor.dynamic_sampling.enabled (a group of one is never informative)"))
        if self.generator.max_new_tokens >= self.generator.max_model_len:
            errs.append(("generator.max_new_tokens", self.generator.max_new_tokens,
                         f"less than generator.max_model_len ({self.generator.max_model_len})"))
        kl, rs = self.supervisor.kl, self.supervisor.resets
        if kl.mode == "entropy-target" and (kl.entropy_target is None) == (kl.entropy_target_relative is None):
            errs.append(("supervisor.kl.entropy_target", kl.entropy_target,
                         "exactly one of entropy_target and entropy_target_relative with mode entropy-target"))
        if kl.actuator != "kl_coef" and kl.mode != "entropy-target":
            errs.append(("supervisor.kl.actuator", kl.actuator, f"{kl.actuator} only with mode entropy-target"))
        if kl.actuator == "reference_temperature":
            if kl.coef == 0:
                errs.append(("supervisor.kl.coef", kl.coef, "> 0 with actuator reference_temperature (the "
                                                            "penalty is what moves entropy)"))
            if kl.coef_min < 0.5 or kl.coef_max > 2:
                errs.append(("supervisor.kl.coef_min", [kl.coef_min, kl.coef_max],
                             "coef_min >= 0.5 and coef_max <= 2 with actuator reference_temperature (the "
                             "scale of the reference's temperature)"))
        if kl.mode == "kl-target" and kl.kl_target is None:
            errs.append(("supervisor.kl.kl_target", None, "a number with mode kl-target"))
        if kl.actuator == "reference_temperature" and rs.match_reference_entropy and rs.restore_kl_coef:
            errs.append(("supervisor.resets.restore_kl_coef", True, "false with match_reference_entropy and "
                                                                    "kl.actuator reference_temperature (both set "
                                                                    "the scale at a reset)"))
        if kl.coef_min >= kl.coef_max:
            errs.append(("supervisor.kl.coef_min", kl.coef_min, f"less than coef_max ({kl.coef_max})"))
        if "validation" in rs.triggers and self.validation.every_steps == 0:
            errs.append(("supervisor.resets.triggers", rs.triggers,
                         "validation only with validation.every_steps > 0 (it needs evaluations during the run)"))
        if "kl" in rs.triggers and rs.max_kl_share is None and rs.kl_ceiling is None:
            errs.append(("supervisor.resets.triggers", rs.triggers, "kl only with max_kl_share or kl_ceiling set"))
        if len(set(rs.triggers)) != len(rs.triggers):
            errs.append(("supervisor.resets.triggers", rs.triggers, "each trigger once"))
        if self.algorithm.overlong.buffer_tokens > self.generator.max_new_tokens and \
                self.algorithm.overlong.mode == "soft_punish":
            errs.append(("algorithm.overlong.buffer_tokens", self.algorithm.overlong.buffer_tokens,
                         f"at most generator.max_new_tokens ({self.generator.max_new_tokens})"))
        if not self.data.tasks:
            errs.append(("data.tasks", [], "at least one task"))
        if abs(self.data.train_seed - self.data.validation_seed) < 1_000_000:
            errs.append(("data.validation_seed", self.data.validation_seed,
                         "at least 1,000,000 away from data.train_seed (items of nearby seeds overlap)"))
        if len(self.learner.betas) != 2 or not all(0 <= b < 1 for b in self.learner.betas):
            errs.append(("learner.betas", self.learner.betas, "two numbers in [0, 1)"))
        if self.resume not in ("auto", "never") and not (Path(self.resume) / "supervisor_state.json").is_file():
            errs.append(("resume", self.resume, "auto, never, or a checkpoint directory (one holding "
                                                "supervisor_state.json)"))
        errs += self._scale_checks()
        if self.model.tiny.hidden_size % self.model.tiny.num_heads:
            errs.append(("model.tiny.num_heads", self.model.tiny.num_heads, "a divisor of model.tiny.hidden_size"))
        if self.model.tiny.num_heads % self.model.tiny.num_kv_heads:
            errs.append(("model.tiny.num_kv_heads", self.model.tiny.num_kv_heads, "a divisor of model.tiny.num_heads"))
        return errs

    def _scale_checks(self) -> list[tuple[str, Any, str]]:
        """Engines, ranks, placement and weight sync."""
        errs, ln, ds, g = [], self.learner, self.learner.deepspeed, self.generator
        if ln.num_actors > 1 and ln.engine != "deepspeed":
            errs.append(("learner.num_actors", ln.num_actors, "1 with learner.engine torch (data parallel ranks "
                                                              "need engine deepspeed)"))
        if ln.share_prompts and ln.gradient_checkpointing:
            errs.append(("learner.share_prompts", True, "false with learner.gradient_checkpointing (transformers "
                                                        "drops the key/value cache of checkpointed layers)"))
        if ln.engine == "deepspeed":
            if ln.autocast_bf16:
                errs.append(("learner.autocast_bf16", True, "false with engine deepspeed (learner.deepspeed.bf16)"))
            if ds.offload_params and ds.zero_stage != 3:
                errs.append(("learner.deepspeed.offload_params", True, "only with zero_stage 3"))
        tp = g.vllm.tensor_parallel_size
        if tp > 1 and (g.engine != "vllm" or g.num_gpus != tp):
            errs.append(("generator.vllm.tensor_parallel_size", tp, f"1, or engine vllm with generator.num_gpus = "
                                                                    f"{tp} (one GPU per tensor-parallel worker)"))
        roles = {"learner": ln, "generator": g, "reference": self.reference}
        for role, r in roles.items():
            if r.num_gpus > 1 and r.num_gpus != int(r.num_gpus):
                errs.append((f"{role}.num_gpus", r.num_gpus, "a fraction below 1 or a whole number (Ray's rule)"))
        pl = self.placement
        if len(set(pl.colocate)) != len(pl.colocate):
            errs.append(("placement.colocate", pl.colocate, "each role once"))
        for role in pl.colocate:
            if roles[role].num_actors > ln.num_actors:
                errs.append((f"{role}.num_actors", roles[role].num_actors,
                             f"at most learner.num_actors ({ln.num_actors}) with {role} in placement.colocate"))
        gpus = ln.num_gpus + sum(roles[r].num_gpus for r in pl.colocate)
        if gpus > 1 and gpus != int(gpus):
            errs.append(("placement.colocate", pl.colocate, f"roles whose num_gpus with the learner's sum to at most "
                                                            f"1 or to a whole number (got {gpus:g} per bundle)"))
        if ln.num_gpus > 1:
            errs.append(("learner.num_gpus", ln.num_gpus, "at most 1 per rank (a rank uses one GPU; more ranks for more)"))
        if ln.num_actors > 1 and 0 < gpus != int(gpus):
            errs.append(("learner.num_gpus", ln.num_gpus, f"with {ln.num_actors} ranks, GPUs per bundle (the learner's "
                                                          f"and its colocated roles', {gpus:g}) that make a whole GPU: "
                                                          "two NCCL ranks cannot share one"))
        if self.weight_sync.method == "broadcast" and g.num_gpus > 0 and g.num_gpus != int(g.num_gpus):
            errs.append(("generator.num_gpus", g.num_gpus, "whole GPUs with weight_sync.method broadcast (each member "
                                                           "of an NCCL group needs a GPU of its own)"))
        if self.weight_sync.method == "broadcast" and "generator" in pl.colocate and 0 < ln.num_gpus + g.num_gpus <= 1:
            errs.append(("weight_sync.method", "broadcast", "object_store with the generators colocated on the "
                                                            "learner's GPU (NCCL cannot broadcast between two "
                                                            "processes on one GPU)"))
        if self.weight_sync.method == "broadcast" and (ln.num_gpus > 0) != (g.num_gpus > 0):
            errs.append(("weight_sync.method", "broadcast", "object_store when only one of learner and generator "
                                                            "has GPUs (one broadcast runs on NCCL or on gloo)"))
        return errs

    def _task_checks(self) -> list[tuple[str, Any, str]]:
        from prorl_actors.tasks import OOD_EVAL_DATASETS, task_spec_errors  # the registry knows its generators
        errs = []
        for i, t in enumerate(self.data.tasks):
            if t.family == "logic" and t.dataset in OOD_EVAL_DATASETS:
                errs.append((f"data.tasks[{i}].dataset", t.dataset,
                             f"a training task: {', '.join(OOD_EVAL_DATASETS)} are ProRL's held-out evaluation "
                             "tasks (list them under validation.tasks)"))
        listed = [(f"data.tasks[{i}]", t) for i, t in enumerate(self.data.tasks)]
        listed += [(f"validation.tasks[{i}]", t) for i, t in enumerate(self.validation.tasks)]
        names = [t.name for _, t in listed]
        for path, t in listed:
            if names.count(t.name) > 1:
                errs.append((f"{path}.name", t.name, "task names unique across data.tasks and validation.tasks"))
            errs += [(f"{path}.{key}", value, allowed) for key, value, allowed in task_spec_errors(t)]
        for name, tmpl in [(f, getattr(self.data.prompts, f)) for f in FAMILIES] + \
                [(f"{p}.prompt", t.prompt) for p, t in listed if t.prompt is not None]:
            where = name if name.endswith(".prompt") else f"data.prompts.{name}"
            if tmpl.user.count("{question}") != 1:
                errs.append((f"{where}.user", tmpl.user, "a template with {question} exactly once"))
        trained = {_source_key(t): i for i, t in enumerate(self.data.tasks)}
        for i, t in enumerate(self.validation.tasks):
            if _source_key(t) in trained:
                errs.append((f"validation.tasks[{i}]", t.name, f"a task not trained on (data.tasks"
                                                             f"[{trained[_source_key(t)]}] has the same source)"))
        return errs


def _source_key(t: TaskSpec) -> tuple:
    return (t.family, t.source, t.dataset, t.path, repr(sorted(t.config.items())))


# ----------------------------------------------------------------------------- checking
class SpecError(InputError):
    """Every problem of a spec, each as (key path, value given, what is allowed)."""

    def __init__(self, errors: list[tuple[str, Any, str]]):
        self.errors = errors
        lines = [f"  {path}: got {value!r}; allowed: {allowed}" for path, value, allowed in errors]
        super().__init__(f"{len(errors)} error(s) in the run spec:\n" + "\n".join(lines))


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _build(tp, value, path: str, errs: list) -> Any:
    """Return `value` converted to `tp`, appending (path, value, allowed) for each problem."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errs.append((path or "<root>", value, _type_name(tp)))
            return None
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        for key in value:
            if key not in fields:
                errs.append((f"{path}.{key}".lstrip("."), value[key],
                             f"a known key of {path or 'the spec'}: {', '.join(fields)}"))
        kwargs = {}
        for name, f in fields.items():
            if name not in value:
                continue
            sub = f"{path}.{name}".lstrip(".")
            v = _build(hints[name], value[name], sub, errs)
            if v is not None or value[name] is None:
                _check_bounds(v, f.metadata, sub, errs, given=value[name])
                kwargs[name] = v
        try:
            return tp(**kwargs)
        except TypeError as e:  # only reachable if a field has no default
            errs.append((path, value, str(e)))
            return None
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            errs.append((path, value, _type_name(tp)))
            return None
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            errs.append((path, value, _type_name(tp)))
            return None
        inner = [a for a in args if a is not type(None)]
        return _build(inner[0], value, path, errs)
    if origin is list:
        if not isinstance(value, list):
            errs.append((path, value, _type_name(tp)))
            return None
        (item,) = typing.get_args(tp)
        return [_build(item, v, f"{path}[{i}]", errs) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            errs.append((path, value, "a mapping with string keys"))
            return None
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            errs.append((path, value, "true or false"))
            return None
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errs.append((path, value, "an integer"))
            return None
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errs.append((path, value, "a number"))
            return None
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            errs.append((path, value, "a string"))
            return None
        return value
    raise TypeError(f"spec type {tp} at {path} is not supported")


def _check_bounds(v, meta, path, errs, given):
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return
    for key, op, word in (("ge", float.__ge__, ">="), ("gt", float.__gt__, ">"),
                          ("le", float.__le__, "<="), ("lt", float.__lt__, "<")):
        if key in meta and not op(float(v), float(meta[key])):
            errs.append((path, given, f"{word} {meta[key]}"))


def build_spec(data: dict) -> RunSpec:
    """Plain nested dict -> RunSpec, or SpecError listing every problem."""
    errs: list = []
    spec = _build(RunSpec, data, "", errs)
    if not errs:
        errs.extend(spec.cross_checks())
    if errs:
        raise SpecError(errs)
    return spec


def _read_spec_file(path: str | Path) -> DictConfig:
    """The YAML mapping of a spec file, or InputError saying what is wrong with the file."""
    import yaml
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise InputError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not a text file ({e.reason} at byte {e.start})") from None
    if not isinstance(cfg, DictConfig):
        raise InputError(f"{path}: a run spec is a mapping of sections (model:, data:, learner:, ...); "
                         f"this file holds a {type(OmegaConf.to_container(cfg)).__name__}")
    return cfg


def load_spec(path: str | Path | None, overrides: list[str] = ()) -> RunSpec:
    """YAML file (or the defaults when path is None) + `dotted.key=value` overrides."""
    errs = []
    cfg = _read_spec_file(path) if path is not None else OmegaConf.create({})
    parsed = []
    for o in overrides:
        if "=" not in o:
            errs.append((o, o, "overrides of the form dotted.key=value"))
            continue
        try:
            parsed.append(OmegaConf.from_dotlist([o]))
        except Exception as e:  # noqa: BLE001 - OmegaConf's grammar errors have no common base worth naming
            errs.append((o.split("=", 1)[0], o.split("=", 1)[1],
                         f"a value OmegaConf can parse ({str(e).splitlines()[0]})"))
    if errs:
        raise SpecError(errs)
    try:
        cfg = OmegaConf.merge(cfg, *parsed)
    except Exception as e:  # noqa: BLE001 - e.g. a list given where the file has a mapping
        raise SpecError([("<overrides>", list(overrides), f"values that fit the spec's structure ({e})")]) from None
    try:
        data = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # a broken ${...} interpolation
        raise SpecError([("<interpolation>", None, str(e))]) from None
    return build_spec(data or {})


def to_yaml(spec: RunSpec) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(spec)))
