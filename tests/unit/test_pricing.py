import json
import math

import pytest
from hypothesis import given, strategies as st

from neuronserve.common import pricing
from neuronserve.common.pricing import (INSTANCES, InstanceType, MissingPriceError, UnknownInstanceError,
                            cost_per_million, detect_instance_type, get_instance, load_overrides,
                            price_per_core_second, price_per_hour)

# From the AWS Neuron documentation (and Ray's instance map for the core counts).
NEURON_FACTS = {
    # name: (NeuronCores, vCPU, RAM GiB, $/hour)
    "inf2.xlarge": (2, 4, 16, 0.7582),
    "inf2.8xlarge": (2, 32, 128, 1.96786),
    "inf2.24xlarge": (12, 96, 384, 6.49063),
    "inf2.48xlarge": (24, 192, 768, 12.98127),
    "trn1.2xlarge": (2, 8, 32, 1.34375),
    "trn1.32xlarge": (32, 128, 512, 21.50),
    "trn2.48xlarge": (64, 192, 2048, None),
}



@pytest.mark.parametrize("name", sorted(NEURON_FACTS))
def test_neuron_instances_match_the_reference(name):
    cores, vcpus, ram, price = NEURON_FACTS[name]
    inst = get_instance(name)
    assert (inst.neuron_cores, inst.vcpus, inst.memory_gib, inst.price_per_hour_usd) == (
        cores, vcpus, ram, price)
    assert inst.family == name.split(".")[0]
    assert inst.cores == cores and inst.core_kind == "neuron_core"


def test_comparison_instances_are_cpu_or_gpu():
    for name in ["c7g.xlarge", "c7g.2xlarge", "c7g.4xlarge", "c7i.xlarge", "c7i.2xlarge",
                 "c7i.4xlarge", "g5.xlarge", "g5.2xlarge", "g6.xlarge", "g6.2xlarge"]:
        inst = get_instance(name)
        assert inst.family is None
        assert inst.price_per_hour_usd is not None and inst.price_per_hour_usd > 0
        if name.startswith("g"):
            assert inst.gpus == 1 and inst.cores == 1 and inst.core_kind == "gpu"
        else:
            assert inst.gpus == 0 and inst.cores == inst.vcpus and inst.core_kind == "vcpu"
    assert get_instance("c7g.xlarge").arch == "arm64"
    # Within a family the price scales with size.
    assert price_per_hour("c7i.4xlarge") == pytest.approx(4 * price_per_hour("c7i.xlarge"))


def test_table_is_consistent():
    for name, inst in INSTANCES.items():
        assert isinstance(inst, InstanceType) and inst.name == name
        assert inst.vcpus > 0 and inst.memory_gib > 0
        assert (inst.family is None) == (inst.neuron_cores == 0)


def test_lookup_is_case_and_space_insensitive():
    assert get_instance(" INF2.XLarge ").name == "inf2.xlarge"


def test_unknown_instance_lists_known_names():
    with pytest.raises(UnknownInstanceError) as e:
        get_instance("inf9.huge")
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert "inf9.huge" in msg and "inf2.xlarge" in msg and "trn1.32xlarge" in msg


def test_overrides_win_and_may_name_unknown_instances():
    assert price_per_hour("inf2.xlarge", {"inf2.xlarge": 0.5}) == 0.5
    assert price_per_hour("inf2.xlarge", {"INF2.XLARGE": 0.25}) == 0.25
    assert price_per_hour("inf2.xlarge", {"trn1.2xlarge": 9.0}) == 0.7582
    assert price_per_hour("my.private", {"my.private": 1.5}) == 1.5
    with pytest.raises(UnknownInstanceError):
        price_per_hour("my.private", {"other": 1.0})


def test_trn2_needs_a_configured_price():
    with pytest.raises(MissingPriceError) as e:
        price_per_hour("trn2.48xlarge")
    assert "price_per_hour_usd" in str(e.value) and "trn2.48xlarge" in str(e.value)
    assert price_per_hour("trn2.48xlarge", {"trn2.48xlarge": 40.0}) == 40.0


def test_price_per_core_second_splits_the_instance():
    for name, (cores, _, _, price) in NEURON_FACTS.items():
        if price is None:
            continue
        assert price_per_core_second(name) == pytest.approx(price / 3600 / cores, rel=1e-12)
    assert price_per_core_second("inf2.48xlarge", cores_per_instance=12) == pytest.approx(
        12.98127 / 3600 / 12)
    assert price_per_core_second("trn2.48xlarge", overrides={"trn2.48xlarge": 64 * 3.6}) == (
        pytest.approx(0.001))
    with pytest.raises(ValueError):
        price_per_core_second("inf2.xlarge", cores_per_instance=0)


