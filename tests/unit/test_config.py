"""The fleet config: defaults, file, environment, and errors that name the key and the fix."""
import subprocess
import sys
from pathlib import Path

import pytest

from skyfuse import config


def write(tmp_path, text):
    path = tmp_path / "skyfuse.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file():
    fleet = config.load(environ={})
    assert list(fleet.clouds) == ["aws", "gcp", "azure"]
    assert fleet.bus.backend == "embedded" and fleet.bus.kafka.session_timeout_ms >= 6000
    assert fleet.clouds["gcp"].store == "file://.skyfuse/stores/gcp"


def test_file_then_environment(tmp_path):
    path = write(tmp_path, '[bus]\nbackend = "kafka"\n[clouds.aws]\nregion = "eu-west-1"\n')
    fleet = config.load(path, environ={"SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:19092",
                                       "SKYFUSE_DELIVERY__MAX_ATTEMPTS": "9"})
    assert fleet.bus.backend == "kafka" and fleet.bus.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert fleet.delivery.max_attempts == 9
    assert list(fleet.clouds) == ["aws"] and fleet.clouds["aws"].provider == "aws"


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    path = write(tmp_path, '[bus]\nbakend = "kafka"\n')
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    message = str(caught.value)
    assert "bus.bakend" in message and "did you mean 'backend'" in message and str(path) in message


def test_bad_value_names_the_key_the_rule_and_the_value(tmp_path):
    path = write(tmp_path, '[bus.kafka]\nsession_timeout_ms = 3000\n')
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    assert "bus.kafka.session_timeout_ms" in str(caught.value) and "6000" in str(caught.value)
    assert "got 3000" in str(caught.value)


def test_bad_environment_value_says_it_came_from_the_environment():
    with pytest.raises(config.ConfigError, match=r"environment.*bus\.backend.*'embedded' or 'kafka'"):
        config.load(environ={"SKYFUSE_BUS__BACKEND": "rabbit"})


def test_function_names_and_clouds_are_checked(tmp_path):
    with pytest.raises(config.ConfigError, match="unknown function 'traner'; did you mean 'trainer'"):
        config.load(write(tmp_path, "[functions.traner]\nconcurrency = 2\n"), environ={})
    with pytest.raises(config.ConfigError, match="functions.trainer.clouds names 'oci'"):
        config.load(write(tmp_path, '[functions.trainer]\nclouds = ["oci"]\n'), environ={})


