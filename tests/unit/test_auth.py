"""API keys (`serve.auth`) and their settings: parsing, files, the constant-time check against
every key, and that keys never travel through Ray, nor show in reprs or errors, in clear."""

from __future__ import annotations

import hmac

import cloudpickle
import pytest
from pydantic import ValidationError

from neuronserve.serve import auth
from neuronserve.serve.auth import ApiKeys, KeyFileError, digest, parse_keys, read_key_file
from neuronserve.serve.settings import AppArgs

SECRET = "sk-live-7f3a9c"


def test_keys_are_comma_separated_and_blank_items_dropped():
    assert parse_keys(" a , b,,c ") == ["a", "b", "c"]
    assert parse_keys(None) == [] and parse_keys(" , ") == []


def test_a_key_file_holds_one_key_per_line_with_comments_and_blanks(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# rotated 2026-11\nfirst-key\n\n  second-key  \n#old-key\n")
    assert read_key_file(f) == ["first-key", "second-key"]


def test_a_key_file_that_is_missing_or_empty_is_refused_without_its_content(tmp_path):
    with pytest.raises(KeyFileError, match="cannot be read"):
        read_key_file(tmp_path / "absent")
    f = tmp_path / "keys"
    f.write_text(f"# {SECRET}\n\n")
    with pytest.raises(KeyFileError, match="holds no key") as e:
        read_key_file(f)
    assert SECRET not in str(e.value)


@pytest.mark.parametrize("header, allowed", [
    (b"Bearer k2", True), (b"bearer k2", True), (b"BEARER   k2 ", True), (b"Bearer k1", True),
    (b"Bearer k3", False), (b"Bearer", False), (b"Bearer ", False), (b"Basic k2", False), (b"k2", False),
    (b"Bearer k2x", False), (b"Bearer K2", False), (b"", False), (None, False),
])
def test_only_a_bearer_token_equal_to_a_key_is_allowed(header, allowed):
    assert ApiKeys.from_keys(["k1", "k2"]).allows(header) is allowed


def test_no_keys_means_no_authentication():
    keys = ApiKeys()
    assert not keys and keys.allows(None) and keys.allows(b"Bearer anything")


def test_every_key_is_compared_in_constant_time_whichever_matches(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    keys = ApiKeys.from_keys(["k1", "k2", "k3"])
    for token in (b"k1", b"k3", b"nope"):
        calls.clear()
        keys.allows(b"Bearer " + token)
        assert len(calls) == 3  # no early exit on a match


def test_keys_are_held_as_digests_and_never_shown():
    keys = ApiKeys.from_keys([SECRET], digests=[digest("other")])
    assert len(keys) == 2 and keys.allows(b"Bearer other") and keys.allows(b"Bearer " + SECRET.encode())
    assert SECRET not in repr(keys) and digest(SECRET) not in repr(keys)
    assert SECRET.encode() not in cloudpickle.dumps(keys)


def test_settings_take_keys_from_the_value_and_the_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("from-file\n")
    args = AppArgs(artifacts="a", api_key=f"{SECRET}, second", api_key_file=str(f))
    assert args.api_keys() == [SECRET, "second", "from-file"]
    assert SECRET not in repr(args) and SECRET not in str(args.model_dump())


def test_settings_read_the_replica_contract_variables(tmp_path, monkeypatch):
    f = tmp_path / "keys"
    f.write_text("mounted-key\n")
    monkeypatch.setenv("NEURONSERVE_API_KEY", "env-a,env-b")
    monkeypatch.setenv("NEURONSERVE_API_KEY_FILE", str(f))
    assert AppArgs.model_validate({"artifacts": "a"}).api_keys() == ["env-a", "env-b", "mounted-key"]


@pytest.mark.parametrize("field, value, needle", [
    ("api_key", " , ", "holds no key"),
    ("api_key_file", "/nonexistent/keys", "cannot be read"),
])
def test_settings_refuse_keys_that_give_no_key(field, value, needle):
    with pytest.raises(ValidationError, match=needle):
        AppArgs(artifacts="a", **{field: value})


def test_the_application_carries_digests_never_keys(tmp_path):
    """What `build_app` binds is what Serve stores and shows: no key in it, in any form but a digest."""
    from neuronserve.serve.app import build_app
    from tests.fixtures.inprocess_app import tiny_artifact

    app = build_app(AppArgs(artifacts=str(tiny_artifact(tmp_path)), api_key=f"{SECRET},second", backend="cpu",
                            num_replicas=1, threads_per_replica=1))
    deployment = app._bound_deployment
    args, digests = deployment.init_args
    assert "api_key" not in args and set(digests) == {digest(SECRET), digest("second")}
    assert SECRET.encode() not in cloudpickle.dumps((deployment.init_args, deployment.init_kwargs))
    assert SECRET not in repr(deployment.init_args) and SECRET not in str(deployment._deployment_config)
