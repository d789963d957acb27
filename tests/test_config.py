"""Configuration: defaults, TOML, environment overrides, and one clear line on error."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from collector.config import SECTIONS, Settings, load_settings, resolve_secret
from collector.consent import ConsentCodec
from collector.errors import ConfigError
from tests.conftest import ROOT


def test_no_config_means_safe_defaults() -> None:
    s = load_settings(None, environ={})
    assert s.storage.path == "collector.db" and s.storage.backend == "sqlite"
    assert s.server.trusted_proxies == ()
    assert s.consent.cookie_name == "kdv_consent" and s.consent.period_days == 365
    assert s.visitor.cookie_name == "kdv_vid" and s.visitor.secure is True
    assert s.geoip.city_db == "" and s.privacy.cookie_allowlist == ()


def test_example_config_documents_every_key() -> None:
    text = (ROOT / "config.example.toml").read_text()
    loaded = load_settings(ROOT / "config.example.toml", environ={})
    assert loaded == Settings()  # the example shows the defaults
    for section in SECTIONS:  # every section, including ones added later
        for key in getattr(loaded, section).__dataclass_fields__:
            assert f"\n{key} = " in text, f"{section}.{key} is not documented"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[storage]\npath = "a.db"\n[server]\nport = 9000\n')
    s = load_settings(
        cfg,
        environ={
            "COLLECTOR_STORAGE_PATH": "b.db",
            "COLLECTOR_SERVER_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.1",
            "COLLECTOR_VISITOR_SECURE": "false",
        },
    )
    assert s.storage.path == "b.db" and s.server.port == 9000
    assert s.server.trusted_proxies == ("10.0.0.0/8", "192.168.1.1")
    assert s.visitor.secure is False


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[server]\nport = 'x'\n", "server.port: expected an integer"),
        ("[server]\nprot = 1\n", "server.prot: unknown key"),
        ("[sever]\n", "unknown config section [sever]"),
        ("[server]\ntrusted_proxies = ['10.0.0.0/33']\n", "server.trusted_proxies"),
        ("[storage]\nbackend = 'mysql'\n", "storage.backend: must be one of sqlite, postgres"),
        ("[consent]\npolicy_version = 'v 2'\n", "consent.policy_version"),
        ("[consent]\nsecret = 'short'\n", "consent.secret: must be at least 16"),
        ("[storage]\nbatch_size = 0\n", "storage.batch_size: must be greater than zero"),
        ("not toml ===", "is not valid TOML"),
    ],
)
def test_invalid_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(cfg, environ={})


def test_cli_exits_2_with_one_line_on_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("[server]\nport = 70000\n")
    out = subprocess.run(
        [sys.executable, "-m", "collector", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "collector: server.port: must be at most 65535, got 70000"
    ]


def test_generated_secret_is_private_and_stable(tmp_path: Path) -> None:
    s = load_settings(None, environ={"COLLECTOR_STORAGE_PATH": str(tmp_path / "x.db")})
    first = resolve_secret(s)
    secret_file = tmp_path / "x.db.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert resolve_secret(s).consent.secret == first.consent.secret
    assert len(first.consent.secret) >= 32


def test_consent_cookie_command_prints_a_cookie_the_server_accepts(tmp_path: Path) -> None:
    env = {**os.environ, "COLLECTOR_STORAGE_PATH": str(tmp_path / "c.db")}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "collector",
            "consent-cookie",
            "--purposes",
            "statistics,advertising",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=True,
    )
    name, _, value = out.stdout.strip().partition("=")
    assert name == "kdv_consent"
    settings = resolve_secret(load_settings(None, environ=env))
    consent = ConsentCodec(settings.consent).decode(value, now=__import__("time").time())
    assert consent is not None and consent.statistics and consent.advertising
    bad = subprocess.run(
        [sys.executable, "-m", "collector", "consent-cookie", "--purposes", "marketing"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
    )
    assert bad.returncode == 2 and "unknown purpose 'marketing'" in bad.stderr