@given(rps=st.floats(0.01, 1e6), price=st.floats(0.0, 100.0))
def test_cost_per_million_is_price_over_requests_per_hour(rps, price):
    got = cost_per_million(rps, price)
    requests_per_hour = rps * 3600
    assert math.isclose(got, price / requests_per_hour * 1e6, rel_tol=1e-9, abs_tol=1e-15)


def test_cost_per_million_rejects_zero_throughput():
    with pytest.raises(ValueError):
        cost_per_million(0, 1.0)


def test_load_overrides():
    env = {"NEURONSERVE_PRICES_JSON": json.dumps({"Inf2.xlarge": 1, "trn2.48xlarge": 30.5})}
    assert load_overrides(env) == {"inf2.xlarge": 1.0, "trn2.48xlarge": 30.5}
    assert load_overrides({"NEURONSERVE_PRICES_JSON": "  "}) == {}
    for bad in ["{not json", "[1, 2]", '{"inf2.xlarge": -1}', '{"inf2.xlarge": "cheap"}',
                '{"inf2.xlarge": true}']:
        with pytest.raises(ValueError) as e:
            load_overrides({"NEURONSERVE_PRICES_JSON": bad})
        assert "NEURONSERVE_PRICES_JSON" in str(e.value)


def test_load_overrides_reads_process_env(monkeypatch):
    monkeypatch.setenv("NEURONSERVE_PRICES_JSON", '{"c7g.xlarge": 0.1}')
    assert price_per_hour("c7g.xlarge", load_overrides()) == 0.1


def _no_imds(*a, **k):
    raise AssertionError("IMDS must not be called")


def test_detect_instance_type_order(monkeypatch):
    monkeypatch.setattr(pricing, "_imds_instance_type", _no_imds)
    env = {"NEURONSERVE_INSTANCE_TYPE": "inf2.8xlarge", "NODE_INSTANCE_TYPE": "inf2.xlarge"}
    assert detect_instance_type(env) == "inf2.8xlarge"
    assert detect_instance_type({"NODE_INSTANCE_TYPE": "Trn1.2xlarge"}) == "trn1.2xlarge"
    assert detect_instance_type({"NEURONSERVE_INSTANCE_TYPE": " "}) is None
    assert detect_instance_type({}) is None


def test_detect_instance_type_uses_imdsv2_only_when_allowed(monkeypatch):
    import urllib.request

    calls = []

    class Resp:
        def __init__(self, body):
            self.body = body

        def read(self):
            return self.body

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(req, timeout):
        calls.append((req.get_method(), req.full_url, dict(req.header_items()), timeout))
        if req.full_url.endswith("/api/token"):
            return Resp(b"TOKEN")
        return Resp(b"inf2.24xlarge\n")

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    assert detect_instance_type({}) is None and calls == []
    assert detect_instance_type({}, allow_imds=True) == "inf2.24xlarge"
    (m1, u1, h1, t1), (m2, u2, h2, t2) = calls
    assert m1 == "PUT" and u1 == "http://169.254.169.254/latest/api/token"
    assert any(k.lower() == "x-aws-ec2-metadata-token-ttl-seconds" for k in h1)
    assert m2 == "GET" and u2.endswith("/latest/meta-data/instance-type")
    assert any(k.lower() == "x-aws-ec2-metadata-token" and v == "TOKEN" for k, v in h2.items())
    assert t1 == t2 == 0.2


def test_detect_instance_type_imds_failure_is_none(monkeypatch):
    import urllib.request

    def fail(req, timeout):
        raise OSError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", fail)
    assert detect_instance_type({}, allow_imds=True) is None


def test_no_trn3_size_is_listed_and_the_message_says_how_to_cost_one():
    """The Neuron docs describe Trn3 only as UltraServers (no instance size, vCPUs or price per
    instance), so no trn3 row is guessed; an override still prices one."""
    assert not [n for n, i in INSTANCES.items() if i.family == "trn3" or n.startswith("trn3")]
    with pytest.raises(UnknownInstanceError, match="price_per_hour_usd"):
        get_instance("trn3.48xlarge")
    assert price_per_hour("trn3.48xlarge", {"trn3.48xlarge": 50.0}) == 50.0


def test_trn2_cores_are_logical_cores_at_the_default_lnc():
    inst = get_instance("trn2.48xlarge")
    chips, physical_per_chip, lnc = 16, 8, 2
    assert inst.neuron_cores == chips * physical_per_chip // lnc == 64
