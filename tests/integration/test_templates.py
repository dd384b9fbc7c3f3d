"""The deployment templates under infra/ name only entry points that exist, on the catalog's topics.

Fast, no cloud and no broker: cfn-lint and the SAM translator on infra/aws/template.yaml, the
Azure function app's `get_functions()`, and `bash -n` on infra/gcp/deploy.sh (shellcheck runs on every
shell script in tests/unit/test_shell_scripts.py); the DNS front door of each cloud (Route 53 records
and the router function, Traffic Manager, Cloud DNS).
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import yaml

from skyfuse import config, contracts

ROOT = Path(__file__).resolve().parents[2]
SAM = ROOT / "infra/aws/template.yaml"
AZURE = ROOT / "infra/azure"
DEPLOY_SH = ROOT / "infra/gcp/deploy.sh"
KAFKA_FUNCTIONS = ("trainer", "exporter", "fuser", "scheduler", "deployer")
AWS_KAFKA_FUNCTIONS = (*KAFKA_FUNCTIONS, "router")  # the router sets Route 53; the other clouds' DNS is templated
TRAFFIC_MANAGER = AZURE / "traffic-manager.json"


def catalog_topics(function: str) -> set[str]:
    return {t.topic for t in contracts.catalog().values() if function in t.consumers}


class _CfnLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form intrinsics (!Ref, !Sub, ...) as plain values."""


_CfnLoader.add_multi_constructor("!", lambda loader, suffix, node: (
    loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
    else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode)
    else loader.construct_scalar(node)))


@cache
def sam() -> dict:
    return yaml.load(SAM.read_text(), Loader=_CfnLoader)


