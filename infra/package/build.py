"""`make package`: the skyfuse wheel, and from it each cloud's inference artifact, what its deploy
tool takes; then a table of their unzipped sizes.

    .venv/bin/python infra/package/build.py [--out build/package] [--clouds aws gcp azure] [--sam PATH|none]

build/package/
  dist/skyfuse-<version>-py3-none-any.whl   the wheel (event contracts inside, as skyfuse/_events)
  aws/       `sam build InferenceFunction` of infra/aws/template.yaml, its SkyfuseLayer made by
             infra/package/aws/Makefile (wheel[serve,aws] for python3.12 x86_64, events/, keys/):
             sam/ (the build, with sam/template.yaml for `sam deploy --template-file`),
             inference-layer.zip and inference-function.zip; the template is validated first
             (`sam validate --lint`). Without SAM CLI (`--sam none`) the same Makefile runs directly.
  gcp/inference/    the source folder `gcloud run deploy --source` takes: main.py (target
             `inference`), requirements.txt naming the wheel beside it with [serve,gcp], events/,
             .skyfuse/keys/trust.json (the paths infra/gcp/deploy.sh's environment names)
  azure/inference/  the function app folder `func azure functionapp publish --no-build` takes:
             function_app.py (the inference routes), host.json, requirements.txt, the wheel, and
             its dependencies for Python 3.11 in .python_packages/lib/site-packages; events/, keys/

Dependencies are installed from the wheel with pip for the cloud's platform (manylinux x86_64,
`--only-binary=:all:`), never from this machine's site-packages; their .pyc are compiled by an
interpreter of the cloud's Python version when one is here (pyenv's counts). Then each artifact is
run as its cloud would run it and must answer a prediction (infra/package/check.py; `--no-check`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
LAMBDA_UNZIPPED_LIMIT = 250 * MIB  # function and all its layers, unzipped
SOURCES = ("pyproject.toml", "README.md", "MANIFEST.in", "shared", "services", "events")
AWS_PYTHON, GCP_PYTHON, AZURE_PYTHON = "3.12", "3.12", "3.11"
# Lambda python3.12 and Cloud Run's python312: glibc 2.34+; the Azure Functions Python 3.11 image: 2.31
PLATFORMS_GLIBC_2_34 = ["manylinux2014_x86_64"] + [f"manylinux_2_{v}_x86_64" for v in (24, 26, 27, 28, 31, 34)]
PLATFORMS_GLIBC_2_28 = ["manylinux2014_x86_64"] + [f"manylinux_2_{v}_x86_64" for v in (24, 26, 27, 28)]


def run(argv: list, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(str(a) for a in argv), flush=True)
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def build_wheel(dist: Path, python: str = sys.executable) -> Path:
    """The wheel, built from a copy of the sources (never a stale build/lib of the checkout)."""
    dist.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="skyfuse-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
        for name in SOURCES:
            path = REPO / name
            if path.is_dir():
                shutil.copytree(path, src / name, ignore=ignore)
            elif path.is_file():
                shutil.copy2(path, src / name)
        run([python, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps", "-w", dist, src])
    wheels = sorted(dist.glob("skyfuse-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise SystemExit(f"no skyfuse wheel in {dist}")
    return wheels[-1]


def pip_target(wheel: Path, extras: str, target: Path, python_version: str, platforms: list[str]) -> None:
    """wheel[extras] and its dependencies for `python_version` on `platforms`, into `target`, without
    .pyc (this interpreter's would be dead weight there; `compile_pyc` makes the target's)."""
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
            "--only-binary=:all:",
            "--implementation", "cp", "--python-version", python_version, "--target", target]
    for platform in platforms:
        argv += ["--platform", platform]
    run([*argv, "--no-compile", f"{wheel}[{extras}]"])


def find_python(version: str, choice: str | None = None) -> str | None:
    """An interpreter of `version` ("3.12") that runs: `choice`, this one, python<version> on PATH
    (a pyenv shim without that version selected does not run), or pyenv's."""
    if choice:
        candidates = [choice]
    else:
        pyenv = Path.home() / ".pyenv" / "versions"
        candidates = [sys.executable, shutil.which(f"python{version}"),
                      *sorted(map(str, pyenv.glob(f"{version}*/bin/python{version}")), reverse=True)]
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except OSError:
            continue
        if out.stdout.strip() == version:
            return candidate
    return None


def compile_pyc(python: str | None, version: str, folder: Path) -> str:
    """.pyc of every module under `folder` but tests, for `version` (unchecked-hash: the artifact is
    read-only where it runs, and zip timestamps would make timestamped .pyc look stale)."""
    if not python:
        print(f"warning: no Python {version}: {folder} has no .pyc (each cold start compiles)", file=sys.stderr)
        return f"no .pyc (no Python {version} here)"
    done = subprocess.run([python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
                           "-x", "/tests/", str(folder)], stdout=subprocess.DEVNULL)
    if done.returncode:
        print(f"warning: some modules under {folder} did not compile", file=sys.stderr)
    return f".pyc for {version}"


