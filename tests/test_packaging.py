"""A regular (non-editable) install works outside the source tree: the wheel ships the Serve
configs as package data, and ``atspeed-ray serve`` resolves its default ``--config`` from there.

Offline: the wheel is built with this environment's setuptools (``--no-build-isolation``,
``--no-index``) from a copy of the sources, and installed with ``--no-deps --no-index`` into a
fresh venv without pip or site packages. The installed package's dependencies (pyyaml, pydantic)
come from this environment through a ``.pth`` line that ranks after the venv's own site-packages,
so ``atspeed_ray`` itself can only come from the wheel."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCES = ["atspeed_ray", "serve_configs", "pyproject.toml", "setup.py", "README.md"]


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def build_wheel(tmp: Path) -> Path:
    src = tmp / "src"  # a copy: an in-tree build would write build/ and *.egg-info into the repo
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    (wheel,) = (tmp / "dist").glob("atspeed_ray-*.whl")
    return wheel


def venv_python(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "-q", str(wheel)], cwd=tmp)
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                  cwd=tmp).strip()
    deps = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(purelib) / "zz_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    return python


def test_wheel_installs_with_the_serve_configs_and_serve_finds_its_default(tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    shipped = {p.name for p in (REPO / "serve_configs").glob("*.yaml")}
    assert {f"atspeed_ray/serve_configs/{n}" for n in shipped} <= names
    sources = {p.relative_to(REPO).as_posix() for p in (REPO / "atspeed_ray").rglob("*.py")}
    assert sources <= names, f"modules missing from the wheel: {sorted(sources - names)}"

    python = venv_python(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"  # not the repo, not the source copy
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    where = run([str(python), "-c", "import atspeed_ray.serving.commands as c; "
                 "print(c.__file__); print(c.config_dir() / 'local.yaml')"], cwd=elsewhere, env=env)
    module, config = map(Path, where.split())
    venv = (tmp_path / "venv").resolve()
    assert module.is_relative_to(venv) and config.is_relative_to(venv), where
    assert config.read_bytes() == (REPO / "serve_configs" / "local.yaml").read_bytes()

    # the console script, with the default --config
    from safetensors.torch import save_file
    import torch

    for name in ("target", "draft"):  # what serve checks before it prints: model folders with a
        (elsewhere / name).mkdir()      # readable weight file, and the target's item index (the
        (elsewhere / name / "config.json").write_text("{}")  # contract form, no --data)
        save_file({"w": torch.zeros(1)}, str(elsewhere / name / "model.safetensors"))
    (elsewhere / "target" / "index.json").write_text("{}")
    script = python.parent / "atspeed-ray"
    help_text = run([str(script), "serve", "--help"], cwd=elsewhere, env=env)
    assert f"(default:{config})" in "".join(help_text.split())  # argparse wraps long paths
    out = run([str(script), "serve", "--target", "target", "--draft", "draft", "--print-config"],
              cwd=elsewhere, env=env)
    resolved = yaml.safe_load(out)
    app = resolved["applications"][0]
    assert app["import_path"] == "atspeed_ray.serving.app:build_app"
    assert app["args"]["target"] == str((elsewhere / "target").resolve())
    assert resolved["http_options"]["host"] == "127.0.0.1"
