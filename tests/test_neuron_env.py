"""The Neuron host checks of backend `nki`, with fake `nki` modules, fake /dev folders and fake
environments (no Neuron SDK or device here): the NKI version floor, device detection under any
/dev/neuron<N>, the LNC degree from NEURON_LOGICAL_NC_CONFIG, and what `tkg serve` does with them
(`--backend nki` refuses at start with one line; `--backend auto` falls back to cpu and says why)."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from tkg.kernel import backends
from tkg.kernel.backends import neuron_env, nki
from tkg.server import cli


def fake_nki(version: str | None) -> types.ModuleType:
    """A stand-in for the Neuron `nki` package: `jit`, `simulate` and (unless None) `__version__`."""
    mod = types.ModuleType("nki")
    mod.jit = lambda fn=None, **kw: fn  # type: ignore[attr-defined]
    mod.simulate = lambda kernel: kernel  # type: ignore[attr-defined]
    if version is not None:
        mod.__version__ = version  # type: ignore[attr-defined]
    return mod


@pytest.fixture
def no_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fake /dev, and no NKI_SIMULATOR."""
    dev = tmp_path / "dev"
    dev.mkdir()
    monkeypatch.setenv(neuron_env.DEV_DIR_VAR, str(dev))
    monkeypatch.delenv("NKI_SIMULATOR", raising=False)
    return dev


# ---- the NKI version floor ----------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.3.0", "0.3.9+abc"])
def test_an_nki_older_than_the_kernel_needs_is_refused_naming_both_versions(
    version: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "nki", fake_nki(version))
    reason = backends.unavailable_reason("nki")
    assert reason is not None and "\n" not in reason
    assert f"nki {version} is installed; the kernel needs nki >= 0.4.0" in reason, reason
    with pytest.raises(backends.BackendUnavailable, match=re.escape(f"nki {version} is installed")):
        backends.resolve("nki")


