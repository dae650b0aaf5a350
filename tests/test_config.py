"""Settings: the example file, environment overrides and validation."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

from apipool_proxy.config import ConfigError, Settings, load_settings, settings_from_dict

from .support import ROOT


def test_example_config_documents_every_setting_with_its_default():
    example = ROOT / "config.example.yaml"
    assert load_settings(example, {}) == Settings()
    raw = yaml.safe_load(example.read_text())
    for section in dataclasses.fields(Settings):
        documented = raw[section.name]
        for setting in dataclasses.fields(
            section.type if isinstance(section.type, type) else getattr(Settings(), section.name)
        ):
            assert setting.name in documented, f"{section.name}.{setting.name}"
    # Every setting line carries a comment, in the line or in the block above it.
    for line in example.read_text().splitlines():
        if re.match(r"^  [a-z_]+: [^#]+$", line):
            pytest.fail(f"undocumented setting line: {line!r}")


def test_environment_overrides_with_yaml_values():
    settings = load_settings(
        None,
        {
            "APIPOOL_ADMIN_PORT": "9000",
            "APIPOOL_AUTH_ADMINS": "[alice, bob]",
            "APIPOOL_LIMITS_RPM": "60",
            "APIPOOL_UPSTREAM_ALLOW_PRIVATE_NETWORKS": "true",
            "APIPOOL_MASTER_KEY": "ignored-here",
            "APIPOOL_CONFIG": "ignored-too",
        },
    )
    assert settings.admin.port == 9000
    assert settings.auth.admins == ["alice", "bob"]
    assert settings.limits.rpm == 60
    assert settings.upstream.allow_private_networks is True


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"proxy": {"port": "80"}}, "proxy.port: expected an integer"),
        ({"proxy": {"port": True}}, "proxy.port: expected an integer"),
        ({"upstream": {"read_timeout": 0}}, "upstream.read_timeout: must be greater than 0"),
        ({"auth": {"admins": "alice"}}, "auth.admins: expected a list of strings"),
        ({"limits": {"rpm": 0}}, "limits.rpm: must be null or at least 1"),
        ({"log": {"level": "LOUD"}}, "log.level"),
        ({"pool": {"strategy": None}}, "pool.strategy: must not be null"),
        ({"pool": "fast"}, "pool: expected a mapping"),
        ({"upstream": {"http_proxy": "https://proxy:3128"}}, "upstream.http_proxy: must be null"),
        ({"upstream": {"http_proxy": "http://proxy:99999"}}, "upstream.http_proxy: must be null"),
        ({"upstream": {"http_proxy": "http://proxy/path"}}, "upstream.http_proxy: must be null"),
        ({"proxy": {"idle_timeout": 0}}, "proxy.idle_timeout: must be between"),
        ({"extra": {}}, "unknown section 'extra'"),
    ],
)
def test_bad_values_name_the_setting(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        settings_from_dict(raw)


@pytest.mark.parametrize("value", ["https://user:s3cret-pw@proxy:3128", ["http://u:s3cret-pw@p"]])
def test_errors_about_the_proxy_url_do_not_quote_its_password(value):
    with pytest.raises(ConfigError, match="upstream.http_proxy") as error:
        settings_from_dict({"upstream": {"http_proxy": value}})
    assert "s3cret" not in str(error.value)


def test_readme_leads_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    head = readme[: readme.index("## Contents")]
    assert "make run" in head and "make test" in head
