"""Ray gives each NeuronBackend replica its own NeuronCore (stand-in SDK, declared neuron_cores).

Four actors ask for {"neuron_cores": 1} on a local Ray that declares 4 cores; each imports the
torch_neuronx stand-in (via PYTHONPATH in its runtime_env), loads an inf2 artifact and warms it up.
Every replica must see a distinct NEURON_RT_VISIBLE_CORES equal to the ids Ray reports, the backend
must have recorded the same cores, and the stand-in's import log must show the SDK imported in each
replica's own process with those cores already set.
"""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.neuron_placement import NeuronReplica, check_distinct_placement, local_ray_with_neuron_cores
from tests.fixtures.neuron_standin import build_standin_artifact, load_standin

pytestmark = pytest.mark.integration

REPLICAS = 4


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_standin_artifact(tmp_path_factory.mktemp("placement") / "art", target="inf2")


@pytest.fixture(scope="module")
def ray_env():
    # One Ray per module (a second local Ray in one process is not reliable); if the integration
    # session already runs Ray, that one is used and left running.
    with local_ray_with_neuron_cores(neuron_cores=REPLICAS) as env:
        yield env


def test_each_replica_gets_its_own_neuron_core(artifact, ray_env):
    import ray

    actor = ray.remote(NeuronReplica).options(num_cpus=0, resources={"neuron_cores": 1}, runtime_env=ray_env.runtime_env())
    replicas = [actor.remote(str(artifact)) for _ in range(REPLICAS)]
    reports = ray.get([r.report.remote() for r in replicas], timeout=180)
    placement = check_distinct_placement(reports, replicas=REPLICAS)
    if ray_env.owned:  # a private Ray declared exactly these cores
        assert sorted(c for cores in placement.values() for c in cores) == list(range(REPLICAS))
    assert all(set(r["warmup"]) == {"1x8", "2x16"} for r in reports)

    # A replica serves: the contract's shape and dtype, computed in that replica.
    ids = torch.ones((2, 16), dtype=torch.int64)
    out = ray.get(replicas[0].forward.remote((2, 16), (ids, torch.ones_like(ids), torch.zeros_like(ids))))
    assert out.dtype == torch.float32 and tuple(out.shape) == (2, 4)

    # The SDK was imported inside each replica, after Ray had set its cores.
    imports = {r["pid"]: r["visible_cores"] for r in load_standin().read_log(ray_env.log) if r["name"] == "import"}
    assert {pid: imports.get(pid) for pid in placement} == {pid: ",".join(map(str, c)) for pid, c in placement.items()}
    for r in replicas:
        ray.kill(r)


def test_extra_replica_waits_for_a_free_core(artifact, ray_env):
    import ray

    actor = ray.remote(NeuronReplica).options(num_cpus=0, resources={"neuron_cores": 1}, runtime_env=ray_env.runtime_env())
    free = ray_env.neuron_cores  # 4 on a private Ray; what was free at the start on a shared one
    first = [actor.remote(str(artifact)) for _ in range(free)]
    placement = check_distinct_placement(ray.get([r.report.remote() for r in first], timeout=180), replicas=free)
    extra = actor.remote(str(artifact))
    pending = extra.report.remote()
    ready, _ = ray.wait([pending], timeout=3)
    assert ready == [], "a replica started although every NeuronCore was taken"
    freed = placement[ray.get(first[0].report.remote())["pid"]]
    ray.kill(first[0])
    report = ray.get(pending, timeout=180)
    assert [int(i) for i in report["accelerator_ids"]] == freed  # it got the core that was released
    assert report["visible_cores"] == ",".join(report["accelerator_ids"])
    assert report["health"]["cores"] == freed
    for r in [*first[1:], extra]:
        ray.kill(r)
