from pathlib import Path

import pytest

from stowage.settings import ConfigError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("STOWAGE_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    s = load_settings()
    assert s.listen == "127.0.0.1:7439"
    assert s.default_registry == "docker.io"
    assert s.tag_ttl == 300
    assert s.data.name == "stowage"
    assert s.insecure_registry == []


def test_flags_beat_env_beat_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "stowage.yaml"
    cfg.write_text(
        "tag-ttl: 10\nlisten: 127.0.0.1:1\ninsecure-registry: [a.example:5000]\n"
        "default_registry: index.docker.io\n"
    )
    s = load_settings(cfg)
    assert (s.tag_ttl, s.listen, s.insecure_registry) == (10, "127.0.0.1:1", ["a.example:5000"])
    assert s.default_registry == "docker.io"
    monkeypatch.setenv("STOWAGE_TAG_TTL", "20")
    monkeypatch.setenv("STOWAGE_INSECURE_REGISTRY", "b.example:1, c.example")
    s = load_settings(cfg)
    assert s.tag_ttl == 20
    assert s.insecure_registry == ["b.example:1", "c.example"]
    assert s.listen == "127.0.0.1:1"
    s = load_settings(cfg, tag_ttl=30.0, insecure_registry=("d.example",), listen=None)
    assert s.tag_ttl == 30
    assert s.insecure_registry == ["d.example"]
    assert s.listen == "127.0.0.1:1"


def test_config_from_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tag-ttl: 7\n")
    monkeypatch.setenv("STOWAGE_CONFIG", str(cfg))
    assert load_settings().tag_ttl == 7


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("bogus: 1\n", "unknown option"),
        ("- a\n", "mapping"),
        ("listen: nowhere\n", "listen"),
        ("tag-ttl: -1\n", "tag_ttl"),
        ("insecure-registry: ['http://x']\n", "insecure_registry"),
        ("a: [\n", "not readable YAML"),
    ],
)
def test_bad_config_is_named(tmp_path: Path, content: str, message: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_settings(cfg)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "absent.yaml")


def test_cluster_commands_read_their_own_options_from_yaml(tmp_path: Path) -> None:
    from stowage.agent.config import AgentSettings
    from stowage.operator.config import OperatorSettings
    from stowage.settings import load_layered

    agent_cfg = tmp_path / "agent.yaml"
    agent_cfg.write_text("node-name: node-a\nmirror: [docker.io, ghcr.io]\nkubeconfig: /k.yaml\n")
    agent = load_layered(AgentSettings, agent_cfg)
    assert (agent.node_name, agent.mirror) == ("node-a", ["docker.io", "ghcr.io"])
    assert agent.kubeconfig == Path("/k.yaml")
    operator_cfg = tmp_path / "operator.yaml"
    operator_cfg.write_text("namespace: ops\nexpiry: 2d\n")
    operator = load_layered(OperatorSettings, operator_cfg)
    assert (operator.namespace, operator.expiry) == ("ops", 2 * 86400)
    # An option of another command is still unknown here.
    operator_cfg.write_text("namespace: ops\nmirror: [docker.io]\n")
    with pytest.raises(ConfigError, match="unknown option"):
        load_layered(OperatorSettings, operator_cfg)
