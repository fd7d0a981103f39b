"""The layers (docs/architecture.md): the contracts name every core module, and there is one import name."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_core_module_is_under_the_core_contract():
    """A new module in gptdeploy/ is core, and the contract that keeps the core below the others names it."""
    core = next(c for c in contracts() if c["name"].startswith("The core imports"))
    modules = {f"gptdeploy.{p.stem}" for p in (ROOT / "gptdeploy").glob("*.py")} - {"gptdeploy.__init__",
                                                                                    "gptdeploy.__main__"}
    assert set(core["source_modules"]) == modules
    assert set(core["forbidden_modules"]) == {"gptdeploy.exporters", "gptdeploy.runtimes", "gptdeploy.app"}


def test_exporters_and_runtimes_install_under_gptdeploy_only():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["packages"] == ["gptdeploy", "gptdeploy.app", "gptdeploy.exporters", "gptdeploy.runtimes"]
    assert setuptools["package-dir"] == {"gptdeploy.exporters": "exporters", "gptdeploy.runtimes": "runtimes"}