@pytest.mark.parametrize("version", ["0.4.0", "0.5.0", "0.6.1.dev3", "1.0"])
def test_an_nki_new_enough_is_accepted(version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nki", fake_nki(version))
    assert backends.unavailable_reason("nki") is None


def test_an_nki_without_a_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nki", fake_nki(None))
    monkeypatch.setattr(neuron_env.importlib.metadata, "version", _no_distribution)
    assert "cannot tell the installed nki's version" in (backends.unavailable_reason("nki") or "")


def _no_distribution(name: str) -> str:
    raise neuron_env.importlib.metadata.PackageNotFoundError(name)


def test_serve_backend_nki_with_an_old_nki_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_device: Path
) -> None:
    monkeypatch.setitem(sys.modules, "nki", fake_nki("0.2.0"))
    assert cli.main(["--backend", "nki", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "nki 0.2.0 is installed; the kernel needs nki >= 0.4.0" in err, err


# ---- device detection -----------------------------------------------------------------------------


def test_any_neuron_device_index_counts(tmp_path: Path) -> None:
    for name in ("neuron3", "neuron12", "neuron_monitor", "neuronx", "null"):
        (tmp_path / name).touch()
    assert [p.name for p in neuron_env.neuron_devices(tmp_path)] == ["neuron3", "neuron12"]
    assert neuron_env.neuron_devices(tmp_path / "nothing-here") == []


def test_on_device_sees_a_pod_s_device_under_its_host_index(
    monkeypatch: pytest.MonkeyPatch, no_device: Path
) -> None:
    assert not nki.on_device()
    (no_device / "neuron3").touch()  # what the device plugin hands a pod on a multi-device node
    assert nki.on_device()
    monkeypatch.setenv("NKI_SIMULATOR", "1")
    assert not nki.on_device()


def test_serve_backend_nki_without_a_device_exits_2_naming_the_device_it_looked_for(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_device: Path
) -> None:
    monkeypatch.setitem(sys.modules, "nki", fake_nki("0.5.0"))  # a good SDK, but no device
    assert cli.main(["--backend", "nki", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"no Neuron device ({no_device}/neuron* not found" in err, err
    # With the device present the device check passes (torch-neuronx is still missing here).
    (no_device / "neuron5").touch()
    with pytest.raises(nki.NeuronRuntimeMissing) as info:
        backends.require_serving("nki")
    assert "no Neuron device" not in str(info.value) and "torch-neuronx" in str(info.value)


def test_auto_passes_over_nki_without_a_device_and_says_why(
    monkeypatch: pytest.MonkeyPatch, no_device: Path
) -> None:
    monkeypatch.setitem(sys.modules, "nki", fake_nki("0.5.0"))
    assert backends.resolve("auto") != "nki"
    (why,) = [w for n, w in backends.auto_skipped() if n == "nki"]
    assert why.startswith(f"no Neuron device ({no_device}/neuron* not found"), why


def test_serve_auto_start_line_says_it_fell_back_to_cpu(tmp_path: Path) -> None:
    """A real `tkg serve --backend auto` with a fake SDK (nki 0.5.0 on PYTHONPATH) and an empty
    fake /dev: it serves on cpu, and the start line names the device nki looked for."""
    from support.server_proc import start_server

    if backends.unavailable_reason("cpu") is not None:
        pytest.skip("the cpu backend is not built here")
    pkg = tmp_path / "site" / "nki"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0.5.0'\n\ndef jit(fn=None, **kw):\n    return fn\n")
    dev = tmp_path / "dev"
    dev.mkdir()
    srv = start_server("--backend", "auto", "--preset", "tiny",
                       env={neuron_env.DEV_DIR_VAR: str(dev), "PYTHONPATH": str(tmp_path / "site")})  # fmt: skip
    try:
        assert srv.backend == "cpu"
        assert f"backend=cpu (auto passed over nki: no Neuron device ({dev}/neuron* not found" in srv.line, srv.line
    finally:
        assert srv.stop() == 0


# ---- LNC -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "lnc"),
    [({}, 2), ({"NEURON_LOGICAL_NC_CONFIG": "1"}, 1), ({"NEURON_LOGICAL_NC_CONFIG": " 2 "}, 2),
     ({"NEURON_PLATFORM_TARGET_OVERRIDE": "trn3"}, 2), ({"NEURON_PLATFORM_TARGET_OVERRIDE": "trn1"}, 1),
     ({"NEURON_PLATFORM_TARGET_OVERRIDE": "gen2", "NEURON_LOGICAL_NC_CONFIG": "1"}, 1)],
)  # fmt: skip
def test_lnc_defaults_to_the_platform_s_and_reads_the_runtime_variable(env: dict[str, str], lnc: int) -> None:
    assert neuron_env.lnc_config(env) == lnc


@pytest.mark.parametrize(
    ("env", "message"),
    [({"NEURON_LOGICAL_NC_CONFIG": "2", "NEURON_PLATFORM_TARGET_OVERRIDE": "trn1"},
      "NEURON_LOGICAL_NC_CONFIG=2: trn1 does not support LNC 2; expected 1"),
     ({"NEURON_LOGICAL_NC_CONFIG": "4"}, "NEURON_LOGICAL_NC_CONFIG=4: trn2 does not support LNC 4; expected 1 or 2"),
     ({"NEURON_LOGICAL_NC_CONFIG": "two"}, "NEURON_LOGICAL_NC_CONFIG='two': expected 1 or 2 on trn2"),
     ({"NEURON_PLATFORM_TARGET_OVERRIDE": "inf9"}, "NEURON_PLATFORM_TARGET_OVERRIDE='inf9': expected one of")],
)  # fmt: skip
def test_lnc_the_platform_cannot_run_is_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(neuron_env.NeuronConfigError, match=message.replace("(", r"\(")):
        neuron_env.lnc_config(env)


def test_serve_reads_the_lnc_of_device_backends_and_refuses_a_bad_one() -> None:
    args = cli.build_parser().parse_args(["--backend", "nki-emu"])
    assert cli.settings_from_args(args, "nki-emu", env={}).lnc == 2
    assert cli.settings_from_args(args, "nki-emu", env={"NEURON_LOGICAL_NC_CONFIG": "1"}).lnc == 1
    bad = {"NEURON_LOGICAL_NC_CONFIG": "2", "NEURON_PLATFORM_TARGET_OVERRIDE": "trn1"}
    with pytest.raises(cli.ConfigError, match="NEURON_LOGICAL_NC_CONFIG=2: trn1 does not support LNC 2"):
        cli.settings_from_args(args, "nki-emu", env=bad)
    assert cli.settings_from_args(args, "cpu", env=bad).backend == "cpu"  # host backends have no LNC
