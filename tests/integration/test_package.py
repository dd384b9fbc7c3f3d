"""The serving package: what the wheel carries and installs, and that it serves a model.

The `package` test builds the wheel, installs it with `[serve,aws,local]` from the package index
into a fresh venv in a temporary folder outside the checkout, and runs the AWS inference server
from there (no checkout on its path, SKYFUSE_EVENTS_DIR unset): it must load a published model
and answer a prediction equal to onnxruntime's own. About a minute with a warm pip cache; it needs
the package index and fails, never skips, without it. The other tests here take a second.
"""
from __future__ import annotations

import http.client
import importlib.util
import json
import os
import subprocess
import time
import tomllib
import venv
from pathlib import Path

import numpy as np
import pytest
from setuptools import find_namespace_packages

from skyfuse import contracts, events
from skyfuse.serving import testing
from skyfuse.serving.model import publish
from skyfuse.storage import open_store

REPO = Path(__file__).resolve().parents[2]
# what an inference function must not carry: training, other clouds, the CLI, the slow format checkers
NOT_SERVING = ("tensorflow", "tensorflow-cpu", "onnx", "tf2onnx", "scikit-learn", "typer", "rich", "rfc3987-syntax",
               "lark", "pydantic",  # the fleet config is msgspec's: pydantic's import was ~80 ms of a cold start
               "functions-framework", "google-cloud-storage", "azure-functions", "azure-storage-blob")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"skyfuse_package_{name}", REPO / "infra" / "package" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_package_is_in_the_wheel():
    """pyproject lists the packages (the event contracts are mapped in as skyfuse._events): a
    package under shared/skyfuse or services that is not listed would be missing from the wheel."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {p for p in find_namespace_packages(str(REPO / "shared"), include=["skyfuse*"])
             if not p.split(".")[-1].startswith("__")}
    found |= {p for p in find_namespace_packages(str(REPO), include=["services*"]) if "__" not in p}
    found |= {"skyfuse._events", "skyfuse._events.schemas", "skyfuse._events.samples"}
    assert found - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(found - listed)}"
    assert listed - found == set(), f"listed in pyproject.toml but not in the tree: {sorted(listed - found)}"


BAD_URIS = ["s3://bucket/key|x", "s3://bucket/100%", "s3://a:b/c"]  # each matches the schema's pattern
BAD_TIMES = ["2025-01-14T10:12:30", "2025-01-14 10:12:30Z", "2025-02-30T10:12:30Z"]  # no offset, no T, no such day


def format_refusals() -> dict[str, list[str]]:
    """What the contracts say of event data whose only fault is a bad `uri` or `date-time` format."""
    out = {}
    for uri in BAD_URIS:
        data = contracts.sample("model.ready") | {"model_uri": uri}
        out[uri] = contracts.validation_errors("model.ready", data)
    for when in BAD_TIMES:
        data = contracts.sample("metrics.sampled") | {"sampled_at": when}
        out[when] = contracts.validation_errors("metrics.sampled", data)
    return out


def test_bad_uri_and_date_time_are_refused():
    """The two format checkers the schemas need (rfc3986-validator, rfc3339-validator) are there."""
    for value, errors in format_refusals().items():
        kind = "uri" if value in BAD_URIS else "date-time"
        assert errors == [f"{'model_uri' if kind == 'uri' else 'sampled_at'}: {value!r} is not a {kind!r}"], value
    with pytest.raises(contracts.ContractError, match="is not a 'date-time'"):
        events.new_event("metrics.sampled", contracts.sample("metrics.sampled") | {"sampled_at": BAD_TIMES[0]},
                         source="skyfuse://aws/inference")
    with pytest.raises(contracts.ContractError, match="is not a 'uri'"):
        events.new_event("model.ready", contracts.sample("model.ready") | {"model_uri": BAD_URIS[0]},
                         source="skyfuse://aws/trainer")
    assert contracts.validation_errors("model.ready", contracts.sample("model.ready")) == []


# Run by the interpreter of the clean venv, from a folder outside the checkout.
INSIDE = r'''
import importlib.metadata as md, json, re, sys
import skyfuse, services.inference
from skyfuse import contracts
uris, times = json.loads(sys.argv[1])
refusals = {}
for uri in uris:
    refusals[uri] = contracts.validation_errors("model.ready", contracts.sample("model.ready") | {"model_uri": uri})
for when in times:
    data = contracts.sample("metrics.sampled") | {"sampled_at": when}
    refusals[when] = contracts.validation_errors("metrics.sampled", data)
print(json.dumps({
    "skyfuse": skyfuse.__file__, "services": services.inference.__file__,
    "events_dir": str(contracts.events_dir()), "catalog": sorted(contracts.catalog()), "refusals": refusals,
    "dists": sorted(re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower() for d in md.distributions()),
}))
'''


@pytest.fixture(scope="module")
def clean_venv(tmp_path_factory):
    """A venv outside the checkout with the freshly built wheel and its [serve,aws,local] extras."""
    root = tmp_path_factory.mktemp("package")
    assert not root.resolve().is_relative_to(REPO), f"{root} must be outside the checkout"
    wheel = _load("build").build_wheel(root / "dist")
    venv.EnvBuilder(with_pip=True).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    started = time.monotonic()
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              f"{wheel}[serve,aws,local]"], cwd=root, capture_output=True, text=True, timeout=420)
    assert install.returncode == 0, f"pip install {wheel.name}[serve,aws,local] failed (the package index is " \
                                    f"needed):\n{install.stdout[-2000:]}\n{install.stderr[-3000:]}"
    print(f"installed {wheel.name}[serve,aws,local] in {time.monotonic() - started:.0f} s")
    return root, python


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("SKYFUSE_", "INFERENCE_", "PYTHON", "VIRTUAL_ENV"))}


@pytest.mark.package
@pytest.mark.timeout(600)
def test_installed_wheel_carries_contracts_and_only_serving_dependencies(clean_venv):
    root, python = clean_venv
    out = subprocess.run([python, "-c", INSIDE, json.dumps([BAD_URIS, BAD_TIMES])], cwd=root, env=clean_env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout)
    site = Path(found["skyfuse"]).parents[1]
    assert site.name == "site-packages" and site.is_relative_to(root), found["skyfuse"]
    assert Path(found["services"]).is_relative_to(site)
    assert Path(found["events_dir"]) == site / "skyfuse" / "_events"  # the wheel's copy, not a checkout's
    assert found["catalog"] == sorted(contracts.catalog())
    assert found["refusals"] == format_refusals()  # bad uri and date-time still refused
    assert all(found["refusals"].values())
    carried = set(NOT_SERVING) & set(found["dists"])
    assert not carried, f"the serving install pulled {sorted(carried)}"
    assert {"onnxruntime", "numpy", "aws-lambda-powertools", "uvicorn"} <= set(found["dists"])


@pytest.mark.package
@pytest.mark.timeout(600)
def test_installed_wheel_serves_a_model(clean_venv):
    """The AWS inference server (uvicorn + Powertools) from the clean venv, cwd outside the checkout,
    answers a prediction equal to onnxruntime's for the published model."""
    root, python = clean_venv
    coldstart = _load("coldstart")
    work = root / "serve-aws"
    work.mkdir(exist_ok=True)
    env = coldstart.child_env("aws", work, installed=True)
    env = {k: v for k, v in env.items() if k not in ("SKYFUSE_EVENTS_DIR", "VIRTUAL_ENV")}
    model = testing.classifier(seed=3)
    publish(open_store(f"file://{work}/store"), "v1", model)
    started = time.perf_counter()
    process, port, log = coldstart.start("aws", str(python), env, work)
    try:
        first = coldstart.wait_for_prediction("aws", process, port, log, started)
        rows = np.random.default_rng(5).normal(size=(4, 4)).astype(np.float32)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("POST", "/predict", body=json.dumps({"instances": rows.tolist()}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        doc = json.loads(response.read())
        conn.close()
        assert response.status == 200, doc
        assert doc["model_version"] == "v1"
        got = np.array([list(p["probabilities"].values()) for p in doc["predictions"]], dtype=np.float32)
        np.testing.assert_allclose(got, testing.reference(model, rows), rtol=1e-5, atol=1e-6)
        print(f"aws inference from the installed wheel: first prediction {first:.2f} s after process start")
    finally:
        coldstart.stop(process)