def copy_keys(dest: Path) -> bool:
    trust = REPO / ".skyfuse" / "keys" / "trust.json"
    if not trust.is_file():
        print(f"warning: no {trust.relative_to(REPO)} (`skyfuse keys init`): {dest} left out", file=sys.stderr)
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(trust, dest)
    return True


def size_of(path: Path) -> tuple[int, int]:
    """(bytes, files) of a file or folder, unzipped."""
    if path.is_file():
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                infos = [i for i in z.infolist() if not i.is_dir()]
                return sum(i.file_size for i in infos), len(infos)
        return path.stat().st_size, 1
    total = files = 0
    for root, _, names in os.walk(path):
        for name in names:
            p = Path(root) / name
            if not p.is_symlink():
                total += p.stat().st_size
                files += 1
    return total, files


def zip_dir(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for root, dirs, names in os.walk(folder):
            dirs.sort()
            for name in sorted(names):
                p = Path(root) / name
                z.write(p, p.relative_to(folder))
    return dest


def find_sam(choice: str | None) -> str | None:
    if choice == "none":
        return None
    if choice:
        return str(Path(choice).resolve()) if os.sep in choice else shutil.which(choice) or choice
    local = REPO / "build" / "tools" / "sam" / "bin" / "sam"
    return str(local) if local.exists() else shutil.which("sam")


def derived_template(out: Path) -> Path:
    """infra/aws/template.yaml with its relative paths made absolute and SkyfuseLayer built by
    infra/package/aws/Makefile (the inference dependencies of the wheel)."""
    text = (REPO / "infra/aws/template.yaml").read_text()
    layer_uri = "      ContentUri: .\n"
    if text.count(layer_uri) != 1:
        raise SystemExit("infra/aws/template.yaml: expected exactly one `ContentUri: .` (SkyfuseLayer)")
    text = text.replace(layer_uri, f"      ContentUri: {REPO / 'infra/package/aws'}\n")
    text = text.replace("CodeUri: src/", f"CodeUri: {REPO / 'infra/aws/src'}/")
    text = text.replace("DockerContext: ../..", f"DockerContext: {REPO}")
    path = out / "template.yaml"
    path.write_text(text)
    return path


def build_aws(wheel: Path, out: Path, sam: str | None) -> list[tuple[str, Path, str]]:
    out.mkdir(parents=True)
    python312 = find_python(AWS_PYTHON)
    env = {**os.environ, "SKYFUSE_WHEEL": str(wheel), "PYTHON": sys.executable, "PYTHON312": python312 or "",
           "REPO": str(REPO), "SAM_CLI_TELEMETRY": "0"}
    notes = []
    if sam:
        template = REPO / "infra/aws/template.yaml"
        run([sam, "validate", "--lint", "--template", template], env=env, cwd=out)
        run([sam, "validate", "--template", template, "--region", "us-east-1"], env=env, cwd=out)
        notes.append("template: sam validate --lint passed")
        run([sam, "build", "InferenceFunction", "--template", derived_template(out), "--build-dir", out / "sam",
             "--build-in-source", "--cache-dir", out / ".sam-cache"], env=env, cwd=out)
        layer, function = out / "sam" / "SkyfuseLayer", out / "sam" / "InferenceFunction"
    else:
        layer, function = out / "build" / "SkyfuseLayer", out / "build" / "InferenceFunction"
        run(["make", "--no-print-directory", "-C", REPO / "infra/package/aws", "build-SkyfuseLayer",
             f"ARTIFACTS_DIR={layer}"], env=env)
        shutil.copytree(REPO / "infra/aws/src", function, ignore=shutil.ignore_patterns("__pycache__"))
        notes.append("built without SAM CLI (--sam none): template not validated")
    layer_zip = zip_dir(layer, out / "inference-layer.zip")
    function_zip = zip_dir(function, out / "inference-function.zip")
    pyc = ".pyc for 3.12" if python312 else "no .pyc: no Python 3.12 here"
    return [("aws", layer_zip, f"Lambda layer: python/ (wheel[serve,aws], py3.12, {pyc}), events/, keys/"),
            ("aws", function_zip, "Lambda function code (handler services/inference/aws.lambda_handler in the layer)"),
            *[("aws", None, n) for n in notes]]


def build_gcp(wheel: Path, out: Path) -> list[tuple[str, Path, str]]:
    folder = out / "inference"
    folder.mkdir(parents=True)
    shutil.copy2(wheel, folder / wheel.name)
    (folder / "requirements.txt").write_text(
        "# skyfuse's inference with the Google Cloud entry point and store (built by `make package`)\n"
        f"./{wheel.name}[serve,gcp]\n")
    (folder / "main.py").write_text(
        '"""Cloud Run function `inference` (functions-framework, signature http): skyfuse\'s entry point."""\n'
        "from services.inference.gcp import inference  # noqa: F401\n")
    shutil.copytree(REPO / "events", folder / "events")  # SKYFUSE_EVENTS_DIR=/workspace/events (deploy.sh)
    copy_keys(folder / ".skyfuse" / "keys" / "trust.json")  # SKYFUSE_SIGNING__KEYS_DIR=/workspace/.skyfuse/keys
    (out / "DEPLOY.txt").write_text(
        "gcloud run deploy skyfuse-inference --source build/package/gcp/inference --function inference \\\n"
        "  --base-image python312 ...   (the other flags as in infra/gcp/deploy.sh)\n")
    with tempfile.TemporaryDirectory(prefix="skyfuse-gcp-site-") as tmp:
        pip_target(wheel, "serve,gcp", Path(tmp) / "site", GCP_PYTHON, PLATFORMS_GLIBC_2_34)
        installed = size_of(Path(tmp) / "site")
    return [("gcp", folder, "source folder (the build installs requirements.txt)"),
            ("gcp", installed, f"what requirements.txt installs (python {GCP_PYTHON}, x86_64)")]


AZURE_APP = '''"""Azure Functions app (Python v2 model) of skyfuse's inference: the four HTTP routes of
services/inference/azure.py, at function auth level, under /api/."""
from services.inference.azure import app  # noqa: F401
'''


def build_azure(wheel: Path, out: Path) -> list[tuple[str, Path, str]]:
    folder = out / "inference"
    folder.mkdir(parents=True)
    shutil.copy2(REPO / "infra/azure/host.json", folder / "host.json")
    (folder / "function_app.py").write_text(AZURE_APP)
    shutil.copy2(wheel, folder / wheel.name)
    (folder / "requirements.txt").write_text(
        "# skyfuse's inference with the Azure entry point and store (built by `make package`); the same\n"
        "# is installed in .python_packages for `func azure functionapp publish <app> --no-build`\n"
        f"./{wheel.name}[serve,azure]\n")
    site = folder / ".python_packages/lib/site-packages"
    pip_target(wheel, "serve,azure", site, AZURE_PYTHON, PLATFORMS_GLIBC_2_28)
    pyc = compile_pyc(find_python(AZURE_PYTHON), AZURE_PYTHON, site)
    shutil.copytree(REPO / "events", folder / "events")  # SKYFUSE_EVENTS_DIR=events (infra/README.md)
    copy_keys(folder / "keys" / "trust.json")  # SKYFUSE_SIGNING__KEYS_DIR=keys
    return [("azure", folder, f"function app folder (.python_packages for python {AZURE_PYTHON}, {pyc})")]


def table(rows) -> str:
    lines = [f"{'artifact':<46} {'files':>6} {'unzipped MiB':>13} {'zip MiB':>8}  what"]
    for cloud, item, what in rows:
        if item is None:
            lines.append(f"{'':<46} {'':>6} {'':>13} {'':>8}  {what}")
            continue
        if isinstance(item, tuple):
            (size, files), name, packed = item, f"{cloud}: (installed)", ""
        else:
            size, files = size_of(item)
            name = str(item.relative_to(REPO)) if item.is_relative_to(REPO) else str(item)
            packed = f"{item.stat().st_size / MIB:8.1f}" if item.suffix in (".zip", ".whl") else ""
        lines.append(f"{name:<46} {files:>6} {size / MIB:>13.1f} {packed:>8}  {what}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "build" / "package"))
    parser.add_argument("--clouds", nargs="+", choices=("aws", "gcp", "azure"), default=["aws", "gcp", "azure"])
    parser.add_argument("--sam", help="SAM CLI to build and validate with (default: build/tools/sam, else PATH); "
                                      "`none`: run infra/package/aws/Makefile without it")
    parser.add_argument("--no-check", action="store_true", help="do not run the artifacts (infra/package/check.py)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    wheel = build_wheel(out / "dist")
    rows = [("wheel", wheel, "skyfuse + services + event contracts (skyfuse/_events)")]
    if "aws" in args.clouds:
        rows += build_aws(wheel, out / "aws", find_sam(args.sam))
    if "gcp" in args.clouds:
        rows += build_gcp(wheel, out / "gcp")
    if "azure" in args.clouds:
        rows += build_azure(wheel, out / "azure")
    print()
    print(table(rows))
    if "aws" in args.clouds:
        total = sum(size_of(out / "aws" / name)[0] for name in ("inference-layer.zip", "inference-function.zip"))
        print(f"\naws inference, function + layer unzipped: {total / MIB:.1f} MiB of Lambda's 250 MiB "
              f"({(LAMBDA_UNZIPPED_LIMIT - total) / MIB:.1f} MiB to spare)")
        if total > LAMBDA_UNZIPPED_LIMIT:
            print("error: over Lambda's unzipped limit", file=sys.stderr)
            return 1
    if not args.no_check:
        import check  # infra/package/check.py: each artifact run as its cloud would, a prediction checked

        print("\nchecks (infra/package/check.py):")
        for line in check.run_checks(out, args.clouds):
            print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
