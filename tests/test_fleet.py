"""A fleet of generator actors (vLLM on CPU): prompts spread by load over two real engines,
and the samples do not depend on which actor drew them."""
import os
import sys

import pyarrow as pa
import pytest
import ray
from ray import cloudpickle

from prorl_actors import batch as B
from prorl_actors.actors.generator import GeneratorActor
from prorl_actors.engines.generation import SamplingSpec
from prorl_actors.group import ActorGroup
from prorl_actors.spec import GeneratorSpec
from prorl_actors.tasks import chat_messages
from prorl_actors.tinymodel import load_tokenizer

pytestmark = pytest.mark.integration
cloudpickle.register_pickle_by_value(sys.modules[__name__])   # workers cannot import this test module


class PidGenerator(GeneratorActor):
    """A generator that says which process drew each row."""

    def generate(self, prompts, sp):
        out = super().generate(prompts, sp)
        return out.append_column("pid", pa.array([os.getpid()] * out.num_rows, pa.int64()))


def _prompts(tok, n):
    ids = [tok(tok.apply_chat_template(chat_messages("", f"{i} + {i + 1} ="), tokenize=False,
                                       add_generation_prompt=True), add_special_tokens=False)["input_ids"]
           for i in range(n)]
    return pa.table({B.PROMPT_IDS: pa.array(ids, pa.list_(pa.int32())), B.TASK: ["t"] * n,
                     B.ITEM_INDEX: pa.array(range(n), pa.int64()), B.REFERENCE: [""] * n,
                     B.GROUP_ID: pa.array(range(n), pa.int64())})


def test_two_vllm_generators_share_the_prompts_and_draw_what_one_would(tiny_model):
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    try:
        tok = load_tokenizer(tiny_model)
        prompts = _prompts(tok, 16)
        sp = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
        env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        spec = GeneratorSpec(engine="vllm", max_new_tokens=8, max_model_len=256)

        def fleet(n):
            return ActorGroup(PidGenerator, n, num_cpus=0.5, env=env, name="generator",
                              args=lambda rank: (str(tiny_model), "float32", spec, rank))
        two = fleet(2)
        two.ping(timeout_s=600)
        out2 = two.map_table("generate", prompts, sp, num_chunks=8)
        two.kill()
        one = fleet(1)
        one.ping(timeout_s=600)
        out1 = one.map_table("generate", prompts, sp, num_chunks=8)
        one.kill()
    finally:
        ray.shutdown()
    assert out2.num_rows == 16 * 4 and out2[B.GROUP_ID].to_pylist() == [g for g in range(16) for _ in range(4)]
    assert len(set(out2["pid"].to_pylist())) == 2                     # both engines drew samples
    # the same chunks on one engine: the same responses, token for token
    assert out2[B.RESPONSE_IDS].to_pylist() == out1[B.RESPONSE_IDS].to_pylist()
    assert len(set(map(tuple, out2[B.RESPONSE_IDS].to_pylist()))) > 16     # sampled, not one answer per prompt
