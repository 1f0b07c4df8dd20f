"""dtrain.secrets and the runtime_env of `dtrain submit`: secrets leave the submitter sealed with the
cluster's token and open only with it (the real job on a real head: tests/test_submit.py)."""
from __future__ import annotations

import os

import pytest

from dtrain.secrets import SEALED_VAR, SECRET_VARS, SecretsError, cluster_token, seal, unseal, unseal_into_environ
from dtrain.submit import job_runtime_env

RUNTIME_ENV = os.path.join(os.path.dirname(__file__), "..", "cluster", "runtime_env.yaml")


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No secret and no Ray token in the environment; HOME without ~/.ray/auth_token."""
    for var in (*SECRET_VARS, SEALED_VAR, "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_cluster_token_follows_rays_precedence(clean_env, tmp_path):
    assert cluster_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert cluster_token() == "from-home"
    (tmp_path / "tok").write_text("from-path")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert cluster_token() == "from-path"
    clean_env.setenv("RAY_AUTH_TOKEN", "from-env")
    assert cluster_token() == "from-env"


def test_sealed_secrets_open_only_with_the_same_token():
    sealed = seal({"WANDB_API_KEY": "k-123"}, "token-a")
    assert "k-123" not in sealed
    assert unseal(sealed, "token-a") == {"WANDB_API_KEY": "k-123"}
    with pytest.raises(SecretsError, match="another cluster"):
        unseal(sealed, "token-b")
    with pytest.raises(SecretsError):
        unseal(sealed[:-4] + "AAAA", "token-a")  # tampered


def test_submit_seals_the_secrets_set_here_into_the_runtime_env(clean_env, tmp_path):
    clean_env.setenv("RAY_AUTH_TOKEN", "cluster-token")
    clean_env.setenv("WANDB_API_KEY", "w-secret")
    clean_env.setenv("AWS_SECRET_ACCESS_KEY", "a-secret")
    env = job_runtime_env(tmp_path, RUNTIME_ENV)
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray accepts it
    assert env["working_dir"] == str(tmp_path) and env["env_vars"]["WANDB_SILENT"] == "true"  # the file's own
    assert not {"w-secret", "a-secret"} & set(map(str, env["env_vars"].values()))  # nothing in clear
    assert unseal(env["env_vars"][SEALED_VAR], "cluster-token") == {"WANDB_API_KEY": "w-secret",
                                                                    "AWS_SECRET_ACCESS_KEY": "a-secret"}


def test_the_job_side_unseals_into_its_environment(clean_env):
    clean_env.setenv("RAY_AUTH_TOKEN", "cluster-token")
    clean_env.setenv(SEALED_VAR, seal({"WANDB_API_KEY": "w-secret", "AWS_SESSION_TOKEN": "s"}, "cluster-token"))
    clean_env.setenv("AWS_SESSION_TOKEN", "set-on-the-node")  # the node's own value wins
    assert unseal_into_environ() == ["AWS_SESSION_TOKEN", "WANDB_API_KEY"]
    assert os.environ["WANDB_API_KEY"] == "w-secret" and os.environ["AWS_SESSION_TOKEN"] == "set-on-the-node"


def test_a_node_without_the_token_refuses_clearly(clean_env):
    clean_env.setenv(SEALED_VAR, seal({"WANDB_API_KEY": "w"}, "cluster-token"))
    with pytest.raises(SecretsError, match="no Ray auth token"):
        unseal_into_environ()


def test_without_a_token_secrets_are_not_sent_and_submit_says_so(clean_env, tmp_path, capsys):
    import sys

    clean_env.setenv("WANDB_API_KEY", "w-secret")
    env = job_runtime_env(tmp_path, None, out=sys.stderr)
    assert "env_vars" not in env or SEALED_VAR not in env["env_vars"]
    err = capsys.readouterr().err
    assert "WANDB_API_KEY" in err and "w-secret" not in err


@pytest.mark.parametrize("body,match", [("- pip\n", "mapping"), ("env_vars: {WANDB_API_KEY: x}\n", "in clear"),
                                        ("a: [\n", "not YAML")])
def test_a_bad_runtime_env_file_is_refused_naming_the_problem(tmp_path, body, match):
    bad = tmp_path / "env.yaml"
    bad.write_text(body)
    with pytest.raises(ValueError, match=match):
        job_runtime_env(tmp_path, str(bad))
