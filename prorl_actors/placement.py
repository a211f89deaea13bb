"""Where the roles run: the learner's ranks in one Ray placement group (a bundle per rank),
and the roles of `placement.colocate` inside those bundles (actor i with learner rank i).

    bundle i = learner rank i's {CPU, GPU} + each colocated role's, if it has an actor i

With fractional GPUs that sum to at most 1, a bundle's roles share one GPU (the learner and the
reference only: a vLLM generator on the learner's GPU would need vLLM sleep mode, and the spec
refuses it); with whole numbers they share a node. Roles not colocated are placed by Ray's
scheduler from their own num_cpus / num_gpus.
"""
from __future__ import annotations

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from prorl_actors.spec import RunSpec


def role_resources(spec: RunSpec) -> dict[str, tuple[int, float, float]]:
    """role -> (actors, CPUs each, GPUs each) for the roles a placement group can hold."""
    return {"learner": (spec.learner.num_actors, spec.learner.num_cpus, spec.learner.num_gpus),
            "generator": (spec.generator.num_actors, spec.generator.num_cpus, spec.generator.num_gpus),
            "reference": (spec.reference.num_actors, spec.reference.num_cpus, spec.reference.num_gpus)}


def learner_bundles(spec: RunSpec) -> list[dict[str, float]]:
    """One bundle per learner rank, holding the colocated roles' actor of the same index."""
    res = role_resources(spec)
    bundles = []
    for i in range(spec.learner.num_actors):
        cpu, gpu = 0.0, 0.0
        for role in ("learner", *spec.placement.colocate):
            n, c, g = res[role]
            if i < n:
                cpu, gpu = cpu + c, gpu + g
        bundle = {k: v for k, v in (("CPU", cpu), ("GPU", gpu)) if v > 0}
        bundles.append(bundle or {"CPU": 0.01})   # a bundle must ask for something
    return bundles


def gpus_needed(spec: RunSpec) -> float:
    """GPUs the spec's actors ask for in all (colocated roles count once, inside the bundles)."""
    res = role_resources(spec)
    alone = sum(n * g for role, (n, _, g) in res.items() if role != "learner" and role not in spec.placement.colocate)
    return sum(b.get("GPU", 0.0) for b in learner_bundles(spec)) + alone


class Placement:
    """The learner's placement group and each role's actor options."""

    def __init__(self, spec: RunSpec):
        self.colocate = set(spec.placement.colocate)
        self.bundles = learner_bundles(spec)
        self.pg = placement_group(self.bundles, strategy=spec.placement.strategy, name=f"prorl-{spec.name}-learner")
        ready, _ = ray.wait([self.pg.ready()], timeout=spec.placement.ready_timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"the learner's placement group ({len(self.bundles)} bundles {self.bundles[0]}, strategy "
                f"{spec.placement.strategy}) was not placed within placement.ready_timeout_s = "
                f"{spec.placement.ready_timeout_s:g} s: the cluster lacks the resources the spec asks for "
                f"({ray.available_resources()} available)")

    def options(self, role: str):
        """-> rank -> the actor options placing `role`'s actor at that rank."""
        def for_rank(rank: int) -> dict:
            if role == "learner" or role in self.colocate:
                return {"scheduling_strategy": PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=rank)}
            return {}
        return for_rank

    def node_of_bundles(self) -> list[str]:
        """The node id of each bundle (for tests and logs)."""
        table = ray.util.placement_group_table(self.pg)
        return [table["bundles_to_node_id"][i] for i in range(len(self.bundles))]

    def remove(self) -> None:
        try:
            remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001 - already gone with the cluster
            pass
