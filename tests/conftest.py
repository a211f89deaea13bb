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
    from prorl_actors.config import load_spec
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

    from prorl_actors import batch as rb
    return pa.table({
        rb.PROMPT_IDS: pa.array([tok(tok.apply_chat_template(it.messages, tokenize=False, add_generation_prompt=True),
                                    add_special_tokens=False)["input_ids"] for it in items], pa.list_(pa.int32())),
        rb.TASK: [it.task for it in items], rb.ITEM_INDEX: pa.array([it.index for it in items], pa.int64()),
        rb.REFERENCE: [it.reference for it in items], rb.GROUP_ID: pa.array(range(len(items)), pa.int64())})


# the one library line left on a vLLM run's terminal: vLLM's C++ notice as its CPU worker starts,
# printed below Python (prorl_actors/quiet.py says why it is not filtered)
ALLOWED_WARNINGS = ("Warning: NUMA binding: Using MEMBIND policy",)


def unexpected_warnings(text: str) -> list[str]:
    """The lines of a run's terminal that speak of a warning, except the allowed ones."""
    return [ln for ln in text.splitlines() if "warn" in ln.lower() and not any(a in ln for a in ALLOWED_WARNINGS)]


@pytest.fixture(scope="module")
def sb():
    """A sandbox of 2 workers, one per test module (skipped where the host lacks its layers);
    it must leave no process behind."""
    from sandbox import Limits, Sandbox, probe
    iso = probe()
    if not iso.full:
        pytest.skip(f"host lacks isolation layers: {iso.missing}")
    with Sandbox(Limits(wall_s=1.0), workers=2) as s:
        yield s
        assert s.leftover_processes() == []


@pytest.fixture(autouse=True)
def nothing_left(request):
    """After every test that used the sandbox: none of its programs' processes is left."""
    yield
    if "sb" in request.fixturenames:
        assert request.getfixturevalue("sb").leftover_processes() == []


@pytest.fixture(scope="module")
def parts(small_spec, tiny_model):
    """(the test spec with the HF engine, its tokenizer, G = 4 rollouts of 6 prompts from a real
    generator), once per module: tests/test_actors.py, tests/test_learner.py."""
    import dataclasses

    from prorl_actors.actors.generator import GeneratorActor
    from prorl_actors.config import build_spec
    from prorl_actors.engines.generation import SamplingSpec
    from prorl_actors.tasks import validation_items
    from prorl_actors.tinymodel import load_tokenizer
    d = dataclasses.asdict(small_spec)
    spec = build_spec({**d, "generator": {**d["generator"], "engine": "hf"}})
    tok = load_tokenizer(tiny_model)
    gen = GeneratorActor(str(tiny_model), "float32", spec.generator, 0)
    prompts = prompt_table(tok, validation_items(spec.data, 6))
    rollouts = gen.generate(prompts, SamplingSpec(n=4, temperature=1.2, top_p=1.0, max_new_tokens=12, seed=0))
    return spec, tok, rollouts
