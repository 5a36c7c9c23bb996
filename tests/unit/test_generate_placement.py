"""Placement of generative replicas: one tensor-parallel group of tp_degree NeuronCores each,
replicas = cores / tp_degree, refused when the cores do not split evenly; on CPU one replica whose
ranks' threads never outnumber the cores."""

from __future__ import annotations

import pytest

from neuronserve.serve.placement import generate_actor_options, generate_cpu_layout, generate_replicas

# Instance NeuronCores (NEURON.md): inf2.xlarge 2, inf2.24xlarge 12, inf2.48xlarge 24, trn1.32xlarge 32,
# trn2.48xlarge 64 logical cores at LNC=2.
@pytest.mark.parametrize("cores,tp,replicas", [(2, 1, 2), (2, 2, 1), (12, 4, 3), (24, 8, 3), (24, 24, 1),
                                               (32, 32, 1), (32, 8, 4), (64, 16, 4)])
def test_replicas_are_the_cores_over_the_tensor_parallel_degree(cores, tp, replicas):
    assert generate_replicas(cores, tp) == replicas
    assert replicas * tp == cores  # every core in a group


@pytest.mark.parametrize("cores,tp,message", [
    (24, 16, "24 NeuronCores do not split into tensor-parallel groups of 16 (tp_degree): 8 would sit idle"),
    (12, 8, "4 would sit idle; use a tp_degree that divides 12 (1, 2, 3, 4, 6, 12)"),
    (2, 8, "2 NeuronCores cannot hold one tensor-parallel group of 8"),
    (2, 0, "tp_degree 0: must be >= 1"),
])
def test_uneven_groups_are_refused_with_the_fix(cores, tp, message):
    with pytest.raises(ValueError) as e:
        generate_replicas(cores, tp)
    assert message in str(e.value)


def test_a_neuron_replica_asks_for_its_whole_group_and_no_cpu():
    actor = generate_actor_options(4, neuron=True, env={"X": "1"})
    assert actor == {"num_cpus": 0, "resources": {"neuron_cores": 4}, "runtime_env": {"env_vars": {"X": "1"}}}


@pytest.mark.parametrize("cpus,tp", [(1, 1), (2, 1), (15, 2), (188, 4)])
def test_a_cpu_replica_reserves_every_cpu_it_binds_and_no_more(cpus, tp):
    replicas, per_replica = generate_cpu_layout(cpus, tp)
    assert replicas * per_replica <= cpus and per_replica >= tp
    assert generate_actor_options(tp, neuron=False, cpus=per_replica) == {"num_cpus": per_replica}


def test_more_ranks_than_cpus_is_refused():
    with pytest.raises(ValueError, match="2 CPUs cannot hold 4 tensor-parallel ranks"):
        generate_cpu_layout(2, 4)


def test_place_generate_lays_out_groups_and_keeps_a_fixed_count_that_fits():
    from neuronserve.serve.placement import place_generate

    assert place_generate("inf2", 2, cpus=96, neuron_cores=12) == (6, {"num_cpus": 0, "resources": {"neuron_cores": 2}})
    assert place_generate("inf2", 2, cpus=96, neuron_cores=12, num_replicas=3)[0] == 3
    assert place_generate("trn2", 16, cpus=8, neuron_cores=None)[0] == 1  # no Ray yet: one group
    with pytest.raises(ValueError, match="need 16 NeuronCores; the cluster has 12: use at most 6 replicas"):
        place_generate("inf2", 2, cpus=96, neuron_cores=12, num_replicas=8)
    with pytest.raises(ValueError, match="do not split"):
        place_generate("inf2", 8, cpus=96, neuron_cores=12)
    replicas, actor = place_generate("cpu", 2, cpus=16, neuron_cores=None, num_replicas=2, env={"A": "1"})
    assert replicas * actor["num_cpus"] <= 16 and actor["runtime_env"] == {"env_vars": {"A": "1"}}
    with pytest.raises(ValueError, match="cannot hold 2 tensor-parallel ranks"):
        place_generate("cpu", 2, cpus=2, neuron_cores=None, num_replicas=2)
