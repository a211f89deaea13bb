import os

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray on loopback only
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

TEST_OVERRIDES = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_layers=2",
    "model.tiny.num_heads=2", "model.tiny.num_kv_heads=1", "model.tiny.sft_steps=150",
    "model.tiny.tokenizer_corpus_items=500",
    # test runs list themselves apart from real ones (a killed test driver leaves its file behind)
    "metrics.prometheus.targets_dir=/tmp/prorl-tests/prometheus",
    "data.tasks=[{name: chain_sum, dataset: chain_sum, config: {min_terms: 2, max_terms: 2, min_digits: 1, max_digits: 1}}]",
    "validation.tasks=[]",   # the demo's held-out tasks: tests that want one name their own
    # the synchronous loop, exactly as it was before rollouts were made ahead (tests of
    # max_staleness > 0 and of the correction say so), with the learner's two threads
    "supervisor.max_staleness=0", "algorithm.off_policy_correction.mode=none",
    "learner.num_threads=2", "reference.num_threads=2",
]


@pytest.fixture(scope="session")
def small_spec():
    """A spec whose tiny model builds in seconds (a weak model: tests need a real one, not a good one)."""
    from prorl_actors.spec import load_spec
    return load_spec("specs/tiny-cpu.yaml", TEST_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_model(small_spec, tmp_path_factory):
    """A real tiny Qwen2 model + tokenizer in HF format, built once per test session."""
    from prorl_actors.tinymodel import build_tiny_model
    out = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny_model(small_spec.model.tiny, small_spec.data, out, log=lambda *_: None)
    return out


def brute_pass_at_k(outcomes, k):
    """pass@k of one prompt whose samples were `outcomes` (truthy: correct), by enumerating every
    k-subset of them."""
    import itertools
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(s) for s in subsets) / len(subsets)


def prompt_table(tok, items):
    """Task items -> the prompt table a generator takes (chat template applied, one group each)."""
    import pyarrow as pa

    from prorl_actors import batch as B
    return pa.table({
        B.PROMPT_IDS: pa.array([tok(tok.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True),
                                    add_special_tokens=False)["input_ids"] for it in items], pa.list_(pa.int32())),
        B.TASK: [it.task for it in items], B.ITEM_INDEX: pa.array([it.index for it in items], pa.int64()),
        B.REFERENCE: [it.reference for it in items], B.GROUP_ID: pa.array(range(len(items)), pa.int64())})


# the one library line left on a vLLM run's terminal: vLLM's C++ notice as its CPU worker starts,
# printed below Python (prorl_actors/quiet.py says why it is not filtered)
ALLOWED_WARNINGS = ("Warning: NUMA binding: Using MEMBIND policy",)


def unexpected_warnings(text: str) -> list[str]:
    """The lines of a run's terminal that speak of a warning, except the allowed ones."""
    return [ln for ln in text.splitlines() if "warn" in ln.lower() and not any(a in ln for a in ALLOWED_WARNINGS)]