def sam_functions() -> dict[str, dict]:
    return {k: r["Properties"] for k, r in sam()["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}


def test_cfn_lint_passes():
    exe = shutil.which("cfn-lint", path=str(Path(sys.executable).parent)) or shutil.which("cfn-lint")
    assert exe, "cfn-lint is not installed (pip install cfn-lint)"
    out = subprocess.run([exe, str(SAM)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"cfn-lint failed:\n{out.stdout}\n{out.stderr}"


def test_sam_translator_transforms(monkeypatch):
    """The real SAM transform (what CloudFormation runs) accepts the template: one Kafka event
    source mapping per catalog topic, with the batching and failure settings."""
    from samtranslator.translator.transform import transform
    from samtranslator.yaml_helper import yaml_parse

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    template = yaml_parse(SAM.read_text())
    for resource in template["Resources"].values():  # what `sam package` does to local paths
        props = resource.get("Properties", {})
        if "CodeUri" in props:
            props["CodeUri"] = "s3://bucket/code.zip"
        if "ContentUri" in props:
            props["ContentUri"] = "s3://bucket/layer.zip"
        if props.get("PackageType") == "Image":
            props["ImageUri"] = "123456789012.dkr.ecr.us-east-1.amazonaws.com/skyfuse:train"

    class Policies:
        def load(self):
            return {name: f"arn:aws:iam::aws:policy/service-role/{name}" for name in (
                "AWSLambdaMSKExecutionRole", "AWSLambdaBasicExecutionRole", "AWSLambdaVPCAccessExecutionRole")}

    out = transform(template, {"KafkaClusterArn": "arn:aws:kafka:us-east-1:123456789012:cluster/c/u",
                               "KafkaBootstrapServers": "b-1:9098"}, Policies())
    mappings = [r["Properties"] for r in out["Resources"].values() if r["Type"] == "AWS::Lambda::EventSourceMapping"]
    assert sorted(t for m in mappings for t in m["Topics"]) == sorted(
        t for f in AWS_KAFKA_FUNCTIONS for t in catalog_topics(f))
    assert len(mappings) == sum(len(catalog_topics(f)) for f in AWS_KAFKA_FUNCTIONS)
    for m in mappings:
        function = m["AmazonManagedKafkaEventSourceConfig"]["ConsumerGroupId"].removeprefix("aws.")
        window = 0 if function in config.CRITICAL_PATH else 1  # what the local hosts do, as config says
        assert (m["StartingPosition"], m["BatchSize"]) == ("TRIM_HORIZON", 100)
        assert m["MaximumBatchingWindowInSeconds"] == window, function
        assert m["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
        assert "Destination" in m["DestinationConfig"]["OnFailure"]
    assert any(r["Type"] == "AWS::Lambda::Url" for r in out["Resources"].values())


def _resolve(handler: str, search: list[Path]):
    module, attr = handler.rsplit(".", 1)
    module = module.replace("/", ".")  # as Lambda's Python runtime does
    for base in search:
        if (base / (module.replace(".", "/") + ".py")).exists():
            with _on_path(base):
                return getattr(importlib.import_module(module), attr)
    raise AssertionError(f"handler {handler!r}: no module {module} under {[str(b) for b in search]}")


class _on_path:
    def __init__(self, path: Path):
        self.path = str(path)

    def __enter__(self):
        sys.path.insert(0, self.path)

    def __exit__(self, *exc):
        sys.path.remove(self.path)


def test_sam_handlers_resolve_to_callables():
    functions = sam_functions()
    assert {"TrainerFunction", "ExporterFunction", "FuserFunction", "SchedulerFunction", "DeployerFunction",
            "InferenceFunction", "MonitorFunction", "FuserQuorumFunction", "RouterFunction"} <= set(functions)
    for name, props in functions.items():
        handler = props.get("Handler") or props["ImageConfig"]["Command"][0]
        # zip functions: CodeUri, then the layer (the repo installed); images: the repo, timers.py copied in
        search = [SAM.parent / props.get("CodeUri", "src"), ROOT]
        assert callable(_resolve(handler, search)), name
    for fn in AWS_KAFKA_FUNCTIONS:
        props = functions[f"{fn.capitalize()}Function"]
        assert (props.get("Handler") or props["ImageConfig"]["Command"][0]) == f"services/{fn}/aws.lambda_handler"
    assert functions["InferenceFunction"]["Handler"] == "services/inference/aws.lambda_handler"


def test_sam_topics_equal_catalog():
    functions = sam_functions()
    for fn in AWS_KAFKA_FUNCTIONS:
        events = functions[f"{fn.capitalize()}Function"]["Events"].values()
        kafka = [e["Properties"] for e in events if e["Type"] in ("MSK", "SelfManagedKafka")]
        topics = [t for e in kafka for t in e["Topics"]]
        assert len(topics) == len(set(topics)) and set(topics) == catalog_topics(fn), fn
        assert {e["ConsumerGroupId"] for e in kafka} == {f"aws.{fn}"}
    for name in ("MonitorFunction", "FuserQuorumFunction"):
        (event,) = functions[name]["Events"].values()
        assert event == {"Type": "Schedule", "Properties": {"Schedule": "rate(1 minute)"}}
    env = sam()["Globals"]["Function"]["Environment"]["Variables"]
    assert env["SKYFUSE_CLOUD"] == "aws" and env["SKYFUSE_BUS__BACKEND"] == "kafka"
    assert {"SKYFUSE_BUS__KAFKA__BOOTSTRAP_SERVERS", "SKYFUSE_CLOUDS__AWS__STORE"} <= set(env)


@cache
def azure_functions() -> dict[str, list]:
    spec = importlib.util.spec_from_file_location("skyfuse_infra_function_app", AZURE / "function_app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {f.get_function_name(): json.loads(f.get_function_json())["bindings"]
            for f in module.app.get_functions()}  # get_functions() may run once per app


def test_azure_app_lists_every_function_with_bindings():
    functions = azure_functions()
    for fn in KAFKA_FUNCTIONS:
        triggers = {name: b[0] for name, b in functions.items()
                    if name.startswith(f"{fn}_") and b[0]["type"] == "kafkaTrigger"}
        assert {b["topic"] for b in triggers.values()} == catalog_topics(fn), fn
        for binding in triggers.values():
            assert binding["type"] == "kafkaTrigger" and binding["direction"] == "IN"
            assert binding["cardinality"] == "MANY" and binding["brokerList"] == "KafkaBrokerList"
            assert binding["consumerGroup"] == f"%SKYFUSE_CLOUD%.{fn}"
    routes = {b[0]["route"]: b for name, b in functions.items() if b[0]["type"] == "httpTrigger"}
    from skyfuse.serving import oip

    v2 = {path.removeprefix("/") for _, path, _ in oip.ROUTES}  # the Open Inference Protocol's routes
    assert set(routes) == {"predict", "health", "metadata", "openapi.json", "metrics"} | v2, set(routes)
    assert all(b[0]["authLevel"] == "FUNCTION" and b[1]["type"] == "http" for b in routes.values())
    for name in ("monitor_timer", "fuser_quorum_timer"):
        (binding,) = functions[name]
        assert binding["type"] == "timerTrigger" and binding["schedule"] == "0 */1 * * * *"


def test_azure_json_files_parse():
    host = json.loads((AZURE / "host.json").read_text())
    assert host["version"] == "2.0" and host["extensionBundle"]["id"] == "Microsoft.Azure.Functions.ExtensionBundle"
    assert host["extensions"]["kafka"]["maxBatchSize"] == 64
    settings = json.loads((AZURE / "local.settings.example.json").read_text())["Values"]
    assert settings["FUNCTIONS_WORKER_RUNTIME"] == "python" and settings["SKYFUSE_CLOUD"] == "azure"
    assert {"AzureWebJobsStorage", "KafkaBrokerList", "SKYFUSE_BUS__BACKEND"} <= set(settings)


def _targets(source: Path) -> set[str]:
    """Functions decorated by functions_framework (http or cloud_event, or their aio forms) in a module."""
    tree = ast.parse(source.read_text())
    return {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and any(ast.unparse(d).startswith("functions_framework.") for d in node.decorator_list)}


def test_gcp_deploy_script_names_existing_targets():
    subprocess.run(["bash", "-n", str(DEPLOY_SH)], check=True)
    text = DEPLOY_SH.read_text()
    # every `--function X` with the `GOOGLE_FUNCTION_SOURCE=path` of the same deploy command
    deploys = re.findall(r'--function "?\$?\{?(\w+)\}?"?.*?GOOGLE_FUNCTION_SOURCE=([\w/${}.]+)', text, re.S)
    assert deploys, "no deploy commands found"
    kafka_loop = re.search(r"for fn in ([\w ]+); do", text).group(1).split()
    assert sorted(kafka_loop) == sorted(KAFKA_FUNCTIONS)
    timer_loop = re.search(r"for target in ([\w ]+); do", text).group(1).split()
    for target, source in deploys:
        if target == "fn":
            for fn in kafka_loop:
                assert fn in _targets(ROOT / source.replace("${fn}", fn)), fn
        elif target == "target":
            for t in timer_loop:
                assert t in _targets(ROOT / source), t
        else:
            assert target in _targets(ROOT / source), target
    # the topics the script wires equal the catalog's
    for fn in KAFKA_FUNCTIONS:
        topics = re.search(rf'\[{fn}\]="([^"]+)"', text).group(1).split()
        assert set(topics) == catalog_topics(fn), fn


def test_every_function_signs_with_its_own_key_from_the_clouds_secret_store():
    """AWS: each function's SKYFUSE_SIGNING_KEY is a Secrets Manager reference named after it; the
    layer and image carry the trust file. Google Cloud: each deploy mounts its function's secret."""
    for name, props in sam_functions().items():
        variables = props["Environment"]["Variables"]
        reference = variables["SKYFUSE_SIGNING_KEY"]  # the !Sub string
        function = variables["SKYFUSE_FUNCTION"]
        assert reference == "{{resolve:secretsmanager:${SigningSecretPrefix}/aws." + function + "}}", name
    assert "/opt/keys/trust.json" in (SAM.parent / "Dockerfile").read_text()
    assert "keys/trust.json" in (SAM.parent / "Makefile").read_text()
    run = subprocess.run(["bash", str(DEPLOY_SH)], capture_output=True, text=True, check=True,
                         env={**os.environ, "RUN": "0", "PROJECT": "p", "REGION": "r", "KAFKA_BOOTSTRAP": "b:9092"})
    deploys = [line for line in run.stdout.splitlines() if line.startswith("+ gcloud run deploy")]
    assert len(deploys) == 8
    for line in deploys:
        function = re.search(r"--function (\w+)", line).group(1).split("_")[0]
        assert f"SKYFUSE_SIGNING_KEY=skyfuse-signing-gcp-{function}:latest" in line, line
    assert any(".skyfuse/keys/trust.json" in line and line.startswith("+ cp") for line in run.stdout.splitlines())


# ---- the DNS front door


def test_sam_route53_records_and_a_router_allowed_only_its_own_name():
    resources = sam()["Resources"]
    records = {r["Properties"]["SetIdentifier"]: r for r in resources.values()
               if r["Type"] == "AWS::Route53::RecordSet"}
    assert set(records) == set(config.Fleet().clouds)  # one weighted record per cloud
    for cloud, record in records.items():
        props = record["Properties"]
        assert (props["Type"], props["Name"], props["HostedZoneId"]) == ("CNAME", "DnsRecordName", "HostedZoneId")
        assert props["Weight"] == (255 if cloud == "aws" else 0) and record["Condition"].startswith("Has")
    router = resources["RouterFunction"]
    assert router["Condition"] == "HasDns" and resources["RouterDeadLetterQueue"]["Condition"] == "HasDns"
    (statement,) = [s for p in router["Properties"]["Policies"] if isinstance(p, dict) for s in p["Statement"]
                    if s["Action"] == "route53:ChangeResourceRecordSets"]
    assert statement["Resource"] == "arn:${AWS::Partition}:route53:::hostedzone/${HostedZoneId}"
    assert statement["Condition"]["ForAllValues:StringEquals"] == {
        "route53:ChangeResourceRecordSetsNormalizedRecordNames": ["DnsRecordName"],
        "route53:ChangeResourceRecordSetsRecordTypes": ["A", "AAAA", "CNAME"],
        "route53:ChangeResourceRecordSetsActions": ["UPSERT", "DELETE"]}
    # the router's settings are a valid [dns] section once the parameters are filled in
    env = router["Properties"]["Environment"]["Variables"]
    filled = {"HostedZoneId": "Z0123456789ABC", "DnsRecordName": "api.skyfuse.example", "DnsTtl": "60"}
    dns_env = {k: filled[v] for k, v in env.items() if k.startswith("SKYFUSE_DNS__") and v in filled}
    fleet = config.load(environ={**dns_env, "SKYFUSE_DNS__PROVIDER": env["SKYFUSE_DNS__PROVIDER"]})
    assert (fleet.dns.provider, fleet.dns.hosted_zone_id, fleet.dns.record, fleet.dns.ttl) == (
        "route53", "Z0123456789ABC", "api.skyfuse.example.", 60)
    assert {"SKYFUSE_CLOUDS__AWS__ENDPOINT", "SKYFUSE_CLOUDS__GCP__ENDPOINT",
            "SKYFUSE_CLOUDS__AZURE__ENDPOINT"} <= set(env)


def test_azure_traffic_manager_weights_one_endpoint_per_cloud():
    template = json.loads(TRAFFIC_MANAGER.read_text())
    (profile,) = template["resources"]
    assert profile["type"] == "Microsoft.Network/trafficmanagerprofiles" and profile["location"] == "global"
    props = profile["properties"]
    assert props["trafficRoutingMethod"] == "Weighted"
    endpoints = {e["name"]: e for e in props["endpoints"]}
    assert set(endpoints) == set(config.Fleet().clouds)
    for name, endpoint in endpoints.items():
        assert endpoint["type"] == "Microsoft.Network/trafficManagerProfiles/externalEndpoints"
        assert 1 <= endpoint["properties"]["weight"] <= 1000  # Traffic Manager's range
        assert endpoint["properties"]["endpointStatus"] == ("Enabled" if name == "azure" else "Disabled")
    used = set(re.findall(r"parameters\('(\w+)'\)", TRAFFIC_MANAGER.read_text()))
    assert used == set(template["parameters"]), "every parameter used is declared, and every declared one used"


def test_gcp_cloud_dns_weighted_round_robin_only_when_asked():
    env = {**os.environ, "RUN": "0", "PROJECT": "p", "REGION": "r", "KAFKA_BOOTSTRAP": "b:9092"}
    plain = subprocess.run(["bash", str(DEPLOY_SH)], capture_output=True, text=True, check=True, env=env)
    assert "gcloud dns" not in plain.stdout
    run = subprocess.run(["bash", str(DEPLOY_SH)], capture_output=True, text=True, check=True, env={
        **env, "DNS_ZONE": "skyfuse", "DNS_NAME": "api.skyfuse.example", "AWS_INFERENCE_HOST": "aws.skyfuse.example"})
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("+ gcloud dns record-sets create")]
    args = line.replace("\\;", ";").split()
    assert args[5] == "api.skyfuse.example." and args[args.index("--zone") + 1] == "skyfuse"
    assert args[args.index("--routing-policy-type") + 1] == "WRR" and args[args.index("--type") + 1] == "CNAME"
    items = dict(item.split("=")[::-1] for item in args[args.index("--routing-policy-data") + 1].split(";"))
    assert items == {"skyfuse-inference-PROJECT_NUMBER.r.run.app.": "1", "aws.skyfuse.example.": "0"}