def test_broken_toml_and_missing_file_say_so(tmp_path):
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[bus\n"), environ={})
    with pytest.raises(config.ConfigError, match="no such config file"):
        config.load(tmp_path / "nope.toml", environ={})


def test_the_inference_servers_get_the_whole_bus_and_signing_config(tmp_path, monkeypatch):
    """They run in another working directory: relative paths become absolute, secrets stay exact."""
    from skyfuse.dev import local

    (tmp_path / "ca.pem").write_text("x")
    monkeypatch.chdir(tmp_path)
    fleet = config.load(environ={"SKYFUSE_BUS__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
                                 "SKYFUSE_BUS__KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
                                 "SKYFUSE_BUS__KAFKA__SASL_USERNAME": "skyfuse",
                                 "SKYFUSE_BUS__KAFKA__SASL_PASSWORD": '"12345678"',
                                 "SKYFUSE_BUS__KAFKA__SSL_CAFILE": "ca.pem"})
    env = local.serving_env(fleet, "aws")
    monkeypatch.chdir("/")
    served = config.load(environ=env)
    assert served.bus.kafka.sasl_password == "12345678" and served.bus.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert served.bus.kafka.ssl_cafile == str(tmp_path / "ca.pem")
    assert served.signing.keys_dir == str(tmp_path / ".skyfuse" / "keys")
    assert env["INFERENCE_API_KEY_HASHES"] == api_key_hash(tmp_path)


def api_key_hash(root):
    from skyfuse.serving.api import key_hash

    return key_hash((root / ".skyfuse" / "keys" / "inference-api-key").read_text().strip())


def test_the_inference_servers_read_the_same_config_file_whatever_their_directory(tmp_path, monkeypatch):
    """A skyfuse.toml in the working directory naming clouds beyond the defaults (the servers start
    elsewhere and must not fall back to the defaults)."""
    from skyfuse.dev import local

    (tmp_path / "skyfuse.toml").write_text('[clouds.aws]\n[clouds.aws-eu]\nprovider = "aws"\n[clouds.gcp]\n'
                                           '[clouds.azure]\n[clouds.azure-west]\nprovider = "azure"\n')
    monkeypatch.chdir(tmp_path)
    fleet = config.load(environ={})
    env = local.serving_env(fleet, "aws-eu")
    assert env["SKYFUSE_CONFIG"] == str(tmp_path / "skyfuse.toml")
    monkeypatch.chdir("/")
    assert list(config.load(environ=env).clouds) == ["aws", "aws-eu", "gcp", "azure", "azure-west"]


def test_a_runs_critical_path_waits_for_no_batching_window_unless_configured():
    fleet = config.load(environ={"SKYFUSE_FUNCTIONS__SCHEDULER__BATCH_WINDOW_S": "2",
                                 "SKYFUSE_FUNCTIONS__FUSER__BATCH_WINDOW_S": "0.1"})
    assert fleet.function("trainer").batch_window("trainer", 0.5) == 0.0  # critical path: no window
    assert config.Function().batch_window("scheduler", 0.5) == 0.0  # it places each fused model
    assert fleet.function("monitor").batch_window("monitor", 0.5) == 0.5  # the trigger's own
    assert fleet.function("scheduler").batch_window("scheduler", 0.5) == 2.0  # configured
    assert fleet.function("fuser").batch_window("fuser", 0.5) == 0.1
    with pytest.raises(ValueError, match="batch_window_s"):
        config.load(environ={"SKYFUSE_FUNCTIONS__TRAINER__BATCH_WINDOW_S": "-1"})


def test_every_bad_key_is_named_at_once(tmp_path):
    """One run names every mistake, in every table and every cloud, not only the first."""
    path = write(tmp_path, '[clouds.aws]\nprice_per_hour = -1\n[clouds.gcp]\nregon = "x"\n[bus]\nbakend = "kafka"\n'
                           '[delivery]\nmax_attempts = "many"\n[training]\nhidden = []\n')
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})
    lines = str(caught.value).splitlines()[1:]
    assert len(lines) == 5 and all(line.strip().startswith(f"{path}: ") for line in lines)
    text = str(caught.value)
    assert "clouds.aws.price_per_hour: must be float >= 0.0 (got -1)" in text
    assert "unknown key 'clouds.gcp.regon'; did you mean 'region'?" in text
    assert "unknown key 'bus.bakend'; did you mean 'backend'?" in text
    assert "delivery.max_attempts: must be integer, got string (got 'many')" in text
    assert "training.hidden: must be array of length >= 1 (got [])" in text


def test_a_password_is_never_shown(tmp_path):
    fleet = config.load(environ={"SKYFUSE_BUS__KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
                                 "SKYFUSE_BUS__KAFKA__SASL_MECHANISM": "PLAIN",
                                 "SKYFUSE_BUS__KAFKA__SASL_USERNAME": "u",
                                 "SKYFUSE_BUS__KAFKA__SASL_PASSWORD": '"s3cret-pw"'})
    assert fleet.bus.kafka.sasl_password == "s3cret-pw"
    assert "s3cret-pw" not in repr(fleet) and "sasl_password=<redacted>" in repr(fleet.bus.kafka)
    with pytest.raises(config.ConfigError) as caught:
        config.load(write(tmp_path, "[bus.kafka]\nsasl_password = 27182818284\n"), environ={})
    assert "sasl_password: must be a string, not a TOML integer: quote it" in str(caught.value)
    assert "27182818284" not in str(caught.value)


def test_a_changed_copy_is_checked_and_keeps_its_file(tmp_path):
    path = write(tmp_path, '[dns]\nzone = "Skyfuse.Example"\n')
    fleet = config.load(path, environ={})
    assert fleet.source == str(path.resolve()) and config.Fleet().source is None
    copy = config.replace(fleet, dns=config.replace(fleet.dns, record="api.skyfuse.example"))
    assert copy.source == fleet.source and copy.dns.record == "api.skyfuse.example." and copy.dns.zone == fleet.dns.zone
    with pytest.raises(ValueError, match="record is empty"):
        config.replace(fleet.dns, provider="route53")  # a table's own checks run on every copy
    assert fleet.dns.record == ""  # the original is untouched


def test_reading_the_config_imports_no_pydantic():
    """Every function imports the config at its cold start; pydantic's import cost ~80 ms of it."""
    code = ("import sys, skyfuse.config as c; c.load(environ={}); import services.inference.handler; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('pydantic', 'pydantic_core')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_a_bad_item_of_a_list_is_named_by_its_place(tmp_path):
    with pytest.raises(config.ConfigError, match=r"training\.hidden\[1\]: must be integer, got string"):
        config.load(write(tmp_path, '[training]\nhidden = [64, "x"]\n'), environ={})
    with pytest.raises(config.ConfigError, match=r"clouds: must be table, got integer \(got 5\)"):
        config.load(write(tmp_path, "clouds = 5\n"), environ={})
