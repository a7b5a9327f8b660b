"""The discovery settings: flags, environment variables, and bad values."""

from __future__ import annotations

import pytest

from bs_coordination.service.config import Settings, parse_settings
from bs_coordination.service.discovery import DiscoveryConfig, DiscoveryMode


def test_defaults():
    s = parse_settings([], {})
    assert (s.discovery, s.discovery_timeout) == ("auto", 60.0)
    cfg = DiscoveryConfig.from_settings(s)
    assert cfg.path is None and cfg.mode == DiscoveryMode.AUTO and cfg.timeout == 60.0


def test_flags_and_environment(tmp_path):
    script = tmp_path / "startup.py"
    script.write_text("")
    s = parse_settings(["--profile-collection", str(script), "--discovery", "LOAD",
                        "--discovery-timeout", "7.5", "--strict-devices"], {})
    cfg = DiscoveryConfig.from_settings(s)
    assert (cfg.path, cfg.mode, cfg.timeout, cfg.strict) == (
        str(script), DiscoveryMode.LOAD, 7.5, True)
    s = parse_settings([], {"COORDINATION_PROFILE_COLLECTION": "beamline.startup",
                            "COORDINATION_DISCOVERY": "yaml",
                            "COORDINATION_DISCOVERY_TIMEOUT": "30"})
    assert (s.profile_collection, s.discovery, s.discovery_timeout) == (
        "beamline.startup", "yaml", 30.0)
    # The flag wins.
    assert parse_settings(["--discovery", "auto"], {"COORDINATION_DISCOVERY": "yaml"}
                          ).discovery == "auto"
    assert Settings().discovery == "auto"


@pytest.mark.parametrize(("argv", "env", "named"), [
    (["--discovery", "fast"], {}, "--discovery"),
    ([], {"COORDINATION_DISCOVERY": "maybe"}, "COORDINATION_DISCOVERY"),
    (["--discovery-timeout", "0"], {}, "--discovery-timeout"),
    (["--discovery-timeout", "soon"], {}, "--discovery-timeout"),
    ([], {"COORDINATION_DISCOVERY_TIMEOUT": "-1"}, "COORDINATION_DISCOVERY_TIMEOUT"),
    (["--profile-collection", "/no/such/collection"], {}, "--profile-collection"),
])
def test_bad_values_stop_with_one_line_naming_the_setting(argv, env, named, capsys):
    with pytest.raises(SystemExit) as info:
        parse_settings(argv, env)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {named}")
